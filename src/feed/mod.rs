//! `cdc-sink feed`: a changefeed emulator for a PostgreSQL source, standing in for CockroachDB
//! where it cannot run.
//!
//! ```text
//! source (pgoutput slot, peeked) ──▶ reader ──items──▶ sender ──HTTPS──▶ sink
//!        ▲                                                │ acknowledged LSN
//!        └──────── pg_replication_slot_advance ◀──────────┘
//! ```
//!
//! The [`source`] reader peeks the slot with `pg_logical_slot_peek_binary_changes` (so nothing
//! is consumed), turns each committed transaction into CockroachDB webhook messages whose
//! `updated` is the commit time (plus a logical counter so it always increases), and proves
//! resolved timestamps. The [`sender`] batches by bytes and time, posts with retries and only
//! then reports the LSN as acknowledged; the reader advances the slot to it. A restarted feed
//! therefore re-sends whatever was not acknowledged: at-least-once, like CockroachDB.
//! The reader's other parts sit beside it: `setup.rs` (tables, publication, slot), `scan.rs`
//! (the initial scan), `shape.rs` (column kinds and row changes) and `probe.rs` (the proof of
//! resolved timestamps).
//!
//! Source requirements: `wal_level=logical` and a free replication slot. The feed sets
//! `REPLICA IDENTITY FULL` on the fed tables (so updates carry unchanged TOAST values and
//! `--diff` has before images) and creates a publication named after the slot.
//!
//! Limits: a transaction is held in memory whole; an initial scan interrupted by a restart is
//! not resumed (drop the slot to start over); `TRUNCATE` is not replicated (logged).

pub(crate) mod encode;
pub(crate) mod pgoutput;
mod probe;
mod scan;
mod sender;
mod setup;
mod shape;
mod source;

use crate::config::{parse_bytes, parse_duration};
use crate::error::ErrorChain;
use crate::ident::{parse_dotted, IdentError};
use crate::server::client::{Client, ClientError, ClientOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Flags of `cdc-sink feed`.
#[derive(clap::Args, Debug, Clone)]
pub struct FeedArgs {
    /// Source PostgreSQL URL (wal_level=logical); the database is the one of --tables.
    #[arg(long = "source", env = "CDC_SINK_FEED_SOURCE")]
    pub(crate) source: String,
    /// Tables to feed, as db.schema.table (comma-separated or repeated; one database).
    #[arg(long = "tables", value_delimiter = ',', required = true)]
    pub(crate) tables: Vec<String>,
    /// Sink URL: https://host:port/<target db>/<schema>.
    #[arg(long = "sink", env = "CDC_SINK_FEED_SINK")]
    pub(crate) sink: String,
    /// Do not verify the sink's certificate (insecure_tls_skip_verify).
    #[arg(long = "insecureSkipVerify")]
    pub insecure_skip_verify: bool,
    /// PEM file of the CA (or self-signed certificate) the sink's certificate must chain to.
    #[arg(long = "caCert")]
    pub ca_cert: Option<PathBuf>,
    /// Authorization header value, e.g. "Bearer <jwt>" (webhook_auth_header).
    #[arg(long = "authHeader", env = "CDC_SINK_FEED_AUTH_HEADER")]
    pub(crate) auth_header: Option<String>,
    /// Resolved timestamp period; 0 disables resolved messages.
    #[arg(long = "resolved", default_value = "1s", value_parser = parse_duration)]
    pub resolved: Duration,
    /// Send a batch once it holds this many bytes.
    #[arg(long = "flushBytes", default_value = "1MiB", value_parser = parse_bytes)]
    pub flush_bytes: u64,
    /// Send a non-empty batch at the latest this long after its first message.
    #[arg(long = "flushFrequency", default_value = "1s", value_parser = parse_duration)]
    pub flush_frequency: Duration,
    /// Include before images (the changefeed `diff` option).
    #[arg(long = "diff")]
    pub diff: bool,
    /// Send the existing rows first, when the slot is created.
    #[arg(long = "initialScan")]
    pub initial_scan: bool,
    /// Replication slot (and publication) name.
    #[arg(long = "slot", default_value = "cdc_sink_feed")]
    pub(crate) slot: String,
    /// Fault injection: probability of re-sending an earlier batch after each one.
    #[arg(long = "chaos", default_value_t = 0.0)]
    pub chaos: f64,
    /// A sink answer slower than this is a failure (webhook_client_timeout).
    #[arg(long = "clientTimeout", default_value = "10s", value_parser = parse_duration)]
    pub(crate) client_timeout: Duration,
    /// First retry delay; doubles up to --retryMaxBackoff.
    #[arg(long = "retryBackoff", default_value = "500ms", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// Longest retry delay.
    #[arg(long = "retryMaxBackoff", default_value = "30s", value_parser = parse_duration)]
    pub retry_max_backoff: Duration,
    /// How often an idle feed looks for new changes.
    #[arg(long = "pollInterval", default_value = "100ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
}

impl FeedArgs {
    /// Defaults for everything but the three required flags.
    pub fn new(source: &str, tables: &[&str], sink: &str) -> FeedArgs {
        FeedArgs {
            source: source.to_string(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            sink: sink.to_string(),
            insecure_skip_verify: false,
            ca_cert: None,
            auth_header: None,
            resolved: Duration::from_secs(1),
            flush_bytes: 1 << 20,
            flush_frequency: Duration::from_secs(1),
            diff: false,
            initial_scan: false,
            slot: "cdc_sink_feed".into(),
            chaos: 0.0,
            client_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), FeedError> {
        let bad = |m: &str| Err(FeedError::Config(m.to_string()));
        if !(0.0..=1.0).contains(&self.chaos) {
            return bad("--chaos must be a probability between 0 and 1");
        }
        if self.flush_bytes == 0 {
            return bad("--flushBytes must be positive");
        }
        if self.retry_backoff.is_zero() || self.retry_max_backoff < self.retry_backoff {
            return bad("--retryBackoff must be positive and at most --retryMaxBackoff");
        }
        if self.poll_interval.is_zero() || self.client_timeout.is_zero() {
            return bad("--pollInterval and --clientTimeout must be positive");
        }
        let slot_ok = !self.slot.is_empty()
            && self.slot.len() <= 63
            && self
                .slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !slot_ok {
            return bad("--slot may contain only lower-case letters, digits and '_' (at most 63)");
        }
        if self.insecure_skip_verify == self.ca_cert.is_some() && self.sink.starts_with("https") {
            return bad("an https sink needs exactly one of --insecureSkipVerify and --caCert");
        }
        self.table_names()?;
        sink_url(&self.sink)?;
        Ok(())
    }

    /// `(database, schema, table)` of each --tables entry; `schema.t` and `t` default to the
    /// source URL's database and `public`.
    fn table_names(&self) -> Result<Vec<(Option<String>, String, String)>, FeedError> {
        let mut out = Vec::new();
        for t in &self.tables {
            let parts = parse_dotted(t.trim()).map_err(FeedError::TableName)?;
            let raw: Vec<String> = parts.iter().map(|p| p.raw().to_string()).collect();
            out.push(match raw.as_slice() {
                [t] => (None, "public".into(), t.clone()),
                [s, t] => (None, s.clone(), t.clone()),
                [d, s, t] => (Some(d.clone()), s.clone(), t.clone()),
                _ => return Err(FeedError::TableName(IdentError::TooManyParts(t.clone(), 3))),
            });
        }
        if out.is_empty() {
            return Err(FeedError::Config("--tables names no table".into()));
        }
        let dbs: std::collections::BTreeSet<_> = out.iter().filter_map(|t| t.0.clone()).collect();
        if dbs.len() > 1 {
            return Err(FeedError::Config(
                "--tables must all be in one database".into(),
            ));
        }
        Ok(out)
    }
}

/// Splits `https://host:port/db/schema` into the client base and the request path.
fn sink_url(url: &str) -> Result<(String, String), FeedError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| FeedError::Config(format!("--sink {url:?} is not a URL")))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(FeedError::Config(format!(
            "--sink {url:?} needs a scheme and a host"
        )));
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if path.trim_matches('/').is_empty() {
        return Err(FeedError::Config(format!(
            "--sink {url:?} needs a path naming the target, e.g. /db/public"
        )));
    }
    Ok((format!("{scheme}://{authority}"), path.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{0}")]
    Config(String),
    #[error("invalid table name")]
    TableName(#[source] IdentError),
    #[error("could not read {0}")]
    CaCert(PathBuf, #[source] std::io::Error),
    #[error("invalid sink client settings")]
    Client(#[source] ClientError),
    #[error("invalid --source")]
    SourceUrl(#[source] crate::target::TargetError),
    #[error("source: {what}")]
    Source {
        what: String,
        #[source]
        source: sqlx::Error,
    },
    /// The source is reachable but not usable as asked (missing table, no primary key, …).
    #[error("{0}")]
    Setup(String),
    #[error("could not decode a change: {0}")]
    Decode(String),
}

impl FeedError {
    pub(crate) fn source(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> FeedError {
        let what = what.into();
        move |source| FeedError::Source { what, source }
    }

    /// Worth retrying once the feed has started: the source may come back, or another
    /// process may release the slot (55006); a statement the source refuses will not improve.
    fn is_transient(&self) -> bool {
        match self {
            FeedError::Source { source, .. } => {
                crate::target::is_unavailable(source) || crate::target::sqlstate(source) == "55006"
            }
            FeedError::Setup(_) => true,
            _ => false,
        }
    }
}

/// Counters of a running feed, for the demo's summary (also exported as metrics).
#[derive(Debug, Default)]
pub struct FeedStats {
    pub(crate) batches: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub retries: AtomicU64,
    pub chaos_resends: AtomicU64,
    pub(crate) resolved_sent: AtomicU64,
    /// Nanoseconds of the newest acknowledged resolved timestamp (0 before the first).
    pub(crate) resolved_nanos: AtomicI64,
    /// Nanoseconds of the newest acknowledged `updated`.
    pub(crate) updated_nanos: AtomicI64,
}

impl FeedStats {
    /// Seconds between now and the newest acknowledged resolved timestamp, once there is one.
    pub(crate) fn lag(&self) -> Option<f64> {
        let r = self.resolved_nanos.load(Ordering::Relaxed);
        (r > 0).then(|| {
            let now = crate::hlc::Hlc::from_system_time(std::time::SystemTime::now());
            (now.nanos() - r) as f64 / 1e9
        })
    }
}

/// A configured feed; [`Feed::run`] drives it until cancelled.
pub struct Feed {
    args: FeedArgs,
    client: Client,
    path: String,
    stats: Arc<FeedStats>,
}

impl Feed {
    pub fn new(args: FeedArgs) -> Result<Feed, FeedError> {
        args.validate()?;
        let (base, path) = sink_url(&args.sink)?;
        let ca_cert_pem = match &args.ca_cert {
            Some(p) => Some(std::fs::read(p).map_err(|e| FeedError::CaCert(p.clone(), e))?),
            None => None,
        };
        let headers = args
            .auth_header
            .iter()
            .map(|v| ("authorization".to_string(), v.clone()))
            .collect();
        let client = Client::new(
            &base,
            ClientOptions {
                insecure_skip_verify: args.insecure_skip_verify,
                ca_cert_pem,
                http2: true,
                headers,
                ..Default::default()
            },
        )
        .map_err(FeedError::Client)?;
        Ok(Feed {
            args,
            client,
            path,
            stats: Arc::new(FeedStats::default()),
        })
    }

    pub fn stats(&self) -> Arc<FeedStats> {
        self.stats.clone()
    }

    /// Runs until `cancel` fires (then `Ok`) or the source fails in a way retrying cannot fix.
    /// Source and sink outages are retried for ever, with WARN logs.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), FeedError> {
        describe_metrics();
        let tables = self.args.table_names()?;
        let (items_tx, items_rx) = mpsc::channel(64);
        let (acked_tx, acked_rx) = watch::channel(pgoutput::Lsn(0));
        let stop = cancel.child_token();
        let reader = source::Reader::new(&self.args, tables)?;
        let send = sender::Sender::new(
            &self.args,
            self.client.clone(),
            self.path.clone(),
            self.stats.clone(),
        );
        tracing::info!(slot = %self.args.slot, sink = %self.path, diff = self.args.diff, chaos = self.args.chaos, "feed starting");
        let sender_task = tokio::spawn({
            let stop = stop.clone();
            async move { send.run(items_rx, acked_tx, stop).await }
        });
        let result = reader.run(items_tx, acked_rx, stop.clone()).await;
        stop.cancel();
        let _ = sender_task.await;
        match &result {
            Ok(()) => tracing::info!(slot = %self.args.slot, "feed stopped"),
            Err(e) => {
                tracing::error!(slot = %self.args.slot, error = %ErrorChain(e), "feed failed")
            }
        }
        result
    }
}

fn describe_metrics() {
    use crate::metrics as m;
    use metrics::{describe_counter, describe_gauge, Unit};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        describe_counter!(m::FEED_BATCHES, "webhook batches acknowledged by the sink");
        describe_counter!(m::FEED_MESSAGES, "row messages acknowledged by the sink");
        describe_counter!(m::FEED_BYTES, Unit::Bytes, "payload bytes acknowledged");
        describe_counter!(m::FEED_RETRIES, "sink requests retried after a failure");
        describe_counter!(m::FEED_CHAOS_RESENDS, "batches re-sent by --chaos");
        describe_counter!(m::FEED_RESOLVED, "resolved timestamps acknowledged");
        describe_counter!(m::FEED_SOURCE_ERRORS, "source errors (reconnects)");
        describe_gauge!(
            m::FEED_LAG,
            Unit::Seconds,
            "now minus the newest acknowledged resolved timestamp"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo spawns feeds on the multi-threaded runtime.
    #[allow(dead_code)]
    fn run_is_send(feed: Feed) {
        fn is_send<T: Send>(_: T) {}
        is_send(feed.run(CancellationToken::new()));
    }

    #[test]
    fn flags_are_checked() {
        let ok = || {
            let mut a = FeedArgs::new("postgres://x/", &["kv.public.kv"], "https://h:1/kv/public");
            a.insecure_skip_verify = true;
            a
        };
        assert!(ok().validate().is_ok());
        let mut a = ok();
        a.chaos = 1.5;
        assert!(a.validate().is_err());
        let mut a = ok();
        a.slot = "Bad-Slot".into();
        assert!(a.validate().is_err());
        let mut a = ok();
        a.insecure_skip_verify = false;
        assert!(a.validate().is_err(), "https needs a trust choice");
        let mut a = ok();
        a.tables = vec!["a.public.x".into(), "b.public.y".into()];
        assert!(a.validate().is_err(), "one database");
        let mut a = ok();
        a.sink = "https://h:1".into();
        assert!(a.validate().is_err(), "path needed");
        assert_eq!(
            sink_url("https://127.0.0.1:9/kv/public").expect("ok"),
            ("https://127.0.0.1:9".to_string(), "/kv/public".to_string())
        );
        let names = ok().table_names().expect("names");
        assert_eq!(names[0], (Some("kv".into()), "public".into(), "kv".into()));
    }
}
