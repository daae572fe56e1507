//! Test servers: a recording changefeed handler and a server running it on 127.0.0.1:0.

use cdc_sink::server::{
    self, Client, ClientOptions, Handler, Request, Response, ServerArgs, ServerError,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Records every changefeed request and answers `200 OK`. The query steers it:
/// `delay_ms=N` sleeps first, `status=N` answers with that status. Clones share the records.
#[derive(Clone)]
pub(crate) struct Recorder(Arc<Records>);

pub(crate) struct Records {
    pub requests: Mutex<Vec<Request>>,
    /// Handler calls begun / run to completion (a cancelled call never finishes).
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    pub health: Mutex<Result<(), String>>,
}

impl std::ops::Deref for Recorder {
    type Target = Records;
    fn deref(&self) -> &Records {
        &self.0
    }
}

impl Recorder {
    pub(crate) fn new() -> Recorder {
        Recorder(Arc::new(Records {
            requests: Mutex::new(Vec::new()),
            started: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            health: Mutex::new(Ok(())),
        }))
    }

    /// Makes `/_/healthz` fail with `reason` (or succeed again with None).
    pub(crate) fn set_health(&self, reason: Option<&str>) {
        *self.health.lock().expect("lock") = reason.map_or(Ok(()), |r| Err(r.to_string()));
    }

    pub(crate) fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("lock").clone()
    }

    pub(crate) fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub(crate) fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

impl Handler for Recorder {
    fn changefeed(&self, req: Request) -> BoxFuture<'static, Response> {
        let me = self.clone();
        async move {
            me.started.fetch_add(1, Ordering::SeqCst);
            let delay = query_param(req.query.as_deref(), "delay_ms");
            let status = query_param(req.query.as_deref(), "status")
                .and_then(|s| StatusCode::from_u16(s as u16).ok())
                .unwrap_or(StatusCode::OK);
            me.requests.lock().expect("lock").push(req);
            if let Some(ms) = delay {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            me.finished.fetch_add(1, Ordering::SeqCst);
            Response::text(
                status,
                if status == StatusCode::OK {
                    "OK"
                } else {
                    "failed"
                },
            )
        }
        .boxed()
    }

    fn health(&self) -> BoxFuture<'static, Result<(), String>> {
        let r = self.health.lock().expect("lock").clone();
        async move { r }.boxed()
    }
}

/// Arguments for a test server: loopback, ephemeral port, cleartext, short grace period.
pub(crate) fn args() -> ServerArgs {
    ServerArgs {
        bind_addr: "127.0.0.1:0".into(),
        grace_period: Duration::from_secs(10),
        ..ServerArgs::default()
    }
}

pub(crate) struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub cert_pem: Option<String>,
    pub handler: Recorder,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub(crate) async fn start(args: ServerArgs) -> TestServer {
        let handler = Recorder::new();
        let bound = server::bind(&args).await.expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let addr = bound.local_addr();
        let metrics_addr = bound.metrics_addr();
        let cert_pem = bound.certificate_pem().map(str::to_string);
        assert_eq!(bound.tls(), cert_pem.is_some());
        let h: Arc<dyn Handler> = Arc::new(handler.clone());
        let task = tokio::spawn(bound.serve(h, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            metrics_addr,
            cert_pem,
            handler,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) fn url(&self) -> String {
        let scheme = if self.cert_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// A client that trusts the server's certificate.
    pub(crate) fn client(&self, http2: bool) -> Client {
        Client::new(
            &self.url(),
            ClientOptions {
                ca_cert_pem: self.cert_pem.clone().map(String::into_bytes),
                http2,
                ..ClientOptions::default()
            },
        )
        .expect("client")
    }

    pub(crate) fn metrics_client(&self) -> Client {
        let addr = self.metrics_addr.expect("metricsAddr set");
        Client::new(&format!("http://{addr}"), ClientOptions::default()).expect("client")
    }

    /// Resolves the shutdown future without waiting for the server to stop.
    pub(crate) fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits (at most `within`) for `serve` to return.
    pub(crate) async fn stopped(&mut self, within: Duration) -> Result<(), ServerError> {
        let task = self.task.take().expect("not yet stopped");
        tokio::time::timeout(within, task)
            .await
            .expect("server stops in time")
            .expect("server task")
    }

    pub(crate) async fn shutdown(mut self) {
        self.begin_shutdown();
        self.stopped(Duration::from_secs(20)).await.expect("serve");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
