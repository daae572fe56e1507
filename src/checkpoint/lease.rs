//! Leases: a row per name in the staging schema's `leases` table, held until `expires`.
//! Times come from the database clock so instances with skewed clocks still agree.

use super::CheckpointError;
use crate::stage::StagingSchema;
use crate::target::{Database, Dialect};
use sqlx::PgConnection;
use std::time::Duration;
use uuid::Uuid;

/// The `leases` table.
pub struct Leases {
    db: Database,
    table: String,
    hostname: String,
}

/// A held lease; `nonce` fences it against a later holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) name: String,
    pub(crate) nonce: Uuid,
}

impl Leases {
    pub(crate) async fn open(
        db: Database,
        staging: &StagingSchema,
    ) -> Result<Leases, CheckpointError> {
        let table = staging.object("leases");
        let text = if db.dialect == Dialect::Cockroach {
            "STRING"
        } else {
            "TEXT"
        };
        let [create, migrate] = ddl(&table, text);
        crate::target::run_ddl(&db, &[create])
            .await
            .map_err(CheckpointError::Sql)?;
        // ALTER TABLE locks the table exclusively even when the column exists, which would
        // stall the running instances' fenced flushes: only when it is missing.
        let probe = sqlx::query(&format!("SELECT acquired FROM {table} LIMIT 0"))
            .execute(&db.pool)
            .await;
        match probe {
            Err(e) if crate::target::sqlstate(&e) == "42703" => {
                crate::target::run_ddl(&db, &[migrate])
                    .await
                    .map_err(CheckpointError::Sql)?;
                tracing::info!(table = %table, "added the acquisition time to the leases table");
            }
            other => {
                other.map_err(CheckpointError::Sql)?;
            }
        }
        let hostname = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Leases {
            db,
            table,
            hostname: format!("{hostname}:{}", std::process::id()),
        })
    }

    /// Takes the lease if it is free or expired.
    pub(crate) async fn try_acquire(
        &self,
        name: &str,
        lifetime: Duration,
    ) -> Result<Option<Lease>, CheckpointError> {
        let nonce = Uuid::new_v4();
        let stmt = format!(
            "INSERT INTO {t} AS l (name, expires, nonce, hostname, acquired) VALUES ($1, now() + $2::INTERVAL, $3::UUID, $4, now()) \
ON CONFLICT (name) DO UPDATE SET expires = excluded.expires, nonce = excluded.nonce, hostname = excluded.hostname, \
acquired = excluded.acquired WHERE l.expires < now() RETURNING nonce::TEXT",
            t = self.table
        );
        let got: Option<String> = sqlx::query_scalar(&stmt)
            .bind(name)
            .bind(interval(lifetime))
            .bind(nonce.to_string())
            .bind(&self.hostname)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(got.map(|_| Lease {
            name: name.to_string(),
            nonce,
        }))
    }

    /// Extends a held lease; `false` when it was lost (expired and taken, or released).
    /// Inside a transaction it also locks the lease row exclusively until the end, which
    /// would stall every concurrent transaction [`Leases::fence`]d on it: renew on its own.
    pub(crate) async fn renew(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        lifetime: Duration,
    ) -> Result<bool, CheckpointError> {
        let done = sqlx::query(&renew_sql(&self.table))
            .bind(&lease.name)
            .bind(lease.nonce.to_string())
            .bind(interval(lifetime))
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(done.rows_affected() == 1)
    }

    /// Fences a transaction that runs alongside others of the same holder: `false` unless the
    /// lease is still ours and unexpired. The shared row lock lets our concurrent transactions
    /// proceed together while a takeover (an `UPDATE` of the row) waits for all of them to
    /// end; renewing, also an `UPDATE`, waits the same way, so it is done between them.
    pub(crate) async fn fence(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
    ) -> Result<bool, CheckpointError> {
        let held = sqlx::query(&fence_sql(&self.table))
            .bind(&lease.name)
            .bind(lease.nonce.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(held.is_some())
    }

    /// Renews outside any transaction.
    pub(crate) async fn renew_now(
        &self,
        lease: &Lease,
        lifetime: Duration,
    ) -> Result<bool, CheckpointError> {
        let mut conn = self.db.acquire().await.map_err(CheckpointError::Sql)?;
        self.renew(&mut conn, lease, lifetime).await
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<(), CheckpointError> {
        let stmt = format!(
            "DELETE FROM {t} WHERE name = $1 AND nonce = $2::UUID",
            t = self.table
        );
        sqlx::query(&stmt)
            .bind(&lease.name)
            .bind(lease.nonce.to_string())
            .execute(&self.db.pool)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(())
    }
}

/// The table, and the migration of one created before `acquired` (when the holder took the
/// lease) existed: rows taken by such older versions have none.
fn ddl(table: &str, text: &str) -> [String; 2] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (name {text} PRIMARY KEY, expires TIMESTAMPTZ NOT NULL, nonce UUID NOT NULL, hostname {text} NOT NULL, acquired TIMESTAMPTZ)"
        ),
        format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS acquired TIMESTAMPTZ"),
    ]
}

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

fn renew_sql(table: &str) -> String {
    format!(
        "UPDATE {table} SET expires = now() + $3::INTERVAL WHERE name = $1 AND nonce = $2::UUID"
    )
}

/// CockroachDB accepts the same statement; under its default serializable isolation the read
/// of the row already orders our transaction against a takeover's write, lock or no lock.
fn fence_sql(table: &str) -> String {
    format!(
        "SELECT 1 FROM {table} WHERE name = $1 AND nonce = $2::UUID AND expires > now() FOR SHARE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_lease_ddl_adds_the_acquisition_time_to_older_tables() {
        assert_eq!(
            ddl("\"_cdc_sink\".\"leases\"", "TEXT"),
            [
                "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"leases\" (name TEXT PRIMARY KEY, expires TIMESTAMPTZ NOT NULL, nonce UUID NOT NULL, hostname TEXT NOT NULL, acquired TIMESTAMPTZ)",
                "ALTER TABLE \"_cdc_sink\".\"leases\" ADD COLUMN IF NOT EXISTS acquired TIMESTAMPTZ",
            ]
        );
    }

    #[test]
    fn golden_lease_fencing_sql() {
        assert_eq!(
            fence_sql("\"_cdc_sink\".\"leases\""),
            "SELECT 1 FROM \"_cdc_sink\".\"leases\" WHERE name = $1 AND nonce = $2::UUID AND expires > now() FOR SHARE"
        );
        assert_eq!(
            fence_sql("\"_cdc_sink\".\"public\".\"leases\""),
            "SELECT 1 FROM \"_cdc_sink\".\"public\".\"leases\" WHERE name = $1 AND nonce = $2::UUID AND expires > now() FOR SHARE"
        );
        assert_eq!(
            renew_sql("\"_cdc_sink\".\"public\".\"leases\""),
            "UPDATE \"_cdc_sink\".\"public\".\"leases\" SET expires = now() + $3::INTERVAL WHERE name = $1 AND nonce = $2::UUID"
        );
    }
}
