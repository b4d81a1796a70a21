//! Pipeline configuration: the YAML files in `connectors/`, environment overrides and
//! `${VAR}` interpolation, and the static checks that need no database.
//!
//! Loading goes file → `config` crate (YAML + `IDEMSINK_*` overrides) → JSON tree →
//! `${VAR}` interpolation → typed structs through `serde_path_to_error`, so every error
//! names the file and the key it comes from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::mapping::Source;
use crate::routing::{Routes, TableFromTopic};

/// librdkafka properties that carry the exactly-once guarantee or that have their own key.
const REFUSED_PROPERTIES: &[(&str, &str)] = &[
    (
        "isolation.level",
        "idemsink always reads with isolation.level=read_committed",
    ),
    (
        "enable.auto.commit",
        "offsets are committed in the database, never by the consumer",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored in the database, never by the consumer",
    ),
    ("group.id", "use source.group_id"),
    ("bootstrap.servers", "use source.brokers"),
    ("metadata.broker.list", "use source.brokers"),
];

/// librdkafka properties the broker decides under the consumer group protocol (KIP-848).
const CLASSIC_GROUP_PROPERTIES: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "group.protocol.type",
];

/// The librdkafka property whose value idemsink applies itself (see [`OffsetReset`]).
pub const AUTO_OFFSET_RESET: &str = "auto.offset.reset";

/// Top-level keys that `IDEMSINK_<KEY>__…` environment variables may override.
/// At most how many writers a pipeline has (`sink.writers`): each holds a connection.
pub const MAX_WRITERS: usize = 16;

const OVERRIDABLE_SECTIONS: &[&str] = &["PIPELINE", "SOURCE__", "SINK__", "BATCH__", "ERRORS__"];

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
    fn parse(value: &str) -> Option<OffsetReset> {
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

/// A problem in a configuration file, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the key (`sink.columns.customer`); empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A list of configuration problems, reported together.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// A pipeline file that parsed and passed the static checks.
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub file: PathBuf,
    pub config: PipelineConfig,
    /// `sink.columns` with each source parsed, in column-name order (without `*`).
    pub columns: Vec<(String, Source)>,
    /// `columns: auto` (or `"*": auto`): the table's other columns read the fields of their
    /// names, once the table is known ([`crate::writer::SinkPlan::prepare`]).
    pub auto_columns: bool,
    /// The table of each topic.
    pub routes: Routes,
}

impl LoadedPipeline {
    pub fn group_id(&self) -> String {
        self.config
            .source
            .group_id
            .clone()
            .unwrap_or_else(|| format!("idemsink-{}", self.config.pipeline))
    }

    /// `source.properties.auto.offset.reset`, checked when the file was loaded.
    pub fn offset_reset(&self) -> OffsetReset {
        self.config
            .source
            .properties
            .get(AUTO_OFFSET_RESET)
            .and_then(|v| OffsetReset::parse(&scalar_text(v)))
            .unwrap_or_default()
    }

    /// librdkafka properties from `source.properties`, as strings.
    pub fn properties(&self) -> BTreeMap<String, String> {
        self.config
            .source
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), scalar_text(v)))
            .collect()
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// The pipeline files named by `path`: the file itself, or every `*.yaml`/`*.yml` in a directory.
pub fn pipeline_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let err = |message: String| ConfigError {
        file: path.to_path_buf(),
        key: String::new(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| err(format!("cannot list: {e}")))? {
        let file = entry.map_err(|e| err(format!("cannot list: {e}")))?.path();
        let is_yaml = matches!(
            file.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if is_yaml && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(err("no *.yaml pipeline files in this directory".into()));
    }
    Ok(files)
}

/// Loads every pipeline under `path`, reporting all problems of all files at once.
pub fn load_all(path: &Path) -> Result<Vec<LoadedPipeline>, ConfigErrors> {
    let files = pipeline_files(path).map_err(|e| ConfigErrors(vec![e]))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match load_file(&file, &env) {
            Ok(p) => loaded.push(p),
            Err(mut e) => errors.append(&mut e),
        }
    }
    let mut seen = BTreeMap::new();
    for p in &loaded {
        if let Some(first) = seen.insert(p.config.pipeline.clone(), p.file.clone()) {
            errors.push(p.error(
                "pipeline",
                format!(
                    "`{}` is also the name of {}; names must be unique",
                    p.config.pipeline,
                    first.display()
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Loads one file with the given environment (passed in so tests need not touch the process's).
pub fn load_file(
    file: &Path,
    env: &[(String, String)],
) -> Result<LoadedPipeline, Vec<ConfigError>> {
    let err = |key: &str, message: String| {
        vec![ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            message,
        }]
    };
    let text = std::fs::read_to_string(file).map_err(|e| err("", format!("cannot read: {e}")))?;
    let overrides: config::Map<String, String> = env
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("IDEMSINK_")?;
            OVERRIDABLE_SECTIONS
                .iter()
                .any(|s| rest.starts_with(s))
                .then(|| (k.clone(), v.clone()))
        })
        .collect();
    let tree: Value = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Yaml))
        .add_source(
            config::Environment::with_prefix("IDEMSINK")
                .prefix_separator("_")
                .separator("__")
                // Strings stay strings (`007`, `1e5`); typed keys parse their text (`scalar`).
                .try_parsing(false)
                .list_separator(",")
                .with_list_parse_key("source.topics")
                .source(Some(overrides)),
        )
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| err("", format!("not a valid pipeline file: {e}")))?;
    let tree = interpolate(tree, "", env).map_err(|(key, message)| err(&key, message))?;
    let config: PipelineConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        err(&key, e.into_inner().to_string())
    })?;
    check(file, config)
}

/// Replaces `${NAME}` (or `${NAME:-default}`) in every string of the tree.
fn interpolate(
    value: Value,
    key: &str,
    env: &[(String, String)],
) -> Result<Value, (String, String)> {
    let child = |k: &str| {
        if key.is_empty() {
            k.to_string()
        } else {
            format!("{key}.{k}")
        }
    };
    Ok(match value {
        Value::String(s) => {
            Value::String(interpolate_str(&s, env).map_err(|m| (key.to_string(), m))?)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| interpolate(v, &child(&i.to_string()), env))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| interpolate(v, &child(&k), env).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        ),
        other => other,
    })
}

fn interpolate_str(s: &str, env: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` in value".to_string())?;
        let (name, default) = match after[..end].split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (&after[..end], None),
        };
        let found = env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        match found.or(default) {
            Some(v) => out.push_str(v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Problems found by a check: (config key, message) pairs.
type Problems = Vec<(String, String)>;

fn problem(problems: &mut Problems, key: &str, message: impl Into<String>) {
    problems.push((key.to_string(), message.into()));
}

/// The checks that need no database, section by section.
fn check(file: &Path, config: PipelineConfig) -> Result<LoadedPipeline, Vec<ConfigError>> {
    let mut problems = Problems::new();
    check_name(&config.pipeline, &mut problems);
    check_source(&config.source, &mut problems);
    let sink = &config.sink;
    if crate::db::Backend::of_url(&sink.url).is_none() {
        problem(
            &mut problems,
            "sink.url",
            "must be a postgres://, postgresql://, mysql:// or mariadb:// URL",
        );
    }
    let routes = Routes::resolve(
        &config.source.topics,
        sink.table.as_deref(),
        &sink.tables,
        sink.table_from_topic.as_ref(),
    )
    .map_err(|mut found| problems.append(&mut found))
    .ok();
    let columns = check_columns(sink, &mut problems);
    // Kafka positions compare within a topic: what matters is how many topics share a table.
    let topics_per_table = routes
        .as_ref()
        .map_or(config.source.topics.len(), Routes::most_topics_per_table);
    for (key, message) in check_conflict_rules(sink, &columns, topics_per_table) {
        problem(&mut problems, key, message);
    }
    check_limits(&config, &mut problems);
    check_dead_letter_table(&config.errors, routes.as_ref(), &mut problems);
    match routes {
        Some(routes) if problems.is_empty() => Ok(LoadedPipeline {
            file: file.to_path_buf(),
            auto_columns: sink.columns.contains_key(EVERY_OTHER_COLUMN),
            config,
            columns,
            routes,
        }),
        _ => Err(problems
            .into_iter()
            .map(|(key, message)| ConfigError {
                file: file.to_path_buf(),
                key,
                message,
            })
            .collect()),
    }
}

/// `pipeline`: it names the pipeline's rows in `idemsink_offsets`.
fn check_name(name: &str, problems: &mut Problems) {
    let valid = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
    if !valid {
        problem(
            problems,
            "pipeline",
            format!("`{name}` must be 1 to 100 characters of [a-z0-9_]"),
        );
    }
}

/// `source`: brokers, topic names, the group, and the librdkafka properties idemsink leaves
/// to the user.
fn check_source(source: &SourceConfig, problems: &mut Problems) {
    if source.brokers.trim().is_empty() {
        problem(
            problems,
            "source.brokers",
            "must list at least one broker (host:port)",
        );
    }
    if source.topics.is_empty() {
        problem(problems, "source.topics", "must list at least one topic");
    }
    for (i, topic) in source.topics.iter().enumerate() {
        let valid = !topic.is_empty()
            && topic.len() <= 249
            && topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !valid {
            problem(
                problems,
                &format!("source.topics.{i}"),
                format!("`{topic}` is not a valid Kafka topic name"),
            );
        }
    }
    if source
        .group_id
        .as_deref()
        .is_some_and(|g| g.trim().is_empty())
    {
        problem(problems, "source.group_id", "must not be empty");
    }
    let consumer_protocol = source
        .properties
        .get("group.protocol")
        .is_some_and(|v| scalar_text(v) == "consumer");
    for (key, value) in &source.properties {
        let key_path = format!("source.properties.{key}");
        if let Some((_, why)) = REFUSED_PROPERTIES.iter().find(|(k, _)| k == key) {
            problem(problems, &key_path, format!("may not be set: {why}"));
        } else if key == AUTO_OFFSET_RESET && OffsetReset::parse(&scalar_text(value)).is_none() {
            problem(
                problems,
                &key_path,
                "must be error (stop, the default), earliest or latest",
            );
        } else if consumer_protocol && CLASSIC_GROUP_PROPERTIES.contains(&key.as_str()) {
            problem(
                problems,
                &key_path,
                "is the broker's to decide with group.protocol: consumer (KIP-848): set \
                 group.consumer.session.timeout.ms and group.consumer.heartbeat.interval.ms on the \
                 broker or on the group, and group.remote.assignor here",
            );
        } else if value.is_object() || value.is_array() || value.is_null() {
            problem(problems, &key_path, "must be a string, number or boolean");
        }
    }
}

/// `sink.columns`, each source parsed (without `*: auto`), in column-name order.
fn check_columns(sink: &SinkConfig, problems: &mut Problems) -> Vec<(String, Source)> {
    if sink.columns.is_empty() {
        problem(problems, "sink.columns", "must map at least one column");
    }
    let mut columns = Vec::new();
    for (column, spec) in &sink.columns {
        let key = format!("sink.columns.{column}");
        if column == EVERY_OTHER_COLUMN {
            if spec.trim() != "auto" {
                problem(
                    problems,
                    &key,
                    format!("`{spec}`: `*` takes `auto` (every other column reads the field of its name)"),
                );
            }
            continue;
        }
        if let Err(e) = crate::schema::check_identifier(column) {
            problem(problems, &key, e);
        }
        match Source::parse(spec) {
            Ok(source) => columns.push((column.clone(), source)),
            Err(e) => problem(problems, &key, e),
        }
    }
    for coordinate in [Source::Topic, Source::Partition, Source::Offset] {
        let mapped: Vec<&str> = columns
            .iter()
            .filter(|(_, s)| *s == coordinate)
            .map(|(c, _)| c.as_str())
            .collect();
        if mapped.len() > 1 {
            problem(
                problems,
                "sink.columns",
                format!(
                    "{coordinate} is mapped to several columns ({}); map it once",
                    mapped.join(", ")
                ),
            );
        }
    }
    columns
}

/// The numeric bounds: batch sizes and waits, writers, timeouts and the retry bound.
fn check_limits(config: &PipelineConfig, problems: &mut Problems) {
    let (batch, sink) = (&config.batch, &config.sink);
    let mut within = |key: &str, value: u64, range: std::ops::RangeInclusive<u64>, shown: &str| {
        if !range.contains(&value) {
            problem(problems, key, format!("{value} is out of range {shown}"));
        }
    };
    within(
        "batch.max_records",
        batch.max_records as u64,
        1..=1_000_000,
        "1..=1000000",
    );
    within(
        "batch.max_bytes",
        batch.max_bytes as u64,
        1 << 10..=1 << 40,
        "1024..=1099511627776",
    );
    within(
        "sink.writers",
        sink.writers as u64,
        1..=MAX_WRITERS as u64,
        &format!("1..={MAX_WRITERS}"),
    );
    within(
        "batch.max_wait_ms",
        batch.max_wait_ms,
        1..=600_000,
        "1..=600000",
    );
    // MySQL counts these in whole seconds.
    within(
        "sink.lock_timeout_ms",
        sink.lock_timeout_ms,
        1_000..=86_400_000,
        "1000..=86400000",
    );
    within(
        "sink.idle_in_transaction_timeout_ms",
        sink.idle_in_transaction_timeout_ms,
        1_000..=86_400_000,
        "1000..=86400000",
    );
    within(
        "errors.retry_for_ms",
        config.errors.retry_for_ms,
        0..=86_400_000,
        "0..=86400000 (a day)",
    );
}

/// `errors.dead_letter_table`: a valid name, and none of the sink tables.
fn check_dead_letter_table(
    errors: &ErrorsConfig,
    routes: Option<&Routes>,
    problems: &mut Problems,
) {
    let dead_letters = &errors.dead_letter_table;
    match crate::schema::TableName::parse(dead_letters) {
        Err(e) => problem(problems, "errors.dead_letter_table", e),
        Ok(t) if routes.iter().flat_map(|r| &r.tables).any(|r| r.table == t) => problem(
            problems,
            "errors.dead_letter_table",
            format!("{dead_letters} is a sink table; dead letters need a table of their own"),
        ),
        Ok(_) => {}
    }
}

/// The checks on `mode`, `key`, `newer_by`, `delete_on_null`, `format` and `truncate` that
/// need no database: (config key, problem) pairs.
fn check_conflict_rules(
    sink: &SinkConfig,
    columns: &[(String, Source)],
    topics_per_table: usize,
) -> Vec<(&'static str, String)> {
    let mut problems = check_key_rules(sink, columns);
    if sink.key.is_empty() {
        problems.extend(check_keyless_rules(sink, columns, topics_per_table));
    }
    problems.extend(check_format_rules(sink, columns));
    problems.extend(check_version_rules(sink, columns));
    problems
}

/// `sink.key`: each column mapped (from the record key where tombstones delete), once.
fn check_key_rules(sink: &SinkConfig, columns: &[(String, Source)]) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let source_of = |name: &str| columns.iter().find(|(c, _)| c == name).map(|(_, s)| s);
    // With `columns: auto`, a column not listed is the table's to know of.
    let auto = sink.columns.contains_key(EVERY_OTHER_COLUMN);
    let mut seen = Vec::new();
    for name in &sink.key {
        match source_of(name) {
            None if auto && sink.delete_on_null => problems.push((
                "sink.key",
                format!(
                    "`{name}` is not listed in sink.columns, so `auto` would read it from the \
                     record value, but with delete_on_null the key columns must come from the \
                     record key: list it ({name}: $key/…)"
                ),
            )),
            None if auto => {}
            None => problems.push((
                "sink.key",
                format!("`{name}` is not mapped in sink.columns: every key column needs a value"),
            )),
            Some(source) if sink.delete_on_null && !matches!(source, Source::Key | Source::KeyPointer(_)) => {
                problems.push((
                    "sink.key",
                    format!(
                        "`{name}` is mapped from {source}, but with delete_on_null the key columns must come from \
                         the record key ($key or $key/…): a tombstone has no value to read them from"
                    ),
                ))
            }
            Some(_) => {}
        }
        if seen.contains(&name) {
            problems.push(("sink.key", format!("`{name}` is listed twice")));
        }
        seen.push(name);
    }
    problems
}

/// Without `sink.key`: upserts need one (unless Debezium's events carry it), inserts need the
/// Kafka coordinates mapped, and tombstones have nothing to delete by.
fn check_keyless_rules(
    sink: &SinkConfig,
    columns: &[(String, Source)],
    topics_per_table: usize,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    match sink.mode {
        // Debezium's events carry the source's primary key: each table's primary key is
        // the key (see `writer::business_key`).
        SinkMode::Upsert if sink.format.is_debezium() => {}
        SinkMode::Upsert => problems.push((
            "sink.key",
            "mode upsert needs a key: the columns of the unique key that identifies a row"
                .to_string(),
        )),
        SinkMode::Insert => {
            let mut needed = vec![Source::Partition, Source::Offset];
            if topics_per_table > 1 {
                needed.insert(0, Source::Topic);
            }
            for coordinate in needed {
                if !columns.iter().any(|(_, s)| *s == coordinate) {
                    problems.push((
                        "sink.columns",
                        format!(
                            "mode insert without a key needs a column mapped from {coordinate}: the Kafka \
                             coordinates are then the conflict key that makes replays harmless"
                        ),
                    ));
                }
            }
        }
    }
    if sink.delete_on_null {
        problems.push((
            "sink.delete_on_null",
            "needs sink.key: a tombstone deletes the row with the record's key".to_string(),
        ));
    }
    problems
}

/// What the record format allows: Debezium's rules, `$source_position` and `truncate`.
fn check_format_rules(
    sink: &SinkConfig,
    columns: &[(String, Source)],
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let source_of = |name: &str| columns.iter().find(|(c, _)| c == name).map(|(_, s)| s);
    if sink.format.is_debezium() {
        problems.extend(check_debezium_rules(sink, columns));
    }
    if sink.truncate != OnTruncate::Refuse && sink.format != RecordFormat::Debezium {
        problems.push((
            "sink.truncate",
            "only applies to Debezium's change events (sink.format: debezium), which say when \
             they are a truncate"
                .to_string(),
        ));
    }
    let versioned_by_source = sink
        .newer_by
        .as_ref()
        .is_some_and(|v| source_of(v) == Some(&Source::SourcePosition));
    if sink.truncate == OnTruncate::Apply && !versioned_by_source {
        problems.push((
            "sink.truncate",
            "apply needs sink.newer_by on a column mapped from $source_position: a truncate has \
             no key, so which rows it removes (those older than it) is told by the source's log \
             position, which Kafka's offsets cannot tell across partitions and replays"
                .to_string(),
        ));
    }
    // Only the envelope's source block holds the position.
    let position = columns.iter().find(|(_, s)| *s == Source::SourcePosition);
    if let Some((name, _)) = position.filter(|_| sink.format != RecordFormat::Debezium) {
        problems.push((
            "sink.columns",
            format!(
                "`{name}` is mapped from $source_position, which only a Debezium change event \
                 has (sink.format: debezium; ExtractNewRecordState's flattened events drop it)"
            ),
        ));
    }
    problems
}

/// `sink.newer_by`: upserts only, a mapped column, not a key column.
fn check_version_rules(
    sink: &SinkConfig,
    columns: &[(String, Source)],
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let source_of = |name: &str| columns.iter().find(|(c, _)| c == name).map(|(_, s)| s);
    // With `columns: auto`, a column not listed is the table's to know of.
    let auto = sink.columns.contains_key(EVERY_OTHER_COLUMN);
    if let Some(version) = &sink.newer_by {
        if sink.mode != SinkMode::Upsert {
            problems.push((
                "sink.newer_by",
                "only applies to mode upsert (in mode insert the first write of a key wins)"
                    .to_string(),
            ));
        }
        if source_of(version).is_none() && !auto {
            problems.push((
                "sink.newer_by",
                format!("`{version}` is not mapped in sink.columns"),
            ));
        }
        if sink.key.contains(version) {
            problems.push((
                "sink.newer_by",
                format!("`{version}` is a key column; it must be a column that changes between versions"),
            ));
        }
    }
    problems
}

/// What a change stream needs: every change applied (upsert), and rows found by the key that
/// Debezium puts in the record key, which a delete event also carries.
fn check_debezium_rules(
    sink: &SinkConfig,
    columns: &[(String, Source)],
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if sink.mode != SinkMode::Upsert {
        problems.push((
            "sink.mode",
            "Debezium's events need mode upsert: an update event must change the row it updates"
                .to_string(),
        ));
    }
    if sink.delete_on_null {
        problems.push((
            "sink.delete_on_null",
            "does not apply to Debezium's events, whose deletes say themselves what they are: \
             a delete event (op d) in format debezium, whose tombstone then does nothing; a \
             tombstone or __deleted in format debezium_flattened"
                .to_string(),
        ));
    }
    for name in &sink.key {
        let source = columns.iter().find(|(c, _)| c == name).map(|(_, s)| s);
        if let Some(source) = source.filter(|s| !matches!(s, Source::ValuePointer(_))) {
            problems.push((
                "sink.key",
                format!(
                    "`{name}` is mapped from {source}, but with format debezium a key column is a \
                     field of the row (e.g. /{name}), read from the record key, which a delete \
                     event carries too"
                ),
            ));
        }
    }
    problems
}

/// The URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query_password(url);
    };
    // The user information ends at the last `@` that a host follows: a password may hold
    // `/`, `?` or `@`, a host none of them. Where that is unclear, more is hidden, never less.
    let at = rest
        .rmatch_indices('@')
        .map(|(i, _)| i)
        .find(|i| is_host(&rest[i + 1..]));
    let (userinfo, after) = match at {
        Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
        None => (None, rest),
    };
    let (host, tail) = after
        .find(['/', '?'])
        .map_or((after, ""), |i| after.split_at(i));
    let tail = redact_query_password(tail);
    match userinfo.map(|u| {
        u.split_once(':')
            .map_or((u, false), |(user, _)| (user, true))
    }) {
        Some((user, true)) => format!("{scheme}://{user}:***@{host}{tail}"),
        Some((user, false)) => format!("{scheme}://{user}@{host}{tail}"),
        None => format!("{scheme}://{host}{tail}"),
    }
}

/// Whether `text` starts with a host (and port) up to the path or query: what may follow the
/// user information of a URL.
fn is_host(text: &str) -> bool {
    let host = text.split(['/', '?']).next().unwrap_or_default();
    host.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']' | '%'))
}

/// URL parameters whose values are shown: the drivers' own, none of them secret. Any other
/// parameter's value is hidden: a password (`password=`, `sslpassword=`) or a mistyped one.
const SHOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "application_name",
    "options",
    "statement-cache-capacity",
    "charset",
    "collation",
    "socket",
    "timezone",
];

/// Hides the value of every query parameter not known to be harmless.
fn redact_query_password(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if SHOWN_URL_PARAMETERS.contains(&k) => format!("{k}={v}"),
            Some((k, _)) => format!("{k}=***"),
            None => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", params.join("&"))
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
pipeline: orders_pg
source:
  brokers: 127.0.0.1:9092
  topics: [orders]
  properties:
    session.timeout.ms: 6000
sink:
  url: ${DATABASE_URL}
  table: public.orders
  columns:
    order_id: /order_id
    Customer: /customer/name
    kafka_partition: $partition
    kafka_offset: $offset
"#;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<LoadedPipeline, Vec<ConfigError>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, text).expect("write");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_file(&file, &env)
    }

    fn only_error(text: &str, env: &[(&str, &str)]) -> ConfigError {
        let errors = load(text, env).expect_err("config should be refused");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().expect("one error")
    }

    #[test]
    fn loads_a_good_file_with_interpolation_and_defaults() {
        let p = load(GOOD, &[("DATABASE_URL", "postgres://u@h/db")]).expect("valid");
        assert_eq!(p.config.sink.url, "postgres://u@h/db");
        assert_eq!(p.group_id(), "idemsink-orders_pg");
        assert_eq!(p.config.batch.max_records, 5000);
        assert_eq!(
            p.properties().get("session.timeout.ms").map(String::as_str),
            Some("6000")
        );
        // Column names keep their case: they are quoted identifiers.
        assert!(p
            .columns
            .iter()
            .any(|(c, s)| c == "Customer" && *s == Source::ValuePointer("/customer/name".into())));
    }

    #[test]
    fn environment_overrides_keys_and_ignores_unrelated_variables() {
        let env = [
            ("DATABASE_URL", "postgres://u@h/db"),
            ("IDEMSINK_SINK__URL", "postgres://other/db"),
            ("IDEMSINK_BATCH__MAX_RECORDS", "42"),
            ("IDEMSINK_TEST_BROKERS", "ignored:1"),
        ];
        let p = load(GOOD, &env).expect("valid");
        assert_eq!(p.config.sink.url, "postgres://other/db");
        assert_eq!(p.config.batch.max_records, 42);
    }

    #[test]
    fn environment_overrides_keep_strings_as_they_are_and_type_what_is_typed() {
        let env = [
            ("DATABASE_URL", "postgres://u@h/db"),
            ("IDEMSINK_SOURCE__GROUP_ID", "007"),
            ("IDEMSINK_PIPELINE", "1e5"),
            ("IDEMSINK_BATCH__MAX_WAIT_MS", "250"),
            ("IDEMSINK_ERRORS__RETRY_FOR_MS", "1000"),
            ("IDEMSINK_SINK__DELETE_ON_NULL", "true"),
        ];
        let p = load(GOOD, &env[..5]).expect("valid");
        assert_eq!(p.group_id(), "007", "not re-typed to 7");
        assert_eq!(p.config.pipeline, "1e5", "not re-typed to 100000.0");
        assert_eq!(p.config.batch.max_wait_ms, 250);
        assert_eq!(p.config.errors.retry_for_ms, 1000);
        // Parsed as true: tombstones then need a business key, which GOOD does not have.
        let e = only_error(GOOD, &[env[0], env[5]]);
        assert_eq!(e.key, "sink.delete_on_null");
        let e = only_error(GOOD, &[env[0], ("IDEMSINK_BATCH__MAX_RECORDS", "lots")]);
        assert_eq!(e.key, "batch.max_records");
        assert!(e.message.contains("\"lots\""), "{e}");
    }

    #[test]
    fn debezium_format_needs_upsert_and_key_columns_from_the_row() {
        let env = [("DATABASE_URL", "postgres://u@h/db")];
        let file = |sink: &str| {
            GOOD.replace(
                "  table: public.orders\n",
                &format!("  table: public.orders\n  format: debezium\n{sink}"),
            )
        };
        let p = load(&file("  mode: upsert\n  key: [order_id]\n"), &env).expect("valid");
        assert_eq!(p.config.sink.format, RecordFormat::Debezium);
        let refused = [
            ("  key: [order_id]\n", "sink.mode"),
            (
                "  mode: upsert\n  key: [order_id]\n  delete_on_null: true\n",
                "sink.delete_on_null",
            ),
            ("  mode: upsert\n  key: [kafka_offset]\n", "sink.key"),
        ];
        let json = GOOD.replace("Customer: /customer/name", "Customer: $source_position");
        let e = only_error(&json, &env);
        assert!(e.message.contains("only a Debezium change event"), "{e}");
        for (sink, key) in refused {
            let errors = load(&file(sink), &env).expect_err(sink);
            assert!(errors.iter().any(|e| e.key == key), "{sink}: {errors:?}");
        }
        // A truncate is applied by the source's position only.
        let positioned = |sink: &str| {
            file(sink).replace(
                "    kafka_offset: $offset\n",
                "    kafka_offset: $offset\n    src: $source_position\n",
            )
        };
        let applied =
            positioned("  mode: upsert\n  key: [order_id]\n  newer_by: src\n  truncate: apply\n");
        assert_eq!(
            load(&applied, &env).expect("valid").config.sink.truncate,
            OnTruncate::Apply
        );
        let by_offset = positioned(
            "  mode: upsert\n  key: [order_id]\n  newer_by: kafka_offset\n  truncate: apply\n",
        );
        assert_eq!(only_error(&by_offset, &env).key, "sink.truncate");
        let json = GOOD.replace(
            "  table: public.orders\n",
            "  table: public.orders\n  truncate: ignore\n",
        );
        assert_eq!(only_error(&json, &env).key, "sink.truncate");
        let avro = file("").replace("format: debezium", "format: avro");
        let e = only_error(&avro, &env);
        assert!(
            e.to_string().contains("avro") && e.to_string().contains("debezium"),
            "{e}"
        );
    }

    #[test]
    fn a_pipeline_routes_each_topic_to_its_table_from_the_file() {
        let env = [("DATABASE_URL", "postgres://u@h/db")];
        let cdc = |routing: &str| {
            let topics =
                "  topics: [Shop.public.orders, Shop.public.order_lines, Shop.inv.items]\n";
            let columns = "    \"*\": auto\n    source_lsn: $source_position\n";
            GOOD.replace("  topics: [orders]\n", topics)
                .replace(
                    "  table: public.orders\n",
                    &format!("  format: debezium\n  mode: upsert\n{routing}"),
                )
                .replace(
                    "    order_id: /order_id\n    Customer: /customer/name\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
                    columns,
                )
        };
        let routing = "  tables:\n    Shop.public.order_lines: replica.lines\n  table_from_topic:\n    pattern: 'Shop\\.(\\w+)\\.(\\w+)'\n    table: 'replica.$2'\n";
        // Debezium's events need no sink.key: each table's primary key is it.
        let p = load(&cdc(routing), &env).expect("valid");
        let table = |topic: &str| {
            p.routes.tables[p.routes.table_of(topic).expect(topic)]
                .table
                .to_string()
        };
        // Topic names keep their case and their dots as map keys.
        assert_eq!(table("Shop.public.orders"), "replica.orders");
        assert_eq!(table("Shop.public.order_lines"), "replica.lines");
        assert_eq!(table("Shop.inv.items"), "replica.items");
        let missing = load(&cdc("  tables:\n    Shop.public.orders: orders\n"), &env);
        let missing = missing.expect_err("two topics without a table");
        let named: Vec<&str> = missing.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(named, ["sink.tables", "sink.tables"]);
        assert!(
            missing[0].message.contains("Shop.public.order_lines"),
            "{missing:?}"
        );
        let both = format!("  table: t\n{routing}");
        assert_eq!(only_error(&cdc(&both), &env).key, "sink.table");
        let dead = GOOD.replace(
            "  table: public.orders\n",
            "  tables:\n    orders: audit.bad\n",
        ) + "errors:\n  dead_letter_table: audit.bad\n";
        assert_eq!(only_error(&dead, &env).key, "errors.dead_letter_table");
    }

    #[test]
    fn columns_auto_maps_the_rest_by_name_and_leaves_key_checks_to_the_table() {
        let env = [("DATABASE_URL", "postgres://u@h/db")];
        let upsert = |columns: &str| {
            GOOD.replace(
                "  columns:\n    order_id: /order_id\n    Customer: /customer/name\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
                &format!("  mode: upsert\n  key: [id]\n  newer_by: version\n  columns:{columns}"),
            )
        };
        let word = load(&upsert(" auto\n"), &env).expect("columns: auto");
        assert!(word.auto_columns && word.columns.is_empty());
        let listed = load(&upsert("\n    \"*\": auto\n    at: $offset\n"), &env).expect("valid");
        assert!(listed.auto_columns);
        assert_eq!(listed.columns, [("at".to_string(), Source::Offset)]);
        let e = only_error(&upsert("\n    \"*\": /everything\n"), &env);
        assert_eq!(e.key, "sink.columns.*");
        // Without auto, the key and version must be listed.
        let errors = load(&upsert("\n    at: $offset\n"), &env).expect_err("unlisted key");
        assert!(errors.iter().any(|e| e.key == "sink.key"), "{errors:?}");
        assert!(
            errors.iter().any(|e| e.key == "sink.newer_by"),
            "{errors:?}"
        );
        let tombstones =
            upsert(" auto\n").replace("  mode: upsert", "  delete_on_null: true\n  mode: upsert");
        assert_eq!(only_error(&tombstones, &env).key, "sink.key");
    }

    #[test]
    fn session_limits_default_and_are_checked() {
        let env = [("DATABASE_URL", "postgres://u@h/db")];
        let p = load(GOOD, &env).expect("valid");
        assert_eq!(p.config.sink.lock_timeout_ms, 10_000);
        assert_eq!(p.config.batch.max_bytes, 16 << 20);
        let e = only_error(GOOD, &[env[0], ("IDEMSINK_BATCH__MAX_BYTES", "100")]);
        assert_eq!(e.key, "batch.max_bytes");
        assert_eq!(p.config.sink.idle_in_transaction_timeout_ms, 60_000);
        for (key, value) in [
            ("IDEMSINK_SINK__LOCK_TIMEOUT_MS", "0"),
            ("IDEMSINK_SINK__IDLE_IN_TRANSACTION_TIMEOUT_MS", "999"),
        ] {
            let e = only_error(GOOD, &[env[0], (key, value)]);
            assert!(
                key.ends_with(&e.key.replace("sink.", "").to_uppercase()),
                "{key}: {e}"
            );
            assert!(e.message.contains("out of range 1000..=86400000"), "{e}");
        }
        assert_eq!(p.config.sink.writers, 2);
        for writers in ["0", "17"] {
            let e = only_error(GOOD, &[env[0], ("IDEMSINK_SINK__WRITERS", writers)]);
            assert_eq!(e.key, "sink.writers");
            assert!(e.message.contains("out of range 1..=16"), "{e}");
        }
        let one = load(GOOD, &[env[0], ("IDEMSINK_SINK__WRITERS", "1")]).expect("valid");
        assert_eq!(one.config.sink.writers, 1);
    }

    #[test]
    fn errors_tolerance_and_dead_letter_table_default_parse_and_are_checked() {
        let env = [("DATABASE_URL", "postgres://u@h/db")];
        let p = load(GOOD, &env).expect("valid");
        assert_eq!(p.config.errors.tolerance, Tolerance::None);
        assert_eq!(p.config.errors.dead_letter_table, DEFAULT_DEAD_LETTER_TABLE);
        let with = |errors: &str| format!("{GOOD}errors:\n{errors}");
        let p = load(
            &with("  tolerance: all\n  dead_letter_table: audit.bad_orders\n"),
            &env,
        )
        .expect("valid");
        assert_eq!(p.config.errors.tolerance, Tolerance::All);
        assert_eq!(p.config.errors.dead_letter_table, "audit.bad_orders");
        let e = only_error(&with("  tolerance: some\n"), &env);
        assert_eq!(e.key, "errors.tolerance");
        assert!(e.message.contains("unknown variant `some`"), "{e}");
        let e = only_error(&with("  dead_letter_table: \"bad; drop table x\"\n"), &env);
        assert_eq!(e.key, "errors.dead_letter_table");
        let e = only_error(&with("  dead_letter_table: public.orders\n"), &env);
        assert_eq!(e.key, "errors.dead_letter_table");
        assert!(e.message.contains("is a sink table"), "{e}");
    }

    #[test]
    fn unknown_key_names_its_section() {
        let text = GOOD.replace(
            "  table: public.orders",
            "  table: public.orders\n  tabel: x",
        );
        let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
        assert_eq!(e.key, "sink.tabel");
        assert!(e.message.contains("unknown field `tabel`"), "{e}");
        assert!(e
            .to_string()
            .starts_with(&format!("{}: sink.tabel: ", e.file.display())));
    }

    #[test]
    fn bad_mode_is_named() {
        let text = GOOD.replace(
            "  table: public.orders",
            "  table: public.orders\n  mode: merge",
        );
        let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
        assert_eq!(e.key, "sink.mode");
        assert!(e.message.contains("unknown variant `merge`"), "{e}");
    }

    #[test]
    fn guarantee_properties_are_refused() {
        let text = GOOD.replace(
            "session.timeout.ms: 6000",
            "isolation.level: read_uncommitted",
        );
        let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
        assert_eq!(e.key, "source.properties.isolation.level");
        assert!(e.message.contains("read_committed"), "{e}");
        let text = GOOD.replace("session.timeout.ms: 6000", "enable.auto.commit: true");
        assert_eq!(
            only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
            "source.properties.enable.auto.commit"
        );
    }

    #[test]
    fn auto_offset_reset_is_applied_by_idemsink_and_checked() {
        let env = [("DATABASE_URL", "postgres://h/d")];
        let with = |line: &str| GOOD.replace("session.timeout.ms: 6000", line);
        let policy = |line: &str| load(&with(line), &env).expect("valid").offset_reset();
        assert_eq!(
            policy("fetch.min.bytes: 1"),
            OffsetReset::Stop,
            "the default"
        );
        assert_eq!(policy("auto.offset.reset: error"), OffsetReset::Stop);
        assert_eq!(policy("auto.offset.reset: smallest"), OffsetReset::Earliest);
        assert_eq!(policy("auto.offset.reset: earliest"), OffsetReset::Earliest);
        assert_eq!(policy("auto.offset.reset: end"), OffsetReset::Latest);
        let e = only_error(&with("auto.offset.reset: newest"), &env);
        assert_eq!(e.key, "source.properties.auto.offset.reset");
        assert!(e.message.contains("earliest or latest"), "{e}");
        let p = load(&with("auto.offset.reset: earliest"), &env).expect("valid");
        assert_eq!(
            crate::consumer::client_config(&p).get("auto.offset.reset"),
            Some("error"),
            "librdkafka never skips on its own"
        );
    }

    #[test]
    fn the_consumer_protocol_refuses_what_the_broker_decides() {
        let env = [("DATABASE_URL", "postgres://h/d")];
        let text = GOOD.replace(
            "session.timeout.ms: 6000",
            "group.protocol: consumer\n    session.timeout.ms: 6000",
        );
        let e = only_error(&text, &env);
        assert_eq!(e.key, "source.properties.session.timeout.ms");
        assert!(e.message.contains("KIP-848"), "{e}");
        let text = GOOD.replace(
            "session.timeout.ms: 6000",
            "group.protocol: consumer\n    group.remote.assignor: uniform",
        );
        load(&text, &env).expect("the consumer protocol on its own is valid");
    }

    #[test]
    fn missing_environment_variable_is_named() {
        let e = only_error(GOOD, &[]);
        assert_eq!(e.key, "sink.url");
        assert!(e.message.contains("DATABASE_URL is not set"), "{e}");
    }

    #[test]
    fn insert_mode_needs_the_kafka_coordinates() {
        let text = GOOD.replace("    kafka_offset: $offset\n", "");
        let e = only_error(&text, &[("DATABASE_URL", "postgres://h/d")]);
        assert_eq!(e.key, "sink.columns");
        assert!(e.message.contains("$offset"), "{e}");
        // Offsets compare within a topic: two topics into one table need $topic too, a
        // table each does not.
        let env = [("DATABASE_URL", "postgres://h/d")];
        let two_topics = GOOD.replace("topics: [orders]", "topics: [orders, refunds]");
        let e = only_error(&two_topics, &env);
        assert!(e.message.contains("$topic"), "{e}");
        let a_table_each = two_topics.replace(
            "  table: public.orders\n",
            "  tables:\n    orders: public.orders\n    refunds: public.refunds\n",
        );
        assert!(load(&a_table_each, &env).is_ok());
    }

    #[test]
    fn business_key_rules_name_their_key() {
        let url = [("DATABASE_URL", "mysql://h/d")];
        let keyed = |sink: &str| GOOD.replace("  columns:", &format!("{sink}  columns:"));
        let upsert_without_key = only_error(&keyed("  mode: upsert\n"), &url);
        assert_eq!(upsert_without_key.key, "sink.key");
        let unmapped = only_error(&keyed("  mode: upsert\n  key: [nope]\n"), &url);
        assert!(
            unmapped.message.contains("`nope` is not mapped"),
            "{unmapped}"
        );
        let deletes = only_error(
            &keyed("  mode: upsert\n  key: [order_id]\n  delete_on_null: true\n"),
            &url,
        );
        assert!(deletes.message.contains("from the record key"), "{deletes}");
        let version = only_error(
            &keyed("  mode: insert\n  key: [order_id]\n  newer_by: Customer\n"),
            &url,
        );
        assert_eq!(version.key, "sink.newer_by");
        let fine = keyed("  mode: upsert\n  key: [order_id]\n  newer_by: kafka_offset\n").replace(
            "    kafka_partition: $partition\n    kafka_offset: $offset\n",
            "    kafka_offset: $offset\n",
        );
        assert!(
            load(&fine, &url).is_ok(),
            "upsert on a key needs no coordinates"
        );
    }

    #[test]
    fn hostile_names_are_refused() {
        let text = GOOD.replace("table: public.orders", "table: \"orders; drop table x\"");
        assert_eq!(
            only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
            "sink.table"
        );
        let text = GOOD.replace("order_id: /order_id", "\"a\\\"b\": /order_id");
        assert_eq!(
            only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
            "sink.columns.a\"b"
        );
        let text = GOOD.replace("pipeline: orders_pg", "pipeline: Orders-PG");
        assert_eq!(
            only_error(&text, &[("DATABASE_URL", "postgres://h/d")]).key,
            "pipeline"
        );
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        let e = only_error("pipeline: [unclosed\n", &[]);
        assert!(e.message.contains("not a valid pipeline file"), "{e}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x?sslmode=require"),
            "postgres://app:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app@db/x?password=s3cret"),
            "postgres://app@db/x?password=***"
        );
        assert_eq!(redact_url("postgres://db/x"), "postgres://db/x");
        // Every form a password can take, and none of it survives.
        for (url, shown) in [
            (
                "postgres://127.0.0.1:1/app?user=u&password=TopSecret1",
                "postgres://127.0.0.1:1/app?user=u&password=***",
            ),
            (
                "postgres://u:Top/Secret2@127.0.0.1:1/app",
                "postgres://u:***@127.0.0.1:1/app",
            ),
            (
                "postgres://u:Top?Secret3@db/app?sslmode=require",
                "postgres://u:***@db/app?sslmode=require",
            ),
            (
                "mysql://u:Top@Secret4@db:3306/app",
                "mysql://u:***@db:3306/app",
            ),
            (
                "postgres:///app?host=/var/run/postgresql&password=TopSecret5",
                "postgres:///app?host=/var/run/postgresql&password=***",
            ),
            (
                "postgres://u@db/app?sslpassword=TopSecret6&Password=TopSecret7&passwrd=TopSecret8",
                "postgres://u@db/app?sslpassword=***&Password=***&passwrd=***",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn interpolation_supports_defaults_and_reports_unterminated() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(
            interpolate_str("x${A}y${B:-2}z", &env).as_deref(),
            Ok("x1y2z")
        );
        assert!(interpolate_str("x${A", &env).is_err());
    }
}
