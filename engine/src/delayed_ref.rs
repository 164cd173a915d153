//! Delayed references to tree blocks (kernel: delayed-ref.c). Running them
//! is extent_tree.rs's `run_delayed_refs`, as in extent-tree.c.
//!
//! Every tree block allocated or freed queues a reference change instead of
//! updating the extent tree at once. Changes to one block merge in its head
//! (ref_mod). Running them inserts or deletes the block's METADATA_ITEM in
//! the extent tree; those searches COW extent tree blocks, which queue more
//! changes, so the commit runs them until none is left.
//!
//! Departures: only tree block references of unshared trees (no shared
//! FULL_BACKREF refs, no data refs yet); a head is processed in bytenr order.

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
        self.heads.borrow().is_empty()
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
    #[should_panic(expected = "net ref change")]
    fn a_block_freed_twice_is_a_bug() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, false);
        refs.add_tree_ref(16384, 0, 5, false);
    }
}
