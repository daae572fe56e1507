//! The real `cdc-sink` binary as a child process, for tests that kill or race it.

use super::Db;
use bytes::Bytes;
use cdc_sink::server::client::{Client, ClientOptions};
use http::StatusCode;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Runs `cdc-sink ARGS` to the end, fails the test (with the end of its log) unless it
/// succeeds, and returns the JSON summary it printed last.
pub(crate) fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(args)
        .output()
        .expect("run cdc-sink");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cdc-sink {} failed: {stdout}\n{}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("json summary")
}

/// The real `cdc-sink` binary, started on `port` in front of a test database.
pub(crate) struct Process {
    pub child: Child,
    pub client: Client,
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Process {
    pub(crate) async fn start(db: &Db, port: u16, extra: &[&str]) -> Process {
        Process::start_logging(db, port, extra, Stdio::null()).await
    }

    /// Starts the sink with its log (stderr) going to `log`.
    pub(crate) async fn start_logging(db: &Db, port: u16, extra: &[&str], log: Stdio) -> Process {
        let mut p = Process::spawn(&db.url(), port, extra, log);
        if let Err(e) = p.healthy(Duration::from_secs(30)).await {
            panic!("sink health: {e}");
        }
        p
    }

    /// Spawns the sink in front of `target_url` without waiting for it to serve.
    pub(crate) fn spawn(target_url: &str, port: u16, extra: &[&str], log: Stdio) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .args([
                "start",
                "--bindAddr",
                &format!("127.0.0.1:{port}"),
                "--tlsSelfSigned",
                "--disableAuthentication",
            ])
            .args(["--targetConn", target_url])
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
        Process { child, client }
    }

    /// Waits until `/_/healthz` answers 200; an exit or the deadline is an error.
    pub(crate) async fn healthy(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Err(format!("exited with {status} before serving"));
            }
            if let Ok((StatusCode::OK, _)) = self.client.get("/_/healthz").await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not healthy after {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status, once the process has ended.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) async fn post(&self, path: &str, body: String) -> StatusCode {
        self.client
            .post(path, Bytes::from(body))
            .await
            .map(|(s, _)| s)
            .unwrap_or(StatusCode::BAD_GATEWAY)
    }

    /// Posts `body`; a connection error or a request running over `within` is an `Err`.
    pub(crate) async fn post_within(
        &self,
        path: &str,
        body: String,
        within: Duration,
    ) -> Result<(StatusCode, String), String> {
        match tokio::time::timeout(within, self.client.post(path, Bytes::from(body))).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {within:?}")),
        }
    }

    pub(crate) fn kill9(mut self) {
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
