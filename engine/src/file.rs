//! File data (kernel: file.c, the data half of inode.c, ordered-data.c,
//! delalloc-space.c, and the page cache of mm/filemap.c as btrfs uses it).
//!
//! The path of a buffered write, as in the kernel:
//! 1. `write` reserves metadata for the delalloc extent it may create
//!    (`btrfs_delalloc_reserve_metadata`: a file extent insert, the csum
//!    leaves, the inode update) and data space for every sector it newly
//!    dirties (`btrfs_check_data_free_space`: data `bytes_may_use`, after
//!    allocating data chunks and committing if needed), reads the partial
//!    pages it does not overwrite, copies into the page cache and marks the
//!    pages dirty (delalloc). Nothing is allocated on disk yet.
//! 2. Writeback (the flusher, memory reclaim, `sync`) turns each run of
//!    contiguous dirty pages into one extent: a file of at most 2 KiB whose
//!    only page is dirty becomes an inline EXTENT_DATA item in a joined
//!    transaction (`cow_file_range_inline`); anything else gets a data
//!    extent (`btrfs_reserve_extent`), an ordered extent, and a write bio.
//! 3. When the bio ends, the endio worker (`btrfs-endio-write`) finishes the
//!    ordered extent in a joined transaction charged to the write's
//!    reservation (`btrfs_finish_one_ordered`): drop the file extents the
//!    range replaces, insert the new EXTENT_DATA item and its data ref, insert
//!    the checksums, move `disk_i_size`, update the inode.
//!
//! Reads come from the page cache, else from disk, where every sector is
//! checked against its crc32c in the csum tree: a mismatch is reported and
//! the read fails with EIO, never returning the bytes.
//!
//! Pages are charged to the memory budget and reclaimed through the "data"
//! shrinker, which starts writeback of dirty runs and drops clean pages.
//!
//! Departures, each for a reason:
//! - pages are sectors (4 KiB), no folios, no readahead;
//! - a page stays "under writeback" until its ordered extent finishes (the
//!   kernel ends page writeback at bio completion and keeps the new extent
//!   in an extent map meanwhile; without extent maps the page must stay);
//! - reclaim's writeback (a synchronous shrinker call) skips inline
//!   candidates, which need a transaction: they are written by `sync`,
//!   fsync-like callers and the truncation paths;
//! - the delalloc metadata reservation of an inode is kept as the kernel
//!   computes it (`btrfs_calculate_inode_block_rsv_size`) but per dirty run:
//!   each run of dirty pages is one outstanding extent worth a file extent
//!   insert, its csum leaves and one inode update;
//! - no prealloc, compression, NOCOW, direct I/O, extent maps or io trees.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::{Rc, Weak};

use crate::block_rsv::{
    BlockRsvType, TransRsvAccount, block_rsv_add_bytes, calc_insert_metadata_size, calc_metadata_size,
};
use crate::ctree::{
    Path, Root, del_items, insert_item, next_leaf, search_slot, set_item_key_safe, truncate_item,
};
use crate::delayed_ref::DataRefKey;
use crate::env::{Bio, BioStatus, CacheCounts, Shrinker, SyncMode, TaskKind, TraceEvent, Violation, WaitOn};
use crate::error::Error;
use crate::extent_tree::{free_unused_data_extent, reserve_data_extent};
use crate::file_item::{csum_bytes_to_leaves, csum_file_blocks, lookup_csum};
use crate::format::{
    BLOCK_GROUP_DATA, EXTENT_DATA_KEY, FS_TREE_OBJECTID, FileExtentBody, FileExtentItem, Key, csum_data,
    max_inline_data_size,
};
use crate::fs::FsInfo;
use crate::inode::{dirty_inode, fs_root, iget, lock_inode, update_inode};
use crate::space_info::{FlushKind, reserve_metadata_bytes};
use crate::transaction::{
    TransHandle, abort_transaction, end_transaction, join_transaction, start_transaction, sync,
};
use crate::wait::{Completion, WaitQueue, declared};

/// The page size, equal to the sector size.
pub const PAGE_SIZE: u64 = 4096;
/// `BTRFS_DEFAULT_MAX_INLINE`: files up to this size are stored inline.
pub const MAX_INLINE: u64 = 2048;
/// The largest file the engine accepts (the scenarios stay far below).
pub const MAX_FILE_SIZE: u64 = 1 << 40;
/// Items `btrfs_truncate` starts its transaction with.
pub const TRUNCATE_TRANS_ITEMS: u64 = 2;
/// Items `btrfs_setsize` starts its transaction with when growing a file.
pub const SETSIZE_TRANS_ITEMS: u64 = 1;
/// Items `btrfs_replace_file_extents` (hole punching, no-holes) starts with.
pub const PUNCH_TRANS_ITEMS: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageState {
    /// Same bytes as on disk (or a hole).
    Clean,
    /// Delalloc: newer than the disk, data space reserved.
    Dirty,
    /// Part of an ordered extent not yet finished.
    Writeback,
}

struct Page {
    data: Box<[u8]>,
    state: PageState,
}

/// One inode's pages and delalloc state (the kernel's address space and the
/// delalloc fields of `btrfs_inode`).
#[derive(Default)]
struct InodePages {
    pages: BTreeMap<u64, Page>,
    /// Ordered extents in flight: file offset -> end.
    ordered: BTreeMap<u64, u64>,
    /// Metadata held for this inode's dirty runs (`inode->block_rsv`).
    meta_reserved: u64,
    /// Writeback must not start (truncation and eviction in progress).
    writeback_blocked: u32,
    /// Pages a writer read and is about to overwrite in part: reclaim
    /// leaves them (the kernel's page references of `prepare_pages`).
    pinned: BTreeSet<u64>,
    /// A data write failed since the last check (`mapping_set_error`).
    mapping_error: bool,
}

/// An ordered extent (`btrfs_ordered_extent`): a run of pages written to a
/// newly allocated data extent, finished once its bio ends.
#[derive(Clone, Debug)]
pub struct OrderedExtent {
    pub id: u64,
    pub ino: u64,
    pub file_offset: u64,
    pub len: u64,
    pub disk_bytenr: u64,
    pub sums: Vec<u32>,
    /// Metadata moved from the inode's reservation for finishing it.
    pub meta_share: u64,
    pub io_error: bool,
}

/// Counters of the data path, for reports and tests. Monotonic.
#[derive(Debug, Default)]
pub struct DataStats {
    pub writes: Cell<u64>,
    pub bytes_written: Cell<u64>,
    pub reads: Cell<u64>,
    pub page_reads: Cell<u64>,
    pub ordered_extents: Cell<u64>,
    pub ordered_bytes: Cell<u64>,
    pub inline_extents: Cell<u64>,
    pub pages_evicted: Cell<u64>,
    pub csum_failures: Cell<u64>,
    pub write_errors: Cell<u64>,
}

/// The page cache of every inode of the fs tree, the ordered extents and
/// the queue of the endio worker.
#[derive(Default)]
pub struct PageCache {
    inodes: RefCell<BTreeMap<u64, InodePages>>,
    counts: Cell<CacheCounts>,
    next_ordered: Cell<u64>,
    in_flight: RefCell<BTreeSet<u64>>,
    /// Ordered extents whose bio ended, for the endio worker.
    completed: RefCell<VecDeque<OrderedExtent>>,
    worker_wait: WaitQueue,
    /// The endio worker runs (started with the first ordered extent, so a
    /// filesystem that never writes data schedules exactly as before).
    worker_started: Cell<bool>,
    /// Woken when an ordered extent finishes or a page changes state.
    wait: WaitQueue,
    /// Where the shrinker's writeback and eviction go on (inode number).
    cursor: Cell<u64>,
    pub stats: DataStats,
}

impl PageCache {
    fn with<T>(&self, ino: u64, f: impl FnOnce(&mut InodePages) -> T) -> T {
        f(self.inodes.borrow_mut().entry(ino).or_default())
    }

    fn count(&self, state: PageState, delta: i64) {
        let mut counts = self.counts.get();
        let field = match state {
            PageState::Clean => &mut counts.clean_bytes,
            PageState::Dirty => &mut counts.dirty_bytes,
            PageState::Writeback => &mut counts.writeback_bytes,
        };
        *field = field.checked_add_signed(delta * PAGE_SIZE as i64).expect("page cache count underflow");
        self.counts.set(counts);
    }

    fn set_state(&self, page: &mut Page, state: PageState) {
        if page.state != state {
            self.count(page.state, -1);
            self.count(state, 1);
            page.state = state;
        }
    }

    /// Bytes of pages of each state.
    pub fn counts(&self) -> CacheCounts {
        self.counts.get()
    }

    /// The metadata held for delalloc, over every inode.
    pub fn delalloc_meta_reserved(&self) -> u64 {
        self.inodes.borrow().values().map(|i| i.meta_reserved).sum()
    }
}

fn page_start(idx: u64) -> u64 {
    idx * PAGE_SIZE
}

fn round_up(x: u64) -> u64 {
    x.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

fn round_down(x: u64) -> u64 {
    x / PAGE_SIZE * PAGE_SIZE
}

// ---------------------------------------------------------------------------
// Reservations.

/// What one outstanding extent of `len` bytes keeps reserved until its
/// ordered extent finishes: the file extent insert, the csum leaves, the
/// inode update (`btrfs_calculate_inode_block_rsv_size` for one extent).
fn extent_meta_bytes(fs: &FsInfo, len: u64) -> u64 {
    calc_insert_metadata_size(fs.nodesize, 1)
        + calc_metadata_size(fs.nodesize, csum_bytes_to_leaves(fs, len))
        + calc_metadata_size(fs.nodesize, 1)
}

/// Runs of dirty pages: (first page, pages).
fn dirty_runs(pages: &BTreeMap<u64, Page>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (&idx, page) in pages {
        if page.state != PageState::Dirty {
            continue;
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == idx => *n += 1,
            _ => runs.push((idx, 1)),
        }
    }
    runs
}

/// The reservation the inode's dirty runs need.
fn delalloc_target(fs: &FsInfo, pages: &BTreeMap<u64, Page>) -> u64 {
    dirty_runs(pages).iter().map(|&(_, n)| extent_meta_bytes(fs, n * PAGE_SIZE)).sum()
}

/// Give back what the inode holds beyond what its dirty runs need
/// (`btrfs_delalloc_release_metadata`).
fn trim_delalloc_reservation(fs: &FsInfo, ino: u64) {
    let excess = fs.page_cache.with(ino, |inode| {
        let target = delalloc_target(fs, &inode.pages);
        let excess = inode.meta_reserved.saturating_sub(target);
        inode.meta_reserved -= excess;
        excess
    });
    release_meta(fs, excess);
}

async fn reserve_delalloc_metadata(fs: &FsInfo, ino: u64, bytes: u64) -> Result<(), Error> {
    if let Some(space) = fs.space.get() {
        reserve_metadata_bytes(&space.metadata, bytes, FlushKind::FlushAll)
            .await
            .map_err(|_| Error::Enospc)?;
    }
    fs.page_cache.with(ino, |inode| inode.meta_reserved += bytes);
    Ok(())
}

/// `btrfs_reserve_data_bytes` with the data flush states of a buffered
/// write: take `bytes` of data `bytes_may_use`, allocating data chunks while
/// the device has room, then writing back and committing to unpin freed
/// extents; ENOSPC when nothing frees enough.
pub async fn reserve_data_bytes(fs: &Rc<FsInfo>, bytes: u64) -> Result<(), Error> {
    let Some(space) = fs.space.get() else { return Ok(()) };
    for attempt in 0.. {
        if space.data.info().bytes_free() >= bytes {
            space.data.update_bytes_may_use(bytes as i64);
            return Ok(());
        }
        match attempt {
            0 if !space.data.info().full => {
                let _ = crate::volumes::alloc_chunk(fs, BLOCK_GROUP_DATA).await;
            }
            0 | 1 => {
                fs.env.trace(TraceEvent::Note { what: "data_flush_commit", a: bytes, b: attempt, c: 0 });
                sync_fs(fs).await?;
            }
            _ => return Err(Error::Enospc),
        }
    }
    unreachable!()
}

/// The data space and the qgroup reservation of `bytes` newly dirtied
/// (btrfs_check_data_free_space: btrfs_alloc_data_chunk_ondemand, then
/// btrfs_qgroup_reserve_data).
async fn reserve_data_space(fs: &Rc<FsInfo>, bytes: u64) -> Result<(), Error> {
    crate::qgroup::reserve_data(fs, FS_TREE_OBJECTID, bytes).await?;
    if let Err(error) = reserve_data_bytes(fs, bytes).await {
        crate::qgroup::free_data(fs, FS_TREE_OBJECTID, bytes);
        return Err(error);
    }
    Ok(())
}

/// Give back the data space and qgroup reservation of `bytes` that no
/// extent will hold (btrfs_free_reserved_data_space).
fn free_data_reservation(fs: &FsInfo, bytes: u64) {
    crate::qgroup::free_data(fs, FS_TREE_OBJECTID, bytes);
    if bytes > 0
        && let Some(space) = fs.space.get()
    {
        space.data.free_bytes_may_use(bytes);
    }
}

// ---------------------------------------------------------------------------
// File extent items.

/// A file extent item of `ino` and the file range it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FoundExtent {
    key: Key,
    item: FileExtentItem,
}

impl FoundExtent {
    fn start(&self) -> u64 {
        self.key.offset
    }

    /// The end of the range the item covers (an inline extent covers its
    /// sector).
    fn end(&self) -> u64 {
        match &self.item.body {
            FileExtentBody::Inline(_) => self.key.offset + PAGE_SIZE,
            FileExtentBody::Regular { num_bytes, .. } => self.key.offset + num_bytes,
        }
    }

    fn ref_key(&self, root: u64, ino: u64) -> Option<(u64, u64, DataRefKey)> {
        data_ref_of(root, ino, &self.key, &self.item)
    }

    /// Bytes this item adds to the inode's `nbytes`.
    fn nbytes(&self) -> u64 {
        match &self.item.body {
            FileExtentBody::Inline(data) => data.len() as u64,
            FileExtentBody::Regular { disk_bytenr: 0, .. } => 0,
            FileExtentBody::Regular { num_bytes, .. } => *num_bytes,
        }
    }
}

/// The data extent a file extent item of `ino` in tree `root` references
/// and the reference it holds (bytenr, length, key), if it names one.
pub(crate) fn data_ref_of(
    root: u64,
    ino: u64,
    key: &Key,
    item: &FileExtentItem,
) -> Option<(u64, u64, DataRefKey)> {
    match item.body {
        FileExtentBody::Regular { disk_bytenr, disk_num_bytes, offset, .. } if disk_bytenr != 0 => Some((
            disk_bytenr,
            disk_num_bytes,
            DataRefKey { root, objectid: ino, offset: key.offset - offset },
        )),
        _ => None,
    }
}

fn is_extent_of(key: &Key, ino: u64) -> bool {
    key.objectid == ino && key.item_type == EXTENT_DATA_KEY
}

fn decode_extent(key: Key, payload: &[u8]) -> Result<FoundExtent, Error> {
    let item = FileExtentItem::read(payload)
        .map_err(|e| Error::BadTreeBlock(format!("file extent item {key}: {e}")))?;
    Ok(FoundExtent { key, item })
}

/// The first file extent of `ino` that ends after `pos` (read only).
async fn next_file_extent(root: &Rc<Root>, ino: u64, pos: u64) -> Result<Option<FoundExtent>, Error> {
    let mut path = Path::new();
    let found = search_slot(None, root, &Key::new(ino, EXTENT_DATA_KEY, pos), &mut path, 0, false).await?;
    if !found && path.slots[0] > 0 {
        let key = path.item_key(path.slots[0] - 1);
        if is_extent_of(&key, ino) {
            let extent = decode_extent(key, &path.item_data(path.slots[0] - 1))?;
            if extent.end() > pos {
                return Ok(Some(extent));
            }
        }
    }
    if path.slots[0] >= path.leaf().nritems() as usize && !next_leaf(root, &mut path).await? {
        return Ok(None);
    }
    let key = path.item_key(path.slots[0]);
    if !is_extent_of(&key, ino) {
        return Ok(None);
    }
    Ok(Some(decode_extent(key, &path.item_data(path.slots[0]))?))
}

fn adjust_nbytes(fs: &FsInfo, ino: u64, delta: i64) {
    fs.inodes.update_item(ino, |item| {
        item.nbytes = item.nbytes.checked_add_signed(delta).expect("inode nbytes underflow");
    });
}

/// Find `extent` again for a change, write-locked; None if someone changed
/// it meanwhile (the caller looks again).
async fn relock_extent(
    handle: &TransHandle,
    root: &Rc<Root>,
    extent: &FoundExtent,
    ins_len: i32,
) -> Result<Option<Path>, Error> {
    let mut path = Path::new();
    if !search_slot(Some(handle), root, &extent.key, &mut path, ins_len, true).await? {
        return Ok(None);
    }
    let now = decode_extent(extent.key, &path.item_data(path.slots[0]))?;
    Ok((now == *extent).then_some(path))
}

fn rewrite_extent(handle: &TransHandle, path: &Path, item: &FileExtentItem) {
    let leaf = path.leaf().clone();
    let bytes = item.to_bytes();
    crate::accessors::item_data_mut(&mut leaf.data.borrow_mut(), path.slots[0]).copy_from_slice(&bytes);
    crate::transaction::mark_buffer_dirty(handle, &leaf);
}

fn with_range(item: &FileExtentItem, skip: u64, len: u64) -> FileExtentItem {
    let mut item = item.clone();
    if let FileExtentBody::Regular { offset, num_bytes, .. } = &mut item.body {
        *offset += skip;
        *num_bytes = len;
    }
    item
}

/// `btrfs_drop_extents`: no file extent of `ino` covers `[start, end)`
/// (sector aligned; `end` may be `u64::MAX`) afterwards. Items inside go
/// (their data refs dropped), items across an end are trimmed, an item
/// across both is split in two, the tail inserted first so that the range
/// beyond stays covered at every step.
pub async fn drop_extents(
    handle: &TransHandle,
    root: &Rc<Root>,
    ino: u64,
    start: u64,
    end: u64,
) -> Result<(), Error> {
    debug_assert!(start % PAGE_SIZE == 0 && (end == u64::MAX || end % PAGE_SIZE == 0));
    let fs = &handle.fs;
    let refs = &handle.transaction.delayed_refs;
    let mut cur = start;
    while cur < end {
        let Some(extent) = next_file_extent(root, ino, cur).await? else { break };
        if extent.start() >= end {
            break;
        }
        let (e_start, e_end) = (extent.start(), extent.end());
        if e_start >= start && e_end <= end {
            let Some(mut path) = relock_extent(handle, root, &extent, -1).await? else { continue };
            let slot = path.slots[0];
            del_items(handle, root, &mut path, slot, 1).await?;
            if let Some((bytenr, len, key)) = extent.ref_key(root.objectid, ino) {
                refs.add_data_ref(bytenr, len, key, -1, false);
            }
            adjust_nbytes(fs, ino, -(extent.nbytes() as i64));
            cur = e_end;
        } else if e_start < start && e_end > end {
            // Split: the tail first, then trim the head.
            let tail = with_range(&extent.item, end - e_start, e_end - end);
            match insert_item(handle, root, &Key::new(ino, EXTENT_DATA_KEY, end), &tail.to_bytes()).await {
                Ok(()) => {
                    if let Some((bytenr, len, key)) = extent.ref_key(root.objectid, ino) {
                        refs.add_data_ref(bytenr, len, key, 1, false);
                    }
                    adjust_nbytes(fs, ino, (e_end - end) as i64);
                }
                Err(Error::Eexist) => {}
                Err(error) => return Err(error),
            }
            let Some(path) = relock_extent(handle, root, &extent, 0).await? else { continue };
            rewrite_extent(handle, &path, &with_range(&extent.item, 0, start - e_start));
            adjust_nbytes(fs, ino, -((e_end - start) as i64));
            cur = end;
        } else if e_start < start {
            let Some(path) = relock_extent(handle, root, &extent, 0).await? else { continue };
            rewrite_extent(handle, &path, &with_range(&extent.item, 0, start - e_start));
            adjust_nbytes(fs, ino, -((e_end - start) as i64));
            cur = e_end;
        } else {
            // Starts inside, ends beyond: keep the part after `end`. The
            // key changes, and with it the parents' keys if the item is
            // first in its leaf: they must be write-locked too (a search
            // announcing a deletion write-locks two levels up, as the
            // kernel's btrfs_drop_extents searches).
            let Some(path) = relock_extent(handle, root, &extent, -1).await? else { continue };
            rewrite_extent(handle, &path, &with_range(&extent.item, end - e_start, e_end - end));
            set_item_key_safe(handle, &path, &Key::new(ino, EXTENT_DATA_KEY, end));
            adjust_nbytes(fs, ino, -((end - e_start) as i64));
            cur = end;
        }
    }
    Ok(())
}

/// An inline extent longer than `new_size` loses its tail
/// (`btrfs_truncate_inline_item`).
async fn truncate_inline(
    handle: &TransHandle,
    root: &Rc<Root>,
    ino: u64,
    new_size: u64,
) -> Result<(), Error> {
    loop {
        let Some(extent) = next_file_extent(root, ino, 0).await? else { return Ok(()) };
        let FileExtentBody::Inline(data) = &extent.item.body else { return Ok(()) };
        if extent.start() != 0 || data.len() as u64 <= new_size || new_size == 0 {
            return Ok(());
        }
        let Some(path) = relock_extent(handle, root, &extent, 0).await? else { continue };
        let cut = data.len() as u64 - new_size;
        let shorter = FileExtentItem {
            ram_bytes: new_size,
            body: FileExtentBody::Inline(data[..new_size as usize].to_vec()),
            ..extent.item.clone()
        };
        truncate_item(handle, &path, shorter.encoded_len() as u32, true);
        rewrite_extent(handle, &path, &shorter);
        adjust_nbytes(&handle.fs, ino, -(cut as i64));
        return Ok(());
    }
}

// ---------------------------------------------------------------------------
// Reading.

/// Read the page `idx` of `ino` from disk: the file extent that covers it,
/// inline data, or a sector of a data extent verified against its sum.
async fn read_page_from_disk(fs: &FsInfo, ino: u64, idx: u64) -> Result<Box<[u8]>, Error> {
    let root = fs_root(fs);
    let pos = page_start(idx);
    let mut page = vec![0u8; PAGE_SIZE as usize].into_boxed_slice();
    let Some(extent) = next_file_extent(&root, ino, pos).await? else { return Ok(page) };
    if extent.start() > pos {
        return Ok(page);
    }
    let (disk_bytenr, offset) = match &extent.item.body {
        FileExtentBody::Inline(data) => {
            let n = data.len().min(PAGE_SIZE as usize);
            page[..n].copy_from_slice(&data[..n]);
            return Ok(page);
        }
        FileExtentBody::Regular { disk_bytenr: 0, .. } => return Ok(page),
        FileExtentBody::Regular { disk_bytenr, offset, .. } => (*disk_bytenr, *offset),
    };
    if extent.item.extent_type != crate::format::FILE_EXTENT_REG {
        return Ok(page);
    }
    let logical = disk_bytenr + offset + (pos - extent.start());
    let physical = fs
        .volumes
        .map_logical(logical, PAGE_SIZE)
        .ok_or_else(|| Error::BadTreeBlock(format!("data at {logical} of inode {ino} lies in no chunk")))?;
    let done: Completion<BioStatus> = Completion::new();
    let signal = done.clone();
    fs.page_cache.stats.page_reads.set(fs.page_cache.stats.page_reads.get() + 1);
    fs.env.submit_bio(
        Bio::Read { offset_bytes: physical, len_bytes: PAGE_SIZE as u32 },
        Box::new(move |status| signal.complete(status)),
    );
    let bytes = match declared(&*fs.env, WaitOn::Io { what: "data_read", offset_bytes: physical }, done).await
    {
        BioStatus::IoError => return Err(Error::Io { bytenr: logical }),
        BioStatus::Ok(bytes) => bytes,
    };
    let expected = lookup_csum(fs, logical).await?;
    let actual = csum_data(&bytes);
    if expected != Some(actual) {
        fs.page_cache.stats.csum_failures.set(fs.page_cache.stats.csum_failures.get() + 1);
        let what = match expected {
            Some(sum) => format!(
                "csum failed root 5 ino {ino} off {pos} csum 0x{actual:08x} expected csum 0x{sum:08x} mirror 1"
            ),
            None => format!("no csum found for inode {ino} start {pos} (logical {logical})"),
        };
        fs.env.report_violation(Violation { kind: "data_csum", message: format!("BTRFS warning: {what}") });
        return Err(Error::Io { bytenr: logical });
    }
    page.copy_from_slice(&bytes);
    Ok(page)
}

/// Make sure page `idx` of `ino` is in the cache, reading it if it is not
/// (the caller keeps writers out).
async fn read_page_into_cache(fs: &FsInfo, ino: u64, idx: u64) -> Result<(), Error> {
    if fs.page_cache.with(ino, |inode| inode.pages.contains_key(&idx)) {
        return Ok(());
    }
    let data = read_page_from_disk(fs, ino, idx).await?;
    fs.env.memory_charge(PAGE_SIZE).await;
    let inserted = fs.page_cache.with(ino, |inode| {
        if inode.pages.contains_key(&idx) {
            return false;
        }
        inode.pages.insert(idx, Page { data, state: PageState::Clean });
        true
    });
    if inserted {
        fs.page_cache.count(PageState::Clean, 1);
    } else {
        fs.env.memory_release(PAGE_SIZE);
    }
    Ok(())
}

/// `btrfs_file_read_iter` (buffered): up to `len` bytes from `offset`,
/// fewer at the end of the file.
pub async fn read(fs: &Rc<FsInfo>, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
    let result = do_read(fs, ino, offset, len).await;
    crate::inode::trace_op(fs, "read", result)
}

async fn do_read(fs: &Rc<FsInfo>, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
    let _lock = lock_inode(fs, ino, false).await;
    let inode = iget(fs, ino).await?;
    if inode.is_dir() {
        return Err(Error::Eisdir);
    }
    fs.page_cache.stats.reads.set(fs.page_cache.stats.reads.get() + 1);
    let size = inode.item.size;
    if offset >= size || len == 0 {
        return Ok(Vec::new());
    }
    let end = size.min(offset.saturating_add(len));
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut pos = offset;
    while pos < end {
        let idx = pos / PAGE_SIZE;
        read_page_into_cache(fs, ino, idx).await?;
        // Nothing runs between the read's return and the copy: the page is there.
        let upto = end.min(page_start(idx + 1));
        fs.page_cache.with(ino, |inode| {
            let page = inode.pages.get(&idx).expect("read_page_into_cache leaves the page cached");
            let from = (pos - page_start(idx)) as usize;
            let to = (upto - page_start(idx)) as usize;
            out.extend_from_slice(&page.data[from..to]);
        });
        pos = upto;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Writing.

/// Wait until no ordered extent of `ino` overlaps `[start, end)`.
async fn wait_ordered_range(fs: &FsInfo, ino: u64, start: u64, end: u64) {
    let overlaps = move |fs: &FsInfo| {
        fs.page_cache.with(ino, |inode| inode.ordered.range(..end).any(|(_, &oe_end)| oe_end > start))
    };
    if !overlaps(fs) {
        return;
    }
    fs.env.wait_on(WaitOn::Io { what: "ordered_extent", offset_bytes: start });
    fs.page_cache.wait.wait_until(|| !overlaps(fs)).await;
}

/// The locked half of a buffered write: copy `data` to `offset` through
/// the page cache, reserving first; `extend`: grow `i_size` to the end.
async fn buffered_write_locked(
    fs: &Rc<FsInfo>,
    ino: u64,
    offset: u64,
    data: &[u8],
    extend: bool,
) -> Result<(), Error> {
    let end = offset + data.len() as u64;
    let (first, last) = (offset / PAGE_SIZE, (end - 1) / PAGE_SIZE);
    let meta = extent_meta_bytes(fs, (last - first + 1) * PAGE_SIZE);
    reserve_delalloc_metadata(fs, ino, meta).await?;
    let mut data_reserved = 0u64;
    let mut charged = 0u64;
    fs.page_cache.with(ino, |inode| inode.pinned.extend([first, last]));
    let result: Result<(), Error> = async {
        loop {
            wait_ordered_range(fs, ino, page_start(first), page_start(last + 1)).await;
            let i_size = fs.inodes.get(ino).map_or(0, |inode| inode.item.size);
            // Partial pages with bytes on disk are read first.
            for idx in [first, last] {
                let partial = offset > page_start(idx) || end < page_start(idx + 1);
                if partial && page_start(idx) < i_size {
                    read_page_into_cache(fs, ino, idx).await?;
                }
            }
            let (absent, not_dirty, busy) = fs.page_cache.with(ino, |inode| {
                let mut counts = (0u64, 0u64, false);
                for idx in first..=last {
                    match inode.pages.get(&idx) {
                        None => {
                            counts.0 += 1;
                            counts.1 += 1;
                        }
                        Some(page) if page.state == PageState::Writeback => counts.2 = true,
                        Some(page) if page.state == PageState::Clean => counts.1 += 1,
                        Some(_) => {}
                    }
                }
                counts
            });
            let partial_absent = [first, last].iter().any(|&idx| {
                (offset > page_start(idx) || end < page_start(idx + 1))
                    && page_start(idx) < i_size
                    && !fs.page_cache.with(ino, |inode| inode.pages.contains_key(&idx))
            });
            if busy || partial_absent {
                continue;
            }
            if not_dirty * PAGE_SIZE > data_reserved {
                let more = not_dirty * PAGE_SIZE - data_reserved;
                reserve_data_space(fs, more).await?;
                data_reserved += more;
                continue;
            }
            if absent * PAGE_SIZE > charged {
                let more = absent * PAGE_SIZE - charged;
                fs.env.memory_charge(more).await;
                charged += more;
                continue;
            }
            // Nothing suspends from here on: the checks above still hold.
            let cache = &fs.page_cache;
            cache.with(ino, |inode| {
                for idx in first..=last {
                    let page = inode.pages.entry(idx).or_insert_with(|| {
                        cache.count(PageState::Clean, 1);
                        Page {
                            data: vec![0u8; PAGE_SIZE as usize].into_boxed_slice(),
                            state: PageState::Clean,
                        }
                    });
                    let from = offset.max(page_start(idx));
                    let to = end.min(page_start(idx + 1));
                    page.data[(from - page_start(idx)) as usize..(to - page_start(idx)) as usize]
                        .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                    cache.set_state(page, PageState::Dirty);
                }
            });
            charged -= absent * PAGE_SIZE;
            data_reserved -= not_dirty * PAGE_SIZE;
            if extend {
                fs.inodes.update_item(ino, |item| item.size = item.size.max(end));
            }
            return Ok(());
        }
    }
    .await;
    fs.page_cache.with(ino, |inode| {
        inode.pinned.remove(&first);
        inode.pinned.remove(&last);
    });
    if charged > 0 {
        fs.env.memory_release(charged);
    }
    free_data_reservation(fs, data_reserved);
    trim_delalloc_reservation(fs, ino);
    result
}

/// `btrfs_truncate_block`: zero `[from, to)` of the page holding `from`
/// (within one page) through the page cache, as a write of zeros.
async fn zero_range_in_page(fs: &Rc<FsInfo>, ino: u64, from: u64, to: u64) -> Result<(), Error> {
    if from >= to {
        return Ok(());
    }
    debug_assert_eq!(from / PAGE_SIZE, (to - 1) / PAGE_SIZE);
    buffered_write_locked(fs, ino, from, &vec![0u8; (to - from) as usize], false).await
}

fn regular_file(inode: &crate::inode::BtrfsInode) -> Result<(), Error> {
    if inode.is_dir() { Err(Error::Eisdir) } else { Ok(()) }
}

/// `btrfs_buffered_write`: write `data` at `offset`. A write past the end
/// first zeroes the rest of the old last page (`btrfs_cont_expand`).
pub async fn write(fs: &Rc<FsInfo>, ino: u64, offset: u64, data: &[u8]) -> Result<(), Error> {
    let result = do_write(fs, ino, offset, data).await;
    crate::inode::trace_op(fs, "write", result)
}

async fn do_write(fs: &Rc<FsInfo>, ino: u64, offset: u64, data: &[u8]) -> Result<(), Error> {
    crate::transaction::check_fs_error(fs)?;
    let end = offset.checked_add(data.len() as u64).ok_or(Error::Einval)?;
    if end > MAX_FILE_SIZE {
        return Err(Error::Efbig);
    }
    let _lock = lock_inode(fs, ino, true).await;
    let inode = iget(fs, ino).await?;
    regular_file(&inode)?;
    if data.is_empty() {
        return Ok(());
    }
    let old_size = inode.item.size;
    if offset > old_size && old_size % PAGE_SIZE != 0 {
        zero_range_in_page(fs, ino, old_size, round_up(old_size).min(offset)).await?;
    }
    buffered_write_locked(fs, ino, offset, data, true).await?;
    fs.page_cache.stats.writes.set(fs.page_cache.stats.writes.get() + 1);
    fs.page_cache.stats.bytes_written.set(fs.page_cache.stats.bytes_written.get() + data.len() as u64);
    crate::inode::touch_mtime(fs, ino);
    dirty_inode(fs, ino, "write").await
}

/// Block writeback of `ino` (the page locks truncation holds), wait for its
/// ordered extents past `from`, then drop its cached pages from page
/// `first_dropped` on; dirty ones give their data reservation back.
async fn truncate_pagecache(fs: &Rc<FsInfo>, ino: u64, from: u64, to: u64) {
    wait_ordered_range(fs, ino, from, to).await;
    let (first, end) = (round_up(from) / PAGE_SIZE, to.div_ceil(PAGE_SIZE));
    let (dropped, dirty) = fs.page_cache.with(ino, |inode| {
        let idxs: Vec<u64> = inode.pages.range(first..end).map(|(&idx, _)| idx).collect();
        let mut counts = (0u64, 0u64);
        for idx in idxs {
            let page = inode.pages.remove(&idx).expect("listed page");
            assert_ne!(page.state, PageState::Writeback, "page {idx} of inode {ino} dropped under writeback");
            fs.page_cache.count(page.state, -1);
            counts.0 += 1;
            if page.state == PageState::Dirty {
                counts.1 += 1;
            }
        }
        counts
    });
    if dropped > 0 {
        fs.env.memory_release(dropped * PAGE_SIZE);
    }
    free_data_reservation(fs, dirty * PAGE_SIZE);
    trim_delalloc_reservation(fs, ino);
}

struct WritebackBlock<'a> {
    fs: &'a FsInfo,
    ino: u64,
}

impl Drop for WritebackBlock<'_> {
    fn drop(&mut self) {
        let mut inodes = self.fs.page_cache.inodes.borrow_mut();
        let inode = inodes.get_mut(&self.ino).expect("a blocked inode keeps its page cache entry");
        inode.writeback_blocked -= 1;
        if inode.writeback_blocked == 0
            && inode.pages.is_empty()
            && inode.ordered.is_empty()
            && inode.meta_reserved == 0
        {
            inodes.remove(&self.ino);
        }
    }
}

fn block_writeback(fs: &FsInfo, ino: u64) -> WritebackBlock<'_> {
    fs.page_cache.with(ino, |inode| inode.writeback_blocked += 1);
    WritebackBlock { fs, ino }
}

/// Move `disk_i_size` up to `i_size` or to the first byte not yet on disk
/// (a dirty page, an ordered extent other than `done`), whichever is lower
/// (`btrfs_inode_safe_disk_i_size_write`): after a crash the file never
/// shows a size whose data was still in memory.
fn safe_disk_i_size_write(fs: &FsInfo, ino: u64, done: Option<u64>) {
    let pending = fs.page_cache.with(ino, |inode| {
        let dirty =
            inode.pages.iter().find(|(_, p)| p.state == PageState::Dirty).map(|(&idx, _)| page_start(idx));
        let ordered = inode.ordered.keys().copied().find(|&start| Some(start) != done);
        dirty.into_iter().chain(ordered).min().unwrap_or(u64::MAX)
    });
    fs.inodes.update(ino, |inode| {
        let limit = inode.item.size.min(pending);
        inode.disk_i_size = inode.disk_i_size.max(limit);
    });
}

/// `btrfs_setsize`: truncate or extend `ino` to `new_size`.
pub async fn truncate(fs: &Rc<FsInfo>, ino: u64, new_size: u64) -> Result<(), Error> {
    let result = do_truncate(fs, ino, new_size).await;
    crate::inode::trace_op(fs, "truncate", result)
}

async fn do_truncate(fs: &Rc<FsInfo>, ino: u64, new_size: u64) -> Result<(), Error> {
    crate::transaction::check_fs_error(fs)?;
    if new_size > MAX_FILE_SIZE {
        return Err(Error::Efbig);
    }
    let _lock = lock_inode(fs, ino, true).await;
    let inode = iget(fs, ino).await?;
    regular_file(&inode)?;
    let old_size = inode.item.size;
    let root = fs_root(fs);
    crate::inode::touch_mtime(fs, ino);
    if new_size >= old_size {
        if new_size > old_size && old_size % PAGE_SIZE != 0 {
            zero_range_in_page(fs, ino, old_size, round_up(old_size).min(new_size)).await?;
        }
        let handle = start_transaction(fs, &root, SETSIZE_TRANS_ITEMS, "truncate").await?;
        fs.inodes.update_item(ino, |item| item.size = new_size);
        safe_disk_i_size_write(fs, ino, None);
        let result = update_inode(&handle, ino).await;
        end_transaction(handle);
        return result;
    }
    if new_size % PAGE_SIZE != 0 {
        zero_range_in_page(fs, ino, new_size, round_up(new_size).min(old_size)).await?;
    }
    let _block = block_writeback(fs, ino);
    truncate_pagecache(fs, ino, round_up(new_size), u64::MAX).await;
    fs.inodes.update_item(ino, |item| item.size = new_size);
    let handle = start_transaction(fs, &root, TRUNCATE_TRANS_ITEMS, "truncate").await?;
    let result = async {
        drop_extents(&handle, &root, ino, round_up(new_size), u64::MAX).await?;
        truncate_inline(&handle, &root, ino, new_size).await?;
        fs.inodes.update(ino, |inode| inode.disk_i_size = inode.disk_i_size.min(new_size));
        safe_disk_i_size_write(fs, ino, None);
        update_inode(&handle, ino).await
    }
    .await;
    if let Err(error) = &result {
        abort_transaction(&handle, error, "btrfs_truncate");
    }
    end_transaction(handle);
    result
}

/// `btrfs_punch_hole`: `[offset, offset + len)` reads as zeros afterwards,
/// within the file's size; whole sectors lose their extents.
pub async fn punch_hole(fs: &Rc<FsInfo>, ino: u64, offset: u64, len: u64) -> Result<(), Error> {
    let result = do_punch_hole(fs, ino, offset, len).await;
    crate::inode::trace_op(fs, "punch_hole", result)
}

async fn do_punch_hole(fs: &Rc<FsInfo>, ino: u64, offset: u64, len: u64) -> Result<(), Error> {
    crate::transaction::check_fs_error(fs)?;
    let _lock = lock_inode(fs, ino, true).await;
    let inode = iget(fs, ino).await?;
    regular_file(&inode)?;
    let size = inode.item.size;
    let end = size.min(offset.saturating_add(len));
    if offset >= end {
        return Ok(());
    }
    let (full_start, full_end) = (round_up(offset), round_down(end));
    if full_start >= full_end {
        zero_range_in_page(fs, ino, offset, end.min(round_up(offset + 1))).await?;
        if end > round_up(offset + 1) {
            zero_range_in_page(fs, ino, round_down(end), end).await?;
        }
    } else {
        zero_range_in_page(fs, ino, offset, full_start).await?;
        zero_range_in_page(fs, ino, full_end, end).await?;
    }
    crate::inode::touch_mtime(fs, ino);
    if full_start >= full_end {
        return dirty_inode(fs, ino, "punch_hole").await;
    }
    let root = fs_root(fs);
    let _block = block_writeback(fs, ino);
    truncate_pagecache(fs, ino, full_start, full_end).await;
    let handle = start_transaction(fs, &root, PUNCH_TRANS_ITEMS, "punch_hole").await?;
    let result = async {
        drop_extents(&handle, &root, ino, full_start, full_end).await?;
        update_inode(&handle, ino).await
    }
    .await;
    if let Err(error) = &result {
        abort_transaction(&handle, error, "btrfs_punch_hole");
    }
    end_transaction(handle);
    result
}

/// Before an inode with data is deleted (`truncate_inode_pages_final`):
/// keep writeback away, wait for its ordered extents. The caller holds the
/// inode's lock; the returned guard keeps writeback blocked until dropped.
pub async fn prepare_evict(fs: &FsInfo, ino: u64) -> impl Drop + '_ {
    let block = block_writeback(fs, ino);
    wait_ordered_range(fs, ino, 0, u64::MAX).await;
    block
}

/// The inode is gone: drop its pages (dirty ones give their reservations
/// back) and its page cache entry.
pub fn evict_pages(fs: &FsInfo, ino: u64) {
    let Some(inode) = fs.page_cache.inodes.borrow_mut().remove(&ino) else { return };
    assert!(inode.ordered.is_empty(), "inode {ino} evicted with ordered extents in flight");
    let mut dirty = 0;
    for page in inode.pages.values() {
        fs.page_cache.count(page.state, -1);
        if page.state == PageState::Dirty {
            dirty += 1;
        }
    }
    if !inode.pages.is_empty() {
        fs.env.memory_release(inode.pages.len() as u64 * PAGE_SIZE);
    }
    free_data_reservation(fs, dirty * PAGE_SIZE);
    release_meta(fs, inode.meta_reserved);
    // A writer blocked on this inode keeps its guard; re-create the entry.
    if inode.writeback_blocked > 0 {
        fs.page_cache.with(ino, |entry| entry.writeback_blocked = inode.writeback_blocked);
    }
}

// ---------------------------------------------------------------------------
// Writeback and ordered extents.

/// Whether a run is written inline: the file's only page, the file at most
/// `MAX_INLINE` bytes (`can_cow_file_range_inline`).
fn inline_candidate(fs: &FsInfo, ino: u64, first: u64) -> Option<u64> {
    let size = fs.inodes.get(ino)?.item.size;
    let limit = MAX_INLINE.min(u64::from(max_inline_data_size(fs.nodesize)));
    (first == 0 && size > 0 && size <= limit).then_some(size)
}

/// Take an extent's share of the inode's delalloc reservation.
fn take_meta_share(fs: &FsInfo, ino: u64, len: u64) -> u64 {
    fs.page_cache.with(ino, |inode| {
        let share = extent_meta_bytes(fs, len).min(inode.meta_reserved);
        inode.meta_reserved -= share;
        share
    })
}

/// Give a joined handle `share` bytes already held in `bytes_may_use` as its
/// reservation, charged like a started handle's.
fn charge_handle(fs: &FsInfo, handle: &TransHandle, share: u64) {
    let Some(space) = fs.space.get() else { return };
    if share == 0 {
        return;
    }
    block_rsv_add_bytes(&space.rsvs.trans_block_rsv, share, true);
    *handle.rsv.borrow_mut() =
        Some(TransRsvAccount { bytes_reserved: share, ..TransRsvAccount::none(&space.rsvs) });
    handle.block_rsv.set(Some(BlockRsvType::Trans));
}

/// `run_delalloc_range` for one dirty run that is not inline: allocate
/// extents (several if free space is fragmented), move the pages under
/// writeback and submit the writes. Returns the bytes submitted.
fn submit_run(fs: &Rc<FsInfo>, ino: u64, first: u64, npages: u64) -> u64 {
    let mut share = take_meta_share(fs, ino, npages * PAGE_SIZE);
    let mut idx = first;
    let end = first + npages;
    let mut submitted = 0;
    while idx < end {
        let mut n = end - idx;
        let bytenr = loop {
            if let Some(bytenr) = reserve_data_extent(fs, n * PAGE_SIZE) {
                break Some(bytenr);
            }
            if n == 1 {
                break None;
            }
            n = n.div_ceil(2);
        };
        let Some(disk_bytenr) = bytenr else {
            // The write reserved this space: failing here is an accounting bug.
            fs.env.report_violation(Violation {
                kind: "data_enospc_writeback",
                message: format!(
                    "no data extent for page {idx} of inode {ino} although its space was reserved"
                ),
            });
            fs.page_cache.with(ino, |inode| inode.meta_reserved += share);
            return submitted;
        };
        let len = n * PAGE_SIZE;
        // Each extent of a split run takes its part of the run's share (the
        // kernel's extents all draw on the inode's one reserve).
        let part = share * n / (end - idx);
        share -= part;
        let cache = &fs.page_cache;
        let data: Vec<u8> = cache.with(ino, |inode| {
            let mut data = Vec::with_capacity(len as usize);
            for i in idx..idx + n {
                let page = inode.pages.get_mut(&i).expect("a dirty run's page");
                cache.set_state(page, PageState::Writeback);
                data.extend_from_slice(&page.data);
            }
            inode.ordered.insert(page_start(idx), page_start(idx + n));
            data
        });
        let sums = data.chunks(PAGE_SIZE as usize).map(csum_data).collect();
        let id = cache.next_ordered.get() + 1;
        cache.next_ordered.set(id);
        cache.in_flight.borrow_mut().insert(id);
        cache.stats.ordered_extents.set(cache.stats.ordered_extents.get() + 1);
        cache.stats.ordered_bytes.set(cache.stats.ordered_bytes.get() + len);
        let oe = OrderedExtent {
            id,
            ino,
            file_offset: page_start(idx),
            len,
            disk_bytenr,
            sums,
            meta_share: part,
            io_error: false,
        };
        let physical = fs.volumes.map_logical(disk_bytenr, len).expect("a data extent lies in a chunk");
        start_endio_worker(fs);
        fs.env.trace(TraceEvent::Note { what: "ordered_extent", a: ino, b: oe.file_offset, c: len });
        let weak = fs.weak();
        fs.env.submit_bio(
            Bio::Write { offset_bytes: physical, data, fua: false, preflush: false },
            Box::new(move |status| {
                let Some(fs) = weak.upgrade() else { return };
                let mut oe = oe;
                oe.io_error = status == BioStatus::IoError;
                fs.page_cache.completed.borrow_mut().push_back(oe);
                fs.page_cache.worker_wait.wake_all();
            }),
        );
        submitted += len;
        idx += n;
    }
    submitted
}

/// `cow_file_range_inline`: the file's first page becomes an inline extent
/// in a joined transaction.
async fn cow_file_range_inline(fs: &Rc<FsInfo>, ino: u64, size: u64) -> Result<(), Error> {
    let cache = &fs.page_cache;
    let data = cache.with(ino, |inode| {
        if inode.writeback_blocked > 0 {
            return None;
        }
        let page = inode.pages.get_mut(&0).filter(|p| p.state == PageState::Dirty)?;
        cache.set_state(page, PageState::Writeback);
        inode.ordered.insert(0, PAGE_SIZE);
        Some(page.data[..size as usize].to_vec())
    });
    let Some(data) = data else { return Ok(()) };
    let share = take_meta_share(fs, ino, PAGE_SIZE);
    let root = fs_root(fs);
    let result = async {
        let handle = match join_transaction(fs, "cow_file_range_inline").await {
            Ok(handle) => handle,
            Err(error) => {
                release_meta(fs, share);
                return Err(error);
            }
        };
        charge_handle(fs, &handle, share);
        let result = async {
            drop_extents(&handle, &root, ino, 0, PAGE_SIZE).await?;
            let item = FileExtentItem::inline(handle.transid, data.clone());
            insert_item(&handle, &root, &Key::new(ino, EXTENT_DATA_KEY, 0), &item.to_bytes()).await?;
            adjust_nbytes(fs, ino, size as i64);
            safe_disk_i_size_write(fs, ino, Some(0));
            update_inode(&handle, ino).await
        }
        .await;
        if let Err(error) = &result {
            abort_transaction(&handle, error, "cow_file_range_inline");
        }
        end_transaction(handle);
        result
    }
    .await;
    if result.is_ok() {
        cache.stats.inline_extents.set(cache.stats.inline_extents.get() + 1);
    }
    settle_written_pages(fs, ino, 0, 0, 1, result.is_ok());
    free_data_reservation(fs, PAGE_SIZE);
    cache.wait.wake_all();
    result
}

/// The write of `n` pages from `first` (the ordered range at `offset`)
/// ended: written, they are clean; lost, they leave the cache (the disk's
/// old bytes show through) and the next fsync or sync reports the error.
fn settle_written_pages(fs: &FsInfo, ino: u64, offset: u64, first: u64, n: u64, ok: bool) {
    let cache = &fs.page_cache;
    cache.with(ino, |inode| {
        inode.ordered.remove(&offset);
        for idx in first..first + n {
            if ok {
                if let Some(page) = inode.pages.get_mut(&idx) {
                    cache.set_state(page, PageState::Clean);
                }
            } else if let Some(page) = inode.pages.remove(&idx) {
                cache.count(page.state, -1);
                fs.env.memory_release(PAGE_SIZE);
            }
        }
        if !ok {
            inode.mapping_error = true;
        }
    });
}

/// `btrfs_finish_one_ordered`, run by the endio worker.
async fn finish_ordered_io(fs: &Rc<FsInfo>, oe: OrderedExtent) {
    let cache = &fs.page_cache;
    let root = fs_root(fs);
    let ok = if oe.io_error {
        cache.stats.write_errors.set(cache.stats.write_errors.get() + 1);
        free_unused_data_extent(fs, oe.disk_bytenr, oe.len);
        crate::qgroup::free_data(fs, FS_TREE_OBJECTID, oe.len);
        release_meta(fs, oe.meta_share);
        false
    } else {
        match join_transaction(fs, "finish_ordered_io").await {
            Ok(handle) => {
                charge_handle(fs, &handle, oe.meta_share);
                let result = insert_ordered_extent(&handle, &root, &oe).await;
                match &result {
                    Ok(()) => crate::qgroup::data_written(&handle, FS_TREE_OBJECTID, oe.len),
                    Err(error) => {
                        crate::qgroup::free_data(fs, FS_TREE_OBJECTID, oe.len);
                        abort_transaction(&handle, error, "btrfs_finish_one_ordered");
                    }
                }
                end_transaction(handle);
                result.is_ok()
            }
            Err(_) => {
                // Read-only after an abort: the extent is never referenced.
                free_unused_data_extent(fs, oe.disk_bytenr, oe.len);
                crate::qgroup::free_data(fs, FS_TREE_OBJECTID, oe.len);
                release_meta(fs, oe.meta_share);
                false
            }
        }
    };
    settle_written_pages(fs, oe.ino, oe.file_offset, oe.file_offset / PAGE_SIZE, oe.len / PAGE_SIZE, ok);
    cache.in_flight.borrow_mut().remove(&oe.id);
    cache.wait.wake_all();
}

fn release_meta(fs: &FsInfo, bytes: u64) {
    if bytes > 0
        && let Some(space) = fs.space.get()
    {
        space.metadata.free_bytes_may_use(bytes);
    }
}

async fn insert_ordered_extent(
    handle: &TransHandle,
    root: &Rc<Root>,
    oe: &OrderedExtent,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let end = oe.file_offset + oe.len;
    drop_extents(handle, root, oe.ino, oe.file_offset, end).await?;
    let item = FileExtentItem::regular(handle.transid, oe.disk_bytenr, oe.len);
    insert_item(handle, root, &Key::new(oe.ino, EXTENT_DATA_KEY, oe.file_offset), &item.to_bytes()).await?;
    let key = DataRefKey { root: FS_TREE_OBJECTID, objectid: oe.ino, offset: oe.file_offset };
    handle.transaction.delayed_refs.add_data_ref(oe.disk_bytenr, oe.len, key, 1, true);
    adjust_nbytes(fs, oe.ino, oe.len as i64);
    csum_file_blocks(handle, oe.disk_bytenr, &oe.sums).await?;
    safe_disk_i_size_write(fs, oe.ino, Some(oe.file_offset));
    update_inode(handle, oe.ino).await
}

/// Start the endio worker (`btrfs-endio-write`) unless it runs: finishes
/// ordered extents in the order their bios ended.
pub fn start_endio_worker(fs: &Rc<FsInfo>) {
    if fs.page_cache.worker_started.replace(true) {
        return;
    }
    let weak: Weak<FsInfo> = fs.weak();
    let worker = async move {
        loop {
            let next = {
                let Some(fs) = weak.upgrade() else { return };
                fs.page_cache.completed.borrow_mut().pop_front()
            };
            match next {
                Some(oe) => {
                    let Some(fs) = weak.upgrade() else { return };
                    finish_ordered_io(&fs, oe).await;
                }
                None => {
                    let Some(fs) = weak.upgrade() else { return };
                    fs.env.wait_on(WaitOn::Other("ordered extent completion"));
                    let waiting = fs.clone();
                    fs.page_cache
                        .worker_wait
                        .wait_until(move || !waiting.page_cache.completed.borrow().is_empty())
                        .await;
                }
            }
        }
    };
    fs.env.spawn("btrfs-endio-write", TaskKind::Daemon, Box::pin(worker));
}

/// The dirty runs writeback may start on `ino` now (none while blocked).
fn writeback_runs(fs: &FsInfo, ino: u64) -> Vec<(u64, u64)> {
    fs.page_cache
        .with(ino, |inode| if inode.writeback_blocked > 0 { Vec::new() } else { dirty_runs(&inode.pages) })
}

/// Start writeback of every dirty run of `ino`; with `inline`, runs that
/// become inline extents too (they need a transaction).
async fn writepages(fs: &Rc<FsInfo>, ino: u64, inline: bool) -> Result<u64, Error> {
    let runs = writeback_runs(fs, ino);
    let mut written = 0;
    for (first, n) in runs {
        if let Some(size) = inline_candidate(fs, ino, first) {
            if inline {
                cow_file_range_inline(fs, ino, size).await?;
                written += size;
            }
            continue;
        }
        // The run may have changed while an inline write suspended.
        let still = fs.page_cache.with(ino, |inode| {
            inode.writeback_blocked == 0
                && (first..first + n)
                    .all(|i| inode.pages.get(&i).is_some_and(|p| p.state == PageState::Dirty))
        });
        if still {
            written += submit_run(fs, ino, first, n);
        }
    }
    Ok(written)
}

/// `filemap_write_and_wait` of one inode: write its dirty pages (inline
/// ones included) and wait for its ordered extents; EIO if a data write
/// failed since the last call.
pub async fn write_and_wait_inode(fs: &Rc<FsInfo>, ino: u64) -> Result<(), Error> {
    writepages(fs, ino, true).await?;
    wait_ordered_range(fs, ino, 0, u64::MAX).await;
    if fs.page_cache.with(ino, |inode| std::mem::take(&mut inode.mapping_error)) {
        return Err(Error::Io { bytenr: 0 });
    }
    Ok(())
}

/// `btrfs_sync_fs` after `sync_filesystem`'s writeback: write back every
/// dirty page, wait for the ordered extents started so far, commit.
pub async fn sync_fs(fs: &Rc<FsInfo>) -> Result<(), Error> {
    crate::transaction::check_fs_error(fs)?;
    start_delalloc_and_wait(fs).await?;
    sync(fs).await
}

/// `btrfs_start_delalloc_roots` and `btrfs_wait_ordered_roots`: write back
/// every dirty page and wait for the ordered extents started so far, so
/// that their file extents are in the trees.
pub async fn start_delalloc_and_wait(fs: &Rc<FsInfo>) -> Result<(), Error> {
    let inodes: Vec<u64> = fs.page_cache.inodes.borrow().keys().copied().collect();
    for ino in inodes {
        writepages(fs, ino, true).await?;
    }
    let last = fs.page_cache.next_ordered.get();
    let cache = &fs.page_cache;
    let pending = move || cache.in_flight.borrow().first().is_some_and(|&id| id <= last);
    if pending() {
        fs.env.wait_on(WaitOn::Other("ordered extents of sync"));
        cache.wait.wait_until(move || !pending()).await;
    }
    Ok(())
}

/// Background writeback (the flusher, reclaim): start writeback of up to
/// `nr_bytes` of dirty runs, inode by inode from the cursor, skipping
/// inline candidates and blocked inodes.
fn writeback_nowait(fs: &Rc<FsInfo>, nr_bytes: u64) -> u64 {
    let start = fs.page_cache.cursor.get();
    let inodes: Vec<u64> = {
        let inodes = fs.page_cache.inodes.borrow();
        inodes.range(start..).chain(inodes.range(..start)).map(|(&ino, _)| ino).collect()
    };
    let mut written = 0;
    for ino in inodes {
        if written >= nr_bytes {
            fs.page_cache.cursor.set(ino);
            break;
        }
        let runs = writeback_runs(fs, ino);
        for (first, n) in runs {
            if inline_candidate(fs, ino, first).is_some() {
                continue;
            }
            written += submit_run(fs, ino, first, n);
            if written >= nr_bytes {
                break;
            }
        }
    }
    written
}

/// Drop up to `nr_bytes` of clean pages.
fn evict_clean_pages(fs: &FsInfo, nr_bytes: u64) -> u64 {
    let cache = &fs.page_cache;
    let mut freed = 0;
    let mut inodes = cache.inodes.borrow_mut();
    for inode in inodes.values_mut() {
        let clean: Vec<u64> = inode
            .pages
            .iter()
            .filter(|(idx, p)| p.state == PageState::Clean && !inode.pinned.contains(idx))
            .map(|(&idx, _)| idx)
            .collect();
        for idx in clean {
            if freed >= nr_bytes {
                break;
            }
            inode.pages.remove(&idx);
            cache.count(PageState::Clean, -1);
            freed += PAGE_SIZE;
        }
    }
    drop(inodes);
    if freed > 0 {
        fs.env.memory_release(freed);
        cache.stats.pages_evicted.set(cache.stats.pages_evicted.get() + freed / PAGE_SIZE);
    }
    freed
}

/// The page cache as reclaim sees it (the data address spaces' writepages
/// and release_folio).
pub struct DataShrinker {
    fs: Weak<FsInfo>,
}

impl DataShrinker {
    pub fn new(fs: Weak<FsInfo>) -> DataShrinker {
        DataShrinker { fs }
    }
}

impl Shrinker for DataShrinker {
    fn name(&self) -> &'static str {
        "data"
    }

    fn count(&self) -> CacheCounts {
        self.fs.upgrade().map(|fs| fs.page_cache.counts()).unwrap_or_default()
    }

    fn writeback(&self, nr_bytes: u64, _mode: SyncMode) -> u64 {
        self.fs.upgrade().map_or(0, |fs| writeback_nowait(&fs, nr_bytes))
    }

    fn evict(&self, nr_bytes: u64) -> u64 {
        self.fs.upgrade().map_or(0, |fs| evict_clean_pages(&fs, nr_bytes))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::env::Env;
    use crate::inode::testing::{check_clean, mount, run};
    use crate::inode::{ROOT_DIR_INO, create, unlink};
    use crate::testenv::TestEnv;

    fn read_all(env: &TestEnv, fs: &Rc<FsInfo>, ino: u64) -> Vec<u8> {
        run(env, fs, move |fs| async move { read(&fs, ino, 0, u64::MAX).await }).expect("read")
    }

    fn drop_caches(fs: &FsInfo) {
        evict_clean_pages(fs, u64::MAX);
        assert_eq!(fs.page_cache.counts().clean_bytes, 0);
    }

    #[test]
    fn small_file_goes_inline_and_large_one_to_a_data_extent_with_csums() {
        let (env, fs) = mount();
        let (small, big) = run(&env, &fs, |fs| async move {
            let small = create(&fs, ROOT_DIR_INO, "small").await?;
            let big = create(&fs, ROOT_DIR_INO, "big").await?;
            write(&fs, small, 0, b"hello, world\n").await?;
            write(&fs, big, 0, &vec![7u8; 3 * 4096 + 100]).await?;
            sync_fs(&fs).await?;
            Ok::<_, Error>((small, big))
        })
        .unwrap();
        assert_eq!(fs.page_cache.stats.inline_extents.get(), 1);
        assert_eq!(fs.page_cache.stats.ordered_extents.get(), 1);
        assert_eq!(fs.page_cache.counts().dirty_bytes, 0);
        drop_caches(&fs);
        assert_eq!(read_all(&env, &fs, small), b"hello, world\n");
        assert_eq!(read_all(&env, &fs, big), vec![7u8; 3 * 4096 + 100]);
        assert_eq!(fs.page_cache.stats.page_reads.get(), 4, "the inline file needs no data read");
        check_clean(&env);
        // Reservations all came back.
        assert_eq!(fs.page_cache.delalloc_meta_reserved(), 0);
        assert_eq!(fs.space.get().unwrap().data.info().bytes_may_use, 0);
    }

    #[test]
    fn a_corrupted_data_sector_is_reported_and_never_returned() {
        let (env, fs) = mount();
        let ino = run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "f").await?;
            write(&fs, ino, 0, &vec![1u8; 8192]).await?;
            sync_fs(&fs).await?;
            Ok::<_, Error>(ino)
        })
        .unwrap();
        drop_caches(&fs);
        let root = fs_root(&fs);
        let extent =
            run(&env, &fs, move |_| async move { next_file_extent(&root, ino, 0).await }).unwrap().unwrap();
        let FileExtentBody::Regular { disk_bytenr, .. } = extent.item.body else { panic!("regular extent") };
        let physical = fs.volumes.map_logical(disk_bytenr + 4096, 4096).unwrap();
        env.corrupt_device(physical + 10, 0x40);
        let result = run(&env, &fs, move |fs| async move { read(&fs, ino, 0, 8192).await });
        assert_eq!(result, Err(Error::Io { bytenr: disk_bytenr + 4096 }));
        assert_eq!(fs.page_cache.stats.csum_failures.get(), 1);
        let violations = env.violations.borrow();
        assert!(
            violations.iter().any(|v| v.kind == "data_csum" && v.message.contains("csum failed")),
            "{violations:?}"
        );
        // The good sector still reads.
        drop(violations);
        let first = run(&env, &fs, move |fs| async move { read(&fs, ino, 0, 4096).await }).unwrap();
        assert_eq!(first, vec![1u8; 4096]);
    }

    #[test]
    fn unlinking_a_file_frees_its_extents_and_checksums() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "f").await?;
            write(&fs, ino, 0, &vec![3u8; 64 * 1024]).await?;
            sync_fs(&fs).await?;
            punch_hole(&fs, ino, 4096, 8192).await?;
            write(&fs, ino, 100 * 1024, b"tail").await?;
            sync_fs(&fs).await?;
            unlink(&fs, ROOT_DIR_INO, "f").await?;
            sync_fs(&fs).await
        })
        .unwrap();
        let report = check_clean(&env);
        assert_eq!(report.trees[&crate::format::CSUM_TREE_OBJECTID].items, 0, "every csum item went");
        let (_, used, _) = fs.block_groups.totals(BLOCK_GROUP_DATA);
        assert_eq!(used, 0, "no data extent is left");
    }

    #[test]
    fn unlink_of_a_file_with_dirty_pages_drops_them_and_their_reservations() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "f").await?;
            write(&fs, ino, 0, &vec![3u8; 40 * 1024]).await?;
            unlink(&fs, ROOT_DIR_INO, "f").await?;
            sync_fs(&fs).await
        })
        .unwrap();
        assert_eq!(fs.page_cache.counts(), CacheCounts::default());
        assert_eq!(fs.page_cache.delalloc_meta_reserved(), 0);
        assert_eq!(fs.space.get().unwrap().data.info().bytes_may_use, 0);
        assert_eq!(
            env.memory_bytes(),
            fs.buffer_tree.counts().clean_bytes
                + fs.buffer_tree.counts().dirty_bytes
                + fs.buffer_tree.counts().writeback_bytes
        );
        check_clean(&env);
    }

    /// One operation of the model test.
    #[derive(Clone, Debug)]
    enum DataOp {
        Write { offset: u64, len: usize, byte: u8 },
        Truncate(u64),
        Punch { offset: u64, len: u64 },
        Sync,
        Writeback,
        DropCaches,
    }

    fn data_op() -> impl Strategy<Value = DataOp> {
        prop_oneof![
            6 => (0u64..40_000, 1usize..12_000, any::<u8>()).prop_map(|(offset, len, byte)| DataOp::Write { offset, len, byte }),
            2 => (0u64..45_000).prop_map(DataOp::Truncate),
            2 => (0u64..40_000, 1u64..20_000).prop_map(|(offset, len)| DataOp::Punch { offset, len }),
            1 => Just(DataOp::Sync),
            1 => Just(DataOp::Writeback),
            1 => Just(DataOp::DropCaches),
        ]
    }

    /// What POSIX says the file holds after `op`.
    fn model_apply(model: &mut Vec<u8>, op: &DataOp) {
        match *op {
            DataOp::Write { offset, len, byte } => {
                let end = offset as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[offset as usize..end].fill(byte);
            }
            DataOp::Truncate(size) => model.resize(size as usize, 0),
            DataOp::Punch { offset, len } => {
                let end = (offset + len).min(model.len() as u64) as usize;
                if (offset as usize) < end {
                    model[offset as usize..end].fill(0);
                }
            }
            DataOp::Sync | DataOp::Writeback | DataOp::DropCaches => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Read-after-write, truncate and punch agree with a byte vector
        /// after every operation, through the cache and from disk, and the
        /// committed image checks clean and holds the same bytes after a
        /// fresh mount.
        #[test]
        fn data_operations_match_a_byte_vector(ops in proptest::collection::vec(data_op(), 1..24)) {
            let (env, fs) = mount();
            let ino = run(&env, &fs, |fs| async move { create(&fs, ROOT_DIR_INO, "f").await }).unwrap();
            let mut model = Vec::new();
            for op in &ops {
                let applied = op.clone();
                run(&env, &fs, move |fs| async move {
                    match applied {
                        DataOp::Write { offset, len, byte } => write(&fs, ino, offset, &vec![byte; len]).await,
                        DataOp::Truncate(size) => truncate(&fs, ino, size).await,
                        DataOp::Punch { offset, len } => punch_hole(&fs, ino, offset, len).await,
                        DataOp::Sync => sync_fs(&fs).await,
                        DataOp::Writeback => {
                            writeback_nowait(&fs, u64::MAX);
                            Ok(())
                        }
                        DataOp::DropCaches => {
                            evict_clean_pages(&fs, u64::MAX);
                            Ok(())
                        }
                    }
                })
                .unwrap();
                model_apply(&mut model, op);
                prop_assert_eq!(read_all(&env, &fs, ino), model.clone(), "after {:?}", op);
            }
            run(&env, &fs, |fs| async move { sync_fs(&fs).await }).unwrap();
            drop_caches(&fs);
            prop_assert_eq!(read_all(&env, &fs, ino), model.clone());
            check_clean(&env);
            prop_assert_eq!(fs.page_cache.delalloc_meta_reserved(), 0);
            prop_assert_eq!(fs.space.get().unwrap().data.info().bytes_may_use, 0);
            let dyn_env: Rc<dyn Env> = env.clone();
            let again = env.run(crate::disk_io::open_ctree(dyn_env, crate::fix::FixPolicy::None)).unwrap();
            prop_assert_eq!(read_all(&env, &again, ino), model);
        }
    }
}
