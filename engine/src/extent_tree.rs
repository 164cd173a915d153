//! Tree block allocation and freeing (kernel: extent-tree.c,
//! btrfs_alloc_tree_block and btrfs_free_tree_block).
//!
//! Status: allocation from metadata/system block groups, the model's
//! pinning rule on free, and the per-handle charge the reservation oracle
//! reads. Delayed refs (the extent tree's METADATA_ITEMs) are queued by
//! `delayed_ref.rs` once it exists; reserve selection by `block_rsv.rs`.

use std::rc::Rc;

use crate::accessors::{NewBlockHeader, init_tree_block};
use crate::block_group::type_flags;
use crate::ctree::Root;
use crate::error::Error;
use crate::extent_io::{
    ExtentBuffer, alloc_extent_buffer, clear_extent_buffer_dirty, free_extent_buffer_stale,
    set_extent_buffer_uptodate,
};
use crate::format::{BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM, CHUNK_TREE_OBJECTID, HEADER_FLAG_WRITTEN};
use crate::fs::FsInfo;
use crate::locking::{tree_lock, tree_unlock};
use crate::transaction::{TransHandle, mark_buffer_dirty};

/// Which block group type holds a tree's blocks.
pub fn tree_block_group_flags(root_objectid: u64) -> u64 {
    if root_objectid == CHUNK_TREE_OBJECTID { BLOCK_GROUP_SYSTEM } else { BLOCK_GROUP_METADATA }
}

/// Allocate, lock and initialise a new tree block for `root` at `level`
/// (kernel: btrfs_alloc_tree_block). Charges one nodesize to the handle.
/// The block is returned write-locked, up to date and dirty in the
/// transaction.
pub async fn alloc_tree_block(
    handle: &TransHandle,
    root: &Root,
    level: u8,
) -> Result<Rc<ExtentBuffer>, Error> {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    let flags = tree_block_group_flags(root.objectid);
    debug_assert_eq!(type_flags(flags), flags);
    let bytenr = fs.block_groups.find_free_extent(flags, nodesize, nodesize).ok_or(Error::Enospc)?;
    charge_tree_block(handle, root);
    let eb = alloc_extent_buffer(fs, bytenr).await;
    tree_lock(fs, &eb).await;
    assert!(!eb.dirty() && !eb.under_writeback(), "new tree block {bytenr} is still busy in the cache");
    init_tree_block(
        &mut eb.data.borrow_mut(),
        &NewBlockHeader {
            bytenr,
            generation: handle.transid,
            owner: root.objectid,
            level,
            fsid: fs.fsid.get().unwrap_or_default(),
            chunk_tree_uuid: Default::default(),
        },
    );
    set_extent_buffer_uptodate(&eb);
    mark_buffer_dirty(handle, &eb);
    Ok(eb)
}

/// Count the block against the handle (the reservation oracle's input).
fn charge_tree_block(handle: &TransHandle, root: &Root) {
    if root.is_subvolume() {
        handle.bytes_used.set(handle.bytes_used.get() + u64::from(handle.fs.nodesize));
    }
}

/// `root` no longer references `eb` (kernel: btrfs_free_tree_block). A block
/// of this transaction is cleaned so it is never written; if it was never
/// written its space is free at once, otherwise it stays pinned until the
/// transaction commits.
pub fn free_tree_block(handle: &TransHandle, eb: &ExtentBuffer) {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    let ours = eb.generation() == handle.transid;
    if ours {
        clear_extent_buffer_dirty(eb);
        handle.transaction.dirty_ebs.borrow_mut().remove(&eb.start);
    }
    let pin = !ours || eb.header_flag(HEADER_FLAG_WRITTEN) || eb.under_writeback();
    fs.block_groups.free_extent(eb.start, nodesize, pin);
    if pin {
        handle.transaction.pinned.borrow_mut().insert(eb.start, nodesize);
    } else {
        free_extent_buffer_stale(fs, eb);
    }
}

/// Unlock helper used by callers that allocate and then give up.
pub fn unlock_new_block(eb: &ExtentBuffer) {
    tree_unlock(eb);
}

/// Unpin everything a committed transaction pinned (kernel: unpin_extent_range).
pub fn unpin_extents(fs: &FsInfo, pinned: &std::collections::BTreeMap<u64, u64>) {
    for (&bytenr, &len) in pinned {
        fs.block_groups.unpin(bytenr, len);
    }
}
