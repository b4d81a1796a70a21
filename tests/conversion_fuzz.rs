//! Property tests of the record → row conversion with arbitrary input: arbitrary JSON
//! documents and arbitrary bytes, as value and as key, through a mapping that uses every
//! column type and every source. The conversion never panics, and a row it produces fits its
//! columns: what it accepts, the database accepts.

use idemsink::cells::Cells;
use idemsink::config::RecordFormat;
use idemsink::json_pointers::Pointers;
use idemsink::mapping::{
    ColumnKind, ColumnPlan, Converted, RecordRef, Role, RowMapper, RowOp, Source,
};
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::Value;

fn kinds() -> Vec<ColumnKind> {
    vec![
        ColumnKind::SMALLINT,
        ColumnKind::INT,
        ColumnKind::BIGINT,
        ColumnKind::Integer { min: 0, max: 255 },
        ColumnKind::Real,
        ColumnKind::Double,
        ColumnKind::Numeric {
            precision: Some(6),
            scale: 2,
        },
        ColumnKind::Numeric {
            precision: None,
            scale: 0,
        },
        ColumnKind::Bool,
        ColumnKind::BoolAsInt,
        ColumnKind::TEXT,
        ColumnKind::Text {
            max_chars: Some(5),
            max_bytes: None,
        },
        ColumnKind::Text {
            max_chars: None,
            max_bytes: Some(8),
        },
        ColumnKind::Json,
        ColumnKind::Jsonb,
        ColumnKind::Timestamp,
        ColumnKind::TimestampTz,
        ColumnKind::DateTime {
            min_micros: 0,
            max_micros: 253_402_300_799_999_999,
        },
        ColumnKind::Date,
        ColumnKind::Uuid,
        ColumnKind::Bytea,
        ColumnKind::Binary { max_bytes: Some(4) },
    ]
}

const SOURCES: &[&str] = &[
    "/a",
    "/b",
    "/a/0",
    "/a/b",
    "/~0x/~1y",
    "$value",
    "$key",
    "$key/id",
    "$topic",
    "$partition",
    "$offset",
    "$timestamp",
];

/// One mapper per column — every kind with every source, nullable or not — so that each
/// column's conversion is exercised on its own rather than stopping at the first misfit.
fn mappers(delete_on_null: bool) -> &'static [RowMapper] {
    static MAPPERS: [OnceLock<Vec<RowMapper>>; 2] = [OnceLock::new(), OnceLock::new()];
    MAPPERS[usize::from(delete_on_null)].get_or_init(|| {
        let mut all = Vec::new();
        for (k, kind) in kinds().into_iter().enumerate() {
            for (s, source) in SOURCES.iter().enumerate() {
                for nullable in [true, false] {
                    let column = ColumnPlan {
                        name: format!("c{k}_{s}_{nullable}"),
                        kind,
                        nullable,
                        source: Source::parse(source).expect("source"),
                        role: Role::Plain,
                    };
                    all.push(RowMapper::new(
                        vec![column],
                        delete_on_null,
                        RecordFormat::Json,
                    ));
                }
            }
        }
        all
    })
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[0-9]{1,30}(\\.[0-9]{1,20})?"
            .prop_map(|n| serde_json::from_str(&n).unwrap_or(Value::Null)),
        ".{0,12}".prop_map(Value::String),
        Just(Value::String("2026-11-23T10:00:00Z".into())),
        Just(Value::String("0a0b0c0d-0000-4000-8000-000000000000".into())),
        Just(Value::String("\\x00ff".into())),
        // A number as text, in the whitespace a producer may leave around it.
        Just(Value::String(" 12.5\t\r\n".into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![Just("a"), Just("b"), Just("id"), Just("~x"), Just("/y")]
                    .prop_map(str::to_string),
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value or key: JSON text, arbitrary bytes, or nothing (a tombstone / no key).
fn payload() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        3 => json().prop_map(|v| Some(v.to_string().into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Some),
        1 => Just(None),
    ]
}

/// What the database would refuse in a cell the conversion accepted.
fn misfit(kind: ColumnKind, cell: &str) -> Option<String> {
    let wrong = |why: &str| Some(format!("{kind:?}: {cell:?} {why}"));
    // The COPY writer sends such cells without looking for what to escape.
    if kind.writes_plain_text() && cell.contains(['\t', '\n', '\r', '\\']) {
        return wrong("holds a byte COPY escapes, though its kind writes plain text");
    }
    match kind {
        ColumnKind::Integer { min, max } => match cell.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => None,
            _ => wrong("is not an integer in range"),
        },
        ColumnKind::Bool => (cell != "true" && cell != "false").then(|| "not a boolean".into()),
        ColumnKind::BoolAsInt => (cell != "1" && cell != "0").then(|| "not 1/0".into()),
        ColumnKind::Text {
            max_chars,
            max_bytes,
        } => {
            if max_chars.is_some_and(|m| cell.chars().count() > m)
                || max_bytes.is_some_and(|m| cell.len() > m)
            {
                wrong("is too long")
            } else if cell.contains('\0') {
                wrong("holds a NUL byte")
            } else {
                None
            }
        }
        ColumnKind::Json | ColumnKind::Jsonb => serde_json::from_str::<Value>(cell)
            .err()
            .and_then(|_| wrong("is not JSON")),
        ColumnKind::Uuid => uuid::Uuid::parse_str(cell)
            .err()
            .and_then(|_| wrong("is not a UUID")),
        ColumnKind::Real | ColumnKind::Double => cell
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map_or_else(|| wrong("is not a finite number"), |_| None),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn conversion_never_panics_and_what_it_accepts_fits_the_columns(
        value in payload(),
        key in payload(),
        offset in 0i64..i64::MAX,
        timestamp in proptest::option::of(any::<i64>()),
        delete_on_null in any::<bool>(),
    ) {
        let record = RecordRef {
            topic: "t",
            partition: 3,
            offset,
            timestamp_ms: timestamp,
            key: key.as_deref(),
            value: value.as_deref(),
        };
        for mapper in mappers(delete_on_null) {
            let column = &mapper.columns()[0];
            let mut cells = Cells::new(1);
            match mapper.convert(&record, &mut cells) {
                Ok(Converted::Nothing(reason)) => prop_assert!(false, "JSON records always make a row, not {}", reason),
                Ok(Converted::Row(op)) => {
                    prop_assert_eq!(cells.rows(), 1);
                    match cells.get(0, 0) {
                        Some(text) => {
                            if let Some(problem) = misfit(column.kind, text) {
                                prop_assert!(false, "column {}: {}", column.name, problem);
                            }
                        }
                        None => prop_assert!(
                            column.nullable || op == RowOp::Delete,
                            "column {} is NOT NULL but got no value", column.name
                        ),
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(text.contains(&e.column), "the error names the column: {}", text);
                    prop_assert_eq!(cells.rows(), 0, "a refused record leaves no row");
                    prop_assert_eq!(cells.text_bytes(), 0, "a refused record leaves no text");
                }
            }
        }
    }
}

/// An object written as text, keys possibly repeated and possibly escaped (`\u0061` for
/// `a`), around values of any shape, compact or spaced.
fn object_text() -> impl Strategy<Value = String> {
    let member = (
        prop_oneof![Just("a"), Just("b"), Just("id"), Just("~x"), Just("/y")],
        any::<bool>(),
        json(),
    );
    (prop::collection::vec(member, 0..6), any::<bool>()).prop_map(|(members, spaced)| {
        let sep = if spaced { " ,\n " } else { "," };
        let members: Vec<String> = members
            .into_iter()
            .map(|(key, escape, value)| {
                let key = match (escape, key.chars().next()) {
                    (true, Some(first)) => format!("\"\\u{:04x}{}\"", first as u32, &key[1..]),
                    _ => serde_json::to_string(key).expect("key"),
                };
                let value = if spaced {
                    serde_json::to_string_pretty(&value)
                } else {
                    serde_json::to_string(&value)
                };
                format!("{key}:{}", value.expect("value"))
            })
            .collect();
        format!("{{{}}}", members.join(sep))
    })
}

const POINTERS: &[&str] = &[
    "", "/a", "/b", "/a/0", "/a/1", "/a/b", "/a/b/0", "/id", "/~0x", "/~0x/~1y", "/~1y", "/0",
    "/a/01", "/a/-", "/b/a/id",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The one-pass search finds what `serde_json::Value::pointer` finds in the parsed
    /// document, repeated keys and escapes included, and refuses what serde_json refuses.
    #[test]
    fn pointers_find_what_the_parsed_document_holds(text in object_text(), junk in any::<bool>()) {
        let text = if junk { format!("{text}]") } else { text };
        let pointers = Pointers::new(POINTERS.iter().copied());
        let mut found = vec![None; pointers.len()];
        let searched = pointers.find(&text, &mut found);
        match serde_json::from_str::<Value>(&text) {
            Err(_) => prop_assert!(searched.is_err(), "accepted what is not JSON: {}", text),
            Ok(doc) => {
                prop_assert!(searched.is_ok(), "{:?} refused {}", searched, text);
                for (pointer, got) in POINTERS.iter().zip(&found) {
                    let got: Option<Value> = got.map(|t| serde_json::from_str(t).expect("a value"));
                    prop_assert_eq!(got.as_ref(), doc.pointer(pointer), "{} in {}", pointer, text);
                }
            }
        }
    }
}
