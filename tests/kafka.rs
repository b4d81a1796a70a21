//! What only a real Apache Kafka broker shows, on PostgreSQL and on MariaDB: producer
//! transactions (aborted ones never land; one left open holds reading at its first offset),
//! records deleted before they were written (retention), exact start and end positions with
//! producers batching normally, and partitions added while running.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_exactly_once, http_get, idemsink, metric_sum, record, unique, with_ids, Backend, Case,
    Connector, ErrorKind, EXIT,
};
use idemsink::testkit::{self, Outgoing};
use rdkafka::producer::Producer;

const CATCH_UP: Duration = Duration::from_secs(60);

on_both_databases!(
    records_of_aborted_transactions_never_land_and_the_stored_offsets_reach_the_end_offsets,
    a_transaction_left_open_holds_reading_at_its_first_offset_until_the_broker_aborts_it,
    records_deleted_before_they_were_written_stop_the_pipeline_or_are_skipped_as_configured,
    records_deleted_while_running_ahead_of_the_reader_are_skipped_logged_and_counted,
    a_stored_offset_beyond_the_end_of_a_recreated_topic_stops_the_pipeline_or_is_read_again,
    start_from_latest_starts_exactly_at_the_end_fixed_when_first_assigned,
    partitions_added_while_running_are_picked_up_and_written_exactly_once,
);

/// Three transactional producers at once, each running 12 transactions of 40 records spread
/// over four partitions; every transaction stays open a moment while idemsink reads, and one
/// in four is aborted (the last transaction of one producer among them, so a partition ends on
/// an abort marker). Only committed records land, each once, and the stored offsets equal
/// Kafka's end offsets, which count the commit and abort markers.
async fn records_of_aborted_transactions_never_land_and_the_stored_offsets_reach_the_end_offsets(
    backend: Backend,
) {
    let case = Case::new(backend, "txn", 4).await;
    let config = case.config("batch:\n  max_records: 300\n  max_wait_ms: 50\n");
    let mut connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    let producers: Vec<_> = (0..3i64)
        .map(|k| {
            let (brokers, topic) = (case.brokers.clone(), case.topic.clone());
            tokio::spawn(async move {
                let producer = testkit::transactional_producer(
                    &brokers,
                    &unique("txid"),
                    Duration::from_secs(60),
                )
                .expect("transactional producer");
                let (mut committed, mut aborted) = (Vec::new(), 0);
                for tx in 0..12i64 {
                    producer.begin_transaction().expect("begin");
                    let ids = k * 100_000 + tx * 100..k * 100_000 + tx * 100 + 40;
                    let records: Vec<Outgoing> =
                        ids.clone().map(|id| record(id, (id % 4) as i32)).collect();
                    let landed = testkit::produce(&producer, &topic, &records)
                        .await
                        .expect("produce");
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    if (tx + k) % 4 == 1 {
                        producer
                            .abort_transaction(Duration::from_secs(30))
                            .expect("abort");
                        aborted += 1;
                    } else {
                        producer
                            .commit_transaction(Duration::from_secs(30))
                            .expect("commit");
                        committed.extend(ids.zip(landed));
                    }
                }
                (committed, aborted)
            })
        })
        .collect();
    let (mut committed, mut aborted) = (Vec::new(), 0);
    for producer in producers {
        let (c, a) = producer.await.expect("producer task");
        committed.extend(c);
        aborted += a;
    }
    assert_eq!(aborted, 9, "one transaction in four aborted");
    let end = case.end_offsets().await;
    case.wait_while_running(&mut connector, &end).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert_exactly_once(&case.rows().await, &committed);
    assert_eq!(
        case.stored_offsets().await,
        end,
        "stored offsets equal the end offsets, markers included"
    );
}

/// A transactional producer in a process of its own, frozen (SIGSTOP) with a transaction
/// open: killed when dropped.
struct FrozenTransaction {
    child: Child,
    /// Where each partition's open transaction starts: its last stable offset.
    first_offsets: BTreeMap<i32, i64>,
    records: i64,
}

impl FrozenTransaction {
    fn start(case: &Case, ids: std::ops::Range<i64>, timeout: Duration) -> FrozenTransaction {
        let mut child = Command::new(env!("CARGO_BIN_EXE_txn-producer"))
            .args(["--brokers", &case.brokers, "--topic", &case.topic])
            .args(["--transactional-id", &unique("frozen")])
            .args(["--partitions", &case.partitions.to_string()])
            .args([
                "--from",
                &ids.start.to_string(),
                "--to",
                &ids.end.to_string(),
            ])
            .args(["--timeout-ms", &timeout.as_millis().to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start txn-producer");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read its line");
        let mut first_offsets = BTreeMap::new();
        for place in line
            .strip_prefix("open ")
            .expect("an open transaction")
            .split_whitespace()
        {
            let (p, o) = place.split_once(':').expect("partition:offset");
            let (p, o): (i32, i64) = (p.parse().expect("p"), o.parse().expect("o"));
            let first = first_offsets.entry(p).or_insert(o);
            *first = (*first).min(o);
        }
        let status = Command::new("kill")
            .args(["-STOP", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "SIGSTOP the producer");
        FrozenTransaction {
            child,
            first_offsets,
            records: ids.end - ids.start,
        }
    }
}

impl Drop for FrozenTransaction {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A producer opens a transaction, writes 100 records and freezes; 200 records are committed
/// after it. idemsink reads up to the transaction's first offset in each partition and no
/// further; `offsets list` and the metrics say so (lag 0, 300 offsets held); once the broker
/// aborts the transaction (its 10 s timeout), everything committed lands exactly once and the
/// open transaction's records never do.
async fn a_transaction_left_open_holds_reading_at_its_first_offset_until_the_broker_aborts_it(
    backend: Backend,
) {
    let case = Case::new(backend, "txnopen", 2).await;
    let producer = case.producer();
    let mut committed = with_ids(0..200, case.produce_ids(&producer, 0..200).await);
    let frozen = FrozenTransaction::start(&case, 1000..1100, Duration::from_secs(10));
    let opened = Instant::now();
    committed.extend(with_ids(
        200..400,
        case.produce_ids(&producer, 200..400).await,
    ));
    let config = case.config("batch:\n  max_records: 100\n  max_wait_ms: 50\n");
    let connector = Connector::start(&config);
    let address = connector.http_address().await;

    case.wait_for_offsets(&frozen.first_offsets, CATCH_UP).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        opened.elapsed() < Duration::from_secs(8),
        "the test looked before the broker could abort the transaction"
    );
    assert_eq!(
        case.stored_offsets().await,
        frozen.first_offsets,
        "held at the open transaction's first offset"
    );
    let held_rows: Vec<i64> = case.rows().await.iter().map(|r| r.0).collect();
    let mut before: Vec<i64> = (0..200).collect();
    before.retain(|id| held_rows.contains(id));
    assert_eq!(held_rows.len(), 200, "only what precedes the transaction");
    assert_eq!(before.len(), 200);

    let end = case.end_offsets().await;
    let (ok, listed) = idemsink(&[
        "offsets".as_ref(),
        "list".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert!(ok, "{listed}");
    let lines: Vec<String> = listed
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for (p, first) in &frozen.first_offsets {
        let held = end[p] - first;
        let row = format!(
            "{} {}/{p} {first} 0 {first} {} 0 {held}",
            case.name, case.topic, end[p]
        );
        assert!(lines.contains(&row), "{row:?} in:\n{listed}");
    }
    assert!(
        listed.contains("held: ") && listed.contains("open producer transaction"),
        "{listed}"
    );
    let held_total: i64 = end.values().sum::<i64>() - frozen.first_offsets.values().sum::<i64>();
    assert_eq!(held_total, frozen.records + 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = http_get(&address, "/metrics").1;
        let held = metric_sum(&metrics, "idemsink_open_transaction_offsets", &case.name);
        let lag = metric_sum(&metrics, "idemsink_consumer_lag", &case.name);
        if held == Some(held_total as f64) && lag == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {held_total} held offsets and lag 0:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The broker aborts the transaction after its timeout: the abort marker ends it, and the
    // records committed after it are read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let end = case.end_offsets().await;
        if end.values().sum::<i64>() > 500 && case.stored_offsets().await == end {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never caught up after the abort; log:\n{}",
            connector.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(frozen);
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert_exactly_once(&case.rows().await, &committed);
}

/// Runs `config` until idemsink stops by itself: its last line must hold every one of
/// `needles`, and nothing may have been written (rows and offsets as they were).
async fn stops_writing_nothing(case: &Case, config: &std::path::Path, needles: &[&str]) {
    let before = case.snapshot().await;
    // An offset Kafka no longer has needs an operator's decision: permanent, not transient.
    let label = needles.last().copied().unwrap_or_default();
    let (last, _) = Connector::run_to_failure(config, label, ErrorKind::Permanent);
    for needle in needles {
        assert!(last.contains(needle), "{needle:?} in the last line: {last}");
    }
    assert_eq!(case.snapshot().await, before, "nothing written");
}

/// Offsets the case's partition 0 holds after `ids` were produced to two partitions (even ids
/// go to partition 0): the ids whose records sit at offsets `offsets` of partition 0.
fn ids_at(produced: &[(i64, (i32, i64))], offsets: std::ops::Range<i64>) -> Vec<i64> {
    produced
        .iter()
        .filter(|(_, (p, o))| *p == 0 && offsets.contains(o))
        .map(|(id, _)| *id)
        .collect()
}

/// 1,000 records are written; while idemsink is stopped 1,000 more arrive and retention deletes
/// partition 0 up to offset 800, so 300 records of it (500..799) were never written. A restart
/// stops at once with one line naming the pipeline, topic, partition, the stored offset and the
/// log start offset, and writes nothing. With `auto.offset.reset: earliest` it goes on from 800:
/// the skip is logged with its first and last offset and counted in a metric.
async fn records_deleted_before_they_were_written_stop_the_pipeline_or_are_skipped_as_configured(
    backend: Backend,
) {
    let case = Case::new(backend, "retention", 2).await;
    let producer = case.producer();
    let batch = "batch:\n  max_records: 200\n  max_wait_ms: 20\n";
    let config = case.config(batch);
    let mut produced = with_ids(0..1000, case.produce_ids(&producer, 0..1000).await);
    case.run_until_stored(&config, &case.end_offsets().await)
        .await;
    assert_eq!(case.stored_offsets().await.get(&0), Some(&500));
    produced.extend(with_ids(
        1000..2000,
        case.produce_ids(&producer, 1000..2000).await,
    ));
    testkit::delete_records(&case.brokers, &case.topic, 0, 800)
        .await
        .expect("delete records");

    stops_writing_nothing(
        &case,
        &config,
        &[
            "idemsink: error: ",
            &format!("pipeline {}", case.name),
            &format!("topic {} partition 0", case.topic),
            "stored offset 500,",
            "log start offset 800",
            "offsets 500..799 were deleted",
        ],
    )
    .await;

    let config = case
        .pipeline()
        .property("auto.offset.reset", "earliest")
        .extra(batch)
        .write();
    let mut connector = Connector::start(&config);
    let address = connector.http_address().await;
    let end = case.end_offsets().await;
    case.wait_while_running(&mut connector, &end).await;
    let metrics = http_get(&address, "/metrics").1;
    assert_eq!(
        metric_sum(&metrics, "idemsink_records_skipped_total", &case.name),
        Some(300.0),
        "{metrics}"
    );
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert!(
        log.contains("offsets skipped")
            && log.contains("first_skipped=500")
            && log.contains("last_skipped=799")
            && log.contains("skipped=300"),
        "the skip is logged with its range:\n{log}"
    );
    let deleted = ids_at(&produced, 500..800);
    assert_eq!(deleted.len(), 300);
    produced.retain(|(id, _)| !deleted.contains(id));
    assert_exactly_once(&case.rows().await, &produced);
    assert_eq!(case.stored_offsets().await, end);
}

/// Retention overtakes a running instance: while its writes are held its fetching pauses, and
/// the records produced meanwhile are deleted before it reads them. With `auto.offset.reset:
/// earliest` it goes on from the new log start, and the skip is logged and counted; the records
/// it had read before the gap are written.
async fn records_deleted_while_running_ahead_of_the_reader_are_skipped_logged_and_counted(
    backend: Backend,
) {
    let case = Case::new(backend, "overtaken", 2).await;
    let producer = case.producer();
    let config = case
        .pipeline()
        .property("auto.offset.reset", "earliest")
        .extra("batch:\n  max_records: 100\n  max_wait_ms: 20\n")
        .write();
    let mut connector = Connector::start(&config);
    let address = connector.http_address().await;
    connector.wait_assigned(Duration::from_secs(30)).await;
    let mut produced = with_ids(0..400, case.produce_ids(&producer, 0..400).await);
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    let held = common::TableWrites::hold(&case).await;
    produced.extend(with_ids(
        400..1000,
        case.produce_ids(&producer, 400..1000).await,
    ));
    connector
        .wait_for_log("writer busy: fetching paused", 1, Duration::from_secs(30))
        .await;
    produced.extend(with_ids(
        1000..3000,
        case.produce_ids(&producer, 1000..3000).await,
    ));
    let end = case.end_offsets().await;
    testkit::delete_records(&case.brokers, &case.topic, 0, end[&0] - 100)
        .await
        .expect("delete records");
    held.release().await;
    case.wait_while_running(&mut connector, &end).await;
    let metrics = http_get(&address, "/metrics").1;
    let skipped = metric_sum(&metrics, "idemsink_records_skipped_total", &case.name)
        .expect("skips counted") as i64;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    let rows = case.rows().await;
    let landed_p0: Vec<i64> = rows.iter().filter(|r| r.1 == 0).map(|r| r.2).collect();
    let gap_start = (0..end[&0] - 100)
        .find(|o| !landed_p0.contains(o))
        .expect("a gap in partition 0");
    assert!(
        gap_start >= 200,
        "what was written before stays ({gap_start})"
    );
    assert_eq!(skipped, end[&0] - 100 - gap_start, "{log}");
    assert!(
        log.contains(&format!("first_skipped={gap_start}"))
            && log.contains(&format!("last_skipped={}", end[&0] - 101)),
        "the skip is logged with its range:\n{log}"
    );
    produced.retain(|(_, (p, o))| *p != 0 || !(gap_start..end[&0] - 100).contains(o));
    assert_exactly_once(&rows, &produced);
    assert_eq!(case.stored_offsets().await, end);
}

/// The topic is deleted and created again while idemsink is stopped: the stored offset (500)
/// is beyond the new end (100). A restart stops with one line naming the partition, the stored
/// offset and the end offset, and writes nothing (before, `auto.offset.reset: earliest` read
/// from 0 and dropped everything below 500 without a word). With `earliest` it reads the new
/// topic from its start, saying why; the operator had cleared the old rows, whose coordinates
/// the new records reuse.
async fn a_stored_offset_beyond_the_end_of_a_recreated_topic_stops_the_pipeline_or_is_read_again(
    backend: Backend,
) {
    let case = Case::new(backend, "recreated", 1).await;
    let batch = "batch:\n  max_records: 200\n  max_wait_ms: 20\n";
    let config = case.config(batch);
    case.produce_ids(&case.producer(), 0..500).await;
    case.run_until_stored(&config, &case.end_offsets().await)
        .await;
    testkit::recreate_topic(&case.brokers, &case.topic, 1)
        .await
        .expect("re-create the topic");
    let landed = case.produce_ids(&case.producer(), 500..600).await;

    stops_writing_nothing(
        &case,
        &config,
        &[
            "idemsink: error: ",
            &format!("topic {} partition 0", case.topic),
            "stored offset 500,",
            "end offset 100",
            "beyond the end of the partition",
        ],
    )
    .await;

    case.exec(&format!("DELETE FROM {}", case.table)).await;
    let config = case
        .pipeline()
        .property("auto.offset.reset", "earliest")
        .extra(batch)
        .write();
    let end = case.end_offsets().await;
    assert_eq!(end, BTreeMap::from([(0, 100)]));
    let log = case.run_until_stored(&config, &end).await;
    assert!(
        log.contains("the stored offset is beyond the end of the partition")
            && log.contains("stored=500")
            && log.contains("end_offset=100"),
        "{log}"
    );
    assert_exactly_once(&case.rows().await, &with_ids(500..600, landed));
}

/// `start_from: latest` with producers batching normally: the start is each partition's end
/// offset when the pipeline first sees it, stored at once, so records produced after the
/// assignment all land and none before it does, also across a restart before the first record.
async fn start_from_latest_starts_exactly_at_the_end_fixed_when_first_assigned(backend: Backend) {
    let case = Case::new(backend, "latest", 3).await;
    let producer = case.producer();
    case.produce_ids(&producer, 0..3000).await;
    let skipped = case.end_offsets().await;
    let config = case
        .pipeline()
        .source("  start_from: latest\n")
        .extra("batch:\n  max_records: 500\n  max_wait_ms: 50\n")
        .write();
    let first = Connector::start(&config);
    first.wait_assigned(Duration::from_secs(30)).await;
    case.wait_for_offsets(&skipped, CATCH_UP).await;
    let (status, log) = first.stop(EXIT);
    assert!(status.success(), "log:\n{log}");

    // Records produced while no instance runs are not skipped: the start was fixed.
    let mut produced = with_ids(3000..4000, case.produce_ids(&producer, 3000..4000).await);
    let mut connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    produced.extend(with_ids(
        4000..5000,
        case.produce_ids(&producer, 4000..5000).await,
    ));
    let end = case.end_offsets().await;
    case.wait_while_running(&mut connector, &end).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert_exactly_once(&case.rows().await, &produced);
    assert_eq!(case.stored_offsets().await, end);
}

/// The topic grows from 2 to 4 partitions while idemsink runs: the new partitions are
/// assigned (metadata refreshed every second here; 30 s by default) and written exactly once.
async fn partitions_added_while_running_are_picked_up_and_written_exactly_once(backend: Backend) {
    let case = Case::new(backend, "grow", 2).await;
    let config = case
        .pipeline()
        .property("topic.metadata.refresh.interval.ms", "1000")
        .extra("batch:\n  max_records: 500\n  max_wait_ms: 50\n")
        .write();
    let connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    let mut landed = case.produce_ids(&case.producer(), 0..1000).await;
    testkit::add_partitions(&case.brokers, &case.topic, 4)
        .await
        .expect("add partitions");
    // A new producer sees the four partitions at once.
    let more: Vec<Outgoing> = (1000..2000).map(|id| record(id, (id % 4) as i32)).collect();
    landed.extend(
        testkit::produce(&case.producer(), &case.topic, &more)
            .await
            .expect("produce"),
    );
    let log = case.stop_caught_up(connector, landed).await;
    assert_eq!(case.stored_offsets().await.len(), 4, "{log}");
    for p in [2, 3] {
        assert!(
            log.contains(&format!("{}/{p}@", case.topic)),
            "partition {p} was assigned:\n{log}"
        );
    }
}
