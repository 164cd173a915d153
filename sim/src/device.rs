//! A simulated NVMe SSD: a pure, deterministic state machine driven by time.
//!
//! The device never reads a clock, never uses OS randomness, threads or hash
//! maps. Time only moves when the caller says so ([`Device::submit`],
//! [`Device::advance`], [`Device::power_loss`] all take `now_ns`), and every
//! random decision is drawn from the `ChaCha8Rng` given to [`Device::new`],
//! in a fixed order, so one seed reproduces one run bit for bit. Latency draws
//! use only IEEE-exact floating point operations (`+ - * /`, no `ln` from the
//! platform's libm), so a seed replays the same on every machine.
//!
//! # Model
//!
//! - **Queue.** One NVMe queue pair with `queue_depth` slots. A submitted bio
//!   is validated first (offset and length multiples of [`SECTOR_SIZE`],
//!   length > 0, inside `size_bytes`); an invalid bio completes at once with
//!   [`BioStatus::IoError`] and takes no slot. A valid bio takes a free slot
//!   (is *dispatched*) or waits in a FIFO software queue (the host's blk-mq
//!   queue) until one frees. Latency is counted from dispatch. Commands
//!   complete in the order of their completion times, not of submission.
//! - **Latency.** Each command draws `min + Exp(mean - min)` from its
//!   [`LatencyDist`] (capped at 20 × mean), plus transfer time for bytes beyond
//!   the first 4 KiB at `transfer_bytes_per_sec`; then with
//!   `tail_probability` it is multiplied by `tail_multiplier`; then with
//!   `latency_spike_probability` `latency_spike_ns` is added. A write with
//!   `preflush` also pays one FLUSH latency draw.
//! - **Volatile write cache.** A plain write completes into the volatile cache
//!   (its data becomes visible to reads when it completes). A FUA write
//!   completes straight to media. The cache holds every cached version of a
//!   sector (newest wins for reads); it is bounded by `cache_bytes`: a write
//!   whose completion time has come but that does not fit waits (holding its
//!   slot) until enough has left the cache, in FIFO order. A write larger than
//!   the whole cache is let in when the cache is empty.
//! - **Background drain.** The cache drains to media, oldest write first, at
//!   `drain_bytes_per_sec` (one write per drain step; 0 disables the drain,
//!   then only a FLUSH or a FUA write empties the cache, and a write that does
//!   not fit waits for a FLUSH). Drained data is on media: durable.
//! - **FLUSH.** When a FLUSH (or the flush part of a `preflush` write) is
//!   dispatched it takes a mark: every write that completed before that
//!   instant. When it completes, every marked write still in the cache is
//!   written to media. Writes that completed after the dispatch are not
//!   covered. A `preflush` write does its flush part when its latency has
//!   elapsed, just before its own data is written.
//! - **Media.** Sparse: a `BTreeMap` from sector number to 512 bytes; sectors
//!   never written read as zeros. Writing a version of a sector to media
//!   discards every older version of that sector from the cache (the FTL maps
//!   the LBA to the newest data), so an older cached write can never come back
//!   over newer durable data.
//!
//! # Fault model
//!
//! - **Read error** (`read_error_probability`, drawn at dispatch): the read
//!   completes with `IoError`.
//! - **Write error** (`write_error_probability`, drawn at dispatch): the write
//!   completes with `IoError` and its data is not written. Its preflush part,
//!   if any, still happens.
//! - **Latency tail and spikes**: see Latency above.
//! - **Power loss** ([`Device::power_loss`]): every command not yet completed
//!   is lost and its completion is never reported; commands still in the
//!   software queue never reached the device and write nothing. Every write
//!   that is not durable — each write still in the volatile cache, and each
//!   dispatched write not yet completed (that did not draw a write error) —
//!   is independently *kept*, *dropped* or *torn*, 1/3 each; a torn write
//!   keeps each aligned atomic unit (`atomic_write_bytes`, 4 KiB by default,
//!   at least one 512-byte sector) independently with probability 1/2.
//!   Per sector the newest surviving version wins; if none survives the sector
//!   keeps its media contents (older durable data or zeros), never garbage.
//!   Afterwards the device has power again, no in-flight state and an empty
//!   cache.
//!
//! **Durability rule** (what an oracle may rely on, as in fstests and
//! CrashMonkey): a write is durable if (a) it was written with FUA and
//! completed, or (b) it completed before a FLUSH was dispatched and that FLUSH
//! has completed (a `preflush` write counts as such a FLUSH for the writes
//! completed before it was dispatched). After a power loss, each sector holds
//! the newest rule-durable version (or zeros if none), or one of the versions
//! written after it. The drain may make more survive; oracles must not rely
//! on that. `plp` only selects the latency defaults: the cache stays volatile
//! on power loss even with `plp = true`, so the rule is tested the same way.
//!
//! # Configuration units
//!
//! Every [`DeviceConfig`] field carries its unit in its name: `_bytes` bytes,
//! `_ns` nanoseconds, `_bytes_per_sec` bytes per second, `_probability` a
//! probability in `[0, 1]` drawn once per command, `queue_depth` a count of
//! commands, `tail_multiplier` a plain factor.

use std::collections::{BTreeMap, VecDeque};

use engine::env::{Bio, BioStatus, SECTOR_SIZE};
use hdrhistogram::Histogram;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

const SECTOR: usize = SECTOR_SIZE as usize;
type Sector = [u8; SECTOR];

const NS_PER_SEC: u128 = 1_000_000_000;
/// Latency distributions describe a 4 KiB command; bytes beyond this pay
/// transfer time.
const BASE_TRANSFER_BYTES: u64 = 4096;
/// A latency draw is capped at this many times the distribution's mean.
const LATENCY_CAP_FACTOR: u64 = 20;

/// A latency distribution: `min_ns` plus an exponential draw whose mean is
/// `mean_ns - min_ns`, so the distribution's mean is `mean_ns` (TigerBeetle
/// style), capped at 20 × `mean_ns`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyDist {
    /// Smallest latency, in nanoseconds.
    pub min_ns: u64,
    /// Mean latency, in nanoseconds (at least `min_ns`; if lower, the
    /// latency is always `min_ns`).
    pub mean_ns: u64,
}

impl LatencyDist {
    pub const fn new(min_ns: u64, mean_ns: u64) -> LatencyDist {
        LatencyDist { min_ns, mean_ns }
    }

    /// Always exactly `ns`.
    pub const fn fixed(ns: u64) -> LatencyDist {
        LatencyDist { min_ns: ns, mean_ns: ns }
    }

    /// Largest value [`LatencyDist::sample`] returns.
    pub fn cap_ns(&self) -> u64 {
        self.min_ns.max(self.mean_ns.saturating_mul(LATENCY_CAP_FACTOR))
    }

    /// Draw one latency in nanoseconds. Always consumes exactly one `u64`
    /// from `rng`, whatever the parameters.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u = unit_f64(rng.random::<u64>()); // [0, 1)
        let exp1 = -det_ln(1.0 - u); // Exp(1), >= 0
        let excess_mean = self.mean_ns.saturating_sub(self.min_ns) as f64;
        // `as u64` saturates for large or non-finite values.
        let excess = (exp1 * excess_mean) as u64;
        self.min_ns.saturating_add(excess).min(self.cap_ns())
    }
}

/// The top 53 bits of `bits` as a float in `[0, 1)`.
fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Natural logarithm of a positive, finite `x`, computed with IEEE-exact
/// operations only, so it gives the same bits on every platform (the
/// platform's `f64::ln` need not).
fn det_ln(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return if x == 0.0 { f64::NEG_INFINITY } else { f64::NAN };
    }
    let mut x = x;
    let mut exp: i64 = 0;
    // Bring subnormals into the normal range.
    if x < f64::MIN_POSITIVE {
        x *= (1u64 << 54) as f64;
        exp -= 54;
    }
    let bits = x.to_bits();
    exp += ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52)); // [1, 2)
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        exp += 1;
    }
    // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut k = 1.0;
    for _ in 0..14 {
        sum += term / k;
        term *= s2;
        k += 2.0;
    }
    exp as f64 * std::f64::consts::LN_2 + 2.0 * sum
}

/// True with probability `p`. Always consumes exactly one `u64` from `rng`,
/// so that changing a probability does not shift later draws.
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    let bits: u64 = rng.random();
    if p >= 1.0 {
        true
    } else if p > 0.0 {
        unit_f64(bits) < p
    } else {
        false
    }
}

/// The device's parameters. Units are in the field names (see the module
/// documentation); defaults come from harness-anchors.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Capacity in bytes (sparse: only written sectors take memory).
    pub size_bytes: u64,
    /// Commands the device holds at once (one queue pair); 0 counts as 1.
    pub queue_depth: usize,
    /// 4 KiB read, from dispatch to completion.
    pub read_latency_ns: LatencyDist,
    /// 4 KiB write into the volatile cache.
    pub write_latency_ns: LatencyDist,
    /// FLUSH (also the flush part of a `preflush` write).
    pub flush_latency_ns: LatencyDist,
    /// 4 KiB FUA write (to media).
    pub fua_write_latency_ns: LatencyDist,
    /// Transfer rate for bytes of a command beyond the first 4 KiB; 0 means
    /// no transfer time.
    pub transfer_bytes_per_sec: u64,
    /// Size of the volatile write cache in bytes.
    pub cache_bytes: u64,
    /// Background drain rate of the cache to media in bytes per second; 0
    /// disables the drain.
    pub drain_bytes_per_sec: u64,
    /// Probability that a command's latency is multiplied by
    /// `tail_multiplier`.
    pub tail_probability: f64,
    /// Factor applied to a tail latency.
    pub tail_multiplier: u64,
    /// Probability that a read completes with an I/O error.
    pub read_error_probability: f64,
    /// Probability that a write completes with an I/O error (its data is not
    /// written).
    pub write_error_probability: f64,
    /// Probability that `latency_spike_ns` is added to a command's latency.
    pub latency_spike_probability: f64,
    /// Added latency of a spike, in nanoseconds.
    pub latency_spike_ns: u64,
    /// Atomic write unit on power fail (NVMe AWUPF), bytes: a torn write
    /// loses or keeps each aligned unit of this size whole. 4096 by default
    /// (flash programs whole pages); 512 models a drive that promises one
    /// logical sector only.
    #[serde(default = "default_atomic_write_bytes")]
    pub atomic_write_bytes: u64,
    /// Power-loss protection. Selects the latency defaults in
    /// [`DeviceConfig::with_plp`] (FLUSH and FUA fast); the cache is treated
    /// as volatile on power loss either way.
    pub plp: bool,
}

fn default_atomic_write_bytes() -> u64 {
    4096
}

impl DeviceConfig {
    /// Defaults for a drive with (`true`, enterprise) or without (`false`,
    /// consumer) power-loss protection.
    pub fn with_plp(plp: bool) -> DeviceConfig {
        const US: u64 = 1_000;
        const MS: u64 = 1_000_000;
        DeviceConfig {
            size_bytes: 1 << 30,
            queue_depth: 64,
            // 4 KiB read at QD1: 80-100 us (85 us Intel P4500).
            read_latency_ns: LatencyDist::new(70 * US, 85 * US),
            // Write into the device cache: about 20 us.
            write_latency_ns: LatencyDist::new(12 * US, 20 * US),
            // FLUSH: under 50 us with PLP, 1-20 ms without.
            flush_latency_ns: if plp {
                LatencyDist::new(10 * US, 30 * US)
            } else {
                LatencyDist::new(MS, 4 * MS)
            },
            // FUA write: a cached write with PLP; a NAND program without.
            fua_write_latency_ns: if plp {
                LatencyDist::new(15 * US, 25 * US)
            } else {
                LatencyDist::new(100 * US, 400 * US)
            },
            transfer_bytes_per_sec: 2_000_000_000,
            cache_bytes: 64 << 20,
            drain_bytes_per_sec: 1 << 30,
            tail_probability: 1e-3,
            tail_multiplier: 10,
            read_error_probability: 0.0,
            write_error_probability: 0.0,
            latency_spike_probability: 0.0,
            latency_spike_ns: 5 * MS,
            atomic_write_bytes: default_atomic_write_bytes(),
            plp,
        }
    }
}

impl Default for DeviceConfig {
    /// A consumer drive: no power-loss protection.
    fn default() -> DeviceConfig {
        DeviceConfig::with_plp(false)
    }
}

/// What a power loss did to the writes at risk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerLossReport {
    /// Non-durable writes kept whole.
    pub writes_kept: u64,
    /// Non-durable writes dropped whole (including dispatched writes that had
    /// drawn a write error).
    pub writes_dropped: u64,
    /// Non-durable writes torn at sector granularity.
    pub writes_torn: u64,
    /// Commands whose completion will never be reported: dispatched and not
    /// completed, plus those still in the software queue.
    pub inflight_lost: u64,
}

/// Counters and latency histograms. Operation names are [`Bio::op_name`]:
/// `read`, `write`, `write_fua`, `flush`.
#[derive(Clone, Debug, Default)]
pub struct DeviceStats {
    /// Submission to completion (what the host sees), per op, in ns.
    pub latency_ns: BTreeMap<&'static str, Histogram<u64>>,
    /// Dispatch to completion (device service time), per op, in ns.
    pub service_ns: BTreeMap<&'static str, Histogram<u64>>,
    /// Completed commands per op (valid bios only).
    pub commands: BTreeMap<&'static str, u64>,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes of successful writes.
    pub bytes_written: u64,
    pub read_errors_injected: u64,
    pub write_errors_injected: u64,
    /// Misaligned, empty or out-of-range bios (completed with `IoError`).
    pub invalid_bios: u64,
    /// Commands whose latency was multiplied by the tail factor.
    pub tail_latencies: u64,
    pub latency_spikes: u64,
    /// Writes that had to wait for room in the cache.
    pub cache_full_stalls: u64,
    /// Bytes moved from cache to media by the background drain.
    pub bytes_drained: u64,
    /// Bytes moved from cache to media by FLUSHes.
    pub bytes_flushed: u64,
    pub power_losses: u64,
    /// Highest number of commands dispatched at once.
    pub max_in_flight: usize,
    /// Highest number of commands waiting in the software queue.
    pub max_queued: usize,
}

fn new_histogram() -> Histogram<u64> {
    // Three significant figures, auto-resizing: cannot fail.
    Histogram::new(3).expect("3 significant figures is a valid histogram precision")
}

/// Record into an auto-resizing histogram (`saturating_record` would clamp
/// to the current bounds instead of growing them).
fn record_value(h: &mut Histogram<u64>, value: u64) {
    if h.record(value).is_err() {
        h.saturating_record(value);
    }
}

impl DeviceStats {
    fn record(&mut self, op: &'static str, latency_ns: u64, service_ns: u64) {
        record_value(self.latency_ns.entry(op).or_insert_with(new_histogram), latency_ns);
        record_value(self.service_ns.entry(op).or_insert_with(new_histogram), service_ns);
        *self.commands.entry(op).or_insert(0) += 1;
    }

    /// `{"ops": {op: {count, p50_ns, p99_ns, max_ns}}, ...counters}`; the
    /// percentiles are of submission-to-completion latency.
    pub fn summary(&self) -> serde_json::Value {
        let mut ops = serde_json::Map::new();
        for (op, h) in &self.latency_ns {
            ops.insert(
                (*op).to_string(),
                serde_json::json!({
                    "count": self.commands.get(op).copied().unwrap_or(0),
                    "p50_ns": h.value_at_quantile(0.5),
                    "p99_ns": h.value_at_quantile(0.99),
                    "max_ns": h.max(),
                }),
            );
        }
        serde_json::json!({
            "ops": ops,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "read_errors_injected": self.read_errors_injected,
            "write_errors_injected": self.write_errors_injected,
            "invalid_bios": self.invalid_bios,
            "tail_latencies": self.tail_latencies,
            "latency_spikes": self.latency_spikes,
            "cache_full_stalls": self.cache_full_stalls,
            "bytes_drained": self.bytes_drained,
            "bytes_flushed": self.bytes_flushed,
            "power_losses": self.power_losses,
            "max_in_flight": self.max_in_flight,
            "max_queued": self.max_queued,
        })
    }
}

/// A bio waiting in the software queue.
struct Queued {
    id: u64,
    submit_ns: u64,
    bio: Bio,
}

/// A dispatched command.
struct Cmd {
    id: u64,
    submit_ns: u64,
    dispatch_ns: u64,
    /// Dispatch order, for power loss and unique keys.
    dispatch_no: u64,
    op: &'static str,
    kind: CmdKind,
}

enum CmdKind {
    Read {
        offset_bytes: u64,
        len_bytes: u64,
        error: bool,
    },
    Write {
        offset_bytes: u64,
        data: Vec<u8>,
        fua: bool,
        /// The flush part of a `preflush` write, until it has been done:
        /// cached writes with a sequence number below this are covered.
        preflush_mark: Option<u64>,
        error: bool,
    },
    Flush {
        mark: u64,
    },
}

/// A completed, non-durable write in the volatile cache.
struct CacheWrite {
    first_sector: u64,
    data: Vec<u8>,
    /// Sectors of this write still in the cache (not superseded by a durable
    /// newer version and not yet written to media).
    live_sectors: u64,
}

/// The simulated NVMe SSD. See the module documentation.
pub struct Device {
    config: DeviceConfig,
    rng: ChaCha8Rng,
    now_ns: u64,
    /// Host software queue (FIFO), waiting for a free slot.
    queued: VecDeque<Queued>,
    /// Dispatched commands by (completion time, id, dispatch number).
    pending: BTreeMap<(u64, u64, u64), Cmd>,
    /// Writes whose latency has elapsed, waiting for room in the cache (they
    /// keep their slot), FIFO.
    stalled: VecDeque<Cmd>,
    /// Completions that happened but have not been returned by `advance`.
    ready: Vec<(u64, BioStatus)>,
    next_dispatch_no: u64,
    /// Durable contents, by sector number.
    media: BTreeMap<u64, Sector>,
    /// Volatile cache: writes by sequence number (completion order).
    cache: BTreeMap<u64, CacheWrite>,
    /// Sector number -> sequence numbers of its cached versions, ascending.
    versions: BTreeMap<u64, Vec<u64>>,
    /// Bytes of live sectors in the cache.
    cache_used_bytes: u64,
    /// Sequence number of the next write to enter the cache.
    next_seq: u64,
    /// When the drain started on the oldest cached write.
    drain_clock_ns: u64,
    stats: DeviceStats,
}

impl Device {
    pub fn new(config: DeviceConfig, rng: ChaCha8Rng) -> Device {
        Device {
            config,
            rng,
            now_ns: 0,
            queued: VecDeque::new(),
            pending: BTreeMap::new(),
            stalled: VecDeque::new(),
            ready: Vec::new(),
            next_dispatch_no: 0,
            media: BTreeMap::new(),
            cache: BTreeMap::new(),
            versions: BTreeMap::new(),
            cache_used_bytes: 0,
            next_seq: 0,
            drain_clock_ns: 0,
            stats: DeviceStats::default(),
        }
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The device's current time: the latest `now_ns` it was given.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// Submit command `id` (unique, chosen by caller) at time `now_ns`. If
    /// the queue is full it waits in a software queue (FIFO) and is
    /// dispatched when a slot frees; its latency counts from dispatch.
    /// Validates alignment/range: a misaligned, empty or out-of-range bio
    /// completes with `BioStatus::IoError` at `now_ns` (never panics).
    ///
    /// Events due before `now_ns` are processed first; their completions are
    /// kept for the next [`Device::advance`]. A `now_ns` earlier than the
    /// device's time counts as the device's time.
    pub fn submit(&mut self, now_ns: u64, id: u64, bio: Bio) {
        self.process_until(now_ns);
        if !self.valid(&bio) {
            self.stats.invalid_bios += 1;
            self.ready.push((id, BioStatus::IoError));
            return;
        }
        self.queued.push_back(Queued { id, submit_ns: self.now_ns, bio });
        self.dispatch_queued();
        self.stats.max_queued = self.stats.max_queued.max(self.queued.len());
    }

    /// Time of the next internal event (a completion or a cache drain step),
    /// if any. If completions are waiting to be returned, the device's
    /// current time. `None` with commands in flight means they wait for
    /// something that will not happen by itself (a write waiting for room in
    /// the cache with the drain disabled and no FLUSH in flight).
    pub fn next_event_ns(&self) -> Option<u64> {
        if !self.ready.is_empty() {
            return Some(self.now_ns);
        }
        let completion = self.pending.first_key_value().map(|(k, _)| k.0);
        match (completion, self.next_drain_ns()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Process everything due at or before `now_ns`; return completions in
    /// the order they happened (simultaneous completions in order of id; a
    /// write let into the cache by a drain step or a FLUSH completes right
    /// after it). This order is also the order in which writes entered the
    /// cache. Completions may come back in any order relative to submission.
    pub fn advance(&mut self, now_ns: u64) -> Vec<(u64, BioStatus)> {
        self.process_until(now_ns);
        std::mem::take(&mut self.ready)
    }

    /// Power loss at `now_ns`. Events due at or before `now_ns` happen first;
    /// completions not yet returned by [`Device::advance`] are discarded
    /// (call `advance(now_ns)` first to collect them). Every command not yet
    /// completed is lost; every non-durable write is kept, dropped or torn
    /// (see the module documentation). Afterwards the device has no in-flight
    /// state and an empty cache.
    pub fn power_loss(&mut self, now_ns: u64) -> PowerLossReport {
        self.process_until(now_ns);
        let mut report = PowerLossReport {
            inflight_lost: (self.pending.len() + self.stalled.len() + self.queued.len()) as u64,
            ..PowerLossReport::default()
        };

        // Writes at risk, oldest first: (first sector, data, live mask).
        let mut at_risk: Vec<(u64, Vec<u8>, Vec<bool>)> = Vec::new();
        let cache = std::mem::take(&mut self.cache);
        for (seq, w) in cache {
            let n = w.data.len() as u64 / SECTOR_SIZE;
            let live = (0..n)
                .map(|i| {
                    self.versions.get(&(w.first_sector + i)).is_some_and(|v| v.binary_search(&seq).is_ok())
                })
                .collect();
            at_risk.push((w.first_sector, w.data, live));
        }
        let mut inflight: Vec<Cmd> = std::mem::take(&mut self.pending).into_values().collect();
        inflight.extend(std::mem::take(&mut self.stalled));
        inflight.sort_by_key(|c| c.dispatch_no);
        for cmd in inflight {
            if let CmdKind::Write { offset_bytes, data, error, .. } = cmd.kind {
                if error {
                    report.writes_dropped += 1;
                } else {
                    let n = data.len() / SECTOR;
                    at_risk.push((offset_bytes / SECTOR_SIZE, data, vec![true; n]));
                }
            }
        }

        // Draw each write's fate; per sector the newest survivor wins.
        let mut survivors: BTreeMap<u64, Sector> = BTreeMap::new();
        for (first, data, live) in at_risk {
            let fate = self.rng.random_range(0..3u32);
            let keep: Vec<bool> = match fate {
                0 => {
                    report.writes_kept += 1;
                    vec![true; live.len()]
                }
                1 => {
                    report.writes_dropped += 1;
                    vec![false; live.len()]
                }
                _ => {
                    report.writes_torn += 1;
                    // Sectors of one aligned atomic unit survive or vanish together.
                    let sectors_per_unit = (self.config.atomic_write_bytes / SECTOR_SIZE).max(1);
                    let mut units: BTreeMap<u64, bool> = BTreeMap::new();
                    let mut keep = Vec::with_capacity(live.len());
                    for i in 0..live.len() as u64 {
                        let unit = (first + i) / sectors_per_unit;
                        keep.push(*units.entry(unit).or_insert_with(|| self.rng.random_bool(0.5)));
                    }
                    keep
                }
            };
            for (i, chunk) in data.chunks_exact(SECTOR).enumerate() {
                if live[i] && keep[i] {
                    let mut s = [0u8; SECTOR];
                    s.copy_from_slice(chunk);
                    survivors.insert(first + i as u64, s);
                }
            }
        }
        self.media.extend(survivors);

        self.versions.clear();
        self.cache_used_bytes = 0;
        self.queued.clear();
        self.ready.clear();
        self.drain_clock_ns = self.now_ns;
        self.stats.power_losses += 1;
        report
    }

    /// What a read of the range would return right now (newest data: cache
    /// over media; zeros where nothing was written). Any byte range is
    /// accepted. For oracles and tests.
    pub fn peek(&self, offset_bytes: u64, len_bytes: u64) -> Vec<u8> {
        let mut out = vec![0u8; len_bytes as usize];
        let end = offset_bytes.saturating_add(len_bytes);
        let mut pos = offset_bytes;
        while pos < end {
            let sector = pos / SECTOR_SIZE;
            let in_sector = (pos % SECTOR_SIZE) as usize;
            let take = (SECTOR - in_sector).min((end - pos) as usize);
            let dst = (pos - offset_bytes) as usize;
            if let Some(src) = self.sector_data(sector) {
                out[dst..dst + take].copy_from_slice(&src[in_sector..in_sector + take]);
            }
            pos += take as u64;
        }
        out
    }

    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Commands dispatched to the device and not completed (at most
    /// `queue_depth`), including writes waiting for room in the cache.
    pub fn in_flight(&self) -> usize {
        self.pending.len() + self.stalled.len()
    }

    /// Commands waiting in the software queue for a free slot.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Bytes in the volatile cache (not durable).
    pub fn cache_used_bytes(&self) -> u64 {
        self.cache_used_bytes
    }

    /// Sectors stored on media (the sparse map's size).
    pub fn media_sectors(&self) -> usize {
        self.media.len()
    }

    // ---- internals ------------------------------------------------------

    fn valid(&self, bio: &Bio) -> bool {
        let in_range = |offset: u64, len: u64| {
            len > 0
                && offset.is_multiple_of(SECTOR_SIZE)
                && len.is_multiple_of(SECTOR_SIZE)
                && offset.checked_add(len).is_some_and(|end| end <= self.config.size_bytes)
        };
        match bio {
            Bio::Read { offset_bytes, len_bytes } => in_range(*offset_bytes, u64::from(*len_bytes)),
            Bio::Write { offset_bytes, data, .. } => in_range(*offset_bytes, data.len() as u64),
            Bio::Flush => true,
        }
    }

    fn queue_depth(&self) -> usize {
        self.config.queue_depth.max(1)
    }

    fn transfer_ns(&self, len_bytes: u64) -> u64 {
        let rate = self.config.transfer_bytes_per_sec;
        if rate == 0 {
            return 0;
        }
        let extra = u128::from(len_bytes.saturating_sub(BASE_TRANSFER_BYTES));
        u64::try_from((extra * NS_PER_SEC).div_ceil(u128::from(rate))).unwrap_or(u64::MAX)
    }

    fn dispatch_queued(&mut self) {
        while self.in_flight() < self.queue_depth() {
            let Some(q) = self.queued.pop_front() else {
                break;
            };
            self.dispatch(q);
        }
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight());
    }

    fn dispatch(&mut self, q: Queued) {
        let op = q.bio.op_name();
        let (mut latency, kind) = match q.bio {
            Bio::Read { offset_bytes, len_bytes } => {
                let len = u64::from(len_bytes);
                let latency =
                    self.config.read_latency_ns.sample(&mut self.rng).saturating_add(self.transfer_ns(len));
                let kind = CmdKind::Read { offset_bytes, len_bytes: len, error: false };
                (latency, kind)
            }
            Bio::Write { offset_bytes, data, fua, preflush } => {
                let dist = if fua { self.config.fua_write_latency_ns } else { self.config.write_latency_ns };
                let mut latency =
                    dist.sample(&mut self.rng).saturating_add(self.transfer_ns(data.len() as u64));
                let preflush_mark = if preflush {
                    latency = latency.saturating_add(self.config.flush_latency_ns.sample(&mut self.rng));
                    Some(self.next_seq)
                } else {
                    None
                };
                let kind = CmdKind::Write { offset_bytes, data, fua, preflush_mark, error: false };
                (latency, kind)
            }
            Bio::Flush => {
                let latency = self.config.flush_latency_ns.sample(&mut self.rng);
                (latency, CmdKind::Flush { mark: self.next_seq })
            }
        };
        if chance(&mut self.rng, self.config.tail_probability) {
            latency = latency.saturating_mul(self.config.tail_multiplier.max(1));
            self.stats.tail_latencies += 1;
        }
        if chance(&mut self.rng, self.config.latency_spike_probability) {
            latency = latency.saturating_add(self.config.latency_spike_ns);
            self.stats.latency_spikes += 1;
        }
        let kind = match kind {
            CmdKind::Read { offset_bytes, len_bytes, .. } => CmdKind::Read {
                offset_bytes,
                len_bytes,
                error: chance(&mut self.rng, self.config.read_error_probability),
            },
            CmdKind::Write { offset_bytes, data, fua, preflush_mark, .. } => CmdKind::Write {
                offset_bytes,
                data,
                fua,
                preflush_mark,
                error: chance(&mut self.rng, self.config.write_error_probability),
            },
            flush => flush,
        };
        let dispatch_no = self.next_dispatch_no;
        self.next_dispatch_no += 1;
        let done_ns = self.now_ns.saturating_add(latency);
        self.pending.insert(
            (done_ns, q.id, dispatch_no),
            Cmd { id: q.id, submit_ns: q.submit_ns, dispatch_ns: self.now_ns, dispatch_no, op, kind },
        );
    }

    /// When the drain finishes writing the oldest cached write to media.
    fn next_drain_ns(&self) -> Option<u64> {
        let rate = self.config.drain_bytes_per_sec;
        if rate == 0 {
            return None;
        }
        let (_, w) = self.cache.first_key_value()?;
        let bytes = u128::from(w.live_sectors * SECTOR_SIZE);
        let ns = u64::try_from((bytes * NS_PER_SEC).div_ceil(u128::from(rate))).unwrap_or(u64::MAX);
        Some(self.drain_clock_ns.saturating_add(ns))
    }

    fn process_until(&mut self, now_ns: u64) {
        let now_ns = now_ns.max(self.now_ns);
        loop {
            let completion = self.pending.first_key_value().map(|(k, _)| k.0);
            let drain = self.next_drain_ns();
            // A drain step goes first at equal times (it may make room).
            let drain_first = match (drain, completion) {
                (Some(d), Some(c)) => d <= c,
                (Some(_), None) => true,
                _ => false,
            };
            let t = if drain_first { drain } else { completion };
            let Some(t) = t.filter(|&t| t <= now_ns) else {
                break;
            };
            self.now_ns = self.now_ns.max(t);
            if drain_first {
                self.drain_step();
            } else if let Some((_, cmd)) = self.pending.pop_first() {
                self.finish(cmd);
            }
            self.unstall();
            self.dispatch_queued();
        }
        self.now_ns = now_ns;
    }

    fn drain_step(&mut self) {
        let Some((&seq, w)) = self.cache.first_key_value() else {
            return;
        };
        self.stats.bytes_drained += w.live_sectors * SECTOR_SIZE;
        self.persist_write(seq);
        self.drain_clock_ns = self.now_ns;
    }

    fn finish(&mut self, mut cmd: Cmd) {
        match &mut cmd.kind {
            CmdKind::Read { offset_bytes, len_bytes, error } => {
                let status = if *error {
                    self.stats.read_errors_injected += 1;
                    BioStatus::IoError
                } else {
                    self.stats.bytes_read += *len_bytes;
                    BioStatus::Ok(self.peek(*offset_bytes, *len_bytes))
                };
                self.complete(&cmd, status);
            }
            CmdKind::Flush { mark } => {
                let mark = *mark;
                self.persist_before(mark);
                self.complete(&cmd, BioStatus::Ok(Vec::new()));
            }
            CmdKind::Write { offset_bytes, data, fua, preflush_mark, error } => {
                if let Some(mark) = preflush_mark.take() {
                    self.persist_before(mark);
                }
                if *error {
                    self.stats.write_errors_injected += 1;
                    self.complete(&cmd, BioStatus::IoError);
                } else if *fua {
                    let (offset, data) = (*offset_bytes, std::mem::take(data));
                    self.persist_direct(offset, &data);
                    self.stats.bytes_written += data.len() as u64;
                    self.complete(&cmd, BioStatus::Ok(Vec::new()));
                } else if !self.stalled.is_empty() || !self.fits(data.len() as u64) {
                    self.stats.cache_full_stalls += 1;
                    self.stalled.push_back(cmd);
                } else {
                    let (offset, data) = (*offset_bytes, std::mem::take(data));
                    self.stats.bytes_written += data.len() as u64;
                    self.apply_to_cache(offset, data);
                    self.complete(&cmd, BioStatus::Ok(Vec::new()));
                }
            }
        }
    }

    /// Let stalled writes into the cache while they fit, in FIFO order.
    fn unstall(&mut self) {
        while let Some(front) = self.stalled.front() {
            let len = match &front.kind {
                CmdKind::Write { data, .. } => data.len() as u64,
                _ => 0,
            };
            if !self.fits(len) {
                break;
            }
            let Some(mut cmd) = self.stalled.pop_front() else {
                break;
            };
            if let CmdKind::Write { offset_bytes, data, .. } = &mut cmd.kind {
                let (offset, data) = (*offset_bytes, std::mem::take(data));
                self.stats.bytes_written += data.len() as u64;
                self.apply_to_cache(offset, data);
            }
            self.complete(&cmd, BioStatus::Ok(Vec::new()));
        }
    }

    fn complete(&mut self, cmd: &Cmd, status: BioStatus) {
        self.stats.record(
            cmd.op,
            self.now_ns - cmd.submit_ns.min(self.now_ns),
            self.now_ns - cmd.dispatch_ns.min(self.now_ns),
        );
        self.ready.push((cmd.id, status));
    }

    fn fits(&self, len_bytes: u64) -> bool {
        self.cache_used_bytes == 0
            || self.cache_used_bytes.saturating_add(len_bytes) <= self.config.cache_bytes
    }

    fn sector_data(&self, sector: u64) -> Option<&[u8]> {
        if let Some(&seq) = self.versions.get(&sector).and_then(|v| v.last())
            && let Some(w) = self.cache.get(&seq)
        {
            let i = ((sector - w.first_sector) * SECTOR_SIZE) as usize;
            return w.data.get(i..i + SECTOR);
        }
        self.media.get(&sector).map(|s| &s[..])
    }

    fn apply_to_cache(&mut self, offset_bytes: u64, data: Vec<u8>) {
        if self.cache.is_empty() {
            self.drain_clock_ns = self.now_ns;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let first_sector = offset_bytes / SECTOR_SIZE;
        let n = data.len() as u64 / SECTOR_SIZE;
        for s in first_sector..first_sector + n {
            self.versions.entry(s).or_default().push(seq);
        }
        self.cache_used_bytes += n * SECTOR_SIZE;
        self.cache.insert(seq, CacheWrite { first_sector, data, live_sectors: n });
    }

    /// Drop cached versions of `sector` up to and including `upto` (all if
    /// `None`).
    fn discard_versions(&mut self, sector: u64, upto: Option<u64>) {
        let Some(vs) = self.versions.get_mut(&sector) else {
            return;
        };
        let cut = match upto {
            Some(seq) => vs.partition_point(|&v| v <= seq),
            None => vs.len(),
        };
        let gone: Vec<u64> = vs.drain(..cut).collect();
        if vs.is_empty() {
            self.versions.remove(&sector);
        }
        for seq in gone {
            self.cache_used_bytes -= SECTOR_SIZE;
            if let Some(w) = self.cache.get_mut(&seq) {
                w.live_sectors -= 1;
                if w.live_sectors == 0 {
                    self.cache.remove(&seq);
                }
            }
        }
    }

    /// Write the live sectors of cached write `seq` to media. Returns the
    /// bytes written.
    fn persist_write(&mut self, seq: u64) -> u64 {
        let Some(w) = self.cache.get(&seq) else {
            return 0;
        };
        let first = w.first_sector;
        let n = w.data.len() as u64 / SECTOR_SIZE;
        let mut bytes = 0;
        for i in 0..n {
            let sector = first + i;
            let live = self.versions.get(&sector).is_some_and(|v| v.binary_search(&seq).is_ok());
            if !live {
                continue;
            }
            let Some(w) = self.cache.get(&seq) else {
                break;
            };
            let mut buf = [0u8; SECTOR];
            let at = (i * SECTOR_SIZE) as usize;
            buf.copy_from_slice(&w.data[at..at + SECTOR]);
            self.media.insert(sector, buf);
            self.discard_versions(sector, Some(seq));
            bytes += SECTOR_SIZE;
        }
        bytes
    }

    /// The effect of a completed FLUSH with mark `mark`: every cached write
    /// with a smaller sequence number goes to media, oldest first.
    fn persist_before(&mut self, mark: u64) {
        let head = self.cache.first_key_value().map(|(&k, _)| k);
        let seqs: Vec<u64> = self.cache.range(..mark).map(|(&k, _)| k).collect();
        for seq in seqs {
            self.stats.bytes_flushed += self.persist_write(seq);
        }
        self.restart_drain_if_head_changed(head);
    }

    /// A FUA write: straight to media, superseding every cached version.
    fn persist_direct(&mut self, offset_bytes: u64, data: &[u8]) {
        let head = self.cache.first_key_value().map(|(&k, _)| k);
        let first = offset_bytes / SECTOR_SIZE;
        for (i, chunk) in data.chunks_exact(SECTOR).enumerate() {
            let sector = first + i as u64;
            let mut buf = [0u8; SECTOR];
            buf.copy_from_slice(chunk);
            self.media.insert(sector, buf);
            self.discard_versions(sector, None);
        }
        self.restart_drain_if_head_changed(head);
    }

    /// The drain works on the oldest cached write; if that write left the
    /// cache other than by the drain, the drain starts on the new oldest now
    /// (never in the past).
    fn restart_drain_if_head_changed(&mut self, old_head: Option<u64>) {
        let head = self.cache.first_key_value().map(|(&k, _)| k);
        if head != old_head {
            self.drain_clock_ns = self.drain_clock_ns.max(self.now_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{
        Just, ProptestConfig, Strategy, TestCaseError, any, prop, prop_assert, prop_assert_eq, prop_oneof,
        proptest,
    };
    use rand::SeedableRng;

    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Sector contents unique to (write id, sector), never all zeros.
    fn pattern(id: u64, first_sector: u64, sectors: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity((sectors * SECTOR_SIZE) as usize);
        for s in first_sector..first_sector + sectors {
            let mut sec = [(id as u8) | 0x80; SECTOR];
            sec[..8].copy_from_slice(&(id + 1).to_le_bytes());
            sec[8..16].copy_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&sec);
        }
        out
    }

    fn write(offset_bytes: u64, data: Vec<u8>, fua: bool, preflush: bool) -> Bio {
        Bio::Write { offset_bytes, data, fua, preflush }
    }

    /// Advance event by event until `id` completes; returns its time and status.
    fn run_until(dev: &mut Device, id: u64) -> (u64, BioStatus) {
        while let Some(t) = dev.next_event_ns() {
            for (done, status) in dev.advance(t) {
                if done == id {
                    return (t, status);
                }
            }
        }
        panic!("command {id} never completed");
    }

    /// Run every event; returns (time, id, status) in order.
    fn drain_all(dev: &mut Device) -> Vec<(u64, u64, BioStatus)> {
        let mut out = Vec::new();
        while let Some(t) = dev.next_event_ns() {
            for (id, st) in dev.advance(t) {
                out.push((t, id, st));
            }
        }
        out
    }

    // ---- durability rule, property test ----------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        Write { sector: u64, sectors: u64, fua: bool, preflush: bool },
        Flush,
        Advance(u64),
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..40, 1u64..=32, any::<bool>(), any::<bool>(), 0u8..4).prop_map(
                |(sector, sectors, fua, preflush, p)| Op::Write {
                    sector,
                    sectors,
                    // FUA and preflush a quarter of the time each.
                    fua: fua && p == 0,
                    preflush: preflush && p == 1,
                }
            ),
            1 => Just(Op::Flush),
            3 => prop_oneof![0u64..50 * US, 0u64..6 * MS].prop_map(Op::Advance),
        ]
    }

    #[derive(Clone, Debug)]
    struct WriteRec {
        first: u64,
        sectors: u64,
        data: Vec<u8>,
        fua: bool,
        /// (stamp, ok)
        done: Option<(u64, bool)>,
    }

    #[derive(Clone, Debug)]
    struct FlushRec {
        submit: u64,
        done: bool,
    }

    fn check_durability(
        seed: u64,
        config: DeviceConfig,
        ops: Vec<Op>,
        final_advance: u64,
    ) -> Result<(), TestCaseError> {
        let mut dev = Device::new(config, rng(seed));
        let mut now = 0u64;
        let mut stamp = 0u64;
        let mut writes: BTreeMap<u64, WriteRec> = BTreeMap::new();
        let mut flushes: BTreeMap<u64, FlushRec> = BTreeMap::new();
        let observe = |comps: Vec<(u64, BioStatus)>,
                       stamp: &mut u64,
                       writes: &mut BTreeMap<u64, WriteRec>,
                       flushes: &mut BTreeMap<u64, FlushRec>| {
            for (id, st) in comps {
                *stamp += 1;
                if let Some(w) = writes.get_mut(&id) {
                    w.done = Some((*stamp, st == BioStatus::Ok(Vec::new())));
                }
                if let Some(f) = flushes.get_mut(&id) {
                    f.done = true;
                }
            }
        };
        for (id, op) in ops.into_iter().enumerate() {
            let id = id as u64;
            match op {
                Op::Write { sector, sectors, fua, preflush } => {
                    let data = pattern(id, sector, sectors);
                    stamp += 1;
                    writes
                        .insert(id, WriteRec { first: sector, sectors, data: data.clone(), fua, done: None });
                    if preflush {
                        flushes.insert(id, FlushRec { submit: stamp, done: false });
                    }
                    dev.submit(now, id, write(sector * SECTOR_SIZE, data, fua, preflush));
                }
                Op::Flush => {
                    stamp += 1;
                    flushes.insert(id, FlushRec { submit: stamp, done: false });
                    dev.submit(now, id, Bio::Flush);
                }
                Op::Advance(dt) => {
                    now += dt;
                    let comps = dev.advance(now);
                    observe(comps, &mut stamp, &mut writes, &mut flushes);
                }
            }
        }
        now += final_advance;
        let comps = dev.advance(now);
        observe(comps, &mut stamp, &mut writes, &mut flushes);
        dev.power_loss(now);
        prop_assert_eq!(dev.in_flight(), 0);
        prop_assert_eq!(dev.queued(), 0);
        prop_assert_eq!(dev.cache_used_bytes(), 0);
        prop_assert_eq!(dev.next_event_ns(), None);

        let durable = |w: &WriteRec| -> bool {
            let Some((done, true)) = w.done else {
                return false;
            };
            w.fua || flushes.values().any(|f| f.done && done < f.submit)
        };
        for sector in 0..80u64 {
            let covering: Vec<&WriteRec> =
                writes.values().filter(|w| w.first <= sector && sector < w.first + w.sectors).collect();
            let slice = |w: &WriteRec| {
                let i = ((sector - w.first) * SECTOR_SIZE) as usize;
                w.data[i..i + SECTOR].to_vec()
            };
            let guaranteed = covering.iter().filter(|w| durable(w)).max_by_key(|w| w.done.map(|d| d.0));
            let g_stamp = guaranteed.and_then(|w| w.done).map(|d| d.0).unwrap_or(0);
            let candidates: Vec<Vec<u8>> = covering
                .iter()
                .filter(|w| match w.done {
                    None => true,
                    Some((_, false)) => false,
                    Some((d, true)) => d > g_stamp,
                })
                .map(|w| slice(w))
                .collect();
            let base = guaranteed.map(|w| slice(w)).unwrap_or_else(|| vec![0u8; SECTOR]);
            let got = dev.peek(sector * SECTOR_SIZE, SECTOR_SIZE);
            if candidates.is_empty() {
                prop_assert!(got == base, "sector {}: newest write is rule-durable but was not kept", sector);
            } else {
                prop_assert!(
                    got == base || candidates.contains(&got),
                    "sector {}: content is neither the durable value nor a later write",
                    sector
                );
            }
        }
        Ok(())
    }

    fn config_strategy() -> impl Strategy<Value = DeviceConfig> {
        (
            any::<bool>(),
            prop_oneof![Just(1usize), Just(4), Just(64)],
            prop_oneof![Just(8u64 << 10), Just(64 << 10), Just(64 << 20)],
            prop_oneof![Just(0u64), Just(20_000_000), Just(1 << 30)],
            prop_oneof![Just(0.0f64), Just(0.1)],
            prop_oneof![Just(0.0f64), Just(0.2)],
        )
            .prop_map(|(plp, qd, cache, drain, werr, tail)| {
                let mut c = DeviceConfig::with_plp(plp);
                c.queue_depth = qd;
                c.cache_bytes = cache;
                c.drain_bytes_per_sec = drain;
                c.write_error_probability = werr;
                c.tail_probability = tail;
                c
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn durability_rule_holds_after_power_loss(
            seed in any::<u64>(),
            config in config_strategy(),
            ops in prop::collection::vec(op_strategy(), 1..60),
            final_advance in prop_oneof![Just(0u64), 0u64..100 * US, 0u64..10 * MS],
        ) {
            check_durability(seed, config, ops, final_advance)?;
        }
    }

    // ---- durability, deterministic ---------------------------------------

    /// A torn write keeps or loses each aligned atomic unit whole.
    #[test]
    fn torn_writes_respect_the_atomic_write_unit() {
        for (atomic, expect_partial_units) in [(4096u64, false), (512, true)] {
            let mut partial_units = 0;
            let mut torn_seen = 0;
            for seed in 0..200 {
                let config = DeviceConfig {
                    drain_bytes_per_sec: 0,
                    atomic_write_bytes: atomic,
                    ..DeviceConfig::default()
                };
                let mut device = Device::new(config, ChaCha8Rng::seed_from_u64(seed));
                device.submit(
                    0,
                    1,
                    Bio::Write { offset_bytes: 0, data: vec![0xAB; 16384], fua: false, preflush: false },
                );
                let mut now = 0;
                while device.in_flight() > 0 {
                    now = device.next_event_ns().unwrap();
                    device.advance(now);
                }
                if device.power_loss(now).writes_torn == 0 {
                    continue;
                }
                torn_seen += 1;
                let bytes = device.peek(0, 16384);
                for unit in bytes.chunks(4096) {
                    let kept = unit.iter().filter(|&&b| b == 0xAB).count();
                    if kept != 0 && kept != unit.len() {
                        partial_units += 1;
                    }
                }
            }
            assert!(torn_seen > 20, "atomic {atomic}: only {torn_seen} torn writes");
            assert_eq!(
                partial_units > 0,
                expect_partial_units,
                "atomic {atomic}: {partial_units} partly kept 4 KiB units"
            );
        }
    }

    fn no_drain() -> DeviceConfig {
        DeviceConfig { drain_bytes_per_sec: 0, ..DeviceConfig::default() }
    }

    #[test]
    fn completed_then_flushed_write_survives_every_seed() {
        for seed in 0..300 {
            for config in [no_drain(), DeviceConfig::default()] {
                let mut dev = Device::new(config, rng(seed));
                let w = pattern(1, 0, 8);
                dev.submit(0, 1, write(0, w.clone(), false, false));
                let (t, st) = run_until(&mut dev, 1);
                assert_eq!(st, BioStatus::Ok(Vec::new()));
                dev.submit(t, 2, Bio::Flush);
                // A later write to the same place, completed after the flush
                // was issued: it may or may not survive, per sector.
                let later = pattern(3, 0, 8);
                dev.submit(t, 3, write(0, later.clone(), false, false));
                let (t, _) = run_until(&mut dev, 2);
                dev.power_loss(t);
                let got = dev.peek(0, 4096);
                for (i, chunk) in got.chunks(SECTOR).enumerate() {
                    let ok = chunk == &w[i * SECTOR..][..SECTOR] || chunk == &later[i * SECTOR..][..SECTOR];
                    assert!(ok, "seed {seed} sector {i}: lost flushed data");
                }
            }
        }
    }

    #[test]
    fn write_completed_after_flush_issued_is_sometimes_lost() {
        let (mut lost, mut kept, mut torn) = (0, 0, 0);
        // One-sector atomicity, so a 4 KiB write can tear.
        let config = DeviceConfig { atomic_write_bytes: SECTOR_SIZE, ..no_drain() };
        for seed in 0..300 {
            let mut dev = Device::new(config.clone(), rng(seed));
            let a = pattern(1, 0, 8);
            dev.submit(0, 1, write(0, a.clone(), false, false));
            let (t, _) = run_until(&mut dev, 1);
            dev.submit(t, 2, Bio::Flush);
            let b = pattern(3, 8, 8);
            dev.submit(t, 3, write(4096, b.clone(), false, false));
            // The write completes (~20 us) long before the flush (>= 1 ms).
            let mut b_done = false;
            let flush_done;
            loop {
                let t = dev.next_event_ns().expect("events pending");
                let comps = dev.advance(t);
                if comps.iter().any(|c| c.0 == 3) {
                    b_done = true;
                }
                if comps.iter().any(|c| c.0 == 2) {
                    flush_done = t;
                    break;
                }
            }
            assert!(b_done, "seed {seed}: write should complete before the flush");
            let report = dev.power_loss(flush_done);
            assert_eq!(report.inflight_lost, 0);
            assert_eq!(dev.peek(0, 4096), a, "seed {seed}: flushed write lost");
            let got = dev.peek(4096, 4096);
            let kept_sectors = got.chunks(SECTOR).zip(b.chunks(SECTOR)).filter(|(g, w)| g == w).count();
            for chunk in got.chunks(SECTOR) {
                assert!(chunk == [0u8; SECTOR] || b.chunks(SECTOR).any(|w| w == chunk));
            }
            match kept_sectors {
                0 => lost += 1,
                8 => kept += 1,
                _ => torn += 1,
            }
        }
        assert!(lost > 0, "the model never loses an unflushed write");
        assert!(kept > 0, "the model never keeps an unflushed write");
        assert!(torn > 0, "the model never tears an unflushed write");
    }

    #[test]
    fn unflushed_write_is_at_risk_with_the_default_drain() {
        // Power loss right when the write completes: still in the cache.
        let mut lost = 0;
        for seed in 0..100 {
            let mut dev = Device::new(DeviceConfig::default(), rng(seed));
            dev.submit(0, 1, write(0, pattern(1, 0, 8), false, false));
            let (t, _) = run_until(&mut dev, 1);
            dev.power_loss(t);
            if dev.peek(0, 4096) == vec![0u8; 4096] {
                lost += 1;
            }
        }
        assert!(lost > 0);
    }

    #[test]
    fn fua_write_survives_and_dropping_newer_reveals_older() {
        let mut outcomes = BTreeMap::new();
        for seed in 0..200 {
            let mut dev = Device::new(no_drain(), rng(seed));
            let a = pattern(1, 0, 8);
            let b = pattern(2, 0, 8);
            dev.submit(0, 1, write(0, a.clone(), true, false));
            let (t, _) = run_until(&mut dev, 1);
            dev.submit(t, 2, write(0, b.clone(), false, false));
            let (t, _) = run_until(&mut dev, 2);
            assert_eq!(dev.peek(0, 4096), b, "reads see cache over media");
            dev.power_loss(t);
            let got = dev.peek(0, 4096);
            for (i, chunk) in got.chunks(SECTOR).enumerate() {
                let from_a = chunk == &a[i * SECTOR..][..SECTOR];
                let from_b = chunk == &b[i * SECTOR..][..SECTOR];
                assert!(from_a || from_b, "seed {seed} sector {i}: garbage or zeros");
                *outcomes.entry(from_a).or_insert(0) += 1;
            }
        }
        assert_eq!(outcomes.len(), 2, "both versions must show up: {outcomes:?}");
    }

    #[test]
    fn fua_supersedes_older_cached_version() {
        // Older cached write, then a FUA write of the same sectors: the older
        // one must never come back over the durable newer one.
        for seed in 0..100 {
            let mut dev = Device::new(no_drain(), rng(seed));
            let a = pattern(1, 0, 8);
            let b = pattern(2, 0, 8);
            dev.submit(0, 1, write(0, a, false, false));
            let (t, _) = run_until(&mut dev, 1);
            dev.submit(t, 2, write(0, b.clone(), true, false));
            let (t, _) = run_until(&mut dev, 2);
            assert_eq!(dev.cache_used_bytes(), 0);
            dev.power_loss(t);
            assert_eq!(dev.peek(0, 4096), b);
        }
    }

    #[test]
    fn preflush_write_makes_earlier_writes_durable() {
        for seed in 0..100 {
            let mut dev = Device::new(no_drain(), rng(seed));
            let a = pattern(1, 0, 8);
            dev.submit(0, 1, write(0, a.clone(), false, false));
            let (t, _) = run_until(&mut dev, 1);
            dev.submit(t, 2, write(8192, pattern(2, 16, 8), true, true));
            let (t, _) = run_until(&mut dev, 2);
            dev.power_loss(t);
            assert_eq!(dev.peek(0, 4096), a);
            assert_eq!(dev.peek(8192, 4096), pattern(2, 16, 8));
        }
    }

    #[test]
    fn power_loss_drops_inflight_commands() {
        let mut dev = Device::new(DeviceConfig::default(), rng(1));
        dev.submit(0, 1, write(0, pattern(1, 0, 8), false, false));
        dev.submit(0, 2, Bio::Flush);
        dev.submit(0, 3, Bio::Read { offset_bytes: 0, len_bytes: 4096 });
        let report = dev.power_loss(1);
        assert_eq!(report.inflight_lost, 3);
        assert_eq!(report.writes_kept + report.writes_dropped + report.writes_torn, 1);
        assert_eq!(dev.in_flight(), 0);
        assert_eq!(dev.next_event_ns(), None);
        assert!(dev.advance(u64::MAX).is_empty());
        // The device works after power comes back.
        dev.submit(10, 4, Bio::Read { offset_bytes: 0, len_bytes: 512 });
        assert!(matches!(run_until(&mut dev, 4).1, BioStatus::Ok(v) if v.len() == 512));
    }

    // ---- determinism -----------------------------------------------------

    /// A fixed workload (drawn from its own stream) on a device seeded with
    /// `seed`: the completions with times, the power-loss report and the
    /// whole range's contents afterwards.
    fn run_workload(seed: u64) -> (Vec<(u64, u64, BioStatus)>, PowerLossReport, Vec<u8>) {
        let config = DeviceConfig {
            queue_depth: 8,
            cache_bytes: 64 << 10,
            drain_bytes_per_sec: 50_000_000,
            read_error_probability: 0.05,
            write_error_probability: 0.05,
            latency_spike_probability: 0.05,
            tail_probability: 0.05,
            ..DeviceConfig::default()
        };
        let mut dev = Device::new(config, rng(seed));
        let mut workload = rng(0xC0FFEE);
        let mut now = 0;
        let mut log = Vec::new();
        for id in 0..400u64 {
            let sector = workload.random_range(0..64u64);
            let sectors = workload.random_range(1..=32u64);
            let bio = match workload.random_range(0..10) {
                0 => Bio::Flush,
                1..=3 => Bio::Read {
                    offset_bytes: sector * SECTOR_SIZE,
                    len_bytes: (sectors * SECTOR_SIZE) as u32,
                },
                k => write(sector * SECTOR_SIZE, pattern(id, sector, sectors), k == 9, k == 8),
            };
            dev.submit(now, id, bio);
            now += workload.random_range(0..200 * US);
            for (cid, st) in dev.advance(now) {
                log.push((now, cid, st));
            }
        }
        let report = dev.power_loss(now + 30 * US);
        (log, report, dev.peek(0, 96 * SECTOR_SIZE))
    }

    #[test]
    fn same_seed_same_run_different_seed_differs() {
        let a = run_workload(7);
        let b = run_workload(7);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
        let c = run_workload(8);
        assert!(a.0 != c.0, "different seeds gave the same completions");
        assert!(a.2 != c.2 || a.1 != c.1, "different seeds gave the same crash state");
    }

    // ---- queue -----------------------------------------------------------

    #[test]
    fn queue_depth_is_honoured_and_completions_are_out_of_order() {
        let config = DeviceConfig { queue_depth: 4, ..DeviceConfig::default() };
        let mut dev = Device::new(config, rng(3));
        for id in 0..20 {
            dev.submit(0, id, Bio::Read { offset_bytes: id * 4096, len_bytes: 4096 });
            assert!(dev.in_flight() <= 4);
        }
        assert_eq!(dev.in_flight(), 4);
        assert_eq!(dev.queued(), 16);
        let mut order = Vec::new();
        while let Some(t) = dev.next_event_ns() {
            for (id, st) in dev.advance(t) {
                assert!(matches!(st, BioStatus::Ok(ref v) if v.len() == 4096));
                order.push(id);
            }
            assert!(dev.in_flight() <= 4);
        }
        assert_eq!(dev.stats().max_in_flight, 4);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        assert_ne!(order, sorted, "completions came back in submission order");
    }

    #[test]
    fn queued_command_latency_counts_from_dispatch() {
        let config = DeviceConfig {
            queue_depth: 1,
            read_latency_ns: LatencyDist::fixed(100 * US),
            tail_probability: 0.0,
            ..DeviceConfig::default()
        };
        let mut dev = Device::new(config, rng(0));
        for id in 0..3 {
            dev.submit(0, id, Bio::Read { offset_bytes: 0, len_bytes: 4096 });
        }
        let times: Vec<(u64, u64)> = drain_all(&mut dev).into_iter().map(|(t, id, _)| (t, id)).collect();
        assert_eq!(times, vec![(100 * US, 0), (200 * US, 1), (300 * US, 2)]);
        // Service time excludes the wait in the software queue.
        let h = &dev.stats().service_ns["read"];
        assert_eq!(h.len(), 3);
        assert!(h.max().abs_diff(100 * US) <= 100, "service max {}", h.max());
        assert!(dev.stats().latency_ns["read"].max() >= 299 * US);
    }

    #[test]
    fn full_cache_delays_write_completion() {
        let config = DeviceConfig {
            cache_bytes: 8192,
            drain_bytes_per_sec: 4_096_000, // one 4 KiB write per ms
            write_latency_ns: LatencyDist::fixed(10 * US),
            tail_probability: 0.0,
            ..DeviceConfig::default()
        };
        let mut dev = Device::new(config, rng(0));
        for id in 0..4 {
            dev.submit(0, id, write(id * 4096, pattern(id, id * 8, 8), false, false));
        }
        let done = drain_all(&mut dev);
        let times: Vec<(u64, u64)> = done.iter().map(|&(t, id, _)| (t, id)).collect();
        assert_eq!(times, vec![(10 * US, 0), (10 * US, 1), (1010 * US, 2), (2010 * US, 3)]);
        assert_eq!(dev.stats().cache_full_stalls, 2);
        // Everything drained to media: durable now.
        assert_eq!(dev.cache_used_bytes(), 0);
        dev.power_loss(10 * MS);
        for id in 0..4 {
            assert_eq!(dev.peek(id * 4096, 4096), pattern(id, id * 8, 8));
        }
    }

    // ---- validation and faults -------------------------------------------

    #[test]
    fn misaligned_or_out_of_range_bio_is_io_error() {
        let mut dev = Device::new(DeviceConfig::default(), rng(0));
        let size = dev.config().size_bytes;
        let bad = vec![
            Bio::Read { offset_bytes: 1, len_bytes: 512 },
            Bio::Read { offset_bytes: 0, len_bytes: 100 },
            Bio::Read { offset_bytes: 0, len_bytes: 0 },
            Bio::Read { offset_bytes: size, len_bytes: 512 },
            Bio::Read { offset_bytes: u64::MAX - 511, len_bytes: 1024 },
            write(512, vec![1; 513], false, false),
            write(3, vec![1; 512], true, true),
            write(0, Vec::new(), false, false),
            write(size - 512, vec![1; 1024], false, false),
        ];
        let n = bad.len() as u64;
        for (id, bio) in bad.into_iter().enumerate() {
            dev.submit(0, id as u64, bio);
        }
        assert_eq!(dev.in_flight(), 0);
        assert_eq!(dev.next_event_ns(), Some(0));
        let comps = dev.advance(0);
        assert_eq!(comps.len() as u64, n);
        assert!(comps.iter().all(|(_, st)| *st == BioStatus::IoError));
        assert_eq!(dev.stats().invalid_bios, n);
        assert_eq!(dev.media_sectors(), 0);
        assert_eq!(dev.cache_used_bytes(), 0);
        // The last sector is valid.
        dev.submit(0, 100, write(size - 512, vec![7; 512], false, false));
        assert_eq!(run_until(&mut dev, 100).1, BioStatus::Ok(Vec::new()));
        assert_eq!(dev.peek(size - 512, 512), vec![7; 512]);
    }

    #[test]
    fn reads_see_cache_over_media_and_zeros_elsewhere() {
        let mut dev = Device::new(no_drain(), rng(5));
        dev.submit(0, 1, write(0, vec![1; 4096], false, false));
        let (t, _) = run_until(&mut dev, 1);
        dev.submit(t, 2, Bio::Flush);
        let (t, _) = run_until(&mut dev, 2);
        dev.submit(t, 3, write(1024, vec![2; 1024], false, false));
        let (t, _) = run_until(&mut dev, 3);
        dev.submit(t, 4, Bio::Read { offset_bytes: 0, len_bytes: 8192 });
        let (_, st) = run_until(&mut dev, 4);
        let mut expect = vec![1u8; 4096];
        expect[1024..2048].fill(2);
        expect.extend_from_slice(&[0; 4096]);
        assert_eq!(st, BioStatus::Ok(expect.clone()));
        assert_eq!(dev.peek(0, 8192), expect);
        assert_eq!(dev.peek(1000, 50), expect[1000..1050].to_vec());
        assert_eq!(dev.media_sectors(), 8, "media is sparse");
    }

    #[test]
    fn injected_errors_and_spikes() {
        let config = DeviceConfig {
            read_error_probability: 1.0,
            write_error_probability: 1.0,
            latency_spike_probability: 1.0,
            latency_spike_ns: 7 * MS,
            ..DeviceConfig::default()
        };
        let mut dev = Device::new(config, rng(9));
        dev.submit(0, 1, write(0, vec![9; 4096], false, false));
        dev.submit(0, 2, Bio::Read { offset_bytes: 0, len_bytes: 4096 });
        let done = drain_all(&mut dev);
        assert!(done.iter().all(|(t, _, st)| *st == BioStatus::IoError && *t >= 7 * MS));
        assert_eq!(dev.peek(0, 4096), vec![0; 4096], "failed write wrote data");
        let s = dev.stats();
        assert_eq!((s.read_errors_injected, s.write_errors_injected, s.latency_spikes), (1, 1, 2));
    }

    #[test]
    fn latency_dist_mean_min_and_cap() {
        let d = LatencyDist::new(70 * US, 85 * US);
        let mut r = rng(42);
        let n = 200_000u64;
        let mut sum = 0u64;
        for _ in 0..n {
            let x = d.sample(&mut r);
            assert!(x >= d.min_ns && x <= d.cap_ns());
            sum += x;
        }
        let mean = sum / n;
        assert!(mean.abs_diff(85 * US) < 85 * US / 100, "mean {mean}");
        assert_eq!(LatencyDist::fixed(5).sample(&mut r), 5);
        for x in [1e-300, 1e-17, 0.1, 0.5, std::f64::consts::FRAC_1_SQRT_2, 0.9999, 1.0, 1.5, 123.0] {
            assert!((det_ln(x) - x.ln()).abs() <= 1e-12 * x.ln().abs().max(1.0), "ln {x}");
        }
    }

    #[test]
    fn stats_summary_reports_per_op_percentiles() {
        let mut dev = Device::new(DeviceConfig::default(), rng(11));
        for id in 0..50 {
            dev.submit(0, id, Bio::Read { offset_bytes: 0, len_bytes: 4096 });
        }
        dev.submit(0, 50, write(0, vec![1; 4096], true, false));
        dev.submit(0, 51, Bio::Flush);
        drain_all(&mut dev);
        let s = dev.stats().summary();
        assert_eq!(s["ops"]["read"]["count"], 50);
        assert_eq!(s["ops"]["write_fua"]["count"], 1);
        assert_eq!(s["ops"]["flush"]["count"], 1);
        let p50 = s["ops"]["read"]["p50_ns"].as_u64().unwrap_or(0);
        assert!((70 * US..2 * MS).contains(&p50), "p50 {p50}");
        assert!(s["ops"]["read"]["max_ns"].as_u64() >= s["ops"]["read"]["p99_ns"].as_u64());
        assert_eq!(s["bytes_read"], 50 * 4096);
    }
}
