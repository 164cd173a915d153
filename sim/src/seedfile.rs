//! Seed files: a run saved as a small versioned JSON document that `sim
//! replay` reproduces exactly (same trace hash, same failure fingerprint).

use std::path::Path;

use engine::fix::FixPolicy;
use serde::{Deserialize, Serialize};

use crate::runner::{Outcome, RunConfig, RunResult, RunSpec};

/// Version 2 added `expected.location` and `note`; version 1 files still load.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFile {
    pub format_version: u32,
    pub scenario: String,
    pub seed: u64,
    pub fix: String,
    /// Why the file is kept (free text, e.g. the bug it reproduced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub config: RunConfig,
    /// The scheduler's decisions; replay follows them exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_log: Option<Vec<u32>>,
    pub expected: Expected,
}

/// The outcome a replay must reproduce.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    pub outcome: Outcome,
    pub trace_hash: String,
    /// Kind of the first violation, if the run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub violation: Option<String>,
    /// Where the first violation was raised ([`Fingerprint::location`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// What identifies a failure across runs that differ in detail (handle
/// numbers, byte counts, times): the kind of the first violation and where
/// it was raised. Shrinking keeps it; a nightly sweep calls a failure new
/// when no known seed file has its fingerprint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fingerprint {
    pub kind: String,
    pub location: String,
}

impl Fingerprint {
    /// The fingerprint of a run's first violation, if it has one.
    pub fn of(result: &RunResult) -> Option<Self> {
        result.violations.first().map(|v| Self { kind: v.kind.clone(), location: location(&v.message) })
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}", self.kind)
        } else {
            write!(f, "{} in {}", self.kind, self.location)
        }
    }
}

/// Where a violation message says it was raised: the first kernel function
/// it names (a word starting with `btrfs_` or `__btrfs_`, as in the kernel's WARNINGs and
/// abort messages), else the operation it names in parentheses, else
/// nothing. Numbers never take part.
pub fn location(message: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let kernel_function = |w: &&str| w.trim_start_matches('_').starts_with("btrfs_");
    if let Some(function) = message.split(|c: char| !is_word(c)).find(kernel_function) {
        return function.to_string();
    }
    message
        .split('(')
        .skip(1)
        .map(|after| &after[..after.find(|c: char| !is_word(c)).unwrap_or(after.len())])
        .find(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .unwrap_or_default()
        .to_string()
}

impl Expected {
    /// The fingerprint this file records, if the run failed.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        Some(Fingerprint {
            kind: self.violation.clone()?,
            location: self.location.clone().unwrap_or_default(),
        })
    }
}

/// `text` with its control characters escaped (`\n` and the like).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

impl SeedFile {
    pub fn from_result(result: &RunResult, with_decision_log: bool) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            scenario: result.scenario.clone(),
            seed: result.seed,
            fix: result.fix.clone(),
            note: None,
            config: result.config.clone(),
            decision_log: with_decision_log.then(|| result.decision_log.clone()),
            expected: Expected::of(result),
        }
    }

    /// Parse and validate. Every error is one line naming what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not a seed file (bad JSON: {e})"))?;
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or("not a seed file (no format_version)")?;
        if version > u64::from(FORMAT_VERSION) {
            return Err(format!(
                "seed file format version {version} is newer than this sim understands ({FORMAT_VERSION}); update cowsim"
            ));
        }
        // serde quotes an unknown field's name as it is, and a JSON escape
        // can put a newline in it: the message must stay one line.
        let file: SeedFile = serde_json::from_value(value)
            .map_err(|e| format!("bad seed file: {}", one_line(&e.to_string())))?;
        scenarios::by_name(&file.scenario)?;
        file.fix.parse::<FixPolicy>()?;
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).expect("seed file serializes") + "\n";
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn spec(&self) -> RunSpec {
        RunSpec {
            scenario: self.scenario.clone(),
            seed: self.seed,
            fix: self.fix.parse().expect("validated when parsed"),
            params: Some(self.config.params.clone()),
            world: Some(self.config.world.clone()),
            decision_log: self.decision_log.clone(),
            scheduler: None,
            keep_trace: false,
            swarm: false,
        }
    }
}

impl Expected {
    pub fn of(result: &RunResult) -> Self {
        Self {
            outcome: result.outcome,
            trace_hash: result.trace_hash.clone(),
            violation: result.violations.first().map(|v| v.kind.clone()),
            location: Fingerprint::of(result).map(|f| f.location),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = include_str!("../../seeds/cow-amplification-119-none.json");

    fn one_line_error(text: &str) -> Result<(), TestCaseError> {
        if let Err(error) = SeedFile::parse(text) {
            prop_assert!(!error.contains('\n'), "a multi-line error: {error}");
            prop_assert!(!error.is_empty());
        }
        Ok(())
    }

    #[test]
    fn the_base_of_the_fuzzing_is_a_valid_file() {
        let file = SeedFile::parse(VALID).unwrap();
        assert_eq!(
            file.expected.fingerprint().unwrap().to_string(),
            "migrate_enospc in btrfs_insert_delayed_dir_index"
        );
    }

    #[test]
    fn locations_name_the_kernel_function_or_the_operation() {
        let abort = "BTRFS: Transaction aborted (error -28) in btrfs_commit_transaction: transaction 5 forced read-only";
        assert_eq!(location(abort), "btrfs_commit_transaction");
        let inner = "BTRFS: Transaction aborted (error -28) in __btrfs_run_delayed_items: transaction 5";
        assert_eq!(location(inner), "__btrfs_run_delayed_items", "not the '(error' before it");
        let migrate = "WARNING at delayed-inode.c btrfs_insert_delayed_dir_index: block_rsv_migrate of 262144 bytes failed";
        assert_eq!(location(migrate), "btrfs_insert_delayed_dir_index");
        assert_eq!(location("handle 5 (create, transaction 7) consumed 9 bytes"), "create");
        assert_eq!(location("no operation finished for 120 s"), "");
    }

    proptest! {
        // The parser is fuzzed: any text, and every cut or byte change of
        // a valid file, gives a seed file or a one-line error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            one_line_error(&text)?;
        }

        #[test]
        fn cut_or_mutated_files_never_panic(cut in 0..VALID.len(), at in 0..VALID.len(), byte in any::<u8>()) {
            one_line_error(&String::from_utf8_lossy(&VALID.as_bytes()[..cut]))?;
            let mut bytes = VALID.as_bytes().to_vec();
            bytes[at] = byte;
            one_line_error(&String::from_utf8_lossy(&bytes))?;
        }
    }
}
