//! What a pipeline file may say: the serde model of one YAML file, with its defaults.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

use crate::routing::TableFromTopic;

/// The librdkafka property whose value idemsink applies itself (see [`OffsetReset`]).
pub const AUTO_OFFSET_RESET: &str = "auto.offset.reset";

/// At most how many writers a pipeline has (`sink.writers`): each holds a connection.
pub const MAX_WRITERS: usize = 16;
/// One pipeline, as read from one YAML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub pipeline: String,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub errors: ErrorsConfig,
}

/// What to do when things go wrong.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorsConfig {
    /// How long a database operation is retried through transient faults (unreachable,
    /// connection dropped, deadlock, serialization failure) before the pipeline stops.
    #[serde(default = "default_retry_for_ms", deserialize_with = "scalar")]
    pub retry_for_ms: u64,
    /// What a record that cannot become a row does: stop the pipeline, or go to the
    /// dead-letter table.
    #[serde(default)]
    pub tolerance: Tolerance,
    /// Where dead letters go (`tolerance: all`); created like `idemsink_dead_letters` if missing.
    #[serde(default = "default_dead_letter_table")]
    pub dead_letter_table: String,
}

fn default_retry_for_ms() -> u64 {
    300_000
}

/// The table the migrations create for dead letters.
pub const DEFAULT_DEAD_LETTER_TABLE: &str = "idemsink_dead_letters";

fn default_dead_letter_table() -> String {
    DEFAULT_DEAD_LETTER_TABLE.to_string()
}

impl Default for ErrorsConfig {
    fn default() -> Self {
        ErrorsConfig {
            retry_for_ms: default_retry_for_ms(),
            tolerance: Tolerance::default(),
            dead_letter_table: default_dead_letter_table(),
        }
    }
}

/// `errors.tolerance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tolerance {
    /// Stop at the first bad record, naming it; nothing from it on is committed.
    #[default]
    None,
    /// Write bad records to the dead-letter table, in the batch's transaction, and go on.
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: Option<String>,
    #[serde(default)]
    pub start_from: StartFrom,
    #[serde(default)]
    pub properties: BTreeMap<String, Value>,
}

/// What happens when the offset a partition resumes from is no longer in Kafka (retention
/// deleted records before they were written, or the topic was re-created): the value of
/// `source.properties.auto.offset.reset`. idemsink applies it itself and always tells
/// librdkafka `error`, so that every skip is logged with its offsets and counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OffsetReset {
    /// Stop the pipeline, naming the partition and both offsets (the default).
    #[default]
    Stop,
    /// Go on from the first offset Kafka has.
    Earliest,
    /// Go on from the end.
    Latest,
}

impl OffsetReset {
    /// librdkafka's spellings of `auto.offset.reset`.
    pub(super) fn parse(value: &str) -> Option<OffsetReset> {
        match value {
            "error" => Some(OffsetReset::Stop),
            "earliest" | "smallest" | "beginning" => Some(OffsetReset::Earliest),
            "latest" | "largest" | "end" => Some(OffsetReset::Latest),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub url: String,
    /// The table every topic's rows go to (or see `tables` and `table_from_topic`).
    #[serde(default)]
    pub table: Option<String>,
    /// A table per topic: topic → table. Explicit entries win over `table_from_topic`.
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// A table per topic, from the topic's name (Debezium's `prefix.schema.table` topics).
    #[serde(default)]
    pub table_from_topic: Option<TableFromTopic>,
    /// What a record value is: a JSON document the columns point into, or a Debezium change
    /// event whose row image they point into.
    #[serde(default)]
    pub format: RecordFormat,
    #[serde(default)]
    pub mode: SinkMode,
    /// The business key: columns of a unique key of the table, the conflict target. Empty:
    /// the columns mapped from the Kafka coordinates are.
    #[serde(default)]
    pub key: Vec<String>,
    /// A column whose greater value marks the newer version of a row (mode upsert).
    #[serde(default)]
    pub newer_by: Option<String>,
    /// A record with a null value (a tombstone) deletes the row with its key.
    #[serde(default, deserialize_with = "scalar")]
    pub delete_on_null: bool,
    /// Target column → source. `columns: auto`, or an entry `"*": auto` beside others: every
    /// other column of the table reads the field of its own name.
    #[serde(deserialize_with = "columns_or_auto")]
    pub columns: BTreeMap<String, String>,
    /// How long one statement waits for a lock another session holds (PostgreSQL's
    /// `lock_timeout`, InnoDB's `innodb_lock_wait_timeout`) before the batch is retried.
    #[serde(default = "default_lock_timeout_ms", deserialize_with = "scalar")]
    pub lock_timeout_ms: u64,
    /// How long the database lets one of idemsink's sessions stay idle inside a transaction
    /// before it ends the session (PostgreSQL's `idle_in_transaction_session_timeout`,
    /// MySQL's `wait_timeout`): a frozen instance's locks are released after this long.
    #[serde(
        default = "default_idle_in_transaction_timeout_ms",
        deserialize_with = "scalar"
    )]
    pub idle_in_transaction_timeout_ms: u64,
    /// What a Debezium truncate event (op t) does.
    #[serde(default)]
    pub truncate: OnTruncate,
    /// The connector's `unavailable.value.placeholder`, when it is not Debezium's default:
    /// a field holding it keeps the row's value (an unchanged TOASTed column).
    #[serde(default)]
    pub unavailable_value_placeholder: Option<String>,
    /// The connector's `binary.handling.mode`, which its schemas do not say: `bytes` (the
    /// default), `base64`, `base64-url-safe` or `hex`.
    #[serde(default)]
    pub binary_handling_mode: Option<crate::debezium::BinaryMode>,
    /// How many transactions write at once, each over its own share of the partitions (a
    /// partition is always written by the same one), so the database is never idle while a
    /// batch commits.
    #[serde(default = "default_writers", deserialize_with = "scalar")]
    pub writers: usize,
}

impl SinkConfig {
    /// Whether records delete rows: tombstones with `delete_on_null`, and Debezium's deletes.
    pub fn deletes(&self) -> bool {
        self.delete_on_null || self.format.is_debezium()
    }
}

fn default_writers() -> usize {
    2
}

fn default_lock_timeout_ms() -> u64 {
    10_000
}

fn default_idle_in_transaction_timeout_ms() -> u64 {
    60_000
}

/// `sink.truncate`: what a Debezium truncate event (op `t`) does to the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTruncate {
    /// A bad record: the pipeline stops naming it (or it is a dead letter).
    #[default]
    Refuse,
    /// In the batch's transaction, delete every row of the table the truncate is newer than
    /// (by the same guard as a delete).
    Apply,
    /// Change nothing; its offset is committed, and it is logged and counted.
    Ignore,
}

/// What a record value is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// A JSON document: `/pointer` columns read it.
    #[default]
    Json,
    /// A Debezium change event (JsonConverter, with or without schemas): `op` says what it does,
    /// `/pointer` columns read the row image (`after`), key columns read the record key, and
    /// the tombstone after a delete does nothing.
    Debezium,
    /// A Debezium change event flattened by its ExtractNewRecordState transform: the value is
    /// the row; a tombstone, `__deleted: "true"` or `__op: "d"` deletes it by the record key.
    #[serde(rename = "debezium_flattened")]
    DebeziumFlattened,
}

impl RecordFormat {
    /// Whether records are Debezium's change events, in either form.
    pub fn is_debezium(self) -> bool {
        matches!(
            self,
            RecordFormat::Debezium | RecordFormat::DebeziumFlattened
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkMode {
    /// `INSERT … ON CONFLICT (<key>) DO NOTHING`: the first write of a key wins.
    #[default]
    Insert,
    /// `INSERT … ON CONFLICT (<key>) DO UPDATE`: the newest version of a key wins.
    Upsert,
}

impl fmt::Display for SinkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SinkMode::Insert => "insert",
            SinkMode::Upsert => "upsert",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_max_records", deserialize_with = "scalar")]
    pub max_records: usize,
    #[serde(default = "default_max_wait_ms", deserialize_with = "scalar")]
    pub max_wait_ms: u64,
    /// A batch is also written once its records hold this many bytes: with large records,
    /// memory is bounded by bytes, not by a count.
    #[serde(default = "default_max_bytes", deserialize_with = "scalar")]
    pub max_bytes: usize,
}

/// A number or boolean as YAML types it, or as text: environment overrides are always text
/// (they are not re-typed, so that a string such as a group id `007` stays what it was).
/// The key of `sink.columns` that stands for every column not listed.
pub const EVERY_OTHER_COLUMN: &str = "*";

/// `sink.columns`: a map, or the word `auto` for `{"*": auto}`.
fn columns_or_auto<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Columns {
        Map(BTreeMap<String, String>),
        Word(String),
    }
    match Columns::deserialize(deserializer) {
        Ok(Columns::Map(map)) => Ok(map),
        Ok(Columns::Word(word)) if word.trim() == "auto" => {
            Ok(BTreeMap::from([(EVERY_OTHER_COLUMN.into(), "auto".into())]))
        }
        _ => Err(serde::de::Error::custom(
            "expected a map of column: source, or `auto`",
        )),
    }
}

fn scalar<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Typed<T> {
        Value(T),
        Text(String),
    }
    match Typed::<T>::deserialize(deserializer) {
        Ok(Typed::Value(value)) => Ok(value),
        Ok(Typed::Text(text)) => text.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "expected a {}, got {text:?}",
                std::any::type_name::<T>()
            ))
        }),
        Err(_) => Err(serde::de::Error::custom(format!(
            "expected a {}",
            std::any::type_name::<T>()
        ))),
    }
}

fn default_max_records() -> usize {
    5000
}

fn default_max_wait_ms() -> u64 {
    100
}

/// 16 MB: 5,000 records of up to about 3 kB fill a batch by count; larger ones by bytes.
fn default_max_bytes() -> usize {
    16 << 20
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

/// A property's value as librdkafka takes it: strings as they are, numbers and booleans as written.
pub(super) fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
