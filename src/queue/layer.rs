//! [`QueueLayer`] and its validated builder.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::event::{Listener, QueueEvent};
use super::handle::QueueHandle;
use super::state::Shared;
use super::{NoDeadline, Queue, SamePriority};
use crate::error::ConfigError;
use crate::guard::{AtResponse, AtStreamEnd};

/// The largest capacity and concurrency accepted: 2^30 (2^28 on targets
/// with 32-bit pointers), so that a count times 4 plus the flags fits the
/// atomic word it lives in.
#[cfg(target_pointer_width = "64")]
const MAX_BOUND: usize = 1 << 30;
#[cfg(not(target_pointer_width = "64"))]
const MAX_BOUND: usize = 1 << 28;
#[cfg(target_pointer_width = "64")]
const TOO_LARGE: &str = "must be at most 2^30";
#[cfg(not(target_pointer_width = "64"))]
const TOO_LARGE: &str = "must be at most 2^28 on this target";

/// What the queue does with a request when every permit is taken and every
/// place in the queue is too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// Backpressure: `poll_ready` stays pending until a place frees (bounded
    /// by [`max_wait`](QueueLayerBuilder::max_wait) when set).
    #[default]
    Wait,
    /// Load shedding: the request is answered at once with
    /// [`Error::QueueFull`](crate::Error::QueueFull).
    Reject,
}

/// The per-request policy: how to read a request's class and deadline.
pub(crate) struct Policy<P, D> {
    pub(crate) priority: P,
    pub(crate) deadline: D,
    pub(crate) max_wait: Option<Duration>,
    /// Something needs the time a queued request began waiting: aging
    /// (requests of several classes), `max_wait`, or events. Otherwise a
    /// queued request reads no clock.
    pub(crate) stamp: bool,
}

/// Applies the [`Queue`] middleware; every service it makes shares one
/// queue.
///
/// The queue's state (permits, waiting requests, counters) is created with
/// the layer and shared by every service it wraps and every clone of those:
/// one layer, one queue. Build another layer for an independent queue.
pub struct QueueLayer<P = SamePriority, D = NoDeadline, H = AtResponse> {
    shared: Arc<Shared>,
    policy: Arc<Policy<P, D>>,
    hold: PhantomData<fn() -> H>,
}

impl<P, D, H> Clone for QueueLayer<P, D, H> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            policy: Arc::clone(&self.policy),
            hold: PhantomData,
        }
    }
}

impl<P, D, H> fmt::Debug for QueueLayer<P, D, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueLayer")
            .field("capacity", &self.shared.capacity)
            .field("concurrency", &self.shared.concurrency)
            .field("reject", &self.shared.reject)
            .field("max_wait", &self.policy.max_wait)
            .finish_non_exhaustive()
    }
}

impl QueueLayer {
    /// The LLM defaults: capacity 1 000 waiting requests, concurrency 32
    /// calls in flight, wait (backpressure) when full, no maximum wait,
    /// every request [`Priority::Normal`](super::Priority::Normal), no
    /// deadline, aging after 10 s. Providers limit a key by requests and
    /// tokens per minute rather than by calls in flight, so 32 is a
    /// starting point to tune, not a provider's figure; 1 000 waiting
    /// requests of a few kilobytes each stay within a few megabytes.
    pub fn llm_defaults() -> Self {
        Self::builder()
            .build()
            .expect("the LLM defaults are a valid configuration")
    }

    /// A builder starting from [`QueueLayer::llm_defaults`].
    pub fn builder() -> QueueLayerBuilder {
        QueueLayerBuilder {
            capacity: 1_000,
            concurrency: 32,
            when_full: WhenFull::Wait,
            max_wait: None,
            age_after: Duration::from_secs(10),
            classes: false,
            priority: SamePriority,
            deadline: NoDeadline,
            listener: None,
            hold: PhantomData,
            name: Cow::Borrowed("default"),
        }
    }
}

impl<P, D, H> QueueLayer<P, D, H> {
    /// A handle for depth queries, counters and shutdown.
    pub fn handle(&self) -> QueueHandle {
        QueueHandle::new(Arc::clone(&self.shared))
    }
}

impl<S, P, D, H> Layer<S> for QueueLayer<P, D, H> {
    type Service = Queue<S, P, D, H>;

    fn layer(&self, inner: S) -> Self::Service {
        Queue::from_parts(inner, Arc::clone(&self.shared), Arc::clone(&self.policy))
    }
}

/// Builds a [`QueueLayer`]; [`build`](Self::build) validates.
pub struct QueueLayerBuilder<P = SamePriority, D = NoDeadline, H = AtResponse> {
    capacity: usize,
    concurrency: usize,
    when_full: WhenFull,
    max_wait: Option<Duration>,
    age_after: Duration,
    /// A priority reader was set: requests may come in several classes.
    classes: bool,
    priority: P,
    deadline: D,
    listener: Option<Listener>,
    hold: PhantomData<fn() -> H>,
    name: Cow<'static, str>,
}

impl<P, D, H> fmt::Debug for QueueLayerBuilder<P, D, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueLayerBuilder")
            .field("capacity", &self.capacity)
            .field("concurrency", &self.concurrency)
            .field("when_full", &self.when_full)
            .field("max_wait", &self.max_wait)
            .field("age_after", &self.age_after)
            .finish_non_exhaustive()
    }
}

impl<P, D, H> QueueLayerBuilder<P, D, H> {
    /// How many requests may **wait** (not counting those in flight). A
    /// place is taken when `poll_ready` finds no free permit and released
    /// when the request gets a permit, is cancelled, expires or is refused.
    /// With concurrency `c` and capacity `k`, `c + k` requests can be
    /// accepted at once; the next one waits or is rejected. 0 is allowed
    /// only with [`WhenFull::Reject`] (pure load shedding at the concurrency
    /// bound). At most 2^30.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// How many calls may be in flight to the inner service at once
    /// (at least 1, at most 2^30).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Wait (backpressure) or reject when the queue is full.
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// The longest a request may wait in the layer before it is sent: the
    /// time `poll_ready` waits for a place plus the time queued for a
    /// permit. Past it the request is answered with
    /// [`Error::QueueTimeout`](crate::Error::QueueTimeout) and never sent.
    /// Must be more than zero. A wait too long to add to the clock (such as
    /// `Duration::MAX`) means no limit.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = Some(max_wait);
        self
    }

    /// Aging, the protection against starving lower classes: a request
    /// competes as if it had been queued `age_after` earlier for every class
    /// it is above [`Priority::Low`](super::Priority::Low). So a `High`
    /// request goes ahead of a `Normal` one queued less than `age_after`
    /// before it, but not of one that has waited longer. Zero makes the
    /// queue plain FIFO; a huge value (up to `Duration::MAX`) makes the
    /// classes strict (a lower class waits while any higher one is queued).
    /// Default 10 s.
    pub fn age_after(mut self, age_after: Duration) -> Self {
        self.age_after = age_after;
        self
    }

    /// Reads each request's class: a closure `Fn(&Req) -> Priority` or any
    /// [`PriorityOf`](super::PriorityOf). Called only for requests that
    /// have to wait.
    pub fn priority_by<P2>(self, priority: P2) -> QueueLayerBuilder<P2, D, H> {
        QueueLayerBuilder {
            capacity: self.capacity,
            concurrency: self.concurrency,
            when_full: self.when_full,
            max_wait: self.max_wait,
            age_after: self.age_after,
            classes: true,
            priority,
            deadline: self.deadline,
            listener: self.listener,
            hold: PhantomData,
            name: self.name,
        }
    }

    /// Reads each request's deadline: a closure
    /// `Fn(&Req) -> Option<tokio::time::Instant>` or any
    /// [`DeadlineOf`](super::DeadlineOf). A request whose deadline passes
    /// before it is sent is answered with
    /// [`Error::DeadlineExceeded`](crate::Error::DeadlineExceeded) with
    /// `attempts: 0` and never sent.
    pub fn deadline_by<D2>(self, deadline: D2) -> QueueLayerBuilder<P, D2, H> {
        QueueLayerBuilder {
            capacity: self.capacity,
            concurrency: self.concurrency,
            when_full: self.when_full,
            max_wait: self.max_wait,
            age_after: self.age_after,
            classes: self.classes,
            priority: self.priority,
            deadline,
            listener: self.listener,
            hold: PhantomData,
            name: self.name,
        }
    }

    /// A call keeps its permit until its streamed response's stream ends
    /// (completes, fails or is dropped) instead of until the response
    /// arrives, so that `concurrency` bounds the streams being read, not
    /// only the calls waiting for their first chunk. The inner service's
    /// response must be a [`GuardedResponse`](crate::guard::GuardedResponse)
    /// (the crate's streaming clients' are; any stream of `Result`s is,
    /// wrapped in [`Guarded`](crate::guard::Guarded)). See
    /// [`crate::guard`].
    pub fn hold_until_stream_end(self) -> QueueLayerBuilder<P, D, AtStreamEnd> {
        self.release::<AtStreamEnd>()
    }

    /// The builder with release mode `H2`.
    pub(crate) fn release<H2>(self) -> QueueLayerBuilder<P, D, H2> {
        QueueLayerBuilder {
            capacity: self.capacity,
            concurrency: self.concurrency,
            when_full: self.when_full,
            max_wait: self.max_wait,
            age_after: self.age_after,
            classes: self.classes,
            priority: self.priority,
            deadline: self.deadline,
            listener: self.listener,
            hold: PhantomData,
            name: self.name,
        }
    }

    /// The queue's name: the `queue` label of its metrics (default
    /// `"default"`).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// An event hook, called (outside any lock) for every [`QueueEvent`].
    pub fn on_event<F>(mut self, f: F) -> Self
    where
        F: Fn(&QueueEvent) + Send + Sync + 'static,
    {
        self.listener = Some(Arc::new(f));
        self
    }

    /// Validates and builds the layer.
    pub fn build(self) -> Result<QueueLayer<P, D, H>, ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::new("concurrency", "must be at least 1"));
        }
        if self.concurrency > MAX_BOUND {
            return Err(ConfigError::new("concurrency", TOO_LARGE));
        }
        if self.capacity == 0 && self.when_full == WhenFull::Wait {
            return Err(ConfigError::new(
                "capacity",
                "must be at least 1 when waiting (0 is allowed only with WhenFull::Reject)",
            ));
        }
        if self.capacity > MAX_BOUND {
            return Err(ConfigError::new("capacity", TOO_LARGE));
        }
        if self.max_wait.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("max_wait", "must be more than zero"));
        }
        let (classes, max_wait) = (self.classes, self.max_wait.is_some());
        let shared = Shared::named(
            self.concurrency,
            self.capacity,
            self.when_full == WhenFull::Reject,
            self.age_after,
            self.listener,
            self.name,
        );
        // A queued request reads the clock only for what needs its start.
        let stamp = classes || max_wait || shared.observed();
        Ok(QueueLayer {
            shared: Arc::new(shared),
            policy: Arc::new(Policy {
                priority: self.priority,
                deadline: self.deadline,
                max_wait: self.max_wait,
                stamp,
            }),
            hold: PhantomData,
        })
    }
}
