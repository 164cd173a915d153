//! Quota groups (kernel: qgroup.c, the qgroup half of transaction.c's
//! snapshot creation, backref.c's `btrfs_find_all_roots`).
//!
//! Every subvolume has a level-0 qgroup (its id is the tree's) counting the
//! bytes it references (`rfer`) and those it alone references (`excl`):
//! tree blocks at nodesize, data extents at their full disk length, however
//! little of them a file still names. The counts move at commit:
//! 1. **Tracing.** Each delayed ref queued for a block or data extent of a
//!    subvolume (or relocation) tree records the extent in the transaction
//!    (`btrfs_qgroup_trace_extent`); a drop of a snapshot records the whole
//!    subtree under a block it does not free, whose descendants lose a root
//!    without a reference change of their own (`btrfs_qgroup_trace_subtree`).
//! 2. **Old roots.** Before the next run of delayed refs changes the extent
//!    tree, each new record gets the subvolumes that reached the extent in
//!    the last commit (`btrfs_qgroup_trace_extent_post`, a backref walk of
//!    the commit roots).
//! 3. **Accounting.** In the commit, with every delayed ref run, each record
//!    gets its new roots from the current trees and the counters of the
//!    subvolumes that gained or lost it move (`btrfs_qgroup_account_extents`,
//!    `qgroup_update_counters`): `rfer` by membership, `excl` by whether the
//!    subvolume was, or is, the only root. The qgroup items are written to
//!    the quota tree in the same commit (`btrfs_run_qgroups`), so every
//!    committed image carries counts that match its trees.
//!
//! The backref walk resolves each reference of an extent to the subvolumes
//! above it: a tree's root block names the tree; a keyed tree reference
//! (TREE_BLOCK_REF) is resolved to the parent block by searching that tree
//! for the block's first key one level up, then the parent's roots; a
//! parent reference (SHARED_BLOCK_REF) goes to the parent; a keyed data
//! reference (EXTENT_DATA_REF) to the leaves of that tree whose file
//! extents name the extent; a shared one (SHARED_DATA_REF) to its leaf.
//! Relocation trees reach blocks but own no qgroup.
//!
//! **Snapshots** are accounted by the kernel's shortcut
//! (`qgroup_account_snapshot`): the references the copy of the source root
//! queues are not traced (`btrfs_set_skip_qgroup`); everything queued before
//! is accounted at once; the new qgroup inherits the source's `rfer` and both
//! keep only their root block exclusive; then the roots are committed and
//! the transaction's dirty blocks written, in the middle of the commit, so
//! that the commit roots the next old roots come from are the accounted
//! state and later changes of the source COW again (WRITTEN).
//!
//! **Limits.** A qgroup may limit `rfer` and `excl`. Buffered writes reserve
//! their new sectors against the limits of the file's subvolume
//! (`btrfs_qgroup_reserve_data`); a write that would pass a limit is retried
//! once after a commit, which turns finished writes into counted bytes, then
//! fails with EDQUOT. The reservation of a sector is freed when its dirty
//! page is dropped, or by the commit that accounts the extent it was
//! written to.
//!
//! Departures:
//! - level-0 qgroups only: no higher-level qgroups, no relations, no
//!   inheritance options;
//! - quotas are enabled by a commit that counts every subvolume from its
//!   trees with all writers gone (the kernel starts a rescan worker over
//!   the extent tree); no disable, no rescan afterwards;
//! - metadata is not reserved against limits (the kernel's prealloc and
//!   per-transaction metadata reservations), only counted when committed;
//! - a qgroup stays, with zero counts, after its subvolume is deleted.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::accessors::{header_nritems, item_data, item_key, node_blockptr, node_key};
use crate::ctree::{Path, Root, bin_search, insert_item, read_node_slot, search_slot};
use crate::disk_io::for_each_leaf_item;
use crate::env::Violation;
use crate::error::Error;
use crate::extent_io::{ExtentBuffer, read_tree_block, read_tree_block_verified};
use crate::format::{
    EXTENT_DATA_KEY, EXTENT_ITEM_KEY, EXTENT_TREE_OBJECTID, ExtentItem, FileExtentBody, FileExtentItem,
    FixedItem, InlineRef, Key, METADATA_ITEM_KEY, QGROUP_INFO_KEY, QGROUP_LIMIT_KEY, QGROUP_LIMIT_MAX_EXCL,
    QGROUP_LIMIT_MAX_RFER, QGROUP_STATUS_FLAG_INCONSISTENT, QGROUP_STATUS_FLAG_ON, QGROUP_STATUS_KEY,
    QGROUP_STATUS_VERSION, QUOTA_TREE_OBJECTID, QgroupInfoItem, QgroupLimitItem, QgroupStatusItem,
    ROOT_ITEM_KEY, ROOT_TREE_OBJECTID, RootItem, TREE_RELOC_OBJECTID, is_fstree,
};
use crate::fs::FsInfo;
use crate::transaction::{TransHandle, mark_buffer_dirty};

/// One level-0 qgroup (kernel: struct btrfs_qgroup).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Qgroup {
    pub rfer: u64,
    pub excl: u64,
    pub limit: QgroupLimitItem,
    /// Data bytes reserved by writes and not yet counted (kernel:
    /// `rsv.values[BTRFS_QGROUP_RSV_DATA]`).
    pub rsv_data: u64,
}

/// A tree's root block as the walk reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockPtr {
    bytenr: u64,
    level: u8,
    generation: u64,
}

impl BlockPtr {
    fn of(eb: &ExtentBuffer) -> BlockPtr {
        BlockPtr { bytenr: eb.start, level: eb.level(), generation: eb.generation() }
    }
}

/// The trees a backref walk reads: the extent tree and every subvolume tree
/// at one moment (the last commit, or now).
#[derive(Clone, Debug, Default)]
struct View {
    extent: Option<BlockPtr>,
    subvols: BTreeMap<u64, BlockPtr>,
}

impl View {
    fn current(fs: &FsInfo) -> View {
        let roots = fs.roots.borrow();
        View {
            extent: roots.get(&EXTENT_TREE_OBJECTID).map(|root| BlockPtr::of(&root.node())),
            subvols: roots
                .values()
                .filter(|root| is_fstree(root.objectid))
                .map(|root| (root.objectid, BlockPtr::of(&root.node())))
                .collect(),
        }
    }
}

/// Counters for the report.
#[derive(Debug, Default)]
pub struct QgroupStats {
    /// Extents accounted at commits.
    pub accounted: Cell<u64>,
    /// Of those, extents whose roots changed.
    pub changed: Cell<u64>,
    /// Tree blocks the backref walks resolved.
    pub walked_blocks: Cell<u64>,
    /// Blocks recorded by subtree traces of snapshot drops.
    pub subtree_traced: Cell<u64>,
    /// Snapshots accounted by inheritance.
    pub snapshots: Cell<u64>,
    /// Writes refused with EDQUOT.
    pub edquot: Cell<u64>,
}

/// The filesystem's qgroup state (kernel: the qgroup fields of fs_info).
#[derive(Default)]
pub struct QgroupControl {
    /// `BTRFS_FS_QUOTA_ENABLED`: transactions trace and commits account.
    pub enabled: Cell<bool>,
    /// The status item's flags (ON, INCONSISTENT).
    pub status_flags: Cell<u64>,
    /// Level-0 qgroups by subvolume id.
    pub groups: RefCell<BTreeMap<u64, Qgroup>>,
    /// Qgroups whose items the commit writes (kernel: dirty_qgroups).
    dirty: RefCell<BTreeSet<u64>>,
    /// Quotas are being enabled: the running transaction's commit counts.
    pub enable_pending: Cell<bool>,
    /// The trees as of the last commit: where old roots come from.
    commit_view: RefCell<View>,
    pub stats: QgroupStats,
}

impl QgroupControl {
    /// A copy of the qgroups, for reports and tests.
    pub fn snapshot(&self) -> BTreeMap<u64, Qgroup> {
        self.groups.borrow().clone()
    }

    fn mark_dirty(&self, id: u64) {
        self.dirty.borrow_mut().insert(id);
    }
}

/// What a record counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    Tree { level: u8 },
    Data { num_bytes: u64 },
}

impl ExtentKind {
    /// What the extent counts for: a tree block its nodesize, a data
    /// extent its whole length.
    fn bytes(self, nodesize: u64) -> u64 {
        match self {
            ExtentKind::Tree { .. } => nodesize,
            ExtentKind::Data { num_bytes } => num_bytes,
        }
    }
}

/// One extent traced in a transaction (kernel: struct
/// btrfs_qgroup_extent_record).
#[derive(Clone, Debug)]
struct Record {
    kind: ExtentKind,
    old_roots: Option<BTreeSet<u64>>,
}

/// The transaction's traced extents (kernel: the delayed ref root's
/// dirty_extent_root), kept with its delayed refs.
#[derive(Default)]
pub struct QgroupRecords {
    /// Quotas were enabled when the transaction started.
    pub tracing: Cell<bool>,
    /// A snapshot being made: references by its tree are not traced.
    skip: Cell<Option<u64>>,
    extents: RefCell<BTreeMap<u64, Record>>,
    /// Records without old roots yet, for the next resolution.
    unresolved: RefCell<BTreeSet<u64>>,
    /// Data reservations of finished writes, by subvolume, freed when this
    /// transaction's commit has counted their extents.
    data_rsv_done: RefCell<BTreeMap<u64, u64>>,
}

impl QgroupRecords {
    /// Record `bytenr`. A block allocated and freed in this transaction may
    /// come back at another level: the record takes the latest, which is
    /// what the new roots are looked up by (the old roots of such a block
    /// are none at any level; a block of the commit roots is pinned when
    /// freed, never reused within the transaction).
    fn record(&self, bytenr: u64, kind: ExtentKind) {
        let mut extents = self.extents.borrow_mut();
        let record = extents.entry(bytenr).or_insert_with(|| {
            self.unresolved.borrow_mut().insert(bytenr);
            Record { kind, old_roots: None }
        });
        record.kind = kind;
    }

    /// A reference change of a tree block by `root` (None: by a parent).
    pub fn trace_tree(&self, bytenr: u64, level: u8, root: Option<u64>) {
        if !self.tracing.get() {
            return;
        }
        if let Some(root) = root
            && (self.skip.get() == Some(root) || !(is_fstree(root) || root == TREE_RELOC_OBJECTID))
        {
            return;
        }
        self.record(bytenr, ExtentKind::Tree { level });
    }

    /// A reference change of a data extent by `root` (None: by a parent).
    pub fn trace_data(&self, bytenr: u64, num_bytes: u64, root: Option<u64>) {
        if !self.tracing.get() || (root.is_some() && root == self.skip.get()) {
            return;
        }
        self.record(bytenr, ExtentKind::Data { num_bytes });
    }
}

// ---------------------------------------------------------------------------
// The backref walk.

/// Resolves extents to the subvolumes that reach them in one view,
/// remembering each block's roots for the rest of the walk.
struct Walker<'a> {
    fs: &'a FsInfo,
    view: View,
    blocks: BTreeMap<u64, Rc<BTreeSet<u64>>>,
}

impl<'a> Walker<'a> {
    fn new(fs: &'a FsInfo, view: View) -> Walker<'a> {
        Walker { fs, view, blocks: BTreeMap::new() }
    }

    async fn roots(&mut self, bytenr: u64, kind: ExtentKind) -> Result<BTreeSet<u64>, Error> {
        match kind {
            ExtentKind::Tree { level } => Ok((*self.block_roots(bytenr, level).await?).clone()),
            ExtentKind::Data { num_bytes } => self.data_roots(bytenr, num_bytes).await,
        }
    }

    /// Read a block of the view: no generation to check against (the walk
    /// does not come from a parent pointer), any owner.
    async fn read(&self, ptr: BlockPtr) -> Result<Rc<ExtentBuffer>, Error> {
        read_tree_block_verified(self.fs, ptr.bytenr, 0, ptr.level, ptr.generation, None).await
    }

    /// The inline references of the extent item `key` in the view's extent
    /// tree; none if the item does not exist.
    async fn extent_refs(&self, key: Key) -> Result<Vec<InlineRef>, Error> {
        let Some(extent) = self.view.extent else { return Ok(Vec::new()) };
        let leaf = self.leaf_for(extent, &key).await?;
        let (found, slot) = bin_search(&leaf, 0, &key);
        if !found {
            return Ok(Vec::new());
        }
        let data = leaf.data.borrow();
        let item = ExtentItem::read(item_data(&data, slot), key.item_type)
            .map_err(|e| Error::BadTreeBlock(format!("qgroup backref walk: extent item {key}: {e}")))?;
        Ok(item.inline_refs)
    }

    /// The leaf of the tree rooted at `root` where `key` is or would be.
    async fn leaf_for(&self, root: BlockPtr, key: &Key) -> Result<Rc<ExtentBuffer>, Error> {
        self.block_above(root, key, 0).await
    }

    /// The block at `level` on the path to `key` in the tree rooted at `root`.
    async fn block_above(&self, root: BlockPtr, key: &Key, level: u8) -> Result<Rc<ExtentBuffer>, Error> {
        Ok(self.path_to(root, key, level).await?.0)
    }

    /// [`Self::block_above`], and the first key of the block after it at
    /// that level (None: it is the last).
    async fn path_to(
        &self,
        root: BlockPtr,
        key: &Key,
        level: u8,
    ) -> Result<(Rc<ExtentBuffer>, Option<Key>), Error> {
        let mut eb = self.read(root).await?;
        let mut next = None;
        while eb.level() > level {
            let (found, slot) = bin_search(&eb, 0, key);
            let slot = if found || slot == 0 { slot } else { slot - 1 };
            if slot + 1 < eb.nritems() as usize {
                next = Some(node_key(&eb.data.borrow(), slot + 1));
            }
            eb = read_node_slot(self.fs, &eb, slot).await?;
        }
        Ok((eb, next))
    }

    /// The subvolumes that reach the tree block `bytenr` (level `level`).
    async fn block_roots(&mut self, bytenr: u64, level: u8) -> Result<Rc<BTreeSet<u64>>, Error> {
        if let Some(roots) = self.blocks.get(&bytenr) {
            return Ok(roots.clone());
        }
        // A cycle cannot happen in a tree; an empty entry stops one anyway.
        self.blocks.insert(bytenr, Rc::new(BTreeSet::new()));
        self.fs.qgroup.stats.walked_blocks.set(self.fs.qgroup.stats.walked_blocks.get() + 1);
        let key = Key { objectid: bytenr, item_type: METADATA_ITEM_KEY, offset: u64::from(level) };
        let mut roots = BTreeSet::new();
        for inline in self.extent_refs(key).await? {
            match inline {
                InlineRef::TreeBlock { root } => {
                    let Some(&top) = self.view.subvols.get(&root) else { continue };
                    if top.bytenr == bytenr {
                        roots.insert(root);
                        continue;
                    }
                    let parent = self.parent_in(top, bytenr, level, root).await?;
                    roots.extend(Box::pin(self.block_roots(parent, level + 1)).await?.iter());
                }
                // A relocation tree's root block references itself.
                InlineRef::SharedBlock { parent } if parent == bytenr => {}
                InlineRef::SharedBlock { parent } => {
                    roots.extend(Box::pin(self.block_roots(parent, level + 1)).await?.iter());
                }
                other => {
                    return Err(Error::BadTreeBlock(format!(
                        "qgroup backref walk: tree block {bytenr} has a {other:?} reference"
                    )));
                }
            }
        }
        let roots = Rc::new(roots);
        self.blocks.insert(bytenr, roots.clone());
        Ok(roots)
    }

    /// The block of the tree rooted at `top` (tree `tree`) that points at
    /// `bytenr`, found by the block's first key one level up (kernel:
    /// resolve_indirect_ref).
    async fn parent_in(&self, top: BlockPtr, bytenr: u64, level: u8, tree: u64) -> Result<u64, Error> {
        let child = read_tree_block(self.fs, bytenr, 0, level, 0, None).await?;
        let first_key = child.first_key();
        drop(child);
        let missing = || {
            Error::BadTreeBlock(format!(
                "qgroup backref walk: tree {tree} names block {bytenr} (level {level}) but does not reach it"
            ))
        };
        let Some(first_key) = first_key else { return Err(missing()) };
        if top.level <= level {
            return Err(missing());
        }
        let parent = self.block_above(top, &first_key, level + 1).await?;
        let (found, slot) = bin_search(&parent, 0, &first_key);
        let slot = if found || slot == 0 { slot } else { slot - 1 };
        let points = {
            let data = parent.data.borrow();
            slot < header_nritems(&data) as usize && node_blockptr(&data, slot) == bytenr
        };
        if points { Ok(parent.start) } else { Err(missing()) }
    }

    /// The subvolumes that reach the data extent `bytenr`.
    async fn data_roots(&mut self, bytenr: u64, num_bytes: u64) -> Result<BTreeSet<u64>, Error> {
        let key = Key { objectid: bytenr, item_type: EXTENT_ITEM_KEY, offset: num_bytes };
        let mut roots = BTreeSet::new();
        for inline in self.extent_refs(key).await? {
            let leaves = match inline {
                InlineRef::ExtentData(r) => {
                    let Some(&top) = self.view.subvols.get(&r.root) else { continue };
                    self.leaves_naming(top, bytenr, r.objectid, r.offset, r.count).await?
                }
                InlineRef::SharedData { parent, .. } => vec![parent],
                other => {
                    return Err(Error::BadTreeBlock(format!(
                        "qgroup backref walk: data extent {bytenr} has a {other:?} reference"
                    )));
                }
            };
            for leaf in leaves {
                roots.extend(self.block_roots(leaf, 0).await?.iter());
            }
        }
        Ok(roots)
    }

    /// The leaves of the tree rooted at `top` holding the `count` file
    /// extents of inode `ino` that name `bytenr` with file offset minus
    /// extent offset `offset` (kernel: add_all_parents).
    async fn leaves_naming(
        &self,
        top: BlockPtr,
        bytenr: u64,
        ino: u64,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u64>, Error> {
        let mut leaves = Vec::new();
        let mut found = 0u32;
        // A reference offset that underflowed (a file extent starting before
        // its extent's data) is looked for from the inode's first extent, as
        // resolve_indirect_ref does.
        let from = if offset >= i64::MAX as u64 { 0 } else { offset };
        let mut key = Key { objectid: ino, item_type: EXTENT_DATA_KEY, offset: from };
        let last = Key { objectid: ino, item_type: EXTENT_DATA_KEY, offset: u64::MAX };
        while found < count {
            let (leaf, next) = self.path_to(top, &key, 0).await?;
            let (_, first) = bin_search(&leaf, 0, &key);
            let data = leaf.data.borrow();
            let nritems = header_nritems(&data) as usize;
            let mut holds = false;
            for slot in first..nritems {
                let item_key = item_key(&data, slot);
                if item_key > last {
                    break;
                }
                if let Ok(item) = FileExtentItem::read(item_data(&data, slot))
                    && let FileExtentBody::Regular { disk_bytenr, offset: in_extent, .. } = item.body
                    && disk_bytenr == bytenr
                    && item_key.offset.wrapping_sub(in_extent) == offset
                {
                    found += 1;
                    holds = true;
                }
            }
            drop(data);
            if holds {
                leaves.push(leaf.start);
            }
            match next {
                Some(next) if next > key && next <= last => key = next,
                _ => break,
            }
        }
        if found < count {
            return Err(Error::BadTreeBlock(format!(
                "qgroup backref walk: data extent {bytenr} has {count} references by inode {ino} offset {offset}, the tree holds {found}"
            )));
        }
        Ok(leaves)
    }
}

// ---------------------------------------------------------------------------
// Tracing and accounting.

/// Give every record traced since the last run its old roots, from the
/// commit roots, before delayed refs change the extent tree (kernel:
/// btrfs_qgroup_trace_extent_post at the delayed ref's insertion).
pub async fn resolve_old_roots(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let records = &handle.transaction.delayed_refs.qgroup;
    let unresolved = std::mem::take(&mut *records.unresolved.borrow_mut());
    if unresolved.is_empty() {
        return Ok(());
    }
    let pending: Vec<(u64, ExtentKind)> = {
        let extents = records.extents.borrow();
        unresolved.iter().filter_map(|bytenr| extents.get(bytenr).map(|r| (*bytenr, r.kind))).collect()
    };
    let mut walker = Walker::new(fs, fs.qgroup.commit_view.borrow().clone());
    for (i, &(bytenr, kind)) in pending.iter().enumerate() {
        let roots = match walker.roots(bytenr, kind).await {
            Ok(roots) => roots,
            Err(error) => {
                // Still owed their old roots (the error aborts the transaction).
                records.unresolved.borrow_mut().extend(pending[i..].iter().map(|&(b, _)| b));
                return Err(error);
            }
        };
        if let Some(record) = records.extents.borrow_mut().get_mut(&bytenr)
            && record.old_roots.is_none()
        {
            record.old_roots = Some(roots);
        }
    }
    Ok(())
}

/// `btrfs_qgroup_account_extents`: move the counters of every traced
/// extent from its old roots to its new ones. Every delayed ref has run.
/// `skip`: a snapshot being made, whose tree is left out (its qgroup is
/// inherited).
pub async fn account_extents(handle: &TransHandle, skip: Option<u64>) -> Result<(), Error> {
    let fs = &handle.fs;
    if !handle.transaction.delayed_refs.qgroup.tracing.get() {
        return Ok(());
    }
    resolve_old_roots(handle).await?;
    let records = std::mem::take(&mut *handle.transaction.delayed_refs.qgroup.extents.borrow_mut());
    let mut walker = Walker::new(fs, View::current(fs));
    let stats = &fs.qgroup.stats;
    for (bytenr, record) in records {
        let mut new_roots = walker.roots(bytenr, record.kind).await?;
        let mut old_roots =
            record.old_roots.expect("resolved above: every writer, and so every other resolver, is gone");
        if let Some(skip) = skip {
            old_roots.remove(&skip);
            new_roots.remove(&skip);
        }
        stats.accounted.set(stats.accounted.get() + 1);
        if old_roots == new_roots {
            continue;
        }
        stats.changed.set(stats.changed.get() + 1);
        update_counters(fs, bytenr, record.kind.bytes(u64::from(fs.nodesize)), &old_roots, &new_roots);
    }
    // The commit has counted what the finished writes wrote.
    let done = std::mem::take(&mut *handle.transaction.delayed_refs.qgroup.data_rsv_done.borrow_mut());
    for (root, bytes) in done {
        free_data(fs, root, bytes);
    }
    Ok(())
}

/// `qgroup_update_counters` for level-0 qgroups.
fn update_counters(fs: &FsInfo, bytenr: u64, num_bytes: u64, old: &BTreeSet<u64>, new: &BTreeSet<u64>) {
    let mut groups = fs.qgroup.groups.borrow_mut();
    for &root in old.union(new) {
        let Some(group) = groups.get_mut(&root) else { continue };
        let (was, is) = (old.contains(&root), new.contains(&root));
        let (was_excl, is_excl) = (was && old.len() == 1, is && new.len() == 1);
        let mut underflow = false;
        match (was, is) {
            (true, false) => underflow |= sub(&mut group.rfer, num_bytes),
            (false, true) => group.rfer += num_bytes,
            _ => {}
        }
        match (was_excl, is_excl) {
            (true, false) => underflow |= sub(&mut group.excl, num_bytes),
            (false, true) => group.excl += num_bytes,
            _ => {}
        }
        fs.qgroup.mark_dirty(root);
        if underflow {
            fs.qgroup.status_flags.set(fs.qgroup.status_flags.get() | QGROUP_STATUS_FLAG_INCONSISTENT);
            fs.env.report_violation(Violation {
                kind: "qgroup_underflow",
                message: format!(
                    "qgroup 0/{root}: extent {bytenr} ({num_bytes} bytes) leaves roots {old:?} for {new:?} and a count would go below zero"
                ),
            });
        }
    }
}

/// Subtract, clamping at zero; whether it had to clamp.
fn sub(count: &mut u64, bytes: u64) -> bool {
    match count.checked_sub(bytes) {
        Some(left) => {
            *count = left;
            false
        }
        None => {
            *count = 0;
            true
        }
    }
}

/// The trees as committed now become the old roots' view (kernel:
/// switch_commit_roots).
pub fn switch_commit_roots(fs: &FsInfo) {
    *fs.qgroup.commit_view.borrow_mut() = View::current(fs);
}

/// Visit every block of the subtree under `top` and every data extent its
/// leaves' file extents name (as often as they are named).
async fn walk_subtree(
    fs: &FsInfo,
    top: Rc<ExtentBuffer>,
    mut visit: impl FnMut(u64, ExtentKind),
) -> Result<(), Error> {
    let mut stack = vec![top];
    while let Some(eb) = stack.pop() {
        visit(eb.start, ExtentKind::Tree { level: eb.level() });
        let nritems = eb.nritems() as usize;
        if eb.level() > 0 {
            for slot in 0..nritems {
                stack.push(read_node_slot(fs, &eb, slot).await?);
            }
            continue;
        }
        let data = eb.data.borrow();
        for slot in 0..nritems {
            if item_key(&data, slot).item_type == EXTENT_DATA_KEY
                && let Ok(item) = FileExtentItem::read(item_data(&data, slot))
                && let FileExtentBody::Regular { disk_bytenr, disk_num_bytes, .. } = item.body
                && disk_bytenr != 0
            {
                visit(disk_bytenr, ExtentKind::Data { num_bytes: disk_num_bytes });
            }
        }
    }
    Ok(())
}

/// `btrfs_qgroup_trace_subtree`: record every block and data extent under
/// the block `bytenr` of a dropped subvolume that another tree still
/// references: the subtree loses a root with no reference change below
/// this block.
pub async fn trace_subtree(
    handle: &TransHandle,
    bytenr: u64,
    level: u8,
    generation: u64,
    first_key: Option<Key>,
) -> Result<(), Error> {
    let records = &handle.transaction.delayed_refs.qgroup;
    if !records.tracing.get() {
        return Ok(());
    }
    let fs = &handle.fs;
    let top = read_tree_block_verified(fs, bytenr, 0, level, generation, first_key).await?;
    walk_subtree(fs, top, |bytenr, kind| {
        if let ExtentKind::Tree { .. } = kind {
            fs.qgroup.stats.subtree_traced.set(fs.qgroup.stats.subtree_traced.get() + 1);
        }
        records.record(bytenr, kind);
    })
    .await
}

/// `qgroup_account_snapshot`, called by the commit once the snapshot
/// `objectid` of `source` exists and every delayed ref has run: count all
/// that came before, give the snapshot its inherited qgroup, commit the
/// roots and write every dirty block of the transaction, so that later
/// changes of the source in this transaction COW again and later old roots
/// come from the state just counted.
pub async fn account_snapshot(handle: &TransHandle, source: &Rc<Root>, objectid: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    if !handle.transaction.delayed_refs.qgroup.tracing.get() {
        return Ok(());
    }
    // commit_fs_roots: the source's root item is written and it COWs as
    // usual again.
    crate::transaction::update_root(handle, source).await?;
    source.force_cow.set(false);
    crate::extent_tree::run_delayed_refs(handle).await?;
    account_extents(handle, Some(objectid)).await?;
    inherit(fs, source.objectid, objectid);
    // commit_cowonly_roots, switch_commit_roots, btrfs_write_and_wait_transaction.
    run_qgroups(handle).await?;
    // The block group items of chunks allocated so far exist before the
    // root items and block groups are written (the kernel inserts them as
    // each handle ends).
    crate::transaction::create_pending_block_groups(handle).await?;
    crate::transaction::commit_roots(handle).await?;
    switch_commit_roots(fs);
    let dirty: Vec<u64> = handle.transaction.dirty_ebs.borrow().iter().copied().collect();
    crate::extent_io::write_and_wait_ebs(fs, &dirty).await?;
    Ok(())
}

/// `btrfs_qgroup_inherit` for a snapshot: the new qgroup references what
/// its source does, and each has only its root block to itself.
fn inherit(fs: &FsInfo, source: u64, objectid: u64) {
    let nodesize = u64::from(fs.nodesize);
    let mut groups = fs.qgroup.groups.borrow_mut();
    let rfer = groups.get(&source).map_or(0, |group| group.rfer);
    groups.insert(objectid, Qgroup { rfer, excl: nodesize, ..Default::default() });
    if let Some(group) = groups.get_mut(&source) {
        group.excl = nodesize;
    }
    drop(groups);
    fs.qgroup.mark_dirty(source);
    fs.qgroup.mark_dirty(objectid);
    fs.qgroup.stats.snapshots.set(fs.qgroup.stats.snapshots.get() + 1);
}

/// Trace the snapshot `objectid` being made: references by its tree are
/// not recorded until [`clear_skip`].
pub fn set_skip(handle: &TransHandle, objectid: u64) {
    handle.transaction.delayed_refs.qgroup.skip.set(Some(objectid));
}

pub fn clear_skip(handle: &TransHandle) {
    handle.transaction.delayed_refs.qgroup.skip.set(None);
}

// ---------------------------------------------------------------------------
// The quota tree.

fn status_key() -> Key {
    Key { objectid: 0, item_type: QGROUP_STATUS_KEY, offset: 0 }
}

/// Write `payload` as the item `key` of `root`, replacing it if it exists.
async fn put_item(handle: &TransHandle, root: &Rc<Root>, key: Key, payload: &[u8]) -> Result<(), Error> {
    let mut path = Path::new();
    if search_slot(Some(handle), root, &key, &mut path, 0, true).await? {
        let leaf = path.nodes[0].clone().expect("a found item has a leaf");
        {
            let mut data = leaf.data.borrow_mut();
            let bytes = crate::accessors::item_data_mut(&mut data, path.slots[0]);
            if bytes.len() != payload.len() {
                return Err(Error::BadTreeBlock(format!("quota tree item {key} has size {}", bytes.len())));
            }
            bytes.copy_from_slice(payload);
        }
        mark_buffer_dirty(handle, &leaf);
        return Ok(());
    }
    drop(path);
    insert_item(handle, root, &key, payload).await
}

/// `btrfs_run_qgroups`: write the info and limit items of every qgroup
/// that changed, and the status item, into the quota tree.
pub async fn run_qgroups(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    if !fs.qgroup.enabled.get() {
        return Ok(());
    }
    let Some(quota_root) = fs.roots.borrow().get(&QUOTA_TREE_OBJECTID).cloned() else {
        return Err(Error::BadTreeBlock("quotas are enabled but there is no quota tree".into()));
    };
    let dirty = std::mem::take(&mut *fs.qgroup.dirty.borrow_mut());
    for id in dirty {
        let Some(group) = fs.qgroup.groups.borrow().get(&id).cloned() else { continue };
        let info = QgroupInfoItem {
            generation: handle.transid,
            rfer: group.rfer,
            rfer_cmpr: group.rfer,
            excl: group.excl,
            excl_cmpr: group.excl,
        };
        let key = Key { objectid: 0, item_type: QGROUP_INFO_KEY, offset: id };
        put_item(handle, &quota_root, key, &info.to_bytes()).await?;
        let key = Key { objectid: 0, item_type: QGROUP_LIMIT_KEY, offset: id };
        put_item(handle, &quota_root, key, &group.limit.to_bytes()).await?;
    }
    let status = QgroupStatusItem {
        version: QGROUP_STATUS_VERSION,
        generation: handle.transid,
        flags: fs.qgroup.status_flags.get(),
        rescan: 0,
    };
    put_item(handle, &quota_root, status_key(), &status.to_bytes()).await
}

/// Load the qgroup items of a mounted filesystem (kernel:
/// btrfs_read_qgroup_config).
pub async fn read_qgroup_config(fs: &FsInfo) -> Result<(), Error> {
    let Some(quota_root) = fs.roots.borrow().get(&QUOTA_TREE_OBJECTID).cloned() else { return Ok(()) };
    let node = quota_root.node();
    let mut status = None;
    let mut groups: BTreeMap<u64, Qgroup> = BTreeMap::new();
    let bad = |key: &Key| Error::BadTreeBlock(format!("quota tree item {key} has a bad size"));
    for_each_leaf_item(fs, QUOTA_TREE_OBJECTID, node.start, node.level(), node.generation(), |key, data| {
        match key.item_type {
            QGROUP_STATUS_KEY if data.len() >= QgroupStatusItem::SIZE => {
                status = Some(QgroupStatusItem::read(data))
            }
            QGROUP_INFO_KEY if data.len() >= QgroupInfoItem::SIZE => {
                let info = QgroupInfoItem::read(data);
                let group = groups.entry(key.offset).or_default();
                group.rfer = info.rfer;
                group.excl = info.excl;
            }
            QGROUP_LIMIT_KEY if data.len() >= QgroupLimitItem::SIZE => {
                groups.entry(key.offset).or_default().limit = QgroupLimitItem::read(data);
            }
            QGROUP_STATUS_KEY | QGROUP_INFO_KEY | QGROUP_LIMIT_KEY => return Err(bad(key)),
            _ => {}
        }
        Ok(())
    })
    .await?;
    let Some(status) = status else {
        return Err(Error::BadTreeBlock("quota tree has no status item".into()));
    };
    fs.qgroup.status_flags.set(status.flags);
    fs.qgroup.enabled.set(status.flags & QGROUP_STATUS_FLAG_ON != 0);
    *fs.qgroup.groups.borrow_mut() = groups;
    Ok(())
}

/// `btrfs_quota_enable`: create the quota tree and its status item in a
/// transaction whose commit counts every subvolume ([`rescan_in_commit`]).
pub async fn quota_enable(fs: &Rc<FsInfo>) -> Result<(), Error> {
    crate::inode::trace_op(fs, "quota_enable", do_quota_enable(fs).await)
}

/// Items the enabling transaction inserts: the quota tree's root item and
/// its status item.
const QUOTA_ENABLE_ITEMS: u64 = 2;

async fn do_quota_enable(fs: &Rc<FsInfo>) -> Result<(), Error> {
    crate::transaction::check_fs_error(fs)?;
    if fs.qgroup.enabled.get() {
        return Ok(());
    }
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    let handle =
        crate::transaction::start_transaction(fs, &tree_root, QUOTA_ENABLE_ITEMS, "quota_enable").await?;
    let result = async {
        if !fs.roots.borrow().contains_key(&QUOTA_TREE_OBJECTID) {
            create_quota_tree(&handle).await?;
        }
        fs.qgroup.enable_pending.set(true);
        Ok(())
    }
    .await;
    if let Err(error) = &result {
        crate::transaction::abort_transaction(&handle, error, "btrfs_quota_enable");
        crate::transaction::end_transaction(handle);
        return result;
    }
    crate::transaction::commit_transaction(handle).await
}

/// `btrfs_create_tree` for the quota tree, with its status item.
async fn create_quota_tree(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let placeholder = crate::extent_io::alloc_dummy_extent_buffer(fs, 0);
    let root = Root::new(fs, QUOTA_TREE_OBJECTID, placeholder, RootItem { refs: 1, ..Default::default() });
    let leaf = crate::extent_tree::alloc_tree_block(handle, &root, 0).await?;
    root.set_node(leaf.clone());
    crate::locking::tree_unlock(&leaf);
    {
        let mut item = root.root_item.borrow_mut();
        item.bytenr = leaf.start;
        item.level = 0;
        item.generation = handle.transid;
        item.generation_v2 = handle.transid;
    }
    let key = Key { objectid: QUOTA_TREE_OBJECTID, item_type: ROOT_ITEM_KEY, offset: 0 };
    let bytes = root.root_item.borrow().to_bytes();
    insert_item(handle, &fs.root(ROOT_TREE_OBJECTID), &key, &bytes).await?;
    fs.roots.borrow_mut().insert(QUOTA_TREE_OBJECTID, root.clone());
    let status =
        QgroupStatusItem { version: QGROUP_STATUS_VERSION, generation: handle.transid, flags: 0, rescan: 0 };
    insert_item(handle, &root, &status_key(), &status.to_bytes()).await
}

/// In the commit of the transaction that enabled quotas, with every
/// writer gone and every delayed ref run: count each subvolume from its
/// trees (every block and data extent it reaches, and those only it
/// reaches), and trace from the next transaction on.
pub async fn rescan_in_commit(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    if !fs.qgroup.enable_pending.take() {
        return Ok(());
    }
    let view = View::current(fs);
    let reached = reach(fs, &view).await?;
    let mut groups: BTreeMap<u64, Qgroup> =
        view.subvols.keys().map(|&tree| (tree, Qgroup::default())).collect();
    for (bytes, trees) in reached.values() {
        for tree in trees {
            let group = groups.get_mut(tree).expect("one per subvolume");
            group.rfer += bytes;
            if trees.len() == 1 {
                group.excl += bytes;
            }
        }
    }
    // Limits set before (none here: limits need quotas on) are kept.
    let mut current = fs.qgroup.groups.borrow_mut();
    for (tree, group) in &mut groups {
        if let Some(old) = current.get(tree) {
            group.limit = old.limit;
        }
    }
    *current = groups;
    let ids: Vec<u64> = current.keys().copied().collect();
    drop(current);
    for id in ids {
        fs.qgroup.mark_dirty(id);
    }
    fs.qgroup.status_flags.set(QGROUP_STATUS_FLAG_ON);
    fs.qgroup.enabled.set(true);
    Ok(())
}

/// Every tree block and data extent the subvolumes of `view` reach, with
/// its length and the subvolumes reaching it.
async fn reach(fs: &FsInfo, view: &View) -> Result<BTreeMap<u64, (u64, BTreeSet<u64>)>, Error> {
    let mut reached: BTreeMap<u64, (u64, BTreeSet<u64>)> = BTreeMap::new();
    let nodesize = u64::from(fs.nodesize);
    for (&tree, &top) in &view.subvols {
        let top = read_tree_block_verified(fs, top.bytenr, 0, top.level, top.generation, None).await?;
        walk_subtree(fs, top, |bytenr, kind| {
            reached.entry(bytenr).or_insert((kind.bytes(nodesize), BTreeSet::new())).1.insert(tree);
        })
        .await?;
    }
    Ok(reached)
}

/// `btrfs_limit_qgroup`: limit what the subvolume `objectid` references
/// (`max_rfer`) and alone references (`max_excl`); None lifts a limit.
/// Written by the next commit. EINVAL without quotas, ENOENT for a
/// subvolume without a qgroup.
pub async fn limit_qgroup(
    fs: &Rc<FsInfo>,
    objectid: u64,
    max_rfer: Option<u64>,
    max_excl: Option<u64>,
) -> Result<(), Error> {
    crate::transaction::check_fs_error(fs)?;
    if !fs.qgroup.enabled.get() {
        return Err(Error::Einval);
    }
    let tree_root = fs.root(QUOTA_TREE_OBJECTID);
    let handle = crate::transaction::start_transaction(fs, &tree_root, 1, "qgroup_limit").await?;
    let result = {
        let mut groups = fs.qgroup.groups.borrow_mut();
        match groups.get_mut(&objectid) {
            None => Err(Error::Enoent),
            Some(group) => {
                let limit = &mut group.limit;
                limit.flags &= !(QGROUP_LIMIT_MAX_RFER | QGROUP_LIMIT_MAX_EXCL);
                limit.max_rfer = max_rfer.unwrap_or(0);
                limit.max_excl = max_excl.unwrap_or(0);
                if max_rfer.is_some() {
                    limit.flags |= QGROUP_LIMIT_MAX_RFER;
                }
                if max_excl.is_some() {
                    limit.flags |= QGROUP_LIMIT_MAX_EXCL;
                }
                Ok(())
            }
        }
    };
    if result.is_ok() {
        fs.qgroup.mark_dirty(objectid);
    }
    crate::transaction::end_transaction(handle);
    result
}

// ---------------------------------------------------------------------------
// Data reservations.

/// Whether `bytes` more would pass a limit of `group` (kernel:
/// qgroup_check_limits).
fn exceeds_limits(group: &Qgroup, bytes: u64) -> bool {
    let limit = &group.limit;
    let over = |count: u64, max: u64| count.saturating_add(group.rsv_data).saturating_add(bytes) > max;
    (limit.flags & QGROUP_LIMIT_MAX_RFER != 0 && over(group.rfer, limit.max_rfer))
        || (limit.flags & QGROUP_LIMIT_MAX_EXCL != 0 && over(group.excl, limit.max_excl))
}

/// Try to reserve `bytes` of data for the subvolume `root`: false if a
/// limit would be passed.
fn try_reserve_data(fs: &FsInfo, root: u64, bytes: u64) -> bool {
    let mut groups = fs.qgroup.groups.borrow_mut();
    let Some(group) = groups.get_mut(&root) else { return true };
    if exceeds_limits(group, bytes) {
        return false;
    }
    group.rsv_data += bytes;
    true
}

/// `btrfs_qgroup_reserve_data`: reserve the new sectors of a buffered
/// write against the limits of the subvolume `root`; if they would pass
/// one, commit (which counts the writes that finished and frees their
/// reservations) and try once more; then EDQUOT.
pub async fn reserve_data(fs: &Rc<FsInfo>, root: u64, bytes: u64) -> Result<(), Error> {
    if !fs.qgroup.enabled.get() || !is_fstree(root) || bytes == 0 {
        return Ok(());
    }
    if try_reserve_data(fs, root, bytes) {
        return Ok(());
    }
    crate::file::sync_fs(fs).await?;
    if try_reserve_data(fs, root, bytes) {
        return Ok(());
    }
    fs.qgroup.stats.edquot.set(fs.qgroup.stats.edquot.get() + 1);
    Err(Error::Edquot)
}

/// `btrfs_qgroup_free_data`: a reservation no extent will count (a dirty
/// page dropped, an inline extent, a failed write).
pub fn free_data(fs: &FsInfo, root: u64, bytes: u64) {
    if bytes == 0 {
        return;
    }
    let mut groups = fs.qgroup.groups.borrow_mut();
    let Some(group) = groups.get_mut(&root) else { return };
    // Pages dirtied before quotas were enabled hold no reservation (the
    // kernel marks reserved ranges, EXTENT_QGROUP_RESERVED): the free stops
    // at zero.
    sub(&mut group.rsv_data, bytes);
}

/// `btrfs_qgroup_release_data`: a write finished in `handle`'s transaction;
/// its reservation is freed once that transaction's commit counted it.
pub fn data_written(handle: &TransHandle, root: u64, bytes: u64) {
    let fs = &handle.fs;
    if !fs.qgroup.groups.borrow().contains_key(&root) {
        return;
    }
    *handle.transaction.delayed_refs.qgroup.data_rsv_done.borrow_mut().entry(root).or_insert(0) += bytes;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{sync_fs, truncate, write};
    use crate::format::FS_TREE_OBJECTID;
    use crate::inode::testing::{check_clean, crash_and_mount, mount, populate, run};
    use crate::inode::{ROOT_DIR_INO, create, unlink};
    use crate::ioctl::{create_snapshot, delete_snapshot};

    fn group(fs: &FsInfo, id: u64) -> Qgroup {
        fs.qgroup.groups.borrow().get(&id).cloned().unwrap_or_else(|| panic!("no qgroup 0/{id}"))
    }

    fn enable(env: &crate::testenv::TestEnv, fs: &Rc<FsInfo>) {
        run(env, fs, |fs| async move { quota_enable(&fs).await }).unwrap();
    }

    /// A filesystem with `files` files and quotas on.
    fn quota_fs(files: usize) -> (Rc<crate::testenv::TestEnv>, Rc<FsInfo>) {
        let (env, fs) = mount();
        populate(&env, &fs, files);
        enable(&env, &fs);
        (env, fs)
    }

    /// A snapshot of the fs tree; its id.
    fn snapshot(env: &crate::testenv::TestEnv, fs: &Rc<FsInfo>) -> u64 {
        run(env, fs, |fs| async move { create_snapshot(&fs, FS_TREE_OBJECTID).await }).unwrap()
    }

    /// Delete the snapshot `id` and commit.
    fn delete(env: &crate::testenv::TestEnv, fs: &Rc<FsInfo>, id: u64) {
        run(env, fs, move |fs| async move {
            delete_snapshot(&fs, id).await?;
            sync_fs(&fs).await
        })
        .unwrap();
    }

    /// Rewrite every tenth file and add a few, then commit.
    fn churn(env: &crate::testenv::TestEnv, fs: &Rc<FsInfo>, round: u8) {
        churn_files(env, fs, round, 10);
    }

    /// Rewrite every `step`th file and add a few, then commit.
    fn churn_files(env: &crate::testenv::TestEnv, fs: &Rc<FsInfo>, round: u8, step: usize) {
        run(env, fs, move |fs| async move {
            for i in (0..300u64).step_by(step) {
                let (ino, _) = crate::inode::lookup(&fs, ROOT_DIR_INO, &format!("file-{i:04}"))
                    .await?
                    .expect("populated");
                write(&fs, ino, 4096, &vec![round; 9000]).await?;
            }
            for i in 0..8 {
                let ino = create(&fs, ROOT_DIR_INO, &format!("new-{round}-{i}")).await?;
                write(&fs, ino, 0, &vec![round; 70_000]).await?;
            }
            sync_fs(&fs).await
        })
        .unwrap();
    }

    #[test]
    fn enabling_counts_the_fs_tree_and_every_commit_keeps_the_counts_exact() {
        let (env, fs) = quota_fs(300);
        let first = group(&fs, FS_TREE_OBJECTID);
        assert!(first.rfer > 300 * 8192, "300 data extents and the tree: {first:?}");
        assert_eq!(first.rfer, first.excl, "nothing is shared without snapshots");
        check_clean(&env);
        churn(&env, &fs, 1);
        let after = group(&fs, FS_TREE_OBJECTID);
        assert!(after.rfer > first.rfer, "eight 70 KB files more: {after:?} after {first:?}");
        assert!(fs.qgroup.stats.changed.get() > 0);
        check_clean(&env);
        // Deleting files gives their extents back.
        run(&env, &fs, |fs| async move {
            for i in 0..8 {
                unlink(&fs, ROOT_DIR_INO, &format!("new-1-{i}")).await?;
            }
            sync_fs(&fs).await
        })
        .unwrap();
        assert!(group(&fs, FS_TREE_OBJECTID).rfer < after.rfer - 8 * 69_632);
        check_clean(&env);
        assert_eq!(group(&fs, FS_TREE_OBJECTID).rsv_data, 0, "every reservation was counted or freed");
    }

    #[test]
    fn a_snapshot_inherits_its_source_and_shared_bytes_stop_being_exclusive() {
        let (env, fs) = quota_fs(300);
        churn(&env, &fs, 1);
        let id = snapshot(&env, &fs);
        let (source, snapshot) = (group(&fs, FS_TREE_OBJECTID), group(&fs, id));
        let nodesize = u64::from(fs.nodesize);
        // The snapshot's entry changed the source's path to its top
        // directory's entries after the copy: each has that path, and its
        // root, to itself.
        let path = nodesize * (u64::from(fs.root(FS_TREE_OBJECTID).node().level()) + 1);
        assert_eq!(snapshot.rfer, source.rfer, "the snapshot references what its source does");
        assert_eq!(source.excl, snapshot.excl);
        // The root, and the leaves of the directory's entry, index and inode.
        let linking = path + 2 * nodesize;
        assert!(
            (nodesize..=linking).contains(&source.excl),
            "{source:?}: more than the linking path is its own"
        );
        assert_eq!(fs.qgroup.stats.snapshots.get(), 1);
        check_clean(&env);
        // The source moves on: what it rewrites becomes exclusive again.
        // The leaves it leaves alone stay shared: the drop skips them.
        churn_files(&env, &fs, 2, 150);
        let moved = group(&fs, FS_TREE_OBJECTID);
        assert!(moved.excl > 30 * 8192, "rewritten extents and COWed blocks are the source's: {moved:?}");
        assert_eq!(group(&fs, id).rfer, snapshot.rfer, "the snapshot is unchanged");
        assert!(group(&fs, id).excl > nodesize, "what the source replaced is the snapshot's alone now");
        check_clean(&env);
        // Dropping the snapshot hands everything back to the source.
        delete(&env, &fs, id);
        let alone = group(&fs, FS_TREE_OBJECTID);
        assert_eq!(alone.rfer, alone.excl, "nothing is shared any more");
        assert_eq!((group(&fs, id).rfer, group(&fs, id).excl), (0, 0));
        assert!(fs.qgroup.stats.subtree_traced.get() > 0, "the drop skipped shared subtrees");
        check_clean(&env);
    }

    #[test]
    fn snapshots_a_deletion_and_a_crash_keep_the_counts_of_the_committed_image() {
        let (env, fs) = quota_fs(300);
        let mut ids = Vec::new();
        for round in 1..=3 {
            churn(&env, &fs, round);
            ids.push(snapshot(&env, &fs));
        }
        delete(&env, &fs, ids[1]);
        check_clean(&env);
        // Work that is not committed when the power goes.
        run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "late").await?;
            write(&fs, ino, 0, &vec![7; 100_000]).await?;
            crate::file::write_and_wait_inode(&fs, ino).await
        })
        .unwrap();
        let fs = crash_and_mount(&env);
        assert!(fs.qgroup.enabled.get(), "quotas stay on across a mount");
        check_clean(&env);
        churn(&env, &fs, 9);
        check_clean(&env);
    }

    #[test]
    fn a_write_past_the_referenced_limit_fails_with_edquot_until_space_is_freed() {
        let (env, fs) = quota_fs(20);
        let used = group(&fs, FS_TREE_OBJECTID).rfer;
        run(&env, &fs, move |fs| async move {
            limit_qgroup(&fs, FS_TREE_OBJECTID, Some(used + (1 << 20)), None).await
        })
        .unwrap();
        let result = run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "big").await?;
            write(&fs, ino, 0, &vec![1; 512 << 10]).await?;
            sync_fs(&fs).await?;
            // Within the limit only while the first half is counted.
            write(&fs, ino, 512 << 10, &vec![2; 768 << 10]).await
        });
        assert_eq!(result.map_err(|e| e.errno()), Err(crate::error::EDQUOT));
        assert_eq!(fs.qgroup.stats.edquot.get(), 1);
        check_clean(&env);
        let result = run(&env, &fs, |fs| async move {
            let (ino, _) = crate::inode::lookup(&fs, ROOT_DIR_INO, "big").await?.expect("created");
            truncate(&fs, ino, 0).await?;
            sync_fs(&fs).await?;
            write(&fs, ino, 0, &vec![3; 768 << 10]).await?;
            sync_fs(&fs).await
        });
        assert_eq!(result.map_err(|e| e.errno()), Ok(()), "truncating gave the bytes back");
        assert!(group(&fs, FS_TREE_OBJECTID).rfer <= used + (1 << 20));
        check_clean(&env);
        // The limit is on disk.
        let fs = crash_and_mount(&env);
        let limit = group(&fs, FS_TREE_OBJECTID).limit;
        assert_eq!((limit.flags, limit.max_rfer), (QGROUP_LIMIT_MAX_RFER, used + (1 << 20)));
    }

    #[test]
    fn limits_need_quotas_and_a_qgroup() {
        let (env, fs) = mount();
        let errno = |r: Result<(), Error>| r.map_err(|e| e.errno());
        let result =
            run(&env, &fs, |fs| async move { limit_qgroup(&fs, FS_TREE_OBJECTID, Some(1), None).await });
        assert_eq!(errno(result), Err(crate::error::EINVAL));
        enable(&env, &fs);
        let result = run(&env, &fs, |fs| async move { limit_qgroup(&fs, 999, Some(1), None).await });
        assert_eq!(errno(result), Err(crate::error::ENOENT));
    }

    #[test]
    fn relocation_moves_blocks_without_changing_what_subvolumes_reference() {
        let (env, fs) = quota_fs(300);
        let id = snapshot(&env, &fs);
        churn(&env, &fs, 1);
        let before = fs.qgroup.snapshot();
        let group_start = fs
            .block_groups
            .all()
            .into_iter()
            .filter(|g| g.flags & crate::format::BLOCK_GROUP_METADATA != 0)
            .max_by_key(|g| g.used.get())
            .map(|g| g.start)
            .unwrap();
        run(&env, &fs, move |fs| async move {
            crate::relocation::relocate_block_group(&fs, group_start).await?;
            sync_fs(&fs).await
        })
        .unwrap();
        assert!(fs.reloc.stats.borrow().blocks_moved > 0);
        let after = fs.qgroup.snapshot();
        for tree in [FS_TREE_OBJECTID, id] {
            assert_eq!((after[&tree].rfer, after[&tree].excl), (before[&tree].rfer, before[&tree].excl));
        }
        check_clean(&env);
    }
}

#[cfg(test)]
mod snapshot_pair_tests {
    use super::*;
    use crate::format::FS_TREE_OBJECTID;
    use crate::inode::testing::{check_clean, mount, populate, run};
    use crate::transaction::{PendingSnapshot, commit_transaction, start_transaction};

    /// Two snapshots of one source in one commit: the second copies the
    /// root block the first accounting counted, so its old roots must come
    /// from the commit roots that accounting switched to.
    #[test]
    fn two_snapshots_in_one_commit_count_the_second_against_the_first() {
        let (env, fs) = mount();
        populate(&env, &fs, 300);
        run(&env, &fs, |fs| async move { quota_enable(&fs).await }).unwrap();
        let ids = run(&env, &fs, |fs| async move {
            let root = fs.root(FS_TREE_OBJECTID);
            let handle = start_transaction(&fs, &root, 14, "snapshot").await?;
            let pending: Vec<Rc<PendingSnapshot>> = (0..2)
                .map(|_| {
                    Rc::new(PendingSnapshot {
                        source: FS_TREE_OBJECTID,
                        objectid: Default::default(),
                        rsv: Default::default(),
                    })
                })
                .collect();
            handle.transaction.pending_snapshots.borrow_mut().extend(pending.iter().cloned());
            commit_transaction(handle).await?;
            Ok::<_, Error>(pending.iter().map(|p| p.objectid.get().expect("made")).collect::<Vec<_>>())
        })
        .unwrap();
        let groups = fs.qgroup.snapshot();
        let nodesize = u64::from(fs.nodesize);
        assert_eq!(groups[&ids[0]].rfer, groups[&FS_TREE_OBJECTID].rfer);
        assert_eq!(groups[&ids[1]].rfer, groups[&FS_TREE_OBJECTID].rfer);
        assert!(groups[&ids[0]].excl <= 3 * nodesize, "{:?}", groups[&ids[0]]);
        assert_eq!(fs.qgroup.stats.snapshots.get(), 2);
        check_clean(&env);
    }
}

#[cfg(test)]
mod overwrite_written_tests {
    use super::*;
    use crate::fix::FixPolicy;
    use crate::format::FS_TREE_OBJECTID;
    use crate::inode::testing::{mount_with, populate, run};
    use crate::inode::{ROOT_DIR_INO, create};
    use crate::ioctl::create_snapshot;

    /// With quotas on, the snapshot's accounting clears FORCE_COW and
    /// writes the transaction's blocks mid-commit, counting on WRITTEN to
    /// make the source COW them before the snapshot's entry goes into the
    /// source. A block the transaction changed before the copy is shared
    /// with the snapshot by then; `overwrite-written` changes it in place,
    /// so the snapshot gets its own entry. Without quotas FORCE_COW holds
    /// to the end of the commit and the fix leaves the snapshot alone.
    #[test]
    fn with_quotas_overwrite_written_changes_the_snapshot_through_its_own_entry() {
        for (fix, quotas) in [
            (FixPolicy::None, true),
            (FixPolicy::OverwriteWritten, false),
            (FixPolicy::OverwriteWritten, true),
        ] {
            let (env, fs) = mount_with(fix);
            populate(&env, &fs, 300);
            if quotas {
                run(&env, &fs, |fs| async move { quota_enable(&fs).await }).unwrap();
            }
            // A name in the top directory in the snapshot's transaction: its
            // leaf is COWed by that transaction before the copy.
            let id = run(&env, &fs, |fs| async move {
                create(&fs, ROOT_DIR_INO, "late").await?;
                create_snapshot(&fs, FS_TREE_OBJECTID).await
            })
            .unwrap();
            let dyn_env: Rc<dyn crate::env::Env> = env.clone();
            let report = env.run(crate::check::check(dyn_env)).expect("check mounts");
            let changed = report.errors.iter().any(|e| e.contains("made after this snapshot"));
            let expected = fix == FixPolicy::OverwriteWritten && quotas;
            assert_eq!(changed, expected, "{fix:?} quotas {quotas}: snapshot {id}: {:#?}", report.errors);
        }
    }
}
