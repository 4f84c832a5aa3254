//! [`InnerPanicked`]: what the queue answers when the inner service panics.

use std::any::Any;
use std::fmt;

use crate::error::Error;

/// The inner service panicked in `call` or in its response future; the
/// queue caught the panic and answered the caller with
/// [`Error::Upstream`](crate::Error::Upstream) holding this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerPanicked {
    message: String,
}

impl InnerPanicked {
    fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "non-string panic payload".to_owned()
        };
        Self { message }
    }

    /// The panic's message, when it was a string.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for InnerPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inner service panicked: {}", self.message)
    }
}

impl std::error::Error for InnerPanicked {}

pub(super) fn panicked(payload: Box<dyn Any + Send>) -> Error {
    let err = InnerPanicked::from_payload(payload);
    tracing::warn!(
        message = err.message(),
        "inner service panicked; the caller gets an error"
    );
    Error::Upstream {
        source: Box::new(err),
    }
}
