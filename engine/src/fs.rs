//! The filesystem instance, the kernel's `struct btrfs_fs_info`
//! (fs/btrfs/fs.h): what every mechanism reaches through `fs_info`.
//!
//! For now it holds the environment, the geometry, the fix policy, the
//! extent buffer cache (`buffer_tree`) with its writeback state, and
//! counters. It will grow as the other modules land: the running
//! transaction and its commit state, the roots, the block reserves
//! (`trans_block_rsv`, `global_block_rsv`, `delayed_refs_rsv`, ...), the
//! space_info per type, the super block copy, the fs error state
//! (`fs_error`, read-only after an abort).

use std::cell::Cell;
use std::rc::{Rc, Weak};

use crate::block_group::{BlockGroupCache, type_flags};
use crate::block_rsv::{FsBlockRsvs, GlobalRootsUsed};
use crate::ctree::Root;
use crate::env::Env;
use crate::extent_io::{BtreeShrinker, BufferTree};
use crate::fix::FixPolicy;
use crate::format::{
    BLOCK_GROUP_DATA, BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM, CSUM_TREE_OBJECTID, EXTENT_TREE_OBJECTID,
    FSID_SIZE, ROOT_TREE_OBJECTID, SECTORSIZE, check_nodesize,
};
use crate::space_info::{SpaceInfo, SpaceInfoHandle};
use crate::transaction::TransactionControl;

/// Counters of the extent buffer cache and its I/O, for reports and tests.
/// Monotonic.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Extent buffers inserted in the cache (`alloc_extent_buffer` misses).
    pub eb_allocs: Cell<u64>,
    /// `find_extent_buffer` hits.
    pub eb_cache_hits: Cell<u64>,
    /// Tree block read bios submitted.
    pub eb_reads: Cell<u64>,
    /// Reads that failed (device error or verification).
    pub eb_read_errors: Cell<u64>,
    /// Tree block write bios submitted.
    pub eb_writes: Cell<u64>,
    /// Of those, blocks of the running transaction written before its
    /// commit started (reclaim or the flusher: the loop's WRITTEN step).
    pub eb_writes_of_running_transaction: Cell<u64>,
    /// Writes refused by the write-time tree checker.
    pub eb_write_check_failures: Cell<u64>,
    /// Clean ebs dropped by reclaim (`try_release_extent_buffer`).
    pub eb_evictions: Cell<u64>,
    /// Ebs dropped because their block was freed (`free_extent_buffer_stale`).
    pub eb_stale_frees: Cell<u64>,
    /// `lock_extent_buffer_for_io` left a dirty eb alone because of a
    /// search-pin blocker or a writeback inhibitor.
    pub eb_writeback_blocked: Cell<u64>,
    pub eb_writeback_inhibited: Cell<u64>,
}

/// Space accounting of a mounted filesystem.
pub struct Space {
    pub data: SpaceInfoHandle,
    pub metadata: SpaceInfoHandle,
    pub system: SpaceInfoHandle,
    pub rsvs: FsBlockRsvs,
    /// Device bytes in no chunk (shared with the space infos).
    pub unallocated: Rc<Cell<u64>>,
}

impl Space {
    pub fn for_flags(&self, flags: u64) -> &SpaceInfoHandle {
        match type_flags(flags) {
            BLOCK_GROUP_DATA => &self.data,
            BLOCK_GROUP_SYSTEM => &self.system,
            _ => &self.metadata,
        }
    }
}

pub struct FsInfo {
    /// The only way to the world (bios, memory, scheduling, trace).
    pub env: Rc<dyn Env>,
    /// Tree block size in bytes (`fs_info->nodesize`).
    pub nodesize: u32,
    /// Data block size in bytes (`fs_info->sectorsize`), fixed at 4 KiB.
    pub sectorsize: u32,
    /// Which candidate fix for the COW amplification loop is active.
    pub fix: FixPolicy,
    /// The metadata fsid checked on every tree block read, once the super
    /// block is known (`fs_devices->metadata_uuid`); `None` skips the check.
    pub fsid: Cell<Option<[u8; FSID_SIZE]>>,
    /// The extent buffer cache (`fs_info->buffer_tree`), LRU and writeback
    /// cursor; see [`crate::extent_io`].
    pub buffer_tree: BufferTree,
    /// Tree block writes that failed on the device (or were refused by
    /// the write-time tree checker) since mount. A commit that finds it
    /// grew (see [`FsInfo::test_and_clear_btree_err`]) must fail with EIO.
    pub writeback_errors: Cell<u64>,
    /// `BTRFS_FS_BTREE_ERR`: a write of a non-log tree block failed.
    btree_err: Cell<bool>,
    /// `BTRFS_FS_LOG1_ERR`, `BTRFS_FS_LOG2_ERR`: a write of a log tree block
    /// (eb `log_index` 0 or 1) failed.
    log_err: [Cell<bool>; 2],
    pub stats: FsStats,
    /// The running transaction, generations, the abort state.
    pub trans: TransactionControl,
    /// COWs and restarts per search.
    pub search_stats: crate::ctree::SearchStats,
    /// Block groups and their free space.
    pub block_groups: BlockGroupCache,
    /// Space accounting and block reserves, set up at mount once the block
    /// groups are known. Absent only in unit tests of the tree code.
    pub space: std::cell::OnceCell<Space>,
    /// In-memory inodes of the fs tree and their delayed items (the
    /// kernel's inode cache and `fs_info->delayed_root`).
    pub inodes: crate::inode::InodeCache,
    /// File pages, ordered extents and the endio worker's queue (see
    /// [`crate::file`]).
    pub page_cache: crate::file::PageCache,
    /// The log trees and what fsync knows of inodes.
    pub log: crate::tree_log::LogControl,
    /// Every tree, by objectid (root tree 1, extent 2, chunk 3, dev 4, fs 5, csum 7).
    pub roots: std::cell::RefCell<std::collections::BTreeMap<u64, Rc<Root>>>,
    /// The device, its chunks and device extents, the super block copy
    /// (see [`crate::volumes`]).
    pub volumes: crate::volumes::Volumes,
    /// Relocation trees and the relocation lock (see [`crate::relocation`]).
    pub reloc: crate::relocation::RelocControl,
    /// Quota groups (see [`crate::qgroup`]).
    pub qgroup: crate::qgroup::QgroupControl,
    weak: Weak<FsInfo>,
}

impl FsInfo {
    /// A filesystem instance with an empty cache; registers the buffer
    /// cache with the environment's reclaim (the kernel's btree inode
    /// address space, shrunk through `btree_writepages` and
    /// `btree_release_folio`).
    pub fn new(env: Rc<dyn Env>, nodesize: u32, fix: FixPolicy) -> Rc<FsInfo> {
        assert!(check_nodesize(nodesize), "invalid nodesize {nodesize}");
        assert!(nodesize >= SECTORSIZE);
        let fs = Rc::new_cyclic(|weak| FsInfo {
            env: env.clone(),
            nodesize,
            sectorsize: SECTORSIZE,
            fix,
            fsid: Cell::new(None),
            buffer_tree: BufferTree::default(),
            writeback_errors: Cell::new(0),
            btree_err: Cell::new(false),
            log_err: [Cell::new(false), Cell::new(false)],
            stats: FsStats::default(),
            trans: TransactionControl::default(),
            search_stats: Default::default(),
            block_groups: BlockGroupCache::default(),
            roots: Default::default(),
            volumes: Default::default(),
            space: std::cell::OnceCell::new(),
            inodes: Default::default(),
            page_cache: Default::default(),
            log: Default::default(),
            reloc: Default::default(),
            qgroup: Default::default(),
            weak: weak.clone(),
        });
        env.register_shrinker(Rc::new(BtreeShrinker::new(Rc::downgrade(&fs))));
        env.register_shrinker(Rc::new(crate::file::DataShrinker::new(Rc::downgrade(&fs))));
        fs
    }

    /// A weak handle to this instance, for callbacks that may outlive it
    /// (bio completions, the shrinker).
    /// The tree `objectid`; asking for a tree the filesystem does not have
    /// is an engine bug.
    pub fn root(&self, objectid: u64) -> Rc<Root> {
        self.roots.borrow().get(&objectid).cloned().unwrap_or_else(|| panic!("no tree {objectid}"))
    }

    /// Build the space infos from the block groups and fill the block
    /// reserves (kernel: btrfs_init_space_info, btrfs_add_bg_to_space_info,
    /// btrfs_init_global_block_rsv). `unallocated_bytes`: device space not
    /// yet in any chunk, which metadata may overcommit against.
    pub fn init_space(&self, unallocated_bytes: u64) {
        let unallocated = Rc::new(Cell::new(unallocated_bytes));
        let handle = |flags| {
            SpaceInfoHandle::new(
                self.env.clone(),
                SpaceInfo::new(flags, 0),
                self.nodesize,
                unallocated.clone(),
            )
        };
        let (data, metadata, system) =
            (handle(BLOCK_GROUP_DATA), handle(BLOCK_GROUP_METADATA), handle(BLOCK_GROUP_SYSTEM));
        for group in self.block_groups.all() {
            let space = match type_flags(group.flags) {
                BLOCK_GROUP_DATA => &data,
                BLOCK_GROUP_SYSTEM => &system,
                _ => &metadata,
            };
            space.add_block_group(group.length, group.used.get(), 0);
        }
        let rsvs = FsBlockRsvs::new(&metadata, &system, false, self.global_roots_used());
        let space = Space { data, metadata, system, rsvs, unallocated };
        assert!(self.space.set(space).is_ok(), "space accounting set up twice");
    }

    /// The bytes used by the trees the global reserve is sized from.
    pub fn global_roots_used(&self) -> GlobalRootsUsed {
        let used = |id| self.roots.borrow().get(&id).map(|r| r.root_item.borrow().bytes_used);
        GlobalRootsUsed {
            root_tree_bytes: used(ROOT_TREE_OBJECTID).unwrap_or(0),
            extent_tree_bytes: used(EXTENT_TREE_OBJECTID),
            csum_tree_bytes: used(CSUM_TREE_OBJECTID),
            free_space_tree_bytes: None,
            block_group_tree_bytes: None,
        }
    }

    pub fn weak(&self) -> Weak<FsInfo> {
        self.weak.clone()
    }

    /// Record a failed tree block write (`set_btree_ioerr`): the flag of the
    /// tree kind it belongs to and the counter.
    pub fn set_btree_ioerr(&self, log_index: i8) {
        self.writeback_errors.set(self.writeback_errors.get() + 1);
        match log_index {
            -1 => self.btree_err.set(true),
            0 | 1 => self.log_err[log_index as usize].set(true),
            other => panic!("bad eb log_index {other}"),
        }
    }

    /// Whether a non-log tree block write failed since the last call
    /// (`test_and_clear_bit(BTRFS_FS_BTREE_ERR)`, as
    /// `btrfs_write_and_wait_transaction` does before writing the super).
    pub fn test_and_clear_btree_err(&self) -> bool {
        self.btree_err.replace(false)
    }

    /// Same for the log tree of `log_index` (0 or 1).
    pub fn test_and_clear_log_err(&self, log_index: usize) -> bool {
        self.log_err[log_index].replace(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testenv::TestEnv;

    #[test]
    fn new_registers_the_btree_and_data_shrinkers() {
        let env = TestEnv::new(1 << 20);
        let fs = FsInfo::new(env.clone(), 16384, FixPolicy::None);
        assert_eq!(fs.nodesize, 16384);
        let shrinkers = env.shrinkers.borrow();
        assert_eq!(shrinkers.len(), 2);
        assert_eq!(shrinkers[0].name(), "btree");
        assert_eq!(shrinkers[1].name(), "data");
        assert_eq!(shrinkers[0].count(), Default::default());
        assert_eq!(shrinkers[1].count(), Default::default());
    }

    #[test]
    #[should_panic(expected = "invalid nodesize")]
    fn rejects_bad_nodesize() {
        FsInfo::new(TestEnv::new(4096), 12288, FixPolicy::None);
    }

    #[test]
    fn btree_errors_are_sticky_until_tested() {
        let fs = FsInfo::new(TestEnv::new(4096), 4096, FixPolicy::None);
        fs.set_btree_ioerr(-1);
        fs.set_btree_ioerr(1);
        assert_eq!(fs.writeback_errors.get(), 2);
        assert!(fs.test_and_clear_btree_err());
        assert!(!fs.test_and_clear_btree_err());
        assert!(!fs.test_and_clear_log_err(0));
        assert!(fs.test_and_clear_log_err(1));
    }
}
