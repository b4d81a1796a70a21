//! Transient faults: the database goes away in the middle of a stream — each test has a
//! database server of its own to stop and start — and idemsink waits, stays in the group,
//! catches up, and loses and doubles nothing; past `errors.retry_for_ms` it stops with the
//! reason, and a restart finishes the job. And chaos: SIGKILLs and database restarts at once.

#[macro_use]
mod common;

use std::time::Duration;

use std::sync::Arc;

use common::{
    assert_exactly_once, assert_failed_as, Backend, Case, Connector, ErrorKind, PrivateBroker,
    PrivateDatabase, ASSIGNED,
};
use idemsink::db::DbPool;
use rand::{Rng, SeedableRng};

const CATCH_UP: Duration = Duration::from_secs(60);
const RETRYING: &str = "database unavailable or busy; retrying";

on_both_databases!(
    chaos_200000_records_20_sigkills_and_2_database_restarts_lose_and_double_nothing,
    the_database_down_for_15_s_during_a_stream_costs_nothing_and_not_the_group,
    a_rebalance_during_a_database_outage_waits_for_the_database_instead_of_stopping,
    a_table_altered_while_running_costs_nothing,
    past_its_retry_bound_the_pipeline_stops_with_the_reason_and_a_restart_catches_up,
    the_broker_unreachable_for_10_s_during_a_stream_costs_nothing,
    the_broker_killed_and_restarted_twice_during_a_stream_loses_and_doubles_nothing,
    instances_starting_together_on_a_fresh_database_migrate_it_once,
    sigterm_while_waiting_for_the_database_at_start_up_ends_the_run_at_once,
);

/// PostgreSQL's `statement_timeout` (57014) ends a write that waits on a lock; like MySQL's
/// lock wait timeout it is retried within `errors.retry_for_ms`, not fatal: once the lock is
/// gone, every record lands exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_timeout_is_retried_until_the_lock_goes() {
    let case = Case::new(Backend::Postgres, "stmt_timeout", 1).await;
    let url = format!("{}?options=-c%20statement_timeout%3D300", case.url);
    let config = case
        .pipeline()
        .url(&url)
        .extra("batch:\n  max_records: 100\n  max_wait_ms: 20\nerrors:\n  retry_for_ms: 60000\n")
        .write();
    let held = common::TableWrites::hold(&case).await;
    let landed = case.produce_ids(&case.producer(), 0..300).await;
    let connector = Connector::start(&config);
    connector
        .wait_for_log(RETRYING, 3, Duration::from_secs(30))
        .await;
    assert!(
        connector.log_text().contains("57014")
            || connector.log_text().contains("statement timeout"),
        "the retries were statement timeouts:\n{}",
        connector.log_text()
    );
    held.release().await;
    case.stop_caught_up(connector, landed).await;
}

/// SIGTERM while idemsink still waits for its database at start-up (unreachable, retried for
/// `errors.retry_for_ms`, two minutes here) ends the run at once and cleanly, as a pod deleted
/// during a database outage expects.
async fn sigterm_while_waiting_for_the_database_at_start_up_ends_the_run_at_once(backend: Backend) {
    let case = Case::new(backend, "startwait", 1).await;
    let port = common::free_port();
    let nowhere = match backend {
        Backend::Postgres => format!("postgres://postgres@127.0.0.1:{port}/idemsink"),
        Backend::MySql => format!("mysql://idemsink:idemsink@127.0.0.1:{port}/idemsink"),
    };
    let config = case
        .pipeline()
        .url(&nowhere)
        .extra("errors:\n  retry_for_ms: 120000\n")
        .write();
    let connector = Connector::start(&config);
    connector
        .wait_for_log(RETRYING, 1, Duration::from_secs(30))
        .await;
    let asked = std::time::Instant::now();
    let (status, log) = connector.stop(Duration::from_secs(20));
    assert!(status.success(), "a clean exit; log:\n{log}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "it took {:?}; log:\n{log}",
        asked.elapsed()
    );
    assert!(
        log.contains("shutdown requested while waiting for the database"),
        "{log}"
    );
}

/// The log up to the shutdown request: what happened while running.
fn while_running(log: &str) -> &str {
    log.split("shutdown requested").next().unwrap_or_default()
}

/// Eight instances start at once on a database that has never seen idemsink: each runs the
/// migrations, one after another under a lock, and all of them start. (sqlx's own lock is a
/// no-op on MariaDB, whose GET_LOCK does not wait with a negative timeout.)
async fn instances_starting_together_on_a_fresh_database_migrate_it_once(backend: Backend) {
    let db = PrivateDatabase::start(backend);
    let starts: Vec<_> = (0..8)
        .map(|_| {
            let url = db.url();
            tokio::spawn(async move {
                let pool = DbPool::connect(&url, 2).await.map_err(|e| e.to_string())?;
                pool.migrate().await.map_err(|e| e.to_string())
            })
        })
        .collect();
    for start in starts {
        let migrated = start.await.expect("task");
        assert_eq!(migrated, Ok(()), "every instance migrates or finds it done");
    }
    let pool = DbPool::connect(&db.url(), 1).await.expect("connect");
    let applied = on_pool!(&pool, |p| sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM _sqlx_migrations WHERE success"
    )
    .fetch_one(p)
    .await);
    assert_eq!(
        applied.expect("count"),
        2,
        "each migration applied once, completely"
    );
}

/// The broker freezes (SIGSTOP: connections stay open and nothing answers, as with a network
/// partition) for 10 s while records stream in; idemsink keeps running, and once the broker
/// is back every record lands exactly once.
async fn the_broker_unreachable_for_10_s_during_a_stream_costs_nothing(backend: Backend) {
    let broker = PrivateBroker::start();
    let case = Case::on_broker(backend, "brokerdown", 4, broker.address()).await;
    let config = case.config("batch:\n  max_records: 500\n  max_wait_ms: 50\n");
    let mut connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    let streamer = case.stream(
        case.record_chunks(0..20_000, 1000),
        Duration::from_millis(300),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.signal("STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        connector.exited().is_none(),
        "idemsink keeps running while the broker is unreachable; log:\n{}",
        connector.log_text()
    );
    let stored: i64 = case.stored_offsets().await.values().sum();
    assert!(
        stored < 20_000,
        "the broker froze in the middle of the stream ({stored} stored)"
    );
    broker.signal("CONT");
    let landed = streamer.await.expect("producer task");
    assert_eq!(landed.len(), 20_000);
    case.stop_caught_up(connector, landed).await;
}

/// The broker crashes (SIGKILL) twice in the middle of a 200,000-record stream and comes back
/// on its own storage each time (a JVM start takes seconds): idemsink never exits, and every
/// record lands exactly once with the stored offsets at the end offsets.
async fn the_broker_killed_and_restarted_twice_during_a_stream_loses_and_doubles_nothing(
    backend: Backend,
) {
    let broker = PrivateBroker::start();
    let case = Case::on_broker(backend, "brokerkill", 4, broker.address()).await;
    let config = case.config(
        "batch:
  max_records: 2000
  max_wait_ms: 50
",
    );
    let mut connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    let streamer = case.stream(
        case.record_chunks(0..200_000, 2000),
        Duration::from_millis(100),
    );
    for kill in 1..=2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stored: i64 = case.stored_offsets().await.values().sum();
        assert!(
            stored < 200_000,
            "kill {kill} comes in the middle of the stream ({stored} stored)"
        );
        broker.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        broker.start_again();
        assert!(
            connector.exited().is_none(),
            "idemsink keeps running through broker crash {kill}; log:\n{}",
            connector.log_text()
        );
    }
    let landed = streamer.await.expect("producer task");
    assert_eq!(landed.len(), 200_000);
    case.stop_caught_up(connector, landed).await;
}

async fn the_database_down_for_15_s_during_a_stream_costs_nothing_and_not_the_group(
    backend: Backend,
) {
    let db = PrivateDatabase::start(backend);
    let case = Case::in_database(backend, "dbdown", 4, db.url()).await;
    let config = case
        .config("batch:\n  max_records: 500\n  max_wait_ms: 50\nerrors:\n  retry_for_ms: 120000\n");
    let connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    // 1,000 records every 200 ms, 30,000 at least, and on until the database is back.
    let streamer = case.stream_until_finished(30_000, 1000, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    db.stop();
    tokio::time::sleep(Duration::from_secs(15)).await;
    db.start_again();

    let landed = streamer.finish().await;
    let log = case.stop_caught_up(connector, landed).await;
    let running = while_running(&log);
    assert!(
        running.contains(RETRYING),
        "it waited for the database:\n{log}"
    );
    assert_eq!(
        running.matches(ASSIGNED).count(),
        1,
        "assigned once, never kicked out of the group:\n{log}"
    );
    assert!(!running.contains("revoked"), "{log}");
    assert!(
        running.contains("writer busy: fetching paused"),
        "fetching paused meanwhile:\n{log}"
    );
}

/// A and B share four partitions while records stream. The database goes down, and B is
/// killed: A is assigned B's partitions (eagerly, all four again), whose stored offsets it
/// cannot read. A rebalance waits at most a third of `max.poll.interval.ms` (here 3 s), but
/// the outage lasts 12 s more: the partitions are assigned and wait, paused, and A goes on
/// once the database is back, within `errors.retry_for_ms`. Every record lands exactly once.
async fn a_rebalance_during_a_database_outage_waits_for_the_database_instead_of_stopping(
    backend: Backend,
) {
    let db = PrivateDatabase::start(backend);
    let case = Case::in_database(backend, "rebalance_dbdown", 4, db.url()).await;
    let config = |name: &str| {
        case.pipeline()
            .named(name)
            .property("max.poll.interval.ms", "9000")
            .extra(
                "batch:\n  max_records: 500\n  max_wait_ms: 50\nerrors:\n  retry_for_ms: 120000\n",
            )
            .write()
    };
    let a = Connector::start(&config("a"));
    a.wait_assigned(Duration::from_secs(30)).await;
    let b = Connector::start(&config("b"));
    b.wait_assigned(Duration::from_secs(30)).await;
    a.wait_for_log(ASSIGNED, 2, Duration::from_secs(30)).await;
    let streamer = case.stream_until_finished(20_000, 1000, Duration::from_millis(200));
    tokio::time::sleep(Duration::from_secs(2)).await;

    db.stop();
    b.kill();
    a.wait_for_log(ASSIGNED_UNLOADED, 1, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    db.start_again();
    a.wait_for_log(DATABASE_ANSWERED, 1, Duration::from_secs(30))
        .await;

    let landed = streamer.finish().await;
    let log = case.stop_caught_up(a, landed).await;
    assert!(
        !log.contains("cannot read stored offsets"),
        "the rebalance waited for the database:\n{log}"
    );
}

/// The table is altered while idemsink runs — a column widened, one added — between two
/// waves of records. Statements idemsink prepared before (sqlx caches them) go on working:
/// none returns the table's columns, so no cached plan changes its result type (0A000 on
/// PostgreSQL), and every record lands once.
async fn a_table_altered_while_running_costs_nothing(backend: Backend) {
    let case = Case::new(backend, "altered", 2).await;
    let config = case.config("batch:\n  max_records: 100\n  max_wait_ms: 20\n");
    let producer = case.producer();
    let connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    let mut landed = case.produce_ids(&producer, 0..500).await;
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;
    let t = &case.table;
    case.exec(&match backend {
        Backend::Postgres => format!(
            "ALTER TABLE {t} ALTER COLUMN body TYPE varchar(100); ALTER TABLE {t} ADD COLUMN note text"
        ),
        Backend::MySql => format!(
            "ALTER TABLE {t} MODIFY body varchar(100) NOT NULL; ALTER TABLE {t} ADD COLUMN note text"
        ),
    })
    .await;
    landed.extend(case.produce_ids(&producer, 500..1000).await);
    let log = case.stop_caught_up(connector, landed).await;
    assert!(!log.contains("ERROR"), "{log}");
}

const ASSIGNED_UNLOADED: &str = "assigned, but the stored offsets cannot be read now";
const DATABASE_ANSWERED: &str = "the database answered; starting from offsets stored";

async fn past_its_retry_bound_the_pipeline_stops_with_the_reason_and_a_restart_catches_up(
    backend: Backend,
) {
    let db = PrivateDatabase::start(backend);
    let case = Case::in_database(backend, "dbgone", 2, db.url()).await;
    let config = case
        .config("batch:\n  max_records: 500\n  max_wait_ms: 50\nerrors:\n  retry_for_ms: 12000\n");
    let producer = case.producer();
    let mut landed = case.produce_ids(&producer, 0..1000).await;
    let connector = Connector::start(&config);
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    db.stop();
    landed.extend(case.produce_ids(&producer, 1000..2000).await);
    let (status, log) = connector.wait(Duration::from_secs(60));
    assert_failed_as(
        status,
        ErrorKind::Transient,
        &format!("it must give up:\n{log}"),
    );
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("idemsink: error: ")
            && last.contains("database")
            && last.contains(&case.name),
        "the last line says which pipeline and why:\n{log}"
    );
    assert!(log.contains(RETRYING), "{log}");

    db.start_again();
    let end = case.end_offsets().await;
    let log = case.run_until_stored(&config, &end).await;
    assert_exactly_once(
        &case.rows().await,
        &(0..2000).zip(landed).collect::<Vec<_>>(),
    );
    assert!(!log.contains(RETRYING), "{log}");
}

/// 200,000 records stream in while the connector is killed with SIGKILL 20 times at random
/// moments (the seed is printed) and the database is restarted twice in the middle.
async fn chaos_200000_records_20_sigkills_and_2_database_restarts_lose_and_double_nothing(
    backend: Backend,
) {
    let db = Arc::new(PrivateDatabase::start(backend));
    let case = Case::in_database(backend, "chaos", 4, db.url()).await;
    let config = case.config("batch:\n  max_records: 2000\n  max_wait_ms: 50\n");
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("chaos seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // Two restarts of 2 s, at random moments 3–6 s and 9–15 s into the kills.
    let restarts = {
        let db = db.clone();
        let started = tokio::time::Instant::now();
        let first = Duration::from_millis(rng.gen_range(3000..6000));
        let second = first + Duration::from_millis(rng.gen_range(6000..9000));
        tokio::spawn(async move {
            for at in [first, second] {
                tokio::time::sleep_until(started + at).await;
                let db = db.clone();
                tokio::task::spawn_blocking(move || {
                    db.stop();
                    std::thread::sleep(Duration::from_secs(2));
                    db.start_again();
                })
                .await
                .expect("restart");
                eprintln!("database restarted at {at:?}");
            }
        })
    };
    // 50 chunks of 4,000, 200 ms apart, while 20 kills come 300 to 1,500 ms apart.
    let chunks = case.record_chunks(0..200_000, 4000);
    let (connector, landed) = case
        .stream_while_killing(&config, chunks, 20, 300..1500, &mut rng)
        .await;
    restarts.await.expect("restarts");
    assert_eq!(landed.len(), 200_000);
    case.stop_caught_up(connector, landed).await;
}
