//! Hostile and careless input: rows the later steps could not handle are refused at ingest;
//! bodies are admitted within a budget of bytes in flight, and compressed ones within the size
//! limit once decompressed.

use crate::support::process::{free_port, Process};
use crate::support::sink::{batch, committed, hlc, resolved, upsert, Sink};
use crate::support::{eventually, Db};
use bytes::Bytes;
use cdc_sink::server::client::{Client, ClientOptions};
use http::StatusCode;
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(20);

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

/// A client of `sink` that labels every body with `Content-Encoding: coding`.
fn client_with_encoding(sink: &Sink, coding: &str) -> Client {
    Client::new(
        &format!("https://{}", sink.addr()),
        ClientOptions {
            insecure_skip_verify: true,
            headers: vec![("content-encoding".into(), coding.into())],
            ..Default::default()
        },
    )
    .expect("client")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    w.write_all(data).expect("compress");
    w.finish().expect("compress")
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

fn kv_batch(keys: std::ops::Range<i64>, at: i64) -> String {
    batch(
        keys.map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("v{k}")}), at))
            .collect(),
    )
}

#[tokio::test]
async fn gzip_and_zstd_bodies_are_staged_and_applied_and_other_codings_get_415() {
    let db = Db::kv("hostile_codings").await;
    let sink = Sink::start(&db, &[]).await;
    let path = "/hostile_codings/public";
    let (status, text) = client_with_encoding(&sink, "gzip")
        .post(path, Bytes::from(gzip(kv_batch(0..50, 1).as_bytes())))
        .await
        .expect("gzip post");
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = client_with_encoding(&sink, "zstd")
        .post(path, Bytes::from(zstd(kv_batch(50..100, 2).as_bytes())))
        .await
        .expect("zstd post");
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(db.count("_cdc_sink.hostile_codings_public_kv").await, 100);

    let resp = client_with_encoding(&sink, "br")
        .request(http::Method::POST, path, Bytes::from(kv_batch(100..101, 2)))
        .await
        .expect("br post");
    assert_eq!(
        resp.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{}",
        resp.body
    );
    assert!(resp.body.contains("\"br\""), "{}", resp.body);
    assert_eq!(resp.headers["accept-encoding"], "gzip, zstd");
    // A body that is not what its header says is a bad request, not a crash.
    let (status, text) = client_with_encoding(&sink, "gzip")
        .post(path, Bytes::from(kv_batch(100..101, 2)))
        .await
        .expect("mislabelled post");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert_eq!(db.count("_cdc_sink.hostile_codings_public_kv").await, 100);

    // Resolved markers may come compressed too.
    let (status, text) = client_with_encoding(&sink, "gzip")
        .post(path, Bytes::from(gzip(resolved(2).as_bytes())))
        .await
        .expect("gzip resolved");
    assert_eq!(status, StatusCode::OK, "{text}");
    committed(&db.pool, "hostile_codings.public", hlc(2)).await;
    let rows = db.kv_rows().await;
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[7], (7, Some("v7".into())));
    assert_eq!(rows[77], (77, Some("v77".into())));
    sink.stop().await;
}

#[tokio::test]
async fn over_the_byte_budget_a_request_gets_503_with_retry_after_until_the_bytes_are_released() {
    let db = Db::kv("hostile_budget").await;
    let sink = Sink::start(
        &db,
        &[
            "--tlsSelfSigned=false",
            "--maxRequestBytes=64KiB",
            "--maxInflightBytes=64KiB",
        ],
    )
    .await;
    let client =
        Client::new(&format!("http://{}", sink.addr()), ClientOptions::default()).expect("client");
    let path = "/hostile_budget/public";
    let small = kv_batch(0..100, 1);
    assert!(
        small.len() > 6_000 && small.len() < 60_000,
        "{}",
        small.len()
    );

    // A client that declares 60,000 bytes and sends a few: the declared size is reserved
    // while it trickles.
    let mut slow = tokio::net::TcpStream::connect(sink.addr())
        .await
        .expect("connect");
    slow.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: sink\r\nContent-Length: 60000\r\n\r\n{{\"payl")
            .as_bytes(),
    )
    .await
    .expect("send headers");
    let busy = eventually(
        "a 503 while the slow body holds the budget",
        WAIT,
        || async {
            let r = client
                .request(http::Method::POST, path, Bytes::from(small.clone()))
                .await
                .expect("post");
            (r.status != StatusCode::OK).then_some(r)
        },
    )
    .await;
    assert_eq!(
        busy.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        busy.body
    );
    assert_eq!(busy.headers["retry-after"], "1");
    assert!(busy.body.contains("--maxInflightBytes"), "{}", busy.body);
    assert_eq!(
        db.count_if_exists("_cdc_sink.hostile_budget_public_kv")
            .await,
        0
    );
    let (_, varz) = client.get("/_/varz").await.expect("metrics");
    assert!(
        varz.lines()
            .any(|l| l.starts_with("http_over_budget_requests_total ") && !l.ends_with(" 0")),
        "{varz}"
    );

    // The slow client leaves: its reservation is given back and the batch goes through.
    drop(slow);
    eventually("a 200 once the budget is free", WAIT, || async {
        let (status, _) = client
            .post(path, Bytes::from(small.clone()))
            .await
            .expect("post");
        (status == StatusCode::OK).then_some(())
    })
    .await;
    // Finished requests hold nothing: many in a row, each nearly the size of the budget.
    let big = kv_batch(0..600, 2);
    assert!(big.len() > 40_000 && big.len() < 64 << 10, "{}", big.len());
    for _ in 0..5 {
        let (status, text) = client
            .post(path, Bytes::from(big.clone()))
            .await
            .expect("post");
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    // Over the size limit is still 413, not 503.
    let (status, text) = client
        .post(path, Bytes::from(kv_batch(0..2000, 3)))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    sink.stop().await;
}

/// VmHWM (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[tokio::test]
async fn a_zip_bomb_is_refused_with_413_without_the_memory_it_would_take() {
    let db = Db::kv("hostile_bomb").await;
    let port = free_port();
    let mut sink = Process::start(&db, port, &[]).await;
    // 1 GiB of zeros: one gzip member of 64 MiB, sixteen times (a stream may hold several).
    let member = gzip(&vec![0u8; 64 << 20]);
    let bomb: Vec<u8> = member.repeat(16);
    assert!(bomb.len() < 4 << 20, "{}", bomb.len());
    let client = Client::new(
        &format!("https://127.0.0.1:{port}"),
        ClientOptions {
            insecure_skip_verify: true,
            headers: vec![("content-encoding".into(), "gzip".into())],
            ..Default::default()
        },
    )
    .expect("client");
    let before = peak_rss(sink.pid());
    let started = std::time::Instant::now();
    let (status, text) = client
        .post("/hostile_bomb/public", Bytes::from(bomb))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(
        text.contains("decompressed request body larger than 33554432 bytes"),
        "{text}"
    );
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
    let grew = peak_rss(sink.pid()).saturating_sub(before);
    eprintln!(
        "zip bomb: peak RSS {} MiB before, grew by {} MiB",
        before >> 20,
        grew >> 20
    );
    assert!(grew < 160 << 20, "peak RSS grew by {} MiB", grew >> 20);
    // The server goes on serving compressed bodies.
    let (status, text) = client
        .post(
            "/hostile_bomb/public",
            Bytes::from(gzip(kv_batch(0..10, 1).as_bytes())),
        )
        .await
        .expect("post");
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(sink.exited().is_none());
    sink.kill9();
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Stress, run by hand (bounded, loopback only): many concurrent maximum-size requests against
/// the real binary with default flags; prints its peak RSS and the answers. Knobs:
/// `STRESS_CONCURRENCY` (64), `STRESS_SECONDS` (60), `STRESS_ROW_BYTES` (1000), `STRESS_CONNECTIONS` (8).
///
///     cargo test --test integration hostile::stress -- --ignored --nocapture
#[tokio::test]
#[ignore]
async fn stress_many_concurrent_maximum_size_requests() {
    let concurrency = env_or("STRESS_CONCURRENCY", 64);
    let seconds = env_or("STRESS_SECONDS", 60) as u64;
    let row_bytes = env_or("STRESS_ROW_BYTES", 1000).max(1);
    let connections = env_or("STRESS_CONNECTIONS", 8).max(1);
    let db = Db::kv("hostile_stress").await;
    let port = free_port();
    let sink = Process::start(&db, port, &[]).await;
    let pid = sink.pid();
    let start_rss = peak_rss(pid);
    // As many rows as fit the default --maxRequestBytes (32 MiB).
    let limit = 32usize << 20;
    let value = "x".repeat(row_bytes);
    let one = upsert("kv", json!([999_999]), json!({"k": 999_999, "v": value}), 1).to_string();
    let rows = (limit - 1024) / (one.len() + 1);
    let body_at = |at: i64| -> Bytes {
        let b = kv_batch_with(rows, &value, at);
        Bytes::from(b)
    };
    let sizes = body_at(1).len();
    assert!(sizes <= limit, "{sizes}");
    let clients: Vec<Client> = (0..connections)
        .map(|_| {
            Client::new(
                &format!("https://127.0.0.1:{port}"),
                ClientOptions {
                    insecure_skip_verify: true,
                    ..Default::default()
                },
            )
            .expect("client")
        })
        .collect();
    // A few bodies at distinct times, so each is staged: building them is slow.
    let bodies: Vec<Bytes> = (0..connections.min(8))
        .map(|c| body_at(c as i64 + 1))
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    let sampler = tokio::spawn(async move {
        let mut peak_current = 0u64;
        while std::time::Instant::now() < deadline + Duration::from_secs(2) {
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kib) = s
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak_current = peak_current.max(kib * 1024);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak_current
    });
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let client = clients[w % connections].clone();
        let body = bodies[w % bodies.len()].clone();
        tasks.spawn(async move {
            let (mut ok, mut busy, mut other) = (0u64, 0u64, 0u64);
            while std::time::Instant::now() < deadline {
                match client.post("/hostile_stress/public", body.clone()).await {
                    Ok((StatusCode::OK, _)) => ok += 1,
                    Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => {
                        busy += 1;
                        // CockroachDB backs off before retrying; a short pause keeps this a
                        // stress of admission rather than of the loopback.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Ok((s, t)) => {
                        other += 1;
                        eprintln!("unexpected {s}: {t}");
                    }
                    Err(e) => {
                        other += 1;
                        eprintln!("error: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (ok, busy, other)
        });
    }
    let (mut ok, mut busy, mut other) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (o, b, x) = r.expect("worker");
        ok += o;
        busy += b;
        other += x;
    }
    let sampled = sampler.await.expect("sampler");
    let peak = peak_rss(pid);
    eprintln!(
        "stress: {concurrency} concurrent requests of {sizes} bytes ({rows} rows of {row_bytes}-byte values) over {connections} connections for {seconds}s: {ok} × 200, {busy} × 503, {other} other; server peak RSS (VmHWM) {} MiB (at start {} MiB, highest VmRSS sampled {} MiB)",
        peak >> 20,
        start_rss >> 20,
        sampled >> 20
    );
    assert_eq!(other, 0);
    assert!(ok > 0);
    assert!(peak < 1 << 30, "peak RSS {} MiB", peak >> 20);
    sink.kill9();
}

/// A `kv` batch of `rows` rows whose values are `value`, at second `at`.
fn kv_batch_with(rows: usize, value: &str, at: i64) -> String {
    batch(
        (0..rows as i64)
            .map(|k| upsert("kv", json!([k]), json!({"k": k, "v": value}), at))
            .collect(),
    )
}
