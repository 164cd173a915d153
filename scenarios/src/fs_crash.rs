//! `fs-crash`: random namespace operations with periodic syncs, power loss
//! at a seeded time, then mount, check, and compare the namespace.
//!
//! One task works (the world's reclaim actors and the engine's own daemons
//! run beside it). It keeps the POSIX model after every operation since the
//! last sync that completed. After the power cut the image must check clean
//! and its namespace must be the model after some operation between that
//! sync and the last operation started: the engine may have committed more
//! on its own, never less, and never a state no prefix of the operations
//! produced.

use std::cell::RefCell;
use std::rc::Rc;

use engine::env::{Env, SwitchPoint, TaskKind, TraceEvent, Violation};
use engine::fix::FixPolicy;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fs_ops::{
    Model, Node, apply, check_after_power_loss, engine_stats, mkfs_and_mount_or_report, tree_stats,
};
use crate::streams::stream;
use crate::workload::Op;
use crate::{Scenario, ScenarioReport, ScenarioRun, StartContext};

pub struct FsCrash;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Params {
    ops: u32,
    nodesize: u32,
    device_bytes: u64,
    /// Percent of operations that are a sync.
    sync_percent: u32,
    /// Names are drawn from this many per directory, so operations collide.
    names: u32,
    /// Power is cut this long after mkfs and mount are done (setup is not
    /// under test).
    power_loss_after_ns: u64,
    /// Overrides of the world: a memory budget tight enough that reclaim
    /// writes tree blocks of the running transaction before its commit.
    world: serde_json::Value,
}

impl Scenario for FsCrash {
    fn name(&self) -> &'static str {
        "fs-crash"
    }

    fn description(&self) -> &'static str {
        "namespace operations with syncs, power loss at a seeded time, mount, check, compare with the committed model"
    }

    fn configure(&self, seed: u64) -> serde_json::Value {
        let mut rng = stream(seed, "scenario");
        let params = Params {
            ops: rng.random_range(20..=300),
            nodesize: [4096, 16384, 16384, 65536][rng.random_range(0..4)],
            device_bytes: 1 << 30,
            sync_percent: rng.random_range(1..=15),
            names: rng.random_range(4..=40),
            power_loss_after_ns: rng.random_range(100_000..40_000_000),
            world: crate::fs_ops::memory_world(
                [256u64 << 10, 1 << 20, 4 << 20, 64 << 20][rng.random_range(0..4)],
            ),
        };
        serde_json::to_value(params).expect("params serialize")
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        let params: Params = serde_json::from_value(context.params.clone())
            .map_err(|e| format!("fs-crash parameters: {e}"))?;
        let state = Rc::new(RefCell::new(State::default()));
        let rng = stream(context.seed, "scenario.ops");
        let task = work(context.env.clone(), context.fix, params.clone(), rng, state.clone());
        context.env.spawn("fs-crash", TaskKind::Workload, Box::pin(task));
        Ok(Box::new(FsCrashRun { params, state }))
    }
}

/// The operations a seed's run performs: they depend on the model only
/// (a run stops at the first result the model does not expect), so the
/// whole sequence is known before it starts.
fn operations(params: &Params, mut rng: ChaCha8Rng) -> Vec<Op> {
    let mut model = Model::default();
    (0..params.ops)
        .map(|_| {
            let op = random_op(&mut rng, &model, params);
            model.apply(&op);
            op
        })
        .collect()
}

/// The workload file of a seed's operations (for `sim run --workload`).
pub fn workload_text(seed: u64) -> String {
    let params: Params = serde_json::from_value(FsCrash.configure(seed)).expect("own params parse");
    let ops = operations(&params, stream(seed, "scenario.ops"));
    ops.iter().map(|op| format!("{op}\n")).collect()
}

#[derive(Default)]
struct State {
    /// The filesystem under test (kept for its statistics after power loss).
    fs: Option<Rc<engine::fs::FsInfo>>,
    /// When power goes: armed once the filesystem is made and mounted.
    power_loss_at_ns: Option<u64>,
    /// Model states that may be on disk: [0] is the last synced one.
    candidates: Vec<Model>,
    ops_completed: u64,
    syncs: u64,
    stats: serde_json::Value,
}

fn random_op(rng: &mut ChaCha8Rng, model: &Model, params: &Params) -> Op {
    let dirs: Vec<String> = model.paths().filter(|(_, n)| **n == Node::Dir).map(|(p, _)| p.clone()).collect();
    let existing: Vec<String> = model.paths().map(|(p, _)| p.clone()).collect();
    let name = |rng: &mut ChaCha8Rng| {
        let parent = if dirs.is_empty() || rng.random_bool(0.3) {
            None
        } else {
            Some(&dirs[rng.random_range(0..dirs.len())])
        };
        let leaf = format!("n{}", rng.random_range(0..params.names));
        parent.map_or(leaf.clone(), |p| format!("{p}/{leaf}"))
    };
    let pick = |rng: &mut ChaCha8Rng| {
        if existing.is_empty() {
            "n0".to_string()
        } else {
            existing[rng.random_range(0..existing.len())].clone()
        }
    };
    if rng.random_range(0..100) < params.sync_percent {
        return Op::Sync;
    }
    match rng.random_range(0..100) {
        0..35 => Op::Create(name(rng)),
        35..50 => Op::Mkdir(name(rng)),
        50..58 => Op::Link { from: pick(rng), to: name(rng) },
        58..72 => Op::Rename { from: pick(rng), to: name(rng) },
        72..87 => Op::Unlink(pick(rng)),
        87..94 => Op::Rmdir(pick(rng)),
        _ => Op::Setattr(pick(rng)),
    }
}

async fn work(env: Rc<dyn Env>, fix: FixPolicy, params: Params, rng: ChaCha8Rng, state: Rc<RefCell<State>>) {
    let Some(fs) = mkfs_and_mount_or_report(&env, params.device_bytes, params.nodesize, fix).await else {
        return;
    };
    let mut model = Model::default();
    state.borrow_mut().candidates = vec![model.clone()];
    state.borrow_mut().power_loss_at_ns = Some(env.now_ns() + params.power_loss_after_ns);
    state.borrow_mut().fs = Some(fs.clone());
    for (index, op) in operations(&params, rng).into_iter().enumerate() {
        let mut next = model.clone();
        let expected = next.apply(&op);
        // From here on the operation may reach the disk.
        state.borrow_mut().candidates.push(next.clone());
        let result = apply(&fs, &op).await;
        if result.is_ok() != expected {
            let message = format!(
                "operation {} '{op}': the model says {}, the engine gave {result:?}",
                index + 1,
                if expected { "success" } else { "failure" }
            );
            env.report_violation(Violation { kind: "namespace", message });
            return;
        }
        model = next;
        let mut state = state.borrow_mut();
        state.ops_completed += 1;
        if op == Op::Sync {
            state.syncs += 1;
            state.candidates = vec![model.clone()];
        }
        drop(state);
        env.switch_point(SwitchPoint::Workload).await;
    }
    env.trace(TraceEvent::Note { what: "fs-crash.done", a: params.ops as u64, b: 0, c: 0 });
}

struct FsCrashRun {
    params: Params,
    state: Rc<RefCell<State>>,
}

impl ScenarioRun for FsCrashRun {
    fn power_loss_at_ns(&self) -> Option<u64> {
        self.state.borrow().power_loss_at_ns
    }

    fn after_power_loss(&mut self, env: Rc<dyn Env>) {
        let state = self.state.clone();
        let recovery_env = env.clone();
        let recovery = async move {
            let env = recovery_env;
            let Some(report) = check_after_power_loss(&env).await else { return };
            let candidates = std::mem::take(&mut state.borrow_mut().candidates);
            let matched = candidates.iter().position(|model| model.matches(&report.namespace).is_ok());
            if matched.is_none() {
                let difference =
                    candidates.first().map(|m| m.matches(&report.namespace).unwrap_err()).unwrap_or_default();
                env.report_violation(Violation {
                    kind: "crash_namespace",
                    message: format!(
                        "after power loss the namespace is none of the {} states since the last sync (vs the synced one: {difference})",
                        candidates.len()
                    ),
                });
            }
            state.borrow_mut().stats = serde_json::json!({
                "trees": tree_stats(&report),
                "recovered_generation": report.generation,
                "recovered_state": matched,
            });
        };
        env.spawn("recovery", TaskKind::Workload, Box::pin(recovery));
    }

    fn finish(&mut self, _env: &dyn Env) -> ScenarioReport {
        let state = self.state.borrow();
        let mut stats = if state.stats.is_null() { serde_json::json!({}) } else { state.stats.clone() };
        stats["syncs"] = state.syncs.into();
        stats["crashed_mid_workload"] = (state.ops_completed < u64::from(self.params.ops)).into();
        if let (Some(fs), Some(sections)) = (&state.fs, stats.as_object_mut()) {
            sections.extend(engine_stats(fs).as_object().cloned().unwrap_or_default());
        }
        ScenarioReport { ops_completed: state.ops_completed, stats }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operation_sequence_is_a_valid_workload_and_fixed_by_the_seed() {
        let text = workload_text(24);
        let ops = crate::workload::parse(&text).expect("a seed's operations parse as a workload");
        assert!(!ops.is_empty());
        assert_eq!(text, workload_text(24));
        assert_ne!(text, workload_text(25));
    }

    /// `COWSIM_SEED=24 cargo test -p scenarios dump_fs_crash_workload -- --ignored --nocapture`
    #[test]
    #[ignore = "a tool: prints a seed's operations as a workload file"]
    fn dump_fs_crash_workload() {
        let seed = std::env::var("COWSIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        print!("{}", workload_text(seed));
    }
}
