//! Delayed items (kernel: delayed-inode.c): directory index insertions and
//! deletions and inode item updates, queued per inode in a delayed node and
//! written to the fs tree later, in batches, by the commit
//! ([`run_delayed_items`]), by the space flusher
//! ([`run_delayed_items_nr`]) or by the background worker that
//! [`balance_delayed_items`] starts when too many are queued.
//!
//! Reservations, as the kernel makes them:
//! - a DIR_INDEX insertion that starts a new batch (the node reserved no
//!   leaf yet, or the batch would outgrow a leaf's data area) migrates
//!   `calc_insert_metadata_size(1)` from the handle's reserve (`trans->
//!   block_rsv`, the shared transaction reserve) to the delayed items
//!   reserve with `block_rsv_migrate`, which has no fallback: when the COW
//!   loop has drained the transaction reserve it fails, and
//!   [`insert_delayed_dir_index`] warns and returns ENOSPC, on which the
//!   caller (`add_link`) aborts the transaction. An insertion that joins
//!   the current batch gives its unit back to the transaction reserve
//!   instead (`btrfs_release_dir_index_item_space`);
//! - a DIR_INDEX deletion migrates `calc_insert_metadata_size(1)`;
//! - the first inode update of a node migrates `calc_metadata_size(1)`, or,
//!   from a handle that reserved nothing (a join), reserves it anew without
//!   flushing;
//! - running the items charges their COWs to the delayed items reserve
//!   (the handle's `block_rsv` is switched for the time of the run) and
//!   releases what was migrated: one leaf per batch inserted, each
//!   deletion's unit, the inode update's unit.
//!
//! Every delayed node has a mutex, held while its items are run; adding an
//! item waits for it, as the kernel's `delayed_node->mutex` makes it.
//!
//! Departures from the kernel:
//! - the delayed nodes live in [`crate::inode::InodeCache`] (keyed by inode
//!   number; the engine has one fs tree) rather than hanging off each
//!   in-memory inode, and are dropped only when the inode is deleted;
//! - no log replay mode (`BTRFS_FS_LOG_RECOVERING`), no qgroup
//!   reservations, no tree-log collection of delayed items;
//! - the background worker is one environment task per queued work item,
//!   with no `max_active` limit; a work queue with more than 64 pending
//!   items counts as congested (`btrfs_workqueue_normal_congested` with
//!   the default threshold of 32);
//! - running delayed items on an aborted transaction fails with EROFS
//!   (the kernel: EIO);
//! - without space accounting (unit tests of the tree code, `fs.space`
//!   unset) nothing is reserved or released.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::accessors::{header_nritems, item_data_mut, item_key};
use crate::block_rsv::{
    BlockRsv, BlockRsvType, FsBlockRsvs, block_rsv_add, block_rsv_migrate, block_rsv_release,
    calc_insert_metadata_size, calc_metadata_size,
};
use crate::ctree::{Path, Root, del_items, insert_empty_items, search_slot};
use crate::env::{TaskKind, TraceEvent, WaitOn};
use crate::error::Error;
use crate::format::{
    DIR_INDEX_KEY, DirItem, FS_TREE_OBJECTID, FixedItem, INODE_EXTREF_KEY, INODE_ITEM_KEY, INODE_REF_KEY,
    ITEM_SIZE, InodeItem, Key, leaf_data_size,
};
use crate::fs::FsInfo;
use crate::space_info::FlushKind;
use crate::transaction::{
    TransHandle, abort_transaction, end_transaction, join_transaction, mark_buffer_dirty,
};
use crate::wait::WaitQueue;

/// `BTRFS_DELAYED_WRITEBACK`: from this many queued items on, a task that
/// balances waits for the background worker.
pub const DELAYED_WRITEBACK: u64 = 512;
/// `BTRFS_DELAYED_BACKGROUND`: from this many queued items on, balancing
/// starts the background worker.
pub const DELAYED_BACKGROUND: u64 = 128;
/// `BTRFS_DELAYED_BATCH`: nodes one background work item runs; waiters
/// are woken every this many items done.
pub const DELAYED_BATCH: u64 = 16;
/// Pending work items above which the delayed-meta work queue is
/// congested (twice the default threshold, 32).
const WORKQUEUE_CONGESTED: u32 = 64;

/// Counters, monotonic, for reports and tests.
#[derive(Debug, Default)]
pub struct DelayedStats {
    /// Successful migrations from a handle's reserve to the delayed items
    /// reserve (dir index leaves, deletions, inode updates).
    pub migrates: Cell<u64>,
    /// Migrations that failed with ENOSPC (the WARNING of the bug).
    pub migrate_failures: Cell<u64>,
    /// DIR_INDEX items written to the tree, and batches they went in.
    pub index_items_inserted: Cell<u64>,
    pub index_batches: Cell<u64>,
    /// DIR_INDEX items deleted from the tree.
    pub index_items_deleted: Cell<u64>,
    /// Inode items written from a delayed node.
    pub inode_updates: Cell<u64>,
    /// Background work items started.
    pub async_works: Cell<u64>,
}

/// `delayed_node->mutex`: held while the node's items are written.
#[derive(Default)]
struct NodeMutex {
    locked: Cell<bool>,
    wait: WaitQueue,
}

struct NodeMutexGuard {
    mutex: Rc<NodeMutex>,
}

impl Drop for NodeMutexGuard {
    fn drop(&mut self) {
        self.mutex.locked.set(false);
        self.mutex.wait.wake_all();
    }
}

/// One inode's pending changes (`struct btrfs_delayed_node`).
struct DelayedNode {
    mutex: Rc<NodeMutex>,
    /// Pending DIR_INDEX insertions: index -> the dir item payload.
    ins: BTreeMap<u64, Vec<u8>>,
    /// Pending DIR_INDEX deletions: index -> bytes reserved for it.
    del: BTreeMap<u64, u64>,
    /// One more than the highest index ever queued for insertion.
    index_cnt: u64,
    /// Leaves reserved for the pending insertions (one
    /// `calc_insert_metadata_size(1)` each, in the delayed items reserve).
    index_item_leaves: u64,
    /// Bytes (data plus item headers) of the batch being filled.
    curr_index_batch_size: u32,
    /// `BTRFS_DELAYED_NODE_INODE_DIRTY` and the item to write.
    inode_dirty: bool,
    inode_item: InodeItem,
    /// Reserved for the inode update.
    bytes_reserved: u64,
    /// `BTRFS_DELAYED_NODE_DEL_IREF`: delete the inode's only INODE_REF
    /// when the inode item is written.
    del_iref: bool,
    /// Pending items of all kinds.
    count: u64,
    /// Position in the node list and the prepared list (FIFO sequence
    /// numbers), `None` when not on it (`BTRFS_DELAYED_NODE_IN_LIST`).
    node_seq: Option<u64>,
    prep_seq: Option<u64>,
}

impl DelayedNode {
    fn new() -> DelayedNode {
        DelayedNode {
            mutex: Rc::new(NodeMutex::default()),
            ins: BTreeMap::new(),
            del: BTreeMap::new(),
            index_cnt: 0,
            index_item_leaves: 0,
            curr_index_batch_size: 0,
            inode_dirty: false,
            inode_item: InodeItem::default(),
            bytes_reserved: 0,
            del_iref: false,
            count: 0,
            node_seq: None,
            prep_seq: None,
        }
    }
}

/// A pending DIR_INDEX insertion as readdir sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelayedIndex {
    pub index: u64,
    pub item: DirItem,
}

/// The filesystem's delayed items (`struct btrfs_delayed_root` and the
/// delayed nodes of every inode).
#[derive(Default)]
pub struct DelayedRoot {
    nodes: RefCell<BTreeMap<u64, DelayedNode>>,
    /// Nodes with pending items, in the order they were first queued
    /// (`node_list`): sequence number -> inode.
    node_list: RefCell<BTreeMap<u64, u64>>,
    /// Nodes waiting for the background worker (`prepare_list`).
    prepare_list: RefCell<BTreeMap<u64, u64>>,
    next_seq: Cell<u64>,
    /// Pending items over all nodes (`delayed_root->items`).
    items: Cell<u64>,
    /// Items done since mount (`delayed_root->items_seq`).
    items_seq: Cell<u64>,
    /// `delayed_root->wait`: balancing tasks waiting for the worker.
    wait: WaitQueue,
    /// Background work items queued and not finished.
    works_pending: Cell<u32>,
    pub stats: DelayedStats,
}

impl DelayedRoot {
    /// Pending delayed items, all nodes together.
    pub fn items(&self) -> u64 {
        self.items.get()
    }

    /// Nodes with pending items.
    pub fn nodes_queued(&self) -> usize {
        self.node_list.borrow().len()
    }

    /// Pending DIR_INDEX insertions of `ino`, in index order.
    pub fn pending_insertions(&self, ino: u64) -> Vec<u64> {
        self.nodes.borrow().get(&ino).map(|n| n.ins.keys().copied().collect()).unwrap_or_default()
    }

    /// Pending DIR_INDEX deletions of `ino`, in index order.
    pub fn pending_deletions(&self, ino: u64) -> Vec<u64> {
        self.nodes.borrow().get(&ino).map(|n| n.del.keys().copied().collect()).unwrap_or_default()
    }

    /// Whether `ino` has a pending inode update.
    pub fn inode_dirty(&self, ino: u64) -> bool {
        self.nodes.borrow().get(&ino).is_some_and(|n| n.inode_dirty)
    }

    /// Whether `ino` has a delayed node (`inode->delayed_node`).
    pub fn has_node(&self, ino: u64) -> bool {
        self.nodes.borrow().contains_key(&ino)
    }

    /// `btrfs_inode_delayed_dir_index_count`: the next index the node
    /// knows of, if it ever queued an insertion.
    pub fn dir_index_count(&self, ino: u64) -> Option<u64> {
        self.nodes.borrow().get(&ino).map(|n| n.index_cnt).filter(|&cnt| cnt != 0)
    }

    /// The pending inode item of `ino` (`btrfs_fill_inode`), if any.
    pub fn pending_inode_item(&self, ino: u64) -> Option<InodeItem> {
        self.nodes.borrow().get(&ino).filter(|n| n.inode_dirty).map(|n| n.inode_item)
    }

    fn next_seq(&self) -> u64 {
        let seq = self.next_seq.get() + 1;
        self.next_seq.set(seq);
        seq
    }

    /// `btrfs_get_or_create_delayed_node`: the node's mutex.
    fn get_or_create(&self, ino: u64) -> Rc<NodeMutex> {
        self.nodes.borrow_mut().entry(ino).or_insert_with(DelayedNode::new).mutex.clone()
    }

    fn with_node<T>(&self, ino: u64, f: impl FnOnce(&mut DelayedNode) -> T) -> T {
        let mut nodes = self.nodes.borrow_mut();
        let node = nodes.get_mut(&ino).unwrap_or_else(|| panic!("no delayed node for inode {ino}"));
        f(node)
    }

    /// `__btrfs_release_delayed_node`: a node with pending items is queued
    /// (`mod_`: put back on the prepared list if a worker took it off),
    /// one without leaves both lists.
    fn release_node(&self, ino: u64, mod_: bool) {
        let (count, node_seq, prep_seq) = match self.nodes.borrow().get(&ino) {
            Some(node) => (node.count, node.node_seq, node.prep_seq),
            None => return,
        };
        if count > 0 {
            match node_seq {
                Some(_) => {
                    if let Some(seq) = prep_seq {
                        self.prepare_list.borrow_mut().remove(&seq);
                    }
                    if prep_seq.is_some() || mod_ {
                        let seq = self.next_seq();
                        self.prepare_list.borrow_mut().insert(seq, ino);
                        self.with_node(ino, |n| n.prep_seq = Some(seq));
                    }
                }
                None => {
                    let (nseq, pseq) = (self.next_seq(), self.next_seq());
                    self.node_list.borrow_mut().insert(nseq, ino);
                    self.prepare_list.borrow_mut().insert(pseq, ino);
                    self.with_node(ino, |n| {
                        n.node_seq = Some(nseq);
                        n.prep_seq = Some(pseq);
                    });
                }
            }
        } else if let Some(seq) = node_seq {
            self.node_list.borrow_mut().remove(&seq);
            if let Some(pseq) = prep_seq {
                self.prepare_list.borrow_mut().remove(&pseq);
            }
            self.with_node(ino, |n| {
                n.node_seq = None;
                n.prep_seq = None;
            });
        }
    }

    /// An item was queued (`atomic_inc(&delayed_root->items)`).
    fn add_one_item(&self) {
        self.items.set(self.items.get() + 1);
    }

    /// `finish_one_item`: an item was done or dropped.
    fn finish_one_item(&self) {
        let seq = self.items_seq.get() + 1;
        self.items_seq.set(seq);
        assert!(self.items.get() > 0, "delayed items count underflow");
        self.items.set(self.items.get() - 1);
        if self.items.get() < DELAYED_BACKGROUND || seq.is_multiple_of(DELAYED_BATCH) {
            self.wait.wake_all();
        }
    }

    /// `btrfs_first_delayed_node`.
    fn first_node(&self) -> Option<u64> {
        self.node_list.borrow().values().next().copied()
    }

    /// `btrfs_next_delayed_node`: the node after `ino` on the node list,
    /// or the first one if `ino` left it.
    fn next_node(&self, ino: u64) -> Option<u64> {
        let seq = self.nodes.borrow().get(&ino).and_then(|n| n.node_seq);
        let list = self.node_list.borrow();
        match seq {
            Some(seq) => list.range(seq + 1..).next().map(|(_, &ino)| ino),
            None => list.values().next().copied(),
        }
    }

    /// `btrfs_first_prepared_delayed_node`: take the head of the prepared list.
    fn first_prepared_node(&self) -> Option<u64> {
        let (seq, ino) = self.prepare_list.borrow_mut().pop_first()?;
        self.with_node(ino, |n| {
            debug_assert_eq!(n.prep_seq, Some(seq));
            n.prep_seq = None;
        });
        Some(ino)
    }

    /// `btrfs_readdir_get_delayed_items`: the pending insertions and
    /// deletions of `ino` with an index up to `last_index`.
    pub fn readdir_get_delayed_items(&self, ino: u64, last_index: u64) -> (Vec<DelayedIndex>, Vec<u64>) {
        let nodes = self.nodes.borrow();
        let Some(node) = nodes.get(&ino) else { return (Vec::new(), Vec::new()) };
        let ins = node
            .ins
            .range(..=last_index)
            .map(|(&index, data)| {
                let (item, len) = DirItem::read(data).expect("delayed dir index payload");
                debug_assert_eq!(len, data.len());
                DelayedIndex { index, item }
            })
            .collect();
        let del = node.del.range(..=last_index).map(|(&index, _)| index).collect();
        (ins, del)
    }
}

/// Lock the delayed node of `ino` (creating it if `create`), waiting
/// behind whoever holds its mutex. `None` if there is no node (any more:
/// the inode was deleted while this task waited).
async fn lock_delayed_node(fs: &FsInfo, ino: u64, create: bool) -> Option<NodeMutexGuard> {
    let root = delayed_root(fs);
    loop {
        let mutex = if create {
            root.get_or_create(ino)
        } else {
            root.nodes.borrow().get(&ino).map(|node| node.mutex.clone())?
        };
        let guard = lock_node(fs, &mutex).await;
        if root.nodes.borrow().get(&ino).is_some_and(|node| Rc::ptr_eq(&node.mutex, &mutex)) {
            return Some(guard);
        }
    }
}

/// Take `mutex`, waiting behind whoever holds it.
async fn lock_node(fs: &FsInfo, mutex: &Rc<NodeMutex>) -> NodeMutexGuard {
    if mutex.locked.get() {
        fs.env.wait_on(WaitOn::Other("delayed node mutex"));
        let waiting = mutex.clone();
        mutex.wait.wait_until(move || !waiting.locked.get()).await;
    }
    assert!(!mutex.locked.get(), "delayed node mutex handed to two tasks");
    mutex.locked.set(true);
    NodeMutexGuard { mutex: mutex.clone() }
}

fn delayed_root(fs: &FsInfo) -> &DelayedRoot {
    &fs.inodes.delayed
}

fn fs_rsvs(fs: &FsInfo) -> Option<&FsBlockRsvs> {
    fs.space.get().map(|space| &space.rsvs)
}

/// The reserve behind a handle's `block_rsv`.
fn rsv_of(rsvs: &FsBlockRsvs, kind: BlockRsvType) -> &BlockRsv {
    match kind {
        BlockRsvType::Global => &rsvs.global_block_rsv,
        BlockRsvType::Trans => &rsvs.trans_block_rsv,
        BlockRsvType::Chunk => &rsvs.chunk_block_rsv,
        BlockRsvType::DelayedItems => &rsvs.delayed_block_rsv,
        BlockRsvType::DelayedRefs => &rsvs.delayed_refs_rsv,
        BlockRsvType::TreeLog => &rsvs.treelog_rsv,
        BlockRsvType::Empty => &rsvs.empty_block_rsv,
        BlockRsvType::Temp => panic!("a handle never points at a temporary reserve by type"),
    }
}

/// `btrfs_delayed_item_reserve_metadata`: migrate one insert unit from the
/// handle's reserve to the delayed items reserve. Nothing to do for a
/// handle that reserved nothing. Returns the bytes migrated.
fn delayed_item_reserve_metadata(handle: &TransHandle) -> Result<u64, Error> {
    let fs = &handle.fs;
    let Some(rsvs) = fs_rsvs(fs) else { return Ok(0) };
    if handle.bytes_reserved() == 0 {
        return Ok(0);
    }
    let src = rsv_of(rsvs, handle.block_rsv.get().expect("a handle that reserved has a block reserve"));
    let num_bytes = calc_insert_metadata_size(fs.nodesize, 1);
    let stats = &delayed_root(fs).stats;
    match block_rsv_migrate(src, &rsvs.delayed_block_rsv, num_bytes, true) {
        Ok(()) => {
            stats.migrates.set(stats.migrates.get() + 1);
            handle.bytes_migrated.set(handle.bytes_migrated.get() + num_bytes);
            crate::transaction::check_reservation(handle);
            Ok(num_bytes)
        }
        Err(enospc) => {
            stats.migrate_failures.set(stats.migrate_failures.get() + 1);
            fs.env.report_violation(crate::env::Violation {
                kind: "migrate_enospc",
                message: format!(
                    "WARNING at delayed-inode.c btrfs_insert_delayed_dir_index: block_rsv_migrate of {num_bytes} bytes failed; trans_block_rsv: size {} reserved {}; handle {} ({}) consumed {} of {} reserved; its last search: {}",
                    src.size(),
                    src.reserved(),
                    handle.id,
                    handle.op,
                    handle.bytes_used.get() + handle.bytes_migrated.get(),
                    handle.bytes_reserved(),
                    handle.search.get()
                ),
            });
            Err(enospc.into())
        }
    }
}

/// `btrfs_delayed_item_release_leaves`: give back the reservation of
/// `num_leaves` leaves of index items.
fn release_leaves(fs: &FsInfo, num_leaves: u64) {
    if let Some(rsvs) = fs_rsvs(fs) {
        block_rsv_release(rsvs, &rsvs.delayed_block_rsv, calc_insert_metadata_size(fs.nodesize, num_leaves));
    }
}

/// Release `bytes` of the delayed items reserve.
fn release_delayed_bytes(fs: &FsInfo, bytes: u64) {
    if bytes == 0 {
        return;
    }
    let rsvs = fs_rsvs(fs).expect("bytes reserved without space accounting");
    block_rsv_release(rsvs, &rsvs.delayed_block_rsv, bytes);
}

/// `btrfs_release_dir_index_item_space`: an index item that joins the
/// current batch needs no leaf of its own; give the unit reserved for it
/// at transaction start back.
fn release_dir_index_item_space(handle: &TransHandle) {
    let fs = &handle.fs;
    let Some(rsvs) = fs_rsvs(fs) else { return };
    let bytes = calc_insert_metadata_size(fs.nodesize, 1);
    let mut account = handle.rsv.borrow_mut();
    let Some(account) = account.as_mut() else { return };
    let kind = handle.block_rsv.get().expect("a handle that reserved has a block reserve");
    block_rsv_release(rsvs, rsv_of(rsvs, kind), bytes);
    assert!(
        account.bytes_reserved >= bytes,
        "handle {} releases {bytes} bytes of its {} reserved",
        handle.id,
        account.bytes_reserved
    );
    account.bytes_reserved -= bytes;
}

/// `btrfs_insert_delayed_dir_index`: queue the DIR_INDEX item
/// (`dir_ino`, `index`) naming `location` as `name` of type `dir_type`.
/// When it starts a new batch it migrates one insert unit from the
/// handle's reserve to the delayed items reserve; if that fails (the
/// transaction reserve was drained) it warns, drops the item and returns
/// ENOSPC, and the caller aborts the transaction. An index already queued
/// is EEXIST (an engine bug in practice).
pub async fn insert_delayed_dir_index(
    handle: &TransHandle,
    dir_ino: u64,
    index: u64,
    name: &[u8],
    location: Key,
    dir_type: u8,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let root = delayed_root(fs);
    let item = DirItem { location, transid: handle.transid, dir_type, name: name.to_vec(), data: Vec::new() };
    let data = item.to_bytes();
    let data_len = data.len() as u32 + ITEM_SIZE as u32;
    let guard = lock_delayed_node(fs, dir_ino, true).await.expect("created");

    let added = root.with_node(dir_ino, |node| {
        if node.ins.contains_key(&index) {
            return false;
        }
        node.ins.insert(index, data);
        node.index_cnt = node.index_cnt.max(index + 1);
        node.count += 1;
        true
    });
    if !added {
        fs.env.trace(TraceEvent::Note {
            what: "error adding delayed dir index item",
            a: dir_ino,
            b: index,
            c: 17,
        });
        release_dir_index_item_space(handle);
        drop(guard);
        root.release_node(dir_ino, false);
        return Err(Error::Eexist);
    }
    root.add_one_item();

    let leaf_data = leaf_data_size(fs.nodesize);
    let reserve_leaf_space = root.with_node(dir_ino, |node| {
        if node.index_item_leaves == 0 || node.curr_index_batch_size + data_len > leaf_data {
            node.curr_index_batch_size = data_len;
            true
        } else {
            node.curr_index_batch_size += data_len;
            false
        }
    });

    let mut result = Ok(());
    if reserve_leaf_space {
        match delayed_item_reserve_metadata(handle) {
            Ok(_) => root.with_node(dir_ino, |node| node.index_item_leaves += 1),
            Err(error) => {
                // The kernel's WARN_ON: space was reserved at transaction
                // start, so this "should be impossible".
                let trans_reserved = fs_rsvs(fs).map_or(0, |rsvs| rsvs.trans_block_rsv.reserved());
                fs.env.trace(TraceEvent::Note {
                    what: "WARNING delayed_dir_index migrate",
                    a: dir_ino,
                    b: calc_insert_metadata_size(fs.nodesize, 1),
                    c: trans_reserved,
                });
                root.with_node(dir_ino, |node| {
                    node.ins.remove(&index);
                    node.count -= 1;
                });
                root.finish_one_item();
                result = Err(error);
            }
        }
    } else {
        release_dir_index_item_space(handle);
    }
    drop(guard);
    root.release_node(dir_ino, false);
    result
}

/// `btrfs_delete_delayed_dir_index`: the DIR_INDEX item (`dir_ino`,
/// `index`) goes away. A pending insertion of it is cancelled (and the
/// leaves reserved for insertions released once none is left); otherwise a
/// deletion is queued, with one insert unit migrated for it.
pub async fn delete_delayed_dir_index(handle: &TransHandle, dir_ino: u64, index: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    let root = delayed_root(fs);

    // btrfs_delete_delayed_insertion_item
    {
        let guard = lock_delayed_node(fs, dir_ino, true).await.expect("created");
        let cancelled = root.with_node(dir_ino, |node| {
            let data = node.ins.remove(&index)?;
            assert!(node.index_item_leaves > 0, "inode {dir_ino}: a pending index item without a leaf");
            if node.index_item_leaves == 1 {
                let data_len = data.len() as u32 + ITEM_SIZE as u32;
                assert!(node.curr_index_batch_size >= data_len);
                node.curr_index_batch_size -= data_len;
            }
            node.count -= 1;
            let leaves = if node.ins.is_empty() { std::mem::take(&mut node.index_item_leaves) } else { 0 };
            Some(leaves)
        });
        if let Some(leaves) = cancelled {
            root.finish_one_item();
            release_leaves(fs, leaves);
            drop(guard);
            root.release_node(dir_ino, false);
            return Ok(());
        }
    }

    let bytes_reserved = match delayed_item_reserve_metadata(handle) {
        Ok(bytes) => bytes,
        Err(error) => {
            fs.env.trace(TraceEvent::Note {
                what: "metadata reservation failed for delayed dir item deletion",
                a: dir_ino,
                b: index,
                c: 0,
            });
            root.release_node(dir_ino, false);
            return Err(error);
        }
    };
    let guard = lock_delayed_node(fs, dir_ino, true).await.expect("created");
    let added = root.with_node(dir_ino, |node| {
        if node.del.contains_key(&index) {
            return false;
        }
        node.del.insert(index, bytes_reserved);
        node.count += 1;
        true
    });
    let result = if added {
        root.add_one_item();
        Ok(())
    } else {
        fs.env.trace(TraceEvent::Note {
            what: "err add delayed dir index item",
            a: dir_ino,
            b: index,
            c: 17,
        });
        release_delayed_bytes(fs, bytes_reserved);
        Err(Error::Eexist)
    };
    drop(guard);
    root.release_node(dir_ino, false);
    result
}

/// `btrfs_delayed_inode_reserve_metadata`: one update unit for the node's
/// inode item, migrated from the handle's reserve, or reserved anew
/// without flushing by a handle that reserved nothing.
async fn delayed_inode_reserve_metadata(handle: &TransHandle) -> Result<u64, Error> {
    let fs = &handle.fs;
    let Some(rsvs) = fs_rsvs(fs) else { return Ok(0) };
    let num_bytes = calc_metadata_size(fs.nodesize, 1);
    let stats = &delayed_root(fs).stats;
    match handle.block_rsv.get() {
        Some(kind) if handle.bytes_reserved() > 0 => {
            match block_rsv_migrate(rsv_of(rsvs, kind), &rsvs.delayed_block_rsv, num_bytes, true) {
                Ok(()) => {
                    stats.migrates.set(stats.migrates.get() + 1);
                    handle.bytes_migrated.set(handle.bytes_migrated.get() + num_bytes);
                    crate::transaction::check_reservation(handle);
                    Ok(num_bytes)
                }
                Err(enospc) => {
                    stats.migrate_failures.set(stats.migrate_failures.get() + 1);
                    fs.env.report_violation(crate::env::Violation {
                        kind: "migrate_enospc",
                        message: format!(
                            "btrfs_delayed_inode_reserve_metadata: block_rsv_migrate of {num_bytes} bytes failed; handle {} ({}) consumed {} of {} reserved",
                            handle.id,
                            handle.op,
                            handle.bytes_used.get() + handle.bytes_migrated.get(),
                            handle.bytes_reserved()
                        ),
                    });
                    Err(enospc.into())
                }
            }
        }
        _ => {
            block_rsv_add(&rsvs.delayed_block_rsv, num_bytes, FlushKind::NoFlush).await?;
            Ok(num_bytes)
        }
    }
}

/// `btrfs_delayed_update_inode`: queue `item` (the in-memory inode) to be
/// written as `ino`'s inode item; `transid` is set to the handle's. The
/// first update of a node reserves one update unit.
pub async fn delayed_update_inode(handle: &TransHandle, ino: u64, item: &InodeItem) -> Result<(), Error> {
    let fs = &handle.fs;
    let root = delayed_root(fs);
    let mut item = *item;
    item.transid = handle.transid;
    let guard = lock_delayed_node(fs, ino, true).await.expect("created");
    let dirty = root.with_node(ino, |node| {
        if node.inode_dirty {
            node.inode_item = item;
        }
        node.inode_dirty
    });
    if dirty {
        drop(guard);
        root.release_node(ino, false);
        return Ok(());
    }
    // No await may sit between the check and setting the flag while
    // another task could dirty the node: the mutex is held across it.
    let result = delayed_inode_reserve_metadata(handle).await;
    let result = result.map(|bytes| {
        root.with_node(ino, |node| {
            node.bytes_reserved = bytes;
            node.inode_item = item;
            node.inode_dirty = true;
            node.count += 1;
        });
        root.add_one_item();
    });
    drop(guard);
    root.release_node(ino, false);
    result
}

/// `btrfs_delayed_delete_inode_ref`: delete the only INODE_REF of `ino`
/// when its inode item is written. Nothing is reserved for it (the kernel
/// relies on the inode update's unit).
pub async fn delayed_delete_inode_ref(fs: &FsInfo, ino: u64) {
    let root = delayed_root(fs);
    let guard = lock_delayed_node(fs, ino, true).await.expect("created");
    let added = root.with_node(ino, |node| {
        if node.del_iref {
            return false;
        }
        node.del_iref = true;
        node.count += 1;
        true
    });
    if added {
        root.add_one_item();
    }
    drop(guard);
    root.release_node(ino, false);
}

/// `__btrfs_kill_delayed_node` and `btrfs_remove_delayed_node`: the inode
/// is gone; drop its pending items, give back what they reserved, and
/// forget the node.
pub async fn kill_delayed_inode_items(fs: &FsInfo, ino: u64) {
    let root = delayed_root(fs);
    let Some(guard) = lock_delayed_node(fs, ino, false).await else { return };
    let (dropped, leaves, bytes) = root.with_node(ino, |node| {
        let mut dropped = node.ins.len() as u64;
        node.ins.clear();
        let leaves = std::mem::take(&mut node.index_item_leaves);
        node.curr_index_batch_size = 0;
        let mut bytes: u64 = node.del.values().sum();
        dropped += node.del.len() as u64;
        node.del.clear();
        if std::mem::take(&mut node.del_iref) {
            dropped += 1;
        }
        if std::mem::take(&mut node.inode_dirty) {
            dropped += 1;
            bytes += std::mem::take(&mut node.bytes_reserved);
        }
        assert_eq!(dropped, node.count, "inode {ino}: delayed node count out of step");
        node.count = 0;
        (dropped, leaves, bytes)
    });
    for _ in 0..dropped {
        root.finish_one_item();
    }
    release_leaves(fs, leaves);
    release_delayed_bytes(fs, bytes);
    drop(guard);
    root.release_node(ino, false);
    let node = root.nodes.borrow_mut().remove(&ino).expect("delayed node");
    debug_assert!(node.node_seq.is_none() && node.prep_seq.is_none());
}

/// `btrfs_destroy_delayed_inodes`: the transaction aborted; drop every
/// pending delayed item and give back what they reserved (the cleanup of
/// an aborted transaction calls it).
pub async fn destroy_delayed_inodes(fs: &FsInfo) {
    let inos: Vec<u64> = delayed_root(fs).nodes.borrow().keys().copied().collect();
    for ino in inos {
        kill_delayed_inode_items(fs, ino).await;
    }
}

/// `btrfs_insert_delayed_item`: write the first pending index items of
/// `ino` that fit in one leaf, in one `insert_empty_items`, then release
/// one reserved leaf (all of them if no item is left). The node mutex is
/// held by the caller.
async fn insert_delayed_item(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    ino: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    let max_size = leaf_data_size(fs.nodesize);
    let (batch, more) = delayed.with_node(ino, |node| {
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut total_size = 0u32;
        let mut more = false;
        for (&index, data) in &node.ins {
            let size = data.len() as u32 + ITEM_SIZE as u32;
            if !batch.is_empty() && total_size + size > max_size {
                more = true;
                break;
            }
            total_size += size;
            batch.push((index, data.clone()));
        }
        (batch, more)
    });
    assert!(!batch.is_empty());
    let keys: Vec<Key> = batch.iter().map(|&(index, _)| Key::new(ino, DIR_INDEX_KEY, index)).collect();
    let sizes: Vec<u32> = batch.iter().map(|(_, data)| data.len() as u32).collect();
    insert_empty_items(handle, root, path, &keys, &sizes).await?;
    {
        let leaf = path.nodes[0].clone().expect("insert_empty_items leaves the path at a leaf");
        let slot = path.slots[0];
        {
            let mut image = leaf.data.borrow_mut();
            for (i, (index, data)) in batch.iter().enumerate() {
                debug_assert_eq!(item_key(&image, slot + i), Key::new(ino, DIR_INDEX_KEY, *index));
                item_data_mut(&mut image, slot + i).copy_from_slice(data);
            }
        }
        mark_buffer_dirty(handle, &leaf);
    }
    path.release();

    let stats = &delayed.stats;
    stats.index_items_inserted.set(stats.index_items_inserted.get() + batch.len() as u64);
    stats.index_batches.set(stats.index_batches.get() + 1);
    let leaves = delayed.with_node(ino, |node| {
        assert!(node.index_item_leaves > 0, "inode {ino}: index items inserted without a reserved leaf");
        for (index, _) in &batch {
            node.ins.remove(index).expect("batched item still pending");
        }
        node.count -= batch.len() as u64;
        if more {
            node.index_item_leaves -= 1;
            1
        } else {
            std::mem::take(&mut node.index_item_leaves)
        }
    });
    release_leaves(fs, leaves);
    for _ in 0..batch.len() {
        delayed.finish_one_item();
    }
    Ok(())
}

/// `btrfs_insert_delayed_items`: batch after batch until none is pending.
async fn insert_delayed_items(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    ino: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    loop {
        let Some(_guard) = lock_delayed_node(fs, ino, false).await else { return Ok(()) };
        if delayed.with_node(ino, |node| node.ins.is_empty()) {
            return Ok(());
        }
        insert_delayed_item(handle, root, path, ino).await?;
    }
}

/// `btrfs_batch_delete_items`: delete the index item the path points at
/// and the following ones of the leaf that are pending deletions too.
async fn batch_delete_items(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    ino: u64,
    first: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    let leaf = path.nodes[0].clone().expect("search leaves the path at a leaf");
    let slot = path.slots[0];
    let batch: Vec<u64> = {
        let image = leaf.data.borrow();
        let last_slot = header_nritems(&image) as usize - 1;
        assert!(slot <= last_slot);
        delayed.with_node(ino, |node| {
            let mut batch = vec![first];
            let mut next_slot = slot;
            for (&index, _) in node.del.range(first + 1..) {
                if next_slot >= last_slot {
                    break;
                }
                next_slot += 1;
                if item_key(&image, next_slot) != Key::new(ino, DIR_INDEX_KEY, index) {
                    break;
                }
                batch.push(index);
            }
            batch
        })
    };
    del_items(handle, root, path, slot, batch.len()).await?;
    let total_reserved = delayed.with_node(ino, |node| {
        let mut total = 0;
        for index in &batch {
            total += node.del.remove(index).expect("batched deletion still pending");
        }
        node.count -= batch.len() as u64;
        total
    });
    release_delayed_bytes(fs, total_reserved);
    let stats = &delayed.stats;
    stats.index_items_deleted.set(stats.index_items_deleted.get() + batch.len() as u64);
    for _ in 0..batch.len() {
        delayed.finish_one_item();
    }
    Ok(())
}

/// `btrfs_delete_delayed_items`.
async fn delete_delayed_items(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    ino: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    loop {
        let Some(_guard) = lock_delayed_node(fs, ino, false).await else { return Ok(()) };
        let Some(index) = delayed.with_node(ino, |node| node.del.keys().next().copied()) else {
            return Ok(());
        };
        let key = Key::new(ino, DIR_INDEX_KEY, index);
        let found = search_slot(Some(handle), root, &key, path, -1, true).await;
        match found {
            Ok(false) => {
                // Already deleted by an earlier run: drop the item (the
                // kernel does not release its reservation here either).
                path.release();
                delayed.with_node(ino, |node| {
                    node.del.remove(&index);
                    node.count -= 1;
                });
                delayed.finish_one_item();
            }
            Ok(true) => {
                let result = batch_delete_items(handle, root, path, ino, index).await;
                path.release();
                result?;
            }
            Err(error) => {
                path.release();
                return Err(error);
            }
        }
    }
}

/// `__btrfs_update_delayed_inode`: write the pending inode item, and delete
/// the inode's only INODE_REF if that was queued too. Fails with ENOENT if
/// the inode item is not in the tree.
async fn update_delayed_inode(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    ino: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    let Some(_guard) = lock_delayed_node(fs, ino, false).await else { return Ok(()) };
    let Some((item, del_iref)) =
        delayed.with_node(ino, |node| node.inode_dirty.then_some((node.inode_item, node.del_iref)))
    else {
        return Ok(());
    };
    let key = Key::new(ino, INODE_ITEM_KEY, 0);
    let ins_len = if del_iref { -1 } else { 0 };
    let result = async {
        if !search_slot(Some(handle), root, &key, path, ins_len, true).await? {
            return Err(Error::Enoent);
        }
        let leaf = path.nodes[0].clone().expect("search leaves the path at a leaf");
        let slot = path.slots[0];
        let nritems = {
            let mut image = leaf.data.borrow_mut();
            item.write(item_data_mut(&mut image, slot));
            header_nritems(&image) as usize
        };
        mark_buffer_dirty(handle, &leaf);
        delayed.stats.inode_updates.set(delayed.stats.inode_updates.get() + 1);
        if !del_iref {
            return Ok(());
        }
        // The only INODE_REF follows the inode item, possibly in the next leaf.
        let slot = if slot + 1 >= nritems {
            path.release();
            let last = Key::new(ino, INODE_EXTREF_KEY, u64::MAX);
            let found = search_slot(Some(handle), root, &last, path, -1, true).await?;
            assert!(!found && path.slots[0] > 0, "inode {ino}: no item before its last possible extref");
            path.slots[0] -= 1;
            path.slots[0]
        } else {
            path.slots[0] = slot + 1;
            slot + 1
        };
        let leaf = path.nodes[0].clone().expect("search leaves the path at a leaf");
        let found = item_key(&leaf.data.borrow(), slot);
        if found.objectid == ino && (found.item_type == INODE_REF_KEY || found.item_type == INODE_EXTREF_KEY)
        {
            del_items(handle, root, path, slot, 1).await?;
        }
        Ok(())
    }
    .await;
    // out: btrfs_release_delayed_iref, release the path, then the metadata
    // and the dirty flag, whatever happened.
    let (iref, bytes) = delayed.with_node(ino, |node| {
        let iref = std::mem::take(&mut node.del_iref);
        let bytes = std::mem::take(&mut node.bytes_reserved);
        node.inode_dirty = false;
        node.count -= 1 + u64::from(iref);
        (iref, bytes)
    });
    if iref {
        delayed.finish_one_item();
    }
    path.release();
    release_delayed_bytes(fs, bytes);
    delayed.finish_one_item();
    if let Err(error) = &result
        && *error != Error::Enoent
    {
        abort_transaction(handle, error, "__btrfs_update_delayed_inode");
    }
    result
}

/// `__btrfs_commit_inode_delayed_items`: insertions, deletions, then the
/// inode item.
async fn commit_inode_delayed_items(handle: &TransHandle, path: &mut Path, ino: u64) -> Result<(), Error> {
    let root = handle.fs.root(FS_TREE_OBJECTID);
    insert_delayed_items(handle, &root, path, ino).await?;
    delete_delayed_items(handle, &root, path, ino).await?;
    update_delayed_inode(handle, &root, path, ino).await
}

/// `btrfs_run_delayed_items`: write every delayed item (the commit calls
/// it). COWs are charged to the delayed items reserve meanwhile. A failure
/// aborts the transaction.
pub async fn run_delayed_items(handle: &TransHandle) -> Result<(), Error> {
    run_delayed_items_nr(handle, None).await
}

/// `btrfs_run_delayed_items_nr` (`Some(nr)`: the first `nr` nodes of the
/// node list; the space flusher's FLUSH_DELAYED_ITEMS_NR) and
/// `btrfs_run_delayed_items` (`None`).
pub async fn run_delayed_items_nr(handle: &TransHandle, nr: Option<u64>) -> Result<(), Error> {
    if handle.aborted() {
        return Err(Error::Erofs);
    }
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    let saved_rsv = handle.block_rsv.get();
    handle.block_rsv.set(Some(BlockRsvType::DelayedItems));
    let mut curr = delayed.first_node();
    let mut done = 0u64;
    let mut result = Ok(());
    while let Some(ino) = curr {
        if nr.is_some_and(|nr| done >= nr) {
            break;
        }
        done += 1;
        let mut path = Path::new();
        if let Err(error) = commit_inode_delayed_items(handle, &mut path, ino).await {
            abort_transaction(handle, &error, "__btrfs_run_delayed_items");
            result = Err(error);
            break;
        }
        curr = delayed.next_node(ino);
        drop(path);
        delayed.release_node(ino, false);
    }
    handle.block_rsv.set(saved_rsv);
    result
}

/// `btrfs_commit_inode_delayed_items`: write the delayed items of one inode.
pub async fn commit_one_inode_delayed_items(handle: &TransHandle, ino: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    let delayed = delayed_root(fs);
    if delayed.nodes.borrow().get(&ino).is_none_or(|node| node.count == 0) {
        return Ok(());
    }
    let saved_rsv = handle.block_rsv.get();
    handle.block_rsv.set(Some(BlockRsvType::DelayedItems));
    let mut path = Path::new();
    let result = commit_inode_delayed_items(handle, &mut path, ino).await;
    drop(path);
    delayed.release_node(ino, false);
    handle.block_rsv.set(saved_rsv);
    result
}

/// `btrfs_async_run_delayed_root`: the background worker. Runs prepared
/// nodes, each in a joined transaction, until fewer than half the
/// background threshold remain, or `nr` nodes (`0`: up to
/// [`DELAYED_WRITEBACK`]) are done.
async fn async_run_delayed_root(fs: Rc<FsInfo>, nr: u64) {
    let delayed = delayed_root(&fs);
    let mut total_done = 0u64;
    loop {
        if delayed.items() < DELAYED_BACKGROUND / 2 {
            break;
        }
        let Some(ino) = delayed.first_prepared_node() else { break };
        match join_transaction(&fs, "delayed-meta").await {
            Err(_) => delayed.release_node(ino, true),
            Ok(handle) => {
                let saved_rsv = handle.block_rsv.get();
                handle.block_rsv.set(Some(BlockRsvType::DelayedItems));
                let mut path = Path::new();
                // Errors are left for the commit to meet again (the inode
                // update aborts on its own).
                let _ = commit_inode_delayed_items(&handle, &mut path, ino).await;
                drop(path);
                handle.block_rsv.set(saved_rsv);
                end_transaction(handle);
                delayed.release_node(ino, true);
            }
        }
        total_done += 1;
        if !((nr == 0 && total_done < DELAYED_WRITEBACK) || total_done < nr) {
            break;
        }
    }
    delayed.wait.wake_all();
    delayed.works_pending.set(delayed.works_pending.get() - 1);
}

/// `btrfs_wq_run_delayed_node`: queue a background work item.
fn queue_delayed_work(fs: &Rc<FsInfo>, nr: u64) {
    let delayed = delayed_root(fs);
    delayed.works_pending.set(delayed.works_pending.get() + 1);
    delayed.stats.async_works.set(delayed.stats.async_works.get() + 1);
    let worker = async_run_delayed_root(fs.clone(), nr);
    fs.env.spawn("btrfs-delayed-meta", TaskKind::Daemon, Box::pin(worker));
}

/// `btrfs_balance_delayed_items`, called after an operation ended its
/// handle (`btrfs_btree_balance_dirty`): with [`DELAYED_BACKGROUND`] items
/// queued, start the background worker on [`DELAYED_BATCH`] nodes; with
/// [`DELAYED_WRITEBACK`], start it without a limit and wait until it has
/// done a batch of items or the queue fell below the background threshold.
pub async fn balance_delayed_items(fs: &Rc<FsInfo>) {
    let delayed = delayed_root(fs);
    if delayed.items() < DELAYED_BACKGROUND || delayed.works_pending.get() > WORKQUEUE_CONGESTED {
        return;
    }
    if delayed.items() >= DELAYED_WRITEBACK {
        let seq = delayed.items_seq.get();
        queue_delayed_work(fs, 0);
        let could_end_wait = move || {
            let val = delayed.items_seq.get();
            val < seq || val >= seq + DELAYED_BATCH || delayed.items() < DELAYED_BACKGROUND
        };
        if !could_end_wait() {
            fs.env.wait_on(WaitOn::Other("delayed items writeback"));
            delayed.wait.wait_until(could_end_wait).await;
        }
        return;
    }
    queue_delayed_work(fs, DELAYED_BATCH);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inode::testing::{mount, run, run_delayed};
    use crate::inode::{ROOT_DIR_INO, create, mkdir, readdir, unlink};

    const INSERT_UNIT: u64 = 262_144;
    const UPDATE_UNIT: u64 = 131_072;

    fn delayed_rsv(fs: &FsInfo) -> (u64, u64) {
        let rsv = &fs.space.get().unwrap().rsvs.delayed_block_rsv;
        (rsv.size(), rsv.reserved())
    }

    #[test]
    fn index_items_of_a_directory_go_in_one_batch_per_leaf() {
        let (env, fs) = mount();
        // 255 bytes per item with its header: 63 fit in a 16 KiB leaf's
        // 16 283 bytes of data.
        let names: Vec<String> = (0..100).map(|i| format!("{i:03}{}", "x".repeat(197))).collect();
        let created = names.clone();
        run(&env, &fs, |fs| async move {
            for name in &created {
                create(&fs, ROOT_DIR_INO, name).await?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        let delayed = &fs.inodes.delayed;
        assert_eq!(delayed.pending_insertions(ROOT_DIR_INO).len(), 100);
        assert_eq!(delayed.items(), 101);
        // Two leaves and the directory's inode update.
        assert_eq!(delayed.stats.migrates.get(), 3);
        assert_eq!(delayed_rsv(&fs), (2 * INSERT_UNIT + UPDATE_UNIT, 2 * INSERT_UNIT + UPDATE_UNIT));
        run_delayed(&env, &fs).unwrap();
        assert_eq!(delayed.stats.index_batches.get(), 2);
        assert_eq!(delayed.stats.index_items_inserted.get(), 100);
        assert_eq!(delayed.stats.inode_updates.get(), 1);
        assert_eq!(delayed_rsv(&fs), (0, 0));
        assert_eq!((delayed.items(), delayed.nodes_queued()), (0, 0));
        let entries = run(&env, &fs, |fs| async move { readdir(&fs, ROOT_DIR_INO).await }).unwrap();
        let listed: Vec<String> = entries.into_iter().map(|(name, _, _)| name).collect();
        assert_eq!(listed, names);
    }

    #[test]
    fn a_cancelled_insertion_gives_its_leaf_back() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            create(&fs, ROOT_DIR_INO, "short-lived").await?;
            unlink(&fs, ROOT_DIR_INO, "short-lived").await
        })
        .unwrap();
        let delayed = &fs.inodes.delayed;
        assert!(delayed.pending_insertions(ROOT_DIR_INO).is_empty());
        assert!(delayed.pending_deletions(ROOT_DIR_INO).is_empty());
        // Only the directory's inode update is left.
        assert_eq!((delayed.items(), delayed.inode_dirty(ROOT_DIR_INO)), (1, true));
        assert_eq!(delayed_rsv(&fs), (UPDATE_UNIT, UPDATE_UNIT));
        run_delayed(&env, &fs).unwrap();
        assert_eq!(delayed_rsv(&fs), (0, 0));
        assert_eq!(delayed.stats.index_items_inserted.get(), 0);
    }

    #[test]
    fn deleting_a_written_index_item_queues_a_deletion_with_an_insert_unit() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move { create(&fs, ROOT_DIR_INO, "a").await }).unwrap();
        run_delayed(&env, &fs).unwrap();
        run(&env, &fs, |fs| async move { unlink(&fs, ROOT_DIR_INO, "a").await }).unwrap();
        let delayed = &fs.inodes.delayed;
        assert_eq!(delayed.pending_deletions(ROOT_DIR_INO), vec![2]);
        assert_eq!(delayed_rsv(&fs), (INSERT_UNIT + UPDATE_UNIT, INSERT_UNIT + UPDATE_UNIT));
        run_delayed(&env, &fs).unwrap();
        assert_eq!(delayed.stats.index_items_deleted.get(), 1);
        assert_eq!(delayed_rsv(&fs), (0, 0));
        let root = fs.root(FS_TREE_OBJECTID);
        let key = Key::new(ROOT_DIR_INO, DIR_INDEX_KEY, 2);
        let item = env.run(async move { crate::ctree::lookup_item(&root, &key).await }).unwrap();
        assert_eq!(item, None);
    }

    #[test]
    fn run_nr_takes_nodes_in_the_order_they_were_queued() {
        let (env, fs) = mount();
        let d = run(&env, &fs, |fs| async move {
            create(&fs, ROOT_DIR_INO, "a").await?;
            let d = mkdir(&fs, ROOT_DIR_INO, "d").await?;
            create(&fs, d, "b").await?;
            Ok::<_, Error>(d)
        })
        .unwrap();
        let delayed = &fs.inodes.delayed;
        assert_eq!(delayed.nodes_queued(), 2);
        run(&env, &fs, |fs| async move {
            let handle = join_transaction(&fs, "test").await?;
            let result = run_delayed_items_nr(&handle, Some(1)).await;
            assert_eq!(handle.block_rsv.get(), None, "the handle's reserve is restored");
            end_transaction(handle);
            result
        })
        .unwrap();
        assert!(delayed.pending_insertions(ROOT_DIR_INO).is_empty());
        assert_eq!(delayed.pending_insertions(d), vec![2]);
        assert_eq!(delayed.nodes_queued(), 1);
        run_delayed(&env, &fs).unwrap();
        assert_eq!(delayed.nodes_queued(), 0);
    }

    #[test]
    fn balancing_past_the_background_threshold_starts_the_worker() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            for i in 0..DELAYED_BACKGROUND + 10 {
                create(&fs, ROOT_DIR_INO, &format!("f{i}")).await?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        let delayed = &fs.inodes.delayed;
        assert!(delayed.stats.async_works.get() >= 1);
        assert!(delayed.items() < DELAYED_BACKGROUND, "{} items left", delayed.items());
        assert!(delayed.stats.index_items_inserted.get() >= DELAYED_BACKGROUND - 1);
        assert_eq!(delayed.works_pending.get(), 0);
        run_delayed(&env, &fs).unwrap();
        let entries = run(&env, &fs, |fs| async move { readdir(&fs, ROOT_DIR_INO).await }).unwrap();
        assert_eq!(entries.len() as u64, DELAYED_BACKGROUND + 10);
        assert_eq!(delayed_rsv(&fs), (0, 0));
    }
}
