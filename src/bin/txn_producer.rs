//! A transactional producer in a process of its own, for tests that freeze a producer in the
//! middle of a transaction (SIGSTOP): it begins a transaction, produces the standard test
//! records with ids `--from`..`--to` over `--partitions` partitions, prints one line `open
//! <partition>:<offset> …` once they are acknowledged, and then waits, never committing, until
//! it is killed. The broker aborts the transaction after `--timeout-ms`.
//! Built only with the `testkit` feature.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use idemsink::testkit::{self, Outgoing};
use rdkafka::producer::Producer;

#[derive(Parser)]
struct Cli {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    transactional_id: String,
    #[arg(long)]
    partitions: i32,
    #[arg(long)]
    from: i64,
    #[arg(long)]
    to: i64,
    /// `transaction.timeout.ms`: how long the broker lets the transaction stay open.
    #[arg(long)]
    timeout_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let producer = testkit::transactional_producer(
        &cli.brokers,
        &cli.transactional_id,
        Duration::from_millis(cli.timeout_ms),
    )?;
    producer.begin_transaction()?;
    let records: Vec<Outgoing> = (cli.from..cli.to)
        .map(|id| testkit::standard_record(id, (id % cli.partitions as i64) as i32))
        .collect();
    let landed = testkit::produce(&producer, &cli.topic, &records).await?;
    let places: Vec<String> = landed.iter().map(|(p, o)| format!("{p}:{o}")).collect();
    println!("open {}", places.join(" "));
    std::io::stdout().flush()?;
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
