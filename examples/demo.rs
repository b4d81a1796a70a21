//! The demo's producer (used by scripts/demo.sh): what idemsink is for, end to end. Orders go
//! through several versions (new → paid → shipped → delivered), produced in Kafka
//! transactions. One transaction in five is aborted, and its events carry a status that must
//! never show (`voided`). A "retrying producer" sends some events twice. Then it waits until
//! the pipeline has stored Kafka's end offsets and checks the table: one row per order, each at
//! the newest version of its committed events, and nothing of an aborted transaction.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use idemsink::db::DbPool;
use idemsink::testkit::{self, Outgoing};
use rand::{Rng, SeedableRng};
use rdkafka::producer::Producer;
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Orders; each gets one to four versions.
    #[arg(long, default_value_t = 2000)]
    orders: i64,
    /// Events per transaction.
    #[arg(long, default_value_t = 100)]
    per_transaction: usize,
    /// Percentage of events a "retrying producer" sends a second time.
    #[arg(long, default_value_t = 3)]
    resend_percent: u32,
    /// Wait until this pipeline has stored the end offsets…
    #[arg(long)]
    pipeline: String,
    /// …in this database (PostgreSQL), then check the `orders` table.
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

const CUSTOMERS: &[&str] = &[
    "Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances",
];
const STATUSES: &[&str] = &["new", "paid", "shipped", "delivered"];

/// One version of one order.
fn event(rng: &mut impl Rng, order_id: i64, version: i64, status: &str) -> serde_json::Value {
    json!({
        "order_id": order_id,
        "version": version,
        "customer": {"name": CUSTOMERS[(order_id % CUSTOMERS.len() as i64) as usize], "tier": 1 + order_id % 3},
        "amount": format!("{}.{:02}", 1 + order_id % 500, rng.gen_range(0..100)).parse::<serde_json::Number>().unwrap_or_else(|_| 0.into()),
        "status": status,
        "created_at": format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + order_id % 28, order_id % 24, order_id % 60),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    testkit::create_topic(&cli.brokers, &cli.topic, cli.partitions, true).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    // Every version of every order, interleaved as a live system would produce them.
    let mut events = Vec::new();
    for order_id in 1..=cli.orders {
        for version in 1..=rng.gen_range(1..=4) {
            events.push((order_id, version));
        }
    }
    events.sort_by_key(|(order_id, version)| (*version, (order_id * 7919) % 1000, *order_id));

    let producer = testkit::transactional_producer(
        &cli.brokers,
        &format!("idemsink-demo-{}", cli.topic),
        Duration::from_secs(60),
    )?;
    let mut newest: BTreeMap<i64, (i64, &str)> = BTreeMap::new();
    let (mut transactions, mut aborted, mut resent, mut records) = (0, 0, 0, 0);
    for chunk in events.chunks(cli.per_transaction) {
        let abort = transactions % 5 == 3;
        let mut batch = Vec::new();
        for (order_id, version) in chunk {
            let status = if abort {
                "voided"
            } else {
                STATUSES[*version as usize - 1]
            };
            let value = event(&mut rng, *order_id, *version, status);
            let record = Outgoing::json(
                (order_id % cli.partitions as i64) as i32,
                &order_id.to_string(),
                &value,
            );
            // A producer that timed out waiting for an ack and sent again: a new record,
            // at a new offset, with the same content.
            if rng.gen_range(0..100) < cli.resend_percent {
                batch.push(record.clone());
                resent += 1;
            }
            batch.push(record);
            if !abort {
                let entry = newest.entry(*order_id).or_insert((0, ""));
                if *version > entry.0 {
                    *entry = (*version, status);
                }
            }
        }
        producer.begin_transaction()?;
        testkit::produce(&producer, &cli.topic, &batch).await?;
        if abort {
            producer.abort_transaction(Duration::from_secs(30))?;
            aborted += 1;
        } else {
            producer.commit_transaction(Duration::from_secs(30))?;
        }
        transactions += 1;
        records += batch.len();
    }
    println!(
        "produced {records} records to {}: {} versions of {} orders in {transactions} transactions, \
         {aborted} of them aborted (their events say \"voided\"), {resent} events sent twice",
        cli.topic,
        events.len(),
        cli.orders,
    );

    let pool = DbPool::connect(&cli.database_url, 2).await?;
    let end = testkit::end_offsets(&cli.brokers, &cli.topic).await?;
    testkit::wait_for_offsets(
        &pool,
        &cli.pipeline,
        &cli.topic,
        &end,
        Duration::from_secs(cli.timeout_secs),
        // idemsink is the shell's child here; scripts/demo.sh reports its exit status.
        || Ok(()),
    )
    .await?;
    println!(
        "pipeline {} has caught up: stored offsets = Kafka's end offsets {end:?} (transaction markers included)",
        cli.pipeline
    );
    check_table(&pool, &newest).await
}

/// The table holds exactly one row per order with committed events, at its newest committed
/// version, and no event of an aborted transaction.
async fn check_table(pool: &DbPool, newest: &BTreeMap<i64, (i64, &str)>) -> Result<()> {
    let DbPool::Postgres(pg) = pool else {
        anyhow::bail!("the demo checks a PostgreSQL table");
    };
    let rows: Vec<(i64, i32, String)> =
        sqlx::query_as("SELECT order_id, version, status FROM orders ORDER BY order_id")
            .fetch_all(pg)
            .await
            .context("reading the orders table")?;
    let voided = rows.iter().filter(|r| r.2 == "voided").count();
    ensure!(voided == 0, "{voided} rows come from aborted transactions");
    ensure!(
        rows.len() == newest.len(),
        "{} rows for {} orders",
        rows.len(),
        newest.len()
    );
    for (order_id, version, status) in &rows {
        let expected = newest.get(order_id).context("a row for an unknown order")?;
        ensure!(
            (i64::from(*version), status.as_str()) == *expected,
            "order {order_id} is at version {version} ({status}), expected {expected:?}"
        );
    }
    println!(
        "checked: {} rows, one per order, each at its newest committed version; none from an aborted transaction",
        rows.len()
    );
    Ok(())
}
