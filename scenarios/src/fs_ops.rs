//! Shared pieces of the scenarios that run the engine: making and mounting
//! a filesystem, applying a namespace operation by path, the reference
//! model those operations are judged against, and statistics.

use std::collections::BTreeMap;
use std::rc::Rc;

use engine::check::{CheckReport, EntryKind};
use engine::env::{Env, Violation};
use engine::error::Error;
use engine::fix::FixPolicy;
use engine::fs::FsInfo;

use crate::workload::Op;

/// The `world` of a scenario run under a memory budget of `high_bytes`,
/// kswapd waking at 90% of it and stopping at 70%, every millisecond.
pub fn memory_world(high_bytes: u64) -> serde_json::Value {
    serde_json::json!({ "memory": { "high_bytes": high_bytes, "kswapd": {
        "period_ns": 1_000_000, "wake_above_bytes": high_bytes / 10 * 9, "stop_below_bytes": high_bytes / 10 * 7 } } })
}

/// mkfs then mount.
pub async fn mkfs_and_mount(
    env: &Rc<dyn Env>,
    device_bytes: u64,
    nodesize: u32,
    fix: FixPolicy,
) -> Result<Rc<FsInfo>, Error> {
    engine::disk_io::mkfs(env.clone(), device_bytes, nodesize, fix).await?;
    engine::disk_io::open_ctree(env.clone(), fix).await
}

/// mkfs then mount, or report why not (a `mount` violation) and give up.
pub async fn mkfs_and_mount_or_report(
    env: &Rc<dyn Env>,
    device_bytes: u64,
    nodesize: u32,
    fix: FixPolicy,
) -> Option<Rc<FsInfo>> {
    match mkfs_and_mount(env, device_bytes, nodesize, fix).await {
        Ok(fs) => Some(fs),
        Err(error) => {
            env.report_violation(Violation { kind: "mount", message: format!("mkfs/mount failed: {error}") });
            None
        }
    }
}

/// Apply one operation by path. Returns the errno the operation gave (0 on success).
pub async fn apply(fs: &Rc<FsInfo>, op: &Op) -> Result<(), Error> {
    use engine::inode;
    match op {
        Op::Mkdir(path) => {
            let (dir, name) = inode::resolve_parent(fs, path).await?;
            inode::mkdir(fs, dir, &name).await.map(|_| ())
        }
        Op::Create(path) => {
            let (dir, name) = inode::resolve_parent(fs, path).await?;
            inode::create(fs, dir, &name).await.map(|_| ())
        }
        Op::Link { from, to } => {
            let ino = inode::resolve(fs, from).await?;
            let (dir, name) = inode::resolve_parent(fs, to).await?;
            inode::link(fs, ino, dir, &name).await
        }
        Op::Rename { from, to } => {
            let (old_dir, old_name) = inode::resolve_parent(fs, from).await?;
            let (new_dir, new_name) = inode::resolve_parent(fs, to).await?;
            inode::rename(fs, old_dir, &old_name, new_dir, &new_name).await
        }
        Op::Unlink(path) => {
            let (dir, name) = inode::resolve_parent(fs, path).await?;
            inode::unlink(fs, dir, &name).await
        }
        Op::Rmdir(path) => {
            let (dir, name) = inode::resolve_parent(fs, path).await?;
            inode::rmdir(fs, dir, &name).await
        }
        Op::Setattr(path) => {
            let ino = inode::resolve(fs, path).await?;
            inode::setattr(fs, ino).await
        }
        Op::Sync => engine::transaction::sync(fs).await,
    }
}

/// The namespace a scenario believes in: path -> directory or file (files
/// identified by a scenario-side id, so hard links compare equal).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    entries: BTreeMap<String, Node>,
    next_file: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(u64),
}

fn parent_of(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

impl Model {
    fn parent_is_dir(&self, path: &str) -> bool {
        parent_of(path).is_none_or(|parent| self.entries.get(parent) == Some(&Node::Dir))
    }

    fn has_children(&self, dir: &str) -> bool {
        let prefix = format!("{dir}/");
        self.entries.range(prefix.clone()..).next().is_some_and(|(p, _)| p.starts_with(&prefix))
    }

    /// Apply `op` as POSIX says; returns whether it should succeed. The
    /// model is unchanged when it should fail.
    pub fn apply(&mut self, op: &Op) -> bool {
        match op {
            Op::Mkdir(p) | Op::Create(p) => {
                if self.entries.contains_key(p) || !self.parent_is_dir(p) {
                    return false;
                }
                let node = if matches!(op, Op::Mkdir(_)) {
                    Node::Dir
                } else {
                    self.next_file += 1;
                    Node::File(self.next_file)
                };
                self.entries.insert(p.clone(), node);
                true
            }
            Op::Link { from, to } => match self.entries.get(from) {
                Some(&Node::File(id)) if !self.entries.contains_key(to) && self.parent_is_dir(to) => {
                    self.entries.insert(to.clone(), Node::File(id));
                    true
                }
                _ => false,
            },
            Op::Unlink(p) => match self.entries.get(p) {
                Some(Node::File(_)) => {
                    self.entries.remove(p);
                    true
                }
                _ => false,
            },
            Op::Rmdir(p) => match self.entries.get(p) {
                Some(Node::Dir) if !self.has_children(p) => {
                    self.entries.remove(p);
                    true
                }
                _ => false,
            },
            Op::Rename { from, to } => self.rename(from, to),
            Op::Setattr(p) => self.entries.contains_key(p),
            Op::Sync => true,
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> bool {
        let Some(&node) = self.entries.get(from) else { return false };
        // POSIX: when both names are links to the same file, rename does
        // nothing and succeeds (the kernel's vfs_rename: source == target).
        if from == to
            || matches!((node, self.entries.get(to)), (Node::File(a), Some(&Node::File(b))) if a == b)
        {
            return self.parent_is_dir(to);
        }
        if !self.parent_is_dir(to) || to.starts_with(&format!("{from}/")) {
            return false;
        }
        match (node, self.entries.get(to)) {
            (_, None) => {}
            (Node::File(_), Some(Node::File(_))) => {}
            (Node::Dir, Some(Node::Dir)) if !self.has_children(to) => {}
            _ => return false,
        }
        let prefix = format!("{from}/");
        let moved: Vec<(String, Node)> = self
            .entries
            .range(from.to_string()..)
            .take_while(|(p, _)| p.as_str() == from || p.starts_with(&prefix))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        for (path, _) in &moved {
            self.entries.remove(path);
        }
        for (path, node) in moved {
            self.entries.insert(format!("{to}{}", &path[from.len()..]), node);
        }
        true
    }

    /// Paths of every directory and file, for picking operation targets.
    pub fn paths(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.entries.iter()
    }

    /// Whether a checked filesystem's namespace is this model's, up to the
    /// identity of files: two names are the same inode in one exactly when
    /// they are in the other.
    pub fn matches(&self, namespace: &BTreeMap<String, EntryKind>) -> Result<(), String> {
        let mut ours_to_theirs: BTreeMap<u64, u64> = BTreeMap::new();
        let mut theirs_to_ours: BTreeMap<u64, u64> = BTreeMap::new();
        for (path, node) in &self.entries {
            let found = namespace.get(&format!("/{path}"));
            match (node, found) {
                (Node::Dir, Some(EntryKind::Dir)) => {}
                (Node::File(ours), Some(EntryKind::File { ino })) => {
                    if *ours_to_theirs.entry(*ours).or_insert(*ino) != *ino
                        || *theirs_to_ours.entry(*ino).or_insert(*ours) != *ours
                    {
                        return Err(format!("/{path}: hard links differ from the model"));
                    }
                }
                (_, None) => return Err(format!("/{path} is missing")),
                (_, Some(kind)) => return Err(format!("/{path} is {kind:?}, the model has {node:?}")),
            }
        }
        if let Some(extra) = namespace.keys().find(|p| !self.entries.contains_key(&p[1..])) {
            return Err(format!("{extra} exists but the model has no such name"));
        }
        Ok(())
    }
}

/// Report every error of an offline check as a violation; returns whether it passed.
pub fn report_check(env: &dyn Env, when: &str, report: &CheckReport) -> bool {
    for error in report.errors.iter().take(20) {
        env.report_violation(Violation { kind: "check", message: format!("{when}: {error}") });
    }
    report.ok()
}

/// `stats.trees`: shape of each tree by name.
pub fn tree_stats(report: &CheckReport) -> serde_json::Value {
    let name = |id: u64| match id {
        1 => "root".to_string(),
        2 => "extent".to_string(),
        3 => "chunk".to_string(),
        4 => "dev".to_string(),
        5 => "fs".to_string(),
        7 => "csum".to_string(),
        id if id == engine::format::DATA_RELOC_TREE_OBJECTID => "data_reloc".to_string(),
        id => format!("tree{id}"),
    };
    let trees: serde_json::Map<String, serde_json::Value> = report
        .trees
        .iter()
        .map(|(&id, shape)| {
            (
                name(id),
                serde_json::json!({
                    "level": shape.level, "nodes": shape.nodes, "leaves": shape.leaves,
                    "items": shape.items, "bytes_used": shape.bytes_used,
                }),
            )
        })
        .collect();
    serde_json::Value::Object(trees)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::parse;

    #[test]
    fn the_model_follows_posix() {
        let mut model = Model::default();
        let ops = parse("mkdir d\ncreate d/f\nlink d/f d/g\nmkdir e\nrename d e/d\n").unwrap();
        assert!(ops.iter().all(|op| model.apply(op)));
        let paths: Vec<&String> = model.paths().map(|(p, _)| p).collect();
        assert_eq!(paths, ["e", "e/d", "e/d/f", "e/d/g"]);
        for bad in ["rmdir e", "create x/y", "mkdir e", "link e e2", "unlink e", "rename e e/d/h"] {
            assert!(!model.apply(&parse(bad).unwrap()[0]), "{bad} should fail");
        }
        assert!(model.apply(&parse("rename e/d/g e/d/f").unwrap()[0]), "links of one file: a no-op");
        assert!(
            model.paths().any(|(p, _)| p == "e/d/g"),
            "rename between links of one file keeps both names"
        );
        assert!(model.apply(&parse("unlink e/d/f").unwrap()[0]));
        assert!(model.apply(&parse("rename e/d/g e/d/g2").unwrap()[0]));
    }

    #[test]
    fn percentiles_of_counts() {
        let counts: BTreeMap<u32, u64> = [(0, 90), (3, 9), (40, 1)].into_iter().collect();
        assert_eq!(percentiles(&counts), serde_json::json!({"p50": 0, "p99": 3, "max": 40}));
        assert_eq!(percentiles(&BTreeMap::new()), serde_json::json!({"p50": 0, "p99": 0, "max": 0}));
    }

    #[test]
    fn matching_compares_names_and_links() {
        let mut model = Model::default();
        for op in parse("create a\nlink a b\ncreate c\n").unwrap() {
            model.apply(&op);
        }
        let ns = |pairs: &[(&str, u64)]| -> BTreeMap<String, EntryKind> {
            pairs.iter().map(|(p, ino)| (p.to_string(), EntryKind::File { ino: *ino })).collect()
        };
        assert!(model.matches(&ns(&[("/a", 257), ("/b", 257), ("/c", 258)])).is_ok());
        assert!(model.matches(&ns(&[("/a", 257), ("/b", 258), ("/c", 258)])).is_err());
        assert!(model.matches(&ns(&[("/a", 257), ("/b", 257)])).unwrap_err().contains("/c is missing"));
    }
}

/// Percentiles of a histogram kept as value -> count.
fn percentiles(counts: &BTreeMap<u32, u64>) -> serde_json::Value {
    let total: u64 = counts.values().sum();
    let at = |fraction: f64| {
        let rank = ((total as f64 * fraction).ceil() as u64).max(1);
        let mut seen = 0;
        counts.iter().find_map(|(&value, &n)| {
            seen += n;
            (seen >= rank).then_some(value)
        })
    };
    serde_json::json!({
        "p50": at(0.5).unwrap_or(0), "p99": at(0.99).unwrap_or(0),
        "max": counts.keys().next_back().copied().unwrap_or(0),
    })
}

/// `stats.searches` and `stats.handles` of a filesystem.
pub fn engine_stats(fs: &FsInfo) -> serde_json::Value {
    let searches = &fs.search_stats;
    let restarts: serde_json::Map<String, serde_json::Value> = engine::env::RestartReason::ALL
        .iter()
        .zip(&searches.restarts)
        .map(|(reason, count)| (reason.as_str().to_string(), count.get().into()))
        .collect();
    let handles = &fs.trans.handle_stats;
    let ebs = &fs.stats;
    let space = fs.space.get().map(|space| {
        let metadata = space.metadata.stats();
        serde_json::json!({ "metadata": {
            "tickets_queued": metadata.tickets_queued,
            "tickets_granted": metadata.tickets_granted,
            "tickets_stolen": metadata.tickets_stolen,
            "tickets_failed": metadata.tickets_failed,
            "flush_space_calls": metadata.flush_states.values().sum::<u64>(),
        }})
    });
    // The running transaction's state when the statistics were taken: after
    // a power loss, the state the filesystem was cut in.
    let transaction = fs.trans.running.borrow().as_ref().map(|t| t.state().name());
    serde_json::json!({
        "searches": {
            "searches": searches.searches.get(),
            "cows": searches.cows.get(),
            "restarts": restarts,
            "reclaim_in_restart_window": searches.reclaim_in_restart_window.get(),
            "cows_per_search": percentiles(&searches.cows_per_search.borrow()),
            "restarts_per_search": percentiles(&searches.restarts_per_search.borrow()),
        },
        "extent_refs": {
            "shared_cows": searches.refs_per_shared_cow.borrow().values().sum::<u64>(),
            "refs_per_shared_cow": percentiles(&searches.refs_per_shared_cow.borrow()),
        },
        "extent_buffers": {
            "reads": ebs.eb_reads.get(),
            "writes": ebs.eb_writes.get(),
            "writes_of_running_transaction": ebs.eb_writes_of_running_transaction.get(),
            "evictions": ebs.eb_evictions.get(),
        },
        "space": space,
        "transaction": { "running_state": transaction },
        "handles": {
            "handles": handles.handles.get(),
            "reserving_handles": handles.reserving_handles.get(),
            "bytes_reserved": handles.bytes_reserved.get(),
            "bytes_used": handles.bytes_used.get(),
            "max_bytes_used": handles.max_bytes_used.get(),
            "min_headroom_bytes": handles.min_headroom_bytes.get(),
            "overdrawn_handles": handles.overdrawn_handles.get(),
            "rsv_paths": *handles.rsv_paths.borrow(),
        },
    })
}

/// Mount the image after a power loss and check it: reports a failed mount
/// or every check error as violations, and returns the report only when the
/// image is clean.
pub async fn check_after_power_loss(env: &Rc<dyn Env>) -> Option<CheckReport> {
    match engine::check::check(env.clone()).await {
        Ok(report) => report_check(&**env, "after power loss", &report).then_some(report),
        Err(error) => {
            env.report_violation(Violation {
                kind: "mount",
                message: format!("mount after power loss failed: {error}"),
            });
            None
        }
    }
}
