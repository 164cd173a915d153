//! `device-stress`: the block device on its own, judged like fstests' dm-log-writes
//! and CrashMonkey judge a filesystem.
//!
//! Several tasks issue random writes (some FUA, some with a preflush) and
//! flushes over a small region, so writes overlap. At a seeded time the
//! machine loses power; a recovery task then reads the whole region back and
//! checks every 512-byte sector against a ledger of what was submitted and
//! acknowledged. The ledger knows only what a filesystem could know: when it
//! submitted each command and when each completed.
//!
//! The durability rule checked: a write is durable if it was FUA and
//! completed, or it completed before a flush was submitted and that flush
//! completed (a preflush write counts as a flush submitted with it). After
//! power loss each sector must hold either the newest durable write that
//! covers it (zeros if none) or a write that is not known to be older than
//! that one, and it must hold all 512 bytes of that one write: no garbage.

use std::cell::RefCell;
use std::rc::Rc;

use engine::env::{Bio, BioStatus, Env, SECTOR_SIZE, SwitchPoint, TaskKind, TraceEvent, Violation};
use engine::wait::Completion;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::streams::stream;
use crate::{Scenario, ScenarioReport, ScenarioRun, StartContext};

pub struct DeviceStress;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Params {
    tasks: u32,
    ops_per_task: u32,
    /// Writes land in `[0, region_bytes)`.
    region_bytes: u64,
    max_write_bytes: u64,
    flush_percent: u32,
    fua_percent: u32,
    preflush_percent: u32,
    /// Percentage of commands a task waits for before issuing the next.
    sync_percent: u32,
    /// When power is cut; if the workload ends first, power is cut then.
    power_loss_at_ns: Option<u64>,
    /// Overrides of the world's defaults: how fast the device's volatile
    /// cache drains decides how much is at stake when power goes.
    world: serde_json::Value,
}

impl Scenario for DeviceStress {
    fn name(&self) -> &'static str {
        "device-stress"
    }

    fn description(&self) -> &'static str {
        "random writes, FUA writes and flushes on the NVMe model, power loss, durability check"
    }

    fn configure(&self, seed: u64) -> serde_json::Value {
        let mut rng = stream(seed, "scenario");
        let params = Params {
            tasks: rng.random_range(1..=4),
            ops_per_task: rng.random_range(50..=300),
            region_bytes: 1 << rng.random_range(16..=20),
            max_write_bytes: 1 << rng.random_range(9..=15),
            flush_percent: rng.random_range(2..=20),
            fua_percent: rng.random_range(0..=15),
            preflush_percent: rng.random_range(0..=5),
            sync_percent: rng.random_range(20..=100),
            power_loss_at_ns: rng.random_bool(0.9).then(|| rng.random_range(100_000..20_000_000)),
            world: {
                let drain_bytes_per_sec = [1u64 << 20, 16 << 20, 256 << 20, 1 << 30][rng.random_range(0..4)];
                serde_json::json!({ "device": { "drain_bytes_per_sec": drain_bytes_per_sec } })
            },
        };
        serde_json::to_value(params).expect("params serialize")
    }

    fn start(&self, context: StartContext) -> Result<Box<dyn ScenarioRun>, String> {
        let params: Params = serde_json::from_value(context.params.clone())
            .map_err(|e| format!("device-stress parameters: {e}"))?;
        if params.region_bytes % SECTOR_SIZE != 0 || params.max_write_bytes < SECTOR_SIZE {
            return Err("device-stress: region and write sizes must be whole sectors".into());
        }
        let ledger = Rc::new(RefCell::new(Ledger::default()));
        for task in 0..params.tasks {
            let rng = stream(context.seed, &format!("scenario.task{task}"));
            let worker = writer(context.env.clone(), ledger.clone(), params.clone(), rng);
            context.env.spawn(&format!("writer{task}"), TaskKind::Workload, Box::pin(worker));
        }
        Ok(Box::new(DeviceStressRun { params, ledger, checked_sectors: Rc::new(RefCell::new(0)) }))
    }
}

/// What the workload submitted and saw acknowledged.
#[derive(Default)]
struct Ledger {
    writes: Vec<WriteRecord>,
    /// (submitted, completed) of every flush, including a preflush write's.
    flushes: Vec<(u64, Option<u64>)>,
    ops_completed: u64,
}

struct WriteRecord {
    offset_bytes: u64,
    len_bytes: u64,
    fua: bool,
    submitted_ns: u64,
    completed_ns: Option<u64>,
    ok: bool,
}

impl Ledger {
    /// Whether the rule guarantees write `id` survived.
    fn durable(&self, id: usize) -> bool {
        let write = &self.writes[id];
        let Some(completed) = write.completed_ns.filter(|_| write.ok) else {
            return false;
        };
        write.fua || self.flushes.iter().any(|&(submitted, done)| submitted >= completed && done.is_some())
    }
}

/// Each sector of write `id` holds (id + 1, sector index) repeated, so a read
/// tells which write a sector came from and that it is whole.
fn pattern(id: usize, offset_bytes: u64, len_bytes: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(len_bytes as usize);
    for sector in 0..len_bytes / SECTOR_SIZE {
        let tag = (id as u64 + 1).to_le_bytes();
        let index = (offset_bytes / SECTOR_SIZE + sector).to_le_bytes();
        for _ in 0..SECTOR_SIZE / 16 {
            data.extend_from_slice(&tag);
            data.extend_from_slice(&index);
        }
    }
    data
}

/// Which write a sector's bytes came from: Ok(None) for zeros, Err for garbage.
fn identify(sector_bytes: &[u8], sector: u64) -> Result<Option<usize>, String> {
    if sector_bytes.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let tag = u64::from_le_bytes(sector_bytes[..8].try_into().expect("8 bytes"));
    let index = u64::from_le_bytes(sector_bytes[8..16].try_into().expect("8 bytes"));
    let whole = sector_bytes.chunks(16).all(|c| c == &sector_bytes[..16]);
    if tag == 0 || index != sector || !whole {
        return Err(format!("sector {sector} holds bytes no write put there (tag {tag}, index {index})"));
    }
    Ok(Some(tag as usize - 1))
}

fn submit(env: &Rc<dyn Env>, bio: Bio, on_end: impl FnOnce(BioStatus) + 'static) -> Completion<()> {
    let done = Completion::new();
    let signal = done.clone();
    env.submit_bio(
        bio,
        Box::new(move |status| {
            on_end(status);
            signal.complete(());
        }),
    );
    done
}

async fn writer(env: Rc<dyn Env>, ledger: Rc<RefCell<Ledger>>, params: Params, mut rng: ChaCha8Rng) {
    let sectors = params.region_bytes / SECTOR_SIZE;
    let mut outstanding = Vec::new();
    for _ in 0..params.ops_per_task {
        let roll = rng.random_range(0..100);
        let done = if roll < params.flush_percent {
            let index = {
                let mut ledger = ledger.borrow_mut();
                ledger.flushes.push((env.now_ns(), None));
                ledger.flushes.len() - 1
            };
            let (l, e) = (ledger.clone(), env.clone());
            submit(&env, Bio::Flush, move |_| {
                let mut ledger = l.borrow_mut();
                ledger.flushes[index].1 = Some(e.now_ns());
                ledger.ops_completed += 1;
            })
        } else {
            let max_sectors = (params.max_write_bytes / SECTOR_SIZE).min(sectors);
            let len_sectors = rng.random_range(1..=max_sectors);
            let first = rng.random_range(0..=sectors - len_sectors);
            let (offset_bytes, len_bytes) = (first * SECTOR_SIZE, len_sectors * SECTOR_SIZE);
            let fua = rng.random_range(0..100) < params.fua_percent;
            let preflush = rng.random_range(0..100) < params.preflush_percent;
            let (id, flush_index) = {
                let mut ledger = ledger.borrow_mut();
                let now = env.now_ns();
                ledger.writes.push(WriteRecord {
                    offset_bytes,
                    len_bytes,
                    fua,
                    submitted_ns: now,
                    completed_ns: None,
                    ok: false,
                });
                if preflush {
                    ledger.flushes.push((now, None));
                }
                (ledger.writes.len() - 1, preflush.then(|| ledger.flushes.len() - 1))
            };
            let data = pattern(id, offset_bytes, len_bytes);
            let (l, e) = (ledger.clone(), env.clone());
            submit(&env, Bio::Write { offset_bytes, data, fua, preflush }, move |status| {
                let mut ledger = l.borrow_mut();
                let now = e.now_ns();
                let ok = status != BioStatus::IoError;
                ledger.writes[id].completed_ns = Some(now);
                ledger.writes[id].ok = ok;
                if let (Some(index), true) = (flush_index, ok) {
                    ledger.flushes[index].1 = Some(now);
                }
                ledger.ops_completed += 1;
            })
        };
        if rng.random_range(0..100) < params.sync_percent {
            done.await;
        } else {
            outstanding.push(done);
        }
        env.switch_point(SwitchPoint::Workload).await;
    }
    for done in outstanding {
        done.await;
    }
}

struct DeviceStressRun {
    params: Params,
    ledger: Rc<RefCell<Ledger>>,
    checked_sectors: Rc<RefCell<u64>>,
}

impl ScenarioRun for DeviceStressRun {
    fn power_loss_at_ns(&self) -> Option<u64> {
        self.params.power_loss_at_ns
    }

    fn after_power_loss(&mut self, env: Rc<dyn Env>) {
        let check = recover_and_check(
            env.clone(),
            self.ledger.clone(),
            self.params.region_bytes,
            self.checked_sectors.clone(),
        );
        env.spawn("recovery", TaskKind::Workload, Box::pin(check));
    }

    fn finish(&mut self, _env: &dyn Env) -> ScenarioReport {
        let ledger = self.ledger.borrow();
        let durable = (0..ledger.writes.len()).filter(|&id| ledger.durable(id)).count();
        ScenarioReport {
            ops_completed: ledger.ops_completed,
            stats: serde_json::json!({
                "writes": ledger.writes.len(),
                "flushes": ledger.flushes.len(),
                "writes_durable_by_rule": durable,
                "sectors_checked_after_power_loss": *self.checked_sectors.borrow(),
            }),
        }
    }
}

/// Read the region back and judge every sector against the ledger.
async fn recover_and_check(
    env: Rc<dyn Env>,
    ledger: Rc<RefCell<Ledger>>,
    region_bytes: u64,
    checked: Rc<RefCell<u64>>,
) {
    const CHUNK: u64 = 64 << 10;
    let mut offset = 0;
    while offset < region_bytes {
        let len = CHUNK.min(region_bytes - offset);
        let result = Rc::new(RefCell::new(None));
        let slot = result.clone();
        let done = submit(&env, Bio::Read { offset_bytes: offset, len_bytes: len as u32 }, move |status| {
            *slot.borrow_mut() = Some(status);
        });
        done.await;
        let status = result.borrow_mut().take().expect("read completed");
        let BioStatus::Ok(bytes) = status else {
            env.report_violation(Violation {
                kind: "io_error",
                message: format!("recovery read at {offset} failed"),
            });
            return;
        };
        for (i, sector_bytes) in bytes.chunks(SECTOR_SIZE as usize).enumerate() {
            let sector = offset / SECTOR_SIZE + i as u64;
            if let Err(message) = judge_sector(&ledger.borrow(), sector, sector_bytes) {
                env.report_violation(Violation { kind: "durability", message });
                return;
            }
            *checked.borrow_mut() += 1;
        }
        offset += len;
    }
    env.trace(TraceEvent::Note { what: "device-stress.checked", a: *checked.borrow(), b: 0, c: 0 });
}

fn judge_sector(ledger: &Ledger, sector: u64, bytes: &[u8]) -> Result<(), String> {
    let found = identify(bytes, sector)?;
    let at = sector * SECTOR_SIZE;
    let covers = |w: &WriteRecord| w.offset_bytes <= at && at < w.offset_bytes + w.len_bytes;
    let newest_durable = (0..ledger.writes.len())
        .filter(|&id| covers(&ledger.writes[id]) && ledger.durable(id))
        .max_by_key(|&id| ledger.writes[id].completed_ns);
    let Some(durable) = newest_durable else {
        // Nothing guaranteed: zeros or any write that covers the sector and did not fail.
        return match found {
            None => Ok(()),
            Some(id)
                if id < ledger.writes.len() && covers(&ledger.writes[id]) && !failed(&ledger.writes[id]) =>
            {
                Ok(())
            }
            Some(id) => Err(format!("sector {sector} holds write {id}, which never covered it")),
        };
    };
    match found {
        Some(id) if id == durable => Ok(()),
        Some(id) if id < ledger.writes.len() && covers(&ledger.writes[id]) && !failed(&ledger.writes[id]) => {
            let candidate = &ledger.writes[id];
            let superseded = candidate.completed_ns.is_some_and(|c| c < ledger.writes[durable].submitted_ns);
            if superseded {
                Err(format!(
                    "sector {sector} lost durable write {durable}: it holds older write {id} (completed before {durable} was submitted)"
                ))
            } else {
                Ok(())
            }
        }
        Some(id) => Err(format!("sector {sector} holds write {id}, which never covered it")),
        None => Err(format!("sector {sector} lost durable write {durable}: it reads as zeros")),
    }
}

fn failed(write: &WriteRecord) -> bool {
    write.completed_ns.is_some() && !write.ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with(writes: Vec<WriteRecord>, flushes: Vec<(u64, Option<u64>)>) -> Ledger {
        Ledger { writes, flushes, ops_completed: 0 }
    }

    fn write(offset_bytes: u64, fua: bool, submitted_ns: u64, completed_ns: Option<u64>) -> WriteRecord {
        WriteRecord { offset_bytes, len_bytes: 512, fua, submitted_ns, completed_ns, ok: true }
    }

    #[test]
    fn the_rule_needs_a_flush_submitted_after_completion() {
        let ledger = ledger_with(
            vec![write(0, false, 0, Some(10)), write(0, false, 0, Some(30))],
            vec![(20, Some(40))],
        );
        assert!(ledger.durable(0));
        assert!(!ledger.durable(1), "completed after the flush was submitted");
        let fua = ledger_with(vec![write(0, true, 0, Some(10))], vec![]);
        assert!(fua.durable(0));
    }

    #[test]
    fn judging_catches_loss_garbage_and_rollback() {
        let ledger = ledger_with(
            vec![write(0, false, 0, Some(10)), write(0, false, 20, Some(30)), write(0, false, 50, None)],
            vec![(35, Some(40))],
        );
        // write 1 is the newest durable one; write 2 (in flight) may have landed.
        assert!(judge_sector(&ledger, 0, &pattern(1, 0, 512)).is_ok());
        assert!(judge_sector(&ledger, 0, &pattern(2, 0, 512)).is_ok());
        assert!(judge_sector(&ledger, 0, &pattern(0, 0, 512)).unwrap_err().contains("lost durable"));
        assert!(judge_sector(&ledger, 0, &[0; 512]).unwrap_err().contains("zeros"));
        let mut torn = pattern(1, 0, 512);
        torn[300] ^= 1;
        assert!(judge_sector(&ledger, 0, &torn).unwrap_err().contains("no write put there"));
    }
}
