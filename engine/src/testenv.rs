//! A minimal [`Env`] for the engine's unit tests: not the simulator (that is
//! `sim`, which the engine cannot depend on), just enough world to run
//! engine futures deterministically.
//!
//! - Device: a `Vec<u8>`; bios queue in submission order and complete one
//!   per step of [`TestEnv::run_until_idle`] once no task is runnable
//!   (or not at all while [`TestEnv::hold_bios`] is set). Offsets listed in
//!   `fail_offsets` fail with `IoError`.
//! - Executor: tasks in spawn order; a woken task is queued once (FIFO);
//!   `switch_point` yields once; `sleep` returns at once.
//! - Memory: a byte counter (no limit, no reclaim; tests call the
//!   shrinkers themselves).
//! - Trace events and violations are recorded.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use crate::env::{
    Bio, BioStatus, EndIo, Env, LocalBoxFuture, Shrinker, SwitchPoint, TaskId, TaskKind, TraceEvent,
    Violation, WaitOn,
};

/// What the device saw: operation name, offset and length in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BioRecord {
    pub op: &'static str,
    pub offset: u64,
    pub len: u64,
}

struct TaskSlot {
    kind: TaskKind,
    name: String,
    future: Option<LocalBoxFuture<'static, ()>>,
    done: bool,
    waiting_on: Option<WaitOn>,
    waker: Waker,
}

struct TaskWaker {
    id: usize,
    woken: Arc<Mutex<VecDeque<usize>>>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        let mut woken = self.woken.lock().unwrap();
        if !woken.contains(&self.id) {
            woken.push_back(self.id);
        }
    }
}

pub(crate) struct TestEnv {
    device: RefCell<Vec<u8>>,
    pending: RefCell<VecDeque<(Bio, EndIo)>>,
    pub(crate) bios: RefCell<Vec<BioRecord>>,
    pub(crate) fail_offsets: RefCell<BTreeSet<u64>>,
    pub(crate) hold_bios: Cell<bool>,
    memory_bytes: Cell<u64>,
    pub(crate) shrinkers: RefCell<Vec<Rc<dyn Shrinker>>>,
    tasks: RefCell<Vec<TaskSlot>>,
    woken: Arc<Mutex<VecDeque<usize>>>,
    current: Cell<Option<usize>>,
    /// Tasks in [`TestEnv::wait_for`], re-polled at the next `run_until_idle`.
    parked: RefCell<Vec<Waker>>,
    pub(crate) traces: RefCell<Vec<TraceEvent>>,
    pub(crate) violations: RefCell<Vec<Violation>>,
    now_ns: Rc<Cell<u64>>,
}

impl TestEnv {
    pub(crate) fn new(device_bytes: usize) -> Rc<TestEnv> {
        Rc::new(TestEnv {
            device: RefCell::new(vec![0; device_bytes]),
            pending: RefCell::default(),
            bios: RefCell::default(),
            fail_offsets: RefCell::default(),
            hold_bios: Cell::new(false),
            memory_bytes: Cell::new(0),
            shrinkers: RefCell::default(),
            tasks: RefCell::default(),
            woken: Arc::default(),
            current: Cell::new(None),
            parked: RefCell::default(),
            traces: RefCell::default(),
            violations: RefCell::default(),
            now_ns: Rc::new(Cell::new(0)),
        })
    }

    pub(crate) fn write_device(&self, offset: u64, data: &[u8]) {
        let off = offset as usize;
        self.device.borrow_mut()[off..off + data.len()].copy_from_slice(data);
    }

    pub(crate) fn read_device(&self, offset: u64, len: usize) -> Vec<u8> {
        let off = offset as usize;
        self.device.borrow()[off..off + len].to_vec()
    }

    /// Flip bits of one device byte (silent corruption).
    pub(crate) fn corrupt_device(&self, offset: u64, xor: u8) {
        self.device.borrow_mut()[offset as usize] ^= xor;
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes.get()
    }

    pub(crate) fn pending_bios(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Bios of one kind (`"read"`, `"write"`) submitted so far.
    pub(crate) fn count_bios(&self, op: &str) -> usize {
        self.bios.borrow().iter().filter(|b| b.op == op).count()
    }

    /// Run tasks, then complete bios one at a time, until nothing moves.
    pub(crate) fn run_until_idle(&self) {
        for waker in self.parked.take() {
            waker.wake();
        }
        for _ in 0..1_000_000 {
            let next = self.woken.lock().unwrap().pop_front();
            if let Some(id) = next {
                self.poll_task(id);
                continue;
            }
            if self.hold_bios.get() || !self.complete_one_bio() {
                return;
            }
        }
        panic!("test environment did not go idle");
    }

    /// Complete every queued bio, even while `hold_bios` is set (without
    /// running tasks).
    pub(crate) fn complete_bios(&self) {
        while self.complete_one_bio() {}
    }

    fn complete_one_bio(&self) -> bool {
        let Some((bio, end_io)) = self.pending.borrow_mut().pop_front() else { return false };
        let status = match bio {
            Bio::Read { offset_bytes, len_bytes } => {
                if self.fail_offsets.borrow().contains(&offset_bytes) {
                    BioStatus::IoError
                } else {
                    BioStatus::Ok(self.read_device(offset_bytes, len_bytes as usize))
                }
            }
            Bio::Write { offset_bytes, data, .. } => {
                if self.fail_offsets.borrow().contains(&offset_bytes) {
                    BioStatus::IoError
                } else {
                    self.write_device(offset_bytes, &data);
                    BioStatus::Ok(Vec::new())
                }
            }
            Bio::Flush => BioStatus::Ok(Vec::new()),
        };
        end_io(status);
        true
    }

    fn poll_task(&self, id: usize) {
        let (future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let slot = &mut tasks[id];
            if slot.done {
                return;
            }
            slot.waiting_on = None;
            (slot.future.take().expect("task polled re-entrantly"), slot.waker.clone())
        };
        let mut future = future;
        self.current.set(Some(id));
        let ready = future.as_mut().poll(&mut Context::from_waker(&waker)).is_ready();
        self.current.set(None);
        let mut tasks = self.tasks.borrow_mut();
        if ready {
            tasks[id].done = true;
        } else {
            tasks[id].future = Some(future);
        }
    }

    /// Every workload task finished (daemons loop forever, as in the kernel).
    pub(crate) fn all_tasks_done(&self) -> bool {
        self.tasks.borrow().iter().all(|t| t.done || t.kind == TaskKind::Daemon)
    }

    /// What the named task declared it waits for, if it is blocked.
    pub(crate) fn waits_of(&self, name: &str) -> Option<WaitOn> {
        let tasks = self.tasks.borrow();
        let slot = tasks.iter().find(|t| t.name == name).expect("no such task");
        if slot.done { None } else { slot.waiting_on.clone() }
    }

    /// Spawn a task whose result the test can read after running.
    pub(crate) fn spawn_with_result<T: 'static>(
        &self,
        name: &str,
        future: impl Future<Output = T> + 'static,
    ) -> Rc<RefCell<Option<T>>> {
        let out = Rc::new(RefCell::new(None));
        let slot = out.clone();
        self.spawn(
            name,
            TaskKind::Workload,
            Box::pin(async move {
                let value = future.await;
                *slot.borrow_mut() = Some(value);
            }),
        );
        out
    }

    /// Run `future` as a task until the environment is idle; it must be done.
    pub(crate) fn run<T: 'static>(&self, future: impl Future<Output = T> + 'static) -> T {
        let out = self.spawn_with_result("run", future);
        self.run_until_idle();
        out.borrow_mut().take().expect("task did not finish")
    }

    /// Suspend until `cond` holds, re-checked at each `run_until_idle`.
    pub(crate) fn wait_for<'a>(
        &'a self,
        cond: impl FnMut() -> bool + Unpin + 'a,
    ) -> impl Future<Output = ()> + 'a {
        WaitFor { env: self, cond }
    }
}

struct WaitFor<'a, F> {
    env: &'a TestEnv,
    cond: F,
}

impl<F: FnMut() -> bool + Unpin> Future for WaitFor<'_, F> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.cond)() {
            return Poll::Ready(());
        }
        self.env.parked.borrow_mut().push(cx.waker().clone());
        self.env.wait_on(WaitOn::Other("test condition"));
        Poll::Pending
    }
}

struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Env for TestEnv {
    fn now_ns(&self) -> u64 {
        self.now_ns.get()
    }

    fn submit_bio(&self, bio: Bio, end_io: EndIo) {
        let (offset, len) = match &bio {
            Bio::Read { offset_bytes, len_bytes } => (*offset_bytes, u64::from(*len_bytes)),
            Bio::Write { offset_bytes, data, .. } => (*offset_bytes, data.len() as u64),
            Bio::Flush => (0, 0),
        };
        self.bios.borrow_mut().push(BioRecord { op: bio.op_name(), offset, len });
        self.pending.borrow_mut().push_back((bio, end_io));
    }

    /// Unit tests have no timers: a sleeper parks until the test moves the
    /// clock with `advance_time`, so a daemon's periodic work never runs
    /// on its own here.
    fn sleep(&self, ns: u64) -> LocalBoxFuture<'static, ()> {
        let until_ns = self.now_ns.get().saturating_add(ns);
        let now = self.now_ns.clone();
        Box::pin(std::future::poll_fn(move |_cx| {
            if now.get() >= until_ns { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
        }))
    }

    fn switch_point(&self, _at: SwitchPoint) -> LocalBoxFuture<'static, ()> {
        Box::pin(YieldOnce(false))
    }

    fn memory_charge(&self, bytes: u64) -> LocalBoxFuture<'static, ()> {
        self.memory_bytes.set(self.memory_bytes.get() + bytes);
        Box::pin(std::future::ready(()))
    }

    fn memory_release(&self, bytes: u64) {
        let have = self.memory_bytes.get();
        assert!(have >= bytes, "released {bytes} bytes with only {have} charged");
        self.memory_bytes.set(have - bytes);
    }

    fn register_shrinker(&self, shrinker: Rc<dyn Shrinker>) {
        self.shrinkers.borrow_mut().push(shrinker);
    }

    fn spawn(&self, name: &str, kind: TaskKind, future: LocalBoxFuture<'static, ()>) -> TaskId {
        let mut tasks = self.tasks.borrow_mut();
        let id = tasks.len();
        let waker = Waker::from(Arc::new(TaskWaker { id, woken: self.woken.clone() }));
        waker.wake_by_ref();
        tasks.push(TaskSlot {
            name: name.to_string(),
            kind,
            future: Some(future),
            done: false,
            waiting_on: None,
            waker,
        });
        TaskId(id as u32)
    }

    fn current_task(&self) -> Option<TaskId> {
        self.current.get().map(|id| TaskId(id as u32))
    }

    fn wait_on(&self, what: WaitOn) {
        if let Some(id) = self.current.get() {
            self.tasks.borrow_mut()[id].waiting_on = Some(what);
        }
    }

    fn trace(&self, event: TraceEvent) {
        self.traces.borrow_mut().push(event);
    }

    fn report_violation(&self, violation: Violation) {
        self.violations.borrow_mut().push(violation);
    }
}
