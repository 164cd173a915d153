//! `fsstress` under power loss over 500 seeds (both cores): every
//! operation and read agrees with the model and check() (with its file
//! data cross-checks) passes after every power cut and again after mount
//! replays the log, and every file fsynced or synced and untouched since
//! holds those bytes, in every seed. And the seeds really exercise the
//! oracles: power lands mid-workload in many runs, synced files are
//! checked, data goes through ordered extents, fsyncs sync the log and
//! mount replays it.

use engine::fix::FixPolicy;
use sim::pool::{Caught, for_each_parallel, run_caught};
use sim::runner::RunSpec;

const SEEDS: u64 = 500;

#[test]
fn fsstress_holds_its_oracles_over_500_seeds_with_power_loss() {
    let mut failures = Vec::new();
    let (mut crashed_mid_workload, mut durable_checked, mut ordered_extents, mut power_losses) = (0, 0, 0, 0);
    let (mut log_syncs, mut replayed_seeds) = (0, 0);
    for_each_parallel(
        2,
        0..SEEDS,
        "fsstress",
        |&seed| match run_caught(
            &*scenarios::by_name("fsstress").unwrap(),
            &RunSpec::new("fsstress", seed, FixPolicy::None),
        ) {
            Ok(Caught::Finished(result)) => Ok(result),
            Ok(Caught::Panicked(message)) => Err(format!("seed {seed} panicked: {message}")),
            Err(error) => Err(format!("seed {seed}: {error}")),
        },
        |_, seed, result| {
            match result {
                Ok(result) if result.violations.is_empty() => {
                    let stats = &result.stats["scenario"];
                    crashed_mid_workload += u64::from(stats["crashed_mid_workload"] == true);
                    durable_checked += stats["durable_files_checked"].as_u64().unwrap_or(0);
                    ordered_extents += stats["data"]["ordered_extents"].as_u64().unwrap_or(0);
                    power_losses += u64::from(result.power_loss);
                    log_syncs += stats["log"]["log_syncs"].as_u64().unwrap_or(0);
                    replayed_seeds += u64::from(stats["inodes_replayed"].as_u64().unwrap_or(0) > 0);
                }
                Ok(result) => failures.push(format!(
                    "seed {seed}: {} — {}",
                    result.violations[0].kind, result.violations[0].message
                )),
                Err(message) => failures.push(message),
            }
            true
        },
    )
    .unwrap();
    assert!(failures.is_empty(), "{} of {SEEDS} seeds failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(power_losses, SEEDS, "every seed cuts power");
    assert!(
        crashed_mid_workload >= SEEDS / 3,
        "power landed mid-workload in only {crashed_mid_workload} seeds"
    );
    assert!(durable_checked >= SEEDS, "only {durable_checked} synced files were checked after the crash");
    assert!(ordered_extents >= 5 * SEEDS, "only {ordered_extents} ordered extents");
    assert!(log_syncs >= SEEDS, "only {log_syncs} fsyncs synced the log");
    assert!(replayed_seeds >= SEEDS / 5, "mount replayed a log in only {replayed_seeds} seeds");
}
