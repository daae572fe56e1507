//! End-to-end: changefeed batches over HTTP/2 + TLS into staging, resolved, applied.

use crate::support::sink::{batch, delete, hlc, resolved, upsert, Sink};
use crate::support::{eventually, Db};
use http::StatusCode;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

async fn kv_db(name: &str) -> Db {
    let db = Db::new(name).await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    db
}

async fn kv_rows(db: &Db) -> Vec<(i64, Option<String>)> {
    sqlx::query_as("SELECT k, v FROM public.kv ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .expect("read kv")
}

async fn staged(db: &Db) -> i64 {
    db.count("_cdc_sink.kv_public_kv").await
}

/// Waits until the committed checkpoint of kv.public reaches `at`.
async fn committed(db: &Db, at: i64) {
    let want = hlc(at).to_decimal();
    eventually("checkpoint commit", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM _cdc_sink.checkpoints WHERE group_name = 'kv.public' AND source_hlc >= $1::DECIMAL AND target_applied_at IS NOT NULL",
        )
        .bind(&want)
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (n > 0).then_some(())
    })
    .await
}

#[tokio::test]
async fn mutations_wait_for_resolved_then_apply_in_order() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1),
            upsert("kv", json!([2]), json!({"k": 2, "v": "x"}), 1),
            upsert("kv", json!([1]), json!({"k": 1, "v": "b"}), 2),
        ]),
    )
    .await;
    assert_eq!(staged(&db).await, 3, "staged before the ack");
    assert!(
        kv_rows(&db).await.is_empty(),
        "nothing applied before resolved"
    );

    sink.post_ok("/kv/public", resolved(2)).await;
    committed(&db, 2).await;
    assert_eq!(
        kv_rows(&db).await,
        vec![(1, Some("b".into())), (2, Some("x".into()))]
    );
    assert_eq!(
        staged(&db).await,
        0,
        "applied rows retired with the checkpoint"
    );
    sink.stop().await;
}

#[tokio::test]
async fn a_window_is_applied_only_up_to_its_resolved_timestamp() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "early"}), 1),
            upsert("kv", json!([2]), json!({"k": 2, "v": "late"}), 5),
        ]),
    )
    .await;
    sink.post_ok("/kv/public", resolved(3)).await;
    committed(&db, 3).await;
    assert_eq!(kv_rows(&db).await, vec![(1, Some("early".into()))]);
    assert_eq!(staged(&db).await, 1, "the later mutation stays staged");
    sink.post_ok("/kv/public", resolved(5)).await;
    committed(&db, 5).await;
    assert_eq!(kv_rows(&db).await.len(), 2);
    sink.stop().await;
}

#[tokio::test]
async fn redelivered_and_reordered_batches_end_in_the_final_state() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    let version = |n: i64| {
        batch(
            (1..=20)
                .map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("v{n}")}), n))
                .collect(),
        )
    };
    // Delivery order 1, 2, 3, 2, 4 with a resolved timestamp in the middle.
    sink.post_ok("/kv/public", version(1)).await;
    sink.post_ok("/kv/public", version(2)).await;
    sink.post_ok("/kv/public", resolved(2)).await;
    sink.post_ok("/kv/public", version(3)).await;
    committed(&db, 2).await;
    sink.post_ok("/kv/public", version(2)).await; // below the checkpoint: dropped
    sink.post_ok("/kv/public", version(4)).await;
    sink.post_ok("/kv/public", version(3)).await; // redelivery of a staged batch
    sink.post_ok("/kv/public", resolved(4)).await;
    committed(&db, 4).await;
    let rows = kv_rows(&db).await;
    assert_eq!(rows.len(), 20);
    assert!(
        rows.iter().all(|(_, v)| v.as_deref() == Some("v4")),
        "{rows:?}"
    );
    assert_eq!(staged(&db).await, 0);
    sink.stop().await;
}

#[tokio::test]
async fn deletes_remove_rows_in_order() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1),
            upsert("kv", json!([2]), json!({"k": 2, "v": "b"}), 1),
            delete("kv", json!([1]), 2),
            delete("kv", json!([2]), 2),
            upsert("kv", json!([2]), json!({"k": 2, "v": "again"}), 3),
        ]),
    )
    .await;
    sink.post_ok("/kv/public", resolved(3)).await;
    committed(&db, 3).await;
    assert_eq!(kv_rows(&db).await, vec![(2, Some("again".into()))]);
    sink.stop().await;
}

#[tokio::test]
async fn large_windows_apply_in_several_transactions_without_losing_rows() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &["--flushSize", "7", "--scanSize", "5"]).await;
    // 30 timestamps of 3 rows, plus one source transaction larger than a scan page.
    let mut elements = Vec::new();
    for t in 1..=30 {
        for k in 0..3 {
            let key = t * 10 + k;
            elements.push(upsert(
                "kv",
                json!([key]),
                json!({"k": key, "v": format!("t{t}")}),
                t,
            ));
        }
    }
    for k in 1000..1012 {
        elements.push(upsert("kv", json!([k]), json!({"k": k, "v": "big"}), 31));
    }
    sink.post_ok("/kv/public", batch(elements)).await;
    sink.post_ok("/kv/public", resolved(31)).await;
    committed(&db, 31).await;
    assert_eq!(kv_rows(&db).await.len(), 90 + 12);
    assert_eq!(staged(&db).await, 0);
    sink.stop().await;
}

#[tokio::test]
async fn resolved_timestamps_never_go_backwards() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok("/kv/public", resolved(10)).await;
    sink.post_ok("/kv/public", resolved(10)).await; // idempotent redelivery
    let (status, text) = sink.post("/kv/public", resolved(5)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("going backwards"), "{text}");
    sink.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    let cases = [
        ("/kv/public", "{\"payload\":[{\"after\":".to_string(), StatusCode::BAD_REQUEST),
        (
            "/kv/public",
            json!({"payload": [{"after": {"k": 1}, "key": [1], "topic": "kv", "updated": ts1(), "bogus": 1}]}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/kv/public",
            json!({"payload": [{"after": {"k": 1}, "key": [1], "topic": "kv", "updated": "x"}]}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/kv/public",
            json!({"payload": [{"after": {"k": 1}, "key": [1], "topic": "nosuchtable", "updated": ts1()}]}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        ("/kv", resolved(1), StatusCode::NOT_FOUND),
        ("/otherdb/public", resolved(1), StatusCode::NOT_FOUND),
    ];
    for (path, body, want) in cases {
        let (status, text) = sink.post(path, body.clone()).await;
        assert_eq!(status, want, "{path} {body}: {text}");
        assert!(
            !text.trim().is_empty() && !text.trim().contains('\n'),
            "one-line reason: {text:?}"
        );
    }
    // A mixed batch whose last element is bad stages nothing.
    let (status, _) = sink
        .post(
            "/kv/public",
            json!({"payload": [
                {"after": {"k": 1, "v": "a"}, "key": [1], "topic": "kv", "updated": ts1()},
                {"after": {"k": 2, "v": "b"}, "key": [2], "topic": "kv", "updated": "0.0000000000"}
            ]})
            .to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let staged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = '_cdc_sink' AND table_name = 'kv_public_kv'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    if staged > 0 {
        assert_eq!(crate::pipeline::staged(&db).await, 0);
    }
    assert!(kv_rows(&db).await.is_empty());
    sink.stop().await;
}

fn ts1() -> String {
    crate::support::sink::ts(1)
}

#[tokio::test]
async fn immediate_mode_applies_each_request_at_once() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &["--immediate"]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1),
            upsert("kv", json!([1]), json!({"k": 1, "v": "b"}), 2),
        ]),
    )
    .await;
    assert_eq!(kv_rows(&db).await, vec![(1, Some("b".into()))]);
    sink.post_ok("/kv/public", batch(vec![delete("kv", json!([1]), 3)]))
        .await;
    assert!(kv_rows(&db).await.is_empty());
    sink.post_ok("/kv/public", resolved(3)).await;
    committed(&db, 3).await;
    sink.stop().await;
}

#[tokio::test]
async fn query_feeds_build_keys_from_the_target_primary_key() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    let body = json!({"payload": [
        {"after": {"k": 7, "v": "q"}, "updated": crate::support::sink::ts(1)},
        {"after": null, "before": {"k": 8, "v": "gone"}, "updated": crate::support::sink::ts(1)}
    ]});
    db.exec("INSERT INTO public.kv VALUES (8, 'present')").await;
    sink.post_ok("/kv/public/kv", body.to_string()).await;
    sink.post_ok("/kv/public/kv", resolved(1)).await;
    committed(&db, 1).await;
    assert_eq!(kv_rows(&db).await, vec![(7, Some("q".into()))]);
    sink.stop().await;
}

#[tokio::test]
async fn the_target_going_down_answers_503_then_recovers() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    db.cluster.stop().expect("stop postgresql");
    let body = batch(vec![upsert("kv", json!([2]), json!({"k": 2, "v": "b"}), 2)]);
    let (status, text) = sink.post("/kv/public", body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    db.cluster.restart().expect("restart postgresql");
    // The changefeed retries: the same batch succeeds once the database is back.
    eventually("ingest after restart", WAIT, || async {
        (sink.post("/kv/public", body.clone()).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    sink.post_ok("/kv/public", resolved(2)).await;
    committed(&db, 2).await;
    assert_eq!(kv_rows(&db).await.len(), 2);
    sink.stop().await;
}

#[tokio::test]
async fn two_instances_share_one_target_and_one_applies() {
    let db = kv_db("kv").await;
    let a = Sink::start(&db, &[]).await;
    let b = Sink::start(&db, &[]).await;
    for t in 1..=10i64 {
        let s = if t % 2 == 0 { &a } else { &b };
        let elements = (0..10)
            .map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("t{t}")}), t))
            .collect();
        s.post_ok("/kv/public", batch(elements)).await;
        s.post_ok("/kv/public", resolved(t)).await;
    }
    committed(&db, 10).await;
    let rows = kv_rows(&db).await;
    assert_eq!(rows.len(), 10);
    assert!(
        rows.iter().all(|(_, v)| v.as_deref() == Some("t10")),
        "{rows:?}"
    );
    let holders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _cdc_sink.leases WHERE expires > now()")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(holders, 1, "one lease for the schema");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn concurrent_first_batches_for_a_new_table_are_all_staged() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    let posts = (0..8i64).map(|i| {
        let body = batch(vec![upsert("kv", json!([i]), json!({"k": i, "v": "c"}), 1)]);
        let sink = &sink;
        async move { sink.post("/kv/public", body).await }
    });
    for (status, text) in futures::future::join_all(posts).await {
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert_eq!(staged(&db).await, 8);
    sink.stop().await;
}

#[tokio::test]
async fn metrics_describe_the_pipeline_and_health_pings_the_database() {
    let db = kv_db("kv").await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "m"}), 1)]),
    )
    .await;
    sink.post_ok("/kv/public", resolved(1)).await;
    committed(&db, 1).await;
    let (status, text) = sink.client.get("/_/varz").await.expect("varz");
    assert_eq!(status, StatusCode::OK);
    for name in [
        "http_status_codes_total",
        "stage_mutations_total{schema=\"kv.public\",table=\"kv\"}",
        "apply_upserts_total",
        "core_sweep_active_bool{schema=\"kv.public\"}",
        "target_applied_timestamp_seconds{kind=\"cdc\",target=\"kv.public\"}",
        "target_lag_seconds",
        "source_lag_seconds",
        "mutations_received_count",
        "pool_max_connection_count{pool=\"target\"}",
        "checkpoint_commit_duration_seconds",
    ] {
        assert!(text.contains(name), "missing {name} in /_/varz");
    }
    let (status, body) = sink.client.get("/_/healthz").await.expect("healthz");
    assert_eq!((status, body.trim()), (StatusCode::OK, "OK"));
    db.cluster.stop().expect("stop postgresql");
    let (status, _) = sink.client.get("/_/healthz").await.expect("healthz");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    db.cluster.restart().expect("restart");
    sink.stop().await;
}
