//! The super block, mkfs and mount, after fs/btrfs/disk-io.c
//! (`btrfs_read_dev_one_super`, `btrfs_validate_super`, `open_ctree`,
//! `backup_super_roots`, `write_all_supers` with `barrier_all_devices`,
//! `write_dev_supers` and `wait_dev_supers`) and btrfs-progs
//! mkfs/common.c (`make_btrfs`).
//!
//! The super block is the real 4096-byte `struct btrfs_super_block`
//! (checked field by field against one written by mkfs.btrfs 6.2, see the
//! tests), crc32c over bytes 32..4096. Copies live at 64 KiB (primary),
//! 64 MiB and 256 GiB ([`sb_offset`]), each written only when the device
//! extends past it.
//!
//! Writing ([`write_all_supers`]) is the kernel's sequence: a FLUSH of the
//! device, waited for (`barrier_all_devices`), so that every tree block
//! written before is durable; then every copy, the primary with FUA and
//! the mirrors without (`write_dev_supers`); then the wait. A failed flush
//! or a failed primary is EIO (one device tolerates no error), and so is
//! the failure of every copy; a failed mirror alone is not.
//!
//! Departures from the kernel, each for a reason:
//! - [`read_super`] falls back to the mirrors when the primary copy is
//!   missing, unreadable or corrupt, taking the valid mirror of the highest
//!   generation (what btrfs-progs does to recover). The kernel's mount
//!   reads the primary alone and fails; the harness wants to see whether a
//!   torn primary write leaves a mountable device. A valid primary is
//!   always used, even when a mirror is newer, as in the kernel;
//! - the environment does not say how big the device is, so the mirror at
//!   64 MiB is read whenever the primary is bad (a device smaller than that
//!   fails the read, which counts as a missing copy), and the one at
//!   256 GiB only when a valid copy says the device holds it;
//! - mount supports what mkfs makes: one device, the single profile with
//!   identity chunk mapping, crc32c, no log tree to replay, block group
//!   items in the extent tree; anything else is EINVAL;
//! - mkfs writes kernel-sized chunks (see [`crate::volumes`]) where
//!   btrfs-progs starts with small temporary ones, puts every block of a
//!   tree type in its own chunk from the start, and makes no free space or
//!   uuid tree (the kernel creates both at its first read-write mount);
//!   uuids are derived from the geometry, since the engine draws no random
//!   number;
//! - mount rebuilds free space from the extent tree (no free space tree or
//!   cache), and reports a `block_group_used_mismatch` violation when a
//!   block group item's `used` differs from the extents recorded in it.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::accessors::{
    NewBlockHeader, header_chunk_tree_uuid, init_tree_block, insert_item_in_leaf, item_data, item_key,
    leaf_free_space, node_blockptr, node_key, node_ptr_generation, set_header_flag, write_header_csum,
};
use crate::block_group::{BlockGroup, BlockGroupCache};
use crate::ctree::Root;
use crate::env::{Bio, BioStatus, Env, TraceEvent, Violation, WaitOn};
use crate::error::Error;
use crate::extent_io::read_tree_block_verified;
use crate::fix::FixPolicy;
use crate::format::{
    BLOCK_GROUP_DATA, BLOCK_GROUP_ITEM_KEY, BLOCK_GROUP_METADATA, BLOCK_GROUP_PROFILE_MASK,
    BLOCK_GROUP_SYSTEM, BLOCK_GROUP_TYPE_MASK, BlockGroupItem, CHUNK_ITEM_KEY, CHUNK_ITEM_SIZE,
    CHUNK_TREE_OBJECTID, CSUM_SIZE, CSUM_TREE_OBJECTID, DATA_RELOC_TREE_OBJECTID, DEV_EXTENT_KEY,
    DEV_ITEM_KEY, DEV_TREE_OBJECTID, DISK_KEY_SIZE, DirItem, EXTENT_ITEM_KEY, EXTENT_TREE_OBJECTID,
    ExtentItem, FIRST_CHUNK_TREE_OBJECTID, FIRST_FREE_OBJECTID, FS_TREE_OBJECTID, FSID_SIZE, FT_DIR,
    FixedItem, HEADER_FLAG_WRITTEN, INODE_ITEM_KEY, INODE_REF_KEY, InodeItem, InodeRef, Key,
    LAST_FREE_OBJECTID, MAX_LEVEL, METADATA_ITEM_KEY, ROOT_ITEM_KEY, ROOT_TREE_DIR_OBJECTID,
    ROOT_TREE_OBJECTID, RootItem, SECTORSIZE, TREE_LOG_OBJECTID, TREE_RELOC_OBJECTID, Timespec, UUID_SIZE,
    check_nodesize, csum_data, csum_tree_block, get_array, get_u8, get_u16, get_u32, get_u64, is_fstree,
    name_hash, put_u8, put_u16, put_u32, put_u64,
};
use crate::fs::FsInfo;
use crate::tree_checker::check_tree_block;
use crate::volumes::{
    ChunkItem, ChunkMap, DEVID, DevExtent, DevItem, Volumes, exclude_super_stripes, read_sys_array,
    super_stripes,
};
use crate::wait::Completion;

// ---------------------------------------------------------------------------
// Constants (disk-io.h, uapi btrfs_tree.h).

/// `BTRFS_SUPER_INFO_OFFSET`: the primary copy.
pub const SUPER_INFO_OFFSET: u64 = crate::format::SUPER_INFO_OFFSET;
pub const SUPER_INFO_SIZE: usize = crate::format::SUPER_INFO_SIZE;
/// `BTRFS_SUPER_MIRROR_MAX`: the primary and two mirrors.
pub const SUPER_MIRROR_MAX: usize = 3;
/// `BTRFS_SUPER_MIRROR_SHIFT`.
pub const SUPER_MIRROR_SHIFT: u32 = 12;
/// `BTRFS_MAGIC`: "_BHRfS_M" little-endian.
pub const MAGIC: u64 = 0x4D5F_5366_5248_425F;
pub const SYSTEM_CHUNK_ARRAY_SIZE: usize = 2048;
pub const LABEL_SIZE: usize = 256;
pub const NUM_BACKUP_ROOTS: usize = 4;
/// `struct btrfs_root_backup`.
pub const ROOT_BACKUP_SIZE: usize = 168;
/// `BTRFS_CSUM_TYPE_CRC32`.
pub const CSUM_TYPE_CRC32: u16 = 0;

/// Incompat feature bits (`BTRFS_FEATURE_INCOMPAT_*`).
pub const FEATURE_INCOMPAT_MIXED_BACKREF: u64 = 1 << 0;
pub const FEATURE_INCOMPAT_DEFAULT_SUBVOL: u64 = 1 << 1;
pub const FEATURE_INCOMPAT_MIXED_GROUPS: u64 = 1 << 2;
pub const FEATURE_INCOMPAT_COMPRESS_LZO: u64 = 1 << 3;
pub const FEATURE_INCOMPAT_COMPRESS_ZSTD: u64 = 1 << 4;
pub const FEATURE_INCOMPAT_BIG_METADATA: u64 = 1 << 5;
pub const FEATURE_INCOMPAT_EXTENDED_IREF: u64 = 1 << 6;
pub const FEATURE_INCOMPAT_RAID56: u64 = 1 << 7;
pub const FEATURE_INCOMPAT_SKINNY_METADATA: u64 = 1 << 8;
pub const FEATURE_INCOMPAT_NO_HOLES: u64 = 1 << 9;
pub const FEATURE_INCOMPAT_METADATA_UUID: u64 = 1 << 10;
pub const FEATURE_INCOMPAT_RAID1C34: u64 = 1 << 11;
pub const FEATURE_INCOMPAT_ZONED: u64 = 1 << 12;
pub const FEATURE_INCOMPAT_EXTENT_TREE_V2: u64 = 1 << 13;
pub const FEATURE_INCOMPAT_RAID_STRIPE_TREE: u64 = 1 << 14;
pub const FEATURE_INCOMPAT_SIMPLE_QUOTA: u64 = 1 << 16;
/// Compat-ro feature bits (`BTRFS_FEATURE_COMPAT_RO_*`).
pub const FEATURE_COMPAT_RO_FREE_SPACE_TREE: u64 = 1 << 0;
pub const FEATURE_COMPAT_RO_FREE_SPACE_TREE_VALID: u64 = 1 << 1;
pub const FEATURE_COMPAT_RO_VERITY: u64 = 1 << 2;
pub const FEATURE_COMPAT_RO_BLOCK_GROUP_TREE: u64 = 1 << 3;

/// What mkfs.btrfs 6.2 sets by default, less the free space tree.
pub const MKFS_INCOMPAT_FLAGS: u64 = FEATURE_INCOMPAT_MIXED_BACKREF
    | FEATURE_INCOMPAT_EXTENDED_IREF
    | FEATURE_INCOMPAT_SKINNY_METADATA
    | FEATURE_INCOMPAT_NO_HOLES;
/// Incompat features whose on-disk layout the engine does not read.
const UNSUPPORTED_INCOMPAT: u64 = FEATURE_INCOMPAT_MIXED_GROUPS
    | FEATURE_INCOMPAT_RAID56
    | FEATURE_INCOMPAT_ZONED
    | FEATURE_INCOMPAT_EXTENT_TREE_V2
    | FEATURE_INCOMPAT_RAID_STRIPE_TREE
    | FEATURE_INCOMPAT_SIMPLE_QUOTA
    | !((1 << 17) - 1);

/// Where super block copy `mirror` lives (`btrfs_sb_offset`): 64 KiB,
/// 64 MiB, 256 GiB.
pub const fn sb_offset(mirror: usize) -> u64 {
    if mirror == 0 { SUPER_INFO_OFFSET } else { (16 * 1024) << (SUPER_MIRROR_SHIFT as usize * mirror) }
}

/// Whether a device of `total_bytes` holds copy `mirror`
/// (`write_dev_supers` stops at the first that does not fit).
pub const fn sb_copy_fits(mirror: usize, total_bytes: u64) -> bool {
    (sb_offset(mirror) + SUPER_INFO_SIZE as u64) < total_bytes
}

// Field offsets of `struct btrfs_super_block`.
const SB_CSUM: usize = 0;
const SB_FSID: usize = 32;
const SB_BYTENR: usize = 48;
const SB_FLAGS: usize = 56;
const SB_MAGIC: usize = 64;
const SB_GENERATION: usize = 72;
const SB_ROOT: usize = 80;
const SB_CHUNK_ROOT: usize = 88;
const SB_LOG_ROOT: usize = 96;
const SB_LOG_ROOT_TRANSID: usize = 104;
const SB_TOTAL_BYTES: usize = 112;
const SB_BYTES_USED: usize = 120;
const SB_ROOT_DIR_OBJECTID: usize = 128;
const SB_NUM_DEVICES: usize = 136;
const SB_SECTORSIZE: usize = 144;
const SB_NODESIZE: usize = 148;
const SB_LEAFSIZE: usize = 152;
const SB_STRIPESIZE: usize = 156;
const SB_SYS_CHUNK_ARRAY_SIZE: usize = 160;
const SB_CHUNK_ROOT_GENERATION: usize = 164;
const SB_COMPAT_FLAGS: usize = 172;
const SB_COMPAT_RO_FLAGS: usize = 180;
const SB_INCOMPAT_FLAGS: usize = 188;
const SB_CSUM_TYPE: usize = 196;
const SB_ROOT_LEVEL: usize = 198;
const SB_CHUNK_ROOT_LEVEL: usize = 199;
const SB_LOG_ROOT_LEVEL: usize = 200;
const SB_DEV_ITEM: usize = 201;
const SB_LABEL: usize = 299;
const SB_CACHE_GENERATION: usize = 555;
const SB_UUID_TREE_GENERATION: usize = 563;
const SB_METADATA_UUID: usize = 571;
const SB_NR_GLOBAL_ROOTS: usize = 587;
const SB_REMAP_ROOT: usize = 595;
const SB_REMAP_ROOT_GENERATION: usize = 603;
const SB_REMAP_ROOT_LEVEL: usize = 611;
/// `reserved[199]` (formerly `__le64 reserved[27]` from 595) ends here.
const SB_SYS_CHUNK_ARRAY: usize = 811;
const SB_SUPER_ROOTS: usize = 2859;
/// `padding[565]`.
const SB_PADDING: usize = 3531;

const _: () = assert!(SB_DEV_ITEM + crate::format::DEV_ITEM_SIZE == SB_LABEL);
const _: () = assert!(SB_LABEL + LABEL_SIZE == SB_CACHE_GENERATION);
const _: () = assert!(SB_REMAP_ROOT + 27 * 8 == SB_SYS_CHUNK_ARRAY);
const _: () = assert!(SB_SYS_CHUNK_ARRAY + SYSTEM_CHUNK_ARRAY_SIZE == SB_SUPER_ROOTS);
const _: () = assert!(SB_SUPER_ROOTS + NUM_BACKUP_ROOTS * ROOT_BACKUP_SIZE == SB_PADDING);
const _: () = assert!(SB_PADDING + 565 == SUPER_INFO_SIZE);

// ---------------------------------------------------------------------------
// The super block.

/// `struct btrfs_root_backup`, 168 bytes: the roots of one recent commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RootBackup {
    pub tree_root: u64,
    pub tree_root_gen: u64,
    pub chunk_root: u64,
    pub chunk_root_gen: u64,
    pub extent_root: u64,
    pub extent_root_gen: u64,
    pub fs_root: u64,
    pub fs_root_gen: u64,
    pub dev_root: u64,
    pub dev_root_gen: u64,
    pub csum_root: u64,
    pub csum_root_gen: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub num_devices: u64,
    pub tree_root_level: u8,
    pub chunk_root_level: u8,
    pub extent_root_level: u8,
    pub fs_root_level: u8,
    pub dev_root_level: u8,
    pub csum_root_level: u8,
}

impl FixedItem for RootBackup {
    const SIZE: usize = ROOT_BACKUP_SIZE;
    fn read(buf: &[u8]) -> Self {
        let u = |i: usize| get_u64(buf, 8 * i);
        RootBackup {
            tree_root: u(0),
            tree_root_gen: u(1),
            chunk_root: u(2),
            chunk_root_gen: u(3),
            extent_root: u(4),
            extent_root_gen: u(5),
            fs_root: u(6),
            fs_root_gen: u(7),
            dev_root: u(8),
            dev_root_gen: u(9),
            csum_root: u(10),
            csum_root_gen: u(11),
            total_bytes: u(12),
            bytes_used: u(13),
            num_devices: u(14),
            // unused_64[4] at 120..152
            tree_root_level: get_u8(buf, 152),
            chunk_root_level: get_u8(buf, 153),
            extent_root_level: get_u8(buf, 154),
            fs_root_level: get_u8(buf, 155),
            dev_root_level: get_u8(buf, 156),
            csum_root_level: get_u8(buf, 157),
            // unused_8[10] at 158..168
        }
    }
    fn write(&self, buf: &mut [u8]) {
        buf[..ROOT_BACKUP_SIZE].fill(0);
        let fields = [
            self.tree_root,
            self.tree_root_gen,
            self.chunk_root,
            self.chunk_root_gen,
            self.extent_root,
            self.extent_root_gen,
            self.fs_root,
            self.fs_root_gen,
            self.dev_root,
            self.dev_root_gen,
            self.csum_root,
            self.csum_root_gen,
            self.total_bytes,
            self.bytes_used,
            self.num_devices,
        ];
        for (i, v) in fields.into_iter().enumerate() {
            put_u64(buf, 8 * i, v);
        }
        let levels = [
            self.tree_root_level,
            self.chunk_root_level,
            self.extent_root_level,
            self.fs_root_level,
            self.dev_root_level,
            self.csum_root_level,
        ];
        buf[152..158].copy_from_slice(&levels);
    }
}

/// `struct btrfs_super_block`, 4096 bytes. [`SuperBlock::encode`] writes
/// every field at its kernel offset (reserved bytes and padding zero) and
/// the crc32c checksum; [`SuperBlock::decode`] reads them back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SuperBlock {
    /// The checksum as read (first 4 bytes used); recomputed by `encode`.
    pub csum: [u8; CSUM_SIZE],
    pub fsid: [u8; FSID_SIZE],
    /// The offset of this copy.
    pub bytenr: u64,
    /// `BTRFS_SUPER_FLAG_*`; bit 0 is HEADER_FLAG_WRITTEN, set on every write.
    pub flags: u64,
    pub magic: u64,
    /// The transaction this super block commits.
    pub generation: u64,
    /// Root tree root block and level.
    pub root: u64,
    pub chunk_root: u64,
    pub log_root: u64,
    /// `__unused_log_root_transid`: always 0.
    pub log_root_transid: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    /// Always ROOT_TREE_DIR_OBJECTID (6).
    pub root_dir_objectid: u64,
    pub num_devices: u64,
    pub sectorsize: u32,
    pub nodesize: u32,
    /// `__unused_leafsize`: equal to nodesize.
    pub leafsize: u32,
    pub stripesize: u32,
    pub sys_chunk_array_size: u32,
    pub chunk_root_generation: u64,
    pub compat_flags: u64,
    pub compat_ro_flags: u64,
    pub incompat_flags: u64,
    pub csum_type: u16,
    pub root_level: u8,
    pub chunk_root_level: u8,
    pub log_root_level: u8,
    pub dev_item: DevItem,
    pub label: [u8; LABEL_SIZE],
    pub cache_generation: u64,
    pub uuid_tree_generation: u64,
    /// The fsid in tree block headers when FEATURE_INCOMPAT_METADATA_UUID
    /// is set; zero otherwise.
    pub metadata_uuid: [u8; FSID_SIZE],
    pub nr_global_roots: u64,
    pub remap_root: u64,
    pub remap_root_generation: u64,
    pub remap_root_level: u8,
    /// The SYSTEM chunks (key + chunk item each); the first
    /// `sys_chunk_array_size` bytes are meaningful.
    pub sys_chunk_array: [u8; SYSTEM_CHUNK_ARRAY_SIZE],
    pub super_roots: [RootBackup; NUM_BACKUP_ROOTS],
}

impl Default for SuperBlock {
    fn default() -> Self {
        SuperBlock {
            csum: [0; CSUM_SIZE],
            fsid: [0; FSID_SIZE],
            bytenr: 0,
            flags: 0,
            magic: MAGIC,
            generation: 0,
            root: 0,
            chunk_root: 0,
            log_root: 0,
            log_root_transid: 0,
            total_bytes: 0,
            bytes_used: 0,
            root_dir_objectid: ROOT_TREE_DIR_OBJECTID,
            num_devices: 1,
            sectorsize: SECTORSIZE,
            nodesize: 0,
            leafsize: 0,
            stripesize: SECTORSIZE,
            sys_chunk_array_size: 0,
            chunk_root_generation: 0,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
            csum_type: CSUM_TYPE_CRC32,
            root_level: 0,
            chunk_root_level: 0,
            log_root_level: 0,
            dev_item: DevItem::default(),
            label: [0; LABEL_SIZE],
            cache_generation: 0,
            uuid_tree_generation: 0,
            metadata_uuid: [0; FSID_SIZE],
            nr_global_roots: 0,
            remap_root: 0,
            remap_root_generation: 0,
            remap_root_level: 0,
            sys_chunk_array: [0; SYSTEM_CHUNK_ARRAY_SIZE],
            super_roots: [RootBackup::default(); NUM_BACKUP_ROOTS],
        }
    }
}

impl SuperBlock {
    /// Decode a 4096-byte image. Nothing is validated here (see
    /// [`check_super_copy`] and [`validate_super`]); EINVAL if `buf` is
    /// shorter than a super block.
    pub fn decode(buf: &[u8]) -> Result<SuperBlock, Error> {
        if buf.len() < SUPER_INFO_SIZE {
            return Err(Error::Einval);
        }
        let mut super_roots = [RootBackup::default(); NUM_BACKUP_ROOTS];
        for (i, backup) in super_roots.iter_mut().enumerate() {
            *backup = RootBackup::read(&buf[SB_SUPER_ROOTS + i * ROOT_BACKUP_SIZE..]);
        }
        Ok(SuperBlock {
            csum: get_array(buf, SB_CSUM),
            fsid: get_array(buf, SB_FSID),
            bytenr: get_u64(buf, SB_BYTENR),
            flags: get_u64(buf, SB_FLAGS),
            magic: get_u64(buf, SB_MAGIC),
            generation: get_u64(buf, SB_GENERATION),
            root: get_u64(buf, SB_ROOT),
            chunk_root: get_u64(buf, SB_CHUNK_ROOT),
            log_root: get_u64(buf, SB_LOG_ROOT),
            log_root_transid: get_u64(buf, SB_LOG_ROOT_TRANSID),
            total_bytes: get_u64(buf, SB_TOTAL_BYTES),
            bytes_used: get_u64(buf, SB_BYTES_USED),
            root_dir_objectid: get_u64(buf, SB_ROOT_DIR_OBJECTID),
            num_devices: get_u64(buf, SB_NUM_DEVICES),
            sectorsize: get_u32(buf, SB_SECTORSIZE),
            nodesize: get_u32(buf, SB_NODESIZE),
            leafsize: get_u32(buf, SB_LEAFSIZE),
            stripesize: get_u32(buf, SB_STRIPESIZE),
            sys_chunk_array_size: get_u32(buf, SB_SYS_CHUNK_ARRAY_SIZE),
            chunk_root_generation: get_u64(buf, SB_CHUNK_ROOT_GENERATION),
            compat_flags: get_u64(buf, SB_COMPAT_FLAGS),
            compat_ro_flags: get_u64(buf, SB_COMPAT_RO_FLAGS),
            incompat_flags: get_u64(buf, SB_INCOMPAT_FLAGS),
            csum_type: get_u16(buf, SB_CSUM_TYPE),
            root_level: get_u8(buf, SB_ROOT_LEVEL),
            chunk_root_level: get_u8(buf, SB_CHUNK_ROOT_LEVEL),
            log_root_level: get_u8(buf, SB_LOG_ROOT_LEVEL),
            dev_item: DevItem::read(&buf[SB_DEV_ITEM..]),
            label: get_array(buf, SB_LABEL),
            cache_generation: get_u64(buf, SB_CACHE_GENERATION),
            uuid_tree_generation: get_u64(buf, SB_UUID_TREE_GENERATION),
            metadata_uuid: get_array(buf, SB_METADATA_UUID),
            nr_global_roots: get_u64(buf, SB_NR_GLOBAL_ROOTS),
            remap_root: get_u64(buf, SB_REMAP_ROOT),
            remap_root_generation: get_u64(buf, SB_REMAP_ROOT_GENERATION),
            remap_root_level: get_u8(buf, SB_REMAP_ROOT_LEVEL),
            sys_chunk_array: get_array(buf, SB_SYS_CHUNK_ARRAY),
            super_roots,
        })
    }

    /// Encode to 4096 bytes with the crc32c of bytes 32.. in the first 4.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; SUPER_INFO_SIZE];
        buf[SB_FSID..SB_FSID + FSID_SIZE].copy_from_slice(&self.fsid);
        put_u64(&mut buf, SB_BYTENR, self.bytenr);
        put_u64(&mut buf, SB_FLAGS, self.flags);
        put_u64(&mut buf, SB_MAGIC, self.magic);
        put_u64(&mut buf, SB_GENERATION, self.generation);
        put_u64(&mut buf, SB_ROOT, self.root);
        put_u64(&mut buf, SB_CHUNK_ROOT, self.chunk_root);
        put_u64(&mut buf, SB_LOG_ROOT, self.log_root);
        put_u64(&mut buf, SB_LOG_ROOT_TRANSID, self.log_root_transid);
        put_u64(&mut buf, SB_TOTAL_BYTES, self.total_bytes);
        put_u64(&mut buf, SB_BYTES_USED, self.bytes_used);
        put_u64(&mut buf, SB_ROOT_DIR_OBJECTID, self.root_dir_objectid);
        put_u64(&mut buf, SB_NUM_DEVICES, self.num_devices);
        put_u32(&mut buf, SB_SECTORSIZE, self.sectorsize);
        put_u32(&mut buf, SB_NODESIZE, self.nodesize);
        put_u32(&mut buf, SB_LEAFSIZE, self.leafsize);
        put_u32(&mut buf, SB_STRIPESIZE, self.stripesize);
        put_u32(&mut buf, SB_SYS_CHUNK_ARRAY_SIZE, self.sys_chunk_array_size);
        put_u64(&mut buf, SB_CHUNK_ROOT_GENERATION, self.chunk_root_generation);
        put_u64(&mut buf, SB_COMPAT_FLAGS, self.compat_flags);
        put_u64(&mut buf, SB_COMPAT_RO_FLAGS, self.compat_ro_flags);
        put_u64(&mut buf, SB_INCOMPAT_FLAGS, self.incompat_flags);
        put_u16(&mut buf, SB_CSUM_TYPE, self.csum_type);
        put_u8(&mut buf, SB_ROOT_LEVEL, self.root_level);
        put_u8(&mut buf, SB_CHUNK_ROOT_LEVEL, self.chunk_root_level);
        put_u8(&mut buf, SB_LOG_ROOT_LEVEL, self.log_root_level);
        self.dev_item.write(&mut buf[SB_DEV_ITEM..]);
        buf[SB_LABEL..SB_LABEL + LABEL_SIZE].copy_from_slice(&self.label);
        put_u64(&mut buf, SB_CACHE_GENERATION, self.cache_generation);
        put_u64(&mut buf, SB_UUID_TREE_GENERATION, self.uuid_tree_generation);
        buf[SB_METADATA_UUID..SB_METADATA_UUID + FSID_SIZE].copy_from_slice(&self.metadata_uuid);
        put_u64(&mut buf, SB_NR_GLOBAL_ROOTS, self.nr_global_roots);
        put_u64(&mut buf, SB_REMAP_ROOT, self.remap_root);
        put_u64(&mut buf, SB_REMAP_ROOT_GENERATION, self.remap_root_generation);
        put_u8(&mut buf, SB_REMAP_ROOT_LEVEL, self.remap_root_level);
        buf[SB_SYS_CHUNK_ARRAY..SB_SUPER_ROOTS].copy_from_slice(&self.sys_chunk_array);
        for (i, backup) in self.super_roots.iter().enumerate() {
            backup.write(&mut buf[SB_SUPER_ROOTS + i * ROOT_BACKUP_SIZE..]);
        }
        let crc = csum_tree_block(&buf);
        put_u32(&mut buf, SB_CSUM, crc);
        buf
    }

    /// The meaningful part of the sys chunk array.
    pub fn sys_chunk_array(&self) -> &[u8] {
        &self.sys_chunk_array[..(self.sys_chunk_array_size as usize).min(SYSTEM_CHUNK_ARRAY_SIZE)]
    }

    /// Replace the sys chunk array (at most 2048 bytes).
    pub fn set_sys_chunk_array(&mut self, array: &[u8]) {
        assert!(array.len() <= SYSTEM_CHUNK_ARRAY_SIZE, "sys chunk array of {} bytes", array.len());
        self.sys_chunk_array = [0; SYSTEM_CHUNK_ARRAY_SIZE];
        self.sys_chunk_array[..array.len()].copy_from_slice(array);
        self.sys_chunk_array_size = array.len() as u32;
    }

    /// The fsid written in tree block headers (`fs_devices->metadata_uuid`).
    pub fn metadata_fsid(&self) -> [u8; FSID_SIZE] {
        if self.incompat_flags & FEATURE_INCOMPAT_METADATA_UUID != 0 { self.metadata_uuid } else { self.fsid }
    }

    /// The label up to its first NUL.
    pub fn label_str(&self) -> String {
        let end = self.label.iter().position(|&b| b == 0).unwrap_or(LABEL_SIZE);
        String::from_utf8_lossy(&self.label[..end]).into_owned()
    }
}

/// What makes a copy read at `bytenr` usable (`btrfs_read_dev_one_super`
/// and `btrfs_check_super_csum`): the magic, the copy's own offset, the
/// checksum type and the checksum. EINVAL otherwise.
pub fn check_super_copy(buf: &[u8], bytenr: u64) -> Result<SuperBlock, Error> {
    let sb = SuperBlock::decode(buf)?;
    if sb.magic != MAGIC || sb.bytenr != bytenr || sb.csum_type != CSUM_TYPE_CRC32 {
        return Err(Error::Einval);
    }
    if get_u32(buf, SB_CSUM) != csum_tree_block(&buf[..SUPER_INFO_SIZE]) {
        return Err(Error::Einval);
    }
    Ok(sb)
}

/// The checks of `btrfs_validate_super` that matter to the engine, plus
/// what it cannot mount. Returns the kernel-style reason on failure.
pub fn validate_super(sb: &SuperBlock) -> Result<(), &'static str> {
    let nodesize = sb.nodesize;
    if sb.magic != MAGIC {
        return Err("no valid FS found");
    }
    if sb.csum_type != CSUM_TYPE_CRC32 {
        return Err("unsupported checksum algorithm");
    }
    if sb.sectorsize != SECTORSIZE {
        return Err("invalid sectorsize");
    }
    if !check_nodesize(nodesize) {
        return Err("invalid nodesize");
    }
    if sb.leafsize != nodesize {
        return Err("invalid leafsize");
    }
    if sb.stripesize != sb.sectorsize {
        return Err("invalid stripesize");
    }
    let aligned = |v: u64| v != 0 && v.is_multiple_of(u64::from(sb.sectorsize));
    if !aligned(sb.root) || !aligned(sb.chunk_root) {
        return Err("tree root or chunk root unaligned");
    }
    if sb.root_level as usize >= MAX_LEVEL || sb.chunk_root_level as usize >= MAX_LEVEL {
        return Err("tree root or chunk root level too big");
    }
    let device_bytes = sb.dev_item.total_bytes;
    if !sb_copy_fits(0, device_bytes) || sb.total_bytes < device_bytes {
        return Err("super_total_bytes mismatch with the device's total_bytes");
    }
    let inside = |v: u64| v.checked_add(u64::from(nodesize)).is_some_and(|end| end <= device_bytes);
    if !inside(sb.root) || !inside(sb.chunk_root) {
        return Err("tree root or chunk root beyond the device");
    }
    if sb.metadata_fsid() != sb.dev_item.fsid {
        return Err("dev_item UUID does not match metadata fsid");
    }
    if sb.bytes_used < 6 * u64::from(nodesize) {
        return Err("invalid bytes_used");
    }
    let array_size = sb.sys_chunk_array_size as usize;
    if !(DISK_KEY_SIZE + CHUNK_ITEM_SIZE..=SYSTEM_CHUNK_ARRAY_SIZE).contains(&array_size) {
        return Err("system chunk array too big or too small");
    }
    if sb.num_devices != 1 || sb.dev_item.devid != DEVID {
        return Err("more than one device");
    }
    if sb.log_root % u64::from(sb.sectorsize) != 0 {
        return Err("log root unaligned");
    }
    if sb.incompat_flags & UNSUPPORTED_INCOMPAT != 0 {
        return Err("unsupported incompat features");
    }
    if sb.compat_ro_flags & FEATURE_COMPAT_RO_BLOCK_GROUP_TREE != 0 {
        return Err("block group tree");
    }
    if sb.generation == 0 || sb.chunk_root_generation > sb.generation {
        return Err("invalid generation");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Bios.

fn submit(env: &dyn Env, bio: Bio) -> Completion<BioStatus> {
    let done = Completion::new();
    let signal = done.clone();
    env.submit_bio(bio, Box::new(move |status| signal.complete(status)));
    done
}

async fn wait_bio(
    env: &dyn Env,
    done: Completion<BioStatus>,
    what: &'static str,
    offset_bytes: u64,
) -> BioStatus {
    crate::wait::declared(env, WaitOn::Io { what, offset_bytes }, done).await
}

// ---------------------------------------------------------------------------
// Reading the super block.

async fn read_super_copy(env: &dyn Env, mirror: usize) -> Result<SuperBlock, Error> {
    let bytenr = sb_offset(mirror);
    let bio = Bio::Read { offset_bytes: bytenr, len_bytes: SUPER_INFO_SIZE as u32 };
    let done = submit(env, bio);
    match wait_bio(env, done, "super_read", bytenr).await {
        BioStatus::IoError => Err(Error::Io { bytenr }),
        BioStatus::Ok(buf) => check_super_copy(&buf, bytenr),
    }
}

/// Read the super block: the primary copy if it is valid (magic, offset,
/// checksum); otherwise the valid mirror of the highest generation (see
/// the module's departures). When no copy is valid, the primary's error:
/// EIO if its read failed, EINVAL if it is not a valid super block.
pub async fn read_super(env: &dyn Env) -> Result<SuperBlock, Error> {
    let primary_error = match read_super_copy(env, 0).await {
        Ok(sb) => return Ok(sb),
        Err(e) => e,
    };
    env.trace(TraceEvent::Note {
        what: "super_primary_bad",
        a: SUPER_INFO_OFFSET,
        b: primary_error.errno() as u64,
        c: 0,
    });
    let mut best: Option<SuperBlock> = None;
    for mirror in 1..SUPER_MIRROR_MAX {
        let known_to_fit = best.as_ref().is_some_and(|sb| sb_copy_fits(mirror, sb.total_bytes));
        if mirror > 1 && !known_to_fit {
            break;
        }
        if let Ok(sb) = read_super_copy(env, mirror).await
            && best.as_ref().is_none_or(|b| sb.generation > b.generation)
        {
            best = Some(sb);
        }
    }
    match best {
        Some(sb) => {
            env.trace(TraceEvent::Note { what: "super_from_mirror", a: sb.bytenr, b: sb.generation, c: 0 });
            Ok(sb)
        }
        None => Err(primary_error),
    }
}

// ---------------------------------------------------------------------------
// Writing the super block.

/// `write_all_supers` without the filesystem: FLUSH and wait, then every
/// copy that fits in `dev_item.total_bytes` (the primary with FUA), then
/// wait. Each copy gets its own `bytenr`, the WRITTEN flag and its
/// checksum. EIO when the flush fails, the primary fails or every copy fails.
pub async fn write_supers(env: &dyn Env, sb: &SuperBlock) -> Result<(), Error> {
    // barrier_all_devices: REQ_PREFLUSH on an empty bio, waited for.
    let flush = submit(env, Bio::Flush);
    if wait_bio(env, flush, "super_flush", 0).await == BioStatus::IoError {
        return Err(Error::Io { bytenr: SUPER_INFO_OFFSET });
    }
    let mut copy = sb.clone();
    copy.flags |= HEADER_FLAG_WRITTEN;
    let mut inflight = Vec::new();
    for mirror in 0..SUPER_MIRROR_MAX {
        let bytenr = sb_offset(mirror);
        if !sb_copy_fits(mirror, sb.dev_item.total_bytes) {
            break;
        }
        copy.bytenr = bytenr;
        // REQ_SYNC | REQ_META | REQ_PRIO, and REQ_FUA on the primary.
        let bio = Bio::Write { offset_bytes: bytenr, data: copy.encode(), fua: mirror == 0, preflush: false };
        inflight.push((mirror, bytenr, submit(env, bio)));
    }
    assert!(!inflight.is_empty(), "device of {} bytes holds no super block", sb.dev_item.total_bytes);
    let copies = inflight.len();
    let mut errors = 0;
    let mut primary_failed = false;
    for (mirror, bytenr, done) in inflight {
        if wait_bio(env, done, "super_write", bytenr).await == BioStatus::IoError {
            errors += 1;
            primary_failed |= mirror == 0;
        }
    }
    if primary_failed || errors == copies {
        return Err(Error::Io { bytenr: SUPER_INFO_OFFSET });
    }
    Ok(())
}

/// `write_all_supers`: check `sb` as `btrfs_validate_write_super` does
/// (EUCLEAN, nothing written, if it fails), then write it to every copy
/// (see [`write_supers`]). On failure the filesystem is put in error, as
/// the kernel's `btrfs_handle_fs_error` and transaction abort do.
pub async fn write_all_supers(fs: &FsInfo, sb: &SuperBlock) -> Result<(), Error> {
    // btrfs_validate_write_super: never put a bad super block on disk.
    let result = match validate_super(sb) {
        Ok(()) => write_supers(&*fs.env, sb).await,
        Err(reason) => Err(Error::BadTreeBlock(format!(
            "super block corruption detected before writing it to disk: {reason}"
        ))),
    };
    match &result {
        Ok(()) => fs.env.trace(TraceEvent::Note {
            what: "write_super",
            a: sb.generation,
            b: sb.root,
            c: sb.chunk_root,
        }),
        Err(e) => {
            if fs.trans.fs_error.get().is_none() {
                fs.trans.fs_error.set(Some(e.errno()));
            }
            fs.env.trace(TraceEvent::Note {
                what: "write_super_failed",
                a: sb.generation,
                b: e.errno() as u64,
                c: 0,
            });
        }
    }
    result
}

/// The super block for the commit of transaction `transid`, from the
/// current state (`update_super_roots`, `backup_super_roots`, the
/// generation): root tree and chunk tree root blocks and levels (the
/// chunk root's generation is its block's), `bytes_used` (the sum of the
/// block groups' used bytes), the device item, the sys chunk array, and
/// the next backup root slot. Also becomes the filesystem's super copy.
///
/// The root tree's root block must be of generation `transid` (every
/// commit COWs it to update root items); mount reads it with the super
/// block's generation as the parent transid.
pub fn fill_super_for_commit(fs: &FsInfo, transid: u64) -> Result<SuperBlock, Error> {
    let mut sb = fs.volumes.super_copy().expect("no super block copy: the filesystem was not mounted");
    let node = |id: u64| fs.roots.borrow().get(&id).map(|root| root.node());
    let tree_root = node(ROOT_TREE_OBJECTID).expect("no root tree");
    let chunk_root = node(CHUNK_TREE_OBJECTID).expect("no chunk tree");
    sb.generation = transid;
    // A commit makes any log redundant.
    sb.log_root = 0;
    sb.log_root_level = 0;
    sb.root = tree_root.start;
    sb.root_level = tree_root.level();
    sb.chunk_root = chunk_root.start;
    sb.chunk_root_level = chunk_root.level();
    sb.chunk_root_generation = chunk_root.generation();
    sb.bytes_used = fs.block_groups.all().iter().map(|g| g.used.get()).sum();
    sb.dev_item = fs.volumes.device();
    sb.set_sys_chunk_array(&fs.volumes.system_chunk_array()?);
    let slot = fs.volumes.next_backup_root_index();
    sb.super_roots[slot] = backup_roots(fs, &sb);
    fs.volumes.set_super_copy(sb.clone());
    Ok(sb)
}

/// One backup root slot from the current roots (`backup_super_roots`).
fn backup_roots(fs: &FsInfo, sb: &SuperBlock) -> RootBackup {
    let roots = fs.roots.borrow();
    let root = |id: u64| {
        roots.get(&id).map_or((0, 0, 0), |r| {
            let eb = r.node();
            (eb.start, eb.generation(), eb.level())
        })
    };
    let (tree_root, tree_root_gen, tree_root_level) = root(ROOT_TREE_OBJECTID);
    let (chunk_root, chunk_root_gen, chunk_root_level) = root(CHUNK_TREE_OBJECTID);
    let (extent_root, extent_root_gen, extent_root_level) = root(EXTENT_TREE_OBJECTID);
    let (fs_root, fs_root_gen, fs_root_level) = root(FS_TREE_OBJECTID);
    let (dev_root, dev_root_gen, dev_root_level) = root(DEV_TREE_OBJECTID);
    let (csum_root, csum_root_gen, csum_root_level) = root(CSUM_TREE_OBJECTID);
    RootBackup {
        tree_root,
        tree_root_gen,
        chunk_root,
        chunk_root_gen,
        extent_root,
        extent_root_gen,
        fs_root,
        fs_root_gen,
        dev_root,
        dev_root_gen,
        csum_root,
        csum_root_gen,
        total_bytes: sb.total_bytes,
        bytes_used: sb.bytes_used,
        num_devices: sb.num_devices,
        tree_root_level,
        chunk_root_level,
        extent_root_level,
        fs_root_level,
        dev_root_level,
        csum_root_level,
    }
}

/// The last step of a commit, after the transaction's tree blocks are
/// written and waited for: fill the super block for `transid`
/// ([`fill_super_for_commit`]) and write it ([`write_all_supers`]).
pub async fn write_super_for_commit(fs: &FsInfo, transid: u64) -> Result<(), Error> {
    let sb = fill_super_for_commit(fs, transid)?;
    write_all_supers(fs, &sb).await
}

// ---------------------------------------------------------------------------
// Walking a tree without a transaction.

/// Visit every item of the tree whose root block is at `bytenr` (`level`,
/// `generation`, owned by tree `owner`), in key order, reading each block
/// with [`read_tree_block`] and the checks its parent pointer promises
/// (level, generation, first key). `visit` gets each item's key and data
/// and may stop the walk with an error. Takes no tree lock: for mount and
/// for trees nobody modifies meanwhile.
pub async fn for_each_leaf_item<F>(
    fs: &FsInfo,
    owner: u64,
    bytenr: u64,
    level: u8,
    generation: u64,
    mut visit: F,
) -> Result<(), Error>
where
    F: FnMut(&Key, &[u8]) -> Result<(), Error>,
{
    let root = read_tree_block_verified(fs, bytenr, owner, level, generation, None).await?;
    let mut stack = vec![(root, 0usize)];
    while let Some((eb, slot)) = stack.last_mut() {
        let eb = eb.clone();
        if eb.level() == 0 {
            let data = eb.data.borrow();
            for i in 0..eb.nritems() as usize {
                visit(&item_key(&data, i), item_data(&data, i))?;
            }
            drop(data);
            stack.pop();
            continue;
        }
        if *slot >= eb.nritems() as usize {
            stack.pop();
            continue;
        }
        let i = *slot;
        *slot += 1;
        let (child, child_gen, key) = {
            let data = eb.data.borrow();
            (node_blockptr(&data, i), node_ptr_generation(&data, i), node_key(&data, i))
        };
        let child = read_tree_block_verified(fs, child, owner, eb.level() - 1, child_gen, Some(key)).await?;
        stack.push((child, 0));
    }
    Ok(())
}

/// The last key at or below `target` in a tree (`btrfs_search_slot` for
/// `target` and a step back, read-only), or `None` if every key is above.
pub async fn find_last_key_at_most(
    fs: &FsInfo,
    owner: u64,
    bytenr: u64,
    level: u8,
    generation: u64,
    target: Key,
) -> Result<Option<Key>, Error> {
    let mut eb = read_tree_block_verified(fs, bytenr, owner, level, generation, None).await?;
    loop {
        let nritems = eb.nritems() as usize;
        let found = {
            let data = eb.data.borrow();
            let key_at = |i: usize| if eb.level() == 0 { item_key(&data, i) } else { node_key(&data, i) };
            let slot = (0..nritems).rev().find(|&i| key_at(i) <= target);
            match (slot, eb.level()) {
                (None, _) => return Ok(None),
                (Some(i), 0) => return Ok(Some(key_at(i))),
                (Some(i), _) => (node_blockptr(&data, i), node_ptr_generation(&data, i), node_key(&data, i)),
            }
        };
        let (child, child_gen, key) = found;
        eb = read_tree_block_verified(fs, child, owner, eb.level() - 1, child_gen, Some(key)).await?;
    }
}

// ---------------------------------------------------------------------------
// Mount.

/// Note why a mount failed (the kernel's log line), then EINVAL.
fn mount_error(env: &dyn Env, reason: &'static str, a: u64, b: u64) -> Error {
    env.trace(TraceEvent::Note { what: reason, a, b, c: 0 });
    Error::Einval
}

/// Mount (`open_ctree`): read and validate the super block, read the
/// chunk tree (device and chunks), the root tree (every tree's root item
/// and root block), the dev tree (device extents, checked against the
/// chunks) and the extent tree (block groups, with the space of every
/// extent and super block copy taken out of their free space). Every block
/// is read and verified through [`read_tree_block`]; a block whose
/// generation is not the one its parent or the super block promises is
/// the kernel's "parent transid verify failed". `fs.roots` gets the root
/// tree (1), the chunk tree (3) and every tree with a root item (extent 2,
/// dev 4, fs 5, csum 7 and any other).
pub async fn open_ctree(env: Rc<dyn Env>, fix: FixPolicy) -> Result<Rc<FsInfo>, Error> {
    let fs = mount_trees(env, fix).await?;
    crate::transaction::start_space_flusher(&fs);
    crate::transaction::start_transaction_kthread(&fs);
    let sb = fs.volumes.super_copy().expect("mounted");
    if sb.log_root != 0 {
        crate::tree_log::recover_log_trees(&fs, sb.log_root, sb.log_root_level).await?;
    }
    crate::relocation::recover_relocation(&fs).await?;
    Ok(fs)
}

/// Mount without starting the filesystem's daemons (the space flusher and
/// the transaction kthread): for an offline check, which never writes.
pub async fn open_ctree_for_check(env: Rc<dyn Env>) -> Result<Rc<FsInfo>, Error> {
    mount_trees(env, FixPolicy::None).await
}

async fn mount_trees(env: Rc<dyn Env>, fix: FixPolicy) -> Result<Rc<FsInfo>, Error> {
    let sb = read_super(&*env).await?;
    if let Err(reason) = validate_super(&sb) {
        return Err(mount_error(&*env, reason, sb.bytenr, sb.generation));
    }
    let fs = FsInfo::new(env.clone(), sb.nodesize, fix);
    fs.fsid.set(Some(sb.metadata_fsid()));
    fs.trans.generation.set(sb.generation);
    fs.trans.last_trans_committed.set(sb.generation);

    // btrfs_read_sys_array: the chunk root must lie in a system chunk.
    let sys_chunks =
        read_sys_array(sb.sys_chunk_array()).map_err(|_| mount_error(&*env, "bad sys_array", 0, 0))?;
    let in_sys_chunk = sys_chunks
        .iter()
        .any(|m| m.flags() & BLOCK_GROUP_SYSTEM != 0 && m.start <= sb.chunk_root && sb.chunk_root < m.end());
    if !in_sys_chunk {
        return Err(mount_error(&*env, "chunk root not in a system chunk", sb.chunk_root, 0));
    }

    let chunk_root = read_chunk_tree(&fs, &sb).await?;
    let root_tree =
        read_tree_block_verified(&fs, sb.root, ROOT_TREE_OBJECTID, sb.root_level, sb.generation, None)
            .await?;
    let mut roots: BTreeMap<u64, Rc<Root>> = BTreeMap::new();
    roots.insert(
        ROOT_TREE_OBJECTID,
        Root::new(&fs, ROOT_TREE_OBJECTID, root_tree.clone(), super_root_item(&root_tree)),
    );
    roots.insert(
        CHUNK_TREE_OBJECTID,
        Root::new(&fs, CHUNK_TREE_OBJECTID, chunk_root.clone(), super_root_item(&chunk_root)),
    );
    read_roots(&fs, &sb, &mut roots).await?;
    for id in [EXTENT_TREE_OBJECTID, DEV_TREE_OBJECTID, FS_TREE_OBJECTID, CSUM_TREE_OBJECTID] {
        if !roots.contains_key(&id) {
            env.trace(TraceEvent::Note { what: "missing root", a: id, b: 0, c: 0 });
            return Err(Error::Enoent);
        }
    }
    read_dev_extents(&fs, &roots[&DEV_TREE_OBJECTID]).await?;
    read_block_groups(&fs, &roots[&EXTENT_TREE_OBJECTID]).await?;

    let newest = sb.super_roots.iter().position(|b| b.tree_root_gen == sb.generation);
    fs.volumes.set_backup_root_index(newest.map_or(0, |i| i + 1));
    fs.volumes.set_super_copy(sb.clone());
    *fs.roots.borrow_mut() = roots;
    crate::qgroup::read_qgroup_config(&fs).await?;
    crate::qgroup::switch_commit_roots(&fs);
    // btrfs_init_space_info and btrfs_add_bg_to_space_info, then the
    // block reserves.
    fs.init_space(crate::volumes::unallocated_bytes(&fs));
    env.trace(TraceEvent::Note { what: "open_ctree", a: sb.generation, b: sb.root, c: sb.bytenr });
    Ok(fs)
}

/// The root item of a tree whose root lives in the super block.
fn super_root_item(node: &crate::extent_io::ExtentBuffer) -> RootItem {
    RootItem {
        generation: node.generation(),
        generation_v2: node.generation(),
        bytenr: node.start,
        level: node.level(),
        refs: 1,
        ..Default::default()
    }
}

/// `btrfs_read_chunk_tree`: the DEV_ITEM and every CHUNK_ITEM, into
/// `fs.volumes`. Returns the chunk root block.
async fn read_chunk_tree(fs: &FsInfo, sb: &SuperBlock) -> Result<Rc<crate::extent_io::ExtentBuffer>, Error> {
    let env = &*fs.env;
    let chunk_root = read_tree_block_verified(
        fs,
        sb.chunk_root,
        CHUNK_TREE_OBJECTID,
        sb.chunk_root_level,
        sb.chunk_root_generation,
        None,
    )
    .await?;
    let chunk_tree_uuid = header_chunk_tree_uuid(&chunk_root.data.borrow());
    let mut device: Option<DevItem> = None;
    let mut chunks: Vec<ChunkMap> = Vec::new();
    let mut bad: Option<(&'static str, u64)> = None;
    for_each_leaf_item(
        fs,
        CHUNK_TREE_OBJECTID,
        chunk_root.start,
        chunk_root.level(),
        chunk_root.generation(),
        |key, data| {
            match key.item_type {
                DEV_ITEM_KEY => device = Some(DevItem::read(data)),
                CHUNK_ITEM_KEY => match ChunkItem::read(data) {
                    Ok((item, _)) => chunks.push(ChunkMap { start: key.offset, item }),
                    Err(_) => bad = bad.or(Some(("bad chunk item", key.offset))),
                },
                _ => {}
            }
            Ok(())
        },
    )
    .await?;
    if let Some((reason, at)) = bad {
        return Err(mount_error(env, reason, at, 0));
    }
    let Some(device) = device else { return Err(mount_error(env, "no device item", 0, 0)) };
    if device.devid != DEVID || device.uuid != sb.dev_item.uuid || device.bytes_used > device.total_bytes {
        return Err(mount_error(env, "device item does not match the super block", device.devid, 0));
    }
    fs.volumes.init_device(device, chunk_tree_uuid);
    for map in chunks {
        let stripe = map.item.stripes[0];
        let identity = map.item.stripes.len() == 1 && stripe.devid == DEVID && stripe.offset == map.start;
        let flags = map.flags();
        let single =
            flags & BLOCK_GROUP_PROFILE_MASK == 0 && (flags & BLOCK_GROUP_TYPE_MASK).count_ones() == 1;
        let inside = map.start.checked_add(map.length()).is_some_and(|end| end <= device.total_bytes);
        if !identity || !single || !inside {
            return Err(mount_error(env, "unsupported chunk mapping", map.start, flags));
        }
        fs.volumes
            .add_chunk(map.clone())
            .map_err(|_| mount_error(env, "overlapping chunks", map.start, 0))?;
    }
    Ok(chunk_root)
}

/// `btrfs_read_roots` and the fs roots: every ROOT_ITEM of the root tree
/// gets a [`Root`] with its root block read and verified; relocation trees
/// go to `fs.reloc`. Deleted subvolumes (refs 0) are skipped. Subvolume trees get their
/// highest inode number (`btrfs_init_root_free_objectid`).
async fn read_roots(fs: &FsInfo, sb: &SuperBlock, roots: &mut BTreeMap<u64, Rc<Root>>) -> Result<(), Error> {
    let mut items: Vec<(u64, RootItem, u64)> = Vec::new();
    for_each_leaf_item(fs, ROOT_TREE_OBJECTID, sb.root, sb.root_level, sb.generation, |key, data| {
        if key.item_type == ROOT_ITEM_KEY {
            let item = RootItem::read_any(data).map_err(|e| Error::BadTreeBlock(e.to_string()))?;
            items.push((key.objectid, item, key.offset));
        }
        Ok(())
    })
    .await?;
    for (objectid, item, key_offset) in items {
        let skip = objectid == TREE_LOG_OBJECTID
            || objectid == ROOT_TREE_OBJECTID
            || objectid == CHUNK_TREE_OBJECTID
            || (is_fstree(objectid) && item.refs == 0);
        if skip {
            continue;
        }
        let node =
            read_tree_block_verified(fs, item.bytenr, objectid, item.level, item.generation, None).await?;
        let root = Root::new(fs, objectid, node, item);
        root.root_key_offset.set(key_offset);
        if objectid == TREE_RELOC_OBJECTID {
            // A relocation tree a crash left, by its subvolume: dropped
            // once mounted (relocation.rs `recover_relocation`).
            fs.reloc.roots.borrow_mut().insert(key_offset, root);
            continue;
        }
        if is_fstree(objectid) {
            let target = Key::new(LAST_FREE_OBJECTID, u8::MAX, u64::MAX);
            let last =
                find_last_key_at_most(fs, objectid, item.bytenr, item.level, item.generation, target).await?;
            let highest = last.map_or(0, |k| k.objectid).max(FIRST_FREE_OBJECTID - 1);
            root.highest_objectid.set(highest);
        }
        roots.insert(objectid, root);
    }
    Ok(())
}

/// The dev tree's DEV_EXTENTs into `fs.volumes`, and
/// `btrfs_verify_dev_extents`: every chunk has exactly its device extent,
/// and the device's `bytes_used` is their sum.
async fn read_dev_extents(fs: &FsInfo, dev_root: &Root) -> Result<(), Error> {
    let node = dev_root.node();
    let mut extents: Vec<(Key, DevExtent)> = Vec::new();
    for_each_leaf_item(fs, DEV_TREE_OBJECTID, node.start, node.level(), node.generation(), |key, data| {
        if key.item_type == DEV_EXTENT_KEY {
            if data.len() < DevExtent::SIZE {
                return Err(Error::BadTreeBlock(format!("dev extent {} too short", key.offset)));
            }
            extents.push((*key, DevExtent::read(data)));
        }
        Ok(())
    })
    .await?;
    let device = fs.volumes.device();
    for (key, extent) in &extents {
        let chunk = fs.volumes.chunk_map(extent.chunk_offset);
        let matches = key.objectid == DEVID
            && chunk.as_ref().is_some_and(|c| {
                c.start == extent.chunk_offset && c.length() == extent.length && c.physical() == key.offset
            });
        if !matches {
            return Err(Error::BadTreeBlock(format!(
                "dev extent physical {} length {} on devid {} doesn't have corresponding chunk",
                key.offset, extent.length, key.objectid
            )));
        }
        fs.volumes.add_dev_extent(key.offset, *extent).map_err(|_| {
            Error::BadTreeBlock(format!(
                "dev extent physical {} length {} overlaps",
                key.offset, extent.length
            ))
        })?;
    }
    let chunks = fs.volumes.chunks();
    if extents.len() != chunks.len() {
        return Err(Error::BadTreeBlock(format!(
            "{} chunks but {} dev extents on devid {DEVID}",
            chunks.len(),
            extents.len()
        )));
    }
    let sum: u64 = extents.iter().map(|(_, e)| e.length).sum();
    if sum != device.bytes_used {
        fs.env.report_violation(Violation {
            kind: "dev_bytes_used_mismatch",
            message: format!(
                "devid {DEVID} bytes_used {} but its dev extents total {sum}",
                device.bytes_used
            ),
        });
    }
    Ok(())
}

/// `btrfs_read_block_groups`: a [`BlockGroup`] per BLOCK_GROUP_ITEM, each
/// with its chunk; `used` from the item; free space = the group less the
/// super block stripes and every METADATA_ITEM / EXTENT_ITEM in it.
async fn read_block_groups(fs: &FsInfo, extent_root: &Root) -> Result<(), Error> {
    let nodesize = u64::from(fs.nodesize);
    let node = extent_root.node();
    let mut items: Vec<(Key, BlockGroupItem)> = Vec::new();
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for_each_leaf_item(fs, EXTENT_TREE_OBJECTID, node.start, node.level(), node.generation(), |key, data| {
        match key.item_type {
            BLOCK_GROUP_ITEM_KEY => items.push((*key, BlockGroupItem::read(data))),
            METADATA_ITEM_KEY => extents.push((key.objectid, nodesize)),
            EXTENT_ITEM_KEY => extents.push((key.objectid, key.offset)),
            _ => {}
        }
        Ok(())
    })
    .await?;

    let mut groups: BTreeMap<u64, (BlockGroup, u64)> = BTreeMap::new();
    for (key, item) in &items {
        let (start, length) = (key.objectid, key.offset);
        let chunk = fs.volumes.chunk_map(start).filter(|c| c.start == start && c.length() == length);
        let Some(chunk) = chunk else {
            fs.env.trace(TraceEvent::Note { what: "block group without chunk", a: start, b: length, c: 0 });
            return Err(Error::Enoent);
        };
        let mask = BLOCK_GROUP_TYPE_MASK | BLOCK_GROUP_PROFILE_MASK;
        if chunk.flags() & mask != item.flags & mask {
            return Err(Error::BadTreeBlock(format!(
                "block group {start} len {length} type flags 0x{:x} mismatch with chunk type flags 0x{:x}",
                item.flags & mask,
                chunk.flags() & mask
            )));
        }
        let group = BlockGroup::new(start, length, item.flags);
        exclude_super_stripes(&group);
        group.used.set(item.used);
        groups.insert(start, (group, 0));
    }
    for chunk in fs.volumes.chunks() {
        if !groups.contains_key(&chunk.start) {
            return Err(Error::BadTreeBlock(format!(
                "chunk start={} len={} doesn't have corresponding block group",
                chunk.start,
                chunk.length()
            )));
        }
    }

    // Extents come in key order, so in bytenr order.
    let mut prev_end = 0u64;
    for (bytenr, len) in extents {
        let end = bytenr.checked_add(len).filter(|_| len > 0);
        let group = groups.range_mut(..=bytenr).next_back().map(|(_, g)| g);
        let inside = |g: &BlockGroup| end.is_some_and(|end| end <= g.start + g.length);
        let Some((group, sum)) = group.filter(|(g, _)| inside(g)) else {
            return Err(Error::BadTreeBlock(format!(
                "extent {bytenr} len {len} is not inside a block group"
            )));
        };
        let on_super =
            super_stripes(group.start, group.length).iter().any(|&(s, l)| bytenr < s + l && s < bytenr + len);
        if bytenr < prev_end || on_super {
            return Err(Error::BadTreeBlock(format!(
                "extent {bytenr} len {len} overlaps another or a super block"
            )));
        }
        group.exclude(bytenr, len);
        *sum += len;
        prev_end = bytenr + len;
    }
    for (group, sum) in groups.into_values() {
        if group.used.get() != sum {
            fs.env.report_violation(Violation {
                kind: "block_group_used_mismatch",
                message: format!(
                    "block group {} len {} item says used {} but its extents total {sum}",
                    group.start,
                    group.length,
                    group.used.get()
                ),
            });
        }
        fs.block_groups.add(group);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// mkfs.

/// A uuid derived from `tag` and the geometry (version 4 layout): the
/// engine draws no random number, and a filesystem is identified by its
/// device anyway.
fn derive_uuid(tag: &[u8], total_bytes: u64, nodesize: u32) -> [u8; UUID_SIZE] {
    let mut out = [0u8; UUID_SIZE];
    for i in 0..4u8 {
        let mut message = tag.to_vec();
        message.extend_from_slice(&total_bytes.to_le_bytes());
        message.extend_from_slice(&nodesize.to_le_bytes());
        message.push(i);
        let word = csum_data(&message).to_le_bytes();
        out[4 * i as usize..4 * i as usize + 4].copy_from_slice(&word);
    }
    out[6] = (out[6] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

/// Build one leaf of generation 1 with `items` (sorted here), flagged
/// WRITTEN, checksummed, and passed through the write-time tree checker.
fn build_leaf(
    nodesize: u32,
    header: NewBlockHeader,
    mut items: Vec<(Key, Vec<u8>)>,
) -> Result<Vec<u8>, Error> {
    items.sort_by_key(|(key, _)| *key);
    let mut block = vec![0u8; nodesize as usize];
    init_tree_block(&mut block, &header);
    for (slot, (key, data)) in items.iter().enumerate() {
        if (leaf_free_space(&block) as usize) < data.len() + crate::format::ITEM_SIZE {
            return Err(Error::Efbig);
        }
        insert_item_in_leaf(&mut block, slot, key, data);
    }
    set_header_flag(&mut block, HEADER_FLAG_WRITTEN);
    write_header_csum(&mut block);
    check_tree_block(&block, nodesize, Some(header.owner))?;
    Ok(block)
}

/// The root item of a tree made by mkfs (`make_btrfs`): one leaf at
/// `bytenr`, generation 1.
fn mkfs_root_item(nodesize: u32, bytenr: u64) -> RootItem {
    let mut item = RootItem {
        generation: 1,
        generation_v2: 1,
        bytenr,
        bytes_used: u64::from(nodesize),
        refs: 1,
        level: 0,
        ..Default::default()
    };
    item.inode.generation = 1;
    item.inode.size = 3;
    item.inode.nlink = 1;
    item.inode.nbytes = u64::from(nodesize);
    item.inode.mode = 0o40755;
    item
}

/// A directory inode as btrfs-progs' `btrfs_make_root_dir` makes it.
fn root_dir_inode(nodesize: u32, now: Timespec) -> InodeItem {
    InodeItem {
        generation: 1,
        nlink: 1,
        nbytes: u64::from(nodesize),
        mode: 0o40755,
        atime: now,
        ctime: now,
        mtime: now,
        otime: now,
        ..Default::default()
    }
}

/// Write a fresh filesystem at generation 1 on a device of `device_bytes`
/// (rounded down to the sector size), as btrfs-progs' `make_btrfs` does:
/// a system, a metadata and a data chunk sized by the kernel's rules
/// (single profile, identity mapping, from 1 MiB on), and one leaf per
/// tree: the chunk tree (DEV_ITEM, CHUNK_ITEMs) in the system chunk; the
/// root tree (ROOT_ITEMs of the extent, dev, fs, csum and data relocation
/// trees and the root tree directory 6 with its "default" entry), the extent tree (a
/// METADATA_ITEM with an inline TREE_BLOCK_REF per tree block, a
/// BLOCK_GROUP_ITEM per chunk), the dev tree (DEV_EXTENTs), the fs tree
/// (directory 256 with its ".." INODE_REF), the empty csum tree and the
/// data relocation tree (an empty directory 256, which the kernel needs to
/// mount) in the metadata chunk. The blocks are written and waited for, then every super
/// block copy (FLUSH first, the primary with FUA). EINVAL for an invalid
/// nodesize, ENOSPC for a device too small for the three chunks, EIO when
/// a write fails. `_fix` is not used: mkfs does not mount.
pub async fn mkfs(env: Rc<dyn Env>, device_bytes: u64, nodesize: u32, _fix: FixPolicy) -> Result<(), Error> {
    if !check_nodesize(nodesize) {
        return Err(Error::Einval);
    }
    let total_bytes = device_bytes / u64::from(SECTORSIZE) * u64::from(SECTORSIZE);
    let fsid = derive_uuid(b"cowsim fsid", total_bytes, nodesize);
    let dev_uuid = derive_uuid(b"cowsim device", total_bytes, nodesize);
    let chunk_tree_uuid = derive_uuid(b"cowsim chunk tree", total_bytes, nodesize);
    let fs_tree_uuid = derive_uuid(b"cowsim fs tree", total_bytes, nodesize);
    let now = Timespec::from_ns(env.now_ns());
    let blocksize = u64::from(nodesize);

    let volumes = Volumes::default();
    let device = DevItem {
        devid: DEVID,
        total_bytes,
        io_align: SECTORSIZE,
        io_width: SECTORSIZE,
        sector_size: SECTORSIZE,
        uuid: dev_uuid,
        fsid,
        ..Default::default()
    };
    volumes.init_device(device, chunk_tree_uuid);
    let maps: Vec<ChunkMap> = [BLOCK_GROUP_SYSTEM, BLOCK_GROUP_METADATA, BLOCK_GROUP_DATA]
        .into_iter()
        .map(|flags| volumes.create_chunk_map(flags))
        .collect::<Result<_, _>>()?;
    // mkfs writes the chunk items itself: nothing stays pending.
    volumes.take_pending_chunks();
    let groups = BlockGroupCache::default();
    for map in &maps {
        let group = BlockGroup::new(map.start, map.length(), map.flags());
        exclude_super_stripes(&group);
        groups.add(group);
    }
    let alloc = |flags: u64| groups.find_free_extent(flags, blocksize, blocksize).ok_or(Error::Enospc);
    let chunk_block = alloc(BLOCK_GROUP_SYSTEM)?;
    let tree_blocks = [
        ROOT_TREE_OBJECTID,
        EXTENT_TREE_OBJECTID,
        DEV_TREE_OBJECTID,
        FS_TREE_OBJECTID,
        CSUM_TREE_OBJECTID,
        DATA_RELOC_TREE_OBJECTID,
    ]
    .into_iter()
    .map(|owner| Ok((owner, alloc(BLOCK_GROUP_METADATA)?)))
    .collect::<Result<BTreeMap<u64, u64>, Error>>()?;
    let block_of = |owner: u64| tree_blocks[&owner];
    let header = |owner: u64, bytenr: u64| NewBlockHeader {
        bytenr,
        generation: 1,
        owner,
        level: 0,
        fsid,
        chunk_tree_uuid,
    };

    // Chunk tree.
    let device = volumes.device();
    let mut chunk_items = vec![(crate::volumes::dev_item_key(DEVID), device.to_bytes())];
    chunk_items.extend(maps.iter().map(|m| (crate::volumes::chunk_item_key(m.start), m.item.to_bytes())));
    // Dev tree.
    let dev_items = maps
        .iter()
        .map(|m| {
            let extent = DevExtent::new(m.start, m.length(), chunk_tree_uuid);
            (crate::volumes::dev_extent_key(DEVID, m.physical()), extent.to_bytes())
        })
        .collect();
    // Extent tree.
    let mut extent_items: Vec<(Key, Vec<u8>)> = tree_blocks
        .iter()
        .map(|(&owner, &bytenr)| (owner, bytenr))
        .chain(std::iter::once((CHUNK_TREE_OBJECTID, chunk_block)))
        .map(|(owner, bytenr)| {
            (Key::new(bytenr, METADATA_ITEM_KEY, 0), ExtentItem::tree_block(1, owner).to_bytes())
        })
        .collect();
    for group in groups.all() {
        let item = BlockGroupItem {
            used: group.used.get(),
            chunk_objectid: FIRST_CHUNK_TREE_OBJECTID,
            flags: group.flags,
        };
        extent_items.push((crate::volumes::block_group_item_key(group.start, group.length), item.to_bytes()));
    }
    // Root tree.
    let mut fs_root_item = mkfs_root_item(nodesize, block_of(FS_TREE_OBJECTID));
    fs_root_item.root_dirid = FIRST_FREE_OBJECTID;
    fs_root_item.uuid = fs_tree_uuid;
    fs_root_item.ctime = now;
    fs_root_item.otime = now;
    let mut data_reloc_root_item = mkfs_root_item(nodesize, block_of(DATA_RELOC_TREE_OBJECTID));
    data_reloc_root_item.root_dirid = FIRST_FREE_OBJECTID;
    let default_dir = DirItem {
        location: Key::new(FS_TREE_OBJECTID, ROOT_ITEM_KEY, u64::MAX),
        transid: 0,
        dir_type: FT_DIR,
        name: b"default".to_vec(),
        data: vec![],
    };
    let root_items = vec![
        (
            Key::new(EXTENT_TREE_OBJECTID, ROOT_ITEM_KEY, 0),
            mkfs_root_item(nodesize, block_of(EXTENT_TREE_OBJECTID)).to_bytes(),
        ),
        (
            Key::new(DEV_TREE_OBJECTID, ROOT_ITEM_KEY, 0),
            mkfs_root_item(nodesize, block_of(DEV_TREE_OBJECTID)).to_bytes(),
        ),
        (Key::new(FS_TREE_OBJECTID, ROOT_ITEM_KEY, 0), fs_root_item.to_bytes()),
        (
            Key::new(FS_TREE_OBJECTID, INODE_REF_KEY, ROOT_TREE_DIR_OBJECTID),
            InodeRef { index: 0, name: b"default".to_vec() }.to_bytes(),
        ),
        (
            Key::new(ROOT_TREE_DIR_OBJECTID, INODE_ITEM_KEY, 0),
            InodeItem { size: 0, ..root_dir_inode(nodesize, now) }.to_bytes(),
        ),
        (
            Key::new(ROOT_TREE_DIR_OBJECTID, INODE_REF_KEY, ROOT_TREE_DIR_OBJECTID),
            InodeRef { index: 0, name: b"..".to_vec() }.to_bytes(),
        ),
        (
            Key::new(ROOT_TREE_DIR_OBJECTID, crate::format::DIR_ITEM_KEY, name_hash(b"default")),
            default_dir.to_bytes(),
        ),
        (
            Key::new(CSUM_TREE_OBJECTID, ROOT_ITEM_KEY, 0),
            mkfs_root_item(nodesize, block_of(CSUM_TREE_OBJECTID)).to_bytes(),
        ),
        (Key::new(DATA_RELOC_TREE_OBJECTID, ROOT_ITEM_KEY, 0), data_reloc_root_item.to_bytes()),
    ];
    // FS tree.
    let fs_items = vec![
        (Key::new(FIRST_FREE_OBJECTID, INODE_ITEM_KEY, 0), root_dir_inode(nodesize, now).to_bytes()),
        (
            Key::new(FIRST_FREE_OBJECTID, INODE_REF_KEY, FIRST_FREE_OBJECTID),
            InodeRef { index: 0, name: b"..".to_vec() }.to_bytes(),
        ),
    ];

    // Data relocation tree: an empty directory 256 (`create_data_reloc_tree`).
    let data_reloc_items = vec![
        (
            Key::new(FIRST_FREE_OBJECTID, INODE_ITEM_KEY, 0),
            InodeItem { nbytes: 0, otime: Timespec::default(), ..root_dir_inode(nodesize, now) }.to_bytes(),
        ),
        (
            Key::new(FIRST_FREE_OBJECTID, INODE_REF_KEY, FIRST_FREE_OBJECTID),
            InodeRef { index: 0, name: b"..".to_vec() }.to_bytes(),
        ),
    ];

    let blocks = vec![
        (chunk_block, build_leaf(nodesize, header(CHUNK_TREE_OBJECTID, chunk_block), chunk_items)?),
        (
            block_of(ROOT_TREE_OBJECTID),
            build_leaf(nodesize, header(ROOT_TREE_OBJECTID, block_of(ROOT_TREE_OBJECTID)), root_items)?,
        ),
        (
            block_of(EXTENT_TREE_OBJECTID),
            build_leaf(nodesize, header(EXTENT_TREE_OBJECTID, block_of(EXTENT_TREE_OBJECTID)), extent_items)?,
        ),
        (
            block_of(DEV_TREE_OBJECTID),
            build_leaf(nodesize, header(DEV_TREE_OBJECTID, block_of(DEV_TREE_OBJECTID)), dev_items)?,
        ),
        (
            block_of(FS_TREE_OBJECTID),
            build_leaf(nodesize, header(FS_TREE_OBJECTID, block_of(FS_TREE_OBJECTID)), fs_items)?,
        ),
        (
            block_of(CSUM_TREE_OBJECTID),
            build_leaf(nodesize, header(CSUM_TREE_OBJECTID, block_of(CSUM_TREE_OBJECTID)), vec![])?,
        ),
        (
            block_of(DATA_RELOC_TREE_OBJECTID),
            build_leaf(
                nodesize,
                header(DATA_RELOC_TREE_OBJECTID, block_of(DATA_RELOC_TREE_OBJECTID)),
                data_reloc_items,
            )?,
        ),
    ];

    // The super block, with the first backup root slot filled.
    let bytes_used: u64 = groups.all().iter().map(|g| g.used.get()).sum();
    let mut sb = SuperBlock {
        fsid,
        generation: 1,
        root: block_of(ROOT_TREE_OBJECTID),
        chunk_root: chunk_block,
        total_bytes,
        bytes_used,
        nodesize,
        leafsize: nodesize,
        chunk_root_generation: 1,
        incompat_flags: MKFS_INCOMPAT_FLAGS,
        dev_item: device,
        ..Default::default()
    };
    sb.set_sys_chunk_array(&volumes.system_chunk_array()?);
    sb.super_roots[0] = RootBackup {
        tree_root: block_of(ROOT_TREE_OBJECTID),
        tree_root_gen: 1,
        chunk_root: chunk_block,
        chunk_root_gen: 1,
        extent_root: block_of(EXTENT_TREE_OBJECTID),
        extent_root_gen: 1,
        fs_root: block_of(FS_TREE_OBJECTID),
        fs_root_gen: 1,
        dev_root: block_of(DEV_TREE_OBJECTID),
        dev_root_gen: 1,
        csum_root: block_of(CSUM_TREE_OBJECTID),
        csum_root_gen: 1,
        total_bytes,
        bytes_used,
        num_devices: 1,
        ..Default::default()
    };
    debug_assert!(validate_super(&sb).is_ok(), "{:?}", validate_super(&sb));

    let inflight: Vec<_> = blocks
        .into_iter()
        .map(|(bytenr, block)| {
            let bio = Bio::Write { offset_bytes: bytenr, data: block, fua: false, preflush: false };
            (bytenr, submit(&*env, bio))
        })
        .collect();
    let mut result = Ok(());
    for (bytenr, done) in inflight {
        if wait_bio(&*env, done, "mkfs_write", bytenr).await == BioStatus::IoError && result.is_ok() {
            result = Err(Error::Io { bytenr });
        }
    }
    result?;
    write_supers(&*env, &sb).await?;
    env.trace(TraceEvent::Note { what: "mkfs", a: total_bytes, b: u64::from(nodesize), c: sb.root });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accessors::insert_ptr;
    use crate::format::{FixedItem, INODE_REF_KEY};
    use crate::testenv::TestEnv;
    use crate::tree_checker::verify_csum;

    const MIB: u64 = 1 << 20;
    const NODESIZE: u32 = 16384;

    /// The primary super block of a 1 GiB image made by mkfs.btrfs 6.2
    /// (`-L cowsim -m single -d single`), as (offset, hex) runs with the
    /// zero gaps left out. `btrfs inspect-internal dump-super` printed the
    /// values the test compares with.
    const REAL_SUPER: &[(usize, &str)] = &[
        (0, "6ef85c1c"),
        (32, "8be6802d229f47c9acdd7b7b90319060000001000000000001000000000000005f42485266535f4d06"),
        (82, "500000000000004010"),
        (115, "40000000000040020000000000060000000000000001"),
        (145, "1000000040000000400000001000006100000005"),
        (180, "03000000000000004103"),
        (201, "01"),
        (212, "4000000000000040010000000000100000001000000010"),
        (267, "8e502c29097642faaad428030f08dfb78be6802d229f47c9acdd7b7b90319060636f7773696d"),
        (812, "01000000000000e40000100000000000000040000000000002"),
        (846, "01000000000002"),
        (861, "10000000100000001000000100000001"),
        (886, "1000000000008e502c29097642faaad428030f08dfb7"),
        (2860, "c050000000000005"),
        (2876, "4010000000000005"),
        (2893, "52000000000005"),
        (2908, "8050000000000005"),
        (2925, "51000000000005"),
        (2940, "4052000000000005"),
        (2958, "4000000000004002000000000001"),
        (3029, "50000000000006"),
        (3044, "4010000000000005"),
        (3060, "4050000000000006"),
        (3076, "8050000000000005"),
        (3093, "51000000000005"),
        (3108, "4052000000000005"),
        (3126, "4000000000004002000000000001"),
        (3197, "51000000000003"),
        (3213, "10000000000003"),
        (3228, "8050000000000003"),
        (3244, "4051000000000003"),
        (3260, "4050000000000003"),
        (3276, "4011000000000001"),
        (3294, "400000000000c001000000000001"),
        (3365, "50000000000004"),
        (3381, "10000000000003"),
        (3396, "8051000000000004"),
        (3412, "4051000000000003"),
        (3428, "4050000000000003"),
        (3444, "4011000000000001"),
        (3462, "400000000000c001000000000001"),
    ];

    fn real_super() -> Vec<u8> {
        let mut b = vec![0u8; SUPER_INFO_SIZE];
        for (off, hex) in REAL_SUPER {
            for i in 0..hex.len() / 2 {
                b[off + i] = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
            }
        }
        b
    }

    fn uuid(s: &str) -> [u8; 16] {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        let v: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        v.try_into().unwrap()
    }

    fn dyn_env(env: &Rc<TestEnv>) -> Rc<dyn Env> {
        env.clone()
    }

    fn mkfs_env(device_bytes: u64, nodesize: u32) -> Rc<TestEnv> {
        let env = TestEnv::new(device_bytes as usize);
        env.run(mkfs(dyn_env(&env), device_bytes, nodesize, FixPolicy::None)).unwrap();
        env
    }

    fn mount(env: &Rc<TestEnv>) -> Result<Rc<FsInfo>, Error> {
        env.run(open_ctree(dyn_env(env), FixPolicy::None))
    }

    /// Every item of a tree, read through the walker.
    fn items_of(env: &Rc<TestEnv>, fs: &Rc<FsInfo>, objectid: u64) -> Vec<(Key, Vec<u8>)> {
        let (fs, node) = (fs.clone(), fs.root(objectid).node());
        env.run(async move {
            let mut items = Vec::new();
            for_each_leaf_item(&fs, objectid, node.start, node.level(), node.generation(), |k, d| {
                items.push((*k, d.to_vec()));
                Ok(())
            })
            .await
            .map(|()| items)
        })
        .unwrap()
    }

    #[test]
    fn super_block_layout_matches_a_real_image() {
        let buf = real_super();
        let sb = check_super_copy(&buf, SUPER_INFO_OFFSET).unwrap();
        assert_eq!(sb.csum[..4], [0x6e, 0xf8, 0x5c, 0x1c]);
        assert_eq!(sb.bytenr, 65536);
        assert_eq!(sb.flags, HEADER_FLAG_WRITTEN);
        assert_eq!(sb.magic, MAGIC);
        assert_eq!(sb.fsid, uuid("8be6802d-229f-47c9-acdd-7b7b90319060"));
        assert_eq!(sb.metadata_fsid(), sb.fsid);
        assert_eq!(sb.metadata_uuid, [0; 16], "written only with the METADATA_UUID feature");
        assert_eq!(sb.label_str(), "cowsim");
        assert_eq!((sb.generation, sb.root, sb.chunk_root, sb.log_root), (6, 5242880, 1064960, 0));
        assert_eq!((sb.sys_chunk_array_size, sb.chunk_root_generation), (97, 5));
        assert_eq!((sb.root_level, sb.chunk_root_level, sb.log_root_level), (0, 0, 0));
        assert_eq!((sb.total_bytes, sb.bytes_used), (1 << 30, 147456));
        assert_eq!((sb.sectorsize, sb.nodesize, sb.leafsize, sb.stripesize), (4096, 16384, 16384, 4096));
        assert_eq!((sb.root_dir_objectid, sb.num_devices), (6, 1));
        assert_eq!((sb.compat_flags, sb.compat_ro_flags, sb.incompat_flags), (0, 3, 0x341));
        assert_eq!(sb.incompat_flags, MKFS_INCOMPAT_FLAGS);
        assert_eq!((sb.csum_type, sb.cache_generation, sb.uuid_tree_generation), (0, 0, 0));
        let dev = sb.dev_item;
        assert_eq!(dev.uuid, uuid("8e502c29-0976-42fa-aad4-28030f08dfb7"));
        assert_eq!(dev.fsid, sb.fsid);
        assert_eq!((dev.devid, dev.total_bytes, dev.bytes_used), (1, 1 << 30, 20971520));
        assert_eq!(
            (dev.io_align, dev.io_width, dev.sector_size, dev.dev_type, dev.generation),
            (4096, 4096, 4096, 0, 0)
        );
        // item 0 key (FIRST_CHUNK_TREE CHUNK_ITEM 1048576): length 4194304
        // owner 2 stripe_len 65536 type SYSTEM|single io_align 4096
        // io_width 4096 sector_size 4096 num_stripes 1 sub_stripes 0,
        // stripe 0 devid 1 offset 1048576.
        let chunks = read_sys_array(sb.sys_chunk_array()).unwrap();
        assert_eq!(chunks.len(), 1);
        let c = &chunks[0];
        assert_eq!(
            (c.start, c.length(), c.flags(), c.item.owner, c.item.stripe_len),
            (MIB, 4 * MIB, BLOCK_GROUP_SYSTEM, 2, 65536)
        );
        assert_eq!((c.item.io_align, c.item.io_width, c.item.sub_stripes), (4096, 4096, 0));
        assert_eq!((c.item.stripes[0].devid, c.physical(), c.item.stripes[0].dev_uuid), (1, MIB, dev.uuid));
        let b = &sb.super_roots;
        assert_eq!(
            (b[0].tree_root, b[0].tree_root_gen, b[0].chunk_root, b[0].chunk_root_gen),
            (5292032, 5, 1064960, 5)
        );
        assert_eq!(
            (b[0].extent_root, b[0].fs_root, b[0].dev_root, b[0].csum_root),
            (5373952, 5275648, 5308416, 5390336)
        );
        assert_eq!((b[0].total_bytes, b[0].bytes_used, b[0].num_devices), (1 << 30, 147456, 1));
        assert_eq!((b[1].tree_root, b[1].tree_root_gen, b[1].extent_root_gen), (5242880, 6, 6));
        assert_eq!((b[2].csum_root, b[2].csum_root_gen, b[2].bytes_used), (1130496, 1, 114688));
        assert_eq!((b[3].extent_root, b[3].extent_root_gen, b[3].chunk_root_gen), (5341184, 4, 3));
        assert!(validate_super(&sb).is_ok());
        // Bit-exact round trip, checksum included.
        assert_eq!(sb.encode(), buf);
    }

    #[test]
    fn super_block_round_trip_and_checksum() {
        let mut sb = SuperBlock {
            fsid: [1; 16],
            bytenr: sb_offset(1),
            flags: 3,
            generation: 77,
            root: 30 * MIB,
            chunk_root: 2 * MIB,
            log_root: 5,
            log_root_transid: 6,
            total_bytes: 10 << 30,
            bytes_used: 123 << 14,
            num_devices: 1,
            nodesize: 16384,
            leafsize: 16384,
            chunk_root_generation: 70,
            compat_flags: 8,
            compat_ro_flags: 9,
            incompat_flags: 10,
            root_level: 2,
            chunk_root_level: 1,
            log_root_level: 3,
            dev_item: DevItem {
                devid: 1,
                total_bytes: 10 << 30,
                uuid: [2; 16],
                fsid: [1; 16],
                ..Default::default()
            },
            cache_generation: 11,
            uuid_tree_generation: 12,
            metadata_uuid: [4; 16],
            nr_global_roots: 13,
            remap_root: 14,
            remap_root_generation: 15,
            remap_root_level: 16,
            ..Default::default()
        };
        sb.label[..4].copy_from_slice(b"test");
        sb.set_sys_chunk_array(&[0xab; 97]);
        sb.super_roots[2] = RootBackup {
            tree_root: 1,
            csum_root_gen: 2,
            num_devices: 1,
            csum_root_level: 3,
            ..Default::default()
        };
        let buf = sb.encode();
        assert_eq!(buf.len(), 4096);
        let back = check_super_copy(&buf, sb_offset(1)).unwrap();
        assert_eq!(back.csum[..4], buf[..4]);
        assert_eq!(SuperBlock { csum: sb.csum, ..back.clone() }, sb);
        assert_eq!(back.encode(), buf);
        // Offsets of some fields, against the kernel's struct.
        assert_eq!(get_u64(&buf, 72), 77);
        assert_eq!(get_u64(&buf, 164), 70);
        assert_eq!(buf[198..201], [2, 1, 3]);
        assert_eq!(&buf[299..303], b"test");
        assert_eq!(get_u64(&buf, 587), 13);
        assert_eq!(buf[811], 0xab);
        assert_eq!(get_u64(&buf, 2859 + 2 * 168), 1);
        assert_eq!(buf[2859 + 2 * 168 + 157], 3);
        // Corruption, another copy's offset, another magic: not a super block.
        let mut bad = buf.clone();
        bad[1000] ^= 1;
        assert_eq!(check_super_copy(&bad, sb_offset(1)), Err(Error::Einval));
        assert_eq!(check_super_copy(&buf, sb_offset(0)), Err(Error::Einval));
        let mut other = sb.clone();
        other.magic = 1;
        assert_eq!(check_super_copy(&other.encode(), sb_offset(1)), Err(Error::Einval));
        assert_eq!(SuperBlock::decode(&buf[..100]), Err(Error::Einval));
    }

    #[test]
    fn mirror_offsets() {
        assert_eq!(sb_offset(0), 64 << 10);
        assert_eq!(sb_offset(1), 64 << 20);
        assert_eq!(sb_offset(2), 256 << 30);
        assert!(!sb_copy_fits(1, 64 * MIB + 4096));
        assert!(sb_copy_fits(1, 64 * MIB + 4097));
    }

    #[test]
    fn mkfs_then_open_ctree() {
        let env = mkfs_env(128 * MIB, NODESIZE);
        // Tree blocks, then a FLUSH, then the primary with FUA and the mirror.
        let ops: Vec<&str> = env.bios.borrow().iter().map(|b| b.op).collect();
        assert_eq!(
            ops,
            ["write", "write", "write", "write", "write", "write", "write", "flush", "write_fua", "write"]
        );
        let fs = mount(&env).unwrap();
        assert!(env.violations.borrow().is_empty(), "{:?}", env.violations.borrow());
        let ids: Vec<u64> = fs.roots.borrow().keys().copied().collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 7, crate::format::DATA_RELOC_TREE_OBJECTID]);
        assert_eq!((fs.trans.generation.get(), fs.trans.last_trans_committed.get()), (1, 1));
        let sb = fs.volumes.super_copy().unwrap();
        assert_eq!(
            (sb.bytenr, sb.generation, sb.bytes_used),
            (SUPER_INFO_OFFSET, 1, 7 * u64::from(NODESIZE))
        );

        // Every tree block: on disk with a good checksum, passing the tree
        // checker, of generation 1, owned by its tree.
        for (&id, root) in fs.roots.borrow().iter() {
            let node = root.node();
            assert_eq!((node.level(), node.generation(), node.owner()), (0, 1, id));
            let raw = env.read_device(node.start, NODESIZE as usize);
            assert!(verify_csum(&raw));
            check_tree_block(&raw, NODESIZE, Some(id)).unwrap();
        }

        // Block groups: system (the chunk tree), metadata (six trees), data.
        let groups = fs.block_groups.all();
        let by_type: Vec<(u64, u64, u64)> =
            groups.iter().map(|g| (g.flags, g.length, g.used.get())).collect();
        let n = u64::from(NODESIZE);
        assert_eq!(
            by_type,
            [
                (BLOCK_GROUP_SYSTEM, 16 * MIB, n),
                (BLOCK_GROUP_METADATA, 16 * MIB, 6 * n),
                (BLOCK_GROUP_DATA, 16 * MIB, 0)
            ]
        );
        for g in &groups {
            assert_eq!(g.free_bytes(), g.length - g.used.get(), "group {}", g.start);
        }
        assert_eq!(crate::volumes::unallocated_bytes(&fs), 128 * MIB - 48 * MIB);
        assert_eq!(fs.volumes.device().bytes_used, 48 * MIB);
        let space = fs.space.get().expect("space accounting set up at mount");
        assert_eq!(space.metadata.info().bytes_used, 6 * n);

        // The fs tree: directory 256 and its ".." ref.
        let fs_items = items_of(&env, &fs, FS_TREE_OBJECTID);
        assert_eq!(fs_items.len(), 2);
        assert_eq!(fs_items[0].0, Key::new(256, INODE_ITEM_KEY, 0));
        let inode = InodeItem::read(&fs_items[0].1);
        assert_eq!((inode.mode, inode.nlink, inode.generation), (0o40755, 1, 1));
        assert_eq!(fs_items[1].0, Key::new(256, INODE_REF_KEY, 256));
        assert_eq!(InodeRef::read(&fs_items[1].1).unwrap().0, InodeRef { index: 0, name: b"..".to_vec() });
        assert_eq!(fs.root(FS_TREE_OBJECTID).highest_objectid.get(), 256);
        assert_eq!(fs.root(FS_TREE_OBJECTID).root_item.borrow().root_dirid, 256);

        // The extent tree: a METADATA_ITEM per tree block, a BLOCK_GROUP_ITEM per chunk.
        let extent_items = items_of(&env, &fs, EXTENT_TREE_OBJECTID);
        let metadata: Vec<u64> = extent_items
            .iter()
            .filter(|(k, _)| k.item_type == METADATA_ITEM_KEY)
            .map(|(k, _)| k.objectid)
            .collect();
        let mut blocks: Vec<u64> = fs.roots.borrow().values().map(|r| r.node().start).collect();
        blocks.sort();
        assert_eq!(metadata, blocks);
        assert_eq!(extent_items.iter().filter(|(k, _)| k.item_type == BLOCK_GROUP_ITEM_KEY).count(), 3);
        // The root tree: five root items and the root tree directory.
        let root_keys: Vec<Key> =
            items_of(&env, &fs, ROOT_TREE_OBJECTID).into_iter().map(|(k, _)| k).collect();
        assert_eq!(root_keys.iter().filter(|k| k.item_type == ROOT_ITEM_KEY).count(), 5);
        assert!(root_keys.contains(&Key::new(6, crate::format::DIR_ITEM_KEY, name_hash(b"default"))));
        // Chunk and dev trees agree.
        let chunk_items = items_of(&env, &fs, CHUNK_TREE_OBJECTID);
        assert_eq!(chunk_items[0].0, Key::new(1, DEV_ITEM_KEY, 1));
        assert_eq!(chunk_items.len(), 4);
        assert_eq!(items_of(&env, &fs, DEV_TREE_OBJECTID).len(), 3);
        assert!(items_of(&env, &fs, CSUM_TREE_OBJECTID).is_empty());
    }

    #[test]
    fn mkfs_with_other_nodesizes() {
        for nodesize in [4096, 65536] {
            let env = mkfs_env(128 * MIB, nodesize);
            let fs = mount(&env).unwrap();
            assert_eq!(fs.nodesize, nodesize);
            let meta = fs.block_groups.all().into_iter().find(|g| g.flags == BLOCK_GROUP_METADATA).unwrap();
            assert_eq!(meta.used.get(), 6 * u64::from(nodesize));
        }
    }

    #[test]
    fn mkfs_rejects_what_it_cannot_make() {
        let env = TestEnv::new(4096);
        assert_eq!(env.run(mkfs(dyn_env(&env), 128 * MIB, 12288, FixPolicy::None)), Err(Error::Einval));
        // 20 MiB: a 16 MiB system chunk, a 3 MiB metadata chunk, no room for data.
        assert_eq!(env.run(mkfs(dyn_env(&env), 20 * MIB, NODESIZE, FixPolicy::None)), Err(Error::Enospc));
        assert_eq!(env.count_bios("write"), 0);
    }

    #[test]
    fn an_unwritten_device_does_not_mount() {
        let env = TestEnv::new((64 * MIB + 8192) as usize);
        assert_eq!(mount(&env).err(), Some(Error::Einval));
    }

    #[test]
    fn corrupt_primary_mounts_from_the_mirror() {
        let env = mkfs_env(128 * MIB, NODESIZE);
        let mut byte = env.read_device(SUPER_INFO_OFFSET + 300, 1);
        byte[0] ^= 0xff;
        env.write_device(SUPER_INFO_OFFSET + 300, &byte);
        let fs = mount(&env).unwrap();
        assert_eq!(fs.volumes.super_copy().unwrap().bytenr, sb_offset(1));
        assert!(
            env.traces
                .borrow()
                .iter()
                .any(|t| matches!(t, TraceEvent::Note { what: "super_from_mirror", .. }))
        );
        assert_eq!(fs.roots.borrow().len(), 7);
    }

    #[test]
    fn both_copies_bad_is_an_error_not_a_panic() {
        let env = mkfs_env(128 * MIB, NODESIZE);
        for offset in [sb_offset(0), sb_offset(1)] {
            env.write_device(offset + 64, b"not a btrfs");
        }
        assert_eq!(mount(&env).err(), Some(Error::Einval));
        // A primary that cannot be read, and no mirror: the read error.
        env.fail_offsets.borrow_mut().insert(SUPER_INFO_OFFSET);
        assert_eq!(mount(&env).err(), Some(Error::Io { bytenr: SUPER_INFO_OFFSET }));
    }

    #[test]
    fn a_stale_root_is_parent_transid_verify_failed() {
        let env = mkfs_env(128 * MIB, NODESIZE);
        let mut sb = SuperBlock::decode(&env.read_device(SUPER_INFO_OFFSET, SUPER_INFO_SIZE)).unwrap();
        sb.generation = 2;
        env.write_device(SUPER_INFO_OFFSET, &sb.encode());
        let err = mount(&env).err().unwrap();
        assert_eq!(err, Error::TransidMismatch { bytenr: sb.root, wanted: 2, found: 1 });
        assert!(err.to_string().starts_with("parent transid verify failed"));
    }

    #[test]
    fn corrupt_metadata_fails_the_mount_without_a_panic() {
        let env = mkfs_env(128 * MIB, NODESIZE);
        let fs = mount(&env).unwrap();
        let extent_leaf = fs.root(EXTENT_TREE_OBJECTID).node().start;
        drop(fs);
        let good = env.read_device(extent_leaf, NODESIZE as usize);
        let mut bad = good.clone();
        bad[2000] ^= 1;
        env.write_device(extent_leaf, &bad);
        assert!(matches!(mount(&env).err(), Some(Error::Csum { bytenr, .. }) if bytenr == extent_leaf));
        env.write_device(extent_leaf, &good);

        // A super block pointing past the device, re-checksummed.
        let mut sb = SuperBlock::decode(&env.read_device(SUPER_INFO_OFFSET, SUPER_INFO_SIZE)).unwrap();
        let saved = sb.clone();
        sb.root = 200 * MIB;
        env.write_device(SUPER_INFO_OFFSET, &sb.encode());
        assert_eq!(mount(&env).err(), Some(Error::Einval));
        // A sys chunk array that is not one.
        let mut sb = saved.clone();
        sb.sys_chunk_array[8] = 1;
        env.write_device(SUPER_INFO_OFFSET, &sb.encode());
        assert_eq!(mount(&env).err(), Some(Error::Einval));
        env.write_device(SUPER_INFO_OFFSET, &saved.encode());
        let fs = mount(&env).unwrap();

        // The write-time check: a bad super block is never written.
        let mut bad_sb = saved.clone();
        bad_sb.root += 1;
        let before = env.bios.borrow().len();
        let f = fs.clone();
        let err = env.run(async move { write_all_supers(&f, &bad_sb).await }).unwrap_err();
        assert!(err.to_string().starts_with("super block corruption detected before writing it to disk"));
        assert_eq!(env.bios.borrow().len(), before);
        assert!(fs.trans.fs_error.get().is_some());
    }

    #[test]
    fn commit_super_writes_flush_then_fua_and_mounts_again() {
        let env = mkfs_env(128 * MIB, NODESIZE);
        let fs = mount(&env).unwrap();
        let before = env.bios.borrow().len();
        let f = fs.clone();
        env.run(async move { write_super_for_commit(&f, 1).await }).unwrap();
        let ops: Vec<&str> = env.bios.borrow()[before..].iter().map(|b| b.op).collect();
        assert_eq!(ops, ["flush", "write_fua", "write"]);
        let on_disk = SuperBlock::decode(&env.read_device(sb_offset(1), SUPER_INFO_SIZE)).unwrap();
        assert_eq!(
            (on_disk.bytenr, on_disk.flags & HEADER_FLAG_WRITTEN),
            (sb_offset(1), HEADER_FLAG_WRITTEN)
        );
        // mkfs filled backup slot 0; this commit slot 1.
        assert_eq!(on_disk.super_roots[1].tree_root, fs.root(ROOT_TREE_OBJECTID).node().start);
        assert_eq!(on_disk.super_roots[1].bytes_used, 7 * u64::from(NODESIZE));
        drop(fs);
        let fs = mount(&env).unwrap();
        assert_eq!(fs.volumes.super_copy().unwrap().super_roots[1].tree_root_gen, 1);

        // A failed mirror alone is fine; a failed primary is EIO and an error state.
        env.fail_offsets.borrow_mut().insert(sb_offset(1));
        let f = fs.clone();
        env.run(async move { write_super_for_commit(&f, 1).await }).unwrap();
        env.fail_offsets.borrow_mut().insert(SUPER_INFO_OFFSET);
        let f = fs.clone();
        let err = env.run(async move { write_super_for_commit(&f, 1).await });
        assert_eq!(err, Err(Error::Io { bytenr: SUPER_INFO_OFFSET }));
        assert_eq!(fs.trans.fs_error.get(), Some(crate::error::EIO));
    }

    #[test]
    fn chunks_allocated_after_mount_reach_the_space_info_and_the_super_block() {
        let env = mkfs_env(256 * MIB, NODESIZE);
        let fs = mount(&env).unwrap();
        // 10 % of 256 MiB rounds up to 32 MiB.
        let lengths: Vec<u64> = fs.block_groups.all().iter().map(|g| g.length).collect();
        assert_eq!(lengths, [32 * MIB; 3]);
        let f = fs.clone();
        let group =
            env.run(async move { crate::volumes::alloc_chunk(&f, BLOCK_GROUP_SYSTEM).await }).unwrap();
        assert_eq!((group.start, group.length), (97 * MIB, 32 * MIB));
        let space = fs.space.get().unwrap();
        assert_eq!(space.system.info().total_bytes, 64 * MIB);
        assert_eq!(space.unallocated.get(), 256 * MIB - 128 * MIB);
        // Pending: not in the sys chunk array until its items are inserted.
        let sb = fill_super_for_commit(&fs, 1).unwrap();
        assert_eq!(read_sys_array(sb.sys_chunk_array()).unwrap().len(), 1);
        let pending = fs.volumes.take_pending_chunks();
        assert_eq!(pending.len(), 1);
        let sb = fill_super_for_commit(&fs, 1).unwrap();
        assert_eq!(read_sys_array(sb.sys_chunk_array()).unwrap().len(), 2);
        assert_eq!(sb.dev_item.bytes_used, 128 * MIB);
        // Filling the device: ENOSPC, and the space info is full.
        let f = fs.clone();
        let errs = env.run(async move {
            let mut n = 0;
            while crate::volumes::alloc_chunk(&f, BLOCK_GROUP_DATA).await.is_ok() {
                n += 1;
            }
            n
        });
        assert_eq!(errs, 4);
        assert!(space.data.info().full);
    }

    /// Two leaves under a node, written by hand: the walker visits every
    /// item in order and checks each child against its pointer.
    #[test]
    fn walker_descends_nodes_and_checks_pointers() {
        let env = TestEnv::new((4 * MIB) as usize);
        let fs = FsInfo::new(dyn_env(&env), 4096, FixPolicy::None);
        let header =
            |bytenr, level| NewBlockHeader { bytenr, generation: 3, owner: 7, level, ..Default::default() };
        let mut keys = Vec::new();
        for (i, bytenr) in [MIB, MIB + 4096].into_iter().enumerate() {
            let mut leaf = vec![0u8; 4096];
            init_tree_block(&mut leaf, &header(bytenr, 0));
            for j in 0..3u64 {
                let key = Key::new(
                    crate::format::EXTENT_CSUM_OBJECTID,
                    crate::format::EXTENT_CSUM_KEY,
                    (i as u64 * 3 + j) * 4096,
                );
                insert_item_in_leaf(&mut leaf, j as usize, &key, &[0u8; 4]);
                keys.push(key);
            }
            write_header_csum(&mut leaf);
            env.write_device(bytenr, &leaf);
        }
        let mut node = vec![0u8; 4096];
        init_tree_block(&mut node, &header(MIB + 8192, 1));
        insert_ptr(&mut node, 0, &keys[0], MIB, 3);
        insert_ptr(&mut node, 1, &keys[3], MIB + 4096, 3);
        write_header_csum(&mut node);
        env.write_device(MIB + 8192, &node);

        let f = fs.clone();
        let seen = env
            .run(async move {
                let mut seen = Vec::new();
                for_each_leaf_item(&f, 7, MIB + 8192, 1, 3, |k, _| {
                    seen.push(*k);
                    Ok(())
                })
                .await
                .map(|()| seen)
            })
            .unwrap();
        assert_eq!(seen, keys);
        let f = fs.clone();
        let last =
            env.run(
                async move { find_last_key_at_most(&f, 7, MIB + 8192, 1, 3, Key::new(u64::MAX, 0, 0)).await },
            );
        assert_eq!(last, Ok(Some(keys[5])));
        let f = fs.clone();
        let target = Key { offset: keys[3].offset - 1, ..keys[3] };
        let last = env.run(async move { find_last_key_at_most(&f, 7, MIB + 8192, 1, 3, target).await });
        assert_eq!(last, Ok(Some(keys[2])));

        // A pointer promising another generation: the walk fails.
        let mut node2 = node.clone();
        crate::accessors::set_node_ptr_generation(&mut node2, 1, 4);
        write_header_csum(&mut node2);
        env.write_device(MIB + 12288, &{
            crate::accessors::set_header_bytenr(&mut node2, MIB + 12288);
            write_header_csum(&mut node2);
            node2
        });
        let f = fs.clone();
        let err = env.run(async move { for_each_leaf_item(&f, 7, MIB + 12288, 1, 3, |_, _| Ok(())).await });
        assert_eq!(err, Err(Error::TransidMismatch { bytenr: MIB + 4096, wanted: 4, found: 3 }));
    }

    /// Not run by default: mounts the image file $COWSIM_IMAGE (for
    /// example one of [`export_mkfs_image`] after Linux wrote to it) and
    /// walks every tree.
    #[test]
    #[ignore]
    fn mount_external_image() {
        let path = std::env::var("COWSIM_IMAGE").expect("set COWSIM_IMAGE");
        let image = std::fs::read(path).unwrap();
        let env = TestEnv::new(image.len());
        env.write_device(0, &image);
        let fs = mount(&env).unwrap();
        assert!(env.violations.borrow().is_empty(), "{:?}", env.violations.borrow());
        let ids: Vec<u64> = fs.roots.borrow().keys().copied().collect();
        for id in ids {
            let n = items_of(&env, &fs, id).len();
            eprintln!("tree {id}: {n} items, root {}", fs.root(id).node().start);
        }
        for g in fs.block_groups.all() {
            eprintln!(
                "block group {} len {} flags {:#x} used {} free {}",
                g.start,
                g.length,
                g.flags,
                g.used.get(),
                g.free_bytes()
            );
        }
    }

    /// Not run by default: writes a fresh mkfs image to
    /// $COWSIM_MKFS_IMAGE (default /tmp/cowsim-mkfs.img) for checking with
    /// `btrfs check` and a loop mount.
    #[test]
    #[ignore]
    fn export_mkfs_image() {
        let size = 256 * MIB;
        let env = mkfs_env(size, NODESIZE);
        let path = std::env::var("COWSIM_MKFS_IMAGE").unwrap_or_else(|_| "/tmp/cowsim-mkfs.img".to_string());
        std::fs::write(path, env.read_device(0, size as usize)).unwrap();
    }
}
