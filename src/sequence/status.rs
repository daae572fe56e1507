//! The sequencer's part of `/_/status`: per schema with checkpoints, its mode here, the
//! checkpoints and lags, unapplied staged rows, the apply lease, what blocks its windows and
//! the dead-letter rows.

use super::mode::Mode;
use super::parts::Parts;
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::target::Dialect;

/// Seconds from `t` to now by this process's clock; `None` for a zero checkpoint.
fn seconds_since(t: Hlc) -> Option<f64> {
    (!t.is_zero())
        .then(|| Hlc::from_system_time(std::time::SystemTime::now()).seconds() - t.seconds())
}

/// A status answer's reason (the top message only: it is a 5xx body); the cause goes to the
/// log.
fn unavailable(what: String, e: &(dyn std::error::Error + 'static)) -> String {
    tracing::debug!(error = %crate::error::ErrorChain(e), "{what}");
    what
}

/// One JSON object per schema with checkpoints, with `mode` the mode of a schema here; the
/// error is a one-line reason.
pub(super) async fn report(
    parts: &Parts,
    mode: impl Fn(&Schema) -> Option<Mode>,
) -> Result<Vec<serde_json::Value>, String> {
    use serde_json::json;
    let groups = parts
        .checkpoints
        .groups()
        .await
        .map_err(|e| unavailable("cannot read the checkpoints".into(), &e))?;
    let leases = parts.stager.schema().object("leases");
    let mut schemas = Vec::new();
    for g in groups {
        let Ok(schema) = Schema::parse(&g.group) else {
            continue;
        };
        let mut backlog: i64 = 0;
        let tables =
            parts.stager.registered(&schema).await.map_err(|e| {
                unavailable(format!("cannot read the staging tables of {schema}"), &e)
            })?;
        for t in &tables {
            let sql = format!(
                "SELECT count(*) FROM {} WHERE NOT applied",
                parts.stager.staging_table(t)
            );
            // A registered table whose staging table is not created yet holds nothing.
            if let Ok(n) = sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&parts.stager.database().pool)
                .await
            {
                backlog += n;
            }
        }
        let lease: Option<(String, String, bool, Option<String>)> = sqlx::query_as(&format!(
                "SELECT hostname, expires::TEXT, expires > now(), acquired::TEXT FROM {leases} WHERE name = $1"
            ))
            .bind(crate::sequence::lease_name(&schema))
            .fetch_optional(&parts.stager.database().pool)
            .await
            .map_err(|e| unavailable("cannot read the leases".into(), &e))?;
        let dlq = Table::new(schema.clone(), parts.applier.dlq_table_name());
        let dlq_sql = match parts.target.dialect {
            Dialect::Postgres => dlq.quoted_in_db(),
            Dialect::Cockroach => dlq.quoted(),
        };
        // No dead-letter table yet: null.
        let dlq_rows: Option<i64> = sqlx::query_scalar(&format!("SELECT count(*) FROM {dlq_sql}"))
            .fetch_one(&parts.target.pool)
            .await
            .ok();
        let blocked = parts.pipelines.blocked(&schema).map(|b| {
            let unix = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .ok()
            };
            json!({
                "table": b.poison.as_ref().map(|p| p.0.to_string()),
                "key": b.poison.as_ref().map(|p| p.1.clone()),
                "time": b.poison.as_ref().map(|p| p.2.to_string()),
                "error": b.error,
                "next_retry_unix": b.next_retry.and_then(unix),
            })
        });
        let b = g.bounds;
        schemas.push(json!({
            "blocked": blocked,
            "schema": g.group,
            "mode": mode(&schema).map(|m| m.name()),
            "committed": b.committed.to_string(),
            "proposed": b.proposed.to_string(),
            "target_lag_seconds": seconds_since(b.committed),
            "source_lag_seconds": seconds_since(b.proposed),
            "staged_backlog_rows": backlog,
            "lease": lease.map(|(host, expires, held, since)| json!({
                "holder": host, "expires": expires, "held": held, "since": since,
            })),
            "dlq_rows": dlq_rows,
        }));
    }
    Ok(schemas)
}
