//! Throughput benchmark (not a timed test): idemsink's rows/s against two ceilings measured
//! in the same run on the same records — PostgreSQL `COPY` into an identical table with the
//! same unique index, and a consume-only rdkafka pass over the topic with the same group
//! settings. Reports the ratio to the slower ceiling per run and the median of the runs.
//!
//! Run with `scripts/bench.sh` (starts PostgreSQL and the broker). Environment:
//! BENCH_RECORDS (default 1000000), BENCH_RUNS (default 3), BENCH_LOG (idemsink's RUST_LOG,
//! default warn; `idemsink=debug` shows every batch with its duration).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use idemsink::testkit::{self, Outgoing};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};

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
    let url = required("IDEMSINK_TEST_DATABASE_URL")?;
    let records = env_or("BENCH_RECORDS", 1_000_000) as i64;
    let runs = env_or("BENCH_RUNS", 3);
    let pool = PgPool::connect(&url).await?;
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let r = bench_once(&brokers, &url, &pool, records, run).await?;
        println!(
            "run {run}: idemsink {:.0} rows/s | COPY {:.0} rows/s | consume-only {:.0} rows/s | ratio to slower ceiling {:.2}",
            r.sink, r.copy, r.consume, r.ratio()
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

struct Rates {
    sink: f64,
    copy: f64,
    consume: f64,
}

impl Rates {
    fn ratio(&self) -> f64 {
        self.sink / self.copy.min(self.consume)
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

fn table_ddl(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (order_id bigint NOT NULL, customer text NOT NULL, amount numeric(12,2), status text,
            created_at timestamptz, payload jsonb NOT NULL, kafka_topic text NOT NULL, kafka_partition int NOT NULL,
            kafka_offset bigint NOT NULL, UNIQUE (kafka_topic, kafka_partition, kafka_offset))"
    )
}

async fn bench_once(
    brokers: &str,
    url: &str,
    pool: &PgPool,
    records: i64,
    run: u64,
) -> Result<Rates> {
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
    let end = testkit::end_offsets(&landed);

    let consume = consume_only(brokers, &topic, records as usize).await?;
    let copy = copy_ceiling(url, pool, &tag, &topic, &outgoing, &landed).await?;
    let sink = idemsink_run(url, pool, brokers, &tag, &topic, &end).await?;
    // A million rows per table per run: leave the disk as it was.
    for sql in [
        format!("DROP TABLE {tag}_copy"),
        format!("DROP TABLE {tag}_sink"),
    ] {
        sqlx::query(&sql).execute(pool).await?;
    }
    sqlx::query("DELETE FROM idemsink_offsets WHERE pipeline = $1")
        .bind(&tag)
        .execute(pool)
        .await?;
    let rate = |d: Duration| records as f64 / d.as_secs_f64();
    Ok(Rates {
        sink: rate(sink),
        copy: rate(copy),
        consume: rate(consume),
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

/// COPY of the very rows idemsink writes, into an identical table, in one statement.
async fn copy_ceiling(
    url: &str,
    pool: &PgPool,
    tag: &str,
    topic: &str,
    outgoing: &[Outgoing],
    landed: &[(i32, i64)],
) -> Result<Duration> {
    let table = format!("{tag}_copy");
    sqlx::query(&table_ddl(&table)).execute(pool).await?;
    let mut data = String::with_capacity(outgoing.len() * 320);
    for (record, (partition, offset)) in outgoing.iter().zip(landed) {
        let value = std::str::from_utf8(record.value.as_deref().unwrap_or_default())?;
        let v: serde_json::Value = serde_json::from_str(value)?;
        let text = |p: &str| {
            v.pointer(p)
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
                .unwrap_or_default()
        };
        let escaped = value.replace('\\', "\\\\");
        data.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{escaped}\t{topic}\t{partition}\t{offset}\n",
            text("/order_id"),
            text("/customer/name"),
            text("/amount"),
            text("/status"),
            text("/created_at"),
        ));
    }
    let mut conn = PgConnection::connect(url).await?;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!("COPY {table} FROM STDIN"))
        .await?;
    for chunk in data.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    let rows = copy.finish().await?;
    let elapsed = started.elapsed();
    if rows != outgoing.len() as u64 {
        bail!("COPY wrote {rows} rows, expected {}", outgoing.len());
    }
    eprintln!("COPY: {rows} rows in {elapsed:.1?}");
    Ok(elapsed)
}

/// idemsink from process start until the offsets table holds the end offsets.
async fn idemsink_run(
    url: &str,
    pool: &PgPool,
    brokers: &str,
    tag: &str,
    topic: &str,
    end: &BTreeMap<i32, i64>,
) -> Result<Duration> {
    let table = format!("{tag}_sink");
    sqlx::query(&table_ddl(&table)).execute(pool).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bench.yaml");
    let properties: String = GROUP_SETTINGS
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "pipeline: {tag}\nsource:\n  brokers: {brokers}\n  topics: [{topic}]\n  properties:\n{properties}\
             sink:\n  url: {url}\n  table: {table}\n  columns:\n    order_id: /order_id\n    customer: /customer/name\n    \
             amount: /amount\n    status: /status\n    created_at: /created_at\n    payload: $value\n    \
             kafka_topic: $topic\n    kafka_partition: $partition\n    kafka_offset: $offset\n"
        ),
    )?;
    let started = Instant::now();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idemsink"))
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()?;
    let waited = testkit::wait_for_offsets(
        &idemsink::db::DbPool::Postgres(pool.clone()),
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
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait()?;
    waited?;
    if !status.success() {
        bail!("idemsink exited with {status}");
    }
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await?;
    if rows != end.values().sum::<i64>() {
        bail!(
            "idemsink wrote {rows} rows, expected {}",
            end.values().sum::<i64>()
        );
    }
    eprintln!("idemsink: {rows} rows in {elapsed:.1?}");
    Ok(elapsed)
}
