//! The real `cdc-sink` binary as a child process, for tests that kill or race it.

use super::{eventually, Db};
use bytes::Bytes;
use cdc_sink::server::client::{Client, ClientOptions};
use http::StatusCode;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The real `cdc-sink` binary, started on `port` in front of a test database.
pub struct Process {
    pub child: Child,
    pub client: Client,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Process {
    pub async fn start(db: &Db, port: u16, extra: &[&str]) -> Process {
        Process::start_logging(db, port, extra, Stdio::null()).await
    }

    /// Starts the sink with its log (stderr) going to `log`.
    pub async fn start_logging(db: &Db, port: u16, extra: &[&str], log: Stdio) -> Process {
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
            .stderr(log)
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

    pub async fn post(&self, path: &str, body: String) -> StatusCode {
        self.client
            .post(path, Bytes::from(body))
            .await
            .map(|(s, _)| s)
            .unwrap_or(StatusCode::BAD_GATEWAY)
    }

    pub fn kill9(mut self) {
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
