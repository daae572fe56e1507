//! `cdc-sink demo` end to end: two clusters, two sinks with the active-active userscript, two
//! changefeed emulators and conflicting workloads converge.

use std::process::Command;

fn run_demo(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args([
            "demo",
            "--duration",
            "4s",
            "--rate",
            "40",
            "--json",
            "--converge-timeout",
            "60s",
        ])
        .args(extra)
        .output()
        .expect("run cdc-sink demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("json summary")
}

fn check(s: &serde_json::Value) {
    assert_eq!(s["converged"], true, "{s}");
    assert_eq!(s["divergent_rows"], 0, "{s}");
    assert_eq!(s["east_rows"], s["west_rows"], "{s}");
    assert!(
        s["east_writes"].as_u64().unwrap() > 0 && s["west_writes"].as_u64().unwrap() > 0,
        "{s}"
    );
    // Both sides wrote the same keys at the same time: conflicts happened, and each key left
    // at most one losing version in a dead-letter queue.
    let dlq = s["dlq_rows_east"].as_u64().unwrap() + s["dlq_rows_west"].as_u64().unwrap();
    assert!(dlq > 0 && dlq <= s["east_rows"].as_u64().unwrap(), "{s}");
    // The feeds authenticated: the sinks accepted their tokens.
    assert!(s["token_requests"].as_u64().unwrap() > 0, "{s}");
    for key in ["rows_per_second", "lag_p50_seconds", "lag_p99_seconds"] {
        assert!(s[key].as_f64().is_some(), "{key} in {s}");
    }
}

#[test]
fn the_demo_converges_under_conflicting_workloads() {
    check(&run_demo(&[]));
}

#[test]
fn the_demo_converges_with_chaotic_feeds() {
    check(&run_demo(&["--chaos", "0.3"]));
}
