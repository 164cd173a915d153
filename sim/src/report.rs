//! Text output of the `sim` command: the one-screen summary, `sim list`,
//! and seed ranges.

use std::fmt::Write;
use std::str::FromStr;

use engine::fix::FixPolicy;

use crate::runner::{Outcome, RunResult};

/// Seeds `start..end` (end excluded), or a single seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeedRange {
    pub start: u64,
    pub end: u64,
}

impl SeedRange {
    pub fn iter(self) -> impl Iterator<Item = u64> {
        self.start..self.end
    }

    pub fn len(self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(self) -> bool {
        self.start == self.end
    }
}

impl FromStr for SeedRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("bad seed range '{text}': expected A..B with A < B, or a single seed N");
        let (start, end) = match text.split_once("..") {
            Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
            None => {
                let seed: u64 = text.trim().parse().map_err(|_| bad())?;
                (seed, seed.checked_add(1).ok_or_else(bad)?)
            }
        };
        if start >= end {
            return Err(bad());
        }
        Ok(SeedRange { start, end })
    }
}

pub fn list() -> String {
    let mut out = String::from("scenarios:\n");
    for scenario in scenarios::all() {
        let _ = writeln!(out, "  {:<20} {}", scenario.name(), scenario.description());
    }
    out.push_str("fixes:\n");
    for fix in FixPolicy::ALL {
        let _ = writeln!(out, "  {:<20} {}", fix.name(), fix.description());
    }
    out
}

/// Bytes in the largest binary unit that keeps them whole (or in bytes).
fn bytes(n: u64) -> String {
    match n {
        0 => "0 B".to_string(),
        n if n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

/// The one-screen summary of a run.
pub fn summary(result: &RunResult) -> String {
    let mut out = String::new();
    let world = &result.config.world;
    let _ = writeln!(out, "cowsim  scenario {}  seed {}  fix {}", result.scenario, result.seed, result.fix);
    let _ = writeln!(out, "params  {}", result.config.params);
    let actors: Vec<&str> = [
        ("kswapd", world.memory.kswapd.is_some()),
        ("flusher", world.memory.flusher.is_some()),
        ("proactive", world.memory.proactive.is_some()),
        ("drop-caches", world.memory.drop_caches.is_some()),
        ("hog", world.memory.hog.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let _ = writeln!(
        out,
        "world   scheduler {:?}  memory budget {}  reclaim [{}]  device qd {} cache {}",
        world.scheduler,
        bytes(world.memory.high_bytes),
        actors.join(" "),
        world.device.queue_depth,
        bytes(world.device.cache_bytes),
    );
    let outcome = match result.outcome {
        Outcome::Pass => "PASS",
        Outcome::Violation => "VIOLATION",
    };
    let _ = writeln!(
        out,
        "outcome {outcome}  ops {}  sim time {}  power loss {}  trace {} ({} events)",
        result.ops_completed,
        ms(result.sim_time_ns),
        if result.power_loss { "yes" } else { "no" },
        result.trace_hash,
        result.trace_events,
    );
    if let Some(device) = result.stats.get("device").and_then(|d| d.get("ops")).and_then(|o| o.as_object()) {
        let parts: Vec<String> = device
            .iter()
            .map(|(op, s)| {
                format!(
                    "{op} {}x p50 {}us p99 {}us",
                    s["count"],
                    s["p50_ns"].as_u64().unwrap_or(0) / 1000,
                    s["p99_ns"].as_u64().unwrap_or(0) / 1000
                )
            })
            .collect();
        let _ = writeln!(out, "device  {}", parts.join(" | "));
    }
    if let Some(memory) = result.stats.get("memory") {
        let _ = writeln!(
            out,
            "memory  peak {} KiB  throttles {}  reclaim {}",
            memory["peak_bytes"].as_u64().unwrap_or(0) >> 10,
            memory["throttles"],
            memory["reclaim"]
        );
    }
    if let Some(searches) = result.stats.get("searches") {
        let cows = &searches["cows_per_search"];
        let handles = &result.stats["handles"];
        let _ = writeln!(
            out,
            "engine  {} searches  COWs/search p50 {} p99 {} max {}  restarts {}  handles {} min headroom {} B overdrawn {}",
            searches["searches"],
            cows["p50"],
            cows["p99"],
            cows["max"],
            searches["restarts"],
            handles["handles"],
            handles["min_headroom_bytes"],
            handles["overdrawn_handles"],
        );
    }
    if let Some(refs) = result.stats.get("extent_refs").filter(|r| r["shared_cows"].as_u64().unwrap_or(0) > 0)
    {
        let per_cow = &refs["refs_per_shared_cow"];
        let _ = writeln!(
            out,
            "shared  {} COWs of shared blocks  delayed refs/COW p50 {} p99 {} max {}",
            refs["shared_cows"], per_cow["p50"], per_cow["p99"], per_cow["max"],
        );
    }
    if let Some(scenario) = result.stats.get("scenario") {
        let _ = writeln!(out, "stats   {scenario}");
    }
    for violation in &result.violations {
        let _ = writeln!(
            out,
            "VIOLATION {} at {}: {}",
            violation.kind,
            ms(violation.sim_time_ns),
            violation.message
        );
    }
    if result.outcome == Outcome::Violation {
        let _ = writeln!(out, "replay  {}", result.replay_command);
    }
    out
}

/// The deterministic report of a scenario kept as a snapshot under
/// `reports/`: the run's summary, the coverage states it reached and, where
/// given, the fix comparison. No wall-clock figure appears in it.
pub fn scenario_report(result: &RunResult, comparison: Option<&crate::compare::Comparison>) -> String {
    let mut out = summary(result);
    let reached = crate::sweep::coverage(result);
    let _ =
        writeln!(out, "coverage {}", if reached.is_empty() { "-".to_string() } else { reached.join(" ") });
    if let Some(comparison) = comparison {
        out.push('\n');
        out.push_str(&crate::compare::table(comparison));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges() {
        assert_eq!("3..7".parse::<SeedRange>(), Ok(SeedRange { start: 3, end: 7 }));
        assert_eq!("5".parse::<SeedRange>(), Ok(SeedRange { start: 5, end: 6 }));
        for bad in ["7..3", "3..3", "x..4", "", "1..2..3", "18446744073709551615"] {
            assert!(bad.parse::<SeedRange>().is_err(), "{bad} should be rejected");
        }
    }
}
