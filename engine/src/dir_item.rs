//! Directory entries (kernel: dir-item.c): the DIR_ITEM of a name, keyed
//! by the crc32c hash of the name (names whose hashes collide share one
//! item, their entries back to back), and the DIR_INDEX of the same entry,
//! keyed by the directory's sequence number, which goes through the
//! delayed items ([`crate::delayed_inode::insert_delayed_dir_index`]).
//!
//! Departures from the kernel: no xattr items; the root tree directory
//! (the "default" entry) is mkfs's business.

use std::rc::Rc;

use crate::accessors::{item_data, item_data_mut, item_size};
use crate::ctree::{Path, Root, del_items, extend_item, insert_empty_items, search_slot, truncate_item};
use crate::delayed_inode::insert_delayed_dir_index;
use crate::error::Error;
use crate::format::{
    DIR_ITEM_KEY, DIR_ITEM_SIZE, DirItem, ITEM_SIZE, Key, dir_items, leaf_data_size, name_hash,
};
use crate::transaction::{TransHandle, mark_buffer_dirty};

/// One entry found in a DIR_ITEM (or DIR_INDEX) item: where it is and what
/// it says. The path the lookup used still points at the item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirMatch {
    /// The item's slot in the path's leaf.
    pub slot: usize,
    /// Byte offset of the entry in the item's data.
    pub offset: usize,
    /// Bytes of the entry (header, name and data).
    pub len: usize,
    pub entry: DirItem,
}

/// `btrfs_match_dir_item_name`: the entry named `name` in the item at the
/// path's slot. A malformed item matches nothing (the kernel's
/// `verify_dir_item` failing).
pub fn match_dir_item_name(path: &Path, name: &[u8]) -> Option<DirMatch> {
    let slot = path.slots[0];
    let image = path.leaf().data.borrow();
    let data = item_data(&image, slot);
    let mut offset = 0;
    for entry in dir_items(data) {
        let entry = entry.ok()?;
        let len = entry.encoded_len();
        if entry.name == name {
            return Some(DirMatch { slot, offset, len, entry });
        }
        offset += len;
    }
    None
}

/// `insert_with_overflow`: insert an item of `data_size` bytes under
/// `key`, or, if an item of colliding names has the key, grow it by
/// `data_size` (EEXIST if `name` is one of them, EOVERFLOW from the search
/// if the item cannot grow that much). The new entry's bytes
/// are the last `data_size` of the item at the path's slot.
async fn insert_with_overflow(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    key: &Key,
    data_size: u32,
    name: &[u8],
) -> Result<(), Error> {
    match insert_empty_items(handle, root, path, std::slice::from_ref(key), &[data_size]).await {
        Ok(()) => Ok(()),
        Err(Error::Eexist) => {
            if match_dir_item_name(path, name).is_some() {
                return Err(Error::Eexist);
            }
            extend_item(handle, path, data_size);
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// `btrfs_insert_dir_item`: add the entry `name` -> `location` (of type
/// `dir_type`) to directory `dir`: its DIR_ITEM in the tree now, its
/// DIR_INDEX (`index`) through the delayed items. As in the kernel, an
/// existing DIR_ITEM entry of the same name still queues the index and
/// returns EEXIST (the VFS looks the name up first, so it does not
/// happen). ENOSPC from the delayed index is the migrate failure of the
/// COW amplification bug; the caller aborts.
pub async fn insert_dir_item(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    name: &[u8],
    location: Key,
    dir_type: u8,
    index: u64,
) -> Result<(), Error> {
    let ret = insert_dir_name(handle, root, dir, name, location, dir_type).await;
    if ret.as_ref().is_err_and(|error| !matches!(error, Error::Eexist)) {
        return ret;
    }
    let ret2 = insert_delayed_dir_index(handle, dir, index, name, location, dir_type).await;
    ret?;
    ret2
}

/// The DIR_ITEM half of [`insert_dir_item`]: the entry goes into the item
/// of its name's hash (EEXIST if the name is there).
pub(crate) async fn insert_dir_name(
    handle: &TransHandle,
    root: &Rc<Root>,
    dir: u64,
    name: &[u8],
    location: Key,
    dir_type: u8,
) -> Result<(), Error> {
    let key = Key::new(dir, DIR_ITEM_KEY, name_hash(name));
    let entry =
        DirItem { location, transid: handle.transid, dir_type, name: name.to_vec(), data: Vec::new() };
    let data_size = (DIR_ITEM_SIZE + name.len()) as u32;
    debug_assert_eq!(entry.encoded_len(), data_size as usize);
    let mut path = Path::new();
    insert_with_overflow(handle, root, &mut path, &key, data_size, name).await?;
    let leaf = path.leaf().clone();
    {
        let mut image = leaf.data.borrow_mut();
        let item = item_data_mut(&mut image, path.slots[0]);
        let start = item.len() - data_size as usize;
        entry.write(&mut item[start..]);
    }
    mark_buffer_dirty(handle, &leaf);
    Ok(())
}

/// `btrfs_lookup_dir_item`: find the DIR_ITEM entry `name` of directory
/// `dir`. `mod_ < 0` prepares a deletion, `> 0` a change (both COW and need
/// a handle); `0` only reads. The path keeps the leaf for the caller.
pub async fn lookup_dir_item(
    handle: Option<&TransHandle>,
    root: &Rc<Root>,
    path: &mut Path,
    dir: u64,
    name: &[u8],
    mod_: i32,
) -> Result<Option<DirMatch>, Error> {
    let key = Key::new(dir, DIR_ITEM_KEY, name_hash(name));
    let ins_len = if mod_ < 0 { -1 } else { 0 };
    if !search_slot(handle, root, &key, path, ins_len, mod_ != 0).await? {
        return Ok(None);
    }
    Ok(match_dir_item_name(path, name))
}

/// `btrfs_check_dir_item_collision`: whether `name` can be added to `dir`:
/// EEXIST if it is there, EOVERFLOW if its hash's item has no room left
/// for it.
pub async fn check_dir_item_collision(root: &Rc<Root>, dir: u64, name: &[u8]) -> Result<(), Error> {
    let key = Key::new(dir, DIR_ITEM_KEY, name_hash(name));
    let mut path = Path::new();
    if !search_slot(None, root, &key, &mut path, 0, false).await? {
        return Ok(());
    }
    if match_dir_item_name(&path, name).is_some() {
        return Err(Error::Eexist);
    }
    let data_size = DIR_ITEM_SIZE + name.len();
    let leaf = path.leaf().clone();
    let size = item_size(&leaf.data.borrow(), path.slots[0]) as usize;
    if data_size + size + ITEM_SIZE > leaf_data_size(root.fs_info().nodesize) as usize {
        return Err(Error::Eoverflow);
    }
    Ok(())
}

/// `btrfs_delete_one_dir_name`: remove the entry `found` (from a lookup
/// with `mod_ < 0` on `path`): the whole item if it is the only entry,
/// else cut it out of the item.
pub async fn delete_one_dir_name(
    handle: &TransHandle,
    root: &Rc<Root>,
    path: &mut Path,
    found: &DirMatch,
) -> Result<(), Error> {
    assert_eq!(path.slots[0], found.slot, "the path moved away from the entry");
    let leaf = path.leaf().clone();
    let item_len = item_size(&leaf.data.borrow(), found.slot) as usize;
    if found.len == item_len {
        return del_items(handle, root, path, found.slot, 1).await;
    }
    {
        let mut image = leaf.data.borrow_mut();
        let item = item_data_mut(&mut image, found.slot);
        item.copy_within(found.offset + found.len.., found.offset);
    }
    truncate_item(handle, path, (item_len - found.len) as u32, true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::FS_TREE_OBJECTID;
    use crate::inode::testing::{mount, run};
    use crate::inode::{ROOT_DIR_INO, create, mkdir};

    #[test]
    fn lookups_find_each_of_two_colliding_names_and_the_collision_check_sees_them() {
        let (env, fs) = mount();
        let (x, y) = run(&env, &fs, |fs| async move {
            let x = create(&fs, ROOT_DIR_INO, "c1371838").await?;
            let y = mkdir(&fs, ROOT_DIR_INO, "c2000402").await?;
            Ok::<_, Error>((x, y))
        })
        .unwrap();
        let found = run(&env, &fs, |fs| async move {
            let root = fs.root(FS_TREE_OBJECTID);
            let mut found = Vec::new();
            for name in [&b"c1371838"[..], b"c2000402", b"c1371839"] {
                let mut path = Path::new();
                found.push(lookup_dir_item(None, &root, &mut path, ROOT_DIR_INO, name, 0).await?);
            }
            let checks = (
                check_dir_item_collision(&root, ROOT_DIR_INO, b"c1371838").await,
                check_dir_item_collision(&root, ROOT_DIR_INO, b"c2000402").await,
                check_dir_item_collision(&root, ROOT_DIR_INO, b"other").await,
            );
            Ok::<_, Error>((found, checks))
        })
        .unwrap();
        let (found, checks) = found;
        let first = found[0].as_ref().unwrap();
        let second = found[1].as_ref().unwrap();
        assert_eq!((first.offset, first.len, first.entry.location.objectid), (0, 38, x));
        assert_eq!((second.offset, second.len, second.entry.location.objectid), (38, 38, y));
        assert_eq!(first.slot, second.slot);
        assert_eq!(found[2], None);
        assert_eq!(checks, (Err(Error::Eexist), Err(Error::Eexist), Ok(())));
    }
}
