//! Inode items and inode back references (kernel: inode-item.c, and the
//! item halves of `btrfs_read_locked_inode`, `btrfs_update_inode_item`,
//! `btrfs_get_parent` and `btrfs_truncate_inode_items` in inode.c and
//! export.c).
//!
//! An INODE_REF item (inode, INODE_REF, parent directory) holds one entry
//! (index, name) per name the inode has in that directory.
//!
//! Departures from the kernel: no extended refs (INODE_EXTREF): a name
//! that does not fit the INODE_REF item (EOVERFLOW) is EMLINK, and deleting a missing
//! reference is ENOENT without an extref search; truncation deletes every
//! item of the inode (it is only used to delete inodes: no file extents,
//! no partial truncation).

use std::rc::Rc;

use crate::accessors::{header_nritems, item_data, item_data_mut, item_key, item_size};
use crate::ctree::{
    Path, Root, del_items, extend_item, insert_empty_items, next_leaf, search_slot, truncate_item,
};
use crate::error::Error;
use crate::format::{
    FixedItem, INODE_ITEM_KEY, INODE_ITEM_SIZE, INODE_REF_KEY, INODE_REF_SIZE, InodeItem, InodeRef, Key,
    inode_refs,
};
use crate::transaction::{TransHandle, mark_buffer_dirty};

/// A reference entry found in an INODE_REF item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefMatch {
    pub slot: usize,
    /// Byte offset of the entry in the item's data, and its length.
    pub offset: usize,
    pub len: usize,
    pub index: u64,
}

/// `btrfs_find_name_in_backref`: the entry `name` of the INODE_REF item at
/// the path's slot.
pub fn find_name_in_backref(path: &Path, name: &[u8]) -> Option<RefMatch> {
    let slot = path.slots[0];
    let image = path.leaf().data.borrow();
    let mut offset = 0;
    for entry in inode_refs(item_data(&image, slot)) {
        let entry = entry.ok()?;
        let len = entry.encoded_len();
        if entry.name == name {
            return Some(RefMatch { slot, offset, len, index: entry.index });
        }
        offset += len;
    }
    None
}

/// `btrfs_insert_inode_ref`: record that `ino` is named `name` (at `index`)
/// in directory `parent`: a new INODE_REF item, or one more entry in the
/// existing one. EEXIST if the entry is there already.
pub async fn insert_inode_ref(
    handle: &TransHandle,
    root: &Rc<Root>,
    name: &[u8],
    ino: u64,
    parent: u64,
    index: u64,
) -> Result<(), Error> {
    let key = Key::new(ino, INODE_REF_KEY, parent);
    let entry = InodeRef { index, name: name.to_vec() };
    let ins_len = entry.encoded_len() as u32;
    let mut path = Path::new();
    let start =
        match insert_empty_items(handle, root, &mut path, std::slice::from_ref(&key), &[ins_len]).await {
            Ok(()) => 0,
            Err(Error::Eexist) => {
                if find_name_in_backref(&path, name).is_some() {
                    return Err(Error::Eexist);
                }
                let old_size = item_size(&path.leaf().data.borrow(), path.slots[0]) as usize;
                extend_item(handle, &path, ins_len);
                old_size
            }
            // The item of this parent cannot grow any more (the search
            // released the path, so the name cannot be looked for: the VFS
            // made sure it is new). The kernel adds an extended ref then.
            Err(Error::Eoverflow) => return Err(Error::Emlink),
            Err(error) => return Err(error),
        };
    let leaf = path.leaf().clone();
    {
        let mut image = leaf.data.borrow_mut();
        entry.write(&mut item_data_mut(&mut image, path.slots[0])[start..]);
    }
    mark_buffer_dirty(handle, &leaf);
    Ok(())
}

/// `btrfs_del_inode_ref`: remove the entry `name` of `ino` in `parent`;
/// returns its index. ENOENT if there is none.
pub async fn del_inode_ref(
    handle: &TransHandle,
    root: &Rc<Root>,
    name: &[u8],
    ino: u64,
    parent: u64,
) -> Result<u64, Error> {
    let key = Key::new(ino, INODE_REF_KEY, parent);
    let mut path = Path::new();
    if !search_slot(Some(handle), root, &key, &mut path, -1, true).await? {
        return Err(Error::Enoent);
    }
    let Some(found) = find_name_in_backref(&path, name) else { return Err(Error::Enoent) };
    let leaf = path.leaf().clone();
    let item_len = item_size(&leaf.data.borrow(), found.slot) as usize;
    if found.len == item_len {
        del_items(handle, root, &mut path, found.slot, 1).await?;
        return Ok(found.index);
    }
    {
        let mut image = leaf.data.borrow_mut();
        let item = item_data_mut(&mut image, found.slot);
        item.copy_within(found.offset + found.len.., found.offset);
    }
    truncate_item(handle, &path, (item_len - found.len) as u32, true);
    Ok(found.index)
}

/// What `btrfs_read_locked_inode` reads of an inode: its item, and for an
/// inode with one link, the index of the INODE_REF right after the item in
/// the same leaf (`BTRFS_I(inode)->dir_index`; 0 if not there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadInode {
    pub item: InodeItem,
    pub dir_index: u64,
}

/// Read inode `ino` from the tree without a transaction. `None` if it has
/// no inode item.
pub async fn read_inode(root: &Rc<Root>, ino: u64) -> Result<Option<ReadInode>, Error> {
    let key = Key::new(ino, INODE_ITEM_KEY, 0);
    let mut path = Path::new();
    if !search_slot(None, root, &key, &mut path, 0, false).await? {
        return Ok(None);
    }
    let image = path.leaf().data.borrow();
    let slot = path.slots[0];
    let data = item_data(&image, slot);
    if data.len() < INODE_ITEM_SIZE {
        return Err(Error::BadTreeBlock(format!("inode {ino}: inode item of {} bytes", data.len())));
    }
    let item = InodeItem::read(data);
    let mut dir_index = 0;
    if item.nlink == 1 && slot + 1 < header_nritems(&image) as usize {
        let next = item_key(&image, slot + 1);
        if next.objectid == ino && next.item_type == INODE_REF_KEY {
            let payload = item_data(&image, slot + 1);
            if payload.len() >= INODE_REF_SIZE
                && let Some(Ok(entry)) = inode_refs(payload).next()
            {
                dir_index = entry.index;
            }
        }
    }
    Ok(Some(ReadInode { item, dir_index }))
}

/// `btrfs_update_inode_item`: write `item` over `ino`'s inode item now
/// (not through the delayed items). ENOENT if it is missing.
pub async fn update_inode_item(
    handle: &TransHandle,
    root: &Rc<Root>,
    ino: u64,
    item: &InodeItem,
) -> Result<(), Error> {
    let key = Key::new(ino, INODE_ITEM_KEY, 0);
    let mut path = Path::new();
    if !search_slot(Some(handle), root, &key, &mut path, 0, true).await? {
        return Err(Error::Enoent);
    }
    let leaf = path.leaf().clone();
    {
        let mut image = leaf.data.borrow_mut();
        let mut item = *item;
        item.transid = handle.transid;
        item.write(item_data_mut(&mut image, path.slots[0]));
    }
    mark_buffer_dirty(handle, &leaf);
    Ok(())
}

/// `btrfs_get_parent` for directories: the parent named by the first
/// INODE_REF of `ino` (the root directory is its own parent). ENOENT if it
/// has none.
pub async fn get_parent(root: &Rc<Root>, ino: u64) -> Result<u64, Error> {
    let key = Key::new(ino, INODE_REF_KEY, 0);
    let mut path = Path::new();
    search_slot(None, root, &key, &mut path, 0, false).await?;
    loop {
        let nritems = header_nritems(&path.leaf().data.borrow()) as usize;
        if path.slots[0] < nritems {
            break;
        }
        if !next_leaf(root, &mut path).await? {
            return Err(Error::Enoent);
        }
    }
    let found = path.item_key(path.slots[0]);
    if found.objectid != ino || found.item_type != INODE_REF_KEY {
        return Err(Error::Enoent);
    }
    Ok(found.offset)
}

/// `btrfs_truncate_inode_items` to size 0 with `min_type` 0, as eviction
/// does: delete every item of `ino`, from the last one down, one leaf's
/// worth per search.
pub async fn truncate_inode_items(handle: &TransHandle, root: &Rc<Root>, ino: u64) -> Result<u64, Error> {
    let key = Key::new(ino, u8::MAX, u64::MAX);
    let mut deleted = 0;
    loop {
        let mut path = Path::new();
        let found = search_slot(Some(handle), root, &key, &mut path, -1, true).await?;
        assert!(!found, "an item with the largest possible key of inode {ino}");
        if path.slots[0] == 0 {
            return Ok(deleted);
        }
        let last = path.slots[0] - 1;
        let first = {
            let image = path.leaf().data.borrow();
            let mut first = last + 1;
            while first > 0 && item_key(&image, first - 1).objectid == ino {
                first -= 1;
            }
            first
        };
        if first > last {
            return Ok(deleted);
        }
        drop_data_refs(handle, &path, first, last, ino)?;
        let nr = last + 1 - first;
        del_items(handle, root, &mut path, first, nr).await?;
        deleted += nr as u64;
        if first > 0 {
            return Ok(deleted);
        }
    }
}

/// The file extent items in slots `first..=last` are about to go: queue
/// the drop of the data reference each regular extent holds. An item that
/// does not parse is corruption, not an extent without a reference.
fn drop_data_refs(
    handle: &TransHandle,
    path: &Path,
    first: usize,
    last: usize,
    ino: u64,
) -> Result<(), Error> {
    let image = path.leaf().data.borrow();
    for slot in first..=last {
        let key = item_key(&image, slot);
        if key.item_type != crate::format::EXTENT_DATA_KEY {
            continue;
        }
        let item = crate::format::FileExtentItem::read(crate::accessors::item_data(&image, slot))
            .map_err(|e| Error::BadTreeBlock(format!("file extent {key} of inode {ino}: {e:?}")))?;
        if let Some((bytenr, len, ref_key)) = crate::file::data_ref_of(handle.root_objectid, ino, &key, &item)
        {
            handle.transaction.delayed_refs.add_data_ref(bytenr, len, ref_key, -1, false);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::FS_TREE_OBJECTID;
    use crate::inode::testing::{mount, run};
    use crate::inode::{ROOT_DIR_INO, create, mkdir};
    use crate::transaction::{end_transaction, start_transaction};

    #[test]
    fn inode_refs_of_one_parent_share_an_item() {
        let (env, fs) = mount();
        let (ino, d) = run(&env, &fs, |fs| async move {
            let ino = create(&fs, ROOT_DIR_INO, "one").await?;
            let d = mkdir(&fs, ROOT_DIR_INO, "d").await?;
            Ok::<_, Error>((ino, d))
        })
        .unwrap();
        let (read, parent, dup, removed, missing, items) = run(&env, &fs, |fs| async move {
            let root = fs.root(FS_TREE_OBJECTID);
            let read = read_inode(&root, ino).await?.unwrap();
            let parent = get_parent(&root, d).await?;
            let handle = start_transaction(&fs, &root, 3, "test").await?;
            insert_inode_ref(&handle, &root, b"two", ino, ROOT_DIR_INO, 10).await?;
            insert_inode_ref(&handle, &root, b"three", ino, ROOT_DIR_INO, 11).await?;
            let dup = insert_inode_ref(&handle, &root, b"two", ino, ROOT_DIR_INO, 12).await;
            let removed = del_inode_ref(&handle, &root, b"two", ino, ROOT_DIR_INO).await?;
            let missing = del_inode_ref(&handle, &root, b"two", ino, ROOT_DIR_INO).await;
            end_transaction(handle);
            let key = Key::new(ino, INODE_REF_KEY, ROOT_DIR_INO);
            let data = crate::ctree::lookup_item(&root, &key).await?.unwrap();
            let items: Vec<InodeRef> = inode_refs(&data).map(Result::unwrap).collect();
            Ok::<_, Error>((read, parent, dup, removed, missing, items))
        })
        .unwrap();
        assert_eq!((read.item.nlink, read.dir_index), (1, 2));
        assert_eq!(parent, ROOT_DIR_INO);
        assert_eq!(dup, Err(Error::Eexist));
        assert_eq!((removed, missing), (10, Err(Error::Enoent)));
        let names: Vec<(u64, &[u8])> = items.iter().map(|r| (r.index, r.name.as_slice())).collect();
        assert_eq!(names, vec![(2, &b"one"[..]), (11, b"three")]);
    }
}
