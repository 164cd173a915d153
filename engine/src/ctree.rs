//! COW B-trees (kernel: ctree.c, ctree.h): roots, paths, `search_slot` with
//! lock coupling and restarts, COW, leaf and node split, push and balance,
//! insertion and deletion of items, walking to the next and previous leaf.
//!
//! Every function here follows its namesake in fs/btrfs/ctree.c, branch for
//! branch; the byte moves inside a block are `accessors.rs`'s. What a
//! btrfs developer should know:
//!
//! - `search_slot` restarts (`goto again`) for the kernel's four reasons:
//!   a block needs COW above `write_lock_level` or under a parent that is not
//!   write-locked ([`RestartReason::WriteLock`]); a node needs a split or a
//!   merge and is not locked high enough (`SetupNodes`, which also covers the
//!   node `balance_level` removed from under the path); slot 0 of a node on
//!   an insert or delete without the parent's write lock (`SlotZero`); a
//!   child not cached or not up to date (`ReadBlock`, the kernel's -EAGAIN
//!   from `read_block_for_search`). Every restart is counted in
//!   `fs.search_stats`, traced, releases the path and passes the
//!   [`SwitchPoint::PathRelease`] switch point, where reclaim may write back
//!   what the search just COWed: the COW amplification loop.
//! - `should_cow_block` and the three fixes of fix-variants.md: `search-pin`
//!   (blockers on what the search COWed, dropped when it returns),
//!   `overwrite-written` (redirty a WRITTEN block of the running transaction
//!   instead of COWing it), `inhibit-writeback` (the handle inhibits what it
//!   COWed or chose not to COW).
//!
//! Departures from ctree.c, each for a reason:
//! - No tree mod log; no readahead; no `nowait` paths; no
//!   commit-root searches.
//! - `read_block_for_search` allocates the extent buffer (charging memory,
//!   where reclaim can run) with the parent still locked, as the kernel's
//!   `btrfs_find_create_tree_block` does, then releases the path and reads;
//!   the kernel additionally holds a read lock on the new buffer during the
//!   read, which nothing here can observe.
//! - The COWs counted for a search ([`SearchStats::cows_per_search`],
//!   [`TraceEvent::SearchDone`]) are those of its descent (the ones the
//!   `search-pin` patch pins), not the sibling COWs of pushes and balances;
//!   every COW is traced as [`TraceEvent::Cow`].
//! - `del_items` marks a root leaf it emptied dirty (the kernel relies on
//!   it being dirty already).
//! - `search-pin`: the patch's `xa_alloc` can fail (the search then returns
//!   the error); nothing here fails to allocate, so that branch is absent.
//!   The blockers are also dropped if a search future is dropped half-way.
//! - Where the kernel aborts the transaction with -EUCLEAN (sibling keys
//!   out of order, a missing left node in `balance_level`, a COW outside
//!   the running transaction) the transaction is aborted the same way and
//!   the error returned at once; the kernel sometimes carries on to the end
//!   of the function first, which changes nothing once it has aborted.
//! - `Root` reaches its filesystem through a weak reference
//!   (`root->fs_info`), so read-only searches need no handle.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::rc::{Rc, Weak};

use crate::accessors::{
    self, clear_header_flag, header_level, header_nritems, item_key, item_size, leaf_free_space,
    leaf_space_used, move_items, move_node_ptrs, node_blockptr, node_key, node_ptr_generation,
    set_header_backref_rev, set_header_bytenr, set_header_flag, set_header_fsid, set_header_generation,
    set_header_owner, set_item_key, set_node_blockptr, set_node_key, set_node_ptr_generation,
};
use crate::delayed_ref::TreeRef;
use crate::env::{RestartReason, SwitchPoint, TraceEvent};
use crate::error::Error;
use crate::extent_io::{
    ExtentBuffer, alloc_dummy_extent_buffer, alloc_extent_buffer, buffer_uptodate, clear_extent_buffer_dirty,
    find_extent_buffer, free_extent_buffer_stale, read_tree_block, read_tree_block_verified,
    verify_parent_pointer,
};
use crate::extent_tree::{
    alloc_tree_block, alloc_tree_block_for, free_tree_block, free_tree_block_ref, update_ref_for_cow,
};
use crate::format::{
    CHUNK_TREE_OBJECTID, CSUM_TREE_OBJECTID, DEV_TREE_OBJECTID, EXTENT_TREE_OBJECTID, HEADER_FLAG_RELOC,
    HEADER_FLAG_WRITTEN, ITEM_SIZE, Key, MAX_LEVEL, MIXED_BACKREF_REV, ROOT_TREE_OBJECTID, RootItem,
    TREE_LOG_OBJECTID, TREE_RELOC_OBJECTID, is_fstree, leaf_data_size, nodeptrs_per_block,
};
use crate::fs::FsInfo;
use crate::locking::{
    assert_tree_write_locked, tree_lock, tree_read_lock, tree_read_unlock, tree_unlock, try_tree_read_lock,
};
use crate::transaction::{TransHandle, abort_transaction, mark_buffer_dirty};

/// One tree (kernel: struct btrfs_root).
pub struct Root {
    /// The filesystem the tree belongs to (`root->fs_info`). Weak: the
    /// filesystem holds its roots.
    fs: Weak<FsInfo>,
    /// The tree's id (root_key.objectid): 1 root tree, 2 extent, 3 chunk,
    /// 4 dev, 5 the top fs tree, 7 csum, 256+ subvolumes.
    pub objectid: u64,
    /// The current root block. Replaced when the root is COWed; a search
    /// that locks it re-checks it is still the root (btrfs_lock_root_node).
    node: RefCell<Rc<ExtentBuffer>>,
    /// The root item as last written to the root tree (for fs trees and the
    /// extent/csum/dev trees); the root tree and chunk tree live in the super block.
    pub root_item: RefCell<RootItem>,
    /// The transaction that last modified this root (kernel: last_trans).
    pub last_trans: Cell<u64>,
    /// COW every block, even of the running transaction (snapshot in progress).
    pub force_cow: Cell<bool>,
    /// The offset of the tree's ROOT_ITEM key: 0, or for a snapshot the
    /// transaction that created it (kernel: root_key.offset).
    pub root_key_offset: Cell<u64>,
    /// The root item must be written at commit (kernel: the dirty root list).
    pub dirty: Cell<bool>,
    /// Highest inode number in use (fs trees).
    pub highest_objectid: Cell<u64>,
    /// A deletion of this snapshot is under way.
    pub deleting: Cell<bool>,
}

impl Root {
    pub fn new(fs: &FsInfo, objectid: u64, node: Rc<ExtentBuffer>, root_item: RootItem) -> Rc<Root> {
        Rc::new(Root {
            fs: fs.weak(),
            objectid,
            node: RefCell::new(node),
            root_item: RefCell::new(root_item),
            last_trans: Cell::new(0),
            force_cow: Cell::new(false),
            root_key_offset: Cell::new(0),
            dirty: Cell::new(false),
            highest_objectid: Cell::new(0),
            deleting: Cell::new(false),
        })
    }

    /// `root->fs_info`. A tree outliving its filesystem is an engine bug.
    pub fn fs_info(&self) -> Rc<FsInfo> {
        self.fs.upgrade().expect("tree used after its filesystem was dropped")
    }

    /// btrfs_root_node: the current root block, referenced.
    pub fn node(&self) -> Rc<ExtentBuffer> {
        self.node.borrow().clone()
    }

    /// Point the root at a new block (after COW of the root or a split that
    /// grows the tree). The caller holds the new block's write lock.
    pub fn set_node(&self, eb: Rc<ExtentBuffer>) {
        *self.node.borrow_mut() = eb;
    }

    /// Subvolume trees charge COWs to the handle's reserve; the others to
    /// the delayed-refs, global or chunk reserves.
    pub fn is_subvolume(&self) -> bool {
        is_fstree(self.objectid)
    }

    /// Whether the tree may share blocks with others (`BTRFS_ROOT_SHAREABLE`):
    /// subvolume trees and relocation trees.
    pub fn is_shareable(&self) -> bool {
        self.is_subvolume() || self.objectid == TREE_RELOC_OBJECTID
    }

    pub fn name(&self) -> String {
        match self.objectid {
            ROOT_TREE_OBJECTID => "root".into(),
            EXTENT_TREE_OBJECTID => "extent".into(),
            CHUNK_TREE_OBJECTID => "chunk".into(),
            DEV_TREE_OBJECTID => "dev".into(),
            CSUM_TREE_OBJECTID => "csum".into(),
            5 => "fs".into(),
            id => format!("subvol{id}"),
        }
    }
}

/// Per-search statistics, accumulated over the filesystem's life: the
/// report shows COWs per search (a histogram) and restarts by reason.
#[derive(Debug, Default)]
pub struct SearchStats {
    pub searches: Cell<u64>,
    pub cows: Cell<u64>,
    /// Restarts by reason, indexed like `RestartReason::ALL`.
    pub restarts: [Cell<u64>; 4],
    /// COWs done by one search -> number of searches.
    pub cows_per_search: RefCell<std::collections::BTreeMap<u32, u64>>,
    /// Restarts of one search -> number of searches.
    pub restarts_per_search: RefCell<std::collections::BTreeMap<u32, u64>>,
    /// Restarts during whose window (path released, before the next
    /// descent) reclaim evicted a tree block: the loop's first ingredient.
    pub reclaim_in_restart_window: Cell<u64>,
    /// Delayed refs one COW of a shared block (more than one reference)
    /// queued (the copy's
    /// allocation, its children's or data extents' references, the
    /// FULL_BACKREF flag, the drop of the old block) -> number of such COWs.
    pub refs_per_shared_cow: RefCell<std::collections::BTreeMap<u32, u64>>,
}

impl SearchStats {
    /// Restarts recorded for one reason.
    pub fn restarts_for(&self, reason: RestartReason) -> u64 {
        self.restarts[reason_index(reason)].get()
    }
}

fn reason_index(reason: RestartReason) -> usize {
    RestartReason::ALL.iter().position(|r| *r == reason).expect("every reason is in ALL")
}

/// How a path holds the block at one level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathLock {
    #[default]
    None,
    Read,
    Write,
}

/// A path from a root to a leaf (kernel: struct btrfs_path). Dropping it
/// releases every lock it holds (btrfs_free_path).
#[derive(Default)]
pub struct Path {
    pub nodes: [Option<Rc<ExtentBuffer>>; MAX_LEVEL],
    /// The slot at each level; at the leaf it may equal nritems (insert at end).
    pub slots: [usize; MAX_LEVEL],
    pub locks: [PathLock; MAX_LEVEL],
    /// Keep every lock taken on the way down (no unlock_up).
    pub keep_locks: bool,
    /// Stop the search at this level.
    pub lowest_level: u8,
    /// Searching for a split: search_slot leaves room for extending the item.
    pub search_for_split: bool,
    /// `ins_len` of the search does not include an item header: the caller
    /// extends an existing item (`btrfs_extend_item`).
    pub search_for_extension: bool,
    /// Do not lock at all (read-only searches of a quiescent tree, mount, check).
    pub skip_locking: bool,
}

impl Path {
    pub fn new() -> Self {
        Self::default()
    }

    /// Unlock the block at `level` if this path holds a lock on it.
    pub fn unlock_level(&mut self, level: usize) {
        if let Some(eb) = &self.nodes[level] {
            match self.locks[level] {
                PathLock::Read => tree_read_unlock(eb),
                PathLock::Write => tree_unlock(eb),
                PathLock::None => {}
            }
        }
        self.locks[level] = PathLock::None;
    }

    /// btrfs_release_path: drop every lock and reference.
    pub fn release(&mut self) {
        for level in 0..MAX_LEVEL {
            self.unlock_level(level);
            self.nodes[level] = None;
            self.slots[level] = 0;
        }
    }

    /// `btrfs_unlock_up_safe` (locking.c): drop the locks from `level` up,
    /// keeping the references; nothing with `keep_locks`.
    pub fn unlock_up_safe(&mut self, level: usize) {
        if self.keep_locks {
            return;
        }
        for i in level..MAX_LEVEL {
            if self.nodes[i].is_some() && self.locks[i] != PathLock::None {
                self.unlock_level(i);
            }
        }
    }

    /// The leaf the path points into.
    pub fn leaf(&self) -> &Rc<ExtentBuffer> {
        self.nodes[0].as_ref().expect("path holds no leaf")
    }

    /// Key of item `slot` of the path's leaf.
    pub fn item_key(&self, slot: usize) -> Key {
        item_key(&self.leaf().data.borrow(), slot)
    }

    /// A copy of the data of item `slot` of the path's leaf.
    pub fn item_data(&self, slot: usize) -> Vec<u8> {
        accessors::item_data(&self.leaf().data.borrow(), slot).to_vec()
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        self.release();
    }
}

// ---------------------------------------------------------------------------
// Small readers of a block image. None keeps a borrow beyond its return.

fn nritems(eb: &ExtentBuffer) -> usize {
    eb.nritems() as usize
}

fn leaf_key(eb: &ExtentBuffer, slot: usize) -> Key {
    item_key(&eb.data.borrow(), slot)
}

fn ptr_key(eb: &ExtentBuffer, slot: usize) -> Key {
    node_key(&eb.data.borrow(), slot)
}

fn free_space(eb: &ExtentBuffer) -> i64 {
    i64::from(leaf_free_space(&eb.data.borrow()))
}

fn space_used(eb: &ExtentBuffer, start: usize, nr: usize) -> i64 {
    i64::from(leaf_space_used(&eb.data.borrow(), start, nr))
}

fn item_size_at(eb: &ExtentBuffer, slot: usize) -> i64 {
    i64::from(item_size(&eb.data.borrow(), slot))
}

/// `btrfs_bin_search`: whether `key` is in `eb` (from `first_slot` on), and
/// its slot or the slot where it would be inserted (possibly nritems).
pub fn bin_search(eb: &ExtentBuffer, first_slot: usize, key: &Key) -> (bool, usize) {
    let data = eb.data.borrow();
    let leaf = header_level(&data) == 0;
    let (mut low, mut high) = (first_slot, header_nritems(&data) as usize);
    assert!(low <= high, "bin_search: low {low} > high {high} in eb {}", eb.start);
    while low < high {
        let mid = (low + high) / 2;
        let k = if leaf { item_key(&data, mid) } else { node_key(&data, mid) };
        match k.cmp(key) {
            Ordering::Less => low = mid + 1,
            Ordering::Greater => high = mid,
            Ordering::Equal => return (true, mid),
        }
    }
    (false, low)
}

/// `search_for_key_slot`: after an exact match in the parent the key is at
/// slot 0 of every block below.
fn search_for_key_slot(eb: &ExtentBuffer, low: usize, key: &Key, prev_exact: bool) -> (bool, usize) {
    if prev_exact {
        return (true, 0);
    }
    bin_search(eb, low, key)
}

/// `check_sibling_keys`: the last key of `left` must sort before the first
/// of `right` (the tree checker sees one block at a time). A violation
/// aborts the transaction with EUCLEAN, as in the kernel.
fn check_sibling_keys(handle: &TransHandle, left: &ExtentBuffer, right: &ExtentBuffer) -> Result<(), Error> {
    let (nr_left, nr_right) = (nritems(left), nritems(right));
    if nr_left == 0 || nr_right == 0 {
        return Ok(());
    }
    let (left_last, right_first) = if left.level() > 0 {
        (ptr_key(left, nr_left - 1), ptr_key(right, 0))
    } else {
        (leaf_key(left, nr_left - 1), leaf_key(right, 0))
    };
    if left_last >= right_first {
        return Err(abort_euclean(
            handle,
            format!("bad key order, sibling blocks, left last {left_last} right first {right_first}"),
            "check_sibling_keys",
        ));
    }
    Ok(())
}

/// An inconsistency the kernel answers with `btrfs_abort_transaction(trans, -EUCLEAN)`.
fn abort_euclean(handle: &TransHandle, message: String, location: &'static str) -> Error {
    let error = Error::BadTreeBlock(message);
    abort_transaction(handle, &error, location);
    error
}

/// `btrfs_clear_buffer_dirty`: a block of this transaction that leaves the
/// tree is not written.
fn clear_buffer_dirty(handle: &TransHandle, eb: &ExtentBuffer) {
    if eb.generation() == handle.transid {
        clear_extent_buffer_dirty(eb);
    }
}

// ---------------------------------------------------------------------------
// Root locking.

/// `btrfs_lock_root_node`: write-lock the root block, retrying if the root
/// changed while we waited.
pub async fn lock_root_node(fs: &FsInfo, root: &Root) -> Rc<ExtentBuffer> {
    loop {
        let eb = root.node();
        tree_lock(fs, &eb).await;
        if Rc::ptr_eq(&eb, &root.node.borrow()) {
            return eb;
        }
        tree_unlock(&eb);
    }
}

/// `btrfs_read_lock_root_node`.
pub async fn read_lock_root_node(fs: &FsInfo, root: &Root) -> Rc<ExtentBuffer> {
    loop {
        let eb = root.node();
        tree_read_lock(fs, &eb).await;
        if Rc::ptr_eq(&eb, &root.node.borrow()) {
            return eb;
        }
        tree_read_unlock(&eb);
    }
}

/// `btrfs_search_slot_get_root`: lock the root block the way the search
/// needs it (read unless its level is at most `write_lock_level`) and put
/// it in the path.
async fn search_slot_get_root(
    fs: &FsInfo,
    root: &Root,
    p: &mut Path,
    write_lock_level: i32,
) -> Result<Rc<ExtentBuffer>, Error> {
    let (b, lock) = 'got: {
        if p.skip_locking {
            break 'got (root.node(), PathLock::None);
        }
        if write_lock_level < MAX_LEVEL as i32 {
            let b = read_lock_root_node(fs, root).await;
            if i32::from(b.level()) > write_lock_level {
                break 'got (b, PathLock::Read);
            }
            // Whoops, must trade for a write lock.
            tree_read_unlock(&b);
        }
        (lock_root_node(fs, root).await, PathLock::Write)
    };
    if !b.uptodate() {
        // The root failed to write out at some point.
        match lock {
            PathLock::Read => tree_read_unlock(&b),
            PathLock::Write => tree_unlock(&b),
            PathLock::None => {}
        }
        return Err(Error::Io { bytenr: b.start });
    }
    let level = b.level() as usize;
    p.nodes[level] = Some(b.clone());
    p.locks[level] = lock;
    Ok(b)
}

// ---------------------------------------------------------------------------
// COW.

/// `should_cow_block`: COW when the block is not of the running transaction,
/// was written since (WRITTEN), the root is being snapshotted (FORCE_COW) or
/// it carries RELOC in a tree that is not a relocation tree.
///
/// Fix `overwrite-written` / `both`: a WRITTEN block of the running
/// transaction is redirtied (back in the transaction's dirty set, WRITTEN
/// kept so that freeing it still pins it) and modified in place, unless it
/// is under writeback right now, the root is being snapshotted, it has RELOC
/// in a non-relocation tree, or the root is a log tree. Fix
/// `inhibit-writeback` / `both`: a block that needs no COW is inhibited by
/// the handle.
pub fn should_cow_block(handle: &TransHandle, root: &Root, eb: &Rc<ExtentBuffer>) -> bool {
    let cow = if eb.generation() != handle.transid {
        true
    } else if eb.header_flag_written() {
        if handle.fs.fix.overwrites_written() && !written_block_still_needs_cow(root, eb) {
            mark_buffer_dirty(handle, eb);
            false
        } else {
            true
        }
    } else if root.force_cow.get() {
        true
    } else if root.objectid == TREE_RELOC_OBJECTID {
        false
    } else {
        eb.header_flag_reloc()
    };
    if !cow {
        handle.inhibit_writeback(eb);
    }
    cow
}

/// The cases where `overwrite-written` still COWs a WRITTEN block (zoned
/// devices are not modelled).
fn written_block_still_needs_cow(root: &Root, eb: &ExtentBuffer) -> bool {
    eb.under_writeback()
        || root.force_cow.get()
        || (eb.header_flag_reloc() && root.objectid != TREE_RELOC_OBJECTID)
        || root.objectid == TREE_LOG_OBJECTID
}

/// `btrfs_cow_block`: `eb`, write-locked by the caller, if it needs no COW;
/// otherwise its copy ([`force_cow_block`]). `parent` is the block pointing
/// at `eb` and the slot of that pointer, `None` for the root.
pub async fn cow_block(
    handle: &TransHandle,
    root: &Root,
    eb: &Rc<ExtentBuffer>,
    parent: Option<(&Rc<ExtentBuffer>, usize)>,
) -> Result<Rc<ExtentBuffer>, Error> {
    let fs = &handle.fs;
    let running = fs.trans.running.borrow().as_ref().map(|t| t.transid);
    if running != Some(handle.transid) || handle.transid != fs.trans.generation.get() {
        let message = format!(
            "unexpected transaction when attempting to COW block {} on root {}, transaction {} running transaction {} fs generation {}",
            eb.start,
            root.objectid,
            handle.transid,
            running.unwrap_or(0),
            fs.trans.generation.get()
        );
        return Err(abort_euclean(handle, message, "btrfs_cow_block"));
    }
    if !should_cow_block(handle, root, eb) {
        return Ok(eb.clone());
    }
    force_cow_block(handle, root, eb, parent).await
}

/// `btrfs_force_cow_block`: copy `buf` (write-locked) into a new block of
/// the running transaction, point the parent (or the root) at the copy,
/// free `buf` (pinned if it was ever written), unlock it and return the
/// copy, write-locked and dirty. On error `buf` is still locked.
pub async fn force_cow_block(
    handle: &TransHandle,
    root: &Root,
    buf: &Rc<ExtentBuffer>,
    parent: Option<(&Rc<ExtentBuffer>, usize)>,
) -> Result<Rc<ExtentBuffer>, Error> {
    assert_tree_write_locked(buf);
    let fs = &handle.fs;
    let level = buf.level();
    assert!(buf.generation() <= handle.transid, "block {} is from the future", buf.start);
    let refs_queued_before = handle.transaction.delayed_refs.queued.get();
    let is_root = Rc::ptr_eq(buf, &root.node());
    // A relocation tree references each block by its parent, its root
    // block by itself.
    let (parent_start, our_ref) = if root.objectid == TREE_RELOC_OBJECTID {
        let parent_start = parent.map(|(p, _)| p.start).filter(|_| !is_root);
        (parent_start, TreeRef::Shared { parent: parent_start.unwrap_or(buf.start) })
    } else {
        (None, TreeRef::Root(root.objectid))
    };
    let cow = alloc_tree_block_for(handle, root, level, parent_start).await?;
    copy_block_header(handle, buf, &cow, root.objectid);
    let refs = match update_ref_for_cow(handle, root, buf, &cow).await {
        Ok(refs) => refs,
        Err(error) => {
            tree_unlock(&cow);
            abort_transaction(handle, &error, "update_ref_for_cow");
            return Err(error);
        }
    };
    let last_ref = refs == 1;
    if is_root {
        root.set_node(cow.clone());
        free_tree_block_ref(handle, root, buf, our_ref, last_ref);
        root.last_trans.set(handle.transid);
        root.dirty.set(true);
    } else {
        let (parent, slot) = parent.expect("COW of a non-root block without its parent");
        assert_tree_write_locked(parent);
        assert_eq!(parent.generation(), handle.transid, "COW under a parent of another transaction");
        {
            let mut data = parent.data.borrow_mut();
            assert_eq!(
                node_blockptr(&data, slot),
                buf.start,
                "parent slot {slot} does not point at the block"
            );
            set_node_blockptr(&mut data, slot, cow.start);
            set_node_ptr_generation(&mut data, slot, handle.transid);
        }
        mark_buffer_dirty(handle, parent);
        free_tree_block_ref(handle, root, buf, our_ref, last_ref);
    }
    if refs > 1 {
        let queued = handle.transaction.delayed_refs.queued.get() - refs_queued_before;
        let queued = u32::try_from(queued).unwrap_or(u32::MAX);
        *fs.search_stats.refs_per_shared_cow.borrow_mut().entry(queued).or_insert(0) += 1;
    }
    fs.env.trace(TraceEvent::Cow {
        root: root.objectid,
        level,
        old_bytenr: buf.start,
        new_bytenr: cow.start,
    });
    tree_unlock(buf);
    free_extent_buffer_stale(fs, buf);
    mark_buffer_dirty(handle, &cow);
    handle.inhibit_writeback(&cow);
    Ok(cow)
}

/// Copy `buf` into the new block `cow` of tree `owner`: its own bytenr,
/// this transaction, mixed backrefs, neither WRITTEN nor RELOC, owned by
/// `owner`, except in a relocation tree, whose blocks keep their owner and
/// carry RELOC.
fn copy_block_header(handle: &TransHandle, buf: &ExtentBuffer, cow: &ExtentBuffer, owner: u64) {
    let src = buf.data.borrow();
    let mut dst = cow.data.borrow_mut();
    dst.copy_from_slice(&src);
    set_header_bytenr(&mut dst, cow.start);
    set_header_generation(&mut dst, handle.transid);
    set_header_backref_rev(&mut dst, MIXED_BACKREF_REV);
    clear_header_flag(&mut dst, HEADER_FLAG_WRITTEN | HEADER_FLAG_RELOC);
    if owner == TREE_RELOC_OBJECTID {
        set_header_flag(&mut dst, HEADER_FLAG_RELOC);
    } else {
        set_header_owner(&mut dst, owner);
    }
    set_header_fsid(&mut dst, &handle.fs.fsid.get().unwrap_or_default());
}

/// `btrfs_copy_root`: a copy of `buf` (the write-locked root block of a
/// tree being snapshotted) as the root block of the new tree `new_root`.
/// Everything `buf` points at gains a reference by the new tree, which is
/// how a snapshot comes to share every other block. Returned write-locked
/// and dirty.
pub async fn copy_root(
    handle: &TransHandle,
    new_root: &Root,
    buf: &Rc<ExtentBuffer>,
) -> Result<Rc<ExtentBuffer>, Error> {
    assert_tree_write_locked(buf);
    let cow = alloc_tree_block(handle, new_root, buf.level()).await?;
    copy_block_header(handle, buf, &cow, new_root.objectid);
    // A relocation tree's references are by parent (FULL_BACKREF).
    let full_backref = new_root.objectid == TREE_RELOC_OBJECTID;
    crate::extent_tree::mod_ref(handle, new_root, &cow, full_backref, true);
    mark_buffer_dirty(handle, &cow);
    Ok(cow)
}

// ---------------------------------------------------------------------------
// Reading children.

/// `btrfs_read_node_slot`: the child at `slot` of `parent`, read and
/// verified against the pointer, unlocked.
pub async fn read_node_slot(
    fs: &FsInfo,
    parent: &ExtentBuffer,
    slot: usize,
) -> Result<Rc<ExtentBuffer>, Error> {
    let (bytenr, generation, key, level, owner) = {
        let data = parent.data.borrow();
        if slot >= header_nritems(&data) as usize {
            return Err(Error::Enoent);
        }
        let level = header_level(&data);
        assert!(level > 0, "read_node_slot on a leaf");
        (
            node_blockptr(&data, slot),
            node_ptr_generation(&data, slot),
            node_key(&data, slot),
            level,
            accessors::header_owner(&data),
        )
    };
    read_tree_block_verified(fs, bytenr, owner, level - 1, generation, Some(key)).await
}

/// `read_block_for_search`: the child at `slot` of `parent` (the path's
/// block at its level, locked) if it is cached and up to date for the
/// pointer's generation. Otherwise unlock the path, read the block and
/// return `Eagain` with the path released: the search starts again.
async fn read_block_for_search(
    fs: &FsInfo,
    root: &Root,
    p: &mut Path,
    parent: &ExtentBuffer,
    slot: usize,
) -> Result<Rc<ExtentBuffer>, Error> {
    let (blocknr, generation, first_key, parent_level) = {
        let data = parent.data.borrow();
        (
            node_blockptr(&data, slot),
            node_ptr_generation(&data, slot),
            node_key(&data, slot),
            header_level(&data),
        )
    };
    let level = parent_level - 1;
    if let Some(tmp) = find_extent_buffer(fs, blocknr)
        && buffer_uptodate(&tmp, generation)
    {
        if let Err(e) = verify_parent_pointer(&tmp, level, generation, Some(&first_key)) {
            p.release();
            return Err(e);
        }
        return Ok(tmp);
    }
    if p.skip_locking {
        return match read_tree_block(fs, blocknr, root.objectid, level, generation, Some(first_key)).await {
            Ok(eb) => Ok(eb),
            Err(e) => {
                p.release();
                Err(e)
            }
        };
    }
    p.unlock_up_safe(usize::from(parent_level) + 1);
    // btrfs_find_create_tree_block: memory for the buffer is charged with
    // the parent still locked.
    let tmp = alloc_extent_buffer(fs, blocknr).await;
    p.release();
    let read = read_tree_block(fs, blocknr, root.objectid, level, generation, Some(first_key)).await;
    drop(tmp);
    match read {
        Ok(_) => Err(Error::Eagain),
        Err(e) => Err(e),
    }
}

// ---------------------------------------------------------------------------
// Unlocking on the way down.

/// `unlock_up`: drop the locks above `level` that the operation cannot
/// need: not those on a slot-0 chain (a key change there goes up), nor, with
/// `keep_locks`, those at the last slot, nor below `lowest_unlock`. Lowers
/// `write_lock_level` to what is still write-locked.
fn unlock_up(
    p: &mut Path,
    level: usize,
    lowest_unlock: usize,
    min_write_lock_level: i32,
    mut write_lock_level: Option<&mut i32>,
) {
    let mut skip_level = level;
    let mut check_skip = true;
    for i in level..MAX_LEVEL {
        let Some(node) = &p.nodes[i] else { break };
        if p.locks[i] == PathLock::None {
            break;
        }
        if check_skip {
            if p.slots[i] == 0 {
                skip_level = i + 1;
                continue;
            }
            if p.keep_locks {
                let nritems = nritems(node);
                if nritems < 1 || p.slots[i] >= nritems - 1 {
                    skip_level = i + 1;
                    continue;
                }
            }
        }
        if i >= lowest_unlock && i > skip_level {
            p.unlock_level(i);
            check_skip = false;
            if let Some(wll) = write_lock_level.as_deref_mut()
                && i as i32 > min_write_lock_level
                && i as i32 <= *wll
            {
                *wll = i as i32 - 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// search_slot.

/// What one descent from the root ended with.
enum Descent {
    /// The search is over; whether the key was found.
    Found(bool),
    /// `goto again`, with the reason and the level the search stood at.
    Restart { reason: RestartReason, level: usize },
}

/// State of one `search_slot` call across its restarts.
#[derive(Default)]
struct SearchCtx {
    cows: u32,
    restarts: u32,
    /// Fix `search-pin`: the blocks this search COWed, each with a
    /// writeback blocker raised under its write lock.
    pinned: Vec<Rc<ExtentBuffer>>,
}

impl Drop for SearchCtx {
    /// `btrfs_search_slot_clear_cow_protection`, on every exit (a search
    /// dropped half-way included).
    fn drop(&mut self) {
        for eb in self.pinned.drain(..) {
            eb.remove_writeback_blocker();
        }
    }
}

/// The lock levels of one search (`write_lock_level` changes across restarts).
struct LockLevels {
    write_lock_level: i32,
    min_write_lock_level: i32,
    lowest_unlock: usize,
}

/// `btrfs_search_slot`: walk from the root to the leaf that holds `key` or
/// would hold it, locking as it descends, and fix the tree on the way for
/// the intended change: `ins_len > 0` is the bytes an insert needs (item
/// headers included unless `path.search_for_extension`), nodes and leaves
/// are split so that they fit; `ins_len < 0` announces a deletion, nodes
/// are merged; `cow` COWs every block on the way (it must be set to modify
/// the tree). Returns whether the key was found; `path.slots[0]` is its slot
/// or the slot where it would be inserted. On error the path is released.
pub async fn search_slot(
    handle: Option<&TransHandle>,
    root: &Rc<Root>,
    key: &Key,
    p: &mut Path,
    ins_len: i32,
    cow: bool,
) -> Result<bool, Error> {
    assert!(cow || ins_len == 0, "a search that does not COW cannot insert or delete");
    assert!(!cow || handle.is_some(), "a COW search without a transaction handle");
    assert!(p.nodes[0].is_none(), "search_slot on a path that still holds a leaf");
    assert!(p.lowest_level == 0 || ins_len <= 0, "an insert must reach the leaf");
    let fs = root.fs_info();
    if let Some(handle) = handle {
        handle.search.set(crate::transaction::SearchProgress { root: root.objectid, ..Default::default() });
    }
    let mut ctx = SearchCtx::default();
    let result = search_slot_restarting(&fs, handle, root, key, p, ins_len, cow, &mut ctx).await;
    if result.is_err() {
        p.release();
    }
    let (cows, restarts) = (ctx.cows, ctx.restarts);
    drop(ctx);
    let stats = &fs.search_stats;
    stats.searches.set(stats.searches.get() + 1);
    stats.cows.set(stats.cows.get() + u64::from(cows));
    *stats.cows_per_search.borrow_mut().entry(cows).or_default() += 1;
    *stats.restarts_per_search.borrow_mut().entry(restarts).or_default() += 1;
    fs.env.trace(TraceEvent::SearchDone { root: root.objectid, cows, restarts });
    result
}

#[allow(clippy::too_many_arguments)]
async fn search_slot_restarting(
    fs: &FsInfo,
    handle: Option<&TransHandle>,
    root: &Rc<Root>,
    key: &Key,
    p: &mut Path,
    ins_len: i32,
    cow: bool,
    ctx: &mut SearchCtx,
) -> Result<bool, Error> {
    // Everything at write_lock_level or lower must be write-locked.
    let mut write_lock_level = 0;
    let mut lowest_unlock = 1;
    if ins_len < 0 {
        // Deleting may update pointers up to level 2.
        lowest_unlock = 2;
        write_lock_level = 2;
    } else if ins_len > 0 {
        // Inserting updates keys at level 1.
        write_lock_level = 1;
    }
    if !cow {
        write_lock_level = -1;
    }
    if cow && (p.keep_locks || p.lowest_level > 0) {
        write_lock_level = MAX_LEVEL as i32;
    }
    let mut levels = LockLevels { write_lock_level, min_write_lock_level: write_lock_level, lowest_unlock };
    loop {
        match search_slot_descend(fs, handle, root, key, p, ins_len, cow, &mut levels, ctx).await? {
            Descent::Found(found) => return Ok(found),
            Descent::Restart { reason, level } => {
                ctx.restarts += 1;
                if let Some(handle) = handle {
                    let mut progress = handle.search.get();
                    progress.restarts[reason_index(reason)] += 1;
                    handle.search.set(progress);
                }
                let counter = &fs.search_stats.restarts[reason_index(reason)];
                counter.set(counter.get() + 1);
                fs.env.trace(TraceEvent::SearchRestart { root: root.objectid, level: level as u8, reason });
                p.release();
                let evictions = fs.stats.eb_evictions.get();
                fs.env.switch_point(SwitchPoint::PathRelease).await;
                if fs.stats.eb_evictions.get() != evictions {
                    let window = &fs.search_stats.reclaim_in_restart_window;
                    window.set(window.get() + 1);
                }
            }
        }
    }
}

/// One descent of `search_slot`, from `again:` to `done:` or to a restart.
#[allow(clippy::too_many_arguments)]
async fn search_slot_descend(
    fs: &FsInfo,
    handle: Option<&TransHandle>,
    root: &Rc<Root>,
    key: &Key,
    p: &mut Path,
    ins_len: i32,
    cow: bool,
    lv: &mut LockLevels,
    ctx: &mut SearchCtx,
) -> Result<Descent, Error> {
    let mut prev_exact = false;
    let mut b = search_slot_get_root(fs, root, p, lv.write_lock_level).await?;
    loop {
        let level = b.level() as usize;
        if cow {
            let handle = handle.expect("cow without a handle");
            if should_cow_block(handle, root, &b) {
                // The block and its parent must be write-locked.
                let l = level as i32;
                if l > lv.write_lock_level
                    || (l + 1 > lv.write_lock_level && level + 1 < MAX_LEVEL && p.nodes[level + 1].is_some())
                {
                    lv.write_lock_level = l + 1;
                    return Ok(Descent::Restart { reason: RestartReason::WriteLock, level });
                }
                let parent = if level + 1 < MAX_LEVEL { p.nodes[level + 1].clone() } else { None };
                let parent_slot = if level + 1 < MAX_LEVEL { p.slots[level + 1] } else { 0 };
                b = cow_block(handle, root, &b, parent.as_ref().map(|n| (n, parent_slot))).await?;
                ctx.cows += 1;
                let mut progress = handle.search.get();
                progress.cows += 1;
                handle.search.set(progress);
                if fs.fix.pins_during_search() {
                    // btrfs_search_slot_track_cow, under the write lock.
                    b.add_writeback_blocker();
                    ctx.pinned.push(b.clone());
                }
            }
        }
        // cow_done:
        p.nodes[level] = Some(b.clone());
        // Not changing the tree: the parent's lock is no longer needed.
        if ins_len == 0 && !p.keep_locks {
            let u = level + 1;
            if u < MAX_LEVEL && p.locks[u] != PathLock::None {
                p.unlock_level(u);
            }
        }
        if level == 0 {
            if ins_len > 0 {
                assert!(lv.write_lock_level >= 1, "inserting without the parent write-locked");
            }
            let found = search_leaf(handle, root, key, p, ins_len, prev_exact).await?;
            if !p.search_for_split {
                unlock_up(p, 0, lv.lowest_unlock, lv.min_write_lock_level, None);
            }
            return Ok(Descent::Found(found));
        }
        let (found, mut slot) = search_for_key_slot(&b, 0, key, prev_exact);
        prev_exact = found;
        let mut dec = false;
        if !found && slot > 0 {
            dec = true;
            slot -= 1;
        }
        p.slots[level] = slot;
        match setup_nodes_for_search(handle, root, p, level, ins_len, &mut lv.write_lock_level).await {
            Err(Error::Eagain) => return Ok(Descent::Restart { reason: RestartReason::SetupNodes, level }),
            other => other?,
        }
        b = p.nodes[level].clone().expect("setup_nodes_for_search keeps the level");
        let slot = p.slots[level];
        // Slot 0: a key change must go up, so the parent must be write-locked.
        if slot == 0 && ins_len != 0 && lv.write_lock_level < level as i32 + 1 {
            lv.write_lock_level = level as i32 + 1;
            return Ok(Descent::Restart { reason: RestartReason::SlotZero, level });
        }
        unlock_up(p, level, lv.lowest_unlock, lv.min_write_lock_level, Some(&mut lv.write_lock_level));
        if level == usize::from(p.lowest_level) {
            if dec {
                p.slots[level] += 1;
            }
            return Ok(Descent::Found(found));
        }
        let child = match read_block_for_search(fs, root, p, &b, slot).await {
            Err(Error::Eagain) => return Ok(Descent::Restart { reason: RestartReason::ReadBlock, level }),
            other => other?,
        };
        if !p.skip_locking {
            let child_level = child.level() as usize;
            if child_level as i32 <= lv.write_lock_level {
                tree_lock(fs, &child).await;
                p.locks[child_level] = PathLock::Write;
            } else {
                tree_read_lock(fs, &child).await;
                p.locks[child_level] = PathLock::Read;
            }
            p.nodes[child_level] = Some(child.clone());
        }
        b = child;
    }
}

/// `search_leaf`: find the slot in the leaf and, for an insert, make room
/// (`split_leaf`). Unlocks the upper levels early when the insert cannot
/// touch slot 0 and fits.
async fn search_leaf(
    handle: Option<&TransHandle>,
    root: &Rc<Root>,
    key: &Key,
    p: &mut Path,
    ins_len: i32,
    prev_exact: bool,
) -> Result<bool, Error> {
    let leaf = p.nodes[0].clone().expect("search_leaf without a leaf");
    let mut ins_len = i64::from(ins_len);
    let mut leaf_free = -1i64;
    let mut low = 0;
    let mut do_bin_search = true;
    let mut found = false;
    if ins_len > 0 {
        leaf_free = free_space(&leaf);
        // No lock at level 1: the leaf is the root.
        if p.locks[1] != PathLock::None && leaf_free >= ins_len {
            let first = leaf.first_key().expect("a leaf below a node is never empty");
            match first.cmp(key) {
                Ordering::Less => {
                    // The key goes past slot 0 and fits: nothing above changes.
                    p.unlock_up_safe(1);
                    low = 1;
                }
                order => {
                    if order == Ordering::Equal {
                        p.unlock_up_safe(1);
                        found = true;
                    }
                    do_bin_search = false;
                    p.slots[0] = 0;
                }
            }
        }
    }
    if do_bin_search {
        let (f, slot) = search_for_key_slot(&leaf, low, key, prev_exact);
        found = f;
        p.slots[0] = slot;
    }
    if ins_len > 0 {
        // An existing key only grows its item: no new item header.
        if found && !p.search_for_extension {
            assert!(ins_len >= ITEM_SIZE as i64);
            ins_len -= ITEM_SIZE as i64;
        }
        assert!(leaf_free >= 0);
        if leaf_free < ins_len {
            split_leaf(handle.expect("insert without a handle"), root, key, p, ins_len, found).await?;
        }
    }
    Ok(found)
}

/// `setup_nodes_for_search`: split a node that an insert could fill or
/// merge one a delete could empty, once it is write-locked with its parent;
/// otherwise raise `write_lock_level` and return `Eagain` with the path
/// released.
async fn setup_nodes_for_search(
    handle: Option<&TransHandle>,
    root: &Rc<Root>,
    p: &mut Path,
    level: usize,
    ins_len: i32,
    write_lock_level: &mut i32,
) -> Result<(), Error> {
    let b = p.nodes[level].clone().expect("setup_nodes_for_search without a node");
    let nodeptrs = nodeptrs_per_block(b.len) as usize;
    let n = nritems(&b);
    if (p.search_for_split || ins_len > 0) && n >= nodeptrs - 3 {
        if *write_lock_level < level as i32 + 1 {
            *write_lock_level = level as i32 + 1;
            p.release();
            return Err(Error::Eagain);
        }
        split_node(handle.expect("split without a handle"), root, p, level).await
    } else if ins_len < 0 && n < nodeptrs / 2 {
        if *write_lock_level < level as i32 + 1 {
            *write_lock_level = level as i32 + 1;
            p.release();
            return Err(Error::Eagain);
        }
        balance_level(handle.expect("balance without a handle"), root, p, level).await?;
        let Some(b) = &p.nodes[level] else {
            // The node was promoted away: start again from the new root.
            p.release();
            return Err(Error::Eagain);
        };
        assert_ne!(nritems(b), 1, "balance_level left a node with one pointer");
        Ok(())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Keys and pointers up the path.

/// `fixup_low_keys`: slot 0 of the block at `level - 1` changed to `key`;
/// set it in the parents, going up while the path is at slot 0.
pub fn fixup_low_keys(handle: &TransHandle, p: &Path, key: &Key, level: usize) {
    for i in level..MAX_LEVEL {
        let Some(t) = &p.nodes[i] else { break };
        let tslot = p.slots[i];
        assert_tree_write_locked(t);
        set_node_key(&mut t.data.borrow_mut(), tslot, key);
        mark_buffer_dirty(handle, t);
        if tslot != 0 {
            break;
        }
    }
}

/// `btrfs_set_item_key_safe`: change the key of the path's item; the new
/// key must keep the leaf's order.
pub fn set_item_key_safe(handle: &TransHandle, p: &Path, new_key: &Key) {
    let leaf = p.leaf();
    let slot = p.slots[0];
    let n = nritems(leaf);
    if slot > 0 {
        let prev = leaf_key(leaf, slot - 1);
        assert!(prev < *new_key, "slot {slot} key {prev} new key {new_key}");
    }
    if slot + 1 < n {
        let next = leaf_key(leaf, slot + 1);
        assert!(next > *new_key, "slot {slot} key {next} new key {new_key}");
    }
    set_item_key(&mut leaf.data.borrow_mut(), slot, new_key);
    mark_buffer_dirty(handle, leaf);
    if slot == 0 {
        fixup_low_keys(handle, p, new_key, 1);
    }
}

/// `insert_ptr`: a pointer to `bytenr` (of this transaction) at `slot` of
/// the path's node at `level`, which has room.
fn insert_ptr(handle: &TransHandle, p: &Path, key: &Key, bytenr: u64, slot: usize, level: usize) {
    let lower = p.nodes[level].as_ref().expect("insert_ptr without a node");
    assert_tree_write_locked(lower);
    accessors::insert_ptr(&mut lower.data.borrow_mut(), slot, key, bytenr, handle.transid);
    mark_buffer_dirty(handle, lower);
}

/// `btrfs_del_ptr`: remove the pointer at `slot` of the path's node at
/// `level`. A root node left empty becomes an empty leaf.
pub fn del_ptr(handle: &TransHandle, root: &Root, p: &Path, level: usize, slot: usize) {
    let parent = p.nodes[level].as_ref().expect("del_ptr without a node");
    assert_tree_write_locked(parent);
    accessors::remove_ptr(&mut parent.data.borrow_mut(), slot);
    let n = nritems(parent);
    if n == 0 && Rc::ptr_eq(parent, &root.node()) {
        assert_eq!(parent.level(), 1, "emptied a root node above level 1");
        // Just turn the root into a leaf.
        parent.set_level(0);
    } else if slot == 0 {
        let key = ptr_key(parent, 0);
        fixup_low_keys(handle, p, &key, level + 1);
    }
    mark_buffer_dirty(handle, parent);
}

// ---------------------------------------------------------------------------
// Nodes: growing the tree, splitting, pushing, balancing.

/// `insert_new_root`: a new root at `level` with one pointer to the old
/// root (the path's block at `level - 1`).
async fn insert_new_root(handle: &TransHandle, root: &Root, p: &mut Path, level: usize) -> Result<(), Error> {
    assert!(p.nodes[level].is_none(), "insert_new_root above an existing level");
    let lower = p.nodes[level - 1].clone().expect("insert_new_root without the old root");
    assert!(Rc::ptr_eq(&lower, &root.node()), "insert_new_root below a block that is not the root");
    let lower_key = lower.first_key().expect("growing the tree above an empty block");
    let lower_gen = lower.generation();
    assert_eq!(lower_gen, handle.transid, "new root above a block of another transaction");
    let c = alloc_tree_block(handle, root, level as u8).await?;
    accessors::insert_ptr(&mut c.data.borrow_mut(), 0, &lower_key, lower.start, lower_gen);
    mark_buffer_dirty(handle, &c);
    root.set_node(c.clone());
    root.dirty.set(true);
    p.nodes[level] = Some(c);
    p.locks[level] = PathLock::Write;
    p.slots[level] = 0;
    Ok(())
}

/// `split_node`: make room in the path's node at `level` by pushing to
/// its neighbours or splitting it in half (growing the tree at the root).
async fn split_node(handle: &TransHandle, root: &Root, p: &mut Path, level: usize) -> Result<(), Error> {
    let nodeptrs = nodeptrs_per_block(handle.fs.nodesize) as usize;
    let mut c = p.nodes[level].clone().expect("split_node without a node");
    assert_eq!(c.generation(), handle.transid);
    if Rc::ptr_eq(&c, &root.node()) {
        insert_new_root(handle, root, p, level + 1).await?;
    } else {
        let pushed = push_nodes_for_insert(handle, root, p, level).await?;
        c = p.nodes[level].clone().expect("push_nodes_for_insert keeps the level");
        if pushed && nritems(&c) < nodeptrs - 3 {
            return Ok(());
        }
    }
    let c_nritems = nritems(&c);
    let mid = c_nritems.div_ceil(2);
    let key = ptr_key(&c, mid);
    let split = alloc_tree_block(handle, root, level as u8).await?;
    assert_eq!(c.level() as usize, level);
    move_node_ptrs(&mut c.data.borrow_mut(), mid, &mut split.data.borrow_mut(), 0, c_nritems - mid);
    mark_buffer_dirty(handle, &c);
    mark_buffer_dirty(handle, &split);
    insert_ptr(handle, p, &key, split.start, p.slots[level + 1] + 1, level + 1);
    if p.slots[level] >= mid {
        p.slots[level] -= mid;
        tree_unlock(&c);
        p.nodes[level] = Some(split);
        p.slots[level + 1] += 1;
    } else {
        tree_unlock(&split);
    }
    Ok(())
}

/// `push_node_left`: move pointers from the front of `src` to the end of
/// `dst` (its left neighbour). Without `empty`, leaves at least 8 in `src`.
/// Returns whether any moved.
fn push_node_left(
    handle: &TransHandle,
    dst: &ExtentBuffer,
    src: &ExtentBuffer,
    empty: bool,
) -> Result<bool, Error> {
    let nodeptrs = nodeptrs_per_block(handle.fs.nodesize) as i64;
    let src_nritems = nritems(src) as i64;
    let dst_nritems = nritems(dst) as i64;
    let mut push_items = nodeptrs - dst_nritems;
    assert_eq!(src.generation(), handle.transid);
    assert_eq!(dst.generation(), handle.transid);
    if !empty && src_nritems <= 8 {
        return Ok(false);
    }
    if push_items <= 0 {
        return Ok(false);
    }
    if empty {
        push_items = push_items.min(src_nritems);
        if push_items < src_nritems && src_nritems - push_items < 8 {
            // Leave at least 8 pointers in the node if we are not emptying it.
            if push_items <= 8 {
                return Ok(false);
            }
            push_items -= 8;
        }
    } else {
        push_items = push_items.min(src_nritems - 8);
    }
    check_sibling_keys(handle, dst, src)?;
    move_node_ptrs(
        &mut src.data.borrow_mut(),
        0,
        &mut dst.data.borrow_mut(),
        dst_nritems as usize,
        push_items as usize,
    );
    mark_buffer_dirty(handle, src);
    mark_buffer_dirty(handle, dst);
    Ok(true)
}

/// `balance_node_right`: move up to half of `src`'s pointers, from its end,
/// to the front of `dst` (its right neighbour). Returns whether any moved.
fn balance_node_right(handle: &TransHandle, dst: &ExtentBuffer, src: &ExtentBuffer) -> Result<bool, Error> {
    let nodeptrs = nodeptrs_per_block(handle.fs.nodesize) as i64;
    assert_eq!(src.generation(), handle.transid);
    assert_eq!(dst.generation(), handle.transid);
    let src_nritems = nritems(src) as i64;
    let dst_nritems = nritems(dst) as i64;
    let mut push_items = nodeptrs - dst_nritems;
    if push_items <= 0 {
        return Ok(false);
    }
    if src_nritems < 4 {
        return Ok(false);
    }
    let max_push = src_nritems / 2 + 1;
    // Do not empty the node.
    if max_push >= src_nritems {
        return Ok(false);
    }
    push_items = push_items.min(max_push);
    check_sibling_keys(handle, src, dst)?;
    move_node_ptrs(
        &mut src.data.borrow_mut(),
        (src_nritems - push_items) as usize,
        &mut dst.data.borrow_mut(),
        0,
        push_items as usize,
    );
    mark_buffer_dirty(handle, src);
    mark_buffer_dirty(handle, dst);
    Ok(true)
}

/// Lock and COW the neighbour at `slot` of `parent`; `None` when it is
/// already full (`nodeptrs - 1` or more pointers) or cannot be COWed
/// (the kernel treats both as "no room").
async fn cow_node_neighbour(
    handle: &TransHandle,
    root: &Root,
    parent: &Rc<ExtentBuffer>,
    slot: usize,
) -> Result<Option<Rc<ExtentBuffer>>, Error> {
    let fs = &handle.fs;
    let nodeptrs = nodeptrs_per_block(fs.nodesize) as usize;
    let sibling = read_node_slot(fs, parent, slot).await?;
    tree_lock(fs, &sibling).await;
    if nritems(&sibling) >= nodeptrs - 1 {
        tree_unlock(&sibling);
        return Ok(None);
    }
    match cow_block(handle, root, &sibling, Some((parent, slot))).await {
        Ok(cow) => Ok(Some(cow)),
        Err(_) => {
            tree_unlock(&sibling);
            Ok(None)
        }
    }
}

/// `push_nodes_for_insert`: before splitting the path's node at `level`,
/// try to move pointers into its left or right neighbour. Returns whether
/// that made room (the path may now point into the neighbour).
async fn push_nodes_for_insert(
    handle: &TransHandle,
    root: &Root,
    p: &mut Path,
    level: usize,
) -> Result<bool, Error> {
    if level == 0 {
        return Ok(false);
    }
    let mid = p.nodes[level].clone().expect("push_nodes_for_insert without a node");
    assert_eq!(mid.generation(), handle.transid);
    let parent = if level < MAX_LEVEL - 1 { p.nodes[level + 1].clone() } else { None };
    let Some(parent) = parent else { return Ok(false) };
    let pslot = p.slots[level + 1];
    let mut orig_slot = p.slots[level];

    // First, try to make some room in the middle buffer.
    if pslot > 0
        && let Some(left) = cow_node_neighbour(handle, root, &parent, pslot - 1).await?
    {
        let left_nr = nritems(&left);
        let pushed = match push_node_left(handle, &left, &mid, false) {
            Ok(pushed) => pushed,
            Err(e) => {
                tree_unlock(&left);
                return Err(e);
            }
        };
        if pushed {
            orig_slot += left_nr;
            let key = ptr_key(&mid, 0);
            set_node_key(&mut parent.data.borrow_mut(), pslot, &key);
            mark_buffer_dirty(handle, &parent);
            if nritems(&left) > orig_slot {
                p.nodes[level] = Some(left);
                p.slots[level + 1] -= 1;
                p.slots[level] = orig_slot;
                tree_unlock(&mid);
            } else {
                orig_slot -= nritems(&left);
                p.slots[level] = orig_slot;
                tree_unlock(&left);
            }
            return Ok(true);
        }
        tree_unlock(&left);
    }

    // Then try to empty the right most buffer into the middle.
    if pslot + 1 < nritems(&parent)
        && let Some(right) = cow_node_neighbour(handle, root, &parent, pslot + 1).await?
    {
        let pushed = match balance_node_right(handle, &right, &mid) {
            Ok(pushed) => pushed,
            Err(e) => {
                tree_unlock(&right);
                return Err(e);
            }
        };
        if pushed {
            let key = ptr_key(&right, 0);
            set_node_key(&mut parent.data.borrow_mut(), pslot + 1, &key);
            mark_buffer_dirty(handle, &parent);
            if nritems(&mid) <= orig_slot {
                p.slots[level] = orig_slot - nritems(&mid);
                p.nodes[level] = Some(right);
                p.slots[level + 1] += 1;
                tree_unlock(&mid);
            } else {
                tree_unlock(&right);
            }
            return Ok(true);
        }
        tree_unlock(&right);
    }
    Ok(false)
}

/// `promote_child_to_root`: the root node has one pointer; its child
/// becomes the root and the old root is freed. The path loses the level.
async fn promote_child_to_root(
    handle: &TransHandle,
    root: &Root,
    p: &mut Path,
    level: usize,
    parent: &Rc<ExtentBuffer>,
) -> Result<(), Error> {
    let fs = &handle.fs;
    assert_eq!(nritems(parent), 1);
    let child = read_node_slot(fs, parent, 0).await?;
    tree_lock(fs, &child).await;
    let child = match cow_block(handle, root, &child, Some((parent, 0))).await {
        Ok(cow) => cow,
        Err(e) => {
            tree_unlock(&child);
            return Err(e);
        }
    };
    root.set_node(child.clone());
    root.dirty.set(true);
    tree_unlock(&child);

    // The path no longer holds the old root; unlock it here.
    p.locks[level] = PathLock::None;
    p.nodes[level] = None;
    clear_buffer_dirty(handle, parent);
    tree_unlock(parent);
    free_tree_block(handle, root, parent);
    free_extent_buffer_stale(fs, parent);
    Ok(())
}

/// `balance_level`: before a delete goes below the path's node at `level`,
/// make sure it cannot be emptied: promote the only child of a root, merge
/// a node at most a quarter full with its neighbours. The path may move to
/// the left neighbour, or lose the level (the caller restarts).
async fn balance_level(handle: &TransHandle, root: &Root, p: &mut Path, level: usize) -> Result<(), Error> {
    assert!(level > 0);
    let mid = p.nodes[level].clone().expect("balance_level without a node");
    assert_eq!(p.locks[level], PathLock::Write);
    assert_eq!(mid.generation(), handle.transid);
    let parent = if level < MAX_LEVEL - 1 { p.nodes[level + 1].clone() } else { None };
    let Some(parent) = parent else {
        // The root: with one pointer, its child becomes the root.
        if nritems(&mid) != 1 {
            return Ok(());
        }
        return promote_child_to_root(handle, root, p, level, &mid).await;
    };
    if nritems(&mid) > nodeptrs_per_block(handle.fs.nodesize) as usize / 4 {
        return Ok(());
    }
    let mut left = None;
    let mut right = None;
    let result = balance_level_locked(handle, root, p, level, &mid, &parent, &mut left, &mut right).await;
    // out: whatever neighbour the path did not take over is unlocked.
    if let Some(right) = right {
        tree_unlock(&right);
    }
    if let Some(left) = left {
        tree_unlock(&left);
    }
    result
}

/// The body of `balance_level` once the node has a parent: `left` and
/// `right` hold the locked neighbours the path does not own.
#[allow(clippy::too_many_arguments)]
async fn balance_level_locked(
    handle: &TransHandle,
    root: &Root,
    p: &mut Path,
    level: usize,
    mid: &Rc<ExtentBuffer>,
    parent: &Rc<ExtentBuffer>,
    left: &mut Option<Rc<ExtentBuffer>>,
    right: &mut Option<Rc<ExtentBuffer>>,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let pslot = p.slots[level + 1];
    let mut orig_slot = p.slots[level];
    let orig_ptr = node_blockptr(&mid.data.borrow(), orig_slot);

    if pslot > 0 {
        let l = read_node_slot(fs, parent, pslot - 1).await?;
        tree_lock(fs, &l).await;
        *left = Some(l.clone());
        *left = Some(cow_block(handle, root, &l, Some((parent, pslot - 1))).await?);
    }
    if pslot + 1 < nritems(parent) {
        let r = read_node_slot(fs, parent, pslot + 1).await?;
        tree_lock(fs, &r).await;
        *right = Some(r.clone());
        *right = Some(cow_block(handle, root, &r, Some((parent, pslot + 1))).await?);
    }

    // First, try to make some room in the middle buffer.
    if let Some(l) = left.as_ref() {
        orig_slot += nritems(l);
        push_node_left(handle, l, mid, true)?;
    }

    // Then try to empty the right most buffer into the middle.
    if let Some(r) = right.clone() {
        push_node_left(handle, mid, &r, true)?;
        if nritems(&r) == 0 {
            clear_buffer_dirty(handle, &r);
            tree_unlock(&r);
            *right = None;
            del_ptr(handle, root, p, level + 1, pslot + 1);
            free_tree_block(handle, root, &r);
            free_extent_buffer_stale(fs, &r);
        } else {
            let key = ptr_key(&r, 0);
            set_node_key(&mut parent.data.borrow_mut(), pslot + 1, &key);
            mark_buffer_dirty(handle, parent);
        }
    }

    if nritems(mid) == 1 {
        // A node with one pointer must not stay during a delete: a delete
        // below could remove it. Pull pointers from the left, which exists,
        // or we would have pulled from the right.
        let Some(l) = left.as_ref() else {
            let message = format!(
                "missing left child when middle child only has 1 item, parent bytenr {} level {} mid bytenr {} root {}",
                parent.start,
                parent.level(),
                mid.start,
                root.objectid
            );
            return Err(abort_euclean(handle, message, "balance_level"));
        };
        if !balance_node_right(handle, mid, l)? {
            let pushed = push_node_left(handle, l, mid, true)?;
            assert!(pushed, "could not merge a one-pointer node into its left neighbour");
        }
    }

    let mid_alive = if nritems(mid) == 0 {
        clear_buffer_dirty(handle, mid);
        tree_unlock(mid);
        p.locks[level] = PathLock::None;
        del_ptr(handle, root, p, level + 1, pslot);
        free_tree_block(handle, root, mid);
        free_extent_buffer_stale(fs, mid);
        false
    } else {
        // Update the parent key to reflect our changes.
        let key = ptr_key(mid, 0);
        set_node_key(&mut parent.data.borrow_mut(), pslot, &key);
        mark_buffer_dirty(handle, parent);
        true
    };

    // Update the path.
    if let Some(l) = left.clone() {
        if nritems(&l) > orig_slot {
            p.nodes[level] = Some(l);
            p.locks[level] = PathLock::Write;
            p.slots[level + 1] -= 1;
            p.slots[level] = orig_slot;
            *left = None;
            if mid_alive {
                tree_unlock(mid);
            }
        } else {
            orig_slot -= nritems(&l);
            p.slots[level] = orig_slot;
        }
    }
    let now = p.nodes[level].as_ref().expect("balance_level lost the path");
    assert_eq!(
        node_blockptr(&now.data.borrow(), p.slots[level]),
        orig_ptr,
        "balance_level moved the path off its pointer"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Leaves: pushing to neighbours and splitting.

/// `__push_leaf_right`: move items from the end of the path's leaf to the
/// front of `right` (locked, COWed), keeping `data_size` of room for the
/// insert at the path's slot; never below `min_slot`. Unlocks whichever
/// leaf the path does not keep.
#[allow(clippy::too_many_arguments)]
fn push_leaf_right_locked(
    handle: &TransHandle,
    p: &mut Path,
    data_size: i64,
    empty: bool,
    right: Rc<ExtentBuffer>,
    free_space_right: i64,
    left_nritems: usize,
    min_slot: usize,
) -> bool {
    let left = p.nodes[0].clone().expect("push without a leaf");
    let upper = p.nodes[1].clone().expect("push without a parent");
    let slot0 = p.slots[0] as i64;
    let nr = if empty { 0 } else { min_slot.max(1) as i64 };
    let mut push_space = 0i64;
    let mut push_items = 0usize;
    if slot0 >= left_nritems as i64 {
        push_space += data_size;
    }
    let mut i = left_nritems as i64 - 1;
    while i >= nr {
        if !empty && push_items > 0 {
            if slot0 > i {
                break;
            }
            if slot0 == i {
                let space = free_space(&left);
                if space + push_space * 2 > free_space_right {
                    break;
                }
            }
        }
        if slot0 == i {
            push_space += data_size;
        }
        let this_item_size = item_size_at(&left, i as usize);
        if this_item_size + ITEM_SIZE as i64 + push_space > free_space_right {
            break;
        }
        push_items += 1;
        push_space += this_item_size + ITEM_SIZE as i64;
        if i == 0 {
            break;
        }
        i -= 1;
    }
    if push_items == 0 {
        tree_unlock(&right);
        return false;
    }
    assert!(empty || push_items < left_nritems, "push_leaf_right emptied the leaf");
    // Push left to right.
    move_items(
        &mut left.data.borrow_mut(),
        left_nritems - push_items,
        push_items,
        &mut right.data.borrow_mut(),
        0,
    );
    let left_nritems = left_nritems - push_items;
    if left_nritems > 0 {
        mark_buffer_dirty(handle, &left);
    } else {
        clear_buffer_dirty(handle, &left);
    }
    mark_buffer_dirty(handle, &right);
    let key = leaf_key(&right, 0);
    set_node_key(&mut upper.data.borrow_mut(), p.slots[1] + 1, &key);
    mark_buffer_dirty(handle, &upper);
    // Then fix up the leaf pointer in the path.
    if p.slots[0] >= left_nritems {
        p.slots[0] -= left_nritems;
        tree_unlock(&left);
        p.nodes[0] = Some(right);
        p.slots[1] += 1;
    } else {
        tree_unlock(&right);
    }
    true
}

/// `push_leaf_right`: make at least `data_size` of room in the path's leaf
/// by pushing items from `min_slot` on into the right neighbour under the
/// same parent. An append at the end moves the path to a right neighbour
/// with room. Returns whether it worked.
async fn push_leaf_right(
    handle: &TransHandle,
    root: &Root,
    p: &mut Path,
    min_data_size: i64,
    data_size: i64,
    empty: bool,
    min_slot: usize,
) -> Result<bool, Error> {
    let fs = &handle.fs;
    let Some(upper) = p.nodes[1].clone() else { return Ok(false) };
    let slot = p.slots[1];
    if slot as i64 >= nritems(&upper) as i64 - 1 {
        return Ok(false);
    }
    assert_tree_write_locked(&upper);
    let right = read_node_slot(fs, &upper, slot + 1).await?;
    tree_lock(fs, &right).await;
    let free = free_space(&right);
    if free < data_size {
        tree_unlock(&right);
        return Ok(false);
    }
    let right = match cow_block(handle, root, &right, Some((&upper, slot + 1))).await {
        Ok(cow) => cow,
        Err(_) => {
            tree_unlock(&right);
            return Ok(false);
        }
    };
    let left = p.nodes[0].clone().expect("push without a leaf");
    let left_nritems = nritems(&left);
    if left_nritems == 0 {
        tree_unlock(&right);
        return Ok(false);
    }
    if let Err(e) = check_sibling_keys(handle, &left, &right) {
        tree_unlock(&right);
        return Err(e);
    }
    if p.slots[0] == left_nritems && !empty {
        // The key sorts after every key of the leaf and the right
        // neighbour has room: insert there, leave the leaf untouched.
        tree_unlock(&left);
        p.nodes[0] = Some(right);
        p.slots[0] = 0;
        p.slots[1] += 1;
        return Ok(true);
    }
    Ok(push_leaf_right_locked(handle, p, min_data_size, empty, right, free, left_nritems, min_slot))
}

/// `__push_leaf_left`: move items from the front of the path's leaf to the
/// end of `left` (locked, COWed), up to `max_slot` (exclusive).
#[allow(clippy::too_many_arguments)]
fn push_leaf_left_locked(
    handle: &TransHandle,
    p: &mut Path,
    data_size: i64,
    empty: bool,
    left: Rc<ExtentBuffer>,
    free_space_left: i64,
    right_nritems: usize,
    max_slot: usize,
) -> bool {
    let right = p.nodes[0].clone().expect("push without a leaf");
    let slot0 = p.slots[0];
    let nr = if empty { right_nritems.min(max_slot) } else { (right_nritems - 1).min(max_slot) };
    let mut push_space = 0i64;
    let mut push_items = 0usize;
    for i in 0..nr {
        if !empty && push_items > 0 {
            if slot0 < i {
                break;
            }
            if slot0 == i {
                let space = free_space(&right);
                if space + push_space * 2 > free_space_left {
                    break;
                }
            }
        }
        if slot0 == i {
            push_space += data_size;
        }
        let this_item_size = item_size_at(&right, i);
        if this_item_size + ITEM_SIZE as i64 + push_space > free_space_left {
            break;
        }
        push_items += 1;
        push_space += this_item_size + ITEM_SIZE as i64;
    }
    if push_items == 0 {
        tree_unlock(&left);
        return false;
    }
    assert!(empty || push_items < nritems(&right), "push_leaf_left emptied the leaf");
    let old_left_nritems = nritems(&left);
    assert!(old_left_nritems > 0, "pushing into an empty left leaf");
    // Push data from right to left.
    move_items(&mut right.data.borrow_mut(), 0, push_items, &mut left.data.borrow_mut(), old_left_nritems);
    mark_buffer_dirty(handle, &left);
    if nritems(&right) > 0 {
        mark_buffer_dirty(handle, &right);
    } else {
        clear_buffer_dirty(handle, &right);
    }
    // The leaf's new first key goes up (zeroes when it was emptied; the
    // caller deletes its pointer then).
    let key = leaf_key(&right, 0);
    fixup_low_keys(handle, p, &key, 1);
    // Then fix up the leaf pointer in the path.
    if p.slots[0] < push_items {
        p.slots[0] += old_left_nritems;
        tree_unlock(&right);
        p.nodes[0] = Some(left);
        p.slots[1] -= 1;
    } else {
        tree_unlock(&left);
        p.slots[0] -= push_items;
    }
    true
}

/// `push_leaf_left`: make at least `data_size` of room in the path's leaf
/// by pushing items before `max_slot` into the left neighbour under the
/// same parent. Returns whether it worked.
async fn push_leaf_left(
    handle: &TransHandle,
    root: &Root,
    p: &mut Path,
    min_data_size: i64,
    data_size: i64,
    empty: bool,
    max_slot: usize,
) -> Result<bool, Error> {
    let fs = &handle.fs;
    let slot = p.slots[1];
    if slot == 0 {
        return Ok(false);
    }
    let Some(upper) = p.nodes[1].clone() else { return Ok(false) };
    let right = p.nodes[0].clone().expect("push without a leaf");
    let right_nritems = nritems(&right);
    if right_nritems == 0 {
        return Ok(false);
    }
    assert_tree_write_locked(&upper);
    let left = read_node_slot(fs, &upper, slot - 1).await?;
    tree_lock(fs, &left).await;
    let free = free_space(&left);
    if free < data_size {
        tree_unlock(&left);
        return Ok(false);
    }
    let left = match cow_block(handle, root, &left, Some((&upper, slot - 1))).await {
        Ok(cow) => cow,
        // ENOSPC is not fatal here.
        Err(Error::Enospc) => {
            tree_unlock(&left);
            return Ok(false);
        }
        Err(e) => {
            tree_unlock(&left);
            return Err(e);
        }
    };
    if let Err(e) = check_sibling_keys(handle, &left, &right) {
        tree_unlock(&left);
        return Err(e);
    }
    Ok(push_leaf_left_locked(handle, p, min_data_size, empty, left, free, right_nritems, max_slot))
}

/// `copy_for_split`: move items `[mid, nritems)` of `l` into the new empty
/// leaf `right`, link it after `l` and point the path at the half holding
/// its slot.
fn copy_for_split(
    handle: &TransHandle,
    p: &mut Path,
    l: &Rc<ExtentBuffer>,
    right: Rc<ExtentBuffer>,
    slot: usize,
    mid: usize,
    nritems: usize,
) {
    move_items(&mut l.data.borrow_mut(), mid, nritems - mid, &mut right.data.borrow_mut(), 0);
    let key = leaf_key(&right, 0);
    insert_ptr(handle, p, &key, right.start, p.slots[1] + 1, 1);
    mark_buffer_dirty(handle, &right);
    mark_buffer_dirty(handle, l);
    assert_eq!(p.slots[0], slot);
    if mid <= slot {
        tree_unlock(l);
        p.nodes[0] = Some(right);
        p.slots[0] -= mid;
        p.slots[1] += 1;
    } else {
        tree_unlock(&right);
    }
}

/// `push_for_double_split`: before splitting a leaf twice for a large item
/// in its middle, try to push the items after the slot right and those
/// before it left. Returns whether anything moved.
async fn push_for_double_split(
    handle: &TransHandle,
    root: &Root,
    p: &mut Path,
    data_size: i64,
) -> Result<bool, Error> {
    let mut progress = false;
    let slot = p.slots[0];
    let mut space_needed = data_size;
    if slot < nritems(p.leaf()) {
        space_needed -= free_space(p.leaf());
    }
    // Try to push all the items after our slot into the right leaf.
    progress |= push_leaf_right(handle, root, p, 1, space_needed, false, slot).await?;
    let n = nritems(p.leaf());
    // Our goal is to get our slot at the start or end of a leaf.
    if p.slots[0] == 0 || p.slots[0] == n {
        return Ok(true);
    }
    if free_space(p.leaf()) >= data_size {
        return Ok(true);
    }
    // Try to push all the items before our slot into the left leaf.
    let slot = p.slots[0];
    let mut space_needed = data_size;
    if slot > 0 {
        space_needed -= free_space(p.leaf());
    }
    progress |= push_leaf_left(handle, root, p, 1, space_needed, false, slot).await?;
    Ok(progress)
}

/// `split_leaf`: make `data_size` of room at the path's slot: push to the
/// neighbours first, then split the leaf (in two, or in three for a large
/// item in the middle), or start an empty leaf when the new item cannot
/// share one. `extend`: the item at the slot grows instead.
async fn split_leaf(
    handle: &TransHandle,
    root: &Root,
    ins_key: &Key,
    p: &mut Path,
    data_size: i64,
    extend: bool,
) -> Result<(), Error> {
    let lds = i64::from(leaf_data_size(handle.fs.nodesize));
    let mut l = p.nodes[0].clone().expect("split_leaf without a leaf");
    let slot = p.slots[0];
    if extend && data_size + item_size_at(&l, slot) + ITEM_SIZE as i64 > lds {
        return Err(Error::Eoverflow);
    }
    // First try to make some room by pushing left and right.
    if data_size > 0 && p.nodes[1].is_some() {
        let mut space_needed = data_size;
        if slot < nritems(&l) {
            space_needed -= free_space(&l);
        }
        let pushed = push_leaf_right(handle, root, p, space_needed, space_needed, false, 0).await?;
        if !pushed {
            space_needed = data_size;
            if slot > 0 {
                space_needed -= free_space(&l);
            }
            push_leaf_left(handle, root, p, space_needed, space_needed, false, usize::MAX).await?;
        }
        l = p.nodes[0].clone().expect("push keeps a leaf");
        // Did the pushes work?
        if free_space(&l) >= data_size {
            return Ok(());
        }
    }
    if p.nodes[1].is_none() {
        insert_new_root(handle, root, p, 1).await?;
    }
    let mut num_doubles = 0;
    let mut tried_avoid_double = false;
    loop {
        // again:
        let mut split = 1;
        let l = p.nodes[0].clone().expect("split_leaf lost the leaf");
        let slot = p.slots[0];
        let nritems = nritems(&l);
        let mut mid = nritems.div_ceil(2);
        let mut push_for_double = false;
        if mid <= slot {
            if nritems == 1 || space_used(&l, mid, nritems - mid) + data_size > lds {
                if slot >= nritems {
                    split = 0;
                } else {
                    mid = slot;
                    if mid != nritems && space_used(&l, mid, nritems - mid) + data_size > lds {
                        if data_size > 0 && !tried_avoid_double {
                            push_for_double = true;
                        } else {
                            split = 2;
                        }
                    }
                }
            }
        } else if space_used(&l, 0, mid) + data_size > lds {
            if !extend && data_size > 0 && slot == 0 {
                split = 0;
            } else if (extend || data_size == 0) && slot == 0 {
                mid = 1;
            } else {
                mid = slot;
                if mid != nritems && space_used(&l, mid, nritems - mid) + data_size > lds {
                    if data_size > 0 && !tried_avoid_double {
                        push_for_double = true;
                    } else {
                        split = 2;
                    }
                }
            }
        }
        if push_for_double {
            // The kernel ignores what the pushes return.
            let _ = push_for_double_split(handle, root, p, data_size).await;
            tried_avoid_double = true;
            if free_space(p.leaf()) >= data_size {
                return Ok(());
            }
            continue;
        }
        let disk_key = if split == 0 { *ins_key } else { leaf_key(&l, mid) };
        let right = alloc_tree_block(handle, root, 0).await?;
        if split == 0 {
            // The new item alone in a fresh leaf.
            if mid <= slot {
                insert_ptr(handle, p, &disk_key, right.start, p.slots[1] + 1, 1);
                tree_unlock(&l);
                p.nodes[0] = Some(right);
                p.slots[0] = 0;
                p.slots[1] += 1;
            } else {
                insert_ptr(handle, p, &disk_key, right.start, p.slots[1], 1);
                tree_unlock(&l);
                p.nodes[0] = Some(right);
                p.slots[0] = 0;
                if p.slots[1] == 0 {
                    fixup_low_keys(handle, p, &disk_key, 1);
                }
            }
            return Ok(());
        }
        copy_for_split(handle, p, &l, right, slot, mid, nritems);
        if split == 2 {
            assert_eq!(num_doubles, 0, "a leaf split three times");
            num_doubles += 1;
            continue;
        }
        return Ok(());
    }
}

// ---------------------------------------------------------------------------
// Items.

/// `setup_items_for_insert`: open room for `keys` (sorted, with their data
/// sizes) at the path's slot; the search made the room. Their data is
/// zeroed; the caller fills it.
pub fn setup_items_for_insert(handle: &TransHandle, p: &mut Path, keys: &[Key], data_sizes: &[u32]) {
    assert_eq!(keys.len(), data_sizes.len());
    assert!(!keys.is_empty());
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "items to insert are not sorted");
    // Update keys in the parents first, then let them go.
    if p.slots[0] == 0 {
        fixup_low_keys(handle, p, &keys[0], 1);
    }
    p.unlock_up_safe(1);
    let leaf = p.leaf().clone();
    assert_tree_write_locked(&leaf);
    let slot = p.slots[0];
    let n = nritems(&leaf);
    let total = data_sizes.iter().map(|&s| i64::from(s)).sum::<i64>() + (keys.len() * ITEM_SIZE) as i64;
    let free = free_space(&leaf);
    assert!(free >= total, "not enough freespace need {total} have {free}");
    if slot > 0 {
        let prev = leaf_key(&leaf, slot - 1);
        assert!(prev < keys[0], "inserting {} after {prev}", keys[0]);
    }
    if slot < n {
        let next = leaf_key(&leaf, slot);
        assert!(*keys.last().expect("not empty") < next, "inserting {} before {next}", keys[keys.len() - 1]);
    }
    accessors::insert_empty_items_in_leaf(&mut leaf.data.borrow_mut(), slot, keys, data_sizes);
    mark_buffer_dirty(handle, &leaf);
}

/// `btrfs_insert_empty_items`: search for room and insert items with
/// zeroed data at `path.slots[0]`; `Eexist` if the first key exists (the
/// path still points at it).
pub async fn insert_empty_items(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    keys: &[Key],
    data_sizes: &[u32],
) -> Result<(), Error> {
    assert_eq!(keys.len(), data_sizes.len());
    assert!(!keys.is_empty());
    let total = data_sizes.iter().sum::<u32>() + (keys.len() * ITEM_SIZE) as u32;
    assert!(total <= leaf_data_size(handle.fs.nodesize), "items of {total} bytes fit no leaf");
    let found = search_slot(Some(handle), root, &keys[0], path, total as i32, true).await?;
    if found {
        return Err(Error::Eexist);
    }
    setup_items_for_insert(handle, path, keys, data_sizes);
    Ok(())
}

/// `btrfs_insert_item`: insert one item with its data.
pub async fn insert_item(handle: &TransHandle, root: &Rc<Root>, key: &Key, data: &[u8]) -> Result<(), Error> {
    let mut path = Path::new();
    insert_empty_items(handle, root, &mut path, std::slice::from_ref(key), &[data.len() as u32]).await?;
    let leaf = path.leaf();
    accessors::item_data_mut(&mut leaf.data.borrow_mut(), path.slots[0]).copy_from_slice(data);
    mark_buffer_dirty(handle, leaf);
    Ok(())
}

/// `btrfs_del_leaf`: remove the path's emptied leaf from its parent and
/// free it.
fn del_leaf(handle: &TransHandle, root: &Root, p: &mut Path, leaf: &Rc<ExtentBuffer>) {
    assert_eq!(leaf.generation(), handle.transid);
    del_ptr(handle, root, p, 1, p.slots[1]);
    // Freeing is expensive: let the locks go first.
    p.unlock_up_safe(0);
    free_tree_block(handle, root, leaf);
    free_extent_buffer_stale(&handle.fs, leaf);
}

/// `btrfs_del_items`: delete items `[slot, slot + nr)` of the path's leaf
/// (found by a search with `ins_len < 0`). An emptied leaf leaves the tree;
/// one less than a third full tries to empty itself into its neighbours.
pub async fn del_items(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    slot: usize,
    nr: usize,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let leaf = path.leaf().clone();
    assert_tree_write_locked(&leaf);
    assert!(nr > 0 && slot + nr <= nritems(&leaf), "del_items {slot}+{nr} past the leaf");
    accessors::del_items_in_leaf(&mut leaf.data.borrow_mut(), slot, nr);
    let n = nritems(&leaf);
    if n == 0 {
        // Delete the leaf if we have emptied it.
        if Rc::ptr_eq(&leaf, &root.node()) {
            leaf.set_level(0);
            mark_buffer_dirty(handle, &leaf);
        } else {
            clear_buffer_dirty(handle, &leaf);
            del_leaf(handle, root, path, &leaf);
        }
        return Ok(());
    }
    let used = space_used(&leaf, 0, n);
    if slot == 0 {
        let key = leaf_key(&leaf, 0);
        fixup_low_keys(handle, path, &key, 1);
    }
    if used >= i64::from(leaf_data_size(fs.nodesize)) / 3 {
        mark_buffer_dirty(handle, &leaf);
        return Ok(());
    }
    // Mostly empty: try to move all its items into its neighbours. If not
    // all move, keep it: later inserts may fill it.
    let mut ret = Ok(());
    let pslot = path.slots[1];
    // At least the first item must fit into the left neighbour.
    let min_push_space = ITEM_SIZE as i64 + item_size_at(&leaf, 0);
    if let Err(e) = push_leaf_left(handle, root, path, 0, min_push_space, true, usize::MAX).await
        && e != Error::Enospc
    {
        ret = Err(e);
    }
    if path.nodes[0].as_ref().is_some_and(|l| Rc::ptr_eq(l, &leaf)) && nritems(&leaf) > 0 {
        // All the rest to the right neighbour, or nothing.
        let min_push_space = space_used(&leaf, 0, nritems(&leaf));
        if let Err(e) = push_leaf_right(handle, root, path, 0, min_push_space, true, 0).await
            && e != Error::Enospc
        {
            ret = Err(e);
        }
    }
    if nritems(&leaf) == 0 {
        path.slots[1] = pslot;
        del_leaf(handle, root, path, &leaf);
    } else if path.nodes[0].as_ref().is_some_and(|l| Rc::ptr_eq(l, &leaf)) {
        // Still ours; otherwise a push dirtied it.
        mark_buffer_dirty(handle, &leaf);
    }
    ret
}

/// `btrfs_extend_item`: grow the path's item by `data_size` zero bytes
/// (the search made room, with `search_for_extension`).
pub fn extend_item(handle: &TransHandle, p: &Path, data_size: u32) {
    let leaf = p.leaf();
    assert_tree_write_locked(leaf);
    accessors::extend_item(&mut leaf.data.borrow_mut(), p.slots[0], data_size);
    mark_buffer_dirty(handle, leaf);
}

/// `btrfs_truncate_item`: shrink the path's item to `new_size`; from the
/// front (`!from_end`) the key offset grows by the bytes cut, and a changed
/// slot-0 key goes up.
pub fn truncate_item(handle: &TransHandle, p: &Path, new_size: u32, from_end: bool) {
    let leaf = p.leaf();
    assert_tree_write_locked(leaf);
    let slot = p.slots[0];
    let old_key = leaf_key(leaf, slot);
    accessors::truncate_item(&mut leaf.data.borrow_mut(), slot, new_size, from_end);
    mark_buffer_dirty(handle, leaf);
    let new_key = leaf_key(leaf, slot);
    if slot == 0 && new_key != old_key {
        fixup_low_keys(handle, p, &new_key, 1);
    }
}

// ---------------------------------------------------------------------------
// Walking leaves.

/// `btrfs_next_leaf`: move the path to the first item of the next leaf.
/// Returns false at the end of the tree. The path is searched again from the
/// last key of its leaf, so it may see the tree as others changed it; on
/// return it holds read locks on the new leaf and the nodes above it that
/// lead there from slot 0.
pub async fn next_leaf(root: &Rc<Root>, path: &mut Path) -> Result<bool, Error> {
    let fs = root.fs_info();
    let n = nritems(path.leaf());
    if n == 0 {
        return Ok(false);
    }
    let key = leaf_key(path.leaf(), n - 1);
    let result = loop {
        match next_leaf_once(&fs, root, path, &key).await {
            Ok(Some(more)) => break Ok(more),
            Ok(None) => continue,
            Err(e) => break Err(e),
        }
    };
    unlock_up(path, 0, 1, 0, None);
    result
}

/// One attempt of `btrfs_next_old_leaf`; `None` is its `goto again`.
async fn next_leaf_once(
    fs: &FsInfo,
    root: &Rc<Root>,
    path: &mut Path,
    key: &Key,
) -> Result<Option<bool>, Error> {
    path.release();
    path.keep_locks = true;
    let found = search_slot(None, root, key, path, 0, false).await;
    path.keep_locks = false;
    let found = found?;
    let n = nritems(path.leaf());
    // While the path was released, items may have moved in after the key.
    if n > 0 && path.slots[0] + 1 < n {
        if found {
            path.slots[0] += 1;
        }
        return Ok(Some(true));
    }
    // The key was removed and a bigger one moved into its place.
    if n > 0 && !found && path.slots[0] == n - 1 {
        return Ok(Some(true));
    }
    let mut level = 1;
    let (slot, mut next) = loop {
        if level == MAX_LEVEL {
            return Ok(Some(false));
        }
        let Some(c) = path.nodes[level].clone() else { return Ok(Some(false)) };
        let slot = path.slots[level] + 1;
        if slot >= nritems(&c) {
            level += 1;
            continue;
        }
        // Start from this level: drop what is below.
        for i in 0..level {
            path.unlock_level(i);
            path.nodes[i] = None;
        }
        let next = match read_block_for_search(fs, root, path, &c, slot).await {
            Err(Error::Eagain) => return Ok(None),
            Err(e) => {
                path.release();
                return Err(e);
            }
            Ok(next) => next,
        };
        if !path.skip_locking && !try_tree_read_lock(&next) {
            tree_read_lock(fs, &next).await;
        }
        break (slot, next);
    };
    path.slots[level] = slot;
    loop {
        level -= 1;
        path.nodes[level] = Some(next.clone());
        path.slots[level] = 0;
        if !path.skip_locking {
            path.locks[level] = PathLock::Read;
        }
        if level == 0 {
            break;
        }
        next = match read_block_for_search(fs, root, path, &next, 0).await {
            Err(Error::Eagain) => return Ok(None),
            Err(e) => {
                path.release();
                return Err(e);
            }
            Ok(child) => child,
        };
        if !path.skip_locking {
            tree_read_lock(fs, &next).await;
        }
    }
    Ok(Some(true))
}

/// `btrfs_next_item`: the next item, moving to the next leaf at the end of
/// this one. Returns false at the end of the tree.
pub async fn next_item(root: &Rc<Root>, path: &mut Path) -> Result<bool, Error> {
    path.slots[0] += 1;
    if path.slots[0] >= nritems(path.leaf()) {
        return next_leaf(root, path).await;
    }
    Ok(true)
}

/// `btrfs_prev_leaf`: search again for the key just before the first key
/// of the path's leaf. Returns false when there is no smaller key. The
/// path's slot may equal its leaf's nritems (the caller steps back).
pub async fn prev_leaf(root: &Rc<Root>, path: &mut Path) -> Result<bool, Error> {
    let orig_key = path.item_key(0);
    let mut key = orig_key;
    if key.offset > 0 {
        key.offset -= 1;
    } else if key.item_type > 0 {
        key.item_type -= 1;
        key.offset = u64::MAX;
    } else if key.objectid > 0 {
        key.objectid -= 1;
        key.item_type = u8::MAX;
        key.offset = u64::MAX;
    } else {
        return Ok(false);
    }
    path.release();
    if search_slot(None, root, &key, path, 0, false).await? {
        return Ok(true);
    }
    // Items may have moved into the front of the leaf we had (a push from
    // a neighbour) while the path was released.
    let leaf = path.leaf().clone();
    if path.slots[0] < nritems(&leaf) && leaf_key(&leaf, path.slots[0]) == orig_key {
        if path.slots[0] > 0 {
            path.slots[0] -= 1;
            return Ok(true);
        }
        // orig_key is the leftmost key of the tree.
        return Ok(false);
    }
    // An item with the previous key may have been pushed to slot 0.
    Ok(nritems(&leaf) > 0 && leaf_key(&leaf, 0) <= key)
}

/// Read-only lookup of one item's data (a search without COW).
pub async fn lookup_item(root: &Rc<Root>, key: &Key) -> Result<Option<Vec<u8>>, Error> {
    let mut path = Path::new();
    if !search_slot(None, root, key, &mut path, 0, false).await? {
        return Ok(None);
    }
    Ok(Some(path.item_data(path.slots[0])))
}

// ---------------------------------------------------------------------------
// Trees.

/// `btrfs_create_tree`: a new tree of one empty leaf, added to `fs.roots`.
/// The root item is filled in; inserting it into the root tree is the
/// caller's.
pub async fn create_tree(handle: &TransHandle, fs: &Rc<FsInfo>, objectid: u64) -> Result<Rc<Root>, Error> {
    assert!(!fs.roots.borrow().contains_key(&objectid), "tree {objectid} exists");
    // btrfs_alloc_root leaves root->node empty until the leaf exists.
    let placeholder = alloc_dummy_extent_buffer(fs, 0);
    let root = Root::new(fs, objectid, placeholder, RootItem::default());
    let leaf = alloc_tree_block(handle, &root, 0).await?;
    root.set_node(leaf.clone());
    {
        let mut item = root.root_item.borrow_mut();
        item.bytenr = leaf.start;
        item.level = 0;
        item.generation = handle.transid;
        item.generation_v2 = handle.transid;
        item.refs = 1;
    }
    root.last_trans.set(handle.transid);
    root.dirty.set(true);
    tree_unlock(&leaf);
    fs.roots.borrow_mut().insert(objectid, root.clone());
    Ok(root)
}

/// Visit every block of a tree, parents before children, left to right,
/// each read-locked while visited. For quiescent trees (tests, check,
/// statistics): a concurrent change may be seen half-way.
pub async fn walk_tree<F: FnMut(&ExtentBuffer)>(root: &Rc<Root>, mut visit: F) -> Result<(), Error> {
    let fs = root.fs_info();
    let top = read_lock_root_node(&fs, root).await;
    let mut pending = Vec::new();
    visit(&top);
    push_children(&top, &mut pending);
    tree_read_unlock(&top);
    while let Some((bytenr, level, generation, key, owner)) = pending.pop() {
        let eb = read_tree_block_verified(&fs, bytenr, owner, level, generation, Some(key)).await?;
        tree_read_lock(&fs, &eb).await;
        visit(&eb);
        push_children(&eb, &mut pending);
        tree_read_unlock(&eb);
    }
    Ok(())
}

/// The children of `eb` onto a stack, so that the first pops first.
fn push_children(eb: &ExtentBuffer, stack: &mut Vec<(u64, u8, u64, Key, u64)>) {
    let data = eb.data.borrow();
    let level = header_level(&data);
    if level == 0 {
        return;
    }
    let owner = accessors::header_owner(&data);
    for slot in (0..header_nritems(&data) as usize).rev() {
        stack.push((
            node_blockptr(&data, slot),
            level - 1,
            node_ptr_generation(&data, slot),
            node_key(&data, slot),
            owner,
        ));
    }
}

/// The shape of a tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Level of the root block (0: the root is a leaf).
    pub level: u8,
    pub nodes: u64,
    pub leaves: u64,
    pub items: u64,
    /// Blocks times nodesize.
    pub bytes_used: u64,
}

/// Count the blocks and items of a tree ([`walk_tree`]).
pub async fn tree_stats(fs: &FsInfo, root: &Rc<Root>) -> Result<TreeStats, Error> {
    let mut stats = TreeStats::default();
    let mut top = true;
    walk_tree(root, |eb| {
        let level = eb.level();
        if top {
            stats.level = level;
            top = false;
        }
        if level == 0 {
            stats.leaves += 1;
            stats.items += u64::from(eb.nritems());
        } else {
            stats.nodes += 1;
        }
    })
    .await?;
    stats.bytes_used = (stats.nodes + stats.leaves) * u64::from(fs.nodesize);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_group::BlockGroup;
    use crate::env::SyncMode;
    use crate::extent_io::{
        btree_write_cache_pages, evict_extent_buffers, lock_extent_buffer_for_io, try_release_extent_buffer,
        write_and_wait_ebs, write_one_eb,
    };
    use crate::extent_tree::unpin_extents;
    use crate::fix::FixPolicy;
    use crate::format::{
        BLOCK_GROUP_METADATA, FixedItem, INODE_ITEM_KEY, InodeItem, ORPHAN_ITEM_KEY, max_item_size,
    };
    use crate::testenv::TestEnv;
    use crate::transaction::{TransState, end_transaction, join_transaction};
    use crate::tree_checker::check_tree_block;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Where the metadata block group starts on the test device.
    const BG_START: u64 = 1 << 20;
    /// The test tree: a subvolume id, so COWs are charged to the handle.
    const TREE: u64 = 256;

    type Model = BTreeMap<Key, Vec<u8>>;

    struct Harness {
        env: Rc<TestEnv>,
        fs: Rc<FsInfo>,
        root: Rc<Root>,
    }

    impl Harness {
        /// A filesystem with one metadata block group of `bg_bytes` and an
        /// empty tree created and committed.
        fn new(nodesize: u32, fix: FixPolicy, bg_bytes: u64) -> Harness {
            let env = TestEnv::new((BG_START + bg_bytes) as usize);
            let fs = FsInfo::new(env.clone(), nodesize, fix);
            fs.block_groups.add(BlockGroup::new(BG_START, bg_bytes, BLOCK_GROUP_METADATA));
            fs.fsid.set(Some([0x5a; 16]));
            let root = env.run({
                let fs = fs.clone();
                async move {
                    let handle = join_transaction(&fs, "mkfs").await.unwrap();
                    let root = create_tree(&handle, &fs, TREE).await.unwrap();
                    mini_commit(&fs, vec![handle]).await;
                    root
                }
            });
            Harness { env, fs, root }
        }

        fn run<T: 'static, F: Future<Output = T> + 'static>(
            &self,
            f: impl FnOnce(Rc<FsInfo>, Rc<Root>) -> F,
        ) -> T {
            self.env.run(f(self.fs.clone(), self.root.clone()))
        }

        fn join(&self) -> TransHandle {
            self.run(|fs, _| async move { join_transaction(&fs, "test").await.unwrap() })
        }

        fn commit(&self, handles: Vec<TransHandle>) {
            self.run(|fs, _| async move { mini_commit(&fs, handles).await });
        }

        fn stats(&self) -> TreeStats {
            self.run(|fs, root| async move { tree_stats(&fs, &root).await.unwrap() })
        }

        /// The restart reasons traced since trace index `from`.
        fn restarts_since(&self, from: usize) -> Vec<(u8, RestartReason)> {
            self.env.traces.borrow()[from..]
                .iter()
                .filter_map(|t| match t {
                    TraceEvent::SearchRestart { level, reason, .. } => Some((*level, *reason)),
                    _ => None,
                })
                .collect()
        }

        fn trace_mark(&self) -> usize {
            self.env.traces.borrow().len()
        }

        /// (cows, restarts) of the last search that returned.
        fn last_search(&self) -> (u32, u32) {
            self.env
                .traces
                .borrow()
                .iter()
                .rev()
                .find_map(|t| match t {
                    TraceEvent::SearchDone { cows, restarts, .. } => Some((*cows, *restarts)),
                    _ => None,
                })
                .expect("a search ran")
        }
    }

    /// Not the real commit: end the handles, write every block the
    /// transaction dirtied and wait, unpin what it freed, and close it, so
    /// that the next transaction must COW what this one wrote.
    async fn mini_commit(fs: &Rc<FsInfo>, handles: Vec<TransHandle>) {
        for handle in handles {
            end_transaction(handle);
        }
        let trans = fs.trans.running.borrow().clone().expect("a running transaction");
        assert_eq!(trans.num_writers.get(), 0, "mini_commit with open handles");
        let dirty: Vec<u64> = trans.dirty_ebs.borrow().iter().copied().collect();
        write_and_wait_ebs(fs, &dirty).await.expect("commit writeback");
        let pinned = std::mem::take(&mut *trans.pinned.borrow_mut());
        unpin_extents(fs, &pinned);
        trans.set_state(fs, TransState::Completed);
        *fs.trans.running.borrow_mut() = None;
        fs.trans.last_trans_committed.set(trans.transid);
    }

    fn key_of(k: u32) -> Key {
        Key::new(1000 + u64::from(k / 8), ORPHAN_ITEM_KEY, u64::from(k % 8) * 1000)
    }

    /// Item bytes that name their key, size and version.
    fn data_of(key: &Key, size: usize, salt: u8) -> Vec<u8> {
        let seed = key.objectid.wrapping_mul(31).wrapping_add(key.offset).wrapping_add(u64::from(salt));
        (0..size).map(|i| (seed.wrapping_add(i as u64 * 7) % 251) as u8).collect()
    }

    fn inode_item() -> Vec<u8> {
        InodeItem { mode: 0o100644, nlink: 1, ..Default::default() }.to_bytes()
    }

    /// Every invariant of the tree, checked block by block from the root:
    /// levels go down by one; each child has the generation its pointer
    /// carries and the key of its pointer as first key; nodes and non-root
    /// leaves are not empty and not over full; the tree checker accepts
    /// every block; keys ascend across leaves; no block is locked or
    /// carries a writeback blocker. Returns the items and the shape.
    async fn check_tree(fs: &FsInfo, root: &Rc<Root>) -> (Vec<(Key, Vec<u8>)>, TreeStats) {
        let nodesize = fs.nodesize;
        let nodeptrs = nodeptrs_per_block(nodesize) as usize;
        let top = root.node();
        let mut stats = TreeStats { level: top.level(), ..Default::default() };
        let mut items: Vec<(Key, Vec<u8>)> = Vec::new();
        // (block, expected level, expected first key)
        let mut stack: Vec<(Rc<ExtentBuffer>, u8, Option<Key>)> = vec![(top.clone(), top.level(), None)];
        while let Some((eb, level, first)) = stack.pop() {
            let is_root = Rc::ptr_eq(&eb, &top);
            assert!(!eb.lock.is_locked(), "block {} still locked", eb.start);
            assert_eq!(eb.writeback_blockers.get(), 0, "block {} still pinned by a search", eb.start);
            assert_eq!(eb.level(), level, "block {} at the wrong level", eb.start);
            assert_eq!(eb.owner(), root.objectid);
            let data = eb.data.borrow().clone();
            if let Err(e) = check_tree_block(&data, nodesize, Some(root.objectid)) {
                panic!("tree checker: {e}\n{}", accessors::dump_tree_block(&data));
            }
            let n = header_nritems(&data) as usize;
            if let Some(first) = first {
                assert_eq!(
                    eb.first_key(),
                    Some(first),
                    "block {}: first key differs from its pointer",
                    eb.start
                );
            }
            if level == 0 {
                stats.leaves += 1;
                stats.items += n as u64;
                assert!(is_root || n > 0, "empty non-root leaf {}", eb.start);
                let _ = leaf_free_space(&data); // panics if the items overflow
                for slot in 0..n {
                    let key = item_key(&data, slot);
                    if let Some((last, _)) = items.last() {
                        assert!(*last < key, "keys out of order across leaves: {last} then {key}");
                    }
                    items.push((key, accessors::item_data(&data, slot).to_vec()));
                }
                continue;
            }
            stats.nodes += 1;
            assert!(n >= 1 && n <= nodeptrs, "node {} has {n} pointers", eb.start);
            for slot in (0..n).rev() {
                let child = read_node_slot(fs, &eb, slot).await.expect("child readable");
                assert_eq!(child.generation(), node_ptr_generation(&data, slot), "child generation");
                stack.push((child, level - 1, Some(node_key(&data, slot))));
            }
        }
        stats.bytes_used = (stats.nodes + stats.leaves) * u64::from(nodesize);
        (items, stats)
    }

    /// Every item in key order through `next_leaf`, then in reverse through
    /// `prev_leaf` (as `btrfs_previous_item` walks).
    async fn scan(root: &Rc<Root>) -> (Vec<(Key, Vec<u8>)>, Vec<Key>) {
        let mut forward = Vec::new();
        let mut path = Path::new();
        search_slot(None, root, &Key::MIN, &mut path, 0, false).await.unwrap();
        loop {
            while path.slots[0] < nritems(path.leaf()) {
                forward.push((path.item_key(path.slots[0]), path.item_data(path.slots[0])));
                path.slots[0] += 1;
            }
            if !next_leaf(root, &mut path).await.unwrap() {
                break;
            }
        }
        path.release();
        let mut backward = Vec::new();
        search_slot(None, root, &Key::MAX, &mut path, 0, false).await.unwrap();
        loop {
            if path.slots[0] == 0 {
                if !prev_leaf(root, &mut path).await.unwrap() {
                    break;
                }
            } else {
                path.slots[0] -= 1;
            }
            let n = nritems(path.leaf());
            if n == 0 {
                break;
            }
            if path.slots[0] == n {
                path.slots[0] -= 1;
            }
            backward.push(path.item_key(path.slots[0]));
        }
        (forward, backward)
    }

    /// The tree equals the model, by walk and by scans; returns its shape.
    async fn verify(fs: &FsInfo, root: &Rc<Root>, model: &Model) -> TreeStats {
        let (items, stats) = check_tree(fs, root).await;
        let expect: Vec<(Key, Vec<u8>)> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
        assert!(items == expect, "tree holds {} items, model {}", items.len(), expect.len());
        let (forward, backward) = scan(root).await;
        assert!(forward == expect, "next_leaf scan differs from the model");
        let mut reversed: Vec<Key> = model.keys().copied().collect();
        reversed.reverse();
        assert_eq!(backward, reversed, "prev_leaf scan differs from the model");
        assert_eq!(tree_stats(fs, root).await.unwrap(), stats);
        stats
    }

    /// After a commit: the block group holds exactly the reachable blocks,
    /// nothing is pinned, nothing is locked or pinned by a search.
    fn assert_space_matches(fs: &FsInfo, stats: &TreeStats) {
        let (total, used, free) = fs.block_groups.totals(BLOCK_GROUP_METADATA);
        assert_eq!(used, stats.bytes_used, "block group used vs reachable blocks");
        assert_eq!(free, total - used, "free space leaked");
        assert!(fs.block_groups.all().iter().all(|g| g.pinned.get() == 0));
        for start in fs.buffer_tree.starts() {
            let eb = fs.buffer_tree.get(start).unwrap();
            assert!(!eb.lock.is_locked(), "eb {start} locked");
            assert_eq!(eb.writeback_blockers.get(), 0);
            assert_eq!(eb.writeback_inhibitors.get(), 0);
        }
    }

    async fn insert_ok(handle: &TransHandle, root: &Rc<Root>, model: &mut Model, key: Key, data: Vec<u8>) {
        match insert_item(handle, root, &key, &data).await {
            Ok(()) => assert!(model.insert(key, data).is_none(), "inserted {key} twice"),
            Err(Error::Eexist) => assert!(model.contains_key(&key), "EEXIST for missing {key}"),
            // The key exists and its item could not grow by that much: the
            // kernel's search fails in split_leaf before it can say EEXIST.
            Err(Error::Eoverflow) => assert!(model.contains_key(&key), "EOVERFLOW for missing {key}"),
            Err(e) => panic!("insert {key}: {e}"),
        }
    }

    /// Delete `key` and up to `nr - 1` following items of its leaf.
    async fn delete_ok(handle: &TransHandle, root: &Rc<Root>, model: &mut Model, key: Key, nr: usize) {
        let mut path = Path::new();
        let found = search_slot(Some(handle), root, &key, &mut path, -1, true).await.unwrap();
        if !found {
            assert!(!model.contains_key(&key), "{key} not found but in the model");
            return;
        }
        let slot = path.slots[0];
        let nr = nr.min(nritems(path.leaf()) - slot);
        for i in 0..nr {
            let k = path.item_key(slot + i);
            assert!(model.remove(&k).is_some(), "deleted {k}, not in the model");
        }
        del_items(handle, root, &mut path, slot, nr).await.unwrap();
    }

    // -----------------------------------------------------------------------
    // 1. Against a model.

    #[derive(Clone, Debug)]
    enum Size {
        Small(u16),
        Medium(u16),
        /// max_item_size minus this.
        NearMax(u16),
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert {
            key: u32,
            size: Size,
        },
        /// Sequential keys from `key`: appends.
        InsertRun {
            key: u32,
            count: u32,
            size: u16,
        },
        /// Delete `key` and up to `nr - 1` items after it in its leaf (one `del_items`).
        Delete {
            key: u32,
            nr: u8,
        },
        /// Delete keys one by one (many searches), across leaves.
        DeleteRun {
            key: u32,
            count: u32,
        },
        Lookup {
            key: u32,
        },
        Commit,
    }

    fn size_strategy() -> impl Strategy<Value = Size> {
        prop_oneof![
            6 => (0u16..120).prop_map(Size::Small),
            3 => (120u16..1500).prop_map(Size::Medium),
            1 => (0u16..300).prop_map(Size::NearMax),
        ]
    }

    /// Mixed operations over a key space of 2000: trees of one or two levels.
    fn op_strategy() -> impl Strategy<Value = Op> {
        const KEYS: u32 = 2000;
        prop_oneof![
            10 => (0..KEYS, size_strategy()).prop_map(|(key, size)| Op::Insert { key, size }),
            3 => (0..KEYS, 1u32..120, 0u16..400).prop_map(|(key, count, size)| Op::InsertRun { key, count, size }),
            6 => (0..KEYS, prop_oneof![4 => Just(1u8), 1 => 2u8..12]).prop_map(|(key, nr)| Op::Delete { key, nr }),
            1 => (0..KEYS, 1u32..100).prop_map(|(key, count)| Op::DeleteRun { key, count }),
            2 => (0..KEYS).prop_map(|key| Op::Lookup { key }),
            1 => Just(Op::Commit),
        ]
    }

    /// Long runs of medium items and long deletions at 4 KiB: trees of
    /// three and four levels that grow and shrink (node splits, pushes,
    /// merges, root promotion).
    fn deep_op_strategy() -> impl Strategy<Value = Op> {
        const KEYS: u32 = 12_000;
        prop_oneof![
            4 => (0..KEYS, 100u32..600, 300u16..1300).prop_map(|(key, count, size)| Op::InsertRun { key, count, size }),
            3 => (0..KEYS, size_strategy()).prop_map(|(key, size)| Op::Insert { key, size }),
            3 => (0..KEYS, 50u32..1500).prop_map(|(key, count)| Op::DeleteRun { key, count }),
            2 => (0..KEYS, 1u8..40).prop_map(|(key, nr)| Op::Delete { key, nr }),
            1 => (0..KEYS).prop_map(|key| Op::Lookup { key }),
            1 => Just(Op::Commit),
        ]
    }

    fn size_bytes(size: &Size, nodesize: u32) -> usize {
        let max = max_item_size(nodesize) as usize;
        match *size {
            Size::Small(s) | Size::Medium(s) => usize::from(s).min(max),
            Size::NearMax(d) => max - usize::from(d),
        }
    }

    /// Apply the operations batch by batch (a batch ends at a Commit),
    /// verifying the tree after each and the space after each commit.
    fn run_model(nodesize: u32, fix: FixPolicy, ops: Vec<Op>) {
        let bg = if nodesize == 65536 { 384 << 20 } else { 96 << 20 };
        let h = Harness::new(nodesize, fix, bg);
        let mut model = Model::new();
        let batches: Vec<Vec<Op>> = ops.split(|op| matches!(op, Op::Commit)).map(|b| b.to_vec()).collect();
        for (i, batch) in batches.into_iter().enumerate() {
            let m = std::mem::take(&mut model);
            model = h.run(move |fs, root| async move {
                let mut model = m;
                let handle = join_transaction(&fs, "model").await.unwrap();
                for (salt, op) in batch.iter().enumerate() {
                    match op {
                        Op::Insert { key, size } => {
                            let key = key_of(*key);
                            let data = data_of(&key, size_bytes(size, fs.nodesize), salt as u8);
                            insert_ok(&handle, &root, &mut model, key, data).await;
                        }
                        Op::InsertRun { key, count, size } => {
                            for k in *key..*key + *count {
                                let key = key_of(k);
                                let data = data_of(&key, usize::from(*size), salt as u8);
                                insert_ok(&handle, &root, &mut model, key, data).await;
                            }
                        }
                        Op::Delete { key, nr } => {
                            delete_ok(&handle, &root, &mut model, key_of(*key), usize::from(*nr)).await;
                        }
                        Op::DeleteRun { key, count } => {
                            for k in *key..*key + *count {
                                delete_ok(&handle, &root, &mut model, key_of(k), 1).await;
                            }
                        }
                        Op::Lookup { key } => {
                            let key = key_of(*key);
                            assert_eq!(lookup_item(&root, &key).await.unwrap(), model.get(&key).cloned());
                        }
                        Op::Commit => unreachable!(),
                    }
                }
                verify(&fs, &root, &model).await;
                mini_commit(&fs, vec![handle]).await;
                let stats = verify(&fs, &root, &model).await;
                assert_space_matches(&fs, &stats);
                model
            });
            assert!(h.env.violations.borrow().is_empty(), "batch {i}: {:?}", h.env.violations.borrow());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

        #[test]
        fn matches_model_4k(ops in prop::collection::vec(op_strategy(), 1..160)) {
            run_model(4096, FixPolicy::None, ops);
        }

        #[test]
        fn matches_model_16k(ops in prop::collection::vec(op_strategy(), 1..160)) {
            run_model(16384, FixPolicy::None, ops);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 80, ..ProptestConfig::default() })]

        #[test]
        fn matches_model_64k(ops in prop::collection::vec(op_strategy(), 1..120)) {
            run_model(65536, FixPolicy::None, ops);
        }

        #[test]
        fn deep_trees_match_model_4k(ops in prop::collection::vec(deep_op_strategy(), 1..40)) {
            run_model(4096, FixPolicy::None, ops);
        }

        #[test]
        fn matches_model_4k_under_every_fix(
            fix in prop::sample::select(FixPolicy::ALL.to_vec()),
            ops in prop::collection::vec(op_strategy(), 1..120),
        ) {
            run_model(4096, fix, ops);
        }
    }

    // -----------------------------------------------------------------------
    // 2. Splits: the shapes the kernel's split and push rules give.

    /// A deterministic stream for tests (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    /// Items per leaf, left to right.
    fn leaf_fill(h: &Harness) -> Vec<u32> {
        h.run(|_, root| async move {
            let mut fill = Vec::new();
            walk_tree(&root, |eb| {
                if eb.level() == 0 {
                    fill.push(eb.nritems());
                }
            })
            .await
            .unwrap();
            fill
        })
    }

    /// Insert INODE_ITEMs for `inos` in that order in one transaction,
    /// committed, and check the tree against `model` (updated).
    fn insert_inodes(h: &Harness, model: &mut Model, inos: Vec<u64>) {
        let m = std::mem::take(model);
        *model = h.run(|fs, root| async move {
            let handle = join_transaction(&fs, "inodes").await.unwrap();
            let mut model = m;
            for ino in inos {
                insert_ok(&handle, &root, &mut model, Key::new(ino, INODE_ITEM_KEY, 0), inode_item()).await;
            }
            mini_commit(&fs, vec![handle]).await;
            let stats = verify(&fs, &root, &model).await;
            assert_space_matches(&fs, &stats);
            model
        })
    }

    #[test]
    fn a_16k_leaf_holds_88_inode_items() {
        // (16384 - 101) / (25 + 160) = 88, with 3 bytes to spare.
        let h = Harness::new(16384, FixPolicy::None, 64 << 20);
        let mut model = Model::new();
        insert_inodes(&h, &mut model, (256..256 + 88).collect());
        assert_eq!(leaf_fill(&h), [88]);
        let leaf = h.root.node();
        assert_eq!(free_space(&leaf), 3);
        // One more splits the root leaf (no neighbours to push to): two
        // halves under a new root.
        insert_inodes(&h, &mut model, vec![256 + 88]);
        assert_eq!(leaf_fill(&h), [44, 45]);
        assert_eq!(h.stats().level, 1);
    }

    #[test]
    fn sequential_appends_fill_leaves_to_capacity() {
        let h = Harness::new(16384, FixPolicy::None, 64 << 20);
        let n = 5000u64;
        insert_inodes(&h, &mut Model::new(), (256..256 + n).collect());
        let fill = leaf_fill(&h);
        // Each split halves the last leaf; the next time that leaf fills up,
        // push_leaf_left tops up its left neighbour to the byte first. So
        // every leaf but the last two holds 88 items.
        let (full, tail) = fill.split_at(fill.len() - 2);
        assert!(full.iter().all(|&n| n == 88), "{fill:?}");
        assert_eq!(fill.iter().map(|&n| u64::from(n)).sum::<u64>(), n);
        assert!(tail.iter().all(|n| (44..=88).contains(n)), "{tail:?}");
        eprintln!("{n} sequential INODE_ITEMs at 16 KiB: {:?}, leaves {:?}", h.stats(), fill.len());
    }

    #[test]
    fn random_inserts_leave_leaves_partly_full() {
        let h = Harness::new(16384, FixPolicy::None, 64 << 20);
        let n = 5000u64;
        let mut inos: Vec<u64> = (256..256 + n).collect();
        Rng(0x9e37_79b9_7f4a_7c15).shuffle(&mut inos);
        insert_inodes(&h, &mut Model::new(), inos);
        let fill = leaf_fill(&h);
        let mean = n as f64 / fill.len() as f64 / 88.0;
        eprintln!("{n} random INODE_ITEMs at 16 KiB: {:?}, mean fill {:.2}", h.stats(), mean);
        // A full leaf first pushes into its neighbours and splits in half
        // only when they are full too, so leaves stay well above half
        // full (measured: 0.87), but below the sequential case.
        assert!((0.7..0.95).contains(&mean), "mean leaf fill {mean}");
        assert!(fill.iter().filter(|&&n| n == 88).count() < fill.len() / 2, "{fill:?}");
        assert!(fill.iter().all(|&n| n >= 20), "{fill:?}");
    }

    #[test]
    fn a_large_item_in_the_middle_of_a_full_leaf_splits_it_twice() {
        let h = Harness::new(4096, FixPolicy::None, 64 << 20);
        let model = h.run(|fs, root| async move {
            let handle = join_transaction(&fs, "double").await.unwrap();
            let mut model = Model::new();
            for i in 0..30 {
                let key = key_of(i * 2);
                insert_ok(&handle, &root, &mut model, key, data_of(&key, 100, 0)).await;
            }
            assert_eq!(root.node().level(), 0);
            let key = key_of(31);
            let big = data_of(&key, max_item_size(4096) as usize, 1);
            insert_ok(&handle, &root, &mut model, key, big).await;
            mini_commit(&fs, vec![handle]).await;
            verify(&fs, &root, &model).await;
            model
        });
        // The key goes to slot 16: split there, then the big item starts
        // a leaf of its own before the right half.
        assert_eq!(leaf_fill(&h), [16, 1, 14]);
        assert_eq!(model.len(), 31);
    }

    // -----------------------------------------------------------------------
    // 3. Restarts and COWs per search.

    /// A three-level tree at 4 KiB (three 1000-byte items per leaf): keys
    /// `key_of(2 * i)`, committed.
    fn three_level_tree(fix: FixPolicy) -> (Harness, Model) {
        let h = Harness::new(4096, fix, 64 << 20);
        let model = h.run(|fs, root| async move {
            let handle = join_transaction(&fs, "build").await.unwrap();
            let mut model = Model::new();
            let mut i = 0;
            while root.node().level() < 2 {
                let key = key_of(2 * i);
                insert_ok(&handle, &root, &mut model, key, data_of(&key, 1000, 0)).await;
                i += 1;
            }
            // More, so that the root has a few pointers, all but the last
            // to full nodes.
            for j in i..i + 700 {
                let key = key_of(2 * j);
                insert_ok(&handle, &root, &mut model, key, data_of(&key, 1000, 0)).await;
            }
            mini_commit(&fs, vec![handle]).await;
            let stats = verify(&fs, &root, &model).await;
            assert_eq!(stats.level, 2);
            assert_space_matches(&fs, &stats);
            model
        });
        (h, model)
    }

    struct SearchOutcome {
        handle: Option<TransHandle>,
        found: bool,
        cows: u32,
        restarts: Vec<(u8, RestartReason)>,
        leaf: u64,
    }

    /// One `search_slot` (COW with a handle, read-only without), then the
    /// path is released.
    fn search_once(h: &Harness, handle: Option<TransHandle>, key: Key, ins_len: i32) -> SearchOutcome {
        let mark = h.trace_mark();
        let (handle, found, leaf) = h.run(move |_, root| async move {
            let mut path = Path::new();
            let cow = handle.is_some();
            let found = search_slot(handle.as_ref(), &root, &key, &mut path, ins_len, cow).await.unwrap();
            let leaf = path.leaf().start;
            drop(path);
            (handle, found, leaf)
        });
        let (cows, restarts) = h.last_search();
        let reasons = h.restarts_since(mark);
        assert_eq!(reasons.len(), restarts as usize);
        SearchOutcome { handle, found, cows, restarts: reasons, leaf }
    }

    /// Write one block back (WRITTEN set), and wait. `SyncMode::All`
    /// writes it even when a handle inhibits it.
    fn write_back(h: &Harness, bytenr: u64, mode: SyncMode) {
        h.run(move |fs, _| async move {
            let eb = fs.buffer_tree.get(bytenr).expect("cached");
            assert!(lock_extent_buffer_for_io(&fs, &eb, mode).await, "eb {bytenr} not written");
            assert!(write_one_eb(&fs, &eb, mode));
        });
        let eb = h.fs.buffer_tree.get(bytenr).unwrap();
        assert!(eb.header_flag_written() && !eb.dirty() && !eb.under_writeback());
    }

    #[test]
    fn a_search_cows_its_path_once_per_transaction_and_again_after_writeback() {
        for fix in [FixPolicy::None, FixPolicy::OverwriteWritten, FixPolicy::Both] {
            let (h, model) = three_level_tree(fix);
            let key = *model.keys().nth(model.len() / 2).unwrap();
            let handle = h.join();
            // Fresh transaction: the root needs COW but is only read-locked
            // (level 2 > write_lock_level 0): one restart raising it, then
            // root, node and leaf are COWed.
            let first = search_once(&h, Some(handle), key, 0);
            assert!(first.found);
            assert_eq!(
                (first.cows, first.restarts.clone()),
                (3, vec![(2, RestartReason::WriteLock)]),
                "{fix}"
            );
            // Same transaction, nothing written: nothing to COW.
            let second = search_once(&h, first.handle, key, 0);
            assert_eq!((second.cows, second.restarts.len()), (0, 0), "{fix}");
            assert_eq!(second.leaf, first.leaf);
            // The fresh leaf is written back: WRITTEN. (Under `both` the
            // handle inhibits background writeback; a data-integrity write
            // gets through.)
            write_back(&h, second.leaf, SyncMode::All);
            let third = search_once(&h, second.handle, key, 0);
            if fix.overwrites_written() {
                let leaf = h.fs.buffer_tree.get(second.leaf).unwrap();
                // Redirtied and modified in place; WRITTEN stays.
                assert_eq!((third.cows, third.restarts.len()), (0, 0), "{fix}");
                assert_eq!(third.leaf, second.leaf);
                assert!(leaf.dirty() && leaf.header_flag_written());
                let running = h.fs.trans.running.borrow().clone().unwrap();
                assert!(running.dirty_ebs.borrow().contains(&second.leaf));
            } else {
                // COW again; the leaf needs its parent write-locked: one
                // restart raising write_lock_level to 1.
                assert_eq!(
                    (third.cows, third.restarts.clone()),
                    (1, vec![(0, RestartReason::WriteLock)]),
                    "{fix}"
                );
                assert_ne!(third.leaf, second.leaf);
            }
            h.commit(vec![third.handle.unwrap()]);
            let stats = h.run(move |fs, root| async move { verify(&fs, &root, &model).await });
            assert_space_matches(&h.fs, &stats);
        }
    }

    #[test]
    fn overwrite_written_still_cows_a_block_under_writeback() {
        let (h, model) = three_level_tree(FixPolicy::OverwriteWritten);
        let key = *model.keys().next().unwrap();
        let first = search_once(&h, Some(h.join()), key, 0);
        let eb = h.fs.buffer_tree.get(first.leaf).unwrap();
        h.env.hold_bios.set(true);
        h.run(|fs, _| async move {
            assert!(lock_extent_buffer_for_io(&fs, &eb, SyncMode::None).await);
            assert!(write_one_eb(&fs, &eb, SyncMode::None));
        });
        let again = search_once(&h, first.handle, key, 0);
        assert_eq!(again.cows, 1, "a block under writeback is COWed even with the fix");
        h.env.hold_bios.set(false);
        h.env.complete_bios();
        h.commit(vec![again.handle.unwrap()]);
        let stats = h.run(move |fs, root| async move { verify(&fs, &root, &model).await });
        assert_space_matches(&h.fs, &stats);
    }

    #[test]
    fn an_evicted_child_restarts_the_search_to_read_it() {
        let (h, model) = three_level_tree(FixPolicy::None);
        let key = *model.keys().nth(100).unwrap();
        let probe = search_once(&h, None, key, 0);
        assert!(probe.found && probe.restarts.is_empty());
        // Reclaim drops the clean leaf.
        assert!(try_release_extent_buffer(&h.fs, probe.leaf));
        let reads = h.fs.stats.eb_reads.get();
        let read = search_once(&h, None, key, 0);
        assert!(read.found);
        assert_eq!(read.restarts, [(1, RestartReason::ReadBlock)]);
        assert_eq!(h.fs.stats.eb_reads.get(), reads + 1);
        // Cached now.
        assert!(search_once(&h, None, key, 0).restarts.is_empty());
        // A COW search in a new transaction: the write-lock raise, then the
        // missing node one level up, each once.
        let node = h.root.node();
        let child = node_blockptr(&node.data.borrow(), 1);
        assert!(try_release_extent_buffer(&h.fs, child));
        let key = ptr_key(&node, 1);
        let cow = search_once(&h, Some(h.join()), key, 0);
        assert_eq!(cow.restarts, [(2, RestartReason::WriteLock), (2, RestartReason::ReadBlock)]);
        assert_eq!(cow.cows, 3);
        h.commit(vec![cow.handle.unwrap()]);
    }

    #[test]
    fn inserting_at_slot_zero_restarts_to_write_lock_the_parents() {
        let (h, mut model) = three_level_tree(FixPolicy::None);
        let first_key = *model.keys().next().unwrap();
        // COW the leftmost path first, so that only slot 0 raises the level.
        let cow = search_once(&h, Some(h.join()), first_key, 0);
        assert_eq!(cow.cows, 3);
        let handle = cow.handle.unwrap();
        let key = Key::new(first_key.objectid - 1, ORPHAN_ITEM_KEY, 0);
        let mark = h.trace_mark();
        let m = std::mem::take(&mut model);
        let (handle, m) = h.run(move |_, root| async move {
            let mut model = m;
            insert_ok(&handle, &root, &mut model, key, data_of(&key, 200, 0)).await;
            (handle, model)
        });
        model = m;
        assert_eq!(h.restarts_since(mark), [(2, RestartReason::SlotZero)]);
        h.commit(vec![handle]);
        let stats = h.run(move |fs, root| async move { verify(&fs, &root, &model).await });
        assert_space_matches(&h.fs, &stats);
    }

    #[test]
    fn a_full_node_on_the_way_restarts_to_split_it() {
        let (h, mut model) = three_level_tree(FixPolicy::None);
        let nodeptrs = nodeptrs_per_block(4096) as usize;
        // A level-1 node at root slot > 0 with at least nodeptrs - 3
        // pointers (sequential appends leave nodes full).
        let top = h.root.node();
        let mut target = None;
        for slot in 1..nritems(&top) {
            let fs = h.fs.clone();
            let top = top.clone();
            let node = h.run(move |_, _| async move { read_node_slot(&fs, &top, slot).await.unwrap() });
            if nritems(&node) >= nodeptrs - 3 {
                target = Some(ptr_key(&node, nritems(&node) / 2));
                break;
            }
        }
        let first = target.expect("a full level-1 node");
        let key = Key { offset: first.offset + 1, ..first };
        // COW the path first, then insert: only the split raises the level.
        let cow = search_once(&h, Some(h.join()), first, 0);
        assert_eq!(cow.cows, 3);
        let handle = cow.handle.unwrap();
        let mark = h.trace_mark();
        let m = std::mem::take(&mut model);
        let (handle, m) = h.run(move |_, root| async move {
            let mut model = m;
            insert_ok(&handle, &root, &mut model, key, data_of(&key, 500, 0)).await;
            (handle, model)
        });
        model = m;
        assert_eq!(h.restarts_since(mark), [(1, RestartReason::SetupNodes)]);
        h.commit(vec![handle]);
        let stats = h.run(move |fs, root| async move { verify(&fs, &root, &model).await });
        assert_space_matches(&h.fs, &stats);
    }

    /// Drive one COW search by hand; at each restart (the path released,
    /// the search parked at its PathRelease switch point) run reclaim:
    /// write back every dirty block it may write, wait, evict every clean
    /// one. Returns the search's COWs.
    fn search_under_reclaim(h: &Harness, handle: &TransHandle, key: Key, rounds: usize) -> u32 {
        let mut path = Path::new();
        let mut seen = h.restarts_since(0).len();
        let mut done = 0;
        {
            let mut search = pin!(search_slot(Some(handle), &h.root, &key, &mut path, 0, true));
            let mut cx = Context::from_waker(Waker::noop());
            loop {
                if let Poll::Ready(found) = search.as_mut().poll(&mut cx) {
                    assert!(found.unwrap());
                    break;
                }
                h.env.complete_bios();
                let now = h.restarts_since(0).len();
                if now > seen && done < rounds {
                    btree_write_cache_pages(&h.fs, u64::MAX, SyncMode::None);
                    h.env.complete_bios();
                    evict_extent_buffers(&h.fs, u64::MAX);
                    done += 1;
                }
                seen = now;
            }
        }
        drop(path);
        assert_eq!(done, rounds, "the search restarted fewer times than reclaim ran");
        h.last_search().0
    }

    #[test]
    fn reclaim_between_restarts_makes_one_search_cow_again_and_again() {
        const ROUNDS: usize = 40;
        for fix in FixPolicy::ALL {
            let (h, model) = three_level_tree(fix);
            let key = *model.keys().nth(model.len() / 3).unwrap();
            let handle = h.join();
            let cows = search_under_reclaim(&h, &handle, key, ROUNDS);
            let (_, restarts) = h.last_search();
            eprintln!("fix {fix}: one search, {ROUNDS} reclaim passes: {cows} COWs, {restarts} restarts");
            assert!(restarts as usize > ROUNDS, "{fix}: reclaim evicts the leaf each time");
            if fix == FixPolicy::None {
                // Every pass writes the fresh root copy (WRITTEN), every
                // restart COWs it again.
                assert!(cows as usize > ROUNDS, "{fix}: {cows} COWs");
            } else {
                // Root, node, leaf: once each.
                assert_eq!(cows, 3, "{fix}");
            }
            assert!(
                h.fs.buffer_tree.starts().iter().all(|&s| h
                    .fs
                    .buffer_tree
                    .get(s)
                    .unwrap()
                    .writeback_blockers
                    .get()
                    == 0)
            );
            h.commit(vec![handle]);
            let stats = h.run(move |fs, root| async move { verify(&fs, &root, &model).await });
            assert_space_matches(&h.fs, &stats);
        }
    }

    #[test]
    fn deleting_everything_shrinks_the_tree_to_one_empty_leaf() {
        let (h, model) = three_level_tree(FixPolicy::None);
        let mut keys: Vec<Key> = model.keys().copied().collect();
        Rng(7).shuffle(&mut keys);
        let mut model = model;
        for chunk in keys.chunks(97) {
            let chunk = chunk.to_vec();
            let m = std::mem::take(&mut model);
            model = h.run(move |fs, root| async move {
                let mut model = m;
                let handle = join_transaction(&fs, "delete").await.unwrap();
                for key in chunk {
                    delete_ok(&handle, &root, &mut model, key, 1).await;
                }
                mini_commit(&fs, vec![handle]).await;
                let stats = verify(&fs, &root, &model).await;
                assert_space_matches(&fs, &stats);
                model
            });
        }
        assert!(model.is_empty());
        let stats = h.stats();
        assert_eq!((stats.level, stats.nodes, stats.leaves, stats.items), (0, 0, 1, 0));
    }

    #[test]
    fn extend_and_truncate_items_in_place() {
        let h = Harness::new(4096, FixPolicy::None, 16 << 20);
        h.run(|fs, root| async move {
            let handle = join_transaction(&fs, "resize").await.unwrap();
            let mut model = Model::new();
            for i in 0..20 {
                let key = key_of(i);
                insert_ok(&handle, &root, &mut model, key, data_of(&key, 50, 0)).await;
            }
            // Grow item 5 by 30 bytes: a search for extension.
            let key = key_of(5);
            let mut path = Path::new();
            path.search_for_extension = true;
            assert!(search_slot(Some(&handle), &root, &key, &mut path, 30, true).await.unwrap());
            extend_item(&handle, &path, 30);
            model.get_mut(&key).unwrap().extend([0; 30]);
            path.release();
            path.search_for_extension = false;
            // Cut the first item from the front: its key offset moves.
            let key = key_of(0);
            assert!(search_slot(Some(&handle), &root, &key, &mut path, 0, true).await.unwrap());
            truncate_item(&handle, &path, 10, false);
            let data = model.remove(&key).unwrap();
            model.insert(Key { offset: key.offset + 40, ..key }, data[40..].to_vec());
            drop(path);
            mini_commit(&fs, vec![handle]).await;
            verify(&fs, &root, &model).await;
        });
    }

    /// Growing an item beyond what its leaf has free splits the leaf
    /// around it (`split_leaf` with `extend`).
    #[test]
    fn extending_an_item_splits_a_full_leaf() {
        let h = Harness::new(4096, FixPolicy::None, 16 << 20);
        h.run(|fs, root| async move {
            let handle = join_transaction(&fs, "extend").await.unwrap();
            let mut model = Model::new();
            for i in 0..12 {
                let key = key_of(i);
                insert_ok(&handle, &root, &mut model, key, data_of(&key, 300, 0)).await;
            }
            assert_eq!(root.node().level(), 0);
            let key = key_of(6);
            let mut path = Path::new();
            path.search_for_extension = true;
            assert!(search_slot(Some(&handle), &root, &key, &mut path, 2000, true).await.unwrap());
            path.search_for_extension = false;
            assert!(free_space(path.leaf()) >= 2000);
            assert_eq!(path.item_key(path.slots[0]), key);
            extend_item(&handle, &path, 2000);
            model.get_mut(&key).unwrap().extend([0; 2000]);
            drop(path);
            mini_commit(&fs, vec![handle]).await;
            let stats = verify(&fs, &root, &model).await;
            assert_eq!(stats.level, 1);
        });
    }

    /// Found by the model test: inserting an existing key with an item
    /// that could not share a leaf with the existing one fails with
    /// EOVERFLOW (the search tries to make room to extend the item and
    /// `split_leaf` refuses), not EEXIST, as in the kernel.
    #[test]
    fn inserting_a_huge_item_over_an_existing_key_is_eoverflow() {
        let h = Harness::new(16384, FixPolicy::None, 16 << 20);
        h.run(|fs, root| async move {
            let handle = join_transaction(&fs, "overflow").await.unwrap();
            let mut model = Model::new();
            let key = key_of(1);
            insert_ok(&handle, &root, &mut model, key, data_of(&key, 100, 0)).await;
            let huge = vec![7; max_item_size(16384) as usize];
            assert_eq!(insert_item(&handle, &root, &key, &huge).await, Err(Error::Eoverflow));
            assert_eq!(insert_item(&handle, &root, &key, &[1; 100]).await, Err(Error::Eexist));
            mini_commit(&fs, vec![handle]).await;
            verify(&fs, &root, &model).await;
        });
    }

    // -----------------------------------------------------------------------
    // 4. Concurrency.

    #[derive(Clone, Debug, PartialEq)]
    enum Outcome {
        Inserted(Vec<u8>),
        Exists,
        Deleted,
        Missing,
    }

    /// `tasks` tasks insert and delete, each in a range of its own and all
    /// in a shared range, with background writeback and eviction between
    /// operations; the executor switches at every suspension. The log,
    /// appended with no suspension between an operation's end and its
    /// entry, is the order the tree saw: replayed on the model it must
    /// agree with every outcome and with the final tree.
    fn concurrent_round(h: &Harness, model: &mut Model, tasks: u64, ops: u64, seed: u64) {
        let log: Rc<RefCell<Vec<(Key, Outcome)>>> = Rc::default();
        let mut results = Vec::new();
        for t in 0..tasks {
            let (fs, root, log) = (h.fs.clone(), h.root.clone(), log.clone());
            let task = async move {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9e37_79b9));
                let handle = join_transaction(&fs, "worker").await.unwrap();
                for i in 0..ops {
                    let k = if rng.below(3) == 0 { rng.below(300) } else { 1000 + t * 1000 + rng.below(600) }
                        as u32;
                    let key = key_of(k);
                    let outcome = if rng.below(5) < 3 {
                        let data = data_of(&key, rng.below(900) as usize, (t * 16 + i % 16) as u8);
                        match insert_item(&handle, &root, &key, &data).await {
                            Ok(()) => Outcome::Inserted(data),
                            Err(Error::Eexist) => Outcome::Exists,
                            Err(e) => panic!("insert {key}: {e}"),
                        }
                    } else {
                        let mut path = Path::new();
                        let found =
                            search_slot(Some(&handle), &root, &key, &mut path, -1, true).await.unwrap();
                        if found {
                            let slot = path.slots[0];
                            del_items(&handle, &root, &mut path, slot, 1).await.unwrap();
                            drop(path);
                            Outcome::Deleted
                        } else {
                            Outcome::Missing
                        }
                    };
                    log.borrow_mut().push((key, outcome));
                    if i % 11 == 10 {
                        btree_write_cache_pages(&fs, 8 * u64::from(fs.nodesize), SyncMode::None);
                        evict_extent_buffers(&fs, 16 * u64::from(fs.nodesize));
                    }
                }
                end_transaction(handle);
            };
            results.push(h.env.spawn_with_result(&format!("worker{t}"), task));
        }
        h.env.run_until_idle();
        assert!(h.env.all_tasks_done(), "tasks did not finish (deadlock?)");
        assert!(results.iter().all(|r| r.borrow().is_some()));
        for (key, outcome) in log.borrow().iter() {
            match outcome {
                Outcome::Inserted(data) => {
                    assert!(model.insert(*key, data.clone()).is_none(), "{key} inserted twice")
                }
                Outcome::Exists => assert!(model.contains_key(key), "EEXIST for absent {key}"),
                Outcome::Deleted => assert!(model.remove(key).is_some(), "deleted absent {key}"),
                Outcome::Missing => assert!(!model.contains_key(key), "{key} present but not found"),
            }
        }
        let m = model.clone();
        let stats = h.run(move |fs, root| async move {
            verify(&fs, &root, &m).await;
            mini_commit(&fs, Vec::new()).await;
            verify(&fs, &root, &m).await
        });
        assert_space_matches(&h.fs, &stats);
        assert!(h.env.violations.borrow().is_empty(), "{:?}", h.env.violations.borrow());
    }

    #[test]
    fn concurrent_inserts_and_deletes_agree_with_the_model() {
        for (fix, nodesize) in [
            (FixPolicy::None, 4096),
            (FixPolicy::SearchPin, 4096),
            (FixPolicy::Both, 4096),
            (FixPolicy::None, 16384),
        ] {
            let h = Harness::new(nodesize, fix, 128 << 20);
            let mut model = Model::new();
            for round in 0..3 {
                concurrent_round(&h, &mut model, 6, 400, 0x1234 + round);
            }
            eprintln!("concurrent {fix} at {nodesize}: {:?}, {:?}", h.stats(), h.fs.search_stats);
        }
    }
}
