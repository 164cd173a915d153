//! Every seed file under `seeds/` is a regression test: it must reproduce
//! its recorded outcome, first violation and trace hash. A failing seed of
//! a known bug keeps failing the same way; a fixed bug's seed records that
//! it passes now.

use std::path::PathBuf;

use sim::pool::{Caught, run_caught};
use sim::seedfile::{Expected, SeedFile};

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../seeds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_file_reproduces_its_recorded_outcome() {
    let files = corpus();
    assert!(files.len() >= 4, "the corpus went missing: {files:?}");
    let mut diverged = Vec::new();
    for path in &files {
        let file = SeedFile::load(path).unwrap_or_else(|e| panic!("{e}"));
        let scenario = scenarios::by_name(&file.scenario).unwrap();
        let got = match run_caught(&*scenario, &file.spec()).unwrap() {
            Caught::Finished(result) => Expected::of(&result),
            Caught::Panicked(message) => panic!("{}: {message}", path.display()),
        };
        if got != file.expected {
            diverged.push(format!("{}: expected {:?}, got {:?}", path.display(), file.expected, got));
        }
    }
    assert!(diverged.is_empty(), "seed files that no longer reproduce:\n{}", diverged.join("\n"));
}
