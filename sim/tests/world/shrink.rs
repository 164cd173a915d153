//! `sim shrink`: a failing `none` seed shrinks to a reproducer with far
//! fewer operations that replays to the same fingerprint.

use engine::fix::FixPolicy;
use sim::runner::{RunSpec, run};
use sim::seedfile::{Expected, Fingerprint, SeedFile};
use sim::shrink::shrink;

#[test]
fn a_failing_none_seed_shrinks_to_far_fewer_operations_and_replays() {
    let scenario = scenarios::by_name("cow-amplification").unwrap();
    let original = run(&RunSpec::new("cow-amplification", 2, FixPolicy::None), &*scenario).unwrap();
    let fingerprint = Fingerprint::of(&original).expect("seed 2 fails under none");
    let file = SeedFile::from_result(&original, false);
    let shrunk = shrink(&file, 100, |_, _| {}).unwrap();
    assert_eq!(shrunk.fingerprint, fingerprint);
    assert_eq!(shrunk.file.expected.fingerprint(), Some(fingerprint));
    assert!(
        shrunk.after.ops_completed * 4 <= shrunk.before.ops_completed,
        "far fewer operations: {:?} -> {:?}",
        shrunk.before,
        shrunk.after
    );
    assert!(shrunk.after.decisions < shrunk.before.decisions);

    // The shrunk file, written and read back, replays exactly.
    let text = serde_json::to_string_pretty(&shrunk.file).unwrap();
    let reloaded = SeedFile::parse(&text).unwrap();
    let replayed = run(&reloaded.spec(), &*scenario).unwrap();
    assert_eq!(Expected::of(&replayed), reloaded.expected);

    // A passing run has nothing to shrink.
    let mut passing = file.clone();
    passing.expected = Expected {
        outcome: sim::runner::Outcome::Pass,
        trace_hash: String::new(),
        violation: None,
        location: None,
    };
    assert!(shrink(&passing, 5, |_, _| {}).err().unwrap().contains("records a pass"));
}
