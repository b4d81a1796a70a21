//! Throughput benchmark (not a timed test): idemsink's rows/s against two ceilings measured
//! in the same run on the same records — the database's bulk load into an identical table
//! with the same unique key (PostgreSQL `COPY`, MySQL/MariaDB `LOAD DATA LOCAL INFILE`), and
//! a consume-only rdkafka pass over the topic with the same group settings. Reports the
//! ratio to the slower ceiling per run and the median of the runs.
//!
//! Run with `scripts/bench.sh` (starts the databases and the broker). Environment:
//! BENCH_DB (postgres or mysql, default postgres), BENCH_MODE (insert: conflict on the
//! Kafka coordinates; upsert: on order_id; default insert), BENCH_RECORDS (default 1000000),
//! BENCH_RUNS (default 3), BENCH_LOG (idemsink's RUST_LOG, default warn; `idemsink=debug`
//! shows every batch with its duration), BENCH_PERF (a file: idemsink runs under `perf
//! record -g`; its CPU time is then perf's). idemsink's CPU time per record is printed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use idemsink::db::{Backend, DbPool};
use idemsink::testkit::{self, Outgoing};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde_json::json;
use sqlx::{Connection, PgConnection};

const PARTITIONS: i32 = 4;
const GROUP_SETTINGS: [(&str, &str); 2] = [
    ("session.timeout.ms", "2000"),
    ("heartbeat.interval.ms", "200"),
];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn required(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set; run scripts/bench.sh"))
}

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo bench -- --list` and test discovery: nothing to list
    }
    let brokers = required("IDEMSINK_TEST_BROKERS")?;
    let url = match std::env::var("BENCH_DB").as_deref() {
        Ok("mysql") => required("IDEMSINK_TEST_MYSQL_URL")?,
        Ok("postgres") | Err(_) => required("IDEMSINK_TEST_DATABASE_URL")?,
        Ok(other) => bail!("BENCH_DB={other}: use postgres or mysql"),
    };
    let upsert = match std::env::var("BENCH_MODE").as_deref() {
        Ok("upsert") => true,
        Ok("insert") | Err(_) => false,
        Ok(other) => bail!("BENCH_MODE={other}: use insert or upsert"),
    };
    let records = env_or("BENCH_RECORDS", 1_000_000) as i64;
    let runs = env_or("BENCH_RUNS", 3);
    let pool = DbPool::connect(&url, 2).await?;
    let bench = Bench {
        brokers,
        url,
        pool,
        upsert,
    };
    let ceiling = match bench.pool.backend() {
        Backend::Postgres => "COPY",
        Backend::MySql => "LOAD DATA",
    };
    let mode = if upsert { "upsert" } else { "insert" };
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let r = bench.once(records, run).await?;
        println!(
            "run {run} ({} {mode}): idemsink {:.0} rows/s | {ceiling} {:.0} rows/s | consume-only {:.0} rows/s | ratio to slower ceiling {:.2}",
            bench.pool.backend(), r.sink, r.load, r.consume, r.ratio()
        );
        ratios.push(r.ratio());
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median ratio over {runs} runs: {:.2}",
        ratios[ratios.len() / 2]
    );
    Ok(())
}

/// What one benchmark compares: the database, and the mode idemsink writes in.
struct Bench {
    brokers: String,
    url: String,
    pool: DbPool,
    upsert: bool,
}

struct Rates {
    sink: f64,
    load: f64,
    consume: f64,
}

impl Rates {
    fn ratio(&self) -> f64 {
        self.sink / self.load.min(self.consume)
    }
}

/// An order event of about 200 bytes.
fn event(id: i64) -> serde_json::Value {
    let status = ["new", "paid", "shipped"][(id % 3) as usize];
    json!({
        "order_id": id,
        "customer": {"name": format!("customer-{:06}", id % 100_000), "tier": id % 3},
        "amount": format!("{}.{:02}", id % 1000, id % 100).parse::<serde_json::Number>().unwrap_or(0.into()),
        "status": status,
        "created_at": "2026-11-23T10:00:00Z",
        "note": "x".repeat(48),
    })
}

impl Bench {
    /// The target table: the conflict key is the Kafka coordinates (insert) or order_id
    /// (upsert), the only unique key either way.
    fn table_ddl(&self, name: &str) -> String {
        let key = if self.upsert {
            "PRIMARY KEY (order_id)"
        } else {
            "UNIQUE (kafka_topic, kafka_partition, kafka_offset)"
        };
        let (text, time, json) = match self.pool.backend() {
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

    async fn count(&self, table: &str) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM {table}");
        Ok(match &self.pool {
            DbPool::Postgres(p) => sqlx::query_scalar(&sql).fetch_one(p).await?,
            DbPool::MySql(p) => sqlx::query_scalar(&sql).fetch_one(p).await?,
        })
    }

    async fn once(&self, records: i64, run: u64) -> Result<Rates> {
        let brokers = &self.brokers;
        let tag = format!("bench_{}_{run}", std::process::id());
        let topic = format!("{tag}_topic");
        testkit::create_topic(brokers, &topic, PARTITIONS, false).await?;
        let outgoing: Vec<Outgoing> = (0..records)
            .map(|id| Outgoing::json((id % PARTITIONS as i64) as i32, &id.to_string(), &event(id)))
            .collect();
        let started = Instant::now();
        let landed = testkit::produce(&testkit::producer(brokers)?, &topic, &outgoing).await?;
        eprintln!(
            "run {run}: produced {records} records in {:.1?}",
            started.elapsed()
        );
        let end = testkit::end_offsets(brokers, &topic).await?;

        let consume = consume_only(brokers, &topic, records as usize).await?;
        let load = self.load_ceiling(&tag, &topic, &outgoing, &landed).await?;
        let sink = self.idemsink_run(&tag, &topic, &end).await?;
        // A million rows per table per run: leave the disk as it was.
        self.exec(&format!("DROP TABLE {tag}_load")).await?;
        self.exec(&format!("DROP TABLE {tag}_sink")).await?;
        self.exec(&format!(
            "DELETE FROM idemsink_offsets WHERE pipeline = '{tag}'"
        ))
        .await?;
        let rate = |d: Duration| records as f64 / d.as_secs_f64();
        Ok(Rates {
            sink: rate(sink),
            load: rate(load),
            consume: rate(consume),
        })
    }

    /// The very rows idemsink writes, bulk-loaded into an identical table in one statement.
    async fn load_ceiling(
        &self,
        tag: &str,
        topic: &str,
        outgoing: &[Outgoing],
        landed: &[(i32, i64)],
    ) -> Result<Duration> {
        let table = format!("{tag}_load");
        self.exec(&self.table_ddl(&table)).await?;
        let mysql = self.pool.backend() == Backend::MySql;
        let mut data = String::with_capacity(outgoing.len() * 320);
        for (record, (partition, offset)) in outgoing.iter().zip(landed) {
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
            data.push_str(&format!(
                "{}\t{}\t{}\t{}\t{created_at}\t{escaped}\t{topic}\t{partition}\t{offset}\n",
                text("/order_id"),
                text("/customer/name"),
                text("/amount"),
                text("/status"),
            ));
        }
        let (rows, elapsed) = if mysql {
            self.load_data_infile(&table, &data)?
        } else {
            let mut conn = PgConnection::connect(&self.url).await?;
            let started = Instant::now();
            let mut copy = conn
                .copy_in_raw(&format!("COPY {table} FROM STDIN"))
                .await?;
            for chunk in data.as_bytes().chunks(1 << 20) {
                copy.send(chunk).await?;
            }
            let rows = copy.finish().await?;
            (rows, started.elapsed())
        };
        if rows != outgoing.len() as u64 {
            bail!(
                "the bulk load wrote {rows} rows, expected {}",
                outgoing.len()
            );
        }
        eprintln!("bulk load: {rows} rows in {elapsed:.1?}");
        Ok(elapsed)
    }

    /// `LOAD DATA LOCAL INFILE` through the `mariadb` client (sqlx cannot send a local file).
    fn load_data_infile(&self, table: &str, data: &str) -> Result<(u64, Duration)> {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), data)?;
        let url = url_parts(&self.url)?;
        let sql = format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE {table}; SELECT ROW_COUNT();",
            file.path().display()
        );
        let started = Instant::now();
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
            .args(["-e", &sql])
            .output()?;
        let elapsed = started.elapsed();
        if !out.status.success() {
            bail!("LOAD DATA failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let rows = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        Ok((rows, elapsed))
    }

    /// idemsink from process start until the offsets table holds the end offsets.
    async fn idemsink_run(
        &self,
        tag: &str,
        topic: &str,
        end: &BTreeMap<i32, i64>,
    ) -> Result<Duration> {
        let table = format!("{tag}_sink");
        self.exec(&self.table_ddl(&table)).await?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("bench.yaml");
        let properties: String = GROUP_SETTINGS
            .iter()
            .map(|(k, v)| format!("    {k}: {v}\n"))
            .collect();
        let mode = if self.upsert {
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
        let started = Instant::now();
        let idemsink = env!("CARGO_BIN_EXE_idemsink");
        // BENCH_PERF=<file>: the run is recorded by `perf record` (call graphs) into <file>.
        let mut command = match std::env::var("BENCH_PERF") {
            Ok(out) => {
                let mut perf = std::process::Command::new("perf");
                perf.args(["record", "-F", "499", "-g", "-o", &out, "--", idemsink]);
                perf
            }
            Err(_) => std::process::Command::new(idemsink),
        };
        let mut child = command
            .args(["run", "--http-addr", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()?;
        let waited = testkit::wait_for_offsets(
            &self.pool,
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
        let cpu = cpu_time(child.id());
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let status = child.wait()?;
        waited?;
        if !status.success() {
            bail!("idemsink exited with {status}");
        }
        let rows = self.count(&table).await?;
        if rows != end.values().sum::<i64>() {
            bail!(
                "idemsink wrote {rows} rows, expected {}",
                end.values().sum::<i64>()
            );
        }
        match cpu {
            Ok(cpu) => eprintln!(
                "idemsink: {rows} rows in {elapsed:.1?}, CPU {cpu:.1?} (user + system): {:.2} µs per record",
                cpu.as_secs_f64() * 1e6 / rows as f64
            ),
            Err(e) => eprintln!("idemsink: {rows} rows in {elapsed:.1?} (CPU time unknown: {e})"),
        }
        Ok(elapsed)
    }
}

/// A process's user + system CPU time so far, from `/proc/<pid>/stat` (in clock ticks of
/// 1/100 s, Linux's USER_HZ).
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<u64> { Ok(fields.get(i).context("short stat")?.parse()?) };
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

struct UrlParts {
    user: String,
    password: String,
    host: String,
    port: String,
    database: String,
}

/// `mysql://user:password@host:port/database`, for the command-line client.
fn url_parts(url: &str) -> Result<UrlParts> {
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

/// A group subscription (same join cost as idemsink) reading every record once.
async fn consume_only(brokers: &str, topic: &str, records: usize) -> Result<Duration> {
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
