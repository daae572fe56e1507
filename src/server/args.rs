//! The listener, TLS and request-limit flags of `cdc-sink start`, and binding their addresses.

use super::*;

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
pub(super) fn non_empty(p: &Option<PathBuf>) -> Option<&Path> {
    p.as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// Splits `host:port`; an empty host (":26258") means every interface.
pub(super) fn parse_listen_addr(
    flag: &'static str,
    addr: &str,
) -> Result<(Option<String>, u16), ServerError> {
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

pub(super) async fn bind_listener(
    flag: &'static str,
    addr: &str,
) -> Result<TcpListener, ServerError> {
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
