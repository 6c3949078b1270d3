//! Replays every input kept under `fuzz/`: the seed corpus
//! (`fuzz/seeds/<target>/`) and every bug's regression input
//! (`fuzz/regressions/<target>/<bug-name>`), through the same function the
//! fuzz target runs ([`crate::targets`]). So a bug found by fuzzing stays
//! fixed in every `cargo test`.

use std::path::{Path, PathBuf};

use crate::targets::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs every file of `dir/<target>/` through its target; returns how many
/// files ran. A directory that names no target fails the test, so that an
/// input cannot sit there unreplayed.
fn replay(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let target_dir = entry.unwrap().path();
        let name = target_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let Some((_, run)) = TARGETS.iter().find(|(t, _)| *t == name) else {
            panic!("{}: no fuzz target is named {name}", target_dir.display());
        };
        for file in std::fs::read_dir(&target_dir).unwrap() {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(outcome.is_ok(), "{} fails its target", path.display());
            count += 1;
        }
    }
    count
}

#[test]
fn every_seed_replays_and_every_target_has_seeds() {
    let seeds = fuzz_dir().join("seeds");
    for (name, _) in TARGETS {
        let dir = seeds.join(name);
        let n = std::fs::read_dir(&dir).map(Iterator::count).unwrap_or(0);
        assert!(n > 0, "{} holds no seed", dir.display());
    }
    assert!(replay(&seeds) >= TARGETS.len());
}

#[test]
fn every_regression_input_replays() {
    let dir = fuzz_dir().join("regressions");
    // Each bug found by fuzzing or by these properties left one file.
    assert!(
        replay(&dir) > 0,
        "{} holds no regression input",
        dir.display()
    );
}
