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

#[test]
fn the_fleet_benchmark_documents_its_flags() {
    let out = Command::new(BENCH)
        .args(["fleet", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--agents",
        "--rate",
        "--duration",
        "--json",
        "--restart-after",
        "--offline-probes",
        "--server",
    ] {
        assert!(text.contains(flag), "{flag} missing: {text}");
    }
    // The API benchmark stays the default, and is a subcommand too.
    let out = Command::new(BENCH).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("api") && text.contains("fleet"), "{text}");
}

#[test]
fn a_bad_fleet_argument_is_refused_before_anything_starts() {
    for args in [
        &["fleet", "--agents", "0"][..],
        &["fleet", "--ca", "ca.pem"],
        &["fleet", "--server", "https://localhost:8443"],
        &["fleet", "--bogus"],
        &["api", "0"],
        &["10", "fleet"],
    ] {
        let out = Command::new(BENCH).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(error.contains("error:"), "{args:?}: {error}");
    }
}
