//! Reads a table's description from MySQL's or MariaDB's `information_schema`.

use sqlx::MySqlConnection;

use super::{TableColumn, TableName, TableSchema, UniqueKey};
use crate::db::Backend;
use crate::mapping::ColumnKind;

/// One row of `information_schema.COLUMNS`, as read below.
#[derive(sqlx::FromRow)]
struct ColumnRow {
    name: String,
    data_type: String,
    column_type: String,
    nullable: String,
    default_value: Option<String>,
    extra: String,
    max_chars: Option<i64>,
    max_bytes: Option<i64>,
    precision: Option<i64>,
    scale: Option<i64>,
    charset: Option<String>,
    collation: Option<String>,
}

pub(super) async fn load(
    conn: &mut MySqlConnection,
    table: &TableName,
) -> Result<Option<TableSchema>, sqlx::Error> {
    // Everything is cast to text/signed so the driver's strict type checks accept what
    // MySQL and MariaDB each report with their own column types.
    let rows: Vec<ColumnRow> = sqlx::query_as(
        "SELECT CAST(COLUMN_NAME AS CHAR) AS name, CAST(DATA_TYPE AS CHAR) AS data_type,
                CAST(COLUMN_TYPE AS CHAR) AS column_type, CAST(IS_NULLABLE AS CHAR) AS nullable,
                CAST(COLUMN_DEFAULT AS CHAR) AS default_value, CAST(EXTRA AS CHAR) AS extra,
                CAST(CHARACTER_MAXIMUM_LENGTH AS SIGNED) AS max_chars,
                CAST(CHARACTER_OCTET_LENGTH AS SIGNED) AS max_bytes,
                CAST(NUMERIC_PRECISION AS SIGNED) AS `precision`,
                CAST(NUMERIC_SCALE AS SIGNED) AS scale,
                CAST(CHARACTER_SET_NAME AS CHAR) AS charset,
                CAST(COLLATION_NAME AS CHAR) AS collation
           FROM information_schema.COLUMNS
          WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?
          ORDER BY ORDINAL_POSITION",
    )
    .bind(table.schema.as_deref())
    .bind(&table.name)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    // MariaDB's JSON is LONGTEXT with a json_valid() check; recognise it as JSON.
    let json_checked: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(CHECK_CLAUSE AS CHAR) FROM information_schema.CHECK_CONSTRAINTS
          WHERE CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
    )
    .bind(table.schema.as_deref())
    .bind(&table.name)
    .fetch_all(&mut *conn)
    .await
    .unwrap_or_default(); // MySQL before 8.0.16 has no CHECK_CONSTRAINTS (nor checks)
    let columns = rows
        .into_iter()
        .map(|r| {
            let is_json = json_checked
                .iter()
                .any(|c| c == &format!("json_valid(`{}`)", r.name));
            let generated = r.extra.to_ascii_uppercase().contains("GENERATED");
            let auto_increment = r.extra.to_ascii_lowercase().contains("auto_increment");
            // MariaDB reports "NULL" (text) for a nullable column without a default.
            let has_default =
                auto_increment || r.default_value.as_deref().is_some_and(|d| d != "NULL");
            let kind = if is_json {
                Some(ColumnKind::Json)
            } else {
                kind(&r)
            };
            TableColumn {
                equality: kind.and_then(|k| equality(&r, k)),
                kind,
                type_text: r.column_type,
                not_null: r.nullable == "NO",
                has_default,
                generated,
                auto_increment,
                name: r.name,
            }
        })
        .collect::<Vec<TableColumn>>();
    // MySQL's indexes compare as their columns do.
    let mut unique_keys = unique_keys(conn, table).await?;
    for key in &mut unique_keys {
        key.equality = (key.columns.iter())
            .map(|name| {
                let column = columns.iter().find(|c| &c.name == name);
                column.and_then(|c| c.equality.clone())
            })
            .collect();
    }
    let schema: String = sqlx::query_scalar("SELECT CAST(COALESCE(?, DATABASE()) AS CHAR)")
        .bind(table.schema.as_deref())
        .fetch_one(&mut *conn)
        .await?;
    Ok(Some(TableSchema {
        backend: Backend::MySql,
        table: table.clone(),
        identity: format!("{schema}.{}", table.name),
        columns,
        unique_keys,
        copy_allowed: false,
    }))
}

/// The table's unique keys, from its unique indexes (`PRIMARY` is the primary key).
async fn unique_keys(
    conn: &mut MySqlConnection,
    table: &TableName,
) -> Result<Vec<UniqueKey>, sqlx::Error> {
    let key_rows: Vec<(String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), CAST(SUB_PART AS SIGNED)
           FROM information_schema.STATISTICS
          WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0
          ORDER BY INDEX_NAME, SEQ_IN_INDEX",
    )
    .bind(table.schema.as_deref())
    .bind(&table.name)
    .fetch_all(&mut *conn)
    .await?;
    let mut unique_keys: Vec<(String, UniqueKey)> = Vec::new();
    for (index, column, sub_part) in key_rows {
        if unique_keys.last().is_none_or(|(name, _)| name != &index) {
            let key = UniqueKey {
                columns: Vec::new(),
                exact: true,
                primary: index == "PRIMARY",
                equality: Vec::new(),
            };
            unique_keys.push((index, key));
        }
        let Some((_, key)) = unique_keys.last_mut() else {
            continue;
        };
        match column {
            // A prefix index treats values sharing the prefix as equal; a functional index
            // (no column) compares an expression: neither can be the conflict target.
            Some(c) => {
                key.exact &= sub_part.is_none();
                key.columns.push(c);
            }
            None => key.exact = false,
        }
    }
    Ok(unique_keys.into_iter().map(|(_, k)| k).collect())
}

/// How MySQL compares the column's values, as an expression of `{v}` whose text is equal
/// exactly when the values are, where their own text does not tell: text under its
/// collation (case, accents, and trailing spaces in a PAD SPACE collation: its weight
/// string), decimals, dates and floating point by value. Integers, booleans and hex
/// binaries arrive in one spelling.
fn equality(r: &ColumnRow, kind: ColumnKind) -> Option<String> {
    Some(match kind {
        ColumnKind::Text { .. } => {
            let (charset, collation) = (r.charset.as_deref()?, r.collation.as_deref()?);
            let name = |n: &str| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name(charset) || !name(collation) {
                return None;
            }
            // NO PAD collations (MariaDB's `_nopad_`, MySQL 8's `_0900_`) keep trailing
            // spaces significant. The others compare as if the shorter value were padded with
            // spaces: what weighs as a space at the end is padding, which is more than U+0020
            // (in the UCA collations a no-break space weighs the same), so the trailing
            // weights of a space come off the weight string, not the spaces off the text.
            let weight = |value: &str| {
                format!("HEX(WEIGHT_STRING(CONVERT({value} USING {charset}) COLLATE {collation}))")
            };
            let no_pad = collation.contains("nopad") || collation.contains("_0900_");
            if no_pad {
                weight("{v}")
            } else {
                format!("TRIM(TRAILING {} FROM {})", weight("' '"), weight("{v}"))
            }
        }
        // A fixed BINARY(n) pads with zero bytes: `ab` and `ab\0` are one value.
        ColumnKind::Binary { max_bytes: Some(n) } if r.data_type == "binary" => {
            format!("HEX(CAST(UNHEX({{v}}) AS BINARY({n})))")
        }
        ColumnKind::Numeric { precision, scale } => format!(
            "CAST(CAST({{v}} AS DECIMAL({}, {scale})) AS CHAR)",
            precision.unwrap_or(65)
        ),
        // At the column's precision: DATETIME(2) stores `.1234` and `.1299` as one value.
        ColumnKind::DateTime { .. } => {
            let fsp = (r.column_type.split_once('('))
                .and_then(|(_, rest)| rest.trim_end_matches(')').parse::<u8>().ok())
                .filter(|fsp| *fsp <= 6)
                .unwrap_or(0);
            format!("CAST(CAST({{v}} AS DATETIME({fsp})) AS CHAR)")
        }
        ColumnKind::Date => "CAST(CAST({v} AS DATE) AS CHAR)".to_string(),
        ColumnKind::Real | ColumnKind::Double => "CAST(({v}) + 0e0 AS CHAR)".to_string(),
        _ => return None,
    })
}

/// Maps a column's `DATA_TYPE` and `COLUMN_TYPE` to a kind.
fn kind(r: &ColumnRow) -> Option<ColumnKind> {
    let unsigned = r.column_type.contains("unsigned");
    let int = |bits: u32| {
        Some(if unsigned {
            ColumnKind::Integer {
                min: 0,
                // BIGINT UNSIGNED beyond i64 is refused per record rather than wrapped.
                max: i64::try_from((1u128 << bits) - 1).unwrap_or(i64::MAX),
            }
        } else {
            ColumnKind::Integer {
                min: i64::MIN >> (64 - bits),
                max: i64::MAX >> (64 - bits),
            }
        })
    };
    let size = |n: Option<i64>| n.and_then(|n| usize::try_from(n).ok());
    match r.data_type.as_str() {
        "tinyint" if r.column_type.starts_with("tinyint(1)") && !unsigned => {
            Some(ColumnKind::BoolAsInt)
        }
        "tinyint" => int(8),
        "smallint" => int(16),
        "mediumint" => int(24),
        "int" | "integer" => int(32),
        "bigint" => int(64),
        "float" => Some(ColumnKind::Real),
        "double" => Some(ColumnKind::Double),
        "decimal" => Some(ColumnKind::Numeric {
            precision: r.precision.and_then(|p| u32::try_from(p).ok()),
            scale: r.scale.and_then(|s| u32::try_from(s).ok()).unwrap_or(0),
        }),
        "char" | "varchar" => Some(ColumnKind::Text {
            max_chars: size(r.max_chars),
            max_bytes: None,
        }),
        "tinytext" | "text" | "mediumtext" | "longtext" => Some(ColumnKind::Text {
            max_chars: None,
            max_bytes: size(r.max_bytes),
        }),
        "json" => Some(ColumnKind::Json),
        "datetime" => Some(ColumnKind::DateTime {
            min_micros: -30_610_224_000_000_000, // 1000-01-01 00:00:00
            max_micros: 253_402_300_799_999_999, // 9999-12-31 23:59:59.999999
        }),
        "timestamp" => Some(ColumnKind::DateTime {
            min_micros: 1_000_000,             // 1970-01-01 00:00:01 UTC
            max_micros: 2_147_483_647_999_999, // 2038-01-19 03:14:07.999999 UTC
        }),
        "date" => Some(ColumnKind::Date),
        "uuid" => Some(ColumnKind::Uuid),
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            Some(ColumnKind::Binary {
                max_bytes: size(r.max_bytes),
            })
        }
        _ => None,
    }
}

/// The types [`kind`] knows, for messages.
pub(super) const SUPPORTED: &str =
    "tinyint, smallint, mediumint, int, bigint (signed or unsigned), boolean (tinyint(1)), \
     float, double, decimal, char, varchar, text types, json, datetime, timestamp, date, uuid, \
     binary, varbinary, blob types";

#[cfg(test)]
mod tests {
    use super::*;

    fn column(data_type: &str, column_type: &str) -> ColumnRow {
        ColumnRow {
            name: "c".into(),
            data_type: data_type.into(),
            column_type: column_type.into(),
            nullable: "YES".into(),
            default_value: None,
            extra: String::new(),
            max_chars: None,
            max_bytes: None,
            precision: None,
            scale: None,
            charset: None,
            collation: None,
        }
    }

    #[test]
    fn integer_types_keep_their_ranges() {
        let range = |d: &str, c: &str| match kind(&column(d, c)) {
            Some(ColumnKind::Integer { min, max }) => (min, max),
            other => panic!("{c}: {other:?}"),
        };
        assert_eq!(range("tinyint", "tinyint(4)"), (-128, 127));
        assert_eq!(range("tinyint", "tinyint(3) unsigned"), (0, 255));
        assert_eq!(range("mediumint", "mediumint(9)"), (-8_388_608, 8_388_607));
        assert_eq!(range("int", "int(10) unsigned"), (0, 4_294_967_295));
        assert_eq!(range("bigint", "bigint(20)"), (i64::MIN, i64::MAX));
        assert_eq!(range("bigint", "bigint(20) unsigned"), (0, i64::MAX));
        assert_eq!(
            kind(&column("tinyint", "tinyint(1)")),
            Some(ColumnKind::BoolAsInt)
        );
        assert_eq!(kind(&column("enum", "enum('a','b')")), None);
    }
}
