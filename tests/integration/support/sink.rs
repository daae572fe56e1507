//! An in-process sink server over TLS, and builders of changefeed payloads.

use super::Db;
use bytes::Bytes;
use cdc_sink::hlc::Hlc;
use cdc_sink::server::client::{Client, ClientOptions};
use cdc_sink::sink::{launch, loopback_argv, prepare, Running};
use http::StatusCode;
use serde_json::{json, Value};

/// A running sink in front of `db`, with an HTTP/2 TLS client aimed at it.
pub(crate) struct Sink {
    running: Option<Running>,
    pub client: Client,
}

impl Sink {
    /// Starts a sink on a random port with a self-signed certificate; `extra` adds flags.
    /// Consistent mode is pinned (`--bestEffortWindow=0`): the payload builders' 2023 times
    /// would otherwise look years behind and select best-effort mode. A test that wants the
    /// automatic selection passes its own `--bestEffortWindow`, which wins as the later flag.
    pub(crate) async fn start(db: &Db, extra: &[&str]) -> Sink {
        Sink::start_url(&db.url(), extra).await
    }

    /// Like [`Sink::start`], in front of the database at `url`.
    pub(crate) async fn start_url(url: &str, extra: &[&str]) -> Sink {
        let mut flags = vec!["--bestEffortWindow=0"];
        flags.extend_from_slice(extra);
        let argv = loopback_argv(url, &flags);
        let prepared = prepare(argv).expect("valid flags");
        let running = launch(prepared).await.expect("sink starts");
        let client = Client::new(
            &format!("https://{}", running.addr),
            ClientOptions {
                insecure_skip_verify: true,
                ..Default::default()
            },
        )
        .expect("client");
        Sink {
            running: Some(running),
            client,
        }
    }

    /// The address the sink listens on.
    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().expect("running").addr
    }

    /// The `--metricsAddr` listener, when the sink was started with one.
    pub(crate) fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.running.as_ref().expect("running").metrics_addr
    }

    pub(crate) async fn post(&self, path: &str, body: impl Into<String>) -> (StatusCode, String) {
        self.client
            .post(path, Bytes::from(body.into()))
            .await
            .expect("request reaches the sink")
    }

    /// Posts and insists on 200.
    pub(crate) async fn post_ok(&self, path: &str, body: impl Into<String>) {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }

    /// The Prometheus text of `/_/varz`. The recorder is shared by every sink of the test
    /// process: read series of a schema no other test uses.
    pub(crate) async fn metrics(&self) -> String {
        let (status, text) = self
            .client
            .get("/_/varz")
            .await
            .expect("metrics reach the sink");
        assert_eq!(status, StatusCode::OK, "{text}");
        text
    }

    pub(crate) async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
    }
}

/// `nanos.logical` text of an HLC at second `s` (small numbers keep tests readable).
pub(crate) fn ts(s: i64) -> String {
    Hlc::new(1_700_000_000_000_000_000 + s * 1_000_000_000, 0).to_string()
}

pub(crate) fn hlc(s: i64) -> Hlc {
    Hlc::new(1_700_000_000_000_000_000 + s * 1_000_000_000, 0)
}

/// One upsert element for a `kv(k, v)` style table.
pub(crate) fn upsert(topic: &str, key: Value, after: Value, at: i64) -> Value {
    json!({"after": after, "key": key, "topic": topic, "updated": ts(at)})
}

/// One delete element.
pub(crate) fn delete(topic: &str, key: Value, at: i64) -> Value {
    json!({"after": null, "key": key, "topic": topic, "updated": ts(at)})
}

/// A webhook body carrying `elements`.
pub(crate) fn batch(elements: Vec<Value>) -> String {
    let n = elements.len();
    json!({"payload": elements, "length": n}).to_string()
}

/// A resolved-timestamp body.
pub(crate) fn resolved(at: i64) -> String {
    json!({"resolved": ts(at)}).to_string()
}

/// The checkpoint of `group` (e.g. `kv.public`) is committed at `at` or later.
pub(crate) async fn is_committed(pool: &sqlx::PgPool, group: &str, at: Hlc) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM _cdc_sink.checkpoints WHERE group_name = $1 AND source_hlc >= $2::DECIMAL AND target_applied_at IS NOT NULL",
    )
    .bind(group)
    .bind(at.to_decimal())
    .fetch_one(pool)
    .await
    .unwrap_or(0);
    n > 0
}

/// Waits until the checkpoint of `group` is committed at `at` or later.
pub(crate) async fn committed(pool: &sqlx::PgPool, group: &str, at: Hlc) {
    super::eventually(
        "checkpoint commit",
        std::time::Duration::from_secs(20),
        || async { is_committed(pool, group, at).await.then_some(()) },
    )
    .await
}
