//! Subvolume operations user space asks for (kernel: ioctl.c
//! `btrfs_mksnapshot`/`create_snapshot`, inode.c `btrfs_delete_subvolume`
//! with the cleaner's `btrfs_drop_snapshot`).
//!
//! A snapshot is made by the commit of the transaction that asked for it
//! (transaction.rs `create_pending_snapshot`); deleting one drops its tree
//! (extent_tree.rs `drop_snapshot`).
//!
//! Departures: snapshots are read-only and not linked into a directory
//! (they are known by their tree id); a deletion drops the whole tree in
//! one transaction handle, where the kernel's cleaner thread drops it
//! across transactions, recording its progress in the root item.

use std::rc::Rc;

use crate::error::Error;
use crate::format::{FS_TREE_OBJECTID, Key, ROOT_ITEM_KEY, ROOT_SUBVOL_RDONLY, ROOT_TREE_OBJECTID};
use crate::fs::FsInfo;
use crate::transaction::{
    PendingSnapshot, abort_transaction, check_fs_error, commit_transaction, end_transaction,
    start_transaction,
};

/// Items a snapshot reserves (kernel: create_snapshot's
/// btrfs_subvolume_reserve_metadata: the new root item, its root ref and
/// backref, the directory entry and index, the parent directory's inode
/// and the UUID item).
const SNAPSHOT_ITEMS: u64 = 7;

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
    let pending = Rc::new(PendingSnapshot { source, objectid: Default::default() });
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
    let handle = match start_transaction(fs, &root, 1, "snapshot_delete").await {
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
        crate::extent_tree::drop_snapshot(&handle, &root).await
    }
    .await;
    if let Err(error) = &result {
        abort_transaction(&handle, error, "btrfs_drop_snapshot");
    }
    end_transaction(handle);
    result
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
        assert!(refs_per_shared_cow(&fs).is_empty(), "nothing shared was COWed yet");
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
                        let id = run(&env, &fs, |fs| async move { create_snapshot(&fs, FS_TREE_OBJECTID).await })
                            .unwrap();
                        snapshots.push((id, items(&env, &fs, FS_TREE_OBJECTID)));
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
