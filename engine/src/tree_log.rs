//! fsync through the log tree, and its replay at mount (kernel: file.c's
//! btrfs_sync_file, tree-log.c).
//!
//! An fsync of a file changed since the last commit does not commit the
//! transaction: it copies the file's items (inode item, inode refs, file
//! extent items, and the checksums of data extents new since the last
//! commit) into the fs tree's log tree, writes the log tree's blocks,
//! records the log tree's root in the log root tree, writes that tree's
//! blocks, and writes the super block of the last commit with `log_root`
//! pointing at the log root tree. A power loss before the next commit
//! leaves a super block with a log; mount replays it into the fs tree and
//! commits. Each commit frees the running transaction's log trees.
//!
//! The kernel's rules this keeps:
//! - Log tree blocks are not in the extent tree (no delayed refs): they are
//!   reserved space while the log lives, pinned when the commit frees the
//!   log, and pinned at replay so that replay's allocations cannot
//!   overwrite them before the replay commits.
//! - Their COWs take space from the tree-log reserve (`BLOCK_RSV_TREELOG`,
//!   empty, so straight from the space info without flushing), never from
//!   a transaction handle's reservation or the global reserve: when that
//!   fails the fsync falls back to a full commit.
//! - A written log block is never modified in place (`should_cow_block`
//!   COWs WRITTEN blocks, and the `overwrite-written` fix exempts log trees).
//! - The log's blocks are written with data-integrity writeback; the super
//!   block waits for the previous commit to finish writing (the kernel's
//!   `tree_log_mutex`), so it never names a tree that is not on disk.
//! - A directory's fsync logs its item, its names and every entry
//!   (DIR_INDEX items only, with one DIR_LOG_INDEX range item saying the log
//!   holds all of them), and each new file an entry names as existing
//!   (`log_new_dir_dentries` with `LOG_INODE_EXISTS`: the item with size 0,
//!   its names, no extents). Replay first removes the entries of a logged
//!   directory that the log lacks (`replay_dir_deletes`; an inode not logged
//!   loses that link), then replays every inode's item, extents and names.
//!   A directory's size after replay is what its entries add up to.
//! - A file whose names changed in the running transaction (rename, link,
//!   unlink), an inode whose parent directory is new, a directory an
//!   existing inode was renamed or linked into or out of (or whose subvolume
//!   links changed), a directory naming a new subdirectory, and every fsync
//!   after a logged inode's names changed or a log write failed, fall back
//!   to a full commit (the kernel's `BTRFS_LOG_FORCE_COMMIT` and
//!   `last_trans_log_full_commit`).
//!
//! Departures: one log per transaction and fsyncs serialize on the log
//! mutex for the whole log-and-sync (the kernel batches concurrent fsyncs
//! of one log transaction and alternates two log transactions); a logged
//! file always logs all its items (`LOG_INODE_ALL`, no fast fsync of only
//! the changed extents); the sums of a new data extent are logged for the
//! whole extent, not only the range a file extent references (so that the
//! checksum tree covers exactly the data extents after replay); a directory
//! logs all its entries, not only those in leaves the transaction changed;
//! the renames, links, new subdirectories and new ancestors the kernel
//! logs (`btrfs_log_new_name`, `log_all_new_ancestors`, new subdirectories
//! in `log_new_dir_dentries`) commit instead; subvolume links are neither
//! logged nor removed by replay.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::ctree::{Path, Root, del_items, insert_item, next_item, search_slot, walk_tree};
use crate::env::{TraceEvent, WaitOn};
use crate::error::Error;
use crate::extent_io::{clear_extent_buffer_dirty, read_tree_block_verified, write_and_wait_ebs};
use crate::format::{
    BLOCK_GROUP_METADATA, DIR_INDEX_KEY, DIR_LOG_INDEX_KEY, DirItem, EXTENT_CSUM_KEY, EXTENT_CSUM_OBJECTID,
    EXTENT_DATA_KEY, EXTENT_ITEM_KEY, FS_TREE_OBJECTID, FileExtentBody, FileExtentItem, FixedItem,
    INODE_ITEM_KEY, INODE_REF_KEY, InodeItem, Key, ROOT_ITEM_KEY, RootItem, TREE_LOG_OBJECTID, inode_refs,
};
use crate::fs::FsInfo;
use crate::transaction::{
    TransHandle, check_fs_error, commit_transaction, end_transaction, mark_buffer_dirty, start_transaction,
};
use crate::wait::WaitQueue;

/// The key of the log tree's root item in the log root tree.
fn log_root_item_key() -> Key {
    Key::new(TREE_LOG_OBJECTID, ROOT_ITEM_KEY, FS_TREE_OBJECTID)
}

/// What fsync and replay did, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// fsync calls that returned success.
    pub fsyncs: u64,
    /// fsyncs with nothing to log (the file is unchanged since a commit).
    pub nothing_to_log: u64,
    /// Inodes copied into a log tree.
    pub inodes_logged: u64,
    /// Of those, directories logged with all their entries.
    pub dirs_logged: u64,
    /// Of those, new inodes a logged directory names, logged as existing.
    pub new_inodes_logged: u64,
    /// Log syncs: log blocks, log root tree and super block written.
    pub log_syncs: u64,
    /// fsyncs that committed the transaction instead.
    pub full_commits: u64,
    /// Log tree blocks written by log syncs.
    pub log_blocks_written: u64,
    /// Inodes replayed from a log at mount.
    pub inodes_replayed: u64,
    /// Directory entries replay removed because a logged directory no
    /// longer had them (`replay_dir_deletes`).
    pub entries_deleted: u64,
}

/// The log trees of the running transaction and what fsync needs to know
/// about inodes (kernel: the log fields of btrfs_root and btrfs_inode).
#[derive(Default)]
pub struct LogControl {
    /// The fs tree's log tree (`root->log_root`) and the log root tree
    /// (`fs_info->log_root_tree`), for transaction `transid`.
    log: RefCell<Option<(Rc<Root>, Rc<Root>)>>,
    transid: Cell<u64>,
    /// Blocks of the log trees alive now.
    blocks: RefCell<BTreeSet<u64>>,
    /// Log blocks dirtied since the last log sync (`dirty_log_pages`).
    dirty: RefCell<BTreeSet<u64>>,
    /// Checksum item keys each inode put in the log.
    csum_keys: RefCell<BTreeMap<u64, Vec<Key>>>,
    /// The transaction whose fsyncs must commit (`last_trans_log_full_commit`).
    full_commit: Cell<u64>,
    /// Per inode, the last transaction that changed its items (`last_trans`).
    last_trans: RefCell<BTreeMap<u64, u64>>,
    /// Per inode, the last transaction that changed its names.
    names_changed: RefCell<BTreeMap<u64, u64>>,
    /// Per inode, the last transaction it was logged in (`logged_trans`).
    logged: RefCell<BTreeMap<u64, u64>>,
    /// Per directory, the last transaction that moved an existing inode's
    /// entry in or out of it (rename, link) or changed a subvolume link in
    /// it.
    entries_moved: RefCell<BTreeMap<u64, u64>>,
    /// The log mutex: one fsync logs and syncs at a time.
    locked: Cell<bool>,
    wait: WaitQueue,
    pub stats: RefCell<LogStats>,
}

impl LogControl {
    /// `ino`'s items changed in transaction `transid` (`btrfs_update_inode`
    /// setting `last_trans`).
    pub(crate) fn inode_changed(&self, ino: u64, transid: u64) {
        self.last_trans.borrow_mut().insert(ino, transid);
    }

    /// `ino` gained or lost a name in transaction `transid`. If it is in
    /// that transaction's log, the log's names for it are stale: later
    /// fsyncs commit.
    pub(crate) fn names_changed(&self, ino: u64, transid: u64) {
        self.names_changed.borrow_mut().insert(ino, transid);
        if self.logged.borrow().get(&ino) == Some(&transid) {
            self.full_commit.set(transid);
        }
    }

    /// An existing inode's entry moved into or out of `dir` (rename, link),
    /// or a subvolume link in `dir` changed, in transaction `transid`.
    /// Replaying a log of `dir` alone would drop or double that inode's
    /// other name, or disagree with the subvolume links on disk, so an
    /// fsync of `dir` in that transaction commits (the kernel's
    /// `last_unlink_trans` and `btrfs_log_new_name` cover these cases by
    /// logging more).
    pub(crate) fn entries_moved(&self, dir: u64, transid: u64) {
        self.entries_moved.borrow_mut().insert(dir, transid);
    }

    /// A new log tree block (`btrfs_alloc_tree_block` for a log root).
    pub(crate) fn block_allocated(&self, bytenr: u64) {
        self.blocks.borrow_mut().insert(bytenr);
    }

    /// A log tree block was COWed away.
    pub(crate) fn block_freed(&self, bytenr: u64) {
        self.blocks.borrow_mut().remove(&bytenr);
        self.dirty.borrow_mut().remove(&bytenr);
    }

    /// A log tree block was dirtied (it goes to the log's dirty set, not
    /// the transaction's: the commit does not write log blocks).
    pub(crate) fn block_dirtied(&self, bytenr: u64) {
        self.dirty.borrow_mut().insert(bytenr);
    }

    async fn lock(&self, fs: &FsInfo) -> LogMutexGuard<'_> {
        if self.locked.get() {
            fs.env.wait_on(WaitOn::Other("log mutex"));
            self.wait.wait_until(|| !self.locked.get()).await;
        }
        self.locked.set(true);
        LogMutexGuard { log: self }
    }
}

struct LogMutexGuard<'a> {
    log: &'a LogControl,
}

impl Drop for LogMutexGuard<'_> {
    fn drop(&mut self) {
        self.log.locked.set(false);
        self.log.wait.wake_all();
    }
}

/// Why an fsync commits instead of syncing the log.
fn full_commit_reason(
    fs: &FsInfo,
    handle: &TransHandle,
    inode: &crate::inode::BtrfsInode,
) -> Option<&'static str> {
    let log = &fs.log;
    if log.full_commit.get() == handle.transid {
        return Some("fsync_commit: log needs a full commit");
    }
    if log.names_changed.borrow().get(&inode.ino) == Some(&handle.transid) {
        return Some("fsync_commit: names changed");
    }
    if inode.is_dir() && log.entries_moved.borrow().get(&inode.ino) == Some(&handle.transid) {
        return Some("fsync_commit: entries moved");
    }
    None
}

/// `btrfs_sync_file`: make `ino`'s data and names durable. Writes and
/// waits for its data, then logs and syncs the log, or commits.
pub async fn fsync(fs: &Rc<FsInfo>, ino: u64) -> Result<(), Error> {
    crate::inode::trace_op(fs, "fsync", do_fsync(fs, ino).await)
}

async fn do_fsync(fs: &Rc<FsInfo>, ino: u64) -> Result<(), Error> {
    check_fs_error(fs)?;
    crate::inode::iget(fs, ino).await?;
    let _inode_lock = crate::inode::lock_inode(fs, ino, true).await;
    let inode = crate::inode::iget(fs, ino).await?;
    crate::file::write_and_wait_inode(fs, ino).await?;
    check_fs_error(fs)?;
    // Nothing changed since a commit: wait for that commit if it is still
    // writing (the kernel's `btrfs_inode_in_log` / `last_trans` checks).
    let last_trans = fs.log.last_trans.borrow().get(&ino).copied().unwrap_or(0);
    let running = fs.trans.running.borrow().as_ref().map(|t| t.transid);
    if last_trans <= fs.trans.last_trans_committed.get() || running != Some(last_trans) {
        crate::transaction::wait_for_transid(fs, last_trans).await?;
        fs.log.stats.borrow_mut().nothing_to_log += 1;
        fs.log.stats.borrow_mut().fsyncs += 1;
        return Ok(());
    }
    let root = fs.root(FS_TREE_OBJECTID);
    let handle = start_transaction(fs, &root, 0, "fsync").await?;
    let guard = fs.log.lock(fs).await;
    let mut reason = full_commit_reason(fs, &handle, &inode);
    if reason.is_none() {
        // The log is synced only if the whole inode made it into the log.
        let logged = async {
            if parent_is_new(&handle, ino).await? {
                return Ok(Some("fsync_commit: new parent directory"));
            }
            if inode.is_dir() {
                if !log_dir(&handle, ino).await? {
                    // Half logged: no fsync may sync this log now.
                    fs.log.full_commit.set(handle.transid);
                    return Ok(Some("fsync_commit: new subdirectory"));
                }
            } else {
                log_inode(&handle, ino, LogMode::All).await?;
            }
            sync_log(&handle).await?;
            Ok(None)
        };
        match logged.await {
            Ok(Some(why)) => reason = Some(why),
            Ok(None) => {
                drop(guard);
                end_transaction(handle);
                fs.log.stats.borrow_mut().fsyncs += 1;
                return Ok(());
            }
            Err(error) => {
                // A half-written log is never synced again.
                fs.log.full_commit.set(handle.transid);
                fs.env.trace(TraceEvent::Note { what: "log_failed", a: ino, b: handle.transid, c: 0 });
                if fs.trans.fs_error.get().is_some() {
                    drop(guard);
                    end_transaction(handle);
                    return Err(error);
                }
                reason = Some("fsync_commit: log failed");
            }
        }
    }
    drop(guard);
    let what = reason.expect("a reason to commit");
    fs.env.trace(TraceEvent::Note { what, a: ino, b: handle.transid, c: 0 });
    fs.log.stats.borrow_mut().full_commits += 1;
    commit_transaction(handle).await?;
    fs.log.stats.borrow_mut().fsyncs += 1;
    Ok(())
}

/// Whether a directory naming `ino` was created after the last commit
/// (its entry would be lost; the kernel logs new ancestors).
async fn parent_is_new(handle: &TransHandle, ino: u64) -> Result<bool, Error> {
    let fs = &handle.fs;
    for (key, _) in inode_items(&fs.root(FS_TREE_OBJECTID), ino).await? {
        if key.item_type != INODE_REF_KEY {
            continue;
        }
        let parent = crate::inode::iget(fs, key.offset).await?;
        if parent.item.generation > fs.trans.last_trans_committed.get() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Every item of `ino` in `root`, in key order.
async fn inode_items(root: &Rc<Root>, ino: u64) -> Result<Vec<(Key, Vec<u8>)>, Error> {
    let mut items = Vec::new();
    let mut path = Path::new();
    search_slot(None, root, &Key::new(ino, 0, 0), &mut path, 0, false).await?;
    if path.slots[0] >= path.leaf().nritems() as usize && !crate::ctree::next_leaf(root, &mut path).await? {
        return Ok(items);
    }
    loop {
        let key = path.item_key(path.slots[0]);
        if key.objectid != ino {
            return Ok(items);
        }
        items.push((key, path.item_data(path.slots[0])));
        if !next_item(root, &mut path).await? {
            return Ok(items);
        }
    }
}

/// The running transaction's log trees, created on first use
/// (`btrfs_add_log_tree`, `btrfs_init_log_root_tree`).
async fn log_trees(handle: &TransHandle) -> Result<(Rc<Root>, Rc<Root>), Error> {
    let fs = &handle.fs;
    if let Some(trees) = fs.log.log.borrow().as_ref() {
        assert_eq!(fs.log.transid.get(), handle.transid, "a log tree outlived its transaction");
        return Ok(trees.clone());
    }
    let mut trees: Vec<Rc<Root>> = Vec::new();
    for _ in 0..2 {
        let placeholder = crate::extent_io::alloc_dummy_extent_buffer(fs, 0);
        let root = Root::new(fs, TREE_LOG_OBJECTID, placeholder, RootItem::default());
        let leaf = match crate::extent_tree::alloc_tree_block(handle, &root, 0).await {
            Ok(leaf) => leaf,
            Err(error) => {
                // No half-built log: the tree already made gives its block back
                // (never written, so free at once).
                for tree in &trees {
                    crate::extent_tree::free_tree_block(handle, tree, &tree.node());
                }
                return Err(error);
            }
        };
        root.set_node(leaf.clone());
        crate::locking::tree_unlock(&leaf);
        trees.push(root);
    }
    let trees = (trees[0].clone(), trees[1].clone());
    fs.log.transid.set(handle.transid);
    *fs.log.log.borrow_mut() = Some(trees.clone());
    Ok(trees)
}

/// Delete every item of `objectid` from the log tree.
async fn drop_logged_items(handle: &TransHandle, log: &Rc<Root>, ino: u64) -> Result<(), Error> {
    loop {
        let mut path = Path::new();
        search_slot(Some(handle), log, &Key::new(ino, u8::MAX, u64::MAX), &mut path, -1, true).await?;
        let last = path.slots[0];
        let mut first = last;
        while first > 0 && path.item_key(first - 1).objectid == ino {
            first -= 1;
        }
        if first == last {
            return Ok(());
        }
        del_items(handle, log, &mut path, first, last - first).await?;
    }
}

/// Delete one item of the log tree, if it is there.
async fn drop_logged_item(handle: &TransHandle, log: &Rc<Root>, key: &Key) -> Result<(), Error> {
    let mut path = Path::new();
    if search_slot(Some(handle), log, key, &mut path, -1, true).await? {
        let slot = path.slots[0];
        del_items(handle, log, &mut path, slot, 1).await?;
    }
    Ok(())
}

/// What `log_inode` copies of an inode (the kernel's `LOG_INODE_ALL` and
/// `LOG_INODE_EXISTS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogMode {
    /// Everything: the item, the names, a file's extents and the sums of
    /// its new data extents, a directory's entries with a range item saying
    /// the log holds all of them.
    All,
    /// That a new inode exists, with its names: the item with size 0 and no
    /// extents (for a new file a logged directory names; its data is its
    /// own fsync's business).
    Exists,
}

/// The whole index range of a directory, logged as one `DIR_LOG_INDEX`
/// item (`struct btrfs_dir_log_item`: the range's last index; its first is
/// the key's offset). Replay removes any entry in the range that the log
/// does not have.
fn dir_log_range(dir: u64) -> (Key, [u8; 8]) {
    (Key::new(dir, DIR_LOG_INDEX_KEY, 0), u64::MAX.to_le_bytes())
}

/// `btrfs_log_inode` of a directory (`LOG_INODE_ALL`, `log_directory_changes`)
/// and `log_new_dir_dentries`: the directory's item, names and every entry,
/// and each new file an entry names, as existing. Returns false, with the
/// directory half logged, when an entry names a new directory (its fsync
/// commits: the kernel logs new subdirectories too).
async fn log_dir(handle: &TransHandle, dir: u64) -> Result<bool, Error> {
    let fs = &handle.fs;
    for child in log_inode(handle, dir, LogMode::All).await? {
        if fs.log.logged.borrow().get(&child) == Some(&handle.transid) {
            continue;
        }
        // Made in an earlier transaction: the log replays over that
        // transaction's commit (sync_log waits for it), which has the inode
        // as it was, even if that commit is still running now.
        let inode = crate::inode::iget(fs, child).await?;
        if inode.item.generation < handle.transid {
            continue;
        }
        if inode.is_dir() {
            return Ok(false);
        }
        log_inode(handle, child, LogMode::Exists).await?;
        fs.log.stats.borrow_mut().new_inodes_logged += 1;
    }
    fs.log.stats.borrow_mut().dirs_logged += 1;
    Ok(true)
}

/// `btrfs_log_inode`: replace whatever the log holds of `ino` with what
/// `mode` copies of it now. Returns the inodes a directory's entries name
/// (subvolume links are neither logged nor returned).
async fn log_inode(handle: &TransHandle, ino: u64, mode: LogMode) -> Result<Vec<u64>, Error> {
    let fs = &handle.fs;
    let (log, _) = log_trees(handle).await?;
    crate::delayed_inode::commit_one_inode_delayed_items(handle, ino).await?;
    drop_logged_items(handle, &log, ino).await?;
    let old_csums = fs.log.csum_keys.borrow_mut().remove(&ino).unwrap_or_default();
    for key in &old_csums {
        drop_logged_item(handle, &log, key).await?;
    }
    let committed = fs.trans.last_trans_committed.get();
    let mut new_extents = BTreeMap::new();
    let mut children = Vec::new();
    let fs_root = fs.root(FS_TREE_OBJECTID);
    let inode = fs.inodes.get(ino).expect("a logged inode is in memory");
    for (key, mut data) in inode_items(&fs_root, ino).await? {
        match key.item_type {
            INODE_ITEM_KEY => {
                // The in-memory inode: its i_size, not the on-disk one.
                let mut item = inode.item;
                item.transid = handle.transid;
                if mode == LogMode::Exists {
                    item.size = 0;
                    item.nbytes = 0;
                }
                data = item.to_bytes();
            }
            INODE_REF_KEY => {}
            // Only the index: replay makes the DIR_ITEM from it.
            DIR_INDEX_KEY if mode == LogMode::All => {
                let entry = read_dir_index(&key, &data)?;
                if entry.location.item_type != INODE_ITEM_KEY {
                    continue;
                }
                children.push(entry.location.objectid);
            }
            EXTENT_DATA_KEY if mode == LogMode::All => {
                let extent = FileExtentItem::read(&data)
                    .map_err(|e| Error::BadTreeBlock(format!("file extent {key}: {e}")))?;
                if let FileExtentBody::Regular { disk_bytenr, disk_num_bytes, .. } = extent.body
                    && disk_bytenr != 0
                    && extent.generation > committed
                {
                    new_extents.insert(disk_bytenr, disk_num_bytes);
                }
            }
            _ => continue,
        }
        insert_item(handle, &log, &key, &data).await?;
    }
    if inode.is_dir() && mode == LogMode::All {
        let (key, end) = dir_log_range(ino);
        insert_item(handle, &log, &key, &end).await?;
    }
    let mut csum_keys = Vec::new();
    for (&bytenr, &len) in &new_extents {
        let sums = crate::file_item::lookup_csums(fs, bytenr, len).await?;
        csum_keys.extend(crate::file_item::insert_csums(handle, &log, bytenr, &sums).await?);
    }
    fs.log.csum_keys.borrow_mut().insert(ino, csum_keys);
    fs.log.logged.borrow_mut().insert(ino, handle.transid);
    fs.log.stats.borrow_mut().inodes_logged += 1;
    Ok(children)
}

/// `btrfs_sync_log`: write the log tree, point the log root tree at it,
/// write that, then the super block of the last commit naming the log root
/// tree.
async fn sync_log(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let (log, log_root_tree) = log_trees(handle).await?;
    write_log_blocks(fs).await?;
    let node = log.node();
    let item = RootItem {
        bytenr: node.start,
        level: node.level(),
        generation: handle.transid,
        generation_v2: handle.transid,
        refs: 1,
        ..RootItem::default()
    };
    drop(node);
    let key = log_root_item_key();
    let mut path = Path::new();
    if search_slot(Some(handle), &log_root_tree, &key, &mut path, 0, true).await? {
        let leaf = path.leaf().clone();
        item.write(crate::accessors::item_data_mut(&mut leaf.data.borrow_mut(), path.slots[0]));
        mark_buffer_dirty(handle, &leaf);
        drop(path);
    } else {
        drop(path);
        insert_item(handle, &log_root_tree, &key, &item.to_bytes()).await?;
    }
    write_log_blocks(fs).await?;
    // The super block of the previous commit must be on disk first (the
    // kernel's tree_log_mutex): ours repeats it with the log root added.
    crate::transaction::wait_for_transid(fs, handle.transid - 1).await?;
    let mut sb = fs.volumes.super_copy().expect("a mounted filesystem has a super block copy");
    assert_eq!(sb.generation, fs.trans.last_trans_committed.get(), "the super copy is not the last commit's");
    let top = log_root_tree.node();
    sb.log_root = top.start;
    sb.log_root_level = top.level();
    drop(top);
    crate::disk_io::write_all_supers(fs, &sb).await?;
    fs.env.trace(TraceEvent::Note { what: "sync_log", a: handle.transid, b: sb.log_root, c: 0 });
    fs.log.stats.borrow_mut().log_syncs += 1;
    Ok(())
}

/// Write and wait for the log blocks dirtied since the last log sync.
async fn write_log_blocks(fs: &FsInfo) -> Result<(), Error> {
    let dirty: Vec<u64> = std::mem::take(&mut *fs.log.dirty.borrow_mut()).into_iter().collect();
    fs.log.stats.borrow_mut().log_blocks_written += dirty.len() as u64;
    let written = write_and_wait_ebs(fs, &dirty).await;
    // btrfs_sync_log's test of LOG1_ERR: a failed log write fails this
    // fsync's log (it commits instead), never the transaction.
    let failed = fs.test_and_clear_log_err(0);
    written?;
    if failed {
        return Err(Error::Io { bytenr: 0 });
    }
    Ok(())
}

/// `btrfs_free_log` and `btrfs_free_log_root_tree` at commit: the running
/// transaction's log trees go; their blocks stay pinned until the commit
/// completes (a crash before then replays the log).
pub(crate) fn free_log_trees(handle: &TransHandle) {
    let fs = &handle.fs;
    let log = &fs.log;
    // Entries of transactions already on disk say no more than no entry.
    let current = |_: &u64, transid: &mut u64| *transid >= handle.transid;
    log.last_trans.borrow_mut().retain(current);
    log.names_changed.borrow_mut().retain(current);
    log.logged.borrow_mut().retain(current);
    log.entries_moved.borrow_mut().retain(current);
    if log.log.borrow_mut().take().is_none() {
        return;
    }
    assert_eq!(log.transid.get(), handle.transid, "a log tree outlived its transaction");
    for bytenr in std::mem::take(&mut *log.blocks.borrow_mut()) {
        if let Some(eb) = fs.buffer_tree.get(bytenr) {
            clear_extent_buffer_dirty(&eb);
        }
        crate::extent_tree::release_tree_block(handle, bytenr, BLOCK_GROUP_METADATA, true);
    }
    log.dirty.borrow_mut().clear();
    log.csum_keys.borrow_mut().clear();
}

// ---------------------------------------------------------------------------
// Replay.

/// What the log holds of one inode.
#[derive(Default)]
struct LoggedInode {
    item: Option<InodeItem>,
    /// (parent directory, index, name).
    refs: Vec<(u64, u64, Vec<u8>)>,
    extents: Vec<(Key, Vec<u8>)>,
    /// A directory's entries: (index, entry).
    entries: Vec<(u64, DirItem)>,
    /// A directory's index ranges the log holds all entries of (first, last).
    ranges: Vec<(u64, u64)>,
}

/// `btrfs_recover_log_trees`: the super block names a log root tree; read
/// it and the fs tree's log, pin their blocks, replay every logged inode
/// and the logged sums into the fs and checksum trees, and commit.
pub async fn recover_log_trees(fs: &Rc<FsInfo>, log_root: u64, level: u8) -> Result<(), Error> {
    let generation = fs.trans.last_trans_committed.get() + 1;
    let top = read_tree_block_verified(fs, log_root, TREE_LOG_OBJECTID, level, generation, None).await?;
    let log_root_tree = Root::new(fs, TREE_LOG_OBJECTID, top, RootItem::default());
    let Some(bytes) = crate::ctree::lookup_item(&log_root_tree, &log_root_item_key()).await? else {
        return Err(Error::BadTreeBlock("log root tree without the fs tree's log".into()));
    };
    let item = RootItem::read_any(&bytes).map_err(|e| Error::BadTreeBlock(format!("log root item: {e}")))?;
    let node =
        read_tree_block_verified(fs, item.bytenr, TREE_LOG_OBJECTID, item.level, item.generation, None)
            .await?;
    let log = Root::new(fs, TREE_LOG_OBJECTID, node, item);
    let mut blocks = Vec::new();
    let mut items: Vec<(Key, Vec<u8>)> = Vec::new();
    for tree in [&log_root_tree, &log] {
        let is_log = Rc::ptr_eq(tree, &log);
        walk_tree(tree, |eb| {
            blocks.push(eb.start);
            if is_log && eb.level() == 0 {
                let data = eb.data.borrow();
                for slot in 0..crate::accessors::header_nritems(&data) as usize {
                    items.push((
                        crate::accessors::item_key(&data, slot),
                        crate::accessors::item_data(&data, slot).to_vec(),
                    ));
                }
            }
        })
        .await?;
    }
    let mut inodes: BTreeMap<u64, LoggedInode> = BTreeMap::new();
    let mut csums = Vec::new();
    for (key, data) in items {
        let decode = |e: crate::format::DecodeError| Error::BadTreeBlock(format!("logged item {key}: {e}"));
        match key.item_type {
            EXTENT_CSUM_KEY if key.objectid == EXTENT_CSUM_OBJECTID => csums.push((key.offset, data)),
            INODE_ITEM_KEY => {
                if data.len() < InodeItem::SIZE {
                    return Err(Error::BadTreeBlock(format!("logged inode item {key} is short")));
                }
                inodes.entry(key.objectid).or_default().item = Some(InodeItem::read(&data));
            }
            INODE_REF_KEY => {
                let logged = inodes.entry(key.objectid).or_default();
                for r in inode_refs(&data) {
                    let r = r.map_err(decode)?;
                    logged.refs.push((key.offset, r.index, r.name));
                }
            }
            EXTENT_DATA_KEY => inodes.entry(key.objectid).or_default().extents.push((key, data)),
            DIR_INDEX_KEY => {
                let entry = read_dir_index(&key, &data)?;
                inodes.entry(key.objectid).or_default().entries.push((key.offset, entry));
            }
            DIR_LOG_INDEX_KEY => {
                let end = data
                    .get(..8)
                    .ok_or_else(|| Error::BadTreeBlock(format!("logged range {key} is short")))?;
                let end = u64::from_le_bytes(end.try_into().expect("8 bytes"));
                inodes.entry(key.objectid).or_default().ranges.push((key.offset, end));
            }
            _ => return Err(Error::BadTreeBlock(format!("unexpected item {key} in the log"))),
        }
    }
    let fs_root = fs.root(FS_TREE_OBJECTID);
    // Each logged inode: its item, names and extents (about 4 items), each
    // name 3 more, each extent 2; each entry of a directory, 3 if replay
    // must remove it.
    let items: u64 = inodes
        .values()
        .map(|i| 4 + 3 * i.refs.len() as u64 + 2 * i.extents.len() as u64 + 3 * i.entries.len() as u64)
        .sum();
    let handle = start_transaction(fs, &fs_root, items + csums.len() as u64, "log_replay").await?;
    let result = replay_all(&handle, &blocks, &inodes, &csums).await;
    if let Err(error) = result {
        crate::transaction::abort_transaction(&handle, &error, "btrfs_recover_log_trees");
        end_transaction(handle);
        return Err(error);
    }
    fs.env.trace(TraceEvent::Note {
        what: "log_replay",
        a: inodes.len() as u64,
        b: blocks.len() as u64,
        c: csums.len() as u64,
    });
    commit_transaction(handle).await
}

/// Pin the log's blocks, replay every logged inode, then the logged sums
/// of new data extents.
async fn replay_all(
    handle: &TransHandle,
    blocks: &[u64],
    inodes: &BTreeMap<u64, LoggedInode>,
    csums: &[(u64, Vec<u8>)],
) -> Result<(), Error> {
    let fs = &handle.fs;
    for &bytenr in blocks {
        crate::extent_tree::pin_extent_for_log_replay(handle, bytenr, u64::from(fs.nodesize))?;
    }
    // The kernel's stages: logged directories exist and lose the entries
    // they no longer had, then every inode's names and extents go in.
    for (&dir, logged) in inodes.iter().filter(|(_, logged)| !logged.ranges.is_empty()) {
        create_logged_inode(handle, dir, logged).await?;
        replay_dir_deletes(handle, dir, logged, inodes).await?;
    }
    let mut new_extents = BTreeSet::new();
    for (&ino, logged) in inodes {
        replay_inode(handle, ino, logged, &mut new_extents).await?;
        fs.log.stats.borrow_mut().inodes_replayed += 1;
    }
    let csum_root = fs.root(crate::format::CSUM_TREE_OBJECTID);
    for (bytenr, data) in csums {
        // Sums of extents the last commit has are in the checksum tree.
        if crate::file_item::lookup_csum(fs, *bytenr).await?.is_some() {
            continue;
        }
        let sums: Vec<u32> =
            data.chunks_exact(4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes"))).collect();
        crate::file_item::insert_csums(handle, &csum_root, *bytenr, &sums).await?;
    }
    Ok(())
}

/// The entry of a DIR_INDEX item.
fn read_dir_index(key: &Key, data: &[u8]) -> Result<DirItem, Error> {
    DirItem::read(data)
        .map(|(entry, _)| entry)
        .map_err(|e| Error::BadTreeBlock(format!("dir index {key}: {e}")))
}

/// A logged inode the fs tree does not have yet gets an empty item (no
/// names, no bytes, a directory no entries) for replay to fill.
async fn create_logged_inode(handle: &TransHandle, ino: u64, logged: &LoggedInode) -> Result<(), Error> {
    let fs = &handle.fs;
    let Some(item) = logged.item else {
        return Err(Error::BadTreeBlock(format!("inode {ino} logged without its inode item")));
    };
    if let Err(Error::Enoent) = crate::inode::iget(fs, ino).await {
        let root = fs.root(FS_TREE_OBJECTID);
        let size = if crate::inode::mode_is_dir(item.mode) { 0 } else { item.size };
        let fresh = InodeItem { nlink: 0, nbytes: 0, size, ..item };
        insert_item(handle, &root, &Key::new(ino, INODE_ITEM_KEY, 0), &fresh.to_bytes()).await?;
        root.highest_objectid.set(root.highest_objectid.get().max(ino));
        crate::inode::iget(fs, ino).await?;
    }
    Ok(())
}

/// `replay_dir_deletes`: an entry of a logged directory, in a range the log
/// holds all of, that the log does not have was removed before the fsync.
/// It goes now; an inode it named that is not logged loses that link (and
/// goes with its last one). A logged inode's names are its own log's
/// business, and every logged entry must be the fs tree's already or a
/// logged inode's name.
async fn replay_dir_deletes(
    handle: &TransHandle,
    dir: u64,
    logged: &LoggedInode,
    inodes: &BTreeMap<u64, LoggedInode>,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let root = fs.root(FS_TREE_OBJECTID);
    let in_range = |index: u64| logged.ranges.iter().any(|&(first, last)| (first..=last).contains(&index));
    let mut on_disk = Vec::new();
    for (key, data) in inode_items(&root, dir).await? {
        if key.item_type == DIR_INDEX_KEY {
            on_disk.push((key.offset, read_dir_index(&key, &data)?));
        }
    }
    // The same entry: index, name and what it names.
    let same = |(i, e): &(u64, DirItem), index: u64, entry: &DirItem| {
        *i == index && e.name == entry.name && e.location == entry.location
    };
    for (index, entry) in &on_disk {
        let child = entry.location.objectid;
        if entry.location.item_type != INODE_ITEM_KEY
            || !in_range(*index)
            || inodes.contains_key(&child)
            || logged.entries.iter().any(|logged| same(logged, *index, entry))
        {
            continue;
        }
        crate::inode::iget(fs, child).await?;
        crate::inode::unlink_and_evict(handle, &root, dir, child, &entry.name).await?;
        fs.log.stats.borrow_mut().entries_deleted += 1;
    }
    for (index, entry) in &logged.entries {
        let child = entry.location.objectid;
        let known =
            inodes.get(&child).is_some_and(|i| i.refs.iter().any(|(d, _, n)| *d == dir && *n == entry.name))
                || on_disk.iter().any(|disk| same(disk, *index, entry));
        if !known {
            return Err(Error::BadTreeBlock(format!(
                "the log of directory {dir} names inode {child} at index {index}, which has that name neither on disk nor in its own log"
            )));
        }
    }
    Ok(())
}

/// Replay one logged inode (`replay_one_buffer`, `add_inode_ref`,
/// `replay_one_extent`, `fixup_inode_link_counts`): its item as logged,
/// exactly its logged extents, exactly its logged names (a name another
/// inode holds is unlinked from it first), its link count from its names.
async fn replay_inode(
    handle: &TransHandle,
    ino: u64,
    logged: &LoggedInode,
    new_extents: &mut BTreeSet<u64>,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let root = fs.root(FS_TREE_OBJECTID);
    create_logged_inode(handle, ino, logged).await?;
    let mut item = logged.item.expect("create_logged_inode checked the item");
    if !crate::inode::mode_is_dir(item.mode) {
        crate::file::drop_extents(handle, &root, ino, 0, u64::MAX).await?;
        let extent_root = fs.root(crate::format::EXTENT_TREE_OBJECTID);
        for (key, data) in &logged.extents {
            insert_item(handle, &root, key, data).await?;
            let extent = FileExtentItem::read(data)
                .map_err(|e| Error::BadTreeBlock(format!("logged file extent {key}: {e}")))?;
            let Some((bytenr, len, ref_key)) = crate::file::data_ref_of(root.objectid, ino, key, &extent)
            else {
                continue;
            };
            let exists = new_extents.contains(&bytenr)
                || crate::ctree::lookup_item(&extent_root, &Key::new(bytenr, EXTENT_ITEM_KEY, len))
                    .await?
                    .is_some();
            if !exists {
                crate::extent_tree::exclude_logged_extent(fs, bytenr, len)?;
                new_extents.insert(bytenr);
            }
            handle.transaction.delayed_refs.add_data_ref(bytenr, len, ref_key, 1, !exists);
        }
    }
    // Names: drop those the log does not have, add those it has.
    let mut on_disk = Vec::new();
    for (key, data) in inode_items(&root, ino).await? {
        if key.item_type == INODE_REF_KEY {
            for r in inode_refs(&data) {
                let r = r.map_err(|e| Error::BadTreeBlock(format!("inode ref {key}: {e}")))?;
                on_disk.push((key.offset, r.name));
            }
        }
    }
    for (dir, name) in &on_disk {
        if !logged.refs.iter().any(|(d, _, n)| d == dir && n == name) {
            crate::inode::iget(fs, *dir).await?;
            crate::inode::unlink_inode_entry(handle, &root, *dir, ino, name).await?;
        }
    }
    for (dir, index, name) in &logged.refs {
        if on_disk.iter().any(|(d, n)| d == dir && n == name) {
            continue;
        }
        crate::inode::iget(fs, *dir).await?;
        if let Some((victim, _)) = crate::inode::inode_by_name(&root, *dir, name).await? {
            crate::inode::iget(fs, victim).await?;
            crate::inode::unlink_and_evict(handle, &root, *dir, victim, name).await?;
        }
        crate::inode::add_link(handle, &root, *dir, ino, name, true, *index).await?;
        fs.inodes.update(*dir, |inode| {
            if inode.index_cnt != u64::MAX {
                inode.index_cnt = inode.index_cnt.max(index + 1);
            }
        });
    }
    item.nlink = logged.refs.len() as u32;
    fs.inodes.update(ino, |inode| {
        // A directory's size is what its entries add up to after replay
        // (the kernel's overwrite_item keeps a directory's i_size).
        if inode.is_dir() {
            item.size = inode.item.size;
        }
        inode.item = item;
        inode.disk_i_size = item.size;
        inode.dir_index = if logged.refs.len() == 1 { logged.refs[0].1 } else { 0 };
    });
    crate::inode::update_inode(handle, ino).await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::file::{punch_hole, read, sync_fs, truncate, write};
    use crate::inode::testing::{check_clean, crash_and_mount, mount, run};
    use crate::inode::{ROOT_DIR_INO, create, lookup, rename, unlink};
    use crate::testenv::TestEnv;

    fn contents(env: &TestEnv, fs: &Rc<FsInfo>, name: &'static str) -> Option<Vec<u8>> {
        run(env, fs, move |fs| async move {
            let (ino, _) = lookup(&fs, ROOT_DIR_INO, name).await?.ok_or(Error::Enoent)?;
            read(&fs, ino, 0, u64::MAX).await
        })
        .ok()
    }

    #[test]
    fn fsynced_files_survive_a_crash_through_the_log_without_a_commit() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let old = create(&fs, ROOT_DIR_INO, "old").await?;
            write(&fs, old, 0, &vec![1u8; 20_000]).await?;
            sync_fs(&fs).await?;
            let new = create(&fs, ROOT_DIR_INO, "new").await?;
            write(&fs, old, 4096, &vec![2u8; 9000]).await?;
            write(&fs, new, 0, &vec![3u8; 30_000]).await?;
            write(&fs, new, 0, b"tiny start").await?;
            fsync(&fs, old).await?;
            fsync(&fs, new).await?;
            // Logged twice in one transaction: the second log replaces the first.
            punch_hole(&fs, new, 8192, 8192).await?;
            fsync(&fs, new).await?;
            Ok::<_, Error>(())
        })
        .unwrap();
        let generation = fs.trans.last_trans_committed.get();
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.fsyncs, stats.log_syncs, stats.full_commits), (3, 3, 0), "{stats:?}");
        assert_eq!(stats.inodes_logged, 3);
        let mut expect_old = vec![1u8; 20_000];
        expect_old[4096..13_096].fill(2);
        let mut expect_new = vec![3u8; 30_000];
        expect_new[..10].copy_from_slice(b"tiny start");
        expect_new[8192..16_384].fill(0);
        let again = crash_and_mount(&env);
        assert_eq!(again.log.stats.borrow().inodes_replayed, 2);
        assert_eq!(again.trans.last_trans_committed.get(), generation + 1, "replay commits once");
        assert_eq!(contents(&env, &again, "old").unwrap(), expect_old);
        assert_eq!(contents(&env, &again, "new").unwrap(), expect_new);
        assert_eq!(again.volumes.super_copy().unwrap().log_root, 0);
        check_clean(&env);
        // The replayed image mounts without a log, same contents.
        let third = crash_and_mount(&env);
        assert_eq!(third.log.stats.borrow().inodes_replayed, 0);
        assert_eq!(contents(&env, &third, "new").unwrap(), expect_new);
    }

    #[test]
    fn a_renamed_file_commits_instead_a_directory_logs_and_an_unchanged_file_does_nothing() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let a = create(&fs, ROOT_DIR_INO, "a").await?;
            write(&fs, a, 0, b"a").await?;
            sync_fs(&fs).await?;
            fsync(&fs, a).await?;
            assert_eq!(fs.log.stats.borrow().nothing_to_log, 1);
            rename(&fs, ROOT_DIR_INO, "a", ROOT_DIR_INO, "b").await?;
            write(&fs, a, 0, b"b").await?;
            fsync(&fs, a).await?;
            // Logged, with c as a new file that exists.
            create(&fs, ROOT_DIR_INO, "c").await?;
            fsync(&fs, ROOT_DIR_INO).await?;
            // Its rename is committed: the next fsync logs too.
            write(&fs, a, 0, b"B").await?;
            fsync(&fs, a).await?;
            Ok::<_, Error>(())
        })
        .unwrap();
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.nothing_to_log, stats.full_commits, stats.log_syncs), (1, 1, 2), "{stats:?}");
        assert_eq!((stats.dirs_logged, stats.new_inodes_logged), (1, 1), "{stats:?}");
        let again = crash_and_mount(&env);
        assert_eq!(contents(&env, &again, "b").unwrap(), b"B");
        assert_eq!(contents(&env, &again, "c").unwrap(), b"");
        assert!(contents(&env, &again, "a").is_none());
        check_clean(&env);
    }

    #[test]
    fn replay_takes_a_name_from_the_committed_inode_that_held_it() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let x = create(&fs, ROOT_DIR_INO, "n").await?;
            write(&fs, x, 0, &vec![9u8; 12_288]).await?;
            sync_fs(&fs).await?;
            unlink(&fs, ROOT_DIR_INO, "n").await?;
            let y = create(&fs, ROOT_DIR_INO, "n").await?;
            write(&fs, y, 0, &vec![5u8; 5000]).await?;
            fsync(&fs, y).await
        })
        .unwrap();
        assert_eq!(fs.log.stats.borrow().log_syncs, 1);
        let again = crash_and_mount(&env);
        assert_eq!(contents(&env, &again, "n").unwrap(), vec![5u8; 5000]);
        // x lost its only name: gone, its extent and sums freed (check).
        check_clean(&env);
    }

    /// The names in directory `dir`, sorted.
    fn names(env: &TestEnv, fs: &Rc<FsInfo>, dir: &'static str) -> Vec<String> {
        run(env, fs, move |fs| async move {
            let ino = crate::inode::resolve(&fs, dir).await?;
            let mut names: Vec<String> =
                crate::inode::readdir(&fs, ino).await?.into_iter().map(|(name, _, _)| name).collect();
            names.sort();
            Ok::<_, Error>(names)
        })
        .unwrap()
    }

    fn read_path(env: &TestEnv, fs: &Rc<FsInfo>, path: &'static str) -> Vec<u8> {
        run(env, fs, move |fs| async move {
            let ino = crate::inode::resolve(&fs, path).await?;
            read(&fs, ino, 0, u64::MAX).await
        })
        .unwrap()
    }

    #[test]
    fn a_fsynced_directory_keeps_exactly_its_entries_through_the_log() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let d = crate::inode::mkdir(&fs, ROOT_DIR_INO, "d").await?;
            let a = create(&fs, d, "a").await?;
            write(&fs, a, 0, &vec![7u8; 10_000]).await?;
            create(&fs, d, "b").await?;
            sync_fs(&fs).await?;
            unlink(&fs, d, "b").await?;
            let c = create(&fs, d, "c").await?;
            write(&fs, c, 0, &vec![8u8; 6000]).await?;
            fsync(&fs, c).await?;
            let e = create(&fs, d, "e").await?;
            write(&fs, e, 0, b"not fsynced").await?;
            fsync(&fs, d).await?;
            // The file's own later fsync logs its data over its "exists" log.
            write(&fs, e, 0, b"fsynced").await?;
            fsync(&fs, e).await
        })
        .unwrap();
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.log_syncs, stats.full_commits, stats.dirs_logged), (3, 0, 1), "{stats:?}");
        // c was logged whole before; only e is logged as existing.
        assert_eq!(stats.new_inodes_logged, 1, "{stats:?}");
        let again = crash_and_mount(&env);
        assert_eq!(again.log.stats.borrow().entries_deleted, 1, "b's entry goes at replay");
        assert_eq!(names(&env, &again, "d"), ["a", "c", "e"]);
        assert_eq!(read_path(&env, &again, "d/a"), vec![7u8; 10_000]);
        assert_eq!(read_path(&env, &again, "d/c"), vec![8u8; 6000]);
        assert_eq!(read_path(&env, &again, "d/e"), b"fsyncednced");
        // b lost its last name: its inode, extent and sums are gone (check).
        check_clean(&env);
    }

    #[test]
    fn a_directory_fsync_commits_after_a_move_into_it_or_when_it_names_a_new_subdirectory() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let d = crate::inode::mkdir(&fs, ROOT_DIR_INO, "d").await?;
            create(&fs, ROOT_DIR_INO, "x").await?;
            sync_fs(&fs).await?;
            rename(&fs, ROOT_DIR_INO, "x", d, "x").await?;
            fsync(&fs, d).await?;
            assert_eq!(fs.log.stats.borrow().full_commits, 1);
            crate::inode::mkdir(&fs, d, "sub").await?;
            fsync(&fs, d).await?;
            assert_eq!(fs.log.stats.borrow().full_commits, 2);
            // A half-logged directory is never synced: the commit freed it.
            let y = create(&fs, ROOT_DIR_INO, "y").await?;
            fsync(&fs, y).await
        })
        .unwrap();
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.full_commits, stats.log_syncs, stats.dirs_logged), (2, 1, 0), "{stats:?}");
        let again = crash_and_mount(&env);
        assert_eq!(names(&env, &again, "d"), ["sub", "x"]);
        assert!(contents(&env, &again, "y").is_some());
        check_clean(&env);
    }

    #[test]
    fn a_file_created_after_its_directory_was_logged_is_logged_over_the_stale_directory_log() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            let d = crate::inode::mkdir(&fs, ROOT_DIR_INO, "d").await?;
            sync_fs(&fs).await?;
            create(&fs, d, "a").await?;
            fsync(&fs, d).await?;
            let b = create(&fs, d, "b").await?;
            write(&fs, b, 0, b"b's data").await?;
            // d's log does not have b; replay removes only entries on disk
            // that the log lacks, and b's own log names it.
            fsync(&fs, b).await
        })
        .unwrap();
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.log_syncs, stats.full_commits), (2, 0), "{stats:?}");
        let again = crash_and_mount(&env);
        assert_eq!(names(&env, &again, "d"), ["a", "b"]);
        assert_eq!(read_path(&env, &again, "d/b"), b"b's data");
        check_clean(&env);
    }

    #[test]
    fn a_new_directory_logs_its_own_name_and_the_top_directory_keeps_its_snapshot_links() {
        let (env, fs) = mount();
        let snapshot = run(&env, &fs, |fs| async move {
            create(&fs, ROOT_DIR_INO, "old").await?;
            let snapshot = crate::ioctl::create_snapshot(&fs, FS_TREE_OBJECTID).await?;
            sync_fs(&fs).await?;
            let n = crate::inode::mkdir(&fs, ROOT_DIR_INO, "n").await?;
            let f = create(&fs, n, "f").await?;
            write(&fs, f, 0, b"data not fsynced").await?;
            fsync(&fs, n).await?;
            unlink(&fs, ROOT_DIR_INO, "old").await?;
            fsync(&fs, ROOT_DIR_INO).await?;
            Ok::<_, Error>(snapshot)
        })
        .unwrap();
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.log_syncs, stats.full_commits, stats.dirs_logged), (2, 0, 2), "{stats:?}");
        let again = crash_and_mount(&env);
        let mut top = vec!["n".to_string(), crate::ioctl::snapshot_name(snapshot)];
        top.sort();
        assert_eq!(names(&env, &again, "/"), top);
        assert_eq!(names(&env, &again, "n"), ["f"]);
        // Named by a logged directory, never fsynced: it exists, empty.
        assert_eq!(read_path(&env, &again, "n/f"), b"");
        check_clean(&env);
    }

    #[test]
    fn a_failed_log_write_falls_back_to_a_commit_and_the_fsync_still_holds() {
        let (env, fs) = mount();
        let f = run(&env, &fs, |fs| async move {
            let f = create(&fs, ROOT_DIR_INO, "f").await?;
            write(&fs, f, 0, &vec![1u8; 9000]).await?;
            sync_fs(&fs).await?;
            write(&fs, f, 0, &vec![2u8; 9000]).await?;
            Ok::<_, Error>(f)
        })
        .unwrap();
        // Every write of a log tree block fails; everything else completes.
        env.hold_bios.set(true);
        let task_fs = fs.clone();
        let synced = env.spawn_with_result("fsync", async move { fsync(&task_fs, f).await });
        for _ in 0..10_000 {
            env.run_until_idle();
            if synced.borrow().is_some() {
                break;
            }
            let blocks = fs.log.blocks.borrow().clone();
            for bio in env.bios.borrow().iter().filter(|b| b.op == "write" && blocks.contains(&b.offset)) {
                env.fail_offsets.borrow_mut().insert(bio.offset);
            }
            env.complete_bios();
        }
        env.hold_bios.set(false);
        env.run_until_idle();
        assert_eq!(synced.borrow_mut().take().expect("the fsync returned"), Ok(()));
        assert!(!env.fail_offsets.borrow().is_empty(), "no log block write was failed");
        let stats = fs.log.stats.borrow().clone();
        assert_eq!((stats.log_syncs, stats.full_commits), (0, 1), "{stats:?}");
        assert!(
            env.traces.borrow().iter().any(|t| matches!(t, TraceEvent::Note { what: "log_failed", .. })),
            "the failure is traced"
        );
        env.fail_offsets.borrow_mut().clear();
        let again = crash_and_mount(&env);
        assert_eq!(contents(&env, &again, "f").unwrap(), vec![2u8; 9000]);
        check_clean(&env);
    }

    /// One operation of the crash model test.
    #[derive(Clone, Debug)]
    enum Op {
        Write { file: usize, offset: u64, len: usize, byte: u8 },
        Truncate { file: usize, size: u64 },
        Punch { file: usize, offset: u64, len: u64 },
        Fsync(usize),
        Sync,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..2usize, 0u64..40_000, 1usize..12_000, any::<u8>())
                .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
            2 => (0..2usize, 0u64..45_000).prop_map(|(file, size)| Op::Truncate { file, size }),
            2 => (0..2usize, 0u64..40_000, 1u64..20_000).prop_map(|(file, offset, len)| Op::Punch { file, offset, len }),
            3 => (0..2usize).prop_map(Op::Fsync),
            1 => Just(Op::Sync),
        ]
    }

    const NAMES: [&str; 2] = ["f0", "f1"];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// After a crash, each file holds exactly what it held at its last
        /// fsync or sync if nothing changed it since, and the image checks
        /// clean. (That the log is really used is the fixed tests' and
        /// fsstress's to show: a case whose fsyncs all commit passes here.)
        #[test]
        fn after_a_crash_every_file_holds_its_last_fsynced_contents(ops in proptest::collection::vec(op(), 1..20)) {
            let (env, fs) = mount();
            let inos = run(&env, &fs, |fs| async move {
                let a = create(&fs, ROOT_DIR_INO, NAMES[0]).await?;
                let b = create(&fs, ROOT_DIR_INO, NAMES[1]).await?;
                sync_fs(&fs).await?;
                Ok::<_, Error>([a, b])
            })
            .unwrap();
            let mut model = [Vec::new(), Vec::new()];
            // What each file must hold after a crash, if known.
            let mut durable: [Option<Vec<u8>>; 2] = [Some(Vec::new()), Some(Vec::new())];
            for op in &ops {
                let applied = op.clone();
                run(&env, &fs, move |fs| async move {
                    match applied {
                        Op::Write { file, offset, len, byte } => write(&fs, inos[file], offset, &vec![byte; len]).await,
                        Op::Truncate { file, size } => truncate(&fs, inos[file], size).await,
                        Op::Punch { file, offset, len } => punch_hole(&fs, inos[file], offset, len).await,
                        Op::Fsync(file) => fsync(&fs, inos[file]).await,
                        Op::Sync => sync_fs(&fs).await,
                    }
                })
                .unwrap();
                match *op {
                    Op::Write { file, offset, len, byte } => {
                        let end = offset as usize + len;
                        if model[file].len() < end {
                            model[file].resize(end, 0);
                        }
                        model[file][offset as usize..end].fill(byte);
                        durable[file] = None;
                    }
                    Op::Truncate { file, size } => {
                        model[file].resize(size as usize, 0);
                        durable[file] = None;
                    }
                    Op::Punch { file, offset, len } => {
                        let end = ((offset + len) as usize).min(model[file].len());
                        if (offset as usize) < end {
                            model[file][offset as usize..end].fill(0);
                        }
                        durable[file] = None;
                    }
                    Op::Fsync(file) => durable[file] = Some(model[file].clone()),
                    Op::Sync => durable = [Some(model[0].clone()), Some(model[1].clone())],
                }
            }
            let again = crash_and_mount(&env);
            for (file, expected) in durable.iter().enumerate() {
                if let Some(expected) = expected {
                    prop_assert_eq!(&contents(&env, &again, NAMES[file]).unwrap(), expected, "file {}", file);
                } else {
                    prop_assert!(contents(&env, &again, NAMES[file]).is_some());
                }
            }
            check_clean(&env);
        }

        /// Names in one directory, with directory and file fsyncs: after a
        /// crash the directory holds exactly the names it had at its last
        /// fsync or sync if none changed since, and every file fsynced or
        /// synced since its last change holds that content under its name.
        #[test]
        fn after_a_crash_a_fsynced_directory_holds_exactly_its_names(ops in proptest::collection::vec(dir_op(), 1..24)) {
            let (env, fs) = mount();
            let dir = run(&env, &fs, |fs| async move {
                let dir = crate::inode::mkdir(&fs, ROOT_DIR_INO, "d").await?;
                sync_fs(&fs).await?;
                Ok::<_, Error>(dir)
            })
            .unwrap();
            let mut model: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
            let mut durable_dir: Option<Vec<usize>> = Some(Vec::new());
            let mut durable: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
            for op in ops {
                let name = |i: usize| format!("n{i}");
                match op {
                    DirOp::Create(i) if !model.contains_key(&i) => {
                        run(&env, &fs, move |fs| async move { create(&fs, dir, &name(i)).await }).unwrap();
                        model.insert(i, Vec::new());
                        durable_dir = None;
                    }
                    DirOp::Unlink(i) if model.contains_key(&i) => {
                        run(&env, &fs, move |fs| async move { unlink(&fs, dir, &name(i)).await }).unwrap();
                        model.remove(&i);
                        durable.remove(&i);
                        durable_dir = None;
                    }
                    DirOp::Rename(i, j) if i != j && model.contains_key(&i) => {
                        run(&env, &fs, move |fs| async move { rename(&fs, dir, &name(i), dir, &name(j)).await })
                            .unwrap();
                        let moved = model.remove(&i).expect("the source exists");
                        model.insert(j, moved);
                        durable.remove(&i);
                        durable.remove(&j);
                        durable_dir = None;
                    }
                    DirOp::Write(i, len, byte) if model.contains_key(&i) => {
                        run(&env, &fs, move |fs| async move {
                            let (ino, _) = lookup(&fs, dir, &name(i)).await?.ok_or(Error::Enoent)?;
                            write(&fs, ino, 0, &vec![byte; len]).await
                        })
                        .unwrap();
                        let content = model.get_mut(&i).expect("the file exists");
                        if content.len() < len {
                            content.resize(len, 0);
                        }
                        content[..len].fill(byte);
                        durable.remove(&i);
                    }
                    DirOp::FsyncFile(i) if model.contains_key(&i) => {
                        run(&env, &fs, move |fs| async move {
                            let (ino, _) = lookup(&fs, dir, &name(i)).await?.ok_or(Error::Enoent)?;
                            fsync(&fs, ino).await
                        })
                        .unwrap();
                        durable.insert(i, model[&i].clone());
                    }
                    DirOp::FsyncDir => {
                        run(&env, &fs, move |fs| async move { fsync(&fs, dir).await }).unwrap();
                        durable_dir = Some(model.keys().copied().collect());
                    }
                    DirOp::Sync => {
                        run(&env, &fs, |fs| async move { sync_fs(&fs).await }).unwrap();
                        durable_dir = Some(model.keys().copied().collect());
                        durable = model.clone();
                    }
                    _ => {}
                }
            }
            let again = crash_and_mount(&env);
            if let Some(expected) = durable_dir {
                let expected: Vec<String> = expected.iter().map(|i| format!("n{i}")).collect();
                prop_assert_eq!(names(&env, &again, "d"), expected);
            }
            for (i, content) in &durable {
                let path = format!("d/n{i}");
                let found = run(&env, &again, move |fs| async move {
                    let ino = crate::inode::resolve(&fs, &path).await?;
                    read(&fs, ino, 0, u64::MAX).await
                });
                prop_assert_eq!(found.as_ref(), Ok(content), "d/n{}", i);
            }
            check_clean(&env);
        }
    }

    /// One operation of the directory crash model test, on names `n0`..`n2`.
    #[derive(Clone, Debug)]
    enum DirOp {
        Create(usize),
        Unlink(usize),
        Rename(usize, usize),
        Write(usize, usize, u8),
        FsyncFile(usize),
        FsyncDir,
        Sync,
    }

    fn dir_op() -> impl Strategy<Value = DirOp> {
        prop_oneof![
            4 => (0..3usize).prop_map(DirOp::Create),
            2 => (0..3usize).prop_map(DirOp::Unlink),
            1 => (0..3usize, 0..3usize).prop_map(|(i, j)| DirOp::Rename(i, j)),
            3 => (0..3usize, 1usize..20_000, any::<u8>()).prop_map(|(i, len, byte)| DirOp::Write(i, len, byte)),
            2 => (0..3usize).prop_map(DirOp::FsyncFile),
            3 => Just(DirOp::FsyncDir),
            1 => Just(DirOp::Sync),
        ]
    }
}
