//! A batch: converted rows held column by column (the shape the SQL writer binds), with the
//! span of offsets each partition contributed — what the batch's transaction will commit —
//! and, for business keys, which rows the batch's statements must touch ([`Batch::changes`]).
//! With `errors.tolerance: all` it also keeps each record as it came from Kafka, so a row the
//! database rejects can be dead-lettered, and the records that never became rows.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::cells::Cells;
use crate::mapping::{version_key, ColumnKind, RowOp};
use crate::offsets::TopicPartition;

/// The offsets one partition contributed to a batch, read in one epoch of ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub tp: TopicPartition,
    pub epoch: u64,
    /// The first offset the span covers.
    pub first: i64,
    /// The offset the partition resumes from once the batch commits: one past its last record,
    /// or further when the consumer has read past offsets that carry no record (transaction
    /// markers, aborted transactions) — see [`Batch::cover`].
    pub next: i64,
    /// Records in the span (offsets between `first` and `next` may be transaction markers; a
    /// span of markers alone has none).
    pub records: usize,
}

/// A record as it came from Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The headers as JSON (see the dead-letter table's migration), if the record had any.
    pub headers: Option<String>,
}

/// What a cell costs besides its text: where it ends (which also says whether it is NULL).
const CELL_BYTES: usize = std::mem::size_of::<usize>();

impl RawRecord {
    /// The bytes it holds.
    fn bytes(&self) -> usize {
        let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
        len(&self.key) + len(&self.value) + self.headers.as_ref().map_or(0, String::len)
    }
}

/// A record that goes to the dead-letter table instead of the sink table, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub tp: TopicPartition,
    pub offset: i64,
    pub record: RawRecord,
    pub error: String,
}

/// When the consumer loop hands a batch to the writer (`batch.*`): once it holds
/// `max_records` records or `max_bytes` bytes, or its first row is `max_wait` old.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

impl BatchLimits {
    /// Whether `batch` is to be handed over now, whatever its age.
    pub fn is_full(&self, batch: &Batch) -> bool {
        batch.records() >= self.max_records || batch.bytes() >= self.max_bytes
    }
}

#[derive(Debug)]
pub struct Batch {
    /// The rows' cells, column by column.
    pub cells: Cells,
    /// For each row, what it does.
    pub ops: Vec<RowOp>,
    /// For each row, the index of its span.
    row_span: Vec<u32>,
    /// For each row, its record's offset.
    row_offset: Vec<i64>,
    /// For each row, its record as it came, when the batch keeps them (else empty).
    raw: Vec<RawRecord>,
    /// Records that did not become rows, with the index of their span.
    dead_letters: Vec<(u32, DeadLetter)>,
    pub spans: Vec<Span>,
    /// The bytes of the records kept as they came, and of the dead letters (see
    /// [`Batch::bytes`]).
    kept_bytes: usize,
}

impl Batch {
    pub fn new(column_count: usize) -> Batch {
        Batch {
            cells: Cells::new(column_count),
            ops: Vec::new(),
            row_span: Vec::new(),
            row_offset: Vec::new(),
            raw: Vec::new(),
            dead_letters: Vec::new(),
            spans: Vec::new(),
            kept_bytes: 0,
        }
    }

    /// An empty batch with room for as many cells as `last` holds (see [`Cells::with_room_of`]).
    pub fn with_room_of(last: &Batch) -> Batch {
        Batch {
            cells: Cells::with_room_of(&last.cells),
            ..Batch::new(0)
        }
    }

    /// About how many bytes the records taken hold here: their cells, and the records kept
    /// as they came (`batch.max_bytes` bounds it).
    pub fn bytes(&self) -> usize {
        self.cells.text_bytes()
            + self.len() * self.cells.column_count() * CELL_BYTES
            + self.kept_bytes
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.row_span.len()
    }

    /// Records in the batch: its rows and its dead letters.
    pub fn records(&self) -> usize {
        self.row_span.len() + self.dead_letters.len()
    }

    /// Whether the batch holds no record (then it moves no offset either).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The records that did not become rows.
    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetter> {
        self.dead_letters.iter().map(|(_, d)| d)
    }

    /// Where a row's record came from.
    pub fn coordinates(&self, row: usize) -> (&TopicPartition, i64) {
        (
            &self.spans[self.row_span[row] as usize].tp,
            self.row_offset[row],
        )
    }

    /// A row the database rejected, as a dead letter; `None` if the batch did not keep its
    /// record (`errors.tolerance: none`).
    pub fn dead_letter_for_row(&self, row: usize, error: String) -> Option<DeadLetter> {
        let record = self.raw.get(row)?.clone();
        let (tp, offset) = self.coordinates(row);
        Some(DeadLetter {
            tp: tp.clone(),
            offset,
            record,
            error,
        })
    }

    /// Adds the row whose cells were just written to [`Batch::cells`]. `raw` is the record
    /// as it came, kept for a batch that may dead-letter rows: all of its rows have one.
    pub fn push(
        &mut self,
        topic: &str,
        partition: i32,
        epoch: u64,
        offset: i64,
        op: RowOp,
        raw: Option<RawRecord>,
    ) {
        debug_assert_eq!(self.cells.rows(), self.len() + 1, "one new row of cells");
        debug_assert_eq!(
            self.raw.len(),
            if raw.is_some() { self.len() } else { 0 },
            "either every row keeps its record or none does"
        );
        let index = self.span_for(topic, partition, epoch, offset);
        self.row_span.push(index);
        self.row_offset.push(offset);
        self.kept_bytes += raw.as_ref().map_or(0, RawRecord::bytes);
        self.raw.extend(raw);
        self.ops.push(op);
    }

    /// Adds a record that changes no row by design: only its offset is committed.
    pub fn push_nothing(&mut self, topic: &str, partition: i32, epoch: u64, offset: i64) {
        self.span_for(topic, partition, epoch, offset);
    }

    /// Adds a record that did not become a row: it goes to the dead-letter table, and its
    /// offset is committed like a row's.
    pub fn push_dead_letter(&mut self, epoch: u64, dead: DeadLetter) {
        let index = self.span_for(&dead.tp.topic, dead.tp.partition, epoch, dead.offset);
        self.kept_bytes += dead.record.bytes() + dead.error.len();
        self.dead_letters.push((index, dead));
    }

    /// The index of the span `offset` extends (or opens) in this partition and epoch.
    fn span_for(&mut self, topic: &str, partition: i32, epoch: u64, offset: i64) -> u32 {
        let index =
            match self.spans.iter().rposition(|s| {
                s.tp.partition == partition && s.epoch == epoch && s.tp.topic == topic
            }) {
                Some(i) => {
                    self.spans[i].next = offset + 1;
                    self.spans[i].records += 1;
                    i
                }
                None => {
                    let tp = TopicPartition {
                        topic: topic.to_string(),
                        partition,
                    };
                    self.spans.push(Span {
                        tp,
                        epoch,
                        first: offset,
                        next: offset + 1,
                        records: 1,
                    });
                    self.spans.len() - 1
                }
            };
        index as u32
    }

    /// Extends the partition's span in `epoch` to resume from `next`, opening an empty one if
    /// the batch has no record of it: offsets that hold no record for a read_committed
    /// consumer (transaction markers, aborted records) are committed like records, so that a
    /// caught-up partition's stored offset equals its end offset.
    pub fn cover(&mut self, tp: &TopicPartition, epoch: u64, next: i64) {
        match self
            .spans
            .iter_mut()
            .rfind(|s| s.epoch == epoch && &s.tp == tp)
        {
            Some(span) => span.next = span.next.max(next),
            None => self.spans.push(Span {
                tp: tp.clone(),
                epoch,
                first: next,
                next,
                records: 0,
            }),
        }
    }

    /// The same batch with only the spans whose flag in `keep` is set, and their rows.
    pub fn retain_spans(self, keep: &[bool]) -> Batch {
        debug_assert_eq!(keep.len(), self.spans.len());
        if keep.iter().all(|k| *k) {
            return self; // the usual case: nothing to copy
        }
        self.select_spans(keep)
    }

    /// The batch cut into one batch per writer lane: lane `lane_of(partition)` gets that
    /// partition's spans with their rows and dead letters, in batch order (a lane without a
    /// span gets an empty batch). A partition is thus written by one lane only.
    pub fn split(self, lanes: usize, lane_of: impl Fn(&TopicPartition) -> usize) -> Vec<Batch> {
        let lane: Vec<usize> = self.spans.iter().map(|s| lane_of(&s.tp)).collect();
        let mut split: Vec<Batch> = (0..lanes)
            .map(|_| Batch::new(self.cells.column_count()))
            .collect();
        match lane.first() {
            None => {}
            Some(first) if lane.iter().all(|l| l == first) => split[*first] = self,
            Some(_) => {
                for (index, part) in self.parts_by(&lane) {
                    split[index] = part;
                }
            }
        }
        split
    }

    /// Copies of the batch's parts: part `part_of(partition)` holds that partition's spans
    /// with their rows and dead letters, in batch order. Each part that has a span comes once,
    /// in the order of its first span.
    pub fn parts(&self, part_of: impl Fn(&TopicPartition) -> usize) -> Vec<(usize, Batch)> {
        let index: Vec<usize> = self.spans.iter().map(|s| part_of(&s.tp)).collect();
        self.parts_by(&index)
    }

    /// The parts of the batch, given each span's part.
    fn parts_by(&self, part_of_span: &[usize]) -> Vec<(usize, Batch)> {
        let mut seen = Vec::new();
        for index in part_of_span {
            if !seen.contains(index) {
                seen.push(*index);
            }
        }
        seen.into_iter()
            .map(|index| {
                let keep: Vec<bool> = part_of_span.iter().map(|i| *i == index).collect();
                (index, self.select_spans(&keep))
            })
            .collect()
    }

    /// A copy of the spans whose flag in `keep` is set, with their rows and dead letters.
    fn select_spans(&self, keep: &[bool]) -> Batch {
        let mut renumber = Vec::with_capacity(keep.len());
        let mut spans = Vec::new();
        for (span, kept) in self.spans.iter().zip(keep) {
            renumber.push(spans.len() as u32);
            if *kept {
                spans.push(span.clone());
            }
        }
        let row_keep: Vec<bool> = self.row_span.iter().map(|s| keep[*s as usize]).collect();
        let raw = if self.raw.is_empty() {
            Vec::new()
        } else {
            select(&self.raw, &row_keep)
        };
        Batch {
            cells: self.cells.retain(&row_keep),
            kept_bytes: self.kept_bytes,
            ops: select(&self.ops, &row_keep),
            row_offset: select(&self.row_offset, &row_keep),
            raw,
            row_span: self
                .row_span
                .iter()
                .filter(|s| keep[**s as usize])
                .map(|s| renumber[*s as usize])
                .collect(),
            dead_letters: self
                .dead_letters
                .iter()
                .filter(|(s, _)| keep[*s as usize])
                .map(|(s, d)| (renumber[*s as usize], d.clone()))
                .collect(),
            spans,
        }
    }

    /// The truncates the batch's statements run (before its other changes), and which other
    /// rows are still to be written after them. A truncate deletes every row it is newer than
    /// (by the same guard as a delete). When deletes carry the source's position
    /// (`deletes_versioned`), that is every row older than the newest truncate, wherever it
    /// is in the batch. Otherwise the batch's order decides: the last truncate is run, and
    /// only the rows after it are written.
    fn truncates(&self, winner: Winner, skip: &HashSet<usize>) -> (Vec<usize>, Survives<'_>) {
        let truncates: Vec<usize> = (0..self.len())
            .filter(|r| self.ops[*r] == RowOp::Truncate && !skip.contains(r))
            .collect();
        match (winner, truncates.last().copied()) {
            (_, None) => (truncates, Box::new(|_| true)),
            (
                Winner::Newest {
                    column,
                    kind,
                    deletes_versioned: true,
                },
                Some(_),
            ) => {
                let version = move |row: usize| {
                    self.cells
                        .get(column, row)
                        .and_then(|v| version_key(kind, v))
                };
                let newest = truncates.iter().map(|r| version(*r)).max().flatten();
                (truncates, Box::new(move |row| version(row) >= newest))
            }
            (_, Some(last)) => (vec![last], Box::new(move |row| row > last)),
        }
    }

    /// The rows the batch's statements touch so that the result equals applying every record
    /// one by one, in order — a statement may touch a key only once. Per key, the last
    /// tombstone is kept (deletes run first), then one write from the records after it,
    /// chosen by `winner`. Without a key every row is written as it is. Rows in `skip` (the
    /// database refused them) count as if they were not in the batch.
    ///
    /// Two rows have the same key when the database says so: `groups` holds, per row, an id
    /// equal for rows whose keys the database finds equal (a case-insensitive collation,
    /// `1.0 = 1`); without it, when the key's text is equal.
    pub fn changes(
        &self,
        key: &[usize],
        groups: Option<&[usize]>,
        winner: Winner,
        skip: &HashSet<usize>,
    ) -> Changes {
        let taken = |r: &usize| !skip.contains(r);
        let (truncates, survives) = self.truncates(winner, skip);
        let rows = (0..self.len())
            .filter(|r| self.ops[*r] != RowOp::Truncate)
            .filter(|r| survives(*r));
        if key.is_empty() {
            return Changes {
                deletes: Vec::new(),
                writes: rows.filter(taken).collect(),
                truncates,
                patches: Vec::new(),
            };
        }
        #[derive(PartialEq, Eq, Hash)]
        enum KeyOf<'a> {
            Cells(Vec<&'a str>),
            Group(usize),
        }
        let mut by_key: HashMap<KeyOf<'_>, Latest> = HashMap::new();
        // Only a batch with unavailable cells needs each key's earlier writes (see `patches`).
        let keep_history = self.cells.may_be_unavailable() && !matches!(winner, Winner::First);
        let mut unkeyed = Vec::new();
        for row in rows.filter(taken) {
            let cells: Option<Vec<&str>> = key.iter().map(|c| self.cells.get(*c, row)).collect();
            // A NULL in a unique key never conflicts: such a row stands alone.
            let Some(cells) = cells else {
                unkeyed.push(row);
                continue;
            };
            let key_of = match groups {
                Some(groups) => KeyOf::Group(groups[row]),
                None => KeyOf::Cells(cells),
            };
            let version = match winner {
                Winner::Newest { column, kind, .. } => self
                    .cells
                    .get(column, row)
                    .and_then(|v| version_key(kind, v)),
                _ => None,
            };
            let latest = by_key.entry(key_of).or_default();
            latest.offer(row, self.ops[row], version, winner);
            if keep_history && self.ops[row] == RowOp::Write {
                latest.history.push((row, version));
            }
        }
        let mut deletes: Vec<usize> = by_key
            .values()
            .filter_map(|l| l.delete.map(|(row, _)| row))
            .collect();
        let mut writes = Vec::with_capacity(by_key.len() + unkeyed.len());
        let mut patches = Vec::new();
        for latest in by_key.values() {
            let Some((row, version)) = latest.write else {
                continue;
            };
            if !keep_history || !self.cells.has_unavailable(row) {
                writes.push(row);
                continue;
            }
            let mut rounds = self.patch_chain(&latest.history, row, version, winner);
            if !rounds.is_empty() && !self.cells.has_unavailable(rounds[0]) {
                writes.push(rounds.remove(0));
            }
            patches.extend((0..).zip(rounds).map(|(round, row)| Patch { row, round }));
        }
        // A row with an unavailable cell but no key has no row to keep a value of: it is
        // written as it is, the cell NULL.
        writes.extend(unkeyed);
        deletes.sort_unstable();
        writes.sort_unstable();
        patches.sort_unstable_by_key(|p| (p.round, p.row));
        Changes {
            deletes,
            writes,
            truncates,
            patches,
        }
    }

    /// The writes of one key that leave its row as applying all of them in order would,
    /// when the last one, `row` (at `version`), has unavailable cells (it keeps the stored
    /// value of those columns): from the earliest, each applied after the one before. Walking
    /// back from `row`, an earlier write is needed when it has a value of a column that every
    /// write after it left unavailable; the walk ends at the latest write with every value
    /// (which also makes the row exist), or at the first. `history` holds the key's writes
    /// since its last delete (under versioned deletes: all of them, as a write after a delete
    /// is a whole row anyway), in batch order.
    fn patch_chain(
        &self,
        history: &[(usize, Option<i64>)],
        row: usize,
        version: Option<i64>,
        winner: Winner,
    ) -> Vec<usize> {
        let unavailable = |r: usize, c: usize| self.cells.column(c).is_unavailable(r);
        // The writes before `row` that took effect, latest first: by batch order, or by
        // version (the first of equal versions: a later equal one changes nothing).
        let mut earlier: Vec<(usize, Option<i64>)> = match winner {
            Winner::Newest { .. } => {
                let mut by_version: Vec<_> = history
                    .iter()
                    .copied()
                    .filter(|(_, v)| *v < version)
                    .collect();
                by_version.sort_by_key(|(r, v)| (*v, *r));
                by_version.dedup_by_key(|(_, v)| *v);
                by_version
            }
            _ => history.iter().copied().filter(|(r, _)| *r < row).collect(),
        };
        earlier.reverse();
        let mut needed: Vec<usize> = (0..self.cells.column_count())
            .filter(|c| unavailable(row, *c))
            .collect();
        let mut chain = vec![row];
        for (candidate, _) in earlier {
            // A write with every value ends the walk: it has what is still needed, and it
            // makes the row exist for the patches after it (after a delete in the batch, a
            // patch alone would find no row).
            if !self.cells.has_unavailable(candidate) {
                chain.push(candidate);
                break;
            }
            if needed.iter().any(|c| !unavailable(candidate, *c)) {
                chain.push(candidate);
                needed.retain(|c| unavailable(candidate, *c));
            }
        }
        chain.reverse();
        chain
    }
}

/// What a key's rows come to so far in [`Batch::changes`]: the tombstone to apply and the
/// write after it, each with its row and version (under `Winner::Newest`).
#[derive(Default)]
struct Latest {
    delete: Option<(usize, Option<i64>)>,
    write: Option<(usize, Option<i64>)>,
    /// The key's writes since its last delete (all of them under versioned deletes), with
    /// their versions, when the batch has unavailable cells (see [`Batch::patch_chain`]).
    history: Vec<(usize, Option<i64>)>,
}

impl Latest {
    /// Takes `row`, which does `op` at `version`, where it wins over what the key holds.
    fn offer(&mut self, row: usize, op: RowOp, version: Option<i64>, winner: Winner) {
        let taken = Some((row, version));
        if let Winner::Newest {
            deletes_versioned: true,
            ..
        } = winner
        {
            // A delete is one more version of its key: the greatest wins, write or delete.
            let kept = self.delete.or(self.write);
            if kept.is_none_or(|(_, kept)| version > kept) {
                (self.delete, self.write) = match op {
                    RowOp::Write => (None, taken),
                    RowOp::Delete | RowOp::Truncate => (taken, None),
                };
            }
            return;
        }
        if op != RowOp::Write {
            (self.delete, self.write) = (taken, None);
            self.history.clear();
            return;
        }
        let replace = match (winner, self.write) {
            (_, None) => true,
            (Winner::First, Some(_)) => false,
            (Winner::Last, Some(_)) => true,
            (Winner::Newest { .. }, Some((_, kept))) => version > kept,
        };
        if replace {
            self.write = taken;
        }
    }
}

/// Whether a row of a batch is still written after the batch's truncates (see
/// [`Batch::truncates`]).
type Survives<'a> = Box<dyn Fn(usize) -> bool + 'a>;

/// The items whose flag in `keep` is set.
fn select<T: Clone>(items: &[T], keep: &[bool]) -> Vec<T> {
    items
        .iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(item, _)| item.clone())
        .collect()
}

/// Which record of a key repeated in one batch is the one written (after its last tombstone).
#[derive(Debug, Clone, Copy)]
pub enum Winner {
    /// Insert mode: the first write of a key wins.
    First,
    /// Upsert mode: each record replaces the one before.
    Last,
    /// Upsert mode with `newer_by`: the greatest version; the first of equal ones, as the
    /// update applies only to a strictly greater version. When deletes carry a version too
    /// (`deletes_versioned`, a Debezium delete's `$source_position`), a delete is one more
    /// version of its key: the greatest one wins, whether it writes or deletes, and a
    /// record older than a delete no longer brings the row back.
    Newest {
        column: usize,
        kind: ColumnKind,
        deletes_versioned: bool,
    },
}

/// Row indices into a batch, in batch order: the truncates to run, the tombstones to apply,
/// the rows to write, then the patches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    pub deletes: Vec<usize>,
    pub writes: Vec<usize>,
    pub truncates: Vec<usize>,
    /// Rows with unavailable cells: each updates its key's stored row, if there is one,
    /// leaving those columns as they are. By round, then row: a key is in a round at most
    /// once, and a round applies after the one before.
    pub patches: Vec<Patch>,
}

/// A row that updates a stored row, leaving its unavailable cells' columns as they are, in
/// its round (see [`Changes::patches`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patch {
    pub row: usize,
    pub round: u32,
}

impl Changes {
    /// The same changes without the rows in `rows`.
    pub fn without(&self, rows: &HashSet<usize>) -> Changes {
        let keep = |list: &[usize]| list.iter().copied().filter(|r| !rows.contains(r)).collect();
        Changes {
            deletes: keep(&self.deletes),
            writes: keep(&self.writes),
            truncates: keep(&self.truncates),
            patches: (self.patches.iter())
                .filter(|p| !rows.contains(&p.row))
                .copied()
                .collect(),
        }
    }

    /// How many steps there are: truncates, deletes, writes and patches.
    pub fn len(&self) -> usize {
        self.truncates.len() + self.deletes.len() + self.writes.len() + self.patches.len()
    }

    /// Whether there is no step.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows of every step, in order.
    pub fn steps(&self) -> impl Iterator<Item = usize> + '_ {
        (self.truncates.iter())
            .chain(&self.deletes)
            .chain(&self.writes)
            .copied()
            .chain(self.patches.iter().map(|p| p.row))
    }

    /// The changes at positions `range` of the truncates, the deletes, the writes and the
    /// patches.
    pub fn part(&self, range: std::ops::Range<usize>) -> Changes {
        fn slice<T: Clone>(list: &[T], before: usize, range: &std::ops::Range<usize>) -> Vec<T> {
            let at = |i: usize| i.saturating_sub(before).min(list.len());
            list[at(range.start)..at(range.end)].to_vec()
        }
        let (truncates, deletes) = (self.truncates.len(), self.deletes.len());
        let writes = self.writes.len();
        Changes {
            truncates: slice(&self.truncates, 0, &range),
            deletes: slice(&self.deletes, truncates, &range),
            writes: slice(&self.writes, truncates + deletes, &range),
            patches: slice(&self.patches, truncates + deletes + writes, &range),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Batch {
        /// Adds a row of the given cells.
        fn push_row(
            &mut self,
            at: (i32, u64, i64),
            op: RowOp,
            cells: &[Option<&str>],
            raw: Option<RawRecord>,
        ) {
            self.cells.push_row(cells.iter().copied());
            self.push("t", at.0, at.1, at.2, op, raw);
        }
    }

    fn row(v: &str) -> [Option<&str>; 2] {
        [Some(v), None]
    }

    /// A batch of (key, version, op) rows in one partition, offsets from 0.
    fn keyed(rows: &[(&str, i64, RowOp)]) -> Batch {
        let mut b = Batch::new(2);
        for (offset, (key, version, op)) in rows.iter().enumerate() {
            let version = version.to_string();
            b.push_row(
                (0, 1, offset as i64),
                *op,
                &[Some(key), Some(&version)],
                None,
            );
        }
        b
    }

    /// Applies the rows one by one, as the database would with the guards.
    fn one_by_one(b: &Batch, winner: Winner) -> HashMap<String, i64> {
        let mut table: HashMap<String, i64> = HashMap::new();
        for row in 0..b.len() {
            let key = b.cells.get(0, row).expect("key").to_string();
            let version: i64 = b
                .cells
                .get(1, row)
                .and_then(|v| v.parse().ok())
                .expect("version");
            match (b.ops[row], winner, table.get(&key)) {
                // Every row before it in the batch is older (one partition).
                (RowOp::Truncate, _, _) => table.clear(),
                (RowOp::Delete, _, _) => {
                    table.remove(&key);
                }
                (RowOp::Write, _, None) => {
                    table.insert(key, version);
                }
                (RowOp::Write, Winner::First, Some(_)) => {}
                (RowOp::Write, Winner::Last, Some(_)) => {
                    table.insert(key, version);
                }
                (RowOp::Write, Winner::Newest { .. }, Some(stored)) => {
                    if version > *stored {
                        table.insert(key, version);
                    }
                }
            }
        }
        table
    }

    fn apply(b: &Batch, changes: &Changes) -> HashMap<String, i64> {
        let mut table = HashMap::new();
        assert!(changes.truncates.len() <= 1, "the last truncate only");
        for row in &changes.deletes {
            table.remove(b.cells.get(0, *row).expect("key"));
        }
        for row in &changes.writes {
            let key = b.cells.get(0, *row).expect("key").to_string();
            let version = b.cells.get(1, *row).expect("v").parse().expect("v");
            assert!(
                table.insert(key, version).is_none(),
                "a key written twice by one statement"
            );
        }
        table
    }

    #[test]
    fn changes_equal_one_by_one_application_for_every_winner_rule() {
        use RowOp::{Delete as D, Truncate as T, Write as W};
        let cases: Vec<Vec<(&str, i64, RowOp)>> = vec![
            vec![("a", 1, W), ("b", 1, W), ("a", 3, W), ("a", 2, W)],
            vec![("a", 5, W), ("a", 1, D), ("a", 2, W), ("a", 1, W)],
            vec![("a", 5, W), ("a", 0, D)],
            vec![("a", 0, D), ("a", 4, W), ("a", 4, W), ("b", 0, D)],
            vec![
                ("a", 2, W),
                ("a", 2, W),
                ("a", 7, W),
                ("a", 0, D),
                ("a", 3, W),
            ],
            // A truncate empties what came before it; a key written before and after it is
            // the one after it, whichever record the rule would have picked among all.
            vec![
                ("a", 9, W),
                ("b", 1, W),
                ("", 0, T),
                ("a", 2, W),
                ("c", 1, W),
            ],
            vec![
                ("a", 1, W),
                ("", 0, T),
                ("b", 1, W),
                ("", 0, T),
                ("a", 3, D),
                ("a", 1, W),
            ],
        ];
        let newest = Winner::Newest {
            column: 1,
            kind: ColumnKind::BIGINT,
            deletes_versioned: false,
        };
        for rows in &cases {
            let b = keyed(rows);
            for winner in [Winner::First, Winner::Last, newest] {
                let changes = b.changes(&[0], None, winner, &HashSet::new());
                assert_eq!(
                    apply(&b, &changes),
                    one_by_one(&b, winner),
                    "{rows:?} with {winner:?}"
                );
            }
        }
        let b = keyed(&cases[0]);
        assert_eq!(
            b.changes(&[0], None, newest, &HashSet::new()),
            Changes {
                deletes: vec![],
                writes: vec![1, 2],
                truncates: vec![],
                patches: Vec::new(),
            },
            "the first of the greatest versions, in batch order"
        );
    }

    #[test]
    fn with_versioned_deletes_the_greatest_version_of_a_key_wins_write_or_delete() {
        use RowOp::{Delete as D, Truncate as T, Write as W};
        let newest = Winner::Newest {
            column: 1,
            kind: ColumnKind::BIGINT,
            deletes_versioned: true,
        };
        let changes =
            |rows: &[(&str, i64, RowOp)]| keyed(rows).changes(&[0], None, newest, &HashSet::new());
        type Case<'a> = (&'a [(&'a str, i64, RowOp)], Changes);
        let cases: [Case<'_>; 7] = [
            // Sent again after the newest: an older update and an older delete change nothing.
            (
                &[("a", 1, W), ("a", 3, W), ("a", 2, W), ("a", 2, D)],
                Changes {
                    deletes: vec![],
                    writes: vec![1],
                    truncates: vec![],
                    patches: Vec::new(),
                },
            ),
            // An update older than the delete does not bring the row back.
            (
                &[("a", 1, W), ("a", 5, D), ("a", 3, W)],
                Changes {
                    deletes: vec![1],
                    writes: vec![],
                    truncates: vec![],
                    patches: Vec::new(),
                },
            ),
            (
                &[("a", 1, D), ("a", 2, W), ("b", 7, D)],
                Changes {
                    deletes: vec![2],
                    writes: vec![1],
                    truncates: vec![],
                    patches: Vec::new(),
                },
            ),
            // The first of equal versions, as the database's guard needs a greater one.
            (
                &[("a", 4, W), ("a", 4, W), ("b", 1, W)],
                Changes {
                    deletes: vec![],
                    writes: vec![0, 2],
                    truncates: vec![],
                    patches: Vec::new(),
                },
            ),
            // A truncate removes what is older than it, wherever it is in the batch: those
            // rows are not written, the newer ones are (after it).
            (
                &[
                    ("a", 1, W),
                    ("b", 8, W),
                    ("", 5, T),
                    ("a", 3, W),
                    ("c", 6, W),
                ],
                Changes {
                    deletes: vec![],
                    writes: vec![1, 4],
                    truncates: vec![2],
                    patches: Vec::new(),
                },
            ),
            (
                &[("", 5, T), ("a", 7, W), ("", 9, T), ("b", 9, D)],
                Changes {
                    deletes: vec![3],
                    writes: vec![],
                    truncates: vec![0, 2],
                    patches: Vec::new(),
                },
            ),
            (
                &[],
                Changes {
                    deletes: vec![],
                    writes: vec![],
                    truncates: vec![],
                    patches: Vec::new(),
                },
            ),
        ];
        for (rows, expected) in cases {
            assert_eq!(changes(rows), expected, "{rows:?}");
        }
    }

    /// Rows of (key, version, A, B) whose A and B may be unavailable (`None`), or deletes.
    type Step = (usize, Option<Option<u32>>, Option<Option<u32>>, RowOp);

    /// A batch of `steps` (key, A, B, op), versions rising in batch order.
    fn with_unavailable(steps: &[Step]) -> Batch {
        let mut b = Batch::new(4);
        for (offset, (key, a, b_cell, op)) in steps.iter().enumerate() {
            let key = key.to_string();
            let version = (offset + 10).to_string();
            for (c, cell) in [Some(Some(key.as_str())), Some(Some(version.as_str()))]
                .into_iter()
                .enumerate()
            {
                b.cells.buffer(c).push_str(cell.flatten().unwrap_or(""));
                b.cells.end_cell(c, false);
            }
            for (c, cell) in [(2, a), (3, b_cell)] {
                match cell {
                    None => b.cells.end_unavailable(c),
                    Some(value) => {
                        let text = value.map(|v| v.to_string());
                        b.cells.buffer(c).push_str(text.as_deref().unwrap_or(""));
                        b.cells.end_cell(c, text.is_none());
                    }
                }
            }
            b.cells.end_row();
            b.push("t", 0, 1, offset as i64, *op, None);
        }
        b
    }

    type Stored = HashMap<String, (i64, Option<String>, Option<String>)>;

    /// A write of `row` over the table: newer only, unavailable cells keep the stored value,
    /// and a row with one has nothing to keep it from if there is no stored row.
    fn write_over(b: &Batch, row: usize, table: &mut Stored) {
        let key = b.cells.get(0, row).expect("key").to_string();
        let version: i64 = b.cells.get(1, row).and_then(|v| v.parse().ok()).expect("v");
        let cell = |c: usize, stored: Option<&Option<String>>| {
            if b.cells.column(c).is_unavailable(row) {
                stored.cloned()
            } else {
                Some(b.cells.get(c, row).map(str::to_string))
            }
        };
        let stored = table.get(&key).cloned();
        if stored.as_ref().is_some_and(|s| s.0 >= version) {
            return;
        }
        let (a, b_cell) = (
            cell(2, stored.as_ref().map(|s| &s.1)),
            cell(3, stored.as_ref().map(|s| &s.2)),
        );
        if let (Some(a), Some(b_cell)) = (a, b_cell) {
            table.insert(key, (version, a, b_cell));
        }
    }

    #[test]
    fn patches_leave_unavailable_columns_as_applying_every_record_in_order_would() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(25);
        let newest = Winner::Newest {
            column: 1,
            kind: ColumnKind::BIGINT,
            deletes_versioned: true,
        };
        let mut rounds_seen = 0;
        for case in 0..3000 {
            let cell = |rng: &mut rand::rngs::StdRng| match rng.gen_range(0..4) {
                0 => None,
                1 => Some(None),
                n => Some(Some(n * 100 + rng.gen_range(0..10))),
            };
            // A history the source can have: a row that does not exist is created whole (only
            // an update of an existing row can leave a value out).
            let mut exists = [rng.gen_bool(0.6), rng.gen_bool(0.6)];
            let mut initial = Stored::new();
            for (key, _) in exists.iter().enumerate().filter(|(_, e)| **e) {
                initial.insert(key.to_string(), (1, Some("a0".into()), Some("b0".into())));
            }
            let steps: Vec<Step> = (0..rng.gen_range(1..9))
                .map(|_| {
                    let key = rng.gen_range(0..2);
                    let (a, b) = (cell(&mut rng), cell(&mut rng));
                    if !exists[key] {
                        exists[key] = true;
                        return (key, Some(a.flatten()), Some(b.flatten()), RowOp::Write);
                    }
                    if rng.gen_range(0..6) == 0 {
                        exists[key] = false;
                        return (key, None, None, RowOp::Delete);
                    }
                    (key, a, b, RowOp::Write)
                })
                .collect();
            let b = with_unavailable(&steps);
            for winner in [Winner::Last, newest] {
                let mut expected = initial.clone();
                for row in 0..b.len() {
                    if b.ops[row] == RowOp::Delete {
                        expected.remove(b.cells.get(0, row).expect("key"));
                    } else {
                        write_over(&b, row, &mut expected);
                    }
                }
                let changes = b.changes(&[0], None, winner, &HashSet::new());
                let mut table = initial.clone();
                for row in &changes.deletes {
                    table.remove(b.cells.get(0, *row).expect("key"));
                }
                for row in &changes.writes {
                    assert!(!b.cells.has_unavailable(*row), "case {case}: {steps:?}");
                    write_over(&b, *row, &mut table);
                }
                for round in changes.patches.chunk_by(|x, y| x.round == y.round) {
                    rounds_seen = rounds_seen.max(round[0].round + 1);
                    let mut keys = HashSet::new();
                    for patch in round {
                        assert!(keys.insert(b.cells.get(0, patch.row)), "one key a round");
                        write_over(&b, patch.row, &mut table);
                    }
                }
                assert_eq!(
                    table, expected,
                    "case {case} {winner:?}: {steps:?} → {changes:?}"
                );
            }
        }
        assert!(rounds_seen >= 2, "some cases need rounds");
    }

    #[test]
    fn keys_the_database_finds_equal_are_one_key_whatever_their_text() {
        use RowOp::{Delete as D, Write as W};
        let b = keyed(&[("a", 1, W), ("A", 0, D), ("a ", 2, W), ("b", 3, W)]);
        let by_text = b.changes(&[0], None, Winner::Last, &HashSet::new());
        assert_eq!(by_text.writes, [0, 2, 3], "as text, three keys");
        // The database says a, A and "a " are one key: its last write follows the tombstone.
        let groups = [0, 0, 0, 3];
        let by_database = b.changes(&[0], Some(&groups), Winner::Last, &HashSet::new());
        assert_eq!(
            by_database,
            Changes {
                deletes: vec![1],
                writes: vec![2, 3],
                truncates: vec![],
                patches: Vec::new(),
            }
        );
    }

    #[test]
    fn spans_follow_partitions_and_epochs_and_retain_spans_drops_the_others_rows() {
        let raw = |v: &str| {
            Some(RawRecord {
                value: Some(v.as_bytes().to_vec()),
                ..RawRecord::default()
            })
        };
        let dead = |partition, offset| DeadLetter {
            tp: TopicPartition {
                topic: "t".into(),
                partition,
            },
            offset,
            record: RawRecord::default(),
            error: format!("bad {partition}/{offset}"),
        };
        let mut b = Batch::new(2);
        b.push_row((0, 1, 10), RowOp::Write, &row("a"), raw("a"));
        b.push_row((1, 1, 5), RowOp::Write, &row("b"), raw("b"));
        b.push_dead_letter(1, dead(0, 11));
        b.push_row((0, 1, 12), RowOp::Write, &row("c"), raw("c"));
        b.push_row((0, 2, 3), RowOp::Delete, &row("d"), raw("d"));
        b.push_dead_letter(1, dead(1, 6));
        assert_eq!((b.len(), b.records()), (4, 6));
        assert_eq!(b.spans.len(), 3);
        assert_eq!((b.spans[0].first, b.spans[0].next), (10, 13));
        assert_eq!((b.spans[0].records, b.spans[1].records), (3, 2));
        assert_eq!(b.coordinates(2), (&b.spans[0].tp, 12));
        let b = b.retain_spans(&[false, true, true]);
        assert_eq!((b.len(), b.records()), (2, 3));
        assert_eq!(
            b.cells.column(0).iter().collect::<Vec<_>>(),
            vec![Some("b"), Some("d")]
        );
        assert_eq!(
            b.spans.iter().map(|s| s.tp.partition).collect::<Vec<_>>(),
            vec![1, 0]
        );
        assert_eq!(b.ops, vec![RowOp::Write, RowOp::Delete]);
        assert_eq!(b.dead_letters().collect::<Vec<_>>(), vec![&dead(1, 6)]);
        let rejected = b.dead_letter_for_row(1, "too long".into()).expect("kept");
        assert_eq!((rejected.tp.partition, rejected.offset), (0, 3));
        assert_eq!(rejected.record.value.as_deref(), Some(&b"d"[..]));
        let b = b.retain_spans(&[false, true]);
        assert_eq!(b.cells.row(0), vec![Some("d"), None]);
        assert_eq!(b.spans.len(), 1);
        assert_eq!(b.dead_letters().count(), 0);
        assert_eq!(b.coordinates(0).1, 3);
    }

    #[test]
    fn changes_are_split_into_parts_by_step_truncates_first() {
        let changes = Changes {
            deletes: vec![1, 2],
            writes: vec![3, 4],
            truncates: vec![5],
            patches: Vec::new(),
        };
        assert_eq!(changes.len(), 5);
        assert_eq!(changes.steps().collect::<Vec<_>>(), [5, 1, 2, 3, 4]);
        let steps = |range| changes.part(range).steps().collect::<Vec<_>>();
        assert_eq!(steps(0..1), [5]);
        assert_eq!(steps(1..3), [1, 2]);
        assert_eq!(steps(2..4), [2, 3]);
        assert_eq!(steps(0..5), [5, 1, 2, 3, 4]);
        assert!(changes.part(5..5).is_empty());
        let part = changes.part(0..2);
        assert_eq!(
            (part.truncates, part.deletes, part.writes),
            (vec![5], vec![1], vec![])
        );
        let without = changes.without(&HashSet::from([5, 3]));
        assert_eq!(without.steps().collect::<Vec<_>>(), [1, 2, 4]);
    }

    #[test]
    fn parts_are_copies_of_each_parts_spans_in_the_order_of_their_first_span() {
        let mut b = Batch::new(2);
        for (partition, offset) in [(3, 30), (0, 10), (3, 31), (1, 20)] {
            let value = format!("{partition}/{offset}");
            b.push_row((partition, 1, offset), RowOp::Write, &row(&value), None);
        }
        // Partitions 0 and 1 in part 5, partition 3 in part 2; no part is empty.
        let parts = b.parts(|tp| if tp.partition == 3 { 2 } else { 5 });
        let summary: Vec<(usize, Vec<String>)> = parts
            .iter()
            .map(|(index, part)| {
                let cells =
                    (0..part.len()).map(|r| part.cells.get(0, r).unwrap_or("-").to_string());
                (*index, cells.collect())
            })
            .collect();
        assert_eq!(
            summary,
            [
                (2, vec!["3/30".to_string(), "3/31".to_string()]),
                (5, vec!["0/10".to_string(), "1/20".to_string()])
            ]
        );
        assert_eq!(parts[1].1.coordinates(1).1, 20);
        assert_eq!(b.len(), 4, "the batch itself is left as it was");
    }

    #[test]
    fn a_split_gives_each_partition_to_one_lane_with_its_rows_and_dead_letters() {
        let mut b = Batch::new(2);
        for (partition, offset) in [(0, 10), (1, 20), (2, 30), (0, 11), (3, 40), (1, 21)] {
            let value = format!("{partition}/{offset}");
            b.push_row((partition, 1, offset), RowOp::Write, &row(&value), None);
        }
        b.push_dead_letter(
            1,
            DeadLetter {
                tp: TopicPartition {
                    topic: "t".into(),
                    partition: 3,
                },
                offset: 41,
                record: RawRecord::default(),
                error: "bad".into(),
            },
        );
        let lanes = b.split(2, |tp| tp.partition as usize % 2);
        let rows = |b: &Batch| -> Vec<String> {
            (0..b.len())
                .map(|r| b.cells.get(0, r).expect("cell").to_string())
                .collect()
        };
        assert_eq!(rows(&lanes[0]), ["0/10", "2/30", "0/11"]);
        assert_eq!(rows(&lanes[1]), ["1/20", "3/40", "1/21"]);
        for (lane, batch) in lanes.iter().enumerate() {
            for row in 0..batch.len() {
                let (tp, offset) = batch.coordinates(row);
                assert_eq!(tp.partition as usize % 2, lane);
                assert_eq!(rows(batch)[row], format!("{}/{offset}", tp.partition));
            }
        }
        let spans = |b: &Batch| {
            b.spans
                .iter()
                .map(|s| (s.tp.partition, s.first, s.next))
                .collect::<Vec<_>>()
        };
        assert_eq!(spans(&lanes[0]), [(0, 10, 12), (2, 30, 31)]);
        assert_eq!(spans(&lanes[1]), [(1, 20, 22), (3, 40, 42)]);
        assert_eq!(lanes[1].dead_letters().count(), 1);
        assert_eq!(lanes[0].dead_letters().count(), 0);
        // All in one lane: the batch itself, the other lanes empty.
        let lanes = keyed(&[("a", 1, RowOp::Write)]).split(3, |_| 2);
        assert!(lanes[0].is_empty() && lanes[1].is_empty());
        assert_eq!(lanes[2].len(), 1);
    }

    #[test]
    fn skipped_rows_count_as_absent_so_the_next_candidate_of_their_key_is_written() {
        use RowOp::{Delete as D, Write as W};
        let rows = [
            ("a", 1, W),
            ("a", 2, W),
            ("b", 1, W),
            ("a", 0, D),
            ("a", 3, W),
        ];
        let b = keyed(&rows);
        let none = HashSet::new();
        let all = b.changes(&[0], None, Winner::Last, &none);
        assert_eq!(
            all,
            Changes {
                deletes: vec![3],
                writes: vec![2, 4],
                truncates: vec![],
                patches: Vec::new(),
            }
        );
        // The write after the tombstone refused: only the tombstone is left for `a`.
        let skip = HashSet::from([4]);
        let without = b.changes(&[0], None, Winner::Last, &skip);
        assert_eq!(
            without,
            Changes {
                deletes: vec![3],
                writes: vec![2],
                truncates: vec![],
                patches: Vec::new(),
            }
        );
        assert_eq!(without, all.without(&skip), "nothing else of `a` to write");
        // The tombstone refused too: `a` ends as its last write before it.
        let skip = HashSet::from([3, 4]);
        let without = b.changes(&[0], None, Winner::Last, &skip);
        assert_eq!(
            without,
            Changes {
                deletes: vec![],
                writes: vec![1, 2],
                truncates: vec![],
                patches: Vec::new(),
            }
        );
        assert_ne!(
            without,
            all.without(&skip),
            "the write before the tombstone replaces them"
        );
        // Without a key, skipping only drops rows.
        let unkeyed = b.changes(&[], None, Winner::Last, &HashSet::from([1]));
        assert_eq!(unkeyed.writes, vec![0, 2, 3, 4]);
    }

    #[test]
    fn parts_of_changes_keep_deletes_before_writes() {
        let changes = Changes {
            deletes: vec![3, 7],
            writes: vec![0, 1, 5],
            truncates: vec![],
            patches: Vec::new(),
        };
        let part = |r| changes.part(r);
        assert_eq!(part(0..5), changes);
        assert_eq!(
            part(1..3),
            Changes {
                deletes: vec![7],
                writes: vec![0],
                truncates: vec![],
                patches: Vec::new(),
            }
        );
        assert_eq!(
            part(3..5),
            Changes {
                deletes: vec![],
                writes: vec![1, 5],
                truncates: vec![],
                patches: Vec::new(),
            }
        );
        assert_eq!(part(0..1).deletes, vec![3]);
        assert!(part(2..2).writes.is_empty());
    }

    #[test]
    fn a_batch_that_keeps_no_records_dead_letters_no_rejected_row() {
        let mut b = Batch::new(2);
        b.push_row((0, 1, 7), RowOp::Write, &row("a"), None);
        assert_eq!(b.dead_letter_for_row(0, "x".into()), None);
        assert_eq!(b.coordinates(0).1, 7);
    }
}
