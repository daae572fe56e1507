//! What every pipeline of the sequencer shares: its flags, its error, lease timing, the shared
//! parts (databases, stager, checkpoints, applier, userscript) and the registry of running
//! pipelines.

use crate::apply::Applier;
use crate::checkpoint::{AppliedRanges, CheckpointError, Checkpoints, Leases};
use crate::config::parse_duration;
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::script::{ScriptError, Userscript};
use crate::stage::{StageError, Stager};
use crate::target::Database;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// `--parallelism` when unset or 0, as in the reference.
const DEFAULT_PARALLELISM: usize = 16;

/// Flags of the sequencing step.
#[derive(clap::Args, Debug, Clone)]
pub struct SequenceArgs {
    /// Apply each request to the target at once, without staging or transactional consistency.
    #[arg(long = "immediate", env = "CDC_SINK_IMMEDIATE")]
    pub immediate: bool,
    /// Always use best-effort mode: apply each request at once where per-key order allows,
    /// stage the rest until a resolved timestamp.
    #[arg(long = "bestEffortOnly", env = "CDC_SINK_BEST_EFFORT_ONLY")]
    pub best_effort_only: bool,
    /// Per schema, switch to best-effort mode while the checkpoint lags by at least this much,
    /// back to consistent once it lags by at most a quarter of it; 0 = always consistent.
    #[arg(long = "bestEffortWindow", env = "CDC_SINK_BEST_EFFORT_WINDOW", default_value = "1h0m0s", value_parser = parse_duration)]
    pub best_effort_window: Duration,
    /// Maximum time to buffer staged data before applying (windows are applied as soon as
    /// their resolved timestamp arrives, so this only bounds the idle poll).
    #[arg(long = "flushPeriod", env = "CDC_SINK_FLUSH_PERIOD", default_value = "1s", value_parser = parse_duration)]
    pub flush_period: Duration,
    /// Target number of mutations per target transaction.
    #[arg(
        long = "flushSize",
        env = "CDC_SINK_FLUSH_SIZE",
        default_value_t = 1000
    )]
    pub flush_size: usize,
    /// Concurrent target transactions per schema: transactions of one window whose rows share
    /// no (table, key) run at once, each on its own connection (at most half the target pool);
    /// 1 applies serially; 0 means the default.
    #[arg(
        long = "parallelism",
        env = "CDC_SINK_PARALLELISM",
        default_value_t = DEFAULT_PARALLELISM
    )]
    pub parallelism: usize,
    /// Rows per staging read query.
    #[arg(
        long = "scanSize",
        env = "CDC_SINK_SCAN_SIZE",
        default_value_t = 10_000
    )]
    pub scan_size: usize,
    /// Row data per staging read: a read stops early once its rows hold this many bytes, so a
    /// page of wide rows stays bounded (one source timestamp is always read whole).
    #[arg(
        long = "scanBytes",
        env = "CDC_SINK_SCAN_BYTES",
        default_value_t = 32 << 20
    )]
    pub scan_bytes: usize,
    /// How long applied staging rows are kept (accepted for compatibility: rows are deleted by
    /// the transaction that applies them).
    #[arg(long = "retireOffset", env = "CDC_SINK_RETIRE_OFFSET", default_value = "24h0m0s", value_parser = parse_duration)]
    pub retire_offset: Duration,
    /// Accepted for compatibility; unused (in the reference, the number of poisoned keys a
    /// best-effort sweep tolerates; here deferred rows are swept by the consistent pipeline).
    #[arg(
        long = "timestampLimit",
        env = "CDC_SINK_TIMESTAMP_LIMIT",
        default_value_t = 1000
    )]
    pub timestamp_limit: usize,
    /// Stop a schema's apply pipeline (releasing its lease) after this long without a resolved
    /// timestamp while nothing is pending; the next one starts it again. 0 = never.
    #[arg(long = "pipelineIdle", env = "CDC_SINK_PIPELINE_IDLE", default_value = "5m0s", value_parser = parse_duration)]
    pub pipeline_idle: Duration,
    /// Accepted for compatibility; unused (as in the reference).
    #[arg(long = "quiescentPeriod", env = "CDC_SINK_QUIESCENT_PERIOD", default_value = "10s", value_parser = parse_duration)]
    pub quiescent_period: Duration,
}

impl SequenceArgs {
    /// `--parallelism`, with 0 meaning the default.
    pub fn parallelism(&self) -> usize {
        if self.parallelism == 0 {
            DEFAULT_PARALLELISM
        } else {
            self.parallelism
        }
    }

    pub fn validate(&self) -> Result<(), SequenceError> {
        if self.flush_size == 0 || self.scan_size == 0 || self.scan_bytes == 0 {
            return Err(SequenceError::Config(
                "--flushSize, --scanSize and --scanBytes must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("target transaction failed")]
    Sql(#[source] sqlx::Error),
    #[error("lease on {0} was lost")]
    LeaseLost(String),
    #[error(transparent)]
    Script(#[from] ScriptError),
    /// An apply task that panicked or was cut short, described in words (a panic carries no
    /// error value to keep as a source).
    #[error("apply task failed: {0}")]
    Task(String),
    #[error("rows of table {0} are staged but the table is not in the target schema; create it, or delete its staged rows")]
    UnknownTable(String),
    #[error("stopping")]
    Stopped,
}

impl SequenceError {
    pub fn is_unavailable(&self) -> bool {
        match self {
            SequenceError::Apply(e) => e.is_unavailable(),
            SequenceError::Stage(e) => e.is_unavailable(),
            SequenceError::Checkpoint(e) => e.is_unavailable(),
            SequenceError::Sql(e) => crate::target::is_unavailable(e),
            SequenceError::Script(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Lease timing. Renewal happens at least every third of the lifetime, between apply
/// transactions (see `consistent`).
pub(crate) const LEASE_LIFETIME: Duration = Duration::from_secs(10);
/// With separate staging, a target transaction is rolled back rather than committed once less
/// than this is left of the lease it renewed before it began (see `consistent`).
pub(super) const LEASE_MARGIN: Duration = Duration::from_secs(2);
pub(super) const POLL: Duration = Duration::from_secs(1);
/// At shutdown, the time left for releasing leases after abandoning windows still in flight
/// (at most a quarter of the grace period).
pub(super) const RELEASE_MARGIN: Duration = Duration::from_secs(1);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a running pipeline asks whether it is idle, at most.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(30);

/// The name of the lease that elects the instance applying `schema`.
pub fn lease_name(schema: &Schema) -> String {
    format!("sequtil.Lease.\"{}\"", schema.canonical())
}

/// Shared parts every schema's pipeline uses.
pub struct Parts {
    pub args: SequenceArgs,
    /// Where mutations are applied; staging, checkpoints and leases live in `stager`'s database.
    pub target: Database,
    /// Staging is another database than the target: no transaction spans both.
    pub separate_staging: bool,
    pub stager: Arc<Stager>,
    pub checkpoints: Arc<Checkpoints>,
    /// Ranges applied beyond the committed checkpoint (see `consistent`).
    pub ranges: Arc<AppliedRanges>,
    pub leases: Arc<Leases>,
    pub applier: Applier,
    /// The userscript's write-time hooks (`map`, `deleteKey`, `apply`), when there is one.
    pub script: Option<Userscript>,
    /// The running pipelines (filled by the sequencer).
    pub pipelines: Pipelines,
    /// A small pool on the staging database for checkpoint commits (the leases have one
    /// too), which ingest and bulk apply work cannot take.
    pub control: Database,
}

/// The running pipelines: per schema, how to wake it and when it was last woken; and what
/// blocks the schemas whose windows keep failing here.
#[derive(Default)]
pub struct Pipelines(
    pub(super) Mutex<HashMap<Schema, Running>>,
    Mutex<HashMap<Schema, Blocked>>,
);

/// Why a schema's windows fail on this instance (its lease holder), for `/_/status`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Blocked {
    /// The mutation the target refuses on its own, when the search found one: table, raw
    /// JSON key (an identifier, never row values) and source time.
    pub poison: Option<(Table, String, Hlc)>,
    pub error: String,
    /// When the window is tried again.
    pub next_retry: Option<std::time::SystemTime>,
}

impl Pipelines {
    fn blocked_mut(&self, schema: &Schema, f: impl FnOnce(&mut Blocked)) {
        f(self
            .1
            .lock()
            .expect("poisoned")
            .entry(schema.clone())
            .or_default());
    }

    /// The window of `schema` failed with `error`; it is retried after `wait`.
    pub(crate) fn failed(&self, schema: &Schema, error: String, wait: Duration) {
        self.blocked_mut(schema, |b| {
            b.error = error;
            b.next_retry = Some(std::time::SystemTime::now() + wait);
        });
    }

    /// The failed window's poison mutation, or `None` when none was found.
    pub(crate) fn poison(&self, schema: &Schema, poison: Option<(Table, String, Hlc)>) {
        self.blocked_mut(schema, |b| b.poison = poison);
    }

    /// A window of `schema` went through: nothing blocks it.
    pub(crate) fn cleared(&self, schema: &Schema) {
        self.1.lock().expect("poisoned").remove(schema);
    }

    pub(crate) fn blocked(&self, schema: &Schema) -> Option<Blocked> {
        self.1.lock().expect("poisoned").get(schema).cloned()
    }
}

pub(super) struct Running {
    pub(super) notify: Arc<Notify>,
    pub(super) woken: std::time::Instant,
}

impl Pipelines {
    /// How often a pipeline of `parts` asks [`Pipelines::retire_if_idle`]; `None` when idle
    /// pipelines never stop (`--pipelineIdle 0`).
    pub(crate) fn check_every(parts: &Parts) -> Option<Duration> {
        let idle = parts.args.pipeline_idle;
        (!idle.is_zero()).then(|| (idle / 4).clamp(Duration::from_millis(100), IDLE_CHECK))
    }

    /// Ends the pipeline of `schema` if it was not woken for `--pipelineIdle` and the schema
    /// has no pending window. Removal happens under the lock [`Sequencer::wake`] takes, so a
    /// wake either lands before (and keeps the pipeline) or after (and starts a new one).
    pub(crate) async fn retire_if_idle(&self, parts: &Parts, schema: &Schema) -> bool {
        let idle = parts.args.pipeline_idle;
        if idle.is_zero() || !self.unwoken(schema, idle) {
            return false;
        }
        match parts.checkpoints.bounds(schema).await {
            Ok(b) if b.proposed <= b.committed => {}
            _ => return false,
        }
        let mut pipes = self.0.lock().expect("poisoned");
        let woken_since = pipes.get(schema).is_none_or(|r| r.woken.elapsed() < idle);
        if woken_since {
            return false;
        }
        pipes.remove(schema);
        metrics::gauge!(m::CORE_PIPELINES).set(pipes.len() as f64);
        tracing::info!(schema = %schema, idle = ?idle, "pipeline idle; stopping");
        true
    }

    fn unwoken(&self, schema: &Schema, idle: Duration) -> bool {
        self.0
            .lock()
            .expect("poisoned")
            .get(schema)
            .is_some_and(|r| r.woken.elapsed() >= idle)
    }
}

/// Sleeps `d`, or forever when `None`.
pub(super) async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

pub(super) fn backoff(attempt: u32) -> Duration {
    let secs = 1u64 << attempt.min(6);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

pub(super) fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

pub(super) fn schema_label(schema: &Schema) -> [(&'static str, String); 1] {
    [(m::LABEL_SCHEMA, schema.to_string())]
}
