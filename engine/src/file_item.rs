//! Data checksums in the csum tree (kernel: file-item.c).
//!
//! Every 4 KiB sector of a data extent has a crc32c, stored in EXTENT_CSUM
//! items of the csum tree keyed by the logical address of their first
//! sector (`EXTENT_CSUM_OBJECTID`, `EXTENT_CSUM_KEY`, bytenr). They are
//! inserted when an ordered extent completes (`btrfs_csum_file_blocks`),
//! looked up and verified on every read from disk, and deleted when the
//! extent's last reference goes (`btrfs_del_csums`).
//!
//! Departure: the kernel extends and merges neighbouring csum items and
//! splits them when part of a range goes; here each ordered extent gets its
//! own items (at most [`MAX_CSUMS_PER_ITEM`] sums each) and a data extent
//! is always freed whole, so an item never straddles two extents and is
//! deleted whole.

use std::rc::Rc;

use crate::accessors::{header_nritems, item_data, item_key};
use crate::ctree::{Path, Root, del_items, insert_item, search_slot};
use crate::error::Error;
use crate::format::{CRC32C_CSUM_SIZE, CSUM_TREE_OBJECTID, EXTENT_CSUM_KEY, EXTENT_CSUM_OBJECTID, Key};
use crate::fs::FsInfo;
use crate::transaction::TransHandle;

/// Sums per csum item: 1024 sectors (4 MiB of data, a 4 KiB item), well
/// under the largest item of a 16 KiB leaf; smaller for smaller nodes.
pub const MAX_CSUMS_PER_ITEM: usize = 1024;

fn csum_root(fs: &FsInfo) -> Rc<Root> {
    fs.root(CSUM_TREE_OBJECTID)
}

fn csum_key(bytenr: u64) -> Key {
    Key::new(EXTENT_CSUM_OBJECTID, EXTENT_CSUM_KEY, bytenr)
}

fn per_item(fs: &FsInfo) -> usize {
    let fit = crate::format::max_item_size(fs.nodesize) as usize / 2 / CRC32C_CSUM_SIZE;
    MAX_CSUMS_PER_ITEM.min(fit)
}

/// `btrfs_csum_bytes_to_leaves`: leaves the sums of `num_bytes` of data fill.
pub fn csum_bytes_to_leaves(fs: &FsInfo, num_bytes: u64) -> u64 {
    let sums = num_bytes.div_ceil(u64::from(fs.sectorsize));
    let per_leaf = (crate::format::max_item_size(fs.nodesize) as u64) / CRC32C_CSUM_SIZE as u64;
    sums.div_ceil(per_leaf)
}

/// `btrfs_csum_file_blocks`: insert the sums of the sectors from `bytenr` on.
pub async fn csum_file_blocks(handle: &TransHandle, bytenr: u64, sums: &[u32]) -> Result<(), Error> {
    insert_csums(handle, &csum_root(&handle.fs), bytenr, sums).await.map(|_| ())
}

/// The sums of every sector of `[bytenr, bytenr + len)`; EIO-like
/// corruption if one is missing.
pub async fn lookup_csums(fs: &FsInfo, bytenr: u64, len: u64) -> Result<Vec<u32>, Error> {
    let sector = u64::from(fs.sectorsize);
    let mut sums = Vec::with_capacity((len / sector) as usize);
    for at in (bytenr..bytenr + len).step_by(sector as usize) {
        match lookup_csum(fs, at).await? {
            Some(sum) => sums.push(sum),
            None => {
                return Err(Error::BadTreeBlock(format!("data extent {bytenr}+{len} has no sum at {at}")));
            }
        }
    }
    Ok(sums)
}

/// Insert `sums`, the sums of the sectors from `bytenr` on, into `root`
/// (the checksum tree or a log tree) in items of at most
/// [`MAX_CSUMS_PER_ITEM`]; returns the keys inserted.
pub async fn insert_csums(
    handle: &TransHandle,
    root: &Rc<Root>,
    bytenr: u64,
    sums: &[u32],
) -> Result<Vec<Key>, Error> {
    let fs = &handle.fs;
    let sector = u64::from(fs.sectorsize);
    let mut keys = Vec::new();
    for (i, chunk) in sums.chunks(per_item(fs)).enumerate() {
        let key = csum_key(bytenr + (i * per_item(fs)) as u64 * sector);
        let payload: Vec<u8> = chunk.iter().flat_map(|sum| sum.to_le_bytes()).collect();
        insert_item(handle, root, &key, &payload).await?;
        keys.push(key);
    }
    Ok(keys)
}

/// `btrfs_del_csums`: delete the sums of every sector in `[bytenr, bytenr +
/// len)`, last item first. Items never straddle the range's ends (see the
/// module documentation); one that does is reported as corruption.
pub async fn del_csums(handle: &TransHandle, bytenr: u64, len: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    let root = csum_root(fs);
    let sector = u64::from(fs.sectorsize);
    let end = bytenr + len;
    loop {
        let mut path = Path::new();
        let found = search_slot(Some(handle), &root, &csum_key(end - 1), &mut path, -1, true).await?;
        let leaf = path.leaf().clone();
        let (first, last) = {
            let image = leaf.data.borrow();
            let nritems = header_nritems(&image) as usize;
            let mut last = if found { path.slots[0] + 1 } else { path.slots[0] };
            last = last.min(nritems);
            let mut first = last;
            while first > 0 {
                let key = item_key(&image, first - 1);
                if key.objectid != EXTENT_CSUM_OBJECTID || key.item_type != EXTENT_CSUM_KEY {
                    break;
                }
                let sums = item_data(&image, first - 1).len() / CRC32C_CSUM_SIZE;
                let item_end = key.offset + sums as u64 * sector;
                if item_end <= bytenr {
                    break;
                }
                if key.offset < bytenr || item_end > end {
                    return Err(Error::BadTreeBlock(format!(
                        "csum item {key} ({sums} sums) straddles the freed extent {bytenr}+{len}"
                    )));
                }
                first -= 1;
            }
            (first, last)
        };
        if first == last {
            return Ok(());
        }
        del_items(handle, &root, &mut path, first, last - first).await?;
        if first > 0 {
            return Ok(());
        }
    }
}

/// The stored sum of the sector at `bytenr`, if any (`btrfs_lookup_csum`).
pub async fn lookup_csum(fs: &FsInfo, bytenr: u64) -> Result<Option<u32>, Error> {
    let root = csum_root(fs);
    let sector = u64::from(fs.sectorsize);
    let mut path = Path::new();
    let found = search_slot(None, &root, &csum_key(bytenr), &mut path, 0, false).await?;
    let slot = if found {
        path.slots[0]
    } else if path.slots[0] > 0 {
        path.slots[0] - 1
    } else {
        return Ok(None);
    };
    let image = path.leaf().data.borrow();
    let key = item_key(&image, slot);
    if key.objectid != EXTENT_CSUM_OBJECTID || key.item_type != EXTENT_CSUM_KEY || key.offset > bytenr {
        return Ok(None);
    }
    let data = item_data(&image, slot);
    let index = ((bytenr - key.offset) / sector) as usize;
    let Some(bytes) = data.get(index * CRC32C_CSUM_SIZE..(index + 1) * CRC32C_CSUM_SIZE) else {
        return Ok(None);
    };
    Ok(Some(u32::from_le_bytes(bytes.try_into().expect("four bytes"))))
}
