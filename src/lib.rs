//! idemsink: sinks Kafka topics into PostgreSQL or MySQL/MariaDB exactly once. Each batch's rows and the
//! offsets that cover them commit in one database transaction; the database, not Kafka, is
//! where every partition resumes.
//!
//! A newcomer's map: [`config`] (pipeline files, checked into typed values; [`routing`] for
//! each topic's table), [`error`] (why a pipeline stopped, and whether a retry can help),
//! [`consumer`] (Kafka settings, partition ownership, rebalances), [`batch`] (the batcher's
//! unit), [`mapping`] (record → row; [`debezium`] for change events' types and positions),
//! [`db`] (the database and its pool), [`schema`] (the target table), [`writer`] (the SQL: the
//! batch's transaction, the guards in one place, one file per database), [`offsets`] (the
//! offset store), [`offsets_command`] (the `offsets` command), [`pipeline`] (the loop tying
//! them together, and the commit path), [`validate`] (the `validate` command), and for
//! operations [`telemetry`] (metrics), [`health`] and [`http`] (the `/metrics`, `/healthz` and
//! `/readyz` listener).

pub mod batch;
pub mod cells;
pub mod config;
pub mod consumer;
pub mod db;
pub mod dead_letters;
pub mod dead_letters_command;
pub mod debezium;
pub mod error;
pub mod health;
pub mod http;
pub mod json_pointers;
pub mod mapping;
pub mod offsets;
pub mod offsets_command;
pub mod pipeline;
pub mod retry;
pub mod routing;
pub mod schema;
pub mod telemetry;
pub mod validate;
pub mod writer;

#[cfg(feature = "testkit")]
pub mod testkit;
