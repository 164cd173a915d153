//! The device, its chunks and device extents, after fs/btrfs/volumes.c
//! (`btrfs_create_chunk`, `find_free_dev_extent`, the chunk map) and the
//! chunk half of block-group.c (`btrfs_make_block_group`,
//! `exclude_super_stripes`, `btrfs_create_pending_block_groups`).
//!
//! A chunk is a range of logical addresses of one type (data, metadata,
//! system) backed by a device extent. Creating one takes the first hole of
//! unallocated device space that is big enough (or the largest hole), sizes
//! the chunk by the kernel's rules (`calc_chunk_size` and
//! `decide_stripe_size_regular`), records the chunk map and the device
//! extent in memory, and creates the block group. As in the kernel's
//! two-phase allocation, the items that describe it on disk (CHUNK_ITEM in
//! the chunk tree, DEV_EXTENT in the dev tree, BLOCK_GROUP_ITEM in the
//! extent tree, and the DEV_ITEM whose `bytes_used` grew) are inserted
//! later by the transaction code: [`Volumes::take_pending_chunks`] is the
//! kernel's `trans->new_bgs`, consumed by `btrfs_create_pending_block_groups`.
//!
//! Departures from the kernel, each for a reason:
//! - one device (devid 1) and the single profile only (no DUP, RAID): the
//!   engine models one NVMe device; a profile bit in the flags is EINVAL;
//! - identity chunk mapping: a chunk's logical start is its device offset
//!   (the kernel takes the next logical address after the last chunk,
//!   `find_next_chunk`, and maps it through the chunk map). Addresses of
//!   tree blocks are then device offsets, which is what
//!   `extent_io::map_block` assumes; the chunk items on disk are still
//!   real (stripe offset == logical start), so a kernel can read them;
//! - no `check_system_chunk` reservation and no `should_alloc_chunk`
//!   policy: [`alloc_chunk`] always allocates (CHUNK_ALLOC_FORCE), and
//!   deciding when is the space-info flusher's business;
//! - chunks are never removed (no balance, no `btrfs_remove_chunk`).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::block_group::BlockGroup;
use crate::disk_io::{SUPER_MIRROR_MAX, SYSTEM_CHUNK_ARRAY_SIZE, SuperBlock, sb_offset};
use crate::env::TraceEvent;
use crate::error::Error;
use crate::format::{
    BLOCK_GROUP_DATA, BLOCK_GROUP_ITEM_KEY, BLOCK_GROUP_METADATA, BLOCK_GROUP_PROFILE_MASK,
    BLOCK_GROUP_SYSTEM, BLOCK_GROUP_TYPE_MASK, BlockGroupItem, CHUNK_ITEM_KEY, CHUNK_ITEM_SIZE,
    CHUNK_TREE_OBJECTID, DEV_EXTENT_KEY, DEV_EXTENT_SIZE, DEV_ITEM_KEY, DEV_ITEM_SIZE, DEV_ITEMS_OBJECTID,
    DISK_KEY_SIZE, EXTENT_TREE_OBJECTID, FIRST_CHUNK_TREE_OBJECTID, FSID_SIZE, FixedItem, Key, SECTORSIZE,
    STRIPE_SIZE, UUID_SIZE, chunk_item_size, get_array, get_u8, get_u16, get_u32, get_u64, put_u8, put_u16,
    put_u32, put_u64,
};
use crate::fs::FsInfo;

const SZ_16M: u64 = 16 << 20;
const SZ_32M: u64 = 32 << 20;
const SZ_256M: u64 = 256 << 20;
const SZ_1G: u64 = 1 << 30;

/// `BTRFS_STRIPE_LEN`: the unit of chunk sizes and of super block exclusion.
pub const STRIPE_LEN: u64 = 64 << 10;
/// `BTRFS_DEVICE_RANGE_RESERVED`: the first MiB of a device holds no chunk
/// (boot loaders, the primary super block at 64 KiB).
pub const DEVICE_RANGE_RESERVED: u64 = 1 << 20;
/// `BTRFS_MAX_DATA_CHUNK_SIZE`.
pub const MAX_DATA_CHUNK_SIZE: u64 = 10 * SZ_1G;
/// The only device id of the engine's filesystems.
pub const DEVID: u64 = 1;

// ---------------------------------------------------------------------------
// Item payloads of the chunk and dev trees (uapi btrfs_tree.h).

/// `struct btrfs_dev_item`, 98 bytes: the DEV_ITEM of the chunk tree and
/// the `dev_item` of the super block. Also the engine's in-memory device
/// (`struct btrfs_device`): `bytes_used` is the sum of its device extents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevItem {
    pub devid: u64,
    pub total_bytes: u64,
    pub bytes_used: u64,
    pub io_align: u32,
    pub io_width: u32,
    pub sector_size: u32,
    pub dev_type: u64,
    pub generation: u64,
    pub start_offset: u64,
    pub dev_group: u32,
    pub seek_speed: u8,
    pub bandwidth: u8,
    pub uuid: [u8; UUID_SIZE],
    pub fsid: [u8; FSID_SIZE],
}

impl FixedItem for DevItem {
    const SIZE: usize = DEV_ITEM_SIZE;
    fn read(buf: &[u8]) -> Self {
        assert!(buf.len() >= Self::SIZE, "dev item too short");
        DevItem {
            devid: get_u64(buf, 0),
            total_bytes: get_u64(buf, 8),
            bytes_used: get_u64(buf, 16),
            io_align: get_u32(buf, 24),
            io_width: get_u32(buf, 28),
            sector_size: get_u32(buf, 32),
            dev_type: get_u64(buf, 36),
            generation: get_u64(buf, 44),
            start_offset: get_u64(buf, 52),
            dev_group: get_u32(buf, 60),
            seek_speed: get_u8(buf, 64),
            bandwidth: get_u8(buf, 65),
            uuid: get_array(buf, 66),
            fsid: get_array(buf, 82),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        assert!(buf.len() >= Self::SIZE, "dev item buffer too short");
        put_u64(buf, 0, self.devid);
        put_u64(buf, 8, self.total_bytes);
        put_u64(buf, 16, self.bytes_used);
        put_u32(buf, 24, self.io_align);
        put_u32(buf, 28, self.io_width);
        put_u32(buf, 32, self.sector_size);
        put_u64(buf, 36, self.dev_type);
        put_u64(buf, 44, self.generation);
        put_u64(buf, 52, self.start_offset);
        put_u32(buf, 60, self.dev_group);
        put_u8(buf, 64, self.seek_speed);
        put_u8(buf, 65, self.bandwidth);
        buf[66..82].copy_from_slice(&self.uuid);
        buf[82..98].copy_from_slice(&self.fsid);
    }
}

/// `struct btrfs_stripe`, 32 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stripe {
    pub devid: u64,
    /// Device offset of the stripe.
    pub offset: u64,
    pub dev_uuid: [u8; UUID_SIZE],
}

/// `struct btrfs_chunk` with its stripes: 48 bytes + 32 per stripe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChunkItem {
    pub length: u64,
    /// Always the extent tree's objectid (2).
    pub owner: u64,
    pub stripe_len: u64,
    /// BLOCK_GROUP_{DATA,METADATA,SYSTEM} and the profile bits.
    pub chunk_type: u64,
    pub io_align: u32,
    pub io_width: u32,
    pub sector_size: u32,
    pub sub_stripes: u16,
    pub stripes: Vec<Stripe>,
}

impl ChunkItem {
    /// A single-profile chunk of `length` bytes at device offset `physical`,
    /// as `btrfs_chunk_alloc_add_chunk_item` fills it.
    pub fn single(chunk_type: u64, length: u64, physical: u64, dev_uuid: [u8; UUID_SIZE]) -> ChunkItem {
        ChunkItem {
            length,
            owner: EXTENT_TREE_OBJECTID,
            stripe_len: STRIPE_LEN,
            chunk_type,
            io_align: STRIPE_LEN as u32,
            io_width: STRIPE_LEN as u32,
            sector_size: SECTORSIZE,
            sub_stripes: 1,
            stripes: vec![Stripe { devid: DEVID, offset: physical, dev_uuid }],
        }
    }

    pub fn encoded_len(&self) -> usize {
        chunk_item_size(self.stripes.len() as u16)
    }

    /// Decode the chunk at the start of `buf`; returns it and its length.
    /// A chunk with no stripe or shorter than its stripes need is EINVAL
    /// (the kernel's sys array and tree checks); the caller has the key.
    pub fn read(buf: &[u8]) -> Result<(ChunkItem, usize), Error> {
        if buf.len() < CHUNK_ITEM_SIZE - STRIPE_SIZE {
            return Err(Error::Einval);
        }
        let num_stripes = get_u16(buf, 44);
        let len = chunk_item_size(num_stripes);
        if num_stripes == 0 || buf.len() < len {
            return Err(Error::Einval);
        }
        let stripes = (0..num_stripes as usize)
            .map(|i| {
                let s = &buf[48 + i * STRIPE_SIZE..];
                Stripe { devid: get_u64(s, 0), offset: get_u64(s, 8), dev_uuid: get_array(s, 16) }
            })
            .collect();
        let chunk = ChunkItem {
            length: get_u64(buf, 0),
            owner: get_u64(buf, 8),
            stripe_len: get_u64(buf, 16),
            chunk_type: get_u64(buf, 24),
            io_align: get_u32(buf, 32),
            io_width: get_u32(buf, 36),
            sector_size: get_u32(buf, 40),
            sub_stripes: get_u16(buf, 46),
            stripes,
        };
        Ok((chunk, len))
    }

    pub fn write(&self, buf: &mut [u8]) -> usize {
        let len = self.encoded_len();
        assert!(!self.stripes.is_empty(), "chunk without stripes");
        assert!(buf.len() >= len, "chunk item buffer too short");
        put_u64(buf, 0, self.length);
        put_u64(buf, 8, self.owner);
        put_u64(buf, 16, self.stripe_len);
        put_u64(buf, 24, self.chunk_type);
        put_u32(buf, 32, self.io_align);
        put_u32(buf, 36, self.io_width);
        put_u32(buf, 40, self.sector_size);
        put_u16(buf, 44, self.stripes.len() as u16);
        put_u16(buf, 46, self.sub_stripes);
        for (i, s) in self.stripes.iter().enumerate() {
            let b = &mut buf[48 + i * STRIPE_SIZE..];
            put_u64(b, 0, s.devid);
            put_u64(b, 8, s.offset);
            b[16..32].copy_from_slice(&s.dev_uuid);
        }
        len
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.encoded_len()];
        self.write(&mut v);
        v
    }
}

/// `struct btrfs_dev_extent`, 48 bytes: which chunk a device range backs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DevExtent {
    /// Always the chunk tree's objectid (3).
    pub chunk_tree: u64,
    /// Always FIRST_CHUNK_TREE_OBJECTID (256).
    pub chunk_objectid: u64,
    /// Logical start of the chunk.
    pub chunk_offset: u64,
    pub length: u64,
    pub chunk_tree_uuid: [u8; UUID_SIZE],
}

impl DevExtent {
    pub fn new(chunk_offset: u64, length: u64, chunk_tree_uuid: [u8; UUID_SIZE]) -> DevExtent {
        DevExtent {
            chunk_tree: CHUNK_TREE_OBJECTID,
            chunk_objectid: FIRST_CHUNK_TREE_OBJECTID,
            chunk_offset,
            length,
            chunk_tree_uuid,
        }
    }
}

impl FixedItem for DevExtent {
    const SIZE: usize = DEV_EXTENT_SIZE;
    fn read(buf: &[u8]) -> Self {
        assert!(buf.len() >= Self::SIZE, "dev extent too short");
        DevExtent {
            chunk_tree: get_u64(buf, 0),
            chunk_objectid: get_u64(buf, 8),
            chunk_offset: get_u64(buf, 16),
            length: get_u64(buf, 24),
            chunk_tree_uuid: get_array(buf, 32),
        }
    }
    fn write(&self, buf: &mut [u8]) {
        put_u64(buf, 0, self.chunk_tree);
        put_u64(buf, 8, self.chunk_objectid);
        put_u64(buf, 16, self.chunk_offset);
        put_u64(buf, 24, self.length);
        buf[32..48].copy_from_slice(&self.chunk_tree_uuid);
    }
}

/// The CHUNK_ITEM payload of a chunk (`btrfs_chunk_alloc_add_chunk_item`).
pub fn chunk_item_bytes(chunk: &ChunkItem) -> Vec<u8> {
    chunk.to_bytes()
}

/// The DEV_EXTENT payload for a chunk at `chunk_offset` of `length` bytes
/// (`btrfs_insert_dev_extent`).
pub fn dev_extent_bytes(chunk_offset: u64, length: u64, chunk_tree_uuid: [u8; UUID_SIZE]) -> Vec<u8> {
    DevExtent::new(chunk_offset, length, chunk_tree_uuid).to_bytes()
}

/// Key of a chunk's CHUNK_ITEM in the chunk tree.
pub fn chunk_item_key(logical: u64) -> Key {
    Key::new(FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM_KEY, logical)
}

/// Key of a DEV_EXTENT in the dev tree.
pub fn dev_extent_key(devid: u64, physical: u64) -> Key {
    Key::new(devid, DEV_EXTENT_KEY, physical)
}

/// Key of a DEV_ITEM in the chunk tree.
pub fn dev_item_key(devid: u64) -> Key {
    Key::new(DEV_ITEMS_OBJECTID, DEV_ITEM_KEY, devid)
}

/// Key of a BLOCK_GROUP_ITEM in the extent tree.
pub fn block_group_item_key(start: u64, length: u64) -> Key {
    Key::new(start, BLOCK_GROUP_ITEM_KEY, length)
}

/// The BLOCK_GROUP_ITEM payload of a block group (`insert_block_group_item`).
pub fn block_group_item_bytes(group: &BlockGroup) -> Vec<u8> {
    BlockGroupItem { used: group.used.get(), chunk_objectid: FIRST_CHUNK_TREE_OBJECTID, flags: group.flags }
        .to_bytes()
}

// ---------------------------------------------------------------------------
// Chunk sizing (space-info.c `calc_chunk_size`, volumes.c
// `init_alloc_chunk_ctl_policy_regular` and `decide_stripe_size_regular`).

/// `calc_chunk_size` on a regular device: the space info's chunk size.
/// Data 10 GiB (`BTRFS_MAX_DATA_CHUNK_SIZE`), system 32 MiB, metadata
/// 1 GiB above 50 GiB of writable device bytes and 256 MiB otherwise.
pub fn calc_chunk_size(total_rw_bytes: u64, flags: u64) -> u64 {
    if flags & BLOCK_GROUP_DATA != 0 {
        MAX_DATA_CHUNK_SIZE
    } else if flags & BLOCK_GROUP_SYSTEM != 0 {
        SZ_32M
    } else if total_rw_bytes > 50 * SZ_1G {
        SZ_1G
    } else {
        SZ_256M
    }
}

/// The device extent a single-profile chunk of type `flags` would want
/// (`ctl->max_stripe_size`): the chunk size, at most 1 GiB.
pub fn max_stripe_size(total_rw_bytes: u64, flags: u64) -> u64 {
    calc_chunk_size(total_rw_bytes, flags).min(SZ_1G)
}

/// `ctl->max_chunk_size`: the chunk size, at most 10 % of the writable
/// device bytes (`mult_perc(total_rw_bytes, 10)`).
pub fn max_chunk_size(total_rw_bytes: u64, flags: u64) -> u64 {
    (total_rw_bytes * 10 / 100).min(calc_chunk_size(total_rw_bytes, flags))
}

/// `decide_stripe_size_regular` for the single profile (one data stripe):
/// the chunk size given `max_avail`, the device extent found (the wanted
/// size, or the largest hole if none was that big). Above the 10 % cap it
/// is cut to the cap rounded up to 16 MiB; never above 1 GiB; aligned down
/// to [`STRIPE_LEN`].
pub fn decide_chunk_size(total_rw_bytes: u64, flags: u64, max_avail: u64) -> u64 {
    let max_chunk = max_chunk_size(total_rw_bytes, flags);
    let mut stripe_size = max_avail;
    if stripe_size > max_chunk {
        stripe_size = stripe_size.min(max_chunk.next_multiple_of(SZ_16M));
    }
    stripe_size = stripe_size.min(SZ_1G);
    stripe_size - stripe_size % STRIPE_LEN
}

// ---------------------------------------------------------------------------
// Super block stripes inside block groups.

/// The ranges of `[start, start + length)` a block group must never
/// allocate because super block copies live there (`exclude_super_stripes`
/// with identity mapping): for each mirror inside the group, the
/// [`STRIPE_LEN`] stripe that holds it (`btrfs_rmap_block`), clipped to the
/// group; and the part of the group below 64 KiB (none with chunks at
/// 1 MiB and above).
pub fn super_stripes(start: u64, length: u64) -> Vec<(u64, u64)> {
    let end = start + length;
    let mut ranges = Vec::new();
    if start < sb_offset(0) {
        ranges.push((start, sb_offset(0).min(end) - start));
    }
    for mirror in 0..SUPER_MIRROR_MAX {
        let physical = sb_offset(mirror);
        if physical < start || physical >= end {
            continue;
        }
        let stripe_start = start + (physical - start) / STRIPE_LEN * STRIPE_LEN;
        let clipped_start = stripe_start.max(ranges.last().map_or(start, |&(s, l)| s + l));
        let len = (stripe_start + STRIPE_LEN).min(end).saturating_sub(clipped_start);
        if len > 0 {
            ranges.push((clipped_start, len));
        }
    }
    ranges
}

/// Remove the super block stripes from a new block group's free space;
/// returns the bytes removed (the kernel's `bytes_super`, which space-info
/// counts as read-only). The group must be entirely free.
pub fn exclude_super_stripes(group: &BlockGroup) -> u64 {
    let mut bytes_super = 0;
    for (start, len) in super_stripes(group.start, group.length) {
        group.exclude(start, len);
        bytes_super += len;
    }
    bytes_super
}

// ---------------------------------------------------------------------------
// The volumes state.

/// A chunk in memory (`struct btrfs_chunk_map`): its logical start and item.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkMap {
    pub start: u64,
    pub item: ChunkItem,
}

impl ChunkMap {
    pub fn length(&self) -> u64 {
        self.item.length
    }
    pub fn flags(&self) -> u64 {
        self.item.chunk_type
    }
    /// Device offset of the (single) stripe.
    pub fn physical(&self) -> u64 {
        self.item.stripes[0].offset
    }
    pub fn end(&self) -> u64 {
        self.start + self.item.length
    }
}

/// A chunk created in memory whose items are not in the trees yet
/// (`trans->new_bgs`). The transaction code inserts, before the commit
/// writes the super block: [`PendingChunk::chunk_item`] into the chunk tree,
/// [`PendingChunk::dev_extent_item`] into the dev tree, the block group's
/// BLOCK_GROUP_ITEM ([`block_group_item_key`], [`block_group_item_bytes`]
/// with the group's `used` at that time) into the extent tree, and the
/// updated DEV_ITEM ([`Volumes::dev_item`]) into the chunk tree
/// (`btrfs_update_device`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingChunk {
    pub map: ChunkMap,
    pub chunk_tree_uuid: [u8; UUID_SIZE],
}

impl PendingChunk {
    pub fn chunk_item(&self) -> (Key, Vec<u8>) {
        (chunk_item_key(self.map.start), chunk_item_bytes(&self.map.item))
    }
    pub fn dev_extent_item(&self) -> (Key, Vec<u8>) {
        (
            dev_extent_key(DEVID, self.map.physical()),
            dev_extent_bytes(self.map.start, self.map.length(), self.chunk_tree_uuid),
        )
    }
    pub fn block_group_key(&self) -> Key {
        block_group_item_key(self.map.start, self.map.length())
    }
}

/// The filesystem's device and chunk state (the kernel's `fs_devices`,
/// `btrfs_device`, `fs_info->mapping_tree`, `fs_info->free_chunk_space`,
/// `fs_info->chunk_tree_uuid`, `fs_info->super_copy`).
#[derive(Default)]
pub struct Volumes {
    inner: RefCell<VolumesInner>,
    /// `fs_info->free_chunk_space`: the device's `total_bytes - bytes_used`,
    /// shared with the space infos (`SpaceInfoHandle::new`). As in the
    /// kernel it includes the reserved first MiB, which no chunk can use.
    free_chunk_space: Rc<Cell<u64>>,
}

#[derive(Default)]
struct VolumesInner {
    /// The one device; `None` until mkfs or mount sets it.
    device: Option<DevItem>,
    chunk_tree_uuid: [u8; UUID_SIZE],
    /// Chunks by logical start.
    chunks: BTreeMap<u64, ChunkMap>,
    /// Device extents by device offset.
    dev_extents: BTreeMap<u64, DevExtent>,
    /// Logical starts of chunks whose items are not yet inserted, in
    /// creation order.
    pending: Vec<u64>,
    /// The super block as last written or read (`fs_info->super_copy`).
    super_copy: Option<SuperBlock>,
    /// Slot of the next backup root in the super block (`backup_root_index`).
    backup_root_index: usize,
}

impl Volumes {
    /// Set the device (from mkfs, or the chunk tree's DEV_ITEM at mount).
    pub fn init_device(&self, device: DevItem, chunk_tree_uuid: [u8; UUID_SIZE]) {
        assert!(device.devid == DEVID, "device {} is not devid {DEVID}", device.devid);
        assert!(device.bytes_used <= device.total_bytes);
        let mut inner = self.inner.borrow_mut();
        assert!(inner.device.is_none(), "device set twice");
        inner.device = Some(device);
        inner.chunk_tree_uuid = chunk_tree_uuid;
        drop(inner);
        self.free_chunk_space.set(device.total_bytes - device.bytes_used);
    }

    /// The device as its DEV_ITEM says now (`bytes_used` up to date).
    pub fn device(&self) -> DevItem {
        self.inner.borrow().device.expect("no device yet")
    }

    /// The chunk tree's DEV_ITEM: key and payload (`btrfs_update_device`).
    pub fn dev_item(&self) -> (Key, Vec<u8>) {
        let device = self.device();
        (dev_item_key(device.devid), device.to_bytes())
    }

    /// `fs_devices->total_rw_bytes`.
    pub fn total_rw_bytes(&self) -> u64 {
        self.inner.borrow().device.map_or(0, |d| d.total_bytes)
    }

    /// `fs_info->free_chunk_space`, shared: hand it to the space infos.
    pub fn free_chunk_space(&self) -> Rc<Cell<u64>> {
        self.free_chunk_space.clone()
    }

    pub fn chunk_tree_uuid(&self) -> [u8; UUID_SIZE] {
        self.inner.borrow().chunk_tree_uuid
    }

    /// Every chunk, by logical start.
    pub fn chunks(&self) -> Vec<ChunkMap> {
        self.inner.borrow().chunks.values().cloned().collect()
    }

    /// The chunk containing `logical` (`btrfs_get_chunk_map`).
    pub fn chunk_map(&self, logical: u64) -> Option<ChunkMap> {
        let inner = self.inner.borrow();
        let (_, map) = inner.chunks.range(..=logical).next_back()?;
        (logical < map.end()).then(|| map.clone())
    }

    /// Device offset of `len` bytes at `logical` (`btrfs_map_block`, one
    /// stripe); `None` when the range is not inside one chunk.
    pub fn map_logical(&self, logical: u64, len: u64) -> Option<u64> {
        let map = self.chunk_map(logical)?;
        (logical + len <= map.end()).then(|| map.physical() + (logical - map.start))
    }

    /// Device extents by device offset.
    pub fn dev_extents(&self) -> Vec<(u64, DevExtent)> {
        self.inner.borrow().dev_extents.iter().map(|(&p, &e)| (p, e)).collect()
    }

    /// Record an existing chunk and its device extent (mkfs, mount). The
    /// device's `bytes_used` is not changed: at mount it comes from the
    /// DEV_ITEM, and mkfs allocates through [`Volumes::create_chunk_map`].
    pub fn add_chunk(&self, map: ChunkMap) -> Result<(), Error> {
        let mut inner = self.inner.borrow_mut();
        let overlaps = |m: &ChunkMap| m.start < map.end() && map.start < m.end();
        if map.length() == 0 || inner.chunks.values().any(overlaps) {
            return Err(Error::Einval);
        }
        inner.chunks.insert(map.start, map);
        Ok(())
    }

    /// Record a device extent read from the dev tree at mount.
    pub fn add_dev_extent(&self, physical: u64, extent: DevExtent) -> Result<(), Error> {
        let mut inner = self.inner.borrow_mut();
        let end = physical.checked_add(extent.length).ok_or(Error::Einval)?;
        let overlaps = inner.dev_extents.iter().any(|(&p, e)| p < end && physical < p + e.length);
        if extent.length == 0 || overlaps {
            return Err(Error::Einval);
        }
        inner.dev_extents.insert(physical, extent);
        Ok(())
    }

    /// `find_free_dev_extent`: the first hole of at least `num_bytes` at or
    /// after the reserved first MiB, as `Ok((start, num_bytes))`; otherwise
    /// the largest hole as `Err((start, size))` (the kernel's -ENOSPC with
    /// `max_avail`).
    pub fn find_free_dev_extent(&self, num_bytes: u64) -> Result<(u64, u64), (u64, u64)> {
        let inner = self.inner.borrow();
        let end = inner.device.map_or(0, |d| d.total_bytes);
        let mut search_start = DEVICE_RANGE_RESERVED;
        let (mut max_start, mut max_size) = (search_start, 0u64);
        // The holes before each extent, then the tail of the device.
        let extents = inner.dev_extents.iter().map(|(&p, e)| (p, p + e.length));
        for (hole_end, next_start) in extents.chain(std::iter::once((end, end))) {
            let hole_end = hole_end.min(end);
            if hole_end > search_start {
                let hole = hole_end - search_start;
                if hole > max_size {
                    (max_start, max_size) = (search_start, hole);
                }
                if hole >= num_bytes {
                    return Ok((search_start, num_bytes));
                }
            }
            search_start = search_start.max(next_start);
        }
        Err((max_start, max_size))
    }

    /// Phase 1 of `btrfs_create_chunk` without the block group: size the
    /// chunk, take its device extent, record the chunk map and the device
    /// extent, charge the device, and queue the chunk as pending. ENOSPC
    /// when no hole of at least [`STRIPE_LEN`] is left; EINVAL for flags
    /// that are not exactly one type with the single profile.
    pub fn create_chunk_map(&self, flags: u64) -> Result<ChunkMap, Error> {
        let kind = flags & BLOCK_GROUP_TYPE_MASK;
        let valid_kind =
            kind == BLOCK_GROUP_DATA || kind == BLOCK_GROUP_METADATA || kind == BLOCK_GROUP_SYSTEM;
        if !valid_kind || flags & BLOCK_GROUP_PROFILE_MASK != 0 || flags & !BLOCK_GROUP_TYPE_MASK != 0 {
            return Err(Error::Einval);
        }
        let device = self.device();
        let total_rw_bytes = device.total_bytes;
        // gather_device_info: a device with less than one stripe free is
        // skipped; then no device is left and create_chunk fails.
        if device.total_bytes - device.bytes_used < STRIPE_LEN {
            return Err(Error::Enospc);
        }
        let want = max_stripe_size(total_rw_bytes, flags);
        let (physical, max_avail) = match self.find_free_dev_extent(want) {
            Ok(found) => found,
            Err(largest) => largest,
        };
        if max_avail < STRIPE_LEN {
            return Err(Error::Enospc);
        }
        let length = decide_chunk_size(total_rw_bytes, flags, max_avail);
        assert!(length >= STRIPE_LEN && length <= max_avail);
        let map = ChunkMap { start: physical, item: ChunkItem::single(flags, length, physical, device.uuid) };
        let mut inner = self.inner.borrow_mut();
        let extent = DevExtent::new(map.start, length, inner.chunk_tree_uuid);
        assert!(inner.chunks.insert(map.start, map.clone()).is_none(), "chunk at {physical} exists");
        assert!(inner.dev_extents.insert(physical, extent).is_none(), "dev extent at {physical} exists");
        inner.pending.push(map.start);
        let device = inner.device.as_mut().expect("device checked above");
        device.bytes_used += length;
        drop(inner);
        self.free_chunk_space.set(self.free_chunk_space.get() - length);
        Ok(map)
    }

    /// The chunks created since the last call, whose items the transaction
    /// code must now insert (`btrfs_create_pending_block_groups`).
    pub fn take_pending_chunks(&self) -> Vec<PendingChunk> {
        let mut inner = self.inner.borrow_mut();
        let starts = std::mem::take(&mut inner.pending);
        let uuid = inner.chunk_tree_uuid;
        starts.iter().map(|s| PendingChunk { map: inner.chunks[s].clone(), chunk_tree_uuid: uuid }).collect()
    }

    /// Chunks created and not yet taken by [`Volumes::take_pending_chunks`].
    pub fn pending_chunks(&self) -> usize {
        self.inner.borrow().pending.len()
    }

    /// The super block's `sys_chunk_array`: every SYSTEM chunk whose item is
    /// in the chunk tree (not pending), as key + chunk item, in logical
    /// order (`btrfs_add_system_chunk`). EFBIG when they do not fit in
    /// 2048 bytes (the kernel's -EFBIG).
    pub fn system_chunk_array(&self) -> Result<Vec<u8>, Error> {
        let inner = self.inner.borrow();
        let mut array = Vec::new();
        for map in inner.chunks.values() {
            if map.flags() & BLOCK_GROUP_SYSTEM == 0 || inner.pending.contains(&map.start) {
                continue;
            }
            array.extend_from_slice(&chunk_item_key(map.start).to_bytes());
            array.extend_from_slice(&map.item.to_bytes());
        }
        if array.len() > SYSTEM_CHUNK_ARRAY_SIZE {
            return Err(Error::Efbig);
        }
        Ok(array)
    }

    /// `fs_info->super_copy`.
    pub fn super_copy(&self) -> Option<SuperBlock> {
        self.inner.borrow().super_copy.clone()
    }

    pub fn set_super_copy(&self, sb: SuperBlock) {
        self.inner.borrow_mut().super_copy = Some(sb);
    }

    /// The backup root slot the next commit fills, and advance it
    /// (`backup_super_roots`).
    pub(crate) fn next_backup_root_index(&self) -> usize {
        let mut inner = self.inner.borrow_mut();
        let index = inner.backup_root_index;
        inner.backup_root_index = (index + 1) % crate::disk_io::NUM_BACKUP_ROOTS;
        index
    }

    pub(crate) fn set_backup_root_index(&self, index: usize) {
        self.inner.borrow_mut().backup_root_index = index % crate::disk_io::NUM_BACKUP_ROOTS;
    }
}

/// Unallocated device bytes (`fs_info->free_chunk_space`).
pub fn unallocated_bytes(fs: &FsInfo) -> u64 {
    fs.volumes.free_chunk_space.get()
}

/// `btrfs_make_block_group` for a chunk just created: the block group with
/// the super block stripes excluded, in the filesystem's cache and, once
/// the space infos exist, in its space info (`btrfs_add_bg_to_space_info`),
/// whose copy of the unallocated bytes follows ours.
pub fn make_block_group(fs: &FsInfo, map: &ChunkMap) -> Rc<BlockGroup> {
    let group = BlockGroup::new(map.start, map.length(), map.flags());
    let bytes_super = exclude_super_stripes(&group);
    let group = fs.block_groups.add(group);
    if let Some(space) = fs.space.get() {
        space.unallocated.set(unallocated_bytes(fs));
        space.for_flags(map.flags()).add_block_group(map.length(), 0, bytes_super);
    }
    group
}

/// `btrfs_create_chunk`: a new chunk of type `flags` (exactly one of
/// BLOCK_GROUP_DATA, _METADATA, _SYSTEM; single profile) from unallocated
/// device space, its block group in `fs.block_groups`, its items pending.
/// ENOSPC when the device is full.
pub fn create_chunk(fs: &FsInfo, flags: u64) -> Result<Rc<BlockGroup>, Error> {
    let map = fs.volumes.create_chunk_map(flags)?;
    let group = make_block_group(fs, &map);
    fs.env.trace(TraceEvent::Note { what: "alloc_chunk", a: map.start, b: map.length(), c: flags });
    Ok(group)
}

/// `btrfs_chunk_alloc` with CHUNK_ALLOC_FORCE: [`create_chunk`] for the
/// callers that run in tasks (the space-info flusher, the transaction
/// code); on ENOSPC the type's space info is marked full. Never suspends
/// today; async so that a later `check_system_chunk` (which may need a
/// system chunk first) fits.
pub async fn alloc_chunk(fs: &FsInfo, flags: u64) -> Result<Rc<BlockGroup>, Error> {
    let result = create_chunk(fs, flags);
    if matches!(result, Err(Error::Enospc))
        && let Some(space) = fs.space.get()
    {
        space.for_flags(flags).set_full(true);
    }
    result
}

/// Parse a `sys_chunk_array` (`btrfs_read_sys_array`): CHUNK_ITEM keys and
/// chunk items back to back. EINVAL for another key type, a truncated
/// entry or a chunk without stripes.
pub fn read_sys_array(array: &[u8]) -> Result<Vec<ChunkMap>, Error> {
    let mut maps = Vec::new();
    let mut cur = 0usize;
    while cur < array.len() {
        if cur + DISK_KEY_SIZE > array.len() {
            return Err(Error::Einval);
        }
        let key = Key::read(&array[cur..]);
        if key.item_type != CHUNK_ITEM_KEY {
            return Err(Error::Einval);
        }
        cur += DISK_KEY_SIZE;
        let (item, len) = ChunkItem::read(&array[cur..])?;
        cur += len;
        maps.push(ChunkMap { start: key.offset, item });
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fix::FixPolicy;
    use crate::testenv::TestEnv;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn fs_with_device(total_bytes: u64) -> Rc<FsInfo> {
        let fs = FsInfo::new(TestEnv::new(4096), 16384, FixPolicy::None);
        let device = DevItem { devid: DEVID, total_bytes, uuid: [7; 16], ..Default::default() };
        fs.volumes.init_device(device, [9; 16]);
        fs
    }

    #[test]
    fn payloads_round_trip_and_match_a_real_chunk_item() {
        // (256 CHUNK_ITEM 5242880) of a real mkfs.btrfs 6.2 image, made
        // by the kernel's rules: METADATA|single, 8 MiB.
        let real = "000080000000000002000000000000000000010000000000040000000000000000000100000001000010000001000100010000000000000000005000000000008e502c29097642faaad428030f08dfb7";
        let real: Vec<u8> =
            (0..real.len() / 2).map(|i| u8::from_str_radix(&real[2 * i..2 * i + 2], 16).unwrap()).collect();
        let (chunk, len) = ChunkItem::read(&real).unwrap();
        assert_eq!(len, 80);
        let uuid = chunk.stripes[0].dev_uuid;
        assert_eq!(chunk, ChunkItem::single(BLOCK_GROUP_METADATA, 8 * MIB, 5 * MIB, uuid));
        assert_eq!(chunk_item_bytes(&chunk), real);

        let dev = DevItem {
            devid: 1,
            total_bytes: GIB,
            bytes_used: 20 * MIB,
            io_align: 4096,
            ..Default::default()
        };
        assert_eq!(DevItem::read(&dev.to_bytes()), dev);
        assert_eq!(dev.to_bytes().len(), 98);
        let de = DevExtent::new(5 * MIB, 8 * MIB, [3; 16]);
        assert_eq!(DevExtent::read(&dev_extent_bytes(5 * MIB, 8 * MIB, [3; 16])), de);
        assert!(ChunkItem::read(&real[..79]).is_err());
        let mut no_stripes = real.clone();
        no_stripes[44] = 0;
        assert!(ChunkItem::read(&no_stripes).is_err());
    }

    #[test]
    fn chunk_sizes_follow_the_kernel() {
        // Large device: 256 MiB metadata, 1 GiB data, 32 MiB system.
        let big = 20 * GIB;
        assert_eq!(
            decide_chunk_size(big, BLOCK_GROUP_METADATA, max_stripe_size(big, BLOCK_GROUP_METADATA)),
            256 * MIB
        );
        assert_eq!(decide_chunk_size(big, BLOCK_GROUP_DATA, max_stripe_size(big, BLOCK_GROUP_DATA)), GIB);
        assert_eq!(
            decide_chunk_size(big, BLOCK_GROUP_SYSTEM, max_stripe_size(big, BLOCK_GROUP_SYSTEM)),
            32 * MIB
        );
        // Above 50 GiB metadata chunks are 1 GiB.
        assert_eq!(max_stripe_size(100 * GIB, BLOCK_GROUP_METADATA), GIB);
        assert_eq!(max_stripe_size(50 * GIB, BLOCK_GROUP_METADATA), 256 * MIB);
        // Small devices: 10 % of the device, rounded up to 16 MiB.
        assert_eq!(decide_chunk_size(GIB, BLOCK_GROUP_METADATA, 256 * MIB), 112 * MIB);
        assert_eq!(decide_chunk_size(2 * GIB, BLOCK_GROUP_METADATA, 256 * MIB), 208 * MIB);
        assert_eq!(decide_chunk_size(128 * MIB, BLOCK_GROUP_SYSTEM, 32 * MIB), 16 * MIB);
        // A hole smaller than wanted gives a smaller chunk, stripe aligned.
        assert_eq!(decide_chunk_size(big, BLOCK_GROUP_DATA, 300 * MIB + 12345), 300 * MIB);
    }

    #[test]
    fn alloc_chunk_sizes_and_accounting() {
        let fs = fs_with_device(20 * GIB);
        assert_eq!(unallocated_bytes(&fs), 20 * GIB);
        let meta = create_chunk(&fs, BLOCK_GROUP_METADATA).unwrap();
        assert_eq!((meta.start, meta.length, meta.flags), (MIB, 256 * MIB, BLOCK_GROUP_METADATA));
        let data = create_chunk(&fs, BLOCK_GROUP_DATA).unwrap();
        assert_eq!((data.start, data.length), (257 * MIB, GIB));
        let sys = create_chunk(&fs, BLOCK_GROUP_SYSTEM).unwrap();
        assert_eq!(sys.length, 32 * MIB);
        assert_eq!(unallocated_bytes(&fs), 20 * GIB - 256 * MIB - GIB - 32 * MIB);
        assert_eq!(fs.volumes.device().bytes_used, 256 * MIB + GIB + 32 * MIB);
        assert_eq!(fs.block_groups.all().len(), 3);
        // The metadata chunk covers the mirror at 64 MiB: one stripe excluded.
        assert_eq!(meta.free_bytes(), 256 * MIB - STRIPE_LEN);
        assert_eq!(data.free_bytes(), GIB);
        // Three chunks pending, with their items.
        let pending = fs.volumes.take_pending_chunks();
        assert_eq!(pending.len(), 3);
        assert_eq!(fs.volumes.pending_chunks(), 0);
        let (key, item) = pending[0].chunk_item();
        assert_eq!(key, Key::new(256, CHUNK_ITEM_KEY, MIB));
        assert_eq!(ChunkItem::read(&item).unwrap().0.length, 256 * MIB);
        let (key, item) = pending[1].dev_extent_item();
        assert_eq!(key, Key::new(1, DEV_EXTENT_KEY, 257 * MIB));
        assert_eq!(DevExtent::read(&item).chunk_offset, 257 * MIB);
        assert_eq!(pending[2].block_group_key(), Key::new(sys.start, BLOCK_GROUP_ITEM_KEY, 32 * MIB));
        assert_eq!(BlockGroupItem::read(&block_group_item_bytes(&sys)).flags, BLOCK_GROUP_SYSTEM);
        // Only the committed system chunk is in the sys array.
        let array = fs.volumes.system_chunk_array().unwrap();
        let maps = read_sys_array(&array).unwrap();
        assert_eq!(maps.len(), 1);
        assert_eq!((maps[0].start, maps[0].length()), (sys.start, 32 * MIB));
        assert_eq!(fs.volumes.map_logical(data.start + 4096, 4096), Some(data.start + 4096));
        assert_eq!(fs.volumes.map_logical(data.start + GIB - 4096, 8192), None);
    }

    #[test]
    fn ten_percent_cap_on_a_small_device() {
        let fs = fs_with_device(GIB);
        let meta = create_chunk(&fs, BLOCK_GROUP_METADATA).unwrap();
        assert_eq!(meta.length, 112 * MIB);
        let data = create_chunk(&fs, BLOCK_GROUP_DATA).unwrap();
        assert_eq!(data.length, 112 * MIB);
    }

    #[test]
    fn enospc_when_the_device_is_full() {
        let fs = fs_with_device(100 * MIB);
        let mut lengths = Vec::new();
        loop {
            match create_chunk(&fs, BLOCK_GROUP_DATA) {
                Ok(group) => lengths.push(group.length),
                Err(e) => {
                    assert_eq!(e, Error::Enospc);
                    break;
                }
            }
            assert!(lengths.len() < 100, "allocation never ends");
        }
        // 10 % of 100 MiB rounds up to 16 MiB: six chunks and a 3 MiB tail.
        assert_eq!(lengths, [16 * MIB, 16 * MIB, 16 * MIB, 16 * MIB, 16 * MIB, 16 * MIB, 3 * MIB]);
        // Only the reserved first MiB is left, and it counts as unallocated
        // as in the kernel's free_chunk_space.
        assert_eq!(unallocated_bytes(&fs), MIB);
        assert_eq!(create_chunk(&fs, BLOCK_GROUP_METADATA).unwrap_err(), Error::Enospc);
        assert_eq!(create_chunk(&fs, BLOCK_GROUP_METADATA | BLOCK_GROUP_DATA).unwrap_err(), Error::Einval);
        assert_eq!(
            create_chunk(&fs, BLOCK_GROUP_METADATA | crate::format::BLOCK_GROUP_DUP).unwrap_err(),
            Error::Einval
        );
    }

    #[test]
    fn holes_are_reused_first_fit_and_largest_otherwise() {
        let fs = fs_with_device(GIB);
        let v = &fs.volumes;
        v.add_dev_extent(MIB, DevExtent::new(MIB, 4 * MIB, [0; 16])).unwrap();
        v.add_dev_extent(10 * MIB, DevExtent::new(10 * MIB, 100 * MIB, [0; 16])).unwrap();
        assert_eq!(v.find_free_dev_extent(2 * MIB), Ok((5 * MIB, 2 * MIB)));
        assert_eq!(v.find_free_dev_extent(10 * MIB), Ok((110 * MIB, 10 * MIB)));
        assert_eq!(v.find_free_dev_extent(2 * GIB), Err((110 * MIB, GIB - 110 * MIB)));
        assert!(v.add_dev_extent(12 * MIB, DevExtent::new(12 * MIB, MIB, [0; 16])).is_err());
    }

    #[test]
    fn super_stripes_are_excluded_per_mirror() {
        assert_eq!(super_stripes(MIB, 16 * MIB), []);
        assert_eq!(super_stripes(60 * MIB, 16 * MIB), [(64 * MIB, STRIPE_LEN)]);
        assert_eq!(super_stripes(64 * MIB, 32 * 1024), [(64 * MIB, 32 * 1024)]);
        assert_eq!(super_stripes(0, 2 * MIB), [(0, 64 * 1024), (64 * 1024, 64 * 1024)]);
        let big = super_stripes(GIB, 300 * GIB);
        assert_eq!(big, [(256 * GIB, STRIPE_LEN)]);
    }
}
