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

use super::poison::{find_poison, is_transient};
use super::schedule::{lock_key, slices, KeyLocks, Progress, Slice};
use super::{
    backoff, now_seconds, schema_label, sleep_or_never, write_ordered, Parts, Pipelines,
    SequenceError, LEASE_LIFETIME, LEASE_MARGIN, POLL,
};
use crate::apply::SchemaInfo;
use crate::checkpoint::{Bounds, Lease, Ranges};
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::mutation::{Mutation, TableBatches};
use crate::stage::StageError;
use sqlx::PgConnection;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

pub(super) struct Pipeline {
    parts: Arc<Parts>,
    schema: Schema,
    notify: Arc<Notify>,
    lease_name: String,
    /// Tables whose backlog this instance published while it held the lease.
    counted: Mutex<Vec<Table>>,
}

enum Held {
    Stopped,
    Lost,
}

impl Pipeline {
    pub(super) fn new(parts: Arc<Parts>, schema: Schema, notify: Arc<Notify>) -> Self {
        let lease_name = format!("sequtil.Lease.\"{}\"", schema.canonical());
        Pipeline {
            parts,
            schema,
            notify,
            lease_name,
            counted: Mutex::new(Vec::new()),
        }
    }

    /// Runs until the sequencer stops or the schema goes idle (see
    /// [`super::Pipelines::retire_if_idle`]), then releases the lease if held.
    pub(super) async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        mut abandon: watch::Receiver<bool>,
    ) {
        // `hold` sees this stop, raised by the sequencer's stop or by going idle; it checks it
        // between windows, so a window in flight finishes first.
        let (local_tx, mut local) = watch::channel(false);
        let idle_check = Pipelines::check_every(&self.parts);
        let mut failures = 0u32;
        let mut checked = Instant::now();
        while !*stop.borrow() {
            let acquired = self
                .parts
                .leases
                .try_acquire(&self.lease_name, LEASE_LIFETIME)
                .await;
            match acquired {
                Ok(Some(lease)) => {
                    failures = 0;
                    tracing::info!(schema = %self.schema, "acquired apply lease");
                    metrics::gauge!(m::CORE_SWEEP_ACTIVE, &schema_label(&self.schema)).set(1.0);
                    let held = {
                        let hold = self.hold(&lease, &mut local);
                        tokio::pin!(hold);
                        let mut forwarded = false;
                        loop {
                            tokio::select! {
                                h = &mut hold => break h,
                                // Dropping the window rolls back its open transactions; the
                                // rows stay staged for the next holder.
                                _ = abandoned(&mut abandon) => break Held::Stopped,
                                _ = stop.changed(), if !forwarded => {
                                    forwarded = true;
                                    let _ = local_tx.send(true);
                                }
                                _ = sleep_or_never(idle_check) => {
                                    if self.parts.pipelines.retire_if_idle(&self.parts, &self.schema).await {
                                        let _ = local_tx.send(true);
                                    }
                                }
                            }
                        }
                    };
                    metrics::gauge!(m::CORE_SWEEP_ACTIVE, &schema_label(&self.schema)).set(0.0);
                    // The next holder counts the backlog now; a stale count here would outlast it.
                    for table in self.counted.lock().expect("poisoned").drain(..) {
                        metrics::gauge!(m::STAGE_BACKLOG, &m::table_labels(&table)).set(0.0);
                    }
                    match held {
                        Held::Stopped => {
                            // Not held up by an unreachable database: the lease expires anyway.
                            let released = tokio::time::timeout(
                                RELEASE_WITHIN,
                                self.parts.leases.release(&lease),
                            )
                            .await;
                            match released {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => {
                                    tracing::warn!(schema = %self.schema, error = %e, "could not release apply lease")
                                }
                                Err(_) => {
                                    tracing::warn!(schema = %self.schema, "could not release apply lease in time; it expires by itself")
                                }
                            }
                            break;
                        }
                        Held::Lost => tracing::warn!(schema = %self.schema, "apply lease lost"),
                    }
                    if *local.borrow() {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    failures += 1;
                    tracing::warn!(schema = %self.schema, error = %e, "could not acquire apply lease");
                }
            }
            if idle_check.is_some_and(|every| checked.elapsed() >= every) {
                checked = Instant::now();
                if self
                    .parts
                    .pipelines
                    .retire_if_idle(&self.parts, &self.schema)
                    .await
                {
                    break;
                }
            }
            let wait = if failures > 0 {
                backoff(failures)
            } else {
                POLL
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Applies windows while the lease is held, renewing it at least every third of its
    /// lifetime (inside windows too, see [`Window::dispatch`]).
    async fn hold(&self, lease: &Lease, stop: &mut watch::Receiver<bool>) -> Held {
        let mut renewed = Instant::now();
        let mut attempt = 0u32;
        let mut swept: Option<Instant> = None;
        // A window committed since the last full sweep: an instance that had not seen the
        // checkpoint move yet may have staged redeliveries below it. Instances re-read the
        // checkpoint every few seconds, so a schema that stays idle gets none and is not swept.
        let mut applied_since_sweep = false;
        let mut counted: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                return Held::Stopped;
            }
            let started = Instant::now();
            if counted.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
                counted = Some(started);
                self.count_backlog().await;
            }
            metrics::gauge!(m::CORE_SWEEP_ATTEMPT_TIMESTAMP, &schema_label(&self.schema))
                .set(now_seconds());
            let sweep_due = swept.is_none_or(|at| at.elapsed() >= FULL_SWEEP_EVERY);
            let Some(bounds) =
                unless_stopped(stop, self.parts.checkpoints.bounds(&self.schema)).await
            else {
                return Held::Stopped;
            };
            let result = match bounds {
                Ok(b) if b.proposed > b.committed => {
                    let done = self
                        .apply_window(lease, b, sweep_due, &mut renewed, stop)
                        .await;
                    if done.is_ok() {
                        applied_since_sweep = true;
                        if sweep_due {
                            swept = Some(started);
                        }
                    }
                    done.map(|_| true)
                }
                Ok(b) if sweep_due && applied_since_sweep => {
                    let swept_below = unless_stopped(stop, self.sweep_below(lease, b.committed));
                    let Some(done) = swept_below.await else {
                        return Held::Stopped;
                    };
                    if done.is_ok() {
                        swept = Some(started);
                        applied_since_sweep = false;
                    }
                    done.map(|_| false)
                }
                Ok(_) => Ok(false),
                Err(e) => Err(SequenceError::from(e)),
            };
            match &result {
                Ok(_) => self.parts.pipelines.cleared(&self.schema),
                Err(SequenceError::Stopped) => return Held::Stopped,
                Err(SequenceError::LeaseLost(_)) => {}
                Err(e) => {
                    self.parts
                        .pipelines
                        .failed(&self.schema, e.to_string(), backoff(attempt + 1))
                }
            }
            let wait = match result {
                Ok(true) => {
                    attempt = 0;
                    metrics::histogram!(m::CORE_SWEEP_DURATION, &schema_label(&self.schema))
                        .record(started.elapsed().as_secs_f64());
                    metrics::gauge!(m::CORE_SWEEP_SUCCESS_TIMESTAMP, &schema_label(&self.schema))
                        .set(now_seconds());
                    None
                }
                Ok(false) => {
                    attempt = 0;
                    Some(POLL.min(self.parts.args.flush_period.max(Duration::from_millis(50))))
                }
                Err(SequenceError::LeaseLost(_)) => return Held::Lost,
                Err(e) => {
                    attempt += 1;
                    let wait = backoff(attempt);
                    metrics::counter!(m::POISON_BACKOFF, &schema_label(&self.schema)).increment(1);
                    if e.is_unavailable() {
                        tracing::warn!(schema = %self.schema, error = %e, retry_in = ?wait, "target unavailable; will retry");
                    } else {
                        tracing::error!(schema = %self.schema, error = %e, retry_in = ?wait, "could not apply window; will retry");
                    }
                    Some(wait)
                }
            };
            if renewed.elapsed() >= LEASE_LIFETIME / 3 {
                let renewal =
                    unless_stopped(stop, self.parts.leases.renew_now(lease, LEASE_LIFETIME));
                let Some(renewal) = renewal.await else {
                    return Held::Stopped;
                };
                match renewal {
                    Ok(true) => renewed = Instant::now(),
                    Ok(false) => return Held::Lost,
                    Err(e) => {
                        tracing::warn!(schema = %self.schema, error = %e, "could not renew apply lease");
                        if renewed.elapsed() >= LEASE_LIFETIME {
                            return Held::Lost;
                        }
                    }
                }
            }
            let Some(wait) = wait else { continue };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.notify.notified() => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Applies `(committed, proposed]` (see the module doc). Retiring deletes each flush's own
    /// range; the step that commits the window's end sweeps the whole window in every table
    /// (redelivered duplicates), and the first window after winning the lease sweeps from the
    /// beginning (`full_sweep`), which also clears rows redelivered below a checkpoint.
    async fn apply_window(
        &self,
        lease: &Lease,
        bounds: Bounds,
        full_sweep: bool,
        renewed: &mut Instant,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), SequenceError> {
        let prepare = async {
            let (info, registered, unread) = self.known_tables(bounds).await?;
            if let Some(h) = &self.parts.hooks {
                h.configure(&self.parts.applier, &info);
            }
            let tables = self.stageable(&info).await?;
            let mut conn = self
                .parts
                .stager
                .database()
                .acquire()
                .await
                .map_err(SequenceError::Sql)?;
            let skip = self
                .parts
                .ranges
                .load(&mut conn, &self.schema, bounds.committed)
                .await?;
            Ok::<_, SequenceError>((info, registered, unread, tables, skip))
        };
        let (info, registered, unread, tables, skip) = unless_stopped(stop, prepare)
            .await
            .ok_or(SequenceError::Stopped)??;
        if !skip.is_empty() {
            tracing::debug!(schema = %self.schema, ranges = ?skip, "skipping staged rows of ranges applied beyond the checkpoint");
        }
        let ctx = Arc::new(Ctx {
            parts: self.parts.clone(),
            schema: self.schema.clone(),
            lease: lease.clone(),
            tables,
            info,
            registered,
            unread,
            recorded: AtomicBool::new(!skip.is_empty()),
            skip,
            open: AtomicUsize::new(0),
            renewed: Mutex::new(*renewed),
            stop: stop.clone(),
        });
        let (pages_tx, pages) = mpsc::channel(1);
        let reader = tokio::spawn(read_pages(
            ctx.clone(),
            bounds.committed,
            bounds.proposed,
            pages_tx,
        ));
        let sweep_from = if full_sweep {
            Hlc::ZERO
        } else {
            bounds.committed
        };
        let result = Window::new(ctx.clone(), bounds, sweep_from)
            .run(pages)
            .await;
        reader.abort();
        metrics::gauge!(m::STAGE_MERGE_QUEUE, &schema_label(&self.schema)).set(0.0);
        *renewed = ctx.renewed();
        let end = result?;
        tracing::debug!(schema = %self.schema, resolved = %end, "window committed");
        Ok(())
    }

    /// The target schema, reloaded if a table that has a staging table (created by any
    /// instance, perhaps for a table this one has not seen yet) is missing from the cached
    /// one. A table the target still lacks is refused when it has staged rows in the window:
    /// skipping them would commit the checkpoint over rows that were never applied.
    /// Also returns how many tables were registered and those the schema lacks, so the window
    /// is not extended over rows of either.
    async fn known_tables(
        &self,
        bounds: Bounds,
    ) -> Result<(Arc<SchemaInfo>, usize, Vec<Table>), SequenceError> {
        let parts = &self.parts;
        let registered = parts.stager.registered(&self.schema).await?;
        let mut info = parts.applier.schema(&self.schema).await?;
        let mut refreshed = false;
        for table in &registered {
            // A table dropped from the target long ago stays registered: only one with rows in
            // this window costs a schema reload.
            if info.tables.contains_key(table) {
                continue;
            }
            if !has_staged(parts, table, bounds.committed, bounds.proposed).await? {
                continue;
            }
            if !refreshed {
                info = parts.applier.refresh(&self.schema).await?;
                refreshed = true;
            }
            if !info.tables.contains_key(table) {
                return Err(SequenceError::UnknownTable(table.to_string()));
            }
        }
        let unread = registered
            .iter()
            .filter(|t| !info.tables.contains_key(*t))
            .cloned()
            .collect();
        Ok((info, registered.len(), unread))
    }

    /// The schema's tables in foreign-key order, less those whose staging-table name another
    /// table owns: ingest refuses their rows, so they have none staged, and reading them would
    /// fail every window of the schema.
    async fn stageable(&self, info: &SchemaInfo) -> Result<Vec<Table>, SequenceError> {
        let mut tables = Vec::new();
        for table in info.levels.iter().flatten() {
            match self.parts.stager.ensure(table).await {
                Ok(_) => tables.push(table.clone()),
                Err(e @ StageError::NameTaken { .. }) => {
                    tracing::debug!(schema = %self.schema, error = %e, "not reading a table that cannot be staged");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(tables)
    }

    /// Publishes each table's staged backlog (`stage_backlog_mutations`): the unapplied rows
    /// after the committed checkpoint, counted up to [`BACKLOG_CAP`] each, so the cost stays
    /// bounded however large staging grows. Only the lease holder counts; a failure is logged
    /// and the gauges keep their last values.
    async fn count_backlog(&self) {
        let parts = &self.parts;
        let counted = async {
            let committed = parts.checkpoints.bounds(&self.schema).await?.committed;
            let info = parts.applier.schema(&self.schema).await?;
            let tables = self.stageable(&info).await?;
            let mut tx = parts.stager.reader().await?;
            for table in &tables {
                let n = parts
                    .stager
                    .count_unapplied(&mut tx, table, committed, BACKLOG_CAP)
                    .await?;
                metrics::gauge!(m::STAGE_BACKLOG, &m::table_labels(table)).set(n as f64);
            }
            *self.counted.lock().expect("poisoned") = tables;
            tx.commit().await.map_err(SequenceError::Sql)
        };
        if let Err(e) = counted.await {
            tracing::debug!(schema = %self.schema, error = %e, "could not count the staged backlog");
        }
    }

    /// Deletes staged rows at or below the committed checkpoint: redeliveries that an
    /// instance staged before it saw the checkpoint move past them. They are never read.
    async fn sweep_below(&self, lease: &Lease, committed: Hlc) -> Result<(), SequenceError> {
        let parts = &self.parts;
        let info = parts.applier.schema(&self.schema).await?;
        let mut tx = parts
            .stager
            .database()
            .begin()
            .await
            .map_err(SequenceError::Sql)?;
        if !parts.leases.fence(&mut tx, lease).await? {
            return Err(SequenceError::LeaseLost(self.schema.to_string()));
        }
        let mut deleted = 0;
        for table in &self.stageable(&info).await? {
            let n = parts
                .stager
                .retire(&mut tx, table, Hlc::ZERO, committed)
                .await?;
            metrics::gauge!(m::STAGE_STALE, &m::table_labels(table)).set(n as f64);
            deleted += n;
        }
        parts
            .ranges
            .forget(&mut tx, &self.schema, committed)
            .await?;
        tx.commit().await.map_err(SequenceError::Sql)?;
        if deleted > 0 {
            tracing::info!(schema = %self.schema, rows = deleted, "deleted redelivered rows staged below the checkpoint");
        }
        Ok(())
    }
}

/// Runs `work` unless the pipeline is asked to stop first (`None`): for steps that hold
/// nothing worth finishing (reads, a renewal, waiting for a connection), so that stopping
/// is not held up by a database that does not answer.
async fn unless_stopped<T>(
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
async fn begin_unless_stopped(
    ctx: &Ctx,
    db: &crate::target::Database,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, SequenceError> {
    unless_stopped(&ctx.stop, db.begin())
        .await
        .ok_or(SequenceError::Stopped)?
        .map_err(SequenceError::Sql)
}

/// Resolves once the sequencer abandons the windows in flight.
async fn abandoned(abandon: &mut watch::Receiver<bool>) {
    if abandon.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long releasing the lease may take when the pipeline stops.
const RELEASE_WITHIN: Duration = Duration::from_secs(1);

/// How often the staged rows at or below the checkpoint are swept (see
/// [`Pipeline::sweep_below`]); the first window after winning the lease sweeps too.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How often the lease holder counts the staged backlog, and the most rows it counts per table.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);
const BACKLOG_CAP: i64 = 100_000;

/// What every task of one window shares.
struct Ctx {
    parts: Arc<Parts>,
    schema: Schema,
    lease: Lease,
    /// The schema's tables in foreign-key order; rows refer to them by index.
    tables: Vec<Table>,
    info: Arc<SchemaInfo>,
    /// Tables registered for staging when the window started (the registry only grows).
    registered: usize,
    /// Registered tables the target schema lacks (none had rows in the window).
    unread: Vec<Table>,
    /// Ranges applied beyond the committed checkpoint by earlier attempts: their staged rows
    /// are redeliveries.
    skip: Ranges,
    /// Applied ranges may be recorded beyond the checkpoint, so a checkpoint commit forgets
    /// the ones it covers.
    recorded: AtomicBool,
    /// Flush transactions open right now.
    open: AtomicUsize,
    /// When the lease was last renewed (between flushes, or by every flush with separate
    /// staging).
    renewed: Mutex<Instant>,
    /// Raised when the pipeline stops: no further flush starts.
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn renewed(&self) -> Instant {
        *self.renewed.lock().expect("poisoned")
    }

    fn mark_renewed(&self, at: Instant) {
        let mut r = self.renewed.lock().expect("poisoned");
        *r = (*r).max(at);
    }

    fn renewal_due(&self) -> bool {
        self.renewed().elapsed() >= LEASE_LIFETIME / 3
    }

    fn lost(&self) -> SequenceError {
        SequenceError::LeaseLost(self.schema.to_string())
    }

    /// Counts an open flush transaction until the guard drops; one that begins while another
    /// is open is an overlap, the observable proof that flushes run concurrently.
    fn open_tx(&self) -> OpenTx<'_> {
        let before = self.open.fetch_add(1, Ordering::SeqCst);
        let labels = schema_label(&self.schema);
        if before > 0 {
            metrics::counter!(m::CORE_FLUSH_OVERLAPS, &labels).increment(1);
        }
        metrics::gauge!(m::CORE_FLUSHES_IN_FLIGHT, &labels).set((before + 1) as f64);
        OpenTx(self)
    }
}

struct OpenTx<'a>(&'a Ctx);

impl Drop for OpenTx<'_> {
    fn drop(&mut self) {
        let now = self.0.open.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!(m::CORE_FLUSHES_IN_FLIGHT, &schema_label(&self.0.schema)).set(now as f64);
    }
}

/// A running flush, counted in `sequencer_scheduler_executing_tasks_count` until it ends
/// (finished, failed or aborted with its window), then in `…_executed_tasks_count`.
struct Executing;

impl Executing {
    fn start() -> Executing {
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

/// How long a window may keep growing to newer resolved timestamps.
const EXTEND_FOR: Duration = Duration::from_secs(5);

/// A page of staged rows: complete for `(after, cut]`, in a window that ends at `hi`.
struct Page {
    after: Hlc,
    cut: Hlc,
    rows: Vec<(usize, Mutation)>,
    hi: Hlc,
    /// The window's last page.
    last: bool,
}

/// Reads the window page by page ahead of the appliers; the channel's capacity bounds how far.
///
/// At the end of the window, a newer resolved timestamp (one usually arrives while a window
/// applies) extends it, so the appliers go on without draining between windows. Not once the
/// cached target schema has changed: a table created since the window started could have rows
/// in the extension, and this window would not read them.
async fn read_pages(
    ctx: Arc<Ctx>,
    mut from: Hlc,
    mut hi: Hlc,
    out: mpsc::Sender<Result<Page, SequenceError>>,
) {
    let started = Instant::now();
    loop {
        let mut page = read_page(&ctx, from, hi).await;
        let mut next = None;
        if let Ok(p) = &mut page {
            if p.cut >= hi {
                next = extension(&ctx, hi, started).await;
                p.last = next.is_none();
            }
        }
        let cut = page.as_ref().map(|p| p.cut).ok();
        if out.send(page).await.is_err() {
            return;
        }
        match cut {
            Some(c) if c < hi => from = c,
            Some(c) if next.is_some() => (from, hi) = (c, next.unwrap_or(hi)),
            _ => return,
        }
    }
}

/// A newer resolved timestamp to extend the window to, if it may be.
async fn extension(ctx: &Ctx, hi: Hlc, started: Instant) -> Option<Hlc> {
    if started.elapsed() >= EXTEND_FOR {
        return None;
    }
    // Bounds first, schema second: a table is known to the schema cache before a resolved
    // timestamp covering its rows can be recorded.
    let proposed = ctx
        .parts
        .checkpoints
        .bounds(&ctx.schema)
        .await
        .ok()?
        .proposed;
    if proposed <= hi {
        return None;
    }
    let info = ctx.parts.applier.schema(&ctx.schema).await.ok()?;
    if !Arc::ptr_eq(&info, &ctx.info) {
        return None;
    }
    // A table staged for the first time since the window started is read by the next one.
    let registered = ctx.parts.stager.registered(&ctx.schema).await.ok()?;
    if registered.len() != ctx.registered {
        return None;
    }
    for table in &ctx.unread {
        if has_staged(&ctx.parts, table, hi, proposed).await.ok()? {
            return None;
        }
    }
    Some(proposed)
}

/// Whether `table` has unapplied staged rows in `(after, upto]`.
async fn has_staged(
    parts: &Parts,
    table: &Table,
    after: Hlc,
    upto: Hlc,
) -> Result<bool, SequenceError> {
    let mut tx = parts.stager.reader().await?;
    let page = parts
        .stager
        .read(&mut tx, table, after, None, upto, 1, usize::MAX)
        .await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    Ok(!page.rows.is_empty())
}

/// Reads unapplied rows in `(from, hi]` from every table, returning the time up to which the
/// result is complete and the rows at or before it.
async fn read_page(ctx: &Ctx, from: Hlc, hi: Hlc) -> Result<Page, SequenceError> {
    let started = Instant::now();
    let (scan, bytes) = (ctx.parts.args.scan_size, ctx.parts.args.scan_bytes);
    let stager = &ctx.parts.stager;
    let mut tx = stager.reader().await?;
    let conn: &mut PgConnection = &mut tx;
    let mut cut = hi;
    let mut rows: Vec<(usize, Mutation)> = Vec::new();
    for (i, table) in ctx.tables.iter().enumerate() {
        let read = stager
            .read(conn, table, from, None, cut, scan, bytes)
            .await?;
        let mut page = read.rows;
        // A read cut short by rows or bytes is complete only up to its last timestamp.
        if read.full {
            let first = page[0].time;
            let last = page[page.len() - 1].time;
            if first == last {
                // One source timestamp larger than a page: read all of it, never split it.
                loop {
                    let key = page[page.len() - 1].key.clone();
                    let more = stager
                        .read(conn, table, last, Some(&key), last, scan, bytes)
                        .await?;
                    page.extend(more.rows.into_iter().filter(|m| m.time == last));
                    if !more.full {
                        break;
                    }
                }
                cut = cut.min(last);
            } else {
                cut = cut.min(last.before());
            }
        }
        rows.extend(page.into_iter().map(|m| (i, m)));
    }
    tx.commit().await.map_err(SequenceError::Sql)?;
    rows.retain(|(_, m)| m.time <= cut);
    let read = rows.len();
    rows.retain(|(_, m)| !ctx.skip.contains(m.time));
    if rows.len() < read {
        metrics::counter!(m::STAGE_SKIPPED_APPLIED, &schema_label(&ctx.schema))
            .increment((read - rows.len()) as u64);
    }
    record_read(ctx, cut, &rows);
    tracing::debug!(schema = %ctx.schema, rows = rows.len(), read_ms = started.elapsed().as_millis() as u64, "read staged page");
    Ok(Page {
        after: from,
        cut,
        rows,
        hi,
        last: false,
    })
}

/// Publishes the reader's position: how far behind now the page ends, and each table's rows in
/// it (`stage_read_lag_seconds`, `stage_read_queue_count`).
fn record_read(ctx: &Ctx, cut: Hlc, rows: &[(usize, Mutation)]) {
    let mut per_table = vec![0usize; ctx.tables.len()];
    for (t, _) in rows {
        per_table[*t] += 1;
    }
    let lag = now_seconds() - cut.seconds();
    for (table, n) in ctx.tables.iter().zip(per_table) {
        let l = m::table_labels(table);
        metrics::gauge!(m::STAGE_READ_LAG, &l).set(lag);
        metrics::gauge!(m::STAGE_READ_QUEUE, &l).set(n as f64);
    }
}

/// One target transaction's worth of a window.
struct FlushJob {
    idx: u64,
    after: Hlc,
    upto: Hlc,
    batches: TableBatches,
    /// Lock keys of its rows, sorted and unique.
    keys: Vec<u64>,
    rows: usize,
}

impl FlushJob {
    fn new(idx: u64, slice: Slice, tables: &[Table]) -> FlushJob {
        let mut keys: Vec<u64> = slice
            .rows
            .iter()
            .map(|(t, mu)| lock_key(*t, &mu.key))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let rows = slice.rows.len();
        let mut batches = TableBatches::new();
        for (t, mu) in slice.rows {
            batches.entry(tables[t].clone()).or_default().push(mu);
        }
        FlushJob {
            idx,
            after: slice.after,
            upto: slice.upto,
            batches,
            keys,
            rows,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Role {
    /// Runs alongside others: fences with a shared lock and leaves the checkpoint alone.
    Concurrent,
    /// Nothing runs ahead of it: also commits the checkpoint at its end; the window's last
    /// flush also sweeps the window from `sweep`.
    Head { sweep: Option<Hlc> },
}

/// Applies one flush (see the module doc for the two shapes).
async fn run_flush(ctx: Arc<Ctx>, job: Arc<FlushJob>, role: Role) -> Result<(), SequenceError> {
    let parts = &ctx.parts;
    let started = Instant::now();
    let head = matches!(role, Role::Head { .. });
    let written;
    if parts.separate_staging {
        // Lease fencing cannot span two databases: renewing on staging right before the target
        // transaction is as close as it gets. A target transaction outliving the lease after
        // this renewal could race a new holder; the lifetime is far above a flush's duration.
        if !parts.leases.renew_now(&ctx.lease, LEASE_LIFETIME).await? {
            return Err(ctx.lost());
        }
        ctx.mark_renewed(started);
        let mut tx = begin_unless_stopped(&ctx, &parts.target).await?;
        let open = ctx.open_tx();
        // No statement may outlive the lease, and the commit is only sent while a newer
        // holder cannot have taken it over: what remains is the commit's own round trip,
        // which `LEASE_MARGIN` bounds.
        let remaining = |at: Instant| LEASE_LIFETIME.saturating_sub(LEASE_MARGIN + at.elapsed());
        bound_statements(&mut tx, remaining(started)).await?;
        write(&ctx, &mut tx, &job).await?;
        if remaining(started).is_zero() {
            tx.rollback().await.map_err(SequenceError::Sql)?;
            tracing::warn!(schema = %ctx.schema, "a flush outlived its lease on separate staging; rolled back");
            return Err(ctx.lost());
        }
        tx.commit().await.map_err(SequenceError::Sql)?;
        drop(open);
        written = started.elapsed();
        if let Err(e) = staging_step(&ctx, &job, role).await {
            metrics::counter!(m::CORE_SWEEP_SKEW, &schema_label(&ctx.schema)).increment(1);
            tracing::warn!(schema = %ctx.schema, error = %e, "flush applied to the target but not retired from staging; its rows will be applied again");
            return Err(e);
        }
    } else {
        let mut tx = begin_unless_stopped(&ctx, &parts.target).await?;
        if !parts.leases.fence(&mut tx, &ctx.lease).await? {
            return Err(ctx.lost());
        }
        let open = ctx.open_tx();
        write(&ctx, &mut tx, &job).await?;
        written = started.elapsed();
        retire_and_commit(&ctx, &mut tx, &job, role).await?;
        tx.commit().await.map_err(SequenceError::Sql)?;
        drop(open);
    }
    if head {
        parts.checkpoints.committed(&ctx.schema, job.upto);
    }
    metrics::counter!(m::CORE_SWEEP_APPLY_COUNT, &schema_label(&ctx.schema))
        .increment(job.rows as u64);
    tracing::debug!(
        schema = %ctx.schema,
        rows = job.rows,
        head,
        write_ms = written.as_millis() as u64,
        total_ms = started.elapsed().as_millis() as u64,
        "flushed"
    );
    Ok(())
}

/// Writes a flush's rows in foreign-key order through the userscript's hooks.
async fn write(ctx: &Ctx, conn: &mut PgConnection, job: &FlushJob) -> Result<(), SequenceError> {
    let parts = &ctx.parts;
    write_ordered(
        &parts.applier,
        parts.hooks.as_ref(),
        conn,
        &ctx.info,
        &job.batches,
    )
    .await
}

/// With separate staging, after the target commit: retire the flush's rows (and commit the
/// checkpoint when it carries it) in one staging transaction.
async fn staging_step(ctx: &Ctx, job: &FlushJob, role: Role) -> Result<(), SequenceError> {
    let mut tx = ctx
        .parts
        .stager
        .database()
        .begin()
        .await
        .map_err(SequenceError::Sql)?;
    if !ctx.parts.leases.fence(&mut tx, &ctx.lease).await? {
        return Err(ctx.lost());
    }
    retire_and_commit(ctx, &mut tx, job, role).await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    Ok(())
}

/// Deletes the staged rows a flush applied (its own range in the tables it touched, or the
/// whole window in every table when it sweeps) and, as head, commits the checkpoint.
async fn retire_and_commit(
    ctx: &Ctx,
    conn: &mut PgConnection,
    job: &FlushJob,
    role: Role,
) -> Result<(), SequenceError> {
    match role {
        Role::Head { sweep: Some(from) } => retire(ctx, conn, None, from, job.upto).await?,
        _ => retire(ctx, conn, Some(&job.batches), job.after, job.upto).await?,
    }
    match role {
        Role::Head { .. } => commit_checkpoint(ctx, conn, job.upto).await,
        Role::Concurrent => {
            ctx.recorded.store(true, Ordering::SeqCst);
            ctx.parts
                .ranges
                .record(conn, &ctx.schema, job.after, job.upto)
                .await?;
            Ok(())
        }
    }
}

/// Commits the checkpoint at `upto`, forgetting the applied ranges it covers.
async fn commit_checkpoint(
    ctx: &Ctx,
    conn: &mut PgConnection,
    upto: Hlc,
) -> Result<(), SequenceError> {
    let parts = &ctx.parts;
    parts.checkpoints.commit(conn, &ctx.schema, upto).await?;
    if ctx.recorded.load(Ordering::SeqCst) {
        parts.ranges.forget(conn, &ctx.schema, upto).await?;
    }
    Ok(())
}

/// Bounds every statement of the transaction on `conn` by `d` (at least 1 ms: 0 would mean
/// no bound).
async fn bound_statements(conn: &mut PgConnection, d: Duration) -> Result<(), SequenceError> {
    let stmt = format!("SET LOCAL statement_timeout = {}", d.as_millis().max(1));
    sqlx::query(&stmt)
        .persistent(false)
        .execute(conn)
        .await
        .map_err(SequenceError::Sql)?;
    Ok(())
}

/// Deletes staged rows in `(from, upto]` of the tables in `touched` (every table if `None`).
async fn retire(
    ctx: &Ctx,
    conn: &mut PgConnection,
    touched: Option<&TableBatches>,
    from: Hlc,
    upto: Hlc,
) -> Result<(), SequenceError> {
    for table in ctx
        .tables
        .iter()
        .filter(|t| touched.is_none_or(|b| b.contains_key(*t)))
    {
        ctx.parts.stager.retire(conn, table, from, upto).await?;
    }
    Ok(())
}

/// The in-order step: commits the checkpoint at `upto`, the end of the completed prefix, on
/// staging (sweeping the window from `sweep` when `upto` ends it).
async fn commit_step(ctx: Arc<Ctx>, upto: Hlc, sweep: Option<Hlc>) -> Result<Hlc, SequenceError> {
    let begin = ctx.parts.control.begin();
    let mut tx = if *ctx.stop.borrow() {
        // Stopping: the applied prefix is committed if the database answers soon.
        tokio::time::timeout(RELEASE_WITHIN, begin)
            .await
            .map_err(|_| SequenceError::Stopped)?
    } else {
        begin.await
    }
    .map_err(SequenceError::Sql)?;
    if !ctx.parts.leases.fence(&mut tx, &ctx.lease).await? {
        return Err(ctx.lost());
    }
    if let Some(from) = sweep {
        retire(&ctx, &mut tx, None, from, upto).await?;
    }
    commit_checkpoint(&ctx, &mut tx, upto).await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    ctx.parts.checkpoints.committed(&ctx.schema, upto);
    Ok(upto)
}

/// A failure worth one more try once every earlier flush has finished: a foreign-key
/// violation (the parent is in an earlier flush still running) or a serialization failure.
fn deferrable(e: &SequenceError) -> bool {
    match e {
        SequenceError::Apply(a) => a.is_retryable() || a.sqlstate().is_some_and(|c| c == "23503"),
        SequenceError::Sql(s) => {
            let code = crate::target::sqlstate(s);
            code == "23503" || crate::target::is_retryable_sqlstate(&code)
        }
        _ => false,
    }
}

/// A dispatched flush.
struct Dispatched {
    job: Arc<FlushJob>,
    head: bool,
    /// An earlier flush was unfinished when it started.
    behind: bool,
    retried: bool,
    /// When it was handed to [`Window::dispatch`].
    queued: Instant,
}

enum Event {
    Flush(u64, Result<(), SequenceError>),
    Commit(Result<Hlc, SequenceError>),
    Panicked(String),
}

/// The coordinator of one window: dispatches flushes in time order, tracks their keys and
/// completion, and commits the checkpoint in order.
struct Window {
    ctx: Arc<Ctx>,
    /// The end of the window as far as known (it grows when the reader extends it).
    hi: Hlc,
    /// The page ending at the window's final `hi` has arrived.
    read_all: bool,
    sweep_from: Hlc,
    parallelism: usize,
    flush_size: usize,
    next_idx: u64,
    running: JoinSet<(u64, Result<(), SequenceError>)>,
    jobs: HashMap<u64, Dispatched>,
    /// Flushes waiting for every earlier one to finish before their second try.
    deferred: BTreeSet<u64>,
    locks: KeyLocks,
    progress: Progress,
    commit: Option<JoinHandle<Result<Hlc, SequenceError>>>,
    error: Option<SequenceError>,
    /// The flush whose failure ended the window, searched for its poison mutation.
    failed: Option<Arc<FlushJob>>,
}

impl Window {
    fn new(ctx: Arc<Ctx>, bounds: Bounds, sweep_from: Hlc) -> Window {
        let args = &ctx.parts.args;
        // Leave half the target pool to ingest, reads and checkpoint commits.
        let pool = ctx.parts.target.pool.options().get_max_connections() as usize;
        let parallelism = args.parallelism().min((pool / 2).max(1));
        Window {
            hi: bounds.proposed,
            read_all: false,
            sweep_from,
            parallelism,
            flush_size: args.flush_size,
            next_idx: 0,
            running: JoinSet::new(),
            jobs: HashMap::new(),
            deferred: BTreeSet::new(),
            locks: KeyLocks::default(),
            progress: Progress::new(bounds.committed),
            commit: None,
            error: None,
            failed: None,
            ctx,
        }
    }

    /// Applies the window; returns where it ended.
    async fn run(
        mut self,
        mut pages: mpsc::Receiver<Result<Page, SequenceError>>,
    ) -> Result<Hlc, SequenceError> {
        enum Next {
            Page(Option<Result<Page, SequenceError>>),
            Event(Event),
        }
        let mut stop = self.ctx.stop.clone();
        while self.error.is_none() {
            if *stop.borrow_and_update() {
                self.fail(SequenceError::Stopped);
                break;
            }
            let next = if self.busy() {
                tokio::select! {
                    p = pages.recv() => Next::Page(p),
                    ev = self.wait() => Next::Event(ev),
                    Ok(()) = stop.changed() => continue,
                }
            } else {
                tokio::select! {
                    p = pages.recv() => Next::Page(p),
                    Ok(()) = stop.changed() => continue,
                }
            };
            let page = match next {
                Next::Event(ev) => {
                    self.handle(ev);
                    continue;
                }
                Next::Page(Some(Ok(page))) => page,
                Next::Page(Some(Err(e))) => {
                    self.fail(e);
                    break;
                }
                Next::Page(None) => break,
            };
            let last = page.last;
            metrics::gauge!(m::STAGE_MERGE_LAG, &schema_label(&self.ctx.schema))
                .set(now_seconds() - page.cut.seconds());
            self.hi = self.hi.max(page.hi);
            self.read_all = last;
            for slice in slices(page.rows, page.after, page.cut, self.flush_size) {
                let job = FlushJob::new(self.next_idx, slice, &self.ctx.tables);
                self.next_idx += 1;
                self.dispatch(job).await;
                if self.error.is_some() {
                    break;
                }
            }
            if last {
                break;
            }
        }
        self.finish().await
    }

    fn busy(&self) -> bool {
        !self.running.is_empty() || self.commit.is_some()
    }

    /// Waits for the next flush or checkpoint commit to end; only call while [`Window::busy`].
    async fn wait(&mut self) -> Event {
        let running = &mut self.running;
        let commit = &mut self.commit;
        let ev = tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => match joined {
                Ok((idx, result)) => Event::Flush(idx, result),
                Err(e) => Event::Panicked(e.to_string()),
            },
            joined = async { commit.as_mut().expect("checked").await }, if commit.is_some() => {
                Event::Commit(joined.unwrap_or_else(|e| Err(SequenceError::Task(e.to_string()))))
            }
        };
        if matches!(ev, Event::Commit(_)) {
            self.commit = None;
        }
        ev
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Flush(idx, Ok(())) => {
                let d = self.jobs.remove(&idx).expect("dispatched flush");
                metrics::histogram!(m::LOCKSET_EXEC_COMPLETE, m::LABEL_SET => m::SET_SCHEDULER)
                    .record(d.queued.elapsed().as_secs_f64());
                self.locks.release(&d.job.keys);
                self.progress.done(idx);
                if d.head {
                    self.progress.set_committed(d.job.upto);
                }
            }
            Event::Flush(idx, Err(e)) => {
                let d = self.jobs.get_mut(&idx).expect("dispatched flush");
                if self.error.is_none() && d.behind && !d.retried && deferrable(&e) {
                    // Its keys stay locked, so no later flush of the same keys overtakes it.
                    d.retried = true;
                    self.deferred.insert(idx);
                    metrics::counter!(m::CORE_FLUSH_DEFERRED, &schema_label(&self.ctx.schema))
                        .increment(1);
                    tracing::debug!(schema = %self.ctx.schema, error = %e, "flush deferred until earlier flushes finish");
                } else {
                    let d = self.jobs.remove(&idx).expect("dispatched flush");
                    metrics::histogram!(m::LOCKSET_EXEC_COMPLETE, m::LABEL_SET => m::SET_SCHEDULER)
                        .record(d.queued.elapsed().as_secs_f64());
                    self.locks.release(&d.job.keys);
                    if self.error.is_none() {
                        self.failed = Some(d.job);
                    }
                    self.fail(e);
                }
            }
            Event::Commit(Ok(at)) => self.progress.set_committed(at),
            Event::Commit(Err(e)) => self.fail(e),
            Event::Panicked(e) => self.fail(SequenceError::Task(e)),
        }
        self.retry_deferred();
        self.maybe_commit();
        self.publish_queue();
    }

    /// Rows dispatched to flushes and not applied yet (`stage_merge_queue_count`).
    fn publish_queue(&self) {
        let rows: usize = self.jobs.values().map(|d| d.job.rows).sum();
        metrics::gauge!(m::STAGE_MERGE_QUEUE, &schema_label(&self.ctx.schema)).set(rows as f64);
    }

    fn fail(&mut self, e: SequenceError) {
        if self.error.is_none() {
            self.error = Some(e);
        } else if !matches!(e, SequenceError::Stopped) {
            tracing::warn!(schema = %self.ctx.schema, error = %e, "another flush failed");
        }
    }

    /// Retries the first deferred flush once nothing before it is unfinished.
    fn retry_deferred(&mut self) {
        if self.error.is_some() {
            return;
        }
        let Some(&idx) = self.deferred.first() else {
            return;
        };
        if self.progress.pending_before(idx) {
            return;
        }
        self.deferred.remove(&idx);
        let job = self.jobs[&idx].job.clone();
        metrics::counter!(m::LOCKSET_RETRIED, m::LABEL_SET => m::SET_SCHEDULER).increment(1);
        self.spawn(job, Role::Concurrent);
    }

    /// Starts the in-order checkpoint commit when the completed prefix has moved past it.
    fn maybe_commit(&mut self) {
        if self.error.is_some() || self.commit.is_some() {
            return;
        }
        let upto = self.progress.prefix();
        if upto <= self.progress.committed() {
            return;
        }
        let sweep = self.at_end(upto).then_some(self.sweep_from);
        self.commit = Some(tokio::spawn(commit_step(self.ctx.clone(), upto, sweep)));
    }

    /// `upto` is the end of the whole window: the step committing it sweeps the window.
    fn at_end(&self, upto: Hlc) -> bool {
        self.read_all && upto >= self.hi
    }

    fn spawn(&mut self, job: Arc<FlushJob>, role: Role) {
        let ctx = self.ctx.clone();
        let idx = job.idx;
        self.running.spawn(async move {
            let _executing = Executing::start();
            (idx, run_flush(ctx, job, role).await)
        });
    }

    /// Starts `job` as soon as it may: fewer than `parallelism` flushes in flight and none of
    /// them holding its keys. When the lease is due for renewal, in-flight flushes are let
    /// finish first (their shared locks would make the renewing `UPDATE` wait anyway, and new
    /// flushes would queue behind it), then it is renewed on its own, never inside a flush
    /// transaction, where its exclusive lock would keep every other flush waiting.
    async fn dispatch(&mut self, job: FlushJob) {
        let idx = job.idx;
        if job.rows == 0 {
            // Nothing to write: the checkpoint may simply move over it.
            self.progress.push(idx, job.upto);
            self.progress.done(idx);
            self.maybe_commit();
            return;
        }
        let queued = Instant::now();
        let mut waited = false;
        loop {
            if self.error.is_some() {
                return;
            }
            if *self.ctx.stop.borrow() {
                self.fail(SequenceError::Stopped);
                return;
            }
            if self.running.is_empty() {
                if self.commit.is_none() && self.ctx.renewal_due() {
                    waited = true;
                    self.renew().await;
                    continue;
                }
                // Let a checkpoint commit in progress end, so this flush can carry the next.
                if self.commit.is_none() {
                    break;
                }
            } else if !self.ctx.renewal_due()
                && self.running.len() + self.deferred.len() < self.parallelism
                && self.locks.free(&job.keys)
            {
                break;
            }
            waited = true;
            let ev = self.wait().await;
            self.handle(ev);
        }
        let started = if waited {
            m::LOCKSET_DEFERRED_START
        } else {
            m::LOCKSET_IMMEDIATE_START
        };
        metrics::counter!(started, m::LABEL_SET => m::SET_SCHEDULER).increment(1);
        metrics::histogram!(m::LOCKSET_EXEC_WAIT, m::LABEL_SET => m::SET_SCHEDULER)
            .record(queued.elapsed().as_secs_f64());
        let head = self.running.is_empty() && self.progress.committed() == job.after;
        debug_assert!(!self.running.is_empty() || self.locks.is_empty());
        let behind = self.progress.any_pending();
        self.progress.push(idx, job.upto);
        self.locks.take(idx, &job.keys);
        let role = if head {
            Role::Head {
                sweep: self.at_end(job.upto).then_some(self.sweep_from),
            }
        } else {
            Role::Concurrent
        };
        let job = Arc::new(job);
        self.jobs.insert(
            idx,
            Dispatched {
                job: job.clone(),
                head,
                behind,
                retried: false,
                queued,
            },
        );
        self.spawn(job, role);
        self.publish_queue();
    }

    /// Renews the lease while nothing of the window runs.
    async fn renew(&mut self) {
        let started = Instant::now();
        let parts = &self.ctx.parts;
        match parts
            .leases
            .renew_now(&self.ctx.lease, LEASE_LIFETIME)
            .await
        {
            Ok(true) => self.ctx.mark_renewed(started),
            Ok(false) => self.fail(self.ctx.lost()),
            Err(e) => self.fail(e.into()),
        }
    }

    /// Waits for the window to be committed; after a failure, waits for the flushes in flight
    /// and commits the checkpoint over what they completed before returning the error.
    async fn finish(mut self) -> Result<Hlc, SequenceError> {
        while self.error.is_none() {
            if !self.busy() {
                if self.at_end(self.progress.committed()) {
                    return Ok(self.hi);
                }
                self.maybe_commit();
                if !self.busy() {
                    self.fail(SequenceError::Task(
                        "the staging reader stopped before the end of the window".into(),
                    ));
                    break;
                }
            }
            let ev = self.wait().await;
            self.handle(ev);
        }
        while self.busy() {
            let ev = self.wait().await;
            self.handle(ev);
        }
        let upto = self.progress.prefix();
        if upto > self.progress.committed() {
            let sweep = self.at_end(upto).then_some(self.sweep_from);
            if let Err(e) = commit_step(self.ctx.clone(), upto, sweep).await {
                tracing::warn!(schema = %self.ctx.schema, error = %e, "could not commit the checkpoint of the applied flushes");
            }
        }
        let error = self.error.take().expect("failed window has an error");
        let stopped = matches!(error, SequenceError::Stopped);
        if let Some(job) = self
            .failed
            .take()
            .filter(|_| !stopped && !is_transient(&error))
        {
            self.name_poison(&job).await;
        }
        Err(error)
    }

    /// Logs the mutation of a failed flush that the target refuses (DESIGN §3.8), so an
    /// operator can find what blocks the schema. The key is an identifier, not row values.
    async fn name_poison(&self, job: &FlushJob) {
        let parts = &self.ctx.parts;
        let found = find_poison(
            &parts.applier,
            parts.hooks.as_ref(),
            &parts.target.pool,
            &self.ctx.info,
            &job.batches,
        )
        .await;
        let pipelines = &parts.pipelines;
        match &found {
            Ok(Some(p)) => pipelines.poison(
                &self.ctx.schema,
                Some((p.table.clone(), p.key.clone(), p.time)),
            ),
            _ => pipelines.poison(&self.ctx.schema, None),
        }
        match found {
            Ok(Some(p)) => {
                tracing::error!(schema = %self.ctx.schema, table = %p.table, key = %p.key, time = %p.time, error = %p.error, "poison mutation blocks the schema; will retry with backoff")
            }
            Ok(None) => {
                tracing::warn!(schema = %self.ctx.schema, "a flush failed but each of its mutations applies alone")
            }
            Err(e) => {
                tracing::warn!(schema = %self.ctx.schema, error = %e, "could not search the failed flush for its poison mutation")
            }
        }
    }
}
