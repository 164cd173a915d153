//! `cow-amplification`: the January 2026 report, reproduced.
//!
//! Several tasks create, rename and unlink files in a few shared directories
//! while the memory budget is tight and the reclaim actors write back and
//! evict tree blocks. Nothing is scripted: a search restarts because reclaim
//! evicted a clean block, reclaim writes back the fresh copy (WRITTEN), and
//! the restarted search COWs it again, as often as the seed's interleaving
//! makes it happen. The engine's oracles report a handle that uses more than
//! it reserved, the shared transaction reserve overdrawn into the global one,
//! a failed delayed dir index migrate and the ENOSPC abort that follows.
//!
//! Safety, for every fix: every task works on its own names, so each
//! operation's result is known (a wrong one is a `namespace` violation); a
//! committer quiesces the workers between operations, commits, and checks
//! the image offline against the model (`check` after each commit); in half
//! the seeds power is cut at a seeded time, then the image must mount, check
//! clean, and hold for each task the state after some prefix of its
//! operations no shorter than the last commit's.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use engine::check::{CheckReport, EntryKind};
use engine::env::{Env, SwitchPoint, TaskKind, Violation, WaitOn};
use engine::error::Error;
use engine::fix::FixPolicy;
use engine::fs::FsInfo;
use engine::wait::WaitQueue;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fs_ops::{
    Model, Node, apply, check_after_power_loss, engine_stats, mkfs_and_mount_or_report, report_check,
    tree_stats,
};
use crate::streams::stream;
use crate::workload::Op;
use crate::{Scenario, ScenarioReport, ScenarioRun, StartContext};

pub struct CowAmplification;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Params {
    tasks: u32,
    dirs: u32,
    ops_per_task: u32,
    names_per_task: u32,
    nodesize: u32,
    device_bytes: u64,
    /// Operations (over all workers) between two quiesced commit-and-checks.
    commit_every_ops: u32,
    /// Cut power this long after setup, in half the seeds.
    power_loss_after_ns: Option<u64>,
    world: serde_json::Value,
}

impl Scenario for CowAmplification {
    fn name(&self) -> &'static str {
        "cow-amplification"
    }

    fn description(&self) -> &'static str {
        "concurrent creates/renames/unlinks under memory pressure: the search COW loop and the reservation oracles"
    }

    fn configure(&self, seed: u64) -> serde_json::Value {
        let mut rng = stream(seed, "scenario");
        let high_bytes = [128u64 << 10, 256 << 10, 512 << 10, 1 << 20][rng.random_range(0..4)];
        let kswapd_period_ns = rng.random_range(50_000..1_000_000u64);
        let world = serde_json::json!({
            "max_violations": 64,
            "memory": {
                "high_bytes": high_bytes,
                "kswapd": { "period_ns": kswapd_period_ns, "wake_above_bytes": high_bytes / 2, "stop_below_bytes": high_bytes / 4 },
                "proactive": { "mean_interval_ns": rng.random_range(100_000..2_000_000u64), "bytes": high_bytes / 2 },
                "drop_caches": { "mean_interval_ns": rng.random_range(1_000_000..20_000_000u64) },
                "hog": if rng.random_bool(0.3) {
                    serde_json::json!({ "period_ns": 500_000, "max_bytes": high_bytes / 2, "step_bytes": high_bytes / 8 })
                } else {
                    serde_json::Value::Null
                },
            },
        });
        let params = Params {
            tasks: rng.random_range(2..=8),
            dirs: rng.random_range(1..=4),
            ops_per_task: rng.random_range(50..=300),
            names_per_task: rng.random_range(8..=64),
            nodesize: 16384,
            device_bytes: 1 << 30,
            commit_every_ops: rng.random_range(40..=400),
            power_loss_after_ns: rng.random_bool(0.5).then(|| rng.random_range(1_000_000..100_000_000)),
            world,
        };
        serde_json::to_value(params).expect("params serialize")
    }

    fn shrink(&self, params: &serde_json::Value) -> Vec<serde_json::Value> {
        let Ok(params) = serde_json::from_value::<Params>(params.clone()) else { return Vec::new() };
        let mut smaller = Vec::new();
        let mut variant = |change: &dyn Fn(&mut Params)| {
            let mut p = params.clone();
            change(&mut p);
            smaller.push(serde_json::to_value(p).expect("params serialize"));
        };
        // Fewer tasks and operations first: they shrink everything else.
        for tasks in smaller_counts(params.tasks) {
            variant(&|p| p.tasks = tasks);
        }
        for ops in smaller_counts(params.ops_per_task) {
            variant(&|p| p.ops_per_task = ops);
        }
        if params.power_loss_after_ns.is_some() {
            variant(&|p| p.power_loss_after_ns = None);
        }
        for dirs in smaller_counts(params.dirs) {
            variant(&|p| p.dirs = dirs);
        }
        for names in smaller_counts(params.names_per_task) {
            variant(&|p| p.names_per_task = names);
        }
        // Commit more often: a failure in the commit comes sooner.
        for every in smaller_counts(params.commit_every_ops).into_iter().filter(|&n| n >= 10) {
            variant(&|p| p.commit_every_ops = every);
        }
        smaller
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        let params: Params = serde_json::from_value(context.params.clone())
            .map_err(|e| format!("cow-amplification parameters: {e}"))?;
        if params.tasks == 0 || params.dirs == 0 {
            return Err("cow-amplification: tasks and dirs must be at least 1".into());
        }
        let shared = Rc::new(Shared::new(&params));
        let setup =
            setup_and_run(context.env.clone(), context.fix, context.seed, params.clone(), shared.clone());
        context.env.spawn("committer", TaskKind::Workload, Box::pin(setup));
        Ok(Box::new(CowAmplificationRun { params, shared }))
    }
}

/// Smaller values of a count of at least 1, boldest first: 1, half, three
/// quarters, one less (without repeats).
fn smaller_counts(n: u32) -> Vec<u32> {
    let mut counts: Vec<u32> =
        [1, n / 2, n - n / 4, n.saturating_sub(1)].into_iter().filter(|&c| c >= 1 && c < n).collect();
    counts.dedup();
    counts
}

/// State shared by the workers, the committer and the recovery.
struct Shared {
    state: RefCell<State>,
    /// Wakes workers when the committer resumes them and the committer when
    /// workers reach an operation boundary or finish.
    wait: WaitQueue,
}

#[derive(Default)]
struct State {
    fs: Option<Rc<FsInfo>>,
    power_loss_at_ns: Option<u64>,
    /// The committer wants the workers to stop between operations.
    paused: bool,
    /// Workers inside an operation.
    in_op: u32,
    workers_done: u32,
    ops_completed: u64,
    ops_since_commit: u32,
    /// Per task: model states the disk may hold; [0] is the last committed.
    candidates: Vec<Vec<Model>>,
    commits_checked: u64,
    aborted: bool,
    pinned_bytes_max: u64,
    stats: serde_json::Value,
}

impl Shared {
    fn new(params: &Params) -> Self {
        let model = with_dirs(params);
        let state = State { candidates: vec![vec![model]; params.tasks as usize], ..Default::default() };
        Self { state: RefCell::new(state), wait: WaitQueue::new() }
    }
}

/// A task's model starts with the shared directories the setup made.
fn with_dirs(params: &Params) -> Model {
    let mut model = Model::default();
    for d in 0..params.dirs {
        assert!(model.apply(&Op::Mkdir(dir_name(d))));
    }
    model
}

fn dir_name(d: u32) -> String {
    format!("d{d}")
}

fn random_op(rng: &mut ChaCha8Rng, model: &Model, task: u32, params: &Params) -> Op {
    let name = |rng: &mut ChaCha8Rng| {
        format!(
            "{}/t{task}n{}",
            dir_name(rng.random_range(0..params.dirs)),
            rng.random_range(0..params.names_per_task)
        )
    };
    let mine: Vec<String> =
        model.paths().filter(|(_, n)| matches!(n, Node::File(_))).map(|(p, _)| p.clone()).collect();
    let pick = |rng: &mut ChaCha8Rng| {
        if mine.is_empty() { name(rng) } else { mine[rng.random_range(0..mine.len())].clone() }
    };
    match rng.random_range(0..100) {
        0..50 => Op::Create(name(rng)),
        50..75 => Op::Rename { from: pick(rng), to: name(rng) },
        _ => Op::Unlink(pick(rng)),
    }
}

/// The committer: make the filesystem and its directories, start the
/// workers, then commit and check at quiet points until they are done.
async fn setup_and_run(env: Rc<dyn Env>, fix: FixPolicy, seed: u64, params: Params, shared: Rc<Shared>) {
    let Some(fs) = mkfs_and_mount_or_report(&env, params.device_bytes, params.nodesize, fix).await else {
        return;
    };
    for d in 0..params.dirs {
        if let Err(error) = apply(&fs, &Op::Mkdir(dir_name(d))).await {
            env.report_violation(Violation {
                kind: "namespace",
                message: format!("setup mkdir d{d}: {error}"),
            });
            return;
        }
    }
    if engine::transaction::sync(&fs).await.is_err() {
        return;
    }
    {
        let mut state = shared.state.borrow_mut();
        state.fs = Some(fs.clone());
        state.power_loss_at_ns = params.power_loss_after_ns.map(|after| env.now_ns() + after);
    }
    for task in 0..params.tasks {
        let rng = stream(seed, &format!("scenario.task{task}"));
        let worker = work(env.clone(), fs.clone(), task, params.clone(), rng, shared.clone());
        env.spawn(&format!("worker{task}"), TaskKind::Workload, Box::pin(worker));
    }
    loop {
        let (shared_wait, every) = (shared.clone(), params.commit_every_ops);
        let tasks = params.tasks;
        env.wait_on(WaitOn::Other("enough operations for a commit"));
        shared
            .wait
            .wait_until(move || {
                let state = shared_wait.state.borrow();
                state.ops_since_commit >= every || state.workers_done == tasks
            })
            .await;
        let finished = shared.state.borrow().workers_done == params.tasks;
        if !quiesced_commit_and_check(&env, &fs, &shared).await || finished {
            break;
        }
    }
    let mut state = shared.state.borrow_mut();
    state.paused = false;
    drop(state);
    shared.wait.wake_all();
}

/// Stop the workers between operations, commit, check the image against
/// the models, and let them go on. Returns false when the run should stop.
async fn quiesced_commit_and_check(env: &Rc<dyn Env>, fs: &Rc<FsInfo>, shared: &Rc<Shared>) -> bool {
    shared.state.borrow_mut().paused = true;
    let waiting = shared.clone();
    env.wait_on(WaitOn::Other("workers to reach an operation boundary"));
    shared.wait.wait_until(move || waiting.state.borrow().in_op == 0).await;
    if let Some(space) = fs.space.get() {
        let pinned = space.metadata.info().bytes_pinned;
        let mut state = shared.state.borrow_mut();
        state.pinned_bytes_max = state.pinned_bytes_max.max(pinned);
    }
    let committed = engine::transaction::sync(fs).await;
    let mut ok = committed.is_ok();
    if ok {
        match engine::check::check(env.clone()).await {
            Ok(report) => ok = judge_committed(&**env, &report, shared),
            Err(error) => {
                env.report_violation(Violation {
                    kind: "check",
                    message: format!("check could not mount: {error}"),
                });
                ok = false;
            }
        }
    } else {
        shared.state.borrow_mut().aborted = true;
    }
    let mut state = shared.state.borrow_mut();
    state.ops_since_commit = 0;
    state.commits_checked += u64::from(ok);
    state.paused = !ok;
    drop(state);
    shared.wait.wake_all();
    ok
}

/// After a quiesced commit the image holds exactly every task's current model.
fn judge_committed(env: &dyn Env, report: &CheckReport, shared: &Shared) -> bool {
    if !report_check(env, "after a commit", report) {
        return false;
    }
    let mut state = shared.state.borrow_mut();
    for (task, candidates) in state.candidates.iter_mut().enumerate() {
        let current = candidates.last().expect("a task has a model").clone();
        if let Err(difference) = current.matches(&names_of(task, &report.namespace)) {
            env.report_violation(Violation {
                kind: "namespace",
                message: format!("after a quiesced commit, task {task}: {difference}"),
            });
            return false;
        }
        *candidates = vec![current];
    }
    true
}

/// The entries of the namespace a task's model describes: the shared
/// directories and the task's own names.
fn names_of(task: usize, namespace: &BTreeMap<String, EntryKind>) -> BTreeMap<String, EntryKind> {
    let marker = format!("/t{task}n");
    namespace
        .iter()
        .filter(|(p, k)| p.contains(&marker) || (**k == EntryKind::Dir && p.matches('/').count() == 1))
        .map(|(p, k)| (p.clone(), *k))
        .collect()
}

async fn work(
    env: Rc<dyn Env>,
    fs: Rc<FsInfo>,
    task: u32,
    params: Params,
    mut rng: ChaCha8Rng,
    shared: Rc<Shared>,
) {
    let mut model = with_dirs(&params);
    for index in 0..params.ops_per_task {
        let waiting = shared.clone();
        env.wait_on(WaitOn::Other("the committer to resume"));
        shared.wait.wait_until(move || !waiting.state.borrow().paused).await;
        let op = random_op(&mut rng, &model, task, &params);
        let mut next = model.clone();
        let expected = next.apply(&op);
        {
            let mut state = shared.state.borrow_mut();
            state.in_op += 1;
            state.candidates[task as usize].push(next.clone());
        }
        let result = apply(&fs, &op).await;
        {
            let mut state = shared.state.borrow_mut();
            state.in_op -= 1;
            if result.is_ok() {
                state.ops_completed += 1;
                state.ops_since_commit += 1;
            }
        }
        shared.wait.wake_all();
        match result {
            Err(Error::Erofs | Error::Enospc) if fs.trans.fs_error.get().is_some() => {
                // The filesystem was forced read-only: the oracles have spoken.
                shared.state.borrow_mut().aborted = true;
                break;
            }
            result if result.is_ok() != expected => {
                let message = format!(
                    "task {task} operation {} '{op}': the model says {}, the engine gave {result:?}",
                    index + 1,
                    if expected { "success" } else { "failure" }
                );
                env.report_violation(Violation { kind: "namespace", message });
                break;
            }
            _ => model = next,
        }
        env.switch_point(SwitchPoint::Workload).await;
    }
    shared.state.borrow_mut().workers_done += 1;
    shared.wait.wake_all();
}

struct CowAmplificationRun {
    params: Params,
    shared: Rc<Shared>,
}

impl ScenarioRun for CowAmplificationRun {
    fn power_loss_at_ns(&self) -> Option<u64> {
        self.shared.state.borrow().power_loss_at_ns
    }

    fn after_power_loss(&mut self, env: Rc<dyn Env>) {
        let shared = self.shared.clone();
        let recovery_env = env.clone();
        let recovery = async move {
            let env = recovery_env;
            let Some(report) = check_after_power_loss(&env).await else { return };
            let candidates = std::mem::take(&mut shared.state.borrow_mut().candidates);
            for (task, states) in candidates.iter().enumerate() {
                let names = names_of(task, &report.namespace);
                if !states.iter().any(|model| model.matches(&names).is_ok()) {
                    let difference = states[0].matches(&names).err().unwrap_or_default();
                    env.report_violation(Violation {
                        kind: "crash_namespace",
                        message: format!(
                            "after power loss task {task}'s names are none of its {} states since the last commit (vs the committed one: {difference})",
                            states.len()
                        ),
                    });
                    return;
                }
            }
            shared.state.borrow_mut().stats["recovered_trees"] = tree_stats(&report);
        };
        env.spawn("recovery", TaskKind::Workload, Box::pin(recovery));
    }

    fn finish(&mut self, env: &dyn Env) -> ScenarioReport {
        let state = self.shared.state.borrow();
        let mut stats = if state.stats.is_null() { serde_json::json!({}) } else { state.stats.clone() };
        let sim_seconds = env.now_ns() as f64 / 1e9;
        stats["tasks"] = self.params.tasks.into();
        stats["commits_checked"] = state.commits_checked.into();
        stats["aborted"] = state.aborted.into();
        stats["pinned_bytes_max"] = state.pinned_bytes_max.into();
        stats["ops_per_sim_second"] = serde_json::json!(if sim_seconds > 0.0 {
            (state.ops_completed as f64 / sim_seconds).round()
        } else {
            0.0
        });
        if let (Some(fs), Some(sections)) = (&state.fs, stats.as_object_mut()) {
            sections.extend(engine_stats(fs).as_object().cloned().unwrap_or_default());
        }
        ScenarioReport { ops_completed: state.ops_completed, stats }
    }
}
