//! Memory: a budget like a cgroup's `memory.high` and the reclaim actors.
//!
//! Model. The filesystem charges every cached tree block and page it holds
//! and releases it on eviction. A memory hog, when configured, adds global
//! pressure to the same budget. Two ways to enforce the budget:
//! - By default, as the machine's free memory running out (the min
//!   watermark): a charge that takes usage over `high_bytes` makes the
//!   charging task reclaim directly (evict clean objects, then start
//!   writeback of dirty ones) and then throttles it in proportion to what is
//!   still over, at once, whatever locks it holds (`__alloc_pages_slowpath`
//!   direct reclaim, `reclaim_throttle`).
//! - With `memcg_charge_batch_bytes`, as a cgroup's `memory.high`: the task
//!   only owes what it charged over the limit (`memcg_nr_pages_over_high`)
//!   and pays (the same reclaim and throttle) on its way back to user space,
//!   the `Workload` switch point between operations; only a debt above the
//!   batch (MEMCG_CHARGE_BATCH, 64 pages) is paid at once, inside the kernel.
//! Nothing is ever killed.
//!
//! Policies live here, mechanisms in the engine: every actor decides *when*
//! and *how much*, and calls the registered shrinkers, which decide *what*
//! can be freed (clean, unlocked, unreferenced) or written.
//!
//! Actors (each optional, each with its own random stream):
//! - `kswapd`: wakes every `period_ns` (with jitter); above `wake_above_bytes`
//!   it reclaims down to `stop_below_bytes`.
//! - `flusher`: the background writeback thread; every `period_ns` it writes
//!   back dirty data when the dirty total exceeds `background_bytes`, and all
//!   of it every `expire_periods` periods (30 s / 5 s in Linux).
//! - `proactive`: bursts of `bytes` reclaim at exponential intervals, like a
//!   write to `memory.reclaim`.
//! - `drop_caches`: drops every clean object at exponential intervals (writes nothing).
//! - `hog`: a process whose usage takes a random walk in `[0, max_bytes]`.

use std::collections::BTreeMap;
use std::rc::Rc;

use engine::env::{Env, SyncMode, TaskId, TaskKind};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::device::LatencyDist;
use crate::trace::SimEvent;
use crate::world::World;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// The filesystem's share of memory (`memory.high`), bytes.
    pub high_bytes: u64,
    /// Direct reclaim frees the excess plus this much (SWAP_CLUSTER_MAX-like), bytes.
    pub reclaim_batch_bytes: u64,
    /// `None`: a charge over `high_bytes` reclaims and throttles at once
    /// (free memory running out). `Some(batch)`: `memory.high` semantics,
    /// where a task pays at its return to user space, or at once when its
    /// debt passes `batch` bytes (MEMCG_CHARGE_BATCH is 64 pages).
    #[serde(default)]
    pub memcg_charge_batch_bytes: Option<u64>,
    /// Throttle per started MiB still over `high_bytes` after direct reclaim, ns.
    pub throttle_ns_per_mib: u64,
    /// Upper bound of one throttle, ns.
    pub max_throttle_ns: u64,
    pub kswapd: Option<KswapdConfig>,
    pub flusher: Option<FlusherConfig>,
    pub proactive: Option<ProactiveConfig>,
    pub drop_caches: Option<DropCachesConfig>,
    pub hog: Option<HogConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KswapdConfig {
    pub period_ns: u64,
    pub wake_above_bytes: u64,
    pub stop_below_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlusherConfig {
    pub period_ns: u64,
    pub background_bytes: u64,
    pub expire_periods: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProactiveConfig {
    pub mean_interval_ns: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DropCachesConfig {
    pub mean_interval_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HogConfig {
    pub period_ns: u64,
    pub max_bytes: u64,
    pub step_bytes: u64,
}

impl Default for MemoryConfig {
    /// A roomy budget with Linux's background actors: kswapd and the flusher.
    fn default() -> Self {
        let high_bytes = 256 << 20;
        Self {
            high_bytes,
            reclaim_batch_bytes: 128 << 10,
            memcg_charge_batch_bytes: None,
            throttle_ns_per_mib: 1_000_000,
            max_throttle_ns: 200_000_000,
            kswapd: Some(KswapdConfig {
                period_ns: 10_000_000,
                wake_above_bytes: high_bytes / 10 * 9,
                stop_below_bytes: high_bytes / 10 * 8,
            }),
            flusher: Some(FlusherConfig {
                period_ns: 5_000_000_000,
                background_bytes: high_bytes / 10,
                expire_periods: 6,
            }),
            proactive: None,
            drop_caches: None,
            hog: None,
        }
    }
}

/// Reclaim done by one actor.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ActorStats {
    pub passes: u64,
    pub freed_bytes: u64,
    pub written_bytes: u64,
}

/// The budget's state. Invariant: `fs_bytes` is what the filesystem charged
/// and has not released (it never goes below zero: a release of more than
/// was charged is an engine bug and panics).
pub struct Memory {
    config: MemoryConfig,
    fs_bytes: u64,
    hog_bytes: u64,
    peak_bytes: u64,
    charges: u64,
    throttles: u64,
    throttle_ns: u64,
    /// Each task's charges made while over `high_bytes` and not yet paid
    /// for (`current->memcg_nr_pages_over_high`).
    over_high: BTreeMap<TaskId, u64>,
    actors: BTreeMap<&'static str, ActorStats>,
}

impl Memory {
    pub fn new(config: MemoryConfig) -> Self {
        Self {
            config,
            fs_bytes: 0,
            hog_bytes: 0,
            peak_bytes: 0,
            charges: 0,
            throttles: 0,
            throttle_ns: 0,
            over_high: BTreeMap::new(),
            actors: BTreeMap::new(),
        }
    }

    pub fn usage_bytes(&self) -> u64 {
        self.fs_bytes + self.hog_bytes
    }

    pub fn fs_bytes(&self) -> u64 {
        self.fs_bytes
    }

    /// Bytes over `high_bytes`, zero when under.
    pub fn excess_bytes(&self) -> u64 {
        self.usage_bytes().saturating_sub(self.config.high_bytes)
    }

    /// Whether `task` has charges over `high_bytes` to pay for.
    pub(crate) fn owes(&self, task: Option<TaskId>) -> bool {
        task.is_some_and(|task| self.over_high.contains_key(&task))
    }

    pub fn actor(&self, name: &str) -> ActorStats {
        self.actors.get(name).copied().unwrap_or_default()
    }

    fn charge(&mut self, bytes: u64) -> u64 {
        self.fs_bytes += bytes;
        self.charges += 1;
        self.peak_bytes = self.peak_bytes.max(self.usage_bytes());
        self.excess_bytes()
    }

    pub(crate) fn release(&mut self, bytes: u64) {
        assert!(bytes <= self.fs_bytes, "released {bytes} bytes but only {} are charged", self.fs_bytes);
        self.fs_bytes -= bytes;
    }

    fn set_hog(&mut self, bytes: u64) {
        self.hog_bytes = bytes;
        self.peak_bytes = self.peak_bytes.max(self.usage_bytes());
    }

    /// Everything cached is gone with the power; the counters stay.
    pub(crate) fn power_loss(&mut self) {
        self.fs_bytes = 0;
        self.hog_bytes = 0;
        self.over_high.clear();
    }

    fn throttle_for(&self, excess_bytes: u64) -> u64 {
        let mib = excess_bytes.div_ceil(1 << 20);
        (mib * self.config.throttle_ns_per_mib).min(self.config.max_throttle_ns)
    }

    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "high_bytes": self.config.high_bytes,
            "usage_bytes": self.usage_bytes(),
            "peak_bytes": self.peak_bytes,
            "charges": self.charges,
            "throttles": self.throttles,
            "throttle_ns": self.throttle_ns,
            "reclaim": self.actors,
        })
    }
}

/// Reclaim up to `target_bytes` through the registered shrinkers: evict
/// clean objects first, then (if `writeback`) start writeback of dirty ones.
/// Returns (freed, written) bytes.
pub(crate) fn shrink(world: &World, actor: &'static str, target_bytes: u64, writeback: bool) -> (u64, u64) {
    let shrinkers = world.shrinkers();
    let mut freed = 0;
    for shrinker in &shrinkers {
        if freed >= target_bytes {
            break;
        }
        freed += shrinker.evict(target_bytes - freed);
    }
    let mut written = 0;
    if writeback {
        for shrinker in &shrinkers {
            let wanted = target_bytes.saturating_sub(freed + written);
            if wanted == 0 {
                break;
            }
            written += shrinker.writeback(wanted, SyncMode::None);
        }
    }
    let mut memory = world.memory_mut();
    let stats = memory.actors.entry(actor).or_default();
    stats.passes += 1;
    stats.freed_bytes += freed;
    stats.written_bytes += written;
    drop(memory);
    world.record(
        world.current_task(),
        SimEvent::Reclaim { actor, target_bytes, freed_bytes: freed, written_bytes: written },
    );
    (freed, written)
}

/// [`Env::memory_charge`]: charge; over `high_bytes`, reclaim directly and
/// throttle, at once or (with `memcg_charge_batch_bytes`) once the task's
/// debt passes the batch (`try_charge_memcg`), else at its return to user
/// space. A charge outside any task (an `end_io`) is never made to wait.
pub(crate) async fn charge(world: Rc<World>, bytes: u64) {
    let excess = world.memory_mut().charge(bytes);
    let task = world.current_task();
    world.record(task, SimEvent::Charge { bytes, usage_bytes: world.memory().usage_bytes() });
    let Some(task) = task else { return };
    if excess == 0 {
        return;
    }
    let Some(batch) = world.memory().config.memcg_charge_batch_bytes else {
        return direct_reclaim_and_throttle(&world, excess).await;
    };
    {
        let mut memory = world.memory_mut();
        let debt = memory.over_high.entry(task).or_default();
        *debt += bytes;
        if *debt <= batch {
            return;
        }
        memory.over_high.remove(&task);
    }
    handle_over_high(&world).await;
}

/// The current task returns to user space (`resume_user_mode_work`): it
/// pays what it owes for charges over `high_bytes`.
pub(crate) async fn return_to_user(world: Rc<World>) {
    let Some(task) = world.current_task() else { return };
    let owed = world.memory_mut().over_high.remove(&task).is_some();
    if owed {
        handle_over_high(&world).await;
    }
}

/// `mem_cgroup_handle_over_high`: if usage is still over `high_bytes`,
/// reclaim directly and sleep in proportion to what is left over.
async fn handle_over_high(world: &Rc<World>) {
    let excess = world.memory().excess_bytes();
    if excess == 0 {
        return;
    }
    direct_reclaim_and_throttle(world, excess).await;
}

async fn direct_reclaim_and_throttle(world: &Rc<World>, excess: u64) {
    let batch = world.config().memory.reclaim_batch_bytes;
    shrink(world, "direct", excess + batch, true);
    let still_over = world.memory().excess_bytes();
    if still_over == 0 {
        return;
    }
    let ns = world.memory().throttle_for(still_over);
    {
        let mut memory = world.memory_mut();
        memory.throttles += 1;
        memory.throttle_ns += ns;
    }
    world.record(world.current_task(), SimEvent::Throttle { ns });
    world.sleep(ns).await;
}

/// Spawn the configured actors as daemons of a freshly booted machine.
pub(crate) fn spawn_actors(world: &Rc<World>) {
    let config = world.config().memory.clone();
    if let Some(kswapd) = config.kswapd {
        let (w, rng) = (world.clone(), world.stream("kswapd"));
        world.spawn("kswapd", TaskKind::Daemon, Box::pin(run_kswapd(w, rng, kswapd)));
    }
    if let Some(flusher) = config.flusher {
        let w = world.clone();
        world.spawn("flusher", TaskKind::Daemon, Box::pin(run_flusher(w, flusher)));
    }
    if let Some(proactive) = config.proactive {
        let (w, rng) = (world.clone(), world.stream("proactive"));
        world.spawn("proactive-reclaim", TaskKind::Daemon, Box::pin(run_proactive(w, rng, proactive)));
    }
    if let Some(drop_caches) = config.drop_caches {
        let (w, rng) = (world.clone(), world.stream("drop_caches"));
        world.spawn("drop-caches", TaskKind::Daemon, Box::pin(run_drop_caches(w, rng, drop_caches)));
    }
    if let Some(hog) = config.hog {
        let (w, rng) = (world.clone(), world.stream("hog"));
        world.spawn("memory-hog", TaskKind::Daemon, Box::pin(run_hog(w, rng, hog)));
    }
}

fn jittered(rng: &mut ChaCha8Rng, period_ns: u64) -> u64 {
    period_ns / 2 + rng.random_range(0..=period_ns)
}

/// An exponential draw with the given mean (capped at 20x), at least 1 ns;
/// the device's platform-independent distribution.
fn exponential(rng: &mut ChaCha8Rng, mean_ns: u64) -> u64 {
    LatencyDist::new(0, mean_ns).sample(rng).max(1)
}

async fn run_kswapd(world: Rc<World>, mut rng: ChaCha8Rng, config: KswapdConfig) {
    loop {
        world.sleep(jittered(&mut rng, config.period_ns)).await;
        let usage = world.memory().usage_bytes();
        if usage > config.wake_above_bytes {
            shrink(&world, "kswapd", usage - config.stop_below_bytes, true);
        }
    }
}

async fn run_flusher(world: Rc<World>, config: FlusherConfig) {
    let mut period = 0u64;
    loop {
        world.sleep(config.period_ns).await;
        period += 1;
        let dirty: u64 = world.shrinkers().iter().map(|s| s.count().dirty_bytes).sum();
        let expired = config.expire_periods > 0 && period % u64::from(config.expire_periods) == 0;
        if dirty > 0 && (dirty > config.background_bytes || expired) {
            let mut written = 0;
            for shrinker in world.shrinkers() {
                written += shrinker.writeback(dirty, SyncMode::None);
            }
            world.memory_mut().actors.entry("flusher").or_default().written_bytes += written;
            world.record(
                world.current_task(),
                SimEvent::Reclaim {
                    actor: "flusher",
                    target_bytes: dirty,
                    freed_bytes: 0,
                    written_bytes: written,
                },
            );
        }
    }
}

async fn run_proactive(world: Rc<World>, mut rng: ChaCha8Rng, config: ProactiveConfig) {
    loop {
        world.sleep(exponential(&mut rng, config.mean_interval_ns)).await;
        shrink(&world, "proactive", config.bytes, true);
    }
}

async fn run_drop_caches(world: Rc<World>, mut rng: ChaCha8Rng, config: DropCachesConfig) {
    loop {
        world.sleep(exponential(&mut rng, config.mean_interval_ns)).await;
        shrink(&world, "drop_caches", u64::MAX, false);
    }
}

async fn run_hog(world: Rc<World>, mut rng: ChaCha8Rng, config: HogConfig) {
    let mut bytes = 0u64;
    loop {
        world.sleep(jittered(&mut rng, config.period_ns)).await;
        let grow = rng.random_bool(0.5);
        let step = rng.random_range(0..=config.step_bytes);
        bytes = if grow { (bytes + step).min(config.max_bytes) } else { bytes.saturating_sub(step) };
        world.memory_mut().set_hog(bytes);
        let excess = world.memory().excess_bytes();
        if grow && excess > 0 {
            // The hog's own allocations reclaim directly, like any charger.
            let batch = world.config().memory.reclaim_batch_bytes;
            shrink(&world, "direct", excess + batch, true);
        }
    }
}
