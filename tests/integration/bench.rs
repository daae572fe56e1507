//! `cdc-sink bench` end to end at small sizes: every path, the backlog drain in a child sink,
//! the scaling curve and the demo's lag, printed as one JSON line whose figures hang together.

#[test]
fn the_benchmark_measures_every_path_the_drain_the_curve_and_the_lag() {
    let s = crate::support::process::run_json(&[
        "bench",
        "--rows",
        "3000",
        "--batch-bytes",
        "256KiB",
        "--drain-rows",
        "4000",
        "--scale",
        "1000,2000",
        "--lag-rate",
        "50",
        "--lag-duration",
        "3s",
        "--json",
    ]);
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or_else(|| panic!("number: {v} in {s}"));
    for key in [
        "baseline_rows_per_s",
        "immediate_ratio",
        "best_effort_ratio",
        "consistent_ratio",
        "userscript_ratio",
        "drain_ratio",
        "lag_p99_seconds",
        "dispatch_docs_per_s",
    ] {
        assert!(num(&s[key]) > 0.0, "{key} in {s}");
    }
    assert!(num(&s["userscript_cost"]).abs() < 1.0, "{s}");

    let drain = &s["drain"];
    assert_eq!(drain["rows"], 4000, "{s}");
    assert_eq!(num(&drain["ratio"]), num(&s["drain_ratio"]));
    // 4,000 rows at 50 rows per second of source time: 80 s, less one timestamp's step.
    assert!((num(&drain["span_seconds"]) - 78.0).abs() < 0.01, "{drain}");
    assert!(
        num(&drain["peak_rss_mib"]) > 1.0,
        "the sink's memory is read: {drain}"
    );
    let samples = drain["samples"].as_array().expect("samples");
    assert_eq!(samples[0]["remaining_rows"], 4000, "{drain}");
    assert_eq!(samples[samples.len() - 1]["remaining_rows"], 0, "{drain}");
    assert!(
        samples
            .windows(2)
            .all(|w| w[1]["remaining_rows"].as_u64() <= w[0]["remaining_rows"].as_u64()),
        "the backlog only falls: {drain}"
    );

    let scaling = s["scaling"].as_array().expect("scaling rows");
    assert_eq!(scaling.len(), 2, "{s}");
    for (row, n) in scaling.iter().zip([1000, 2000]) {
        assert_eq!(row["rows"], n, "{row}");
        assert!(num(&row["consistent_rows_per_s"]) > 0.0, "{row}");
        // Every staged row was applied and deleted: none is live in the staging table (the
        // dead ones are pruned as pages are read again, so at most all of them remain).
        assert_eq!(row["staging"]["live_tuples"], 0, "{row}");
        assert!(row["staging"]["dead_tuples"].as_u64() <= Some(n), "{row}");
        assert!(num(&row["staging"]["bytes"]) > 0.0, "{row}");
        assert_eq!(row["target"]["live_tuples"], n, "{row}");
        assert!(num(&row["target"]["bytes"]) > 0.0, "{row}");
    }
    assert_eq!(num(&scaling[0]["relative"]), 1.0);

    let lag = &s["lag"];
    assert_eq!(lag["converged"], true, "{lag}");
    assert!(num(&lag["rows_per_s"]) > 0.0, "{lag}");
    assert!(
        num(&lag["p99_seconds"]) >= num(&lag["p50_seconds"]),
        "{lag}"
    );
}
