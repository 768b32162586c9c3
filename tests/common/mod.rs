//! What the end-to-end tests share: running the `omr` binary and the synthetic set.
#![allow(dead_code)] // each test binary uses a different part

use std::path::Path;
use std::process::{Command, Output};

pub fn omr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_omr"))
        .args(args)
        .env("OMR_LOG", "warn")
        .output()
        .expect("omr runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = omr(args);
    assert!(
        out.status.success(),
        "omr {args:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `omr data synth` into `out` with a tokenizer of `vocab` ids.
pub fn synth(out: &Path, train: u32, test: u32, seed: u64, vocab: u32) {
    let (train, test, seed, vocab) = (
        train.to_string(),
        test.to_string(),
        seed.to_string(),
        vocab.to_string(),
    );
    ok(&[
        "data",
        "synth",
        "--out",
        s(out),
        "--train",
        &train,
        "--test",
        &test,
        "--seed",
        &seed,
        "--vocab-size",
        &vocab,
    ]);
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
