//! Rows larger than a statement can carry in one piece, on PostgreSQL and on MariaDB: the
//! writer bounds each statement by bytes as well as rows (MySQL's `max_allowed_packet`,
//! PostgreSQL's 1 GB message), the first time a batch goes in and when it is replayed
//! (PostgreSQL's COPY then meets existing rows and the batch goes in by INSERT instead).

#[macro_use]
mod common;

use common::{brokers, logged_counts, Backend, Case, Connector, ErrorKind, PrivateDatabase};
use idemsink::testkit::{self, Outgoing};

on_both_databases!(
    a_five_megabyte_record_and_a_batch_of_5000_rows_of_200_kb_go_in_first_time_and_on_replay,
    batches_of_large_records_are_cut_by_bytes,
);

const KB: usize = 1024;

/// A table for large bodies, with the Kafka coordinates as its key.
fn large_table(backend: Backend) -> String {
    let (body, text) = match backend {
        Backend::Postgres => ("text", "text"),
        Backend::MySql => ("longtext", "varchar(255)"),
    };
    format!(
        "id bigint NOT NULL,
         body {body} NOT NULL,
         kafka_topic {text} NOT NULL,
         kafka_partition integer NOT NULL,
         kafka_offset bigint NOT NULL,
         UNIQUE (kafka_topic, kafka_partition, kafka_offset)"
    )
}

const LARGE_COLUMNS: &str = "  columns:
    id: /id
    body: /body
    kafka_topic: $topic
    kafka_partition: $partition
    kafka_offset: $offset
";

/// The body of record `id`: its number repeated to `bytes` bytes, so that each row's
/// beginning, end and length tell whether it landed whole.
fn body(id: i64, bytes: usize) -> String {
    let unit = format!("{id:08}|");
    unit.repeat(bytes / unit.len() + 1)[..bytes].to_string()
}

/// `{"id": <id>, "body": <body>}` (a body needs no escaping).
fn large_record(id: i64, bytes: usize) -> Outgoing {
    Outgoing {
        partition: 0,
        key: Some(id.to_string().into_bytes()),
        value: Some(format!(r#"{{"id": {id}, "body": "{}"}}"#, body(id, bytes)).into_bytes()),
    }
}

/// Produces the records with ids `0..sizes.len()`, record `id` with a body of `sizes[id]`
/// bytes, into partition 0, a few hundred at a time (the producer's queue holds 1 GB).
async fn produce_large(case: &Case, sizes: &[usize]) {
    // The producer batches records up to 1 MB, and the broker bounds a batch.
    let limit = sizes.iter().max().copied().unwrap_or(0) + 2 * KB * KB;
    testkit::allow_record_bytes(&case.brokers, &case.topic, limit)
        .await
        .expect("allow large records");
    let producer = case.producer();
    let ids: Vec<i64> = (0..sizes.len() as i64).collect();
    for chunk in ids.chunks(250) {
        let records: Vec<Outgoing> = chunk
            .iter()
            .map(|id| large_record(*id, sizes[*id as usize]))
            .collect();
        testkit::produce(&producer, &case.topic, &records)
            .await
            .expect("produce large records");
    }
}

/// Asserts that the table holds record `id` with its whole body, once, for every `id`.
async fn assert_landed_whole(case: &Case, sizes: &[usize]) {
    let sql = format!(
        "SELECT CONCAT(id, ' ', kafka_offset, ' ', LENGTH(body), ' ', LEFT(body, 9), ' ', \
         RIGHT(body, 9)) FROM {} ORDER BY kafka_offset",
        case.table
    );
    let expected: Vec<String> = sizes
        .iter()
        .enumerate()
        .map(|(id, bytes)| {
            let body = body(id as i64, *bytes);
            format!(
                "{id} {id} {bytes} {} {}",
                &body[..9],
                &body[body.len() - 9..]
            )
        })
        .collect();
    let landed = case.texts(&sql).await;
    assert_eq!(landed.len(), expected.len(), "rows in the table");
    let wrong: Vec<_> = landed
        .iter()
        .zip(&expected)
        .filter(|(l, e)| l != e)
        .collect();
    assert!(
        wrong.is_empty(),
        "rows not as produced (landed, expected): {:?}",
        &wrong[..wrong.len().min(3)]
    );
}

/// A batch of 5,000 records of 216 kB (1.1 GB, more than PostgreSQL takes in one message),
/// then one of a 5 MB record and 4,999 small ones. They all land whole, and the stored
/// offsets reach the end. Then the offsets are forgotten and everything is read again: a
/// replay changes nothing (PostgreSQL writes the replayed batches by INSERT after their COPY
/// meets the existing rows).
async fn a_five_megabyte_record_and_a_batch_of_5000_rows_of_200_kb_go_in_first_time_and_on_replay(
    backend: Backend,
) {
    let case = Case::with_table(backend, "large", 1, brokers(), &large_table(backend)).await;
    let mut sizes = vec![216 * KB; 5000];
    sizes.push(5 * KB * KB);
    sizes.extend([10; 4999]);
    produce_large(&case, &sizes).await;
    let config = case.config_with(
        LARGE_COLUMNS,
        "batch:\n  max_records: 5000\n  max_bytes: 2000000000\n  max_wait_ms: 60000\n",
    );
    let end = case.end_offsets().await;
    for run in ["first", "replay"] {
        let log = case.run_until_stored(&config, &end).await;
        assert_landed_whole(&case, &sizes).await;
        assert_eq!(
            logged_counts(&log, "records"),
            [5000, 5000],
            "{run} run: two batches of 5,000 rows; log:\n{log}"
        );
        case.forget_offsets().await;
    }
}

/// A MariaDB server whose `max_allowed_packet` is 1 MB, far below what 1,000 rows of 64 kB
/// need: 300 such rows go in, first time and on replay, in statements that each fit. A record
/// that cannot fit in a statement even alone then stops the pipeline, named by its topic,
/// partition and offset, with the limit to raise; nothing of its batch is written, and the
/// offsets stay before it.
#[tokio::test(flavor = "multi_thread")]
async fn mysql_statements_fit_max_allowed_packet_and_a_row_too_large_for_one_is_named() {
    let db = PrivateDatabase::start_with_options(Backend::MySql, "--max-allowed-packet=1M");
    let case = Case::in_database(Backend::MySql, "packet", 1, db.url()).await;
    case.exec(&format!(
        "ALTER TABLE {} MODIFY body longtext NOT NULL",
        case.table
    ))
    .await;
    let sizes = vec![64 * KB; 300];
    produce_large(&case, &sizes).await;
    let config = case.config_with(
        LARGE_COLUMNS,
        "batch:\n  max_records: 1000\n  max_wait_ms: 2000\n",
    );
    let end = case.end_offsets().await;
    for _run in ["first", "replay"] {
        case.run_until_stored(&config, &end).await;
        assert_landed_whole(&case, &sizes).await;
        case.forget_offsets().await;
    }
    case.run_until_stored(&config, &end).await;

    // 2 MB with a small record after it, in one batch.
    let producer = case.producer();
    let oversized = [large_record(300, 2 * KB * KB), large_record(301, 10)];
    testkit::produce(&producer, &case.topic, &oversized)
        .await
        .expect("produce");
    let (failure, log) = Connector::run_to_failure(
        &config,
        "a row over max_allowed_packet",
        ErrorKind::RejectedRow,
    );
    for expected in [
        &format!("topic {} partition 0 offset 300", case.topic),
        "max_allowed_packet (1048576 bytes)",
    ] {
        assert!(
            failure.contains(expected),
            "{expected:?} in {failure}\nlog:\n{log}"
        );
    }
    assert_landed_whole(&case, &sizes).await;
    assert_eq!(
        case.stored_offsets().await,
        end,
        "offsets stay before the record"
    );
}

/// 40 records of 1 MB with `batch.max_bytes` at 4 MB and `max_records` at 1,000: every batch
/// is cut once its records hold 4 MB (4 of them), so memory is bounded by bytes, and all
/// land whole.
async fn batches_of_large_records_are_cut_by_bytes(backend: Backend) {
    let case = Case::with_table(backend, "by_bytes", 1, brokers(), &large_table(backend)).await;
    let sizes = vec![KB * KB; 40];
    produce_large(&case, &sizes).await;
    let config = case.config_with(
        LARGE_COLUMNS,
        "batch:\n  max_records: 1000\n  max_bytes: 4194304\n  max_wait_ms: 5000\n",
    );
    let end = case.end_offsets().await;
    let log = case.run_until_stored(&config, &end).await;
    assert_landed_whole(&case, &sizes).await;
    let batches = logged_counts(&log, "records");
    assert_eq!(batches.iter().sum::<u64>(), 40, "log:\n{log}");
    assert!(
        batches.iter().all(|n| *n <= 4),
        "batches of at most 4 records of 1 MB: {batches:?}"
    );
}

/// On a MariaDB whose `max_allowed_packet` is 1 MB, a bad record of 2 MB (not JSON) under
/// `errors.tolerance: all` becomes a dead letter cut to fit, whose error gives its length and
/// SHA-256, and its batch commits: the statement holding it whole would break the packet (1153)
/// and stop the pipeline on every restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_larger_than_max_allowed_packet_is_cut_to_fit_and_the_batch_commits() {
    use sha2::{Digest, Sha256};
    let db = PrivateDatabase::start_with_options(Backend::MySql, "--max-allowed-packet=1M");
    let case = Case::in_database(Backend::MySql, "packet_dlq", 1, db.url()).await;
    let poison: Vec<u8> = body(7, 2 * KB * KB).into_bytes();
    let records = [
        Outgoing {
            partition: 0,
            key: Some(b"7".to_vec()),
            value: Some(poison.clone()),
        },
        large_record(8, 10),
    ];
    testkit::allow_record_bytes(&case.brokers, &case.topic, 4 * KB * KB)
        .await
        .expect("allow large records");
    testkit::produce(&case.producer(), &case.topic, &records)
        .await
        .expect("produce");
    let config = case.config_with(LARGE_COLUMNS, "errors:\n  tolerance: all\n");
    let end = case.end_offsets().await;
    case.run_until_stored(&config, &end).await;
    let letters = case
        .texts(&format!(
            "SELECT CONCAT_WS('|', `offset`, LENGTH(record_value), CAST(error AS CHAR))
               FROM idemsink_dead_letters WHERE pipeline = '{}'",
            case.name
        ))
        .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let fields: Vec<&str> = letters[0].splitn(3, '|').collect();
    assert_eq!(fields[0], "0", "{letters:?}");
    let kept: usize = fields[1].parse().expect("length");
    assert!(kept > 0 && kept < KB * KB, "{kept}");
    for needle in [
        format!("{:x}", Sha256::digest(&poison)),
        format!("value {} bytes", poison.len()),
        "max_allowed_packet".to_string(),
    ] {
        assert!(fields[2].contains(&needle), "{needle} in {}", fields[2]);
    }
    assert_eq!(case.rows().await.len(), 1, "the good record landed");
}
