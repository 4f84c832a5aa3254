//! Every layer of the crate through the tower contract suite.
#![cfg(feature = "testing")]

use llm_resilience::retry::RetryLayer;
use llm_resilience::testing::contract;

#[tokio::test(start_paused = true)]
async fn retry_layer_keeps_the_tower_contract() {
    contract::check_layer(RetryLayer::llm_defaults).await;
}

#[tokio::test(start_paused = true)]
async fn retry_layer_with_timeouts_keeps_the_tower_contract() {
    contract::check_layer(|| {
        RetryLayer::builder()
            .attempt_timeout(std::time::Duration::from_secs(5))
            .deadline(std::time::Duration::from_secs(30))
            .build()
            .unwrap()
    })
    .await;
}

/// The suite can fail: a naive pass-through layer (tower's `MapResponse`)
/// forwards `call` without `poll_ready` to the inner service, which rule 2
/// catches.
#[tokio::test(start_paused = true)]
#[should_panic(expected = "rule 2")]
async fn the_suite_catches_a_layer_that_skips_readiness() {
    contract::check_layer(|| tower::util::MapResponseLayer::new(|r: u32| r)).await;
}

#[tokio::test(start_paused = true)]
async fn rate_limit_layer_keeps_the_tower_contract() {
    use llm_resilience::ratelimit::RateLimitLayer;
    contract::check_layer(|| {
        RateLimitLayer::builder()
            .estimate_tokens(|_: &u32| 10)
            .ignore_usage()
            .build()
            .unwrap()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn keyed_rate_limit_layer_keeps_the_tower_contract() {
    use llm_resilience::ratelimit::RateLimitLayer;
    contract::check_layer(|| {
        RateLimitLayer::builder()
            .estimate_tokens(|_: &u32| 10)
            .ignore_usage()
            .key_by(|x: &u32| x % 2)
            .build()
            .unwrap()
    })
    .await;
}
