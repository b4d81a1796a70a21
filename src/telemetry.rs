//! Metrics: every name idemsink exports, what it means, and the Prometheus recorder that
//! `/metrics` renders. The rest of the code records through the small functions here, so
//! the names and labels live in one place.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::offsets::TopicPartition;
use crate::writer::RowCounts;

const RECORDS_CONSUMED: &str = "idemsink_records_consumed_total";
const ROWS_WRITTEN: &str = "idemsink_rows_written_total";
const ROWS_UPDATED: &str = "idemsink_rows_updated_total";
const ROWS_UNCHANGED: &str = "idemsink_rows_unchanged_total";
const ROWS_DELETED: &str = "idemsink_rows_deleted_total";
const DEAD_LETTERS: &str = "idemsink_dead_letters_total";
const BATCHES_COMMITTED: &str = "idemsink_batches_committed_total";
const BATCHES_FENCED: &str = "idemsink_batches_fenced_total";
const BATCH_RECORDS: &str = "idemsink_batch_records";
const TRANSACTION_SECONDS: &str = "idemsink_transaction_seconds";
const DB_RETRIES: &str = "idemsink_db_retries_total";
const REBALANCES: &str = "idemsink_rebalances_total";
const ASSIGNED_PARTITIONS: &str = "idemsink_assigned_partitions";
const CONSUMER_LAG: &str = "idemsink_consumer_lag";
const TRANSACTION_HELD: &str = "idemsink_open_transaction_offsets";
const RECORDS_SKIPPED: &str = "idemsink_records_skipped_total";
const RECORDS_IGNORED: &str = "idemsink_records_ignored_total";

/// Installs the process-wide recorder; its handle renders the exposition text.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(BATCH_RECORDS.to_string()),
            &[
                1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(TRANSACTION_SECONDS.to_string()),
            &[
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        RECORDS_CONSUMED,
        "Records read from Kafka and put into a batch."
    );
    describe_counter!(
        ROWS_WRITTEN,
        "Rows inserted or updated by committed batches (MySQL also counts duplicates it left as they were)."
    );
    describe_counter!(
        ROWS_UPDATED,
        "Rows updated by committed batches (upsert mode)."
    );
    describe_counter!(
        ROWS_UNCHANGED,
        "Rows of committed batches that changed nothing: duplicates and older versions (PostgreSQL)."
    );
    describe_counter!(
        ROWS_DELETED,
        "Rows deleted by tombstones in committed batches."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Records written to the dead-letter table by committed batches (errors.tolerance: all)."
    );
    describe_counter!(BATCHES_COMMITTED, "Batches committed with their offsets.");
    describe_counter!(
        BATCHES_FENCED,
        "Batches rolled back because the stored offsets had moved (another instance owns the partitions)."
    );
    describe_histogram!(BATCH_RECORDS, "Records per committed batch.");
    describe_histogram!(
        TRANSACTION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of a batch's database transaction, committed or fenced."
    );
    describe_counter!(DB_RETRIES, "Database operations retried after a failure.");
    describe_counter!(
        REBALANCES,
        "Partitions assigned or revoked by consumer-group rebalances."
    );
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions this instance owns.");
    describe_gauge!(
        CONSUMER_LAG,
        "Offsets a read_committed reader can read now beyond the offset committed in the database \
         (last stable offset minus stored offset)."
    );
    describe_gauge!(
        TRANSACTION_HELD,
        "Offsets held back by open producer transactions: high watermark minus last stable offset. \
         No reader may pass them until their transactions commit or abort."
    );
    describe_counter!(
        RECORDS_SKIPPED,
        "Offsets skipped without being written, by reason (retention: deleted before they were \
         written, with auto.offset.reset earliest or latest)."
    );
    describe_counter!(
        RECORDS_IGNORED,
        "Records read and committed that change no row by design, by reason (tombstone: the \
         tombstone Debezium sends after a delete event, which already deleted the row)."
    );
}

/// Starts a pipeline's counters at zero, so that rates and alerts work before the first event.
pub fn start_pipeline(pipeline: &str, unchanged_known: bool) {
    let mut counters = vec![
        BATCHES_COMMITTED,
        BATCHES_FENCED,
        ROWS_WRITTEN,
        ROWS_UPDATED,
        ROWS_DELETED,
        DEAD_LETTERS,
    ];
    if unchanged_known {
        counters.push(ROWS_UNCHANGED);
    }
    for name in counters {
        counter!(name, "pipeline" => pipeline.to_string()).increment(0);
    }
    gauge!(ASSIGNED_PARTITIONS, "pipeline" => pipeline.to_string()).set(0.0);
}

pub fn records_consumed(pipeline: &str, tp: &TopicPartition, records: usize) {
    counter!(RECORDS_CONSUMED, "pipeline" => pipeline.to_string(), "topic" => tp.topic.clone(), "partition" => tp.partition.to_string())
        .increment(records as u64);
}

pub fn batch_committed(pipeline: &str, records: usize, rows: &RowCounts, seconds: f64) {
    let label = || ("pipeline", pipeline.to_string());
    counter!(BATCHES_COMMITTED, &[label()]).increment(1);
    counter!(ROWS_WRITTEN, &[label()]).increment(rows.written);
    counter!(ROWS_UPDATED, &[label()]).increment(rows.updated);
    if let Some(unchanged) = rows.unchanged {
        counter!(ROWS_UNCHANGED, &[label()]).increment(unchanged);
    }
    counter!(ROWS_DELETED, &[label()]).increment(rows.deleted);
    counter!(DEAD_LETTERS, &[label()]).increment(rows.dead_lettered);
    histogram!(BATCH_RECORDS, &[label()]).record(records as f64);
    histogram!(TRANSACTION_SECONDS, &[label()]).record(seconds);
}

pub fn batch_fenced(pipeline: &str, seconds: f64) {
    counter!(BATCHES_FENCED, "pipeline" => pipeline.to_string()).increment(1);
    histogram!(TRANSACTION_SECONDS, "pipeline" => pipeline.to_string()).record(seconds);
}

pub fn db_retry(pipeline: &str, operation: &'static str) {
    counter!(DB_RETRIES, "pipeline" => pipeline.to_string(), "operation" => operation).increment(1);
}

/// A rebalance event: `kind` is `assigned` or `revoked`; `owned` is what is owned after it.
pub fn rebalance(pipeline: &str, kind: &'static str, partitions: usize, owned: usize) {
    counter!(REBALANCES, "pipeline" => pipeline.to_string(), "kind" => kind)
        .increment(partitions as u64);
    gauge!(ASSIGNED_PARTITIONS, "pipeline" => pipeline.to_string()).set(owned as f64);
}

/// What Kafka has beyond the stored offset: `lag` readable now, `held` behind open transactions.
pub fn consumer_lag(pipeline: &str, tp: &TopicPartition, lag: i64, held: i64) {
    let labels = [
        ("pipeline", pipeline.to_string()),
        ("topic", tp.topic.clone()),
        ("partition", tp.partition.to_string()),
    ];
    gauge!(CONSUMER_LAG, &labels).set(lag.max(0) as f64);
    gauge!(TRANSACTION_HELD, &labels).set(held.max(0) as f64);
}

/// Offsets of a partition passed over without being written, and why.
pub fn records_skipped(pipeline: &str, tp: &TopicPartition, reason: &'static str, count: i64) {
    counter!(RECORDS_SKIPPED, "pipeline" => pipeline.to_string(), "topic" => tp.topic.clone(), "partition" => tp.partition.to_string(), "reason" => reason)
        .increment(count.max(0) as u64);
}

/// A record read and committed that changes no row by design.
pub fn record_ignored(pipeline: &str, reason: &'static str) {
    counter!(RECORDS_IGNORED, "pipeline" => pipeline.to_string(), "reason" => reason).increment(1);
}
