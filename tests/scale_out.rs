//! Several instances of one pipeline in one consumer group, each a separate OS process:
//! instances joining and leaving while records stream, a zombie paused in the middle of a
//! write, and a database slower than `max.poll.interval.ms`.
//!
//! Each runs under the classic group protocol and under KIP-848's consumer protocol, where
//! the broker assigns partitions (always incrementally) and sets the session.
//!
//! Group timings these tests rely on: sessions of 2 s (`common::GROUP_PROPERTIES` under the
//! classic protocol; the development broker's `group.consumer.session.timeout.ms` under the
//! consumer protocol), so a member that stops heartbeating (SIGKILL, SIGSTOP) loses its
//! partitions about 2 s later; librdkafka enforces `max.poll.interval.ms` in the client, so a
//! member that stops polling leaves the group by itself.

#[macro_use]
mod common;

use std::time::Duration;

use common::{
    assert_exactly_once, with_ids, Backend, Case, Connector, GroupProtocol, TableWrites, ASSIGNED,
    EXIT, FENCED,
};
use idemsink::db::DbPool;
use idemsink::testkit::{self, Outgoing};
use serde_json::json;

const JOIN: Duration = Duration::from_secs(30);
const CATCH_UP: Duration = Duration::from_secs(60);

on_both_databases!(
    three_instances_share_8_partitions_while_one_stops_and_one_is_killed,
    three_instances_share_8_partitions_while_one_stops_and_one_is_killed_under_kip848,
    scaling_from_1_to_4_instances_and_back_hands_partitions_over_without_a_conflict,
    scaling_from_1_to_4_instances_and_back_under_kip848,
    a_zombie_paused_mid_write_is_fenced_in_insert_mode,
    a_zombie_paused_mid_write_is_fenced_in_insert_mode_under_kip848,
    a_zombie_paused_mid_write_is_fenced_in_upsert_mode_and_no_older_version_wins,
    a_zombie_frozen_holding_row_locks_is_waited_out_with_warnings_then_fenced,
    a_database_slower_than_max_poll_interval_does_not_cost_the_group_membership,
    a_long_final_write_at_shutdown_still_serves_the_group,
);

async fn three_instances_share_8_partitions_while_one_stops_and_one_is_killed(backend: Backend) {
    three_instances_share_8_partitions(backend, GroupProtocol::Classic).await;
}

async fn three_instances_share_8_partitions_while_one_stops_and_one_is_killed_under_kip848(
    backend: Backend,
) {
    three_instances_share_8_partitions(backend, GroupProtocol::Consumer).await;
}

async fn scaling_from_1_to_4_instances_and_back_hands_partitions_over_without_a_conflict(
    backend: Backend,
) {
    scaling_from_1_to_4_instances_and_back(backend, GroupProtocol::Classic).await;
}

async fn scaling_from_1_to_4_instances_and_back_under_kip848(backend: Backend) {
    scaling_from_1_to_4_instances_and_back(backend, GroupProtocol::Consumer).await;
}

fn assert_clean_exit((status, log): (std::process::ExitStatus, String)) -> String {
    assert!(
        status.success(),
        "SIGTERM must end in a clean exit; log:\n{log}"
    );
    log
}

/// Rebalances were incremental under the consumer protocol (KIP-848 has no eager mode), and
/// eager under the classic protocol's default strategy.
fn assert_protocol(log: &str, protocol: GroupProtocol, incremental_if_classic: bool) {
    let incremental = protocol == GroupProtocol::Consumer || incremental_if_classic;
    let expected = format!("cooperative={incremental}");
    assert!(
        log.contains(&expected),
        "{protocol:?}: rebalances logged {expected}; log:\n{log}"
    );
}

fn assert_wrote(log: &str, who: &str) {
    assert!(
        log.contains("batch committed"),
        "{who} committed no batch: the partitions were not shared; log:\n{log}"
    );
}

/// Three instances start one after another on 8 partitions while 100,000 records stream
/// (eager rebalancing, librdkafka's default, under the classic protocol); the first then
/// leaves with SIGTERM and the second dies by SIGKILL, and the third takes everything over.
async fn three_instances_share_8_partitions(backend: Backend, protocol: GroupProtocol) {
    let case = Case::new(backend, "three", 8).await;
    let config = case
        .pipeline()
        .protocol(protocol)
        .extra("batch:\n  max_records: 1000\n  max_wait_ms: 50\n")
        .write();
    // Chunks of 2,000, 250 ms apart, all along: 100,000 records at least.
    let streamer = case.stream_until_finished(100_000, 2000, Duration::from_millis(250));
    let pause = || tokio::time::sleep(Duration::from_secs(2));

    let a = Connector::start(&config);
    a.wait_assigned(JOIN).await;
    pause().await;
    let b = Connector::start(&config);
    b.wait_assigned(JOIN).await;
    pause().await;
    let c = Connector::start(&config);
    c.wait_assigned(JOIN).await;
    pause().await;
    let a_log = assert_clean_exit(a.stop(EXIT));
    pause().await;
    let b_log = b.log_text();
    b.kill();

    let landed = streamer.finish().await;
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let c_log = assert_clean_exit(c.stop(EXIT));
    assert_exactly_once(
        &case.rows().await,
        &with_ids(0..landed.len() as i64, landed),
    );
    assert_eq!(
        case.stored_offsets().await,
        end,
        "offsets equal the end offsets"
    );
    for (log, who) in [(&a_log, "A"), (&b_log, "B"), (&c_log, "C")] {
        assert_wrote(log, who);
        assert_protocol(log, protocol, false);
    }
    // An eager assignment lists every partition the instance owns; an incremental one only
    // those it gains.
    let assignments: Vec<&str> = c_log.lines().filter(|l| l.contains(ASSIGNED)).collect();
    let looked_at = match protocol {
        GroupProtocol::Classic => &assignments[assignments.len().saturating_sub(1)..],
        GroupProtocol::Consumer => &assignments[..],
    };
    let took_all = (0..8).all(|p| {
        looked_at
            .iter()
            .any(|line| line.contains(&format!("{}/{p}@", case.topic)))
    });
    assert!(
        took_all,
        "C took over all 8 partitions after A left and B died; log:\n{c_log}"
    );
}

/// One instance, then four, then one again, with incremental assign and unassign (the
/// cooperative-sticky strategy under the classic protocol; always under the consumer one)
/// while 60,000 records stream. Every handover drains the batch in flight before the partition
/// moves, so no instance is ever fenced — even when the second instance joins while writes to
/// the table are held for 3 s, so that the first instance's batch is still in flight when its
/// partitions are revoked, and for 3 s after.
async fn scaling_from_1_to_4_instances_and_back(backend: Backend, protocol: GroupProtocol) {
    let case = Case::new(backend, "scale", 8).await;
    let file = case.pipeline().protocol(protocol);
    let file = match protocol {
        GroupProtocol::Classic => {
            file.property("partition.assignment.strategy", "cooperative-sticky")
        }
        GroupProtocol::Consumer => file,
    };
    let config = file
        .extra("batch:\n  max_records: 1000\n  max_wait_ms: 50\n")
        .write();
    // Chunks of 1,000, 250 ms apart, all along: 60,000 records at least.
    let streamer = case.stream_until_finished(60_000, 1000, Duration::from_millis(250));
    let pause = || tokio::time::sleep(Duration::from_secs(1));

    let first = Connector::start(&config);
    first.wait_assigned(JOIN).await;
    let mut added = Vec::new();
    for joined in 0..3 {
        pause().await;
        let held = if joined == 0 {
            Some(TableWrites::hold(&case).await)
        } else {
            None
        };
        let instance = Connector::start(&config);
        if let Some(held) = held {
            // The first instance is asked to give partitions up while its write waits; it
            // must not let them go before that write ends, however long the group waits.
            first.wait_for_log("revoked", 1, JOIN).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            held.release().await;
        }
        instance.wait_assigned(JOIN).await;
        added.push(instance);
    }
    let mut logs = Vec::new();
    while let Some(instance) = added.pop() {
        pause().await;
        logs.push(assert_clean_exit(instance.stop(EXIT)));
    }

    let landed = streamer.finish().await;
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    logs.push(assert_clean_exit(first.stop(EXIT)));
    assert_exactly_once(
        &case.rows().await,
        &with_ids(0..landed.len() as i64, landed),
    );
    assert_eq!(
        case.stored_offsets().await,
        end,
        "offsets equal the end offsets"
    );
    for (i, log) in logs.iter().enumerate() {
        assert_wrote(log, &format!("instance {i}"));
        assert_protocol(log, protocol, true);
        assert!(
            !log.contains(FENCED),
            "a graceful handover fenced a batch: it was not drained; log:\n{log}"
        );
    }
}

/// Writes to the table wait for 12 s, three times `max.poll.interval.ms`, while records
/// keep coming: the instance pauses fetching, goes on polling, and stays in the group.
async fn a_database_slower_than_max_poll_interval_does_not_cost_the_group_membership(
    backend: Backend,
) {
    let case = Case::new(backend, "slow", 2).await;
    let config = case
        .pipeline()
        .property("max.poll.interval.ms", "4000")
        .extra("batch:\n  max_records: 500\n  max_wait_ms: 50\n")
        .write();
    let producer = case.producer();
    let connector = Connector::start(&config);
    connector.wait_assigned(JOIN).await;
    let first = case.produce_ids(&producer, 0..1000).await;
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    let held = TableWrites::hold(&case).await;
    let streamer = case.stream(
        case.record_chunks(1000..6000, 500),
        Duration::from_millis(100),
    );
    tokio::time::sleep(Duration::from_secs(12)).await;
    held.release().await;

    let second = streamer.await.expect("producer task");
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let log = assert_clean_exit(connector.stop(EXIT));
    let landed: Vec<(i32, i64)> = first.into_iter().chain(second).collect();
    assert_exactly_once(&case.rows().await, &with_ids(0..6000, landed));

    let running = log.split("shutdown requested").next().unwrap_or_default();
    assert_eq!(
        running.matches(ASSIGNED).count(),
        1,
        "assigned once and never again; log:\n{log}"
    );
    assert!(
        !running.contains("revoked"),
        "the instance lost its partitions while the database was slow; log:\n{log}"
    );
    assert!(
        running.contains("writer busy: fetching paused"),
        "fetching paused while the writer waited; log:\n{log}"
    );
}

/// A is stopped (SIGTERM) while its last batch cannot be written (the table is locked for
/// 40 s), and B joins meanwhile. A keeps polling the consumer while it writes: it serves the
/// rebalance, hands its partitions on after a third of `max.poll.interval.ms` (10 s), and B is
/// assigned them long before A's 30 s poll interval would have run out. A's last batch then
/// commits or is fenced, and every record lands once.
async fn a_long_final_write_at_shutdown_still_serves_the_group(backend: Backend) {
    let case = Case::new(backend, "final", 2).await;
    let config = |name: &str| {
        case.pipeline()
            .named(name)
            .property("max.poll.interval.ms", "30000")
            .extra("batch:\n  max_records: 500\n  max_wait_ms: 50\n")
            .write()
    };
    let producer = case.producer();
    let a = Connector::start(&config("a"));
    a.wait_assigned(JOIN).await;
    let mut landed = case.produce_ids(&producer, 0..1000).await;
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    let held = TableWrites::hold(&case).await;
    landed.extend(case.produce_ids(&producer, 1000..1500).await);
    tokio::time::sleep(Duration::from_secs(2)).await; // A's writer is waiting on the lock
    a.signal("TERM");
    let b = Connector::start(&config("b"));
    let joined = std::time::Instant::now();
    b.wait_assigned(Duration::from_secs(25)).await;
    let waited = joined.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "B was assigned after {waited:?}: A did not serve the rebalance while writing; A's log:\n{}",
        a.log_text()
    );
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(waited)).await;
    held.release().await;
    assert_clean_exit(a.wait(EXIT));

    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    assert_clean_exit(b.stop(EXIT));
    assert_exactly_once(&case.rows().await, &with_ids(0..1500, landed));
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// The standard table, rows on their Kafka coordinates: wave `n` holds new ids.
    Insert,
    /// Upsert on `order_id` with `newer_by: version`: wave `n` brings version `n` of the
    /// same 500 orders.
    UpsertNewerBy,
}

const ORDERS: i64 = 500;

impl Mode {
    fn wave(self, n: i64, partitions: i32) -> Vec<Outgoing> {
        let parts = i64::from(partitions);
        match self {
            Mode::Insert => (n * 1000..(n + 1) * 1000)
                .map(|id| common::record(id, (id % parts) as i32))
                .collect(),
            Mode::UpsertNewerBy => (0..ORDERS)
                .map(|id| {
                    let value = json!({"id": id, "version": n, "body": format!("v{n} of {id}")});
                    Outgoing::json((id % parts) as i32, &id.to_string(), &value)
                })
                .collect(),
        }
    }

    /// Produces wave `n` to the case's topic; returns where each record landed.
    async fn produce_wave(
        self,
        case: &Case,
        producer: &rdkafka::producer::FutureProducer,
        n: i64,
    ) -> Vec<(i32, i64)> {
        testkit::produce(producer, &case.topic, &self.wave(n, case.partitions))
            .await
            .expect("produce")
    }

    fn sink(self) -> &'static str {
        match self {
            Mode::Insert => common::STANDARD_COLUMNS,
            Mode::UpsertNewerBy => {
                "  mode: upsert\n  key: [order_id]\n  newer_by: version\n  columns:\n    order_id: /id\n    version: /version\n    body: /body\n"
            }
        }
    }
}

async fn a_zombie_paused_mid_write_is_fenced_in_insert_mode(backend: Backend) {
    a_zombie_paused_mid_write_is_fenced(backend, Mode::Insert, GroupProtocol::Classic).await;
}

async fn a_zombie_paused_mid_write_is_fenced_in_insert_mode_under_kip848(backend: Backend) {
    a_zombie_paused_mid_write_is_fenced(backend, Mode::Insert, GroupProtocol::Consumer).await;
}

async fn a_zombie_paused_mid_write_is_fenced_in_upsert_mode_and_no_older_version_wins(
    backend: Backend,
) {
    a_zombie_paused_mid_write_is_fenced(backend, Mode::UpsertNewerBy, GroupProtocol::Classic).await;
}

/// A owns both partitions and is in the middle of writing wave 2 — inside its transaction,
/// before touching a row, held there by a [`Trap`] — when it is frozen with SIGSTOP for longer
/// than its session. B takes the partitions over and commits waves 2 and 3. A is continued:
/// its late batches must be rolled back by the offsets compare-and-set, with one WARN line
/// each, and then both instances carry on with wave 4.
async fn a_zombie_paused_mid_write_is_fenced(
    backend: Backend,
    mode: Mode,
    protocol: GroupProtocol,
) {
    let case = match mode {
        Mode::Insert => Case::new(backend, "zombie", 2).await,
        Mode::UpsertNewerBy => {
            let definition =
                "order_id bigint PRIMARY KEY, version bigint NOT NULL, body varchar(100) NOT NULL";
            Case::with_table(backend, "zombie_up", 2, common::brokers(), definition).await
        }
    };
    let trap = Trap::install(&case).await;
    let batches = "batch:\n  max_records: 300\n  max_wait_ms: 50\n";
    let a_config = case
        .pipeline()
        .protocol(protocol)
        .named("a")
        .url(&trap.zombie_url())
        .sink(&trap.zombie_sink(mode.sink()))
        .extra(batches)
        .write();
    let b_config = case
        .pipeline()
        .protocol(protocol)
        .named("b")
        .sink(mode.sink())
        .extra(batches)
        .write();
    let producer = case.producer();
    let produce = |n: i64| mode.produce_wave(&case, &producer, n);
    let mut landed = Vec::new();

    let a = Connector::start(&a_config);
    a.wait_assigned(JOIN).await;
    landed.extend(produce(1).await);
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    let held = trap.arm().await;
    landed.extend(produce(2).await);
    trap.wait_until_caught().await;
    a.signal("STOP");

    landed.extend(produce(3).await);
    let b = Connector::start(&b_config);
    b.wait_assigned(JOIN).await;
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    a.signal("CONT");
    trap.release(held).await;
    a.wait_for_log(FENCED, 1, JOIN).await;

    landed.extend(produce(4).await);
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let a_log = assert_clean_exit(a.stop(EXIT));
    let b_log = assert_clean_exit(b.stop(EXIT));
    assert_eq!(
        case.stored_offsets().await,
        end,
        "offsets equal the end offsets"
    );
    // One WARN line per late batch: the trapped one, and possibly one more that was waiting
    // for the writer with the other partition's records. Each names its partitions, and no
    // partition is fenced twice: after its first fence it reads from the database again.
    let fences: Vec<&str> = a_log.lines().filter(|l| l.contains(FENCED)).collect();
    assert!(
        !fences.is_empty(),
        "the late batch was fenced; log:\n{a_log}"
    );
    for p in 0..case.partitions {
        let named = format!("{}/{p} (expected", case.topic);
        let times = fences.iter().filter(|l| l.contains(&named)).count();
        assert!(
            times <= 1,
            "partition {p} fenced {times} times; log:\n{a_log}"
        );
    }
    assert!(!b_log.contains(FENCED), "B was never fenced; log:\n{b_log}");
    assert_protocol(&b_log, protocol, false);

    let late = trap.late_writes().await;
    assert!(
        late.is_empty(),
        "the zombie's late batch wrote rows: {late:?}"
    );
    match mode {
        Mode::Insert => {
            assert_exactly_once(&case.rows().await, &with_ids(1000..5000, landed));
        }
        Mode::UpsertNewerBy => {
            let text = match backend {
                Backend::Postgres => "text",
                Backend::MySql => "CHAR",
            };
            let count = |filter: &str| {
                format!(
                    "SELECT CAST(COUNT(*) AS {text}) FROM {} {filter}",
                    case.table
                )
            };
            assert_eq!(
                case.texts(&count("WHERE version = 4")).await,
                case.texts(&count("")).await,
                "every order at its newest version"
            );
            assert_eq!(case.texts(&count("")).await, [ORDERS.to_string()]);
        }
    }
}

/// A owns both partitions and has written the rows of wave 2 inside its transaction, not
/// yet its offsets, when it freezes there (the testkit hold, then SIGSTOP): its session sits
/// idle in the transaction, holding the rows' locks. B takes the partitions over, and its
/// writes of wave 2 wait on those locks: each wait ends after B's `lock_timeout_ms` with a
/// WARN line naming who holds them, `/readyz` says B's writer is stuck, and the database
/// ends A's session after A's `idle_in_transaction_timeout_ms`, which releases the locks. B
/// then commits waves 2 and 3 and is ready again; A, continued, is fenced, and wave 4 lands.
async fn a_zombie_frozen_holding_row_locks_is_waited_out_with_warnings_then_fenced(
    backend: Backend,
) {
    let case = Case::new(backend, "frozen", 2).await;
    let limits = "  lock_timeout_ms: 1000\n  idle_in_transaction_timeout_ms: 20000\n";
    let sink = format!("{}{limits}", common::STANDARD_COLUMNS);
    let batches = "batch:\n  max_records: 300\n  max_wait_ms: 50\n";
    let config = |name: &str| {
        case.pipeline()
            .named(name)
            .sink(&sink)
            .extra(batches)
            .write()
    };
    let (a_config, b_config) = (config("a"), config("b"));
    let hold = tempfile::NamedTempFile::new().expect("hold file");
    let producer = case.producer();
    let produce = |n: i64| Mode::Insert.produce_wave(&case, &producer, n);
    let mut landed = Vec::new();

    std::fs::remove_file(hold.path()).expect("not holding yet");
    let a = Connector::start_with_env(
        &["run", "--config"],
        &a_config,
        &[(testkit::HOLD_TRANSACTION_FILE_ENV, hold.path())],
    );
    a.wait_assigned(JOIN).await;
    landed.extend(produce(1).await);
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;

    std::fs::write(hold.path(), "").expect("hold");
    landed.extend(produce(2).await);
    a.wait_for_log("testkit: holding a batch's transaction open", 1, JOIN)
        .await;
    a.signal("STOP");

    landed.extend(produce(3).await);
    let b = Connector::start(&b_config);
    let address = b.http_address().await;
    b.wait_assigned(JOIN).await;
    b.wait_for_log(LOCK_WAIT_TIMED_OUT, 1, JOIN).await;
    let deadline = std::time::Instant::now() + JOIN;
    loop {
        let (status, body) = common::http_get(&address, "/readyz");
        if status == 503 && body.contains("writer stuck") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never said B's writer was stuck: {status} {body}; log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    case.wait_for_offsets(&case.end_offsets().await, CATCH_UP)
        .await;
    assert_eq!(common::http_get(&address, "/readyz").0, 200, "ready again");

    a.signal("CONT");
    std::fs::remove_file(hold.path()).expect("release");
    a.wait_for_log(FENCED, 1, JOIN).await;
    landed.extend(produce(4).await);
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    assert_clean_exit(a.stop(EXIT));
    let b_log = assert_clean_exit(b.stop(EXIT));
    let warning = b_log
        .lines()
        .find(|l| l.contains(LOCK_WAIT_TIMED_OUT))
        .expect("a WARN line for the lock wait");
    if backend == Backend::Postgres {
        // PostgreSQL shows every session; MySQL only to a user with the PROCESS privilege.
        assert!(
            warning.contains("(idemsink, ") && warning.contains("idle in transaction"),
            "the WARN line names A's session: {warning}"
        );
    }
    assert_eq!(case.stored_offsets().await, end);
    assert_exactly_once(&case.rows().await, &with_ids(1000..5000, landed));
}

const LOCK_WAIT_TIMED_OUT: &str = "a lock wait timed out writing a batch";

/// Holds the zombie in the middle of its write: while armed, a trigger makes the zombie's
/// insert wait on a lock the test holds, before any row is touched, so the zombie holds no
/// lock that its successor needs. It also audits who wrote which row, so the test can show
/// that nothing of the zombie's late batch survived.
///
/// PostgreSQL tells the zombie apart by its `application_name` and holds it on an advisory
/// lock in a statement trigger. MySQL has no per-connection name in the URL: there the first
/// connection caught while armed is recorded as the zombie, and holds on `GET_LOCK`.
struct Trap<'a> {
    case: &'a Case,
}

/// The lock the test holds while the trap is armed, on a connection of its own.
enum Held {
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
    MySql(sqlx::pool::PoolConnection<sqlx::MySql>),
}

impl Trap<'_> {
    async fn install(case: &Case) -> Trap<'_> {
        let t = &case.table;
        let key = Self::advisory_key(case);
        case.exec(&match case.backend {
            Backend::Postgres => format!(
                "CREATE TABLE {t}_audit (who text NOT NULL, body text NOT NULL);
                 CREATE FUNCTION {t}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   INSERT INTO {t}_audit VALUES (current_setting('application_name'), NEW.body);
                   RETURN NULL;
                 END $$;
                 CREATE TRIGGER {t}_audit AFTER INSERT OR UPDATE ON {t}
                   FOR EACH ROW EXECUTE FUNCTION {t}_audit();
                 CREATE FUNCTION {t}_hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   IF current_setting('application_name') = 'zombie' THEN
                     PERFORM pg_advisory_xact_lock_shared({key});
                   END IF;
                   RETURN NULL;
                 END $$;
                 CREATE TRIGGER {t}_hold BEFORE INSERT ON {t}
                   FOR EACH STATEMENT EXECUTE FUNCTION {t}_hold();"
            ),
            Backend::MySql => format!(
                "CREATE TABLE {t}_audit (who bigint NOT NULL, body varchar(100) NOT NULL);
                 CREATE TABLE {t}_zombie (who bigint NOT NULL);
                 CREATE TABLE {t}_armed (armed int NOT NULL);
                 CREATE TRIGGER {t}_audit_insert AFTER INSERT ON {t} FOR EACH ROW
                   INSERT INTO {t}_audit VALUES (CONNECTION_ID(), NEW.body);
                 CREATE TRIGGER {t}_audit_update AFTER UPDATE ON {t} FOR EACH ROW
                   INSERT INTO {t}_audit VALUES (CONNECTION_ID(), NEW.body);
                 CREATE TRIGGER {t}_hold BEFORE INSERT ON {t} FOR EACH ROW
                   IF EXISTS (SELECT 1 FROM {t}_armed)
                      AND (NOT EXISTS (SELECT 1 FROM {t}_zombie)
                           OR CONNECTION_ID() IN (SELECT who FROM {t}_zombie)) THEN
                     DO GET_LOCK('{t}', 120);
                   END IF;"
            ),
        })
        .await;
        Trap { case }
    }

    /// A key of the test's own for PostgreSQL's advisory locks (below 2^31, so that
    /// `pg_locks.objid` shows it as is).
    fn advisory_key(case: &Case) -> i64 {
        let hash = case
            .table
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        i64::from(hash & 0x7fff_ffff)
    }

    /// The zombie's sink section. MySQL's trap tells the zombie by the first connection it
    /// catches, so there the zombie writes through one lane (`writers: 1`); PostgreSQL's trap
    /// catches every connection named `zombie`, each of its lanes.
    fn zombie_sink(&self, sink: &str) -> String {
        match self.case.backend {
            Backend::Postgres => sink.to_string(),
            Backend::MySql => format!("{sink}  writers: 1\n"),
        }
    }

    fn zombie_url(&self) -> String {
        let url = common::database_url(self.case.backend);
        match self.case.backend {
            Backend::Postgres => {
                let separator = if url.contains('?') { '&' } else { '?' };
                format!("{url}{separator}application_name=zombie")
            }
            Backend::MySql => url,
        }
    }

    async fn arm(&self) -> Held {
        let t = &self.case.table;
        match &self.case.pool {
            DbPool::Postgres(pool) => {
                let mut conn = pool.acquire().await.expect("connection");
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(Self::advisory_key(self.case))
                    .execute(&mut *conn)
                    .await
                    .expect("advisory lock");
                Held::Postgres(conn)
            }
            DbPool::MySql(pool) => {
                let mut conn = pool.acquire().await.expect("connection");
                let lock = format!("SELECT GET_LOCK('{t}', 0); INSERT INTO {t}_armed VALUES (1)");
                sqlx::raw_sql(&lock)
                    .execute(&mut *conn)
                    .await
                    .expect("lock");
                Held::MySql(conn)
            }
        }
    }

    /// Waits until the zombie's write waits on the lock; on MySQL, records its connection.
    async fn wait_until_caught(&self) {
        let t = &self.case.table;
        let key = Self::advisory_key(self.case);
        let waiting = match self.case.backend {
            Backend::Postgres => format!(
                "SELECT CAST(l.pid AS text) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                 WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objid = {key} \
                 AND a.application_name = 'zombie'"
            ),
            Backend::MySql => format!(
                "SELECT CAST(ID AS CHAR) FROM information_schema.PROCESSLIST \
                 WHERE STATE = 'User lock' AND INFO LIKE '%{t}%'"
            ),
        };
        let deadline = std::time::Instant::now() + JOIN;
        let zombie = loop {
            // PostgreSQL: any of the zombie's lanes; MySQL: its one connection.
            if let [zombie, ..] = self.case.texts(&waiting).await.as_slice() {
                break zombie.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the zombie's write never reached the table"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if self.case.backend == Backend::MySql {
            self.case
                .exec(&format!("INSERT INTO {t}_zombie VALUES ({zombie})"))
                .await;
        }
    }

    async fn release(&self, held: Held) {
        let t = &self.case.table;
        match held {
            Held::Postgres(mut conn) => {
                sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(Self::advisory_key(self.case))
                    .execute(&mut *conn)
                    .await
                    .expect("advisory unlock");
            }
            Held::MySql(mut conn) => {
                // The trap stays armed (the zombie's trigger holds a read lock on the flag), but only
                // for the zombie, and the lock is free from now on.
                let unlock = format!("DO RELEASE_LOCK('{t}')");
                sqlx::raw_sql(&unlock)
                    .execute(&mut *conn)
                    .await
                    .expect("unlock");
            }
        }
    }

    /// Rows of waves 2 and 3 — the late batch's — that the zombie wrote and committed.
    async fn late_writes(&self) -> Vec<String> {
        let t = &self.case.table;
        let by_zombie = match self.case.backend {
            Backend::Postgres => "who = 'zombie'".to_string(),
            Backend::MySql => format!("who IN (SELECT who FROM {t}_zombie)"),
        };
        // Wave 2 and 3 bodies: `v2 of …`/`v3 of …` (upsert), `record 2xxx`/`record 3xxx` (insert).
        self.case
            .texts(&format!(
                "SELECT body FROM {t}_audit WHERE {by_zombie} AND (body LIKE 'v2 %' OR body LIKE 'v3 %' \
                 OR body LIKE 'record 2___' OR body LIKE 'record 3___')"
            ))
            .await
    }
}
