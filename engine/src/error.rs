//! The engine's one error type: operating errors the kernel would return
//! as a negative errno, with enough structure to say what went wrong.
//! Programmer errors are assertions, never values of this type.
//!
//! Errno values are Linux's (asm-generic/errno-base.h, errno.h). Where the
//! kernel reports a failure in its log, `Display` gives the same line, so a
//! trace reads like dmesg.

use std::fmt;

use crate::tree_checker::TreeCheckError;

/// `EPERM`..: the errno values the engine returns.
pub const EIO: i32 = 5;
pub const ENOENT: i32 = 2;
pub const EAGAIN: i32 = 11;
pub const ENOMEM: i32 = 12;
pub const EEXIST: i32 = 17;
pub const ENOTDIR: i32 = 20;
pub const EISDIR: i32 = 21;
pub const EINVAL: i32 = 22;
pub const EFBIG: i32 = 27;
pub const ENOSPC: i32 = 28;
pub const EROFS: i32 = 30;
pub const EMLINK: i32 = 31;
pub const ENAMETOOLONG: i32 = 36;
pub const ENOTEMPTY: i32 = 39;
pub const EOVERFLOW: i32 = 75;
pub const EDQUOT: i32 = 122;
pub const EUCLEAN: i32 = 117;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Error {
    /// The device failed a bio for this block (BLK_STS_IOERR), or a read
    /// waited for another task's read of the block, which failed.
    Io {
        bytenr: u64,
    },
    /// A tree block's stored checksum (`wanted`) differs from the one
    /// computed over its contents (`found`).
    Csum {
        bytenr: u64,
        found: u32,
        wanted: u32,
    },
    /// The block's header names another bytenr: a misdirected write or read.
    BadBytenr {
        bytenr: u64,
        found: u64,
    },
    /// "parent transid verify failed": the block's generation is not the
    /// one its parent pointer (or the super block) carries.
    TransidMismatch {
        bytenr: u64,
        wanted: u64,
        found: u64,
    },
    /// The tree checker (or the level / first key checks) rejected a
    /// block; the kernel's message.
    BadTreeBlock(String),
    Enospc,
    Erofs,
    Enoent,
    Eexist,
    Enomem,
    /// `search_slot` released its path to read a block; try again.
    Eagain,
    Einval,
    Enotdir,
    Eisdir,
    Enotempty,
    Enametoolong,
    Emlink,
    Efbig,
    /// An item cannot grow that much (`split_leaf` extending an item).
    Eoverflow,
    /// A write would pass a qgroup limit.
    Edquot,
}

impl Error {
    /// The kernel's errno for this error (positive; the kernel returns its
    /// negation). Every verification failure of a block read ends as EIO
    /// in the kernel (`read_extent_buffer_pages` sees the buffer not up to
    /// date); the tree checker's own return value, EUCLEAN, is kept for
    /// [`Error::BadTreeBlock`] so that write-time corruption reads as the
    /// kernel reports it.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { .. }
            | Error::Csum { .. }
            | Error::BadBytenr { .. }
            | Error::TransidMismatch { .. } => EIO,
            Error::BadTreeBlock(_) => EUCLEAN,
            Error::Enospc => ENOSPC,
            Error::Erofs => EROFS,
            Error::Enoent => ENOENT,
            Error::Eexist => EEXIST,
            Error::Enomem => ENOMEM,
            Error::Eagain => EAGAIN,
            Error::Einval => EINVAL,
            Error::Enotdir => ENOTDIR,
            Error::Eisdir => EISDIR,
            Error::Enotempty => ENOTEMPTY,
            Error::Enametoolong => ENAMETOOLONG,
            Error::Emlink => EMLINK,
            Error::Efbig => EFBIG,
            Error::Eoverflow => EOVERFLOW,
            Error::Edquot => EDQUOT,
        }
    }

    /// Whether this is a metadata verification failure (the kernel's
    /// -EIO/-EUCLEAN from reading a tree block), as opposed to a device error
    /// or a resource error.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::Csum { .. }
                | Error::BadBytenr { .. }
                | Error::TransidMismatch { .. }
                | Error::BadTreeBlock(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { bytenr } => write!(f, "I/O error on logical {bytenr}"),
            // As the kernel prints it: the little-endian checksum bytes in order.
            Error::Csum { bytenr, found, wanted } => write!(
                f,
                "checksum verify failed on logical {bytenr} mirror 1 wanted 0x{:08x} found 0x{:08x}",
                wanted.swap_bytes(),
                found.swap_bytes()
            ),
            Error::BadBytenr { bytenr, found } => {
                write!(f, "bad tree block start, mirror 1 want {bytenr} have {found}")
            }
            Error::TransidMismatch { bytenr, wanted, found } => write!(
                f,
                "parent transid verify failed on logical {bytenr} mirror 1 wanted {wanted} found {found}"
            ),
            Error::BadTreeBlock(message) => f.write_str(message),
            Error::Enospc => f.write_str("no space left on device (ENOSPC)"),
            Error::Erofs => f.write_str("read-only file system (EROFS)"),
            Error::Enoent => f.write_str("no such file or directory (ENOENT)"),
            Error::Eexist => f.write_str("file exists (EEXIST)"),
            Error::Enomem => f.write_str("cannot allocate memory (ENOMEM)"),
            Error::Eagain => f.write_str("try again (EAGAIN)"),
            Error::Einval => f.write_str("invalid argument (EINVAL)"),
            Error::Enotdir => f.write_str("not a directory (ENOTDIR)"),
            Error::Eisdir => f.write_str("is a directory (EISDIR)"),
            Error::Enotempty => f.write_str("directory not empty (ENOTEMPTY)"),
            Error::Enametoolong => f.write_str("file name too long (ENAMETOOLONG)"),
            Error::Emlink => f.write_str("too many links (EMLINK)"),
            Error::Efbig => f.write_str("file too large (EFBIG)"),
            Error::Eoverflow => f.write_str("value too large for defined data type (EOVERFLOW)"),
            Error::Edquot => f.write_str("disk quota exceeded (EDQUOT)"),
        }
    }
}

impl std::error::Error for Error {}

impl From<TreeCheckError> for Error {
    /// A read-time verification failure: checksum, bytenr and transid get
    /// their own variants, everything else is the checker's message.
    fn from(e: TreeCheckError) -> Error {
        match e {
            TreeCheckError::BadCsum { bytenr, wanted, found, .. } => Error::Csum { bytenr, found, wanted },
            TreeCheckError::BadBytenr { want, have } => Error::BadBytenr { bytenr: want, found: have },
            TreeCheckError::TransidMismatch { bytenr, wanted, found } => {
                Error::TransidMismatch { bytenr, wanted, found }
            }
            other => Error::BadTreeBlock(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values_are_linux() {
        assert_eq!(Error::Io { bytenr: 0 }.errno(), 5);
        assert_eq!(Error::Enoent.errno(), 2);
        assert_eq!(Error::Eexist.errno(), 17);
        assert_eq!(Error::Enospc.errno(), 28);
        assert_eq!(Error::Erofs.errno(), 30);
        assert_eq!(Error::Enomem.errno(), 12);
        assert_eq!(Error::BadTreeBlock(String::new()).errno(), 117);
        assert_eq!(Error::TransidMismatch { bytenr: 1, wanted: 2, found: 3 }.errno(), 5);
    }

    #[test]
    fn display_is_the_kernel_line() {
        let e = Error::TransidMismatch { bytenr: 30408704, wanted: 9, found: 7 };
        assert_eq!(
            e.to_string(),
            "parent transid verify failed on logical 30408704 mirror 1 wanted 9 found 7"
        );
        let e = Error::Csum { bytenr: 4096, found: 0x1122_3344, wanted: 0xaabb_ccdd };
        assert_eq!(
            e.to_string(),
            "checksum verify failed on logical 4096 mirror 1 wanted 0xddccbbaa found 0x44332211"
        );
        // Same text as the tree checker's message for the same failure.
        let t = TreeCheckError::BadCsum { bytenr: 4096, wanted: 0xaabb_ccdd, found: 0x1122_3344, level: 0 };
        assert!(t.to_string().starts_with(&e.to_string()));
        assert!(Error::from(t).is_corruption());
        assert!(!Error::Io { bytenr: 1 }.is_corruption());
    }
}
