//! Best-effort ingest: apply each request to the target at once where that keeps each key's
//! order, stage the rest for the consistent pipeline.
//!
//! Per request, in one target transaction (staging lives in the target database):
//! 1. mutations whose key already has staged rows are staged behind them
//!    ([`Stager::stage_if_exists`](crate::stage::Stager::stage_if_exists));
//! 2. the others are written like a consistent flush ([`write_ordered`]: userscript `map`,
//!    CAS, merge, DLQ, `apply`; foreign-key order) under a savepoint;
//! 3. if that fails, they are written again one table, then one mutation at a time, each under
//!    its own savepoint ([`poison::apply_each`]); every version of a key the target refuses is
//!    staged ("deferred").
//!
//! The request succeeds once everything is applied or staged, and the commit makes both
//! durable together. Deferred rows wait for a resolved timestamp: the consistent pipeline then
//! applies the window `(committed, resolved]`, which holds exactly the staged rows.
//!
//! Ordering with the pipeline: a key is applied directly only when it has no staged rows. The
//! pipeline applies staged rows and deletes them in the same transaction, so "no staged rows"
//! means every older staged version of the key is already in the target: a sweep can never
//! write an older version over a newer one applied here. What this relies on is that a
//! changefeed does not send two versions of one key concurrently (CockroachDB sends a key's
//! next version only after the batch carrying the previous one was acknowledged); if it did,
//! the older one could be staged after the newer one was checked and applied, and would be
//! swept over it. Redelivered older versions are applied again, as the Go cdc-sink does when it writes directly:
//! direct writes leave no trace in staging to compare with.

use super::parts::{Parts, SequenceError};
use super::poison::{self, check_constraints_now, is_transient, Poison};
use super::write::write_ordered;
use crate::apply::SchemaInfo;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::mutation::TableBatches;
use sqlx::Connection;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Serialization failures and deadlocks between concurrent requests: run the request again.
const ATTEMPTS: u32 = 3;

/// What one request did, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Mutations written to the target.
    pub applied: u64,
    /// Mutations staged instead: behind staged versions of their key, or refused.
    pub deferred: u64,
    /// Mutations the target refused (also in `deferred`).
    pub refused: u64,
}

/// Accepts one request in best-effort mode.
pub(crate) async fn accept(
    parts: &Parts,
    schema: &Schema,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Result<(), SequenceError> {
    let started = Instant::now();
    let mut attempt = 1;
    let (counts, refused) = loop {
        match accept_once(parts, info, batches).await {
            Err(e) if attempt < ATTEMPTS && is_serialization(&e) => {
                tracing::debug!(schema = %schema, error = %crate::error::ErrorChain(&e), "best-effort request conflicted; retrying");
                attempt += 1;
            }
            other => break other?,
        }
    };
    for p in &refused {
        if p.is_foreign_key() {
            tracing::debug!(table = %p.table, key = %p.key, time = %p.time, "foreign key not satisfied yet; mutation deferred to staging");
        } else {
            tracing::warn!(table = %p.table, time = %p.time, code = p.sqlstate().as_deref().unwrap_or("none"), error = %crate::error::ErrorChain(&p.error), "target refused a mutation; deferred to staging");
            tracing::debug!(table = %p.table, key = %p.key, time = %p.time, "refused mutation key");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    for (table, c) in counts {
        let l = [
            (m::LABEL_SCHEMA, schema.to_string()),
            (m::LABEL_TABLE, table.name.raw().to_string()),
        ];
        metrics::counter!(m::BEST_EFFORT_APPLIED, &l).increment(c.applied);
        metrics::counter!(m::BEST_EFFORT_DEFERRED, &l).increment(c.deferred);
        metrics::counter!(m::BEST_EFFORT_ERRORS, &l).increment(c.refused);
        metrics::histogram!(m::BEST_EFFORT_DURATION, &l).record(elapsed);
    }
    Ok(())
}

type Outcome = (HashMap<Table, Counts>, Vec<Poison>);

async fn accept_once(
    parts: &Parts,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Result<Outcome, SequenceError> {
    let stager = &parts.stager;
    let script = parts.script.as_ref();
    let mut tx = parts.target.begin().await.map_err(SequenceError::Sql)?;
    check_constraints_now(&mut tx, stager.dialect()).await?;

    let queued = stager.stage_if_exists(&mut tx, batches).await?;
    let mut direct = TableBatches::new();
    for (table, muts) in batches {
        let queued = queued.get(table);
        let free: Vec<_> = muts
            .iter()
            .filter(|mu| !queued.is_some_and(|q| q.contains(&mu.key)))
            .cloned()
            .collect();
        if !free.is_empty() {
            direct.insert(table.clone(), free);
        }
    }

    let mut refused = Vec::new();
    if !direct.is_empty() {
        let mut sp = tx.begin().await.map_err(SequenceError::Sql)?;
        match write_ordered(&parts.applier, script, &mut sp, info, &direct).await {
            Ok(()) => sp.commit().await.map_err(SequenceError::Sql)?,
            Err(e) if is_transient(&e) => return Err(e),
            Err(e) => {
                sp.rollback().await.map_err(SequenceError::Sql)?;
                tracing::debug!(error = %crate::error::ErrorChain(&e), "best-effort batch refused; applying mutations one at a time");
                refused = poison::apply_each(&parts.applier, script, &mut tx, info, &direct, false)
                    .await?;
            }
        }
    }

    // Every version of a refused key waits in staging, so the key keeps its order.
    let bad: HashSet<(&Table, &str)> = refused.iter().map(|p| (&p.table, p.key.as_str())).collect();
    let mut deferred = TableBatches::new();
    let mut counts: HashMap<Table, Counts> = HashMap::new();
    for (table, muts) in batches {
        let c = counts.entry(table.clone()).or_default();
        let direct_muts = direct.get(table).map(Vec::as_slice).unwrap_or_default();
        c.deferred += (muts.len() - direct_muts.len()) as u64;
        for mu in direct_muts {
            if bad.contains(&(table, mu.key.as_str())) {
                c.deferred += 1;
                deferred.entry(table.clone()).or_default().push(mu.clone());
            } else {
                c.applied += 1;
            }
        }
    }
    for p in &refused {
        counts.entry(p.table.clone()).or_default().refused += 1;
    }
    stager.stage_on(&mut tx, &deferred).await?;
    tx.commit().await.map_err(SequenceError::Sql)?;
    Ok((counts, refused))
}

/// A conflict with a concurrent transaction (serialization failure, deadlock, a schema change
/// seen mid-transaction): the same request may well succeed at once.
fn is_serialization(e: &SequenceError) -> bool {
    let code = match e {
        SequenceError::Apply(a) if a.is_retryable() => return true,
        SequenceError::Apply(a) => a.sqlstate(),
        SequenceError::Sql(s) => Some(crate::target::sqlstate(s)),
        SequenceError::Stage(s) => s.sqlstate(),
        _ => None,
    };
    matches!(code.as_deref(), Some("40001" | "40P01"))
}
