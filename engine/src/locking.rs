//! Tree locks, after fs/btrfs/locking.c: one blocking reader/writer lock per
//! extent buffer (the kernel's `eb->lock`, a `struct rw_semaphore`), and the
//! `btrfs_tree_*lock` wrappers around it.
//!
//! Semantics, as the kernel's rwsem gives them:
//! - readers share the lock, a writer excludes everyone;
//! - a task that finds any waiter queued waits behind it, even a reader
//!   while the lock is read-held: a waiting writer blocks new readers, so
//!   writers are not starved (`RWSEM_FLAG_WAITERS` fails the read fast path);
//!   the try variants fail in that case as well;
//! - on release the lock is handed to the waiters at the head of the FIFO:
//!   a writer alone, or, when the head is a reader, every queued reader
//!   (up to 256) at once, writers keeping their place (the kernel's
//!   phase-fair `rwsem_mark_wake`).
//!
//! Differences from the kernel: no optimistic spinning and no lock
//! stealing; the lock is handed off to the woken waiters, so a task that
//! runs between the release and the wake-up cannot barge in. That makes
//! the order of acquisition a function of the order of arrival only, which
//! is what a deterministic schedule needs. No lockdep: the nesting
//! annotations (`btrfs_tree_lock_nested`) have nothing to check here; a
//! task that locks a block it already holds deadlocks, and the environment
//! reports the deadlock naming the block ([`WaitOn::TreeLockWrite`]).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use crate::env::{Env, WaitOn};
use crate::extent_io::ExtentBuffer;
use crate::fs::FsInfo;

/// The kernel wakes at most this many readers at once (`MAX_READERS_WAKEUP`).
const MAX_READERS_WAKEUP: usize = 256;

/// A reader/writer lock with FIFO hand-off. Not reentrant.
#[derive(Default)]
pub struct TreeLock {
    /// Readers holding the lock; zero while `writer` is set.
    readers: Cell<u32>,
    /// A writer holds the lock; `readers` is zero then.
    writer: Cell<bool>,
    /// Tasks waiting, in arrival order. Non-empty only while the lock is
    /// held (a release hands it to the head at once).
    waiters: RefCell<VecDeque<Waiter>>,
    next_ticket: Cell<u64>,
}

struct Waiter {
    ticket: u64,
    write: bool,
    waker: Waker,
    /// Set by the releasing side when the lock is handed to this waiter.
    granted: Rc<Cell<bool>>,
}

impl TreeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// `down_read_trylock`: fails when a writer holds the lock or anyone waits.
    pub fn try_read_lock(&self) -> bool {
        if self.writer.get() || !self.waiters.borrow().is_empty() {
            return false;
        }
        self.readers.set(self.readers.get() + 1);
        true
    }

    /// `down_write_trylock`: fails when anyone holds the lock or waits.
    pub fn try_write_lock(&self) -> bool {
        if self.writer.get() || self.readers.get() > 0 || !self.waiters.borrow().is_empty() {
            return false;
        }
        self.writer.set(true);
        true
    }

    /// `down_read`: waits behind any queued waiter; declares
    /// [`WaitOn::TreeLockRead`] while blocked.
    pub async fn read_lock(&self, env: &dyn Env, bytenr: u64) {
        LockWait { lock: self, env, write: false, bytenr, state: WaitState::Init }.await
    }

    /// `down_write`: declares [`WaitOn::TreeLockWrite`] while blocked.
    pub async fn write_lock(&self, env: &dyn Env, bytenr: u64) {
        LockWait { lock: self, env, write: true, bytenr, state: WaitState::Init }.await
    }

    pub fn read_unlock(&self) {
        assert!(!self.writer.get(), "read_unlock of a write-locked tree lock");
        let readers = self.readers.get();
        assert!(readers > 0, "read_unlock of a tree lock nobody reads");
        self.readers.set(readers - 1);
        if readers == 1 {
            self.grant();
        }
    }

    pub fn write_unlock(&self) {
        assert!(self.writer.get(), "write_unlock of a tree lock not write-locked");
        assert_eq!(self.readers.get(), 0);
        self.writer.set(false);
        self.grant();
    }

    pub fn is_write_locked(&self) -> bool {
        self.writer.get()
    }

    pub fn is_locked(&self) -> bool {
        self.writer.get() || self.readers.get() > 0
    }

    /// Readers holding the lock now.
    pub fn readers(&self) -> u32 {
        self.readers.get()
    }

    /// Tasks queued for the lock.
    pub fn waiters(&self) -> usize {
        self.waiters.borrow().len()
    }

    /// Hand the free lock to the head of the queue: one writer, or every
    /// queued reader (phase-fair). Wakers run after the queue borrow ends.
    fn grant(&self) {
        if self.writer.get() {
            return;
        }
        let mut woken: Vec<Waker> = Vec::new();
        {
            let mut waiters = self.waiters.borrow_mut();
            let Some(head) = waiters.front() else { return };
            if head.write {
                if self.readers.get() == 0 {
                    let w = waiters.pop_front().expect("head exists");
                    self.writer.set(true);
                    w.granted.set(true);
                    woken.push(w.waker);
                }
            } else {
                let mut kept = VecDeque::with_capacity(waiters.len());
                for w in waiters.drain(..) {
                    if !w.write && woken.len() < MAX_READERS_WAKEUP {
                        self.readers.set(self.readers.get() + 1);
                        w.granted.set(true);
                        woken.push(w.waker);
                    } else {
                        kept.push_back(w);
                    }
                }
                *waiters = kept;
            }
        }
        for waker in woken {
            waker.wake();
        }
    }

    fn enqueue(&self, write: bool, waker: &Waker) -> (u64, Rc<Cell<bool>>) {
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket + 1);
        let granted = Rc::new(Cell::new(false));
        self.waiters.borrow_mut().push_back(Waiter {
            ticket,
            write,
            waker: waker.clone(),
            granted: granted.clone(),
        });
        (ticket, granted)
    }

    fn update_waker(&self, ticket: u64, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        let w = waiters
            .iter_mut()
            .find(|w| w.ticket == ticket)
            .expect("queued waiter not granted is in the queue");
        if !w.waker.will_wake(waker) {
            w.waker = waker.clone();
        }
    }

    /// A waiter gave up (its future was dropped): leave the queue, and let
    /// whoever it was blocking proceed.
    fn cancel(&self, ticket: u64) {
        self.waiters.borrow_mut().retain(|w| w.ticket != ticket);
        self.grant();
    }
}

enum WaitState {
    Init,
    Queued { ticket: u64, granted: Rc<Cell<bool>> },
    Done,
}

struct LockWait<'a> {
    lock: &'a TreeLock,
    env: &'a dyn Env,
    write: bool,
    bytenr: u64,
    state: WaitState,
}

impl LockWait<'_> {
    fn declare(&self) {
        let bytenr = self.bytenr;
        self.env.wait_on(if self.write {
            WaitOn::TreeLockWrite { bytenr }
        } else {
            WaitOn::TreeLockRead { bytenr }
        });
    }
}

impl Future for LockWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &self.state {
            WaitState::Init => {
                let got = if self.write { self.lock.try_write_lock() } else { self.lock.try_read_lock() };
                if got {
                    self.state = WaitState::Done;
                    return Poll::Ready(());
                }
                let (ticket, granted) = self.lock.enqueue(self.write, cx.waker());
                self.state = WaitState::Queued { ticket, granted };
                self.declare();
                Poll::Pending
            }
            WaitState::Queued { ticket, granted } => {
                if granted.get() {
                    self.state = WaitState::Done;
                    return Poll::Ready(());
                }
                self.lock.update_waker(*ticket, cx.waker());
                self.declare();
                Poll::Pending
            }
            WaitState::Done => panic!("tree lock future polled after completion"),
        }
    }
}

impl Drop for LockWait<'_> {
    fn drop(&mut self) {
        if let WaitState::Queued { ticket, granted } = &self.state {
            if granted.get() {
                // Handed the lock but never saw it: give it back.
                if self.write { self.lock.write_unlock() } else { self.lock.read_unlock() }
            } else {
                self.lock.cancel(*ticket);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The kernel's wrappers (`btrfs_tree_lock` and friends). They take the
// filesystem for its environment, where the kernel finds it in
// `eb->fs_info`.

/// `btrfs_tree_lock`: write-lock an extent buffer, waiting if needed.
pub async fn tree_lock(fs: &FsInfo, eb: &ExtentBuffer) {
    eb.lock.write_lock(&*fs.env, eb.start).await
}

/// `btrfs_tree_read_lock`.
pub async fn tree_read_lock(fs: &FsInfo, eb: &ExtentBuffer) {
    eb.lock.read_lock(&*fs.env, eb.start).await
}

/// `btrfs_tree_unlock`.
pub fn tree_unlock(eb: &ExtentBuffer) {
    eb.lock.write_unlock()
}

/// `btrfs_tree_read_unlock`.
pub fn tree_read_unlock(eb: &ExtentBuffer) {
    eb.lock.read_unlock()
}

/// `btrfs_try_tree_write_lock`.
pub fn try_tree_write_lock(eb: &ExtentBuffer) -> bool {
    eb.lock.try_write_lock()
}

/// `btrfs_try_tree_read_lock`.
pub fn try_tree_read_lock(eb: &ExtentBuffer) -> bool {
    eb.lock.try_read_lock()
}

/// `btrfs_assert_tree_write_locked`.
pub fn assert_tree_write_locked(eb: &ExtentBuffer) {
    assert!(eb.lock.is_write_locked(), "extent buffer {} is not write-locked", eb.start);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::TaskKind;
    use crate::testenv::TestEnv;

    /// Spawn a task that takes `lock` (write or read), records `name` in
    /// `log` once it holds it, and releases it when `release` is set.
    fn locker(
        env: &Rc<TestEnv>,
        lock: &Rc<TreeLock>,
        write: bool,
        name: &'static str,
        log: &Rc<RefCell<Vec<&'static str>>>,
        release: &Rc<Cell<bool>>,
    ) {
        let (e, lock, log, release) = (env.clone(), lock.clone(), log.clone(), release.clone());
        let task = async move {
            if write {
                lock.write_lock(&*e, 4096).await;
            } else {
                lock.read_lock(&*e, 4096).await;
            }
            log.borrow_mut().push(name);
            e.wait_for(move || release.get()).await;
            if write { lock.write_unlock() } else { lock.read_unlock() }
        };
        env.spawn(name, TaskKind::Workload, Box::pin(task));
    }

    #[test]
    fn readers_share_writer_excludes() {
        let lock = TreeLock::new();
        assert!(lock.try_read_lock());
        assert!(lock.try_read_lock());
        assert_eq!(lock.readers(), 2);
        assert!(!lock.try_write_lock());
        lock.read_unlock();
        lock.read_unlock();
        assert!(!lock.is_locked());
        assert!(lock.try_write_lock());
        assert!(lock.is_write_locked());
        assert!(!lock.try_read_lock());
        assert!(!lock.try_write_lock());
        lock.write_unlock();
        assert!(!lock.is_locked());
    }

    #[test]
    fn waiting_writer_blocks_new_readers() {
        let env = TestEnv::new(1 << 20);
        let lock = Rc::new(TreeLock::new());
        let log = Rc::new(RefCell::new(Vec::new()));
        let release = Rc::new(Cell::new(false));
        assert!(lock.try_read_lock()); // held by the test
        locker(&env, &lock, true, "writer", &log, &release);
        env.run_until_idle();
        assert_eq!(lock.waiters(), 1);
        assert_eq!(env.waits_of("writer"), Some(WaitOn::TreeLockWrite { bytenr: 4096 }));
        // The lock is only read-held, yet a new reader must queue.
        assert!(!lock.try_read_lock());
        locker(&env, &lock, false, "reader", &log, &release);
        env.run_until_idle();
        assert_eq!(lock.waiters(), 2);
        assert_eq!(env.waits_of("reader"), Some(WaitOn::TreeLockRead { bytenr: 4096 }));
        assert!(log.borrow().is_empty());
        lock.read_unlock();
        env.run_until_idle();
        assert_eq!(*log.borrow(), ["writer"]);
        release.set(true);
        env.run_until_idle();
        assert_eq!(*log.borrow(), ["writer", "reader"]);
        assert!(!lock.is_locked());
        assert!(env.all_tasks_done());
    }

    #[test]
    fn wake_order_is_fifo_and_phase_fair() {
        let env = TestEnv::new(1 << 20);
        let lock = Rc::new(TreeLock::new());
        let log = Rc::new(RefCell::new(Vec::new()));
        let w_release = Rc::new(Cell::new(false));
        let r_release = Rc::new(Cell::new(false));
        assert!(lock.try_write_lock());
        locker(&env, &lock, true, "w1", &log, &w_release);
        locker(&env, &lock, false, "r1", &log, &r_release);
        locker(&env, &lock, true, "w2", &log, &w_release);
        locker(&env, &lock, false, "r2", &log, &r_release);
        env.run_until_idle();
        assert_eq!(lock.waiters(), 4);
        lock.write_unlock();
        env.run_until_idle();
        // The writer at the head alone.
        assert_eq!(*log.borrow(), ["w1"]);
        assert!(lock.is_write_locked());
        // w1 leaves (w2 waits for w_release too, but it is still queued).
        w_release.set(true);
        env.run_until_idle();
        // Readers at the head: every queued reader at once, w2 keeps its place
        // and then runs once they are gone.
        assert_eq!(*log.borrow(), ["w1", "r1", "r2"]);
        r_release.set(true);
        env.run_until_idle();
        assert_eq!(*log.borrow(), ["w1", "r1", "r2", "w2"]);
        assert!(!lock.is_locked());
        assert_eq!(lock.waiters(), 0);
    }

    #[test]
    fn dropped_waiter_leaves_the_queue() {
        let env = TestEnv::new(1 << 20);
        let lock = Rc::new(TreeLock::new());
        assert!(lock.try_read_lock());
        // A writer that gives up: poll its lock future once, then drop it.
        {
            let mut fut = Box::pin(lock.write_lock(&*env, 4096));
            let waker = Waker::noop();
            let mut cx = Context::from_waker(waker);
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            assert_eq!(lock.waiters(), 1);
        }
        assert_eq!(lock.waiters(), 0);
        // Readers are no longer held back.
        assert!(lock.try_read_lock());
        lock.read_unlock();
        lock.read_unlock();
        assert!(lock.try_write_lock());
    }
}
