//! Input guards of the ingest step: which schemas exist in the target, how far ahead of the
//! target's clock a timestamp may be, and the rate-limited log of rows dropped below a
//! committed checkpoint.

use crate::hlc::Hlc;
use crate::ident::Schema;
use crate::target::{Database, Dialect};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often the target clock's offset is measured again.
const CLOCK_REFRESH: Duration = Duration::from_secs(60);
/// Catalog look-ups for schemas not (yet) known to have tables, at once: a flood of requests
/// for made-up schemas costs at most this many target connections.
const LOOKUPS: usize = 2;

/// The target database's clock as seen from here: its offset from the local clock, measured
/// at start and again every [`CLOCK_REFRESH`] by the request that finds it stale.
pub(crate) struct TargetClock {
    skew: Duration,
    offset_nanos: AtomicI64,
    measured: Mutex<Instant>,
    refreshing: AtomicBool,
}

impl TargetClock {
    /// Measures the offset once; `skew` zero disables the bound (and the measuring).
    pub(crate) async fn open(db: &Database, skew: Duration) -> Result<TargetClock, sqlx::Error> {
        let offset = if skew.is_zero() {
            0
        } else {
            measure_offset(db).await?
        };
        Ok(TargetClock {
            skew,
            offset_nanos: AtomicI64::new(offset),
            measured: Mutex::new(Instant::now()),
            refreshing: AtomicBool::new(false),
        })
    }

    pub(crate) fn skew(&self) -> Duration {
        self.skew
    }

    /// The latest acceptable timestamp right now, `None` when the bound is off. Measures the
    /// offset again first when it is stale (one request at a time; a failed measurement keeps
    /// the previous offset).
    pub(crate) async fn limit(&self, db: &Database) -> Option<Hlc> {
        if self.skew.is_zero() {
            return None;
        }
        let stale = self.measured.lock().expect("poisoned").elapsed() >= CLOCK_REFRESH;
        if stale
            && self
                .refreshing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            match measure_offset(db).await {
                Ok(o) => {
                    self.offset_nanos.store(o, Ordering::Relaxed);
                    *self.measured.lock().expect("poisoned") = Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::ErrorChain(&e), "could not read the target clock; keeping the last offset")
                }
            }
            self.refreshing.store(false, Ordering::Release);
        }
        let local = Hlc::from_system_time(SystemTime::now()).nanos();
        let skew = i64::try_from(self.skew.as_nanos()).unwrap_or(i64::MAX);
        let nanos = local
            .saturating_add(self.offset_nanos.load(Ordering::Relaxed))
            .saturating_add(skew);
        Some(Hlc::new(nanos, i32::MAX))
    }
}

/// Target clock minus local clock, in nanoseconds, taken at the midpoint of the round trip.
async fn measure_offset(db: &Database) -> Result<i64, sqlx::Error> {
    let before = Hlc::from_system_time(SystemTime::now()).nanos();
    let micros: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::INT8")
            .fetch_one(&db.pool)
            .await?;
    let after = Hlc::from_system_time(SystemTime::now()).nanos();
    let local = before + (after - before) / 2;
    Ok(micros.saturating_mul(1000).saturating_sub(local))
}

/// Go-style spelling of a duration for messages (`1h0m0s`, `30s`, `500ms`).
pub(crate) fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Schemas known to have tables in the target, and the look-up of those that are not.
pub(crate) struct SchemaGate {
    known: Mutex<HashSet<Schema>>,
    lookups: tokio::sync::Semaphore,
}

impl Default for SchemaGate {
    fn default() -> Self {
        SchemaGate {
            known: Mutex::new(HashSet::new()),
            lookups: tokio::sync::Semaphore::new(LOOKUPS),
        }
    }
}

impl SchemaGate {
    pub(crate) fn is_known(&self, schema: &Schema) -> bool {
        self.known.lock().expect("poisoned").contains(schema)
    }

    pub(crate) fn remember(&self, schema: &Schema) {
        self.known.lock().expect("poisoned").insert(schema.clone());
    }

    pub(crate) fn forget(&self, schema: &Schema) {
        self.known.lock().expect("poisoned").remove(schema);
    }

    /// Whether `schema` has a base table in the target, asked of the catalog directly so an
    /// unknown name leaves nothing cached behind. An unknown CockroachDB database is "no".
    pub(crate) async fn has_tables(
        &self,
        db: &Database,
        schema: &Schema,
    ) -> Result<bool, sqlx::Error> {
        let _permit = self.lookups.acquire().await.expect("never closed");
        let is = match db.dialect {
            Dialect::Postgres => "information_schema".to_string(),
            Dialect::Cockroach => format!("{}.information_schema", schema.db.quoted()),
        };
        let stmt = format!(
            "SELECT EXISTS (SELECT 1 FROM {is}.tables WHERE table_type = 'BASE TABLE' \
AND lower(table_schema) = lower($1))"
        );
        let found = sqlx::query_scalar::<_, bool>(&stmt)
            .bind(schema.schema.raw())
            .fetch_one(&db.pool)
            .await;
        match found {
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => Ok(false),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_spelled_as_in_go() {
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
    }
}
