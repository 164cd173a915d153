//! The reclaim actors against a simple memory consumer: a cache of 16 KiB
//! objects that are dirtied when created, written back through the device,
//! and evicted only when clean, unlocked and unreferenced.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use engine::env::{Bio, CacheCounts, Env, Shrinker, SyncMode, TaskKind};
use sim::memory::{DropCachesConfig, HogConfig, KswapdConfig, MemoryConfig, ProactiveConfig};
use sim::world::{Stop, World, WorldConfig};

const OBJECT: u64 = 16 << 10;

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    Dirty,
    Writeback,
    Clean,
}

struct Object {
    state: State,
    locked: bool,
}

struct TestCache {
    me: Weak<TestCache>,
    env: Rc<dyn Env>,
    objects: RefCell<Vec<Option<Object>>>,
    /// Set if an eviction ever took a dirty, locked or in-flight object.
    bad_evictions: RefCell<u32>,
    written: RefCell<u64>,
}

impl TestCache {
    fn new(env: Rc<dyn Env>) -> Rc<Self> {
        let cache = Rc::new_cyclic(|me| Self {
            me: me.clone(),
            env: env.clone(),
            objects: RefCell::new(Vec::new()),
            bad_evictions: RefCell::new(0),
            written: RefCell::new(0),
        });
        env.register_shrinker(cache.clone());
        cache
    }

    fn sum(&self, state: State) -> u64 {
        self.objects.borrow().iter().flatten().filter(|o| o.state == state).count() as u64 * OBJECT
    }
}

impl Shrinker for TestCache {
    fn name(&self) -> &'static str {
        "test-cache"
    }

    fn count(&self) -> CacheCounts {
        CacheCounts {
            clean_bytes: self.sum(State::Clean),
            dirty_bytes: self.sum(State::Dirty),
            writeback_bytes: self.sum(State::Writeback),
        }
    }

    fn writeback(&self, nr_bytes: u64, mode: SyncMode) -> u64 {
        let mut submitted = 0;
        let mut objects = self.objects.borrow_mut();
        for (index, slot) in objects.iter_mut().enumerate() {
            if submitted >= nr_bytes {
                break;
            }
            let Some(object) = slot else { continue };
            if object.state != State::Dirty || (object.locked && mode == SyncMode::None) {
                continue;
            }
            object.state = State::Writeback;
            submitted += OBJECT;
            let me = self.me.clone();
            let end_io = Box::new(move |_status| {
                let Some(cache) = me.upgrade() else { return };
                if let Some(object) = cache.objects.borrow_mut()[index].as_mut() {
                    object.state = State::Clean;
                }
                *cache.written.borrow_mut() += OBJECT;
            });
            let bio = Bio::Write {
                offset_bytes: index as u64 * OBJECT,
                data: vec![7; OBJECT as usize],
                fua: false,
                preflush: false,
            };
            self.env.submit_bio(bio, end_io);
        }
        submitted
    }

    fn evict(&self, nr_bytes: u64) -> u64 {
        let mut freed = 0;
        for slot in self.objects.borrow_mut().iter_mut() {
            if freed >= nr_bytes {
                break;
            }
            let evictable = matches!(slot, Some(o) if o.state == State::Clean && !o.locked);
            if let Some(object) = slot.as_ref() {
                if !evictable && object.state != State::Clean {
                    continue;
                }
                if object.locked {
                    continue;
                }
                if object.state != State::Clean {
                    *self.bad_evictions.borrow_mut() += 1;
                }
                *slot = None;
                freed += OBJECT;
            }
        }
        self.env.memory_release(freed);
        freed
    }
}

fn world(memory: MemoryConfig, seed: u64) -> Rc<World> {
    let config = WorldConfig { memory, ..WorldConfig::default() };
    World::new(seed, config, None, false)
}

fn quiet(high_bytes: u64) -> MemoryConfig {
    MemoryConfig {
        high_bytes,
        kswapd: None,
        flusher: None,
        proactive: None,
        drop_caches: None,
        hog: None,
        ..MemoryConfig::default()
    }
}

/// A task that creates `count` dirty objects, charging each, yielding between them.
fn fill(env: Rc<dyn Env>, cache: Rc<TestCache>, count: usize, locked: bool) {
    let task_env = env.clone();
    env.spawn(
        "filler",
        TaskKind::Workload,
        Box::pin(async move {
            for _ in 0..count {
                task_env.memory_charge(OBJECT).await;
                cache.objects.borrow_mut().push(Some(Object { state: State::Dirty, locked }));
                task_env.sleep(20_000).await;
            }
        }),
    );
}

#[test]
fn direct_reclaim_writes_back_and_evicts_to_stay_near_the_limit() {
    let high = 1 << 20;
    let world = world(quiet(high), 1);
    let cache = TestCache::new(world.env());
    fill(world.env(), cache.clone(), 512, false); // 8 MiB through a 1 MiB budget
    assert_eq!(world.run(None), Stop::WorkloadDone);
    let memory = world.memory();
    let direct = memory.actor("direct");
    assert!(direct.written_bytes > 0, "direct reclaim must start writeback of dirty objects");
    assert!(direct.freed_bytes > 4 << 20, "direct reclaim must evict what was written: {direct:?}");
    assert!(*cache.written.borrow() > 4 << 20, "the device completed the writes");
    // Over the limit only by what was in flight to the device when reclaim ran.
    let peak = memory.summary()["peak_bytes"].as_u64().unwrap();
    assert!(peak <= 2 * high, "peak {peak} far over memory.high {high}");
    assert_eq!(*cache.bad_evictions.borrow(), 0);
}

#[test]
fn kswapd_reclaims_in_the_background_between_its_watermarks() {
    let high = 4 << 20;
    let mut config = quiet(high);
    config.kswapd =
        Some(KswapdConfig { period_ns: 1_000_000, wake_above_bytes: 2 << 20, stop_below_bytes: 1 << 20 });
    let world = world(config, 2);
    let cache = TestCache::new(world.env());
    fill(world.env(), cache.clone(), 256, false); // 4 MiB, never over high on its own
    assert_eq!(world.run(None), Stop::WorkloadDone);
    let memory = world.memory();
    assert!(memory.actor("kswapd").passes > 0);
    assert!(memory.actor("kswapd").freed_bytes > 0, "kswapd evicted: {:?}", memory.actor("kswapd"));
    assert_eq!(memory.actor("direct").passes, 0, "kswapd kept usage under high");
}

#[test]
fn drop_caches_frees_only_clean_objects_and_writes_nothing() {
    let mut config = quiet(64 << 20);
    config.drop_caches = Some(DropCachesConfig { mean_interval_ns: 500_000 });
    config.proactive = Some(ProactiveConfig { mean_interval_ns: 2_000_000, bytes: 256 << 10 });
    let world = world(config, 3);
    let cache = TestCache::new(world.env());
    fill(world.env(), cache.clone(), 200, false);
    assert_eq!(world.run(None), Stop::WorkloadDone);
    let memory = world.memory();
    let drop_caches = memory.actor("drop_caches");
    assert!(drop_caches.passes > 0);
    assert_eq!(drop_caches.written_bytes, 0, "drop_caches never writes");
    assert!(memory.actor("proactive").written_bytes > 0, "proactive reclaim writes back dirty objects");
    assert!(drop_caches.freed_bytes > 0, "objects made clean by proactive writeback are dropped");
    assert_eq!(*cache.bad_evictions.borrow(), 0);
}

#[test]
fn a_memory_hog_squeezes_the_filesystem() {
    let mut config = quiet(4 << 20);
    config.hog = Some(HogConfig { period_ns: 200_000, max_bytes: 4 << 20, step_bytes: 2 << 20 });
    let world = world(config, 4);
    let cache = TestCache::new(world.env());
    fill(world.env(), cache.clone(), 150, false); // 2.3 MiB: fits alone, not beside the hog
    assert_eq!(world.run(None), Stop::WorkloadDone);
    let direct = world.memory().actor("direct");
    assert!(direct.freed_bytes + direct.written_bytes > 0, "the hog's pressure forced reclaim: {direct:?}");
}

#[test]
fn when_nothing_can_be_reclaimed_the_charger_is_throttled_not_killed() {
    let world = world(quiet(1 << 20), 5);
    let cache = TestCache::new(world.env());
    fill(world.env(), cache.clone(), 128, true); // locked objects: reclaim cannot free them
    assert_eq!(world.run(None), Stop::WorkloadDone);
    let summary = world.memory().summary();
    assert!(summary["throttles"].as_u64().unwrap() > 0);
    assert!(summary["throttle_ns"].as_u64().unwrap() > 0);
    assert_eq!(cache.objects.borrow().iter().flatten().count(), 128, "nothing locked was evicted");
}

/// With `memcg_charge_batch_bytes` the budget is a cgroup's `memory.high`:
/// charges over it inside an operation only add to the task's debt, paid on
/// its return to user space (the `Workload` switch point), unless the debt
/// passes the batch, which is paid at once.
#[test]
fn under_memory_high_a_task_pays_its_debt_on_return_to_user_or_past_the_batch() {
    let mut config = quiet(256 << 10);
    config.memcg_charge_batch_bytes = Some(256 << 10);
    let world = world(config, 6);
    let cache = TestCache::new(world.env());
    // Direct reclaim passes seen by the task: after filling to the limit,
    // after 8 more objects (128 KiB of debt), after returning to user
    // space, then after 17 objects in one operation (272 KiB of debt).
    let seen: Rc<RefCell<Vec<u64>>> = Rc::default();
    let (task_env, task_world, task_seen) = (world.env(), world.clone(), seen.clone());
    let charge = move |n: usize| {
        let (env, cache) = (task_env.clone(), cache.clone());
        async move {
            for _ in 0..n {
                env.memory_charge(OBJECT).await;
                cache.objects.borrow_mut().push(Some(Object { state: State::Dirty, locked: false }));
            }
        }
    };
    let env = world.env();
    env.spawn(
        "op",
        TaskKind::Workload,
        Box::pin(async move {
            let passes = || task_world.memory().actor("direct").passes;
            charge(16).await;
            task_seen.borrow_mut().push(passes());
            charge(8).await;
            task_seen.borrow_mut().push(passes());
            task_world.env().switch_point(engine::env::SwitchPoint::Workload).await;
            task_seen.borrow_mut().push(passes());
            charge(17).await;
            task_seen.borrow_mut().push(passes());
        }),
    );
    assert_eq!(world.run(None), Stop::WorkloadDone);
    assert_eq!(*seen.borrow(), [0, 0, 1, 2]);
}
