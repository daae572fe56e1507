//! The initial scan: when the slot is created, every existing row of the fed tables is sent at
//! one timestamp read inside one snapshot, before any change is read from the slot.

use super::encode;
use super::pgoutput::{self, Datum, Relation};
use super::probe::CLOCK_SQL;
use super::source::{execute, Item, Reader, ITEM_MESSAGES};
use super::FeedError;
use crate::hlc::Hlc;
use crate::ident::Ident;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

impl Reader {
    /// Sends every existing row at one timestamp taken inside the scan's snapshot. Changes
    /// the snapshot already saw arrive again from the slot later, with later timestamps;
    /// full row images make that replay converge.
    pub(super) async fn scan(
        &mut self,
        conn: &mut PgConnection,
        items: &mpsc::Sender<Item>,
        cancel: &CancellationToken,
    ) -> Result<(), FeedError> {
        let mut tx = conn
            .begin()
            .await
            .map_err(FeedError::source("begin the initial scan"))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(FeedError::source("begin the initial scan"))?;
        let t: i64 = sqlx::query_scalar(CLOCK_SQL)
            .fetch_one(&mut *tx)
            .await
            .map_err(FeedError::source("read the source clock"))?;
        let at = Hlc::new(t.saturating_mul(1000), 0).max(self.floor.next());
        self.floor = at;
        for table in self.tables.clone() {
            let qualified = format!(
                "{}.{}",
                Ident::new(table.schema.clone()).quoted(),
                Ident::new(table.name.clone()).quoted()
            );
            // Same columns as the plugin sends: no dropped or generated ones.
            let cols: Vec<(String, i64)> = sqlx::query_as(
                "SELECT attname::text, atttypid::int8 FROM pg_attribute \
                 WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped AND attgenerated = '' \
                 ORDER BY attnum",
            )
            .bind(&qualified)
            .fetch_all(&mut *tx)
            .await
            .map_err(FeedError::source("read table columns"))?;
            let relation = Relation {
                oid: 0,
                namespace: table.schema.clone(),
                name: table.name.clone(),
                columns: cols
                    .iter()
                    .map(|(n, t)| pgoutput::Column {
                        name: n.clone(),
                        type_oid: *t as u32,
                    })
                    .collect(),
            };
            self.resolve_kinds(&mut tx, &[&relation]).await?;
            let shape = self
                .shape(&relation)?
                .ok_or_else(|| FeedError::Setup(format!("table {qualified} is not fed")))?;
            let select = relation
                .columns
                .iter()
                .map(|c| format!("{}::text", Ident::new(c.name.clone()).quoted()))
                .collect::<Vec<_>>()
                .join(", ");
            // A cursor, read a chunk at a time, so the sender's pace bounds memory.
            execute(
                &mut tx,
                &format!(
                    "DECLARE cdc_sink_scan NO SCROLL CURSOR FOR SELECT {select} FROM {qualified}"
                ),
                "scan a table",
            )
            .await?;
            let mut total = 0u64;
            loop {
                let rows = sqlx::query(&format!("FETCH {ITEM_MESSAGES} FROM cdc_sink_scan"))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(FeedError::source("scan a table"))?;
                if rows.is_empty() {
                    break;
                }
                let mut batch = Vec::with_capacity(rows.len());
                for row in &rows {
                    let datums: Vec<Datum> = (0..relation.columns.len())
                        .map(|i| {
                            row.get::<Option<String>, _>(i)
                                .map_or(Datum::Null, |s| Datum::Text(s.into_bytes()))
                        })
                        .collect();
                    let after = shape.object(&datums, None, &mut Vec::new())?;
                    let key = shape.key(&datums)?;
                    let before = self.diff.then_some("null");
                    batch.push(encode::message(
                        Some(&after),
                        before,
                        &key,
                        &shape.topic,
                        at,
                    ));
                }
                total += batch.len() as u64;
                let item = Item::Rows {
                    messages: batch,
                    end_lsn: None,
                    updated_nanos: at.nanos(),
                };
                if !send(items, cancel, item).await {
                    return Ok(());
                }
            }
            execute(&mut tx, "CLOSE cdc_sink_scan", "scan a table").await?;
            info!(table = %qualified, rows = total, "initial scan sent");
        }
        tx.commit()
            .await
            .map_err(FeedError::source("end the initial scan"))?;
        Ok(())
    }
}

/// Hands over an item; false when cancelled or the sender is gone.
async fn send(items: &mpsc::Sender<Item>, cancel: &CancellationToken, item: Item) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        r = items.send(item) => r.is_ok(),
    }
}
