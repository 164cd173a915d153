//! One seed determines a run; two seeds differ; a planted nondeterminism is caught.

use std::collections::HashMap;
use std::rc::Rc;

use engine::env::{Bio, Env, SwitchPoint, TaskKind};
use engine::fix::FixPolicy;
use engine::wait::Completion;
use scenarios::{Scenario, ScenarioReport, ScenarioRun, StartContext};
use sim::determinism::check_seed;
use sim::runner::{RunSpec, run};

fn spec(seed: u64) -> RunSpec {
    RunSpec::new("device-stress", seed, FixPolicy::None)
}

#[test]
fn same_seed_same_trace_and_different_seeds_differ() {
    let scenario = scenarios::by_name("device-stress").unwrap();
    let a = run(&spec(7), &*scenario).unwrap();
    let b = run(&spec(7), &*scenario).unwrap();
    let c = run(&spec(8), &*scenario).unwrap();
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.ops_completed, b.ops_completed);
    assert_eq!(a.sim_time_ns, b.sim_time_ns);
    assert_ne!(a.trace_hash, c.trace_hash);
    assert!(a.trace_events > 100, "a run should do real work, got {} events", a.trace_events);
}

#[test]
fn check_determinism_passes_on_many_seeds() {
    let scenario = scenarios::by_name("device-stress").unwrap();
    for seed in 0..40 {
        assert!(check_seed(&spec(seed), &*scenario).unwrap().is_none(), "seed {seed}");
    }
}

#[test]
fn replaying_the_decision_log_reproduces_the_run() {
    let scenario = scenarios::by_name("device-stress").unwrap();
    for seed in 0..10 {
        let first = run(&spec(seed), &*scenario).unwrap();
        let mut replay = spec(seed);
        replay.decision_log = Some(first.decision_log.clone());
        let second = run(&replay, &*scenario).unwrap();
        assert_eq!(first.trace_hash, second.trace_hash, "seed {seed}");
    }
}

#[test]
fn a_wrong_decision_log_is_reported_not_followed() {
    let scenario = scenarios::by_name("device-stress").unwrap();
    // Find a seed whose run needs decisions (several writers).
    let (seed, log) = (0..50)
        .map(|seed| (seed, run(&spec(seed), &*scenario).unwrap().decision_log))
        .find(|(_, log)| log.len() > 4)
        .expect("some seed has concurrent writers");
    let mut bad = spec(seed);
    bad.decision_log = Some(log.iter().map(|&t| t + 1000).collect());
    let result = run(&bad, &*scenario).unwrap();
    assert_eq!(result.violations[0].kind, "replay_mismatch");
}

/// Orders its writes by iterating a std HashMap: a different order in every
/// process and every map, the classic leak of nondeterminism.
struct HashMapOrdered;

struct Nothing;

impl ScenarioRun for Nothing {
    fn power_loss_at_ns(&self) -> Option<u64> {
        None
    }
    fn after_power_loss(&mut self, _env: Rc<dyn Env>) {}
    fn finish(&mut self, _env: &dyn Env) -> ScenarioReport {
        ScenarioReport::default()
    }
}

impl Scenario for HashMapOrdered {
    fn name(&self) -> &'static str {
        "planted-nondeterminism"
    }
    fn description(&self) -> &'static str {
        "test only"
    }
    fn configure(&self, _seed: u64) -> serde_json::Value {
        serde_json::json!({})
    }
    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        let env = context.env.clone();
        let work = async move {
            let offsets: HashMap<u64, u64> = (0..32).map(|i| (i, i * 4096)).collect();
            for (_, offset) in offsets {
                let done = Completion::new();
                let signal = done.clone();
                env.submit_bio(
                    Bio::Write { offset_bytes: offset, data: vec![1; 4096], fua: false, preflush: false },
                    Box::new(move |_| signal.complete(())),
                );
                done.await;
                env.switch_point(SwitchPoint::Workload).await;
            }
        };
        context.env.spawn("hashmap-writer", TaskKind::Workload, Box::pin(work));
        Ok(Box::new(Nothing))
    }
}

#[test]
fn check_determinism_catches_a_planted_hashmap_order() {
    let spec = RunSpec::new("planted-nondeterminism", 1, FixPolicy::None);
    let divergence = check_seed(&spec, &HashMapOrdered).unwrap().expect("HashMap order must be caught");
    let text = divergence.to_string();
    assert!(text.contains("diverges at trace event"), "{text}");
    assert!(divergence.first.is_some() && divergence.second.is_some(), "{text}");
    assert_ne!(divergence.first, divergence.second);
}
