//! One schema's consistent-mode pipeline: win the lease, then apply resolved windows.

use super::{
    backoff, now_seconds, schema_label, write_ordered, Parts, SequenceError, LEASE_LIFETIME, POLL,
};
use crate::checkpoint::{Bounds, Lease};
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::mutation::{Mutation, TableBatches};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

pub(super) struct Pipeline {
    parts: Arc<Parts>,
    schema: Schema,
    notify: Arc<Notify>,
    lease_name: String,
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
        }
    }

    pub(super) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
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
                    let held = self.hold(&lease, &mut stop).await;
                    metrics::gauge!(m::CORE_SWEEP_ACTIVE, &schema_label(&self.schema)).set(0.0);
                    match held {
                        Held::Stopped => {
                            if let Err(e) = self.parts.leases.release(&lease).await {
                                tracing::warn!(schema = %self.schema, error = %e, "could not release apply lease");
                            }
                            break;
                        }
                        Held::Lost => tracing::warn!(schema = %self.schema, "apply lease lost"),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    failures += 1;
                    tracing::warn!(schema = %self.schema, error = %e, "could not acquire apply lease");
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

    /// Applies windows while the lease is held.
    async fn hold(&self, lease: &Lease, stop: &mut watch::Receiver<bool>) -> Held {
        let mut renewed = Instant::now();
        let mut attempt = 0u32;
        let mut swept = false;
        loop {
            if *stop.borrow() {
                return Held::Stopped;
            }
            let started = Instant::now();
            metrics::gauge!(m::CORE_SWEEP_ATTEMPT_TIMESTAMP, &schema_label(&self.schema))
                .set(now_seconds());
            let result = match self.parts.checkpoints.bounds(&self.schema).await {
                Ok(b) if b.proposed > b.committed => {
                    let done = self.apply_window(lease, b, !swept).await;
                    swept |= done.is_ok();
                    done.map(|_| true)
                }
                Ok(_) => Ok(false),
                Err(e) => Err(SequenceError::from(e)),
            };
            let wait = match result {
                Ok(worked) => {
                    attempt = 0;
                    if worked {
                        renewed = Instant::now();
                        metrics::histogram!(m::CORE_SWEEP_DURATION, &schema_label(&self.schema))
                            .record(started.elapsed().as_secs_f64());
                        metrics::gauge!(
                            m::CORE_SWEEP_SUCCESS_TIMESTAMP,
                            &schema_label(&self.schema)
                        )
                        .set(now_seconds());
                        continue;
                    }
                    POLL.min(self.parts.args.flush_period.max(Duration::from_millis(50)))
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
                    wait
                }
            };
            if renewed.elapsed() >= LEASE_LIFETIME / 3 {
                match self.parts.leases.renew_now(lease, LEASE_LIFETIME).await {
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
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.notify.notified() => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Applies `(committed, proposed]`. Reads pages of every table, cuts them at a time up to
    /// which all tables are complete, and applies whole timestamps in transactions of about
    /// `--flushSize` mutations. Each transaction also retires its staged rows and commits the
    /// checkpoint at its last timestamp: everything at or before it has been received (the
    /// resolved timestamp says so) and is now applied, so a crash resumes right after it.
    ///
    /// Retiring deletes each flush's own range; the last flush sweeps the whole window in every
    /// table (redelivered duplicates), and the first window after winning the lease sweeps from
    /// the beginning (`full_sweep`), which also clears rows redelivered below a checkpoint.
    async fn apply_window(
        &self,
        lease: &Lease,
        bounds: Bounds,
        full_sweep: bool,
    ) -> Result<(), SequenceError> {
        let info = self.parts.applier.schema(&self.schema).await?;
        if let Some(h) = &self.parts.hooks {
            h.configure(&self.parts.applier, &info);
        }
        let tables: Vec<Table> = info.levels.iter().flatten().cloned().collect();
        let hi = bounds.proposed;
        let mut from = bounds.committed;
        let mut flushed = bounds.committed;
        let sweep_from = if full_sweep {
            Hlc::ZERO
        } else {
            bounds.committed
        };
        loop {
            let read_started = Instant::now();
            let (cut, rows) = {
                let mut tx = self.parts.stager.reader().await?;
                let page = self.read_page(&mut tx, &tables, from, hi).await?;
                tx.commit().await.map_err(SequenceError::Sql)?;
                page
            };
            tracing::debug!(schema = %self.schema, rows = rows.len(), read_ms = read_started.elapsed().as_millis() as u64, "read staged page");
            let mut groups: BTreeMap<Hlc, Vec<(usize, Mutation)>> = BTreeMap::new();
            for (t, mu) in rows {
                groups.entry(mu.time).or_default().push((t, mu));
            }
            let mut flush: Vec<(usize, Mutation)> = Vec::new();
            for (time, group) in groups {
                flush.extend(group);
                if flush.len() >= self.parts.args.flush_size && time < cut {
                    let rows = std::mem::take(&mut flush);
                    self.flush(lease, &tables, rows, (flushed, time), None, &info)
                        .await?;
                    flushed = time;
                }
            }
            let sweep = (cut == hi).then_some(sweep_from);
            self.flush(lease, &tables, flush, (flushed, cut), sweep, &info)
                .await?;
            flushed = cut;
            if cut == hi {
                tracing::debug!(schema = %self.schema, resolved = %hi, "window committed");
                return Ok(());
            }
            from = cut;
        }
    }

    /// Reads unapplied rows in `(from, hi]` from every table, returning the time up to which
    /// the result is complete and the rows at or before it.
    async fn read_page(
        &self,
        conn: &mut sqlx::PgConnection,
        tables: &[Table],
        from: Hlc,
        hi: Hlc,
    ) -> Result<(Hlc, Vec<(usize, Mutation)>), SequenceError> {
        let scan = self.parts.args.scan_size;
        let stager = &self.parts.stager;
        let mut cut = hi;
        let mut rows: Vec<(usize, Mutation)> = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            let mut page = stager.read(conn, table, from, None, cut, scan).await?;
            if page.len() == scan {
                let first = page[0].time;
                let last = page[page.len() - 1].time;
                if first == last {
                    // One source timestamp larger than a page: read all of it, never split it.
                    loop {
                        let key = page[page.len() - 1].key.clone();
                        let more = stager
                            .read(conn, table, last, Some(&key), last, scan)
                            .await?;
                        let done = more.len() < scan;
                        page.extend(more.into_iter().filter(|m| m.time == last));
                        if done {
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
        rows.retain(|(_, m)| m.time <= cut);
        Ok((cut, rows))
    }

    /// One target transaction: fence on the lease, write in FK order, retire the staged rows
    /// of `(after, upto]` (or, with `sweep`, of `(sweep, upto]` in every table) and commit the
    /// checkpoint at `upto`.
    async fn flush(
        &self,
        lease: &Lease,
        tables: &[Table],
        rows: Vec<(usize, Mutation)>,
        (after, upto): (Hlc, Hlc),
        sweep: Option<Hlc>,
        info: &crate::apply::SchemaInfo,
    ) -> Result<(), SequenceError> {
        let pool = &self.parts.stager.database().pool;
        let mut batches = TableBatches::new();
        for (t, mu) in rows {
            batches.entry(tables[t].clone()).or_default().push(mu);
        }
        let count: usize = batches.values().map(Vec::len).sum();
        let started = Instant::now();
        let mut tx = pool.begin().await.map_err(SequenceError::Sql)?;
        if !self
            .parts
            .leases
            .renew(&mut tx, lease, LEASE_LIFETIME)
            .await?
        {
            return Err(SequenceError::LeaseLost(self.schema.to_string()));
        }
        write_ordered(
            &self.parts.applier,
            self.parts.hooks.as_ref(),
            &mut tx,
            info,
            &batches,
        )
        .await?;
        let written = started.elapsed();
        for table in tables
            .iter()
            .filter(|t| sweep.is_some() || batches.contains_key(*t))
        {
            let from = sweep.unwrap_or(after);
            self.parts.stager.retire(&mut tx, table, from, upto).await?;
        }
        self.parts
            .checkpoints
            .commit(&mut tx, &self.schema, upto)
            .await?;
        let retired = started.elapsed();
        tx.commit().await.map_err(SequenceError::Sql)?;
        tracing::debug!(
            schema = %self.schema,
            rows = count,
            write_ms = written.as_millis() as u64,
            retire_ms = (retired - written).as_millis() as u64,
            commit_ms = (started.elapsed() - retired).as_millis() as u64,
            "flushed"
        );
        self.parts.checkpoints.committed(&self.schema, upto);
        metrics::counter!(m::CORE_SWEEP_APPLY_COUNT, &schema_label(&self.schema))
            .increment(count as u64);
        Ok(())
    }
}
