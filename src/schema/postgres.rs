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
    type Row = (String, String, String, i32, bool, bool, bool, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text, a.atttypmod,
                a.attnotnull, a.atthasdef OR a.attidentity <> '', a.attgenerated <> '',
                a.attidentity <> '' OR COALESCE(pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%', false)
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    let columns = rows
        .into_iter()
        .map(
            |(name, type_text, typname, typmod, not_null, has_default, generated, sequence)| {
                TableColumn {
                    kind: kind(&typname, typmod),
                    name,
                    type_text,
                    not_null,
                    has_default,
                    generated,
                    auto_increment: sequence,
                }
            },
        )
        .collect();
    // Partial, expression and deferrable unique indexes cannot serve as ON CONFLICT arbiters.
    let keys: Vec<(Vec<String>, bool)> = sqlx::query_as(
        "SELECT array_agg(a.attname::text ORDER BY k.ord),
                i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
           FROM pg_index i
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = $1 AND i.indisunique
          GROUP BY i.indexrelid, i.indimmediate, i.indpred IS NULL, i.indexprs IS NULL",
    )
    .bind(oid)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(TableSchema {
        backend: Backend::Postgres,
        table: table.clone(),
        columns,
        unique_keys: keys
            .into_iter()
            .map(|(columns, exact)| UniqueKey { columns, exact })
            .collect(),
        copy_allowed,
    }))
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
