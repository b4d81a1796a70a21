//! Throughput benchmark (not a timed test): idemsink's rows/s against two ceilings measured
//! in the same run on the same records — the database's best bulk load of those rows into an
//! identical table with the same unique key, and a consume-only rdkafka pass over the topic
//! with the same group settings. Each run's ratio is to the slower ceiling; a scenario reports
//! the median of its runs, every run's ratio, idemsink's CPU per record and its peak RSS.
//!
//! The bulk loads a DBA would write: insert mode and upsert with every key new, PostgreSQL
//! `COPY` and MariaDB `LOAD DATA LOCAL INFILE` straight into the table; upsert with 80% of the
//! keys already present (rows that really change), `COPY`/`LOAD DATA` into a temporary table
//! and one `INSERT … SELECT … ON CONFLICT DO UPDATE` / `ON DUPLICATE KEY UPDATE`.
//!
//! Run with `scripts/bench.sh` (starts the databases and the broker). Environment:
//! BENCH_SCENARIOS (comma-separated `database:mode`, database `postgres` or `mysql`, mode
//! `insert` (conflict on the Kafka coordinates), `upsert-new` or `upsert-updates` (conflict on
//! order_id); default all six), BENCH_RECORDS (default 300000), BENCH_RUNS (default 3),
//! BENCH_SWEEP=1 (instead: insert mode on both databases over 1, 4, 16 and 64 partitions and
//! records of 200 B, 2 kB and 20 kB, the same bytes for each size, one run each), BENCH_LOG
//! (idemsink's RUST_LOG, default warn), BENCH_PERF (a file: idemsink runs under `perf record
//! -g`; its CPU time and RSS are then perf's), BENCH_WRAP (a command idemsink runs under,
//! e.g. `valgrind --tool=callgrind --callgrind-out-file=F`, whose instruction counts do not
//! move with the machine's load), BENCH_STARTUP (default 1: after the table,
//! process start to the first committed batch on each database, with the group join apart;
//! 0 leaves it out). idemsink's own settings can be changed through its environment
//! overrides, e.g. IDEMSINK_SINK__WRITERS=1.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use anyhow::{bail, Context, Result};
use common::{consume_only, env_or, mariadb, required, SinkRun, GROUP_SETTINGS};
use idemsink::db::{Backend, DbPool};
use idemsink::testkit::{self, Outgoing};
use serde_json::json;
use sqlx::{Connection, PgConnection};

/// The share of keys an `upsert-updates` run finds in the table already, in tenths.
const PRESENT_TENTHS: i64 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Insert,
    UpsertNew,
    UpsertUpdates,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode> {
        Ok(match text {
            "insert" => Mode::Insert,
            "upsert-new" => Mode::UpsertNew,
            "upsert-updates" => Mode::UpsertUpdates,
            other => bail!("mode {other}: use insert, upsert-new or upsert-updates"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Insert => "insert",
            Mode::UpsertNew => "upsert, keys new",
            Mode::UpsertUpdates => "upsert, 80% updates",
        }
    }

    fn upsert(self) -> bool {
        self != Mode::Insert
    }
}

/// What one line of the table measures.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    backend: Backend,
    mode: Mode,
    partitions: i32,
    /// About how long each record's value is.
    record_bytes: usize,
    records: i64,
}

/// One run of a scenario.
struct Run {
    sink: f64,
    ceiling: f64,
    consume: f64,
    cpu_per_record: Option<Duration>,
    peak_rss: Option<u64>,
    bytes: usize,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.sink / self.ceiling.min(self.consume)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo bench -- --list` and test discovery: nothing to list
    }
    let brokers = required("IDEMSINK_TEST_BROKERS")?;
    let urls = [
        (Backend::Postgres, required("IDEMSINK_TEST_DATABASE_URL")?),
        (Backend::MySql, required("IDEMSINK_TEST_MYSQL_URL")?),
    ];
    let records = env_or("BENCH_RECORDS", 300_000) as i64;
    let scenarios = if env_or("BENCH_SWEEP", 0) == 1 {
        sweep(records)
    } else {
        listed(records)?
    };
    let runs = if env_or("BENCH_SWEEP", 0) == 1 {
        1
    } else {
        env_or("BENCH_RUNS", 3)
    };
    let mut table = String::from(
        "| database | mode | partitions | record | records | idemsink rows/s | idemsink MB/s | bulk load rows/s | ratio, median (runs) | CPU µs/record | peak RSS MB |\n\
         | --- | --- | --: | --: | --: | --: | --: | --: | --- | --: | --: |\n",
    );
    for scenario in scenarios {
        let url = &urls
            .iter()
            .find(|(b, _)| *b == scenario.backend)
            .expect("both")
            .1;
        let bench = Bench {
            brokers: brokers.clone(),
            url: url.clone(),
            pool: DbPool::connect(url, 2).await?,
            scenario,
        };
        let mut done = Vec::new();
        for run in 1..=runs {
            let r = bench.once(run).await?;
            eprintln!(
                "{} {} {}p {} B run {run}: idemsink {:.0} rows/s | bulk load {:.0} rows/s | consume-only {:.0} rows/s | ratio {:.2}",
                scenario.backend,
                scenario.mode.name(),
                scenario.partitions,
                scenario.record_bytes,
                r.sink,
                r.ceiling,
                r.consume,
                r.ratio()
            );
            done.push(r);
        }
        bench.pool.close().await;
        table.push_str(&row(&scenario, &mut done));
        print!(
            "{}",
            table
                .lines()
                .last()
                .map(|l| format!("{l}\n"))
                .unwrap_or_default()
        );
    }
    println!("\n{table}");
    if env_or("BENCH_SWEEP", 0) == 0 && env_or("BENCH_STARTUP", 1) == 1 {
        println!("{}", startup_table(&brokers, &urls, runs).await?);
    }
    Ok(())
}

/// BENCH_STARTUP (default 1): process start to the first committed batch on each database,
/// `runs` times, as a table of medians with every run in brackets.
async fn startup_table(brokers: &str, urls: &[(Backend, String)], runs: u64) -> Result<String> {
    let mut table = String::from(
        "| database | start to first committed batch, s | group join, s | without the join, s |\n\
         | --- | --- | --- | --- |\n",
    );
    for (backend, url) in urls {
        let bench = Bench {
            brokers: brokers.to_string(),
            url: url.clone(),
            pool: DbPool::connect(url, 2).await?,
            scenario: Scenario {
                backend: *backend,
                mode: Mode::Insert,
                partitions: 4,
                record_bytes: 200,
                records: 1000,
            },
        };
        let (mut total, mut join, mut own) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=runs {
            let s = bench.startup(run).await?;
            total.push(s.to_first_commit.as_secs_f64());
            join.push(s.group_join.as_secs_f64());
            own.push(s.to_first_commit.saturating_sub(s.group_join).as_secs_f64());
        }
        bench.pool.close().await;
        table.push_str(&format!(
            "| {backend} | {} | {} | {} |\n",
            median_of(&mut total),
            median_of(&mut join),
            median_of(&mut own)
        ));
    }
    Ok(table)
}

/// "median (run / run / …)", to two decimals.
fn median_of(values: &mut [f64]) -> String {
    let runs: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    format!("{:.2} ({})", median(values), runs.join(" / "))
}

/// The median of `values` (NaN for none), which it sorts.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// BENCH_SCENARIOS, or all six.
fn listed(records: i64) -> Result<Vec<Scenario>> {
    let list = std::env::var("BENCH_SCENARIOS").unwrap_or_else(|_| {
        "postgres:insert,postgres:upsert-new,postgres:upsert-updates,\
         mysql:insert,mysql:upsert-new,mysql:upsert-updates"
            .into()
    });
    list.split(',')
        .map(|item| {
            let (database, mode) = item
                .trim()
                .split_once(':')
                .with_context(|| format!("scenario {item}: use database:mode"))?;
            let backend = match database {
                "postgres" => Backend::Postgres,
                "mysql" => Backend::MySql,
                other => bail!("database {other}: use postgres or mysql"),
            };
            Ok(Scenario {
                backend,
                mode: Mode::parse(mode)?,
                partitions: 4,
                record_bytes: 200,
                records,
            })
        })
        .collect()
}

/// Insert mode over partition counts and record sizes, the same bytes for each size.
fn sweep(records: i64) -> Vec<Scenario> {
    let mut all = Vec::new();
    for backend in [Backend::Postgres, Backend::MySql] {
        for record_bytes in [200, 2_000, 20_000] {
            for partitions in [1, 4, 16, 64] {
                all.push(Scenario {
                    backend,
                    mode: Mode::Insert,
                    partitions,
                    record_bytes,
                    records: (records * 200 / record_bytes as i64).max(1_000),
                });
            }
        }
    }
    all
}

/// The table line of a scenario's runs.
fn row(s: &Scenario, runs: &mut [Run]) -> String {
    let mut sink: Vec<f64> = runs.iter().map(|r| r.sink).collect();
    let mut ceiling: Vec<f64> = runs.iter().map(|r| r.ceiling).collect();
    let mut ratio: Vec<f64> = runs.iter().map(Run::ratio).collect();
    let mut megabytes: Vec<f64> = runs
        .iter()
        .map(|r| r.sink * r.bytes as f64 / s.records as f64 / 1e6)
        .collect();
    let mut cpu: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.cpu_per_record)
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    let cpu = if cpu.is_empty() {
        "–".to_string()
    } else {
        format!("{:.2}", median(&mut cpu))
    };
    let rss = runs
        .iter()
        .filter_map(|r| r.peak_rss)
        .max()
        .map_or("–".to_string(), |kb| format!("{}", kb / 1024));
    let size = match s.record_bytes {
        b if b >= 1_000 => format!("{} kB", b / 1_000),
        b => format!("{b} B"),
    };
    let ceiling_name = match (s.backend, s.mode) {
        (Backend::Postgres, Mode::UpsertUpdates) => "COPY + INSERT … ON CONFLICT",
        (Backend::Postgres, _) => "COPY",
        (Backend::MySql, Mode::UpsertUpdates) => "LOAD DATA + INSERT … ON DUPLICATE KEY",
        (Backend::MySql, _) => "LOAD DATA",
    };
    format!(
        "| {} | {} | {} | {size} | {} | {:.0} | {:.1} | {:.0} ({ceiling_name}) | {} | {cpu} | {rss} |\n",
        s.backend,
        s.mode.name(),
        s.partitions,
        s.records,
        median(&mut sink),
        median(&mut megabytes),
        median(&mut ceiling),
        median_of(&mut ratio),
    )
}

/// What one benchmark run compares, and where.
struct Bench {
    brokers: String,
    url: String,
    pool: DbPool,
    scenario: Scenario,
}

/// An order event whose value is about `bytes` long (at least about 200).
fn event(id: i64, bytes: usize) -> serde_json::Value {
    let status = ["new", "paid", "shipped"][(id % 3) as usize];
    json!({
        "order_id": id,
        "customer": {"name": format!("customer-{:06}", id % 100_000), "tier": id % 3},
        "amount": format!("{}.{:02}", id % 1000, id % 100).parse::<serde_json::Number>().unwrap_or(0.into()),
        "status": status,
        "created_at": "2026-11-23T10:00:00Z",
        "note": "x".repeat(bytes.saturating_sub(152).max(48)),
    })
}

impl Bench {
    fn backend(&self) -> Backend {
        self.scenario.backend
    }

    /// The target table: the conflict key is the Kafka coordinates (insert) or order_id
    /// (upsert), the only unique key either way.
    fn table_ddl(&self, name: &str) -> String {
        let key = if self.scenario.mode.upsert() {
            "PRIMARY KEY (order_id)"
        } else {
            "UNIQUE (kafka_topic, kafka_partition, kafka_offset)"
        };
        let (text, time, json) = match self.backend() {
            Backend::Postgres => ("text", "timestamptz", "jsonb"),
            Backend::MySql => ("varchar(255)", "datetime(6)", "json"),
        };
        format!(
            "CREATE TABLE {name} (order_id bigint NOT NULL, customer {text} NOT NULL, amount numeric(12,2), \
             status {text}, created_at {time}, payload {json} NOT NULL, kafka_topic {text} NOT NULL, \
             kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, {key})"
        )
    }

    async fn exec(&self, sql: &str) -> Result<()> {
        match &self.pool {
            DbPool::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ())?,
            DbPool::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ())?,
        }
        Ok(())
    }

    async fn count(&self, sql: &str) -> Result<i64> {
        Ok(match &self.pool {
            DbPool::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
            DbPool::MySql(p) => sqlx::query_scalar(sql).fetch_one(p).await?,
        })
    }

    async fn once(&self, run: u64) -> Result<Run> {
        let (brokers, s) = (&self.brokers, self.scenario);
        let tag = format!("bench_{}_{run}", std::process::id());
        let Produced {
            topic,
            outgoing,
            end,
            lines,
        } = self.produce(&tag).await?;
        let bytes = outgoing
            .iter()
            .map(|o| o.value.as_ref().map_or(0, Vec::len))
            .sum();

        let consume = consume_only(brokers, &topic, outgoing.len()).await?;
        let load = self.load_ceiling(&format!("{tag}_load"), &lines).await?;
        let sink = self.idemsink_run(&tag, &topic, &end, &lines).await?;
        // Leave the disks as they were: these tables and topics are large.
        self.exec(&format!("DROP TABLE {tag}_load")).await?;
        self.exec(&format!("DROP TABLE {tag}_sink")).await?;
        self.exec(&format!(
            "DELETE FROM idemsink_offsets WHERE pipeline = '{tag}'"
        ))
        .await?;
        testkit::delete_topic(brokers, &topic).await?;
        let rate = |d: Duration| s.records as f64 / d.as_secs_f64();
        Ok(Run {
            sink: rate(sink.elapsed),
            ceiling: rate(load),
            consume: rate(consume),
            cpu_per_record: sink.cpu.map(|cpu| cpu / s.records as u32),
            peak_rss: sink.peak_rss_kb,
            bytes,
        })
    }

    /// A new table holding, for `upsert-updates`, 80% of the keys already (older rows).
    async fn prepared_table(&self, table: &str, lines: &Lines) -> Result<()> {
        self.exec(&self.table_ddl(table)).await?;
        if self.scenario.mode == Mode::UpsertUpdates {
            let rows = self.bulk_load(table, &lines.present, false).await?.0;
            if rows != lines.present_count {
                bail!(
                    "the prefill wrote {rows} rows, expected {}",
                    lines.present_count
                );
            }
        }
        Ok(())
    }

    /// The very rows idemsink writes, bulk-loaded as a DBA would into an identical table.
    async fn load_ceiling(&self, table: &str, lines: &Lines) -> Result<Duration> {
        self.prepared_table(table, lines).await?;
        let merge = self.scenario.mode == Mode::UpsertUpdates;
        let (_, elapsed) = self.bulk_load(table, &lines.all, merge).await?;
        let rows = self.count(&format!("SELECT count(*) FROM {table}")).await?;
        if rows != self.scenario.records {
            bail!(
                "the bulk load left {rows} rows, expected {}",
                self.scenario.records
            );
        }
        eprintln!("bulk load: {rows} rows in {elapsed:.1?}");
        Ok(elapsed)
    }

    /// Loads tab-separated `data` into `table`: straight, or (`merge`) into a temporary table
    /// merged with one INSERT … SELECT that updates the keys present. Returns the rows the
    /// load reported and how long it took.
    async fn bulk_load(&self, table: &str, data: &str, merge: bool) -> Result<(i64, Duration)> {
        let columns = [
            "customer",
            "amount",
            "status",
            "created_at",
            "payload",
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
        ];
        match self.backend() {
            Backend::MySql => {
                let file = tempfile::NamedTempFile::new()?;
                std::fs::write(file.path(), data)?;
                let path = file.path().display();
                let sql = if merge {
                    let set: Vec<String> = columns
                        .iter()
                        .map(|c| format!("{c} = VALUES({c})"))
                        .collect();
                    format!(
                        "CREATE TEMPORARY TABLE stage LIKE {table}; \
                         LOAD DATA LOCAL INFILE '{path}' INTO TABLE stage; \
                         INSERT INTO {table} SELECT * FROM stage ON DUPLICATE KEY UPDATE {}; \
                         SELECT ROW_COUNT();",
                        set.join(", ")
                    )
                } else {
                    format!(
                        "LOAD DATA LOCAL INFILE '{path}' INTO TABLE {table}; SELECT ROW_COUNT();"
                    )
                };
                let started = Instant::now();
                let out = mariadb(&self.url, &sql)?;
                Ok((out.trim().parse()?, started.elapsed()))
            }
            Backend::Postgres => {
                let mut conn = PgConnection::connect(&self.url).await?;
                let started = Instant::now();
                let mut tx = conn.begin().await?;
                let target = if merge {
                    sqlx::raw_sql(&format!(
                        "CREATE TEMP TABLE stage (LIKE {table}) ON COMMIT DROP"
                    ))
                    .execute(&mut *tx)
                    .await?;
                    "stage"
                } else {
                    table
                };
                let mut copy = tx.copy_in_raw(&format!("COPY {target} FROM STDIN")).await?;
                for chunk in data.as_bytes().chunks(1 << 20) {
                    copy.send(chunk).await?;
                }
                let mut rows = copy.finish().await? as i64;
                if merge {
                    let set: Vec<String> = columns
                        .iter()
                        .map(|c| format!("{c} = EXCLUDED.{c}"))
                        .collect();
                    rows = sqlx::query(&format!(
                        "INSERT INTO {table} SELECT * FROM stage ON CONFLICT (order_id) DO UPDATE SET {}",
                        set.join(", ")
                    ))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected() as i64;
                }
                tx.commit().await?;
                Ok((rows, started.elapsed()))
            }
        }
    }

    /// idemsink from process start until the offsets table holds the end offsets.
    async fn idemsink_run(
        &self,
        tag: &str,
        topic: &str,
        end: &BTreeMap<i32, i64>,
        lines: &Lines,
    ) -> Result<SinkRun> {
        let table = format!("{tag}_sink");
        self.prepared_table(&table, lines).await?;
        let dir = tempfile::tempdir()?;
        let config = self.pipeline_file(dir.path(), tag, topic, &table)?;
        let sink = common::run_idemsink(&config, &self.pool, tag, topic, end).await?;
        let rows = self.count(&format!("SELECT count(*) FROM {table}")).await?;
        if rows != self.scenario.records {
            bail!(
                "idemsink left {rows} rows, expected {}",
                self.scenario.records
            );
        }
        if self.scenario.mode == Mode::UpsertUpdates {
            let old = self
                .count(&format!(
                    "SELECT count(*) FROM {table} WHERE status = 'old'"
                ))
                .await?;
            if old != 0 {
                bail!("{old} rows were not updated");
            }
        }
        sink.report(rows);
        Ok(sink)
    }
}

impl Bench {
    /// The benchmark's pipeline file, in `dir`: `topic` into `table`, every column mapped.
    fn pipeline_file(
        &self,
        dir: &std::path::Path,
        tag: &str,
        topic: &str,
        table: &str,
    ) -> Result<std::path::PathBuf> {
        let config = dir.join("bench.yaml");
        let properties: String = GROUP_SETTINGS
            .iter()
            .map(|(k, v)| format!("    {k}: {v}\n"))
            .collect();
        let mode = if self.scenario.mode.upsert() {
            "  mode: upsert\n  key: [order_id]\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "pipeline: {tag}\nsource:\n  brokers: {}\n  topics: [{topic}]\n  properties:\n{properties}\
                 sink:\n  url: {}\n  table: {table}\n{mode}  columns:\n    order_id: /order_id\n    customer: /customer/name\n    \
                 amount: /amount\n    status: /status\n    created_at: /created_at\n    payload: $value\n    \
                 kafka_topic: $topic\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
                self.brokers, self.url
            ),
        )?;
        Ok(config)
    }

    /// Process start to the first committed batch, and the group join within it, on a
    /// small topic (the start-up target excludes the join, which is the broker's).
    async fn startup(&self, run: u64) -> Result<common::Startup> {
        let tag = format!("bench_start_{}_{run}", std::process::id());
        let Produced {
            topic, end, lines, ..
        } = self.produce(&tag).await?;
        let table = format!("{tag}_sink");
        self.prepared_table(&table, &lines).await?;
        let dir = tempfile::tempdir()?;
        let config = self.pipeline_file(dir.path(), &tag, &topic, &table)?;
        let log = dir.path().join("idemsink.log");
        let spawned = chrono::Utc::now();
        common::run_idemsink_logged(&config, &self.pool, &tag, &topic, &end, Some(&log)).await?;
        let startup = common::Startup::from_log(&std::fs::read_to_string(&log)?, spawned);
        self.exec(&format!("DROP TABLE {table}")).await?;
        self.exec(&format!(
            "DELETE FROM idemsink_offsets WHERE pipeline = '{tag}'"
        ))
        .await?;
        testkit::delete_topic(&self.brokers, &topic).await?;
        startup
    }

    /// A new topic `<tag>_topic` holding the scenario's records, spread over its partitions.
    async fn produce(&self, tag: &str) -> Result<Produced> {
        let (brokers, s) = (&self.brokers, self.scenario);
        let topic = format!("{tag}_topic");
        testkit::create_topic(brokers, &topic, s.partitions, false).await?;
        let outgoing: Vec<Outgoing> = (0..s.records)
            .map(|id| {
                let partition = (id % i64::from(s.partitions)) as i32;
                Outgoing::json(partition, &id.to_string(), &event(id, s.record_bytes))
            })
            .collect();
        let landed = testkit::produce(&testkit::producer(brokers)?, &topic, &outgoing).await?;
        let end = testkit::end_offsets(brokers, &topic).await?;
        let lines = Lines::new(&topic, &outgoing, &landed, self.backend())?;
        Ok(Produced {
            topic,
            outgoing,
            end,
            lines,
        })
    }
}

/// A topic a run reads: its records, where they ended, and its rows as bulk-load text.
struct Produced {
    topic: String,
    outgoing: Vec<Outgoing>,
    end: BTreeMap<i32, i64>,
    lines: Lines,
}

/// The rows of a run as bulk-load text (tab-separated, one per line): all of them, and for
/// `upsert-updates` the older versions of the keys already present.
struct Lines {
    all: String,
    present: String,
    present_count: i64,
}

impl Lines {
    fn new(
        topic: &str,
        outgoing: &[Outgoing],
        landed: &[(i32, i64)],
        backend: Backend,
    ) -> Result<Lines> {
        let mysql = backend == Backend::MySql;
        let mut lines = Lines {
            all: String::with_capacity(outgoing.len() * 320),
            present: String::new(),
            present_count: 0,
        };
        for (id, (record, (partition, offset))) in outgoing.iter().zip(landed).enumerate() {
            let value = std::str::from_utf8(record.value.as_deref().unwrap_or_default())?;
            let v: serde_json::Value = serde_json::from_str(value)?;
            let text = |p: &str| {
                v.pointer(p)
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                    .unwrap_or_default()
            };
            let created_at = if mysql {
                text("/created_at").replace('T', " ").replace('Z', "")
            } else {
                text("/created_at")
            };
            let escaped = value.replace('\\', "\\\\");
            let line = |status: &str, offset: i64| {
                format!(
                    "{}\t{}\t{}\t{status}\t{created_at}\t{escaped}\t{topic}\t{partition}\t{offset}\n",
                    text("/order_id"),
                    text("/customer/name"),
                    text("/amount"),
                )
            };
            lines.all.push_str(&line(&text("/status"), *offset));
            // The older version: written from before this topic's first offset, so that
            // idemsink's position guard takes the record as newer.
            if (id as i64) % 10 < PRESENT_TENTHS {
                lines.present.push_str(&line("old", -1));
                lines.present_count += 1;
            }
        }
        Ok(lines)
    }
}
