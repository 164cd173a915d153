//! Single-threaded wait primitives: the engine's wait queues and one-shot
//! completions (the kernel's `wait_queue_head_t` and `struct completion`).
//! They know nothing of the scheduler: a waiter registers its `Waker` and
//! suspends, and whoever completes the event wakes it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A FIFO of wakers. `wake_all` wakes in the order tasks started waiting,
/// so wake-ups are deterministic.
#[derive(Default)]
pub struct WaitQueue {
    waiters: RefCell<VecDeque<Waker>>,
}

impl WaitQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push_back(waker.clone());
        }
    }

    pub fn wake_all(&self) {
        let waiters: Vec<Waker> = self.waiters.borrow_mut().drain(..).collect();
        for waker in waiters {
            waker.wake();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.waiters.borrow().is_empty()
    }

    /// Suspends until `ready()` holds, re-checking it after every wake-up.
    pub fn wait_until<'a, F: FnMut() -> bool + 'a>(&'a self, ready: F) -> WaitUntil<'a, F> {
        WaitUntil { queue: self, ready }
    }
}

pub struct WaitUntil<'a, F> {
    queue: &'a WaitQueue,
    ready: F,
}

impl<F: FnMut() -> bool + Unpin> Future for WaitUntil<'_, F> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.ready)() {
            return Poll::Ready(());
        }
        self.queue.register(cx.waker());
        Poll::Pending
    }
}

/// A one-shot value delivered from a callback to one waiting task.
pub struct Completion<T> {
    state: Rc<RefCell<CompletionState<T>>>,
}

struct CompletionState<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

impl<T> Clone for Completion<T> {
    fn clone(&self) -> Self {
        Self { state: self.state.clone() }
    }
}

impl<T> Default for Completion<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Completion<T> {
    pub fn new() -> Self {
        Self { state: Rc::new(RefCell::new(CompletionState { value: None, waker: None })) }
    }

    /// Deliver the value and wake the waiter. Completing twice is a bug.
    pub fn complete(&self, value: T) {
        let waker = {
            let mut state = self.state.borrow_mut();
            assert!(state.value.is_none(), "completion completed twice");
            state.value = Some(value);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub fn is_done(&self) -> bool {
        self.state.borrow().value.is_some()
    }
}

impl<T> Future for Completion<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut state = self.state.borrow_mut();
        match state.value.take() {
            Some(value) => Poll::Ready(value),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// A future that tells the environment what it waits on each time it is
/// pending, so a deadlock or stall report can name it.
pub struct DeclaredWait<'a, F> {
    env: &'a dyn crate::env::Env,
    what: crate::env::WaitOn,
    inner: F,
}

impl<F: Future + Unpin> Future for DeclaredWait<'_, F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match Pin::new(&mut self.inner).poll(cx) {
            Poll::Ready(v) => Poll::Ready(v),
            Poll::Pending => {
                self.env.wait_on(self.what.clone());
                Poll::Pending
            }
        }
    }
}

/// Wait for `inner`, declaring `what` while it is pending.
pub fn declared<F: Future + Unpin>(
    env: &dyn crate::env::Env,
    what: crate::env::WaitOn,
    inner: F,
) -> DeclaredWait<'_, F> {
    DeclaredWait { env, what, inner }
}
