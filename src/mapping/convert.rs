//! A value's conversion to its column's type: the text the database parses for that type,
//! checked against the column's limits (length, range, precision, NUL bytes in JSON), from
//! the record's JSON, from a Debezium logical type, or from Kafka's own fields.

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use memchr::memmem;
use serde::de::IgnoredAny;
use serde_json::Value;

use super::kinds::{ColumnKind, MYSQL_DATETIME, NAIVE_TIMESTAMP};
use crate::debezium::{self, Decoded, Encoding};

/// A value from a record before conversion to the column type.
pub(super) enum Field<'a> {
    Missing,
    /// A value in the record's JSON, as its JSON text (never `null`).
    Json(&'a str),
    /// A Kafka coordinate or timestamp: converted without building a JSON value.
    Int(i64),
    /// The topic's name: the same.
    Str(&'a str),
    /// Raw bytes of the key or value, with their text when it is known to be JSON.
    Bytes(&'a [u8], Option<&'a str>),
}

/// A JSON value found in a record, read from its text (valid JSON, not `null`) only as far
/// as its kind: strings are unescaped only when they hold an escape, numbers keep their text
/// (every digit of a decimal survives), and objects and arrays are parsed only by the
/// conversions that need their contents.
pub(super) enum JsonRef<'a> {
    Bool(bool),
    Number(&'a str),
    String(Cow<'a, str>),
    Composite(&'a str),
}

impl<'a> JsonRef<'a> {
    pub(super) fn read(text: &'a str) -> Result<JsonRef<'a>, String> {
        Ok(match text.as_bytes().first() {
            Some(b't') => JsonRef::Bool(true),
            Some(b'f') => JsonRef::Bool(false),
            Some(b'"') => match text.get(1..text.len() - 1) {
                Some(inner) if !inner.contains('\\') => JsonRef::String(Cow::Borrowed(inner)),
                _ => JsonRef::String(Cow::Owned(
                    serde_json::from_str(text).map_err(|e| format!("not a JSON string: {e}"))?,
                )),
            },
            Some(b'{' | b'[') => JsonRef::Composite(text),
            _ => JsonRef::Number(text),
        })
    }

    /// The parsed document of an object or array.
    fn parse(text: &str) -> Result<Value, String> {
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
    }

    /// The value as `serde_json::Value::to_string` writes it: compact, keys in its order.
    fn to_json(&self) -> Result<String, String> {
        Ok(match self {
            JsonRef::Bool(b) => b.to_string(),
            JsonRef::Number(n) => n.to_string(),
            JsonRef::String(s) => Value::String(s.to_string()).to_string(),
            JsonRef::Composite(text) => JsonRef::parse(text)?.to_string(),
        })
    }

    fn describe(&self) -> String {
        let kind = match self {
            JsonRef::Bool(_) => "a boolean",
            JsonRef::Number(_) => "a number",
            JsonRef::String(_) => "a string",
            JsonRef::Composite(text) if text.starts_with('[') => "an array",
            JsonRef::Composite(_) => "an object",
        };
        let mut text = self.to_json().unwrap_or_default();
        if text.len() > 60 {
            let cut = (0..=60)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            text.truncate(cut);
            text.push('…');
        }
        format!("{kind} ({text})")
    }
}

/// Writes a Debezium field converted for a column of `kind` to `out`, decoded first as its
/// `encoding` says.
pub(super) fn convert_decoded(
    kind: ColumnKind,
    encoding: &Encoding,
    json: &str,
    out: &mut String,
) -> Result<bool, String> {
    let field = match debezium::decode(encoding, kind, json)? {
        Decoded::AsIs => return convert_field(kind, Field::Json(json), out),
        Decoded::Text(text) => return convert_field(kind, Field::Str(&text), out),
        Decoded::Number(number) => return convert_field(kind, Field::Json(&number), out),
        Decoded::Bytes(bytes) => bytes,
    };
    convert_field(kind, Field::Bytes(&field, None), out)
}

/// Writes `field` converted for a column of `kind` to `out`; false when it has no value.
pub(super) fn convert_field(
    kind: ColumnKind,
    field: Field<'_>,
    out: &mut String,
) -> Result<bool, String> {
    match field {
        Field::Missing => return Ok(false),
        Field::Json(text) => convert_json(kind, &JsonRef::read(text)?, out)?,
        Field::Bytes(b, text) => convert_bytes(kind, b, text, out)?,
        // The usual targets of coordinates, the same as through JSON but without its values.
        Field::Int(i) => match kind {
            ColumnKind::Integer { min, max } => in_range(i, min, max, out)?,
            _ => convert_json(kind, &JsonRef::Number(&i.to_string()), out)?,
        },
        Field::Str(s) => match kind {
            ColumnKind::Text {
                max_chars,
                max_bytes,
            } => text(s, max_chars, max_bytes, out)?,
            _ => convert_json(kind, &JsonRef::String(Cow::Borrowed(s)), out)?,
        },
    }
    Ok(true)
}

/// Raw key or value bytes: JSON columns take them verbatim (once checked), bytea as bytes,
/// everything else reads them as a UTF-8 string. `json` is their text when the mapper has
/// read them as JSON for pointer columns: that proves them JSON without parsing again.
pub(super) fn convert_bytes(
    kind: ColumnKind,
    bytes: &[u8],
    json: Option<&str>,
    out: &mut String,
) -> Result<(), String> {
    match kind {
        ColumnKind::Bytea => {
            out.push_str("\\x");
            push_hex(bytes, out);
        }
        ColumnKind::Binary { max_bytes } => {
            fits_bytes(bytes.len(), max_bytes)?;
            push_hex(bytes, out);
        }
        ColumnKind::Json | ColumnKind::Jsonb => {
            let text = match json {
                Some(text) => text,
                None => {
                    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
                    serde_json::from_str::<IgnoredAny>(text)
                        .map_err(|e| format!("not JSON: {e}"))?;
                    text
                }
            };
            // JSON text holds a NUL only as an escape; look at the values only if one may be there.
            if kind == ColumnKind::Jsonb && may_hold_nul_escape(bytes) {
                reject_nul_in_json(&JsonRef::parse(text)?)?;
            }
            out.push_str(text);
        }
        _ => {
            let s = match json {
                Some(text) => text,
                None => std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?,
            };
            match kind {
                ColumnKind::Text {
                    max_chars,
                    max_bytes,
                } => text(s, max_chars, max_bytes, out)?,
                _ => convert_json(kind, &JsonRef::String(Cow::Borrowed(s)), out)?,
            }
        }
    }
    Ok(())
}

/// Writes JSON value `v` into `out` as the column of `kind` takes it, or says why it cannot.
///
/// Longer than most functions here, for a reason: it is one match over every column kind,
/// each arm a line or two, and splitting it would scatter what a reader compares side by side.
pub(super) fn convert_json(
    kind: ColumnKind,
    v: &JsonRef<'_>,
    out: &mut String,
) -> Result<(), String> {
    use ColumnKind::*;
    match kind {
        Integer { min, max } => integer(v, min, max, out),
        Real => float(v, f32::MAX as f64, "real", out),
        Double => float(v, f64::MAX, "double precision", out),
        Numeric { precision, scale } => numeric(v, precision, scale, out),
        Bool | BoolAsInt => {
            let b = match v {
                JsonRef::Bool(b) => *b,
                JsonRef::String(s) if s == "true" || s == "false" => s == "true",
                other => return Err(format!("expected a boolean, got {}", other.describe())),
            };
            out.push_str(match (kind, b) {
                (BoolAsInt, true) => "1",
                (BoolAsInt, false) => "0",
                (_, true) => "true",
                (_, false) => "false",
            });
            Ok(())
        }
        Text {
            max_chars,
            max_bytes,
        } => match v {
            JsonRef::String(s) => text(s, max_chars, max_bytes, out),
            other => text(&other.to_json()?, max_chars, max_bytes, out),
        },
        Json => {
            out.push_str(&v.to_json()?);
            Ok(())
        }
        Jsonb => {
            let text = match v {
                JsonRef::Composite(text) => {
                    let doc = JsonRef::parse(text)?;
                    reject_nul_in_json(&doc)?;
                    doc.to_string()
                }
                JsonRef::String(s) if s.contains('\0') => return Err(NUL_IN_JSONB.into()),
                other => other.to_json()?,
            };
            out.push_str(&text);
            Ok(())
        }
        Timestamp | TimestampTz => timestamp(v, kind == TimestampTz, out),
        DateTime {
            min_micros,
            max_micros,
        } => {
            let utc = parse_timestamp(v, false)?;
            let micros = utc.timestamp_micros();
            if !(min_micros..=max_micros).contains(&micros) {
                return Err(format!(
                    "{} is outside the column's range ({} to {})",
                    utc.format(MYSQL_DATETIME),
                    format_micros(min_micros),
                    format_micros(max_micros)
                ));
            }
            write_text(out, utc.format(MYSQL_DATETIME))
        }
        Date => match v {
            JsonRef::String(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|e| format!("`{s}` is not a date (YYYY-MM-DD): {e}"))
                .and_then(|d| write_text(out, d)),
            other => Err(format!("expected a date string, got {}", other.describe())),
        },
        Uuid => match v {
            JsonRef::String(s) => uuid::Uuid::parse_str(s)
                .map_err(|e| format!("`{s}` is not a UUID: {e}"))
                .and_then(|u| write_text(out, u.hyphenated())),
            other => Err(format!("expected a UUID string, got {}", other.describe())),
        },
        Bytea | Binary { .. } => match v {
            JsonRef::String(s) => convert_bytes(kind, s.as_bytes(), None, out),
            other => Err(format!(
                "expected a string for a binary column, got {}",
                other.describe()
            )),
        },
    }
}

/// Writes a value's `Display` text to a cell.
pub(super) fn write_text(out: &mut String, value: impl fmt::Display) -> Result<(), String> {
    use std::fmt::Write;
    write!(out, "{value}").map_err(|e| format!("cannot write the value: {e}"))
}

/// A text cell: no NUL, and within the column's length in characters or bytes.
pub(super) fn text(
    s: &str,
    max_chars: Option<usize>,
    max_bytes: Option<usize>,
    out: &mut String,
) -> Result<(), String> {
    if memchr::memchr(0, s.as_bytes()).is_some() {
        return Err("text cannot hold a NUL character".into());
    }
    if let Some(max) = max_chars {
        let n = s.chars().count();
        if n > max {
            return Err(format!(
                "value is {n} characters long, the column holds at most {max}"
            ));
        }
    }
    fits_bytes(s.len(), max_bytes)?;
    out.push_str(s);
    Ok(())
}

pub(super) fn fits_bytes(len: usize, max_bytes: Option<usize>) -> Result<(), String> {
    match max_bytes {
        Some(max) if len > max => Err(format!(
            "value is {len} bytes long, the column holds at most {max}"
        )),
        _ => Ok(()),
    }
}

pub(super) fn integer(v: &JsonRef<'_>, min: i64, max: i64, out: &mut String) -> Result<(), String> {
    let parsed = match v {
        // As serde_json's arbitrary-precision numbers read them: 3.0 is an integer, 3.5 is
        // not; beyond i64 a float is inexact, so those are refused.
        JsonRef::Number(n) => n.parse::<i64>().ok().or_else(|| {
            n.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        }),
        JsonRef::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match parsed {
        Some(i) => in_range(i, min, max, out),
        None => Err(format!("expected an integer, got {}", v.describe())),
    }
}

pub(super) fn in_range(i: i64, min: i64, max: i64, out: &mut String) -> Result<(), String> {
    if (min..=max).contains(&i) {
        out.push_str(itoa::Buffer::new().format(i));
        Ok(())
    } else {
        Err(format!("{i} is out of the column's range ({min} to {max})"))
    }
}

/// A number's text as the column receives it: a JSON number as written, a string trimmed.
pub(super) fn number_text<'v>(v: &'v JsonRef<'_>, name: &str) -> Result<&'v str, String> {
    match v {
        JsonRef::Number(n) => Ok(n),
        JsonRef::String(s) => Ok(s.trim()),
        other => Err(format!(
            "expected a number for {name}, got {}",
            other.describe()
        )),
    }
}

pub(super) fn float(v: &JsonRef<'_>, max: f64, name: &str, out: &mut String) -> Result<(), String> {
    let text = number_text(v, name)?;
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && f.abs() <= max => {
            out.push_str(text);
            Ok(())
        }
        Ok(f) if f.is_finite() => Err(format!("{text} is out of range for {name}")),
        _ => Err(format!(
            "expected a finite number for {name}, got {}",
            v.describe()
        )),
    }
}

pub(super) fn numeric(
    v: &JsonRef<'_>,
    precision: Option<u32>,
    scale: u32,
    out: &mut String,
) -> Result<(), String> {
    let text = number_text(v, "numeric")?;
    let digits = integer_digits_after_rounding(text, scale).ok_or_else(|| {
        format!(
            "expected a decimal number for numeric, got {}",
            v.describe()
        )
    })?;
    if let Some(p) = precision {
        let allowed = p.saturating_sub(scale);
        if digits > allowed {
            return Err(format!("{text} does not fit numeric({p},{scale}): at most {allowed} digits before the point"));
        }
    }
    out.push_str(text);
    Ok(())
}

/// The count of significant digits before the decimal point of a decimal literal
/// (`-12.5e3`) once rounded half away from zero to `scale` places, as PostgreSQL does.
/// None when the text is not a decimal literal.
pub(super) fn integer_digits_after_rounding(text: &str, scale: u32) -> Option<u32> {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part
        .bytes()
        .chain(frac_part.bytes())
        .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // value = 0.D × 10^point, with D the digits without leading zeros (read in place: this
    // runs for every numeric cell).
    let all = || int_part.bytes().chain(frac_part.bytes());
    let leading_zeros = all().take_while(|b| *b == b'0').count();
    if leading_zeros == int_part.len() + frac_part.len() {
        return Some(0);
    }
    let digits = || all().skip(leading_zeros);
    let point = int_part.len() as i64 - leading_zeros as i64 + exponent;
    // Digits kept after rounding to `scale` places: positions [0, point + scale).
    let kept = point + scale as i64;
    if kept < 0 {
        return Some(0);
    }
    let kept = kept as usize;
    let rounds_up = digits().nth(kept).is_some_and(|d| d >= b'5');
    let carry_out = rounds_up && digits().take(kept).all(|d| d == b'9');
    // Carrying out of the kept digits turns 0.99…×10^point into 0.1×10^(point+1).
    let int_digits = if carry_out { point + 1 } else { point }.max(0);
    Some(u32::try_from(int_digits).unwrap_or(u32::MAX))
}

pub(super) fn timestamp(v: &JsonRef<'_>, with_zone: bool, out: &mut String) -> Result<(), String> {
    let utc = parse_timestamp(v, with_zone)?;
    use chrono::Datelike;
    if utc.year() < -4712 {
        return Err(format!("{utc} is before the earliest PostgreSQL timestamp"));
    }
    if with_zone {
        match v {
            // Most producers write what the column takes already: kept as it came.
            JsonRef::String(s) if is_written_as_rfc3339_utc(s) => out.push_str(s),
            _ => out.push_str(&utc.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        }
        Ok(())
    } else {
        write_text(out, utc.naive_utc().format(NAIVE_TIMESTAMP))
    }
}

/// Whether `s`, a timestamp already read as RFC 3339, is written exactly as
/// `to_rfc3339_opts(SecondsFormat::AutoSi, true)` would write it: in UTC with a `Z`, a `T`
/// between date and time, no leap second, and a fraction of 3, 6 or 9 digits only as long as
/// it needs to be (none for a whole second).
fn is_written_as_rfc3339_utc(s: &str) -> bool {
    let Some((b'Z', body)) = s.as_bytes().split_last() else {
        return false;
    };
    if body.len() < "YYYY-MM-DDTHH:MM:SS".len() {
        return false;
    }
    let (date_time, fraction) = body.split_at(19);
    let whole_seconds = date_time[10] == b'T' && date_time[17..] < b"60"[..];
    let shortest_fraction = match fraction {
        [] => true,
        [b'.', digits @ ..] => matches!(digits.len(), 3 | 6 | 9) && !digits.ends_with(b"000"),
        _ => false,
    };
    whole_seconds && shortest_fraction
}

/// Epoch milliseconds, RFC 3339, or (unless `with_zone` is required) a zoneless
/// `YYYY-MM-DD[T ]HH:MM:SS[.f]` read as UTC.
pub(super) fn parse_timestamp(v: &JsonRef<'_>, with_zone: bool) -> Result<DateTime<Utc>, String> {
    Ok(match v {
        JsonRef::Number(n) => {
            let ms = n
                .parse::<i64>()
                .map_err(|_| format!("expected epoch milliseconds, got {}", v.describe()))?;
            DateTime::from_timestamp_millis(ms)
                .ok_or_else(|| format!("{ms} ms is out of the timestamp range"))?
        }
        JsonRef::String(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => t.with_timezone(&Utc),
            Err(e) if with_zone => return Err(format!("`{s}` is not an RFC 3339 timestamp: {e}")),
            Err(_) => {
                let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                    .or_else(|_| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
                    .map_err(|e| format!("`{s}` is not a timestamp: {e}"))?;
                naive.and_utc()
            }
        },
        other => return Err(format!("expected a timestamp, got {}", other.describe())),
    })
}

pub(super) fn format_micros(micros: i64) -> String {
    DateTime::from_timestamp_micros(micros).map_or_else(
        || micros.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

/// Whether JSON text may hold a `\u0000` escape (a NUL, which jsonb refuses).
pub(super) fn may_hold_nul_escape(bytes: &[u8]) -> bool {
    // Built once: building the searcher costs more than searching a record with it.
    static NUL_ESCAPE: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\\u0000"));
    NUL_ESCAPE.find(bytes).is_some()
}

pub(super) const NUL_IN_JSONB: &str = "jsonb cannot hold a \\u0000 character";

pub(super) fn reject_nul_in_json(v: &Value) -> Result<(), String> {
    let has_nul = match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => return items.iter().try_for_each(reject_nul_in_json),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                true
            } else {
                return map.values().try_for_each(reject_nul_in_json);
            }
        }
        _ => false,
    };
    if has_nul {
        Err(NUL_IN_JSONB.into())
    } else {
        Ok(())
    }
}

/// Bytes as lowercase hex: after `\x` for bytea, alone for a MySQL binary column (which the
/// statement turns back with `UNHEX(?)`).
pub(super) fn push_hex(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}
