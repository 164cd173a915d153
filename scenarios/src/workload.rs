//! The plain-text workload format: one operation per line, replayed in order.
//!
//! ```text
//! # comments and blank lines are ignored
//! mkdir d
//! create d/f1
//! link d/f1 d/f2
//! rename d/f1 e/f1
//! setattr d/f2
//! unlink d/f2
//! rmdir e
//! sync
//! ```
//! Paths are relative to the filesystem's root; components are separated by
//! `/` and may not be empty, `.` or `..`. The same file runs against a real
//! btrfs with the shell lines in the README.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Mkdir(String),
    Create(String),
    Link {
        from: String,
        to: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink(String),
    Rmdir(String),
    /// Update the inode (a chmod-like change of ctime/mode).
    Setattr(String),
    Sync,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Mkdir(p) => write!(f, "mkdir {p}"),
            Op::Create(p) => write!(f, "create {p}"),
            Op::Link { from, to } => write!(f, "link {from} {to}"),
            Op::Rename { from, to } => write!(f, "rename {from} {to}"),
            Op::Unlink(p) => write!(f, "unlink {p}"),
            Op::Rmdir(p) => write!(f, "rmdir {p}"),
            Op::Setattr(p) => write!(f, "setattr {p}"),
            Op::Sync => write!(f, "sync"),
        }
    }
}

/// Longest name btrfs accepts (BTRFS_NAME_LEN).
pub const NAME_MAX: usize = 255;

fn check_path(path: &str) -> Result<String, String> {
    if path.is_empty() || path.starts_with('/') || path.ends_with('/') {
        return Err(format!("bad path '{path}': relative paths like d/f1 only"));
    }
    for component in path.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return Err(format!("bad path '{path}': empty, '.' or '..' component"));
        }
        if component.len() > NAME_MAX {
            return Err(format!("bad path '{path}': a name is longer than {NAME_MAX} bytes"));
        }
    }
    Ok(path.to_string())
}

/// Parse a workload; an error names the line (1-based) and what is wrong.
pub fn parse(text: &str) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let arity = |n: usize| {
            if words.len() == n + 1 {
                Ok(())
            } else {
                Err(format!("line {line_no}: '{}' takes {n} path(s), got {}", words[0], words.len() - 1))
            }
        };
        let op = (|| -> Result<Op, String> {
            match words[0] {
                "mkdir" => arity(1).and_then(|_| Ok(Op::Mkdir(check_path(words[1])?))),
                "create" => arity(1).and_then(|_| Ok(Op::Create(check_path(words[1])?))),
                "unlink" => arity(1).and_then(|_| Ok(Op::Unlink(check_path(words[1])?))),
                "rmdir" => arity(1).and_then(|_| Ok(Op::Rmdir(check_path(words[1])?))),
                "setattr" => arity(1).and_then(|_| Ok(Op::Setattr(check_path(words[1])?))),
                "link" => arity(2)
                    .and_then(|_| Ok(Op::Link { from: check_path(words[1])?, to: check_path(words[2])? })),
                "rename" => arity(2)
                    .and_then(|_| Ok(Op::Rename { from: check_path(words[1])?, to: check_path(words[2])? })),
                "sync" => arity(0).map(|_| Op::Sync),
                other => Err(format!(
                    "unknown operation '{other}' (known: mkdir create link rename unlink rmdir setattr sync)"
                )),
            }
        })()
        .map_err(|e| if e.starts_with("line ") { e } else { format!("line {line_no}: {e}") })?;
        ops.push(op);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_operation_and_skips_comments() {
        let ops = parse("# setup\nmkdir d\n\ncreate d/f1\nlink d/f1 d/f2\nrename d/f1 e/f1\nsetattr d/f2\nunlink d/f2\nrmdir e\nsync\n").unwrap();
        assert_eq!(ops.len(), 8);
        assert_eq!(ops[2], Op::Link { from: "d/f1".into(), to: "d/f2".into() });
        let round_trip: Vec<String> = ops.iter().map(|op| op.to_string()).collect();
        assert_eq!(parse(&round_trip.join("\n")).unwrap(), ops);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(parse("mkdir d\nmkdri e").unwrap_err().split(':').next(), Some("line 2"));
        assert!(parse("create").unwrap_err().starts_with("line 1: 'create' takes 1 path(s), got 0"));
        assert!(parse("link a").unwrap_err().contains("takes 2"));
        assert!(parse("create /abs").unwrap_err().contains("relative"));
        assert!(parse("create a/../b").unwrap_err().contains("'..'"));
        assert!(parse("sync now").unwrap_err().contains("takes 0"));
        assert!(parse(&format!("create {}", "x".repeat(256))).unwrap_err().contains("longer than 255"));
    }
}
