//! Field access and item moves on a tree block image (`&[u8]` of length
//! nodesize), after fs/btrfs/accessors.h and the byte-moving parts of
//! ctree.c (`setup_items_for_insert`, `btrfs_del_items`,
//! `btrfs_extend_item`, `btrfs_truncate_item`, `insert_ptr`, the copies done
//! by `push_leaf_*`, `split_leaf`, `push_node_left`, `balance_node_right`,
//! `split_node`).
//!
//! Layout (as in btrfs): a 101-byte header; in a node, key pointers of 33
//! bytes follow it; in a leaf, item headers of 25 bytes grow forward from
//! the end of the header while item data grows backward from the end of the
//! block. An item's `offset` is relative to the end of the header (the start
//! of the leaf data area), so item `i` occupies
//! `[HEADER_SIZE + offset, HEADER_SIZE + offset + size)` of the block.
//! The data of item 0 ends at `leaf_data_size`, and each item's data ends
//! where the previous one's begins.
//!
//! These are pure byte manipulations: the nodesize is the length of the
//! slice, the caller is trusted (a bad slot or a move that does not fit
//! panics), and nothing here touches parents, paths or keys of other blocks
//! (`fixup_low_keys` is the caller's job after changing slot 0). Corrupt
//! images read from disk are the tree checker's job, before these run.
//!
//! Beyond the kernel, every operation here keeps the unused middle of the
//! block zeroed (vacated bytes are cleared), so a block's bytes are a
//! function of its header and its items.

use crate::format::{
    BACKREF_REV_SHIFT, CSUM_SIZE, DISK_KEY_SIZE, EXTENT_DATA_KEY, FILE_EXTENT_INLINE,
    FILE_EXTENT_INLINE_DATA_START, FSID_SIZE, HEADER_SIZE, ITEM_SIZE, KEY_PTR_SIZE, Key, MIXED_BACKREF_REV,
    UUID_SIZE, csum_tree_block, get_array, get_u8, get_u32, get_u64, key_type_name, leaf_data_size,
    nodeptrs_per_block, put_u8, put_u32, put_u64,
};
use std::fmt::Write as _;

// Header field offsets (`struct btrfs_header`).
const HDR_CSUM: usize = 0;
const HDR_FSID: usize = 32;
const HDR_BYTENR: usize = 48;
const HDR_FLAGS: usize = 56;
const HDR_CHUNK_TREE_UUID: usize = 64;
const HDR_GENERATION: usize = 80;
const HDR_OWNER: usize = 88;
const HDR_NRITEMS: usize = 96;
const HDR_LEVEL: usize = 100;

const FLAGS_MASK: u64 = (1u64 << BACKREF_REV_SHIFT) - 1;

#[inline]
fn nodesize(eb: &[u8]) -> u32 {
    eb.len() as u32
}

// ---------------------------------------------------------------------------
// Header.

pub fn header_csum(eb: &[u8]) -> [u8; CSUM_SIZE] {
    get_array(eb, HDR_CSUM)
}
pub fn set_header_csum(eb: &mut [u8], csum: &[u8; CSUM_SIZE]) {
    eb[HDR_CSUM..HDR_CSUM + CSUM_SIZE].copy_from_slice(csum);
}
pub fn header_fsid(eb: &[u8]) -> [u8; FSID_SIZE] {
    get_array(eb, HDR_FSID)
}
pub fn set_header_fsid(eb: &mut [u8], fsid: &[u8; FSID_SIZE]) {
    eb[HDR_FSID..HDR_FSID + FSID_SIZE].copy_from_slice(fsid);
}
pub fn header_bytenr(eb: &[u8]) -> u64 {
    get_u64(eb, HDR_BYTENR)
}
pub fn set_header_bytenr(eb: &mut [u8], v: u64) {
    put_u64(eb, HDR_BYTENR, v)
}
/// The whole flags field, backref revision included.
pub fn header_flags(eb: &[u8]) -> u64 {
    get_u64(eb, HDR_FLAGS)
}
pub fn set_header_flags(eb: &mut [u8], v: u64) {
    put_u64(eb, HDR_FLAGS, v)
}
/// Whether any of `flag` (HEADER_FLAG_WRITTEN, HEADER_FLAG_RELOC) is set.
pub fn header_flag(eb: &[u8], flag: u64) -> bool {
    header_flags(eb) & flag != 0
}
pub fn set_header_flag(eb: &mut [u8], flag: u64) {
    debug_assert_eq!(flag & !FLAGS_MASK, 0);
    set_header_flags(eb, header_flags(eb) | flag)
}
pub fn clear_header_flag(eb: &mut [u8], flag: u64) {
    debug_assert_eq!(flag & !FLAGS_MASK, 0);
    set_header_flags(eb, header_flags(eb) & !flag)
}
pub fn header_backref_rev(eb: &[u8]) -> u8 {
    (header_flags(eb) >> BACKREF_REV_SHIFT) as u8
}
pub fn set_header_backref_rev(eb: &mut [u8], rev: u8) {
    let flags = (header_flags(eb) & FLAGS_MASK) | ((rev as u64) << BACKREF_REV_SHIFT);
    set_header_flags(eb, flags)
}
pub fn header_chunk_tree_uuid(eb: &[u8]) -> [u8; UUID_SIZE] {
    get_array(eb, HDR_CHUNK_TREE_UUID)
}
pub fn set_header_chunk_tree_uuid(eb: &mut [u8], uuid: &[u8; UUID_SIZE]) {
    eb[HDR_CHUNK_TREE_UUID..HDR_CHUNK_TREE_UUID + UUID_SIZE].copy_from_slice(uuid);
}
pub fn header_generation(eb: &[u8]) -> u64 {
    get_u64(eb, HDR_GENERATION)
}
pub fn set_header_generation(eb: &mut [u8], v: u64) {
    put_u64(eb, HDR_GENERATION, v)
}
pub fn header_owner(eb: &[u8]) -> u64 {
    get_u64(eb, HDR_OWNER)
}
pub fn set_header_owner(eb: &mut [u8], v: u64) {
    put_u64(eb, HDR_OWNER, v)
}
pub fn header_nritems(eb: &[u8]) -> u32 {
    get_u32(eb, HDR_NRITEMS)
}
pub fn set_header_nritems(eb: &mut [u8], v: u32) {
    put_u32(eb, HDR_NRITEMS, v)
}
pub fn header_level(eb: &[u8]) -> u8 {
    get_u8(eb, HDR_LEVEL)
}
pub fn set_header_level(eb: &mut [u8], v: u8) {
    put_u8(eb, HDR_LEVEL, v)
}

/// What a new tree block's header says (`btrfs_init_new_buffer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewBlockHeader {
    pub bytenr: u64,
    pub generation: u64,
    pub owner: u64,
    pub level: u8,
    pub fsid: [u8; FSID_SIZE],
    pub chunk_tree_uuid: [u8; UUID_SIZE],
}

/// Turn `eb` into an empty tree block: all zero, then the header of
/// `h` with the mixed backref revision and no flags, nritems 0.
pub fn init_tree_block(eb: &mut [u8], h: &NewBlockHeader) {
    assert!(crate::format::check_nodesize(nodesize(eb)), "bad nodesize {}", eb.len());
    eb.fill(0);
    set_header_bytenr(eb, h.bytenr);
    set_header_generation(eb, h.generation);
    set_header_owner(eb, h.owner);
    set_header_level(eb, h.level);
    set_header_backref_rev(eb, MIXED_BACKREF_REV);
    set_header_fsid(eb, &h.fsid);
    set_header_chunk_tree_uuid(eb, &h.chunk_tree_uuid);
}

/// Store the block's crc32c checksum in its header (what the write path
/// does before submitting the block): 4 bytes little-endian, 28 zero.
pub fn write_header_csum(eb: &mut [u8]) {
    let crc = csum_tree_block(eb);
    let mut csum = [0u8; CSUM_SIZE];
    csum[..4].copy_from_slice(&crc.to_le_bytes());
    set_header_csum(eb, &csum);
}

// ---------------------------------------------------------------------------
// Nodes.

/// Byte offset of key pointer `nr` (`btrfs_node_key_ptr_offset`).
pub const fn key_ptr_offset(nr: usize) -> usize {
    HEADER_SIZE + nr * KEY_PTR_SIZE
}

pub fn node_key(eb: &[u8], nr: usize) -> Key {
    Key::read(&eb[key_ptr_offset(nr)..])
}
pub fn set_node_key(eb: &mut [u8], nr: usize, key: &Key) {
    key.write(&mut eb[key_ptr_offset(nr)..])
}
pub fn node_blockptr(eb: &[u8], nr: usize) -> u64 {
    get_u64(eb, key_ptr_offset(nr) + DISK_KEY_SIZE)
}
pub fn set_node_blockptr(eb: &mut [u8], nr: usize, v: u64) {
    put_u64(eb, key_ptr_offset(nr) + DISK_KEY_SIZE, v)
}
pub fn node_ptr_generation(eb: &[u8], nr: usize) -> u64 {
    get_u64(eb, key_ptr_offset(nr) + DISK_KEY_SIZE + 8)
}
pub fn set_node_ptr_generation(eb: &mut [u8], nr: usize, v: u64) {
    put_u64(eb, key_ptr_offset(nr) + DISK_KEY_SIZE + 8, v)
}

/// Insert a key pointer at `slot`, shifting the following ones right
/// (the byte part of ctree.c's `insert_ptr`). Panics when the node is full
/// or `slot > nritems`.
pub fn insert_ptr(eb: &mut [u8], slot: usize, key: &Key, blockptr: u64, generation: u64) {
    assert!(header_level(eb) > 0, "insert_ptr on a leaf");
    let nritems = header_nritems(eb) as usize;
    assert!(slot <= nritems, "insert_ptr slot {slot} > nritems {nritems}");
    assert!((nritems as u32) < nodeptrs_per_block(nodesize(eb)), "insert_ptr into a full node");
    if slot < nritems {
        eb.copy_within(key_ptr_offset(slot)..key_ptr_offset(nritems), key_ptr_offset(slot + 1));
    }
    set_node_key(eb, slot, key);
    set_node_blockptr(eb, slot, blockptr);
    set_node_ptr_generation(eb, slot, generation);
    set_header_nritems(eb, nritems as u32 + 1);
}

/// Remove `nr` key pointers starting at `slot`, shifting the following
/// ones left (the byte part of `del_ptr`).
pub fn remove_ptrs(eb: &mut [u8], slot: usize, nr: usize) {
    let nritems = header_nritems(eb) as usize;
    assert!(slot + nr <= nritems, "remove_ptrs {slot}+{nr} > nritems {nritems}");
    if nr == 0 {
        return;
    }
    eb.copy_within(key_ptr_offset(slot + nr)..key_ptr_offset(nritems), key_ptr_offset(slot));
    eb[key_ptr_offset(nritems - nr)..key_ptr_offset(nritems)].fill(0);
    set_header_nritems(eb, (nritems - nr) as u32);
}

/// Remove the key pointer at `slot`.
pub fn remove_ptr(eb: &mut [u8], slot: usize) {
    remove_ptrs(eb, slot, 1)
}

/// Copy key pointers `[src_slot, src_slot + nr)` of `src` into `dst` at
/// `dst_slot`, shifting `dst`'s pointers from `dst_slot` on to the right.
/// `src` is unchanged. Used to split a node (into an empty one) or push
/// pointers to a neighbour (append on the left, prepend on the right).
pub fn copy_node_ptrs(src: &[u8], src_slot: usize, dst: &mut [u8], dst_slot: usize, nr: usize) {
    let src_nr = header_nritems(src) as usize;
    let dst_nr = header_nritems(dst) as usize;
    assert!(src_slot + nr <= src_nr, "copy_node_ptrs past the source");
    assert!(dst_slot <= dst_nr, "copy_node_ptrs dst slot past nritems");
    assert!(
        dst_nr + nr <= nodeptrs_per_block(nodesize(dst)) as usize,
        "copy_node_ptrs: destination too full"
    );
    assert!(header_level(dst) > 0, "copy_node_ptrs into a leaf");
    if dst_slot < dst_nr {
        dst.copy_within(key_ptr_offset(dst_slot)..key_ptr_offset(dst_nr), key_ptr_offset(dst_slot + nr));
    }
    dst[key_ptr_offset(dst_slot)..key_ptr_offset(dst_slot + nr)]
        .copy_from_slice(&src[key_ptr_offset(src_slot)..key_ptr_offset(src_slot + nr)]);
    set_header_nritems(dst, (dst_nr + nr) as u32);
}

/// Move key pointers from `src` to `dst` (copy, then remove from `src`).
pub fn move_node_ptrs(src: &mut [u8], src_slot: usize, dst: &mut [u8], dst_slot: usize, nr: usize) {
    copy_node_ptrs(src, src_slot, dst, dst_slot, nr);
    remove_ptrs(src, src_slot, nr);
}

// ---------------------------------------------------------------------------
// Leaves: item headers.

/// Byte offset of item header `nr` (`btrfs_item_nr_offset`).
pub const fn item_nr_offset(nr: usize) -> usize {
    HEADER_SIZE + nr * ITEM_SIZE
}

pub fn item_key(eb: &[u8], nr: usize) -> Key {
    Key::read(&eb[item_nr_offset(nr)..])
}
pub fn set_item_key(eb: &mut [u8], nr: usize, key: &Key) {
    key.write(&mut eb[item_nr_offset(nr)..])
}
/// Start of item `nr`'s data, relative to the end of the header.
pub fn item_offset(eb: &[u8], nr: usize) -> u32 {
    get_u32(eb, item_nr_offset(nr) + DISK_KEY_SIZE)
}
pub fn set_item_offset(eb: &mut [u8], nr: usize, v: u32) {
    put_u32(eb, item_nr_offset(nr) + DISK_KEY_SIZE, v)
}
pub fn item_size(eb: &[u8], nr: usize) -> u32 {
    get_u32(eb, item_nr_offset(nr) + DISK_KEY_SIZE + 4)
}
pub fn set_item_size(eb: &mut [u8], nr: usize, v: u32) {
    put_u32(eb, item_nr_offset(nr) + DISK_KEY_SIZE + 4, v)
}
/// End of item `nr`'s data, relative to the end of the header
/// (`btrfs_item_data_end`).
pub fn item_data_end(eb: &[u8], nr: usize) -> u32 {
    item_offset(eb, nr) + item_size(eb, nr)
}
/// Byte offset of item `nr`'s data in the block (`btrfs_item_ptr_offset`).
pub fn item_ptr_offset(eb: &[u8], nr: usize) -> usize {
    HEADER_SIZE + item_offset(eb, nr) as usize
}
pub fn item_data(eb: &[u8], nr: usize) -> &[u8] {
    let start = item_ptr_offset(eb, nr);
    &eb[start..start + item_size(eb, nr) as usize]
}
pub fn item_data_mut(eb: &mut [u8], nr: usize) -> &mut [u8] {
    let start = item_ptr_offset(eb, nr);
    let size = item_size(eb, nr) as usize;
    &mut eb[start..start + size]
}

/// Where the item data area starts (relative to the end of the header):
/// the offset of the last item, or `leaf_data_size` for an empty leaf.
pub fn leaf_data_end(eb: &[u8]) -> u32 {
    let nritems = header_nritems(eb) as usize;
    if nritems == 0 { leaf_data_size(nodesize(eb)) } else { item_offset(eb, nritems - 1) }
}

/// Bytes used by items `[start, start + nr)`: their data plus their headers
/// (ctree.c's `leaf_space_used`).
pub fn leaf_space_used(eb: &[u8], start: usize, nr: usize) -> u32 {
    if nr == 0 {
        return 0;
    }
    let end = start + nr - 1;
    item_data_end(eb, start) - item_offset(eb, end) + (ITEM_SIZE * nr) as u32
}

/// Free bytes in a leaf (`btrfs_leaf_free_space`):
/// `leaf_data_size - (data of all items) - 25 * nritems`.
pub fn leaf_free_space(eb: &[u8]) -> u32 {
    let nritems = header_nritems(eb) as usize;
    let used = leaf_space_used(eb, 0, nritems);
    leaf_data_size(nodesize(eb))
        .checked_sub(used)
        .unwrap_or_else(|| panic!("leaf {} uses {used} bytes, more than fits", header_bytenr(eb)))
}

// ---------------------------------------------------------------------------
// Leaves: moving items.

/// Open room for new items at `slot` whose data sizes total `total_data`:
/// shift item headers from `slot` on right by `nr`, their data down by
/// `total_data`, and fix their offsets. Returns the end (relative to the
/// leaf data area) of the hole left for the new items' data, which lies in
/// `[end - total_data, end)`. Does not write the new item headers or
/// nritems.
fn open_items(eb: &mut [u8], slot: usize, nr: usize, total_data: u32) -> u32 {
    let nritems = header_nritems(eb) as usize;
    assert!(slot <= nritems, "slot {slot} > nritems {nritems}");
    let need = total_data + (nr * ITEM_SIZE) as u32;
    let free = leaf_free_space(eb);
    assert!(
        need <= free,
        "leaf {}: no room for {nr} items of {total_data} bytes ({need} needed, {free} free)",
        header_bytenr(eb)
    );
    let data_end = leaf_data_end(eb);
    if slot == nritems {
        return data_end;
    }
    let old_data = item_data_end(eb, slot);
    assert!(old_data >= data_end);
    for i in slot..nritems {
        let off = item_offset(eb, i);
        set_item_offset(eb, i, off - total_data);
    }
    eb.copy_within(item_nr_offset(slot)..item_nr_offset(nritems), item_nr_offset(slot + nr));
    let (d0, d1) = (HEADER_SIZE + data_end as usize, HEADER_SIZE + old_data as usize);
    eb.copy_within(d0..d1, d0 - total_data as usize);
    old_data
}

/// Insert `keys.len()` empty items at `slot` with the given data sizes
/// (the byte part of `setup_items_for_insert`). Their data is zeroed.
/// Panics when they do not fit (`leaf_free_space` is less than the sum of
/// `data_sizes` plus 25 per item) or `slot > nritems`. Keys are not checked
/// for order, and slot 0's key change is not propagated to the parents.
pub fn insert_empty_items_in_leaf(eb: &mut [u8], slot: usize, keys: &[Key], data_sizes: &[u32]) {
    assert_eq!(keys.len(), data_sizes.len());
    let nr = keys.len();
    if nr == 0 {
        return;
    }
    assert_eq!(header_level(eb), 0, "inserting items into a node");
    let total: u32 = data_sizes.iter().sum();
    let mut end = open_items(eb, slot, nr, total);
    let hole_end = end as usize + HEADER_SIZE;
    eb[hole_end - total as usize..hole_end].fill(0);
    for (i, (key, &size)) in keys.iter().zip(data_sizes).enumerate() {
        end -= size;
        set_item_key(eb, slot + i, key);
        set_item_offset(eb, slot + i, end);
        set_item_size(eb, slot + i, size);
    }
    let nritems = header_nritems(eb);
    set_header_nritems(eb, nritems + nr as u32);
}

/// Insert one item with `data` at `slot` (`btrfs_insert_item`'s bytes).
pub fn insert_item_in_leaf(eb: &mut [u8], slot: usize, key: &Key, data: &[u8]) {
    insert_empty_items_in_leaf(eb, slot, std::slice::from_ref(key), &[data.len() as u32]);
    item_data_mut(eb, slot).copy_from_slice(data);
}

/// Delete items `[slot, slot + nr)` (the byte part of `btrfs_del_items`):
/// the data of the items after them moves up, their headers move down.
pub fn del_items_in_leaf(eb: &mut [u8], slot: usize, nr: usize) {
    let nritems = header_nritems(eb) as usize;
    assert!(slot + nr <= nritems, "del_items {slot}+{nr} > nritems {nritems}");
    if nr == 0 {
        return;
    }
    let data_end = leaf_data_end(eb);
    let last_off = item_offset(eb, slot + nr - 1);
    let dsize = item_data_end(eb, slot) - last_off;
    if slot + nr < nritems {
        let (d0, d1) = (HEADER_SIZE + data_end as usize, HEADER_SIZE + last_off as usize);
        eb.copy_within(d0..d1, d0 + dsize as usize);
        for i in slot + nr..nritems {
            let off = item_offset(eb, i);
            set_item_offset(eb, i, off + dsize);
        }
        eb.copy_within(item_nr_offset(slot + nr)..item_nr_offset(nritems), item_nr_offset(slot));
    }
    // Clear the vacated headers and data.
    eb[item_nr_offset(nritems - nr)..item_nr_offset(nritems)].fill(0);
    let z = HEADER_SIZE + data_end as usize;
    eb[z..z + dsize as usize].fill(0);
    set_header_nritems(eb, (nritems - nr) as u32);
}

/// Grow item `slot` by `data_size` bytes at its end (`btrfs_extend_item`).
/// The new bytes are zero. Panics when the leaf lacks the room.
pub fn extend_item(eb: &mut [u8], slot: usize, data_size: u32) {
    let nritems = header_nritems(eb) as usize;
    assert!(slot < nritems, "extend_item slot {slot} >= nritems {nritems}");
    let free = leaf_free_space(eb);
    assert!(data_size <= free, "leaf {}: cannot extend item by {data_size}, {free} free", header_bytenr(eb));
    let data_end = leaf_data_end(eb);
    let old_data = item_data_end(eb, slot);
    for i in slot..nritems {
        let off = item_offset(eb, i);
        set_item_offset(eb, i, off - data_size);
    }
    let (d0, d1) = (HEADER_SIZE + data_end as usize, HEADER_SIZE + old_data as usize);
    eb.copy_within(d0..d1, d0 - data_size as usize);
    eb[d1 - data_size as usize..d1].fill(0);
    let old_size = item_size(eb, slot);
    set_item_size(eb, slot, old_size + data_size);
}

/// Shrink item `slot` to `new_size` bytes (`btrfs_truncate_item`). With
/// `from_end` the item keeps its first `new_size` bytes; otherwise it keeps
/// its last ones and its key offset grows by the bytes cut (as the kernel
/// does; for an inline EXTENT_DATA item the 21-byte file extent head is
/// kept at the front). A changed key at slot 0 is the caller's to
/// propagate.
pub fn truncate_item(eb: &mut [u8], slot: usize, new_size: u32, from_end: bool) {
    let nritems = header_nritems(eb) as usize;
    assert!(slot < nritems, "truncate_item slot {slot} >= nritems {nritems}");
    let old_size = item_size(eb, slot);
    assert!(new_size <= old_size, "truncate_item cannot grow an item");
    if new_size == old_size {
        return;
    }
    let data_end = leaf_data_end(eb);
    let old_start = item_offset(eb, slot);
    let diff = old_size - new_size;
    for i in slot..nritems {
        let off = item_offset(eb, i);
        set_item_offset(eb, i, off + diff);
    }
    let d0 = HEADER_SIZE + data_end as usize;
    if from_end {
        let d1 = HEADER_SIZE + (old_start + new_size) as usize;
        eb.copy_within(d0..d1, d0 + diff as usize);
    } else {
        let mut key = item_key(eb, slot);
        let s = HEADER_SIZE + old_start as usize;
        if key.item_type == EXTENT_DATA_KEY
            && old_size as usize >= FILE_EXTENT_INLINE_DATA_START
            && eb[s + 20] == FILE_EXTENT_INLINE
        {
            assert!(
                new_size as usize >= FILE_EXTENT_INLINE_DATA_START,
                "truncating an inline extent into its head"
            );
            eb.copy_within(s..s + FILE_EXTENT_INLINE_DATA_START, s + diff as usize);
        }
        eb.copy_within(d0..s, d0 + diff as usize);
        key.offset = key.offset.wrapping_add(diff as u64);
        set_item_key(eb, slot, &key);
    }
    eb[d0..d0 + diff as usize].fill(0);
    set_item_size(eb, slot, new_size);
}

/// Copy items `[src_slot, src_slot + nr)` of leaf `src` (keys and data)
/// into leaf `dst` at `dst_slot`, shifting `dst`'s items from `dst_slot` on
/// and fixing every offset. `src` is unchanged. This is the copy
/// `split_leaf` (into an empty leaf), `push_leaf_left` (append) and
/// `push_leaf_right` (prepend) do. Panics when `dst` lacks the room.
pub fn copy_items(src: &[u8], src_slot: usize, nr: usize, dst: &mut [u8], dst_slot: usize) {
    assert_eq!(src.len(), dst.len(), "copy_items between nodesizes");
    assert_eq!(header_level(src), 0, "copy_items from a node");
    assert_eq!(header_level(dst), 0, "copy_items into a node");
    let src_nr = header_nritems(src) as usize;
    assert!(src_slot + nr <= src_nr, "copy_items past the source");
    if nr == 0 {
        return;
    }
    // The items' data is one contiguous run in the source.
    let src_lo = item_offset(src, src_slot + nr - 1);
    let src_hi = item_data_end(src, src_slot);
    let total = src_hi - src_lo;
    let hole_end = open_items(dst, dst_slot, nr, total);
    let hole_start = hole_end - total;
    dst[HEADER_SIZE + hole_start as usize..HEADER_SIZE + hole_end as usize]
        .copy_from_slice(&src[HEADER_SIZE + src_lo as usize..HEADER_SIZE + src_hi as usize]);
    dst[item_nr_offset(dst_slot)..item_nr_offset(dst_slot + nr)]
        .copy_from_slice(&src[item_nr_offset(src_slot)..item_nr_offset(src_slot + nr)]);
    for i in dst_slot..dst_slot + nr {
        let off = item_offset(dst, i);
        set_item_offset(dst, i, off - src_lo + hole_start);
    }
    let dst_nr = header_nritems(dst);
    set_header_nritems(dst, dst_nr + nr as u32);
}

/// Move items from leaf `src` to leaf `dst` (copy, then delete from `src`).
pub fn move_items(src: &mut [u8], src_slot: usize, nr: usize, dst: &mut [u8], dst_slot: usize) {
    copy_items(src, src_slot, nr, dst, dst_slot);
    del_items_in_leaf(src, src_slot, nr);
}

// ---------------------------------------------------------------------------
// Debugging.

/// A multi-line description of a tree block, in the spirit of
/// `btrfs_print_leaf` / `btrfs inspect-internal dump-tree`.
pub fn dump_tree_block(eb: &[u8]) -> String {
    let mut s = String::new();
    let level = header_level(eb);
    let nritems = header_nritems(eb) as usize;
    let kind = if level == 0 { "leaf" } else { "node" };
    let _ = write!(
        s,
        "{kind} {} level {level} items {nritems} generation {} owner {} flags {:#x} backref rev {}",
        header_bytenr(eb),
        header_generation(eb),
        header_owner(eb),
        header_flags(eb) & FLAGS_MASK,
        header_backref_rev(eb),
    );
    if level == 0 {
        let cap = (eb.len() - HEADER_SIZE) / ITEM_SIZE;
        // Computed by hand so that a corrupt leaf can still be dumped.
        let used = match nritems {
            0 => 0,
            n if n <= cap => {
                item_data_end(eb, 0) as i64 - item_offset(eb, n - 1) as i64 + (ITEM_SIZE * n) as i64
            }
            _ => i64::MAX,
        };
        let _ = write!(s, " free space {}", leaf_data_size(nodesize(eb)) as i64 - used);
        s.push('\n');
        for i in 0..nritems.min(cap) {
            let k = item_key(eb, i);
            let _ = writeln!(
                s,
                "\titem {i} key ({} {} {}) itemoff {} itemsize {}",
                k.objectid,
                key_type_name(k.item_type),
                k.offset,
                item_offset(eb, i),
                item_size(eb, i)
            );
        }
    } else {
        s.push('\n');
        let cap = (eb.len() - HEADER_SIZE) / KEY_PTR_SIZE;
        for i in 0..nritems.min(cap) {
            let k = node_key(eb, i);
            let _ = writeln!(
                s,
                "\tkey ({} {} {}) block {} gen {}",
                k.objectid,
                key_type_name(k.item_type),
                k.offset,
                node_blockptr(eb, i),
                node_ptr_generation(eb, i)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        CSUM_TREE_OBJECTID, HEADER_FLAG_RELOC, HEADER_FLAG_WRITTEN, INODE_ITEM_KEY, ORPHAN_ITEM_KEY, testdata,
    };
    use crate::tree_checker::{check_leaf, check_node};
    use proptest::prelude::*;

    const NODESIZES: [u32; 3] = [4096, 16384, 65536];

    fn new_block(nodesize: u32, level: u8) -> Vec<u8> {
        let mut b = vec![0xa5u8; nodesize as usize];
        init_tree_block(
            &mut b,
            &NewBlockHeader {
                bytenr: 30 << 20,
                generation: 7,
                owner: CSUM_TREE_OBJECTID,
                level,
                fsid: [1; 16],
                chunk_tree_uuid: [2; 16],
            },
        );
        b
    }

    /// The leaf's items as (key, data).
    fn items(eb: &[u8]) -> Vec<(Key, Vec<u8>)> {
        (0..header_nritems(eb) as usize).map(|i| (item_key(eb, i), item_data(eb, i).to_vec())).collect()
    }

    fn ptrs(eb: &[u8]) -> Vec<(Key, u64, u64)> {
        (0..header_nritems(eb) as usize)
            .map(|i| (node_key(eb, i), node_blockptr(eb, i), node_ptr_generation(eb, i)))
            .collect()
    }

    /// Free-space formula of the spec, the layout invariants, and that the
    /// unused middle of the block is zero.
    fn assert_leaf_sane(eb: &[u8]) {
        let n = header_nritems(eb) as usize;
        let lds = leaf_data_size(eb.len() as u32);
        let sum: u32 = (0..n).map(|i| item_size(eb, i)).sum();
        assert_eq!(leaf_free_space(eb), lds - sum - 25 * n as u32);
        let mut end = lds;
        for i in 0..n {
            assert_eq!(item_data_end(eb, i), end, "item {i} not packed");
            end = item_offset(eb, i);
        }
        let gap = &eb[item_nr_offset(n)..HEADER_SIZE + leaf_data_end(eb) as usize];
        assert!(gap.iter().all(|&b| b == 0), "free space not zeroed");
        check_leaf(eb, eb.len() as u32, Some(CSUM_TREE_OBJECTID))
            .unwrap_or_else(|e| panic!("{e}\n{}", dump_tree_block(eb)));
    }

    #[test]
    fn header_fields() {
        let mut b = new_block(16384, 1);
        assert_eq!(header_bytenr(&b), 30 << 20);
        assert_eq!(header_generation(&b), 7);
        assert_eq!(header_owner(&b), 7);
        assert_eq!(header_level(&b), 1);
        assert_eq!(header_nritems(&b), 0);
        assert_eq!(header_fsid(&b), [1; 16]);
        assert_eq!(header_chunk_tree_uuid(&b), [2; 16]);
        assert_eq!(header_backref_rev(&b), MIXED_BACKREF_REV);
        assert!(!header_flag(&b, HEADER_FLAG_WRITTEN));
        set_header_flag(&mut b, HEADER_FLAG_WRITTEN);
        set_header_flag(&mut b, HEADER_FLAG_RELOC);
        assert_eq!(header_flags(&b), (1 << 56) | 3);
        clear_header_flag(&mut b, HEADER_FLAG_RELOC);
        assert!(header_flag(&b, HEADER_FLAG_WRITTEN));
        assert!(!header_flag(&b, HEADER_FLAG_RELOC));
        assert_eq!(header_backref_rev(&b), 1);
        set_header_nritems(&mut b, 0x01020304);
        assert_eq!(&b[96..100], &[4, 3, 2, 1]);
        set_header_level(&mut b, 3);
        assert_eq!(b[100], 3);
        write_header_csum(&mut b);
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), csum_tree_block(&b));
        assert!(b[4..32].iter().all(|&x| x == 0));
    }

    /// The header and item fields of a real leaf read back as
    /// `btrfs inspect-internal dump-tree` printed them.
    #[test]
    fn real_leaf_fields() {
        let b = testdata::block(testdata::FS_LEAF);
        assert_eq!(header_bytenr(&b), testdata::FS_LEAF_BYTENR);
        assert_eq!(header_generation(&b), 7);
        assert_eq!(header_owner(&b), 5);
        assert_eq!(header_nritems(&b), 23);
        assert_eq!(header_level(&b), 0);
        assert_eq!(header_flags(&b), (1 << 56) | HEADER_FLAG_WRITTEN);
        assert_eq!(header_fsid(&b)[..4], [0x6e, 0x52, 0x66, 0x98], "fsid 6e526698-...");
        assert_eq!(header_chunk_tree_uuid(&b)[..4], [0xcd, 0x45, 0xe2, 0xf5]);
        assert_eq!(leaf_free_space(&b), 2023);
        let expect = [
            (0, Key::new(256, INODE_ITEM_KEY, 0), 3835, 160),
            (1, Key::new(256, 12, 256), 3823, 12),
            (2, Key::new(256, 84, 481053471), 3790, 33),
            (9, Key::new(256, 96, 5), 3551, 33),
            (22, Key::new(261, EXTENT_DATA_KEY, 0), 2598, 24),
        ];
        for (slot, key, off, size) in expect {
            assert_eq!(item_key(&b, slot), key);
            assert_eq!(item_offset(&b, slot), off);
            assert_eq!(item_size(&b, slot), size);
        }
        let fe = crate::format::FileExtentItem::read(item_data(&b, 22)).unwrap();
        assert_eq!(fe, crate::format::FileExtentItem::inline(7, b"hi\n".to_vec()));
        let node = testdata::block(testdata::FS_NODE);
        assert_eq!(header_level(&node), 1);
        assert_eq!(header_nritems(&node), 11);
        assert_eq!(node_key(&node, 1), Key::new(256, 84, 2093708679));
        assert_eq!(node_blockptr(&node, 1), 30429184);
        assert_eq!(node_ptr_generation(&node, 5), 7);
        assert_eq!(node_blockptr(&node, 10), 30543872);
        assert_eq!(node_key(&node, 10), Key::new(350, INODE_ITEM_KEY, 0));
        // The real leaf is packed the way the accessors pack, so deleting
        // and reinserting every item reproduces it byte for byte.
        let mut copy = b.clone();
        let all = items(&b);
        del_items_in_leaf(&mut copy, 0, all.len());
        for (i, (k, d)) in all.iter().enumerate() {
            insert_item_in_leaf(&mut copy, i, k, d);
        }
        assert_eq!(copy[..item_nr_offset(23)], b[..item_nr_offset(23)], "headers and item headers");
        let de = HEADER_SIZE + leaf_data_end(&b) as usize;
        assert_eq!(copy[de..], b[de..], "item data");
    }

    #[test]
    fn insert_ptr_and_remove() {
        for ns in NODESIZES {
            let mut b = new_block(ns, 1);
            let cap = nodeptrs_per_block(ns) as usize;
            for i in 0..cap {
                // insert in reverse to exercise the shifting
                insert_ptr(&mut b, 0, &Key::new((cap - i) as u64, 1, 0), ((cap - i) as u64) << 14, i as u64);
            }
            assert_eq!(header_nritems(&b), cap as u32);
            for i in 0..cap {
                assert_eq!(node_key(&b, i).objectid, i as u64 + 1);
                assert_eq!(node_blockptr(&b, i), (i as u64 + 1) << 14);
            }
            check_node(&b, ns, None).unwrap();
            assert!(
                std::panic::catch_unwind(move || {
                    let mut b = b;
                    insert_ptr(&mut b, 0, &Key::default(), 1 << 14, 1)
                })
                .is_err(),
                "a full node takes no more"
            );
        }
        let mut b = new_block(16384, 1);
        insert_ptr(&mut b, 0, &Key::new(1, 1, 0), 16384, 1);
        insert_ptr(&mut b, 1, &Key::new(3, 1, 0), 3 * 16384, 1);
        insert_ptr(&mut b, 1, &Key::new(2, 1, 0), 2 * 16384, 1);
        remove_ptr(&mut b, 0);
        assert_eq!(ptrs(&b), vec![(Key::new(2, 1, 0), 2 * 16384, 1), (Key::new(3, 1, 0), 3 * 16384, 1)]);
        assert!(b[key_ptr_offset(2)..].iter().all(|&x| x == 0));
    }

    #[test]
    fn empty_leaf_free_space() {
        for ns in NODESIZES {
            let b = new_block(ns, 0);
            assert_eq!(leaf_free_space(&b), ns - 101);
            assert_eq!(leaf_data_end(&b), ns - 101);
        }
        assert_eq!(leaf_free_space(&new_block(16384, 0)), 16283);
    }

    #[test]
    fn fill_a_leaf_exactly() {
        // 87 items of 160 bytes use 87 * 185 = 16095 of 16283; one more of
        // 188 - 25 = 163 bytes fills the leaf to the byte.
        let mut b = new_block(16384, 0);
        for slot in 0..87 {
            insert_empty_items_in_leaf(&mut b, slot, &[Key::new(256 + slot as u64, 1, 0)], &[160]);
        }
        assert_eq!(leaf_free_space(&b), 188);
        insert_empty_items_in_leaf(&mut b, 87, &[Key::new(256 + 87, 1, 0)], &[163]);
        assert_eq!(leaf_free_space(&b), 0);
        assert_eq!(item_nr_offset(header_nritems(&b) as usize), HEADER_SIZE + item_offset(&b, 87) as usize);
        let full = b.clone();
        assert!(
            std::panic::catch_unwind(move || {
                let mut b = full;
                insert_empty_items_in_leaf(&mut b, 0, &[Key::new(1, 1, 0)], &[0])
            })
            .is_err()
        );
    }

    #[test]
    fn truncate_inline_extent_from_front_keeps_head() {
        let mut b = new_block(4096, 0);
        let fe = crate::format::FileExtentItem::inline(7, b"0123456789".to_vec());
        insert_item_in_leaf(&mut b, 0, &Key::new(257, INODE_ITEM_KEY, 0), &[0; 160]);
        insert_item_in_leaf(&mut b, 1, &Key::new(257, EXTENT_DATA_KEY, 0), &fe.to_bytes());
        insert_item_in_leaf(&mut b, 2, &Key::new(258, INODE_ITEM_KEY, 0), &[0; 160]);
        truncate_item(&mut b, 1, 21 + 4, false);
        let d = item_data(&b, 1);
        assert_eq!(&d[..21], &fe.to_bytes()[..21]);
        assert_eq!(&d[21..], b"6789");
        // The kernel moves the key offset by the bytes cut from the front.
        assert_eq!(item_key(&b, 1), Key::new(257, EXTENT_DATA_KEY, 6));
        assert_eq!(item_data(&b, 2), &[0; 160]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert { key: u32, sizes: Vec<u16>, fill: u8 },
        Delete { at: u16, nr: u16 },
        Extend { at: u16, by: u16 },
        Truncate { at: u16, keep: u16, from_end: bool },
        Write { at: u16, fill: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<u32>(), prop::collection::vec(0u16..600, 1..4), any::<u8>())
                .prop_map(|(key, sizes, fill)| Op::Insert { key, sizes, fill }),
            2 => (any::<u16>(), 1u16..4).prop_map(|(at, nr)| Op::Delete { at, nr }),
            1 => (any::<u16>(), 0u16..300).prop_map(|(at, by)| Op::Extend { at, by }),
            1 => (any::<u16>(), any::<u16>(), any::<bool>())
                .prop_map(|(at, keep, from_end)| Op::Truncate { at, keep, from_end }),
            1 => (any::<u16>(), any::<u8>()).prop_map(|(at, fill)| Op::Write { at, fill }),
        ]
    }

    /// Keys sparse enough that a front truncation (which adds the bytes cut
    /// to the key offset) never reaches the next key: batches start 2^28
    /// apart and their keys are 2^20 apart, more than a run can ever cut.
    fn model_key(k: u32) -> Key {
        Key::new(256 + (k % 64) as u64, ORPHAN_ITEM_KEY, ((k / 64) as u64) << 28)
    }

    fn run_ops(nodesize: u32, ops: &[Op]) {
        let mut b = new_block(nodesize, 0);
        let mut model: Vec<(Key, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                Op::Insert { key, sizes, fill } => {
                    let first = model_key(*key);
                    let slot = model.partition_point(|(k, _)| *k < first);
                    // consecutive offsets, none present yet
                    let keys: Vec<Key> = (0..sizes.len() as u64)
                        .map(|i| Key::new(first.objectid, first.item_type, first.offset + (i << 20)))
                        .collect();
                    let next = model.get(slot).map(|(k, _)| *k);
                    if keys.iter().any(|k| Some(*k) == next || model.iter().any(|(m, _)| m == k)) {
                        continue;
                    }
                    if next.is_some_and(|n| *keys.last().unwrap() >= n) {
                        continue;
                    }
                    let sizes: Vec<u32> = sizes.iter().map(|&s| s as u32).collect();
                    let need: u32 = sizes.iter().sum::<u32>() + 25 * sizes.len() as u32;
                    if need > leaf_free_space(&b) {
                        continue;
                    }
                    insert_empty_items_in_leaf(&mut b, slot, &keys, &sizes);
                    for (i, (k, s)) in keys.iter().zip(&sizes).enumerate() {
                        assert!(item_data(&b, slot + i).iter().all(|&x| x == 0));
                        let data: Vec<u8> = (0..*s).map(|j| fill.wrapping_add(j as u8)).collect();
                        item_data_mut(&mut b, slot + i).copy_from_slice(&data);
                        model.insert(slot + i, (*k, data));
                    }
                }
                Op::Delete { at, nr } => {
                    if model.is_empty() {
                        continue;
                    }
                    let at = *at as usize % model.len();
                    let nr = (*nr as usize).min(model.len() - at);
                    del_items_in_leaf(&mut b, at, nr);
                    model.drain(at..at + nr);
                }
                Op::Extend { at, by } => {
                    if model.is_empty() || (*by as u32) > leaf_free_space(&b) {
                        continue;
                    }
                    let at = *at as usize % model.len();
                    extend_item(&mut b, at, *by as u32);
                    model[at].1.extend(std::iter::repeat_n(0, *by as usize));
                }
                Op::Truncate { at, keep, from_end } => {
                    if model.is_empty() {
                        continue;
                    }
                    let at = *at as usize % model.len();
                    let old = model[at].1.len();
                    let keep = *keep as usize % (old + 1);
                    truncate_item(&mut b, at, keep as u32, *from_end);
                    let (k, d) = &mut model[at];
                    if *from_end {
                        d.truncate(keep);
                    } else {
                        d.drain(..old - keep);
                        k.offset += (old - keep) as u64;
                    }
                }
                Op::Write { at, fill } => {
                    if model.is_empty() {
                        continue;
                    }
                    let at = *at as usize % model.len();
                    item_data_mut(&mut b, at).fill(*fill);
                    model[at].1.fill(*fill);
                }
            }
            assert_eq!(items(&b), model);
            assert_leaf_sane(&b);
        }
    }

    /// Split a leaf at `mid` into an empty right leaf, push some of it back
    /// left, then push from the left into the right, comparing with the
    /// concatenation of the items.
    fn run_split_push(nodesize: u32, sizes: &[u16], mid: usize, back: usize, fwd: usize) {
        let mut left = new_block(nodesize, 0);
        let mut all = Vec::new();
        for (i, s) in sizes.iter().enumerate() {
            let need = *s as u32 + 25;
            if need > leaf_free_space(&left) {
                break;
            }
            let k = Key::new(256 + i as u64, ORPHAN_ITEM_KEY, 0);
            let d: Vec<u8> = (0..*s).map(|j| (i + j as usize) as u8).collect();
            insert_item_in_leaf(&mut left, i, &k, &d);
            all.push((k, d));
        }
        let n = all.len();
        let mid = mid % (n + 1);
        let mut right = new_block(nodesize, 0);
        // split_leaf: the tail goes to a new right leaf
        move_items(&mut left, mid, n - mid, &mut right, 0);
        assert_eq!(items(&left), all[..mid]);
        assert_eq!(items(&right), all[mid..]);
        assert_leaf_sane(&left);
        assert_leaf_sane(&right);
        // push_leaf_left: the first items of right go to the end of left
        let back = back % (n - mid + 1);
        move_items(&mut right, 0, back, &mut left, mid);
        let cut = mid + back;
        assert_eq!(items(&left), all[..cut]);
        assert_eq!(items(&right), all[cut..]);
        assert_leaf_sane(&left);
        assert_leaf_sane(&right);
        // push_leaf_right: the last items of left go to the front of right
        let fwd = fwd % (cut + 1);
        let need = leaf_space_used(&left, cut - fwd, fwd);
        if need <= leaf_free_space(&right) {
            move_items(&mut left, cut - fwd, fwd, &mut right, 0);
            let cut = cut - fwd;
            assert_eq!(items(&left), all[..cut]);
            assert_eq!(items(&right), all[cut..]);
            assert_leaf_sane(&left);
            assert_leaf_sane(&right);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn leaf_ops_match_model_4k(ops in prop::collection::vec(op(), 1..120)) {
            run_ops(4096, &ops);
        }

        #[test]
        fn leaf_ops_match_model_16k(ops in prop::collection::vec(op(), 1..200)) {
            run_ops(16384, &ops);
        }

        #[test]
        fn leaf_ops_match_model_64k(ops in prop::collection::vec(op(), 1..300)) {
            run_ops(65536, &ops);
        }

        #[test]
        fn leaf_split_and_push(
            ns in prop::sample::select(NODESIZES.to_vec()),
            sizes in prop::collection::vec(0u16..900, 0..200),
            mid in any::<usize>(), back in any::<usize>(), fwd in any::<usize>(),
        ) {
            run_split_push(ns, &sizes, mid, back, fwd);
        }

        #[test]
        fn node_ops_match_model(
            ns in prop::sample::select(NODESIZES.to_vec()),
            ops in prop::collection::vec((any::<u16>(), any::<bool>(), 1u16..40), 1..200),
            split in any::<usize>(),
        ) {
            let mut b = new_block(ns, 1);
            let cap = nodeptrs_per_block(ns) as usize;
            let mut model: Vec<(Key, u64, u64)> = Vec::new();
            for (k, ins, nr) in ops {
                if ins {
                    let key = Key::new(k as u64, 1, 0);
                    if model.iter().any(|(m, _, _)| *m == key) || model.len() == cap {
                        continue;
                    }
                    let slot = model.partition_point(|(m, _, _)| *m < key);
                    let ptr = (k as u64 + 1) * ns as u64;
                    insert_ptr(&mut b, slot, &key, ptr, k as u64 / 7);
                    model.insert(slot, (key, ptr, k as u64 / 7));
                } else if !model.is_empty() {
                    let slot = k as usize % model.len();
                    let nr = (nr as usize).min(model.len() - slot);
                    remove_ptrs(&mut b, slot, nr);
                    model.drain(slot..slot + nr);
                }
                prop_assert_eq!(ptrs(&b), model.clone());
                prop_assert!(b[key_ptr_offset(model.len())..].iter().all(|&x| x == 0));
                if !model.is_empty() {
                    check_node(&b, ns, Some(CSUM_TREE_OBJECTID)).unwrap();
                }
            }
            // split_node into an empty right node, then push back left
            let n = model.len();
            let mid = split % (n + 1);
            let mut right = new_block(ns, 1);
            move_node_ptrs(&mut b, mid, &mut right, 0, n - mid);
            prop_assert_eq!(ptrs(&b), model[..mid].to_vec());
            prop_assert_eq!(ptrs(&right), model[mid..].to_vec());
            let back = (n - mid) / 2;
            move_node_ptrs(&mut right, 0, &mut b, mid, back);
            prop_assert_eq!(ptrs(&b), model[..mid + back].to_vec());
            prop_assert_eq!(ptrs(&right), model[mid + back..].to_vec());
            // balance_node_right: the tail of the left goes to the front
            let fwd = (mid + back) / 3;
            move_node_ptrs(&mut b, mid + back - fwd, &mut right, 0, fwd);
            prop_assert_eq!(ptrs(&b), model[..mid + back - fwd].to_vec());
            prop_assert_eq!(ptrs(&right), model[mid + back - fwd..].to_vec());
            prop_assert!(b[key_ptr_offset(mid + back - fwd)..].iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn dump_mentions_items() {
        let b = testdata::block(testdata::FS_LEAF);
        let d = dump_tree_block(&b);
        assert!(d.starts_with("leaf 30457856 level 0 items 23 generation 7 owner 5"));
        assert!(d.contains("free space 2023"));
        assert!(d.contains("item 3 key (256 DIR_ITEM 1570712351) itemoff 3755 itemsize 35"));
        let n = testdata::block(testdata::FS_NODE);
        assert!(dump_tree_block(&n).contains("key (275 INODE_ITEM 0) block 30502912 gen 7"));
    }
}
