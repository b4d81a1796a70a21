//! What `/healthz` and `/readyz` answer: the process is alive, and every pipeline has its
//! database and its place in the consumer group, and its writer is not stuck.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The pipelines of this process and how far each has come.
#[derive(Debug, Default)]
pub struct Health {
    pipelines: Mutex<BTreeMap<String, Arc<PipelineStatus>>>,
}

/// One pipeline's readiness, set by the pipeline itself.
#[derive(Debug)]
pub struct PipelineStatus {
    /// Connected, migrated, and the table checked.
    database: AtomicBool,
    /// In the consumer group: an assignment came since the last loss of membership.
    member: AtomicBool,
    /// Per writer lane whose batch is failing and being retried: since when, the last error.
    failing: Mutex<BTreeMap<usize, (Instant, String)>>,
    /// How long a batch may keep failing before the pipeline counts as stuck.
    stuck_after: Mutex<Duration>,
}

impl Default for PipelineStatus {
    fn default() -> PipelineStatus {
        PipelineStatus {
            database: AtomicBool::new(false),
            member: AtomicBool::new(false),
            failing: Mutex::new(BTreeMap::new()),
            stuck_after: Mutex::new(Duration::from_secs(30)),
        }
    }
}

impl PipelineStatus {
    pub fn set_database(&self, ready: bool) {
        self.database.store(ready, Ordering::Relaxed);
    }

    pub fn set_member(&self, member: bool) {
        self.member.store(member, Ordering::Relaxed);
    }

    /// A batch that keeps failing longer than `bound` (a lock another session holds, the
    /// database gone) makes the pipeline unready until a batch commits.
    pub fn set_stuck_after(&self, bound: Duration) {
        *lock(&self.stuck_after) = bound;
    }

    /// A writer lane's attempt at a batch failed and will be retried.
    pub fn write_failed(&self, lane: usize, error: &dyn std::fmt::Display) {
        let mut failing = lock(&self.failing);
        let since = failing
            .get(&lane)
            .map_or_else(Instant::now, |(since, _)| *since);
        failing.insert(lane, (since, error.to_string()));
    }

    /// A writer lane's batch went through (or the pipeline no longer writes it).
    pub fn write_done(&self, lane: usize) {
        lock(&self.failing).remove(&lane);
    }

    fn problem(&self) -> Option<String> {
        if !self.database.load(Ordering::Relaxed) {
            return Some("no database connection yet".to_string());
        }
        if !self.member.load(Ordering::Relaxed) {
            return Some("not in the consumer group".to_string());
        }
        let stuck_after = *lock(&self.stuck_after);
        let failing = lock(&self.failing);
        match failing.values().min_by_key(|(since, _)| *since) {
            Some((since, error)) if since.elapsed() >= stuck_after => Some(format!(
                "writer stuck: the batch has been failing and retried for {} s: {error}",
                since.elapsed().as_secs()
            )),
            _ => None,
        }
    }
}

/// A poisoned lock still holds a usable value here: each is a plain value written whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        lock(&self.pipelines)
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

    #[test]
    fn a_batch_failing_past_the_bound_makes_its_pipeline_unready_until_one_commits() {
        let health = Health::default();
        let a = health.register("a");
        a.set_database(true);
        a.set_member(true);
        a.set_stuck_after(Duration::from_millis(50));
        a.write_failed(0, &"lock timeout");
        assert_eq!(health.readiness(), Ok(()), "not stuck before the bound");
        std::thread::sleep(Duration::from_millis(60));
        a.write_failed(0, &"lock timeout again");
        // Another lane committing does not make the stuck one ready.
        a.write_failed(1, &"a fault");
        a.write_done(1);
        let problems = health.readiness().expect_err("stuck past the bound");
        assert!(
            problems[0].starts_with("a: writer stuck: the batch has been failing")
                && problems[0].ends_with(": lock timeout again"),
            "{problems:?}"
        );
        a.write_done(0);
        assert_eq!(health.readiness(), Ok(()));
    }
}
