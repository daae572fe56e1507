//! The reader of a PostgreSQL source: its state, the session loop (connect, set up, scan once,
//! then peek until cancelled, reconnecting after source errors), and the peek itself, which
//! hands committed transactions to the sender in commit order and advances the slot once the
//! sender reports them acknowledged. Set-up, the initial scan, row shaping and the
//! resolved-timestamp probe are `impl Reader` blocks in `setup.rs`, `scan.rs`, `shape.rs` and
//! `probe.rs` beside this file.

use super::encode::{self, Kind, Shape};
use super::pgoutput::{self, Lsn, Message, Relation};
use super::probe::{flush_lsn, Probe};
use super::shape::Txn;
use super::{FeedArgs, FeedError};
use crate::error::ErrorChain;
use crate::hlc::Hlc;
use crate::metrics as m;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::ConnectOptions;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Messages per item handed to the sender, so one huge transaction streams.
pub(super) const ITEM_MESSAGES: usize = 1000;
/// New rows asked of one peek (besides those already read but not yet acknowledged).
const PEEK_ROWS: usize = 10_000;
/// Read-but-unacknowledged rows after which reading pauses (each peek decodes them again).
const MAX_BACKLOG_ROWS: usize = 50_000;
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

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
pub(super) struct FedTable {
    pub(super) schema: String,
    pub(super) name: String,
    /// Primary-key column names in key order (filled at set-up).
    pub(super) key: Vec<String>,
}

pub(super) struct Reader {
    pub(super) connect: PgConnectOptions,
    pub(super) slot: String,
    pub(super) publication: String,
    pub(super) tables: Vec<FedTable>,
    pub(super) diff: bool,
    pub(super) initial_scan: bool,
    pub(super) resolved: Duration,
    pub(super) poll: Duration,
    /// Shapes by relation OID, from relation messages (kept across peeks and reconnects).
    /// `None` for tables the publication has but we do not feed.
    pub(super) shapes: HashMap<u32, Option<Shape>>,
    pub(super) kinds: HashMap<u32, Kind>,
    /// End LSN of the newest transaction handed to the sender.
    pub(super) read: Lsn,
    /// The slot's confirmed position as far as we know.
    pub(super) advanced: Lsn,
    /// Every `updated` and resolved timestamp so far is ≤ floor.
    pub(super) floor: Hlc,
    /// `(end LSN, rows)` of transactions read but not yet acknowledged.
    pub(super) backlog: VecDeque<(Lsn, usize)>,
    pub(super) probe: Probe,
    pub(super) started: bool,
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
}

/// Runs one statement without preparing it (DDL, cursors, settings).
pub(super) async fn execute(
    conn: &mut PgConnection,
    sql: &str,
    what: &str,
) -> Result<(), FeedError> {
    sqlx::query(sql)
        .persistent(false)
        .execute(conn)
        .await
        .map_err(FeedError::source(what))?;
    Ok(())
}
