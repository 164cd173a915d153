//! `sim compare`: the same seeds of one scenario under each fix, side by side.
//!
//! Every (fix, seed) run is independent and single-threaded inside, so the
//! runs are spread over worker threads and collected by (fix, seed): the
//! table and the JSON are the same for any number of jobs. Wall-clock times
//! are kept apart from them (see [`wall_clock`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use engine::fix::FixPolicy;
use serde::Serialize;

use crate::pool::{self, Caught, run_caught};
use crate::report::SeedRange;
use crate::runner::{RunResult, RunSpec, replay_command};

/// What a broken invariant says about a fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViolationClass {
    /// Space reservation ran short: the symptom of the COW amplification bug.
    Reservation,
    /// The run stopped getting anywhere: deadlock, stall, livelock
    /// (`no_progress`) or a step or time bound.
    Liveness,
    /// Anything else: corruption, lost data, an abort, a crash.
    Safety,
}

/// Classify a violation kind (`RunResult.violations[].kind`). Reservation:
/// `reservation_overdraw`, `trans_rsv_overdrawn`, `migrate_enospc`,
/// `enospc_abort`; liveness: `deadlock`, `stall`, `no_progress`,
/// `step_limit`, `time_limit`; everything else is a safety violation.
pub fn classify(kind: &str) -> ViolationClass {
    match kind {
        "reservation_overdraw" | "trans_rsv_overdrawn" | "migrate_enospc" | "enospc_abort" => {
            ViolationClass::Reservation
        }
        "deadlock" | "stall" | "no_progress" | "step_limit" | "time_limit" => ViolationClass::Liveness,
        _ => ViolationClass::Safety,
    }
}

pub use crate::pool::PANIC_KIND;

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareSpec {
    pub scenario: String,
    pub seeds: SeedRange,
    pub fixes: Vec<FixPolicy>,
    /// Worker threads, at least 1.
    pub jobs: usize,
}

/// `--fixes`: comma-separated fix names; `None` means all of them in
/// [`FixPolicy::ALL`] order.
pub fn parse_fixes(list: Option<&str>) -> Result<Vec<FixPolicy>, String> {
    let Some(list) = list else { return Ok(FixPolicy::ALL.to_vec()) };
    let mut fixes = Vec::new();
    for name in list.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(format!("bad --fixes '{list}': expected comma-separated fix names"));
        }
        let fix: FixPolicy = name.parse()?;
        if fixes.contains(&fix) {
            return Err(format!("bad --fixes '{list}': '{name}' is listed twice"));
        }
        fixes.push(fix);
    }
    Ok(fixes)
}

/// One fix's line of the comparison; serializes to an element of `fixes` in `--json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FixRow {
    pub fix: String,
    pub seeds_run: u64,
    pub reservation_violation_seeds: u64,
    pub safety_violation_seeds: u64,
    pub liveness_violation_seeds: u64,
    /// For every violation kind, the seeds that reported it.
    pub violation_kind_seeds: BTreeMap<String, u64>,
    /// The largest COW count of a single search over every run of this fix.
    pub max_cows_per_search: u64,
    /// The 99th percentile (nearest rank) over runs of each run's own p99.
    pub p99_cows_per_search: u64,
    pub ops_completed: u64,
    /// The smallest seed with any violation.
    pub first_failing_seed: Option<u64>,
    /// The replay command of `first_failing_seed`.
    #[serde(skip)]
    pub first_failing_replay: Option<String>,
    /// Whether any run reported `stats.searches` (scenarios without the engine do not).
    #[serde(skip)]
    pub has_search_stats: bool,
    /// Wall-clock milliseconds from the start of each failing run to its
    /// first violation, in seed order. Never part of the JSON.
    #[serde(skip)]
    pub failing_wall_ms: Vec<u64>,
    /// Runs that panicked (counted as safety violations): seed, where and why.
    #[serde(skip)]
    pub panics: Vec<(u64, String)>,
}

/// The whole comparison; serializes to the `--json` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub scenario: String,
    /// `[A, B]`, B excluded.
    pub seeds: [u64; 2],
    pub fixes: Vec<FixRow>,
}

/// What one run contributes to its fix's row.
#[derive(Clone, Debug)]
struct RunSummary {
    reservation: bool,
    safety: bool,
    liveness: bool,
    kinds: Vec<String>,
    /// `stats.searches.cows_per_search` (max, p99), if the run has it.
    cows: Option<(u64, u64)>,
    ops_completed: u64,
    /// Wall-clock time to the first violation (the whole run if none).
    wall_ms: u64,
    replay_command: String,
    /// The run panicked: where and why.
    panic: Option<String>,
}

impl RunSummary {
    fn of(result: &RunResult) -> Self {
        let classes: Vec<ViolationClass> = result.violations.iter().map(|v| classify(&v.kind)).collect();
        let cows = result.stats.get("searches").and_then(|s| s.get("cows_per_search")).map(|c| {
            let field = |name: &str| c.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
            (field("max"), field("p99"))
        });
        let mut kinds: Vec<String> = result.violations.iter().map(|v| v.kind.clone()).collect();
        kinds.sort();
        kinds.dedup();
        Self {
            reservation: classes.contains(&ViolationClass::Reservation),
            safety: classes.contains(&ViolationClass::Safety),
            liveness: classes.contains(&ViolationClass::Liveness),
            kinds,
            cows,
            ops_completed: result.ops_completed,
            wall_ms: result.first_violation_wall_ms.unwrap_or(result.wall_ms),
            replay_command: result.replay_command.clone(),
            panic: None,
        }
    }

    fn failed(&self) -> bool {
        self.reservation || self.safety || self.liveness
    }
}

/// Run one seed; a panic inside the run is reported as a [`PANIC_KIND`] safety violation.
fn run_one(scenario: &dyn scenarios::Scenario, spec: &RunSpec) -> Result<RunSummary, String> {
    let started = Instant::now();
    Ok(match run_caught(scenario, spec)? {
        Caught::Finished(result) => RunSummary::of(&result),
        Caught::Panicked(message) => RunSummary {
            reservation: classify(PANIC_KIND) == ViolationClass::Reservation,
            safety: classify(PANIC_KIND) == ViolationClass::Safety,
            liveness: classify(PANIC_KIND) == ViolationClass::Liveness,
            kinds: vec![PANIC_KIND.to_string()],
            cows: None,
            ops_completed: 0,
            wall_ms: started.elapsed().as_millis() as u64,
            replay_command: replay_command(spec),
            panic: Some(message),
        },
    })
}

/// Run every seed under every fix and build the comparison. An error is bad
/// input (unknown scenario, no fix, no job, a run refusing its parameters).
pub fn compare(spec: &CompareSpec) -> Result<Comparison, String> {
    scenarios::by_name(&spec.scenario)?;
    if spec.fixes.is_empty() {
        return Err("no fix to compare".to_string());
    }
    if spec.jobs == 0 {
        return Err("bad --jobs 0: at least 1".to_string());
    }
    let per_fix = spec.seeds.len();
    per_fix
        .checked_mul(spec.fixes.len() as u64)
        .filter(|&total| usize::try_from(total).is_ok())
        .ok_or_else(|| format!("seed range {}..{} is too large", spec.seeds.start, spec.seeds.end))?;
    // Work items in (fix, seed) order, made as threads free up.
    let work = (0..spec.fixes.len()).flat_map(|fix| spec.seeds.iter().map(move |seed| (fix, seed)));
    let mut by_fix: Vec<BTreeMap<u64, RunSummary>> = vec![BTreeMap::new(); spec.fixes.len()];
    let mut error = None;
    pool::for_each_parallel(
        spec.jobs,
        work,
        "compare",
        |&(fix, seed)| {
            let scenario = scenarios::by_name(&spec.scenario)?;
            run_one(&*scenario, &RunSpec::new(&spec.scenario, seed, spec.fixes[fix]))
        },
        |index, (fix, seed), summary| {
            match summary {
                Ok(summary) => {
                    by_fix[fix].insert(seed, summary);
                    true
                }
                Err(e) => {
                    // Keep the error of the first item in order.
                    if error.as_ref().is_none_or(|&(first, _)| index < first) {
                        error = Some((index, format!("seed {seed} with fix {}: {e}", spec.fixes[fix])));
                    }
                    false
                }
            }
        },
    )?;
    if let Some((_, error)) = error {
        return Err(error);
    }
    let rows = spec
        .fixes
        .iter()
        .zip(by_fix)
        .map(|(fix, runs)| row(*fix, &runs.into_iter().collect::<Vec<_>>()))
        .collect();
    Ok(Comparison { scenario: spec.scenario.clone(), seeds: [spec.seeds.start, spec.seeds.end], fixes: rows })
}

/// The nearest-rank percentile of `values` (0 if there are none).
pub fn nearest_rank(values: &[u64], fraction: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One fix's row from its runs, in seed order.
fn row(fix: FixPolicy, runs: &[(u64, RunSummary)]) -> FixRow {
    let cows: Vec<(u64, u64)> = runs.iter().filter_map(|(_, run)| run.cows).collect();
    let p99s: Vec<u64> = cows.iter().map(|&(_, p99)| p99).collect();
    let first_failing = runs.iter().find(|(_, run)| run.failed());
    FixRow {
        fix: fix.name().to_string(),
        seeds_run: runs.len() as u64,
        reservation_violation_seeds: runs.iter().filter(|(_, run)| run.reservation).count() as u64,
        safety_violation_seeds: runs.iter().filter(|(_, run)| run.safety).count() as u64,
        liveness_violation_seeds: runs.iter().filter(|(_, run)| run.liveness).count() as u64,
        violation_kind_seeds: runs.iter().flat_map(|(_, run)| &run.kinds).fold(
            BTreeMap::new(),
            |mut m, kind| {
                *m.entry(kind.clone()).or_insert(0) += 1;
                m
            },
        ),
        max_cows_per_search: cows.iter().map(|&(max, _)| max).max().unwrap_or(0),
        p99_cows_per_search: nearest_rank(&p99s, 0.99),
        ops_completed: runs.iter().fold(0u64, |sum, (_, run)| sum.saturating_add(run.ops_completed)),
        first_failing_seed: first_failing.map(|(seed, _)| *seed),
        first_failing_replay: first_failing.map(|(_, run)| run.replay_command.clone()),
        has_search_stats: !cows.is_empty(),
        failing_wall_ms: runs.iter().filter(|(_, run)| run.failed()).map(|(_, run)| run.wall_ms).collect(),
        panics: runs.iter().filter_map(|(seed, run)| Some((*seed, run.panic.clone()?))).collect(),
    }
}

/// The comparison as a table, one row per fix.
pub fn table(comparison: &Comparison) -> String {
    let [start, end] = comparison.seeds;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compare  scenario {}  seeds {start}..{end} ({} per fix)",
        comparison.scenario,
        end - start
    );
    let _ = writeln!(
        out,
        "cows/search: max = largest COW count of one search in any run; \
         p99 = 99th percentile (nearest rank) over runs of each run's own p99"
    );
    let header = [
        "fix",
        "seeds",
        "rsv-viol",
        "safety-viol",
        "liveness-viol",
        "max cows/search",
        "p99 cows/search",
        "ops",
        "first failing seed",
        "replay",
    ];
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for row in &comparison.fixes {
        let cows = |value: u64| if row.has_search_stats { value.to_string() } else { "-".to_string() };
        lines.push(vec![
            row.fix.clone(),
            row.seeds_run.to_string(),
            row.reservation_violation_seeds.to_string(),
            row.safety_violation_seeds.to_string(),
            row.liveness_violation_seeds.to_string(),
            cows(row.max_cows_per_search),
            cows(row.p99_cows_per_search),
            row.ops_completed.to_string(),
            row.first_failing_seed.map_or("-".to_string(), |seed| seed.to_string()),
            row.first_failing_replay.clone().unwrap_or_else(|| "-".to_string()),
        ]);
    }
    let columns = header.len();
    let widths: Vec<usize> =
        (0..columns).map(|c| lines.iter().map(|line| line[c].len()).max().unwrap_or(0)).collect();
    for line in &lines {
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            if c + 1 == columns {
                text.push_str(cell);
            } else if c == 0 {
                let _ = write!(text, "{cell:<width$}  ", width = widths[c]);
            } else {
                let _ = write!(text, "{cell:>width$}  ", width = widths[c]);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    }
    let _ = writeln!(out, "seeds per violation kind:");
    let width = comparison.fixes.iter().map(|row| row.fix.len()).max().unwrap_or(0);
    for row in &comparison.fixes {
        let kinds: Vec<String> =
            row.violation_kind_seeds.iter().map(|(kind, seeds)| format!("{kind} {seeds}")).collect();
        let kinds = if kinds.is_empty() { "-".to_string() } else { kinds.join(", ") };
        let _ = writeln!(out, "  {:<width$}  {kinds}", row.fix);
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count).
fn median_ms(values: &[u64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid] as f64
    } else {
        (sorted[mid - 1] + sorted[mid]) as f64 / 2.0
    })
}

/// Per fix, the median wall-clock time of its failing runs (each stops at its
/// first violation). Machine-dependent: for stderr only, never the JSON.
pub fn wall_clock(comparison: &Comparison) -> String {
    let mut out = String::from(
        "wall-clock (machine time, not simulated): median run time to the first violation over failing seeds\n",
    );
    let width = comparison.fixes.iter().map(|row| row.fix.len()).max().unwrap_or(0);
    for row in &comparison.fixes {
        let _ = match median_ms(&row.failing_wall_ms) {
            Some(ms) => writeln!(
                out,
                "  {:<width$}  {ms:.1} ms wall-clock over {} failing seeds",
                row.fix,
                row.failing_wall_ms.len()
            ),
            None => writeln!(out, "  {:<width$}  - (no failing seed)", row.fix),
        };
    }
    out
}

/// One line per run that panicked, in fix and seed order (empty if none did).
pub fn panics(comparison: &Comparison) -> String {
    let mut out = String::new();
    for row in &comparison.fixes {
        for (seed, message) in &row.panics {
            let _ = writeln!(
                out,
                "panic (counted as a safety violation): {} seed {seed} fix {}: {message}",
                comparison.scenario, row.fix
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_percentiles() {
        assert_eq!(classify("migrate_enospc"), ViolationClass::Reservation);
        assert_eq!(classify("tree_checker"), ViolationClass::Safety);
        assert_eq!(classify(PANIC_KIND), ViolationClass::Safety);
        assert_eq!(classify("transaction_abort"), ViolationClass::Safety);
        assert_eq!(classify("no_progress"), ViolationClass::Liveness);
        assert_eq!(classify("time_limit"), ViolationClass::Liveness);
        assert_eq!(nearest_rank(&[], 0.99), 0);
        assert_eq!(nearest_rank(&[5], 0.99), 5);
        let hundred: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(nearest_rank(&hundred, 0.99), 99);
        assert_eq!(median_ms(&[9, 1, 4]), Some(4.0));
        assert_eq!(median_ms(&[1, 4]), Some(2.5));
        assert_eq!(median_ms(&[]), None);
    }

    fn summary(reservation: bool, safety: bool, cows: Option<(u64, u64)>, ops: u64) -> RunSummary {
        let kinds = [(reservation, "enospc_abort"), (safety, "namespace")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, kind)| kind.to_string())
            .collect();
        RunSummary {
            reservation,
            safety,
            liveness: false,
            kinds,
            cows,
            ops_completed: ops,
            wall_ms: ops,
            replay_command: format!("replay {ops}"),
            panic: None,
        }
    }

    #[test]
    fn a_row_counts_seeds_and_finds_the_first_failing_one() {
        let runs = vec![
            (10, summary(false, false, Some((3, 1)), 5)),
            (11, summary(true, true, Some((7, 2)), 6)),
            (12, summary(false, true, None, 7)),
            (13, summary(true, false, Some((1, 1)), 8)),
            (
                14,
                RunSummary {
                    liveness: true,
                    kinds: vec!["no_progress".into()],
                    ..summary(false, false, None, 9)
                },
            ),
        ];
        let row = row(FixPolicy::Both, &runs);
        assert_eq!((row.seeds_run, row.reservation_violation_seeds, row.safety_violation_seeds), (5, 2, 2));
        assert_eq!(row.liveness_violation_seeds, 1);
        let kinds: Vec<(&str, u64)> =
            row.violation_kind_seeds.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        assert_eq!(kinds, [("enospc_abort", 2), ("namespace", 2), ("no_progress", 1)]);
        assert_eq!((row.max_cows_per_search, row.p99_cows_per_search, row.ops_completed), (7, 2, 35));
        assert_eq!(row.first_failing_seed, Some(11));
        assert_eq!(row.first_failing_replay.as_deref(), Some("replay 6"));
        assert_eq!(row.failing_wall_ms, [6, 7, 8, 9]);
        let none = super::row(FixPolicy::None, &[(0, summary(false, false, None, 1))]);
        assert!(!none.has_search_stats && none.first_failing_seed.is_none());
        let comparison = Comparison { scenario: "s".into(), seeds: [10, 15], fixes: vec![row, none] };
        let text = table(&comparison);
        assert!(text.contains("replay 6") && text.lines().nth(4).unwrap().contains(" - "), "{text}");
        assert!(text.contains("both  enospc_abort 2, namespace 2, no_progress 1"), "{text}");
        assert!(wall_clock(&comparison).contains("7.5 ms wall-clock over 4 failing seeds"));
    }

    #[test]
    fn fixes_parse_in_the_given_order() {
        assert_eq!(parse_fixes(None).unwrap(), FixPolicy::ALL.to_vec());
        assert_eq!(parse_fixes(Some("both,none")).unwrap(), vec![FixPolicy::Both, FixPolicy::None]);
        assert!(parse_fixes(Some("none,magic")).unwrap_err().contains("unknown fix 'magic'"));
        assert!(parse_fixes(Some("none,,both")).is_err());
        assert!(parse_fixes(Some("none,none")).unwrap_err().contains("twice"));
    }
}
