//! `fsstress` under power loss over 500 seeds (both cores): every
//! operation and read agrees with the model and check() (with its file
//! data cross-checks) passes after every power cut and again after mount
//! replays the log, and every file fsynced or synced and untouched since
//! holds those bytes, and every task directory fsynced or synced and
//! untouched since holds exactly those names, in every seed. And the seeds
//! really exercise the oracles: power lands mid-workload in many runs,
//! synced files and directories are checked, data goes through ordered
//! extents, fsyncs of files and directories sync the log and mount replays
//! it, removing entries a logged directory no longer had.

use engine::fix::FixPolicy;
use sim::pool::{Caught, for_each_parallel, run_caught};
use sim::runner::{RunResult, RunSpec};

const SEEDS: u64 = 500;

/// Run `scenario` over `seeds` on both cores; `passed` sees each result
/// without a violation. Returns the failures, one line each.
fn run_seeds(scenario: &str, seeds: std::ops::Range<u64>, mut passed: impl FnMut(&RunResult)) -> Vec<String> {
    let mut failures = Vec::new();
    for_each_parallel(
        2,
        seeds,
        scenario,
        |&seed| match run_caught(
            &*scenarios::by_name(scenario).unwrap(),
            &RunSpec::new(scenario, seed, FixPolicy::None),
        ) {
            Ok(Caught::Finished(result)) => Ok(result),
            Ok(Caught::Panicked(message)) => Err(format!("seed {seed} panicked: {message}")),
            Err(error) => Err(format!("seed {seed}: {error}")),
        },
        |_, seed, result| {
            match result {
                Ok(result) if result.violations.is_empty() => passed(&result),
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
    failures
}

#[test]
fn fsstress_holds_its_oracles_over_500_seeds_with_power_loss() {
    let (mut crashed_mid_workload, mut durable_checked, mut ordered_extents, mut power_losses) = (0, 0, 0, 0);
    let (mut log_syncs, mut replayed_seeds, mut snapshots) = (0, 0, 0);
    let (mut dirs_logged, mut new_inodes_logged, mut dirs_checked, mut entries_deleted) = (0, 0, 0, 0);
    let failures = run_seeds("fsstress", 0..SEEDS, |result| {
        let stats = &result.stats["scenario"];
        crashed_mid_workload += u64::from(stats["crashed_mid_workload"] == true);
        durable_checked += stats["durable_files_checked"].as_u64().unwrap_or(0);
        ordered_extents += stats["data"]["ordered_extents"].as_u64().unwrap_or(0);
        power_losses += u64::from(result.power_loss);
        log_syncs += stats["log"]["log_syncs"].as_u64().unwrap_or(0);
        replayed_seeds += u64::from(stats["inodes_replayed"].as_u64().unwrap_or(0) > 0);
        snapshots += stats["snapshots"]["taken"].as_u64().unwrap_or(0);
        dirs_logged += stats["log"]["dirs_logged"].as_u64().unwrap_or(0);
        new_inodes_logged += stats["log"]["new_inodes_logged"].as_u64().unwrap_or(0);
        dirs_checked += stats["durable_dirs_checked"].as_u64().unwrap_or(0);
        entries_deleted += stats["entries_deleted"].as_u64().unwrap_or(0);
    });
    assert!(failures.is_empty(), "{} of {SEEDS} seeds failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(power_losses, SEEDS, "every seed cuts power");
    // Seeds 0..500 log 332 directories and 501 new files they name, check
    // 241 directories' names after the crash, and replay removes 23 entries.
    assert!(dirs_logged >= SEEDS / 2, "only {dirs_logged} directories logged");
    assert!(new_inodes_logged >= SEEDS / 2, "only {new_inodes_logged} new inodes logged as existing");
    assert!(dirs_checked >= SEEDS / 3, "only {dirs_checked} directories' names checked after the crash");
    assert!(entries_deleted >= 10, "replay removed only {entries_deleted} entries of logged directories");
    assert!(
        crashed_mid_workload >= SEEDS / 3,
        "power landed mid-workload in only {crashed_mid_workload} seeds"
    );
    assert!(durable_checked >= SEEDS, "only {durable_checked} synced files were checked after the crash");
    assert!(ordered_extents >= 5 * SEEDS, "only {ordered_extents} ordered extents");
    assert!(log_syncs >= SEEDS, "only {log_syncs} fsyncs synced the log");
    assert!(replayed_seeds >= SEEDS / 5, "mount replayed a log in only {replayed_seeds} seeds");
    assert!(snapshots >= SEEDS / 5, "only {snapshots} snapshots taken");
}

/// `fsstress-snapshots` over 300 seeds: the same oracles hold (check()
/// recomputes every shared block's and data extent's references from the
/// trees, snapshots included, after the power cut), and the runs really
/// COW shared blocks and delete snapshots, and power lands mid-workload in
/// many of them.
#[test]
fn fsstress_with_snapshots_and_balance_keeps_shared_references_exact_over_300_seeds() {
    const SNAPSHOT_SEEDS: u64 = 300;
    let (mut shared_cows, mut max_refs, mut taken, mut deleted, mut mid_workload) = (0, 0, 0, 0, 0);
    let (mut balances, mut swaps, mut repointed) = (0, 0, 0);
    let failures = run_seeds("fsstress-snapshots", 0..SNAPSHOT_SEEDS, |result| {
        let balance = &result.stats["scenario"]["balance"];
        balances += balance["done"].as_u64().unwrap_or(0);
        swaps += balance["swaps"].as_u64().unwrap_or(0);
        repointed += balance["blocks_repointed"].as_u64().unwrap_or(0);
        mid_workload += u64::from(result.stats["scenario"]["crashed_mid_workload"] == true);
        let refs = &result.stats["extent_refs"];
        shared_cows += refs["shared_cows"].as_u64().unwrap_or(0);
        max_refs = max_refs.max(refs["refs_per_shared_cow"]["max"].as_u64().unwrap_or(0));
        let snapshots = &result.stats["scenario"]["snapshots"];
        taken += snapshots["taken"].as_u64().unwrap_or(0);
        deleted += snapshots["deleted"].as_u64().unwrap_or(0);
    });
    assert!(
        failures.is_empty(),
        "{} of {SNAPSHOT_SEEDS} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        taken >= SNAPSHOT_SEEDS && deleted >= SNAPSHOT_SEEDS / 2,
        "snapshots taken {taken}, deleted {deleted}"
    );
    assert!(shared_cows >= SNAPSHOT_SEEDS, "only {shared_cows} COWs of shared blocks");
    assert!(
        mid_workload >= SNAPSHOT_SEEDS / 3,
        "power landed mid-workload in only {mid_workload} seeds: the snapshots' crash recovery goes untested"
    );
    assert!(max_refs >= 10, "no COW of a shared block queued more than {max_refs} delayed refs");
    // Relocation ran beside all of it: block groups emptied, subtrees
    // swapped into subvolumes, shared blocks moved once for several trees.
    assert!(
        balances >= SNAPSHOT_SEEDS && swaps >= SNAPSHOT_SEEDS && repointed >= SNAPSHOT_SEEDS / 3,
        "balances {balances}, swaps {swaps}, repointed {repointed}"
    );
}

/// `fsstress-quota`: quotas on, the fs tree limited. Every image the power
/// cut leaves (and every one after log replay) has each subvolume's qgroup
/// counts equal to what its trees reach (check), over snapshots taken and
/// dropped, relocation and writes refused with EDQUOT.
#[test]
fn fsstress_with_quotas_keeps_every_subvolume_count_exact_over_300_seeds() {
    const QUOTA_SEEDS: u64 = 300;
    let (mut edquot, mut changed, mut snapshots, mut subtree) = (0, 0, 0, 0);
    let failures = run_seeds("fsstress-quota", 0..QUOTA_SEEDS, |result| {
        let quota = &result.stats["scenario"]["quota"];
        edquot += quota["edquot"].as_u64().unwrap_or(0);
        changed += quota["changed"].as_u64().unwrap_or(0);
        snapshots += quota["snapshots"].as_u64().unwrap_or(0);
        subtree += quota["subtree_traced"].as_u64().unwrap_or(0);
    });
    assert!(
        failures.is_empty(),
        "{} of {QUOTA_SEEDS} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(snapshots >= QUOTA_SEEDS, "only {snapshots} snapshots accounted by inheritance");
    assert!(changed >= 100 * QUOTA_SEEDS, "only {changed} extents changed their roots");
    assert!(subtree >= QUOTA_SEEDS, "snapshot drops traced only {subtree} skipped blocks");
    assert!(edquot >= QUOTA_SEEDS, "only {edquot} operations refused with EDQUOT");
}
