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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

impl Strategy {
    pub fn build(&self, rng: rand_chacha::ChaCha8Rng) -> Box<dyn Scheduler> {
        match *self {
            Strategy::Random => Box::new(RandomScheduler::new(rng)),
            Strategy::Pct { depth, steps } => Box::new(Pct::new(rng, depth, steps)),
        }
    }
}
