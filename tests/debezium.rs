//! Replication from a real Debezium: a Kafka Connect standalone worker runs Debezium's
//! PostgreSQL source connector (pgoutput) on a database of the development PostgreSQL, and
//! idemsink applies its change events (`sink.format: debezium`) to PostgreSQL and MariaDB,
//! SIGKILLed between the source's transactions. The target must equal the source row for row,
//! and a replay from offset 0 must change nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{brokers, database_url, unique, Backend, Case, Connector, ErrorKind};
use idemsink::testkit::connect::CapturedDatabase;
use idemsink::testkit::{self, Outgoing};
use serde_json::{json, Value};

/// A captured table: its definition at the source and in each target, the pipeline's sink
/// section, and a query that renders each row as one line of text (`TABLE` is replaced by the
/// table's name), written per database so that equal rows read the same.
struct Replicated {
    name: &'static str,
    source: &'static str,
    target: fn(Backend) -> String,
    sink: &'static str,
    rows_postgres: &'static str,
    rows_mysql: &'static str,
}

impl Replicated {
    async fn rows_at_source(&self, source: &CapturedDatabase) -> Vec<String> {
        let query = self.rows_postgres.replace("TABLE", self.name);
        sorted(source.texts(&query).await.expect("source rows"))
    }

    async fn rows_in(&self, case: &Case) -> Vec<String> {
        let query = match case.backend {
            Backend::Postgres => self.rows_postgres,
            Backend::MySql => self.rows_mysql,
        };
        sorted(case.texts(&query.replace("TABLE", &case.table)).await)
    }
}

/// Rows in one order on both databases (MariaDB's uuid type sorts its own way).
fn sorted(mut rows: Vec<String>) -> Vec<String> {
    rows.sort();
    rows
}

/// Order lines: a key of two columns, updated (key included) and deleted; replays are told by
/// the Kafka position.
const LINES: Replicated = Replicated {
    name: "lines",
    source: "CREATE TABLE lines (
        order_id bigint NOT NULL,
        line integer NOT NULL,
        qty integer NOT NULL,
        note text,
        PRIMARY KEY (order_id, line))",
    target: |backend| {
        let partition = idemsink::schema::quote(backend, "kafka_partition");
        format!(
            "order_id bigint NOT NULL, line integer NOT NULL, qty integer NOT NULL, note text,
             {partition} integer NOT NULL, kafka_offset bigint NOT NULL,
             PRIMARY KEY (order_id, line)"
        )
    },
    sink: "  format: debezium
  mode: upsert
  key: [order_id, line]
  columns:
    order_id: /order_id
    line: /line
    qty: /qty
    note: /note
    kafka_partition: $partition
    kafka_offset: $offset
batch:
  max_wait_ms: 50
",
    rows_postgres: "SELECT CONCAT_WS('|', order_id, line, qty, COALESCE(note, '∅')) FROM TABLE",
    rows_mysql: "SELECT CONCAT_WS('|', order_id, line, qty, COALESCE(note, '∅')) FROM TABLE",
};

/// The sink of the pipeline that replicates both accounts and tags, each topic into its table:
/// every column by name, each table's primary key as the key, changes ordered by their
/// position in PostgreSQL's log ($source_position), and truncates applied.
const CHANGES_BY_POSITION: &str = "  format: debezium
  mode: upsert
  newer_by: src_pos
  truncate: apply
  columns:
    \"*\": auto
    src_pos: $source_position
batch:
  max_wait_ms: 50
";

/// Accounts: a uuid key and a column of every kind Debezium encodes its own way, NULLs
/// included, mapped by name (`columns: auto`); changes are ordered by their position in
/// PostgreSQL's log ($source_position).
const ACCOUNTS: Replicated = Replicated {
    name: "accounts",
    source: "CREATE TABLE accounts (
        id uuid PRIMARY KEY,
        owner text NOT NULL,
        balance numeric(12, 2),
        rate numeric,
        opened date,
        seen timestamptz,
        local_ts timestamp,
        doc jsonb,
        meta json,
        blob bytea,
        flag boolean,
        score double precision,
        small smallint)",
    target: |backend| match backend {
        Backend::Postgres => "id uuid PRIMARY KEY, owner text NOT NULL, balance numeric(12, 2),
            rate numeric, opened date, seen timestamptz, local_ts timestamp, doc jsonb, meta json,
            blob bytea, flag boolean, score double precision, small smallint,
            src_pos bigint NOT NULL"
            .into(),
        Backend::MySql => "id uuid PRIMARY KEY, owner text NOT NULL, balance decimal(12, 2),
            rate decimal(40, 10), opened date, seen datetime(6), local_ts datetime(6), doc json,
            meta json, `blob` blob, flag boolean, score double, small smallint,
            src_pos bigint NOT NULL"
            .into(),
    },
    sink: CHANGES_BY_POSITION,
    rows_postgres: "SELECT CONCAT_WS('|', id, owner, COALESCE(balance::text, '∅'),
        COALESCE(CASE WHEN rate::text LIKE '%.%' THEN rtrim(rtrim(rate::text, '0'), '.') ELSE rate::text END, '∅'),
        COALESCE(opened::text, '∅'),
        COALESCE(to_char(seen AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), '∅'),
        COALESCE(to_char(local_ts, 'YYYY-MM-DD HH24:MI:SS.US'), '∅'),
        COALESCE(doc::text, '∅'), COALESCE(meta::text, '∅'), COALESCE(encode(blob, 'hex'), '∅'),
        COALESCE(flag::int::text, '∅'), COALESCE(replace(score::text, 'e+', 'e'), '∅'), COALESCE(small::text, '∅'))
        FROM TABLE",
    rows_mysql: "SELECT CONVERT(CONCAT_WS('|', id, owner, COALESCE(CAST(balance AS CHAR), '∅'),
        COALESCE(CASE WHEN CAST(rate AS CHAR) LIKE '%.%'
            THEN TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM CAST(rate AS CHAR)))
            ELSE CAST(rate AS CHAR) END, '∅'),
        COALESCE(CAST(opened AS CHAR), '∅'),
        COALESCE(DATE_FORMAT(seen, '%Y-%m-%d %H:%i:%s.%f'), '∅'),
        COALESCE(DATE_FORMAT(local_ts, '%Y-%m-%d %H:%i:%s.%f'), '∅'),
        COALESCE(doc, '∅'), COALESCE(meta, '∅'), COALESCE(LOWER(HEX(`blob`)), '∅'),
        COALESCE(CAST(flag AS CHAR), '∅'), COALESCE(REPLACE(CAST(score AS CHAR), 'e+', 'e'), '∅'),
        COALESCE(CAST(small AS CHAR), '∅')) USING utf8mb4)
        FROM TABLE",
};

/// Tags: a text key whose values differ only in case, in accents or in trailing spaces, and odd
/// bytes, which the target must keep apart as the source does (MariaDB: a binary collation
/// without PAD SPACE, which would make `a` and `a ` one key).
const TAGS: Replicated = Replicated {
    name: "tags",
    source: "CREATE TABLE tags (tag text COLLATE \"C\" PRIMARY KEY, uses integer NOT NULL)",
    target: |backend| match backend {
        Backend::Postgres => "tag text COLLATE \"C\" PRIMARY KEY, uses integer NOT NULL, \
                              src_pos bigint NOT NULL"
            .into(),
        Backend::MySql => {
            "tag varchar(100) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin PRIMARY KEY, \
                           uses integer NOT NULL, src_pos bigint NOT NULL"
                .into()
        }
    },
    sink: CHANGES_BY_POSITION,
    rows_postgres: "SELECT CONCAT_WS('|', encode(convert_to(tag, 'UTF8'), 'hex'), uses) FROM TABLE",
    rows_mysql: "SELECT CONCAT_WS('|', LOWER(HEX(tag)), uses) FROM TABLE",
};

const TABLES: [&Replicated; 3] = [&LINES, &ACCOUNTS, &TAGS];

/// The pipelines of each target database: the order lines in one, accounts and tags in one
/// (`sink.tables`: a batch that spans both commits in one transaction).
const PIPELINES: [&[&Replicated]; 2] = [&[&LINES], &[&ACCOUNTS, &TAGS]];

/// The rows before capture starts: Debezium's snapshot reads them.
const SNAPSHOT: &str = "
    INSERT INTO lines SELECT o, l, o + l, 'snapshot ' || o FROM generate_series(1, 60) o, generate_series(1, 2) l;
    INSERT INTO accounts
    SELECT ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, 'owner ' || i,
           i * 1.25, round(i / 7.0, 6), date '2020-02-29' + i, timestamptz '2026-01-01 12:00:00.123456+02' + i * interval '1 hour',
           timestamp '1999-12-31 23:59:59.999999' + i * interval '1 day', jsonb_build_object('i', i, 'tags', jsonb_build_array('a', i)),
           ('{\"i\" :  ' || i || '}')::json, decode(lpad(to_hex(i), 6, '0'), 'hex'), i % 2 = 0, i / 8.0, i - 100
    FROM generate_series(1, 40) i;
    INSERT INTO accounts (id, owner) VALUES ('ffffffff-ffff-ffff-ffff-ffffffffffff', 'all NULL');
    INSERT INTO tags VALUES ('a', 1), ('A', 2), ('á', 3), ('a ', 4), (E'tab\\there', 5), ('☃', 6);";

/// The source's transactions after the snapshot: inserts, updates (keys included), deletes, rows
/// deleted and inserted again, transactions of several statements and tables, and values both
/// databases must carry exactly (odd text, extreme numbers, times, NULLs), and a truncate.
const WORKLOAD: &[&str] = &[
    "INSERT INTO lines SELECT o, l, o * l, 'streamed' FROM generate_series(100, 140) o, generate_series(1, 3) l",
    "UPDATE lines SET qty = qty + 1000 WHERE order_id % 3 = 0",
    "UPDATE lines SET line = line + 10 WHERE order_id % 5 = 0",
    "UPDATE accounts SET balance = -9999999999.99, rate = -123456789.0123456789, score = -0.1,
        small = -32768, flag = NULL WHERE owner = 'owner 3'",
    "DELETE FROM lines WHERE order_id % 7 = 0",
    "BEGIN;
     INSERT INTO lines VALUES (500, 1, 1, 'in a transaction');
     UPDATE lines SET qty = 2 WHERE order_id = 500;
     UPDATE lines SET qty = 3, note = NULL WHERE order_id = 500;
     DELETE FROM lines WHERE order_id = 101;
     UPDATE accounts SET owner = owner || ' (moved)', opened = date '1970-01-01' - 1 WHERE small % 3 = 0;
     DELETE FROM accounts WHERE owner = 'owner 5';
     COMMIT;",
    "DELETE FROM lines WHERE order_id = 102 AND line = 1",
    "INSERT INTO lines VALUES (102, 1, 42, 'back again')",
    "UPDATE lines SET note = E'tab\\there, newline\\nthere, back\\\\slash, \"quotes\", ünïcode, 😀' WHERE order_id = 104",
    "UPDATE accounts SET owner = E'odd \\t\\n\\\\ \"q\" ☃', doc = '{\"nested\": {\"deep\": [null, true, 1.5e300]}}',
        meta = '[1,2 , 3]', blob = '\\x00', seen = timestamptz '1970-01-01 00:00:00+00',
        local_ts = timestamp '2038-01-19 03:14:08', id = 'eeeeeeee-0000-0000-0000-000000000001'
        WHERE owner = 'owner 7'",
    "UPDATE lines SET note = NULL WHERE order_id = 105",
    "BEGIN;
     UPDATE tags SET uses = uses + 10 WHERE tag IN ('a', 'á');
     UPDATE tags SET tag = 'A ' WHERE tag = 'A';
     DELETE FROM tags WHERE tag = 'a ';
     INSERT INTO tags VALUES ('a  ', 7), (E'new\\nline', 8);
     COMMIT;",
    "INSERT INTO accounts (id, owner, balance) VALUES ('00000000-0000-0000-0000-000000000005', 'owner 5 again', 0)",
    "UPDATE accounts SET rate = 0, score = 1e308, doc = 'null', meta = NULL WHERE owner = 'owner 9'",
    "TRUNCATE tags",
    "INSERT INTO tags VALUES ('after the truncate', 1), ('a', 42)",
];

async fn target(backend: Backend, table: &Replicated, topic: String) -> Case {
    let mut case = Case::with_table(
        backend,
        &format!("dbz_{}", table.name),
        1,
        brokers(),
        &(table.target)(backend),
    )
    .await;
    case.topic = topic;
    case
}

/// Waits until `case`'s table holds exactly `expected`; panics with both after `timeout`.
async fn wait_for_rows(
    table: &Replicated,
    case: &Case,
    expected: &[String],
    timeout: Duration,
    log: &Path,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = table.rows_in(case).await;
        if rows == expected {
            return;
        }
        if Instant::now() > deadline {
            let extra: Vec<_> = rows
                .iter()
                .filter(|r| !expected.contains(r))
                .take(10)
                .collect();
            let missing: Vec<_> = expected
                .iter()
                .filter(|r| !rows.contains(r))
                .take(10)
                .collect();
            panic!(
                "{} {}: the target does not equal the source after {timeout:?}: {} rows against \
                 {}; not in the source: {extra:?}; missing: {missing:?}\nidemsink log:\n{}",
                case.backend,
                table.name,
                rows.len(),
                expected.len(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until each running pipeline's table holds exactly `expected` (see [`wait_for_rows`]).
async fn wait_for_each(table: &Replicated, targets: &[(Case, Connector)], expected: &[String]) {
    for (case, running) in targets {
        wait_for_rows(
            table,
            case,
            expected,
            Duration::from_secs(120),
            &running.log,
        )
        .await;
    }
}

/// A source database of its own on the development PostgreSQL, named from `prefix`, with
/// `schema` run in it.
async fn captured(prefix: &str, schema: &str) -> CapturedDatabase {
    CapturedDatabase::create(&database_url(Backend::Postgres), &unique(prefix), schema)
        .await
        .expect("source database")
}

/// One pipeline into one target database, and the captured tables it writes.
struct Target {
    tables: Vec<(&'static Replicated, Case)>,
    config: PathBuf,
}

impl Target {
    /// The pipeline of `tables` (each from its Debezium topic) into `backend`, named after
    /// its first table's case.
    async fn create(
        backend: Backend,
        tables: &[&'static Replicated],
        source: &CapturedDatabase,
    ) -> Target {
        let mut cases: Vec<(&Replicated, Case)> = Vec::new();
        for table in tables {
            let topic = source.topic(&format!("public.{}", table.name));
            let mut case = target(backend, table, topic).await;
            if let Some((_, first)) = cases.first() {
                case.name.clone_from(&first.name); // one pipeline: its offsets are the first case's
            }
            cases.push((*table, case));
        }
        let (first_table, first) = &cases[0];
        let routes: Vec<(&str, &str)> = (cases.iter())
            .map(|(_, case)| (case.topic.as_str(), case.table.as_str()))
            .collect();
        let pipeline = first.pipeline().sink(first_table.sink);
        let config = if routes.len() == 1 {
            pipeline.write()
        } else {
            pipeline.tables(&routes).write()
        };
        Target {
            tables: cases,
            config,
        }
    }

    /// Waits until every table equals its source table as it is now (`running` writes them;
    /// its log goes with a failure).
    async fn wait_for_source(&self, running: &Connector, source: &CapturedDatabase) {
        for (table, case) in &self.tables {
            let rows = table.rows_at_source(source).await;
            wait_for_rows(table, case, &rows, Duration::from_secs(120), &running.log).await;
        }
    }

    /// Replays every event from offset 0: the pipeline runs until it has stored every
    /// topic's end offsets, writes batches, and leaves each table as it was. Returns its log.
    async fn replay(&self, source: &CapturedDatabase) -> String {
        let (_, first) = &self.tables[0];
        first.forget_offsets().await;
        let mut running = Connector::start(&self.config);
        for (_, case) in &self.tables {
            let end = case.end_offsets().await;
            case.wait_while_running(&mut running, &end).await;
        }
        let (status, log) = running.stop(Duration::from_secs(20));
        assert!(
            status.success(),
            "SIGTERM must end in a clean exit; log:\n{log}"
        );
        assert!(
            log.contains("batch committed"),
            "{}: the replay wrote batches:\n{log}",
            first.backend
        );
        for (table, case) in &self.tables {
            let last = table.rows_at_source(source).await;
            wait_for_rows(table, case, &last, Duration::ZERO, Path::new("")).await;
        }
        log
    }
}

/// Starts idemsink on each target's pipeline.
fn start_all(targets: &[Target]) -> Vec<Connector> {
    targets
        .iter()
        .map(|target| Connector::start(&target.config))
        .collect()
}

/// Kafka Connect's logs hold no ERROR line.
fn assert_connect_logged_no_error(source: &CapturedDatabase) {
    let connect_log: String = source
        .logs()
        .iter()
        .filter_map(|log| std::fs::read_to_string(log).ok())
        .collect();
    assert!(
        !connect_log.contains(" ERROR "),
        "Kafka Connect logged errors:\n{connect_log}"
    );
}

/// Waits until every target table equals its source table as it is now (`running[i]` runs
/// `targets[i]`).
async fn wait_for_sources(targets: &[Target], running: &[Connector], source: &CapturedDatabase) {
    for (target, connector) in targets.iter().zip(running) {
        target.wait_for_source(connector, source).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_changes_replicate_into_postgres_and_mariadb_through_kills_and_a_replay() {
    let schema: Vec<&str> = TABLES.iter().map(|t| t.source).collect();
    let mut source = captured("dbz", &schema.join(";\n")).await;
    source.exec(SNAPSHOT).await.expect("snapshot rows");
    // The order lines' topic has three partitions: Debezium spreads keys over them, and
    // idemsink's writer lanes too. The others have one, as applying truncates needs.
    for table in TABLES {
        let topic = source.topic(&format!("public.{}", table.name));
        let partitions = if table.sink.contains("truncate: apply") {
            1
        } else {
            3
        };
        testkit::create_topic(&brokers(), &topic, partitions, false)
            .await
            .expect("create topic");
    }
    let mut targets = Vec::new();
    for backend in [Backend::Postgres, Backend::MySql] {
        for tables in PIPELINES {
            targets.push(Target::create(backend, tables, &source).await);
        }
    }
    let captured: Vec<String> = TABLES
        .iter()
        .map(|t| format!("public.{}", t.name))
        .collect();
    source
        .capture(&brokers(), &captured.join(","), "skipped.operations=none")
        .expect("start Debezium");
    let mut running = start_all(&targets);

    wait_for_sources(&targets, &running, &source).await;

    // The workload, every idemsink SIGKILLed and restarted after every other transaction.
    let mut kills = 0;
    for (step, sql) in WORKLOAD.iter().enumerate() {
        source.exec(sql).await.expect("workload");
        if step % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for connector in running {
                connector.kill();
            }
            kills += 1;
            running = start_all(&targets);
        }
    }
    assert!(kills >= 5, "{kills} kills");
    wait_for_sources(&targets, &running, &source).await;

    // A replay of every event from offset 0 leaves each table as it is.
    for connector in running {
        connector.kill();
    }
    for target in &targets {
        target.replay(&source).await;
    }
    assert_connect_logged_no_error(&source);
}

/// Debezium's events flattened by its ExtractNewRecordState transform (a delete rewritten as
/// the row before it with `__deleted: "true"`, and no tombstone, so that `__deleted` alone
/// deletes; tombstones and `__op` are unit-tested), with `format: debezium_flattened`, into both
/// databases: the order lines' snapshot and the workload's statements on them.
#[tokio::test(flavor = "multi_thread")]
async fn flattened_debezium_events_replicate_into_postgres_and_mariadb() {
    let mut source = captured("dbzflat", LINES.source).await;
    source
        .exec(
            SNAPSHOT
                .lines()
                .filter(|l| l.contains("INTO lines"))
                .collect::<String>()
                .as_str(),
        )
        .await
        .expect("snapshot rows");
    let connector = format!("{}_flat", source.name);
    let topic = format!("{connector}.public.lines");
    testkit::create_topic(&brokers(), &topic, 3, false)
        .await
        .expect("create topic");
    let sink = LINES
        .sink
        .replace("format: debezium", "format: debezium_flattened");
    let mut targets = Vec::new();
    for backend in [Backend::Postgres, Backend::MySql] {
        let case = target(backend, &LINES, topic.clone()).await;
        let config = case.pipeline().sink(&sink).write();
        let connector = Connector::start(&config);
        targets.push((case, connector));
    }
    source
        .capture_as(
            &connector,
            &brokers(),
            "public.lines",
            "transforms=flatten
transforms.flatten.type=io.debezium.transforms.ExtractNewRecordState
transforms.flatten.delete.tombstone.handling.mode=rewrite",
        )
        .expect("start Debezium");
    // The snapshot first, so that the workload's changes are streamed.
    let snapshot = LINES.rows_at_source(&source).await;
    wait_for_each(&LINES, &targets, &snapshot).await;
    for sql in WORKLOAD
        .iter()
        .filter(|sql| !sql.contains("accounts") && !sql.contains("tags"))
    {
        source.exec(sql).await.expect("workload");
    }
    let expected = LINES.rows_at_source(&source).await;
    assert!(
        expected.iter().any(|r| r.ends_with("|back again")),
        "the workload ran: {expected:?}"
    );
    wait_for_each(&LINES, &targets, &expected).await;
}

/// Documents: a large text, bytea and jsonb value in every row, which PostgreSQL stores out
/// of line (TOAST). The source keeps `REPLICA IDENTITY DEFAULT`, so an update that leaves
/// one of them unchanged has Debezium send its placeholder instead of the value. Each row is
/// rendered with the values' digests and the text's length.
const DOCS: Replicated = Replicated {
    name: "docs",
    source: "CREATE TABLE docs (id integer PRIMARY KEY, n integer NOT NULL, body text, data bytea, doc jsonb);
        CREATE FUNCTION big(seed integer) RETURNS text LANGUAGE sql VOLATILE AS
          $$ SELECT string_agg(md5(seed || '.' || g || random()::text), '') FROM generate_series(1, 400) g $$",
    target: |backend| match backend {
        Backend::Postgres => "id integer PRIMARY KEY, n integer NOT NULL, body text, data bytea, \
                              doc jsonb, src_pos bigint NOT NULL"
            .into(),
        Backend::MySql => "id integer PRIMARY KEY, n integer NOT NULL, body mediumtext, \
                           data mediumblob, doc json, src_pos bigint NOT NULL"
            .into(),
    },
    sink: "  format: debezium
  mode: upsert
  newer_by: src_pos
  columns:
    \"*\": auto
    src_pos: $source_position
batch:
  max_wait_ms: 50
",
    rows_postgres: "SELECT CONCAT_WS('|', id, n, COALESCE(md5(body), '∅'), COALESCE(md5(data), '∅'),
        COALESCE(md5(doc::text), '∅'), COALESCE(length(body)::text, '∅')) FROM TABLE",
    rows_mysql: "SELECT CONVERT(CONCAT_WS('|', id, n, COALESCE(MD5(body), '∅'), COALESCE(MD5(data), '∅'),
        COALESCE(MD5(doc), '∅'), COALESCE(CAST(CHAR_LENGTH(body) AS CHAR), '∅')) USING utf8mb4) FROM TABLE",
};

/// Changes to the documents that leave the large values unchanged (Debezium sends its
/// placeholder), change some of them, NULL one, and do both to one row within one
/// transaction; a placeholder update right before the row's delete, and a row deleted and
/// inserted again.
const DOCS_WORKLOAD: &[&str] = &[
    "UPDATE docs SET n = n + 1",
    "UPDATE docs SET body = big(id + 1000) WHERE id % 3 = 0",
    "BEGIN;
     INSERT INTO docs SELECT i, 0, big(i), decode(big(i), 'hex'), jsonb_build_object('id', i, 'body', big(i))
       FROM generate_series(21, 25) i;
     UPDATE docs SET n = n + 10 WHERE id > 20;
     COMMIT;",
    "UPDATE docs SET doc = NULL, n = 7 WHERE id = 2",
    "UPDATE docs SET n = 8 WHERE id = 2",
    "BEGIN; UPDATE docs SET n = n + 1 WHERE id = 4; DELETE FROM docs WHERE id = 4; COMMIT;",
    "UPDATE docs SET data = '\\x0102' WHERE id = 5",
    "UPDATE docs SET n = 9 WHERE id = 5",
    "BEGIN;
     UPDATE docs SET body = big(600) WHERE id = 6;
     UPDATE docs SET n = 99 WHERE id = 6;
     UPDATE docs SET doc = jsonb_build_object('v', big(601)) WHERE id = 6;
     UPDATE docs SET n = 100 WHERE id = 6;
     COMMIT;",
    "DELETE FROM docs WHERE id = 7",
    "INSERT INTO docs VALUES (7, 70, big(700), decode(big(700), 'hex'), '{\"small\": true}')",
    "UPDATE docs SET n = n + 1 WHERE id IN (7, 8)",
    "UPDATE docs SET n = n + 1 WHERE id % 2 = 0",
];

/// A column PostgreSQL stores out of line and an update leaves unchanged keeps its value in
/// the target: Debezium's placeholder is never written, on either database, through SIGKILLs
/// of idemsink, a SIGKILL of the Connect worker (which sends the changes after its last
/// flushed offset again) and a replay from offset 0, one record a batch.
#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toasted_values_are_kept_through_kills_a_connect_restart_and_a_replay() {
    let mut source = captured("dbztoast", DOCS.source).await;
    source
        .exec(
            "INSERT INTO docs SELECT i, i, big(i), decode(big(i), 'hex'),
               jsonb_build_object('id', i, 'body', big(i)) FROM generate_series(1, 20) i",
        )
        .await
        .expect("snapshot rows");
    // Out of line: each value is stored larger than a row may hold inline (about 2 kB).
    let stored_out_of_line: Vec<String> = source
        .texts(
            "SELECT (LEAST(pg_column_size(body), pg_column_size(data), pg_column_size(doc)) > 2100)::text
             FROM docs",
        )
        .await
        .expect("sizes");
    assert!(
        stored_out_of_line.iter().all(|t| t == "true"),
        "the values must be TOASTed: {stored_out_of_line:?}"
    );
    let topic = source.topic("public.docs");
    testkit::create_topic(&brokers(), &topic, 3, false)
        .await
        .expect("create topic");
    let mut targets = Vec::new();
    for backend in [Backend::Postgres, Backend::MySql] {
        targets.push(Target::create(backend, &[&DOCS], &source).await);
    }
    source
        .capture(&brokers(), "public.docs", "")
        .expect("start Debezium");
    let mut running = start_all(&targets);
    wait_for_sources(&targets, &running, &source).await;

    for (step, sql) in DOCS_WORKLOAD.iter().enumerate() {
        source.exec(sql).await.expect("workload");
        if step == DOCS_WORKLOAD.len() / 2 {
            source
                .restart_capture()
                .await
                .expect("restart Kafka Connect");
        }
        if step % 3 == 2 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for connector in running {
                connector.kill();
            }
            running = start_all(&targets);
        }
    }
    let expected = DOCS.rows_at_source(&source).await;
    assert_eq!(expected.len(), 24, "rows 1–25 but 4: {expected:?}");
    wait_for_sources(&targets, &running, &source).await;
    for connector in running {
        connector.kill();
    }
    for target in &targets {
        // One record a batch: each placeholder update is then a patch of the stored row by
        // itself, where in the first pass most were folded into the writes of their batch.
        let config = std::fs::read_to_string(&target.config).expect("pipeline file");
        let one_by_one = config.replace("batch:\n", "batch:\n  max_records: 1\n");
        assert_ne!(config, one_by_one, "the pipeline file has a batch section");
        std::fs::write(&target.config, one_by_one).expect("pipeline file");
        target.replay(&source).await;
    }
    assert_connect_logged_no_error(&source);
}

/// Bytes: a bytea column, sent by Debezium as the pipeline's `binary_handling_mode` says.
const BLOBS: Replicated = Replicated {
    name: "blobs",
    source: "CREATE TABLE blobs (id integer PRIMARY KEY, b bytea, note text)",
    target: |backend| match backend {
        Backend::Postgres => "id integer PRIMARY KEY, b bytea, note text, src_pos bigint NOT NULL".into(),
        Backend::MySql => {
            "id integer PRIMARY KEY, b mediumblob, note text, src_pos bigint NOT NULL".into()
        }
    },
    sink: "",
    rows_postgres: "SELECT CONCAT_WS('|', id, COALESCE(encode(b, 'hex'), '∅'), COALESCE(note, '∅')) FROM TABLE",
    rows_mysql: "SELECT CONVERT(CONCAT_WS('|', id, COALESCE(LOWER(HEX(b)), '∅'), COALESCE(note, '∅')) USING utf8mb4) FROM TABLE",
};

/// Debezium's `binary.handling.mode` base64 and hex send bytes as strings, which its schema
/// does not tell from text: with `sink.binary_handling_mode` the same, the bytes land as they
/// are at the source, on both databases; without it, the pipeline stops at the first such
/// field, saying what to set.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_sent_as_base64_or_hex_land_as_the_source_has_them() {
    let mut source = captured("dbzbin", BLOBS.source).await;
    source
        .exec(
            "INSERT INTO blobs VALUES (1, '\\x00ff10', 'odd bytes'), (2, '', 'empty'), (3, NULL, 'null'),
               (4, decode(repeat('fb', 5000), 'hex'), 'large')",
        )
        .await
        .expect("snapshot rows");
    let mut targets = Vec::new();
    for mode in ["base64", "hex"] {
        let connector = format!("{}_{mode}", source.name);
        let topic = format!("{connector}.public.blobs");
        testkit::create_topic(&brokers(), &topic, 1, false)
            .await
            .expect("create topic");
        source
            .capture_as(
                &connector,
                &brokers(),
                "public.blobs",
                &format!("binary.handling.mode={mode}"),
            )
            .expect("start Debezium");
        let sink = format!(
            "  format: debezium\n  mode: upsert\n  newer_by: src_pos\n  binary_handling_mode: {mode}\n  \
             columns:\n    \"*\": auto\n    src_pos: $source_position\nbatch:\n  max_wait_ms: 50\n"
        );
        for backend in [Backend::Postgres, Backend::MySql] {
            let case = target(backend, &BLOBS, topic.clone()).await;
            let config = case.pipeline().sink(&sink).write();
            let running = Connector::start(&config);
            targets.push((case, running));
        }
        if mode == "base64" {
            // Not told the mode: the first field of bytes as text stops the pipeline.
            let case = target(Backend::Postgres, &BLOBS, topic.clone()).await;
            let untold = case
                .pipeline()
                .sink(&sink.replace("  binary_handling_mode: base64\n", ""))
                .write();
            let (_, log) = Connector::run_to_failure(&untold, "mode untold", ErrorKind::BadRecord);
            assert!(log.contains("sink.binary_handling_mode"), "{log}");
        }
    }
    let snapshot = BLOBS.rows_at_source(&source).await;
    wait_for_each(&BLOBS, &targets, &snapshot).await;
    source
        .exec(
            "UPDATE blobs SET b = '\\xdeadbeef' WHERE id = 1;
             UPDATE blobs SET note = 'the bytes stay' WHERE id = 4;
             INSERT INTO blobs VALUES (5, decode(md5('x'), 'hex'), 'streamed');
             UPDATE blobs SET b = NULL WHERE id = 2",
        )
        .await
        .expect("workload");
    let expected = BLOBS.rows_at_source(&source).await;
    assert!(
        expected.iter().any(|r| r.starts_with("4|fbfb")),
        "{expected:?}"
    );
    wait_for_each(&BLOBS, &targets, &expected).await;
    assert_connect_logged_no_error(&source);
}

/// A PostgreSQL change event's value, schemaless: `op` at `lsn` with its row images.
fn event(op: &str, lsn: i64, before: Value, after: Value) -> Vec<u8> {
    let event = json!({
        "before": before,
        "after": after,
        "source": {"connector": "postgresql", "snapshot": "false", "lsn": lsn},
        "op": op,
    });
    event.to_string().into_bytes()
}

/// A change event of row `id` at `lsn` (`op` c, u or d), keyed by the row's id.
fn change(id: i64, op: &str, lsn: i64, name: &str) -> Outgoing {
    let row = json!({"id": id, "name": name});
    let (before, after) = if op == "d" {
        (row, Value::Null)
    } else {
        (Value::Null, row)
    };
    Outgoing {
        partition: 0,
        key: Some(json!({"id": id}).to_string().into_bytes()),
        value: Some(event(op, lsn, before, after)),
    }
}

/// A truncate event at `lsn`, as Debezium sends it: without a key.
fn truncate(lsn: i64) -> Outgoing {
    Outgoing {
        partition: 0,
        key: None,
        value: Some(event("t", lsn, Value::Null, Value::Null)),
    }
}

/// A sink of every column by name, versioned by the source's position.
const BY_SOURCE_POSITION: &str = "  format: debezium\n  mode: upsert\n  newer_by: src_pos\n  \
                                  columns:\n    \"*\": auto\n    src_pos: $source_position\n";

/// Produces each of `runs` and runs the pipeline until it has stored their end offsets, one
/// run after the other; returns the last run's log.
async fn apply_runs(case: &Case, config: &Path, runs: &[&[Outgoing]]) -> String {
    let mut log = String::new();
    for events in runs {
        testkit::produce(&case.producer(), &case.topic, events)
            .await
            .expect("produce");
        let end = case.end_offsets().await;
        log = case.run_until_stored(config, &end).await;
    }
    log
}

/// A table of rows (id, name) versioned by the source's position, its topic of one
/// partition, and its pipeline with `sink` (the lines after `sink.table`).
async fn versioned_by_source(backend: Backend, prefix: &str, sink: &str) -> (Case, PathBuf) {
    let case = Case::with_table(
        backend,
        prefix,
        1,
        brokers(),
        "id bigint PRIMARY KEY, name text, src_pos bigint NOT NULL",
    )
    .await;
    let config = case.pipeline().sink(sink).write();
    (case, config)
}

/// With `newer_by` on `$source_position`, a change older than the stored row (as Debezium
/// sends again after a restart of its own, at later Kafka offsets) changes nothing: neither an
/// update nor a delete.
async fn older_changes_from_the_source_change_nothing(backend: Backend) {
    let (case, config) = versioned_by_source(
        backend,
        "dbz_order",
        "  format: debezium\n  mode: upsert\n  key: [id]\n  newer_by: src_pos\n  columns:\n    \
         id: /id\n    name: /name\n    src_pos: $source_position\n",
    )
    .await;
    // Two runs: the older changes meet the stored rows in the database (its guards), and
    // within one batch (its reduction).
    let first = [
        change(1, "c", 100, "first"),
        change(2, "c", 110, "second"),
        change(1, "u", 300, "newest"),
    ];
    let again = [
        change(1, "u", 200, "older update"),
        change(1, "d", 250, "older delete"),
        change(2, "d", 120, "newer delete"),
        change(3, "c", 50, "third"),
        change(3, "d", 60, "third deleted"),
        change(3, "u", 55, "older than the delete"),
    ];
    apply_runs(&case, &config, &[&first, &again]).await;
    let rows = case
        .texts(
            "SELECT CONCAT_WS('|', id, name, src_pos) FROM TABLE"
                .replace("TABLE", &case.table)
                .as_str(),
        )
        .await;
    assert_eq!(rows, ["1|newest|300"], "{backend}");
}

/// With `sink.truncate: apply`, a truncate removes every row older than it by the source's
/// position — stored before, or earlier in its own batch — and what is newer stays; a replay
/// from offset 0 ends the same.
async fn a_truncate_removes_what_is_older_than_it(backend: Backend) {
    let (case, config) = versioned_by_source(
        backend,
        "dbz_truncate",
        "  format: debezium\n  mode: upsert\n  newer_by: src_pos\n  truncate: apply\n  \
         columns:\n    \"*\": auto\n    src_pos: $source_position\n",
    )
    .await;
    let before = [
        change(1, "c", 100, "stored, older"),
        change(2, "c", 300, "stored, newer"),
        change(3, "c", 150, "stored, older"),
    ];
    let with_truncate = [
        change(5, "c", 120, "older, in the truncate's batch"),
        truncate(200),
        change(4, "c", 250, "newer"),
        change(2, "u", 310, "newer update"),
        change(6, "c", 190, "older, after it in Kafka"),
    ];
    let rows = || async {
        let sql = format!(
            "SELECT CONCAT_WS('|', id, name, src_pos) FROM {} ORDER BY id",
            case.table
        );
        case.texts(&sql).await
    };
    apply_runs(&case, &config, &[&before, &with_truncate]).await;
    let expected = ["2|newer update|310", "4|newer|250"];
    assert_eq!(rows().await, expected, "{backend}");
    case.forget_offsets().await;
    let log = case
        .run_until_stored(&config, &case.end_offsets().await)
        .await;
    assert!(log.contains("batch committed"), "the replay wrote:\n{log}");
    assert_eq!(rows().await, expected, "{backend}: after the replay");
}

/// Debezium's placeholder for a value it did not have leaves the stored value as it is, and
/// an update that has it for a row the table does not have (an older change sent again after
/// the row's delete) writes nothing, and is logged with its coordinates and counted.
async fn a_placeholder_keeps_the_stored_value_and_needs_a_stored_row(backend: Backend) {
    let (case, config) = versioned_by_source(backend, "dbz_toast", BY_SOURCE_POSITION).await;
    let placeholder = "__debezium_unavailable_value";
    let created = [change(1, "c", 100, "kept"), change(2, "c", 110, "two")];
    let updated = [
        change(1, "u", 200, placeholder),
        change(3, "u", 300, placeholder),
        change(2, "u", 120, placeholder),
        change(2, "u", 130, "new"),
        change(2, "u", 140, placeholder),
    ];
    let log = apply_runs(&case, &config, &[&created, &updated]).await;
    let rows = case
        .texts(&format!(
            "SELECT CONCAT_WS('|', id, name, src_pos) FROM {} ORDER BY id",
            case.table
        ))
        .await;
    assert_eq!(rows, ["1|kept|200", "2|new|140"], "{backend}");
    let absent = log
        .lines()
        .find(|l| l.contains("for a row the table does not have"))
        .unwrap_or_else(|| panic!("{backend}: the update of row 3 is reported:\n{log}"));
    assert!(absent.contains("offset=3"), "{absent}");
}

/// A change event of Debezium's MySQL connector: row `id` gets `name`, as row `row` of the
/// rows event at `pos` of binlog file 3.
fn binlog_change(id: i64, pos: i64, row: i64, name: &str) -> Outgoing {
    let event = json!({
        "before": null,
        "after": {"id": id, "name": name},
        "source": {"connector": "mysql", "snapshot": "false", "file": "mysql-bin.000003",
                   "pos": pos, "row": row},
        "op": "u",
    });
    Outgoing {
        partition: 0,
        key: Some(json!({"id": id}).to_string().into_bytes()),
        value: Some(event.to_string().into_bytes()),
    }
}

/// One rows event may change a row several times (`INSERT … ON DUPLICATE KEY UPDATE` with a
/// key repeated, `REPLACE`): Debezium gives each row change the event's position and its
/// index in the event (`source.row`), and the last one wins — in one batch and across
/// batches, and a replay of an earlier one changes nothing.
async fn the_rows_of_one_binlog_event_apply_in_their_order(backend: Backend) {
    let (case, config) = versioned_by_source(backend, "dbz_binlog", BY_SOURCE_POSITION).await;
    let one_event = [
        binlog_change(1, 4015, 0, "n=1"),
        binlog_change(1, 4015, 1, "n=2"),
        binlog_change(1, 4015, 2, "n=3"),
        binlog_change(2, 4015, 3, "other row"),
    ];
    let later = [
        binlog_change(2, 4015, 3, "other row"),
        binlog_change(1, 4015, 1, "n=2 again"),
        binlog_change(2, 4099, 0, "next event"),
    ];
    apply_runs(&case, &config, &[&one_event, &later]).await;
    let rows = case
        .texts(&format!(
            "SELECT CONCAT_WS('|', id, name, src_pos) FROM {} ORDER BY id",
            case.table
        ))
        .await;
    let at = |pos: i64| (3i64 << 32) + pos;
    assert_eq!(
        rows,
        [
            format!("1|n=3|{}", at(4017)),
            format!("2|next event|{}", at(4099))
        ],
        "{backend}"
    );
}

on_both_databases!(
    older_changes_from_the_source_change_nothing,
    the_rows_of_one_binlog_event_apply_in_their_order,
    a_truncate_removes_what_is_older_than_it,
    a_placeholder_keeps_the_stored_value_and_needs_a_stored_row
);

/// The same rule while the pipeline runs: a partition added to a truncating topic stops it
/// at the first record of that partition, naming the topic, with what came before committed
/// and nothing of the new partition written.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_added_while_applying_truncates_stops_the_pipeline() {
    let case = Case::with_table(
        Backend::Postgres,
        "dbz_truncate_grow",
        1,
        brokers(),
        "id bigint PRIMARY KEY, name text, src_pos bigint NOT NULL",
    )
    .await;
    let config = case
        .pipeline()
        .property("topic.metadata.refresh.interval.ms", "1000")
        .sink(
            "  format: debezium\n  mode: upsert\n  newer_by: src_pos\n  truncate: apply\n  \
             columns:\n    \"*\": auto\n    src_pos: $source_position\n",
        )
        .write();
    let connector = Connector::start(&config);
    connector.wait_assigned(Duration::from_secs(30)).await;
    testkit::produce(&case.producer(), &case.topic, &[change(1, "c", 100, "one")])
        .await
        .expect("produce");
    let first = case.end_offsets().await;
    case.wait_for_offsets(&first, Duration::from_secs(30)).await;
    testkit::add_partitions(&case.brokers, &case.topic, 2)
        .await
        .expect("add a partition");
    let mut late = change(2, "c", 90, "from the new partition");
    late.partition = 1;
    testkit::produce(&case.producer(), &case.topic, &[late])
        .await
        .expect("produce");
    let (status, log) = connector.wait(Duration::from_secs(60));
    common::assert_failed_as(status, ErrorKind::Configuration, &log);
    assert!(
        log.contains("sink.truncate") && log.contains("now has partition 1"),
        "the pipeline names the topic and the partition:\n{log}"
    );
    let rows = case
        .texts(&format!(
            "SELECT CONCAT_WS('|', id, name) FROM {}",
            case.table
        ))
        .await;
    assert_eq!(rows, ["1|one"], "nothing of the new partition is written");
    assert_eq!(case.stored_offsets().await, first);
}

/// A truncate lands in any partition: applying truncates needs topics of one partition, or a
/// change read late from another partition would bring back a row the truncate removed.
#[tokio::test(flavor = "multi_thread")]
async fn applying_truncates_needs_topics_of_one_partition() {
    let case = Case::with_table(
        Backend::Postgres,
        "dbz_truncate_parts",
        2,
        brokers(),
        "id bigint PRIMARY KEY, src_pos bigint NOT NULL",
    )
    .await;
    let config = case
        .pipeline()
        .sink(
            "  format: debezium\n  mode: upsert\n  newer_by: src_pos\n  truncate: apply\n  \
             columns:\n    id: /id\n    src_pos: $source_position\n",
        )
        .write();
    let (_, log) = Connector::run_to_failure(&config, "two partitions", ErrorKind::Configuration);
    assert!(
        log.contains("sink.truncate") && log.contains("has 2"),
        "the pipeline must refuse to start, naming the topic:\n{log}"
    );
}
