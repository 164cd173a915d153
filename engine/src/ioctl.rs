//! Subvolume operations user space asks for (kernel: ioctl.c
//! `btrfs_mksnapshot`/`create_snapshot`, inode.c `btrfs_delete_subvolume`
//! with the cleaner's `btrfs_drop_snapshot`).
//!
//! A snapshot is made by the commit of the transaction that asked for it
//! (transaction.rs `create_pending_snapshot`), which then links it into the
//! source's top directory ([`link_snapshot`]: DIR_ITEM, DIR_INDEX, ROOT_REF,
//! ROOT_BACKREF); deleting one unlinks it and drops its tree
//! (extent_tree.rs `drop_snapshot`).
//!
//! Departures: snapshots are read-only, of the fs tree only, named
//! `snapshot-<id>` in its top directory (the kernel takes a name and a
//! directory); namespace paths do not cross into them (a lookup of the
//! name returns the tree's id); no UUID item; a deletion drops the whole
//! tree in one transaction handle, where the kernel's cleaner thread drops
//! it across transactions, recording its progress in the root item.

use std::cell::RefCell;
use std::rc::Rc;

use crate::ctree::{Root, insert_item};
use crate::error::Error;
use crate::format::{
    DIR_INDEX_KEY, DirItem, FS_TREE_OBJECTID, FT_DIR, Key, ROOT_BACKREF_KEY, ROOT_ITEM_KEY, ROOT_REF_KEY,
    ROOT_SUBVOL_RDONLY, ROOT_TREE_OBJECTID, RootRef,
};
use crate::fs::FsInfo;
use crate::inode::ROOT_DIR_INO;
use crate::transaction::{
    PendingSnapshot, TransHandle, abort_transaction, check_fs_error, commit_transaction, end_transaction,
    start_transaction,
};

/// Items a snapshot reserves (kernel: create_snapshot's
/// btrfs_subvolume_reserve_metadata: the new root item, its root ref and
/// backref, the directory entry and index, the parent directory's inode
/// and the UUID item).
const SNAPSHOT_ITEMS: u64 = 7;

/// Items a deletion reserves (btrfs_delete_subvolume): the root item, the
/// directory entry and index, the root ref and backref.
const SNAPSHOT_DELETE_ITEMS: u64 = 5;

/// Take a read-only snapshot of the subvolume `source` (only the top fs
/// tree has files here): write back its dirty data, ask for the snapshot
/// and commit. Returns the new tree's id.
pub async fn create_snapshot(fs: &Rc<FsInfo>, source: u64) -> Result<u64, Error> {
    crate::inode::trace_op(fs, "snapshot", do_create_snapshot(fs, source).await)
}

async fn do_create_snapshot(fs: &Rc<FsInfo>, source: u64) -> Result<u64, Error> {
    check_fs_error(fs)?;
    if source != FS_TREE_OBJECTID {
        return Err(Error::Einval);
    }
    crate::file::start_delalloc_and_wait(fs).await?;
    let root = fs.root(source);
    let handle = start_transaction(fs, &root, SNAPSHOT_ITEMS, "snapshot").await?;
    // btrfs_subvolume_reserve_metadata into the pending snapshot's reserve:
    // the reservation goes with the snapshot to whichever handle commits.
    let rsv = handle.rsv.borrow_mut().take();
    handle.block_rsv.set(None);
    let pending = Rc::new(PendingSnapshot { source, objectid: Default::default(), rsv: RefCell::new(rsv) });
    handle.transaction.pending_snapshots.borrow_mut().push(pending.clone());
    commit_transaction(handle).await?;
    pending.objectid.get().ok_or(Error::Erofs)
}

/// Delete the snapshot `objectid`: its ROOT_ITEM goes and its tree is
/// dropped, every block it alone referenced freed. ENOENT if there is no
/// such snapshot, EINVAL for a tree that is not a read-only snapshot.
pub async fn delete_snapshot(fs: &Rc<FsInfo>, objectid: u64) -> Result<(), Error> {
    crate::inode::trace_op(fs, "snapshot_delete", do_delete_snapshot(fs, objectid).await)
}

async fn do_delete_snapshot(fs: &Rc<FsInfo>, objectid: u64) -> Result<(), Error> {
    check_fs_error(fs)?;
    // A relocation may be swapping blocks into the tree.
    let _cleaner = crate::relocation::lock_cleaner(fs).await;
    let root = fs.roots.borrow().get(&objectid).cloned().ok_or(Error::Enoent)?;
    if root.deleting.get() {
        return Err(Error::Enoent);
    }
    if root.root_item.borrow().flags & ROOT_SUBVOL_RDONLY == 0 || root.root_key_offset.get() == 0 {
        return Err(Error::Einval);
    }
    // A second deletion finds nothing from now on.
    root.deleting.set(true);
    let handle = match start_transaction(fs, &root, SNAPSHOT_DELETE_ITEMS, "snapshot_delete").await {
        Ok(handle) => handle,
        Err(error) => {
            root.deleting.set(false);
            return Err(error);
        }
    };
    // Out of the roots in the transaction that drops it: every commit
    // before this one still has the tree (its root item, its references),
    // and so do the trees qgroups read (the old roots of this transaction).
    fs.roots.borrow_mut().remove(&objectid);
    let result = async {
        let tree_root = fs.root(ROOT_TREE_OBJECTID);
        let key = Key { objectid, item_type: ROOT_ITEM_KEY, offset: root.root_key_offset.get() };
        let mut path = crate::ctree::Path::new();
        if !crate::ctree::search_slot(Some(&handle), &tree_root, &key, &mut path, -1, true).await? {
            return Err(Error::BadTreeBlock(format!(
                "root tree has no ROOT_ITEM {key} for snapshot {objectid}"
            )));
        }
        let slot = path.slots[0];
        crate::ctree::del_items(&handle, &tree_root, &mut path, slot, 1).await?;
        drop(path);
        unlink_snapshot(&handle, &fs.root(FS_TREE_OBJECTID), objectid).await?;
        crate::extent_tree::drop_snapshot(&handle, &root).await
    }
    .await;
    if let Err(error) = &result {
        abort_transaction(&handle, error, "btrfs_drop_snapshot");
    }
    end_transaction(handle);
    result
}

/// The name of the snapshot `objectid` in its source's top directory.
/// Departure: the kernel takes it from the ioctl.
pub fn snapshot_name(objectid: u64) -> String {
    format!("snapshot-{objectid}")
}

/// Link the snapshot `objectid` of `source` into the source's top
/// directory, in the commit that made it (create_pending_snapshot after
/// qgroup_account_snapshot): the directory entry (DIR_ITEM and DIR_INDEX) naming the snapshot's ROOT_ITEM, ROOT_REF and ROOT_BACKREF in
/// the root tree, the directory's size. The directory's inode is not
/// locked: every writer of the transaction is gone.
pub(crate) async fn link_snapshot(
    handle: &TransHandle,
    source: &Rc<Root>,
    objectid: u64,
) -> Result<(), Error> {
    let fs = &handle.fs;
    let name = snapshot_name(objectid).into_bytes();
    let dir = ROOT_DIR_INO;
    crate::inode::iget(fs, dir).await?;
    let index = crate::inode::set_inode_index(fs, source, dir).await?;
    let location = Key::new(objectid, ROOT_ITEM_KEY, u64::MAX);
    crate::dir_item::insert_dir_name(handle, source, dir, &name, location, FT_DIR).await?;
    // Departure: the index goes in now, not through the delayed items: the
    // committing handle may have reserved nothing (the kernel charges the
    // pending snapshot's own reserve).
    let entry =
        DirItem { location, transid: handle.transid, dir_type: FT_DIR, name: name.clone(), data: Vec::new() };
    insert_item(handle, source, &Key::new(dir, DIR_INDEX_KEY, index), &entry.to_bytes()).await?;
    let name_len = name.len();
    let root_ref = RootRef { dirid: dir, sequence: index, name }.to_bytes();
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    insert_item(handle, &tree_root, &Key::new(source.objectid, ROOT_REF_KEY, objectid), &root_ref).await?;
    insert_item(handle, &tree_root, &Key::new(objectid, ROOT_BACKREF_KEY, source.objectid), &root_ref)
        .await?;
    fs.log.entries_moved(dir, handle.transid);
    crate::inode::touch_dir(fs, dir, true, name_len);
    crate::inode::update_inode(handle, dir).await
}

/// `btrfs_unlink_subvol`: take the snapshot `objectid`'s entry out of the
/// top directory of `parent` (named by its ROOT_BACKREF), with its
/// ROOT_REF and ROOT_BACKREF.
async fn unlink_snapshot(handle: &TransHandle, parent: &Rc<Root>, objectid: u64) -> Result<(), Error> {
    let fs = &handle.fs;
    let tree_root = fs.root(ROOT_TREE_OBJECTID);
    let mut found = None;
    for key in [
        Key::new(objectid, ROOT_BACKREF_KEY, parent.objectid),
        Key::new(parent.objectid, ROOT_REF_KEY, objectid),
    ] {
        let mut path = crate::ctree::Path::new();
        if !crate::ctree::search_slot(Some(handle), &tree_root, &key, &mut path, -1, true).await? {
            return Err(Error::BadTreeBlock(format!("root tree has no {key} for snapshot {objectid}")));
        }
        let root_ref = RootRef::read(&path.item_data(path.slots[0]))
            .map_err(|e| Error::BadTreeBlock(format!("{key}: {e}")))?;
        found = Some(root_ref);
        let slot = path.slots[0];
        crate::ctree::del_items(handle, &tree_root, &mut path, slot, 1).await?;
    }
    let root_ref = found.expect("two references read");
    let dir = root_ref.dirid;
    crate::inode::iget(fs, dir).await?;
    {
        let mut path = crate::ctree::Path::new();
        let Some(entry) =
            crate::dir_item::lookup_dir_item(Some(handle), parent, &mut path, dir, &root_ref.name, -1)
                .await?
        else {
            return Err(Error::BadTreeBlock(format!("no directory entry for snapshot {objectid}")));
        };
        crate::dir_item::delete_one_dir_name(handle, parent, &mut path, &entry).await?;
    }
    crate::delayed_inode::delete_delayed_dir_index(handle, dir, root_ref.sequence).await?;
    fs.log.entries_moved(dir, handle.transid);
    crate::inode::touch_dir(fs, dir, false, root_ref.name.len());
    crate::inode::update_inode(handle, dir).await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::file::{sync_fs, truncate, write};
    use crate::format::FS_TREE_OBJECTID;
    use crate::inode::testing::{check_clean, crash_and_mount, mount, populate, run, tree_items as items};
    use crate::inode::{ROOT_DIR_INO, create, lookup, unlink};

    fn refs_per_shared_cow(fs: &FsInfo) -> std::collections::BTreeMap<u32, u64> {
        fs.search_stats.refs_per_shared_cow.borrow().clone()
    }

    #[test]
    fn a_snapshot_shares_the_source_and_keeps_its_contents_while_the_source_changes() {
        let (env, fs) = mount();
        populate(&env, &fs, 300);
        assert!(fs.root(FS_TREE_OBJECTID).node().level() >= 1, "the test needs a tree with nodes");
        let before = items(&env, &fs, FS_TREE_OBJECTID);
        let id = run(&env, &fs, |fs| async move { create_snapshot(&fs, FS_TREE_OBJECTID).await }).unwrap();
        assert_eq!(id, 256);
        assert_eq!(items(&env, &fs, id), before, "a snapshot holds exactly its source's items");
        // The source links the snapshot after copying: only the path to its
        // top directory's entries is COWed.
        let linked: u64 = refs_per_shared_cow(&fs).values().sum();
        let levels = u64::from(fs.root(FS_TREE_OBJECTID).node().level()) + 1;
        assert!(linked <= 2 * levels, "{linked} COWs of shared blocks to link the snapshot");
        let (found, _) =
            run(&env, &fs, move |fs| async move { lookup(&fs, ROOT_DIR_INO, &snapshot_name(id)).await })
                .unwrap()
                .expect("the snapshot is linked in the top directory");
        assert_eq!(found, id);
        let report = check_clean(&env);
        assert_eq!(report.trees[&id].leaves, report.trees[&FS_TREE_OBJECTID].leaves);

        // Change the source: every COW of a block the snapshot shares queues
        // references for the block's children or data extents.
        run(&env, &fs, |fs| async move {
            for i in (0..300).step_by(7) {
                let (ino, _) = lookup(&fs, ROOT_DIR_INO, &format!("file-{i:04}")).await?.unwrap();
                write(&fs, ino, 100, b"changed").await?;
            }
            for i in (3..300).step_by(11) {
                unlink(&fs, ROOT_DIR_INO, &format!("file-{i:04}")).await?;
            }
            let (ino, _) = lookup(&fs, ROOT_DIR_INO, "file-0001").await?.unwrap();
            truncate(&fs, ino, 0).await?;
            sync_fs(&fs).await
        })
        .unwrap();
        let shared = refs_per_shared_cow(&fs);
        let cows: u64 = shared.values().sum();
        let max = *shared.keys().next_back().unwrap();
        assert!(cows >= 10, "shared COWs {shared:?}");
        // A shared leaf's COW queues one reference per data extent it holds
        // (tens here); a shared node's, one per child.
        assert!(max > 10, "a shared leaf's COW queues a reference per data extent: {shared:?}");
        assert_eq!(items(&env, &fs, id), before, "the snapshot does not change with its source");
        check_clean(&env);

        // Power loss: the snapshot is read back from its ROOT_ITEM.
        let fs = crash_and_mount(&env);
        assert_eq!(fs.root(id).root_key_offset.get(), fs.root(id).root_item.borrow().otransid);
        assert_eq!(items(&env, &fs, id), before);

        // Deleting it gives back what only it referenced.
        let extent_items = check_clean(&env).trees[&crate::format::EXTENT_TREE_OBJECTID].items;
        run(&env, &fs, move |fs| async move {
            delete_snapshot(&fs, id).await?;
            assert_eq!(delete_snapshot(&fs, id).await, Err(Error::Enoent));
            sync_fs(&fs).await
        })
        .unwrap();
        let report = check_clean(&env);
        assert!(!report.trees.contains_key(&id));
        assert!(report.trees[&crate::format::EXTENT_TREE_OBJECTID].items < extent_items);
    }

    #[test]
    fn only_read_only_snapshots_are_deleted() {
        let (env, fs) = mount();
        run(&env, &fs, |fs| async move {
            assert_eq!(delete_snapshot(&fs, FS_TREE_OBJECTID).await, Err(Error::Einval));
            assert_eq!(delete_snapshot(&fs, 300).await, Err(Error::Enoent));
            assert_eq!(create_snapshot(&fs, 300).await, Err(Error::Einval));
            Ok::<_, Error>(())
        })
        .unwrap();
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write { file: u8, offset: u16, len: u16 },
        Unlink { file: u8 },
        Truncate { file: u8, size: u16 },
        Snapshot,
        Delete { nth: u8 },
        Sync,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..40u8, 0..20_000u16, 1..9000u16).prop_map(|(file, offset, len)| Op::Write { file, offset, len }),
            2 => (0..40u8).prop_map(|file| Op::Unlink { file }),
            1 => (0..40u8, 0..20_000u16).prop_map(|(file, size)| Op::Truncate { file, size }),
            2 => Just(Op::Snapshot),
            1 => (0..4u8).prop_map(|nth| Op::Delete { nth }),
            1 => Just(Op::Sync),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Random changes with snapshots taken and deleted among them: every
        /// commit leaves references the checker recomputes from the trees,
        /// and a snapshot keeps the items its source had when it was taken.
        #[test]
        fn snapshots_keep_references_exact(ops in proptest::collection::vec(op(), 1..60)) {
            let (env, fs) = mount();
            populate(&env, &fs, 120);
            let mut snapshots: Vec<(u64, Vec<(Key, Vec<u8>)>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Snapshot => {
                        run(&env, &fs, |fs| async move { sync_fs(&fs).await }).unwrap();
                        let before = items(&env, &fs, FS_TREE_OBJECTID);
                        let id = run(&env, &fs, |fs| async move { create_snapshot(&fs, FS_TREE_OBJECTID).await })
                            .unwrap();
                        snapshots.push((id, before));
                    }
                    Op::Delete { nth } if !snapshots.is_empty() => {
                        let (id, _) = snapshots.remove(nth as usize % snapshots.len());
                        run(&env, &fs, move |fs| async move { delete_snapshot(&fs, id).await }).unwrap();
                    }
                    Op::Sync | Op::Delete { .. } => run(&env, &fs, |fs| async move { sync_fs(&fs).await }).unwrap(),
                    Op::Write { file, offset, len } => run(&env, &fs, move |fs| async move {
                        let name = format!("file-{file:04}");
                        let ino = match lookup(&fs, ROOT_DIR_INO, &name).await? {
                            Some((ino, _)) => ino,
                            None => create(&fs, ROOT_DIR_INO, &name).await?,
                        };
                        write(&fs, ino, u64::from(offset), &vec![file; usize::from(len)]).await
                    })
                    .unwrap(),
                    Op::Unlink { file } => run(&env, &fs, move |fs| async move {
                        match unlink(&fs, ROOT_DIR_INO, &format!("file-{file:04}")).await {
                            Err(Error::Enoent) => Ok(()),
                            other => other,
                        }
                    })
                    .unwrap(),
                    Op::Truncate { file, size } => run(&env, &fs, move |fs| async move {
                        match lookup(&fs, ROOT_DIR_INO, &format!("file-{file:04}")).await? {
                            Some((ino, _)) => truncate(&fs, ino, u64::from(size)).await,
                            None => Ok(()),
                        }
                    })
                    .unwrap(),
                }
            }
            run(&env, &fs, |fs| async move { sync_fs(&fs).await }).unwrap();
            check_clean(&env);
            for (id, expected) in &snapshots {
                prop_assert_eq!(&items(&env, &fs, *id), expected, "snapshot {} changed", id);
            }
        }
    }
}
