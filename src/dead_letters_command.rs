//! The `dead-letters` command: lists a pipeline's dead letters, and re-queues them — key,
//! value and headers as they came — to their topic or another one, so that records fixed at
//! the source or refused by a since-corrected table can go through the pipeline again.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::LoadedPipeline;
use crate::db::DbPool;
use crate::dead_letters::{headers_from_json, DeadLetterTable, Selection, StoredDeadLetter};
use crate::error::{ErrorKind, PipelineError};
use crate::pipeline;

#[derive(Debug, thiserror::Error)]
pub enum DeadLettersError {
    #[error("pipeline {pipeline}: dead-letter table {table}: {source}")]
    Database {
        pipeline: String,
        table: String,
        source: sqlx::Error,
    },
    #[error("{0}")]
    Connect(Box<PipelineError>),
    #[error(
        "pipeline {pipeline}: kafka: {context}: {source}; {delivered} record(s) were delivered before it, \
         none was removed from the dead-letter table (re-queuing again re-sends those)"
    )]
    Kafka {
        pipeline: String,
        context: String,
        delivered: usize,
        source: Box<KafkaError>,
    },
    #[error("pipeline {pipeline}: dead letter {id}: {reason}")]
    Corrupt {
        pipeline: String,
        id: i64,
        reason: String,
    },
}

impl DeadLettersError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeadLettersError::Database { source, .. } => ErrorKind::of_database(source),
            DeadLettersError::Connect(e) => e.kind(),
            DeadLettersError::Kafka { source, .. } => ErrorKind::of_kafka(source),
            // A stored dead letter that cannot be sent as it came: its row must be mended.
            DeadLettersError::Corrupt { .. } => ErrorKind::Permanent,
        }
    }
}

/// A pipeline's dead-letter table and a connection to it.
struct Opened {
    pool: DbPool,
    table: DeadLetterTable,
}

impl Opened {
    async fn new(pipeline: &LoadedPipeline) -> Result<Opened, DeadLettersError> {
        // A database idemsink has not run on yet simply has no dead letters.
        let pool = pipeline::connect_migrated(pipeline, Duration::ZERO)
            .await
            .map_err(|e| DeadLettersError::Connect(Box::new(e)))?;
        let table =
            DeadLetterTable::open(pipeline.name(), pipeline.dead_letter_table.clone(), &pool)
                .await
                .map_err(|source| DeadLettersError::Database {
                    pipeline: pipeline.name().to_string(),
                    table: pipeline.config.errors.dead_letter_table.clone(),
                    source,
                })?;
        Ok(Opened { pool, table })
    }

    fn error(&self, source: sqlx::Error) -> DeadLettersError {
        DeadLettersError::Database {
            pipeline: self.table.pipeline().to_string(),
            table: self.table.name().to_string(),
            source,
        }
    }
}

/// The pipeline's dead letters that `selection` picks, in record order.
pub async fn list(
    pipeline: &LoadedPipeline,
    selection: &Selection,
) -> Result<Vec<StoredDeadLetter>, DeadLettersError> {
    let opened = Opened::new(pipeline).await?;
    let listed = opened.table.list(&opened.pool, selection).await;
    opened.pool.close().await;
    listed.map_err(|e| opened.error(e))
}

/// A dead letter as `dead-letters list` prints it: a line with its id, record, time and
/// error, then its key and value (text shown as text, bytes as hex, long ones cut).
pub fn describe(letter: &StoredDeadLetter) -> String {
    format!(
        "{:>8}  {}/{}@{}  {}  {}\n          key: {}  value: {}",
        letter.id,
        letter.topic,
        letter.partition,
        letter.offset,
        letter.failed_at,
        letter.error,
        preview(letter.record_key.as_deref()),
        preview(letter.record_value.as_deref()),
    )
}

/// Bytes for a terminal: quoted and escaped text if UTF-8, else hex; at most 200 characters.
fn preview(bytes: Option<&[u8]>) -> String {
    const MAX: usize = 200;
    let Some(bytes) = bytes else {
        return "(null)".to_string();
    };
    let shown = match std::str::from_utf8(bytes) {
        Ok(text) => format!("{text:?}"),
        Err(_) => format!(
            "0x{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    };
    if shown.chars().count() > MAX {
        let cut: String = shown.chars().take(MAX).collect();
        format!("{cut}… ({} bytes)", bytes.len())
    } else {
        shown
    }
}

/// A dead letter sent back to Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    pub letter: StoredDeadLetter,
    pub to_topic: String,
}

/// Produces the selected dead letters again, to `to_topic` or each to its own topic, waits
/// until the broker has them all, then (unless `keep`) removes them from the table. A crash
/// between the two leaves them in the table: re-queuing is at least once.
pub async fn requeue(
    pipeline: &LoadedPipeline,
    selection: &Selection,
    to_topic: Option<&str>,
    keep: bool,
) -> Result<Vec<Requeued>, DeadLettersError> {
    let opened = Opened::new(pipeline).await?;
    let letters = opened
        .table
        .list(&opened.pool, selection)
        .await
        .map_err(|e| opened.error(e))?;
    let requeued = produce(pipeline, letters, to_topic).await?;
    if !keep {
        let ids: Vec<i64> = requeued.iter().map(|r| r.letter.id).collect();
        opened
            .table
            .delete(&opened.pool, &ids)
            .await
            .map_err(|e| opened.error(e))?;
    }
    opened.pool.close().await;
    Ok(requeued)
}

async fn produce(
    pipeline: &LoadedPipeline,
    letters: Vec<StoredDeadLetter>,
    to_topic: Option<&str>,
) -> Result<Vec<Requeued>, DeadLettersError> {
    let name = pipeline.name();
    let kafka = |context: String, delivered, source| DeadLettersError::Kafka {
        pipeline: name.to_string(),
        context,
        delivered,
        source: Box::new(source),
    };
    if letters.is_empty() {
        return Ok(Vec::new());
    }
    let producer: FutureProducer = producer_config(pipeline)
        .create()
        .map_err(|e| kafka("creating a producer".into(), 0, e))?;
    // Every dead letter is checked before the first is sent.
    let mut headers: Vec<Option<OwnedHeaders>> = letters
        .iter()
        .map(|letter| stored_headers(name, letter))
        .collect::<Result<_, _>>()?;
    // The topic each record was delivered to, in order.
    let mut delivered: Vec<String> = Vec::with_capacity(letters.len());
    let context = |id: i64, topic: &str| format!("re-queuing dead letter {id} to {topic}");
    // Queued a chunk at a time (within librdkafka's queue), each chunk then awaited.
    for (chunk, chunk_headers) in letters
        .chunks(REQUEUE_CHUNK)
        .zip(headers.chunks_mut(REQUEUE_CHUNK))
    {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for (letter, headers) in chunk.iter().zip(chunk_headers) {
            let topic = to_topic.unwrap_or(&letter.topic);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(key) = &letter.record_key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &letter.record_value {
                record = record.payload(value.as_slice());
            }
            if let Some(headers) = headers.take() {
                record = record.headers(headers);
            }
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| kafka(context(letter.id, topic), delivered.len(), e))?;
            deliveries.push((letter.id, topic, delivery));
        }
        for (id, topic, delivery) in deliveries {
            let failed = match delivery.await {
                Ok(Ok(_)) => {
                    delivered.push(topic.to_string());
                    continue;
                }
                Ok(Err((e, _))) => e,
                Err(_) => KafkaError::Canceled,
            };
            return Err(kafka(context(id, topic), delivered.len(), failed));
        }
    }
    Ok(letters
        .into_iter()
        .zip(delivered)
        .map(|(letter, to_topic)| Requeued { letter, to_topic })
        .collect())
}

/// Records queued to the producer before waiting for their acknowledgements.
const REQUEUE_CHUNK: usize = 10_000;

/// A dead letter's headers, as Kafka headers again.
fn stored_headers(
    pipeline: &str,
    letter: &StoredDeadLetter,
) -> Result<Option<OwnedHeaders>, DeadLettersError> {
    let Some(json) = &letter.headers else {
        return Ok(None);
    };
    let headers = headers_from_json(json).map_err(|reason| DeadLettersError::Corrupt {
        pipeline: pipeline.to_string(),
        id: letter.id,
        reason,
    })?;
    Ok(Some(headers.iter().fold(
        OwnedHeaders::new(),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: value.as_deref(),
            })
        },
    )))
}

/// The pipeline's own connection settings (TLS, SASL) for a producer that waits for every
/// replica and never writes a record twice.
fn producer_config(pipeline: &LoadedPipeline) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &pipeline.config.source.brokers)
        .set("client.id", format!("idemsink-{}-requeue", pipeline.name()));
    for (key, value) in pipeline.properties() {
        c.set(key, value);
    }
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    c
}
