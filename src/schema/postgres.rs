//! Reads a table's description from PostgreSQL's catalog.

use sqlx::PgConnection;

use super::{TableColumn, TableName, TableSchema, UniqueKey};
use crate::db::Backend;
use crate::mapping::ColumnKind;

pub(super) async fn load(
    conn: &mut PgConnection,
    table: &TableName,
) -> Result<Option<TableSchema>, sqlx::Error> {
    let oid: Option<sqlx::postgres::types::Oid> = sqlx::query_scalar("SELECT to_regclass($1)::oid")
        .bind(table.quoted(Backend::Postgres))
        .fetch_one(&mut *conn)
        .await?;
    let Some(oid) = oid else { return Ok(None) };
    let copy_allowed: bool = sqlx::query_scalar(
        "SELECT relkind IN ('r', 'p') AND NOT relrowsecurity FROM pg_class WHERE oid = $1",
    )
    .bind(oid)
    .fetch_one(&mut *conn)
    .await?;
    // A generated key (identity, or serial's nextval default) is the database's to fill in.
    let rows: Vec<ColumnRow> = sqlx::query_as(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type_text,
                t.typname::text AS typname, a.atttypmod AS typmod, a.attnotnull AS not_null,
                a.atthasdef OR a.attidentity <> '' AS has_default,
                a.attgenerated <> '' AS generated,
                a.attidentity <> '' OR COALESCE(pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%', false)
                  AS sequence,
                CASE WHEN a.attcollation <> t.typcollation THEN a.attcollation::regcollation::text END
                  AS collation,
                COALESCE(co.collisdeterministic, true) AS deterministic
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
           LEFT JOIN pg_collation co ON co.oid = a.attcollation
          WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    // Per column: its type's names and kind, for the keys' equality under their collations.
    let types: std::collections::HashMap<String, (String, String, Option<ColumnKind>)> = (rows
        .iter())
    .map(|r| {
        let kind = kind(&r.typname, r.typmod);
        (
            r.name.clone(),
            (r.typname.clone(), r.type_text.clone(), kind),
        )
    })
    .collect();
    let columns = rows
        .into_iter()
        .map(|r| {
            let kind = kind(&r.typname, r.typmod);
            TableColumn {
                equality: equality(&r, kind),
                kind,
                name: r.name,
                type_text: r.type_text,
                not_null: r.not_null,
                has_default: r.has_default,
                generated: r.generated,
                auto_increment: r.sequence,
            }
        })
        .collect();
    // Partial, expression and deferrable unique indexes cannot serve as ON CONFLICT arbiters.
    // Each key column's collation is the index's, which may differ from the column's.
    let keys: Vec<KeyRow> = sqlx::query_as(
        "SELECT array_agg(a.attname::text ORDER BY k.ord) AS columns,
                i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL AS exact,
                i.indisprimary AS primary,
                array_agg(CASE WHEN k.coll <> 0 AND k.coll <> t.typcollation
                               THEN k.coll::regcollation::text END ORDER BY k.ord) AS collations,
                array_agg(COALESCE(co.collisdeterministic, true) ORDER BY k.ord) AS deterministic
           FROM pg_index i
           CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indcollation::oid[])
             WITH ORDINALITY AS k(attnum, coll, ord)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
           JOIN pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_collation co ON co.oid = k.coll
          WHERE i.indrelid = $1 AND i.indisunique
          GROUP BY i.indexrelid, i.indimmediate, i.indpred IS NULL, i.indexprs IS NULL, i.indisprimary",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(TableSchema {
        backend: Backend::Postgres,
        table: table.clone(),
        identity: format!("oid {}", oid.0),
        columns,
        unique_keys: keys
            .into_iter()
            .map(|key| {
                let equality = (key.columns.iter().zip(&key.collations))
                    .zip(&key.deterministic)
                    .map(|((name, collation), deterministic)| {
                        let (typname, type_text, kind) = types.get(name)?;
                        equality_under(
                            *kind,
                            typname,
                            type_text,
                            collation.as_deref(),
                            *deterministic,
                        )
                    })
                    .collect();
                UniqueKey {
                    columns: key.columns,
                    exact: key.exact,
                    primary: key.primary,
                    equality,
                }
            })
            .collect(),
        copy_allowed,
    }))
}

/// One unique index, as the catalog query above reads it.
#[derive(sqlx::FromRow)]
struct KeyRow {
    columns: Vec<String>,
    exact: bool,
    primary: bool,
    /// Per column, the index's collation where it is not the type's default.
    collations: Vec<Option<String>>,
    deterministic: Vec<bool>,
}

/// One row of the catalog query above.
#[derive(sqlx::FromRow)]
struct ColumnRow {
    name: String,
    type_text: String,
    typname: String,
    typmod: i32,
    not_null: bool,
    has_default: bool,
    generated: bool,
    sequence: bool,
    /// The column's collation, when not its type's default.
    collation: Option<String>,
    deterministic: bool,
}

/// How PostgreSQL compares the column's values, when their text does not tell: integers and
/// booleans arrive in one spelling, and `text`/`varchar` under a deterministic collation are
/// equal only when their bytes are. Everything else compares as its type and collation do
/// (`numeric` `1.0 = 1`, `jsonb` in any key order, `char(n)` ignoring padding, a
/// case-insensitive ICU collation, `timestamptz` across zones).
fn equality(r: &ColumnRow, kind: Option<ColumnKind>) -> Option<String> {
    equality_under(
        kind,
        &r.typname,
        &r.type_text,
        r.collation.as_deref(),
        r.deterministic,
    )
}

/// The same for a value of a type under `collation` (`None`: the type's default).
fn equality_under(
    kind: Option<ColumnKind>,
    typname: &str,
    type_text: &str,
    collation: Option<&str>,
    deterministic: bool,
) -> Option<String> {
    let exact = match kind? {
        ColumnKind::Integer { .. } | ColumnKind::Bool => true,
        ColumnKind::Text { .. } => typname != "bpchar" && deterministic,
        _ => false,
    };
    let collate = collation.map_or(String::new(), |c| format!(" COLLATE {c}"));
    (!exact).then(|| format!("{{v}}::{type_text}{collate}"))
}

/// Maps a PostgreSQL type name (`pg_type.typname`) and `atttypmod` to a kind.
fn kind(typname: &str, typmod: i32) -> Option<ColumnKind> {
    let modifier = (typmod >= 4).then(|| typmod - 4);
    Some(match typname {
        "int2" => ColumnKind::SMALLINT,
        "int4" => ColumnKind::INT,
        "int8" => ColumnKind::BIGINT,
        "float4" => ColumnKind::Real,
        "float8" => ColumnKind::Double,
        "numeric" => ColumnKind::Numeric {
            precision: modifier.map(|m| ((m >> 16) & 0xffff) as u32),
            scale: modifier.map_or(0, |m| (m & 0xffff) as u32),
        },
        "bool" => ColumnKind::Bool,
        "text" | "name" => ColumnKind::TEXT,
        "varchar" | "bpchar" => ColumnKind::Text {
            max_chars: modifier.map(|m| m as usize),
            max_bytes: None,
        },
        "json" => ColumnKind::Json,
        "jsonb" => ColumnKind::Jsonb,
        "timestamp" => ColumnKind::Timestamp,
        "timestamptz" => ColumnKind::TimestampTz,
        "date" => ColumnKind::Date,
        "uuid" => ColumnKind::Uuid,
        "bytea" => ColumnKind::Bytea,
        _ => return None,
    })
}

/// The types [`kind`] knows, for messages.
pub(super) const SUPPORTED: &str =
    "smallint, integer, bigint, real, double precision, numeric, boolean, text, \
     varchar, char, json, jsonb, timestamp, timestamptz, date, uuid, bytea";
