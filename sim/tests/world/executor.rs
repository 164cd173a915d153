//! The executor's liveness reports and scheduling strategies.

use std::rc::Rc;

use engine::env::{Env, SwitchPoint, TaskKind, TraceEvent, WaitOn};
use engine::fix::FixPolicy;
use engine::wait::Completion;
use sim::memory::MemoryConfig;
use sim::runner::{RunSpec, run};
use sim::scheduler::Strategy;
use sim::world::{Stop, World, WorldConfig};

fn no_daemons() -> MemoryConfig {
    MemoryConfig { kswapd: None, flusher: None, ..MemoryConfig::default() }
}

/// Two tasks that each wait for the other's completion: an AB-BA deadlock.
fn spawn_deadlock(env: &Rc<dyn Env>) {
    let (a, b) = (Completion::<()>::new(), Completion::<()>::new());
    for (name, wait, signal) in [("left", a.clone(), b.clone()), ("right", b, a)] {
        let task_env = env.clone();
        env.spawn(
            name,
            TaskKind::Workload,
            Box::pin(async move {
                task_env.wait_on(WaitOn::Other(if name == "left" {
                    "right's signal"
                } else {
                    "left's signal"
                }));
                wait.await;
                signal.complete(());
            }),
        );
    }
}

#[test]
fn a_deadlock_is_reported_naming_each_task_and_its_wait() {
    let config = WorldConfig { memory: no_daemons(), ..WorldConfig::default() };
    let world = World::new(1, config, None, false);
    spawn_deadlock(&world.env());
    assert_eq!(world.run(None), Stop::Violation);
    let violation = &world.violations()[0];
    assert_eq!(violation.kind, "deadlock");
    assert!(violation.message.contains("(left) waits on Other(\"right's signal\")"), "{}", violation.message);
    assert!(violation.message.contains("(right) waits on Other(\"left's signal\")"), "{}", violation.message);
}

#[test]
fn with_daemons_still_ticking_a_deadlock_is_reported_as_a_stall() {
    let config = WorldConfig { stall_timeout_ns: 2_000_000_000, ..WorldConfig::default() };
    let world = World::new(1, config, None, false);
    spawn_deadlock(&world.env());
    assert_eq!(world.run(None), Stop::Violation);
    let violation = &world.violations()[0];
    assert_eq!(violation.kind, "stall");
    assert!(violation.message.contains("(left) waits on"), "{}", violation.message);
    assert!(world.now() >= 2_000_000_000 && world.now() < 10_000_000_000, "stopped at {}", world.now());
}

/// A task that finishes one operation and then keeps running (sleeping and
/// yielding, never blocked) without finishing another: a livelock, caught
/// once no operation finished for `progress_timeout_ns`.
#[test]
fn a_task_that_runs_without_finishing_operations_is_no_progress() {
    let config =
        WorldConfig { memory: no_daemons(), progress_timeout_ns: 5_000_000_000, ..WorldConfig::default() };
    let world = World::new(1, config, None, false);
    let env = world.env();
    let task_env = env.clone();
    env.spawn(
        "spinner",
        TaskKind::Workload,
        Box::pin(async move {
            task_env.trace(TraceEvent::Op { name: "create", errno: 0 });
            loop {
                task_env.sleep(1_000_000).await;
                task_env.switch_point(SwitchPoint::Workload).await;
            }
        }),
    );
    assert_eq!(world.run(None), Stop::Violation);
    let violation = &world.violations()[0];
    assert_eq!(violation.kind, "no_progress");
    assert!(violation.message.contains("no operation finished in 5000000000 ns"), "{}", violation.message);
    assert!(violation.message.contains("(spinner)"), "{}", violation.message);
    assert!(world.now() > 5_000_000_000 && world.now() < 5_100_000_000, "stopped at {}", world.now());
}

#[test]
fn pct_runs_are_deterministic_and_schedule_differently_from_random() {
    let scenario = scenarios::by_name("device-stress").unwrap();
    let mut differ = 0;
    for seed in 0..20 {
        let mut pct = RunSpec::new("device-stress", seed, FixPolicy::None);
        pct.scheduler = Some(Strategy::Pct { depth: 3, steps: 200 });
        let a = run(&pct, &*scenario).unwrap();
        let b = run(&pct, &*scenario).unwrap();
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert!(a.replay_command.contains("--scheduler pct:3:200"), "{}", a.replay_command);
        let random = run(&RunSpec::new("device-stress", seed, FixPolicy::None), &*scenario).unwrap();
        differ += usize::from(random.trace_hash != a.trace_hash);
    }
    assert!(differ >= 10, "PCT should change most schedules, changed {differ} of 20");
}

/// A daemon that never ends holds the world through its `Env`, and the world
/// holds its future: `shutdown` breaks the cycle, so a sweep of thousands of
/// runs in one process does not keep every run's memory.
#[test]
fn shutdown_frees_the_world_that_its_tasks_hold() {
    let world = World::new(1, WorldConfig::default(), None, false);
    let env = world.env();
    let task_env = env.clone();
    env.spawn(
        "forever",
        TaskKind::Daemon,
        Box::pin(async move {
            loop {
                task_env.sleep(1_000_000).await;
            }
        }),
    );
    drop(env);
    // No workload task: the run ends at once, the daemon still pending.
    assert_eq!(world.run(Some(10_000_000)), Stop::WorkloadDone);
    let weak = Rc::downgrade(&world);
    world.shutdown();
    drop(world);
    assert!(weak.upgrade().is_none(), "the world outlived its run");
}
