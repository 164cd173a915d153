//! Follows a recorded decision log exactly and says where it stops matching.

use engine::env::TaskId;

use super::{ReplayMismatch, Scheduler};

pub struct Replay {
    log: Vec<u32>,
}

impl Replay {
    pub fn new(log: Vec<u32>) -> Self {
        Self { log }
    }
}

impl Scheduler for Replay {
    fn on_spawn(&mut self, _task: TaskId) {}

    fn choose(&mut self, runnable: &[TaskId], decision: usize) -> Result<TaskId, ReplayMismatch> {
        let Some(&wanted) = self.log.get(decision) else {
            return Err(ReplayMismatch {
                decision,
                message: format!(
                    "decision log ends after {} decisions but the run needs more (runnable: {})",
                    self.log.len(),
                    list(runnable)
                ),
            });
        };
        let wanted = TaskId(wanted);
        if runnable.contains(&wanted) {
            Ok(wanted)
        } else {
            Err(ReplayMismatch {
                decision,
                message: format!(
                    "decision {decision} of the log runs {wanted} but only {} are runnable",
                    list(runnable)
                ),
            })
        }
    }
}

fn list(tasks: &[TaskId]) -> String {
    tasks.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_log_and_reports_divergence() {
        let mut replay = Replay::new(vec![2, 1]);
        let runnable = [TaskId(1), TaskId(2)];
        assert_eq!(replay.choose(&runnable, 0), Ok(TaskId(2)));
        assert_eq!(replay.choose(&runnable, 1), Ok(TaskId(1)));
        let end = replay.choose(&runnable, 2).unwrap_err();
        assert_eq!(end.decision, 2);
        let mut replay = Replay::new(vec![3]);
        let wrong = replay.choose(&runnable, 0).unwrap_err();
        assert!(wrong.message.contains("t3"), "{}", wrong.message);
    }
}
