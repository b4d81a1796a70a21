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
    assert_exactly_once, http_get, idemsink, metric_sum, Backend, Case, Connector, TableWrites,
    EXIT, FENCED,
};

const CATCH_UP: Duration = Duration::from_secs(60);

on_both_databases!(
    metrics_and_health_of_a_real_run_match_what_landed,
    offsets_are_listed_with_lag_set_and_reset_and_not_moved_under_a_running_instance,
);

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
