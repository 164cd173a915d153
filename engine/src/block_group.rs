//! Block groups and their free space (kernel: block-group.c, free-space-cache.c,
//! the allocation half of extent-tree.c's find_free_extent).
//!
//! Departures from the kernel: one device, and a block group's logical range
//! maps to the same device offsets (identity chunk mapping); free space is an
//! in-memory map of free ranges per block group, rebuilt at mount from the
//! extent tree (the kernel's free-space cache/tree are not modelled); the
//! allocator is first-fit from a per-type cursor (the kernel's clustered
//! allocation is not modelled).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use crate::format::{BLOCK_GROUP_DATA, BLOCK_GROUP_METADATA, BLOCK_GROUP_SYSTEM};

/// One block group: a range of logical addresses of one type.
#[derive(Debug)]
pub struct BlockGroup {
    pub start: u64,
    pub length: u64,
    /// BLOCK_GROUP_{DATA,METADATA,SYSTEM}.
    pub flags: u64,
    /// Bytes of allocated extents, as the BLOCK_GROUP_ITEM records them.
    pub used: Cell<u64>,
    /// Bytes freed in the running transaction that may not be reused before
    /// it commits (the kernel's pinned extents).
    pub pinned: Cell<u64>,
    /// Read-only: the allocator skips it, as while it is relocated
    /// (`cache->ro`). Its free bytes count as `bytes_readonly`.
    pub ro: Cell<bool>,
    /// Free ranges: start -> length, disjoint and coalesced.
    free: RefCell<BTreeMap<u64, u64>>,
}

impl BlockGroup {
    pub fn new(start: u64, length: u64, flags: u64) -> Self {
        let mut free = BTreeMap::new();
        free.insert(start, length);
        Self {
            start,
            length,
            flags,
            used: Cell::new(0),
            pinned: Cell::new(0),
            ro: Cell::new(false),
            free: RefCell::new(free),
        }
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.borrow().values().sum()
    }

    pub fn contains(&self, bytenr: u64) -> bool {
        self.start <= bytenr && bytenr < self.start + self.length
    }

    /// First fit at or after `hint` (wrapping), aligned to `align`.
    fn take(&self, num_bytes: u64, align: u64, hint: u64) -> Option<u64> {
        let mut free = self.free.borrow_mut();
        let fits = |(&start, &len): (&u64, &u64)| {
            let aligned = start.next_multiple_of(align);
            (aligned + num_bytes <= start + len).then_some((start, len, aligned))
        };
        let found = free.range(hint..).find_map(fits).or_else(|| free.range(..hint).find_map(fits));
        let (start, len, aligned) = found?;
        free.remove(&start);
        if aligned > start {
            free.insert(start, aligned - start);
        }
        let end = aligned + num_bytes;
        if end < start + len {
            free.insert(end, start + len - end);
        }
        Some(aligned)
    }

    /// Return a range to free space, coalescing with neighbours. Returning a
    /// range that is already free is an engine bug (a double free).
    fn give_back(&self, bytenr: u64, num_bytes: u64) {
        assert!(self.contains(bytenr) && bytenr + num_bytes <= self.start + self.length);
        let mut free = self.free.borrow_mut();
        let (mut start, mut len) = (bytenr, num_bytes);
        if let Some((&prev, &prev_len)) = free.range(..bytenr).next_back() {
            assert!(
                prev + prev_len <= bytenr,
                "double free of {bytenr}+{num_bytes}: overlaps free {prev}+{prev_len}"
            );
            if prev + prev_len == bytenr {
                free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some((&next, &next_len)) = free.range(bytenr..).next() {
            assert!(bytenr + num_bytes <= next, "double free of {bytenr}+{num_bytes}: overlaps free {next}");
            if bytenr + num_bytes == next {
                free.remove(&next);
                len += next_len;
            }
        }
        free.insert(start, len);
    }

    /// Whether `[bytenr, bytenr + num_bytes)` is free space.
    pub fn is_free(&self, bytenr: u64, num_bytes: u64) -> bool {
        let free = self.free.borrow();
        free.range(..=bytenr).next_back().is_some_and(|(&start, &len)| bytenr + num_bytes <= start + len)
    }

    /// Mark a range allocated while rebuilding free space at mount.
    pub fn exclude(&self, bytenr: u64, num_bytes: u64) {
        let mut free = self.free.borrow_mut();
        let (&start, &len) = free.range(..=bytenr).next_back().expect("excluded range lies in free space");
        assert!(bytenr + num_bytes <= start + len, "excluded range {bytenr}+{num_bytes} is not free");
        free.remove(&start);
        if bytenr > start {
            free.insert(start, bytenr - start);
        }
        if bytenr + num_bytes < start + len {
            free.insert(bytenr + num_bytes, start + len - bytenr - num_bytes);
        }
    }
}

/// Every block group of the filesystem, by start.
#[derive(Debug, Default)]
pub struct BlockGroupCache {
    groups: RefCell<BTreeMap<u64, std::rc::Rc<BlockGroup>>>,
    /// Where the last allocation of each type ended (allocation cursor).
    cursor: RefCell<BTreeMap<u64, u64>>,
}

/// Which type of space an allocation is for.
pub fn type_flags(flags: u64) -> u64 {
    flags & (BLOCK_GROUP_DATA | BLOCK_GROUP_METADATA | BLOCK_GROUP_SYSTEM)
}

impl BlockGroupCache {
    pub fn add(&self, group: BlockGroup) -> std::rc::Rc<BlockGroup> {
        let group = std::rc::Rc::new(group);
        let previous = self.groups.borrow_mut().insert(group.start, group.clone());
        assert!(previous.is_none(), "block group at {} added twice", group.start);
        group
    }

    pub fn lookup(&self, bytenr: u64) -> Option<std::rc::Rc<BlockGroup>> {
        let groups = self.groups.borrow();
        let (_, group) = groups.range(..=bytenr).next_back()?;
        group.contains(bytenr).then(|| group.clone())
    }

    pub fn all(&self) -> Vec<std::rc::Rc<BlockGroup>> {
        self.groups.borrow().values().cloned().collect()
    }

    /// Total, used and free bytes of every block group of a type.
    pub fn totals(&self, flags: u64) -> (u64, u64, u64) {
        self.all()
            .iter()
            .filter(|g| type_flags(g.flags) == flags)
            .fold((0, 0, 0), |(t, u, f), g| (t + g.length, u + g.used.get(), f + g.free_bytes()))
    }

    /// find_free_extent: a range of `num_bytes` in a block group of type
    /// `flags`, or None when every group of that type is full (the caller
    /// then allocates a chunk or fails with ENOSPC). The range counts as used.
    pub fn find_free_extent(&self, flags: u64, num_bytes: u64, align: u64) -> Option<u64> {
        let hint = self.cursor.borrow().get(&flags).copied().unwrap_or(0);
        let groups = self.all();
        let ordered = groups
            .iter()
            .filter(|g| type_flags(g.flags) == flags && !g.ro.get())
            .filter(|g| g.start + g.length > hint)
            .chain(
                groups
                    .iter()
                    .filter(|g| type_flags(g.flags) == flags && !g.ro.get() && g.start + g.length <= hint),
            );
        for group in ordered {
            if let Some(bytenr) = group.take(num_bytes, align, hint.max(group.start)) {
                group.used.set(group.used.get() + num_bytes);
                self.cursor.borrow_mut().insert(flags, bytenr + num_bytes);
                return Some(bytenr);
            }
        }
        None
    }

    /// An allocated range is no longer referenced. `pin`: it was written in
    /// a committed or running transaction's view and may not be reused until
    /// the transaction commits (the caller records it for [`unpin`]).
    pub fn free_extent(&self, bytenr: u64, num_bytes: u64, pin: bool) {
        let group =
            self.lookup(bytenr).unwrap_or_else(|| panic!("free of {bytenr} outside every block group"));
        assert!(group.used.get() >= num_bytes, "block group {} used underflow", group.start);
        group.used.set(group.used.get() - num_bytes);
        if pin {
            group.pinned.set(group.pinned.get() + num_bytes);
        } else {
            group.give_back(bytenr, num_bytes);
        }
    }

    /// After a commit: pinned ranges become free space.
    pub fn unpin(&self, bytenr: u64, num_bytes: u64) {
        let group =
            self.lookup(bytenr).unwrap_or_else(|| panic!("unpin of {bytenr} outside every block group"));
        assert!(group.pinned.get() >= num_bytes, "block group {} pinned underflow", group.start);
        group.pinned.set(group.pinned.get() - num_bytes);
        group.give_back(bytenr, num_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: u64 = BLOCK_GROUP_METADATA;

    #[test]
    fn allocates_first_fit_frees_and_coalesces() {
        let cache = BlockGroupCache::default();
        cache.add(BlockGroup::new(1 << 20, 64 << 10, META));
        let a = cache.find_free_extent(META, 16 << 10, 16 << 10).unwrap();
        let b = cache.find_free_extent(META, 16 << 10, 16 << 10).unwrap();
        assert_eq!((a, b), (1 << 20, (1 << 20) + (16 << 10)));
        cache.free_extent(a, 16 << 10, false);
        let (_, used, free) = cache.totals(META);
        assert_eq!((used, free), (16 << 10, 48 << 10));
        cache.free_extent(b, 16 << 10, false);
        assert_eq!(cache.all()[0].free.borrow().len(), 1, "freed ranges coalesce");
    }

    #[test]
    fn pinned_space_is_not_reused_before_unpin() {
        let cache = BlockGroupCache::default();
        cache.add(BlockGroup::new(0, 32 << 10, META));
        let a = cache.find_free_extent(META, 16 << 10, 16 << 10).unwrap();
        let b = cache.find_free_extent(META, 16 << 10, 16 << 10).unwrap();
        cache.free_extent(a, 16 << 10, true);
        assert_eq!(cache.find_free_extent(META, 16 << 10, 16 << 10), None, "pinned until commit");
        cache.unpin(a, 16 << 10);
        assert_eq!(cache.find_free_extent(META, 16 << 10, 16 << 10), Some(a));
        assert_ne!(a, b);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn a_double_free_is_a_bug() {
        let cache = BlockGroupCache::default();
        cache.add(BlockGroup::new(0, 64 << 10, META));
        let a = cache.find_free_extent(META, 16 << 10, 16 << 10).unwrap();
        cache.free_extent(a, 16 << 10, false);
        cache.all()[0].used.set(16 << 10);
        cache.free_extent(a, 16 << 10, false);
    }

    #[test]
    fn a_read_only_group_is_skipped() {
        let cache = BlockGroupCache::default();
        let first = cache.add(BlockGroup::new(0, 32 << 10, META));
        cache.add(BlockGroup::new(1 << 20, 32 << 10, META));
        first.ro.set(true);
        assert_eq!(cache.find_free_extent(META, 16 << 10, 16 << 10), Some(1 << 20));
        assert_eq!(cache.find_free_extent(META, 16 << 10, 16 << 10), Some((1 << 20) + (16 << 10)));
        assert_eq!(
            cache.find_free_extent(META, 16 << 10, 16 << 10),
            None,
            "only the read-only group has room"
        );
    }

    #[test]
    fn exclude_marks_mounted_extents_used() {
        let group = BlockGroup::new(0, 64 << 10, META);
        group.exclude(16 << 10, 16 << 10);
        assert_eq!(group.free_bytes(), 48 << 10);
        assert_eq!(group.take(32 << 10, 16 << 10, 0), Some(32 << 10));
    }
}
