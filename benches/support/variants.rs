//! Every configuration the benches compare, in one place, so that
//! `retry.rs`, `breaker.rs`, `stack.rs` and the callgrind binary
//! (`instructions.rs`) measure exactly the same services. Each wraps the
//! same always-ready inner service, [`Always`]. BENCHMARKS.md says what
//! each side does that the other does not.

#![allow(dead_code)]

use std::io;
use std::sync::Arc;
use std::time::Duration;

use llm_resilience::breaker::CircuitBreakerLayer;
use llm_resilience::queue::QueueLayer;
use llm_resilience::retry::RetryLayer;
use tower::retry::budget::TpsBudget;
use tower::{Layer, ServiceBuilder};

use super::drive::Bench;
use super::peers::{Always, TowerPolicy};
use std::task::{Context, Poll};
use tower::Service;

/// The window of every time-window breaker here, and the attempt timeout of
/// the stacks.
pub const WINDOW: Duration = Duration::from_secs(30);
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// In-flight bound of the stacks.
pub const CONCURRENCY: usize = 32;

pub fn bare() -> impl Bench {
    Always
}

// ---- retry ---------------------------------------------------------------

/// Ours: 3 attempts, the default budget (ratio 0.2, 10 retries/s reserve,
/// 10 s window), the LLM classifier, no attempt timeout, no deadline.
pub fn retry_ours() -> impl Bench {
    RetryLayer::builder()
        .max_attempts(3)
        .build()
        .expect("valid")
        .layer(Always)
}

/// Ours without a budget.
pub fn retry_ours_no_budget() -> impl Bench {
    RetryLayer::builder()
        .max_attempts(3)
        .no_budget()
        .build()
        .expect("valid")
        .layer(Always)
}

/// tower 0.5 `Retry`, a policy like tower's budget example (deposit on
/// success, withdraw per retry, 3 attempts) over `TpsBudget(10 s, 10/s, 0.2)`.
pub fn retry_tower() -> impl Bench {
    let policy = TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts_left: 3,
    };
    tower::retry::RetryLayer::new(policy).layer(Always)
}

/// tower-resilience 0.13 retry with its defaults (3 attempts, exponential
/// backoff from 100 ms, no budget).
pub fn retry_tower_resilience() -> impl Bench {
    tower_resilience::retry::RetryLayer::<u64, u64, io::Error>::builder()
        .build()
        .layer(Always)
}

/// The least a retry layer can be (see [`LeastRetry`]), its configuration
/// shared through an `Arc`.
pub fn retry_least_shared() -> impl Bench {
    super::peers::LeastRetry {
        inner: Always,
        attempts: Arc::new(3u32),
    }
}

/// The same with the configuration copied, into the service and each
/// future: nothing shared.
pub fn retry_least_inline() -> impl Bench {
    super::peers::LeastRetry {
        inner: Always,
        attempts: 3u32,
    }
}

// ---- breaker -------------------------------------------------------------

/// Ours, count window of 100 calls, 100 calls minimum, otherwise the
/// defaults (50 % failure rate, 5 consecutive failures, LLM classifier).
pub fn breaker_count() -> impl Bench {
    CircuitBreakerLayer::builder()
        .count_window(100)
        .min_calls(100)
        .build()
        .expect("valid")
        .layer(Always)
}

/// Ours, 30 s time window, 20 calls minimum (the LLM defaults' window).
pub fn breaker_time() -> impl Bench {
    CircuitBreakerLayer::builder()
        .time_window(WINDOW)
        .min_calls(20)
        .build()
        .expect("valid")
        .layer(Always)
}

/// tower-resilience 0.13 breaker, count-based window of 100, minimum 100.
pub fn breaker_tr_count() -> impl Bench {
    use tower_resilience::circuitbreaker::{CircuitBreakerLayer as Tr, SlidingWindowType};
    Tr::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_type(SlidingWindowType::CountBased)
        .sliding_window_size(100)
        .minimum_number_of_calls(100)
        .build()
        .expect("valid")
        .layer(Always)
}

/// tower-resilience 0.13 breaker, time-based window of 30 s, minimum 20.
pub fn breaker_tr_time() -> impl Bench {
    use tower_resilience::circuitbreaker::{CircuitBreakerLayer as Tr, SlidingWindowType};
    Tr::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_type(SlidingWindowType::TimeBased)
        .sliding_window_duration(WINDOW)
        .minimum_number_of_calls(20)
        .build()
        .expect("valid")
        .layer(Always)
}

/// failsafe 1.3 with its default policy (`Config::new()`: success rate over
/// a 30 s time window, or 5 consecutive failures).
pub fn breaker_failsafe() -> impl Bench {
    Failsafe {
        sm: failsafe::Config::new().build(),
        inner: Always,
    }
}

// ---- the whole stack -----------------------------------------------------

/// Ours: queue (concurrency 32, capacity 1 000) → retry (3 attempts, 30 s
/// attempt timeout, default budget) → breaker (30 s time window).
pub fn stack_ours() -> impl Bench {
    stack_ours_with(
        CircuitBreakerLayer::builder()
            .time_window(WINDOW)
            .min_calls(20)
            .build()
            .expect("valid"),
    )
}

/// The same with the breaker's count window of 100 calls.
pub fn stack_ours_count() -> impl Bench {
    stack_ours_with(
        CircuitBreakerLayer::builder()
            .count_window(100)
            .min_calls(100)
            .build()
            .expect("valid"),
    )
}

fn stack_ours_with(breaker: CircuitBreakerLayer) -> impl Bench {
    ServiceBuilder::new()
        .layer(
            QueueLayer::builder()
                .concurrency(CONCURRENCY)
                .capacity(1_000)
                .build()
                .expect("valid"),
        )
        .layer(
            RetryLayer::builder()
                .max_attempts(3)
                .attempt_timeout(ATTEMPT_TIMEOUT)
                .build()
                .expect("valid"),
        )
        .layer(breaker)
        .service(Always)
}

/// tower-resilience 0.13: bulkhead (32 concurrent) → retry (its defaults)
/// → time limiter (30 s) → breaker (its defaults: a count window of 100
/// calls; its time-based window keeps every call and costs more the more
/// calls the window holds, see the breaker bench).
pub fn stack_tower_resilience() -> impl Bench {
    use tower_resilience::bulkhead::BulkheadLayer;
    use tower_resilience::circuitbreaker::CircuitBreakerLayer as Tr;
    use tower_resilience::timelimiter::TimeLimiterLayer;
    ServiceBuilder::new()
        .layer(
            BulkheadLayer::builder()
                .max_concurrent_calls(CONCURRENCY)
                .build()
                .expect("valid"),
        )
        .layer(tower_resilience::retry::RetryLayer::<u64, u64, _>::builder().build())
        .layer(
            TimeLimiterLayer::builder()
                .timeout_duration(ATTEMPT_TIMEOUT)
                .build(),
        )
        .layer(Tr::builder().build().expect("valid"))
        .service(Always)
}

/// tower 0.5's own stack, which has no breaker: `ConcurrencyLimit(32)` →
/// `Retry` with the `TpsBudget` policy above → `Timeout(30 s)`.
pub fn stack_tower() -> impl Bench {
    let policy = TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts_left: 3,
    };
    ServiceBuilder::new()
        .concurrency_limit(CONCURRENCY)
        .layer(tower::retry::RetryLayer::new(policy))
        .timeout(ATTEMPT_TIMEOUT)
        .service(Always)
}

/// failsafe is not a tower layer: this wraps its state machine around the
/// readied inner service's future, as its docs do (`CircuitBreaker::call`).
#[derive(Clone, Debug)]
pub struct Failsafe<SM, S> {
    pub sm: SM,
    pub inner: S,
}

impl<SM, S> Service<u64> for Failsafe<SM, S>
where
    SM: failsafe::futures::CircuitBreaker,
    S: Service<u64>,
{
    type Response = S::Response;
    type Error = failsafe::Error<S::Error>;
    type Future = failsafe::futures::ResponseFuture<
        S::Future,
        SM::FailurePolicy,
        SM::Instrument,
        failsafe::Any,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    fn call(&mut self, n: u64) -> Self::Future {
        self.sm.call(self.inner.call(n))
    }
}

// ---- the agent pipeline --------------------------------------------------

/// The whole pipeline's overall deadline.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Ours: `AgentPipeline` with one target: queue (capacity 1 000,
/// concurrency 32) → deadline (60 s) → fallback over one target → retry (3
/// attempts, default budget) → breaker (LLM defaults: 30 s time window,
/// minimum 20) → rate limit (a limit no call reaches) → attempt timeout
/// (30 s) → the client.
pub fn pipeline_ours() -> impl Bench {
    llm_resilience::pipeline::AgentPipeline::builder()
        .target("primary", Always)
        .queue(1_000, CONCURRENCY)
        .deadline(DEADLINE)
        .retry(|r| r.max_attempts(3).attempt_timeout(ATTEMPT_TIMEOUT))
        // A limit no call reaches, as on tower-resilience's side: the
        // limiter admits and counts every call.
        .rate_limit(|r| r.requests(1_000_000_000_000))
        .build()
        .expect("valid")
}

/// tower-resilience 0.13, the same order: bulkhead (32 concurrent) → time
/// limiter (the 60 s deadline) → retry (3 attempts, its defaults) → circuit
/// breaker (its default count window of 100) → rate limiter (a limit no call
/// reaches) → time limiter (the 30 s attempt timeout). It has no queue with
/// a bounded wait list (the bulkhead waits unbounded) and no fallback layer.
pub fn pipeline_tower_resilience() -> impl Bench {
    use tower_resilience::bulkhead::BulkheadLayer;
    use tower_resilience::circuitbreaker::CircuitBreakerLayer as Tr;
    use tower_resilience::ratelimiter::RateLimiterLayer;
    use tower_resilience::timelimiter::TimeLimiterLayer;
    ServiceBuilder::new()
        .layer(
            BulkheadLayer::builder()
                .max_concurrent_calls(CONCURRENCY)
                .build()
                .expect("valid"),
        )
        .layer(
            TimeLimiterLayer::builder()
                .timeout_duration(DEADLINE)
                .build(),
        )
        .layer(tower_resilience::retry::RetryLayer::<u64, u64, _>::builder().build())
        .layer(Tr::builder().build().expect("valid"))
        .layer(
            RateLimiterLayer::builder()
                .limit_for_period(usize::MAX / 4)
                .refresh_period(Duration::from_secs(1))
                .timeout_duration(Duration::from_secs(1))
                .build()
                .expect("valid"),
        )
        .layer(
            TimeLimiterLayer::builder()
                .timeout_duration(ATTEMPT_TIMEOUT)
                .build(),
        )
        .service(Always)
}

/// tower 0.5's own layers in the same order, where tower has one:
/// `ConcurrencyLimit(32)` → `Timeout(60 s)` → `Retry` with the `TpsBudget`
/// policy of the retry bench → `Timeout(30 s)`. tower has no breaker and no
/// fallback, and its `RateLimit` is per service value (not `Clone`; sharing
/// one takes a `Buffer`, a task and an allocation per call), so none here.
pub fn pipeline_tower() -> impl Bench {
    let policy = TowerPolicy {
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        attempts_left: 3,
    };
    ServiceBuilder::new()
        .concurrency_limit(CONCURRENCY)
        .timeout(DEADLINE)
        .layer(tower::retry::RetryLayer::new(policy))
        .timeout(ATTEMPT_TIMEOUT)
        .service(Always)
}
