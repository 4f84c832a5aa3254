//! The seeded timeline of what production brings, as windows of a run.

use std::time::Duration;

use crate::chaos::{Latency, Window};
use crate::testing::mock_server::{ErrorReply, FaultScript, FaultWindow, MockFault};

/// Which parts of the timeline a run plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scenario {
    /// Everything below, one after another.
    All,
    /// Only the steady share of transient errors.
    Steady,
    /// A burst of arrivals above the provider's rate limit.
    Burst,
    /// A 429 storm with `Retry-After`.
    Storm,
    /// A full outage of the primary, then recovery.
    Outage,
}

impl Scenario {
    /// Every scenario's name, for `--scenario`.
    pub const NAMES: [&'static str; 5] = ["all", "steady", "burst", "storm", "outage"];

    /// The scenario called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "all" => Scenario::All,
            "steady" => Scenario::Steady,
            "burst" => Scenario::Burst,
            "storm" => Scenario::Storm,
            "outage" => Scenario::Outage,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::Steady => "steady",
            Scenario::Burst => "burst",
            Scenario::Storm => "storm",
            Scenario::Outage => "outage",
        }
    }

    fn has(self, part: Scenario) -> bool {
        self == Scenario::All || self == part
    }
}

/// The phases of a run, as fractions of its duration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phases {
    /// Arrivals at three times the rate.
    pub burst: Option<(f64, f64)>,
    /// The primary answers 429 with `Retry-After`.
    pub storm: Option<(f64, f64)>,
    /// The primary is down.
    pub outage: Option<(f64, f64)>,
    /// The primary answers slowly.
    pub slow: Option<(f64, f64)>,
    /// The primary's key has no quota left.
    pub quota: Option<(f64, f64)>,
}

impl Phases {
    /// The phases `scenario` plays.
    pub fn of(scenario: Scenario) -> Self {
        let pick = |part, span| scenario.has(part).then_some(span);
        let all = scenario == Scenario::All;
        Phases {
            burst: pick(Scenario::Burst, if all { (0.10, 0.22) } else { (0.3, 0.6) }),
            storm: pick(Scenario::Storm, if all { (0.25, 0.35) } else { (0.3, 0.6) }),
            outage: pick(
                Scenario::Outage,
                if all { (0.45, 0.65) } else { (0.3, 0.6) },
            ),
            slow: all.then_some((0.72, 0.80)),
            quota: all.then_some((0.86, 0.93)),
        }
    }

    /// `[from, until)` of a phase in a run of `duration`.
    pub fn window(span: (f64, f64), duration: Duration) -> Window {
        Window::between(duration.mul_f64(span.0), duration.mul_f64(span.1))
    }

    /// Whether `at` (into a run of `duration`) falls in `span`.
    pub fn contains(span: Option<(f64, f64)>, at: Duration, duration: Duration) -> bool {
        span.is_some_and(|s| Self::window(s, duration).contains(at))
    }
}

/// The share of calls that fail transiently all the time, and how.
pub const TRANSIENT_SHARE: f64 = 0.10;
/// The share of prompts too long for the primary's context.
pub const CONTEXT_LENGTH_SHARE: f64 = 0.01;

/// The primary provider's script for a run of `duration`.
pub(crate) fn primary_script(seed: u64, duration: Duration, phases: &Phases) -> FaultScript {
    let d = duration;
    let mut script = FaultScript::new().seed(seed).latency(Latency::Uniform {
        min: Duration::from_millis(20),
        max: Duration::from_millis(80),
    });
    if let Some(span) = phases.outage {
        script = script
            .window(FaultWindow::new(Phases::window(span, d)).outage(MockFault::server_error(503)));
    }
    if let Some(span) = phases.storm {
        let hint = (d / 40).max(Duration::from_millis(200));
        script = script.window(
            FaultWindow::new(Phases::window(span, d))
                .rate(MockFault::rate_limited(Some(hint)), 0.9),
        );
    }
    if let Some(span) = phases.quota {
        let quota = ErrorReply::openai(
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            "You exceeded your current quota.",
        );
        script = script
            .window(FaultWindow::new(Phases::window(span, d)).outage(MockFault::Error(quota)));
    }
    if let Some(span) = phases.slow {
        script = script.window(FaultWindow::new(Phases::window(span, d)).latency(
            Latency::Uniform {
                min: Duration::from_millis(400),
                max: Duration::from_millis(900),
            },
        ));
    }
    steady(script)
}

/// The secondary provider: the same steady faults, none of the primary's
/// incidents.
pub(crate) fn secondary_script(seed: u64) -> FaultScript {
    steady(
        FaultScript::new()
            .seed(seed ^ 0x5eed)
            .latency(Latency::Uniform {
                min: Duration::from_millis(30),
                max: Duration::from_millis(120),
            }),
    )
}

fn steady(script: FaultScript) -> FaultScript {
    let share = TRANSIENT_SHARE / 3.0;
    script.window(
        FaultWindow::new(Window::ALWAYS)
            .rate(MockFault::server_error(503), share)
            .rate(MockFault::overloaded(), share / (1.0 - share))
            .rate(MockFault::server_error(500), share / (1.0 - 2.0 * share))
            .rate(MockFault::context_length(), CONTEXT_LENGTH_SHARE),
    )
}
