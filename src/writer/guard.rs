//! The exactly-once guards, written once for every statement of both databases: an incoming
//! record changes a stored row only if it is newer than it — by the version column
//! (`newer_by`; a stored NULL is older) or, without one, by its Kafka position (a record from
//! the row's own partition at the same or an earlier offset is older; from anywhere else,
//! newer). An upsert's update, a delete and a truncate all apply it. Each dialect says only
//! how it names a column's stored value and the incoming record's ([`Sides`]).

use super::{Position, SinkPlan};

/// How a statement names the two values a guard compares, by column index.
pub struct Sides<'a> {
    /// The row in the table.
    pub stored: &'a dyn Fn(usize) -> String,
    /// The record being written or deleted.
    pub incoming: &'a dyn Fn(usize) -> String,
}

/// The condition under which the incoming record is newer than the stored row: by `version`
/// when there is one, else by the Kafka `position`; `None` when the plan has neither (then
/// every record applies).
pub fn incoming_is_newer(
    version: Option<usize>,
    position: Option<Position>,
    sides: &Sides<'_>,
) -> Option<String> {
    let (stored, incoming) = (sides.stored, sides.incoming);
    match (version, position) {
        (Some(v), _) => Some(format!("{0} IS NULL OR {1} > {0}", stored(v), incoming(v))),
        (None, Some(p)) => {
            let same_partition = p.topic.into_iter().chain([p.partition]);
            let mut stored_is_newer: Vec<String> = same_partition
                .map(|c| format!("{} = {}", stored(c), incoming(c)))
                .collect();
            stored_is_newer.push(format!("{} >= {}", stored(p.offset), incoming(p.offset)));
            // Unknown (a NULL coordinate) counts as older.
            Some(format!(
                "NOT COALESCE({}, FALSE)",
                stored_is_newer.join(" AND ")
            ))
        }
        (None, None) => None,
    }
}

/// The columns an upsert sets, in the order it sets them: every mapped column outside the
/// conflict target, the columns the guard reads last — the offset before the partition and
/// the topic.
///
/// This order is what makes MySQL's guard right: `ON DUPLICATE KEY UPDATE` assigns left to
/// right, each assignment seeing the ones before, and every assignment is guarded by the
/// same condition. With the guard's columns last, every other column is decided on the stored
/// values. Among them, once the offset is assigned, the partition's guard still decides the
/// same: the row is from the same partition (nothing to change) or from another one (the new
/// partition goes in); assigning the partition first would let the offset's guard compare the
/// new partition with the old offset. PostgreSQL decides once per row, whatever the order.
pub fn update_columns(plan: &SinkPlan) -> Vec<usize> {
    let guard_order: Vec<usize> = match (plan.newer_by, plan.position) {
        (Some(v), _) => vec![v],
        (None, Some(p)) => [Some(p.offset), Some(p.partition), p.topic]
            .into_iter()
            .flatten()
            .collect(),
        (None, None) => Vec::new(),
    };
    let mut columns: Vec<usize> = (0..plan.columns.len())
        .filter(|i| !plan.conflict.contains(i) && !guard_order.contains(i))
        .collect();
    columns.extend(
        guard_order
            .into_iter()
            .filter(|i| !plan.conflict.contains(i)),
    );
    columns
}
