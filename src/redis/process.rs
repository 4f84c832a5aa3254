//! One job's life in a worker: check, run, record the outcome.

use std::time::{Duration, SystemTime};

use futures::future::poll_fn;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tower_service::Service;

use super::config::ms;
use super::error::RedisQueueError;
use super::event::WorkerEvent;
use super::job::{result_bucket, unix_ms, Delivery, GROUP};
use super::scripts;
use super::worker::Ctx;
use super::writer::{Kind, Outcome, Retrying};
use crate::error::BoxError;

/// Whether a failed job is worth another delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// Deliver again after a delay, until the worker's `max_deliveries`.
    Transient,
    /// Dead letters at once.
    Permanent,
}

/// What to write for one delivery.
enum Verdict {
    Ok(Vec<u8>),
    Expired,
    Dead(String),
    Retry(String),
    Release,
}

/// The longest error text stored with a job.
const MAX_ERROR_LEN: usize = 1024;

fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    if s.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Runs one job and records its outcome. `slot` is the job's place among
/// the worker's jobs in flight; it is freed once the outcome is queued for
/// writing (the write queue is bounded too), so the worker can take the
/// next jobs while the outcomes are on their way.
pub(crate) async fn process<S, T>(
    ctx: &Ctx,
    job: Delivery,
    service: S,
    release: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) where
    T: DeserializeOwned,
    S: Service<T>,
    S::Response: Serialize,
    S::Error: Into<BoxError>,
{
    let verdict = decide(ctx, &job, service, release).await;
    record(ctx, job, verdict, slot).await;
}

async fn decide<S, T>(
    ctx: &Ctx,
    job: &Delivery,
    mut service: S,
    mut release: watch::Receiver<bool>,
) -> Verdict
where
    T: DeserializeOwned,
    S: Service<T>,
    S::Response: Serialize,
    S::Error: Into<BoxError>,
{
    if let Some(why) = &job.malformed {
        return Verdict::Dead(format!("malformed entry: {why}"));
    }
    if job.payload.len() > ctx.queue.max_payload_bytes {
        return Verdict::Dead(format!(
            "payload of {} bytes exceeds the limit of {} bytes",
            job.payload.len(),
            ctx.queue.max_payload_bytes
        ));
    }
    if job.deliveries > ctx.config.max_deliveries {
        let last = if job.last_error.is_empty() {
            "no outcome within the visibility timeout (worker crashed or hung)"
        } else {
            &job.last_error
        };
        return Verdict::Dead(format!(
            "delivered {} times, more than max_deliveries; last error: {last}",
            job.deliveries
        ));
    }
    // The clock is read only for a job with a deadline.
    let left = match job.deadline_ms.map(|d| (d, unix_ms(SystemTime::now()))) {
        Some((d, now)) if d <= now => return Verdict::Expired,
        Some((d, now)) => Some(Duration::from_millis(d - now)),
        None => None,
    };
    let request: T = match serde_json::from_slice(&job.payload) {
        Ok(r) => r,
        Err(e) => return Verdict::Dead(format!("job does not deserialize: {e}")),
    };
    let limit = left.map_or(ctx.config.job_timeout, |l| l.min(ctx.config.job_timeout));
    let run = async {
        poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(request).await
    };
    let answer = tokio::select! {
        r = tokio::time::timeout(limit, run) => r,
        _ = release.wait_for(|r| *r) => return Verdict::Release,
    };
    match answer {
        Ok(Ok(resp)) => match serde_json::to_vec(&resp) {
            Ok(json) => Verdict::Ok(json),
            Err(e) => Verdict::Dead(format!("answer does not serialize: {e}")),
        },
        Ok(Err(e)) => {
            let e: BoxError = e.into();
            let text = error_text(&*e);
            match (ctx.classify)(&e) {
                Failure::Permanent => Verdict::Dead(text),
                Failure::Transient if job.deliveries >= ctx.config.max_deliveries => Verdict::Dead(
                    format!("delivered {} times; last error: {text}", job.deliveries),
                ),
                Failure::Transient => Verdict::Retry(text),
            }
        }
        Err(_) if left.is_some_and(|l| l <= ctx.config.job_timeout) => Verdict::Expired,
        Err(_) if job.deliveries >= ctx.config.max_deliveries => Verdict::Dead(format!(
            "delivered {} times; last error: job timed out after {limit:?}",
            job.deliveries
        )),
        Err(_) => Verdict::Retry(format!("job timed out after {limit:?}")),
    }
}

/// Records the verdict. An outcome (completed, expired, dead) is handed to
/// the worker's writer, which writes it with others and reports it; the
/// job's slot is free once it is queued. A re-queue is written here,
/// retried while Redis is unreachable for up to the visibility timeout
/// (after which another worker reclaims the job anyway).
async fn record(ctx: &Ctx, job: Delivery, verdict: Verdict, slot: OwnedSemaphorePermit) {
    let kind = match verdict {
        Verdict::Ok(json) => Kind::Completed(json),
        Verdict::Expired => Kind::Other {
            error: None,
            stored: b"!expired".to_vec(),
            fields: entry_fields(&job, [&b"status"[..], b"expired"]),
        },
        Verdict::Dead(e) => Kind::Other {
            stored: format!("!dead:{}:{e}", job.deliveries).into_bytes(),
            fields: entry_fields(
                &job,
                [
                    &b"error"[..],
                    e.as_bytes(),
                    b"priority",
                    job.class.as_str().as_bytes(),
                    b"entry",
                    job.entry.as_bytes(),
                    b"payload",
                    &job.payload,
                ],
            ),
            error: Some(e),
        },
        Verdict::Retry(e) => return requeue_until_written(ctx, &job, Some(e)).await,
        Verdict::Release => return requeue_until_written(ctx, &job, None).await,
    };
    let outcome = Outcome {
        class: job.class,
        bucket: result_bucket(&job.job),
        entry: job.entry,
        job: job.job,
        deliveries: job.deliveries,
        named: job.named,
        kind,
        takes: ctx.takes.count(),
    };
    ctx.writer.write(outcome).await;
    drop(slot);
}

/// Re-queues the job after a transient failure (`error`), or releases it
/// (`None`: a job released at shutdown was not really tried, so its
/// delivery is not counted), retrying while Redis is unreachable.
async fn requeue_until_written(ctx: &Ctx, job: &Delivery, error: Option<String>) {
    let mut retry = Retrying::new(ctx.config.visibility_timeout);
    let delay = ctx.config.requeue_delay(job.deliveries);
    loop {
        let r = match &error {
            Some(e) => requeue(ctx, job, job.deliveries, delay, e, true).await,
            None => {
                let prior = job.deliveries.saturating_sub(1);
                requeue(ctx, job, prior, Duration::ZERO, &job.last_error, false).await
            }
        };
        match r {
            Ok(written) => {
                let j = job.job.as_str();
                ctx.events.emit(match &error {
                    _ if !written => WorkerEvent::Duplicate { job: j },
                    Some(error) => WorkerEvent::Retried {
                        job: j,
                        deliveries: job.deliveries,
                        delay,
                        error,
                    },
                    None => WorkerEvent::Released { job: j },
                });
                return;
            }
            Err(e) => {
                if let RedisQueueError::Redis { source } = &e {
                    ctx.events.emit(WorkerEvent::RedisError { error: source });
                }
                if !retry.wait().await {
                    tracing::warn!(job = %job.job, error = %e, "redis queue: outcome not recorded; the job will be reclaimed");
                    return;
                }
            }
        }
    }
}

/// An output or dead-letter entry's fields: `job`, `deliveries`, then
/// `rest` (field, value, ...).
fn entry_fields<const N: usize>(job: &Delivery, rest: [&[u8]; N]) -> Vec<Vec<u8>> {
    let deliveries = job.deliveries.to_string();
    [
        b"job",
        job.job.as_bytes(),
        b"deliveries",
        deliveries.as_bytes(),
    ]
    .into_iter()
    .chain(rest)
    .map(<[u8]>::to_vec)
    .collect()
}

/// Moves the job to the delayed set, to come back after `delay`.
async fn requeue(
    ctx: &Ctx,
    job: &Delivery,
    prior: u32,
    delay: Duration,
    error: &str,
    count_retry: bool,
) -> Result<bool, RedisQueueError> {
    // A job is re-queued only after it deserialized, so its payload is the
    // UTF-8 JSON a producer wrote.
    let mut fields = vec![
        "job".to_owned(),
        job.job.clone(),
        "payload".to_owned(),
        String::from_utf8_lossy(&job.payload).into_owned(),
        "deadline".to_owned(),
        job.deadline_ms.unwrap_or(0).to_string(),
        "n".to_owned(),
        prior.to_string(),
    ];
    if !error.is_empty() {
        fields.extend(["err".to_owned(), error.to_owned()]);
    }
    let member = serde_json::json!([job.class.index() + 1, fields]).to_string();
    let mut inv = scripts::REQUEUE.prepare_invoke();
    inv.key(ctx.keys.stream(job.class))
        .key(ctx.keys.delayed())
        .key(ctx.keys.results(result_bucket(&job.job)))
        .key(ctx.keys.retried());
    inv.arg(GROUP)
        .arg(&job.entry)
        .arg(ms(delay))
        .arg(member)
        .arg(if count_retry { "1" } else { "0" })
        .arg(&job.job)
        .arg(ms(ctx.queue.result_ttl));
    let n: i64 = inv.invoke_async(&mut ctx.conn.clone()).await?;
    ctx.requeued
        .store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(n == 1)
}
