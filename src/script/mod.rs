//! The userscript (`--userscript FILE`): a TypeScript or JavaScript ES module that imports
//! `cdc-sink@v1` (or `replicator@v1`) to route, rewrite and merge rows.
//!
//! boa's `Context` is not `Send`, so the script runs on dedicated threads, each with its own
//! Context that ran the top level; the async side ([`Userscript`], in this file) sends one
//! message per batch on a bounded queue and awaits a oneshot. What the top level configured is
//! captured as plain data ([`Captured`]), so tables whose options are data (cas, deadlines,
//! standardMerge without fallback, …) run no JS. `getTX()` calls of an `apply` callback travel
//! back to the caller's task, which owns the target connection.
//!
//! | file | owns |
//! |---|---|
//! | this one | [`Userscript`], the handle the sink holds: loading, one job per batch within its deadline, the table options for the applier; the flags of the engine |
//! | [`loader`] | the script's files (TypeScript stripped in process by [`transpile`], oxc), imports, and engine errors named by the script's own lines |
//! | [`engine`] | one Context with the script loaded, and one method per hook (`dispatch`, `deletesTo`, `map`, `deleteKey`, `merge`, `apply`) |
//! | [`jobs`] | the job queue of one Context (promise reactions, the engine's async jobs) |
//! | [`workers`] | the engine threads: the shared queue, replacement of failed workers, stuck workers and their watchdog, CPU and heap ([`mem`]) probes |
//! | [`host`] | the `cdc-sink@v1` module and `console`, as the script sees them |
//! | [`tx`] | `getTX()`, both halves: the object the script calls on its thread, and the statements run on the caller's connection |
//! | [`convert`], [`config`], [`merge`] | values between JSON and JS; the captured configuration; merge functions backed by the script |
//!
//! The dispatch benchmark and its userscript are in [`crate::bench::dispatch`].
mod config;
mod convert;
mod engine;
mod host;
mod jobs;
mod loader;
mod mem;
mod merge;
mod transpile;
mod tx;
mod workers;

pub use config::{Captured, DeletesTo, MergeKind, SourceOptions, TableName, TableOptions};

use crate::apply::merge::{Conflict, MergeFn, Resolution};
use crate::apply::{Applier, Column, SchemaInfo, TableConfig, TableConfigs, TableSchema};
use crate::ident::{Ident, Schema, Table};
use crate::mutation::Mutation;
use engine::{Reply, Work};
use loader::Sources;
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workers::{Job, Shared};

/// Our description of the host module, printed by `cdc-sink userscript --api`.
pub const API_DTS: &str = include_str!("../../userscripts/cdc-sink@v1.d.ts");

/// Rows per engine message: bounds the per-thread heap (its GC threshold only grows).
const CHUNK: usize = 2_000;

/// Loop iterations one function call may run before the engine throws (boa counts every loop
/// of a call together), so `while (true) {}` fails its batch with an error instead of holding
/// the worker. A loop that calls a function running its own loop is counted per call.
pub(crate) const LOOP_LIMIT: u64 = 10_000_000;
/// Nested calls the engine allows before it throws.
const RECURSION_LIMIT: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("cannot read {file}: {error}")]
    Read { file: String, error: String },
    #[error("{file}:{line}:{column}: syntax error: {message}")]
    Syntax {
        file: String,
        line: u32,
        column: u32,
        message: String,
    },
    #[error("{file}: {message}")]
    Import { file: String, message: String },
    #[error("{}", js_text(context, file.as_deref(), *line, *column, message))]
    Js {
        /// What ran: `dispatch of kv.public.kv at 1700000000000000000.0000000000`, …
        context: String,
        file: Option<String>,
        line: u32,
        column: u32,
        message: String,
    },
    #[error("{what} did not finish before its deadline; a worker still running it is abandoned and replaced")]
    Timeout { what: String },
    #[error("{what} not run: an earlier batch of {schema} is still running in an abandoned userscript worker")]
    Stuck { what: String, schema: String },
    #[error("the userscript worker stopped while running this batch")]
    Crashed,
    #[error("the userscript runtime has stopped")]
    Stopped,
    #[error("table {0} not found in the target schema")]
    UnknownTable(String),
    #[error("{0} is not configured by the userscript")]
    NotConfigured(String),
    #[error("invalid userscript configuration: {0}")]
    Config(String),
    #[error("userscript engine: {0}")]
    Engine(String),
    #[error("cannot read the target schema")]
    Target(#[source] crate::apply::ApplyError),
}

fn js_text(context: &str, file: Option<&str>, line: u32, column: u32, message: &str) -> String {
    match file {
        Some(f) if line > 0 => format!("{f}:{line}:{column}: {context}: {message}"),
        Some(f) => format!("{f}: {context}: {message}"),
        None => format!("{context}: {message}"),
    }
}

impl ScriptError {
    /// Running the same batch again may succeed (a replaced worker, a stopped runtime).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ScriptError::Timeout { .. }
                | ScriptError::Stuck { .. }
                | ScriptError::Crashed
                | ScriptError::Stopped
                | ScriptError::Target(_)
        )
    }
}

/// How the engine threads run.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Engine threads. Each has its own copy of the script's globals: keep 1 for scripts that
    /// keep state between calls.
    pub workers: usize,
    /// Longest a batch may take in the engine (including `getTX()` round trips).
    pub deadline: Duration,
    /// Bytes an engine thread's heap may hold: a worker above it after a batch is replaced,
    /// and a batch that grows it by more aborts the process (0 disables both).
    pub memory_budget: u64,
    /// Batches waiting for an engine thread before senders wait too.
    pub queue: usize,
    /// Workers abandoned past their deadline that may keep running at once; one more aborts
    /// the process.
    pub max_stuck: usize,
    /// An abandoned worker still running after this long aborts the process (zero: never).
    pub stuck_abort: Duration,
    /// Called (after an ERROR log) to abort; the process is ended unless a test swaps it.
    pub on_abort: fn(&str),
}

/// `start` flags of the userscript engine.
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct ScriptArgs {
    /// Longest one userscript batch may run, `getTX()` round trips included; a worker still
    /// running it then is abandoned (it cannot be interrupted) and replaced.
    #[arg(long = "userscriptDeadline", env = "CDC_SINK_USERSCRIPT_DEADLINE", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub deadline: Duration,
    /// Heap bytes of one engine thread: above it after a batch the worker is replaced; a batch
    /// that grows it by more aborts the process. 0 disables both.
    #[arg(long = "userscriptMemory", env = "CDC_SINK_USERSCRIPT_MEMORY", default_value = "4GiB", value_parser = crate::config::parse_bytes)]
    pub memory: u64,
    /// Abandoned userscript workers (past their deadline, still running) allowed at once; one
    /// more aborts the process.
    #[arg(
        long = "userscriptMaxStuck",
        env = "CDC_SINK_USERSCRIPT_MAX_STUCK",
        default_value_t = 2
    )]
    pub max_stuck: usize,
    /// Abort the process when an abandoned userscript worker is still running after this
    /// long; 0 = never.
    #[arg(long = "userscriptStuckAbort", env = "CDC_SINK_USERSCRIPT_STUCK_ABORT", default_value = "5m0s", value_parser = crate::config::parse_duration)]
    pub stuck_abort: Duration,
}

impl ScriptArgs {
    pub fn runtime_options(&self) -> RuntimeOptions {
        RuntimeOptions {
            deadline: self.deadline,
            memory_budget: self.memory,
            max_stuck: self.max_stuck,
            stuck_abort: self.stuck_abort,
            ..RuntimeOptions::default()
        }
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            workers: 1,
            deadline: Duration::from_secs(30),
            memory_budget: 4 << 30,
            queue: 64,
            max_stuck: 2,
            stuck_abort: Duration::from_secs(300),
            on_abort: workers::abort_process,
        }
    }
}

struct Inner {
    path: PathBuf,
    captured: Captured,
    jobs: flume::Sender<Job>,
    shared: Arc<Shared>,
    deadline: Duration,
}

/// A loaded userscript. Cheap to clone, `Send + Sync`; the engine threads stop when the last
/// clone (including merge functions handed to the applier) is dropped.
#[derive(Clone)]
pub struct Userscript {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Userscript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userscript")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// The applier asks the script for each table's `configureTable` options.
impl TableConfigs for Userscript {
    fn table_config(&self, table: &Table) -> Option<TableConfig> {
        Userscript::table_config(self, table)
    }
}

impl Userscript {
    /// Loads the script and runs its top level. `known_flags` are the `start` flag names that
    /// `setOptions` may set.
    pub fn load(path: &Path, known_flags: &[&str]) -> Result<Userscript, ScriptError> {
        Self::load_with(path, known_flags, RuntimeOptions::default())
    }

    pub fn load_with(
        path: &Path,
        known_flags: &[&str],
        opts: RuntimeOptions,
    ) -> Result<Userscript, ScriptError> {
        let sources = Arc::new(Sources::new(path)?);
        let (tx, rx) = flume::bounded(opts.queue.max(1));
        let flags = known_flags.iter().map(|s| s.to_string()).collect();
        let limits = workers::Limits {
            memory_budget: opts.memory_budget,
            max_stuck: opts.max_stuck,
            stuck_abort: opts.stuck_abort,
            on_abort: opts.on_abort,
        };
        let shared = Shared::new(sources, flags, rx, limits);
        let captured = shared
            .spawn(false)
            .recv()
            .map_err(|_| ScriptError::Crashed)??;
        for _ in 1..opts.workers.max(1) {
            shared
                .spawn(true)
                .recv()
                .map_err(|_| ScriptError::Crashed)??;
        }
        tracing::info!(script = %path.display(), sources = captured.sources.len(), tables = captured.tables.len(), "loaded userscript");
        Ok(Userscript {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                captured,
                jobs: tx,
                shared,
                deadline: opts.deadline,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Everything the top level configured.
    pub fn captured(&self) -> &Captured {
        &self.inner.captured
    }

    /// Flag values from `setOptions`, in call order.
    pub fn options(&self) -> &[(String, String)] {
        &self.inner.captured.options
    }

    /// CPU time the engine threads spent running work so far.
    pub fn engine_cpu(&self) -> Duration {
        Duration::from_nanos(self.inner.shared.busy_cpu_nanos.load(Ordering::Relaxed))
    }

    /// How many engine threads were replaced (deadline, panic, memory).
    pub fn replaced_workers(&self) -> u64 {
        self.inner.shared.replaced.load(Ordering::Relaxed)
    }

    /// Engine threads abandoned past their deadline that are still running.
    pub fn stuck_workers(&self) -> usize {
        self.inner.shared.stuck_workers()
    }

    /// Refuses work of `schema` at once while an abandoned worker still runs some: sending
    /// more would only queue behind, or abandon, one more thread.
    fn check_stuck(&self, schema: &str, what: &str) -> Result<(), ScriptError> {
        if self.inner.shared.stuck_on(schema) {
            return Err(ScriptError::Stuck {
                what: what.to_string(),
                schema: schema.to_string(),
            });
        }
        Ok(())
    }

    fn config_of(&self, o: &TableOptions) -> TableConfig {
        let js = |fallback| {
            MergeFn(Arc::new(merge::JsMerger {
                script: self.clone(),
                fallback,
            }))
        };
        TableConfig {
            cas: o.cas.clone(),
            deadlines: o.deadlines.clone(),
            exprs: o.exprs.clone(),
            extras: o.extras.clone(),
            ignore: o.ignore.clone(),
            row_limit: o.row_limit,
            merge: match o.merge {
                MergeKind::None => None,
                MergeKind::Function => Some(js(false)),
                MergeKind::Standard { fallback } => {
                    Some(merge::standard(fallback.then(|| js(true))))
                }
            },
        }
    }

    /// Every `configureTable`, as the applier's options (merge functions included).
    pub fn table_configs(&self) -> Vec<(TableName, TableConfig)> {
        self.inner
            .captured
            .tables
            .iter()
            .map(|(n, o)| (n.clone(), self.config_of(o)))
            .collect()
    }

    /// The options for `table` (the most specific configured name that matches it).
    pub fn table_config(&self, table: &Table) -> Option<TableConfig> {
        self.inner
            .captured
            .table(table)
            .map(|(_, o)| self.config_of(o))
    }

    /// Whether `configureSource` was called for this source (`db.schema` for changefeeds).
    pub fn has_dispatch(&self, source: &Schema) -> bool {
        self.inner.captured.source(&source.to_string()).is_some()
    }

    fn table_options(&self, table: &Table) -> Option<&TableOptions> {
        self.inner.captured.table(table).map(|(_, o)| o)
    }

    /// Whether `map` or `deleteKey` is configured for `table`.
    pub fn has_map(&self, table: &Table) -> bool {
        self.table_options(table)
            .is_some_and(|o| o.map || o.delete_key)
    }

    /// Whether the table's `apply` takes over writing.
    pub fn has_apply(&self, table: &Table) -> bool {
        self.table_options(table).is_some_and(|o| o.apply)
    }

    /// Sends work to an engine thread and waits for the answer, within the deadline.
    async fn run<T>(
        &self,
        scope: &Schema,
        what: &str,
        make: impl FnOnce(Reply<T>) -> Work,
    ) -> Result<T, ScriptError> {
        let scope = scope.to_string();
        self.check_stuck(&scope, what)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let now = Instant::now();
        let deadline = now + self.inner.deadline;
        let taken = Arc::new(AtomicUsize::new(0));
        let job = Job {
            work: make(tx),
            scope,
            enqueued: now,
            deadline,
            taken: taken.clone(),
        };
        let waited = tokio::time::timeout_at(deadline.into(), async {
            self.inner
                .jobs
                .send_async(job)
                .await
                .map_err(|_| ScriptError::Stopped)?;
            rx.await.map_err(|_| ScriptError::Crashed)?
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(_) => {
                self.give_up(&taken);
                Err(ScriptError::Timeout {
                    what: what.to_string(),
                })
            }
        }
    }

    fn give_up(&self, taken: &Arc<AtomicUsize>) {
        self.inner.shared.abandon(taken);
    }

    /// Before staging: upserts of `source` go through `dispatch`, deletes to `deletesTo`. Keys
    /// are rebuilt from each target table's primary key. Sources the script does not
    /// configure pass unchanged.
    pub async fn dispatch(
        &self,
        source: &Schema,
        info: &SchemaInfo,
        muts: Vec<(Table, Mutation)>,
    ) -> Result<Vec<(Table, Mutation)>, ScriptError> {
        let name = source.to_string();
        let Some(opts) = self.inner.captured.source(&name) else {
            return Ok(muts);
        };
        // Plain data needs no engine.
        if let Some(t) = &opts.target {
            let t = Table::parse_in(source, t).map_err(|e| ScriptError::Config(e.to_string()))?;
            return Ok(muts.into_iter().map(|(_, m)| (t.clone(), m)).collect());
        }
        let needs_js = muts.iter().any(|(_, m)| {
            if m.after.is_some() {
                opts.dispatch
            } else {
                opts.deletes_to == Some(DeletesTo::Function)
            }
        });
        if !needs_js {
            return muts
                .into_iter()
                .map(|(t, m)| match &opts.deletes_to {
                    Some(DeletesTo::Table(n)) if !n.is_empty() && m.after.is_none() => {
                        Table::parse_in(source, n)
                            .map(|t| (t, m))
                            .map_err(|e| ScriptError::Config(e.to_string()))
                    }
                    _ => Ok((t, m)),
                })
                .collect();
        }
        let keymap = Arc::new(convert::keymap(info));
        let mut out = Vec::with_capacity(muts.len());
        let mut muts = muts.into_iter().peekable();
        while muts.peek().is_some() {
            let batch: Vec<_> = muts.by_ref().take(CHUNK).collect();
            let part = self
                .run(source, &format!("dispatch for {name}"), |reply| {
                    Work::Dispatch {
                        source: name.clone(),
                        schema: source.clone(),
                        batch,
                        keymap: keymap.clone(),
                        reply,
                    }
                })
                .await?;
            out.extend(part);
        }
        Ok(out)
    }

    /// At apply time: `map` for upserts and `deleteKey` for deletes of one table's batch.
    pub async fn map(
        &self,
        table: &Table,
        info: &SchemaInfo,
        muts: Vec<Mutation>,
    ) -> Result<Vec<Mutation>, ScriptError> {
        let Some(o) = self.table_options(table) else {
            return Ok(muts);
        };
        let needs_js = muts.iter().any(|m| {
            if m.after.is_some() {
                o.map
            } else {
                o.delete_key
            }
        });
        if !needs_js {
            return Ok(muts);
        }
        let ts = info
            .table(table)
            .ok_or_else(|| ScriptError::UnknownTable(table.to_string()))?;
        let keys = table_keys(ts);
        let keymap = Arc::new(convert::keymap(info));
        let mut out = Vec::with_capacity(muts.len());
        let mut muts = muts.into_iter().peekable();
        while muts.peek().is_some() {
            let batch: Vec<_> = muts.by_ref().take(CHUNK).collect();
            let part = self
                .run(&table.schema, &format!("map for {table}"), |reply| {
                    Work::Map {
                        table: table.clone(),
                        muts: batch,
                        keys: keys.clone(),
                        keymap: keymap.clone(),
                        reply,
                    }
                })
                .await?;
            out.extend(part);
        }
        Ok(out)
    }

    /// Calls the table's `merge` (or its `standardMerge` fallback) for conflicts of one table.
    pub async fn merge(
        &self,
        fallback: bool,
        conflicts: Vec<Conflict>,
    ) -> Result<Vec<Resolution>, ScriptError> {
        let Some(table) = conflicts.first().map(|c| c.meta.table.clone()) else {
            return Ok(Vec::new());
        };
        self.run(&table.schema, &format!("merge for {table}"), |reply| {
            Work::Merge {
                table: table.clone(),
                fallback,
                conflicts,
                reply,
            }
        })
        .await
    }

    /// Runs the table's `apply` callback on `muts`; its `getTX()` calls run on `conn` (inside
    /// the caller's transaction), `getTX().apply` through `applier`.
    pub async fn apply(
        &self,
        table: &Table,
        muts: &[Mutation],
        conn: &mut PgConnection,
        applier: &Applier,
    ) -> Result<(), ScriptError> {
        if muts.is_empty() {
            return Ok(());
        }
        let what = format!("apply for {table}");
        let scope = table.schema.to_string();
        self.check_stuck(&scope, &what)?;
        let info = applier
            .schemas()
            .schema(&table.schema)
            .await
            .map_err(ScriptError::Target)?;
        let ts = info
            .table(table)
            .ok_or_else(|| ScriptError::UnknownTable(table.to_string()))?;
        let keys = table_keys(ts);
        let columns = ts
            .columns
            .iter()
            .map(|c| tx::ColumnInfo {
                name: c.name.raw().to_string(),
                data_type: c.data_type.clone(),
                primary: c.primary,
                ignored: c.ignored,
                default: c.default.clone(),
            })
            .collect();
        let (host_tx, mut host_rx) = tokio::sync::mpsc::unbounded_channel();
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let now = Instant::now();
        let deadline = now + self.inner.deadline;
        let taken = Arc::new(AtomicUsize::new(0));
        let job = Job {
            work: Work::Apply {
                table: table.clone(),
                muts: muts.to_vec(),
                keys,
                keymap: Arc::new(convert::keymap(&info)),
                columns,
                host: host_tx,
                reply: tx,
            },
            scope,
            enqueued: now,
            deadline,
            taken: taken.clone(),
        };
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::pin!(sleep);
        tokio::select! {
            sent = self.inner.jobs.send_async(job) => sent.map_err(|_| ScriptError::Stopped)?,
            _ = &mut sleep => return Err(ScriptError::Timeout { what }),
        }
        loop {
            tokio::select! {
                biased;
                Some(call) = host_rx.recv() => tx::serve(call, conn, applier, table).await,
                r = &mut rx => {
                    // Calls the script did not wait for still belong to the batch.
                    while let Ok(call) = host_rx.try_recv() {
                        tx::serve(call, conn, applier, table).await;
                    }
                    return r.map_err(|_| ScriptError::Crashed)?;
                }
                _ = &mut sleep => {
                    self.give_up(&taken);
                    return Err(ScriptError::Timeout { what });
                }
            }
        }
    }
}

fn table_keys(ts: &TableSchema) -> convert::TableKeys {
    convert::TableKeys {
        pk: ts.primary_key().map(|c| c.name.raw().to_string()).collect(),
        numeric: ts
            .columns
            .iter()
            .filter(|c| convert::is_numeric_type(&c.data_type))
            .map(|c| c.name.canonical())
            .collect(),
    }
}

/// A schema description without a database: `table=col:TYPE[:pk],…` per table (dry runs,
/// benchmarks, tests). Tables are resolved in `schema`.
pub fn schema_from_specs(schema: &Schema, specs: &[String]) -> Result<SchemaInfo, ScriptError> {
    let mut tables = BTreeMap::new();
    for spec in specs {
        let (name, cols) = spec.split_once('=').ok_or_else(|| {
            ScriptError::Config(format!("{spec:?}: expected table=col:TYPE[:pk],..."))
        })?;
        let table =
            Table::parse_in(schema, name).map_err(|e| ScriptError::Config(e.to_string()))?;
        let mut columns = Vec::new();
        for c in cols.split(',').filter(|c| !c.is_empty()) {
            let mut parts = c.split(':');
            let n = parts.next().unwrap_or_default();
            let ty = parts.next().unwrap_or("TEXT");
            let primary = parts.next().is_some_and(|p| p.eq_ignore_ascii_case("pk"));
            columns.push(Column {
                name: Ident::new(n),
                primary,
                data_type: ty.to_uppercase(),
                default: None,
                ignored: false,
            });
        }
        // PK columns first, as introspection orders them.
        columns.sort_by_key(|c| !c.primary);
        tables.insert(table.clone(), Arc::new(TableSchema { table, columns }));
    }
    let levels = vec![tables.keys().cloned().collect()];
    Ok(SchemaInfo { tables, levels })
}

#[cfg(test)]
mod tests;
