//! Readying the inner service: the `poll_ready` every layer that owns a
//! clone of its inner service writes the same way.

use std::task::{Context, Poll};

use tower_service::Service;

use crate::error::{BoxError, Error};

/// Polls `inner` ready unless `ready` says it already is, and records the
/// answer in `ready`, so that `call` knows whether the service it moves
/// into its future was readied. Errors come back as the crate's [`Error`],
/// unnested ([`Error::from_inner`]).
#[inline]
pub(crate) fn poll_inner<S, Req>(
    inner: &mut S,
    ready: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Error>>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    if *ready {
        return Poll::Ready(Ok(()));
    }
    match inner.poll_ready(cx) {
        Poll::Ready(Ok(())) => {
            *ready = true;
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(Error::from_inner(e))),
        Poll::Pending => Poll::Pending,
    }
}
