//! COW B-trees (kernel: ctree.c, ctree.h): roots, paths, search_slot with
//! lock coupling and restarts, COW, leaf/node split, push and balance,
//! insertion and deletion of items.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::extent_io::ExtentBuffer;
use crate::format::{
    CHUNK_TREE_OBJECTID, CSUM_TREE_OBJECTID, DEV_TREE_OBJECTID, EXTENT_TREE_OBJECTID, MAX_LEVEL,
    ROOT_TREE_OBJECTID, RootItem, is_fstree,
};
use crate::locking::{tree_read_unlock, tree_unlock};

/// One tree (kernel: struct btrfs_root).
pub struct Root {
    /// The tree's id (root_key.objectid): 1 root tree, 2 extent, 3 chunk,
    /// 4 dev, 5 the top fs tree, 7 csum, 256+ subvolumes.
    pub objectid: u64,
    /// The current root block. Replaced when the root is COWed; a search
    /// that locks it re-checks it is still the root (btrfs_lock_root_node).
    node: RefCell<Rc<ExtentBuffer>>,
    /// The root item as last written to the root tree (for fs trees and the
    /// extent/csum/dev trees); the root tree and chunk tree live in the super block.
    pub root_item: RefCell<RootItem>,
    /// The transaction that last modified this root (kernel: last_trans).
    pub last_trans: Cell<u64>,
    /// COW every block, even of the running transaction (snapshot in progress).
    pub force_cow: Cell<bool>,
    /// The root item must be written at commit (kernel: the dirty root list).
    pub dirty: Cell<bool>,
    /// Highest inode number in use (fs trees).
    pub highest_objectid: Cell<u64>,
}

impl Root {
    pub fn new(objectid: u64, node: Rc<ExtentBuffer>, root_item: RootItem) -> Rc<Root> {
        Rc::new(Root {
            objectid,
            node: RefCell::new(node),
            root_item: RefCell::new(root_item),
            last_trans: Cell::new(0),
            force_cow: Cell::new(false),
            dirty: Cell::new(false),
            highest_objectid: Cell::new(0),
        })
    }

    /// btrfs_root_node: the current root block, referenced.
    pub fn node(&self) -> Rc<ExtentBuffer> {
        self.node.borrow().clone()
    }

    /// Point the root at a new block (after COW of the root or a split that
    /// grows the tree). The caller holds the new block's write lock.
    pub fn set_node(&self, eb: Rc<ExtentBuffer>) {
        *self.node.borrow_mut() = eb;
    }

    /// Subvolume trees charge COWs to the handle's reserve; the others to
    /// the delayed-refs, global or chunk reserves.
    pub fn is_subvolume(&self) -> bool {
        is_fstree(self.objectid)
    }

    pub fn name(&self) -> String {
        match self.objectid {
            ROOT_TREE_OBJECTID => "root".into(),
            EXTENT_TREE_OBJECTID => "extent".into(),
            CHUNK_TREE_OBJECTID => "chunk".into(),
            DEV_TREE_OBJECTID => "dev".into(),
            CSUM_TREE_OBJECTID => "csum".into(),
            5 => "fs".into(),
            id => format!("subvol{id}"),
        }
    }
}

/// Per-search statistics, accumulated over the filesystem's life: the
/// report shows COWs per search (a histogram) and restarts by reason.
#[derive(Debug, Default)]
pub struct SearchStats {
    pub searches: Cell<u64>,
    pub cows: Cell<u64>,
    /// Restarts by reason, indexed like `RestartReason::ALL`.
    pub restarts: [Cell<u64>; 4],
    /// COWs done by one search -> number of searches.
    pub cows_per_search: RefCell<std::collections::BTreeMap<u32, u64>>,
    /// Restarts of one search -> number of searches.
    pub restarts_per_search: RefCell<std::collections::BTreeMap<u32, u64>>,
}

/// How a path holds the block at one level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathLock {
    #[default]
    None,
    Read,
    Write,
}

/// A path from a root to a leaf (kernel: struct btrfs_path). Dropping it
/// releases every lock it holds (btrfs_free_path).
#[derive(Default)]
pub struct Path {
    pub nodes: [Option<Rc<ExtentBuffer>>; MAX_LEVEL],
    /// The slot at each level; at the leaf it may equal nritems (insert at end).
    pub slots: [usize; MAX_LEVEL],
    pub locks: [PathLock; MAX_LEVEL],
    /// Keep every lock taken on the way down (no unlock_up).
    pub keep_locks: bool,
    /// Stop the search at this level.
    pub lowest_level: u8,
    /// Searching for a split: search_slot leaves room for extending the item.
    pub search_for_split: bool,
    /// Do not lock at all (read-only searches of a quiescent tree, mount, check).
    pub skip_locking: bool,
}

impl Path {
    pub fn new() -> Self {
        Self::default()
    }

    /// Unlock the block at `level` if this path holds a lock on it.
    pub fn unlock_level(&mut self, level: usize) {
        if let Some(eb) = &self.nodes[level] {
            match self.locks[level] {
                PathLock::Read => tree_read_unlock(eb),
                PathLock::Write => tree_unlock(eb),
                PathLock::None => {}
            }
        }
        self.locks[level] = PathLock::None;
    }

    /// btrfs_release_path: drop every lock and reference.
    pub fn release(&mut self) {
        for level in 0..MAX_LEVEL {
            self.unlock_level(level);
            self.nodes[level] = None;
            self.slots[level] = 0;
        }
    }
}

impl Drop for Path {
    fn drop(&mut self) {
        self.release();
    }
}
