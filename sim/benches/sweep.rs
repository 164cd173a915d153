//! Seeds per second of `sim sweep` on cow-amplification (fix none) with one
//! and with two jobs, and the speed-up of two jobs over one measured in the
//! same process. Each seed runs on a fresh thread and appends its line to
//! `results.jsonl`, as a real sweep does.
//!
//! `cargo bench -p sim --bench sweep`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use engine::fix::FixPolicy;
use sim::report::SeedRange;
use sim::sweep::{Quiet, Shard, SweepSpec, sweep};

const SEEDS: u64 = 8;

fn sweep_once(jobs: usize) {
    let out: PathBuf = std::env::temp_dir().join(format!("cowsim-bench-sweep-{}-{jobs}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let spec = SweepSpec {
        scenario: "cow-amplification".to_string(),
        seeds: SeedRange { start: 0, end: SEEDS },
        fix: FixPolicy::None,
        jobs,
        shard: Shard::WHOLE,
        swarm: false,
        canary: 0.0,
        out: out.clone(),
        resume: false,
    };
    let outcome = sweep(&spec, &mut Quiet).expect("the sweep runs");
    assert_eq!(outcome.summary.seeds_run, SEEDS);
    let _ = std::fs::remove_dir_all(&out);
}

fn timed(jobs: usize) -> Duration {
    let start = Instant::now();
    sweep_once(jobs);
    start.elapsed()
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args().sample_size(10);
    let mut group = criterion.benchmark_group("sweep");
    group.throughput(Throughput::Elements(SEEDS));
    group.bench_function("cow-amplification_jobs1", |b| b.iter(|| sweep_once(1)));
    group.bench_function("cow-amplification_jobs2", |b| b.iter(|| sweep_once(2)));
    group.finish();
    criterion.final_summary();

    // Interleaved, so that machine noise hits both sides alike.
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        one.push(timed(1));
        two.push(timed(2));
    }
    one.sort();
    two.sort();
    let rate = |d: Duration| SEEDS as f64 / d.as_secs_f64();
    let (one, two) = (rate(one[2]), rate(two[2]));
    println!(
        "sweep: cow-amplification {one:.2} seeds/s with 1 job, {two:.2} seeds/s with 2 jobs \
         ({SEEDS} seeds, fix none, median of 5): 2 jobs / 1 job = {:.2}",
        two / one
    );
}
