//! PostgreSQL statements for a batch: one statement per kind of change whatever the number
//! of rows (several only past 64 MB), binding one `text[]` per column and casting in SQL
//! (`UNNEST($1::text[], …)`).
//!
//! Rows go in by `COPY … FROM STDIN` when the table allows it: PostgreSQL inserts COPY rows
//! in bulk, far faster than an INSERT of the same rows. `COPY` cannot skip or update existing
//! rows, so it runs inside a savepoint, and a batch that meets a row already there (a replay,
//! or in upsert mode a key seen before) is rolled back to it and written again with the
//! `INSERT … ON CONFLICT`. Either way the rows that land are the same — a row that did not
//! exist needs no guard — and they commit with their offsets or not at all. In upsert mode a
//! batch whose COPY met existing keys makes the next batches skip COPY for a while, since a
//! stream of updates would pay for a failed COPY every time.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::{PgConnection, PgPool, Postgres};

use super::guard::{self, Sides};
use super::{
    group_ids, patch_rounds, statement_parts, unavailable_mask, BatchStatements, RowCounts,
    SinkPlan, StatementLimit,
};
use crate::batch::{Batch, Changes, DeadLetter, Patch};
use crate::cells::Column;
use crate::config::{OnTruncate, SinkMode};
use crate::db::{is_rejected_row, is_unique_violation, Backend};
use crate::dead_letters::DeadLetterTable;
use crate::offsets::{OffsetMove, OffsetStore, TopicPartition};
use crate::schema::TableName;

#[derive(Debug)]
pub struct PgWriter {
    pool: PgPool,
    /// `COPY <table> (<columns>) FROM STDIN`, when the table allows it.
    copy_sql: Option<String>,
    /// Upsert mode: batches left before COPY is tried again after one met existing keys.
    copy_pause: Option<AtomicU32>,
    /// `INSERT … ON CONFLICT (<target>) DO NOTHING | DO UPDATE … WHERE <guard>`.
    write_sql: String,
    /// `DELETE … USING UNNEST(<key>…) WHERE <guard>`, with the bound columns' indices.
    delete: Option<(String, Vec<usize>)>,
    /// The same without the key, for truncates (`sink.truncate: apply`).
    truncate: Option<(String, Vec<usize>)>,
    /// Every column's index: an INSERT binds them all.
    all_columns: Vec<usize>,
    /// Per column, whether its cells may hold a byte COPY escapes (see
    /// [`ColumnKind::writes_plain_text`]); the others are copied without a look.
    may_need_escapes: Vec<bool>,
    /// Groups a batch's business keys as the database compares them, with the key columns
    /// it binds (`SinkPlan::key_equality`).
    key_groups: Option<(String, Vec<usize>)>,
    /// The patch statements, in upsert mode on a business key.
    patch: Option<PatchSql>,
    /// The business key's columns (the conflict target).
    conflict: Vec<usize>,
    store: OffsetStore,
}

/// A statement binds one array per column, all in one message: PostgreSQL refuses a message
/// or a value over 1 GB, so a batch of large rows is written in parts well below that.
const STATEMENT_LIMIT: StatementLimit = StatementLimit {
    rows: usize::MAX,
    bytes: 64 << 20,
};

impl BatchStatements for PgWriter {
    type Db = Postgres;

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Deferred constraints are checked at each statement, not at COMMIT: a row they refuse is
    /// then found and named (or dead-lettered) like any other, instead of failing the commit
    /// of the whole batch outside the isolation of refused rows.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET CONSTRAINTS ALL IMMEDIATE")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        batch: &Batch,
        changes: &Changes,
        bulk: bool,
    ) -> Result<RowCounts, sqlx::Error> {
        let mut counts = RowCounts::default();
        counts.deleted +=
            delete_rows(conn, batch, self.truncate.as_ref(), &changes.truncates).await?;
        counts.deleted += delete_rows(conn, batch, self.delete.as_ref(), &changes.deletes).await?;
        if !changes.writes.is_empty() {
            let (written, updated) = self.write_rows(conn, batch, &changes.writes, bulk).await?;
            counts.written = written;
            counts.updated = updated;
        }
        counts.unchanged = Some((changes.writes.len() as u64).saturating_sub(counts.written));
        if let Some(patch) = self.patch.as_ref().filter(|_| !changes.patches.is_empty()) {
            let (updated, absent) = patch_rows(
                conn,
                batch,
                &self.all_columns,
                &self.conflict,
                patch,
                &changes.patches,
            )
            .await?;
            counts.written += updated;
            counts.updated += updated;
            let applied = changes.patches.len() - absent.len();
            counts.unchanged =
                (counts.unchanged).map(|n| (n + applied as u64).saturating_sub(updated));
            counts.add_absent(batch, &absent);
        }
        Ok(counts)
    }

    async fn key_groups(&self, batch: &Batch) -> Result<Option<Vec<usize>>, sqlx::Error> {
        let Some((sql, bound)) = &self.key_groups else {
            return Ok(None);
        };
        let rows: Vec<usize> = (0..batch.len()).collect();
        let query = bound.iter().fold(sqlx::query_scalar(sql), |q, c| {
            q.bind(gather(batch.cells.column(*c), &rows))
        });
        match query.fetch_all(&self.pool).await {
            Ok(first_of_group) => Ok(Some(group_ids::<i64>(first_of_group))),
            Err(e) if is_rejected_row(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn lock_holders(&self, tables: &[&TableName]) -> Result<Vec<String>, sqlx::Error> {
        let tables: Vec<String> = tables.iter().map(|t| t.quoted(Backend::Postgres)).collect();
        sqlx::query_scalar(
            "SELECT format('pid %s (%s, %s) %s, transaction open for %s s', a.pid, \
                        a.application_name, coalesce(host(a.client_addr), 'local socket'), \
                        a.state, round(extract(epoch FROM now() - a.xact_start))) \
                 FROM pg_stat_activity a \
                 WHERE a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL \
                   AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted \
                     AND l.mode = 'RowExclusiveLock' \
                     AND (l.relation = to_regclass('idemsink_offsets') OR l.relation IN \
                       (SELECT to_regclass(t) FROM unnest($1::text[]) t))) \
                 ORDER BY a.xact_start",
        )
        .bind(tables)
        .fetch_all(&self.pool)
        .await
    }

    async fn insert_dead_letters(
        &self,
        conn: &mut PgConnection,
        table: &DeadLetterTable,
        letters: &[&DeadLetter],
    ) -> Result<(), sqlx::Error> {
        table.insert::<Postgres>(conn, letters).await
    }

    async fn compare_and_set(
        &self,
        conn: &mut PgConnection,
        moves: &[OffsetMove],
    ) -> Result<Vec<TopicPartition>, sqlx::Error> {
        self.store.compare_and_set_postgres(conn, moves).await
    }
}

impl PgWriter {
    pub fn new(pool: PgPool, plan: &SinkPlan, store: OffsetStore) -> PgWriter {
        PgWriter {
            pool,
            copy_pause: (plan.mode == SinkMode::Upsert).then(|| AtomicU32::new(0)),
            copy_sql: plan.copy_allowed.then(|| {
                format!(
                    "COPY {} ({}) FROM STDIN",
                    plan.table.quoted(plan.backend),
                    plan.column_list()
                )
            }),
            write_sql: write_sql(plan),
            delete: plan.deletes.then(|| delete_sql(plan, &plan.conflict)),
            truncate: (plan.truncate == OnTruncate::Apply).then(|| delete_sql(plan, &[])),
            all_columns: (0..plan.columns.len()).collect(),
            may_need_escapes: (plan.columns.iter())
                .map(|c| !c.kind.writes_plain_text())
                .collect(),
            key_groups: plan.key_equality.as_ref().map(|equality| {
                let partition: Vec<String> = equality
                    .iter()
                    .enumerate()
                    .map(|(j, e)| e.replace("{v}", &format!("r.c{}", plan.conflict[j])))
                    .collect();
                let sql = format!(
                    "SELECT (min(r.i) OVER (PARTITION BY {}))::int8 FROM {} ORDER BY r.i",
                    partition.join(", "),
                    unnest_numbered(&plan.conflict)
                );
                (sql, plan.conflict.clone())
            }),
            patch: (plan.mode == SinkMode::Upsert && plan.keyed).then(|| patch_sql(plan)),
            conflict: plan.conflict.clone(),
            store,
        }
    }

    pub fn write_method(&self) -> &'static str {
        if self.copy_sql.is_some() {
            "copy"
        } else {
            "insert"
        }
    }

    /// Writes the rows; returns how many the database inserted or updated, and of those
    /// how many it updated. `bulk` lets them go in by COPY.
    async fn write_rows(
        &self,
        tx: &mut PgConnection,
        batch: &Batch,
        rows: &[usize],
        bulk: bool,
    ) -> Result<(u64, u64), sqlx::Error> {
        if let Some(copy_sql) = self.copy_sql.as_ref().filter(|_| bulk && self.copy_now()) {
            sqlx::query("SAVEPOINT idemsink_rows")
                .execute(&mut *tx)
                .await?;
            match copy_rows(tx, copy_sql, batch, &self.may_need_escapes, rows).await {
                Ok(n) => {
                    sqlx::query("RELEASE SAVEPOINT idemsink_rows")
                        .execute(&mut *tx)
                        .await?;
                    return Ok((n, 0));
                }
                Err(e) if is_unique_violation(&e) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT idemsink_rows")
                        .execute(&mut *tx)
                        .await?;
                    if let Some(pause) = &self.copy_pause {
                        pause.store(COPY_PAUSE_BATCHES, Ordering::Relaxed);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let (mut written, mut updated) = (0, 0);
        for part in statement_parts(batch, &self.all_columns, rows, STATEMENT_LIMIT) {
            let insert = (self.all_columns.iter()).fold(sqlx::query_as(&self.write_sql), |q, c| {
                q.bind(gather(batch.cells.column(*c), part))
            });
            let (w, u): (i64, i64) = insert.fetch_one(&mut *tx).await?;
            written += w.max(0) as u64;
            updated += u.max(0) as u64;
        }
        Ok((written, updated))
    }
}

/// Batches an upsert writer skips COPY for after a COPY met existing keys.
const COPY_PAUSE_BATCHES: u32 = 16;

impl PgWriter {
    /// Whether this batch tries COPY first: always in insert mode, and in upsert mode unless
    /// a recent batch showed the keys already exist (counts the pause down).
    fn copy_now(&self) -> bool {
        match &self.copy_pause {
            None => true,
            Some(pause) => pause
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_err(),
        }
    }
}

/// The cells of `rows`, in order, for one array parameter.
fn gather<'a>(cells: &'a Column, rows: &[usize]) -> Vec<Option<&'a str>> {
    rows.iter().map(|r| cells.get(*r)).collect()
}

/// `INSERT INTO t AS t (…) SELECT r.c0::type, … FROM UNNEST($1::text[], …) AS r(c0, …)
/// ON CONFLICT (<target>) DO NOTHING` in insert mode; in upsert mode `DO UPDATE SET` every
/// other column `WHERE` the stored row is not newer. It returns one row: the rows written,
/// and of those the rows updated (a row whose `xmax` is set existed before).
fn write_sql(plan: &SinkPlan) -> String {
    let casts: Vec<String> = plan
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("r.c{i}::{}", c.kind.sql_name()))
        .collect();
    let conflict: Vec<String> = plan.conflict.iter().map(|c| plan.quoted(*c)).collect();
    let update = guard::update_columns(plan);
    let action = if plan.mode == SinkMode::Insert || update.is_empty() {
        "DO NOTHING".to_string()
    } else {
        let sets: Vec<String> = update
            .iter()
            .map(|c| format!("{0} = EXCLUDED.{0}", plan.quoted(*c)))
            .collect();
        let stored = |c: usize| format!("t.{}", plan.quoted(c));
        let incoming = |c: usize| format!("EXCLUDED.{}", plan.quoted(c));
        let sides = Sides {
            stored: &stored,
            incoming: &incoming,
        };
        let guard = guard::incoming_is_newer(plan.newer_by, plan.position, &sides)
            .map_or_else(String::new, |g| format!(" WHERE {g}"));
        format!("DO UPDATE SET {}{guard}", sets.join(", "))
    };
    format!(
        "WITH written AS (INSERT INTO {} AS t ({}) SELECT {} FROM {} ON CONFLICT ({}) {action} \
         RETURNING t.xmax::text <> '0' AS updated) \
         SELECT count(*), count(*) FILTER (WHERE updated) FROM written",
        plan.table.quoted(plan.backend),
        plan.column_list(),
        casts.join(", "),
        unnest((0..plan.columns.len()).collect::<Vec<_>>().as_slice()),
        conflict.join(", "),
    )
}

/// `DELETE FROM t AS t USING UNNEST(…) AS r(…) WHERE <key matches> AND <not older>`, and
/// which columns it binds (the `key`, and the version or the position when the table records
/// it). Without a key (a truncate), it deletes every row one of the bound rows is newer than;
/// without a key or a guard, every row.
fn delete_sql(plan: &SinkPlan, key: &[usize]) -> (String, Vec<usize>) {
    let mut bound = key.to_vec();
    match (plan.delete_version, plan.position) {
        (Some(v), _) => bound.push(v),
        (None, Some(p)) => bound.extend(p.topic.into_iter().chain([p.partition, p.offset])),
        (None, None) => {}
    }
    let table = plan.table.quoted(plan.backend);
    if bound.is_empty() {
        return (format!("DELETE FROM {table}"), bound);
    }
    let mut conditions = key_matches(plan, key);
    let guard = bound_row_is_newer(plan, plan.delete_version);
    conditions.extend(guard.map(|g| format!("({g})")));
    let sql = format!(
        "DELETE FROM {table} AS t USING {} WHERE {}",
        unnest(&bound),
        conditions.join(" AND ")
    );
    (sql, bound)
}

/// `t.<k> = r.c<k>::<type>` for each column of `key`: the stored row of a bound row.
fn key_matches(plan: &SinkPlan, key: &[usize]) -> Vec<String> {
    key.iter()
        .map(|c| {
            format!(
                "t.{} = r.c{c}::{}",
                plan.quoted(*c),
                plan.columns[*c].kind.sql_name()
            )
        })
        .collect()
}

/// The guard of a statement over bound rows (`r`) and the table (`t`): the bound row is
/// newer than the stored one, by `version` or by the Kafka position.
fn bound_row_is_newer(plan: &SinkPlan, version: Option<usize>) -> Option<String> {
    let stored = |c: usize| format!("t.{}", plan.quoted(c));
    let incoming = |c: usize| format!("r.c{c}::{}", plan.columns[c].kind.sql_name());
    let sides = Sides {
        stored: &stored,
        incoming: &incoming,
    };
    guard::incoming_is_newer(version, plan.position, &sides)
}

/// The statements of a patch (see [`Changes::patches`]): which of the bound rows have no
/// stored row (`SELECT r.i … WHERE NOT EXISTS`, binding the key), and the update of those
/// that have one — every column the upsert sets, but those whose cell is unavailable (the
/// last bound array holds, per row, `u` at the position of each such column), where the
/// stored row is not newer.
#[derive(Debug)]
struct PatchSql {
    absent: String,
    update: String,
}

fn patch_sql(plan: &SinkPlan) -> PatchSql {
    let table = plan.table.quoted(plan.backend);
    let key = key_matches(plan, &plan.conflict);
    let absent = format!(
        "SELECT r.i::int8 FROM {} WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {})",
        unnest_numbered(&plan.conflict),
        key.join(" AND ")
    );
    let sets: Vec<String> = guard::update_columns(plan)
        .into_iter()
        .map(|c| {
            format!(
                "{0} = CASE WHEN substr(r.m, {1}, 1) = 'u' THEN t.{0} ELSE r.c{c}::{2} END",
                plan.quoted(c),
                c + 1,
                plan.columns[c].kind.sql_name()
            )
        })
        .collect();
    let all: Vec<usize> = (0..plan.columns.len()).collect();
    let (arrays, names) = unnest_parts(&all);
    let mask = all.len() + 1;
    let mut conditions = key;
    let guard = bound_row_is_newer(plan, plan.newer_by);
    conditions.extend(guard.map(|g| format!("({g})")));
    let update = format!(
        "UPDATE {table} AS t SET {} FROM UNNEST({arrays}, ${mask}::text[]) AS r({names}, m) \
         WHERE {}",
        sets.join(", "),
        conditions.join(" AND ")
    );
    PatchSql { absent, update }
}

/// Applies the patches round by round: finds which rows have no stored row (their records
/// are reported, nothing is written for them), then updates the others. Returns the rows
/// updated and the rows without a stored row.
async fn patch_rows(
    conn: &mut PgConnection,
    batch: &Batch,
    plan_columns: &[usize],
    conflict: &[usize],
    sql: &PatchSql,
    patches: &[Patch],
) -> Result<(u64, Vec<usize>), sqlx::Error> {
    let (mut updated, mut absent) = (0, Vec::new());
    for round in patch_rounds(patches) {
        for rows in statement_parts(batch, plan_columns, &round, STATEMENT_LIMIT) {
            let find = conflict
                .iter()
                .fold(sqlx::query_scalar(&sql.absent), |q, c| {
                    q.bind(gather(batch.cells.column(*c), rows))
                });
            let numbers: Vec<i64> = find.fetch_all(&mut *conn).await?;
            absent.extend(numbers.iter().filter_map(|i| {
                let at = usize::try_from(*i).ok()?.checked_sub(1)?;
                rows.get(at).copied()
            }));
            let masks: Vec<String> = rows
                .iter()
                .map(|r| unavailable_mask(batch, *r, plan_columns.len()))
                .collect();
            let update = plan_columns.iter().fold(sqlx::query(&sql.update), |q, c| {
                q.bind(gather(batch.cells.column(*c), rows))
            });
            updated += update
                .bind(masks)
                .execute(&mut *conn)
                .await?
                .rows_affected();
        }
    }
    Ok((updated, absent))
}

/// Runs `delete` (see [`delete_sql`]) for `rows`, in statements within the limit; returns
/// the rows deleted.
async fn delete_rows(
    conn: &mut PgConnection,
    batch: &Batch,
    delete: Option<&(String, Vec<usize>)>,
    rows: &[usize],
) -> Result<u64, sqlx::Error> {
    let Some((sql, bound)) = delete.filter(|_| !rows.is_empty()) else {
        return Ok(0);
    };
    let mut deleted = 0;
    for rows in statement_parts(batch, bound, rows, STATEMENT_LIMIT) {
        let query = bound.iter().fold(sqlx::query(sql), |q, c| {
            q.bind(gather(batch.cells.column(*c), rows))
        });
        deleted += query.execute(&mut *conn).await?.rows_affected();
    }
    Ok(deleted)
}

/// `UNNEST($1::text[], …) AS r(c<i>, …)`, named by column index so conditions can refer to
/// `r.c<i>` whatever is bound.
fn unnest(columns: &[usize]) -> String {
    let (arrays, names) = unnest_parts(columns);
    format!("UNNEST({arrays}) AS r({names})")
}

/// The same, each row numbered from 1 in `r.i`.
fn unnest_numbered(columns: &[usize]) -> String {
    let (arrays, names) = unnest_parts(columns);
    format!("UNNEST({arrays}) WITH ORDINALITY AS r({names}, i)")
}

fn unnest_parts(columns: &[usize]) -> (String, String) {
    let arrays: Vec<String> = (1..=columns.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let names: Vec<String> = columns.iter().map(|c| format!("c{c}")).collect();
    (arrays.join(", "), names.join(", "))
}

/// Streams the rows' first cells (the table's, one per entry of `may_need_escapes`) as
/// `COPY` text: tab-separated cells, `\N` for NULL, backslash escapes.
async fn copy_rows(
    tx: &mut PgConnection,
    copy_sql: &str,
    batch: &Batch,
    may_need_escapes: &[bool],
    rows: &[usize],
) -> Result<u64, sqlx::Error> {
    let mut copy = tx.copy_in_raw(copy_sql).await?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for row in rows {
        for (column, may_need_escape) in may_need_escapes.iter().enumerate() {
            if column > 0 {
                buf.push(b'\t');
            }
            match batch.cells.column(column).bytes(*row) {
                None => buf.extend_from_slice(b"\\N"),
                Some(cell) if *may_need_escape => push_copy_escaped(&mut buf, cell),
                Some(cell) => {
                    debug_assert!(!cell.iter().any(|b| needs_escape(*b)), "{cell:?}");
                    buf.extend_from_slice(cell);
                }
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

fn push_copy_escaped(buf: &mut Vec<u8>, bytes: &[u8]) {
    // Most cells hold none of the four bytes COPY escapes: a search tells, and the cell is
    // copied whole. Vectorised searches cost more to set up than they save on a short cell.
    let plain = if bytes.len() < SHORT_CELL {
        !bytes.iter().any(|b| needs_escape(*b))
    } else {
        memchr::memchr3(b'\\', b'\n', b'\t', bytes).is_none()
            && memchr::memchr(b'\r', bytes).is_none()
    };
    if plain {
        buf.extend_from_slice(bytes);
        return;
    }
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

/// Below this length a cell is searched byte by byte for what COPY escapes.
const SHORT_CELL: usize = 32;

/// Whether COPY text escapes `b`.
fn needs_escape(b: u8) -> bool {
    matches!(b, b'\\' | b'\n' | b'\r' | b'\t')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::fixtures::{insert_by_coordinates, upsert, Guard};

    /// Every mode's INSERT: on the coordinates (insert), and upserts on a business key
    /// guarded by a version, by the Kafka position, and unguarded.
    #[test]
    fn writes_of_every_mode() {
        let plans = [
            insert_by_coordinates(Backend::Postgres),
            upsert(Backend::Postgres, Guard::SourcePosition),
            upsert(Backend::Postgres, Guard::Coordinates),
            upsert(Backend::Postgres, Guard::Unguarded),
        ];
        // Every mode inserts the same way; they differ in what a conflict does.
        let insert = "WITH written AS (INSERT INTO \"t\" AS t (\"id\", \"name\", \"v\", \
            \"kafka_partition\", \"kafka_offset\") SELECT r.c0::bigint, r.c1::text, \
            r.c2::bigint, r.c3::bigint, r.c4::bigint FROM UNNEST($1::text[], $2::text[], \
            $3::text[], $4::text[], $5::text[]) AS r(c0, c1, c2, c3, c4) ON CONFLICT ";
        let counted = " RETURNING t.xmax::text <> '0' AS updated) SELECT count(*), count(*) \
            FILTER (WHERE updated) FROM written";
        let on_conflict = [
            "(\"kafka_partition\", \"kafka_offset\") DO NOTHING",
            "(\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"kafka_partition\" = \
             EXCLUDED.\"kafka_partition\", \"kafka_offset\" = EXCLUDED.\"kafka_offset\", \"v\" = \
             EXCLUDED.\"v\" WHERE t.\"v\" IS NULL OR EXCLUDED.\"v\" > t.\"v\"",
            "(\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"v\" = EXCLUDED.\"v\", \
             \"kafka_offset\" = EXCLUDED.\"kafka_offset\", \"kafka_partition\" = \
             EXCLUDED.\"kafka_partition\" WHERE NOT COALESCE(t.\"kafka_partition\" = \
             EXCLUDED.\"kafka_partition\" AND t.\"kafka_offset\" >= EXCLUDED.\"kafka_offset\", \
             FALSE)",
            "(\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"v\" = EXCLUDED.\"v\", \
             \"kafka_partition\" = EXCLUDED.\"kafka_partition\", \"kafka_offset\" = \
             EXCLUDED.\"kafka_offset\"",
        ];
        let expected = on_conflict.map(|action| format!("{insert}{action}{counted}"));
        for (plan, expected) in plans.iter().zip(expected) {
            assert_eq!(write_sql(plan), expected);
        }
    }

    #[test]
    fn patches_update_the_stored_row_leaving_unavailable_columns() {
        let plan = upsert(Backend::Postgres, Guard::SourcePosition);
        let patch = patch_sql(&plan);
        assert_eq!(
            patch.absent,
            "SELECT r.i::int8 FROM UNNEST($1::text[]) WITH ORDINALITY AS r(c0, i) WHERE NOT EXISTS \
             (SELECT 1 FROM \"t\" AS t WHERE t.\"id\" = r.c0::bigint)"
        );
        assert_eq!(
            patch.update,
            "UPDATE \"t\" AS t SET \
             \"name\" = CASE WHEN substr(r.m, 2, 1) = 'u' THEN t.\"name\" ELSE r.c1::text END, \
             \"kafka_partition\" = CASE WHEN substr(r.m, 4, 1) = 'u' THEN t.\"kafka_partition\" \
             ELSE r.c3::bigint END, \
             \"kafka_offset\" = CASE WHEN substr(r.m, 5, 1) = 'u' THEN t.\"kafka_offset\" \
             ELSE r.c4::bigint END, \
             \"v\" = CASE WHEN substr(r.m, 3, 1) = 'u' THEN t.\"v\" ELSE r.c2::bigint END \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
             AS r(c0, c1, c2, c3, c4, m) \
             WHERE t.\"id\" = r.c0::bigint AND (t.\"v\" IS NULL OR r.c2::bigint > t.\"v\")"
        );
    }

    #[test]
    fn deletes_and_truncates_delete_what_they_are_newer_than() {
        let statements = |guard| {
            let plan = upsert(Backend::Postgres, guard);
            (delete_sql(&plan, &plan.conflict), delete_sql(&plan, &[]))
        };
        let (delete, truncate) = statements(Guard::SourcePosition);
        assert_eq!(
            delete,
            (
                "DELETE FROM \"t\" AS t USING UNNEST($1::text[], $2::text[]) AS r(c0, c2) WHERE \
                 t.\"id\" = r.c0::bigint AND (t.\"v\" IS NULL OR r.c2::bigint > t.\"v\")"
                    .to_string(),
                vec![0, 2]
            )
        );
        assert_eq!(
            truncate,
            (
                "DELETE FROM \"t\" AS t USING UNNEST($1::text[]) AS r(c2) WHERE \
                 (t.\"v\" IS NULL OR r.c2::bigint > t.\"v\")"
                    .to_string(),
                vec![2]
            )
        );
        let (delete, truncate) = statements(Guard::Coordinates);
        assert_eq!(delete.1, [0, 3, 4]);
        assert_eq!(
            truncate.0,
            "DELETE FROM \"t\" AS t USING UNNEST($1::text[], $2::text[]) AS r(c3, c4) WHERE \
             (NOT COALESCE(t.\"kafka_partition\" = r.c3::bigint AND t.\"kafka_offset\" >= \
             r.c4::bigint, FALSE))"
        );
        let (delete, truncate) = statements(Guard::Unguarded);
        assert_eq!(
            delete.0,
            "DELETE FROM \"t\" AS t USING UNNEST($1::text[]) AS r(c0) WHERE t.\"id\" = r.c0::bigint"
        );
        assert_eq!(truncate, ("DELETE FROM \"t\"".to_string(), vec![]));
    }

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut buf = Vec::new();
        push_copy_escaped(&mut buf, b"a\tb\nc\rd\\e\\.f");
        assert_eq!(buf, b"a\\tb\\nc\\rd\\\\e\\\\.f");
        for (text, escaped) in [
            ("plain text, no escapes", "plain text, no escapes"),
            ("only\r", "only\\r"),
            ("\\", "\\\\"),
            ("", ""),
            // Other control characters pass as they are.
            ("v\x0bf\x0c", "v\x0bf\x0c"),
        ] {
            buf.clear();
            push_copy_escaped(&mut buf, text.as_bytes());
            assert_eq!(buf, escaped.as_bytes(), "{text:?}");
        }
        // A long cell, whose one escape comes last.
        let long = format!("{}\n", "x".repeat(1000));
        buf.clear();
        push_copy_escaped(&mut buf, long.as_bytes());
        assert_eq!(buf, format!("{}\\n", "x".repeat(1000)).as_bytes());
    }
}
