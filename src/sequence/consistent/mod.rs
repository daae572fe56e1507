//! One schema's consistent-mode pipeline: win the lease, then apply resolved windows.
//!
//! A window `(committed, proposed]` is read in pages (the next page is read while the previous
//! one applies) and cut into flushes of whole source timestamps, about `--flushSize` rows
//! each, dispatched in time order. Up to `--parallelism` flushes run at once, each in its own
//! target transaction, provided no earlier flush still in flight shares a (table, key) with
//! it: per-key order holds while disjoint work overlaps. Transactions of disjoint keys may
//! therefore commit out of time order, as in the reference. A window whose end is reached
//! after a newer resolved timestamp arrived grows to it, so the appliers do not drain between
//! windows.
//!
//! **Staging in the target database** (the default). A flush transaction fences on the lease,
//! writes, and deletes its own staged time range: at every instant what is applied is gone from
//! staging and what is not is still there. Only an in-order step commits the checkpoint, at the
//! end of the contiguous prefix of completed flushes. After a crash (kill -9 anywhere) the next
//! holder reads from the checkpoint and finds exactly the rows not yet applied, so nothing is
//! applied twice, and per-key order survives: a flush with a later version of a key never
//! starts before the flush with the earlier one has committed. A flush that starts with nothing
//! ahead of it (always, with `--parallelism 1`) commits the checkpoint in its own transaction.
//!
//! A flush that commits while an earlier one still runs leaves the checkpoint behind it, so it
//! also records its time range as applied (`checkpoint::AppliedRanges`) in its transaction. A
//! changefeed redelivery of a row in such a range finds nothing staged to conflict with and is
//! staged again; every window skips staged rows inside recorded ranges, so however the window
//! ends (a poison row, the target down, the lease lost, a crash), the redelivered old version is
//! never written over the newer one. The checkpoint commit forgets the ranges it covers.
//!
//! The window reads every table of the schema that has a staging table, whichever instance
//! created it (`Stager::registered`); a table with staged rows in the window that the target
//! does not have stops the window rather than being skipped, so the checkpoint never passes
//! rows it has not applied. Rows staged at or below the checkpoint (redeliveries an instance
//! accepted before it saw the checkpoint move) are deleted by a periodic full sweep.
//!
//! **Separate staging** (`--stagingConn`). No transaction spans both databases: a flush commits
//! on the target, then retires its rows (and commits the checkpoint when it carries it) on
//! staging. A crash in between leaves applied rows staged and they are applied again later:
//! with compare-and-set that is an equal-tuple conflict, which a table without a merge function
//! drops (counted) and `standardMerge` resolves as a no-op, but a custom merge function sees. A
//! staging step that fails without a crash counts in `core_sweep_skew_count`. The lease cannot
//! fence a target transaction across databases, so a flush renews it right before its target
//! transaction, bounds that transaction's statements by the lease's remaining time, and rolls
//! back instead of committing once the lease may have expired.

mod flush;
mod pipeline;
mod reader;
mod schedule;
mod window;

use flush::*;
pub(super) use pipeline::Pipeline;
use reader::*;
use window::*;

use super::parts::{
    backoff, now_seconds, schema_label, sleep_or_never, Parts, Pipelines, SequenceError,
    LEASE_LIFETIME, LEASE_MARGIN, POLL,
};
use super::write::write_ordered;
use crate::apply::SchemaInfo;
use crate::checkpoint::{Bounds, Lease, Ranges};
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::mutation::{Mutation, TableBatches};
use crate::sequence::poison::{find_poison, is_transient};
use crate::stage::StageError;
use schedule::{lock_key, slices, KeyLocks, Progress, Slice};
use sqlx::PgConnection;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

/// Runs `work` unless the pipeline is asked to stop first (`None`): for steps that hold
/// nothing worth finishing (reads, a renewal, waiting for a connection), so that stopping
/// is not held up by a database that does not answer.
pub(super) async fn unless_stopped<T>(
    stop: &watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut stop = stop.clone();
    tokio::select! {
        done = work => Some(done),
        _ = async {
            // A dropped sender never stops the work.
            if stop.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        } => None,
    }
}

/// A flush's target transaction; a flush that has not got its connection when the pipeline
/// stops does not start.
pub(super) async fn begin_unless_stopped(
    ctx: &Ctx,
    db: &crate::target::Database,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, SequenceError> {
    unless_stopped(&ctx.stop, db.begin())
        .await
        .ok_or(SequenceError::Stopped)?
        .map_err(SequenceError::Sql)
}

/// Resolves once the sequencer abandons the windows in flight.
pub(super) async fn abandoned(abandon: &mut watch::Receiver<bool>) {
    if abandon.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long releasing the lease may take when the pipeline stops.
pub(super) const RELEASE_WITHIN: Duration = Duration::from_secs(1);

/// How often the staged rows at or below the checkpoint are swept (see
/// [`Pipeline::sweep_below`]); the first window after winning the lease sweeps too.
pub(super) const FULL_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How often the lease holder counts the staged backlog, and the most rows it counts per table.
pub(super) const BACKLOG_EVERY: Duration = Duration::from_secs(10);
pub(super) const BACKLOG_CAP: i64 = 100_000;

/// What every task of one window shares.
pub(super) struct Ctx {
    pub(super) parts: Arc<Parts>,
    pub(super) schema: Schema,
    pub(super) lease: Lease,
    /// The schema's tables in foreign-key order; rows refer to them by index.
    pub(super) tables: Vec<Table>,
    pub(super) info: Arc<SchemaInfo>,
    /// Tables registered for staging when the window started (the registry only grows).
    pub(super) registered: usize,
    /// Registered tables the target schema lacks (none had rows in the window).
    pub(super) unread: Vec<Table>,
    /// Ranges applied beyond the committed checkpoint by earlier attempts: their staged rows
    /// are redeliveries.
    pub(super) skip: Ranges,
    /// Applied ranges may be recorded beyond the checkpoint, so a checkpoint commit forgets
    /// the ones it covers.
    pub(super) recorded: AtomicBool,
    /// Flush transactions open right now.
    pub(super) open: AtomicUsize,
    /// When the lease was last renewed (between flushes, or by every flush with separate
    /// staging).
    pub(super) renewed: Mutex<Instant>,
    /// Raised when the pipeline stops: no further flush starts.
    pub(super) stop: watch::Receiver<bool>,
}

impl Ctx {
    pub(super) fn renewed(&self) -> Instant {
        *self.renewed.lock().expect("poisoned")
    }

    pub(super) fn mark_renewed(&self, at: Instant) {
        let mut r = self.renewed.lock().expect("poisoned");
        *r = (*r).max(at);
    }

    pub(super) fn renewal_due(&self) -> bool {
        self.renewed().elapsed() >= LEASE_LIFETIME / 3
    }

    pub(super) fn lost(&self) -> SequenceError {
        SequenceError::LeaseLost(self.schema.to_string())
    }

    /// Counts an open flush transaction until the guard drops; one that begins while another
    /// is open is an overlap, the observable proof that flushes run concurrently.
    pub(super) fn open_tx(&self) -> OpenTx<'_> {
        let before = self.open.fetch_add(1, Ordering::SeqCst);
        let labels = schema_label(&self.schema);
        if before > 0 {
            metrics::counter!(m::CORE_FLUSH_OVERLAPS, &labels).increment(1);
        }
        metrics::gauge!(m::CORE_FLUSHES_IN_FLIGHT, &labels).set((before + 1) as f64);
        OpenTx(self)
    }
}

pub(super) struct OpenTx<'a>(&'a Ctx);

impl Drop for OpenTx<'_> {
    fn drop(&mut self) {
        let now = self.0.open.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!(m::CORE_FLUSHES_IN_FLIGHT, &schema_label(&self.0.schema)).set(now as f64);
    }
}

/// A running flush, counted in `sequencer_scheduler_executing_tasks_count` until it ends
/// (finished, failed or aborted with its window), then in `…_executed_tasks_count`.
pub(super) struct Executing;

impl Executing {
    pub(super) fn start() -> Executing {
        metrics::gauge!(m::SCHEDULER_EXECUTING).increment(1.0);
        Executing
    }
}

impl Drop for Executing {
    fn drop(&mut self) {
        metrics::gauge!(m::SCHEDULER_EXECUTING).decrement(1.0);
        metrics::counter!(m::SCHEDULER_EXECUTED).increment(1);
    }
}
