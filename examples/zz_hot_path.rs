use std::future::{ready, Future, Ready};
use std::io;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug)]
struct Always;
impl Service<u64> for Always {
    type Response = u64;
    type Error = io::Error;
    type Future = Ready<Result<u64, io::Error>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> { Poll::Ready(Ok(())) }
    fn call(&mut self, n: u64) -> Self::Future { ready(Ok(n + 1)) }
}

#[inline(never)]
fn run<S: Service<u64, Response = u64>>(svc: &mut S, cx: &mut Context<'_>, n: u64) -> u64 where S::Error: std::fmt::Debug {
    let mut acc = 0;
    for i in 0..n {
        let Poll::Ready(Ok(())) = svc.poll_ready(cx) else { panic!() };
        let fut = pin!(svc.call(i));
        let Poll::Ready(Ok(v)) = fut.poll(cx) else { panic!() };
        acc += v;
    }
    acc
}

fn main() {
    let n: u64 = std::env::args().nth(1).unwrap().parse().unwrap();
    let budget = std::env::args().nth(2).as_deref() == Some("budget");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _g = rt.enter();
    let mut b = llm_resilience::retry::RetryLayer::builder().max_attempts(3);
    if !budget { b = b.no_budget(); }
    let mut svc = b.build().unwrap().layer(Always);
    let mut cx = Context::from_waker(Waker::noop());
    println!("{}", run(&mut svc, &mut cx, n));
}
