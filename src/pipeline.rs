//! One pipeline, end to end: the consumer loop turns records into rows and cuts batches;
//! the writer cuts each batch by lane (`sink.writers`, a partition always in the same lane)
//! and each lane commits its part (rows + its partitions' offsets) in one transaction. They
//! all run concurrently so the database and Kafka work at the same time, and one lane writes
//! while another commits. When the database is the
//! slower side, one batch waits for the writer while librdkafka prefetches; if it waits long,
//! fetching pauses and the consumer is polled again, so memory stays bounded and a slow
//! database never costs the group membership.
//!
//! The commit path: `commit_batch` keeps what the instance still owns (`owned_moves`), and
//! [`Writer::write`] writes it in one transaction (`write_batch` in `writer/mod.rs`: each
//! table's rows, the dead letters, then the offsets' compare-and-set,
//! `OffsetStore::compare_and_set_postgres`/`_mysql`); then `on_committed`, or `on_fenced`
//! when another instance moved an offset first.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::Offset;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::{Instant, Sleep};
use tracing::{debug, error, info, warn};

use crate::batch::{Batch, BatchLimits, DeadLetter, RawRecord};
use crate::cells::Cells;
use crate::config::{
    redact_url, ConfigError, ConfigErrors, LoadedPipeline, OnTruncate, StartFrom, Tolerance,
};
use crate::consumer::{
    cached_end_offset, client_config, recover_out_of_range, Assignment, Owned, Seek, SinkConsumer,
    SinkContext,
};
use crate::db::{is_access_denied, is_lock_timeout, Backend, DbPool};
use crate::dead_letters::{headers_to_json, DeadLetterTable};
use crate::error::{ErrorKind, Failure, PipelineError};
use crate::health::PipelineStatus;
use crate::mapping::{ConvertError, Converted, RecordRef, RowMapper, RowOp};
use crate::offsets::{OffsetMove, OffsetStore, TopicPartition};
use crate::retry::retry;
use crate::routing::Routes;
use crate::telemetry;
use crate::writer::{RefusedRecord, RowCounts, SinkPlan, WriteOutcome, Writer};

/// Everything a running pipeline shares between its consumer loop and its writer.
struct Shared {
    pipeline: String,
    /// `errors.tolerance: all`: bad records become dead letters, so batches keep each
    /// record as it came.
    dead_letters: Option<DeadLetterTable>,
    /// How long database work is retried through transient faults (`errors.retry_for_ms`).
    retry_for: Duration,
    start_from: StartFrom,
    assignment: Arc<Assignment>,
    consumer: Arc<SinkConsumer>,
    store: OffsetStore,
    /// What `/readyz` says of this pipeline.
    status: Arc<PipelineStatus>,
    /// Whether the writer lanes are waiting for batches.
    writer: WriterIdle,
}

/// Whether every writer lane is waiting for a batch, and a wake-up for the consumer loop when
/// they all are (see [`send_now`]).
struct WriterIdle {
    lanes: usize,
    waiting_lanes: AtomicUsize,
    waiting: Notify,
}

impl WriterIdle {
    fn new(lanes: usize) -> WriterIdle {
        WriterIdle {
            lanes,
            waiting_lanes: AtomicUsize::new(0),
            waiting: Notify::new(),
        }
    }

    fn is_waiting(&self) -> bool {
        self.waiting_lanes.load(Ordering::Acquire) >= self.lanes
    }

    /// Counts a lane waiting until the guard is dropped.
    fn wait(&self) -> impl Drop + '_ {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if self.waiting_lanes.fetch_add(1, Ordering::AcqRel) + 1 >= self.lanes {
            self.waiting.notify_one();
        }
        Waiting(&self.waiting_lanes)
    }
}

impl Shared {
    /// Stops or restarts fetching for every partition this instance holds (those waiting for
    /// their stored offsets stay paused).
    fn pause_fetching(&self, paused: bool) {
        self.assignment.set_paused(paused);
        let consumer = &self.consumer;
        let result = consumer.assignment().and_then(|tpl| {
            if paused {
                consumer.pause(&tpl)
            } else {
                consumer.resume(&self.without_unloaded(&tpl))
            }
        });
        match result {
            Ok(()) if paused => debug!(pipeline = %self.pipeline, "writer busy: fetching paused"),
            Ok(()) => debug!(pipeline = %self.pipeline, "fetching resumed"),
            Err(e) => {
                error!(pipeline = %self.pipeline, paused, error = %e, "pausing or resuming fetching failed")
            }
        }
    }

    fn without_unloaded(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for e in tpl.elements() {
            let tp = TopicPartition {
                topic: e.topic().to_string(),
                partition: e.partition(),
            };
            if !self.assignment.is_unloaded(&tp) {
                list.add_partition(e.topic(), e.partition());
            }
        }
        list
    }

    /// Restarts fetching these partitions.
    fn resume(&self, tps: &[TopicPartition]) {
        let mut list = TopicPartitionList::new();
        for tp in tps {
            list.add_partition(&tp.topic, tp.partition);
        }
        if let Err(e) = self.consumer.resume(&list) {
            error!(pipeline = %self.pipeline, error = %e, "resuming fetching failed");
        }
    }

    fn db(&self, context: &'static str) -> impl FnOnce(sqlx::Error) -> PipelineError + '_ {
        move |source| self.fail(Failure::Database { context, source })
    }

    fn fail(&self, failure: Failure) -> PipelineError {
        PipelineError::new(&self.pipeline, failure)
    }
}

/// Connects to the pipeline's database with a small pool: one connection per writer lane,
/// one that serves rebalances, and a spare that absorbs a reconnect. A database that is unreachable or
/// starting is waited for up to `patience` (zero: one attempt, for the commands).
pub async fn connect(
    pipeline: &LoadedPipeline,
    patience: Duration,
) -> Result<DbPool, PipelineError> {
    let url = &pipeline.config.sink.url;
    let connected = retry(pipeline.name(), "connecting", patience, || {
        DbPool::connect_with_limits(
            url,
            pipeline.config.sink.writers as u32 + 2,
            pipeline.session,
        )
    });
    connected.await.map_err(|source| {
        let url = redact_url(&pipeline.config.sink.url);
        PipelineError::new(pipeline.name(), Failure::Connect { url, source })
    })
}

/// Connects as [`connect`] does, then creates or upgrades idemsink's own tables (offsets,
/// dead letters): what `run` and every command that reads those tables start with.
pub async fn connect_migrated(
    pipeline: &LoadedPipeline,
    patience: Duration,
) -> Result<DbPool, PipelineError> {
    let pool = connect(pipeline, patience).await?;
    pool.migrate()
        .await
        .map_err(|e| PipelineError::new(pipeline.name(), Failure::Migrate(e)))?;
    Ok(pool)
}

/// Runs one pipeline until `shutdown` turns true (clean exit) or a fatal error, reporting
/// its readiness in `status`.
pub async fn run(
    pipeline: LoadedPipeline,
    mut shutdown: watch::Receiver<bool>,
    status: Arc<PipelineStatus>,
) -> Result<(), PipelineError> {
    // Waiting for the database may take `errors.retry_for_ms`: a shutdown meanwhile ends it.
    let pool = tokio::select! {
        pool = connect_migrated(&pipeline, pipeline.retry_for) => pool?,
        _ = shutdown.wait_for(|stop| *stop) => {
            info!(pipeline = %pipeline.name(), "shutdown requested while waiting for the database; nothing was read");
            return Ok(());
        }
    };
    let plans = SinkPlan::prepare_all(&pipeline, &pool)
        .await
        .map_err(|e| PipelineError::new(pipeline.name(), Failure::Config(ConfigErrors(e))))?;
    let mappers = Mappers::new(&plans, &pipeline);
    let truncating: Vec<usize> = (0..plans.len())
        .filter(|t| plans[*t].truncate == OnTruncate::Apply)
        .collect();
    let tables: Vec<String> = plans.iter().map(|plan| plan.table.to_string()).collect();
    let mode = pipeline.config.sink.mode;
    let store = OffsetStore::new(pipeline.name(), pool.clone());
    let dead_letters = dead_letter_table(&pipeline, &pool).await?;
    let writer = Writer::new(
        &pool,
        plans,
        pipeline.routes.clone(),
        store.clone(),
        dead_letters.clone(),
    )
    .await
    .map_err(|source| {
        let context = "preparing the writer";
        PipelineError::new(pipeline.name(), Failure::Database { context, source })
    })?;
    telemetry::start_pipeline(pipeline.name(), pool.backend() == Backend::Postgres);
    status.set_database(true);
    let shared = Arc::new(subscribe(&pipeline, store, dead_letters, status.clone())?);
    check_truncated_topics(&shared, &pipeline, &truncating).await?;
    info!(
        pipeline = %shared.pipeline,
        database = %pool.backend(),
        tables = %tables.join(","),
        mode = %mode,
        topics = %pipeline.config.source.topics.join(","),
        group = %pipeline.group_id(),
        rows_by = writer.write_method(),
        "pipeline started"
    );

    let (batches, inbox) = mpsc::channel::<Batch>(1);
    let lanes = pipeline.config.sink.writers;
    let writer_task = tokio::spawn(write_loop(shared.clone(), Arc::new(writer), lanes, inbox));
    let reading = read_loop(&shared, pipeline.batch, mappers, batches, &mut shutdown).await;
    // The consumer loop has stopped and dropped its sender: the writer drains and ends.
    let writing = serve_group_while(&shared, writer_task).await;
    let writing = writing.unwrap_or_else(|e| {
        Err(shared.fail(Failure::Internal(format!("the writer task failed: {e}"))))
    });
    let pipeline = shared.pipeline.clone();
    close(shared).await;
    pool.close().await;
    writing?;
    reading?;
    info!(pipeline = %pipeline, "pipeline stopped");
    Ok(())
}

/// Waits for `task` (the writer's last batches at shutdown) while still polling the
/// consumer, so that a long final write neither holds up a rebalance the group started nor
/// exceeds `max.poll.interval.ms`. What arrives meanwhile is not taken: its offsets are not
/// stored, and the next owner reads it again.
async fn serve_group_while<T>(shared: &Shared, task: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(task);
    loop {
        tokio::select! {
            done = &mut task => return done,
            received = shared.consumer.recv() => {
                if let Err(e) = received {
                    debug!(pipeline = %shared.pipeline, error = %e, "consumer error while the last batches are written");
                }
            }
        }
    }
}

/// With `errors.tolerance: all`, the dead-letter table, created if it is not the default one.
async fn dead_letter_table(
    pipeline: &LoadedPipeline,
    pool: &DbPool,
) -> Result<Option<DeadLetterTable>, PipelineError> {
    if pipeline.config.errors.tolerance == Tolerance::None {
        return Ok(None);
    }
    let table = DeadLetterTable::open(pipeline.name(), pipeline.dead_letter_table.clone(), pool)
        .await
        .map_err(|source| {
            let context = "opening the dead-letter table";
            PipelineError::new(pipeline.name(), Failure::Database { context, source })
        })?;
    Ok(Some(table))
}

/// How long the broker has to say how many partitions a topic has.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// With `sink.truncate: apply`, each topic of a table that truncates must have one partition:
/// a truncate has no key, so it lands in any partition, and a change made before it at the
/// source but read after it from another partition would bring back a row it removed.
async fn check_truncated_topics(
    shared: &Shared,
    pipeline: &LoadedPipeline,
    truncating: &[usize],
) -> Result<(), PipelineError> {
    let topics: Vec<String> = truncating
        .iter()
        .flat_map(|t| pipeline.routes.topics_of(*t))
        .map(str::to_string)
        .collect();
    if topics.is_empty() {
        return Ok(());
    }
    let consumer = shared.consumer.clone();
    let counted = tokio::task::spawn_blocking(move || {
        let mut counts = Vec::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
            let partitions = metadata
                .topics()
                .iter()
                .map(|t| t.partitions().len())
                .sum::<usize>();
            counts.push((topic, partitions));
        }
        Ok::<_, KafkaError>(counts)
    })
    .await
    .map_err(|e| shared.fail(Failure::Internal(format!("reading topics failed: {e}"))))?
    .map_err(|source| {
        let context = "reading the partitions of the topics that truncate";
        shared.fail(Failure::Kafka { context, source })
    })?;
    let problems: Vec<_> = counted
        .into_iter()
        .filter(|(_, partitions)| *partitions > 1)
        .map(|(topic, partitions)| {
            pipeline.error(
                "sink.truncate",
                format!(
                    "apply needs topics of one partition, and topic {topic} has {partitions}: a \
                     truncate has no key, so a change read after it from another partition \
                     could bring back a row it removed (Debezium's topics have one partition \
                     unless topic.creation says otherwise)"
                ),
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(shared.fail(Failure::Config(ConfigErrors(problems))))
    }
}

/// Creates the consumer, whose rebalances load offsets from `store`, and joins the group.
fn subscribe(
    pipeline: &LoadedPipeline,
    store: OffsetStore,
    dead_letters: Option<DeadLetterTable>,
    status: Arc<PipelineStatus>,
) -> Result<Shared, PipelineError> {
    let name = pipeline.name().to_string();
    let kafka = |context| {
        let pipeline = name.clone();
        move |source| PipelineError::new(&pipeline, Failure::Kafka { context, source })
    };
    let assignment = Arc::new(Assignment::default());
    // A lock wait ends after `lock_timeout_ms` and the batch is retried: a batch still
    // failing after three such waits is stuck, not unlucky.
    status.set_stuck_after(3 * pipeline.session.lock_timeout);
    let context = SinkContext::new(pipeline, assignment.clone(), store.clone(), status.clone());
    let consumer: SinkConsumer = client_config(pipeline)
        .create_with_context(context)
        .map_err(kafka("creating the consumer"))?;
    let topics: Vec<&str> = pipeline
        .config
        .source
        .topics
        .iter()
        .map(String::as_str)
        .collect();
    consumer.subscribe(&topics).map_err(kafka("subscribing"))?;
    Ok(Shared {
        store,
        dead_letters,
        retry_for: pipeline.retry_for,
        pipeline: name,
        start_from: pipeline.config.source.start_from,
        assignment,
        consumer: Arc::new(consumer),
        status,
        writer: WriterIdle::new(pipeline.config.sink.writers),
    })
}

/// Leaves the group: closing the consumer runs the final revocation, which needs polling,
/// so it happens off the async workers.
async fn close(shared: Arc<Shared>) {
    let Ok(shared) = Arc::try_unwrap(shared) else {
        warn!("consumer still shared at shutdown; leaving the group by session timeout");
        return;
    };
    let pipeline = shared.pipeline.clone();
    let consumer = shared.consumer;
    let closed = tokio::task::spawn_blocking(move || {
        consumer.unsubscribe();
        drop(consumer);
    })
    .await;
    if let Err(e) = closed {
        warn!(pipeline = %pipeline, error = %e, "closing the consumer failed");
    }
}

/// Reads records, converts them and hands full (or old enough) batches to the writer.
///
/// Longer than most functions here, for a reason: it is one `select!` over everything the
/// consumer loop waits on, whose arms share the open batch, the handover and the timers;
/// each arm's work is a function of its own.
async fn read_loop(
    shared: &Shared,
    limits: BatchLimits,
    mappers: Mappers,
    batches: mpsc::Sender<Batch>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let full = |batch: &Batch| limits.is_full(batch);
    let max_wait = limits.max_wait;
    let mut batch = Batch::new(mappers.width);
    let mut handover = Handover {
        shared,
        waiting: None,
        paused: false,
        pause_at: Box::pin(tokio::time::sleep(PAUSE_AFTER)),
    };
    // Armed when a batch gets its first row; fires if the batch is still open then.
    let flush_timer = tokio::time::sleep(max_wait);
    tokio::pin!(flush_timer);
    let mut idle = tokio::time::interval(COVER_WHEN_IDLE);
    idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut messages = shared.consumer.stream();
    let mut load_again = tokio::time::interval(LOAD_UNLOADED_EVERY);
    load_again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let can_offer = handover.waiting.is_none();
        let may_pause = !can_offer && !handover.paused;
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // The writer stopped on an error (which `run` reports): stop reading at once,
            // even when no record is coming that would have to be sent to it.
            _ = batches.closed() => return Ok(()),
            _ = shared.assignment.wake.notified() => {
                if let Some(failure) = shared.assignment.fatal() {
                    return Err(shared.fail(failure));
                }
                apply_seeks(shared, &mut batch).await?;
            }
            permit = batches.reserve(), if !can_offer => {
                let Ok(permit) = permit else { return Ok(()) };
                handover.send_waiting(permit);
                if full(&batch) {
                    handover.offer(&batches, cut(shared, &mut batch));
                }
            }
            _ = handover.pause_at.as_mut(), if may_pause => handover.pause(),
            // Partitions assigned while the database did not answer wait for their offsets.
            _ = load_again.tick(), if shared.assignment.has_unloaded() => {
                shared.consumer.context().load_unloaded(&shared.consumer).await.map_err(|f| shared.fail(f))?;
                apply_seeks(shared, &mut batch).await?;
            }
            _ = &mut flush_timer, if can_offer && !batch.is_empty() => {
                handover.offer(&batches, cut(shared, &mut batch));
            }
            // Caught up: offsets read past without a record (a transaction's commit or abort
            // marker) are committed on their own, so the stored offsets reach the end offsets.
            _ = idle.tick(), if can_offer && batch.is_empty() => {
                cover_positions(shared, &mut batch);
                if !batch.is_empty() {
                    handover.offer(&batches, cut(shared, &mut batch));
                }
            }
            // The writer has nothing to do: a batch of a caught-up stream goes now.
            _ = shared.writer.waiting.notified(), if can_offer && !batch.is_empty() => {
                if send_now(shared, &batch) {
                    handover.offer(&batches, cut(shared, &mut batch));
                }
            }
            // Records are taken while no batch waits, or once fetching is paused: then only
            // what was fetched before the pause still arrives. What is ready after the first
            // is taken in the same turn, up to TAKE_AT_ONCE records.
            received = messages.next(), if can_offer || handover.paused => {
                let mut received = received;
                for taken in 1.. {
                    let Some(received_now) = received else {
                        let ended = "the consumer's message stream ended".to_string();
                        return Err(shared.fail(Failure::Internal(ended)));
                    };
                    let message = match received_now {
                        Ok(m) => m,
                        Err(e) => { consumer_error(shared, e)?; break; }
                    };
                    #[cfg(feature = "testkit")]
                    crate::testkit::hold_received(message.offset()).await;
                    let opens_batch = batch.is_empty();
                    // Past partition 0 only: the topic is read (and checked as UTF-8) once
                    // per record, in add_record.
                    let refused = (message.partition() > 0)
                        .then(|| mappers.refuses(message.topic(), message.partition()))
                        .flatten();
                    if let Some(refused) = refused {
                        // Commit what came before it, then stop.
                        handover.finish(&batches, batch).await;
                        return Err(shared.fail(Failure::Config(ConfigErrors(vec![refused]))));
                    }
                    if let Err(error) = add_record(shared, &mappers, &message, &mut batch) {
                        let failed = shared.fail(Failure::BadRecord {
                            tp: TopicPartition {
                                topic: message.topic().to_string(),
                                partition: message.partition(),
                            },
                            offset: message.offset(),
                            error,
                        });
                        // Commit what came before the bad record, then stop.
                        handover.finish(&batches, batch).await;
                        return Err(failed);
                    }
                    if opens_batch && !batch.is_empty() {
                        flush_timer.as_mut().reset(Instant::now() + max_wait);
                    }
                    // While a batch waits for the writer, records fetched before the pause took
                    // effect gather in the next one, beyond `max_records` if need be.
                    if handover.waiting.is_none() && full(&batch) {
                        handover.offer(&batches, cut(shared, &mut batch));
                    }
                    if taken == TAKE_AT_ONCE || (handover.waiting.is_some() && !handover.paused) {
                        break;
                    }
                    match messages.next().now_or_never() {
                        Some(next) => received = next,
                        None => {
                            // Nothing more is ready now.
                            if handover.waiting.is_none() && !batch.is_empty() && send_now(shared, &batch) {
                                handover.offer(&batches, cut(shared, &mut batch));
                            }
                            break;
                        }
                    }
                }
            }
        }
    }
    cover_positions(shared, &mut batch);
    handover.finish(&batches, batch).await;
    Ok(())
}

/// At most how many records the consumer loop takes in one turn before it looks at its other
/// work again (shutdown, seeks, the writer): enough to spread a turn's cost over many records,
/// few enough that a turn stays short.
const TAKE_AT_ONCE: usize = 1024;

/// Whether `batch` should go to the writer now rather than when full or `max_wait_ms` old:
/// when every writer lane is waiting for work and the consumer has read each of the batch's
/// partitions to its end (as of the last fetch), no record is coming that the batch could
/// gather, so waiting would only add latency. A lagging consumer keeps filling its batches
/// up to `max_records` and `max_bytes`, and a caught-up one sends each as soon as it can.
fn send_now(shared: &Shared, batch: &Batch) -> bool {
    if !shared.writer.is_waiting() {
        return false;
    }
    let Ok(positions) = shared.consumer.position() else {
        return false;
    };
    batch.spans.iter().filter(|s| s.records > 0).all(|span| {
        let position = positions
            .find_partition(&span.tp.topic, span.tp.partition)
            .map(|e| e.offset());
        let end = cached_end_offset(&shared.consumer, &span.tp);
        matches!((position, end), (Some(Offset::Offset(at)), Some(end)) if at >= end)
    })
}

/// How often a caught-up consumer loop looks for offsets to cover without a record.
const COVER_WHEN_IDLE: Duration = Duration::from_secs(1);

/// How often the offsets of partitions assigned during a database outage are tried again.
const LOAD_UNLOADED_EVERY: Duration = Duration::from_secs(1);

/// Takes the open batch for the writer, leaving an empty one: first it covers the offsets
/// read past after its last record of each partition.
fn cut(shared: &Shared, batch: &mut Batch) -> Batch {
    cover_positions(shared, batch);
    let next = Batch::with_room_of(batch);
    std::mem::replace(batch, next)
}

/// Extends `batch` over the offsets the consumer has read past that held no record for a
/// read_committed reader: transaction markers, and records of aborted transactions. The
/// consumer's position moves past them (librdkafka counts a marker as consumed) while the
/// consumer loop, the only reader, has taken every record before it; so committing up to the
/// position skips nothing. Without this a transactional topic's stored offsets would stop one
/// short of the end, and a run of aborted transactions would never be committed past.
fn cover_positions(shared: &Shared, batch: &mut Batch) {
    let Ok(positions) = shared.consumer.position() else {
        return;
    };
    for element in positions.elements() {
        let Offset::Offset(position) = element.offset() else {
            continue; // nothing consumed since the assignment or the last seek
        };
        let tp = TopicPartition {
            topic: element.topic().to_string(),
            partition: element.partition(),
        };
        if let Some(epoch) = shared.assignment.cover_to(&tp, position) {
            batch.cover(&tp, epoch, position);
        }
    }
}

/// How long a batch waits for the writer before fetching pauses. Until then the consumer
/// loop takes no record and librdkafka prefetches (bounded by `queued.max.messages.kbytes`),
/// which keeps a writer-bound pipeline at full speed; rebalance events wait at most this long.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// Batches on their way to the writer. One may wait while the writer is busy. If it waits
/// longer than [`PAUSE_AFTER`], fetching is paused and the consumer loop goes back to polling
/// (rebalances, `max.poll.interval.ms`) however long the database takes.
struct Handover<'a> {
    shared: &'a Shared,
    waiting: Option<Batch>,
    paused: bool,
    /// Fires [`PAUSE_AFTER`] after a batch started waiting.
    pause_at: Pin<Box<Sleep>>,
}

impl Handover<'_> {
    /// Gives `batch` to the writer if it can take it now, or keeps it waiting. A writer that
    /// has stopped is noticed by the consumer loop's `closed` arm.
    fn offer(&mut self, writer: &mpsc::Sender<Batch>, batch: Batch) {
        self.count_consumed(&batch);
        if let Err(TrySendError::Full(batch)) = writer.try_send(batch) {
            self.waiting = Some(batch);
            self.pause_at.as_mut().reset(Instant::now() + PAUSE_AFTER);
        }
    }

    fn count_consumed(&self, batch: &Batch) {
        for span in &batch.spans {
            telemetry::records_consumed(&self.shared.pipeline, &span.tp, span.records);
        }
    }

    fn pause(&mut self) {
        self.paused = true;
        self.shared.pause_fetching(true);
    }

    fn send_waiting(&mut self, permit: mpsc::Permit<'_, Batch>) {
        if let Some(batch) = self.waiting.take() {
            permit.send(batch);
        }
        if std::mem::take(&mut self.paused) {
            self.shared.pause_fetching(false);
        }
    }

    /// At the end of reading: hands over what is left, waiting for the writer to take it.
    async fn finish(mut self, writer: &mpsc::Sender<Batch>, open: Batch) {
        // The waiting batch was counted when it was offered.
        self.count_consumed(&open);
        let left = self.waiting.take().into_iter().chain(Some(open));
        for batch in left.filter(|b| !b.is_empty()) {
            if writer.send(batch).await.is_err() {
                return; // the writer stopped on an error, which `run` reports
            }
        }
    }
}

/// The record → row mapping of each table, found by the record's topic.
struct Mappers {
    /// One per table, in the order of `routes`.
    mappers: Vec<RowMapper>,
    routes: Routes,
    /// The most columns a table has: a batch holds rows of every table, each row's cells in
    /// its table's first columns, NULL in the rest.
    width: usize,
    /// Per table, whether it applies truncates (`sink.truncate: apply`), which needs topics
    /// of one partition; with the pipeline file, for the error.
    truncating: Vec<bool>,
    file: std::path::PathBuf,
}

impl Mappers {
    fn new(plans: &[SinkPlan], pipeline: &LoadedPipeline) -> Mappers {
        let mappers: Vec<RowMapper> = plans.iter().map(SinkPlan::mapper).collect();
        let width = mappers.iter().map(|m| m.columns().len()).max().unwrap_or(0);
        Mappers {
            mappers,
            routes: pipeline.routes.clone(),
            width,
            truncating: (plans.iter())
                .map(|plan| plan.truncate == OnTruncate::Apply)
                .collect(),
            file: pipeline.file.clone(),
        }
    }

    /// Why a record of `partition` of `topic` may not be written: a partition added, while
    /// the pipeline runs, to a topic whose table applies truncates (checked at start too, by
    /// `check_truncated_topics`).
    fn refuses(&self, topic: &str, partition: i32) -> Option<ConfigError> {
        if partition == 0 || !self.truncating.iter().any(|t| *t) {
            return None;
        }
        let table = self.routes.table_of(topic)?;
        self.truncating[table].then(|| ConfigError {
            file: self.file.clone(),
            key: "sink.truncate".to_string(),
            message: format!(
                "apply needs topics of one partition, and topic {topic} now has partition \
                 {partition} (added while the pipeline ran): a truncate has no key, so a change \
                 read after it from another partition could bring back a row it removed; \
                 nothing of that partition was written"
            ),
        })
    }

    fn convert(
        &self,
        record: &RecordRef<'_>,
        cells: &mut Cells,
    ) -> Result<Converted, ConvertError> {
        let mapper = match self.mappers.as_slice() {
            [only] => only,
            all => {
                let table = self.routes.table_of(record.topic).ok_or_else(|| {
                    ConvertError::of_record(format!(
                        "topic {} is not one the pipeline reads, so it has no table",
                        record.topic
                    ))
                })?;
                &all[table]
            }
        };
        mapper.convert(record, cells)
    }
}

/// Turns a record into a row of `batch`. One that cannot be a row becomes a dead letter
/// with `errors.tolerance: all`, and stops the pipeline otherwise (the error).
fn add_record(
    shared: &Shared,
    mappers: &Mappers,
    m: &BorrowedMessage<'_>,
    batch: &mut Batch,
) -> Result<(), ConvertError> {
    // librdkafka gives the topic as a C string, checked as UTF-8 on every call: once here.
    let topic = m.topic();
    let Some(epoch) = shared.assignment.accept(topic, m.partition(), m.offset()) else {
        return Ok(()); // not ours, or already covered by the stored offset
    };
    let record = RecordRef {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key(),
        value: m.payload(),
    };
    let keeps_records = shared.dead_letters.is_some();
    match mappers.convert(&record, &mut batch.cells) {
        Ok(Converted::Row(op)) => {
            if op == RowOp::Truncate {
                info!(pipeline = %shared.pipeline, topic, partition = m.partition(), offset = m.offset(), "a truncate: the rows older than it are deleted from its table in its batch's transaction");
            }
            let raw = keeps_records.then(|| raw_record(m));
            batch.push(topic, m.partition(), epoch, m.offset(), op, raw);
        }
        Ok(Converted::Nothing(reason)) => {
            debug!(pipeline = %shared.pipeline, topic, partition = m.partition(), offset = m.offset(), reason, "a record that changes no row");
            telemetry::record_ignored(&shared.pipeline, reason);
            batch.push_nothing(topic, m.partition(), epoch, m.offset());
        }
        Err(error) if keeps_records => {
            let dead = DeadLetter {
                tp: TopicPartition {
                    topic: topic.to_string(),
                    partition: m.partition(),
                },
                offset: m.offset(),
                record: raw_record(m),
                error: error.to_string(),
            };
            batch.push_dead_letter(epoch, dead);
        }
        Err(error) => return Err(error),
    }
    Ok(())
}

/// The record as it came, for the dead-letter table.
fn raw_record(m: &BorrowedMessage<'_>) -> RawRecord {
    RawRecord {
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .and_then(|h| headers_to_json(h.iter().map(|h| (h.key, h.value)))),
    }
}

/// Errors from the consumer: librdkafka retries transport problems itself, so only those
/// that mean data would be skipped or the client is unusable stop the pipeline. A fetch out
/// of range is handled as `auto.offset.reset` says ([`recover_out_of_range`]).
fn consumer_error(shared: &Shared, e: KafkaError) -> Result<(), PipelineError> {
    let pipeline = &shared.pipeline;
    match &e {
        KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset) => {
            let found = tokio::task::block_in_place(|| recover_out_of_range(&shared.consumer))
                .map_err(|f| shared.fail(f))?;
            if found == 0 {
                warn!(pipeline = %pipeline, error = %e, "a fetch was out of range, but no partition this instance reads stands outside what Kafka has now");
            }
            Ok(())
        }
        KafkaError::MessageConsumptionFatal(_) => Err(shared.fail(Failure::Kafka {
            context: "consuming",
            source: e,
        })),
        _ => {
            warn!(pipeline = %pipeline, error = %e, "consumer error; librdkafka retries");
            Ok(())
        }
    }
}

/// How often a seek is tried before the pipeline stops, and how long each may take.
const SEEK_ATTEMPTS: u32 = 10;
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies what the writer (a fenced batch) or a skip asked of the consumer, each in its
/// epoch: the seek, then the offsets to cover. A seek of an epoch that has ended (the
/// partition was revoked or reset again) is dropped.
async fn apply_seeks(shared: &Shared, batch: &mut Batch) -> Result<(), PipelineError> {
    for seek in shared.assignment.take_seeks() {
        if let Some(offset) = seek.offset {
            if !seek_until_done(shared, &seek, offset).await? {
                continue;
            }
        }
        if !shared.assignment.seek_owed(&seek) {
            continue;
        }
        shared.assignment.seek_done(&seek);
        if let Some(to) = seek.cover {
            batch.cover(&seek.tp, seek.epoch, to);
        }
        // A partition assigned during a database outage waited paused for this seek.
        if !shared.assignment.paused() {
            shared.resume(std::slice::from_ref(&seek.tp));
        }
    }
    Ok(())
}

/// Seeks, retrying a failure (librdkafka refuses a seek while a partition's fetch is still
/// starting); past [`SEEK_ATTEMPTS`] the pipeline stops, as reading on from the old position
/// would skip or repeat records. False if the seek is no longer owed.
async fn seek_until_done(
    shared: &Shared,
    seek: &Seek,
    offset: Offset,
) -> Result<bool, PipelineError> {
    let tp = &seek.tp;
    for attempt in 1..=SEEK_ATTEMPTS {
        if !shared.assignment.seek_owed(seek) {
            return Ok(false);
        }
        let sought = tokio::task::block_in_place(|| {
            shared
                .consumer
                .seek(&tp.topic, tp.partition, offset, SEEK_TIMEOUT)
        });
        match sought {
            Ok(()) => {
                info!(pipeline = %shared.pipeline, partition = %tp, ?offset, "rewound to the offset stored in the database");
                return Ok(true);
            }
            Err(e) if attempt < SEEK_ATTEMPTS => {
                warn!(pipeline = %shared.pipeline, partition = %tp, ?offset, attempt, error = %e, "seek failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(shared.fail(Failure::Position {
                    kind: ErrorKind::of_kafka(&e),
                    reason: format!(
                        "cannot seek {tp} to {offset:?} after {SEEK_ATTEMPTS} attempts: {e}"
                    ),
                }))
            }
        }
    }
    Ok(false)
}

/// The writer side: hands each batch's partitions to their writer lane (`sink.writers` of
/// them; a partition always to the same one), and checks the stored offsets when no batch has
/// come for a while. Each lane commits its batches one after another, in its own transaction,
/// so one lane writes while another commits, and a partition's batches commit in order.
async fn write_loop(
    shared: Arc<Shared>,
    writer: Arc<Writer>,
    lanes: usize,
    mut inbox: mpsc::Receiver<Batch>,
) -> Result<(), PipelineError> {
    let mut senders = Vec::with_capacity(lanes);
    let mut running = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let (sender, lane_inbox) = mpsc::channel::<Batch>(1);
        running.spawn(lane_loop(shared.clone(), writer.clone(), lane, lane_inbox));
        senders.push(sender);
    }
    let stopped = tokio::select! {
        // A lane ends early only on an error: stop taking batches.
        Some(ended) = running.join_next() => Some(ended),
        () = dispatch(&shared, &senders, &mut inbox) => None,
    };
    // The lanes write what they hold and end.
    drop(senders);
    let mut outcome = Ok(());
    let mut first = stopped;
    loop {
        let ended = match first.take() {
            Some(ended) => ended,
            None => match running.join_next().await {
                Some(ended) => ended,
                None => break,
            },
        };
        let ended = ended.unwrap_or_else(|e| {
            Err(shared.fail(Failure::Internal(format!("a writer lane failed: {e}"))))
        });
        if outcome.is_ok() {
            outcome = ended;
        }
    }
    outcome
}

/// Passes each batch from the consumer loop to the lanes until the consumer loop stops.
async fn dispatch(
    shared: &Shared,
    lanes: &[mpsc::Sender<Batch>],
    inbox: &mut mpsc::Receiver<Batch>,
) {
    loop {
        match tokio::time::timeout(WATCH_WHEN_IDLE, inbox.recv()).await {
            Ok(Some(batch)) => {
                let parts = batch.split(lanes.len(), |tp| lane_of(tp, lanes.len()));
                for (lane, part) in lanes.iter().zip(parts) {
                    if !part.is_empty() && lane.send(part).await.is_err() {
                        return; // the lane stopped on an error, which `write_loop` reports
                    }
                }
            }
            Ok(None) => return,
            Err(_idle) => watch_offsets(shared).await,
        }
    }
}

/// The writer lane of a partition: always the same one, so that one partition's batches
/// never commit concurrently and commit in order.
fn lane_of(tp: &TopicPartition, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut topic = std::hash::DefaultHasher::new();
    tp.topic.hash(&mut topic);
    (topic.finish() as usize).wrapping_add(tp.partition.unsigned_abs() as usize) % lanes
}

/// One writer lane: commits the batches of its partitions, one after another.
async fn lane_loop(
    shared: Arc<Shared>,
    writer: Arc<Writer>,
    lane: usize,
    mut inbox: mpsc::Receiver<Batch>,
) -> Result<(), PipelineError> {
    loop {
        let next = match inbox.try_recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                let _waiting = shared.writer.wait();
                inbox.recv().await
            }
        };
        match next {
            Some(batch) => commit_batch(&shared, &writer, lane, batch).await?,
            None => return Ok(()),
        }
    }
}

/// How long the writer may be idle before it checks that the stored offsets are still those
/// it last saw: a caught-up instance notices a forced rewind (`offsets set|reset --force`)
/// or a deleted offsets row within this, not only when its next batch is fenced.
const WATCH_WHEN_IDLE: Duration = Duration::from_secs(5);

/// The writer is idle: a partition whose stored offset is no longer what this instance last
/// read or committed restarts from there, as after a fenced batch. One attempt: if the
/// database does not answer, the next batch meets that fault and is retried as usual.
async fn watch_offsets(shared: &Shared) {
    // No lane is between deciding a batch's offsets and its commit meanwhile.
    let _writing = shared.assignment.writing.write().await;
    let owned = shared.assignment.all_owned();
    if owned.is_empty() {
        return;
    }
    let partitions: Vec<TopicPartition> = owned.iter().map(|(tp, _)| tp.clone()).collect();
    let stored = match shared.store.load(&partitions).await {
        Ok(stored) => stored,
        Err(e) => {
            debug!(pipeline = %shared.pipeline, error = %e, "checking the stored offsets failed");
            return;
        }
    };
    let mut moved = Vec::new();
    for (tp, o) in owned {
        let now = stored.get(&tp).copied();
        if now != o.db_next {
            moved.push(restart_from_database(shared, &tp, o.epoch, o.db_next, now));
        }
    }
    if !moved.is_empty() {
        warn!(
            pipeline = %shared.pipeline,
            partitions = %moved.join(", "),
            "the stored offsets of these partitions changed while this instance was idle (moved \
             by hand, or written by another instance); they restart from the offsets in the database"
        );
    }
}

/// Commits one batch: its rows and the offsets that cover them in one transaction
/// ([`Writer::write`], whose compare-and-set on the previous offsets fences a zombie).
/// Partitions whose stored offset moved under us are dropped from it and restart from the
/// database, and the rest is written again.
async fn commit_batch(
    shared: &Shared,
    writer: &Writer,
    lane: usize,
    mut batch: Batch,
) -> Result<(), PipelineError> {
    // A revocation waits for this guard, so it hands partitions on only after their write
    // has ended, and no write decides on ownership while a revocation is under way.
    let _writing = shared.assignment.writing.read().await;
    loop {
        let moves = owned_moves(shared, &mut batch);
        if moves.is_empty() {
            return Ok(());
        }
        let offsets: Vec<OffsetMove> = moves.iter().map(|m| m.offset.clone()).collect();
        let started = std::time::Instant::now();
        match write_retrying(shared, writer, lane, &batch, &offsets).await? {
            WriteOutcome::Committed { rows, rejected } => {
                on_committed(shared, &batch, &moves, &offsets, &rows, &rejected, started);
                return Ok(());
            }
            WriteOutcome::Rejected(refused) => {
                return Err(shared.fail(Failure::RejectedRow {
                    tp: refused.tp,
                    offset: refused.offset,
                    sqlstate: refused.sqlstate,
                    error: refused.error,
                }));
            }
            WriteOutcome::Conflict(lost) => on_fenced(shared, &moves, &lost, started).await?,
        }
    }
}

/// An offset the batch moves, with the epoch of ownership its records were read in.
struct OwnedMove {
    offset: OffsetMove,
    epoch: u64,
}

/// Keeps only what this instance still owns, read in the epoch it still owns it in, and
/// returns the offset moves that cover it. One look per span decides both the rows written
/// and the offsets moved, so rows never go in without the offsets that cover them.
fn owned_moves(shared: &Shared, batch: &mut Batch) -> Vec<OwnedMove> {
    let assignment = &shared.assignment;
    let owned: Vec<Option<Owned>> = batch
        .spans
        .iter()
        .map(|s| assignment.owned(&s.tp).filter(|o| o.epoch == s.epoch))
        .collect();
    *batch = std::mem::replace(batch, Batch::new(0))
        .retain_spans(&owned.iter().map(Option::is_some).collect::<Vec<_>>());
    batch
        .spans
        .iter()
        .zip(owned.iter().flatten())
        .map(|(s, o)| OwnedMove {
            offset: OffsetMove {
                tp: s.tp.clone(),
                expected: o.db_next,
                next: s.next,
            },
            epoch: s.epoch,
        })
        .collect()
}

/// Writes the batch with its offset moves, trying a transaction that failed on a transient
/// fault again whole. If its commit went through unseen, the retry meets the offsets it
/// moved and is fenced: the partitions then restart from there, and nothing is written twice.
async fn write_retrying(
    shared: &Shared,
    writer: &Writer,
    lane: usize,
    batch: &Batch,
    offsets: &[OffsetMove],
) -> Result<WriteOutcome, PipelineError> {
    let written = retry(
        &shared.pipeline,
        "writing a batch",
        shared.retry_for,
        || async move {
            let attempt = writer.write(batch, offsets).await;
            if let Err(e) = &attempt {
                write_failed(shared, writer, lane, e).await;
            }
            attempt
        },
    )
    .await;
    shared.status.write_done(lane);
    written.map_err(shared.db("writing a batch"))
}

/// The batch committed: its partitions are now owned from their new offsets, which Kafka
/// learns too (for lag tools; the database's are the ones that count).
fn on_committed(
    shared: &Shared,
    batch: &Batch,
    moves: &[OwnedMove],
    offsets: &[OffsetMove],
    rows: &RowCounts,
    rejected: &[RefusedRecord],
    started: std::time::Instant,
) {
    for m in moves {
        shared
            .assignment
            .committed(&m.offset.tp, m.epoch, m.offset.next);
    }
    let seconds = started.elapsed().as_secs_f64();
    telemetry::batch_committed(&shared.pipeline, batch.records(), rows, seconds);
    if rows.dead_lettered > 0 {
        report_dead_letters(shared, batch, rejected);
    }
    for (tp, offset) in &rows.absent {
        warn!(pipeline = %shared.pipeline, topic = %tp.topic, partition = tp.partition, offset, "a change whose row has values its source did not send (Debezium's placeholder for an unchanged TOASTed value), for a row the table does not have: nothing to keep those values from, so it is not written; an older change sent again after the row's delete (a Debezium restart, a replay) comes to this, and the delete that follows it removes the row anyway");
        telemetry::record_ignored(&shared.pipeline, "unavailable_values_no_row");
    }
    debug!(
        pipeline = %shared.pipeline,
        records = batch.records(),
        written = rows.written,
        updated = rows.updated,
        deleted = rows.deleted,
        dead_lettered = rows.dead_lettered,
        ms = (seconds * 1000.0) as u64,
        "batch committed"
    );
    commit_to_kafka(shared, offsets);
}

/// The compare-and-set found `lost` partitions' stored offsets moved (another instance took
/// them over, they were set by hand, or the acknowledgement of this instance's own commit was
/// lost): the batch was rolled back, and they restart from the offsets in the database.
async fn on_fenced(
    shared: &Shared,
    moves: &[OwnedMove],
    lost: &[TopicPartition],
    started: std::time::Instant,
) -> Result<(), PipelineError> {
    telemetry::batch_fenced(&shared.pipeline, started.elapsed().as_secs_f64());
    let stored = retry(
        &shared.pipeline,
        "re-reading offsets",
        shared.retry_for,
        || shared.store.load(lost),
    )
    .await
    .map_err(shared.db("re-reading offsets"))?;
    let mut fenced = Vec::with_capacity(lost.len());
    for tp in lost {
        let Some(m) = moves.iter().find(|m| &m.offset.tp == tp) else {
            continue;
        };
        let now = stored.get(tp).copied();
        fenced.push(restart_from_database(
            shared,
            tp,
            m.epoch,
            m.offset.expected,
            now,
        ));
    }
    warn!(
        pipeline = %shared.pipeline,
        partitions = %fenced.join(", "),
        "fenced: the stored offsets of these partitions changed since this instance last \
         read or wrote them (another instance took them over, they were set by hand, or the \
         acknowledgement of this instance's own commit was lost); \
         the batch was rolled back and they restart from the offsets in the database"
    );
    Ok(())
}

/// A batch's attempt failed and is retried (or the retries end): readiness learns of it,
/// and a lock wait that timed out says who holds the locks. Until that session ends (or the
/// server ends it, see [`crate::db::SessionLimits`]) every attempt waits on it again.
async fn write_failed(shared: &Shared, writer: &Writer, lane: usize, error: &sqlx::Error) {
    shared.status.write_failed(lane, error);
    if !is_lock_timeout(error) {
        return;
    }
    let holders = match writer.lock_holders().await {
        Ok(holders) if holders.is_empty() => "none seen now".to_string(),
        Ok(holders) => holders.join("; "),
        Err(e) if is_access_denied(&e) => "cannot tell: the database user may not see other \
            sessions (MySQL's PROCESS privilege)"
            .to_string(),
        Err(e) => format!("cannot tell: {e}"),
    };
    warn!(
        pipeline = %shared.pipeline,
        holders = %holders,
        "a lock wait timed out writing a batch: another session holds rows or offsets this \
         batch writes (a stopped or frozen instance, or a transaction left open); the batch is \
         retried, and a session of idemsink idle in its transaction is ended by the database \
         after sink.idle_in_transaction_timeout_ms"
    );
}

/// Dead letters are never silent: a WARN line names each (the first few of a batch) with
/// its coordinates and why.
fn report_dead_letters(shared: &Shared, batch: &Batch, rejected: &[RefusedRecord]) {
    const NAMED_PER_BATCH: usize = 10;
    let table = shared
        .dead_letters
        .as_ref()
        .map_or_else(String::new, |t| t.name().to_string());
    let converted = batch
        .dead_letters()
        .map(|d| (&d.tp, d.offset, d.error.as_str()));
    let refused = rejected.iter().map(|r| (&r.tp, r.offset, r.error.as_str()));
    let all: Vec<_> = converted.chain(refused).collect();
    for (tp, offset, error) in all.iter().take(NAMED_PER_BATCH) {
        warn!(pipeline = %shared.pipeline, record = %format!("{tp}@{offset}"), %error, %table, "record dead-lettered");
    }
    if all.len() > NAMED_PER_BATCH {
        warn!(pipeline = %shared.pipeline, more = all.len() - NAMED_PER_BATCH, %table, "more records of this batch dead-lettered");
    }
}

/// A partition whose stored offset is not the one this instance expected starts over from
/// the offset the database holds now, in a new epoch (the consumer loop seeks there). Returns
/// how the move reads in the WARN line that reports it.
fn restart_from_database(
    shared: &Shared,
    tp: &TopicPartition,
    epoch: u64,
    expected: Option<i64>,
    now: Option<i64>,
) -> String {
    shared.assignment.reset(tp, epoch, now, shared.start_from);
    format!(
        "{tp} (expected {}, found {})",
        offset_text(expected),
        offset_text(now)
    )
}

fn offset_text(offset: Option<i64>) -> String {
    offset.map_or_else(|| "none".to_string(), |n| n.to_string())
}

/// Tells Kafka the same offsets, so standard lag tools see progress. Best effort: the
/// database stays the only place a partition resumes from.
fn commit_to_kafka(shared: &Shared, moves: &[OffsetMove]) {
    let mut tpl = TopicPartitionList::new();
    for m in moves {
        if tpl
            .add_partition_offset(&m.tp.topic, m.tp.partition, Offset::Offset(m.next))
            .is_err()
        {
            return;
        }
    }
    if let Err(e) = shared.consumer.commit(&tpl, CommitMode::Async) {
        debug!(pipeline = %shared.pipeline, error = %e, "committing offsets to Kafka failed (informational only)");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_partition_always_has_the_same_lane_and_a_topic_spreads_over_all() {
        let tp = |topic: &str, partition| TopicPartition {
            topic: topic.into(),
            partition,
        };
        for lanes in 1..=4 {
            let of = |t: &TopicPartition| lane_of(t, lanes);
            assert!((0..64).all(|p| of(&tp("orders", p)) < lanes));
            assert!((0..64).all(|p| of(&tp("orders", p)) == of(&tp("orders", p))));
            let used: HashSet<usize> = (0..lanes as i32).map(|p| of(&tp("orders", p))).collect();
            assert_eq!(
                used.len(),
                lanes,
                "{lanes} partitions of a topic use every lane"
            );
        }
        assert_eq!(lane_of(&tp("a", 7), 1), 0);
    }
}
