//! The one catalogue of metric names. Names follow the reference so its dashboards work; each
//! is described once, at start, by [`describe`]. Labels are `schema`, `table` (never row values).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const LABEL_SCHEMA: &str = "schema";
pub const LABEL_TABLE: &str = "table";
pub const LABEL_CODE: &str = "code";
pub const LABEL_POOL: &str = "pool";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_TARGET: &str = "target";
pub const LABEL_DLQ: &str = "dlq";
pub const LABEL_MODE: &str = "mode";

pub const INFO: &str = "cdc_sink_info";
pub const START_SECONDS: &str = "cdc_sink_start_seconds";

pub const HTTP_STATUS_CODES: &str = "http_status_codes_total";
pub const HTTP_LATENCY: &str = "http_latency_seconds";
pub const HTTP_PAYLOAD_IN: &str = "http_payload_in_bytes_total";

pub const MUTATIONS_RECEIVED: &str = "mutations_received_count";
pub const MUTATIONS_SUCCESS: &str = "mutations_success_count";
pub const MUTATIONS_ERROR: &str = "mutations_error_count";

pub const TARGET_APPLIED_TIMESTAMP: &str = "target_applied_timestamp_seconds";
pub const TARGET_PENDING_TIMESTAMP: &str = "target_pending_timestamp_seconds";
pub const TARGET_LAG: &str = "target_lag_seconds";
pub const SOURCE_LAG: &str = "source_lag_seconds";

pub const CHECKPOINT_ADVANCE_DURATION: &str = "checkpoint_advance_duration_seconds";
pub const CHECKPOINT_COMMIT_DURATION: &str = "checkpoint_commit_duration_seconds";
pub const CHECKPOINT_REFRESH_DURATION: &str = "checkpoint_refresh_duration_seconds";
pub const CHECKPOINT_COMMITTED_TIME: &str = "checkpoint_committed_time_seconds";
pub const CHECKPOINT_COMMITTED_AGE: &str = "checkpoint_committed_age_seconds";
pub const CHECKPOINT_PROPOSED_TIME: &str = "checkpoint_proposed_time_seconds";
pub const CHECKPOINT_PROPOSED_AGE: &str = "checkpoint_proposed_age_seconds";
pub const CHECKPOINT_BACKWARDS: &str = "checkpoint_proposed_going_backwards_errors";

pub const STAGE_MUTATIONS: &str = "stage_mutations_total";
pub const STAGE_DUPLICATES: &str = "stage_duplicate_mutations_total";
pub const STAGE_ERRORS: &str = "stage_errors_total";
pub const STAGE_DURATION: &str = "stage_duration_seconds";
pub const STAGE_READ_ROWS: &str = "stage_read_rows";
pub const STAGE_READ_DURATION: &str = "stage_read_duration_seconds";
pub const STAGE_STALE: &str = "stage_stale_mutations_count";
pub const STAGE_RETIRE_DURATION: &str = "stage_retire_duration_seconds";
pub const SCRIPT_ENTRY_WAIT: &str = "script_entry_wait_seconds";
pub const SCRIPT_EXEC_TIME: &str = "script_exec_time_seconds";
pub const SCRIPT_STUCK_WORKERS: &str = "script_stuck_workers";
pub const STAGE_BELOW_CHECKPOINT: &str = "stage_below_checkpoint_mutations_total";
pub const STAGE_SKIPPED_APPLIED: &str = "stage_skipped_applied_mutations_total";

pub const APPLY_UPSERTS: &str = "apply_upserts_total";
pub const APPLY_DELETES: &str = "apply_deletes_total";
pub const APPLY_ERRORS: &str = "apply_errors_total";
pub const APPLY_CONFLICTS: &str = "apply_conflicts_total";
pub const APPLY_RESOLVES: &str = "apply_resolves_total";
pub const APPLY_DURATION: &str = "apply_duration_seconds";
pub const APPLY_MUTATION_AGE: &str = "apply_mutation_age_seconds";

pub const CORE_SWEEP_ACTIVE: &str = "core_sweep_active_bool";
pub const CORE_SWEEP_APPLY_COUNT: &str = "core_sweep_apply_count";
pub const CORE_SWEEP_DURATION: &str = "core_sweep_duration_seconds";
pub const CORE_SWEEP_SUCCESS_TIMESTAMP: &str = "core_sweep_success_timestamp_seconds";
pub const CORE_SWEEP_ATTEMPT_TIMESTAMP: &str = "core_sweep_attempt_timestamp_seconds";
pub const CORE_SWEEP_SKEW: &str = "core_sweep_skew_count";
pub const CORE_FLUSHES_IN_FLIGHT: &str = "core_sweep_flushes_in_flight";
pub const CORE_FLUSH_OVERLAPS: &str = "core_sweep_overlapping_flushes_total";
pub const CORE_FLUSH_DEFERRED: &str = "core_sweep_deferred_flushes_total";

pub const BEST_EFFORT_APPLIED: &str = "best_effort_accept_applied_count";
pub const BEST_EFFORT_DEFERRED: &str = "best_effort_accept_deferred_count";
pub const BEST_EFFORT_ERRORS: &str = "best_effort_accept_error_count";
pub const BEST_EFFORT_DURATION: &str = "best_effort_accept_duration_seconds";
pub const SEQUENCE_MODE: &str = "sequence_mode";

pub const RETRY_ACTIONS: &str = "retry_actions_total";
pub const RETRY_RETRIED: &str = "retry_retried_total";
pub const RETRY_ABORTED: &str = "retry_aborted_total";

pub const POOL_ACQUIRED: &str = "pool_acquired_connection_count";
pub const POOL_IDLE: &str = "pool_idle_connection_count";
pub const POOL_MAX: &str = "pool_max_connection_count";

pub const DLQ_MUTATIONS: &str = "dlq_mutations_total";
pub const DLQ_REPLAYED: &str = "dlq_replayed_total";
pub const DLQ_PURGED: &str = "dlq_purged_total";
pub const POISON_BACKOFF: &str = "sequence_poison_backoff_total";

pub const CORE_PIPELINES: &str = "core_pipelines";
pub const INGEST_AHEAD_OF_CLOCK: &str = "ingest_ahead_of_clock_total";
pub const INGEST_NO_SUCH_SCHEMA: &str = "ingest_no_such_schema_total";

pub const LABEL_RESULT: &str = "result";
pub const LABEL_REASON: &str = "reason";
pub const AUTH_REQUESTS: &str = "auth_requests_total";
pub const AUTH_DISABLED: &str = "auth_disabled";
pub const JWT_LAST_REFRESH_TIME: &str = "jwt_last_refresh_time";
pub const JWT_REFRESH_ERRORS: &str = "jwt_refresh_errors_total";

/// Latency buckets of the reference: 1ms..9ms, 10ms..90ms, 100ms..900ms, 1s..9s, 10s..60s.
fn latency_buckets() -> Vec<f64> {
    let mut b = Vec::new();
    for scale in [0.001, 0.01, 0.1, 1.0] {
        for i in 1..10 {
            b.push(i as f64 * scale);
        }
    }
    for i in 1..=6 {
        b.push(i as f64 * 10.0);
    }
    b
}

fn byte_buckets() -> Vec<f64> {
    let mut b = Vec::new();
    let mut v = 1024.0;
    while v <= 10.0 * 1024.0 * 1024.0 {
        b.push(v);
        b.push(v * 10.0);
        v *= 100.0;
    }
    b.sort_by(|a, c| a.partial_cmp(c).expect("finite"));
    b
}

fn age_buckets() -> Vec<f64> {
    vec![
        1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0,
        80000.0,
    ]
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&latency_buckets())
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(HTTP_PAYLOAD_IN.into()), &byte_buckets())
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(APPLY_MUTATION_AGE.into()),
                        &age_buckets(),
                    )
                })
                .expect("static bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by a test); keep ours rendering.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            metrics::gauge!(INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            metrics::gauge!(START_SECONDS).set(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default(),
            );
            handle
        })
        .clone()
}

/// Renders the current metrics in the Prometheus text format.
pub fn render() -> String {
    install().render()
}

fn describe() {
    describe_gauge!(INFO, "build information");
    describe_gauge!(START_SECONDS, Unit::Seconds, "process start wall time");
    describe_counter!(HTTP_STATUS_CODES, "changefeed responses by status code");
    describe_histogram!(HTTP_LATENCY, Unit::Seconds, "changefeed request latency");
    describe_histogram!(
        HTTP_PAYLOAD_IN,
        Unit::Bytes,
        "changefeed request body bytes"
    );
    describe_counter!(MUTATIONS_RECEIVED, "mutations received per target schema");
    describe_counter!(MUTATIONS_SUCCESS, "mutations accepted per target schema");
    describe_counter!(MUTATIONS_ERROR, "mutations rejected per target schema");
    describe_gauge!(
        TARGET_APPLIED_TIMESTAMP,
        Unit::Seconds,
        "committed checkpoint wall time"
    );
    describe_gauge!(
        TARGET_PENDING_TIMESTAMP,
        Unit::Seconds,
        "newest proposed checkpoint wall time"
    );
    describe_gauge!(
        TARGET_LAG,
        Unit::Seconds,
        "now minus the committed checkpoint"
    );
    describe_gauge!(
        SOURCE_LAG,
        Unit::Seconds,
        "now minus the newest proposed checkpoint"
    );
    describe_histogram!(
        CHECKPOINT_ADVANCE_DURATION,
        Unit::Seconds,
        "time to record a resolved timestamp"
    );
    describe_histogram!(
        CHECKPOINT_COMMIT_DURATION,
        Unit::Seconds,
        "time to commit a checkpoint"
    );
    describe_histogram!(
        CHECKPOINT_REFRESH_DURATION,
        Unit::Seconds,
        "time to refresh checkpoint bounds"
    );
    describe_gauge!(
        CHECKPOINT_COMMITTED_TIME,
        Unit::Seconds,
        "committed checkpoint wall time"
    );
    describe_gauge!(
        CHECKPOINT_COMMITTED_AGE,
        Unit::Seconds,
        "age of the committed checkpoint"
    );
    describe_gauge!(
        CHECKPOINT_PROPOSED_TIME,
        Unit::Seconds,
        "proposed checkpoint wall time"
    );
    describe_gauge!(
        CHECKPOINT_PROPOSED_AGE,
        Unit::Seconds,
        "age of the proposed checkpoint"
    );
    describe_counter!(
        CHECKPOINT_BACKWARDS,
        "resolved timestamps rejected for going backwards"
    );
    describe_counter!(STAGE_MUTATIONS, "mutations written to staging");
    describe_counter!(STAGE_DUPLICATES, "redelivered mutations already staged");
    describe_counter!(STAGE_ERRORS, "staging write errors");
    describe_histogram!(STAGE_DURATION, Unit::Seconds, "staging write latency");
    describe_counter!(STAGE_READ_ROWS, "staged rows read for apply");
    describe_histogram!(STAGE_READ_DURATION, Unit::Seconds, "staging read latency");
    describe_gauge!(
        STAGE_STALE,
        "unapplied staged rows behind the committed checkpoint"
    );
    describe_counter!(
        STAGE_BELOW_CHECKPOINT,
        "redelivered mutations at or below the committed checkpoint, dropped at ingest"
    );
    describe_counter!(
        STAGE_SKIPPED_APPLIED,
        "staged redeliveries skipped by a window because their range was applied already"
    );
    describe_histogram!(
        STAGE_RETIRE_DURATION,
        Unit::Seconds,
        "time to delete applied staged rows"
    );
    describe_histogram!(
        SCRIPT_ENTRY_WAIT,
        Unit::Seconds,
        "time a userscript job waits for an engine thread"
    );
    describe_histogram!(
        SCRIPT_EXEC_TIME,
        Unit::Seconds,
        "time a userscript job runs"
    );
    describe_gauge!(
        SCRIPT_STUCK_WORKERS,
        "userscript engine threads abandoned past their deadline that are still running"
    );
    describe_counter!(APPLY_UPSERTS, "rows upserted into the target");
    describe_counter!(APPLY_DELETES, "rows deleted from the target");
    describe_counter!(APPLY_ERRORS, "target write errors");
    describe_counter!(APPLY_CONFLICTS, "compare-and-set conflicts");
    describe_counter!(APPLY_RESOLVES, "conflicts resolved by a merge");
    describe_histogram!(APPLY_DURATION, Unit::Seconds, "per-batch apply latency");
    describe_histogram!(
        APPLY_MUTATION_AGE,
        Unit::Seconds,
        "now minus the mutation time at apply"
    );
    describe_gauge!(
        CORE_SWEEP_ACTIVE,
        "1 while this instance holds the apply lease"
    );
    describe_counter!(
        CORE_SWEEP_APPLY_COUNT,
        "mutations applied by the consistent sweeper"
    );
    describe_histogram!(
        CORE_SWEEP_DURATION,
        Unit::Seconds,
        "duration of a sweep round"
    );
    describe_gauge!(
        CORE_SWEEP_SUCCESS_TIMESTAMP,
        Unit::Seconds,
        "wall time of the last successful sweep"
    );
    describe_gauge!(
        CORE_SWEEP_ATTEMPT_TIMESTAMP,
        Unit::Seconds,
        "wall time of the last sweep attempt"
    );
    describe_counter!(
        CORE_SWEEP_SKEW,
        "flushes written to the target whose staging step then failed (separate staging): \
their rows will be applied again"
    );
    describe_gauge!(
        CORE_PIPELINES,
        "schemas with a running apply pipeline in this instance (idle ones stop)"
    );
    describe_counter!(
        INGEST_AHEAD_OF_CLOCK,
        "requests refused for a timestamp beyond --maxClockSkew ahead of the target clock"
    );
    describe_counter!(
        INGEST_NO_SUCH_SCHEMA,
        "requests refused for a schema without tables in the target (no labels: the name is input)"
    );
    describe_gauge!(
        CORE_FLUSHES_IN_FLIGHT,
        "apply transactions of one schema open at once"
    );
    describe_counter!(
        CORE_FLUSH_OVERLAPS,
        "apply transactions that began while another of the same schema was open"
    );
    describe_counter!(
        CORE_FLUSH_DEFERRED,
        "apply transactions retried after every earlier one finished (foreign-key violation \
or serialization failure while running alongside them)"
    );
    describe_counter!(
        BEST_EFFORT_APPLIED,
        "best-effort mutations written to the target on arrival"
    );
    describe_counter!(
        BEST_EFFORT_DEFERRED,
        "best-effort mutations staged instead: behind staged versions of their key, or refused"
    );
    describe_counter!(
        BEST_EFFORT_ERRORS,
        "best-effort mutations the target refused on arrival (staged; foreign-key violations included)"
    );
    describe_histogram!(
        BEST_EFFORT_DURATION,
        Unit::Seconds,
        "time to accept a best-effort request"
    );
    describe_gauge!(
        SEQUENCE_MODE,
        "1 for the sequencing mode a schema runs in (label mode: consistent, best_effort, immediate), 0 for the others"
    );
    describe_counter!(RETRY_ACTIONS, "database actions run under the retry helper");
    describe_counter!(RETRY_RETRIED, "database actions retried, by SQLSTATE");
    describe_counter!(RETRY_ABORTED, "database actions abandoned, by SQLSTATE");
    describe_gauge!(POOL_ACQUIRED, "connections in use");
    describe_gauge!(POOL_IDLE, "idle connections");
    describe_gauge!(POOL_MAX, "maximum connections");
    describe_counter!(DLQ_MUTATIONS, "mutations written to a dead-letter queue");
    describe_counter!(
        DLQ_REPLAYED,
        "dead-letter rows replayed by `cdc-sink dlq replay`, by result (applied, lost, failed)"
    );
    describe_counter!(
        DLQ_PURGED,
        "dead-letter rows deleted by `cdc-sink dlq purge`"
    );
    describe_counter!(POISON_BACKOFF, "apply attempts deferred by poison backoff");
    describe_counter!(
        AUTH_REQUESTS,
        "changefeed requests by authentication verdict (result: accepted, denied) and bounded reason"
    );
    describe_gauge!(
        AUTH_DISABLED,
        "1 while --disableAuthentication accepts every request"
    );
    describe_gauge!(
        JWT_LAST_REFRESH_TIME,
        Unit::Seconds,
        "unix time of the last successful jwt key refresh"
    );
    describe_counter!(
        JWT_REFRESH_ERRORS,
        "jwt key refreshes that failed (the previous keys were kept)"
    );
}

// The changefeed emulator (`cdc-sink feed`), the kv workload and the verifier; described by
// their modules when they start.
pub const LABEL_FEED: &str = "feed";
pub const FEED_BATCHES: &str = "feed_batches_sent_total";
pub const FEED_MESSAGES: &str = "feed_messages_sent_total";
pub const FEED_BYTES: &str = "feed_sent_bytes_total";
pub const FEED_RETRIES: &str = "feed_retries_total";
pub const FEED_CHAOS_RESENDS: &str = "feed_chaos_resends_total";
pub const FEED_RESOLVED: &str = "feed_resolved_sent_total";
pub const FEED_SOURCE_ERRORS: &str = "feed_source_errors_total";
pub const FEED_LAG: &str = "feed_lag_seconds";
pub const WORKLOAD_OPS: &str = "workload_ops_total";
pub const WORKLOAD_ERRORS: &str = "workload_errors_total";
pub const VERIFY_DIVERGENT_ROWS: &str = "verify_divergent_rows";
pub const VERIFY_CLEAN_CHECKS: &str = "verify_consecutive_clean_checks";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_sorted_and_span_the_reference_ranges() {
        let l = latency_buckets();
        assert_eq!(l.first(), Some(&0.001));
        assert_eq!(l.last(), Some(&60.0));
        assert!(l.windows(2).all(|w| w[0] < w[1]));
        let b = byte_buckets();
        assert_eq!(b.first(), Some(&1024.0));
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
