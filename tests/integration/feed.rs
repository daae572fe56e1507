//! The changefeed emulator against real PostgreSQL: envelope and encodings, diff, deletes,
//! resolved ordering, retries, re-delivery after restart, and chaos into a real sink.

use crate::support::http::args as server_args;
use crate::support::{eventually, Db};
use cdc_sink::feed::{Feed, FeedArgs, FeedError, FeedStats};
use cdc_sink::hlc::Hlc;
use cdc_sink::server::{self, Handler, Request, Response};
use cdc_sink::sink::{launch, prepare, Running};
use cdc_sink::verify::{self, CompareOptions, TableRef};
use cdc_sink::workload::kv::{self as kv_workload, KvArgs};
use futures::future::BoxFuture;
use futures::FutureExt;
use http::StatusCode;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// A sink stand-in that records every request with the status it answered, failing the first
/// `fail` requests with 503 (with `fail == usize::MAX`: every request carrying rows).
#[derive(Clone)]
struct Flaky(Arc<FlakyState>);

struct FlakyState {
    fail: AtomicUsize,
    seen: Mutex<Vec<(StatusCode, String)>>,
}

impl Handler for Flaky {
    fn changefeed(&self, req: Request) -> BoxFuture<'static, Response> {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let failing = if self.0.fail.load(Ordering::SeqCst) == usize::MAX {
            body.contains("\"payload\"")
        } else {
            self.0
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let status = if failing {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        self.0.seen.lock().expect("lock").push((status, body));
        async move { Response::text(status, if failing { "unavailable" } else { "OK" }) }.boxed()
    }

    fn health(&self) -> BoxFuture<'static, Result<(), String>> {
        async { Ok(()) }.boxed()
    }
}

struct TestSink {
    url: String,
    cert_pem: Option<String>,
    handler: Flaky,
    task: JoinHandle<Result<(), server::ServerError>>,
}

impl TestSink {
    async fn start(fail: usize, tls: bool) -> TestSink {
        let mut args = server_args();
        args.tls_self_signed = tls;
        let handler = Flaky(Arc::new(FlakyState {
            fail: AtomicUsize::new(fail),
            seen: Mutex::new(Vec::new()),
        }));
        let bound = server::bind(&args).await.expect("bind");
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{}/kv/public", bound.local_addr());
        let cert_pem = bound.certificate_pem().map(str::to_string);
        let h: Arc<dyn Handler> = Arc::new(handler.clone());
        let task = tokio::spawn(bound.serve(h, std::future::pending()));
        TestSink {
            url,
            cert_pem,
            handler,
            task,
        }
    }

    fn seen(&self) -> Vec<(StatusCode, String)> {
        self.handler.0.seen.lock().expect("lock").clone()
    }

    /// Acknowledged requests, in order.
    fn accepted(&self) -> Vec<Delivery> {
        self.seen()
            .into_iter()
            .filter(|(s, _)| *s == StatusCode::OK)
            .map(|(_, b)| Delivery::parse(&b))
            .collect()
    }
}

impl Drop for TestSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One webhook request: row messages (exact text) or a resolved timestamp.
#[derive(Debug, Clone)]
enum Delivery {
    Rows(Vec<String>),
    Resolved(Hlc),
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    payload: Option<Vec<&'a RawValue>>,
    length: Option<usize>,
    resolved: Option<String>,
}

impl Delivery {
    fn parse(body: &str) -> Delivery {
        let e: Envelope = serde_json::from_str(body).expect("webhook body is valid json");
        if let Some(r) = e.resolved {
            assert!(e.payload.is_none());
            return Delivery::Resolved(r.parse().expect("resolved is an hlc"));
        }
        let rows: Vec<String> = e
            .payload
            .expect("payload")
            .iter()
            .map(|r| r.get().to_string())
            .collect();
        assert_eq!(e.length, Some(rows.len()), "length matches the payload");
        Delivery::Rows(rows)
    }
}

/// Every acknowledged row message, in order.
fn rows(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .flat_map(|d| match d {
            Delivery::Rows(r) => r.clone(),
            Delivery::Resolved(_) => vec![],
        })
        .collect()
}

/// The message's `updated`, and the message with it replaced by `U`.
fn split_updated(message: &str) -> (Hlc, String) {
    let marker = "\"updated\": \"";
    let start = message.find(marker).expect("updated present") + marker.len();
    let end = start + message[start..].find('"').expect("closing quote");
    let hlc = message[start..end].parse().expect("updated is an hlc");
    (hlc, format!("{}U{}", &message[..start], &message[end..]))
}

struct RunningFeed {
    cancel: CancellationToken,
    task: JoinHandle<Result<(), FeedError>>,
    stats: Arc<FeedStats>,
}

impl RunningFeed {
    fn start(args: FeedArgs) -> RunningFeed {
        let feed = Feed::new(args).expect("valid feed");
        let stats = feed.stats();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(feed.run(cancel.clone()));
        RunningFeed {
            cancel,
            task,
            stats,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("feed stops in time")
            .expect("feed task")
            .expect("feed ends cleanly");
    }
}

/// Feed logs in test output (shown for failing tests).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("cdc_sink::feed=debug")
        .with_test_writer()
        .try_init();
}

/// Waits until a feed created its replication slot: changes from then on are fed.
async fn slot_ready(db: &Db) {
    eventually("replication slot", WAIT, || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (n >= 1).then_some(())
    })
    .await
}

/// Fast feed settings for tests.
fn feed_args(db: &Db, table: &str, sink: &TestSink) -> FeedArgs {
    let mut a = FeedArgs::new(&db.url(), &[table], &sink.url);
    a.resolved = Duration::from_millis(200);
    a.flush_frequency = Duration::from_millis(50);
    a.poll_interval = Duration::from_millis(20);
    a.retry_backoff = Duration::from_millis(20);
    a.retry_max_backoff = Duration::from_millis(200);
    a
}

/// Waits until the sink acknowledged `n` row messages and then a resolved timestamp.
async fn settled(sink: &TestSink, n: usize) -> Vec<Delivery> {
    eventually("rows and a later resolved timestamp", WAIT, || async {
        let d = sink.accepted();
        let last_rows = d.iter().rposition(|x| matches!(x, Delivery::Rows(_)));
        let resolved_after = d
            .iter()
            .enumerate()
            .any(|(i, x)| matches!(x, Delivery::Resolved(_)) && last_rows.is_none_or(|l| i > l));
        (rows(&d).len() >= n && resolved_after).then_some(d)
    })
    .await
}

#[tokio::test]
async fn messages_carry_cockroachdb_envelope_and_encodings() {
    logs();
    let db = Db::new("src").await;
    db.exec(
        "CREATE TABLE public.types (id INT8 PRIMARY KEY, big INT8, small INT2, n NUMERIC, \
         f FLOAT8, s TEXT, vc VARCHAR(20), b BYTEA, ok BOOL, ts TIMESTAMPTZ, tsn TIMESTAMP, \
         d DATE, j JSONB, arr TEXT[], ints INT8[], u UUID, nul TEXT)",
    )
    .await;
    let sink = TestSink::start(0, true).await;
    let cert = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(cert.path(), sink.cert_pem.as_deref().expect("tls")).expect("write cert");
    let mut args = feed_args(&db, "src.public.types", &sink);
    args.ca_cert = Some(cert.path().to_path_buf());
    let feed = RunningFeed::start(args);
    slot_ready(&db).await;
    db.exec(
        r#"INSERT INTO public.types VALUES (1, 9007199254740995, -7,
           12345678901234567890.123456789, 1.5, E'it''s "quoted"\nline2 \\ ☃ é', 'abc',
           '\x0001ff', true, '2016-01-25 10:10:10.555555+00', '2016-01-25 10:10:10',
           '2016-01-25', '{"c": "d", "a": [1, 2.50, {"b": null}]}',
           '{sky,"road x","a\"b",NULL}', '{1,NULL,9007199254740995}',
           '6ba7b810-9dad-11d1-80b4-00c04fd430c8', NULL)"#,
    )
    .await;
    db.exec("INSERT INTO public.types (id) VALUES (2)").await;
    let deliveries = settled(&sink, 2).await;
    let messages = rows(&deliveries);
    assert_eq!(messages.len(), 2, "{messages:?}");
    let (t1, m1) = split_updated(&messages[0]);
    let (t2, m2) = split_updated(&messages[1]);
    assert_eq!(
        m1,
        r#"{"after": {"arr": ["sky", "road x", "a\"b", null], "b": "\\x0001ff", "big": 9007199254740995, "d": "2016-01-25", "f": 1.5, "id": 1, "ints": [1, null, 9007199254740995], "j": {"a": [1, 2.50, {"b": null}], "c": "d"}, "n": 12345678901234567890.123456789, "nul": null, "ok": true, "s": "it's \"quoted\"\nline2 \\ ☃ é", "small": -7, "ts": "2016-01-25T10:10:10.555555Z", "tsn": "2016-01-25T10:10:10", "u": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "vc": "abc"}, "key": [1], "topic": "types", "updated": "U"}"#
    );
    assert_eq!(
        m2,
        r#"{"after": {"arr": null, "b": null, "big": null, "d": null, "f": null, "id": 2, "ints": null, "j": null, "n": null, "nul": null, "ok": null, "s": null, "small": null, "ts": null, "tsn": null, "u": null, "vc": null}, "key": [2], "topic": "types", "updated": "U"}"#
    );
    // Separate transactions: increasing times, near the source's clock.
    assert!(t2 > t1, "{t1} < {t2}");
    let now = Hlc::from_system_time(std::time::SystemTime::now());
    assert!(
        (now.nanos() - t1.nanos()).abs() < 60_000_000_000,
        "{t1} vs {now}"
    );
    // Each row's value is exactly what the webhook decoder expects.
    let v: serde_json::Value = serde_json::from_str(&messages[0]).expect("json");
    assert_eq!(v["after"]["big"].to_string(), "9007199254740995");
    feed.stop().await;
}

#[tokio::test]
async fn diff_carries_before_images_and_deletes_carry_the_key() {
    logs();
    let db = Db::new("src").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let sink = TestSink::start(0, false).await;
    let mut args = feed_args(&db, "public.kv", &sink);
    args.diff = true;
    let feed = RunningFeed::start(args);
    slot_ready(&db).await;
    db.exec("INSERT INTO public.kv VALUES (1, 'a')").await;
    db.exec("UPDATE public.kv SET v = 'b' WHERE k = 1").await;
    db.exec("UPDATE public.kv SET k = 2 WHERE k = 1").await;
    db.exec("DELETE FROM public.kv WHERE k = 2").await;
    let deliveries = settled(&sink, 5).await;
    let messages = rows(&deliveries);
    let split: Vec<(Hlc, String)> = messages.iter().map(|m| split_updated(m)).collect();
    let texts: Vec<&str> = split.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            r#"{"after": {"k": 1, "v": "a"}, "before": null, "key": [1], "topic": "kv", "updated": "U"}"#,
            r#"{"after": {"k": 1, "v": "b"}, "before": {"k": 1, "v": "a"}, "key": [1], "topic": "kv", "updated": "U"}"#,
            r#"{"after": null, "before": {"k": 1, "v": "b"}, "key": [1], "topic": "kv", "updated": "U"}"#,
            r#"{"after": {"k": 2, "v": "b"}, "before": null, "key": [2], "topic": "kv", "updated": "U"}"#,
            r#"{"after": null, "before": {"k": 2, "v": "b"}, "key": [2], "topic": "kv", "updated": "U"}"#,
        ]
    );
    // The key change is one transaction: one time for its delete and insert.
    assert!(split[0].0 < split[1].0 && split[1].0 < split[2].0);
    assert_eq!(split[2].0, split[3].0);
    assert!(split[3].0 < split[4].0);
    feed.stop().await;
}

#[tokio::test]
async fn failed_requests_are_retried_and_resolved_follows_acknowledged_rows() {
    logs();
    let db = Db::new("src").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    // The first two requests fail with 503.
    let sink = TestSink::start(2, false).await;
    let feed = RunningFeed::start(feed_args(&db, "public.kv", &sink));
    slot_ready(&db).await;
    for i in 0..10 {
        db.exec(&format!(
            "INSERT INTO public.kv SELECT g, 'v' FROM generate_series({}, {}) g",
            i * 10,
            i * 10 + 9
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let deliveries = settled(&sink, 100).await;
    let seen = sink.seen();
    assert_eq!(seen[0].0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen[1].0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(seen[2].1, seen[0].1, "the failed request is sent again");
    assert!(feed.stats.retries.load(Ordering::Relaxed) >= 2);

    // Every row exactly once, in commit order.
    let messages = rows(&deliveries);
    let keys: Vec<i64> = messages
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_str(m).expect("json");
            v["key"][0].as_i64().expect("int key")
        })
        .collect();
    assert_eq!(keys, (0..100).collect::<Vec<_>>());

    // A resolved timestamp comes after every acknowledged row at or below it, and nothing
    // at or below it comes later; resolved timestamps increase.
    let mut resolved_so_far = Hlc::ZERO;
    let mut resolved_count = 0;
    for d in &deliveries {
        match d {
            Delivery::Rows(r) => {
                for m in r {
                    let (t, _) = split_updated(m);
                    assert!(t > resolved_so_far, "{t} after resolved {resolved_so_far}");
                }
            }
            Delivery::Resolved(r) => {
                assert!(*r >= resolved_so_far);
                resolved_so_far = *r;
                resolved_count += 1;
            }
        }
    }
    assert!(resolved_count >= 1);
    let newest_row = messages
        .iter()
        .map(|m| split_updated(m).0)
        .max()
        .expect("rows");
    assert!(
        resolved_so_far >= newest_row,
        "the last resolved timestamp covers every row"
    );
    feed.stop().await;
}

/// Whether the slot's confirmed position is at or past `lsn`.
async fn confirmed_past(db: &Db, lsn: &str) -> bool {
    sqlx::query_scalar(
        "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cdc_sink_feed'",
    )
    .bind(lsn)
    .fetch_one(&db.pool)
    .await
    .expect("slot")
}

async fn wal_position(db: &Db) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(&db.pool)
        .await
        .expect("wal position")
}

#[tokio::test]
async fn a_restarted_feed_resends_what_was_not_acknowledged() {
    logs();
    let db = Db::new("src").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    // A sink that never acknowledges rows.
    let down = TestSink::start(usize::MAX, false).await;
    let first = RunningFeed::start(feed_args(&db, "public.kv", &down));
    slot_ready(&db).await;
    db.exec("INSERT INTO public.kv VALUES (1, 'a'), (2, 'b')")
        .await;
    let after_rows = wal_position(&db).await;
    eventually("a failed delivery of the rows", WAIT, || async {
        down.seen()
            .iter()
            .any(|(_, b)| b.contains("\"payload\""))
            .then_some(())
    })
    .await;
    first.stop().await;
    assert!(
        !confirmed_past(&db, &after_rows).await,
        "the slot does not pass unacknowledged rows"
    );

    let up = TestSink::start(0, false).await;
    let second = RunningFeed::start(feed_args(&db, "public.kv", &up));
    let d = settled(&up, 2).await;
    let messages = rows(&d);
    assert_eq!(messages.len(), 2);
    assert!(messages[0].contains(r#""key": [1]"#) && messages[1].contains(r#""key": [2]"#));
    eventually(
        "acknowledged: the slot moves past the rows",
        WAIT,
        || async { confirmed_past(&db, &after_rows).await.then_some(()) },
    )
    .await;
    second.stop().await;

    // Acknowledged rows are not sent again.
    let again = TestSink::start(0, false).await;
    let third = RunningFeed::start(feed_args(&db, "public.kv", &again));
    let d = settled(&again, 0).await;
    assert!(rows(&d).is_empty(), "{d:?}");
    third.stop().await;
}

#[tokio::test]
async fn initial_scan_sends_existing_rows_before_changes() {
    logs();
    let db = Db::new("src").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT); INSERT INTO public.kv SELECT g, 'old' FROM generate_series(1, 1500) g")
        .await;
    let sink = TestSink::start(0, false).await;
    let mut args = feed_args(&db, "public.kv", &sink);
    args.initial_scan = true;
    let feed = RunningFeed::start(args);
    let d = settled(&sink, 1500).await;
    db.exec("UPDATE public.kv SET v = 'new' WHERE k = 1").await;
    let d2 = settled(&sink, 1501).await;
    let messages = rows(&d2);
    assert_eq!(rows(&d).len(), 1500);
    assert_eq!(messages.len(), 1501);
    let scan_time = split_updated(&messages[0]).0;
    assert!(messages[..1500]
        .iter()
        .all(|m| split_updated(m).0 == scan_time && m.contains("\"old\"")));
    let (t, last) = split_updated(&messages[1500]);
    assert!(t > scan_time);
    assert!(last.contains(r#""v": "new""#), "{last}");
    feed.stop().await;
}

/// A real sink (consistent mode) over TLS in front of the database at `url`.
async fn real_sink(url: &str) -> Running {
    real_sink_at(url, "127.0.0.1:0").await
}

async fn real_sink_at(url: &str, bind: &str) -> Running {
    let argv = [
        "cdc-sink",
        "start",
        "--bindAddr",
        bind,
        "--tlsSelfSigned",
        "--disableAuthentication",
        "--targetConn",
        url,
    ];
    let prepared = prepare(argv.iter().map(|s| s.to_string()).collect()).expect("valid flags");
    launch(prepared).await.expect("sink starts")
}

#[tokio::test]
async fn chaos_into_a_real_sink_leaves_the_target_identical_to_the_source() {
    logs();
    let db = Db::new("src").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v BYTEA NOT NULL)")
        .await;
    db.cluster
        .psql("postgres", "CREATE DATABASE kv")
        .expect("target database");
    let target_url = db.cluster.url("kv");
    let target = sqlx::PgPool::connect(&target_url)
        .await
        .expect("target pool");
    sqlx::raw_sql("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v BYTEA NOT NULL)")
        .execute(&target)
        .await
        .expect("target table");
    let sink = real_sink(&target_url).await;

    let mut args = FeedArgs::new(
        &db.url(),
        &["public.kv"],
        &format!("https://{}/kv/public", sink.addr),
    );
    args.insecure_skip_verify = true;
    args.diff = true;
    args.chaos = 0.5;
    args.flush_bytes = 2048;
    args.flush_frequency = Duration::from_millis(50);
    args.resolved = Duration::from_millis(300);
    args.poll_interval = Duration::from_millis(20);
    args.retry_backoff = Duration::from_millis(20);
    let feed = RunningFeed::start(args);
    slot_ready(&db).await;

    let mut kv = KvArgs::new(&db.url());
    kv.table = "public.kv".into();
    kv.duration = Duration::from_secs(3);
    kv.max_rate = 300.0;
    kv.sequential = true;
    kv.value_bytes = 16;
    kv.concurrency = 4;
    let summary = kv_workload::run(&kv, CancellationToken::new())
        .await
        .expect("workload");
    assert!(summary.ops > 500, "{summary}");
    // Overwrites and deletes too, so replay order matters.
    db.exec("UPDATE public.kv SET v = '\\xff'::bytea WHERE k % 3 = 0")
        .await;
    db.exec("DELETE FROM public.kv WHERE k % 7 = 0").await;
    db.exec("UPDATE public.kv SET v = '\\xee'::bytea WHERE k % 5 = 0")
        .await;

    let table = TableRef::parse("public.kv").expect("table");
    let outcome = verify::watch(
        &db.pool,
        &target,
        &table,
        &CompareOptions::default(),
        Duration::from_millis(500),
        2,
        Duration::from_secs(60),
        CancellationToken::new(),
        |_, _| {},
    )
    .await
    .expect("compare");
    assert!(outcome.in_sync, "{:?}", outcome.last);
    let last = outcome.last.expect("a report");
    assert_eq!(last.source_rows, db.count("public.kv").await);
    assert!(
        feed.stats.chaos_resends.load(Ordering::Relaxed) > 0,
        "chaos re-sent batches"
    );
    feed.stop().await;
    sink.stop().await.expect("sink stops");
}

#[tokio::test]
async fn the_feed_keeps_going_across_source_and_sink_restarts() {
    logs();
    let db = Db::new("src").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    db.cluster
        .psql("postgres", "CREATE DATABASE kv")
        .expect("target database");
    let target_url = db.cluster.url("kv");
    db.cluster
        .psql("kv", "CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .expect("target table");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let bind = format!("127.0.0.1:{port}");
    let sink = real_sink_at(&target_url, &bind).await;
    let mut args = FeedArgs::new(
        &db.url(),
        &["public.kv"],
        &format!("https://{bind}/kv/public"),
    );
    args.insecure_skip_verify = true;
    args.diff = true;
    args.resolved = Duration::from_millis(200);
    args.flush_frequency = Duration::from_millis(50);
    args.poll_interval = Duration::from_millis(20);
    args.retry_backoff = Duration::from_millis(50);
    args.retry_max_backoff = Duration::from_millis(500);
    let feed = RunningFeed::start(args);
    slot_ready(&db).await;
    let target_rows = |n: i64| {
        let url = target_url.clone();
        async move {
            let pool = sqlx::PgPool::connect(&url).await.ok()?;
            let c: i64 = sqlx::query_scalar("SELECT count(*) FROM public.kv")
                .fetch_one(&pool)
                .await
                .ok()?;
            pool.close().await;
            (c == n).then_some(())
        }
    };
    let insert = |from: i64, to: i64| {
        format!("INSERT INTO public.kv SELECT g, 'v' || g FROM generate_series({from}, {to}) g")
    };
    db.exec(&insert(1, 100)).await;
    eventually("first rows applied", WAIT, || target_rows(100)).await;

    // The source (and, sharing the cluster, the target) goes down hard and comes back.
    db.pool.close().await;
    db.cluster.crash().expect("crash");
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.cluster.restart().expect("restart");
    let pool = sqlx::PgPool::connect(&db.url()).await.expect("reconnect");
    sqlx::raw_sql(&insert(101, 200))
        .execute(&pool)
        .await
        .expect("insert");
    eventually(
        "rows after the source restart",
        Duration::from_secs(60),
        || target_rows(200),
    )
    .await;

    // The sink goes away; the feed retries until a new one listens on the same address.
    sink.stop().await.expect("sink stops");
    let retries = feed.stats.retries.load(Ordering::Relaxed);
    sqlx::raw_sql(&insert(201, 300))
        .execute(&pool)
        .await
        .expect("insert");
    eventually("the feed retrying", WAIT, || async {
        (feed.stats.retries.load(Ordering::Relaxed) > retries).then_some(())
    })
    .await;
    let sink = real_sink_at(&target_url, &bind).await;
    eventually(
        "rows after the sink restart",
        Duration::from_secs(60),
        || target_rows(300),
    )
    .await;
    let target = verify::connect(&target_url, None, "target")
        .await
        .expect("target");
    let r = verify::compare(
        &pool,
        &target,
        &TableRef::parse("public.kv").expect("name"),
        &CompareOptions::default(),
    )
    .await
    .expect("compare");
    assert!(r.in_sync(), "{r}");
    feed.stop().await;
    sink.stop().await.expect("sink stops");
}
