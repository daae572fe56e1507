//! kill -9 of the real binary at awkward moments loses nothing and duplicates nothing.

use crate::support::process::{free_port, Process};
use crate::support::sink::{batch, hlc, is_committed, resolved, upsert};
use crate::support::{eventually, Db};
use http::StatusCode;
use serde_json::json;
use std::process::Stdio;
use std::time::Duration;

fn versions(t: i64, keys: std::ops::Range<i64>) -> String {
    batch(
        keys.map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("t{t}")}), t))
            .collect(),
    )
}

#[tokio::test]
async fn a_kill_after_staging_and_a_redelivery_duplicate_nothing() {
    let db = Db::new("kv").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let port = free_port();
    let p = Process::start(&db, port, &[]).await;
    assert_eq!(
        p.post("/kv/public", versions(1, 0..50)).await,
        StatusCode::OK
    );
    p.kill9();
    assert_eq!(
        db.count("_cdc_sink.kv_public_kv").await,
        50,
        "acknowledged rows are durable"
    );
    let p = Process::start(&db, port, &[]).await;
    // The changefeed never saw the ack: it sends the batch again, then resolves.
    assert_eq!(
        p.post("/kv/public", versions(1, 0..50)).await,
        StatusCode::OK
    );
    assert_eq!(
        db.count("_cdc_sink.kv_public_kv").await,
        50,
        "redelivery is a no-op"
    );
    assert_eq!(p.post("/kv/public", resolved(1)).await, StatusCode::OK);
    eventually("apply", Duration::from_secs(20), || async {
        (db.count("public.kv").await == 50).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_kill_during_apply_resumes_after_restart() {
    let db = Db::new("kv").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let port = free_port();
    let p = Process::start(&db, port, &["--flushSize", "200"]).await;
    for t in 1..=20 {
        assert_eq!(
            p.post("/kv/public", versions(t, 0..500)).await,
            StatusCode::OK
        );
    }
    assert_eq!(p.post("/kv/public", resolved(20)).await, StatusCode::OK);
    // Kill as soon as the first rows land, mid-window.
    eventually("apply starts", Duration::from_secs(20), || async {
        (db.count("public.kv").await > 0).then_some(())
    })
    .await;
    p.kill9();
    let want = hlc(20).to_decimal();
    let done_before_kill: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM _cdc_sink.checkpoints WHERE source_hlc >= $1::DECIMAL AND target_applied_at IS NOT NULL",
    )
    .bind(&want)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        done_before_kill, 0,
        "the kill must land inside the window for this test to mean anything"
    );
    let _p = Process::start(&db, port, &["--flushSize", "200"]).await;
    eventually("window committed after restart", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM _cdc_sink.checkpoints WHERE source_hlc = $1::DECIMAL AND target_applied_at IS NOT NULL",
        )
        .bind(&want)
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (n == 1).then_some(())
    })
    .await;
    let wrong: i64 = sqlx::query_scalar("SELECT count(*) FROM public.kv WHERE v <> 't20'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(db.count("public.kv").await, 500);
    assert_eq!(wrong, 0, "every row holds its last version");
    assert_eq!(db.count("_cdc_sink.kv_public_kv").await, 0);
}

/// 40 timestamps of 500 rows; timestamp `t` writes block `t % 5` of the keys 0..2500 at
/// version `t`, so five neighbouring flushes are disjoint and run together while every fifth
/// shares its keys.
fn block_version(t: i64) -> String {
    let b = t % 5;
    batch(
        (b * 500..b * 500 + 500)
            .map(|k| {
                upsert(
                    "kv",
                    json!([k]),
                    json!({"k": k, "v": format!("t{t}"), "ver": t}),
                    t,
                )
            })
            .collect(),
    )
}

/// Rows whose version is not the last one written to their block.
async fn wrong_versions(db: &Db) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM public.kv WHERE ver <> 35 + CASE WHEN k / 500 = 0 THEN 5 ELSE k / 500 END",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

async fn committed_at(pool: &sqlx::PgPool, at: i64) -> bool {
    is_committed(pool, "kv.public", hlc(at)).await
}

#[tokio::test]
async fn a_kill_amid_concurrent_flushes_applies_every_row_exactly_once() {
    let db = Db::new("kv").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT, ver INT8 NOT NULL)")
        .await;
    // Compare-and-set on the version with every conflict dead-lettered: a row applied twice
    // would lose against itself and show up in the dead-letter table.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cas.ts");
    std::fs::write(
        &script,
        "import * as api from \"cdc-sink@v1\";\n\
         api.configureTable(\"kv\", { cas: [\"ver\"], merge: () => ({ dlq: \"replayed\" }) });\n",
    )
    .unwrap();
    let flags = [
        "--flushSize",
        "250",
        "--parallelism",
        "16",
        "--userscript",
        script.to_str().unwrap(),
    ];
    let port = free_port();
    let p = Process::start(&db, port, &flags).await;
    for t in 1..=40 {
        assert_eq!(p.post("/kv/public", block_version(t)).await, StatusCode::OK);
    }
    assert_eq!(p.post("/kv/public", resolved(40)).await, StatusCode::OK);
    eventually("apply starts", Duration::from_secs(20), || async {
        (db.count("public.kv").await > 0).then_some(())
    })
    .await;
    p.kill9();
    assert!(
        !committed_at(&db.pool, 40).await,
        "the kill must land inside the window for this test to mean anything"
    );
    let _p = Process::start(&db, port, &flags).await;
    eventually(
        "window committed after restart",
        Duration::from_secs(60),
        || async { committed_at(&db.pool, 40).await.then_some(()) },
    )
    .await;
    assert_eq!(db.count("public.kv").await, 2500);
    assert_eq!(
        wrong_versions(&db).await,
        0,
        "every key holds its last version"
    );
    let dlq: Option<String> = sqlx::query_scalar("SELECT to_regclass('public.cdc_sink_dlq')::TEXT")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    if dlq.is_some() {
        assert_eq!(
            db.count("public.cdc_sink_dlq").await,
            0,
            "no row was applied twice"
        );
    }
    assert_eq!(db.count("_cdc_sink.kv_public_kv").await, 0);
}

#[tokio::test]
async fn a_kill_with_separate_staging_resumes_after_restart() {
    let db = Db::new("kv").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT, ver INT8 NOT NULL)")
        .await;
    db.cluster
        .psql("postgres", "CREATE DATABASE staging")
        .unwrap();
    let url = db.cluster.url("staging");
    let staging = sqlx::PgPool::connect(&url).await.unwrap();
    let flags = ["--flushSize", "250", "--stagingConn", url.as_str()];
    let port = free_port();
    let p = Process::start(&db, port, &flags).await;
    for t in 1..=40 {
        assert_eq!(p.post("/kv/public", block_version(t)).await, StatusCode::OK);
    }
    assert_eq!(p.post("/kv/public", resolved(40)).await, StatusCode::OK);
    eventually("apply starts", Duration::from_secs(20), || async {
        (db.count("public.kv").await > 0).then_some(())
    })
    .await;
    p.kill9();
    assert!(
        !committed_at(&staging, 40).await,
        "the kill must land inside the window for this test to mean anything"
    );
    let _p = Process::start(&db, port, &flags).await;
    eventually(
        "window committed after restart",
        Duration::from_secs(60),
        || async { committed_at(&staging, 40).await.then_some(()) },
    )
    .await;
    assert_eq!(db.count("public.kv").await, 2500);
    assert_eq!(
        wrong_versions(&db).await,
        0,
        "every key holds its last version"
    );
    let staged: i64 = sqlx::query_scalar("SELECT count(*) FROM _cdc_sink.kv_public_kv")
        .fetch_one(&staging)
        .await
        .unwrap();
    assert_eq!(staged, 0);
    let in_target: Option<String> = sqlx::query_scalar("SELECT to_regnamespace('_cdc_sink')::TEXT")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(in_target, None, "nothing staged in the target");
}

#[tokio::test]
async fn a_poison_mutation_is_named_in_the_log_and_retried_with_backoff() {
    let db = Db::new("kv").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT NOT NULL)")
        .await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("sink.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let port = free_port();
    let p = Process::start_logging(&db, port, &[], Stdio::from(log)).await;
    // Key 3 of five breaks the NOT NULL constraint: the window cannot commit.
    let rows = (1..=5)
        .map(|k| {
            let v = if k == 3 { json!(null) } else { json!("ok") };
            upsert("kv", json!([k]), json!({"k": k, "v": v}), 7)
        })
        .collect();
    assert_eq!(p.post("/kv/public", batch(rows)).await, StatusCode::OK);
    assert_eq!(p.post("/kv/public", resolved(7)).await, StatusCode::OK);
    let line = eventually("poison log line", Duration::from_secs(30), || async {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .lines()
            .find(|l| l.contains("poison mutation"))
            .map(str::to_string)
    })
    .await;
    assert!(line.contains("table=") && line.contains("kv"), "{line}");
    assert!(line.contains("key=[3]"), "{line}");
    assert!(line.contains(&format!("time={}", hlc(7))), "{line}");
    assert_eq!(db.count("public.kv").await, 0, "the window stays unapplied");
    eventually("retried with backoff", Duration::from_secs(30), || async {
        let (_, text) = p.client.get("/_/varz").await.ok()?;
        text.lines()
            .any(|l| {
                l.starts_with("sequence_poison_backoff_total")
                    && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)
            })
            .then_some(())
    })
    .await;
    assert_eq!(
        db.count("_cdc_sink.kv_public_kv").await,
        5,
        "nothing staged is lost"
    );
}
