//! The one catalogue of metric names. Names follow the reference so its dashboards work; each
//! is described once, at start, by [`describe`]. Labels are `schema` (`db.schema` as written),
//! `table` (the name as written), never row values. Counters of a table and its schema (and
//! the stale-row gauge) are registered at 0 the first time this process stages or reads the
//! table ([`register_table`]).
//!
//! Where our pipeline differs from the reference's, a family maps to its nearest part (each
//! description says what it measures here): the staging reader and cross-table merger are the
//! window's page reader and flush dispatcher (`stage_read_*`, `stage_merge_*`); the key lock set
//! is the flush dispatcher's key locks (`lockset_*{set="scheduler"}`, `sequencer_scheduler_*`).
//! Served at 0 because sqlx does not tell: `stmtcache_*`, `pool_constructing_connection_count`.
//! Not served: the legacy `stage_select_*` (never updated by the reference either). Deviations:
//! `cdc_sink_info` carries `version` rather than Go build labels, and `core_sweep_active_bool`
//! is per schema (the lease is), without `table`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub(crate) const LABEL_SCHEMA: &str = "schema";
pub(crate) const LABEL_TABLE: &str = "table";
pub(crate) const LABEL_CODE: &str = "code";
pub(crate) const LABEL_POOL: &str = "pool";
pub(crate) const LABEL_KIND: &str = "kind";
pub(crate) const LABEL_TARGET: &str = "target";
pub(crate) const LABEL_DLQ: &str = "dlq";
pub(crate) const LABEL_MODE: &str = "mode";
pub(crate) const LABEL_LEVEL: &str = "level";
pub(crate) const LABEL_SET: &str = "set";
/// The one `set` label value of the `lockset_*` family: the per-schema flush scheduler.
pub(crate) const SET_SCHEDULER: &str = "scheduler";

pub(crate) const LOG_MESSAGES: &str = "log_message_count";

pub(crate) const INFO: &str = "cdc_sink_info";
pub(crate) const START_SECONDS: &str = "cdc_sink_start_seconds";

pub(crate) const HTTP_STATUS_CODES: &str = "http_status_codes_total";
pub(crate) const HTTP_LATENCY: &str = "http_latency_seconds";
pub(crate) const HTTP_PAYLOAD_IN: &str = "http_payload_in_bytes_total";
// Admission of request bodies (`--maxInflightBytes`).
pub(crate) const HTTP_INFLIGHT_BYTES: &str = "http_inflight_request_bytes";
pub(crate) const HTTP_OVER_BUDGET: &str = "http_over_budget_requests_total";

pub(crate) const MUTATIONS_RECEIVED: &str = "mutations_received_count";
pub(crate) const MUTATIONS_SUCCESS: &str = "mutations_success_count";
pub(crate) const MUTATIONS_ERROR: &str = "mutations_error_count";

pub(crate) const TARGET_APPLIED_TIMESTAMP: &str = "target_applied_timestamp_seconds";
pub(crate) const TARGET_PENDING_TIMESTAMP: &str = "target_pending_timestamp_seconds";
pub(crate) const TARGET_LAG: &str = "target_lag_seconds";
pub(crate) const SOURCE_LAG: &str = "source_lag_seconds";

pub(crate) const CHECKPOINT_ADVANCE_DURATION: &str = "checkpoint_advance_duration_seconds";
pub(crate) const CHECKPOINT_COMMIT_DURATION: &str = "checkpoint_commit_duration_seconds";
pub(crate) const CHECKPOINT_REFRESH_DURATION: &str = "checkpoint_refresh_duration_seconds";
pub(crate) const CHECKPOINT_COMMITTED_TIME: &str = "checkpoint_committed_time_seconds";
pub(crate) const CHECKPOINT_COMMITTED_AGE: &str = "checkpoint_committed_age_seconds";
pub(crate) const CHECKPOINT_PROPOSED_TIME: &str = "checkpoint_proposed_time_seconds";
pub(crate) const CHECKPOINT_PROPOSED_AGE: &str = "checkpoint_proposed_age_seconds";
pub(crate) const CHECKPOINT_BACKWARDS: &str = "checkpoint_proposed_going_backwards_errors";

pub(crate) const STAGE_MUTATIONS: &str = "stage_mutations_total";
pub(crate) const STAGE_DUPLICATES: &str = "stage_duplicate_mutations_total";
pub(crate) const STAGE_ERRORS: &str = "stage_errors_total";
pub(crate) const STAGE_DURATION: &str = "stage_duration_seconds";
pub(crate) const STAGE_READ_ROWS: &str = "stage_read_rows";
pub(crate) const STAGE_READ_DURATION: &str = "stage_read_duration_seconds";
pub(crate) const STAGE_READ_LAG: &str = "stage_read_lag_seconds";
pub(crate) const STAGE_READ_QUEUE: &str = "stage_read_queue_count";
pub(crate) const STAGE_MERGE_LAG: &str = "stage_merge_lag_seconds";
pub(crate) const STAGE_MERGE_QUEUE: &str = "stage_merge_queue_count";
pub(crate) const STAGE_STALE: &str = "stage_stale_mutations_count";
pub(crate) const STAGE_BACKLOG: &str = "stage_backlog_mutations";
pub(crate) const STAGE_RETIRE_ERRORS: &str = "stage_retire_errors_total";
pub(crate) const STAGE_RETIRE_DURATION: &str = "stage_retire_duration_seconds";
pub(crate) const SCRIPT_ENTRY_WAIT: &str = "script_entry_wait_seconds";
pub(crate) const SCRIPT_EXEC_TIME: &str = "script_exec_time_seconds";
pub(crate) const SCRIPT_STUCK_WORKERS: &str = "script_stuck_workers";
pub(crate) const STAGE_BELOW_CHECKPOINT: &str = "stage_below_checkpoint_mutations_total";
pub(crate) const STAGE_SKIPPED_APPLIED: &str = "stage_skipped_applied_mutations_total";

pub(crate) const APPLY_UPSERTS: &str = "apply_upserts_total";
pub(crate) const APPLY_DELETES: &str = "apply_deletes_total";
pub(crate) const APPLY_ERRORS: &str = "apply_errors_total";
pub(crate) const APPLY_CONFLICTS: &str = "apply_conflicts_total";
pub(crate) const APPLY_RESOLVES: &str = "apply_resolves_total";
pub(crate) const APPLY_DURATION: &str = "apply_duration_seconds";
pub(crate) const APPLY_MUTATION_AGE: &str = "apply_mutation_age_seconds";

pub(crate) const CORE_SWEEP_ACTIVE: &str = "core_sweep_active_bool";
pub(crate) const CORE_SWEEP_APPLY_COUNT: &str = "core_sweep_apply_count";
pub(crate) const CORE_SWEEP_DURATION: &str = "core_sweep_duration_seconds";
pub(crate) const CORE_SWEEP_SUCCESS_TIMESTAMP: &str = "core_sweep_success_timestamp_seconds";
pub(crate) const CORE_SWEEP_ATTEMPT_TIMESTAMP: &str = "core_sweep_attempt_timestamp_seconds";
pub(crate) const CORE_SWEEP_SKEW: &str = "core_sweep_skew_count";
pub(crate) const CORE_FLUSHES_IN_FLIGHT: &str = "core_sweep_flushes_in_flight";
pub(crate) const CORE_FLUSH_OVERLAPS: &str = "core_sweep_overlapping_flushes_total";
pub(crate) const CORE_FLUSH_DEFERRED: &str = "core_sweep_deferred_flushes_total";

pub(crate) const BEST_EFFORT_APPLIED: &str = "best_effort_accept_applied_count";
pub(crate) const BEST_EFFORT_DEFERRED: &str = "best_effort_accept_deferred_count";
pub(crate) const BEST_EFFORT_ERRORS: &str = "best_effort_accept_error_count";
pub(crate) const BEST_EFFORT_DURATION: &str = "best_effort_accept_duration_seconds";
pub(crate) const SEQUENCE_MODE: &str = "sequence_mode";

pub(crate) const SCHEDULER_EXECUTED: &str = "sequencer_scheduler_executed_tasks_count";
pub(crate) const SCHEDULER_EXECUTING: &str = "sequencer_scheduler_executing_tasks_count";
pub(crate) const LOCKSET_DEFERRED_START: &str = "lockset_deferred_start_count";
pub(crate) const LOCKSET_IMMEDIATE_START: &str = "lockset_immediate_start_count";
pub(crate) const LOCKSET_RETRIED: &str = "lockset_retried_tasks_count";
pub(crate) const LOCKSET_EXEC_WAIT: &str = "lockset_exec_wait_seconds";
pub(crate) const LOCKSET_EXEC_COMPLETE: &str = "lockset_exec_complete_seconds";

pub(crate) const RETRY_ACTIONS: &str = "retry_actions_total";
pub(crate) const RETRY_RETRIED: &str = "retry_retried_total";
pub(crate) const RETRY_ABORTED: &str = "retry_aborted_total";

pub(crate) const POOL_ACQUIRED: &str = "pool_acquired_connection_count";
pub(crate) const POOL_IDLE: &str = "pool_idle_connection_count";
pub(crate) const POOL_MAX: &str = "pool_max_connection_count";
pub(crate) const POOL_CONSTRUCTING: &str = "pool_constructing_connection_count";
pub(crate) const POOL_ACQUIRE_WAIT_COUNT: &str = "pool_acquire_wait_count";
pub(crate) const POOL_ACQUIRE_WAIT_SECONDS: &str = "pool_acquire_wait_seconds";
pub(crate) const POOL_DIAL_ERRORS: &str = "pool_dial_error_count";
pub(crate) const POOL_DIAL_SUCCESS: &str = "pool_dial_success_count";
pub(crate) const POOL_DIAL_LATENCY: &str = "pool_dial_latency_seconds";
pub(crate) const POOL_SQL_READY_LATENCY: &str = "pool_sql_ready_latency_seconds";

pub(crate) const STMTCACHE_HITS: &str = "stmtcache_hits_total";
pub(crate) const STMTCACHE_MISSES: &str = "stmtcache_misses_total";
pub(crate) const STMTCACHE_RELEASES: &str = "stmtcache_releases_total";
pub(crate) const STMTCACHE_DROPS: &str = "stmtcache_drops_total";

pub(crate) const DLQ_MUTATIONS: &str = "dlq_mutations_total";
pub(crate) const DLQ_REPLAYED: &str = "dlq_replayed_total";
pub(crate) const DLQ_PURGED: &str = "dlq_purged_total";
pub(crate) const POISON_BACKOFF: &str = "sequence_poison_backoff_total";

pub(crate) const CORE_PIPELINES: &str = "core_pipelines";
pub(crate) const INGEST_AHEAD_OF_CLOCK: &str = "ingest_ahead_of_clock_total";
pub(crate) const INGEST_NO_SUCH_SCHEMA: &str = "ingest_no_such_schema_total";

pub(crate) const LABEL_RESULT: &str = "result";
pub(crate) const LABEL_REASON: &str = "reason";
pub(crate) const AUTH_REQUESTS: &str = "auth_requests_total";
pub(crate) const AUTH_DISABLED: &str = "auth_disabled";
pub(crate) const JWT_LAST_REFRESH_TIME: &str = "jwt_last_refresh_time";
pub(crate) const JWT_REFRESH_ERRORS: &str = "jwt_refresh_errors_total";

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
pub(crate) fn install() -> PrometheusHandle {
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
            register_global();
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
pub(crate) fn render() -> String {
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
    describe_gauge!(
        HTTP_INFLIGHT_BYTES,
        Unit::Bytes,
        "request body bytes reserved by requests in flight (--maxInflightBytes)"
    );
    describe_counter!(
        HTTP_OVER_BUDGET,
        "requests answered 503 because their body did not fit --maxInflightBytes"
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
        STAGE_READ_LAG,
        Unit::Seconds,
        "now minus the end of the staged range the window reader last read from the table"
    );
    describe_gauge!(
        STAGE_READ_QUEUE,
        "rows of the table in the page the window reader read last (handed to the appliers)"
    );
    describe_gauge!(
        STAGE_MERGE_LAG,
        Unit::Seconds,
        "now minus the end of the last page merged across the schema's tables into flushes"
    );
    describe_gauge!(
        STAGE_MERGE_QUEUE,
        "rows of the schema's window dispatched to flushes and not applied yet"
    );
    describe_gauge!(
        STAGE_STALE,
        "rows the last periodic sweep found staged at or below the committed checkpoint \
(redeliveries, deleted by that sweep)"
    );
    describe_gauge!(
        STAGE_BACKLOG,
        "staged rows not applied yet, counted every 10s by the lease holder up to a cap of \
100000 per table (a bounded index scan; the cap means at least that many)"
    );
    describe_counter!(
        STAGE_RETIRE_ERRORS,
        "failed deletions of applied staged rows"
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
    describe_counter!(
        LOG_MESSAGES,
        "log events written, by level (error, warning, info, debug, trace)"
    );
    describe_counter!(
        SCHEDULER_EXECUTED,
        "apply flushes finished by the per-schema flush schedulers"
    );
    describe_gauge!(
        SCHEDULER_EXECUTING,
        "apply flushes running now, over every schema"
    );
    describe_counter!(
        LOCKSET_IMMEDIATE_START,
        "flushes started at once: a free slot and none of their keys held by an earlier flush"
    );
    describe_counter!(
        LOCKSET_DEFERRED_START,
        "flushes that waited for a slot, for an earlier flush holding one of their keys, or for \
the lease renewal"
    );
    describe_counter!(
        LOCKSET_RETRIED,
        "flushes run a second time once every earlier flush had finished"
    );
    describe_histogram!(
        LOCKSET_EXEC_WAIT,
        Unit::Seconds,
        "time from a flush's dispatch to its start"
    );
    describe_histogram!(
        LOCKSET_EXEC_COMPLETE,
        Unit::Seconds,
        "time from a flush's dispatch to its end"
    );
    describe_counter!(RETRY_ACTIONS, "database actions run under the retry helper");
    describe_counter!(RETRY_RETRIED, "database actions retried, by SQLSTATE");
    describe_counter!(RETRY_ABORTED, "database actions abandoned, by SQLSTATE");
    describe_gauge!(POOL_ACQUIRED, "connections in use");
    describe_gauge!(POOL_IDLE, "idle connections");
    describe_gauge!(POOL_MAX, "maximum connections");
    describe_gauge!(
        POOL_CONSTRUCTING,
        "always 0: sqlx counts a connection being opened as in use, so it shows in \
pool_acquired_connection_count"
    );
    describe_counter!(
        POOL_ACQUIRE_WAIT_COUNT,
        "connections acquired for a transaction or a held connection (statements run directly \
on the pool acquire inside sqlx and are not counted)"
    );
    describe_gauge!(
        POOL_ACQUIRE_WAIT_SECONDS,
        Unit::Seconds,
        "total time spent acquiring the connections counted by pool_acquire_wait_count"
    );
    describe_counter!(POOL_DIAL_SUCCESS, "connections opened");
    describe_counter!(
        POOL_DIAL_ERRORS,
        "connection attempts that failed (seen by a counted acquire)"
    );
    describe_histogram!(
        POOL_DIAL_LATENCY,
        Unit::Seconds,
        "time from the start of a counted acquire to the new connection it opened being \
authenticated (TCP, TLS and startup; a wait for a pool slot before it is included)"
    );
    describe_histogram!(
        POOL_SQL_READY_LATENCY,
        Unit::Seconds,
        "the same as pool_dial_latency_seconds: sqlx opens and authenticates a connection in \
one step and runs no setup statement after it"
    );
    describe_counter!(
        STMTCACHE_HITS,
        "always 0: sqlx caches prepared statements inside each connection and exposes no hit count"
    );
    describe_counter!(
        STMTCACHE_MISSES,
        "always 0: sqlx caches prepared statements inside each connection and exposes no miss count"
    );
    describe_counter!(
        STMTCACHE_RELEASES,
        "always 0: sqlx closes evicted statements inside each connection without telling"
    );
    describe_counter!(
        STMTCACHE_DROPS,
        "always 0: sqlx drops a closed connection's statements without telling"
    );
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

/// Series present at 0 from the start, whatever work has happened yet.
fn register_global() {
    for level in LEVELS {
        metrics::counter!(LOG_MESSAGES, LABEL_LEVEL => level).increment(0);
    }
    let set = [(LABEL_SET, SET_SCHEDULER)];
    for name in [
        LOCKSET_IMMEDIATE_START,
        LOCKSET_DEFERRED_START,
        LOCKSET_RETRIED,
    ] {
        metrics::counter!(name, &set).increment(0);
    }
    for name in [
        SCHEDULER_EXECUTED,
        RETRY_ACTIONS,
        STMTCACHE_HITS,
        STMTCACHE_MISSES,
        STMTCACHE_RELEASES,
        STMTCACHE_DROPS,
        INGEST_NO_SUCH_SCHEMA,
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!(SCHEDULER_EXECUTING).increment(0.0);
}

/// Registers a pool's counters at 0 (label `pool`: `target` or `staging`).
pub(crate) fn register_pool(pool: &'static str) {
    let l = [(LABEL_POOL, pool)];
    for name in [POOL_ACQUIRE_WAIT_COUNT, POOL_DIAL_SUCCESS, POOL_DIAL_ERRORS] {
        metrics::counter!(name, &l).increment(0);
    }
    metrics::gauge!(POOL_ACQUIRE_WAIT_SECONDS, &l).increment(0.0);
    metrics::gauge!(POOL_CONSTRUCTING, &l).set(0.0);
}

/// Registers the counters of a schema at 0, with the labels their recording sites use.
pub(crate) fn register_schema(schema: &crate::ident::Schema) {
    let target = [
        (LABEL_KIND, "cdc".to_string()),
        (LABEL_TARGET, schema.to_string()),
    ];
    for name in [MUTATIONS_RECEIVED, MUTATIONS_SUCCESS, MUTATIONS_ERROR] {
        metrics::counter!(name, &target).increment(0);
    }
    let l = [(LABEL_SCHEMA, schema.to_string())];
    for name in [
        CHECKPOINT_BACKWARDS,
        CORE_SWEEP_APPLY_COUNT,
        CORE_SWEEP_SKEW,
        CORE_FLUSH_OVERLAPS,
        CORE_FLUSH_DEFERRED,
        POISON_BACKOFF,
        STAGE_BELOW_CHECKPOINT,
        STAGE_SKIPPED_APPLIED,
        INGEST_AHEAD_OF_CLOCK,
    ] {
        metrics::counter!(name, &l).increment(0);
    }
}

/// Registers the counters of a table (and of its schema) at 0, with the labels their
/// recording sites use: the first time this process stages or reads the table. The stale-row
/// gauge too: only a sweep of a caught-up schema sets it, which a schema whose resolved
/// timestamps keep coming may not get for minutes.
pub(crate) fn register_table(table: &crate::ident::Table) {
    register_schema(&table.schema);
    let l = table_labels(table);
    for name in [
        STAGE_MUTATIONS,
        STAGE_DUPLICATES,
        STAGE_ERRORS,
        STAGE_READ_ROWS,
        STAGE_RETIRE_ERRORS,
        APPLY_UPSERTS,
        APPLY_DELETES,
        APPLY_ERRORS,
        APPLY_CONFLICTS,
        APPLY_RESOLVES,
    ] {
        metrics::counter!(name, &l).increment(0);
    }
    let _ = metrics::gauge!(STAGE_STALE, &l);
}

/// The `schema` and `table` labels of a table: `db.schema` and the name as written.
pub(crate) fn table_labels(table: &crate::ident::Table) -> [(&'static str, String); 2] {
    [
        (LABEL_SCHEMA, table.schema.to_string()),
        (LABEL_TABLE, table.name.raw().to_string()),
    ]
}

/// The `level` label values of `log_message_count`, named as the reference names them.
const LEVELS: [&str; 5] = ["error", "warning", "info", "debug", "trace"];

fn level_label(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => LEVELS[0],
        tracing::Level::WARN => LEVELS[1],
        tracing::Level::INFO => LEVELS[2],
        tracing::Level::DEBUG => LEVELS[3],
        tracing::Level::TRACE => LEVELS[4],
    }
}

/// A tracing layer counting events by level into `log_message_count{level}`. Placed over the
/// log filter, it counts the events that are written, not every event the code could emit.
pub(crate) struct LogCounter;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogCounter {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        metrics::counter!(LOG_MESSAGES, LABEL_LEVEL => level_label(event.metadata().level()))
            .increment(1);
    }
}

// The changefeed emulator (`cdc-sink feed`), the kv workload and the verifier; described by
// their modules when they start.
pub(crate) const LABEL_FEED: &str = "feed";
pub(crate) const FEED_BATCHES: &str = "feed_batches_sent_total";
pub(crate) const FEED_MESSAGES: &str = "feed_messages_sent_total";
pub(crate) const FEED_BYTES: &str = "feed_sent_bytes_total";
pub(crate) const FEED_RETRIES: &str = "feed_retries_total";
pub(crate) const FEED_CHAOS_RESENDS: &str = "feed_chaos_resends_total";
pub(crate) const FEED_RESOLVED: &str = "feed_resolved_sent_total";
pub(crate) const FEED_SOURCE_ERRORS: &str = "feed_source_errors_total";
pub(crate) const FEED_LAG: &str = "feed_lag_seconds";
pub(crate) const WORKLOAD_OPS: &str = "workload_ops_total";
pub(crate) const WORKLOAD_ERRORS: &str = "workload_errors_total";
pub(crate) const VERIFY_DIVERGENT_ROWS: &str = "verify_divergent_rows";
pub(crate) const VERIFY_CLEAN_CHECKS: &str = "verify_consecutive_clean_checks";
/// Rows `verify --repair` wrote (`kind` = `upsert` or `delete`), by table.
pub(crate) const VERIFY_REPAIRED_ROWS: &str = "verify_repaired_rows_total";
/// 1 once `verify --watch` saw `--clean` clean checks in a row, else 0.
pub(crate) const VERIFY_FAILBACK_READY: &str = "verify_failback_ready";

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    /// Emits one event per level under a subscriber shaped like the command's (the log filter
    /// inside, the counter over it) and returns the rendered counts.
    fn count_logs(filter: &str) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .finish()
            .with(LogCounter);
        metrics::with_local_recorder(&recorder, || {
            tracing::subscriber::with_default(subscriber, || {
                tracing::error!("e");
                tracing::warn!("w");
                tracing::warn!("w");
                tracing::info!("i");
                tracing::debug!("d");
                tracing::trace!("t");
            })
        });
        handle.render()
    }

    #[test]
    fn logged_events_are_counted_by_level() {
        let page = count_logs("info");
        assert!(
            page.contains("log_message_count{level=\"error\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("log_message_count{level=\"warning\"} 2"),
            "{page}"
        );
        assert!(
            page.contains("log_message_count{level=\"info\"} 1"),
            "{page}"
        );
        // Filtered out events are not written, so not counted.
        assert!(!page.contains("level=\"debug\""), "{page}");
        assert!(!page.contains("level=\"trace\""), "{page}");
        let page = count_logs("trace");
        assert!(
            page.contains("log_message_count{level=\"debug\"} 1"),
            "{page}"
        );
        assert!(
            page.contains("log_message_count{level=\"trace\"} 1"),
            "{page}"
        );
    }

    #[test]
    fn registered_series_start_at_zero() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let table = crate::ident::Table::new(crate::ident::Schema::new("Db", "public"), "T");
        metrics::with_local_recorder(&recorder, || {
            register_global();
            register_pool("target");
            register_table(&table);
        });
        let page = handle.render();
        for line in [
            "apply_errors_total{schema=\"Db.public\",table=\"T\"} 0",
            "stage_retire_errors_total{schema=\"Db.public\",table=\"T\"} 0",
            "stage_stale_mutations_count{schema=\"Db.public\",table=\"T\"} 0",
            "mutations_error_count{kind=\"cdc\",target=\"Db.public\"} 0",
            "sequence_poison_backoff_total{schema=\"Db.public\"} 0",
            "lockset_deferred_start_count{set=\"scheduler\"} 0",
            "log_message_count{level=\"error\"} 0",
            "stmtcache_hits_total 0",
            "pool_dial_error_count{pool=\"target\"} 0",
        ] {
            assert!(page.contains(line), "{line} missing from {page}");
        }
    }

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
