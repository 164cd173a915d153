//! The fix candidates for the COW amplification loop, as selectable policies
//! (../shared/reference/fix-variants.md). The mechanisms that consult the
//! policy (`should_cow_block`, `lock_extent_buffer_for_io`, `search_slot`,
//! the transaction handle) live in their kernel modules; this is only the
//! switch and its names.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FixPolicy {
    /// The kernel before any fix.
    #[default]
    None,
    /// First posting (2026-01-27): pin the blocks a search COWed until it returns.
    SearchPin,
    /// Later series, patch 1: modify a WRITTEN block of the running transaction in place.
    OverwriteWritten,
    /// Later series, patch 2: a handle keeps background writeback off what it COWed or used.
    InhibitWriteback,
    /// Patches 1 and 2 together.
    Both,
}

impl FixPolicy {
    pub const ALL: [FixPolicy; 5] = [
        FixPolicy::None,
        FixPolicy::SearchPin,
        FixPolicy::OverwriteWritten,
        FixPolicy::InhibitWriteback,
        FixPolicy::Both,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FixPolicy::None => "none",
            FixPolicy::SearchPin => "search-pin",
            FixPolicy::OverwriteWritten => "overwrite-written",
            FixPolicy::InhibitWriteback => "inhibit-writeback",
            FixPolicy::Both => "both",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            FixPolicy::None => "today's kernel: no fix",
            FixPolicy::SearchPin => {
                "first posting: blocks COWed by a search are kept from writeback until it returns"
            }
            FixPolicy::OverwriteWritten => {
                "a WRITTEN block of the running transaction is redirtied and modified in place"
            }
            FixPolicy::InhibitWriteback => {
                "a handle inhibits background writeback of blocks it COWed or used until it ends"
            }
            FixPolicy::Both => "overwrite-written and inhibit-writeback together",
        }
    }

    pub fn overwrites_written(self) -> bool {
        matches!(self, FixPolicy::OverwriteWritten | FixPolicy::Both)
    }

    pub fn inhibits_writeback(self) -> bool {
        matches!(self, FixPolicy::InhibitWriteback | FixPolicy::Both)
    }

    pub fn pins_during_search(self) -> bool {
        matches!(self, FixPolicy::SearchPin)
    }
}

impl fmt::Display for FixPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FixPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FixPolicy::ALL.into_iter().find(|fix| fix.name() == s).ok_or_else(|| {
            let names: Vec<&str> = FixPolicy::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fix '{s}' (known: {})", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for fix in FixPolicy::ALL {
            assert_eq!(fix.name().parse::<FixPolicy>(), Ok(fix));
        }
        assert!("nope".parse::<FixPolicy>().unwrap_err().contains("search-pin"));
    }
}
