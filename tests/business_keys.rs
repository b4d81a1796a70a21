//! Business keys against real databases (each test runs on PostgreSQL and on MariaDB):
//! upsert and insert on a key, `newer_by`, tombstones, several versions of a key in one
//! batch, and SIGKILL restarts — each compared with applying every record once, in order.
//!
//! An audit trigger on each table records every change of a row, so the tests see not only
//! the final state but that no older version ever replaced a newer one on the way.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Backend, Case, Connector, EXIT};
use idemsink::testkit::{self, Outgoing};
use rand::{Rng, SeedableRng};

const CATCH_UP: Duration = Duration::from_secs(120);

/// One record about an order: a new version of it, or its tombstone.
#[derive(Debug, Clone)]
struct Event {
    order_id: i64,
    version: i64,
    /// Unique per event, so the tests can tell which of two equal versions was kept.
    status: String,
    tombstone: bool,
}

fn event(order_id: i64, version: i64, seq: usize) -> Event {
    Event {
        order_id,
        version,
        status: format!("v{version}#{seq}"),
        tombstone: false,
    }
}

fn tombstone(order_id: i64) -> Event {
    Event {
        order_id,
        version: 0,
        status: String::new(),
        tombstone: true,
    }
}

/// How a key's versions combine.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    /// mode insert + key: the first write wins.
    FirstWins,
    /// mode upsert: each record replaces the row.
    LastWins,
    /// mode upsert + newer_by: a greater version replaces the row.
    NewerBy,
}

impl Rule {
    fn sink(self, delete_on_null: bool) -> String {
        let (mode, newer_by) = match self {
            Rule::FirstWins => ("insert", ""),
            Rule::LastWins => ("upsert", ""),
            Rule::NewerBy => ("upsert", "  newer_by: version\n"),
        };
        format!(
            "  mode: {mode}
  key: [order_id]
{newer_by}  delete_on_null: {delete_on_null}
  columns:
    order_id: $key
    version: /version
    status: /status
    kafka_partition: $partition
    kafka_offset: $offset
"
        )
    }
}

/// The table after applying `events` one by one, in order: order_id → (version, status).
fn apply_in_order(events: &[Event], rule: Rule) -> BTreeMap<i64, (i64, String)> {
    let mut table = BTreeMap::new();
    for e in events {
        if e.tombstone {
            table.remove(&e.order_id);
            continue;
        }
        let replace = match (rule, table.get(&e.order_id)) {
            (_, None) => true,
            (Rule::FirstWins, Some(_)) => false,
            (Rule::LastWins, Some(_)) => true,
            (Rule::NewerBy, Some((stored, _))) => e.version > *stored,
        };
        if replace {
            table.insert(e.order_id, (e.version, e.status.clone()));
        }
    }
    table
}

/// A case with the orders table and its audit trigger.
async fn orders_case(backend: Backend, prefix: &str, partitions: i32) -> Case {
    let case = Case::with_table(
        backend,
        prefix,
        partitions,
        common::brokers(),
        "order_id bigint NOT NULL PRIMARY KEY,
         version bigint NOT NULL,
         status varchar(40) NOT NULL,
         kafka_partition integer,
         kafka_offset bigint",
    )
    .await;
    let t = &case.table;
    case.exec(&format!(
        "CREATE TABLE {t}_audit (order_id bigint, old_version bigint, new_version bigint, \
         old_offset bigint, new_offset bigint)"
    ))
    .await;
    match backend {
        Backend::Postgres => {
            case.exec(&format!(
                "CREATE FUNCTION {t}_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                   IF (OLD.version, OLD.status, OLD.kafka_offset) IS DISTINCT FROM
                      (NEW.version, NEW.status, NEW.kafka_offset) THEN
                     INSERT INTO {t}_audit VALUES
                       (NEW.order_id, OLD.version, NEW.version, OLD.kafka_offset, NEW.kafka_offset);
                   END IF;
                   RETURN NEW;
                 END $$"
            ))
            .await;
            case.exec(&format!(
                "CREATE TRIGGER {t}_audit AFTER UPDATE ON {t} FOR EACH ROW EXECUTE FUNCTION {t}_audit()"
            ))
            .await;
        }
        Backend::MySql => {
            case.exec(&format!(
                "CREATE TRIGGER {t}_audit AFTER UPDATE ON {t} FOR EACH ROW
                   IF NOT (OLD.version <=> NEW.version AND OLD.status <=> NEW.status
                           AND OLD.kafka_offset <=> NEW.kafka_offset) THEN
                     INSERT INTO {t}_audit VALUES
                       (NEW.order_id, OLD.version, NEW.version, OLD.kafka_offset, NEW.kafka_offset);
                   END IF"
            ))
            .await;
        }
    }
    case
}

/// The events as records keyed by order id, each key always in the same partition (as
/// Kafka's default partitioner does).
fn records(events: &[Event], partitions: i32) -> Vec<Outgoing> {
    events
        .iter()
        .map(|e| {
            let partition = (e.order_id % partitions as i64) as i32;
            let key = e.order_id.to_string();
            if e.tombstone {
                Outgoing {
                    partition,
                    key: Some(key.into_bytes()),
                    value: None,
                }
            } else {
                let value = serde_json::json!({
                    "order_id": e.order_id, "version": e.version, "status": e.status
                });
                Outgoing::json(partition, &key, &value)
            }
        })
        .collect()
}

/// Produces the events; returns where each landed.
/// Produces the events; returns Kafka's end offsets after them.
async fn produce(case: &Case, events: &[Event]) -> BTreeMap<i32, i64> {
    testkit::produce(
        &case.producer(),
        &case.topic,
        &records(events, case.partitions),
    )
    .await
    .expect("produce");
    case.end_offsets().await
}

async fn table_state(case: &Case) -> BTreeMap<i64, (i64, String)> {
    table_state_by(case, "order_id").await
}

/// The same, with the order id read by `key` (an SQL expression on the table's key).
async fn table_state_by(case: &Case, key: &str) -> BTreeMap<i64, (i64, String)> {
    let sql = format!("SELECT {key}, version, status FROM {}", case.table);
    let rows: Vec<(i64, i64, String)> =
        on_pool!(&case.pool, |p| sqlx::query_as(&sql).fetch_all(p).await).expect("read rows");
    rows.into_iter().map(|(k, v, s)| (k, (v, s))).collect()
}

/// Every change the audit trigger saw: (order_id, old version, new version, old offset,
/// new offset).
async fn audit(case: &Case) -> Vec<(i64, i64, i64, i64, i64)> {
    let sql = format!(
        "SELECT order_id, old_version, new_version, old_offset, new_offset FROM {}_audit",
        case.table
    );
    on_pool!(&case.pool, |p| sqlx::query_as(&sql).fetch_all(p).await).expect("read audit")
}

/// Every update moved a row forward: to a later record of its partition (and, with
/// `newer_by`, to a greater version).
fn assert_never_older_over_newer(changes: &[(i64, i64, i64, i64, i64)], rule: Rule) {
    for (order_id, old_version, new_version, old_offset, new_offset) in changes {
        assert!(
            new_offset > old_offset,
            "order {order_id}: offset {new_offset} replaced the later {old_offset}"
        );
        if rule == Rule::NewerBy {
            assert!(
                new_version > old_version,
                "order {order_id}: version {new_version} replaced {old_version}"
            );
        }
    }
}

on_both_databases!(
    duplicate_business_keys_keep_the_newest_in_upsert_and_the_first_in_insert_and_replays_change_nothing,
    a_batch_holding_a_key_several_times_equals_one_by_one_application,
    a_batch_holding_a_key_in_several_spellings_the_database_finds_equal_equals_one_by_one_application,
    an_older_version_arriving_after_a_newer_one_changes_nothing,
    tombstones_delete_and_a_reinsert_after_a_tombstone_leaves_the_row,
    sigkill_restarts_in_upsert_mode_end_in_the_state_of_applying_every_record_once_in_order,
);

/// 300 orders, 4 versions each, every third record sent twice by a "restarting producer"
/// (same content, new offset).
fn versions_with_resends() -> Vec<Event> {
    let mut events = Vec::new();
    for version in 1..=4 {
        for order_id in 0..300 {
            let e = event(order_id, version, events.len());
            if events.len() % 3 == 0 {
                events.push(e.clone());
            }
            events.push(e);
        }
    }
    events
}

async fn duplicate_business_keys_keep_the_newest_in_upsert_and_the_first_in_insert_and_replays_change_nothing(
    backend: Backend,
) {
    let events = versions_with_resends();
    for rule in [Rule::LastWins, Rule::NewerBy, Rule::FirstWins] {
        let case = orders_case(backend, "dupkey", 3).await;
        let end = produce(&case, &events).await;
        let config = case.config_with(
            &rule.sink(false),
            "batch:\n  max_records: 250\n  max_wait_ms: 50\n",
        );
        case.run_until_stored(&config, &end).await;
        let state = table_state(&case).await;
        assert_eq!(state.len(), 300, "{rule:?}: one row per key");
        assert_eq!(state, apply_in_order(&events, rule), "{rule:?}");
        let expected_version = if rule == Rule::FirstWins { 1 } else { 4 };
        assert!(
            state.values().all(|(v, _)| *v == expected_version),
            "{rule:?}"
        );
        assert_never_older_over_newer(&audit(&case).await, rule);

        // A full replay (offsets deleted) changes no row, not even for a moment.
        let changes_before = audit(&case).await.len();
        let columns = [
            "order_id",
            "version",
            "status",
            "kafka_partition",
            "kafka_offset",
        ];
        let before = case.snapshot_by(&columns, "order_id").await.0;
        case.forget_offsets().await;
        case.run_until_stored(&config, &end).await;
        assert_eq!(
            case.snapshot_by(&columns, "order_id").await.0,
            before,
            "{rule:?}"
        );
        assert_eq!(
            audit(&case).await.len(),
            changes_before,
            "{rule:?}: the replay updated rows"
        );
    }
}

/// 20 keys, 600 records: versions shuffled (ties included), tombstones here and there; with
/// the seed, which the test prints.
fn shuffled_events() -> (Vec<Event>, rand::rngs::StdRng, u64) {
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    for seq in 0..600 {
        let order_id = rng.gen_range(0..20);
        if rng.gen_ratio(1, 12) {
            events.push(tombstone(order_id));
        } else {
            events.push(event(order_id, rng.gen_range(1..30), seq));
        }
    }
    (events, rng, seed)
}

/// Runs `rule` over everything already in the case's topic, in batches that hold hundreds of
/// records (asserted), until the end offsets are stored.
async fn run_in_large_batches(case: &Case, rule: Rule) {
    let end = case.end_offsets().await;
    let config = case.config_with(
        &rule.sink(true),
        "batch:\n  max_records: 100000\n  max_wait_ms: 1000\n",
    );
    let log = case.run_until_stored(&config, &end).await;
    let records: Vec<u64> = common::logged_counts(&log, "records");
    assert!(
        records.iter().any(|n| *n >= 100),
        "{rule:?}: batches should hold a key many times: {records:?}"
    );
}

async fn a_batch_holding_a_key_several_times_equals_one_by_one_application(backend: Backend) {
    let (events, _, seed) = shuffled_events();
    for rule in [Rule::LastWins, Rule::NewerBy, Rule::FirstWins] {
        let case = orders_case(backend, "batchkey", 1).await;
        produce(&case, &events).await;
        run_in_large_batches(&case, rule).await;
        assert_eq!(
            table_state(&case).await,
            apply_in_order(&events, rule),
            "{rule:?} (seed {seed})"
        );
    }
}

/// A key the database compares loosely: its column, an index of its own if the column's
/// type and collation are not the unique key's, how the test reads the key's number back,
/// and four spellings of a number that the database finds equal.
struct Spelled {
    what: &'static str,
    column: &'static str,
    /// `CREATE UNIQUE INDEX … ON TABLE (…)`, with `TABLE` for the table; none: the column is
    /// the primary key.
    index: Option<&'static str>,
    read_key: &'static str,
    spell: fn(i64, usize) -> Vec<u8>,
}

/// The key domains of each database: PostgreSQL `numeric` (`7`, `7.0`, `7.00`, ` 7`), and a
/// `text` column whose unique index has a case-insensitive collation of its own (the
/// column's is deterministic); MariaDB `utf8mb4_general_ci` (case, trailing spaces),
/// `utf8mb4_unicode_ci` (a trailing no-break space is padding too), `DATETIME(2)` (digits
/// past the column's precision) and `BINARY(3)` (trailing zero bytes).
fn spelled_domains(backend: Backend) -> Vec<Spelled> {
    match backend {
        Backend::Postgres => vec![
            Spelled {
                what: "numeric",
                column: "order_id numeric(12, 2) NOT NULL PRIMARY KEY",
                index: None,
                read_key: "CAST(order_id AS bigint)",
                spell: |id, s| [format!("{id}"), format!("{id}.0"), format!("{id}.00"), format!(" {id}")][s].clone().into_bytes(),
            },
            Spelled {
                what: "an index collation of its own",
                column: "order_id text NOT NULL",
                index: Some("CREATE UNIQUE INDEX ON TABLE (order_id COLLATE idemsink_test_ci)"),
                read_key: "CAST(substr(order_id, 2) AS bigint)",
                spell: |id, s| [format!("k{id}"), format!("K{id}"), format!("k{id}"), format!("K{id}")][s].clone().into_bytes(),
            },
        ],
        Backend::MySql => vec![
            Spelled {
                what: "utf8mb4_general_ci",
                column: "order_id varchar(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci NOT NULL PRIMARY KEY",
                index: None,
                read_key: "CAST(SUBSTRING(TRIM(order_id), 2) AS SIGNED)",
                spell: |id, s| [format!("k{id}"), format!("K{id}"), format!("k{id} "), format!("K{id}  ")][s].clone().into_bytes(),
            },
            Spelled {
                what: "utf8mb4_unicode_ci",
                column: "order_id varchar(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci NOT NULL PRIMARY KEY",
                index: None,
                read_key: "CAST(SUBSTRING(order_id, 2, 2) AS SIGNED)",
                spell: |id, s| [format!("k{id:02}"), format!("K{id:02}\u{a0}"), format!("k{id:02} "), format!("K{id:02}\u{a0} ")][s].clone().into_bytes(),
            },
            Spelled {
                what: "DATETIME(2)",
                column: "order_id datetime(2) NOT NULL PRIMARY KEY",
                index: None,
                read_key: "CAST(SECOND(order_id) AS SIGNED)",
                spell: |id, s| format!("2026-12-07 10:00:{id:02}.12{}", ["", "0", "34", "99"][s]).into_bytes(),
            },
            Spelled {
                what: "BINARY(3)",
                column: "order_id binary(3) NOT NULL PRIMARY KEY",
                index: None,
                read_key: "CAST(ORD(order_id) - 1 AS SIGNED)",
                spell: |id, s| {
                    let mut key = vec![id as u8 + 1];
                    key.extend(std::iter::repeat_n(0u8, s.min(2)));
                    key
                },
            },
        ],
    }
}

/// The same with keys the database compares loosely ([`spelled_domains`]), each record
/// spelling its key one of four ways the database finds equal. The batch's reduction must
/// agree with the unique key's equality: compared as text, a tombstone of `K7` would run
/// before the write of `k7` it follows, or — on PostgreSQL — one statement would update a row
/// twice (error 21000), and on MariaDB a delete would miss the row a write of another
/// spelling left.
async fn a_batch_holding_a_key_in_several_spellings_the_database_finds_equal_equals_one_by_one_application(
    backend: Backend,
) {
    let (events, mut rng, seed) = shuffled_events();
    let spellings: Vec<usize> = events.iter().map(|_| rng.gen_range(0..4)).collect();
    for domain in spelled_domains(backend) {
        let records: Vec<Outgoing> = events
            .iter()
            .zip(&spellings)
            .map(|(e, spelling)| {
                let value = (!e.tombstone).then(|| {
                    serde_json::json!({"version": e.version, "status": e.status})
                        .to_string()
                        .into_bytes()
                });
                Outgoing {
                    partition: 0,
                    key: Some((domain.spell)(e.order_id, *spelling)),
                    value,
                }
            })
            .collect();
        for rule in [Rule::LastWins, Rule::NewerBy, Rule::FirstWins] {
            let case = Case::with_table(
                backend,
                "spelled",
                1,
                common::brokers(),
                &format!(
                    "{}, version bigint NOT NULL, status varchar(40) NOT NULL, \
                     kafka_partition integer, kafka_offset bigint",
                    domain.column
                ),
            )
            .await;
            if let Some(index) = domain.index {
                case.exec(
                    "DO $$ BEGIN CREATE COLLATION idemsink_test_ci (provider = icu, \
                     locale = 'und-u-ks-level2', deterministic = false); \
                     EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                )
                .await;
                case.exec(&index.replace("TABLE", &case.table)).await;
            }
            testkit::produce(&case.producer(), &case.topic, &records)
                .await
                .expect("produce");
            run_in_large_batches(&case, rule).await;
            assert_eq!(
                table_state_by(&case, domain.read_key).await,
                apply_in_order(&events, rule),
                "{} {rule:?} (seed {seed})",
                domain.what
            );
        }
    }
}

/// A key PostgreSQL cannot even cast (`1e1000000` is past `numeric`'s range) in a batch
/// with keys it finds equal (`1`, `1.0`): the batch's keys cannot be grouped by the database,
/// so two rows of one key meet in one statement (21000). That is isolated like a refused row:
/// the uncastable key goes to the dead-letter table, and the others land as one-by-one
/// application leaves them — never a stop on every restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_the_database_cannot_cast_beside_equal_keys_is_a_dead_letter_not_a_stop() {
    let case = Case::with_table(
        Backend::Postgres,
        "uncastable",
        1,
        common::brokers(),
        "order_id numeric NOT NULL PRIMARY KEY, version bigint NOT NULL, \
         status varchar(40) NOT NULL, kafka_partition integer, kafka_offset bigint",
    )
    .await;
    let record = |key: &str, version: i64| Outgoing {
        partition: 0,
        key: Some(key.as_bytes().to_vec()),
        value: Some(
            serde_json::json!({"version": version, "status": format!("{key} v{version}")})
                .to_string()
                .into_bytes(),
        ),
    };
    let records = [
        record("1", 1),
        record("1.0", 2),
        record("1e1000000", 3),
        record("2", 4),
    ];
    testkit::produce(&case.producer(), &case.topic, &records)
        .await
        .expect("produce");
    let end = case.end_offsets().await;
    let config = case.config_with(
        &Rule::LastWins.sink(false),
        "batch:\n  max_records: 100\n  max_wait_ms: 1000\nerrors:\n  tolerance: all\n",
    );
    case.run_until_stored(&config, &end).await;
    let state = table_state_by(&case, "CAST(order_id AS bigint)").await;
    let expected = BTreeMap::from([(1, (2, "1.0 v2".to_string())), (2, (4, "2 v4".to_string()))]);
    assert_eq!(state, expected);
    let letters = case
        .texts(&format!(
            "SELECT \"offset\"::text FROM idemsink_dead_letters WHERE pipeline = '{}'",
            case.name
        ))
        .await;
    assert_eq!(letters, ["2"], "the uncastable key's record");
}

async fn an_older_version_arriving_after_a_newer_one_changes_nothing(backend: Backend) {
    let case = orders_case(backend, "older", 2).await;
    let config = case.config_with(&Rule::NewerBy.sink(false), "");
    let connector = Connector::start(&config);
    let newer: Vec<Event> = (0..50).map(|id| event(id, 5, id as usize)).collect();
    case.wait_for_offsets(&produce(&case, &newer).await, CATCH_UP)
        .await;
    let older: Vec<Event> = (0..50).map(|id| event(id, 3, 100 + id as usize)).collect();
    let newest: Vec<Event> = (0..10).map(|id| event(id, 6, 200 + id as usize)).collect();
    produce(&case, &older).await;
    let end = produce(&case, &newest).await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");

    let all: Vec<Event> = newer.iter().chain(&older).chain(&newest).cloned().collect();
    let state = table_state(&case).await;
    assert_eq!(state, apply_in_order(&all, Rule::NewerBy));
    assert!(state
        .iter()
        .all(|(id, (v, _))| *v == if *id < 10 { 6 } else { 5 }));
    let changes = audit(&case).await;
    assert_eq!(
        changes.len(),
        10,
        "only the 10 newest versions changed rows: {changes:?}"
    );
    assert_never_older_over_newer(&changes, Rule::NewerBy);
}

async fn tombstones_delete_and_a_reinsert_after_a_tombstone_leaves_the_row(backend: Backend) {
    let case = orders_case(backend, "tomb", 2).await;
    let config = case.config_with(&Rule::LastWins.sink(true), "");
    let connector = Connector::start(&config);
    let steps: Vec<Vec<Event>> = vec![
        (0..10).map(|id| event(id, 1, id as usize)).collect(),
        (0..5).map(tombstone).collect(),
        (0..2).map(|id| event(id, 2, 20 + id as usize)).collect(),
        // A tombstone for a key that was never written deletes nothing and is no error.
        vec![tombstone(99)],
    ];
    // Each step in its own batches, so deletes and re-inserts meet committed rows.
    for step in &steps {
        let end = produce(&case, step).await;
        case.wait_for_offsets(&end, CATCH_UP).await;
    }
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    let deleted: u64 = common::logged_counts(&log, "deleted").iter().sum();
    assert_eq!(deleted, 5, "five rows deleted; log:\n{log}");
    let state = table_state(&case).await;
    assert_eq!(
        state.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 5, 6, 7, 8, 9]
    );
    assert_eq!(state, apply_in_order(&steps.concat(), Rule::LastWins));
}

async fn sigkill_restarts_in_upsert_mode_end_in_the_state_of_applying_every_record_once_in_order(
    backend: Backend,
) {
    let case = orders_case(backend, "killkey", 4).await;
    let config = case.config_with(
        &Rule::LastWins.sink(true),
        "batch:\n  max_records: 400\n  max_wait_ms: 20\n",
    );
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // 30,000 records over 500 orders, versions rising per order, 1 in 20 a tombstone.
    let mut versions = vec![0i64; 500];
    let mut events = Vec::new();
    for seq in 0..30_000 {
        let order_id = rng.gen_range(0..500);
        if rng.gen_ratio(1, 20) {
            events.push(tombstone(order_id as i64));
        } else {
            versions[order_id] += 1;
            events.push(event(order_id as i64, versions[order_id], seq));
        }
    }
    // Streamed in chunks of 1,000 over ~6 s while the connector is killed and restarted.
    let chunks: Vec<Vec<Outgoing>> = events
        .chunks(1000)
        .map(|chunk| records(chunk, case.partitions))
        .collect();
    let (connector, _) = case
        .stream_while_killing(&config, chunks, 5, 500..2500, &mut rng)
        .await;
    let end = case.end_offsets().await;
    case.wait_for_offsets(&end, CATCH_UP).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "log:\n{log}");
    assert_eq!(case.stored_offsets().await, end);
    assert_eq!(
        table_state(&case).await,
        apply_in_order(&events, Rule::LastWins),
        "seed {seed}"
    );
    assert_never_older_over_newer(&audit(&case).await, Rule::LastWins);
}

/// MySQL: tombstones for a text key whose column has a collation of its own (utf8mb4_bin, not
/// the connection's) delete their rows: the keys the batch binds, as a derived table, compare
/// in the column's collation. (A doubt of the review, error 1267 "Illegal mix of collations";
/// not so on MariaDB 10.11, and this keeps it that way.)
#[tokio::test(flavor = "multi_thread")]
async fn mysql_a_tombstone_deletes_a_text_key_in_a_collation_of_its_own() {
    let case = Case::with_table(
        Backend::MySql,
        "tomb_collation",
        1,
        common::brokers(),
        "code varchar(20) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
         body varchar(40) NOT NULL,
         kafka_partition integer,
         kafka_offset bigint",
    )
    .await;
    let config = case.config_with(
        "  mode: upsert\n  key: [code]\n  delete_on_null: true\n  columns:\n    code: $key\n    body: /body\n    kafka_partition: $partition\n    kafka_offset: $offset\n",
        "batch:\n  max_records: 100\n  max_wait_ms: 20\n",
    );
    let write = |code: &str| Outgoing::json(0, code, &serde_json::json!({"body": code}));
    let delete = |code: &str| Outgoing {
        partition: 0,
        key: Some(code.as_bytes().to_vec()),
        value: None,
    };
    // The rows first; then several tombstones in one batch, whose keys are bound as a
    // derived table (UNION ALL) and meet the stored rows.
    for records in [
        ["keep", "a", "b", "c"].map(write).to_vec(),
        ["a", "b", "c"].map(delete).to_vec(),
    ] {
        testkit::produce(&case.producer(), &case.topic, &records)
            .await
            .expect("produce");
        let end = case.end_offsets().await;
        let log = case.run_until_stored(&config, &end).await;
        assert!(!log.contains("1267"), "{log}");
    }
    let codes = case
        .texts(&format!(
            "SELECT CAST(code AS CHAR) FROM {} ORDER BY code",
            case.table
        ))
        .await;
    assert_eq!(codes, ["keep"]);
}
