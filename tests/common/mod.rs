//! Harness for the end-to-end tests: a real broker and real databases — PostgreSQL and
//! MariaDB, started by `scripts/devenv.sh up` — one fresh topic, table and pipeline per test,
//! and the idemsink binary run as a separate OS process so it can be signalled and killed.
//! Tests are written once, taking the [`Backend`], and instantiated for both databases by
//! [`on_both_databases!`].
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use idemsink::db::Backend;
use idemsink::db::DbPool;
pub use idemsink::error::ErrorKind;
use idemsink::testkit::{self, Outgoing};
use rdkafka::producer::FutureProducer;

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

/// One test's topic, table, pipeline file and database pool.
pub struct Case {
    pub backend: Backend,
    pub name: String,
    pub topic: String,
    pub table: String,
    pub partitions: i32,
    pub pool: DbPool,
    /// The database the case's table is in.
    pub url: String,
    pub brokers: String,
    pub dir: tempfile::TempDir,
}

/// The standard test table: `id bigint NOT NULL, body varchar(40) NOT NULL, payload json(b)`
/// plus the Kafka coordinates, unique.
fn standard_table(backend: Backend) -> String {
    let (json, text) = match backend {
        Backend::Postgres => ("jsonb", "text"),
        Backend::MySql => ("json", "varchar(255)"),
    };
    format!(
        "id bigint NOT NULL,
         body varchar(40) NOT NULL,
         payload {json},
         kafka_topic {text} NOT NULL,
         kafka_partition integer NOT NULL,
         kafka_offset bigint NOT NULL,
         UNIQUE (kafka_topic, kafka_partition, kafka_offset)"
    )
}

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

impl Case {
    /// A topic with `partitions` partitions and the standard test table: `id bigint NOT
    /// NULL, body varchar(40) NOT NULL, payload json(b)` plus the Kafka coordinates.
    pub async fn new(backend: Backend, prefix: &str, partitions: i32) -> Case {
        Case::on_broker(backend, prefix, partitions, brokers()).await
    }

    /// The same, on a broker other than the default test broker.
    pub async fn on_broker(
        backend: Backend,
        prefix: &str,
        partitions: i32,
        brokers: String,
    ) -> Case {
        let url = database_url(backend);
        Case::create(
            backend,
            prefix,
            partitions,
            brokers,
            url,
            &standard_table(backend),
        )
        .await
    }

    /// The same, in the database at `url` (e.g. a [`PrivateDatabase`]).
    pub async fn in_database(backend: Backend, prefix: &str, partitions: i32, url: String) -> Case {
        Case::create(
            backend,
            prefix,
            partitions,
            brokers(),
            url,
            &standard_table(backend),
        )
        .await
    }

    /// A topic with `partitions` partitions and a table with the columns in `definition`.
    pub async fn with_table(
        backend: Backend,
        prefix: &str,
        partitions: i32,
        brokers: String,
        definition: &str,
    ) -> Case {
        let url = database_url(backend);
        Case::create(backend, prefix, partitions, brokers, url, definition).await
    }

    async fn create(
        backend: Backend,
        prefix: &str,
        partitions: i32,
        brokers: String,
        url: String,
        definition: &str,
    ) -> Case {
        let name = unique(&format!("{prefix}_{}", &backend.to_string()[..2]));
        let case = Case {
            backend,
            topic: format!("{name}_topic"),
            table: format!("{name}_rows"),
            name,
            partitions,
            pool: DbPool::connect(&url, 4)
                .await
                .expect("connect to the test database"),
            url,
            brokers,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        testkit::create_topic(&case.brokers, &case.topic, partitions, false)
            .await
            .expect("create topic");
        case.exec(&format!("CREATE TABLE {} ({definition})", case.table))
            .await;
        case
    }

    /// Runs SQL (one statement or several, without parameters), panicking on failure.
    pub async fn exec(&self, sql: &str) {
        let done = on_pool!(&self.pool, |p| sqlx::raw_sql(sql)
            .execute(p)
            .await
            .map(|_| ()));
        done.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// A column name quoted for this case's database (`partition` is reserved in MySQL).
    pub fn quote(&self, name: &str) -> String {
        idemsink::schema::quote(self.backend, name)
    }

    /// Makes every partition replay from the start: the stored offsets are deleted.
    pub async fn forget_offsets(&self) {
        self.exec(&format!(
            "DELETE FROM idemsink_offsets WHERE pipeline = '{}'",
            self.name
        ))
        .await;
    }

    /// The pipeline file for this case and the standard table, with `extra` appended (e.g.
    /// a `batch:` section).
    pub fn config(&self, extra: &str) -> PathBuf {
        self.pipeline().extra(extra).write()
    }

    /// The pipeline file for this case with `sink` lines after `sink.table` (the mode, key
    /// and columns), and `extra` appended.
    pub fn config_with(&self, sink: &str, extra: &str) -> PathBuf {
        self.pipeline().sink(sink).extra(extra).write()
    }

    /// A pipeline file for this case, to be adjusted and written.
    pub fn pipeline(&self) -> PipelineFile<'_> {
        PipelineFile {
            case: self,
            stem: self.name.clone(),
            url: self.url.clone(),
            group: GROUP_PROPERTIES,
            properties: String::new(),
            source: String::new(),
            sink: STANDARD_COLUMNS.to_string(),
            extra: String::new(),
            routes: Vec::new(),
        }
    }

    pub fn producer(&self) -> FutureProducer {
        testkit::producer(&self.brokers).expect("producer")
    }

    /// Produces records with ids `ids`, spread over the partitions; returns where each landed.
    pub async fn produce_ids(
        &self,
        producer: &FutureProducer,
        ids: std::ops::Range<i64>,
    ) -> Vec<(i32, i64)> {
        let records: Vec<Outgoing> = ids
            .map(|id| record(id, (id % self.partitions as i64) as i32))
            .collect();
        testkit::produce(producer, &self.topic, &records)
            .await
            .expect("produce")
    }

    /// Runs the pipeline until it has stored `end`, then stops it with SIGTERM and asserts a
    /// clean exit; returns its log. Fails at once, with the log, if idemsink exits before.
    pub async fn run_until_stored(&self, config: &Path, end: &BTreeMap<i32, i64>) -> String {
        let mut connector = Connector::start(config);
        self.wait_while_running(&mut connector, end).await;
        assert_eq!(
            &self.stored_offsets().await,
            end,
            "offsets stored for exactly the produced partitions"
        );
        let (status, log) = connector.stop(Duration::from_secs(20));
        assert!(
            status.success(),
            "SIGTERM must end in a clean exit; log:\n{log}"
        );
        log
    }

    /// Produces `chunks` one after another, 200 ms apart, while `config` runs and is killed
    /// with SIGKILL `kills` times, each after a random pause of `pause_ms` milliseconds, and
    /// restarted. Returns the running connector and where every record landed.
    pub async fn stream_while_killing(
        &self,
        config: &Path,
        chunks: Vec<Vec<Outgoing>>,
        kills: u32,
        pause_ms: std::ops::Range<u64>,
        rng: &mut impl rand::Rng,
    ) -> (Connector, Vec<(i32, i64)>) {
        let streamer = self.stream(chunks, Duration::from_millis(200));
        let mut connector = Connector::start(config);
        for kill in 1..=kills {
            let after = Duration::from_millis(rng.gen_range(pause_ms.clone()));
            tokio::time::sleep(after).await;
            connector.kill();
            eprintln!("SIGKILL #{kill} after {after:?}");
            connector = Connector::start(config);
        }
        (connector, streamer.await.expect("producer task"))
    }

    /// The standard records with ids `ids`, spread over the partitions, in chunks of `size`.
    pub fn record_chunks(&self, ids: std::ops::Range<i64>, size: i64) -> Vec<Vec<Outgoing>> {
        let parts = i64::from(self.partitions);
        let chunk_of = |start: i64| -> Vec<Outgoing> {
            (start..(start + size).min(ids.end))
                .map(|id| record(id, (id % parts) as i32))
                .collect()
        };
        ids.clone().step_by(size as usize).map(chunk_of).collect()
    }

    /// Produces standard records, ids 0, 1, 2…, in chunks of `chunk` records `gap` apart, in
    /// the background: at least `min_records` of them, and on until [`Streamer::finish`].
    pub fn stream_until_finished(&self, min_records: i64, chunk: i64, gap: Duration) -> Streamer {
        let stop = Arc::new(AtomicBool::new(false));
        let (producer, topic, partitions) = (self.producer(), self.topic.clone(), self.partitions);
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut landed = Vec::new();
            let mut next = 0;
            while next < min_records || !stopped.load(Ordering::Relaxed) {
                let records: Vec<Outgoing> = (next..next + chunk)
                    .map(|id| record(id, (id % i64::from(partitions)) as i32))
                    .collect();
                landed.extend(
                    testkit::produce(&producer, &topic, &records)
                        .await
                        .expect("produce"),
                );
                next += chunk;
                tokio::time::sleep(gap).await;
            }
            landed
        });
        Streamer { stop, task }
    }

    /// Produces `chunks` one after another, `gap` apart, in the background; the task returns
    /// where every record landed.
    pub fn stream(
        &self,
        chunks: Vec<Vec<Outgoing>>,
        gap: Duration,
    ) -> tokio::task::JoinHandle<Vec<(i32, i64)>> {
        let (producer, topic) = (self.producer(), self.topic.clone());
        tokio::spawn(async move {
            let mut landed = Vec::new();
            for chunk in chunks {
                let done = testkit::produce(&producer, &topic, &chunk).await;
                landed.extend(done.expect("produce"));
                tokio::time::sleep(gap).await;
            }
            landed
        })
    }

    /// Waits until `connector` has stored `end`; fails at once, with its log, if it exits.
    pub async fn wait_while_running(&self, connector: &mut Connector, end: &BTreeMap<i32, i64>) {
        let waited = testkit::wait_for_offsets(
            &self.pool,
            &self.name,
            &self.topic,
            end,
            Duration::from_secs(120),
            || match connector.exited() {
                Some(status) => anyhow::bail!("idemsink exited ({status}) before storing {end:?}"),
                None => Ok(()),
            },
        )
        .await;
        if let Err(e) = waited {
            panic!("{e}; log:\n{}", connector.log_text());
        }
    }

    /// Waits until `connector` has stored the end offsets of `landed` (records with ids 0,
    /// 1, 2… in that order), stops it with SIGTERM and asserts a clean exit, that every
    /// record is in the table exactly once, and that the stored offsets are the end offsets.
    /// Returns the log.
    pub async fn stop_caught_up(
        &self,
        mut connector: Connector,
        landed: Vec<(i32, i64)>,
    ) -> String {
        let end = self.end_offsets().await;
        self.wait_while_running(&mut connector, &end).await;
        let (status, log) = connector.stop(EXIT);
        assert!(
            status.success(),
            "SIGTERM must end in a clean exit; log:\n{log}"
        );
        assert_exactly_once(
            &self.rows().await,
            &with_ids(0..landed.len() as i64, landed),
        );
        assert_eq!(
            self.stored_offsets().await,
            end,
            "offsets equal the end offsets"
        );
        log
    }

    pub async fn wait_for_offsets(&self, end: &BTreeMap<i32, i64>, timeout: Duration) {
        testkit::wait_for_offsets(&self.pool, &self.name, &self.topic, end, timeout, || Ok(()))
            .await
            .expect("caught up");
    }

    /// Kafka's end offsets of the case's topic (ListOffsets), for every partition that holds
    /// anything.
    pub async fn end_offsets(&self) -> BTreeMap<i32, i64> {
        testkit::end_offsets(&self.brokers, &self.topic)
            .await
            .expect("end offsets")
    }

    pub async fn stored_offsets(&self) -> BTreeMap<i32, i64> {
        testkit::stored_offsets(&self.pool, &self.name, &self.topic)
            .await
            .expect("stored offsets")
    }

    /// Every row of the standard table as (id, partition, offset), ordered.
    pub async fn rows(&self) -> Vec<(i64, i32, i64)> {
        let sql = format!(
            "SELECT id, kafka_partition, kafka_offset FROM {} ORDER BY kafka_partition, kafka_offset",
            self.table
        );
        let rows = on_pool!(&self.pool, |p| sqlx::query_as(&sql).fetch_all(p).await);
        rows.expect("read rows")
    }

    /// The text values of one query's single column.
    pub async fn texts(&self, sql: &str) -> Vec<String> {
        let rows = on_pool!(&self.pool, |p| sqlx::query_scalar(sql).fetch_all(p).await);
        rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The whole table (every column, as JSON text, ordered by `order`) and the offsets with
    /// their update times: equal snapshots mean nothing was added or changed.
    pub async fn snapshot_by(&self, columns: &[&str], order: &str) -> (Vec<String>, Vec<String>) {
        let list = columns.join(", ");
        let (rows, offsets) = match self.backend {
            Backend::Postgres => (
                format!("SELECT json_build_array({list})::text FROM {} ORDER BY {order}", self.table),
                "SELECT o::text FROM idemsink_offsets o WHERE pipeline = 'PIPELINE' ORDER BY topic, partition",
            ),
            Backend::MySql => (
                format!("SELECT CAST(JSON_ARRAY({list}) AS CHAR) FROM {} ORDER BY {order}", self.table),
                "SELECT CONCAT_WS('|', topic, `partition`, next_offset, CAST(updated_at AS CHAR)) \
                 FROM idemsink_offsets WHERE pipeline = 'PIPELINE' ORDER BY topic, `partition`",
            ),
        };
        (
            self.texts(&rows).await,
            self.texts(&offsets.replace("PIPELINE", &self.name)).await,
        )
    }

    /// [`Case::snapshot_by`] for the standard table.
    pub async fn snapshot(&self) -> (Vec<String>, Vec<String>) {
        self.snapshot_by(
            &[
                "id",
                "body",
                "payload",
                "kafka_topic",
                "kafka_partition",
                "kafka_offset",
            ],
            "kafka_partition, kafka_offset",
        )
        .await
    }
}

/// A lock that makes every write to the case's table wait, held on a connection of its own.
pub enum TableWrites {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    MySql(sqlx::pool::PoolConnection<sqlx::MySql>),
}

impl TableWrites {
    pub async fn hold(case: &Case) -> TableWrites {
        match &case.pool {
            DbPool::Postgres(pool) => {
                let mut tx = pool.begin().await.expect("begin");
                let lock = format!("LOCK TABLE {} IN SHARE MODE", case.table);
                sqlx::query(&lock).execute(&mut *tx).await.expect("lock");
                TableWrites::Postgres(tx)
            }
            DbPool::MySql(pool) => {
                let mut conn = pool.acquire().await.expect("connection");
                let lock = format!("LOCK TABLES {} READ", case.table);
                sqlx::raw_sql(&lock)
                    .execute(&mut *conn)
                    .await
                    .expect("lock");
                TableWrites::MySql(conn)
            }
        }
    }

    pub async fn release(self) {
        match self {
            TableWrites::Postgres(tx) => tx.commit().await.expect("unlock"),
            TableWrites::MySql(mut conn) => {
                sqlx::raw_sql("UNLOCK TABLES")
                    .execute(&mut *conn)
                    .await
                    .expect("unlock");
            }
        }
    }
}

/// Records streaming in the background (see [`Case::stream_until_finished`]).
pub struct Streamer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(i32, i64)>>,
}

impl Streamer {
    /// Stops after the current chunk (once the minimum is reached); returns where every
    /// record landed, record `i` at index `i`.
    pub async fn finish(self) -> Vec<(i32, i64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("producer task")
    }
}

/// What an instance logs when partitions are assigned to it.
pub const ASSIGNED: &str = "assigned; starting from offsets stored in the database";

/// What an instance logs when a batch was rolled back by the offsets compare-and-set.
pub const FENCED: &str = "fenced: the stored offsets of these partitions changed";

/// The `sink` lines mapping the standard table.
pub const STANDARD_COLUMNS: &str = "  columns:
    id: /id
    body: /body
    payload: $value
    kafka_topic: $topic
    kafka_partition: $partition
    kafka_offset: $offset
";

/// Kafka's consumer group protocols: `classic` (librdkafka assigns, eager or
/// cooperative-sticky) and `consumer` (KIP-848: the broker assigns, always incremental).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    Classic,
    Consumer,
}

/// A pipeline file of a [`Case`]: its name, database URL, consumer properties, sink lines
/// and extra sections can differ between the instances of one test.
pub struct PipelineFile<'a> {
    case: &'a Case,
    stem: String,
    url: String,
    group: &'static str,
    properties: String,
    source: String,
    sink: String,
    extra: String,
    /// Topic → table (`sink.tables`), instead of the case's topic and table.
    routes: Vec<(String, String)>,
}

impl PipelineFile<'_> {
    /// The consumer group protocol: under `consumer` (KIP-848) the broker sets the session
    /// (2 s on the development broker), so [`GROUP_PROPERTIES`] are left out.
    pub fn protocol(mut self, protocol: GroupProtocol) -> Self {
        self.group = match protocol {
            GroupProtocol::Classic => GROUP_PROPERTIES,
            GroupProtocol::Consumer => "group.protocol: consumer",
        };
        self
    }

    /// Lines of the `source` section after `properties` (e.g. `  start_from: latest\n`).
    pub fn source(mut self, lines: &str) -> Self {
        self.source = lines.to_string();
        self
    }

    /// The file name (without `.yaml`), for instances that need files of their own.
    pub fn named(mut self, stem: &str) -> Self {
        self.stem = stem.to_string();
        self
    }

    pub fn url(mut self, url: &str) -> Self {
        self.url = url.to_string();
        self
    }

    /// A librdkafka property, in addition to [`GROUP_PROPERTIES`].
    pub fn property(mut self, key: &str, value: &str) -> Self {
        self.properties.push_str(&format!("\n    {key}: {value}"));
        self
    }

    pub fn sink(mut self, sink: &str) -> Self {
        self.sink = sink.to_string();
        self
    }

    pub fn extra(mut self, extra: &str) -> Self {
        self.extra = extra.to_string();
        self
    }

    /// Reads these topics, each into its table (`sink.tables`), instead of the case's.
    pub fn tables(mut self, routes: &[(&str, &str)]) -> Self {
        self.routes = routes
            .iter()
            .map(|(topic, table)| (topic.to_string(), table.to_string()))
            .collect();
        self
    }

    pub fn write(self) -> PathBuf {
        let (topics, table) = if self.routes.is_empty() {
            (
                self.case.topic.clone(),
                format!("table: {}", self.case.table),
            )
        } else {
            let topics: Vec<&str> = self.routes.iter().map(|(t, _)| t.as_str()).collect();
            let tables: String = (self.routes.iter())
                .map(|(topic, table)| format!("\n    {topic}: {table}"))
                .collect();
            (topics.join(", "), format!("tables:{tables}"))
        };
        let text = format!(
            "pipeline: {name}
source:
  brokers: {brokers}
  topics: [{topics}]
  properties:
    {group}{properties}
{source}sink:
  url: {url}
  {table}
{sink}{extra}",
            name = self.case.name,
            brokers = self.case.brokers,
            properties = self.properties,
            source = self.source,
            group = self.group,
            url = self.url,
            sink = self.sink,
            extra = self.extra,
        );
        let file = self.case.dir.path().join(format!("{}.yaml", self.stem));
        std::fs::write(&file, text).expect("write pipeline file");
        file
    }
}

/// The numbers a log's `batch committed` lines give for `field` (e.g. `written`).
pub fn logged_counts(log: &str, field: &str) -> Vec<u64> {
    log.split(&format!("{field}="))
        .skip(1)
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The standard test record: `{"id": id, "body": "record <id>"}`, keyed by the id.
pub fn record(id: i64, partition: i32) -> Outgoing {
    testkit::standard_record(id, partition)
}

/// Asserts that the table holds exactly the produced records, each once, at the coordinates
/// it was produced to.
pub fn assert_exactly_once(rows: &[(i64, i32, i64)], produced: &[(i64, (i32, i64))]) {
    let mut expected: Vec<(i64, i32, i64)> =
        produced.iter().map(|(id, (p, o))| (*id, *p, *o)).collect();
    expected.sort_by_key(|(_, p, o)| (*p, *o));
    let mut seen = std::collections::HashMap::new();
    for (id, p, o) in rows {
        *seen.entry(*id).or_insert(0) += 1;
        assert!(seen[id] == 1, "id {id} landed twice (again at {p}/{o})");
    }
    let missing: Vec<i64> = expected
        .iter()
        .filter(|(id, _, _)| !seen.contains_key(id))
        .map(|(id, _, _)| *id)
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} records missing, e.g. ids {missing:?}",
        expected.len().saturating_sub(rows.len())
    );
    assert_eq!(rows.len(), expected.len(), "row count");
    assert_eq!(
        rows,
        expected.as_slice(),
        "rows at the coordinates they were produced to"
    );
}

/// Runs the idemsink binary to completion with `args`; returns whether it succeeded and its
/// stdout followed by its stderr. It must never panic, whatever the outcome.
/// Asserts that idemsink exited with the code of a failure of `kind`.
pub fn assert_failed_as(status: ExitStatus, kind: ErrorKind, context: &str) {
    assert_eq!(
        status.code(),
        Some(i32::from(kind.exit_code())),
        "expected a {kind} failure ({status}): {context}"
    );
}

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
