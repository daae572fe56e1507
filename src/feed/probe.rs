//! The resolved-timestamp probe: a small state machine stepped once per turn of the peek loop,
//! which proves a resolved timestamp and queues it behind the changes it covers.
//!
//! A resolved timestamp R promises that no message with `updated` ≤ R will follow. We take the
//! source clock t, then a snapshot; once every transaction in progress at that snapshot has
//! ended, any transaction that took its commit time before t has written its commit record,
//! so once the slot has been read up to the WAL insert position (flushed) all of them were
//! read. R is t − 1ns, and `updated` never goes below R afterwards.

use super::pgoutput::Lsn;
use super::source::{Item, Reader};
use super::FeedError;
use crate::hlc::Hlc;
use sqlx::postgres::PgConnection;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::warn;

/// Waiting this long for old transactions to end before a resolved timestamp is worth a WARN.
const SLOW_PROBE: Duration = Duration::from_secs(30);

/// Where the probe stands. The session loop steps it each turn and resolves it once, in
/// `Reading`, a peek reached the end of the WAL and the flushed position is past `lsn`.
pub(super) enum Probe {
    Idle {
        due: Instant,
    },
    /// Clock read (µs) and snapshot taken; waiting for the snapshot's transactions to end.
    Waiting {
        t: i64,
        snapshot: String,
        since: Instant,
        /// When the clock was read: the next probe is due one period after it, so resolved
        /// timestamps come every period rather than every period plus the probe's own time.
        at: Instant,
    },
    /// Waiting for the slot to be read up to `lsn` (and for the WAL to be flushed there).
    Reading {
        t: i64,
        lsn: Lsn,
        at: Instant,
    },
}

impl Reader {
    pub(super) async fn probe_step(&mut self, conn: &mut PgConnection) -> Result<(), FeedError> {
        if self.resolved.is_zero() {
            return Ok(());
        }
        match &self.probe {
            Probe::Idle { due } if Instant::now() >= *due => {
                let at = Instant::now();
                let t: i64 = sqlx::query_scalar(CLOCK_SQL)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(FeedError::source("read the source clock"))?;
                // Taken after the clock, so it lists every transaction that may have an
                // earlier commit time without a commit record yet.
                let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(FeedError::source("take a snapshot"))?;
                self.probe = Probe::Waiting {
                    t,
                    snapshot,
                    since: Instant::now(),
                    at,
                };
            }
            Probe::Idle { .. } => {}
            Probe::Waiting {
                t,
                snapshot,
                since,
                at,
            } => {
                let running: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_snapshot_xip($1::pg_snapshot) AS x \
                     WHERE pg_xact_status(x) = 'in progress'",
                )
                .bind(snapshot)
                .fetch_one(&mut *conn)
                .await
                .map_err(FeedError::source("check running transactions"))?;
                if running == 0 {
                    let lsn: i64 = sqlx::query_scalar(
                        "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
                    )
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(FeedError::source("read the wal position"))?;
                    self.probe = Probe::Reading {
                        t: *t,
                        lsn: Lsn(lsn as u64),
                        at: *at,
                    };
                } else if since.elapsed() > SLOW_PROBE {
                    warn!(slot = %self.slot, transactions = running, "resolved timestamps wait for long-running source transactions");
                    self.probe = Probe::Waiting {
                        t: *t,
                        snapshot: snapshot.clone(),
                        since: Instant::now(),
                        at: *at,
                    };
                }
            }
            Probe::Reading { .. } => {}
        }
        Ok(())
    }

    /// Everything committed before the probe's LSN was handed over: queue its resolved time.
    pub(super) async fn resolve(&mut self, items: &mpsc::Sender<Item>) -> Result<(), FeedError> {
        let Probe::Reading { t, lsn, at: probed } = self.probe else {
            return Ok(());
        };
        // t − 1ns: a commit in the same microsecond as t may still be read later.
        let at = Hlc::new(t.saturating_mul(1000) - 1, 0).max(self.floor);
        self.floor = at;
        self.probe = Probe::Idle {
            due: probed + self.resolved,
        };
        let _ = items.send(Item::Resolved { at, lsn }).await;
        Ok(())
    }
}

/// The source clock in whole Unix microseconds (commit times have the same resolution).
pub(super) const CLOCK_SQL: &str =
    "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8";

/// The WAL position flushed to disk, which a probe's LSN must not be past when it resolves.
pub(super) async fn flush_lsn(conn: &mut PgConnection) -> Result<Lsn, FeedError> {
    let l: i64 = sqlx::query_scalar("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(conn)
        .await
        .map_err(FeedError::source("read the flushed wal position"))?;
    Ok(Lsn(l as u64))
}
