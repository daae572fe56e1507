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
pub struct Lease {
    pub name: String,
    pub nonce: Uuid,
}

impl Leases {
    pub async fn open(db: Database, staging: &StagingSchema) -> Result<Leases, CheckpointError> {
        let table = staging.object("leases");
        let text = if db.dialect == Dialect::Cockroach {
            "STRING"
        } else {
            "TEXT"
        };
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (name {text} PRIMARY KEY, expires TIMESTAMPTZ NOT NULL, nonce UUID NOT NULL, hostname {text} NOT NULL)"
        );
        sqlx::raw_sql(&ddl)
            .execute(&db.pool)
            .await
            .map_err(CheckpointError::Sql)?;
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
    pub async fn try_acquire(
        &self,
        name: &str,
        lifetime: Duration,
    ) -> Result<Option<Lease>, CheckpointError> {
        let nonce = Uuid::new_v4();
        let stmt = format!(
            "INSERT INTO {t} AS l (name, expires, nonce, hostname) VALUES ($1, now() + $2::INTERVAL, $3::UUID, $4) \
ON CONFLICT (name) DO UPDATE SET expires = excluded.expires, nonce = excluded.nonce, hostname = excluded.hostname \
WHERE l.expires < now() RETURNING nonce::TEXT",
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
    /// Inside an apply transaction this also locks the lease row, fencing other holders
    /// until the transaction ends.
    pub async fn renew(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        lifetime: Duration,
    ) -> Result<bool, CheckpointError> {
        let stmt = format!(
            "UPDATE {t} SET expires = now() + $3::INTERVAL WHERE name = $1 AND nonce = $2::UUID",
            t = self.table
        );
        let done = sqlx::query(&stmt)
            .bind(&lease.name)
            .bind(lease.nonce.to_string())
            .bind(interval(lifetime))
            .execute(&mut *conn)
            .await
            .map_err(CheckpointError::Sql)?;
        Ok(done.rows_affected() == 1)
    }

    /// Renews outside any transaction.
    pub async fn renew_now(
        &self,
        lease: &Lease,
        lifetime: Duration,
    ) -> Result<bool, CheckpointError> {
        let mut conn = self.db.pool.acquire().await.map_err(CheckpointError::Sql)?;
        self.renew(&mut conn, lease, lifetime).await
    }

    pub async fn release(&self, lease: &Lease) -> Result<(), CheckpointError> {
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

fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}
