//! The static checks of a pipeline file, section by section: everything that needs no
//! database (what needs the table's schema is checked by `writer::SinkPlan::prepare`).

use std::path::Path;
use std::time::Duration;

use crate::batch::BatchLimits;
use crate::db::{Backend, SessionLimits};
use crate::mapping::Source;
use crate::routing::Routes;
use crate::schema::TableName;

use super::model::*;
use super::{ConfigError, LoadedPipeline};

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

/// Problems found by a check: (config key, message) pairs.
type Problems = Vec<(String, String)>;

fn problem(problems: &mut Problems, key: &str, message: impl Into<String>) {
    problems.push((key.to_string(), message.into()));
}

/// The checks that need no database, section by section.
pub(super) fn check(
    file: &Path,
    config: PipelineConfig,
) -> Result<LoadedPipeline, Vec<ConfigError>> {
    let mut problems = Problems::new();
    check_name(&config.pipeline, &mut problems);
    check_source(&config.source, &mut problems);
    let sink = &config.sink;
    let backend = Backend::of_url(&sink.url);
    if backend.is_none() {
        problem(
            &mut problems,
            "sink.url",
            "must be a postgres://, postgresql://, mysql:// or mariadb:// URL",
        );
    }
    if let Some(hosts) = super::url_hosts(&sink.url).filter(|h| h.contains(',')) {
        problem(
            &mut problems,
            "sink.url",
            format!(
                "names several hosts ({hosts}), libpq's form for failing over between servers, \
                 which idemsink's driver does not follow (it would connect to none, or the wrong \
                 one); give one host: the primary's address, or a name your failover moves to \
                 the new primary (a DNS name, a proxy such as PgBouncer or HAProxy)"
            ),
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
    if let Some(routes) = routes
        .as_ref()
        .filter(|_| sink.truncate == OnTruncate::Apply)
    {
        check_truncated_tables(routes, &mut problems);
    }
    check_limits(&config, &mut problems);
    let dead_letter_table = check_dead_letter_table(&config.errors, routes.as_ref(), &mut problems);
    match (routes, backend, dead_letter_table) {
        (Some(routes), Some(backend), Some(dead_letter_table)) if problems.is_empty() => {
            Ok(LoadedPipeline {
                file: file.to_path_buf(),
                auto_columns: sink.columns.contains_key(EVERY_OTHER_COLUMN),
                backend,
                batch: BatchLimits {
                    max_records: config.batch.max_records,
                    max_bytes: config.batch.max_bytes,
                    max_wait: Duration::from_millis(config.batch.max_wait_ms),
                },
                session: SessionLimits {
                    lock_timeout: Duration::from_millis(sink.lock_timeout_ms),
                    idle_in_transaction: Duration::from_millis(sink.idle_in_transaction_timeout_ms),
                },
                retry_for: Duration::from_millis(config.errors.retry_for_ms),
                dead_letter_table,
                offset_reset: offset_reset(&config.source),
                config,
                columns,
                routes,
            })
        }
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
) -> Option<TableName> {
    let dead_letters = &errors.dead_letter_table;
    match TableName::parse(dead_letters) {
        Err(e) => {
            problem(problems, "errors.dead_letter_table", e);
            None
        }
        Ok(t) if routes.iter().flat_map(|r| &r.tables).any(|r| r.table == t) => {
            problem(
                problems,
                "errors.dead_letter_table",
                format!("{dead_letters} is a sink table; dead letters need a table of their own"),
            );
            None
        }
        Ok(t) => Some(t),
    }
}

/// `source.properties.auto.offset.reset`, once `check_source` has found it valid.
fn offset_reset(source: &SourceConfig) -> OffsetReset {
    source
        .properties
        .get(AUTO_OFFSET_RESET)
        .and_then(|v| OffsetReset::parse(&scalar_text(v)))
        .unwrap_or_default()
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
    if let Some(setting) = &sink.unavailable_value_placeholder {
        match crate::debezium::Placeholder::new(setting) {
            Err(reason) => problems.push(("sink.unavailable_value_placeholder", reason)),
            Ok(_) if !sink.format.is_debezium() => problems.push((
                "sink.unavailable_value_placeholder",
                "only applies to Debezium's change events (sink.format: debezium or \
                 debezium_flattened), whose connector sends it for a value it does not have"
                    .to_string(),
            )),
            Ok(_) => {}
        }
    }
    if sink.binary_handling_mode.is_some() && !sink.format.is_debezium() {
        problems.push((
            "sink.binary_handling_mode",
            "only applies to Debezium's change events (sink.format: debezium or \
             debezium_flattened), whose connector may send bytes as text"
                .to_string(),
        ));
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

/// A truncate deletes from its table every row older than it: with several topics into one
/// table (the partitions of a partitioned source table, say), it would delete the rows of the
/// other topics' source tables too, which their own truncates did not ask for.
fn check_truncated_tables(routes: &Routes, problems: &mut Problems) {
    for (index, route) in routes.tables.iter().enumerate() {
        let topics: Vec<&str> = routes.topics_of(index).collect();
        if topics.len() > 1 {
            problem(
                problems,
                "sink.truncate",
                format!(
                    "apply deletes every older row of a truncated topic's table, and table {} \
                     takes topics {}: a truncate of one would delete the others' rows too; give \
                     each such topic a table of its own, or use truncate: ignore or refuse",
                    route.table,
                    topics.join(", ")
                ),
            );
        }
    }
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
        if source_of(version) == Some(&Source::Timestamp) {
            problems.push((
                "sink.newer_by",
                format!(
                    "`{version}` is mapped from $timestamp, the record's time in milliseconds: \
                     several versions of a row written within one millisecond would tie, and \
                     all but the first would be dropped; use a version the producer increments, \
                     $source_position for Debezium's events, or no newer_by (the Kafka position \
                     orders the records of a partition)"
                ),
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
