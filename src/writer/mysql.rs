//! MySQL and MariaDB statements for a batch: multi-row `INSERT … ON DUPLICATE KEY UPDATE`
//! in chunks (the protocol binds at most 65,535 parameters per statement, and a statement
//! must fit in the server's `max_allowed_packet`), and deletes as a join against the
//! batch's keys. Never `INSERT IGNORE`: it would also turn truncation and
//! NOT NULL violations into warnings, and a bad row must fail as it does in PostgreSQL.
//!
//! `ON DUPLICATE KEY UPDATE` assigns left to right, each assignment seeing the ones before.
//! Every assignment is guarded by the same condition on the stored row
//! (`guard::incoming_is_newer`), and the columns that condition reads are assigned last
//! (`guard::update_columns` says why that order), so the condition is decided on the stored
//! values. MySQL 8.0.19+ names the incoming row by an alias and
//! deprecates `VALUES(col)`; MariaDB has only `VALUES(col)`: the server's version decides.

use sqlx::mysql::MySqlArguments;
use sqlx::query::Query;
use sqlx::{MySql, MySqlConnection, MySqlPool, Row};

use super::guard::{self, Sides};
use super::{
    group_ids, patch_rounds, row_bytes, statement_parts, unavailable_mask, BatchStatements,
    RejectedRow, RowCounts, SinkPlan, StatementLimit,
};
use crate::batch::{Batch, Changes, DeadLetter, Patch};
use crate::config::{OnTruncate, SinkMode};
use crate::db::is_rejected_row;
use crate::dead_letters::DeadLetterTable;
use crate::mapping::ColumnKind;
use crate::offsets::{OffsetMove, OffsetStore, TopicPartition};
use crate::schema::TableName;

/// Rows per INSERT statement, at most: large enough to amortise round trips, small enough
/// to keep a statement's text and plan small.
const MAX_ROWS_PER_STATEMENT: usize = 1000;
const MAX_PARAMETERS: usize = 65_535;
/// Bytes per statement, at most, whatever `max_allowed_packet` allows: a statement is built
/// in memory on both sides before it runs.
const MAX_STATEMENT_BYTES: usize = 64 << 20;
/// What a statement's packet holds besides its parameters' cells.
const PACKET_HEADER_BYTES: usize = 1024;

#[derive(Debug)]
pub struct MySqlWriter {
    pool: MySqlPool,
    store: OffsetStore,
    /// `INSERT INTO t (…) VALUES `.
    insert_head: String,
    /// One row's placeholders: `(?, UNHEX(?), …)`.
    insert_row: String,
    /// ` [AS idemsink_new] ON DUPLICATE KEY UPDATE …`.
    insert_tail: String,
    /// The bound on an INSERT, from the server's `max_allowed_packet`.
    insert_limit: StatementLimit,
    /// `max_allowed_packet`: one statement, with all its parameters, must fit in it.
    max_packet: usize,
    /// Every column's index: an INSERT binds them all.
    all_columns: Vec<usize>,
    /// Per business key column, an expression of `r.k<j>` whose text is equal exactly when
    /// the database finds the values equal (`SinkPlan::key_equality`).
    key_canonical: Option<Vec<String>>,
    /// The business key's columns (the conflict target).
    conflict: Vec<usize>,
    /// The INSERT for a full chunk, prepared once and reused.
    full_insert: String,
    delete: Option<DeleteSql>,
    /// The same without the key, for truncates (`sink.truncate: apply`).
    truncate: Option<DeleteSql>,
    /// The kind of each column, for binding.
    kinds: Vec<ColumnKind>,
    /// The plan patch statements are built from, in upsert mode on a business key (their
    /// text depends on the number of rows).
    patch: Option<SinkPlan>,
}

/// `DELETE t FROM <table> AS t JOIN (SELECT ? AS c<i>, … UNION ALL SELECT ?, …) AS r ON
/// <key matches> WHERE <not older>`, in parts. Without a key (a truncate) every stored row
/// the bound rows are newer than goes; without a key or a guard, every row.
#[derive(Debug)]
struct DeleteSql {
    head: String,
    first_row: String,
    next_row: String,
    tail: String,
    bound: Vec<usize>,
    /// How many rows one statement takes, from the server's `max_allowed_packet`.
    limit: StatementLimit,
}

impl BatchStatements for MySqlWriter {
    type Db = MySql;

    fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    async fn apply(
        &self,
        conn: &mut MySqlConnection,
        batch: &Batch,
        changes: &Changes,
        _bulk: bool,
    ) -> Result<RowCounts, sqlx::Error> {
        let mut counts = RowCounts::default();
        counts.deleted +=
            (self.delete_rows(conn, self.truncate.as_ref(), batch, &changes.truncates)).await?;
        counts.deleted += self
            .delete_rows(conn, self.delete.as_ref(), batch, &changes.deletes)
            .await?;
        for rows in statement_parts(batch, &self.all_columns, &changes.writes, self.insert_limit) {
            let affected = self.insert_rows(conn, batch, rows).await?;
            // With CLIENT_FOUND_ROWS (sqlx always sets it) MySQL counts an insert and a
            // duplicate left as it was as 1, an update as 2: only the updates stand out.
            counts.written += rows.len() as u64;
            counts.updated += affected.saturating_sub(rows.len() as u64);
        }
        if let Some(plan) = self.patch.as_ref().filter(|_| !changes.patches.is_empty()) {
            let (updated, absent) = self.patch_rows(conn, plan, batch, &changes.patches).await?;
            counts.written += updated;
            counts.updated += updated;
            counts.add_absent(batch, &absent);
        }
        Ok(counts)
    }

    async fn key_groups(&self, batch: &Batch) -> Result<Option<Vec<usize>>, sqlx::Error> {
        let Some(canonical) = &self.key_canonical else {
            return Ok(None);
        };
        let key = &self.conflict;
        let rows: Vec<usize> = (0..batch.len()).collect();
        let limit = StatementLimit {
            rows: (MAX_PARAMETERS / key.len().max(1)).clamp(1, MAX_ROWS_PER_STATEMENT),
            bytes: self.insert_limit.bytes,
        };
        let mut forms: Vec<Option<String>> = Vec::with_capacity(rows.len());
        for part in statement_parts(batch, key, &rows, limit) {
            let sql = canonical_keys_sql(canonical, part.len());
            let query = part
                .iter()
                .fold(sqlx::query_scalar(&sql).persistent(false), |q, row| {
                    key.iter().fold(q, |q, c| q.bind(batch.cells.get(*c, *row)))
                });
            match query.fetch_all(&self.pool).await {
                Ok(part_forms) => forms.extend(part_forms),
                Err(e) if is_rejected_row(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(group_ids(forms)))
    }

    /// MySQL refuses a packet over `max_allowed_packet` and closes the connection; a row
    /// that cannot fit even alone is named before anything is sent. A dead letter could not
    /// hold it either, so it stops the pipeline whatever `errors.tolerance` says.
    fn too_large(&self, batch: &Batch, changes: &Changes) -> Option<RejectedRow> {
        let deletes = changes.deletes.iter().map(|row| {
            let bound = self.delete.as_ref().map_or(&[][..], |d| &d.bound[..]);
            (*row, row_bytes(batch, bound, *row))
        });
        let patches = changes.patches.iter().map(|p| &p.row);
        let writes = (changes.writes.iter().chain(patches))
            .map(|row| (*row, row_bytes(batch, &self.all_columns, *row)));
        deletes
            .chain(writes)
            .find(|(_, bytes)| bytes + PACKET_HEADER_BYTES > self.max_packet)
            .map(|(row, bytes)| RejectedRow {
                row,
                sqlstate: None,
                error: format!(
                    "the row needs a statement of about {bytes} bytes, more than the server's \
                     max_allowed_packet ({} bytes) lets one statement carry; raise it (SET GLOBAL \
                     max_allowed_packet = …, or in the server's configuration) and restart",
                    self.max_packet
                ),
            })
    }

    /// Any session's transaction holding row locks: InnoDB does not say on which table
    /// cheaply. Other sessions are shown only to a user with the PROCESS privilege.
    async fn lock_holders(&self, _tables: &[&TableName]) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT CONCAT('connection ', t.trx_mysql_thread_id, ' (', \
                        COALESCE(p.USER, '?'), '@', COALESCE(p.HOST, '?'), ') ', \
                        COALESCE(p.COMMAND, '?'), ', transaction open for ', \
                        TIMESTAMPDIFF(SECOND, t.trx_started, NOW()), ' s, ', \
                        t.trx_rows_locked, ' rows locked') \
                 FROM information_schema.INNODB_TRX t \
                 LEFT JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id \
                 WHERE t.trx_mysql_thread_id <> CONNECTION_ID() AND t.trx_rows_locked > 0 \
                 ORDER BY t.trx_started",
        )
        .fetch_all(&self.pool)
        .await
    }

    async fn insert_dead_letters(
        &self,
        conn: &mut MySqlConnection,
        table: &DeadLetterTable,
        letters: &[&DeadLetter],
    ) -> Result<(), sqlx::Error> {
        let cut: Vec<Option<DeadLetter>> = (letters.iter())
            .map(|letter| crate::dead_letters::fitted(letter, self.max_packet))
            .collect();
        let letters: Vec<&DeadLetter> = (letters.iter().zip(&cut))
            .map(|(letter, cut)| cut.as_ref().unwrap_or(letter))
            .collect();
        table.insert::<MySql>(conn, &letters).await
    }

    async fn compare_and_set(
        &self,
        conn: &mut MySqlConnection,
        moves: &[OffsetMove],
    ) -> Result<Vec<TopicPartition>, sqlx::Error> {
        self.store.compare_and_set_mysql(conn, moves).await
    }
}

impl MySqlWriter {
    pub async fn new(
        pool: MySqlPool,
        plan: &SinkPlan,
        store: OffsetStore,
    ) -> Result<MySqlWriter, sqlx::Error> {
        let version: String = sqlx::query_scalar("SELECT VERSION()")
            .fetch_one(&pool)
            .await?;
        let row_alias = has_row_alias(&version);
        let insert_head = format!(
            "INSERT INTO {} ({}) VALUES ",
            plan.table.quoted(plan.backend),
            plan.column_list()
        );
        let placeholders: Vec<&str> = plan
            .columns
            .iter()
            .map(|c| match c.kind {
                ColumnKind::Binary { .. } => "UNHEX(?)",
                _ => "?",
            })
            .collect();
        let insert_row = format!("({})", placeholders.join(", "));
        let insert_tail = on_duplicate_key(plan, row_alias);
        let max_packet: i64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS SIGNED)")
            .fetch_one(&pool)
            .await?;
        let max_packet = usize::try_from(max_packet).unwrap_or(usize::MAX);
        let bytes = max_packet
            .saturating_sub(PACKET_HEADER_BYTES)
            .min(MAX_STATEMENT_BYTES);
        let per_statement =
            |bound: usize| (MAX_PARAMETERS / bound.max(1)).clamp(1, MAX_ROWS_PER_STATEMENT);
        let rows_per_statement = per_statement(plan.columns.len());
        let limited = |bound: &[usize]| StatementLimit {
            rows: per_statement(bound.len()),
            bytes,
        };
        let delete = plan
            .deletes
            .then(|| delete_sql(plan, &plan.conflict, limited));
        let truncate = (plan.truncate == OnTruncate::Apply).then(|| delete_sql(plan, &[], limited));
        let full_insert = insert_sql(&insert_head, &insert_row, &insert_tail, rows_per_statement);
        Ok(MySqlWriter {
            pool,
            store,
            full_insert,
            insert_head,
            insert_row,
            insert_tail,
            insert_limit: StatementLimit {
                rows: rows_per_statement,
                bytes,
            },
            max_packet,
            all_columns: (0..plan.columns.len()).collect(),
            conflict: plan.conflict.clone(),
            key_canonical: plan.key_equality.as_ref().map(|equality| {
                (equality.iter().enumerate())
                    .map(|(j, e)| e.replace("{v}", &format!("r.k{j}")))
                    .collect()
            }),
            delete,
            truncate,
            kinds: plan.columns.iter().map(|c| c.kind).collect(),
            patch: (plan.mode == SinkMode::Upsert && plan.keyed).then(|| plan.clone()),
        })
    }

    async fn insert_rows(
        &self,
        tx: &mut MySqlConnection,
        batch: &Batch,
        rows: &[usize],
    ) -> Result<u64, sqlx::Error> {
        let partial;
        let sql = if rows.len() == self.insert_limit.rows {
            &self.full_insert
        } else {
            partial = insert_sql(
                &self.insert_head,
                &self.insert_row,
                &self.insert_tail,
                rows.len(),
            );
            &partial
        };
        let mut query = sqlx::query(sql).persistent(rows.len() == self.insert_limit.rows);
        for row in rows {
            for column in &self.all_columns {
                query = query.bind(batch.cells.get(*column, *row));
            }
        }
        Ok(query.execute(&mut *tx).await?.rows_affected())
    }

    /// Applies the patches round by round: finds which rows have no stored row (their
    /// records are reported, nothing is written for them), then updates the others. Returns
    /// the rows the update matched and the rows without a stored row.
    async fn patch_rows(
        &self,
        tx: &mut MySqlConnection,
        plan: &SinkPlan,
        batch: &Batch,
        patches: &[Patch],
    ) -> Result<(u64, Vec<usize>), sqlx::Error> {
        let (mut updated, mut absent) = (0, Vec::new());
        let columns = self.all_columns.len();
        // Each row binds its cells and its mask.
        let limit = StatementLimit {
            rows: (MAX_PARAMETERS / (columns + 1)).clamp(1, MAX_ROWS_PER_STATEMENT),
            bytes: self.insert_limit.bytes,
        };
        for round in patch_rounds(patches) {
            for rows in statement_parts(batch, &self.all_columns, &round, limit) {
                let (absent_sql, update_sql) = patch_sql(plan, rows.len());
                let mut find = sqlx::query(&absent_sql).persistent(false);
                for row in rows {
                    for c in &self.conflict {
                        find = bind_typed(find, self.kinds[*c], batch.cells.get(*c, *row));
                    }
                }
                for found in find.fetch_all(&mut *tx).await? {
                    let i: i64 = found.try_get(0)?;
                    absent.extend(usize::try_from(i).ok().and_then(|i| rows.get(i)));
                }
                let masks: Vec<String> = (rows.iter())
                    .map(|r| unavailable_mask(batch, *r, columns))
                    .collect();
                let mut update = sqlx::query(&update_sql).persistent(false);
                for (row, mask) in rows.iter().zip(&masks) {
                    for c in &self.all_columns {
                        update = bind_typed(update, self.kinds[*c], batch.cells.get(*c, *row));
                    }
                    update = update.bind(mask.as_str());
                }
                updated += update.execute(&mut *tx).await?.rows_affected();
            }
        }
        Ok((updated, absent))
    }

    /// Runs `delete` (see [`delete_sql`]) for `rows`, in statements within its limit;
    /// returns the rows deleted.
    async fn delete_rows(
        &self,
        tx: &mut MySqlConnection,
        delete: Option<&DeleteSql>,
        batch: &Batch,
        rows: &[usize],
    ) -> Result<u64, sqlx::Error> {
        let Some(delete) = delete.filter(|_| !rows.is_empty()) else {
            return Ok(0);
        };
        let mut deleted = 0;
        for rows in statement_parts(batch, &delete.bound, rows, delete.limit) {
            let mut sql = format!("{}{}", delete.head, delete.first_row);
            for _ in 1..rows.len() {
                sql.push_str(&delete.next_row);
            }
            sql.push_str(&delete.tail);
            let mut query = sqlx::query(&sql).persistent(false);
            for row in rows {
                for c in &delete.bound {
                    query = bind_typed(query, self.kinds[*c], batch.cells.get(*c, *row));
                }
            }
            deleted += query.execute(&mut *tx).await?.rows_affected();
        }
        Ok(deleted)
    }
}

/// `SELECT CAST(JSON_ARRAY(<canonical forms>) AS CHAR) FROM (SELECT 0 AS i, ? AS k0, … UNION
/// ALL SELECT 1, ?, … ) AS r ORDER BY r.i`, for `rows` keys.
fn canonical_keys_sql(canonical: &[String], rows: usize) -> String {
    let placeholders: Vec<String> = (0..canonical.len()).map(|j| format!("? AS k{j}")).collect();
    let mut sql = format!(
        "SELECT CAST(JSON_ARRAY({}) AS CHAR) FROM (",
        canonical.join(", ")
    );
    for i in 0..rows {
        if i > 0 {
            sql.push_str(" UNION ALL ");
        }
        sql.push_str(&format!("SELECT {i} AS i, {}", placeholders.join(", ")));
    }
    sql.push_str(") AS r ORDER BY r.i");
    sql
}

/// Whether the server names the incoming row with `AS alias` (MySQL 8.0.19 and later).
fn has_row_alias(version: &str) -> bool {
    if version.contains("MariaDB") {
        return false;
    }
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let numbers = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    numbers >= (8, 0, 19)
}

fn insert_sql(head: &str, row: &str, tail: &str, rows: usize) -> String {
    let mut sql = String::with_capacity(head.len() + (row.len() + 1) * rows + tail.len());
    sql.push_str(head);
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(row);
    }
    sql.push_str(tail);
    sql
}

/// The part after the VALUES list. Insert mode, or nothing to set: a no-op assignment, so a
/// duplicate is skipped and every other error still raised.
fn on_duplicate_key(plan: &SinkPlan, row_alias: bool) -> String {
    let update = guard::update_columns(plan);
    if plan.mode == SinkMode::Insert || update.is_empty() {
        let first = plan.quoted(plan.conflict[0]);
        return format!(" ON DUPLICATE KEY UPDATE {first} = {first}");
    }
    let incoming = |c: usize| {
        if row_alias {
            format!("idemsink_new.{}", plan.quoted(c))
        } else {
            format!("VALUES({})", plan.quoted(c))
        }
    };
    let stored = |c: usize| plan.quoted(c);
    let sides = Sides {
        stored: &stored,
        incoming: &incoming,
    };
    let guard = guard::incoming_is_newer(plan.newer_by, plan.position, &sides);
    let sets: Vec<String> = update
        .iter()
        .map(|c| {
            let column = plan.quoted(*c);
            match &guard {
                Some(g) => format!("{column} = IF({g}, {}, {column})", incoming(*c)),
                None => format!("{column} = {}", incoming(*c)),
            }
        })
        .collect();
    let alias = if row_alias { " AS idemsink_new" } else { "" };
    format!("{alias} ON DUPLICATE KEY UPDATE {}", sets.join(", "))
}

fn delete_sql(
    plan: &SinkPlan,
    key: &[usize],
    limit: impl Fn(&[usize]) -> StatementLimit,
) -> DeleteSql {
    let mut bound = key.to_vec();
    match (plan.delete_version, plan.position) {
        (Some(v), _) => bound.push(v),
        (None, Some(p)) => bound.extend(p.topic.into_iter().chain([p.partition, p.offset])),
        (None, None) => {}
    }
    let table = plan.table.quoted(plan.backend);
    if bound.is_empty() {
        // A truncate without a guard: every row.
        return DeleteSql {
            head: format!("DELETE FROM {table}"),
            first_row: String::new(),
            next_row: String::new(),
            tail: String::new(),
            limit: limit(&bound),
            bound,
        };
    }
    let first: Vec<String> = bound
        .iter()
        .map(|c| format!("{} AS c{c}", placeholder(plan, *c)))
        .collect();
    let next: Vec<String> = bound.iter().map(|c| placeholder(plan, *c)).collect();
    let on = key_matches(plan, key);
    // Without a key (a truncate), every stored row meets every bound row.
    let on = if on.is_empty() {
        "TRUE".to_string()
    } else {
        on.join(" AND ")
    };
    let guard = where_bound_row_is_newer(plan, plan.delete_version);
    DeleteSql {
        head: format!("DELETE t FROM {table} AS t JOIN ("),
        first_row: format!("SELECT {}", first.join(", ")),
        next_row: format!(" UNION ALL SELECT {}", next.join(", ")),
        tail: format!(") AS r ON {on}{guard}"),
        limit: limit(&bound),
        bound,
    }
}

/// ` WHERE <guard>` of a statement joining the table (`t`) with bound rows (`r`): the bound
/// row is newer than the stored one, by `version` or by the Kafka position; empty without
/// either.
fn where_bound_row_is_newer(plan: &SinkPlan, version: Option<usize>) -> String {
    let stored = |c: usize| format!("t.{}", plan.quoted(c));
    let incoming = |c: usize| format!("r.c{c}");
    let sides = Sides {
        stored: &stored,
        incoming: &incoming,
    };
    guard::incoming_is_newer(version, plan.position, &sides)
        .map_or_else(String::new, |g| format!(" WHERE {g}"))
}

/// A bound cell of column `c` in a derived table of rows, typed as the column compares.
fn placeholder(plan: &SinkPlan, c: usize) -> String {
    match plan.columns[c].kind {
        ColumnKind::Binary { .. } => "UNHEX(?)".to_string(),
        ColumnKind::Numeric { precision, scale } => {
            format!("CAST(? AS DECIMAL({}, {scale}))", precision.unwrap_or(65))
        }
        _ => "?".to_string(),
    }
}

/// `t.<k> = r.c<k>` for each column of `key`: the stored row of a bound row.
fn key_matches(plan: &SinkPlan, key: &[usize]) -> Vec<String> {
    key.iter()
        .map(|c| format!("t.{} = r.c{c}", plan.quoted(*c)))
        .collect()
}

/// A patch's statements (see [`Changes::patches`]) for `rows` rows: which bound rows have no
/// stored row (`SELECT r.i … WHERE NOT EXISTS`, binding the key), and the update of those
/// that have one — every column the upsert sets, but those whose cell is unavailable (the
/// last bound value of a row holds `u` at the position of each such column), where the
/// stored row is not newer.
fn patch_sql(plan: &SinkPlan, rows: usize) -> (String, String) {
    // The key's cells are typed as the key compares; the others go into their columns as an
    // INSERT's would (a CAST to DECIMAL would clamp a value out of range, not refuse it).
    let cell = |c: usize| match plan.columns[c].kind {
        _ if plan.conflict.contains(&c) => placeholder(plan, c),
        ColumnKind::Binary { .. } => "UNHEX(?)".to_string(),
        _ => "?".to_string(),
    };
    let derived = |bound: &[usize], numbered: bool, mask: bool| {
        let mut sql = String::new();
        for i in 0..rows {
            let mut cells: Vec<String> = bound
                .iter()
                .map(|c| match i {
                    0 => format!("{} AS c{c}", cell(*c)),
                    _ => cell(*c),
                })
                .collect();
            if numbered {
                cells.insert(0, format!("CAST({i} AS SIGNED) AS i"));
            }
            if mask {
                cells.push("? AS m".to_string());
            }
            let union = if i == 0 {
                "SELECT"
            } else {
                " UNION ALL SELECT"
            };
            sql.push_str(&format!("{union} {}", cells.join(", ")));
        }
        sql
    };
    let table = plan.table.quoted(plan.backend);
    let key = key_matches(plan, &plan.conflict);
    let absent = format!(
        "SELECT r.i FROM ({}) AS r WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {})",
        derived(&plan.conflict, true, false),
        key.join(" AND ")
    );
    let sets: Vec<String> = guard::update_columns(plan)
        .into_iter()
        .map(|c| {
            format!(
                "t.{0} = IF(SUBSTRING(r.m, {1}, 1) = 'u', t.{0}, r.c{c})",
                plan.quoted(c),
                c + 1
            )
        })
        .collect();
    let all: Vec<usize> = (0..plan.columns.len()).collect();
    let guard = where_bound_row_is_newer(plan, plan.newer_by);
    let update = format!(
        "UPDATE {table} AS t JOIN ({}) AS r ON {} SET {}{guard}",
        derived(&all, false, true),
        key.join(" AND "),
        sets.join(", ")
    );
    (absent, update)
}

/// Binds a cell for a comparison: integers as integers (MySQL compares a number with a
/// string as floating point, inexact beyond 2^53), everything else as text.
fn bind_typed<'q>(
    query: Query<'q, MySql, MySqlArguments>,
    kind: ColumnKind,
    cell: Option<&'q str>,
) -> Query<'q, MySql, MySqlArguments> {
    match kind {
        ColumnKind::Integer { .. } => query.bind(cell.and_then(|c| c.parse::<i64>().ok())),
        _ => query.bind(cell),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Backend;
    use crate::writer::fixtures::{insert_by_coordinates, upsert, Guard};

    /// Every mode's ON DUPLICATE KEY part, with `VALUES(col)` (MariaDB) and the row alias
    /// (MySQL 8.0.19+): insert on the coordinates, and upserts on a business key guarded by a
    /// version, by the Kafka position (the offset assigned before the partition, see
    /// `SinkPlan::update_columns`), and unguarded.
    #[test]
    fn writes_of_every_mode() {
        let plans = [
            insert_by_coordinates(Backend::MySql),
            upsert(Backend::MySql, Guard::SourcePosition),
            upsert(Backend::MySql, Guard::Coordinates),
            upsert(Backend::MySql, Guard::Unguarded),
        ];
        let expected = [
            [
                " ON DUPLICATE KEY UPDATE `kafka_partition` = `kafka_partition`",
                " ON DUPLICATE KEY UPDATE `kafka_partition` = `kafka_partition`",
            ],
            [
                " ON DUPLICATE KEY UPDATE `name` = IF(`v` IS NULL OR VALUES(`v`) > `v`, \
                VALUES(`name`), `name`), `kafka_partition` = IF(`v` IS NULL OR VALUES(`v`) > \
                `v`, VALUES(`kafka_partition`), `kafka_partition`), `kafka_offset` = IF(`v` IS \
                NULL OR VALUES(`v`) > `v`, VALUES(`kafka_offset`), `kafka_offset`), `v` = IF(`v` \
                IS NULL OR VALUES(`v`) > `v`, VALUES(`v`), `v`)",
                " AS idemsink_new ON DUPLICATE KEY UPDATE `name` = IF(`v` IS NULL OR \
                idemsink_new.`v` > `v`, idemsink_new.`name`, `name`), `kafka_partition` = IF(`v` \
                IS NULL OR idemsink_new.`v` > `v`, idemsink_new.`kafka_partition`, \
                `kafka_partition`), `kafka_offset` = IF(`v` IS NULL OR idemsink_new.`v` > `v`, \
                idemsink_new.`kafka_offset`, `kafka_offset`), `v` = IF(`v` IS NULL OR \
                idemsink_new.`v` > `v`, idemsink_new.`v`, `v`)",
            ],
            [
                " ON DUPLICATE KEY UPDATE `name` = IF(NOT COALESCE(`kafka_partition` = \
                VALUES(`kafka_partition`) AND `kafka_offset` >= VALUES(`kafka_offset`), FALSE), \
                VALUES(`name`), `name`), `v` = IF(NOT COALESCE(`kafka_partition` = \
                VALUES(`kafka_partition`) AND `kafka_offset` >= VALUES(`kafka_offset`), FALSE), \
                VALUES(`v`), `v`), `kafka_offset` = IF(NOT COALESCE(`kafka_partition` = \
                VALUES(`kafka_partition`) AND `kafka_offset` >= VALUES(`kafka_offset`), FALSE), \
                VALUES(`kafka_offset`), `kafka_offset`), `kafka_partition` = IF(NOT \
                COALESCE(`kafka_partition` = VALUES(`kafka_partition`) AND `kafka_offset` >= \
                VALUES(`kafka_offset`), FALSE), VALUES(`kafka_partition`), `kafka_partition`)",
                " AS idemsink_new ON DUPLICATE KEY UPDATE `name` = IF(NOT \
                COALESCE(`kafka_partition` = idemsink_new.`kafka_partition` AND `kafka_offset` \
                >= idemsink_new.`kafka_offset`, FALSE), idemsink_new.`name`, `name`), `v` = \
                IF(NOT COALESCE(`kafka_partition` = idemsink_new.`kafka_partition` AND \
                `kafka_offset` >= idemsink_new.`kafka_offset`, FALSE), idemsink_new.`v`, `v`), \
                `kafka_offset` = IF(NOT COALESCE(`kafka_partition` = \
                idemsink_new.`kafka_partition` AND `kafka_offset` >= \
                idemsink_new.`kafka_offset`, FALSE), idemsink_new.`kafka_offset`, \
                `kafka_offset`), `kafka_partition` = IF(NOT COALESCE(`kafka_partition` = \
                idemsink_new.`kafka_partition` AND `kafka_offset` >= \
                idemsink_new.`kafka_offset`, FALSE), idemsink_new.`kafka_partition`, \
                `kafka_partition`)",
            ],
            [
                " ON DUPLICATE KEY UPDATE `name` = VALUES(`name`), `v` = VALUES(`v`), \
                `kafka_partition` = VALUES(`kafka_partition`), `kafka_offset` = \
                VALUES(`kafka_offset`)",
                " AS idemsink_new ON DUPLICATE KEY UPDATE `name` = idemsink_new.`name`, `v` = \
                idemsink_new.`v`, `kafka_partition` = idemsink_new.`kafka_partition`, \
                `kafka_offset` = idemsink_new.`kafka_offset`",
            ],
        ];
        for (plan, [values, alias]) in plans.iter().zip(expected) {
            assert_eq!(on_duplicate_key(plan, false), values);
            assert_eq!(on_duplicate_key(plan, true), alias);
        }
    }

    /// A delete statement of `rows` rows, as `delete_rows` puts it together.
    fn delete_text(delete: &DeleteSql, rows: usize) -> String {
        let mut sql = format!("{}{}", delete.head, delete.first_row);
        for _ in 1..rows {
            sql.push_str(&delete.next_row);
        }
        sql + &delete.tail
    }

    #[test]
    fn patches_update_the_stored_row_leaving_unavailable_columns() {
        let plan = upsert(Backend::MySql, Guard::SourcePosition);
        let (absent, update) = patch_sql(&plan, 2);
        assert_eq!(
            absent,
            "SELECT r.i FROM (SELECT CAST(0 AS SIGNED) AS i, ? AS c0 UNION ALL SELECT \
             CAST(1 AS SIGNED) AS i, ?) AS r WHERE NOT EXISTS (SELECT 1 FROM `t` AS t WHERE \
             t.`id` = r.c0)"
        );
        assert_eq!(
            update,
            "UPDATE `t` AS t JOIN (SELECT ? AS c0, ? AS c1, ? AS c2, ? AS c3, ? AS c4, ? AS m \
             UNION ALL SELECT ?, ?, ?, ?, ?, ? AS m) AS r ON t.`id` = r.c0 SET \
             t.`name` = IF(SUBSTRING(r.m, 2, 1) = 'u', t.`name`, r.c1), \
             t.`kafka_partition` = IF(SUBSTRING(r.m, 4, 1) = 'u', t.`kafka_partition`, r.c3), \
             t.`kafka_offset` = IF(SUBSTRING(r.m, 5, 1) = 'u', t.`kafka_offset`, r.c4), \
             t.`v` = IF(SUBSTRING(r.m, 3, 1) = 'u', t.`v`, r.c2) \
             WHERE t.`v` IS NULL OR r.c2 > t.`v`"
        );
    }

    #[test]
    fn deletes_and_truncates_delete_what_they_are_newer_than() {
        let limit = |_: &[usize]| StatementLimit {
            rows: 10,
            bytes: 1000,
        };
        let statements = |guard| {
            let plan = upsert(Backend::MySql, guard);
            (
                delete_sql(&plan, &plan.conflict, limit),
                delete_sql(&plan, &[], limit),
            )
        };
        let (delete, truncate) = statements(Guard::SourcePosition);
        assert_eq!(
            delete_text(&delete, 2),
            "DELETE t FROM `t` AS t JOIN (SELECT ? AS c0, ? AS c2 UNION ALL SELECT ?, ?) AS r \
             ON t.`id` = r.c0 WHERE t.`v` IS NULL OR r.c2 > t.`v`"
        );
        assert_eq!(
            delete_text(&truncate, 1),
            "DELETE t FROM `t` AS t JOIN (SELECT ? AS c2) AS r ON TRUE WHERE t.`v` IS NULL OR \
             r.c2 > t.`v`"
        );
        let (delete, truncate) = statements(Guard::Coordinates);
        assert_eq!(delete.bound, [0, 3, 4]);
        assert_eq!(
            delete_text(&truncate, 1),
            "DELETE t FROM `t` AS t JOIN (SELECT ? AS c3, ? AS c4) AS r ON TRUE WHERE NOT \
             COALESCE(t.`kafka_partition` = r.c3 AND t.`kafka_offset` >= r.c4, FALSE)"
        );
        let (delete, truncate) = statements(Guard::Unguarded);
        assert_eq!(
            delete_text(&delete, 1),
            "DELETE t FROM `t` AS t JOIN (SELECT ? AS c0) AS r ON t.`id` = r.c0"
        );
        assert_eq!(delete_text(&truncate, 3), "DELETE FROM `t`");
        assert!(truncate.bound.is_empty());
    }

    #[test]
    fn row_alias_only_on_mysql_8_0_19_and_later() {
        assert!(!has_row_alias("10.11.6-MariaDB-0+deb12u1"));
        assert!(!has_row_alias("11.4.2-MariaDB"));
        assert!(!has_row_alias("8.0.18"));
        assert!(!has_row_alias("5.7.44-log"));
        assert!(has_row_alias("8.0.19"));
        assert!(has_row_alias("8.4.3"));
        assert!(has_row_alias("9.1.0"));
    }
}
