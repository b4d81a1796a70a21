//! The SQL writer: plans each table's statements from the table's own description, and
//! writes one batch — every table's rows and deletes, its dead letters and the offsets that
//! cover them — in one transaction (`write_batch`). What is shared lives here: the plan ([`SinkPlan`]), which rows a batch
//! touches, and how rows the database rejects are found (`isolate_rejected`); each
//! backend's statements live in its own file.

mod guard;
mod mysql;
mod postgres;

use std::collections::HashSet;
use std::ops::Range;

use crate::batch::{Batch, Changes, DeadLetter, Patch, Winner};
use crate::config::{ConfigError, LoadedPipeline, OnTruncate, RecordFormat, SinkMode};
use crate::db::{is_rejected_row, Backend, DbPool};
use crate::dead_letters::DeadLetterTable;
use crate::debezium::{BinaryMode, Placeholder};
use crate::mapping::{ColumnPlan, Role, RowMapper, Source};
use crate::offsets::{OffsetMove, OffsetStore, TopicPartition};
use crate::routing::{Route, Routes};
use crate::schema::{quote_list, TableName, TableSchema};

/// The columns that record a row's Kafka position, when the mapping has them: they let an
/// older record be told from a newer one of the same partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub topic: Option<usize>,
    pub partition: usize,
    pub offset: usize,
}

/// What the table says about a pipeline's mapping, checked: the columns, the conflict
/// target and the guards that keep an older record from overwriting a newer one.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub backend: Backend,
    pub table: TableName,
    /// The table's identity in the database (see [`TableSchema::identity`]).
    pub identity: String,
    pub columns: Vec<ColumnPlan>,
    pub mode: SinkMode,
    /// Indices into `columns` of the conflict target.
    pub conflict: Vec<usize>,
    /// Whether the conflict target is a business key (`sink.key`), not the coordinates.
    pub keyed: bool,
    /// The `sink.newer_by` column.
    pub newer_by: Option<usize>,
    /// The `newer_by` column when deletes carry it too (`$source_position`: a Debezium delete
    /// event has its position): a delete then applies only to an older row.
    pub delete_version: Option<usize>,
    pub position: Option<Position>,
    pub format: RecordFormat,
    /// What a Debezium truncate event does (`sink.truncate`).
    pub truncate: OnTruncate,
    /// What Debezium sends for a value it does not have (`sink.unavailable_value_placeholder`).
    pub placeholder: Placeholder,
    /// How the connector sends bytes (`sink.binary_handling_mode`).
    pub binary_mode: BinaryMode,
    /// Whether records delete rows: tombstones with `sink.delete_on_null`, delete events in
    /// Debezium format.
    pub deletes: bool,
    /// Whether rows may go in by PostgreSQL's `COPY` (see the postgres writer).
    pub copy_allowed: bool,
    /// With a business key the database compares other than by text (a case-insensitive
    /// collation, `numeric`, `jsonb`): per key column, an SQL expression of `{v}` that
    /// compares as the database does. A batch's keys are then grouped by the database
    /// (`BatchStatements::key_groups`), so that its reduction agrees with the unique key.
    pub key_equality: Option<Vec<String>>,
}

/// When the "not older" guard orders rows by their Kafka position (an upsert without
/// `newer_by`, or tombstones), the position must be comparable: numbers, not text (where
/// `'999' >= '1000'`), and never across topics (partition 0 of two topics are unrelated).
fn position_guard_problems(
    pipeline: &LoadedPipeline,
    columns: &[ColumnPlan],
    position: Option<Position>,
    newer_by: Option<usize>,
    topics: usize,
) -> Vec<ConfigError> {
    let sink = &pipeline.config.sink;
    let guarded = (sink.mode == SinkMode::Upsert && newer_by.is_none()) || sink.deletes();
    let Some(position) = position.filter(|_| guarded) else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for c in [position.partition, position.offset] {
        let column = &columns[c];
        if !matches!(column.kind, crate::mapping::ColumnKind::Integer { .. }) {
            problems.push(pipeline.error(
                &format!("sink.columns.{}", column.name),
                format!(
                    "`{}` has type {}: an older record is told from a newer one by comparing the Kafka \
                     position it holds, which needs an integer column (as text, '999' would be newer \
                     than '1000')",
                    column.name,
                    column.kind.sql_name()
                ),
            ));
        }
    }
    if position.topic.is_none() && topics > 1 {
        problems.push(pipeline.error(
            "sink.columns",
            "several topics are read and $topic is not mapped: an older record is told from a newer \
             one by its partition and offset, which only compare within one topic; map $topic to a \
             column (and keep it in the rows), or set sink.newer_by"
                .to_string(),
        ));
    }
    problems
}

/// The key and `newer_by` columns the table does not have. Listed columns were checked
/// against `sink.columns` when the file was loaded; with `auto`, they are checked here.
fn named_column_problems(
    pipeline: &LoadedPipeline,
    table: &TableName,
    columns: &[ColumnPlan],
    key: &[String],
) -> Vec<ConfigError> {
    let named = key.iter().map(|k| ("sink.key", k));
    let version = pipeline
        .config
        .sink
        .newer_by
        .iter()
        .map(|v| ("sink.newer_by", v));
    named
        .chain(version)
        .filter(|(_, name)| !columns.iter().any(|c| &c.name == *name))
        .map(|(config_key, name)| {
            pipeline.error(config_key, format!("table {table} has no column `{name}`"))
        })
        .collect()
}

/// Why the conflict target cannot be one, if it cannot: it needs a unique key on exactly its
/// columns, and no other unique key a written row could collide on. The same rule on both
/// databases: what a collision elsewhere would do differs, and neither is wanted.
fn conflict_target_problems(
    schema: &TableSchema,
    columns: &[ColumnPlan],
    conflict: &[usize],
    mode: SinkMode,
) -> Vec<String> {
    let (backend, table) = (schema.backend, &schema.table);
    let target: Vec<&str> = conflict.iter().map(|i| columns[*i].name.as_str()).collect();
    let mut problems = Vec::new();
    if !schema.has_unique_key(&target) {
        problems.push(format!(
            "table {table} needs a unique index or constraint on exactly ({}) for mode {mode}; e.g. \
             ALTER TABLE {} ADD UNIQUE ({})",
            target.join(", "),
            table.quoted(backend),
            quote_list(backend, target.iter().copied())
        ));
    }
    let mapped: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    for other in schema.other_collidable_keys(&target, &mapped) {
        let consequence = match backend {
            Backend::MySql => {
                "MySQL's ON DUPLICATE KEY would treat a row colliding on it as a \
                               duplicate and silently skip or overwrite it"
            }
            Backend::Postgres => {
                "ON CONFLICT covers only the conflict target, so PostgreSQL would \
                                  refuse every row colliding on it (a retried producer's duplicate \
                                  would stop the pipeline, or go to the dead-letter table)"
            }
        };
        problems.push(format!(
            "table {table} has another unique key ({}): {consequence}; make ({}) the only \
             unique key besides generated ones (AUTO_INCREMENT, identity, serial) the pipeline \
             does not write, or make the other key the conflict target (sink.key)",
            other.columns.join(", "),
            target.join(", ")
        ));
    }
    problems
}

/// How the database compares the business key's values, where it does not compare their
/// text (see `SinkPlan::key_equality`): one expression per key column, `{v}` for as is.
fn key_equality(
    schema: &TableSchema,
    columns: &[ColumnPlan],
    conflict: &[usize],
) -> Option<Vec<String>> {
    // The unique key the conflict is on compares as its own collations say.
    let names: Vec<&str> = conflict.iter().map(|c| columns[*c].name.as_str()).collect();
    let key = (schema.unique_keys.iter()).find(|k| {
        k.exact
            && k.columns.len() == names.len()
            && names.iter().all(|n| k.columns.iter().any(|c| c == n))
    })?;
    let equality: Vec<Option<&String>> = names
        .iter()
        .map(|name| {
            let at = key.columns.iter().position(|c| c == name)?;
            key.equality.get(at)?.as_ref()
        })
        .collect();
    equality.iter().any(Option::is_some).then(|| {
        equality
            .iter()
            .map(|e| e.map_or_else(|| "{v}".to_string(), Clone::clone))
            .collect()
    })
}

impl Position {
    /// The columns mapped from the Kafka coordinates, when partition and offset both are.
    fn of(columns: &[ColumnPlan]) -> Option<Position> {
        let index_of = |source: Source| columns.iter().position(|c| c.source == source);
        Some(Position {
            topic: index_of(Source::Topic),
            partition: index_of(Source::Partition)?,
            offset: index_of(Source::Offset)?,
        })
    }
}

/// The target table's columns and keys, or why it cannot be written: `route.key` names the
/// setting that chose the table.
async fn describe(
    pipeline: &LoadedPipeline,
    pool: &DbPool,
    route: &Route,
) -> Result<TableSchema, Vec<ConfigError>> {
    let table = &route.table;
    TableSchema::load(pool, table)
        .await
        .map_err(|e| {
            vec![pipeline.error(&route.key, format!("cannot describe table {table}: {e}"))]
        })?
        .ok_or_else(|| vec![pipeline.error(&route.key, format!("table {table} does not exist"))])
}

/// Two routes whose tables the database knows as one (`t` and `public.t`): the rules for
/// topics that share a table (`$topic` mapped, or `newer_by`) compare the names as written, so
/// one table must be written one way.
fn same_table_problems(pipeline: &LoadedPipeline, plans: &[SinkPlan]) -> Vec<ConfigError> {
    let routes = &pipeline.routes.tables;
    let mut problems = Vec::new();
    for (later, plan) in plans.iter().enumerate() {
        if let Some(first) = plans[..later]
            .iter()
            .position(|p| p.identity == plan.identity)
        {
            let route = routes.iter().find(|r| r.table == plan.table);
            let named = routes.iter().find(|r| r.table == plans[first].table);
            let (Some(route), Some(named)) = (route, named) else {
                continue;
            };
            problems.push(pipeline.error(
                &route.key,
                format!(
                    "`{}` is the table `{}` of {} spelled another way: write it one way, so that \
                     the rules for topics sharing a table apply to it",
                    plan.table, named.table, named.key
                ),
            ));
        }
    }
    problems
}

/// `sink.newer_by` must name a column whose values order versions.
fn version_column_problem(pipeline: &LoadedPipeline, column: &ColumnPlan) -> Option<ConfigError> {
    (!column.kind.orders_versions()).then(|| {
        pipeline.error(
            "sink.newer_by",
            format!(
                "`{}` has type {}; a version column must be an integer, timestamp or date",
                column.name,
                column.kind.sql_name()
            ),
        )
    })
}

/// The business key's columns: `sink.key`, or for Debezium's events, which carry the source
/// table's primary key in the record key, the target table's primary key when `sink.key` is
/// not given (so one pipeline can replicate tables whose keys differ). Empty: the
/// coordinates are the key.
fn business_key(
    pipeline: &LoadedPipeline,
    schema: &TableSchema,
) -> Result<Vec<String>, ConfigError> {
    let sink = &pipeline.config.sink;
    if !sink.key.is_empty() || !sink.format.is_debezium() {
        return Ok(sink.key.clone());
    }
    let primary = schema.unique_keys.iter().find(|k| k.primary && k.exact);
    let Some(primary) = primary else {
        return Err(pipeline.error(
            "sink.key",
            format!(
                "table {} has no primary key: name the columns of the key Debezium's events \
                 carry in sink.key",
                schema.table
            ),
        ));
    };
    for name in &primary.columns {
        let listed = pipeline.columns.iter().find(|(column, _)| column == name);
        match listed.map(|(_, source)| source) {
            Some(Source::ValuePointer(_)) => {}
            None if pipeline.auto_columns => {}
            Some(source) => {
                return Err(pipeline.error(
                    &format!("sink.columns.{name}"),
                    format!(
                        "`{name}` is a column of table {}'s primary key, the key of Debezium's \
                         events, but is mapped from {source}: a key column is a field of the row \
                         (/{name}), read from the record key",
                        schema.table
                    ),
                ))
            }
            None => {
                return Err(pipeline.error(
                    "sink.columns",
                    format!(
                        "`{name}`, a column of table {}'s primary key, is not mapped: map it \
                         (/{name}) or use columns: auto",
                        schema.table
                    ),
                ))
            }
        }
    }
    Ok(primary.columns.clone())
}

/// The columns a pipeline writes: those `sink.columns` lists, and with `auto` every other
/// column of the table, from the field of its name — except the columns the database fills in
/// itself (generated, AUTO_INCREMENT).
fn mapped_columns(pipeline: &LoadedPipeline, schema: &TableSchema) -> Vec<(String, Source)> {
    let mut mapped = pipeline.columns.clone();
    if pipeline.auto_columns {
        for column in &schema.columns {
            let listed = pipeline
                .columns
                .iter()
                .any(|(name, _)| *name == column.name);
            if !listed && !column.generated && !column.auto_increment {
                let token = column.name.replace('~', "~0").replace('/', "~1");
                mapped.push((
                    column.name.clone(),
                    Source::ValuePointer(format!("/{token}")),
                ));
            }
        }
    }
    mapped
}

impl SinkPlan {
    /// The plan of every table the pipeline writes, in the order of [`crate::routing::Routes`];
    /// the problems of all of them at once.
    pub async fn prepare_all(
        pipeline: &LoadedPipeline,
        pool: &DbPool,
    ) -> Result<Vec<SinkPlan>, Vec<ConfigError>> {
        let mut plans = Vec::new();
        let mut problems = Vec::new();
        for (index, route) in pipeline.routes.tables.iter().enumerate() {
            match SinkPlan::prepare(pipeline, pool, index).await {
                Ok(plan) => plans.push(plan),
                Err(mut found) => problems.append(&mut found),
            }
            debug_assert!(plans.last().is_none_or(|plan| plan.table == route.table));
        }
        problems.extend(same_table_problems(pipeline, &plans));
        if problems.is_empty() {
            Ok(plans)
        } else {
            Err(problems)
        }
    }

    /// Describes the target table `route_index` of the routes and checks the mapping against it.
    /// Problems come back with the file and key they concern.
    pub async fn prepare(
        pipeline: &LoadedPipeline,
        pool: &DbPool,
        route_index: usize,
    ) -> Result<SinkPlan, Vec<ConfigError>> {
        let sink = &pipeline.config.sink;
        let backend = pool.backend();
        let route = &pipeline.routes.tables[route_index];
        let table = route.table.clone();
        let schema = describe(pipeline, pool, route).await?;
        let key = business_key(pipeline, &schema).map_err(|e| vec![e])?;
        let mapped = mapped_columns(pipeline, &schema);
        let mut columns = schema.plan(&mapped).map_err(|problems| {
            problems
                .into_iter()
                .map(|(key, message)| pipeline.error(&key, message))
                .collect::<Vec<_>>()
        })?;
        let index = |name: &str| columns.iter().position(|c| c.name == name);
        let position = Position::of(&columns);
        let conflict: Vec<usize> = if key.is_empty() {
            position
                .iter()
                .flat_map(|p| p.topic.into_iter().chain([p.partition, p.offset]))
                .collect()
        } else {
            key.iter().filter_map(|k| index(k)).collect()
        };
        let newer_by = sink.newer_by.as_deref().and_then(index);
        let mut problems = named_column_problems(pipeline, &table, &columns, &key);
        if let Some(v) = newer_by {
            problems.extend(version_column_problem(pipeline, &columns[v]));
            columns[v].role = Role::Version;
        }
        if !key.is_empty() {
            for k in &conflict {
                columns[*k].role = Role::Key;
            }
        }
        let key_name = if key.is_empty() {
            "sink.columns"
        } else {
            "sink.key"
        };
        for message in conflict_target_problems(&schema, &columns, &conflict, sink.mode) {
            problems.push(pipeline.error(key_name, message));
        }
        let topics = pipeline.routes.topics_of(route_index).count();
        problems.extend(position_guard_problems(
            pipeline, &columns, position, newer_by, topics,
        ));
        let placeholder = sink
            .unavailable_value_placeholder
            .as_deref()
            .map_or_else(|| Ok(Placeholder::default()), Placeholder::new)
            .map_err(|e| vec![pipeline.error("sink.unavailable_value_placeholder", e)])?;
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(SinkPlan {
            placeholder,
            binary_mode: sink.binary_handling_mode.unwrap_or_default(),
            identity: schema.identity.clone(),
            key_equality: (!key.is_empty())
                .then(|| key_equality(&schema, &columns, &conflict))
                .flatten(),
            backend,
            table,
            mode: sink.mode,
            keyed: !key.is_empty(),
            conflict,
            newer_by,
            delete_version: newer_by.filter(|v| columns[*v].source == Source::SourcePosition),
            position,
            format: sink.format,
            truncate: sink.truncate,
            deletes: sink.deletes(),
            copy_allowed: schema.copy_allowed,
            columns,
        })
    }

    pub fn mapper(&self) -> RowMapper {
        RowMapper::new(self.columns.clone(), self.deletes, self.format)
            .on_truncate(self.truncate)
            .with_placeholder(self.placeholder.clone())
            .with_binary_mode(self.binary_mode)
    }

    /// Which record of a key repeated in a batch is written.
    fn winner(&self) -> Winner {
        match (self.mode, self.newer_by) {
            (SinkMode::Insert, _) => Winner::First,
            (SinkMode::Upsert, None) => Winner::Last,
            (SinkMode::Upsert, Some(column)) => Winner::Newest {
                column,
                kind: self.columns[column].kind,
                deletes_versioned: self.delete_version.is_some(),
            },
        }
    }

    /// The rows of `batch` its statements touch, leaving out the rows in `refused`; `groups`
    /// tells which rows' keys the database finds equal (see [`BatchStatements::key_groups`]).
    fn changes(
        &self,
        batch: &Batch,
        groups: Option<&[usize]>,
        refused: &HashSet<usize>,
    ) -> Changes {
        let key: &[usize] = if self.keyed { &self.conflict } else { &[] };
        batch.changes(key, groups, self.winner(), refused)
    }

    fn column_list(&self) -> String {
        quote_list(self.backend, self.columns.iter().map(|c| c.name.as_str()))
    }

    fn quoted(&self, column: usize) -> String {
        crate::schema::quote(self.backend, &self.columns[column].name)
    }
}

/// How much one statement may carry. Rows are bound as parameters, and every server caps a
/// message: MySQL at `max_allowed_packet` (error 1153, and the connection is closed),
/// PostgreSQL at 1 GB for a message or a value. A batch of large rows goes in as several
/// statements, each within both bounds; a row larger than `bytes` goes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatementLimit {
    rows: usize,
    bytes: usize,
}

/// What one bound cell costs beyond its text: the length prefix and type of a parameter.
const CELL_OVERHEAD: usize = 16;

/// Numbers the distinct values of `canonical` (one per row) in order of first appearance:
/// rows with equal values get equal ids.
fn group_ids<T: std::hash::Hash + Eq>(canonical: impl IntoIterator<Item = T>) -> Vec<usize> {
    let mut ids = std::collections::HashMap::new();
    canonical
        .into_iter()
        .map(|value| {
            let next = ids.len();
            *ids.entry(value).or_insert(next)
        })
        .collect()
}

/// The bytes `columns` of `row` add to a statement.
fn row_bytes(batch: &Batch, columns: &[usize], row: usize) -> usize {
    columns
        .iter()
        .map(|c| batch.cells.get(*c, row).map_or(0, str::len) + CELL_OVERHEAD)
        .sum()
}

/// Splits `rows` into consecutive runs, one statement each, within `limit` (see
/// [`StatementLimit`]); `columns` are the cells a statement binds for each row.
fn statement_parts<'r>(
    batch: &Batch,
    columns: &[usize],
    rows: &'r [usize],
    limit: StatementLimit,
) -> Vec<&'r [usize]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let size = row_bytes(batch, columns, *row);
        let full = i - start == limit.rows || (i > start && bytes + size > limit.bytes);
        if full {
            parts.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < rows.len() {
        parts.push(&rows[start..]);
    }
    parts
}

/// The rows of `patches` by round, in order (see [`Changes::patches`]).
fn patch_rounds(patches: &[Patch]) -> impl Iterator<Item = Vec<usize>> + '_ {
    patches
        .chunk_by(|a, b| a.round == b.round)
        .map(|round| round.iter().map(|p| p.row).collect())
}

/// Per column of `row`, `u` where its cell is unavailable and `-` elsewhere: what a patch
/// statement reads to leave those columns as they are.
fn unavailable_mask(batch: &Batch, row: usize, columns: usize) -> String {
    (0..columns)
        .map(|c| {
            if batch.cells.column(c).is_unavailable(row) {
                'u'
            } else {
                '-'
            }
        })
        .collect()
}

/// What a batch did to the table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RowCounts {
    /// Rows inserted or updated. MySQL reports a duplicate it left as it was like an insert,
    /// so there they count too.
    pub written: u64,
    /// Of the written rows, those updated.
    pub updated: u64,
    /// Rows that changed nothing (a duplicate, an older version). Known on PostgreSQL only.
    pub unchanged: Option<u64>,
    /// Rows removed by tombstones.
    pub deleted: u64,
    /// Records written to the dead-letter table instead.
    pub dead_lettered: u64,
    /// Records whose row has unavailable values (see [`Changes::patches`]) but is not in
    /// the table, so there is nothing to keep them from: nothing is written for them.
    pub absent: Vec<(TopicPartition, i64)>,
}

impl RowCounts {
    /// Adds the records of `rows` of `batch` to the absent ones.
    fn add_absent(&mut self, batch: &Batch, rows: &[usize]) {
        self.absent.extend(rows.iter().map(|row| {
            let (tp, offset) = batch.coordinates(*row);
            (tp.clone(), offset)
        }));
    }
}

impl std::ops::AddAssign for RowCounts {
    fn add_assign(&mut self, other: RowCounts) {
        self.written += other.written;
        self.updated += other.updated;
        self.unchanged = match (self.unchanged, other.unchanged) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.deleted += other.deleted;
        self.dead_lettered += other.dead_lettered;
        self.absent.extend(other.absent);
    }
}

/// How a batch's transaction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Rows, dead letters and offsets committed; `rejected` are the records whose rows the
    /// database refused, now dead letters.
    Committed {
        rows: RowCounts,
        rejected: Vec<RefusedRecord>,
    },
    /// Rolled back: these partitions' stored offsets were not the expected ones.
    Conflict(Vec<TopicPartition>),
    /// Rolled back (`errors.tolerance: none`): a record whose row the database refuses (the
    /// first of its table's rows in the batch). Whatever the tolerance: a row no statement
    /// can carry.
    Rejected(RefusedRecord),
}

/// A record whose row the database refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRecord {
    pub tp: TopicPartition,
    pub offset: i64,
    /// The database's SQLSTATE, when it gave one.
    pub sqlstate: Option<String>,
    pub error: String,
}

/// A row of a batch the database refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    pub row: usize,
    /// The database's SQLSTATE; none for a row refused before it was sent.
    pub sqlstate: Option<String>,
    pub error: String,
}

/// The statements one backend runs inside a batch's transaction.
trait BatchStatements {
    type Db: sqlx::Database;

    fn pool(&self) -> &sqlx::Pool<Self::Db>;

    /// Starts a batch's transaction.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error> {
        self.pool().begin().await
    }

    /// Applies `changes` of `batch`: its deletes, then its writes. `bulk` allows the fastest
    /// way in (PostgreSQL's COPY), which isolating single rows does without.
    async fn apply(
        &self,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        batch: &Batch,
        changes: &Changes,
        bulk: bool,
    ) -> Result<RowCounts, sqlx::Error>;

    /// Per row of `batch`, an id equal for rows whose business keys the database finds
    /// equal, when it does not compare them by their text (`SinkPlan::key_equality`).
    /// `None`: compare the text. A key the database cannot even read as its type leaves the
    /// grouping to the text: its row is then refused, and isolated, by the write.
    async fn key_groups(&self, _batch: &Batch) -> Result<Option<Vec<usize>>, sqlx::Error> {
        Ok(None)
    }

    /// Who holds locks on `tables` or on the offsets table inside an open transaction, one
    /// line each.
    async fn lock_holders(&self, tables: &[&TableName]) -> Result<Vec<String>, sqlx::Error>;

    /// A row of `changes` no statement can carry, found before anything is sent.
    fn too_large(&self, _batch: &Batch, _changes: &Changes) -> Option<RejectedRow> {
        None
    }

    async fn insert_dead_letters(
        &self,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        table: &DeadLetterTable,
        letters: &[&DeadLetter],
    ) -> Result<(), sqlx::Error>;

    /// Moves the offsets; returns the partitions whose stored offset was not the expected one.
    async fn compare_and_set(
        &self,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        moves: &[OffsetMove],
    ) -> Result<Vec<TopicPartition>, sqlx::Error>;
}

/// One table's share of a batch: its plan, its statements and the rows of its topics.
struct TablePart<'a, S> {
    plan: &'a SinkPlan,
    statements: &'a S,
    batch: &'a Batch,
    /// Per row, an id equal for rows whose keys the database finds equal (see
    /// [`BatchStatements::key_groups`]).
    groups: Option<Vec<usize>>,
    /// The rows the statements touch (see [`SinkPlan::changes`]).
    changes: Changes,
}

/// Writes a batch in one transaction: each table's rows, the dead letters, then the offsets
/// by compare-and-set. The rows go in together; if the database refuses one (a constraint, a
/// value that does not fit), the transaction starts over and each table's refused rows are
/// found by [`write_isolating`]: without a dead-letter table the batch rolls back naming the
/// first; with one they go there and the rest commits — as if the refused records had not
/// been in the batch.
async fn write_batch<S: BatchStatements>(
    tables: &[S],
    plans: &[SinkPlan],
    dead_letter_table: Option<&DeadLetterTable>,
    batch_parts: &[(usize, &Batch)],
    moves: &[OffsetMove],
) -> Result<WriteOutcome, sqlx::Error> {
    let parts = match plan_parts(tables, plans, batch_parts).await? {
        Ok(parts) => parts,
        Err(too_large) => return Ok(WriteOutcome::Rejected(too_large)),
    };
    // Every table is in the same database: any of them begins the transaction and moves the
    // offsets.
    let first = &tables[0];
    let tolerate = dead_letter_table.is_some();
    let (mut tx, applied) = apply_parts(first, first.begin().await?, &parts, tolerate).await?;
    let (mut counts, rejected) = match applied {
        Ok(applied) => applied,
        Err(refused) => {
            tx.rollback().await?;
            return Ok(WriteOutcome::Rejected(refused));
        }
    };
    #[cfg(feature = "testkit")]
    crate::testkit::hold_transaction(&moves.iter().map(|m| m.tp.partition).collect::<Vec<_>>())
        .await;
    if let Some(table) = dead_letter_table {
        let refused: Vec<DeadLetter> = rejected
            .iter()
            .filter_map(|(batch, r)| batch.dead_letter_for_row(r.row, r.error.clone()))
            .collect();
        let converted = batch_parts
            .iter()
            .flat_map(|(_, batch)| batch.dead_letters());
        let letters: Vec<&DeadLetter> = converted.chain(&refused).collect();
        if !letters.is_empty() {
            first.insert_dead_letters(&mut tx, table, &letters).await?;
        }
        counts.dead_lettered = letters.len() as u64;
    }
    let conflicts = first.compare_and_set(&mut tx, moves).await?;
    if !conflicts.is_empty() {
        tx.rollback().await?;
        return Ok(WriteOutcome::Conflict(conflicts));
    }
    tx.commit().await?;
    let rejected = rejected
        .into_iter()
        .map(|(batch, r)| refused_record(batch, r))
        .collect();
    Ok(WriteOutcome::Committed {
        rows: counts,
        rejected,
    })
}

/// Each table's part of the batch with the rows its statements touch; `Err`: a row no
/// statement can carry, found before anything is sent.
async fn plan_parts<'a, S: BatchStatements>(
    tables: &'a [S],
    plans: &'a [SinkPlan],
    batch_parts: &[(usize, &'a Batch)],
) -> Result<Result<Vec<TablePart<'a, S>>, RefusedRecord>, sqlx::Error> {
    let mut parts = Vec::with_capacity(batch_parts.len());
    for (table, batch) in batch_parts {
        let (plan, statements) = (&plans[*table], &tables[*table]);
        let groups = statements.key_groups(batch).await?;
        let changes = plan.changes(batch, groups.as_deref(), &HashSet::new());
        if let Some(row) = statements.too_large(batch, &changes) {
            return Ok(Err(refused_record(batch, row)));
        }
        parts.push(TablePart {
            plan,
            statements,
            batch,
            groups,
            changes,
        });
    }
    Ok(Ok(parts))
}

/// What one table part's row refused by the database, or too large, was.
/// The SQLSTATE of a database error (MySQL and MariaDB give one too, beside their number).
fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

fn refused_record(batch: &Batch, row: RejectedRow) -> RefusedRecord {
    let (tp, offset) = batch.coordinates(row.row);
    RefusedRecord {
        tp: tp.clone(),
        offset,
        sqlstate: row.sqlstate,
        error: row.error,
    }
}

/// Rows refused in a batch, each with the table part it is a row of.
type RefusedRows<'a> = Vec<(&'a Batch, RejectedRow)>;

/// What [`apply_parts`] did: what went in and the refused rows (tolerated: they become dead
/// letters), or the refused record that stops the batch.
type Applied<'a> = Result<(RowCounts, RefusedRows<'a>), RefusedRecord>;

/// Applies every part in `tx`, all together. If the database refuses a row, the transaction
/// starts over and each part is written by [`write_isolating`]. Returns the transaction the
/// parts are in.
async fn apply_parts<'a, S: BatchStatements>(
    first: &S,
    mut tx: sqlx::Transaction<'static, S::Db>,
    parts: &[TablePart<'a, S>],
    tolerate: bool,
) -> Result<(sqlx::Transaction<'static, S::Db>, Applied<'a>), sqlx::Error> {
    let mut counts = RowCounts::default();
    let mut bulk = Ok(());
    for part in parts {
        match part
            .statements
            .apply(&mut tx, part.batch, &part.changes, true)
            .await
        {
            Ok(applied) => counts += applied,
            Err(e) => {
                bulk = Err(e);
                break;
            }
        }
    }
    match bulk {
        Ok(()) => return Ok((tx, Ok((counts, Vec::new())))),
        Err(e) if is_rejected_row(&e) => {}
        Err(e) => return Err(e),
    }
    tx.rollback().await?;
    let mut tx = first.begin().await?;
    let (mut counts, mut rejected) = (RowCounts::default(), Vec::new());
    for part in parts {
        match write_isolating(&mut *tx, part, tolerate).await? {
            Ok((applied, refused)) => {
                counts += applied;
                rejected.extend(refused.into_iter().map(|r| (part.batch, r)));
            }
            Err(first_refused) => return Ok((tx, Err(refused_record(part.batch, first_refused)))),
        }
    }
    Ok((tx, Ok((counts, rejected))))
}

/// Writes one table's part of a batch whose rows the database refused some of, finding them
/// by [`isolate_rejected`] inside a savepoint. `Err`: the first refused row, when refused
/// rows are not tolerated (no dead-letter table), or a row no statement can carry. `Ok`:
/// what went in and the refused rows. With a business key, leaving rows out can change
/// which record of a key is written (the one before a refused one), so the part is planned
/// again without the refused rows, and written again, until nothing new is refused.
async fn write_isolating<S: BatchStatements>(
    conn: &mut <S::Db as sqlx::Database>::Connection,
    part: &TablePart<'_, S>,
    tolerate: bool,
) -> Result<Result<(RowCounts, Vec<RejectedRow>), RejectedRow>, sqlx::Error> {
    use sqlx::Connection;
    let mut changes = part.changes.clone();
    let mut rejected: Vec<RejectedRow> = Vec::new();
    loop {
        let mut attempt = conn.begin().await?;
        let (counts, found) =
            isolate_rejected(part.statements, &mut attempt, part.batch, &changes).await?;
        if !tolerate {
            if let Some(first) = found.into_iter().min_by_key(|r| r.row) {
                attempt.rollback().await?;
                return Ok(Err(first));
            }
            attempt.commit().await?;
            return Ok(Ok((counts, rejected))); // refused once, then not: the database changed
        }
        rejected.extend(found);
        let refused: HashSet<usize> = rejected.iter().map(|r| r.row).collect();
        let replanned = part
            .plan
            .changes(part.batch, part.groups.as_deref(), &refused);
        if replanned == changes.without(&refused) {
            attempt.commit().await?;
            return Ok(Ok((counts, rejected))); // what went in is the part without the refused rows
        }
        attempt.rollback().await?;
        if let Some(row) = part.statements.too_large(part.batch, &replanned) {
            return Ok(Err(row));
        }
        changes = replanned;
    }
}

/// Applies `changes` part by part, each inside a savepoint, halving every part the database
/// rejects until the rejected rows stand alone: k bad rows among n cost about 2k·log2(n)
/// statements. The parts keep the changes' order (deletes before writes), so the rows that
/// go in end as if the batch had gone in without the rejected ones. Returns what went in
/// and the rejected rows.
async fn isolate_rejected<S: BatchStatements>(
    statements: &S,
    conn: &mut <S::Db as sqlx::Database>::Connection,
    batch: &Batch,
    changes: &Changes,
) -> Result<(RowCounts, Vec<RejectedRow>), sqlx::Error> {
    use sqlx::Connection;
    let steps = changes.len();
    let mut counts = RowCounts::default();
    let mut rejected = Vec::new();
    // Parts still to try, the next one last.
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..steps);
    while let Some(part) = pending.pop() {
        let subset = changes.part(part.clone());
        let mut savepoint = conn.begin().await?;
        match statements
            .apply(&mut savepoint, batch, &subset, false)
            .await
        {
            Ok(applied) => {
                savepoint.commit().await?;
                counts += applied;
            }
            Err(e) if is_rejected_row(&e) => {
                savepoint.rollback().await?;
                if part.len() == 1 {
                    let row = subset.steps().next();
                    rejected.extend(row.map(|row| RejectedRow {
                        row,
                        sqlstate: sqlstate(&e),
                        error: e.to_string(),
                    }));
                } else {
                    let middle = part.start + part.len() / 2;
                    pending.push(middle..part.end);
                    pending.push(part.start..middle);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((counts, rejected))
}

/// Writes batches into the pipeline's tables, and offsets into the offset store,
/// transactionally.
#[derive(Debug)]
pub struct Writer {
    /// One plan per table, in the order of `routes`.
    plans: Vec<SinkPlan>,
    routes: Routes,
    statements: Statements,
    /// Where records the database rejects go (`errors.tolerance: all`).
    dead_letters: Option<DeadLetterTable>,
}

/// Each table's statements, in the order of the plans.
#[derive(Debug)]
enum Statements {
    Postgres(Vec<postgres::PgWriter>),
    MySql(Vec<mysql::MySqlWriter>),
}

impl Writer {
    pub async fn new(
        pool: &DbPool,
        plans: Vec<SinkPlan>,
        routes: Routes,
        store: OffsetStore,
        dead_letters: Option<DeadLetterTable>,
    ) -> Result<Writer, sqlx::Error> {
        let statements = match pool {
            DbPool::Postgres(pool) => Statements::Postgres(
                plans
                    .iter()
                    .map(|plan| postgres::PgWriter::new(pool.clone(), plan, store.clone()))
                    .collect(),
            ),
            DbPool::MySql(pool) => {
                let mut writers = Vec::with_capacity(plans.len());
                for plan in &plans {
                    writers.push(mysql::MySqlWriter::new(pool.clone(), plan, store.clone()).await?);
                }
                Statements::MySql(writers)
            }
        };
        Ok(Writer {
            plans,
            routes,
            statements,
            dead_letters,
        })
    }

    /// Applies the batch's changes to each table, writes its dead letters, then moves the
    /// offsets by compare-and-set, in one transaction; rolls back if any offset had moved.
    pub async fn write(
        &self,
        batch: &Batch,
        moves: &[OffsetMove],
    ) -> Result<WriteOutcome, sqlx::Error> {
        let split;
        let parts: Vec<(usize, &Batch)> = if self.plans.len() == 1 {
            vec![(0, batch)] // the usual case: nothing to copy
        } else {
            split = batch.parts(|tp| self.table_of(tp));
            split.iter().map(|(table, part)| (*table, part)).collect()
        };
        let (plans, dead_letters) = (&self.plans, self.dead_letters.as_ref());
        match &self.statements {
            Statements::Postgres(w) => write_batch(w, plans, dead_letters, &parts, moves).await,
            Statements::MySql(w) => write_batch(w, plans, dead_letters, &parts, moves).await,
        }
    }

    /// The index of the table `tp`'s rows go to.
    fn table_of(&self, tp: &TopicPartition) -> usize {
        // The consumer reads only the pipeline's topics, and each has a table.
        self.routes
            .table_of(&tp.topic)
            .unwrap_or_else(|| unreachable!("topic {} of a batch has no table", tp.topic))
    }

    /// Who holds locks on the sink tables or the offsets table inside an open transaction,
    /// one line each, for the WARN line of a lock wait that timed out.
    pub async fn lock_holders(&self) -> Result<Vec<String>, sqlx::Error> {
        let tables: Vec<&TableName> = self.plans.iter().map(|p| &p.table).collect();
        match &self.statements {
            Statements::Postgres(w) => w[0].lock_holders(&tables).await,
            Statements::MySql(w) => w[0].lock_holders(&tables).await,
        }
    }

    /// How rows go in, for the start-up log line.
    pub fn write_method(&self) -> &'static str {
        match &self.statements {
            Statements::Postgres(w) => w[0].write_method(),
            Statements::MySql(_) => "insert",
        }
    }
}

/// Plans for the dialects' statement tests, built without a database.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::mapping::ColumnKind;

    /// How a plan tells an older record from a newer one.
    #[derive(Debug, Clone, Copy)]
    pub enum Guard {
        /// `newer_by` on a `$source_position` column (deletes versioned too).
        SourcePosition,
        /// The Kafka coordinates.
        Coordinates,
        /// Neither.
        Unguarded,
    }

    /// An upsert of table `t` (id bigint, the key; name text; v bigint from
    /// `$source_position`; kafka_partition int and kafka_offset bigint) with deletes and
    /// truncates applied.
    pub fn upsert(backend: Backend, guard: Guard) -> SinkPlan {
        let column = |name: &str, kind, source: &str, role| ColumnPlan {
            name: name.into(),
            kind,
            nullable: role == Role::Plain,
            source: Source::parse(source).expect("source"),
            role,
        };
        let columns = vec![
            column("id", ColumnKind::BIGINT, "/id", Role::Key),
            column("name", ColumnKind::TEXT, "/name", Role::Plain),
            column("v", ColumnKind::BIGINT, "$source_position", Role::Version),
            column(
                "kafka_partition",
                ColumnKind::INT,
                "$partition",
                Role::Plain,
            ),
            column("kafka_offset", ColumnKind::BIGINT, "$offset", Role::Plain),
        ];
        let versioned = matches!(guard, Guard::SourcePosition).then_some(2);
        let position = matches!(guard, Guard::Coordinates).then_some(Position {
            topic: None,
            partition: 3,
            offset: 4,
        });
        SinkPlan {
            backend,
            table: TableName::parse("t").expect("name"),
            identity: "t".into(),
            columns,
            mode: SinkMode::Upsert,
            conflict: vec![0],
            keyed: true,
            newer_by: versioned,
            delete_version: versioned,
            position,
            format: RecordFormat::Debezium,
            truncate: OnTruncate::Apply,
            placeholder: Placeholder::default(),
            binary_mode: BinaryMode::default(),
            deletes: true,
            copy_allowed: true,
            key_equality: None,
        }
    }

    /// The same table in insert mode on the Kafka coordinates (kafka_partition,
    /// kafka_offset), without deletes.
    pub fn insert_by_coordinates(backend: Backend) -> SinkPlan {
        let mut plan = upsert(backend, Guard::Coordinates);
        plan.columns[0].role = Role::Plain;
        SinkPlan {
            mode: SinkMode::Insert,
            conflict: vec![3, 4],
            keyed: false,
            format: RecordFormat::Json,
            truncate: OnTruncate::Refuse,
            deletes: false,
            ..plan
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of one column whose row `i` holds `sizes[i]` bytes.
    fn batch_of(sizes: &[usize]) -> Batch {
        let mut batch = Batch::new(1);
        for size in sizes {
            batch.cells.push_row([Some("x".repeat(*size).as_str())]);
        }
        batch
    }

    fn part_lengths(sizes: &[usize], limit: StatementLimit) -> Vec<usize> {
        let batch = batch_of(sizes);
        let rows: Vec<usize> = (0..sizes.len()).collect();
        statement_parts(&batch, &[0], &rows, limit)
            .iter()
            .map(|p| p.len())
            .collect()
    }

    #[test]
    fn statements_are_bounded_by_rows_and_by_bytes_and_a_large_row_goes_alone() {
        let rows = |rows| StatementLimit {
            rows,
            bytes: usize::MAX,
        };
        assert_eq!(part_lengths(&[1; 7], rows(3)), [3, 3, 1]);
        assert_eq!(part_lengths(&[], rows(3)), Vec::<usize>::new());
        let bytes = |bytes| StatementLimit { rows: 1000, bytes };
        // Each row costs its bytes and CELL_OVERHEAD.
        let row = 100 - CELL_OVERHEAD;
        assert_eq!(part_lengths(&[row; 5], bytes(200)), [2, 2, 1]);
        assert_eq!(part_lengths(&[row; 5], bytes(199)), [1, 1, 1, 1, 1]);
        assert_eq!(part_lengths(&[row, 1000, row, row], bytes(250)), [1, 1, 2]);
    }
}
