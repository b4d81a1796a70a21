//! The exactly-once guarantee against a real broker and a real database — each test runs on
//! PostgreSQL and on MariaDB — with idemsink running as a separate process: full runs,
//! SIGKILL at random moments, replays and bad records (transactions: `tests/transactions.rs`).

#[macro_use]
mod common;

use std::time::Duration;

use common::{assert_exactly_once, with_ids, Backend, Case, Connector, ErrorKind, EXIT};
use idemsink::testkit::{self, Outgoing};
use rand::{Rng, SeedableRng};

const CATCH_UP: Duration = Duration::from_secs(120);

on_both_databases!(
    lands_20000_records_over_4_partitions_exactly_once_then_replays_change_nothing,
    sigkill_at_random_moments_while_streaming_loses_and_doubles_nothing,
    a_value_that_is_not_json_stops_the_run_naming_the_record,
    a_missing_field_for_a_not_null_column_stops_the_run_naming_the_record,
    a_batch_whose_offset_moved_underneath_is_rolled_back_and_reading_resumes_from_the_database,
    awkward_values_arrive_byte_for_byte_on_first_write_and_on_replay,
    a_row_the_database_refuses_stops_the_run_with_the_reason_and_commits_nothing_of_its_batch,
    two_writer_lanes_commit_apart_and_a_crash_between_their_commits_loses_and_doubles_nothing,
);

/// With two writers, each partition has its lane (partitions 0 and 2 share one, 1 and 3 the
/// other) and each lane commits its own transactions. While the lane of partition 0 holds its
/// transaction open after writing its rows (the testkit hold), the other lane commits 1 and 3
/// to their end, and nothing commits partition 0. SIGKILLed then, between the two lanes'
/// commits, and run again, every record is in the table exactly once.
async fn two_writer_lanes_commit_apart_and_a_crash_between_their_commits_loses_and_doubles_nothing(
    backend: Backend,
) {
    let case = Case::new(backend, "lanes", 4).await;
    let config = case
        .pipeline()
        .sink(&format!("{}  writers: 2\n", common::STANDARD_COLUMNS))
        .extra("batch:\n  max_records: 5000\n  max_wait_ms: 1000\n")
        .write();
    let landed = case.produce_ids(&case.producer(), 0..400).await;
    let end = case.end_offsets().await;
    let hold = tempfile::NamedTempFile::new().expect("hold file");
    std::fs::write(hold.path(), "0").expect("hold the lane of partition 0");
    let connector = Connector::start_with_env(
        &["run", "--config"],
        &config,
        &[(testkit::HOLD_TRANSACTION_FILE_ENV, hold.path())],
    );
    connector
        .wait_for_log("testkit: holding a batch's transaction open", 1, CATCH_UP)
        .await;
    let other_lane: std::collections::BTreeMap<i32, i64> = end
        .iter()
        .filter(|(p, _)| *p % 2 == 1)
        .map(|(p, o)| (*p, *o))
        .collect();
    case.wait_for_offsets(&other_lane, CATCH_UP).await;
    let stored = case.stored_offsets().await;
    assert_eq!(
        stored.get(&0),
        None,
        "nothing commits the held partition: {stored:?}"
    );
    connector.kill();

    case.run_until_stored(&config, &end).await;
    assert_exactly_once(&case.rows().await, &with_ids(0..400, landed));
}

async fn lands_20000_records_over_4_partitions_exactly_once_then_replays_change_nothing(
    backend: Backend,
) {
    let case = Case::new(backend, "full", 4).await;
    let producer = case.producer();
    let landed = case.produce_ids(&producer, 0..20_000).await;
    let end = case.end_offsets().await;
    let produced = with_ids(0..20_000, landed);
    let config = case.config("batch:\n  max_records: 2000\n  max_wait_ms: 50\n");

    let log = case.run_until_stored(&config, &end).await;
    if backend == Backend::Postgres {
        assert!(
            log.contains("rows_by=\"copy\""),
            "rows go in by COPY; log:\n{log}"
        );
    }
    assert_exactly_once(&case.rows().await, &produced);
    assert_eq!(
        case.stored_offsets().await,
        end,
        "offsets table equals the end offsets"
    );

    // Running again over committed data adds nothing, changes nothing, not even updated_at.
    let before = case.snapshot().await;
    let again = Connector::start(&config);
    again.wait_assigned(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, log) = again.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert_eq!(
        case.snapshot().await,
        before,
        "a run over committed data changed the table or the offsets"
    );

    // Even a full replay from the start (offsets deleted) adds and changes no row.
    case.forget_offsets().await;
    let log = case.run_until_stored(&config, &end).await;
    assert_eq!(
        case.snapshot().await.0,
        before.0,
        "a full replay changed rows"
    );
    let written = common::logged_counts(&log, "written");
    assert!(
        !written.is_empty(),
        "the replay committed no batch; log:\n{log}"
    );
    // MySQL counts a duplicate left as it was as an affected row; PostgreSQL does not.
    if backend == Backend::Postgres {
        assert!(
            written.iter().all(|n| *n == 0),
            "a replayed batch wrote rows: {written:?}"
        );
    }
}

async fn sigkill_at_random_moments_while_streaming_loses_and_doubles_nothing(backend: Backend) {
    let case = Case::new(backend, "kill", 4).await;
    let config = case.config("batch:\n  max_records: 500\n  max_wait_ms: 20\n");
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("kill schedule seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // 50,000 records streamed in chunks over ~10 s while the connector is killed and restarted.
    let chunks = case.record_chunks(0..50_000, 1000);
    let (connector, landed) = case
        .stream_while_killing(&config, chunks, 5, 500..3000, &mut rng)
        .await;
    case.stop_caught_up(connector, landed).await;
}

/// Produces 100 good records, one bad one, 100 good ones to a single partition; the run must
/// stop at the bad one, naming it, with everything before it committed and nothing after.
async fn bad_record_stops_the_pipeline(backend: Backend, bad_value: &[u8], expected_reason: &str) {
    let case = Case::new(backend, "bad", 1).await;
    let producer = case.producer();
    let mut records: Vec<Outgoing> = (0..100).map(|id| common::record(id, 0)).collect();
    records.push(Outgoing {
        partition: 0,
        key: None,
        value: Some(bad_value.to_vec()),
    });
    records.extend((101..201).map(|id| common::record(id, 0)));
    let landed = testkit::produce(&producer, &case.topic, &records)
        .await
        .expect("produce");
    let bad_offset = landed[100].1;
    let config = case.config("batch:\n  max_records: 30\n  max_wait_ms: 20\n");

    for attempt in 1..=2 {
        // A restart meets the same record again: nothing was skipped.
        let (last, _) =
            Connector::run_to_failure(&config, &format!("attempt {attempt}"), ErrorKind::BadRecord);
        for needle in [
            format!("pipeline {}", case.name),
            format!("topic {}", case.topic),
            "partition 0".to_string(),
            format!("offset {bad_offset}"),
            expected_reason.to_string(),
        ] {
            assert!(
                last.contains(&needle),
                "attempt {attempt}: the error line should contain `{needle}`: {last}"
            );
        }
        assert!(
            last.starts_with("idemsink: error: "),
            "one-line reason on stderr: {last}"
        );
        let rows = case.rows().await;
        assert_eq!(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>(),
            "attempt {attempt}"
        );
        assert_eq!(
            case.stored_offsets().await.get(&0),
            Some(&bad_offset),
            "the bad record's offset is not committed"
        );
    }
}

async fn a_value_that_is_not_json_stops_the_run_naming_the_record(backend: Backend) {
    bad_record_stops_the_pipeline(backend, b"{not json", "the record value is not JSON").await;
}

async fn a_missing_field_for_a_not_null_column_stops_the_run_naming_the_record(backend: Backend) {
    bad_record_stops_the_pipeline(
        backend,
        br#"{"id": 100}"#,
        "column body: the record has no value at /body, but the column is NOT NULL",
    )
    .await;
}

/// The compare-and-set fence: when a partition's stored offset moves under a running
/// instance (as when another instance took the partition and committed), the instance's next
/// batch for it is rolled back and it resumes from what the database says.
async fn a_batch_whose_offset_moved_underneath_is_rolled_back_and_reading_resumes_from_the_database(
    backend: Backend,
) {
    let case = Case::new(backend, "fence", 2).await;
    let producer = case.producer();
    let first = case.produce_ids(&producer, 0..1000).await;
    let end_first = case.end_offsets().await;
    let connector =
        Connector::start(&case.config("batch:\n  max_records: 5000\n  max_wait_ms: 200\n"));
    case.wait_for_offsets(&end_first, CATCH_UP).await;

    // "Another instance" commits 100 records of partition 0 past what this one has seen.
    let moved_from = end_first[&0];
    case.exec(&format!(
        "UPDATE idemsink_offsets SET next_offset = next_offset + 100 WHERE pipeline = '{}' AND {} = 0",
        case.name,
        case.quote("partition")
    ))
    .await;
    let second = case.produce_ids(&producer, 1000..2000).await;
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert!(
        log.contains(common::FENCED),
        "the conflict is logged; log:\n{log}"
    );

    let skipped = |p: i32, o: i64| p == 0 && (moved_from..moved_from + 100).contains(&o);
    let expected: Vec<(i64, (i32, i64))> =
        with_ids(0..2000, first.into_iter().chain(second).collect())
            .into_iter()
            .filter(|(_, (p, o))| !skipped(*p, *o))
            .collect();
    assert_eq!(expected.len(), 1900);
    assert_exactly_once(&case.rows().await, &expected);
}

/// Values that COPY's text format would misread unless escaped arrive exactly as sent, through
/// the COPY fast path and again through the INSERT fallback of a replay.
async fn awkward_values_arrive_byte_for_byte_on_first_write_and_on_replay(backend: Backend) {
    let case = Case::new(backend, "bytes", 1).await;
    let bodies = [
        "tab\there",
        "new\nline\r",
        "back\\slash",
        "\\N",
        "\\.",
        "",
        "ünïcödé ✓ 🦀",
        "'; drop table x; --",
    ];
    let records: Vec<Outgoing> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            // Every other record carries `extra`, so the payload column sees NULLs too.
            let value = if i % 2 == 0 {
                serde_json::json!({"id": i, "body": body, "extra": {"k": body}})
            } else {
                serde_json::json!({"id": i, "body": body})
            };
            Outgoing::json(0, &i.to_string(), &value)
        })
        .collect();
    testkit::produce(&case.producer(), &case.topic, &records)
        .await
        .expect("produce");
    let end = case.end_offsets().await;
    let config = case.config("");
    let text = std::fs::read_to_string(&config)
        .expect("read config")
        .replace("payload: $value", "payload: /extra");
    std::fs::write(&config, text).expect("write config");

    let expected: Vec<(i64, String, Option<String>)> = bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            (
                i as i64,
                body.to_string(),
                (i % 2 == 0).then(|| body.to_string()),
            )
        })
        .collect();
    let k = match backend {
        Backend::Postgres => "payload->>'k'",
        Backend::MySql => "CAST(JSON_UNQUOTE(JSON_EXTRACT(payload, '$.k')) AS CHAR)",
    };
    let sql = format!("SELECT id, body, {k} FROM {} ORDER BY id", case.table);
    let read = || async {
        let rows = on_pool!(&case.pool, |p| sqlx::query_as::<
            _,
            (i64, String, Option<String>),
        >(&sql)
        .fetch_all(p)
        .await);
        rows.expect("read rows")
    };
    case.run_until_stored(&config, &end).await;
    assert_eq!(read().await, expected, "first write");

    case.forget_offsets().await;
    case.exec(&format!("DELETE FROM {} WHERE id % 3 = 0", case.table))
        .await;
    let log = case.run_until_stored(&config, &end).await;
    assert_eq!(
        read().await,
        expected,
        "after a replay that re-inserted some rows"
    );
    if backend == Backend::Postgres {
        assert_eq!(
            common::logged_counts(&log, "written").iter().sum::<u64>(),
            3,
            "the replay re-inserted exactly the 3 deleted rows; log:\n{log}"
        );
    }
}

/// A row the database itself refuses (here a CHECK constraint idemsink cannot know about)
/// stops the pipeline with the database's reason and the first refused record's
/// coordinates; nothing of that batch is committed.
async fn a_row_the_database_refuses_stops_the_run_with_the_reason_and_commits_nothing_of_its_batch(
    backend: Backend,
) {
    let case = Case::new(backend, "check", 1).await;
    case.exec(&format!(
        "ALTER TABLE {} ADD CONSTRAINT id_below_50 CHECK (id < 50)",
        case.table
    ))
    .await;
    let producer = case.producer();
    let landed = case.produce_ids(&producer, 0..60).await;
    let config = case.config("batch:\n  max_records: 1000\n  max_wait_ms: 200\n");
    let (last, _) = Connector::run_to_failure(&config, "refused row", ErrorKind::RejectedRow);
    let record = format!(
        "record topic {} partition 0 offset {} was refused by the database",
        case.topic, landed[50].1
    );
    assert!(
        last.starts_with("idemsink: error: ")
            && last.contains("id_below_50")
            && last.contains(&record),
        "the reason names the first refused record and the constraint: {last}"
    );
    assert!(
        case.rows().await.is_empty(),
        "nothing of the refused batch is committed"
    );
    assert!(case.stored_offsets().await.is_empty(), "no offset moved");
}

/// COPY may not write a table with row-level security: such a table takes the INSERT path
/// for every batch, with the same result.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_with_row_level_security_is_written_by_insert_exactly_once() {
    let case = Case::new(Backend::Postgres, "rls", 2).await;
    for sql in [
        format!("ALTER TABLE {} ENABLE ROW LEVEL SECURITY", case.table),
        format!(
            "CREATE POLICY everything ON {} USING (true) WITH CHECK (true)",
            case.table
        ),
    ] {
        case.exec(&sql).await;
    }
    let producer = case.producer();
    let landed = case.produce_ids(&producer, 0..3000).await;
    let end = case.end_offsets().await;
    let log = case
        .run_until_stored(
            &case.config("batch:\n  max_records: 500\n  max_wait_ms: 50\n"),
            &end,
        )
        .await;
    assert!(
        log.contains("rows_by=\"insert\""),
        "the INSERT path is used; log:\n{log}"
    );
    assert_exactly_once(&case.rows().await, &with_ids(0..3000, landed));
}
