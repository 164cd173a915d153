//! Filesystem operations (kernel: inode.c, with the VFS steps around each
//! btrfs call that the engine must do itself: name checks, the directory
//! lookup that precedes a create or an unlink, the inode locks).
//!
//! Every modifying operation is the kernel's sequence: take the inode locks
//! (`i_rwsem`) the VFS takes, look the name up, `start_transaction` with the
//! kernel's item count, do the work, `end_transaction`, then
//! `btrfs_btree_balance_dirty` (which balances the delayed items). Errors
//! after the tree was changed abort the transaction where the kernel does;
//! after an abort every modifying operation fails with EROFS. Each
//! operation ends with a [`TraceEvent::Op`].
//!
//! Items reserved at `start_transaction` (each one
//! `calc_insert_metadata_size(1)`, 262 144 bytes at 16 KiB):
//!
//! | operation | items | kernel |
//! |---|---|---|
//! | create, mkdir | 5 | `btrfs_new_inode_prepare`: 1 inode item (the INODE_REF goes in the same batch) + 1 LSM xattr (`dir->i_security`, set on the failing hosts, hence `trans_block_rsv: size 1310720`) + 3 (dir item, dir index, parent inode item). Kernels before 5.19 counted 5 as inode item, inode ref, dir item, dir index, parent inode |
//! | unlink, rmdir | 6 | `__unlink_start_trans`: `BTRFS_UNLINK_METADATA_UNITS` (orphan item, dir item, dir index, inode ref, inode, parent inode) |
//! | link | 5 | `btrfs_link`: inode and inode ref, dir item and dir index, parent inode (6 for an O_TMPFILE inode, not modelled) |
//! | rename | 8, +1 across directories, +5 replacing a target | `btrfs_rename`: old parent inode; inode, old and new inode ref; old and new dir item and dir index; new parent inode; for a target its inode, inode ref, dir item, dir index and orphan item |
//! | setattr | 0, then 1 | `btrfs_dirty_inode`: join, and on ENOSPC from the inode update start with 1 item |
//!
//! Departures from the kernel, each for a reason:
//! - an inode whose link count reaches zero is deleted inside the
//!   operation's transaction (its delayed items killed, every item of it
//!   deleted, as `btrfs_evict_inode` does), where the kernel adds an orphan
//!   item and evicts at the last `iput`: the engine has no open files, so
//!   the last reference is always the operation's. A failed deletion aborts
//!   (no orphan item would find the inode again);
//! - `__unlink_start_trans` does not fall back to the global reserve
//!   (`btrfs_start_transaction_fallback_global_rsv`): an unlink that cannot
//!   reserve fails with ENOSPC;
//! - no dentry cache: every operation looks its names up in the tree;
//! - inode locks are taken in the kernel's order (directories before the
//!   inodes in them, the rename mutex for cross-directory renames, the
//!   ancestor first); two unrelated directories of a rename are locked by
//!   inode number;
//! - in-memory inodes ([`InodeCache`]) are never evicted while they exist
//!   (no icache shrinker) and their memory is not charged;
//! - no symlinks, special files, xattrs, ACLs, properties, subvolumes,
//!   O_TMPFILE, whiteouts or RENAME_EXCHANGE, no tree log;
//! - linking a directory is EPERM in Linux; the engine's error type has no
//!   EPERM and returns EINVAL; so is a rename of "." or ".." (EBUSY).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::accessors::{header_nritems, item_data, item_data_mut, item_key};
use crate::block_rsv::UNLINK_METADATA_UNITS;
use crate::ctree::{Path, Root, insert_empty_items, next_leaf, search_slot};
use crate::delayed_inode::{
    DelayedRoot, balance_delayed_items, delayed_delete_inode_ref, delayed_update_inode,
    delete_delayed_dir_index, kill_delayed_inode_items,
};
use crate::dir_item::{check_dir_item_collision, delete_one_dir_name, insert_dir_item, lookup_dir_item};
use crate::env::{TraceEvent, WaitOn};
use crate::error::Error;
use crate::format::{
    DIR_INDEX_KEY, DirItem, FIRST_FREE_OBJECTID, FS_TREE_OBJECTID, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO,
    FT_REG_FILE, FT_SOCK, FT_SYMLINK, FT_UNKNOWN, FixedItem, INODE_ITEM_KEY, INODE_ITEM_SIZE, INODE_REF_KEY,
    INODE_REF_SIZE, InodeItem, InodeRef, Key, LAST_FREE_OBJECTID, NAME_LEN, Timespec,
};
use crate::fs::FsInfo;
use crate::inode_item::{del_inode_ref, get_parent, insert_inode_ref, read_inode, truncate_inode_items};
use crate::transaction::{
    Operation, TransHandle, abort_transaction, end_transaction, join_transaction, mark_buffer_dirty,
    start_transaction,
};
use crate::wait::WaitQueue;

/// The subvolume's root directory.
pub const ROOT_DIR_INO: u64 = FIRST_FREE_OBJECTID;
/// `BTRFS_DIR_START_INDEX`: the first DIR_INDEX offset (0 and 1 were "."
/// and "..").
pub const DIR_START_INDEX: u64 = 2;
/// `BTRFS_LINK_MAX`.
pub const LINK_MAX: u32 = 65535;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;
const S_IFSOCK: u32 = 0o140000;
/// Modes of what create and mkdir make (0644 and 0755 after a 022 umask).
pub const FILE_MODE: u32 = S_IFREG | 0o644;
pub const DIR_MODE: u32 = S_IFDIR | 0o755;

/// Items `btrfs_create_common` reserves for a create or mkdir (see the
/// module documentation).
pub const CREATE_TRANS_ITEMS: u64 = 5;
/// Items `btrfs_link` reserves for an inode with links.
pub const LINK_TRANS_ITEMS: u64 = 5;
/// Items `btrfs_dirty_inode` reserves when the joined update failed.
pub const SETATTR_TRANS_ITEMS: u64 = 1;

/// Items `btrfs_rename` reserves (no subvolume, no whiteout).
pub fn rename_trans_items(same_dir: bool, replaces_target: bool) -> u64 {
    // 1 old parent inode; 3 inode, old inode ref, new inode ref;
    // 4 old and new dir item and dir index.
    let mut items = 1 + 3 + 4;
    if !same_dir {
        items += 1;
    }
    if replaces_target {
        items += 5;
    }
    items
}

/// Whether an inode mode is a directory's (`S_ISDIR`).
pub fn mode_is_dir(mode: u32) -> bool {
    mode & S_IFMT == S_IFDIR
}

/// `fs_umode_to_ftype`.
pub fn mode_to_ftype(mode: u32) -> u8 {
    match mode & S_IFMT {
        S_IFREG => FT_REG_FILE,
        S_IFDIR => FT_DIR,
        S_IFCHR => FT_CHRDEV,
        S_IFBLK => FT_BLKDEV,
        S_IFIFO => FT_FIFO,
        S_IFSOCK => FT_SOCK,
        S_IFLNK => FT_SYMLINK,
        _ => FT_UNKNOWN,
    }
}

/// An in-memory inode (the parts of `struct btrfs_inode` and the VFS inode
/// the operations use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BtrfsInode {
    pub ino: u64,
    /// The inode as it is in memory: mode, link count, size (directories:
    /// twice the bytes of their entries' names), times, sequence
    /// (`i_version`), generation. The tree has it once the delayed update
    /// ran.
    pub item: InodeItem,
    /// The next DIR_INDEX offset of a directory (`index_cnt`); `u64::MAX`
    /// until known.
    pub index_cnt: u64,
    /// The DIR_INDEX of the only name of an inode with one link
    /// (`dir_index`); 0 when unknown.
    pub dir_index: u64,
    /// The size the inode item on disk gets (`disk_i_size`): for a file,
    /// how far its data is on disk; `item.size` is `i_size`.
    pub disk_i_size: u64,
}

impl BtrfsInode {
    pub fn is_dir(&self) -> bool {
        mode_is_dir(self.item.mode)
    }

    pub fn ftype(&self) -> u8 {
        mode_to_ftype(self.item.mode)
    }
}

/// An inode's `i_rwsem`: shared for lookups and readdir, exclusive for
/// changes. Writers waiting block new readers.
#[derive(Default)]
struct InodeLock {
    readers: Cell<u32>,
    writer: Cell<bool>,
    writers_waiting: Cell<u32>,
    wait: WaitQueue,
}

/// A held inode lock; dropping it releases the lock.
pub struct InodeLockGuard {
    lock: Rc<InodeLock>,
    write: bool,
}

impl Drop for InodeLockGuard {
    fn drop(&mut self) {
        if self.write {
            assert!(self.lock.writer.get());
            self.lock.writer.set(false);
        } else {
            assert!(self.lock.readers.get() > 0);
            self.lock.readers.set(self.lock.readers.get() - 1);
        }
        self.lock.wait.wake_all();
    }
}

async fn lock(fs: &FsInfo, lock: Rc<InodeLock>, write: bool) -> InodeLockGuard {
    if write {
        if lock.writer.get() || lock.readers.get() > 0 {
            lock.writers_waiting.set(lock.writers_waiting.get() + 1);
            fs.env.wait_on(WaitOn::Other("inode lock (write)"));
            let waiting = lock.clone();
            lock.wait.wait_until(move || !waiting.writer.get() && waiting.readers.get() == 0).await;
            lock.writers_waiting.set(lock.writers_waiting.get() - 1);
        }
        lock.writer.set(true);
    } else {
        if lock.writer.get() || lock.writers_waiting.get() > 0 {
            fs.env.wait_on(WaitOn::Other("inode lock (read)"));
            let waiting = lock.clone();
            lock.wait.wait_until(move || !waiting.writer.get() && waiting.writers_waiting.get() == 0).await;
        }
        lock.readers.set(lock.readers.get() + 1);
    }
    InodeLockGuard { lock, write }
}

/// The in-memory inodes of the fs tree and their delayed items (the
/// kernel's inode cache, `root->inodes`, and `fs_info->delayed_root`).
#[derive(Default)]
pub struct InodeCache {
    inodes: RefCell<BTreeMap<u64, BtrfsInode>>,
    locks: RefCell<BTreeMap<u64, Rc<InodeLock>>>,
    /// Reads of inodes from the tree in progress; deleting the inode meanwhile
    /// marks them stale (the kernel's `I_FREEING` keeps `iget` from
    /// bringing a dying inode back).
    loading: RefCell<BTreeMap<u64, Vec<Rc<Cell<bool>>>>>,
    /// `s_vfs_rename_mutex`.
    rename_lock: Rc<InodeLock>,
    /// The delayed items of every inode.
    pub delayed: DelayedRoot,
}

impl InodeCache {
    /// A copy of the in-memory inode `ino`, if it is cached.
    pub fn get(&self, ino: u64) -> Option<BtrfsInode> {
        self.inodes.borrow().get(&ino).cloned()
    }

    /// Inodes in memory.
    pub fn len(&self) -> usize {
        self.inodes.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.inodes.borrow().is_empty()
    }

    /// Change the in-memory inode item of `ino`.
    pub(crate) fn update_item<T>(&self, ino: u64, f: impl FnOnce(&mut InodeItem) -> T) -> T {
        self.update(ino, |inode| f(&mut inode.item))
    }

    pub(crate) fn update<T>(&self, ino: u64, f: impl FnOnce(&mut BtrfsInode) -> T) -> T {
        let mut inodes = self.inodes.borrow_mut();
        f(inodes.get_mut(&ino).unwrap_or_else(|| panic!("inode {ino} is not in memory")))
    }

    fn inode_lock(&self, ino: u64) -> Rc<InodeLock> {
        self.locks.borrow_mut().entry(ino).or_default().clone()
    }

    fn forget(&self, ino: u64) {
        self.inodes.borrow_mut().remove(&ino);
        self.locks.borrow_mut().remove(&ino);
        if let Some(loads) = self.loading.borrow_mut().remove(&ino) {
            for stale in loads {
                stale.set(true);
            }
        }
    }
}

fn now(fs: &FsInfo) -> Timespec {
    Timespec::from_ns(fs.env.now_ns())
}

pub(crate) fn fs_root(fs: &FsInfo) -> Rc<Root> {
    fs.root(FS_TREE_OBJECTID)
}

pub(crate) async fn lock_inode(fs: &FsInfo, ino: u64, write: bool) -> InodeLockGuard {
    let inode_lock = fs.inodes.inode_lock(ino);
    lock(fs, inode_lock, write).await
}

/// `btrfs_iget`: the in-memory inode `ino`, read from the tree if needed.
/// ENOENT if it does not exist.
pub async fn iget(fs: &FsInfo, ino: u64) -> Result<BtrfsInode, Error> {
    if let Some(inode) = fs.inodes.get(ino) {
        return Ok(inode);
    }
    let root = fs_root(fs);
    let stale = Rc::new(Cell::new(false));
    fs.inodes.loading.borrow_mut().entry(ino).or_default().push(stale.clone());
    let read = read_inode(&root, ino).await;
    {
        let mut loading = fs.inodes.loading.borrow_mut();
        if let Some(loads) = loading.get_mut(&ino) {
            loads.retain(|other| !Rc::ptr_eq(other, &stale));
            if loads.is_empty() {
                loading.remove(&ino);
            }
        }
    }
    if stale.get() {
        return Err(Error::Enoent);
    }
    let Some(read) = read? else { return Err(Error::Enoent) };
    // Someone may have read (and changed) it meanwhile: theirs wins.
    let mut inodes = fs.inodes.inodes.borrow_mut();
    let inode = inodes.entry(ino).or_insert(BtrfsInode {
        ino,
        item: read.item,
        index_cnt: u64::MAX,
        dir_index: read.dir_index,
        disk_i_size: read.item.size,
    });
    Ok(inode.clone())
}

/// `btrfs_get_free_objectid`: the next inode number of `root`.
fn get_free_objectid(root: &Root) -> Result<u64, Error> {
    let next = (root.highest_objectid.get() + 1).max(FIRST_FREE_OBJECTID);
    if next >= LAST_FREE_OBJECTID {
        return Err(Error::Enospc);
    }
    root.highest_objectid.set(next);
    Ok(next)
}

/// `btrfs_set_inode_index_count`: one more than the highest DIR_INDEX of
/// `dir` in the tree (or the start index).
async fn set_inode_index_count(root: &Rc<Root>, dir: u64) -> Result<u64, Error> {
    let key = Key::new(dir, DIR_INDEX_KEY, u64::MAX);
    let mut path = Path::new();
    if search_slot(None, root, &key, &mut path, 0, false).await? {
        return Err(Error::BadTreeBlock(format!("directory {dir} has a DIR_INDEX at the largest offset")));
    }
    if path.slots[0] == 0 {
        return Ok(DIR_START_INDEX);
    }
    let found = path.item_key(path.slots[0] - 1);
    if found.objectid != dir || found.item_type != DIR_INDEX_KEY {
        return Ok(DIR_START_INDEX);
    }
    Ok(found.offset + 1)
}

/// Make sure `dir.index_cnt` is known (from the delayed node, else the tree).
async fn load_index_cnt(fs: &FsInfo, root: &Rc<Root>, dir: u64) -> Result<u64, Error> {
    let cnt = fs.inodes.update(dir, |inode| inode.index_cnt);
    if cnt != u64::MAX {
        return Ok(cnt);
    }
    let cnt = match fs.inodes.delayed.dir_index_count(dir) {
        Some(cnt) => cnt,
        None => set_inode_index_count(root, dir).await?,
    };
    fs.inodes.update(dir, |inode| inode.index_cnt = cnt);
    Ok(cnt)
}

/// `btrfs_set_inode_index`: the next DIR_INDEX offset of `dir`, taken.
pub(crate) async fn set_inode_index(fs: &FsInfo, root: &Rc<Root>, dir: u64) -> Result<u64, Error> {
    let index = load_index_cnt(fs, root, dir).await?;
    fs.inodes.update(dir, |inode| inode.index_cnt = index + 1);
    Ok(index)
}

/// `btrfs_update_inode`: queue the in-memory inode as a delayed update; a
/// file's item gets `disk_i_size` (`btrfs_fill_inode_item`).
pub(crate) async fn update_inode(handle: &TransHandle, ino: u64) -> Result<(), Error> {
    handle.fs.log.inode_changed(ino, handle.transid);
    let item = handle.fs.inodes.update(ino, |inode| {
        let mut item = inode.item;
        if !inode.is_dir() {
            item.size = inode.disk_i_size;
        }
        item
    });
    delayed_update_inode(handle, ino, &item).await
}

/// Touch a directory whose entries changed (`inode_inc_iversion`, mtime and
/// ctime) and resize it by `delta` bytes.
pub(crate) fn touch_dir(fs: &FsInfo, dir: u64, grow: bool, name_len: usize) {
    let t = now(fs);
    fs.inodes.update(dir, |inode| {
        let delta = 2 * name_len as u64;
        if grow {
            inode.item.size += delta;
        } else {
            assert!(inode.item.size >= delta, "directory {} smaller than its entries", inode.ino);
            inode.item.size -= delta;
        }
        inode.item.sequence += 1;
        inode.item.mtime = t;
        inode.item.ctime = t;
    });
}

/// The ctime of an inode changed (`inode_inc_iversion` and
/// `inode_set_ctime_current`).
fn touch_ctime(fs: &FsInfo, ino: u64) {
    touch(fs, ino, false);
}

/// A new ctime (and mtime, for a change of contents) and sequence.
fn touch(fs: &FsInfo, ino: u64, mtime: bool) {
    let t = now(fs);
    fs.inodes.update(ino, |inode| {
        inode.item.sequence += 1;
        inode.item.ctime = t;
        if mtime {
            inode.item.mtime = t;
        }
    });
}

/// Start a handle for an operation, tracing what it reserved.
async fn start_op(
    fs: &Rc<FsInfo>,
    root: &Rc<Root>,
    num_items: u64,
    op: Operation,
) -> Result<TransHandle, Error> {
    let handle = start_transaction(fs, root, num_items, op).await?;
    fs.env.trace(TraceEvent::Note {
        what: "start_transaction",
        a: num_items,
        b: handle.bytes_reserved(),
        c: handle.transid,
    });
    Ok(handle)
}

/// `btrfs_end_transaction` then `btrfs_btree_balance_dirty`.
async fn end_op(fs: &Rc<FsInfo>, handle: TransHandle) {
    end_transaction(handle);
    balance_delayed_items(fs).await;
}

pub(crate) fn trace_op<T>(fs: &FsInfo, name: &'static str, result: Result<T, Error>) -> Result<T, Error> {
    let errno = result.as_ref().err().map_or(0, Error::errno);
    fs.env.trace(TraceEvent::Op { name, errno });
    result
}

/// A single name of a directory entry: not empty, at most 255 bytes, no
/// slash or NUL.
fn check_name(name: &[u8]) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::Enoent);
    }
    if name.len() > NAME_LEN {
        return Err(Error::Enametoolong);
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(Error::Einval);
    }
    Ok(())
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// A directory that is in memory and is one: ENOENT, ENOTDIR otherwise.
async fn get_dir(fs: &FsInfo, dir: u64) -> Result<BtrfsInode, Error> {
    let inode = iget(fs, dir).await?;
    if !inode.is_dir() {
        return Err(Error::Enotdir);
    }
    Ok(inode)
}

/// `btrfs_inode_by_name`: the inode and type `name` names in `dir`.
pub(crate) async fn inode_by_name(
    root: &Rc<Root>,
    dir: u64,
    name: &[u8],
) -> Result<Option<(u64, u8)>, Error> {
    let Some((location, dir_type)) = location_by_name(root, dir, name).await? else { return Ok(None) };
    if location.item_type != INODE_ITEM_KEY {
        return Err(Error::BadTreeBlock(format!(
            "entry {:?} of directory {dir} links subvolume {}, not an inode",
            String::from_utf8_lossy(name),
            location.objectid
        )));
    }
    Ok(Some((location.objectid, dir_type)))
}

/// What `name` in `dir` names: an inode (INODE_ITEM) or a linked subvolume
/// (ROOT_ITEM), and its type; anything else is corruption (the kernel's
/// check in btrfs_inode_by_name).
async fn location_by_name(root: &Rc<Root>, dir: u64, name: &[u8]) -> Result<Option<(Key, u8)>, Error> {
    let mut path = Path::new();
    let Some(found) = lookup_dir_item(None, root, &mut path, dir, name, 0).await? else { return Ok(None) };
    let location = found.entry.location;
    if location.item_type != INODE_ITEM_KEY && location.item_type != crate::format::ROOT_ITEM_KEY {
        return Err(Error::BadTreeBlock(format!(
            "btrfs_inode_by_name gets something invalid in DIR_ITEM (directory ino {dir}, location {location})"
        )));
    }
    Ok(Some((location, found.entry.dir_type)))
}

/// `btrfs_lookup_dentry` with the caller holding `dir`'s lock.
async fn lookup_locked(
    fs: &FsInfo,
    root: &Rc<Root>,
    dir: u64,
    name: &[u8],
) -> Result<Option<(u64, u8)>, Error> {
    let Some((location, dir_type)) = location_by_name(root, dir, name).await? else { return Ok(None) };
    if location.item_type == crate::format::ROOT_ITEM_KEY {
        // A snapshot linked here: its tree's id, a directory (the kernel
        // crosses into the subvolume; paths here do not).
        return Ok(Some((location.objectid, dir_type)));
    }
    let ino = location.objectid;
    let inode = iget(fs, ino).await?;
    if inode.ftype() != dir_type {
        return Err(Error::BadTreeBlock(format!(
            "inode mode mismatch with dir: inode mode=0{:o} btrfs type={} dir type={dir_type}",
            inode.item.mode,
            inode.ftype()
        )));
    }
    Ok(Some((ino, dir_type)))
}

// ---------------------------------------------------------------------------
// The btrfs halves of the operations.

/// `btrfs_add_link`: name `ino` as `name` (DIR_INDEX `index`) in `dir`:
/// the INODE_REF if `add_backref`, the DIR_ITEM and the delayed DIR_INDEX,
/// then the directory's size and times through a delayed inode update.
/// Aborts the transaction where the kernel does (a failed dir item insert
/// other than EEXIST and EOVERFLOW, among them the delayed index migrate's
/// ENOSPC; a failed directory update).
pub(crate) async fn add_link(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    ino: u64,
    name: &[u8],
    add_backref: bool,
    index: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let ftype = fs.inodes.update(ino, |inode| inode.ftype());
    let location = Key::new(ino, INODE_ITEM_KEY, 0);
    if add_backref {
        // Nothing to clean up yet.
        insert_inode_ref(handle, root, name, ino, dir, index).await?;
    }
    match insert_dir_item(handle, root, dir, name, location, ftype, index).await {
        Ok(()) => {}
        Err(error @ (Error::Eexist | Error::Eoverflow)) => {
            if add_backref && let Err(del_error) = del_inode_ref(handle, root, name, ino, dir).await {
                abort_transaction(handle, &del_error, "btrfs_add_link");
            }
            return Err(error);
        }
        Err(error) => {
            abort_transaction(handle, &error, "btrfs_add_link");
            return Err(error);
        }
    }
    touch_dir(fs, dir, true, name.len());
    if let Err(error) = update_inode(handle, dir).await {
        abort_transaction(handle, &error, "btrfs_add_link");
        return Err(error);
    }
    Ok(())
}

/// `btrfs_create_new_inode`: a new inode of `mode` named `name` in `dir`:
/// its INODE_ITEM and INODE_REF inserted in one batch, then `add_link`.
/// Aborts on failure after the insert.
async fn create_new_inode(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    name: &[u8],
    mode: u32,
) -> Result<u64, Error> {
    let fs = &handle.fs;
    let ino = get_free_objectid(root)?;
    fs.log.inode_changed(ino, handle.transid);
    let index = set_inode_index(fs, root, dir).await?;
    let t = now(fs);
    let item = InodeItem {
        generation: handle.transid,
        transid: handle.transid,
        nlink: 1,
        mode,
        atime: t,
        ctime: t,
        mtime: t,
        otime: t,
        ..InodeItem::default()
    };
    let keys = [Key::new(ino, INODE_ITEM_KEY, 0), Key::new(ino, INODE_REF_KEY, dir)];
    let sizes = [INODE_ITEM_SIZE as u32, (INODE_REF_SIZE + name.len()) as u32];
    let mut path = Path::new();
    if let Err(error) = insert_empty_items(handle, root, &mut path, &keys, &sizes).await {
        abort_transaction(handle, &error, "btrfs_create_new_inode");
        return Err(error);
    }
    {
        let leaf = path.leaf().clone();
        {
            let mut image = leaf.data.borrow_mut();
            let slot = path.slots[0];
            item.write(item_data_mut(&mut image, slot));
            InodeRef { index, name: name.to_vec() }.write(item_data_mut(&mut image, slot + 1));
        }
        mark_buffer_dirty(handle, &leaf);
    }
    drop(path);
    let index_cnt = if mode & S_IFMT == S_IFDIR { DIR_START_INDEX } else { u64::MAX };
    fs.inodes
        .inodes
        .borrow_mut()
        .insert(ino, BtrfsInode { ino, item, index_cnt, dir_index: index, disk_i_size: 0 });
    if let Err(error) = add_link(handle, root, dir, ino, name, false, index).await {
        abort_transaction(handle, &error, "btrfs_create_new_inode");
        // discard_new_inode
        kill_delayed_inode_items(fs, ino).await;
        fs.inodes.forget(ino);
        return Err(error);
    }
    Ok(ino)
}

/// `__btrfs_unlink_inode`: remove the entry `name` of `ino` from `dir`:
/// the DIR_ITEM now, the INODE_REF now or (inodes with one known index)
/// with the delayed inode update, the DIR_INDEX through the delayed items;
/// then the directory's size and times. Returns the index removed.
pub(crate) async fn unlink_inode_entry(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    ino: u64,
    name: &[u8],
) -> Result<u64, Error> {
    let fs = &handle.fs;
    fs.log.names_changed(ino, handle.transid);
    {
        let mut path = Path::new();
        let Some(found) = lookup_dir_item(Some(handle), root, &mut path, dir, name, -1).await? else {
            return Err(Error::Enoent);
        };
        delete_one_dir_name(handle, root, &mut path, &found).await?;
    }
    let dir_index = fs.inodes.update(ino, |inode| inode.dir_index);
    let index = if dir_index != 0 {
        delayed_delete_inode_ref(fs, ino).await;
        dir_index
    } else {
        match del_inode_ref(handle, root, name, ino, dir).await {
            Ok(index) => index,
            Err(error) => {
                fs.env.trace(TraceEvent::Note { what: "failed to delete reference", a: ino, b: dir, c: 0 });
                abort_transaction(handle, &error, "__btrfs_unlink_inode");
                return Err(error);
            }
        }
    };
    if let Err(error) = delete_delayed_dir_index(handle, dir, index).await {
        abort_transaction(handle, &error, "__btrfs_unlink_inode");
        return Err(error);
    }
    touch_dir(fs, dir, false, name.len());
    update_inode(handle, dir).await?;
    Ok(index)
}

/// `btrfs_unlink_inode`: the entry goes, and one link of the inode.
async fn unlink_inode(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    ino: u64,
    name: &[u8],
) -> Result<(), Error> {
    unlink_inode_entry(handle, root, dir, ino, name).await?;
    handle.fs.inodes.update(ino, |inode| {
        assert!(inode.item.nlink > 0, "inode {ino} unlinked with no link");
        inode.item.nlink -= 1;
    });
    update_inode(handle, ino).await
}

/// The inode lost its last link: delete it now, as eviction would (kill its
/// delayed items, delete all its items). A failure aborts.
async fn evict_inode(handle: &TransHandle, root: &Rc<Root>, ino: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    kill_delayed_inode_items(fs, ino).await;
    if let Err(error) = truncate_inode_items(handle, root, ino).await {
        abort_transaction(handle, &error, "btrfs_evict_inode");
        return Err(error);
    }
    crate::file::evict_pages(fs, ino);
    fs.inodes.forget(ino);
    Ok(())
}

/// Remove the name (`btrfs_unlink_inode`) and delete the inode if that was
/// its last link.
pub(crate) async fn unlink_and_evict(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    ino: u64,
    name: &[u8],
) -> Result<(), Error> {
    unlink_inode(handle, root, dir, ino, name).await?;
    if handle.fs.inodes.update(ino, |inode| inode.item.nlink) == 0 {
        evict_inode(handle, root, ino).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The operations.

/// `btrfs_create` (open with O_CREAT|O_EXCL): a new empty regular file
/// `name` in directory `dir_ino`. Returns its inode number.
pub async fn create(fs: &Rc<FsInfo>, dir_ino: u64, name: &str) -> Result<u64, Error> {
    let result = create_common(fs, dir_ino, name.as_bytes(), FILE_MODE, "create").await;
    trace_op(fs, "create", result)
}

/// `btrfs_mkdir`: a new empty directory.
pub async fn mkdir(fs: &Rc<FsInfo>, dir_ino: u64, name: &str) -> Result<u64, Error> {
    let result = create_common(fs, dir_ino, name.as_bytes(), DIR_MODE, "mkdir").await;
    trace_op(fs, "mkdir", result)
}

/// `btrfs_create_common` with the VFS steps before it.
async fn create_common(
    fs: &Rc<FsInfo>,
    dir: u64,
    name: &[u8],
    mode: u32,
    op: Operation,
) -> Result<u64, Error> {
    check_name(name)?;
    if is_dot(name) {
        return Err(Error::Eexist);
    }
    let _dir_lock = lock_inode(fs, dir, true).await;
    get_dir(fs, dir).await?;
    let root = fs_root(fs);
    if lookup_locked(fs, &root, dir, name).await?.is_some() {
        return Err(Error::Eexist);
    }
    let handle = start_op(fs, &root, CREATE_TRANS_ITEMS, op).await?;
    let result = create_new_inode(&handle, &root, dir, name, mode).await;
    end_op(fs, handle).await;
    result
}

/// `btrfs_unlink`: remove the name of a non-directory; the inode goes with
/// its last link.
pub async fn unlink(fs: &Rc<FsInfo>, dir_ino: u64, name: &str) -> Result<(), Error> {
    let result = do_unlink(fs, dir_ino, name.as_bytes(), false).await;
    trace_op(fs, "unlink", result)
}

/// `btrfs_rmdir`: remove an empty directory.
pub async fn rmdir(fs: &Rc<FsInfo>, dir_ino: u64, name: &str) -> Result<(), Error> {
    let result = do_unlink(fs, dir_ino, name.as_bytes(), true).await;
    trace_op(fs, "rmdir", result)
}

async fn do_unlink(fs: &Rc<FsInfo>, dir: u64, name: &[u8], rmdir: bool) -> Result<(), Error> {
    check_name(name)?;
    match (rmdir, name) {
        (false, b"." | b"..") => return Err(Error::Eisdir),
        (true, b".") => return Err(Error::Einval),
        (true, b"..") => return Err(Error::Enotempty),
        _ => {}
    }
    let _dir_lock = lock_inode(fs, dir, true).await;
    get_dir(fs, dir).await?;
    let root = fs_root(fs);
    let Some((ino, _)) = lookup_locked(fs, &root, dir, name).await? else { return Err(Error::Enoent) };
    let _inode_lock = lock_inode(fs, ino, true).await;
    let inode = iget(fs, ino).await?;
    match (rmdir, inode.is_dir()) {
        (false, true) => return Err(Error::Eisdir),
        (true, false) => return Err(Error::Enotdir),
        _ => {}
    }
    if rmdir && inode.item.size > 0 {
        return Err(Error::Enotempty);
    }
    let _evict = if !inode.is_dir() && inode.item.nlink == 1 {
        Some(crate::file::prepare_evict(fs, ino).await)
    } else {
        None
    };
    let op = if rmdir { "rmdir" } else { "unlink" };
    // __unlink_start_trans
    let handle = start_op(fs, &root, UNLINK_METADATA_UNITS, op).await?;
    let result = unlink_and_evict(&handle, &root, dir, ino, name).await;
    end_op(fs, handle).await;
    result
}

/// `btrfs_link`: a new name `new_name` in `new_dir` for the non-directory
/// `ino`.
pub async fn link(fs: &Rc<FsInfo>, ino: u64, new_dir: u64, new_name: &str) -> Result<(), Error> {
    let result = do_link(fs, ino, new_dir, new_name.as_bytes()).await;
    trace_op(fs, "link", result)
}

async fn do_link(fs: &Rc<FsInfo>, ino: u64, dir: u64, name: &[u8]) -> Result<(), Error> {
    check_name(name)?;
    if is_dot(name) {
        return Err(Error::Eexist);
    }
    let _dir_lock = lock_inode(fs, dir, true).await;
    get_dir(fs, dir).await?;
    let root = fs_root(fs);
    if lookup_locked(fs, &root, dir, name).await?.is_some() {
        return Err(Error::Eexist);
    }
    if iget(fs, ino).await?.is_dir() {
        return Err(Error::Einval);
    }
    let _inode_lock = lock_inode(fs, ino, true).await;
    let inode = iget(fs, ino).await?;
    if inode.item.nlink == 0 {
        return Err(Error::Enoent);
    }
    if inode.item.nlink >= LINK_MAX {
        return Err(Error::Emlink);
    }
    let index = set_inode_index(fs, &root, dir).await?;
    let handle = start_op(fs, &root, LINK_TRANS_ITEMS, "link").await?;
    fs.log.names_changed(ino, handle.transid);
    fs.log.entries_moved(dir, handle.transid);
    // There are several dir indexes for this inode now.
    fs.inodes.update(ino, |inode| {
        inode.dir_index = 0;
        inode.item.nlink += 1;
    });
    touch_ctime(fs, ino);
    let result = match add_link(&handle, &root, dir, ino, name, true, index).await {
        Ok(()) => update_inode(&handle, ino).await,
        Err(error) => {
            fs.inodes.update(ino, |inode| inode.item.nlink -= 1);
            Err(error)
        }
    };
    end_op(fs, handle).await;
    result
}

/// Whether `ancestor` is `ino`'s parent, grandparent, ... (directories;
/// the VFS's `d_ancestor`).
async fn is_ancestor(root: &Rc<Root>, ancestor: u64, ino: u64) -> Result<bool, Error> {
    let mut cur = ino;
    while cur != ROOT_DIR_INO {
        cur = get_parent(root, cur).await?;
        if cur == ancestor {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `btrfs_rename` (no flags): `old_dir/old_name` becomes
/// `new_dir/new_name`, replacing what that named (an empty directory by a
/// directory, a non-directory by a non-directory).
pub async fn rename(
    fs: &Rc<FsInfo>,
    old_dir: u64,
    old_name: &str,
    new_dir: u64,
    new_name: &str,
) -> Result<(), Error> {
    let result = do_rename(fs, old_dir, old_name.as_bytes(), new_dir, new_name.as_bytes()).await;
    trace_op(fs, "rename", result)
}

async fn do_rename(
    fs: &Rc<FsInfo>,
    old_dir: u64,
    old_name: &[u8],
    new_dir: u64,
    new_name: &[u8],
) -> Result<(), Error> {
    check_name(old_name)?;
    check_name(new_name)?;
    if is_dot(old_name) || is_dot(new_name) {
        return Err(Error::Einval);
    }
    let root = fs_root(fs);
    let same_dir = old_dir == new_dir;
    // lock_rename
    let mut guards = Vec::new();
    if same_dir {
        guards.push(lock_inode(fs, old_dir, true).await);
    } else {
        guards.push(lock(fs, fs.inodes.rename_lock.clone(), true).await);
        get_dir(fs, old_dir).await?;
        get_dir(fs, new_dir).await?;
        let order = if is_ancestor(&root, new_dir, old_dir).await? {
            [new_dir, old_dir]
        } else if is_ancestor(&root, old_dir, new_dir).await? {
            [old_dir, new_dir]
        } else {
            [old_dir.min(new_dir), old_dir.max(new_dir)]
        };
        for dir in order {
            guards.push(lock_inode(fs, dir, true).await);
        }
    }
    get_dir(fs, old_dir).await?;
    get_dir(fs, new_dir).await?;
    let Some((old_ino, _)) = lookup_locked(fs, &root, old_dir, old_name).await? else {
        return Err(Error::Enoent);
    };
    let new_ino = lookup_locked(fs, &root, new_dir, new_name).await?.map(|(ino, _)| ino);
    let old_inode = iget(fs, old_ino).await?;
    let is_dir = old_inode.is_dir();
    if !same_dir {
        // The traps of lock_rename: the source may not become its own
        // descendant, the target may not be an ancestor of the source.
        if is_dir && (new_dir == old_ino || is_ancestor(&root, old_ino, new_dir).await?) {
            return Err(Error::Einval);
        }
        if let Some(new_ino) = new_ino
            && (new_ino == old_dir || is_ancestor(&root, new_ino, old_dir).await?)
        {
            return Err(Error::Enotempty);
        }
    }
    // Two names of one inode: nothing to do (vfs_rename).
    if new_ino == Some(old_ino) {
        return Ok(());
    }
    if let Some(new_ino) = new_ino {
        let new_inode = iget(fs, new_ino).await?;
        if is_dir && !new_inode.is_dir() {
            return Err(Error::Enotdir);
        }
        if !is_dir && new_inode.is_dir() {
            return Err(Error::Eisdir);
        }
    }
    // vfs_rename locks the source and the target.
    let mut children: BTreeSet<u64> = BTreeSet::new();
    children.insert(old_ino);
    children.extend(new_ino);
    for ino in children {
        if ino != old_dir && ino != new_dir {
            guards.push(lock_inode(fs, ino, true).await);
        }
    }
    let mut evict = None;
    if let Some(new_ino) = new_ino {
        let new_inode = iget(fs, new_ino).await?;
        if is_dir && new_inode.item.size > 0 {
            return Err(Error::Enotempty);
        }
        if !new_inode.is_dir() && new_inode.item.nlink == 1 {
            evict = Some(crate::file::prepare_evict(fs, new_ino).await);
        }
    }
    match check_dir_item_collision(&root, new_dir, new_name).await {
        Ok(()) => {}
        Err(Error::Eexist) => assert!(new_ino.is_some(), "EEXIST without a target"),
        Err(error) => return Err(error),
    }

    let items = rename_trans_items(same_dir, new_ino.is_some());
    let handle = start_op(fs, &root, items, "rename").await?;
    let result =
        rename_in_trans(&handle, &root, old_dir, old_name, old_ino, new_dir, new_name, new_ino).await;
    end_op(fs, handle).await;
    drop(evict);
    drop(guards);
    result
}

/// The transaction half of `btrfs_rename`.
#[allow(clippy::too_many_arguments)]
async fn rename_in_trans(
    handle: &TransHandle,
    root: &Rc<Root>,
    old_dir: u64,
    old_name: &[u8],
    old_ino: u64,
    new_dir: u64,
    new_name: &[u8],
    new_ino: Option<u64>,
) -> Result<(), Error> {
    let fs = &handle.fs;
    fs.log.entries_moved(old_dir, handle.transid);
    fs.log.entries_moved(new_dir, handle.transid);
    let index = set_inode_index(fs, root, new_dir).await?;
    fs.inodes.update(old_ino, |inode| inode.dir_index = 0);
    insert_inode_ref(handle, root, new_name, old_ino, new_dir, index).await?;

    // simple_rename_timestamp: both parents' mtime and ctime (set below
    // with their sizes), the inodes' ctime.
    touch_ctime(fs, old_ino);
    if let Some(new_ino) = new_ino {
        touch_ctime(fs, new_ino);
    }

    let unlinked = async {
        unlink_inode_entry(handle, root, old_dir, old_ino, old_name).await?;
        update_inode(handle, old_ino).await
    }
    .await;
    if let Err(error) = unlinked {
        abort_transaction(handle, &error, "btrfs_rename");
        return Err(error);
    }
    if let Some(new_ino) = new_ino
        && let Err(error) = unlink_and_evict(handle, root, new_dir, new_ino, new_name).await
    {
        abort_transaction(handle, &error, "btrfs_rename");
        return Err(error);
    }
    if let Err(error) = add_link(handle, root, new_dir, old_ino, new_name, false, index).await {
        abort_transaction(handle, &error, "btrfs_rename");
        return Err(error);
    }
    fs.inodes.update(old_ino, |inode| {
        if inode.item.nlink == 1 {
            inode.dir_index = index;
        }
    });
    Ok(())
}

/// `btrfs_setattr` of the times: set `ino`'s ctime to now and update the
/// inode through `btrfs_dirty_inode` (a delayed inode update in a joined
/// transaction; on ENOSPC again in one started for one item).
pub async fn setattr(fs: &Rc<FsInfo>, ino: u64) -> Result<(), Error> {
    let result = do_setattr(fs, ino).await;
    trace_op(fs, "setattr", result)
}

async fn do_setattr(fs: &Rc<FsInfo>, ino: u64) -> Result<(), Error> {
    let _inode_lock = lock_inode(fs, ino, true).await;
    iget(fs, ino).await?;
    touch_ctime(fs, ino);
    dirty_inode(fs, ino, "setattr").await
}

/// A file's data changed: mtime and ctime (`file_update_time`).
pub(crate) fn touch_mtime(fs: &FsInfo, ino: u64) {
    touch(fs, ino, true);
}

/// `btrfs_dirty_inode`: a delayed update of the in-memory inode in a joined
/// transaction; on ENOSPC again in one started for one item. Then the
/// delayed items are balanced.
pub(crate) async fn dirty_inode(fs: &Rc<FsInfo>, ino: u64, op: Operation) -> Result<(), Error> {
    let root = fs_root(fs);
    let handle = join_transaction(fs, op).await?;
    let mut result = update_inode(&handle, ino).await;
    let handle = if result == Err(Error::Enospc) {
        end_transaction(handle);
        let handle = start_op(fs, &root, SETATTR_TRANS_ITEMS, op).await?;
        result = update_inode(&handle, ino).await;
        handle
    } else {
        handle
    };
    end_transaction(handle);
    if fs.inodes.delayed.has_node(ino) {
        balance_delayed_items(fs).await;
    }
    result
}

/// `btrfs_lookup`: what `name` names in directory `dir_ino`: its inode and
/// `FT_*` type, or `None`.
pub async fn lookup(fs: &Rc<FsInfo>, dir_ino: u64, name: &str) -> Result<Option<(u64, u8)>, Error> {
    let result = lookup_name(fs, dir_ino, name.as_bytes()).await;
    trace_op(fs, "lookup", result)
}

async fn lookup_name(fs: &Rc<FsInfo>, dir: u64, name: &[u8]) -> Result<Option<(u64, u8)>, Error> {
    if name.len() > NAME_LEN {
        return Err(Error::Enametoolong);
    }
    let _dir_lock = lock_inode(fs, dir, false).await;
    get_dir(fs, dir).await?;
    let root = fs_root(fs);
    match name {
        b"" => Err(Error::Enoent),
        b"." => Ok(Some((dir, FT_DIR))),
        b".." => Ok(Some((get_parent(&root, dir).await?, FT_DIR))),
        _ => lookup_locked(fs, &root, dir, name).await,
    }
}

/// `btrfs_real_readdir` without "." and "..": the entries of `dir_ino` in
/// DIR_INDEX order, as (name, inode, `FT_*` type). The DIR_INDEX items in
/// the tree, minus pending deletions, then the pending insertions.
pub async fn readdir(fs: &Rc<FsInfo>, dir_ino: u64) -> Result<Vec<(String, u64, u8)>, Error> {
    let result = do_readdir(fs, dir_ino).await;
    trace_op(fs, "readdir", result)
}

async fn do_readdir(fs: &Rc<FsInfo>, dir: u64) -> Result<Vec<(String, u64, u8)>, Error> {
    let mut dir_lock = lock_inode(fs, dir, false).await;
    get_dir(fs, dir).await?;
    if fs.inodes.delayed.has_node(dir) {
        // btrfs_readdir_get_delayed_items takes the lock exclusively.
        drop(dir_lock);
        dir_lock = lock_inode(fs, dir, true).await;
        get_dir(fs, dir).await?;
    }
    let root = fs_root(fs);
    // btrfs_get_dir_last_index, at opendir.
    let last_index = load_index_cnt(fs, &root, dir).await? - 1;
    let (ins_list, del_list) = fs.inodes.delayed.readdir_get_delayed_items(dir, last_index);
    let del_list: BTreeSet<u64> = del_list.into_iter().collect();
    let mut entries = Vec::new();
    let mut pos = DIR_START_INDEX;
    let mut path = Path::new();
    search_slot(None, &root, &Key::new(dir, DIR_INDEX_KEY, pos), &mut path, 0, false).await?;
    loop {
        let (nritems, key) = {
            let image = path.leaf().data.borrow();
            let nritems = header_nritems(&image) as usize;
            (nritems, (path.slots[0] < nritems).then(|| item_key(&image, path.slots[0])))
        };
        let Some(key) = key else {
            debug_assert!(path.slots[0] >= nritems);
            if !next_leaf(&root, &mut path).await? {
                break;
            }
            continue;
        };
        if key.objectid != dir || key.item_type != DIR_INDEX_KEY || key.offset > last_index {
            break;
        }
        if key.offset >= pos && !del_list.contains(&key.offset) {
            let entry = {
                let image = path.leaf().data.borrow();
                DirItem::read(item_data(&image, path.slots[0])).map(|(entry, _)| entry)
            };
            let entry = entry
                .map_err(|e| Error::BadTreeBlock(format!("directory {dir} index {}: {e}", key.offset)))?;
            entries.push((
                String::from_utf8_lossy(&entry.name).into_owned(),
                entry.location.objectid,
                entry.dir_type,
            ));
            pos = key.offset + 1;
        }
        path.slots[0] += 1;
    }
    drop(path);
    // btrfs_readdir_delayed_dir_index
    for delayed in ins_list {
        if delayed.index < pos {
            continue;
        }
        entries.push((
            String::from_utf8_lossy(&delayed.item.name).into_owned(),
            delayed.item.location.objectid,
            delayed.item.dir_type,
        ));
        pos = delayed.index + 1;
    }
    drop(dir_lock);
    Ok(entries)
}

fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".").collect()
}

async fn resolve_components(fs: &Rc<FsInfo>, components: &[&str]) -> Result<u64, Error> {
    let mut cur = ROOT_DIR_INO;
    for component in components {
        cur = match lookup_name(fs, cur, component.as_bytes()).await? {
            Some((ino, _)) => ino,
            None => return Err(Error::Enoent),
        };
    }
    Ok(cur)
}

/// The inode `path` names, from the root directory ("a/b/c"; empty
/// components and "." are skipped, ".." goes up).
pub async fn resolve(fs: &Rc<FsInfo>, path: &str) -> Result<u64, Error> {
    resolve_components(fs, &components(path)).await
}

/// The directory holding `path`'s last component, and that component.
/// EINVAL for a path with no component.
pub async fn resolve_parent(fs: &Rc<FsInfo>, path: &str) -> Result<(u64, String), Error> {
    let components = components(path);
    let Some((last, parents)) = components.split_last() else { return Err(Error::Einval) };
    let dir = resolve_components(fs, parents).await?;
    Ok((dir, (*last).to_string()))
}

/// Helpers for the tests of the filesystem operations and their parts: a
/// fresh filesystem made by mkfs and mounted, and running engine futures.
#[cfg(test)]
pub(crate) mod testing {
    use std::future::Future;
    use std::rc::Rc;

    use crate::delayed_inode::run_delayed_items;
    use crate::disk_io::{mkfs, open_ctree};
    use crate::env::Env;
    use crate::error::Error;
    use crate::fix::FixPolicy;
    use crate::fs::FsInfo;
    use crate::testenv::TestEnv;
    use crate::transaction::{end_transaction, join_transaction};

    pub(crate) const DEVICE_BYTES: u64 = 128 << 20;
    pub(crate) const NODESIZE: u32 = 16384;

    /// mkfs on a 128 MiB device, then mount.
    pub(crate) fn mount() -> (Rc<TestEnv>, Rc<FsInfo>) {
        mount_with(FixPolicy::None)
    }

    /// [`mount`] under a fix.
    pub(crate) fn mount_with(fix: FixPolicy) -> (Rc<TestEnv>, Rc<FsInfo>) {
        let env = TestEnv::new(DEVICE_BYTES as usize);
        let dyn_env: Rc<dyn Env> = env.clone();
        env.run(mkfs(dyn_env.clone(), DEVICE_BYTES, NODESIZE, fix)).expect("mkfs");
        let fs = env.run(open_ctree(dyn_env, fix)).expect("mount");
        (env, fs)
    }

    /// Mount the image afresh and check it; panics with the errors if unclean.
    pub(crate) fn check_clean(env: &Rc<TestEnv>) -> crate::check::CheckReport {
        let dyn_env: Rc<dyn Env> = env.clone();
        let report = env.run(crate::check::check(dyn_env)).expect("check mounts");
        assert!(report.ok(), "check: {:#?}", report.errors);
        report
    }

    /// Power loss now: mount the device again, as it is (the test device
    /// has no volatile cache; the old instance never runs again).
    pub(crate) fn crash_and_mount(env: &Rc<TestEnv>) -> Rc<FsInfo> {
        let dyn_env: Rc<dyn Env> = env.clone();
        env.run(open_ctree(dyn_env, FixPolicy::None)).expect("mount after crash")
    }

    /// Run `f(fs)` as a task until the environment is idle.
    pub(crate) fn run<T: 'static, Fut: Future<Output = T> + 'static>(
        env: &TestEnv,
        fs: &Rc<FsInfo>,
        f: impl FnOnce(Rc<FsInfo>) -> Fut,
    ) -> T {
        env.run(f(fs.clone()))
    }

    /// Every item of tree `id`, read without a transaction.
    pub(crate) fn tree_items(env: &TestEnv, fs: &Rc<FsInfo>, id: u64) -> Vec<(crate::format::Key, Vec<u8>)> {
        run(env, fs, move |fs| async move {
            let node = fs.root(id).node();
            let mut items = Vec::new();
            crate::disk_io::for_each_leaf_item(
                &fs,
                id,
                node.start,
                node.level(),
                node.generation(),
                |k, d| {
                    items.push((*k, d.to_vec()));
                    Ok(())
                },
            )
            .await
            .map(|()| items)
        })
        .unwrap()
    }

    /// `files` files in the root directory, each with a data extent (300
    /// make a fs tree of two levels), committed every 64.
    pub(crate) fn populate(env: &TestEnv, fs: &Rc<FsInfo>, files: usize) {
        use crate::file::{sync_fs, write};
        run(env, fs, move |fs| async move {
            for i in 0..files {
                let ino = super::create(&fs, super::ROOT_DIR_INO, &format!("file-{i:04}")).await?;
                write(&fs, ino, 0, &vec![i as u8; 5000]).await?;
                if i % 64 == 63 {
                    sync_fs(&fs).await?;
                }
            }
            sync_fs(&fs).await
        })
        .unwrap();
    }

    /// Write every delayed item, in a joined transaction (what the commit
    /// does first).
    pub(crate) fn run_delayed(env: &TestEnv, fs: &Rc<FsInfo>) -> Result<(), Error> {
        run(env, fs, |fs| async move {
            let handle = join_transaction(&fs, "test").await?;
            let result = run_delayed_items(&handle).await;
            end_transaction(handle);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::testing::{mount, run, run_delayed};
    use super::*;
    use crate::block_rsv::{block_rsv_use_bytes, calc_insert_metadata_size};
    use crate::disk_io::for_each_leaf_item;
    use crate::error::{EEXIST, EINVAL, EISDIR, ENAMETOOLONG, ENOENT, ENOSPC, ENOTDIR, ENOTEMPTY, EROFS};
    use crate::format::{DIR_ITEM_KEY, dir_items, inode_refs};
    use crate::locking::{tree_read_lock, tree_read_unlock};
    use crate::testenv::TestEnv;

    const INSERT_UNIT: u64 = 262_144;
    const UPDATE_UNIT: u64 = 131_072;

    fn errno<T>(result: Result<T, Error>) -> i32 {
        result.err().map_or(0, |e| e.errno())
    }

    fn trace_notes(env: &TestEnv, what: &str) -> Vec<(u64, u64, u64)> {
        env.traces
            .borrow()
            .iter()
            .filter_map(|event| match event {
                TraceEvent::Note { what: w, a, b, c } if *w == what => Some((*a, *b, *c)),
                _ => None,
            })
            .collect()
    }

    fn names(entries: &[(String, u64, u8)]) -> Vec<&str> {
        entries.iter().map(|(name, _, _)| name.as_str()).collect()
    }

    #[test]
    fn lookups_and_readdir_see_delayed_items_before_and_after_they_run() {
        let (env, fs) = mount();
        let (a, d, b) = run(&env, &fs, |fs| async move {
            let a = create(&fs, ROOT_DIR_INO, "a").await?;
            let d = mkdir(&fs, ROOT_DIR_INO, "d").await?;
            let b = create(&fs, d, "b").await?;
            Ok::<_, Error>((a, d, b))
        })
        .unwrap();
        assert_eq!((a, d, b), (257, 258, 259));
        // The DIR_INDEX items are still delayed.
        assert_eq!(fs.inodes.delayed.pending_insertions(ROOT_DIR_INO), vec![2, 3]);
        assert_eq!(fs.inodes.delayed.pending_insertions(d), vec![2]);
        for _ in 0..2 {
            let (root_entries, d_entries, found) = run(&env, &fs, |fs| async move {
                let root_entries = readdir(&fs, ROOT_DIR_INO).await?;
                let d_entries = readdir(&fs, d).await?;
                let found = (
                    lookup(&fs, ROOT_DIR_INO, "a").await?,
                    lookup(&fs, ROOT_DIR_INO, "d").await?,
                    lookup(&fs, d, "b").await?,
                    lookup(&fs, d, "nothing").await?,
                    resolve(&fs, "d/b").await?,
                );
                Ok::<_, Error>((root_entries, d_entries, found))
            })
            .unwrap();
            assert_eq!(root_entries, vec![("a".to_string(), a, FT_REG_FILE), ("d".to_string(), d, FT_DIR)]);
            assert_eq!(d_entries, vec![("b".to_string(), b, FT_REG_FILE)]);
            assert_eq!(found, (Some((a, FT_REG_FILE)), Some((d, FT_DIR)), Some((b, FT_REG_FILE)), None, b));
            run_delayed(&env, &fs).unwrap();
            assert!(fs.inodes.delayed.pending_insertions(ROOT_DIR_INO).is_empty());
            assert_eq!(fs.inodes.delayed.items(), 0);
        }
        // The inode items in the tree are the in-memory ones now.
        let root = fs.root(FS_TREE_OBJECTID);
        let on_disk = env.run(async move { read_inode(&root, ROOT_DIR_INO).await }).unwrap().unwrap();
        assert_eq!(on_disk.item.size, 2 * 2);
        let in_memory = fs.inodes.get(ROOT_DIR_INO).unwrap().item;
        assert_eq!(on_disk.item, InodeItem { transid: on_disk.item.transid, ..in_memory });
        assert_eq!(on_disk.item.transid, 2);
        // A pending deletion hides a tree item from readdir.
        run(&env, &fs, |fs| async move { unlink(&fs, ROOT_DIR_INO, "a").await }).unwrap();
        assert_eq!(fs.inodes.delayed.pending_deletions(ROOT_DIR_INO), vec![2]);
        let entries = run(&env, &fs, |fs| async move { readdir(&fs, ROOT_DIR_INO).await }).unwrap();
        assert_eq!(names(&entries), vec!["d"]);
        run_delayed(&env, &fs).unwrap();
        let entries = run(&env, &fs, |fs| async move { readdir(&fs, ROOT_DIR_INO).await }).unwrap();
        assert_eq!(names(&entries), vec!["d"]);
        assert!(fs.inodes.get(a).is_none());
    }

    #[test]
    fn errno_cases() {
        let (env, fs) = mount();
        let got = run(&env, &fs, |fs| async move {
            let file = create(&fs, ROOT_DIR_INO, "f").await.unwrap();
            let dir = mkdir(&fs, ROOT_DIR_INO, "d").await.unwrap();
            let sub = mkdir(&fs, dir, "sub").await.unwrap();
            create(&fs, sub, "x").await.unwrap();
            mkdir(&fs, ROOT_DIR_INO, "e").await.unwrap();
            let long = "n".repeat(256);
            vec![
                ("create exists", errno(create(&fs, ROOT_DIR_INO, "f").await), EEXIST),
                ("mkdir exists", errno(mkdir(&fs, ROOT_DIR_INO, "d").await), EEXIST),
                ("create dot", errno(create(&fs, ROOT_DIR_INO, ".").await), EEXIST),
                ("create in a file", errno(create(&fs, file, "g").await), ENOTDIR),
                ("create too long", errno(create(&fs, ROOT_DIR_INO, &long).await), ENAMETOOLONG),
                ("create max length", errno(create(&fs, ROOT_DIR_INO, &long[1..]).await), 0),
                ("lookup too long", errno(lookup(&fs, ROOT_DIR_INO, &long).await), ENAMETOOLONG),
                ("lookup in a file", errno(lookup(&fs, file, "g").await), ENOTDIR),
                ("unlink missing", errno(unlink(&fs, ROOT_DIR_INO, "missing").await), ENOENT),
                ("unlink a directory", errno(unlink(&fs, ROOT_DIR_INO, "d").await), EISDIR),
                ("rmdir a file", errno(rmdir(&fs, ROOT_DIR_INO, "f").await), ENOTDIR),
                ("rmdir not empty", errno(rmdir(&fs, dir, "sub").await), ENOTEMPTY),
                ("rmdir missing", errno(rmdir(&fs, ROOT_DIR_INO, "missing").await), ENOENT),
                ("link exists", errno(link(&fs, file, ROOT_DIR_INO, "d").await), EEXIST),
                ("link a directory", errno(link(&fs, dir, ROOT_DIR_INO, "d2").await), EINVAL),
                ("link into a file", errno(link(&fs, file, file, "g").await), ENOTDIR),
                ("rename missing", errno(rename(&fs, ROOT_DIR_INO, "missing", dir, "m").await), ENOENT),
                (
                    "rename dir over file",
                    errno(rename(&fs, ROOT_DIR_INO, "d", ROOT_DIR_INO, "f").await),
                    ENOTDIR,
                ),
                (
                    "rename file over dir",
                    errno(rename(&fs, ROOT_DIR_INO, "f", ROOT_DIR_INO, "e").await),
                    EISDIR,
                ),
                ("rename dir below itself", errno(rename(&fs, ROOT_DIR_INO, "d", sub, "d").await), EINVAL),
                ("rename over non-empty", errno(rename(&fs, ROOT_DIR_INO, "e", dir, "sub").await), ENOTEMPTY),
                ("rename over an ancestor", errno(rename(&fs, sub, "x", ROOT_DIR_INO, "d").await), ENOTEMPTY),
                ("rename to itself", errno(rename(&fs, ROOT_DIR_INO, "f", ROOT_DIR_INO, "f").await), 0),
                ("setattr missing", errno(setattr(&fs, 9999).await), ENOENT),
                ("resolve missing", errno(resolve(&fs, "d/none/x").await), ENOENT),
                ("resolve through a file", errno(resolve(&fs, "f/x").await), ENOTDIR),
                ("resolve_parent of nothing", errno(resolve_parent(&fs, "/").await), EINVAL),
            ]
        });
        for (what, got, want) in got {
            assert_eq!(got, want, "{what}");
        }
        // Nothing was aborted along the way.
        assert_eq!(fs.trans.fs_error.get(), None);
        run_delayed(&env, &fs).unwrap();
    }

    #[test]
    fn one_create_reserves_1310720_and_a_batch_migrates_one_insert_unit() {
        let (env, fs) = mount();
        let rsvs = &fs.space.get().unwrap().rsvs;
        assert_eq!(calc_insert_metadata_size(16384, CREATE_TRANS_ITEMS), 1_310_720);
        run(&env, &fs, |fs| async move { create(&fs, ROOT_DIR_INO, "first").await }).unwrap();
        assert_eq!(trace_notes(&env, "start_transaction"), vec![(5, 1_310_720, 2)]);
        // The first dir index of the directory started a batch: one insert
        // unit moved to the delayed items reserve, and one update unit for
        // the directory's inode.
        let stats = &fs.inodes.delayed.stats;
        assert_eq!(stats.migrates.get(), 2);
        assert_eq!(rsvs.delayed_block_rsv.size(), INSERT_UNIT + UPDATE_UNIT);
        assert_eq!(rsvs.delayed_block_rsv.reserved(), INSERT_UNIT + UPDATE_UNIT);
        // The handle ended: its share of the transaction reserve is gone.
        assert_eq!(rsvs.trans_block_rsv.size(), 0);
        // The second joins the batch: nothing migrates, and its unit goes
        // back to the transaction reserve.
        run(&env, &fs, |fs| async move { create(&fs, ROOT_DIR_INO, "second").await }).unwrap();
        assert_eq!(stats.migrates.get(), 2);
        assert_eq!(rsvs.delayed_block_rsv.size(), INSERT_UNIT + UPDATE_UNIT);
        assert_eq!(rsvs.trans_block_rsv.size(), 0);
        // Running the items writes one batch and releases everything.
        run_delayed(&env, &fs).unwrap();
        assert_eq!(stats.index_batches.get(), 1);
        assert_eq!(stats.index_items_inserted.get(), 2);
        assert_eq!((rsvs.delayed_block_rsv.size(), rsvs.delayed_block_rsv.reserved()), (0, 0));
        // Other operations reserve the kernel's counts.
        run(&env, &fs, |fs| async move {
            let first = resolve(&fs, "first").await?;
            mkdir(&fs, ROOT_DIR_INO, "d").await?;
            link(&fs, first, ROOT_DIR_INO, "third").await?;
            rename(&fs, ROOT_DIR_INO, "third", ROOT_DIR_INO, "fourth").await?;
            rename(&fs, ROOT_DIR_INO, "fourth", ROOT_DIR_INO, "second").await?;
            // Refused before the transaction starts: nothing reserved.
            assert_eq!(rename(&fs, ROOT_DIR_INO, "second", first, "x").await, Err(Error::Enotdir));
            let d = resolve(&fs, "d").await?;
            rename(&fs, ROOT_DIR_INO, "first", d, "moved").await?;
            unlink(&fs, d, "moved").await?;
            rmdir(&fs, ROOT_DIR_INO, "d").await
        })
        .unwrap();
        let items: Vec<u64> = trace_notes(&env, "start_transaction").iter().map(|n| n.0).collect();
        assert_eq!(items, vec![5, 5, 5, 5, 8, 13, 9, 6, 6]);
    }

    /// The failure of the report: the COW loop has drained the shared
    /// transaction reserve when `btrfs_insert_delayed_dir_index` migrates
    /// its unit; the create fails with ENOSPC, the transaction aborts, and
    /// the filesystem is read-only.
    #[test]
    fn create_fails_with_enospc_when_the_trans_rsv_is_drained_before_add_link() {
        let (env, fs) = mount();
        // Hold the fs tree's leaf so that the create stops in its first
        // COW search, after start_transaction.
        let leaf = fs.root(FS_TREE_OBJECTID).node();
        {
            let (fs, leaf) = (fs.clone(), leaf.clone());
            env.run(async move { tree_read_lock(&fs, &leaf).await });
        }
        let result = env.spawn_with_result("create", {
            let fs = fs.clone();
            async move { create(&fs, ROOT_DIR_INO, "victim").await }
        });
        env.run_until_idle();
        assert!(result.borrow().is_none(), "the create should wait for the leaf");
        let rsvs = &fs.space.get().unwrap().rsvs;
        let trans = &rsvs.trans_block_rsv;
        assert_eq!(trans.size(), 1_310_720);
        // What hundreds of COWs of one search would have taken.
        block_rsv_use_bytes(trans, trans.reserved()).unwrap();
        tree_read_unlock(&leaf);
        env.run_until_idle();
        assert_eq!(result.borrow_mut().take().unwrap(), Err(Error::Enospc));
        let warnings = trace_notes(&env, "WARNING delayed_dir_index migrate");
        assert_eq!(warnings, vec![(ROOT_DIR_INO, INSERT_UNIT, 0)]);
        assert_eq!(fs.inodes.delayed.stats.migrate_failures.get(), 1);
        assert_eq!(fs.trans.fs_error.get(), Some(ENOSPC));
        assert!(
            env.traces
                .borrow()
                .iter()
                .any(|e| matches!(e, TraceEvent::Transaction { state: "btrfs_add_link", .. }))
        );
        assert!(env.traces.borrow().contains(&TraceEvent::Op { name: "create", errno: ENOSPC }));
        // Read-only from now on; reads still work.
        let later = run(&env, &fs, |fs| async move {
            (
                errno(create(&fs, ROOT_DIR_INO, "after").await),
                errno(mkdir(&fs, ROOT_DIR_INO, "dir").await),
                errno(setattr(&fs, ROOT_DIR_INO).await),
                errno(lookup(&fs, ROOT_DIR_INO, "after").await),
            )
        });
        assert_eq!(later, (EROFS, EROFS, EROFS, 0));
        // The oracles report what the kernel logs: the failed migrate, then the abort.
        let violations = env.violations.borrow();
        let kinds: Vec<&str> = violations.iter().map(|v| v.kind).collect();
        assert_eq!(kinds, ["migrate_enospc", "enospc_abort"]);
        assert!(violations[0].message.contains("trans_block_rsv: size 1310720"), "{}", violations[0].message);
        assert!(violations[1].message.contains("bytes unallocated"), "{}", violations[1].message);
    }

    #[test]
    fn colliding_names_share_a_dir_item() {
        assert_eq!(crate::format::name_hash(b"c1371838"), crate::format::name_hash(b"c2000402"));
        let (env, fs) = mount();
        let (x, y) = run(&env, &fs, |fs| async move {
            let x = create(&fs, ROOT_DIR_INO, "c1371838").await?;
            let y = mkdir(&fs, ROOT_DIR_INO, "c2000402").await?;
            Ok::<_, Error>((x, y))
        })
        .unwrap();
        let root = fs.root(FS_TREE_OBJECTID);
        let key = Key::new(ROOT_DIR_INO, crate::format::DIR_ITEM_KEY, crate::format::name_hash(b"c1371838"));
        let item = {
            let root = root.clone();
            env.run(async move { crate::ctree::lookup_item(&root, &key).await }).unwrap().unwrap()
        };
        let entries: Vec<DirItem> = crate::format::dir_items(&item).map(Result::unwrap).collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].name, b"c1371838");
        assert_eq!(entries[1].name, b"c2000402");
        let found = run(&env, &fs, |fs| async move {
            (lookup(&fs, ROOT_DIR_INO, "c1371838").await, lookup(&fs, ROOT_DIR_INO, "c2000402").await)
        });
        assert_eq!(found, (Ok(Some((x, FT_REG_FILE))), Ok(Some((y, FT_DIR)))));
        // Removing one leaves the other in the shrunken item.
        run(&env, &fs, |fs| async move { unlink(&fs, ROOT_DIR_INO, "c1371838").await }).unwrap();
        let item = env.run(async move { crate::ctree::lookup_item(&root, &key).await }).unwrap().unwrap();
        let entries: Vec<DirItem> = crate::format::dir_items(&item).map(Result::unwrap).collect();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].name, b"c2000402");
        let found = run(&env, &fs, |fs| async move {
            (lookup(&fs, ROOT_DIR_INO, "c1371838").await, lookup(&fs, ROOT_DIR_INO, "c2000402").await)
        });
        assert_eq!(found, (Ok(None), Ok(Some((y, FT_DIR)))));
        // And the name can come back.
        run(
            &env,
            &fs,
            |fs| async move { rename(&fs, ROOT_DIR_INO, "c2000402", ROOT_DIR_INO, "c1371838").await },
        )
        .unwrap();
        let entries = run(&env, &fs, |fs| async move { readdir(&fs, ROOT_DIR_INO).await }).unwrap();
        assert_eq!(entries, vec![("c1371838".to_string(), y, FT_DIR)]);
        run_delayed(&env, &fs).unwrap();
    }

    #[test]
    fn hard_links_count_and_the_last_unlink_deletes_the_inode() {
        let (env, fs) = mount();
        let ino = run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "a").await?;
            let d = mkdir(&fs, ROOT_DIR_INO, "d").await?;
            link(&fs, ino, d, "b").await?;
            link(&fs, ino, ROOT_DIR_INO, "c").await?;
            Ok::<_, Error>(ino)
        })
        .unwrap();
        assert_eq!(fs.inodes.get(ino).unwrap().item.nlink, 3);
        run_delayed(&env, &fs).unwrap();
        run(&env, &fs, |fs| async move {
            unlink(&fs, ROOT_DIR_INO, "a").await?;
            unlink(&fs, ROOT_DIR_INO, "c").await
        })
        .unwrap();
        assert_eq!(fs.inodes.get(ino).unwrap().item.nlink, 1);
        let root = fs.root(FS_TREE_OBJECTID);
        let read = {
            let root = root.clone();
            env.run(async move { read_inode(&root, ino).await }).unwrap()
        };
        assert!(read.is_some());
        run(&env, &fs, |fs| async move {
            let d = resolve(&fs, "d").await?;
            unlink(&fs, d, "b").await
        })
        .unwrap();
        assert!(fs.inodes.get(ino).is_none());
        assert!(!fs.inodes.delayed.has_node(ino));
        let read = env.run(async move { read_inode(&root, ino).await }).unwrap();
        assert!(read.is_none());
        run_delayed(&env, &fs).unwrap();
        let namespace = tree_namespace(&fs_tree_items(&env, &fs)).unwrap();
        assert_eq!(namespace.keys().collect::<Vec<_>>(), vec!["/d"]);
    }

    /// Every item of the fs tree, as it is in memory now.
    fn fs_tree_items(env: &TestEnv, fs: &Rc<FsInfo>) -> Vec<(Key, Vec<u8>)> {
        run(env, fs, |fs| async move {
            let node = fs.root(FS_TREE_OBJECTID).node();
            let (bytenr, level, generation) = (node.start, node.level(), node.generation());
            drop(node);
            let mut items = Vec::new();
            for_each_leaf_item(&fs, FS_TREE_OBJECTID, bytenr, level, generation, |key, data| {
                items.push((*key, data.to_vec()));
                Ok(())
            })
            .await
            .map(|()| items)
        })
        .unwrap()
    }

    /// The namespace the fs tree holds, path -> (is a directory, inode),
    /// after checking, as btrfs check does, that DIR_ITEMs, DIR_INDEXes,
    /// INODE_REFs, link counts and directory sizes agree.
    fn tree_namespace(items: &[(Key, Vec<u8>)]) -> Result<BTreeMap<String, (bool, u64)>, String> {
        let mut inodes: BTreeMap<u64, InodeItem> = BTreeMap::new();
        let mut refs: BTreeSet<(u64, u64, u64, Vec<u8>)> = BTreeSet::new();
        let mut by_name: BTreeMap<(u64, Vec<u8>), (u64, u8)> = BTreeMap::new();
        let mut by_index: BTreeMap<(u64, u64), (u64, u8, Vec<u8>)> = BTreeMap::new();
        for (key, data) in items {
            match key.item_type {
                INODE_ITEM_KEY => {
                    inodes.insert(key.objectid, InodeItem::read(data));
                }
                INODE_REF_KEY => {
                    for entry in inode_refs(data) {
                        let entry = entry.map_err(|e| format!("{key}: {e}"))?;
                        refs.insert((key.objectid, key.offset, entry.index, entry.name));
                    }
                }
                DIR_ITEM_KEY => {
                    for entry in dir_items(data) {
                        let entry = entry.map_err(|e| format!("{key}: {e}"))?;
                        if crate::format::name_hash(&entry.name) != key.offset {
                            return Err(format!("{key}: {:?} under another hash", entry.name));
                        }
                        let value = (entry.location.objectid, entry.dir_type);
                        if by_name.insert((key.objectid, entry.name), value).is_some() {
                            return Err(format!("{key}: a name twice"));
                        }
                    }
                }
                DIR_INDEX_KEY => {
                    let entries: Vec<DirItem> =
                        dir_items(data).collect::<Result<_, _>>().map_err(|e| format!("{key}: {e}"))?;
                    if entries.len() != 1 {
                        return Err(format!("{key}: {} entries", entries.len()));
                    }
                    let entry = &entries[0];
                    by_index.insert(
                        (key.objectid, key.offset),
                        (entry.location.objectid, entry.dir_type, entry.name.clone()),
                    );
                }
                _ => {}
            }
        }
        let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
        let mut names: BTreeMap<u64, u32> = BTreeMap::new();
        for (&(dir, index), (child, ftype, name)) in &by_index {
            *sizes.entry(dir).or_default() += 2 * name.len() as u64;
            *names.entry(*child).or_default() += 1;
            if by_name.get(&(dir, name.clone())) != Some(&(*child, *ftype)) {
                return Err(format!("DIR_INDEX {dir}/{index} {name:?} has no DIR_ITEM"));
            }
            if !refs.contains(&(*child, dir, index, name.clone())) {
                return Err(format!("DIR_INDEX {dir}/{index} {name:?} has no INODE_REF"));
            }
            let inode =
                inodes.get(child).ok_or(format!("DIR_INDEX {dir}/{index} names missing inode {child}"))?;
            if mode_to_ftype(inode.mode) != *ftype {
                return Err(format!("DIR_INDEX {dir}/{index}: type {ftype}, mode {:o}", inode.mode));
            }
        }
        if by_name.len() != by_index.len() {
            return Err(format!("{} DIR_ITEM entries, {} DIR_INDEX items", by_name.len(), by_index.len()));
        }
        for (child, parent, index, name) in &refs {
            let root_self = *child == ROOT_DIR_INO && *parent == ROOT_DIR_INO;
            if !root_self && by_index.get(&(*parent, *index)).is_none_or(|(c, _, n)| c != child || n != name)
            {
                return Err(format!("INODE_REF {child} in {parent} {name:?} has no DIR_INDEX"));
            }
        }
        for (&ino, inode) in &inodes {
            let count = names.get(&ino).copied().unwrap_or(0);
            if mode_to_ftype(inode.mode) == FT_DIR {
                if inode.size != sizes.get(&ino).copied().unwrap_or(0) || inode.nlink != 1 {
                    return Err(format!("directory {ino}: size {} nlink {}", inode.size, inode.nlink));
                }
            } else if inode.nlink != count {
                return Err(format!("inode {ino}: nlink {} with {count} names", inode.nlink));
            }
            if ino != ROOT_DIR_INO && count == 0 {
                return Err(format!("inode {ino} has no name"));
            }
        }
        let mut namespace = BTreeMap::new();
        let mut pending = vec![(ROOT_DIR_INO, String::new())];
        while let Some((dir, prefix)) = pending.pop() {
            for (_, (child, ftype, name)) in by_index.range((dir, 0)..=(dir, u64::MAX)) {
                let path = format!("{prefix}/{}", String::from_utf8_lossy(name));
                if *ftype == FT_DIR {
                    pending.push((*child, path.clone()));
                }
                namespace.insert(path, (*ftype == FT_DIR, *child));
            }
        }
        Ok(namespace)
    }

    /// Tasks creating, renaming, linking and removing in shared directories
    /// while another runs the delayed items: every task finishes (no lock
    /// cycle) and the tree's namespace is consistent.
    #[test]
    fn concurrent_operations_and_delayed_item_runs_leave_a_consistent_tree() {
        use crate::env::SwitchPoint;
        let (env, fs) = mount();
        let dirs = run(&env, &fs, |fs| async move {
            Ok::<_, Error>((mkdir(&fs, ROOT_DIR_INO, "d").await?, mkdir(&fs, ROOT_DIR_INO, "e").await?))
        })
        .unwrap();
        let mut results = Vec::new();
        for task in 0..4u64 {
            let fs = fs.clone();
            results.push(env.spawn_with_result(&format!("worker{task}"), async move {
                let (d, e) = dirs;
                let mut done = 0;
                for j in 0..24u64 {
                    let name = format!("n{}", (task + j) % 7);
                    let r = match (task + j) % 6 {
                        0 => create(&fs, d, &name).await.map(|_| ()),
                        1 => rename(&fs, d, &name, e, &name).await,
                        2 => match lookup(&fs, e, &name).await {
                            Ok(Some((ino, FT_REG_FILE))) => link(&fs, ino, d, &format!("{name}-link")).await,
                            other => other.map(|_| ()),
                        },
                        3 => unlink(&fs, e, &name).await,
                        4 => mkdir(&fs, e, &format!("sub{}", j % 3)).await.map(|_| ()),
                        _ => rmdir(&fs, e, &format!("sub{}", (j + task) % 3)).await,
                    };
                    match r {
                        Ok(()) => done += 1,
                        Err(
                            Error::Eexist | Error::Enoent | Error::Enotempty | Error::Eisdir | Error::Enotdir,
                        ) => {}
                        Err(other) => panic!("task {task} op {j}: {other}"),
                    }
                    fs.env.switch_point(SwitchPoint::Workload).await;
                }
                done
            }));
        }
        let runner = env.spawn_with_result("runner", {
            let fs = fs.clone();
            async move {
                for _ in 0..12 {
                    let handle = join_transaction(&fs, "runner").await?;
                    let result = crate::delayed_inode::run_delayed_items(&handle).await;
                    end_transaction(handle);
                    result?;
                    fs.env.switch_point(SwitchPoint::Workload).await;
                }
                Ok::<_, Error>(())
            }
        });
        env.run_until_idle();
        assert!(env.all_tasks_done(), "a task is stuck");
        assert_eq!(runner.borrow_mut().take().unwrap(), Ok(()));
        let done: u64 = results.iter().map(|r| r.borrow_mut().take().unwrap()).sum();
        assert!(done > 20, "only {done} operations succeeded");
        assert_eq!(fs.trans.fs_error.get(), None);
        run_delayed(&env, &fs).unwrap();
        let namespace = tree_namespace(&fs_tree_items(&env, &fs)).unwrap();
        for (path, (_, ino)) in &namespace {
            let path = path.clone();
            let found = run(&env, &fs, |fs| async move { resolve(&fs, &path).await });
            assert_eq!(found, Ok(*ino));
        }
    }

    // -----------------------------------------------------------------------
    // Random operation sequences against a model of the namespace.

    const DIRS: [&str; 6] = ["", "a", "b", "a/b", "b/a", "a/b/f"];
    const NAMES: [&str; 5] = ["a", "b", "f", "c1371838", "c2000402"];

    #[derive(Clone, Debug)]
    enum Op {
        Create(usize, usize),
        Mkdir(usize, usize),
        Unlink(usize, usize),
        Rmdir(usize, usize),
        Link(usize, usize, usize, usize),
        Rename(usize, usize, usize, usize),
        Setattr(usize, usize),
        RunDelayed,
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        // The root and "a" most often, so that the tree grows.
        let d = prop_oneof![3 => Just(0usize), 2 => Just(1usize), 3 => 1..DIRS.len()];
        let n = 0..NAMES.len();
        prop_oneof![
            6 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Create(d, n)),
            5 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Mkdir(d, n)),
            2 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Unlink(d, n)),
            1 => (d.clone(), n.clone()).prop_map(|(d, n)| Op::Rmdir(d, n)),
            3 => (d.clone(), n.clone(), d.clone(), n.clone()).prop_map(|(a, b, c, e)| Op::Link(a, b, c, e)),
            4 => (d.clone(), n.clone(), d.clone(), n.clone()).prop_map(|(a, b, c, e)| Op::Rename(a, b, c, e)),
            1 => (d, n).prop_map(|(d, n)| Op::Setattr(d, n)),
            1 => Just(Op::RunDelayed),
        ]
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Node {
        dir: bool,
        id: u64,
        /// Order of arrival in its directory (the DIR_INDEX order).
        seq: u64,
    }

    /// The namespace as Linux defines it: paths from the root ("" is the root).
    #[derive(Default)]
    struct Model {
        entries: BTreeMap<String, Node>,
        nlink: BTreeMap<u64, u32>,
        ino_of: BTreeMap<u64, u64>,
        next: u64,
    }

    fn join(dir: &str, name: &str) -> String {
        if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") }
    }

    fn parent_of(path: &str) -> &str {
        path.rfind('/').map_or("", |i| &path[..i])
    }

    impl Model {
        fn next(&mut self) -> u64 {
            self.next += 1;
            self.next
        }

        /// What resolving `path` gives: the node (None for the root), or an errno.
        fn resolve(&self, path: &str) -> Result<Option<Node>, i32> {
            let mut cur: Option<Node> = None;
            let mut prefix = String::new();
            for component in path.split('/').filter(|c| !c.is_empty()) {
                if cur.is_some_and(|n| !n.dir) {
                    return Err(ENOTDIR);
                }
                prefix = join(&prefix, component);
                cur = Some(*self.entries.get(&prefix).ok_or(ENOENT)?);
            }
            Ok(cur)
        }

        fn resolve_dir(&self, path: &str) -> Result<(), i32> {
            match self.resolve(path)? {
                Some(node) if !node.dir => Err(ENOTDIR),
                _ => Ok(()),
            }
        }

        fn children(&self, dir: &str) -> Vec<(String, Node)> {
            let mut children: Vec<(String, Node)> = self
                .entries
                .iter()
                .filter(|(path, _)| parent_of(path) == dir)
                .map(|(path, node)| (path.rsplit('/').next().unwrap().to_string(), *node))
                .collect();
            children.sort_by_key(|(_, node)| node.seq);
            children
        }

        fn add(&mut self, path: String, dir: bool, id: u64) {
            let seq = self.next();
            self.entries.insert(path, Node { dir, id, seq });
        }

        fn create(&mut self, d: &str, n: &str, dir: bool) -> Result<u64, i32> {
            self.resolve_dir(d)?;
            let path = join(d, n);
            if self.entries.contains_key(&path) {
                return Err(EEXIST);
            }
            let id = self.next();
            self.nlink.insert(id, 1);
            self.add(path, dir, id);
            Ok(id)
        }

        fn remove(&mut self, d: &str, n: &str, rmdir: bool) -> Result<(), i32> {
            self.resolve_dir(d)?;
            let path = join(d, n);
            let node = *self.entries.get(&path).ok_or(ENOENT)?;
            match (rmdir, node.dir) {
                (false, true) => return Err(EISDIR),
                (true, false) => return Err(ENOTDIR),
                _ => {}
            }
            if rmdir && !self.children(&path).is_empty() {
                return Err(ENOTEMPTY);
            }
            self.entries.remove(&path);
            *self.nlink.get_mut(&node.id).unwrap() -= 1;
            Ok(())
        }

        fn link(&mut self, sd: &str, sn: &str, dd: &str, dn: &str) -> Result<(), i32> {
            let source = self.resolve(&join(sd, sn))?;
            self.resolve(dd)?;
            self.resolve_dir(dd)?;
            let path = join(dd, dn);
            if self.entries.contains_key(&path) {
                return Err(EEXIST);
            }
            let source = source.expect("a name is never the root");
            if source.dir {
                return Err(EINVAL);
            }
            *self.nlink.get_mut(&source.id).unwrap() += 1;
            self.add(path, false, source.id);
            Ok(())
        }

        fn rename(&mut self, sd: &str, sn: &str, dd: &str, dn: &str) -> Result<(), i32> {
            self.resolve(sd)?;
            self.resolve(dd)?;
            self.resolve_dir(sd)?;
            self.resolve_dir(dd)?;
            let from = join(sd, sn);
            let to = join(dd, dn);
            let source = *self.entries.get(&from).ok_or(ENOENT)?;
            let target = self.entries.get(&to).copied();
            let within = |path: &str, dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
            if sd != dd {
                if source.dir && within(dd, &from) {
                    return Err(EINVAL);
                }
                if target.is_some() && within(sd, &to) {
                    return Err(ENOTEMPTY);
                }
            }
            if let Some(target) = target {
                if target.id == source.id {
                    return Ok(());
                }
                if source.dir && !target.dir {
                    return Err(ENOTDIR);
                }
                if !source.dir && target.dir {
                    return Err(EISDIR);
                }
                if target.dir && !self.children(&to).is_empty() {
                    return Err(ENOTEMPTY);
                }
                self.entries.remove(&to);
                *self.nlink.get_mut(&target.id).unwrap() -= 1;
            }
            let moved: Vec<(String, Node)> = self
                .entries
                .iter()
                .filter(|(path, _)| within(path, &from))
                .map(|(path, node)| (path.clone(), *node))
                .collect();
            for (path, mut node) in moved {
                self.entries.remove(&path);
                let new_path = format!("{to}{}", &path[from.len()..]);
                if path == from {
                    node.seq = self.next();
                }
                self.entries.insert(new_path, node);
            }
            Ok(())
        }
    }

    /// Every directory of the model lists what the engine lists, in order,
    /// with the same inodes; link counts agree; deleted inodes are gone.
    fn compare(env: &TestEnv, fs: &Rc<FsInfo>, model: &Model) -> Result<(), TestCaseError> {
        let mut dirs: Vec<String> = vec![String::new()];
        dirs.extend(model.entries.iter().filter(|(_, n)| n.dir).map(|(p, _)| p.clone()));
        for dir in dirs {
            let path = dir.clone();
            let entries = run(env, fs, |fs| async move {
                let ino = resolve(&fs, &path).await?;
                readdir(&fs, ino).await
            })
            .map_err(|e| TestCaseError::fail(format!("readdir {dir:?}: {e}")))?;
            let want: Vec<(String, u64, u8)> = model
                .children(&dir)
                .into_iter()
                .map(|(name, node)| {
                    (name, model.ino_of[&node.id], if node.dir { FT_DIR } else { FT_REG_FILE })
                })
                .collect();
            prop_assert_eq!(&entries, &want, "directory {:?}", dir);
            for (name, ino, ftype) in want {
                let path = dir.clone();
                let found = run(env, fs, |fs| async move {
                    let dir_ino = resolve(&fs, &path).await?;
                    lookup(&fs, dir_ino, &name).await
                });
                prop_assert_eq!(found, Ok(Some((ino, ftype))));
            }
        }
        for (id, &nlink) in &model.nlink {
            let ino = model.ino_of[id];
            match fs.inodes.get(ino) {
                None => prop_assert_eq!(nlink, 0, "inode {} is gone", ino),
                Some(inode) if inode.is_dir() => prop_assert_eq!((inode.item.nlink, nlink), (1, 1)),
                Some(inode) => prop_assert_eq!(inode.item.nlink, nlink, "inode {}", ino),
            }
        }
        Ok(())
    }

    fn apply(env: &TestEnv, fs: &Rc<FsInfo>, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
        let (want, got) = match *op {
            Op::Create(d, n) | Op::Mkdir(d, n) => {
                let dir = matches!(op, Op::Mkdir(..));
                let want = model.create(DIRS[d], NAMES[n], dir);
                let got = run(env, fs, |fs| async move {
                    let parent = resolve(&fs, DIRS[d]).await?;
                    if dir { mkdir(&fs, parent, NAMES[n]).await } else { create(&fs, parent, NAMES[n]).await }
                });
                if let (Ok(id), Ok(ino)) = (&want, &got) {
                    model.ino_of.insert(*id, *ino);
                }
                (want.map(|_| ()), got.map(|_| ()))
            }
            Op::Unlink(d, n) | Op::Rmdir(d, n) => {
                let is_rmdir = matches!(op, Op::Rmdir(..));
                let want = model.remove(DIRS[d], NAMES[n], is_rmdir);
                let got = run(env, fs, |fs| async move {
                    let parent = resolve(&fs, DIRS[d]).await?;
                    if is_rmdir {
                        rmdir(&fs, parent, NAMES[n]).await
                    } else {
                        unlink(&fs, parent, NAMES[n]).await
                    }
                });
                (want, got)
            }
            Op::Link(sd, sn, dd, dn) => {
                let want = model.link(DIRS[sd], NAMES[sn], DIRS[dd], NAMES[dn]);
                let got = run(env, fs, |fs| async move {
                    let source = resolve(&fs, &join(DIRS[sd], NAMES[sn])).await?;
                    let dir = resolve(&fs, DIRS[dd]).await?;
                    link(&fs, source, dir, NAMES[dn]).await
                });
                (want, got)
            }
            Op::Rename(sd, sn, dd, dn) => {
                let want = model.rename(DIRS[sd], NAMES[sn], DIRS[dd], NAMES[dn]);
                let got = run(env, fs, |fs| async move {
                    let from = resolve(&fs, DIRS[sd]).await?;
                    let to = resolve(&fs, DIRS[dd]).await?;
                    rename(&fs, from, NAMES[sn], to, NAMES[dn]).await
                });
                (want, got)
            }
            Op::Setattr(d, n) => {
                let want = model.resolve(&join(DIRS[d], NAMES[n])).map(|_| ());
                let got = run(env, fs, |fs| async move {
                    let ino = resolve(&fs, &join(DIRS[d], NAMES[n])).await?;
                    setattr(&fs, ino).await
                });
                (want, got)
            }
            Op::RunDelayed => {
                prop_assert_eq!(run_delayed(env, fs), Ok(()));
                prop_assert_eq!(fs.inodes.delayed.items(), 0);
                return Ok(());
            }
        };
        prop_assert_eq!(got.map_err(|e| e.errno()), want, "{:?}", op);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_operations_match_the_namespace_model(ops in prop::collection::vec(op_strategy(), 1..64)) {
            let (env, fs) = mount();
            let mut model = Model::default();
            for op in &ops {
                apply(&env, &fs, &mut model, op)?;
            }
            compare(&env, &fs, &model)?;
            prop_assert_eq!(fs.trans.fs_error.get(), None);
            prop_assert_eq!(run_delayed(&env, &fs), Ok(()));
            compare(&env, &fs, &model)?;
            // The tree alone says the same (btrfs check's namespace view).
            let namespace = tree_namespace(&fs_tree_items(&env, &fs)).map_err(TestCaseError::fail)?;
            let want: BTreeMap<String, (bool, u64)> = model
                .entries
                .iter()
                .map(|(path, node)| (format!("/{path}"), (node.dir, model.ino_of[&node.id])))
                .collect();
            prop_assert_eq!(&namespace, &want);
            // Committed and mounted again, the filesystem has it all.
            prop_assert_eq!(run(&env, &fs, |fs| async move { crate::transaction::sync(&fs).await }), Ok(()));
            let dyn_env: Rc<dyn crate::env::Env> = env.clone();
            let remounted = env.run(crate::disk_io::open_ctree(dyn_env, crate::fix::FixPolicy::None));
            let remounted = remounted.map_err(|e| TestCaseError::fail(format!("mount: {e}")))?;
            compare(&env, &remounted, &model)?;
            prop_assert_eq!(tree_namespace(&fs_tree_items(&env, &remounted)), Ok(want));
        }
    }
}
