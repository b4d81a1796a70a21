//! Why a pipeline stopped, by kind: what failed, and whether trying again can help.
//!
//! Every failure that ends a pipeline is a [`PipelineError`]: the pipeline's name and a
//! [`Failure`] that says what failed. Each failure has an [`ErrorKind`], which `main` logs as
//! `kind` and turns into the process's exit code (`sysexits.h`), so an operator, a supervisor
//! or a test can tell a bad configuration from a database that is down from a bad record
//! without reading the message.

use rdkafka::error::KafkaError;
use sqlx::migrate::MigrateError;

use crate::config::ConfigErrors;
use crate::db::is_transient;
use crate::mapping::ConvertError;
use crate::offsets::TopicPartition;

/// What kind of failure stopped a pipeline, and so what helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A pipeline file, or a table it names, must change: retrying cannot help.
    Configuration,
    /// The database or Kafka was unavailable or busy for longer than `errors.retry_for_ms`:
    /// a restart may succeed.
    Transient,
    /// The database or Kafka refused in a way that does not pass by itself (a permission, a
    /// stored offset Kafka no longer has, a fatal consumer error): an operator must act.
    Permanent,
    /// A record that cannot become a row (`errors.tolerance: none`).
    BadRecord,
    /// A row the database refused for what it holds, with its SQLSTATE
    /// (`errors.tolerance: none`).
    RejectedRow,
    /// idemsink broke one of its own invariants: a bug.
    Internal,
}

impl ErrorKind {
    /// Whether the same work may succeed if tried again later.
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Transient
    }

    /// The exit code of a process that stops on a failure of this kind (`sysexits.h`).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Configuration => 78,                      // EX_CONFIG
            ErrorKind::Transient => 75,                          // EX_TEMPFAIL
            ErrorKind::Permanent => 69,                          // EX_UNAVAILABLE
            ErrorKind::BadRecord | ErrorKind::RejectedRow => 65, // EX_DATAERR
            ErrorKind::Internal => 70,                           // EX_SOFTWARE
        }
    }

    /// The name logged as the `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Configuration => "configuration",
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::BadRecord => "bad_record",
            ErrorKind::RejectedRow => "rejected_row",
            ErrorKind::Internal => "internal",
        }
    }

    /// The kind of a database error: transient faults pass, the rest does not.
    pub fn of_database(e: &sqlx::Error) -> ErrorKind {
        match e {
            sqlx::Error::Configuration(_) => ErrorKind::Configuration,
            e if is_transient(e) => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        }
    }

    /// The kind of a Kafka client error: librdkafka retries transport problems itself, so
    /// what reaches idemsink passes only when it is a timeout.
    pub fn of_kafka(e: &KafkaError) -> ErrorKind {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match e {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
                ErrorKind::Configuration
            }
            _ => match e.rdkafka_error_code() {
                Some(Code::OperationTimedOut | Code::RequestTimedOut | Code::AllBrokersDown) => {
                    ErrorKind::Transient
                }
                _ => ErrorKind::Permanent,
            },
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A pipeline that stopped, and why.
#[derive(Debug)]
pub struct PipelineError {
    pub pipeline: String,
    pub failure: Failure,
}

impl PipelineError {
    pub fn new(pipeline: &str, failure: Failure) -> PipelineError {
        PipelineError {
            pipeline: pipeline.to_string(),
            failure,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.failure.kind()
    }
}

impl std::fmt::Display for PipelineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.failure {
            // Each line already names its file and key.
            Failure::Config(errors) => write!(f, "{errors}"),
            failure => write!(f, "pipeline {}: {failure}", self.pipeline),
        }
    }
}

impl std::error::Error for PipelineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.failure)
    }
}

/// What failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// `url` with its password redacted.
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("creating idemsink's tables failed: {0}")]
    Migrate(#[from] MigrationError),
    #[error("database: {context}: {source}")]
    Database {
        context: &'static str,
        source: sqlx::Error,
    },
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        source: KafkaError,
    },
    /// Where a partition reads from could not be settled: its stored offset could not be
    /// read on assignment, stands outside what Kafka has, or a seek to it failed. The
    /// partition was not read from a guessed place.
    #[error("{reason}")]
    Position { kind: ErrorKind, reason: String },
    #[error(
        "record topic {} partition {} offset {offset} cannot be written: {error}; \
         it and the records after it in its partition were not committed \
         (errors.tolerance: all would write it to the dead-letter table and go on)",
        tp.topic, tp.partition
    )]
    BadRecord {
        tp: TopicPartition,
        offset: i64,
        error: ConvertError,
    },
    #[error(
        "record topic {} partition {} offset {offset} was refused by the database: \
         {error}{}; the batch holding it was rolled back, so neither it nor any record after it in its partition \
         was committed (errors.tolerance: all would write it to the dead-letter table and go on)",
        tp.topic, tp.partition, sqlstate.as_deref().map(|code| format!(" (SQLSTATE {code})")).unwrap_or_default()
    )]
    RejectedRow {
        tp: TopicPartition,
        offset: i64,
        /// The database's SQLSTATE, when it gave one (a row too large for a MySQL packet is
        /// refused before it is sent).
        sqlstate: Option<String>,
        error: String,
    },
    /// One of idemsink's own invariants broke (a task panicked, a stream that never ends
    /// ended).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Failure {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Failure::Config(_) => ErrorKind::Configuration,
            Failure::Connect { source, .. } | Failure::Database { source, .. } => {
                ErrorKind::of_database(source)
            }
            Failure::Migrate(e) => e.kind(),
            Failure::Kafka { source, .. } => ErrorKind::of_kafka(source),
            Failure::Position { kind, .. } => *kind,
            Failure::BadRecord { .. } => ErrorKind::BadRecord,
            Failure::RejectedRow { .. } => ErrorKind::RejectedRow,
            Failure::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Why idemsink's own tables could not be created or brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Another instance held the migration lock (MySQL and MariaDB) this long.
    #[error("another instance held the migration lock for {seconds} s")]
    LockBusy { seconds: i64 },
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

impl From<sqlx::Error> for MigrationError {
    fn from(e: sqlx::Error) -> MigrationError {
        MigrationError::Migrate(MigrateError::Execute(e))
    }
}

impl MigrationError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            MigrationError::LockBusy { .. } => ErrorKind::Transient,
            MigrationError::Migrate(
                MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _),
            ) => ErrorKind::of_database(e),
            // A migration this binary does not know, or one left half-applied.
            MigrationError::Migrate(_) => ErrorKind::Permanent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_say_whether_to_retry_and_map_to_distinct_exit_codes() {
        let unreachable =
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(ErrorKind::of_database(&unreachable), ErrorKind::Transient);
        assert!(ErrorKind::of_database(&unreachable).is_retryable());
        assert_eq!(
            ErrorKind::of_database(&sqlx::Error::RowNotFound),
            ErrorKind::Permanent
        );
        let busy = MigrationError::LockBusy { seconds: 60 };
        assert_eq!(busy.kind(), ErrorKind::Transient);
        let bad = KafkaError::ClientCreation("bad property".into());
        assert_eq!(ErrorKind::of_kafka(&bad), ErrorKind::Configuration);
        let codes: std::collections::HashSet<u8> = [
            ErrorKind::Configuration,
            ErrorKind::Transient,
            ErrorKind::Permanent,
            ErrorKind::BadRecord,
            ErrorKind::Internal,
        ]
        .iter()
        .map(|k| k.exit_code())
        .collect();
        assert_eq!(codes.len(), 5);
        assert!(!codes.contains(&1), "1 is any other failure");
    }

    #[test]
    fn a_pipeline_error_names_its_pipeline_once_and_config_errors_their_files() {
        let failure = Failure::RejectedRow {
            tp: TopicPartition {
                topic: "orders".into(),
                partition: 3,
            },
            offset: 42,
            sqlstate: Some("23514".into()),
            error: "violates check constraint".into(),
        };
        let e = PipelineError::new("orders_pg", failure);
        let text = e.to_string();
        assert!(
            text.starts_with("pipeline orders_pg: record topic orders partition 3 offset 42"),
            "{text}"
        );
        assert_eq!(text.matches("orders_pg").count(), 1, "{text}");
        assert!(
            text.contains("violates check constraint (SQLSTATE 23514); the batch"),
            "{text}"
        );
        assert_eq!(e.kind(), ErrorKind::RejectedRow);
        let config = crate::config::ConfigError {
            file: "connectors/orders.yaml".into(),
            key: "sink.truncate".into(),
            message: "apply needs topics of one partition".into(),
        };
        let e = PipelineError::new("orders_pg", Failure::Config(ConfigErrors(vec![config])));
        assert_eq!(
            e.to_string(),
            "connectors/orders.yaml: sink.truncate: apply needs topics of one partition"
        );
        assert_eq!(e.kind(), ErrorKind::Configuration);
    }
}
