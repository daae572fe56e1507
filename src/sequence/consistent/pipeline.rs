//! The lease loop of one schema: win the lease, hold it, and apply each resolved window.

use super::*;

pub(crate) struct Pipeline {
    pub(super) parts: Arc<Parts>,
    pub(super) schema: Schema,
    pub(super) notify: Arc<Notify>,
    pub(super) lease_name: String,
    /// Tables whose backlog this instance published while it held the lease.
    pub(super) counted: Mutex<Vec<Table>>,
}

pub(super) enum Held {
    Stopped,
    Lost,
}

impl Pipeline {
    pub(crate) fn new(parts: Arc<Parts>, schema: Schema, notify: Arc<Notify>) -> Self {
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
    pub(crate) async fn run(
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
                                    tracing::warn!(schema = %self.schema, error = %crate::error::ErrorChain(&e), "could not release apply lease")
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
                    tracing::warn!(schema = %self.schema, error = %crate::error::ErrorChain(&e), "could not acquire apply lease");
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
    pub(super) async fn hold(&self, lease: &Lease, stop: &mut watch::Receiver<bool>) -> Held {
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
                Err(e) => self.parts.pipelines.failed(
                    &self.schema,
                    crate::error::ErrorChain(e).to_string(),
                    backoff(attempt + 1),
                ),
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
                        tracing::warn!(schema = %self.schema, error = %crate::error::ErrorChain(&e), retry_in = ?wait, "target unavailable; will retry");
                    } else {
                        tracing::error!(schema = %self.schema, error = %crate::error::ErrorChain(&e), retry_in = ?wait, "could not apply window; will retry");
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
                        tracing::warn!(schema = %self.schema, error = %crate::error::ErrorChain(&e), "could not renew apply lease");
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
    pub(super) async fn apply_window(
        &self,
        lease: &Lease,
        bounds: Bounds,
        full_sweep: bool,
        renewed: &mut Instant,
        stop: &watch::Receiver<bool>,
    ) -> Result<(), SequenceError> {
        let prepare = async {
            let (info, registered, unread) = self.known_tables(bounds).await?;
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
    pub(super) async fn known_tables(
        &self,
        bounds: Bounds,
    ) -> Result<(Arc<SchemaInfo>, usize, Vec<Table>), SequenceError> {
        let parts = &self.parts;
        let registered = parts.stager.registered(&self.schema).await?;
        let mut info = parts.applier.schemas().schema(&self.schema).await?;
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
                info = parts.applier.schemas().refresh(&self.schema).await?;
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
    pub(super) async fn stageable(&self, info: &SchemaInfo) -> Result<Vec<Table>, SequenceError> {
        let mut tables = Vec::new();
        for table in info.levels.iter().flatten() {
            match self.parts.stager.ensure(table).await {
                Ok(_) => tables.push(table.clone()),
                Err(e @ StageError::NameTaken { .. }) => {
                    tracing::debug!(schema = %self.schema, error = %crate::error::ErrorChain(&e), "not reading a table that cannot be staged");
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
    pub(super) async fn count_backlog(&self) {
        let parts = &self.parts;
        let counted = async {
            let committed = parts.checkpoints.bounds(&self.schema).await?.committed;
            let info = parts.applier.schemas().schema(&self.schema).await?;
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
            tracing::debug!(schema = %self.schema, error = %crate::error::ErrorChain(&e), "could not count the staged backlog");
        }
    }

    /// Deletes staged rows at or below the committed checkpoint: redeliveries that an
    /// instance staged before it saw the checkpoint move past them. They are never read.
    pub(super) async fn sweep_below(
        &self,
        lease: &Lease,
        committed: Hlc,
    ) -> Result<(), SequenceError> {
        let parts = &self.parts;
        let info = parts.applier.schemas().schema(&self.schema).await?;
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
