//! Conditional apply: compare-and-set and deadline upserts, CAS-guarded deletes, and the
//! resolution of their losers by a merge function.
//!
//! Per batch: plain deletes, guarded deletes and conditional upserts each return their losers;
//! without a merge function the losers are dropped (and counted). With one, the losers' target
//! rows are read back and locked, the merger is called once, and its answers are written:
//! rows unconditionally, dead letters to the DLQ table. Everything runs inside one savepoint
//! (or transaction), so a failing merge leaves nothing behind.

use super::mapping::{Array, Batch, Chunk, Plan};
use super::merge::{Conflict, ConflictMeta, MergeError, Resolution, Row};
use super::sql::Param;
use super::{Applier, ApplyError, ApplyStats, Failure};
use crate::ident::Table;
use crate::mutation::Mutation;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row as _};
use std::collections::HashMap;

type Query<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

/// Binds a chunk's arrays in parameter order.
pub(crate) fn bind<'q>(mut q: Query<'q>, chunk: &'q Chunk) -> Query<'q> {
    for a in &chunk.arrays {
        q = match a {
            Array::Text(v) => q.bind(v.as_slice()),
            Array::Bool(v) => q.bind(v.as_slice()),
        };
    }
    q
}

/// Rows a conditional statement did not write.
#[derive(Default)]
struct Unwritten {
    /// Input offsets of the conflicts, in batch order.
    conflicts: Vec<usize>,
    /// Rows that neither were written nor conflict (nothing to delete, expired and new).
    skipped: u64,
}

/// Runs `sql` once per chunk; maps the returned 1-based positions to input offsets.
async fn unwritten(
    conn: &mut PgConnection,
    sql: &str,
    chunks: &[Chunk],
    offsets: &[usize],
) -> Result<Unwritten, sqlx::Error> {
    let mut out = Unwritten::default();
    let mut start = 0;
    for chunk in chunks {
        let rows: Vec<PgRow> = bind(sqlx::query(sql), chunk).fetch_all(&mut *conn).await?;
        let mut positions = Vec::with_capacity(rows.len());
        for r in rows {
            let i: i64 = r.try_get(0)?;
            let conflict: bool = r.try_get(1)?;
            if !conflict {
                out.skipped += 1;
                continue;
            }
            positions.extend(usize::try_from(i - 1).ok().map(|i| start + i));
        }
        // Batch order, so mergers see conflicts in a stable order.
        positions.sort_unstable();
        out.conflicts.extend(
            positions
                .into_iter()
                .filter_map(|at| offsets.get(at).copied()),
        );
        start += chunk.rows;
    }
    Ok(out)
}

impl Applier {
    /// Applies a prepared batch of a table with CAS columns or deadlines inside a savepoint
    /// (a transaction when `conn` has none).
    pub(crate) async fn apply_conditional(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        plan: &Plan,
        batch: &Batch,
        muts: &[Mutation],
    ) -> Result<ApplyStats, Failure> {
        let mut tx = conn.begin().await.map_err(Failure::Sql)?;
        match self.conditional(&mut tx, table, plan, batch, muts).await {
            Ok(stats) => {
                tx.commit().await.map_err(Failure::Sql)?;
                Ok(stats)
            }
            Err(e) => {
                // Keeps the caller's transaction usable (and our retry possible).
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    async fn conditional(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        plan: &Plan,
        batch: &Batch,
        muts: &[Mutation],
    ) -> Result<ApplyStats, Failure> {
        let Some(cond) = &plan.conditional else {
            return Err(Failure::Apply(ApplyError::Config(format!(
                "{table} has no compare-and-set or deadline columns"
            ))));
        };
        let mut stats = batch.stats;
        for chunk in &batch.deletes {
            bind(sqlx::query(&plan.delete_sql), chunk)
                .execute(&mut *conn)
                .await
                .map_err(Failure::Sql)?;
        }
        let mut lost = Vec::new();
        if let Some(guard) = &cond.guard_sql {
            let u = unwritten(conn, guard, &batch.guarded, &batch.guarded_rows)
                .await
                .map_err(Failure::Sql)?;
            stats.deletes = stats
                .deletes
                .saturating_sub(u.conflicts.len() as u64 + u.skipped);
            lost = u.conflicts;
        }
        let u = unwritten(conn, &cond.upsert_sql, &batch.upserts, &batch.upsert_rows)
            .await
            .map_err(Failure::Sql)?;
        stats.upserts = stats
            .upserts
            .saturating_sub(u.conflicts.len() as u64 + u.skipped);
        lost.extend(u.conflicts);
        stats.conflicts = lost.len() as u64;
        if lost.is_empty() {
            return Ok(stats);
        }
        let Some(merge) = &plan.config.merge else {
            tracing::debug!(table = %table, conflicts = lost.len(), "dropped compare-and-set losers");
            return Ok(stats);
        };

        let targets = self.read_targets(conn, plan, muts, &lost).await?;
        let primary_key = plan.primary_key();
        let mut conflicts = Vec::with_capacity(lost.len());
        let mut sources = Vec::with_capacity(lost.len());
        for (j, &at) in lost.iter().enumerate() {
            let m = &muts[at];
            let target = targets.get(&j).cloned();
            if m.is_delete() && target.is_none() {
                // The row is gone already: the delete has nothing left to refuse.
                continue;
            }
            let image = |json: &Option<String>| json.as_deref().map(|j| plan.image(j)).transpose();
            conflicts.push(Conflict {
                before: image(&m.before).map_err(Failure::Apply)?,
                proposed: image(&m.after).map_err(Failure::Apply)?,
                target,
                meta: ConflictMeta {
                    table: table.clone(),
                    time: m.time,
                    primary_key: primary_key.clone(),
                },
                unmerged: Vec::new(),
            });
            sources.push(m);
        }
        if conflicts.is_empty() {
            return Ok(stats);
        }
        let asked = conflicts.len();
        let merge_error = |error: MergeError| {
            Failure::Apply(ApplyError::Merge {
                table: table.to_string(),
                error,
            })
        };
        let answers = merge.0.merge(conflicts).await.map_err(merge_error)?;
        if answers.len() != asked {
            return Err(merge_error(MergeError::Failed(format!(
                "answered {} resolutions for {asked} conflicts",
                answers.len()
            ))));
        }
        let mut rows: Vec<Row> = Vec::new();
        let mut dead: Vec<(String, &Mutation)> = Vec::new();
        for (answer, m) in answers.into_iter().zip(sources) {
            match answer {
                Resolution::Apply(row) => rows.push(row),
                Resolution::Dlq(name) => dead.push((name, m)),
                Resolution::Drop => {}
            }
        }
        if !rows.is_empty() {
            let chunks = plan.prepare_rows(&rows).map_err(Failure::Apply)?;
            for chunk in &chunks {
                bind(sqlx::query(&plan.upsert_sql), chunk)
                    .execute(&mut *conn)
                    .await
                    .map_err(Failure::Sql)?;
            }
        }
        self.dead_letter(conn, table, &dead)
            .await
            .map_err(Failure::Apply)?;
        stats.resolved = rows.len() as u64;
        stats.dead_lettered = dead.len() as u64;
        tracing::debug!(table = %table, conflicts = asked, applied = rows.len(),
            dead_lettered = dead.len(), "resolved compare-and-set losers");
        Ok(stats)
    }

    /// Reads and locks the target rows of the losers (by position in `lost`).
    async fn read_targets(
        &self,
        conn: &mut PgConnection,
        plan: &Plan,
        muts: &[Mutation],
        lost: &[usize],
    ) -> Result<HashMap<usize, Row>, Failure> {
        let Some(cond) = &plan.conditional else {
            return Ok(HashMap::new());
        };
        let params = cond.read_params();
        let mut out = HashMap::new();
        if params.is_empty() {
            return Ok(out);
        }
        for (n, group) in lost.chunks(plan.config.row_limit()).enumerate() {
            let first = n * plan.config.row_limit();
            let mut arrays: Vec<Vec<Option<String>>> =
                vec![Vec::with_capacity(group.len()); params.len()];
            for &at in group {
                let key = plan.read_key(&muts[at]).map_err(Failure::Apply)?;
                for (a, v) in arrays.iter_mut().zip(key) {
                    a.push(v);
                }
            }
            let mut q = sqlx::query(&cond.read_sql);
            for (a, p) in arrays.iter().zip(params) {
                debug_assert_eq!(*p, Param::Text);
                q = q.bind(a.as_slice());
            }
            let rows: Vec<PgRow> = q.fetch_all(&mut *conn).await.map_err(Failure::Sql)?;
            for r in rows {
                let i: i64 = r.try_get(0).map_err(Failure::Sql)?;
                let texts: Vec<Option<String>> = r.try_get(1).map_err(Failure::Sql)?;
                let Ok(i) = usize::try_from(i - 1) else {
                    continue;
                };
                let image = plan.target_image(texts).map_err(Failure::Apply)?;
                out.insert(first + i, image);
            }
        }
        Ok(out)
    }
}
