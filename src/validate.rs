//! `idemsink validate`: every check `run` makes before consuming, without consuming — the
//! files and keys, the database connection, the table, each mapped column and the conflict
//! key, business key and version column — reported together, each problem with the file and key it comes from.

use std::path::Path;

use crate::config::{self, redact_url, ConfigError, LoadedPipeline};
use crate::db::DbPool;
use crate::writer::SinkPlan;

/// What `validate` found: one line per pipeline that is fine, one per problem.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: Vec<String>,
    pub problems: Vec<ConfigError>,
}

/// Checks the pipeline files at `path`; with `offline`, only the files (for CI, where the
/// database is not reachable), otherwise also each pipeline against its database.
pub async fn validate(path: &Path, offline: bool) -> Report {
    let mut report = Report::default();
    let pipelines = match config::load_all(path) {
        Ok(pipeline) => pipeline,
        Err(errors) => {
            report.problems = errors.0;
            return report;
        }
    };
    for pipeline in &pipelines {
        if offline {
            report.ok.push(format!(
                "{}: pipeline {} (files only: the database was not checked)",
                pipeline.file.display(),
                pipeline.name()
            ));
            continue;
        }
        match check_against_database(pipeline).await {
            Ok(plans) => {
                for plan in plans {
                    report.ok.push(format!(
                        "{}: pipeline {} → {} table {} ({} columns, mode {} on {})",
                        pipeline.file.display(),
                        pipeline.name(),
                        plan.backend,
                        plan.table,
                        plan.columns.len(),
                        plan.mode,
                        plan.conflict
                            .iter()
                            .map(|c| plan.columns[*c].name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            Err(mut problems) => report.problems.append(&mut problems),
        }
    }
    report
}

async fn check_against_database(
    pipeline: &LoadedPipeline,
) -> Result<Vec<SinkPlan>, Vec<ConfigError>> {
    let pool = DbPool::connect(&pipeline.config.sink.url, 1)
        .await
        .map_err(|e| {
            vec![pipeline.error(
                "sink.url",
                format!(
                    "cannot connect to {}: {e}",
                    redact_url(&pipeline.config.sink.url)
                ),
            )]
        })?;
    let plans = SinkPlan::prepare_all(pipeline, &pool).await;
    // Closing is a courtesy to the server; the verdict is already in.
    pool.close().await;
    plans
}
