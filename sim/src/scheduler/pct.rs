//! PCT (Burckhardt, Kothari, Musuvathi, Nagarakatte; ASPLOS 2010).
//!
//! Every task gets a random priority at least `depth`; the highest-priority
//! runnable task always runs. At `depth - 1` change points, drawn uniformly
//! over the first `steps` decisions, the task that would run drops to
//! priority `i` (below every initial priority), so a bug needing `depth`
//! ordering constraints is found with probability at least 1/(n k^(d-1)).
//! Tasks spawned during the run get a fresh random priority.

use std::collections::BTreeMap;

use engine::env::TaskId;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{ReplayMismatch, Scheduler};

pub struct Pct {
    rng: ChaCha8Rng,
    depth: u32,
    /// Priority per task; larger runs first. Initial priorities are >= depth.
    priorities: BTreeMap<TaskId, u64>,
    /// Decision indices at which a priority drops, ascending; index i of the
    /// vector gives new priority i + 1.
    change_points: Vec<u64>,
}

impl Pct {
    pub fn new(mut rng: ChaCha8Rng, depth: u32, steps: u64) -> Self {
        assert!(depth >= 1, "PCT depth must be at least 1");
        let steps = steps.max(1);
        let mut change_points: Vec<u64> = (1..depth).map(|_| rng.random_range(0..steps)).collect();
        change_points.sort_unstable();
        Self { rng, depth, priorities: BTreeMap::new(), change_points }
    }

    fn priority(&self, task: TaskId) -> u64 {
        self.priorities.get(&task).copied().unwrap_or(u64::from(self.depth))
    }
}

impl Scheduler for Pct {
    fn on_spawn(&mut self, task: TaskId) {
        // Distinct with overwhelming probability; ties break by task id below.
        let priority = u64::from(self.depth) + self.rng.random_range(0..1u64 << 40);
        self.priorities.insert(task, priority);
    }

    fn choose(&mut self, runnable: &[TaskId], decision: usize) -> Result<TaskId, ReplayMismatch> {
        let best = |pct: &Pct| {
            *runnable
                .iter()
                .max_by_key(|&&task| (pct.priority(task), std::cmp::Reverse(task)))
                .expect("choose needs a runnable task")
        };
        let mut chosen = best(self);
        for (i, &point) in self.change_points.iter().enumerate() {
            if point == decision as u64 {
                self.priorities.insert(chosen, i as u64 + 1);
                chosen = best(self);
            }
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ids(n: u32) -> Vec<TaskId> {
        (0..n).map(TaskId).collect()
    }

    #[test]
    fn without_change_points_the_top_priority_task_always_runs() {
        let mut pct = Pct::new(ChaCha8Rng::seed_from_u64(1), 1, 100);
        let tasks = ids(4);
        tasks.iter().for_each(|&t| pct.on_spawn(t));
        let first = pct.choose(&tasks, 0).unwrap();
        for decision in 1..50 {
            assert_eq!(pct.choose(&tasks, decision).unwrap(), first);
        }
    }

    #[test]
    fn a_change_point_demotes_the_running_task() {
        // depth 2 over 1 step: the change point is decision 0.
        let mut pct = Pct::new(ChaCha8Rng::seed_from_u64(3), 2, 1);
        let tasks = ids(3);
        tasks.iter().for_each(|&t| pct.on_spawn(t));
        let top = *tasks.iter().max_by_key(|&&t| pct.priority(t)).unwrap();
        let chosen = pct.choose(&tasks, 0).unwrap();
        assert_ne!(chosen, top, "the change point must demote the top task");
        assert_eq!(pct.priority(top), 1);
        // Once demoted below every initial priority, it runs only when alone.
        assert_ne!(pct.choose(&tasks, 1).unwrap(), top);
    }
}
