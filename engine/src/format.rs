//! The btrfs on-disk format: sizes, key types, well-known object ids, flags
//! and the item payloads, all little-endian as in
//! `include/uapi/linux/btrfs_tree.h` and `fs/btrfs/ctree.h`.
//!
//! Names follow the kernel without the `btrfs_`/`BTRFS_` prefix. Everything
//! here is plain data: no trees, no I/O. Tree block images are handled by
//! [`crate::accessors`] and validated by [`crate::tree_checker`].
//!
//! Sizes were checked against the kernel's structure definitions (`sizeof`
//! and `offsetof` on the uapi header) and against blocks of a real btrfs made
//! by mkfs.btrfs 6.2 and written by Linux 6.18 (see the tests).

use std::fmt;

// ---------------------------------------------------------------------------
// Little-endian helpers (bounds are checked by slicing: a bad offset panics).

#[inline]
pub(crate) fn get_u8(buf: &[u8], off: usize) -> u8 {
    buf[off]
}
#[inline]
pub(crate) fn get_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(buf[off..off + 2].try_into().unwrap())
}
#[inline]
pub(crate) fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(buf[off..off + 4].try_into().unwrap())
}
#[inline]
pub(crate) fn get_u64(buf: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(buf[off..off + 8].try_into().unwrap())
}
#[inline]
pub(crate) fn put_u8(buf: &mut [u8], off: usize, v: u8) {
    buf[off] = v;
}
#[inline]
pub(crate) fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub(crate) fn get_array<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    buf[off..off + N].try_into().unwrap()
}

// ---------------------------------------------------------------------------
// Basic sizes.

/// Bytes reserved for a checksum in headers (`BTRFS_CSUM_SIZE`).
pub const CSUM_SIZE: usize = 32;
/// Bytes of a crc32c checksum, the only checksum type the engine models.
pub const CRC32C_CSUM_SIZE: usize = 4;
pub const FSID_SIZE: usize = 16;
pub const UUID_SIZE: usize = 16;
/// The engine's sector size (the spec fixes it at 4 KiB).
pub const SECTORSIZE: u32 = 4096;
/// Smallest and largest valid nodesize (`BTRFS_MAX_METADATA_BLOCKSIZE`).
pub const MIN_NODESIZE: u32 = 4096;
pub const MAX_NODESIZE: u32 = 65536;
/// The default nodesize (mkfs.btrfs).
pub const DEFAULT_NODESIZE: u32 = 16384;
/// Tree levels are 0 (leaf) ..= MAX_LEVEL - 1 (`BTRFS_MAX_LEVEL`).
pub const MAX_LEVEL: usize = 8;
/// Longest file name (`BTRFS_NAME_LEN`).
pub const NAME_LEN: usize = 255;
/// Longest xattr name (`XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;

/// `struct btrfs_disk_key`: objectid u64, type u8, offset u64.
pub const DISK_KEY_SIZE: usize = 17;
/// `struct btrfs_header`: csum 32, fsid 16, bytenr 8, flags 8,
/// chunk_tree_uuid 16, generation 8, owner 8, nritems 4, level 1.
pub const HEADER_SIZE: usize = 101;
/// `struct btrfs_key_ptr`: key 17, blockptr 8, generation 8.
pub const KEY_PTR_SIZE: usize = 33;
/// `struct btrfs_item`: key 17, offset u32, size u32.
pub const ITEM_SIZE: usize = 25;

/// Where the super block lives (`BTRFS_SUPER_INFO_OFFSET`) and its size.
pub const SUPER_INFO_OFFSET: u64 = 65536;
pub const SUPER_INFO_SIZE: usize = 4096;

/// Key pointers per node (`BTRFS_NODEPTRS_PER_BLOCK`): 493 at 16 KiB.
pub const fn nodeptrs_per_block(nodesize: u32) -> u32 {
    (nodesize - HEADER_SIZE as u32) / KEY_PTR_SIZE as u32
}

/// Bytes for item headers and item data in a leaf (`BTRFS_LEAF_DATA_SIZE`):
/// 16 283 at 16 KiB.
pub const fn leaf_data_size(nodesize: u32) -> u32 {
    nodesize - HEADER_SIZE as u32
}

/// Largest item payload (`BTRFS_MAX_ITEM_SIZE`).
pub const fn max_item_size(nodesize: u32) -> u32 {
    leaf_data_size(nodesize) - ITEM_SIZE as u32
}

/// Largest name + data of an xattr (`BTRFS_MAX_XATTR_SIZE`).
pub const fn max_xattr_size(nodesize: u32) -> u32 {
    max_item_size(nodesize) - DIR_ITEM_SIZE as u32
}

/// Largest inline file extent payload (`BTRFS_MAX_INLINE_DATA_SIZE`).
pub const fn max_inline_data_size(nodesize: u32) -> u32 {
    max_item_size(nodesize) - FILE_EXTENT_INLINE_DATA_START as u32
}

/// A nodesize is valid when it is a power of two in 4096..=65536
/// (and so at least the 4 KiB sector size).
pub const fn check_nodesize(nodesize: u32) -> bool {
    nodesize.is_power_of_two() && nodesize >= MIN_NODESIZE && nodesize <= MAX_NODESIZE
}

// ---------------------------------------------------------------------------
// Item key types (`BTRFS_*_KEY`).

pub const INODE_ITEM_KEY: u8 = 1;
pub const INODE_REF_KEY: u8 = 12;
pub const INODE_EXTREF_KEY: u8 = 13;
pub const XATTR_ITEM_KEY: u8 = 24;
pub const VERITY_DESC_ITEM_KEY: u8 = 36;
pub const VERITY_MERKLE_ITEM_KEY: u8 = 37;
pub const ORPHAN_ITEM_KEY: u8 = 48;
pub const DIR_LOG_ITEM_KEY: u8 = 60;
pub const DIR_LOG_INDEX_KEY: u8 = 72;
pub const DIR_ITEM_KEY: u8 = 84;
pub const DIR_INDEX_KEY: u8 = 96;
pub const EXTENT_DATA_KEY: u8 = 108;
pub const EXTENT_CSUM_KEY: u8 = 128;
pub const ROOT_ITEM_KEY: u8 = 132;
pub const ROOT_BACKREF_KEY: u8 = 144;
pub const ROOT_REF_KEY: u8 = 156;
pub const EXTENT_ITEM_KEY: u8 = 168;
pub const METADATA_ITEM_KEY: u8 = 169;
pub const EXTENT_OWNER_REF_KEY: u8 = 172;
pub const TREE_BLOCK_REF_KEY: u8 = 176;
pub const EXTENT_DATA_REF_KEY: u8 = 178;
pub const EXTENT_REF_V0_KEY: u8 = 180;
pub const SHARED_BLOCK_REF_KEY: u8 = 182;
pub const SHARED_DATA_REF_KEY: u8 = 184;
pub const BLOCK_GROUP_ITEM_KEY: u8 = 192;
pub const FREE_SPACE_INFO_KEY: u8 = 198;
pub const FREE_SPACE_EXTENT_KEY: u8 = 199;
pub const FREE_SPACE_BITMAP_KEY: u8 = 200;
pub const DEV_EXTENT_KEY: u8 = 204;
pub const DEV_ITEM_KEY: u8 = 216;
pub const CHUNK_ITEM_KEY: u8 = 228;
pub const RAID_STRIPE_KEY: u8 = 230;
pub const QGROUP_STATUS_KEY: u8 = 240;
pub const QGROUP_INFO_KEY: u8 = 242;
pub const QGROUP_LIMIT_KEY: u8 = 244;
pub const QGROUP_RELATION_KEY: u8 = 246;
pub const BALANCE_ITEM_KEY: u8 = 248;
pub const TEMPORARY_ITEM_KEY: u8 = 248;
pub const DEV_STATS_KEY: u8 = 249;
pub const PERSISTENT_ITEM_KEY: u8 = 249;
pub const DEV_REPLACE_KEY: u8 = 250;
pub const UUID_KEY_SUBVOL: u8 = 251;
pub const UUID_KEY_RECEIVED_SUBVOL: u8 = 252;
pub const STRING_ITEM_KEY: u8 = 253;

/// The kernel's name for a key type, for messages and dumps.
pub fn key_type_name(t: u8) -> &'static str {
    match t {
        0 => "UNKNOWN",
        INODE_ITEM_KEY => "INODE_ITEM",
        INODE_REF_KEY => "INODE_REF",
        INODE_EXTREF_KEY => "INODE_EXTREF",
        XATTR_ITEM_KEY => "XATTR_ITEM",
        VERITY_DESC_ITEM_KEY => "VERITY_DESC_ITEM",
        VERITY_MERKLE_ITEM_KEY => "VERITY_MERKLE_ITEM",
        ORPHAN_ITEM_KEY => "ORPHAN_ITEM",
        DIR_LOG_ITEM_KEY => "DIR_LOG_ITEM",
        DIR_LOG_INDEX_KEY => "DIR_LOG_INDEX",
        DIR_ITEM_KEY => "DIR_ITEM",
        DIR_INDEX_KEY => "DIR_INDEX",
        EXTENT_DATA_KEY => "EXTENT_DATA",
        EXTENT_CSUM_KEY => "EXTENT_CSUM",
        ROOT_ITEM_KEY => "ROOT_ITEM",
        ROOT_BACKREF_KEY => "ROOT_BACKREF",
        ROOT_REF_KEY => "ROOT_REF",
        EXTENT_ITEM_KEY => "EXTENT_ITEM",
        METADATA_ITEM_KEY => "METADATA_ITEM",
        EXTENT_OWNER_REF_KEY => "EXTENT_OWNER_REF",
        TREE_BLOCK_REF_KEY => "TREE_BLOCK_REF",
        EXTENT_DATA_REF_KEY => "EXTENT_DATA_REF",
        EXTENT_REF_V0_KEY => "EXTENT_REF_V0",
        SHARED_BLOCK_REF_KEY => "SHARED_BLOCK_REF",
        SHARED_DATA_REF_KEY => "SHARED_DATA_REF",
        BLOCK_GROUP_ITEM_KEY => "BLOCK_GROUP_ITEM",
        FREE_SPACE_INFO_KEY => "FREE_SPACE_INFO",
        FREE_SPACE_EXTENT_KEY => "FREE_SPACE_EXTENT",
        FREE_SPACE_BITMAP_KEY => "FREE_SPACE_BITMAP",
        DEV_EXTENT_KEY => "DEV_EXTENT",
        DEV_ITEM_KEY => "DEV_ITEM",
        CHUNK_ITEM_KEY => "CHUNK_ITEM",
        RAID_STRIPE_KEY => "RAID_STRIPE",
        QGROUP_STATUS_KEY => "QGROUP_STATUS",
        QGROUP_INFO_KEY => "QGROUP_INFO",
        QGROUP_LIMIT_KEY => "QGROUP_LIMIT",
        QGROUP_RELATION_KEY => "QGROUP_RELATION",
        TEMPORARY_ITEM_KEY => "TEMPORARY_ITEM",
        PERSISTENT_ITEM_KEY => "PERSISTENT_ITEM",
        DEV_REPLACE_KEY => "DEV_REPLACE",
        UUID_KEY_SUBVOL => "UUID_KEY_SUBVOL",
        UUID_KEY_RECEIVED_SUBVOL => "UUID_KEY_RECEIVED_SUBVOL",
        STRING_ITEM_KEY => "STRING_ITEM",
        _ => "UNKNOWN",
    }
}

// ---------------------------------------------------------------------------
// Well-known object ids (`BTRFS_*_OBJECTID`). Negative ones are u64 wraps.

pub const DEV_STATS_OBJECTID: u64 = 0;
pub const ROOT_TREE_OBJECTID: u64 = 1;
pub const EXTENT_TREE_OBJECTID: u64 = 2;
pub const CHUNK_TREE_OBJECTID: u64 = 3;
pub const DEV_TREE_OBJECTID: u64 = 4;
pub const FS_TREE_OBJECTID: u64 = 5;
pub const ROOT_TREE_DIR_OBJECTID: u64 = 6;
pub const CSUM_TREE_OBJECTID: u64 = 7;
pub const QUOTA_TREE_OBJECTID: u64 = 8;
pub const UUID_TREE_OBJECTID: u64 = 9;
pub const FREE_SPACE_TREE_OBJECTID: u64 = 10;
pub const BLOCK_GROUP_TREE_OBJECTID: u64 = 11;
pub const RAID_STRIPE_TREE_OBJECTID: u64 = 12;
pub const BALANCE_OBJECTID: u64 = -4i64 as u64;
pub const ORPHAN_OBJECTID: u64 = -5i64 as u64;
pub const TREE_LOG_OBJECTID: u64 = -6i64 as u64;
pub const TREE_LOG_FIXUP_OBJECTID: u64 = -7i64 as u64;
pub const TREE_RELOC_OBJECTID: u64 = -8i64 as u64;
pub const DATA_RELOC_TREE_OBJECTID: u64 = -9i64 as u64;
pub const EXTENT_CSUM_OBJECTID: u64 = -10i64 as u64;
pub const FREE_SPACE_OBJECTID: u64 = -11i64 as u64;
pub const FREE_INO_OBJECTID: u64 = -12i64 as u64;
pub const MULTIPLE_OBJECTIDS: u64 = -255i64 as u64;
/// First inode number of a subvolume (its root directory) and first
/// user subvolume id.
pub const FIRST_FREE_OBJECTID: u64 = 256;
pub const LAST_FREE_OBJECTID: u64 = -256i64 as u64;
pub const FIRST_CHUNK_TREE_OBJECTID: u64 = 256;
/// Objectid of DEV_ITEMs in the chunk tree.
pub const DEV_ITEMS_OBJECTID: u64 = 1;
pub const BTREE_INODE_OBJECTID: u64 = 1;
pub const EMPTY_SUBVOL_DIR_OBJECTID: u64 = 2;

/// Whether a tree id is a subvolume tree (the kernel's `is_fstree`): the
/// top-level FS tree, or an id >= 256 (as a signed number) whose top 16 bits
/// (the qgroup level) are zero.
pub const fn is_fstree(rootid: u64) -> bool {
    rootid == FS_TREE_OBJECTID || ((rootid as i64) >= FIRST_FREE_OBJECTID as i64 && (rootid >> 48) == 0)
}

// ---------------------------------------------------------------------------
// Flags.

/// Header flags (the low 56 bits of `btrfs_header::flags`).
pub const HEADER_FLAG_WRITTEN: u64 = 1 << 0;
pub const HEADER_FLAG_RELOC: u64 = 1 << 1;
/// The backref revision lives in the top 8 bits of the header flags.
pub const BACKREF_REV_SHIFT: u32 = 56;
pub const OLD_BACKREF_REV: u8 = 0;
pub const MIXED_BACKREF_REV: u8 = 1;

/// Block group and chunk type/profile flags.
pub const BLOCK_GROUP_DATA: u64 = 1 << 0;
pub const BLOCK_GROUP_SYSTEM: u64 = 1 << 1;
pub const BLOCK_GROUP_METADATA: u64 = 1 << 2;
pub const BLOCK_GROUP_RAID0: u64 = 1 << 3;
pub const BLOCK_GROUP_RAID1: u64 = 1 << 4;
pub const BLOCK_GROUP_DUP: u64 = 1 << 5;
pub const BLOCK_GROUP_RAID10: u64 = 1 << 6;
pub const BLOCK_GROUP_RAID5: u64 = 1 << 7;
pub const BLOCK_GROUP_RAID6: u64 = 1 << 8;
pub const BLOCK_GROUP_RAID1C3: u64 = 1 << 9;
pub const BLOCK_GROUP_RAID1C4: u64 = 1 << 10;
pub const BLOCK_GROUP_TYPE_MASK: u64 = BLOCK_GROUP_DATA | BLOCK_GROUP_SYSTEM | BLOCK_GROUP_METADATA;
pub const BLOCK_GROUP_PROFILE_MASK: u64 = BLOCK_GROUP_RAID0
    | BLOCK_GROUP_RAID1
    | BLOCK_GROUP_RAID1C3
    | BLOCK_GROUP_RAID1C4
    | BLOCK_GROUP_RAID5
    | BLOCK_GROUP_RAID6
    | BLOCK_GROUP_DUP
    | BLOCK_GROUP_RAID10;

/// Extent item flags.
pub const EXTENT_FLAG_DATA: u64 = 1 << 0;
pub const EXTENT_FLAG_TREE_BLOCK: u64 = 1 << 1;
pub const BLOCK_FLAG_FULL_BACKREF: u64 = 1 << 8;

/// Root item flags.
pub const ROOT_SUBVOL_RDONLY: u64 = 1 << 0;
pub const ROOT_SUBVOL_DEAD: u64 = 1 << 48;

/// Inode flags (low 32 bits of `btrfs_inode_item::flags`).
pub const INODE_NODATASUM: u64 = 1 << 0;
pub const INODE_NODATACOW: u64 = 1 << 1;
pub const INODE_READONLY: u64 = 1 << 2;
pub const INODE_NOCOMPRESS: u64 = 1 << 3;
pub const INODE_PREALLOC: u64 = 1 << 4;
pub const INODE_SYNC: u64 = 1 << 5;
pub const INODE_IMMUTABLE: u64 = 1 << 6;
pub const INODE_APPEND: u64 = 1 << 7;
pub const INODE_NODUMP: u64 = 1 << 8;
pub const INODE_NOATIME: u64 = 1 << 9;
pub const INODE_DIRSYNC: u64 = 1 << 10;
pub const INODE_COMPRESS: u64 = 1 << 11;
pub const INODE_ROOT_ITEM_INIT: u64 = 1 << 31;
pub const INODE_FLAG_MASK: u64 = INODE_NODATASUM
    | INODE_NODATACOW
    | INODE_READONLY
    | INODE_NOCOMPRESS
    | INODE_PREALLOC
    | INODE_SYNC
    | INODE_IMMUTABLE
    | INODE_APPEND
    | INODE_NODUMP
    | INODE_NOATIME
    | INODE_DIRSYNC
    | INODE_COMPRESS
    | INODE_ROOT_ITEM_INIT;
/// Read-only-compatible inode flags (high 32 bits).
pub const INODE_RO_VERITY: u64 = 1 << 0;
pub const INODE_RO_FLAG_MASK: u64 = INODE_RO_VERITY;

/// Directory entry types (`BTRFS_FT_*`).
pub const FT_UNKNOWN: u8 = 0;
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;
pub const FT_XATTR: u8 = 8;
pub const FT_MAX: u8 = 9;

/// File extent types.
pub const FILE_EXTENT_INLINE: u8 = 0;
pub const FILE_EXTENT_REG: u8 = 1;
pub const FILE_EXTENT_PREALLOC: u8 = 2;
pub const NR_FILE_EXTENT_TYPES: u8 = 3;

/// Compression types.
pub const COMPRESS_NONE: u8 = 0;
pub const COMPRESS_ZLIB: u8 = 1;
pub const COMPRESS_LZO: u8 = 2;
pub const COMPRESS_ZSTD: u8 = 3;
pub const NR_COMPRESS_TYPES: u8 = 4;

// ---------------------------------------------------------------------------
// Item payload sizes.

pub const TIMESPEC_SIZE: usize = 12;
pub const INODE_ITEM_SIZE: usize = 160;
/// `struct btrfs_inode_ref` without the name.
pub const INODE_REF_SIZE: usize = 10;
/// `struct btrfs_inode_extref` without the name.
pub const INODE_EXTREF_SIZE: usize = 18;
/// `struct btrfs_dir_item` without name and data.
pub const DIR_ITEM_SIZE: usize = 30;
pub const ROOT_ITEM_SIZE: usize = 439;
/// Size of a root item written before `generation_v2` existed.
pub const LEGACY_ROOT_ITEM_SIZE: usize = 239;
/// `struct btrfs_root_ref` without the name.
pub const ROOT_REF_SIZE: usize = 18;
pub const EXTENT_ITEM_SIZE: usize = 24;
pub const TREE_BLOCK_INFO_SIZE: usize = 18;
/// `struct btrfs_extent_inline_ref`: type u8 + offset u64.
pub const EXTENT_INLINE_REF_SIZE: usize = 9;
pub const EXTENT_DATA_REF_SIZE: usize = 28;
pub const SHARED_DATA_REF_SIZE: usize = 4;
pub const BLOCK_GROUP_ITEM_SIZE: usize = 24;
pub const FILE_EXTENT_ITEM_SIZE: usize = 53;
/// Inline file data starts after this many bytes of the file extent item.
pub const FILE_EXTENT_INLINE_DATA_START: usize = 21;
pub const DEV_ITEM_SIZE: usize = 98;
pub const DEV_EXTENT_SIZE: usize = 48;
pub const STRIPE_SIZE: usize = 32;
/// `struct btrfs_chunk` with one stripe.
pub const CHUNK_ITEM_SIZE: usize = 80;
/// Size of a metadata (skinny) item with one inline TREE_BLOCK_REF: 33 B.
pub const METADATA_ITEM_ONE_REF_SIZE: usize = EXTENT_ITEM_SIZE + EXTENT_INLINE_REF_SIZE;
/// Size of a data EXTENT_ITEM with one inline EXTENT_DATA_REF: 53 B.
pub const DATA_EXTENT_ITEM_ONE_REF_SIZE: usize = EXTENT_ITEM_SIZE + 1 + EXTENT_DATA_REF_SIZE;

/// Size of a chunk item with `num_stripes` stripes (`btrfs_chunk_item_size`).
pub const fn chunk_item_size(num_stripes: u16) -> usize {
    CHUNK_ITEM_SIZE - STRIPE_SIZE + STRIPE_SIZE * num_stripes as usize
}

/// Size of an inline ref of the given type, including its type byte
/// (`btrfs_extent_inline_ref_size`); `None` for an unknown type.
pub const fn extent_inline_ref_size(ref_type: u8) -> Option<usize> {
    match ref_type {
        TREE_BLOCK_REF_KEY | SHARED_BLOCK_REF_KEY => Some(EXTENT_INLINE_REF_SIZE),
        SHARED_DATA_REF_KEY => Some(EXTENT_INLINE_REF_SIZE + SHARED_DATA_REF_SIZE),
        EXTENT_DATA_REF_KEY => Some(1 + EXTENT_DATA_REF_SIZE),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// Hashes and checksums.

/// The raw crc32c update the kernel's `crc32c(seed, data, len)` performs:
/// no inversion on entry or exit. The `crc32c` crate inverts on both sides,
/// so invert around it.
#[inline]
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// The offset of a DIR_ITEM/XATTR_ITEM key (`btrfs_name_hash`):
/// `crc32c((u32)~1, name, len)`.
pub fn name_hash(name: &[u8]) -> u64 {
    crc32c_raw(!1u32, name) as u64
}

/// The offset of an INODE_EXTREF key (`btrfs_extref_hash`): crc32c seeded
/// with the low 32 bits of the parent directory's inode number.
pub fn extref_hash(parent_objectid: u64, name: &[u8]) -> u64 {
    crc32c_raw(parent_objectid as u32, name) as u64
}

/// The offset of a keyed EXTENT_DATA_REF item (`hash_extent_data_ref` in
/// extent-tree.c): two raw crc32c over the little-endian fields, combined
/// with a shift of 31 (sic).
pub fn hash_extent_data_ref(root: u64, owner: u64, offset: u64) -> u64 {
    let high = crc32c_raw(!0u32, &root.to_le_bytes());
    let low = crc32c_raw(!0u32, &owner.to_le_bytes());
    let low = crc32c_raw(low, &offset.to_le_bytes());
    ((high as u64) << 31) ^ (low as u64)
}

/// The checksum of a tree block (`csum_tree_block` with csum type crc32c):
/// standard crc32c over everything after the 32-byte checksum area. It is
/// stored little-endian in the first 4 bytes; the other 28 are zero.
pub fn csum_tree_block(block: &[u8]) -> u32 {
    crc32c::crc32c(&block[CSUM_SIZE..])
}

/// The checksum of one data sector in the csum tree (crc32c, 4 bytes).
pub fn csum_data(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

// ---------------------------------------------------------------------------
// Keys.

/// A key in CPU order (`struct btrfs_key`). Orders as the kernel's
/// `btrfs_comp_cpu_keys`: objectid, then type, then offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub objectid: u64,
    pub item_type: u8,
    pub offset: u64,
}

impl Key {
    pub const MIN: Key = Key::new(0, 0, 0);
    pub const MAX: Key = Key::new(u64::MAX, u8::MAX, u64::MAX);

    pub const fn new(objectid: u64, item_type: u8, offset: u64) -> Key {
        Key { objectid, item_type, offset }
    }

    /// Decode a 17-byte `btrfs_disk_key` (`btrfs_disk_key_to_cpu`).
    pub fn read(buf: &[u8]) -> Key {
        Key { objectid: get_u64(buf, 0), item_type: get_u8(buf, 8), offset: get_u64(buf, 9) }
    }

    /// Encode into the first 17 bytes of `buf` (`btrfs_cpu_key_to_disk`).
    pub fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.objectid);
        put_u8(buf, 8, self.item_type);
        put_u64(buf, 9, self.offset);
    }

    pub fn to_bytes(&self) -> [u8; DISK_KEY_SIZE] {
        let mut b = [0u8; DISK_KEY_SIZE];
        self.write(&mut b);
        b
    }

    pub fn from_bytes(b: &[u8; DISK_KEY_SIZE]) -> Key {
        Key::read(b)
    }
}

/// `(objectid type offset)` in numbers, as the kernel's tree checker prints.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({} {} {})", self.objectid, self.item_type, self.offset)
    }
}

// ---------------------------------------------------------------------------
// Item payloads.

/// Something the payload decoder could not parse: the bytes are too short
/// for what their own length fields announce, or a type byte is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub what: &'static str,
    pub have: usize,
    pub need: usize,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot decode {}: have {} bytes, need {}", self.what, self.have, self.need)
    }
}

impl std::error::Error for DecodeError {}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n { Err(DecodeError { what, have: buf.len(), need: n }) } else { Ok(()) }
}

/// A fixed-size item payload.
pub trait FixedItem: Sized {
    const SIZE: usize;
    /// Decode from the first `SIZE` bytes. Panics when `buf` is shorter:
    /// check the item size (or run the tree checker) first.
    fn read(buf: &[u8]) -> Self;
    /// Encode into the first `SIZE` bytes. Panics when `buf` is shorter.
    fn write(&self, buf: &mut [u8]);
    fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; Self::SIZE];
        self.write(&mut v);
        v
    }
}

/// `struct btrfs_timespec`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Timespec {
    pub sec: u64,
    pub nsec: u32,
}

impl Timespec {
    pub fn from_ns(ns: u64) -> Timespec {
        Timespec { sec: ns / 1_000_000_000, nsec: (ns % 1_000_000_000) as u32 }
    }
}

impl FixedItem for Timespec {
    const SIZE: usize = TIMESPEC_SIZE;
    fn read(buf: &[u8]) -> Self {
        Timespec { sec: get_u64(buf, 0), nsec: get_u32(buf, 8) }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.sec);
        put_u32(buf, 8, self.nsec);
    }
}

/// `struct btrfs_inode_item`, 160 bytes. The four reserved u64 are written
/// as zero and ignored on read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeItem {
    pub generation: u64,
    pub transid: u64,
    pub size: u64,
    pub nbytes: u64,
    pub block_group: u64,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u64,
    pub flags: u64,
    pub sequence: u64,
    pub atime: Timespec,
    pub ctime: Timespec,
    pub mtime: Timespec,
    pub otime: Timespec,
}

impl FixedItem for InodeItem {
    const SIZE: usize = INODE_ITEM_SIZE;
    fn read(buf: &[u8]) -> Self {
        assert!(buf.len() >= Self::SIZE, "inode item too short");
        InodeItem {
            generation: get_u64(buf, 0),
            transid: get_u64(buf, 8),
            size: get_u64(buf, 16),
            nbytes: get_u64(buf, 24),
            block_group: get_u64(buf, 32),
            nlink: get_u32(buf, 40),
            uid: get_u32(buf, 44),
            gid: get_u32(buf, 48),
            mode: get_u32(buf, 52),
            rdev: get_u64(buf, 56),
            flags: get_u64(buf, 64),
            sequence: get_u64(buf, 72),
            // reserved[4] at 80..112
            atime: Timespec::read(&buf[112..]),
            ctime: Timespec::read(&buf[124..]),
            mtime: Timespec::read(&buf[136..]),
            otime: Timespec::read(&buf[148..]),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        assert!(buf.len() >= Self::SIZE, "inode item buffer too short");
        put_u64(buf, 0, self.generation);
        put_u64(buf, 8, self.transid);
        put_u64(buf, 16, self.size);
        put_u64(buf, 24, self.nbytes);
        put_u64(buf, 32, self.block_group);
        put_u32(buf, 40, self.nlink);
        put_u32(buf, 44, self.uid);
        put_u32(buf, 48, self.gid);
        put_u32(buf, 52, self.mode);
        put_u64(buf, 56, self.rdev);
        put_u64(buf, 64, self.flags);
        put_u64(buf, 72, self.sequence);
        buf[80..112].fill(0);
        self.atime.write(&mut buf[112..]);
        self.ctime.write(&mut buf[124..]);
        self.mtime.write(&mut buf[136..]);
        self.otime.write(&mut buf[148..]);
    }
}

/// One entry of an INODE_REF item (`struct btrfs_inode_ref` + name). The
/// key is (inode, INODE_REF, parent dir); one item holds one entry per name
/// the inode has in that directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeRef {
    pub index: u64,
    pub name: Vec<u8>,
}

impl InodeRef {
    pub fn encoded_len(&self) -> usize {
        INODE_REF_SIZE + self.name.len()
    }

    /// Decode the entry at the start of `buf`; returns it and its length.
    pub fn read(buf: &[u8]) -> Result<(InodeRef, usize), DecodeError> {
        need("inode ref", buf, INODE_REF_SIZE)?;
        let name_len = get_u16(buf, 8) as usize;
        let len = INODE_REF_SIZE + name_len;
        need("inode ref name", buf, len)?;
        Ok((InodeRef { index: get_u64(buf, 0), name: buf[INODE_REF_SIZE..len].to_vec() }, len))
    }

    /// Encode at the start of `buf`; returns the length written.
    pub fn write(&self, buf: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(buf.len() >= len, "inode ref buffer too short");
        put_u64(buf, 0, self.index);
        put_u16(buf, 8, u16::try_from(self.name.len()).expect("name too long"));
        buf[INODE_REF_SIZE..len].copy_from_slice(&self.name);
        len
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.encoded_len()];
        self.write(&mut v);
        v
    }
}

/// Iterate over the entries of an INODE_REF item payload.
pub fn inode_refs(payload: &[u8]) -> InodeRefIter<'_> {
    InodeRefIter { rest: payload }
}

pub struct InodeRefIter<'a> {
    rest: &'a [u8],
}

impl Iterator for InodeRefIter<'_> {
    type Item = Result<InodeRef, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match InodeRef::read(self.rest) {
            Ok((r, len)) => {
                self.rest = &self.rest[len..];
                Some(Ok(r))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// One entry of a DIR_ITEM, DIR_INDEX or XATTR_ITEM item
/// (`struct btrfs_dir_item`, then the name, then the data). A DIR_ITEM whose
/// names collide on [`name_hash`] holds several entries back to back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DirItem {
    /// The inode (INODE_ITEM key) or subvolume (ROOT_ITEM key) it names.
    pub location: Key,
    pub transid: u64,
    /// One of the `FT_*` types.
    pub dir_type: u8,
    pub name: Vec<u8>,
    /// Xattr value; empty for directory entries.
    pub data: Vec<u8>,
}

impl DirItem {
    pub fn encoded_len(&self) -> usize {
        DIR_ITEM_SIZE + self.name.len() + self.data.len()
    }

    /// Decode the entry at the start of `buf`; returns it and its length.
    pub fn read(buf: &[u8]) -> Result<(DirItem, usize), DecodeError> {
        need("dir item", buf, DIR_ITEM_SIZE)?;
        let data_len = get_u16(buf, 25) as usize;
        let name_len = get_u16(buf, 27) as usize;
        let len = DIR_ITEM_SIZE + name_len + data_len;
        need("dir item name and data", buf, len)?;
        let name_end = DIR_ITEM_SIZE + name_len;
        Ok((
            DirItem {
                location: Key::read(buf),
                transid: get_u64(buf, 17),
                dir_type: get_u8(buf, 29),
                name: buf[DIR_ITEM_SIZE..name_end].to_vec(),
                data: buf[name_end..len].to_vec(),
            },
            len,
        ))
    }

    /// Encode at the start of `buf`; returns the length written.
    pub fn write(&self, buf: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(buf.len() >= len, "dir item buffer too short");
        self.location.write(buf);
        put_u64(buf, 17, self.transid);
        put_u16(buf, 25, u16::try_from(self.data.len()).expect("data too long"));
        put_u16(buf, 27, u16::try_from(self.name.len()).expect("name too long"));
        put_u8(buf, 29, self.dir_type);
        let name_end = DIR_ITEM_SIZE + self.name.len();
        buf[DIR_ITEM_SIZE..name_end].copy_from_slice(&self.name);
        buf[name_end..len].copy_from_slice(&self.data);
        len
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.encoded_len()];
        self.write(&mut v);
        v
    }
}

/// Iterate over the entries of a DIR_ITEM/DIR_INDEX/XATTR_ITEM payload.
/// A truncated entry yields one error and ends the iteration.
pub fn dir_items(payload: &[u8]) -> DirItemIter<'_> {
    DirItemIter { rest: payload }
}

pub struct DirItemIter<'a> {
    rest: &'a [u8],
}

impl Iterator for DirItemIter<'_> {
    type Item = Result<DirItem, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match DirItem::read(self.rest) {
            Ok((d, len)) => {
                self.rest = &self.rest[len..];
                Some(Ok(d))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// `struct btrfs_root_item`, 439 bytes (239 in the legacy format, which
/// ends before `generation_v2`; reading one leaves the newer fields zero).
/// The reserved tail is written as zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RootItem {
    pub inode: InodeItem,
    pub generation: u64,
    pub root_dirid: u64,
    pub bytenr: u64,
    pub byte_limit: u64,
    pub bytes_used: u64,
    pub last_snapshot: u64,
    pub flags: u64,
    pub refs: u32,
    pub drop_progress: Key,
    pub drop_level: u8,
    pub level: u8,
    pub generation_v2: u64,
    pub uuid: [u8; UUID_SIZE],
    pub parent_uuid: [u8; UUID_SIZE],
    pub received_uuid: [u8; UUID_SIZE],
    pub ctransid: u64,
    pub otransid: u64,
    pub stransid: u64,
    pub rtransid: u64,
    pub ctime: Timespec,
    pub otime: Timespec,
    pub stime: Timespec,
    pub rtime: Timespec,
}

impl RootItem {
    /// Decode a current (439 B) or legacy (239 B) root item.
    pub fn read_any(buf: &[u8]) -> Result<RootItem, DecodeError> {
        if buf.len() >= ROOT_ITEM_SIZE {
            Ok(RootItem::read(buf))
        } else if buf.len() >= LEGACY_ROOT_ITEM_SIZE {
            let mut full = [0u8; ROOT_ITEM_SIZE];
            full[..LEGACY_ROOT_ITEM_SIZE].copy_from_slice(&buf[..LEGACY_ROOT_ITEM_SIZE]);
            Ok(RootItem::read(&full))
        } else {
            Err(DecodeError { what: "root item", have: buf.len(), need: LEGACY_ROOT_ITEM_SIZE })
        }
    }
}

impl FixedItem for RootItem {
    const SIZE: usize = ROOT_ITEM_SIZE;
    fn read(buf: &[u8]) -> Self {
        assert!(buf.len() >= Self::SIZE, "root item too short");
        RootItem {
            inode: InodeItem::read(buf),
            generation: get_u64(buf, 160),
            root_dirid: get_u64(buf, 168),
            bytenr: get_u64(buf, 176),
            byte_limit: get_u64(buf, 184),
            bytes_used: get_u64(buf, 192),
            last_snapshot: get_u64(buf, 200),
            flags: get_u64(buf, 208),
            refs: get_u32(buf, 216),
            drop_progress: Key::read(&buf[220..]),
            drop_level: get_u8(buf, 237),
            level: get_u8(buf, 238),
            generation_v2: get_u64(buf, 239),
            uuid: get_array(buf, 247),
            parent_uuid: get_array(buf, 263),
            received_uuid: get_array(buf, 279),
            ctransid: get_u64(buf, 295),
            otransid: get_u64(buf, 303),
            stransid: get_u64(buf, 311),
            rtransid: get_u64(buf, 319),
            ctime: Timespec::read(&buf[327..]),
            otime: Timespec::read(&buf[339..]),
            stime: Timespec::read(&buf[351..]),
            rtime: Timespec::read(&buf[363..]),
            // reserved[8] at 375..439
        }
    }
    fn write(&self, buf: &mut [u8]) {
        assert!(buf.len() >= Self::SIZE, "root item buffer too short");
        self.inode.write(buf);
        put_u64(buf, 160, self.generation);
        put_u64(buf, 168, self.root_dirid);
        put_u64(buf, 176, self.bytenr);
        put_u64(buf, 184, self.byte_limit);
        put_u64(buf, 192, self.bytes_used);
        put_u64(buf, 200, self.last_snapshot);
        put_u64(buf, 208, self.flags);
        put_u32(buf, 216, self.refs);
        self.drop_progress.write(&mut buf[220..]);
        put_u8(buf, 237, self.drop_level);
        put_u8(buf, 238, self.level);
        put_u64(buf, 239, self.generation_v2);
        buf[247..263].copy_from_slice(&self.uuid);
        buf[263..279].copy_from_slice(&self.parent_uuid);
        buf[279..295].copy_from_slice(&self.received_uuid);
        put_u64(buf, 295, self.ctransid);
        put_u64(buf, 303, self.otransid);
        put_u64(buf, 311, self.stransid);
        put_u64(buf, 319, self.rtransid);
        self.ctime.write(&mut buf[327..]);
        self.otime.write(&mut buf[339..]);
        self.stime.write(&mut buf[351..]);
        self.rtime.write(&mut buf[363..]);
        buf[375..439].fill(0);
    }
}

/// `struct btrfs_tree_block_info`: present in a (non-skinny) EXTENT_ITEM of
/// a tree block, between the extent item and its inline refs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TreeBlockInfo {
    pub key: Key,
    pub level: u8,
}

impl FixedItem for TreeBlockInfo {
    const SIZE: usize = TREE_BLOCK_INFO_SIZE;
    fn read(buf: &[u8]) -> Self {
        TreeBlockInfo { key: Key::read(buf), level: get_u8(buf, 17) }
    }
    fn write(&self, buf: &mut [u8]) {
        self.key.write(buf);
        put_u8(buf, 17, self.level);
    }
}

/// `struct btrfs_extent_data_ref`, 28 bytes: the payload of a keyed
/// EXTENT_DATA_REF item and the body of an inline one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentDataRef {
    pub root: u64,
    pub objectid: u64,
    pub offset: u64,
    pub count: u32,
}

impl ExtentDataRef {
    /// The key offset of this ref as a keyed item.
    pub fn hash(&self) -> u64 {
        hash_extent_data_ref(self.root, self.objectid, self.offset)
    }
}

impl FixedItem for ExtentDataRef {
    const SIZE: usize = EXTENT_DATA_REF_SIZE;
    fn read(buf: &[u8]) -> Self {
        ExtentDataRef {
            root: get_u64(buf, 0),
            objectid: get_u64(buf, 8),
            offset: get_u64(buf, 16),
            count: get_u32(buf, 24),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.root);
        put_u64(buf, 8, self.objectid);
        put_u64(buf, 16, self.offset);
        put_u32(buf, 24, self.count);
    }
}

/// An inline back reference inside an EXTENT_ITEM/METADATA_ITEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InlineRef {
    /// TREE_BLOCK_REF: the tree (root id) that owns the block. 9 B.
    TreeBlock { root: u64 },
    /// SHARED_BLOCK_REF: the parent block's bytenr. 9 B.
    SharedBlock { parent: u64 },
    /// EXTENT_DATA_REF: the file extent that points at the data. 29 B.
    ExtentData(ExtentDataRef),
    /// SHARED_DATA_REF: the parent leaf's bytenr and a count. 13 B.
    SharedData { parent: u64, count: u32 },
}

impl InlineRef {
    pub fn ref_type(&self) -> u8 {
        match self {
            InlineRef::TreeBlock { .. } => TREE_BLOCK_REF_KEY,
            InlineRef::SharedBlock { .. } => SHARED_BLOCK_REF_KEY,
            InlineRef::ExtentData(_) => EXTENT_DATA_REF_KEY,
            InlineRef::SharedData { .. } => SHARED_DATA_REF_KEY,
        }
    }

    pub fn encoded_len(&self) -> usize {
        extent_inline_ref_size(self.ref_type()).unwrap()
    }

    /// How many references this inline ref stands for.
    pub fn count(&self) -> u64 {
        match self {
            InlineRef::TreeBlock { .. } | InlineRef::SharedBlock { .. } => 1,
            InlineRef::ExtentData(d) => d.count as u64,
            InlineRef::SharedData { count, .. } => *count as u64,
        }
    }

    pub fn read(buf: &[u8]) -> Result<(InlineRef, usize), DecodeError> {
        need("inline ref", buf, 1)?;
        let t = buf[0];
        let Some(len) = extent_inline_ref_size(t) else {
            return Err(DecodeError { what: "inline ref of unknown type", have: buf.len(), need: 0 });
        };
        need("inline ref", buf, len)?;
        let r = match t {
            TREE_BLOCK_REF_KEY => InlineRef::TreeBlock { root: get_u64(buf, 1) },
            SHARED_BLOCK_REF_KEY => InlineRef::SharedBlock { parent: get_u64(buf, 1) },
            EXTENT_DATA_REF_KEY => InlineRef::ExtentData(ExtentDataRef::read(&buf[1..])),
            SHARED_DATA_REF_KEY => InlineRef::SharedData { parent: get_u64(buf, 1), count: get_u32(buf, 9) },
            _ => unreachable!(),
        };
        Ok((r, len))
    }

    pub fn write(&self, buf: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(buf.len() >= len, "inline ref buffer too short");
        buf[0] = self.ref_type();
        match self {
            InlineRef::TreeBlock { root } => put_u64(buf, 1, *root),
            InlineRef::SharedBlock { parent } => put_u64(buf, 1, *parent),
            InlineRef::ExtentData(d) => d.write(&mut buf[1..]),
            InlineRef::SharedData { parent, count } => {
                put_u64(buf, 1, *parent);
                put_u32(buf, 9, *count);
            }
        }
        len
    }
}

/// An EXTENT_ITEM or METADATA_ITEM payload: `struct btrfs_extent_item`
/// (refs, generation, flags: 24 B), the tree block info for a non-skinny
/// tree block item, then inline refs. A skinny METADATA_ITEM with one
/// TREE_BLOCK_REF is 33 B; a data EXTENT_ITEM with one EXTENT_DATA_REF 53 B.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentItem {
    pub refs: u64,
    pub generation: u64,
    pub flags: u64,
    pub tree_block_info: Option<TreeBlockInfo>,
    pub inline_refs: Vec<InlineRef>,
}

impl ExtentItem {
    /// A skinny METADATA_ITEM for a tree block owned by `root`.
    pub fn tree_block(generation: u64, root: u64) -> ExtentItem {
        ExtentItem {
            refs: 1,
            generation,
            flags: EXTENT_FLAG_TREE_BLOCK,
            tree_block_info: None,
            inline_refs: vec![InlineRef::TreeBlock { root }],
        }
    }

    /// A data EXTENT_ITEM referenced once by a file extent of `objectid`
    /// at file offset `offset` in tree `root`.
    pub fn data(generation: u64, root: u64, objectid: u64, offset: u64) -> ExtentItem {
        ExtentItem {
            refs: 1,
            generation,
            flags: EXTENT_FLAG_DATA,
            tree_block_info: None,
            inline_refs: vec![InlineRef::ExtentData(ExtentDataRef { root, objectid, offset, count: 1 })],
        }
    }

    pub fn encoded_len(&self) -> usize {
        EXTENT_ITEM_SIZE
            + self.tree_block_info.map_or(0, |_| TREE_BLOCK_INFO_SIZE)
            + self.inline_refs.iter().map(|r| r.encoded_len()).sum::<usize>()
    }

    /// Decode a payload whose key has type `key_type` (EXTENT_ITEM or
    /// METADATA_ITEM): a tree block info is present only for a tree block
    /// under an EXTENT_ITEM key.
    pub fn read(buf: &[u8], key_type: u8) -> Result<ExtentItem, DecodeError> {
        need("extent item", buf, EXTENT_ITEM_SIZE)?;
        let flags = get_u64(buf, 16);
        let mut pos = EXTENT_ITEM_SIZE;
        let tree_block_info = if flags & EXTENT_FLAG_TREE_BLOCK != 0 && key_type == EXTENT_ITEM_KEY {
            need("tree block info", buf, pos + TREE_BLOCK_INFO_SIZE)?;
            let info = TreeBlockInfo::read(&buf[pos..]);
            pos += TREE_BLOCK_INFO_SIZE;
            Some(info)
        } else {
            None
        };
        let mut inline_refs = Vec::new();
        while pos < buf.len() {
            let (r, len) = InlineRef::read(&buf[pos..])?;
            inline_refs.push(r);
            pos += len;
        }
        Ok(ExtentItem {
            refs: get_u64(buf, 0),
            generation: get_u64(buf, 8),
            flags,
            tree_block_info,
            inline_refs,
        })
    }

    pub fn write(&self, buf: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(buf.len() >= len, "extent item buffer too short");
        put_u64(buf, 0, self.refs);
        put_u64(buf, 8, self.generation);
        put_u64(buf, 16, self.flags);
        let mut pos = EXTENT_ITEM_SIZE;
        if let Some(info) = &self.tree_block_info {
            info.write(&mut buf[pos..]);
            pos += TREE_BLOCK_INFO_SIZE;
        }
        for r in &self.inline_refs {
            pos += r.write(&mut buf[pos..]);
        }
        debug_assert_eq!(pos, len);
        len
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.encoded_len()];
        self.write(&mut v);
        v
    }
}

/// `struct btrfs_root_ref` and its name: the payload of ROOT_REF (keyed
/// (parent tree, ROOT_REF, subvolume)) and ROOT_BACKREF (keyed (subvolume,
/// ROOT_BACKREF, parent tree)) in the root tree: where a subvolume is
/// linked, the directory and its DIR_INDEX.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RootRef {
    pub dirid: u64,
    pub sequence: u64,
    pub name: Vec<u8>,
}

impl RootRef {
    pub const HEAD_SIZE: usize = 18;

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut buf = vec![0u8; Self::HEAD_SIZE + self.name.len()];
        put_u64(&mut buf, 0, self.dirid);
        put_u64(&mut buf, 8, self.sequence);
        buf[16..18].copy_from_slice(&(self.name.len() as u16).to_le_bytes());
        buf[18..].copy_from_slice(&self.name);
        buf
    }

    pub fn read(buf: &[u8]) -> Result<RootRef, DecodeError> {
        let short = |need| DecodeError { what: "root ref", have: buf.len(), need };
        if buf.len() < Self::HEAD_SIZE {
            return Err(short(Self::HEAD_SIZE));
        }
        let name_len = u16::from_le_bytes([buf[16], buf[17]]) as usize;
        let name =
            buf.get(Self::HEAD_SIZE..Self::HEAD_SIZE + name_len).ok_or(short(Self::HEAD_SIZE + name_len))?;
        Ok(RootRef { dirid: get_u64(buf, 0), sequence: get_u64(buf, 8), name: name.to_vec() })
    }
}

/// `struct btrfs_qgroup_status_item` without the simple-quota `enable_gen`,
/// 32 bytes, keyed (0, QGROUP_STATUS, 0) in the quota tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QgroupStatusItem {
    pub version: u64,
    /// The transaction that last wrote the qgroup items.
    pub generation: u64,
    /// QGROUP_STATUS_FLAG_ON, _RESCAN, _INCONSISTENT.
    pub flags: u64,
    /// Rescan progress (an extent bytenr); 0 when no rescan runs.
    pub rescan: u64,
}

pub const QGROUP_STATUS_VERSION: u64 = 1;
pub const QGROUP_STATUS_FLAG_ON: u64 = 1 << 0;
pub const QGROUP_STATUS_FLAG_RESCAN: u64 = 1 << 1;
pub const QGROUP_STATUS_FLAG_INCONSISTENT: u64 = 1 << 2;

impl FixedItem for QgroupStatusItem {
    const SIZE: usize = 32;
    fn read(buf: &[u8]) -> Self {
        QgroupStatusItem {
            version: get_u64(buf, 0),
            generation: get_u64(buf, 8),
            flags: get_u64(buf, 16),
            rescan: get_u64(buf, 24),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.version);
        put_u64(buf, 8, self.generation);
        put_u64(buf, 16, self.flags);
        put_u64(buf, 24, self.rescan);
    }
}

/// `struct btrfs_qgroup_info_item`, 40 bytes, keyed (0, QGROUP_INFO,
/// qgroupid): bytes referenced and exclusively referenced (no compression
/// here, so the `_cmpr` fields equal them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QgroupInfoItem {
    pub generation: u64,
    pub rfer: u64,
    pub rfer_cmpr: u64,
    pub excl: u64,
    pub excl_cmpr: u64,
}

impl FixedItem for QgroupInfoItem {
    const SIZE: usize = 40;
    fn read(buf: &[u8]) -> Self {
        QgroupInfoItem {
            generation: get_u64(buf, 0),
            rfer: get_u64(buf, 8),
            rfer_cmpr: get_u64(buf, 16),
            excl: get_u64(buf, 24),
            excl_cmpr: get_u64(buf, 32),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.generation);
        put_u64(buf, 8, self.rfer);
        put_u64(buf, 16, self.rfer_cmpr);
        put_u64(buf, 24, self.excl);
        put_u64(buf, 32, self.excl_cmpr);
    }
}

/// `struct btrfs_qgroup_limit_item`, 40 bytes, keyed (0, QGROUP_LIMIT,
/// qgroupid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QgroupLimitItem {
    /// QGROUP_LIMIT_MAX_RFER, QGROUP_LIMIT_MAX_EXCL.
    pub flags: u64,
    pub max_rfer: u64,
    pub max_excl: u64,
    pub rsv_rfer: u64,
    pub rsv_excl: u64,
}

pub const QGROUP_LIMIT_MAX_RFER: u64 = 1 << 0;
pub const QGROUP_LIMIT_MAX_EXCL: u64 = 1 << 1;

impl FixedItem for QgroupLimitItem {
    const SIZE: usize = 40;
    fn read(buf: &[u8]) -> Self {
        QgroupLimitItem {
            flags: get_u64(buf, 0),
            max_rfer: get_u64(buf, 8),
            max_excl: get_u64(buf, 16),
            rsv_rfer: get_u64(buf, 24),
            rsv_excl: get_u64(buf, 32),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.flags);
        put_u64(buf, 8, self.max_rfer);
        put_u64(buf, 16, self.max_excl);
        put_u64(buf, 24, self.rsv_rfer);
        put_u64(buf, 32, self.rsv_excl);
    }
}

/// `struct btrfs_block_group_item`, 24 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockGroupItem {
    pub used: u64,
    /// Always FIRST_CHUNK_TREE_OBJECTID (256) outside extent tree v2.
    pub chunk_objectid: u64,
    pub flags: u64,
}

impl FixedItem for BlockGroupItem {
    const SIZE: usize = BLOCK_GROUP_ITEM_SIZE;
    fn read(buf: &[u8]) -> Self {
        BlockGroupItem { used: get_u64(buf, 0), chunk_objectid: get_u64(buf, 8), flags: get_u64(buf, 16) }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.used);
        put_u64(buf, 8, self.chunk_objectid);
        put_u64(buf, 16, self.flags);
    }
}

/// What follows the 21-byte head of a file extent item.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FileExtentBody {
    /// FILE_EXTENT_INLINE: the (possibly compressed) file data itself.
    Inline(Vec<u8>),
    /// FILE_EXTENT_REG or FILE_EXTENT_PREALLOC: where the data lives.
    Regular { disk_bytenr: u64, disk_num_bytes: u64, offset: u64, num_bytes: u64 },
}

/// `struct btrfs_file_extent_item`: 53 bytes for a regular or preallocated
/// extent, 21 bytes + data for an inline one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileExtentItem {
    pub generation: u64,
    pub ram_bytes: u64,
    pub compression: u8,
    pub encryption: u8,
    pub other_encoding: u16,
    /// FILE_EXTENT_INLINE, FILE_EXTENT_REG or FILE_EXTENT_PREALLOC.
    pub extent_type: u8,
    pub body: FileExtentBody,
}

impl FileExtentItem {
    pub fn inline(generation: u64, data: Vec<u8>) -> FileExtentItem {
        FileExtentItem {
            generation,
            ram_bytes: data.len() as u64,
            compression: COMPRESS_NONE,
            encryption: 0,
            other_encoding: 0,
            extent_type: FILE_EXTENT_INLINE,
            body: FileExtentBody::Inline(data),
        }
    }

    pub fn regular(generation: u64, disk_bytenr: u64, disk_num_bytes: u64) -> FileExtentItem {
        FileExtentItem {
            generation,
            ram_bytes: disk_num_bytes,
            compression: COMPRESS_NONE,
            encryption: 0,
            other_encoding: 0,
            extent_type: FILE_EXTENT_REG,
            body: FileExtentBody::Regular {
                disk_bytenr,
                disk_num_bytes,
                offset: 0,
                num_bytes: disk_num_bytes,
            },
        }
    }

    pub fn encoded_len(&self) -> usize {
        match &self.body {
            FileExtentBody::Inline(d) => FILE_EXTENT_INLINE_DATA_START + d.len(),
            FileExtentBody::Regular { .. } => FILE_EXTENT_ITEM_SIZE,
        }
    }

    pub fn read(buf: &[u8]) -> Result<FileExtentItem, DecodeError> {
        need("file extent item", buf, FILE_EXTENT_INLINE_DATA_START)?;
        let extent_type = get_u8(buf, 20);
        let body = if extent_type == FILE_EXTENT_INLINE {
            FileExtentBody::Inline(buf[FILE_EXTENT_INLINE_DATA_START..].to_vec())
        } else {
            need("regular file extent item", buf, FILE_EXTENT_ITEM_SIZE)?;
            FileExtentBody::Regular {
                disk_bytenr: get_u64(buf, 21),
                disk_num_bytes: get_u64(buf, 29),
                offset: get_u64(buf, 37),
                num_bytes: get_u64(buf, 45),
            }
        };
        Ok(FileExtentItem {
            generation: get_u64(buf, 0),
            ram_bytes: get_u64(buf, 8),
            compression: get_u8(buf, 16),
            encryption: get_u8(buf, 17),
            other_encoding: get_u16(buf, 18),
            extent_type,
            body,
        })
    }

    pub fn write(&self, buf: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(buf.len() >= len, "file extent buffer too short");
        put_u64(buf, 0, self.generation);
        put_u64(buf, 8, self.ram_bytes);
        put_u8(buf, 16, self.compression);
        put_u8(buf, 17, self.encryption);
        put_u16(buf, 18, self.other_encoding);
        put_u8(buf, 20, self.extent_type);
        match &self.body {
            FileExtentBody::Inline(d) => buf[FILE_EXTENT_INLINE_DATA_START..len].copy_from_slice(d),
            FileExtentBody::Regular { disk_bytenr, disk_num_bytes, offset, num_bytes } => {
                put_u64(buf, 21, *disk_bytenr);
                put_u64(buf, 29, *disk_num_bytes);
                put_u64(buf, 37, *offset);
                put_u64(buf, 45, *num_bytes);
            }
        }
        len
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.encoded_len()];
        self.write(&mut v);
        v
    }
}

#[cfg(test)]
pub(crate) mod testdata {
    //! Tree blocks of a real btrfs (nodesize 4096, crc32c), made with
    //! mkfs.btrfs 6.2 on a 512 MiB image, mounted on Linux 6.18 and filled
    //! with `touch hello a foo.txt; mkdir dir; echo hi > dir/x` (image 1) or
    //! with 60 empty files, a 64 KiB file `big` and 40 reflinks of it
    //! (image 2). Read back with btrfs-map-logical + dd; stored as (offset,
    //! hex) runs with the zero gaps left out.

    pub(crate) fn block(runs: &[(usize, &str)]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        for (off, hex) in runs {
            for i in 0..hex.len() / 2 {
                b[off + i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
            }
        }
        b
    }

    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap()).collect()
    }

    /// Image 1, FS tree leaf 30457856 (generation 7): 23 items.
    pub(crate) const FS_LEAF_BYTENR: u64 = 30457856;
    /// Image 1, root tree leaf 30461952: 11 items, ROOT_ITEMs of 439 B.
    pub(crate) const ROOT_LEAF_BYTENR: u64 = 30461952;
    /// Image 1, extent tree leaf 30425088: BLOCK_GROUP_ITEMs, METADATA_ITEMs.
    pub(crate) const EXTENT_LEAF_BYTENR: u64 = 30425088;
    /// Image 1, chunk tree leaf 22024192: a DEV_ITEM and 3 CHUNK_ITEMs.
    pub(crate) const CHUNK_LEAF_BYTENR: u64 = 22024192;
    /// Image 2, FS tree root node 30466048 (level 1, generation 8, 11 ptrs).
    pub(crate) const FS_NODE_BYTENR: u64 = 30466048;

    /// Image 2: the payload of (317 EXTENT_DATA 0), a regular extent of
    /// 64 KiB at disk bytenr 13631488, generation 7.
    pub(crate) const REG_FILE_EXTENT: &str = "0700000000000000000001000000000000000000010000d00000000000000001000000000000000000000000000000010000000000";
    /// Image 2: the payload of (13631488 EXTENT_ITEM 65536) after the
    /// reflinks: refs 41, gen 7, DATA, six inline EXTENT_DATA_REFs of root 5
    /// (objectids 321, 322, 317, 318, 319, 320), 198 B.
    pub(crate) const DATA_EXTENT_ITEM: &str = "290000000000000007000000000000000100000000000000b205000000000000004101000000000000000000000000000001000000b205000000000000004201000000000000000000000000000001000000b205000000000000003d01000000000000000000000000000001000000b205000000000000003e01000000000000000000000000000001000000b205000000000000003f01000000000000000000000000000001000000b205000000000000004001000000000000000000000000000001000000";
    /// Image 2: key (13631488 EXTENT_DATA_REF 1007496931448418980) and its
    /// payload (root 5, objectid 339, offset 0, count 1).
    pub(crate) const KEYED_DATA_REF_OFFSET: u64 = 1007496931448418980;
    pub(crate) const KEYED_DATA_REF: &str = "05000000000000005301000000000000000000000000000001000000";

    pub(crate) const FS_LEAF: &[(usize, &str)] = &[
        (0, "fb14279e"),
        (
            32,
            "6e5266983c2d4e66a88430faca142cd500c0d001000000000100000000000001cd45e2f57acd423198815acfdb3c155f",
        ),
        (80, "070000000000000005000000000000001700000000000100000000000001"),
        (
            118,
            "fb0e0000a000000000010000000000000c0001000000000000ef0e00000c0000000001000000000000541f4bac1c0000",
        ),
        (
            166,
            "0000ce0e0000210000000001000000000000541f2b9f5d00000000ab0e0000230000000001000000000000544bc1a98b",
        ),
        (
            214,
            "00000000860e000025000000000100000000000054cc3f44cc00000000670e00001f0000000001000000000000600200",
        ),
        (
            262,
            "000000000000440e0000230000000001000000000000600300000000000000250e00001f000000000100000000000060",
        ),
        (310, "04"),
        (319, "0e0000250000000001000000000000600500000000000000df0d000021000000010100000000000001"),
        (368, "3f0d0000a000000001010000000000000c0001000000000000300d00000f000000020100000000000001"),
        (418, "900c0000a000000002010000000000000c0001000000000000850c00000b000000030100000000000001"),
        (468, "e50b0000a000000003010000000000000c0001000000000000d40b000011000000040100000000000001"),
        (
            518,
            "340b0000a000000004010000000000000c0001000000000000270b00000d0000000401000000000000546f23a8a40000",
        ),
        (566, "0000080b00001f0000000401000000000000600200000000000000e90a00001f000000050100000000000001"),
        (618, "490a0000a000000005010000000000000c04010000000000003e0a00000b00000005010000000000006c"),
        (668, "260a000018"),
        (2699, "070000000000000003"),
        (2720, "68690a020000000000000001007807000000000000000700000000000000030000000000000003"),
        (2774, "01"),
        (2786, "a481"),
        (2806, "01"),
        (
            2846,
            "4390016b000000007293c50f4390016b000000007293c50f4390016b000000007293c50f4390016b000000007293c50f",
        ),
        (2894, "050100000000000001"),
        (2911, "07"),
        (2921, "01000178050100000000000001"),
        (2942, "07"),
        (2952, "01000178050000000000000003006469720700000000000000070000000000000002"),
        (3009, "01"),
        (3021, "ed41"),
        (3041, "01"),
        (
            3081,
            "4390016b00000000728a880f4390016b000000007293c50f4390016b000000007293c50f4390016b00000000728a880f",
        ),
        (3129, "04000000000000000700666f6f2e747874070000000000000007"),
        (3186, "01"),
        (3198, "a481"),
        (3218, "01"),
        (
            3258,
            "4390016b0000000072814b0f4390016b0000000072814b0f4390016b0000000072814b0f4390016b0000000072814b0f",
        ),
        (3306, "0300000000000000010061070000000000000007"),
        (3357, "01"),
        (3369, "a481"),
        (3389, "01"),
        (
            3429,
            "4390016b0000000072814b0f4390016b0000000072814b0f4390016b0000000072814b0f4390016b0000000072814b0f",
        ),
        (3477, "0200000000000000050068656c6c6f070000000000000007"),
        (3532, "01"),
        (3544, "a481"),
        (3564, "01"),
        (
            3604,
            "4390016b0000000072814b0f4390016b0000000072814b0f4390016b0000000072814b0f4390016b0000000072814b0f",
        ),
        (3652, "040100000000000001"),
        (3669, "07"),
        (3679, "030002646972030100000000000001"),
        (3702, "07"),
        (3712, "070001666f6f2e747874020100000000000001"),
        (3739, "07"),
        (3749, "01000161010100000000000001"),
        (3770, "07"),
        (3780, "05000168656c6c6f020100000000000001"),
        (3805, "07"),
        (3815, "01000161030100000000000001"),
        (3836, "07"),
        (3846, "070001666f6f2e747874010100000000000001"),
        (3873, "07"),
        (3883, "05000168656c6c6f040100000000000001"),
        (3908, "07"),
        (3918, "030002646972"),
        (3932, "02002e2e0300000000000000070000000000000020"),
        (3961, "10"),
        (3976, "01"),
        (3988, "ed41"),
        (4008, "04"),
        (4048, "4390016b"),
        (4060, "4390016b00000000728a880f4390016b00000000728a880f4390016b"),
    ];

    pub(crate) const ROOT_LEAF: &[(usize, &str)] = &[
        (0, "aa27d4d6"),
        (
            32,
            "6e5266983c2d4e66a88430faca142cd500d0d001000000000100000000000001cd45e2f57acd423198815acfdb3c155f",
        ),
        (80, "070000000000000001000000000000000b00000000020000000000000084"),
        (118, "e40d0000b7010000040000000000000084"),
        (143, "2d0c0000b701000005000000000000000c06000000000000001c0c000011000000050000000000000084"),
        (193, "650a0000b7010000060000000000000001"),
        (
            218,
            "c5090000a000000006000000000000000c0600000000000000b90900000c000000060000000000000054d2c2bf8d0000",
        ),
        (266, "00009409000025000000070000000000000084"),
        (293, "dd070000b7010000090000000000000084"),
        (318, "26060000b70100000a0000000000000084"),
        (343, "6f040000b7010000f7ffffffffffffff84"),
        (368, "b8020000b701"),
        (957, "05"),
        (966, "010000000000000070d001"),
        (990, "10"),
        (1013, "01"),
        (1036, "05"),
        (1236, "01"),
        (1252, "03"),
        (1261, "10"),
        (1276, "01"),
        (1288, "ed41"),
        (1396, "07"),
        (1413, "60d001"),
        (1429, "10"),
        (1452, "01"),
        (1475, "07"),
        (1835, "05"),
        (1852, "80d001"),
        (1868, "10"),
        (1891, "01"),
        (1914, "05"),
        (2114, "01"),
        (2130, "03"),
        (2139, "10"),
        (2154, "01"),
        (2166, "ed41"),
        (2274, "05"),
        (2291, "50d001"),
        (2307, "10"),
        (2330, "01"),
        (2353, "05"),
        (2553, "050000000000000084ffffffffffffffff"),
        (2580, "07000264656661756c74"),
        (2598, "02002e2e03"),
        (2627, "10"),
        (2642, "01"),
        (2654, "ed41"),
        (2714, "4390016b"),
        (2726, "4390016b"),
        (2738, "4390016b"),
        (2750, "4390016b"),
        (2762, "01"),
        (2778, "03"),
        (2787, "10"),
        (2802, "01"),
        (2814, "ed41"),
        (2829, "80"),
        (2922, "07"),
        (2931, "0100000000000000c0d001"),
        (2955, "10"),
        (2978, "01"),
        (3001, "0700000000000000aaa25aaf03fc44e285aa9fa009731fa2"),
        (3057, "07"),
        (3089, "4390016b000000008dab4d104390016b"),
        (3209, "070064656661756c7401"),
        (3234, "03"),
        (3243, "10"),
        (3258, "01"),
        (3270, "ed41"),
        (3378, "07"),
        (3395, "e0d001"),
        (3411, "10"),
        (3434, "01"),
        (3457, "07"),
        (3657, "01"),
        (3673, "03"),
        (3682, "10"),
        (3697, "01"),
        (3709, "ed41"),
        (3817, "07"),
        (3834, "40d001"),
        (3850, "10"),
        (3873, "01"),
        (3896, "07"),
    ];

    pub(crate) const EXTENT_LEAF: &[(usize, &str)] = &[
        (0, "0c276059"),
        (
            32,
            "6e5266983c2d4e66a88430faca142cd50040d001000000000100000000000001cd45e2f57acd423198815acfdb3c155f",
        ),
        (
            80,
            "070000000000000002000000000000000c000000000000d00000000000c00000800000000000830f0000180000000000",
        ),
        (128, "500100000000c000008000000000006b0f0000180000000010500100000000a9"),
        (168, "4a0f0000210000000000d00100000000c00000000200000000320f0000180000000040d00100000000a9"),
        (218, "110f0000210000000050d00100000000a9"),
        (243, "f00e0000210000000060d00100000000a9"),
        (268, "cf0e0000210000000070d00100000000a9"),
        (293, "ae0e0000210000000080d00100000000a9"),
        (318, "8d0e00002100000000c0d00100000000a9"),
        (343, "6c0e00002100000000d0d00100000000a9"),
        (368, "4b0e00002100000000e0d00100000000a9"),
        (393, "2a0e000021"),
        (
            3727,
            "010000000000000007000000000000000200000000000000b00400000000000000010000000000000007000000000000",
        ),
        (
            3775,
            "000200000000000000b00100000000000000010000000000000007000000000000000200000000000000b00500000000",
        ),
        (
            3823,
            "000000010000000000000005000000000000000200000000000000b00900000000000000010000000000000005000000",
        ),
        (
            3871,
            "000000000200000000000000b0f7ffffffffffffff010000000000000007000000000000000200000000000000b00a00",
        ),
        (
            3919,
            "000000000000010000000000000005000000000000000200000000000000b00700000000000000010000000000000007",
        ),
        (3967, "000000000000000200000000000000b002"),
        (
            3992,
            "8000000000000000010000000000002400000000000000010000000000000006000000000000000200000000000000b0",
        ),
        (4040, "03"),
        (4049, "10000000000000000100000000000022"),
        (4081, "0100000000000001"),
    ];

    pub(crate) const CHUNK_LEAF: &[(usize, &str)] = &[
        (0, "ed165bbe"),
        (
            32,
            "6e5266983c2d4e66a88430faca142cd500105001000000000100000000000001cd45e2f57acd423198815acfdb3c155f",
        ),
        (
            80,
            "0600000000000000030000000000000004000000000100000000000000d80100000000000000390f0000620000000001",
        ),
        (
            128,
            "000000000000e40000d00000000000e90e0000500000000001000000000000e40000500100000000790e000070000000",
        ),
        (
            176,
            "0001000000000000e40000d00100000000090e0000700000000001000000000000e40000d00100000000090e00007000",
        ),
        (224, "00000001000000000000e40000d00100000000b90d000070"),
        (3537, "020000000002"),
        (3552, "01000000000024"),
        (3568, "010000000100001000000200010001"),
        (3592, "50020000000080d11966ced844f4888bcb84283c40d1000000020000000002"),
        (3632, "01000000000024"),
        (3648, "010000000100001000000200010001"),
        (3672, "50020000000080d11966ced844f4888bcb84283c40d1000000020000000002"),
        (3712, "01000000000024"),
        (3728, "010000000100001000000200010001"),
        (3752, "50020000000080d11966ced844f4888bcb84283c40d101"),
        (3784, "50040000000080d11966ced844f4888bcb84283c40d1000080000000000002"),
        (3824, "01000000000022"),
        (3840, "010000000100001000000200010001"),
        (3864, "50010000000080d11966ced844f4888bcb84283c40d101"),
        (3896, "d0010000000080d11966ced844f4888bcb84283c40d1000080000000000002"),
        (3936, "01000000000001"),
        (3952, "010000000100001000000100010001"),
        (3976, "d0000000000080d11966ced844f4888bcb84283c40d101"),
        (4009, "2000000000000080050000000000100000001000000010"),
        (4064, "80d11966ced844f4888bcb84283c40d16e5266983c2d4e66a88430faca142cd5"),
    ];

    pub(crate) const FS_NODE: &[(usize, &str)] = &[
        (0, "0917f56e"),
        (
            32,
            "2f7da0f54ccb42fdb1b86b116868791100e0d0010000000001000000000000011056f640fbbd4741b7bebe9fe620abdc",
        ),
        (80, "080000000000000005000000000000000b00000001000100000000000001"),
        (119, "d0d1010000000008"),
        (135, "01000000000000548775cb7c000000000050d0010000000008"),
        (168, "010000000000006003"),
        (185, "b0d1010000000008"),
        (201, "01000000000000603f"),
        (
            218,
            "c0d10100000000080000000000000001010000000000000c000100000000000000a0d001000000000800000000000000",
        ),
        (266, "130100000000000001"),
        (284, "70d101000000000700000000000000240100000000000001"),
        (317, "20d001000000000800000000000000350100000000000001"),
        (350, "e0d101000000000800000000000000440100000000000001"),
        (383, "f0d101000000000800000000000000510100000000000001"),
        (417, "d2010000000008000000000000005e0100000000000001"),
        (449, "10d2010000000008"),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_node_geometry() {
        assert_eq!(HEADER_SIZE, 32 + 16 + 8 + 8 + 16 + 8 + 8 + 4 + 1);
        assert_eq!(KEY_PTR_SIZE, DISK_KEY_SIZE + 8 + 8);
        assert_eq!(ITEM_SIZE, DISK_KEY_SIZE + 4 + 4);
        assert_eq!(nodeptrs_per_block(16384), 493);
        assert_eq!(leaf_data_size(16384), 16283);
        assert_eq!(nodeptrs_per_block(4096), 121);
        assert_eq!(nodeptrs_per_block(65536), 1982);
        assert_eq!(max_item_size(16384), 16258);
        assert_eq!(max_xattr_size(16384), 16228);
    }

    #[test]
    fn nodesize_validity() {
        for n in [4096, 8192, 16384, 32768, 65536] {
            assert!(check_nodesize(n), "{n}");
        }
        for n in [0, 512, 2048, 4095, 12288, 16385, 131072] {
            assert!(!check_nodesize(n), "{n}");
        }
    }

    #[test]
    fn payload_sizes() {
        // sizeof() of the uapi structures, printed by a C program that
        // includes <linux/btrfs_tree.h>.
        assert_eq!(InodeItem::SIZE, 160);
        assert_eq!(InodeItem::default().to_bytes().len(), 160);
        assert_eq!(RootItem::SIZE, 439);
        assert_eq!(RootItem::default().to_bytes().len(), 439);
        assert_eq!(BlockGroupItem::default().to_bytes().len(), 24);
        assert_eq!(ExtentDataRef::default().to_bytes().len(), 28);
        assert_eq!(TreeBlockInfo::default().to_bytes().len(), 18);
        assert_eq!(ExtentItem::tree_block(7, 5).to_bytes().len(), 33);
        assert_eq!(METADATA_ITEM_ONE_REF_SIZE, 33);
        assert_eq!(ExtentItem::data(7, 5, 257, 0).to_bytes().len(), 53);
        assert_eq!(DATA_EXTENT_ITEM_ONE_REF_SIZE, 53);
        assert_eq!(FileExtentItem::regular(7, 1 << 20, 4096).to_bytes().len(), 53);
        assert_eq!(FileExtentItem::inline(7, b"hi\n".to_vec()).to_bytes().len(), 24);
        let ir = InodeRef { index: 2, name: b"hello".to_vec() };
        assert_eq!(ir.to_bytes().len(), 15);
        let di = DirItem {
            location: Key::new(257, INODE_ITEM_KEY, 0),
            transid: 7,
            dir_type: FT_REG_FILE,
            name: b"hello".to_vec(),
            data: vec![],
        };
        assert_eq!(di.to_bytes().len(), 35);
        assert_eq!(extent_inline_ref_size(SHARED_DATA_REF_KEY), Some(13));
        assert_eq!(extent_inline_ref_size(EXTENT_DATA_REF_KEY), Some(29));
        assert_eq!(extent_inline_ref_size(TREE_BLOCK_REF_KEY), Some(9));
        assert_eq!(extent_inline_ref_size(177), None);
        assert_eq!(chunk_item_size(1), 80);
        assert_eq!(chunk_item_size(2), 112);
    }

    #[test]
    fn key_order_and_bytes() {
        let a = Key::new(256, INODE_ITEM_KEY, 0);
        let b = Key::new(256, INODE_REF_KEY, 0);
        let c = Key::new(256, INODE_REF_KEY, 1);
        let d = Key::new(257, 0, 0);
        assert!(a < b && b < c && c < d);
        assert!(Key::new(1, 255, u64::MAX) < Key::new(2, 0, 0));
        let k = Key::new(0x0102030405060708, 0x84, 0x1112131415161718);
        let bytes = k.to_bytes();
        assert_eq!(bytes, [8, 7, 6, 5, 4, 3, 2, 1, 0x84, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
        assert_eq!(Key::from_bytes(&bytes), k);
        assert_eq!(k.to_string(), format!("({} 132 {})", k.objectid, k.offset));
    }

    #[test]
    fn well_known_ids() {
        assert_eq!(TREE_RELOC_OBJECTID, 0xffff_ffff_ffff_fff8);
        assert_eq!(DATA_RELOC_TREE_OBJECTID, 0xffff_ffff_ffff_fff7);
        assert_eq!(EXTENT_CSUM_OBJECTID, 0xffff_ffff_ffff_fff6);
        assert_eq!(LAST_FREE_OBJECTID, 0xffff_ffff_ffff_ff00);
        assert!(is_fstree(FS_TREE_OBJECTID));
        assert!(is_fstree(256));
        assert!(is_fstree(LAST_FREE_OBJECTID >> 16));
        assert!(!is_fstree(ROOT_TREE_OBJECTID));
        assert!(!is_fstree(CSUM_TREE_OBJECTID));
        assert!(!is_fstree(DATA_RELOC_TREE_OBJECTID));
        assert!(!is_fstree(TREE_RELOC_OBJECTID));
        assert!(!is_fstree(1 << 48));
    }

    /// DIR_ITEM offsets read from `btrfs inspect-internal dump-tree` of a
    /// real filesystem (Linux 6.18) after creating these names.
    #[test]
    fn name_hash_matches_real_btrfs() {
        let real: &[(&[u8], u64)] = &[
            (b"dir", 481053471),
            (b"hello", 1570712351),
            (b"foo.txt", 2343158091),
            (b"a", 3427024844),
            (b"x", 2762482543),
        ];
        for (name, hash) in real {
            assert_eq!(name_hash(name), *hash, "{}", String::from_utf8_lossy(name));
        }
    }

    /// Keyed EXTENT_DATA_REF offsets from a real extent tree: a 64 KiB
    /// extent with 41 reflinks in tree 5, file offset 0.
    #[test]
    fn extent_data_ref_hash_matches_real_btrfs() {
        assert_eq!(hash_extent_data_ref(5, 339, 0), 1007496931448418980);
        assert_eq!(hash_extent_data_ref(5, 323, 0), 1007496931617888795);
        assert_eq!(hash_extent_data_ref(5, 336, 0), 1007496931674362455);
        assert_eq!(hash_extent_data_ref(5, 357, 0), 1007496931777038979);
    }

    #[test]
    fn csum_matches_real_tree_block() {
        let b = testdata::block(testdata::FS_LEAF);
        let stored = get_u32(&b, 0);
        assert_eq!(csum_tree_block(&b), stored);
        assert_eq!(stored, 0x9e2714fb);
        assert!(b[4..32].iter().all(|&x| x == 0));
    }

    #[test]
    fn real_file_extent_items() {
        let reg = testdata::hex(testdata::REG_FILE_EXTENT);
        let fe = FileExtentItem::read(&reg).unwrap();
        assert_eq!(fe.generation, 7);
        assert_eq!(fe.extent_type, FILE_EXTENT_REG);
        assert_eq!(fe.ram_bytes, 65536);
        assert_eq!(
            fe.body,
            FileExtentBody::Regular {
                disk_bytenr: 13631488,
                disk_num_bytes: 65536,
                offset: 0,
                num_bytes: 65536
            }
        );
        assert_eq!(fe, FileExtentItem::regular(7, 13631488, 65536));
        assert_eq!(fe.to_bytes(), reg);
    }

    #[test]
    fn real_extent_items() {
        let raw = testdata::hex(testdata::DATA_EXTENT_ITEM);
        let ei = ExtentItem::read(&raw, EXTENT_ITEM_KEY).unwrap();
        assert_eq!(ei.refs, 41);
        assert_eq!(ei.generation, 7);
        assert_eq!(ei.flags, EXTENT_FLAG_DATA);
        let objectids: Vec<u64> = ei
            .inline_refs
            .iter()
            .map(|r| match r {
                InlineRef::ExtentData(d) => {
                    assert_eq!((d.root, d.offset, d.count), (5, 0, 1));
                    d.objectid
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(objectids, [321, 322, 317, 318, 319, 320]);
        assert_eq!(ei.encoded_len(), 198);
        assert_eq!(ei.to_bytes(), raw);

        let raw = testdata::hex(testdata::KEYED_DATA_REF);
        let r = ExtentDataRef::read(&raw);
        assert_eq!(r, ExtentDataRef { root: 5, objectid: 339, offset: 0, count: 1 });
        assert_eq!(r.hash(), testdata::KEYED_DATA_REF_OFFSET);
        assert_eq!(r.to_bytes(), raw);
    }

    #[test]
    fn inode_item_round_trip() {
        let it = InodeItem {
            generation: 3,
            transid: 7,
            size: 32,
            nbytes: 4096,
            block_group: 0,
            nlink: 1,
            uid: 1000,
            gid: 100,
            mode: 0o40755,
            rdev: 0,
            flags: INODE_NODATACOW,
            sequence: 4,
            atime: Timespec::from_ns(1_795_264_579_000_000_000),
            ctime: Timespec::from_ns(1_795_264_579_260_606_578),
            mtime: Timespec { sec: 1, nsec: 999_999_999 },
            otime: Timespec { sec: 5, nsec: 6 },
        };
        let b = it.to_bytes();
        assert_eq!(get_u32(&b, 52), 0o40755);
        assert_eq!(get_u64(&b, 124), 1_795_264_579);
        assert_eq!(get_u32(&b, 132), 260_606_578);
        assert_eq!(InodeItem::read(&b), it);
    }

    #[test]
    fn root_item_round_trip() {
        let mut ri = RootItem {
            generation: 9,
            root_dirid: 256,
            bytenr: 30457856,
            bytes_used: 16384,
            last_snapshot: 3,
            refs: 1,
            level: 2,
            drop_level: 1,
            drop_progress: Key::new(300, 1, 0),
            generation_v2: 9,
            uuid: [7; 16],
            ctransid: 9,
            otransid: 1,
            rtime: Timespec { sec: 9, nsec: 9 },
            flags: ROOT_SUBVOL_RDONLY,
            ..Default::default()
        };
        ri.inode.mode = 0o40755;
        ri.inode.flags = INODE_ROOT_ITEM_INIT;
        let b = ri.to_bytes();
        assert_eq!(get_u64(&b, 176), 30457856);
        assert_eq!(b[238], 2);
        assert_eq!(RootItem::read(&b), ri);
        // A legacy root item keeps the old fields and zeroes the new ones.
        let legacy = RootItem::read_any(&b[..LEGACY_ROOT_ITEM_SIZE]).unwrap();
        assert_eq!(legacy.bytenr, ri.bytenr);
        assert_eq!(legacy.level, 2);
        assert_eq!(legacy.generation_v2, 0);
        assert_eq!(legacy.uuid, [0; 16]);
        assert!(RootItem::read_any(&b[..100]).is_err());
    }

    #[test]
    fn dir_items_with_collisions_iterate() {
        let a = DirItem {
            location: Key::new(257, INODE_ITEM_KEY, 0),
            transid: 7,
            dir_type: FT_REG_FILE,
            name: b"first".to_vec(),
            data: vec![],
        };
        let b = DirItem {
            location: Key::new(5, ROOT_ITEM_KEY, u64::MAX),
            transid: 8,
            dir_type: FT_DIR,
            name: b"subvol".to_vec(),
            data: vec![],
        };
        let x = DirItem {
            location: Key::default(),
            transid: 9,
            dir_type: FT_XATTR,
            name: b"user.k".to_vec(),
            data: b"value".to_vec(),
        };
        let mut payload = a.to_bytes();
        payload.extend(b.to_bytes());
        payload.extend(x.to_bytes());
        let got: Vec<DirItem> = dir_items(&payload).map(|r| r.unwrap()).collect();
        assert_eq!(got, vec![a.clone(), b, x]);
        // A truncated tail is reported once.
        let cut = &payload[..payload.len() - 1];
        let res: Vec<_> = dir_items(cut).collect();
        assert_eq!(res.len(), 3);
        assert!(res[2].is_err());
        assert_eq!(dir_items(&[]).count(), 0);
        let (one, len) = DirItem::read(&a.to_bytes()).unwrap();
        assert_eq!((one, len), (a, 35));
    }

    #[test]
    fn inode_refs_iterate() {
        let r1 = InodeRef { index: 2, name: b"one".to_vec() };
        let r2 = InodeRef { index: 9, name: b"two-links".to_vec() };
        let mut p = r1.to_bytes();
        p.extend(r2.to_bytes());
        let got: Vec<InodeRef> = inode_refs(&p).map(|r| r.unwrap()).collect();
        assert_eq!(got, vec![r1, r2]);
        assert!(inode_refs(&p[..5]).next().unwrap().is_err());
    }

    #[test]
    fn extent_item_variants_round_trip() {
        let items = [
            (ExtentItem::tree_block(7, 5), METADATA_ITEM_KEY),
            (ExtentItem::data(7, 5, 257, 4096), EXTENT_ITEM_KEY),
            (
                ExtentItem {
                    refs: 3,
                    generation: 2,
                    flags: EXTENT_FLAG_TREE_BLOCK | BLOCK_FLAG_FULL_BACKREF,
                    tree_block_info: Some(TreeBlockInfo { key: Key::new(256, 1, 0), level: 1 }),
                    inline_refs: vec![
                        InlineRef::TreeBlock { root: 5 },
                        InlineRef::SharedBlock { parent: 1 << 30 },
                    ],
                },
                EXTENT_ITEM_KEY,
            ),
            (
                ExtentItem {
                    refs: 4,
                    generation: 2,
                    flags: EXTENT_FLAG_DATA,
                    tree_block_info: None,
                    inline_refs: vec![InlineRef::SharedData { parent: 1 << 30, count: 4 }],
                },
                EXTENT_ITEM_KEY,
            ),
        ];
        for (it, kt) in items {
            let b = it.to_bytes();
            assert_eq!(b.len(), it.encoded_len());
            assert_eq!(ExtentItem::read(&b, kt).unwrap(), it);
        }
        // An unknown inline ref type is a decode error, not a panic.
        let mut b = ExtentItem::tree_block(1, 5).to_bytes();
        b[24] = 177;
        assert!(ExtentItem::read(&b, METADATA_ITEM_KEY).is_err());
    }

    #[test]
    fn block_group_and_file_extent_round_trip() {
        let bg = BlockGroupItem {
            used: 32768,
            chunk_objectid: FIRST_CHUNK_TREE_OBJECTID,
            flags: BLOCK_GROUP_METADATA | BLOCK_GROUP_DUP,
        };
        assert_eq!(BlockGroupItem::read(&bg.to_bytes()), bg);
        let fe = FileExtentItem::inline(7, b"hi\n".to_vec());
        let b = fe.to_bytes();
        assert_eq!(b[20], FILE_EXTENT_INLINE);
        assert_eq!(FileExtentItem::read(&b).unwrap(), fe);
        assert!(FileExtentItem::read(&b[..20]).is_err());
        let mut pre = FileExtentItem::regular(3, 1 << 20, 8192);
        pre.extent_type = FILE_EXTENT_PREALLOC;
        assert_eq!(FileExtentItem::read(&pre.to_bytes()).unwrap(), pre);
    }
}
