//! An offline filesystem checker (btrfs-progs `btrfs check`, read-only).
//!
//! `check` mounts the image afresh (its own buffer cache, nothing shared with
//! a running filesystem), so it sees exactly what a crash at this instant
//! would leave, and verifies:
//! - every block reachable from a root: checksum, bytenr, level, the
//!   generation its parent pointer names ("parent transid verify failed"),
//!   its first key against the parent's key, the tree checker;
//! - keys sorted within and across blocks of each tree;
//! - every reachable tree block has exactly one METADATA_ITEM with the
//!   right level and exactly the references the trees make: one by each
//!   tree whose root it is, and one per parent block, by that parent if the
//!   parent is FULL_BACKREF, else by the parent's owner (so a block shared
//!   by snapshots is counted once per distinct parent); every METADATA_ITEM
//!   names a reachable block; only subvolume trees share blocks;
//! - the space accounting: each block group's BLOCK_GROUP_ITEM `used`
//!   equals the extents allocated in it;
//! - the namespace: DIR_ITEM, DIR_INDEX and INODE_REF agree, link counts,
//!   directory sizes, every name points at an inode that exists;
//! - file data: file extents of an inode do not overlap, an inline extent
//!   is the file's first, each inode's `nbytes` is what its extents hold;
//!   every regular file extent names a data EXTENT_ITEM whose inline
//!   references equal what the leaves holding file extents make (per leaf,
//!   by the leaf if it is FULL_BACKREF, else by its owner, inode and
//!   offset) and none is left unreferenced; every subvolume, snapshots too,
//!   gets the file and namespace checks; every sector of every data extent has
//!   exactly one checksum and no checksum lies outside a data extent;
//! - a directory entry that links a subvolume (location ROOT_ITEM) counts in
//!   its directory's size and has its DIR_INDEX, and a snapshot holds only
//!   links to subvolumes made before it (one to itself or a later one
//!   means the snapshot changed after it was taken);
//! - with quotas on, each subvolume's QGROUP_INFO: `rfer` the tree blocks
//!   and data extents its trees reach, `excl` those no other subvolume
//!   reaches; a qgroup of a deleted subvolume counts nothing.
//!
//! It never repairs: every finding is a line in [`CheckReport::errors`].

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use crate::accessors::{
    header_level, header_nritems, item_data, item_key, node_blockptr, node_key, node_ptr_generation,
};
use crate::disk_io::open_ctree_for_check;
use crate::env::Env;
use crate::error::Error;
use crate::extent_io::read_tree_block_verified;
use crate::format::{
    BLOCK_GROUP_ITEM_KEY, BlockGroupItem, DIR_INDEX_KEY, DIR_ITEM_KEY, EXTENT_ITEM_KEY, EXTENT_TREE_OBJECTID,
    ExtentItem, FIRST_FREE_OBJECTID, FS_TREE_OBJECTID, FT_DIR, FixedItem, INODE_ITEM_KEY, INODE_REF_KEY,
    InlineRef, InodeItem, Key, METADATA_ITEM_KEY, QGROUP_INFO_KEY, QGROUP_STATUS_FLAG_INCONSISTENT,
    QGROUP_STATUS_FLAG_ON, QGROUP_STATUS_KEY, QUOTA_TREE_OBJECTID, QgroupInfoItem, QgroupStatusItem,
    ROOT_ITEM_KEY, TREE_RELOC_OBJECTID, dir_items, inode_refs, is_fstree,
};
use crate::fs::FsInfo;

/// The shape of one tree, as `stats.trees.<name>` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeShape {
    pub level: u8,
    pub nodes: u64,
    pub leaves: u64,
    pub items: u64,
    pub bytes_used: u64,
}

/// What a name in the namespace is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryKind {
    Dir,
    File { ino: u64 },
}

#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub errors: Vec<String>,
    /// Tree shapes by tree id.
    pub trees: BTreeMap<u64, TreeShape>,
    /// Every path of the top fs tree ("/a/b"), from its DIR_INDEX items.
    pub namespace: BTreeMap<String, EntryKind>,
    pub generation: u64,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Mount the image on `env` afresh and check it.
pub async fn check(env: Rc<dyn Env>) -> Result<CheckReport, Error> {
    let fs = open_ctree_for_check(env).await?;
    Ok(check_fs(&fs).await)
}

/// Who references an extent, as check recomputes it from the trees and
/// reads it from the extent tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Backref {
    /// TREE_BLOCK_REF: a tree (root or owner of unshared parents).
    Tree(u64),
    /// SHARED_BLOCK_REF / SHARED_DATA_REF: a FULL_BACKREF parent block.
    Parent(u64),
    /// EXTENT_DATA_REF: (root, inode, file offset of the extent's start).
    Data(u64, u64, u64),
}

/// A reachable tree block.
#[derive(Default)]
struct Block {
    level: u8,
    /// The header's owner (the tree that allocated it).
    owner: u64,
    /// Trees that reach it (more than one: shared by snapshots).
    trees: BTreeSet<u64>,
    /// Blocks that point at it, and whether it is a tree's root.
    parents: BTreeSet<u64>,
    root_of: BTreeSet<u64>,
}

/// A METADATA_ITEM.
struct MetadataItem {
    level: u8,
    refs: u64,
    flags: u64,
    backrefs: BTreeSet<Backref>,
}

/// A file extent item of a leaf: (disk bytenr, inode, file offset of the
/// extent's start).
type LeafExtent = (u64, u64, u64);

/// Items of the trees that the cross-checks need, gathered in one walk.
#[derive(Default)]
struct Gathered {
    /// Reachable tree blocks by bytenr.
    blocks: BTreeMap<u64, Block>,
    /// Extent tree: METADATA_ITEMs by bytenr.
    metadata_items: BTreeMap<u64, MetadataItem>,
    /// Extent tree: data extents (EXTENT_ITEM) bytenr -> length.
    data_extents: BTreeMap<u64, u64>,
    /// Extent tree: the references each data extent records with their
    /// counts, and its `refs`.
    data_refs: BTreeMap<u64, (u64, BTreeMap<Backref, u64>)>,
    /// The file extents of each subvolume leaf (once per leaf, however many
    /// trees share it).
    leaf_extents: BTreeMap<u64, Vec<LeafExtent>>,
    /// Csum tree: item start -> sums.
    csums: BTreeMap<u64, u64>,
    block_group_items: Vec<(u64, u64, BlockGroupItem)>,
    /// Items of each subvolume tree (the top fs tree and snapshots).
    subvol_items: BTreeMap<u64, Vec<(Key, Vec<u8>)>>,
    /// Quota tree: the status item and each qgroup's info item.
    qgroup_status: Option<QgroupStatusItem>,
    qgroup_info: BTreeMap<u64, QgroupInfoItem>,
}

/// Check a mounted (quiescent) filesystem.
pub async fn check_fs(fs: &Rc<FsInfo>) -> CheckReport {
    let mut report = CheckReport { generation: fs.trans.last_trans_committed.get(), ..Default::default() };
    let mut gathered = Gathered::default();
    let roots: Vec<_> = fs.roots.borrow().values().cloned().collect();
    for root in roots {
        let node = root.node();
        let (bytenr, level, generation) = (node.start, node.level(), node.generation());
        drop(node);
        let shape =
            walk_tree(fs, root.objectid, bytenr, level, generation, &mut gathered, &mut report.errors).await;
        report.trees.insert(root.objectid, shape);
    }
    // Relocation trees a crash (or a running relocation) left share blocks
    // with their subvolumes; their references are part of the count.
    let relocs: Vec<_> = fs.reloc.roots.borrow().values().cloned().collect();
    for reloc in relocs {
        let node = reloc.node();
        let (bytenr, level, generation) = (node.start, node.level(), node.generation());
        drop(node);
        walk_tree(fs, TREE_RELOC_OBJECTID, bytenr, level, generation, &mut gathered, &mut report.errors)
            .await;
    }
    check_extents(fs, &gathered, &mut report.errors);
    check_file_data(fs, &gathered, &mut report.errors);
    let subvols: Vec<u64> = fs.roots.borrow().keys().copied().filter(|&id| is_fstree(id)).collect();
    check_qgroups(fs, &gathered, &subvols, &mut report.errors);
    let fs_items = gathered.subvol_items.remove(&FS_TREE_OBJECTID).unwrap_or_default();
    check_namespace(FS_TREE_OBJECTID, &fs_items, &mut report);
    for (tree, items) in &gathered.subvol_items {
        let mut snapshot = CheckReport::default();
        check_namespace(*tree, items, &mut snapshot);
        report.errors.extend(snapshot.errors.into_iter().map(|e| format!("subvolume {tree}: {e}")));
    }
    report
}

/// Depth-first walk of one tree, verifying every block on the way.
async fn walk_tree(
    fs: &Rc<FsInfo>,
    tree: u64,
    root_bytenr: u64,
    root_level: u8,
    root_generation: u64,
    gathered: &mut Gathered,
    errors: &mut Vec<String>,
) -> TreeShape {
    let mut shape = TreeShape { level: root_level, ..Default::default() };
    // (bytenr, level, generation from the parent, first key from the parent, upper bound, parent)
    let mut stack = vec![(root_bytenr, root_level, root_generation, None::<Key>, None::<Key>, None::<u64>)];
    let mut last_leaf_key: Option<Key> = None;
    let mut seen = BTreeSet::new();
    while let Some((bytenr, level, generation, first_key, upper, parent)) = stack.pop() {
        if !seen.insert(bytenr) {
            errors.push(format!("tree block {bytenr} is reachable twice in tree {tree}"));
            continue;
        }
        let block = gathered.blocks.entry(bytenr).or_default();
        let first_visit = block.trees.is_empty();
        block.trees.insert(tree);
        match parent {
            Some(parent) => block.parents.insert(parent),
            // A relocation tree references its root block by the block.
            None if tree == TREE_RELOC_OBJECTID => block.parents.insert(bytenr),
            None => block.root_of.insert(tree),
        };
        if !first_visit && !(shareable(tree) && block.trees.iter().all(|&t| shareable(t))) {
            errors.push(format!("tree block {bytenr} is reachable from trees {:?}", block.trees));
            continue;
        }
        let eb = match read_tree_block_verified(fs, bytenr, tree, level, generation, first_key).await {
            Ok(eb) => eb,
            Err(error) => {
                errors.push(format!("tree {tree}: {error}"));
                continue;
            }
        };
        shape.bytes_used += u64::from(fs.nodesize);
        let data = eb.data.borrow();
        let block = gathered.blocks.get_mut(&bytenr).expect("entered above");
        block.level = level;
        block.owner = crate::accessors::header_owner(&data);
        let nritems = header_nritems(&data) as usize;
        if header_level(&data) != level {
            errors.push(format!(
                "tree {tree}: block {bytenr} has level {} where {level} was expected",
                header_level(&data)
            ));
            continue;
        }
        let last_key = |i: usize| if level == 0 { item_key(&data, i) } else { node_key(&data, i) };
        if nritems > 0 && upper.is_some_and(|upper| last_key(nritems - 1) >= upper) {
            errors.push(format!("tree {tree}: block {bytenr} holds keys at or past its parent's next key"));
        }
        if level > 0 {
            shape.nodes += 1;
            // Push children in reverse so the walk visits them in key order.
            for i in (0..nritems).rev() {
                let next = (i + 1 < nritems).then(|| node_key(&data, i + 1)).or(upper);
                stack.push((
                    node_blockptr(&data, i),
                    level - 1,
                    node_ptr_generation(&data, i),
                    Some(node_key(&data, i)),
                    next,
                    Some(bytenr),
                ));
            }
            continue;
        }
        shape.leaves += 1;
        shape.items += nritems as u64;
        let mut extents = Vec::new();
        for i in 0..nritems {
            let key = item_key(&data, i);
            if last_leaf_key.is_some_and(|last| key <= last) {
                errors.push(format!(
                    "tree {tree}: key {key} in block {bytenr} is not after the previous leaf's last key"
                ));
            }
            last_leaf_key = Some(key);
            gather_item(tree, key, item_data(&data, i), gathered, errors, &mut extents);
        }
        if first_visit && shareable(tree) {
            gathered.leaf_extents.insert(bytenr, extents);
        }
    }
    shape
}

fn gather_item(
    tree: u64,
    key: Key,
    payload: &[u8],
    gathered: &mut Gathered,
    errors: &mut Vec<String>,
    extents: &mut Vec<LeafExtent>,
) {
    if tree == EXTENT_TREE_OBJECTID {
        match key.item_type {
            METADATA_ITEM_KEY => match ExtentItem::read(payload, METADATA_ITEM_KEY) {
                Ok(item) => {
                    let mut backrefs = BTreeSet::new();
                    for inline in &item.inline_refs {
                        let backref = match *inline {
                            InlineRef::TreeBlock { root } => Backref::Tree(root),
                            InlineRef::SharedBlock { parent } => Backref::Parent(parent),
                            ref other => {
                                errors.push(format!("tree block item {key} has a {other:?} reference"));
                                continue;
                            }
                        };
                        if !backrefs.insert(backref) {
                            errors.push(format!("tree block item {key} holds {backref:?} twice"));
                        }
                    }
                    gathered.metadata_items.insert(
                        key.objectid,
                        MetadataItem {
                            level: key.offset as u8,
                            refs: item.refs,
                            flags: item.flags,
                            backrefs,
                        },
                    );
                }
                Err(error) => errors.push(format!("extent tree: METADATA_ITEM {key}: {error:?}")),
            },
            EXTENT_ITEM_KEY => {
                gathered.data_extents.insert(key.objectid, key.offset);
                match ExtentItem::read(payload, EXTENT_ITEM_KEY) {
                    Ok(item) if item.flags & crate::format::EXTENT_FLAG_DATA != 0 => {
                        let mut refs = BTreeMap::new();
                        for inline in &item.inline_refs {
                            let (backref, count) = match *inline {
                                InlineRef::ExtentData(r) => {
                                    (Backref::Data(r.root, r.objectid, r.offset), r.count)
                                }
                                InlineRef::SharedData { parent, count } => (Backref::Parent(parent), count),
                                ref other => {
                                    errors.push(format!("data extent {key} has a {other:?} reference"));
                                    continue;
                                }
                            };
                            *refs.entry(backref).or_insert(0) += u64::from(count);
                        }
                        gathered.data_refs.insert(key.objectid, (item.refs, refs));
                    }
                    Ok(_) => {}
                    Err(error) => errors.push(format!("extent tree: EXTENT_ITEM {key}: {error:?}")),
                }
            }
            BLOCK_GROUP_ITEM_KEY if payload.len() >= BlockGroupItem::SIZE => {
                gathered.block_group_items.push((key.objectid, key.offset, BlockGroupItem::read(payload)));
            }
            _ => {}
        }
    } else if shareable(tree) {
        if key.item_type == crate::format::EXTENT_DATA_KEY
            && let Ok(item) = crate::format::FileExtentItem::read(payload)
            && let crate::format::FileExtentBody::Regular { disk_bytenr, offset, .. } = item.body
            && disk_bytenr != 0
        {
            extents.push((disk_bytenr, key.objectid, key.offset.wrapping_sub(offset)));
        }
        if is_fstree(tree) {
            gathered.subvol_items.entry(tree).or_default().push((key, payload.to_vec()));
        }
    } else if tree == QUOTA_TREE_OBJECTID {
        match key.item_type {
            QGROUP_STATUS_KEY if payload.len() >= QgroupStatusItem::SIZE => {
                gathered.qgroup_status = Some(QgroupStatusItem::read(payload));
            }
            QGROUP_INFO_KEY if payload.len() >= QgroupInfoItem::SIZE => {
                gathered.qgroup_info.insert(key.offset, QgroupInfoItem::read(payload));
            }
            QGROUP_STATUS_KEY | QGROUP_INFO_KEY => {
                errors.push(format!("quota tree: item {key} is too small"))
            }
            _ => {}
        }
    } else if tree == crate::format::CSUM_TREE_OBJECTID && key.item_type == crate::format::EXTENT_CSUM_KEY {
        gathered.csums.insert(key.offset, (payload.len() / crate::format::CRC32C_CSUM_SIZE) as u64);
    }
}

/// Whether the METADATA_ITEM of `bytenr` says FULL_BACKREF: its children's
/// and data extents' references are by it as parent.
fn full_backref(gathered: &Gathered, bytenr: u64) -> bool {
    gathered
        .metadata_items
        .get(&bytenr)
        .is_some_and(|item| item.flags & crate::format::BLOCK_FLAG_FULL_BACKREF != 0)
}

/// The references a block must have: by each tree it is the root of, and
/// per parent by the parent (FULL_BACKREF) or by the parent's owner.
/// Trees that may share blocks: subvolumes and relocation trees.
fn shareable(tree: u64) -> bool {
    is_fstree(tree) || tree == TREE_RELOC_OBJECTID
}

fn expected_backrefs(gathered: &Gathered, block: &Block) -> BTreeSet<Backref> {
    let by_parent = block.parents.iter().map(|&parent| {
        if full_backref(gathered, parent) {
            Backref::Parent(parent)
        } else {
            Backref::Tree(gathered.blocks.get(&parent).map_or(0, |p| p.owner))
        }
    });
    block.root_of.iter().map(|&tree| Backref::Tree(tree)).chain(by_parent).collect()
}

fn check_extents(fs: &FsInfo, gathered: &Gathered, errors: &mut Vec<String>) {
    for (&bytenr, block) in &gathered.blocks {
        let level = block.level;
        let trees = &block.trees;
        match gathered.metadata_items.get(&bytenr) {
            None => errors
                .push(format!("tree block {bytenr} (trees {trees:?}, level {level}) has no METADATA_ITEM")),
            Some(item) => {
                if item.level != level {
                    errors.push(format!(
                        "METADATA_ITEM of block {bytenr} says level {}, the block is {level}",
                        item.level
                    ));
                }
                let expected = expected_backrefs(gathered, block);
                if item.backrefs != expected {
                    errors.push(format!(
                        "METADATA_ITEM of block {bytenr} (trees {trees:?}) has references {:?}, the trees make {expected:?}",
                        item.backrefs
                    ));
                }
                if item.refs != item.backrefs.len() as u64 {
                    errors.push(format!(
                        "METADATA_ITEM of block {bytenr} says refs {} but holds {} references",
                        item.refs,
                        item.backrefs.len()
                    ));
                }
            }
        }
    }
    for &bytenr in gathered.metadata_items.keys() {
        if !gathered.blocks.contains_key(&bytenr) {
            errors.push(format!("METADATA_ITEM for block {bytenr}, which no tree reaches (leaked)"));
        }
    }
    for &(start, length, ref item) in &gathered.block_group_items {
        let in_group = |bytenr: &u64| (start..start + length).contains(bytenr);
        let metadata =
            gathered.metadata_items.keys().filter(|b| in_group(b)).count() as u64 * u64::from(fs.nodesize);
        let data: u64 = gathered.data_extents.iter().filter(|(b, _)| in_group(b)).map(|(_, len)| len).sum();
        if item.used != metadata + data {
            errors.push(format!(
                "block group {start}+{length}: BLOCK_GROUP_ITEM used {} but its extents add up to {}",
                item.used,
                metadata + data
            ));
        }
    }
}

/// The subvolumes above each block: those it is the root of, and those
/// above its parents (a relocation tree's root block, its own parent, adds
/// none).
fn subvols_above(gathered: &Gathered, bytenr: u64, memo: &mut BTreeMap<u64, BTreeSet<u64>>) -> BTreeSet<u64> {
    if let Some(found) = memo.get(&bytenr) {
        return found.clone();
    }
    memo.insert(bytenr, BTreeSet::new());
    let mut above = BTreeSet::new();
    if let Some(block) = gathered.blocks.get(&bytenr) {
        above.extend(block.root_of.iter().copied().filter(|&tree| is_fstree(tree)));
        for &parent in block.parents.iter().filter(|&&parent| parent != bytenr) {
            above.extend(subvols_above(gathered, parent, memo));
        }
    }
    memo.insert(bytenr, above.clone());
    above
}

/// With quotas on, each subvolume's QGROUP_INFO holds what its trees
/// reach: `rfer` every tree block (nodesize) and data extent (its length)
/// below its root, `excl` those no other subvolume reaches. A status
/// marked inconsistent is an error too.
fn check_qgroups(fs: &FsInfo, gathered: &Gathered, subvols: &[u64], errors: &mut Vec<String>) {
    let Some(status) = gathered.qgroup_status else { return };
    if status.flags & QGROUP_STATUS_FLAG_ON == 0 {
        return;
    }
    if status.flags & QGROUP_STATUS_FLAG_INCONSISTENT != 0 {
        errors.push("qgroups: the status item says inconsistent".into());
    }
    let mut memo = BTreeMap::new();
    let mut counts: BTreeMap<u64, (u64, u64)> = subvols.iter().map(|&id| (id, (0, 0))).collect();
    let mut add = |trees: &BTreeSet<u64>, bytes: u64| {
        for tree in trees {
            let count = counts.entry(*tree).or_default();
            count.0 += bytes;
            if trees.len() == 1 {
                count.1 += bytes;
            }
        }
    };
    let mut data: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for (&bytenr, block) in &gathered.blocks {
        if !block.trees.iter().all(|&tree| shareable(tree)) {
            continue;
        }
        let above = subvols_above(gathered, bytenr, &mut memo);
        add(&above, u64::from(fs.nodesize));
        for &(disk_bytenr, _, _) in gathered.leaf_extents.get(&bytenr).into_iter().flatten() {
            data.entry(disk_bytenr).or_default().extend(above.iter().copied());
        }
    }
    for (disk_bytenr, trees) in &data {
        add(trees, gathered.data_extents.get(disk_bytenr).copied().unwrap_or(0));
    }
    for (&id, &(rfer, excl)) in &counts {
        match gathered.qgroup_info.get(&id) {
            None if subvols.contains(&id) => errors.push(format!("qgroup 0/{id}: no QGROUP_INFO item")),
            None => {}
            Some(info) if (info.rfer, info.excl) != (rfer, excl) => errors.push(format!(
                "qgroup 0/{id}: QGROUP_INFO says rfer {} excl {}, the trees give rfer {rfer} excl {excl}",
                info.rfer, info.excl
            )),
            Some(_) => {}
        }
    }
    for (&id, info) in &gathered.qgroup_info {
        if !counts.contains_key(&id) && (info.rfer, info.excl) != (0, 0) {
            errors.push(format!(
                "qgroup 0/{id}: QGROUP_INFO says rfer {} excl {} for a subvolume that is gone",
                info.rfer, info.excl
            ));
        }
    }
}

/// File extents against inodes, data extent items and checksums.
fn check_file_data(fs: &FsInfo, gathered: &Gathered, errors: &mut Vec<String>) {
    let sector = u64::from(fs.sectorsize);
    for (&tree, items) in &gathered.subvol_items {
        check_file_extents(fs, gathered, tree, items, errors);
    }
    // References: once per leaf however many trees share it, by the leaf
    // (FULL_BACKREF) or by the leaf's owner.
    let mut found_refs: BTreeMap<u64, BTreeMap<Backref, u64>> = BTreeMap::new();
    for (&leaf, extents) in &gathered.leaf_extents {
        let owner = gathered.blocks.get(&leaf).map_or(0, |b| b.owner);
        for &(disk_bytenr, ino, offset) in extents {
            let backref = if full_backref(gathered, leaf) {
                Backref::Parent(leaf)
            } else {
                Backref::Data(owner, ino, offset)
            };
            *found_refs.entry(disk_bytenr).or_default().entry(backref).or_insert(0) += 1;
        }
    }
    for (&bytenr, (refs, inline)) in &gathered.data_refs {
        let found = found_refs.remove(&bytenr).unwrap_or_default();
        if found != *inline {
            errors.push(format!("data extent {bytenr}: backrefs {inline:?} but file extents {found:?}"));
        }
        if *refs != inline.values().sum::<u64>() {
            errors.push(format!(
                "data extent {bytenr}: refs {refs} but its backrefs count {}",
                inline.values().sum::<u64>()
            ));
        }
    }
    for (bytenr, refs) in found_refs {
        if !gathered.data_refs.contains_key(&bytenr) {
            errors.push(format!("data extent {bytenr} referenced by {refs:?} has no data EXTENT_ITEM"));
        }
    }
    // Sums: exactly the sectors of the data extents.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    for (&start, &sums) in &gathered.csums {
        covered.insert(start, start + sums * sector);
    }
    let mut prev_end = 0;
    for (&start, &end) in &covered {
        if start < prev_end {
            errors.push(format!("csum item at {start} overlaps the previous one"));
        }
        prev_end = end;
        let inside = gathered
            .data_refs
            .range(..=start)
            .next_back()
            .and_then(|(bytenr, _)| gathered.data_extents.get(bytenr).map(|len| (*bytenr, bytenr + len)))
            .is_some_and(|(_, extent_end)| end <= extent_end);
        if !inside {
            errors.push(format!("csum item {start}..{end} lies outside every data extent"));
        }
    }
    for &bytenr in gathered.data_refs.keys() {
        let len = gathered.data_extents[&bytenr];
        let have: u64 = covered.range(bytenr..bytenr + len).map(|(s, e)| e - s).sum();
        if have != len {
            errors.push(format!("data extent {bytenr}+{len}: checksums cover {have} bytes"));
        }
    }
}

/// One subvolume's file extents: no overlaps, an inline extent only first,
/// each names a data extent of its length and stays inside it, and each
/// inode's `nbytes` is what its extents hold.
fn check_file_extents(
    fs: &FsInfo,
    gathered: &Gathered,
    tree: u64,
    items: &[(Key, Vec<u8>)],
    errors: &mut Vec<String>,
) {
    use crate::format::{EXTENT_DATA_KEY, FileExtentBody, FileExtentItem};
    let sector = u64::from(fs.sectorsize);
    let prefix = if tree == FS_TREE_OBJECTID { String::new() } else { format!("subvolume {tree}: ") };
    let mut nbytes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_end: BTreeMap<u64, u64> = BTreeMap::new();
    for (key, payload) in items {
        if key.item_type != EXTENT_DATA_KEY {
            continue;
        }
        let item = match FileExtentItem::read(payload) {
            Ok(item) => item,
            Err(error) => {
                errors.push(format!("{prefix}file extent {key}: {error:?}"));
                continue;
            }
        };
        let (end, bytes) = match &item.body {
            FileExtentBody::Inline(data) => {
                if key.offset != 0 {
                    errors.push(format!(
                        "{prefix}inode {}: inline extent at offset {}",
                        key.objectid, key.offset
                    ));
                }
                (key.offset + sector, data.len() as u64)
            }
            FileExtentBody::Regular { disk_bytenr, disk_num_bytes, offset, num_bytes } => {
                if *disk_bytenr != 0 {
                    match gathered.data_extents.get(disk_bytenr) {
                        Some(len) if len == disk_num_bytes => {}
                        other => errors.push(format!(
                            "{prefix}file extent {key} names data extent {disk_bytenr}+{disk_num_bytes}; the extent tree has {other:?}"
                        )),
                    }
                    if offset + num_bytes > *disk_num_bytes {
                        errors.push(format!("{prefix}file extent {key} reaches past its data extent"));
                    }
                }
                (key.offset + num_bytes, if *disk_bytenr != 0 { *num_bytes } else { 0 })
            }
        };
        let prev_end = last_end.insert(key.objectid, end).unwrap_or(0);
        if key.offset < prev_end {
            errors.push(format!(
                "{prefix}inode {}: file extent at {} overlaps the previous one (ends {prev_end})",
                key.objectid, key.offset
            ));
        }
        *nbytes.entry(key.objectid).or_insert(0) += bytes;
    }
    for (key, payload) in items {
        if key.item_type == INODE_ITEM_KEY && payload.len() >= InodeItem::SIZE {
            let inode = InodeItem::read(payload);
            let found = nbytes.get(&key.objectid).copied().unwrap_or(0);
            if inode.mode & crate::inode::S_IFMT != crate::inode::S_IFDIR && inode.nbytes != found {
                errors.push(format!(
                    "{prefix}inode {}: nbytes {} but its extents hold {found}",
                    key.objectid, inode.nbytes
                ));
            }
        }
    }
}

/// DIR_ITEM, DIR_INDEX and INODE_REF agree; link counts and directory
/// sizes are right; names point at inodes that exist. Also builds the
/// namespace of the top fs tree.
fn check_namespace(tree: u64, items: &[(Key, Vec<u8>)], report: &mut CheckReport) {
    let errors = &mut report.errors;
    // (dir, index) of entries that link a subvolume (location ROOT_ITEM):
    // no inode of this tree behind them.
    let mut subvol_links: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut inodes: BTreeMap<u64, InodeItem> = BTreeMap::new();
    // (child, parent) -> [(index, name)]
    let mut refs: BTreeMap<(u64, u64), Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    // (dir, name) -> (child, type) from DIR_ITEM and from DIR_INDEX (with index).
    let mut by_name: BTreeMap<(u64, Vec<u8>), (u64, u8)> = BTreeMap::new();
    let mut by_index: BTreeMap<(u64, u64), (u64, u8, Vec<u8>)> = BTreeMap::new();
    for (key, payload) in items {
        match key.item_type {
            INODE_ITEM_KEY if payload.len() >= InodeItem::SIZE => {
                inodes.insert(key.objectid, InodeItem::read(payload));
            }
            INODE_REF_KEY => {
                for entry in inode_refs(payload) {
                    match entry {
                        Ok(r) => refs.entry((key.objectid, key.offset)).or_default().push((r.index, r.name)),
                        Err(e) => errors.push(format!("INODE_REF {key}: {e:?}")),
                    }
                }
            }
            DIR_ITEM_KEY => {
                for entry in dir_items(payload) {
                    match entry {
                        Ok(d) => {
                            if by_name
                                .insert((key.objectid, d.name.clone()), (d.location.objectid, d.dir_type))
                                .is_some()
                            {
                                errors.push(format!(
                                    "directory {} has two DIR_ITEMs named {:?}",
                                    key.objectid,
                                    lossy(&d.name)
                                ));
                            }
                        }
                        Err(e) => errors.push(format!("DIR_ITEM {key}: {e:?}")),
                    }
                }
            }
            DIR_INDEX_KEY => match dir_items(payload).next() {
                Some(Ok(d)) => {
                    if d.location.item_type == ROOT_ITEM_KEY {
                        subvol_links.insert((key.objectid, key.offset));
                        // A snapshot holds only links made before it.
                        if tree != FS_TREE_OBJECTID && d.location.objectid >= tree {
                            errors.push(format!(
                                "entry {:?} in directory {} links subvolume {}, made after this snapshot {tree}: the snapshot changed after it was taken",
                                lossy(&d.name),
                                key.objectid,
                                d.location.objectid
                            ));
                        }
                    }
                    by_index.insert((key.objectid, key.offset), (d.location.objectid, d.dir_type, d.name));
                }
                _ => errors.push(format!("DIR_INDEX {key} does not decode")),
            },
            _ => {}
        }
    }
    let root_dir = FIRST_FREE_OBJECTID;
    // Every DIR_INDEX has its DIR_ITEM and INODE_REF; sizes per directory.
    let mut dir_sizes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut names_per_inode: BTreeMap<u64, u32> = BTreeMap::new();
    for (&(dir, index), (child, dir_type, name)) in &by_index {
        *dir_sizes.entry(dir).or_default() += 2 * name.len() as u64;
        if by_name.get(&(dir, name.clone())) != Some(&(*child, *dir_type)) {
            errors.push(format!("DIR_INDEX {dir}/{index} {:?} has no matching DIR_ITEM", lossy(name)));
        }
        if subvol_links.contains(&(dir, index)) {
            if *dir_type != FT_DIR {
                errors
                    .push(format!("entry {:?} in {dir} links a subvolume with type {dir_type}", lossy(name)));
            }
            continue;
        }
        *names_per_inode.entry(*child).or_default() += 1;
        let has_ref =
            refs.get(&(*child, dir)).is_some_and(|r| r.iter().any(|(i, n)| *i == index && n == name));
        if !has_ref {
            errors.push(format!(
                "DIR_INDEX {dir}/{index} {:?} -> {child} has no matching INODE_REF",
                lossy(name)
            ));
        }
        match inodes.get(child) {
            None => errors
                .push(format!("DIR_INDEX {dir}/{index} {:?} points at missing inode {child}", lossy(name))),
            Some(inode) => {
                let is_dir = inode.mode & 0o170000 == 0o040000;
                if is_dir != (*dir_type == FT_DIR) {
                    errors.push(format!(
                        "entry {:?} in {dir}: type {dir_type} but inode {child} mode {:o}",
                        lossy(name),
                        inode.mode
                    ));
                }
            }
        }
    }
    let indexed: BTreeSet<(u64, &[u8], u64)> =
        by_index.iter().map(|(&(dir, _), (child, _, name))| (dir, name.as_slice(), *child)).collect();
    for ((dir, name), (child, _)) in &by_name {
        if !indexed.contains(&(*dir, name.as_slice(), *child)) {
            errors.push(format!("DIR_ITEM {dir} {:?} -> {child} has no matching DIR_INDEX", lossy(name)));
        }
    }
    for (&(child, parent), entries) in &refs {
        for (index, name) in entries {
            let is_root_self_ref = child == root_dir && parent == root_dir;
            if !is_root_self_ref
                && by_index.get(&(parent, *index)).is_none_or(|(c, _, n)| *c != child || n != name)
            {
                errors.push(format!(
                    "INODE_REF {child} in {parent} index {index} {:?} has no DIR_INDEX",
                    lossy(name)
                ));
            }
        }
    }
    for (&ino, inode) in &inodes {
        let is_dir = inode.mode & 0o170000 == 0o040000;
        let names = names_per_inode.get(&ino).copied().unwrap_or(0);
        if is_dir {
            let size = dir_sizes.get(&ino).copied().unwrap_or(0);
            if inode.size != size {
                errors.push(format!(
                    "directory {ino} has size {} but its entries add up to {size}",
                    inode.size
                ));
            }
            if inode.nlink != 1 {
                errors.push(format!("directory {ino} has nlink {} (btrfs directories have 1)", inode.nlink));
            }
        } else if inode.nlink != names {
            errors.push(format!("inode {ino} has nlink {} but {names} names", inode.nlink));
        }
        if ino != root_dir && names == 0 {
            errors.push(format!("inode {ino} has no name (orphan)"));
        }
    }
    by_index.retain(|key, _| !subvol_links.contains(key));
    report.namespace = build_namespace(root_dir, &by_index);
}

fn build_namespace(
    root_dir: u64,
    by_index: &BTreeMap<(u64, u64), (u64, u8, Vec<u8>)>,
) -> BTreeMap<String, EntryKind> {
    let mut namespace = BTreeMap::new();
    let mut pending = vec![(root_dir, String::new())];
    let mut seen = BTreeSet::new();
    while let Some((dir, prefix)) = pending.pop() {
        if !seen.insert(dir) {
            continue;
        }
        for (_, (child, dir_type, name)) in by_index.range((dir, 0)..=(dir, u64::MAX)) {
            let path = format!("{prefix}/{}", lossy(name));
            if *dir_type == FT_DIR {
                namespace.insert(path.clone(), EntryKind::Dir);
                pending.push((*child, path));
            } else {
                namespace.insert(path, EntryKind::File { ino: *child });
            }
        }
    }
    namespace
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
