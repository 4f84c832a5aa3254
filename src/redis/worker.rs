//! Workers: take jobs through the consumer group and run them through a
//! tower `Service`, a bounded number at a time.

use std::fmt;
use std::future::{poll_fn, Future};
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tower_service::Service;

use super::config::{ms, WorkerConfig};
use super::error::RedisQueueError;
use super::event::{Events, Hook, WorkerEvent};
use super::job::Keys;
use super::process::{process, Failure};
use super::producer::{connect, ensure_groups, JobQueue};
use super::take::{wait_for_new, Taker};
use super::writer::{Takes, Writer, WriterConfig};
use crate::error::BoxError;

/// Decides whether a service error is worth another delivery.
pub(crate) type Classifier = Arc<dyn Fn(&BoxError) -> Failure + Send + Sync>;

/// The default classification: the crate's own [`Error`](crate::Error)
/// variants `Permanent` and `BadRequest` are permanent (retrying cannot
/// help: dead letters at once); every other error is transient (the
/// pipeline's own retries are spent, the job is delivered again later).
pub fn default_classify(err: &BoxError) -> Failure {
    match err.downcast_ref::<crate::Error>() {
        Some(crate::Error::Permanent { .. } | crate::Error::BadRequest { .. }) => {
            Failure::Permanent
        }
        _ => Failure::Transient,
    }
}

/// A worker about to start: a queue, a service, settings, and hooks.
///
/// `T` is the job type (what producers enqueued), the service's request.
pub struct Worker<S, T> {
    queue: JobQueue,
    service: S,
    config: WorkerConfig,
    hook: Option<Hook>,
    classify: Classifier,
    _job: PhantomData<fn(T)>,
}

impl<S, T> fmt::Debug for Worker<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S, T> Worker<S, T>
where
    T: DeserializeOwned + Send + 'static,
    S: Service<T> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Serialize + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    /// A worker for `queue` that runs each job through a clone of `service`.
    pub fn new(queue: &JobQueue, service: S, config: WorkerConfig) -> Self {
        Self {
            queue: queue.clone(),
            service,
            config,
            hook: None,
            classify: Arc::new(default_classify),
            _job: PhantomData,
        }
    }

    /// Calls `hook` for every [`WorkerEvent`] (synchronously; keep it short).
    pub fn on_event(mut self, hook: impl Fn(&WorkerEvent<'_>) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Replaces [`default_classify`].
    pub fn classify(mut self, f: impl Fn(&BoxError) -> Failure + Send + Sync + 'static) -> Self {
        self.classify = Arc::new(f);
        self
    }

    /// Connects the worker's waiting connection and starts it on the current
    /// tokio runtime.
    ///
    /// # Errors
    ///
    /// [`RedisQueueError::Redis`] when Redis cannot be reached.
    pub async fn spawn(self) -> Result<WorkerHandle, RedisQueueError> {
        let qc = &self.queue.config;
        // Blocking reads get their own connection: a blocked command would
        // hold up every other command on a shared one.
        let block_conn = connect(
            &self.queue.url,
            qc,
            self.config.idle_wait + qc.response_timeout,
        )
        .await?;
        let mut conn = self.queue.conn.clone();
        ensure_groups(&mut conn, &self.queue.keys).await?;
        let consumer = self
            .config
            .consumer
            .clone()
            .unwrap_or_else(|| format!("worker-{:016x}", rand::random::<u64>()));
        // The outcomes get a connection of their own too: a take is not
        // queued behind a batch of outcomes being written (the server runs
        // the finish script while the worker starts the next jobs).
        let write_conn = connect(&self.queue.url, qc, qc.response_timeout).await?;
        let events = Arc::new(Events::new(&self.queue.config.name, self.hook));
        let takes = Arc::new(Takes::default());
        let (writer, writer_task) = Writer::spawn(
            write_conn,
            WriterConfig {
                keys: self.queue.keys.clone(),
                result_ttl_ms: ms(self.queue.config.result_ttl),
                max_len: self.queue.config.output_max_len,
                give_up_after: self.config.visibility_timeout,
                events: events.clone(),
                takes: takes.clone(),
            },
            self.config.max_in_flight,
        );
        let ctx = Arc::new(Ctx {
            writer,
            conn,
            keys: self.queue.keys.clone(),
            queue: self.queue.config.clone(),
            events,
            classify: self.classify,
            consumer: consumer.clone(),
            config: self.config,
            requeued: AtomicBool::new(false),
            takes,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (release_tx, release_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            ctx,
            AbortOnDrop(writer_task),
            self.service,
            block_conn,
            stop_rx,
            release_tx,
            release_rx,
        ));
        Ok(WorkerHandle {
            consumer,
            stop: stop_tx,
            task,
        })
    }
}

/// A running worker. Dropping the handle starts the same graceful shutdown
/// as [`shutdown`](Self::shutdown), without waiting for it; keep the handle
/// for as long as the worker should run.
#[derive(Debug)]
pub struct WorkerHandle {
    consumer: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl WorkerHandle {
    /// The worker's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Graceful shutdown: takes no new jobs, lets in-flight jobs finish
    /// within the worker's `shutdown_grace`, then releases the rest back to
    /// the queue (without counting the delivery), and returns when done.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Stops the worker at once, as a crash would: in-flight jobs are
    /// abandoned and reclaimed by other workers after the visibility
    /// timeout.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Whether the worker has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// What every job task of one worker shares.
pub(crate) struct Ctx {
    pub(crate) writer: Writer,
    pub(crate) conn: ConnectionManager,
    pub(crate) keys: Keys,
    pub(crate) queue: super::config::QueueConfig,
    pub(crate) config: WorkerConfig,
    pub(crate) events: Arc<Events>,
    pub(crate) classify: Classifier,
    pub(crate) consumer: String,
    /// Set when a job of this worker went to the delayed set, so the next
    /// take runs the script (which knows when it is due).
    pub(crate) requeued: AtomicBool,
    /// Counts the takes sent, for the writer (see `writer.rs`).
    pub(crate) takes: Arc<Takes>,
}

/// Stops the outcome writer when the worker's task ends or is aborted.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run<S, T>(
    ctx: Arc<Ctx>,
    mut writer: AbortOnDrop,
    service: S,
    mut block_conn: ConnectionManager,
    mut stop: watch::Receiver<bool>,
    release_tx: watch::Sender<bool>,
    release_rx: watch::Receiver<bool>,
) where
    T: DeserializeOwned + Send + 'static,
    S: Service<T> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Serialize + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(ctx.config.max_in_flight));
    let mut jobs = JoinSet::new();
    let mut taker = Taker::new(ctx.config.idle_wait.min(ctx.config.visibility_timeout / 2));
    let mut backoff = Duration::from_millis(50);
    loop {
        while jobs.try_join_next().is_some() {}
        if *stop.borrow() {
            break;
        }
        // Read only what can start now: one free slot at least, then every
        // other free one.
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        // Jobs that just finished free their slots in a burst: let them,
        // so one take fills several slots instead of one each.
        tokio::task::yield_now().await;
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        // The first poll sends the take; then the writer may send the
        // outcomes handed over before it (see `writer.rs`).
        let mut take = pin!(taker.take(&ctx, permits.len()));
        let first = poll_fn(|cx| Poll::Ready(take.as_mut().poll(cx))).await;
        ctx.takes.sent();
        let taken = match first {
            Poll::Ready(taken) => taken,
            Poll::Pending => take.await,
        };
        match taken {
            Ok(taken) => {
                backoff = Duration::from_millis(50);
                let idle = taken.jobs.is_empty();
                for (job, permit) in taken.jobs.into_iter().zip(permits.drain(..)) {
                    let (ctx, svc, rel) = (ctx.clone(), service.clone(), release_rx.clone());
                    let job =
                        Box::pin(async move { process::<S, T>(&ctx, job, svc, rel, permit).await });
                    if let Some(pending) = first_poll(job).await {
                        jobs.spawn(pending);
                    }
                }
                drop(permits);
                if idle {
                    let mut wait = ctx.config.idle_wait;
                    if let Some(due) = taken.next_due_ms {
                        wait = wait.min(Duration::from_millis(due.saturating_sub(taken.now_ms)));
                    }
                    tokio::select! {
                        r = wait_for_new(&ctx, &mut block_conn, taken.now_ms, wait) => {
                            if let Err(RedisQueueError::Redis { source }) = r {
                                ctx.events.emit(WorkerEvent::RedisError { error: &source });
                                sleep_or_stop(&mut stop, backoff).await;
                            }
                        }
                        _ = stop.changed() => break,
                    }
                }
            }
            Err(e) => {
                drop(permits);
                match &e {
                    RedisQueueError::Redis { source } => {
                        ctx.events.emit(WorkerEvent::RedisError { error: source })
                    }
                    other => tracing::warn!(error = %other, "redis queue: take failed"),
                }
                if sleep_or_stop(&mut stop, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    // Graceful shutdown: let in-flight jobs finish within the grace, then
    // tell the rest to release their jobs, and wait for those writes.
    let grace = tokio::time::sleep(ctx.config.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = jobs.join_next() => if next.is_none() { break },
            _ = &mut grace => {
                let _ = release_tx.send(true);
                while jobs.join_next().await.is_some() {}
                break;
            }
        }
    }
    // Every job has handed its outcome over: with the last `Writer` gone
    // the writer writes what it holds and ends (within the visibility
    // timeout, after which it gives outcomes up).
    let wait = ctx.config.visibility_timeout + Duration::from_secs(1);
    drop(ctx);
    let _ = tokio::time::timeout(wait, &mut writer.0).await;
}

/// Polls a job once, here: a job whose service answers at once (and whose
/// outcome fits in the writer's queue) ends on this poll, with no task of
/// its own (no task to allocate, schedule and wake per job). Returns the
/// job if it is not done, to run as a task. A job that panics is dropped,
/// as a job task that panics is: its entry stays pending and is reclaimed.
async fn first_poll<F: Future<Output = ()>>(mut job: Pin<Box<F>>) -> Option<Pin<Box<F>>> {
    let done = poll_fn(|cx| {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| job.as_mut().poll(cx)));
        Poll::Ready(match r {
            Ok(Poll::Pending) => false,
            Ok(Poll::Ready(())) => true,
            Err(_) => {
                tracing::warn!("redis queue: a job panicked; it will be reclaimed");
                true
            }
        })
    })
    .await;
    (!done).then_some(job)
}

/// Sleeps `d` unless told to stop first; returns whether to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
