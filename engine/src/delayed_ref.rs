//! Delayed references to tree blocks (kernel: delayed-ref.c). Running them
//! is extent_tree.rs's `run_delayed_refs`, as in extent-tree.c.
//!
//! Every tree block allocated or freed queues a reference change instead of
//! updating the extent tree at once. Changes to one block merge in its head
//! (ref_mod). Running them inserts or deletes the block's METADATA_ITEM in
//! the extent tree; those searches COW extent tree blocks, which queue more
//! changes, so the commit runs them until none is left.
//!
//! Data extents queue changes too: each file extent item inserted or
//! dropped adds or removes one reference keyed by (root, inode, file offset
//! minus extent offset), the kernel's EXTENT_DATA_REF; they merge per extent
//! and per key, and running them inserts, updates or deletes the data
//! EXTENT_ITEM (and, when the last reference goes, the extent's checksums).
//!
//! Departures: tree block references of unshared trees only (no shared
//! FULL_BACKREF refs); heads run in bytenr order, tree and data alike.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// The net change queued for one tree block (kernel: btrfs_delayed_ref_head
/// with its one tree ref).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefHead {
    pub bytenr: u64,
    pub level: u8,
    pub root: u64,
    /// +1 per allocation, -1 per free.
    pub ref_mod: i64,
    /// Allocated in this transaction: its METADATA_ITEM does not exist yet.
    pub must_insert_reserved: bool,
}

/// The transaction's queue of delayed refs (kernel: btrfs_delayed_ref_root).
#[derive(Default)]
pub struct DelayedRefRoot {
    heads: RefCell<BTreeMap<u64, RefHead>>,
    data_heads: RefCell<BTreeMap<u64, DataRefHead>>,
    /// Reference changes queued over the transaction's life.
    pub queued: Cell<u64>,
    /// Heads run (items inserted or deleted) over the transaction's life.
    pub run: Cell<u64>,
}

impl DelayedRefRoot {
    pub fn len(&self) -> usize {
        self.heads.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.borrow().is_empty() && self.data_heads.borrow().is_empty()
    }

    /// Queue an allocation (+1) or a free (-1) of the tree block at `bytenr`.
    pub fn add_tree_ref(&self, bytenr: u64, level: u8, root: u64, allocated: bool) {
        self.queued.set(self.queued.get() + 1);
        let mut heads = self.heads.borrow_mut();
        let head = heads.entry(bytenr).or_insert(RefHead {
            bytenr,
            level,
            root,
            ref_mod: 0,
            must_insert_reserved: false,
        });
        if head.ref_mod == 0 {
            // Allocated and freed in this transaction (never written, so at
            // once free): the range may go to any tree next.
            head.root = root;
        }
        assert_eq!(
            head.root, root,
            "tree block {bytenr} referenced by two roots (shared blocks are not modelled)"
        );
        if allocated {
            head.ref_mod += 1;
            head.must_insert_reserved = true;
            head.level = level;
        } else {
            head.ref_mod -= 1;
        }
        assert!((-1..=1).contains(&head.ref_mod), "tree block {bytenr}: net ref change {}", head.ref_mod);
    }

    pub fn pop_first(&self) -> Option<RefHead> {
        self.heads.borrow_mut().pop_first().map(|(_, head)| head)
    }

    /// Queue one more (`delta` +1) or one less (-1) reference of the data
    /// extent `bytenr`+`num_bytes` from file extents of `key`; `allocated`:
    /// the extent was allocated in this transaction and has no EXTENT_ITEM
    /// yet (`must_insert_reserved`).
    pub fn add_data_ref(&self, bytenr: u64, num_bytes: u64, key: DataRefKey, delta: i64, allocated: bool) {
        self.queued.set(self.queued.get() + 1);
        let mut heads = self.data_heads.borrow_mut();
        let head = heads.entry(bytenr).or_insert(DataRefHead {
            bytenr,
            num_bytes,
            refs: BTreeMap::new(),
            must_insert_reserved: false,
        });
        assert_eq!(head.num_bytes, num_bytes, "data extent {bytenr} queued with two lengths");
        if allocated {
            assert!(!head.must_insert_reserved, "data extent {bytenr} allocated twice");
            head.must_insert_reserved = true;
        }
        let count = head.refs.entry(key).or_insert(0);
        *count += delta;
        if *count == 0 {
            head.refs.remove(&key);
        }
    }

    /// The queued change of the lowest extent, tree block or data.
    pub fn pop_first_any(&self) -> Option<Head> {
        let tree = self.heads.borrow().keys().next().copied();
        let data = self.data_heads.borrow().keys().next().copied();
        match (tree, data) {
            (Some(t), Some(d)) if d < t => {
                self.data_heads.borrow_mut().pop_first().map(|(_, h)| Head::Data(h))
            }
            (Some(_), _) => self.pop_first().map(Head::Tree),
            (None, Some(_)) => self.data_heads.borrow_mut().pop_first().map(|(_, h)| Head::Data(h)),
            (None, None) => None,
        }
    }

    /// Data heads queued and not yet run.
    pub fn data_len(&self) -> usize {
        self.data_heads.borrow().len()
    }
}

/// Who references a data extent: the kernel's `btrfs_extent_data_ref`
/// without its count (tree, inode, file offset of the extent's start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataRefKey {
    pub root: u64,
    pub objectid: u64,
    pub offset: u64,
}

/// The net changes queued for one data extent (a data `btrfs_delayed_ref_head`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRefHead {
    pub bytenr: u64,
    pub num_bytes: u64,
    /// Net reference change per referencing key; zeros are dropped.
    pub refs: BTreeMap<DataRefKey, i64>,
    pub must_insert_reserved: bool,
}

/// A queued head of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    Tree(RefHead),
    Data(DataRefHead),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_and_free_in_one_transaction_cancel() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, true);
        refs.add_tree_ref(16384, 0, 5, false);
        refs.add_tree_ref(32768, 1, 5, false);
        assert_eq!(refs.queued.get(), 3);
        let first = refs.pop_first().unwrap();
        assert_eq!((first.ref_mod, first.must_insert_reserved), (0, true));
        let second = refs.pop_first().unwrap();
        assert_eq!((second.bytenr, second.ref_mod, second.must_insert_reserved), (32768, -1, false));
        assert!(refs.is_empty());
    }

    #[test]
    fn a_cancelled_block_may_be_reused_by_another_tree() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, true);
        refs.add_tree_ref(16384, 0, 5, false);
        refs.add_tree_ref(16384, 1, 2, true);
        let head = refs.pop_first().unwrap();
        assert_eq!((head.root, head.level, head.ref_mod, head.must_insert_reserved), (2, 1, 1, true));
    }

    #[test]
    fn data_refs_merge_per_key_and_run_in_bytenr_order_with_tree_blocks() {
        let refs = DelayedRefRoot::default();
        let key = DataRefKey { root: 5, objectid: 257, offset: 0 };
        refs.add_data_ref(1 << 20, 8192, key, 1, true);
        refs.add_data_ref(1 << 20, 8192, key, 1, false);
        refs.add_data_ref(1 << 20, 8192, DataRefKey { offset: 4096, ..key }, 1, false);
        refs.add_data_ref(1 << 20, 8192, DataRefKey { offset: 4096, ..key }, -1, false);
        refs.add_tree_ref(2 << 20, 0, 5, true);
        assert_eq!(refs.data_len(), 1);
        let Some(Head::Data(head)) = refs.pop_first_any() else { panic!("the data head is lower") };
        assert!(head.must_insert_reserved);
        assert_eq!(head.refs.into_iter().collect::<Vec<_>>(), vec![(key, 2)]);
        assert!(matches!(refs.pop_first_any(), Some(Head::Tree(_))));
        assert!(refs.pop_first_any().is_none() && refs.is_empty());
    }

    #[test]
    #[should_panic(expected = "net ref change")]
    fn a_block_freed_twice_is_a_bug() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, false);
        refs.add_tree_ref(16384, 0, 5, false);
    }
}
