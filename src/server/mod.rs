//! The HTTP front door: one listener (TLS with ALPN `h2`/`http/1.1`, or cleartext HTTP/1.1 +
//! h2c) that routes the diagnostics (`/_/healthz`, `/_/ready`, `/_/varz`, `/metrics`) itself
//! and hands every other request, body fully read, to a [`Handler`] (the changefeed source).
//! An optional second, plain listener (`--metricsAddr`) serves the same diagnostics and nothing
//! else. Shutdown is graceful and bounded by `--gracePeriod`.
//!
//! Changefeed requests run detached from their connection: a client that hangs up does not
//! abort staging half-way, only `--httpResponseTimeout` (or the end of the grace period) does.

pub(crate) mod body;
pub mod client;
pub(crate) mod tls;

pub use client::{Client, ClientError, ClientOptions, ClientResponse, Protocol};
pub use tls::{self_signed, self_signed_pem, SelfSigned};

use crate::config::{format_duration, parse_bytes, parse_duration};
use crate::error::ErrorChain;
use crate::metrics as m;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, ALLOW, CONTENT_TYPE, RETRY_AFTER, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::CertificateDer;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

const DEFAULT_BIND_ADDR: &str = ":26258";
/// A stalled TLS handshake must not hold a connection slot (or the shutdown) forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// What we suggest to clients after a timeout: the trouble is usually short-lived.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;
const H2_MAX_FRAME: u32 = 256 << 10;
const DEFAULT_H2_STREAMS: u32 = 32;
const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Real changefeed batches are megabytes; this leaves room for very wide rows.
const DEFAULT_MAX_REQUEST_BYTES: &str = "32MiB";
/// Requests hold several times their body in memory while they are decoded and staged: this
/// keeps the process near 1 GiB at most whatever the number of concurrent requests.
const DEFAULT_MAX_INFLIGHT_BYTES: &str = "96MiB";
/// At most one WARN per listener per this period while connections are refused.
const REFUSED_LOG_PERIOD: Duration = Duration::from_secs(10);
/// What Go servers answer to plain HTTP on a TLS port.
const PLAIN_HTTP_ON_TLS: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Listener, TLS and request-limit flags of `cdc-sink start` (the reference's names).
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to accept changefeed requests on (":port" = all interfaces)
    #[arg(long = "bindAddr", env = "CDC_SINK_BIND_ADDR", default_value = DEFAULT_BIND_ADDR)]
    pub bind_addr: String,
    /// Separate plain-HTTP address that serves the diagnostics (/_/healthz, /_/ready, /_/varz, /metrics) too, and nothing else
    #[arg(
        long = "metricsAddr",
        env = "CDC_SINK_METRICS_ADDR",
        default_value = ""
    )]
    pub metrics_addr: String,
    /// PEM certificate chain to serve (requires tlsPrivateKey)
    #[arg(long = "tlsCertificate", env = "CDC_SINK_TLS_CERTIFICATE")]
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) of tlsCertificate
    #[arg(long = "tlsPrivateKey", env = "CDC_SINK_TLS_PRIVATE_KEY")]
    pub tls_private_key: Option<PathBuf>,
    /// PEM CA certificate(s): require a client certificate signed by one of them (mTLS); reloaded on SIGHUP with the certificate files
    #[arg(long = "tlsClientCA", env = "CDC_SINK_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve TLS with a generated self-signed localhost certificate
    #[arg(
        long = "tlsSelfSigned",
        env = "CDC_SINK_TLS_SELF_SIGNED",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub tls_self_signed: bool,
    /// Processing deadline per changefeed request (Go duration)
    #[arg(long = "httpResponseTimeout", env = "CDC_SINK_HTTP_RESPONSE_TIMEOUT", default_value = "2m0s", value_parser = parse_duration)]
    pub http_response_timeout: Duration,
    /// Largest accepted request body, before and after decompression; larger bodies are answered 413
    #[arg(long = "maxRequestBytes", env = "CDC_SINK_MAX_REQUEST_BYTES", default_value = DEFAULT_MAX_REQUEST_BYTES, value_parser = parse_bytes)]
    pub max_request_bytes: u64,
    /// Request body bytes held at once by all requests in flight; a request that does not fit is answered 503 with Retry-After before its body is read
    #[arg(long = "maxInflightBytes", env = "CDC_SINK_MAX_INFLIGHT_BYTES", default_value = DEFAULT_MAX_INFLIGHT_BYTES, value_parser = parse_bytes)]
    pub max_inflight_bytes: u64,
    /// Time allowed for in-flight requests to finish at shutdown (Go duration)
    #[arg(long = "gracePeriod", env = "CDC_SINK_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub grace_period: Duration,
    /// HTTP/1 request headers must arrive within this (Go duration); slower clients are disconnected
    #[arg(long = "httpHeaderReadTimeout", env = "CDC_SINK_HTTP_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub http_header_read_timeout: Duration,
    /// Close a connection with no request for this long (Go duration; 0 = never)
    #[arg(long = "httpIdleTimeout", env = "CDC_SINK_HTTP_IDLE_TIMEOUT", default_value = "2m0s", value_parser = parse_duration)]
    pub http_idle_timeout: Duration,
    /// Interval of HTTP/2 keepalive pings (Go duration; 0 = no pings)
    #[arg(long = "http2KeepaliveInterval", env = "CDC_SINK_HTTP2_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_interval: Duration,
    /// An HTTP/2 connection whose ping is not answered within this is closed (Go duration)
    #[arg(long = "http2KeepaliveTimeout", env = "CDC_SINK_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub http2_keepalive_timeout: Duration,
    /// Concurrent HTTP/2 streams (requests) allowed per connection
    #[arg(
        long = "http2MaxConcurrentStreams",
        env = "CDC_SINK_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = DEFAULT_H2_STREAMS
    )]
    pub http2_max_concurrent_streams: u32,
    /// Open connections per listener; further ones are closed at once (logged once per 10s)
    #[arg(
        long = "maxConnections",
        env = "CDC_SINK_MAX_CONNECTIONS",
        default_value_t = DEFAULT_MAX_CONNECTIONS
    )]
    pub max_connections: usize,
    /// TCP keepalive idle time and probe interval of accepted sockets (Go duration; 0 = off)
    #[arg(long = "tcpKeepalive", env = "CDC_SINK_TCP_KEEPALIVE", default_value = "1m0s", value_parser = parse_duration)]
    pub tcp_keepalive: Duration,
}

impl Default for ServerArgs {
    /// The flag defaults, without reading the environment.
    fn default() -> Self {
        ServerArgs {
            bind_addr: DEFAULT_BIND_ADDR.to_string(),
            metrics_addr: String::new(),
            tls_certificate: None,
            tls_private_key: None,
            tls_client_ca: None,
            tls_self_signed: false,
            http_response_timeout: Duration::from_secs(120),
            max_request_bytes: parse_bytes(DEFAULT_MAX_REQUEST_BYTES).unwrap_or(32 << 20),
            max_inflight_bytes: parse_bytes(DEFAULT_MAX_INFLIGHT_BYTES).unwrap_or(96 << 20),
            grace_period: Duration::from_secs(30),
            http_header_read_timeout: Duration::from_secs(30),
            http_idle_timeout: Duration::from_secs(120),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(20),
            http2_max_concurrent_streams: DEFAULT_H2_STREAMS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

impl ServerArgs {
    /// Checks the flags once, before anything starts, with the reference's messages.
    pub(crate) fn validate(&self) -> Result<(), ServerError> {
        if self.bind_addr.trim().is_empty() {
            return Err(ServerError::BindAddrUnset);
        }
        parse_listen_addr("bindAddr", &self.bind_addr)?;
        if !self.metrics_addr.trim().is_empty() {
            parse_listen_addr("metricsAddr", &self.metrics_addr)?;
        }
        let cert = non_empty(&self.tls_certificate);
        let key = non_empty(&self.tls_private_key);
        if cert.is_some() != key.is_some() {
            return Err(ServerError::TlsPairing);
        }
        if self.tls_self_signed && cert.is_some() {
            return Err(ServerError::SelfSignedWithCertificate);
        }
        if non_empty(&self.tls_client_ca).is_some() && cert.is_none() && !self.tls_self_signed {
            return Err(ServerError::InvalidFlag {
                flag: "tlsClientCA",
                reason: "client certificates need TLS: set tlsCertificate and tlsPrivateKey, or tlsSelfSigned".into(),
            });
        }
        if self.http_response_timeout.is_zero() {
            return Err(ServerError::InvalidFlag {
                flag: "httpResponseTimeout",
                reason: "must be greater than zero".into(),
            });
        }
        let positive: [(&'static str, bool); 4] = [
            (
                "httpHeaderReadTimeout",
                self.http_header_read_timeout.is_zero(),
            ),
            (
                "http2KeepaliveTimeout",
                self.http2_keepalive_timeout.is_zero(),
            ),
            (
                "http2MaxConcurrentStreams",
                self.http2_max_concurrent_streams == 0,
            ),
            ("maxConnections", self.max_connections == 0),
        ];
        if let Some((flag, _)) = positive.into_iter().find(|(_, zero)| *zero) {
            return Err(ServerError::InvalidFlag {
                flag,
                reason: "must be greater than zero".into(),
            });
        }
        if self.max_request_bytes == 0 {
            return Err(ServerError::InvalidFlag {
                flag: "maxRequestBytes",
                reason: "must be greater than zero".into(),
            });
        }
        // Otherwise a request within the size limit could never be admitted.
        if self.max_inflight_bytes < self.max_request_bytes {
            return Err(ServerError::InvalidFlag {
                flag: "maxInflightBytes",
                reason: format!(
                    "must be at least --maxRequestBytes ({} bytes)",
                    self.max_request_bytes
                ),
            });
        }
        Ok(())
    }
}

/// An empty path (e.g. from an empty environment variable) means "not set", as in the reference.
fn non_empty(p: &Option<PathBuf>) -> Option<&Path> {
    p.as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// Splits `host:port`; an empty host (":26258") means every interface.
fn parse_listen_addr(flag: &'static str, addr: &str) -> Result<(Option<String>, u16), ServerError> {
    let invalid = |reason: &str| ServerError::InvalidFlag {
        flag,
        reason: format!("{addr:?}: {reason}"),
    };
    let (host, port) = addr
        .trim()
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected host:port or :port"))?;
    let port: u16 = port.parse().map_err(|_| invalid("invalid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(((!host.is_empty()).then(|| host.to_string()), port))
}

async fn bind_listener(flag: &'static str, addr: &str) -> Result<TcpListener, ServerError> {
    let (host, port) = parse_listen_addr(flag, addr)?;
    let bind_err = |source| ServerError::Bind {
        addr: addr.to_string(),
        source,
    };
    match host {
        Some(host) => TcpListener::bind((host.as_str(), port))
            .await
            .map_err(bind_err),
        // All interfaces: the IPv6 wildcard is dual-stack on Linux; hosts without IPv6 fall
        // back to IPv4 only.
        None => match TcpListener::bind(("::", port)).await {
            Ok(l) => Ok(l),
            Err(_) => TcpListener::bind(("0.0.0.0", port)).await.map_err(bind_err),
        },
    }
}

/// Everything that can stop the server from starting. Display is one line, without causes.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bindAddr unset")]
    BindAddrUnset,
    #[error("either both of tlsCertificate and tlsPrivateKey must be set, or none")]
    TlsPairing,
    #[error("self-signed certificate requested, but also specified a TLS certificate")]
    SelfSignedWithCertificate,
    #[error("invalid --{flag}: {reason}")]
    InvalidFlag { flag: &'static str, reason: String },
    #[error("could not read {path}")]
    TlsRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file was read; what it holds is not usable (`reason` says what is wrong with it).
    #[error("could not read {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("could not generate a self-signed certificate")]
    SelfSigned(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("invalid TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("invalid TLS configuration: tlsClientCA")]
    ClientCa(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("could not listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// One changefeed request, body fully read (within `--maxRequestBytes`).
#[derive(Clone)]
pub struct Request {
    pub method: Method,
    /// The path as received, still percent-encoded.
    pub path: String,
    /// The query without its `access_token` parameter, so it can never be logged.
    pub query: Option<String>,
    /// The `access_token` query parameter, decoded.
    pub access_token: Option<String>,
    /// The client certificate of the connection (verified when `--tlsClientCA` is set).
    pub(crate) client_cert: Option<Arc<CertificateDer<'static>>>,
    pub(crate) headers: HeaderMap,
    pub body: Bytes,
}

/// Header values and the access token are left out: they carry credentials.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("client_cert", &self.client_cert.is_some())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The handler's answer; sent as one line of `text/plain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub(crate) status: StatusCode,
    pub(crate) body: String,
    pub(crate) retry_after: Option<Duration>,
}

impl Response {
    /// 200 `OK`.
    pub(crate) fn ok() -> Response {
        Response::text(StatusCode::OK, "OK")
    }

    pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After` header (whole seconds, rounded up).
    pub(crate) fn with_retry_after(mut self, after: Duration) -> Response {
        self.retry_after = Some(after);
        self
    }
}

/// What the server calls for the requests it does not answer itself.
pub trait Handler: Send + Sync + 'static {
    fn changefeed(&self, req: Request) -> BoxFuture<'static, Response>;
    /// Pings staging and target; Err(one-line reason) on failure. The liveness probe.
    fn health(&self) -> BoxFuture<'static, Result<(), String>>;
    /// Whether this instance should receive traffic (the readiness probe): by default the
    /// same as [`Handler::health`]; Err(one-line reason) when not.
    fn ready(&self) -> BoxFuture<'static, Result<(), String>> {
        self.health()
    }
    /// The `/_/status` report (JSON); Err(one-line reason) when it cannot be built.
    fn status(&self) -> BoxFuture<'static, Result<serde_json::Value, String>> {
        Box::pin(async { Ok(serde_json::json!({})) })
    }
}

/// Listeners bound and TLS built, not yet serving: the caller learns the ports (port 0 in
/// tests) before traffic starts.
pub struct Bound {
    main: TcpListener,
    main_addr: SocketAddr,
    metrics: Option<(TcpListener, SocketAddr)>,
    /// Swapped in place when SIGHUP reloads the certificate files.
    tls: Option<SharedAcceptor>,
    self_signed: Option<tls::SelfSigned>,
    cert_pem: Option<String>,
    args: ServerArgs,
}

type SharedAcceptor = Arc<std::sync::RwLock<TlsAcceptor>>;

/// Ends a background task with the future that owns it, however that future ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rebuilds TLS from the files on every SIGHUP; a failure keeps what is served.
async fn reload_tls_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    acceptor: SharedAcceptor,
    args: ServerArgs,
    keep: Option<tls::SelfSigned>,
) {
    while hangup.recv().await.is_some() {
        match build_tls(&args, keep.as_ref()) {
            Ok(Some((config, _))) => {
                *acceptor.write().unwrap_or_else(|e| e.into_inner()) = TlsAcceptor::from(config);
                info!("sighup: tls certificates reloaded");
            }
            Ok(None) => {}
            Err(e) => {
                warn!(error = %ErrorChain(&e), "sighup: tls reload failed; keeping the certificates served")
            }
        }
    }
}

/// The TLS configuration of the flags (None: cleartext) and the served chain's PEM. A
/// self-signed certificate is generated anew unless `keep` (the one served so far) is given.
fn build_tls(
    args: &ServerArgs,
    keep: Option<&tls::SelfSigned>,
) -> Result<Option<(Arc<rustls::ServerConfig>, String)>, ServerError> {
    let client_roots = match non_empty(&args.tls_client_ca) {
        Some(ca) => Some(tls::load_certs(ca)?.0),
        None => None,
    };
    match (
        non_empty(&args.tls_certificate),
        non_empty(&args.tls_private_key),
    ) {
        (Some(cert), Some(key)) => {
            let (certs, pem) = tls::load_certs(cert)?;
            let key = tls::load_key(key)?;
            Ok(Some((tls::server_config(certs, key, client_roots)?, pem)))
        }
        _ if args.tls_self_signed => {
            let generated;
            let s = match keep {
                Some(s) => s,
                None => {
                    generated = tls::self_signed_pem()?;
                    &generated
                }
            };
            let config = tls::server_config(s.certs.clone(), s.key.clone_key(), client_roots)?;
            Ok(Some((config, s.cert_pem.clone())))
        }
        _ => Ok(None),
    }
}

/// Validates the flags, builds TLS and binds the main (and metrics) listeners.
pub async fn bind(args: &ServerArgs) -> Result<Bound, ServerError> {
    args.validate()?;
    // Register the recorder so the http_* metrics recorded below are kept.
    crate::metrics::install();
    let self_signed = if args.tls_self_signed && non_empty(&args.tls_certificate).is_none() {
        Some(tls::self_signed_pem()?)
    } else {
        None
    };
    let (tls, cert_pem) = match build_tls(args, self_signed.as_ref())? {
        Some((config, pem)) => (Some(config), Some(pem)),
        None => (None, None),
    };
    let main = bind_listener("bindAddr", &args.bind_addr).await?;
    let main_addr = local_addr(&main, &args.bind_addr)?;
    let metrics = if args.metrics_addr.trim().is_empty() {
        None
    } else {
        let l = bind_listener("metricsAddr", &args.metrics_addr).await?;
        let a = local_addr(&l, &args.metrics_addr)?;
        Some((l, a))
    };
    Ok(Bound {
        main,
        main_addr,
        metrics,
        tls: tls.map(|c| Arc::new(std::sync::RwLock::new(TlsAcceptor::from(c)))),
        self_signed,
        cert_pem,
        args: args.clone(),
    })
}

fn local_addr(l: &TcpListener, addr: &str) -> Result<SocketAddr, ServerError> {
    l.local_addr().map_err(|source| ServerError::Bind {
        addr: addr.to_string(),
        source,
    })
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.main_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// PEM of the served certificate chain (generated or loaded), for clients to trust.
    pub fn certificate_pem(&self) -> Option<&str> {
        self.cert_pem.as_deref()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// within `--gracePeriod` and returns.
    pub async fn serve(
        self,
        handler: Arc<dyn Handler>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Bound {
            main,
            main_addr,
            metrics,
            tls,
            self_signed,
            args,
            ..
        } = self;
        // Only files can change; a generated certificate is kept, but the CA file may change.
        let reload = match &tls {
            Some(acceptor)
                if non_empty(&args.tls_certificate).is_some()
                    || non_empty(&args.tls_client_ca).is_some() =>
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::hangup()) {
                    Ok(hangup) => Some(AbortOnDrop(tokio::spawn(reload_tls_on_sighup(
                        hangup,
                        acceptor.clone(),
                        args.clone(),
                        self_signed,
                    )))),
                    Err(e) => {
                        warn!(error = %ErrorChain(&e), "cannot listen for SIGHUP; tls files are not reloaded");
                        None
                    }
                }
            }
            _ => None,
        };
        let grace = args.grace_period;
        // The shutdown deadline, once known, reaches every accept loop.
        let (stop_tx, stop_rx) = watch::channel::<Option<Instant>>(None);
        // Tells detached handler tasks to give up when the grace period is over.
        let (abort_tx, abort_rx) = watch::channel(false);
        // Each detached handler task holds a sender; recv() returns None once all are done.
        let (inflight_tx, mut inflight_rx) = mpsc::channel::<()>(1);
        let state = Arc::new(MainState {
            handler,
            metrics_addr: metrics.as_ref().map(|(_, a)| *a),
            response_timeout: args.http_response_timeout,
            max_request_bytes: args.max_request_bytes,
            budget: body::Budget::new(args.max_inflight_bytes),
            inflight: inflight_tx,
            abort: abort_rx,
        });

        info!(addr = %main_addr, tls = tls.is_some(), "listening");
        let main_loop = accept_loop(
            main,
            tls,
            Routes::Main(state.clone()),
            &args,
            stop_rx.clone(),
        );
        let metrics_loop = async {
            if let Some((listener, addr)) = metrics {
                info!(addr = %addr, "metrics listening");
                accept_loop(
                    listener,
                    None,
                    Routes::Metrics(state.clone()),
                    &args,
                    stop_rx,
                )
                .await;
            }
        };
        let trigger = async move {
            shutdown.await;
            info!(grace_period = %format_duration(grace), "shutting down");
            let _ = stop_tx.send(Some(Instant::now() + grace));
        };
        let (_, deadline, _) = tokio::join!(trigger, main_loop, metrics_loop);
        // The state holds an in-flight sender too: without dropping it the wait below would
        // always last the whole grace period.
        drop(state);

        // Connections are closed; wait for handler work whose client already left.
        if timeout_at(deadline, inflight_rx.recv()).await.is_err() {
            warn!("grace period elapsed, abandoning in-flight changefeed requests");
            let _ = abort_tx.send(true);
        }
        drop(reload);
        info!("server stopped");
        Ok(())
    }
}

struct MainState {
    handler: Arc<dyn Handler>,
    /// `--metricsAddr`, which alone serves the metrics when set.
    metrics_addr: Option<SocketAddr>,
    response_timeout: Duration,
    max_request_bytes: u64,
    /// `--maxInflightBytes`: every changefeed body holds a reservation of it.
    budget: body::Budget,
    inflight: mpsc::Sender<()>,
    abort: watch::Receiver<bool>,
}

#[derive(Clone)]
enum Routes {
    Main(Arc<MainState>),
    /// `--metricsAddr`: the diagnostics only.
    Metrics(Arc<MainState>),
}

type HttpResponse = hyper::Response<Full<Bytes>>;

/// Per-connection limits, from the flags.
#[derive(Clone, Debug)]
struct ConnLimits {
    idle: Option<Duration>,
    tcp_keepalive: Option<Duration>,
    max_connections: usize,
}

impl ConnLimits {
    fn new(args: &ServerArgs) -> ConnLimits {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        ConnLimits {
            idle: nonzero(args.http_idle_timeout),
            tcp_keepalive: nonzero(args.tcp_keepalive),
            max_connections: args.max_connections,
        }
    }
}

/// The connection builder: hyper's timeouts only run with a timer, so both protocols get one.
fn connection_builder(args: &ServerArgs) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(args.http_header_read_timeout);
    // Changefeed bodies reach megabytes; hyper's 1 MiB default windows would throttle several
    // of them sharing one HTTP/2 connection.
    let keepalive =
        (!args.http2_keepalive_interval.is_zero()).then_some(args.http2_keepalive_interval);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(keepalive)
        .keep_alive_timeout(args.http2_keepalive_timeout)
        .max_concurrent_streams(args.http2_max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(H2_MAX_FRAME);
    builder
}

/// Counts connections refused over `--maxConnections`, logging at most once per period.
struct Refusals {
    since_log: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn refused(&mut self, limit: usize) {
        self.since_log += 1;
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= REFUSED_LOG_PERIOD)
        {
            warn!(
                refused = self.since_log,
                max_connections = limit,
                "connection limit reached, closing new connections"
            );
            self.since_log = 0;
            self.logged = Some(Instant::now());
        }
    }
}

/// Accepts until the stop deadline arrives, then lets connections finish gracefully until that
/// deadline and aborts what is left. Returns the deadline.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<SharedAcceptor>,
    routes: Routes,
    args: &ServerArgs,
    mut stop: watch::Receiver<Option<Instant>>,
) -> Instant {
    let builder = connection_builder(args);
    let limits = ConnLimits::new(args);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = Refusals {
        since_log: 0,
        logged: None,
    };
    let mut conns = JoinSet::new();
    let deadline = loop {
        tokio::select! {
            // Copy the deadline out at once: the watch guard must not live in this future.
            stopped = async { stop.wait_for(Option::is_some).await.ok().and_then(|d| *d) } => {
                // None means the sender is gone without a deadline: stop now.
                break stopped.unwrap_or_else(Instant::now);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over the cap the socket is closed at once: holding it unserved would
                    // spend the file descriptors the database pool needs as well.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        drop(stream);
                        refusals.refused(limits.max_connections);
                        continue;
                    };
                    // The receiver is cloned before spawning so a shutdown signalled during
                    // the TLS handshake still reaches this connection.
                    let acceptor = tls
                        .as_ref()
                        .map(|a| a.read().unwrap_or_else(|e| e.into_inner()).clone());
                    conns.spawn(serve_connection(
                        stream,
                        peer,
                        acceptor,
                        routes.clone(),
                        builder.clone(),
                        limits.clone(),
                        stop.clone(),
                        slot,
                    ));
                }
                Err(e) => {
                    // Typically EMFILE; back off briefly instead of spinning.
                    warn!(error = %ErrorChain(&e), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    drop(listener);
    let drained = async { while conns.join_next().await.is_some() {} };
    if timeout_at(deadline, drained).await.is_err() {
        warn!(
            connections = conns.len(),
            "grace period elapsed, closing connections"
        );
    }
    conns.shutdown().await;
    deadline
}

/// Requests in flight on one connection and when the last one ended, for the idle timeout.
struct Activity {
    inflight: AtomicUsize,
    last: std::sync::Mutex<Instant>,
}

struct Busy(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once the connection has had no request in flight for `limit`; never without one.
async fn idle_for(activity: &Activity, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    loop {
        let due = activity.last() + limit;
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        } else if activity.inflight.load(Ordering::SeqCst) > 0 {
            // A long request is not idleness; look again once it could have ended.
            tokio::time::sleep(limit).await;
        } else {
            return;
        }
    }
}

/// True when a client speaks plain HTTP on the TLS port (a TLS record starts with 0x16, a
/// request line with an upper-case method); it has then been answered 400, as Go servers do.
async fn refused_plain_http(stream: &mut TcpStream) -> bool {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0].is_ascii_uppercase() => {
            let _ = stream.write_all(PLAIN_HTTP_ON_TLS).await;
            let _ = stream.shutdown().await;
            true
        }
        _ => false,
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    routes: Routes,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnLimits,
    stop: watch::Receiver<Option<Instant>>,
    _slot: OwnedSemaphorePermit,
) {
    // Small responses must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    if let Some(every) = limits.tcp_keepalive {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(every)
            .with_interval(every);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            debug!(peer = %peer, error = %ErrorChain(&e), "could not enable tcp keepalive");
        }
    }
    let result = match tls {
        Some(acceptor) => {
            let handshake = async {
                if refused_plain_http(&mut stream).await {
                    return None;
                }
                Some(acceptor.accept(stream).await)
            };
            match timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(None) => {
                    debug!(peer = %peer, "plain http on the tls port answered 400");
                    return;
                }
                Ok(Some(Ok(stream))) => {
                    // Verified by the handshake when --tlsClientCA asks for one.
                    let client_cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| Arc::new(c.clone().into_owned()));
                    drive(
                        TokioIo::new(stream),
                        &builder,
                        routes,
                        &limits,
                        stop,
                        client_cert,
                    )
                    .await
                }
                Ok(Some(Err(e))) => {
                    debug!(peer = %peer, error = %ErrorChain(&e), "tls handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(peer = %peer, "tls handshake timed out");
                    return;
                }
            }
        }
        None => drive(TokioIo::new(stream), &builder, routes, &limits, stop, None).await,
    };
    if let Err(e) = result {
        debug!(peer = %peer, error = %ErrorChain(&*e), "connection ended with an error");
    }
}

/// Serves one connection until it ends, closing it gracefully when it has been idle for
/// `--httpIdleTimeout` or the server stops (HTTP/2 GOAWAY, HTTP/1 after the current request).
async fn drive<I>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    routes: Routes,
    limits: &ConnLimits,
    mut stop: watch::Receiver<Option<Instant>>,
    client_cert: Option<Arc<CertificateDer<'static>>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        inflight: AtomicUsize::new(0),
        last: std::sync::Mutex::new(Instant::now()),
    });
    let counted = activity.clone();
    let service = service_fn(move |req| {
        let routes = routes.clone();
        let client_cert = client_cert.clone();
        let busy = counted.begin();
        async move {
            let resp = route(routes, req, client_cert).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = idle_for(&activity, limits.idle), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = async { stop.wait_for(Option::is_some).await.is_ok() }, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn route(
    routes: Routes,
    req: hyper::Request<Incoming>,
    client_cert: Option<Arc<CertificateDer<'static>>>,
) -> HttpResponse {
    // The probes answer the same on both listeners; the metrics stay off the main port when
    // `--metricsAddr` is set (it may be public), with a 404 naming the right one. `/_/…` is
    // never a changefeed path.
    let path = req.uri().path();
    let (state, main) = match &routes {
        Routes::Main(s) => (s.clone(), true),
        Routes::Metrics(s) => (s.clone(), false),
    };
    match path {
        "/_/varz" | "/metrics" | "/_/status" => {
            return match state.metrics_addr {
                Some(addr) if main => text_response(&Response::text(
                    StatusCode::NOT_FOUND,
                    format!("{path} is served on --metricsAddr {addr}"),
                )),
                _ if path == "/_/status" => status(&state).await,
                _ => metrics_response(),
            }
        }
        "/_/healthz" => return probe(&state, state.handler.health(), "health check").await,
        "/_/ready" => return probe(&state, state.handler.ready(), "readiness check").await,
        _ if path.starts_with("/_/") => return not_found(),
        _ => {}
    }
    match routes {
        Routes::Metrics(_) => not_found(),
        Routes::Main(state) => changefeed(state, req, client_cert).await,
    }
}

/// The handler's status report as JSON, or 503 with the reason.
async fn status(state: &MainState) -> HttpResponse {
    match timeout(state.response_timeout, state.handler.status()).await {
        Ok(Ok(v)) => {
            let mut r = hyper::Response::new(Full::new(Bytes::from(v.to_string())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Ok(Err(reason)) => text_response(
            &Response::text(StatusCode::SERVICE_UNAVAILABLE, reason)
                .with_retry_after(RETRY_AFTER_DEFAULT),
        ),
        Err(_) => text_response(
            &Response::text(StatusCode::SERVICE_UNAVAILABLE, "status timed out")
                .with_retry_after(RETRY_AFTER_DEFAULT),
        ),
    }
}

/// 200 `OK`, or 503 with the reason (or a timeout) and a `Retry-After`.
async fn probe(
    state: &MainState,
    check: BoxFuture<'static, Result<(), String>>,
    what: &str,
) -> HttpResponse {
    let resp = match timeout(state.response_timeout, check).await {
        Ok(Ok(())) => Response::ok(),
        Ok(Err(reason)) => Response::text(StatusCode::SERVICE_UNAVAILABLE, reason)
            .with_retry_after(RETRY_AFTER_DEFAULT),
        Err(_) => Response::text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{what} timed out after {}",
                format_duration(state.response_timeout)
            ),
        )
        .with_retry_after(RETRY_AFTER_DEFAULT),
    };
    text_response(&resp)
}

async fn changefeed(
    state: Arc<MainState>,
    req: hyper::Request<Incoming>,
    client_cert: Option<Arc<CertificateDer<'static>>>,
) -> HttpResponse {
    let start = std::time::Instant::now();
    // Changefeeds POST (webhook) or PUT (cloud-storage files over HTTP); a GET is a person or
    // a probe, not a batch.
    if !matches!(*req.method(), Method::POST | Method::PUT) {
        let text = format!("method {} not allowed; changefeeds use POST", req.method());
        let mut r = finish(start, Response::text(StatusCode::METHOD_NOT_ALLOWED, text));
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST, PUT"));
        return r;
    }
    // The deadline covers reading the body too, so a trickling client cannot hold a request
    // open past it.
    let deadline = Instant::now() + state.response_timeout;
    let (parts, body) = req.into_parts();
    let read = body::read(body, &parts.headers, state.max_request_bytes, &state.budget);
    let (body, admitted) = match timeout_at(deadline, read).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => return body_refused(start, &e),
        Err(_) => return finish(start, timed_out(state.response_timeout)),
    };
    metrics::histogram!(m::HTTP_PAYLOAD_IN).record(body.len() as f64);
    let (query, access_token) = crate::auth::token::take_access_token(parts.uri.query());
    let request = Request {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        access_token,
        client_cert,
        headers: parts.headers,
        body,
    };
    let work = state.handler.changefeed(request);
    let inflight = state.inflight.clone();
    let mut abort = state.abort.clone();
    let limit = state.response_timeout;
    // Detached: dropping this request future (client gone) leaves the task running.
    let task = tokio::spawn(async move {
        let _inflight = inflight;
        // The body's bytes stay reserved until the request's work is over, however it ends.
        let _admitted = admitted;
        let resp = tokio::select! {
            r = timeout_at(deadline, work) => r.unwrap_or_else(|_| timed_out(limit)),
            _ = abort.wait_for(|a| *a) => Response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "server shutting down",
            )
            .with_retry_after(RETRY_AFTER_DEFAULT),
        };
        finish(start, resp)
    });
    match task.await {
        Ok(resp) => resp,
        Err(e) => {
            error!(error = %ErrorChain(&e), "changefeed handler failed");
            finish(
                start,
                Response::text(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            )
        }
    }
}

fn timed_out(limit: Duration) -> Response {
    Response::text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("request timed out after {}", format_duration(limit)),
    )
    .with_retry_after(RETRY_AFTER_DEFAULT)
}

/// Records the changefeed metrics and renders the response.
fn finish(start: std::time::Instant, resp: Response) -> HttpResponse {
    metrics::counter!(m::HTTP_STATUS_CODES, m::LABEL_CODE => resp.status.as_str().to_string())
        .increment(1);
    metrics::histogram!(m::HTTP_LATENCY).record(start.elapsed().as_secs_f64());
    text_response(&resp)
}

/// The answer to a body that was not accepted: 413, 415 (naming the codings we read), 503 with
/// `Retry-After` when the budget is spent, or 400.
fn body_refused(start: std::time::Instant, e: &body::BodyError) -> HttpResponse {
    let mut resp = Response::text(e.status(), e.to_string());
    if matches!(e, body::BodyError::Busy { .. }) {
        debug!("request refused: body bytes in flight at --maxInflightBytes");
        resp = resp.with_retry_after(RETRY_AFTER_DEFAULT);
    }
    let mut r = finish(start, resp);
    if matches!(e, body::BodyError::UnsupportedEncoding(_)) {
        r.headers_mut()
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip, zstd"));
    }
    r
}

fn not_found() -> HttpResponse {
    text_response(&Response::text(StatusCode::NOT_FOUND, "404 page not found"))
}

fn metrics_response() -> HttpResponse {
    let mut r = hyper::Response::new(Full::new(Bytes::from(crate::metrics::render())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
    r.headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// One line of text: inner line breaks become spaces, and it ends with `\n`.
fn text_response(resp: &Response) -> HttpResponse {
    let mut line = resp.body.trim_end().replace(['\r', '\n'], " ");
    line.push('\n');
    let mut r = hyper::Response::new(Full::new(Bytes::from(line)));
    *r.status_mut() = resp.status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Some(after) = resp.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use http_body_util::BodyExt;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn parse(args: &[&str]) -> Result<ServerArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("cdc-sink").chain(args.iter().copied()))
            .map(|c| c.server)
    }

    /// Callers spawn `serve`, so its future must be `Send` (checked at compile time).
    #[allow(dead_code)]
    fn serve_future_is_send(bound: Bound, handler: Arc<dyn Handler>) {
        fn assert_send<T: Send>(_: &T) {}
        assert_send(&bound.serve(handler, async {}));
    }

    #[test]
    fn defaults_match_the_reference() {
        let a = parse(&[]).expect("parse");
        let d = ServerArgs::default();
        assert_eq!(a.bind_addr, ":26258");
        assert_eq!(a.metrics_addr, "");
        assert!(!a.tls_self_signed);
        assert_eq!(a.http_response_timeout, Duration::from_secs(120));
        assert_eq!(a.max_request_bytes, 32 << 20);
        assert_eq!(a.max_inflight_bytes, 96 << 20);
        assert_eq!(a.max_inflight_bytes, d.max_inflight_bytes);
        assert_eq!(a.grace_period, Duration::from_secs(30));
        assert_eq!(a.http_header_read_timeout, Duration::from_secs(30));
        assert_eq!(a.http_idle_timeout, Duration::from_secs(120));
        assert_eq!(a.http2_keepalive_interval, Duration::from_secs(20));
        assert_eq!(a.http2_keepalive_timeout, Duration::from_secs(20));
        assert_eq!(a.http2_max_concurrent_streams, 32);
        assert_eq!(a.max_connections, 4096);
        assert_eq!(a.tcp_keepalive, Duration::from_secs(60));
        assert_eq!(
            (
                a.http_header_read_timeout,
                a.http_idle_timeout,
                a.http2_keepalive_interval,
                a.http2_keepalive_timeout,
                a.http2_max_concurrent_streams,
                a.max_connections,
                a.tcp_keepalive
            ),
            (
                d.http_header_read_timeout,
                d.http_idle_timeout,
                d.http2_keepalive_interval,
                d.http2_keepalive_timeout,
                d.http2_max_concurrent_streams,
                d.max_connections,
                d.tcp_keepalive
            )
        );
        assert_eq!(
            (
                a.bind_addr,
                a.http_response_timeout,
                a.max_request_bytes,
                a.grace_period
            ),
            (
                d.bind_addr,
                d.http_response_timeout,
                d.max_request_bytes,
                d.grace_period
            )
        );
    }

    #[test]
    fn camel_case_flags_parse() {
        let a = parse(&[
            "--bindAddr",
            "127.0.0.1:1",
            "--metricsAddr=:2",
            "--tlsSelfSigned",
            "--httpResponseTimeout",
            "1m30s",
            "--maxRequestBytes",
            "1MiB",
            "--maxInflightBytes=8MiB",
            "--gracePeriod=5s",
        ])
        .expect("parse");
        assert_eq!(a.max_inflight_bytes, 8 << 20);
        assert_eq!(a.bind_addr, "127.0.0.1:1");
        assert_eq!(a.metrics_addr, ":2");
        assert!(a.tls_self_signed);
        assert_eq!(a.http_response_timeout, Duration::from_secs(90));
        assert_eq!(a.max_request_bytes, 1 << 20);
        assert_eq!(a.grace_period, Duration::from_secs(5));
        assert!(
            !parse(&["--tlsSelfSigned=false"])
                .expect("parse")
                .tls_self_signed
        );
        assert!(
            parse(&["--tlsSelfSigned=true"])
                .expect("parse")
                .tls_self_signed
        );
        assert!(parse(&["--httpResponseTimeout", "soon"]).is_err());
        let a = parse(&[
            "--httpHeaderReadTimeout=5s",
            "--httpIdleTimeout=0s",
            "--http2KeepaliveInterval=0s",
            "--http2KeepaliveTimeout=3s",
            "--http2MaxConcurrentStreams=8",
            "--maxConnections=100",
            "--tcpKeepalive=0s",
        ])
        .expect("parse");
        assert_eq!(a.http_header_read_timeout, Duration::from_secs(5));
        assert!(a.http_idle_timeout.is_zero() && a.http2_keepalive_interval.is_zero());
        assert_eq!(a.http2_keepalive_timeout, Duration::from_secs(3));
        assert_eq!(
            (a.http2_max_concurrent_streams, a.max_connections),
            (8, 100)
        );
        assert!(a.tcp_keepalive.is_zero());
        a.validate()
            .expect("zero idle, ping and keepalive mean off");
    }

    #[test]
    fn limits_that_cannot_be_off_must_be_positive() {
        for (flag, args) in [
            (
                "httpHeaderReadTimeout",
                ServerArgs {
                    http_header_read_timeout: Duration::ZERO,
                    ..ServerArgs::default()
                },
            ),
            (
                "http2MaxConcurrentStreams",
                ServerArgs {
                    http2_max_concurrent_streams: 0,
                    ..ServerArgs::default()
                },
            ),
            (
                "maxConnections",
                ServerArgs {
                    max_connections: 0,
                    ..ServerArgs::default()
                },
            ),
        ] {
            let e = args.validate().expect_err("invalid").to_string();
            assert_eq!(e, format!("invalid --{flag}: must be greater than zero"));
        }
    }

    #[test]
    fn validate_reports_the_reference_messages() {
        let ok = ServerArgs::default();
        ok.validate().expect("defaults are valid");
        let e = |a: ServerArgs| a.validate().expect_err("invalid").to_string();
        assert_eq!(
            e(ServerArgs {
                bind_addr: String::new(),
                ..ServerArgs::default()
            }),
            "bindAddr unset"
        );
        assert_eq!(
            e(ServerArgs {
                tls_certificate: Some("c.pem".into()),
                ..ServerArgs::default()
            }),
            "either both of tlsCertificate and tlsPrivateKey must be set, or none"
        );
        assert_eq!(
            e(ServerArgs {
                tls_private_key: Some("k.pem".into()),
                ..ServerArgs::default()
            }),
            "either both of tlsCertificate and tlsPrivateKey must be set, or none"
        );
        assert_eq!(
            e(ServerArgs {
                tls_certificate: Some("c.pem".into()),
                tls_private_key: Some("k.pem".into()),
                tls_self_signed: true,
                ..ServerArgs::default()
            }),
            "self-signed certificate requested, but also specified a TLS certificate"
        );
        // Empty paths (an empty environment variable) count as unset.
        ServerArgs {
            tls_certificate: Some(PathBuf::new()),
            tls_self_signed: true,
            ..ServerArgs::default()
        }
        .validate()
        .expect("empty path is unset");
        assert!(e(ServerArgs {
            bind_addr: "nonsense".into(),
            ..ServerArgs::default()
        })
        .contains("bindAddr"));
        assert!(e(ServerArgs {
            tls_client_ca: Some("ca.pem".into()),
            ..ServerArgs::default()
        })
        .contains("tlsClientCA"));
        ServerArgs {
            tls_client_ca: Some("ca.pem".into()),
            tls_self_signed: true,
            ..ServerArgs::default()
        }
        .validate()
        .expect("client certificates over the self-signed certificate");
        assert!(e(ServerArgs {
            max_request_bytes: 0,
            ..ServerArgs::default()
        })
        .contains("maxRequestBytes"));
        assert_eq!(
            e(ServerArgs {
                max_request_bytes: 2048,
                max_inflight_bytes: 1024,
                ..ServerArgs::default()
            }),
            "invalid --maxInflightBytes: must be at least --maxRequestBytes (2048 bytes)"
        );
    }

    #[test]
    fn listen_addresses_split_host_and_port() {
        assert_eq!(parse_listen_addr("x", ":26258").unwrap(), (None, 26258));
        assert_eq!(
            parse_listen_addr("x", "127.0.0.1:0").unwrap(),
            (Some("127.0.0.1".into()), 0)
        );
        assert_eq!(
            parse_listen_addr("x", "[::1]:80").unwrap(),
            (Some("::1".into()), 80)
        );
        assert!(parse_listen_addr("x", "host:port").is_err());
        assert!(parse_listen_addr("x", "99999").is_err());
    }

    #[test]
    fn text_responses_are_one_line_with_the_standard_headers() {
        let r = text_response(
            &Response::text(StatusCode::SERVICE_UNAVAILABLE, "a\nb\r\n")
                .with_retry_after(Duration::from_millis(1500)),
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[CONTENT_TYPE], TEXT_PLAIN);
        assert_eq!(r.headers()[X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        let body = futures::executor::block_on(r.into_body().collect())
            .expect("full body")
            .to_bytes();
        assert_eq!(&body[..], b"a b\n");
    }
}
