//! One test's topic, table, pipeline file and database pool, and what it produces and reads
//! back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idemsink::db::DbPool;
use idemsink::testkit::{self, Outgoing};
use rdkafka::producer::FutureProducer;

use super::{
    assert_exactly_once, brokers, database_url, record, unique, with_ids, Backend, Connector,
    PipelineFile, EXIT,
};

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
        PipelineFile::of(self)
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
