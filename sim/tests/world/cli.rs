//! The `sim` command as a user meets it: exit codes, one-line errors, JSON.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sim")).args(args).env_remove("RUST_LOG").output().expect("sim runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_bad_input(args: &[&str], needle: &str) {
    let output = sim(args);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains(needle), "{args:?}: expected '{needle}' in: {text}");
    assert!(!text.contains("panicked"), "{args:?} panicked: {text}");
}

#[test]
fn default_run_is_cow_amplification_on_one_screen() {
    let output = sim(&["--seed", "7"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(matches!(output.status.code(), Some(0 | 1)), "{stdout}{}", stderr(&output));
    assert!(stdout.contains("scenario cow-amplification"), "{stdout}");
    assert!(stdout.contains("outcome "), "{stdout}");
    assert!(stdout.lines().count() < 25, "one screen: {stdout}");
}

#[test]
fn device_stress_seed_7_passes() {
    let output = sim(&["run", "--scenario", "device-stress", "--seed", "7"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}{}", stderr(&output));
    assert!(stdout.contains("outcome PASS"), "{stdout}");
}

#[test]
fn json_has_the_documented_fields() {
    let output = sim(&["run", "--scenario", "device-stress", "--seed", "3", "--json"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    for field in [
        "seed",
        "scenario",
        "fix",
        "outcome",
        "violations",
        "trace_hash",
        "ops_completed",
        "sim_time_ns",
        "wall_ms",
        "stats",
    ] {
        assert!(value.get(field).is_some(), "missing {field}: {value}");
    }
    assert_eq!(value["outcome"], "pass");
    assert!(value["stats"]["device"]["ops"]["write"]["p99_ns"].as_u64().unwrap() > 0, "{}", value["stats"]);
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    assert_bad_input(&["run", "--scenario", "nope"], "unknown scenario 'nope'");
    assert_bad_input(&["run", "--fix", "magic"], "unknown fix 'magic'");
    assert_bad_input(&["check-determinism", "--seeds", "9..3"], "bad seed range");
    assert_bad_input(&["run", "--seed", "-4"], "");
    assert_bad_input(&["replay", "/nonexistent/seed.json"], "cannot read");
    assert_bad_input(&["sweep", "--seeds", "0..4", "--shard", "4/4", "--out", "/tmp/x"], "bad shard '4/4'");
    assert_bad_input(&["sweep", "--seeds", "0..4", "--canary", "2", "--out", "/tmp/x"], "bad --canary");
    assert_bad_input(&["merge", "/nonexistent/sweep"], "is not a sweep directory");
}

#[test]
fn sweep_directories_are_not_mixed_up() {
    let dir = std::env::temp_dir().join(format!("cowsim-cli-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_string_lossy().into_owned();
    let args = ["sweep", "--scenario", "device-stress", "--seeds", "0..3", "--out", &out];
    let output = sim(&args);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("seeds  3 run, 3 pass, 0 violation"));
    assert_bad_input(&args, "already holds a sweep; pass --resume");
    let other = ["sweep", "--scenario", "device-stress", "--seeds", "0..5", "--out", &out, "--resume"];
    assert_bad_input(&other, "--resume needs the same arguments");
    let mut resumed = args.to_vec();
    resumed.push("--resume");
    assert_eq!(sim(&resumed).status.code(), Some(0), "nothing left to run is a success");
    let merged = sim(&["merge", &out, "--known", "/nonexistent"]);
    assert_eq!(merged.status.code(), Some(2), "{}", stderr(&merged));
    std::fs::write(dir.join("results.jsonl"), "{\"seed\": 1}\n").unwrap();
    assert_bad_input(&resumed, "line 1: corrupt result");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_and_future_seed_files_are_rejected() {
    let dir = std::env::temp_dir().join(format!("cowsim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    assert_bad_input(&["replay", &write("garbage.json", "{\"format_version\": 1, \"sce")], "bad JSON");
    assert_bad_input(&["replay", &write("future.json", "{\"format_version\": 99}")], "newer than this sim");
    // A real file from this sim, then edited to name an unknown scenario.
    let output = sim(&["run", "--scenario", "device-stress", "--seed", "5", "--json"]);
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let file = serde_json::json!({
        "format_version": 1, "scenario": "no-such-scenario", "seed": 5, "fix": "none",
        "config": result["config"], "expected": {"outcome": "pass", "trace_hash": result["trace_hash"]}
    });
    assert_bad_input(&["replay", &write("unknown.json", &file.to_string())], "unknown scenario");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_reproduces_a_saved_run() {
    let output = sim(&["run", "--scenario", "device-stress", "--seed", "11", "--json"]);
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let file = serde_json::json!({
        "format_version": 1, "scenario": "device-stress", "seed": 11, "fix": "none",
        "config": result["config"], "expected": {"outcome": "pass", "trace_hash": result["trace_hash"]}
    });
    let path = std::env::temp_dir().join(format!("cowsim-replay-{}.json", std::process::id()));
    std::fs::write(&path, file.to_string()).unwrap();
    let replay = sim(&["replay", path.to_str().unwrap()]);
    assert_eq!(replay.status.code(), Some(0), "{}", stderr(&replay));
    assert!(stderr(&replay).contains("replay reproduced"), "{}", stderr(&replay));
    let _ = std::fs::remove_file(&path);
}

#[test]
fn replaying_a_shrunk_seed_file_names_the_file_to_replay() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../seeds/cow-amplification-2-none-shrunk.json");
    let replay = sim(&["replay", file]);
    assert_eq!(replay.status.code(), Some(1), "it records a failure: {}", stderr(&replay));
    assert!(stderr(&replay).contains("replay reproduced"), "{}", stderr(&replay));
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(stdout.contains(&format!("replay  cargo run --release --bin sim -- replay {file}")), "{stdout}");
}

#[test]
fn workload_files_run_and_bad_ones_name_the_line() {
    let dir = std::env::temp_dir().join(format!("cowsim-workload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.txt");
    std::fs::write(&good, "mkdir d\ncreate d/f\nsync\n").unwrap();
    let output = sim(&["run", "--workload", good.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("scenario workload"));
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, "mkdir d\nmkdri e\n").unwrap();
    assert_bad_input(&["run", "--workload", bad.to_str().unwrap()], "line 2: unknown operation 'mkdri'");
    assert_bad_input(&["run", "--workload", good.to_str().unwrap(), "--nodesize", "12288"], "bad --nodesize");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn list_names_scenarios_and_fixes() {
    let output = sim(&["list"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("device-stress"));
    for fix in ["none", "search-pin", "overwrite-written", "inhibit-writeback", "both"] {
        assert!(text.contains(fix), "{text}");
    }
}

#[test]
fn merge_fails_only_on_a_failure_no_known_seed_file_has() {
    let dir = std::env::temp_dir().join(format!("cowsim-cli-known-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (out, known, empty) = (dir.join("sweep"), dir.join("known"), dir.join("empty"));
    std::fs::create_dir_all(&known).unwrap();
    std::fs::create_dir_all(&empty).unwrap();
    let out_arg = out.to_string_lossy().into_owned();
    // Seed 2 of none aborts in the commit, as the shrunk seed file in seeds/ records.
    let swept = sim(&["sweep", "--seeds", "2", "--fix", "none", "--out", &out_arg]);
    assert_eq!(swept.status.code(), Some(1), "{}", stderr(&swept));
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../seeds/cow-amplification-2-none-shrunk.json"),
        known.join("known.json"),
    )
    .unwrap();
    let merged = sim(&["merge", &out_arg, "--known", &known.to_string_lossy()]);
    assert_eq!(merged.status.code(), Some(0), "a known failure: {}", stderr(&merged));
    let merged = sim(&["merge", &out_arg, "--known", &empty.to_string_lossy()]);
    assert_eq!(merged.status.code(), Some(1));
    assert!(
        stderr(&merged).contains("NEW failure: enospc_abort in btrfs_commit_transaction"),
        "{}",
        stderr(&merged)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
