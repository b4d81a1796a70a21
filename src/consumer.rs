//! The Kafka side: the consumer's settings, which partitions this instance owns and from
//! where it reads them, and the rebalance hook that loads each newly assigned partition's
//! offset from the database and assigns it there — never from Kafka's committed offsets.
//!
//! Revocation drains: the hook takes the partitions away from the writer, waits for the batch
//! in flight to commit or roll back, and only then lets the group hand them on. A writer that
//! was paused past its session (a zombie) is stopped by the offsets compare-and-set instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::config::{LoadedPipeline, StartFrom};
use crate::health::PipelineStatus;
use crate::offsets::{OffsetStore, TopicPartition};
use crate::retry::retry;
use crate::telemetry;

pub type SinkConsumer = StreamConsumer<SinkContext>;

/// librdkafka's default `max.poll.interval.ms`, which is also the group's rebalance timeout.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// The consumer settings for a pipeline. The last four are what the guarantee rests on and
/// cannot be overridden (`config` refuses them in `source.properties`).
pub fn client_config(p: &LoadedPipeline) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &p.config.source.brokers)
        .set("group.id", p.group_id())
        .set("client.id", format!("idemsink-{}", p.config.pipeline))
        // A stored offset that is out of range (retention deleted the data) stops the
        // pipeline instead of silently skipping; users may choose earliest/latest.
        .set("auto.offset.reset", "error")
        // Statistics carry the high watermarks the consumer-lag metric is computed from.
        .set("statistics.interval.ms", "5000");
    for (key, value) in p.properties() {
        c.set(key, value);
    }
    c.set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    c
}

/// A partition this instance owns, and where reading it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// Changes on every (re)assignment and every reset after a conflict; records and
    /// batches carry it so that nothing read before a reset is ever written after it.
    pub epoch: u64,
    /// The offset in the database, as last read or committed by this instance.
    pub db_next: Option<i64>,
    /// The next offset the consumer loop accepts (None: whatever comes first).
    read_next: Option<i64>,
}

/// Partitions owned by this instance, shared by the rebalance hook, the consumer loop and
/// the writer.
#[derive(Debug, Default)]
pub struct Assignment {
    state: Mutex<AssignmentState>,
    /// Wakes the consumer loop when a seek or a fatal error is waiting for it.
    pub wake: Notify,
    /// Held by the writer from the moment it decides which partitions a batch covers until
    /// the batch's transaction has ended; a revocation takes it to wait for that write.
    pub writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct AssignmentState {
    owned: HashMap<String, HashMap<i32, Owned>>,
    next_epoch: u64,
    seeks: Vec<(TopicPartition, Offset)>,
    fatal: Option<String>,
    /// The consumer loop paused fetching because the writer is behind; partitions assigned
    /// meanwhile start paused too.
    paused: bool,
}

impl AssignmentState {
    fn get_mut(&mut self, tp: &TopicPartition) -> Option<&mut Owned> {
        self.owned.get_mut(&tp.topic)?.get_mut(&tp.partition)
    }

    /// Owns `tp` from the stored offset on, in a new epoch.
    fn start_epoch(&mut self, tp: &TopicPartition, stored: Option<i64>) {
        self.next_epoch += 1;
        let owned = Owned {
            epoch: self.next_epoch,
            db_next: stored,
            read_next: stored,
        };
        self.owned
            .entry(tp.topic.clone())
            .or_default()
            .insert(tp.partition, owned);
    }
}

impl Assignment {
    fn lock(&self) -> MutexGuard<'_, AssignmentState> {
        // A panic while holding this lock cannot leave the map half-updated in a way that
        // matters: every update is a single insert or remove.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn owned(&self, tp: &TopicPartition) -> Option<Owned> {
        self.lock()
            .owned
            .get(&tp.topic)
            .and_then(|m| m.get(&tp.partition))
            .copied()
    }

    /// For the consumer loop: whether to take a record, and in which epoch. Drops records of
    /// partitions not owned, and those before the position (already written or re-delivered).
    pub fn accept(&self, topic: &str, partition: i32, offset: i64) -> Option<u64> {
        let mut state = self.lock();
        let owned = state.owned.get_mut(topic)?.get_mut(&partition)?;
        if owned.read_next.is_some_and(|next| offset < next) {
            return None;
        }
        owned.read_next = Some(offset + 1);
        Some(owned.epoch)
    }

    fn assign(&self, tp: &TopicPartition, stored: Option<i64>) {
        self.lock().start_epoch(tp, stored);
    }

    fn revoke(&self, tp: &TopicPartition) {
        if let Some(m) = self.lock().owned.get_mut(&tp.topic) {
            m.remove(&tp.partition);
        }
    }

    fn revoke_all(&self) {
        self.lock().owned.clear();
    }

    /// After a commit: the database now holds `next` for this partition.
    pub fn committed(&self, tp: &TopicPartition, epoch: u64, next: i64) {
        if let Some(owned) = self.lock().get_mut(tp).filter(|o| o.epoch == epoch) {
            owned.db_next = Some(next);
        }
    }

    /// After a compare-and-set conflict: start the partition over from what the database
    /// holds now, in a new epoch, and ask the consumer loop to seek there.
    pub fn reset(
        &self,
        tp: &TopicPartition,
        epoch: u64,
        stored: Option<i64>,
        start_from: StartFrom,
    ) {
        let mut state = self.lock();
        if state.get_mut(tp).is_none_or(|o| o.epoch != epoch) {
            return; // revoked, or reassigned meanwhile with its offset loaded afresh
        }
        state.start_epoch(tp, stored);
        state
            .seeks
            .push((tp.clone(), start_offset(stored, start_from)));
        drop(state);
        self.wake.notify_one();
    }

    pub fn take_seeks(&self) -> Vec<(TopicPartition, Offset)> {
        std::mem::take(&mut self.lock().seeks)
    }

    /// How many partitions this instance owns.
    pub fn count(&self) -> usize {
        self.lock().owned.values().map(HashMap::len).sum()
    }

    /// The owned partitions and what the database holds for each.
    fn stored_offsets(&self) -> Vec<(TopicPartition, Option<i64>)> {
        let state = self.lock();
        let mut all = Vec::new();
        for (topic, partitions) in &state.owned {
            for (partition, owned) in partitions {
                let tp = TopicPartition {
                    topic: topic.clone(),
                    partition: *partition,
                };
                all.push((tp, owned.db_next));
            }
        }
        all
    }

    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
    }

    fn paused(&self) -> bool {
        self.lock().paused
    }

    fn set_fatal(&self, reason: String) {
        self.lock().fatal.get_or_insert(reason);
        self.wake.notify_one();
    }

    /// A failure inside a rebalance that the pipeline cannot continue from.
    pub fn fatal(&self) -> Option<String> {
        self.lock().fatal.clone()
    }
}

/// A third of the rebalance timeout, at most 30 s: long enough for an ordinary batch, short
/// enough to rejoin in time when the database hangs (the compare-and-set fences the write).
fn drain_patience(p: &LoadedPipeline) -> Duration {
    let max_poll_ms = p
        .properties()
        .get("max.poll.interval.ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
    Duration::from_millis(max_poll_ms / 3).min(Duration::from_secs(30))
}

fn start_offset(stored: Option<i64>, start_from: StartFrom) -> Offset {
    match (stored, start_from) {
        (Some(n), _) => Offset::Offset(n),
        (None, StartFrom::Earliest) => Offset::Beginning,
        (None, StartFrom::Latest) => Offset::End,
    }
}

/// The consumer's context: rebalances load offsets from the database.
pub struct SinkContext {
    pipeline: String,
    pub assignment: Arc<Assignment>,
    store: OffsetStore,
    start_from: StartFrom,
    runtime: tokio::runtime::Handle,
    /// How long database work is retried through transient faults.
    retry_for: Duration,
    /// Readiness: set on assignment, cleared when the membership is lost.
    status: Arc<PipelineStatus>,
    /// How long a revocation waits for the batch in flight. Well inside the rebalance
    /// timeout (`max.poll.interval.ms`), so that waiting never costs the group membership.
    drain_patience: Duration,
}

impl SinkContext {
    pub fn new(
        p: &LoadedPipeline,
        assignment: Arc<Assignment>,
        store: OffsetStore,
        status: Arc<PipelineStatus>,
    ) -> SinkContext {
        SinkContext {
            status,
            pipeline: p.config.pipeline.clone(),
            assignment,
            store,
            start_from: p.config.source.start_from,
            runtime: tokio::runtime::Handle::current(),
            drain_patience: drain_patience(p),
            retry_for: Duration::from_millis(p.config.errors.retry_for_ms),
        }
    }

    /// Reads the stored offsets, retrying through transient faults (the database may be
    /// restarting) for `errors.retry_for_ms`, but no longer than a revocation may wait: the
    /// rebalance waits for this.
    async fn load_offsets(
        &self,
        tps: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        let patience = self.retry_for.min(self.drain_patience);
        retry(&self.pipeline, "loading offsets", patience, || {
            self.store.load(tps)
        })
        .await
    }

    /// Runs a database future from the (synchronous) rebalance callback, which librdkafka
    /// invokes on a runtime worker thread while the consumer is polled.
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.runtime.block_on(f))
        } else {
            self.runtime.block_on(f)
        }
    }

    fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
        cooperative: bool,
    ) {
        let tps = partitions_of(tpl);
        if tps.is_empty() {
            // A cooperative rebalance that leaves this instance's partitions as they were, or
            // an eager one with more instances than partitions.
            if !cooperative {
                info!(pipeline = %self.pipeline, "assigned no partition (more instances than partitions)");
            }
            self.apply_assignment(consumer, tpl, cooperative);
            return;
        }
        let stored = match self.block_on(self.load_offsets(&tps)) {
            Ok(stored) => stored,
            Err(e) => {
                // Without the stored offsets there is no safe place to start: assign nothing.
                let reason = format!(
                    "pipeline {}: cannot read stored offsets on assignment: {e}",
                    self.pipeline
                );
                error!("{reason}");
                self.assignment.set_fatal(reason);
                return;
            }
        };
        let mut loaded = Vec::with_capacity(tps.len());
        for tp in &tps {
            let offset = stored.get(tp).copied();
            if let Err(e) = tpl.set_partition_offset(
                &tp.topic,
                tp.partition,
                start_offset(offset, self.start_from),
            ) {
                error!(pipeline = %self.pipeline, partition = %tp, error = %e, "cannot set start offset");
            }
            self.assignment.assign(tp, offset);
            loaded.push(match offset {
                Some(n) => format!("{tp}@{n}"),
                None => format!("{tp}@{:?}", self.start_from).to_lowercase(),
            });
        }
        info!(pipeline = %self.pipeline, partitions = %loaded.join(" "), cooperative, "assigned; starting from offsets stored in the database");
        self.apply_assignment(consumer, tpl, cooperative);
        telemetry::rebalance(
            &self.pipeline,
            "assigned",
            tps.len(),
            self.assignment.count(),
        );
    }

    fn apply_assignment(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        cooperative: bool,
    ) {
        self.status.set_member(true);
        let result = if cooperative {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        log_failure(&self.pipeline, "assign", result);
        // librdkafka keeps a partition's pause across a revocation, so set it explicitly:
        // paused only while the consumer loop is holding back for the writer.
        if self.assignment.paused() {
            log_failure(&self.pipeline, "pause", consumer.pause(tpl));
        } else {
            log_failure(&self.pipeline, "resume", consumer.resume(tpl));
        }
    }

    fn on_revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        cooperative: bool,
    ) {
        let tps = partitions_of(tpl);
        // From here on no write for these partitions starts; buffered records are dropped.
        for tp in &tps {
            self.assignment.revoke(tp);
        }
        let names: Vec<String> = tps.iter().map(ToString::to_string).collect();
        let lost = consumer.assignment_lost();
        info!(pipeline = %self.pipeline, partitions = %names.join(" "), lost, cooperative, "revoked; buffered records of these partitions are dropped");
        if lost {
            self.status.set_member(false);
        }
        telemetry::rebalance(
            &self.pipeline,
            "revoked",
            tps.len(),
            self.assignment.count(),
        );
        for tp in &tps {
            // The new owner reports this partition's lag from now on.
            telemetry::consumer_lag(&self.pipeline, tp, 0);
        }
        self.drain();
        let result = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        log_failure(&self.pipeline, "unassign", result);
    }

    /// Waits for the batch in flight, which may cover revoked partitions, to commit or roll
    /// back, so that their next owner starts from offsets that no longer move.
    fn drain(&self) {
        let patience = self.drain_patience;
        let writing = &self.assignment.writing;
        if self
            .block_on(tokio::time::timeout(patience, writing.lock()))
            .is_err()
        {
            warn!(
                pipeline = %self.pipeline,
                waited_ms = patience.as_millis() as u64,
                "the batch in flight did not finish before the partitions were handed on; \
                 it can only commit if no new owner has committed since (offsets compare-and-set)"
            );
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition {
            topic: e.topic().to_string(),
            partition: e.partition(),
        })
        .collect()
}

fn log_failure(pipeline: &str, what: &str, result: KafkaResult<()>) {
    if let Err(e) = result {
        error!(pipeline, error = %e, "{what} failed");
    }
}

impl ClientContext for SinkContext {
    /// librdkafka's periodic statistics carry each partition's high watermark: the lag is
    /// what Kafka has beyond the offset stored in the database.
    fn stats(&self, statistics: Statistics) {
        for (tp, stored) in self.assignment.stored_offsets() {
            let high = statistics
                .topics
                .get(&tp.topic)
                .and_then(|t| t.partitions.get(&tp.partition))
                .map(|p| p.hi_offset)
                .filter(|high| *high >= 0);
            if let (Some(high), Some(stored)) = (high, stored) {
                telemetry::consumer_lag(&self.pipeline, &tp, high - stored);
            }
        }
    }
}

impl ConsumerContext for SinkContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl, cooperative)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl, cooperative)
            }
            other => {
                error!(pipeline = %self.pipeline, error = ?other, "rebalance failed; dropping the whole assignment");
                self.assignment.revoke_all();
                self.drain();
                log_failure(&self.pipeline, "unassign", consumer.unassign());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid pipeline whose `source.properties` is the YAML flow mapping `{properties}`.
    fn pipeline_with_properties(properties: &str) -> LoadedPipeline {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("p.yaml");
        std::fs::write(
            &file,
            format!(
                "pipeline: p\nsource:\n  brokers: b:1\n  topics: [t]\n  properties: {{{properties}}}\n\
                 sink:\n  url: postgres://h/d\n  table: t\n  columns:\n    p: $partition\n    o: $offset\n"
            ),
        )
        .expect("write");
        crate::config::load_file(&file, &[]).expect("valid")
    }

    #[test]
    fn the_guarantee_settings_always_win() {
        let c = client_config(&pipeline_with_properties("fetch.max.bytes: 1000000"));
        assert_eq!(c.get("isolation.level"), Some("read_committed"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("idemsink-p"));
        assert_eq!(c.get("fetch.max.bytes"), Some("1000000"));
    }

    #[test]
    fn a_revocation_waits_a_third_of_the_rebalance_timeout_at_most_30_s() {
        let patience = |properties| drain_patience(&pipeline_with_properties(properties));
        assert_eq!(patience(""), Duration::from_secs(30));
        assert_eq!(
            patience("max.poll.interval.ms: 6000"),
            Duration::from_secs(2)
        );
        assert_eq!(
            patience("max.poll.interval.ms: 900000"),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn accept_filters_by_ownership_and_position_and_reset_starts_a_new_epoch() {
        let a = Assignment::default();
        let tp = TopicPartition {
            topic: "t".into(),
            partition: 0,
        };
        assert_eq!(a.accept("t", 0, 5), None, "not owned");
        a.assign(&tp, Some(10));
        assert_eq!(a.accept("t", 0, 9), None, "before the stored offset");
        let epoch = a.accept("t", 0, 10).expect("taken");
        assert_eq!(a.accept("t", 0, 10), None, "re-delivered");
        a.committed(&tp, epoch, 11);
        assert_eq!(a.owned(&tp).map(|o| o.db_next), Some(Some(11)));
        a.reset(&tp, epoch, Some(20), StartFrom::Earliest);
        let after = a.owned(&tp).expect("owned");
        assert_ne!(after.epoch, epoch);
        assert_eq!(after.db_next, Some(20));
        assert_eq!(a.take_seeks(), vec![(tp.clone(), Offset::Offset(20))]);
        assert_eq!(a.accept("t", 0, 19), None);
        a.committed(&tp, epoch, 99);
        assert_eq!(
            a.owned(&tp).map(|o| o.db_next),
            Some(Some(20)),
            "stale epoch cannot move it"
        );
        a.revoke(&tp);
        assert_eq!(a.accept("t", 0, 25), None);
    }
}
