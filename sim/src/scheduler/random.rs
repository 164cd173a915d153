//! Uniformly random choice among the runnable tasks.

use engine::env::TaskId;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{ReplayMismatch, Scheduler};

pub struct RandomScheduler {
    rng: ChaCha8Rng,
}

impl RandomScheduler {
    pub fn new(rng: ChaCha8Rng) -> Self {
        Self { rng }
    }
}

impl Scheduler for RandomScheduler {
    fn on_spawn(&mut self, _task: TaskId) {}

    fn choose(&mut self, runnable: &[TaskId], _decision: usize) -> Result<TaskId, ReplayMismatch> {
        debug_assert!(runnable.len() >= 2);
        Ok(runnable[self.rng.random_range(0..runnable.len())])
    }
}
