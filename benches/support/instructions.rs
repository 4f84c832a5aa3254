//! The loop the instruction-count examples run under callgrind: `n`
//! round trips (`poll_ready`, `call`, poll the future to its answer) with a
//! no-op waker and no runtime, for services whose answer is ready at once.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tower::Service;

#[inline(never)]
pub fn run<S>(svc: &mut S, n: u64) -> u64
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut acc = 0u64;
    for i in 0..n {
        let Poll::Ready(Ok(())) = svc.poll_ready(&mut cx) else {
            panic!("not ready")
        };
        let fut = pin!(svc.call(i));
        let Poll::Ready(Ok(v)) = fut.poll(&mut cx) else {
            panic!("not done")
        };
        acc = acc.wrapping_add(v);
    }
    acc
}
