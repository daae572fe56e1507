//! Setting up the source for a session: logical decoding must be on and every fed table must
//! have a primary key; the tables get full replica identity; the publication (named after the
//! slot) is created or brought up to date, and the replication slot is created when missing.

use super::pgoutput::Lsn;
use super::source::{execute, Reader};
use super::FeedError;
use crate::ident::Ident;
use sqlx::postgres::PgConnection;
use sqlx::Row;
use tracing::{error, info, warn};

impl Reader {
    /// Checks the tables, sets replica identity, creates the publication and the slot.
    /// Returns whether the slot was created now.
    pub(super) async fn setup(&mut self, conn: &mut PgConnection) -> Result<bool, FeedError> {
        let wal: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
            .fetch_one(&mut *conn)
            .await
            .map_err(FeedError::source("read wal_level"))?;
        if wal != "logical" {
            return Err(FeedError::Setup(format!(
                "the source has wal_level={wal}; set wal_level=logical and restart it"
            )));
        }
        for t in &mut self.tables {
            let qualified = format!(
                "{}.{}",
                Ident::new(t.schema.clone()).quoted(),
                Ident::new(t.name.clone()).quoted()
            );
            let row = sqlx::query(
                "SELECT c.oid::int8, c.relreplident::text, \
                 ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
                       JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.n) \
                 FROM pg_class c LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary \
                 WHERE c.oid = to_regclass($1)",
            )
            .bind(&qualified)
            .fetch_optional(&mut *conn)
            .await
            .map_err(FeedError::source("look up tables"))?
            .ok_or_else(|| FeedError::Setup(format!("table {qualified} does not exist")))?;
            let key: Vec<String> = row.get(2);
            if key.is_empty() {
                return Err(FeedError::Setup(format!(
                    "table {qualified} has no primary key; changefeeds need one"
                )));
            }
            t.key = key;
            let identity: String = row.get(1);
            if identity != "f" {
                // Full old rows give updates their unchanged TOAST values and --diff its before.
                execute(
                    &mut *conn,
                    &format!("ALTER TABLE {qualified} REPLICA IDENTITY FULL"),
                    "set replica identity",
                )
                .await?;
                info!(table = %qualified, "replica identity set to full");
            }
        }
        let list = self
            .tables
            .iter()
            .map(|t| {
                format!(
                    "{}.{}",
                    Ident::new(t.schema.clone()).quoted(),
                    Ident::new(t.name.clone()).quoted()
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let publication_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&self.publication)
                .fetch_one(&mut *conn)
                .await
                .map_err(FeedError::source("look up the publication"))?;
        let slot: Option<(String, Option<i64>)> = sqlx::query_as(
            "SELECT plugin::text, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&mut *conn)
        .await
        .map_err(FeedError::source("look up the slot"))?;
        let pubname = Ident::new(self.publication.clone()).quoted();
        if !publication_exists {
            if slot.is_some() {
                // Decoding older changes would fail: the publication must predate them.
                return Err(FeedError::Setup(format!(
                    "slot {} exists but publication {pubname} does not; drop the slot to start over",
                    self.slot
                )));
            }
            execute(
                &mut *conn,
                &format!("CREATE PUBLICATION {pubname} FOR TABLE {list}"),
                "create the publication",
            )
            .await?;
            info!(publication = %self.publication, "publication created");
        } else {
            let published: Vec<(String, String)> = sqlx::query_as(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            )
            .bind(&self.publication)
            .fetch_all(&mut *conn)
            .await
            .map_err(FeedError::source("list published tables"))?;
            let missing = self.tables.iter().any(|t| {
                !published
                    .iter()
                    .any(|(s, n)| *s == t.schema && *n == t.name)
            });
            if missing || published.len() != self.tables.len() {
                execute(
                    &mut *conn,
                    &format!("ALTER PUBLICATION {pubname} SET TABLE {list}"),
                    "update the publication",
                )
                .await?;
                warn!(publication = %self.publication, "publication tables changed; earlier changes of added tables are not sent");
            }
        }
        let created = match slot {
            Some((plugin, confirmed)) => {
                if plugin != "pgoutput" {
                    return Err(FeedError::Setup(format!(
                        "slot {} uses plugin {plugin}, not pgoutput",
                        self.slot
                    )));
                }
                let confirmed = Lsn(confirmed.unwrap_or(0).max(0) as u64);
                self.advanced = confirmed;
                self.read = self.read.max(confirmed);
                false
            }
            None => {
                if self.started {
                    error!(slot = %self.slot, "replication slot vanished; recreating it, changes since are lost");
                }
                let lsn: i64 = sqlx::query_scalar(
                    "SELECT (lsn - '0/0'::pg_lsn)::int8 FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                )
                .bind(&self.slot)
                .fetch_one(&mut *conn)
                .await
                .map_err(FeedError::source("create the replication slot"))?;
                info!(slot = %self.slot, lsn = %Lsn(lsn as u64), "replication slot created");
                self.advanced = Lsn(lsn as u64);
                self.read = self.read.max(self.advanced);
                true
            }
        };
        Ok(created)
    }
}
