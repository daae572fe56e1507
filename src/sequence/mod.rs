//! When and in what order staged mutations reach the target.
//!
//! *Consistent* mode (the default): every instance stages; per schema, the instance holding
//! the schema's lease reads the staged window `(committed, resolved]` in HLC order and applies
//! it in transactions that never split a source timestamp, several at once when their keys are
//! disjoint (`--parallelism`). Each transaction deletes the staged rows it applied, so staging
//! never holds rows the target already has, and the checkpoint is committed in order behind
//! them; with a separate staging database this becomes a two-step scheme (see
//! `consistent`). *Immediate* mode applies each request at once. *Best-effort* mode
//! ([`best_effort`]) applies requests at once where each key's order allows and stages the
//! rest for the consistent pipeline; [`mode`] picks the mode per schema.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`Sequencer`]: starting, waking and stopping the pipelines |
//! | `parts.rs` | flags, the error, lease timing, the parts pipelines share, the registry of running pipelines |
//! | `write.rs` | the foreign-key write order, and the userscript's `map`, `deleteKey` and `apply` on the way to the applier |
//! | `consistent/` | the consistent pipeline: lease loop, page reader, flush transactions, window scheduler |
//! | `best_effort.rs` | best-effort ingest |
//! | `mode.rs` | the mode of each schema |
//! | `poison.rs` | finding the mutation the target refuses |

mod accept;
mod best_effort;
mod consistent;
mod immediate;
pub mod mode;
mod parts;
pub mod poison;
mod status;
mod write;

pub use mode::{Admission, Mode};
pub use parts::{lease_name, Blocked, Parts, Pipelines, SequenceArgs, SequenceError};
use parts::{Running, RELEASE_MARGIN};
pub use poison::{find_poison, Poison};
pub(crate) use write::write_ordered_counted;

use crate::apply::SchemaInfo;
use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::ident::Table;
use crate::metrics as m;
use crate::mutation::{group_by_table, Mutation};
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Notify};

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
    /// Rows dropped at or below the checkpoint, for one log line per schema per period.
    dropped: accept::DropLog,
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
            schemas: parts.applier.schemas().clone(),
        };
        let modes = mode::Modes::new(policy, sources, stop.subscribe());
        Arc::new(Sequencer {
            parts: Arc::new(parts),
            tasks: Mutex::new(Vec::new()),
            stop,
            deadline: Mutex::new(None),
            abandon: watch::channel(false).0,
            modes,
            dropped: Default::default(),
        })
    }

    /// The front door for a request's routed mutations: drops the redeliveries of rows
    /// already applied, then hands the rest to the schema's current mode, which cannot change
    /// until they are written — staged (consistent), applied (immediate), or applied where
    /// per-key order allows and staged otherwise (best-effort). Returns once they are durable.
    pub async fn accept(
        &self,
        schema: &Schema,
        info: &SchemaInfo,
        muts: Vec<(Table, Mutation)>,
    ) -> Result<(), SequenceError> {
        let parts = &self.parts;
        let committed = parts
            .checkpoints
            .fresh_committed(schema, accept::COMMITTED_MAX_AGE)
            .await;
        let mut below = 0u64;
        let batches = group_by_table(muts.into_iter().filter(|(_, mu)| {
            let keep = mu.time > committed;
            below += u64::from(!keep);
            keep
        }));
        accept::dropped(&self.dropped, schema, below, committed);
        if batches.is_empty() {
            return Ok(());
        }
        let admission = self.modes.admit(schema).await?;
        match admission.mode() {
            Mode::Immediate => immediate::apply(parts, schema, &batches).await?,
            Mode::BestEffort => {
                let resolved = parts.checkpoints.cached_proposed(schema);
                let mut batches = &batches;
                let later;
                if batches.values().flatten().any(|mu| mu.time <= resolved) {
                    later = accept::after_resolved(batches, resolved);
                    let dropped = accept::count(batches) - accept::count(&later);
                    metrics::counter!(m::STAGE_BELOW_CHECKPOINT, m::LABEL_SCHEMA => schema.to_string())
                        .increment(dropped as u64);
                    batches = &later;
                }
                if !batches.is_empty() {
                    best_effort::accept(parts, schema, info, batches).await?
                }
            }
            Mode::Consistent => drop(parts.stager.stage(&batches).await?),
        }
        drop(admission);
        Ok(())
    }

    /// The front door for a resolved timestamp: committed at once in immediate mode,
    /// otherwise recorded for the schema's pipeline, which is woken.
    pub async fn resolved(&self, schema: &Schema, ts: Hlc) -> Result<(), SequenceError> {
        if self.parts.args.immediate {
            return immediate::resolved(&self.parts, schema, ts).await;
        }
        self.parts.checkpoints.advance(schema, ts).await?;
        self.wake(schema);
        Ok(())
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
        let pipeline = consistent::Pipeline::new(self.parts.clone(), schema.clone(), notify);
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
            let info = self.parts.applier.schemas().schema(&schema).await?;
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

    /// The sequencer's part of `/_/status`: one JSON object per schema with checkpoints (its
    /// mode here, checkpoints and lags, staged backlog, lease, what blocks it, dead letters).
    pub async fn status(&self) -> Result<Vec<serde_json::Value>, String> {
        status::report(&self.parts, |s| self.modes.current(s)).await
    }

    /// The mode `schema` runs in here, if this process has seen it.
    pub fn mode(&self, schema: &Schema) -> Option<Mode> {
        self.modes.current(schema)
    }
}
