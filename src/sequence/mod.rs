//! When and in what order staged mutations reach the target.
//!
//! *Consistent* mode (the default): every instance stages; per schema, the instance holding
//! the schema's lease reads the staged window `(committed, resolved]` in HLC order and applies
//! it in transactions that never split a source timestamp, several at once when their keys are
//! disjoint (`--parallelism`). Each transaction deletes the staged rows it applied (DESIGN
//! §3.2), so the target never holds applied-but-staged data, and the checkpoint is committed in
//! order behind them; with a separate staging database this becomes the reference's two-step
//! scheme (see `window`). *Immediate* mode applies each request at once.
//! *Best-effort* mode ([`best_effort`]) applies requests at once where each key's order allows
//! and stages the rest for the consistent pipeline; [`mode`] picks the mode per schema.

mod best_effort;
pub mod mode;
pub mod poison;
mod schedule;
mod window;

pub use mode::{Admission, Mode};
pub use poison::{find_poison, Poison};

use crate::apply::{Applier, ApplyStats, SchemaInfo};
use crate::checkpoint::{AppliedRanges, CheckpointError, Checkpoints, Leases};
use crate::config::parse_duration;
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::mutation::{last_version_per_key, Mutation, TableBatches};
use crate::script::{ScriptError, Userscript};
use crate::stage::{StageError, Stager};
use crate::target::Database;
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

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
    #[error("target transaction failed: {}", crate::target::safe(.0))]
    Sql(#[source] sqlx::Error),
    #[error("lease on {0} was lost")]
    LeaseLost(String),
    #[error(transparent)]
    Script(#[from] ScriptError),
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
/// transactions (see `window`).
pub(crate) const LEASE_LIFETIME: Duration = Duration::from_secs(10);
/// With separate staging, a target transaction is rolled back rather than committed once less
/// than this is left of the lease it renewed before it began (see `window`).
const LEASE_MARGIN: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_secs(1);
/// At shutdown, the time left for releasing leases after abandoning windows still in flight
/// (at most a quarter of the grace period).
const RELEASE_MARGIN: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a running pipeline asks whether it is idle, at most.
const IDLE_CHECK: Duration = Duration::from_secs(30);

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
    /// Ranges applied beyond the committed checkpoint (see `window`).
    pub ranges: Arc<AppliedRanges>,
    pub leases: Arc<Leases>,
    pub applier: Applier,
    pub hooks: Option<Hooks>,
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
    Mutex<HashMap<Schema, Running>>,
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

struct Running {
    notify: Arc<Notify>,
    woken: std::time::Instant,
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

/// Owns one pipeline task per target schema.
pub struct Sequencer {
    parts: Arc<Parts>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stop: watch::Sender<bool>,
    /// When stopping must be over, once [`Sequencer::stop`] was called.
    deadline: Mutex<Option<tokio::time::Instant>>,
    /// Raised shortly before the deadline: pipelines drop their window and release the lease.
    abandon: watch::Sender<bool>,
    modes: mode::Modes,
}

impl Sequencer {
    pub fn new(parts: Parts) -> Arc<Sequencer> {
        let (stop, _) = watch::channel(false);
        let mut policy = mode::Policy::of(&parts.args);
        if parts.separate_staging && matches!(policy, mode::Policy::Auto(_)) {
            // Best-effort stages and applies in one transaction, which needs staging inside
            // the target database.
            tracing::info!("separate staging database: automatic best-effort mode is off");
            policy = mode::Policy::Fixed(Mode::Consistent);
        }
        if policy == mode::Policy::Fixed(Mode::BestEffort) {
            parts.stager.enable_key_index();
        }
        let sources = mode::Sources {
            checkpoints: parts.checkpoints.clone(),
            stager: parts.stager.clone(),
            applier: parts.applier.clone(),
        };
        let modes = mode::Modes::new(policy, sources, stop.subscribe());
        Arc::new(Sequencer {
            parts: Arc::new(parts),
            tasks: Mutex::new(Vec::new()),
            stop,
            deadline: Mutex::new(None),
            abandon: watch::channel(false).0,
            modes,
        })
    }

    pub fn immediate(&self) -> bool {
        self.parts.args.immediate
    }

    /// Lets a request of `schema` run in the schema's current mode, which holds until the
    /// admission is dropped.
    pub async fn admit(&self, schema: &Schema) -> Result<Admission, SequenceError> {
        self.modes.admit(schema).await
    }

    /// Best-effort mode: applies what per-key order allows, stages the rest.
    pub async fn accept_best_effort(
        &self,
        schema: &Schema,
        info: &SchemaInfo,
        batches: &TableBatches,
    ) -> Result<(), SequenceError> {
        if let Some(h) = &self.parts.hooks {
            h.configure(&self.parts.applier, info);
        }
        best_effort::accept(&self.parts, schema, info, batches).await
    }

    /// Starts the pipeline of `schema` if it is not running, and wakes it.
    pub fn wake(&self, schema: &Schema) {
        if self.parts.args.immediate {
            return;
        }
        self.modes.kick(schema);
        let mut pipes = self.parts.pipelines.0.lock().expect("poisoned");
        if let Some(r) = pipes.get_mut(schema) {
            r.woken = std::time::Instant::now();
            r.notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        pipes.insert(
            schema.clone(),
            Running {
                notify: notify.clone(),
                woken: std::time::Instant::now(),
            },
        );
        metrics::gauge!(m::CORE_PIPELINES).set(pipes.len() as f64);
        drop(pipes);
        let pipeline = window::Pipeline::new(self.parts.clone(), schema.clone(), notify);
        let stop = self.stop.subscribe();
        let handle = tokio::spawn(pipeline.run(stop, self.abandon.subscribe()));
        let mut tasks = self.tasks.lock().expect("poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
        tracing::info!(schema = %schema, "pipeline started");
    }

    /// Starts pipelines for schemas with staged but unapplied windows and tables in the
    /// target (a schema dropped since keeps its rows, but nothing can apply them).
    pub async fn recover(&self) -> Result<(), SequenceError> {
        for schema in self.parts.checkpoints.pending_schemas().await? {
            let info = self.parts.applier.schema(&schema).await?;
            if info.tables.is_empty() {
                tracing::warn!(schema = %schema, "pending checkpoints of a schema without tables; not starting its pipeline");
                continue;
            }
            self.wake(&schema);
        }
        Ok(())
    }

    /// Asks every pipeline to stop by `deadline`: no new window or flush starts, flushes in
    /// flight finish and the checkpoint is committed over what they applied. What still runs
    /// shortly before the deadline is abandoned (its transactions roll back; the rows stay
    /// staged) so the leases can be released in time. [`Sequencer::shutdown`] waits for it.
    pub fn stop(&self, deadline: tokio::time::Instant) {
        let mut at = self.deadline.lock().expect("poisoned");
        if at.is_none() {
            *at = Some(deadline);
        }
        drop(at);
        let _ = self.stop.send(true);
    }

    /// Stops every pipeline (see [`Sequencer::stop`]; at once if it was not called) and
    /// releases the leases, by the deadline.
    pub async fn shutdown(&self) {
        self.stop(tokio::time::Instant::now());
        let deadline = self
            .deadline
            .lock()
            .expect("poisoned")
            .expect("set by stop");
        let now = tokio::time::Instant::now();
        let margin = RELEASE_MARGIN.min(deadline.saturating_duration_since(now) / 4);
        let abandon = deadline - margin;
        let mut tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().expect("poisoned"));
        let wait_all = futures::future::join_all(tasks.iter_mut());
        if tokio::time::timeout_at(abandon, wait_all).await.is_err() {
            tracing::warn!("grace period nearly over; abandoning the windows in flight (their rows stay staged)");
            let _ = self.abandon.send(true);
        }
        for t in tasks {
            if t.is_finished() {
                continue;
            }
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        if tokio::time::timeout_at(deadline, self.modes.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; mode evaluations abandoned");
        }
    }

    /// What blocks `schema`'s windows, if this instance holds its lease and they fail.
    pub fn blocked(&self, schema: &Schema) -> Option<Blocked> {
        self.parts.pipelines.blocked(schema)
    }

    /// The mode `schema` runs in here, if this process has seen it.
    pub fn mode(&self, schema: &Schema) -> Option<Mode> {
        self.modes.current(schema)
    }

    /// Immediate mode: applies one request in a single target transaction.
    pub async fn apply_now(
        &self,
        schema: &Schema,
        batches: &TableBatches,
    ) -> Result<(), SequenceError> {
        let info = self.parts.applier.schema(schema).await?;
        if let Some(h) = &self.parts.hooks {
            h.configure(&self.parts.applier, &info);
        }
        let mut tx = self
            .parts
            .target
            .begin()
            .await
            .map_err(SequenceError::Sql)?;
        write_ordered(
            &self.parts.applier,
            self.parts.hooks.as_ref(),
            &mut tx,
            &info,
            batches,
        )
        .await?;
        tx.commit().await.map_err(SequenceError::Sql)?;
        Ok(())
    }

    /// Immediate mode: a resolved timestamp is recorded and committed at once.
    pub async fn resolve_now(&self, schema: &Schema, ts: Hlc) -> Result<(), SequenceError> {
        self.parts.checkpoints.advance(schema, ts).await?;
        let mut tx = self
            .parts
            .stager
            .database()
            .begin()
            .await
            .map_err(SequenceError::Sql)?;
        self.parts.checkpoints.commit(&mut tx, schema, ts).await?;
        tx.commit().await.map_err(SequenceError::Sql)?;
        self.parts.checkpoints.committed(schema, ts);
        Ok(())
    }
}

/// The userscript as the pipeline uses it: its per-table options go to the applier the first
/// time a table is seen; its `map`, `deleteKey` and `apply` run at apply time.
#[derive(Clone)]
pub struct Hooks {
    script: Userscript,
    configured: Arc<Mutex<HashSet<Table>>>,
}

impl Hooks {
    pub fn new(script: Userscript) -> Hooks {
        Hooks {
            script,
            configured: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    pub fn script(&self) -> &Userscript {
        &self.script
    }

    /// Hands the script's `configureTable` options of every table of `info` to the applier,
    /// once per table (a schema reload may bring new tables).
    pub fn configure(&self, applier: &Applier, info: &SchemaInfo) {
        let mut done = self.configured.lock().expect("poisoned");
        for table in info.tables.keys() {
            if done.insert(table.clone()) {
                if let Some(cfg) = self.script.table_config(table) {
                    applier.set_config(table, cfg);
                }
            }
        }
    }
}

/// Writes several tables' mutations in foreign-key order: deletes children first, upserts
/// parents first. Each table's batch goes through the userscript's `map`/`deleteKey` and is
/// then reduced to the last version of each key, the net effect of applying it in order. A
/// table whose userscript has `apply` gets its whole batch there, in the upsert pass.
pub(crate) async fn write_ordered(
    applier: &Applier,
    hooks: Option<&Hooks>,
    conn: &mut PgConnection,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Result<(), SequenceError> {
    write_ordered_counted(applier, hooks, conn, info, batches)
        .await
        .map(|_| ())
}

/// [`write_ordered`], adding up what the applier did (a table written by a userscript's
/// `apply` counts nothing).
pub(crate) async fn write_ordered_counted(
    applier: &Applier,
    hooks: Option<&Hooks>,
    conn: &mut PgConnection,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Result<ApplyStats, SequenceError> {
    let mut stats = ApplyStats::default();
    let mut deletes: HashMap<&Table, Vec<Mutation>> = HashMap::new();
    let mut upserts: HashMap<&Table, Vec<Mutation>> = HashMap::new();
    let mut scripted: HashMap<&Table, Vec<Mutation>> = HashMap::new();
    for (table, muts) in batches {
        let mapped;
        let muts = match hooks {
            Some(h) if h.script.has_map(table) => {
                mapped = h.script.map(table, info, muts.clone()).await?;
                &mapped
            }
            _ => muts,
        };
        let last = last_version_per_key(muts);
        if hooks.is_some_and(|h| h.script.has_apply(table)) {
            scripted.insert(table, last.into_iter().cloned().collect());
            continue;
        }
        for mu in last {
            let side = if mu.is_delete() {
                &mut deletes
            } else {
                &mut upserts
            };
            side.entry(table).or_default().push(mu.clone());
        }
    }
    let ordered: Vec<&Table> = info.levels.iter().flatten().collect();
    let unordered: Vec<&Table> = batches.keys().filter(|t| !ordered.contains(t)).collect();
    for table in ordered.iter().rev().chain(unordered.iter()) {
        if let Some(muts) = deletes.get(*table) {
            stats.add(applier.apply(conn, table, muts).await?);
        }
    }
    for table in ordered.iter().chain(unordered.iter()) {
        if let Some(muts) = upserts.get(*table) {
            stats.add(applier.apply(conn, table, muts).await?);
        }
        if let (Some(muts), Some(h)) = (scripted.get(*table), hooks) {
            h.script.apply(table, muts, conn, applier).await?;
        }
    }
    Ok(stats)
}

/// Sleeps `d`, or forever when `None`.
async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn backoff(attempt: u32) -> Duration {
    let secs = 1u64 << attempt.min(6);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

fn schema_label(schema: &Schema) -> [(&'static str, String); 1] {
    [(m::LABEL_SCHEMA, schema.to_string())]
}
