//! Hostile and careless input: rows the later steps could not handle are refused at ingest.

use crate::support::sink::{batch, upsert, Sink};
use crate::support::{eventually, Db};
use http::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

fn nested(levels: usize) -> Value {
    let text = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
    serde_json::from_str(&text).expect("within serde's limit")
}

/// Text that does not compress, so the staging index cannot squeeze it in.
fn incompressible(len: usize) -> String {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            char::from(b'a' + (state >> 59) as u8 % 26)
        })
        .collect()
}

#[tokio::test]
async fn deep_json_and_huge_keys_are_refused_with_400_and_nothing_is_staged() {
    let db = Db::new("hostile_input").await;
    db.exec("CREATE TABLE public.docs (k TEXT PRIMARY KEY, v JSONB)")
        .await;
    let sink = Sink::start(&db, &[]).await;
    let path = "/hostile_input/public";
    let staging = "_cdc_sink.hostile_input_public_docs";

    let deep = batch(vec![upsert(
        "docs",
        json!(["a"]),
        json!({"k": "a", "v": nested(120)}),
        1,
    )]);
    let (status, body) = sink.post(path, deep).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("nested deeper than 100 levels") && body.contains("docs"),
        "{body}"
    );
    assert!(!body.trim_end().contains('\n'), "one line: {body}");

    let secret = incompressible(3_000);
    let huge = batch(vec![upsert(
        "docs",
        json!([secret]),
        json!({"k": secret, "v": 1}),
        1,
    )]);
    let (status, body) = sink.post(path, huge).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("docs") && body.contains("3004 bytes"),
        "{body}"
    );
    assert!(
        !body.contains(&secret[..40]),
        "the key is not echoed: {body}"
    );
    assert_eq!(db.count_if_exists(staging).await, 0);

    // The deepest accepted value and a key at the limit (incompressible) are staged.
    let fits = incompressible(cdc_sink::source::webhook::MAX_KEY_BYTES - 4);
    sink.post_ok(
        path,
        batch(vec![upsert(
            "docs",
            json!([fits]),
            json!({"k": fits, "v": nested(99)}),
            1,
        )]),
    )
    .await;
    assert_eq!(db.count_if_exists(staging).await, 1);
    sink.stop().await;
}

#[tokio::test]
async fn an_empty_post_is_refused_with_400_but_a_resolved_file_needs_no_body() {
    let db = Db::kv("hostile_empty").await;
    let sink = Sink::start(&db, &[]).await;
    for body in ["", " \n"] {
        let (status, text) = sink.post("/hostile_empty/public", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {text}");
        assert_eq!(text, "request body is empty\n");
    }
    // An empty batch is not an empty body.
    sink.post_ok("/hostile_empty/public", r#"{"payload":[],"length":0}"#)
        .await;
    // A cloud-storage resolved file carries its timestamp in its name.
    sink.post_ok(
        "/hostile_empty/public/2023-01-01/202301010000000000000000000000000.RESOLVED",
        "",
    )
    .await;
    sink.stop().await;
}

/// Threads of this process whose name starts with `prefix` (engine threads given up on are
/// renamed `script-stuck-N`).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

#[tokio::test]
async fn a_backtracking_userscript_leaves_one_stuck_thread_its_schema_gets_503_at_once_and_others_are_served(
) {
    let db = Db::new("hostile_redos").await;
    db.exec(
        "CREATE TABLE public.docs (k INT8 PRIMARY KEY, v TEXT);
         CREATE SCHEMA other;
         CREATE TABLE other.docs (k INT8 PRIMARY KEY, v TEXT);",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("redos.ts");
    std::fs::write(
        &script,
        r#"import * as api from "cdc-sink@v1";
for (const schema of ["hostile_redos.public", "hostile_redos.other"]) {
  api.configureSource(schema, {
    dispatch: (doc: any, meta: any) => (/^(a+)+$/.test(doc.v) ? {} : { [meta.table]: [doc] }),
  });
}
"#,
    )
    .unwrap();
    let script_flag = format!("--userscript={}", script.display());
    let sink = Sink::start(
        &db,
        &[
            &script_flag,
            "--userscriptDeadline=1s",
            "--userscriptMaxStuck=2",
            // The test process must not be aborted; the watchdog is covered by unit tests.
            "--userscriptStuckAbort=0",
        ],
    )
    .await;
    // Backtracks for several seconds (2^n steps), then ends; the debug build is slow.
    let evil = format!("{}!", "a".repeat(27));
    let row = |k: i64, v: &str| batch(vec![upsert("docs", json!([k]), json!({"k": k, "v": v}), 1)]);

    let started = std::time::Instant::now();
    let (status, body) = sink.post("/hostile_redos/public", row(1, &evil)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("deadline"), "{body}");
    assert_eq!(threads_named("script-stuck-"), 1);

    eprintln!("first answer (deadline) after {:?}", started.elapsed());
    // CockroachDB retries: each retry is refused at once and starts no thread.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let (status, body) = sink.post("/hostile_redos/public", row(1, &evil)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("abandoned userscript worker"), "{body}");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("slowest refused retry {slowest:?}");
    assert_eq!(threads_named("script-stuck-"), 1);
    assert!(
        sink.metrics().await.contains("script_stuck_workers 1"),
        "the gauge counts the stuck worker"
    );

    // Another schema runs its dispatch on the replacement worker meanwhile.
    sink.post_ok("/hostile_redos/other", row(2, "fine")).await;
    assert_eq!(
        db.count_if_exists("_cdc_sink.hostile_redos_other_docs")
            .await,
        1
    );

    // When the backtracking ends its thread stops, and the schema is served again.
    eventually(
        "the stuck thread ends",
        Duration::from_secs(600),
        || async { (threads_named("script-stuck-") == 0).then_some(()) },
    )
    .await;
    eprintln!("the abandoned job ran {:?}", started.elapsed());
    sink.post_ok("/hostile_redos/public", row(3, "fine")).await;
    assert_eq!(
        db.count_if_exists("_cdc_sink.hostile_redos_public_docs")
            .await,
        1
    );
    sink.stop().await;
}
