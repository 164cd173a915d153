//! The runner owns the seed: it derives every option from it, builds the
//! world, starts the scenario, cuts power where the fault profile says, and
//! collects the outcome.

use std::time::Instant;

use engine::fix::FixPolicy;
use scenarios::{Scenario, StartContext};
use serde::{Deserialize, Serialize};

use crate::scheduler::Strategy;
use crate::trace::{Record, format_hash};
use crate::world::{Stop, ViolationRecord, World, WorldConfig};

/// What to run. `params` and `world` default to what the seed derives.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub scenario: String,
    pub seed: u64,
    pub fix: FixPolicy,
    pub params: Option<serde_json::Value>,
    pub world: Option<WorldConfig>,
    pub decision_log: Option<Vec<u32>>,
    /// Overrides the scheduling strategy of the derived configuration.
    pub scheduler: Option<Strategy>,
    /// Keep every trace record (for `check-determinism`).
    pub keep_trace: bool,
    /// Without `params`: draw a swarm world for the seed ([`crate::swarm`]).
    pub swarm: bool,
}

impl RunSpec {
    pub fn new(scenario: &str, seed: u64, fix: FixPolicy) -> Self {
        Self {
            scenario: scenario.to_string(),
            seed,
            fix,
            params: None,
            world: None,
            decision_log: None,
            scheduler: None,
            keep_trace: false,
            swarm: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Violation,
}

/// Everything a run produced. Serializes to the `--json` object.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub seed: u64,
    pub scenario: String,
    pub fix: String,
    pub outcome: Outcome,
    pub violations: Vec<ViolationRecord>,
    pub trace_hash: String,
    pub trace_events: u64,
    pub ops_completed: u64,
    pub sim_time_ns: u64,
    /// Wall-clock time of the run; never part of a trace or a snapshot.
    pub wall_ms: u64,
    /// Wall-clock time from the start until the first violation was
    /// reported (to within a millisecond of simulated time); wall-clock too.
    pub first_violation_wall_ms: Option<u64>,
    pub power_loss: bool,
    pub stats: serde_json::Value,
    pub config: RunConfig,
    /// The command that reproduces this run.
    pub replay_command: String,
    #[serde(skip)]
    pub decision_log: Vec<u32>,
    #[serde(skip)]
    pub records: Option<Vec<Record>>,
}

/// The full derived configuration of a run, printed with it and stored in seed files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub world: WorldConfig,
    pub params: serde_json::Value,
}

/// The world configuration for a scenario's parameters: defaults with the
/// scenario's `world` overrides (a JSON object merged field by field).
pub fn derive_world_config(params: &serde_json::Value) -> Result<WorldConfig, String> {
    let mut world = serde_json::to_value(WorldConfig::default()).expect("config serializes");
    if let Some(overrides) = params.get("world") {
        merge(&mut world, overrides);
    }
    serde_json::from_value(world).map_err(|e| format!("bad world configuration: {e}"))
}

/// Merge `overrides` into `base` field by field (objects recursively).
pub fn merge(base: &mut serde_json::Value, overrides: &serde_json::Value) {
    match (base, overrides) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overrides)) => {
            for (key, value) in overrides {
                match base.get_mut(key) {
                    Some(slot) if slot.is_object() && value.is_object() => merge(slot, value),
                    _ => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, overrides) => *base = overrides.clone(),
    }
}

/// Run one seed of `scenario`. An error is bad input (parameters that do not
/// parse, a scenario that refuses them), never a violation.
pub fn run(spec: &RunSpec, scenario: &dyn Scenario) -> Result<RunResult, String> {
    let started = Instant::now();
    let params = spec.params.clone().unwrap_or_else(|| {
        if spec.swarm { crate::swarm::params(scenario, spec.seed) } else { scenario.configure(spec.seed) }
    });
    let mut world_config = match &spec.world {
        Some(world) => world.clone(),
        None => derive_world_config(&params)?,
    };
    if let Some(strategy) = spec.scheduler {
        world_config.scheduler = strategy;
    }
    let world = World::new(spec.seed, world_config.clone(), spec.decision_log.clone(), spec.keep_trace);
    let context = StartContext { seed: spec.seed, fix: spec.fix, env: world.env(), params: params.clone() };
    let mut scenario_run = scenario.start(context)?;
    let mut first_violation_wall_ms = None;
    let mut stop = run_until_power_loss(&world, &*scenario_run, || {
        if first_violation_wall_ms.is_none() && world.violation_count() > 0 {
            first_violation_wall_ms = Some(started.elapsed().as_millis() as u64);
        }
    });
    let power_loss = scenario_run.power_loss_at_ns().is_some() && stop != Stop::Violation;
    if power_loss {
        // The power goes at the drawn time, or when the workload ended if that came first.
        world.power_loss();
        scenario_run.after_power_loss(world.env());
        stop = world.run(None);
    }
    let report = scenario_run.finish(&*world.env());
    let violations = world.violations();
    if first_violation_wall_ms.is_none() && !violations.is_empty() {
        first_violation_wall_ms = Some(started.elapsed().as_millis() as u64);
    }
    debug_assert!(
        stop != Stop::Violation || !violations.is_empty(),
        "stopped for a violation nobody reported"
    );
    let mut stats = world.stats();
    let mut scenario_stats = report.stats;
    // Sections the engine defines sit beside the world's: stats.trees.<name>.
    for section in ["trees", "searches", "handles", "space", "extent_buffers", "extent_refs", "transaction"] {
        if let Some(value) = scenario_stats.as_object_mut().and_then(|s| s.remove(section)) {
            stats[section] = value;
        }
    }
    stats["scenario"] = scenario_stats;
    let result = Ok(RunResult {
        seed: spec.seed,
        scenario: scenario.name().to_string(),
        fix: spec.fix.name().to_string(),
        outcome: if violations.is_empty() { Outcome::Pass } else { Outcome::Violation },
        violations,
        trace_hash: format_hash(world.trace_hash()),
        trace_events: world.trace_events(),
        ops_completed: report.ops_completed,
        sim_time_ns: world.now(),
        wall_ms: started.elapsed().as_millis() as u64,
        first_violation_wall_ms,
        power_loss,
        stats,
        config: RunConfig { world: world_config, params },
        replay_command: replay_command(spec),
        decision_log: world.decision_log(),
        records: world.take_trace_records(),
    });
    drop(scenario_run);
    world.shutdown();
    result
}

/// Longest stretch of simulated time run before the scenario's power-loss
/// time is read again (a scenario may arm it once its setup is done).
const POWER_LOSS_POLL_NS: u64 = 1_000_000;

/// Run until the workload ends, a violation, or the power-loss time,
/// calling `after_slice` after every slice.
fn run_until_power_loss(
    world: &World,
    scenario_run: &dyn scenarios::ScenarioRun,
    mut after_slice: impl FnMut(),
) -> Stop {
    loop {
        let target = scenario_run.power_loss_at_ns();
        let slice_end = world.now().saturating_add(POWER_LOSS_POLL_NS);
        let stop = world.run(Some(target.map_or(slice_end, |at| at.min(slice_end))));
        after_slice();
        let due = target.is_some_and(|at| world.now() >= at);
        if stop != Stop::TimeReached || due {
            return stop;
        }
    }
}

/// The command that reproduces a run of `spec`.
pub fn replay_command(spec: &RunSpec) -> String {
    let mut command = format!(
        "cargo run --release --bin sim -- run --scenario {} --seed {} --fix {}",
        spec.scenario, spec.seed, spec.fix
    );
    match spec.scheduler {
        Some(Strategy::Random) => command.push_str(" --scheduler random"),
        Some(Strategy::Pct { depth, steps }) => {
            command.push_str(&format!(" --scheduler pct:{depth}:{steps}"))
        }
        None => {}
    }
    if spec.swarm {
        command.push_str(" --swarm");
    }
    command
}
