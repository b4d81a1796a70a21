//! Bad records: with `errors.tolerance: all`, records that cannot become rows (not JSON, a
//! missing NOT NULL field, a string too long) and rows the database refuses (a CHECK, a
//! foreign key) go to the dead-letter table in the batch's transaction, once each, across
//! SIGKILLs and replays, while every good record lands once. With `tolerance: none` the run
//! stops at the first bad record, naming it. And the `dead-letters` command lists and
//! re-queues them.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    assert_exactly_once, idemsink, Backend, Case, Connector, ErrorKind, EXIT, STANDARD_COLUMNS,
};
use idemsink::testkit::{self, Outgoing};
use rand::SeedableRng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

on_both_databases!(
    poison_records_go_to_the_dead_letter_table_once_and_every_good_record_lands_once_across_kills_and_replays,
    with_tolerance_none_the_run_stops_at_the_first_refused_record_naming_it_and_commits_nothing_after_it,
    dead_letters_are_listed_and_requeued_with_their_key_value_and_headers,
    in_upsert_mode_a_refused_version_leaves_its_key_at_the_last_version_not_refused,
);

/// PostgreSQL checks a `DEFERRABLE INITIALLY DEFERRED` constraint at COMMIT, outside the
/// isolation of refused rows, which made a refused record fatal even with `tolerance: all`.
/// idemsink makes every constraint immediate in its batch transactions: the record is named
/// (`tolerance: none`) or dead-lettered (`all`) like any other refused row.
#[tokio::test(flavor = "multi_thread")]
async fn a_deferred_constraint_refuses_its_record_like_any_other() {
    let case = Case::new(Backend::Postgres, "deferred", 1).await;
    case.exec(&format!(
        "CREATE TABLE {name}_known (n integer PRIMARY KEY);
         INSERT INTO {name}_known (n) VALUES (0), (1);
         ALTER TABLE {table} ADD COLUMN n integer;
         ALTER TABLE {table} ADD CONSTRAINT {name}_n_known FOREIGN KEY (n)
           REFERENCES {name}_known (n) DEFERRABLE INITIALLY DEFERRED;",
        name = case.name,
        table = case.table,
    ))
    .await;
    let records: Vec<Outgoing> = (0..100i64)
        .map(|id| {
            let n = if id == 50 { 7 } else { id % 2 };
            Outgoing::json(0, &id.to_string(), &json!({"id": id, "body": "b", "n": n}))
        })
        .collect();
    let landed = testkit::produce(&case.producer(), &case.topic, &records)
        .await
        .expect("produce");
    let refused_at = landed[50].1;

    let (last, _) = Connector::run_to_failure(
        &poison_config(&case, "  tolerance: none\n", 30),
        "none",
        ErrorKind::RejectedRow,
    );
    for needle in [
        format!("offset {refused_at}"),
        format!("{}_n_known", case.name),
    ] {
        assert!(last.contains(&needle), "{needle:?} in: {last}");
    }
    let end = case.end_offsets().await;
    case.run_until_stored(&poison_config(&case, "  tolerance: all\n", 30), &end)
        .await;
    let letters = dead_letters(&case).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].2, refused_at);
    assert!(
        letters[0].5.contains(&format!("{}_n_known", case.name)),
        "{letters:?}"
    );
    let mut produced: Vec<(i64, (i32, i64))> = (0..100).zip(landed).collect();
    produced.remove(50);
    assert_exactly_once(&case.rows().await, &produced);
}

/// The kinds of bad record the tests mix into a stream, and what the dead letter's error
/// must say about each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Poison {
    NotJson,
    MissingBody,
    LongBody,
    /// Refused by the CHECK constraint `id_not_negative`.
    NegativeId,
    /// Refused by the foreign key `n_known`.
    UnknownN,
}

impl Poison {
    /// One record in every 400 of each kind.
    fn of(id: i64) -> Option<Poison> {
        match id % 400 {
            7 => Some(Poison::NotJson),
            101 => Some(Poison::MissingBody),
            202 => Some(Poison::LongBody),
            303 => Some(Poison::NegativeId),
            350 => Some(Poison::UnknownN),
            _ => None,
        }
    }

    fn expected_error(self) -> &'static str {
        match self {
            Poison::NotJson => "the record value is not JSON",
            Poison::MissingBody => {
                "column body: the record has no value at /body, but the column is NOT NULL"
            }
            Poison::LongBody => "the column holds at most 40",
            Poison::NegativeId => "id_not_negative",
            Poison::UnknownN => "n_known",
        }
    }
}

/// Record `id`: the standard record, or the poison that `Poison::of` picks for it.
fn record(id: i64, partition: i32) -> Outgoing {
    let key = id.to_string();
    let body = format!("record {id}");
    let value = match Poison::of(id) {
        None => return common::record(id, partition),
        Some(Poison::NotJson) => {
            return Outgoing {
                partition,
                key: Some(key.into_bytes()),
                value: Some(format!("{{not json {id}").into_bytes()),
            }
        }
        Some(Poison::MissingBody) => json!({"id": id, "n": 1}),
        Some(Poison::LongBody) => json!({"id": id, "body": "x".repeat(41), "n": 1}),
        Some(Poison::NegativeId) => json!({"id": -id, "body": body, "n": 1}),
        Some(Poison::UnknownN) => json!({"id": id, "body": body, "n": 99}),
    };
    Outgoing::json(partition, &key, &value)
}

/// The standard table plus a column `n` that must be a known number (foreign key
/// `<case>_n_known`) and a CHECK that ids are not negative (`<case>_id_not_negative`):
/// MySQL wants constraint names unique in the database.
async fn poison_case(backend: Backend, prefix: &str, partitions: i32) -> Case {
    let case = Case::new(backend, prefix, partitions).await;
    let known = format!("{}_known", case.name);
    case.exec(&format!(
        "CREATE TABLE {known} (n integer PRIMARY KEY);
         INSERT INTO {known} (n) VALUES (0), (1), (2), (3), (4), (5), (6);
         ALTER TABLE {table} ADD COLUMN n integer;
         ALTER TABLE {table} ADD CONSTRAINT {name}_n_known FOREIGN KEY (n) REFERENCES {known} (n);
         ALTER TABLE {table} ADD CONSTRAINT {name}_id_not_negative CHECK (id >= 0);",
        table = case.table,
        name = case.name,
    ))
    .await;
    case
}

/// The case's pipeline with `n` mapped, batches of at most `max_records`, and `errors` lines.
fn poison_config(case: &Case, errors: &str, max_records: usize) -> std::path::PathBuf {
    case.config_with(
        &format!("{STANDARD_COLUMNS}    n: /n\n"),
        &format!("batch:\n  max_records: {max_records}\n  max_wait_ms: 20\nerrors:\n{errors}"),
    )
}

/// A dead letter as the tests read it back: coordinates, key, value, error.
type Letter = (String, i32, i64, Option<Vec<u8>>, Option<Vec<u8>>, String);

/// The case's dead letters in the default table, in record order.
async fn dead_letters(case: &Case) -> Vec<Letter> {
    dead_letters_in(case, "idemsink_dead_letters").await
}

async fn dead_letters_in(case: &Case, table: &str) -> Vec<Letter> {
    let sql = format!(
        "SELECT {t}, {p}, {o}, record_key, record_value, error FROM {table} \
         WHERE pipeline = '{}' ORDER BY {p}, {o}",
        case.name,
        p = case.quote("partition"),
        o = case.quote("offset"),
        // MySQL hands ascii_bin columns over as binary.
        t = match case.backend {
            Backend::Postgres => "topic",
            Backend::MySql => "CAST(topic AS CHAR)",
        },
    );
    let read = on_pool!(&case.pool, |pool| sqlx::query_as::<_, Letter>(&sql)
        .fetch_all(pool)
        .await);
    read.expect("read the dead letters")
}

async fn poison_records_go_to_the_dead_letter_table_once_and_every_good_record_lands_once_across_kills_and_replays(
    backend: Backend,
) {
    let case = poison_case(backend, "poison", 4).await;
    let config = poison_config(&case, "  tolerance: all\n", 200);
    let records: Vec<Outgoing> = (0..4000).map(|id| record(id, (id % 4) as i32)).collect();
    let chunks: Vec<Vec<Outgoing>> = records.chunks(250).map(<[Outgoing]>::to_vec).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (mut connector, landed) = case
        .stream_while_killing(&config, chunks, 3, 700..2000, &mut rng)
        .await;
    let end = case.end_offsets().await;
    case.wait_while_running(&mut connector, &end).await;
    let (status, log) = connector.stop(EXIT);
    assert!(status.success(), "clean exit; log:\n{log}");

    let check = |rows: Vec<(i64, i32, i64)>, letters: Vec<Letter>, when: &str| {
        let good: Vec<(i64, (i32, i64))> = (0..4000)
            .zip(landed.iter().copied())
            .filter(|(id, _)| Poison::of(*id).is_none())
            .collect();
        assert_exactly_once(&rows, &good);
        let mut expected: Vec<(i32, i64, &Outgoing, Poison)> = (0..4000)
            .filter_map(|id| Poison::of(id).map(|kind| (id as usize, kind)))
            .map(|(i, kind)| (landed[i].0, landed[i].1, &records[i], kind))
            .collect();
        expected.sort_by_key(|(p, o, _, _)| (*p, *o));
        assert_eq!(
            letters.len(),
            50,
            "{when}: 10 dead letters of each of 5 kinds, once each"
        );
        for (letter, (p, o, sent, kind)) in letters.iter().zip(&expected) {
            let (topic, partition, offset, key, value, error) = letter;
            assert_eq!(
                (topic, *partition, *offset),
                (&case.topic, *p, *o),
                "{when}: dead letters at exactly the bad records' coordinates"
            );
            assert_eq!(
                (key, value),
                (&sent.key, &sent.value),
                "{when}: bytes as sent"
            );
            assert!(
                error.contains(kind.expected_error()),
                "{when}: a {kind:?} dead letter says why: {error}"
            );
        }
    };
    check(
        case.rows().await,
        dead_letters(&case).await,
        "after the stream",
    );

    // A full replay from the start changes nothing: no row, no dead letter twice.
    case.forget_offsets().await;
    case.run_until_stored(&config, &end).await;
    check(
        case.rows().await,
        dead_letters(&case).await,
        "after a replay",
    );
}

async fn with_tolerance_none_the_run_stops_at_the_first_refused_record_naming_it_and_commits_nothing_after_it(
    backend: Backend,
) {
    // Ids 0..=302 are good; 303 is refused by the CHECK constraint, 350 by the foreign key.
    let case = poison_case(backend, "refused", 1).await;
    let config = poison_config(&case, "  tolerance: none\n", 50);
    let records: Vec<Outgoing> = (0..400)
        .map(|id| match Poison::of(id) {
            Some(Poison::NegativeId | Poison::UnknownN) => record(id, 0),
            _ => common::record(id, 0),
        })
        .collect();
    let landed = testkit::produce(&case.producer(), &case.topic, &records)
        .await
        .expect("produce");
    let bad_offset = landed[303].1;
    for attempt in 1..=2 {
        let (last, _) = Connector::run_to_failure(
            &config,
            &format!("attempt {attempt}"),
            ErrorKind::RejectedRow,
        );
        for needle in [
            format!(
                "record topic {} partition 0 offset {bad_offset} was refused by the database",
                case.topic
            ),
            "id_not_negative".to_string(),
            "errors.tolerance: all".to_string(),
        ] {
            assert!(
                last.contains(&needle),
                "attempt {attempt}: `{needle}` in: {last}"
            );
        }
        // The batches (of at most 50) before the refused record's are committed; nothing
        // of that batch or after it is.
        let ids: Vec<i64> = case.rows().await.iter().map(|r| r.0).collect();
        let committed = ids.len();
        assert!(
            (254..=303).contains(&committed),
            "attempt {attempt}: {committed} rows"
        );
        assert_eq!(
            ids,
            (0..committed as i64).collect::<Vec<_>>(),
            "attempt {attempt}"
        );
        assert_eq!(
            case.stored_offsets().await,
            BTreeMap::from([(0, landed[committed].1)]),
            "attempt {attempt}: the offsets cover exactly the committed rows"
        );
        assert!(
            dead_letters(&case).await.is_empty(),
            "tolerance none writes no dead letter"
        );
    }
}

async fn dead_letters_are_listed_and_requeued_with_their_key_value_and_headers(backend: Backend) {
    let case = poison_case(backend, "requeue", 1).await;
    // A dead-letter table of its own, which idemsink creates like the default one.
    let table = format!("{}_dlq", case.name);
    let config = poison_config(
        &case,
        &format!("  tolerance: all\n  dead_letter_table: {table}\n"),
        100,
    );
    let producer = case.producer();
    // Ids 0..5 are good; -1, -2, -3 are refused by the CHECK; they carry headers: text,
    // binary, without a value, and with a NUL (which PostgreSQL's jsonb cannot hold as text).
    let mut landed = case.produce_ids(&producer, 0..5).await;
    let binary = [0xff_u8, 0x00, 0x7f];
    for id in 1..=3 {
        let value = json!({"id": -id, "body": format!("fixed later {id}"), "n": 1}).to_string();
        let key = format!("k{id}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "trace",
                value: Some(&format!("t{id}")),
            })
            .insert(Header {
                key: "raw",
                value: Some(&binary[..]),
            })
            .insert(Header::<&[u8]> {
                key: "empty",
                value: None,
            })
            .insert(Header {
                key: "nul",
                value: Some("a\0b"),
            });
        let sent = producer
            .send(
                FutureRecord::to(&case.topic)
                    .partition(0)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .expect("produce a record with headers");
        landed.push((sent.partition, sent.offset));
    }
    let config_arg = config.as_os_str();
    let list = || {
        idemsink(&[
            "dead-letters".as_ref(),
            "list".as_ref(),
            "-c".as_ref(),
            config_arg,
        ])
    };
    // Before idemsink has run, the table does not exist yet: there is nothing to list.
    let (ok, out) = list();
    assert!(
        ok && out.contains(&format!("pipeline {}: 0 dead letter(s)", case.name)),
        "{out}"
    );

    let end = case.end_offsets().await;
    let log = case.run_until_stored(&config, &end).await;
    assert_eq!(
        log.matches("record dead-lettered").count(),
        3,
        "each dead letter is named in the log; log:\n{log}"
    );
    assert_eq!(case.rows().await.len(), 5);

    let (ok, out) = list();
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("pipeline {}: 3 dead letter(s)", case.name)),
        "{out}"
    );
    for (p, o) in &landed[5..] {
        assert!(out.contains(&format!("{}/{p}@{o}", case.topic)), "{out}");
    }
    assert!(
        out.contains("id_not_negative") && out.contains(r#"fixed later 2"#),
        "{out}"
    );
    let first_id: String = out
        .lines()
        .find(|l| l.contains(&format!("@{}", landed[5].1)))
        .and_then(|l| l.split_whitespace().next())
        .expect("an id")
        .to_string();

    // One of them to another topic, kept in the table: it arrives there as it was.
    let other = format!("{}_copy", case.topic);
    testkit::create_topic(&case.brokers, &other, 1, false)
        .await
        .expect("topic");
    let (ok, out) = idemsink(&[
        "dead-letters".as_ref(),
        "requeue".as_ref(),
        "-c".as_ref(),
        config_arg,
        "--id".as_ref(),
        first_id.as_ref(),
        "--to-topic".as_ref(),
        other.as_ref(),
        "--keep".as_ref(),
    ]);
    assert!(
        ok && out.contains("requeued 1 dead letter(s), kept in"),
        "{out}"
    );
    let copies = read_topic(&case.brokers, &other, 1);
    let (key, value, headers) = &copies[0];
    assert_eq!(key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(value.as_deref().expect("a value"))
            .expect("json"),
        json!({"id": -1, "body": "fixed later 1", "n": 1})
    );
    assert_eq!(
        headers,
        &vec![
            ("trace".to_string(), Some(b"t1".to_vec())),
            ("raw".to_string(), Some(binary.to_vec())),
            ("empty".to_string(), None),
            ("nul".to_string(), Some(b"a\0b".to_vec())),
        ]
    );
    assert_eq!(
        dead_letters_in(&case, &table).await.len(),
        3,
        "--keep leaves it in the table"
    );

    // The table is fixed; all three go back to their topic, leave the table, and land.
    case.exec(&format!(
        "ALTER TABLE {} DROP CONSTRAINT {}_id_not_negative",
        case.table, case.name
    ))
    .await;
    let (ok, out) = idemsink(&[
        "dead-letters".as_ref(),
        "requeue".as_ref(),
        "-c".as_ref(),
        config_arg,
    ]);
    assert!(
        ok && out.contains("requeued 3 dead letter(s), removed from"),
        "{out}"
    );
    assert!(dead_letters_in(&case, &table).await.is_empty(), "{out}");
    let end = BTreeMap::from([(0, end[&0] + 3)]);
    case.run_until_stored(&config, &end).await;
    let mut ids: Vec<i64> = case.rows().await.iter().map(|r| r.0).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![-3, -2, -1, 0, 1, 2, 3, 4],
        "the fixed records landed once"
    );
}

/// With a business key a batch writes one record per key; when the database refuses that
/// one, the record before it of the same key is written instead, as if the refused record
/// had never been there.
async fn in_upsert_mode_a_refused_version_leaves_its_key_at_the_last_version_not_refused(
    backend: Backend,
) {
    let case = Case::with_table(
        backend,
        "upsertdl",
        1,
        common::brokers(),
        "order_id bigint NOT NULL PRIMARY KEY, status varchar(20) NOT NULL CHECK (status <> 'bogus')",
    )
    .await;
    let config = case.config_with(
        "  mode: upsert\n  key: [order_id]\n  columns:\n    order_id: $key\n    status: /status\n",
        "batch:\n  max_records: 1000\n  max_wait_ms: 500\nerrors:\n  tolerance: all\n",
    );
    let events = [
        (1, "new"),
        (1, "paid"),
        (1, "bogus"),
        (2, "bogus"),
        (3, "new"),
        (3, "bogus"),
        (3, "bogus"),
    ];
    let records: Vec<Outgoing> = events
        .iter()
        .map(|(id, status)| Outgoing::json(0, &id.to_string(), &json!({ "status": status })))
        .collect();
    // All produced before idemsink starts, so that they come in one batch.
    let landed = testkit::produce(&case.producer(), &case.topic, &records)
        .await
        .expect("produce");
    case.run_until_stored(&config, &case.end_offsets().await)
        .await;
    let rows = case
        .texts(&format!(
            "SELECT concat(order_id, '=', status) FROM {} ORDER BY order_id",
            case.table
        ))
        .await;
    assert_eq!(rows, vec!["1=paid", "3=new"]);
    let refused: Vec<i64> = dead_letters(&case).await.iter().map(|d| d.2).collect();
    let expected: Vec<i64> = [2, 3, 5, 6].iter().map(|i| landed[*i].1).collect();
    assert_eq!(refused, expected, "each refused record is a dead letter");
}

/// Key, value and headers of the first `count` records of a topic's partition 0.
#[allow(clippy::type_complexity)]
fn read_topic(
    brokers: &str,
    topic: &str,
    count: usize,
) -> Vec<(
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "idemsink-test-reader")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut read = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while read.len() < count && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message.expect("a record");
        let headers = m.headers().map_or_else(Vec::new, |h| {
            h.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        });
        read.push((
            m.key().map(<[u8]>::to_vec),
            m.payload().map(<[u8]>::to_vec),
            headers,
        ));
    }
    assert_eq!(read.len(), count, "records in {topic}");
    read
}
