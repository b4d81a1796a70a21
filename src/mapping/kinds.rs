//! The column types idemsink converts to, learned from the table, with the limits their
//! declaration sets; and how a `newer_by` column's values order.

use chrono::{NaiveDate, NaiveDateTime};

use super::Source;

/// The column types idemsink converts to, with the limits their declaration sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Any integer type, signed or unsigned, by its range.
    Integer {
        min: i64,
        max: i64,
    },
    Real,
    Double,
    Numeric {
        precision: Option<u32>,
        scale: u32,
    },
    /// PostgreSQL `boolean`: `true`/`false`.
    Bool,
    /// MySQL `boolean`, which is `tinyint(1)`: `1`/`0`.
    BoolAsInt,
    /// Character types: limits in characters (varchar(n)) or bytes (MySQL's TEXT types).
    Text {
        max_chars: Option<usize>,
        max_bytes: Option<usize>,
    },
    Json,
    Jsonb,
    /// PostgreSQL `timestamp` (no time zone).
    Timestamp,
    /// PostgreSQL `timestamptz`.
    TimestampTz,
    /// MySQL `datetime` and `timestamp` (the session is UTC), within the type's range.
    DateTime {
        min_micros: i64,
        max_micros: i64,
    },
    Date,
    Uuid,
    /// PostgreSQL `bytea`, rendered `\x<hex>`.
    Bytea,
    /// MySQL binary types, rendered as hex for `UNHEX(?)`.
    Binary {
        max_bytes: Option<usize>,
    },
}

impl ColumnKind {
    pub const SMALLINT: ColumnKind = ColumnKind::Integer {
        min: i16::MIN as i64,
        max: i16::MAX as i64,
    };
    pub const INT: ColumnKind = ColumnKind::Integer {
        min: i32::MIN as i64,
        max: i32::MAX as i64,
    };
    pub const BIGINT: ColumnKind = ColumnKind::Integer {
        min: i64::MIN,
        max: i64::MAX,
    };
    pub const TEXT: ColumnKind = ColumnKind::Text {
        max_chars: None,
        max_bytes: None,
    };

    /// Whether values from `source` can ever fit this kind (checked once, at start).
    pub fn accepts(&self, source: &Source) -> Result<(), String> {
        use ColumnKind::*;
        let textual = matches!(self, Text { .. } | Json | Jsonb);
        let ok = match source {
            Source::Value | Source::ValuePointer(_) | Source::Key | Source::KeyPointer(_) => true,
            Source::Topic => textual,
            Source::Partition => {
                textual
                    || matches!(self, Numeric { .. })
                    || matches!(self, Integer { min, max } if *min <= 0 && *max >= i32::MAX as i64)
            }
            Source::Offset => {
                textual
                    || matches!(self, Numeric { .. })
                    || matches!(self, Integer { min, max } if *min <= 0 && *max == i64::MAX)
            }
            Source::Timestamp => {
                matches!(
                    self,
                    Numeric { .. } | Text { .. } | Timestamp | TimestampTz | DateTime { .. }
                ) || matches!(self, Integer { max, .. } if *max == i64::MAX)
            }
            // Signed: a snapshot row's position is below zero.
            Source::SourcePosition => {
                matches!(self, Integer { min, max } if *min == i64::MIN && *max == i64::MAX)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{source} cannot be stored in a column of type {}",
                self.sql_name()
            ))
        }
    }

    /// The PostgreSQL type a text cell is cast to; for MySQL kinds, a name for messages.
    pub fn sql_name(&self) -> &'static str {
        use ColumnKind::*;
        match self {
            Integer { .. } => "bigint",
            Real => "real",
            Double => "double precision",
            Numeric { .. } => "numeric",
            Bool => "boolean",
            BoolAsInt => "tinyint(1)",
            Text { .. } => "text",
            Json => "json",
            Jsonb => "jsonb",
            Timestamp => "timestamp",
            TimestampTz => "timestamptz",
            DateTime { .. } => "datetime",
            Date => "date",
            Uuid => "uuid",
            Bytea => "bytea",
            Binary { .. } => "binary",
        }
    }

    /// Whether a cell of this kind, as conversion writes it, is only digits, letters, signs
    /// and punctuation: never a tab, line break or backslash, so the writer may send it as it
    /// is where a text format would escape those. Numbers are checked to be numbers and
    /// written as they came, times and UUIDs are formatted; text, JSON and `bytea` (`\x…`)
    /// are not plain.
    pub fn writes_plain_text(&self) -> bool {
        use ColumnKind::*;
        match self {
            Integer { .. } | Real | Double | Numeric { .. } | Bool | BoolAsInt => true,
            Timestamp | TimestampTz | DateTime { .. } | Date | Uuid | Binary { .. } => true,
            Text { .. } | Json | Jsonb | Bytea => false,
        }
    }

    /// Whether this kind can order versions of a row (`sink.newer_by`).
    pub fn orders_versions(&self) -> bool {
        use ColumnKind::*;
        matches!(
            self,
            Integer { .. } | Timestamp | TimestampTz | DateTime { .. } | Date
        )
    }
}

/// Orders two rendered cells of a `newer_by` column: the value as a number (integers as
/// they are, times in microseconds, dates in days). None for a cell this kind never renders.
pub fn version_key(kind: ColumnKind, cell: &str) -> Option<i64> {
    use ColumnKind::*;
    match kind {
        Integer { .. } => cell.parse().ok(),
        TimestampTz => chrono::DateTime::parse_from_rfc3339(cell)
            .ok()
            .map(|t| t.timestamp_micros()),
        Timestamp => NaiveDateTime::parse_from_str(cell, NAIVE_TIMESTAMP)
            .ok()
            .map(|t| t.and_utc().timestamp_micros()),
        DateTime { .. } => NaiveDateTime::parse_from_str(cell, MYSQL_DATETIME)
            .ok()
            .map(|t| t.and_utc().timestamp_micros()),
        Date => NaiveDate::parse_from_str(cell, "%Y-%m-%d")
            .ok()
            .map(|d| i64::from(chrono::Datelike::num_days_from_ce(&d))),
        _ => None,
    }
}

pub(super) const NAIVE_TIMESTAMP: &str = "%Y-%m-%dT%H:%M:%S%.f";
pub(super) const MYSQL_DATETIME: &str = "%Y-%m-%d %H:%M:%S%.6f";
