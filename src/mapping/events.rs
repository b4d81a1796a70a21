//! Debezium's change events as a [`RowMapper`] reads them: the envelope's `op`, its row image
//! and source, and the record key — with or without JsonConverter's schema, whose encodings
//! come from the schema cache — and the flattened form of ExtractNewRecordState.

use std::sync::Arc;

use super::{ConvertError, Part, ReadJson, RecordRef, RowMapper, RowOp};
use crate::config::{OnTruncate, RecordFormat};
use crate::debezium::{Encodings, RowIn};
use smallvec::smallvec;

/// In Debezium format, the value's first pointers find the operation (`op`, or a flattened
/// event's `__op`), without and with the schema wrapper, then the schema; a flattened event's
/// next ones find `__deleted` the same way, then the schema's type. The key's tell a key
/// wrapped with its schema, and find that schema.
const DEBEZIUM_OP: (usize, usize) = (0, 1);
const VALUE_SCHEMA: usize = 2;
const FLATTENED_DELETED: (usize, usize) = (3, 4);
const FLATTENED_SCHEMA_TYPE: usize = 5;
const KEY_SCHEMA_TYPE: usize = 0;
const KEY_SCHEMA: usize = 1;

impl RowMapper {
    /// A Debezium change event's operation, with its value and key read (`None` for the
    /// tombstone after a delete). Reads and snapshot reads write the row image `after`; a
    /// delete deletes by the key; a truncate, which has no key, is refused unless
    /// `sink.truncate` says otherwise; anything else is a bad record. A flattened
    /// event (ExtractNewRecordState) is the row itself, deleted by a tombstone, by
    /// `__deleted: "true"` (its `rewrite` delete handling) or by `__op: "d"`.
    pub(super) fn read_change<'r>(
        &self,
        record: &RecordRef<'r>,
    ) -> Result<Option<Change<'r>>, ConvertError> {
        let flattened = self.format == RecordFormat::DebeziumFlattened;
        let error = ConvertError::of_record;
        if record.value.is_none() && !flattened {
            return Ok(None);
        }
        let no_key = || {
            error(
                "the record has no key: Debezium sends one for a table with a primary key \
                 (or message.key.columns), and the key columns are read from it"
                    .into(),
            )
        };
        if record.value.is_none() {
            // A flattened delete: the tombstone is the delete.
            let key = self.read_change_key(record.key.ok_or_else(no_key)?)?;
            return Ok(Some((RowOp::Delete, ReadJson::default(), key)));
        }
        let row = if flattened {
            RowIn::Fields
        } else {
            RowIn::After
        };
        let (mut value, value_schema) = self.read_payload(Part::Value, record.value, row)?;
        let op = if flattened {
            value.wrapped =
                value_schema.is_none() && value.found[FLATTENED_SCHEMA_TYPE] == Some("\"struct\"");
            let pick = |(bare, wrapped): (usize, usize)| {
                value.found[if value.wrapped { wrapped } else { bare }]
            };
            let deleted = matches!(pick(FLATTENED_DELETED), Some("true" | r#""true""#));
            flattened_op(pick(DEBEZIUM_OP), deleted).map_err(error)?
        } else {
            // JsonConverter with schemas wraps the event: its fields are under /payload
            // (unless the payload alone was read).
            let (op, wrapped) = match (value.found[DEBEZIUM_OP.0], value.found[DEBEZIUM_OP.1]) {
                (Some(op), _) => (op, false),
                (None, Some(op)) => (op, true),
                (None, None) => {
                    return Err(error(
                        "the record value is not a Debezium change event: it has no `op` field"
                            .into(),
                    ))
                }
            };
            value.wrapped = wrapped;
            envelope_op(op).map_err(error)?
        };
        value.encodings = self.encodings(&value, value_schema, VALUE_SCHEMA, row)?;
        if op == RowOp::Truncate {
            // A truncate has no key; it is refused before anything else is read.
            if self.truncate == OnTruncate::Refuse {
                return Err(error(TRUNCATE.into()));
            }
            return Ok(Some((op, value, ReadJson::default())));
        }
        let key = self.read_change_key(record.key.ok_or_else(no_key)?)?;
        Ok(Some((op, value, key)))
    }

    /// A Debezium event's record key, read as JSON with or without its schema.
    fn read_change_key<'r>(&self, bytes: &'r [u8]) -> Result<ReadJson<'r>, ConvertError> {
        let (mut key, key_schema) = self.read_payload(Part::Key, Some(bytes), RowIn::Fields)?;
        key.wrapped = key_schema.is_none() && key.found[KEY_SCHEMA_TYPE] == Some("\"struct\"");
        key.encodings = self.encodings(&key, key_schema, KEY_SCHEMA, RowIn::Fields)?;
        Ok(key)
    }

    /// How the fields of a Debezium key or value `read` encode their values: the schema
    /// already known when only the payload was read, else that of the schema at pointer
    /// `schema_at` when the record is wrapped with one; unknown without a schema.
    fn encodings(
        &self,
        read: &ReadJson<'_>,
        known: Option<Arc<Encodings>>,
        schema_at: usize,
        row: RowIn,
    ) -> Result<Option<Arc<Encodings>>, ConvertError> {
        if known.is_some() || !read.wrapped {
            return Ok(known);
        }
        let schema = read.found[schema_at].ok_or_else(|| {
            ConvertError::of_record("the record is wrapped without its schema".into())
        })?;
        let encodings = self.schemas.encodings(schema, row);
        encodings.map(Some).map_err(ConvertError::of_record)
    }

    /// A Debezium key or value read as JSON. JsonConverter writes `{"schema":S,"payload":P}`
    /// with the same S in every record of a table: where S is one already parsed, only P is
    /// read — by the pointers without the `/payload` prefix — and S's encodings come back, so
    /// a record costs its payload rather than its schema, which is most of it. Anything else
    /// is read whole.
    fn read_payload<'r>(
        &self,
        part: Part,
        bytes: Option<&'r [u8]>,
        row: RowIn,
    ) -> Result<(ReadJson<'r>, Option<Arc<Encodings>>), ConvertError> {
        let known = bytes.and_then(|bytes| {
            let after_key = bytes.strip_prefix(br#"{"schema":"#)?;
            let (schema_len, encodings) = self.schemas.known_prefix(after_key, row)?;
            // The schema's bytes are those of a valid schema: only the rest needs checking.
            let payload = std::str::from_utf8(&after_key[schema_len..])
                .ok()?
                .strip_prefix(r#","payload":"#)?
                .trim_end()
                .strip_suffix('}')?;
            let mut found = smallvec![None; self.pointers(part).len()];
            // A payload that is not one JSON value (say, a key repeated after it) is left
            // to the whole read, which reports it.
            self.pointers(part).find(payload, &mut found).ok()?;
            // Not kept: a column of the whole record reads it again (which checks it).
            let read = ReadJson {
                text: None,
                found,
                wrapped: false,
                encodings: None,
            };
            Some((read, encodings))
        });
        match known {
            Some((read, encodings)) => Ok((read, Some(encodings))),
            None => Ok((self.read_all(part, bytes)?, None)),
        }
    }
}

/// What a Debezium envelope's `op` (its JSON text) does to the row.
fn envelope_op(op: &str) -> Result<RowOp, String> {
    match op {
        r#""c""# | r#""r""# | r#""u""# => Ok(RowOp::Write),
        r#""d""# => Ok(RowOp::Delete),
        r#""t""# => Ok(RowOp::Truncate),
        other => Err(format!(
            "a Debezium event with op {other}: only c (create), r (read, snapshot), u (update) \
             and d (delete) change a row"
        )),
    }
}

/// What a flattened event does: a delete where ExtractNewRecordState marked it so
/// (`__deleted`, or `__op` when `add.fields` has it); a write otherwise.
fn flattened_op(op: Option<&str>, deleted: bool) -> Result<RowOp, String> {
    match op {
        _ if deleted => Ok(RowOp::Delete),
        Some(r#""d""#) => Ok(RowOp::Delete),
        Some(r#""t""#) => Err(FLATTENED_TRUNCATE.into()),
        _ => Ok(RowOp::Write),
    }
}

const TRUNCATE: &str = "a truncate event (op t): sink.truncate is refuse (the default); \
     apply empties the table of what is older, ignore goes on without";

const FLATTENED_TRUNCATE: &str = "a truncate event (op t), which format debezium_flattened \
     does not apply: read the unflattened events with format debezium and sink.truncate";

/// A Debezium change event read: what it does, its value and its key.
pub(super) type Change<'r> = (RowOp, ReadJson<'r>, ReadJson<'r>);
