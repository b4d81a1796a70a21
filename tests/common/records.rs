//! The standard test record, and the checks on what landed.

use idemsink::testkit::{self, Outgoing};

/// The numbers a log's `batch committed` lines give for `field` (e.g. `written`).
pub fn logged_counts(log: &str, field: &str) -> Vec<u64> {
    log.split(&format!("{field}="))
        .skip(1)
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The standard test record: `{"id": id, "body": "record <id>"}`, keyed by the id.
pub fn record(id: i64, partition: i32) -> Outgoing {
    testkit::standard_record(id, partition)
}

/// Asserts that the table holds exactly the produced records, each once, at the coordinates
/// it was produced to.
pub fn assert_exactly_once(rows: &[(i64, i32, i64)], produced: &[(i64, (i32, i64))]) {
    let mut expected: Vec<(i64, i32, i64)> =
        produced.iter().map(|(id, (p, o))| (*id, *p, *o)).collect();
    expected.sort_by_key(|(_, p, o)| (*p, *o));
    let mut seen = std::collections::HashMap::new();
    for (id, p, o) in rows {
        *seen.entry(*id).or_insert(0) += 1;
        assert!(seen[id] == 1, "id {id} landed twice (again at {p}/{o})");
    }
    let missing: Vec<i64> = expected
        .iter()
        .filter(|(id, _, _)| !seen.contains_key(id))
        .map(|(id, _, _)| *id)
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} records missing, e.g. ids {missing:?}",
        expected.len().saturating_sub(rows.len())
    );
    assert_eq!(rows.len(), expected.len(), "row count");
    assert_eq!(
        rows,
        expected.as_slice(),
        "rows at the coordinates they were produced to"
    );
}
