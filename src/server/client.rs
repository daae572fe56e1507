//! A small HTTP client for our own server, shared by the tests, `cdc-sink bench` and the
//! changefeed emulator. It speaks HTTP/2 (ALPN `h2` over TLS, prior knowledge in cleartext)
//! over one multiplexed connection, or HTTP/1.1 with a pool of keep-alive connections, and
//! reconnects after a connection error.

use crate::error::ErrorChain;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tracing::debug;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Our server's answers are one line or a metrics page; anything bigger is a mistake.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

type Body = Full<Bytes>;

#[derive(Clone)]
pub struct ClientOptions {
    /// Accept any server certificate (CockroachDB's `insecure_tls_skip_verify`).
    pub insecure_skip_verify: bool,
    /// PEM certificate(s) to trust, e.g. the server's self-signed certificate.
    pub ca_cert_pem: Option<Vec<u8>>,
    /// HTTP/2 (default); false = HTTP/1.1.
    pub http2: bool,
    /// Sent with every request, e.g. `("authorization", "Bearer …")`.
    pub headers: Vec<(String, String)>,
    /// A client certificate chain and its key, both PEM (CockroachDB's `client_cert`/`client_key`).
    pub client_cert_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_skip_verify: false,
            ca_cert_pem: None,
            http2: true,
            headers: Vec::new(),
            client_cert_pem: None,
        }
    }
}

/// Header values are left out: they usually carry a bearer token.
impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ClientOptions")
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("ca_cert_pem", &self.ca_cert_pem.as_ref().map(|p| p.len()))
            .field("http2", &self.http2)
            .field("headers", &names)
            .field("client_cert", &self.client_cert_pem.is_some())
            .finish()
    }
}

/// The HTTP version of the most recent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// A response with its headers, for callers that need more than status and body.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid header {name:?}")]
    InvalidHeader { name: String },
    #[error("invalid ca certificate")]
    CaCert(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("https needs ca_cert_pem or insecure_skip_verify")]
    NoTrust,
    #[error("invalid TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("invalid client certificate")]
    ClientCert(#[source] rustls_pki_types::pem::Error),
    #[error("invalid client key")]
    ClientKey(#[source] rustls_pki_types::pem::Error),
    #[error("could not connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http request failed")]
    Http(#[source] hyper::Error),
    #[error("could not read the response body")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    scheme: Scheme,
    authority: Authority,
    /// Host without IPv6 brackets, for connecting and SNI.
    host: String,
    port: u16,
    /// Path prefix of the base URL, without a trailing slash.
    base_path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    http2: bool,
    /// Set when the server answered ALPN with HTTP/1.1 only.
    h2_refused: AtomicBool,
    headers: HeaderMap,
    /// The shared HTTP/2 connection; the async lock makes concurrent callers wait for one
    /// reconnect instead of each dialling.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
    /// Idle HTTP/1.1 connections.
    h1_idle: Mutex<Vec<http1::SendRequest<Body>>>,
    protocol: Mutex<Option<Protocol>>,
}

enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Client {
    /// `base_url` is `https://host:port` or `http://host:port`, optionally with a path prefix.
    pub fn new(base_url: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = base_url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| invalid("missing scheme"))?;
        let https = if scheme == Scheme::HTTPS {
            true
        } else if scheme == Scheme::HTTP {
            false
        } else {
            return Err(invalid("scheme must be http or https"));
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid("missing host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_string();

        let mut headers = HeaderMap::new();
        for (name, value) in &opts.headers {
            let bad = || ClientError::InvalidHeader { name: name.clone() };
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let v = HeaderValue::from_str(value).map_err(|_| bad())?;
            headers.append(n, v);
        }

        let tls = if https {
            let server_name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("host is not a valid TLS server name"))?;
            Some((TlsConnector::from(client_config(&opts)?), server_name))
        } else {
            None
        };
        Ok(Client {
            inner: Arc::new(Inner {
                scheme,
                authority,
                host,
                port,
                base_path,
                tls,
                http2: opts.http2,
                h2_refused: AtomicBool::new(false),
                headers,
                h2: tokio::sync::Mutex::new(None),
                h1_idle: Mutex::new(Vec::new()),
                protocol: Mutex::new(None),
            }),
        })
    }

    /// The protocol of the most recently opened connection (None before the first request).
    pub fn protocol(&self) -> Option<Protocol> {
        self.inner.protocol.lock().map(|p| *p).unwrap_or(None)
    }

    pub async fn post(
        &self,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<(StatusCode, String), ClientError> {
        let r = self.request(Method::POST, path_and_query, body).await?;
        Ok((r.status, r.body))
    }

    pub async fn get(&self, path_and_query: &str) -> Result<(StatusCode, String), ClientError> {
        let r = self
            .request(Method::GET, path_and_query, Bytes::new())
            .await?;
        Ok((r.status, r.body))
    }

    /// Sends one request and reads the whole response. A request that never left (the pooled
    /// connection had just closed) is retried once on a fresh connection.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<ClientResponse, ClientError> {
        let mut req = self.build(method, path_and_query, body)?;
        let mut retried = false;
        loop {
            let result = match self.acquire().await? {
                Conn::H2(mut sender) => {
                    let r = sender.try_send_request(req).await;
                    match r {
                        Ok(resp) => return read_response(resp).await,
                        Err(e) => e,
                    }
                }
                Conn::H1(mut sender) => {
                    // HTTP/1.1 wants origin-form plus a Host header.
                    let origin = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str().to_string())
                        .unwrap_or_else(|| "/".into());
                    if let Ok(origin) = origin.parse() {
                        *req.uri_mut() = origin;
                    }
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let out = read_response(resp).await;
                            // Reusable once the response body was read to the end.
                            if out.is_ok() && !sender.is_closed() {
                                if let Ok(mut idle) = self.inner.h1_idle.lock() {
                                    idle.push(sender);
                                }
                            }
                            return out;
                        }
                        Err(e) => e,
                    }
                }
            };
            let mut err = result;
            match err.take_message() {
                Some(mut unsent) if !retried => {
                    debug!(error = %ErrorChain(err.error()), "connection closed before sending; reconnecting");
                    retried = true;
                    // Restore the absolute form for a possible HTTP/2 retry.
                    if let Ok(abs) = self.absolute(
                        unsent
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str())
                            .unwrap_or("/"),
                    ) {
                        *unsent.uri_mut() = abs;
                    }
                    req = unsent;
                }
                _ => return Err(ClientError::Http(err.into_error())),
            }
        }
    }

    fn absolute(&self, path_and_query: &str) -> Result<Uri, ClientError> {
        Uri::builder()
            .scheme(self.inner.scheme.clone())
            .authority(self.inner.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ClientError::InvalidUrl {
                url: path_and_query.to_string(),
                reason: e.to_string(),
            })
    }

    fn build(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<http::Request<Body>, ClientError> {
        let sep = if path_and_query.starts_with('/') {
            ""
        } else {
            "/"
        };
        let full = format!("{}{sep}{path_and_query}", self.inner.base_path);
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = self.absolute(&full)?;
        *req.headers_mut() = self.inner.headers.clone();
        // HTTP/2 takes the authority from the URI; HTTP/1.1 needs the header.
        if let Ok(host) = HeaderValue::from_str(self.inner.authority.as_str()) {
            req.headers_mut().insert(HOST, host);
        }
        Ok(req)
    }

    /// A connection ready for one request: the shared HTTP/2 one, an idle HTTP/1.1 one, or a
    /// new one.
    async fn acquire(&self) -> Result<Conn, ClientError> {
        let inner = &self.inner;
        if inner.http2 && !inner.h2_refused.load(Ordering::Relaxed) {
            let mut shared = inner.h2.lock().await;
            if let Some(s) = shared.as_ref() {
                if !s.is_closed() {
                    return Ok(Conn::H2(s.clone()));
                }
            }
            *shared = None;
            return match self.connect().await? {
                Conn::H2(s) => {
                    *shared = Some(s.clone());
                    Ok(Conn::H2(s))
                }
                h1 => {
                    inner.h2_refused.store(true, Ordering::Relaxed);
                    Ok(h1)
                }
            };
        }
        loop {
            let idle = inner.h1_idle.lock().ok().and_then(|mut v| v.pop());
            match idle {
                Some(s) if !s.is_closed() && s.is_ready() => return Ok(Conn::H1(s)),
                Some(_) => continue,
                None => break,
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let inner = &self.inner;
        let addr = format!("{}:{}", inner.host, inner.port);
        let connect_err = |source| ClientError::Connect {
            addr: addr.clone(),
            source,
        };
        let tcp = timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((inner.host.as_str(), inner.port)),
        )
        .await
        .map_err(|_| connect_err(timed_out()))?
        .map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        match &inner.tls {
            Some((connector, name)) => {
                let handshake_err = |source| ClientError::Handshake {
                    addr: addr.clone(),
                    source,
                };
                let stream = timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| handshake_err(timed_out()))?
                    .map_err(handshake_err)?;
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                self.handshake(TokioIo::new(stream), h2).await
            }
            None => self.handshake(TokioIo::new(tcp), inner.http2).await,
        }
    }

    async fn handshake<I>(&self, io: I, h2: bool) -> Result<Conn, ClientError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let fail = ClientError::Http;
        let conn = if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                // Large bodies: let more of one request be buffered while the window opens.
                .max_send_buf_size(4 << 20)
                .handshake(io)
                .await
                .map_err(fail)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %ErrorChain(&e), "http/2 connection ended");
                }
            });
            Conn::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(fail)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(error = %ErrorChain(&e), "http/1.1 connection ended");
                }
            });
            Conn::H1(sender)
        };
        if let Ok(mut p) = self.inner.protocol.lock() {
            *p = Some(if h2 { Protocol::Http2 } else { Protocol::Http1 });
        }
        Ok(conn)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("scheme", &self.inner.scheme)
            .field("authority", &self.inner.authority)
            .field("http2", &self.inner.http2)
            .finish()
    }
}

async fn read_response(
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<ClientResponse, ClientError> {
    let (parts, body) = resp.into_parts();
    let bytes = Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(ClientError::Body)?
        .to_bytes();
    Ok(ClientResponse {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// The cause of a connect or handshake that took longer than [`CONNECT_TIMEOUT`].
fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
}

fn client_config(opts: &ClientOptions) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = super::tls::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ClientError::Tls)?;
    let wants_cert = if opts.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        let pem = opts.ca_cert_pem.as_deref().ok_or(ClientError::NoTrust)?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ClientError::CaCert(e.into()))?;
            roots.add(cert).map_err(|e| ClientError::CaCert(e.into()))?;
        }
        if roots.is_empty() {
            return Err(ClientError::CaCert("no CERTIFICATE block found".into()));
        }
        builder.with_root_certificates(roots)
    };
    let mut config = match &opts.client_cert_pem {
        None => wants_cert.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(ClientError::ClientCert)?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key)
                .map_err(ClientError::ClientKey)?;
            wants_cert
                .with_client_auth_cert(certs, key)
                .map_err(ClientError::Tls)?
        }
    };
    config.alpn_protocols = if opts.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// Trusts any certificate but still checks the handshake signatures, so the peer at least
/// holds the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_options_are_checked() {
        assert!(matches!(
            Client::new("ftp://x", ClientOptions::default()),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Client::new("https://localhost:1", ClientOptions::default()),
            Err(ClientError::NoTrust)
        ));
        assert!(matches!(
            Client::new(
                "https://localhost:1",
                ClientOptions {
                    ca_cert_pem: Some(b"junk".to_vec()),
                    ..ClientOptions::default()
                }
            ),
            Err(ClientError::CaCert(_))
        ));
        assert!(matches!(
            Client::new(
                "http://localhost:1",
                ClientOptions {
                    headers: vec![("bad header".into(), "x".into())],
                    ..ClientOptions::default()
                }
            ),
            Err(ClientError::InvalidHeader { .. })
        ));
        let c = Client::new("http://[::1]:8080/prefix/", ClientOptions::default()).expect("ok");
        assert_eq!(c.inner.host, "::1");
        assert_eq!(c.inner.port, 8080);
        let req = c.build(Method::GET, "a?b=c", Bytes::new()).expect("build");
        assert_eq!(req.uri().to_string(), "http://[::1]:8080/prefix/a?b=c");
        assert!(c.protocol().is_none());
    }
}
