//! Streamed responses inside the queue's and the breaker's bounds, on a
//! paused clock with `tower_test::mock`: a stream keeps its queue permit
//! until it ends, fails or is dropped (concurrency 2 lets 2 of 10 streams
//! read at once), and the breaker records a clean end as a success and an
//! error mid-stream as a failure; a user's own stream type works the same.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use llm_resilience::breaker::{CircuitBreakerLayer, State};
use llm_resilience::guard::{AtStreamEnd, Guarded, GuardedResponse, StreamGuard, StreamGuards};
use llm_resilience::queue::{NoDeadline, QueueHandle, QueueLayer, SamePriority};
use tokio::time::timeout;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_test::mock;

type Item = Result<String, std::io::Error>;
type Chunks = Guarded<mpsc::UnboundedReceiver<Item>>;

/// A stream the test writes to: its first chunk, and the sender that
/// writes the rest (dropping it ends the stream cleanly).
fn stream(first: &str) -> (mpsc::UnboundedSender<Item>, Chunks) {
    let (tx, rx) = mpsc::unbounded();
    tx.unbounded_send(Ok(first.to_owned())).unwrap();
    (tx, Guarded::new(rx))
}

fn queue(
    concurrency: usize,
) -> (
    QueueLayer<SamePriority, NoDeadline, AtStreamEnd>,
    QueueHandle,
) {
    let layer = QueueLayer::builder()
        .concurrency(concurrency)
        .capacity(64)
        .hold_until_stream_end()
        .build()
        .unwrap();
    let handle = layer.handle();
    (layer, handle)
}

/// Nothing more reaches the inner service for a (virtual) minute.
async fn no_request<T, U>(handle: &mut mock::Handle<T, U>) {
    let next = timeout(Duration::from_secs(60), handle.next_request()).await;
    assert!(next.is_err(), "a request passed the bound");
}

#[tokio::test(start_paused = true)]
async fn concurrency_two_lets_two_of_ten_streams_read_at_once() {
    let (mock, mut handle) = mock::pair::<u32, Chunks>();
    let (layer, q) = queue(2);
    let svc = layer.layer(mock);
    let reading = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for i in 0..10 {
        let (svc, reading, most) = (svc.clone(), reading.clone(), most.clone());
        callers.push(tokio::spawn(async move {
            let mut s = svc.oneshot(i).await.unwrap();
            let now = reading.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let mut chunks = 0;
            while let Some(chunk) = s.next().await {
                chunk.unwrap();
                chunks += 1;
            }
            reading.fetch_sub(1, Ordering::SeqCst);
            chunks
        }));
    }
    let mut open = VecDeque::new();
    for served in 0..10 {
        let (req, respond) = handle.next_request().await.unwrap();
        let (tx, s) = stream(&req.to_string());
        respond.send_response(s);
        open.push_back(tx);
        if open.len() == 2 || served == 9 {
            // Both permits travel with open streams: nobody else is sent.
            no_request(&mut handle).await;
            assert_eq!(q.in_flight(), open.len());
            assert_eq!(
                reading.load(Ordering::SeqCst),
                open.len(),
                "served {served}"
            );
            // The oldest stream sends one more chunk and ends.
            let tx = open.pop_front().unwrap();
            tx.unbounded_send(Ok("more".into())).unwrap();
            drop(tx);
        }
    }
    for tx in open {
        tx.unbounded_send(Ok("more".into())).unwrap();
    }
    for caller in callers {
        assert_eq!(caller.await.unwrap(), 2);
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
    assert_eq!(q.in_flight(), 0);
}

#[derive(Clone, Copy, Debug)]
enum End {
    Completes,
    Fails,
    IsDropped,
}

/// One call through a queue of concurrency 1 whose stream ends as `end`
/// says; the next call gets the permit then, and not before.
async fn permit_returns_when(end: End) {
    let (mock, mut handle) = mock::pair::<u32, Chunks>();
    let (layer, q) = queue(1);
    let svc = layer.layer(mock);
    let first = tokio::spawn(svc.clone().oneshot(1));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, s) = stream("a");
    respond.send_response(s);
    let mut s = first.await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), "a");
    assert_eq!(q.in_flight(), 1);
    let second = tokio::spawn(svc.clone().oneshot(2));
    no_request(&mut handle).await;
    assert_eq!(q.depth(), 1, "the second call waits for the stream");
    match end {
        End::Completes => {
            drop(tx);
            assert!(s.next().await.is_none());
        }
        End::Fails => {
            tx.unbounded_send(Err(std::io::Error::other("cut")))
                .unwrap();
            assert!(s.next().await.unwrap().is_err());
        }
        End::IsDropped => drop(s),
    }
    let (req, respond) = handle.next_request().await.unwrap();
    assert_eq!(req, 2);
    assert_eq!(q.depth(), 0);
    respond.send_response(stream("b").1);
    drop(second.await.unwrap().unwrap());
    assert_eq!(q.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_permit_returns_when_the_stream_ends() {
    permit_returns_when(End::Completes).await;
}

#[tokio::test(start_paused = true)]
async fn the_permit_returns_when_the_stream_fails() {
    permit_returns_when(End::Fails).await;
}

#[tokio::test(start_paused = true)]
async fn the_permit_returns_when_the_stream_is_dropped() {
    permit_returns_when(End::IsDropped).await;
}

#[tokio::test(start_paused = true)]
async fn without_hold_the_permit_returns_at_the_response() {
    let (mock, mut handle) = mock::pair::<u32, Chunks>();
    let layer = QueueLayer::builder().concurrency(1).build().unwrap();
    let q = layer.handle();
    let svc = layer.layer(mock);
    let first = tokio::spawn(svc.clone().oneshot(1));
    let (_, respond) = handle.next_request().await.unwrap();
    let (_tx, s) = stream("a");
    respond.send_response(s);
    let _open = first.await.unwrap().unwrap();
    // The default: the slot went back at the first chunk.
    assert_eq!(q.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_records_a_clean_end_as_success_and_a_cut_as_failure() {
    let (mock, mut handle) = mock::pair::<u32, Chunks>();
    let breaker = CircuitBreakerLayer::builder()
        .count_window(10)
        .min_calls(10)
        .consecutive_failures(3)
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = breaker.layer(mock);

    // A clean end: one success, recorded at the end, not at the response.
    let call = tokio::spawn(svc.clone().oneshot(0));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, s) = stream("a");
    respond.send_response(s);
    let mut s = call.await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), "a");
    assert_eq!(b.counts().calls, 0, "nothing recorded before the end");
    drop(tx);
    assert!(s.next().await.is_none());
    assert_eq!((b.counts().calls, b.counts().failures), (1, 0));

    // Dropped by the caller before its end: no outcome.
    let call = tokio::spawn(svc.clone().oneshot(1));
    let (_, respond) = handle.next_request().await.unwrap();
    let (_tx, s) = stream("a");
    respond.send_response(s);
    drop(call.await.unwrap().unwrap());
    assert_eq!((b.counts().calls, b.counts().failures), (1, 0));

    // Three streams cut after their first chunk: three failures, open.
    for i in 0..3 {
        let call = tokio::spawn(svc.clone().oneshot(10 + i));
        let (_, respond) = handle.next_request().await.unwrap();
        let (tx, s) = stream("a");
        respond.send_response(s);
        let mut s = call.await.unwrap().unwrap();
        assert!(s.next().await.unwrap().is_ok());
        assert_eq!(b.state(), State::Closed);
        tx.unbounded_send(Err(std::io::Error::other("connection reset")))
            .unwrap();
        assert!(s.next().await.unwrap().is_err());
        if i == 1 {
            assert_eq!((b.counts().calls, b.counts().failures), (3, 2));
        }
    }
    assert_eq!(b.state(), State::Open);
    let refused = svc.clone().oneshot(99).await.unwrap_err();
    assert!(matches!(refused, llm_resilience::Error::CircuitOpen { .. }));
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_is_the_whole_stream() {
    let (mock, mut handle) = mock::pair::<u32, Chunks>();
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .open_duration(Duration::from_secs(1))
        .open_jitter(0.0)
        .half_open_probes(1)
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = breaker.layer(mock);
    // Trip it with a failed stream.
    let call = tokio::spawn(svc.clone().oneshot(0));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, s) = stream("a");
    respond.send_response(s);
    let mut s = call.await.unwrap().unwrap();
    s.next().await;
    tx.unbounded_send(Err(std::io::Error::other("cut")))
        .unwrap();
    s.next().await;
    assert_eq!(b.state(), State::Open);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The probe's stream answers; the breaker stays half-open until it ends.
    let call = tokio::spawn(svc.clone().oneshot(1));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, s) = stream("a");
    respond.send_response(s);
    let mut s = call.await.unwrap().unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    assert_eq!(b.probes_in_flight(), 1);
    drop(tx);
    while s.next().await.is_some() {}
    assert_eq!(b.state(), State::Closed);
}

/// A user's own stream type, not the crate's: tokens until a stop token.
struct Tokens {
    rx: mpsc::UnboundedReceiver<&'static str>,
    guards: StreamGuards,
}

#[derive(Debug)]
struct Truncated;

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream truncated before the stop token")
    }
}

impl std::error::Error for Truncated {}

impl GuardedResponse for Tokens {
    fn attach(&mut self, guard: StreamGuard) {
        self.guards.push(guard);
    }
}

impl Stream for Tokens {
    type Item = Result<&'static str, Truncated>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some("<stop>")) => {
                self.guards.complete();
                Poll::Ready(None)
            }
            Poll::Ready(Some(t)) => Poll::Ready(Some(Ok(t))),
            Poll::Ready(None) => {
                self.guards.fail(&Truncated);
                Poll::Ready(Some(Err(Truncated)))
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_users_own_stream_type_holds_the_slot_and_reports_its_end() {
    let (mock, mut handle) = mock::pair::<u32, Tokens>();
    let (layer, q) = queue(1);
    let breaker = CircuitBreakerLayer::builder()
        .consecutive_failures(1)
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(breaker)
        .service(mock);

    let call = tokio::spawn(svc.clone().oneshot(1));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, rx) = mpsc::unbounded();
    tx.unbounded_send("Hel").unwrap();
    respond.send_response(Tokens {
        rx,
        guards: StreamGuards::new(),
    });
    let mut s = call.await.unwrap().unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), "Hel");
    assert_eq!(q.in_flight(), 1);
    tx.unbounded_send("lo").unwrap();
    tx.unbounded_send("<stop>").unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), "lo");
    assert!(s.next().await.is_none());
    assert_eq!(q.in_flight(), 0);
    assert_eq!((b.counts().calls, b.counts().failures), (1, 0));

    // Truncated: a failure, and the breaker (one failure trips) opens.
    let call = tokio::spawn(svc.clone().oneshot(2));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, rx) = mpsc::unbounded();
    tx.unbounded_send("Hel").unwrap();
    respond.send_response(Tokens {
        rx,
        guards: StreamGuards::new(),
    });
    let mut s = call.await.unwrap().unwrap();
    s.next().await;
    drop(tx);
    assert!(s.next().await.unwrap().is_err());
    assert_eq!(q.in_flight(), 0);
    assert_eq!(b.state(), State::Open);
}

/// A response that is sometimes whole, sometimes a stream.
enum Answer {
    Whole(&'static str),
    Streamed(Chunks),
}

impl GuardedResponse for Answer {
    fn is_streaming(&self) -> bool {
        matches!(self, Answer::Streamed(_))
    }

    fn attach(&mut self, guard: StreamGuard) {
        match self {
            Answer::Streamed(s) => s.attach(guard),
            Answer::Whole(_) => panic!("a whole answer is never given a guard"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_whole_answer_settles_at_the_response_and_a_streamed_one_at_its_end() {
    let (mock, mut handle) = mock::pair::<u32, Answer>();
    let (layer, q) = queue(1);
    let breaker = CircuitBreakerLayer::builder()
        .record_at_stream_end()
        .build()
        .unwrap();
    let b = breaker.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(breaker)
        .service(mock);

    let call = tokio::spawn(svc.clone().oneshot(1));
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_response(Answer::Whole("done"));
    assert!(matches!(
        call.await.unwrap().unwrap(),
        Answer::Whole("done")
    ));
    assert_eq!(q.in_flight(), 0);
    assert_eq!(b.counts().calls, 1);

    let call = tokio::spawn(svc.clone().oneshot(2));
    let (_, respond) = handle.next_request().await.unwrap();
    let (tx, s) = stream("a");
    respond.send_response(Answer::Streamed(s));
    let Answer::Streamed(mut s) = call.await.unwrap().unwrap() else {
        panic!("a stream was sent")
    };
    assert_eq!((q.in_flight(), b.counts().calls), (1, 1));
    drop(tx);
    while s.next().await.is_some() {}
    assert_eq!((q.in_flight(), b.counts().calls), (0, 2));
}
