//! The scenario reports under `reports/`, kept as insta snapshots: a change
//! of configuration, outcome, metrics or the fix comparison makes this test
//! fail until the new report is accepted (`cargo insta review`, or
//! `INSTA_UPDATE=always cargo test` and a look at the diff).

use engine::fix::FixPolicy;
use sim::compare::{CompareSpec, compare};
use sim::report::{SeedRange, scenario_report};
use sim::runner::{RunSpec, run};

/// The seed each scenario's report runs.
const REPORT_SEED: u64 = 2;

/// The `workload` scenario's report replays the README's example file.
const WORKLOAD: &str = "mkdir d\ncreate d/f1\nlink d/f1 d/f2\nmkdir e\nrename d/f1 e/f1\nunlink d/f2\nunlink e/f1\nrmdir e\nsync\n";

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({
        snapshot_path => "../../../reports",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!(name, text);
    });
}

#[test]
fn scenario_reports_match_their_snapshots() {
    for scenario in scenarios::all() {
        let name = scenario.name();
        let mut spec = RunSpec::new(name, REPORT_SEED, FixPolicy::None);
        if name == "workload" {
            spec.params = Some(scenarios::fs_workload::FsWorkload::params(WORKLOAD, 16384));
        }
        let result = run(&spec, &*scenario).unwrap();
        let comparison = (name == scenarios::DEFAULT_SCENARIO).then(|| {
            let spec = CompareSpec {
                scenario: name.to_string(),
                seeds: SeedRange { start: 0, end: 4 },
                fixes: FixPolicy::ALL.to_vec(),
                jobs: 2,
            };
            compare(&spec).unwrap()
        });
        snapshot(name, &scenario_report(&result, comparison.as_ref()));
    }
}
