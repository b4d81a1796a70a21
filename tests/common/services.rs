//! A database server or an Apache Kafka broker of one test's own, which it may stop, freeze,
//! kill and start again.

use std::process::Command;

use super::Backend;

/// A database server of one test's own, which it may stop and start again; data in a
/// temporary folder, on a free loopback port (`scripts/devenv.sh start|stop`).
pub struct PrivateDatabase {
    backend: Backend,
    dir: tempfile::TempDir,
    port: u16,
    /// MariaDB server options (`IDEMSINK_MYSQL_OPTIONS`).
    options: String,
}

impl PrivateDatabase {
    pub fn start(backend: Backend) -> PrivateDatabase {
        PrivateDatabase::start_with_options(backend, "")
    }

    /// A MariaDB server started with `options` (e.g. `--max-allowed-packet=1M`).
    pub fn start_with_options(backend: Backend, options: &str) -> PrivateDatabase {
        let dir = tempfile::tempdir().expect("tempdir");
        // The server runs as its own user (postgres, mysql), which must reach its folder.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let port = free_port();
        let options = options.to_string();
        let db = PrivateDatabase {
            backend,
            dir,
            port,
            options,
        };
        db.devenv("start");
        db
    }

    pub fn url(&self) -> String {
        match self.backend {
            Backend::Postgres => format!("postgres://postgres@127.0.0.1:{}/idemsink", self.port),
            Backend::MySql => format!("mysql://idemsink:idemsink@127.0.0.1:{}/idemsink", self.port),
        }
    }

    pub fn stop(&self) {
        self.devenv("stop");
    }

    pub fn start_again(&self) {
        self.devenv("start");
    }

    fn devenv(&self, command: &str) {
        let done = self.try_devenv(command);
        assert!(
            done,
            "scripts/devenv.sh {command} for {} failed",
            self.backend
        );
    }

    fn try_devenv(&self, command: &str) -> bool {
        let (server, port_var) = match self.backend {
            Backend::Postgres => ("postgres", "IDEMSINK_PG_PORT"),
            Backend::MySql => ("mariadb", "IDEMSINK_MYSQL_PORT"),
        };
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/devenv.sh"))
            .args([command, server])
            .env("IDEMSINK_DEVENV_DIR", self.dir.path())
            .env("IDEMSINK_MYSQL_OPTIONS", &self.options)
            .env("IDEMSINK_MYSQL_OPTIONS", &self.options)
            .env(port_var, self.port.to_string())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// An Apache Kafka broker of one test's own, which it may freeze (SIGSTOP), kill (SIGKILL)
/// and start again on the same storage; on free loopback ports (`scripts/devenv.sh
/// start|stop|kill broker`).
pub struct PrivateBroker {
    dir: tempfile::TempDir,
    port: u16,
    controller_port: u16,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let broker = PrivateBroker {
            dir: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            controller_port: free_port(),
        };
        broker.start_again();
        broker
    }

    /// Starts the broker (again), on the storage it had: topics and records survive.
    pub fn start_again(&self) {
        assert!(
            self.devenv("start"),
            "scripts/devenv.sh start broker failed"
        );
    }

    /// SIGKILL: the broker dies at once, as in a crash.
    pub fn kill(&self) {
        assert!(self.devenv("kill"), "scripts/devenv.sh kill broker failed");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends the broker process `signal` (`STOP`, `CONT`).
    pub fn signal(&self, signal: &str) {
        assert!(self.try_signal(signal), "kill -{signal} (the broker)");
    }

    fn try_signal(&self, signal: &str) -> bool {
        let Ok(pid) = std::fs::read_to_string(self.dir.path().join("kafka.pid")) else {
            return false;
        };
        Command::new("kill")
            .args([format!("-{signal}"), pid.trim().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn devenv(&self, command: &str) -> bool {
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/devenv.sh"))
            .args([command, "broker"])
            .env("IDEMSINK_DEVENV_DIR", self.dir.path())
            .env("IDEMSINK_KAFKA_PORT", self.port.to_string())
            .env(
                "IDEMSINK_KAFKA_CONTROLLER_PORT",
                self.controller_port.to_string(),
            )
            // The shared broker has 512 MB; a test's own needs less.
            .env("IDEMSINK_KAFKA_HEAP", "256m")
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // A frozen broker would not stop.
        self.try_signal("CONT");
        self.devenv("kill");
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Drop for PrivateDatabase {
    fn drop(&mut self) {
        // Also while a failed test unwinds: a server left running would outlive the test.
        self.try_devenv("stop");
    }
}
