//! cowsim scenarios: workloads, fault profiles and oracles.
//!
//! A scenario knows the engine and the environment interface, never the
//! simulator: it spawns its tasks through [`engine::env::Env`], checks what it
//! can observe through the same interface, and reports broken invariants as
//! violations. The runner in `sim` owns the seed, the world and the clock.

pub mod cow_amplification;
pub mod device_stress;
pub mod fs_crash;
pub mod fs_ops;
pub mod fs_workload;
pub mod fsstress;
pub mod streams;
pub mod workload;

use std::rc::Rc;

use engine::env::Env;
use engine::fix::FixPolicy;

/// What a run of a scenario is told when it starts.
pub struct StartContext {
    pub seed: u64,
    pub fix: FixPolicy,
    pub env: Rc<dyn Env>,
    /// The scenario's parameters as [`Scenario::configure`] derived them (or
    /// as a seed file recorded them).
    pub params: serde_json::Value,
}

/// What a finished run reports besides its violations.
#[derive(Clone, Debug, Default)]
pub struct ScenarioReport {
    pub ops_completed: u64,
    /// Scenario-specific statistics, shown under `stats.scenario`.
    pub stats: serde_json::Value,
}

pub trait Scenario {
    fn name(&self) -> &'static str;
    fn description(&self) -> &'static str;
    /// Draw this scenario's parameters from the seed (its own streams).
    fn configure(&self, seed: u64) -> serde_json::Value;
    /// Spawn the workload. A bad parameter set is an error, not a panic.
    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String>;
    /// Smaller variants of `params` for `sim shrink` (fewer tasks, fewer
    /// operations, no power loss...), most promising first; each must be
    /// strictly smaller in some measure, so that shrinking ends. None by default.
    fn shrink(&self, params: &serde_json::Value) -> Vec<serde_json::Value> {
        let _ = params;
        Vec::new()
    }
}

/// One running instance of a scenario.
pub trait ScenarioRun {
    /// Simulated time at which the fault profile cuts power, if it does.
    /// It may change as the run goes on (a scenario arms it once its setup
    /// is done); the runner reads it again at least every simulated
    /// millisecond. If the workload ends first, power is cut then.
    fn power_loss_at_ns(&self) -> Option<u64>;
    /// The world lost power: every task and cached object is gone and the
    /// device holds what survived. Spawn recovery and its oracles on `env`.
    fn after_power_loss(&mut self, env: Rc<dyn Env>);
    /// Every workload task has finished: run the final oracles and report.
    fn finish(&mut self, env: &dyn Env) -> ScenarioReport;
}

/// Every scenario, in the order `sim list` shows them.
pub fn all() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(cow_amplification::CowAmplification),
        Box::new(device_stress::DeviceStress),
        Box::new(fs_crash::FsCrash),
        Box::new(fs_workload::FsWorkload),
        Box::new(fsstress::Fsstress),
        Box::new(fsstress::FsstressSnapshots),
        Box::new(fsstress::FsstressQuota),
    ]
}

/// The scenario named `name`, or an error listing the known ones.
pub fn by_name(name: &str) -> Result<Box<dyn Scenario>, String> {
    let scenarios = all();
    let names: Vec<&'static str> = scenarios.iter().map(|s| s.name()).collect();
    scenarios
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| format!("unknown scenario '{name}' (known: {})", names.join(", ")))
}

/// The scenario `sim run` uses when none is named.
pub const DEFAULT_SCENARIO: &str = "cow-amplification";
