//! How a flush's mutations are written: the foreign-key order (deletes from children to
//! parents, then upserts from parents to children), each table's batch handed through the
//! userscript's `map`/`deleteKey` and, for a table with `apply`, to the userscript instead of
//! the applier, and the reduction of each table's batch to the last version of each key. The
//! consistent window, the best-effort path, immediate mode and the poison search all write
//! through here. Table options (`configureTable`) are not handled here: the applier asks the
//! userscript for them itself.

use super::parts::SequenceError;
use crate::apply::{Applier, ApplyStats, SchemaInfo};
use crate::ident::Table;
use crate::mutation::{last_version_per_key, Mutation, TableBatches};
use crate::script::Userscript;
use sqlx::PgConnection;
use std::collections::HashMap;

/// Writes several tables' mutations in foreign-key order: deletes children first, upserts
/// parents first. Each table's batch goes through the userscript's `map`/`deleteKey` and is
/// then reduced to the last version of each key, the net effect of applying it in order. A
/// table whose userscript has `apply` gets its whole batch there, in the upsert pass.
pub(crate) async fn write_ordered(
    applier: &Applier,
    script: Option<&Userscript>,
    conn: &mut PgConnection,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Result<(), SequenceError> {
    write_ordered_counted(applier, script, conn, info, batches)
        .await
        .map(|_| ())
}

/// [`write_ordered`], adding up what the applier did (a table written by a userscript's
/// `apply` counts nothing).
pub(crate) async fn write_ordered_counted(
    applier: &Applier,
    script: Option<&Userscript>,
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
        let muts = match script {
            Some(s) if s.has_map(table) => {
                mapped = s.map(table, info, muts.clone()).await?;
                &mapped
            }
            _ => muts,
        };
        let last = last_version_per_key(muts);
        if script.is_some_and(|s| s.has_apply(table)) {
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
    for (table, pass) in write_order(info, batches, |t| scripted.contains_key(t)) {
        match pass {
            Pass::Deletes => {
                if let Some(muts) = deletes.get(table) {
                    stats.add(applier.apply(conn, table, muts).await?);
                }
            }
            Pass::Upserts => {
                if let Some(muts) = upserts.get(table) {
                    stats.add(applier.apply(conn, table, muts).await?);
                }
            }
            Pass::Script => {
                if let (Some(muts), Some(s)) = (scripted.get(table), script) {
                    s.apply(table, muts, conn, applier).await?;
                }
            }
        }
    }
    Ok(stats)
}

/// What one step of [`write_order`] writes to its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// The deletes among the last versions of its keys.
    Deletes,
    /// The upserts among them.
    Upserts,
    /// All of them, through the userscript's `apply`.
    Script,
}

/// The foreign-key write order of a batch, the one place it is decided: deletes from children
/// to parents, then upserts from parents to children, so no statement can violate a
/// reference the batch itself satisfies. A table whose userscript has `apply` (`scripted`)
/// writes everything in the second pass, in its parents-first place. Tables the schema does
/// not order come last in each pass.
pub(super) fn write_order<'a>(
    info: &'a SchemaInfo,
    batches: &'a TableBatches,
    scripted: impl Fn(&Table) -> bool,
) -> Vec<(&'a Table, Pass)> {
    let ordered: Vec<&Table> = info
        .levels
        .iter()
        .flatten()
        .filter(|t| batches.contains_key(*t))
        .collect();
    let unordered: Vec<&Table> = batches.keys().filter(|t| !ordered.contains(t)).collect();
    let mut out = Vec::with_capacity(2 * batches.len());
    for t in ordered.iter().rev().chain(unordered.iter()) {
        if !scripted(t) {
            out.push((*t, Pass::Deletes));
        }
    }
    for t in ordered.iter().chain(unordered.iter()) {
        out.push((
            *t,
            if scripted(t) {
                Pass::Script
            } else {
                Pass::Upserts
            },
        ));
    }
    out
}
