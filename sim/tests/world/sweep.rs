//! `sim sweep` and `sim merge`: a sweep killed part way and resumed, and a
//! sweep run as shards and merged, give what one uninterrupted sweep gives.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine::fix::FixPolicy;
use sim::report::SeedRange;
use sim::sweep::{Quiet, SeedLine, Shard, Summary, SweepSpec, load_dir, merge, sweep};

const SCENARIO: &str = "cow-amplification";
const SEEDS: SeedRange = SeedRange { start: 0, end: 16 };

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cowsim-sweep-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn spec(out: &Path, shard: Shard) -> SweepSpec {
    SweepSpec {
        scenario: SCENARIO.to_string(),
        seeds: SEEDS,
        fix: FixPolicy::None,
        jobs: 2,
        shard,
        swarm: false,
        canary: 0.1,
        out: out.to_path_buf(),
        resume: false,
    }
}

/// The lines of a sweep directory without wall-clock times, by seed.
fn lines(dir: &Path) -> Vec<SeedLine> {
    let (_, mut lines) = load_dir(dir, false).unwrap();
    lines.sort_by_key(|l| l.seed);
    lines.iter().map(SeedLine::deterministic).collect()
}

fn seed_files(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir.join("seeds"))
        .map(|entries| {
            entries
                .map(|e| {
                    let path = e.unwrap().path();
                    (
                        path.file_name().unwrap().to_string_lossy().into_owned(),
                        std::fs::read_to_string(&path).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn a_killed_sweep_resumes_and_shards_merge_to_the_uninterrupted_result() {
    // One uninterrupted sweep.
    let whole = dir("whole");
    let uninterrupted = sweep(&spec(&whole, Shard::WHOLE), &mut Quiet).unwrap();
    assert_eq!(uninterrupted.summary.seeds_run, SEEDS.len());
    assert!(!uninterrupted.summary.failing_seeds.is_empty(), "16 seeds of none should include a failure");

    // The same sweep as a process killed once a few results are in; a line
    // cut short by the kill is simulated on top.
    let killed = dir("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sim"))
        .args([
            "sweep",
            "--scenario",
            SCENARIO,
            "--seeds",
            "0..16",
            "--jobs",
            "2",
            "--canary",
            "0.1",
            "--out",
        ])
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sim starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished = || std::fs::read_to_string(killed.join("results.jsonl")).map_or(0, |t| t.lines().count());
    while finished() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = finished();
    assert!((3..16).contains(&before), "killed part way: {before} results");
    let mut file = std::fs::OpenOptions::new().append(true).open(killed.join("results.jsonl")).unwrap();
    file.write_all(br#"{"seed":15,"outcome":"pa"#).unwrap();
    drop(file);
    let mut again = spec(&killed, Shard::WHOLE);
    let refused = sweep(&again, &mut Quiet).err().expect("a second sweep into the same directory is refused");
    assert!(refused.contains("--resume"), "{refused}");
    again.resume = true;
    let resumed = sweep(&again, &mut Quiet).unwrap();
    assert_eq!(resumed.ran, SEEDS.len() - before as u64, "only the seeds not done ran again");
    assert_eq!(resumed.summary, uninterrupted.summary);
    assert_eq!(lines(&killed), lines(&whole));
    assert_eq!(seed_files(&killed), seed_files(&whole));

    // Two shards, merged.
    let shards: Vec<PathBuf> = (0..2).map(|k| dir(&format!("shard{k}"))).collect();
    for (k, out) in shards.iter().enumerate() {
        sweep(&spec(out, Shard { index: k as u64, count: 2 }), &mut Quiet).unwrap();
    }
    let partial = merge(&shards[..1]).unwrap();
    assert_eq!(partial.seeds_missing, 0, "one shard alone is complete as a shard");
    assert_eq!(partial.shards_missing, ["1/2"]);
    let merged: Summary = merge(&shards).unwrap();
    assert_eq!(Summary { shards: vec!["0/1".to_string()], ..merged.clone() }, uninterrupted.summary);
    assert!(merged.shards_missing.is_empty());
    assert_eq!(merged.shards, ["0/2", "1/2"]);
    let mut merged_lines: Vec<SeedLine> = shards.iter().flat_map(|d| lines(d)).collect();
    merged_lines.sort_by_key(|l| l.seed);
    assert_eq!(merged_lines, lines(&whole));

    // A directory of another sweep does not merge.
    let other = dir("other");
    let mut other_spec = spec(&other, Shard::WHOLE);
    other_spec.seeds = SeedRange { start: 0, end: 2 };
    sweep(&other_spec, &mut Quiet).unwrap();
    let error = merge(&[whole.clone(), other.clone()]).unwrap_err();
    assert!(error.contains("another sweep"), "{error}");
    for d in [whole, killed, other].iter().chain(&shards) {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn canary_seeds_run_twice_and_agree() {
    let out = dir("canary");
    let mut canary = spec(&out, Shard::WHOLE);
    canary.seeds = SeedRange { start: 100, end: 104 };
    canary.canary = 1.0;
    canary.swarm = true;
    let outcome = sweep(&canary, &mut Quiet).unwrap();
    assert_eq!(outcome.summary.canary_seeds, 4);
    assert_eq!(outcome.summary.canary_diverged, Vec::<u64>::new());
    assert!(outcome.summary.swarm);
    let _ = std::fs::remove_dir_all(out);
}
