//! Executor events per second and device commands per second, each against
//! a plain binary-heap event loop doing the same number of events in the same
//! process. Criterion reports each throughput; the ratios are printed last,
//! from interleaved runs so that machine noise hits both sides alike.
//!
//! `cargo bench -p sim --bench world`

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use engine::env::{Bio, Env, SwitchPoint, TaskKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sim::device::{Device, DeviceConfig};
use sim::memory::MemoryConfig;
use sim::world::{Stop, World, WorldConfig};

const TASKS: u64 = 8;
const EVENTS_PER_TASK: u64 = 5_000;
const EVENTS: u64 = TASKS * EVENTS_PER_TASK;
const COMMANDS: u64 = 20_000;

/// The baseline: pop the earliest (time, task), push its next wake-up.
fn heap_loop(events: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut heap = BinaryHeap::new();
    for task in 0..TASKS {
        heap.push(Reverse((rng.random_range(0..1_000u64), task)));
    }
    let mut done = 0;
    while let Some(Reverse((time, task))) = heap.pop() {
        done += 1;
        if done == events {
            return black_box(time);
        }
        heap.push(Reverse((time + rng.random_range(1..1_000u64), task)));
    }
    unreachable!()
}

/// Tasks on the executor that sleep and pass a switch point per event.
fn executor_run() -> u64 {
    let config = WorldConfig {
        memory: MemoryConfig { kswapd: None, flusher: None, ..MemoryConfig::default() },
        ..WorldConfig::default()
    };
    let world = World::new(1, config, None, false);
    for task in 0..TASKS {
        let env: Rc<dyn Env> = world.env();
        let spawn_env = env.clone();
        spawn_env.spawn(
            &format!("sleeper{task}"),
            TaskKind::Workload,
            Box::pin(async move {
                for i in 0..EVENTS_PER_TASK {
                    env.sleep(1 + (i * 7919 + task * 104_729) % 1_000).await;
                    env.switch_point(SwitchPoint::CondResched).await;
                }
            }),
        );
    }
    assert_eq!(world.run(None), Stop::WorkloadDone);
    black_box(world.trace_hash())
}

/// Random 4 KiB reads and writes, with a flush every 64, straight into the model.
fn device_run() -> u64 {
    let mut device = Device::new(DeviceConfig::default(), ChaCha8Rng::seed_from_u64(2));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (mut now, mut completed) = (0u64, 0u64);
    for id in 0..COMMANDS {
        let offset_bytes = rng.random_range(0..16_384u64) * 4096;
        let bio = match id % 64 {
            63 => Bio::Flush,
            n if n % 3 == 0 => Bio::Read { offset_bytes, len_bytes: 4096 },
            _ => Bio::Write { offset_bytes, data: vec![id as u8; 4096], fua: false, preflush: false },
        };
        device.submit(now, id, bio);
        while device.in_flight() >= 32 {
            now = device.next_event_ns().expect("commands in flight have events");
            completed += device.advance(now).len() as u64;
        }
    }
    while let Some(next) = device.next_event_ns() {
        now = next;
        completed += device.advance(now).len() as u64;
    }
    assert_eq!(completed, COMMANDS);
    black_box(now)
}

fn median_of(runs: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

fn ratio(name: &str, count: u64, subject: impl Fn() -> u64, baseline_count: u64) {
    let mut subject_times = Vec::new();
    let mut baseline_times = Vec::new();
    for _ in 0..7 {
        subject_times.extend(median_of(1, || {
            subject();
        }));
        baseline_times.extend(median_of(1, || {
            heap_loop(baseline_count);
        }));
    }
    subject_times.sort();
    baseline_times.sort();
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    let subject_rate = rate(count, subject_times[3]);
    let baseline_rate = rate(baseline_count, baseline_times[3]);
    println!(
        "{name}: {:.2} M/s vs binary-heap loop {:.2} M events/s: ratio {:.3}",
        subject_rate / 1e6,
        baseline_rate / 1e6,
        subject_rate / baseline_rate
    );
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("world");
    group.throughput(Throughput::Elements(EVENTS));
    group.bench_function("heap_loop_events", |b| b.iter(|| heap_loop(EVENTS)));
    group.bench_function("executor_events", |b| b.iter(executor_run));
    group.throughput(Throughput::Elements(COMMANDS));
    group.bench_function("device_commands", |b| b.iter(device_run));
    group.finish();
    criterion.final_summary();
    ratio("executor events", EVENTS, executor_run, EVENTS);
    ratio("device commands", COMMANDS, device_run, COMMANDS);
}
