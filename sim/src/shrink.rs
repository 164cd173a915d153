//! `sim shrink`: make a failing run smaller while it keeps failing the same
//! way (the same [`Fingerprint`]: kind and location of the first violation).
//!
//! The seed stays; what shrinks is the configuration the seed file records:
//! the scenario's parameters (fewer tasks, fewer operations, no power loss:
//! [`scenarios::Scenario::shrink`]) and the world (the run stops at the
//! first violation, reclaim actors and latency faults switched off one by
//! one). Greedy, as test-case reducers go: the first smaller candidate that
//! keeps the fingerprint becomes the new start, until no candidate does or
//! the run budget is spent. A smaller configuration makes a shorter run, so
//! the operations done, reclaim events and the decision log shrink with it.

use serde::Serialize;

use crate::pool::{Caught, run_caught};
use crate::runner::{RunResult, RunSpec};
use crate::seedfile::{Fingerprint, SeedFile};
use crate::world::WorldConfig;

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Size {
    /// Operations the workload completed.
    pub ops_completed: u64,
    /// Reclaim passes of every actor (direct reclaim included).
    pub reclaim_events: u64,
    /// Scheduling decisions (the decision log's length).
    pub decisions: u64,
    pub trace_events: u64,
}

impl Size {
    /// No larger in operations, scheduling decisions and reclaim events,
    /// and smaller in one of them.
    pub fn smaller_than(&self, other: &Size) -> bool {
        let (a, b) = (self.measures(), other.measures());
        a.iter().zip(&b).all(|(x, y)| x <= y) && a != b
    }

    fn measures(&self) -> [u64; 3] {
        [self.ops_completed, self.decisions, self.reclaim_events]
    }

    pub fn of(result: &RunResult) -> Size {
        let reclaim_events = result
            .stats
            .get("memory")
            .and_then(|m| m.get("reclaim"))
            .and_then(|r| r.as_object())
            .map_or(0, |actors| actors.values().filter_map(|a| a.get("passes")?.as_u64()).sum());
        Size {
            ops_completed: result.ops_completed,
            reclaim_events,
            decisions: result.decision_log.len() as u64,
            trace_events: result.trace_events,
        }
    }
}

/// What shrinking produced.
pub struct Shrunk {
    /// The smallest reproducer found (its expected outcome recorded).
    pub file: SeedFile,
    pub fingerprint: Fingerprint,
    pub before: Size,
    pub after: Size,
    /// Candidate runs tried, and how many were kept.
    pub runs: u32,
    pub accepted: u32,
}

/// Smaller world configurations, boldest first.
fn smaller_worlds(world: &WorldConfig) -> Vec<WorldConfig> {
    let mut smaller = Vec::new();
    let mut variant = |change: &dyn Fn(&mut WorldConfig)| {
        let mut w = world.clone();
        change(&mut w);
        if w != *world {
            smaller.push(w);
        }
    };
    variant(&|w| w.max_violations = 1);
    variant(&|w| w.memory.hog = None);
    variant(&|w| w.memory.drop_caches = None);
    variant(&|w| w.memory.proactive = None);
    variant(&|w| w.memory.flusher = None);
    variant(&|w| w.memory.kswapd = None);
    variant(&|w| w.device.tail_probability = 0.0);
    variant(&|w| w.device.latency_spike_probability = 0.0);
    smaller
}

/// Shrink the run of `file`, trying at most `max_runs` candidates (a
/// candidate is kept when it fails the same way and is [`Size::smaller_than`]
/// the best so far);
/// `tried(run, kept)` is told of each. An error: the file records a pass,
/// or does not reproduce its fingerprint.
pub fn shrink(file: &SeedFile, max_runs: u32, mut tried: impl FnMut(u32, bool)) -> Result<Shrunk, String> {
    let target = file
        .expected
        .fingerprint()
        .ok_or_else(|| "the seed file records a pass: there is no failure to shrink".to_string())?;
    let scenario = scenarios::by_name(&file.scenario)?;
    let attempt = |spec: &RunSpec| -> Result<Option<Box<RunResult>>, String> {
        Ok(match run_caught(&*scenario, spec)? {
            Caught::Finished(result) if Fingerprint::of(&result).as_ref() == Some(&target) => Some(result),
            _ => None,
        })
    };
    // The file's own run, without its decision log: shrinking changes the
    // schedule, so every candidate runs from the seed's scheduler.
    let mut spec = file.spec();
    spec.decision_log = None;
    let mut best = attempt(&spec)?.ok_or_else(|| {
        format!("the seed file does not reproduce its failure ({target}) without its decision log; nothing to shrink")
    })?;
    let before = Size::of(&best);
    let (mut runs, mut accepted) = (0, 0);
    'shrinking: loop {
        let params = spec.params.clone().expect("a seed file's spec has params");
        let world = spec.world.clone().expect("a seed file's spec has a world");
        let candidates = scenario
            .shrink(&params)
            .into_iter()
            .map(|p| (p, world.clone()))
            .chain(smaller_worlds(&world).into_iter().map(|w| (params.clone(), w)));
        for (params, world) in candidates {
            if runs >= max_runs {
                break 'shrinking;
            }
            let candidate = RunSpec { params: Some(params), world: Some(world), ..spec.clone() };
            runs += 1;
            let kept = attempt(&candidate)?.filter(|result| Size::of(result).smaller_than(&Size::of(&best)));
            tried(runs, kept.is_some());
            if let Some(result) = kept {
                accepted += 1;
                best = result;
                spec = candidate;
                continue 'shrinking;
            }
        }
        break;
    }
    let mut shrunk = SeedFile::from_result(&best, false);
    shrunk.decision_log = None;
    Ok(Shrunk { after: Size::of(&best), file: shrunk, fingerprint: target, before, runs, accepted })
}
