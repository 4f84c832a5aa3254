//! The chaos layer's response future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::error::{BoxError, Error};

pin_project! {
    #[project = StateProj]
    enum State<S, Req, F> {
        // The inner call is in flight.
        Calling { #[pin] fut: F },
        // Owns the service: waits out injected latency (if any), readies the
        // service (unless it came readied), then calls it.
        Owned { sleep: Option<Pin<Box<Sleep>>>, service: S, readied: bool, req: Option<Req> },
        // Waiting, then answering an injected error.
        Failing { sleep: Option<Pin<Box<Sleep>>>, error: Option<Error> },
        Done,
    }
}

pin_project! {
    /// The future of [`Chaos`](super::Chaos).
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req, S::Future>,
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn called(fut: S::Future) -> Self {
        Self {
            state: State::Calling { fut },
        }
    }

    pub(crate) fn readying(service: S, req: Req) -> Self {
        Self {
            state: State::Owned {
                sleep: None,
                service,
                readied: false,
                req: Some(req),
            },
        }
    }

    pub(crate) fn delaying(sleep: Sleep, service: S, readied: bool, req: Req) -> Self {
        Self {
            state: State::Owned {
                sleep: Some(Box::pin(sleep)),
                service,
                readied,
                req: Some(req),
            },
        }
    }

    pub(crate) fn failing(sleep: Option<Sleep>, error: Error) -> Self {
        Self {
            state: State::Failing {
                sleep: sleep.map(Box::pin),
                error: Some(error),
            },
        }
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { fut } => {
                    let out = ready!(fut.poll(cx)).map_err(Error::from_inner);
                    this.state.set(State::Done);
                    return Poll::Ready(out);
                }
                StateProj::Owned {
                    sleep,
                    service,
                    readied,
                    req,
                } => {
                    if let Some(s) = sleep {
                        ready!(s.as_mut().poll(cx));
                        *sleep = None;
                    }
                    if !*readied {
                        if let Err(e) = ready!(service.poll_ready(cx)) {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(Error::from_inner(e)));
                        }
                        *readied = true;
                    }
                    let req = req.take().expect("request taken once");
                    let fut = service.call(req);
                    this.state.set(State::Calling { fut });
                }
                StateProj::Failing { sleep, error } => {
                    if let Some(s) = sleep {
                        ready!(s.as_mut().poll(cx));
                    }
                    let err = error.take().expect("error taken once");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(err));
                }
                StateProj::Done => panic!("chaos ResponseFuture polled after completion"),
            }
        }
    }
}
