//! What a shared breaker coordination reports: one event type, and metrics
//! under stable names.

use std::time::Duration;

/// Something the coordination of a namespace did. Never carries a key's
/// name (it may be derived from a credential) or any request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedBreakerEvent {
    /// Subscribed to the namespace's channel; the breakers now wait for the
    /// shared probe permit at the end of an open period.
    Connected,
    /// Redis could not be reached or a command failed: the breakers work
    /// locally (as if not shared) until the coordination reconnects, which
    /// it tries by itself (50 ms doubling to 1 s).
    Disconnected {
        /// The client's error, as text.
        error: String,
    },
    /// A local trip was published to the other processes.
    TripPublished,
    /// Another process's trip opened (or kept open) a local breaker.
    TripReceived,
    /// This process holds the key's probe permit: its breaker goes
    /// half-open and sends the probes.
    ProbeGranted,
    /// Another process holds the probe permit (or the shared open period
    /// has not ended): the local breaker stays open.
    ProbeDenied {
        /// How long it stays open before asking again, unless the prober's
        /// outcome arrives first.
        wait: Duration,
    },
    /// The local probes closed the breaker; published to the others.
    ClosePublished,
    /// Another process's probes succeeded: the local breaker closed.
    CloseReceived,
}

impl SharedBreakerEvent {
    /// The event's name, as the `kind` label of
    /// `llm_resilience_shared_breaker_events_total`.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected { .. } => "disconnected",
            Self::TripPublished => "trip_published",
            Self::TripReceived => "trip_received",
            Self::ProbeGranted => "probe_granted",
            Self::ProbeDenied { .. } => "probe_denied",
            Self::ClosePublished => "close_published",
            Self::CloseReceived => "close_received",
        }
    }
}

/// The coordination's metrics (feature `metrics`), labelled by namespace.
pub(super) struct Metrics {
    #[cfg(feature = "metrics")]
    namespace: String,
    #[cfg(feature = "metrics")]
    connected: metrics::Gauge,
}

impl Metrics {
    pub(super) fn new(namespace: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = namespace;
        #[cfg(feature = "metrics")]
        {
            let connected = metrics::gauge!(
                "llm_resilience_shared_breaker_connected",
                "namespace" => namespace.to_owned()
            );
            connected.set(0.0);
            Self {
                namespace: namespace.to_owned(),
                connected,
            }
        }
        #[cfg(not(feature = "metrics"))]
        Self {}
    }

    pub(super) fn record(&self, event: &SharedBreakerEvent) {
        #[cfg(not(feature = "metrics"))]
        let _ = event;
        #[cfg(feature = "metrics")]
        {
            match event {
                SharedBreakerEvent::Connected => self.connected.set(1.0),
                SharedBreakerEvent::Disconnected { .. } => self.connected.set(0.0),
                _ => {}
            }
            metrics::counter!(
                "llm_resilience_shared_breaker_events_total",
                "namespace" => self.namespace.clone(),
                "kind" => event.kind()
            )
            .increment(1);
        }
    }
}
