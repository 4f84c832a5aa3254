//! `storm`: what each resilience pattern buys an LLM agent, measured against
//! mock LLM servers on loopback, with a table, the claims checked, and a
//! picture.
//!
//! ```text
//! cargo run --release --example storm --features reqwest,testing
//! cargo run --release --example storm --features reqwest,testing -- --help
//! ```

#[cfg(all(feature = "reqwest", feature = "testing"))]
mod storm {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use indicatif::{ProgressBar, ProgressStyle};
    use llm_resilience::testing::storm::{run, Scenario, StormConfig, StormReport};
    use llm_resilience::BoxError;
    use plotters::prelude::*;

    const HELP: &str =
        "storm: what queues, retries, budgets, breakers, rate limits and fallback buy an LLM agent

Starts two mock LLM providers on loopback with a seeded timeline (steady 10 %
transient errors, a burst above the primary's requests- and tokens-per-minute
limits, which it enforces per second, a 429 storm with
Retry-After, an outage of the primary and its recovery, a latency spike, an
exhausted quota, a few context-length errors) and drives the same seeded
workload through four configurations side by side: none (the bare client),
naive (immediate retries, no budget), backoff (retry with backoff, jitter,
server hints and a budget), pipeline (the whole AgentPipeline, with a
token-aware rate limit at the primary's limits).

Options:
  --seed N          the workload's and the faults' seed (default 1)
  --duration SECS   how long requests arrive (default 30)
  --rps N           requests per second offered, three times that in the burst (default 40)
  --scenario NAME   all, steady, burst, storm or outage (default all)
  --out DIR         where storm.svg and storm.json go (default target/storm)
  --json            print the table as JSON instead of text
  --help            this text";

    struct Args {
        config: StormConfig,
        out: PathBuf,
        json: bool,
    }

    fn args() -> Result<Option<Args>, String> {
        let mut config = StormConfig::new(1);
        let mut out = PathBuf::from("target/storm");
        let mut json = false;
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
            match a.as_str() {
                "--help" | "-h" => return Ok(None),
                "--json" => json = true,
                "--seed" => {
                    config.seed = value("--seed")?
                        .parse()
                        .map_err(|e| format!("--seed: {e}"))?
                }
                "--duration" => {
                    let secs: f64 = value("--duration")?
                        .parse()
                        .map_err(|e| format!("--duration: {e}"))?;
                    if !(1.0..=3600.0).contains(&secs) {
                        return Err("--duration must be 1 to 3600 seconds".into());
                    }
                    config.duration = Duration::from_secs_f64(secs);
                }
                "--rps" => {
                    let rps: f64 = value("--rps")?.parse().map_err(|e| format!("--rps: {e}"))?;
                    if !(0.1..=2000.0).contains(&rps) {
                        return Err("--rps must be 0.1 to 2000".into());
                    }
                    config.rps = rps;
                }
                "--scenario" => {
                    let name = value("--scenario")?;
                    config.scenario = Scenario::from_name(&name).ok_or_else(|| {
                        format!("--scenario must be one of {:?}", Scenario::NAMES)
                    })?;
                }
                "--out" => out = PathBuf::from(value("--out")?),
                other => return Err(format!("unknown option {other} (try --help)")),
            }
        }
        Ok(Some(Args { config, out, json }))
    }

    pub fn main() -> Result<(), BoxError> {
        let args = match args() {
            Ok(Some(a)) => a,
            Ok(None) => {
                println!("{HELP}");
                return Ok(());
            }
            Err(e) => {
                eprintln!("storm: {e}");
                std::process::exit(2);
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let bar = ProgressBar::new(1000);
        bar.set_style(
            ProgressStyle::with_template("{spinner} storm {bar:40} {percent:>3}% {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        if args.json {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let b = bar.clone();
        let report = rt.block_on(run(&args.config, move |f| {
            b.set_position((f * 1000.0) as u64)
        }))?;
        bar.finish_and_clear();
        std::fs::create_dir_all(&args.out)?;
        let json = serde_json::to_string_pretty(&report.to_json())?;
        std::fs::write(args.out.join("storm.json"), &json)?;
        let svg = args.out.join("storm.svg");
        draw(&report, &svg)?;
        if args.json {
            println!("{json}");
            return Ok(());
        }
        println!(
            "storm: seed {}, {} s at {} req/s ({} requests), scenario {}\n",
            report.seed,
            report.duration.as_secs_f64(),
            report.rps,
            report.requests,
            report.scenario
        );
        print!("{}", report.table());
        println!("\nThe claims, against these numbers:");
        for c in report.claims() {
            println!(
                "  [{}] {}\n        {}",
                if c.holds { "holds" } else { "FAILS" },
                c.claim,
                c.measured
            );
        }
        println!(
            "\npicture: {}   data: {}",
            svg.display(),
            args.out.join("storm.json").display()
        );
        Ok(())
    }

    /// One panel per configuration: offered load, upstream calls and errors
    /// per second; for the pipeline, the primary's breaker and the queue.
    fn draw(report: &StormReport, path: &Path) -> Result<(), BoxError> {
        let root =
            SVGBackend::new(path, (1000, 260 * report.results.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((report.results.len(), 1));
        let secs = report.duration.as_secs() as u32 + 1;
        let top = report
            .results
            .iter()
            .flat_map(|r| r.series.upstream.iter().chain(&r.series.offered))
            .copied()
            .max()
            .unwrap_or(1)
            .max(1) as f64
            * 1.1;
        for (r, panel) in report.results.iter().zip(panels) {
            let mut chart = ChartBuilder::on(&panel)
                .caption(
                    format!(
                        "{}: {:.1} % answered, {} upstream calls, {} into the outage",
                        r.name,
                        r.success_rate() * 100.0,
                        r.upstream_calls,
                        r.outage_calls
                    ),
                    ("sans-serif", 16),
                )
                .margin(8)
                .x_label_area_size(24)
                .y_label_area_size(44)
                .build_cartesian_2d(0u32..secs, 0f64..top)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .y_desc("per second")
                .draw()?;
            let line = |v: &[u64]| -> Vec<(u32, f64)> {
                v.iter()
                    .enumerate()
                    .map(|(i, &n)| (i as u32, n as f64))
                    .collect()
            };
            chart
                .draw_series(LineSeries::new(
                    line(&r.series.offered),
                    BLACK.stroke_width(1),
                ))?
                .label("offered")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
            chart
                .draw_series(LineSeries::new(
                    line(&r.series.upstream),
                    BLUE.stroke_width(2),
                ))?
                .label("upstream calls")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
            chart
                .draw_series(LineSeries::new(
                    line(&r.series.upstream_errors),
                    RED.stroke_width(2),
                ))?
                .label("upstream errors")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
            if !r.series.breaker.is_empty() {
                let scale = top / 2.5;
                let b: Vec<(u32, f64)> = r
                    .series
                    .breaker
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| (i as u32, s as f64 * scale))
                    .collect();
                chart
                    .draw_series(LineSeries::new(b, MAGENTA.stroke_width(2)))?
                    .label("primary breaker (low closed, mid half-open, high open)")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], MAGENTA));
                chart
                    .draw_series(LineSeries::new(
                        line(&r.series.queue_depth),
                        GREEN.stroke_width(2),
                    ))?
                    .label("queue depth")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], GREEN));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

#[cfg(all(feature = "reqwest", feature = "testing"))]
fn main() -> Result<(), llm_resilience::BoxError> {
    storm::main()
}

#[cfg(not(all(feature = "reqwest", feature = "testing")))]
fn main() {
    eprintln!("run with --features reqwest,testing");
}
