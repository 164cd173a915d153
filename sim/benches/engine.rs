//! Creates per second in simulation: N creates in one directory through the
//! whole engine (search, COW, splits, delayed items, one commit), compared in
//! the same process with the same creates applied to the in-memory POSIX
//! model. The fixed cost of mkfs, mount, the commit and the offline check is
//! measured with an empty workload and taken off.
//!
//! `cargo bench -p sim --bench engine`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use engine::fix::FixPolicy;
use scenarios::fs_ops::Model;
use scenarios::workload::{Op, parse};
use sim::runner::{Outcome, RunSpec, run};

const CREATES: usize = 20_000;

fn workload(creates: usize) -> String {
    let mut text = String::from("mkdir d\n");
    for i in 0..creates {
        text.push_str(&format!("create d/f{i:06}\n"));
    }
    text + "sync\n"
}

fn engine_run(text: &str) {
    let scenario = scenarios::by_name("workload").unwrap();
    let mut spec = RunSpec::new("workload", 0, FixPolicy::None);
    spec.params = Some(scenarios::fs_workload::FsWorkload::params(text, 16384));
    let result = run(&spec, &*scenario).unwrap();
    assert_eq!(result.outcome, Outcome::Pass);
    black_box(result.trace_hash);
}

fn model_run(ops: &[Op]) {
    let mut model = Model::default();
    for op in ops {
        assert!(model.apply(op));
    }
    black_box(model);
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
    let full = workload(CREATES);
    let empty = workload(0);
    let ops = parse(&full).unwrap();
    let mut criterion = Criterion::default().configure_from_args().sample_size(10);
    let mut group = criterion.benchmark_group("engine");
    group.throughput(Throughput::Elements(CREATES as u64));
    group.bench_function("creates", |b| b.iter(|| engine_run(&full)));
    group.bench_function("model_creates", |b| b.iter(|| model_run(&ops)));
    group.finish();
    criterion.final_summary();

    let fixed = median(|| engine_run(&empty), 5);
    let engine = median(|| engine_run(&full), 5).saturating_sub(fixed);
    let model = median(|| model_run(&ops), 5);
    let rate = |d: Duration| CREATES as f64 / d.as_secs_f64();
    println!(
        "creates: {:.0}/s in the engine (fixed cost {:.1} ms taken off) vs {:.0}/s in the POSIX model: ratio {:.4}",
        rate(engine),
        fixed.as_secs_f64() * 1e3,
        rate(model),
        rate(engine) / rate(model)
    );
}
