//! Helpers shared by the integration tests, the demo and the benchmark (feature `testkit`):
//! topics, producers, end offsets, and waiting until a pipeline has caught up; [`connect`]
//! runs Kafka Connect (Debezium).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use crate::db::DbPool;
use crate::offsets::OffsetStore;

pub mod connect;

/// Creates a topic; an existing topic with that name is an error unless `may_exist`.
pub async fn create_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    may_exist: bool,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("admin client")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .context("create topic")?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) if may_exist => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    // Metadata must show every partition before producers and consumers rely on it.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        let ready = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.partitions().len() == partitions as usize);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("topic {topic} did not show {partitions} partitions in metadata");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The environment variable naming a hold file: see [`hold_received`].
pub const HOLD_FILE_ENV: &str = "IDEMSINK_TESTKIT_HOLD_FILE";

/// Test hook in the consumer loop, between receiving a record and taking it: while the file
/// named by [`HOLD_FILE_ENV`] exists and holds an offset at or below the record's, the loop
/// waits. A test puts a reset of the partition into that window deterministically (the gap
/// after a reset). Only in builds with the `testkit` feature.
pub async fn hold_received(offset: i64) {
    // Read once: this runs for every record, and the benchmark's build has the hooks too.
    static PATH: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    let Some(path) = PATH.get_or_init(|| std::env::var_os(HOLD_FILE_ENV)) else {
        return;
    };
    let from = |text: String| text.trim().parse::<i64>().ok();
    let held = |p: &std::ffi::OsStr| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(from)
            .is_some_and(|from| offset >= from)
    };
    if held(path) {
        tracing::info!(offset, "testkit: holding a received record");
        while held(path) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(offset, "testkit: released the record");
    }
}

/// The environment variable naming a file that holds batches' transactions open: see
/// [`hold_transaction`].
pub const HOLD_TRANSACTION_FILE_ENV: &str = "IDEMSINK_TESTKIT_HOLD_TRANSACTION_FILE";

/// Test hook in the writer, after a batch's rows are written and before its offsets move:
/// while the file named by [`HOLD_TRANSACTION_FILE_ENV`] exists, the writer waits with the
/// transaction open and the rows locked, as an instance frozen there would. If the file holds
/// a partition number, only the transactions that move that partition's offset wait. Only in
/// builds with the `testkit` feature.
pub async fn hold_transaction(partitions: &[i32]) {
    static PATH: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    let Some(path) = PATH.get_or_init(|| std::env::var_os(HOLD_TRANSACTION_FILE_ENV)) else {
        return;
    };
    let held = |p: &std::ffi::OsStr| match std::fs::read_to_string(p) {
        Err(_) => false,
        Ok(text) => match text.trim().parse::<i32>() {
            Ok(partition) => partitions.contains(&partition),
            Err(_) => true,
        },
    };
    if held(path) {
        tracing::info!("testkit: holding a batch's transaction open after its rows");
        while held(path) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("testkit: released the batch's transaction");
    }
}

/// An idempotent producer that waits for all replicas. It sends records up to 64 MB, which
/// a topic takes once [`allow_record_bytes`] let it.
pub fn producer(brokers: &str) -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.max.bytes", (64 << 20).to_string())
        .create()
        .context("producer")
}

/// A transactional producer (`init_transactions` already done). The broker aborts a
/// transaction left open longer than `timeout` (`transaction.timeout.ms`).
pub fn transactional_producer(
    brokers: &str,
    transactional_id: &str,
    timeout: Duration,
) -> Result<FutureProducer> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", timeout.as_millis().to_string())
        .set("linger.ms", "5")
        .create()
        .context("transactional producer")?;
    p.init_transactions(Duration::from_secs(30))
        .context("init_transactions")?;
    Ok(p)
}

/// A record to produce: explicit partition, optional key, value (None: a tombstone).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl Outgoing {
    pub fn json(partition: i32, key: &str, value: &serde_json::Value) -> Outgoing {
        Outgoing {
            partition,
            key: Some(key.as_bytes().to_vec()),
            value: Some(value.to_string().into_bytes()),
        }
    }
}

/// The standard test record: `{"id": id, "body": "record <id>", "n": id % 7}`, keyed by the id.
pub fn standard_record(id: i64, partition: i32) -> Outgoing {
    Outgoing::json(
        partition,
        &id.to_string(),
        &serde_json::json!({"id": id, "body": format!("record {id}"), "n": id % 7}),
    )
}

/// Sends every record and waits for all acknowledgements; returns the (partition, offset)
/// each landed at, in input order.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    records: &[Outgoing],
) -> Result<Vec<(i32, i64)>> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).partition(r.partition);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        let delivery = loop {
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                // More records than the producer queues (a benchmark's millions): wait for
                // deliveries to make room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => bail!("enqueueing a record: {e}"),
            }
        };
        pending.push(delivery);
    }
    let mut landed = Vec::with_capacity(pending.len());
    for delivery in pending {
        let d = delivery
            .await
            .context("delivery cancelled")?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        landed.push((d.partition, d.offset));
    }
    Ok(landed)
}

/// Kafka's end offset (high watermark, ListOffsets) of every partition of `topic` that holds
/// anything: with transactions, one past the last marker.
pub async fn end_offsets(brokers: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut end = BTreeMap::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?;
                if high > 0 {
                    end.insert(p.id(), high);
                }
            }
        }
        Ok(end)
    })
    .await
    .context("end offsets task")?
}

/// An admin client for tests: partitions added, records deleted.
pub fn admin(brokers: &str) -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("admin client")
}

/// Lets `topic` take record batches up to `bytes` (Kafka's default is 1 MB).
pub async fn allow_record_bytes(brokers: &str, topic: &str, bytes: usize) -> Result<()> {
    let limit = bytes.to_string();
    let change = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("max.message.bytes", &limit);
    for result in admin(brokers)?
        .alter_configs([&change], &AdminOptions::new())
        .await
        .context("alter topic config")?
    {
        result.map_err(|(_, code)| anyhow::anyhow!("max.message.bytes of {topic}: {code}"))?;
    }
    Ok(())
}

/// Deletes every record of `partition` before `before` (Kafka's DeleteRecords), as retention
/// does: the log start offset moves to `before`.
pub async fn delete_records(brokers: &str, topic: &str, partition: i32, before: i64) -> Result<()> {
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))?;
    let deleted = admin(brokers)?
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .context("delete records")?;
    for e in deleted.elements() {
        if let Err(err) = e.error() {
            bail!("deleting records of {topic}/{partition}: {err}");
        }
    }
    Ok(())
}

/// Deletes a topic (the benchmark's million-record topics would fill the broker's disk).
pub async fn delete_topic(brokers: &str, topic: &str) -> Result<()> {
    for result in admin(brokers)?
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .context("delete topic")?
    {
        if let Err((name, code)) = result {
            bail!("deleting topic {name}: {code}");
        }
    }
    Ok(())
}

/// Deletes `topic` and creates it again, empty, with `partitions` partitions; waits while the
/// broker finishes the deletion.
pub async fn recreate_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    delete_topic(brokers, topic).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match create_topic(brokers, topic, partitions, false).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "topic not deleted yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Grows `topic` to `partitions` partitions (Kafka's CreatePartitions).
pub async fn add_partitions(brokers: &str, topic: &str, partitions: usize) -> Result<()> {
    let grow = rdkafka::admin::NewPartitions::new(topic, partitions);
    for result in admin(brokers)?
        .create_partitions([&grow], &AdminOptions::new())
        .await
        .context("create partitions")?
    {
        if let Err((name, code)) = result {
            bail!("adding partitions to {name}: {code}");
        }
    }
    Ok(())
}

/// The offsets a pipeline has stored for a topic (none before its offsets table exists).
pub async fn stored_offsets(
    pool: &DbPool,
    pipeline: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>> {
    let all = match OffsetStore::new(pipeline, pool.clone()).list().await {
        Ok(all) => all,
        Err(e) if is_undefined_table(&e) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(all
        .into_iter()
        .filter(|(tp, _)| tp.topic == topic)
        .map(|(tp, next)| (tp.partition, next))
        .collect())
}

/// SQLSTATE 42P01 (PostgreSQL) or 42S02 (MySQL): no such table.
fn is_undefined_table(e: &sqlx::Error) -> bool {
    let code = e.as_database_error().and_then(|d| d.code());
    matches!(code.as_deref(), Some("42P01" | "42S02"))
}

/// Waits until the stored offsets equal `target` for every partition in it. `healthy` is
/// asked at every poll and ends the wait with its error (e.g. the connector process died).
pub async fn wait_for_offsets(
    pool: &DbPool,
    pipeline: &str,
    topic: &str,
    target: &BTreeMap<i32, i64>,
    timeout: Duration,
    mut healthy: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let stored = stored_offsets(pool, pipeline, topic).await?;
        if target.iter().all(|(p, end)| stored.get(p) == Some(end)) {
            return Ok(());
        }
        healthy()?;
        if Instant::now() > deadline {
            bail!("pipeline {pipeline} did not reach {target:?} within {timeout:?}; stored: {stored:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
