//! Space accounting per block group type, after fs/btrfs/space-info.c: the
//! kernel's `struct btrfs_space_info`, its counters, overcommit, reserve
//! tickets and the metadata flush state machine.
//!
//! Every byte of a type is in exactly one counter: `bytes_used` (referenced
//! by a committed or running extent item), `bytes_reserved` (allocated by
//! the allocator, extent item not yet inserted), `bytes_pinned` (freed in
//! the running transaction, reusable after its commit), `bytes_readonly`,
//! or `bytes_may_use` (promised to a reservation, not yet allocated; the
//! block reserves of [`crate::block_rsv`] hold it). A reservation succeeds
//! when the sum fits in `total_bytes`, or, for metadata, when it fits in
//! `total_bytes` plus a share of the unallocated device space
//! (overcommit). Otherwise it queues a ticket, FIFO, and the flusher
//! ([`async_reclaim_metadata_space`]) works through the kernel's flush
//! states until the tickets are granted or it gives up and fails them all
//! with ENOSPC.
//!
//! Departures from the kernel, each for a reason:
//! - no preemptive reclaim (`btrfs_preempt_reclaim_metadata_space`,
//!   `need_preemptive_reclaim`, the `clamp`): it only flushes earlier, it
//!   grants nothing, and its thresholds depend on delalloc, which the
//!   engine does not model; tickets and the async flusher are kept whole;
//! - no data space reclaim (`FLUSH_DATA`, `FLUSH_FREE_SPACE_INODE`) and no
//!   `FLUSH_EVICT`: the engine has no delalloc or inode eviction yet;
//! - no zoned mode: `RESET_ZONES` is kept in the state lists so that the
//!   recorded order is the kernel's, and does nothing, as on a regular
//!   device;
//! - ticket errors are all [`Enospc`]: the kernel fails tickets with the
//!   abort errno once the filesystem is in error; here [`FlushOps::fs_error`]
//!   still makes the flusher fail every ticket at once, and the caller
//!   finds the abort in the filesystem's own error state;
//! - a counter that would underflow is an assertion (an engine bug), where
//!   the kernel WARNs and clamps it to zero;
//! - a reservation future dropped while its ticket is queued removes the
//!   ticket, and one dropped after its ticket was granted gives the bytes
//!   back (the kernel's `-EINTR` path of `wait_reserve_ticket`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

use crate::block_rsv::{BlockRsv, calc_insert_metadata_size};
use crate::env::{Env, LocalBoxFuture, TaskId, TaskKind, TraceEvent, WaitOn};
use crate::error::Error;
use crate::format::{BLOCK_GROUP_DATA, BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM, BLOCK_GROUP_TYPE_MASK};

const SZ_1G: u64 = 1 << 30;

/// How many flush states the flusher keeps in [`SpaceInfoHandle::flush_history`].
pub const FLUSH_HISTORY_MAX: usize = 1024;

/// A metadata reservation could not be made: the kernel's -ENOSPC from
/// `btrfs_reserve_metadata_bytes`, `btrfs_block_rsv_use_bytes` and friends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Enospc;

impl fmt::Display for Enospc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no space left on device (ENOSPC)")
    }
}

impl std::error::Error for Enospc {}

impl From<Enospc> for Error {
    fn from(_: Enospc) -> Error {
        Error::Enospc
    }
}

/// How hard a reservation may try (the kernel's `enum
/// btrfs_reserve_flush_enum`, the metadata members).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlushKind {
    /// `BTRFS_RESERVE_NO_FLUSH`: fail at once if it does not fit, and do
    /// not jump queued tickets. Callers holding a transaction handle use it.
    NoFlush,
    /// `BTRFS_RESERVE_FLUSH_LIMIT`: a priority ticket; the caller flushes
    /// itself through the states that cannot deadlock with its handle
    /// (delayed items, chunk allocation), never a commit.
    FlushLimit,
    /// `BTRFS_RESERVE_FLUSH_ALL`: queue a ticket and wait for the async
    /// flusher, which may commit the transaction.
    FlushAll,
    /// `BTRFS_RESERVE_FLUSH_ALL_STEAL`: as `FlushAll`, and when flushing
    /// fails the ticket may be served from the global reserve.
    FlushAllSteal,
    /// `BTRFS_RESERVE_FLUSH_EMERGENCY`: for `use_block_rsv` only; succeed
    /// if the bytes fit ignoring `bytes_may_use`, never queue.
    FlushEmergency,
}

impl FlushKind {
    /// `can_ticket`: NO_FLUSH and FLUSH_EMERGENCY fail rather than queue.
    fn can_ticket(self) -> bool {
        !matches!(self, FlushKind::NoFlush | FlushKind::FlushEmergency)
    }

    /// `can_steal` (FLUSH_EVICT is not modelled).
    fn can_steal(self) -> bool {
        self == FlushKind::FlushAllSteal
    }

    /// `is_normal_flushing`.
    fn is_normal_flushing(self) -> bool {
        matches!(self, FlushKind::FlushAll | FlushKind::FlushAllSteal)
    }
}

/// The kernel's `enum btrfs_flush_state`, with its values: the async
/// flusher runs them in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum FlushState {
    FlushDelayedItemsNr = 1,
    FlushDelayedItems = 2,
    FlushDelayedRefsNr = 3,
    FlushDelayedRefs = 4,
    FlushDelalloc = 5,
    FlushDelallocWait = 6,
    FlushDelallocFull = 7,
    AllocChunk = 8,
    AllocChunkForce = 9,
    RunDelayedIputs = 10,
    CommitTrans = 11,
    ResetZones = 12,
}

impl FlushState {
    const ALL: [FlushState; 12] = [
        FlushState::FlushDelayedItemsNr,
        FlushState::FlushDelayedItems,
        FlushState::FlushDelayedRefsNr,
        FlushState::FlushDelayedRefs,
        FlushState::FlushDelalloc,
        FlushState::FlushDelallocWait,
        FlushState::FlushDelallocFull,
        FlushState::AllocChunk,
        FlushState::AllocChunkForce,
        FlushState::RunDelayedIputs,
        FlushState::CommitTrans,
        FlushState::ResetZones,
    ];

    /// The state after this one (`flush_state++`), `None` past the last.
    fn next(self) -> Option<FlushState> {
        FlushState::ALL.get(self as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            FlushState::FlushDelayedItemsNr => "FLUSH_DELAYED_ITEMS_NR",
            FlushState::FlushDelayedItems => "FLUSH_DELAYED_ITEMS",
            FlushState::FlushDelayedRefsNr => "FLUSH_DELAYED_REFS_NR",
            FlushState::FlushDelayedRefs => "FLUSH_DELAYED_REFS",
            FlushState::FlushDelalloc => "FLUSH_DELALLOC",
            FlushState::FlushDelallocWait => "FLUSH_DELALLOC_WAIT",
            FlushState::FlushDelallocFull => "FLUSH_DELALLOC_FULL",
            FlushState::AllocChunk => "ALLOC_CHUNK",
            FlushState::AllocChunkForce => "ALLOC_CHUNK_FORCE",
            FlushState::RunDelayedIputs => "RUN_DELAYED_IPUTS",
            FlushState::CommitTrans => "COMMIT_TRANS",
            FlushState::ResetZones => "RESET_ZONES",
        }
    }
}

/// The states a FLUSH_LIMIT reservation runs itself (`priority_flush_states`).
pub const PRIORITY_FLUSH_STATES: [FlushState; 4] = [
    FlushState::FlushDelayedItemsNr,
    FlushState::FlushDelayedItems,
    FlushState::ResetZones,
    FlushState::AllocChunk,
];

/// The last state of the async metadata flusher on a regular (not zoned)
/// device (`final_state` in `do_async_reclaim_metadata_space`).
const ASYNC_FINAL_STATE: FlushState = FlushState::CommitTrans;

/// What the flusher asks of the filesystem, one method per kind of flush
/// state (the work `flush_space` does). Implemented by the filesystem; each
/// returns a boxed future so that the trait stays object-safe. The
/// returned futures must hold no `RefCell` borrow of the space info.
pub trait FlushOps {
    /// FLUSH_DELAYED_ITEMS_NR (`Some(nr_items)`) and FLUSH_DELAYED_ITEMS
    /// (`None`: all): `btrfs_run_delayed_items_nr` in a transaction joined
    /// without starting one (nothing to do if none is running).
    fn flush_delayed_items(&self, nr_items: Option<u64>) -> LocalBoxFuture<'static, ()>;

    /// FLUSH_DELAYED_REFS_NR (`Some(min_bytes)` of reservation to release)
    /// and FLUSH_DELAYED_REFS (`None`: all): `btrfs_run_delayed_refs` in a
    /// transaction joined without starting one.
    fn run_delayed_refs(&self, min_bytes: Option<u64>) -> LocalBoxFuture<'static, ()>;

    /// ALLOC_CHUNK (`force == false`, CHUNK_ALLOC_NO_FORCE) and
    /// ALLOC_CHUNK_FORCE: `btrfs_chunk_alloc` for this space info. A new
    /// chunk is reported with [`SpaceInfoHandle::add_block_group`]; running
    /// out of unallocated space with [`SpaceInfoHandle::set_full`].
    fn alloc_chunk(&self, force: bool) -> LocalBoxFuture<'static, ()>;

    /// COMMIT_TRANS: `btrfs_commit_current_transaction` (attach to the
    /// running transaction, if any, and commit it, or wait for the commit
    /// in progress).
    fn commit_transaction(&self) -> LocalBoxFuture<'static, ()>;

    /// FLUSH_DELALLOC, FLUSH_DELALLOC_WAIT, FLUSH_DELALLOC_FULL
    /// (`to_reclaim_bytes == u64::MAX`): `shrink_delalloc`. No delalloc in
    /// the engine yet: nothing by default.
    fn flush_delalloc(&self, _to_reclaim_bytes: u64, _wait_ordered: bool) -> LocalBoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// RUN_DELAYED_IPUTS. Nothing by default.
    fn run_delayed_iputs(&self) -> LocalBoxFuture<'static, ()> {
        Box::pin(std::future::ready(()))
    }

    /// `BTRFS_FS_ERROR(fs_info)`: the filesystem is in error (a transaction
    /// aborted); the flusher then fails every ticket at once.
    fn fs_error(&self) -> bool {
        false
    }
}

/// `calc_effective_data_chunk_size` on a regular device: the data chunk
/// size is at most 10 % of the writable device bytes and at most 1 GiB
/// (`BTRFS_MAX_DATA_CHUNK_SIZE`, 10 GiB, never binds below that).
pub fn calc_effective_data_chunk_size(total_rw_bytes: u64) -> u64 {
    (total_rw_bytes / 10).min(SZ_1G)
}

/// The counters of one block group type (`struct btrfs_space_info`).
/// Sizes are logical bytes, mirrors not counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpaceInfo {
    /// `BLOCK_GROUP_DATA`, `BLOCK_GROUP_METADATA` or `BLOCK_GROUP_SYSTEM`.
    pub flags: u64,
    /// Sum of the lengths of this type's block groups.
    pub total_bytes: u64,
    /// Referenced by extent items.
    pub bytes_used: u64,
    /// Freed in the running transaction; free again after its commit.
    pub bytes_pinned: u64,
    /// Allocated by the allocator, extent item not yet inserted.
    pub bytes_reserved: u64,
    /// Promised to reservations (block reserves), not yet allocated.
    pub bytes_may_use: u64,
    /// In read-only block groups (and the super block copies).
    pub bytes_readonly: u64,
    /// No more chunks can be allocated for this type.
    pub full: bool,
    /// The async flusher is queued or running (`space_info->flush`).
    pub flush: bool,
    /// The next chunk allocation must not be skipped (`force_alloc ==
    /// CHUNK_ALLOC_FORCE`), set when the global reserve outgrows the space.
    pub force_alloc: bool,
    /// Bytes of all queued tickets (`reclaim_size`).
    pub reclaim_size: u64,
    /// Incremented every time a ticket is served (`tickets_id`): the
    /// flusher's measure of progress.
    pub tickets_id: u64,
    /// `btrfs_bg_type_to_factor` of the allocation profile: 1 for single,
    /// 2 for DUP and RAID1. Unallocated device bytes are divided by it.
    pub profile_factor: u64,
    /// [`calc_effective_data_chunk_size`] of the filesystem: kept out of
    /// the overcommit so that a data chunk can still be allocated.
    pub data_chunk_size_bytes: u64,
}

impl SpaceInfo {
    /// An empty space info of one type (`init_space_info`), single profile,
    /// for a filesystem of `total_rw_bytes` writable device bytes.
    pub fn new(flags: u64, total_rw_bytes: u64) -> SpaceInfo {
        let kind = flags & BLOCK_GROUP_TYPE_MASK;
        assert!(
            kind == BLOCK_GROUP_DATA || kind == BLOCK_GROUP_METADATA || kind == BLOCK_GROUP_SYSTEM,
            "space info flags {flags:#x} name no single type"
        );
        SpaceInfo {
            flags: kind,
            total_bytes: 0,
            bytes_used: 0,
            bytes_pinned: 0,
            bytes_reserved: 0,
            bytes_may_use: 0,
            bytes_readonly: 0,
            full: false,
            flush: false,
            force_alloc: false,
            reclaim_size: 0,
            tickets_id: 0,
            profile_factor: 1,
            data_chunk_size_bytes: calc_effective_data_chunk_size(total_rw_bytes),
        }
    }

    /// `btrfs_space_info_used`.
    pub fn space_info_used(&self, may_use_included: bool) -> u64 {
        let used = self.bytes_used + self.bytes_reserved + self.bytes_pinned + self.bytes_readonly;
        if may_use_included { used + self.bytes_may_use } else { used }
    }

    /// `total_bytes` minus everything accounted, zero when overcommitted
    /// (the kernel's dump prints it signed).
    pub fn bytes_free(&self) -> u64 {
        self.total_bytes.saturating_sub(self.space_info_used(true))
    }

    /// `btrfs_can_overcommit`: whether `bytes` more may be promised beyond
    /// `total_bytes`, against `unallocated_device_bytes`
    /// (`fs_info->free_chunk_space`). Data never overcommits.
    pub fn can_overcommit(&self, bytes: u64, unallocated_device_bytes: u64, flush: FlushKind) -> bool {
        self.can_overcommit_used(self.space_info_used(true), bytes, unallocated_device_bytes, flush)
    }

    /// `can_overcommit` with `used` given: strictly less than total plus
    /// the available share (`check_can_overcommit`).
    fn can_overcommit_used(
        &self,
        used: u64,
        bytes: u64,
        unallocated_device_bytes: u64,
        flush: FlushKind,
    ) -> bool {
        if self.flags & BLOCK_GROUP_DATA != 0 {
            return false;
        }
        let avail = self.calc_available_free_space(unallocated_device_bytes, flush);
        used + bytes < self.total_bytes + avail
    }

    /// `calc_available_free_space` (fs/btrfs/space-info.c): the unallocated
    /// device bytes this type could still get as chunks, divided by the
    /// profile factor, less one data chunk, then
    /// - `>> 3` (1/8) with `BTRFS_RESERVE_FLUSH_ALL`: a reservation that can
    ///   flush is kept from overcommitting much;
    /// - `>> 1` (1/2) with every other flush kind (NO_FLUSH, FLUSH_LIMIT,
    ///   and, as in the kernel, FLUSH_ALL_STEAL and FLUSH_EMERGENCY too).
    pub fn calc_available_free_space(&self, unallocated_device_bytes: u64, flush: FlushKind) -> u64 {
        assert!(self.profile_factor >= 1, "profile factor {}", self.profile_factor);
        let avail = unallocated_device_bytes / self.profile_factor;
        if avail <= self.data_chunk_size_bytes {
            return 0;
        }
        let avail = avail - self.data_chunk_size_bytes;
        if flush == FlushKind::FlushAll { avail >> 3 } else { avail >> 1 }
    }

    /// Type name as the kernel prints it (`btrfs_space_info_type_str`).
    pub fn type_str(&self) -> &'static str {
        match self.flags {
            BLOCK_GROUP_DATA => "DATA",
            BLOCK_GROUP_METADATA => "METADATA",
            BLOCK_GROUP_SYSTEM => "SYSTEM",
            _ => "UNKNOWN",
        }
    }

    /// The two lines of `__btrfs_dump_space_info`.
    pub fn dump(&self) -> [String; 2] {
        let free = self.total_bytes as i128 - self.space_info_used(true) as i128;
        [
            format!(
                "space_info {} (sub-group id 0) has {free} free, is {}full",
                self.type_str(),
                if self.full { "" } else { "not " }
            ),
            format!(
                "space_info total={}, used={}, pinned={}, reserved={}, may_use={}, readonly={} zone_unusable=0",
                self.total_bytes,
                self.bytes_used,
                self.bytes_pinned,
                self.bytes_reserved,
                self.bytes_may_use,
                self.bytes_readonly
            ),
        ]
    }
}

/// `struct reserve_ticket`. Shared between the waiting task and whoever
/// serves or fails it.
struct ReserveTicket {
    /// What was asked; never changes.
    orig_bytes: u64,
    /// Bytes still wanted: `orig_bytes` until served, 0 once served.
    bytes: Cell<u64>,
    /// Set when the ticket was failed.
    error: Cell<Option<Enospc>>,
    /// May be served from the global reserve when flushing fails.
    steal: bool,
    /// On one of the two ticket lists.
    queued: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl ReserveTicket {
    fn is_served(&self) -> bool {
        self.bytes.get() == 0
    }
}

/// What the space info lock protects: the counters and the ticket lists.
struct SpaceInfoState {
    info: SpaceInfo,
    /// FLUSH_LIMIT tickets, served first.
    priority_tickets: VecDeque<Rc<ReserveTicket>>,
    /// FLUSH_ALL and FLUSH_ALL_STEAL tickets.
    tickets: VecDeque<Rc<ReserveTicket>>,
}

/// Counters of the reservation machinery, for reports. Monotonic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpaceInfoStats {
    /// Tickets queued (reservations that did not fit at once).
    pub tickets_queued: u64,
    /// Tickets served from free space.
    pub tickets_granted: u64,
    /// Tickets served from the global reserve (`steal_from_global_rsv`).
    pub tickets_stolen: u64,
    /// Tickets failed with ENOSPC.
    pub tickets_failed: u64,
    /// Reservations that failed without a ticket (NO_FLUSH, EMERGENCY).
    pub nowait_failures: u64,
    /// `flush_space` calls per state.
    pub flush_states: BTreeMap<FlushState, u64>,
    /// Times the async flusher gave up and failed the remaining tickets.
    pub fail_all_tickets: u64,
}

struct SpaceInfoShared {
    env: Rc<dyn Env>,
    nodesize: u32,
    /// `fs_info->free_chunk_space`, shared by the space infos of one
    /// filesystem and kept by the chunk allocator.
    free_chunk_space: Rc<Cell<u64>>,
    state: RefCell<SpaceInfoState>,
    /// `fs_info->global_block_rsv`, if it draws from this space info: where
    /// freed space goes first and where FLUSH_ALL_STEAL tickets steal from.
    global_rsv: RefCell<Weak<BlockRsv>>,
    flush_ops: RefCell<Option<Rc<dyn FlushOps>>>,
    /// The async reclaim work is queued (`queue_work` was called and the
    /// worker has not picked it up yet).
    work_pending: Cell<bool>,
    work_waker: RefCell<Option<Waker>>,
    flush_history: RefCell<VecDeque<FlushState>>,
    stats: RefCell<SpaceInfoStats>,
}

/// A space info as the filesystem holds it: the counters, the tickets and
/// the flusher's hooks. Cloning gives another handle to the same one.
#[derive(Clone)]
pub struct SpaceInfoHandle(Rc<SpaceInfoShared>);

impl SpaceInfoHandle {
    /// `create_space_info`: `info` (usually [`SpaceInfo::new`]) for a
    /// filesystem of `nodesize`, drawing unallocated space from
    /// `free_chunk_space`.
    pub fn new(env: Rc<dyn Env>, info: SpaceInfo, nodesize: u32, free_chunk_space: Rc<Cell<u64>>) -> Self {
        assert!(nodesize.is_power_of_two(), "nodesize {nodesize}");
        SpaceInfoHandle(Rc::new(SpaceInfoShared {
            env,
            nodesize,
            free_chunk_space,
            state: RefCell::new(SpaceInfoState {
                info,
                priority_tickets: VecDeque::new(),
                tickets: VecDeque::new(),
            }),
            global_rsv: RefCell::new(Weak::new()),
            flush_ops: RefCell::new(None),
            work_pending: Cell::new(false),
            work_waker: RefCell::new(None),
            flush_history: RefCell::new(VecDeque::new()),
            stats: RefCell::new(SpaceInfoStats::default()),
        }))
    }

    pub fn ptr_eq(&self, other: &SpaceInfoHandle) -> bool {
        Rc::ptr_eq(&self.0, &other.0)
    }

    /// A copy of the counters.
    pub fn info(&self) -> SpaceInfo {
        self.0.state.borrow().info.clone()
    }

    pub fn flags(&self) -> u64 {
        self.0.state.borrow().info.flags
    }

    pub fn nodesize(&self) -> u32 {
        self.0.nodesize
    }

    /// Unallocated device bytes (`fs_info->free_chunk_space`).
    pub fn free_chunk_space(&self) -> u64 {
        self.0.free_chunk_space.get()
    }

    pub fn stats(&self) -> SpaceInfoStats {
        self.0.stats.borrow().clone()
    }

    /// Tickets waiting, priority and normal.
    pub fn queued_tickets(&self) -> usize {
        let st = self.0.state.borrow();
        st.priority_tickets.len() + st.tickets.len()
    }

    /// The last [`FLUSH_HISTORY_MAX`] states `flush_space` ran, oldest first.
    pub fn flush_history(&self) -> Vec<FlushState> {
        self.0.flush_history.borrow().iter().copied().collect()
    }

    /// The state `flush_space` ran last, if any.
    pub fn last_flush_state(&self) -> Option<FlushState> {
        self.0.flush_history.borrow().back().copied()
    }

    /// Give the flusher its hooks into the filesystem (at mount).
    pub fn set_flush_ops(&self, ops: Rc<dyn FlushOps>) {
        *self.0.flush_ops.borrow_mut() = Some(ops);
    }

    /// Link the global reserve (`btrfs_init_global_block_rsv`); it must
    /// draw from this space info.
    pub(crate) fn set_global_rsv(&self, rsv: &Rc<BlockRsv>) {
        assert!(rsv.space_info().ptr_eq(self), "global reserve of another space info");
        *self.0.global_rsv.borrow_mut() = Rc::downgrade(rsv);
    }

    fn global_rsv(&self) -> Option<Rc<BlockRsv>> {
        self.0.global_rsv.borrow().upgrade()
    }

    fn fs_error(&self) -> bool {
        self.flush_ops().is_some_and(|ops| ops.fs_error())
    }

    fn flush_ops(&self) -> Option<Rc<dyn FlushOps>> {
        self.0.flush_ops.borrow().clone()
    }

    /// `btrfs_can_overcommit` against the current unallocated space.
    pub fn can_overcommit(&self, bytes: u64, flush: FlushKind) -> bool {
        self.0.state.borrow().info.can_overcommit(bytes, self.free_chunk_space(), flush)
    }

    // ---------------------------------------------------------------------
    // Counters. Each asserts that nothing underflows.

    /// `btrfs_space_info_update_bytes_may_use`: no ticket is granted.
    pub fn update_bytes_may_use(&self, delta_bytes: i64) {
        let mut st = self.0.state.borrow_mut();
        apply_delta(&mut st.info.bytes_may_use, delta_bytes, "bytes_may_use");
    }

    /// `btrfs_space_info_free_bytes_may_use`: give back promised bytes and
    /// grant what now fits.
    pub fn free_bytes_may_use(&self, bytes: u64) {
        {
            let mut st = self.0.state.borrow_mut();
            apply_delta(&mut st.info.bytes_may_use, -to_i64(bytes), "bytes_may_use");
        }
        self.try_granting_tickets();
    }

    /// `btrfs_space_info_update_bytes_pinned`.
    pub fn update_bytes_pinned(&self, delta_bytes: i64) {
        let mut st = self.0.state.borrow_mut();
        apply_delta(&mut st.info.bytes_pinned, delta_bytes, "bytes_pinned");
    }

    /// `btrfs_add_reserved_bytes`: the allocator found `num_bytes` for a
    /// reservation of `ram_bytes` (equal for tree blocks): may_use →
    /// reserved.
    pub fn add_reserved_bytes(&self, ram_bytes: u64, num_bytes: u64) {
        let mut st = self.0.state.borrow_mut();
        apply_delta(&mut st.info.bytes_may_use, -to_i64(ram_bytes), "bytes_may_use");
        st.info.bytes_reserved += num_bytes;
    }

    /// `btrfs_free_reserved_bytes`: an allocated extent that never got an
    /// extent item (a tree block freed before it was written) goes back to
    /// free space.
    pub fn free_reserved_bytes(&self, num_bytes: u64) {
        {
            let mut st = self.0.state.borrow_mut();
            apply_delta(&mut st.info.bytes_reserved, -to_i64(num_bytes), "bytes_reserved");
        }
        self.try_granting_tickets();
    }

    /// The space info half of `btrfs_update_block_group`: an extent item
    /// inserted (`alloc`: reserved → used) or dropped (used → pinned).
    pub fn update_block_group(&self, bytes: u64, alloc: bool) {
        let mut st = self.0.state.borrow_mut();
        if alloc {
            apply_delta(&mut st.info.bytes_reserved, -to_i64(bytes), "bytes_reserved");
            st.info.bytes_used += bytes;
        } else {
            apply_delta(&mut st.info.bytes_used, -to_i64(bytes), "bytes_used");
            st.info.bytes_pinned += bytes;
        }
    }

    /// `pin_down_extent` with `reserved`: an allocated, written tree block of
    /// the running transaction freed before its extent item exists stays
    /// pinned until the commit (reserved → pinned).
    pub fn pin_reserved_bytes(&self, bytes: u64) {
        let mut st = self.0.state.borrow_mut();
        apply_delta(&mut st.info.bytes_reserved, -to_i64(bytes), "bytes_reserved");
        st.info.bytes_pinned += bytes;
    }

    /// `unpin_extent_range` after a commit: pinned bytes become free (or
    /// read-only, in a read-only block group). Free bytes go to the global
    /// reserve first, then to the tickets (`btrfs_return_free_space`).
    pub fn unpin_extent(&self, bytes: u64, readonly: bool) {
        {
            let mut st = self.0.state.borrow_mut();
            apply_delta(&mut st.info.bytes_pinned, -to_i64(bytes), "bytes_pinned");
            if readonly {
                st.info.bytes_readonly += bytes;
                return;
            }
        }
        self.return_free_space(bytes);
    }

    /// `btrfs_return_free_space`: refill the global reserve first.
    fn return_free_space(&self, mut len: u64) {
        if let Some(global) = self.global_rsv()
            && !global.is_full()
        {
            let to_add = len.min(global.size().saturating_sub(global.reserved()));
            global.refill_from_free_space(to_add);
            self.update_bytes_may_use(to_i64(to_add));
            len -= to_add;
        }
        if len > 0 {
            self.try_granting_tickets();
        }
    }

    /// `btrfs_add_bg_to_space_info`: a block group of `length` bytes with
    /// `used` and `bytes_super` bytes taken.
    pub fn add_block_group(&self, length: u64, used: u64, bytes_super: u64) {
        {
            let mut st = self.0.state.borrow_mut();
            st.info.total_bytes += length;
            st.info.bytes_used += used;
            st.info.bytes_readonly += bytes_super;
            if length > 0 {
                st.info.full = false;
            }
        }
        self.try_granting_tickets();
    }

    /// `inc_block_group_ro`: `free_bytes` of a block group become read-only,
    /// if the rest of the space can still hold every promise
    /// (`btrfs_can_overcommit` with NO_FLUSH); else ENOSPC.
    pub fn inc_block_group_ro(&self, free_bytes: u64) -> Result<(), Enospc> {
        if !self.can_overcommit(free_bytes, FlushKind::NoFlush) {
            return Err(Enospc);
        }
        self.0.state.borrow_mut().info.bytes_readonly += free_bytes;
        Ok(())
    }

    /// `btrfs_dec_block_group_ro`: a read-only group's `free_bytes` are
    /// free space again.
    pub fn dec_block_group_ro(&self, free_bytes: u64) {
        {
            let mut st = self.0.state.borrow_mut();
            apply_delta(&mut st.info.bytes_readonly, -to_i64(free_bytes), "bytes_readonly");
        }
        self.return_free_space(free_bytes);
    }

    /// No more chunks can be allocated for this type (`space_info->full`).
    pub fn set_full(&self, full: bool) {
        self.0.state.borrow_mut().info.full = full;
    }

    pub(crate) fn set_force_alloc(&self, force: bool) {
        self.0.state.borrow_mut().info.force_alloc = force;
    }

    /// Set the profile factor (2 for DUP metadata).
    pub fn set_profile_factor(&self, factor: u64) {
        assert!(factor == 1 || factor == 2, "profile factor {factor}");
        self.0.state.borrow_mut().info.profile_factor = factor;
    }

    // ---------------------------------------------------------------------
    // Tickets.

    /// `btrfs_try_granting_tickets`: serve queued tickets in order, priority
    /// tickets first, stopping at the first that does not fit (a later
    /// small reservation never jumps an earlier big one).
    pub fn try_granting_tickets(&self) {
        let free_chunk_space = self.free_chunk_space();
        let wakers = {
            let mut st = self.0.state.borrow_mut();
            let SpaceInfoState { info, priority_tickets, tickets } = &mut *st;
            let mut wakers = Vec::new();
            let mut used = info.space_info_used(true);
            for (queue, flush) in [(priority_tickets, FlushKind::NoFlush), (tickets, FlushKind::FlushAll)] {
                while let Some(ticket) = queue.front() {
                    let bytes = ticket.bytes.get();
                    let fits = used + bytes <= info.total_bytes
                        || info.can_overcommit_used(used, bytes, free_chunk_space, flush);
                    if !fits {
                        break;
                    }
                    let ticket = queue.pop_front().expect("front exists");
                    info.bytes_may_use += bytes;
                    used += bytes;
                    wakers.extend(remove_ticket(info, &ticket, None));
                    info.tickets_id += 1;
                    self.0.stats.borrow_mut().tickets_granted += 1;
                }
            }
            wakers
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Take a ticket off its list (wherever it is) and fail it.
    fn fail_ticket(&self, ticket: &Rc<ReserveTicket>) -> Option<Waker> {
        let mut st = self.0.state.borrow_mut();
        let SpaceInfoState { info, priority_tickets, tickets } = &mut *st;
        unlink_ticket(priority_tickets, ticket);
        unlink_ticket(tickets, ticket);
        let waker = remove_ticket(info, ticket, Some(Enospc));
        if !ticket.is_served() {
            self.0.stats.borrow_mut().tickets_failed += 1;
        }
        waker
    }

    /// `steal_from_global_rsv`: serve a FLUSH_ALL_STEAL ticket from the
    /// global reserve if that keeps at least 10 % of its size in it.
    fn steal_from_global_rsv(&self, ticket: &Rc<ReserveTicket>) -> Option<Option<Waker>> {
        if !ticket.steal {
            return None;
        }
        let global = self.global_rsv()?;
        let min_bytes = global.size() / 10;
        let bytes = ticket.bytes.get();
        if global.reserved() < min_bytes + bytes {
            return None;
        }
        global.take_for_ticket(bytes);
        let mut st = self.0.state.borrow_mut();
        let SpaceInfoState { info, priority_tickets, tickets } = &mut *st;
        unlink_ticket(priority_tickets, ticket);
        unlink_ticket(tickets, ticket);
        let waker = remove_ticket(info, ticket, None);
        info.tickets_id += 1;
        self.0.stats.borrow_mut().tickets_stolen += 1;
        Some(waker)
    }

    /// `maybe_fail_all_tickets`: flushing is exhausted. Fail the normal
    /// tickets in order (stealing for those that may), re-trying the
    /// others after each failure since a big ticket may have blocked small
    /// ones. Returns whether a ticket got served (progress).
    fn maybe_fail_all_tickets(&self) -> bool {
        let tickets_id = self.0.state.borrow().info.tickets_id;
        let abort = self.fs_error();
        self.0.stats.borrow_mut().fail_all_tickets += 1;
        self.0.env.trace(TraceEvent::Note {
            what: "fail_all_tickets",
            a: self.flags(),
            b: self.0.state.borrow().info.reclaim_size,
            c: u64::from(abort),
        });
        loop {
            let front = {
                let st = self.0.state.borrow();
                if st.info.tickets_id != tickets_id {
                    break;
                }
                st.tickets.front().cloned()
            };
            let Some(ticket) = front else { break };
            if !abort && let Some(waker) = self.steal_from_global_rsv(&ticket) {
                waker.into_iter().for_each(Waker::wake);
                return true;
            }
            self.0.env.trace(TraceEvent::Note {
                what: "ticket_failed",
                a: self.flags(),
                b: ticket.orig_bytes,
                c: 0,
            });
            self.fail_ticket(&ticket).into_iter().for_each(Waker::wake);
            if !abort {
                self.try_granting_tickets();
            }
        }
        self.0.state.borrow().info.tickets_id != tickets_id
    }

    /// `btrfs_calc_reclaim_metadata_size`: the queued tickets, plus how far
    /// we are overcommitted beyond what the flush-all share allows.
    fn calc_reclaim_metadata_size(&self) -> u64 {
        let st = self.0.state.borrow();
        let info = &st.info;
        let avail = info.calc_available_free_space(self.free_chunk_space(), FlushKind::FlushAll);
        let used = info.space_info_used(true);
        let mut to_reclaim = info.reclaim_size;
        if info.total_bytes + avail < used {
            to_reclaim += used - (info.total_bytes + avail);
        }
        to_reclaim
    }

    /// `queue_work(async_reclaim_work)`: wake the flusher.
    fn queue_async_reclaim(&self) {
        self.0.work_pending.set(true);
        let waker = self.0.work_waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Start the async metadata flusher as a daemon task of the environment
    /// (the kernel's `async_reclaim_work` on `system_dfl_wq`).
    pub fn spawn_async_reclaim(&self) -> TaskId {
        let space = self.clone();
        self.0.env.spawn(
            "async_reclaim_metadata_space",
            TaskKind::Daemon,
            Box::pin(async move { async_reclaim_metadata_space(space).await }),
        )
    }

    fn record_flush_state(&self, state: FlushState, num_bytes: u64) {
        {
            let mut history = self.0.flush_history.borrow_mut();
            if history.len() == FLUSH_HISTORY_MAX {
                history.pop_front();
            }
            history.push_back(state);
        }
        *self.0.stats.borrow_mut().flush_states.entry(state).or_insert(0) += 1;
        self.0.env.trace(TraceEvent::Note {
            what: "flush_space",
            a: state as u64,
            b: num_bytes,
            c: self.flags(),
        });
    }
}

fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).expect("byte count beyond i64")
}

/// Add a signed delta to a counter; going below zero is an engine bug.
fn apply_delta(counter: &mut u64, delta: i64, name: &str) {
    if delta >= 0 {
        *counter += delta.unsigned_abs();
        return;
    }
    let sub = delta.unsigned_abs();
    assert!(*counter >= sub, "{name} underflow: {} - {sub}", *counter);
    *counter -= sub;
}

fn unlink_ticket(queue: &mut VecDeque<Rc<ReserveTicket>>, ticket: &Rc<ReserveTicket>) {
    if let Some(at) = queue.iter().position(|t| Rc::ptr_eq(t, ticket)) {
        queue.remove(at);
    }
}

/// `remove_ticket`: the ticket is off its list (the caller unlinked it);
/// take it out of `reclaim_size`, then serve it (`error == None`) or fail
/// it, unless it was served already. Returns the waker to wake once the
/// state is no longer borrowed.
fn remove_ticket(info: &mut SpaceInfo, ticket: &ReserveTicket, error: Option<Enospc>) -> Option<Waker> {
    if ticket.queued.replace(false) {
        apply_delta(&mut info.reclaim_size, -to_i64(ticket.bytes.get()), "reclaim_size");
    }
    match error {
        Some(e) if !ticket.is_served() => ticket.error.set(Some(e)),
        _ => ticket.bytes.set(0),
    }
    ticket.waker.borrow_mut().take()
}

/// Waits for a ticket to be served or failed (`wait_reserve_ticket`).
struct TicketWait {
    env: Rc<dyn Env>,
    ticket: Rc<ReserveTicket>,
}

impl Future for TicketWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.ticket.is_served() || self.ticket.error.get().is_some() {
            return Poll::Ready(());
        }
        *self.ticket.waker.borrow_mut() = Some(cx.waker().clone());
        self.env.wait_on(WaitOn::Ticket { bytes: self.ticket.orig_bytes });
        Poll::Pending
    }
}

/// Owns a ticket while its reservation is in flight; if the reservation
/// future is dropped before it returns, the ticket is withdrawn and bytes
/// granted to it are given back.
struct TicketGuard {
    space: SpaceInfoHandle,
    ticket: Rc<ReserveTicket>,
    done: bool,
}

impl TicketGuard {
    fn finish(mut self) -> Result<(), Enospc> {
        self.done = true;
        assert!(!self.ticket.queued.get(), "ticket still queued when its reservation returns");
        match self.ticket.error.get() {
            Some(e) => {
                assert!(!self.ticket.is_served(), "a failed ticket was served");
                Err(e)
            }
            None => {
                assert!(self.ticket.is_served(), "ticket neither served nor failed");
                Ok(())
            }
        }
    }
}

impl Drop for TicketGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let granted = {
            let Ok(mut st) = self.space.0.state.try_borrow_mut() else { return };
            let SpaceInfoState { info, priority_tickets, tickets } = &mut *st;
            if self.ticket.queued.get() {
                unlink_ticket(priority_tickets, &self.ticket);
                unlink_ticket(tickets, &self.ticket);
                remove_ticket(info, &self.ticket, Some(Enospc));
                false
            } else {
                self.ticket.is_served() && self.ticket.error.get().is_none()
            }
        };
        if granted {
            self.space.free_bytes_may_use(self.ticket.orig_bytes);
        }
    }
}

/// What `reserve_bytes` decided without waiting.
enum Immediate {
    Done(Result<(), Enospc>),
    Ticket(Rc<ReserveTicket>),
}

/// The non-blocking part of `reserve_bytes`: reserve if it fits (and no
/// ticket is queued ahead), else with FLUSH_EMERGENCY if it fits ignoring
/// `bytes_may_use`, else queue a ticket if the flush kind may, else fail.
fn reserve_bytes_start(space: &SpaceInfoHandle, orig_bytes: u64, flush: FlushKind) -> Immediate {
    assert!(orig_bytes > 0, "reserving zero bytes");
    let free_chunk_space = space.free_chunk_space();
    let mut queue_work = false;
    let result = {
        let mut st = space.0.state.borrow_mut();
        let SpaceInfoState { info, priority_tickets, tickets } = &mut *st;
        let used = info.space_info_used(true);
        // NO_FLUSH must not jump anybody either: it waits behind normal
        // tickets as a flusher would; the others only behind priority ones.
        let pending_tickets = if flush.is_normal_flushing() || flush == FlushKind::NoFlush {
            !tickets.is_empty() || !priority_tickets.is_empty()
        } else {
            !priority_tickets.is_empty()
        };
        let mut ok = !pending_tickets
            && (used + orig_bytes <= info.total_bytes
                || info.can_overcommit_used(used, orig_bytes, free_chunk_space, flush));
        // Things are dire: let it through if the block fits at all.
        if !ok && flush == FlushKind::FlushEmergency {
            ok = used - info.bytes_may_use + orig_bytes <= info.total_bytes;
        }
        if ok {
            info.bytes_may_use += orig_bytes;
            Immediate::Done(Ok(()))
        } else if flush.can_ticket() {
            let ticket = Rc::new(ReserveTicket {
                orig_bytes,
                bytes: Cell::new(orig_bytes),
                error: Cell::new(None),
                steal: flush.can_steal(),
                queued: Cell::new(true),
                waker: RefCell::new(None),
            });
            info.reclaim_size += orig_bytes;
            if flush == FlushKind::FlushLimit {
                priority_tickets.push_back(ticket.clone());
            } else {
                tickets.push_back(ticket.clone());
                if !info.flush {
                    info.flush = true;
                    queue_work = true;
                }
            }
            space.0.stats.borrow_mut().tickets_queued += 1;
            Immediate::Ticket(ticket)
        } else {
            space.0.stats.borrow_mut().nowait_failures += 1;
            Immediate::Done(Err(Enospc))
        }
    };
    if queue_work {
        space.0.env.trace(TraceEvent::Note { what: "trigger_flush", a: space.flags(), b: orig_bytes, c: 0 });
        space.queue_async_reclaim();
    }
    result
}

/// `btrfs_reserve_metadata_bytes` for the flush kinds that never wait
/// (NO_FLUSH, FLUSH_EMERGENCY): add `bytes` to `bytes_may_use` or fail.
pub fn reserve_metadata_bytes_nowait(
    space: &SpaceInfoHandle,
    bytes: u64,
    flush: FlushKind,
) -> Result<(), Enospc> {
    assert!(!flush.can_ticket(), "{flush:?} may wait: use reserve_metadata_bytes");
    match reserve_bytes_start(space, bytes, flush) {
        Immediate::Done(result) => result,
        Immediate::Ticket(_) => unreachable!("no ticket without flushing"),
    }
}

/// `btrfs_reserve_metadata_bytes` (`reserve_bytes` + `handle_reserve_ticket`):
/// add `bytes` to the space info's `bytes_may_use`, waiting on a ticket if
/// it does not fit and `flush` allows. FLUSH_ALL waits for the async
/// flusher; FLUSH_LIMIT runs [`PRIORITY_FLUSH_STATES`] itself.
pub async fn reserve_metadata_bytes(
    space: &SpaceInfoHandle,
    bytes: u64,
    flush: FlushKind,
) -> Result<(), Enospc> {
    let ticket = match reserve_bytes_start(space, bytes, flush) {
        Immediate::Done(result) => return result,
        Immediate::Ticket(ticket) => ticket,
    };
    let guard = TicketGuard { space: space.clone(), ticket: ticket.clone(), done: false };
    match flush {
        FlushKind::FlushAll | FlushKind::FlushAllSteal => {
            TicketWait { env: space.0.env.clone(), ticket }.await;
        }
        FlushKind::FlushLimit => {
            priority_reclaim_metadata_space(space, &ticket, &PRIORITY_FLUSH_STATES).await
        }
        FlushKind::NoFlush | FlushKind::FlushEmergency => unreachable!("{flush:?} queued a ticket"),
    }
    guard.finish()
}

/// `priority_reclaim_metadata_space`: flush through `states` ourselves,
/// stopping as soon as the ticket is served; then steal or fail it.
async fn priority_reclaim_metadata_space(
    space: &SpaceInfoHandle,
    ticket: &Rc<ReserveTicket>,
    states: &[FlushState],
) {
    if ticket.is_served() {
        return;
    }
    let to_reclaim = space.calc_reclaim_metadata_size();
    for &state in states {
        flush_space(space, to_reclaim, state).await;
        if ticket.is_served() {
            return;
        }
    }
    let waker = if space.fs_error() {
        space.fail_ticket(ticket)
    } else {
        match space.steal_from_global_rsv(ticket) {
            Some(waker) => waker,
            None => space.fail_ticket(ticket),
        }
    };
    drop(waker); // our own ticket: nobody else waits on it
    space.try_granting_tickets();
}

/// `calc_reclaim_items_nr`: how many items' worth of insert reservation
/// `to_reclaim` is, at least one.
pub fn calc_reclaim_items_nr(nodesize: u32, to_reclaim: u64) -> u64 {
    (to_reclaim / calc_insert_metadata_size(nodesize, 1)).max(1)
}

/// `flush_space`: run one flush state through the filesystem's
/// [`FlushOps`]. Advisory: the caller looks at the tickets afterwards.
pub async fn flush_space(space: &SpaceInfoHandle, num_bytes: u64, state: FlushState) {
    space.record_flush_state(state, num_bytes);
    let Some(ops) = space.flush_ops() else { return };
    match state {
        FlushState::FlushDelayedItemsNr => {
            let nr = calc_reclaim_items_nr(space.nodesize(), num_bytes) * 2;
            ops.flush_delayed_items(Some(nr)).await;
        }
        FlushState::FlushDelayedItems => ops.flush_delayed_items(None).await,
        FlushState::FlushDelayedRefsNr => ops.run_delayed_refs(Some(num_bytes)).await,
        FlushState::FlushDelayedRefs => ops.run_delayed_refs(None).await,
        FlushState::FlushDelalloc => ops.flush_delalloc(num_bytes, false).await,
        FlushState::FlushDelallocWait => ops.flush_delalloc(num_bytes, true).await,
        FlushState::FlushDelallocFull => ops.flush_delalloc(u64::MAX, true).await,
        FlushState::AllocChunk => ops.alloc_chunk(false).await,
        FlushState::AllocChunkForce => ops.alloc_chunk(true).await,
        FlushState::RunDelayedIputs => ops.run_delayed_iputs().await,
        FlushState::CommitTrans => ops.commit_transaction().await,
        // btrfs_reset_unused_block_groups: nothing on a regular device.
        FlushState::ResetZones => {}
    }
}

/// Clear `space_info->flush`: the flusher stops.
fn stop_flushing(space: &SpaceInfoHandle) {
    space.0.state.borrow_mut().info.flush = false;
}

/// `do_async_reclaim_metadata_space`: flush state after state while tickets
/// wait. Progress (a ticket served) starts over from the first state and
/// forgives a commit cycle. The first pass skips FLUSH_DELALLOC_FULL and
/// ALLOC_CHUNK_FORCE; after the third pass through COMMIT_TRANS without
/// progress the remaining tickets fail.
pub async fn do_async_reclaim_metadata_space(space: &SpaceInfoHandle) {
    let mut to_reclaim = space.calc_reclaim_metadata_size();
    if to_reclaim == 0 {
        stop_flushing(space);
        return;
    }
    let mut last_tickets_id = space.0.state.borrow().info.tickets_id;
    let mut commit_cycles = 0u32;
    let mut flush_state = Some(FlushState::FlushDelayedItemsNr);
    while let Some(state) = flush_state.filter(|&s| s <= ASYNC_FINAL_STATE) {
        flush_space(space, to_reclaim, state).await;
        let (no_tickets, tickets_id) = {
            let st = space.0.state.borrow();
            (st.tickets.is_empty(), st.info.tickets_id)
        };
        if no_tickets {
            stop_flushing(space);
            return;
        }
        to_reclaim = space.calc_reclaim_metadata_size();
        let mut next = if last_tickets_id == tickets_id {
            state.next()
        } else {
            last_tickets_id = tickets_id;
            commit_cycles = commit_cycles.saturating_sub(1);
            Some(FlushState::FlushDelayedItemsNr)
        };
        // One trip through the states before emptying delalloc.
        if next == Some(FlushState::FlushDelallocFull) && commit_cycles == 0 {
            next = next.and_then(FlushState::next);
        }
        // Rather commit and reuse pinned space than force a chunk we may
        // not need: not on the first trip.
        if next == Some(FlushState::AllocChunkForce) && commit_cycles == 0 {
            next = next.and_then(FlushState::next);
        }
        if next.is_none_or(|s| s > ASYNC_FINAL_STATE) {
            commit_cycles += 1;
            if commit_cycles > 2 {
                if space.maybe_fail_all_tickets() {
                    next = Some(FlushState::FlushDelayedItemsNr);
                    commit_cycles -= 1;
                } else {
                    stop_flushing(space);
                }
            } else {
                next = Some(FlushState::FlushDelayedItemsNr);
            }
        }
        flush_state = next;
    }
}

/// Suspends the flusher until reclaim work is queued.
struct WorkQueued<'a> {
    space: &'a SpaceInfoHandle,
}

impl Future for WorkQueued<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = &self.space.0;
        if shared.work_pending.replace(false) {
            return Poll::Ready(());
        }
        *shared.work_waker.borrow_mut() = Some(cx.waker().clone());
        shared.env.wait_on(WaitOn::Other("async reclaim work"));
        Poll::Pending
    }
}

/// The async metadata flusher (`btrfs_async_reclaim_metadata_space`) as a
/// daemon: each time a FLUSH_ALL reservation queues the work, run
/// [`do_async_reclaim_metadata_space`]. Never returns.
pub async fn async_reclaim_metadata_space(space: SpaceInfoHandle) {
    loop {
        WorkQueued { space: &space }.await;
        do_async_reclaim_metadata_space(&space).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testenv::TestEnv;

    const NODESIZE: u32 = 16384;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn metadata(env: &Rc<TestEnv>, total: u64, unallocated: u64) -> SpaceInfoHandle {
        let space = SpaceInfoHandle::new(
            env.clone(),
            SpaceInfo::new(BLOCK_GROUP_METADATA, 100 * GIB),
            NODESIZE,
            Rc::new(Cell::new(unallocated)),
        );
        space.add_block_group(total, 0, 0);
        space
    }

    /// Flush hooks that do nothing but count their calls.
    #[derive(Default)]
    struct NoProgress {
        calls: Cell<u64>,
    }

    impl NoProgress {
        fn ready(&self) -> LocalBoxFuture<'static, ()> {
            self.calls.set(self.calls.get() + 1);
            Box::pin(std::future::ready(()))
        }
    }

    impl FlushOps for NoProgress {
        fn flush_delayed_items(&self, _: Option<u64>) -> LocalBoxFuture<'static, ()> {
            self.ready()
        }
        fn run_delayed_refs(&self, _: Option<u64>) -> LocalBoxFuture<'static, ()> {
            self.ready()
        }
        fn alloc_chunk(&self, _: bool) -> LocalBoxFuture<'static, ()> {
            self.ready()
        }
        fn commit_transaction(&self) -> LocalBoxFuture<'static, ()> {
            self.ready()
        }
    }

    #[test]
    fn overcommit_factor_follows_the_kernel() {
        let mut info = SpaceInfo::new(BLOCK_GROUP_METADATA, 200 * GIB);
        assert_eq!(info.data_chunk_size_bytes, GIB, "10 % of 200 GiB, capped at 1 GiB");
        info.total_bytes = 256 * MIB;
        info.bytes_used = 256 * MIB;
        let unallocated = 101 * GIB;
        // (101 GiB - 1 GiB data chunk) / 8 with FLUSH_ALL, / 2 otherwise.
        let flush_all = 100 * GIB / 8;
        let other = 100 * GIB / 2;
        assert_eq!(info.calc_available_free_space(unallocated, FlushKind::FlushAll), flush_all);
        for flush in [FlushKind::NoFlush, FlushKind::FlushLimit, FlushKind::FlushAllSteal] {
            assert_eq!(info.calc_available_free_space(unallocated, flush), other, "{flush:?}");
        }
        // Strictly less than total + avail.
        assert!(info.can_overcommit(flush_all - 1, unallocated, FlushKind::FlushAll));
        assert!(!info.can_overcommit(flush_all, unallocated, FlushKind::FlushAll));
        assert!(info.can_overcommit(other - 1, unallocated, FlushKind::NoFlush));
        assert!(!info.can_overcommit(other, unallocated, FlushKind::NoFlush));
        // DUP halves the unallocated space first.
        info.profile_factor = 2;
        assert_eq!(
            info.calc_available_free_space(unallocated, FlushKind::FlushAll),
            (GIB * 101 / 2 - GIB) / 8
        );
        // Less than a data chunk unallocated: no overcommit at all.
        assert_eq!(info.calc_available_free_space(2 * GIB, FlushKind::NoFlush), 0);
        assert!(!info.can_overcommit(1, 2 * GIB, FlushKind::NoFlush));
        // Data never overcommits.
        let mut data = SpaceInfo::new(BLOCK_GROUP_DATA, 200 * GIB);
        data.total_bytes = GIB;
        assert!(!data.can_overcommit(1, 100 * GIB, FlushKind::NoFlush));
    }

    #[test]
    fn reservation_fits_or_overcommits_or_fails_without_flush() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 8 * MIB, 0);
        reserve_metadata_bytes_nowait(&space, 8 * MIB, FlushKind::NoFlush).unwrap();
        assert_eq!(space.info().bytes_may_use, 8 * MIB);
        assert_eq!(reserve_metadata_bytes_nowait(&space, 1, FlushKind::NoFlush), Err(Enospc));
        assert_eq!(space.stats().nowait_failures, 1);
        // With unallocated space the same reservation overcommits.
        space.0.free_chunk_space.set(20 * GIB);
        reserve_metadata_bytes_nowait(&space, MIB, FlushKind::NoFlush).unwrap();
        assert_eq!(space.info().bytes_may_use, 9 * MIB);
        assert_eq!(space.queued_tickets(), 0);
    }

    #[test]
    fn emergency_ignores_may_use_but_not_real_usage() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 8 * MIB, 0);
        reserve_metadata_bytes_nowait(&space, 8 * MIB, FlushKind::NoFlush).unwrap();
        reserve_metadata_bytes_nowait(&space, 4 * MIB, FlushKind::FlushEmergency).unwrap();
        assert_eq!(space.info().bytes_may_use, 12 * MIB);
        space.add_reserved_bytes(6 * MIB, 6 * MIB);
        space.update_block_group(6 * MIB, true);
        assert_eq!(space.info().bytes_used, 6 * MIB);
        assert_eq!(reserve_metadata_bytes_nowait(&space, 3 * MIB, FlushKind::FlushEmergency), Err(Enospc));
        reserve_metadata_bytes_nowait(&space, 2 * MIB, FlushKind::FlushEmergency).unwrap();
    }

    #[test]
    fn tickets_are_granted_fifo_and_small_does_not_jump_big() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 10 * MIB, 0);
        reserve_metadata_bytes_nowait(&space, 10 * MIB, FlushKind::NoFlush).unwrap();
        let order = Rc::new(RefCell::new(Vec::new()));
        let mut results = Vec::new();
        for (name, bytes) in [("big", 6 * MIB), ("small", MIB)] {
            let (space, order) = (space.clone(), order.clone());
            results.push(env.spawn_with_result(name, async move {
                let r = reserve_metadata_bytes(&space, bytes, FlushKind::FlushAll).await;
                order.borrow_mut().push(name);
                r
            }));
            env.run_until_idle();
        }
        assert_eq!(space.queued_tickets(), 2);
        assert_eq!(space.info().reclaim_size, 7 * MIB);
        assert_eq!(env.waits_of("big"), Some(WaitOn::Ticket { bytes: 6 * MIB }));
        assert_eq!(env.waits_of("small"), Some(WaitOn::Ticket { bytes: MIB }));
        // A NO_FLUSH reservation does not jump the queue either.
        space.free_bytes_may_use(2 * MIB);
        env.run_until_idle();
        assert_eq!(reserve_metadata_bytes_nowait(&space, MIB, FlushKind::NoFlush), Err(Enospc));
        // 2 MiB free: enough for "small", not for "big", which is first.
        assert!(order.borrow().is_empty(), "small jumped big: {:?}", order.borrow());
        assert_eq!(space.info().bytes_may_use, 8 * MIB);
        space.free_bytes_may_use(5 * MIB);
        env.run_until_idle();
        assert_eq!(*order.borrow(), ["big", "small"]);
        assert!(results.iter().all(|r| r.borrow().as_ref() == Some(&Ok(()))));
        let info = space.info();
        assert_eq!(info.bytes_may_use, 10 * MIB);
        assert_eq!((info.reclaim_size, info.tickets_id), (0, 2));
        // The flusher was asked for once.
        assert!(info.flush);
        assert!(space.0.work_pending.get());
    }

    #[test]
    fn flusher_without_progress_runs_every_state_then_fails_all_tickets() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 4 * MIB, 0);
        let ops = Rc::new(NoProgress::default());
        space.set_flush_ops(ops.clone());
        space.spawn_async_reclaim();
        reserve_metadata_bytes_nowait(&space, 4 * MIB, FlushKind::NoFlush).unwrap();
        let a = {
            let space = space.clone();
            env.spawn_with_result("a", async move {
                reserve_metadata_bytes(&space, MIB, FlushKind::FlushAll).await
            })
        };
        let b = {
            let space = space.clone();
            env.spawn_with_result("b", async move {
                reserve_metadata_bytes(&space, MIB, FlushKind::FlushAll).await
            })
        };
        env.run_until_idle();
        assert_eq!(*a.borrow(), Some(Err(Enospc)));
        assert_eq!(*b.borrow(), Some(Err(Enospc)));
        use FlushState::*;
        // First pass skips FLUSH_DELALLOC_FULL and ALLOC_CHUNK_FORCE; two
        // more full passes; then the tickets fail.
        let first = vec![
            FlushDelayedItemsNr,
            FlushDelayedItems,
            FlushDelayedRefsNr,
            FlushDelayedRefs,
            FlushDelalloc,
            FlushDelallocWait,
            AllocChunk,
            RunDelayedIputs,
            CommitTrans,
        ];
        let full = vec![
            FlushDelayedItemsNr,
            FlushDelayedItems,
            FlushDelayedRefsNr,
            FlushDelayedRefs,
            FlushDelalloc,
            FlushDelallocWait,
            FlushDelallocFull,
            AllocChunk,
            AllocChunkForce,
            RunDelayedIputs,
            CommitTrans,
        ];
        let expected: Vec<FlushState> = [first, full.clone(), full].concat();
        assert_eq!(space.flush_history(), expected);
        assert_eq!(space.last_flush_state(), Some(CommitTrans));
        // The four hooks implemented: delayed items x2, delayed refs x2,
        // chunk x2 (x1 first pass), commit, per pass.
        assert_eq!(ops.calls.get(), 6 + 7 + 7);
        let info = space.info();
        assert_eq!((info.reclaim_size, info.bytes_may_use, info.flush), (0, 4 * MIB, false));
        let stats = space.stats();
        assert_eq!((stats.tickets_failed, stats.fail_all_tickets, stats.tickets_granted), (2, 1, 0));
        assert_eq!(space.queued_tickets(), 0);
        assert_eq!(env.waits_of("async_reclaim_metadata_space"), Some(WaitOn::Other("async reclaim work")));
        assert!(env.traces.borrow().contains(&TraceEvent::Note {
            what: "flush_space",
            a: CommitTrans as u64,
            b: 2 * MIB,
            c: BLOCK_GROUP_METADATA
        }));
    }

    /// A commit that unpins what the test pinned.
    struct CommitUnpins {
        space: RefCell<Option<SpaceInfoHandle>>,
        pinned: u64,
    }

    impl FlushOps for CommitUnpins {
        fn flush_delayed_items(&self, _: Option<u64>) -> LocalBoxFuture<'static, ()> {
            Box::pin(std::future::ready(()))
        }
        fn run_delayed_refs(&self, _: Option<u64>) -> LocalBoxFuture<'static, ()> {
            Box::pin(std::future::ready(()))
        }
        fn alloc_chunk(&self, _: bool) -> LocalBoxFuture<'static, ()> {
            Box::pin(std::future::ready(()))
        }
        fn commit_transaction(&self) -> LocalBoxFuture<'static, ()> {
            if let Some(space) = self.space.borrow_mut().take() {
                space.unpin_extent(self.pinned, false);
            }
            Box::pin(std::future::ready(()))
        }
    }

    #[test]
    fn flusher_commit_that_unpins_grants_the_ticket() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 4 * MIB, 0);
        space.set_flush_ops(Rc::new(CommitUnpins {
            space: RefCell::new(Some(space.clone())),
            pinned: 2 * MIB,
        }));
        space.spawn_async_reclaim();
        reserve_metadata_bytes_nowait(&space, 4 * MIB, FlushKind::NoFlush).unwrap();
        // Two MiB of it allocated, used, then freed: pinned until commit.
        space.add_reserved_bytes(2 * MIB, 2 * MIB);
        space.update_block_group(2 * MIB, true);
        space.update_block_group(2 * MIB, false);
        assert_eq!(space.info().bytes_pinned, 2 * MIB);
        let space2 = space.clone();
        let r = env.run(async move { reserve_metadata_bytes(&space2, MIB, FlushKind::FlushAll).await });
        assert_eq!(r, Ok(()));
        assert_eq!(*space.flush_history().last().unwrap(), FlushState::CommitTrans);
        assert_eq!(space.flush_history().len(), 9, "granted during the first pass");
        let info = space.info();
        assert_eq!((info.bytes_pinned, info.bytes_may_use, info.bytes_used), (0, 3 * MIB, 0));
        assert!(!info.flush);
    }

    #[test]
    fn flush_limit_runs_priority_states_itself_then_fails() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 4 * MIB, 0);
        space.set_flush_ops(Rc::new(NoProgress::default()));
        reserve_metadata_bytes_nowait(&space, 4 * MIB, FlushKind::NoFlush).unwrap();
        let space2 = space.clone();
        let r = env.run(async move { reserve_metadata_bytes(&space2, MIB, FlushKind::FlushLimit).await });
        assert_eq!(r, Err(Enospc));
        assert_eq!(space.flush_history(), PRIORITY_FLUSH_STATES);
        assert_eq!(space.queued_tickets(), 0);
        assert_eq!(space.info().reclaim_size, 0);
        assert!(!space.info().flush, "a priority ticket does not start the async flusher");
    }

    #[test]
    fn dropped_reservation_withdraws_its_ticket() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, MIB, 0);
        reserve_metadata_bytes_nowait(&space, MIB, FlushKind::NoFlush).unwrap();
        let mut fut = Box::pin(reserve_metadata_bytes(&space, MIB, FlushKind::FlushAll));
        let waker = Waker::noop();
        assert!(fut.as_mut().poll(&mut Context::from_waker(waker)).is_pending());
        assert_eq!(space.info().reclaim_size, MIB);
        drop(fut);
        assert_eq!((space.queued_tickets(), space.info().reclaim_size), (0, 0));
        // Granted but never observed: the bytes go back.
        let mut fut = Box::pin(reserve_metadata_bytes(&space, MIB, FlushKind::FlushAll));
        assert!(fut.as_mut().poll(&mut Context::from_waker(waker)).is_pending());
        space.free_bytes_may_use(MIB);
        assert_eq!(space.info().bytes_may_use, MIB, "granted to the ticket");
        drop(fut);
        assert_eq!(space.info().bytes_may_use, 0);
    }

    #[test]
    fn counters_move_between_states() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, 4 * MIB, 0);
        reserve_metadata_bytes_nowait(&space, 3 * MIB, FlushKind::NoFlush).unwrap();
        space.add_reserved_bytes(MIB, MIB);
        space.pin_reserved_bytes(MIB / 2);
        space.free_reserved_bytes(MIB / 2);
        space.unpin_extent(MIB / 4, true);
        let info = space.info();
        assert_eq!(
            (info.bytes_may_use, info.bytes_reserved, info.bytes_pinned, info.bytes_readonly),
            (2 * MIB, 0, MIB / 4, MIB / 4)
        );
        assert_eq!(info.bytes_free(), 4 * MIB - 2 * MIB - MIB / 2);
        assert_eq!(info.dump()[0], "space_info METADATA (sub-group id 0) has 1572864 free, is not full");
    }

    #[test]
    #[should_panic(expected = "bytes_may_use underflow")]
    fn may_use_underflow_is_a_bug() {
        let env = TestEnv::new(4096);
        let space = metadata(&env, MIB, 0);
        reserve_metadata_bytes_nowait(&space, 4096, FlushKind::NoFlush).unwrap();
        space.update_bytes_may_use(-8192);
    }

    #[test]
    #[should_panic(expected = "bytes_pinned underflow")]
    fn pinned_underflow_is_a_bug() {
        let env = TestEnv::new(4096);
        metadata(&env, MIB, 0).unpin_extent(4096, false);
    }

    #[test]
    #[should_panic(expected = "bytes_reserved underflow")]
    fn reserved_underflow_is_a_bug() {
        let env = TestEnv::new(4096);
        metadata(&env, MIB, 0).update_block_group(4096, true);
    }

    #[test]
    #[should_panic(expected = "bytes_used underflow")]
    fn used_underflow_is_a_bug() {
        let env = TestEnv::new(4096);
        metadata(&env, MIB, 0).update_block_group(4096, false);
    }
}
