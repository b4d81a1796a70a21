//! A batch: converted rows held column by column (the shape the SQL writer binds), with the
//! span of offsets each partition contributed — what the batch's transaction will commit.

use crate::offsets::TopicPartition;

/// The records one partition contributed to a batch, read in one epoch of ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub tp: TopicPartition,
    pub epoch: u64,
    pub first: i64,
    pub last: i64,
}

#[derive(Debug)]
pub struct Batch {
    /// One vector of cells per target column, all of the same length.
    pub columns: Vec<Vec<Option<String>>>,
    /// For each row, the index of its span.
    row_span: Vec<u32>,
    pub spans: Vec<Span>,
}

impl Batch {
    pub fn new(column_count: usize) -> Batch {
        Batch {
            columns: vec![Vec::new(); column_count],
            row_span: Vec::new(),
            spans: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.row_span.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row_span.is_empty()
    }

    /// Adds one converted row; `cells` is drained (one cell per column).
    pub fn push(
        &mut self,
        topic: &str,
        partition: i32,
        epoch: u64,
        offset: i64,
        cells: &mut Vec<Option<String>>,
    ) {
        debug_assert_eq!(cells.len(), self.columns.len());
        let index =
            match self.spans.iter().rposition(|s| {
                s.tp.partition == partition && s.epoch == epoch && s.tp.topic == topic
            }) {
                Some(i) => {
                    self.spans[i].last = offset;
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
                        last: offset,
                    });
                    self.spans.len() - 1
                }
            };
        self.row_span.push(index as u32);
        for (column, cell) in self.columns.iter_mut().zip(cells.drain(..)) {
            column.push(cell);
        }
    }

    /// The same batch with only the spans whose flag in `keep` is set, and their rows.
    pub fn retain_spans(self, keep: &[bool]) -> Batch {
        debug_assert_eq!(keep.len(), self.spans.len());
        if keep.iter().all(|k| *k) {
            return self; // the usual case: nothing to copy
        }
        let mut renumber = Vec::with_capacity(keep.len());
        let mut spans = Vec::new();
        for (span, kept) in self.spans.into_iter().zip(keep) {
            renumber.push(spans.len() as u32);
            if *kept {
                spans.push(span);
            }
        }
        let row_keep: Vec<bool> = self.row_span.iter().map(|s| keep[*s as usize]).collect();
        let columns = self
            .columns
            .into_iter()
            .map(|cells| {
                cells
                    .into_iter()
                    .zip(&row_keep)
                    .filter(|(_, k)| **k)
                    .map(|(c, _)| c)
                    .collect()
            })
            .collect();
        let row_span = self
            .row_span
            .iter()
            .filter(|s| keep[**s as usize])
            .map(|s| renumber[*s as usize])
            .collect();
        Batch {
            columns,
            row_span,
            spans,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(v: &str) -> Vec<Option<String>> {
        vec![Some(v.to_string()), None]
    }

    #[test]
    fn spans_follow_partitions_and_epochs_and_retain_spans_drops_the_others_rows() {
        let mut b = Batch::new(2);
        b.push("t", 0, 1, 10, &mut row("a"));
        b.push("t", 1, 1, 5, &mut row("b"));
        b.push("t", 0, 1, 12, &mut row("c"));
        b.push("t", 0, 2, 3, &mut row("d"));
        assert_eq!(b.len(), 4);
        assert_eq!(b.spans.len(), 3);
        assert_eq!((b.spans[0].first, b.spans[0].last), (10, 12));
        let b = b.retain_spans(&[false, true, true]);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b.columns[0],
            vec![Some("b".to_string()), Some("d".to_string())]
        );
        assert_eq!(
            b.spans.iter().map(|s| s.tp.partition).collect::<Vec<_>>(),
            vec![1, 0]
        );
        let b = b.retain_spans(&[false, true]);
        assert_eq!(b.columns[0], vec![Some("d".to_string())]);
        assert_eq!(b.spans.len(), 1);
    }
}
