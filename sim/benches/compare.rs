//! Seeds per second of `sim compare` (one job, fix `none`: one run per seed)
//! on the scenario under study (`cow-amplification` when it is registered,
//! else `fs-crash`), as a ratio against the same seeds of `device-stress` in
//! the same process. Only the unfixed kernel is timed: a fix that makes a
//! seed run to a liveness limit would time the limit, not the simulation.
//!
//! `cargo bench -p sim --bench compare`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use engine::fix::FixPolicy;
use sim::compare::{CompareSpec, compare};
use sim::report::SeedRange;

const SEEDS: u64 = 8;
const BASELINE: &str = "device-stress";

fn spec(scenario: &str) -> CompareSpec {
    CompareSpec {
        scenario: scenario.to_string(),
        seeds: SeedRange { start: 0, end: SEEDS },
        fixes: vec![FixPolicy::None],
        jobs: 1,
    }
}

fn compare_run(spec: &CompareSpec) {
    let comparison = compare(spec).expect("the comparison runs");
    assert!(comparison.fixes.iter().all(|row| row.seeds_run == SEEDS));
    black_box(comparison);
}

fn median(mut f: impl FnMut(), runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    let scenario =
        if scenarios::by_name("cow-amplification").is_ok() { "cow-amplification" } else { "fs-crash" };
    let subject = spec(scenario);
    let baseline = spec(BASELINE);
    let mut criterion = Criterion::default().configure_from_args().sample_size(10);
    let mut group = criterion.benchmark_group("compare");
    group.throughput(Throughput::Elements(SEEDS));
    group.bench_function(format!("{scenario}_seeds"), |b| b.iter(|| compare_run(&subject)));
    group.bench_function(format!("{BASELINE}_seeds"), |b| b.iter(|| compare_run(&baseline)));
    group.finish();
    criterion.final_summary();

    // Interleaved, so that machine noise hits both sides alike.
    let (mut subject_times, mut baseline_times) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        subject_times.push(median(|| compare_run(&subject), 1));
        baseline_times.push(median(|| compare_run(&baseline), 1));
    }
    subject_times.sort();
    baseline_times.sort();
    let rate = |d: Duration| SEEDS as f64 / d.as_secs_f64();
    let (subject_rate, baseline_rate) = (rate(subject_times[2]), rate(baseline_times[2]));
    println!(
        "compare: {scenario} {subject_rate:.1} seeds/s vs {BASELINE} {baseline_rate:.1} seeds/s \
         ({SEEDS} seeds, fix none, 1 job): ratio {:.4}",
        subject_rate / baseline_rate
    );
}
