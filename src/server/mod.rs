//! The HTTP front door: one listener (TLS with ALPN `h2`/`http/1.1`, or cleartext HTTP/1.1 +
//! h2c) that routes the diagnostics (`/_/healthz`, `/_/ready`, `/_/varz`, `/metrics`) itself
//! and hands every other request, body fully read, to a [`Handler`] (the changefeed source).
//! An optional second, plain listener (`--metricsAddr`) serves the same diagnostics and nothing
//! else. Shutdown is graceful and bounded by `--gracePeriod`.
//!
//! Changefeed requests run detached from their connection: a client that hangs up does not
//! abort staging half-way, only `--httpResponseTimeout` (or the end of the grace period) does.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | binding the listeners (with TLS reload on SIGHUP) and the serve loop with its graceful stop |
//! | `args.rs` | the flags and listen addresses |
//! | `connections.rs` | accepting, limiting and serving connections (HTTP/1.1, HTTP/2, h2c) |
//! | `routes.rs` | the diagnostic routes and the changefeed hand-off |
//! | `body.rs` | reading request bodies under the in-flight byte budget, with decompression |
//! | `tls.rs` | certificates: loading, self-signed, client certificates |
//! | `client.rs` | an HTTP/1.1 + HTTP/2 client (the changefeed emulator, bench, tests) |

mod args;
pub(crate) mod body;
pub mod client;
mod connections;
mod routes;
pub(crate) mod tls;

pub use args::ServerArgs;
use args::*;
use connections::*;
use routes::*;

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
