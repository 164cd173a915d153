//! The simulated machine: one executor, one clock, one NVMe device, one
//! memory budget. It implements the engine's [`Env`].
//!
//! The executor is a loop of steps. Each step fires every device completion
//! and timer that is due, then asks the scheduler which runnable task to poll
//! (a *decision*, logged when more than one task could run), polls it once,
//! and charges `step_cost_ns` of simulated CPU time. When nothing is runnable
//! the clock jumps to the next event. Nothing here reads a wall clock, spawns
//! a thread or iterates a hash map: a seed and a decision log fully determine
//! a run.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use engine::env::{
    Bio, EndIo, Env, LocalBoxFuture, Shrinker, SwitchPoint, TaskId, TaskKind, TraceEvent, Violation, WaitOn,
};
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceConfig};
use crate::memory::{self, Memory, MemoryConfig};
use crate::scheduler::{Replay, ReplayMismatch, Scheduler, Strategy};
use crate::trace::{Record, SimEvent, Trace};

/// Everything that shapes a world, derived from the seed and printed with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// Simulated CPU time one poll of a task costs.
    pub step_cost_ns: u64,
    /// A workload task not polled for this long while workload tasks remain
    /// is a stall (reported as a violation naming what each task waits on).
    pub stall_timeout_ns: u64,
    /// Once the engine has finished one operation (a `TraceEvent::Op`), this
    /// long without another while workload tasks remain is a livelock,
    /// reported as `no_progress`: tasks may keep running (restarting
    /// searches, reclaiming) without getting anywhere. 120 s, as the
    /// kernel's hung task detector, which only sees blocked tasks.
    #[serde(default = "default_progress_timeout_ns")]
    pub progress_timeout_ns: u64,
    /// Liveness bounds: a run that reaches either is reported, never hangs.
    pub max_sim_time_ns: u64,
    pub max_steps: u64,
    /// The run stops once this many violations are reported (1: at the
    /// first). A hang (deadlock, stall, limits, replay mismatch) always stops it.
    #[serde(default = "one")]
    pub max_violations: u32,
    pub scheduler: Strategy,
    pub device: DeviceConfig,
    pub memory: MemoryConfig,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            step_cost_ns: 1_000,
            stall_timeout_ns: 60_000_000_000,
            progress_timeout_ns: default_progress_timeout_ns(),
            max_sim_time_ns: 3_600_000_000_000,
            max_steps: 50_000_000,
            max_violations: 1,
            scheduler: Strategy::Random,
            device: DeviceConfig::default(),
            memory: MemoryConfig::default(),
        }
    }
}

fn one() -> u32 {
    1
}

fn default_progress_timeout_ns() -> u64 {
    120_000_000_000
}

/// A violation as the run reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRecord {
    pub kind: String,
    pub message: String,
    pub sim_time_ns: u64,
}

/// Why [`World::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Every workload task finished.
    WorkloadDone,
    /// The requested time was reached (e.g. the power-loss point).
    TimeReached,
    /// A violation was reported; the run does not go on past the first one.
    Violation,
}

struct TaskMeta {
    name: String,
    kind: TaskKind,
    live: bool,
    waker: Waker,
    /// What the task said it blocks on before its last suspension.
    waiting_on: Option<WaitOn>,
}

/// The executor's state. Invariants: `runnable` holds only live tasks;
/// `workload_live` counts live tasks of kind Workload; a task's future is in
/// `World::futures` exactly while it is live and not being polled.
struct Exec {
    tasks: Vec<TaskMeta>,
    runnable: BTreeSet<TaskId>,
    /// (due time, sequence, task): sequence keeps equal times in FIFO order.
    timers: BinaryHeap<Reverse<(u64, u64, TaskId)>>,
    timer_seq: u64,
    current: Option<TaskId>,
    last_polled: Option<TaskId>,
    scheduler: Box<dyn Scheduler>,
    /// The task chosen at every decision, in order.
    decisions: Vec<u32>,
    steps: u64,
    workload_live: u32,
    last_workload_poll_ns: u64,
    /// When the last engine operation finished and the step count then.
    last_op: Option<(u64, u64)>,
    switch_points: BTreeMap<&'static str, u64>,
    /// Reused buffer for the runnable list handed to the scheduler.
    scratch: Vec<TaskId>,
}

pub struct World {
    me: Weak<World>,
    seed: u64,
    config: WorldConfig,
    clock: Cell<u64>,
    exec: RefCell<Exec>,
    futures: RefCell<Vec<Option<LocalBoxFuture<'static, ()>>>>,
    /// Wakers push task ids here; drained into `runnable` at every step.
    woken: Arc<Mutex<Vec<u32>>>,
    device: RefCell<Device>,
    next_bio_id: Cell<u64>,
    bios: RefCell<BTreeMap<u64, EndIo>>,
    memory: RefCell<Memory>,
    shrinkers: RefCell<Vec<Rc<dyn Shrinker>>>,
    trace: RefCell<Trace>,
    violations: RefCell<Vec<ViolationRecord>>,
    /// A hang was reported: the run ends.
    halted: Cell<bool>,
    boots: Cell<u32>,
}

struct TaskWaker {
    task: u32,
    woken: Arc<Mutex<Vec<u32>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.lock().expect("wake list poisoned").push(self.task);
    }
}

impl World {
    /// A powered-on machine. `decision_log`: follow it instead of the
    /// configured strategy. `keep_trace`: remember every trace record.
    pub fn new(
        seed: u64,
        config: WorldConfig,
        decision_log: Option<Vec<u32>>,
        keep_trace: bool,
    ) -> Rc<World> {
        let scheduler: Box<dyn Scheduler> = match decision_log {
            Some(log) => Box::new(Replay::new(log)),
            None => config.scheduler.build(stream(seed, "scheduler")),
        };
        let device = Device::new(config.device.clone(), stream(seed, "device"));
        let memory = Memory::new(config.memory.clone());
        let world = Rc::new_cyclic(|me| World {
            me: me.clone(),
            seed,
            clock: Cell::new(0),
            exec: RefCell::new(Exec {
                tasks: Vec::new(),
                runnable: BTreeSet::new(),
                timers: BinaryHeap::new(),
                timer_seq: 0,
                current: None,
                last_polled: None,
                scheduler,
                decisions: Vec::new(),
                steps: 0,
                workload_live: 0,
                last_workload_poll_ns: 0,
                last_op: None,
                switch_points: BTreeMap::new(),
                scratch: Vec::new(),
            }),
            futures: RefCell::new(Vec::new()),
            woken: Arc::new(Mutex::new(Vec::new())),
            device: RefCell::new(device),
            next_bio_id: Cell::new(0),
            bios: RefCell::new(BTreeMap::new()),
            memory: RefCell::new(memory),
            shrinkers: RefCell::new(Vec::new()),
            trace: RefCell::new(Trace::new(keep_trace)),
            violations: RefCell::new(Vec::new()),
            halted: Cell::new(false),
            boots: Cell::new(0),
            config,
        });
        world.boot();
        world
    }

    fn rc(&self) -> Rc<World> {
        self.me.upgrade().expect("world used after drop")
    }

    /// The engine's view of this world.
    pub fn env(&self) -> Rc<dyn Env> {
        self.rc()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn config(&self) -> &WorldConfig {
        &self.config
    }

    /// A named random stream of this run, for the world's own policies.
    pub fn stream(&self, name: &str) -> rand_chacha::ChaCha8Rng {
        stream(self.seed, &format!("{name}#{}", self.boots.get()))
    }

    /// Start the machine's own daemons (reclaim actors).
    fn boot(&self) {
        self.boots.set(self.boots.get() + 1);
        memory::spawn_actors(&self.rc());
    }

    /// Run until every workload task has finished, `until_ns` is reached, or
    /// a violation is reported.
    pub fn run(&self, until_ns: Option<u64>) -> Stop {
        loop {
            self.fire_due_events();
            self.collect_wakes();
            if self.halted.get() || self.violations.borrow().len() >= self.config.max_violations as usize {
                return Stop::Violation;
            }
            let now = self.clock.get();
            if self.exec.borrow().workload_live == 0 {
                return Stop::WorkloadDone;
            }
            if until_ns.is_some_and(|until| now >= until) {
                return Stop::TimeReached;
            }
            if let Some(violation) = self.check_liveness() {
                self.halt(violation);
                continue;
            }
            let next = self.exec.borrow().runnable.is_empty().then(|| self.next_event_ns());
            match next {
                None => self.step(),
                Some(Some(at)) => {
                    let at = until_ns.map_or(at, |until| at.min(until));
                    self.clock.set(now.max(at));
                }
                Some(None) => {
                    let message = format!("no task can run and nothing is pending: {}", self.blocked_tasks());
                    self.halt(Violation { kind: "deadlock", message });
                }
            }
        }
    }

    /// Bounds that turn a hang into a report.
    fn check_liveness(&self) -> Option<Violation> {
        let exec = self.exec.borrow();
        let now = self.clock.get();
        if exec.steps >= self.config.max_steps {
            return Some(Violation {
                kind: "step_limit",
                message: format!("{} steps without the workload finishing", exec.steps),
            });
        }
        if now >= self.config.max_sim_time_ns {
            return Some(Violation {
                kind: "time_limit",
                message: format!("{now} ns of simulated time without the workload finishing"),
            });
        }
        if let Some((at, steps)) = exec.last_op
            && now.saturating_sub(at) > self.config.progress_timeout_ns
        {
            let polls = exec.steps - steps;
            drop(exec);
            return Some(Violation {
                kind: "no_progress",
                message: format!(
                    "no operation finished in {} ns of simulated time since {at} ns ({polls} polls): {}",
                    self.config.progress_timeout_ns,
                    self.blocked_tasks()
                ),
            });
        }
        let idle = now.saturating_sub(exec.last_workload_poll_ns);
        if idle > self.config.stall_timeout_ns {
            drop(exec);
            return Some(Violation {
                kind: "stall",
                message: format!("no workload task ran for {idle} ns: {}", self.blocked_tasks()),
            });
        }
        None
    }

    fn blocked_tasks(&self) -> String {
        let exec = self.exec.borrow();
        let blocked: Vec<String> = exec
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.live && t.kind == TaskKind::Workload)
            .map(|(id, t)| {
                let task = TaskId(id as u32);
                match &t.waiting_on {
                    _ if exec.runnable.contains(&task) => format!("{task} ({}) is runnable", t.name),
                    Some(what) => format!("{task} ({}) waits on {what:?}", t.name),
                    None => format!("{task} ({}) waits on nothing it declared", t.name),
                }
            })
            .collect();
        blocked.join("; ")
    }

    fn next_event_ns(&self) -> Option<u64> {
        let timer = self.exec.borrow().timers.peek().map(|Reverse((at, _, _))| *at);
        let device = self.device.borrow().next_event_ns();
        match (timer, device) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn fire_due_events(&self) {
        let now = self.clock.get();
        let completions = self.device.borrow_mut().advance(now);
        for (id, status) in completions {
            let ok = matches!(status, engine::env::BioStatus::Ok(_));
            self.record(None, SimEvent::BioComplete { id, ok });
            let end_io = self.bios.borrow_mut().remove(&id);
            if let Some(end_io) = end_io {
                end_io(status);
            }
        }
        let mut exec = self.exec.borrow_mut();
        while let Some(Reverse((at, _, task))) = exec.timers.peek().copied() {
            if at > now {
                break;
            }
            exec.timers.pop();
            if exec.tasks[task.0 as usize].live {
                exec.runnable.insert(task);
            }
        }
    }

    fn collect_wakes(&self) {
        let woken: Vec<u32> = std::mem::take(&mut *self.woken.lock().expect("wake list poisoned"));
        let mut exec = self.exec.borrow_mut();
        for id in woken {
            if exec.tasks.get(id as usize).is_some_and(|t| t.live) {
                exec.runnable.insert(TaskId(id));
            }
        }
    }

    /// One scheduling decision and one poll.
    fn step(&self) {
        let chosen = match self.choose() {
            Ok(task) => task,
            Err(mismatch) => {
                self.halt(Violation { kind: "replay_mismatch", message: mismatch.message });
                return;
            }
        };
        if self.exec.borrow().last_polled != Some(chosen) {
            self.record(Some(chosen), SimEvent::Run);
        }
        self.poll(chosen);
        let mut exec = self.exec.borrow_mut();
        exec.current = None;
        exec.last_polled = Some(chosen);
        drop(exec);
        self.clock.set(self.clock.get() + self.config.step_cost_ns);
    }

    /// The scheduler's decision (logged when contended); makes it current.
    fn choose(&self) -> Result<TaskId, ReplayMismatch> {
        let mut exec = self.exec.borrow_mut();
        let exec = &mut *exec;
        let contended = exec.runnable.len() > 1;
        let chosen = if contended {
            exec.scratch.clear();
            exec.scratch.extend(exec.runnable.iter().copied());
            let chosen = exec.scheduler.choose(&exec.scratch, exec.decisions.len())?;
            exec.decisions.push(chosen.0);
            chosen
        } else {
            *exec.runnable.first().expect("step runs with a runnable task")
        };
        let was_runnable = exec.runnable.remove(&chosen);
        assert!(was_runnable, "scheduler chose {chosen}, which cannot run");
        exec.current = Some(chosen);
        exec.steps += 1;
        let meta = &mut exec.tasks[chosen.0 as usize];
        meta.waiting_on = None;
        if meta.kind == TaskKind::Workload {
            exec.last_workload_poll_ns = self.clock.get();
        }
        Ok(chosen)
    }

    fn poll(&self, task: TaskId) {
        let index = task.0 as usize;
        let mut future = self.futures.borrow_mut()[index].take().expect("a live task has its future");
        let waker = self.exec.borrow().tasks[index].waker.clone();
        let mut context = Context::from_waker(&waker);
        match future.as_mut().poll(&mut context) {
            Poll::Pending => self.futures.borrow_mut()[index] = Some(future),
            Poll::Ready(()) => {
                let mut exec = self.exec.borrow_mut();
                let meta = &mut exec.tasks[index];
                meta.live = false;
                if meta.kind == TaskKind::Workload {
                    exec.workload_live -= 1;
                }
                drop(exec);
                self.record(Some(task), SimEvent::Exit);
                drop(future);
            }
        }
    }

    /// End of the run: drop every task's future, pending `end_io` and
    /// shrinker. They hold the world (and the engine) through `Env`, and the
    /// world holds them: without this, every run's memory stays allocated,
    /// which a sweep of thousands of runs in one process cannot afford.
    pub fn shutdown(&self) {
        let futures: Vec<_> = std::mem::take(&mut *self.futures.borrow_mut());
        {
            let mut exec = self.exec.borrow_mut();
            for meta in &mut exec.tasks {
                meta.live = false;
            }
            exec.runnable.clear();
            exec.timers.clear();
            exec.workload_live = 0;
            exec.current = None;
        }
        let bios: BTreeMap<u64, EndIo> = std::mem::take(&mut *self.bios.borrow_mut());
        let shrinkers: Vec<_> = std::mem::take(&mut *self.shrinkers.borrow_mut());
        // Dropping futures and callbacks may drop engine objects; no borrow is held.
        drop(futures);
        drop(bios);
        drop(shrinkers);
        self.woken.lock().expect("wake list poisoned").clear();
    }

    /// Cut power: every task, in-flight bio and cached byte is gone, the
    /// device keeps what a real drive could, and the machine boots again
    /// with only its own daemons running.
    pub fn power_loss(&self) {
        self.shutdown();
        self.futures.borrow_mut().resize_with(self.exec.borrow().tasks.len(), || None);
        let report = self.device.borrow_mut().power_loss(self.clock.get());
        self.memory.borrow_mut().power_loss();
        self.record(
            None,
            SimEvent::PowerLoss {
                inflight_lost: report.inflight_lost as u64,
                writes_kept: report.writes_kept as u64,
                writes_dropped: report.writes_dropped as u64,
                writes_torn: report.writes_torn as u64,
            },
        );
        self.boot();
    }

    pub(crate) fn record(&self, task: Option<TaskId>, event: SimEvent) {
        let record = Record { time_ns: self.clock.get(), task, event };
        self.trace.borrow_mut().record(record);
    }

    /// Report a violation that ends the run whatever `max_violations` says.
    fn halt(&self, violation: Violation) {
        self.halted.set(true);
        self.report(violation);
    }

    fn report(&self, violation: Violation) {
        let current = self.exec.borrow().current;
        self.record(current, SimEvent::Violation { kind: violation.kind });
        tracing::info!(target: "cowsim::violation", kind = violation.kind, "{}", violation.message);
        self.violations.borrow_mut().push(ViolationRecord {
            kind: violation.kind.to_string(),
            message: violation.message,
            sim_time_ns: self.clock.get(),
        });
    }

    /// Arm a timer that makes the current task runnable at `at_ns`.
    fn arm_timer(&self, at_ns: u64) {
        let mut exec = self.exec.borrow_mut();
        let task = exec.current.expect("timers are armed by a running task");
        exec.timer_seq += 1;
        let seq = exec.timer_seq;
        exec.timers.push(Reverse((at_ns, seq, task)));
    }

    // ---- accessors for the runner, the reclaim actors and tests ----

    pub fn now(&self) -> u64 {
        self.clock.get()
    }

    pub fn trace_hash(&self) -> u64 {
        self.trace.borrow().hash()
    }

    pub fn trace_events(&self) -> u64 {
        self.trace.borrow().events()
    }

    pub fn take_trace_records(&self) -> Option<Vec<Record>> {
        self.trace.borrow_mut().take_records()
    }

    pub fn violations(&self) -> Vec<ViolationRecord> {
        self.violations.borrow().clone()
    }

    pub fn violation_count(&self) -> usize {
        self.violations.borrow().len()
    }

    pub fn decision_log(&self) -> Vec<u32> {
        self.exec.borrow().decisions.clone()
    }

    pub fn device(&self) -> std::cell::Ref<'_, Device> {
        self.device.borrow()
    }

    pub fn memory(&self) -> std::cell::Ref<'_, Memory> {
        self.memory.borrow()
    }

    pub(crate) fn memory_mut(&self) -> std::cell::RefMut<'_, Memory> {
        self.memory.borrow_mut()
    }

    pub(crate) fn shrinkers(&self) -> Vec<Rc<dyn Shrinker>> {
        self.shrinkers.borrow().clone()
    }

    /// Per-subsystem counters and histograms for `stats` in the JSON output.
    pub fn stats(&self) -> serde_json::Value {
        let exec = self.exec.borrow();
        serde_json::json!({
            "executor": {
                "steps": exec.steps,
                "decisions": exec.decisions.len(),
                "tasks": exec.tasks.len(),
                "trace_events": self.trace.borrow().events(),
                "switch_points": exec.switch_points,
                "boots": self.boots.get(),
            },
            "device": self.device.borrow().stats().summary(),
            "memory": self.memory.borrow().summary(),
        })
    }
}

impl Env for World {
    fn now_ns(&self) -> u64 {
        self.clock.get()
    }

    fn submit_bio(&self, bio: Bio, end_io: EndIo) {
        let id = self.next_bio_id.get();
        self.next_bio_id.set(id + 1);
        let (offset_bytes, len_bytes) = match &bio {
            Bio::Read { offset_bytes, len_bytes } => (*offset_bytes, u64::from(*len_bytes)),
            Bio::Write { offset_bytes, data, .. } => (*offset_bytes, data.len() as u64),
            Bio::Flush => (0, 0),
        };
        let current = self.exec.borrow().current;
        self.record(current, SimEvent::BioSubmit { id, op: bio.op_name(), offset_bytes, len_bytes });
        self.bios.borrow_mut().insert(id, end_io);
        self.device.borrow_mut().submit(self.clock.get(), id, bio);
    }

    fn sleep(&self, ns: u64) -> LocalBoxFuture<'static, ()> {
        let until_ns = self.clock.get().saturating_add(ns);
        Box::pin(Sleep { world: self.rc(), until_ns, armed: false })
    }

    /// A switch point; at `Workload` (between operations) the task has
    /// returned to user space and first pays its memory debt.
    fn switch_point(&self, at: SwitchPoint) -> LocalBoxFuture<'static, ()> {
        let current = self.exec.borrow().current;
        self.record(current, SimEvent::Switch(at));
        *self.exec.borrow_mut().switch_points.entry(switch_point_name(at)).or_default() += 1;
        if at == SwitchPoint::Workload && self.memory.borrow().owes(current) {
            let world = self.rc();
            return Box::pin(async move {
                memory::return_to_user(world).await;
                YieldOnce { yielded: false }.await
            });
        }
        Box::pin(YieldOnce { yielded: false })
    }

    fn memory_charge(&self, bytes: u64) -> LocalBoxFuture<'static, ()> {
        Box::pin(memory::charge(self.rc(), bytes))
    }

    fn memory_release(&self, bytes: u64) {
        self.memory.borrow_mut().release(bytes);
    }

    fn register_shrinker(&self, shrinker: Rc<dyn Shrinker>) {
        self.shrinkers.borrow_mut().push(shrinker);
    }

    fn spawn(&self, name: &str, kind: TaskKind, future: LocalBoxFuture<'static, ()>) -> TaskId {
        let mut exec = self.exec.borrow_mut();
        let task = TaskId(u32::try_from(exec.tasks.len()).expect("fewer than 2^32 tasks"));
        let waker = Waker::from(Arc::new(TaskWaker { task: task.0, woken: self.woken.clone() }));
        exec.tasks.push(TaskMeta { name: name.to_string(), kind, live: true, waker, waiting_on: None });
        if kind == TaskKind::Workload {
            exec.workload_live += 1;
        }
        exec.runnable.insert(task);
        exec.scheduler.on_spawn(task);
        let parent = exec.current;
        drop(exec);
        self.futures.borrow_mut().push(Some(future));
        self.record(parent, SimEvent::Spawn { task, name: name.to_string() });
        task
    }

    fn current_task(&self) -> Option<TaskId> {
        self.exec.borrow().current
    }

    fn wait_on(&self, what: WaitOn) {
        let mut exec = self.exec.borrow_mut();
        if let Some(task) = exec.current {
            exec.tasks[task.0 as usize].waiting_on = Some(what);
        }
    }

    fn trace(&self, event: TraceEvent) {
        let current = {
            let mut exec = self.exec.borrow_mut();
            if matches!(event, TraceEvent::Op { .. }) {
                exec.last_op = Some((self.clock.get(), exec.steps));
            }
            exec.current
        };
        self.record(current, SimEvent::Engine(event));
    }

    fn report_violation(&self, violation: Violation) {
        self.report(violation);
    }
}

fn switch_point_name(at: SwitchPoint) -> &'static str {
    match at {
        SwitchPoint::PathRelease => "path_release",
        SwitchPoint::BlockRead => "block_read",
        SwitchPoint::MemoryCharge => "memory_charge",
        SwitchPoint::CondResched => "cond_resched",
        SwitchPoint::Workload => "workload",
    }
}

/// The named random stream of a run (see `scenarios::streams`).
pub fn stream(seed: u64, name: &str) -> rand_chacha::ChaCha8Rng {
    scenarios::streams::stream(seed, name)
}

/// Suspends once, staying runnable: the scheduler picks who runs next.
struct YieldOnce {
    yielded: bool,
}

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

struct Sleep {
    world: Rc<World>,
    until_ns: u64,
    armed: bool,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.world.now() >= self.until_ns {
            return Poll::Ready(());
        }
        if !self.armed {
            self.armed = true;
            self.world.arm_timer(self.until_ns);
        }
        self.world.wait_on(WaitOn::Sleep { until_ns: self.until_ns });
        Poll::Pending
    }
}
