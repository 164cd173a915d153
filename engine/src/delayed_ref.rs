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
//! Several tasks may run the queue at once (two committers of one
//! transaction, the space flusher). As in the kernel a head being run is
//! "processing": other runners skip it, and a change queued for its extent
//! meanwhile waits in a new head until the first one is done, so that a
//! free never overtakes the insert of the same block's item (fsstress swarm
//! seed 1627 aborted with EUCLEAN that way). A run of everything waits for
//! the heads other tasks are processing.
//!
//! Snapshots share blocks: a block then has several references, by tree
//! (TREE_BLOCK_REF, EXTENT_DATA_REF) or by FULL_BACKREF parent
//! (SHARED_BLOCK_REF, SHARED_DATA_REF), and a head carries the net change
//! per reference plus the extent flags to set (the kernel's extent op).
//!
//! Departure: heads run in bytenr order, tree and data alike.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};

use crate::wait::WaitQueue;

/// Who references a tree block: the kernel's TREE_BLOCK_REF (a tree, for
/// every pointer from blocks that tree owns without FULL_BACKREF) or
/// SHARED_BLOCK_REF (one parent block that has FULL_BACKREF).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TreeRef {
    Root(u64),
    Shared { parent: u64 },
}

/// The changes queued for one tree block (kernel: btrfs_delayed_ref_head
/// with its tree refs and extent op).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefHead {
    pub bytenr: u64,
    pub level: u8,
    /// Net change per reference; zeros are dropped.
    pub refs: BTreeMap<TreeRef, i64>,
    /// Allocated in this transaction: its METADATA_ITEM does not exist yet.
    pub must_insert_reserved: bool,
    /// Extent flags to set (the delayed extent op: FULL_BACKREF).
    pub set_flags: u64,
    /// The free that takes the last reference already gave the block's space
    /// back (btrfs_free_tree_block with last_ref); otherwise the run that
    /// deletes the item does.
    pub space_freed: bool,
}

impl RefHead {
    fn new(bytenr: u64, level: u8) -> RefHead {
        RefHead {
            bytenr,
            level,
            refs: BTreeMap::new(),
            must_insert_reserved: false,
            set_flags: 0,
            space_freed: false,
        }
    }

    /// Net change of the reference count.
    pub fn ref_mod(&self) -> i64 {
        self.refs.values().sum()
    }
}

/// The transaction's queue of delayed refs (kernel: btrfs_delayed_ref_root).
#[derive(Default)]
pub struct DelayedRefRoot {
    heads: RefCell<BTreeMap<u64, RefHead>>,
    data_heads: RefCell<BTreeMap<u64, DataRefHead>>,
    /// Extents whose head a task is running (kernel: head->processing).
    processing: RefCell<BTreeSet<u64>>,
    /// Woken when a head stops processing.
    pub processed: WaitQueue,
    /// Reference changes queued over the transaction's life.
    pub queued: Cell<u64>,
    /// Heads whose run ended, over the transaction's life (a lookup that
    /// searched meanwhile looks again).
    pub done: Cell<u64>,
    /// Extents whose references changed, for qgroup accounting.
    pub qgroup: crate::qgroup::QgroupRecords,
}

impl DelayedRefRoot {
    pub fn len(&self) -> usize {
        self.heads.borrow().len()
    }

    /// Nothing queued and nothing being run.
    pub fn is_empty(&self) -> bool {
        self.heads.borrow().is_empty() && self.data_heads.borrow().is_empty() && !self.is_processing()
    }

    /// Whether some task is running a head.
    pub fn is_processing(&self) -> bool {
        !self.processing.borrow().is_empty()
    }

    /// Queue an allocation (+1) or a free (-1) of the tree block at `bytenr`
    /// by its owner `root` (the unshared case).
    pub fn add_tree_ref(&self, bytenr: u64, level: u8, root: u64, allocated: bool) {
        let delta = if allocated { 1 } else { -1 };
        self.add_tree_ref_mod(bytenr, level, TreeRef::Root(root), delta, allocated, !allocated);
    }

    /// Queue `delta` (±1) references `key` of the tree block at `bytenr`.
    /// `allocated`: the block is new in this transaction; `last_ref`: this
    /// drop frees the block and its space was given back already.
    pub fn add_tree_ref_mod(
        &self,
        bytenr: u64,
        level: u8,
        key: TreeRef,
        delta: i64,
        allocated: bool,
        last_ref: bool,
    ) {
        self.queued.set(self.queued.get() + 1);
        let by_root = match key {
            TreeRef::Root(root) => Some(root),
            TreeRef::Shared { .. } => None,
        };
        self.qgroup.trace_tree(bytenr, level, by_root);
        let mut heads = self.heads.borrow_mut();
        let head = heads.entry(bytenr).or_insert_with(|| RefHead::new(bytenr, level));
        if allocated {
            assert!(head.refs.is_empty(), "tree block {bytenr} allocated while referenced: {:?}", head.refs);
            // Allocated and freed in this transaction before (never written,
            // so at once free): the range may go to any tree next.
            *head = RefHead { must_insert_reserved: true, ..RefHead::new(bytenr, level) };
        }
        head.space_freed |= last_ref;
        let count = head.refs.entry(key).or_insert(0);
        *count += delta;
        assert!((-1..=1).contains(count), "tree block {bytenr}: net ref change {count} of {key:?}");
        if *count == 0 {
            head.refs.remove(&key);
        }
    }

    /// Queue setting `flags` in the block's extent item (kernel:
    /// btrfs_set_disk_extent_flags, a delayed extent op).
    pub fn set_tree_flags(&self, bytenr: u64, level: u8, flags: u64) {
        self.queued.set(self.queued.get() + 1);
        let mut heads = self.heads.borrow_mut();
        heads.entry(bytenr).or_insert_with(|| RefHead::new(bytenr, level)).set_flags |= flags;
    }

    /// The queued net change of `bytenr`'s references and flags, for
    /// btrfs_lookup_extent_info: (ref_mod, flags).
    pub fn pending_tree(&self, bytenr: u64) -> Option<(i64, u64)> {
        let heads = self.heads.borrow();
        let head = heads.get(&bytenr)?;
        Some((head.ref_mod(), head.set_flags))
    }

    /// Whether `bytenr` was allocated in this transaction and its head,
    /// with the insert of its item, has not run yet: its last free may give
    /// the space back at once (kernel: check_ref_cleanup).
    pub fn allocated_unrun(&self, bytenr: u64) -> bool {
        self.heads.borrow().get(&bytenr).is_some_and(|head| head.must_insert_reserved)
    }

    /// Whether a task is running the head of `bytenr`.
    pub fn is_processing_head(&self, bytenr: u64) -> bool {
        self.processing.borrow().contains(&bytenr)
    }

    /// Queue one more (`delta` +1) or one less (-1) reference of the data
    /// extent `bytenr`+`num_bytes` from file extents of `key`; `allocated`:
    /// the extent was allocated in this transaction and has no EXTENT_ITEM
    /// yet (`must_insert_reserved`).
    pub fn add_data_ref(
        &self,
        bytenr: u64,
        num_bytes: u64,
        key: impl Into<DataRef>,
        delta: i64,
        allocated: bool,
    ) {
        let key = key.into();
        self.queued.set(self.queued.get() + 1);
        let by_root = match key {
            DataRef::Keyed(key) => Some(key.root),
            DataRef::Shared { .. } => None,
        };
        self.qgroup.trace_data(bytenr, num_bytes, by_root);
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

    /// Take the queued change of the lowest extent, tree block or data,
    /// that no other task is running, and mark that extent processing until
    /// [`Self::head_done`] (kernel: btrfs_select_ref_head).
    pub fn select_head(&self) -> Option<Head> {
        let processing = self.processing.borrow();
        let idle = |bytenr: &&u64| !processing.contains(*bytenr);
        let tree = self.heads.borrow().keys().find(idle).copied();
        let data = self.data_heads.borrow().keys().find(idle).copied();
        drop(processing);
        let head = match (tree, data) {
            (Some(t), Some(d)) if d < t => self.data_heads.borrow_mut().remove(&d).map(Head::Data),
            (Some(t), _) => self.heads.borrow_mut().remove(&t).map(Head::Tree),
            (None, Some(d)) => self.data_heads.borrow_mut().remove(&d).map(Head::Data),
            (None, None) => None,
        }?;
        self.processing.borrow_mut().insert(head.bytenr());
        Some(head)
    }

    /// The head of `bytenr` has been run (or its run failed).
    pub fn head_done(&self, bytenr: u64) {
        self.processing.borrow_mut().remove(&bytenr);
        self.done.set(self.done.get() + 1);
        self.processed.wake_all();
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

/// A reference to a data extent: keyed by file extent (EXTENT_DATA_REF,
/// counted per leaf of an unshared tree) or by the parent leaf of a shared
/// tree (SHARED_DATA_REF, counted per file extent item in that leaf).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataRef {
    Keyed(DataRefKey),
    Shared { parent: u64 },
}

impl From<DataRefKey> for DataRef {
    fn from(key: DataRefKey) -> DataRef {
        DataRef::Keyed(key)
    }
}

/// The net changes queued for one data extent (a data `btrfs_delayed_ref_head`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRefHead {
    pub bytenr: u64,
    pub num_bytes: u64,
    /// Net reference change per referencing key; zeros are dropped.
    pub refs: BTreeMap<DataRef, i64>,
    pub must_insert_reserved: bool,
}

/// A queued head of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    Tree(RefHead),
    Data(DataRefHead),
}

impl Head {
    pub fn bytenr(&self) -> u64 {
        match self {
            Head::Tree(head) => head.bytenr,
            Head::Data(head) => head.bytenr,
        }
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
        let first = run(&refs).unwrap();
        assert_eq!((first.ref_mod(), first.refs.len(), first.must_insert_reserved), (0, 0, true));
        let second = run(&refs).unwrap();
        assert_eq!((second.bytenr, second.ref_mod(), second.must_insert_reserved), (32768, -1, false));
        assert!(refs.is_empty());
    }

    #[test]
    fn a_cancelled_block_may_be_reused_by_another_tree() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, true);
        refs.add_tree_ref(16384, 0, 5, false);
        refs.add_tree_ref(16384, 1, 2, true);
        let head = run(&refs).unwrap();
        let refs: Vec<_> = head.refs.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!((head.level, head.must_insert_reserved), (1, true));
        assert_eq!(refs, vec![(TreeRef::Root(2), 1)]);
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
        let Some(Head::Data(head)) = refs.select_head() else { panic!("the data head is lower") };
        refs.head_done(head.bytenr);
        assert!(head.must_insert_reserved);
        assert_eq!(head.refs.into_iter().collect::<Vec<_>>(), vec![(DataRef::Keyed(key), 2)]);
        assert!(matches!(run(&refs), Some(_)));
        assert!(refs.select_head().is_none() && refs.is_empty());
    }

    /// A change queued while another task runs the same block's head waits
    /// for that run: the free of a block must not overtake its insert.
    #[test]
    fn a_head_being_run_is_skipped_and_later_changes_wait_for_it() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, true);
        refs.add_tree_ref(32768, 0, 5, true);
        let Some(Head::Tree(insert)) = refs.select_head() else { panic!("a tree head") };
        assert_eq!((insert.bytenr, insert.ref_mod()), (16384, 1));
        refs.add_tree_ref(16384, 0, 5, false);
        let Some(Head::Tree(other)) = refs.select_head() else { panic!("a tree head") };
        assert_eq!(other.bytenr, 32768, "the block being inserted is skipped");
        refs.head_done(32768);
        assert!(refs.select_head().is_none() && refs.is_processing() && !refs.is_empty());
        refs.head_done(16384);
        let free = run(&refs).unwrap();
        assert_eq!((free.bytenr, free.ref_mod(), free.must_insert_reserved), (16384, -1, false));
        assert!(refs.is_empty());
    }

    /// Select a tree head and finish it at once.
    fn run(refs: &DelayedRefRoot) -> Option<RefHead> {
        let head = refs.select_head()?;
        refs.head_done(head.bytenr());
        match head {
            Head::Tree(head) => Some(head),
            Head::Data(head) => panic!("a data head {head:?}"),
        }
    }

    /// A shared block: its owner's drop, a parent reference and the
    /// FULL_BACKREF flag merge in one head, which lookups read as pending.
    #[test]
    fn shared_block_references_merge_per_key_with_their_flags() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref_mod(16384, 0, TreeRef::Shared { parent: 32768 }, 1, false, false);
        refs.add_tree_ref_mod(16384, 0, TreeRef::Root(5), -1, false, false);
        refs.set_tree_flags(16384, 0, 1 << 8);
        assert_eq!(refs.pending_tree(16384), Some((0, 1 << 8)));
        let head = run(&refs).unwrap();
        assert_eq!(head.refs.len(), 2);
        assert!(!head.space_freed);
    }

    #[test]
    #[should_panic(expected = "net ref change")]
    fn a_block_freed_twice_is_a_bug() {
        let refs = DelayedRefRoot::default();
        refs.add_tree_ref(16384, 0, 5, false);
        refs.add_tree_ref(16384, 0, 5, false);
    }
}
