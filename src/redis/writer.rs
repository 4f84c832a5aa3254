//! A worker's outcome writer: the outcomes of jobs that finish while a
//! write is on its way are written together, in one script call, each still
//! atomic (output entry, done marker, acknowledgement).

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::error::RedisQueueError;
use super::job::{Keys, Priority, GROUP};
use super::scripts;

/// Most outcomes written by one script call.
const MAX_BATCH: usize = 64;

/// One outcome to record.
pub(crate) struct Outcome {
    pub(crate) class: Priority,
    /// The job's results hash ([`result_bucket`](super::job::result_bucket)).
    pub(crate) bucket: u64,
    pub(crate) entry: String,
    pub(crate) job: String,
    pub(crate) kind: Kind,
}

/// What an outcome writes.
pub(crate) enum Kind {
    /// A completed job: the script builds the output entry and the stored
    /// outcome from these.
    Completed { deliveries: u32, answer: Vec<u8> },
    /// Any other outcome, to the output stream or (`dead`) the dead-letter
    /// stream: the stored outcome and the entry's fields and values.
    Other {
        dead: bool,
        stored: Vec<u8>,
        fields: Vec<Vec<u8>>,
    },
}

type Reply = oneshot::Sender<Result<bool, RedisQueueError>>;

/// The sending side, held by the worker's jobs.
#[derive(Debug, Clone)]
pub(crate) struct Writer(mpsc::Sender<(Outcome, Reply)>);

impl Writer {
    /// Starts the writer task; it ends when every `Writer` clone is gone.
    /// Returns the task's handle so a crash (abort) can stop it too.
    pub(crate) fn spawn(
        conn: ConnectionManager,
        keys: &Keys,
        result_ttl_ms: u64,
        max_len: u64,
        capacity: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let fixed = [
            keys.stream(Priority::High),
            keys.stream(Priority::Normal),
            keys.stream(Priority::Low),
            keys.output(),
            keys.dead(),
        ];
        let results = keys.clone();
        let task = tokio::spawn(run(conn, rx, fixed, results, result_ttl_ms, max_len));
        (Self(tx), task)
    }

    /// Records one outcome; `Ok(false)` when the job already had one.
    ///
    /// `handed_off` runs once the outcome is in the writer's queue (bounded
    /// by the capacity given to [`spawn`](Self::spawn)), before the write
    /// itself: the worker frees the job's slot there, so the next take
    /// overlaps with this write.
    pub(crate) async fn write(
        &self,
        outcome: Outcome,
        handed_off: impl FnOnce(),
    ) -> Result<bool, RedisQueueError> {
        let (tx, rx) = oneshot::channel();
        let gone = || RedisQueueError::Redis {
            source: redis::RedisError::from((redis::ErrorKind::Client, "worker stopped")),
        };
        self.0.send((outcome, tx)).await.map_err(|_| gone())?;
        handed_off();
        rx.await.map_err(|_| gone())?
    }
}

async fn run(
    mut conn: ConnectionManager,
    mut rx: mpsc::Receiver<(Outcome, Reply)>,
    fixed: [String; 5],
    keys: Keys,
    ttl_ms: u64,
    max_len: u64,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The results hashes of one batch: nearly always one (the jobs of one
    // minute of enqueues), so a list.
    let mut buckets: Vec<u64> = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut inv = scripts::FINISH_MANY.prepare_invoke();
        for k in &fixed {
            inv.key(k);
        }
        inv.arg(GROUP).arg(ttl_ms).arg(max_len);
        buckets.clear();
        for (o, _) in &batch {
            let hash = match buckets.iter().position(|&b| b == o.bucket) {
                Some(i) => i + 1,
                None => {
                    buckets.push(o.bucket);
                    inv.key(keys.results(o.bucket));
                    buckets.len()
                }
            };
            inv.arg(o.class.index() + 1).arg(hash);
            match &o.kind {
                Kind::Completed { deliveries, answer } => {
                    inv.arg("o")
                        .arg(&o.entry)
                        .arg(&o.job)
                        .arg(deliveries)
                        .arg(answer.as_slice());
                }
                Kind::Other {
                    dead,
                    stored,
                    fields,
                } => {
                    inv.arg(if *dead { "d" } else { "x" })
                        .arg(&o.entry)
                        .arg(&o.job)
                        .arg(stored.as_slice())
                        .arg(fields.len());
                    for f in fields {
                        inv.arg(f.as_slice());
                    }
                }
            }
        }
        let written: Result<Vec<i64>, redis::RedisError> = inv.invoke_async(&mut conn).await;
        match written {
            Ok(w) if w.len() == batch.len() => {
                for ((_, reply), w) in batch.drain(..).zip(w) {
                    let _ = reply.send(Ok(w == 1));
                }
            }
            Ok(_) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(RedisQueueError::malformed("finish", "reply length")));
                }
            }
            Err(e) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(e.clone().into()));
                }
            }
        }
    }
}
