//! What the benchmarks share: their environment, idemsink run as a process until it has caught
//! up (its CPU time and peak RSS read from /proc), and MariaDB's command-line client for
//! `LOAD DATA LOCAL INFILE`.
#![allow(dead_code)] // each benchmark uses a different part

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use idemsink::db::DbPool;
use idemsink::testkit;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;

/// A numeric setting from the environment.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A variable `scripts/bench.sh` sets.
pub fn required(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set; run scripts/bench.sh"))
}

/// Runs `sql` with MariaDB's command-line client (which `LOAD DATA LOCAL INFILE` needs);
/// returns what it printed.
pub fn mariadb(url: &str, sql: &str) -> Result<String> {
    let url = url_parts(url)?;
    let out = std::process::Command::new("mariadb")
        .args([
            "--local-infile=1",
            "-N",
            "-B",
            "-h",
            &url.host,
            "-P",
            &url.port,
        ])
        .args([
            "-u",
            &url.user,
            &format!("-p{}", url.password),
            &url.database,
        ])
        .args(["-e", sql])
        .output()?;
    if !out.status.success() {
        bail!("mariadb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A process's user + system CPU time so far, from `/proc/<pid>/stat` (in clock ticks of
/// 1/100 s, Linux's USER_HZ).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short stat")?.parse()?) };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// A process's peak resident set so far (`VmHWM`), in kB.
pub fn peak_rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kb = line
        .trim_start_matches("VmHWM:")
        .trim_end_matches("kB")
        .trim();
    Ok(kb.parse()?)
}

/// The parts of a database URL.
pub struct UrlParts {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: String,
    pub database: String,
}

/// `mysql://user:password@host:port/database`, for the command-line client.
pub fn url_parts(url: &str) -> Result<UrlParts> {
    let rest = url.split_once("://").context("URL without scheme")?.1;
    let (credentials, rest) = rest.rsplit_once('@').context("URL without user")?;
    let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
    let (address, database) = rest.split_once('/').context("URL without database")?;
    let (host, port) = address.split_once(':').unwrap_or((address, "3306"));
    Ok(UrlParts {
        user: user.into(),
        password: password.into(),
        host: host.into(),
        port: port.into(),
        database: database.split('?').next().unwrap_or(database).into(),
    })
}

/// What one idemsink run took.
pub struct SinkRun {
    pub elapsed: Duration,
    pub cpu: Option<Duration>,
    pub peak_rss_kb: Option<u64>,
}

impl SinkRun {
    pub fn report(&self, rows: i64) {
        eprintln!(
            "idemsink: {rows} rows in {:.1?}, CPU {:.1?} (user + system), peak RSS {} MB",
            self.elapsed,
            self.cpu,
            self.peak_rss_kb.unwrap_or(0) / 1024
        );
    }
}

/// Runs idemsink on `config` from process start until pipeline `tag` has stored `end` for
/// `topic`, then stops it with SIGTERM. BENCH_PERF=<file>: the run is recorded by `perf record`
/// (call graphs) into <file>; BENCH_LOG: its RUST_LOG (default warn).
pub async fn run_idemsink(
    config: &Path,
    pool: &DbPool,
    tag: &str,
    topic: &str,
    end: &BTreeMap<i32, i64>,
) -> Result<SinkRun> {
    run_idemsink_logged(config, pool, tag, topic, end, None).await
}

/// [`run_idemsink`]; with `log`, idemsink writes its log there as JSON lines, every batch
/// included (`idemsink=debug`), for [`Startup::from_log`].
pub async fn run_idemsink_logged(
    config: &Path,
    pool: &DbPool,
    tag: &str,
    topic: &str,
    end: &BTreeMap<i32, i64>,
    log: Option<&Path>,
) -> Result<SinkRun> {
    let started = Instant::now();
    let idemsink = env!("CARGO_BIN_EXE_idemsink");
    // A command idemsink runs under, if any: BENCH_PERF=<file> records the run with `perf
    // record` (call graphs) into <file>; BENCH_WRAP is any other, e.g. `valgrind
    // --tool=callgrind`, whose instruction counts are stable on a noisy machine.
    let wrapper: Vec<String> = match std::env::var("BENCH_PERF") {
        Ok(out) => ["perf", "record", "-F", "499", "-g", "-o", &out, "--"]
            .map(String::from)
            .to_vec(),
        Err(_) => std::env::var("BENCH_WRAP")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect(),
    };
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut wrapped = std::process::Command::new(program);
            wrapped.args(args).arg(idemsink);
            wrapped
        }
        None => std::process::Command::new(idemsink),
    };
    command
        .args(["run", "--http-addr", "127.0.0.1:0", "--config"])
        .arg(config);
    match log {
        Some(file) => command
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info,idemsink=debug")
            .stderr(std::fs::File::create(file)?),
        None => command.env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    };
    let mut child = command.spawn()?;
    let waited =
        testkit::wait_for_offsets(
            pool,
            tag,
            topic,
            end,
            Duration::from_secs(600),
            || match child.try_wait()? {
                Some(status) => bail!("idemsink exited ({status}) before catching up"),
                None => Ok(()),
            },
        )
        .await;
    let elapsed = started.elapsed();
    let cpu = cpu_time(child.id()).ok();
    let peak_rss_kb = peak_rss_kb(child.id()).ok();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait()?;
    waited?;
    // Under a wrapper, the child is the wrapper, which reports idemsink's SIGTERM as its own.
    if !status.success() && wrapper.is_empty() {
        bail!("idemsink exited with {status}");
    }
    Ok(SinkRun {
        elapsed,
        cpu,
        peak_rss_kb,
    })
}

/// The group settings of every consumer in the benchmarks: the group join is as quick as the
/// development broker allows.
pub const GROUP_SETTINGS: [(&str, &str); 2] = [
    ("session.timeout.ms", "2000"),
    ("heartbeat.interval.ms", "200"),
];

/// A group subscription (same join cost as idemsink) reading every record once.
pub async fn consume_only(brokers: &str, topic: &str, records: usize) -> Result<Duration> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}_consume_only"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    for (k, v) in GROUP_SETTINGS {
        config.set(k, v);
    }
    let consumer: StreamConsumer = config.create()?;
    let started = Instant::now();
    consumer.subscribe(&[topic])?;
    let mut seen = 0usize;
    let mut bytes = 0usize;
    while seen < records {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("consume-only stalled")??;
        bytes += m.payload().map_or(0, <[u8]>::len);
        seen += 1;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "consume-only: {seen} records ({} MB) in {elapsed:.1?}",
        bytes / 1_000_000
    );
    Ok(elapsed)
}

/// Where the time from process start to the first committed batch went, from a run's JSON
/// log: the group join (from subscribing, just before "pipeline started", to the first
/// assignment) is the broker's, the rest idemsink's.
pub struct Startup {
    pub to_first_commit: Duration,
    pub group_join: Duration,
}

impl Startup {
    /// Reads `log` (see [`run_idemsink_logged`]) of a process spawned at `spawned`.
    pub fn from_log(log: &str, spawned: chrono::DateTime<chrono::Utc>) -> Result<Startup> {
        let at = |message: &str| -> Result<chrono::DateTime<chrono::Utc>> {
            log.lines()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
                .find(|line| line["fields"]["message"] == message)
                .and_then(|line| line["timestamp"].as_str()?.parse().ok())
                .with_context(|| format!("no {message:?} in the log"))
        };
        let started = at("pipeline started")?;
        let assigned = at("assigned; starting from offsets stored in the database")?;
        let committed = at("batch committed")?;
        let span = |from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>| {
            (to - from).to_std().unwrap_or_default()
        };
        Ok(Startup {
            to_first_commit: span(spawned, committed),
            group_join: span(started, assigned),
        })
    }
}
