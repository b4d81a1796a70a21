//! Pipeline configuration: the YAML files in `connectors/`, environment overrides and
//! `${VAR}` interpolation, and the static checks that need no database.
//!
//! Loading goes file → `config` crate (YAML + `IDEMSINK_*` overrides) → JSON tree →
//! `${VAR}` interpolation → typed structs through `serde_path_to_error`, so every error
//! names the file and the key it comes from.
//!
//! One concept per file: `model` is what a pipeline file may say, `load` reads and
//! interpolates it, `check` validates it into a [`LoadedPipeline`], `redact` keeps
//! passwords out of messages.

mod check;
mod load;
mod model;
mod redact;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::batch::BatchLimits;
use crate::db::{Backend, SessionLimits};
use crate::mapping::Source;
use crate::routing::Routes;
use crate::schema::TableName;

pub use load::{load_all, load_file, pipeline_files};
pub use model::*;
pub use redact::{redact_url, url_hosts};

/// A problem in a configuration file, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the key (`sink.columns.customer`); empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A list of configuration problems, reported together.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

/// A pipeline file that parsed and passed the static checks, with what they validated held
/// as typed values: no component parses the file's text again.
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    pub file: PathBuf,
    pub config: PipelineConfig,
    /// The database `sink.url` names.
    pub backend: Backend,
    /// `batch.*`: when the consumer loop hands a batch to the writer.
    pub batch: BatchLimits,
    /// `sink.lock_timeout_ms` and `sink.idle_in_transaction_timeout_ms`.
    pub session: SessionLimits,
    /// `errors.retry_for_ms`: how long database work is retried through transient faults.
    pub retry_for: Duration,
    /// `errors.dead_letter_table`.
    pub dead_letter_table: TableName,
    /// `source.properties.auto.offset.reset`.
    pub offset_reset: OffsetReset,
    /// `sink.columns` with each source parsed, in column-name order (without `*`).
    pub columns: Vec<(String, Source)>,
    /// `columns: auto` (or `"*": auto`): the table's other columns read the fields of their
    /// names, once the table is known ([`crate::writer::SinkPlan::prepare`]).
    pub auto_columns: bool,
    /// The table of each topic.
    pub routes: Routes,
}

impl LoadedPipeline {
    /// The pipeline's name (`pipeline`): its rows in `idemsink_offsets`, its metrics' label.
    pub fn name(&self) -> &str {
        &self.config.pipeline
    }

    pub fn group_id(&self) -> String {
        self.config
            .source
            .group_id
            .clone()
            .unwrap_or_else(|| format!("idemsink-{}", self.config.pipeline))
    }

    /// librdkafka properties from `source.properties`, as strings.
    pub fn properties(&self) -> BTreeMap<String, String> {
        self.config
            .source
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), scalar_text(v)))
            .collect()
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests;
