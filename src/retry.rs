//! Retrying database work through transient faults — the server restarting, a dropped
//! connection, a deadlock — with exponential backoff and jitter, for at most the pipeline's
//! `errors.retry_for_ms`. Retried work is always a whole transaction (or a read), so a retry
//! never doubles anything: a transaction whose commit was lost either committed, and the
//! offsets compare-and-set then tells, or did not.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tracing::warn;

use crate::db::is_transient;
use crate::telemetry;

const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds, fails for good, or `patience` has run out.
pub async fn retry<T, F, Fut>(
    pipeline: &str,
    operation: &'static str,
    patience: Duration,
    mut attempt: F,
) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = Instant::now() + patience;
    let mut pause = FIRST_PAUSE;
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) if is_transient(&e) && Instant::now() + pause < deadline => {
                // ±25 %, so that instances that failed together do not retry together.
                let wait = pause.mul_f64(rand::thread_rng().gen_range(0.75..1.25));
                let left = deadline.saturating_duration_since(Instant::now());
                telemetry::db_retry(pipeline, operation);
                warn!(
                    pipeline,
                    operation,
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    gives_up_in_s = left.as_secs(),
                    "database unavailable or busy; retrying"
                );
                tokio::time::sleep(wait).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn transient_faults_are_retried_until_they_pass() {
        let tries = AtomicU32::new(0);
        let done = retry("p", "test", Duration::from_secs(60), || async {
            match tries.fetch_add(1, Ordering::Relaxed) {
                0..=3 => Err(transient()),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(done.ok(), Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_when_patience_runs_out_and_the_last_error_is_returned() {
        let started = Instant::now();
        let tries = AtomicU32::new(0);
        let done: Result<(), _> = retry("p", "test", Duration::from_secs(10), || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err(transient())
        })
        .await;
        assert!(matches!(done, Err(sqlx::Error::Io(_))));
        assert!(started.elapsed() <= Duration::from_secs(10));
        assert!(tries.load(Ordering::Relaxed) > 3, "it did retry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_not_retried() {
        let tries = AtomicU32::new(0);
        let done: Result<(), _> = retry("p", "test", Duration::from_secs(60), || async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err(sqlx::Error::RowNotFound)
        })
        .await;
        assert!(matches!(done, Err(sqlx::Error::RowNotFound)));
        assert_eq!(tries.load(Ordering::Relaxed), 1);
    }
}
