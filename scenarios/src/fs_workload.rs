//! `workload`: a workload file replayed in order on one task, with no memory
//! pressure and no faults, then committed and checked (`sim run --workload FILE`).
//!
//! Every operation's outcome is compared with the POSIX model: an operation
//! the model accepts must succeed and one it refuses must fail. After the
//! final commit an offline check mounts the image afresh; its namespace must
//! be the model's.

use std::cell::RefCell;
use std::rc::Rc;

use engine::env::{Env, TaskKind, Violation};
use engine::fix::FixPolicy;
use serde::{Deserialize, Serialize};

use crate::fs_ops::{Model, apply, engine_stats, mkfs_and_mount_or_report, report_check, tree_stats};
use crate::workload::{Op, parse};
use crate::{Scenario, ScenarioReport, ScenarioRun, StartContext};

pub struct FsWorkload;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Params {
    /// The workload file's text (kept whole so a seed file replays alone).
    workload: String,
    device_bytes: u64,
    nodesize: u32,
    world: serde_json::Value,
}

/// The world a workload file runs in: memory to spare, no reclaim actors.
pub fn quiet_world() -> serde_json::Value {
    serde_json::json!({
        "memory": { "high_bytes": 64u64 << 30, "kswapd": null, "flusher": null,
                    "proactive": null, "drop_caches": null, "hog": null },
    })
}

impl FsWorkload {
    /// Parameters for a workload file's text.
    pub fn params(text: &str, nodesize: u32) -> serde_json::Value {
        serde_json::to_value(Params {
            workload: text.to_string(),
            device_bytes: 4 << 30,
            nodesize,
            world: quiet_world(),
        })
        .expect("params serialize")
    }
}

impl Scenario for FsWorkload {
    fn name(&self) -> &'static str {
        "workload"
    }

    fn description(&self) -> &'static str {
        "a workload file (sim run --workload FILE) on one task, no pressure, then commit and check"
    }

    fn configure(&self, _seed: u64) -> serde_json::Value {
        FsWorkload::params("", 16384)
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        let params: Params = serde_json::from_value(context.params.clone())
            .map_err(|e| format!("workload parameters: {e}"))?;
        let ops = parse(&params.workload)?;
        let state = Rc::new(RefCell::new(State::default()));
        let task = run(context.env.clone(), context.fix, params, ops, state.clone());
        context.env.spawn("workload", TaskKind::Workload, Box::pin(task));
        Ok(Box::new(FsWorkloadRun { state }))
    }
}

#[derive(Default)]
struct State {
    fs: Option<Rc<engine::fs::FsInfo>>,
    ops_completed: u64,
    failed_as_expected: u64,
    stats: serde_json::Value,
}

async fn run(env: Rc<dyn Env>, fix: FixPolicy, params: Params, ops: Vec<Op>, state: Rc<RefCell<State>>) {
    let Some(fs) = mkfs_and_mount_or_report(&env, params.device_bytes, params.nodesize, fix).await else {
        return;
    };
    state.borrow_mut().fs = Some(fs.clone());
    let mut model = Model::default();
    for (index, op) in ops.iter().enumerate() {
        let expected = model.apply(op);
        let result = apply(&fs, op).await;
        if result.is_ok() != expected {
            let message = format!(
                "operation {} '{op}': the model says {}, the engine gave {result:?}",
                index + 1,
                if expected { "success" } else { "failure" }
            );
            env.report_violation(Violation { kind: "namespace", message });
            return;
        }
        let mut state = state.borrow_mut();
        state.ops_completed += 1;
        state.failed_as_expected += u64::from(!expected);
    }
    if let Err(error) = engine::transaction::sync(&fs).await {
        env.report_violation(Violation { kind: "commit", message: format!("final commit failed: {error}") });
        return;
    }
    match engine::check::check(env.clone()).await {
        Ok(report) => {
            if report_check(&*env, "after the final commit", &report)
                && let Err(difference) = model.matches(&report.namespace)
            {
                env.report_violation(Violation {
                    kind: "namespace",
                    message: format!("after the final commit: {difference}"),
                });
            }
            state.borrow_mut().stats = serde_json::json!({ "trees": tree_stats(&report) });
        }
        Err(error) => env.report_violation(Violation {
            kind: "mount",
            message: format!("check could not mount: {error}"),
        }),
    }
}

struct FsWorkloadRun {
    state: Rc<RefCell<State>>,
}

impl ScenarioRun for FsWorkloadRun {
    fn power_loss_at_ns(&self) -> Option<u64> {
        None
    }

    fn after_power_loss(&mut self, _env: Rc<dyn Env>) {}

    fn finish(&mut self, _env: &dyn Env) -> ScenarioReport {
        let state = self.state.borrow();
        let mut stats = state.stats.clone();
        if stats.is_null() {
            stats = serde_json::json!({});
        }
        stats["failed_as_expected"] = state.failed_as_expected.into();
        if let (Some(fs), Some(sections)) = (&state.fs, stats.as_object_mut()) {
            sections.extend(engine_stats(fs).as_object().cloned().unwrap_or_default());
        }
        ScenarioReport { ops_completed: state.ops_completed, stats }
    }
}
