//! The `offsets` command: shows a pipeline's stored offsets beside Kafka's watermarks, and
//! moves them (`set`, `reset`). Offsets live in the database, so this is how an operator
//! rewinds, skips or inspects lag. Moving offsets under a running instance is refused unless
//! forced; a forced move fences that instance's next commit, after which it reads from the
//! new offset.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::Offset;

use crate::config::LoadedPipeline;
use crate::consumer::client_config;
use crate::error::{ErrorKind, PipelineError};
use crate::offsets::{OffsetStore, TopicPartition};
use crate::pipeline;

/// How long each request to the broker may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("pipeline {pipeline}: kafka: {context}: {source}")]
    Kafka {
        pipeline: String,
        context: String,
        source: Box<KafkaError>,
    },
    #[error("pipeline {pipeline}: database: {source}")]
    Database {
        pipeline: String,
        source: sqlx::Error,
    },
    #[error("{0}")]
    Connect(Box<PipelineError>),
    /// The command cannot do what was asked (an offset below 0, a partition the pipeline
    /// does not read, an instance running it).
    #[error("{0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl OffsetsError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OffsetsError::Kafka { source, .. } => ErrorKind::of_kafka(source),
            OffsetsError::Database { source, .. } => ErrorKind::of_database(source),
            OffsetsError::Connect(e) => e.kind(),
            OffsetsError::Refused(_) => ErrorKind::Configuration,
            OffsetsError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// One partition: the offset stored in the database and Kafka's watermarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub tp: TopicPartition,
    pub stored: Option<i64>,
    /// The log start offset.
    pub low: i64,
    /// The last stable offset: a read_committed reader (idemsink) reads up to here. It stops
    /// short of `high` while a producer transaction is open.
    pub stable: i64,
    /// The end offset (high watermark).
    pub high: i64,
}

impl PartitionOffsets {
    /// Offsets idemsink can read now beyond the stored offset. With no stored offset the
    /// pipeline starts from `start_from`, so the lag is not known.
    pub fn lag(&self) -> Option<i64> {
        self.stored.map(|s| (self.stable - s).max(0))
    }

    /// Offsets no read_committed reader may pass until their producer transactions end.
    pub fn held(&self) -> i64 {
        (self.high - self.stable).max(0)
    }
}

/// The header of `offsets list`'s table.
pub fn table_header() -> String {
    table_line([
        "pipeline",
        "topic/partition",
        "stored",
        "earliest",
        "stable",
        "end",
        "lag",
        "held",
    ])
}

impl PartitionOffsets {
    /// This partition as a line of `offsets list`'s table; `-` where nothing is stored.
    pub fn table_row(&self, pipeline: &str) -> String {
        let or_dash = |n: Option<i64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
        table_line([
            pipeline,
            &self.tp.to_string(),
            &or_dash(self.stored),
            &self.low.to_string(),
            &self.stable.to_string(),
            &self.high.to_string(),
            &or_dash(self.lag()),
            &self.held().to_string(),
        ])
    }
}

/// What `offsets list` prints under its table when a partition is held by an open transaction.
pub fn held_note(listed: &[PartitionOffsets]) -> Option<String> {
    let held: Vec<String> = listed
        .iter()
        .filter(|o| o.held() > 0)
        .map(|o| o.tp.to_string())
        .collect();
    (!held.is_empty()).then(|| {
        format!(
            "held: {} have an open producer transaction at their stable offset; idemsink reads \
             read_committed, so nothing after it is written until that transaction commits or aborts \
             (the broker aborts it after the producer's transaction.timeout.ms)",
            held.join(", ")
        )
    })
}

fn table_line(cells: [&str; 8]) -> String {
    let [pipeline, tp, stored, low, stable, high, lag, held] = cells;
    format!("{pipeline:<24} {tp:<32} {stored:>12} {low:>12} {stable:>12} {high:>12} {lag:>10} {held:>8}")
}

/// A move of one partition's stored offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub tp: TopicPartition,
    pub before: Option<i64>,
    pub after: i64,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.before {
            Some(before) => write!(f, "{}: {before} -> {}", self.tp, self.after),
            None => write!(f, "{}: (none) -> {}", self.tp, self.after),
        }
    }
}

/// Where `reset` moves offsets to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first offset Kafka still has.
    Earliest,
    /// The end: everything in Kafka now is skipped.
    Latest,
    /// The first record at or after this time (milliseconds since the epoch).
    Time(i64),
}

impl std::str::FromStr for ResetTo {
    type Err = String;

    fn from_str(s: &str) -> Result<ResetTo, String> {
        match s {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            _ => chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| ResetTo::Time(t.timestamp_millis()))
                .or_else(|_| s.parse::<i64>().map(ResetTo::Time))
                .map_err(|_| {
                    format!(
                        "{s:?} is not earliest, latest, an RFC 3339 time (2026-11-23T10:00:00Z) \
                         or milliseconds since the epoch"
                    )
                }),
        }
    }
}

/// A pipeline's Kafka side for this command: metadata, watermarks and the group.
struct Kafka<'a> {
    pipeline: &'a LoadedPipeline,
    /// Reads as the pipeline does (read_committed): its end offsets are the stable offsets.
    consumer: BaseConsumer,
    /// Reads uncommitted: its end offsets are the high watermarks.
    uncommitted: BaseConsumer,
}

impl<'a> Kafka<'a> {
    fn connect(pipeline: &'a LoadedPipeline) -> Result<Kafka<'a>, OffsetsError> {
        // The pipeline's own settings (TLS, SASL); these clients never join the group.
        let consumer = client_config(pipeline)
            .create()
            .map_err(|e| Self::error(pipeline, "creating a client", e))?;
        let uncommitted = client_config(pipeline)
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(|e| Self::error(pipeline, "creating a client", e))?;
        Ok(Kafka {
            pipeline,
            consumer,
            uncommitted,
        })
    }

    fn error(
        pipeline: &LoadedPipeline,
        context: impl Into<String>,
        source: KafkaError,
    ) -> OffsetsError {
        OffsetsError::Kafka {
            pipeline: pipeline.name().to_string(),
            context: context.into(),
            source: Box::new(source),
        }
    }

    fn partitions(&self) -> Result<Vec<TopicPartition>, OffsetsError> {
        let mut all = Vec::new();
        for topic in &self.pipeline.config.source.topics {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
                .map_err(|e| Self::error(self.pipeline, format!("reading topic {topic}"), e))?;
            for t in metadata.topics() {
                all.extend(t.partitions().iter().map(|part| TopicPartition {
                    topic: t.name().to_string(),
                    partition: part.id(),
                }));
            }
        }
        all.sort();
        Ok(all)
    }

    /// The log start offset and the last stable offset: the range the pipeline reads.
    fn watermarks(&self, tp: &TopicPartition) -> Result<(i64, i64), OffsetsError> {
        self.consumer
            .fetch_watermarks(&tp.topic, tp.partition, KAFKA_TIMEOUT)
            .map_err(|e| Self::error(self.pipeline, format!("reading the watermarks of {tp}"), e))
    }

    /// The high watermark, past open transactions.
    fn high_watermark(&self, tp: &TopicPartition) -> Result<i64, OffsetsError> {
        self.uncommitted
            .fetch_watermarks(&tp.topic, tp.partition, KAFKA_TIMEOUT)
            .map(|(_, high)| high)
            .map_err(|e| Self::error(self.pipeline, format!("reading the end offset of {tp}"), e))
    }

    /// Members of the pipeline's consumer group: running instances.
    fn active_members(&self) -> Result<usize, OffsetsError> {
        let group = self.pipeline.group_id();
        let groups = self
            .consumer
            .fetch_group_list(Some(&group), KAFKA_TIMEOUT)
            .map_err(|e| Self::error(self.pipeline, format!("describing group {group}"), e))?;
        Ok(groups.groups().iter().map(|g| g.members().len()).sum())
    }

    /// The first offset at or after `ms` in each partition; the end where there is none.
    fn offsets_for_time(
        &self,
        partitions: &[TopicPartition],
        ms: i64,
    ) -> Result<HashMap<TopicPartition, i64>, OffsetsError> {
        let mut tpl = TopicPartitionList::new();
        for tp in partitions {
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(ms))
                .map_err(|e| Self::error(self.pipeline, "building the request", e))?;
        }
        let found = self
            .consumer
            .offsets_for_times(tpl, KAFKA_TIMEOUT)
            .map_err(|e| Self::error(self.pipeline, "looking offsets up by time", e))?;
        let mut offsets = HashMap::new();
        for e in found.elements() {
            let tp = TopicPartition {
                topic: e.topic().to_string(),
                partition: e.partition(),
            };
            let offset = match e.offset() {
                Offset::Offset(n) => n,
                _ => self.watermarks(&tp)?.1,
            };
            offsets.insert(tp, offset);
        }
        Ok(offsets)
    }
}

/// Every partition of the pipeline's topics, with its stored offset and watermarks.
pub async fn list(pipeline: &LoadedPipeline) -> Result<Vec<PartitionOffsets>, OffsetsError> {
    let stored = store(pipeline).await?.list().await.map_err(db(pipeline))?;
    let pipeline = pipeline.clone();
    blocking(move || {
        let kafka = Kafka::connect(&pipeline)?;
        kafka
            .partitions()?
            .into_iter()
            .map(|tp| {
                let (low, stable) = kafka.watermarks(&tp)?;
                let high = kafka.high_watermark(&tp)?;
                let stored = stored.get(&tp).copied();
                Ok(PartitionOffsets {
                    tp,
                    stored,
                    low,
                    stable,
                    high,
                })
            })
            .collect()
    })
    .await
}

/// Stores `offset` for one partition.
pub async fn set(
    pipeline: &LoadedPipeline,
    tp: TopicPartition,
    offset: i64,
    force: bool,
) -> Result<Vec<Change>, OffsetsError> {
    if offset < 0 {
        return Err(OffsetsError::Refused(format!(
            "offset {offset}: offsets are 0 or more"
        )));
    }
    let owned = pipeline.clone();
    let wanted = tp.clone();
    let plan = blocking(move || {
        let kafka = Kafka::connect(&owned)?;
        refuse_if_running(&kafka, force)?;
        if !kafka.partitions()?.contains(&wanted) {
            return Err(OffsetsError::Refused(format!(
                "pipeline {}: {wanted} is not a partition of its topics ({})",
                owned.name(),
                owned.config.source.topics.join(", ")
            )));
        }
        Ok(vec![(wanted, offset)])
    })
    .await?;
    apply(pipeline, plan).await
}

/// Moves the stored offsets of every partition (of `topic` only, if given) to `to`.
pub async fn reset(
    pipeline: &LoadedPipeline,
    to: ResetTo,
    topic: Option<String>,
    force: bool,
) -> Result<Vec<Change>, OffsetsError> {
    let owned = pipeline.clone();
    let plan = blocking(move || {
        let kafka = Kafka::connect(&owned)?;
        refuse_if_running(&kafka, force)?;
        let mut partitions = kafka.partitions()?;
        if let Some(topic) = &topic {
            partitions.retain(|tp| &tp.topic == topic);
            if partitions.is_empty() {
                return Err(OffsetsError::Refused(format!(
                    "pipeline {} does not read topic {topic}",
                    owned.name()
                )));
            }
        }
        let by_time = match to {
            ResetTo::Time(ms) => kafka.offsets_for_time(&partitions, ms)?,
            _ => HashMap::new(),
        };
        partitions
            .into_iter()
            .map(|tp| {
                let offset = match to {
                    ResetTo::Earliest => kafka.watermarks(&tp)?.0,
                    ResetTo::Latest => kafka.watermarks(&tp)?.1,
                    ResetTo::Time(_) => match by_time.get(&tp) {
                        Some(n) => *n,
                        None => kafka.watermarks(&tp)?.1,
                    },
                };
                Ok((tp, offset))
            })
            .collect()
    })
    .await?;
    apply(pipeline, plan).await
}

fn refuse_if_running(kafka: &Kafka<'_>, force: bool) -> Result<(), OffsetsError> {
    let members = kafka.active_members()?;
    if members > 0 && !force {
        return Err(OffsetsError::Refused(format!(
            "pipeline {}: group {} has {members} active member(s), so an instance is running it; \
             stop it first, or pass --force (a running instance is fenced on its next commit and \
             then reads from the new offsets)",
            kafka.pipeline.name(),
            kafka.pipeline.group_id()
        )));
    }
    Ok(())
}

/// Writes `plan` in one transaction and returns what changed.
async fn apply(
    pipeline: &LoadedPipeline,
    plan: Vec<(TopicPartition, i64)>,
) -> Result<Vec<Change>, OffsetsError> {
    let store = store(pipeline).await?;
    let before = store.list().await.map_err(db(pipeline))?;
    store.overwrite(&plan).await.map_err(db(pipeline))?;
    Ok(plan
        .into_iter()
        .map(|(tp, after)| Change {
            before: before.get(&tp).copied(),
            tp,
            after,
        })
        .collect())
}

async fn store(pipeline: &LoadedPipeline) -> Result<OffsetStore, OffsetsError> {
    let pool = pipeline::connect_migrated(pipeline, Duration::ZERO)
        .await
        .map_err(|e| OffsetsError::Connect(Box::new(e)))?;
    Ok(OffsetStore::new(pipeline.name(), pool))
}

fn db(pipeline: &LoadedPipeline) -> impl Fn(sqlx::Error) -> OffsetsError + '_ {
    |source| OffsetsError::Database {
        pipeline: pipeline.name().to_string(),
        source,
    }
}

/// librdkafka's metadata calls block: run them off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OffsetsError> + Send + 'static,
) -> Result<T, OffsetsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OffsetsError::Internal(format!("the Kafka request failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse_from_names_times_and_epoch_milliseconds() {
        assert_eq!("earliest".parse(), Ok(ResetTo::Earliest));
        assert_eq!("latest".parse(), Ok(ResetTo::Latest));
        assert_eq!(
            "2026-11-23T10:00:00Z".parse(),
            Ok(ResetTo::Time(1_795_428_000_000))
        );
        assert_eq!(
            "2026-11-23T11:00:00+01:00".parse(),
            Ok(ResetTo::Time(1_795_428_000_000))
        );
        assert_eq!(
            "1795428000000".parse(),
            Ok(ResetTo::Time(1_795_428_000_000))
        );
        let wrong = "yesterday".parse::<ResetTo>().unwrap_err();
        assert!(wrong.contains("RFC 3339"), "{wrong}");
    }

    #[test]
    fn lag_is_what_kafka_has_beyond_the_stored_offset() {
        let tp = TopicPartition {
            topic: "t".into(),
            partition: 0,
        };
        let at = |stored| PartitionOffsets {
            tp: tp.clone(),
            stored,
            low: 5,
            stable: 100,
            high: 130,
        };
        assert_eq!(at(Some(40)).lag(), Some(60), "up to the stable offset");
        assert_eq!(at(Some(100)).lag(), Some(0));
        assert_eq!(at(Some(120)).lag(), Some(0), "never negative");
        assert_eq!(at(None).lag(), None);
        assert_eq!(at(Some(100)).held(), 30, "behind an open transaction");
        let note = held_note(&[at(Some(100))]).expect("a note");
        assert!(
            note.contains("t/0") && note.contains("open producer transaction"),
            "{note}"
        );
        let caught_up = PartitionOffsets {
            high: 100,
            ..at(Some(100))
        };
        assert_eq!(held_note(&[caught_up]), None);
    }
}
