//! The SQL writer: plans the statements from the table's own description, and writes one
//! batch — its rows and the offsets that cover them — in one transaction (see [`SqlWriter`]).

use sqlx::{PgConnection, PgPool};

use crate::batch::Batch;
use crate::config::{ConfigError, LoadedPipeline, SinkMode};
use crate::mapping::{ColumnPlan, RowMapper, Source};
use crate::offsets::{OffsetMove, OffsetStore, TopicPartition};
use crate::schema::{quote_list, TableName, TableSchema};

/// What the table says about a pipeline's mapping, checked.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub table: TableName,
    pub columns: Vec<ColumnPlan>,
    /// The `ON CONFLICT` target.
    pub conflict_columns: Vec<String>,
    /// Whether rows may go in by `COPY` (see [`SqlWriter`]).
    pub copy_allowed: bool,
}

impl SinkPlan {
    /// Describes the target table and checks the mapping against it. Problems come back
    /// with the file and key they concern.
    pub async fn prepare(
        p: &LoadedPipeline,
        conn: &mut PgConnection,
    ) -> Result<SinkPlan, Vec<ConfigError>> {
        let table =
            TableName::parse(&p.config.sink.table).map_err(|e| vec![p.error("sink.table", e)])?;
        let schema = TableSchema::load(conn, &table)
            .await
            .map_err(
                |e| vec![p.error("sink.table", format!("cannot describe table {table}: {e}"))],
            )?
            .ok_or_else(|| vec![p.error("sink.table", format!("table {table} does not exist"))])?;
        let columns = schema.plan(&p.columns).map_err(|problems| {
            problems
                .into_iter()
                .map(|(key, message)| p.error(&key, message))
                .collect::<Vec<_>>()
        })?;
        let conflict_columns: Vec<String> = match p.config.sink.mode {
            SinkMode::Insert => columns
                .iter()
                .filter(|c| matches!(c.source, Source::Topic | Source::Partition | Source::Offset))
                .map(|c| c.name.clone())
                .collect(),
        };
        let target: Vec<&str> = conflict_columns.iter().map(String::as_str).collect();
        if !schema.has_unique_key(&target) {
            return Err(vec![p.error(
                "sink.columns",
                format!(
                    "table {table} needs a unique index or constraint on exactly ({}) for mode insert; e.g. \
                     ALTER TABLE {} ADD UNIQUE ({})",
                    target.join(", "),
                    table.quoted(),
                    quote_list(target.iter().copied())
                ),
            )]);
        }
        Ok(SinkPlan {
            table,
            columns,
            conflict_columns,
            copy_allowed: schema.copy_allowed,
        })
    }

    pub fn mapper(&self) -> RowMapper {
        RowMapper::new(self.columns.clone())
    }

    /// `INSERT … SELECT … FROM UNNEST($1::text[], …) ON CONFLICT (…) DO NOTHING`: one
    /// statement per batch whatever its size, binding one array per column.
    fn insert_sql(&self) -> String {
        let casts: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("r.c{i}::{}", c.kind.sql_name()))
            .collect();
        let arrays: Vec<String> = (1..=self.columns.len())
            .map(|i| format!("${i}::text[]"))
            .collect();
        let aliases: Vec<String> = (0..self.columns.len()).map(|i| format!("c{i}")).collect();
        format!(
            "INSERT INTO {} ({}) SELECT {} FROM UNNEST({}) AS r({}) ON CONFLICT ({}) DO NOTHING",
            self.table.quoted(),
            self.column_list(),
            casts.join(", "),
            arrays.join(", "),
            aliases.join(", "),
            quote_list(self.conflict_columns.iter().map(String::as_str)),
        )
    }

    /// `COPY <table> (<columns>) FROM STDIN`, when the table allows it.
    fn copy_sql(&self) -> Option<String> {
        self.copy_allowed.then(|| {
            format!(
                "COPY {} ({}) FROM STDIN",
                self.table.quoted(),
                self.column_list()
            )
        })
    }

    fn column_list(&self) -> String {
        quote_list(self.columns.iter().map(|c| c.name.as_str()))
    }
}

/// How a batch's transaction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Rows and offsets committed; `inserted` rows were new (the rest were replays).
    Committed { inserted: u64 },
    /// Rolled back: these partitions' stored offsets were not the expected ones.
    Conflict(Vec<TopicPartition>),
}

/// Writes batches into one table, and offsets into the offset store, transactionally.
///
/// Rows go in by `COPY … FROM STDIN` inside the batch's transaction when the table allows it:
/// PostgreSQL inserts COPY rows in bulk, far faster than an INSERT of the same rows. `COPY`
/// cannot skip existing rows, so it runs inside a savepoint, and a batch that meets a row
/// already written (a replay after a restart or a rebalance) is rolled back to it and written
/// again with `INSERT … ON CONFLICT (<conflict columns>) DO NOTHING`. Either way the rows that
/// land are the same, and they commit with their offsets or not at all.
#[derive(Debug, Clone)]
pub struct SqlWriter {
    pool: PgPool,
    /// `COPY <table> (<columns>) FROM STDIN`, when the table allows it.
    copy_sql: Option<String>,
    /// `INSERT … ON CONFLICT (<conflict columns>) DO NOTHING`.
    insert_sql: String,
    store: OffsetStore,
}

/// PostgreSQL's SQLSTATE for unique_violation.
const UNIQUE_VIOLATION: &str = "23505";

impl SqlWriter {
    pub fn new(pool: PgPool, plan: &SinkPlan, store: OffsetStore) -> SqlWriter {
        SqlWriter {
            pool,
            copy_sql: plan.copy_sql(),
            insert_sql: plan.insert_sql(),
            store,
        }
    }

    /// Writes the rows, skipping those already present; returns how many were new.
    async fn insert_rows(&self, tx: &mut PgConnection, batch: &Batch) -> Result<u64, sqlx::Error> {
        if let Some(copy_sql) = &self.copy_sql {
            sqlx::query("SAVEPOINT idemsink_rows")
                .execute(&mut *tx)
                .await?;
            match copy_rows(tx, copy_sql, batch).await {
                Ok(rows) => {
                    sqlx::query("RELEASE SAVEPOINT idemsink_rows")
                        .execute(&mut *tx)
                        .await?;
                    return Ok(rows);
                }
                Err(e) if is_unique_violation(&e) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT idemsink_rows")
                        .execute(&mut *tx)
                        .await?;
                }
                Err(e) => return Err(e),
            }
        }
        let insert = batch
            .columns
            .iter()
            .fold(sqlx::query(&self.insert_sql), |q, cells| {
                q.bind(cells.as_slice())
            });
        Ok(insert.execute(&mut *tx).await?.rows_affected())
    }

    /// Inserts the batch's rows, then moves the offsets by compare-and-set, in one
    /// transaction; rolls back if any offset had moved.
    pub async fn write(
        &self,
        batch: &Batch,
        moves: &[OffsetMove],
    ) -> Result<WriteOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let inserted = if batch.is_empty() {
            0
        } else {
            self.insert_rows(&mut tx, batch).await?
        };
        let conflicts = self.store.compare_and_set(&mut tx, moves).await?;
        if conflicts.is_empty() {
            tx.commit().await?;
            Ok(WriteOutcome::Committed { inserted })
        } else {
            tx.rollback().await?;
            Ok(WriteOutcome::Conflict(conflicts))
        }
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some(UNIQUE_VIOLATION)
}

/// Streams the batch as `COPY` text: tab-separated cells, `\N` for NULL, backslash escapes.
async fn copy_rows(
    tx: &mut PgConnection,
    copy_sql: &str,
    batch: &Batch,
) -> Result<u64, sqlx::Error> {
    let mut copy = tx.copy_in_raw(copy_sql).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for row in 0..batch.len() {
        for (i, column) in batch.columns.iter().enumerate() {
            if i > 0 {
                buf.push(b'\t');
            }
            match &column[row] {
                None => buf.extend_from_slice(b"\\N"),
                Some(text) => push_copy_escaped(&mut buf, text),
            }
        }
        buf.push(b'\n');
        if buf.len() >= 60 * 1024 {
            copy.send(buf.as_slice()).await?;
            buf.clear();
        }
    }
    copy.send(buf).await?;
    copy.finish().await
}

fn push_copy_escaped(buf: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut plain_from = 0;
    for (i, b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        buf.extend_from_slice(&bytes[plain_from..i]);
        buf.extend_from_slice(escaped);
        plain_from = i + 1;
    }
    buf.extend_from_slice(&bytes[plain_from..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut buf = Vec::new();
        push_copy_escaped(&mut buf, "a\tb\nc\rd\\e\\.f");
        assert_eq!(buf, b"a\\tb\\nc\\rd\\\\e\\\\.f");
    }
}
