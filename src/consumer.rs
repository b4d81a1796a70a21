//! The Kafka side: the consumer's settings, which partitions this instance owns and from
//! where it reads them, and the rebalance hook that loads each newly assigned partition's
//! offset from the database and assigns it there — never from Kafka's committed offsets.
//!
//! Revocation drains: the hook takes the partitions away from the writer, waits for the batch
//! in flight to commit or roll back, and only then lets the group hand them on. A writer that
//! was paused past its session (a zombie) is stopped by the offsets compare-and-set instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::config::{LoadedPipeline, OffsetReset, StartFrom, AUTO_OFFSET_RESET};
use crate::db::is_transient;
use crate::error::{ErrorKind, Failure};
use crate::health::PipelineStatus;
use crate::offsets::{OffsetStore, TopicPartition};
use crate::retry::retry;
use crate::telemetry;

pub type SinkConsumer = StreamConsumer<SinkContext>;

/// librdkafka's default `max.poll.interval.ms`, which is also the group's rebalance timeout.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// How long a watermark request may take.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// The consumer settings for a pipeline. The last four are what the guarantee rests on and
/// cannot be overridden (`config` refuses them in `source.properties`).
pub fn client_config(pipeline: &LoadedPipeline) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &pipeline.config.source.brokers)
        .set("group.id", pipeline.group_id())
        .set("client.id", format!("idemsink-{}", pipeline.name()))
        // Partitions added to a topic are noticed within this (librdkafka's default: 5 min).
        .set("topic.metadata.refresh.interval.ms", "30000")
        // Statistics carry the watermarks the consumer-lag metrics are computed from.
        .set("statistics.interval.ms", "5000")
        // A partition whose prefetch queue is full waits this long before its next fetch
        // (librdkafka's default: 1 s). With large records (Debezium's, schema included, are
        // several kB) the queue fills whenever the writer is behind, and a second's pause
        // per refill left the database idle for most of a backlog.
        .set("fetch.queue.backoff.ms", "20");
    for (key, value) in pipeline.properties() {
        c.set(key, value);
    }
    // An offset out of range is idemsink's to handle (`source.properties.auto.offset.reset`
    // says how), so that no skip goes unlogged or uncounted.
    c.set(AUTO_OFFSET_RESET, "error")
        .set("isolation.level", "read_committed")
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
    /// Everything before it is covered, by the database or by a batch of this epoch: the
    /// next offset the consumer loop accepts (None: whatever comes first).
    read_next: Option<i64>,
    /// A seek is owed to the consumer loop. Until it has succeeded nothing of the partition is
    /// taken: what arrives meanwhile was fetched from the old position.
    seeking: bool,
}

/// A seek the consumer loop owes a partition, in the epoch that asked for it: after a
/// compare-and-set conflict, or to pass over offsets Kafka no longer has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seek {
    pub tp: TopicPartition,
    pub epoch: u64,
    /// `None`: the consumer is already there (assigned at that offset); only the cover is owed.
    pub offset: Option<Offset>,
    /// Where the stored offset moves once the seek is done, even if no record follows.
    pub cover: Option<i64>,
}

/// Partitions owned by this instance, shared by the rebalance hook, the consumer loop and
/// the writer.
#[derive(Debug, Default)]
pub struct Assignment {
    state: Mutex<AssignmentState>,
    /// Wakes the consumer loop when a seek or a fatal error is waiting for it.
    pub wake: Notify,
    /// Held (shared) by each writer lane from the moment it decides which partitions a batch
    /// covers until the batch's transaction has ended; a revocation takes it exclusively to
    /// wait for every such write, and so does the idle check of the stored offsets.
    pub writing: tokio::sync::RwLock<()>,
}

/// A map the consumer loop looks up for every record: hashed with foldhash rather than the
/// standard SipHash, several times faster on a short topic name, where the keys come from the
/// configuration and the brokers and flooding the map is no risk.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct AssignmentState {
    owned: FastMap<String, FastMap<i32, Owned>>,
    next_epoch: u64,
    seeks: Vec<Seek>,
    fatal: Option<(ErrorKind, String)>,
    /// The consumer loop paused fetching because the writer is behind; partitions assigned
    /// meanwhile start paused too.
    paused: bool,
    /// Partitions assigned while the database did not answer, in their epochs: owned but
    /// paused, and nothing taken, until their stored offsets are loaded.
    unloaded: Vec<(TopicPartition, u64)>,
    /// Since when the database has not answered for them.
    unloaded_since: Option<Instant>,
}

impl AssignmentState {
    fn get_mut(&mut self, tp: &TopicPartition) -> Option<&mut Owned> {
        self.owned.get_mut(&tp.topic)?.get_mut(&tp.partition)
    }

    /// Owns `tp` in a new epoch: the database holds `stored`, reading goes on from `read_next`.
    fn start_epoch(&mut self, tp: &TopicPartition, stored: Option<i64>, read_next: Option<i64>) {
        self.next_epoch += 1;
        let owned = Owned {
            epoch: self.next_epoch,
            db_next: stored,
            read_next,
            seeking: false,
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
    /// partitions not owned or waiting for a seek, and those before the position (already
    /// written or re-delivered).
    pub fn accept(&self, topic: &str, partition: i32, offset: i64) -> Option<u64> {
        let mut state = self.lock();
        let owned = state.owned.get_mut(topic)?.get_mut(&partition)?;
        if owned.seeking || owned.read_next.is_some_and(|next| offset < next) {
            return None;
        }
        owned.read_next = Some(offset + 1);
        Some(owned.epoch)
    }

    /// For the consumer loop: the consumer has read up to `position` (exclusive), past
    /// offsets that held no record for it (transaction markers, aborted records). Returns the
    /// epoch to cover them in, if they are not covered yet.
    pub fn cover_to(&self, tp: &TopicPartition, position: i64) -> Option<u64> {
        let mut state = self.lock();
        let owned = state.get_mut(tp)?;
        if owned.seeking || owned.read_next.is_some_and(|next| position <= next) {
            return None;
        }
        owned.read_next = Some(position);
        Some(owned.epoch)
    }

    fn assign(&self, tp: &TopicPartition, stored: Option<i64>, read_from: Option<i64>) {
        self.lock().start_epoch(tp, stored, read_from);
    }

    /// Owns `tp` without its stored offset yet (the database did not answer): nothing of
    /// it is taken until [`Assignment::loaded`].
    fn assign_unloaded(&self, tp: &TopicPartition) {
        let mut state = self.lock();
        state.start_epoch(tp, None, None);
        let epoch = state.next_epoch;
        if let Some(owned) = state.get_mut(tp) {
            owned.seeking = true;
        }
        state.unloaded.push((tp.clone(), epoch));
        state.unloaded_since.get_or_insert_with(Instant::now);
    }

    /// The partitions still waiting for their stored offsets, and since when the database
    /// has not answered for them; a partition revoked meanwhile is forgotten.
    pub fn unloaded(&self) -> (Vec<(TopicPartition, u64)>, Option<Instant>) {
        let mut state = self.lock();
        let still_owned: Vec<(TopicPartition, u64)> = state
            .unloaded
            .iter()
            .filter(|(tp, epoch)| {
                state
                    .owned
                    .get(&tp.topic)
                    .and_then(|m| m.get(&tp.partition))
                    .is_some_and(|o| o.epoch == *epoch)
            })
            .cloned()
            .collect();
        if still_owned.is_empty() {
            state.unloaded_since = None;
        }
        state.unloaded.clone_from(&still_owned);
        (still_owned, state.unloaded_since)
    }

    /// The stored offset of an unloaded partition is known now: reading starts at
    /// `read_from` (`start` for librdkafka), once the consumer loop has sought there.
    fn loaded(
        &self,
        tp: &TopicPartition,
        epoch: u64,
        stored: Option<i64>,
        read_from: Option<i64>,
        start: Offset,
    ) {
        let mut state = self.lock();
        state.unloaded.retain(|(t, e)| !(t == tp && *e == epoch));
        if state.unloaded.is_empty() {
            state.unloaded_since = None;
        }
        let Some(owned) = state.get_mut(tp).filter(|o| o.epoch == epoch) else {
            return;
        };
        owned.db_next = stored;
        owned.read_next = read_from;
        let cover = read_from.filter(|from| Some(*from) != stored);
        self.owe_seek(state, tp, Some(start), cover);
    }

    /// Whether a partition waits for its stored offset.
    pub fn has_unloaded(&self) -> bool {
        !self.lock().unloaded.is_empty()
    }

    /// Whether `tp` waits for its stored offset (and stays paused meanwhile): in the epoch
    /// it is owned in now, not an earlier one that was revoked.
    pub fn is_unloaded(&self, tp: &TopicPartition) -> bool {
        let mut state = self.lock();
        let Some(epoch) = state.get_mut(tp).map(|o| o.epoch) else {
            return false;
        };
        state.unloaded.iter().any(|(t, e)| t == tp && *e == epoch)
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
        state.start_epoch(tp, stored, stored);
        self.owe_seek(state, tp, Some(start_offset(stored, start_from)), None);
    }

    /// Offsets Kafka no longer has: reading goes on from `to` (see [`OffsetReset`]). Forward,
    /// the epoch stays, so the records before the gap that are already batched still commit;
    /// backward (the topic was re-created), a new epoch drops whatever was read before.
    /// A seek still owed for the partition is dropped: the partition is fetched again from
    /// `to`, and the seek (say, a reset's, to a stored offset Kafka has deleted since) would
    /// take it back out of range. Returns where the partition stood, or `None` if it is not
    /// owned.
    pub fn skip_to(&self, tp: &TopicPartition, to: i64) -> Option<Option<i64>> {
        let mut state = self.lock();
        let owned = *state.get_mut(tp)?;
        state.seeks.retain(|seek| &seek.tp != tp);
        if owned.read_next.is_some_and(|next| to < next) {
            state.start_epoch(tp, owned.db_next, Some(to));
        } else if let Some(o) = state.get_mut(tp) {
            o.read_next = Some(to);
        }
        self.owe_seek(state, tp, None, Some(to));
        Some(owned.read_next)
    }

    /// Records that reading an assigned partition starts at `to`, past its stored offset, so
    /// that the database moves there even if no record follows.
    fn owe_cover(&self, tp: &TopicPartition, to: i64) {
        self.owe_seek(self.lock(), tp, None, Some(to));
    }

    fn owe_seek(
        &self,
        mut state: MutexGuard<'_, AssignmentState>,
        tp: &TopicPartition,
        offset: Option<Offset>,
        cover: Option<i64>,
    ) {
        let Some(owned) = state.get_mut(tp) else {
            return;
        };
        owned.seeking = offset.is_some();
        let epoch = owned.epoch;
        state.seeks.push(Seek {
            tp: tp.clone(),
            epoch,
            offset,
            cover,
        });
        drop(state);
        self.wake.notify_one();
    }

    pub fn take_seeks(&self) -> Vec<Seek> {
        std::mem::take(&mut self.lock().seeks)
    }

    /// Whether `seek` is still owed: the partition is owned in its epoch. A seek of an epoch
    /// that has ended (revoked, reset again) must not be applied.
    pub fn seek_owed(&self, seek: &Seek) -> bool {
        self.owned(&seek.tp).is_some_and(|o| o.epoch == seek.epoch)
    }

    /// The consumer is now at the seek's offset: the partition's records are taken again.
    pub fn seek_done(&self, seek: &Seek) {
        if let Some(owned) = self
            .lock()
            .get_mut(&seek.tp)
            .filter(|o| o.epoch == seek.epoch)
        {
            owned.seeking = false;
        }
    }

    /// How many partitions this instance owns.
    pub fn count(&self) -> usize {
        self.lock().owned.values().map(FastMap::len).sum()
    }

    /// The owned partitions and their state.
    pub fn all_owned(&self) -> Vec<(TopicPartition, Owned)> {
        let state = self.lock();
        let mut all = Vec::new();
        for (topic, partitions) in &state.owned {
            for (partition, owned) in partitions {
                let tp = TopicPartition {
                    topic: topic.clone(),
                    partition: *partition,
                };
                all.push((tp, *owned));
            }
        }
        all
    }

    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
    }

    pub fn paused(&self) -> bool {
        self.lock().paused
    }

    pub fn set_fatal(&self, kind: ErrorKind, reason: String) {
        self.lock().fatal.get_or_insert((kind, reason));
        self.wake.notify_one();
    }

    /// A failure inside a rebalance that the pipeline cannot continue from.
    pub fn fatal(&self) -> Option<Failure> {
        let (kind, reason) = self.lock().fatal.clone()?;
        Some(Failure::Position { kind, reason })
    }
}

impl Owned {
    /// Where reading stands: the next offset taken.
    pub fn read_next(&self) -> Option<i64> {
        self.read_next
    }
}

/// A partition whose position is outside what Kafka has, and where reading goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfRange {
    pub tp: TopicPartition,
    /// The offset reading stood at: the next to write.
    pub at: i64,
    /// The offset stored in the database (`at` on assignment; below it when the records in
    /// between are batched).
    pub stored: Option<i64>,
    /// Kafka's log start offset and end offset.
    pub low: i64,
    pub high: i64,
}

impl OutOfRange {
    /// `Some` if `at` lies outside `[low, high]`.
    pub fn check(
        tp: &TopicPartition,
        at: i64,
        stored: Option<i64>,
        (low, high): (i64, i64),
    ) -> Option<OutOfRange> {
        (at < low || at > high).then(|| OutOfRange {
            tp: tp.clone(),
            at,
            stored,
            low,
            high,
        })
    }

    /// Applies `policy`: where reading goes on from, the skip logged and counted; or the
    /// one-line reason to stop.
    pub fn resolve(&self, pipeline: &str, policy: OffsetReset) -> Result<i64, Failure> {
        let to = self.resume_at(policy).ok_or_else(|| Failure::Position {
            kind: ErrorKind::Permanent,
            reason: self.stop_reason(),
        })?;
        self.report_skip(pipeline, to);
        Ok(to)
    }

    /// Where `policy` goes on from, or `None` to stop.
    fn resume_at(&self, policy: OffsetReset) -> Option<i64> {
        match policy {
            OffsetReset::Stop => None,
            OffsetReset::Earliest => Some(self.low),
            OffsetReset::Latest => Some(self.high),
        }
    }

    /// The one line that stops a pipeline: what is missing, where, and what to do.
    fn stop_reason(&self) -> String {
        let what = if self.at < self.low {
            format!(
                "offsets {}..{} were deleted from Kafka (retention) before they were written",
                self.at,
                self.low - 1
            )
        } else {
            "the offset is beyond the end of the partition (was the topic deleted and re-created?)"
                .to_string()
        };
        let stored = self
            .stored
            .map_or_else(|| "none".to_string(), |s| s.to_string());
        format!(
            "topic {} partition {}: the next offset to write, {}, is outside what \
             Kafka has (stored offset {stored}, log start offset {}, end offset {}): {what}; nothing \
             from it on was written. Set source.properties.auto.offset.reset to earliest or latest \
             to go on without them, or move the offset with `idemsink offsets set`",
            self.tp.topic, self.tp.partition, self.at, self.low, self.high
        )
    }

    /// Logs and counts what going on from `to` passes over (never silent).
    fn report_skip(&self, pipeline: &str, to: i64) {
        if self.at < to {
            warn!(
                pipeline,
                partition = %self.tp,
                first_skipped = self.at,
                last_skipped = to - 1,
                skipped = to - self.at,
                log_start_offset = self.low,
                "offsets skipped: Kafka no longer has them (retention deleted them before they were \
                 written); going on as auto.offset.reset says"
            );
            telemetry::records_skipped(pipeline, &self.tp, "retention", to - self.at);
        } else {
            warn!(
                pipeline,
                partition = %self.tp,
                stored = self.at,
                end_offset = self.high,
                resume_at = to,
                "the stored offset is beyond the end of the partition (the topic was re-created or \
                 truncated); reading it again from {to} as auto.offset.reset says"
            );
        }
    }
}

/// A third of the rebalance timeout, at most 30 s: long enough for an ordinary batch, short
/// enough to rejoin in time when the database hangs (the compare-and-set fences the write).
fn drain_patience(pipeline: &LoadedPipeline) -> Duration {
    let max_poll_ms = pipeline
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
    /// What to do when a partition's offset is outside what Kafka has.
    offset_reset: OffsetReset,
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
        pipeline: &LoadedPipeline,
        assignment: Arc<Assignment>,
        store: OffsetStore,
        status: Arc<PipelineStatus>,
    ) -> SinkContext {
        SinkContext {
            status,
            pipeline: pipeline.name().to_string(),
            assignment,
            store,
            start_from: pipeline.config.source.start_from,
            offset_reset: pipeline.offset_reset,
            runtime: tokio::runtime::Handle::current(),
            drain_patience: drain_patience(pipeline),
            retry_for: pipeline.retry_for,
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

    /// Where reading a partition whose stored offset is `stored` starts: there, if Kafka still
    /// has it; otherwise where `auto.offset.reset` says (logged and counted), or an error that
    /// names the partition and both offsets. If the watermarks cannot be read, the stored
    /// offset is used, and a fetch out of range is caught by the consumer loop instead.
    fn check_range<C: Consumer<Self>>(
        &self,
        consumer: &C,
        tp: &TopicPartition,
        stored: i64,
    ) -> Result<i64, Failure> {
        let watermarks = match consumer.fetch_watermarks(&tp.topic, tp.partition, WATERMARK_TIMEOUT)
        {
            Ok(w) => w,
            Err(e) => {
                warn!(pipeline = %self.pipeline, partition = %tp, error = %e, "cannot read the watermarks; starting at the stored offset");
                return Ok(stored);
            }
        };
        match OutOfRange::check(tp, stored, Some(stored), watermarks) {
            Some(out) => out.resolve(&self.pipeline, self.offset_reset),
            None => Ok(stored),
        }
    }

    /// A partition with no stored offset under `start_from: latest` starts at its end offset
    /// now, and that start is stored with the next batch: a restart or a handover before the
    /// first record must not move it forward past records produced meanwhile. (`earliest`
    /// needs no fixing: what it skips is what retention deletes.)
    fn fixed_start<C: Consumer<Self>>(&self, consumer: &C, tp: &TopicPartition) -> Option<i64> {
        if self.start_from != StartFrom::Latest {
            return None;
        }
        match consumer.fetch_watermarks(&tp.topic, tp.partition, WATERMARK_TIMEOUT) {
            Ok((_, end)) => Some(end),
            Err(e) => {
                warn!(pipeline = %self.pipeline, partition = %tp, error = %e, "cannot read the end offset; starting from the end as the broker resolves it");
                None
            }
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
            Err(e) if is_transient(&e) => {
                self.assign_unloaded(consumer, tpl, &tps, &e, cooperative);
                return;
            }
            Err(e) => {
                // Without the stored offsets there is no safe place to start: assign nothing.
                let reason = format!("cannot read stored offsets on assignment: {e}");
                self.stop(ErrorKind::of_database(&e), reason);
                return;
            }
        };
        let mut loaded = Vec::with_capacity(tps.len());
        for tp in &tps {
            let offset = stored.get(tp).copied();
            let (read_from, start) = match self.start_of(consumer, tp, offset) {
                Ok(start) => start,
                Err(failure) => {
                    // Assigning nothing: the pipeline stops before reading a record.
                    self.stop(failure.kind(), failure.to_string());
                    return;
                }
            };
            if let Err(e) = tpl.set_partition_offset(&tp.topic, tp.partition, start) {
                error!(pipeline = %self.pipeline, partition = %tp, error = %e, "cannot set start offset");
            }
            self.assignment.assign(tp, offset, read_from);
            if let Some(from) = read_from.filter(|from| Some(*from) != offset) {
                self.assignment.owe_cover(tp, from);
            }
            loaded.push(match read_from {
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

    /// Where reading a partition whose stored offset is `stored` starts: the offset the
    /// consumer loop takes first (`None`: whatever comes first), and where librdkafka starts.
    /// An error is the one-line reason to stop (see [`SinkContext::check_range`]).
    fn start_of<C: Consumer<Self>>(
        &self,
        consumer: &C,
        tp: &TopicPartition,
        stored: Option<i64>,
    ) -> Result<(Option<i64>, Offset), Failure> {
        let read_from = match stored {
            Some(n) => Some(self.check_range(consumer, tp, n)?),
            None => self.fixed_start(consumer, tp),
        };
        let start = match read_from {
            Some(n) => Offset::Offset(n),
            None => start_offset(None, self.start_from),
        };
        Ok((read_from, start))
    }

    /// Stops the pipeline from a rebalance callback, which cannot return an error: the
    /// consumer loop takes the failure from the assignment.
    fn stop(&self, kind: ErrorKind, reason: String) {
        error!(pipeline = %self.pipeline, %kind, "{reason}");
        self.assignment.set_fatal(kind, reason);
    }

    /// The database did not answer within a rebalance's patience. The partitions are
    /// assigned, but paused at their end and owned with nothing taken, and the consumer loop
    /// loads their offsets once the database answers ([`SinkContext::load_unloaded`]), then
    /// seeks there: the rebalance completes in time, and the outage is waited out for
    /// `errors.retry_for_ms`, as any other.
    fn assign_unloaded(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
        tps: &[TopicPartition],
        error: &sqlx::Error,
        cooperative: bool,
    ) {
        for tp in tps {
            // A valid position, never fetched from while paused (the seek replaces it).
            if let Err(e) = tpl.set_partition_offset(&tp.topic, tp.partition, Offset::End) {
                error!(pipeline = %self.pipeline, partition = %tp, error = %e, "cannot set start offset");
            }
            self.assignment.assign_unloaded(tp);
        }
        let names: Vec<String> = tps.iter().map(ToString::to_string).collect();
        warn!(pipeline = %self.pipeline, partitions = %names.join(" "), %error, cooperative, "assigned, but the stored offsets cannot be read now; these partitions stay paused until the database answers (for errors.retry_for_ms)");
        self.apply_assignment(consumer, tpl, cooperative);
        log_failure(&self.pipeline, "pause", consumer.pause(tpl));
        telemetry::rebalance(
            &self.pipeline,
            "assigned",
            tps.len(),
            self.assignment.count(),
        );
    }

    /// For the consumer loop: tries once to load the offsets of the partitions assigned
    /// while the database did not answer, and has the loop seek each to its start. Err is
    /// the one-line reason to stop: a permanent error, an offset outside what Kafka has
    /// (unless `auto.offset.reset` says otherwise), or `errors.retry_for_ms` spent.
    pub async fn load_unloaded(&self, consumer: &SinkConsumer) -> Result<(), Failure> {
        let (unloaded, since) = self.assignment.unloaded();
        if unloaded.is_empty() {
            return Ok(());
        }
        let tps: Vec<TopicPartition> = unloaded.iter().map(|(tp, _)| tp.clone()).collect();
        let waited = since.map_or(Duration::ZERO, |s| s.elapsed());
        let stored = match self.store.load(&tps).await {
            Ok(stored) => stored,
            Err(e) if is_transient(&e) && waited < self.retry_for => {
                telemetry::db_retry(&self.pipeline, "loading offsets");
                warn!(pipeline = %self.pipeline, error = %e, waited_s = waited.as_secs(), gives_up_in_s = (self.retry_for - waited).as_secs(), "database unavailable or busy; loading the assigned partitions' offsets again shortly");
                return Ok(());
            }
            Err(e) => {
                return Err(Failure::Position {
                    kind: ErrorKind::of_database(&e),
                    reason: format!(
                        "cannot read stored offsets on assignment (waited {} s): {e}",
                        waited.as_secs()
                    ),
                })
            }
        };
        let mut loaded = Vec::with_capacity(unloaded.len());
        for (tp, epoch) in &unloaded {
            let offset = stored.get(tp).copied();
            let (read_from, start) =
                tokio::task::block_in_place(|| self.start_of(consumer, tp, offset))?;
            self.assignment.loaded(tp, *epoch, offset, read_from, start);
            loaded.push(format!(
                "{tp}@{}",
                read_from.map_or_else(
                    || format!("{:?}", self.start_from).to_lowercase(),
                    |n| n.to_string()
                )
            ));
        }
        info!(pipeline = %self.pipeline, partitions = %loaded.join(" "), "the database answered; starting from offsets stored in the database");
        Ok(())
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
            telemetry::consumer_lag(&self.pipeline, tp, 0, 0);
        }
        self.drain();
        let result = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        log_failure(&self.pipeline, "unassign", result);
    }

    /// Waits for the batches in flight, which may cover revoked partitions, to commit or roll
    /// back, so that their next owner starts from offsets that no longer move.
    fn drain(&self) {
        let patience = self.drain_patience;
        let writing = &self.assignment.writing;
        if self
            .block_on(tokio::time::timeout(patience, writing.write()))
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

/// A partition's end offset as of the consumer's last fetch from it: librdkafka's cached high
/// watermark, read without a broker round trip (rust-rdkafka wraps only `fetch_watermarks`,
/// which asks the broker). None before the first fetch.
pub fn cached_end_offset(consumer: &SinkConsumer, tp: &TopicPartition) -> Option<i64> {
    let topic = std::ffi::CString::new(tp.topic.as_str()).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client pointer is valid while `consumer` lives; `topic` is NUL-terminated
    // and outlives the call; `low` and `high` are valid for writes. The function only reads
    // librdkafka's cached partition state, under librdkafka's own lock.
    let error = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            tp.partition,
            &mut low,
            &mut high,
        )
    };
    (error == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// The consumer loop met a fetch out of range, after which librdkafka fetches nothing more of
/// that partition (`auto.offset.reset` is always `error` for it). Finds the owned partitions
/// whose position is outside what Kafka has now and, as `auto.offset.reset` says, returns the
/// one-line reason to stop, or logs and counts the skip and fetches them again from there.
/// Returns how many partitions it found.
pub fn recover_out_of_range(consumer: &SinkConsumer) -> Result<usize, Failure> {
    let context = consumer.context();
    let pipeline = &context.pipeline;
    let mut found = 0;
    for (tp, owned) in context.assignment.all_owned() {
        let Some(at) = owned.read_next() else {
            continue;
        };
        let watermarks = consumer
            .fetch_watermarks(&tp.topic, tp.partition, WATERMARK_TIMEOUT)
            .map_err(|e| Failure::Position {
                kind: ErrorKind::of_kafka(&e),
                reason: format!(
                    "a fetch was out of range, and the watermarks of {tp} cannot be read: {e}"
                ),
            })?;
        let Some(out) = OutOfRange::check(&tp, at, owned.db_next, watermarks) else {
            continue;
        };
        found += 1;
        let to = out.resolve(pipeline, context.offset_reset)?;
        context.assignment.skip_to(&tp, to);
        fetch_again(consumer, &tp, to).map_err(|e| Failure::Position {
            kind: ErrorKind::of_kafka(&e),
            reason: format!("cannot fetch {tp} again from {to}: {e}"),
        })?;
    }
    Ok(found)
}

/// Restarts fetching a partition that librdkafka stopped, at `to`: a seek is refused in that
/// state, a new assignment is not. Under the eager protocol the whole assignment is given
/// again, every other partition from where the consumer loop stands in it.
fn fetch_again(consumer: &SinkConsumer, tp: &TopicPartition, to: i64) -> KafkaResult<()> {
    let context = consumer.context();
    let mut list = TopicPartitionList::new();
    if matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    ) {
        list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(to))?;
        consumer.incremental_unassign(&list)?;
        consumer.incremental_assign(&list)?;
    } else {
        for (other, owned) in context.assignment.all_owned() {
            let offset = match owned.read_next() {
                _ if &other == tp => Offset::Offset(to),
                Some(n) => Offset::Offset(n),
                None => start_offset(None, context.start_from),
            };
            list.add_partition_offset(&other.topic, other.partition, offset)?;
        }
        consumer.assign(&list)?;
    }
    if context.assignment.paused() {
        consumer.pause(&list)?;
    }
    Ok(())
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
    /// An open producer transaction holds read_committed readers at the last stable offset:
    /// what lies beyond it is reported apart from the lag.
    fn stats(&self, statistics: Statistics) {
        for (tp, owned) in self.assignment.all_owned() {
            let Some(partition) = statistics
                .topics
                .get(&tp.topic)
                .and_then(|t| t.partitions.get(&tp.partition))
                .filter(|p| p.hi_offset >= 0 && p.ls_offset >= 0)
            else {
                continue;
            };
            if let Some(stored) = owned.db_next {
                telemetry::consumer_lag(
                    &self.pipeline,
                    &tp,
                    partition.ls_offset - stored,
                    partition.hi_offset - partition.ls_offset,
                );
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
            // librdkafka (2.12) calls the rebalance callback with these two codes only; were
            // another to come, owning nothing while the group thinks otherwise would stall
            // the partitions unseen, so the pipeline stops and a restart joins afresh.
            other => {
                let reason =
                    format!("rebalance failed ({other:?}); the whole assignment is dropped");
                self.stop(ErrorKind::Internal, reason);
                self.assignment.revoke_all();
                self.drain();
                // Under a cooperative protocol librdkafka refuses the eager unassign().
                let result = if cooperative {
                    consumer
                        .assignment()
                        .and_then(|all| consumer.incremental_unassign(&all))
                } else {
                    consumer.unassign()
                };
                log_failure(&self.pipeline, "unassign", result);
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

    fn tp(partition: i32) -> TopicPartition {
        TopicPartition {
            topic: "t".into(),
            partition,
        }
    }

    #[test]
    fn accept_filters_by_ownership_and_position_and_reset_starts_a_new_epoch() {
        let a = Assignment::default();
        let tp = tp(0);
        assert_eq!(a.accept("t", 0, 5), None, "not owned");
        a.assign(&tp, Some(10), Some(10));
        assert_eq!(a.accept("t", 0, 9), None, "before the stored offset");
        let epoch = a.accept("t", 0, 10).expect("taken");
        assert_eq!(a.accept("t", 0, 10), None, "re-delivered");
        a.committed(&tp, epoch, 11);
        assert_eq!(a.owned(&tp).map(|o| o.db_next), Some(Some(11)));
        a.reset(&tp, epoch, Some(20), StartFrom::Earliest);
        let after = a.owned(&tp).expect("owned");
        assert_ne!(after.epoch, epoch);
        assert_eq!(after.db_next, Some(20));
        let seeks = a.take_seeks();
        assert_eq!(seeks.len(), 1);
        assert_eq!(
            (seeks[0].offset, seeks[0].epoch),
            (Some(Offset::Offset(20)), after.epoch)
        );
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

    /// The gap after a reset: a record fetched before the seek (offset 30, past the stored 20)
    /// must not be taken in the new epoch, or the seek's re-delivery of 20..30 would be
    /// dropped as already covered and the compare-and-set would skip them.
    #[test]
    fn after_a_reset_nothing_is_taken_until_the_seek_is_done() {
        let a = Assignment::default();
        let tp = tp(0);
        a.assign(&tp, Some(10), Some(10));
        let epoch = a.accept("t", 0, 29).expect("taken");
        a.reset(&tp, epoch, Some(20), StartFrom::Earliest);
        assert_eq!(a.accept("t", 0, 30), None, "in flight from before the seek");
        assert_eq!(a.cover_to(&tp, 31), None, "the position is the old one");
        let seek = a.take_seeks().pop().expect("a seek");
        assert!(a.seek_owed(&seek));
        a.seek_done(&seek);
        assert_eq!(
            a.accept("t", 0, 20),
            Some(seek.epoch),
            "re-delivered from 20"
        );
    }

    #[test]
    fn a_seek_of_an_ended_epoch_is_not_owed() {
        let a = Assignment::default();
        let tp = tp(0);
        a.assign(&tp, Some(10), Some(10));
        let epoch = a.owned(&tp).expect("owned").epoch;
        a.reset(&tp, epoch, Some(5), StartFrom::Earliest);
        let stale = a.take_seeks().pop().expect("a seek");
        a.revoke(&tp);
        a.assign(&tp, Some(7), Some(7));
        assert!(!a.seek_owed(&stale), "revoked and assigned again since");
        assert!(a.accept("t", 0, 7).is_some(), "the new epoch reads");
    }

    #[test]
    fn positions_past_markers_are_covered_once_and_never_backwards() {
        let a = Assignment::default();
        let tp = tp(0);
        a.assign(&tp, Some(10), Some(10));
        let epoch = a.accept("t", 0, 10).expect("taken");
        assert_eq!(a.cover_to(&tp, 11), None, "nothing past the record");
        assert_eq!(a.cover_to(&tp, 12), Some(epoch), "its commit marker");
        assert_eq!(a.cover_to(&tp, 12), None, "covered already");
        assert_eq!(a.accept("t", 0, 11), None, "below the cover");
        assert_eq!(a.accept("t", 0, 12), Some(epoch));
    }

    /// Issue 25, item 10: a reset's seek still owed when a fetch out of range from the old
    /// position arrives. The skip re-assigns the partition at the log start; the stale seek,
    /// applied after it, would take it below the log start again, where the next fetch out of
    /// range finds nothing outside (reading stands at the skip's offset), and the partition
    /// would fetch nothing more.
    #[test]
    fn a_skip_supersedes_a_seek_still_owed_for_the_partition() {
        let a = Assignment::default();
        let tp = tp(0);
        a.assign(&tp, Some(10), Some(10));
        let epoch = a.accept("t", 0, 10).expect("taken");
        // Fenced: start over from the database's 5, which Kafka has deleted since.
        a.reset(&tp, epoch, Some(5), StartFrom::Earliest);
        // Before the consumer loop seeks, the fetch out of range: the log starts at 50.
        assert_eq!(a.skip_to(&tp, 50), Some(Some(5)));
        let seeks = a.take_seeks();
        assert!(
            !seeks.iter().any(|s| s.offset.is_some() && a.seek_owed(s)),
            "no seek back below the log start is owed: {seeks:?}"
        );
        let skip = seeks.last().expect("the skip's cover");
        assert_eq!((skip.offset, skip.cover), (None, Some(50)));
        assert!(a.accept("t", 0, 50).is_some(), "reading goes on at 50");
    }

    #[test]
    fn a_skip_forward_keeps_the_epoch_and_a_skip_backward_starts_a_new_one() {
        let a = Assignment::default();
        let tp = tp(0);
        a.assign(&tp, Some(10), Some(10));
        let epoch = a.accept("t", 0, 10).expect("taken");
        assert_eq!(a.skip_to(&tp, 50), Some(Some(11)));
        assert_eq!(
            a.owned(&tp).map(|o| o.epoch),
            Some(epoch),
            "batched 10 still commits"
        );
        let cover = a.take_seeks().pop().expect("owed");
        assert_eq!((cover.offset, cover.cover), (None, Some(50)));
        assert_eq!(a.accept("t", 0, 49), None);
        assert_eq!(a.accept("t", 0, 50), Some(epoch));
        assert_eq!(a.skip_to(&tp, 0), Some(Some(51)));
        let after = a.owned(&tp).expect("owned");
        assert_ne!(
            after.epoch, epoch,
            "what was read before the topic was re-created is dropped"
        );
        assert_eq!(
            after.db_next,
            Some(10),
            "the compare-and-set still expects the stored offset"
        );
        assert_eq!(a.accept("t", 0, 0), Some(after.epoch));
    }

    #[test]
    fn out_of_range_offsets_name_the_partition_and_both_offsets() {
        let tp = tp(3);
        assert_eq!(OutOfRange::check(&tp, 100, Some(100), (50, 200)), None);
        assert_eq!(
            OutOfRange::check(&tp, 200, Some(200), (50, 200)),
            None,
            "the end is in range"
        );
        let gone = OutOfRange::check(&tp, 10, Some(10), (50, 200)).expect("deleted");
        assert_eq!(gone.resume_at(OffsetReset::Stop), None);
        assert_eq!(gone.resume_at(OffsetReset::Earliest), Some(50));
        assert_eq!(gone.resume_at(OffsetReset::Latest), Some(200));
        let stopped = gone
            .resolve("p", OffsetReset::Stop)
            .expect_err("stop is the default");
        assert_eq!(stopped.kind(), ErrorKind::Permanent);
        let reason = crate::error::PipelineError::new("p", stopped).to_string();
        for needle in [
            "pipeline p",
            "topic t partition 3",
            "stored offset 10,",
            "next offset to write, 10,",
            "log start offset 50",
            "offsets 10..49 were deleted",
        ] {
            assert!(reason.contains(needle), "{needle}: {reason}");
        }
        let beyond = OutOfRange::check(&tp, 300, Some(300), (0, 200)).expect("beyond");
        assert!(beyond.stop_reason().contains("beyond the end"));
    }
}
