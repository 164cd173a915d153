//! `sim compare`: the JSON matches the runs it summarizes, the output does
//! not depend on `--jobs`, bad input is one line and exit 2.

use std::process::{Command, Output};

use engine::fix::FixPolicy;
use sim::compare::{ViolationClass, classify};
use sim::runner::{RunSpec, run};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sim")).args(args).env_remove("RUST_LOG").output().expect("sim runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn compare(args: &[&str]) -> String {
    let output = sim(&[&["compare"], args].concat());
    assert_eq!(output.status.code(), Some(0), "{args:?}: {}", stderr(&output));
    stdout(&output)
}

/// The `--json` text `sim compare` must print for `scenario` and seeds
/// `start..end`, built from runs made here, one by one, in this process.
fn expected_json(scenario_name: &str, start: u64, end: u64) -> String {
    let scenario = scenarios::by_name(scenario_name).unwrap();
    let mut fixes = Vec::new();
    for fix in FixPolicy::ALL {
        let (mut reservation, mut safety, mut liveness, mut max, mut ops) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
        let mut p99s = Vec::new();
        let mut first_failing = None;
        for seed in start..end {
            let result = run(&RunSpec::new(scenario_name, seed, fix), &*scenario).unwrap();
            let classes: Vec<ViolationClass> = result.violations.iter().map(|v| classify(&v.kind)).collect();
            reservation += classes.contains(&ViolationClass::Reservation) as u64;
            safety += classes.contains(&ViolationClass::Safety) as u64;
            liveness += classes.contains(&ViolationClass::Liveness) as u64;
            let mut run_kinds: Vec<&str> = result.violations.iter().map(|v| v.kind.as_str()).collect();
            run_kinds.sort();
            run_kinds.dedup();
            for kind in run_kinds {
                *kinds.entry(kind.to_string()).or_default() += 1;
            }
            if !classes.is_empty() && first_failing.is_none() {
                first_failing = Some(seed);
            }
            if let Some(cows) = result.stats.get("searches").map(|s| &s["cows_per_search"]) {
                max = max.max(cows["max"].as_u64().unwrap());
                p99s.push(cows["p99"].as_u64().unwrap());
            }
            ops += result.ops_completed;
        }
        p99s.sort();
        let p99 = if p99s.is_empty() { 0 } else { p99s[(p99s.len() * 99).div_ceil(100) - 1] };
        let first = first_failing.map_or("null".to_string(), |seed| seed.to_string());
        let kinds: Vec<String> = kinds.iter().map(|(kind, n)| format!("\"{kind}\":{n}")).collect();
        let kinds = kinds.join(",");
        fixes.push(format!(
            "{{\"fix\":\"{fix}\",\"seeds_run\":{},\"reservation_violation_seeds\":{reservation},\
             \"safety_violation_seeds\":{safety},\"liveness_violation_seeds\":{liveness},\
             \"violation_kind_seeds\":{{{kinds}}},\"max_cows_per_search\":{max},\
             \"p99_cows_per_search\":{p99},\"ops_completed\":{ops},\"first_failing_seed\":{first}}}",
            end - start
        ));
    }
    format!(
        "{{\"scenario\":\"{scenario_name}\",\"seeds\":[{start},{end}],\"fixes\":[{}]}}\n",
        fixes.join(",")
    )
}

#[test]
fn compare_json_has_the_shape_and_the_counts_of_the_runs() {
    for (scenario, start, end) in [("device-stress", 3, 7), ("fs-crash", 0, 5)] {
        let range = format!("{start}..{end}");
        let got = compare(&["--scenario", scenario, "--seeds", &range, "--json"]);
        assert_eq!(got, expected_json(scenario, start, end), "{scenario} {range}");
        let value: serde_json::Value = serde_json::from_str(&got).unwrap();
        let names: Vec<&str> =
            value["fixes"].as_array().unwrap().iter().map(|f| f["fix"].as_str().unwrap()).collect();
        assert_eq!(names, ["none", "search-pin", "overwrite-written", "inhibit-writeback", "both"]);
        assert!(!got.contains("wall"), "wall-clock time must stay out of the JSON: {got}");
    }
    // fs-crash runs the engine: its searches COW; device-stress has no searches.
    let fs: serde_json::Value =
        serde_json::from_str(&compare(&["--scenario", "fs-crash", "--seeds", "0..3", "--json"])).unwrap();
    assert!(fs["fixes"][0]["max_cows_per_search"].as_u64().unwrap() >= 1, "{fs}");
    assert!(fs["fixes"][0]["ops_completed"].as_u64().unwrap() > 0, "{fs}");
}

#[test]
fn compare_output_is_the_same_for_any_jobs() {
    let args = |jobs: &'static str, json: bool| {
        let mut args = vec!["--scenario", "fs-crash", "--seeds", "2..10", "--jobs", jobs];
        if json {
            args.push("--json");
        }
        compare(&args)
    };
    let one = args("1", true);
    assert_eq!(one, args("2", true), "--jobs 1 and --jobs 2 differ");
    assert_eq!(one, args("5", true), "--jobs 1 and --jobs 5 differ");
    assert_eq!(args("1", false), args("3", false), "tables differ");
}

#[test]
fn compare_table_has_one_row_per_fix_in_the_given_order() {
    let output = sim(&["compare", "--scenario", "device-stress", "--seeds", "0..3", "--fixes", "both,none"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[1].contains("p99") && lines[1].contains("over runs"),
        "the header says what p99 is: {text}"
    );
    assert!(lines[2].starts_with("fix "), "{text}");
    assert_eq!(lines.len(), 8, "{text}");
    assert!(lines[5].starts_with("seeds per violation kind"), "{text}");
    assert!(lines[3].starts_with("both ") && lines[4].starts_with("none "), "{text}");
    // No engine in device-stress: the COW columns say so.
    assert!(lines[3].contains(" - "), "{text}");
    assert!(stderr(&output).contains("wall-clock"), "{}", stderr(&output));
}

#[test]
fn compare_bad_input_is_one_line_and_exit_2() {
    for (args, needle) in [
        (&["--scenario", "fs-crash", "--seeds", "0..3", "--fixes", "none,magic"][..], "unknown fix 'magic'"),
        (&["--scenario", "fs-crash", "--seeds", "0..3", "--fixes", "none,none"][..], "listed twice"),
        (&["--scenario", "fs-crash", "--seeds", "0..3", "--fixes", ""][..], "bad --fixes"),
        (&["--scenario", "fs-crash", "--seeds", "9..3"][..], "bad seed range '9..3'"),
        (&["--scenario", "fs-crash", "--seeds", "x..3"][..], "bad seed range"),
        (&["--scenario", "fs-crash", "--seeds", "0..3", "--jobs", "0"][..], "bad --jobs 0"),
        (&["--scenario", "nope", "--seeds", "0..3"][..], "unknown scenario 'nope'"),
    ] {
        let output = sim(&[&["compare"], args].concat());
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: expected '{needle}' in: {text}");
        assert_eq!(text.lines().count(), 1, "{args:?}: one line: {text}");
        assert!(stdout(&output).is_empty(), "{args:?}: {}", stdout(&output));
    }
}

#[test]
fn compare_classifies_violation_kinds() {
    for kind in ["reservation_overdraw", "trans_rsv_overdrawn", "migrate_enospc", "enospc_abort"] {
        assert_eq!(classify(kind), ViolationClass::Reservation, "{kind}");
    }
    for kind in [
        "tree_checker",
        "modified_under_writeback",
        "check",
        "crash_namespace",
        "mount",
        "namespace",
        "durability",
        "transaction_abort",
        "io_error",
        "panic",
        "reservation",
        "",
    ] {
        assert_eq!(classify(kind), ViolationClass::Safety, "{kind}");
    }
    for kind in ["deadlock", "stall", "no_progress", "step_limit", "time_limit"] {
        assert_eq!(classify(kind), ViolationClass::Liveness, "{kind}");
    }
}
