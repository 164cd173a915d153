//! `fsstress`: several tasks mix file data and namespace operations, as
//! fstests' fsstress does, under memory pressure, with power loss at a
//! seeded time.
//!
//! Each task works in its own directory (`/t<k>`) on a few names: create,
//! write (a seeded byte pattern at a random offset), truncate, punch hole,
//! read (compared with the model at once), rename, unlink, fsync (of a file
//! or of the task's directory) and sync.
//! A reference model of names and contents says what every operation must
//! return. Oracles:
//! - every operation's result and every read against the model (`fsstress_model`);
//! - after the power cut (mount replays the log of the fsyncs since the
//!   last commit), the image checks clean (check() with its file data
//!   checks), and every file that no operation touched since its last
//!   fsync returned, or since the start of the last sync that completed,
//!   is at its path with exactly that content (`crash_data`); every task
//!   directory whose names no operation changed since its last fsync
//!   returned, or since the start of the last sync that completed, holds
//!   exactly those names (`crash_names`); every file in the recovered
//!   namespace reads back without a checksum error.
//!
//! Files changed after that may hold any mix of old and new pages (btrfs
//! writes back page runs independently and makes no promise without
//! fsync); the oracle does not judge their content.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use engine::env::{Env, SwitchPoint, TaskKind, TraceEvent, Violation};
use engine::error::Error;
use engine::fix::FixPolicy;
use engine::fs::FsInfo;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fs_ops::{
    check_after_power_loss, engine_stats, memory_world, mkfs_and_mount_or_report, report_check, tree_stats,
};
use crate::streams::stream;
use crate::{Scenario, ScenarioReport, ScenarioRun, StartContext};

pub struct Fsstress;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Params {
    tasks: u32,
    ops_per_task: u32,
    /// Names per task directory.
    names: u32,
    /// Files stay below this size.
    max_file_bytes: u64,
    /// Percent of operations that are a sync.
    sync_percent: u32,
    /// Percent of operations that take a snapshot of the fs tree or delete
    /// the oldest one (absent in seed files older than snapshots: none).
    #[serde(default)]
    snapshot_percent: u32,
    /// Percent of operations that relocate a metadata block group (balance;
    /// absent in seed files older than relocation: none).
    #[serde(default)]
    balance_percent: u32,
    /// Quotas on from the start, the fs tree limited to what it references
    /// after setup plus this many bytes (absent in seed files older than
    /// quotas: quotas off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quota_headroom_bytes: Option<u64>,
    /// Percent of fsyncs that are of the task's directory (absent in seed
    /// files older than directory logging: none).
    #[serde(default)]
    dir_fsync_percent: u32,
    nodesize: u32,
    device_bytes: u64,
    power_loss_after_ns: u64,
    world: serde_json::Value,
}

impl Scenario for Fsstress {
    fn name(&self) -> &'static str {
        "fsstress"
    }

    fn description(&self) -> &'static str {
        "concurrent writes, truncates, hole punches, reads, renames, unlinks and syncs under memory pressure; power loss; check and the synced files' contents"
    }

    fn configure(&self, seed: u64) -> serde_json::Value {
        serde_json::to_value(draw_params(seed).0).expect("params serialize")
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        let params: Params = serde_json::from_value(context.params.clone())
            .map_err(|e| format!("fsstress parameters: {e}"))?;
        let state = Rc::new(RefCell::new(State::default()));
        let setup = setup(context.env.clone(), context.fix, params.clone(), context.seed, state.clone());
        context.env.spawn("fsstress-setup", TaskKind::Workload, Box::pin(setup));
        Ok(Box::new(FsstressRun { params, fix: context.fix, state }))
    }
}

/// The parameters of seed `seed`, and the memory budget in their world.
fn draw_params(seed: u64) -> (Params, u64) {
    let mut rng = stream(seed, "scenario");
    let high_bytes: u64;
    let params = Params {
        tasks: rng.random_range(2..=4),
        ops_per_task: rng.random_range(20..=80),
        names: rng.random_range(2..=6),
        max_file_bytes: [8u64 << 10, 64 << 10, 256 << 10][rng.random_range(0..3)],
        sync_percent: rng.random_range(2..=10),
        nodesize: [4096, 16384, 16384][rng.random_range(0..3)],
        device_bytes: 1 << 30,
        power_loss_after_ns: rng.random_range(500_000..40_000_000),
        world: {
            high_bytes = [512u64 << 10, 2 << 20, 8 << 20][rng.random_range(0..3)];
            memory_world(high_bytes)
        },
        // Drawn last: the parameters above stay what they were for each seed.
        snapshot_percent: rng.random_range(0..=4),
        // Not drawn: swarm seeds stay what they were; the snapshot variant
        // balances.
        balance_percent: 0,
        quota_headroom_bytes: None,
        dir_fsync_percent: rng.random_range(20..=50),
    };
    (params, high_bytes)
}

/// `fsstress` with a snapshot or a snapshot deletion in one operation of
/// five: many COWs then copy blocks a snapshot shares, which is where the
/// delayed refs per COW (children, data extents, FULL_BACKREF) pile up.
pub struct FsstressSnapshots;

/// How much later than `fsstress` the snapshot variant cuts power.
const SNAPSHOT_POWER_LOSS_FACTOR: u64 = 15;

/// Percent of `fsstress-snapshots` operations that relocate a metadata
/// block group.
const BALANCE_PERCENT: u32 = 2;

impl Scenario for FsstressSnapshots {
    fn name(&self) -> &'static str {
        "fsstress-snapshots"
    }

    fn description(&self) -> &'static str {
        "fsstress with snapshots taken and deleted in one operation of five: COWs of shared blocks and their delayed refs"
    }

    fn configure(&self, seed: u64) -> serde_json::Value {
        serde_json::to_value(snapshot_params(seed)).expect("params serialize")
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        Fsstress.start(context)
    }
}

/// `fsstress-snapshots` with quotas: every commit accounts what each
/// subvolume references, snapshots are accounted mid-commit, and the fs
/// tree's limit makes some writes fail with EDQUOT.
pub struct FsstressQuota;

impl Scenario for FsstressQuota {
    fn name(&self) -> &'static str {
        "fsstress-quota"
    }

    fn description(&self) -> &'static str {
        "fsstress-snapshots with quota groups on and the fs tree limited: counts checked on every committed image, EDQUOT"
    }

    fn configure(&self, seed: u64) -> serde_json::Value {
        let mut rng = stream(seed, "scenario.quota");
        // The fs tree of these runs references well under a megabyte: a
        // tight limit refuses some writes, a loose one none.
        let headroom = [64u64 << 10, 256 << 10, 1 << 20][rng.random_range(0..3)];
        let params = Params { quota_headroom_bytes: Some(headroom), ..snapshot_params(seed) };
        serde_json::to_value(params).expect("params serialize")
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        Fsstress.start(context)
    }
}

/// The parameters of `fsstress-snapshots` for `seed`.
fn snapshot_params(seed: u64) -> Params {
    let (base, high_bytes) = draw_params(seed);
    Params {
        snapshot_percent: 20,
        balance_percent: BALANCE_PERCENT,
        // Trees of more than one level, so that snapshots share more than
        // a root: many names, 4 KiB nodes, and the power cut later.
        names: 40,
        nodesize: 4096,
        ops_per_task: 120,
        power_loss_after_ns: base.power_loss_after_ns * SNAPSHOT_POWER_LOSS_FACTOR,
        // Files of at most 64 KiB and a budget of at least 2 MiB: reading
        // forty 256 KiB files back through a 512 KiB page cache after the
        // crash takes longer than the progress timeout (seed 242).
        max_file_bytes: base.max_file_bytes.min(64 << 10),
        world: memory_world(high_bytes.max(2 << 20)),
        ..base
    }
}

/// A file of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileModel {
    id: u64,
    content: Vec<u8>,
    /// The sequence number of the last operation that changed it (name or
    /// content), set when that operation starts.
    changed_at: u64,
    /// An operation is changing it now.
    busy: bool,
}

#[derive(Default)]
struct State {
    fs: Option<Rc<FsInfo>>,
    power_loss_at_ns: Option<u64>,
    /// path -> file, every task's.
    files: BTreeMap<String, FileModel>,
    next_id: u64,
    /// Operations started, all tasks (the sequence numbers).
    seq: u64,
    /// Files that must survive a crash: id -> (path, content).
    durable: BTreeMap<u64, (String, Vec<u8>)>,
    /// Per task directory, the name changes started (creates, renames,
    /// unlinks) and whether one is running now.
    dir_changes: BTreeMap<u32, (u64, bool)>,
    /// Task directories whose names must survive a crash: task -> names.
    durable_dirs: BTreeMap<u32, Vec<String>>,
    dir_fsyncs: u64,
    ops_completed: u64,
    syncs: u64,
    fsyncs: u64,
    /// Snapshots of the fs tree alive now, oldest first.
    snapshots: Vec<u64>,
    snapshots_taken: u64,
    snapshots_deleted: u64,
    balances: u64,
    balances_enospc: u64,
    /// Writes, truncates and punches refused with EDQUOT.
    edquot: u64,
    writes: u64,
    reads: u64,
    stopped: bool,
    stats: serde_json::Value,
}

async fn setup(env: Rc<dyn Env>, fix: FixPolicy, params: Params, seed: u64, state: Rc<RefCell<State>>) {
    let Some(fs) = mkfs_and_mount_or_report(&env, params.device_bytes, params.nodesize, fix).await else {
        return;
    };
    for task in 0..params.tasks {
        if let Err(error) = engine::inode::mkdir(&fs, engine::inode::ROOT_DIR_INO, &format!("t{task}")).await
        {
            env.report_violation(Violation {
                kind: "fsstress_model",
                message: format!("mkdir /t{task}: {error}"),
            });
            return;
        }
    }
    if let Err(error) = engine::file::sync_fs(&fs).await {
        env.report_violation(Violation { kind: "fsstress_model", message: format!("setup sync: {error}") });
        return;
    }
    if let Some(headroom) = params.quota_headroom_bytes
        && let Err(error) = limit_fs_tree(&fs, headroom).await
    {
        env.report_violation(Violation { kind: "fsstress_model", message: format!("setup quotas: {error}") });
        return;
    }
    {
        let mut state = state.borrow_mut();
        state.fs = Some(fs.clone());
        state.power_loss_at_ns = Some(env.now_ns() + params.power_loss_after_ns);
        // The setup's sync made every task directory durable, empty.
        for task in 0..params.tasks {
            state.dir_changes.insert(task, (0, false));
            state.durable_dirs.insert(task, Vec::new());
        }
    }
    for task in 0..params.tasks {
        let rng = stream(seed, &format!("scenario.task{task}"));
        let worker = work(env.clone(), fs.clone(), params.clone(), task, rng, state.clone());
        env.spawn(&format!("fsstress-{task}"), TaskKind::Workload, Box::pin(worker));
    }
}

/// Enable quotas and limit what the fs tree references to what it does now
/// plus `headroom` bytes.
async fn limit_fs_tree(fs: &Rc<FsInfo>, headroom: u64) -> Result<(), Error> {
    engine::qgroup::quota_enable(fs).await?;
    let fs_tree = engine::format::FS_TREE_OBJECTID;
    let used = fs.qgroup.groups.borrow().get(&fs_tree).map_or(0, |group| group.rfer);
    engine::qgroup::limit_qgroup(fs, fs_tree, Some(used + headroom), None).await?;
    engine::file::sync_fs(fs).await
}

enum Action {
    Create(String),
    Write {
        path: String,
        offset: u64,
        len: u64,
        byte: u8,
    },
    Truncate {
        path: String,
        size: u64,
    },
    Punch {
        path: String,
        offset: u64,
        len: u64,
    },
    Read {
        path: String,
        offset: u64,
        len: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink(String),
    Fsync(String),
    /// fsync of the task's directory.
    FsyncDir(u32),
    Sync,
    Snapshot,
    DeleteSnapshot,
    /// Relocate a metadata block group, picked among them by this number.
    Balance(u32),
}

fn pick_action(rng: &mut ChaCha8Rng, params: &Params, task: u32) -> Action {
    let path = |rng: &mut ChaCha8Rng| format!("t{task}/f{}", rng.random_range(0..params.names));
    let max = params.max_file_bytes;
    // No draw without snapshots: runs from before snapshots replay alike.
    if params.snapshot_percent > 0 && rng.random_range(0..100) < params.snapshot_percent {
        return if rng.random_range(0..3) < 2 { Action::Snapshot } else { Action::DeleteSnapshot };
    }
    if params.balance_percent > 0 && rng.random_range(0..100) < params.balance_percent {
        return Action::Balance(rng.random());
    }
    if rng.random_range(0..100) < params.sync_percent {
        return Action::Sync;
    }
    match rng.random_range(0..100) {
        0..15 => Action::Create(path(rng)),
        15..50 => {
            let len = rng.random_range(1..=(max / 4).max(1));
            Action::Write { path: path(rng), offset: rng.random_range(0..max - len), len, byte: rng.random() }
        }
        50..58 => Action::Truncate { path: path(rng), size: rng.random_range(0..max) },
        58..66 => Action::Punch {
            path: path(rng),
            offset: rng.random_range(0..max),
            len: rng.random_range(1..max / 2),
        },
        66..78 => {
            Action::Read { path: path(rng), offset: rng.random_range(0..max), len: rng.random_range(1..max) }
        }
        78..84 => {
            if params.dir_fsync_percent > 0 && rng.random_range(0..100) < params.dir_fsync_percent {
                Action::FsyncDir(task)
            } else {
                Action::Fsync(path(rng))
            }
        }
        84..92 => Action::Rename { from: path(rng), to: path(rng) },
        _ => Action::Unlink(path(rng)),
    }
}

/// A hole punch refused with EDQUOT zeroes nothing, or only the partial
/// page at its start (zeroed before the one at its end was refused): the
/// file must read as one of the two, and the model takes the one it is.
async fn punch_refused(
    fs: &Rc<FsInfo>,
    state: &RefCell<State>,
    path: &str,
    ino: u64,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let unchanged = state.borrow().files.get(path).expect("the file exists").content.clone();
    // The first range punch_hole zeroes through the page cache.
    let end = (unchanged.len() as u64).min(offset.saturating_add(len));
    let (full_start, full_end) = (
        offset.next_multiple_of(engine::file::PAGE_SIZE),
        end / engine::file::PAGE_SIZE * engine::file::PAGE_SIZE,
    );
    let head_end = if full_start >= full_end {
        end.min((offset + 1).next_multiple_of(engine::file::PAGE_SIZE))
    } else {
        full_start
    };
    let mut head_zeroed = unchanged.clone();
    if offset < head_end {
        head_zeroed[offset as usize..head_end as usize].fill(0);
    }
    let got = engine::file::read(fs, ino, 0, unchanged.len() as u64)
        .await
        .map_err(|e| format!("read {path} after a refused punch: {e}"))?;
    if got != unchanged && got != head_zeroed {
        return Err(format!(
            "punch {path} at {offset} refused with EDQUOT left neither the old content nor its head zeroed"
        ));
    }
    let mut state = state.borrow_mut();
    state.edquot += 1;
    state.files.get_mut(path).expect("the file exists").content = got;
    Ok(())
}

fn report(env: &dyn Env, state: &RefCell<State>, message: String) {
    env.report_violation(Violation { kind: "fsstress_model", message });
    state.borrow_mut().stopped = true;
}

/// Mark the files at `paths` as being changed by operation `seq`: whatever
/// an earlier sync made durable of them no longer holds.
fn start_change(state: &RefCell<State>, seq: u64, paths: &[&str]) {
    let mut state = state.borrow_mut();
    for path in paths {
        let Some(file) = state.files.get_mut(*path) else { continue };
        file.changed_at = seq;
        file.busy = true;
        let id = file.id;
        state.durable.remove(&id);
    }
}

fn end_change(state: &RefCell<State>, paths: &[&str]) {
    let mut state = state.borrow_mut();
    for path in paths {
        if let Some(file) = state.files.get_mut(*path) {
            file.busy = false;
        }
    }
}

/// Task `task`'s directory is having its names changed: whatever an earlier
/// fsync or sync made durable of them no longer holds.
fn start_dir_change(state: &RefCell<State>, task: u32) {
    let mut state = state.borrow_mut();
    state.durable_dirs.remove(&task);
    let changes = state.dir_changes.entry(task).or_default();
    changes.0 += 1;
    changes.1 = true;
}

fn end_dir_change(state: &RefCell<State>, task: u32) {
    state.borrow_mut().dir_changes.entry(task).or_default().1 = false;
}

/// The names in task `task`'s directory, as the model has them.
fn dir_names(state: &State, task: u32) -> Vec<String> {
    let prefix = format!("t{task}/");
    state.files.keys().filter_map(|path| path.strip_prefix(&prefix)).map(str::to_string).collect()
}

async fn do_action(fs: &Rc<FsInfo>, state: &RefCell<State>, seq: u64, action: Action) -> Result<(), String> {
    use engine::file::{punch_hole, read, truncate, write};
    use engine::inode::{create, rename, resolve, resolve_parent, unlink};
    let file = |path: &str| state.borrow().files.get(path).cloned();
    let resolve_file =
        |path: String| async move { resolve(fs, &path).await.map_err(|e| format!("resolve {path}: {e}")) };
    match action {
        Action::Create(path) => {
            let exists = file(&path).is_some();
            let (dir, name) = resolve_parent(fs, &path).await.map_err(|e| e.to_string())?;
            match (create(fs, dir, &name).await, exists) {
                (Ok(_), false) => {
                    let mut state = state.borrow_mut();
                    state.next_id += 1;
                    let id = state.next_id;
                    state
                        .files
                        .insert(path, FileModel { id, content: Vec::new(), changed_at: seq, busy: false });
                    Ok(())
                }
                (Err(Error::Eexist), true) => Ok(()),
                (result, _) => Err(format!("create {path}: {result:?}, the model says exists={exists}")),
            }
        }
        Action::Write { path, offset, len, byte } => {
            if file(&path).is_none() {
                return Ok(());
            }
            let ino = resolve_file(path.clone()).await?;
            let data = vec![byte; len as usize];
            match write(fs, ino, offset, &data).await {
                Ok(()) => {}
                // Refused whole: nothing was copied.
                Err(Error::Edquot) => {
                    state.borrow_mut().edquot += 1;
                    return Ok(());
                }
                Err(e) => return Err(format!("write {path} {offset}+{len}: {e}")),
            }
            let mut state = state.borrow_mut();
            state.writes += 1;
            let model = state.files.get_mut(&path).expect("the file exists");
            let end = (offset + len) as usize;
            if model.content.len() < end {
                model.content.resize(end, 0);
            }
            model.content[offset as usize..end].copy_from_slice(&data);
            Ok(())
        }
        Action::Truncate { path, size } => {
            if file(&path).is_none() {
                return Ok(());
            }
            let ino = resolve_file(path.clone()).await?;
            match truncate(fs, ino, size).await {
                Ok(()) => {}
                // Zeroing the partial last page was refused before the size changed.
                Err(Error::Edquot) => {
                    state.borrow_mut().edquot += 1;
                    return Ok(());
                }
                Err(e) => return Err(format!("truncate {path} to {size}: {e}")),
            }
            let mut state = state.borrow_mut();
            state.files.get_mut(&path).expect("the file exists").content.resize(size as usize, 0);
            Ok(())
        }
        Action::Punch { path, offset, len } => {
            if file(&path).is_none() {
                return Ok(());
            }
            let ino = resolve_file(path.clone()).await?;
            match punch_hole(fs, ino, offset, len).await {
                Ok(()) => {}
                Err(Error::Edquot) => return punch_refused(fs, state, &path, ino, offset, len).await,
                Err(e) => return Err(format!("punch {path} {offset}+{len}: {e}")),
            }
            let mut state = state.borrow_mut();
            let model = state.files.get_mut(&path).expect("the file exists");
            let end = ((offset + len) as usize).min(model.content.len());
            if (offset as usize) < end {
                model.content[offset as usize..end].fill(0);
            }
            Ok(())
        }
        Action::Read { path, offset, len } => {
            let Some(model) = file(&path) else { return Ok(()) };
            let ino = resolve_file(path.clone()).await?;
            let got = read(fs, ino, offset, len).await.map_err(|e| format!("read {path}: {e}"))?;
            state.borrow_mut().reads += 1;
            let from = (offset as usize).min(model.content.len());
            let to = ((offset + len) as usize).min(model.content.len());
            let expected = &model.content[from..to];
            if got == expected {
                return Ok(());
            }
            let at =
                got.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(got.len().min(expected.len()));
            Err(format!(
                "read {path} {offset}+{len}: {} bytes, the model has {}; first difference at byte {}",
                got.len(),
                expected.len(),
                offset as usize + at
            ))
        }
        Action::Rename { from, to } => {
            let source = file(&from);
            let (old_dir, old_name) = resolve_parent(fs, &from).await.map_err(|e| e.to_string())?;
            let (new_dir, new_name) = resolve_parent(fs, &to).await.map_err(|e| e.to_string())?;
            match (rename(fs, old_dir, &old_name, new_dir, &new_name).await, source) {
                (Ok(()), Some(_)) => {
                    let mut state = state.borrow_mut();
                    if from != to {
                        let moved = state.files.remove(&from).expect("the source exists");
                        state.files.insert(to, moved);
                    }
                    Ok(())
                }
                (Err(Error::Enoent), None) => Ok(()),
                (result, source) => {
                    Err(format!("rename {from} {to}: {result:?}, source exists={}", source.is_some()))
                }
            }
        }
        Action::Unlink(path) => {
            let model = file(&path);
            let (dir, name) = resolve_parent(fs, &path).await.map_err(|e| e.to_string())?;
            match (unlink(fs, dir, &name).await, model) {
                (Ok(()), Some(_)) => {
                    state.borrow_mut().files.remove(&path);
                    Ok(())
                }
                (Err(Error::Enoent), None) => Ok(()),
                (result, model) => Err(format!("unlink {path}: {result:?}, exists={}", model.is_some())),
            }
        }
        Action::Fsync(path) => {
            // Only this task changes its files: what the model holds now is
            // what a crash must keep once the fsync returns.
            let Some(before) = file(&path) else { return Ok(()) };
            let ino = resolve_file(path.clone()).await?;
            engine::tree_log::fsync(fs, ino).await.map_err(|e| format!("fsync {path}: {e}"))?;
            let mut state = state.borrow_mut();
            state.fsyncs += 1;
            let unchanged = state
                .files
                .get(&path)
                .is_some_and(|f| f.id == before.id && f.changed_at == before.changed_at && !f.busy);
            if unchanged && !before.busy {
                state.durable.insert(before.id, (path, before.content));
            }
            Ok(())
        }
        Action::FsyncDir(task) => {
            // Only this task changes its directory's names: they are what a
            // crash must keep once the fsync returns.
            let dir = format!("t{task}");
            let ino = resolve_file(dir.clone()).await?;
            engine::tree_log::fsync(fs, ino).await.map_err(|e| format!("fsync {dir}: {e}"))?;
            let mut state = state.borrow_mut();
            state.dir_fsyncs += 1;
            let names = dir_names(&state, task);
            state.durable_dirs.insert(task, names);
            Ok(())
        }
        Action::Snapshot => {
            let id = engine::ioctl::create_snapshot(fs, engine::format::FS_TREE_OBJECTID)
                .await
                .map_err(|e| format!("snapshot: {e}"))?;
            let mut state = state.borrow_mut();
            state.snapshots.push(id);
            state.snapshots_taken += 1;
            Ok(())
        }
        Action::DeleteSnapshot => {
            let Some(id) = ({
                let mut state = state.borrow_mut();
                (!state.snapshots.is_empty()).then(|| state.snapshots.remove(0))
            }) else {
                return Ok(());
            };
            engine::ioctl::delete_snapshot(fs, id).await.map_err(|e| format!("delete snapshot {id}: {e}"))?;
            state.borrow_mut().snapshots_deleted += 1;
            Ok(())
        }
        Action::Balance(pick) => {
            let groups: Vec<u64> = fs
                .block_groups
                .all()
                .iter()
                .filter(|g| engine::block_group::type_flags(g.flags) == engine::format::BLOCK_GROUP_METADATA)
                .map(|g| g.start)
                .collect();
            let start = groups[pick as usize % groups.len()];
            match engine::relocation::relocate_block_group(fs, start).await {
                Ok(_) => state.borrow_mut().balances += 1,
                Err(engine::error::Error::Enospc) => state.borrow_mut().balances_enospc += 1,
                Err(e) => return Err(format!("balance of block group {start}: {e}")),
            }
            Ok(())
        }
        Action::Sync => {
            // Files and directory names no operation is changing now are on
            // disk once the sync returns.
            let before: Vec<(String, FileModel)> = state
                .borrow()
                .files
                .iter()
                .filter(|(_, f)| !f.busy)
                .map(|(p, f)| (p.clone(), f.clone()))
                .collect();
            let dirs_before: Vec<(u32, u64, Vec<String>)> = {
                let state = state.borrow();
                state
                    .dir_changes
                    .iter()
                    .filter(|(_, (_, busy))| !busy)
                    .map(|(&task, &(changes, _))| (task, changes, dir_names(&state, task)))
                    .collect()
            };
            engine::file::sync_fs(fs).await.map_err(|e| format!("sync: {e}"))?;
            let mut state = state.borrow_mut();
            state.syncs += 1;
            for (path, synced) in before {
                let unchanged = state
                    .files
                    .get(&path)
                    .is_some_and(|f| f.id == synced.id && f.changed_at == synced.changed_at);
                if unchanged {
                    state.durable.insert(synced.id, (path, synced.content));
                }
            }
            for (task, changes, names) in dirs_before {
                if state.dir_changes.get(&task).map(|&(now, _)| now) == Some(changes) {
                    state.durable_dirs.insert(task, names);
                }
            }
            Ok(())
        }
    }
}

async fn work(
    env: Rc<dyn Env>,
    fs: Rc<FsInfo>,
    params: Params,
    task: u32,
    mut rng: ChaCha8Rng,
    state: Rc<RefCell<State>>,
) {
    for _ in 0..params.ops_per_task {
        if state.borrow().stopped || fs.trans.fs_error.get().is_some() {
            return;
        }
        let action = pick_action(&mut rng, &params, task);
        // Data operations on a name that is free create it instead, so most
        // operations do something.
        let action = match action {
            Action::Write { path, .. }
            | Action::Truncate { path, .. }
            | Action::Punch { path, .. }
            | Action::Read { path, .. }
            | Action::Fsync(path)
                if !state.borrow().files.contains_key(&path) =>
            {
                Action::Create(path)
            }
            other => other,
        };
        let seq = {
            let mut state = state.borrow_mut();
            state.seq += 1;
            state.seq
        };
        let changes: Vec<String> = match &action {
            Action::Write { path, .. }
            | Action::Truncate { path, .. }
            | Action::Punch { path, .. }
            | Action::Unlink(path) => {
                vec![path.clone()]
            }
            Action::Rename { from, to } => vec![from.clone(), to.clone()],
            Action::Create(_)
            | Action::Read { .. }
            | Action::Fsync(_)
            | Action::FsyncDir(_)
            | Action::Sync
            | Action::Snapshot
            | Action::DeleteSnapshot
            | Action::Balance(_) => Vec::new(),
        };
        let paths: Vec<&str> = changes.iter().map(String::as_str).collect();
        let names_change = matches!(action, Action::Create(_) | Action::Rename { .. } | Action::Unlink(_));
        start_change(&state, seq, &paths);
        if names_change {
            start_dir_change(&state, task);
        }
        let outcome = do_action(&fs, &state, seq, action).await;
        // A renamed file ends its change under its new name, in `paths` too.
        end_change(&state, &paths);
        if names_change {
            end_dir_change(&state, task);
        }
        match outcome {
            Ok(()) => state.borrow_mut().ops_completed += 1,
            Err(_) if fs.trans.fs_error.get().is_some() => return,
            Err(message) => {
                report(&*env, &state, format!("task {task}: {message}"));
                return;
            }
        }
        env.switch_point(SwitchPoint::Workload).await;
    }
    env.trace(TraceEvent::Note { what: "fsstress.task_done", a: u64::from(task), b: 0, c: 0 });
}

struct FsstressRun {
    params: Params,
    /// Recovery mounts under the run's fix too (log replay commits).
    fix: FixPolicy,
    state: Rc<RefCell<State>>,
}

/// Mount the recovered image, then check the durable files and read every file.
async fn recover(env: Rc<dyn Env>, fix: FixPolicy, state: Rc<RefCell<State>>) {
    let Some(report) = check_after_power_loss(&env).await else { return };
    let fs = match engine::disk_io::open_ctree(env.clone(), fix).await {
        Ok(fs) => fs,
        Err(error) => {
            env.report_violation(Violation {
                kind: "mount",
                message: format!("mount after power loss: {error}"),
            });
            return;
        }
    };
    // Mount replayed a log: the image (and the namespace to read back) is
    // what replay committed; check it too.
    let report = if fs.log.stats.borrow().inodes_replayed > 0 {
        match engine::check::check(env.clone()).await {
            Ok(after) if report_check(&*env, "after log replay", &after) => after,
            Ok(_) => return,
            Err(error) => {
                env.report_violation(Violation {
                    kind: "mount",
                    message: format!("check after log replay: {error}"),
                });
                return;
            }
        }
    } else {
        report
    };
    let durable = state.borrow().durable.clone();
    let mut checked = 0u64;
    for (path, content) in durable.values() {
        let found = match engine::inode::resolve(&fs, path).await {
            Ok(ino) => engine::file::read(&fs, ino, 0, u64::MAX).await,
            Err(error) => Err(error),
        };
        checked += 1;
        if found.as_ref() != Ok(content) {
            let what = match &found {
                Ok(bytes) => format!(
                    "{} bytes, first difference at {}",
                    bytes.len(),
                    bytes
                        .iter()
                        .zip(content)
                        .position(|(a, b)| a != b)
                        .unwrap_or(bytes.len().min(content.len()))
                ),
                Err(error) => error.to_string(),
            };
            env.report_violation(Violation {
                kind: "crash_data",
                message: format!(
                    "after power loss /{path} should hold its {} synced bytes: {what}",
                    content.len()
                ),
            });
            break;
        }
    }
    let durable_dirs = state.borrow().durable_dirs.clone();
    for (task, expected) in &durable_dirs {
        let found = match engine::inode::resolve(&fs, &format!("t{task}")).await {
            Ok(ino) => engine::inode::readdir(&fs, ino).await,
            Err(error) => Err(error),
        };
        let found = found.map(|entries| {
            let mut names: Vec<String> = entries.into_iter().map(|(name, _, _)| name).collect();
            names.sort();
            names
        });
        if found.as_ref() != Ok(expected) {
            env.report_violation(Violation {
                kind: "crash_names",
                message: format!(
                    "after power loss /t{task} should hold exactly {expected:?} (its last fsync or sync): {found:?}"
                ),
            });
            break;
        }
    }
    let mut read_back = 0u64;
    for (path, kind) in &report.namespace {
        if let engine::check::EntryKind::File { ino } = kind {
            if engine::file::read(&fs, *ino, 0, u64::MAX).await.is_err() {
                env.report_violation(Violation {
                    kind: "crash_data",
                    message: format!("after power loss {path} does not read back"),
                });
                break;
            }
            read_back += 1;
        }
    }
    state.borrow_mut().stats = serde_json::json!({
        "trees": tree_stats(&report),
        "recovered_generation": report.generation,
        "durable_files_checked": checked,
        "durable_dirs_checked": durable_dirs.len(),
        "inodes_replayed": fs.log.stats.borrow().inodes_replayed,
        "entries_deleted": fs.log.stats.borrow().entries_deleted,
        "files_read_back": read_back,
    });
}

impl ScenarioRun for FsstressRun {
    fn power_loss_at_ns(&self) -> Option<u64> {
        self.state.borrow().power_loss_at_ns
    }

    fn after_power_loss(&mut self, env: Rc<dyn Env>) {
        env.spawn(
            "recovery",
            TaskKind::Workload,
            Box::pin(recover(env.clone(), self.fix, self.state.clone())),
        );
    }

    fn finish(&mut self, _env: &dyn Env) -> ScenarioReport {
        let state = self.state.borrow();
        let mut stats = if state.stats.is_null() { serde_json::json!({}) } else { state.stats.clone() };
        stats["syncs"] = state.syncs.into();
        stats["fsyncs"] = state.fsyncs.into();
        if self.params.dir_fsync_percent > 0 {
            stats["dir_fsyncs"] = state.dir_fsyncs.into();
        }
        if self.params.snapshot_percent > 0 {
            stats["snapshots"] = serde_json::json!({
                "taken": state.snapshots_taken, "deleted": state.snapshots_deleted,
            });
        }
        if self.params.balance_percent > 0 {
            let moved = state.fs.as_ref().map(|fs| *fs.reloc.stats.borrow()).unwrap_or_default();
            stats["balance"] = serde_json::json!({
                "done": state.balances, "enospc": state.balances_enospc,
                "blocks_moved": moved.blocks_moved, "blocks_repointed": moved.blocks_repointed,
                "swaps": moved.swaps, "reloc_trees": moved.reloc_trees,
            });
        }
        if self.params.quota_headroom_bytes.is_some()
            && let Some(fs) = &state.fs
        {
            let q = &fs.qgroup.stats;
            let fs_tree = fs.qgroup.groups.borrow().get(&engine::format::FS_TREE_OBJECTID).cloned();
            stats["quota"] = serde_json::json!({
                "edquot": state.edquot,
                "accounted": q.accounted.get(),
                "changed": q.changed.get(),
                "walked_blocks": q.walked_blocks.get(),
                "subtree_traced": q.subtree_traced.get(),
                "snapshots": q.snapshots.get(),
                "fs_rfer": fs_tree.as_ref().map_or(0, |g| g.rfer),
                "fs_excl": fs_tree.as_ref().map_or(0, |g| g.excl),
            });
        }
        stats["writes"] = state.writes.into();
        stats["reads"] = state.reads.into();
        stats["durable_files"] = (state.durable.len() as u64).into();
        stats["crashed_mid_workload"] =
            (state.ops_completed < u64::from(self.params.ops_per_task * self.params.tasks)).into();
        if let (Some(fs), Some(sections)) = (&state.fs, stats.as_object_mut()) {
            sections.extend(engine_stats(fs).as_object().cloned().unwrap_or_default());
            let data = &fs.page_cache.stats;
            sections.insert(
                "data".to_string(),
                serde_json::json!({
                    "ordered_extents": data.ordered_extents.get(),
                    "ordered_bytes": data.ordered_bytes.get(),
                    "inline_extents": data.inline_extents.get(),
                    "page_reads": data.page_reads.get(),
                    "pages_evicted": data.pages_evicted.get(),
                    "csum_failures": data.csum_failures.get(),
                }),
            );
            let log = fs.log.stats.borrow();
            sections.insert(
                "log".to_string(),
                serde_json::json!({
                    "inodes_logged": log.inodes_logged,
                    "dirs_logged": log.dirs_logged,
                    "new_inodes_logged": log.new_inodes_logged,
                    "log_syncs": log.log_syncs,
                    "log_blocks_written": log.log_blocks_written,
                    "full_commits": log.full_commits,
                    "nothing_to_log": log.nothing_to_log,
                }),
            );
        }
        ScenarioReport { ops_completed: state.ops_completed, stats }
    }
}
