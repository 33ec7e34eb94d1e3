//! Replays the committed fuzz corpus on stable, without libFuzzer: every file
//! under `fuzz/corpus/TARGET/` (the minimised corpus of the fuzz runs),
//! `fuzz/seeds/TARGET/` (hand-made starting inputs) and
//! `fuzz/regressions/TARGET/` (crashes found, once fixed) goes through
//! the function the fuzz target `TARGET` calls (`fuzz/src/lib.rs`, included
//! here), which must not panic and asserts its parser's invariants. So CI
//! catches a parser regression on the inputs fuzzing found interesting, and
//! every crash fuzzing found stays fixed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../fuzz/src/lib.rs"]
mod entries;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// The files of one target's folder under `fuzz/KIND/`, sorted (none if the
/// folder does not exist).
fn inputs(kind: &str, target: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every input of `target`, naming each one that panics.
fn replay(target: &str) {
    let (_, run) = entries::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap();
    let corpus = inputs("corpus", target);
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty: the corpus was not committed"
    );
    let mut failed = Vec::new();
    let seeds = inputs("seeds", target);
    for file in corpus
        .iter()
        .chain(&seeds)
        .chain(&inputs("regressions", target))
    {
        let data = fs::read(file).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: these inputs fail: {failed:#?}"
    );
}

#[test]
fn every_target_has_a_replay_test() {
    let here = include_str!("fuzz_corpus.rs");
    for (name, _) in entries::TARGETS {
        assert!(here.contains(&format!("replay(\"{name}\")")), "{name}");
        let target = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/fuzz_targets")
            .join(format!("{name}.rs"));
        assert!(target.is_file(), "no fuzz target {}", target.display());
    }
}

#[test]
fn token_corpus() {
    replay("token");
}

#[test]
fn secret_path_corpus() {
    replay("secret_path");
}

#[test]
fn policy_corpus() {
    replay("policy");
}

#[test]
fn jwt_corpus() {
    replay("jwt");
}

#[test]
fn jwks_corpus() {
    replay("jwks");
}

#[test]
fn cert_corpus() {
    replay("cert");
}

#[test]
fn duration_cron_corpus() {
    replay("duration_cron");
}

#[test]
fn cidr_corpus() {
    replay("cidr");
}

#[test]
fn share_corpus() {
    replay("share");
}

#[test]
fn audit_corpus() {
    replay("audit");
}

/// The seeds built by hand get past each format's checksum or signature, so
/// fuzzing starts from inputs that reach the checks behind them (a builder in
/// `fuzz/src/lib.rs` that got a format wrong would leave those checks unfuzzed).
#[test]
fn the_seeds_reach_past_checksums_and_signatures() {
    let seed = |target: &str, name: &str| {
        fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/seeds")
                .join(target)
                .join(format!("seed-{name}")),
        )
        .unwrap()
    };
    let token = seed("token", "valid");
    assert!(keyward::token::format::looks_like_token(
        std::str::from_utf8(&token[1..]).unwrap()
    ));
    let share = seed("share", "valid");
    let share = std::str::from_utf8(&share[1..]).unwrap();
    let printed = keyward::barrier::share_text_round_trip(share).unwrap();
    assert_eq!(printed.as_str(), share.trim());
    let jwt = entries::jwt_verify(&seed("jwt", "signed"))
        .unwrap()
        .unwrap();
    assert_eq!(jwt.subject(), "ci");
    assert!(entries::jwt_verify(&seed("jwt", "signed-aud-array"))
        .unwrap()
        .is_ok());
    assert!(entries::jwt_verify(&seed("jwt", "signed-expired"))
        .unwrap()
        .is_err());
    let audit = seed("audit", "raw-good");
    let report = keyward::audit::verify_bytes(&audit[1..]).unwrap();
    assert!(report.ok && report.records == 3, "{report:?}");
    let swapped = seed("audit", "raw-swapped");
    let report = keyward::audit::verify_bytes(&swapped[1..]).unwrap();
    assert_eq!(report.first_bad, Some(1));
}
