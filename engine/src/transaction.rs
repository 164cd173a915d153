//! Transactions and their handles (kernel: transaction.c, transaction.h).
//!
//! One transaction runs at a time; every modifying operation holds a handle
//! on it. A handle reserves metadata space when it starts (the worst case of
//! the items it will insert) and every tree block it COWs is charged to that
//! reservation; the reservation oracle compares the two.
//!
//! Status: handles, joins and the running transaction are here; the commit
//! sequence is `commit_transaction` (see its documentation for what it does
//! and does not do yet).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::accessors::item_data_mut;
use crate::block_rsv::{BlockRsvType, TransRsvAccount};
use crate::ctree::{Path, Root, copy_root, cow_block, insert_item, lock_root_node, lookup_item, search_slot};
use crate::delayed_inode::{run_delayed_items, run_delayed_items_nr};
use crate::delayed_ref::DelayedRefRoot;
use crate::disk_io::{fill_super_for_commit, write_all_supers};
use crate::env::{LocalBoxFuture, TraceEvent, Violation, WaitOn};
use crate::error::Error;
use crate::extent_io::ExtentBuffer;
use crate::extent_io::write_and_wait_ebs;
use crate::extent_tree::{run_delayed_refs, unpin_extents};
use crate::format::{
    BLOCK_GROUP_METADATA, CHUNK_TREE_OBJECTID, DEV_TREE_OBJECTID, EXTENT_TREE_OBJECTID, FIRST_FREE_OBJECTID,
    FS_TREE_OBJECTID, FixedItem, Key, ROOT_ITEM_KEY, ROOT_SUBVOL_RDONLY, ROOT_TREE_OBJECTID, RootItem,
    TREE_LOG_OBJECTID, UUID_SIZE, is_fstree,
};
use crate::fs::FsInfo;
use crate::locking::tree_unlock;
use crate::space_info::{FlushKind, FlushOps};
use crate::volumes::alloc_chunk;
use crate::volumes::{block_group_item_bytes, block_group_item_key};
use crate::wait::WaitQueue;

/// The kernel's `enum btrfs_trans_state`, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TransState {
    Running,
    /// Commit started: no new handles may join until unblocked.
    CommitStart,
    /// Every writer has ended; the commit does its work.
    CommitDoing,
    /// The super block is being written; new transactions may start.
    Unblocked,
    SuperCommitted,
    Completed,
}

impl TransState {
    pub fn name(self) -> &'static str {
        match self {
            TransState::Running => "running",
            TransState::CommitStart => "commit_start",
            TransState::CommitDoing => "commit_doing",
            TransState::Unblocked => "unblocked",
            TransState::SuperCommitted => "super_committed",
            TransState::Completed => "completed",
        }
    }
}

/// One transaction (kernel: struct btrfs_transaction).
pub struct Transaction {
    pub transid: u64,
    state: Cell<TransState>,
    /// Open handles (kernel: num_writers). The commit waits for zero.
    pub num_writers: Cell<u32>,
    /// Tree blocks dirtied in this transaction, by bytenr (kernel: the
    /// dirty_pages extent io tree). The commit writes every one.
    pub dirty_ebs: RefCell<BTreeSet<u64>>,
    /// Extents freed in this transaction that stay pinned until it commits.
    pub pinned: RefCell<BTreeMap<u64, u64>>,
    /// Reference changes of tree blocks, run at commit (and when too many queue up).
    pub delayed_refs: DelayedRefRoot,
    /// Snapshots asked for in this transaction; its commit makes them.
    pub pending_snapshots: RefCell<Vec<Rc<PendingSnapshot>>>,
    /// Wakes the committer when a writer ends, and handles waiting for the
    /// commit to unblock or complete.
    pub wait: WaitQueue,
}

impl Transaction {
    fn new(transid: u64) -> Self {
        Self {
            transid,
            state: Cell::new(TransState::Running),
            num_writers: Cell::new(0),
            dirty_ebs: RefCell::new(BTreeSet::new()),
            pinned: RefCell::new(BTreeMap::new()),
            delayed_refs: DelayedRefRoot::default(),
            pending_snapshots: RefCell::new(Vec::new()),
            wait: WaitQueue::new(),
        }
    }

    pub fn state(&self) -> TransState {
        self.state.get()
    }

    pub fn set_state(&self, fs: &FsInfo, state: TransState) {
        assert!(state >= self.state.get(), "transaction {} cannot go back to {state:?}", self.transid);
        self.state.set(state);
        fs.env.trace(TraceEvent::Transaction { transid: self.transid, state: state.name() });
        self.wait.wake_all();
    }
}

/// The filesystem's transaction state (kernel: fields of btrfs_fs_info).
#[derive(Default)]
pub struct TransactionControl {
    pub running: RefCell<Option<Rc<Transaction>>>,
    /// The transaction whose commit unblocked last: it may still be writing
    /// its blocks and super block while the next one runs (the tail of the
    /// kernel's `fs_info->trans_list`).
    pub committing: RefCell<Option<Rc<Transaction>>>,
    /// The last transaction id handed out (kernel: fs_info->generation).
    pub generation: Cell<u64>,
    pub last_trans_committed: Cell<u64>,
    /// The first error that aborted a transaction: the filesystem is read-only.
    pub fs_error: Cell<Option<i32>>,
    pub next_handle_id: Cell<u64>,
    /// Woken when a commit completes.
    pub commit_done: WaitQueue,
    /// Bytes reserved and used by every ended handle.
    pub handle_stats: HandleStats,
}

/// What ended handles reserved and used (the report's `stats.handles`).
#[derive(Default)]
pub struct HandleStats {
    pub handles: Cell<u64>,
    /// Handles that reserved space (started, not joined).
    pub reserving_handles: Cell<u64>,
    pub bytes_reserved: Cell<u64>,
    pub bytes_used: Cell<u64>,
    pub max_bytes_used: Cell<u64>,
    /// Smallest reserved - used over reserving handles (negative: overdrawn).
    pub min_headroom_bytes: Cell<Option<i64>>,
    /// Reserving handles that used more than they reserved.
    pub overdrawn_handles: Cell<u64>,
    /// How tree blocks were paid for (use_block_rsv paths), over all handles.
    pub rsv_paths: RefCell<BTreeMap<&'static str, u64>>,
}

impl HandleStats {
    fn account(&self, handle: &TransHandle) {
        let (reserved, used) =
            (handle.bytes_reserved(), handle.bytes_used.get() + handle.bytes_migrated.get());
        let add = |cell: &Cell<u64>, n: u64| cell.set(cell.get() + n);
        add(&self.handles, 1);
        add(&self.bytes_reserved, reserved);
        add(&self.bytes_used, used);
        self.max_bytes_used.set(self.max_bytes_used.get().max(used));
        if reserved > 0 {
            add(&self.reserving_handles, 1);
            let headroom = reserved as i64 - used as i64;
            self.min_headroom_bytes
                .set(Some(self.min_headroom_bytes.get().map_or(headroom, |m| m.min(headroom))));
            add(&self.overdrawn_handles, u64::from(used > reserved));
        }
        let mut paths = self.rsv_paths.borrow_mut();
        for (path, n) in handle.rsv_paths.borrow().iter() {
            *paths.entry(path).or_default() += n;
        }
    }
}

/// COWs and restarts (by reason, as `RestartReason::ALL`) of the search a
/// handle is running or ran last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchProgress {
    pub root: u64,
    pub cows: u32,
    pub restarts: [u32; 4],
}

impl std::fmt::Display for SearchProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a search of tree {} COWed {} blocks after restarts", self.root, self.cows)?;
        for (reason, n) in crate::env::RestartReason::ALL.iter().zip(self.restarts) {
            write!(f, " {}={n}", reason.as_str())?;
        }
        Ok(())
    }
}

/// Why a handle was started; named in violation reports.
pub type Operation = &'static str;

/// A transaction handle (kernel: struct btrfs_trans_handle).
pub struct TransHandle {
    pub fs: Rc<FsInfo>,
    pub transaction: Rc<Transaction>,
    pub transid: u64,
    /// A serial number for reports.
    pub id: u64,
    pub op: Operation,
    /// The tree the handle was started on.
    pub root_objectid: u64,
    /// What start_transaction reserved for this handle; None for a join or
    /// a filesystem without space accounting.
    pub rsv: RefCell<Option<TransRsvAccount>>,
    /// The reserve this handle's subvolume COWs charge (kernel:
    /// trans->block_rsv): the shared transaction reserve after a start, the
    /// delayed-items reserve while delayed items run, none for a join.
    pub block_rsv: Cell<Option<BlockRsvType>>,
    /// Metadata bytes this handle's tree block allocations consumed from
    /// subvolume trees (the reservation oracle compares it with
    /// `bytes_reserved`).
    pub bytes_used: Cell<u64>,
    /// How each allocation was paid for, by path (`RsvUse`), for reports.
    pub rsv_paths: RefCell<BTreeMap<&'static str, u64>>,
    /// Bytes of this handle's reservation migrated to the delayed-items
    /// reserve (dir index batches, inode updates): consumption too.
    pub bytes_migrated: Cell<u64>,
    /// The search running under this handle, for the reservation oracle's report.
    pub search: Cell<SearchProgress>,
    /// The reservation oracle reported this handle already.
    pub overdraw_reported: Cell<bool>,
    /// Tree blocks this handle keeps from background writeback (fix
    /// `inhibit-writeback`), each holding a reference.
    pub inhibited: RefCell<BTreeMap<u64, Rc<ExtentBuffer>>>,
    ended: Cell<bool>,
}

impl TransHandle {
    pub fn aborted(&self) -> bool {
        self.fs.trans.fs_error.get().is_some()
    }

    /// Metadata bytes this handle added to the shared transaction reserve.
    pub fn bytes_reserved(&self) -> u64 {
        self.rsv.borrow().as_ref().map_or(0, |account| account.bytes_reserved)
    }
}

impl Drop for TransHandle {
    fn drop(&mut self) {
        // A handle must be ended; dropping one mid-operation (power loss drops
        // every task) leaves the transaction to die with the machine.
        if !self.ended.get() {
            release_metadata(self);
            self.release_inhibited();
        }
    }
}

impl TransHandle {
    /// Release everything this handle inhibited (fix `inhibit-writeback`).
    pub fn release_inhibited(&self) {
        let inhibited = std::mem::take(&mut *self.inhibited.borrow_mut());
        for eb in inhibited.values() {
            eb.remove_writeback_inhibitor();
        }
    }

    /// Keep `eb` from background writeback until this handle ends.
    pub fn inhibit_writeback(&self, eb: &Rc<ExtentBuffer>) {
        if !self.fs.fix.inhibits_writeback() {
            return;
        }
        let mut inhibited = self.inhibited.borrow_mut();
        if !inhibited.contains_key(&eb.start) {
            eb.add_writeback_inhibitor();
            inhibited.insert(eb.start, eb.clone());
        }
    }
}

/// The filesystem is read-only after an abort: every modifying call fails.
pub fn check_fs_error(fs: &FsInfo) -> Result<(), Error> {
    match fs.trans.fs_error.get() {
        Some(_) => Err(Error::Erofs),
        None => Ok(()),
    }
}

/// Join the running transaction, or start a new one. Waits while a commit
/// has started and not yet unblocked (kernel: join_transaction +
/// wait_current_trans).
pub async fn join_transaction(fs: &Rc<FsInfo>, op: Operation) -> Result<TransHandle, Error> {
    loop {
        check_fs_error(fs)?;
        let running = fs.trans.running.borrow().clone();
        match running {
            Some(transaction) if transaction.state() == TransState::Running => {
                return Ok(new_handle(fs, transaction, op));
            }
            Some(transaction) if transaction.state() < TransState::Unblocked => {
                // An abort mid-commit never unblocks: waiters see the error
                // instead (the kernel's wait_current_trans checks for it too).
                fs.env.wait_on(WaitOn::Transaction { what: "commit to unblock" });
                let (waiting, fs_waiting) = (transaction.clone(), fs.clone());
                transaction
                    .wait
                    .wait_until(move || {
                        waiting.state() >= TransState::Unblocked || fs_waiting.trans.fs_error.get().is_some()
                    })
                    .await;
            }
            _ => {
                let transid = fs.trans.generation.get() + 1;
                fs.trans.generation.set(transid);
                let transaction = Rc::new(Transaction::new(transid));
                transaction.delayed_refs.qgroup.tracing.set(fs.qgroup.enabled.get());
                *fs.trans.running.borrow_mut() = Some(transaction.clone());
                fs.env.trace(TraceEvent::Transaction { transid, state: TransState::Running.name() });
                return Ok(new_handle(fs, transaction, op));
            }
        }
    }
}

fn new_handle(fs: &Rc<FsInfo>, transaction: Rc<Transaction>, op: Operation) -> TransHandle {
    transaction.num_writers.set(transaction.num_writers.get() + 1);
    let id = fs.trans.next_handle_id.get() + 1;
    fs.trans.next_handle_id.set(id);
    TransHandle {
        fs: fs.clone(),
        transid: transaction.transid,
        transaction,
        id,
        op,
        root_objectid: FS_TREE_OBJECTID,
        rsv: RefCell::new(None),
        block_rsv: Cell::new(None),
        bytes_used: Cell::new(0),
        rsv_paths: RefCell::new(BTreeMap::new()),
        bytes_migrated: Cell::new(0),
        search: Cell::new(SearchProgress::default()),
        overdraw_reported: Cell::new(false),
        inhibited: RefCell::new(BTreeMap::new()),
        ended: Cell::new(false),
    }
}

/// Start a handle that will insert up to `num_items` items into `root`:
/// reserve their worst case (calc_insert_metadata_size) into the shared
/// transaction reserve, flushing if needed, then join the running
/// transaction (kernel: start_transaction).
pub async fn start_transaction(
    fs: &Rc<FsInfo>,
    root: &Root,
    num_items: u64,
    op: Operation,
) -> Result<TransHandle, Error> {
    check_fs_error(fs)?;
    let mut account = match fs.space.get() {
        Some(space) if num_items > 0 => {
            Some(TransRsvAccount::reserve(&space.rsvs, num_items, FlushKind::FlushAll).await?)
        }
        _ => None,
    };
    match join_transaction(fs, op).await {
        Ok(mut handle) => {
            handle.root_objectid = root.objectid;
            if account.is_some() {
                handle.block_rsv.set(Some(BlockRsvType::Trans));
            }
            *handle.rsv.borrow_mut() = account;
            Ok(handle)
        }
        Err(error) => {
            if let (Some(account), Some(space)) = (account.as_mut(), fs.space.get()) {
                account.release(&space.rsvs);
            }
            Err(error)
        }
    }
}

/// Give back what the handle reserved and did not use (kernel:
/// btrfs_trans_release_metadata).
fn release_metadata(handle: &TransHandle) {
    release_account(handle, handle.rsv.borrow_mut().take());
    handle.block_rsv.set(None);
}

/// End a handle: give back its reservation, release what it inhibited, then
/// stop counting as a writer (kernel: __btrfs_end_transaction).
pub fn end_transaction(handle: TransHandle) {
    handle.fs.trans.handle_stats.account(&handle);
    release_metadata(&handle);
    handle.release_inhibited();
    handle.ended.set(true);
    let transaction = &handle.transaction;
    assert!(transaction.num_writers.get() > 0, "transaction {} has no writer to end", transaction.transid);
    transaction.num_writers.set(transaction.num_writers.get() - 1);
    transaction.wait.wake_all();
}

/// Record a tree block as dirty in the handle's transaction and mark it
/// dirty (kernel: btrfs_mark_buffer_dirty). The caller holds its write lock
/// (or, with fix `overwrite-written`, at least a read lock).
pub fn mark_buffer_dirty(handle: &TransHandle, eb: &ExtentBuffer) {
    assert_eq!(
        eb.generation(),
        handle.transid,
        "block {} of generation {} dirtied in transaction {}",
        eb.start,
        eb.generation(),
        handle.transid
    );
    if eb.under_writeback() {
        handle.fs.env.report_violation(Violation {
            kind: "modified_under_writeback",
            message: format!("tree block {} modified while its write is in flight ({})", eb.start, handle.op),
        });
    }
    crate::extent_io::set_extent_buffer_dirty(eb);
    if eb.owner() == TREE_LOG_OBJECTID {
        handle.fs.log.block_dirtied(eb.start);
    } else {
        handle.transaction.dirty_ebs.borrow_mut().insert(eb.start);
    }
}

/// Abort the running transaction with `error` (kernel: btrfs_abort_transaction
/// and btrfs_handle_fs_error): the filesystem turns read-only and every later
/// modifying call fails with EROFS. The first error sticks; `location` names
/// the caller, as the kernel's "error in btrfs_add_link:6606" does.
pub fn abort_transaction(handle: &TransHandle, error: &Error, location: &'static str) {
    let fs = &handle.fs;
    if fs.trans.fs_error.get().is_none() {
        fs.trans.fs_error.set(Some(error.errno()));
        let unallocated = crate::volumes::unallocated_bytes(fs);
        let kind = if *error == Error::Enospc { "enospc_abort" } else { "transaction_abort" };
        fs.env.report_violation(Violation {
            kind,
            message: format!(
                "BTRFS: Transaction aborted (error -{}) in {location}: transaction {} forced read-only with {unallocated} bytes unallocated ({}): {error}",
                error.errno(),
                handle.transid,
                handle.op
            ),
        });
        fs.env.trace(TraceEvent::Note {
            what: "transaction_abort",
            a: handle.transid,
            b: u64::from(error.errno().unsigned_abs()),
            c: 0,
        });
        fs.env.trace(TraceEvent::Transaction { transid: handle.transid, state: location });
    }
    handle.transaction.wait.wake_all();
    fs.trans.commit_done.wake_all();
}

/// Write the root item of `root` into the root tree: its current root
/// block, level and generation (kernel: btrfs_update_root).
pub async fn update_root(handle: &TransHandle, root: &Root) -> Result<(), Error> {
    let fs = &handle.fs;
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    let node = root.node();
    let mut item = root.root_item.borrow().clone();
    item.bytenr = node.start;
    item.level = node.level();
    item.generation = handle.transid;
    item.generation_v2 = handle.transid;
    drop(node);
    let key = Key { objectid: root.objectid, item_type: ROOT_ITEM_KEY, offset: root.root_key_offset.get() };
    let mut path = Path::new();
    if !search_slot(Some(handle), &tree_root, &key, &mut path, 0, true).await? {
        return Err(Error::BadTreeBlock(format!("root tree has no ROOT_ITEM for tree {}", root.objectid)));
    }
    let leaf = path.nodes[0].clone().expect("a found item has a leaf");
    {
        let mut data = leaf.data.borrow_mut();
        let bytes = item_data_mut(&mut data, path.slots[0]);
        assert_eq!(bytes.len(), RootItem::SIZE, "ROOT_ITEM of tree {} has a legacy size", root.objectid);
        item.write(bytes);
    }
    mark_buffer_dirty(handle, &leaf);
    *root.root_item.borrow_mut() = item;
    root.dirty.set(false);
    Ok(())
}

/// Commit the running transaction, if there is one (kernel: btrfs_sync_fs).
pub async fn sync(fs: &Rc<FsInfo>) -> Result<(), Error> {
    check_fs_error(fs)?;
    if fs.trans.running.borrow().is_none() {
        // Nothing runs, but the last commit may still be writing: what the
        // caller did is only on disk once it completes (the kernel's
        // btrfs_attach_transaction_barrier waits for it).
        let committing = fs.trans.committing.borrow().clone();
        return match committing {
            Some(transaction) => wait_for_commit(fs, &transaction).await,
            None => Ok(()),
        };
    }
    let handle = join_transaction(fs, "sync").await?;
    commit_transaction(handle).await
}

/// Commit the handle's transaction (kernel: btrfs_commit_transaction):
/// 1. run delayed refs; 2. stop new joins (commit_start) and wait for every
/// other writer to end; 3. run delayed items and refs again, insert the
/// items of chunks allocated in the transaction; 4. write the root items of
/// changed trees and the block group items, running the delayed refs those
/// writes queue until nothing changes (commit_fs_roots,
/// commit_cowonly_roots); 5. take the super block's roots, then unblock: a
/// new transaction may start; 6. write every dirty block of the transaction
/// and wait (data-integrity writeback); 7. write the super block (a flush,
/// then FUA); 8. unpin what the transaction freed.
/// If another task already started committing this transaction, wait for it.
pub async fn commit_transaction(handle: TransHandle) -> Result<(), Error> {
    let fs = handle.fs.clone();
    let transaction = handle.transaction.clone();
    if let Err(error) = check_fs_error(&fs) {
        end_transaction(handle);
        return Err(error);
    }
    if transaction.state() != TransState::Running {
        end_transaction(handle);
        return wait_for_commit(&fs, &transaction).await;
    }
    // Delayed refs run before the commit starts, and running them may wait:
    // another task may have started committing this transaction meanwhile,
    // and then this one only waits for it, as the kernel's re-check of
    // COMMIT_PREP does (two committers would each wait for the other to end
    // its handle).
    let result = match run_delayed_refs(&handle).await {
        Ok(()) if transaction.state() != TransState::Running => {
            end_transaction(handle);
            return wait_for_commit(&fs, &transaction).await;
        }
        Ok(()) => do_commit(&handle).await,
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        abort_transaction(&handle, error, "btrfs_commit_transaction");
    }
    fs.trans.handle_stats.account(&handle);
    release_metadata(&handle);
    handle.release_inhibited();
    handle.ended.set(true);
    transaction.num_writers.set(transaction.num_writers.get() - 1);
    transaction.wait.wake_all();
    fs.trans.commit_done.wake_all();
    result
}

/// Wait until every transaction up to `transid` is on disk, if one that
/// old is committing now (`btrfs_wait_for_commit`).
pub(crate) async fn wait_for_transid(fs: &Rc<FsInfo>, transid: u64) -> Result<(), Error> {
    if fs.trans.last_trans_committed.get() >= transid {
        return check_fs_error(fs);
    }
    let committing = fs.trans.committing.borrow().clone();
    match committing {
        Some(transaction) if transaction.transid >= transid => wait_for_commit(fs, &transaction).await,
        _ => check_fs_error(fs),
    }
}

/// Wait until `transaction` completes its commit (or the filesystem fails).
async fn wait_for_commit(fs: &Rc<FsInfo>, transaction: &Rc<Transaction>) -> Result<(), Error> {
    if transaction.state() == TransState::Completed {
        return check_fs_error(fs);
    }
    fs.env.wait_on(WaitOn::Transaction { what: "commit to complete" });
    let (waiting, fs_waiting) = (transaction.clone(), fs.clone());
    transaction
        .wait
        .wait_until(move || {
            waiting.state() == TransState::Completed || fs_waiting.trans.fs_error.get().is_some()
        })
        .await;
    check_fs_error(fs)
}

async fn do_commit(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let transaction = &handle.transaction;
    transaction.set_state(fs, TransState::CommitStart);
    // The committer's own inhibitions end before it waits and writes.
    handle.release_inhibited();
    // The previous transaction's super block goes first: a later super
    // written before it would be overwritten by the older one, and what this
    // commit promised would be lost (btrfs_commit_transaction waits for the
    // previous transaction to complete).
    let previous = fs.trans.committing.borrow().clone();
    if let Some(previous) = previous
        && previous.transid < handle.transid
        && previous.state() < TransState::Completed
    {
        wait_for_commit(fs, &previous).await?;
    }
    fs.env.wait_on(WaitOn::Transaction { what: "writers to end" });
    let (waiting, fs_waiting) = (transaction.clone(), fs.clone());
    transaction
        .wait
        .wait_until(move || waiting.num_writers.get() == 1 || fs_waiting.trans.fs_error.get().is_some())
        .await;
    check_fs_error(fs)?;
    transaction.set_state(fs, TransState::CommitDoing);
    // The commit makes the log redundant (commit_fs_roots → btrfs_free_log).
    crate::tree_log::free_log_trees(handle);
    run_delayed_items(handle).await?;
    let mut snapshotted = create_pending_snapshots(handle).await?;
    // The delayed update of the directory the snapshots were linked into
    // (kernel: the second btrfs_run_delayed_items of the commit).
    run_delayed_items(handle).await?;
    snapshotted.extend(crate::relocation::create_reloc_roots(handle).await?);
    run_delayed_refs(handle).await?;
    crate::qgroup::rescan_in_commit(handle).await?;
    crate::qgroup::account_extents(handle, None).await?;
    crate::qgroup::run_qgroups(handle).await?;
    create_pending_block_groups(handle).await?;
    commit_roots(handle).await?;
    crate::qgroup::switch_commit_roots(fs);
    // The sources' root items are written: their blocks are COWed as usual
    // again (commit_fs_roots clears FORCE_COW).
    for source in snapshotted {
        source.force_cow.set(false);
    }
    let super_block = fill_super_for_commit(fs, handle.transid)?;
    fs.trans.running.borrow_mut().take();
    *fs.trans.committing.borrow_mut() = Some(transaction.clone());
    transaction.set_state(fs, TransState::Unblocked);
    let dirty: Vec<u64> = transaction.dirty_ebs.borrow().iter().copied().collect();
    write_and_wait_ebs(fs, &dirty).await?;
    if fs.test_and_clear_btree_err() {
        return Err(Error::Io { bytenr: 0 });
    }
    write_all_supers(fs, &super_block).await?;
    transaction.set_state(fs, TransState::SuperCommitted);
    fs.trans.last_trans_committed.set(handle.transid);
    let pinned = std::mem::take(&mut *transaction.pinned.borrow_mut());
    unpin_extents(fs, &pinned);
    transaction.set_state(fs, TransState::Completed);
    Ok(())
}

/// A snapshot asked for in a transaction (kernel: struct
/// btrfs_pending_snapshot): the source tree, the new tree's id once the
/// commit has made it, and the reservation its ioctl made for it
/// (`pending->block_rsv`): whichever handle commits, making this snapshot
/// is paid from it, not from the committer's.
pub struct PendingSnapshot {
    pub source: u64,
    pub objectid: Cell<Option<u64>>,
    pub rsv: RefCell<Option<TransRsvAccount>>,
}

/// `create_pending_snapshots`: make every snapshot asked for in this
/// transaction. Returns the source trees (FORCE_COW until their root items
/// are written).
async fn create_pending_snapshots(handle: &TransHandle) -> Result<Vec<Rc<Root>>, Error> {
    let pending = std::mem::take(&mut *handle.transaction.pending_snapshots.borrow_mut());
    let mut sources = Vec::new();
    for (done, snapshot) in pending.iter().enumerate() {
        let made = with_pending_rsv(handle, snapshot, create_pending_snapshot(handle, snapshot)).await;
        match made {
            Ok(source) => sources.push(source),
            Err(error) => {
                for unmade in &pending[done + 1..] {
                    release_account(handle, unmade.rsv.borrow_mut().take());
                }
                return Err(error);
            }
        }
    }
    Ok(sources)
}

/// Run `work` with the pending snapshot's reservation as the handle's
/// (kernel: `trans->block_rsv = &pending->block_rsv` and
/// `trans->bytes_reserved` in create_pending_snapshot), then give back what
/// it left and restore the handle's own. A pending snapshot with no
/// reservation (no space accounting, or a test that asked for it on a
/// handle of its own) is paid by the handle, as before.
async fn with_pending_rsv<T>(
    handle: &TransHandle,
    pending: &PendingSnapshot,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    let Some(account) = pending.rsv.borrow_mut().take() else { return work.await };
    let own = handle.rsv.replace(Some(account));
    let own_kind = handle.block_rsv.replace(Some(BlockRsvType::Trans));
    let own_used = handle.bytes_used.replace(0);
    let own_migrated = handle.bytes_migrated.replace(0);
    let result = work.await;
    release_account(handle, handle.rsv.replace(own));
    handle.block_rsv.set(own_kind);
    handle.bytes_used.set(own_used);
    handle.bytes_migrated.set(own_migrated);
    result
}

fn release_account(handle: &TransHandle, account: Option<TransRsvAccount>) {
    if let (Some(mut account), Some(space)) = (account, handle.fs.space.get()) {
        account.release(&space.rsvs);
    }
}

/// `create_pending_snapshot`, during the commit with every writer gone and
/// the delayed items run: the source's `last_snapshot` becomes this
/// transaction (from now on its older blocks may be shared) and FORCE_COW
/// is set; its root block is COWed, and copied by `copy_root` as the root
/// of a new read-only tree, whose ROOT_ITEM (keyed by this transaction) is
/// inserted in the root tree. With quotas on, references by the new tree
/// are not traced and the snapshot is accounted at once
/// (`qgroup::account_snapshot`: account, inherit, commit the roots, write
/// the dirty blocks); then the snapshot is linked into the source's top
/// directory (`ioctl::link_snapshot`). Departure: no UUID item.
async fn create_pending_snapshot(handle: &TransHandle, pending: &PendingSnapshot) -> Result<Rc<Root>, Error> {
    let fs = &handle.fs;
    let source = fs.root(pending.source);
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    // btrfs_get_free_objectid of the root tree: ids only grow while mounted.
    let highest = fs.roots.borrow().keys().copied().filter(|&id| is_fstree(id)).max().unwrap_or(0);
    let objectid = highest.max(tree_root.highest_objectid.get()).max(FIRST_FREE_OBJECTID - 1) + 1;
    tree_root.highest_objectid.set(objectid);
    // The delayed items go in first, an earlier snapshot's directory index
    // among them, or the copy would miss them (kernel: "pull in the delayed
    // directory update and the delayed inode item").
    run_delayed_items(handle).await?;
    crate::qgroup::set_skip(handle, objectid);
    let made = make_snapshot(handle, &source, objectid).await;
    crate::qgroup::clear_skip(handle);
    made?;
    pending.objectid.set(Some(objectid));
    Ok(source)
}

/// The snapshot `objectid` of `source`: copy, root item, qgroup.
async fn make_snapshot(handle: &TransHandle, source: &Rc<Root>, objectid: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    let node = cow_source_root(handle, source).await?;
    let mut item = *source.root_item.borrow();
    item.flags |= ROOT_SUBVOL_RDONLY;
    item.parent_uuid = item.uuid;
    item.uuid = subvol_uuid(fs, objectid);
    item.received_uuid = [0; UUID_SIZE];
    item.ctransid = handle.transid;
    item.otransid = handle.transid;
    item.drop_progress = Key::default();
    item.drop_level = 0;
    item.refs = 1;
    let snapshot = Root::new(fs, objectid, node.clone(), item);
    snapshot.root_key_offset.set(handle.transid);
    snapshot.highest_objectid.set(source.highest_objectid.get());
    let copy = root_from_copy(handle, &snapshot, node).await?;
    let key = Key { objectid, item_type: ROOT_ITEM_KEY, offset: handle.transid };
    let bytes = snapshot.root_item.borrow().to_bytes();
    insert_item(handle, &tree_root, &key, &bytes).await?;
    fs.roots.borrow_mut().insert(objectid, snapshot);
    fs.env.trace(TraceEvent::Note { what: "snapshot", a: source.objectid, b: objectid, c: copy.start });
    crate::qgroup::account_snapshot(handle, source, objectid).await?;
    crate::ioctl::link_snapshot(handle, source, objectid).await
}

/// The commit's first step in copying the tree `source` (a snapshot or a
/// relocation tree): from now on its blocks up to this transaction may be
/// shared (`last_snapshot`), and FORCE_COW holds until its root item is
/// written; its root block is COWed and returned write-locked.
pub(crate) async fn cow_source_root(
    handle: &TransHandle,
    source: &Rc<Root>,
) -> Result<Rc<ExtentBuffer>, Error> {
    source.root_item.borrow_mut().last_snapshot = handle.transid;
    source.force_cow.set(true);
    source.dirty.set(true);
    let old = lock_root_node(&handle.fs, source).await;
    match cow_block(handle, source, &old, None).await {
        Ok(node) => Ok(node),
        Err(error) => {
            tree_unlock(&old);
            Err(error)
        }
    }
}

/// The commit's second step in copying a tree: the new tree `new_root`
/// gets a `copy_root` of `node` (the source's COWed root, write-locked,
/// unlocked here) as its root block, named by its root item.
pub(crate) async fn root_from_copy(
    handle: &TransHandle,
    new_root: &Root,
    node: Rc<ExtentBuffer>,
) -> Result<Rc<ExtentBuffer>, Error> {
    let copied = copy_root(handle, new_root, &node).await;
    tree_unlock(&node);
    let copy = copied?;
    new_root.set_node(copy.clone());
    tree_unlock(&copy);
    let mut item = new_root.root_item.borrow_mut();
    item.bytenr = copy.start;
    item.level = copy.level();
    item.generation = handle.transid;
    item.generation_v2 = handle.transid;
    drop(item);
    Ok(copy)
}

/// A new subvolume's UUID, from the filesystem's and the tree id (no OS
/// randomness in a simulated run).
fn subvol_uuid(fs: &FsInfo, objectid: u64) -> [u8; UUID_SIZE] {
    let mut uuid = fs.fsid.get().unwrap_or_default();
    for (byte, id) in uuid.iter_mut().zip(objectid.to_le_bytes()) {
        *byte ^= id;
    }
    uuid
}

/// Insert the chunk, device extent and block group items of the chunks
/// allocated in this transaction, and the device item's new bytes_used
/// (kernel: btrfs_create_pending_block_groups, btrfs_finish_chunk_alloc).
pub(crate) async fn create_pending_block_groups(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let pending = fs.volumes.take_pending_chunks();
    if pending.is_empty() {
        return Ok(());
    }
    let (chunk_root, dev_root, extent_root) =
        (fs.root(CHUNK_TREE_OBJECTID), fs.root(DEV_TREE_OBJECTID), fs.root(EXTENT_TREE_OBJECTID));
    for chunk in &pending {
        let (key, item) = chunk.chunk_item();
        insert_item(handle, &chunk_root, &key, &item).await?;
        let (key, item) = chunk.dev_extent_item();
        insert_item(handle, &dev_root, &key, &item).await?;
        let group = fs.block_groups.lookup(chunk.map.start).expect("a pending chunk has its block group");
        let key = block_group_item_key(group.start, group.length);
        insert_item(handle, &extent_root, &key, &block_group_item_bytes(&group)).await?;
    }
    let (key, item) = fs.volumes.dev_item();
    overwrite_item(handle, &chunk_root, &key, &item).await
}

/// Replace the payload of an existing item of the same size.
async fn overwrite_item(
    handle: &TransHandle,
    root: &Rc<Root>,
    key: &Key,
    payload: &[u8],
) -> Result<(), Error> {
    let mut path = Path::new();
    if !search_slot(Some(handle), root, key, &mut path, 0, true).await? {
        return Err(Error::BadTreeBlock(format!("tree {} has no item {key}", root.objectid)));
    }
    let leaf = path.nodes[0].clone().expect("a found item has a leaf");
    {
        let mut data = leaf.data.borrow_mut();
        let bytes = item_data_mut(&mut data, path.slots[0]);
        assert_eq!(bytes.len(), payload.len(), "item {key} changes size");
        bytes.copy_from_slice(payload);
    }
    mark_buffer_dirty(handle, &leaf);
    Ok(())
}

/// Write every block group item whose `used` changed (kernel:
/// btrfs_write_dirty_block_groups). Returns whether anything was written.
async fn write_dirty_block_groups(handle: &TransHandle) -> Result<bool, Error> {
    let fs = &handle.fs;
    let extent_root = fs.root(EXTENT_TREE_OBJECTID);
    let mut wrote = false;
    for group in fs.block_groups.all() {
        let key = block_group_item_key(group.start, group.length);
        let payload = block_group_item_bytes(&group);
        if lookup_item(&extent_root, &key).await?.as_deref() != Some(payload.as_slice()) {
            overwrite_item(handle, &extent_root, &key, &payload).await?;
            wrote = true;
        }
    }
    Ok(wrote)
}

/// Write the root items of changed trees and the block group items, and
/// run the delayed refs that queues, until nothing changes (kernel:
/// commit_fs_roots and the loop of commit_cowonly_roots). The root tree
/// itself is COWed in every commit: the super block names its root with
/// the committing generation.
pub(crate) async fn commit_roots(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    for round in 0..COMMIT_ROUNDS_MAX {
        if round > 0 && round % 16 == 0 {
            fs.env.trace(TraceEvent::Note {
                what: "commit_roots_round",
                a: handle.transid,
                b: round as u64,
                c: 0,
            });
        }
        let stale: Vec<Rc<Root>> = fs
            .roots
            .borrow()
            .values()
            .filter(|root| root.objectid != ROOT_TREE_OBJECTID && root.objectid != CHUNK_TREE_OBJECTID)
            .chain(fs.reloc.roots.borrow().values())
            .filter(|root| root.dirty.get() || root.root_item.borrow().bytenr != root.node().start)
            .cloned()
            .collect();
        for root in &stale {
            update_root(handle, root).await?;
        }
        let wrote_groups = write_dirty_block_groups(handle).await?;
        let refs_pending = !handle.transaction.delayed_refs.is_empty();
        run_delayed_refs(handle).await?;
        if stale.is_empty() && !wrote_groups && !refs_pending {
            if fs.root(ROOT_TREE_OBJECTID).node().generation() != handle.transid {
                // Nothing changed the root tree: touch the extent root's item.
                update_root(handle, &fs.root(EXTENT_TREE_OBJECTID)).await?;
                continue;
            }
            return Ok(());
        }
    }
    // The kernel loops for as long as it takes; a bound turns a livelock
    // into a report instead of a hang.
    fs.env.report_violation(Violation {
        kind: "commit_livelock",
        message: format!(
            "transaction {}: root items still changing after {COMMIT_ROUNDS_MAX} rounds of commit_cowonly_roots",
            handle.transid
        ),
    });
    Err(Error::Eagain)
}

/// Rounds of writing root items and running delayed refs before a commit
/// that never settles is reported. Under reclaim that writes back every
/// fresh block, each round may COW the extent and root trees again (seen:
/// 3568 rounds, then ENOSPC).
const COMMIT_ROUNDS_MAX: u32 = 100_000;

/// What the space flusher asks of the filesystem (kernel: the calls in
/// space-info.c's flush_space). Each step joins the running transaction, if
/// there is one, rather than starting a new one.
pub struct FsFlushOps {
    fs: std::rc::Weak<FsInfo>,
}

impl FsFlushOps {
    /// Run `step` in a joined handle, aborting the transaction if it fails.
    fn in_joined_handle<F, Fut>(&self, what: Operation, step: F) -> LocalBoxFuture<'static, ()>
    where
        F: FnOnce(Rc<TransHandle>) -> Fut + 'static,
        Fut: std::future::Future<Output = Result<(), Error>> + 'static,
    {
        let fs = self.fs.clone();
        Box::pin(async move {
            let Some(fs) = fs.upgrade() else { return };
            if fs.trans.running.borrow().is_none() || check_fs_error(&fs).is_err() {
                return;
            }
            let Ok(handle) = join_transaction(&fs, what).await else { return };
            let handle = Rc::new(handle);
            if let Err(error) = step(handle.clone()).await {
                abort_transaction(&handle, &error, what);
            }
            let handle = Rc::try_unwrap(handle).unwrap_or_else(|_| panic!("{what} kept its handle"));
            end_transaction(handle);
        })
    }
}

impl FlushOps for FsFlushOps {
    fn flush_delayed_items(&self, nr_items: Option<u64>) -> LocalBoxFuture<'static, ()> {
        self.in_joined_handle("flush_delayed_items", move |handle| async move {
            run_delayed_items_nr(&handle, nr_items).await
        })
    }

    fn run_delayed_refs(&self, _min_bytes: Option<u64>) -> LocalBoxFuture<'static, ()> {
        self.in_joined_handle("flush_delayed_refs", |handle| async move { run_delayed_refs(&handle).await })
    }

    fn alloc_chunk(&self, _force: bool) -> LocalBoxFuture<'static, ()> {
        let fs = self.fs.clone();
        Box::pin(async move {
            if let Some(fs) = fs.upgrade() {
                // ENOSPC marks the space info full; nothing else to do here.
                let _ = alloc_chunk(&fs, BLOCK_GROUP_METADATA).await;
            }
        })
    }

    fn commit_transaction(&self) -> LocalBoxFuture<'static, ()> {
        let fs = self.fs.clone();
        Box::pin(async move {
            if let Some(fs) = fs.upgrade() {
                let _ = sync(&fs).await;
            }
        })
    }

    fn fs_error(&self) -> bool {
        self.fs.upgrade().is_some_and(|fs| fs.trans.fs_error.get().is_some())
    }
}

/// Give the metadata space info its flusher and start the async reclaim
/// daemon (kernel: btrfs_init_async_reclaim_work at mount).
pub fn start_space_flusher(fs: &Rc<FsInfo>) {
    if let Some(space) = fs.space.get() {
        space.metadata.set_flush_ops(Rc::new(FsFlushOps { fs: fs.weak() }));
        space.metadata.spawn_async_reclaim();
    }
}

/// The kernel's default commit interval (`commit=30`).
pub const COMMIT_INTERVAL_NS: u64 = 30_000_000_000;

/// The transaction kthread (kernel: transaction_kthread): wakes every
/// commit interval and commits the running transaction if it is at least
/// that old. Started at mount as a daemon.
pub fn start_transaction_kthread(fs: &Rc<FsInfo>) {
    let weak = fs.weak();
    let env = fs.env.clone();
    let kthread = async move {
        loop {
            env.sleep(COMMIT_INTERVAL_NS).await;
            let Some(fs) = weak.upgrade() else { return };
            if check_fs_error(&fs).is_err() {
                return;
            }
            let _ = sync(&fs).await;
        }
    };
    fs.env.spawn("btrfs-transaction", crate::env::TaskKind::Daemon, Box::pin(kthread));
}

/// The reservation oracle: a handle never consumes more of its reservation
/// than it reserved (reservations are the worst case). What it consumes is
/// the tree blocks its subvolume COWs took plus what it migrated to the
/// delayed-items reserve. Reported once per handle, naming its last search.
pub fn check_reservation(handle: &TransHandle) {
    let reserved = handle.bytes_reserved();
    let consumed = handle.bytes_used.get() + handle.bytes_migrated.get();
    if reserved == 0 || consumed <= reserved || handle.overdraw_reported.replace(true) {
        return;
    }
    handle.fs.env.report_violation(Violation {
        kind: "reservation_overdraw",
        message: format!(
            "handle {} ({}, transaction {}) consumed {consumed} bytes of metadata ({} in COWs, {} migrated to delayed items) but reserved {reserved}: {}",
            handle.id,
            handle.op,
            handle.transid,
            handle.bytes_used.get(),
            handle.bytes_migrated.get(),
            handle.search.get()
        ),
    });
}
