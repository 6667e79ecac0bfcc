//! `cordon-bench`'s arguments: help and mistakes answer at once, without
//! starting a benchmark.

use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_cordon-bench");

#[test]
fn help_prints_usage_and_runs_nothing() {
    for flag in ["--help", "-h"] {
        let out = Command::new(BENCH).arg(flag).output().unwrap();
        assert!(out.status.success(), "{flag}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: cordon-bench [MACHINES]"), "{text}");
    }
}

#[test]
fn a_bad_argument_is_refused_with_a_message() {
    for args in [&["--bogus"][..], &["many"], &["0"], &["10", "20"]] {
        let out = Command::new(BENCH).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(error.contains("error:"), "{args:?}: {error}");
    }
}
