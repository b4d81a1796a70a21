//! The idemsink binary run as a child process: its exit, its log and its HTTP listener.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{ErrorKind, ASSIGNED};

/// Asserts that idemsink exited with the code of a failure of `kind`.
pub fn assert_failed_as(status: ExitStatus, kind: ErrorKind, context: &str) {
    assert_eq!(
        status.code(),
        Some(i32::from(kind.exit_code())),
        "expected a {kind} failure ({status}): {context}"
    );
}

/// Runs the idemsink binary to completion with `args`; returns whether it succeeded and its
/// stdout followed by its stderr. It must never panic, whatever the outcome.
pub fn idemsink(args: &[&std::ffi::OsStr]) -> (bool, String) {
    idemsink_with_env(args, &[])
}

/// [`idemsink`] with environment variables of its own (e.g. `RUST_LOG`).
pub fn idemsink_with_env(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> (bool, String) {
    let (status, text) = idemsink_exit(args, env);
    (status.success(), text)
}

/// Runs an idemsink command to its end: how it exited, and what it printed.
pub fn idemsink_exit(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_idemsink"))
        .args(args)
        .env("IDEMSINK_HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .expect("run idemsink");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "idemsink panicked:\n{text}");
    (out.status, text)
}

/// The idemsink binary running one pipeline file, as a child process that is killed if the
/// test ends early. Its stderr goes to a file so tests can read the log.
pub struct Connector {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Connector {
    pub fn start(config: &Path) -> Connector {
        Self::start_command(&["run", "--config"], config)
    }

    pub fn start_command(args: &[&str], config: &Path) -> Connector {
        Self::start_with_env(args, config, &[])
    }

    /// The same, with environment variables of its own (e.g. a testkit hook).
    pub fn start_with_env(args: &[&str], config: &Path, env: &[(&str, &Path)]) -> Connector {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let log = config.with_extension(format!("{}.log", STARTS.fetch_add(1, Ordering::Relaxed)));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_idemsink"))
            .args(args)
            .arg(config)
            .env("RUST_LOG", "info,idemsink=debug")
            // Many instances run at once: each listens on a free loopback port, which it logs.
            .env("IDEMSINK_HTTP_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start idemsink");
        Connector {
            child: Some(child),
            log,
        }
    }

    /// Runs `config` until idemsink exits by itself (60 s at most), asserts that it failed
    /// with the exit code of `kind`, and returns the last line it printed (its one-line
    /// reason) and the whole log.
    pub fn run_to_failure(config: &Path, label: &str, kind: ErrorKind) -> (String, String) {
        let (status, log) = Connector::start(config).wait(Duration::from_secs(60));
        assert_failed_as(
            status,
            kind,
            &format!("{label}: the run must fail; log:\n{log}"),
        );
        let last = log
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or_default();
        (last.to_string(), log)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    /// Sends a signal by name: `TERM`, `STOP`, `CONT`…
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, then reap.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return (status, log);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("idemsink did not exit within {timeout:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status and log. idemsink listens for signals before it logs
    /// anything: a process that has not logged yet is given up to 10 s to get there, so that
    /// the signal is not met by the default action.
    pub fn stop(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log_text().is_empty() && self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("TERM");
        self.wait(timeout)
    }

    /// Where the instance serves /metrics, /healthz and /readyz, from its (text) log.
    pub async fn http_address(&self) -> String {
        self.wait_for_log("serving /metrics", 1, Duration::from_secs(30))
            .await;
        self.log_text()
            .lines()
            .find_map(|l| l.split("address=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(|a| a.trim_matches('"').to_string())
            .expect("the listener's address is logged")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log shows partitions assigned to this instance.
    pub async fn wait_assigned(&self, timeout: Duration) {
        self.wait_for_log(ASSIGNED, 1, timeout).await;
    }

    /// Waits until `needle` occurs `times` times in the log.
    pub async fn wait_for_log(&self, needle: &str, times: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.log_text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {times} times within {timeout:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// GET `path` from an instance's HTTP listener: the status and the body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    match ureq::get(&format!("http://{address}{path}")).call() {
        Ok(r) => (r.status(), r.into_string().expect("body")),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().expect("body")),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// The sum of every sample of `metric` for this pipeline (over its other labels).
pub fn metric_sum(exposition: &str, metric: &str, pipeline: &str) -> Option<f64> {
    let samples: Vec<f64> = exposition
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{metric}{{")) && l.contains(&format!("pipeline=\"{pipeline}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}
