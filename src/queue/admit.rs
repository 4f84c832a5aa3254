//! Admission, in one place: a permit, a place in the queue, a refusal, or
//! waiting for a place. `poll_ready` runs it, and so does the response
//! future of a `call` that came without `poll_ready`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{sleep_until, Instant, Sleep};

use super::event::QueueEventKind;
use super::state::{Admission, Count, Entry, Grant, Permit, Shared, Slot};
use crate::error::Error;

/// A caller waiting for a place in the queue (wait mode, queue full).
pub(crate) struct Waiting {
    entry: Option<Entry>,
    since: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

/// What admission decided for one request.
pub(crate) enum Admitted {
    Permit(Permit),
    /// A place, and when the wait began if the clock was read for it.
    Slot(Slot, Option<Instant>),
    Refused(Error),
}

/// Admission, shared by `poll_ready` and a future whose `call` came without
/// `poll_ready`: a permit, a place, a refusal, or pending (waiting for a
/// place, bounded by `max_wait`). `stamp`: read the clock for a place
/// (something needs the wait's start: aging, `max_wait`, or events).
pub(crate) fn poll_admit(
    shared: &Shared,
    wait: &mut Option<Box<Waiting>>,
    max_wait: Option<Duration>,
    stamp: bool,
    cx: &mut Context<'_>,
) -> Poll<Admitted> {
    loop {
        if let Some(w) = wait.as_mut() {
            if let Some(entry) = w.entry.as_mut() {
                match entry.poll(cx) {
                    Poll::Ready(grant) => {
                        let since = w.since;
                        *wait = None;
                        return Poll::Ready(match grant {
                            Grant::Permit(p) => Admitted::Permit(p),
                            Grant::Slot(s) => Admitted::Slot(s, Some(since)),
                            Grant::Closed => refuse_closed(shared),
                        });
                    }
                    Poll::Pending => {
                        if let Some(timer) = w.timer.as_mut() {
                            if timer.as_mut().poll(cx).is_ready() {
                                let waited = Instant::now().saturating_duration_since(w.since);
                                if let Some(entry) = w.entry.take() {
                                    entry.withdraw();
                                }
                                *wait = None;
                                shared.counters.add(Count::TimedOut);
                                tracing::debug!(
                                    waited_ms = waited.as_millis() as u64,
                                    "queue wait exceeded waiting for a place"
                                );
                                shared.emit(QueueEventKind::TimedOut, None, 0, Some(waited));
                                return Poll::Ready(Admitted::Refused(Error::QueueTimeout {
                                    waited,
                                }));
                            }
                        }
                        return Poll::Pending;
                    }
                }
            }
        }
        if let Some(p) = shared.try_acquire() {
            return Poll::Ready(Admitted::Permit(p));
        }
        let admission = match shared.try_place() {
            Some(Ok(())) => Admission::Slot(Slot::new(shared.link())),
            Some(Err(depth)) => Admission::Full { depth },
            None => shared.admit_slow(cx.waker()),
        };
        match admission {
            Admission::Permit(p) => return Poll::Ready(Admitted::Permit(p)),
            Admission::Slot(s) => return Poll::Ready(Admitted::Slot(s, stamp.then(Instant::now))),
            Admission::Full { depth } => {
                shared.counters.add(Count::Rejected);
                tracing::debug!(depth, "queue full, request rejected");
                shared.emit(QueueEventKind::Rejected, None, depth, None);
                return Poll::Ready(Admitted::Refused(Error::QueueFull { depth }));
            }
            Admission::Closed => return Poll::Ready(refuse_closed(shared)),
            Admission::Waiting(entry) => {
                let since = entry.since().unwrap_or_else(Instant::now);
                let timer = max_wait
                    .and_then(|d| since.checked_add(d))
                    .map(|at| Box::pin(sleep_until(at)));
                *wait = Some(Box::new(Waiting {
                    entry: Some(entry),
                    since,
                    timer,
                }));
                // Loop once more: registers the timer (and sees a grant that
                // raced with the insertion).
            }
        }
    }
}

fn refuse_closed(shared: &Shared) -> Admitted {
    shared.counters.add(Count::ShutOut);
    shared.emit(QueueEventKind::Shutdown, None, 0, None);
    Admitted::Refused(Error::Shutdown)
}
