//! Operating a running deployment, against a real broker and database: the metrics and
//! health endpoints and JSON logs of a real run, and the `offsets` command (list with lag,
//! set and reset, refused while an instance runs unless forced).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use common::{
    assert_exactly_once, http_get, idemsink, metric_sum, with_ids, Backend, Case, Connector,
    TableWrites, EXIT, FENCED,
};

const CATCH_UP: Duration = Duration::from_secs(60);

on_both_databases!(
    metrics_and_health_of_a_real_run_match_what_landed,
    offsets_are_listed_with_lag_set_and_reset_and_not_moved_under_a_running_instance,
    a_forced_rewind_takes_effect_on_a_caught_up_instance_within_seconds,
    a_record_received_just_before_a_reset_is_not_taken_after_it,
    forced_rewinds_of_a_running_instance_under_load_lose_and_double_nothing,
    a_backlog_goes_in_full_batches_and_a_record_after_catching_up_goes_at_once,
);

/// Batches follow the stream: a backlog goes in full batches of `max_records`, and once the
/// consumer has read its partition to the end and the writer waits, a new record is written
/// at once, not `max_wait_ms` (here ten minutes) after it arrived.
async fn a_backlog_goes_in_full_batches_and_a_record_after_catching_up_goes_at_once(
    backend: Backend,
) {
    let case = Case::new(backend, "adaptive", 1).await;
    let producer = case.producer();
    let mut landed = case.produce_ids(&producer, 0..5000).await;
    let config = case.config("batch:\n  max_records: 1000\n  max_wait_ms: 600000\n");
    let mut connector = Connector::start(&config);
    case.wait_while_running(&mut connector, &case.end_offsets().await)
        .await;
    landed.extend(case.produce_ids(&producer, 5000..5001).await);
    // A minute at most, where `max_wait_ms` alone would hold the record for ten.
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "{log}");
    assert_eq!(
        common::logged_counts(&log, "records"),
        [1000, 1000, 1000, 1000, 1000, 1],
        "full batches while lagging, then one of the late record; log:\n{log}"
    );
    assert_exactly_once(&case.rows().await, &with_ids(0..5001, landed));
}

/// A caught-up instance, with nothing more arriving, is rewound by `offsets set --force`:
/// within seconds it notices, reads the partition again from there (changing no row, they are
/// on their coordinates) and stores the end offset again.
async fn a_forced_rewind_takes_effect_on_a_caught_up_instance_within_seconds(backend: Backend) {
    let case = Case::new(backend, "rewind_idle", 2).await;
    let landed = case.produce_ids(&case.producer(), 0..1000).await;
    let config = case.config("batch:\n  max_records: 200\n  max_wait_ms: 20\n");
    let mut connector = Connector::start(&config);
    let end = case.end_offsets().await;
    case.wait_while_running(&mut connector, &end).await;

    let (ok, forced) = set_offset(&case, &config, 0, 100, &["--force"]);
    assert!(ok, "{forced}");
    assert_eq!(case.stored_offsets().await.get(&0), Some(&100));
    let rewound = std::time::Instant::now();
    case.wait_while_running(&mut connector, &end).await;
    assert!(
        rewound.elapsed() < Duration::from_secs(15),
        "the rewind took {:?}",
        rewound.elapsed()
    );
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "{log}");
    assert!(
        log.contains("changed while this instance was idle")
            && log.contains(&format!(
                "{}/0 (expected {}, found 100)",
                case.topic, end[&0]
            )),
        "the rewind is logged:\n{log}"
    );
    assert_exactly_once(&case.rows().await, &with_ids(0..1000, landed));
}

/// The gap after a reset, made deterministic with the testkit hold hook: the consumer loop has
/// taken records 1000..1004 into its open batch and holds record 1005 in hand when the
/// partition is rewound to 500 (`offsets set --force`) and the idle writer resets it. Released,
/// record 1005 must not be taken in the new epoch: the seek to 500 would then re-deliver
/// 500..1005 as already covered, the compare-and-set would move 500 → 1010, and 1000..1004,
/// batched in the old epoch, would never be written, without a word.
async fn a_record_received_just_before_a_reset_is_not_taken_after_it(backend: Backend) {
    let case = Case::new(backend, "rewind_gap", 1).await;
    let config = case.config("batch:\n  max_records: 5000\n  max_wait_ms: 50\n");
    let hold = case.dir.path().join("hold");
    let mut connector = Connector::start_with_env(
        &["run", "--config"],
        &config,
        &[(idemsink::testkit::HOLD_FILE_ENV, hold.as_path())],
    );
    let producer = case.producer();
    let mut landed = case.produce_ids(&producer, 0..1000).await;
    case.wait_while_running(&mut connector, &case.end_offsets().await)
        .await;

    std::fs::write(&hold, "1005").expect("hold file");
    landed.extend(case.produce_ids(&producer, 1000..1010).await);
    connector
        .wait_for_log(
            "testkit: holding a received record",
            1,
            Duration::from_secs(30),
        )
        .await;
    let (ok, forced) = set_offset(&case, &config, 0, 500, &["--force"]);
    assert!(ok, "{forced}");
    connector
        .wait_for_log(
            "changed while this instance was idle",
            1,
            Duration::from_secs(30),
        )
        .await;
    std::fs::remove_file(&hold).expect("release");

    let end = case.end_offsets().await;
    case.wait_while_running(&mut connector, &end).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "{log}");
    assert!(
        log.contains("testkit: released the record offset=1005"),
        "{log}"
    );
    assert_exactly_once(&case.rows().await, &with_ids(0..1010, landed));
}

/// An operator rewinds a running instance again and again (`offsets set --force`, 1,000 to
/// 4,000 offsets back, on a random partition) while 150,000 records stream: every rewind fences
/// or resets the partition, and in the end every record is in the table exactly once and the
/// stored offsets are the end offsets. (Before seeks waited for their epoch, a record fetched
/// before the seek opened a gap that nothing logged.)
async fn forced_rewinds_of_a_running_instance_under_load_lose_and_double_nothing(backend: Backend) {
    use rand::{Rng, SeedableRng};
    let case = Case::new(backend, "rewinds", 4).await;
    let config = case.config("batch:\n  max_records: 2000\n  max_wait_ms: 50\n");
    let mut connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    let streamer = case.stream_until_finished(150_000, 2000, Duration::from_millis(50));
    let seed = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rewinds = 0;
    while rewinds < 20 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..900))).await;
        let p = rng.gen_range(0..case.partitions);
        let Some(stored) = case.stored_offsets().await.get(&p).copied() else {
            continue;
        };
        let to = (stored - rng.gen_range(1000..4000)).max(0);
        let (ok, forced) = set_offset(&case, &config, p, to, &["--force"]);
        assert!(ok, "{forced}");
        rewinds += 1;
        assert!(
            connector.exited().is_none(),
            "seed {seed}: {}",
            connector.log_text()
        );
    }
    let landed = streamer.finish().await;
    eprintln!("seed {seed}: {} records, {rewinds} rewinds", landed.len());
    case.stop_caught_up(connector, landed).await;
}

fn offsets(config: &Path, args: &[&str]) -> (bool, String) {
    let mut all: Vec<&OsStr> = vec!["offsets".as_ref(), args[0].as_ref(), "--config".as_ref()];
    all.push(config.as_os_str());
    all.extend(args[1..].iter().map(|a| OsStr::new(*a)));
    idemsink(&all)
}

/// `offsets set` of one partition of the case's topic, with `extra` arguments (`--force`).
fn set_offset(
    case: &Case,
    config: &Path,
    partition: i32,
    offset: i64,
    extra: &[&str],
) -> (bool, String) {
    let (partition, offset) = (partition.to_string(), offset.to_string());
    let mut args = vec![
        "set",
        "--topic",
        &case.topic,
        "--partition",
        &partition,
        "--offset",
        &offset,
    ];
    args.extend_from_slice(extra);
    offsets(config, &args)
}

async fn offsets_are_listed_with_lag_set_and_reset_and_not_moved_under_a_running_instance(
    backend: Backend,
) {
    let case = Case::new(backend, "offsets", 2).await;
    let producer = case.producer();
    let mut landed = case.produce_ids(&producer, 0..400).await;
    let first_end = case.end_offsets().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second_starts = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    landed.extend(case.produce_ids(&producer, 400..600).await);
    let end = case.end_offsets().await;
    let config = case.config("batch:\n  max_records: 500\n  max_wait_ms: 50\n");

    // Before any run: nothing stored, so no lag is known.
    let (ok, listed) = offsets(&config, &["list"]);
    assert!(ok, "{listed}");
    let row = |p: i32, stored: &str, end: i64, lag: &str| {
        let tp = format!("{}/{p}", case.topic);
        // No transaction: the stable offset is the end offset, and nothing is held.
        let end = end.to_string();
        let fields = [case.name.as_str(), &tp, stored, "0", &end, &end, lag, "0"];
        fields.join(" ")
    };
    let squeeze = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    for p in 0..2 {
        assert!(
            squeeze(&listed).contains(&row(p, "-", end[&p], "-")),
            "partition {p} listed with no stored offset:\n{listed}"
        );
    }

    // After a run up to 300 per partition, the lag is the rest.
    case.run_until_stored(&config, &end).await;
    let (ok, listed) = offsets(&config, &["list"]);
    assert!(ok, "{listed}");
    for p in 0..2 {
        assert!(
            squeeze(&listed).contains(&row(p, &end[&p].to_string(), end[&p], "0")),
            "partition {p} listed as caught up:\n{listed}"
        );
    }

    // While an instance runs, moving offsets is refused and changes nothing.
    let running = Connector::start(&config);
    running.wait_assigned(Duration::from_secs(30)).await;
    let (ok, refused) = set_offset(&case, &config, 0, 100, &[]);
    assert!(!ok, "set must be refused while running:\n{refused}");
    assert!(refused.contains("active member"), "{refused}");
    assert_eq!(case.stored_offsets().await, end);

    // Forced: the running instance is fenced on its next commit and reads again from 100,
    // which changes no row (they are on their coordinates) and loses none.
    let (ok, forced) = set_offset(&case, &config, 0, 100, &["--force"]);
    assert!(ok, "{forced}");
    assert!(
        forced.contains(&format!("{}/0: {} -> 100", case.topic, end[&0])),
        "the change is printed:\n{forced}"
    );
    landed.extend(case.produce_ids(&producer, 600..700).await);
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let (status, log) = running.stop(EXIT);
    assert!(status.success(), "{log}");
    assert!(
        log.contains(FENCED),
        "the running instance was fenced:\n{log}"
    );
    let produced: Vec<(i64, (i32, i64))> = (0..700).zip(landed.iter().copied()).collect();
    assert_exactly_once(&case.rows().await, &produced);

    // Reset by time: where the second wave starts, which is where the first one ended.
    let at = second_starts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (ok, reset) = offsets(&config, &["reset", "--to", &at]);
    assert!(ok, "{reset}");
    assert_eq!(case.stored_offsets().await, first_end, "{reset}");
    for p in 0..2 {
        assert!(
            reset.contains(&format!(
                "{}/{p}: {} -> {}",
                case.topic, end[&p], first_end[&p]
            )),
            "every change is printed:\n{reset}"
        );
    }
    let (ok, reset) = offsets(&config, &["reset", "--to", "earliest"]);
    assert!(ok, "{reset}");
    assert_eq!(
        case.stored_offsets().await,
        end.keys().map(|p| (*p, 0)).collect::<BTreeMap<_, _>>()
    );
    let (ok, reset) = offsets(
        &config,
        &["reset", "--to", "latest", "--topic", &case.topic],
    );
    assert!(ok, "{reset}");
    assert_eq!(case.stored_offsets().await, end);

    // Mistakes are named.
    let (ok, wrong) = set_offset(&case, &config, 7, 1, &[]);
    assert!(
        !ok && wrong.contains("is not a partition of its topics"),
        "{wrong}"
    );
    let (ok, wrong) = offsets(&config, &["reset", "--to", "yesterday"]);
    assert!(!ok && wrong.contains("RFC 3339"), "{wrong}");
}

/// The instance's JSON log lines, each parsed; panics on a line that is not JSON.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect()
}

/// Where the instance serves /metrics, from its log.
async fn http_address(connector: &Connector) -> String {
    connector
        .wait_for_log("serving /metrics", 1, Duration::from_secs(30))
        .await;
    json_lines(&connector.log_text())
        .iter()
        .find(|l| l["fields"]["message"] == "serving /metrics, /healthz and /readyz")
        .and_then(|l| l["fields"]["address"].as_str().map(str::to_string))
        .expect("the listener's address is logged")
}

/// 3,000 records land while `/metrics` is scraped: its counters equal what the table and
/// the log show, `/readyz` turns ready once the group assigned the partitions, the lag
/// gauge shows the records held back while writes wait, and every log line is JSON.
async fn metrics_and_health_of_a_real_run_match_what_landed(backend: Backend) {
    let case = Case::new(backend, "metrics", 2).await;
    let producer = case.producer();
    let config = case.config("batch:\n  max_records: 500\n  max_wait_ms: 50\n");
    let connector = Connector::start_command(&["run", "--log-format", "json", "--config"], &config);
    let address = http_address(&connector).await;
    assert_eq!(http_get(&address, "/healthz"), (200, "ok\n".to_string()));
    connector.wait_assigned(Duration::from_secs(30)).await;
    let (status, body) = http_get(&address, "/readyz");
    assert_eq!(status, 200, "ready once assigned: {body}");

    let mut landed = case.produce_ids(&producer, 0..3000).await;
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;
    let metrics = http_get(&address, "/metrics").1;
    let name = &case.name;
    let value = |metric: &str| {
        metric_sum(&metrics, metric, name).unwrap_or_else(|| panic!("{metric} missing:\n{metrics}"))
    };
    let rows = case.rows().await.len() as f64;
    assert_eq!(rows, 3000.0);
    assert_eq!(
        value("idemsink_records_consumed_total"),
        3000.0,
        "{metrics}"
    );
    assert_eq!(value("idemsink_rows_written_total"), rows, "{metrics}");
    assert_eq!(value("idemsink_rows_updated_total"), 0.0, "{metrics}");
    let committed_lines = connector.log_text().matches("batch committed").count() as f64;
    assert_eq!(
        value("idemsink_batches_committed_total"),
        committed_lines,
        "{metrics}"
    );
    assert_eq!(
        value("idemsink_batch_records_count"),
        committed_lines,
        "{metrics}"
    );
    assert_eq!(value("idemsink_batch_records_sum"), 3000.0, "{metrics}");
    assert_eq!(value("idemsink_assigned_partitions"), 2.0, "{metrics}");
    assert_eq!(value("idemsink_batches_fenced_total"), 0.0);

    // Writes held: the lag gauge (from librdkafka's statistics, every 5 s) shows what waits.
    let held = TableWrites::hold(&case).await;
    landed.extend(case.produce_ids(&producer, 3000..3400).await);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric_sum(
        &http_get(&address, "/metrics").1,
        "idemsink_consumer_lag",
        name,
    ) != Some(400.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "lag never showed the 400 waiting records:\n{}",
            http_get(&address, "/metrics").1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    held.release().await;
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;

    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "{log}");
    json_lines(&log);
    assert_exactly_once(
        &case.rows().await,
        &(0..3400).zip(landed).collect::<Vec<_>>(),
    );

    // A full replay: the counters say nothing was written. PostgreSQL tells the duplicates
    // apart; MySQL reports them like inserts (see RowCounts).
    case.forget_offsets().await;
    let again = Connector::start(&config);
    case.wait_for_offsets(&end, CATCH_UP).await;
    let address = again.http_address().await;
    let metrics = http_get(&address, "/metrics").1;
    assert_eq!(
        metric_sum(&metrics, "idemsink_records_consumed_total", name),
        Some(3400.0)
    );
    assert_eq!(
        metric_sum(&metrics, "idemsink_rows_updated_total", name),
        Some(0.0)
    );
    if backend == Backend::Postgres {
        assert_eq!(
            metric_sum(&metrics, "idemsink_rows_written_total", name),
            Some(0.0),
            "{metrics}"
        );
        assert_eq!(
            metric_sum(&metrics, "idemsink_rows_unchanged_total", name),
            Some(3400.0),
            "{metrics}"
        );
    }
    let (status, log) = again.stop(EXIT);
    assert!(status.success(), "{log}");
}
