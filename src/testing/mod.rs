//! Test support: the tower contract suite every layer of the crate passes,
//! and the probe service it drives layers with; the mock LLM server; the
//! error variants only the layers make ([`errors`]).
//!
//! Behind the `testing` feature, so that users who write their own layers,
//! or wrap ours, can run the same checks.

pub mod contract;
pub mod errors;
pub mod mock_server;
#[cfg(feature = "reqwest")]
pub mod storm;
