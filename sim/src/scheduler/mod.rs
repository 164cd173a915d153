//! Scheduling strategies. At every decision (more than one task runnable)
//! the executor asks the scheduler which task runs next and appends the
//! answer to the decision log; `replay` follows such a log exactly.

mod pct;
mod random;
mod replay;

pub use pct::Pct;
pub use random::RandomScheduler;
pub use replay::Replay;

use engine::env::TaskId;
use serde::{Deserialize, Serialize};

/// A replayed decision log that no longer matches the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayMismatch {
    pub decision: usize,
    pub message: String,
}

pub trait Scheduler {
    /// A task was created (PCT gives it a priority).
    fn on_spawn(&mut self, task: TaskId);
    /// Choose the next task among `runnable` (sorted, at least two).
    /// `decision` counts decisions made so far in this run.
    fn choose(&mut self, runnable: &[TaskId], decision: usize) -> Result<TaskId, ReplayMismatch>;
}

/// Which strategy a run uses, as recorded in its configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Strategy {
    Random,
    /// Probabilistic concurrency testing with `depth` (d): d-1 priority
    /// change points drawn over the first `steps` decisions.
    Pct {
        depth: u32,
        steps: u64,
    },
}

/// Decisions over which PCT spreads its change points when none is given.
pub const PCT_DEFAULT_STEPS: u64 = 10_000;

impl std::str::FromStr for Strategy {
    type Err = String;
    /// `random`, `pct` (depth 3), `pct:D` or `pct:D:K`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("bad scheduler '{text}': expected random, pct, pct:DEPTH or pct:DEPTH:STEPS");
        let mut parts = text.split(':');
        match parts.next() {
            Some("random") if parts.next().is_none() => Ok(Strategy::Random),
            Some("pct") => {
                let depth = parts.next().map_or(Ok(3), |d| d.parse::<u32>().map_err(|_| bad()))?;
                let steps =
                    parts.next().map_or(Ok(PCT_DEFAULT_STEPS), |k| k.parse::<u64>().map_err(|_| bad()))?;
                if depth == 0 || steps == 0 || parts.next().is_some() {
                    return Err(bad());
                }
                Ok(Strategy::Pct { depth, steps })
            }
            _ => Err(bad()),
        }
    }
}

impl Strategy {
    pub fn build(&self, rng: rand_chacha::ChaCha8Rng) -> Box<dyn Scheduler> {
        match *self {
            Strategy::Random => Box::new(RandomScheduler::new(rng)),
            Strategy::Pct { depth, steps } => Box::new(Pct::new(rng, depth, steps)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_parse() {
        assert_eq!("random".parse(), Ok(Strategy::Random));
        assert_eq!("pct".parse(), Ok(Strategy::Pct { depth: 3, steps: PCT_DEFAULT_STEPS }));
        assert_eq!("pct:5:100".parse(), Ok(Strategy::Pct { depth: 5, steps: 100 }));
        for bad in ["", "pct:0", "pct:x", "pct:2:0", "pct:1:2:3", "fifo", "random:1"] {
            assert!(bad.parse::<Strategy>().is_err(), "{bad}");
        }
    }
}
