//! Validation of tree block images, after fs/btrfs/tree-checker.c (the
//! checks run on every block read and before every block write) and the
//! read-time checks of disk-io.c's `btrfs_validate_extent_buffer`.
//!
//! What is checked, as in the kernel:
//! - leaves: level 0; an empty leaf only for trees that may be empty; keys
//!   strictly increasing; item data packed from the end of the block (item
//!   i ends where item i-1 starts, item 0 ends at `leaf_data_size`), inside
//!   the leaf and not overlapping the item headers; then the contents of
//!   every item of a known type (`check_leaf_item`);
//! - nodes: level 1..=7; 1 ..= `nodeptrs_per_block` pointers; non-zero,
//!   sector-aligned block pointers; keys strictly increasing;
//! - optionally the owner (`btrfs_check_eb_owner`);
//! - at read time: bytenr, fsid, checksum, level, transid (the "parent
//!   transid verify failed" case) and first key against what the parent
//!   pointer promised.
//!
//! Differences from the kernel: the generation checks against the super
//! block's generation (inode, root and extent items) are left out, as the
//! checker is given no super block; the leaf's nritems is bounded up front
//! (the kernel relies on its extent buffer bounds checks instead); every
//! node pointer is checked, the last one included; simple-quota owner refs
//! (EXTENT_OWNER_REF inline refs) are not accepted.

use std::fmt;

use crate::accessors::{
    header_bytenr, header_flag, header_fsid, header_level, header_nritems, header_owner, item_data, item_key,
    item_nr_offset, item_offset, item_ptr_offset, item_size, node_blockptr, node_key,
};
use crate::format::{
    BLOCK_FLAG_FULL_BACKREF, BLOCK_GROUP_DATA, BLOCK_GROUP_ITEM_KEY, BLOCK_GROUP_ITEM_SIZE,
    BLOCK_GROUP_METADATA, BLOCK_GROUP_PROFILE_MASK, BLOCK_GROUP_SYSTEM, BLOCK_GROUP_TYPE_MASK,
    BlockGroupItem, CHUNK_ITEM_KEY, CHUNK_ITEM_SIZE, CHUNK_TREE_OBJECTID, COMPRESS_NONE, CRC32C_CSUM_SIZE,
    DATA_RELOC_TREE_OBJECTID, DEV_ITEM_KEY, DEV_ITEM_SIZE, DEV_ITEMS_OBJECTID, DEV_TREE_OBJECTID,
    DIR_INDEX_KEY, DIR_ITEM_KEY, DIR_ITEM_SIZE, EXTENT_CSUM_KEY, EXTENT_CSUM_OBJECTID, EXTENT_DATA_KEY,
    EXTENT_DATA_REF_KEY, EXTENT_DATA_REF_SIZE, EXTENT_FLAG_DATA, EXTENT_FLAG_TREE_BLOCK,
    EXTENT_INLINE_REF_SIZE, EXTENT_ITEM_KEY, EXTENT_ITEM_SIZE, EXTENT_TREE_OBJECTID, ExtentDataRef,
    FILE_EXTENT_INLINE, FILE_EXTENT_INLINE_DATA_START, FILE_EXTENT_ITEM_SIZE, FIRST_CHUNK_TREE_OBJECTID,
    FIRST_FREE_OBJECTID, FREE_INO_OBJECTID, FS_TREE_OBJECTID, FT_MAX, FT_XATTR, FixedItem, HEADER_FLAG_RELOC,
    HEADER_SIZE, INODE_FLAG_MASK, INODE_ITEM_KEY, INODE_ITEM_SIZE, INODE_REF_KEY, INODE_REF_SIZE,
    INODE_RO_FLAG_MASK, ITEM_SIZE, Key, LAST_FREE_OBJECTID, LEGACY_ROOT_ITEM_SIZE, MAX_LEVEL,
    METADATA_ITEM_KEY, NAME_LEN, NR_COMPRESS_TYPES, NR_FILE_EXTENT_TYPES, ROOT_ITEM_KEY, ROOT_ITEM_SIZE,
    ROOT_SUBVOL_DEAD, ROOT_SUBVOL_RDONLY, ROOT_TREE_DIR_OBJECTID, ROOT_TREE_OBJECTID, RootItem, SECTORSIZE,
    SHARED_BLOCK_REF_KEY, SHARED_DATA_REF_KEY, SHARED_DATA_REF_SIZE, TREE_BLOCK_INFO_SIZE,
    TREE_BLOCK_REF_KEY, TREE_LOG_OBJECTID, TREE_RELOC_OBJECTID, XATTR_ITEM_KEY, XATTR_NAME_MAX,
    check_nodesize, chunk_item_size, csum_tree_block, extent_inline_ref_size, get_u8, get_u16, get_u32,
    get_u64, hash_extent_data_ref, is_fstree, leaf_data_size, max_xattr_size, name_hash, nodeptrs_per_block,
};

/// Where a problem was found: the block (leaf or node, its owner and
/// bytenr as its header says) and the slot, -1 for the block as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub leaf: bool,
    pub owner: u64,
    pub bytenr: u64,
    pub slot: i32,
}

impl Loc {
    fn of(block: &[u8], slot: i32) -> Loc {
        Loc { leaf: header_level(block) == 0, owner: header_owner(block), bytenr: header_bytenr(block), slot }
    }

    fn kind(&self) -> &'static str {
        if self.leaf { "leaf" } else { "node" }
    }
}

/// What the kernel's item reporters add after the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ident {
    /// `generic_err`: nothing.
    None,
    /// `dir_item_err`, `inode_item_err`, `inode_ref_err`: the inode.
    Ino(u64),
    /// `file_extent_err`: inode and file offset.
    FileExtent { ino: u64, file_offset: u64 },
    /// `block_group_err`.
    BlockGroup { start: u64, len: u64 },
    /// `extent_err` (no root, no comma in the kernel's format).
    Extent { bytenr: u64, len: u64 },
    /// `dev_item_err` (no comma either).
    Devid(u64),
    /// `chunk_err` (root is always the chunk tree).
    Chunk { start: u64 },
}

/// A corrupt tree block, with the kernel's one-line message as Display.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TreeCheckError {
    /// The image is not one valid nodesize long (a caller error).
    BadNodesize { len: usize, nodesize: u32 },
    /// A leaf whose level is not 0, or a node whose level is not 1..=7.
    BadLevel { at: Loc, level: u8 },
    /// A leaf with more item headers than fit, or a node with 0 or more
    /// pointers than fit.
    BadNritems { at: Loc, nritems: u32, max: u32 },
    /// An empty leaf in a tree that is never empty.
    EmptyRoot { at: Loc },
    /// An empty leaf owned by tree 0.
    UndefinedOwner { at: Loc },
    /// The header's owner is not the tree the block was reached from.
    OwnerMismatch { at: Loc, expected: u64 },
    /// Keys not strictly increasing. For a leaf `slot` is the later item
    /// (prev, current); for a node the earlier pointer (current, next).
    BadKeyOrder { at: Loc, first: Key, second: Key },
    /// Item data not packed against the previous item (or the block end).
    UnexpectedItemEnd { at: Loc, have: u64, expect: u32 },
    /// Item data ending past the leaf data area.
    ItemOutsideLeaf { at: Loc, have: u64, max: u32 },
    /// Item data starting inside the item headers.
    ItemOverlapsHeaders { at: Loc, header_end: u64, data_start: u64 },
    /// A node pointer to block 0.
    NullPointer { at: Loc },
    /// A node pointer not aligned to the sector size.
    UnalignedPointer { at: Loc, bytenr: u64, align: u32 },
    /// The contents of an item are invalid for its type.
    BadItem { at: Loc, ident: Ident, reason: String },
    /// Read time: the block's header names another bytenr.
    BadBytenr { want: u64, have: u64 },
    /// Read time: the block belongs to another filesystem.
    BadFsid { bytenr: u64 },
    /// Read time: the level byte is out of range before anything else.
    LevelTooHigh { bytenr: u64, level: u8 },
    /// Read time: the stored checksum (`wanted`) differs from the computed
    /// one (`found`).
    BadCsum { bytenr: u64, wanted: u32, found: u32, level: u8 },
    /// Read time: the level is not the one the parent implies.
    LevelMismatch { bytenr: u64, wanted: u8, found: u8 },
    /// Read time: "parent transid verify failed": the block's generation is
    /// not the one its parent pointer carries.
    TransidMismatch { bytenr: u64, wanted: u64, found: u64 },
    /// Read time: the first key is not the one in the parent pointer.
    FirstKeyMismatch { bytenr: u64, transid: u64, expected: Key, found: Key },
}

impl fmt::Display for TreeCheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use TreeCheckError::*;
        let head = |f: &mut fmt::Formatter<'_>, at: &Loc| {
            write!(f, "corrupt {}: root={} block={} slot={}, ", at.kind(), at.owner, at.bytenr, at.slot)
        };
        match self {
            BadNodesize { len, nodesize } => {
                write!(f, "invalid tree block image: {len} bytes for nodesize {nodesize}")
            }
            BadLevel { at, level } => {
                head(f, at)?;
                if at.leaf {
                    write!(f, "invalid level for leaf, have {level} expect 0")
                } else {
                    write!(f, "invalid level for node, have {level} expect [1, {}]", MAX_LEVEL - 1)
                }
            }
            BadNritems { at, nritems, max } => {
                if at.leaf {
                    head(f, at)?;
                    write!(f, "nritems too large, have {nritems} expect range [0,{max}]")
                } else {
                    write!(
                        f,
                        "corrupt node: root={} block={}, nritems too {}, have {nritems} expect range [1,{max}]",
                        at.owner,
                        at.bytenr,
                        if *nritems == 0 { "small" } else { "large" }
                    )
                }
            }
            EmptyRoot { at } => {
                head(f, at)?;
                write!(f, "invalid root, root {} must never be empty", at.owner)
            }
            UndefinedOwner { at } => {
                head(f, at)?;
                write!(f, "invalid owner, root 0 is not defined")
            }
            OwnerMismatch { at, expected } => {
                if is_fstree(*expected) {
                    write!(
                        f,
                        "corrupted {}, root={} block={} owner mismatch, have {} expect [{}, {}]",
                        at.kind(),
                        expected,
                        at.bytenr,
                        at.owner,
                        FIRST_FREE_OBJECTID,
                        LAST_FREE_OBJECTID
                    )
                } else {
                    write!(
                        f,
                        "corrupted {}, root={} block={} owner mismatch, have {} expect {}",
                        at.kind(),
                        expected,
                        at.bytenr,
                        at.owner,
                        expected
                    )
                }
            }
            BadKeyOrder { at, first, second } => {
                head(f, at)?;
                if at.leaf {
                    write!(f, "bad key order, prev {first} current {second}")
                } else {
                    write!(f, "bad key order, current {first} next {second}")
                }
            }
            UnexpectedItemEnd { at, have, expect } => {
                head(f, at)?;
                write!(f, "unexpected item end, have {have} expect {expect}")
            }
            ItemOutsideLeaf { at, have, max } => {
                head(f, at)?;
                write!(f, "slot end outside of leaf, have {have} expect range [0, {max}]")
            }
            ItemOverlapsHeaders { at, header_end, data_start } => {
                head(f, at)?;
                write!(f, "slot overlaps with its data, item end {header_end} data start {data_start}")
            }
            NullPointer { at } => {
                head(f, at)?;
                write!(f, "invalid NULL node pointer")
            }
            UnalignedPointer { at, bytenr, align } => {
                head(f, at)?;
                write!(f, "unaligned pointer, have {bytenr} should be aligned to {align}")
            }
            BadItem { at, ident, reason } => {
                let (kind, root, block, slot) = (at.kind(), at.owner, at.bytenr, at.slot);
                match ident {
                    Ident::None => {
                        write!(f, "corrupt {kind}: root={root} block={block} slot={slot}, {reason}")
                    }
                    Ident::Ino(ino) => {
                        write!(f, "corrupt {kind}: root={root} block={block} slot={slot} ino={ino}, {reason}")
                    }
                    Ident::FileExtent { ino, file_offset } => write!(
                        f,
                        "corrupt {kind}: root={root} block={block} slot={slot} ino={ino} file_offset={file_offset}, {reason}"
                    ),
                    Ident::BlockGroup { start, len } => write!(
                        f,
                        "corrupt {kind}: root={root} block={block} slot={slot} bg_start={start} bg_len={len}, {reason}"
                    ),
                    Ident::Extent { bytenr, len } => write!(
                        f,
                        "corrupt {kind}: block={block} slot={slot} extent bytenr={bytenr} len={len} {reason}"
                    ),
                    Ident::Devid(devid) => write!(
                        f,
                        "corrupt {kind}: root={root} block={block} slot={slot} devid={devid} {reason}"
                    ),
                    Ident::Chunk { start } => write!(
                        f,
                        "corrupt leaf: root={CHUNK_TREE_OBJECTID} block={block} slot={slot} chunk_start={start}, {reason}"
                    ),
                }
            }
            BadBytenr { want, have } => {
                write!(f, "bad tree block start, mirror 1 want {want} have {have}")
            }
            BadFsid { bytenr } => write!(f, "bad fsid on logical {bytenr} mirror 1"),
            LevelTooHigh { bytenr, level } => {
                write!(f, "bad tree block level, mirror 1 level {level} on logical {bytenr}")
            }
            BadCsum { bytenr, wanted, found, level } => write!(
                f,
                "checksum verify failed on logical {bytenr} mirror 1 wanted 0x{:08x} found 0x{:08x} level {level}",
                wanted.swap_bytes(),
                found.swap_bytes()
            ),
            LevelMismatch { bytenr, wanted, found } => {
                write!(f, "level verify failed on logical {bytenr} mirror 1 wanted {wanted} found {found}")
            }
            TransidMismatch { bytenr, wanted, found } => write!(
                f,
                "parent transid verify failed on logical {bytenr} mirror 1 wanted {wanted} found {found}"
            ),
            FirstKeyMismatch { bytenr, transid, expected, found } => write!(
                f,
                "tree first key mismatch detected, bytenr={bytenr} parent_transid={transid} key expected=({},{},{}) has=({},{},{})",
                expected.objectid,
                expected.item_type,
                expected.offset,
                found.objectid,
                found.item_type,
                found.offset
            ),
        }
    }
}

impl std::error::Error for TreeCheckError {}

type Res = Result<(), TreeCheckError>;

fn check_size(block: &[u8], nodesize: u32) -> Res {
    if !check_nodesize(nodesize) || block.len() != nodesize as usize {
        return Err(TreeCheckError::BadNodesize { len: block.len(), nodesize });
    }
    Ok(())
}

/// The stored checksum matches the block's contents (crc32c over bytes
/// 32.., stored little-endian in bytes 0..4; the kernel compares only the
/// checksum's own size).
pub fn verify_csum(block: &[u8]) -> bool {
    block.len() > HEADER_SIZE && block[..CRC32C_CSUM_SIZE] == csum_tree_block(block).to_le_bytes()
}

/// `btrfs_check_eb_owner`: a block reached from tree `root_owner` must be
/// owned by it, except that subvolume trees may share blocks among
/// themselves; log and relocation trees and owner 0 are not checked.
pub fn check_eb_owner(block: &[u8], root_owner: u64) -> Result<(), TreeCheckError> {
    if root_owner == 0 || root_owner == TREE_LOG_OBJECTID || root_owner == TREE_RELOC_OBJECTID {
        return Ok(());
    }
    let eb_owner = header_owner(block);
    let bad = if is_fstree(root_owner) { !is_fstree(eb_owner) } else { eb_owner != root_owner };
    if bad {
        return Err(TreeCheckError::OwnerMismatch { at: Loc::of(block, -1), expected: root_owner });
    }
    Ok(())
}

/// Check a leaf image as the kernel's `btrfs_check_leaf` does (with item
/// contents), plus the owner when `expected_owner` is given.
pub fn check_leaf(block: &[u8], nodesize: u32, expected_owner: Option<u64>) -> Result<(), TreeCheckError> {
    check_size(block, nodesize)?;
    let level = header_level(block);
    if level != 0 {
        return Err(TreeCheckError::BadLevel { at: Loc { leaf: true, ..Loc::of(block, 0) }, level });
    }
    if let Some(owner) = expected_owner {
        check_eb_owner(block, owner)?;
    }
    let nritems = header_nritems(block);
    let lds = leaf_data_size(nodesize);
    let max_items = lds / ITEM_SIZE as u32;
    if nritems > max_items {
        return Err(TreeCheckError::BadNritems { at: Loc::of(block, 0), nritems, max: max_items });
    }
    if nritems == 0 {
        if header_flag(block, HEADER_FLAG_RELOC) {
            return Ok(());
        }
        let owner = header_owner(block);
        if [
            ROOT_TREE_OBJECTID,
            CHUNK_TREE_OBJECTID,
            DEV_TREE_OBJECTID,
            FS_TREE_OBJECTID,
            DATA_RELOC_TREE_OBJECTID,
            EXTENT_TREE_OBJECTID,
        ]
        .contains(&owner)
        {
            return Err(TreeCheckError::EmptyRoot { at: Loc::of(block, 0) });
        }
        if owner == 0 {
            return Err(TreeCheckError::UndefinedOwner { at: Loc::of(block, 0) });
        }
        return Ok(());
    }

    // No valid key type is 0, so every key must be above (0 0 0).
    let mut prev = Key::MIN;
    for slot in 0..nritems as usize {
        let at = Loc::of(block, slot as i32);
        let key = item_key(block, slot);
        if prev >= key {
            return Err(TreeCheckError::BadKeyOrder { at, first: prev, second: key });
        }
        let end = item_offset(block, slot) as u64 + item_size(block, slot) as u64;
        let expect = if slot == 0 { lds } else { item_offset(block, slot - 1) };
        if end != expect as u64 {
            return Err(TreeCheckError::UnexpectedItemEnd { at, have: end, expect });
        }
        if end > lds as u64 {
            return Err(TreeCheckError::ItemOutsideLeaf { at, have: end, max: lds });
        }
        let header_end = (item_nr_offset(slot) + ITEM_SIZE) as u64;
        let data_start = item_ptr_offset(block, slot) as u64;
        if data_start < header_end {
            return Err(TreeCheckError::ItemOverlapsHeaders { at, header_end, data_start });
        }
        check_leaf_item(block, nodesize, &key, slot, &prev)?;
        prev = key;
    }
    Ok(())
}

/// Check a node image as the kernel's `btrfs_check_node` does, plus the
/// owner when `expected_owner` is given.
pub fn check_node(block: &[u8], nodesize: u32, expected_owner: Option<u64>) -> Result<(), TreeCheckError> {
    check_size(block, nodesize)?;
    let level = header_level(block);
    if level == 0 || level as usize >= MAX_LEVEL {
        return Err(TreeCheckError::BadLevel { at: Loc { leaf: false, ..Loc::of(block, 0) }, level });
    }
    if let Some(owner) = expected_owner {
        check_eb_owner(block, owner)?;
    }
    let nr = header_nritems(block);
    let max = nodeptrs_per_block(nodesize);
    if nr == 0 || nr > max {
        return Err(TreeCheckError::BadNritems { at: Loc::of(block, -1), nritems: nr, max });
    }
    let nr = nr as usize;
    for slot in 0..nr {
        let at = Loc::of(block, slot as i32);
        let bytenr = node_blockptr(block, slot);
        if bytenr == 0 {
            return Err(TreeCheckError::NullPointer { at });
        }
        if !is_aligned(bytenr, SECTORSIZE) {
            return Err(TreeCheckError::UnalignedPointer { at, bytenr, align: SECTORSIZE });
        }
        if slot + 1 < nr {
            let (key, next) = (node_key(block, slot), node_key(block, slot + 1));
            if key >= next {
                return Err(TreeCheckError::BadKeyOrder { at, first: key, second: next });
            }
        }
    }
    Ok(())
}

/// Check a block as a leaf or a node according to its level.
pub fn check_tree_block(
    block: &[u8],
    nodesize: u32,
    expected_owner: Option<u64>,
) -> Result<(), TreeCheckError> {
    check_size(block, nodesize)?;
    if header_level(block) == 0 {
        check_leaf(block, nodesize, expected_owner)
    } else {
        check_node(block, nodesize, expected_owner)
    }
}

/// What the parent pointer (or the super block, for a root) promises about
/// a block being read (`struct btrfs_tree_parent_check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParentCheck {
    pub bytenr: u64,
    pub level: u8,
    /// The generation in the parent pointer; `None` skips the check.
    pub transid: Option<u64>,
    /// The tree it was reached from; `None` or 0 skips the owner check.
    pub owner_root: Option<u64>,
    /// The key in the parent pointer.
    pub first_key: Option<Key>,
    /// The filesystem's (metadata) fsid.
    pub fsid: Option<[u8; 16]>,
}

/// Validate a block just read from disk, in the order of the kernel's
/// `btrfs_validate_extent_buffer`: bytenr, fsid, level range, checksum,
/// level, transid, first key, then the tree checker and the owner.
pub fn validate_extent_buffer(
    block: &[u8],
    nodesize: u32,
    check: &ParentCheck,
) -> Result<(), TreeCheckError> {
    check_size(block, nodesize)?;
    let bytenr = header_bytenr(block);
    if bytenr != check.bytenr {
        return Err(TreeCheckError::BadBytenr { want: check.bytenr, have: bytenr });
    }
    if check.fsid.is_some_and(|fsid| header_fsid(block) != fsid) {
        return Err(TreeCheckError::BadFsid { bytenr });
    }
    let level = header_level(block);
    if level as usize >= MAX_LEVEL {
        return Err(TreeCheckError::LevelTooHigh { bytenr, level });
    }
    let found = csum_tree_block(block);
    let wanted = get_u32(block, 0);
    if wanted != found {
        return Err(TreeCheckError::BadCsum { bytenr, wanted, found, level });
    }
    if level != check.level {
        return Err(TreeCheckError::LevelMismatch { bytenr, wanted: check.level, found: level });
    }
    let generation = crate::accessors::header_generation(block);
    if let Some(transid) = check.transid
        && transid != 0
        && generation != transid
    {
        return Err(TreeCheckError::TransidMismatch { bytenr, wanted: transid, found: generation });
    }
    // An empty leaf has no first key; the kernel skips the check then.
    if let Some(expected) = check.first_key
        && header_nritems(block) > 0
    {
        let found = if level == 0 { item_key(block, 0) } else { node_key(block, 0) };
        if found != expected {
            return Err(TreeCheckError::FirstKeyMismatch {
                bytenr,
                transid: check.transid.unwrap_or(0),
                expected,
                found,
            });
        }
    }
    check_tree_block(block, nodesize, None)?;
    if let Some(owner) = check.owner_root {
        check_eb_owner(block, owner)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Item contents (`check_leaf_item` and its helpers).

fn is_aligned(v: u64, a: u32) -> bool {
    v.is_multiple_of(a as u64)
}

struct ItemCtx<'a> {
    block: &'a [u8],
    nodesize: u32,
    key: Key,
    slot: usize,
    data: &'a [u8],
}

impl ItemCtx<'_> {
    fn err_at(&self, slot: usize, ident: Ident, reason: String) -> TreeCheckError {
        TreeCheckError::BadItem { at: Loc::of(self.block, slot as i32), ident, reason }
    }
    fn err(&self, ident: Ident, reason: String) -> TreeCheckError {
        self.err_at(self.slot, ident, reason)
    }
    fn generic(&self, reason: String) -> TreeCheckError {
        self.err(Ident::None, reason)
    }
    fn ino(&self, reason: String) -> TreeCheckError {
        self.err(Ident::Ino(self.key.objectid), reason)
    }
    fn file_extent(&self, reason: String) -> TreeCheckError {
        self.err(Ident::FileExtent { ino: self.key.objectid, file_offset: self.key.offset }, reason)
    }
    fn extent(&self, reason: String) -> TreeCheckError {
        let len = match self.key.item_type {
            METADATA_ITEM_KEY | TREE_BLOCK_REF_KEY | SHARED_BLOCK_REF_KEY => self.nodesize as u64,
            _ => self.key.offset,
        };
        self.err(Ident::Extent { bytenr: self.key.objectid, len }, reason)
    }
    fn size(&self) -> u32 {
        self.data.len() as u32
    }
    /// Absolute offset in the block of a byte of this item.
    fn abs(&self, off: usize) -> usize {
        item_ptr_offset(self.block, self.slot) + off
    }
}

fn check_leaf_item(block: &[u8], nodesize: u32, key: &Key, slot: usize, prev: &Key) -> Res {
    let cx = ItemCtx { block, nodesize, key: *key, slot, data: item_data(block, slot) };
    match key.item_type {
        EXTENT_DATA_KEY => check_extent_data_item(&cx, prev),
        EXTENT_CSUM_KEY => check_csum_item(&cx, prev),
        DIR_ITEM_KEY | DIR_INDEX_KEY | XATTR_ITEM_KEY => check_dir_item(&cx, prev),
        INODE_REF_KEY => check_inode_ref(&cx, prev),
        BLOCK_GROUP_ITEM_KEY => check_block_group_item(&cx),
        CHUNK_ITEM_KEY => check_chunk_item(&cx),
        DEV_ITEM_KEY => check_dev_item(&cx),
        INODE_ITEM_KEY => check_inode_item(&cx),
        ROOT_ITEM_KEY => check_root_item(&cx),
        EXTENT_ITEM_KEY | METADATA_ITEM_KEY => check_extent_item(&cx),
        TREE_BLOCK_REF_KEY | SHARED_DATA_REF_KEY | SHARED_BLOCK_REF_KEY => check_simple_keyed_refs(&cx),
        EXTENT_DATA_REF_KEY => check_extent_data_ref(&cx),
        _ => Ok(()),
    }
}

/// In subvolume trees, DIR/INODE_REF/XATTR/EXTENT_DATA items follow an item
/// of the same inode (at least its INODE_ITEM).
fn check_prev_ino(cx: &ItemCtx, prev: &Key) -> Res {
    if cx.slot == 0 || !is_fstree(header_owner(cx.block)) || cx.key.objectid == prev.objectid {
        return Ok(());
    }
    Err(cx.ino(format!("invalid previous key objectid, have {} expect {}", prev.objectid, cx.key.objectid)))
}

fn file_extent_end(key: &Key, fe: &[u8]) -> u64 {
    if fe[20] == FILE_EXTENT_INLINE {
        let end = key.offset + get_u64(fe, 8);
        end.div_ceil(SECTORSIZE as u64) * SECTORSIZE as u64
    } else {
        key.offset.wrapping_add(get_u64(fe, 45))
    }
}

fn check_extent_data_item(cx: &ItemCtx, prev: &Key) -> Res {
    let key = &cx.key;
    if !is_aligned(key.offset, SECTORSIZE) {
        return Err(cx.file_extent(format!(
            "unaligned file_offset for file extent, have {} should be aligned to {}",
            key.offset, SECTORSIZE
        )));
    }
    check_prev_ino(cx, prev)?;
    let size = cx.size();
    if (size as usize) < FILE_EXTENT_INLINE_DATA_START {
        return Err(cx.file_extent(format!(
            "invalid item size, have {size} expect [{FILE_EXTENT_INLINE_DATA_START}, 4096)"
        )));
    }
    let fe = cx.data;
    let extent_type = fe[20];
    let compression = fe[16];
    let encryption = fe[17];
    if extent_type >= NR_FILE_EXTENT_TYPES {
        return Err(cx.file_extent(format!(
            "invalid type for file extent, have {extent_type} expect range [0, {}]",
            NR_FILE_EXTENT_TYPES - 1
        )));
    }
    if compression >= NR_COMPRESS_TYPES {
        return Err(cx.file_extent(format!(
            "invalid compression for file extent, have {compression} expect range [0, {}]",
            NR_COMPRESS_TYPES - 1
        )));
    }
    if encryption != 0 {
        return Err(cx.file_extent(format!("invalid encryption for file extent, have {encryption} expect 0")));
    }
    if extent_type == FILE_EXTENT_INLINE {
        if key.offset != 0 {
            return Err(cx.file_extent(format!(
                "invalid file_offset for inline file extent, have {} expect 0",
                key.offset
            )));
        }
        if compression != COMPRESS_NONE {
            return Ok(());
        }
        let ram_bytes = get_u64(fe, 8);
        if size as u64 != FILE_EXTENT_INLINE_DATA_START as u64 + ram_bytes {
            return Err(cx.file_extent(format!(
                "invalid ram_bytes for uncompressed inline extent, have {size} expect {}",
                FILE_EXTENT_INLINE_DATA_START as u64 + ram_bytes
            )));
        }
        return Ok(());
    }
    if size as usize != FILE_EXTENT_ITEM_SIZE {
        return Err(cx.file_extent(format!(
            "invalid item size for reg/prealloc file extent, have {size} expect {FILE_EXTENT_ITEM_SIZE}"
        )));
    }
    for (name, off) in
        [("ram_bytes", 8), ("disk_bytenr", 21), ("disk_num_bytes", 29), ("offset", 37), ("num_bytes", 45)]
    {
        let v = get_u64(fe, off);
        if !is_aligned(v, SECTORSIZE) {
            return Err(cx.file_extent(format!(
                "invalid {name} for file extent, have {v}, should be aligned to {SECTORSIZE}"
            )));
        }
    }
    let num_bytes = get_u64(fe, 45);
    if key.offset.checked_add(num_bytes).is_none() {
        return Err(cx.file_extent(format!(
            "extent end overflow, have file offset {} extent num bytes {num_bytes}",
            key.offset
        )));
    }
    if cx.slot > 0 && prev.objectid == key.objectid && prev.item_type == EXTENT_DATA_KEY {
        let prev_end = file_extent_end(prev, item_data(cx.block, cx.slot - 1));
        if prev_end > key.offset {
            return Err(cx.err_at(
                cx.slot - 1,
                Ident::FileExtent {
                    ino: prev.objectid,
                    file_offset: prev.offset,
                },
                format!(
                    "file extent end range ({prev_end}) goes beyond start offset ({}) of the next file extent",
                    key.offset
                ),
            ));
        }
    }
    Ok(())
}

fn check_csum_item(cx: &ItemCtx, prev: &Key) -> Res {
    let key = &cx.key;
    let csum_size = CRC32C_CSUM_SIZE as u32;
    if key.objectid != EXTENT_CSUM_OBJECTID {
        return Err(cx.generic(format!(
            "invalid key objectid for csum item, have {} expect {}",
            key.objectid, EXTENT_CSUM_OBJECTID
        )));
    }
    if !is_aligned(key.offset, SECTORSIZE) {
        return Err(cx.generic(format!(
            "unaligned key offset for csum item, have {} should be aligned to {SECTORSIZE}",
            key.offset
        )));
    }
    if !cx.size().is_multiple_of(csum_size) {
        return Err(cx.generic(format!(
            "unaligned item size for csum item, have {} should be aligned to {csum_size}",
            cx.size()
        )));
    }
    if cx.slot > 0 && prev.item_type == EXTENT_CSUM_KEY {
        let prev_size = item_size(cx.block, cx.slot - 1);
        let prev_end = prev.offset + (prev_size / csum_size) as u64 * SECTORSIZE as u64;
        if prev_end > key.offset {
            return Err(cx.err_at(
                cx.slot - 1,
                Ident::None,
                format!(
                    "csum end range ({prev_end}) goes beyond the start range ({}) of the next csum item",
                    key.offset
                ),
            ));
        }
    }
    Ok(())
}

/// `check_inode_key`: `loc` is an inode item's key or a dir item's
/// location key; `item_key` is the key of the item holding it.
fn check_inode_key(cx: &ItemCtx, loc: &Key) -> Res {
    let is_inode_item = cx.key.item_type == INODE_ITEM_KEY;
    if cx.key.item_type == XATTR_ITEM_KEY {
        if *loc != Key::MIN {
            return Err(cx.ino(format!("invalid location key for xattr item, have {loc} expect (0 0 0)")));
        }
        return Ok(());
    }
    if (loc.objectid < FIRST_FREE_OBJECTID || loc.objectid > LAST_FREE_OBJECTID)
        && loc.objectid != ROOT_TREE_DIR_OBJECTID
        && loc.objectid != FREE_INO_OBJECTID
    {
        let what = if is_inode_item { "key" } else { "location key" };
        let reason = format!(
            "invalid {what} objectid: has {} expect {} or [{}, {}] or {}",
            loc.objectid, ROOT_TREE_DIR_OBJECTID, FIRST_FREE_OBJECTID, LAST_FREE_OBJECTID, FREE_INO_OBJECTID
        );
        return Err(if is_inode_item { cx.generic(reason) } else { cx.ino(reason) });
    }
    if loc.offset != 0 {
        return Err(if is_inode_item {
            cx.ino(format!("invalid key offset: has {} expect 0", loc.offset))
        } else {
            cx.ino(format!("invalid location key offset:has {} expect 0", loc.offset))
        });
    }
    Ok(())
}

/// `check_root_key`: `loc` is a root item's key or a dir item's location
/// key pointing at a subvolume.
fn check_root_key(cx: &ItemCtx, loc: &Key) -> Res {
    let is_root_item = cx.key.item_type == ROOT_ITEM_KEY;
    if loc.objectid == 0 {
        return Err(if is_root_item {
            cx.generic("invalid root id 0".to_string())
        } else {
            cx.ino("invalid location key root id 0".to_string())
        });
    }
    if !is_fstree(loc.objectid) && !is_root_item {
        return Err(cx.ino(format!(
            "invalid location key objectid, have {} expect [{}, {}]",
            loc.objectid, FIRST_FREE_OBJECTID, LAST_FREE_OBJECTID
        )));
    }
    if loc.objectid == TREE_RELOC_OBJECTID && loc.offset == 0 {
        return Err(cx.generic("invalid root id 0 for reloc tree".to_string()));
    }
    Ok(())
}

fn check_dir_item(cx: &ItemCtx, prev: &Key) -> Res {
    check_prev_ino(cx, prev)?;
    let item_size = cx.data.len();
    let mut cur = 0usize;
    while cur < item_size {
        if cur + DIR_ITEM_SIZE > item_size {
            return Err(cx.ino(format!(
                "dir item header crosses item boundary, have {} boundary {item_size}",
                cur + DIR_ITEM_SIZE
            )));
        }
        let di = &cx.data[cur..];
        let location = Key::read(di);
        match location.item_type {
            ROOT_ITEM_KEY => check_root_key(cx, &location)?,
            INODE_ITEM_KEY | 0 => check_inode_key(cx, &location)?,
            t => {
                return Err(cx.ino(format!(
                    "invalid location key type, have {t}, expect {ROOT_ITEM_KEY} or {INODE_ITEM_KEY}"
                )));
            }
        }
        let dir_type = get_u8(di, 29);
        if dir_type >= FT_MAX {
            return Err(cx.ino(format!("invalid dir item type, have {dir_type} expect [0, {FT_MAX})")));
        }
        if cx.key.item_type == XATTR_ITEM_KEY && dir_type != FT_XATTR {
            return Err(
                cx.ino(format!("invalid dir item type for XATTR key, have {dir_type} expect {FT_XATTR}"))
            );
        }
        if dir_type == FT_XATTR && cx.key.item_type != XATTR_ITEM_KEY {
            return Err(cx.ino("xattr dir type found for non-XATTR key".to_string()));
        }
        let max_name_len = if dir_type == FT_XATTR { XATTR_NAME_MAX } else { NAME_LEN };
        let data_len = get_u16(di, 25) as usize;
        let name_len = get_u16(di, 27) as usize;
        if name_len > max_name_len {
            return Err(cx.ino(format!("dir item name len too long, have {name_len} max {max_name_len}")));
        }
        let max_xattr = max_xattr_size(cx.nodesize) as usize;
        if name_len + data_len > max_xattr {
            return Err(cx.ino(format!(
                "dir item name and data len too long, have {} max {max_xattr}",
                name_len + data_len
            )));
        }
        if data_len != 0 && dir_type != FT_XATTR {
            return Err(cx.ino(format!("dir item with invalid data len, have {data_len} expect 0")));
        }
        let total = DIR_ITEM_SIZE + name_len + data_len;
        if cur + total > item_size {
            return Err(cx.ino(format!(
                "dir item data crosses item boundary, have {} boundary {item_size}",
                cur + total
            )));
        }
        if cx.key.item_type == DIR_ITEM_KEY || cx.key.item_type == XATTR_ITEM_KEY {
            let hash = name_hash(&di[DIR_ITEM_SIZE..DIR_ITEM_SIZE + name_len]);
            if cx.key.offset != hash {
                return Err(cx.ino(format!(
                    "name hash mismatch with key, have 0x{hash:016x} expect 0x{:016x}",
                    cx.key.offset
                )));
            }
        }
        cur += total;
    }
    Ok(())
}

fn check_inode_ref(cx: &ItemCtx, prev: &Key) -> Res {
    check_prev_ino(cx, prev)?;
    let size = cx.data.len();
    // A name is never empty, so an item of just the header is invalid too.
    if size <= INODE_REF_SIZE {
        return Err(cx.ino(format!(
            "invalid item size, have {size} expect ({INODE_REF_SIZE}, {})",
            leaf_data_size(cx.nodesize)
        )));
    }
    let mut cur = 0usize;
    while cur < size {
        if cur + INODE_REF_SIZE > size {
            return Err(cx.ino(format!(
                "inode ref overflow, ptr {} end {} inode_ref_size {INODE_REF_SIZE}",
                cx.abs(cur),
                cx.abs(size)
            )));
        }
        let name_len = get_u16(cx.data, cur + 8) as usize;
        if cur + INODE_REF_SIZE + name_len > size {
            return Err(cx.ino(format!(
                "inode ref overflow, ptr {} end {} namelen {name_len}",
                cx.abs(cur),
                cx.abs(size)
            )));
        }
        cur += INODE_REF_SIZE + name_len;
    }
    Ok(())
}

fn check_block_group_item(cx: &ItemCtx) -> Res {
    let key = &cx.key;
    let bg = |reason: String| cx.err(Ident::BlockGroup { start: key.objectid, len: key.offset }, reason);
    if key.offset == 0 {
        return Err(bg("invalid block group size 0".to_string()));
    }
    if cx.data.len() != BLOCK_GROUP_ITEM_SIZE {
        return Err(bg(format!("invalid item size, have {} expect {BLOCK_GROUP_ITEM_SIZE}", cx.data.len())));
    }
    let item = BlockGroupItem::read(cx.data);
    if item.chunk_objectid != FIRST_CHUNK_TREE_OBJECTID {
        return Err(bg(format!(
            "invalid block group chunk objectid, have {} expect {FIRST_CHUNK_TREE_OBJECTID}",
            item.chunk_objectid
        )));
    }
    if item.used > key.offset {
        return Err(bg(format!("invalid block group used, have {} expect [0, {})", item.used, key.offset)));
    }
    let profile = item.flags & BLOCK_GROUP_PROFILE_MASK;
    if profile.count_ones() > 1 {
        return Err(bg(format!(
            "invalid profile flags, have 0x{profile:x} ({} bits set) expect no more than 1 bit set",
            profile.count_ones()
        )));
    }
    let t = item.flags & BLOCK_GROUP_TYPE_MASK;
    if t != BLOCK_GROUP_DATA
        && t != BLOCK_GROUP_METADATA
        && t != BLOCK_GROUP_SYSTEM
        && t != (BLOCK_GROUP_METADATA | BLOCK_GROUP_DATA)
    {
        return Err(bg(format!(
            "invalid type, have 0x{t:x} ({} bits set) expect either 0x{BLOCK_GROUP_DATA:x}, 0x{BLOCK_GROUP_METADATA:x}, 0x{BLOCK_GROUP_SYSTEM:x} or 0x{:x}",
            t.count_ones(),
            BLOCK_GROUP_METADATA | BLOCK_GROUP_DATA
        )));
    }
    Ok(())
}

/// The size checks of `check_leaf_chunk_item`; the chunk's own validity
/// (`btrfs_check_chunk_valid`) is not modelled beyond stripes and type.
fn check_chunk_item(cx: &ItemCtx) -> Res {
    let chunk = |reason: String| cx.err(Ident::Chunk { start: cx.key.offset }, reason);
    let size = cx.data.len();
    if size < CHUNK_ITEM_SIZE {
        return Err(chunk(format!(
            "invalid chunk item size: have {size} expect [{CHUNK_ITEM_SIZE}, {})",
            leaf_data_size(cx.nodesize)
        )));
    }
    let num_stripes = get_u16(cx.data, 44);
    if num_stripes == 0 {
        return Err(chunk(format!("invalid chunk num_stripes, have {num_stripes}")));
    }
    if chunk_item_size(num_stripes) != size {
        return Err(chunk(format!(
            "invalid chunk item size: have {size} expect {}",
            chunk_item_size(num_stripes)
        )));
    }
    let t = get_u64(cx.data, 24);
    if t & !(BLOCK_GROUP_TYPE_MASK | BLOCK_GROUP_PROFILE_MASK) != 0 {
        return Err(chunk(format!(
            "unrecognized chunk type: 0x{:x}",
            t & !(BLOCK_GROUP_TYPE_MASK | BLOCK_GROUP_PROFILE_MASK)
        )));
    }
    if t & BLOCK_GROUP_TYPE_MASK == 0 {
        return Err(chunk(format!(
            "missing chunk type flag, have 0x{t:x} one bit must be set in 0x{BLOCK_GROUP_TYPE_MASK:x}"
        )));
    }
    Ok(())
}

fn check_dev_item(cx: &ItemCtx) -> Res {
    let dev = |reason: String| cx.err(Ident::Devid(cx.key.objectid), reason);
    if cx.key.objectid != DEV_ITEMS_OBJECTID {
        return Err(dev(format!("invalid objectid: has={} expect={DEV_ITEMS_OBJECTID}", cx.key.objectid)));
    }
    if cx.data.len() != DEV_ITEM_SIZE {
        return Err(dev(format!("invalid item size: has {} expect {DEV_ITEM_SIZE}", cx.data.len())));
    }
    let devid = get_u64(cx.data, 0);
    if devid != cx.key.offset {
        return Err(dev(format!("devid mismatch: key has={} item has={devid}", cx.key.offset)));
    }
    let (total, used) = (get_u64(cx.data, 8), get_u64(cx.data, 16));
    if used > total {
        return Err(dev(format!("invalid bytes used: have {used} expect [0, {total}]")));
    }
    Ok(())
}

const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;
const S_IFBLK: u32 = 0o060000;
const S_IFSOCK: u32 = 0o140000;
const S_IFDIR: u32 = 0o040000;

fn check_inode_item(cx: &ItemCtx) -> Res {
    check_inode_key(cx, &cx.key)?;
    if cx.data.len() != INODE_ITEM_SIZE {
        return Err(cx.generic(format!("invalid item size: has {} expect {INODE_ITEM_SIZE}", cx.data.len())));
    }
    let mode = get_u32(cx.data, 52);
    let nlink = get_u32(cx.data, 40);
    let flags = get_u64(cx.data, 64);
    let valid_mask = S_IFMT | 0o4000 | 0o2000 | 0o1000 | 0o777;
    if mode & !valid_mask != 0 {
        return Err(cx.ino(format!("unknown mode bit detected: 0x{:x}", mode & !valid_mask)));
    }
    let fmt = mode & S_IFMT;
    if fmt.count_ones() != 1 && fmt != S_IFLNK && fmt != S_IFBLK && fmt != S_IFSOCK {
        return Err(cx.ino(format!("invalid mode: has 0{fmt:o} expect valid S_IF* bit(s)")));
    }
    if fmt == S_IFDIR && nlink > 1 {
        return Err(cx.ino(format!("invalid nlink: has {nlink} expect no more than 1 for dir")));
    }
    let (incompat, ro) = (flags & 0xffff_ffff, flags >> 32);
    if incompat & !INODE_FLAG_MASK != 0 {
        return Err(cx.ino(format!("unknown incompat flags detected: 0x{incompat:x}")));
    }
    if ro & !INODE_RO_FLAG_MASK != 0 {
        return Err(cx.ino(format!("unknown ro-compat flags detected on writeable mount: 0x{ro:x}")));
    }
    Ok(())
}

fn check_root_item(cx: &ItemCtx) -> Res {
    check_root_key(cx, &cx.key)?;
    let size = cx.data.len();
    if size != ROOT_ITEM_SIZE && size != LEGACY_ROOT_ITEM_SIZE {
        return Err(cx.generic(format!(
            "invalid root item size, have {size} expect {ROOT_ITEM_SIZE} or {LEGACY_ROOT_ITEM_SIZE}"
        )));
    }
    let ri = RootItem::read_any(cx.data).expect("size checked");
    if !is_aligned(ri.bytenr, SECTORSIZE) {
        return Err(cx.generic(format!(
            "invalid root bytenr, have {} expect to be aligned to {SECTORSIZE}",
            ri.bytenr
        )));
    }
    for level in [ri.level, ri.drop_level] {
        if level as usize >= MAX_LEVEL {
            return Err(cx.generic(format!("invalid root level, have {level} expect [0, {}]", MAX_LEVEL - 1)));
        }
    }
    let valid = ROOT_SUBVOL_RDONLY | ROOT_SUBVOL_DEAD;
    if ri.flags & !valid != 0 {
        return Err(cx.generic(format!("invalid root flags, have 0x{:x} expect mask 0x{valid:x}", ri.flags)));
    }
    Ok(())
}

/// EXTENT_ITEM and (skinny) METADATA_ITEM: the extent item, the tree block
/// info for a non-skinny tree block, then inline refs sorted by type, and
/// within a type by decreasing sequence (root, parent or data ref hash), no
/// padding, and no more inline refs than the item's total.
fn check_extent_item(cx: &ItemCtx) -> Res {
    let key = &cx.key;
    if !is_aligned(key.objectid, SECTORSIZE) {
        return Err(cx.generic(format!(
            "invalid key objectid, have {} expect to be aligned to {SECTORSIZE}",
            key.objectid
        )));
    }
    if key.item_type == METADATA_ITEM_KEY && key.offset >= MAX_LEVEL as u64 {
        return Err(cx.extent(format!(
            "invalid tree level, have {} expect [0, {}]",
            key.offset,
            MAX_LEVEL - 1
        )));
    }
    let size = cx.data.len();
    if size < EXTENT_ITEM_SIZE {
        return Err(cx.extent(format!(
            "invalid item size, have {size} expect [{EXTENT_ITEM_SIZE}, {})",
            leaf_data_size(cx.nodesize)
        )));
    }
    let total_refs = get_u64(cx.data, 0);
    let flags = get_u64(cx.data, 16);
    let kind = flags & (EXTENT_FLAG_DATA | EXTENT_FLAG_TREE_BLOCK);
    if kind.count_ones() != 1 {
        return Err(cx.extent(format!(
            "invalid extent flag, have 0x{flags:x} expect 1 bit set in 0x{:x}",
            EXTENT_FLAG_DATA | EXTENT_FLAG_TREE_BLOCK
        )));
    }
    let is_tree_block = flags & EXTENT_FLAG_TREE_BLOCK != 0;
    if is_tree_block {
        if key.item_type == EXTENT_ITEM_KEY && key.offset != cx.nodesize as u64 {
            return Err(
                cx.extent(format!("invalid extent length, have {} expect {}", key.offset, cx.nodesize))
            );
        }
    } else {
        if key.item_type != EXTENT_ITEM_KEY {
            return Err(cx.extent(format!(
                "invalid key type, have {} expect {EXTENT_ITEM_KEY} for data backref",
                key.item_type
            )));
        }
        if !is_aligned(key.offset, SECTORSIZE) {
            return Err(cx.extent(format!(
                "invalid extent length, have {} expect aligned to {SECTORSIZE}",
                key.offset
            )));
        }
        if flags & BLOCK_FLAG_FULL_BACKREF != 0 {
            return Err(cx.extent("invalid extent flag, data has full backref set".to_string()));
        }
    }
    let mut ptr = EXTENT_ITEM_SIZE;
    let end = size;
    if is_tree_block && key.item_type != METADATA_ITEM_KEY {
        if ptr + TREE_BLOCK_INFO_SIZE > end {
            return Err(cx.extent(format!(
                "invalid item size, have {size} expect [{}, {})",
                EXTENT_ITEM_SIZE + TREE_BLOCK_INFO_SIZE,
                leaf_data_size(cx.nodesize)
            )));
        }
        let level = cx.data[ptr + 17];
        if level as usize >= MAX_LEVEL {
            return Err(cx.extent(format!(
                "invalid tree block info level, have {level} expect [0, {}]",
                MAX_LEVEL - 1
            )));
        }
        ptr += TREE_BLOCK_INFO_SIZE;
    }
    let mut inline_refs: u64 = 0;
    let mut last_type: u8 = 0;
    let mut last_seq: u64 = u64::MAX;
    while ptr < end {
        if ptr + EXTENT_INLINE_REF_SIZE > end {
            return Err(cx.extent(format!(
                "inline ref item overflows extent item, ptr {} iref size {EXTENT_INLINE_REF_SIZE} end {}",
                cx.abs(ptr),
                cx.abs(end)
            )));
        }
        let inline_type = cx.data[ptr];
        let inline_offset = get_u64(cx.data, ptr + 1);
        let Some(ref_size) = extent_inline_ref_size(inline_type) else {
            return Err(cx.extent(format!("unknown inline ref type: {inline_type}")));
        };
        if ptr + ref_size > end {
            return Err(cx.extent(format!(
                "inline ref item overflows extent item, ptr {} iref size {inline_type} end {}",
                cx.abs(ptr),
                cx.abs(end)
            )));
        }
        let mut seq = inline_offset;
        match inline_type {
            TREE_BLOCK_REF_KEY => inline_refs += 1,
            SHARED_BLOCK_REF_KEY => {
                if !is_aligned(inline_offset, SECTORSIZE) {
                    return Err(cx.extent(format!(
                        "invalid tree parent bytenr, have {inline_offset} expect aligned to {SECTORSIZE}"
                    )));
                }
                inline_refs += 1;
            }
            EXTENT_DATA_REF_KEY => {
                let dref = ExtentDataRef::read(&cx.data[ptr + 1..]);
                seq = hash_extent_data_ref(dref.root, dref.objectid, dref.offset);
                if !is_aligned(dref.offset, SECTORSIZE) {
                    return Err(cx.extent(format!(
                        "invalid data ref offset, have {} expect aligned to {SECTORSIZE}",
                        dref.offset
                    )));
                }
                inline_refs += dref.count as u64;
            }
            SHARED_DATA_REF_KEY => {
                if !is_aligned(inline_offset, SECTORSIZE) {
                    return Err(cx.extent(format!(
                        "invalid data parent bytenr, have {inline_offset} expect aligned to {SECTORSIZE}"
                    )));
                }
                inline_refs += get_u32(cx.data, ptr + EXTENT_INLINE_REF_SIZE) as u64;
            }
            _ => unreachable!("sized above"),
        }
        if inline_type < last_type {
            return Err(
                cx.extent(format!("inline ref out-of-order: has type {inline_type}, prev type {last_type}"))
            );
        }
        if inline_type > last_type {
            last_seq = u64::MAX;
        }
        if seq > last_seq {
            return Err(cx.extent(format!(
                "inline ref out-of-order: has type {inline_type} offset {inline_offset} seq 0x{seq:x}, prev type {last_type} seq 0x{last_seq:x}"
            )));
        }
        last_type = inline_type;
        last_seq = seq;
        ptr += ref_size;
    }
    if ptr != end {
        return Err(cx.extent("invalid extent item size, padding bytes found".to_string()));
    }
    if inline_refs > total_refs {
        return Err(
            cx.extent(format!("invalid extent refs, have {total_refs} expect >= inline {inline_refs}"))
        );
    }
    Ok(())
}

/// Keyed back references are keyed by the extent's bytenr, sector aligned.
fn check_ref_objectid_aligned(cx: &ItemCtx) -> Res {
    if !is_aligned(cx.key.objectid, SECTORSIZE) {
        return Err(cx.generic(format!(
            "invalid key objectid for shared block ref, have {} expect aligned to {SECTORSIZE}",
            cx.key.objectid
        )));
    }
    Ok(())
}

fn check_simple_keyed_refs(cx: &ItemCtx) -> Res {
    let key = &cx.key;
    let expect = if key.item_type == SHARED_DATA_REF_KEY { SHARED_DATA_REF_SIZE } else { 0 };
    if cx.data.len() != expect {
        return Err(cx.generic(format!(
            "invalid item size, have {} expect {expect} for key type {}",
            cx.data.len(),
            key.item_type
        )));
    }
    check_ref_objectid_aligned(cx)?;
    if key.item_type != TREE_BLOCK_REF_KEY && !is_aligned(key.offset, SECTORSIZE) {
        return Err(cx.extent(format!(
            "invalid tree parent bytenr, have {} expect aligned to {SECTORSIZE}",
            key.offset
        )));
    }
    Ok(())
}

fn check_extent_data_ref(cx: &ItemCtx) -> Res {
    let key = &cx.key;
    if !cx.data.len().is_multiple_of(EXTENT_DATA_REF_SIZE) {
        return Err(cx.generic(format!(
            "invalid item size, have {} expect aligned to {EXTENT_DATA_REF_SIZE} for key type {}",
            cx.data.len(),
            key.item_type
        )));
    }
    check_ref_objectid_aligned(cx)?;
    for chunk in cx.data.chunks_exact(EXTENT_DATA_REF_SIZE) {
        let dref = ExtentDataRef::read(chunk);
        if !is_aligned(dref.offset, SECTORSIZE) {
            return Err(cx.extent(format!(
                "invalid extent data backref offset, have {} expect aligned to {SECTORSIZE}",
                dref.offset
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accessors::*;
    use crate::format::{
        CSUM_TREE_OBJECTID, DirItem, ExtentItem, FT_REG_FILE, FileExtentItem, InlineRef, InodeItem, InodeRef,
        ORPHAN_ITEM_KEY, testdata,
    };

    type Runs = &'static [(usize, &'static str)];
    const REAL: [(Runs, u64, u64); 5] = [
        (testdata::FS_LEAF, testdata::FS_LEAF_BYTENR, FS_TREE_OBJECTID),
        (testdata::ROOT_LEAF, testdata::ROOT_LEAF_BYTENR, ROOT_TREE_OBJECTID),
        (testdata::EXTENT_LEAF, testdata::EXTENT_LEAF_BYTENR, EXTENT_TREE_OBJECTID),
        (testdata::CHUNK_LEAF, testdata::CHUNK_LEAF_BYTENR, CHUNK_TREE_OBJECTID),
        (testdata::FS_NODE, testdata::FS_NODE_BYTENR, FS_TREE_OBJECTID),
    ];

    /// Blocks written by the real kernel pass every check, and their
    /// checksums verify.
    #[test]
    fn real_blocks_pass() {
        for (runs, bytenr, owner) in REAL {
            let b = testdata::block(runs);
            assert!(verify_csum(&b), "csum of {bytenr}");
            check_tree_block(&b, 4096, Some(owner)).unwrap_or_else(|e| panic!("{bytenr}: {e}"));
            validate_extent_buffer(
                &b,
                4096,
                &ParentCheck {
                    bytenr,
                    level: header_level(&b),
                    transid: Some(header_generation(&b)),
                    owner_root: Some(owner),
                    first_key: Some(if header_level(&b) == 0 { item_key(&b, 0) } else { node_key(&b, 0) }),
                    fsid: Some(header_fsid(&b)),
                },
            )
            .unwrap();
        }
    }

    /// The real data EXTENT_ITEM with six inline refs is in the order the
    /// checker demands (descending data ref hash), which also cross-checks
    /// `hash_extent_data_ref`.
    #[test]
    fn real_inline_data_refs_are_in_kernel_order() {
        let payload = testdata::hex(testdata::DATA_EXTENT_ITEM);
        let mut b = leaf(4096, EXTENT_TREE_OBJECTID);
        insert_item_in_leaf(&mut b, 0, &Key::new(13631488, EXTENT_ITEM_KEY, 65536), &payload);
        let keyed = testdata::hex(testdata::KEYED_DATA_REF);
        insert_item_in_leaf(
            &mut b,
            1,
            &Key::new(13631488, EXTENT_DATA_REF_KEY, testdata::KEYED_DATA_REF_OFFSET),
            &keyed,
        );
        check_leaf(&b, 4096, Some(EXTENT_TREE_OBJECTID)).unwrap();
        // Swapping two inline refs breaks the order.
        let data = item_data_mut(&mut b, 0);
        let (x, y) = (24, 24 + 29);
        let first: Vec<u8> = data[x..x + 29].to_vec();
        data.copy_within(y..y + 29, x);
        data[y..y + 29].copy_from_slice(&first);
        let e = check_leaf(&b, 4096, None).unwrap_err();
        assert!(e.to_string().contains("inline ref out-of-order"), "{e}");
    }

    fn leaf(nodesize: u32, owner: u64) -> Vec<u8> {
        let mut b = vec![0u8; nodesize as usize];
        init_tree_block(
            &mut b,
            &NewBlockHeader {
                bytenr: 30408704,
                generation: 9,
                owner,
                level: 0,
                fsid: [3; 16],
                chunk_tree_uuid: [4; 16],
            },
        );
        b
    }

    /// A small but varied FS tree leaf built with the accessors: the root
    /// directory, a file with an inline extent, a file with a regular one.
    fn fs_leaf(nodesize: u32) -> Vec<u8> {
        let mut b = leaf(nodesize, FS_TREE_OBJECTID);
        let dir = InodeItem { generation: 1, transid: 9, nlink: 1, mode: 0o40755, ..Default::default() };
        let file = InodeItem { mode: 0o100644, ..dir };
        let entry = |ino: u64, name: &[u8]| DirItem {
            location: Key::new(ino, INODE_ITEM_KEY, 0),
            transid: 9,
            dir_type: FT_REG_FILE,
            name: name.to_vec(),
            data: vec![],
        };
        let iref = |index: u64, name: &[u8]| InodeRef { index, name: name.to_vec() };
        let items: Vec<(Key, Vec<u8>)> = vec![
            (Key::new(256, INODE_ITEM_KEY, 0), dir.to_bytes()),
            (Key::new(256, INODE_REF_KEY, 256), iref(0, b"..").to_bytes()),
            (Key::new(256, DIR_ITEM_KEY, name_hash(b"hello")), entry(257, b"hello").to_bytes()),
            (Key::new(256, DIR_ITEM_KEY, name_hash(b"big")), entry(258, b"big").to_bytes()),
            (Key::new(256, DIR_INDEX_KEY, 2), entry(257, b"hello").to_bytes()),
            (Key::new(256, DIR_INDEX_KEY, 3), entry(258, b"big").to_bytes()),
            (Key::new(257, INODE_ITEM_KEY, 0), file.to_bytes()),
            (Key::new(257, INODE_REF_KEY, 256), iref(2, b"hello").to_bytes()),
            (Key::new(257, EXTENT_DATA_KEY, 0), FileExtentItem::inline(9, b"hi\n".to_vec()).to_bytes()),
            (Key::new(258, INODE_ITEM_KEY, 0), file.to_bytes()),
            (Key::new(258, INODE_REF_KEY, 256), iref(3, b"big").to_bytes()),
            (Key::new(258, EXTENT_DATA_KEY, 0), FileExtentItem::regular(9, 1 << 30, 65536).to_bytes()),
            (Key::new(258, EXTENT_DATA_KEY, 65536), FileExtentItem::regular(9, 2 << 30, 4096).to_bytes()),
        ];
        let mut sorted = items.clone();
        sorted.sort_by_key(|(k, _)| *k);
        for (i, (k, d)) in sorted.iter().enumerate() {
            insert_item_in_leaf(&mut b, i, k, d);
        }
        b
    }

    fn extent_leaf(nodesize: u32) -> Vec<u8> {
        let mut b = leaf(nodesize, EXTENT_TREE_OBJECTID);
        let bg = crate::format::BlockGroupItem {
            used: 3 * nodesize as u64,
            chunk_objectid: FIRST_CHUNK_TREE_OBJECTID,
            flags: BLOCK_GROUP_METADATA | crate::format::BLOCK_GROUP_DUP,
        };
        // slot 0: METADATA_ITEM, 1: BLOCK_GROUP_ITEM, 2: METADATA_ITEM,
        // 3: data EXTENT_ITEM
        let items = [
            (Key::new(30408704, METADATA_ITEM_KEY, 0), ExtentItem::tree_block(9, 5).to_bytes()),
            (Key::new(30408704, BLOCK_GROUP_ITEM_KEY, 1 << 28), bg.to_bytes()),
            (
                Key::new(30408704 + nodesize as u64, METADATA_ITEM_KEY, 1),
                ExtentItem::tree_block(9, 2).to_bytes(),
            ),
            (Key::new(1 << 30, EXTENT_ITEM_KEY, 65536), ExtentItem::data(9, 5, 258, 0).to_bytes()),
        ];
        for (i, (k, d)) in items.iter().enumerate() {
            insert_item_in_leaf(&mut b, i, k, d);
        }
        b
    }

    fn node(nodesize: u32, n: usize) -> Vec<u8> {
        let mut b = leaf(nodesize, FS_TREE_OBJECTID);
        set_header_level(&mut b, 1);
        for i in 0..n {
            insert_ptr(
                &mut b,
                i,
                &Key::new(256 + i as u64, INODE_ITEM_KEY, 0),
                (i as u64 + 1) * nodesize as u64,
                9,
            );
        }
        b
    }

    #[test]
    fn built_blocks_pass() {
        for ns in [4096, 16384, 65536] {
            check_leaf(&fs_leaf(ns), ns, Some(FS_TREE_OBJECTID)).unwrap();
            check_leaf(&fs_leaf(ns), ns, Some(300)).unwrap(); // shared subvolume block
            check_leaf(&extent_leaf(ns), ns, Some(EXTENT_TREE_OBJECTID)).unwrap();
            check_node(&node(ns, 3), ns, Some(FS_TREE_OBJECTID)).unwrap();
            let full = nodeptrs_per_block(ns) as usize;
            check_node(&node(ns, full), ns, None).unwrap();
            // an empty leaf is fine for the csum tree
            check_leaf(&leaf(ns, CSUM_TREE_OBJECTID), ns, None).unwrap();
        }
    }

    fn leaf_err(b: &[u8]) -> TreeCheckError {
        check_leaf(b, b.len() as u32, None).expect_err("corruption not caught")
    }

    #[test]
    fn message_format_matches_kernel() {
        let mut b = fs_leaf(16384);
        let k = item_key(&b, 2);
        set_item_key(&mut b, 3, &k);
        let e = leaf_err(&b);
        assert_eq!(
            e.to_string(),
            format!("corrupt leaf: root=5 block=30408704 slot=3, bad key order, prev {k} current {k}")
        );
        // The example of the brief, literally.
        let e = TreeCheckError::BadKeyOrder {
            at: Loc { leaf: true, owner: 5, bytenr: 30408704, slot: 3 },
            first: Key::new(256, 1, 0),
            second: Key::new(256, 1, 0),
        };
        assert_eq!(
            e.to_string(),
            "corrupt leaf: root=5 block=30408704 slot=3, bad key order, prev (256 1 0) current (256 1 0)"
        );
    }

    #[test]
    fn rejects_unsorted_keys() {
        let mut b = fs_leaf(4096);
        // slot 7 gets a key below slot 6's (the order check comes before
        // the item's contents are looked at)
        let k5 = item_key(&b, 5);
        set_item_key(&mut b, 7, &k5);
        assert!(matches!(leaf_err(&b), TreeCheckError::BadKeyOrder { at: Loc { slot: 7, .. }, .. }));
        let mut n = node(16384, 5);
        set_node_key(&mut n, 4, &Key::new(1, 1, 0));
        let e = check_node(&n, 16384, None).unwrap_err();
        assert!(matches!(e, TreeCheckError::BadKeyOrder { at: Loc { slot: 3, leaf: false, .. }, .. }));
        assert!(e.to_string().contains("bad key order, current (259 1 0) next (1 1 0)"), "{e}");
    }

    #[test]
    fn rejects_overlapping_or_unpacked_items() {
        // item 3's data overlaps item 2's
        let mut b = fs_leaf(4096);
        let off = item_offset(&b, 3);
        set_item_offset(&mut b, 3, off + 1);
        assert!(matches!(leaf_err(&b), TreeCheckError::UnexpectedItemEnd { at: Loc { slot: 3, .. }, .. }));
        // a hole between items
        let mut b = fs_leaf(4096);
        let sz = item_size(&b, 0);
        set_item_size(&mut b, 0, sz - 1);
        assert!(matches!(leaf_err(&b), TreeCheckError::UnexpectedItemEnd { .. }));
        // everything consistent but past the end of the leaf
        let mut b = leaf(4096, CSUM_TREE_OBJECTID);
        insert_item_in_leaf(&mut b, 0, &Key::new(256, ORPHAN_ITEM_KEY, 0), &[1; 8]);
        set_item_offset(&mut b, 0, 4096 - 101);
        assert!(matches!(leaf_err(&b), TreeCheckError::UnexpectedItemEnd { .. }));
        // data running into the item headers
        let mut b = leaf(4096, CSUM_TREE_OBJECTID);
        insert_item_in_leaf(&mut b, 0, &Key::new(256, ORPHAN_ITEM_KEY, 0), &[1; 3900]);
        insert_item_in_leaf(&mut b, 1, &Key::new(257, ORPHAN_ITEM_KEY, 0), &[1; 10]);
        set_item_size(&mut b, 1, 80);
        let off0 = item_offset(&b, 0);
        set_item_offset(&mut b, 1, off0 - 80);
        let e = leaf_err(&b);
        assert!(matches!(e, TreeCheckError::ItemOverlapsHeaders { .. }), "{e}");
    }

    #[test]
    fn rejects_bad_nritems() {
        let mut b = fs_leaf(4096);
        set_header_nritems(&mut b, 4096);
        assert!(matches!(leaf_err(&b), TreeCheckError::BadNritems { .. }));
        let mut b = fs_leaf(4096);
        set_header_nritems(&mut b, 14); // one more than there are
        assert!(leaf_err(&b).to_string().contains("slot=13"));
        let mut n = node(4096, 3);
        set_header_nritems(&mut n, 122);
        let e = check_node(&n, 4096, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "corrupt node: root=5 block=30408704, nritems too large, have 122 expect range [1,121]"
        );
        set_header_nritems(&mut n, 0);
        assert!(check_node(&n, 4096, None).unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn rejects_bad_levels_pointers_owners_sizes() {
        let mut b = fs_leaf(4096);
        set_header_level(&mut b, 1);
        assert!(matches!(leaf_err(&b), TreeCheckError::BadLevel { .. }));
        let mut n = node(4096, 3);
        set_header_level(&mut n, 8);
        assert!(matches!(check_node(&n, 4096, None), Err(TreeCheckError::BadLevel { .. })));
        let mut n = node(4096, 3);
        set_node_blockptr(&mut n, 2, 0);
        assert!(matches!(check_node(&n, 4096, None), Err(TreeCheckError::NullPointer { .. })));
        set_node_blockptr(&mut n, 2, 4096 * 3 + 512);
        assert!(matches!(check_node(&n, 4096, None), Err(TreeCheckError::UnalignedPointer { .. })));
        let b = fs_leaf(4096);
        assert!(matches!(
            check_leaf(&b, 4096, Some(EXTENT_TREE_OBJECTID)),
            Err(TreeCheckError::OwnerMismatch { .. })
        ));
        let x = extent_leaf(4096);
        assert!(matches!(
            check_leaf(&x, 4096, Some(FS_TREE_OBJECTID)),
            Err(TreeCheckError::OwnerMismatch { .. })
        ));
        assert!(matches!(check_leaf(&b, 16384, None), Err(TreeCheckError::BadNodesize { .. })));
        // empty leaves
        assert!(matches!(
            check_leaf(&leaf(4096, FS_TREE_OBJECTID), 4096, None),
            Err(TreeCheckError::EmptyRoot { .. })
        ));
        assert!(matches!(check_leaf(&leaf(4096, 0), 4096, None), Err(TreeCheckError::UndefinedOwner { .. })));
        let mut reloc = leaf(4096, FS_TREE_OBJECTID);
        set_header_flag(&mut reloc, HEADER_FLAG_RELOC);
        check_leaf(&reloc, 4096, None).unwrap();
    }

    /// Each item type's contents: corrupt one field, expect the kernel's
    /// complaint.
    #[test]
    fn rejects_bad_item_contents() {
        fn corrupt(make: fn(u32) -> Vec<u8>, slot: usize, f: impl Fn(&mut [u8]), want: &str) {
            let mut b = make(4096);
            f(item_data_mut(&mut b, slot));
            let e = check_leaf(&b, 4096, None).expect_err(want);
            assert!(matches!(e, TreeCheckError::BadItem { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e} / {want}");
        }
        // slot 0: root dir inode item
        corrupt(fs_leaf, 0, |d| d[52..56].copy_from_slice(&0o170755u32.to_le_bytes()), "invalid mode");
        corrupt(fs_leaf, 0, |d| d[40..44].copy_from_slice(&2u32.to_le_bytes()), "invalid nlink");
        corrupt(fs_leaf, 0, |d| d[68] = 0x10, "unknown ro-compat flags");
        corrupt(fs_leaf, 0, |d| d[66] = 0x10, "unknown incompat flags");
        // slot 2: DIR_ITEM "big"/"hello" (whichever hashes lower)
        corrupt(fs_leaf, 2, |d| d[30] ^= 1, "name hash mismatch");
        corrupt(fs_leaf, 2, |d| d[29] = 9, "invalid dir item type");
        corrupt(fs_leaf, 2, |d| d[27] = 200, "dir item data crosses item boundary");
        corrupt(fs_leaf, 2, |d| d[25] = 1, "dir item with invalid data len");
        corrupt(fs_leaf, 2, |d| d[8] = 7, "invalid location key type");
        corrupt(
            fs_leaf,
            2,
            |d| d[0..8].copy_from_slice(&7u64.to_le_bytes()),
            "invalid location key objectid",
        );
        corrupt(fs_leaf, 2, |d| d[29] = FT_XATTR, "xattr dir type found for non-XATTR key");
        // slot 1: INODE_REF
        corrupt(fs_leaf, 1, |d| d[8] = 3, "inode ref overflow");
        // slot 8: inline extent of inode 257
        let mut b = fs_leaf(4096);
        let slot = (0..13).find(|&i| item_key(&b, i) == Key::new(257, EXTENT_DATA_KEY, 0)).unwrap();
        item_data_mut(&mut b, slot)[8] = 4;
        assert!(leaf_err(&b).to_string().contains("invalid ram_bytes for uncompressed inline extent"));
        // regular extents of inode 258: overlapping, unaligned
        let mut b = fs_leaf(4096);
        let slot = (0..13).find(|&i| item_key(&b, i) == Key::new(258, EXTENT_DATA_KEY, 0)).unwrap();
        item_data_mut(&mut b, slot)[45..53].copy_from_slice(&(65536u64 + 4096).to_le_bytes());
        let e = leaf_err(&b);
        assert!(e.to_string().contains("goes beyond start offset (65536)"), "{e}");
        assert!(e.to_string().contains(&format!("slot={slot} ino=258 file_offset=0")), "{e}");
        let mut b = fs_leaf(4096);
        item_data_mut(&mut b, slot)[21] = 1;
        assert!(leaf_err(&b).to_string().contains("invalid disk_bytenr for file extent"));
        let mut b = fs_leaf(4096);
        item_data_mut(&mut b, slot)[20] = 3;
        assert!(leaf_err(&b).to_string().contains("invalid type for file extent"));
        // a missing INODE_ITEM before an INODE_REF in a subvolume tree
        let mut b = fs_leaf(4096);
        let slot = (0..13).find(|&i| item_key(&b, i) == Key::new(258, INODE_ITEM_KEY, 0)).unwrap();
        set_item_key(&mut b, slot, &Key::new(257, crate::format::FREE_SPACE_BITMAP_KEY, 0));
        assert!(leaf_err(&b).to_string().contains("invalid previous key objectid, have 257 expect 258"));
        // extent tree items
        corrupt(extent_leaf, 3, |d| d[0] = 0, "invalid extent refs, have 0 expect >= inline 1");
        corrupt(extent_leaf, 3, |d| d[16] = 3, "invalid extent flag");
        corrupt(extent_leaf, 3, |d| d[24] = 177, "unknown inline ref type: 177");
        corrupt(extent_leaf, 2, |d| d[24] = EXTENT_DATA_REF_KEY, "inline ref item overflows extent item");
        corrupt(extent_leaf, 1, |d| d[8] = 1, "invalid block group chunk objectid");
        corrupt(extent_leaf, 1, |d| d[16] = 0x3c, "invalid profile flags");
        corrupt(extent_leaf, 1, |d| d[5] = 0x40, "invalid block group used");
        let mut b = extent_leaf(4096);
        extend_item(&mut b, 2, 1);
        // a trailing byte is too short for another inline ref (so the
        // kernel's later "padding bytes found" check cannot trigger)
        assert!(leaf_err(&b).to_string().contains("inline ref item overflows extent item"));
        corrupt(extent_leaf, 3, |d| d[24 + 1 + 16] = 1, "invalid data ref offset");
        let e = {
            let mut b = extent_leaf(4096);
            item_data_mut(&mut b, 0)[16] = 1; // METADATA_ITEM flagged DATA
            leaf_err(&b)
        };
        assert_eq!(
            e.to_string(),
            "corrupt leaf: block=30408704 slot=0 extent bytenr=30408704 len=4096 invalid key type, have 169 expect 168 for data backref"
        );
    }

    #[test]
    fn item_sizes_of_known_types() {
        let check_one = |owner: u64, key: Key, data: &[u8]| {
            let mut b = leaf(16384, owner);
            insert_item_in_leaf(&mut b, 0, &key, data);
            check_leaf(&b, 16384, None)
        };
        let ino = Key::new(256, INODE_ITEM_KEY, 0);
        let mut inode = InodeItem { mode: 0o100644, nlink: 1, ..Default::default() }.to_bytes();
        check_one(5, ino, &inode).unwrap();
        inode.push(0);
        assert!(
            check_one(5, ino, &inode)
                .unwrap_err()
                .to_string()
                .contains("invalid item size: has 161 expect 160")
        );
        let ri = RootItem { bytenr: 1 << 20, level: 1, refs: 1, ..Default::default() }.to_bytes();
        let rk = Key::new(FS_TREE_OBJECTID, ROOT_ITEM_KEY, 0);
        check_one(1, rk, &ri).unwrap();
        check_one(1, rk, &ri[..LEGACY_ROOT_ITEM_SIZE]).unwrap();
        assert!(
            check_one(1, rk, &ri[..438])
                .unwrap_err()
                .to_string()
                .contains("invalid root item size, have 438 expect 439 or 239")
        );
        let mut bad = ri.clone();
        bad[238] = 8;
        assert!(check_one(1, rk, &bad).unwrap_err().to_string().contains("invalid root level"));
        assert!(
            check_one(1, Key::new(0, ROOT_ITEM_KEY, 0), &ri)
                .unwrap_err()
                .to_string()
                .contains("invalid root id 0")
        );
        let mk = Key::new(1 << 20, METADATA_ITEM_KEY, 0);
        check_one(2, mk, &ExtentItem::tree_block(1, 5).to_bytes()).unwrap();
        assert!(
            check_one(2, mk, &[0; 23])
                .unwrap_err()
                .to_string()
                .contains("invalid item size, have 23 expect [24, 16283)")
        );
        assert!(
            check_one(2, Key::new(1 << 20, METADATA_ITEM_KEY, 8), &ExtentItem::tree_block(1, 5).to_bytes())
                .unwrap_err()
                .to_string()
                .contains("invalid tree level")
        );
        // non-skinny tree block EXTENT_ITEM with tree block info
        let fat = ExtentItem {
            refs: 2,
            generation: 1,
            flags: EXTENT_FLAG_TREE_BLOCK,
            tree_block_info: Some(crate::format::TreeBlockInfo { key: Key::new(256, 1, 0), level: 0 }),
            inline_refs: vec![InlineRef::TreeBlock { root: 5 }, InlineRef::SharedBlock { parent: 1 << 22 }],
        };
        check_one(2, Key::new(1 << 20, EXTENT_ITEM_KEY, 16384), &fat.to_bytes()).unwrap();
        assert!(
            check_one(2, Key::new(1 << 20, EXTENT_ITEM_KEY, 4096), &fat.to_bytes())
                .unwrap_err()
                .to_string()
                .contains("invalid extent length")
        );
        let ck = Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM_KEY, 1 << 20);
        check_one(7, ck, &[0; 8]).unwrap();
        assert!(
            check_one(7, ck, &[0; 6]).unwrap_err().to_string().contains("unaligned item size for csum item")
        );
        assert!(
            check_one(7, Key::new(1, EXTENT_CSUM_KEY, 0), &[0; 4])
                .unwrap_err()
                .to_string()
                .contains("invalid key objectid for csum item")
        );
        let bk = Key::new(1 << 20, BLOCK_GROUP_ITEM_KEY, 1 << 30);
        assert!(
            check_one(2, bk, &[0; 23])
                .unwrap_err()
                .to_string()
                .contains("invalid item size, have 23 expect 24")
        );
        assert!(
            check_one(2, Key::new(1 << 20, TREE_BLOCK_REF_KEY, 5), &[0; 1])
                .unwrap_err()
                .to_string()
                .contains("invalid item size, have 1 expect 0")
        );
        check_one(2, Key::new(1 << 20, TREE_BLOCK_REF_KEY, 5), &[]).unwrap();
        assert!(
            check_one(5, Key::new(256, INODE_REF_KEY, 256), &[0; 10])
                .unwrap_err()
                .to_string()
                .contains("invalid item size, have 10 expect (10, 16283)")
        );
        assert!(
            check_one(5, Key::new(256, DIR_INDEX_KEY, 2), &[0; 29])
                .unwrap_err()
                .to_string()
                .contains("dir item header crosses item boundary")
        );
        assert!(
            check_one(3, Key::new(1, DEV_ITEM_KEY, 1), &[0; 97])
                .unwrap_err()
                .to_string()
                .contains("invalid item size: has 97 expect 98")
        );
        assert!(
            check_one(3, Key::new(256, CHUNK_ITEM_KEY, 1 << 20), &[0; 79])
                .unwrap_err()
                .to_string()
                .contains("invalid chunk item size")
        );
    }

    #[test]
    fn csum_and_read_time_validation() {
        let mut b = fs_leaf(16384);
        write_header_csum(&mut b);
        assert!(verify_csum(&b));
        let check = ParentCheck {
            bytenr: 30408704,
            level: 0,
            transid: Some(9),
            owner_root: Some(FS_TREE_OBJECTID),
            first_key: Some(Key::new(256, INODE_ITEM_KEY, 0)),
            fsid: Some([3; 16]),
        };
        validate_extent_buffer(&b, 16384, &check).unwrap();

        let mut flipped = b.clone();
        flipped[16000] ^= 0x40;
        assert!(!verify_csum(&flipped));
        let e = validate_extent_buffer(&flipped, 16384, &check).unwrap_err();
        assert!(matches!(e, TreeCheckError::BadCsum { level: 0, .. }));
        assert!(e.to_string().starts_with("checksum verify failed on logical 30408704 mirror 1 wanted 0x"));
        let mut flipped = b.clone();
        flipped[2] ^= 1; // the stored checksum itself
        assert!(!verify_csum(&flipped));

        let stale = ParentCheck { transid: Some(10), ..check };
        let e = validate_extent_buffer(&b, 16384, &stale).unwrap_err();
        assert_eq!(
            e.to_string(),
            "parent transid verify failed on logical 30408704 mirror 1 wanted 10 found 9"
        );
        let moved = ParentCheck { bytenr: 30408704 + 16384, ..check };
        assert!(matches!(validate_extent_buffer(&b, 16384, &moved), Err(TreeCheckError::BadBytenr { .. })));
        let other_fs = ParentCheck { fsid: Some([9; 16]), ..check };
        assert!(matches!(validate_extent_buffer(&b, 16384, &other_fs), Err(TreeCheckError::BadFsid { .. })));
        let wrong_level = ParentCheck { level: 1, ..check };
        assert!(matches!(
            validate_extent_buffer(&b, 16384, &wrong_level),
            Err(TreeCheckError::LevelMismatch { .. })
        ));
        let wrong_key = ParentCheck { first_key: Some(Key::new(255, 1, 0)), ..check };
        assert!(matches!(
            validate_extent_buffer(&b, 16384, &wrong_key),
            Err(TreeCheckError::FirstKeyMismatch { .. })
        ));
        // the tree checker runs last: a corrupt but well-checksummed block
        let mut bad = b.clone();
        let k = item_key(&bad, 1);
        set_item_key(&mut bad, 2, &k);
        write_header_csum(&mut bad);
        assert!(matches!(
            validate_extent_buffer(&bad, 16384, &check),
            Err(TreeCheckError::BadKeyOrder { .. })
        ));
    }
}
