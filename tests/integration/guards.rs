//! Input guards: timestamps far ahead of the target's clock, schemas without tables, and
//! `cdc-sink checkpoint reset` recovering a checkpoint set in the far future.

use crate::support::sink::{self, batch, hlc, resolved, ts, upsert, Sink};
use crate::support::{eventually, Db};
use cdc_sink::hlc::Hlc;
use http::StatusCode;
use serde_json::json;
use std::time::{Duration, SystemTime};

const WAIT: Duration = Duration::from_secs(20);
const FAR_FUTURE: &str = "9223372036854775807.0000000000";

fn far_future() -> String {
    json!({ "resolved": FAR_FUTURE }).to_string()
}

/// An HLC `ahead` from now by the local clock.
fn from_now(ahead: Duration) -> String {
    Hlc::from_system_time(SystemTime::now() + ahead).to_string()
}

#[tokio::test]
async fn a_far_future_resolved_timestamp_is_refused_and_real_ones_still_apply() {
    let db = Db::kv("guards_resolved").await;
    let sink = Sink::start(&db, &[]).await;
    let path = "/guards_resolved/public";

    let (status, body) = sink.post(path, far_future()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains(FAR_FUTURE) && body.contains("--maxClockSkew"),
        "the reason names the timestamp and the bound: {body}"
    );
    let (status, body) = sink
        .post(
            path,
            json!({ "resolved": from_now(Duration::from_secs(7200)) }).to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "2h ahead: {body}");

    sink.post_ok(
        path,
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    sink.post_ok(path, resolved(1)).await;
    sink::committed(&db.pool, "guards_resolved.public", hlc(1)).await;
    assert_eq!(db.kv_rows().await, vec![(1, Some("a".into()))]);
    sink.stop().await;
}

#[tokio::test]
async fn a_row_updated_far_in_the_future_is_refused_unless_the_bound_allows_it() {
    let db = Db::kv("guards_updated").await;
    let path = "/guards_updated/public";
    let ahead = from_now(Duration::from_secs(7200));
    let row = || {
        json!({"payload": [{"after": {"k": 1, "v": "a"}, "key": [1], "topic": "kv", "updated": ahead}], "length": 1})
            .to_string()
    };

    let sink = Sink::start(&db, &[]).await;
    let (status, body) = sink.post(path, row()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains(&ahead) && body.contains("1h0m0s"), "{body}");
    assert!(
        !body.contains("\"v\""),
        "no row values in the reason: {body}"
    );
    assert_eq!(
        db.count_if_exists("_cdc_sink.guards_updated_public_kv")
            .await,
        0
    );
    sink.stop().await;

    let sink = Sink::start(&db, &["--maxClockSkew=3h"]).await;
    sink.post_ok(path, row()).await;
    assert_eq!(
        db.count_if_exists("_cdc_sink.guards_updated_public_kv")
            .await,
        1
    );
    sink.stop().await;
}

/// Runs `cdc-sink checkpoint …` against `db`; returns success and stdout + stderr.
async fn checkpoint_cli(db: &Db, args: &[&str]) -> (bool, String) {
    let mut argv: Vec<String> = vec!["checkpoint".into()];
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.extend(["--targetConn".to_string(), db.url()]);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .args(&argv)
            .output()
            .expect("run cdc-sink checkpoint")
    })
    .await
    .expect("join");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn checkpoint_reset_recovers_a_schema_whose_checkpoint_was_set_in_the_future() {
    let db = Db::kv("guards_reset").await;
    let sink = Sink::start(&db, &[]).await;
    let path = "/guards_reset/public";
    let group = "guards_reset.public";
    sink.post_ok(
        path,
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    sink.post_ok(path, resolved(1)).await;
    sink::committed(&db.pool, group, hlc(1)).await;

    // What an accepted far-future resolved timestamp left behind in older versions.
    db.exec(&format!(
        "INSERT INTO _cdc_sink.checkpoints (group_name, source_hlc, partition, target_applied_at) \
VALUES ('{group}', {FAR_FUTURE}, '{group}', now())"
    ))
    .await;
    let (status, body) = sink.post(path, resolved(2)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "stuck: {body}");

    let (ok, out) = checkpoint_cli(&db, &["show", group]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(FAR_FUTURE) && out.contains("ahead of the database clock"),
        "{out}"
    );

    let to = ts(1);
    let (ok, out) = checkpoint_cli(&db, &["reset", group, "--to", &to]).await;
    assert!(!ok, "refused without --yes: {out}");
    assert!(
        out.contains("--yes") && out.contains("remove 1 checkpoint row"),
        "{out}"
    );
    let future = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM _cdc_sink.checkpoints WHERE source_hlc > 2e18",
        )
        .fetch_one(&db.pool)
        .await
        .expect("count")
    };
    assert_eq!(future().await, 1, "nothing changed without --yes");

    // The running sink holds the schema's lease: refused unless forced.
    let (ok, out) = checkpoint_cli(&db, &["reset", group, "--to", &to, "--yes"]).await;
    assert!(!ok, "refused while the lease is held: {out}");
    assert!(
        out.contains("is held by") && out.contains("until") && out.contains("--force"),
        "{out}"
    );
    assert_eq!(future().await, 1, "nothing changed while the lease is held");
    let (ok, out) = checkpoint_cli(&db, &["reset", group, "--to", &to, "--yes", "--force"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("revoke the apply lease held by"), "{out}");
    assert!(out.contains(&format!("cursor = '{to}'")), "{out}");
    let (ok, out) = checkpoint_cli(&db, &["show", group]).await;
    assert!(ok, "{out}");
    assert!(!out.contains(FAR_FUTURE) && out.contains(&to), "{out}");

    // The running sink follows: a row posted now is staged (the changefeed redelivers
    // refused or dropped batches, as this loop does), then applied.
    eventually("the sink stages rows again", WAIT, || async {
        sink.post_ok(
            path,
            batch(vec![upsert("kv", json!([3]), json!({"k": 3, "v": "c"}), 3)]),
        )
        .await;
        (db.count("_cdc_sink.guards_reset_public_kv").await > 0).then_some(())
    })
    .await;
    let (ok, out) = checkpoint_cli(&db, &["show", group]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("staged:    guards_reset.public.kv: 1 unapplied row(s) from 1700000003"),
        "{out}"
    );
    sink.post_ok(path, resolved(3)).await;
    sink::committed(&db.pool, group, hlc(3)).await;
    assert_eq!(
        db.kv_rows().await,
        vec![(1, Some("a".into())), (3, Some("c".into()))]
    );
    sink.stop().await;

    // An expired lease (its holder is gone) does not stand in the way.
    db.exec(&format!(
        "INSERT INTO _cdc_sink.checkpoints (group_name, source_hlc, partition, target_applied_at) \
VALUES ('{group}', {FAR_FUTURE}, '{group}', now()); \
INSERT INTO _cdc_sink.leases (name, expires, nonce, hostname) \
VALUES ('sequtil.Lease.\"{group}\"', now() - INTERVAL '1 minute', gen_random_uuid(), 'gone:1') \
ON CONFLICT (name) DO UPDATE SET expires = excluded.expires, hostname = excluded.hostname"
    ))
    .await;
    let (ok, out) = checkpoint_cli(&db, &["reset", group, "--to", &ts(3), "--yes"]).await;
    assert!(ok, "{out}");
    assert_eq!(future().await, 0);
}

/// The lines of `/_/varz` that mention `needle`.
async fn series(sink: &Sink, needle: &str) -> Vec<String> {
    sink.metrics()
        .await
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_schema_without_tables_gets_404_and_leaves_nothing_behind() {
    let db = Db::kv("guards_nosuch").await;
    let sink = Sink::start(&db, &[]).await;
    for i in 0..50 {
        let (status, body) = sink
            .post(&format!("/guards_nosuch/nosuch_{i}"), resolved(1))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(
            body.trim_end(),
            format!("schema guards_nosuch.nosuch_{i} has no tables in the target")
        );
    }
    let path = "/guards_nosuch/nosuch_50";
    let (status, _) = sink.post(path, r#"{"payload":[],"length":0}"#).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = sink
        .post(
            path,
            batch(vec![upsert("t", json!([1]), json!({"k": 1}), 1)]),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let rows = |table: &'static str, column: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!(
                "SELECT count(*) FROM _cdc_sink.{table} WHERE {column} LIKE '%nosuch%'"
            ))
            .fetch_one(&pool)
            .await
            .expect("count")
        }
    };
    assert_eq!(rows("checkpoints", "group_name").await, 0);
    // A pipeline's first act is to try the lease: no lease row, no pipeline.
    assert_eq!(rows("leases", "name").await, 0);
    assert_eq!(series(&sink, "nosuch").await, Vec::<String>::new());

    // A schema created after a 404 works at once, without waiting for --schemaRefresh.
    db.exec("CREATE SCHEMA nosuch_7; CREATE TABLE nosuch_7.t (k INT8 PRIMARY KEY)")
        .await;
    let path = "/guards_nosuch/nosuch_7";
    sink.post_ok(
        path,
        batch(vec![upsert("t", json!([1]), json!({"k": 1}), 1)]),
    )
    .await;
    sink.post_ok(path, resolved(1)).await;
    sink::committed(&db.pool, "guards_nosuch.nosuch_7", hlc(1)).await;
    assert_eq!(db.count("nosuch_7.t").await, 1);
    sink.stop().await;
}

#[tokio::test]
async fn a_redelivery_below_the_checkpoint_is_dropped_by_an_instance_that_does_not_apply() {
    let db = Db::kv("guards_redeliver").await;
    let path = "/guards_redeliver/public";
    let holder = Sink::start(&db, &[]).await;
    let other = Sink::start(&db, &[]).await;
    holder
        .post_ok(
            path,
            batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
        )
        .await;
    holder.post_ok(path, resolved(2)).await;
    sink::committed(&db.pool, "guards_redeliver.public", hlc(2)).await;

    // `other` never received a resolved timestamp: it runs no pipeline of this schema, and
    // its view of the checkpoint comes from reading the table at ingest.
    other
        .post_ok(
            path,
            batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
        )
        .await;
    assert_eq!(
        db.count_if_exists("_cdc_sink.guards_redeliver_public_kv")
            .await,
        0,
        "the redelivery was dropped, not staged where no window reads it"
    );
    holder.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn rows_dropped_below_the_checkpoint_are_logged_once_per_period() {
    let db = Db::kv("guards_warn").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sink.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["start", "--bindAddr", &format!("127.0.0.1:{port}")])
        .args(["--tlsSelfSigned", "--disableAuthentication"])
        .args(["--targetConn", &db.url(), "--bestEffortWindow=0"])
        .arg(format!("--logDestination={}", log.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn cdc-sink");
    let child = KillOnDrop(child);
    let client = cdc_sink::server::client::Client::new(
        &format!("https://127.0.0.1:{port}"),
        cdc_sink::server::client::ClientOptions {
            insecure_skip_verify: true,
            ..Default::default()
        },
    )
    .expect("client");
    let post = |body: String| {
        let client = &client;
        async move {
            client
                .post("/guards_warn/public", bytes::Bytes::from(body))
                .await
                .map(|(s, _)| s)
                .unwrap_or(StatusCode::BAD_GATEWAY)
        }
    };
    let row = || {
        batch(vec![upsert(
            "kv",
            json!([1]),
            json!({"k": 1, "v": "secret-value"}),
            1,
        )])
    };
    eventually("the sink answers", WAIT, || async {
        (post(row()).await == StatusCode::OK).then_some(())
    })
    .await;
    assert_eq!(post(resolved(2)).await, StatusCode::OK);
    sink::committed(&db.pool, "guards_warn.public", hlc(2)).await;

    for _ in 0..3 {
        assert_eq!(post(row()).await, StatusCode::OK);
    }
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("dropped rows at or below the committed checkpoint"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let warned = eventually("the warning", WAIT, || async {
        let l = lines();
        (!l.is_empty()).then_some(l)
    })
    .await;
    drop(child);
    assert_eq!(warned.len(), 1, "one line per 10 s: {warned:?}");
    assert!(
        warned[0].contains("WARN")
            && warned[0].contains("schema=guards_warn.public")
            && warned[0].contains("rows=1"),
        "{warned:?}"
    );
    let whole = std::fs::read_to_string(&log).expect("log");
    assert!(!whole.contains("secret-value"), "no row values in the log");
}

/// The sink process, killed when the test ends (also when it fails).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn lease_rows(db: &Db, like: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _cdc_sink.leases WHERE name LIKE $1")
        .bind(format!("%{like}%"))
        .fetch_one(&db.pool)
        .await
        .expect("count leases")
}

#[tokio::test]
async fn an_idle_pipeline_stops_and_the_next_resolved_timestamp_starts_it_again() {
    let db = Db::kv("guards_idle").await;
    let sink = Sink::start(&db, &["--pipelineIdle=1s"]).await;
    let path = "/guards_idle/public";
    let group = "guards_idle.public";
    sink.post_ok(
        path,
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    sink.post_ok(path, resolved(1)).await;
    sink::committed(&db.pool, group, hlc(1)).await;
    eventually("the idle pipeline releases its lease", WAIT, || async {
        (lease_rows(&db, "guards_idle").await == 0).then_some(())
    })
    .await;

    sink.post_ok(
        path,
        batch(vec![upsert("kv", json!([2]), json!({"k": 2, "v": "b"}), 2)]),
    )
    .await;
    sink.post_ok(path, resolved(2)).await;
    sink::committed(&db.pool, group, hlc(2)).await;
    assert_eq!(
        db.kv_rows().await,
        vec![(1, Some("a".into())), (2, Some("b".into()))]
    );
    sink.stop().await;
}

#[tokio::test]
async fn start_up_recovery_skips_pending_schemas_without_tables() {
    let db = Db::kv("guards_recover").await;
    let first = Sink::start(&db, &[]).await;
    first.stop().await;
    // Pending windows as older versions left them: one of a real schema, one of a name
    // without tables.
    for group in ["guards_recover.public", "guards_recover.gone"] {
        db.exec(&format!(
            "INSERT INTO _cdc_sink.checkpoints (group_name, source_hlc, partition) \
VALUES ('{group}', {}, '{group}')",
            hlc(1).to_decimal()
        ))
        .await;
    }
    let sink = Sink::start(&db, &[]).await;
    sink::committed(&db.pool, "guards_recover.public", hlc(1)).await;
    assert_eq!(lease_rows(&db, "guards_recover.public").await, 1);
    assert_eq!(lease_rows(&db, "gone").await, 0, "no pipeline for it");
    sink.stop().await;
}
