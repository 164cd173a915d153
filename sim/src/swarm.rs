//! Swarm testing (Groce et al., "Swarm Testing", ISSTA 2012): instead of
//! running every seed in one configuration, each seed also draws its own
//! world: scheduler and PCT depth, memory budget, which reclaim actors run
//! and how hard, device latencies, queue depth, cache size and latency
//! faults. Rare regimes (one reclaim actor alone, a tiny cache, PCT with a
//! deep bug depth) then get explored too. The draw comes from the seed's
//! `swarm` stream, on top of what the scenario itself draws; the result is
//! recorded in full in the run's configuration (and so in its seed file),
//! so a swarm run replays like any other.
//!
//! I/O error rates stay at the scenario's: an injected EIO legitimately
//! aborts a transaction, which the oracles would count as a failure.

use rand::Rng;
use scenarios::Scenario;
use scenarios::streams::stream;
use serde_json::{Value, json};

/// The scenario's parameters for `seed`, with a swarm-drawn world merged
/// over its `world` overrides.
pub fn params(scenario: &dyn Scenario, seed: u64) -> Value {
    let mut params = scenario.configure(seed);
    let drawn = world(seed);
    if let Some(object) = params.as_object_mut() {
        let slot = object.entry("world").or_insert_with(|| json!({}));
        if slot.is_null() {
            *slot = json!({});
        }
        crate::runner::merge(slot, &drawn);
    }
    params
}

/// The world overrides seed `seed` draws.
pub fn world(seed: u64) -> Value {
    let mut rng = stream(seed, "swarm");
    let scheduler = if rng.random_bool(0.5) {
        json!({ "strategy": "random" })
    } else {
        let depth = rng.random_range(1..=5u32);
        let steps = [1_000u64, 10_000, 100_000][rng.random_range(0..3)];
        json!({ "strategy": "pct", "depth": depth, "steps": steps })
    };
    let high_bytes: u64 =
        [128u64 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20, 64 << 20][rng.random_range(0..6)];
    // Each actor runs with probability 1/2; its intensity spans two decades.
    let actor = |rng: &mut rand_chacha::ChaCha8Rng, config: Value| {
        if rng.random_bool(0.5) { config } else { Value::Null }
    };
    let kswapd_period = rng.random_range(20_000..5_000_000u64);
    let kswapd = actor(
        &mut rng,
        json!({ "period_ns": kswapd_period, "wake_above_bytes": high_bytes / 2, "stop_below_bytes": high_bytes / 4 }),
    );
    let flusher_period = rng.random_range(1_000_000..5_000_000_000u64);
    let expire_periods = rng.random_range(1..=6u32);
    let flusher = actor(
        &mut rng,
        json!({ "period_ns": flusher_period, "background_bytes": high_bytes / 10, "expire_periods": expire_periods }),
    );
    let proactive_interval = rng.random_range(50_000..5_000_000u64);
    let proactive_bytes = high_bytes / rng.random_range(1..=8u64);
    let proactive =
        actor(&mut rng, json!({ "mean_interval_ns": proactive_interval, "bytes": proactive_bytes }));
    let drop_interval = rng.random_range(500_000..50_000_000u64);
    let drop_caches = actor(&mut rng, json!({ "mean_interval_ns": drop_interval }));
    let hog = actor(
        &mut rng,
        json!({ "period_ns": 500_000, "max_bytes": high_bytes / 2, "step_bytes": high_bytes / 8 }),
    );
    let scale = [1u64, 1, 2, 5, 20][rng.random_range(0..5)];
    let latency = |min: u64, mean: u64| json!({ "min_ns": min * scale, "mean_ns": mean * scale });
    let queue_depth = [1usize, 4, 32, 128][rng.random_range(0..4)];
    let cache_bytes = [256u64 << 10, 4 << 20, 64 << 20][rng.random_range(0..3)];
    let tail_probability = [0.0, 0.001, 0.01][rng.random_range(0..3)];
    let latency_spike_probability = [0.0, 0.0001, 0.001][rng.random_range(0..3)];
    let device = json!({
        "queue_depth": queue_depth,
        "read_latency_ns": latency(60_000, 80_000),
        "write_latency_ns": latency(15_000, 20_000),
        "cache_bytes": cache_bytes,
        "tail_probability": tail_probability,
        "latency_spike_probability": latency_spike_probability,
    });
    json!({
        "scheduler": scheduler,
        "device": device,
        "memory": {
            "high_bytes": high_bytes,
            "kswapd": kswapd,
            "flusher": flusher,
            "proactive": proactive,
            "drop_caches": drop_caches,
            "hog": hog,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::derive_world_config;

    #[test]
    fn every_seed_draws_a_valid_world_and_seeds_differ() {
        let scenario = scenarios::by_name("cow-amplification").unwrap();
        let worlds: Vec<_> = (0..64)
            .map(|seed| derive_world_config(&params(&*scenario, seed)).expect("a swarm world parses"))
            .collect();
        assert_eq!(derive_world_config(&params(&*scenario, 3)).unwrap(), worlds[3], "a draw is reproducible");
        let distinct = |f: &dyn Fn(&crate::world::WorldConfig) -> String| {
            worlds.iter().map(f).collect::<std::collections::BTreeSet<_>>().len()
        };
        assert!(distinct(&|w| format!("{:?}", w.scheduler)) > 4);
        assert!(distinct(&|w| w.memory.high_bytes.to_string()) >= 4);
        assert!(distinct(&|w| format!("{:?}", (w.memory.kswapd.is_some(), w.memory.hog.is_some()))) == 4);
        assert!(distinct(&|w| w.device.queue_depth.to_string()) == 4);
    }
}
