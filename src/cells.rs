//! A batch's converted values, column by column: each column keeps the text of all its cells
//! back to back in one buffer, and where each cell ends. Converting a record writes straight
//! into these buffers, so it allocates nothing per cell, and the writer reads each cell as a
//! `&str` in place.
//!
//! A cell may also be *unavailable*: the source did not send its value and the row keeps
//! the one it has (Debezium's placeholder for an unchanged TOASTed column). It reads as NULL;
//! [`Column::is_unavailable`] tells it apart, and the writer leaves such a column as it is.

use std::ops::Range;

/// One column's cells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Column {
    /// The cells' text, one after the other.
    text: String,
    /// Per cell, where its text ends in `text` (it starts where the one before ends), with
    /// [`NULL`] set for a NULL cell (whose text is empty), and [`UNAVAILABLE`] beside it for
    /// an unavailable one.
    ends: Vec<usize>,
    /// Whether a cell of this column was ever ended unavailable: only then is it worth
    /// looking for one.
    may_be_unavailable: bool,
}

/// The bit of an end that marks a NULL cell: no text reaches that length.
const NULL: usize = 1 << (usize::BITS - 1);
/// The bit of an end that marks an unavailable cell (always NULL too).
const UNAVAILABLE: usize = 1 << (usize::BITS - 2);
/// The bits of an end that are flags, not a length.
const FLAGS: usize = NULL | UNAVAILABLE;

impl Column {
    /// The cell of `row`: `None` for NULL.
    pub fn get(&self, row: usize) -> Option<&str> {
        self.range(row).map(|range| &self.text[range])
    }

    /// The same, as bytes (no character boundary to check).
    pub fn bytes(&self, row: usize) -> Option<&[u8]> {
        self.range(row).map(|range| &self.text.as_bytes()[range])
    }

    fn range(&self, row: usize) -> Option<std::ops::Range<usize>> {
        let end = self.ends[row];
        if end & NULL != 0 {
            return None;
        }
        Some(self.text_end(row)..end)
    }

    /// Whether the cell of `row` is unavailable: the row keeps the value it has.
    pub fn is_unavailable(&self, row: usize) -> bool {
        self.may_be_unavailable && self.ends[row] & UNAVAILABLE != 0
    }

    /// Where the text of the cells before `row` ends.
    fn text_end(&self, row: usize) -> usize {
        if row == 0 {
            0
        } else {
            self.ends[row - 1] & !FLAGS
        }
    }

    /// The cells, in row order (tests).
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = Option<&str>> + '_ {
        (0..self.ends.len()).map(|row| self.get(row))
    }

    fn end_cell(&mut self, null: bool) {
        if null {
            // A NULL cell has no text, even if a conversion wrote some before deciding.
            self.text.truncate(self.text_end(self.ends.len()));
            self.ends.push(self.text.len() | NULL);
        } else {
            self.ends.push(self.text.len());
        }
    }

    fn end_unavailable(&mut self) {
        self.end_cell(true);
        if let Some(end) = self.ends.last_mut() {
            *end |= UNAVAILABLE;
        }
        self.may_be_unavailable = true;
    }

    fn truncate(&mut self, rows: usize) {
        self.ends.truncate(rows);
        self.text.truncate(self.text_end(rows));
    }

    /// The cells of the rows in `runs` (ranges of rows, in order), copied a run at a time
    /// into buffers of the size they need.
    fn retain(&self, runs: &[Range<usize>], rows: usize) -> Column {
        let text_of = |run: &Range<usize>| self.text_end(run.start)..self.text_end(run.end);
        let mut kept = Column {
            text: String::with_capacity(runs.iter().map(|run| text_of(run).len()).sum()),
            ends: Vec::with_capacity(rows),
            may_be_unavailable: self.may_be_unavailable,
        };
        for run in runs {
            let text = text_of(run);
            let base = kept.text.len();
            kept.text.push_str(&self.text[text.clone()]);
            // The flag bits are above any length: shifting an end keeps them.
            kept.ends.extend(
                self.ends[run.clone()]
                    .iter()
                    .map(|end| end - text.start + base),
            );
        }
        kept
    }
}

/// The cells of a batch's rows, one [`Column`] per target column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cells {
    columns: Vec<Column>,
    rows: usize,
}

impl Cells {
    pub fn new(columns: usize) -> Cells {
        Cells {
            columns: vec![Column::default(); columns],
            rows: 0,
        }
    }

    /// Empty cells with room for as much as `other` holds: the next batch is usually the
    /// size of the last, and its buffers need not grow there step by step.
    pub fn with_room_of(other: &Cells) -> Cells {
        let room = |c: &Column| Column {
            text: String::with_capacity(c.text.len()),
            ends: Vec::with_capacity(c.ends.len()),
            may_be_unavailable: false,
        };
        Cells {
            columns: other.columns.iter().map(room).collect(),
            rows: 0,
        }
    }

    /// Complete rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn column_count(&self) -> usize {
        self.columns.len()
    }

    pub fn column(&self, column: usize) -> &Column {
        &self.columns[column]
    }

    /// The cell at `column` of `row`: `None` for NULL.
    pub fn get(&self, column: usize, row: usize) -> Option<&str> {
        self.columns[column].get(row)
    }

    /// The cells of `row`, column by column (tests).
    #[cfg(test)]
    pub fn row(&self, row: usize) -> Vec<Option<&str>> {
        self.columns.iter().map(|c| c.get(row)).collect()
    }

    /// The text of the bytes the cells hold.
    pub fn text_bytes(&self) -> usize {
        self.columns.iter().map(|c| c.text.len()).sum()
    }

    /// Where the next row's cell of `column` is written: append its text, then
    /// [`end_cell`](Cells::end_cell). Columns are written in order, once per row.
    pub fn buffer(&mut self, column: usize) -> &mut String {
        &mut self.columns[column].text
    }

    /// Ends the next row's cell of `column`: the text appended since is the cell, or it is NULL.
    pub fn end_cell(&mut self, column: usize, null: bool) {
        self.columns[column].end_cell(null);
    }

    /// Ends the next row's cell of `column` as unavailable: the source did not send its
    /// value, and the row keeps the one it has.
    pub fn end_unavailable(&mut self, column: usize) {
        self.columns[column].end_unavailable();
    }

    /// Whether any cell of the batch may be unavailable (a quick look before a closer one).
    pub fn may_be_unavailable(&self) -> bool {
        self.columns.iter().any(|c| c.may_be_unavailable)
    }

    /// Whether a cell of `row` is unavailable.
    pub fn has_unavailable(&self, row: usize) -> bool {
        self.columns.iter().any(|c| c.is_unavailable(row))
    }

    /// Ends the row being written: every column has its cell.
    pub fn end_row(&mut self) {
        self.rows += 1;
        debug_assert!(self.columns.iter().all(|c| c.ends.len() == self.rows));
    }

    /// Forgets the cells written since the last complete row (its conversion failed).
    pub fn abandon_row(&mut self) {
        for column in &mut self.columns {
            column.truncate(self.rows);
        }
    }

    /// Appends a row of cells (tests; conversion writes in place).
    #[cfg(test)]
    pub fn push_row<'a>(&mut self, cells: impl IntoIterator<Item = Option<&'a str>>) {
        let mut count = 0;
        for (column, cell) in self.columns.iter_mut().zip(cells) {
            column.text.push_str(cell.unwrap_or(""));
            column.end_cell(cell.is_none());
            count += 1;
        }
        assert_eq!(count, self.columns.len(), "a row has one cell per column");
        self.end_row();
    }

    /// The cells of the rows whose flag in `keep` is set.
    pub fn retain(&self, keep: &[bool]) -> Cells {
        let runs = kept_runs(keep);
        let rows = runs.iter().map(ExactSizeIterator::len).sum();
        Cells {
            columns: self.columns.iter().map(|c| c.retain(&runs, rows)).collect(),
            rows,
        }
    }
}

/// The runs of consecutive rows whose flag in `keep` is set.
fn kept_runs(keep: &[bool]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut row = 0;
    while row < keep.len() {
        if !keep[row] {
            row += 1;
            continue;
        }
        let first = row;
        while row < keep.len() && keep[row] {
            row += 1;
        }
        runs.push(first..row);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_keep_text_and_nulls_per_row_and_an_abandoned_row_leaves_nothing() {
        let mut cells = Cells::new(2);
        cells.push_row([Some("a"), None]);
        cells.push_row([Some(""), Some("é")]);
        // A conversion that fails after writing part of a row.
        cells.buffer(0).push_str("partial");
        cells.end_cell(0, false);
        cells.buffer(1).push_str("half");
        cells.abandon_row();
        cells.buffer(0).push_str("written then null");
        cells.end_cell(0, true);
        cells.buffer(1).push('z');
        cells.end_cell(1, false);
        cells.end_row();
        assert_eq!(cells.rows(), 3);
        assert_eq!(cells.row(0), vec![Some("a"), None]);
        assert_eq!(cells.row(1), vec![Some(""), Some("é")]);
        assert_eq!(cells.row(2), vec![None, Some("z")]);
        assert_eq!(cells.text_bytes(), 1 + 2 + 1);
        let kept = cells.retain(&[true, false, true]);
        assert_eq!(kept.rows(), 2);
        assert_eq!(kept.row(0), vec![Some("a"), None]);
        assert_eq!(kept.row(1), vec![None, Some("z")]);
        assert_eq!(
            kept.column(1).iter().collect::<Vec<_>>(),
            vec![None, Some("z")]
        );
        // Runs of kept rows are copied whole, their ends shifted.
        cells.push_row([Some("yy"), Some("end")]);
        let kept = cells.retain(&[false, true, true, true]);
        assert_eq!(kept.rows(), 3);
        assert_eq!(
            (0..3).map(|r| kept.row(r)).collect::<Vec<_>>(),
            [
                vec![Some(""), Some("é")],
                vec![None, Some("z")],
                vec![Some("yy"), Some("end")]
            ]
        );
        assert_eq!(
            kept.retain(&[true, false, true]).row(1),
            vec![Some("yy"), Some("end")]
        );
    }
}
