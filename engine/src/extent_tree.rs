//! Tree block allocation and freeing (kernel: extent-tree.c,
//! btrfs_alloc_tree_block and btrfs_free_tree_block).
//!
//! Also the running half of delayed refs (kernel: __btrfs_run_delayed_refs,
//! alloc_reserved_tree_block, __btrfs_free_extent): each queued change of a
//! tree block inserts or deletes its METADATA_ITEM in the extent tree.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::accessors::{NewBlockHeader, init_tree_block};
use crate::accessors::{
    header_backref_rev, header_level, header_nritems, item_data, item_key, node_blockptr, node_key,
    node_ptr_generation,
};
use crate::block_group::type_flags;
use crate::block_rsv::{BlockRsv, BlockRsvType, RsvUse, unuse_block_rsv, use_block_rsv};
use crate::ctree::{Path, Root, del_items, insert_item, search_slot};
use crate::delayed_ref::{DataRef, DataRefHead, DataRefKey, Head, RefHead, TreeRef};
use crate::env::{Violation, WaitOn};
use crate::error::Error;
use crate::extent_io::read_tree_block_verified;
use crate::extent_io::{
    ExtentBuffer, alloc_extent_buffer, clear_extent_buffer_dirty, free_extent_buffer_stale,
    set_extent_buffer_uptodate,
};
use crate::format::{
    BLOCK_FLAG_FULL_BACKREF, BLOCK_GROUP_DATA, BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM, CHUNK_TREE_OBJECTID,
    EXTENT_DATA_KEY, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK, EXTENT_ITEM_KEY, EXTENT_TREE_OBJECTID,
    ExtentDataRef, ExtentItem, FileExtentBody, FileExtentItem, HEADER_FLAG_WRITTEN, InlineRef, Key,
    METADATA_ITEM_KEY, MIXED_BACKREF_REV, ROOT_TREE_OBJECTID, TREE_LOG_OBJECTID, TREE_RELOC_OBJECTID,
};
use crate::fs::FsInfo;
use crate::locking::{tree_lock, tree_unlock};
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
    alloc_tree_block_for(handle, root, level, None).await
}

/// [`alloc_tree_block`] naming the block that will point at the new one
/// (None: the new block is the tree's root). A relocation tree references
/// its blocks by parent, with FULL_BACKREF, and its root block by itself
/// (alloc_reserved_tree_block's `parent = ins.objectid`); only COW and
/// `copy_root` allocate in one (relocation never inserts into it).
pub async fn alloc_tree_block_for(
    handle: &TransHandle,
    root: &Root,
    level: u8,
    parent: Option<u64>,
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
        // Log blocks are not in the extent tree. Their write errors are
        // the log's (`buf->log_index = log_transid % 2`; one log
        // transaction here), never the commit's.
        eb.log_index.set(0);
        fs.log.block_allocated(bytenr);
    } else if root.objectid == TREE_RELOC_OBJECTID {
        let refs = &handle.transaction.delayed_refs;
        let key = TreeRef::Shared { parent: parent.unwrap_or(bytenr) };
        refs.add_tree_ref_mod(bytenr, level, key, 1, true, false);
        refs.set_tree_flags(bytenr, level, BLOCK_FLAG_FULL_BACKREF);
    } else {
        handle.transaction.delayed_refs.add_tree_ref(bytenr, level, root.objectid, true);
    }
    mark_buffer_dirty(handle, &eb);
    Ok(eb)
}

/// A live tree's `bytes_used` follows its allocations and frees; a tree
/// being dropped (no longer among the filesystem's roots) has no item left
/// to keep right.
fn adjust_root_bytes_used(root: &Root, delta: i64) {
    // The root and chunk trees' items live in the super block, which has
    // no bytes_used for them (they are not counted from mount either).
    if root.objectid == ROOT_TREE_OBJECTID
        || root.objectid == CHUNK_TREE_OBJECTID
        || !root.fs_info().roots.borrow().contains_key(&root.objectid)
    {
        return;
    }
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

/// `root` no longer references `eb`, its only reference (kernel:
/// btrfs_free_tree_block with last_ref): see [`free_tree_block_ref`].
pub fn free_tree_block(handle: &TransHandle, root: &Root, eb: &ExtentBuffer) {
    free_tree_block_ref(handle, root, eb, TreeRef::Root(root.objectid), true);
}

/// `root` drops its reference `key` to `eb` (kernel: btrfs_free_tree_block).
/// If that is the last reference (`last_ref`, as update_ref_for_cow or the
/// snapshot drop found it), a block of this transaction is cleaned so it
/// is never written; if it was never written its space is free at once,
/// otherwise it stays pinned until the transaction commits. A reference
/// that is not known to be the last only queues its drop: the run that
/// takes the count to zero frees the space.
pub fn free_tree_block_ref(
    handle: &TransHandle,
    root: &Root,
    eb: &ExtentBuffer,
    key: TreeRef,
    last_ref: bool,
) {
    if !last_ref {
        drop_tree_ref(handle, root, eb.start, eb.level(), key);
        return;
    }
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    let ours = eb.generation() == handle.transid;
    if ours {
        clear_extent_buffer_dirty(eb);
        handle.transaction.dirty_ebs.borrow_mut().remove(&eb.start);
    }
    let written = eb.header_flag(HEADER_FLAG_WRITTEN) || eb.under_writeback();
    // A block of this transaction whose item a run of delayed refs already
    // inserted keeps its space until the run that deletes the item (kernel:
    // check_ref_cleanup finds no head to clean up): freed at once, it could
    // be allocated again while its item still stands.
    let log = root.objectid == TREE_LOG_OBJECTID;
    let deferred = ours && !written && !log && !handle.transaction.delayed_refs.allocated_unrun(eb.start);
    adjust_root_bytes_used(root, -(nodesize as i64));
    if log {
        fs.log.block_freed(eb.start);
    } else {
        handle.transaction.delayed_refs.add_tree_ref_mod(eb.start, eb.level(), key, -1, false, !deferred);
    }
    if deferred {
        return;
    }
    let pin = !ours || written;
    release_tree_block(handle, eb.start, tree_block_group_flags(root.objectid), pin);
    if !pin {
        free_extent_buffer_stale(fs, eb);
    }
}

/// Give a freed tree block's space back: pinned until the transaction
/// commits if it may have been written (a crash must still find it), else
/// free at once.
pub(crate) fn release_tree_block(handle: &TransHandle, bytenr: u64, group_flags: u64, pin: bool) {
    let fs = &handle.fs;
    let nodesize = u64::from(fs.nodesize);
    fs.block_groups.free_extent(bytenr, nodesize, pin);
    if let Some(space_info) = fs.space.get().map(|space| space.for_flags(group_flags)) {
        space_info.update_block_group(nodesize, false);
        if !pin {
            space_info.unpin_extent(nodesize, group_is_ro(fs, bytenr));
        }
    }
    if pin {
        handle.transaction.pinned.borrow_mut().insert(bytenr, nodesize);
    }
}

/// Whether the block group holding `bytenr` is read-only: bytes freed in
/// it become `bytes_readonly`, not free space.
fn group_is_ro(fs: &FsInfo, bytenr: u64) -> bool {
    fs.block_groups.lookup(bytenr).is_some_and(|group| group.ro.get())
}

/// Queue the drop of `root`'s reference `key` to the (shared) tree block at
/// `bytenr`, not known to be its last: the block keeps its space until a
/// run of delayed refs takes its count to zero.
fn drop_tree_ref(handle: &TransHandle, root: &Root, bytenr: u64, level: u8, key: TreeRef) {
    adjust_root_bytes_used(root, -i64::from(handle.fs.nodesize));
    handle.transaction.delayed_refs.add_tree_ref_mod(bytenr, level, key, -1, false, false);
}

/// `btrfs_lookup_extent_info`: the reference count and extent flags of the
/// tree block at `bytenr`: its METADATA_ITEM (none yet: 0) plus the changes
/// queued in this transaction. Waits while another task runs its head, and
/// looks again if a head ran while it searched.
pub async fn lookup_extent_info(handle: &TransHandle, bytenr: u64, level: u8) -> Result<(u64, u64), Error> {
    let fs = &handle.fs;
    let refs = &handle.transaction.delayed_refs;
    let extent_root = fs.root(EXTENT_TREE_OBJECTID);
    let key = Key { objectid: bytenr, item_type: METADATA_ITEM_KEY, offset: u64::from(level) };
    loop {
        if refs.is_processing_head(bytenr) {
            fs.env.wait_on(WaitOn::Other("delayed ref head of a looked-up block"));
            refs.processed
                .wait_until(|| !refs.is_processing_head(bytenr) || fs.trans.fs_error.get().is_some())
                .await;
            check_fs_error(fs)?;
        }
        let done = refs.done.get();
        let mut path = Path::new();
        // Boxed: a COW looks extent info up, and the lookup searches (read-only).
        let found = Box::pin(search_slot(None, &extent_root, &key, &mut path, 0, false)).await?;
        let (mut count, mut flags) = if found {
            let item = ExtentItem::read(&path.item_data(path.slots[0]), METADATA_ITEM_KEY)
                .map_err(|e| Error::BadTreeBlock(format!("metadata item {key}: {e}")))?;
            (item.refs as i64, item.flags)
        } else {
            (0, 0)
        };
        drop(path);
        if refs.done.get() != done || refs.is_processing_head(bytenr) {
            continue;
        }
        if let Some((ref_mod, set_flags)) = refs.pending_tree(bytenr) {
            count += ref_mod;
            flags |= set_flags;
        }
        let count = u64::try_from(count).map_err(|_| {
            Error::BadTreeBlock(format!("tree block {bytenr} has {count} references counting queued changes"))
        })?;
        return Ok((count, flags));
    }
}

/// `btrfs_inc_ref` (`inc`) / `btrfs_dec_ref`: one reference more or less
/// for everything `eb` points at: its children, or the data extents of its
/// file extent items. `full_backref`: by `eb` as parent (SHARED_BLOCK_REF,
/// SHARED_DATA_REF), else by `eb`'s owner (TREE_BLOCK_REF, EXTENT_DATA_REF):
/// the tree `root` is, except for a relocation tree, whose blocks keep the
/// owner of the subvolume block they were copied from.
pub fn mod_ref(handle: &TransHandle, root: &Root, eb: &ExtentBuffer, full_backref: bool, inc: bool) {
    let refs = &handle.transaction.delayed_refs;
    let delta = if inc { 1 } else { -1 };
    let data = eb.data.borrow();
    let level = header_level(&data);
    let owner = crate::accessors::header_owner(&data);
    debug_assert!(owner == root.objectid || root.objectid == TREE_RELOC_OBJECTID || full_backref);
    for slot in 0..header_nritems(&data) as usize {
        if level > 0 {
            let key = if full_backref { TreeRef::Shared { parent: eb.start } } else { TreeRef::Root(owner) };
            refs.add_tree_ref_mod(node_blockptr(&data, slot), level - 1, key, delta, false, false);
            continue;
        }
        let key = item_key(&data, slot);
        if key.item_type != EXTENT_DATA_KEY {
            continue;
        }
        let Ok(FileExtentItem {
            body: FileExtentBody::Regular { disk_bytenr, disk_num_bytes, offset, .. },
            ..
        }) = FileExtentItem::read(item_data(&data, slot))
        else {
            continue;
        };
        if disk_bytenr == 0 {
            continue;
        }
        let data_ref = if full_backref {
            DataRef::Shared { parent: eb.start }
        } else {
            DataRef::Keyed(DataRefKey { root: owner, objectid: key.objectid, offset: key.offset - offset })
        };
        refs.add_data_ref(disk_bytenr, disk_num_bytes, data_ref, delta, false);
    }
}

/// Whether `buf` of `root` may be referenced by other trees too (kernel:
/// btrfs_block_can_be_shared): a block of a subvolume tree, not its root,
/// written no later than the subvolume's last snapshot, or a relocated one.
pub fn block_can_be_shared(root: &Root, buf: &Rc<ExtentBuffer>) -> bool {
    root.is_shareable()
        && !Rc::ptr_eq(buf, &root.node())
        && (buf.generation() <= root.root_item.borrow().last_snapshot || buf.header_flag_reloc())
}

/// `update_ref_for_cow`: before `root` replaces `buf` by its copy `cow`,
/// keep the references of whoever else shares `buf`. Shared and owned by
/// this root without FULL_BACKREF: `buf`'s children get a reference by
/// `buf` as parent and `buf` becomes FULL_BACKREF (this root keeps its
/// references, now for `cow`). Shared otherwise: `cow`'s children get a
/// reference by this root. Unshared but FULL_BACKREF: the children's
/// parent references move to this root. A relocation tree references
/// everything by parent: in it, `cow`'s children always get references by
/// `cow`, and a shared block without FULL_BACKREF also trades its
/// children's references by root for ones by itself. Returns `buf`'s
/// reference count: 1 means this root's reference is the last (the caller
/// frees the block).
pub async fn update_ref_for_cow(
    handle: &TransHandle,
    root: &Root,
    buf: &Rc<ExtentBuffer>,
    cow: &ExtentBuffer,
) -> Result<u64, Error> {
    let reloc = root.objectid == TREE_RELOC_OBJECTID;
    let (refs, flags) = if block_can_be_shared(root, buf) {
        let (refs, flags) = lookup_extent_info(handle, buf.start, buf.level()).await?;
        if refs == 0 {
            return Err(Error::BadTreeBlock(format!(
                "tree block {} of root {} has no references to COW",
                buf.start, root.objectid
            )));
        }
        (refs, flags)
    } else {
        let old_backrefs = header_backref_rev(&buf.data.borrow()) < MIXED_BACKREF_REV;
        let full = reloc || old_backrefs;
        (1, if full { BLOCK_FLAG_FULL_BACKREF } else { 0 })
    };
    let full = flags & BLOCK_FLAG_FULL_BACKREF != 0;
    if buf.owner() == TREE_RELOC_OBJECTID && !full {
        return Err(Error::BadTreeBlock(format!(
            "tree block {} of a relocation tree without FULL_BACKREF (refs {refs}, flags {flags:#x})",
            buf.start
        )));
    }
    if refs > 1 {
        if (buf.owner() == root.objectid || reloc) && !full {
            mod_ref(handle, root, buf, true, true);
            if reloc {
                mod_ref(handle, root, buf, false, false);
                mod_ref(handle, root, cow, true, true);
            }
            handle.transaction.delayed_refs.set_tree_flags(buf.start, buf.level(), BLOCK_FLAG_FULL_BACKREF);
        } else {
            mod_ref(handle, root, cow, reloc, true);
        }
        return Ok(refs);
    }
    if full {
        mod_ref(handle, root, cow, reloc, true);
        mod_ref(handle, root, buf, true, false);
    }
    Ok(1)
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
            space.for_flags(group.flags).unpin_extent(len, group.ro.get());
        }
    }
}

/// `btrfs_drop_snapshot`, the DROP_REFERENCE walk: give up every reference
/// the dead tree `root` holds. A block another tree shares (more than one
/// reference) only loses the reference by which `root` reached it and is
/// not descended into; a block only `root` references is read, its
/// children (or its data extents) are dropped the same way, then it is
/// freed. Each block is locked while its count is looked up, so that a COW
/// of it by a tree that shares it (which moves references) is seen whole.
/// References of a block with FULL_BACKREF are by parent, the others by
/// `root`. The caller has taken `root` out of the filesystem's roots.
pub async fn drop_snapshot(handle: &TransHandle, root: &Root) -> Result<(), Error> {
    enum Step {
        Visit { bytenr: u64, level: u8, generation: u64, first_key: Option<Key>, by: TreeRef },
        Free { eb: Rc<ExtentBuffer>, by: TreeRef },
    }
    let fs = &handle.fs;
    let node = root.node();
    // A relocation tree references its root block by the block itself.
    let by = if root.objectid == TREE_RELOC_OBJECTID {
        TreeRef::Shared { parent: node.start }
    } else {
        TreeRef::Root(root.objectid)
    };
    let mut stack = vec![Step::Visit {
        bytenr: node.start,
        level: node.level(),
        generation: node.generation(),
        first_key: None,
        by,
    }];
    drop(node);
    while let Some(step) = stack.pop() {
        let (bytenr, level, generation, first_key, by) = match step {
            Step::Free { eb, by } => {
                free_tree_block_ref(handle, root, &eb, by, true);
                continue;
            }
            Step::Visit { bytenr, level, generation, first_key, by } => {
                (bytenr, level, generation, first_key, by)
            }
        };
        let eb = alloc_extent_buffer(fs, bytenr).await;
        tree_lock(fs, &eb).await;
        let looked_up = lookup_extent_info(handle, bytenr, level).await;
        let (refs, flags) = match looked_up {
            Ok(info) => info,
            Err(error) => {
                tree_unlock(&eb);
                return Err(error);
            }
        };
        if refs > 1 {
            drop_tree_ref(handle, root, bytenr, level, by);
            tree_unlock(&eb);
            drop(eb);
            if root.is_subvolume() {
                // Everything below loses this root without a reference change.
                crate::qgroup::trace_subtree(handle, bytenr, level, generation, first_key).await?;
            }
            continue;
        }
        tree_unlock(&eb);
        drop(eb);
        if refs == 0 {
            return Err(Error::BadTreeBlock(format!(
                "tree block {bytenr} (level {level}) of dropped tree {} has no references",
                root.objectid
            )));
        }
        let eb = read_tree_block_verified(fs, bytenr, root.objectid, level, generation, first_key).await?;
        let full_backref = flags & BLOCK_FLAG_FULL_BACKREF != 0;
        if !full_backref && eb.owner() != root.objectid {
            // Its children's references are by its owner, which no longer
            // reaches it: no one could ever drop them.
            return Err(Error::BadTreeBlock(format!(
                "tree block {bytenr} of dropped tree {}: its only reference, owned by tree {} without FULL_BACKREF",
                root.objectid,
                eb.owner()
            )));
        }
        if level == 0 {
            mod_ref(handle, root, &eb, full_backref, false);
            free_tree_block_ref(handle, root, &eb, by, true);
            continue;
        }
        let children: Vec<(u64, u64, Key)> = {
            let data = eb.data.borrow();
            (0..header_nritems(&data) as usize)
                .map(|slot| {
                    (node_blockptr(&data, slot), node_ptr_generation(&data, slot), node_key(&data, slot))
                })
                .collect()
        };
        let child_by =
            if full_backref { TreeRef::Shared { parent: bytenr } } else { TreeRef::Root(root.objectid) };
        stack.push(Step::Free { eb, by });
        for (child, generation, key) in children.into_iter().rev() {
            stack.push(Step::Visit {
                bytenr: child,
                level: level - 1,
                generation,
                first_key: Some(key),
                by: child_by,
            });
        }
    }
    Ok(())
}

/// Run every queued reference change, and those that running them queues,
/// until the queue is empty (kernel: btrfs_run_delayed_refs(trans, 0)).
pub async fn run_delayed_refs(handle: &TransHandle) -> Result<(), Error> {
    let fs = &handle.fs;
    let refs = &handle.transaction.delayed_refs;
    // Old roots come from the extent tree as committed, before this run
    // changes it.
    crate::qgroup::resolve_old_roots(handle).await?;
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
        let bytenr = head.bytenr();
        let result = run_head(handle, head).await;
        refs.head_done(bytenr);
        result?;
    }
}

async fn run_head(handle: &TransHandle, head: Head) -> Result<(), Error> {
    match head {
        Head::Tree(head) => run_tree_head(handle, &head).await,
        Head::Data(head) => run_data_head(handle, &head).await,
    }
}

fn metadata_key(head: &RefHead) -> Key {
    Key { objectid: head.bytenr, item_type: METADATA_ITEM_KEY, offset: u64::from(head.level) }
}

/// Run the queued changes of one tree block (run_delayed_tree_ref and
/// run_delayed_extent_op): insert the skinny METADATA_ITEM of a new block
/// (an unshared one has 33 bytes: one TREE_BLOCK_REF), change its inline
/// references and flags, or delete it when no reference is left, freeing
/// the block's space if the last free did not.
async fn run_tree_head(handle: &TransHandle, head: &RefHead) -> Result<(), Error> {
    let fs = &handle.fs;
    let extent_root = fs.root(EXTENT_TREE_OBJECTID);
    let key = metadata_key(head);
    let bad = |what: String| {
        Err(Error::BadTreeBlock(format!("tree block {} (level {}): {what}", head.bytenr, head.level)))
    };
    if head.must_insert_reserved {
        // Allocated and freed in the same transaction: the extent tree never knew it.
        if head.refs.is_empty() {
            return Ok(());
        }
        if head.refs.values().any(|&count| count < 0) {
            return bad(format!("a new block drops a reference it does not have: {:?}", head.refs));
        }
        let item = tree_block_item(handle.transid, EXTENT_FLAG_TREE_BLOCK | head.set_flags, &head.refs);
        return insert_item(handle, &extent_root, &key, &item.to_bytes()).await;
    }
    if head.refs.is_empty() && head.set_flags == 0 {
        return Ok(());
    }
    let mut path = Path::new();
    if !search_slot(Some(handle), &extent_root, &key, &mut path, -1, true).await? {
        // The kernel aborts the transaction with -EUCLEAN here: the extent
        // tree has lost track of a block a tree still referenced.
        return bad(format!(
            "the extent tree has no METADATA_ITEM for its reference changes {:?}",
            head.refs
        ));
    }
    let slot = path.slots[0];
    let old = ExtentItem::read(&path.item_data(slot), METADATA_ITEM_KEY)
        .map_err(|e| Error::BadTreeBlock(format!("metadata item {key}: {e}")))?;
    let mut refs = BTreeMap::new();
    for inline in &old.inline_refs {
        let ref_key = match *inline {
            InlineRef::TreeBlock { root } => TreeRef::Root(root),
            InlineRef::SharedBlock { parent } => TreeRef::Shared { parent },
            ref other => return bad(format!("a tree block item with a {other:?} reference")),
        };
        refs.insert(ref_key, 1);
    }
    for (ref_key, &delta) in &head.refs {
        let count = refs.entry(*ref_key).or_insert(0);
        *count += delta;
        if !(0..=1).contains(count) {
            return bad(format!("reference {ref_key:?} would count {count}"));
        }
        if *count == 0 {
            refs.remove(ref_key);
        }
    }
    if refs.is_empty() {
        del_items(handle, &extent_root, &mut path, slot, 1).await?;
        drop(path);
        if !head.space_freed {
            // Its last reference went with a drop that did not know it was the last.
            release_tree_block(handle, head.bytenr, BLOCK_GROUP_METADATA, true);
        }
        return Ok(());
    }
    if head.space_freed {
        return bad(format!("freed as its last reference, but {refs:?} remain"));
    }
    let item = tree_block_item(old.generation, old.flags | head.set_flags, &refs);
    rewrite_extent_item(handle, path, &key, old.encoded_len(), &item.to_bytes()).await
}

/// Replace the extent item at the path's slot by `bytes`: in place if its
/// size is unchanged, else (a reference came or went) deleted and inserted.
async fn rewrite_extent_item(
    handle: &TransHandle,
    mut path: Path,
    key: &Key,
    old_len: usize,
    bytes: &[u8],
) -> Result<(), Error> {
    let slot = path.slots[0];
    if bytes.len() == old_len {
        let leaf = path.leaf().clone();
        crate::accessors::item_data_mut(&mut leaf.data.borrow_mut(), slot).copy_from_slice(bytes);
        mark_buffer_dirty(handle, &leaf);
        return Ok(());
    }
    let extent_root = handle.fs.root(EXTENT_TREE_OBJECTID);
    del_items(handle, &extent_root, &mut path, slot, 1).await?;
    drop(path);
    insert_item(handle, &extent_root, key, bytes).await
}

/// A skinny METADATA_ITEM with one inline ref per reference, in the order
/// the tree checker demands (TREE_BLOCK_REFs, then SHARED_BLOCK_REFs, each
/// by decreasing root or parent).
fn tree_block_item(generation: u64, flags: u64, refs: &BTreeMap<TreeRef, i64>) -> ExtentItem {
    let mut inline: Vec<InlineRef> = refs
        .keys()
        .map(|key| match *key {
            TreeRef::Root(root) => InlineRef::TreeBlock { root },
            TreeRef::Shared { parent } => InlineRef::SharedBlock { parent },
        })
        .collect();
    inline.sort_by_key(|r| {
        let offset = match *r {
            InlineRef::TreeBlock { root } => root,
            InlineRef::SharedBlock { parent } => parent,
            _ => unreachable!("tree block refs only"),
        };
        (r.ref_type(), std::cmp::Reverse(offset))
    });
    ExtentItem { refs: inline.len() as u64, generation, flags, tree_block_info: None, inline_refs: inline }
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

/// The inline data refs of a data extent item as counts per reference.
fn data_refs_of(item: &ExtentItem) -> Result<BTreeMap<DataRef, i64>, String> {
    let mut refs = BTreeMap::new();
    for inline in &item.inline_refs {
        match *inline {
            InlineRef::ExtentData(r) => {
                let key = DataRefKey { root: r.root, objectid: r.objectid, offset: r.offset };
                *refs.entry(DataRef::Keyed(key)).or_insert(0) += i64::from(r.count);
            }
            InlineRef::SharedData { parent, count } => {
                *refs.entry(DataRef::Shared { parent }).or_insert(0) += i64::from(count);
            }
            ref other => return Err(format!("data extent with a {other:?} reference")),
        }
    }
    Ok(refs)
}

/// A data EXTENT_ITEM with one inline ref per reference, in the kernel's
/// order of inline refs: EXTENT_DATA_REFs by decreasing hash, then
/// SHARED_DATA_REFs by decreasing parent.
fn data_extent_item(generation: u64, refs: &BTreeMap<DataRef, i64>) -> ExtentItem {
    let count = |count: i64| u32::try_from(count).expect("a positive data ref count");
    let mut keyed: Vec<ExtentDataRef> = Vec::new();
    let mut shared: Vec<(u64, u32)> = Vec::new();
    for (data_ref, &n) in refs {
        match *data_ref {
            DataRef::Keyed(key) => keyed.push(ExtentDataRef {
                root: key.root,
                objectid: key.objectid,
                offset: key.offset,
                count: count(n),
            }),
            DataRef::Shared { parent } => shared.push((parent, count(n))),
        }
    }
    keyed.sort_by_key(|r| std::cmp::Reverse(r.hash()));
    shared.sort_by_key(|&(parent, _)| std::cmp::Reverse(parent));
    ExtentItem {
        refs: refs.values().sum::<i64>() as u64,
        generation,
        flags: EXTENT_FLAG_DATA,
        tree_block_info: None,
        inline_refs: keyed
            .into_iter()
            .map(InlineRef::ExtentData)
            .chain(shared.into_iter().map(|(parent, count)| InlineRef::SharedData { parent, count }))
            .collect(),
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
    rewrite_extent_item(handle, path, &key, old.encoded_len(), &item.to_bytes()).await
}
