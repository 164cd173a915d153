//! Extent buffers: cached tree blocks, their cache, reads, writeback and
//! reclaim, after fs/btrfs/extent_io.c (and the btree parts of disk-io.c:
//! `read_tree_block`, `btrfs_buffer_uptodate`, the btree inode's
//! writepages and release hooks).
//!
//! An [`ExtentBuffer`] holds one tree block image (`nodesize` bytes), its
//! state bits (`bflags`), its tree lock and the counters of the fix
//! candidates. Its reference count is the `Rc` strong count: the cache
//! ([`BufferTree`], the kernel's `fs_info->buffer_tree`) holds one, so an
//! eb is unreferenced when its strong count is 1.
//!
//! Lifecycle:
//! - [`alloc_extent_buffer`] charges `nodesize` of memory and inserts an
//!   empty, not up-to-date eb; [`read_tree_block`] fills it from disk and
//!   verifies it, or a new block is initialised by its allocator and
//!   marked up to date.
//! - Modifying a block marks it dirty ([`set_extent_buffer_dirty`]).
//! - Writeback ([`lock_extent_buffer_for_io`] then [`write_one_eb`]) clears
//!   DIRTY, sets WRITEBACK and the header flag WRITTEN, checksums and
//!   checks the image and submits it; the bio's completion clears WRITEBACK.
//!   Background and reclaim writeback is [`btree_write_cache_pages`] with
//!   [`SyncMode::None`]; the commit uses [`write_and_wait_ebs`].
//! - Reclaim frees only clean, unlocked, unreferenced ebs
//!   ([`try_release_extent_buffer`]), least recently used first, through
//!   the cache's [`Shrinker`] ([`BtreeShrinker`], named "btree").
//!
//! Where the fixes hook in (fix-variants.md): `lock_extent_buffer_for_io`
//! leaves a dirty eb alone while `writeback_blockers > 0` under
//! `search-pin` (every sync mode), and while `writeback_inhibitors > 0`
//! under `inhibit-writeback` / `both` for [`SyncMode::None`] only. The
//! counters themselves are raised and dropped by `search_slot` and the
//! transaction handle.
//!
//! Differences from the kernel:
//! - No pages or folios: an eb owns its bytes, charged as one `nodesize`
//!   unit. Memory is released when the eb leaves the cache, not when its
//!   last reference drops.
//! - Logical addresses are device offsets until the chunk mapping
//!   (volumes.c) exists: see [`map_block`].
//! - The LRU is a per-eb tick bumped by lookups (`mark_extent_buffer_accessed`)
//!   instead of the page LRU.
//! - Background writeback skips an eb whose tree lock is held
//!   (btrfs-model.md); the kernel since 5.x blocks on the lock.
//! - A cached, up-to-date eb whose generation differs from the parent
//!   pointer's is reported as a transid mismatch; the kernel would drop the
//!   up-to-date bit and read the block again from disk.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};

use crate::accessors::{
    clear_header_flag, header_bytenr, header_flag, header_generation, header_level, header_nritems,
    header_owner, item_key, item_nr_offset, item_offset, key_ptr_offset, node_key, set_header_flag,
    set_header_generation, set_header_level, set_header_nritems, set_header_owner, write_header_csum,
};
use crate::env::{
    Bio, BioStatus, CacheCounts, Shrinker, SwitchPoint, SyncMode, TraceEvent, Violation, WaitOn,
};
use crate::error::Error;
use crate::format::{HEADER_FLAG_RELOC, HEADER_FLAG_WRITTEN, Key, leaf_data_size, nodeptrs_per_block};
use crate::fs::FsInfo;
use crate::locking::{TreeLock, tree_lock, tree_unlock, try_tree_write_lock};
use crate::transaction::TransState;
use crate::tree_checker::{ParentCheck, TreeCheckError, check_tree_block, validate_extent_buffer};
use crate::wait::declared;
use crate::wait::{Completion, WaitQueue};

// ---------------------------------------------------------------------------
// State bits (`enum { EXTENT_BUFFER_UPTODATE, ... }` in extent_io.h).

/// The image holds the block's current contents.
pub const EXTENT_BUFFER_UPTODATE: u32 = 1 << 0;
/// Modified since it was last written.
pub const EXTENT_BUFFER_DIRTY: u32 = 1 << 1;
/// A write of the image is in flight.
pub const EXTENT_BUFFER_WRITEBACK: u32 = 1 << 2;
/// A read is in flight; other readers wait for it instead of reading too.
pub const EXTENT_BUFFER_READING: u32 = 1 << 3;
/// The last write failed.
pub const EXTENT_BUFFER_WRITE_ERR: u32 = 1 << 4;
/// The block was freed (`free_extent_buffer_stale`).
pub const EXTENT_BUFFER_STALE: u32 = 1 << 5;

/// A cached tree block (`struct extent_buffer`).
pub struct ExtentBuffer {
    /// Logical bytenr of the block.
    pub start: u64,
    /// Bytes: the nodesize.
    pub len: u32,
    /// The block image. Never borrowed across an `.await`.
    pub data: RefCell<Vec<u8>>,
    bflags: Cell<u32>,
    /// The tree lock (`eb->lock`).
    pub lock: TreeLock,
    /// Fix `search-pin`: searches that COWed this eb and have not returned.
    /// Raised and dropped with the write lock held.
    pub writeback_blockers: Cell<u32>,
    /// Fix `inhibit-writeback`: transaction handles that hold this eb in
    /// their inhibit set.
    pub writeback_inhibitors: Cell<u32>,
    /// Which log tree the block belongs to: -1 for none, else 0 or 1
    /// (`eb->log_index`); routes a write error to the right flag.
    pub log_index: Cell<i8>,
    /// Woken when WRITEBACK clears (`wake_up_bit(EXTENT_BUFFER_WRITEBACK)`).
    writeback_wait: WaitQueue,
    /// Woken when READING clears.
    read_wait: WaitQueue,
    /// LRU tick of the last lookup; 0 while not in the cache.
    last_used: Cell<u64>,
}

impl ExtentBuffer {
    fn new(start: u64, len: u32) -> ExtentBuffer {
        ExtentBuffer {
            start,
            len,
            data: RefCell::new(vec![0; len as usize]),
            bflags: Cell::new(0),
            lock: TreeLock::new(),
            writeback_blockers: Cell::new(0),
            writeback_inhibitors: Cell::new(0),
            log_index: Cell::new(-1),
            writeback_wait: WaitQueue::new(),
            read_wait: WaitQueue::new(),
            last_used: Cell::new(0),
        }
    }

    pub fn test_bit(&self, bit: u32) -> bool {
        debug_assert!(bit.is_power_of_two());
        self.bflags.get() & bit != 0
    }

    pub fn set_bit(&self, bit: u32) {
        debug_assert!(bit.is_power_of_two());
        self.bflags.set(self.bflags.get() | bit);
    }

    pub fn clear_bit(&self, bit: u32) {
        debug_assert!(bit.is_power_of_two());
        self.bflags.set(self.bflags.get() & !bit);
    }

    /// Clears `bit`; returns whether it was set.
    pub fn test_and_clear_bit(&self, bit: u32) -> bool {
        let was = self.test_bit(bit);
        self.clear_bit(bit);
        was
    }

    /// Sets `bit`; returns whether it was set.
    pub fn test_and_set_bit(&self, bit: u32) -> bool {
        let was = self.test_bit(bit);
        self.set_bit(bit);
        was
    }

    /// All state bits, for dumps.
    pub fn bflags(&self) -> u32 {
        self.bflags.get()
    }

    /// `extent_buffer_uptodate`.
    pub fn uptodate(&self) -> bool {
        self.test_bit(EXTENT_BUFFER_UPTODATE)
    }

    pub fn dirty(&self) -> bool {
        self.test_bit(EXTENT_BUFFER_DIRTY)
    }

    pub fn under_writeback(&self) -> bool {
        self.test_bit(EXTENT_BUFFER_WRITEBACK)
    }

    /// `extent_buffer_under_io`: dirty or being written.
    pub fn under_io(&self) -> bool {
        self.dirty() || self.under_writeback()
    }

    // Header fields, read from and written to the image.

    /// The bytenr the header claims (equal to `start` for a sound block).
    pub fn header_bytenr(&self) -> u64 {
        header_bytenr(&self.data.borrow())
    }
    pub fn generation(&self) -> u64 {
        header_generation(&self.data.borrow())
    }
    pub fn set_generation(&self, generation: u64) {
        set_header_generation(&mut self.data.borrow_mut(), generation)
    }
    pub fn level(&self) -> u8 {
        header_level(&self.data.borrow())
    }
    pub fn set_level(&self, level: u8) {
        set_header_level(&mut self.data.borrow_mut(), level)
    }
    pub fn owner(&self) -> u64 {
        header_owner(&self.data.borrow())
    }
    pub fn set_owner(&self, owner: u64) {
        set_header_owner(&mut self.data.borrow_mut(), owner)
    }
    pub fn nritems(&self) -> u32 {
        header_nritems(&self.data.borrow())
    }
    pub fn set_nritems(&self, nritems: u32) {
        set_header_nritems(&mut self.data.borrow_mut(), nritems)
    }
    /// Whether header flag `flag` (HEADER_FLAG_WRITTEN, HEADER_FLAG_RELOC) is set.
    pub fn header_flag(&self, flag: u64) -> bool {
        header_flag(&self.data.borrow(), flag)
    }
    pub fn set_header_flag(&self, flag: u64) {
        set_header_flag(&mut self.data.borrow_mut(), flag)
    }
    pub fn clear_header_flag(&self, flag: u64) {
        clear_header_flag(&mut self.data.borrow_mut(), flag)
    }
    /// The block was written since it was allocated: the next change in
    /// this transaction must COW it (`should_cow_block`).
    pub fn header_flag_written(&self) -> bool {
        self.header_flag(HEADER_FLAG_WRITTEN)
    }
    pub fn header_flag_reloc(&self) -> bool {
        self.header_flag(HEADER_FLAG_RELOC)
    }
    /// The first key (item 0 of a leaf, pointer 0 of a node); `None` when empty.
    pub fn first_key(&self) -> Option<Key> {
        let data = self.data.borrow();
        if header_nritems(&data) == 0 {
            return None;
        }
        Some(if header_level(&data) == 0 { item_key(&data, 0) } else { node_key(&data, 0) })
    }

    // Fix counters.

    /// Fix `search-pin`: a search that COWed this eb keeps writeback off it.
    pub fn add_writeback_blocker(&self) {
        assert!(
            self.lock.is_write_locked(),
            "writeback blocker raised on eb {} without its write lock",
            self.start
        );
        self.writeback_blockers.set(self.writeback_blockers.get() + 1);
    }
    pub fn remove_writeback_blocker(&self) {
        let n = self.writeback_blockers.get();
        assert!(n > 0, "writeback blocker of eb {} dropped below zero", self.start);
        self.writeback_blockers.set(n - 1);
    }
    /// Fix `inhibit-writeback`: a transaction handle keeps background
    /// writeback off this eb.
    pub fn add_writeback_inhibitor(&self) {
        self.writeback_inhibitors.set(self.writeback_inhibitors.get() + 1);
    }
    pub fn remove_writeback_inhibitor(&self) {
        let n = self.writeback_inhibitors.get();
        assert!(n > 0, "writeback inhibitor of eb {} dropped below zero", self.start);
        self.writeback_inhibitors.set(n - 1);
    }
}

impl std::fmt::Debug for ExtentBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentBuffer")
            .field("start", &self.start)
            .field("bflags", &format_args!("{:#x}", self.bflags.get()))
            .field("readers", &self.lock.readers())
            .field("write_locked", &self.lock.is_write_locked())
            .finish()
    }
}

/// `set_extent_buffer_uptodate`.
pub fn set_extent_buffer_uptodate(eb: &ExtentBuffer) {
    eb.set_bit(EXTENT_BUFFER_UPTODATE);
}

/// `clear_extent_buffer_uptodate`.
pub fn clear_extent_buffer_uptodate(eb: &ExtentBuffer) {
    eb.clear_bit(EXTENT_BUFFER_UPTODATE);
}

/// `set_extent_buffer_dirty`: returns whether it was dirty already. The
/// caller holds the tree lock (for write; a read lock is enough under the
/// `overwrite-written` fix) and the block is up to date. Recording the
/// block in the transaction's dirty set is the caller's
/// (`btrfs_mark_buffer_dirty`).
pub fn set_extent_buffer_dirty(eb: &ExtentBuffer) -> bool {
    assert!(eb.uptodate(), "dirtying eb {} that is not up to date", eb.start);
    assert!(eb.lock.is_locked(), "dirtying eb {} without its tree lock", eb.start);
    eb.test_and_set_bit(EXTENT_BUFFER_DIRTY)
}

/// `btrfs_clear_buffer_dirty` without the transaction check: a block freed
/// in the transaction that allocated it is never written. Returns whether
/// it was dirty.
pub fn clear_extent_buffer_dirty(eb: &ExtentBuffer) -> bool {
    eb.test_and_clear_bit(EXTENT_BUFFER_DIRTY)
}

/// `btrfs_buffer_uptodate`: up to date, and of the generation the parent
/// pointer expects (0: any).
pub fn buffer_uptodate(eb: &ExtentBuffer, parent_transid: u64) -> bool {
    eb.uptodate() && (parent_transid == 0 || eb.generation() == parent_transid)
}

/// Where a tree block lives on the device. Logical == physical until the
/// chunk tree mapping exists (volumes.c, `btrfs_map_block`).
pub fn map_block(_fs: &FsInfo, bytenr: u64) -> u64 {
    bytenr
}

// ---------------------------------------------------------------------------
// The cache.

/// `fs_info->buffer_tree` and the state around it: every cached eb by
/// bytenr, the LRU index, and the background writeback cursor.
#[derive(Default)]
pub struct BufferTree {
    inner: RefCell<BufferTreeInner>,
}

#[derive(Default)]
struct BufferTreeInner {
    ebs: BTreeMap<u64, Rc<ExtentBuffer>>,
    /// LRU tick -> bytenr, oldest first; one entry per cached eb.
    lru: BTreeMap<u64, u64>,
    /// Last tick handed out; ticks start at 1.
    clock: u64,
    /// Where the next background writeback pass starts
    /// (`mapping->writeback_index`).
    writeback_index: u64,
}

impl BufferTreeInner {
    fn touch(&mut self, eb: &ExtentBuffer) {
        let old = eb.last_used.get();
        if old != 0 {
            let removed = self.lru.remove(&old);
            debug_assert_eq!(removed, Some(eb.start));
        }
        self.clock += 1;
        self.lru.insert(self.clock, eb.start);
        eb.last_used.set(self.clock);
    }

    fn remove(&mut self, start: u64) -> Rc<ExtentBuffer> {
        let eb = self.ebs.remove(&start).expect("removing an eb that is not cached");
        let removed = self.lru.remove(&eb.last_used.get());
        assert_eq!(removed, Some(start), "LRU index out of step with the cache");
        eb.last_used.set(0);
        eb
    }
}

impl BufferTree {
    /// Cached ebs.
    pub fn len(&self) -> usize {
        self.inner.borrow().ebs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, start: u64) -> bool {
        self.inner.borrow().ebs.contains_key(&start)
    }

    /// Look up without marking the eb accessed (writeback, tests).
    pub fn get(&self, start: u64) -> Option<Rc<ExtentBuffer>> {
        self.inner.borrow().ebs.get(&start).cloned()
    }

    /// Bytenrs of every cached eb, in order.
    pub fn starts(&self) -> Vec<u64> {
        self.inner.borrow().ebs.keys().copied().collect()
    }

    /// Bytes held, by state: dirty (whether or not also under writeback),
    /// under writeback, the rest clean.
    pub fn counts(&self) -> CacheCounts {
        let mut counts = CacheCounts::default();
        for eb in self.inner.borrow().ebs.values() {
            let len = u64::from(eb.len);
            if eb.dirty() {
                counts.dirty_bytes += len;
            } else if eb.under_writeback() {
                counts.writeback_bytes += len;
            } else {
                counts.clean_bytes += len;
            }
        }
        counts
    }

    /// The first dirty eb at or after `index`.
    fn next_dirty(&self, index: u64) -> Option<Rc<ExtentBuffer>> {
        self.inner.borrow().ebs.range(index..).find(|(_, eb)| eb.dirty()).map(|(_, eb)| eb.clone())
    }
}

/// `find_extent_buffer`: the cached eb at `start`, marked accessed.
pub fn find_extent_buffer(fs: &FsInfo, start: u64) -> Option<Rc<ExtentBuffer>> {
    let mut inner = fs.buffer_tree.inner.borrow_mut();
    let eb = inner.ebs.get(&start)?.clone();
    inner.touch(&eb);
    drop(inner);
    fs.stats.eb_cache_hits.set(fs.stats.eb_cache_hits.get() + 1);
    Some(eb)
}

/// `alloc_extent_buffer`: the cached eb at `start`, or a new empty one (not
/// up to date) inserted in the cache after charging `nodesize` of memory.
/// The charge may reclaim and throttle; if another task inserted the same
/// block meanwhile, its eb is returned and the charge given back.
pub async fn alloc_extent_buffer(fs: &FsInfo, start: u64) -> Rc<ExtentBuffer> {
    assert!(
        start != 0 && start.is_multiple_of(u64::from(fs.sectorsize)),
        "tree block {start} not sector aligned"
    );
    if let Some(eb) = find_extent_buffer(fs, start) {
        return eb;
    }
    let nodesize = u64::from(fs.nodesize);
    fs.env.switch_point(SwitchPoint::MemoryCharge).await;
    fs.env.memory_charge(nodesize).await;
    if let Some(eb) = find_extent_buffer(fs, start) {
        fs.env.memory_release(nodesize);
        return eb;
    }
    let eb = Rc::new(ExtentBuffer::new(start, fs.nodesize));
    let mut inner = fs.buffer_tree.inner.borrow_mut();
    inner.ebs.insert(start, eb.clone());
    inner.touch(&eb);
    drop(inner);
    fs.stats.eb_allocs.set(fs.stats.eb_allocs.get() + 1);
    eb
}

/// `alloc_dummy_extent_buffer`: an eb outside the cache, charged to
/// nobody, for tools and tests.
pub fn alloc_dummy_extent_buffer(fs: &FsInfo, start: u64) -> Rc<ExtentBuffer> {
    let eb = Rc::new(ExtentBuffer::new(start, fs.nodesize));
    set_extent_buffer_uptodate(&eb);
    eb
}

/// `free_extent_buffer_stale`: the block was freed. Marks the eb STALE and
/// drops it from the cache, giving its memory back, unless it is still
/// dirty or under writeback: then, as in the kernel, it stays cached until
/// that I/O is done and reclaim finds it clean. A block freed in the
/// transaction that allocated it must have been cleaned by the caller
/// (`clear_extent_buffer_dirty`), or it will be written.
pub fn free_extent_buffer_stale(fs: &FsInfo, eb: &ExtentBuffer) {
    eb.set_bit(EXTENT_BUFFER_STALE);
    if eb.under_io() || eb.test_bit(EXTENT_BUFFER_READING) {
        return;
    }
    let removed = {
        let mut inner = fs.buffer_tree.inner.borrow_mut();
        match inner.ebs.get(&eb.start) {
            Some(cached) if std::ptr::eq(&**cached, eb) => Some(inner.remove(eb.start)),
            _ => None,
        }
    };
    if let Some(removed) = removed {
        fs.env.memory_release(u64::from(fs.nodesize));
        fs.stats.eb_stale_frees.set(fs.stats.eb_stale_frees.get() + 1);
        drop(removed);
    }
}

// ---------------------------------------------------------------------------
// Waiting, with the wait declared to the environment at every suspension.

/// `wait_on_extent_buffer_writeback`.
pub async fn wait_on_extent_buffer_writeback(fs: &FsInfo, eb: &ExtentBuffer) {
    let what = WaitOn::Io { what: "eb_writeback", offset_bytes: map_block(fs, eb.start) };
    declared(&*fs.env, what, eb.writeback_wait.wait_until(|| !eb.under_writeback())).await
}

// ---------------------------------------------------------------------------
// Reading.

/// `read_tree_block`: the block at `bytenr`, read and verified if it is
/// not cached and up to date. `parent_transid` is the generation the
/// parent pointer (or super block) carries, 0 to skip the check;
/// `first_key` the key in the parent pointer. Verification, as in
/// `btrfs_validate_extent_buffer`: bytenr, fsid, checksum, level,
/// generation ("parent transid verify failed"), first key, tree checker,
/// owner. Verification belongs to the read that fills the block: a block
/// found cached and up to date, or filled by another task's read while this
/// one waited, is returned as it is, as `btrfs_read_extent_buffer` does. It
/// may have been modified since, so only a caller holding the parent's lock
/// can compare it with the parent pointer (`read_block_for_search` does,
/// with `btrfs_verify_level_key`). A failed read leaves nothing cached.
pub async fn read_tree_block(
    fs: &FsInfo,
    bytenr: u64,
    owner_root: u64,
    level: u8,
    parent_transid: u64,
    first_key: Option<Key>,
) -> Result<Rc<ExtentBuffer>, Error> {
    if bytenr == 0 || !bytenr.is_multiple_of(u64::from(fs.sectorsize)) {
        return Err(Error::Einval);
    }
    let check = ParentCheck {
        bytenr,
        level,
        transid: (parent_transid != 0).then_some(parent_transid),
        owner_root: (owner_root != 0).then_some(owner_root),
        first_key,
        fsid: fs.fsid.get(),
    };
    if let Some(eb) = find_extent_buffer(fs, bytenr)
        && eb.uptodate()
    {
        return Ok(eb);
    }
    fs.env.switch_point(SwitchPoint::BlockRead).await;
    let eb = alloc_extent_buffer(fs, bytenr).await;
    match read_extent_buffer_pages(fs, &eb, &check).await {
        Ok(()) => Ok(eb),
        Err(e) => {
            fs.stats.eb_read_errors.set(fs.stats.eb_read_errors.get() + 1);
            free_extent_buffer_stale(fs, &eb);
            Err(e)
        }
    }
}

/// `btrfs_buffer_uptodate` + `btrfs_verify_level_key`: `eb` is of the
/// generation (`transid`, 0: any), level and first key its parent pointer
/// promises. Sound only while the parent is locked or the tree is quiescent:
/// a block can change in place under an unlocked parent.
pub fn verify_parent_pointer(
    eb: &ExtentBuffer,
    level: u8,
    transid: u64,
    first_key: Option<&Key>,
) -> Result<(), Error> {
    let generation = eb.generation();
    if transid != 0 && generation != transid {
        return Err(Error::TransidMismatch { bytenr: eb.start, wanted: transid, found: generation });
    }
    let found = eb.level();
    if found != level {
        let e = TreeCheckError::LevelMismatch { bytenr: eb.start, wanted: level, found };
        return Err(Error::BadTreeBlock(e.to_string()));
    }
    if let (Some(&expected), Some(found)) = (first_key, eb.first_key())
        && expected != found
    {
        let e = TreeCheckError::FirstKeyMismatch { bytenr: eb.start, transid, expected, found };
        return Err(Error::BadTreeBlock(e.to_string()));
    }
    Ok(())
}

/// [`read_tree_block`] for a caller that holds the parent's lock or reads a
/// quiescent tree: a cached block is checked against the parent pointer too.
pub async fn read_tree_block_verified(
    fs: &FsInfo,
    bytenr: u64,
    owner_root: u64,
    level: u8,
    parent_transid: u64,
    first_key: Option<Key>,
) -> Result<Rc<ExtentBuffer>, Error> {
    let eb = read_tree_block(fs, bytenr, owner_root, level, parent_transid, first_key).await?;
    verify_parent_pointer(&eb, level, parent_transid, first_key.as_ref())?;
    Ok(eb)
}

/// `read_extent_buffer_pages`: make `eb` up to date, reading it once even
/// with several readers (the READING bit; the others wait for it and get
/// EIO if it failed). Only the reader that submits the bio validates the
/// image against its `check` (`end_bbio_meta_read`): by the time a waiter
/// runs, the block may already have been modified in place.
async fn read_extent_buffer_pages(
    fs: &FsInfo,
    eb: &Rc<ExtentBuffer>,
    check: &ParentCheck,
) -> Result<(), Error> {
    if eb.uptodate() {
        return Ok(());
    }
    let offset_bytes = map_block(fs, eb.start);
    if eb.test_bit(EXTENT_BUFFER_READING) {
        let what = WaitOn::Io { what: "eb_read", offset_bytes };
        declared(&*fs.env, what, eb.read_wait.wait_until(|| !eb.test_bit(EXTENT_BUFFER_READING))).await;
        if !eb.uptodate() {
            return Err(Error::Io { bytenr: eb.start });
        }
        return Ok(());
    }
    eb.set_bit(EXTENT_BUFFER_READING);
    let done: Completion<BioStatus> = Completion::new();
    let signal = done.clone();
    fs.stats.eb_reads.set(fs.stats.eb_reads.get() + 1);
    fs.env.submit_bio(
        Bio::Read { offset_bytes, len_bytes: eb.len },
        Box::new(move |status| signal.complete(status)),
    );
    let status = declared(&*fs.env, WaitOn::Io { what: "tree_block_read", offset_bytes }, done).await;
    let result = match status {
        BioStatus::IoError => Err(Error::Io { bytenr: eb.start }),
        BioStatus::Ok(bytes) => {
            assert_eq!(bytes.len(), eb.len as usize, "short tree block read");
            let verdict = validate_extent_buffer(&bytes, fs.nodesize, check).map_err(Error::from);
            if verdict.is_ok() {
                *eb.data.borrow_mut() = bytes;
                set_extent_buffer_uptodate(eb);
            }
            verdict
        }
    };
    eb.clear_bit(EXTENT_BUFFER_READING);
    eb.read_wait.wake_all();
    result
}

// ---------------------------------------------------------------------------
// Writeback.

/// `lock_extent_buffer_for_io`: decide whether `eb` gets written now and,
/// if so, move it from DIRTY to WRITEBACK and set its WRITTEN header flag.
///
/// With [`SyncMode::None`] (background, reclaim) an eb whose tree lock is
/// held or that is already under writeback is skipped; with
/// [`SyncMode::All`] (commit) the lock and the running write are waited
/// for. Then a dirty eb is left alone under fix `search-pin` while it has
/// writeback blockers (any mode), and under `inhibit-writeback`/`both`
/// while it has inhibitors (mode None only). Returns whether the caller
/// must write it ([`write_one_eb`]).
pub async fn lock_extent_buffer_for_io(fs: &FsInfo, eb: &ExtentBuffer, mode: SyncMode) -> bool {
    match mode {
        SyncMode::None => lock_extent_buffer_for_io_nowait(fs, eb, mode),
        SyncMode::All => {
            loop {
                tree_lock(fs, eb).await;
                if !eb.under_writeback() {
                    break;
                }
                tree_unlock(eb);
                wait_on_extent_buffer_writeback(fs, eb).await;
            }
            decide_write_locked(fs, eb, mode)
        }
    }
}

/// [`lock_extent_buffer_for_io`] without blocking, for any mode: a held
/// lock or a write in flight skips the eb.
pub fn lock_extent_buffer_for_io_nowait(fs: &FsInfo, eb: &ExtentBuffer, mode: SyncMode) -> bool {
    if !try_tree_write_lock(eb) {
        return false;
    }
    if eb.under_writeback() {
        tree_unlock(eb);
        return false;
    }
    decide_write_locked(fs, eb, mode)
}

/// The part under the write lock, which it releases.
fn decide_write_locked(fs: &FsInfo, eb: &ExtentBuffer, mode: SyncMode) -> bool {
    assert!(eb.lock.is_write_locked());
    assert!(!eb.under_writeback());
    let mut write = false;
    if eb.dirty() {
        if fs.fix.pins_during_search() && eb.writeback_blockers.get() > 0 {
            fs.stats.eb_writeback_blocked.set(fs.stats.eb_writeback_blocked.get() + 1);
            if mode == SyncMode::All {
                // Data-integrity writeback leaving a dirty block behind is
                // worth a line: the commit will not have written it.
                let blockers = u64::from(eb.writeback_blockers.get());
                fs.env.trace(TraceEvent::Note {
                    what: "eb_sync_writeback_blocked",
                    a: eb.start,
                    b: blockers,
                    c: 0,
                });
            }
        } else if fs.fix.inhibits_writeback() && eb.writeback_inhibitors.get() > 0 && mode == SyncMode::None {
            fs.stats.eb_writeback_inhibited.set(fs.stats.eb_writeback_inhibited.get() + 1);
        } else {
            eb.clear_bit(EXTENT_BUFFER_DIRTY);
            eb.set_bit(EXTENT_BUFFER_WRITEBACK);
            eb.set_header_flag(HEADER_FLAG_WRITTEN);
            write = true;
        }
    }
    tree_unlock(eb);
    write
}

/// `prepare_eb_write`: zero the bytes past the last item header (node:
/// past the last key pointer) and before the item data, so no stale
/// content reaches the disk. An nritems out of range is left to the tree
/// checker.
fn prepare_eb_write(data: &mut [u8]) {
    let nodesize = data.len() as u32;
    let nritems = header_nritems(data) as usize;
    if header_level(data) > 0 {
        if nritems <= nodeptrs_per_block(nodesize) as usize {
            let end = key_ptr_offset(nritems);
            data[end..].fill(0);
        }
        return;
    }
    let start = item_nr_offset(nritems);
    if start > data.len() {
        return;
    }
    let data_start = if nritems == 0 { leaf_data_size(nodesize) } else { item_offset(data, nritems - 1) };
    let end = item_nr_offset(0) + data_start as usize;
    if start <= end && end <= data.len() {
        data[start..end].fill(0);
    }
}

/// `write_one_eb` (with `btree_csum_one_bio`): checksum the image, run the
/// write-time tree checker, submit the write. A block the checker rejects
/// is reported as a `tree_checker` violation and not written: the write
/// fails as the kernel's does (-EUCLEAN on the bio), so WRITEBACK clears
/// and the write error is recorded. The caller got `true` from
/// [`lock_extent_buffer_for_io`]. Returns whether a bio was submitted.
pub fn write_one_eb(fs: &FsInfo, eb: &Rc<ExtentBuffer>, mode: SyncMode) -> bool {
    assert!(eb.under_writeback(), "write_one_eb of eb {} not under writeback", eb.start);
    assert!(eb.uptodate(), "writing eb {} that is not up to date", eb.start);
    eb.clear_bit(EXTENT_BUFFER_WRITE_ERR);
    let (image, verdict) = {
        let mut data = eb.data.borrow_mut();
        prepare_eb_write(&mut data);
        let verdict = if header_bytenr(&data) != eb.start {
            Err(format!("bad tree block start, want {} have {}", eb.start, header_bytenr(&data)))
        } else {
            check_tree_block(&data, fs.nodesize, None).map_err(|e| e.to_string())
        };
        if verdict.is_ok() {
            write_header_csum(&mut data);
        }
        (data.clone(), verdict)
    };
    if let Err(reason) = verdict {
        fs.stats.eb_write_check_failures.set(fs.stats.eb_write_check_failures.get() + 1);
        fs.env.report_violation(Violation {
            kind: "tree_checker",
            message: format!("block={} write time tree block corruption detected: {reason}", eb.start),
        });
        end_bbio_meta_write(&fs.weak(), eb, false);
        return false;
    }
    fs.env.trace(TraceEvent::EbWriteback { bytenr: eb.start, sync: mode == SyncMode::All });
    fs.stats.eb_writes.set(fs.stats.eb_writes.get() + 1);
    let running = fs.trans.running.borrow().as_ref().map(|t| (t.transid, t.state()));
    if running == Some((eb.generation(), TransState::Running)) {
        let counter = &fs.stats.eb_writes_of_running_transaction;
        counter.set(counter.get() + 1);
    }
    let (weak, done_eb) = (fs.weak(), eb.clone());
    fs.env.submit_bio(
        Bio::Write { offset_bytes: map_block(fs, eb.start), data: image, fua: false, preflush: false },
        Box::new(move |status| end_bbio_meta_write(&weak, &done_eb, matches!(status, BioStatus::Ok(_)))),
    );
    true
}

/// `end_bbio_meta_write`: on error, `set_btree_ioerr` (WRITE_ERR, no longer
/// up to date, the filesystem's error flag); then WRITEBACK clears and the
/// waiters wake. Runs outside any task.
fn end_bbio_meta_write(fs: &Weak<FsInfo>, eb: &ExtentBuffer, ok: bool) {
    if !ok {
        eb.set_bit(EXTENT_BUFFER_WRITE_ERR);
        clear_extent_buffer_uptodate(eb);
        if let Some(fs) = fs.upgrade() {
            fs.set_btree_ioerr(eb.log_index.get());
        }
    }
    eb.clear_bit(EXTENT_BUFFER_WRITEBACK);
    eb.writeback_wait.wake_all();
}

/// `btree_write_cache_pages`: write back dirty ebs in bytenr order, up to
/// `nr_bytes` submitted; returns the bytes submitted. Never blocks: a
/// locked eb or one already under writeback is skipped in either mode.
/// With [`SyncMode::None`] the pass is cyclic, starting where the last one
/// stopped (the kernel's `writeback_index`) and wrapping once; with
/// [`SyncMode::All`] it scans from the start and writes inhibited ebs too.
/// Data-integrity writeback that must wait is [`write_and_wait_ebs`].
pub fn btree_write_cache_pages(fs: &FsInfo, nr_bytes: u64, mode: SyncMode) -> u64 {
    let cyclic = mode == SyncMode::None;
    let start = if cyclic { fs.buffer_tree.inner.borrow().writeback_index } else { 0 };
    let mut index = start;
    let mut wrapped = start == 0;
    let mut written = 0u64;
    while written < nr_bytes {
        let next = fs.buffer_tree.next_dirty(index).filter(|eb| !(wrapped && start > 0 && eb.start >= start));
        let Some(eb) = next else {
            if wrapped {
                break;
            }
            wrapped = true;
            index = 0;
            continue;
        };
        index = eb.start + 1;
        if lock_extent_buffer_for_io_nowait(fs, &eb, mode) && write_one_eb(fs, &eb, mode) {
            written += u64::from(eb.len);
        }
    }
    if cyclic {
        fs.buffer_tree.inner.borrow_mut().writeback_index = index;
    }
    written
}

/// Data-integrity writeback of the listed blocks, as the commit does for
/// its dirty blocks (`btrfs_write_marked_extents` + `btrfs_wait_extents`):
/// write every dirty one ([`SyncMode::All`], waiting for locks and running
/// writes), then wait until none is under writeback. Blocks no longer
/// cached (freed) are skipped. Fails with EIO naming the first block whose
/// last write failed; the caller (commit) also tests
/// [`FsInfo::test_and_clear_btree_err`] for writes that failed earlier.
pub async fn write_and_wait_ebs(fs: &FsInfo, bytenrs: &[u64]) -> Result<(), Error> {
    let mut ebs = Vec::with_capacity(bytenrs.len());
    for &bytenr in bytenrs {
        let Some(eb) = fs.buffer_tree.get(bytenr) else { continue };
        if lock_extent_buffer_for_io(fs, &eb, SyncMode::All).await {
            write_one_eb(fs, &eb, SyncMode::All);
        }
        ebs.push(eb);
    }
    let mut result = Ok(());
    for eb in &ebs {
        wait_on_extent_buffer_writeback(fs, eb).await;
        if result.is_ok() && eb.test_bit(EXTENT_BUFFER_WRITE_ERR) {
            result = Err(Error::Io { bytenr: eb.start });
        }
    }
    result
}

// ---------------------------------------------------------------------------
// Reclaim.

/// `try_release_extent_buffer` (for the btree inode's `release_folio`):
/// drop the cached eb at `start` if it is clean, not under I/O, unlocked
/// and referenced by the cache alone; give its `nodesize` back. Takes the
/// bytenr rather than the eb because a caller's own reference would keep
/// it alive.
pub fn try_release_extent_buffer(fs: &FsInfo, start: u64) -> bool {
    let released = {
        let mut inner = fs.buffer_tree.inner.borrow_mut();
        let Some(eb) = inner.ebs.get(&start) else { return false };
        let busy = eb.dirty()
            || eb.under_writeback()
            || eb.test_bit(EXTENT_BUFFER_READING)
            || eb.lock.is_locked()
            || Rc::strong_count(eb) != 1;
        if busy {
            return false;
        }
        inner.remove(start)
    };
    debug_assert_eq!(Rc::strong_count(&released), 1);
    drop(released);
    fs.env.memory_release(u64::from(fs.nodesize));
    fs.env.trace(TraceEvent::EbEvict { bytenr: start });
    fs.stats.eb_evictions.set(fs.stats.eb_evictions.get() + 1);
    true
}

/// Evict up to `nr_bytes` (rounded up to whole ebs) of releasable ebs,
/// least recently used first; returns the bytes freed.
pub fn evict_extent_buffers(fs: &FsInfo, nr_bytes: u64) -> u64 {
    let mut freed = 0u64;
    let mut tick = 0u64;
    while freed < nr_bytes {
        let next = fs.buffer_tree.inner.borrow().lru.range(tick..).next().map(|(&t, &start)| (t, start));
        let Some((t, start)) = next else { break };
        tick = t + 1;
        if try_release_extent_buffer(fs, start) {
            freed += u64::from(fs.nodesize);
        }
    }
    freed
}

/// The buffer cache as the environment's reclaim sees it: the kernel's
/// btree inode address space (`btree_writepages`, `btree_release_folio`).
/// Holds the filesystem weakly; once it is gone there is nothing to shrink.
pub struct BtreeShrinker {
    fs: Weak<FsInfo>,
}

impl BtreeShrinker {
    pub fn new(fs: Weak<FsInfo>) -> BtreeShrinker {
        BtreeShrinker { fs }
    }
}

impl Shrinker for BtreeShrinker {
    fn name(&self) -> &'static str {
        "btree"
    }

    fn count(&self) -> CacheCounts {
        self.fs.upgrade().map(|fs| fs.buffer_tree.counts()).unwrap_or_default()
    }

    fn writeback(&self, nr_bytes: u64, mode: SyncMode) -> u64 {
        self.fs.upgrade().map_or(0, |fs| btree_write_cache_pages(&fs, nr_bytes, mode))
    }

    fn evict(&self, nr_bytes: u64) -> u64 {
        self.fs.upgrade().map_or(0, |fs| evict_extent_buffers(&fs, nr_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accessors::{NewBlockHeader, init_tree_block, insert_item_in_leaf, set_item_key};
    use crate::fix::FixPolicy;
    use crate::format::{FS_TREE_OBJECTID, ORPHAN_ITEM_KEY, ORPHAN_OBJECTID};
    use crate::locking::{tree_read_lock, tree_read_unlock};
    use crate::testenv::TestEnv;
    use crate::tree_checker::verify_csum;

    const NODESIZE: u32 = 16384;
    const GEN: u64 = 7;

    fn setup(fix: FixPolicy) -> (Rc<TestEnv>, Rc<FsInfo>) {
        let env = TestEnv::new(8 << 20);
        let fs = FsInfo::new(env.clone(), NODESIZE, fix);
        (env, fs)
    }

    fn orphan_key(ino: u64) -> Key {
        Key::new(ORPHAN_OBJECTID, ORPHAN_ITEM_KEY, ino)
    }

    /// A valid FS tree leaf with two orphan items, checksummed.
    fn leaf_image(bytenr: u64, generation: u64) -> Vec<u8> {
        let mut b = vec![0u8; NODESIZE as usize];
        let header = NewBlockHeader {
            bytenr,
            generation,
            owner: FS_TREE_OBJECTID,
            level: 0,
            fsid: [0xf5; 16],
            chunk_tree_uuid: [0xc7; 16],
        };
        init_tree_block(&mut b, &header);
        insert_item_in_leaf(&mut b, 0, &orphan_key(257), &[]);
        insert_item_in_leaf(&mut b, 1, &orphan_key(258), &[]);
        write_header_csum(&mut b);
        b
    }

    fn read(
        env: &TestEnv,
        fs: &Rc<FsInfo>,
        bytenr: u64,
        level: u8,
        transid: u64,
        key: Option<Key>,
    ) -> Result<Rc<ExtentBuffer>, Error> {
        let fs = fs.clone();
        env.run(async move { read_tree_block(&fs, bytenr, FS_TREE_OBJECTID, level, transid, key).await })
    }

    /// A cached, up-to-date, dirty leaf of generation GEN (as a COW leaves it).
    fn dirty_leaf(env: &TestEnv, fs: &Rc<FsInfo>, bytenr: u64) -> Rc<ExtentBuffer> {
        let fs = fs.clone();
        env.run(async move {
            let eb = alloc_extent_buffer(&fs, bytenr).await;
            tree_lock(&fs, &eb).await;
            eb.data.borrow_mut().copy_from_slice(&leaf_image(bytenr, GEN));
            set_extent_buffer_uptodate(&eb);
            assert!(!set_extent_buffer_dirty(&eb));
            tree_unlock(&eb);
            eb
        })
    }

    fn lock_for_io(env: &TestEnv, fs: &Rc<FsInfo>, eb: &Rc<ExtentBuffer>, mode: SyncMode) -> bool {
        let (fs, eb) = (fs.clone(), eb.clone());
        env.run(async move { lock_extent_buffer_for_io(&fs, &eb, mode).await })
    }

    #[test]
    fn read_tree_block_reads_verifies_and_caches() {
        let (env, fs) = setup(FixPolicy::None);
        env.write_device(1 << 20, &leaf_image(1 << 20, GEN));
        let eb = read(&env, &fs, 1 << 20, 0, GEN, Some(orphan_key(257))).unwrap();
        assert!(eb.uptodate() && !eb.dirty());
        assert_eq!((eb.generation(), eb.level(), eb.owner(), eb.nritems()), (GEN, 0, FS_TREE_OBJECTID, 2));
        assert_eq!(eb.first_key(), Some(orphan_key(257)));
        assert_eq!(env.count_bios("read"), 1);
        assert_eq!(env.memory_bytes(), u64::from(NODESIZE));
        drop(eb);
        // Cached: no second bio, no second charge.
        let again = read(&env, &fs, 1 << 20, 0, GEN, None).unwrap();
        assert_eq!(env.count_bios("read"), 1);
        assert_eq!(env.memory_bytes(), u64::from(NODESIZE));
        // A cached block is returned as it is, whatever the caller expects:
        // it may have been modified in place since it was read, so only a
        // caller holding the parent's lock can judge it, with
        // verify_parent_pointer.
        drop(again);
        let cached = read(&env, &fs, 1 << 20, 1, GEN + 1, Some(orphan_key(1))).unwrap();
        assert_eq!((cached.generation(), cached.level()), (GEN, 0));
        assert_eq!(
            verify_parent_pointer(&cached, 0, GEN + 1, None),
            Err(Error::TransidMismatch { bytenr: 1048576, wanted: 8, found: 7 })
        );
        assert!(
            matches!(verify_parent_pointer(&cached, 1, GEN, None), Err(Error::BadTreeBlock(m)) if m.contains("level verify failed"))
        );
        assert!(
            matches!(verify_parent_pointer(&cached, 0, GEN, Some(&orphan_key(1))), Err(Error::BadTreeBlock(m)) if m.contains("first key mismatch"))
        );
        assert_eq!(verify_parent_pointer(&cached, 0, GEN, Some(&orphan_key(257))), Ok(()));
        assert_eq!(env.count_bios("read"), 1);
    }

    #[test]
    fn read_tree_block_reports_each_corruption() {
        let (env, fs) = setup(FixPolicy::None);
        let at = |i: u64| (1u64 << 20) + i * u64::from(NODESIZE);
        // Checksum: a flipped byte in an item header after checksumming.
        let mut img = leaf_image(at(0), GEN);
        img[200] ^= 0x40;
        env.write_device(at(0), &img);
        assert!(
            matches!(read(&env, &fs, at(0), 0, GEN, None), Err(Error::Csum { bytenr, .. }) if bytenr == at(0))
        );
        // Bytenr: a block written where another belongs (misdirected write).
        env.write_device(at(1), &leaf_image(at(2), GEN));
        assert!(
            matches!(read(&env, &fs, at(1), 0, GEN, None), Err(Error::BadBytenr { bytenr, found }) if bytenr == at(1) && found == at(2))
        );
        // Transid: an older version of the block than the parent expects.
        env.write_device(at(3), &leaf_image(at(3), GEN - 1));
        let e = read(&env, &fs, at(3), 0, GEN, None).unwrap_err();
        assert_eq!(e, Error::TransidMismatch { bytenr: at(3), wanted: GEN, found: GEN - 1 });
        assert_eq!(e.errno(), 5);
        // Tree checker: keys out of order, checksum valid.
        let mut img = leaf_image(at(4), GEN);
        set_item_key(&mut img, 1, &orphan_key(1));
        write_header_csum(&mut img);
        env.write_device(at(4), &img);
        assert!(
            matches!(read(&env, &fs, at(4), 0, GEN, None), Err(Error::BadTreeBlock(m)) if m.contains("bad key order"))
        );
        // Level and first key against the parent pointer.
        env.write_device(at(5), &leaf_image(at(5), GEN));
        assert!(
            matches!(read(&env, &fs, at(5), 1, GEN, None), Err(Error::BadTreeBlock(m)) if m.contains("level verify failed"))
        );
        assert!(
            matches!(read(&env, &fs, at(5), 0, GEN, Some(orphan_key(9))), Err(Error::BadTreeBlock(m)) if m.contains("first key mismatch"))
        );
        // Device error.
        env.write_device(at(6), &leaf_image(at(6), GEN));
        env.fail_offsets.borrow_mut().insert(at(6));
        assert_eq!(read(&env, &fs, at(6), 0, GEN, None).unwrap_err(), Error::Io { bytenr: at(6) });
        // Nothing failed stays cached or charged; each failure was one read.
        assert!(fs.buffer_tree.is_empty());
        assert_eq!(env.memory_bytes(), 0);
        assert_eq!(env.count_bios("read"), 7);
        assert_eq!(fs.stats.eb_read_errors.get(), 7);
        // The good copy reads fine afterwards.
        env.fail_offsets.borrow_mut().clear();
        assert!(read(&env, &fs, at(6), 0, GEN, None).is_ok());
    }

    #[test]
    fn concurrent_readers_submit_one_bio() {
        let (env, fs) = setup(FixPolicy::None);
        env.write_device(1 << 20, &leaf_image(1 << 20, GEN));
        let spawn_reader = |name| {
            let fs = fs.clone();
            env.spawn_with_result(name, async move { read_tree_block(&fs, 1 << 20, 5, 0, GEN, None).await })
        };
        let (a, b) = (spawn_reader("a"), spawn_reader("b"));
        env.run_until_idle();
        let a = a.borrow_mut().take().unwrap().unwrap();
        let b = b.borrow_mut().take().unwrap().unwrap();
        assert!(Rc::ptr_eq(&a, &b));
        assert_eq!(env.count_bios("read"), 1);
        // The loser of the allocation race gave its charge back.
        assert_eq!(env.memory_bytes(), u64::from(NODESIZE));
        assert_eq!(fs.stats.eb_allocs.get(), 1);
    }

    /// The waiter does not judge the block by its own (now stale) view of the
    /// parent pointer: the reader that submitted the bio validated it, and
    /// may have modified it in place before the waiter runs (possible under
    /// `overwrite-written`). Checking again here reported a false "first key
    /// mismatch" and aborted the transaction.
    #[test]
    fn waiter_accepts_a_block_modified_in_place_after_the_read() {
        let (env, fs) = setup(FixPolicy::OverwriteWritten);
        env.write_device(1 << 20, &leaf_image(1 << 20, GEN));
        let a = {
            let fs = fs.clone();
            env.spawn_with_result("a", async move {
                let eb = read_tree_block(&fs, 1 << 20, 5, 0, GEN, Some(orphan_key(257))).await?;
                set_item_key(&mut eb.data.borrow_mut(), 0, &orphan_key(1));
                Ok::<_, Error>(eb)
            })
        };
        let b = {
            let fs = fs.clone();
            env.spawn_with_result("b", async move {
                read_tree_block(&fs, 1 << 20, 5, 0, GEN, Some(orphan_key(257))).await
            })
        };
        env.hold_bios.set(true);
        env.run_until_idle();
        assert_eq!(env.waits_of("b"), Some(WaitOn::Io { what: "eb_read", offset_bytes: 1 << 20 }));
        env.hold_bios.set(false);
        env.run_until_idle();
        let a = a.borrow_mut().take().unwrap().unwrap();
        let b = b.borrow_mut().take().unwrap().unwrap();
        assert!(Rc::ptr_eq(&a, &b));
        assert_eq!(b.first_key(), Some(orphan_key(1)));
    }

    #[test]
    fn reader_waiting_on_a_failed_read_gets_eio() {
        let (env, fs) = setup(FixPolicy::None);
        env.fail_offsets.borrow_mut().insert(1 << 20);
        let spawn_reader = |name| {
            let fs = fs.clone();
            env.spawn_with_result(name, async move { read_tree_block(&fs, 1 << 20, 5, 0, GEN, None).await })
        };
        let (a, b) = (spawn_reader("a"), spawn_reader("b"));
        env.hold_bios.set(true);
        env.run_until_idle();
        assert_eq!(env.waits_of("a"), Some(WaitOn::Io { what: "tree_block_read", offset_bytes: 1 << 20 }));
        assert_eq!(env.waits_of("b"), Some(WaitOn::Io { what: "eb_read", offset_bytes: 1 << 20 }));
        env.hold_bios.set(false);
        env.run_until_idle();
        assert_eq!(a.borrow_mut().take().unwrap().unwrap_err(), Error::Io { bytenr: 1 << 20 });
        assert_eq!(b.borrow_mut().take().unwrap().unwrap_err(), Error::Io { bytenr: 1 << 20 });
        assert_eq!(env.count_bios("read"), 1);
        assert!(fs.buffer_tree.is_empty());
        assert_eq!(env.memory_bytes(), 0);
    }

    #[test]
    fn lock_for_io_skips_a_held_eb_in_mode_none_and_waits_in_mode_all() {
        let (env, fs) = setup(FixPolicy::None);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        // Someone holds it for write: background writeback passes it by.
        assert!(eb.lock.try_write_lock());
        assert!(!lock_for_io(&env, &fs, &eb, SyncMode::None));
        assert_eq!(btree_write_cache_pages(&fs, u64::MAX, SyncMode::None), 0);
        assert!(eb.dirty() && !eb.under_writeback() && !eb.header_flag_written());
        eb.lock.write_unlock();
        // A reader is enough to make it skip, too.
        env.run({
            let (fs, eb) = (fs.clone(), eb.clone());
            async move { tree_read_lock(&fs, &eb).await }
        });
        assert!(!lock_for_io(&env, &fs, &eb, SyncMode::None));
        tree_read_unlock(&eb);
        // Data-integrity writeback waits for the lock instead.
        assert!(eb.lock.try_write_lock());
        let got = {
            let (fs, eb) = (fs.clone(), eb.clone());
            env.spawn_with_result("commit", async move {
                lock_extent_buffer_for_io(&fs, &eb, SyncMode::All).await
            })
        };
        env.run_until_idle();
        assert!(got.borrow().is_none());
        assert_eq!(env.waits_of("commit"), Some(WaitOn::TreeLockWrite { bytenr: 1 << 20 }));
        assert!(eb.dirty());
        eb.lock.write_unlock();
        env.run_until_idle();
        assert_eq!(*got.borrow(), Some(true));
        assert!(!eb.dirty() && eb.under_writeback() && eb.header_flag_written());
        assert!(!eb.lock.is_locked());
    }

    #[test]
    fn mode_all_waits_for_a_running_write() {
        let (env, fs) = setup(FixPolicy::None);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        env.hold_bios.set(true);
        assert_eq!(btree_write_cache_pages(&fs, u64::MAX, SyncMode::None), u64::from(NODESIZE));
        // Redirtied while the first write is in flight.
        assert!(eb.lock.try_write_lock());
        set_extent_buffer_dirty(&eb);
        eb.lock.write_unlock();
        assert!(!lock_for_io(&env, &fs, &eb, SyncMode::None));
        let done = {
            let fs = fs.clone();
            env.spawn_with_result("commit", async move { write_and_wait_ebs(&fs, &[1 << 20]).await })
        };
        env.run_until_idle();
        assert_eq!(env.waits_of("commit"), Some(WaitOn::Io { what: "eb_writeback", offset_bytes: 1 << 20 }));
        env.hold_bios.set(false);
        env.run_until_idle();
        assert_eq!(*done.borrow(), Some(Ok(())));
        assert_eq!(env.count_bios("write"), 2);
        assert!(!eb.dirty() && !eb.under_writeback());
    }

    #[test]
    fn writeback_sets_written_clears_dirty_and_completion_clears_writeback() {
        let (env, fs) = setup(FixPolicy::None);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        assert_eq!(fs.buffer_tree.counts().dirty_bytes, u64::from(NODESIZE));
        env.hold_bios.set(true);
        assert_eq!(btree_write_cache_pages(&fs, 1, SyncMode::None), u64::from(NODESIZE));
        assert!(!eb.dirty() && eb.under_writeback() && eb.header_flag_written());
        assert_eq!(fs.buffer_tree.counts().writeback_bytes, u64::from(NODESIZE));
        assert_eq!(env.pending_bios(), 1);
        assert_eq!(
            env.traces.borrow().last(),
            Some(&TraceEvent::EbWriteback { bytenr: 1 << 20, sync: false })
        );
        // Under writeback, it cannot be evicted.
        drop(eb);
        assert_eq!(evict_extent_buffers(&fs, u64::MAX), 0);
        env.complete_bios();
        let eb = fs.buffer_tree.get(1 << 20).unwrap();
        assert!(!eb.under_writeback() && !eb.dirty() && eb.uptodate());
        assert_eq!(fs.buffer_tree.counts().clean_bytes, u64::from(NODESIZE));
        // What reached the disk is the image with WRITTEN and a valid checksum.
        let disk = env.read_device(1 << 20, NODESIZE as usize);
        assert!(verify_csum(&disk));
        assert!(header_flag(&disk, HEADER_FLAG_WRITTEN));
        assert_eq!(disk, *eb.data.borrow());
        // Nothing dirty left: a second pass writes nothing.
        assert_eq!(btree_write_cache_pages(&fs, u64::MAX, SyncMode::None), 0);
        // The commit path traces sync writes.
        env.hold_bios.set(false);
        let eb2 = dirty_leaf(&env, &fs, 2 << 20);
        env.run({
            let fs = fs.clone();
            async move { write_and_wait_ebs(&fs, &[1 << 20, 2 << 20, 3 << 20]).await.unwrap() }
        });
        assert!(!eb2.dirty() && !eb2.under_writeback() && eb2.header_flag_written());
        assert_eq!(
            env.traces.borrow().last(),
            Some(&TraceEvent::EbWriteback { bytenr: 2 << 20, sync: true })
        );
        assert_eq!(env.count_bios("write"), 2);
    }

    #[test]
    fn background_writeback_is_cyclic_and_bounded() {
        let (env, fs) = setup(FixPolicy::None);
        let starts: Vec<u64> = (1..=4).map(|i| i << 20).collect();
        for &s in &starts {
            dirty_leaf(&env, &fs, s);
        }
        let order = |env: &TestEnv| -> Vec<u64> {
            env.traces
                .borrow()
                .iter()
                .filter_map(|t| match t {
                    TraceEvent::EbWriteback { bytenr, .. } => Some(*bytenr),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            btree_write_cache_pages(&fs, 2 * u64::from(NODESIZE), SyncMode::None),
            2 * u64::from(NODESIZE)
        );
        assert_eq!(order(&env), starts[..2]);
        env.run_until_idle();
        // Redirty the first: the next pass resumes at the third, then wraps.
        let first = fs.buffer_tree.get(starts[0]).unwrap();
        assert!(first.lock.try_write_lock());
        set_extent_buffer_dirty(&first);
        first.lock.write_unlock();
        assert_eq!(btree_write_cache_pages(&fs, u64::MAX, SyncMode::None), 3 * u64::from(NODESIZE));
        assert_eq!(order(&env), [starts[0], starts[1], starts[2], starts[3], starts[0]]);
    }

    #[test]
    fn search_pin_blocker_keeps_dirty_for_every_mode() {
        let (env, fs) = setup(FixPolicy::SearchPin);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        assert!(eb.lock.try_write_lock());
        eb.add_writeback_blocker();
        eb.lock.write_unlock();
        for mode in [SyncMode::None, SyncMode::All] {
            assert!(!lock_for_io(&env, &fs, &eb, mode));
            assert_eq!(btree_write_cache_pages(&fs, u64::MAX, mode), 0);
        }
        env.run({
            let fs = fs.clone();
            async move { write_and_wait_ebs(&fs, &[1 << 20]).await.unwrap() }
        });
        assert!(eb.dirty() && !eb.header_flag_written());
        assert_eq!(env.count_bios("write"), 0);
        assert!(fs.stats.eb_writeback_blocked.get() >= 5);
        let note = TraceEvent::Note { what: "eb_sync_writeback_blocked", a: 1 << 20, b: 1, c: 0 };
        assert!(env.traces.borrow().contains(&note));
        // When the search returns, writeback proceeds.
        eb.remove_writeback_blocker();
        assert!(lock_for_io(&env, &fs, &eb, SyncMode::None));
        assert!(eb.header_flag_written());
    }

    #[test]
    fn blockers_and_inhibitors_are_ignored_without_their_fix() {
        for fix in [FixPolicy::None, FixPolicy::OverwriteWritten] {
            let (env, fs) = setup(fix);
            let eb = dirty_leaf(&env, &fs, 1 << 20);
            assert!(eb.lock.try_write_lock());
            eb.add_writeback_blocker();
            eb.add_writeback_inhibitor();
            eb.lock.write_unlock();
            assert!(lock_for_io(&env, &fs, &eb, SyncMode::None), "{fix}");
        }
        // Under inhibit-writeback a blocker means nothing either.
        let (env, fs) = setup(FixPolicy::InhibitWriteback);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        assert!(eb.lock.try_write_lock());
        eb.add_writeback_blocker();
        eb.lock.write_unlock();
        assert!(lock_for_io(&env, &fs, &eb, SyncMode::None));
    }

    #[test]
    fn inhibitor_blocks_only_background_writeback() {
        for fix in [FixPolicy::InhibitWriteback, FixPolicy::Both] {
            let (env, fs) = setup(fix);
            let eb = dirty_leaf(&env, &fs, 1 << 20);
            eb.add_writeback_inhibitor();
            assert!(!lock_for_io(&env, &fs, &eb, SyncMode::None), "{fix}");
            assert_eq!(btree_write_cache_pages(&fs, u64::MAX, SyncMode::None), 0);
            assert!(eb.dirty() && !eb.header_flag_written());
            assert_eq!(fs.stats.eb_writeback_inhibited.get(), 2);
            // The shrinker (reclaim) is background writeback too.
            let shrinker = env.shrinkers.borrow()[0].clone();
            assert_eq!(shrinker.writeback(u64::MAX, SyncMode::None), 0);
            // Data-integrity writeback writes it regardless.
            env.run({
                let fs = fs.clone();
                async move { write_and_wait_ebs(&fs, &[1 << 20]).await.unwrap() }
            });
            assert!(!eb.dirty() && eb.header_flag_written());
            assert_eq!(env.count_bios("write"), 1);
            eb.remove_writeback_inhibitor();
        }
    }

    #[test]
    fn eviction_frees_only_clean_unlocked_unreferenced_ebs() {
        let (env, fs) = setup(FixPolicy::None);
        let mb = |i: u64| i << 20;
        // clean1, dirty, writeback, locked, referenced, clean2 (in LRU order).
        for i in 1..=6 {
            env.write_device(mb(i), &leaf_image(mb(i), GEN));
            read(&env, &fs, mb(i), 0, GEN, None).unwrap();
        }
        let dirty = fs.buffer_tree.get(mb(2)).unwrap();
        assert!(dirty.lock.try_write_lock());
        set_extent_buffer_dirty(&dirty);
        dirty.lock.write_unlock();
        drop(dirty);
        let wb = fs.buffer_tree.get(mb(3)).unwrap();
        assert!(wb.lock.try_write_lock());
        set_extent_buffer_dirty(&wb);
        wb.lock.write_unlock();
        env.hold_bios.set(true);
        assert!(lock_extent_buffer_for_io_nowait(&fs, &wb, SyncMode::None));
        assert!(write_one_eb(&fs, &wb, SyncMode::None));
        drop(wb);
        assert!(fs.buffer_tree.get(mb(4)).unwrap().lock.try_read_lock());
        let referenced = find_extent_buffer(&fs, mb(5)).unwrap();
        assert_eq!(env.memory_bytes(), 6 * u64::from(NODESIZE));
        let shrinker = env.shrinkers.borrow()[0].clone();
        // Least recently used first: one eb's worth frees clean1 only.
        assert_eq!(shrinker.evict(1), u64::from(NODESIZE));
        assert_eq!(fs.buffer_tree.starts(), [mb(2), mb(3), mb(4), mb(5), mb(6)]);
        assert_eq!(shrinker.evict(u64::MAX), u64::from(NODESIZE));
        assert_eq!(fs.buffer_tree.starts(), [mb(2), mb(3), mb(4), mb(5)]);
        assert_eq!(env.memory_bytes(), 4 * u64::from(NODESIZE));
        let evicted: Vec<_> =
            env.traces.borrow().iter().filter(|t| matches!(t, TraceEvent::EbEvict { .. })).cloned().collect();
        assert_eq!(evicted, [TraceEvent::EbEvict { bytenr: mb(1) }, TraceEvent::EbEvict { bytenr: mb(6) }]);
        // Once each is let go, all go, each giving back exactly nodesize.
        env.complete_bios();
        fs.buffer_tree.get(mb(4)).unwrap().lock.read_unlock();
        drop(referenced);
        assert_eq!(shrinker.evict(u64::MAX), 3 * u64::from(NODESIZE));
        assert_eq!(fs.buffer_tree.starts(), [mb(2)]);
        assert_eq!(env.memory_bytes(), u64::from(NODESIZE));
        assert!(!try_release_extent_buffer(&fs, mb(2)));
    }

    #[test]
    fn lookups_refresh_the_lru() {
        let (env, fs) = setup(FixPolicy::None);
        for i in 1..=3u64 {
            env.write_device(i << 20, &leaf_image(i << 20, GEN));
            read(&env, &fs, i << 20, 0, GEN, None).unwrap();
        }
        drop(find_extent_buffer(&fs, 1 << 20));
        assert_eq!(evict_extent_buffers(&fs, 1), u64::from(NODESIZE));
        assert_eq!(fs.buffer_tree.starts(), [1 << 20, 3 << 20]);
        assert_eq!(evict_extent_buffers(&fs, 1), u64::from(NODESIZE));
        assert_eq!(fs.buffer_tree.starts(), [1 << 20]);
    }

    #[test]
    fn tree_checker_rejects_a_corrupt_image_at_write_time() {
        let (env, fs) = setup(FixPolicy::None);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        set_item_key(&mut eb.data.borrow_mut(), 1, &orphan_key(1));
        assert_eq!(btree_write_cache_pages(&fs, u64::MAX, SyncMode::None), 0);
        assert_eq!(env.count_bios("write"), 0);
        let violations = env.violations.borrow();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].kind, "tree_checker");
        assert!(
            violations[0].message.contains("write time tree block corruption detected"),
            "{}",
            violations[0].message
        );
        assert!(violations[0].message.contains("bad key order"));
        // The write failed as the kernel's does: no writeback left, an error recorded.
        assert!(!eb.under_writeback() && eb.test_bit(EXTENT_BUFFER_WRITE_ERR));
        assert_eq!(fs.writeback_errors.get(), 1);
        assert!(fs.test_and_clear_btree_err());
        assert!(!env.traces.borrow().iter().any(|t| matches!(t, TraceEvent::EbWriteback { .. })));
    }

    #[test]
    fn write_error_fails_the_wait() {
        let (env, fs) = setup(FixPolicy::None);
        let eb = dirty_leaf(&env, &fs, 1 << 20);
        env.fail_offsets.borrow_mut().insert(1 << 20);
        let result = env.run({
            let fs = fs.clone();
            async move { write_and_wait_ebs(&fs, &[1 << 20]).await }
        });
        assert_eq!(result, Err(Error::Io { bytenr: 1 << 20 }));
        assert!(eb.test_bit(EXTENT_BUFFER_WRITE_ERR) && !eb.uptodate() && !eb.under_writeback());
        assert_eq!(fs.writeback_errors.get(), 1);
        assert!(fs.test_and_clear_btree_err());
    }

    #[test]
    fn free_stale_drops_clean_ebs_and_keeps_ones_under_io() {
        let (env, fs) = setup(FixPolicy::None);
        env.write_device(1 << 20, &leaf_image(1 << 20, GEN));
        let clean = read(&env, &fs, 1 << 20, 0, GEN, None).unwrap();
        let dirty = dirty_leaf(&env, &fs, 2 << 20);
        assert_eq!(env.memory_bytes(), 2 * u64::from(NODESIZE));
        free_extent_buffer_stale(&fs, &clean);
        free_extent_buffer_stale(&fs, &dirty);
        assert!(clean.test_bit(EXTENT_BUFFER_STALE) && dirty.test_bit(EXTENT_BUFFER_STALE));
        assert_eq!(fs.buffer_tree.starts(), [2 << 20]);
        assert_eq!(env.memory_bytes(), u64::from(NODESIZE));
        // A new eb for the freed bytenr is a fresh one.
        let fresh = env.run({
            let fs = fs.clone();
            async move { alloc_extent_buffer(&fs, 1 << 20).await }
        });
        assert!(!Rc::ptr_eq(&fresh, &clean) && !fresh.uptodate());
    }
}
