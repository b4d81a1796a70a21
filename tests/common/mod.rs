//! Harness for the end-to-end tests: a real broker and real databases — PostgreSQL and
//! MariaDB, started by `scripts/devenv.sh up` — one fresh topic, table and pipeline per test,
//! and the idemsink binary run as a separate OS process so it can be signalled and killed.
//! Tests are written once, taking the [`Backend`], and instantiated for both databases by
//! [`on_both_databases!`].
//!
//! One concept per file: `services` (a database or broker of a test's own), `case` (a test's
//! topic, table and data), `pipeline_file` (its YAML), `process` (the idemsink binary as a
//! child process, its log, its HTTP listener) and `records` (what is produced and checked).
#![allow(dead_code)] // each test file uses a different part of the harness

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use idemsink::db::Backend;
use idemsink::db::DbPool;
pub use idemsink::error::ErrorKind;

/// Instantiates `async fn name(backend: Backend)` test bodies as `postgres::name` and
/// `mysql::name`, each a multi-threaded tokio test.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::common::Backend::MySql).await
                }
            )*
        }
    };
}

/// Runs `$body` with `$p` bound to the concrete pool of `$pool` (a [`DbPool`]): one body,
/// type-checked for each driver.
#[macro_export]
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            idemsink::db::DbPool::Postgres($p) => $body,
            idemsink::db::DbPool::MySql($p) => $body,
        }
    };
}

mod case;
mod pipeline_file;
mod process;
mod records;
mod services;

// Each test file uses some of these.
#[allow(unused_imports)]
pub use case::{Case, Streamer, TableWrites};
#[allow(unused_imports)]
pub use pipeline_file::{GroupProtocol, PipelineFile, STANDARD_COLUMNS};
#[allow(unused_imports)]
pub use process::{
    assert_failed_as, http_get, idemsink, idemsink_exit, idemsink_with_env, metric_sum, Connector,
};
#[allow(unused_imports)]
pub use records::{assert_exactly_once, logged_counts, record};
#[allow(unused_imports)]
pub use services::{free_port, PrivateBroker, PrivateDatabase};

/// How long a stopped idemsink may take to exit.
pub const EXIT: Duration = Duration::from_secs(20);

/// Records with ids `ids`, in order, paired with where each landed.
pub fn with_ids(ids: std::ops::Range<i64>, landed: Vec<(i32, i64)>) -> Vec<(i64, (i32, i64))> {
    ids.zip(landed).collect()
}

/// librdkafka group settings the tests rely on (classic protocol): a killed member holds its
/// partitions until its session times out, so 2 s makes a takeover quick. The development
/// broker allows sessions from 1 s (`scripts/devenv.sh`).
pub const GROUP_PROPERTIES: &str = "session.timeout.ms: 2000\n    heartbeat.interval.ms: 200";

pub fn brokers() -> String {
    required_env("IDEMSINK_TEST_BROKERS")
}

pub fn database_url(backend: Backend) -> String {
    match backend {
        Backend::Postgres => required_env("IDEMSINK_TEST_DATABASE_URL"),
        Backend::MySql => required_env("IDEMSINK_TEST_MYSQL_URL"),
    }
}

pub async fn connect(backend: Backend) -> DbPool {
    DbPool::connect(&database_url(backend), 4)
        .await
        .expect("connect to the test database")
}

fn required_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: start the environment with `scripts/devenv.sh up` and `eval \"$(scripts/devenv.sh env)\"`, or run scripts/test.sh")
    })
}

/// A name unique to this test run and call.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{}", std::process::id(), nanos % 100_000)
}

/// What an instance logs when partitions are assigned to it.
pub const ASSIGNED: &str = "assigned; starting from offsets stored in the database";

/// What an instance logs when a batch was rolled back by the offsets compare-and-set.
pub const FENCED: &str = "fenced: the stored offsets of these partitions changed";
