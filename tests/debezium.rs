//! Replication from a real Debezium: a Kafka Connect standalone worker runs Debezium's
//! PostgreSQL source connector (pgoutput) on a database of the development PostgreSQL, and
//! idemsink applies its change events (`sink.format: debezium`) to PostgreSQL and MariaDB,
//! SIGKILLed between the source's transactions. The target must equal the source row for row,
//! and a replay from offset 0 must change nothing.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{brokers, database_url, free_port, unique, Backend, Case, Connector};
use idemsink::testkit;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// A database of the development PostgreSQL captured by Debezium through a Kafka Connect
/// worker of its own. Dropping it stops the worker and removes the replication slot, the
/// publication and the database.
struct CapturedDatabase {
    name: String,
    url: String,
    worker: Option<Child>,
    dir: tempfile::TempDir,
}

impl CapturedDatabase {
    /// Creates the database and runs `schema` in it; nothing is captured yet.
    async fn create(schema: &str) -> CapturedDatabase {
        let name = unique("dbz");
        let admin = database_url(Backend::Postgres);
        let mut conn = PgConnection::connect(&admin).await.expect("connect");
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create the source database");
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("no database in {admin}"),
        };
        let source = CapturedDatabase {
            name,
            url,
            worker: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        source.exec(schema).await;
        source
    }

    async fn exec(&self, sql: &str) {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn texts(&self, sql: &str) -> Vec<String> {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        sqlx::query_scalar(sql)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Starts a Connect worker running Debezium on `tables` (`schema.table`), whose events go
    /// to `<database>.<schema>.<table>`, with JsonConverter schemas on key and value.
    fn capture(&mut self, tables: &str) {
        let lib = Command::new("scripts/devenv.sh")
            .arg("connect-lib")
            .stderr(Stdio::inherit())
            .output()
            .expect("scripts/devenv.sh connect-lib");
        assert!(lib.status.success(), "fetching Kafka Connect's jars failed");
        let lib = String::from_utf8(lib.stdout).expect("utf8");
        let server: PgConnectOptions = self.url.parse().expect("database URL");
        let dir = self.dir.path();
        let worker = format!(
            "bootstrap.servers={brokers}
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=true
value.converter.schemas.enable=true
offset.storage.file.filename={offsets}
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:{port}
plugin.discovery=only_scan
",
            brokers = brokers(),
            offsets = dir.join("offsets").display(),
            port = free_port(),
        );
        let connector = format!(
            "name={name}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname={host}
database.port={port}
database.user={user}
database.password=unused
database.dbname={name}
topic.prefix={name}
plugin.name=pgoutput
slot.name={name}
publication.name={name}
publication.autocreate.mode=filtered
table.include.list={tables}
",
            name = self.name,
            host = server.get_host(),
            port = server.get_port(),
            user = server.get_username(),
        );
        std::fs::write(dir.join("worker.properties"), worker).expect("write");
        std::fs::write(dir.join("connector.properties"), connector).expect("write");
        let log = std::fs::File::create(self.log()).expect("log file");
        let child = Command::new("java")
            .arg("-Xmx384m")
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                std::fs::canonicalize("scripts/kafka/log4j2.properties")
                    .expect("log4j2.properties")
                    .display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", lib.trim()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.join("worker.properties"))
            .arg(dir.join("connector.properties"))
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start Kafka Connect");
        self.worker = Some(child);
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("connect.log")
    }

    fn topic(&self, table: &str) -> String {
        format!("{}.{table}", self.name)
    }
}

impl Drop for CapturedDatabase {
    fn drop(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            let _ = worker.kill();
            let _ = worker.wait();
        }
        // The slot would keep WAL for ever: drop it once its walsender has gone, then the rest.
        let admin = database_url(Backend::Postgres);
        let sql = format!(
            "DO $$ BEGIN
               FOR i IN 1..100 LOOP
                 EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{name}' AND active);
                 PERFORM pg_sleep(0.1);
               END LOOP;
               PERFORM pg_drop_replication_slot('{name}') FROM pg_replication_slots WHERE slot_name = '{name}';
             END $$;
             DROP DATABASE IF EXISTS {name} WITH (FORCE);",
            name = self.name
        );
        let _ = Command::new("psql")
            .args(["-q", "-X", "-d", &admin, "-c", &sql])
            .stdout(Stdio::null())
            .status();
    }
}

/// The source table: a key of two columns, text with odd bytes, NULLs.
const SOURCE_TABLE: &str = "CREATE TABLE lines (
    order_id bigint NOT NULL,
    line integer NOT NULL,
    qty integer NOT NULL,
    note text,
    PRIMARY KEY (order_id, line)
)";

/// The same columns in the target, with the Kafka position that guards against replays.
fn target_table(backend: Backend) -> String {
    let partition = idemsink::schema::quote(backend, "kafka_partition");
    format!(
        "order_id bigint NOT NULL,
         line integer NOT NULL,
         qty integer NOT NULL,
         note text,
         {partition} integer NOT NULL,
         kafka_offset bigint NOT NULL,
         PRIMARY KEY (order_id, line)"
    )
}

const SINK: &str = "  format: debezium
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
";

/// Every row as one line of text, in key order: the same query on both databases.
const ROWS: &str = "SELECT CONCAT_WS('|', order_id, line, qty, COALESCE(note, '<null>')) \
                    FROM lines_table ORDER BY order_id, line";

/// The source's transactions after the snapshot: inserts, updates, an update of the key,
/// deletes, a row deleted and inserted again, several statements in one transaction, and
/// text Debezium and both databases must carry byte for byte.
const WORKLOAD: &[&str] = &[
    "INSERT INTO lines SELECT o, l, o * l, 'streamed' FROM generate_series(100, 140) o, generate_series(1, 3) l",
    "UPDATE lines SET qty = qty + 1000 WHERE order_id % 3 = 0",
    "UPDATE lines SET line = line + 10 WHERE order_id % 5 = 0",
    "DELETE FROM lines WHERE order_id % 7 = 0",
    "BEGIN;
     INSERT INTO lines VALUES (500, 1, 1, 'in a transaction');
     UPDATE lines SET qty = 2 WHERE order_id = 500;
     UPDATE lines SET qty = 3, note = NULL WHERE order_id = 500;
     DELETE FROM lines WHERE order_id = 101;
     COMMIT;",
    "DELETE FROM lines WHERE order_id = 102 AND line = 1",
    "INSERT INTO lines VALUES (102, 1, 42, 'back again')",
    "UPDATE lines SET note = E'tab\\there, newline\\nthere, back\\\\slash, \"quotes\", ünïcode, 😀' WHERE order_id = 104",
    "UPDATE lines SET note = NULL WHERE order_id = 105",
];

async fn target(backend: Backend, topic: &str) -> Case {
    let mut case =
        Case::with_table(backend, "dbz_target", 1, brokers(), &target_table(backend)).await;
    case.topic = topic.to_string();
    case
}

/// Waits until `case`'s table holds exactly `expected`; panics with both after `timeout`.
async fn wait_for_rows(case: &Case, expected: &[String], timeout: Duration, log: &str) {
    let sql = ROWS.replace("lines_table", &case.table);
    let deadline = Instant::now() + timeout;
    loop {
        let rows = case.texts(&sql).await;
        if rows == expected {
            return;
        }
        if Instant::now() > deadline {
            let diff: Vec<_> = rows
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
                "{}: the target does not equal the source after {timeout:?}: {} rows against {}; \
                 not in the source: {diff:?}; missing: {missing:?}\nidemsink log:\n{}",
                case.backend,
                rows.len(),
                expected.len(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn debezium_changes_replicate_into_postgres_and_mariadb_through_kills_and_a_replay() {
    let mut source = CapturedDatabase::create(SOURCE_TABLE).await;
    source
        .exec("INSERT INTO lines SELECT o, l, o + l, 'snapshot ' || o FROM generate_series(1, 60) o, generate_series(1, 2) l")
        .await;
    let topic = source.topic("public.lines");
    // Three partitions: Debezium spreads keys over them, and idemsink's writer lanes too.
    testkit::create_topic(&brokers(), &topic, 3, false)
        .await
        .expect("create topic");
    let targets = [
        target(Backend::Postgres, &topic).await,
        target(Backend::MySql, &topic).await,
    ];
    let configs: Vec<_> = targets
        .iter()
        .map(|t| t.pipeline().sink(SINK).write())
        .collect();
    source.capture("public.lines");
    let mut running: Vec<Connector> = configs.iter().map(|c| Connector::start(c)).collect();

    let source_rows = ROWS.replace("lines_table", "lines");
    let snapshot = source.texts(&source_rows).await;
    for (case, connector) in targets.iter().zip(&running) {
        wait_for_rows(
            case,
            &snapshot,
            Duration::from_secs(120),
            &connector.log.display().to_string(),
        )
        .await;
    }

    // The workload, with both idemsinks SIGKILLed and restarted after every other transaction.
    for (step, sql) in WORKLOAD.iter().enumerate() {
        source.exec(sql).await;
        if step % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            running = running
                .into_iter()
                .zip(&configs)
                .map(|(connector, config)| {
                    connector.kill();
                    Connector::start(config)
                })
                .collect();
        }
    }
    let last = source.texts(&source_rows).await;
    assert!(
        last.iter().any(|r| r.contains("😀"))
            && last.iter().any(|r| r.starts_with("500|1|3|<null>")),
        "the workload ran: {last:?}"
    );
    for (case, connector) in targets.iter().zip(&running) {
        wait_for_rows(
            case,
            &last,
            Duration::from_secs(120),
            &connector.log.display().to_string(),
        )
        .await;
    }

    // A replay of every event from offset 0 leaves each table as it is.
    for connector in running {
        connector.kill();
    }
    for (case, config) in targets.iter().zip(&configs) {
        case.forget_offsets().await;
        let end = case.end_offsets().await;
        let log = case.run_until_stored(config, &end).await;
        assert!(
            log.contains("batch committed"),
            "{}: the replay wrote batches:\n{log}",
            case.backend
        );
        wait_for_rows(case, &last, Duration::from_secs(1), "").await;
    }
    let connect_log = std::fs::read_to_string(source.log()).unwrap_or_default();
    assert!(
        !connect_log.contains(" ERROR "),
        "Kafka Connect logged errors:\n{connect_log}"
    );
}
