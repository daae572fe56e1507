//! The built `cdc-sink` binary as a child process, so that SIGKILL is a real kill.

use bytes::Bytes;
use cdc_sink::server::client::{Client, ClientOptions};
use http::StatusCode;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago (a restarted instance keeps its port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local address")
        .port()
}

/// One sink process on `127.0.0.1:port` with a self-signed certificate and no authentication.
pub struct Process {
    child: Child,
    pub client: Client,
    pub port: u16,
}

impl Process {
    /// Spawns the sink in front of `target_url` without waiting for it to serve; its log
    /// (stderr) goes to `log`. Consistent mode is pinned (`--bestEffortWindow=0`): the 2023
    /// times of the payload builders would select best-effort mode; a later flag in `extra` wins.
    pub fn spawn(target_url: &str, port: u16, extra: &[&str], log: Stdio) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .args([
                "start",
                "--bindAddr",
                &format!("127.0.0.1:{port}"),
                "--tlsSelfSigned",
                "--disableAuthentication",
                "--targetConn",
                target_url,
                "--bestEffortWindow=0",
            ])
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
        .expect("client");
        Process {
            child,
            client,
            port,
        }
    }

    /// Waits until `/_/healthz` answers 200; an exit or the deadline is an error.
    pub async fn healthy(&mut self, within: Duration) -> Result<(), String> {
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
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Posts `body`; a connection error or a request running over `within` is an `Err`.
    pub async fn post(
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

    /// SIGKILL, then reap.
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
