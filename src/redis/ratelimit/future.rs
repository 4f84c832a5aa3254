//! The fleet rate limiter's response future, and what an admitted call
//! settles on the shared limit when it ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::event::FleetRateLimitEventKind as Kind;
use super::script::Settle;
use super::Fleet;
use crate::error::Error;
use crate::ratelimit::{Outcome, ReadUsage};

/// The future of [`FleetRateLimit`](super::FleetRateLimit): the shared
/// admission (and any wait), then the inner call, then the settlement of
/// its cost on the shared limit.
///
/// Boxed: the admission is a Redis round trip, next to which one allocation
/// per call is noise.
pub struct ResponseFuture<T> {
    pub(super) inner: Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>,
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, Error>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

/// An admitted call's charge on the shared limit. Dropped before the call
/// was sent (the caller gave up, or the inner service failed to become
/// ready), it gives the charge back in a task of its own.
pub(super) struct Charge<E: Send + Sync + 'static, U: Send + Sync + 'static> {
    fleet: Arc<Fleet<E, U>>,
    slot: i64,
    tokens: u64,
    open: bool,
}

impl<E: Send + Sync + 'static, U: Send + Sync + 'static> Charge<E, U> {
    pub(super) fn new(fleet: Arc<Fleet<E, U>>, slot: i64, tokens: u64) -> Self {
        Self {
            fleet,
            slot,
            tokens,
            open: true,
        }
    }

    /// The call was sent: from now on only [`finish`](Self::finish) settles
    /// it (a caller that drops it in flight gets nothing back: the provider
    /// may have charged it).
    pub(super) fn sent(&mut self) {
        self.open = false;
    }

    fn all_back(&self) -> Settle {
        Settle {
            requests_back: 1,
            tokens_back: i64::try_from(self.tokens).unwrap_or(i64::MAX),
            ..Settle::default()
        }
    }

    /// What the provider charged for a call that ended with `result` (the
    /// same rules as the local limiter's); `None`: nothing to settle.
    pub(super) fn settlement<Res>(&self, result: Result<&Res, &Error>) -> Option<Settle>
    where
        U: ReadUsage<Res>,
    {
        let fleet = &*self.fleet;
        Some(
            match Outcome::of(&*fleet.usage, &fleet.settings.classifier, result) {
                Outcome::Nothing => return None,
                Outcome::Reported { used, server } => {
                    let tokens_back = used.map_or(0, |u| tokens_back(self.tokens, u));
                    let server = fleet.scaled(&server);
                    if tokens_back == 0 && server == [None; 4] {
                        // Used as estimated, nothing to steer by.
                        return None;
                    }
                    Settle {
                        tokens_back,
                        server,
                        ..Settle::default()
                    }
                }
                Outcome::Throttled { hint, server } => Settle {
                    throttled: Some(hint.map(|h| h.min(fleet.settings.hint_cap))),
                    server: fleet.scaled(&server),
                    ..self.all_back()
                },
                Outcome::Failed { server } if server.is_empty() => return None,
                Outcome::Failed { server } => Settle {
                    server: fleet.scaled(&server),
                    ..Settle::default()
                },
                Outcome::NotSent => self.all_back(),
            },
        )
    }

    /// Settles the call on the shared limit (nothing when `settle` is
    /// `None`).
    pub(super) async fn finish(self, settle: Option<Settle>) {
        let Some(settle) = settle else { return };
        let fleet = &*self.fleet;
        match fleet.store.settle(self.slot, &settle).await {
            Ok((lowered, paused)) => {
                if lowered {
                    fleet.emit(Kind::Steered, None, None);
                }
                if paused.is_some() {
                    fleet.emit(Kind::Paused, None, paused);
                }
            }
            Err(e) => fleet.redis_failed(false, &e),
        }
    }
}

/// Tokens to give back when a call estimated at `estimate` used `used`
/// (negative: to charge on top), saturated to what the script takes.
pub(super) fn tokens_back(estimate: u64, used: u64) -> i64 {
    let diff = i128::from(estimate) - i128::from(used);
    i64::try_from(diff).unwrap_or(if diff < 0 { -i64::MAX } else { i64::MAX })
}

impl<E: Send + Sync + 'static, U: Send + Sync + 'static> Drop for Charge<E, U> {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(&self.fleet);
        let (slot, settle) = (self.slot, self.all_back());
        rt.spawn(async move {
            if let Err(e) = fleet.store.settle(slot, &settle).await {
                fleet.redis_failed(false, &e);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::tokens_back;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn tokens_back_is_the_difference_saturated(e in any::<u64>(), u in any::<u64>()) {
            let exact = i128::from(e) - i128::from(u);
            let got = i128::from(tokens_back(e, u));
            prop_assert_eq!(got, exact.clamp(-i128::from(i64::MAX), i128::from(i64::MAX)));
        }
    }

    #[test]
    fn tokens_back_examples() {
        assert_eq!(tokens_back(60, 10), 50);
        assert_eq!(tokens_back(10, 60), -50);
        assert_eq!(tokens_back(0, u64::MAX), -i64::MAX);
        assert_eq!(tokens_back(u64::MAX, 0), i64::MAX);
    }
}
