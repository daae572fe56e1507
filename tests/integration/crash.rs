//! kill -9 of the real binary at awkward moments loses nothing and duplicates nothing.

use crate::support::sink::{batch, hlc, resolved, upsert};
use crate::support::{eventually, Db};
use bytes::Bytes;
use cdc_sink::server::client::{Client, ClientOptions};
use http::StatusCode;
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Process {
    child: Child,
    client: Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Process {
    async fn start(db: &Db, port: u16, extra: &[&str]) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .args([
                "start",
                "--bindAddr",
                &format!("127.0.0.1:{port}"),
                "--tlsSelfSigned",
                "--disableAuthentication",
            ])
            .args(["--targetConn", &db.url()])
            // 2023 timestamps would select best-effort mode; a later flag in `extra` wins.
            .arg("--bestEffortWindow=0")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cdc-sink");
        let client = Client::new(
            &format!("https://127.0.0.1:{port}"),
            ClientOptions {
                insecure_skip_verify: true,
                ..Default::default()
            },
        )
        .unwrap();
        eventually("sink health", Duration::from_secs(30), || async {
            match client.get("/_/healthz").await {
                Ok((StatusCode::OK, _)) => Some(()),
                _ => None,
            }
        })
        .await;
        Process { child, client }
    }

    async fn post(&self, path: &str, body: String) -> StatusCode {
        self.client
            .post(path, Bytes::from(body))
            .await
            .map(|(s, _)| s)
            .unwrap_or(StatusCode::BAD_GATEWAY)
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
