//! Shared by the benches, `benches/instructions.rs` and
//! `benches/queue_instructions.rs`: the always-ready inner service every
//! variant wraps, and tower's retry policy written like tower's own example.

#![allow(dead_code)]

use std::future::{ready, Ready};
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;
use tower::Service;

/// The inner service of every variant: always ready, answers `n + 1` at once.
#[derive(Clone, Copy, Debug)]
pub struct Always;

impl Service<u64> for Always {
    type Response = u64;
    type Error = io::Error;
    type Future = Ready<Result<u64, io::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u64) -> Self::Future {
        ready(Ok(n.wrapping_add(1)))
    }
}

/// tower's retry policy, written like tower's own budget example: deposit on
/// a success, withdraw for each retry; at most `attempts_left` attempts.
#[derive(Clone, Debug)]
pub struct TowerPolicy {
    pub budget: Arc<TpsBudget>,
    pub attempts_left: u32,
}

impl<Req: Clone, Res, E> Policy<Req, Res, E> for TowerPolicy {
    type Future = Ready<()>;

    fn retry(&mut self, _req: &mut Req, result: &mut Result<Res, E>) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            Err(_) => {
                if self.attempts_left <= 1 || !self.budget.withdraw() {
                    return None;
                }
                self.attempts_left -= 1;
                Some(ready(()))
            }
        }
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}
