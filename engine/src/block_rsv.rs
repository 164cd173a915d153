//! Block reserves, after fs/btrfs/block-rsv.c: the kernel's `struct
//! btrfs_block_rsv`, buckets of metadata space promised in advance.
//!
//! A reserve has a `size` (how much its users may need) and `reserved`
//! (how much of that is held now, in its space info's `bytes_may_use`).
//! Reserving adds to both (`block_rsv_add`); a tree block allocation takes
//! one nodesize out of `reserved` (`use_block_rsv`); releasing takes an
//! amount off `size` and gives the excess of `reserved` over the new size
//! back, to the delayed refs reserve first if it is short, else to
//! `bytes_may_use` (`block_rsv_release`).
//!
//! The filesystem's reserves ([`FsBlockRsvs`]) are those of `fs_info`:
//! global, transaction (one, shared by every handle), chunk, delayed items,
//! delayed refs, tree log, empty. A transaction handle adds what it
//! reserves to the shared transaction reserve and remembers how much
//! ([`TransRsvAccount`]): one handle can consume what another reserved,
//! which is how the COW amplification loop drains the reserve until a
//! migrate out of it fails (btrfs-model.md, "Reservations").
//!
//! The sizing helpers of fs.h and delayed-ref.h/.c that only concern
//! reserves live here too (`calc_insert_metadata_size`,
//! `calc_delayed_ref_bytes`, `btrfs_update_delayed_refs_rsv`, ...), as does
//! the reservation half of transaction.c's `start_transaction`.
//!
//! Departures from the kernel:
//! - no qgroup reservations (`qgroup_rsv_size`, `qgroup_to_release`);
//! - no delalloc, remap or raid-stripe reserves, and no relocation root
//!   reservation in `start_transaction` (the engine does no relocation);
//! - `use_block_rsv` does not warn under `enospc_debug`; it reports which
//!   path served the block ([`RsvUse`]) so the harness can count fallbacks;
//! - `block_rsv_release` asserts that it releases no more than the size
//!   (the kernel would wrap around).

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;

use crate::format::{
    BLOCK_GROUP_TREE_OBJECTID, CHUNK_TREE_OBJECTID, CSUM_TREE_OBJECTID, DEV_TREE_OBJECTID,
    EXTENT_TREE_OBJECTID, FREE_SPACE_TREE_OBJECTID, MAX_LEVEL, QUOTA_TREE_OBJECTID,
    RAID_STRIPE_TREE_OBJECTID, ROOT_TREE_OBJECTID, TREE_LOG_OBJECTID, TREE_RELOC_OBJECTID,
    UUID_TREE_OBJECTID, is_fstree,
};
use crate::space_info::{
    Enospc, FlushKind, SpaceInfoHandle, reserve_metadata_bytes, reserve_metadata_bytes_nowait,
};

/// Items an unlink changes (`BTRFS_UNLINK_METADATA_UNITS`): orphan item,
/// dir item, dir index, inode ref, inode, parent inode.
pub const UNLINK_METADATA_UNITS: u64 = 6;

/// The global reserve never grows beyond this (`SZ_512M` in
/// `btrfs_update_global_block_rsv`).
pub const GLOBAL_RSV_MAX_BYTES: u64 = 512 << 20;

/// `btrfs_calc_insert_metadata_size`: the worst case to insert `num_items`
/// items, COWing and splitting a full path of `BTRFS_MAX_LEVEL` blocks:
/// `nodesize * 8 * 2 * n` (262 144 bytes per item at 16 KiB).
pub fn calc_insert_metadata_size(nodesize: u32, num_items: u64) -> u64 {
    u64::from(nodesize) * MAX_LEVEL as u64 * 2 * num_items
}

/// `btrfs_calc_metadata_size`: the worst case to update or delete
/// `num_items` items, COW only, no splits: `nodesize * 8 * n`.
pub fn calc_metadata_size(nodesize: u32, num_items: u64) -> u64 {
    u64::from(nodesize) * MAX_LEVEL as u64 * num_items
}

/// `btrfs_calc_delayed_ref_bytes`: the reservation for running
/// `num_delayed_refs` delayed refs, an insert each in the extent tree, and
/// as much again in the free space tree when it is enabled (the engine's
/// layout has none: pass `false`).
pub fn calc_delayed_ref_bytes(nodesize: u32, num_delayed_refs: u64, free_space_tree: bool) -> u64 {
    let bytes = calc_insert_metadata_size(nodesize, num_delayed_refs);
    if free_space_tree { bytes * 2 } else { bytes }
}

/// `btrfs_calc_delayed_ref_csum_bytes`: deleting csum items splits nothing.
pub fn calc_delayed_ref_csum_bytes(nodesize: u32, num_csum_items: u64) -> u64 {
    calc_metadata_size(nodesize, num_csum_items)
}

/// The kernel's `enum btrfs_rsv_type`, the members the engine uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockRsvType {
    /// `BTRFS_BLOCK_RSV_GLOBAL`: the overflow buffer for extent tree
    /// updates nobody could reserve for exactly, and for the root tree.
    Global,
    /// `BTRFS_BLOCK_RSV_TRANS`: the shared transaction reserve.
    Trans,
    /// `BTRFS_BLOCK_RSV_CHUNK`: chunk tree updates (system space).
    Chunk,
    /// `BTRFS_BLOCK_RSV_DELOPS`: the delayed items (inodes, dir indexes),
    /// `fs_info->delayed_block_rsv`.
    DelayedItems,
    /// `BTRFS_BLOCK_RSV_DELREFS`: delayed refs, the filesystem's one and each
    /// handle's local one.
    DelayedRefs,
    /// `BTRFS_BLOCK_RSV_TREELOG`.
    TreeLog,
    /// `BTRFS_BLOCK_RSV_EMPTY`: reserve on demand, for trees with no reserve.
    Empty,
    /// `BTRFS_BLOCK_RSV_TEMP`: truncate and evict, usually `failfast`.
    Temp,
}

/// `struct btrfs_block_rsv`. The fields are cells: single-threaded, and no
/// borrow is ever held.
pub struct BlockRsv {
    kind: BlockRsvType,
    space_info: SpaceInfoHandle,
    size: Cell<u64>,
    reserved: Cell<u64>,
    /// `reserved >= size`, as last updated (the kernel's flag, which some
    /// paths leave stale the same way).
    full: Cell<bool>,
    /// `use_block_rsv` fails at once rather than fall back.
    failfast: Cell<bool>,
}

impl BlockRsv {
    /// `btrfs_init_metadata_block_rsv` (any space info): empty, not full.
    pub fn new(kind: BlockRsvType, space_info: SpaceInfoHandle) -> BlockRsv {
        BlockRsv {
            kind,
            space_info,
            size: Cell::new(0),
            reserved: Cell::new(0),
            full: Cell::new(false),
            failfast: Cell::new(false),
        }
    }

    pub fn kind(&self) -> BlockRsvType {
        self.kind
    }

    pub fn space_info(&self) -> &SpaceInfoHandle {
        &self.space_info
    }

    pub fn size(&self) -> u64 {
        self.size.get()
    }

    pub fn reserved(&self) -> u64 {
        self.reserved.get()
    }

    /// `btrfs_block_rsv_full`.
    pub fn is_full(&self) -> bool {
        self.full.get()
    }

    pub fn failfast(&self) -> bool {
        self.failfast.get()
    }

    pub fn set_failfast(&self, failfast: bool) {
        self.failfast.set(failfast);
    }

    /// The line of `DUMP_BLOCK_RSV`: `<name>: size N reserved M`.
    pub fn dump(&self, name: &str) -> String {
        format!("{name}: size {} reserved {}", self.size(), self.reserved())
    }

    /// `btrfs_return_free_space`'s refill of the global reserve: the caller
    /// adds the bytes to `bytes_may_use`.
    pub(crate) fn refill_from_free_space(&self, bytes: u64) {
        self.reserved.set(self.reserved() + bytes);
        if self.reserved() >= self.size() {
            self.full.set(true);
        }
    }

    /// `steal_from_global_rsv`'s take: the bytes stay in `bytes_may_use`,
    /// now the ticket's.
    pub(crate) fn take_for_ticket(&self, bytes: u64) {
        assert!(self.reserved() >= bytes, "stealing {bytes} from {} reserved", self.reserved());
        self.reserved.set(self.reserved() - bytes);
        if self.reserved() < self.size() {
            self.full.set(false);
        }
    }
}

impl fmt::Debug for BlockRsv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockRsv")
            .field("kind", &self.kind)
            .field("size", &self.size())
            .field("reserved", &self.reserved())
            .field("full", &self.is_full())
            .field("failfast", &self.failfast())
            .finish()
    }
}

/// `btrfs_block_rsv_add_bytes`: `bytes` already in `bytes_may_use` join the
/// reserve; `update_size` grows its size as well.
pub fn block_rsv_add_bytes(rsv: &BlockRsv, bytes: u64, update_size: bool) {
    rsv.reserved.set(rsv.reserved() + bytes);
    if update_size {
        rsv.size.set(rsv.size() + bytes);
    } else if rsv.reserved() >= rsv.size() {
        rsv.full.set(true);
    }
}

/// `btrfs_block_rsv_use_bytes`: take `bytes` out of `reserved` (they stay in
/// `bytes_may_use` until the allocator moves them), or fail if fewer are
/// held. The size does not change.
pub fn block_rsv_use_bytes(rsv: &BlockRsv, bytes: u64) -> Result<(), Enospc> {
    if rsv.reserved() < bytes {
        return Err(Enospc);
    }
    rsv.reserved.set(rsv.reserved() - bytes);
    if rsv.reserved() < rsv.size() {
        rsv.full.set(false);
    }
    Ok(())
}

/// `btrfs_block_rsv_migrate`: move `bytes` of reservation from `src` to
/// `dst` (growing `dst`'s size with `update_size`). No fallback: ENOSPC if
/// `src` holds fewer, and then neither reserve changes.
pub fn block_rsv_migrate(
    src: &BlockRsv,
    dst: &BlockRsv,
    bytes: u64,
    update_size: bool,
) -> Result<(), Enospc> {
    assert!(src.space_info.ptr_eq(&dst.space_info), "migrating between space infos");
    block_rsv_use_bytes(src, bytes)?;
    block_rsv_add_bytes(dst, bytes, update_size);
    Ok(())
}

/// `btrfs_block_rsv_add`: reserve `bytes` in the space info (flushing as
/// `flush` allows) and add them to the reserve, size and reserved.
pub async fn block_rsv_add(rsv: &BlockRsv, bytes: u64, flush: FlushKind) -> Result<(), Enospc> {
    if bytes == 0 {
        return Ok(());
    }
    reserve_metadata_bytes(&rsv.space_info, bytes, flush).await?;
    block_rsv_add_bytes(rsv, bytes, true);
    Ok(())
}

/// `btrfs_block_rsv_refill`: make `reserved` at least `bytes` without
/// changing the size.
pub async fn block_rsv_refill(rsv: &BlockRsv, bytes: u64, flush: FlushKind) -> Result<(), Enospc> {
    if rsv.reserved() >= bytes {
        return Ok(());
    }
    let missing = bytes - rsv.reserved();
    reserve_metadata_bytes(&rsv.space_info, missing, flush).await?;
    block_rsv_add_bytes(rsv, missing, false);
    Ok(())
}

/// `btrfs_block_rsv_check`: whether `reserved` is at least `min_percent` of
/// the size.
pub fn block_rsv_check(rsv: &BlockRsv, min_percent: u64) -> bool {
    rsv.reserved() >= rsv.size() * min_percent / 100
}

/// `block_rsv_release_bytes`: shrink the size by `num_bytes` (`None`: all
/// of it), then give `reserved`'s excess over the new size to `dest` up to
/// what `dest` misses, the rest to `bytes_may_use`. Returns the excess.
fn block_rsv_release_bytes(rsv: &BlockRsv, dest: Option<&BlockRsv>, num_bytes: Option<u64>) -> u64 {
    let num_bytes = num_bytes.unwrap_or(rsv.size());
    assert!(
        num_bytes <= rsv.size(),
        "{:?} reserve releases {num_bytes} bytes of a size of {}",
        rsv.kind,
        rsv.size()
    );
    rsv.size.set(rsv.size() - num_bytes);
    let excess = if rsv.reserved() >= rsv.size() {
        let excess = rsv.reserved() - rsv.size();
        rsv.reserved.set(rsv.size());
        rsv.full.set(true);
        excess
    } else {
        0
    };
    let mut to_free = excess;
    if let Some(dest) = dest
        && to_free > 0
        && !dest.is_full()
    {
        let to_add = to_free.min(dest.size().saturating_sub(dest.reserved()));
        dest.reserved.set(dest.reserved() + to_add);
        if dest.reserved() >= dest.size() {
            dest.full.set(true);
        }
        to_free -= to_add;
    }
    if to_free > 0 {
        rsv.space_info.free_bytes_may_use(to_free);
    }
    excess
}

/// Where the global reserve's size comes from (`btrfs_update_global_block_rsv`):
/// the bytes used by the root tree and by each global tree present (`None`:
/// the filesystem has no such tree).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalRootsUsed {
    pub root_tree_bytes: u64,
    pub extent_tree_bytes: Option<u64>,
    pub csum_tree_bytes: Option<u64>,
    pub free_space_tree_bytes: Option<u64>,
    /// Only with the block group tree feature.
    pub block_group_tree_bytes: Option<u64>,
}

/// The size `btrfs_update_global_block_rsv` gives the global reserve: the
/// bytes of the root tree and the global trees, at least enough for one
/// insert per tree touched plus a fallback unlink
/// (`calc_insert_metadata_size(1 + trees + 6) + calc_delayed_ref_bytes(6)`),
/// at most 512 MiB. (Kernels before 5.x had other rules; there is no
/// 16 MiB floor any more.)
pub fn calc_global_rsv_size(nodesize: u32, roots: &GlobalRootsUsed, free_space_tree: bool) -> u64 {
    let mut num_bytes = roots.root_tree_bytes;
    let mut min_items = 1;
    for tree in [
        roots.extent_tree_bytes,
        roots.csum_tree_bytes,
        roots.free_space_tree_bytes,
        roots.block_group_tree_bytes,
    ]
    .into_iter()
    .flatten()
    {
        num_bytes += tree;
        min_items += 1;
    }
    min_items += UNLINK_METADATA_UNITS;
    let floor = calc_insert_metadata_size(nodesize, min_items)
        + calc_delayed_ref_bytes(nodesize, UNLINK_METADATA_UNITS, free_space_tree);
    num_bytes.max(floor).min(GLOBAL_RSV_MAX_BYTES)
}

/// The filesystem's block reserves (the `*_rsv` members of `fs_info`).
pub struct FsBlockRsvs {
    nodesize: u32,
    /// The free space tree is enabled: delayed refs reserve twice as much.
    free_space_tree: bool,
    pub global_block_rsv: Rc<BlockRsv>,
    pub trans_block_rsv: Rc<BlockRsv>,
    pub chunk_block_rsv: Rc<BlockRsv>,
    pub delayed_block_rsv: Rc<BlockRsv>,
    pub delayed_refs_rsv: Rc<BlockRsv>,
    pub treelog_rsv: Rc<BlockRsv>,
    pub empty_block_rsv: Rc<BlockRsv>,
    /// The tree sizes the global reserve was last sized from.
    global_roots: Cell<GlobalRootsUsed>,
}

impl FsBlockRsvs {
    /// `btrfs_init_block_rsv` for each reserve and
    /// `btrfs_init_global_block_rsv`: the chunk reserve draws from the
    /// system space info, the others from metadata; then the global reserve
    /// is sized from `roots` and filled.
    pub fn new(
        metadata: &SpaceInfoHandle,
        system: &SpaceInfoHandle,
        free_space_tree: bool,
        roots: GlobalRootsUsed,
    ) -> FsBlockRsvs {
        let nodesize = metadata.nodesize();
        assert_eq!(system.nodesize(), nodesize);
        let rsv = |kind, space: &SpaceInfoHandle| Rc::new(BlockRsv::new(kind, space.clone()));
        let rsvs = FsBlockRsvs {
            nodesize,
            free_space_tree,
            global_block_rsv: rsv(BlockRsvType::Global, metadata),
            trans_block_rsv: rsv(BlockRsvType::Trans, metadata),
            chunk_block_rsv: rsv(BlockRsvType::Chunk, system),
            delayed_block_rsv: rsv(BlockRsvType::DelayedItems, metadata),
            delayed_refs_rsv: rsv(BlockRsvType::DelayedRefs, metadata),
            treelog_rsv: rsv(BlockRsvType::TreeLog, metadata),
            empty_block_rsv: rsv(BlockRsvType::Empty, metadata),
            global_roots: Cell::new(roots),
        };
        metadata.set_global_rsv(&rsvs.global_block_rsv);
        rsvs.update_global_block_rsv(roots);
        rsvs
    }

    pub fn nodesize(&self) -> u32 {
        self.nodesize
    }

    pub fn free_space_tree(&self) -> bool {
        self.free_space_tree
    }

    /// `calc_delayed_ref_bytes` with this filesystem's free space tree setting.
    pub fn calc_delayed_ref_bytes(&self, num_delayed_refs: u64) -> u64 {
        calc_delayed_ref_bytes(self.nodesize, num_delayed_refs, self.free_space_tree)
    }

    fn is_global(&self, rsv: &BlockRsv) -> bool {
        std::ptr::eq(rsv, &*self.global_block_rsv)
    }

    /// `btrfs_update_global_block_rsv`: resize the global reserve from the
    /// tree sizes and fill it to exactly its size, taking the difference
    /// from or giving it back to `bytes_may_use` (taking never fails: the
    /// global reserve may overcommit). If it outgrows the space info, the
    /// next chunk allocation is forced.
    pub fn update_global_block_rsv(&self, roots: GlobalRootsUsed) {
        self.global_roots.set(roots);
        let rsv = &self.global_block_rsv;
        let space = rsv.space_info();
        let size = calc_global_rsv_size(self.nodesize, &roots, self.free_space_tree);
        rsv.size.set(size);
        let reserved = rsv.reserved();
        if reserved < size {
            space.update_bytes_may_use(i64::try_from(size - reserved).expect("global reserve size"));
            rsv.reserved.set(size);
        } else if reserved > size {
            rsv.reserved.set(size);
            space.free_bytes_may_use(reserved - size);
        }
        rsv.full.set(true);
        if size >= space.info().total_bytes {
            space.set_force_alloc(true);
        }
    }

    /// `btrfs_init_root_block_rsv`: the reserve a tree's COWs charge when
    /// the handle's reserve does not apply; `None` for subvolume trees.
    pub fn root_block_rsv(&self, root_id: u64) -> Option<&Rc<BlockRsv>> {
        match root_id {
            CSUM_TREE_OBJECTID
            | EXTENT_TREE_OBJECTID
            | FREE_SPACE_TREE_OBJECTID
            | BLOCK_GROUP_TREE_OBJECTID
            | RAID_STRIPE_TREE_OBJECTID => Some(&self.delayed_refs_rsv),
            ROOT_TREE_OBJECTID | DEV_TREE_OBJECTID | QUOTA_TREE_OBJECTID => Some(&self.global_block_rsv),
            CHUNK_TREE_OBJECTID => Some(&self.chunk_block_rsv),
            TREE_LOG_OBJECTID => Some(&self.treelog_rsv),
            _ => None,
        }
    }

    /// `get_block_rsv`: the handle's reserve (`trans_block_rsv`, usually
    /// the shared transaction reserve) for shareable (subvolume and reloc)
    /// trees, the uuid tree, and the csum tree while the handle adds
    /// checksums; else the tree's own reserve; else the empty reserve.
    pub fn get_block_rsv<'a>(
        &'a self,
        trans_block_rsv: Option<&'a BlockRsv>,
        adding_csums: bool,
        root_id: u64,
    ) -> &'a BlockRsv {
        let shareable = is_fstree(root_id) || root_id == TREE_RELOC_OBJECTID;
        let use_trans =
            shareable || root_id == UUID_TREE_OBJECTID || (adding_csums && root_id == CSUM_TREE_OBJECTID);
        if use_trans && let Some(rsv) = trans_block_rsv {
            return rsv;
        }
        self.root_block_rsv(root_id).map_or(&*self.empty_block_rsv, |rsv| &**rsv)
    }

    /// `dump_global_block_rsv`: one line per reserve, as the kernel logs
    /// them with the space info on ENOSPC.
    pub fn dump(&self) -> Vec<String> {
        vec![
            self.global_block_rsv.dump("global_block_rsv"),
            self.trans_block_rsv.dump("trans_block_rsv"),
            self.chunk_block_rsv.dump("chunk_block_rsv"),
            self.delayed_block_rsv.dump("delayed_block_rsv"),
            self.delayed_refs_rsv.dump("delayed_refs_rsv"),
        ]
    }
}

/// `btrfs_block_rsv_release`: release `num_bytes` of `rsv`'s size; the
/// excess of `reserved` goes to the global reserve for the delayed items
/// reserve, to the delayed refs reserve for the others (but the global)
/// while it is short, and otherwise back to `bytes_may_use`. Returns the
/// excess released.
pub fn block_rsv_release(rsvs: &FsBlockRsvs, rsv: &BlockRsv, num_bytes: u64) -> u64 {
    block_rsv_release_to_target(rsvs, rsv, Some(num_bytes))
}

/// `btrfs_block_rsv_release(.., (u64)-1, ..)` (`btrfs_free_block_rsv`
/// without the free): release the whole size.
pub fn block_rsv_release_all(rsvs: &FsBlockRsvs, rsv: &BlockRsv) -> u64 {
    block_rsv_release_to_target(rsvs, rsv, None)
}

fn block_rsv_release_to_target(rsvs: &FsBlockRsvs, rsv: &BlockRsv, num_bytes: Option<u64>) -> u64 {
    let target = if rsv.kind == BlockRsvType::DelayedItems {
        Some(&*rsvs.global_block_rsv)
    } else if !rsvs.is_global(rsv) && !rsvs.delayed_refs_rsv.is_full() {
        Some(&*rsvs.delayed_refs_rsv)
    } else {
        None
    };
    let target = target.filter(|t| t.space_info.ptr_eq(&rsv.space_info));
    block_rsv_release_bytes(rsv, target, num_bytes)
}

/// How `use_block_rsv` found the bytes for a tree block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RsvUse {
    /// Out of the chosen reserve, as planned.
    FromRsv,
    /// The reserve was empty (or has no size): new bytes reserved in the
    /// space info without flushing.
    FromNewReservation,
    /// Neither: taken from the global reserve.
    FromGlobal,
    /// Not even that: `BTRFS_RESERVE_FLUSH_EMERGENCY`, ignoring what others
    /// have reserved.
    FromEmergency,
}

/// What `use_block_rsv` charged: the reserve the block's bytes now count
/// against (pass it to [`unuse_block_rsv`] if the allocation fails), the
/// reserve that was chosen first, and the path taken.
#[derive(Clone, Copy, Debug)]
pub struct RsvCharge<'a> {
    pub rsv: &'a BlockRsv,
    pub chosen: BlockRsvType,
    pub path: RsvUse,
}

/// `btrfs_use_block_rsv`: find `blocksize` bytes of reservation for a new
/// tree block of `root_id`, in the order the kernel tries:
/// 1. the chosen reserve (see [`FsBlockRsvs::get_block_rsv`]), unless it
///    has no size; a `failfast` reserve fails here; the global reserve is
///    first refreshed from the last tree sizes and tried again;
/// 2. a new reservation without flushing;
/// 3. (not for the log tree) the global reserve, if the chosen reserve is
///    another one on the same space info;
/// 4. a FLUSH_EMERGENCY reservation.
pub fn use_block_rsv<'a>(
    rsvs: &'a FsBlockRsvs,
    trans_block_rsv: Option<&'a BlockRsv>,
    adding_csums: bool,
    root_id: u64,
    blocksize: u64,
) -> Result<RsvCharge<'a>, Enospc> {
    let rsv = rsvs.get_block_rsv(trans_block_rsv, adding_csums, root_id);
    let chosen = rsv.kind;
    let charge = |rsv, path| Ok(RsvCharge { rsv, chosen, path });
    if rsv.size() > 0 {
        if block_rsv_use_bytes(rsv, blocksize).is_ok() {
            return charge(rsv, RsvUse::FromRsv);
        }
        if rsv.failfast() {
            return Err(Enospc);
        }
        if rsvs.is_global(rsv) {
            rsvs.update_global_block_rsv(rsvs.global_roots.get());
            if block_rsv_use_bytes(rsv, blocksize).is_ok() {
                return charge(rsv, RsvUse::FromRsv);
            }
        }
    }
    if reserve_metadata_bytes_nowait(&rsv.space_info, blocksize, FlushKind::NoFlush).is_ok() {
        return charge(rsv, RsvUse::FromNewReservation);
    }
    // Log trees are an optimisation: never the global reserve, never an
    // emergency reservation; the fsync falls back to a commit.
    if root_id == TREE_LOG_OBJECTID {
        return Err(Enospc);
    }
    let global = &*rsvs.global_block_rsv;
    if !rsvs.is_global(rsv)
        && rsv.space_info.ptr_eq(&global.space_info)
        && block_rsv_use_bytes(global, blocksize).is_ok()
    {
        return charge(global, RsvUse::FromGlobal);
    }
    reserve_metadata_bytes_nowait(&rsv.space_info, blocksize, FlushKind::FlushEmergency)?;
    charge(rsv, RsvUse::FromEmergency)
}

/// `btrfs_unuse_block_rsv`: the allocation failed after `use_block_rsv`;
/// put the bytes back into the reserve charged, releasing any excess.
pub fn unuse_block_rsv(rsvs: &FsBlockRsvs, rsv: &BlockRsv, blocksize: u64) {
    block_rsv_add_bytes(rsv, blocksize, false);
    block_rsv_release(rsvs, rsv, 0);
}

/// `btrfs_update_delayed_refs_rsv`: the handle queued
/// `delayed_ref_updates` delayed refs and `csum_deletions` csum deletions;
/// grow the filesystem's delayed refs reserve by what running them needs,
/// moving as much as the handle's local reserve (`trans->delayed_rsv`)
/// holds. What the local reserve lacks stays missing from the delayed refs
/// reserve (refilled later, or the global reserve covers it at commit).
pub fn update_delayed_refs_rsv(
    rsvs: &FsBlockRsvs,
    local_rsv: &BlockRsv,
    delayed_ref_updates: u64,
    csum_deletions: u64,
) {
    let num_bytes = rsvs.calc_delayed_ref_bytes(delayed_ref_updates)
        + calc_delayed_ref_csum_bytes(rsvs.nodesize, csum_deletions);
    if num_bytes == 0 {
        return;
    }
    let moved = num_bytes.min(local_rsv.reserved());
    local_rsv.reserved.set(local_rsv.reserved() - moved);
    local_rsv.full.set(local_rsv.reserved() >= local_rsv.size());
    let delayed = &rsvs.delayed_refs_rsv;
    delayed.size.set(delayed.size() + num_bytes);
    delayed.reserved.set(delayed.reserved() + moved);
    delayed.full.set(delayed.reserved() >= delayed.size());
}

/// `btrfs_delayed_refs_rsv_release`: `nr_refs` delayed refs and `nr_csums`
/// csum deletions ran; shrink the delayed refs reserve by their share.
pub fn delayed_refs_rsv_release(rsvs: &FsBlockRsvs, nr_refs: u64, nr_csums: u64) -> u64 {
    let num_bytes =
        rsvs.calc_delayed_ref_bytes(nr_refs) + calc_delayed_ref_csum_bytes(rsvs.nodesize, nr_csums);
    block_rsv_release(rsvs, &rsvs.delayed_refs_rsv, num_bytes)
}

/// `btrfs_delayed_refs_rsv_refill`: top the delayed refs reserve up by at
/// most one delayed ref's worth.
pub async fn delayed_refs_rsv_refill(rsvs: &FsBlockRsvs, flush: FlushKind) -> Result<(), Enospc> {
    let rsv = &rsvs.delayed_refs_rsv;
    let limit = rsvs.calc_delayed_ref_bytes(1);
    let num_bytes = rsv.size().saturating_sub(rsv.reserved()).min(limit);
    if num_bytes == 0 {
        return Ok(());
    }
    reserve_metadata_bytes(&rsv.space_info, num_bytes, flush).await?;
    // Someone may have filled it meanwhile: keep only what is missing.
    let needed = rsv.size().saturating_sub(rsv.reserved());
    let refilled = num_bytes.min(needed);
    rsv.reserved.set(rsv.reserved() + refilled);
    if rsv.reserved() >= rsv.size() {
        rsv.full.set(true);
    }
    if num_bytes > refilled {
        rsv.space_info.free_bytes_may_use(num_bytes - refilled);
    }
    Ok(())
}

/// The reservation a transaction handle holds (`h->bytes_reserved`,
/// `h->delayed_refs_bytes_reserved`, `h->delayed_rsv`): what
/// `start_transaction` reserved for it and `btrfs_trans_release_metadata`
/// gives back.
#[derive(Debug)]
pub struct TransRsvAccount {
    /// Bytes this handle added to the shared transaction reserve, size and
    /// reserved alike.
    pub bytes_reserved: u64,
    /// Bytes this handle added to its local delayed refs reserve.
    pub delayed_refs_bytes_reserved: u64,
    /// The handle's local delayed refs reserve, migrated to the
    /// filesystem's by [`update_delayed_refs_rsv`].
    pub delayed_rsv: BlockRsv,
}

impl TransRsvAccount {
    /// A handle that reserved nothing (a join).
    pub fn none(rsvs: &FsBlockRsvs) -> TransRsvAccount {
        TransRsvAccount {
            bytes_reserved: 0,
            delayed_refs_bytes_reserved: 0,
            delayed_rsv: BlockRsv::new(BlockRsvType::DelayedRefs, rsvs.trans_block_rsv.space_info.clone()),
        }
    }

    /// The reservation half of `start_transaction(root, num_items)`:
    /// reserve `calc_insert_metadata_size(num_items)` for the shared
    /// transaction reserve and `calc_delayed_ref_bytes(num_items)` for the
    /// handle's local delayed refs reserve, in one space info reservation
    /// (`btrfs_reserve_trans_metadata`; with FLUSH_ALL_STEAL, retry without
    /// the delayed refs part). With no items and FLUSH_ALL, refill the
    /// delayed refs reserve instead. A plain create (5 items) adds
    /// 1 310 720 bytes to the transaction reserve at 16 KiB.
    pub async fn reserve(
        rsvs: &FsBlockRsvs,
        num_items: u64,
        flush: FlushKind,
    ) -> Result<TransRsvAccount, Enospc> {
        let mut account = TransRsvAccount::none(rsvs);
        if num_items == 0 {
            if flush == FlushKind::FlushAll && !rsvs.delayed_refs_rsv.is_full() {
                delayed_refs_rsv_refill(rsvs, flush).await?;
            }
            return Ok(account);
        }
        let num_bytes = calc_insert_metadata_size(rsvs.nodesize, num_items);
        let mut delayed_refs_bytes = rsvs.calc_delayed_ref_bytes(num_items);
        let space = rsvs.trans_block_rsv.space_info();
        let mut result = reserve_metadata_bytes(space, num_bytes + delayed_refs_bytes, flush).await;
        if result.is_err() && flush == FlushKind::FlushAllSteal {
            delayed_refs_bytes = 0;
            result = reserve_metadata_bytes(space, num_bytes, flush).await;
        }
        result?;
        block_rsv_add_bytes(&rsvs.trans_block_rsv, num_bytes, true);
        account.bytes_reserved = num_bytes;
        if delayed_refs_bytes > 0 {
            block_rsv_add_bytes(&account.delayed_rsv, delayed_refs_bytes, true);
            account.delayed_refs_bytes_reserved = delayed_refs_bytes;
        }
        Ok(account)
    }

    /// `btrfs_trans_release_metadata`: take this handle's share off the
    /// shared transaction reserve's size, then off its local delayed refs
    /// reserve; whatever `reserved` exceeds the sizes goes back (to the
    /// delayed refs reserve while it is short, else to `bytes_may_use`).
    /// What other handles consumed of this handle's share is simply gone.
    pub fn release(&mut self, rsvs: &FsBlockRsvs) {
        if self.bytes_reserved == 0 {
            assert_eq!(self.delayed_refs_bytes_reserved, 0, "delayed refs reserved without a reservation");
            return;
        }
        block_rsv_release(rsvs, &rsvs.trans_block_rsv, self.bytes_reserved);
        self.bytes_reserved = 0;
        if self.delayed_refs_bytes_reserved == 0 {
            return;
        }
        block_rsv_release(rsvs, &self.delayed_rsv, self.delayed_refs_bytes_reserved);
        self.delayed_refs_bytes_reserved = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM, DATA_RELOC_TREE_OBJECTID, FS_TREE_OBJECTID,
    };
    use crate::space_info::SpaceInfo;
    use crate::testenv::TestEnv;

    const NODESIZE: u32 = 16384;
    const NODE: u64 = NODESIZE as u64;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A 16 KiB filesystem: `metadata_bytes` of metadata block groups,
    /// 32 MiB of system, `unallocated` device bytes left.
    fn setup(metadata_bytes: u64, unallocated: u64) -> (Rc<TestEnv>, Rc<FsBlockRsvs>) {
        let env = TestEnv::new(4096);
        let free = Rc::new(Cell::new(unallocated));
        let space = |flags| {
            SpaceInfoHandle::new(env.clone(), SpaceInfo::new(flags, 100 * GIB), NODESIZE, free.clone())
        };
        let (metadata, system) = (space(BLOCK_GROUP_METADATA), space(BLOCK_GROUP_SYSTEM));
        metadata.add_block_group(metadata_bytes, 0, 0);
        system.add_block_group(32 * MIB, 0, 0);
        let roots = GlobalRootsUsed {
            root_tree_bytes: NODE,
            extent_tree_bytes: Some(NODE),
            csum_tree_bytes: Some(NODE),
            ..GlobalRootsUsed::default()
        };
        (env, Rc::new(FsBlockRsvs::new(&metadata, &system, false, roots)))
    }

    fn metadata(rsvs: &FsBlockRsvs) -> &SpaceInfoHandle {
        rsvs.trans_block_rsv.space_info()
    }

    fn sizes(rsv: &BlockRsv) -> (u64, u64) {
        (rsv.size(), rsv.reserved())
    }

    fn start(env: &TestEnv, rsvs: &Rc<FsBlockRsvs>, items: u64) -> TransRsvAccount {
        let rsvs = rsvs.clone();
        env.run(async move { TransRsvAccount::reserve(&rsvs, items, FlushKind::FlushAll).await }).unwrap()
    }

    #[test]
    fn calc_sizes_at_4_16_64_kib() {
        for (nodesize, insert, update) in
            [(4096, 65_536, 32_768), (16384, 262_144, 131_072), (65536, 1_048_576, 524_288)]
        {
            assert_eq!(calc_insert_metadata_size(nodesize, 1), insert, "{nodesize}");
            assert_eq!(calc_insert_metadata_size(nodesize, 5), 5 * insert, "{nodesize}");
            assert_eq!(calc_metadata_size(nodesize, 1), update, "{nodesize}");
            assert_eq!(calc_metadata_size(nodesize, 3), 3 * update, "{nodesize}");
            assert_eq!(calc_delayed_ref_bytes(nodesize, 2, false), 2 * insert, "{nodesize}");
            assert_eq!(calc_delayed_ref_bytes(nodesize, 2, true), 4 * insert, "{nodesize}");
            assert_eq!(calc_delayed_ref_csum_bytes(nodesize, 2), 2 * update, "{nodesize}");
        }
        assert_eq!(calc_insert_metadata_size(16384, 5), 1_310_720);
    }

    #[test]
    fn global_rsv_size_follows_the_trees() {
        let roots = GlobalRootsUsed {
            root_tree_bytes: NODE,
            extent_tree_bytes: Some(NODE),
            csum_tree_bytes: Some(NODE),
            ..GlobalRootsUsed::default()
        };
        // Small trees: (1 + 2 + 6) inserts + 6 delayed refs = 15 * 256 KiB.
        assert_eq!(calc_global_rsv_size(NODESIZE, &roots, false), 15 * 262_144);
        // With a free space tree: one more tree, and delayed refs doubled.
        let fst = GlobalRootsUsed { free_space_tree_bytes: Some(NODE), ..roots };
        assert_eq!(calc_global_rsv_size(NODESIZE, &fst, true), (10 + 12) * 262_144);
        // Big trees: their size, capped at 512 MiB.
        let big = GlobalRootsUsed { extent_tree_bytes: Some(100 * MIB), ..roots };
        assert_eq!(calc_global_rsv_size(NODESIZE, &big, false), 100 * MIB + 2 * NODE);
        let huge = GlobalRootsUsed { extent_tree_bytes: Some(GIB), ..roots };
        assert_eq!(calc_global_rsv_size(NODESIZE, &huge, false), 512 * MIB);

        let (_env, rsvs) = setup(64 * MIB, 0);
        let global = &rsvs.global_block_rsv;
        assert_eq!(sizes(global), (15 * 262_144, 15 * 262_144));
        assert_eq!(metadata(&rsvs).info().bytes_may_use, 15 * 262_144);
        // Growing and shrinking moves bytes_may_use with it.
        rsvs.update_global_block_rsv(big);
        assert_eq!(sizes(global), (100 * MIB + 2 * NODE, 100 * MIB + 2 * NODE));
        assert_eq!(metadata(&rsvs).info().bytes_may_use, 100 * MIB + 2 * NODE);
        assert!(metadata(&rsvs).info().force_alloc, "the global reserve outgrew the space info");
        rsvs.update_global_block_rsv(roots);
        assert_eq!(metadata(&rsvs).info().bytes_may_use, 15 * 262_144);
        assert!(global.is_full());
    }

    #[test]
    fn one_create_reserves_1310720_and_ending_the_handle_gives_it_back() {
        let (env, rsvs) = setup(GIB, 0);
        let space = metadata(&rsvs).clone();
        let may_use_before = space.info().bytes_may_use;
        let mut handle = start(&env, &rsvs, 5);
        assert_eq!(handle.bytes_reserved, 1_310_720);
        assert_eq!(sizes(&rsvs.trans_block_rsv), (1_310_720, 1_310_720));
        assert_eq!(handle.delayed_refs_bytes_reserved, 1_310_720);
        assert_eq!(sizes(&handle.delayed_rsv), (1_310_720, 1_310_720));
        assert_eq!(space.info().bytes_may_use, may_use_before + 2 * 1_310_720);
        // A second handle shares the same transaction reserve.
        let mut other = start(&env, &rsvs, 1);
        assert_eq!(sizes(&rsvs.trans_block_rsv), (1_572_864, 1_572_864));
        handle.release(&rsvs);
        assert_eq!((handle.bytes_reserved, handle.delayed_refs_bytes_reserved), (0, 0));
        assert_eq!(sizes(&rsvs.trans_block_rsv), (262_144, 262_144));
        other.release(&rsvs);
        assert_eq!(sizes(&rsvs.trans_block_rsv), (0, 0));
        assert_eq!(sizes(&handle.delayed_rsv), (0, 0));
        assert_eq!(sizes(&rsvs.delayed_refs_rsv), (0, 0));
        assert_eq!(space.info().bytes_may_use, may_use_before);
    }

    #[test]
    fn release_refills_the_delayed_refs_rsv_first() {
        let (env, rsvs) = setup(GIB, 0);
        let space = metadata(&rsvs).clone();
        let may_use_before = space.info().bytes_may_use;
        let mut handle = start(&env, &rsvs, 5);
        // Two delayed refs queued: their bytes move from the handle's local
        // reserve to the filesystem's.
        update_delayed_refs_rsv(&rsvs, &handle.delayed_rsv, 2, 0);
        assert_eq!(sizes(&rsvs.delayed_refs_rsv), (524_288, 524_288));
        assert_eq!(sizes(&handle.delayed_rsv), (1_310_720, 786_432));
        // Two more with an empty local reserve: the size grows, not reserved.
        let empty = TransRsvAccount::none(&rsvs);
        update_delayed_refs_rsv(&rsvs, &empty.delayed_rsv, 2, 0);
        assert_eq!(sizes(&rsvs.delayed_refs_rsv), (1_048_576, 524_288));
        assert!(!rsvs.delayed_refs_rsv.is_full());
        // Ending the handle fills the gap before anything goes back.
        handle.release(&rsvs);
        assert_eq!(sizes(&rsvs.delayed_refs_rsv), (1_048_576, 1_048_576));
        assert_eq!(space.info().bytes_may_use, may_use_before + 1_048_576);
        // Running the refs releases the rest.
        assert_eq!(delayed_refs_rsv_release(&rsvs, 4, 0), 1_048_576);
        assert_eq!(space.info().bytes_may_use, may_use_before);
    }

    #[test]
    fn migrate_fails_when_reserved_is_short_and_changes_nothing() {
        let (env, rsvs) = setup(GIB, 0);
        let _handle = start(&env, &rsvs, 1);
        let (src, dst) = (&rsvs.trans_block_rsv, &rsvs.delayed_block_rsv);
        block_rsv_use_bytes(src, 262_144 - 100).unwrap();
        let before = (sizes(src), src.is_full(), sizes(dst), dst.is_full());
        assert_eq!(block_rsv_migrate(src, dst, 101, true), Err(Enospc));
        assert_eq!((sizes(src), src.is_full(), sizes(dst), dst.is_full()), before);
        block_rsv_migrate(src, dst, 100, true).unwrap();
        assert_eq!((sizes(src), sizes(dst)), ((262_144, 0), (100, 100)));
        assert_eq!(block_rsv_use_bytes(src, 1), Err(Enospc));
    }

    /// The failure the model describes: COWs drain the shared transaction
    /// reserve, then `insert_delayed_dir_index`'s migrate fails.
    #[test]
    fn cow_loop_drains_trans_rsv_until_migrate_fails() {
        let (env, rsvs) = setup(GIB, 100 * GIB);
        let _handle = start(&env, &rsvs, 5);
        let trans = Some(&*rsvs.trans_block_rsv);
        for _ in 0..80 {
            let charge = use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).unwrap();
            assert_eq!((charge.path, charge.rsv.kind()), (RsvUse::FromRsv, BlockRsvType::Trans));
        }
        assert_eq!(rsvs.dump()[1], "trans_block_rsv: size 1310720 reserved 0");
        let one_item = calc_insert_metadata_size(NODESIZE, 1);
        assert_eq!(
            block_rsv_migrate(&rsvs.trans_block_rsv, &rsvs.delayed_block_rsv, one_item, true),
            Err(Enospc)
        );
        // The COW itself does not fail: it reserves anew.
        let charge = use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).unwrap();
        assert_eq!(charge.path, RsvUse::FromNewReservation);
    }

    #[test]
    fn use_block_rsv_picks_the_reserve_of_each_tree() {
        let (_env, rsvs) = setup(GIB, 0);
        let trans = Some(&*rsvs.trans_block_rsv);
        use BlockRsvType::*;
        for (root_id, adding_csums, kind) in [
            (FS_TREE_OBJECTID, false, Trans),
            (256, false, Trans),
            (TREE_RELOC_OBJECTID, false, Trans),
            (UUID_TREE_OBJECTID, false, Trans),
            (CSUM_TREE_OBJECTID, true, Trans),
            (CSUM_TREE_OBJECTID, false, DelayedRefs),
            (EXTENT_TREE_OBJECTID, false, DelayedRefs),
            (FREE_SPACE_TREE_OBJECTID, false, DelayedRefs),
            (BLOCK_GROUP_TREE_OBJECTID, false, DelayedRefs),
            (ROOT_TREE_OBJECTID, false, Global),
            (DEV_TREE_OBJECTID, false, Global),
            (QUOTA_TREE_OBJECTID, false, Global),
            (CHUNK_TREE_OBJECTID, false, Chunk),
            (TREE_LOG_OBJECTID, false, TreeLog),
            (DATA_RELOC_TREE_OBJECTID, false, Empty),
        ] {
            assert_eq!(rsvs.get_block_rsv(trans, adding_csums, root_id).kind(), kind, "tree {root_id}");
        }
        // Without a handle reserve a subvolume tree gets the empty one.
        assert_eq!(rsvs.get_block_rsv(None, false, FS_TREE_OBJECTID).kind(), Empty);
        assert!(rsvs.chunk_block_rsv.space_info().flags() == BLOCK_GROUP_SYSTEM);
    }

    #[test]
    fn use_block_rsv_reports_each_fallback_path() {
        // 8 MiB of metadata, nothing unallocated: no overcommit.
        let (env, rsvs) = setup(8 * MIB, 0);
        let space = metadata(&rsvs).clone();
        let global_size = rsvs.global_block_rsv.size();
        let _handle = start(&env, &rsvs, 1);
        let trans = Some(&*rsvs.trans_block_rsv);

        // 1. Out of the handle's reserve.
        let c = use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).unwrap();
        assert_eq!(
            (c.path, c.chosen, c.rsv.kind()),
            (RsvUse::FromRsv, BlockRsvType::Trans, BlockRsvType::Trans)
        );
        assert_eq!(rsvs.trans_block_rsv.reserved(), 262_144 - NODE);

        // 2. The delayed refs reserve has no size: reserve anew.
        let may_use = space.info().bytes_may_use;
        let c = use_block_rsv(&rsvs, trans, false, EXTENT_TREE_OBJECTID, NODE).unwrap();
        assert_eq!((c.path, c.rsv.kind()), (RsvUse::FromNewReservation, BlockRsvType::DelayedRefs));
        assert_eq!(space.info().bytes_may_use, may_use + NODE);

        // 3. The handle's reserve drained and the space full: the global one.
        block_rsv_use_bytes(&rsvs.trans_block_rsv, rsvs.trans_block_rsv.reserved()).unwrap();
        let fill = space.info().bytes_free();
        reserve_metadata_bytes_nowait(&space, fill, FlushKind::NoFlush).unwrap();
        let c = use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).unwrap();
        assert_eq!(
            (c.path, c.chosen, c.rsv.kind()),
            (RsvUse::FromGlobal, BlockRsvType::Trans, BlockRsvType::Global)
        );
        assert_eq!(rsvs.global_block_rsv.reserved(), global_size - NODE);

        // The log tree never falls back to the global reserve.
        assert!(use_block_rsv(&rsvs, trans, false, TREE_LOG_OBJECTID, NODE).is_err());

        // A failfast reserve fails at once, before any fallback.
        let temp = BlockRsv::new(BlockRsvType::Temp, space.clone());
        block_rsv_add_bytes(&temp, NODE - 1, true);
        temp.set_failfast(true);
        let free_global = rsvs.global_block_rsv.reserved();
        assert!(use_block_rsv(&rsvs, Some(&temp), false, FS_TREE_OBJECTID, NODE).is_err());
        assert_eq!(rsvs.global_block_rsv.reserved(), free_global);

        // The global reserve itself, drained, is refilled from the tree
        // sizes (overcommitting bytes_may_use) and used.
        block_rsv_use_bytes(&rsvs.global_block_rsv, free_global).unwrap();
        let c = use_block_rsv(&rsvs, trans, false, ROOT_TREE_OBJECTID, NODE).unwrap();
        assert_eq!((c.path, c.rsv.kind()), (RsvUse::FromRsv, BlockRsvType::Global));
        assert!(space.info().bytes_may_use > space.info().total_bytes);

        // 4. Global drained too: an emergency reservation, since little is
        // really allocated.
        block_rsv_use_bytes(&rsvs.global_block_rsv, rsvs.global_block_rsv.reserved()).unwrap();
        let c = use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).unwrap();
        assert_eq!((c.path, c.rsv.kind()), (RsvUse::FromEmergency, BlockRsvType::Trans));

        // 5. Nothing left even for an emergency: ENOSPC.
        space.add_reserved_bytes(0, space.info().total_bytes);
        assert_eq!(use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).map(|c| c.path), Err(Enospc));
    }

    #[test]
    fn unuse_gives_the_block_back() {
        let (env, rsvs) = setup(GIB, 0);
        let _handle = start(&env, &rsvs, 1);
        let trans = Some(&*rsvs.trans_block_rsv);
        let c = use_block_rsv(&rsvs, trans, false, FS_TREE_OBJECTID, NODE).unwrap();
        unuse_block_rsv(&rsvs, c.rsv, NODE);
        assert_eq!(sizes(&rsvs.trans_block_rsv), (262_144, 262_144));
        // A new reservation given back leaves the reserve as it was and
        // returns the bytes to the space info.
        let space = metadata(&rsvs).clone();
        let may_use = space.info().bytes_may_use;
        let c = use_block_rsv(&rsvs, trans, false, EXTENT_TREE_OBJECTID, NODE).unwrap();
        assert_eq!(c.path, RsvUse::FromNewReservation);
        unuse_block_rsv(&rsvs, c.rsv, NODE);
        assert_eq!(sizes(&rsvs.delayed_refs_rsv), (0, 0));
        assert_eq!(space.info().bytes_may_use, may_use);
    }

    #[test]
    fn block_rsv_add_reserves_in_the_space_info() {
        let (env, rsvs) = setup(GIB, 0);
        let space = metadata(&rsvs).clone();
        let may_use = space.info().bytes_may_use;
        let rsvs2 = rsvs.clone();
        env.run(async move { block_rsv_add(&rsvs2.delayed_block_rsv, 3 * NODE, FlushKind::NoFlush).await })
            .unwrap();
        assert_eq!(sizes(&rsvs.delayed_block_rsv), (3 * NODE, 3 * NODE));
        assert_eq!(space.info().bytes_may_use, may_use + 3 * NODE);
        // A delayed items reserve gives its excess to the global reserve.
        block_rsv_use_bytes(&rsvs.global_block_rsv, NODE).unwrap();
        assert_eq!(block_rsv_release_all(&rsvs, &rsvs.delayed_block_rsv), 3 * NODE);
        assert!(rsvs.global_block_rsv.is_full());
        assert_eq!(space.info().bytes_may_use, may_use + NODE);
    }

    #[test]
    #[should_panic(expected = "releases 262145 bytes of a size of 262144")]
    fn releasing_more_than_the_size_is_a_bug() {
        let (env, rsvs) = setup(GIB, 0);
        let _handle = start(&env, &rsvs, 1);
        block_rsv_release(&rsvs, &rsvs.trans_block_rsv, 262_145);
    }
}
