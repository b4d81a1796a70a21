//! Kafka Connect for the tests and the benchmark: a standalone worker (jars from
//! `scripts/devenv.sh`) running a connector, and a database of the development PostgreSQL
//! captured by Debezium's PostgreSQL source connector.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// The repository: `scripts/` is there.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The folder of a set of jars `scripts/devenv.sh` fetches once: `connect-lib` (Kafka Connect
/// and Debezium's PostgreSQL source) or `jdbc-sink-lib` (Debezium's JDBC sink).
pub fn jars(which: &str) -> Result<PathBuf> {
    let out = Command::new(Path::new(ROOT).join("scripts/devenv.sh"))
        .arg(which)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("scripts/devenv.sh {which}"))?;
    if !out.status.success() {
        bail!("scripts/devenv.sh {which} failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A Kafka Connect standalone worker running one connector, with JsonConverter (schemas on)
/// for keys and values; killed when dropped.
pub struct Worker {
    child: Child,
    dir: tempfile::TempDir,
    jars: PathBuf,
}

impl Worker {
    /// Starts a worker with the jars in `jars` and the connector `properties`.
    pub fn start(jars: &Path, brokers: &str, properties: &str) -> Result<Worker> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
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
            offsets = dir.path().join("offsets").display(),
        );
        std::fs::write(dir.path().join("worker.properties"), worker)?;
        std::fs::write(dir.path().join("connector.properties"), properties)?;
        let child = Worker::spawn(jars, dir.path())?;
        Ok(Worker {
            child,
            dir,
            jars: jars.to_path_buf(),
        })
    }

    /// Waits until the worker has flushed a source offset whose text holds `marker` (Connect
    /// keeps offsets as serialized JSON, so the text shows in the file's bytes).
    pub async fn wait_for_offset(&self, marker: &str, timeout: std::time::Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let file = self.dir.path().join("offsets");
        loop {
            let bytes = std::fs::read(&file).unwrap_or_default();
            if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "no offset with {marker:?} flushed to {} in {timeout:?}",
                    file.display()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs the worker and starts it again on the same files: its connector resumes from
    /// the source offsets it had flushed, and sends again what came after them.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Worker::spawn(&self.jars, self.dir.path())?;
        Ok(())
    }

    fn spawn(jars: &Path, dir: &Path) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("connect.log"))?;
        Command::new("java")
            .arg("-Xmx512m")
            .arg(format!(
                "-Dlog4j2.configurationFile={ROOT}/scripts/kafka/log4j2.properties"
            ))
            .arg("-cp")
            .arg(format!("{}/*", jars.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(dir.join("worker.properties"))
            .arg(dir.join("connector.properties"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting Kafka Connect")
    }

    /// The worker's log (warnings and errors).
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("connect.log")
    }

    /// Whether the worker has exited (it does on a connector's fatal error only if asked to).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database of its own on the PostgreSQL at `admin_url`, which Debezium captures once
/// [`capture`](CapturedDatabase::capture) starts a worker. Dropping it stops the worker and
/// removes the replication slot, the publication and the database.
pub struct CapturedDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
    /// The workers capturing it, each running one connector.
    workers: Vec<Worker>,
    /// The connectors' names, which their replication slots and publications have too.
    connectors: Vec<String>,
}

impl CapturedDatabase {
    /// Creates database `name` and runs `schema` in it.
    pub async fn create(admin_url: &str, name: &str, schema: &str) -> Result<CapturedDatabase> {
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .context("create the source database")?;
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => bail!("no database in {admin_url}"),
        };
        let source = CapturedDatabase {
            name: name.to_string(),
            url,
            admin_url: admin_url.to_string(),
            workers: Vec::new(),
            connectors: Vec::new(),
        };
        source.exec(schema).await?;
        Ok(source)
    }

    pub async fn exec(&self, sql: &str) -> Result<()> {
        let mut conn = PgConnection::connect(&self.url).await?;
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .with_context(|| sql.to_string())?;
        Ok(())
    }

    /// The text values of one query's single column.
    pub async fn texts(&self, sql: &str) -> Result<Vec<String>> {
        let mut conn = PgConnection::connect(&self.url).await?;
        sqlx::query_scalar(sql)
            .fetch_all(&mut conn)
            .await
            .with_context(|| sql.to_string())
    }

    /// Starts Debezium (`pgoutput`) on `tables` (`schema.table,…`), with more connector
    /// properties in `extra` (e.g. `snapshot.mode=initial_only`). Events of table `s.t` go to
    /// [`topic`](CapturedDatabase::topic)`("s.t")`.
    pub fn capture(&mut self, brokers: &str, tables: &str, extra: &str) -> Result<()> {
        let name = self.name.clone();
        self.capture_as(&name, brokers, tables, extra)
    }

    /// The same, by a connector of its own named `connector` (its slot, publication and topic
    /// prefix too): events of table `s.t` go to `<connector>.s.t`.
    pub fn capture_as(
        &mut self,
        connector: &str,
        brokers: &str,
        tables: &str,
        extra: &str,
    ) -> Result<()> {
        let server: PgConnectOptions = self.url.parse()?;
        let properties = format!(
            "name={connector}
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
database.hostname={host}
database.port={port}
database.user={user}
database.password=unused
database.dbname={database}
topic.prefix={connector}
plugin.name=pgoutput
slot.name={connector}
publication.name={connector}
publication.autocreate.mode=filtered
table.include.list={tables}
{extra}
",
            database = self.name,
            host = server.get_host(),
            port = server.get_port(),
            user = server.get_username(),
        );
        let worker = Worker::start(&jars("connect-lib")?, brokers, &properties)?;
        self.workers.push(worker);
        self.connectors.push(connector.to_string());
        Ok(())
    }

    /// SIGKILLs the workers and starts them again (see [`Worker::kill_and_restart`]), once
    /// each has flushed an offset of a streamed change: a restart then resumes streaming from
    /// there and sends again the changes after it. (Killed before, Debezium would take its
    /// snapshot again, which brings back no delete.)
    pub async fn restart_capture(&mut self) -> Result<()> {
        for worker in &mut self.workers {
            // `lsn_proc`: Debezium's PostgreSQL offset of a streamed change.
            worker
                .wait_for_offset("lsn_proc", std::time::Duration::from_secs(60))
                .await?;
            worker.kill_and_restart()?;
        }
        Ok(())
    }

    /// Stops the workers (their slots stay until the database is dropped).
    pub fn stop_capture(&mut self) {
        self.workers.clear();
    }

    /// The topic of `table` (`schema.table`).
    pub fn topic(&self, table: &str) -> String {
        format!("{}.{table}", self.name)
    }

    /// The workers' logs.
    pub fn logs(&self) -> Vec<PathBuf> {
        self.workers.iter().map(Worker::log).collect()
    }
}

impl Drop for CapturedDatabase {
    fn drop(&mut self) {
        self.workers.clear();
        // The slots would keep WAL for ever: drop them once their walsenders have gone, then
        // the database (each -c runs on its own: DROP DATABASE cannot run in a transaction).
        let slots = self
            .connectors
            .iter()
            .map(|c| format!("'{c}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let drop_slot = format!(
            "DO $$ BEGIN
               FOR i IN 1..100 LOOP
                 EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name IN ({slots}) AND active);
                 PERFORM pg_sleep(0.1);
               END LOOP;
               PERFORM pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ({slots});
             END $$"
        );
        let drop_database = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let mut psql = Command::new("psql");
        psql.args(["-q", "-X", "-d", &self.admin_url]);
        if !self.connectors.is_empty() {
            psql.args(["-c", &drop_slot]);
        }
        let _ = psql
            .args(["-c", &drop_database])
            .stdout(Stdio::null())
            .status();
    }
}
