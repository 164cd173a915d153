//! cowsim's filesystem engine: the btrfs mechanisms (COW B-trees in real
//! on-disk sizes, extent buffers, tree locks, transactions, block reserves,
//! delayed items and refs, commit, mount), written against the small
//! environment interface in [`env`]. See engine/README.md for the status of
//! each module against fs/btrfs.

pub mod accessors;
pub mod block_group;
pub mod block_rsv;
pub mod check;
pub mod ctree;
pub mod delayed_inode;
pub mod delayed_ref;
pub mod dir_item;
pub mod disk_io;
pub mod env;
pub mod error;
pub mod extent_io;
pub mod extent_tree;
pub mod file;
pub mod file_item;
pub mod fix;
pub mod format;
pub mod fs;
pub mod inode;
pub mod inode_item;
pub mod ioctl;
pub mod locking;
pub mod qgroup;
pub mod relocation;
pub mod space_info;
pub mod transaction;
pub mod tree_checker;
pub mod tree_log;
pub mod volumes;
pub mod wait;

#[cfg(test)]
pub(crate) mod testenv;
