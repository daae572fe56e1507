//! Finding the mutations a target refuses: re-applying a batch one mutation at a time, each
//! under its own savepoint, so one bad row neither hides nor blocks the others.
//!
//! Best-effort ingest uses [`apply_each`] to apply what it can and defer the rest; the
//! consistent pipeline uses [`find_poison`] after a flush failed, to name the mutation that
//! blocks the schema (table, key, time) in its log line.

use super::parts::SequenceError;
use super::write::{write_order, write_ordered, Pass};
use crate::apply::{Applier, SchemaInfo};
use crate::hlc::Hlc;
use crate::ident::Table;
use crate::mutation::{last_version_per_key, Mutation, TableBatches};
use crate::script::Userscript;
use crate::target::Dialect;
use sqlx::{Connection, PgConnection, PgPool};

/// A mutation the target refused on its own (not because the database was unavailable).
#[derive(Debug)]
pub struct Poison {
    pub table: Table,
    /// Raw JSON key array: an identifier, never row values.
    pub key: String,
    pub time: Hlc,
    pub error: SequenceError,
}

impl Poison {
    /// The target's SQLSTATE, when the target raised the error.
    pub fn sqlstate(&self) -> Option<String> {
        match &self.error {
            SequenceError::Apply(e) => e.sqlstate(),
            SequenceError::Sql(e) => Some(crate::target::sqlstate(e)),
            _ => None,
        }
    }

    /// A foreign-key violation: the parent may simply not have arrived yet.
    pub fn is_foreign_key(&self) -> bool {
        self.sqlstate().as_deref() == Some("23503")
    }
}

/// Errors that say nothing about a mutation: the database is down, or the transaction must
/// be run again. These end the search instead of marking a mutation as poison.
pub(crate) fn is_transient(e: &SequenceError) -> bool {
    match e {
        SequenceError::Apply(a) => a.is_unavailable() || a.is_retryable(),
        other => other.is_unavailable(),
    }
}

/// Makes deferrable constraints (foreign keys declared `DEFERRABLE INITIALLY DEFERRED`) check
/// at each statement, so a violation surfaces at the mutation that causes it (and inside its
/// savepoint) rather than at commit. PostgreSQL only: CockroachDB has no deferred constraints.
pub(crate) async fn check_constraints_now(
    conn: &mut PgConnection,
    dialect: Dialect,
) -> Result<(), SequenceError> {
    if dialect == Dialect::Postgres {
        sqlx::query("SET CONSTRAINTS ALL IMMEDIATE")
            .execute(&mut *conn)
            .await
            .map_err(SequenceError::Sql)?;
    }
    Ok(())
}

/// Applies `batches` in `conn`'s transaction, keeping what the target accepts and returning
/// what it refused, in apply order. The order and reduction are those of [`write_ordered`]:
/// the last version of each key; deletes children first, then upserts (and userscript `apply`
/// tables) parents first. Each table's part is tried as a whole under a savepoint first, and
/// only when that fails one mutation at a time, each under its own savepoint. With
/// `first_only` the search stops at the first refusal.
///
/// A transient error (database unavailable, serialization failure) is returned as `Err`: the
/// transaction is then unusable and nothing is known about the mutations.
pub(crate) async fn apply_each(
    applier: &Applier,
    script: Option<&Userscript>,
    conn: &mut PgConnection,
    info: &SchemaInfo,
    batches: &TableBatches,
    first_only: bool,
) -> Result<Vec<Poison>, SequenceError> {
    let mut refused = Vec::new();
    for (table, part) in passes(script, info, batches) {
        if part.len() > 1
            && try_write(applier, script, conn, info, &table, &part)
                .await?
                .is_ok()
        {
            continue;
        }
        for mu in part {
            if let Err(error) = try_write(
                applier,
                script,
                conn,
                info,
                &table,
                std::slice::from_ref(&mu),
            )
            .await?
            {
                refused.push(Poison {
                    table: table.clone(),
                    key: mu.key,
                    time: mu.time,
                    error,
                });
                if first_only {
                    return Ok(refused);
                }
            }
        }
    }
    Ok(refused)
}

/// The first mutation of a failed flush that the target refuses on its own, found by
/// re-applying the flush one mutation at a time in a transaction that is then rolled back.
/// `None` when every mutation applies alone (the failure came from their combination, or
/// went away). The search has the flush's own order and reduction (see [`apply_each`]).
pub async fn find_poison(
    applier: &Applier,
    script: Option<&Userscript>,
    pool: &PgPool,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Result<Option<Poison>, SequenceError> {
    let mut tx = pool.begin().await.map_err(SequenceError::Sql)?;
    check_constraints_now(&mut tx, applier.dialect()).await?;
    let found = apply_each(applier, script, &mut tx, info, batches, true).await?;
    tx.rollback().await.map_err(SequenceError::Sql)?;
    Ok(found.into_iter().next())
}

/// Writes `muts` of `table` under a savepoint: `Ok(Ok)` kept, `Ok(Err)` refused and rolled
/// back, `Err` transient.
async fn try_write(
    applier: &Applier,
    script: Option<&Userscript>,
    conn: &mut PgConnection,
    info: &SchemaInfo,
    table: &Table,
    muts: &[Mutation],
) -> Result<Result<(), SequenceError>, SequenceError> {
    let mut batch = TableBatches::new();
    batch.insert(table.clone(), muts.to_vec());
    let mut sp = conn.begin().await.map_err(SequenceError::Sql)?;
    match write_ordered(applier, script, &mut sp, info, &batch).await {
        Ok(()) => {
            sp.commit().await.map_err(SequenceError::Sql)?;
            Ok(Ok(()))
        }
        Err(e) if is_transient(&e) => Err(e),
        Err(e) => {
            sp.rollback().await.map_err(SequenceError::Sql)?;
            Ok(Err(e))
        }
    }
}

/// The parts of `batches` in [`write_ordered`]'s order: per table, the last version of each
/// key; a pass of deletes (children first), then a pass of upserts (parents first). A table
/// whose userscript has `apply` gets all its mutations in the upsert pass, as there.
fn passes(
    script: Option<&Userscript>,
    info: &SchemaInfo,
    batches: &TableBatches,
) -> Vec<(Table, Vec<Mutation>)> {
    let scripted = |t: &Table| script.is_some_and(|s| s.has_apply(t));
    let mut out = Vec::new();
    for (t, pass) in write_order(info, batches, scripted) {
        let muts: Vec<Mutation> = last_version_per_key(&batches[t])
            .into_iter()
            .filter(|m| match pass {
                Pass::Deletes => m.is_delete(),
                Pass::Upserts => !m.is_delete(),
                Pass::Script => true,
            })
            .cloned()
            .collect();
        out.push((t.clone(), muts));
    }
    out.retain(|(_, muts)| !muts.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::Schema;
    use std::collections::BTreeMap;

    fn mu(t: i64, key: &str, delete: bool) -> Mutation {
        Mutation {
            time: Hlc::new(t, 0),
            key: key.into(),
            after: (!delete).then(|| "{}".to_string()),
            before: None,
        }
    }

    #[test]
    fn passes_delete_children_first_then_upsert_parents_first_with_last_versions() {
        let s = Schema::new("db", "public");
        let parent = Table::new(s.clone(), "parent");
        let child = Table::new(s.clone(), "child");
        let info = SchemaInfo {
            tables: BTreeMap::new(),
            levels: vec![vec![parent.clone()], vec![child.clone()]],
        };
        let mut batches = TableBatches::new();
        batches.insert(
            parent.clone(),
            vec![mu(1, "[1]", false), mu(2, "[1]", true), mu(1, "[2]", false)],
        );
        batches.insert(
            child.clone(),
            vec![mu(3, "[9]", true), mu(1, "[8]", false), mu(2, "[8]", false)],
        );
        type Pass = (String, Vec<(i64, String, bool)>);
        let got: Vec<Pass> = passes(None, &info, &batches)
            .into_iter()
            .map(|(t, ms)| {
                (
                    t.name.raw().to_string(),
                    ms.into_iter()
                        .map(|m| (m.time.nanos(), m.key.clone(), m.is_delete()))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("child".into(), vec![(3, "[9]".into(), true)]),
                ("parent".into(), vec![(2, "[1]".into(), true)]),
                ("parent".into(), vec![(1, "[2]".into(), false)]),
                ("child".into(), vec![(2, "[8]".into(), false)]),
            ]
        );
    }
}
