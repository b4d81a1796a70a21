//! Record → row: where each column's value comes from in a Kafka record (`sink.columns`),
//! and the conversion of that value to the column's type, learned from the table itself.
//!
//! Every value is validated and rendered here as the text the database parses for that type
//! (each [`ColumnKind`] belongs to PostgreSQL, MySQL, or both), so a value that does not fit
//! is caught on its own record (with its coordinates) instead of failing a whole batch inside
//! the database.
//!
//! Here: the sources and the [`RowMapper`], which reads a record's key and value once and
//! fills a row. Beside it: `kinds.rs` (the column types), `convert.rs` (a value to its
//! column's text) and `events.rs` (Debezium's change events, as the mapper reads them).

use std::fmt;
use std::sync::Arc;

use crate::cells::Cells;
use crate::config::{OnTruncate, RecordFormat};
use crate::debezium::{self, BinaryMode, Encoding, Encodings, Placeholder, SchemaCache};
use crate::json_pointers::Pointers;
use smallvec::{smallvec, SmallVec};

mod convert;
mod events;
mod kinds;

use convert::{convert_decoded, convert_field, Field};
pub use kinds::{version_key, ColumnKind};

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The whole record value.
    Value,
    /// A JSON Pointer (RFC 6901) into the record value.
    ValuePointer(String),
    /// The whole record key.
    Key,
    /// A JSON Pointer into the record key.
    KeyPointer(String),
    Topic,
    Partition,
    Offset,
    /// The record timestamp (milliseconds since the epoch).
    Timestamp,
    /// Where a Debezium change event's source log had the change: comparable between the
    /// changes of one row (see [`crate::debezium::source_position`]).
    SourcePosition,
}

impl Source {
    /// Whether it says where the record comes from (Kafka's coordinates and timestamp, the
    /// source's position) rather than what it holds.
    pub fn is_position(&self) -> bool {
        matches!(
            self,
            Source::Topic
                | Source::Partition
                | Source::Offset
                | Source::Timestamp
                | Source::SourcePosition
        )
    }

    pub fn parse(spec: &str) -> Result<Source, String> {
        let pointer = |p: &str| -> Result<String, String> {
            // RFC 6901: `~` must be followed by 0 or 1.
            let mut chars = p.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                    return Err(format!(
                        "`{spec}` is not a valid JSON Pointer: `~` must be followed by 0 or 1"
                    ));
                }
            }
            Ok(p.to_string())
        };
        match spec {
            "$value" => Ok(Source::Value),
            "$key" => Ok(Source::Key),
            "$topic" => Ok(Source::Topic),
            "$partition" => Ok(Source::Partition),
            "$offset" => Ok(Source::Offset),
            "$timestamp" => Ok(Source::Timestamp),
            "$source_position" => Ok(Source::SourcePosition),
            s if s.starts_with('/') => Ok(Source::ValuePointer(pointer(s)?)),
            s if s.starts_with("$key/") => Ok(Source::KeyPointer(pointer(&s[4..])?)),
            _ => Err(format!(
                "`{spec}` is not a source: use a JSON Pointer (/field/sub), $value, $key, $key/pointer, $topic, $partition, $offset, $timestamp or $source_position"
            )),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Value => f.write_str("$value"),
            Source::ValuePointer(p) => f.write_str(p),
            Source::Key => f.write_str("$key"),
            Source::KeyPointer(p) => write!(f, "$key{p}"),
            Source::Topic => f.write_str("$topic"),
            Source::Partition => f.write_str("$partition"),
            Source::Offset => f.write_str("$offset"),
            Source::Timestamp => f.write_str("$timestamp"),
            Source::SourcePosition => f.write_str("$source_position"),
        }
    }
}

/// What a column is to the pipeline beyond its type: it decides which checks apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Plain,
    /// A column of `sink.key`: every record needs a value for it.
    Key,
    /// The `sink.newer_by` column: every written record needs a value for it.
    Version,
}

/// One target column: its name, type, nullability and source.
#[derive(Debug, Clone)]
pub struct ColumnPlan {
    pub name: String,
    pub kind: ColumnKind,
    pub nullable: bool,
    pub source: Source,
    pub role: Role,
}

/// The Kafka record fields a row is built from.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// Why a record could not become a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError {
    pub column: String,
    pub reason: String,
}

impl ConvertError {
    /// A problem of the record as a whole (e.g. not a change event), not of one column.
    pub fn of_record(reason: String) -> ConvertError {
        ConvertError {
            column: String::new(),
            reason,
        }
    }
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.column.is_empty() {
            // The record as a whole (e.g. not a change event), not one column's value.
            f.write_str(&self.reason)
        } else {
            write!(f, "column {}: {}", self.column, self.reason)
        }
    }
}

/// What a record does to its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    /// Insert or upsert the row.
    Write,
    /// A tombstone: delete the row with this key (`sink.delete_on_null`).
    Delete,
    /// A Debezium truncate (`sink.truncate: apply`): delete every row it is newer than. Only
    /// its position is in the row.
    Truncate,
}

/// What a converted record comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Converted {
    /// One row, added to the cells.
    Row(RowOp),
    /// Nothing to write, by design: the record's offset is committed like a row's. The
    /// reason is for the log and the metric's `reason` label.
    Nothing(&'static str),
}

/// Converts records to rows of text cells, one per planned column.
#[derive(Debug, Clone)]
pub struct RowMapper {
    columns: Vec<ColumnPlan>,
    delete_on_null: bool,
    format: RecordFormat,
    /// The JSON Pointers into the value, and per column the index of its own among them.
    value_pointers: Pointers,
    /// The same for the key.
    key_pointers: Pointers,
    /// Per column, its pointer's index in the record without schemas and in the record that
    /// JsonConverter wrapped with its schema (`{"schema": …, "payload": …}`): the two differ
    /// in Debezium format only.
    pointer_of: Vec<Option<(usize, usize)>>,
    /// In Debezium format, per column, the field of the row it reads (a pointer of one token),
    /// whose schema says how its JSON encodes the value.
    field_of: Vec<Option<String>>,
    schemas: SchemaCache,
    /// Where the value's pointers to the event's `source` fields begin, when a column maps
    /// `$source_position`.
    position_at: Option<usize>,
    /// What a Debezium truncate event does (`sink.truncate`).
    truncate: OnTruncate,
    /// In Debezium format, the value Debezium sends for a column it does not have: such a
    /// cell is unavailable, and the row keeps its value.
    placeholder: Placeholder,
}

impl RowMapper {
    pub fn new(columns: Vec<ColumnPlan>, delete_on_null: bool, format: RecordFormat) -> RowMapper {
        let mut pointer_of = Vec::with_capacity(columns.len());
        let (mut value, mut key) = (Vec::new(), Vec::new());
        let debezium = format.is_debezium();
        let flattened = format == RecordFormat::DebeziumFlattened;
        // Debezium's pointers come first, in the order `events.rs` indexes them by.
        if debezium {
            let op = if flattened { "__op" } else { "op" };
            push_index(&mut value, format!("/{op}"));
            push_index(&mut value, format!("/payload/{op}"));
            push_index(&mut value, "/schema".into());
            push_index(&mut key, "/schema/type".into());
            push_index(&mut key, "/schema".into());
        }
        if flattened {
            push_index(&mut value, "/__deleted".into());
            push_index(&mut value, "/payload/__deleted".into());
            push_index(&mut value, "/schema/type".into());
        }
        let position_at = columns
            .iter()
            .any(|c| c.source == Source::SourcePosition)
            .then(|| {
                let at = value.len();
                for prefix in ["/source/", "/payload/source/"] {
                    for field in debezium::SOURCE_FIELDS {
                        value.push(format!("{prefix}{field}"));
                    }
                }
                at
            });
        let field_of: Vec<Option<String>> = columns
            .iter()
            .map(|column| match &column.source {
                Source::ValuePointer(p) if debezium && p[1..].find('/').is_none() => {
                    Some(p[1..].replace("~1", "/").replace("~0", "~"))
                }
                _ => None,
            })
            .collect();
        for column in &columns {
            let same = |i| Some((i, i));
            pointer_of.push(match &column.source {
                // A Debezium key column is read from the record key, which a delete has too.
                Source::ValuePointer(p) if debezium && column.role == Role::Key => Some((
                    push_index(&mut key, p.clone()),
                    push_index(&mut key, format!("/payload{p}")),
                )),
                Source::ValuePointer(p) if flattened => Some((
                    push_index(&mut value, p.clone()),
                    push_index(&mut value, format!("/payload{p}")),
                )),
                Source::ValuePointer(p) if debezium => Some((
                    push_index(&mut value, format!("/after{p}")),
                    push_index(&mut value, format!("/payload/after{p}")),
                )),
                Source::ValuePointer(p) => same(push_index(&mut value, p.clone())),
                Source::KeyPointer(p) => same(push_index(&mut key, p.clone())),
                _ => None,
            });
        }
        let value_pointers = Pointers::new(value.iter().map(String::as_str));
        let key_pointers = Pointers::new(key.iter().map(String::as_str));
        RowMapper {
            columns,
            delete_on_null,
            format,
            value_pointers,
            key_pointers,
            pointer_of,
            schemas: SchemaCache::new(field_of.clone()),
            field_of,
            position_at,
            truncate: OnTruncate::Refuse,
            placeholder: Placeholder::default(),
        }
    }

    /// The same mapper, with the connector sending bytes as `mode` says (Debezium's
    /// `binary.handling.mode`; `bytes` otherwise).
    pub fn with_binary_mode(self, mode: BinaryMode) -> RowMapper {
        let binary = (self.columns.iter())
            .map(|c| matches!(c.kind, ColumnKind::Bytea | ColumnKind::Binary { .. }))
            .collect();
        RowMapper {
            schemas: SchemaCache::new(self.field_of.clone()).with_binary(binary, mode),
            ..self
        }
    }

    /// The same mapper, with Debezium's placeholder for a value it does not have being
    /// `placeholder` (its default otherwise).
    pub fn with_placeholder(self, placeholder: Placeholder) -> RowMapper {
        RowMapper {
            placeholder,
            ..self
        }
    }

    /// The same mapper, with a Debezium truncate event doing `truncate` (refused by default).
    pub fn on_truncate(self, truncate: OnTruncate) -> RowMapper {
        RowMapper { truncate, ..self }
    }

    pub fn columns(&self) -> &[ColumnPlan] {
        &self.columns
    }

    /// Converts one record into the next row of `cells`. With `delete_on_null`, a tombstone
    /// becomes a delete: only the cells that do not come from the value (the key, the
    /// coordinates) are filled. In Debezium format the event's `op` decides, and a tombstone
    /// (which follows every delete event) comes to nothing. A record that cannot be a row
    /// leaves `cells` as it was.
    pub fn convert(
        &self,
        record: &RecordRef<'_>,
        cells: &mut Cells,
    ) -> Result<Converted, ConvertError> {
        let filled = match self.format {
            RecordFormat::Json => {
                // A tombstone has no value: value-sourced cells come out missing, which a
                // delete allows.
                let (op, value) = if self.delete_on_null && record.value.is_none() {
                    (RowOp::Delete, ReadJson::default())
                } else {
                    (RowOp::Write, self.read(Part::Value, record.value)?)
                };
                let key = self.read(Part::Key, record.key)?;
                self.fill(record, op, &value, &key, cells).map(|()| op)
            }
            RecordFormat::Debezium | RecordFormat::DebeziumFlattened => match self
                .read_change(record)?
            {
                None => return Ok(Converted::Nothing("tombstone")),
                Some((RowOp::Truncate, ..)) if self.truncate == OnTruncate::Ignore => {
                    return Ok(Converted::Nothing("truncate"))
                }
                Some((op, value, key)) => self.fill(record, op, &value, &key, cells).map(|()| op),
            },
        };
        match filled {
            Ok(op) => {
                // A batch of several tables' rows is as wide as the widest.
                for unused in self.columns.len()..cells.column_count() {
                    cells.end_cell(unused, true);
                }
                cells.end_row();
                Ok(Converted::Row(op))
            }
            Err(e) => {
                cells.abandon_row();
                Err(e)
            }
        }
    }

    fn fill<'r>(
        &self,
        record: &RecordRef<'r>,
        op: RowOp,
        value: &ReadJson<'r>,
        key: &ReadJson<'r>,
        cells: &mut Cells,
    ) -> Result<(), ConvertError> {
        for (c, column) in self.columns.iter().enumerate() {
            let field = match &column.source {
                // A truncate has no row: only where it comes from is kept.
                source if op == RowOp::Truncate && !source.is_position() => Field::Missing,
                Source::Value => record
                    .value
                    .map_or(Field::Missing, |b| Field::Bytes(b, value.text)),
                Source::Key => record
                    .key
                    .map_or(Field::Missing, |b| Field::Bytes(b, key.text)),
                Source::ValuePointer(_)
                    if self.format.is_debezium() && column.role == Role::Key =>
                {
                    key.field(self.pointer_of[c])
                }
                // A delete reads its key only.
                Source::ValuePointer(_) if op == RowOp::Delete => Field::Missing,
                Source::ValuePointer(_) => value.field(self.pointer_of[c]),
                Source::KeyPointer(_) => key.field(self.pointer_of[c]),
                Source::Topic => Field::Str(record.topic),
                Source::Partition => Field::Int(i64::from(record.partition)),
                Source::Offset => Field::Int(record.offset),
                Source::Timestamp => record.timestamp_ms.map_or(Field::Missing, Field::Int),
                Source::SourcePosition => match self.position_at {
                    Some(at) => {
                        Field::Int(value.source_position(at).map_err(|reason| ConvertError {
                            column: column.name.clone(),
                            reason,
                        })?)
                    }
                    None => Field::Missing,
                },
            };
            let out = cells.buffer(c);
            let written = match (field, &self.field_of[c]) {
                (Field::Json(json), Some(_)) => {
                    let read = if column.role == Role::Key { key } else { value };
                    let encoding = match &read.encodings {
                        Some(encodings) => &encodings[c],
                        None => &Encoding::Unknown,
                    };
                    // Only a plain column's value can be left out (a key or a version is
                    // always sent).
                    if column.role == Role::Plain && self.placeholder.is(encoding, json) {
                        cells.end_unavailable(c);
                        continue;
                    }
                    convert_decoded(column.kind, encoding, json, out)
                }
                (field, _) => convert_field(column.kind, field, out),
            }
            .map_err(|reason| ConvertError {
                column: column.name.clone(),
                reason,
            })?;
            cells.end_cell(c, !written);
            if !written {
                check_missing(column, op)?;
            }
        }
        Ok(())
    }

    /// The record's key or value read as JSON, when pointer columns read it.
    fn read<'r>(&self, part: Part, bytes: Option<&'r [u8]>) -> Result<ReadJson<'r>, ConvertError> {
        if self.pointers(part).is_empty() {
            return Ok(ReadJson::default());
        }
        self.read_all(part, bytes)
    }

    fn pointers(&self, part: Part) -> &Pointers {
        match part {
            Part::Value => &self.value_pointers,
            Part::Key => &self.key_pointers,
        }
    }

    /// The record's key or value read as JSON, and what each pointer finds in it.
    fn read_all<'r>(
        &self,
        part: Part,
        bytes: Option<&'r [u8]>,
    ) -> Result<ReadJson<'r>, ConvertError> {
        let pointers = self.pointers(part);
        // The error names the first column that reads it.
        let error = |reason: String| {
            let column = self.columns.iter().find(|c| part.pointed_by(&c.source));
            ConvertError {
                column: column.map_or(String::new(), |c| c.name.clone()),
                reason,
            }
        };
        let what = part.name();
        let bytes = bytes.ok_or_else(|| {
            error(format!(
                "the record {what} is null (a tombstone), so there is no field to read"
            ))
        })?;
        let not_json = |reason| error(format!("the record {what} is not JSON: {reason}"));
        let text = std::str::from_utf8(bytes).map_err(|e| not_json(format!("not UTF-8: {e}")))?;
        let mut found = smallvec![None; pointers.len()];
        pointers
            .find(text, &mut found)
            .map_err(|e| not_json(e.to_string()))?;
        Ok(ReadJson {
            text: Some(text),
            found,
            wrapped: false,
            encodings: None,
        })
    }
}

/// What each pointer found, by index, for one record: inline up to 16 pointers (a JSON
/// mapping's columns, usually), so that reading a record allocates nothing. More (a Debezium
/// event's own fields, and two pointers per column) spill to the heap, as a `Vec` would.
type Found<'r> = SmallVec<[Option<&'r str>; 16]>;

/// The two parts of a record that JSON Pointers read.
#[derive(Clone, Copy)]
enum Part {
    Value,
    Key,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Value => "value",
            Part::Key => "key",
        }
    }

    fn pointed_by(self, source: &Source) -> bool {
        matches!(
            (self, source),
            (Part::Value, Source::ValuePointer(_)) | (Part::Key, Source::KeyPointer(_))
        )
    }
}

/// A record's key or value read as JSON: its text, and what each pointer found in it.
#[derive(Default)]
struct ReadJson<'r> {
    text: Option<&'r str>,
    found: Found<'r>,
    /// Whether JsonConverter wrapped it with its schema: the second pointer of each column
    /// then reads it.
    wrapped: bool,
    /// With its schema, how each field of its row encodes its value.
    encodings: Option<Arc<Encodings>>,
}

impl<'r> ReadJson<'r> {
    /// The source position of a Debezium event whose `source` fields' pointers begin at `at`.
    fn source_position(&self, at: usize) -> Result<i64, String> {
        let count = debezium::SOURCE_FIELDS.len();
        let at = if self.wrapped { at + count } else { at };
        let fields = self
            .found
            .get(at..at + count)
            .ok_or("no source fields read")?;
        debezium::source_position(fields)
    }

    /// The value of the pointer at `index`; missing where the document has none or `null`,
    /// or was not read.
    fn field(&self, index: Option<(usize, usize)>) -> Field<'r> {
        let index = index.map(|(bare, wrapped)| if self.wrapped { wrapped } else { bare });
        let text = index.and_then(|i| self.found.get(i).copied().flatten());
        text.filter(|t| *t != "null")
            .map_or(Field::Missing, Field::Json)
    }
}

/// The index of `item` in `items`, added at the end if it is not there yet.
fn push_index(items: &mut Vec<String>, item: String) -> usize {
    items.iter().position(|i| *i == item).unwrap_or_else(|| {
        items.push(item);
        items.len() - 1
    })
}

/// A column without a value: an error where the row cannot do without one.
fn check_missing(column: &ColumnPlan, op: RowOp) -> Result<(), ConvertError> {
    let reason = match (column.role, op) {
        (Role::Key, RowOp::Write) => "it is a key column (sink.key), and a row needs its key",
        (Role::Key, RowOp::Delete) => {
            "it is a key column (sink.key), and a tombstone deletes the row by its key"
        }
        (Role::Version, RowOp::Write) => {
            "it is the version column (sink.newer_by), and a row needs a version to be compared"
        }
        (_, RowOp::Write) if !column.nullable => "the column is NOT NULL",
        _ => return Ok(()),
    };
    Err(ConvertError {
        column: column.name.clone(),
        reason: format!("the record has no value at {}, but {reason}", column.source),
    })
}

#[cfg(test)]
mod tests {
    use super::convert::{convert_bytes, convert_json, integer_digits_after_rounding, JsonRef};
    use super::*;
    use serde::de::IgnoredAny;

    fn plan(name: &str, kind: ColumnKind, nullable: bool, source: &str) -> ColumnPlan {
        ColumnPlan {
            name: name.into(),
            kind,
            nullable,
            source: Source::parse(source).expect("source"),
            role: Role::Plain,
        }
    }

    fn record<'a>(key: Option<&'a [u8]>, value: Option<&'a [u8]>) -> RecordRef<'a> {
        RecordRef {
            topic: "orders",
            partition: 3,
            offset: 77,
            timestamp_ms: Some(1_700_000_000_123),
            key,
            value,
        }
    }

    fn one(kind: ColumnKind, json: &str) -> Result<String, String> {
        serde_json::from_str::<IgnoredAny>(json).expect("json");
        let mut out = String::new();
        convert_json(kind, &JsonRef::read(json)?, &mut out).map(|()| out)
    }

    fn bytes(kind: ColumnKind, bytes: &[u8], json: Option<&str>) -> Result<String, String> {
        let mut out = String::new();
        convert_bytes(kind, bytes, json, &mut out).map(|()| out)
    }

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse("/a/b~1c"),
            Ok(Source::ValuePointer("/a/b~1c".into()))
        );
        assert_eq!(
            Source::parse("$key/id"),
            Ok(Source::KeyPointer("/id".into()))
        );
        assert!(Source::parse("/a~2").is_err());
        assert!(Source::parse("order_id").is_err());
        assert!(Source::parse("$headers").is_err());
    }

    #[test]
    fn converts_a_record_with_every_kind_of_source() {
        let mapper = RowMapper::new(
            vec![
                plan("id", ColumnKind::BIGINT, false, "/order_id"),
                plan(
                    "name",
                    ColumnKind::Text {
                        max_chars: Some(5),
                        max_bytes: None,
                    },
                    true,
                    "/customer/name",
                ),
                plan("payload", ColumnKind::Jsonb, true, "$value"),
                plan("k", ColumnKind::TEXT, true, "$key"),
                plan("kid", ColumnKind::INT, true, "$key/id"),
                plan("t", ColumnKind::TEXT, false, "$topic"),
                plan("p", ColumnKind::INT, false, "$partition"),
                plan("o", ColumnKind::BIGINT, false, "$offset"),
                plan("ts", ColumnKind::TimestampTz, true, "$timestamp"),
                plan("missing", ColumnKind::TEXT, true, "/nope"),
            ],
            false,
            RecordFormat::Json,
        );
        let value = br#"{"order_id": 12, "customer": {"name": "ana"}}"#;
        let mut cells = Cells::new(mapper.columns().len());
        mapper
            .convert(&record(Some(br#"{"id":5}"#), Some(value)), &mut cells)
            .expect("converts");
        assert_eq!(
            cells.row(0),
            vec![
                Some("12"),
                Some("ana"),
                Some(std::str::from_utf8(value).expect("utf8")),
                Some(r#"{"id":5}"#),
                Some("5"),
                Some("orders"),
                Some("3"),
                Some("77"),
                Some("2023-11-14T22:13:20.123Z"),
                None,
            ]
        );
        // In a batch wider than the table (another table's rows are wider), the rest is NULL.
        let mut wider = Cells::new(mapper.columns().len() + 2);
        mapper
            .convert(&record(Some(br#"{"id":5}"#), Some(value)), &mut wider)
            .expect("converts");
        assert_eq!(wider.rows(), 1);
        assert_eq!(wider.row(0)[..2], [Some("12"), Some("ana")]);
        assert_eq!(wider.row(0)[mapper.columns().len()..], [None, None]);
    }

    /// A mapper of Debezium events of a table (order_id, line, note, op, o): a key of two
    /// columns, a column named like the envelope's `op`, and the Kafka offset.
    fn debezium_mapper() -> RowMapper {
        mapper_of(RecordFormat::Debezium)
    }

    /// The same table's mapper for events in `format`.
    fn mapper_of(format: RecordFormat) -> RowMapper {
        let key = |name: &str, source: &str| ColumnPlan {
            role: Role::Key,
            ..plan(name, ColumnKind::BIGINT, false, source)
        };
        RowMapper::new(
            vec![
                key("order_id", "/order_id"),
                key("line", "/line"),
                plan("note", ColumnKind::TEXT, true, "/note"),
                plan("op", ColumnKind::TEXT, true, "/op"),
                plan("o", ColumnKind::BIGINT, false, "$offset"),
            ],
            false,
            format,
        )
    }

    /// JsonConverter's output with schemas: `{"schema": …, "payload": …}`, for the key (whose
    /// payload has no `op`) or the value of [`debezium_mapper`]'s table.
    fn wrapped(payload: &str) -> String {
        let key = r#"{"type":"int64","field":"order_id"},{"type":"int32","field":"line"}"#;
        let schema = if payload.contains(r#""op""#) {
            let row = format!(
                r#"{key},{{"type":"string","field":"note"}},{{"type":"string","field":"op"}}"#
            );
            format!(
                r#"{{"type":"struct","fields":[{{"type":"struct","fields":[{row}],"field":"before"}},{{"type":"struct","fields":[{row}],"field":"after"}},{{"type":"string","field":"op"}}]}}"#
            )
        } else {
            format!(r#"{{"type":"struct","fields":[{key}]}}"#)
        };
        format!(r#"{{"schema":{schema},"payload":{payload}}}"#)
    }

    #[test]
    fn debezium_events_write_the_row_image_and_delete_by_the_record_key() {
        let mapper = debezium_mapper();
        let key = br#"{"order_id":7,"line":2}"#;
        let create = r#"{"before":null,"after":{"order_id":7,"line":2,"note":"n\t1","op":"x"},"source":{"lsn":5},"op":"c","ts_ms":1}"#;
        let delete = r#"{"before":{"order_id":7,"line":2,"note":null,"op":null},"after":null,"source":{"lsn":9},"op":"d","ts_ms":2}"#;
        let wrapped_key = wrapped(std::str::from_utf8(key).expect("utf8"));
        let cases = [
            (key.to_vec(), create.to_string(), RowOp::Write),
            (
                wrapped_key.clone().into_bytes(),
                wrapped(create),
                RowOp::Write,
            ),
            (
                key.to_vec(),
                wrapped(&create.replace(r#""op":"c""#, r#""op":"u""#)),
                RowOp::Write,
            ),
            (
                wrapped_key.into_bytes(),
                create.replace(r#""op":"c""#, r#""op":"r""#),
                RowOp::Write,
            ),
            (key.to_vec(), delete.to_string(), RowOp::Delete),
            (key.to_vec(), wrapped(delete), RowOp::Delete),
        ];
        for (key, value, op) in cases {
            let mut cells = Cells::new(5);
            let converted = mapper
                .convert(&record(Some(&key), Some(value.as_bytes())), &mut cells)
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(converted, Converted::Row(op), "{value}");
            let expected = match op {
                RowOp::Write => vec![Some("7"), Some("2"), Some("n\t1"), Some("x"), Some("77")],
                RowOp::Delete => vec![Some("7"), Some("2"), None, None, Some("77")],
                RowOp::Truncate => unreachable!("no truncate among these"),
            };
            assert_eq!(cells.row(0), expected, "{value}");
        }
    }

    #[test]
    fn debezium_source_positions_fill_their_column_for_writes_and_deletes() {
        let key_column = ColumnPlan {
            role: Role::Key,
            ..plan("order_id", ColumnKind::BIGINT, false, "/order_id")
        };
        let mapper = RowMapper::new(
            vec![
                key_column,
                plan("at", ColumnKind::BIGINT, false, "$source_position"),
            ],
            false,
            RecordFormat::Debezium,
        );
        let key: &[u8] = br#"{"order_id":7}"#;
        let event = |op: &str, snapshot: &str| {
            format!(
                r#"{{"before":null,"after":{{"order_id":7}},"source":{{"connector":"postgresql","snapshot":{snapshot},"lsn":42}},"op":"{op}"}}"#
            )
        };
        let snapshot_at = (42 + i64::MIN).to_string();
        for (value, at) in [
            (event("c", r#""false""#), "42"),
            (event("d", "null"), "42"),
            (event("r", r#""last""#), snapshot_at.as_str()),
        ] {
            let mut cells = Cells::new(2);
            mapper
                .convert(&record(Some(key), Some(value.as_bytes())), &mut cells)
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(cells.get(1, 0), Some(at), "{value}");
        }
        // MySQL's binlog file and offset, bare and wrapped with a schema.
        let mysql = r#"{"before":null,"after":{"order_id":7},"source":{"connector":"mysql","snapshot":"false","file":"mysql-bin.000003","pos":4015,"row":0},"op":"u"}"#;
        let schema = r#"{"type":"struct","fields":[{"type":"struct","fields":[{"type":"int64","field":"order_id"}],"field":"after"}]}"#;
        let wrapped = format!(r#"{{"schema":{schema},"payload":{mysql}}}"#);
        let binlog_at = ((3_i64 << 32) + 4015).to_string();
        for value in [mysql, wrapped.as_str()] {
            let mut cells = Cells::new(2);
            mapper
                .convert(&record(Some(key), Some(value.as_bytes())), &mut cells)
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(cells.get(1, 0), Some(binlog_at.as_str()), "{value}");
        }
        let mut cells = Cells::new(2);
        let other = event("c", "null").replace("postgresql", "sqlserver");
        let error = mapper
            .convert(&record(Some(key), Some(other.as_bytes())), &mut cells)
            .expect_err("sqlserver");
        assert_eq!(error.column, "at", "{error}");
    }

    #[test]
    fn debezium_records_of_a_known_schema_read_as_the_first_of_it_did() {
        let key = wrapped(r#"{"order_id":7,"line":2}"#);
        let event = |payload: &str| wrapped(payload);
        let records = [
            event(r#"{"after":{"order_id":7,"line":2,"note":"a","op":"b"},"op":"c"}"#),
            event(r#"{"before":{"order_id":7,"line":2},"after":null,"op":"d"}"#),
            // Not what JsonConverter writes, yet JSON: read whole, with the same outcome.
            event(r#"{"after":{"note":"x"},"op":"u"}"#)
                .replace(r#"},"payload""#, r#"} , "payload""#),
            format!("{} ", event(r#"{"after":{"note":"y"},"op":"r"}"#)),
            event(r#"{"after":{"note":"z"},"op":"c"}"#)
                .replace("}}}", r#"}},"payload":{"op":"d"}}"#),
            event(r#"{"after":{"note":"broken"},"op":"c"}"#).replace(r#""op":"c"}"#, r#""op":"c""#),
        ];
        let convert = |mapper: &RowMapper, value: &str| {
            let mut cells = Cells::new(5);
            let converted = mapper.convert(
                &record(Some(key.as_bytes()), Some(value.as_bytes())),
                &mut cells,
            );
            (
                converted.map_err(|e| e.to_string()),
                (0..cells.rows())
                    .flat_map(|r| cells.row(r))
                    .map(|c| c.map(str::to_string))
                    .collect::<Vec<_>>(),
            )
        };
        let warm = debezium_mapper();
        let (warmed, _) = convert(&warm, &records[0]);
        assert!(warmed.is_ok(), "{warmed:?}");
        for value in &records {
            let first_of_schema = convert(&debezium_mapper(), value);
            assert_eq!(convert(&warm, value), first_of_schema, "{value}");
        }
    }

    #[test]
    fn flattened_debezium_events_write_the_row_and_delete_as_marked() {
        let mapper = mapper_of(RecordFormat::DebeziumFlattened);
        let bare_key = r#"{"order_id":7,"line":2}"#;
        let row = r#"{"order_id":7,"line":2,"note":"n","op":"x"}"#;
        let flat_schema = r#"{"type":"struct","fields":[{"type":"int64","field":"order_id"},{"type":"int32","field":"line"},{"type":"string","field":"note"},{"type":"string","field":"op"},{"type":"string","field":"__deleted"}]}"#;
        let wrap = |payload: &str| format!(r#"{{"schema":{flat_schema},"payload":{payload}}}"#);
        let written = vec![Some("7"), Some("2"), Some("n"), Some("x"), Some("77")];
        let deleted = vec![Some("7"), Some("2"), None, None, Some("77")];
        let with = |field: &str| row.replace(r#""op":"x""#, &format!(r#""op":"x",{field}"#));
        let cases = [
            (bare_key.to_string(), Some(row.to_string()), &written),
            (wrapped(bare_key), Some(wrap(row)), &written),
            (
                wrapped(bare_key),
                Some(wrap(&with(r#""__deleted":"false""#))),
                &written,
            ),
            (bare_key.to_string(), Some(with(r#""__op":"u""#)), &written),
            (bare_key.to_string(), None, &deleted),
            (wrapped(bare_key), None, &deleted),
            (
                bare_key.to_string(),
                Some(with(r#""__deleted":"true""#)),
                &deleted,
            ),
            (
                wrapped(bare_key),
                Some(wrap(&with(r#""__deleted":"true""#))),
                &deleted,
            ),
            (bare_key.to_string(), Some(with(r#""__op":"d""#)), &deleted),
        ];
        for (key, value, expected) in cases {
            let mut cells = Cells::new(5);
            let record = record(Some(key.as_bytes()), value.as_deref().map(str::as_bytes));
            mapper
                .convert(&record, &mut cells)
                .unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(&cells.row(0), expected, "{value:?}");
        }
        let mut cells = Cells::new(5);
        for (key, value, reason) in [
            (Some(bare_key), with(r#""__op":"t""#), "truncate"),
            (None, row.to_string(), "no key"),
        ] {
            let record = record(key.map(str::as_bytes), Some(value.as_bytes()));
            let error = mapper.convert(&record, &mut cells).expect_err(&value);
            assert!(error.to_string().contains(reason), "{value}: {error}");
        }
    }

    #[test]
    fn debezium_truncates_are_applied_or_ignored_when_the_pipeline_says_so() {
        // As Debezium sends it: without a key, with the position of the truncate.
        let truncate = r#"{"before":null,"after":null,"source":{"lsn":40},"op":"t"}"#;
        for value in [truncate.to_string(), wrapped(truncate)] {
            let applied = debezium_mapper().on_truncate(OnTruncate::Apply);
            let mut cells = Cells::new(5);
            let record = record(None, Some(value.as_bytes()));
            let converted = applied.convert(&record, &mut cells);
            assert_eq!(converted, Ok(Converted::Row(RowOp::Truncate)), "{value}");
            // Only where it comes from: no key, no row image.
            assert_eq!(cells.row(0), [None, None, None, None, Some("77")]);
            let ignored = debezium_mapper().on_truncate(OnTruncate::Ignore);
            let mut cells = Cells::new(5);
            let converted = ignored.convert(&record, &mut cells);
            assert_eq!(converted, Ok(Converted::Nothing("truncate")));
            assert_eq!(cells.rows(), 0);
        }
    }

    #[test]
    fn debezium_tombstones_do_nothing_and_other_events_are_bad_records() {
        let mapper = debezium_mapper();
        let key: &[u8] = br#"{"order_id":7,"line":2}"#;
        let mut cells = Cells::new(5);
        assert_eq!(
            mapper.convert(&record(Some(key), None), &mut cells),
            Ok(Converted::Nothing("tombstone"))
        );
        let refused = [
            (
                Some(key),
                r#"{"before":null,"after":null,"source":{},"op":"t"}"#.to_string(),
                "truncate",
            ),
            // As Debezium sends it: without a key.
            (
                None,
                wrapped(r#"{"before":null,"after":null,"source":{},"op":"t"}"#),
                "truncate",
            ),
            (
                Some(key),
                wrapped(r#"{"before":null,"after":null,"op":"m"}"#),
                "op \"m\"",
            ),
            (
                Some(key),
                r#"{"order_id":7,"line":2}"#.to_string(),
                "no `op` field",
            ),
            (
                None,
                r#"{"after":{"order_id":7,"line":2},"op":"c"}"#.to_string(),
                "no key",
            ),
            (
                Some(b"{}".as_slice()),
                r#"{"after":{"order_id":7,"line":2},"op":"c"}"#.to_string(),
                "key column",
            ),
            (
                Some(br#"{"order_id":"seven","line":2}"#.as_slice()),
                r#"{"after":{"note":"a"},"op":"c"}"#.to_string(),
                "column order_id",
            ),
        ];
        for (key, value, reason) in refused {
            let error = mapper
                .convert(&record(key, Some(value.as_bytes())), &mut cells)
                .expect_err(&value);
            assert!(error.to_string().contains(reason), "{value}: {error}");
        }
        assert_eq!(cells.rows(), 0, "nothing and refusals leave no row");
        assert_eq!(cells.text_bytes(), 0);
    }

    #[test]
    fn bad_records_name_the_column_and_the_reason() {
        let mapper = RowMapper::new(
            vec![
                plan("id", ColumnKind::BIGINT, false, "/order_id"),
                plan(
                    "name",
                    ColumnKind::Text {
                        max_chars: Some(3),
                        max_bytes: None,
                    },
                    true,
                    "/name",
                ),
            ],
            false,
            RecordFormat::Json,
        );
        let mut row = Cells::new(2);
        let err = mapper
            .convert(&record(None, Some(b"not json")), &mut row)
            .expect_err("not json");
        assert_eq!(err.column, "id");
        assert!(err.reason.contains("not JSON"), "{err}");
        let err = mapper
            .convert(&record(None, Some(br#"{"name":"ab"}"#)), &mut row)
            .expect_err("missing");
        assert_eq!(err.column, "id");
        assert!(err.reason.contains("NOT NULL"), "{err}");
        let err = mapper
            .convert(
                &record(None, Some(br#"{"order_id":1,"name":"abcd"}"#)),
                &mut row,
            )
            .expect_err("long");
        assert_eq!(err.column, "name");
        assert!(err.reason.contains("at most 3"), "{err}");
        let err = mapper
            .convert(&record(None, None), &mut row)
            .expect_err("tombstone");
        assert!(err.reason.contains("tombstone"), "{err}");
        assert_eq!(row.rows(), 0, "a record that is not a row leaves no cell");
        assert_eq!(row.text_bytes(), 0, "{row:?}");
    }

    #[test]
    fn integers_check_range_and_form() {
        assert_eq!(one(ColumnKind::SMALLINT, "32767").as_deref(), Ok("32767"));
        assert!(one(ColumnKind::SMALLINT, "32768").is_err());
        assert_eq!(one(ColumnKind::INT, "\"42\"").as_deref(), Ok("42"));
        assert_eq!(one(ColumnKind::BIGINT, "3.0").as_deref(), Ok("3"));
        assert!(one(ColumnKind::BIGINT, "3.5").is_err());
        assert!(one(ColumnKind::BIGINT, "true").is_err());
        assert!(one(ColumnKind::BIGINT, "99999999999999999999").is_err());
    }

    #[test]
    fn numeric_keeps_digits_and_checks_precision() {
        let n = |p, s| ColumnKind::Numeric {
            precision: Some(p),
            scale: s,
        };
        assert_eq!(
            one(
                ColumnKind::Numeric {
                    precision: None,
                    scale: 0
                },
                "12345678901234567890.123456789"
            )
            .as_deref(),
            Ok("12345678901234567890.123456789")
        );
        assert_eq!(one(n(5, 2), "999.994").as_deref(), Ok("999.994"));
        assert!(one(n(5, 2), "999.995").is_err(), "rounds up to 1000.00");
        assert!(one(n(5, 2), "1000").is_err());
        assert_eq!(one(n(5, 2), "-0.001").as_deref(), Ok("-0.001"));
        assert!(one(n(3, 0), "9.99e1").is_ok());
        assert!(one(n(3, 0), "1e3").is_err());
        assert!(one(n(3, 0), "\"abc\"").is_err());
        assert_eq!(integer_digits_after_rounding("0.5", 0), Some(1));
        assert_eq!(integer_digits_after_rounding("0.4", 0), Some(0));
        assert_eq!(integer_digits_after_rounding("99.5", 0), Some(3));
    }

    #[test]
    fn other_types() {
        assert!(one(ColumnKind::Real, "1e39").is_err());
        assert_eq!(one(ColumnKind::Double, "1.5").as_deref(), Ok("1.5"));
        assert_eq!(one(ColumnKind::Bool, "true").as_deref(), Ok("true"));
        assert!(one(ColumnKind::Bool, "1").is_err());
        assert_eq!(
            one(ColumnKind::TEXT, "{\"a\":1}").as_deref(),
            Ok("{\"a\":1}")
        );
        assert!(one(ColumnKind::TEXT, "\"a\\u0000b\"").is_err());
        assert!(one(ColumnKind::Jsonb, "{\"a\":\"\\u0000\"}").is_err());
        assert_eq!(
            one(ColumnKind::Json, "{\"a\":\"\\u0000\"}").as_deref(),
            Ok("{\"a\":\"\\u0000\"}")
        );
        assert_eq!(
            one(ColumnKind::TimestampTz, "\"2024-01-02T03:04:05+02:00\"").as_deref(),
            Ok("2024-01-02T01:04:05Z")
        );
        assert_eq!(
            one(ColumnKind::Timestamp, "\"2024-01-02 03:04:05\"").as_deref(),
            Ok("2024-01-02T03:04:05")
        );
        assert!(one(ColumnKind::TimestampTz, "\"yesterday\"").is_err());
        // A timestamp already written as the column takes it is kept as it came; whichever
        // way, the cell is what chrono writes.
        for input in [
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05.500Z",
            "2024-01-02T03:04:05.500000Z",
            "2024-01-02T03:04:05.000Z",
            "2024-01-02T03:04:05.123456Z",
            "2024-01-02T03:04:05.123456780Z",
            "2024-01-02T03:04:05.123456789Z",
            "2024-01-02T03:04:05.1Z",
            "2024-01-02T03:04:05.12345Z",
            "2024-01-02 03:04:05Z",
            "2024-01-02t03:04:05z",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.500Z",
            "0001-01-01T00:00:00Z",
            "2024-01-02T03:04:05-00:00",
        ] {
            let written = chrono::DateTime::parse_from_rfc3339(input)
                .expect("RFC 3339")
                .with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
            let json = format!("\"{input}\"");
            assert_eq!(one(ColumnKind::TimestampTz, &json), Ok(written), "{input}");
        }
        assert_eq!(
            one(ColumnKind::Date, "\"2024-02-29\"").as_deref(),
            Ok("2024-02-29")
        );
        assert!(one(ColumnKind::Date, "\"2023-02-29\"").is_err());
        assert_eq!(
            one(ColumnKind::Uuid, "\"67E55044-10B1-426F-9247-BB680E5FE0C8\"").as_deref(),
            Ok("67e55044-10b1-426f-9247-bb680e5fe0c8")
        );
        assert_eq!(
            bytes(ColumnKind::Bytea, &[0, 255], None).as_deref(),
            Ok("\\x00ff")
        );
        assert!(bytes(ColumnKind::TEXT, &[0xff], None).is_err());
    }

    #[test]
    fn jsonb_from_raw_bytes_refuses_nul_whether_parsed_or_not() {
        let raw = br#"{"a": "x\u0000y"}"#;
        let text = std::str::from_utf8(raw).ok();
        assert!(bytes(ColumnKind::Jsonb, raw, None).is_err());
        assert!(bytes(ColumnKind::Jsonb, raw, text).is_err());
        assert!(bytes(ColumnKind::Json, raw, text).is_ok());
        let escaped_backslash = br#"{"a": "x\\u0000y"}"#;
        assert!(bytes(ColumnKind::Jsonb, escaped_backslash, None).is_ok());
        assert!(bytes(ColumnKind::Jsonb, b"{nope", None).is_err());
    }

    #[test]
    fn source_and_kind_compatibility() {
        assert!(ColumnKind::INT.accepts(&Source::Offset).is_err());
        assert!(ColumnKind::BIGINT.accepts(&Source::Offset).is_ok());
        assert!(ColumnKind::Bool.accepts(&Source::Topic).is_err());
        assert!(ColumnKind::TimestampTz.accepts(&Source::Timestamp).is_ok());
    }
}
