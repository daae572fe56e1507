//! End-to-end: changefeed batches over HTTP/2 + TLS into staging, resolved, applied.

use crate::support::sink::{self, batch, delete, hlc, resolved, upsert, Sink};
use crate::support::{eventually, Db};
use http::StatusCode;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

async fn staged(db: &Db) -> i64 {
    db.count("_cdc_sink.kv_public_kv").await
}

/// Waits until the committed checkpoint of kv.public reaches `at`.
async fn committed(db: &Db, at: i64) {
    sink::committed(&db.pool, "kv.public", hlc(at)).await
}

#[tokio::test]
async fn mutations_wait_for_resolved_then_apply_in_order() {
    let db = Db::kv("kv").await;
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
        db.kv_rows().await.is_empty(),
        "nothing applied before resolved"
    );

    sink.post_ok("/kv/public", resolved(2)).await;
    committed(&db, 2).await;
    assert_eq!(
        db.kv_rows().await,
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
    let db = Db::kv("kv").await;
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
    assert_eq!(db.kv_rows().await, vec![(1, Some("early".into()))]);
    assert_eq!(staged(&db).await, 1, "the later mutation stays staged");
    sink.post_ok("/kv/public", resolved(5)).await;
    committed(&db, 5).await;
    assert_eq!(db.kv_rows().await.len(), 2);
    sink.stop().await;
}

#[tokio::test]
async fn redelivered_and_reordered_batches_end_in_the_final_state() {
    let db = Db::kv("kv").await;
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
    let rows = db.kv_rows().await;
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
    let db = Db::kv("kv").await;
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
    assert_eq!(db.kv_rows().await, vec![(2, Some("again".into()))]);
    sink.stop().await;
}

#[tokio::test]
async fn large_windows_apply_in_several_transactions_without_losing_rows() {
    let db = Db::kv("kv").await;
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
    assert_eq!(db.kv_rows().await.len(), 90 + 12);
    assert_eq!(staged(&db).await, 0);
    sink.stop().await;
}

#[tokio::test]
async fn wide_rows_are_read_in_pages_bounded_by_bytes() {
    let db = Db::kv("wide").await;
    let sink = Sink::start(&db, &["--scanBytes", "10000"]).await;
    // 30 timestamps of three 4 KB rows, then one timestamp of 48 KB: larger than a page, so it
    // must be read whole.
    let wide = "w".repeat(4000);
    let mut elements = Vec::new();
    for t in 1..=30 {
        for k in 0..3 {
            let key = t * 10 + k;
            elements.push(upsert("kv", json!([key]), json!({"k": key, "v": wide}), t));
        }
    }
    for k in 1000..1012 {
        elements.push(upsert("kv", json!([k]), json!({"k": k, "v": wide}), 31));
    }
    sink.post_ok("/wide/public", batch(elements)).await;
    sink.post_ok("/wide/public", resolved(31)).await;
    committed_in(&db.pool, "wide.public", 31).await;
    let rows = db.kv_rows().await;
    assert_eq!(rows.len(), 90 + 12);
    assert!(rows
        .iter()
        .all(|(_, v)| v.as_deref() == Some(wide.as_str())));
    assert_eq!(db.count("_cdc_sink.wide_public_kv").await, 0);
    // Every read stopped after about 10 KB: at least one per timestamp, where a read bounded by
    // rows only (--scanSize 10000) takes the whole window at once.
    let metrics = sink.metrics().await;
    let reads: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("stage_read_duration_seconds_count")
                && l.contains("schema=\"wide.public\"")
                && l.contains("table=\"kv\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(reads >= 31, "staging reads: {reads}");
    sink.stop().await;
}

#[tokio::test]
async fn resolved_timestamps_never_go_backwards() {
    let db = Db::kv("kv").await;
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
    let db = Db::kv("kv").await;
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
    assert!(db.kv_rows().await.is_empty());
    sink.stop().await;
}

fn ts1() -> String {
    crate::support::sink::ts(1)
}

#[tokio::test]
async fn immediate_mode_applies_each_request_at_once() {
    let db = Db::kv("kv").await;
    let sink = Sink::start(&db, &["--immediate"]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1),
            upsert("kv", json!([1]), json!({"k": 1, "v": "b"}), 2),
        ]),
    )
    .await;
    assert_eq!(db.kv_rows().await, vec![(1, Some("b".into()))]);
    sink.post_ok("/kv/public", batch(vec![delete("kv", json!([1]), 3)]))
        .await;
    assert!(db.kv_rows().await.is_empty());
    sink.post_ok("/kv/public", resolved(3)).await;
    committed(&db, 3).await;
    sink.stop().await;
}

#[tokio::test]
async fn query_feeds_build_keys_from_the_target_primary_key() {
    let db = Db::kv("kv").await;
    let sink = Sink::start(&db, &[]).await;
    let body = json!({"payload": [
        {"after": {"k": 7, "v": "q"}, "updated": crate::support::sink::ts(1)},
        {"after": null, "before": {"k": 8, "v": "gone"}, "updated": crate::support::sink::ts(1)}
    ]});
    db.exec("INSERT INTO public.kv VALUES (8, 'present')").await;
    sink.post_ok("/kv/public/kv", body.to_string()).await;
    sink.post_ok("/kv/public/kv", resolved(1)).await;
    committed(&db, 1).await;
    assert_eq!(db.kv_rows().await, vec![(7, Some("q".into()))]);
    sink.stop().await;
}

#[tokio::test]
async fn the_target_going_down_answers_503_then_recovers() {
    let db = Db::kv("kv").await;
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
    assert_eq!(db.kv_rows().await.len(), 2);
    sink.stop().await;
}

#[tokio::test]
async fn two_instances_share_one_target_and_one_applies() {
    let db = Db::kv("kv").await;
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
    let rows = db.kv_rows().await;
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
    let db = Db::kv("kv").await;
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
    let db = Db::kv("kv").await;
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

/// The value of a counter for one schema in `/_/varz` (0 when absent).
async fn counter(sink: &Sink, name: &str, schema: &str) -> f64 {
    let (_, text) = sink.client.get("/_/varz").await.expect("varz");
    let prefix = format!("{name}{{schema=\"{schema}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("number"))
        .unwrap_or(0.0)
}

/// A table whose every write statement records its transaction and the interval it was open
/// in (`now()` is the transaction start), after pausing so transactions last long enough to
/// meet.
async fn logged_kv_db(name: &str) -> Db {
    let db = Db::kv(name).await;
    db.exec(
        "CREATE TABLE public.txlog (txid INT8, started TIMESTAMPTZ, at TIMESTAMPTZ);
         CREATE FUNCTION public.log_tx() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_sleep(0.05);
           INSERT INTO public.txlog VALUES (txid_current(), now(), clock_timestamp());
           RETURN NULL;
         END $$;
         CREATE TRIGGER log_tx AFTER INSERT OR UPDATE OR DELETE ON public.kv
           FOR EACH STATEMENT EXECUTE FUNCTION public.log_tx();",
    )
    .await;
    db
}

/// Pairs of distinct target transactions that were open at the same time.
async fn overlapping_transactions(db: &Db) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM public.txlog a JOIN public.txlog b ON a.txid < b.txid \
         WHERE a.started < b.at AND b.started < a.at",
    )
    .fetch_one(&db.pool)
    .await
    .expect("txlog")
}

/// 40 timestamps of 5 keys each, no key shared between timestamps.
fn disjoint_timestamps() -> String {
    let mut elements = Vec::new();
    for t in 1..=40i64 {
        for i in 0..5 {
            let k = t * 10 + i;
            elements.push(upsert(
                "kv",
                json!([k]),
                json!({"k": k, "v": format!("t{t}")}),
                t,
            ));
        }
    }
    batch(elements)
}

#[tokio::test]
async fn flushes_of_disjoint_keys_run_in_overlapping_transactions() {
    let db = logged_kv_db("overlap").await;
    let sink = Sink::start(&db, &["--flushSize", "5", "--parallelism", "16"]).await;
    sink.post_ok("/overlap/public", disjoint_timestamps()).await;
    sink.post_ok("/overlap/public", resolved(40)).await;
    committed_in(&db.pool, "overlap.public", 40).await;
    assert_eq!(db.kv_rows().await.len(), 200);
    assert_eq!(db.count("_cdc_sink.overlap_public_kv").await, 0);
    let pairs = overlapping_transactions(&db).await;
    assert!(pairs > 0, "no two apply transactions were open at once");
    assert!(
        counter(
            &sink,
            "core_sweep_overlapping_flushes_total",
            "overlap.public"
        )
        .await
            > 0.0,
        "the overlap metric saw it too"
    );
    sink.stop().await;
}

#[tokio::test]
async fn parallelism_one_applies_one_transaction_at_a_time() {
    let db = logged_kv_db("serial").await;
    let sink = Sink::start(&db, &["--flushSize", "5", "--parallelism", "1"]).await;
    sink.post_ok("/serial/public", disjoint_timestamps()).await;
    sink.post_ok("/serial/public", resolved(40)).await;
    committed_in(&db.pool, "serial.public", 40).await;
    assert_eq!(db.kv_rows().await.len(), 200);
    let txs: i64 = sqlx::query_scalar("SELECT count(DISTINCT txid) FROM public.txlog")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(txs, 40, "one transaction per flush of 5 rows");
    assert_eq!(overlapping_transactions(&db).await, 0);
    sink.stop().await;
}

#[tokio::test]
async fn per_key_order_holds_when_flushes_share_keys() {
    let db = Db::kv("order").await;
    db.exec(
        "CREATE TABLE public.applied (id BIGSERIAL PRIMARY KEY, k INT8, v TEXT);
         CREATE FUNCTION public.log_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO public.applied (k, v) VALUES (NEW.k, NEW.v); RETURN NULL; END $$;
         CREATE TRIGGER log_row AFTER INSERT OR UPDATE ON public.kv
           FOR EACH ROW EXECUTE FUNCTION public.log_row();",
    )
    .await;
    let sink = Sink::start(&db, &["--flushSize", "3", "--parallelism", "16"]).await;
    // Even timestamps write keys 0..4, odd ones 10..14 (neighbours are disjoint and may run
    // together; every other flush shares all its keys), and every fifth also writes key 99.
    let version = |t: i64| {
        let base = if t % 2 == 0 { 0 } else { 10 };
        let mut keys: Vec<i64> = (base..base + 4).collect();
        if t % 5 == 0 {
            keys.push(99);
        }
        batch(
            keys.into_iter()
                .map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("{t}")}), t))
                .collect(),
        )
    };
    // Delivered 1, 2, 3, 2, 4, … with redeliveries and one resolved for the whole window.
    for t in 1..=30 {
        sink.post_ok("/order/public", version(t)).await;
        if t % 3 == 0 {
            sink.post_ok("/order/public", version(t - 1)).await;
        }
    }
    sink.post_ok("/order/public", resolved(30)).await;
    committed_in(&db.pool, "order.public", 30).await;
    let rows: Vec<(i64, Option<String>)> = db.kv_rows().await;
    let want: Vec<(i64, Option<String>)> = (0..4)
        .map(|k| (k, Some("30".to_string())))
        .chain((10..14).map(|k| (k, Some("29".to_string()))))
        .chain([(99, Some("30".to_string()))])
        .collect();
    assert_eq!(rows, want);
    let log: Vec<(i64, String)> = sqlx::query_as("SELECT k, v FROM public.applied ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let mut last: std::collections::HashMap<i64, i64> = Default::default();
    for (k, v) in log {
        let t: i64 = v.parse().unwrap();
        let prev = last.insert(k, t).unwrap_or(0);
        assert!(t > prev, "key {k}: version {t} applied after {prev}");
    }
    assert!(
        counter(
            &sink,
            "core_sweep_overlapping_flushes_total",
            "order.public"
        )
        .await
            > 0.0,
        "disjoint neighbours should have overlapped"
    );
    sink.stop().await;
}

#[tokio::test]
async fn a_child_in_a_later_concurrent_flush_waits_for_its_parent() {
    let db = Db::new("fk").await;
    // The parent's writes linger in their transaction, so a child flush started alongside
    // finds its parent not yet committed.
    db.exec(
        "CREATE TABLE public.parent (id INT8 PRIMARY KEY, v TEXT);
         CREATE TABLE public.child (id INT8 PRIMARY KEY, parent_id INT8 NOT NULL REFERENCES public.parent (id));
         CREATE FUNCTION public.linger() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
         CREATE TRIGGER linger AFTER INSERT ON public.parent
           FOR EACH STATEMENT EXECUTE FUNCTION public.linger();",
    )
    .await;
    let sink = Sink::start(&db, &["--flushSize", "1", "--parallelism", "16"]).await;
    let mut elements = Vec::new();
    for i in 0..4i64 {
        elements.push(upsert(
            "parent",
            json!([i]),
            json!({"id": i, "v": "p"}),
            2 * i + 1,
        ));
        elements.push(upsert(
            "child",
            json!([i]),
            json!({"id": i, "parent_id": i}),
            2 * i + 2,
        ));
    }
    sink.post_ok("/fk/public", batch(elements)).await;
    sink.post_ok("/fk/public", resolved(8)).await;
    committed_in(&db.pool, "fk.public", 8).await;
    assert_eq!(db.count("public.parent").await, 4);
    assert_eq!(db.count("public.child").await, 4);
    assert!(
        counter(&sink, "core_sweep_deferred_flushes_total", "fk.public").await > 0.0,
        "a child flush should have met its uncommitted parent and been retried"
    );
    sink.stop().await;
}

/// Waits until the committed checkpoint of `group` reaches `at` in the staging database
/// behind `pool`.
async fn committed_in(pool: &sqlx::PgPool, group: &str, at: i64) {
    let want = hlc(at).to_decimal();
    eventually("checkpoint commit", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM _cdc_sink.checkpoints WHERE group_name = $1 AND source_hlc >= $2::DECIMAL AND target_applied_at IS NOT NULL",
        )
        .bind(group)
        .bind(&want)
        .fetch_one(pool)
        .await
        .ok()?;
        (n > 0).then_some(())
    })
    .await
}

/// A `staging` database next to the target, and a pool on it.
async fn staging_db(db: &Db) -> (String, sqlx::PgPool) {
    db.cluster
        .psql("postgres", "CREATE DATABASE staging")
        .expect("create staging database");
    let url = db.cluster.url("staging");
    let pool = sqlx::PgPool::connect(&url).await.expect("connect staging");
    (url, pool)
}

async fn has_staging_schema(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = '_cdc_sink'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
        > 0
}

#[tokio::test]
async fn a_separate_staging_database_holds_staging_while_windows_apply_to_the_target() {
    let db = Db::kv("kv").await;
    let (url, staging) = staging_db(&db).await;
    let version = |t: i64| {
        batch(
            (0..20)
                .map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("t{t}")}), t))
                .collect(),
        )
    };
    let sink = Sink::start(&db, &["--stagingConn", &url, "--flushSize", "10"]).await;
    for t in 1..=3 {
        sink.post_ok("/kv/public", version(t)).await;
    }
    assert_eq!(count_in(&staging, "_cdc_sink.kv_public_kv").await, 60);
    sink.post_ok("/kv/public", resolved(3)).await;
    committed_in(&staging, "kv.public", 3).await;
    assert!(db
        .kv_rows()
        .await
        .iter()
        .all(|(_, v)| v.as_deref() == Some("t3")));
    assert_eq!(count_in(&staging, "_cdc_sink.kv_public_kv").await, 0);
    assert!(has_staging_schema(&staging).await);
    assert!(
        !has_staging_schema(&db.pool).await,
        "nothing staged in the target"
    );
    // Staged but not yet resolved when the sink stops: the next one picks it up.
    sink.post_ok("/kv/public", version(4)).await;
    sink.stop().await;
    let sink = Sink::start(&db, &["--stagingConn", &url]).await;
    sink.post_ok("/kv/public", version(3)).await; // below the checkpoint: dropped
    sink.post_ok("/kv/public", resolved(4)).await;
    committed_in(&staging, "kv.public", 4).await;
    let rows = db.kv_rows().await;
    assert_eq!(rows.len(), 20);
    assert!(
        rows.iter().all(|(_, v)| v.as_deref() == Some("t4")),
        "{rows:?}"
    );
    assert_eq!(count_in(&staging, "_cdc_sink.kv_public_kv").await, 0);
    assert!(!has_staging_schema(&db.pool).await);
    sink.stop().await;
}

#[tokio::test]
async fn immediate_mode_with_separate_staging_writes_the_target_and_checkpoints_staging() {
    let db = Db::kv("kv").await;
    let (url, staging) = staging_db(&db).await;
    let sink = Sink::start(&db, &["--immediate", "--stagingConn", &url]).await;
    sink.post_ok(
        "/kv/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1),
            upsert("kv", json!([2]), json!({"k": 2, "v": "b"}), 1),
        ]),
    )
    .await;
    assert_eq!(
        db.kv_rows().await,
        vec![(1, Some("a".into())), (2, Some("b".into()))]
    );
    sink.post_ok("/kv/public", resolved(1)).await;
    committed_in(&staging, "kv.public", 1).await;
    assert!(!has_staging_schema(&db.pool).await);
    sink.stop().await;
}

async fn count_in(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("count {table}: {e}"))
}

#[tokio::test]
async fn a_table_created_while_a_window_applies_is_not_skipped() {
    let db = Db::kv("grow").await;
    // Slow flushes and small pages: the window's reader reaches its end long after the new
    // table and a newer resolved timestamp have arrived.
    db.exec(
        "CREATE FUNCTION public.linger() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.2); RETURN NULL; END $$;
         CREATE TRIGGER linger AFTER INSERT ON public.kv
           FOR EACH STATEMENT EXECUTE FUNCTION public.linger();",
    )
    .await;
    let sink = Sink::start(
        &db,
        &["--flushSize", "5", "--scanSize", "5", "--parallelism", "1"],
    )
    .await;
    let elements = (1..=40i64)
        .map(|k| upsert("kv", json!([k]), json!({"k": k, "v": "a"}), k))
        .collect();
    sink.post_ok("/grow/public", batch(elements)).await;
    sink.post_ok("/grow/public", resolved(40)).await;
    eventually("the window starts", WAIT, || async {
        (db.count("public.kv").await > 0).then_some(())
    })
    .await;
    db.exec("CREATE TABLE public.later (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    sink.post_ok(
        "/grow/public",
        batch(vec![upsert(
            "later",
            json!([1]),
            json!({"k": 1, "v": "new"}),
            41,
        )]),
    )
    .await;
    sink.post_ok("/grow/public", resolved(41)).await;
    assert!(
        db.count("public.kv").await < 40,
        "the first window must still be applying for this test to mean anything"
    );
    committed_in(&db.pool, "grow.public", 41).await;
    assert_eq!(db.count("public.kv").await, 40);
    assert_eq!(
        db.count("public.later").await,
        1,
        "the new table's row was applied"
    );
    sink.stop().await;
}
