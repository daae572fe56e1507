//! The deployment files (demo/, prometheus/, grafana/) checked without a Docker engine: the
//! compose file parses (PyYAML through python3, as CI installs it) and everything it names
//! exists; every cdc-sink command line in it parses with our CLI; `haproxy -c` on each balancer
//! config; `promtool check config` and `check rules`; every metric a dashboard panel or an alert
//! rule queries is one a real sink serves after traffic, or a documented CockroachDB, HAProxy or
//! Prometheus name kept below; the reference's metric families are served with its types and
//! labels; a real Prometheus scraping an in-process sink answers every cdc-sink panel query and
//! the reference dashboards' reads of its families; a real HAProxy running the balancer config balances one HTTP/2
//! connection request by request, follows `/_/healthz` and exports the names we use; `cdc-sink healthcheck` answers like the image's HEALTHCHECK needs; the
//! image's Rust is new enough for Cargo.lock. What cannot run here is the stack itself (images,
//! containers, CockroachDB, Grafana).

use crate::support::sink::{batch, committed, delete, hlc, resolved, upsert, Sink};
use crate::support::Db;
use clap::Parser;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Metrics the dashboard and alerts query that other programs serve: CockroachDB's
/// `/_status/vars` (dots become underscores; not runnable here), HAProxy's prometheus-exporter
/// (checked against a real HAProxy below), and Prometheus's own per-target `up`.
const DOCUMENTED_ELSEWHERE: &[&str] = &[
    // CockroachDB changefeed metrics.
    "changefeed_emitted_messages",
    "changefeed_emitted_bytes",
    "changefeed_error_retries",
    "changefeed_failures",
    "changefeed_commit_latency_bucket",
    "changefeed_backfill_pending_ranges",
    // HAProxy's exporter.
    "haproxy_backend_http_responses_total",
    "haproxy_backend_active_servers",
    // Prometheus.
    "up",
];

/// The Go cdc-sink's metric families (and `log_message_count`) that its
/// dashboards read: name, type and label names as we serve them, and whether the traffic of
/// [`sink_after_traffic`] makes a series of it (the others need another sequencing mode, an
/// authenticated sink or a retried statement; they are checked when present). Deviations: our
/// `cdc_sink_info` carries `version` instead of Go's build labels, and `core_sweep_active_bool`
/// is per schema (the lease is), without a `table` label.
const REFERENCE_FAMILIES: &[(&str, &str, &[&str], bool)] = &[
    ("cdc_sink_info", "gauge", &["version"], true),
    ("cdc_sink_start_seconds", "gauge", &[], true),
    ("http_status_codes_total", "counter", &["code"], true),
    ("http_latency_seconds", "histogram", &[], true),
    ("http_payload_in_bytes_total", "histogram", &[], true),
    (
        "mutations_received_count",
        "counter",
        &["kind", "target"],
        true,
    ),
    (
        "mutations_success_count",
        "counter",
        &["kind", "target"],
        true,
    ),
    (
        "mutations_error_count",
        "counter",
        &["kind", "target"],
        true,
    ),
    (
        "target_applied_timestamp_seconds",
        "gauge",
        &["kind", "target"],
        true,
    ),
    (
        "target_pending_timestamp_seconds",
        "gauge",
        &["kind", "target"],
        true,
    ),
    ("target_lag_seconds", "gauge", &["kind", "target"], true),
    ("source_lag_seconds", "gauge", &["kind", "target"], true),
    (
        "checkpoint_advance_duration_seconds",
        "histogram",
        &["schema"],
        true,
    ),
    (
        "checkpoint_commit_duration_seconds",
        "histogram",
        &["schema"],
        true,
    ),
    (
        "checkpoint_refresh_duration_seconds",
        "histogram",
        &["schema"],
        true,
    ),
    (
        "checkpoint_committed_age_seconds",
        "gauge",
        &["schema"],
        true,
    ),
    (
        "checkpoint_committed_time_seconds",
        "gauge",
        &["schema"],
        true,
    ),
    (
        "checkpoint_proposed_age_seconds",
        "gauge",
        &["schema"],
        true,
    ),
    (
        "checkpoint_proposed_time_seconds",
        "gauge",
        &["schema"],
        true,
    ),
    (
        "checkpoint_proposed_going_backwards_errors",
        "counter",
        &["schema"],
        true,
    ),
    (
        "stage_mutations_total",
        "counter",
        &["schema", "table"],
        true,
    ),
    (
        "stage_duplicate_mutations_total",
        "counter",
        &["schema", "table"],
        true,
    ),
    ("stage_errors_total", "counter", &["schema", "table"], true),
    (
        "stage_duration_seconds",
        "histogram",
        &["schema", "table"],
        true,
    ),
    ("stage_read_rows", "counter", &["schema", "table"], true),
    (
        "stage_read_duration_seconds",
        "histogram",
        &["schema", "table"],
        true,
    ),
    (
        "stage_read_lag_seconds",
        "gauge",
        &["schema", "table"],
        true,
    ),
    (
        "stage_read_queue_count",
        "gauge",
        &["schema", "table"],
        true,
    ),
    ("stage_merge_lag_seconds", "gauge", &["schema"], true),
    ("stage_merge_queue_count", "gauge", &["schema"], true),
    (
        "stage_retire_duration_seconds",
        "histogram",
        &["schema", "table"],
        true,
    ),
    (
        "stage_retire_errors_total",
        "counter",
        &["schema", "table"],
        true,
    ),
    (
        "stage_stale_mutations_count",
        "gauge",
        &["schema", "table"],
        true,
    ),
    ("apply_upserts_total", "counter", &["schema", "table"], true),
    ("apply_deletes_total", "counter", &["schema", "table"], true),
    ("apply_errors_total", "counter", &["schema", "table"], true),
    (
        "apply_conflicts_total",
        "counter",
        &["schema", "table"],
        true,
    ),
    (
        "apply_resolves_total",
        "counter",
        &["schema", "table"],
        true,
    ),
    (
        "apply_duration_seconds",
        "histogram",
        &["schema", "table"],
        true,
    ),
    (
        "apply_mutation_age_seconds",
        "histogram",
        &["schema", "table"],
        true,
    ),
    ("core_sweep_active_bool", "gauge", &["schema"], true),
    ("core_sweep_apply_count", "counter", &["schema"], true),
    (
        "core_sweep_duration_seconds",
        "histogram",
        &["schema"],
        true,
    ),
    (
        "core_sweep_attempt_timestamp_seconds",
        "gauge",
        &["schema"],
        true,
    ),
    (
        "core_sweep_success_timestamp_seconds",
        "gauge",
        &["schema"],
        true,
    ),
    ("core_sweep_skew_count", "counter", &["schema"], true),
    (
        "best_effort_accept_applied_count",
        "counter",
        &["schema", "table"],
        false,
    ),
    (
        "best_effort_accept_deferred_count",
        "counter",
        &["schema", "table"],
        false,
    ),
    (
        "best_effort_accept_error_count",
        "counter",
        &["schema", "table"],
        false,
    ),
    (
        "best_effort_accept_duration_seconds",
        "histogram",
        &["schema", "table"],
        false,
    ),
    (
        "sequencer_scheduler_executed_tasks_count",
        "counter",
        &[],
        true,
    ),
    (
        "sequencer_scheduler_executing_tasks_count",
        "gauge",
        &[],
        true,
    ),
    ("lockset_deferred_start_count", "counter", &["set"], true),
    ("lockset_immediate_start_count", "counter", &["set"], true),
    ("lockset_retried_tasks_count", "counter", &["set"], true),
    ("lockset_exec_wait_seconds", "histogram", &["set"], true),
    ("lockset_exec_complete_seconds", "histogram", &["set"], true),
    ("retry_actions_total", "counter", &[], true),
    ("retry_retried_total", "counter", &["code"], false),
    ("retry_aborted_total", "counter", &["code"], false),
    ("pool_acquire_wait_count", "counter", &["pool"], true),
    ("pool_acquire_wait_seconds", "gauge", &["pool"], true),
    ("pool_acquired_connection_count", "gauge", &["pool"], true),
    (
        "pool_constructing_connection_count",
        "gauge",
        &["pool"],
        true,
    ),
    ("pool_idle_connection_count", "gauge", &["pool"], true),
    ("pool_max_connection_count", "gauge", &["pool"], true),
    ("pool_dial_error_count", "counter", &["pool"], true),
    ("pool_dial_success_count", "counter", &["pool"], true),
    ("pool_dial_latency_seconds", "histogram", &["pool"], true),
    (
        "pool_sql_ready_latency_seconds",
        "histogram",
        &["pool"],
        true,
    ),
    ("stmtcache_hits_total", "counter", &[], true),
    ("stmtcache_misses_total", "counter", &[], true),
    ("stmtcache_releases_total", "counter", &[], true),
    ("stmtcache_drops_total", "counter", &[], true),
    ("script_entry_wait_seconds", "histogram", &[], true),
    ("script_exec_time_seconds", "histogram", &[], true),
    ("jwt_last_refresh_time", "gauge", &[], false),
    ("log_message_count", "counter", &["level"], true),
];

/// Queries over the reference's families the way its dashboards read them (histogram
/// quantiles, the maximum of lag gauges, counter rates, pool gauges); each must answer with a
/// series from a real Prometheus after [`sink_after_traffic`].
const REFERENCE_QUERIES: &[&str] = &[
    "cdc_sink_info",
    "time() - max(cdc_sink_start_seconds)",
    "max by (kind, target) (target_lag_seconds)",
    "max by (kind, target) (source_lag_seconds)",
    "max by (kind, target) (target_applied_timestamp_seconds)",
    "max by (kind, target) (target_pending_timestamp_seconds)",
    "sum by (kind, target) (rate(mutations_received_count[$__rate_interval]))",
    "sum by (kind, target) (rate(mutations_success_count[$__rate_interval]))",
    "sum by (kind, target) (rate(mutations_error_count[$__rate_interval]))",
    "sum by (code) (rate(http_status_codes_total[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le) (rate(http_latency_seconds_bucket[$__rate_interval])))",
    "histogram_quantile(0.99, sum by (le) (rate(http_payload_in_bytes_total_bucket[$__rate_interval])))",
    "max by (schema) (checkpoint_committed_age_seconds)",
    "max by (schema) (checkpoint_proposed_age_seconds)",
    "max by (schema) (checkpoint_committed_time_seconds)",
    "max by (schema) (checkpoint_proposed_time_seconds)",
    "histogram_quantile(0.99, sum by (le, schema) (rate(checkpoint_advance_duration_seconds_bucket[$__rate_interval])))",
    "histogram_quantile(0.99, sum by (le, schema) (rate(checkpoint_commit_duration_seconds_bucket[$__rate_interval])))",
    "histogram_quantile(0.99, sum by (le, schema) (rate(checkpoint_refresh_duration_seconds_bucket[$__rate_interval])))",
    "sum by (schema) (rate(checkpoint_proposed_going_backwards_errors[$__rate_interval]))",
    "sum by (schema, table) (rate(stage_mutations_total[$__rate_interval]))",
    "sum by (schema, table) (rate(stage_duplicate_mutations_total[$__rate_interval]))",
    "sum by (schema, table) (rate(stage_errors_total[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le, schema, table) (rate(stage_duration_seconds_bucket[$__rate_interval])))",
    "sum by (schema, table) (rate(stage_read_rows[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le, schema, table) (rate(stage_read_duration_seconds_bucket[$__rate_interval])))",
    "max by (schema, table) (stage_read_lag_seconds)",
    "max by (schema, table) (stage_read_queue_count)",
    "max by (schema) (stage_merge_lag_seconds)",
    "max by (schema) (stage_merge_queue_count)",
    "histogram_quantile(0.99, sum by (le, schema, table) (rate(stage_retire_duration_seconds_bucket[$__rate_interval])))",
    "sum by (schema, table) (rate(stage_retire_errors_total[$__rate_interval]))",
    "max by (schema, table) (stage_stale_mutations_count)",
    "sum by (schema, table) (rate(apply_upserts_total[$__rate_interval]))",
    "sum by (schema, table) (rate(apply_deletes_total[$__rate_interval]))",
    "sum by (schema, table) (rate(apply_errors_total[$__rate_interval]))",
    "sum by (schema, table) (rate(apply_conflicts_total[$__rate_interval]))",
    "sum by (schema, table) (rate(apply_resolves_total[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le, schema, table) (rate(apply_duration_seconds_bucket[$__rate_interval])))",
    "histogram_quantile(0.5, sum by (le, schema, table) (rate(apply_mutation_age_seconds_bucket[$__rate_interval])))",
    "max by (schema) (core_sweep_active_bool)",
    "sum by (schema) (rate(core_sweep_apply_count[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le, schema) (rate(core_sweep_duration_seconds_bucket[$__rate_interval])))",
    "time() - max by (schema) (core_sweep_attempt_timestamp_seconds)",
    "time() - max by (schema) (core_sweep_success_timestamp_seconds)",
    "sum by (schema) (rate(core_sweep_skew_count[$__rate_interval]))",
    "sum(rate(sequencer_scheduler_executed_tasks_count[$__rate_interval]))",
    "sum(sequencer_scheduler_executing_tasks_count)",
    r#"sum(rate(lockset_deferred_start_count{set="scheduler"}[$__rate_interval]))"#,
    r#"sum(rate(lockset_immediate_start_count{set="scheduler"}[$__rate_interval]))"#,
    r#"sum(rate(lockset_retried_tasks_count{set="scheduler"}[$__rate_interval]))"#,
    r#"histogram_quantile(0.99, sum by (le) (rate(lockset_exec_wait_seconds_bucket{set="scheduler"}[$__rate_interval])))"#,
    r#"histogram_quantile(0.99, sum by (le) (rate(lockset_exec_complete_seconds_bucket{set="scheduler"}[$__rate_interval])))"#,
    "sum(rate(retry_actions_total[$__rate_interval]))",
    "sum by (pool) (rate(pool_acquire_wait_count[$__rate_interval]))",
    "sum by (pool) (rate(pool_acquire_wait_seconds[$__rate_interval]))",
    "sum by (pool) (pool_acquired_connection_count)",
    "sum by (pool) (pool_constructing_connection_count)",
    "sum by (pool) (pool_idle_connection_count)",
    "sum by (pool) (pool_max_connection_count)",
    "sum by (pool) (rate(pool_dial_error_count[$__rate_interval]))",
    "sum by (pool) (rate(pool_dial_success_count[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le, pool) (rate(pool_dial_latency_seconds_bucket[$__rate_interval])))",
    "histogram_quantile(0.99, sum by (le, pool) (rate(pool_sql_ready_latency_seconds_bucket[$__rate_interval])))",
    "sum(rate(stmtcache_hits_total[$__rate_interval]))",
    "sum(rate(stmtcache_misses_total[$__rate_interval]))",
    "histogram_quantile(0.99, sum by (le) (rate(script_entry_wait_seconds_bucket[$__rate_interval])))",
    "histogram_quantile(0.99, sum by (le) (rate(script_exec_time_seconds_bucket[$__rate_interval])))",
    "sum by (level) (rate(log_message_count[$__rate_interval]))",
];

/// The profiles the seed's cleanup command names; every profile in the compose file must be one.
const PROFILES: &[&str] = &["monitor", "workload", "sql"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Runs a tool, insisting that it exists: CI installs it (.ci/run).
fn run_tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {program}: {e} (install it: .ci/run does with apt-get)")
        })
}

/// YAML as JSON, through python3's PyYAML (no YAML crate in our dependencies). Merge keys and
/// anchors are resolved, as docker compose resolves them.
fn yaml(rel: &str) -> Value {
    let path = root().join(rel);
    let out = run_tool(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            path.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        out.status.success(),
        "{rel} does not parse as YAML (python3 with PyYAML, package python3-yaml): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

fn services(compose: &Value) -> &serde_json::Map<String, Value> {
    compose["services"].as_object().expect("services")
}

fn one_shot(service: &Value) -> bool {
    service["restart"] == "no"
}

/// `${NAME}`, `${NAME:-default}` references to the host's environment or `.env` (`$${…}` is
/// the container's own shell and is skipped).
fn variables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("${") {
        let start = i + at;
        i = start + 2;
        if start > 0 && bytes[start - 1] == b'$' {
            continue;
        }
        let name: String = text[start + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

#[test]
fn the_compose_file_parses_and_everything_it_names_exists() {
    let compose = yaml("demo/docker-compose.yml");
    let services = services(&compose);
    let volumes: BTreeSet<&str> = compose["volumes"]
        .as_object()
        .expect("top-level volumes")
        .keys()
        .map(String::as_str)
        .collect();
    let demo = root().join("demo");

    for name in [
        "east",
        "west",
        "east_lb",
        "west_lb",
        "concurrent_workloads",
        "east_workload",
        "west_workload",
        "east_sql",
        "west_sql",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }

    let mut used_profiles = BTreeSet::new();
    for (name, svc) in services {
        // Healthchecks everywhere; only one-shot jobs (whose success dependents wait for) may
        // turn theirs off.
        let hc = &svc["healthcheck"];
        assert!(hc.is_object(), "{name}: no healthcheck");
        if hc["disable"] == true {
            assert!(
                one_shot(svc),
                "{name}: a long-running service without a healthcheck"
            );
        } else {
            assert!(hc["test"].is_array(), "{name}: healthcheck without a test");
        }
        if let Some(deps) = svc["depends_on"].as_object() {
            for (dep, how) in deps {
                let target = services
                    .get(dep)
                    .unwrap_or_else(|| panic!("{name} depends on unknown {dep}"));
                match how["condition"].as_str() {
                    Some("service_completed_successfully") => {
                        assert!(one_shot(target), "{name} waits for {dep} to complete")
                    }
                    Some("service_healthy") => assert!(
                        target["healthcheck"]["test"].is_array(),
                        "{name} waits for {dep} to be healthy, which has no healthcheck"
                    ),
                    other => panic!("{name} -> {dep}: condition {other:?}"),
                }
                // A default-profile service must not wait for one that only a profile starts.
                if svc.get("profiles").is_none() {
                    assert!(target.get("profiles").is_none(), "{name} -> {dep}");
                }
            }
        }
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let spec = v.as_str().expect("short volume syntax");
            let source = spec.split(':').next().expect("source");
            if source.starts_with('.') {
                assert!(
                    demo.join(source).exists(),
                    "{name}: bind mount {source} does not exist"
                );
            } else {
                assert!(
                    volumes.contains(source),
                    "{name}: volume {source} undeclared"
                );
            }
        }
        if let Some(build) = svc.get("build") {
            let context = demo.join(build["context"].as_str().expect("context"));
            assert!(context.join("Cargo.toml").exists(), "{name}: build context");
            assert!(
                context
                    .join(build["dockerfile"].as_str().expect("dockerfile"))
                    .exists(),
                "{name}: dockerfile"
            );
        }
        for p in svc["profiles"].as_array().into_iter().flatten() {
            let p = p.as_str().expect("profile");
            assert!(PROFILES.contains(&p), "{name}: profile {p}");
            used_profiles.insert(p.to_string());
        }
        // Files the containers read from the mounts.
        let text = svc.to_string();
        for (prefix, dir) in [("/init/", "demo/init"), ("/userscripts/", "userscripts")] {
            for (at, _) in text.match_indices(prefix) {
                let file: String = text[at + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                    .collect();
                assert!(
                    root().join(dir).join(&file).is_file(),
                    "{name}: {dir}/{file} does not exist"
                );
            }
        }
    }
    let all: BTreeSet<String> = PROFILES.iter().map(|p| p.to_string()).collect();
    assert_eq!(used_profiles, all);

    // Two sinks per direction behind one balancer each, every sink taking CDC_ARGS.
    let raw = read("demo/docker-compose.yml");
    for region in ["east", "west"] {
        let sinks: Vec<&String> = services
            .keys()
            .filter(|k| k.starts_with(&format!("{region}_sink_")))
            .collect();
        assert_eq!(sinks.len(), 2, "{region}: {sinks:?}");
        let lb = read(&format!("demo/haproxy/{region}.cfg"));
        for s in sinks {
            let command = services[s]["command"].as_str().expect("sink command");
            assert!(command.contains("${CDC_ARGS:-}"), "{s}: {command}");
            assert!(
                command.contains(&format!("@{region}:26257")),
                "{s}: {command}"
            );
            assert!(lb.contains(&format!("{s}:30004")), "{region}_lb lacks {s}");
        }
    }

    // Every variable has a documented default in .env.example, and the example lists no stale
    // one.
    let example = read("demo/.env.example");
    let documented: BTreeSet<String> = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect();
    assert_eq!(variables(&raw), documented);

    // The seed's command sequence is in demo/README.md, and its cleanup names every profile.
    let readme = read("demo/README.md");
    for cmd in [
        "docker compose up -d",
        "CDC_ARGS=--bestEffortOnly docker compose up -d",
        "docker compose port east 8080",
        "docker compose --profile monitor up -d",
        "docker compose port grafana 3000",
        "docker compose run --rm concurrent_workloads",
        "START_EAST=100000 docker compose run --rm concurrent_workloads",
        "docker compose run --rm east_workload",
        "docker compose run --rm -it west_sql",
        "docker compose --profile monitor --profile workload --profile sql down -v",
    ] {
        assert!(readme.contains(cmd), "demo/README.md lacks `{cmd}`");
    }

    // Every shell script and shell command line is valid syntax (`bash -n`; `$$` in compose
    // is a literal `$`).
    for entry in std::fs::read_dir(demo.join("init")).expect("demo/init") {
        let path = entry.expect("entry").path();
        let out = run_tool("bash", &["-n", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut shells = 0;
    for (name, svc) in services {
        if svc["entrypoint"][2].is_null() && svc["entrypoint"][1] == "-c" {
            shells += 1;
            let script = svc["command"][0]
                .as_str()
                .expect("shell command")
                .replace("$$", "$");
            let out = run_tool("bash", &["-n", "-c", &script]);
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // concurrent_workloads, east_workload, west_workload, east_auth, west_auth.
    assert_eq!(shells, 5);

    // The init scripts do what the issue lists.
    let cluster = read("demo/init/cluster.sh");
    for needle in [
        "kv.rangefeed.enabled = true",
        "CREATE DATABASE IF NOT EXISTS _cdc_sink",
        "_source STRING NOT VISIBLE DEFAULT '${REGION}' ON UPDATE '${REGION}'",
        "_timestamp TIMESTAMPTZ NOT VISIBLE DEFAULT now() + '1s' ON UPDATE now() + '1s'",
        "kv.cdc_sink_dlq",
        "COCKROACH_DEV_LICENSE",
    ] {
        assert!(cluster.contains(needle), "cluster.sh lacks {needle}");
    }
    let feed = read("demo/init/changefeed.sh");
    for needle in [
        "WITH diff, updated, resolved = '1s', min_checkpoint_frequency = '1s'",
        "webhook_sink_config",
        "webhook-https://${BALANCER}:30004/kv/public",
        "webhook_auth_header = 'Bearer ${token}'",
    ] {
        assert!(feed.contains(needle), "changefeed.sh lacks {needle}");
    }
}

/// Parses one cdc-sink command line with our CLI.
fn parses(argv: &[String]) {
    let argv: Vec<String> = std::iter::once("cdc-sink".to_string())
        .chain(argv.iter().cloned())
        .collect();
    if let Err(e) = cdc_sink::cli::Cli::try_parse_from(&argv) {
        panic!("{argv:?} does not parse: {e}");
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace()
        .map(|w| w.trim_matches('"').to_string())
        .collect()
}

#[test]
fn every_cdc_sink_command_line_in_the_demo_parses() {
    let compose = yaml("demo/docker-compose.yml");
    let services = services(&compose);
    let mut checked = 0;
    for svc in services.values() {
        let hc = &svc["healthcheck"]["test"];
        if hc[1] == "cdc-sink" {
            let argv: Vec<String> = hc.as_array().expect("test")[2..]
                .iter()
                .map(|v| v.as_str().expect("word").to_string())
                .collect();
            parses(&argv);
            checked += 1;
        }
        if let Some(cmd) = svc["command"].as_str() {
            if cmd.starts_with("start ") {
                parses(&words(&cmd.replace("${CDC_ARGS:-}", "")));
                // CDC_ARGS=--bestEffortOnly, as the seed shows.
                parses(&words(&cmd.replace("${CDC_ARGS:-}", "--bestEffortOnly")));
                checked += 1;
            }
        }
        // The *_auth jobs: `sh -c 'cdc-sink jwt keys … || cdc-sink jwt add-key …'`.
        if let Some(script) = svc["command"][0].as_str() {
            let target = svc["environment"]["TARGET"].as_str().unwrap_or_default();
            for part in script.split("||") {
                let part = part.split('|').next().expect("part");
                let ws = words(&part.replace("$$TARGET", target));
                if ws.first().map(String::as_str) == Some("cdc-sink") {
                    parses(&ws[1..]);
                    checked += 1;
                }
            }
        }
    }
    for line in read("demo/init/keys.sh").lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("cdc-sink ") {
            parses(&words(rest.split('>').next().expect("command")));
            checked += 1;
        }
    }
    // The image's own HEALTHCHECK.
    let dockerfile = read("demo/Dockerfile").replace("\\\n", " ");
    let hc = dockerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("HEALTHCHECK in demo/Dockerfile");
    let json_argv = &hc[hc.find("CMD [").expect("exec form") + 4..];
    let argv: Vec<String> = serde_json::from_str(json_argv).expect("JSON argv");
    assert_eq!(argv[0], "cdc-sink");
    parses(&argv[1..]);
    // 4 sinks + 4 sink healthchecks + 2 × 2 auth commands + 2 make-jwt lines.
    assert_eq!(checked, 14);
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("\nUSER cdc-sink"));
}

#[test]
fn haproxy_accepts_both_balancer_configs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = cdc_sink::server::self_signed_pem().expect("certificate");
    let pem = dir.path().join("lb.pem");
    std::fs::write(&pem, format!("{}{}", cert.cert_pem, cert.key_pem)).expect("write pem");
    for region in ["east", "west"] {
        let text = read(&format!("demo/haproxy/{region}.cfg"));
        for needle in [
            "alpn h2,http/1.1",
            "balance roundrobin",
            "alpn h2 check",
            "uri /_/healthz",
            "prometheus-exporter",
        ] {
            assert!(text.contains(needle), "{region}.cfg lacks {needle}");
        }
        // The compose file mounts the certificate at /certs/lb.pem; point at ours.
        assert!(text.contains("/certs/lb.pem"));
        let cfg = dir.path().join(format!("{region}.cfg"));
        std::fs::write(&cfg, text.replace("/certs/lb.pem", pem.to_str().unwrap()))
            .expect("write cfg");
        let out = run_tool("haproxy", &["-c", "-f", cfg.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "haproxy -c {region}.cfg: {stderr}");
        assert!(!stderr.contains("[ALERT]"), "{stderr}");
    }
}

#[test]
fn promtool_accepts_the_config_and_the_rules() {
    let config = root().join("prometheus/prometheus.yml");
    let rules = root().join("prometheus/alerts.yml");
    for args in [
        ["check", "config", config.to_str().unwrap()],
        ["check", "rules", rules.to_str().unwrap()],
    ] {
        let out = run_tool("promtool", &args);
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every scrape job the dashboard and alerts rely on.
    let prom = yaml("prometheus/prometheus.yml");
    let jobs: BTreeMap<String, Value> = prom["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .map(|j| (j["job_name"].as_str().unwrap().to_string(), j.clone()))
        .collect();
    assert_eq!(jobs["cdc-sink"]["metrics_path"], "/_/varz");
    assert_eq!(jobs["cockroachdb"]["metrics_path"], "/_status/vars");
    let compose = yaml("demo/docker-compose.yml");
    let services = services(&compose);
    let targets = |job: &str| -> Vec<String> {
        jobs[job]["static_configs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["targets"].as_array().unwrap().clone())
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let sinks: Vec<String> = targets("cdc-sink");
    let in_compose: Vec<String> = services
        .keys()
        .filter(|k| k.contains("_sink_"))
        .map(|k| format!("{k}:30005"))
        .collect();
    assert_eq!(sinks, in_compose, "every sink replica is scraped");
    for job in ["cockroachdb", "haproxy"] {
        for t in targets(job) {
            let host = t.split(':').next().unwrap();
            assert!(services.contains_key(host), "{job} target {t}");
        }
    }
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// aggregation keywords, label names (inside `{}` or a `by (…)` list) or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    let skip_group = |i: &mut usize, open: char, close: char| {
        let mut depth = 0;
        while *i < chars.len() {
            if chars[*i] == open {
                depth += 1;
            } else if chars[*i] == close {
                depth -= 1;
                if depth == 0 {
                    *i += 1;
                    return;
                }
            }
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            skip_group(&mut i, '{', '}');
        } else if c == '[' {
            skip_group(&mut i, '[', ']');
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            // `sum by (…) (…)`: an aggregation whose grouping comes first.
            let rest: String = chars[j..].iter().take(8).collect();
            let called = (j < chars.len() && chars[j] == '(')
                || rest.starts_with("by ")
                || rest.starts_with("by(")
                || rest.starts_with("without");
            if KEYWORDS.contains(&word.as_str()) {
                if called {
                    i = j;
                    skip_group(&mut i, '(', ')');
                }
            } else if !called {
                out.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn metric_names_are_read_from_promql() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (le, schema) (rate(apply_duration_seconds_bucket{code=~"5.."}[$__rate_interval]))) / on (x) max(up) > 1e3 and bool target_lag_seconds"#,
    );
    let want: BTreeSet<String> = ["apply_duration_seconds_bucket", "up", "target_lag_seconds"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
}

/// Every PromQL expression of the dashboards and alert rules, with where it is.
fn queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dashboards = root().join("grafana/dashboards");
    for entry in std::fs::read_dir(&dashboards).expect("grafana/dashboards") {
        let path = entry.expect("entry").path();
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
        for p in d["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("expr");
                out.push((
                    format!("{} / {}", path.display(), p["title"]),
                    expr.to_string(),
                ));
            }
        }
    }
    let alerts = yaml("prometheus/alerts.yml");
    for g in alerts["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            out.push((
                format!("alert {}", r["alert"]),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

#[test]
fn the_grafana_provisioning_matches_the_dashboard() {
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let uid = ds["datasources"][0]["uid"].as_str().expect("fixed uid");
    let provider = yaml("grafana/provisioning/dashboards/cdc-sink.yml");
    assert_eq!(
        provider["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
    let compose = read("demo/docker-compose.yml");
    assert!(compose.contains("../grafana/dashboards:/var/lib/grafana/dashboards"));
    assert!(compose.contains("GF_SECURITY_ADMIN_PASSWORD: cdc-sink"));
    let d: Value = serde_json::from_str(&read("grafana/dashboards/cdc-sink.json")).expect("JSON");
    assert_eq!(d["uid"], "cdc-sink");
    let mut ids = BTreeSet::new();
    for p in d["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_i64().expect("id")), "duplicate id");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], uid, "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], uid, "{}", p["title"]);
        }
    }
}

/// A userscript that dead-letters stale rows of `t`, as the demo's repl.ts does.
const DLQ_SCRIPT: &str = r#"import * as api from "cdc-sink@v1";
api.configureTable("t", {
  cas: ["ver"],
  merge: api.standardMerge(() => ({ dlq: "stale" })),
});
"#;

/// Sample names (`name` or `name_bucket`, …) in a Prometheus text page.
fn served(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split(|c: char| c == '{' || c.is_whitespace())
                .next()
                .expect("name")
                .to_string()
        })
        .collect()
}

/// The label names of a sample line (`name{a="x",b="y"} 1`), values skipped with their
/// escapes.
fn sample_labels(line: &str) -> (String, BTreeSet<String>) {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => (line, ""),
    };
    let mut labels = BTreeSet::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.chars();
        let mut label = String::new();
        while let Some(c) = chars.next() {
            match c {
                '}' => break,
                ',' | ' ' => {}
                '=' => {
                    // The quoted value.
                    chars.next();
                    let mut escaped = false;
                    for v in chars.by_ref() {
                        if escaped {
                            escaped = false;
                        } else if v == '\\' {
                            escaped = true;
                        } else if v == '"' {
                            break;
                        }
                    }
                    labels.insert(std::mem::take(&mut label));
                }
                c => label.push(c),
            }
        }
    }
    (name.to_string(), labels)
}

/// Each family's `# TYPE` and the label-name sets of its samples (a histogram's `_bucket`,
/// `_sum` and `_count` samples folded in, `le` left out).
type Families = (
    BTreeMap<String, String>,
    BTreeMap<String, BTreeSet<BTreeSet<String>>>,
);

fn families(page: &str) -> Families {
    let mut types = BTreeMap::new();
    for l in page.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(n), Some(k)) = (it.next(), it.next()) {
                types.insert(n.to_string(), k.to_string());
            }
        }
    }
    let mut labels: BTreeMap<String, BTreeSet<BTreeSet<String>>> = BTreeMap::new();
    for l in page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, mut set) = sample_labels(l);
        let family = if types.contains_key(&name) {
            name
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                .map_or(name.clone(), str::to_string)
        };
        set.remove("le");
        labels.entry(family).or_default().insert(set);
    }
    (types, labels)
}

/// What the page lacks or serves differently from [`REFERENCE_FAMILIES`].
fn reference_mismatches(page: &str) -> Vec<String> {
    let (types, labels) = families(page);
    let mut wrong = Vec::new();
    for (name, kind, want, exercised) in REFERENCE_FAMILIES {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        match (types.get(*name), labels.get(*name)) {
            (None, _) | (_, None) if *exercised => wrong.push(format!("{name}: not served")),
            (None, _) | (_, None) => {}
            (Some(k), Some(sets)) => {
                if k != kind {
                    wrong.push(format!("{name}: a {k}, the reference's is a {kind}"));
                }
                for set in sets.iter().filter(|s| **s != want) {
                    wrong.push(format!("{name}: labels {set:?}, want {want:?}"));
                }
            }
        }
    }
    wrong
}

#[test]
fn sample_labels_are_read_past_escaped_values() {
    let (name, labels) = sample_labels(r#"a_bucket{schema="x\"y,z",le="0.1"} 3"#);
    assert_eq!(name, "a_bucket");
    let want: BTreeSet<String> = ["schema", "le"].iter().map(|s| s.to_string()).collect();
    assert_eq!(labels, want);
    let page = "# TYPE a histogram\na_bucket{t=\"1\",le=\"1\"} 1\na_sum{t=\"1\"} 1\n\
                # TYPE b_count counter\nb_count 2\n";
    let (types, sets) = families(page);
    assert_eq!(types["b_count"], "counter");
    assert_eq!(sets["a"].len(), 1);
    assert!(sets["a"].contains(&["t".to_string()].into_iter().collect::<BTreeSet<_>>()));
}

/// A sink in front of database `name` after the traffic every panel needs: staged, applied,
/// redelivered, deleted, a conflict merged, one dead-lettered, and a schema in poison backoff.
async fn sink_after_traffic(name: &str) -> (Db, Sink, tempfile::TempDir) {
    let db = Db::new(name).await;
    db.exec(
        "CREATE SCHEMA deploy; \
         CREATE TABLE deploy.t (k INT8 PRIMARY KEY, ver INT8 NOT NULL, v TEXT); \
         INSERT INTO deploy.t VALUES (1, 100, 'target'), (2, 100, 'target'), (3, 100, 'target'); \
         CREATE SCHEMA poison; \
         CREATE TABLE poison.p (k INT8 PRIMARY KEY, v TEXT CHECK (v <> 'bad'))",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("dlq.ts");
    std::fs::write(&script, DLQ_SCRIPT).expect("write script");
    let sink = Sink::start(
        &db,
        &["--dlqAutoCreate", "--userscript", script.to_str().unwrap()],
    )
    .await;
    // A stale row (conflict, DLQ), a stale row whose before image matches the target (the
    // merge resolves it), a new row, a delete; sent twice (redelivery); resolved.
    let mut mergeable = upsert(
        "t",
        json!([3]),
        json!({"k": 3, "ver": 50, "v": "merged"}),
        1,
    );
    mergeable["before"] = json!({"k": 3, "ver": 100, "v": "target"});
    let body = batch(vec![
        upsert("t", json!([1]), json!({"k": 1, "ver": 1, "v": "stale"}), 1),
        mergeable,
        upsert("t", json!([10]), json!({"k": 10, "ver": 1, "v": "new"}), 1),
        delete("t", json!([2]), 1),
    ]);
    let path = format!("/{name}/deploy");
    sink.post_ok(&path, body.clone()).await;
    sink.post_ok(&path, body).await;
    sink.post_ok(&path, resolved(2)).await;
    committed(&db.pool, &format!("{name}.deploy"), hlc(2)).await;
    assert_eq!(db.count("deploy.t").await, 3, "row 10 added, row 2 deleted");
    // A row the target refuses: the schema backs off.
    let poison = format!("/{name}/poison");
    sink.post_ok(
        &poison,
        batch(vec![upsert(
            "p",
            json!([1]),
            json!({"k": 1, "v": "bad"}),
            1,
        )]),
    )
    .await;
    sink.post_ok(&poison, resolved(2)).await;
    (db, sink, dir)
}

#[tokio::test]
async fn every_metric_of_the_dashboard_and_alerts_is_served_or_documented() {
    let (_db, sink, _dir) = sink_after_traffic("deploy_metrics").await;
    let wanted: BTreeMap<String, String> = queries()
        .into_iter()
        .flat_map(|(place, expr)| {
            metric_names(&expr)
                .into_iter()
                .map(move |m| (m, place.clone()))
        })
        .collect();
    // Some series appear only once the work behind them happened (the poison schema's
    // backoff, the sweeper's rounds): poll, then name what is still missing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = sink.metrics().await;
        let have = served(&page);
        let mut missing: Vec<String> = wanted
            .iter()
            .filter(|(m, _)| !have.contains(*m) && !DOCUMENTED_ELSEWHERE.contains(&m.as_str()))
            .map(|(m, place)| format!("{m} ({place})"))
            .collect();
        // The reference's families, with its types and labels, so its dashboards work.
        missing.extend(reference_mismatches(&page));
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither served nor documented, or unlike the reference: {missing:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The backlog gauge counts what is staged and not applied: the refused row of the poison
    // schema, nothing of the applied one (counted every 10s by the lease holder).
    let value = |page: &str, series: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let backlog = |schema: &str, table: &str| {
        format!("stage_backlog_mutations{{schema=\"deploy_metrics.{schema}\",table=\"{table}\"}} ")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let page = sink.metrics().await;
        let got = (
            value(&page, &backlog("poison", "p")),
            value(&page, &backlog("deploy", "t")),
        );
        if got == (Some(1.0), Some(0.0)) {
            // Flushes went through the scheduler's accounting.
            assert!(value(&page, "sequencer_scheduler_executed_tasks_count ") >= Some(1.0));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "staged backlog (poison, deploy): {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The documented list holds only names still used.
    for m in DOCUMENTED_ELSEWHERE {
        assert!(wanted.contains_key(*m), "{m} is documented but unused");
    }
    // The page parses for Prometheus' own tooling (lint warnings about names inherited from
    // the reference, e.g. counters ending in _count, are expected and kept).
    let mut check = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (install prometheus: .ci/run does)");
    let page = sink.metrics().await;
    tokio::io::AsyncWriteExt::write_all(&mut check.stdin.take().expect("stdin"), page.as_bytes())
        .await
        .expect("write to promtool");
    let out = check.wait_with_output().await.expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("error while linting"), "{text}");
    assert!(!text.contains("parsing error"), "{text}");
    sink.stop().await;
}

/// The image's HEALTHCHECK: 0 against a serving sink, non-zero against nothing or a
/// certificate it does not trust.
#[tokio::test]
async fn the_healthcheck_command_probes_the_sink() {
    let db = Db::kv("deploy_health").await;
    let sink = Sink::start(&db, &[]).await;
    let port = sink.addr().port().to_string();
    let bin = env!("CARGO_BIN_EXE_cdc-sink");
    // Asynchronously: the sink serves from this test's runtime.
    let probe = |args: Vec<&str>| {
        tokio::process::Command::new(bin)
            .arg("healthcheck")
            .args(args)
            .output()
    };
    let ok = probe(vec!["--port", &port, "--insecureSkipVerify"])
        .await
        .expect("run cdc-sink healthcheck");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let untrusted = probe(vec!["--port", &port, "--timeout", "3s"])
        .await
        .expect("run cdc-sink healthcheck");
    assert!(!untrusted.status.success());
    let why = String::from_utf8_lossy(&untrusted.stderr);
    assert!(why.contains("--insecureSkipVerify or --caCert"), "{why}");
    // Another certificate than the sink's: the handshake fails.
    let dir = tempfile::tempdir().expect("tempdir");
    let other = dir.path().join("other.pem");
    let cert = cdc_sink::server::self_signed_pem().expect("certificate");
    std::fs::write(&other, cert.cert_pem).expect("write cert");
    let wrong_ca = probe(vec![
        "--port",
        &port,
        "--caCert",
        other.to_str().unwrap(),
        "--timeout",
        "3s",
    ])
    .await
    .expect("run cdc-sink healthcheck");
    assert!(!wrong_ca.status.success());
    let why = String::from_utf8_lossy(&wrong_ca.stderr);
    assert!(why.contains("TLS handshake"), "{why}");
    sink.stop().await;
    let gone = probe(vec![
        "--port",
        &port,
        "--insecureSkipVerify",
        "--timeout",
        "3s",
    ])
    .await
    .expect("run cdc-sink healthcheck");
    assert!(!gone.status.success());
    assert!(!String::from_utf8_lossy(&gone.stderr).is_empty());
}

#[test]
fn the_readme_points_at_the_demo() {
    let readme = read("README.md");
    assert!(readme.contains("demo/README.md"));
    assert!(root().join("demo/README.md").is_file());
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free loopback port for a child process (closed again at once; another process could take
/// it in between, which only fails the test loudly).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Every panel query of the cdc-sink dashboard that reads our metrics, and the reference
/// dashboards' reads of its families, as (what, PromQL) with Grafana's interval variable filled.
pub(crate) fn panel_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&read("grafana/dashboards/cdc-sink.json")).expect("JSON");
    let mut exprs = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let ours = metric_names(expr)
                .iter()
                .all(|m| !DOCUMENTED_ELSEWHERE.contains(&m.as_str()));
            if ours {
                exprs.push((
                    p["title"].to_string(),
                    expr.replace("$__rate_interval", "1m"),
                ));
            }
        }
    }
    assert!(exprs.len() >= 20, "{exprs:?}");
    exprs.extend(REFERENCE_QUERIES.iter().map(|q| {
        (
            format!("reference query {q}"),
            q.replace("$__rate_interval", "1m"),
        )
    }));
    exprs
}

/// Polls the Prometheus behind `api` until every query of [`panel_queries`] answers with a
/// series (rate() needs two scrapes), failing on the first that stays empty for a minute.
pub(crate) async fn every_panel_query_answers(api: &cdc_sink::server::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (title, expr) in &panel_queries() {
        loop {
            let answer = api
                .get(&format!("/api/v1/query?query={}", encode(expr)))
                .await;
            let result = match answer {
                Ok((status, body)) if status == http::StatusCode::OK => {
                    let v: Value = serde_json::from_str(&body).expect("JSON answer");
                    v["data"]["result"].as_array().cloned().unwrap_or_default()
                }
                _ => Vec::new(),
            };
            if !result.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{title}: `{expr}` stayed empty"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A real Prometheus (Debian's package) scrapes an in-process sink after traffic, loads the
/// alert rules, and answers every panel query of the cdc-sink dashboard that reads our metrics
/// with a non-empty result.
#[tokio::test]
async fn a_real_prometheus_answers_every_cdc_sink_panel_query() {
    let (_db, sink, dir) = sink_after_traffic("deploy_prometheus").await;
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::copy(
        root().join("prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .expect("copy rules");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: cdc-sink\n    scheme: https\n    \
             metrics_path: /_/varz\n    tls_config:\n      insecure_skip_verify: true\n    \
             static_configs:\n      - targets: ['{}']\n        labels:\n          cluster: east\n",
            sink.addr()
        ),
    )
    .expect("write config");
    let data = dir.path().join("data");
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (install it: .ci/run does with apt-get)");
    let api = cdc_sink::server::Client::new(
        &format!("http://127.0.0.1:{port}"),
        cdc_sink::server::ClientOptions {
            http2: false,
            ..Default::default()
        },
    )
    .expect("client");

    every_panel_query_answers(&api).await;
    // The rules loaded and evaluate without errors.
    let (status, body) = api.get("/api/v1/rules").await.expect("rules");
    assert_eq!(status, http::StatusCode::OK);
    let rules: Value = serde_json::from_str(&body).expect("JSON");
    let groups = rules["data"]["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), 2, "{body}");
    for g in groups {
        for r in g["rules"].as_array().expect("rules") {
            assert_ne!(r["health"], "err", "{r}");
        }
    }
    prometheus.kill().await.expect("stop prometheus");
    sink.stop().await;
}

/// `1.95` and `1.95.0` compare equal.
fn version(s: &str) -> Vec<u32> {
    let mut v: Vec<u32> = s.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    v.resize(3, 0);
    v
}

/// The image's Rust is new enough for every locked dependency: the newest `rust-version` of
/// the packages in Cargo.lock whose sources cargo has unpacked (the build just did).
#[test]
fn the_image_builds_with_a_new_enough_rust() {
    let dockerfile = read("demo/Dockerfile");
    let from = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("a rust build stage");
    let image = version(from.split('-').next().expect("version"));
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let registries: Vec<PathBuf> = std::fs::read_dir(home.join("registry/src"))
        .expect("cargo's unpacked registry sources")
        .map(|e| e.expect("entry").path())
        .collect();
    let lock = read("Cargo.lock");
    let mut newest = (vec![0], String::new());
    let mut seen = 0;
    for block in lock.split("[[package]]") {
        let field = |key: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let (Some(name), Some(ver)) = (field("name"), field("version")) else {
            continue;
        };
        let Some(manifest) = registries
            .iter()
            .map(|r| r.join(format!("{name}-{ver}/Cargo.toml")))
            .find(|p| p.is_file())
        else {
            continue; // another platform's dependency, never downloaded here
        };
        seen += 1;
        let text = std::fs::read_to_string(&manifest).expect("manifest");
        if let Some(rv) = text
            .lines()
            .find_map(|l| l.strip_prefix("rust-version = \""))
        {
            let rv = version(rv.trim_end_matches('"'));
            if rv > newest.0 {
                newest = (rv, format!("{name} {ver}"));
            }
        }
    }
    assert!(seen > 100, "only {seen} locked packages found unpacked");
    assert!(
        image >= newest.0,
        "demo/Dockerfile builds with rust {image:?}; {} needs {:?}",
        newest.1,
        newest.0
    );
}

/// The west balancer's config run by a real HAProxy in front of two recording TLS servers: the
/// changefeed's one HTTP/2 connection is balanced request by request over both, a server whose
/// `/_/healthz` fails is taken out, and the exporter serves the HAProxy metrics the dashboard
/// and alerts use.
#[tokio::test]
async fn a_real_haproxy_balances_requests_and_follows_health() {
    use crate::support::http::{args, TestServer};
    let tls = || cdc_sink::server::ServerArgs {
        tls_self_signed: true,
        ..args()
    };
    let one = TestServer::start(tls()).await;
    let two = TestServer::start(tls()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = cdc_sink::server::self_signed_pem().expect("certificate");
    let pem = dir.path().join("lb.pem");
    std::fs::write(&pem, format!("{}{}", cert.cert_pem, cert.key_pem)).expect("write pem");
    let (front, monitor) = (free_port(), free_port());
    let mut text = read("demo/haproxy/west.cfg");
    for (from, to) in [
        ("bind :30004", format!("bind 127.0.0.1:{front}")),
        ("bind :8404", format!("bind 127.0.0.1:{monitor}")),
        ("west_sink_1:30004", one.addr.to_string()),
        ("west_sink_2:30004", two.addr.to_string()),
        ("/certs/lb.pem", pem.to_str().unwrap().to_string()),
    ] {
        assert!(text.contains(from), "west.cfg lacks {from}");
        text = text.replace(from, &to);
    }
    let cfg = dir.path().join("west.cfg");
    std::fs::write(&cfg, text).expect("write cfg");
    let _haproxy = tokio::process::Command::new("haproxy")
        .args(["-db", "-f", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy (install it: .ci/run does with apt-get)");

    let client = cdc_sink::server::Client::new(
        &format!("https://127.0.0.1:{front}"),
        cdc_sink::server::ClientOptions {
            insecure_skip_verify: true,
            ..Default::default()
        },
    )
    .expect("client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let post = || client.post("/kv/public", bytes::Bytes::from_static(b"{}"));
    // Until HAProxy listens and has checked both servers up.
    loop {
        if let Ok((status, _)) = post().await {
            if status == http::StatusCode::OK
                && !one.handler.requests().is_empty()
                && !two.handler.requests().is_empty()
            {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy never reached both servers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        client.protocol(),
        Some(cdc_sink::server::Protocol::Http2),
        "ALPN h2 on the front"
    );
    // One connection, requests alternate.
    let before = (one.handler.requests().len(), two.handler.requests().len());
    for _ in 0..10 {
        let (status, body) = post().await.expect("through haproxy");
        assert_eq!(status, http::StatusCode::OK, "{body}");
    }
    let after = (one.handler.requests().len(), two.handler.requests().len());
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "{before:?} -> {after:?}"
    );

    // A failing health check takes `two` out.
    two.handler.set_health(Some("draining"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = two.handler.requests().len();
        for _ in 0..6 {
            let (status, body) = post().await.expect("through haproxy");
            assert_eq!(status, http::StatusCode::OK, "{body}");
        }
        if two.handler.requests().len() == seen {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy kept sending to an unhealthy server"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Healthy again: `rise 2` passing checks bring it back.
    two.handler.set_health(None);
    let seen = two.handler.requests().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while two.handler.requests().len() == seen {
        let (status, body) = post().await.expect("through haproxy");
        assert_eq!(status, http::StatusCode::OK, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy never took the server back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The monitor frontend: liveness and the exporter.
    let mon = cdc_sink::server::Client::new(
        &format!("http://127.0.0.1:{monitor}"),
        cdc_sink::server::ClientOptions {
            http2: false,
            ..Default::default()
        },
    )
    .expect("client");
    let (status, _) = mon.get("/healthz").await.expect("monitor-uri");
    assert_eq!(status, http::StatusCode::OK);
    let (status, page) = mon.get("/metrics").await.expect("exporter");
    assert_eq!(status, http::StatusCode::OK);
    // The compose file's container healthcheck for the balancers, aimed at this one.
    let compose = yaml("demo/docker-compose.yml");
    let test = &compose["services"]["west_lb"]["healthcheck"]["test"];
    assert_eq!(test[1], "bash", "{test}");
    let script = test[3]
        .as_str()
        .expect("script")
        .replace("127.0.0.1/8404", &format!("127.0.0.1/{monitor}"));
    let out = tokio::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .await
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let have = served(&page);
    for m in DOCUMENTED_ELSEWHERE
        .iter()
        .filter(|m| m.starts_with("haproxy_"))
    {
        assert!(have.contains(*m), "the exporter does not serve {m}");
    }
    assert!(
        page.lines()
            .any(|l| l.starts_with("haproxy_backend_active_servers{proxy=\"west_sinks\"} 2")),
        "both servers healthy again"
    );
}
