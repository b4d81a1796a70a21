//! The target table as PostgreSQL describes it: identifiers checked and quoted, columns with
//! their types and nullability, and unique indexes (the possible `ON CONFLICT` targets).
//! Used at start by `run` to plan the rows, and by `validate` to report what does not fit.

use sqlx::PgConnection;

use crate::mapping::{ColumnKind, ColumnPlan, Source};

/// PostgreSQL truncates identifiers beyond 63 bytes; refuse them instead.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// Accepts plain SQL identifiers (`[A-Za-z_][A-Za-z0-9_]*`). They are always quoted in SQL,
/// so the check keeps names readable and unambiguous rather than being the only defence.
pub fn check_identifier(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let starts_well = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !starts_well || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "`{name}` is not a plain identifier: use letters, digits and _ (not starting with a digit)"
        ));
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!(
            "`{name}` is longer than {MAX_IDENTIFIER_BYTES} bytes"
        ));
    }
    Ok(())
}

/// `"name"`, for an identifier that passed [`check_identifier`].
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"a", "b"`: a list of quoted identifiers.
pub fn quote_list<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().map(quote).collect::<Vec<_>>().join(", ")
}

/// A table name from the config, optionally schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    pub fn parse(text: &str) -> Result<TableName, String> {
        let (schema, name) = match text.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, text),
        };
        if let Some(s) = schema {
            check_identifier(s)?;
        }
        check_identifier(name)?;
        Ok(TableName {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    /// The quoted, possibly qualified name for SQL.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote(s), quote(&self.name)),
            None => quote(&self.name),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A column of the target table.
#[derive(Debug, Clone)]
pub struct TableColumn {
    pub name: String,
    /// `format_type` of the column, for messages (`character varying(20)`).
    pub type_text: String,
    pub kind: Option<ColumnKind>,
    pub not_null: bool,
    pub has_default: bool,
    pub generated: bool,
}

/// What the database says about the target table.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub table: TableName,
    pub columns: Vec<TableColumn>,
    /// Column sets of the unique indexes usable as `ON CONFLICT` targets.
    pub unique_keys: Vec<Vec<String>>,
    /// Whether `COPY FROM` can write it: a plain or partitioned table without row-level
    /// security (views and RLS tables take INSERT only).
    pub copy_allowed: bool,
}

impl TableSchema {
    /// Reads the table's description; `Ok(None)` when no such table exists.
    pub async fn load(
        conn: &mut PgConnection,
        table: &TableName,
    ) -> Result<Option<TableSchema>, sqlx::Error> {
        let oid: Option<sqlx::postgres::types::Oid> =
            sqlx::query_scalar("SELECT to_regclass($1)::oid")
                .bind(table.quoted())
                .fetch_one(&mut *conn)
                .await?;
        let Some(oid) = oid else { return Ok(None) };
        let copy_allowed: bool = sqlx::query_scalar(
            "SELECT relkind IN ('r', 'p') AND NOT relrowsecurity FROM pg_class WHERE oid = $1",
        )
        .bind(oid)
        .fetch_one(&mut *conn)
        .await?;
        let rows: Vec<(String, String, String, i32, bool, bool, bool)> = sqlx::query_as(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text, a.atttypmod,
                    a.attnotnull, a.atthasdef, a.attgenerated <> ''
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
        )
        .bind(oid)
        .fetch_all(&mut *conn)
        .await?;
        let columns = rows
            .into_iter()
            .map(
                |(name, type_text, typname, typmod, not_null, has_default, generated)| {
                    TableColumn {
                        kind: ColumnKind::from_pg(&typname, typmod),
                        name,
                        type_text,
                        not_null,
                        has_default,
                        generated,
                    }
                },
            )
            .collect();
        // Partial, expression and deferrable unique indexes cannot serve as ON CONFLICT arbiters.
        let unique_keys: Vec<Vec<String>> = sqlx::query_scalar(
            "SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate
                AND i.indpred IS NULL AND i.indexprs IS NULL
              GROUP BY i.indexrelid",
        )
        .bind(oid)
        .fetch_all(&mut *conn)
        .await?;
        Ok(Some(TableSchema {
            table: table.clone(),
            columns,
            unique_keys,
            copy_allowed,
        }))
    }

    /// Plans the mapped columns against the table; every problem comes back with the config
    /// key it concerns.
    pub fn plan(
        &self,
        mapped: &[(String, Source)],
    ) -> Result<Vec<ColumnPlan>, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut plans = Vec::new();
        for (name, source) in mapped {
            let key = format!("sink.columns.{name}");
            let Some(column) = self.columns.iter().find(|c| &c.name == name) else {
                problems.push((key, format!("table {} has no column `{name}`", self.table)));
                continue;
            };
            if column.generated {
                problems.push((
                    key,
                    format!("column `{name}` is generated and cannot be written"),
                ));
                continue;
            }
            let Some(kind) = column.kind else {
                problems.push((
                    key,
                    format!(
                        "column `{name}` has type {}; supported types: {}",
                        column.type_text,
                        ColumnKind::SUPPORTED
                    ),
                ));
                continue;
            };
            if let Err(e) = kind.accepts(source) {
                problems.push((key, format!("{e} ({})", column.type_text)));
                continue;
            }
            plans.push(ColumnPlan {
                name: name.clone(),
                kind,
                nullable: !column.not_null,
                source: source.clone(),
            });
        }
        for column in &self.columns {
            let unmapped = !mapped.iter().any(|(n, _)| n == &column.name);
            if unmapped && column.not_null && !column.has_default && !column.generated {
                problems.push((
                    "sink.columns".to_string(),
                    format!(
                        "column `{}` of {} is NOT NULL without a default and is not mapped",
                        column.name, self.table
                    ),
                ));
            }
        }
        if problems.is_empty() {
            Ok(plans)
        } else {
            Err(problems)
        }
    }

    /// Whether a unique index covers exactly `columns` (in any order).
    pub fn has_unique_key(&self, columns: &[&str]) -> bool {
        self.unique_keys.iter().any(|key| {
            key.len() == columns.len() && columns.iter().all(|c| key.iter().any(|k| k == c))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(check_identifier("orders_2024").is_ok());
        assert!(check_identifier("_x").is_ok());
        for bad in [
            "",
            "1abc",
            "orders; drop table x",
            "a\"b",
            "a b",
            "ordérs",
            "a.b",
            &"x".repeat(64),
        ] {
            assert!(check_identifier(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn table_names() {
        let t = TableName::parse("sales.Orders").expect("valid");
        assert_eq!(t.quoted(), "\"sales\".\"Orders\"");
        assert_eq!(
            TableName::parse("orders").expect("valid").quoted(),
            "\"orders\""
        );
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("orders;drop").is_err());
    }
}
