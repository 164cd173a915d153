//! `sim sweep` and `sim merge`: many seeds of one scenario and fix, as a
//! nightly job runs them.
//!
//! A sweep writes into its output directory:
//! - `sweep.json`, what is swept (scenario, fix, seed range, shard, swarm,
//!   canary fraction), so that `--resume` and `sim merge` can refuse a
//!   directory of another sweep;
//! - `results.jsonl`, one [`SeedLine`] per finished seed, appended and
//!   flushed as each finishes (in completion order): killing the process
//!   loses no finished result, and a line cut short by the kill is dropped
//!   on `--resume`;
//! - `seeds/`, a seed file for every failing seed.
//!
//! The summary ([`Summary`]) is computed from the result lines alone, so a
//! resumed sweep, or shards merged with `sim merge`, give the same summary
//! as one uninterrupted run. Wall-clock figures (seeds per second, slowest
//! seeds) are kept apart from it ([`wall_clock`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use engine::fix::FixPolicy;
use serde::{Deserialize, Serialize};

use crate::pool::{self, Caught, PANIC_KIND, run_caught};
use crate::report::SeedRange;
use crate::runner::{Outcome, RunResult, RunSpec};
use crate::seedfile::{Fingerprint, SeedFile};

/// Version of `sweep.json` and of the lines of `results.jsonl`.
pub const FORMAT_VERSION: u32 = 1;

/// The kind recorded when a canary seed gave two different traces.
pub const NONDETERMINISM_KIND: &str = "nondeterminism";

/// Shard `index` of `count` (`--shard K/N`, K from 0): the seeds whose
/// offset from the start of the range is K modulo N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn seeds(self, range: SeedRange) -> impl Iterator<Item = u64> {
        let step = usize::try_from(self.count).unwrap_or(usize::MAX);
        (range.start.saturating_add(self.index).min(range.end)..range.end).step_by(step)
    }

    /// How many seeds of `range` are this shard's (without walking them).
    pub fn len(self, range: SeedRange) -> u64 {
        range.len().saturating_sub(self.index).div_ceil(self.count)
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("bad shard '{text}': expected K/N with 0 <= K < N");
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u64, u64) =
            (k.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What a sweep runs: the contents of `sweep.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub scenario: String,
    pub fix: String,
    /// `[A, B]`, B excluded.
    pub seeds: [u64; 2],
    /// `K/N`.
    pub shard: String,
    pub swarm: bool,
    /// Fraction of seeds run twice as a determinism canary.
    pub canary: f64,
}

impl Manifest {
    fn range(&self) -> SeedRange {
        SeedRange { start: self.seeds[0], end: self.seeds[1] }
    }

    /// The same sweep, whichever shard.
    fn same_sweep(&self, other: &Manifest) -> bool {
        (&self.scenario, &self.fix, self.seeds, self.swarm, self.canary)
            == (&other.scenario, &other.fix, other.seeds, other.swarm, other.canary)
    }
}

/// One finished seed: a line of `results.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedLine {
    pub seed: u64,
    pub outcome: Outcome,
    /// Every violation kind the run reported, sorted, without repeats.
    pub kinds: Vec<String>,
    pub fingerprint: Option<Fingerprint>,
    /// The first violation's message (or where the run panicked).
    pub first_violation: Option<String>,
    /// Empty for a run that panicked.
    pub trace_hash: String,
    pub ops_completed: u64,
    pub sim_time_ns: u64,
    /// The [`COVERAGE`] states the run reached.
    pub coverage: Vec<String>,
    /// For a canary seed: whether its second run gave the same trace.
    pub canary_same: Option<bool>,
    /// The seed file written for a failing run, relative to the sweep directory.
    pub seed_file: Option<String>,
    /// Wall-clock; never part of the summary.
    pub wall_ms: u64,
}

impl SeedLine {
    /// The line without its wall-clock time, for comparing two sweeps.
    pub fn deterministic(&self) -> SeedLine {
        SeedLine { wall_ms: 0, ..self.clone() }
    }
}

/// The interesting states a sweep should reach, each with how a run shows it.
pub const COVERAGE: [(&str, &str); 8] = [
    ("restart_write_lock", "a search restarted to write-lock higher levels"),
    ("restart_setup_nodes", "a search restarted to split or merge a node"),
    ("restart_slot_zero", "a search restarted to update a parent's key at slot 0"),
    ("restart_read_block", "a search restarted to read a block that was not cached"),
    ("reclaim_between_release_and_restart", "reclaim evicted a tree block while a search was restarting"),
    (
        "writeback_of_block_cowed_in_running_transaction",
        "a block of the running transaction was written before its commit",
    ),
    ("enospc_ticket_flushing", "a metadata reservation waited on a ticket while space was flushed"),
    ("power_loss_during_commit", "the power went while a transaction was committing"),
];

/// The [`COVERAGE`] states `result` reached. Scenarios without the engine
/// reach none.
pub fn coverage(result: &RunResult) -> Vec<String> {
    let stats = &result.stats;
    let count = |path: &[&str]| {
        path.iter()
            .try_fold(stats, |value, key| value.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let state = stats.get("transaction").and_then(|t| t.get("running_state")).and_then(|s| s.as_str());
    let reached = [
        count(&["searches", "restarts", "write_lock"]) > 0,
        count(&["searches", "restarts", "setup_nodes"]) > 0,
        count(&["searches", "restarts", "slot_zero"]) > 0,
        count(&["searches", "restarts", "read_block"]) > 0,
        count(&["searches", "reclaim_in_restart_window"]) > 0,
        count(&["extent_buffers", "writes_of_running_transaction"]) > 0,
        count(&["space", "metadata", "tickets_queued"]) > 0,
        result.power_loss
            && matches!(state, Some("commit_start" | "commit_doing" | "unblocked" | "super_committed")),
    ];
    COVERAGE
        .iter()
        .zip(reached)
        .filter(|(_, reached)| *reached)
        .map(|((name, _), _)| name.to_string())
        .collect()
}

/// What to sweep and where.
#[derive(Clone, Debug)]
pub struct SweepSpec {
    pub scenario: String,
    pub seeds: SeedRange,
    pub fix: FixPolicy,
    pub jobs: usize,
    pub shard: Shard,
    pub swarm: bool,
    pub canary: f64,
    pub out: PathBuf,
    pub resume: bool,
}

impl SweepSpec {
    fn manifest(&self) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            scenario: self.scenario.clone(),
            fix: self.fix.name().to_string(),
            seeds: [self.seeds.start, self.seeds.end],
            shard: self.shard.to_string(),
            swarm: self.swarm,
            canary: self.canary,
        }
    }
}

/// Whether `seed` is one of the `fraction` of seeds run twice (a hash of
/// the seed decides, so the same seeds are chosen in every shard and run).
pub fn is_canary(seed: u64, fraction: f64) -> bool {
    let draw = xxhash_rust::xxh3::xxh3_64(&seed.to_le_bytes());
    (draw as f64) < fraction * 2f64.powi(64)
}

/// What a finished sweep reports.
pub struct SweepOutcome {
    pub summary: Summary,
    /// Seeds this invocation ran (not those resumed from the directory).
    pub ran: u64,
    pub elapsed: Duration,
    /// Every line, in seed order (for the wall-clock report).
    pub lines: Vec<SeedLine>,
}

const RESULTS: &str = "results.jsonl";
const MANIFEST: &str = "sweep.json";

/// Run the sweep. An error is bad input or an output directory that cannot
/// be used; violations are results.
pub fn sweep(spec: &SweepSpec, progress: &mut dyn Progress) -> Result<SweepOutcome, String> {
    scenarios::by_name(&spec.scenario)?;
    if spec.jobs == 0 {
        return Err("bad --jobs 0: at least 1".to_string());
    }
    if !(0.0..=1.0).contains(&spec.canary) {
        return Err(format!("bad --canary {}: a fraction from 0 to 1", spec.canary));
    }
    let manifest = spec.manifest();
    let dir = &spec.out;
    let mut done = open_dir(dir, &manifest, spec.resume)?;
    let finished_before: BTreeSet<u64> = done.keys().copied().collect();
    let todo = spec.shard.seeds(spec.seeds).filter(|seed| !finished_before.contains(seed));
    let todo_count = spec.shard.len(spec.seeds) - finished_before.len() as u64;
    let mut results = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(RESULTS))
        .map_err(|e| format!("cannot open {}: {e}", dir.join(RESULTS).display()))?;
    let started = Instant::now();
    progress.start(todo_count, finished_before.len() as u64);
    let mut error = None;
    pool::for_each_parallel(
        spec.jobs,
        todo,
        "sweep",
        |&seed| run_seed(spec, seed),
        |_, seed, outcome| {
            let line = outcome.and_then(|(mut line, result)| {
                if let Some(result) = result {
                    line.seed_file = Some(save_seed_file(dir, &result)?);
                }
                let text = serde_json::to_string(&line).expect("a line serializes") + "\n";
                results
                    .write_all(text.as_bytes())
                    .and_then(|()| results.flush())
                    .map_err(|e| format!("cannot append to {}: {e}", dir.join(RESULTS).display()))?;
                Ok(line)
            });
            match line {
                Ok(line) => {
                    progress.finished(&line);
                    done.insert(line.seed, line);
                    true
                }
                Err(e) => {
                    error.get_or_insert(format!("seed {seed}: {e}"));
                    false
                }
            }
        },
    )?;
    progress.finish();
    if let Some(error) = error {
        return Err(error);
    }
    let lines: Vec<SeedLine> = done.into_values().collect();
    let summary = Summary::of(std::slice::from_ref(&manifest), &lines);
    Ok(SweepOutcome { summary, ran: todo_count, elapsed: started.elapsed(), lines })
}

/// Run one seed (twice for a canary): its line, and the result when it
/// failed (for its seed file).
fn run_seed(spec: &SweepSpec, seed: u64) -> Result<(SeedLine, Option<Box<RunResult>>), String> {
    let scenario = scenarios::by_name(&spec.scenario)?;
    let mut run_spec = RunSpec::new(&spec.scenario, seed, spec.fix);
    run_spec.swarm = spec.swarm;
    let started = Instant::now();
    let caught = run_caught(&*scenario, &run_spec)?;
    let canary_same = if is_canary(seed, spec.canary) {
        let again = run_caught(&*scenario, &run_spec)?;
        Some(match (&caught, &again) {
            (Caught::Finished(a), Caught::Finished(b)) => a.trace_hash == b.trace_hash,
            (Caught::Panicked(a), Caught::Panicked(b)) => a == b,
            _ => false,
        })
    } else {
        None
    };
    let wall_ms = started.elapsed().as_millis() as u64;
    let mut line = match &caught {
        Caught::Finished(result) => SeedLine {
            seed,
            outcome: result.outcome,
            kinds: result
                .violations
                .iter()
                .map(|v| v.kind.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            fingerprint: Fingerprint::of(result),
            first_violation: result.violations.first().map(|v| v.message.clone()),
            trace_hash: result.trace_hash.clone(),
            ops_completed: result.ops_completed,
            sim_time_ns: result.sim_time_ns,
            coverage: coverage(result),
            canary_same,
            seed_file: None,
            wall_ms,
        },
        Caught::Panicked(message) => SeedLine {
            seed,
            outcome: Outcome::Violation,
            kinds: vec![PANIC_KIND.to_string()],
            fingerprint: Some(Fingerprint {
                kind: PANIC_KIND.to_string(),
                location: message.split(": ").next().unwrap_or_default().to_string(),
            }),
            first_violation: Some(message.clone()),
            trace_hash: String::new(),
            ops_completed: 0,
            sim_time_ns: 0,
            coverage: Vec::new(),
            canary_same,
            seed_file: None,
            wall_ms,
        },
    };
    if canary_same == Some(false) {
        line.outcome = Outcome::Violation;
        line.kinds.push(NONDETERMINISM_KIND.to_string());
        line.kinds.sort();
    }
    let failed = match caught {
        Caught::Finished(result) if line.outcome == Outcome::Violation => Some(result),
        _ => None,
    };
    Ok((line, failed))
}

fn save_seed_file(dir: &Path, result: &RunResult) -> Result<String, String> {
    let seeds = dir.join("seeds");
    std::fs::create_dir_all(&seeds).map_err(|e| format!("cannot create {}: {e}", seeds.display()))?;
    let name = format!("seeds/{}-{}-{}.json", result.scenario, result.seed, result.fix);
    SeedFile::from_result(result, false).save(&dir.join(&name))?;
    Ok(name)
}

/// Prepare `dir` for `manifest`: a new sweep needs an empty or new
/// directory; `resume` needs the same sweep. Returns the finished seeds.
fn open_dir(dir: &Path, manifest: &Manifest, resume: bool) -> Result<BTreeMap<u64, SeedLine>, String> {
    let manifest_path = dir.join(MANIFEST);
    if manifest_path.exists() {
        if !resume {
            return Err(format!(
                "{} already holds a sweep; pass --resume to go on with it, or choose another --out",
                dir.display()
            ));
        }
        let (found, lines) = load_dir(dir, true)?;
        if found != *manifest {
            return Err(format!(
                "{} holds another sweep ({} {} seeds {}..{} shard {}); --resume needs the same arguments",
                dir.display(),
                found.scenario,
                found.fix,
                found.seeds[0],
                found.seeds[1],
                found.shard
            ));
        }
        return Ok(lines.into_iter().map(|line| (line.seed, line)).collect());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Written whole or not at all (a rename), so that a process killed here
    // leaves a directory a new sweep can start in, not half a manifest.
    let text = serde_json::to_string_pretty(manifest).expect("a manifest serializes") + "\n";
    let partial = dir.join(format!("{MANIFEST}.partial"));
    std::fs::write(&partial, text)
        .and_then(|()| std::fs::rename(&partial, &manifest_path))
        .map_err(|e| format!("cannot write {}: {e}", manifest_path.display()))?;
    Ok(BTreeMap::new())
}

/// Read a sweep directory: its manifest and its result lines. A last line
/// cut short (the process was killed while writing it) is dropped, and with
/// `repair` cut from the file so that appending goes on cleanly; any other
/// bad line is an error.
pub fn load_dir(dir: &Path, repair: bool) -> Result<(Manifest, Vec<SeedLine>), String> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| format!("{} is not a sweep directory (cannot read {MANIFEST}: {e})", dir.display()))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{}: bad sweep manifest: {e}", manifest_path.display()))?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(format!(
            "{}: sweep format version {} is newer than this sim understands ({FORMAT_VERSION})",
            manifest_path.display(),
            manifest.format_version
        ));
    }
    let results_path = dir.join(RESULTS);
    let text = match std::fs::read_to_string(&results_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", results_path.display())),
    };
    let mut lines = Vec::new();
    let mut good_bytes = 0;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        match serde_json::from_str::<SeedLine>(line) {
            Ok(parsed) if line.ends_with('\n') => {
                lines.push(parsed);
                good_bytes += line.len();
            }
            _ if !line.ends_with('\n') => break,
            Err(e) => {
                return Err(format!("{} line {}: corrupt result: {e}", results_path.display(), number + 1));
            }
            Ok(_) => unreachable!("a line that ends in a newline was handled above"),
        }
    }
    if repair && good_bytes < text.len() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&results_path)
            .map_err(|e| format!("cannot open {}: {e}", results_path.display()))?;
        file.set_len(good_bytes as u64)
            .map_err(|e| format!("cannot repair {}: {e}", results_path.display()))?;
    }
    let range = manifest.range();
    if let Some(line) = lines.iter().find(|line| !(range.start..range.end).contains(&line.seed)) {
        return Err(format!("{}: seed {} is outside the sweep's range", results_path.display(), line.seed));
    }
    Ok((manifest, lines))
}

/// Combine sweep directories (shards of one sweep, or a sweep and its
/// resumption): one line per seed. A seed present twice must have the same
/// result.
pub fn merge(dirs: &[PathBuf]) -> Result<Summary, String> {
    let mut manifests: Vec<Manifest> = Vec::new();
    let mut by_seed: BTreeMap<u64, SeedLine> = BTreeMap::new();
    for dir in dirs {
        let (manifest, lines) = load_dir(dir, false)?;
        if let Some(first) = manifests.first()
            && !first.same_sweep(&manifest)
        {
            return Err(format!(
                "{} is another sweep ({} {} seeds {}..{}) than {} ({} {} seeds {}..{})",
                dir.display(),
                manifest.scenario,
                manifest.fix,
                manifest.seeds[0],
                manifest.seeds[1],
                dirs[0].display(),
                first.scenario,
                first.fix,
                first.seeds[0],
                first.seeds[1]
            ));
        }
        for line in lines {
            if let Some(seen) = by_seed.get(&line.seed)
                && seen.deterministic()
                    != (SeedLine { seed_file: seen.seed_file.clone(), ..line.deterministic() })
            {
                return Err(format!(
                    "seed {} has two different results (trace {} and {}): nondeterminism, or two different builds",
                    line.seed, seen.trace_hash, line.trace_hash
                ));
            }
            by_seed.insert(line.seed, line);
        }
        manifests.push(manifest);
    }
    if manifests.is_empty() {
        return Err("nothing to merge: name at least one sweep directory".to_string());
    }
    let lines: Vec<SeedLine> = by_seed.into_values().collect();
    Ok(Summary::of(&manifests, &lines))
}

/// What a sweep found, from its result lines alone: the same for a resumed
/// sweep or merged shards as for one uninterrupted run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub fix: String,
    pub seeds: [u64; 2],
    pub swarm: bool,
    /// The shards combined, `K/N`, sorted.
    pub shards: Vec<String>,
    pub seeds_run: u64,
    /// Seeds of the shards combined that have no result yet.
    pub seeds_missing: u64,
    /// Shards of the sweep (all of one count N) that were not combined.
    pub shards_missing: Vec<String>,
    pub passes: u64,
    pub failing_seeds: Vec<u64>,
    /// For every violation kind, the seeds that reported it.
    pub violation_kind_seeds: BTreeMap<String, u64>,
    /// For every failure fingerprint, its seeds.
    pub fingerprints: BTreeMap<String, Vec<u64>>,
    pub canary_seeds: u64,
    pub canary_diverged: Vec<u64>,
    /// For every [`COVERAGE`] state, the seeds that reached it (empty when
    /// the scenario reports no engine statistics).
    pub coverage: BTreeMap<String, u64>,
}

impl Summary {
    pub fn of(manifests: &[Manifest], lines: &[SeedLine]) -> Summary {
        let first = &manifests[0];
        let mut shards: Vec<Shard> = manifests.iter().filter_map(|m| m.shard.parse().ok()).collect();
        shards.sort();
        shards.dedup();
        let range = first.range();
        let expected: u64 = if shards.iter().any(|s| s.count == 1) {
            range.len()
        } else {
            shards.iter().map(|shard| shard.seeds(range).count() as u64).sum()
        };
        let shards_missing = match shards.first() {
            Some(first) if shards.iter().all(|s| s.count == first.count) => (0..first.count)
                .map(|index| Shard { index, count: first.count })
                .filter(|shard| !shards.contains(shard))
                .map(|shard| shard.to_string())
                .collect(),
            _ => Vec::new(),
        };
        let mut kinds = BTreeMap::new();
        let mut fingerprints: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for line in lines {
            for kind in &line.kinds {
                *kinds.entry(kind.clone()).or_insert(0) += 1;
            }
            if let Some(fingerprint) = &line.fingerprint {
                fingerprints.entry(fingerprint.to_string()).or_default().push(line.seed);
            }
        }
        let engine_stats = lines.iter().any(|line| !line.coverage.is_empty());
        let coverage = if engine_stats {
            COVERAGE
                .iter()
                .map(|(name, _)| {
                    (
                        name.to_string(),
                        lines.iter().filter(|l| l.coverage.iter().any(|c| c == name)).count() as u64,
                    )
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        Summary {
            scenario: first.scenario.clone(),
            fix: first.fix.clone(),
            seeds: first.seeds,
            swarm: first.swarm,
            shards: shards.iter().map(Shard::to_string).collect(),
            seeds_run: lines.len() as u64,
            seeds_missing: expected.saturating_sub(lines.len() as u64),
            shards_missing,
            passes: lines.iter().filter(|l| l.outcome == Outcome::Pass).count() as u64,
            failing_seeds: lines.iter().filter(|l| l.outcome == Outcome::Violation).map(|l| l.seed).collect(),
            violation_kind_seeds: kinds,
            fingerprints,
            canary_seeds: lines.iter().filter(|l| l.canary_same.is_some()).count() as u64,
            canary_diverged: lines.iter().filter(|l| l.canary_same == Some(false)).map(|l| l.seed).collect(),
            coverage,
        }
    }

    /// The states no seed reached.
    pub fn unreached(&self) -> Vec<&str> {
        self.coverage.iter().filter(|(_, seeds)| **seeds == 0).map(|(name, _)| name.as_str()).collect()
    }
}

/// The summary as text; no wall-clock figure.
pub fn summary_text(summary: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "sweep  scenario {}  fix {}  seeds {}..{}{}  shards {}",
        summary.scenario,
        summary.fix,
        summary.seeds[0],
        summary.seeds[1],
        if summary.swarm { "  swarm" } else { "" },
        summary.shards.join(" ")
    );
    let _ = writeln!(
        out,
        "seeds  {} run, {} pass, {} violation{}",
        summary.seeds_run,
        summary.passes,
        summary.failing_seeds.len(),
        if summary.seeds_missing > 0 {
            format!(", {} not run yet", summary.seeds_missing)
        } else {
            String::new()
        }
    );
    if !summary.shards_missing.is_empty() {
        let _ = writeln!(out, "MISSING shards {}", summary.shards_missing.join(" "));
    }
    if !summary.violation_kind_seeds.is_empty() {
        let kinds: Vec<String> =
            summary.violation_kind_seeds.iter().map(|(kind, seeds)| format!("{kind} {seeds}")).collect();
        let _ = writeln!(out, "violations (seeds per kind)  {}", kinds.join(", "));
        let _ = writeln!(out, "failures (first violation: kind in location, seeds, first seed)");
        for (fingerprint, seeds) in &summary.fingerprints {
            let _ = writeln!(out, "  {fingerprint:<60} {:>6}  {}", seeds.len(), seeds[0]);
        }
    }
    let _ = writeln!(
        out,
        "canary  {} seeds run twice, {} diverged{}",
        summary.canary_seeds,
        summary.canary_diverged.len(),
        if summary.canary_diverged.is_empty() {
            String::new()
        } else {
            format!(": {:?}", summary.canary_diverged)
        }
    );
    if !summary.coverage.is_empty() {
        let _ = writeln!(out, "coverage (seeds reaching each state)");
        for (name, description) in COVERAGE {
            let seeds = summary.coverage.get(name).copied().unwrap_or(0);
            let flag = if seeds == 0 { "  NEVER REACHED" } else { "" };
            let _ = writeln!(out, "  {name:<50} {seeds:>6}{flag}  ({description})");
        }
    }
    out
}

/// Wall-clock figures of a sweep: seeds per second and the slowest seeds.
pub fn wall_clock(lines: &[SeedLine], ran: u64, elapsed: Option<Duration>) -> String {
    let mut out = String::new();
    let run_ms: u64 = lines.iter().map(|l| l.wall_ms).sum();
    if let Some(elapsed) = elapsed.filter(|e| !e.is_zero() && ran > 0) {
        let _ = writeln!(
            out,
            "wall clock  {ran} seeds in {:.1} s: {:.2} seeds/s",
            elapsed.as_secs_f64(),
            ran as f64 / elapsed.as_secs_f64()
        );
    }
    if run_ms > 0 {
        let _ = writeln!(
            out,
            "wall clock  {:.2} seeds per second of run time (one job)",
            lines.len() as f64 * 1000.0 / run_ms as f64
        );
    }
    let mut slowest: Vec<&SeedLine> = lines.iter().collect();
    slowest.sort_by_key(|l| (std::cmp::Reverse(l.wall_ms), l.seed));
    let parts: Vec<String> =
        slowest.iter().take(5).map(|l| format!("{} ({:.1} s)", l.seed, l.wall_ms as f64 / 1000.0)).collect();
    if !parts.is_empty() {
        let _ = writeln!(out, "slowest seeds  {}", parts.join(", "));
    }
    out
}

/// Fingerprints of the seed files in `dir` (the known failures).
pub fn known_fingerprints(dir: &Path) -> Result<BTreeSet<String>, String> {
    let mut known = BTreeSet::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("cannot read {}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "json")
            && let Some(fingerprint) = SeedFile::load(&path)?.expected.fingerprint()
        {
            known.insert(fingerprint.to_string());
        }
    }
    Ok(known)
}

/// How a sweep shows its progress.
pub trait Progress {
    fn start(&mut self, todo: u64, done_before: u64);
    fn finished(&mut self, line: &SeedLine);
    fn finish(&mut self);
}

/// No progress output (tests, benchmarks).
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: u64, _: u64) {}
    fn finished(&mut self, _: &SeedLine) {}
    fn finish(&mut self) {}
}

/// A progress bar on a terminal; otherwise a plain line every 5% of the seeds.
pub struct StderrProgress {
    bar: Option<indicatif::ProgressBar>,
    todo: u64,
    finished: u64,
    failing: u64,
    started: Instant,
}

impl StderrProgress {
    pub fn new() -> Self {
        Self { bar: None, todo: 0, finished: 0, failing: 0, started: Instant::now() }
    }
}

impl Default for StderrProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for StderrProgress {
    fn start(&mut self, todo: u64, done_before: u64) {
        self.todo = todo;
        self.started = Instant::now();
        if done_before > 0 {
            eprintln!("sweep: resuming, {done_before} seeds already done, {todo} to run");
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(todo);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} seeds  {per_sec}  eta {eta}  {msg}",
                )
                .expect("a valid template"),
            );
            self.bar = Some(bar);
        }
    }

    fn finished(&mut self, line: &SeedLine) {
        self.finished += 1;
        self.failing += u64::from(line.outcome == Outcome::Violation);
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{} failing", self.failing));
            bar.inc(1);
        } else if self.finished.is_multiple_of((self.todo / 20).max(1)) || self.finished == self.todo {
            let seconds = self.started.elapsed().as_secs_f64();
            eprintln!(
                "sweep: {}/{} seeds, {} failing, {:.1} seeds/s",
                self.finished,
                self.todo,
                self.failing,
                self.finished as f64 / seconds.max(1e-9)
            );
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_range_without_overlap() {
        let range = SeedRange { start: 10, end: 23 };
        let mut all: Vec<u64> = (0..4).flat_map(|k| Shard { index: k, count: 4 }.seeds(range)).collect();
        all.sort();
        assert_eq!(all, (10..23).collect::<Vec<_>>());
        for count in 1..6 {
            for index in 0..count {
                let shard = Shard { index, count };
                for range in [range, SeedRange { start: 7, end: 7 }, SeedRange { start: 0, end: 2 }] {
                    assert_eq!(shard.len(range), shard.seeds(range).count() as u64, "{shard:?} of {range:?}");
                }
            }
        }
        assert_eq!("2/5".parse::<Shard>(), Ok(Shard { index: 2, count: 5 }));
        for bad in ["5/5", "1", "a/2", "1/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn the_canary_picks_about_its_fraction() {
        let picked = (0..10_000).filter(|&seed| is_canary(seed, 0.05)).count();
        assert!((400..600).contains(&picked), "{picked}");
        assert!((0..1000).all(|seed| !is_canary(seed, 0.0) && is_canary(seed, 1.0)));
    }
}
