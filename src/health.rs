//! What `/healthz` and `/readyz` answer: the process is alive, and every pipeline has its
//! database and its place in the consumer group.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The pipelines of this process and how far each has come.
#[derive(Debug, Default)]
pub struct Health {
    pipelines: Mutex<BTreeMap<String, Arc<PipelineStatus>>>,
}

/// One pipeline's readiness, set by the pipeline itself.
#[derive(Debug, Default)]
pub struct PipelineStatus {
    /// Connected, migrated, and the table checked.
    database: AtomicBool,
    /// In the consumer group: an assignment came since the last loss of membership.
    member: AtomicBool,
}

impl PipelineStatus {
    pub fn set_database(&self, ready: bool) {
        self.database.store(ready, Ordering::Relaxed);
    }

    pub fn set_member(&self, member: bool) {
        self.member.store(member, Ordering::Relaxed);
    }

    fn problem(&self) -> Option<&'static str> {
        if !self.database.load(Ordering::Relaxed) {
            Some("no database connection yet")
        } else if !self.member.load(Ordering::Relaxed) {
            Some("not in the consumer group")
        } else {
            None
        }
    }
}

impl Health {
    /// Adds a pipeline, not ready yet.
    pub fn register(&self, pipeline: &str) -> Arc<PipelineStatus> {
        let status = Arc::new(PipelineStatus::default());
        self.lock().insert(pipeline.to_string(), status.clone());
        status
    }

    /// Ready when every pipeline is; otherwise each pipeline that is not, with why.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let pipelines = self.lock();
        let problems: Vec<String> = pipelines
            .iter()
            .filter_map(|(name, s)| s.problem().map(|why| format!("{name}: {why}")))
            .collect();
        if pipelines.is_empty() {
            return Err(vec!["no pipeline running".to_string()]);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<PipelineStatus>>> {
        self.pipelines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_pipeline_has_its_database_and_group() {
        let health = Health::default();
        assert!(health.readiness().is_err(), "nothing running is not ready");
        let a = health.register("a");
        let b = health.register("b");
        a.set_database(true);
        a.set_member(true);
        b.set_database(true);
        assert_eq!(
            health.readiness(),
            Err(vec!["b: not in the consumer group".to_string()])
        );
        b.set_member(true);
        assert_eq!(health.readiness(), Ok(()));
        a.set_member(false);
        assert!(health.readiness().is_err());
    }
}
