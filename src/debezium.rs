//! Debezium change events: how each field's JSON encodes its value. Kafka Connect's
//! JsonConverter writes a date as days since the epoch, a decimal as base64 bytes, a JSON
//! column as a string of JSON; only the field's schema (its logical type, such as
//! `io.debezium.time.MicroTimestamp`) says which. [`crate::mapping`] reads the envelope and
//! asks here, per column, how to decode the field before the column's own conversion.
//!
//! Schemas repeat in every record of a table; each distinct one is parsed once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use chrono::{DateTime, NaiveDate, NaiveTime};
use num_bigint::BigInt;
use serde::Deserialize;

use crate::mapping::ColumnKind;

/// How a field's JSON holds its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// As JSON says: numbers, strings, booleans, arrays.
    Plain,
    /// Days since 1970-01-01 (`io.debezium.time.Date`, Connect's `Date`).
    Days,
    /// A point in time since the epoch, in this many units per second (`Timestamp`: 1000,
    /// `MicroTimestamp`: 10^6, `NanoTimestamp`: 10^9, Connect's `Timestamp`: 1000).
    Epoch { per_second: i64 },
    /// A time of day since midnight, in this many units per second (`Time`, `MicroTime`,
    /// `NanoTime`, Connect's `Time`).
    TimeOfDay { per_second: i64 },
    /// Connect's `Decimal`: the unscaled value as base64 two's-complement bytes.
    Decimal { scale: u32 },
    /// `io.debezium.data.VariableScaleDecimal`: `{"scale": …, "value": <Decimal bytes>}`.
    VariableScaleDecimal,
    /// `io.debezium.data.Json`: a string whose content is the JSON document.
    JsonText,
    /// Bytes without a logical type (bytea, binary): base64.
    Bytes,
    /// Bytes the connector sends as text (`binary.handling.mode` base64, base64-url-safe or
    /// hex): a `string` field that goes into a binary column.
    BinaryText(BinaryMode),
    /// A `string` field for a binary column while the pipeline expects `bytes` fields: the
    /// connector's `binary.handling.mode` is a text mode the pipeline was not told of.
    BinaryModeUnknown,
    /// A logical type idemsink does not convert (named in the error).
    Unsupported(String),
    /// The record has no schema (JsonConverter's `schemas.enable=false`): what is
    /// unambiguous is converted, the rest refused (see [`decode`]).
    Unknown,
}

impl Encoding {
    fn of(field: &FieldSchema) -> Encoding {
        let per_second = |unit: &str| match unit {
            "milli" => 1_000,
            "micro" => 1_000_000,
            _ => 1_000_000_000,
        };
        match field.name.as_deref() {
            Some("io.debezium.time.Date" | "org.apache.kafka.connect.data.Date") => Encoding::Days,
            Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
                Encoding::Epoch {
                    per_second: per_second("milli"),
                }
            }
            Some("io.debezium.time.MicroTimestamp") => Encoding::Epoch {
                per_second: per_second("micro"),
            },
            Some("io.debezium.time.NanoTimestamp") => Encoding::Epoch {
                per_second: per_second("nano"),
            },
            Some("io.debezium.time.Time" | "org.apache.kafka.connect.data.Time") => {
                Encoding::TimeOfDay {
                    per_second: per_second("milli"),
                }
            }
            Some("io.debezium.time.MicroTime") => Encoding::TimeOfDay {
                per_second: per_second("micro"),
            },
            Some("io.debezium.time.NanoTime") => Encoding::TimeOfDay {
                per_second: per_second("nano"),
            },
            Some("org.apache.kafka.connect.data.Decimal") => {
                match field.parameters.get("scale").map(|s| s.parse::<u32>()) {
                    Some(Ok(scale)) => Encoding::Decimal { scale },
                    _ => Encoding::Unsupported("a Decimal without a scale".into()),
                }
            }
            Some("io.debezium.data.VariableScaleDecimal") => Encoding::VariableScaleDecimal,
            Some("io.debezium.data.Json") => Encoding::JsonText,
            Some(
                name @ ("io.debezium.time.MicroDuration"
                | "io.debezium.time.NanoDuration"
                | "io.debezium.time.Interval"),
            ) => Encoding::Unsupported(format!("{name} (an interval)")),
            Some(name) if name.starts_with("io.debezium.data.geometry.") => {
                Encoding::Unsupported(format!("{name} (a spatial type)"))
            }
            _ if field.kind == "bytes" => Encoding::Bytes,
            _ if field.kind == "struct" || field.kind == "map" => Encoding::Unsupported(format!(
                "a {} field {}",
                field.kind,
                field.name.as_deref().unwrap_or("")
            )),
            _ => Encoding::Plain,
        }
    }
}

/// The connector's `binary.handling.mode`: how it sends a binary column's bytes. Its schema
/// does not say (the text modes are plain `string` fields), so the pipeline says it
/// (`sink.binary_handling_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum BinaryMode {
    /// `bytes` (Debezium's default): a `bytes` field, base64 in JSON.
    #[default]
    #[serde(rename = "bytes")]
    Bytes,
    #[serde(rename = "base64")]
    Base64,
    #[serde(rename = "base64-url-safe")]
    Base64UrlSafe,
    #[serde(rename = "hex")]
    Hex,
}

impl BinaryMode {
    /// `bytes` as the connector writes them in this mode (text modes only).
    fn encode(self, bytes: &[u8]) -> String {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        match self {
            BinaryMode::Bytes | BinaryMode::Base64 => STANDARD.encode(bytes),
            BinaryMode::Base64UrlSafe => URL_SAFE.encode(bytes),
            BinaryMode::Hex => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    /// The bytes `text` spells in this mode.
    fn decode(self, text: &str) -> Result<Vec<u8>, String> {
        use base64::engine::general_purpose::URL_SAFE;
        match self {
            BinaryMode::Bytes | BinaryMode::Base64 => base64(text),
            BinaryMode::Base64UrlSafe => URL_SAFE
                .decode(text)
                .map_err(|e| format!("`{text}` is not URL-safe base64: {e}")),
            BinaryMode::Hex => {
                decode_hex(text).ok_or_else(|| format!("`{text}` is not hexadecimal octets"))
            }
        }
        .map_err(|e| format!("{e} (sink.binary_handling_mode: {})", self.name()))
    }

    fn name(self) -> &'static str {
        match self {
            BinaryMode::Bytes => "bytes",
            BinaryMode::Base64 => "base64",
            BinaryMode::Base64UrlSafe => "base64-url-safe",
            BinaryMode::Hex => "hex",
        }
    }
}

impl Encoding {
    /// The encoding of a field that goes into a binary column: a `string` field without a
    /// logical type holds bytes as the connector's `binary.handling.mode` writes them.
    fn of_binary(field: &FieldSchema, mode: BinaryMode) -> Encoding {
        match Encoding::of(field) {
            Encoding::Plain if field.kind == "string" && mode == BinaryMode::Bytes => {
                Encoding::BinaryModeUnknown
            }
            Encoding::Plain if field.kind == "string" => Encoding::BinaryText(mode),
            other => other,
        }
    }
}

/// A field of a Kafka Connect schema, as JsonConverter writes it.
#[derive(Debug, Deserialize)]
struct FieldSchema {
    #[serde(default)]
    field: String,
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    #[serde(default)]
    parameters: HashMap<String, String>,
    #[serde(default)]
    fields: Vec<FieldSchema>,
}

/// Per column of a mapping, the encoding of the row's field it reads ([`Encoding::Plain`]
/// where it reads none, or the schema has no such field).
pub type Encodings = Vec<Encoding>;

/// Which struct of a schema holds the row's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowIn {
    /// The schema's own fields: a record key, or a flattened event (ExtractNewRecordState).
    Fields,
    /// A change event's envelope: the fields of its `after` struct (the same as `before`'s).
    After,
}

/// Parsed schemas by their JSON text: a pipeline sees one per table and schema version, so a
/// few entries serve every record.
#[derive(Debug, Default)]
pub struct SchemaCache {
    /// Per column, the field of the row it reads.
    fields: Vec<Option<String>>,
    /// Per column, whether it is a binary column, and how the connector sends bytes (a
    /// `string` field into such a column is text-encoded bytes).
    binary: Vec<bool>,
    mode: BinaryMode,
    entries: Mutex<Vec<CachedSchema>>,
}

/// A schema's text, which row it describes, and its fields' encodings.
type CachedSchema = (Box<str>, RowIn, Arc<Encodings>);

/// Past this many distinct schemas, the oldest is parsed again when it comes back.
const CACHED_SCHEMAS: usize = 256;

impl Clone for SchemaCache {
    fn clone(&self) -> SchemaCache {
        SchemaCache::new(self.fields.clone()).with_binary(self.binary.clone(), self.mode)
    }
}

impl SchemaCache {
    /// A cache for a mapping whose columns read `fields` of the row.
    pub fn new(fields: Vec<Option<String>>) -> SchemaCache {
        SchemaCache {
            binary: vec![false; fields.len()],
            fields,
            mode: BinaryMode::default(),
            entries: Mutex::default(),
        }
    }

    /// The same, with the columns that are binary (`binary`, per column) and the
    /// connector's `mode` for bytes.
    pub fn with_binary(self, binary: Vec<bool>, mode: BinaryMode) -> SchemaCache {
        SchemaCache {
            binary,
            mode,
            entries: Mutex::default(),
            ..self
        }
    }

    /// The length and encodings of a schema already parsed that `text` starts with.
    pub fn known_prefix(&self, text: &[u8], row: RowIn) -> Option<(usize, Arc<Encodings>)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .rev()
            .find(|(schema, part, _)| *part == row && text.starts_with(schema.as_bytes()))
            .map(|(schema, _, encodings)| (schema.len(), Arc::clone(encodings)))
    }

    /// The encodings of the row's fields that `schema` (JSON text) describes.
    pub fn encodings(&self, schema: &str, row: RowIn) -> Result<Arc<Encodings>, String> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, found)) = entries
            .iter()
            .find(|(text, part, _)| *part == row && &**text == schema)
        {
            return Ok(Arc::clone(found));
        }
        let parsed = Arc::new(parse(schema, row, self)?);
        if entries.len() == CACHED_SCHEMAS {
            entries.remove(0);
        }
        entries.push((schema.into(), row, Arc::clone(&parsed)));
        Ok(parsed)
    }
}

fn parse(schema: &str, row: RowIn, cache: &SchemaCache) -> Result<Encodings, String> {
    let schema: FieldSchema = serde_json::from_str(schema)
        .map_err(|e| format!("the record's schema is not a Kafka Connect schema: {e}"))?;
    let fields = match row {
        RowIn::Fields => &schema.fields,
        RowIn::After => {
            let after = schema.fields.iter().find(|f| f.field == "after");
            &after
                .ok_or("the record's schema has no `after` field: not a Debezium change event")?
                .fields
        }
    };
    let by_name: HashMap<&str, &FieldSchema> =
        fields.iter().map(|f| (f.field.as_str(), f)).collect();
    Ok((cache.fields.iter().zip(&cache.binary))
        .map(
            |(field, binary)| match field.as_deref().and_then(|f| by_name.get(f)) {
                Some(schema) if *binary => Encoding::of_binary(schema, cache.mode),
                Some(schema) => Encoding::of(schema),
                None => Encoding::Plain,
            },
        )
        .collect())
}

/// A field decoded to what a column conversion takes.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// JSON text to convert as it is.
    AsIs,
    /// A string value (a date, a timestamp in RFC 3339, a time of day).
    Text(String),
    /// A JSON number's text (a decimal).
    Number(String),
    /// Bytes: binary columns take them, JSON columns check them as a document, text
    /// columns as UTF-8.
    Bytes(Vec<u8>),
}

/// Decodes `json`, a field's JSON text (not `null`), for a column of `kind`.
pub fn decode(encoding: &Encoding, kind: ColumnKind, json: &str) -> Result<Decoded, String> {
    Ok(match encoding {
        Encoding::Plain => Decoded::AsIs,
        Encoding::Days => Decoded::Text(date(integer(json)?)?),
        Encoding::Epoch { per_second } => Decoded::Text(timestamp(integer(json)?, *per_second)?),
        Encoding::TimeOfDay { per_second } => {
            Decoded::Text(time_of_day(integer(json)?, *per_second)?)
        }
        Encoding::Decimal { scale } => Decoded::Number(decimal(&base64(&string(json)?)?, *scale)),
        Encoding::VariableScaleDecimal => {
            #[derive(Deserialize)]
            struct Variable {
                scale: u32,
                value: String,
            }
            let v: Variable = serde_json::from_str(json)
                .map_err(|e| format!("not a VariableScaleDecimal: {e}"))?;
            Decoded::Number(decimal(&base64(&v.value)?, v.scale))
        }
        Encoding::JsonText => Decoded::Bytes(string(json)?.into_bytes()),
        Encoding::Bytes => Decoded::Bytes(base64(&string(json)?)?),
        Encoding::BinaryText(mode) => Decoded::Bytes(mode.decode(&string(json)?)?),
        Encoding::BinaryModeUnknown => {
            return Err(
                "the field is a string, but its column is binary: the connector sends \
                 bytes as text (its binary.handling.mode is base64, base64-url-safe or hex, not \
                 bytes); set sink.binary_handling_mode to the same, and idemsink decodes them"
                    .into(),
            )
        }
        Encoding::Unsupported(what) => {
            return Err(format!(
                "the field holds {what}, which idemsink does not convert"
            ))
        }
        Encoding::Unknown => return without_schema(kind, json),
    })
}

/// Without a schema, a field is converted only where its JSON form says what it is: Debezium
/// sends every JSON column as a string of JSON and every date as days; a number for a time,
/// or a string for a decimal or bytes, could be in more than one unit or encoding.
fn without_schema(kind: ColumnKind, json: &str) -> Result<Decoded, String> {
    use ColumnKind::*;
    let string = json.starts_with('"');
    let ambiguous = match kind {
        Json | Jsonb if string => return decode(&Encoding::JsonText, kind, json),
        Date if !string => return decode(&Encoding::Days, kind, json),
        Timestamp | TimestampTz | DateTime { .. } if !string => {
            "a number for a timestamp may count milli-, micro- or nanoseconds"
        }
        Numeric { .. } if string => "a string for a decimal may be base64 bytes or digits",
        Bytea | Binary { .. } if string => "a string for bytes may be base64 or hex",
        _ => return Ok(Decoded::AsIs),
    };
    Err(format!(
        "the record has no schema, and {ambiguous}: let Kafka Connect's JsonConverter include \
         it (value.converter.schemas.enable=true)"
    ))
}

fn integer(json: &str) -> Result<i64, String> {
    json.parse()
        .map_err(|_| format!("expected an integer, got {json}"))
}

fn string(json: &str) -> Result<String, String> {
    serde_json::from_str(json).map_err(|_| format!("expected a string, got {json}"))
}

fn base64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("`{text}` is not base64: {e}"))
}

fn date(days: i64) -> Result<String, String> {
    /// 1970-01-01 counted from 0001-01-01 as day 1, as chrono counts.
    const EPOCH_FROM_CE: i64 = 719_163;
    i32::try_from(days + EPOCH_FROM_CE)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .ok_or_else(|| format!("{days} days from 1970-01-01 is out of the date range"))
}

fn timestamp(count: i64, per_second: i64) -> Result<String, String> {
    let (seconds, part) = (count.div_euclid(per_second), count.rem_euclid(per_second));
    let nanos = part * (1_000_000_000 / per_second);
    DateTime::from_timestamp(seconds, nanos as u32)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .ok_or_else(|| format!("{count} (1/{per_second} s since the epoch) is out of range"))
}

fn time_of_day(count: i64, per_second: i64) -> Result<String, String> {
    let (seconds, part) = (count.div_euclid(per_second), count.rem_euclid(per_second));
    let nanos = part * (1_000_000_000 / per_second);
    u32::try_from(seconds)
        .ok()
        .and_then(|s| NaiveTime::from_num_seconds_from_midnight_opt(s, nanos as u32))
        .map(|t| t.format("%H:%M:%S%.f").to_string())
        .ok_or_else(|| format!("{count} (1/{per_second} s since midnight) is not a time of day"))
}

/// The decimal text of an unscaled two's-complement big-endian integer and its scale.
fn decimal(unscaled: &[u8], scale: u32) -> String {
    let digits = BigInt::from_signed_bytes_be(unscaled).to_string();
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", digits.as_str()),
    };
    let scale = scale as usize;
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

/// Debezium's default `unavailable.value.placeholder`.
pub const DEFAULT_PLACEHOLDER: &str = "__debezium_unavailable_value";

/// The value Debezium sends for a column whose value it does not have: PostgreSQL leaves an
/// unchanged TOASTed value (a large text, bytea or json) out of an update's row image unless
/// the table's `REPLICA IDENTITY` is `FULL`, and Debezium puts its
/// `unavailable.value.placeholder` there instead. A field holding it is no value of the row:
/// the row keeps the one it has. Its forms, as JsonConverter writes them: a string for text
/// and JSON fields, base64 of the placeholder's bytes for a binary field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// The JSON text of the string form, quotes included.
    text: String,
    /// The JSON text of the bytes form (base64), quotes included.
    bytes: String,
    /// The placeholder's bytes as each text mode of bytes writes them: base64, URL-safe
    /// base64, hex.
    in_modes: [String; 3],
}

impl Placeholder {
    /// The placeholder of a connector whose `unavailable.value.placeholder` is `setting`: its
    /// bytes are the setting's UTF-8, or with the `hex:` prefix the octets the rest spells.
    pub fn new(setting: &str) -> Result<Placeholder, String> {
        let bytes = match setting.strip_prefix("hex:") {
            Some(hex) => decode_hex(hex).ok_or_else(|| {
                format!("`{setting}`: after `hex:` comes an even number of hexadecimal digits")
            })?,
            None => setting.as_bytes().to_vec(),
        };
        if bytes.is_empty() {
            return Err("the placeholder is empty: an empty string is a value".into());
        }
        // Debezium's string form is the bytes read as UTF-8 (Java's `new String(bytes)`).
        let text = String::from_utf8_lossy(&bytes);
        let base64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Ok(Placeholder {
            text: serde_json::Value::from(text.as_ref()).to_string(),
            bytes: format!("\"{base64}\""),
            in_modes: [
                BinaryMode::Base64,
                BinaryMode::Base64UrlSafe,
                BinaryMode::Hex,
            ]
            .map(|mode| mode.encode(&bytes)),
        })
    }

    /// Whether `json`, a field's JSON text encoded as `encoding` says, is the placeholder.
    /// In a text mode of bytes, Debezium versions differ: the placeholder's bytes in that
    /// mode, or its text as it is (hex mode, lately); either counts.
    pub fn is(&self, encoding: &Encoding, json: &str) -> bool {
        match encoding {
            Encoding::Bytes => json == self.bytes,
            Encoding::BinaryText(mode) => {
                let inner = json.strip_prefix('"').and_then(|j| j.strip_suffix('"'));
                let same = |encoded: &str| {
                    inner.is_some_and(|j| match mode {
                        BinaryMode::Hex => j.eq_ignore_ascii_case(encoded),
                        _ => j == encoded,
                    })
                };
                json == self.text
                    || match mode {
                        BinaryMode::Bytes | BinaryMode::Base64 => same(&self.in_modes[0]),
                        BinaryMode::Base64UrlSafe => same(&self.in_modes[1]),
                        BinaryMode::Hex => same(&self.in_modes[2]),
                    }
            }
            _ => json == self.text,
        }
    }
}

impl Default for Placeholder {
    fn default() -> Placeholder {
        Placeholder::new(DEFAULT_PLACEHOLDER).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The fields of a change event's `source` block that [`source_position`] reads, in order.
pub const SOURCE_FIELDS: [&str; 6] = ["connector", "snapshot", "lsn", "file", "pos", "row"];

/// A snapshot row's position is its snapshot's position moved below every streamed change's.
const SNAPSHOT_BELOW_STREAMED: i64 = i64::MIN;

/// Where the source's log had a change, as one number that orders the changes of one row;
/// `fields` are the JSON texts of [`SOURCE_FIELDS`]. The connectors whose positions are known
/// to order them:
/// - PostgreSQL: a streamed change is at its LSN. Changes of one row are serialized by the
///   row's lock, so their LSNs rise in commit order (changes of different rows may
///   interleave, which does not matter to a per-row guard).
/// - MySQL and MariaDB: at its binlog event (see `binlog_position`): the binlog holds
///   transactions in commit order, and a transaction's events in statement order.
///
/// A snapshot row is at its snapshot's position minus 2^63, below every streamed change: a
/// transaction in flight when the snapshot began may have changed a row before the
/// snapshot's position and still commit after it, so its change is newer than the snapshot's
/// row. A later snapshot is still newer than an earlier one.
pub fn source_position(fields: &[Option<&str>]) -> Result<i64, String> {
    let [connector, snapshot, lsn, file, pos, row] = fields else {
        return Err("the event's source fields were not read".into());
    };
    let position = match *connector {
        Some(r#""postgresql""#) => lsn
            .and_then(|l| l.parse().ok())
            .filter(|l: &i64| *l >= 0)
            .ok_or_else(|| format!("the event's source.lsn is not an LSN: {lsn:?}"))?,
        Some(r#""mysql""# | r#""mariadb""#) => binlog_position(*file, *pos, *row)?,
        Some(other) => {
            return Err(format!(
                "$source_position knows the positions of the PostgreSQL (source.lsn), MySQL and \
                 MariaDB (source.file, source.pos) connectors, not that of connector {other}: \
                 use newer_by on a version column of the row, or leave it to the Kafka position"
            ))
        }
        None => return Err("the event has no source.connector".into()),
    };
    // `snapshot` is "true", "first", "last", "incremental"… for a snapshot row, and "false"
    // or absent for a streamed change; Debezium 1.0 and older send a JSON boolean.
    let snapshotted = !matches!(*snapshot, None | Some("null" | "false" | r#""false""#));
    Ok(if snapshotted {
        position.wrapping_add(SNAPSHOT_BELOW_STREAMED)
    } else {
        position
    })
}

/// A MySQL or MariaDB row change's position as one number: the binlog file's sequence
/// number (the digits after the last `.` of `mysql-bin.000042`) above, the event's offset in
/// the file plus the row's index in the event (`source.row`) below. One rows event holds
/// several rows, and may change one row several times (`INSERT … ON DUPLICATE KEY UPDATE`
/// or `REPLACE` with a key repeated): the row index orders them. Adding it to the offset
/// keeps every event's rows below the next event's offset, since each row takes at least one
/// byte of its event (its null bitmap). Offsets are under 2^32 (a binlog event's header
/// holds them in 32 bits), so the file takes the 31 bits above them.
fn binlog_position(
    file: Option<&str>,
    pos: Option<&str>,
    row: Option<&str>,
) -> Result<i64, String> {
    let name = file
        .and_then(|f| f.strip_prefix('"')?.strip_suffix('"'))
        .ok_or_else(|| format!("the event's source.file is not a binlog file name: {file:?}"))?;
    let sequence = name
        .rsplit_once('.')
        .and_then(|(_, digits)| digits.parse::<i64>().ok())
        .filter(|n| (0..1 << 31).contains(n))
        .ok_or_else(|| {
            format!("the event's source.file {name:?} does not end in a binlog sequence number")
        })?;
    let offset = pos
        .and_then(|p| p.parse::<i64>().ok())
        .filter(|p| (0..1 << 32).contains(p))
        .ok_or_else(|| format!("the event's source.pos is not a binlog offset: {pos:?}"))?;
    // A snapshot row has no row index: 0.
    let index = match row {
        None | Some("null") => 0,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|r| *r >= 0)
            .ok_or_else(|| format!("the event's source.row is not a row index: {text}"))?,
    };
    let at = offset
        .checked_add(index)
        .filter(|at| *at < 1 << 32)
        .ok_or_else(|| {
            format!(
                "the event's source.pos {offset} + source.row {index} is past a binlog file's end"
            )
        })?;
    Ok(sequence << 32 | at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(kind: &str, name: Option<&str>, parameters: &[(&str, &str)]) -> FieldSchema {
        FieldSchema {
            field: "f".into(),
            kind: kind.into(),
            name: name.map(Into::into),
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fields: Vec::new(),
        }
    }

    fn decoded(encoding: &Encoding, json: &str) -> Decoded {
        decode(encoding, ColumnKind::TEXT, json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    #[test]
    fn logical_types_decode_to_what_the_columns_take() {
        let text = |s: &str| Decoded::Text(s.into());
        let number = |s: &str| Decoded::Number(s.into());
        let cases = [
            (
                field("int32", Some("io.debezium.time.Date"), &[]),
                "7306",
                text("1990-01-02"),
            ),
            (
                field("int32", Some("io.debezium.time.Date"), &[]),
                "-1",
                text("1969-12-31"),
            ),
            (
                field("int64", Some("io.debezium.time.MicroTimestamp"), &[]),
                "1796194348856108",
                text("2026-12-02T06:52:28.856108Z"),
            ),
            (
                field("int64", Some("io.debezium.time.Timestamp"), &[]),
                "-1",
                text("1969-12-31T23:59:59.999Z"),
            ),
            (
                field("int64", Some("io.debezium.time.NanoTimestamp"), &[]),
                "1000000001",
                text("1970-01-01T00:00:01.000000001Z"),
            ),
            (
                field("int64", Some("io.debezium.time.MicroTime"), &[]),
                "45296000001",
                text("12:34:56.000001"),
            ),
            (
                field(
                    "bytes",
                    Some("org.apache.kafka.connect.data.Decimal"),
                    &[("scale", "2")],
                ),
                "\"BOI=\"",
                number("12.50"),
            ),
            (
                field(
                    "bytes",
                    Some("org.apache.kafka.connect.data.Decimal"),
                    &[("scale", "3")],
                ),
                "\"/w==\"",
                number("-0.001"),
            ),
            (
                field(
                    "bytes",
                    Some("org.apache.kafka.connect.data.Decimal"),
                    &[("scale", "0")],
                ),
                "\"AA==\"",
                number("0"),
            ),
            (
                field("struct", Some("io.debezium.data.VariableScaleDecimal"), &[]),
                r#"{"scale":1,"value":"BQ=="}"#,
                number("0.5"),
            ),
            (
                field("string", Some("io.debezium.data.Json"), &[]),
                r#""{\"a\": 1}""#,
                Decoded::Bytes(br#"{"a": 1}"#.to_vec()),
            ),
            (
                field("bytes", None, &[]),
                "\"AP8=\"",
                Decoded::Bytes(vec![0, 255]),
            ),
            (
                field("string", Some("io.debezium.data.Uuid"), &[]),
                "\"7405a342-fe6f\"",
                Decoded::AsIs,
            ),
            (
                field("string", Some("io.debezium.time.ZonedTimestamp"), &[]),
                "\"x\"",
                Decoded::AsIs,
            ),
        ];
        for (schema, json, expected) in cases {
            assert_eq!(
                decoded(&Encoding::of(&schema), json),
                expected,
                "{schema:?} {json}"
            );
        }
    }

    #[test]
    fn decimals_keep_every_digit() {
        let big = BigInt::parse_bytes(b"-123456789012345678901234567890123456789", 10)
            .expect("number")
            .to_signed_bytes_be();
        assert_eq!(
            decimal(&big, 5),
            "-1234567890123456789012345678901234.56789"
        );
        assert_eq!(decimal(&[0x01], 4), "0.0001");
    }

    #[test]
    fn unsupported_and_ambiguous_fields_are_refused_with_the_reason() {
        let interval = Encoding::of(&field("int64", Some("io.debezium.time.MicroDuration"), &[]));
        let error = decode(&interval, ColumnKind::TEXT, "5").expect_err("interval");
        assert!(error.contains("MicroDuration"), "{error}");
        let refused = [
            (
                ColumnKind::TimestampTz,
                "1796194348856108",
                "milli-, micro-",
            ),
            (
                ColumnKind::Numeric {
                    precision: None,
                    scale: 2,
                },
                "\"BOI=\"",
                "base64 bytes or digits",
            ),
            (ColumnKind::Bytea, "\"AP8=\"", "base64 or hex"),
        ];
        for (kind, json, reason) in refused {
            let error = decode(&Encoding::Unknown, kind, json).expect_err(json);
            assert!(
                error.contains(reason) && error.contains("schemas.enable"),
                "{error}"
            );
        }
        let accepted = [
            (
                ColumnKind::Jsonb,
                r#""[1]""#,
                Decoded::Bytes(b"[1]".to_vec()),
            ),
            (ColumnKind::Date, "0", Decoded::Text("1970-01-01".into())),
            (
                ColumnKind::Numeric {
                    precision: None,
                    scale: 2,
                },
                "12.5",
                Decoded::AsIs,
            ),
            (ColumnKind::TEXT, "\"AP8=\"", Decoded::AsIs),
        ];
        for (kind, json, expected) in accepted {
            assert_eq!(
                decode(&Encoding::Unknown, kind, json),
                Ok(expected),
                "{json}"
            );
        }
    }

    #[test]
    fn source_positions_put_snapshots_below_streamed_changes() {
        let pg = Some(r#""postgresql""#);
        let at = |snapshot: Option<&str>, lsn: &str| {
            source_position(&[pg, snapshot, Some(lsn), None, None, None])
        };
        let snapshot_row = at(Some(r#""first""#), "50064998776").expect("position");
        let late_snapshot = at(Some(r#""true""#), "50064999000").expect("position");
        // A transaction in flight at the snapshot: its change is below the snapshot's LSN.
        let in_flight = at(Some(r#""false""#), "50064998000").expect("position");
        let streamed = at(None, "50064998872").expect("position");
        assert!(snapshot_row < late_snapshot && late_snapshot < in_flight);
        assert!(in_flight < streamed);
        assert_eq!(at(Some("null"), "7"), Ok(7));
        // Debezium 1.0 and older: a JSON boolean.
        assert_eq!(at(Some("false"), "7"), Ok(7));
        assert!(at(Some("true"), "7").is_ok_and(|p| p < 0));
        for (fields, reason) in [
            (
                [Some(r#""sqlserver""#), None, None, None, None, None],
                "connector \"sqlserver\"",
            ),
            ([pg, None, Some("-1"), None, None, None], "not an LSN"),
            ([pg, None, None, None, None, None], "not an LSN"),
            (
                [None, None, Some("7"), None, None, None],
                "no source.connector",
            ),
        ] {
            let error = source_position(&fields).expect_err(reason);
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn binlog_positions_order_by_file_then_offset_with_snapshots_below() {
        let at = |connector: &str, snapshot: &str, file: &str, pos: &str| {
            let connector = format!("\"{connector}\"");
            let file = format!("\"{file}\"");
            source_position(&[
                Some(&connector),
                Some(snapshot),
                None,
                Some(&file),
                Some(pos),
                None,
            ])
        };
        let streamed = |file: &str, pos: &str| at("mysql", r#""false""#, file, pos).expect(pos);
        // Within a file by offset, across files by the file's number, whatever its prefix.
        assert!(streamed("mysql-bin.000003", "4015") < streamed("mysql-bin.000003", "4016"));
        assert!(streamed("mysql-bin.000003", "4294967295") < streamed("mysql-bin.000004", "4"));
        assert!(streamed("mysql-bin.999999", "4") < streamed("mysql-bin.1000000", "4"));
        assert_eq!(streamed("binlog.000001", "256"), (1 << 32) + 256);
        let mariadb = at("mariadb", "null", "mariadb-bin.000002", "10").expect("mariadb");
        assert_eq!(mariadb, (2 << 32) + 10);
        // A snapshot's rows are below every streamed change, a later snapshot above an earlier.
        let snapshot = at("mysql", r#""last""#, "mysql-bin.000009", "900").expect("snapshot");
        let earlier_snapshot =
            at("mysql", r#""true""#, "mysql-bin.000008", "900").expect("snapshot");
        assert!(earlier_snapshot < snapshot && snapshot < streamed("mysql-bin.000001", "4"));
        for (file, pos, reason) in [
            ("mysql-bin", "4", "sequence number"),
            ("mysql-bin.x1", "4", "sequence number"),
            ("mysql-bin.2147483648", "4", "sequence number"),
            ("mysql-bin.000001", "4294967296", "binlog offset"),
            ("mysql-bin.000001", "-1", "binlog offset"),
        ] {
            let error = at("mysql", r#""false""#, file, pos).expect_err(reason);
            assert!(error.contains(reason), "{file} {pos}: {error}");
        }
        let no_file = source_position(&[Some(r#""mysql""#), None, None, None, Some("4"), None]);
        assert!(no_file.is_err_and(|e| e.contains("source.file")));
    }

    #[test]
    fn the_placeholder_is_known_in_its_text_and_its_bytes_form() {
        let default = Placeholder::default();
        let text = r#""__debezium_unavailable_value""#;
        let bytes = r#""X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ==""#;
        for encoding in [Encoding::Plain, Encoding::JsonText, Encoding::Unknown] {
            assert!(default.is(&encoding, text), "{encoding:?}");
            assert!(!default.is(&encoding, bytes), "{encoding:?}");
        }
        assert!(default.is(&Encoding::Bytes, bytes));
        assert!(!default.is(&Encoding::Bytes, text));
        assert!(!default.is(&Encoding::Plain, r#""__debezium_unavailable_valu""#));
        // `hex:` spells the bytes; the text form is the bytes read as UTF-8.
        let custom = Placeholder::new("hex:e298830a").expect("hex");
        assert!(custom.is(&Encoding::Plain, "\"☃\\n\""));
        assert!(custom.is(&Encoding::Bytes, r#""4piDCg==""#));
    }

    #[test]
    fn bytes_sent_as_text_are_decoded_as_the_pipeline_says_the_connector_sends_them() {
        let schema = r#"{"type":"struct","fields":[{"type":"string","field":"b"},{"type":"string","field":"s"}]}"#;
        let encodings = |mode| {
            let cache = SchemaCache::new(vec![Some("b".into()), Some("s".into())])
                .with_binary(vec![true, false], mode);
            cache.encodings(schema, RowIn::Fields).expect("schema")
        };
        let bytes = |mode, json: &str| decode(&encodings(mode)[0], ColumnKind::Bytea, json);
        let expected = Ok(Decoded::Bytes(vec![0xfb, 0xff, 0x00]));
        assert_eq!(bytes(BinaryMode::Base64, r#""+/8A""#), expected);
        assert_eq!(bytes(BinaryMode::Base64UrlSafe, r#""-_8A""#), expected);
        assert_eq!(bytes(BinaryMode::Hex, r#""fbff00""#), expected);
        assert_eq!(bytes(BinaryMode::Hex, r#""FBFF00""#), expected);
        assert!(bytes(BinaryMode::Hex, r#""fbf""#).is_err_and(|e| e.contains("hex")));
        assert!(bytes(BinaryMode::Base64UrlSafe, r#""+/8A""#).is_err());
        // Told nothing, a string for a binary column is refused, saying what to set.
        let unknown = bytes(BinaryMode::Bytes, r#""+/8A""#).expect_err("refused");
        assert!(unknown.contains("sink.binary_handling_mode"), "{unknown}");
        // A text column's string stays text.
        assert_eq!(encodings(BinaryMode::Hex)[1], Encoding::Plain);
        // The placeholder, in the mode's form or as its text.
        let placeholder = Placeholder::default();
        let text = r#""__debezium_unavailable_value""#;
        for mode in [
            BinaryMode::Base64,
            BinaryMode::Base64UrlSafe,
            BinaryMode::Hex,
        ] {
            let encoding = &encodings(mode)[0];
            let encoded = format!("\"{}\"", mode.encode(DEFAULT_PLACEHOLDER.as_bytes()));
            assert!(placeholder.is(encoding, &encoded), "{mode:?} {encoded}");
            assert!(placeholder.is(encoding, text), "{mode:?}");
            assert!(!placeholder.is(encoding, r#""fbff00""#), "{mode:?}");
        }
        assert!(placeholder.is(
            &Encoding::BinaryText(BinaryMode::Hex),
            &format!(
                "\"{}\"",
                BinaryMode::Hex
                    .encode(DEFAULT_PLACEHOLDER.as_bytes())
                    .to_uppercase()
            )
        ));
    }

    #[test]
    fn rows_of_one_binlog_event_are_ordered_by_their_index() {
        let at = |pos: &str, row: Option<&str>| {
            source_position(&[
                Some(r#""mariadb""#),
                Some(r#""false""#),
                None,
                Some(r#""mysql-bin.000003""#),
                Some(pos),
                row,
            ])
        };
        let rows: Vec<i64> = ["0", "1", "2"]
            .iter()
            .map(|r| at("4015", Some(r)).expect("row"))
            .collect();
        assert!(rows[0] < rows[1] && rows[1] < rows[2], "{rows:?}");
        // Every row of an event is below the next event (a row takes a byte at least).
        assert!(rows[2] < at("4018", Some("0")).expect("next event"));
        assert_eq!(at("4015", None), at("4015", Some("0")));
        assert!(at("4015", Some("-1")).is_err_and(|e| e.contains("source.row")));
        assert!(at("4294967295", Some("1")).is_err_and(|e| e.contains("past")));
    }

    #[test]
    fn schemas_are_parsed_once_per_text_and_row() {
        let cache = SchemaCache::new(vec![Some("id".into()), None, Some("born".into())]);
        let value = r#"{"type":"struct","fields":[
            {"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"}],"field":"before"},
            {"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"},
              {"type":"int32","optional":true,"name":"io.debezium.time.Date","field":"born"}],"field":"after"},
            {"type":"string","field":"op"}]}"#;
        let first = cache.encodings(value, RowIn::After).expect("parses");
        assert_eq!(*first, [Encoding::Plain, Encoding::Plain, Encoding::Days]);
        let again = cache.encodings(value, RowIn::After).expect("parses");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second record's schema is not parsed again"
        );
        let error = cache.encodings(value, RowIn::Fields).map(|_| ());
        assert_eq!(
            error,
            Ok(()),
            "as a key schema, its own fields are the row's"
        );
        assert!(cache
            .encodings(r#"{"type":"struct","fields":[]}"#, RowIn::After)
            .is_err_and(|e| e.contains("no `after` field")));
    }
}
