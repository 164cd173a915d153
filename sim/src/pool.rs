//! Independent runs in parallel, as `sim compare` and `sim sweep` do them:
//! every item runs on a fresh thread of its own (nothing but the process is
//! shared between two runs), at most `jobs` at a time, and each result is
//! handed back to the calling thread as soon as it is finished, so that the
//! caller can write it out at once. A panic inside a run is caught and
//! returned as a panic, with where it happened.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, mpsc};

use scenarios::Scenario;

use crate::runner::{RunResult, RunSpec, run};

/// The kind recorded for a run that panicked (an engine bug): a safety violation.
pub const PANIC_KIND: &str = "panic";

/// Stack of each run's thread: as the main thread's, runs are deep futures.
const RUN_STACK_BYTES: usize = 16 << 20;

thread_local! {
    /// Set while this thread runs a seed under [`run_caught`].
    static IN_RUN: Cell<bool> = const { Cell::new(false) };
    /// Where and why the last run of this thread panicked, kept by the hook of [`capture_panics`].
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Install a panic hook that, for a panic inside a run of [`run_caught`],
/// keeps its location and message for the caller instead of printing it
/// with a backtrace; any other panic goes to the previous hook. Without it,
/// a run's panic is printed as usual and still returned.
pub fn capture_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if IN_RUN.with(Cell::get) {
            let location =
                info.location().map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
            let message = payload_text(info.payload());
            PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(format!("panicked{location}: {message}")));
        } else {
            previous(info);
        }
    }));
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".to_string());
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How a run ended, a panic included.
pub enum Caught {
    Finished(Box<RunResult>),
    /// The run panicked: where and why, on one line.
    Panicked(String),
}

/// Run one seed, catching a panic. An error is bad input (the scenario
/// refused its parameters), never a violation.
pub fn run_caught(scenario: &dyn Scenario, spec: &RunSpec) -> Result<Caught, String> {
    IN_RUN.with(|r| r.set(true));
    PANIC_MESSAGE.with(|m| m.borrow_mut().take());
    let outcome = catch_unwind(AssertUnwindSafe(|| run(spec, scenario)));
    IN_RUN.with(|r| r.set(false));
    match outcome {
        Ok(result) => result.map(|result| Caught::Finished(Box::new(result))),
        Err(payload) => Ok(Caught::Panicked(
            PANIC_MESSAGE
                .with(|m| m.borrow_mut().take())
                .unwrap_or_else(|| format!("panicked: {}", payload_text(&*payload))),
        )),
    }
}

/// Run `work` on every item, each on a fresh thread, at most `jobs` at a
/// time, taking items from `items` in order only as threads free up (a huge
/// range costs no memory up front). `done(position, item, result)` runs on
/// the calling thread as each finishes (not in order; `position` is the
/// item's place in `items`); when it returns false no new item is started
/// and the items already running are finished and handed over. Fails only
/// if no thread can be started.
pub fn for_each_parallel<T, R>(
    jobs: usize,
    items: impl IntoIterator<Item = T>,
    name: &str,
    work: impl Fn(&T) -> R + Sync,
    mut done: impl FnMut(usize, T, R) -> bool,
) -> Result<(), String>
where
    T: Send,
    R: Send,
{
    assert!(jobs > 0, "at least one job");
    let mut items = items.into_iter().enumerate();
    // An item whose thread could not be started, to try again first.
    let mut pending: Option<(usize, T)> = None;
    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::channel::<(usize, T, R)>();
        let work = &work;
        let (mut running, mut go_on) = (0, true);
        loop {
            while go_on && running < jobs {
                let Some((position, item)) = pending.take().or_else(|| items.next()) else { break };
                let sender = sender.clone();
                let builder = std::thread::Builder::new()
                    .name(format!("{name}-{position}"))
                    .stack_size(RUN_STACK_BYTES);
                // The item moves into the thread through this slot (so that a
                // failed start gives it back) and returns with its result.
                let slot = Arc::new(Mutex::new(Some(item)));
                let thread_slot = slot.clone();
                let spawned = builder.spawn_scoped(scope, move || {
                    let item = thread_slot.lock().unwrap_or_else(|p| p.into_inner()).take().expect("an item");
                    let result = work(&item);
                    // The receiver outlives every sender: this cannot fail.
                    let _ = sender.send((position, item, result));
                });
                match spawned {
                    Ok(_) => running += 1,
                    Err(e) if running == 0 => return Err(format!("cannot start a thread: {e}")),
                    Err(_) => {
                        // Out of threads for now: wait for one to finish.
                        let item =
                            slot.lock().unwrap_or_else(|p| p.into_inner()).take().expect("not started");
                        pending = Some((position, item));
                        break;
                    }
                }
            }
            if running == 0 {
                return Ok(());
            }
            let (position, item, result) = receiver.recv().expect("a running thread holds a sender");
            running -= 1;
            go_on &= done(position, item, result);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_once_and_a_refusal_stops_new_ones() {
        let items: Vec<u32> = (0..20).collect();
        let mut seen = Vec::new();
        for_each_parallel(
            3,
            items.iter().copied(),
            "test",
            |&i| i * 2,
            |position, item, result| {
                assert_eq!(position as u32, item);
                seen.push((position, result));
                true
            },
        )
        .unwrap();
        seen.sort();
        assert_eq!(seen, (0..20).map(|i| (i as usize, i * 2)).collect::<Vec<_>>());

        let mut handed = 0;
        for_each_parallel(
            1,
            0..u64::MAX,
            "test",
            |&i| i,
            |_, _, _| {
                handed += 1;
                handed < 5
            },
        )
        .unwrap();
        assert_eq!(
            handed, 5,
            "one job: nothing runs after the fifth result is refused, and the range is never built"
        );
    }
}
