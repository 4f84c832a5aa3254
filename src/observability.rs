//! Metrics and tracing: the table of every metric name.
//!
#![doc = include_str!("../docs/metrics.md")]
