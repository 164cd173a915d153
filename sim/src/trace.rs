//! The run's trace: every event stamped with simulated time and task, folded
//! into a hash as it happens, printed through `tracing` when asked, and kept
//! in full only when a determinism check needs to find where two runs part.

use std::hash::{Hash, Hasher};

use engine::env::{SwitchPoint, TaskId, TraceEvent};
use xxhash_rust::xxh3::Xxh3;

/// An event of the simulator itself, or one the engine or a scenario emitted.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SimEvent {
    Engine(TraceEvent),
    Spawn {
        task: TaskId,
        name: String,
    },
    Exit,
    /// The scheduler switched to another task.
    Run,
    Switch(SwitchPoint),
    BioSubmit {
        id: u64,
        op: &'static str,
        offset_bytes: u64,
        len_bytes: u64,
    },
    BioComplete {
        id: u64,
        ok: bool,
    },
    Charge {
        bytes: u64,
        usage_bytes: u64,
    },
    Reclaim {
        actor: &'static str,
        target_bytes: u64,
        freed_bytes: u64,
        written_bytes: u64,
    },
    Throttle {
        ns: u64,
    },
    PowerLoss {
        inflight_lost: u64,
        writes_kept: u64,
        writes_dropped: u64,
        writes_torn: u64,
    },
    Violation {
        kind: &'static str,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Record {
    pub time_ns: u64,
    pub task: Option<TaskId>,
    pub event: SimEvent,
}

pub struct Trace {
    hasher: Xxh3,
    events: u64,
    kept: Option<Vec<Record>>,
}

impl Trace {
    /// `keep`: remember every record (for `check-determinism`).
    pub fn new(keep: bool) -> Self {
        Self { hasher: Xxh3::new(), events: 0, kept: keep.then(Vec::new) }
    }

    pub fn record(&mut self, record: Record) {
        record.hash(&mut self.hasher);
        self.events += 1;
        if tracing::enabled!(target: "cowsim::trace", tracing::Level::DEBUG) {
            let task = record.task.map_or_else(|| "-".to_string(), |t| t.to_string());
            tracing::debug!(target: "cowsim::trace", "{:>14} {:>5} {:?}", record.time_ns, task, record.event);
        }
        if let Some(kept) = &mut self.kept {
            kept.push(record);
        }
    }

    pub fn hash(&self) -> u64 {
        self.hasher.finish()
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn take_records(&mut self) -> Option<Vec<Record>> {
        self.kept.take()
    }
}

/// The trace hash as users see it.
pub fn format_hash(hash: u64) -> String {
    format!("{hash:016x}")
}
