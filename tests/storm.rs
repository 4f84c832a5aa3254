//! The storm demo's scenarios through the same code, compressed and seeded:
//! the table's invariants hold (real HTTP on loopback, real time; nothing
//! asserts on durations), the rate-limit claim among them: the burst goes
//! above the primary's own limits, and the pipeline's limiter avoids the
//! 429s the others meet.
#![cfg(all(feature = "reqwest", feature = "testing"))]

use llm_resilience::testing::storm::{run, Phases, Scenario, StormConfig, PIPELINE_CONCURRENCY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storms_invariants_hold() {
    let config = StormConfig::compressed(11, Scenario::All);
    let report = run(&config, |_| {}).await.unwrap();
    println!("{}", report.table());
    for c in report.claims() {
        println!("{} -> {} ({})", c.claim, c.measured, c.holds);
    }
    for r in &report.results {
        // Every request gets exactly one answer in every configuration.
        assert_eq!(r.lost, 0, "{} lost requests", r.name);
        assert_eq!(r.ok + r.errored(), r.requests, "{}", r.name);
    }
    let none = report.get("none").unwrap();
    let naive = report.get("naive").unwrap();
    let backoff = report.get("backoff").unwrap();
    let pipe = report.get("pipeline").unwrap();
    // The pipeline sends nothing after a request's deadline.
    assert_eq!(pipe.late_calls, 0);
    // During the outage the pipeline sends the primary a handful (the calls
    // that trip the breaker and its probes); naive retries send several times
    // the offered load.
    let outage = report.phases.outage.unwrap();
    let offered_in_outage = report.get("none").unwrap().outage_calls;
    assert!(
        naive.outage_calls >= 2 * offered_in_outage,
        "naive sent {} into the outage, offered {offered_in_outage}",
        naive.outage_calls
    );
    // The calls that trip the breaker (5 in a row by default) and the ones
    // already past it then (at most the queue's concurrency less one), then
    // its 3 probes per half-open period (the open period is at least
    // `open_duration`, so at most outage / open_duration + 1 of them).
    let window = Phases::window(outage, config.duration);
    let span = window.until.unwrap() - window.from;
    let periods = (span.as_secs_f64() / config.open_duration().as_secs_f64()).ceil() as u64 + 1;
    let bound = 5 + (PIPELINE_CONCURRENCY as u64 - 1) + 3 * periods;
    assert!(
        pipe.outage_calls <= bound,
        "pipeline sent {} into the outage (bound {bound})",
        pipe.outage_calls,
    );
    // Retries stay within the budget: 20 % of requests plus 10 per second
    // over the run (and the budget's 10 s window), above one call each.
    let secs = report.duration.as_secs_f64() + 10.0;
    let allowed = backoff.requests as f64 * 1.2 + 10.0 * secs;
    assert!(
        (backoff.upstream_calls as f64) <= allowed,
        "{} > {allowed}",
        backoff.upstream_calls
    );
    assert!(backoff.upstream_calls < naive.upstream_calls);
    // The pipeline answers more than the bare client.
    assert!(pipe.success_rate() > none.success_rate());
    // The burst goes above the primary's own limits: the bare client meets
    // its 429s, the pipeline's rate limiter (set to the same limits) keeps
    // under them, its callers waiting or moving on instead.
    assert!(none.limit_429s > 0, "the burst never reached the limits");
    assert!(
        pipe.limit_429s * 10 <= none.limit_429s,
        "pipeline met {} of the primary's limit 429s, the bare client {}",
        pipe.limit_429s,
        none.limit_429s
    );
    assert!(naive.limit_429s > none.limit_429s, "naive retries pile on");
    let claim = report
        .claims()
        .into_iter()
        .find(|c| c.claim.starts_with("a rate limit"))
        .unwrap();
    assert!(claim.holds, "{}", claim.measured);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_transient_errors_the_pipeline_answers_99_percent() {
    let report = run(&StormConfig::compressed(5, Scenario::Steady), |_| {})
        .await
        .unwrap();
    println!("{}", report.table());
    let pipe = report.get("pipeline").unwrap();
    let none = report.get("none").unwrap();
    assert!(pipe.success_rate() >= 0.99, "{}", pipe.success_rate());
    assert!(
        none.success_rate() < 0.95,
        "the scenario injects about 10 % failures"
    );
    assert!(report.results.iter().all(|r| r.lost == 0));
}
