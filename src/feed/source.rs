//! Reading the source: slot and publication set-up, the initial scan, peeking changes in commit
//! order, advancing the slot after acknowledgement, and proving resolved timestamps.
//!
//! A resolved timestamp R promises that no message with `updated` ≤ R will follow. We take the
//! source clock t, then a snapshot; once every transaction in progress at that snapshot has
//! ended, any transaction that took its commit time before t has written its commit record,
//! so once the slot has been read up to the WAL insert position (flushed) all of them were
//! read. R is t − 1ns, and `updated` never goes below R afterwards.

use super::encode::{self, Kind, Shape};
use super::pgoutput::{self, Datum, Lsn, Message, Relation};
use super::{FeedArgs, FeedError};
use crate::error::ErrorChain;
use crate::hlc::Hlc;
use crate::ident::Ident;
use crate::metrics as m;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, Row};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Messages per item handed to the sender, so one huge transaction streams.
const ITEM_MESSAGES: usize = 1000;
/// New rows asked of one peek (besides those already read but not yet acknowledged).
const PEEK_ROWS: usize = 10_000;
/// Read-but-unacknowledged rows after which reading pauses (each peek decodes them again).
const MAX_BACKLOG_ROWS: usize = 50_000;
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// Waiting this long for old transactions to end before a resolved timestamp is worth a WARN.
const SLOW_PROBE: Duration = Duration::from_secs(30);

/// What the reader hands to the sender, in order.
pub(super) enum Item {
    /// Messages of one transaction (or part of it; `end_lsn` is set on the last part).
    Rows {
        messages: Vec<String>,
        end_lsn: Option<Lsn>,
        updated_nanos: i64,
    },
    /// Everything committed before `lsn` was handed over; `at` may be sent once acknowledged.
    Resolved { at: Hlc, lsn: Lsn },
}

/// A fed table as configured.
#[derive(Clone, Debug)]
struct FedTable {
    schema: String,
    name: String,
    /// Primary-key column names in key order (filled at set-up).
    key: Vec<String>,
}

enum Probe {
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

/// The transaction being decoded.
struct Txn {
    commit_micros: i64,
    changes: Vec<Change>,
}

struct Change {
    topic: String,
    after: Option<String>,
    before: Option<String>,
    key: String,
}

pub(super) struct Reader {
    connect: PgConnectOptions,
    slot: String,
    publication: String,
    tables: Vec<FedTable>,
    diff: bool,
    initial_scan: bool,
    resolved: Duration,
    poll: Duration,
    /// Shapes by relation OID, from relation messages (kept across peeks and reconnects).
    /// `None` for tables the publication has but we do not feed.
    shapes: HashMap<u32, Option<Shape>>,
    kinds: HashMap<u32, Kind>,
    /// End LSN of the newest transaction handed to the sender.
    read: Lsn,
    /// The slot's confirmed position as far as we know.
    advanced: Lsn,
    /// Every `updated` and resolved timestamp so far is ≤ floor.
    floor: Hlc,
    /// `(end LSN, rows)` of transactions read but not yet acknowledged.
    backlog: VecDeque<(Lsn, usize)>,
    probe: Probe,
    started: bool,
}

impl Reader {
    pub(super) fn new(
        args: &FeedArgs,
        tables: Vec<(Option<String>, String, String)>,
    ) -> Result<Reader, FeedError> {
        let settings = crate::target::PoolSettings {
            max_connections: 1,
            max_lifetime: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(3600),
            // The initial scan's transaction waits for the sink while it streams.
            idle_in_transaction: Duration::from_secs(6 * 3600),
        };
        let mut connect = crate::target::connect_options(&args.source, &settings)
            .map_err(FeedError::SourceUrl)?
            .application_name("cdc-sink feed");
        if let Some(db) = tables.iter().find_map(|t| t.0.clone()) {
            connect = connect.database(&db);
        }
        Ok(Reader {
            connect,
            slot: args.slot.clone(),
            publication: args.slot.clone(),
            tables: tables
                .into_iter()
                .map(|(_, schema, name)| FedTable {
                    schema,
                    name,
                    key: Vec::new(),
                })
                .collect(),
            diff: args.diff,
            initial_scan: args.initial_scan,
            resolved: args.resolved,
            poll: args.poll_interval,
            shapes: HashMap::new(),
            kinds: HashMap::new(),
            read: Lsn(0),
            advanced: Lsn(0),
            floor: Hlc::ZERO,
            backlog: VecDeque::new(),
            probe: Probe::Idle {
                due: Instant::now(),
            },
            started: false,
        })
    }

    /// Reads until cancelled, reconnecting after source errors. Errors before the first
    /// successful start (bad tables, no logical decoding, …) are returned.
    pub(super) async fn run(
        mut self,
        items: mpsc::Sender<Item>,
        mut acked: watch::Receiver<Lsn>,
        cancel: CancellationToken,
    ) -> Result<(), FeedError> {
        let mut delay = Duration::from_millis(200);
        loop {
            let result = self.session(&items, &mut acked, &cancel, &mut delay).await;
            match result {
                Ok(()) => return Ok(()),
                Err(e) if !self.started || !e.is_transient() => return Err(e),
                Err(e) => {
                    metrics::counter!(m::FEED_SOURCE_ERRORS, m::LABEL_FEED => self.slot.clone())
                        .increment(1);
                    warn!(slot = %self.slot, error = %ErrorChain(&e), retry_in = ?delay, "source unavailable; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_RECONNECT_DELAY);
                }
            }
        }
    }

    async fn session(
        &mut self,
        items: &mpsc::Sender<Item>,
        acked: &mut watch::Receiver<Lsn>,
        cancel: &CancellationToken,
        delay: &mut Duration,
    ) -> Result<(), FeedError> {
        let mut conn = self
            .connect
            .connect()
            .await
            .map_err(FeedError::source("connect"))?;
        // The plugin formats values with this session's settings.
        for set in [
            "SET DateStyle = 'ISO, MDY'",
            "SET TimeZone = 'UTC'",
            "SET IntervalStyle = 'postgres'",
            "SET extra_float_digits = 3",
            "SET bytea_output = 'hex'",
        ] {
            execute(&mut conn, set, "session settings").await?;
        }
        let created = self.setup(&mut conn).await?;
        if created && self.initial_scan && !self.started {
            self.scan(&mut conn, items, cancel).await?;
        }
        if !self.started {
            info!(slot = %self.slot, tables = self.tables.len(), "feed reading changes");
        } else {
            info!(slot = %self.slot, "source reconnected");
        }
        self.started = true;
        loop {
            if cancel.is_cancelled() || items.is_closed() {
                return Ok(());
            }
            let ack = *acked.borrow_and_update();
            while self.backlog.front().is_some_and(|(l, _)| *l <= ack) {
                self.backlog.pop_front();
            }
            if ack > self.advanced {
                sqlx::query("SELECT pg_replication_slot_advance($1, $2::pg_lsn)")
                    .bind(&self.slot)
                    .bind(ack.to_string())
                    .execute(&mut conn)
                    .await
                    .map_err(FeedError::source("advance the slot"))?;
                debug!(slot = %self.slot, lsn = %ack, "slot advanced");
                self.advanced = ack;
            }
            self.probe_step(&mut conn).await?;
            let backlog_rows: usize = self.backlog.iter().map(|b| b.1).sum();
            let mut progressed = false;
            if backlog_rows < MAX_BACKLOG_ROWS {
                let probe_lsn = match self.probe {
                    Probe::Reading { lsn, .. } => Some(lsn),
                    _ => None,
                };
                let flushed = match probe_lsn {
                    Some(_) => Some(flush_lsn(&mut conn).await?),
                    None => None,
                };
                let (new_txns, exhausted) = self.peek(&mut conn, items, backlog_rows).await?;
                *delay = Duration::from_millis(200);
                progressed = new_txns > 0;
                if let (Some(lsn), Some(flushed), true) = (probe_lsn, flushed, exhausted) {
                    if flushed >= lsn {
                        self.resolve(items).await?;
                    }
                }
            }
            if !progressed {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = acked.changed() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        }
    }

    /// Checks the tables, sets replica identity, creates the publication and the slot.
    /// Returns whether the slot was created now.
    async fn setup(&mut self, conn: &mut PgConnection) -> Result<bool, FeedError> {
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

    /// Sends every existing row at one timestamp taken inside the scan's snapshot. Changes
    /// the snapshot already saw arrive again from the slot later, with later timestamps;
    /// full row images make that replay converge.
    async fn scan(
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

    /// Peeks the slot and hands over the transactions not read yet. Returns how many were new
    /// and whether the peek reached the end of the flushed WAL.
    async fn peek(
        &mut self,
        conn: &mut PgConnection,
        items: &mpsc::Sender<Item>,
        backlog_rows: usize,
    ) -> Result<(usize, bool), FeedError> {
        // Rows of transactions read but unacknowledged come back too and count to the limit.
        let limit = backlog_rows + PEEK_ROWS;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT (lsn - '0/0'::pg_lsn)::int8, data FROM pg_logical_slot_peek_binary_changes(\
             $1, NULL, $2, 'proto_version', '1', 'publication_names', $3)",
        )
        .bind(&self.slot)
        .bind(i32::try_from(limit).unwrap_or(i32::MAX))
        .bind(&self.publication)
        .fetch_all(&mut *conn)
        .await
        .map_err(FeedError::source("peek changes"))?;
        let exhausted = rows.len() < limit;
        let messages = rows
            .iter()
            .map(|(_, data)| pgoutput::decode(data))
            .collect::<Result<Vec<_>, _>>()?;
        let relations: Vec<&Relation> = messages
            .iter()
            .filter_map(|m| match m {
                Message::Relation(r) => Some(r),
                _ => None,
            })
            .collect();
        if !relations.is_empty() {
            self.resolve_kinds(conn, &relations).await?;
        }
        let mut txn: Option<Txn> = None;
        let mut new_txns = 0;
        for msg in messages {
            match msg {
                Message::Relation(r) => {
                    let shape = self.shape(&r)?;
                    self.shapes.insert(r.oid, shape);
                }
                Message::Begin { commit_micros, .. } => {
                    txn = Some(Txn {
                        commit_micros,
                        changes: Vec::new(),
                    });
                }
                Message::Insert { rel, new } => {
                    if let Some(t) = txn.as_mut() {
                        self.insert(t, rel, &new)?;
                    }
                }
                Message::Update { rel, old, new } => {
                    if let Some(t) = txn.as_mut() {
                        self.update(t, rel, old.as_deref(), &new)?;
                    }
                }
                Message::Delete { rel, old } => {
                    if let Some(t) = txn.as_mut() {
                        self.delete(t, rel, &old)?;
                    }
                }
                Message::Truncate { rels } => {
                    warn!(slot = %self.slot, tables = rels.len(), "truncate is not replicated");
                }
                Message::Commit {
                    end_lsn,
                    commit_micros,
                } => {
                    let Some(t) = txn.take() else { continue };
                    if end_lsn <= self.read {
                        continue; // read before, not yet acknowledged
                    }
                    self.read = end_lsn;
                    if t.changes.is_empty() {
                        continue;
                    }
                    let micros = if t.commit_micros != 0 {
                        t.commit_micros
                    } else {
                        commit_micros
                    };
                    let at = Hlc::new(micros.saturating_mul(1000), 0).max(self.floor.next());
                    self.floor = at;
                    self.backlog.push_back((end_lsn, t.changes.len()));
                    new_txns += 1;
                    let total = t.changes.len();
                    let mut chunk = Vec::with_capacity(total.min(ITEM_MESSAGES));
                    for (i, c) in t.changes.into_iter().enumerate() {
                        chunk.push(encode::message(
                            c.after.as_deref(),
                            c.before.as_deref(),
                            &c.key,
                            &c.topic,
                            at,
                        ));
                        let last = i + 1 == total;
                        if chunk.len() == ITEM_MESSAGES || last {
                            let item = Item::Rows {
                                messages: std::mem::take(&mut chunk),
                                end_lsn: last.then_some(end_lsn),
                                updated_nanos: at.nanos(),
                            };
                            if items.send(item).await.is_err() {
                                return Ok((new_txns, false));
                            }
                        }
                    }
                }
                Message::Type { .. } | Message::Other(_) => {}
            }
        }
        Ok((new_txns, exhausted))
    }

    /// The shape of a described relation; `None` when it is not fed.
    fn shape_of(&self, rel: u32) -> Result<Option<&Shape>, FeedError> {
        self.shapes.get(&rel).map(Option::as_ref).ok_or_else(|| {
            FeedError::Decode(format!("change of relation {rel} before its description"))
        })
    }

    fn object(
        &self,
        shape: &Shape,
        datums: &[Datum],
        fallback: Option<&[Datum]>,
    ) -> Result<String, FeedError> {
        let mut missing = Vec::new();
        let out = shape.object(datums, fallback, &mut missing)?;
        if !missing.is_empty() {
            error!(table = %shape.topic, columns = ?missing, "unchanged toasted values without an old row; columns left out (set replica identity full before writing)");
        }
        Ok(out)
    }

    fn insert(&self, t: &mut Txn, rel: u32, new: &[Datum]) -> Result<(), FeedError> {
        let Some(shape) = self.shape_of(rel)? else {
            return Ok(());
        };
        t.changes.push(Change {
            topic: shape.topic.clone(),
            after: Some(self.object(shape, new, None)?),
            before: self.diff.then(|| "null".to_string()),
            key: shape.key(new)?,
        });
        Ok(())
    }

    fn update(
        &self,
        t: &mut Txn,
        rel: u32,
        old: Option<&[Datum]>,
        new: &[Datum],
    ) -> Result<(), FeedError> {
        let Some(shape) = self.shape_of(rel)? else {
            return Ok(());
        };
        let key = shape.key(new)?;
        let before = match old {
            Some(o) => Some(self.object(shape, o, None)?),
            None => None,
        };
        if let Some(o) = old {
            let old_key = shape.key(o)?;
            if old_key != key {
                // A primary-key change is a delete of the old key and an insert of the new.
                t.changes.push(Change {
                    topic: shape.topic.clone(),
                    after: None,
                    before: if self.diff { before.clone() } else { None },
                    key: old_key,
                });
                t.changes.push(Change {
                    topic: shape.topic.clone(),
                    after: Some(self.object(shape, new, old)?),
                    before: self.diff.then(|| "null".to_string()),
                    key,
                });
                return Ok(());
            }
        }
        t.changes.push(Change {
            topic: shape.topic.clone(),
            after: Some(self.object(shape, new, old)?),
            before: if self.diff {
                Some(before.unwrap_or_else(|| "null".into()))
            } else {
                None
            },
            key,
        });
        Ok(())
    }

    fn delete(&self, t: &mut Txn, rel: u32, old: &[Datum]) -> Result<(), FeedError> {
        let Some(shape) = self.shape_of(rel)? else {
            return Ok(());
        };
        let before = if self.diff {
            Some(self.object(shape, old, None)?)
        } else {
            None
        };
        t.changes.push(Change {
            topic: shape.topic.clone(),
            after: None,
            before,
            key: shape.key(old)?,
        });
        Ok(())
    }

    /// The shape of a relation message's table; `None` for a table we do not feed.
    fn shape(&self, r: &Relation) -> Result<Option<Shape>, FeedError> {
        let Some(table) = self
            .tables
            .iter()
            .find(|t| t.schema == r.namespace && t.name == r.name)
        else {
            debug!(schema = %r.namespace, table = %r.name, "ignoring changes of a table that is not fed");
            return Ok(None);
        };
        let mut columns: Vec<(String, Kind, usize)> = r
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let kind = Kind::builtin(c.type_oid)
                    .or_else(|| self.kinds.get(&c.type_oid).cloned())
                    .unwrap_or(Kind::Text);
                (c.name.clone(), kind, i)
            })
            .collect();
        columns.sort_by(|a, b| a.0.cmp(&b.0));
        let key = table
            .key
            .iter()
            .map(|k| {
                r.columns.iter().position(|c| c.name == *k).ok_or_else(|| {
                    FeedError::Decode(format!(
                        "primary-key column {k} of {}.{} is not in the change",
                        r.namespace, r.name
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Shape {
            topic: r.name.clone(),
            columns,
            key,
        }))
    }

    /// Looks up the non-builtin column types of `relations` (domains, enums, their arrays).
    async fn resolve_kinds(
        &mut self,
        conn: &mut PgConnection,
        relations: &[&Relation],
    ) -> Result<(), FeedError> {
        let roots: Vec<u32> = relations
            .iter()
            .flat_map(|r| r.columns.iter().map(|c| c.type_oid))
            .filter(|o| Kind::builtin(*o).is_none() && !self.kinds.contains_key(o))
            .collect();
        let mut facts: HashMap<u32, TypeFacts> = HashMap::new();
        let mut wanted = roots.clone();
        // Domains and arrays point at other types; a few rounds cover any sane nesting.
        for _ in 0..6 {
            wanted.retain(|o| Kind::builtin(*o).is_none() && !facts.contains_key(o));
            wanted.sort_unstable();
            wanted.dedup();
            if wanted.is_empty() {
                break;
            }
            let oids: Vec<i64> = wanted.iter().map(|o| i64::from(*o)).collect();
            let rows: Vec<(i64, String, String, i64, String, i64)> = sqlx::query_as(
                "SELECT oid::int8, typtype::text, typcategory::text, typelem::int8, \
                 typdelim::text, typbasetype::int8 FROM pg_type WHERE oid::int8 = ANY($1)",
            )
            .bind(&oids)
            .fetch_all(&mut *conn)
            .await
            .map_err(FeedError::source("look up column types"))?;
            wanted.clear();
            for (oid, typtype, category, elem, delim, base) in rows {
                let f = TypeFacts {
                    typtype: typtype.bytes().next().unwrap_or(b'b'),
                    category: category.bytes().next().unwrap_or(b'U'),
                    elem: elem as u32,
                    delim: delim.bytes().next().unwrap_or(b','),
                    base: base as u32,
                };
                wanted.extend([f.elem, f.base].into_iter().filter(|o| *o != 0));
                facts.insert(oid as u32, f);
            }
        }
        for oid in roots {
            let kind = kind_from_facts(oid, &facts, 0);
            self.kinds.insert(oid, kind);
        }
        Ok(())
    }

    async fn probe_step(&mut self, conn: &mut PgConnection) -> Result<(), FeedError> {
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
    async fn resolve(&mut self, items: &mpsc::Sender<Item>) -> Result<(), FeedError> {
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

/// What `pg_type` says about a non-builtin type.
struct TypeFacts {
    typtype: u8,
    category: u8,
    elem: u32,
    delim: u8,
    base: u32,
}

fn kind_from_facts(oid: u32, facts: &HashMap<u32, TypeFacts>, depth: u8) -> Kind {
    if let Some(k) = Kind::builtin(oid) {
        return k;
    }
    let Some(f) = facts.get(&oid) else {
        return Kind::Text;
    };
    if depth > 8 {
        return Kind::Text;
    }
    if f.typtype == b'd' {
        return kind_from_facts(f.base, facts, depth + 1);
    }
    let element =
        (f.category == b'A' && f.elem != 0).then(|| kind_from_facts(f.elem, facts, depth + 1));
    Kind::from_category(f.category, element, f.delim)
}

/// The source clock in whole Unix microseconds (commit times have the same resolution).
const CLOCK_SQL: &str = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8";

async fn flush_lsn(conn: &mut PgConnection) -> Result<Lsn, FeedError> {
    let l: i64 = sqlx::query_scalar("SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(conn)
        .await
        .map_err(FeedError::source("read the flushed wal position"))?;
    Ok(Lsn(l as u64))
}

/// Runs one statement without preparing it (DDL, cursors, settings).
async fn execute(conn: &mut PgConnection, sql: &str, what: &str) -> Result<(), FeedError> {
    sqlx::query(sql)
        .persistent(false)
        .execute(conn)
        .await
        .map_err(FeedError::source(what))?;
    Ok(())
}

/// Hands over an item; false when cancelled or the sender is gone.
async fn send(items: &mpsc::Sender<Item>, cancel: &CancellationToken, item: Item) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        r = items.send(item) => r.is_ok(),
    }
}
