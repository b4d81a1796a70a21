//! The target table as the database describes it: identifiers checked and quoted, columns
//! with their types and nullability, and unique keys (the possible conflict targets). Each
//! backend reads its catalog in its own file; the plan of the mapped columns is shared.
//! Used at start by `run` to plan the rows, and by `validate` to report what does not fit.

mod mysql;
mod postgres;

use crate::db::{Backend, DbPool};
use crate::mapping::{ColumnKind, ColumnPlan, Role, Source};

/// PostgreSQL truncates identifiers beyond 63 bytes (MySQL refuses beyond 64); refuse them.
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

/// `"name"` (PostgreSQL) or `` `name` `` (MySQL), for an identifier that passed
/// [`check_identifier`]; the quote character is doubled anyway.
pub fn quote(backend: Backend, name: &str) -> String {
    match backend {
        Backend::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
        Backend::MySql => format!("`{}`", name.replace('`', "``")),
    }
}

/// `"a", "b"`: a list of quoted identifiers.
pub fn quote_list<'a>(backend: Backend, names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(|n| quote(backend, n))
        .collect::<Vec<_>>()
        .join(", ")
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

    /// The quoted, possibly qualified name for SQL (in MySQL, the schema is the database).
    pub fn quoted(&self, backend: Backend) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", quote(backend, s), quote(backend, &self.name)),
            None => quote(backend, &self.name),
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
    /// The declared type, for messages (`character varying(20)`, `varchar(20)`).
    pub type_text: String,
    pub kind: Option<ColumnKind>,
    pub not_null: bool,
    pub has_default: bool,
    pub generated: bool,
    /// MySQL `AUTO_INCREMENT`: every row gets a new value, so a unique key holding it never
    /// meets an existing row.
    pub auto_increment: bool,
    /// How the database compares two values of the column, where that is not comparing
    /// their text (a case-insensitive or padding collation, `numeric`'s `1.0 = 1`, `jsonb`):
    /// an SQL expression of `{v}` (see [`crate::writer`]'s key grouping).
    pub equality: Option<String>,
}

/// A unique index or constraint.
#[derive(Debug, Clone)]
pub struct UniqueKey {
    pub columns: Vec<String>,
    /// Whether it compares whole column values, so it can serve as the conflict target
    /// (not partial, expression, deferrable or — in MySQL — a prefix index).
    pub exact: bool,
    /// Whether it is the table's primary key.
    pub primary: bool,
    /// Per column, how this key compares its values where their text does not tell (see
    /// [`TableColumn::equality`]): PostgreSQL's index may have a collation of its own.
    pub equality: Vec<Option<String>>,
}

/// What the database says about the target table.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub backend: Backend,
    pub table: TableName,
    /// What the database knows the table by, whatever the spelling of its name (`t`,
    /// `public.t`): PostgreSQL's oid, MySQL's schema and name.
    pub identity: String,
    pub columns: Vec<TableColumn>,
    pub unique_keys: Vec<UniqueKey>,
    /// Whether PostgreSQL's `COPY FROM` can write it: a plain or partitioned table without
    /// row-level security (views and RLS tables take INSERT only). Always false in MySQL.
    pub copy_allowed: bool,
}

impl TableSchema {
    /// Reads the table's description; `Ok(None)` when no such table exists.
    pub async fn load(
        pool: &DbPool,
        table: &TableName,
    ) -> Result<Option<TableSchema>, sqlx::Error> {
        match pool {
            DbPool::Postgres(pool) => postgres::load(&mut *pool.acquire().await?, table).await,
            DbPool::MySql(pool) => mysql::load(&mut *pool.acquire().await?, table).await,
        }
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
                        match self.backend {
                            Backend::Postgres => postgres::SUPPORTED,
                            Backend::MySql => mysql::SUPPORTED,
                        }
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
                role: Role::Plain,
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

    /// Whether an exact unique key covers exactly `columns` (in any order).
    pub fn has_unique_key(&self, columns: &[&str]) -> bool {
        self.unique_keys
            .iter()
            .any(|key| key.exact && same_columns(&key.columns, columns))
    }

    /// The unique keys other than the one on `columns` that a written row could collide
    /// with: those without a generated column (AUTO_INCREMENT, identity, serial) that the
    /// pipeline leaves to the database (`mapped` are the columns it writes).
    pub fn other_collidable_keys(&self, columns: &[&str], mapped: &[&str]) -> Vec<&UniqueKey> {
        // A key on a generated column cannot collide while the database fills that column
        // in; once the pipeline writes the column itself, it can.
        let generated = |name: &String| {
            !mapped.contains(&name.as_str())
                && self
                    .columns
                    .iter()
                    .any(|c| &c.name == name && c.auto_increment)
        };
        self.unique_keys
            .iter()
            .filter(|key| !same_columns(&key.columns, columns))
            .filter(|key| !key.columns.iter().any(generated))
            .collect()
    }
}

fn same_columns(key: &[String], columns: &[&str]) -> bool {
    key.len() == columns.len() && columns.iter().all(|c| key.iter().any(|k| k == c))
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
        assert_eq!(t.quoted(Backend::Postgres), "\"sales\".\"Orders\"");
        assert_eq!(t.quoted(Backend::MySql), "`sales`.`Orders`");
        assert_eq!(
            TableName::parse("orders")
                .expect("valid")
                .quoted(Backend::Postgres),
            "\"orders\""
        );
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("orders;drop").is_err());
    }
}
