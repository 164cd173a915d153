//! Relocation of a metadata block group: balance moves every tree block
//! out of it (kernel: relocation.c, `btrfs_relocate_block_group`;
//! block-group.c `btrfs_inc_block_group_ro`).
//!
//! The group is made read-only, so that nothing new lands in it. Then, in
//! stages until the extent tree names no block in it:
//! 1. Blocks of trees that share nothing (extent, csum, root, dev trees)
//!    are moved by COWing the path to them in their own tree.
//! 2. Subvolume blocks may be shared by several trees, so they are moved
//!    through relocation trees. A commit gives every subvolume one
//!    (`create_reloc_roots`): a copy of its root, owned by
//!    `TREE_RELOC_OBJECTID` with the subvolume's id as key offset, sharing
//!    every other block with it. Each subvolume block found in the group is
//!    COWed in the relocation trees that reach it (once; the other trees'
//!    parents are pointed at the copy). Every block a relocation tree COWs
//!    carries the RELOC header flag and is referenced by parent
//!    (FULL_BACKREF).
//! 3. `replace_path` swaps each moved subtree into its subvolume: at the
//!    highest level where the relocation tree points at a new block and
//!    the subvolume still at the old one, the two pointers trade places.
//!    The subvolume now holds RELOC blocks of the running transaction, and
//!    `should_cow_block` COWs them before any change in place: their
//!    children are referenced by parent, which a change by the subvolume
//!    would not keep right.
//! 4. The relocation trees are dropped (`drop_snapshot`), freeing the old
//!    blocks they took in the swap; the commit gives their space back.
//!
//! Departures: data and system block groups are not relocated (EINVAL);
//! the emptied group is made writable again rather than removed with its
//! chunk; a block shared through a shared parent is moved once, but each
//! subvolume gets its own copy of the parents above it (the kernel's
//! backref cache keeps them shared); a relocation tree left by a crash is
//! dropped at mount (the kernel merges it, `btrfs_recover_relocation`),
//! which is sound because every step keeps the references exact; one
//! relocation runs at a time, and snapshot deletion waits for it (the
//! kernel's cleaner_mutex).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::accessors::{
    node_blockptr, node_key, node_ptr_generation, set_node_blockptr, set_node_ptr_generation,
};
use crate::block_group::{BlockGroup, type_flags};
use crate::ctree::{Path, Root, cow_block, del_items, insert_item, next_item, search_slot};
use crate::delayed_ref::TreeRef;
use crate::env::{TraceEvent, WaitOn};
use crate::error::Error;
use crate::extent_io::read_tree_block;
use crate::format::{
    BLOCK_GROUP_METADATA, EXTENT_TREE_OBJECTID, FixedItem, Key, METADATA_ITEM_KEY, ROOT_ITEM_KEY,
    ROOT_SUBVOL_RDONLY, ROOT_TREE_OBJECTID, TREE_RELOC_OBJECTID, is_fstree,
};
use crate::fs::FsInfo;
use crate::locking::{tree_lock, tree_unlock};
use crate::transaction::{
    TransHandle, abort_transaction, check_fs_error, commit_transaction, cow_source_root, end_transaction,
    join_transaction, mark_buffer_dirty, root_from_copy, start_transaction,
};
use crate::wait::WaitQueue;

/// Blocks one transaction handle moves or swaps. The handle reserves one
/// item (a full path, both ways) per block, as the kernel refills its
/// relocation reserve per block.
const BLOCKS_PER_HANDLE: usize = 16;

/// Stages of one relocation before it is given up: each stage commits, so
/// a stage that finds exactly the blocks the last one found made no
/// progress, and that ends it at once.
const MAX_STAGES: u32 = 32;

/// Relocation state of a filesystem (the kernel's `fs_info->reloc_ctl`
/// and each root's `reloc_root`).
#[derive(Default)]
pub struct RelocControl {
    /// The relocation tree of each subvolume, by subvolume id.
    pub roots: RefCell<BTreeMap<u64, Rc<Root>>>,
    /// The next commit makes a relocation tree for every subvolume.
    create_pending: Cell<bool>,
    /// A relocation or a snapshot drop runs (the kernel's cleaner_mutex).
    busy: Cell<bool>,
    wait: WaitQueue,
    pub stats: RefCell<RelocStats>,
}

/// What relocation did since mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelocStats {
    /// Block groups emptied.
    pub block_groups: u64,
    /// Tree blocks moved: COWed in their own tree or in a relocation tree.
    pub blocks_moved: u64,
    /// Relocation trees that pointed at a block another one had moved.
    pub blocks_repointed: u64,
    /// Subtrees swapped into their subvolume by `replace_path`.
    pub swaps: u64,
    /// Relocation trees made.
    pub reloc_trees: u64,
}

/// Held while a relocation or a snapshot drop runs.
pub(crate) struct CleanerGuard<'a>(&'a RelocControl);

impl Drop for CleanerGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        self.0.wait.wake_all();
    }
}

/// Take the cleaner lock: relocation and snapshot deletion exclude each
/// other (a swap into a tree being dropped would lose references).
pub(crate) async fn lock_cleaner(fs: &FsInfo) -> CleanerGuard<'_> {
    let reloc = &fs.reloc;
    while reloc.busy.get() {
        fs.env.wait_on(WaitOn::Other("cleaner_mutex"));
        reloc.wait.wait_until(|| !reloc.busy.get()).await;
    }
    reloc.busy.set(true);
    CleanerGuard(reloc)
}

/// Move every tree block out of the metadata block group at `start`
/// (`btrfs_relocate_chunk` of balance). ENOENT if no block group starts
/// there, EINVAL for a data or system group, ENOSPC if the rest of the
/// space cannot take its contents. Returns the number of blocks moved.
pub async fn relocate_block_group(fs: &Rc<FsInfo>, start: u64) -> Result<u64, Error> {
    crate::inode::trace_op(fs, "balance", do_relocate_block_group(fs, start).await)
}

async fn do_relocate_block_group(fs: &Rc<FsInfo>, start: u64) -> Result<u64, Error> {
    check_fs_error(fs)?;
    let group = fs.block_groups.lookup(start).filter(|g| g.start == start).ok_or(Error::Enoent)?;
    if type_flags(group.flags) != BLOCK_GROUP_METADATA {
        return Err(Error::Einval);
    }
    let _cleaner = lock_cleaner(fs).await;
    inc_block_group_ro(fs, &group).await?;
    let moved_before = fs.reloc.stats.borrow().blocks_moved;
    let result = relocate_stages(fs, &group).await;
    dec_block_group_ro(fs, &group);
    result?;
    let mut stats = fs.reloc.stats.borrow_mut();
    stats.block_groups += 1;
    Ok(stats.blocks_moved - moved_before)
}

/// `btrfs_inc_block_group_ro` with chunk allocation: the group's free
/// bytes become read-only if the rest can still hold every promise, after
/// a new chunk of the type if not. Departure: the allocator here never
/// allocates a chunk itself, so a chunk is also allocated when the other
/// groups' free space could not take twice the group's blocks (the copies,
/// and the relocation trees' paths to them); without one, ENOSPC unless
/// they can take the blocks once.
async fn inc_block_group_ro(fs: &Rc<FsInfo>, group: &BlockGroup) -> Result<(), Error> {
    let other_free = || -> u64 {
        fs.block_groups
            .all()
            .iter()
            .filter(|g| g.start != group.start && type_flags(g.flags) == BLOCK_GROUP_METADATA && !g.ro.get())
            .map(|g| g.free_bytes())
            .sum()
    };
    let needed = group.used.get();
    if other_free() < 2 * needed {
        alloc_chunk(fs).await?;
    }
    if other_free() < needed {
        return Err(Error::Enospc);
    }
    if let Some(space) = fs.space.get() {
        let metadata = &space.metadata;
        if metadata.inc_block_group_ro(group.free_bytes()).is_err() {
            alloc_chunk(fs).await?;
            metadata.inc_block_group_ro(group.free_bytes())?;
        }
    }
    group.ro.set(true);
    Ok(())
}

/// A metadata chunk, in a joined handle: its items are inserted by the
/// commit of that transaction, which cannot be past inserting them yet.
/// ENOSPC from the allocation is not an error here: the checks after it
/// fail instead.
async fn alloc_chunk(fs: &Rc<FsInfo>) -> Result<(), Error> {
    let handle = join_transaction(fs, "balance").await?;
    let _ = crate::volumes::alloc_chunk(fs, BLOCK_GROUP_METADATA).await;
    end_transaction(handle);
    Ok(())
}

fn dec_block_group_ro(fs: &FsInfo, group: &BlockGroup) {
    group.ro.set(false);
    if let Some(space) = fs.space.get() {
        space.metadata.dec_block_group_ro(group.free_bytes());
    }
}

/// A tree block found in the group, as its header describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TreeBlock {
    bytenr: u64,
    level: u8,
    owner: u64,
    key: Key,
}

async fn relocate_stages(fs: &Rc<FsInfo>, group: &BlockGroup) -> Result<(), Error> {
    let mut previous: Option<Vec<TreeBlock>> = None;
    for _ in 0..MAX_STAGES {
        // What the last stage freed leaves the extent tree with its commit.
        commit(fs).await?;
        let blocks = tree_blocks_in(fs, group).await?;
        if blocks.is_empty() {
            return Ok(());
        }
        if previous.as_ref() == Some(&blocks) {
            return Err(Error::BadTreeBlock(format!(
                "relocation of block group {} made no progress: {} tree blocks stay, the first {:?}",
                group.start,
                blocks.len(),
                blocks[0]
            )));
        }
        if blocks.iter().any(|b| is_fstree(b.owner)) {
            fs.reloc.create_pending.set(true);
            while fs.reloc.create_pending.get() {
                commit(fs).await?;
            }
        }
        let result = relocate_blocks(fs, &blocks).await;
        // The relocation trees go whatever happened: they only hold
        // references.
        let dropped = drop_reloc_roots(fs).await;
        result.and(dropped)?;
        previous = Some(blocks);
    }
    Err(Error::BadTreeBlock(format!(
        "relocation of block group {} did not end in {MAX_STAGES} stages",
        group.start
    )))
}

async fn commit(fs: &Rc<FsInfo>) -> Result<(), Error> {
    let handle = join_transaction(fs, "balance").await?;
    commit_transaction(handle).await
}

/// Every tree block the extent tree has in the group, with its owner,
/// level and first key read from its header.
async fn tree_blocks_in(fs: &Rc<FsInfo>, group: &BlockGroup) -> Result<Vec<TreeBlock>, Error> {
    let extent_root = fs.root(EXTENT_TREE_OBJECTID);
    let end = group.start + group.length;
    let mut found = Vec::new();
    let mut path = Path::new();
    search_slot(None, &extent_root, &Key::new(group.start, 0, 0), &mut path, 0, false).await?;
    if path.slots[0] >= path.leaf().nritems() as usize
        && !crate::ctree::next_leaf(&extent_root, &mut path).await?
    {
        return Ok(Vec::new());
    }
    loop {
        let key = path.item_key(path.slots[0]);
        if key.objectid >= end {
            break;
        }
        if key.item_type == METADATA_ITEM_KEY {
            found.push((key.objectid, key.offset as u8));
        }
        if !next_item(&extent_root, &mut path).await? {
            break;
        }
    }
    drop(path);
    let mut blocks = Vec::new();
    for (bytenr, level) in found {
        let eb = read_tree_block(fs, bytenr, 0, level, 0, None).await?;
        let Some(key) = eb.first_key() else { continue };
        blocks.push(TreeBlock { bytenr, level, owner: eb.owner(), key });
    }
    Ok(blocks)
}

/// Move `blocks` in handles of [`BLOCKS_PER_HANDLE`], then swap what the
/// relocation trees moved into their subvolumes.
async fn relocate_blocks(fs: &Rc<FsInfo>, blocks: &[TreeBlock]) -> Result<(), Error> {
    // Per subvolume, the (level, first key) of each block moved in its
    // relocation tree; highest levels first for the swaps.
    let mut moved: BTreeMap<u64, BTreeSet<(std::cmp::Reverse<u8>, Key)>> = BTreeMap::new();
    for chunk in blocks.chunks(BLOCKS_PER_HANDLE) {
        in_handle(fs, chunk.len(), async |handle| {
            for block in chunk {
                if is_fstree(block.owner) {
                    for subvol in relocate_shared_block(handle, block).await? {
                        moved.entry(subvol).or_default().insert((std::cmp::Reverse(block.level), block.key));
                    }
                } else {
                    relocate_by_cow(handle, block).await?;
                }
            }
            Ok(())
        })
        .await?;
    }
    for (subvol, entries) in moved {
        let Some(reloc) = fs.reloc.roots.borrow().get(&subvol).cloned() else { continue };
        let Some(root) = fs.roots.borrow().get(&subvol).cloned() else { continue };
        let entries: Vec<_> = entries.into_iter().collect();
        for chunk in entries.chunks(BLOCKS_PER_HANDLE) {
            in_handle(fs, chunk.len(), async |handle| {
                for &(std::cmp::Reverse(level), key) in chunk {
                    replace_path(handle, &root, &reloc, &key, level).await?;
                }
                Ok(())
            })
            .await?;
        }
    }
    Ok(())
}

/// Run `work` in a handle reserving `items`; a failure after the handle
/// started aborts the transaction (trees may be half changed).
async fn in_handle<F>(fs: &Rc<FsInfo>, items: usize, work: F) -> Result<(), Error>
where
    F: AsyncFnOnce(&TransHandle) -> Result<(), Error>,
{
    let handle = start_transaction(fs, &fs.root(ROOT_TREE_OBJECTID), items as u64, "balance").await?;
    let result = work(&handle).await;
    if let Err(error) = &result {
        abort_transaction(&handle, error, "btrfs_relocate_block_group");
    }
    end_transaction(handle);
    result
}

/// A block of a tree that shares nothing moves by a COW of the path to it
/// in its own tree (relocation's non-shareable case of do_relocation).
/// Nothing to do if the tree no longer holds it there.
async fn relocate_by_cow(handle: &TransHandle, block: &TreeBlock) -> Result<(), Error> {
    let fs = &handle.fs;
    let Some(root) = fs.roots.borrow().get(&block.owner).cloned() else { return Ok(()) };
    if block.level > root.node().level() {
        return Ok(());
    }
    let mut path = Path::new();
    path.lowest_level = block.level;
    search_slot(Some(handle), &root, &block.key, &mut path, 0, false).await?;
    let there = path.nodes[usize::from(block.level)].as_ref().is_some_and(|eb| eb.start == block.bytenr);
    drop(path);
    if !there {
        return Ok(());
    }
    let mut path = Path::new();
    path.lowest_level = block.level;
    search_slot(Some(handle), &root, &block.key, &mut path, 0, true).await?;
    fs.reloc.stats.borrow_mut().blocks_moved += 1;
    Ok(())
}

/// The child pointer at `level` on the way to `key` in `root`: (its key,
/// block, generation), with the path (write-locked with `cow`) left on
/// its parent. None if the tree is not that high.
async fn pointer_at(
    handle: &TransHandle,
    root: &Rc<Root>,
    key: &Key,
    level: u8,
    path: &mut Path,
    cow: bool,
) -> Result<Option<(Key, u64, u64)>, Error> {
    if level >= root.node().level() {
        return Ok(None);
    }
    path.lowest_level = level + 1;
    search_slot(Some(handle), root, key, path, 0, cow).await?;
    let parent_level = usize::from(level) + 1;
    let Some(parent) = path.nodes[parent_level].clone() else { return Ok(None) };
    let data = parent.data.borrow();
    if crate::accessors::header_level(&data) != level + 1 {
        return Ok(None);
    }
    let slot = path.slots[parent_level];
    Ok(Some((node_key(&data, slot), node_blockptr(&data, slot), node_ptr_generation(&data, slot))))
}

/// Move a subvolume block through the relocation trees that reach it: the
/// first COWs it (the copy lands outside the read-only group), the others
/// point their (COWed) parent at that copy. Returns the subvolumes whose
/// relocation trees now hold the copy.
async fn relocate_shared_block(handle: &TransHandle, block: &TreeBlock) -> Result<Vec<u64>, Error> {
    let fs = &handle.fs;
    let relocs: Vec<(u64, Rc<Root>)> =
        fs.reloc.roots.borrow().iter().map(|(&id, r)| (id, r.clone())).collect();
    let mut copy: Option<Rc<crate::extent_io::ExtentBuffer>> = None;
    let mut subvols = Vec::new();
    for (subvol, reloc) in relocs {
        let mut path = Path::new();
        let reaches = pointer_at(handle, &reloc, &block.key, block.level, &mut path, false).await?;
        drop(path);
        if reaches.is_none_or(|(_, bytenr, _)| bytenr != block.bytenr) {
            continue;
        }
        let mut path = Path::new();
        let Some((_, bytenr, _)) =
            pointer_at(handle, &reloc, &block.key, block.level, &mut path, true).await?
        else {
            continue;
        };
        if bytenr != block.bytenr {
            continue;
        }
        let parent_level = usize::from(block.level) + 1;
        let parent = path.nodes[parent_level].clone().expect("pointer_at leaves the parent");
        let slot = path.slots[parent_level];
        match &copy {
            Some(copy) => {
                {
                    let mut data = parent.data.borrow_mut();
                    set_node_blockptr(&mut data, slot, copy.start);
                    set_node_ptr_generation(&mut data, slot, copy.generation());
                }
                mark_buffer_dirty(handle, &parent);
                let refs = &handle.transaction.delayed_refs;
                let by = TreeRef::Shared { parent: parent.start };
                refs.add_tree_ref_mod(copy.start, block.level, by, 1, false, false);
                refs.add_tree_ref_mod(block.bytenr, block.level, by, -1, false, false);
                fs.reloc.stats.borrow_mut().blocks_repointed += 1;
            }
            None => {
                let eb = crate::ctree::read_node_slot(fs, &parent, slot).await?;
                tree_lock(fs, &eb).await;
                let cowed = cow_block(handle, &reloc, &eb, Some((&parent, slot))).await;
                let cowed = match cowed {
                    Ok(cowed) => cowed,
                    Err(error) => {
                        tree_unlock(&eb);
                        return Err(error);
                    }
                };
                tree_unlock(&cowed);
                fs.reloc.stats.borrow_mut().blocks_moved += 1;
                copy = Some(cowed);
            }
        }
        subvols.push(subvol);
    }
    Ok(subvols)
}

/// `replace_path`: swap what the relocation tree `reloc` moved on the way
/// to `key` at `lowest_level` into the subvolume `root`, at the highest
/// level where the relocation tree points at a block newer than its
/// creation and the subvolume still at the older block of the same key.
/// Nothing if the subvolume changed that part of the tree since (it COWed
/// the old block away itself).
async fn replace_path(
    handle: &TransHandle,
    root: &Rc<Root>,
    reloc: &Rc<Root>,
    key: &Key,
    lowest_level: u8,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let last_snapshot = reloc.root_item.borrow().last_snapshot;
    let top = root.node().level();
    for level in (lowest_level..top).rev() {
        let (mut dest_path, mut src_path) = (Path::new(), Path::new());
        let old = pointer_at(handle, root, key, level, &mut dest_path, false).await?;
        drop(dest_path);
        let new = pointer_at(handle, reloc, key, level, &mut src_path, false).await?;
        drop(src_path);
        let (Some(old), Some(new)) = (old, new) else { return Ok(()) };
        if !(new.2 > last_snapshot && old.2 <= last_snapshot && old.0 == new.0 && old.1 != new.1) {
            continue;
        }
        // Both parents write-locked (and COWed), then check nothing moved.
        let (mut dest_path, mut src_path) = (Path::new(), Path::new());
        let old_now = pointer_at(handle, root, key, level, &mut dest_path, true).await?;
        let new_now = pointer_at(handle, reloc, key, level, &mut src_path, true).await?;
        if old_now != Some(old) || new_now != Some(new) {
            return Ok(());
        }
        let parent_level = usize::from(level) + 1;
        let dest = dest_path.nodes[parent_level].clone().expect("pointer_at leaves the parent");
        let src = src_path.nodes[parent_level].clone().expect("pointer_at leaves the parent");
        let (dest_slot, src_slot) = (dest_path.slots[parent_level], src_path.slots[parent_level]);
        {
            let mut data = dest.data.borrow_mut();
            set_node_blockptr(&mut data, dest_slot, new.1);
            set_node_ptr_generation(&mut data, dest_slot, new.2);
        }
        {
            let mut data = src.data.borrow_mut();
            set_node_blockptr(&mut data, src_slot, old.1);
            set_node_ptr_generation(&mut data, src_slot, old.2);
        }
        mark_buffer_dirty(handle, &dest);
        mark_buffer_dirty(handle, &src);
        let refs = &handle.transaction.delayed_refs;
        let (by_src, by_dest) = (TreeRef::Shared { parent: src.start }, TreeRef::Root(root.objectid));
        refs.add_tree_ref_mod(old.1, level, by_src, 1, false, false);
        refs.add_tree_ref_mod(new.1, level, by_dest, 1, false, false);
        refs.add_tree_ref_mod(new.1, level, by_src, -1, false, false);
        refs.add_tree_ref_mod(old.1, level, by_dest, -1, false, false);
        fs.reloc.stats.borrow_mut().swaps += 1;
        fs.env.trace(TraceEvent::Note { what: "reloc_swap", a: root.objectid, b: old.1, c: new.1 });
        return Ok(());
    }
    Ok(())
}

/// Drop every relocation tree: its ROOT_ITEM goes and its tree is dropped
/// like a deleted snapshot's (`clean_dirty_subvols`).
pub(crate) async fn drop_reloc_roots(fs: &Rc<FsInfo>) -> Result<(), Error> {
    loop {
        let Some((subvol, reloc)) = fs.reloc.roots.borrow().iter().next().map(|(&id, r)| (id, r.clone()))
        else {
            return Ok(());
        };
        in_handle(fs, 1, async |handle| {
            let tree_root = fs.root(ROOT_TREE_OBJECTID);
            let key = Key { objectid: TREE_RELOC_OBJECTID, item_type: ROOT_ITEM_KEY, offset: subvol };
            let mut path = Path::new();
            if !search_slot(Some(handle), &tree_root, &key, &mut path, -1, true).await? {
                return Err(Error::BadTreeBlock(format!(
                    "root tree has no ROOT_ITEM {key} for a relocation tree"
                )));
            }
            let slot = path.slots[0];
            del_items(handle, &tree_root, &mut path, slot, 1).await?;
            drop(path);
            fs.reloc.roots.borrow_mut().remove(&subvol);
            crate::extent_tree::drop_snapshot(handle, &reloc).await
        })
        .await?;
    }
}

/// In the commit, with every writer gone, when a relocation asked for it:
/// a relocation tree for each subvolume that has none (kernel:
/// `create_reloc_root`). Like a snapshot, the subvolume's root is COWed and
/// copied, its `last_snapshot` becomes this transaction and FORCE_COW holds
/// until its root item is written. Returns the subvolumes, whose FORCE_COW
/// the commit then clears.
pub(crate) async fn create_reloc_roots(handle: &TransHandle) -> Result<Vec<Rc<Root>>, Error> {
    let fs = &handle.fs;
    if !fs.reloc.create_pending.replace(false) {
        return Ok(Vec::new());
    }
    let subvols: Vec<Rc<Root>> = fs.roots.borrow().values().filter(|r| r.is_subvolume()).cloned().collect();
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    let mut sources = Vec::new();
    for source in subvols {
        if fs.reloc.roots.borrow().contains_key(&source.objectid) {
            continue;
        }
        let node = cow_source_root(handle, &source).await?;
        let mut item = *source.root_item.borrow();
        item.flags &= !ROOT_SUBVOL_RDONLY;
        item.drop_progress = Key::default();
        item.drop_level = 0;
        item.refs = 0;
        let reloc = Root::new(fs, TREE_RELOC_OBJECTID, node.clone(), item);
        reloc.root_key_offset.set(source.objectid);
        let copy = root_from_copy(handle, &reloc, node).await?;
        let key = Key { objectid: TREE_RELOC_OBJECTID, item_type: ROOT_ITEM_KEY, offset: source.objectid };
        let bytes = reloc.root_item.borrow().to_bytes();
        insert_item(handle, &tree_root, &key, &bytes).await?;
        fs.reloc.roots.borrow_mut().insert(source.objectid, reloc);
        fs.reloc.stats.borrow_mut().reloc_trees += 1;
        fs.env.trace(TraceEvent::Note { what: "reloc_root", a: source.objectid, b: copy.start, c: 0 });
        sources.push(source);
    }
    Ok(sources)
}

/// At mount, after log replay: drop the relocation trees a crash left. A
/// committed relocation tree holds only exact references (a copy, moved
/// blocks, swapped old blocks), so dropping it is always sound.
pub(crate) async fn recover_relocation(fs: &Rc<FsInfo>) -> Result<(), Error> {
    if fs.reloc.roots.borrow().is_empty() {
        return Ok(());
    }
    let _cleaner = lock_cleaner(fs).await;
    drop_reloc_roots(fs).await?;
    commit(fs).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::{sync_fs, write};
    use crate::fix::FixPolicy;
    use crate::format::{BLOCK_GROUP_METADATA, FS_TREE_OBJECTID};
    use crate::inode::testing::{check_clean, crash_and_mount, mount, mount_with, populate, run, tree_items};
    use crate::inode::{ROOT_DIR_INO, lookup, unlink};
    use crate::ioctl::{create_snapshot, delete_snapshot};

    /// The metadata block group holding the most tree blocks.
    fn fullest_metadata_group(fs: &FsInfo) -> Rc<BlockGroup> {
        fs.block_groups
            .all()
            .into_iter()
            .filter(|g| type_flags(g.flags) == BLOCK_GROUP_METADATA)
            .max_by_key(|g| g.used.get())
            .expect("a metadata block group")
    }

    /// One stage of relocation up to the swaps: the group read-only,
    /// relocation trees made, its blocks moved and swapped into their
    /// subvolumes; the relocation trees are not dropped.
    async fn move_and_swap(fs: &Rc<FsInfo>, group: &BlockGroup) -> Result<(), Error> {
        inc_block_group_ro(fs, group).await?;
        commit(fs).await?;
        fs.reloc.create_pending.set(true);
        commit(fs).await?;
        let blocks = tree_blocks_in(fs, group).await?;
        relocate_blocks(fs, &blocks).await
    }

    #[test]
    fn relocating_a_metadata_group_empties_it_and_keeps_every_tree_and_its_sharing() {
        let (env, fs) = mount();
        populate(&env, &fs, 300);
        let snapshot =
            run(&env, &fs, |fs| async move { create_snapshot(&fs, FS_TREE_OBJECTID).await }).unwrap();
        // The source changes after the snapshot: some blocks are shared,
        // some are the source's own.
        run(&env, &fs, |fs| async move {
            for i in (0..20).step_by(7) {
                unlink(&fs, ROOT_DIR_INO, &format!("file-{i:04}")).await?;
            }
            sync_fs(&fs).await
        })
        .unwrap();
        let group = fullest_metadata_group(&fs);
        let (source_before, snapshot_before) =
            (tree_items(&env, &fs, FS_TREE_OBJECTID), tree_items(&env, &fs, snapshot));
        let used_before = group.used.get();
        assert!(used_before > 0);

        let start = group.start;
        let moved = run(&env, &fs, move |fs| async move { relocate_block_group(&fs, start).await }).unwrap();
        assert_eq!(group.used.get(), 0, "every block left the group");
        assert!(!group.ro.get(), "the emptied group is writable again");
        // Blocks on the path to a moved one move with it (COWed on the way).
        assert!(
            moved > 0 && moved * u64::from(fs.nodesize) <= used_before,
            "moved {moved} for {used_before} bytes"
        );
        let stats = *fs.reloc.stats.borrow();
        assert!(stats.reloc_trees >= 2, "{stats:?}");
        assert!(stats.swaps > 0 && stats.blocks_repointed > 0, "shared blocks moved once: {stats:?}");
        assert!(fs.reloc.roots.borrow().is_empty());
        assert_eq!(tree_items(&env, &fs, FS_TREE_OBJECTID), source_before);
        assert_eq!(tree_items(&env, &fs, snapshot), snapshot_before);
        check_clean(&env);

        // The subvolume now holds RELOC blocks; changing it COWs them, and
        // the snapshot can still go.
        run(&env, &fs, move |fs| async move {
            let (ino, _) = lookup(&fs, ROOT_DIR_INO, "file-0001").await?.unwrap();
            write(&fs, ino, 0, b"after relocation").await?;
            delete_snapshot(&fs, snapshot).await?;
            sync_fs(&fs).await
        })
        .unwrap();
        check_clean(&env);
        let fs = crash_and_mount(&env);
        assert!(fs.block_groups.lookup(start).is_some());
        check_clean(&env);
    }

    /// The rule the fixes keep: a RELOC block swapped into a subvolume in
    /// the running transaction is COWed before the subvolume changes it,
    /// under every fix (its children are referenced by parent; a change in
    /// place would add references by root under it, which check() finds).
    #[test]
    fn a_subvolume_cows_the_reloc_blocks_swapped_into_it_before_changing_them() {
        for fix in [FixPolicy::None, FixPolicy::SearchPin, FixPolicy::OverwriteWritten, FixPolicy::Both] {
            let (env, fs) = mount_with(fix);
            populate(&env, &fs, 300);
            let group = fullest_metadata_group(&fs);
            let start = group.start;
            run(&env, &fs, move |fs| async move {
                let _cleaner = lock_cleaner(&fs).await;
                move_and_swap(&fs, &group).await?;
                // Swapped, not yet committed: the subvolume holds RELOC
                // blocks of the running transaction.
                let root = fs.root(FS_TREE_OBJECTID);
                let handle = join_transaction(&fs, "test").await?;
                let mut path = Path::new();
                path.lowest_level = 0;
                search_slot(Some(&handle), &root, &Key::new(300, 0, 0), &mut path, 0, true).await?;
                let reloc_on_path = path.nodes.iter().flatten().any(|eb| eb.header_flag_reloc());
                drop(path);
                end_transaction(handle);
                drop_reloc_roots(&fs).await?;
                dec_block_group_ro(&fs, &group);
                commit(&fs).await?;
                assert!(
                    !reloc_on_path,
                    "{fix:?}: a COW search of the subvolume left a RELOC block on its path"
                );
                Ok::<(), Error>(())
            })
            .unwrap();
            let swaps = env
                .traces
                .borrow()
                .iter()
                .filter(|e| matches!(e, TraceEvent::Note { what: "reloc_swap", .. }))
                .count();
            assert!(swaps > 0, "{fix:?}: nothing was swapped in group {start}");
            check_clean(&env);
        }
    }

    /// Power lost with relocation trees on disk (blocks moved, some swapped,
    /// trees not dropped): the image checks clean with them, and mount
    /// drops them.
    #[test]
    fn relocation_trees_a_crash_leaves_are_dropped_at_mount() {
        let (env, fs) = mount();
        populate(&env, &fs, 300);
        run(&env, &fs, |fs| async move { create_snapshot(&fs, FS_TREE_OBJECTID).await }).unwrap();
        let before = tree_items(&env, &fs, FS_TREE_OBJECTID);
        let group = fullest_metadata_group(&fs);
        run(&env, &fs, move |fs| async move {
            let _cleaner = lock_cleaner(&fs).await;
            move_and_swap(&fs, &group).await?;
            commit(&fs).await
        })
        .unwrap();
        assert_eq!(fs.reloc.roots.borrow().len(), 2);
        assert!(fs.reloc.stats.borrow().swaps > 0, "the image holds swapped blocks");
        check_clean(&env);
        let fs = crash_and_mount(&env);
        assert!(fs.reloc.roots.borrow().is_empty(), "mount dropped the relocation trees");
        assert_eq!(tree_items(&env, &fs, FS_TREE_OBJECTID), before);
        check_clean(&env);
    }

    #[test]
    fn relocation_refuses_data_groups_and_unknown_starts() {
        let (env, fs) = mount();
        let data = fs
            .block_groups
            .all()
            .into_iter()
            .find(|g| type_flags(g.flags) == crate::format::BLOCK_GROUP_DATA);
        let data = data.expect("a data block group").start;
        run(&env, &fs, move |fs| async move {
            assert_eq!(relocate_block_group(&fs, data).await, Err(Error::Einval));
            assert_eq!(relocate_block_group(&fs, data + 4096).await, Err(Error::Enoent));
        });
    }
}
