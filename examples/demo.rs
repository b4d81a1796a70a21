//! The demo's producer (used by scripts/demo.sh): produces order events, some of them sent
//! twice, then waits until the pipeline has stored the end offsets of every partition.
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use idemsink::testkit::{self, Outgoing};
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 5000)]
    count: u64,
    /// Percentage of events a "retrying producer" sends a second time.
    #[arg(long, default_value_t = 3)]
    resend_percent: u32,
    /// Wait until this pipeline has stored the end offsets…
    #[arg(long)]
    pipeline: String,
    /// …in this database.
    #[arg(long)]
    database_url: String,
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

const CUSTOMERS: &[&str] = &[
    "Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances",
];
const STATUSES: &[&str] = &["new", "paid", "shipped", "delivered"];

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    testkit::create_topic(&cli.brokers, &cli.topic, cli.partitions, true).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut records = Vec::new();
    let mut resent = 0;
    for order_id in 1..=cli.count {
        let amount = format!("{}.{:02}", rng.gen_range(1..500), rng.gen_range(0..100));
        let event = json!({
            "order_id": order_id,
            "customer": {"name": CUSTOMERS[rng.gen_range(0..CUSTOMERS.len())], "tier": rng.gen_range(1..4)},
            "amount": amount.parse::<serde_json::Number>()?,
            "status": STATUSES[rng.gen_range(0..STATUSES.len())],
            "created_at": format!("2026-11-{:02}T{:02}:{:02}:00Z", rng.gen_range(1..23), rng.gen_range(0..24), rng.gen_range(0..60)),
            "items": (0..rng.gen_range(1..4)).map(|i| json!({"sku": format!("SKU-{}", 100 + i), "qty": rng.gen_range(1..5)})).collect::<Vec<_>>(),
        });
        let record = Outgoing::json(
            (order_id % cli.partitions as u64) as i32,
            &order_id.to_string(),
            &event,
        );
        // A producer that timed out waiting for an ack and sent again: a new record, at a
        // new offset, with the same content.
        if rng.gen_range(0..100) < cli.resend_percent {
            records.push(record.clone());
            resent += 1;
        }
        records.push(record);
    }
    let producer = testkit::producer(&cli.brokers)?;
    let landed = testkit::produce(&producer, &cli.topic, &records).await?;
    println!(
        "produced {} order events to {}, {resent} of them sent twice: {} records",
        cli.count,
        cli.topic,
        records.len()
    );
    let pool = idemsink::db::DbPool::connect(&cli.database_url, 2).await?;
    let end = testkit::end_offsets(&landed);
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
        "pipeline {} has caught up: end offsets {end:?}",
        cli.pipeline
    );
    Ok(())
}
