//! The engine's view of the world it runs in.
//!
//! The engine is written like kernel code: it submits bios and is told when
//! they end, charges memory for what it caches, sleeps, and reaches points
//! where it may be preempted. It never reads a clock, draws a random number
//! or spawns a thread of its own; every one of those goes through [`Env`].
//! `sim` implements this trait with a simulated clock, an NVMe model, a memory
//! model and a seeded scheduler; nothing in the engine knows that.
//!
//! Rules for engine code that uses it:
//! - never hold a `RefCell` borrow across an `.await` (other tasks, reclaim
//!   among them, run at every suspension and call back into the engine);
//! - callbacks given to the environment ([`EndIo`]) run outside any task, with
//!   every task suspended, and must not block.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// A boxed future that is not `Send`: everything runs on one thread.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Identifies a task (a kernel thread or a syscall caller) to the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u32);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// What a task is, for the runner: a run ends when every `Workload` task has
/// finished; `Daemon` tasks (flusher, kswapd, transaction kthread) loop forever
/// and are dropped then.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskKind {
    Workload,
    Daemon,
}

/// One block I/O command. Offsets and lengths are in bytes and must be
/// multiples of [`SECTOR_SIZE`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Bio {
    Read {
        offset_bytes: u64,
        len_bytes: u32,
    },
    /// `fua`: the write is durable when it completes (forced unit access).
    /// `preflush`: a FLUSH is issued before the write (REQ_PREFLUSH).
    Write {
        offset_bytes: u64,
        data: Vec<u8>,
        fua: bool,
        preflush: bool,
    },
    /// Makes every write that completed before it was issued durable.
    Flush,
}

/// The device's logical sector: the unit of torn writes.
pub const SECTOR_SIZE: u64 = 512;

impl Bio {
    pub fn op_name(&self) -> &'static str {
        match self {
            Bio::Read { .. } => "read",
            Bio::Write { fua: true, .. } => "write_fua",
            Bio::Write { .. } => "write",
            Bio::Flush => "flush",
        }
    }
}

/// How a bio ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BioStatus {
    /// A read returns its bytes; writes and flushes return an empty vector.
    Ok(Vec<u8>),
    /// The device reported a media or transport error (BLK_STS_IOERR).
    IoError,
}

/// Called once when a bio ends (the kernel's `bi_end_io`). Runs outside any
/// task with every task suspended; it may wake tasks but must not block.
pub type EndIo = Box<dyn FnOnce(BioStatus)>;

/// Places where kernel code can be preempted or sleeps. The environment may
/// run any other task there; the kind is recorded in the trace so that a
/// schedule can be read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwitchPoint {
    /// `btrfs_release_path` before a search restarts.
    PathRelease,
    /// Before reading a tree block that is not cached.
    BlockRead,
    /// Before charging memory for a new page or extent buffer.
    MemoryCharge,
    /// `cond_resched()` in a loop.
    CondResched,
    /// A workload between two operations.
    Workload,
}

/// What a blocked task waits for, so that a deadlock or stall report can name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WaitOn {
    TreeLockRead { bytenr: u64 },
    TreeLockWrite { bytenr: u64 },
    Io { what: &'static str, offset_bytes: u64 },
    Memory,
    Transaction { what: &'static str },
    Ticket { bytes: u64 },
    Sleep { until_ns: u64 },
    Other(&'static str),
}

/// Sync mode of a writeback pass (the kernel's `wbc->sync_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncMode {
    /// Background flusher and memory reclaim: skip what is locked or busy.
    None,
    /// Data-integrity writeback (commit, fsync): write everything dirty.
    All,
}

/// What a cache holds, in bytes, as a shrinker reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CacheCounts {
    pub clean_bytes: u64,
    pub dirty_bytes: u64,
    pub writeback_bytes: u64,
}

/// Memory the engine can give back, as the kernel's shrinkers and
/// address-space operations expose it. The environment's reclaim policies
/// decide when and how much; the engine decides what it can free.
pub trait Shrinker {
    fn name(&self) -> &'static str;
    fn count(&self) -> CacheCounts;
    /// Start writeback of up to `nr_bytes` of dirty data; returns the bytes
    /// submitted. With [`SyncMode::None`] busy or locked objects are skipped.
    fn writeback(&self, nr_bytes: u64, mode: SyncMode) -> u64;
    /// Evict up to `nr_bytes` of clean, unlocked, unreferenced objects;
    /// returns the bytes freed (already released with `memory_release`).
    fn evict(&self, nr_bytes: u64) -> u64;
}

/// A broken invariant found by the engine or an oracle. The environment
/// records it with the seed and the simulated time; the engine carries on
/// (or aborts the transaction) as the kernel would.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Violation {
    /// Stable, machine-readable kind, e.g. `reservation_overdraw`.
    pub kind: &'static str,
    pub message: String,
}

/// A typed trace event emitted by the engine or a scenario. The environment
/// stamps it with the time and the task, folds it into the run's trace hash
/// and prints it when tracing is enabled.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TraceEvent {
    /// A search released its path and starts again from the root.
    SearchRestart { root: u64, level: u8, reason: RestartReason },
    /// A `search_slot` call returned: how often it COWed and restarted.
    SearchDone { root: u64, cows: u32, restarts: u32 },
    /// A tree block was copied on write.
    Cow { root: u64, level: u8, old_bytenr: u64, new_bytenr: u64 },
    /// `lock_extent_buffer_for_io` submitted a tree block.
    EbWriteback { bytenr: u64, sync: bool },
    /// A clean extent buffer was dropped from the cache.
    EbEvict { bytenr: u64 },
    /// A transaction changed state.
    Transaction { transid: u64, state: &'static str },
    /// A filesystem operation finished (or failed with an errno).
    Op { name: &'static str, errno: i32 },
    /// Anything else worth a line in the timeline: a name and up to three numbers.
    Note { what: &'static str, a: u64, b: u64, c: u64 },
}

/// Why `search_slot` released its path and started again (`goto again`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RestartReason {
    WriteLock,
    SetupNodes,
    SlotZero,
    ReadBlock,
}

impl RestartReason {
    pub const ALL: [RestartReason; 4] = [
        RestartReason::WriteLock,
        RestartReason::SetupNodes,
        RestartReason::SlotZero,
        RestartReason::ReadBlock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::WriteLock => "write_lock",
            RestartReason::SetupNodes => "setup_nodes",
            RestartReason::SlotZero => "slot_zero",
            RestartReason::ReadBlock => "read_block",
        }
    }
}

/// Everything the engine asks of its environment.
pub trait Env {
    /// Current time in nanoseconds. Only for timestamps and ages: the engine
    /// never spins on it.
    fn now_ns(&self) -> u64;

    /// Submit a bio; `end_io` is called exactly once when it ends, unless the
    /// machine loses power first (then never).
    fn submit_bio(&self, bio: Bio, end_io: EndIo);

    /// Sleep for `ns` nanoseconds.
    fn sleep(&self, ns: u64) -> LocalBoxFuture<'static, ()>;

    /// A point where the caller may be preempted. Always suspends once; the
    /// scheduler decides who runs next.
    fn switch_point(&self, at: SwitchPoint) -> LocalBoxFuture<'static, ()>;

    /// Charge `bytes` of memory to the filesystem's budget. May run direct
    /// reclaim through the registered shrinkers and throttle the caller. The
    /// caller must hold no `RefCell` borrow while awaiting it.
    fn memory_charge(&self, bytes: u64) -> LocalBoxFuture<'static, ()>;

    /// Give back memory charged earlier. Never blocks.
    fn memory_release(&self, bytes: u64);

    /// Make a cache available to the environment's reclaim policies.
    fn register_shrinker(&self, shrinker: Rc<dyn Shrinker>);

    /// Start a task. It first runs when the scheduler picks it.
    fn spawn(&self, name: &str, kind: TaskKind, future: LocalBoxFuture<'static, ()>) -> TaskId;

    /// The task currently running, if any.
    fn current_task(&self) -> Option<TaskId>;

    /// Record what the current task is about to block on (until its next poll).
    fn wait_on(&self, what: WaitOn);

    /// Append an event to the run's trace.
    fn trace(&self, event: TraceEvent);

    /// Report a broken invariant.
    fn report_violation(&self, violation: Violation);
}
