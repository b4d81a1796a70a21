//! Debezium snapshot benchmark (not a timed test): the initial snapshot of a source table,
//! captured by Debezium's PostgreSQL connector into Kafka (JsonConverter with schemas, as
//! Debezium's documentation sets it up), applied by idemsink (`format: debezium`, upsert by the
//! key, `$source_position` as the version) to PostgreSQL and to MariaDB. Measured on the same
//! rows in the same run: the target's bulk load of them into an identical table (`COPY`,
//! `LOAD DATA LOCAL INFILE`); a consume-only pass over the topic, which bounds any sink of it
//! (with schemas, an event is about ten times its row); and Debezium's own JDBC sink connector
//! (upsert by the record key) reading the same topic. The ratio is to the slower of the first
//! two, as in benches/pipeline.rs.
//!
//! Run with `scripts/bench.sh debezium`. Environment: BENCH_RECORDS (default 1,000,000),
//! BENCH_RUNS (default 3: idemsink and the bulk load each run; the JDBC sink once per target,
//! BENCH_JDBC_SINK=0 leaves it out), BENCH_TARGETS (default `postgres,mysql`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{consume_only, env_or, mariadb, required, url_parts};
use futures_util::TryStreamExt;
use idemsink::db::{Backend, DbPool};
use idemsink::testkit::{self, connect};
use sqlx::{Connection, PgConnection};

const SOURCE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, \
                      amount numeric(12, 2), created timestamptz, flag boolean, note text)";

/// One run's rates, in rows per second.
struct Run {
    sink: f64,
    bulk: f64,
    consume: f64,
    cpu_per_record: Option<Duration>,
    peak_rss_mb: u64,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.sink / self.bulk.min(self.consume)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let brokers = required("IDEMSINK_TEST_BROKERS")?;
    let pg_url = required("IDEMSINK_TEST_DATABASE_URL")?;
    let records = env_or("BENCH_RECORDS", 1_000_000) as i64;
    let runs = env_or("BENCH_RUNS", 3);
    let targets = std::env::var("BENCH_TARGETS").unwrap_or_else(|_| "postgres,mysql".into());

    let name = format!("bench_dbz_{}", std::process::id());
    let mut source = connect::CapturedDatabase::create(&pg_url, &name, SOURCE).await?;
    source
        .exec(&format!(
            "INSERT INTO items SELECT i, 'item ' || i, (i % 100000) / 100.0, \
             timestamptz '2026-01-01 00:00:00+00' + i * interval '1 second', i % 2 = 0, \
             repeat('x', 40) FROM generate_series(1, {records}) i"
        ))
        .await?;
    let topic = source.topic("public.items");
    testkit::create_topic(&brokers, &topic, 4, false).await?;
    let started = Instant::now();
    source.capture(&brokers, "public.items", "snapshot.mode=initial_only")?;
    wait_for_records(&brokers, &topic, records).await?;
    eprintln!(
        "Debezium snapshot: {records} rows into {topic} in {:.1?}",
        started.elapsed()
    );
    source.stop_capture();

    let mut table = String::from(
        "| target | rows | idemsink rows/s | bulk load rows/s | consume-only rows/s | ratio, median (runs) | CPU µs/record | peak RSS MB | Debezium JDBC sink rows/s | idemsink / JDBC sink |\n\
         | --- | --: | --: | --: | --: | --- | --: | --: | --: | --: |\n",
    );
    for target in targets.split(',') {
        let (backend, url) = match target.trim() {
            "postgres" => (Backend::Postgres, pg_url.clone()),
            "mysql" => (Backend::MySql, required("IDEMSINK_TEST_MYSQL_URL")?),
            other => bail!("BENCH_TARGETS: unknown target {other}"),
        };
        let bench = Target {
            backend,
            pool: DbPool::connect(&url, 2).await?,
            url,
            brokers: brokers.clone(),
            topic: topic.clone(),
            records,
            rows: source_rows(&source, backend).await?,
        };
        let mut done = Vec::new();
        for run in 1..=runs {
            let r = bench.once(run).await?;
            eprintln!(
                "{backend} run {run}: idemsink {:.0} rows/s | bulk load {:.0} rows/s | consume-only {:.0} rows/s | ratio {:.2}",
                r.sink,
                r.bulk,
                r.consume,
                r.ratio()
            );
            done.push(r);
        }
        let jdbc = if env_or("BENCH_JDBC_SINK", 1) == 1 {
            Some(bench.jdbc_sink().await?)
        } else {
            None
        };
        table.push_str(&bench.row(&mut done, jdbc));
        bench.pool.close().await;
    }
    testkit::delete_topic(&brokers, &topic).await?;
    println!("\n{table}");
    Ok(())
}

/// Waits until the topic holds `records` records (Debezium's snapshot is done).
async fn wait_for_records(brokers: &str, topic: &str, records: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let held: i64 = testkit::end_offsets(brokers, topic).await?.values().sum();
        if held >= records {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("Debezium's snapshot wrote {held} of {records} records in 30 minutes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The source's rows as the target's bulk load reads them (tab-separated, `\N` for NULL),
/// with the version column idemsink fills (0).
async fn source_rows(source: &connect::CapturedDatabase, backend: Backend) -> Result<Vec<u8>> {
    let select = match backend {
        Backend::Postgres => "SELECT id, name, amount, created, flag, note, 0 FROM items",
        Backend::MySql => {
            "SELECT id, name, amount, \
             to_char(created AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), flag::int, note, 0 \
             FROM items"
        }
    };
    let mut conn = PgConnection::connect(&source.url).await?;
    let chunks: Vec<_> = conn
        .copy_out_raw(&format!("COPY ({select}) TO STDOUT"))
        .await?
        .try_collect()
        .await?;
    Ok(chunks.concat())
}

/// One target database and what every run there needs.
struct Target {
    backend: Backend,
    url: String,
    pool: DbPool,
    brokers: String,
    topic: String,
    records: i64,
    rows: Vec<u8>,
}

impl Target {
    fn table_ddl(&self, name: &str, version: bool) -> String {
        let version = if version {
            ", src_pos bigint NOT NULL"
        } else {
            ""
        };
        match self.backend {
            Backend::Postgres => format!(
                "CREATE TABLE {name} (id bigint PRIMARY KEY, name text NOT NULL, \
                 amount numeric(12, 2), created timestamptz, flag boolean, note text{version})"
            ),
            Backend::MySql => format!(
                "CREATE TABLE {name} (id bigint PRIMARY KEY, name varchar(255) NOT NULL, \
                 amount decimal(12, 2), created datetime(6), flag boolean, note text{version})"
            ),
        }
    }

    async fn exec(&self, sql: &str) -> Result<()> {
        match &self.pool {
            DbPool::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ())?,
            DbPool::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ())?,
        }
        Ok(())
    }

    async fn count(&self, table: &str) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM {table}");
        Ok(match &self.pool {
            DbPool::Postgres(p) => sqlx::query_scalar(&sql).fetch_one(p).await?,
            DbPool::MySql(p) => sqlx::query_scalar(&sql).fetch_one(p).await?,
        })
    }

    async fn once(&self, run: u64) -> Result<Run> {
        let tag = format!("bench_dbz_{}_{}_{run}", std::process::id(), self.backend);
        let load = format!("{tag}_load");
        self.exec(&self.table_ddl(&load, true)).await?;
        let bulk = self.bulk_load(&load).await?;
        let consume = consume_only(&self.brokers, &self.topic, self.records as usize).await?;
        let sink_table = format!("{tag}_sink");
        self.exec(&self.table_ddl(&sink_table, true)).await?;
        let sink = self.idemsink(&tag, &sink_table).await?;
        for table in [&load, &sink_table] {
            let rows = self.count(table).await?;
            if rows != self.records {
                bail!("{table} holds {rows} rows, expected {}", self.records);
            }
            self.exec(&format!("DROP TABLE {table}")).await?;
        }
        self.exec(&format!(
            "DELETE FROM idemsink_offsets WHERE pipeline = '{tag}'"
        ))
        .await?;
        let rate = |d: Duration| self.records as f64 / d.as_secs_f64();
        Ok(Run {
            sink: rate(sink.elapsed),
            bulk: rate(bulk),
            consume: rate(consume),
            cpu_per_record: sink.cpu.map(|cpu| cpu / self.records as u32),
            peak_rss_mb: sink.peak_rss_kb.unwrap_or(0) / 1024,
        })
    }

    async fn bulk_load(&self, table: &str) -> Result<Duration> {
        let started = Instant::now();
        match self.backend {
            Backend::Postgres => {
                let mut conn = PgConnection::connect(&self.url).await?;
                let mut copy = conn
                    .copy_in_raw(&format!("COPY {table} FROM STDIN"))
                    .await?;
                for chunk in self.rows.chunks(1 << 20) {
                    copy.send(chunk).await?;
                }
                copy.finish().await?;
            }
            Backend::MySql => {
                let file = tempfile::NamedTempFile::new()?;
                std::fs::write(file.path(), &self.rows)?;
                let started = Instant::now();
                mariadb(
                    &self.url,
                    &format!(
                        "LOAD DATA LOCAL INFILE '{}' INTO TABLE {table}",
                        file.path().display()
                    ),
                )?;
                return Ok(started.elapsed());
            }
        }
        Ok(started.elapsed())
    }

    async fn idemsink(&self, tag: &str, table: &str) -> Result<common::SinkRun> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("bench.yaml");
        std::fs::write(
            &config,
            format!(
                "pipeline: {tag}\nsource:\n  brokers: {brokers}\n  topics: [{topic}]\n\
                 sink:\n  url: {url}\n  table: {table}\n  format: debezium\n  mode: upsert\n  \
                 key: [id]\n  newer_by: src_pos\n  columns:\n    id: /id\n    name: /name\n    \
                 amount: /amount\n    created: /created\n    flag: /flag\n    note: /note\n    \
                 src_pos: $source_position\n",
                brokers = self.brokers,
                topic = self.topic,
                url = self.url,
            ),
        )?;
        let end = testkit::end_offsets(&self.brokers, &self.topic).await?;
        let sink = common::run_idemsink(&config, &self.pool, tag, &self.topic, &end).await?;
        sink.report(self.count(table).await?);
        Ok(sink)
    }

    /// Debezium's JDBC sink on the same topic into an identical table: rows per second from
    /// its first row to its last (the worker's start, about as long as a run of idemsink at
    /// this size, is left out in its favour).
    async fn jdbc_sink(&self) -> Result<f64> {
        let table = format!("bench_dbz_{}_{}_jdbc", std::process::id(), self.backend);
        self.exec(&self.table_ddl(&table, false)).await?;
        let parts = url_parts(&self.url)?;
        let (scheme, password) = match self.backend {
            Backend::Postgres => ("postgresql", parts.password.clone()),
            Backend::MySql => ("mariadb", parts.password.clone()),
        };
        let properties = format!(
            "name={table}
connector.class=io.debezium.connector.jdbc.JdbcSinkConnector
tasks.max=1
topics={topic}
connection.url=jdbc:{scheme}://{host}:{port}/{database}
connection.username={user}
connection.password={password}
insert.mode=upsert
delete.enabled=true
primary.key.mode=record_key
schema.evolution=none
collection.name.format={table}
",
            topic = self.topic,
            host = parts.host,
            port = parts.port,
            database = parts.database,
            user = parts.user,
        );
        let mut worker =
            connect::Worker::start(&connect::jars("jdbc-sink-lib")?, &self.brokers, &properties)?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let mut first_row = None;
        loop {
            let rows = self.count(&table).await?;
            if rows > 0 && first_row.is_none() {
                first_row = Some(Instant::now());
            }
            if rows >= self.records {
                break;
            }
            if worker.exited() || Instant::now() > deadline {
                let log = std::fs::read_to_string(worker.log()).unwrap_or_default();
                bail!(
                    "the JDBC sink wrote {rows} of {} rows; its log:\n{log}",
                    self.records
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let elapsed = first_row.context("no first row")?.elapsed();
        drop(worker);
        self.exec(&format!("DROP TABLE {table}")).await?;
        let rate = self.records as f64 / elapsed.as_secs_f64();
        eprintln!(
            "{} JDBC sink: {} rows in {elapsed:.1?} after its first row",
            self.backend, self.records
        );
        Ok(rate)
    }

    fn row(&self, runs: &mut [Run], jdbc: Option<f64>) -> String {
        runs.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        let median = &runs[runs.len() / 2];
        let ratios: Vec<String> = runs.iter().map(|r| format!("{:.2}", r.ratio())).collect();
        let cpu = median
            .cpu_per_record
            .map_or("–".into(), |c| format!("{:.2}", c.as_secs_f64() * 1e6));
        let (jdbc_rate, versus) = match jdbc {
            Some(rate) => (format!("{rate:.0}"), format!("{:.1}", median.sink / rate)),
            None => ("–".into(), "–".into()),
        };
        format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.2} ({}) | {cpu} | {} | {jdbc_rate} | {versus} |\n",
            self.backend,
            self.records,
            median.sink,
            median.bulk,
            median.consume,
            median.ratio(),
            ratios.join(" / "),
            median.peak_rss_mb,
        )
    }
}
