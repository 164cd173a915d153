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

use crate::block_rsv::{BlockRsvType, TransRsvAccount};
use crate::ctree::Root;
use crate::delayed_ref::DelayedRefRoot;
use crate::env::{TraceEvent, WaitOn};
use crate::error::Error;
use crate::extent_io::ExtentBuffer;
use crate::format::FS_TREE_OBJECTID;
use crate::fs::FsInfo;
use crate::space_info::FlushKind;
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
    /// The last transaction id handed out (kernel: fs_info->generation).
    pub generation: Cell<u64>,
    pub last_trans_committed: Cell<u64>,
    /// The first error that aborted a transaction: the filesystem is read-only.
    pub fs_error: Cell<Option<i32>>,
    pub next_handle_id: Cell<u64>,
    /// Woken when a commit completes.
    pub commit_done: WaitQueue,
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
                fs.env.wait_on(WaitOn::Transaction { what: "commit to unblock" });
                let waiting = transaction.clone();
                transaction.wait.wait_until(move || waiting.state() >= TransState::Unblocked).await;
            }
            _ => {
                let transid = fs.trans.generation.get() + 1;
                fs.trans.generation.set(transid);
                let transaction = Rc::new(Transaction::new(transid));
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
    let account = handle.rsv.borrow_mut().take();
    if let (Some(mut account), Some(space)) = (account, handle.fs.space.get()) {
        account.release(&space.rsvs);
    }
    handle.block_rsv.set(None);
}

/// End a handle: give back its reservation, release what it inhibited, then
/// stop counting as a writer (kernel: __btrfs_end_transaction).
pub fn end_transaction(handle: TransHandle) {
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
    crate::extent_io::set_extent_buffer_dirty(eb);
    handle.transaction.dirty_ebs.borrow_mut().insert(eb.start);
}

/// Abort the running transaction with `error` (kernel: btrfs_abort_transaction
/// and btrfs_handle_fs_error): the filesystem turns read-only and every later
/// modifying call fails with EROFS. The first error sticks; `location` names
/// the caller, as the kernel's "error in btrfs_add_link:6606" does.
pub fn abort_transaction(handle: &TransHandle, error: &Error, location: &'static str) {
    let fs = &handle.fs;
    if fs.trans.fs_error.get().is_none() {
        fs.trans.fs_error.set(Some(error.errno()));
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
