//! `check-determinism`: run a seed twice in one process and compare.
//!
//! A mismatch names the first trace record where the runs part, with both
//! versions (madsim reports the first diverging instant the same way).

use scenarios::Scenario;

use crate::runner::{RunSpec, run};
use crate::trace::Record;

/// Where two runs of one seed parted.
#[derive(Clone, Debug)]
pub struct Divergence {
    pub seed: u64,
    pub index: usize,
    pub first: Option<Record>,
    pub second: Option<Record>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |r: &Option<Record>| match r {
            Some(r) => format!("at {} ns by {:?}: {:?}", r.time_ns, r.task, r.event),
            None => "the trace ended".to_string(),
        };
        write!(
            f,
            "seed {} diverges at trace event {}: first run {}; second run {}",
            self.seed,
            self.index,
            show(&self.first),
            show(&self.second)
        )
    }
}

/// Run `spec` twice; `Ok(None)` when both runs are identical.
pub fn check_seed(spec: &RunSpec, scenario: &dyn Scenario) -> Result<Option<Divergence>, String> {
    let mut spec = spec.clone();
    spec.keep_trace = true;
    let a = run(&spec, scenario)?;
    let b = run(&spec, scenario)?;
    if a.trace_hash == b.trace_hash && a.records == b.records {
        return Ok(None);
    }
    let ra = a.records.unwrap_or_default();
    let rb = b.records.unwrap_or_default();
    let index = ra.iter().zip(&rb).position(|(x, y)| x != y).unwrap_or(ra.len().min(rb.len()));
    Ok(Some(Divergence {
        seed: spec.seed,
        index,
        first: ra.get(index).cloned(),
        second: rb.get(index).cloned(),
    }))
}
