//! The event hook every layer offers.
//!
//! One convention for all layers: a layer has one event type, its builder's
//! `on_event` takes `Fn(&Event) + Send + Sync + 'static`, and the hook is
//! called synchronously on the task that caused the event, after the
//! decision and never under a lock the layer holds. Nothing is built for it
//! when no hook is set. A panic in the hook propagates to that task, as a
//! panic in the inner service does (see the crate docs).

use std::sync::Arc;

/// A layer's event hook, shared by every clone.
pub(crate) type Listener<E> = Arc<dyn Fn(&E) + Send + Sync>;
