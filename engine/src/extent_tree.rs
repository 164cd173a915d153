//! Tree block allocation and freeing (kernel: extent-tree.c,
//! btrfs_alloc_tree_block and btrfs_free_tree_block).
//!
//! Also the running half of delayed refs (kernel: __btrfs_run_delayed_refs,
//! alloc_reserved_tree_block, __btrfs_free_extent): each queued change of a
//! tree block inserts or deletes its METADATA_ITEM in the extent tree.

use std::rc::Rc;

use crate::accessors::{NewBlockHeader, init_tree_block};
use crate::block_group::type_flags;
use crate::block_rsv::{BlockRsv, BlockRsvType, RsvUse, unuse_block_rsv, use_block_rsv};
use crate::ctree::{Path, Root, del_items, insert_item, search_slot};
use crate::delayed_ref::{DataRefHead, DataRefKey, Head, RefHead};
use crate::env::{Violation, WaitOn};
use crate::error::Error;
use crate::extent_io::{
    ExtentBuffer, alloc_extent_buffer, clear_extent_buffer_dirty, free_extent_buffer_stale,
    set_extent_buffer_uptodate,
};
use crate::format::{
    BLOCK_GROUP_DATA, BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM, CHUNK_TREE_OBJECTID, EXTENT_FLAG_DATA,
    EXTENT_FLAG_TREE_BLOCK, EXTENT_ITEM_KEY, EXTENT_TREE_OBJECTID, ExtentDataRef, ExtentItem,
    HEADER_FLAG_WRITTEN, InlineRef, Key, METADATA_ITEM_KEY, TREE_LOG_OBJECTID,
};
use crate::fs::FsInfo;
use crate::locking::tree_lock;
use crate::transaction::{TransHandle, check_fs_error, check_reservation, mark_buffer_dirty};

/// Which block group type holds a tree's blocks.
pub fn tree_block_group_flags(root_objectid: u64) -> u64 {
    if root_objectid == CHUNK_TREE_OBJECTID { BLOCK_GROUP_SYSTEM } else { BLOCK_GROUP_METADATA }
}

/// Allocate, lock and initialise a new tree block for `root` at `level`
/// (kernel: btrfs_alloc_tree_block). The block's bytes come out of the
/// reserve `use_block_rsv` picks for the tree. The block is returned
/// write-locked, up to date and dirty in the transaction.
///
/// Departure: the space info counts the block as used at once (the kernel
/// moves it from reserved to used when its delayed ref runs).
pub async fn alloc_tree_block(
    handle: &TransHandle,
    root: &Root,
    level: u8,
) -> Result<Rc<ExtentBuffer>, Error> {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    let flags = tree_block_group_flags(root.objectid);
    debug_assert_eq!(type_flags(flags), flags);
    charge_tree_block(handle, root)?;
    let Some(bytenr) = fs.block_groups.find_free_extent(flags, nodesize, nodesize) else {
        uncharge_tree_block(handle, root);
        return Err(Error::Enospc);
    };
    if let Some(space) = fs.space.get() {
        let space_info = space.for_flags(flags);
        space_info.add_reserved_bytes(nodesize, nodesize);
        space_info.update_block_group(nodesize, true);
    }
    adjust_root_bytes_used(root, nodesize as i64);
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
    if root.objectid == TREE_LOG_OBJECTID {
        // Log blocks are not in the extent tree.
        fs.log.block_allocated(bytenr);
    } else {
        handle.transaction.delayed_refs.add_tree_ref(bytenr, level, root.objectid, true);
    }
    mark_buffer_dirty(handle, &eb);
    Ok(eb)
}

fn adjust_root_bytes_used(root: &Root, delta: i64) {
    let mut item = root.root_item.borrow_mut();
    item.bytes_used = item.bytes_used.checked_add_signed(delta).expect("root bytes_used underflow");
}

/// The handle's reserve for this tree, if the filesystem accounts space.
fn trans_rsv<'a>(handle: &TransHandle, space: &'a crate::fs::Space) -> Option<&'a BlockRsv> {
    handle.block_rsv.get().map(|kind| match kind {
        BlockRsvType::DelayedItems => &*space.rsvs.delayed_block_rsv,
        BlockRsvType::Trans => &*space.rsvs.trans_block_rsv,
        other => panic!("a handle does not charge the {other:?} reserve"),
    })
}

/// Take one nodesize from the reserve the kernel would use for this tree
/// (btrfs_use_block_rsv), and count subvolume blocks against the handle:
/// the reservation oracle's input.
fn charge_tree_block(handle: &TransHandle, root: &Root) -> Result<(), Error> {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    if root.is_subvolume() {
        handle.bytes_used.set(handle.bytes_used.get() + nodesize);
    }
    let Some(space) = fs.space.get() else { return Ok(()) };
    if root.is_subvolume() {
        check_reservation(handle);
    }
    let charge = use_block_rsv(&space.rsvs, trans_rsv(handle, space), false, root.objectid, nodesize)?;
    let overdrawn = matches!(charge.path, RsvUse::FromGlobal | RsvUse::FromEmergency);
    if charge.chosen == BlockRsvType::Trans && overdrawn {
        fs.env.report_violation(Violation {
            kind: "trans_rsv_overdrawn",
            message: format!(
                "the shared transaction reserve was empty: handle {} ({}) took a block of tree {} from the {:?} path; {}",
                handle.id, handle.op, root.objectid, charge.path, handle.search.get()
            ),
        });
    }
    let path = match charge.path {
        RsvUse::FromRsv => "from_rsv",
        RsvUse::FromNewReservation => "new_reservation",
        RsvUse::FromGlobal => "from_global",
        RsvUse::FromEmergency => "emergency",
    };
    *handle.rsv_paths.borrow_mut().entry(path).or_default() += 1;
    Ok(())
}

fn uncharge_tree_block(handle: &TransHandle, root: &Root) {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    if root.is_subvolume() {
        handle.bytes_used.set(handle.bytes_used.get() - nodesize);
    }
    if let Some(space) = fs.space.get() {
        let rsv = space.rsvs.get_block_rsv(trans_rsv(handle, space), false, root.objectid);
        unuse_block_rsv(&space.rsvs, rsv, nodesize);
    }
}

/// `root` no longer references `eb` (kernel: btrfs_free_tree_block). A block
/// of this transaction is cleaned so it is never written; if it was never
/// written its space is free at once, otherwise it stays pinned until the
/// transaction commits.
pub fn free_tree_block(handle: &TransHandle, root: &Root, eb: &ExtentBuffer) {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    let ours = eb.generation() == handle.transid;
    if ours {
        clear_extent_buffer_dirty(eb);
        handle.transaction.dirty_ebs.borrow_mut().remove(&eb.start);
    }
    if root.objectid == TREE_LOG_OBJECTID {
        fs.log.block_freed(eb.start);
    } else {
        handle.transaction.delayed_refs.add_tree_ref(eb.start, eb.level(), root.objectid, false);
    }
    let pin = !ours || eb.header_flag(HEADER_FLAG_WRITTEN) || eb.under_writeback();
    fs.block_groups.free_extent(eb.start, nodesize, pin);
    adjust_root_bytes_used(root, -(nodesize as i64));
    let space_info = fs.space.get().map(|space| space.for_flags(tree_block_group_flags(root.objectid)));
    if let Some(space_info) = space_info {
        space_info.update_block_group(nodesize, false);
    }
    if pin {
        handle.transaction.pinned.borrow_mut().insert(eb.start, nodesize);
    } else {
        if let Some(space_info) = space_info {
            space_info.unpin_extent(nodesize, false);
        }
        free_extent_buffer_stale(fs, eb);
    }
}

/// `btrfs_pin_extent_for_log_replay`: a block of the log being replayed
/// is not in the extent tree, so mount counted it free; it stays pinned
/// until the replay commits, so that replay's own allocations cannot
/// overwrite the log.
pub fn pin_extent_for_log_replay(handle: &TransHandle, bytenr: u64, len: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    let group = fs.block_groups.lookup(bytenr).filter(|g| g.is_free(bytenr, len)).ok_or_else(|| {
        Error::BadTreeBlock(format!("log tree block {bytenr} is not in free space of a block group"))
    })?;
    group.exclude(bytenr, len);
    group.pinned.set(group.pinned.get() + len);
    if let Some(space) = fs.space.get() {
        space.for_flags(group.flags).update_bytes_pinned(len as i64);
    }
    handle.transaction.pinned.borrow_mut().insert(bytenr, len);
    Ok(())
}

/// `btrfs_exclude_logged_extents`: a data extent a replayed log names that
/// the extent tree lacks (written after the last commit) is taken out of
/// free space as reserved; its item is inserted when its delayed ref runs.
pub fn exclude_logged_extent(fs: &FsInfo, bytenr: u64, num_bytes: u64) -> Result<(), Error> {
    let group = fs.block_groups.lookup(bytenr).filter(|g| g.is_free(bytenr, num_bytes)).ok_or_else(|| {
        Error::BadTreeBlock(format!("logged data extent {bytenr}+{num_bytes} is not in free space"))
    })?;
    group.exclude(bytenr, num_bytes);
    if let Some(space) = fs.space.get() {
        space.data.update_bytes_may_use(num_bytes as i64);
        space.data.add_reserved_bytes(num_bytes, num_bytes);
    }
    Ok(())
}

/// Unpin everything a committed transaction pinned (kernel: unpin_extent_range).
pub fn unpin_extents(fs: &FsInfo, pinned: &std::collections::BTreeMap<u64, u64>) {
    for (&bytenr, &len) in pinned {
        let group = fs.block_groups.lookup(bytenr).expect("pinned extent lies in a block group");
        fs.block_groups.unpin(bytenr, len);
        if let Some(space) = fs.space.get() {
            space.for_flags(group.flags).unpin_extent(len, false);
        }
    }
}

/// Run every queued reference change, and those that running them queues,
/// until the queue is empty (kernel: btrfs_run_delayed_refs(trans, 0)).
pub async fn run_delayed_refs(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let refs = &handle.transaction.delayed_refs;
    loop {
        let Some(head) = refs.select_head() else {
            if !refs.is_processing() {
                return Ok(());
            }
            // Other tasks are running heads; theirs may queue more.
            fs.env.wait_on(WaitOn::Other("delayed ref heads of other runners"));
            refs.processed.wait_until(|| !refs.is_processing() || fs.trans.fs_error.get().is_some()).await;
            check_fs_error(fs)?;
            continue;
        };
        refs.run.set(refs.run.get() + 1);
        let bytenr = head.bytenr();
        let result = run_head(handle, head).await;
        refs.head_done(bytenr);
        result?;
    }
}

async fn run_head(handle: &TransHandle, head: Head) -> Result<(), Error> {
    let head = match head {
        Head::Tree(head) => head,
        Head::Data(head) => return run_data_head(handle, &head).await,
    };
    match head.ref_mod {
        1 if head.must_insert_reserved => alloc_reserved_tree_block(handle, &head).await,
        -1 if !head.must_insert_reserved => free_tree_block_item(handle, &head).await,
        // Allocated and freed in the same transaction: the extent tree never knew it.
        0 => Ok(()),
        _ => panic!("inconsistent delayed ref head {head:?}"),
    }
}

fn metadata_key(head: &RefHead) -> Key {
    Key { objectid: head.bytenr, item_type: METADATA_ITEM_KEY, offset: u64::from(head.level) }
}

/// Insert the skinny METADATA_ITEM of a new tree block with its one inline
/// TREE_BLOCK_REF (33 bytes).
async fn alloc_reserved_tree_block(handle: &TransHandle, head: &RefHead) -> Result<(), Error> {
    let extent_root = handle.fs.root(EXTENT_TREE_OBJECTID);
    let item = ExtentItem::tree_block(handle.transid, head.root);
    debug_assert_eq!(item.flags, EXTENT_FLAG_TREE_BLOCK);
    insert_item(handle, &extent_root, &metadata_key(head), &item.to_bytes()).await
}

/// Delete the METADATA_ITEM of a tree block no longer referenced.
async fn free_tree_block_item(handle: &TransHandle, head: &RefHead) -> Result<(), Error> {
    let extent_root = handle.fs.root(EXTENT_TREE_OBJECTID);
    let mut path = Path::new();
    let found = search_slot(Some(handle), &extent_root, &metadata_key(head), &mut path, -1, true).await?;
    if !found {
        // The kernel aborts the transaction with -EUCLEAN here: the extent
        // tree has lost track of a block a tree still referenced.
        return Err(Error::BadTreeBlock(format!(
            "extent tree has no METADATA_ITEM for freed tree block {} (level {}, root {})",
            head.bytenr, head.level, head.root
        )));
    }
    let slot = path.slots[0];
    del_items(handle, &extent_root, &mut path, slot, 1).await
}

// ---------------------------------------------------------------------------
// Data extents.

/// `btrfs_reserve_extent` for data at writeback: `num_bytes` from a data
/// block group, allocating a data chunk when every group is full. The
/// bytes the writer reserved (`bytes_may_use`) become reserved; they count
/// as used (in the space info and the block group item) only when the
/// extent's item is inserted (`alloc_reserved_file_extent`), so that a
/// commit while the write is in flight records no extent it lacks. None
/// when the device has no room for it in one piece.
pub fn reserve_data_extent(fs: &FsInfo, num_bytes: u64) -> Option<u64> {
    let sector = u64::from(fs.sectorsize);
    let bytenr = fs.block_groups.find_free_extent(BLOCK_GROUP_DATA, num_bytes, sector).or_else(|| {
        crate::volumes::create_chunk(fs, BLOCK_GROUP_DATA).ok()?;
        fs.block_groups.find_free_extent(BLOCK_GROUP_DATA, num_bytes, sector)
    })?;
    let group = fs.block_groups.lookup(bytenr).expect("an allocated extent lies in a block group");
    group.used.set(group.used.get() - num_bytes);
    if let Some(space) = fs.space.get() {
        space.data.add_reserved_bytes(num_bytes, num_bytes);
    }
    Some(bytenr)
}

/// A reserved data extent gets its item: reserved → used
/// (`btrfs_update_block_group` from `alloc_reserved_file_extent`).
fn account_data_extent_used(fs: &FsInfo, bytenr: u64, num_bytes: u64) {
    let group = fs.block_groups.lookup(bytenr).expect("a data extent lies in a block group");
    group.used.set(group.used.get() + num_bytes);
    if let Some(space) = fs.space.get() {
        space.data.update_block_group(num_bytes, true);
    }
}

/// An extent [`reserve_data_extent`] gave that no file extent will ever
/// name (its write failed): its space is free again at once.
pub fn free_unused_data_extent(fs: &FsInfo, bytenr: u64, num_bytes: u64) {
    account_data_extent_used(fs, bytenr, num_bytes);
    fs.block_groups.free_extent(bytenr, num_bytes, false);
    if let Some(space) = fs.space.get() {
        space.data.update_block_group(num_bytes, false);
        space.data.unpin_extent(num_bytes, false);
    }
}

/// A data extent nothing references any more (`__btrfs_free_extent` of
/// the last data ref, and the pinning of a reserved extent dropped before
/// its item existed): its checksums go and its space stays pinned until the
/// transaction commits.
async fn free_data_extent(handle: &TransHandle, bytenr: u64, num_bytes: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    crate::file_item::del_csums(handle, bytenr, num_bytes).await?;
    fs.block_groups.free_extent(bytenr, num_bytes, true);
    if let Some(space) = fs.space.get() {
        space.data.update_block_group(num_bytes, false);
    }
    handle.transaction.pinned.borrow_mut().insert(bytenr, num_bytes);
    Ok(())
}

fn data_extent_key(head: &DataRefHead) -> Key {
    Key::new(head.bytenr, EXTENT_ITEM_KEY, head.num_bytes)
}

/// The inline EXTENT_DATA_REFs of a data extent item as counts per key.
fn data_refs_of(item: &ExtentItem) -> Result<std::collections::BTreeMap<DataRefKey, i64>, String> {
    let mut refs = std::collections::BTreeMap::new();
    for inline in &item.inline_refs {
        match inline {
            InlineRef::ExtentData(r) => {
                let key = DataRefKey { root: r.root, objectid: r.objectid, offset: r.offset };
                *refs.entry(key).or_insert(0) += i64::from(r.count);
            }
            other => return Err(format!("data extent with a {other:?} reference")),
        }
    }
    Ok(refs)
}

/// A data EXTENT_ITEM with one inline EXTENT_DATA_REF per key, in the
/// kernel's order of inline refs (by type, then by the ref's hash).
fn data_extent_item(generation: u64, refs: &std::collections::BTreeMap<DataRefKey, i64>) -> ExtentItem {
    let mut inline: Vec<ExtentDataRef> = refs
        .iter()
        .map(|(key, &count)| ExtentDataRef {
            root: key.root,
            objectid: key.objectid,
            offset: key.offset,
            count: u32::try_from(count).expect("a positive data ref count"),
        })
        .collect();
    inline.sort_by_key(|r| std::cmp::Reverse(r.hash()));
    ExtentItem {
        refs: refs.values().sum::<i64>() as u64,
        generation,
        flags: EXTENT_FLAG_DATA,
        tree_block_info: None,
        inline_refs: inline.into_iter().map(InlineRef::ExtentData).collect(),
    }
}

/// Run the queued changes of one data extent (`run_delayed_data_ref`):
/// insert its EXTENT_ITEM if it is new, change the counts of its inline
/// refs, or delete it and free the extent when no reference is left.
async fn run_data_head(handle: &TransHandle, head: &DataRefHead) -> Result<(), Error> {
    let fs = &handle.fs;
    let extent_root = fs.root(EXTENT_TREE_OBJECTID);
    let key = data_extent_key(head);
    if head.must_insert_reserved {
        if head.refs.values().any(|&count| count < 0) {
            panic!("new data extent {} with a negative ref change {:?}", head.bytenr, head.refs);
        }
        account_data_extent_used(fs, head.bytenr, head.num_bytes);
        if head.refs.is_empty() {
            return free_data_extent(handle, head.bytenr, head.num_bytes).await;
        }
        let item = data_extent_item(handle.transid, &head.refs);
        return insert_item(handle, &extent_root, &key, &item.to_bytes()).await;
    }
    if head.refs.is_empty() {
        return Ok(());
    }
    let mut path = Path::new();
    if !search_slot(Some(handle), &extent_root, &key, &mut path, -1, true).await? {
        return Err(Error::BadTreeBlock(format!(
            "extent tree has no EXTENT_ITEM for data extent {}+{} whose references change",
            head.bytenr, head.num_bytes
        )));
    }
    let slot = path.slots[0];
    let old = ExtentItem::read(&path.item_data(slot), EXTENT_ITEM_KEY)
        .map_err(|e| Error::BadTreeBlock(format!("data extent item {key}: {e}")))?;
    let mut refs = data_refs_of(&old).map_err(Error::BadTreeBlock)?;
    for (ref_key, &delta) in &head.refs {
        let count = refs.entry(*ref_key).or_insert(0);
        *count += delta;
        if *count < 0 {
            return Err(Error::BadTreeBlock(format!(
                "data extent {} dropped a reference {ref_key:?} it does not have",
                head.bytenr
            )));
        }
        if *count == 0 {
            refs.remove(ref_key);
        }
    }
    if refs.is_empty() {
        del_items(handle, &extent_root, &mut path, slot, 1).await?;
        drop(path);
        return free_data_extent(handle, head.bytenr, head.num_bytes).await;
    }
    let item = data_extent_item(old.generation, &refs);
    let bytes = item.to_bytes();
    if bytes.len() == old.encoded_len() {
        let leaf = path.leaf().clone();
        crate::accessors::item_data_mut(&mut leaf.data.borrow_mut(), slot).copy_from_slice(&bytes);
        mark_buffer_dirty(handle, &leaf);
        return Ok(());
    }
    // A reference key came or went: the item changes size.
    del_items(handle, &extent_root, &mut path, slot, 1).await?;
    drop(path);
    insert_item(handle, &extent_root, &key, &bytes).await
}
