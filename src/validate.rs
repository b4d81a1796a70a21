//! `idemsink validate`: every check `run` makes before consuming, without consuming — the
//! files and keys, the database connection, the table, each mapped column and the conflict
//! key — reported together, each problem with the file and key it comes from.

use std::path::Path;

use crate::config::{self, redact_url, ConfigError, LoadedPipeline};
use crate::writer::SinkPlan;

/// What `validate` found: one line per pipeline that is fine, one per problem.
#[derive(Debug, Default)]
pub struct Report {
    pub ok: Vec<String>,
    pub problems: Vec<ConfigError>,
}

pub async fn validate(path: &Path) -> Report {
    let mut report = Report::default();
    let pipelines = match config::load_all(path) {
        Ok(p) => p,
        Err(errors) => {
            report.problems = errors.0;
            return report;
        }
    };
    for p in &pipelines {
        match check_against_database(p).await {
            Ok(plan) => report.ok.push(format!(
                "{}: pipeline {} → table {} ({} columns, conflict on {})",
                p.file.display(),
                p.config.pipeline,
                plan.table,
                plan.columns.len(),
                plan.conflict_columns.join(", ")
            )),
            Err(mut problems) => report.problems.append(&mut problems),
        }
    }
    report
}

async fn check_against_database(p: &LoadedPipeline) -> Result<SinkPlan, Vec<ConfigError>> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&p.config.sink.url)
        .await
        .map_err(|e| {
            vec![p.error(
                "sink.url",
                format!("cannot connect to {}: {e}", redact_url(&p.config.sink.url)),
            )]
        })?;
    let plan = SinkPlan::prepare(p, &mut conn).await;
    // Closing is a courtesy to the server; the verdict is already in.
    let _ = conn.close().await;
    plan
}
