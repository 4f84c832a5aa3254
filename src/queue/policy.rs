//! What the queue reads from a request: its [`Priority`] and its deadline.

use tokio::time::Instant;

/// A request's class. Higher classes are served first, with
/// [aging](super::QueueLayerBuilder::age_after) so that lower ones do not
/// starve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[non_exhaustive]
pub enum Priority {
    /// Time-sensitive work (a user waiting on an answer).
    High = 0,
    /// The default.
    #[default]
    Normal = 1,
    /// Batch work.
    Low = 2,
}

impl Priority {
    /// A short, stable, lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// Reads a request's class. Implemented by [`SamePriority`] and by every
/// `Fn(&Req) -> Priority + Send + Sync + 'static`.
pub trait PriorityOf<Req>: Send + Sync + 'static {
    /// The request's class.
    fn priority(&self, req: &Req) -> Priority;
}

impl<Req, F> PriorityOf<Req> for F
where
    F: Fn(&Req) -> Priority + Send + Sync + 'static,
{
    fn priority(&self, req: &Req) -> Priority {
        self(req)
    }
}

/// Every request is [`Priority::Normal`] (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct SamePriority;

impl<Req> PriorityOf<Req> for SamePriority {
    #[inline]
    fn priority(&self, _: &Req) -> Priority {
        Priority::Normal
    }
}

/// Reads a request's deadline. Implemented by [`NoDeadline`] and by every
/// `Fn(&Req) -> Option<tokio::time::Instant> + Send + Sync + 'static`.
pub trait DeadlineOf<Req>: Send + Sync + 'static {
    /// When the request stops being worth sending, if ever.
    fn deadline(&self, req: &Req) -> Option<Instant>;
}

impl<Req, F> DeadlineOf<Req> for F
where
    F: Fn(&Req) -> Option<Instant> + Send + Sync + 'static,
{
    fn deadline(&self, req: &Req) -> Option<Instant> {
        self(req)
    }
}

/// No request has a deadline (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDeadline;

impl<Req> DeadlineOf<Req> for NoDeadline {
    #[inline]
    fn deadline(&self, _: &Req) -> Option<Instant> {
        None
    }
}
