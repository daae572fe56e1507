//! One flush: its target transaction and the staging step that retires its rows and commits
//! the checkpoint, in the two shapes the module doc describes (staging in the target database,
//! or separate).

use super::*;

/// One target transaction's worth of a window.
pub(super) struct FlushJob {
    pub(super) idx: u64,
    pub(super) after: Hlc,
    pub(super) upto: Hlc,
    pub(super) batches: TableBatches,
    /// Lock keys of its rows, sorted and unique.
    pub(super) keys: Vec<u64>,
    pub(super) rows: usize,
}

impl FlushJob {
    pub(super) fn new(idx: u64, slice: Slice, tables: &[Table]) -> FlushJob {
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
pub(super) enum Role {
    /// Runs alongside others: fences with a shared lock and leaves the checkpoint alone.
    Concurrent,
    /// Nothing runs ahead of it: also commits the checkpoint at its end; the window's last
    /// flush also sweeps the window from `sweep`.
    Head { sweep: Option<Hlc> },
}

/// Applies one flush (see the module doc for the two shapes).
pub(super) async fn run_flush(
    ctx: Arc<Ctx>,
    job: Arc<FlushJob>,
    role: Role,
) -> Result<(), SequenceError> {
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
            tracing::warn!(schema = %ctx.schema, error = %crate::error::ErrorChain(&e), "flush applied to the target but not retired from staging; its rows will be applied again");
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
pub(super) async fn write(
    ctx: &Ctx,
    conn: &mut PgConnection,
    job: &FlushJob,
) -> Result<(), SequenceError> {
    let parts = &ctx.parts;
    write_ordered(
        &parts.applier,
        parts.script.as_ref(),
        conn,
        &ctx.info,
        &job.batches,
    )
    .await
}

/// With separate staging, after the target commit: retire the flush's rows (and commit the
/// checkpoint when it carries it) in one staging transaction.
pub(super) async fn staging_step(
    ctx: &Ctx,
    job: &FlushJob,
    role: Role,
) -> Result<(), SequenceError> {
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
pub(super) async fn retire_and_commit(
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
pub(super) async fn commit_checkpoint(
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
pub(super) async fn bound_statements(
    conn: &mut PgConnection,
    d: Duration,
) -> Result<(), SequenceError> {
    let stmt = format!("SET LOCAL statement_timeout = {}", d.as_millis().max(1));
    sqlx::query(&stmt)
        .persistent(false)
        .execute(conn)
        .await
        .map_err(SequenceError::Sql)?;
    Ok(())
}

/// Deletes staged rows in `(from, upto]` of the tables in `touched` (every table if `None`).
pub(super) async fn retire(
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
pub(super) async fn commit_step(
    ctx: Arc<Ctx>,
    upto: Hlc,
    sweep: Option<Hlc>,
) -> Result<Hlc, SequenceError> {
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
pub(super) fn deferrable(e: &SequenceError) -> bool {
    match e {
        SequenceError::Apply(a) => a.is_retryable() || a.sqlstate().is_some_and(|c| c == "23503"),
        SequenceError::Sql(s) => {
            let code = crate::target::sqlstate(s);
            code == "23503" || crate::target::is_retryable_sqlstate(&code)
        }
        _ => false,
    }
}
