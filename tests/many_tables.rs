//! One pipeline, several tables (`sink.tables`): a batch whose records come from two topics
//! writes each topic's rows into its own table (mapped by name, tables of different widths),
//! and commits both tables' rows and both topics' offsets in one transaction — or none of it,
//! when the database refuses a row of either table or another instance moved an offset.

mod common;

use std::time::Duration;

use common::{brokers, Backend, Case};
use idemsink::batch::{Batch, RawRecord};
use idemsink::config::{load_file, LoadedPipeline};
use idemsink::db::DbPool;
use idemsink::dead_letters::DeadLetterTable;
use idemsink::mapping::{Converted, RecordRef};
use idemsink::offsets::{OffsetMove, OffsetStore, TopicPartition};
use idemsink::writer::{SinkPlan, WriteOutcome, Writer};
use idemsink::{pipeline, testkit};
use serde_json::json;

/// Two tables of different shapes, each with the Kafka coordinates as its key.
struct TwoTables {
    orders: Case,
    notes: Case,
    pipeline: LoadedPipeline,
    pool: DbPool,
    plans: Vec<SinkPlan>,
}

const COLUMNS: &str = "  columns:
    \"*\": auto
    kafka_topic: $topic
    kafka_partition: $partition
    kafka_offset: $offset
";

async fn two_tables(backend: Backend) -> TwoTables {
    let text = match backend {
        Backend::Postgres => "text",
        Backend::MySql => "varchar(255)",
    };
    let coordinates = format!(
        "kafka_topic {text} NOT NULL, kafka_partition integer NOT NULL, \
         kafka_offset bigint NOT NULL, UNIQUE (kafka_topic, kafka_partition, kafka_offset)"
    );
    let orders = Case::with_table(
        backend,
        "tables_orders",
        1,
        brokers(),
        &format!("id bigint NOT NULL, customer varchar(20) NOT NULL, total integer, {coordinates}"),
    )
    .await;
    let mut notes = Case::with_table(
        backend,
        "tables_notes",
        1,
        brokers(),
        &format!("note varchar(10) NOT NULL CHECK (note <> 'refused'), {coordinates}"),
    )
    .await;
    notes.name = orders.name.clone(); // one pipeline, whose offsets both topics share
    let routes = [
        (orders.topic.as_str(), orders.table.as_str()),
        (notes.topic.as_str(), notes.table.as_str()),
    ];
    let config = orders.pipeline().sink(COLUMNS).tables(&routes).write();
    let pipeline = load_file(&config, &[]).expect("a valid pipeline file");
    let pool = pipeline::connect_migrated(&pipeline, Duration::from_secs(10))
        .await
        .expect("database");
    let plans = SinkPlan::prepare_all(&pipeline, &pool)
        .await
        .expect("both tables fit the mapping");
    TwoTables {
        orders,
        notes,
        pipeline,
        pool,
        plans,
    }
}

impl TwoTables {
    /// The pipeline's writer; with `dead_letters`, one that sends refused rows to the
    /// dead-letter table (`errors.tolerance: all`).
    async fn writer(&self, dead_letters: bool) -> Writer {
        let store = OffsetStore::new(self.pipeline.name(), self.pool.clone());
        let routes = self.pipeline.routes.clone();
        let dead_letters = match dead_letters {
            true => Some(
                DeadLetterTable::open(
                    self.pipeline.name(),
                    self.pipeline.dead_letter_table.clone(),
                    &self.pool,
                )
                .await
                .expect("dead letters"),
            ),
            false => None,
        };
        Writer::new(&self.pool, self.plans.clone(), routes, store, dead_letters)
            .await
            .expect("writer")
    }

    /// A batch of `orders` (JSON values) at offsets 0, 1… of the orders topic and `notes`
    /// at offsets 0, 1… of the notes topic, interleaved, each row converted by its table's
    /// mapping. With `keep`, each row keeps its record (for the dead-letter table).
    fn batch(
        &self,
        orders: &[serde_json::Value],
        notes: &[serde_json::Value],
        keep: bool,
    ) -> Batch {
        let width = self
            .plans
            .iter()
            .map(|p| p.columns.len())
            .max()
            .unwrap_or(0);
        let mut batch = Batch::new(width);
        let tagged = |case: &Case, values: &[serde_json::Value]| -> Vec<(String, i64, Vec<u8>)> {
            (values.iter().enumerate())
                .map(|(offset, v)| {
                    (
                        case.topic.clone(),
                        offset as i64,
                        v.to_string().into_bytes(),
                    )
                })
                .collect()
        };
        let (mut first, mut second) = (tagged(&self.orders, orders), tagged(&self.notes, notes));
        let mut records = Vec::new();
        while !first.is_empty() || !second.is_empty() {
            for side in [&mut first, &mut second] {
                if !side.is_empty() {
                    records.push(side.remove(0));
                }
            }
        }
        for (topic, offset, value) in &records {
            let table = self
                .pipeline
                .routes
                .table_of(topic)
                .expect("a routed topic");
            let record = RecordRef {
                topic,
                partition: 0,
                offset: *offset,
                timestamp_ms: None,
                key: None,
                value: Some(value),
            };
            let converted = self.plans[table]
                .mapper()
                .convert(&record, &mut batch.cells)
                .expect("a row");
            let Converted::Row(op) = converted else {
                panic!("a record that changes nothing: {converted:?}")
            };
            let raw = keep.then(|| RawRecord {
                value: Some(value.clone()),
                ..RawRecord::default()
            });
            batch.push(topic, 0, 1, *offset, op, raw);
        }
        batch
    }

    /// The offsets the batch moves: each topic's partition 0 from `expected` to `next`.
    fn moves(&self, expected: [Option<i64>; 2], next: [i64; 2]) -> Vec<OffsetMove> {
        [&self.orders, &self.notes]
            .into_iter()
            .zip(expected.into_iter().zip(next))
            .map(|(case, (expected, next))| OffsetMove {
                tp: TopicPartition {
                    topic: case.topic.clone(),
                    partition: 0,
                },
                expected,
                next,
            })
            .collect()
    }

    async fn stored(&self, case: &Case) -> Option<i64> {
        let stored = testkit::stored_offsets(&self.pool, self.pipeline.name(), &case.topic)
            .await
            .expect("stored offsets");
        stored.get(&0).copied()
    }

    async fn orders_rows(&self) -> Vec<String> {
        let line = "CONCAT_WS('|', id, customer, total, kafka_offset)";
        rows(&self.orders, line).await
    }

    async fn notes_rows(&self) -> Vec<String> {
        rows(
            &self.notes,
            "CONCAT_WS('|', note, kafka_topic, kafka_offset)",
        )
        .await
    }

    /// Stores an offset for the notes' partition 0, as another instance's commit would.
    async fn store_notes_offset(&self, next: i64) {
        let store = OffsetStore::new(self.pipeline.name(), self.pool.clone());
        let tp = TopicPartition {
            topic: self.notes.topic.clone(),
            partition: 0,
        };
        store
            .overwrite(&[(tp, next)])
            .await
            .expect("store an offset");
    }
}

/// Each row of `case`'s table as `line` renders it, in offset order.
async fn rows(case: &Case, line: &str) -> Vec<String> {
    let line = text(case.backend, line);
    let sql = format!("SELECT {line} FROM {} ORDER BY kafka_offset", case.table);
    case.texts(&sql).await
}

/// `expression` as text on either database (MySQL's CONCAT_WS of numbers is binary).
fn text(backend: Backend, expression: &str) -> String {
    match backend {
        Backend::Postgres => expression.to_string(),
        Backend::MySql => format!("CONVERT({expression} USING utf8mb4)"),
    }
}

fn order(id: i64, customer: &str) -> serde_json::Value {
    json!({"id": id, "customer": customer, "total": id * 10, "note": "not a column of orders"})
}

fn note(note: &str) -> serde_json::Value {
    json!({"note": note, "id": "not a column of notes"})
}

async fn a_batch_spanning_two_tables_commits_both_with_both_offsets_or_nothing(backend: Backend) {
    let tables = two_tables(backend).await;
    assert_eq!(tables.plans.len(), 2, "a plan per table");
    assert_ne!(tables.plans[0].columns.len(), tables.plans[1].columns.len());
    let writer = tables.writer(false).await;
    let orders = [order(1, "ada"), order(2, "bob"), order(3, "cy")];

    // A note its table's CHECK refuses: the database refuses the row, and the orders written
    // in the same transaction go too; no offset moves.
    let refused = tables.batch(&orders, &[note("short"), note("refused")], false);
    let moves = tables.moves([None, None], [3, 2]);
    match writer.write(&refused, &moves).await.expect("write") {
        WriteOutcome::Rejected(record) => {
            assert_eq!(
                (record.tp.topic.as_str(), record.offset),
                (tables.notes.topic.as_str(), 1)
            );
        }
        other => panic!("the refused note must roll the batch back: {other:?}"),
    }
    assert!(
        tables.orders_rows().await.is_empty(),
        "no order without its offsets"
    );
    assert!(tables.notes_rows().await.is_empty());
    assert_eq!(
        (
            tables.stored(&tables.orders).await,
            tables.stored(&tables.notes).await
        ),
        (None, None)
    );

    // Another instance moved the notes' offset meanwhile: fenced, nothing of either table.
    let good = tables.batch(&orders, &[note("short"), note("fits")], false);
    tables.store_notes_offset(7).await;
    match writer.write(&good, &moves).await.expect("write") {
        WriteOutcome::Conflict(lost) => assert_eq!(lost, [moves[1].tp.clone()]),
        other => panic!("a moved offset must fence the whole batch: {other:?}"),
    }
    assert!(
        tables.orders_rows().await.is_empty(),
        "no order of a fenced batch"
    );
    assert_eq!(tables.stored(&tables.orders).await, None);

    // Expecting what is stored, the batch commits: each row in its table, both offsets.
    let moves = tables.moves([None, Some(7)], [3, 9]);
    match writer.write(&good, &moves).await.expect("write") {
        WriteOutcome::Committed { rows, rejected } => {
            assert!(rejected.is_empty());
            assert_eq!(rows.written, 5);
        }
        other => panic!("the batch must commit: {other:?}"),
    }
    assert_eq!(
        tables.orders_rows().await,
        ["1|ada|10|0", "2|bob|20|1", "3|cy|30|2"]
    );
    let notes_topic = &tables.notes.topic;
    assert_eq!(
        tables.notes_rows().await,
        [
            format!("short|{notes_topic}|0"),
            format!("fits|{notes_topic}|1")
        ]
    );
    assert_eq!(
        (
            tables.stored(&tables.orders).await,
            tables.stored(&tables.notes).await
        ),
        (Some(3), Some(9))
    );
}

/// With a dead-letter table, the rows either table refuses go there, and the rest of both
/// tables commits with both offsets, in the same transaction.
async fn refused_rows_of_either_table_become_dead_letters_and_the_rest_commits(backend: Backend) {
    let tables = two_tables(backend).await;
    let writer = tables.writer(true).await;
    let orders = [order(1, "ada"), order(2, "bob")];
    let notes = [note("refused"), note("kept"), note("refused")];
    let batch = tables.batch(&orders, &notes, true);
    let moves = tables.moves([None, None], [2, 3]);
    let WriteOutcome::Committed { rows, rejected } =
        writer.write(&batch, &moves).await.expect("write")
    else {
        panic!("the batch must commit without its refused rows");
    };
    let refused: Vec<(&str, i64)> = rejected
        .iter()
        .map(|r| (r.tp.topic.as_str(), r.offset))
        .collect();
    let notes_topic = tables.notes.topic.as_str();
    assert_eq!(refused, [(notes_topic, 0), (notes_topic, 2)]);
    assert_eq!((rows.written, rows.dead_lettered), (3, 2));
    assert_eq!(tables.orders_rows().await, ["1|ada|10|0", "2|bob|20|1"]);
    assert_eq!(tables.notes_rows().await, [format!("kept|{notes_topic}|1")]);
    let offset = tables.orders.quote("offset");
    let value = match backend {
        Backend::Postgres => "convert_from(record_value, 'UTF8')",
        Backend::MySql => "record_value",
    };
    let line = text(
        backend,
        &format!("CONCAT_WS('|', topic, {offset}, {value})"),
    );
    let letters = (tables.orders)
        .texts(&format!(
            "SELECT {line} FROM idemsink_dead_letters WHERE pipeline = '{}' ORDER BY {offset}",
            tables.pipeline.name()
        ))
        .await;
    assert_eq!(
        letters,
        [0, 2].map(|o| format!("{notes_topic}|{o}|{}", note("refused")))
    );
    assert_eq!(
        (
            tables.stored(&tables.orders).await,
            tables.stored(&tables.notes).await
        ),
        (Some(2), Some(3))
    );
}

mod postgres {
    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_spanning_two_tables_commits_both_with_both_offsets_or_nothing() {
        super::a_batch_spanning_two_tables_commits_both_with_both_offsets_or_nothing(
            super::Backend::Postgres,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refused_rows_of_either_table_become_dead_letters_and_the_rest_commits() {
        super::refused_rows_of_either_table_become_dead_letters_and_the_rest_commits(
            super::Backend::Postgres,
        )
        .await;
    }
}

mod mysql {
    #[tokio::test(flavor = "multi_thread")]
    async fn a_batch_spanning_two_tables_commits_both_with_both_offsets_or_nothing() {
        super::a_batch_spanning_two_tables_commits_both_with_both_offsets_or_nothing(
            super::Backend::MySql,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refused_rows_of_either_table_become_dead_letters_and_the_rest_commits() {
        super::refused_rows_of_either_table_become_dead_letters_and_the_rest_commits(
            super::Backend::MySql,
        )
        .await;
    }
}
