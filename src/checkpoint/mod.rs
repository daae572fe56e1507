//! Resolved timestamps (checkpoints) and leases, both kept in the staging schema.
//!
//! A resolved timestamp is recorded as a *proposed* checkpoint of its schema; once the window
//! up to it has been applied, it is *committed* (`target_applied_at` set), possibly in steps
//! inside the window, each at the end of a run of applied transactions. A lease per schema
//! elects the one instance that applies it.

mod applied;
mod lease;

use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::metrics as m;
use crate::stage::StagingSchema;
use crate::target::{self, Database, Dialect};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub(crate) use applied::{AppliedRanges, Ranges, TABLE as APPLIED_RANGES_TABLE};
pub(crate) use lease::{Lease, Leases};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "proposed checkpoint timestamp for group={group}, partition={group} is going backwards: \
{proposed} < {newest}; verify changefeed cursor or remove already-applied checkpoint timestamp entries"
    )]
    Backwards {
        group: String,
        proposed: Hlc,
        newest: Hlc,
    },
    #[error("resolved timestamp must not be zero")]
    Zero,
    #[error("checkpoint storage error")]
    Sql(#[source] sqlx::Error),
    #[error("stored checkpoint {0:?} is not a valid timestamp")]
    Corrupt(String),
    #[error(
        "the apply lease of {group} is held by {holder} until {expires}: stop the instances \
serving it (or wait for the lease to expire), or pass --force to revoke the lease"
    )]
    LeaseHeld {
        group: String,
        holder: String,
        expires: String,
    },
}

impl CheckpointError {
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(self, CheckpointError::Sql(e) if target::is_unavailable(e))
    }

    /// Caused by the request (400) rather than by us.
    pub(crate) fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CheckpointError::Backwards { .. } | CheckpointError::Zero
        )
    }
}

/// The checkpoint range of a schema: everything at or before `committed` is applied; the
/// window `(committed, proposed]` is complete and waits to be applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) committed: Hlc,
    pub(crate) proposed: Hlc,
}

/// The `checkpoints` table.
pub struct Checkpoints {
    db: Database,
    table: String,
    /// Last known bounds per schema; a lower bound of the truth, used to drop redeliveries.
    cache: Mutex<HashMap<Schema, Bounds>>,
    /// When each schema's bounds were last read from the table (or claimed for a read).
    read: Mutex<HashMap<Schema, Instant>>,
}

impl Checkpoints {
    pub(crate) async fn open(
        db: Database,
        staging: &StagingSchema,
    ) -> Result<Arc<Checkpoints>, CheckpointError> {
        let table = staging.object("checkpoints");
        target::run_ddl(&db, &ddl(db.dialect, &table))
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(Arc::new(Checkpoints {
            db,
            table,
            cache: Mutex::new(HashMap::new()),
            read: Mutex::new(HashMap::new()),
        }))
    }

    /// Records a resolved timestamp for `schema`. An equal timestamp is an idempotent
    /// redelivery; an older one than the newest stored is refused.
    pub(crate) async fn advance(&self, schema: &Schema, ts: Hlc) -> Result<(), CheckpointError> {
        if ts.is_zero() {
            return Err(CheckpointError::Zero);
        }
        let started = Instant::now();
        let group = schema.canonical();
        let stmt = format!(
            "WITH newest AS (SELECT max(source_hlc) AS hlc FROM {t} WHERE group_name = $1 AND partition = $1), \
ins AS (INSERT INTO {t} (group_name, source_hlc, partition) \
SELECT $1, $2::DECIMAL, $1 FROM newest WHERE newest.hlc IS NULL OR newest.hlc <= $2::DECIMAL \
ON CONFLICT DO NOTHING RETURNING 1) \
SELECT (SELECT hlc::TEXT FROM newest), (SELECT count(*) FROM ins)",
            t = self.table
        );
        let row = target::retry(|| {
            sqlx::query(&stmt)
                .bind(&group)
                .bind(ts.to_decimal())
                .fetch_one(&self.db.pool)
        })
        .await
        .map_err(CheckpointError::Sql)?;
        metrics::histogram!(m::CHECKPOINT_ADVANCE_DURATION, m::LABEL_SCHEMA => schema.to_string())
            .record(started.elapsed().as_secs_f64());
        let newest: Option<String> = row.try_get(0).map_err(CheckpointError::Sql)?;
        if let Some(newest) = newest {
            let newest = parse_decimal(&newest)?;
            if ts < newest {
                metrics::counter!(m::CHECKPOINT_BACKWARDS, m::LABEL_SCHEMA => schema.to_string())
                    .increment(1);
                return Err(CheckpointError::Backwards {
                    group,
                    proposed: ts,
                    newest,
                });
            }
        }
        let mut cache = self.cache.lock().expect("poisoned");
        let b = cache.entry(schema.clone()).or_default();
        b.proposed = b.proposed.max(ts);
        Ok(())
    }

    /// Reads the current bounds of `schema` from the table; the cache follows them, downwards
    /// too (after `cdc-sink checkpoint reset`).
    pub(crate) async fn bounds(&self, schema: &Schema) -> Result<Bounds, CheckpointError> {
        let started = Instant::now();
        self.read
            .lock()
            .expect("poisoned")
            .insert(schema.clone(), started);
        let stmt = format!(
            "SELECT (SELECT max(source_hlc)::TEXT FROM {t} WHERE group_name = $1 AND target_applied_at IS NOT NULL), \
(SELECT max(source_hlc)::TEXT FROM {t} WHERE group_name = $1)",
            t = self.table
        );
        let row = sqlx::query(&stmt)
            .bind(schema.canonical())
            .fetch_one(&self.db.pool)
            .await
            .map_err(CheckpointError::Sql)?;
        let committed: Option<String> = row.try_get(0).map_err(CheckpointError::Sql)?;
        let proposed: Option<String> = row.try_get(1).map_err(CheckpointError::Sql)?;
        let committed = committed
            .as_deref()
            .map(parse_decimal)
            .transpose()?
            .unwrap_or(Hlc::ZERO);
        let proposed = proposed
            .as_deref()
            .map(parse_decimal)
            .transpose()?
            .unwrap_or(Hlc::ZERO)
            .max(committed);
        let bounds = Bounds {
            committed,
            proposed,
        };
        metrics::histogram!(m::CHECKPOINT_REFRESH_DURATION, m::LABEL_SCHEMA => schema.to_string())
            .record(started.elapsed().as_secs_f64());
        self.follow(schema, bounds);
        Ok(bounds)
    }

    /// The last known committed checkpoint of `schema` (from this process's view).
    pub(crate) fn cached_committed(&self, schema: &Schema) -> Hlc {
        self.cache
            .lock()
            .expect("poisoned")
            .get(schema)
            .map(|b| b.committed)
            .unwrap_or(Hlc::ZERO)
    }

    /// The newest resolved timestamp of `schema` this process knows of (from its view).
    pub(crate) fn cached_proposed(&self, schema: &Schema) -> Hlc {
        self.cache
            .lock()
            .expect("poisoned")
            .get(schema)
            .map(|b| b.proposed)
            .unwrap_or(Hlc::ZERO)
    }

    /// Records bounds this process made durable itself: they only raise the cache, since a
    /// read of the table racing the commit may already have set it.
    fn observe(&self, schema: &Schema, bounds: Bounds) {
        {
            let mut cache = self.cache.lock().expect("poisoned");
            let b = cache.entry(schema.clone()).or_default();
            b.committed = b.committed.max(bounds.committed);
            b.proposed = b.proposed.max(bounds.proposed);
        }
        self.gauges(schema, bounds);
    }

    /// Records bounds read from the table. They replace the cache even when lower: a read
    /// that raced a commit of this process is lower than the truth, which only stages a few
    /// redeliveries the window never reads (no window comes from the cache), while a reset
    /// checkpoint is followed at once.
    fn follow(&self, schema: &Schema, bounds: Bounds) {
        self.cache
            .lock()
            .expect("poisoned")
            .insert(schema.clone(), bounds);
        self.gauges(schema, bounds);
    }

    fn gauges(&self, schema: &Schema, bounds: Bounds) {
        let now = Hlc::from_system_time(std::time::SystemTime::now()).seconds();
        let s = schema.to_string();
        let kind = [
            (m::LABEL_KIND, "cdc".to_string()),
            (m::LABEL_TARGET, s.clone()),
        ];
        if !bounds.committed.is_zero() {
            metrics::gauge!(m::TARGET_APPLIED_TIMESTAMP, &kind).set(bounds.committed.seconds());
            metrics::gauge!(m::TARGET_LAG, &kind).set(now - bounds.committed.seconds());
            metrics::gauge!(m::CHECKPOINT_COMMITTED_TIME, m::LABEL_SCHEMA => s.clone())
                .set(bounds.committed.seconds());
            metrics::gauge!(m::CHECKPOINT_COMMITTED_AGE, m::LABEL_SCHEMA => s.clone())
                .set(now - bounds.committed.seconds());
        }
        if !bounds.proposed.is_zero() {
            metrics::gauge!(m::TARGET_PENDING_TIMESTAMP, &kind).set(bounds.proposed.seconds());
            metrics::gauge!(m::SOURCE_LAG, &kind).set(now - bounds.proposed.seconds());
            metrics::gauge!(m::CHECKPOINT_PROPOSED_TIME, m::LABEL_SCHEMA => s.clone())
                .set(bounds.proposed.seconds());
            metrics::gauge!(m::CHECKPOINT_PROPOSED_AGE, m::LABEL_SCHEMA => s)
                .set(now - bounds.proposed.seconds());
        }
    }

    /// Commits `upto` for `schema` inside the caller's transaction: everything at or before
    /// it is applied. `upto` may lie inside a resolved window (a window applied in several
    /// transactions commits as it goes), so it is written as its own row; older rows, applied
    /// or not, are covered by it and removed.
    pub(crate) async fn commit(
        &self,
        conn: &mut PgConnection,
        schema: &Schema,
        upto: Hlc,
    ) -> Result<(), CheckpointError> {
        let started = Instant::now();
        let group = schema.canonical();
        let del = format!(
            "DELETE FROM {t} WHERE group_name = $1 AND source_hlc < $2::DECIMAL",
            t = self.table
        );
        sqlx::query(&del)
            .bind(&group)
            .bind(upto.to_decimal())
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        let upsert = format!(
            "INSERT INTO {t} (group_name, source_hlc, partition, target_applied_at) VALUES ($1, $2::DECIMAL, $1, now()) \
ON CONFLICT (group_name, source_hlc, partition) DO UPDATE SET target_applied_at = excluded.target_applied_at",
            t = self.table
        );
        sqlx::query(&upsert)
            .bind(&group)
            .bind(upto.to_decimal())
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        metrics::histogram!(m::CHECKPOINT_COMMIT_DURATION, m::LABEL_SCHEMA => schema.to_string())
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Records that a commit made by this process became durable.
    pub(crate) fn committed(&self, schema: &Schema, upto: Hlc) {
        let proposed = self
            .cache
            .lock()
            .expect("poisoned")
            .get(schema)
            .map(|b| b.proposed)
            .unwrap_or(upto);
        self.observe(
            schema,
            Bounds {
                committed: upto,
                proposed: proposed.max(upto),
            },
        );
    }

    /// Schemas with proposed but unapplied checkpoints: their pipelines start at once on
    /// start-up so staged data is applied without waiting for new traffic.
    pub(crate) async fn pending_schemas(&self) -> Result<Vec<Schema>, CheckpointError> {
        let stmt = format!(
            "SELECT DISTINCT group_name FROM {t} WHERE target_applied_at IS NULL",
            t = self.table
        );
        let names: Vec<String> = sqlx::query_scalar(&stmt)
            .fetch_all(&self.db.pool)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(names.iter().filter_map(|n| Schema::parse(n).ok()).collect())
    }
}

/// One schema's checkpoint rows, as `cdc-sink checkpoint show` prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GroupBounds {
    /// The schema as stored (`group_name`).
    pub(crate) group: String,
    pub(crate) bounds: Bounds,
}

/// What [`Checkpoints::reset`] found newer than the reset point (and removes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ResetPlan {
    /// Rows newer than the reset point.
    pub(crate) rows: u64,
    /// The newest committed row among them: when set, the reset point is committed instead.
    pub(crate) committed: Option<Hlc>,
    /// The instance holding the schema's lease and when the lease expires (a reset refuses
    /// unless forced, which revokes it).
    pub(crate) lease_holder: Option<(String, String)>,
}

impl Checkpoints {
    /// The committed checkpoint of `schema`, read from the table first when this process's
    /// view of it is older than `max_age` (one reader at a time; a failed read keeps the view).
    pub(crate) async fn fresh_committed(
        &self,
        schema: &Schema,
        max_age: std::time::Duration,
    ) -> Hlc {
        let due = {
            let mut read = self.read.lock().expect("poisoned");
            match read.get(schema) {
                Some(t) if t.elapsed() < max_age => false,
                _ => {
                    read.insert(schema.clone(), Instant::now());
                    true
                }
            }
        };
        if due {
            if let Err(e) = self.bounds(schema).await {
                tracing::debug!(schema = %schema, error = %crate::error::ErrorChain(&e), "could not refresh the committed checkpoint");
            }
        }
        self.cached_committed(schema)
    }

    /// Every schema's bounds, by name.
    pub(crate) async fn groups(&self) -> Result<Vec<GroupBounds>, CheckpointError> {
        let stmt = format!(
            "SELECT group_name, max(source_hlc) FILTER (WHERE target_applied_at IS NOT NULL)::TEXT, \
max(source_hlc)::TEXT FROM {t} GROUP BY group_name ORDER BY group_name",
            t = self.table
        );
        let rows: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(&stmt)
            .fetch_all(&self.db.pool)
            .await
            .map_err(CheckpointError::Sql)?;
        let hlc = |s: Option<String>| -> Result<Hlc, CheckpointError> {
            Ok(s.as_deref()
                .map(parse_decimal)
                .transpose()?
                .unwrap_or(Hlc::ZERO))
        };
        rows.into_iter()
            .map(|(group, c, p)| {
                let committed = hlc(c)?;
                let proposed = hlc(p)?.max(committed);
                Ok(GroupBounds {
                    group,
                    bounds: Bounds {
                        committed,
                        proposed,
                    },
                })
            })
            .collect()
    }

    /// What a reset of `schema` to `to` would remove; `execute` also does it, in one
    /// transaction that first locks the schema's lease row in `leases_table` (`lease_name`).
    /// While the lease is held (unexpired) the reset is refused with
    /// [`CheckpointError::LeaseHeld`] unless `force`, which deletes the row: that waits for
    /// every open flush transaction of the holder (they lock the row to fence) and makes its
    /// next fence or renewal fail, so the holder abandons the window it was applying and
    /// starts again from the table. When a committed row is removed, `to` becomes the
    /// committed checkpoint (the target holds everything up to the removed one, so everything
    /// up to `to` too); otherwise only proposed rows go.
    pub(crate) async fn reset(
        &self,
        schema: &Schema,
        to: Hlc,
        tables: ResetTables<'_>,
        execute: bool,
        force: bool,
    ) -> Result<ResetPlan, CheckpointError> {
        let ResetTables {
            leases: leases_table,
            lease_name,
            ranges: ranges_table,
        } = tables;
        let group = schema.canonical();
        let mut tx = self.db.begin().await.map_err(CheckpointError::Sql)?;
        let lock = if execute { " FOR UPDATE" } else { "" };
        let lease_holder: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT hostname, expires::TEXT FROM {leases_table} WHERE name = $1 AND expires > now(){lock}"
        ))
        .bind(lease_name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(CheckpointError::Sql)?;
        if execute {
            if let (Some((holder, expires)), false) = (&lease_holder, force) {
                return Err(CheckpointError::LeaseHeld {
                    group,
                    holder: holder.clone(),
                    expires: expires.clone(),
                });
            }
            // Forced, or the lease expired: its holder must start again from the table.
            sqlx::query(&format!("DELETE FROM {leases_table} WHERE name = $1"))
                .bind(lease_name)
                .execute(&mut *tx)
                .await
                .map_err(CheckpointError::Sql)?;
        }
        let stmt = format!(
            "SELECT count(*), max(source_hlc) FILTER (WHERE target_applied_at IS NOT NULL)::TEXT \
FROM {t} WHERE group_name = $1 AND source_hlc > $2::DECIMAL",
            t = self.table
        );
        let (rows, committed): (i64, Option<String>) = sqlx::query_as(&stmt)
            .bind(&group)
            .bind(to.to_decimal())
            .fetch_one(&mut *tx)
            .await
            .map_err(CheckpointError::Sql)?;
        let plan = ResetPlan {
            rows: rows as u64,
            committed: committed.as_deref().map(parse_decimal).transpose()?,
            lease_holder,
        };
        if !execute {
            return Ok(plan);
        }
        let del = format!(
            "DELETE FROM {t} WHERE group_name = $1 AND source_hlc > $2::DECIMAL",
            t = self.table
        );
        sqlx::query(&del)
            .bind(&group)
            .bind(to.to_decimal())
            .execute(&mut *tx)
            .await
            .map_err(CheckpointError::Sql)?;
        // Ranges applied beyond `to` would make windows skip the rows a replay re-sends.
        sqlx::query(&applied::reset_sql(ranges_table))
            .bind(&group)
            .bind(to.to_decimal())
            .execute(&mut *tx)
            .await
            .map_err(CheckpointError::Sql)?;
        if plan.committed.is_some() {
            self.commit(&mut tx, schema, to).await?;
        }
        tx.commit().await.map_err(CheckpointError::Sql)?;
        self.bounds(schema).await?;
        Ok(plan)
    }
}

/// The other staging tables a checkpoint reset changes (quoted names), and the schema's lease.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ResetTables<'a> {
    pub(crate) leases: &'a str,
    pub(crate) lease_name: &'a str,
    pub(crate) ranges: &'a str,
}

/// `DECIMAL` text `nanos.logical` back to an HLC. The logical part has 10 digits when written
/// by us; other spellings (fewer digits, trailing zeros trimmed) are right-padded.
fn parse_decimal(s: &str) -> Result<Hlc, CheckpointError> {
    let (n, l) = s.split_once('.').unwrap_or((s, "0"));
    let nanos: i64 = n
        .parse()
        .map_err(|_| CheckpointError::Corrupt(s.to_string()))?;
    let mut l = l.to_string();
    if l.len() > 10 {
        if l[10..].bytes().any(|b| b != b'0') {
            return Err(CheckpointError::Corrupt(s.to_string()));
        }
        l.truncate(10);
    }
    while l.len() < 10 {
        l.push('0');
    }
    let logical: i32 = l
        .parse()
        .map_err(|_| CheckpointError::Corrupt(s.to_string()))?;
    Ok(Hlc::new(nanos, logical))
}

/// The checkpoints table, shaped like the reference's so an existing staging database keeps
/// working (CockroachDB adds its virtual convenience columns).
fn ddl(dialect: Dialect, table: &str) -> Vec<String> {
    match dialect {
        Dialect::Postgres => vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
group_name TEXT NOT NULL, source_hlc DECIMAL NOT NULL, partition TEXT NOT NULL, \
first_seen TIMESTAMPTZ NOT NULL DEFAULT now(), target_applied_at TIMESTAMPTZ, \
PRIMARY KEY (group_name, source_hlc, partition))"
        )],
        Dialect::Cockroach => vec![format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
group_name STRING NOT NULL, source_hlc DECIMAL NOT NULL, partition STRING NOT NULL, \
first_seen TIMESTAMPTZ NOT NULL DEFAULT now(), target_applied_at TIMESTAMPTZ, \
source_nanos INT8 AS (floor(source_hlc)::INT8) VIRTUAL, \
source_logical INT8 AS (((source_hlc - floor(source_hlc)) * 1e10)::INT8) VIRTUAL, \
source_wall_time TIMESTAMPTZ AS (to_timestamp(floor(source_hlc)::FLOAT8 / 1e9)) VIRTUAL, \
PRIMARY KEY (group_name, source_hlc, partition), \
INDEX (group_name, target_applied_at, partition))"
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_checkpoints_round_trip() {
        let h = Hlc::new(1586019746136571000, 1);
        assert_eq!(parse_decimal(&h.to_decimal()).unwrap(), h);
        assert_eq!(parse_decimal("5").unwrap(), Hlc::new(5, 0));
        assert_eq!(parse_decimal("5.00000000010000").unwrap(), Hlc::new(5, 1));
        assert_eq!(parse_decimal("5.1").unwrap(), Hlc::new(5, 1_000_000_000));
        assert!(parse_decimal("x.1").is_err());
    }

    #[test]
    fn golden_checkpoint_ddl() {
        let pg = ddl(Dialect::Postgres, "\"_cdc_sink\".\"checkpoints\"");
        assert_eq!(pg, ["CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"checkpoints\" (group_name TEXT NOT NULL, source_hlc DECIMAL NOT NULL, partition TEXT NOT NULL, first_seen TIMESTAMPTZ NOT NULL DEFAULT now(), target_applied_at TIMESTAMPTZ, PRIMARY KEY (group_name, source_hlc, partition))"]);
        let crdb = ddl(
            Dialect::Cockroach,
            "\"_cdc_sink\".\"public\".\"checkpoints\"",
        );
        assert!(crdb[0].contains("source_nanos INT8 AS (floor(source_hlc)::INT8) VIRTUAL"));
        assert!(crdb[0].contains("INDEX (group_name, target_applied_at, partition)"));
    }
}
