//! The HTTP front door: protocols, TLS, routes, limits, timeouts and shutdown.

use crate::support::eventually;
use crate::support::http::{args, TestServer};
use bytes::Bytes;
use cdc_sink::server::{self, Client, ClientError, ClientOptions, Protocol, ServerArgs};
use http::{Method, StatusCode};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(10);

fn tls_args() -> ServerArgs {
    ServerArgs {
        tls_self_signed: true,
        ..args()
    }
}

#[tokio::test]
async fn http2_over_tls_with_the_self_signed_certificate() {
    let srv = TestServer::start(tls_args()).await;
    let client = srv.client(true);
    let body = Bytes::from_static(br#"{"payload":[],"length":0}"#);
    let resp = client
        .request(Method::POST, "/db/public?x=1", body.clone())
        .await
        .expect("post");
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body, "OK\n");
    assert_eq!(resp.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(resp.headers["x-content-type-options"], "nosniff");
    assert_eq!(client.protocol(), Some(Protocol::Http2));
    let seen = srv.handler.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].path, "/db/public");
    assert_eq!(seen[0].query.as_deref(), Some("x=1"));
    assert_eq!(seen[0].body, body);
    srv.shutdown().await;
}

#[tokio::test]
async fn http1_over_tls() {
    let srv = TestServer::start(tls_args()).await;
    let client = srv.client(false);
    for i in 0..3 {
        let (status, text) = client
            .post("/db/public", Bytes::from(format!("body {i}")))
            .await
            .expect("post");
        assert_eq!((status, text.as_str()), (StatusCode::OK, "OK\n"));
    }
    assert_eq!(client.protocol(), Some(Protocol::Http1));
    assert_eq!(srv.handler.requests()[2].body, Bytes::from("body 2"));
    srv.shutdown().await;
}

#[tokio::test]
async fn cleartext_http1_and_h2c_share_one_port() {
    let srv = TestServer::start(args()).await;
    for (http2, want) in [(false, Protocol::Http1), (true, Protocol::Http2)] {
        let client = srv.client(http2);
        let (status, _) = client
            .post("/db/public", Bytes::from_static(b"{}"))
            .await
            .expect("post");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(client.protocol(), Some(want));
    }
    assert_eq!(srv.handler.requests().len(), 2);
    srv.shutdown().await;
}

#[tokio::test]
async fn certificate_and_key_files_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = server::self_signed_pem().expect("generate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &generated.cert_pem).expect("write cert");
    std::fs::write(&key, &generated.key_pem).expect("write key");
    let srv = TestServer::start(ServerArgs {
        tls_certificate: Some(cert),
        tls_private_key: Some(key),
        ..args()
    })
    .await;
    assert_eq!(srv.cert_pem.as_deref(), Some(generated.cert_pem.as_str()));

    let trusting = srv.client(true);
    let (status, _) = trusting.get("/_/healthz").await.expect("get");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(trusting.protocol(), Some(Protocol::Http2));

    let insecure = Client::new(
        &srv.url(),
        ClientOptions {
            insecure_skip_verify: true,
            ..ClientOptions::default()
        },
    )
    .expect("client");
    assert_eq!(
        insecure.get("/_/healthz").await.expect("get").0,
        StatusCode::OK
    );

    let other = server::self_signed_pem().expect("generate");
    let stranger = Client::new(
        &srv.url(),
        ClientOptions {
            ca_cert_pem: Some(other.cert_pem.into_bytes()),
            ..ClientOptions::default()
        },
    )
    .expect("client");
    let err = stranger.get("/_/healthz").await.expect_err("untrusted");
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    srv.shutdown().await;
}

#[tokio::test]
async fn tls_argument_errors_stop_the_start() {
    let msg = |a: ServerArgs| async move {
        match server::bind(&a).await {
            Ok(_) => panic!("bind should fail for {a:?}"),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(
        msg(ServerArgs {
            tls_certificate: Some("cert.pem".into()),
            ..args()
        })
        .await,
        "either both of tlsCertificate and tlsPrivateKey must be set, or none"
    );
    assert_eq!(
        msg(ServerArgs {
            tls_certificate: Some("cert.pem".into()),
            tls_private_key: Some("key.pem".into()),
            tls_self_signed: true,
            ..args()
        })
        .await,
        "self-signed certificate requested, but also specified a TLS certificate"
    );
    assert_eq!(
        msg(ServerArgs {
            bind_addr: String::new(),
            ..args()
        })
        .await,
        "bindAddr unset"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing-cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&key, server::self_signed_pem().expect("gen").key_pem).expect("write");
    let e = msg(ServerArgs {
        tls_certificate: Some(missing),
        tls_private_key: Some(key.clone()),
        ..args()
    })
    .await;
    assert!(e.contains("missing-cert.pem"), "{e}");
    // A key file where the certificate should be.
    let e = msg(ServerArgs {
        tls_certificate: Some(key.clone()),
        tls_private_key: Some(key),
        ..args()
    })
    .await;
    assert!(e.contains("no CERTIFICATE"), "{e}");
}

#[tokio::test]
async fn oversized_body_is_refused_with_413() {
    let srv = TestServer::start(ServerArgs {
        max_request_bytes: 1024,
        ..tls_args()
    })
    .await;
    let h2 = srv.client(true);
    let (status, text) = h2
        .post("/db/public", Bytes::from(vec![b'x'; 64 * 1024]))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(text.contains("larger than 1024 bytes"), "{text}");
    assert!(text.ends_with('\n') && text.lines().count() == 1);
    let (status, _) = h2
        .post("/db/public", Bytes::from(vec![b'x'; 1024]))
        .await
        .expect("post at the limit");
    assert_eq!(status, StatusCode::OK);

    let h1 = srv.client(false);
    let (status, _) = h1
        .post("/db/public", Bytes::from(vec![b'x'; 2048]))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Only the request within the limit reached the handler.
    assert_eq!(srv.handler.requests().len(), 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn handler_timeout_answers_503_with_retry_after() {
    let srv = TestServer::start(ServerArgs {
        http_response_timeout: Duration::from_millis(200),
        ..args()
    })
    .await;
    let resp = srv
        .client(true)
        .request(Method::POST, "/db/public?delay_ms=10000", Bytes::new())
        .await
        .expect("post");
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.body.contains("timed out after 200ms"), "{}", resp.body);
    assert_eq!(resp.headers["retry-after"], "1");
    srv.shutdown().await;
}

#[tokio::test]
async fn healthz_is_200_or_503_with_the_reason() {
    let srv = TestServer::start(tls_args()).await;
    let client = srv.client(true);
    assert_eq!(
        client.get("/_/healthz").await.expect("get"),
        (StatusCode::OK, "OK\n".to_string())
    );
    srv.handler
        .set_health(Some("health check failed for target"));
    assert_eq!(
        client.get("/_/healthz").await.expect("get"),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "health check failed for target\n".to_string()
        )
    );
    // Without its own readiness, a handler is ready when healthy.
    assert_eq!(
        client.get("/_/ready").await.expect("get").0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(srv.handler.requests().is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn varz_and_metrics_expose_the_http_metrics() {
    let srv = TestServer::start(args()).await;
    let client = srv.client(true);
    client
        .post("/db/public", Bytes::from_static(b"{}"))
        .await
        .expect("post");
    for path in ["/_/varz", "/metrics"] {
        let resp = client
            .request(Method::GET, path, Bytes::new())
            .await
            .expect("get");
        assert_eq!(resp.status, StatusCode::OK);
        assert!(
            resp.headers["content-type"]
                .to_str()
                .unwrap_or_default()
                .starts_with("text/plain; version=0.0.4"),
            "{:?}",
            resp.headers
        );
        assert!(resp.body.contains("http_status_codes_total"), "{path}");
        assert!(resp.body.contains("http_latency_seconds"), "{path}");
        assert!(resp.body.contains("http_payload_in_bytes_total"), "{path}");
    }
    // Diagnostics never reach the changefeed handler.
    assert_eq!(srv.handler.requests().len(), 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn metrics_addr_serves_the_same_probes_and_keeps_the_metrics_off_the_main_port() {
    let srv = TestServer::start(ServerArgs {
        metrics_addr: "127.0.0.1:0".into(),
        ..tls_args()
    })
    .await;
    let metrics_addr = srv.metrics_addr.expect("metrics addr");
    let main = srv.client(true);
    main.post("/db/public", Bytes::from_static(b"{}"))
        .await
        .expect("post");
    srv.handler
        .set_health(Some("health check failed for staging"));
    let down = (
        StatusCode::SERVICE_UNAVAILABLE,
        "health check failed for staging\n".to_string(),
    );

    for http2 in [false, true] {
        let metrics = Client::new(
            &format!("http://{metrics_addr}"),
            ClientOptions {
                http2,
                ..ClientOptions::default()
            },
        )
        .expect("client");
        let (status, text) = metrics.get("/_/varz").await.expect("varz");
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("http_status_codes_total"));
        assert_eq!(
            metrics.get("/metrics").await.expect("metrics").0,
            StatusCode::OK
        );
        // The probes ask the handler here too.
        assert_eq!(metrics.get("/_/healthz").await.expect("healthz"), down);
        assert_eq!(metrics.get("/_/ready").await.expect("ready"), down);
        assert_eq!(
            metrics.get("/db/public").await.expect("other").0,
            StatusCode::NOT_FOUND
        );
    }

    assert_eq!(main.get("/_/healthz").await.expect("healthz"), down);
    assert_eq!(main.get("/_/ready").await.expect("ready"), down);
    for path in ["/_/varz", "/metrics"] {
        assert_eq!(
            main.get(path).await.expect("varz"),
            (
                StatusCode::NOT_FOUND,
                format!("{path} is served on --metricsAddr {metrics_addr}\n")
            )
        );
    }
    // A diagnostic path is never a changefeed path.
    let resp = main
        .post("/_/varz", Bytes::from_static(b"{}"))
        .await
        .expect("post");
    assert_eq!(resp.0, StatusCode::NOT_FOUND);
    let paths: Vec<String> = srv.handler.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/db/public"]);

    srv.handler.set_health(None);
    assert_eq!(
        main.get("/_/ready").await.expect("ready"),
        (StatusCode::OK, "OK\n".to_string())
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn unknown_diagnostic_path_is_404() {
    let srv = TestServer::start(args()).await;
    let (status, text) = srv.client(true).get("/_/x").await.expect("get");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(text, "404 page not found\n");
    assert!(srv.handler.requests().is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    for http2 in [true, false] {
        let mut srv = TestServer::start(tls_args()).await;
        let client = srv.client(http2);
        let pending = tokio::spawn({
            let client = client.clone();
            async move { client.post("/db/public?delay_ms=500", Bytes::new()).await }
        });
        let handler = srv.handler.clone();
        eventually("the handler to start", WAIT, || {
            let started = handler.started();
            async move { (started == 1).then_some(()) }
        })
        .await;
        srv.begin_shutdown();
        let (status, text) = tokio::time::timeout(WAIT, pending)
            .await
            .expect("response in time")
            .expect("join")
            .expect("in-flight request completes");
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::OK, "OK\n"),
            "http2={http2}"
        );
        srv.stopped(WAIT).await.expect("serve returns");
        // No longer accepting.
        let fresh = srv.client(http2);
        let err = fresh.get("/_/healthz").await.expect_err("listener closed");
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_grace_period() {
    let mut srv = TestServer::start(ServerArgs {
        grace_period: Duration::from_millis(300),
        ..args()
    })
    .await;
    let client = srv.client(true);
    let pending =
        tokio::spawn(async move { client.post("/db/public?delay_ms=60000", Bytes::new()).await });
    let handler = srv.handler.clone();
    eventually("the handler to start", WAIT, || {
        let started = handler.started();
        async move { (started == 1).then_some(()) }
    })
    .await;
    srv.begin_shutdown();
    srv.stopped(Duration::from_secs(5))
        .await
        .expect("serve returns after the grace period");
    // The abandoned request fails rather than hanging.
    let outcome = tokio::time::timeout(WAIT, pending)
        .await
        .expect("client returns");
    assert!(!matches!(outcome, Ok(Ok((StatusCode::OK, _)))));
    assert_eq!(srv.handler.finished(), 0);
}

#[tokio::test]
async fn client_disconnect_does_not_abort_the_handler() {
    let srv = TestServer::start(args()).await;
    let mut stream = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /db/public?delay_ms=300 HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\n{}",
        )
        .await
        .expect("write");
    let handler = srv.handler.clone();
    eventually("the handler to start", WAIT, || {
        let started = handler.started();
        async move { (started == 1).then_some(()) }
    })
    .await;
    drop(stream);
    eventually("the handler to finish", WAIT, || {
        let finished = handler.finished();
        async move { (finished == 1).then_some(()) }
    })
    .await;
    srv.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_multiplex_over_http2() {
    let srv = TestServer::start(tls_args()).await;
    let client = srv.client(true);
    let calls = (0..32).map(|i| {
        let client = client.clone();
        async move {
            client
                .post(
                    &format!("/db/public?delay_ms=50&n={i}"),
                    Bytes::from(vec![b'x'; i]),
                )
                .await
        }
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.expect("post").0, StatusCode::OK);
    }
    assert_eq!(srv.handler.requests().len(), 32);
    assert_eq!(client.protocol(), Some(Protocol::Http2));
    srv.shutdown().await;
}

#[tokio::test]
async fn client_reconnects_after_the_server_restarts() {
    for http2 in [true, false] {
        let first = TestServer::start(tls_args()).await;
        let addr = first.addr;
        // Each server generates its own certificate, so this client trusts any.
        let client = Client::new(
            &first.url(),
            ClientOptions {
                insecure_skip_verify: true,
                http2,
                ..ClientOptions::default()
            },
        )
        .expect("client");
        assert_eq!(
            client
                .post("/db/public", Bytes::from_static(b"{}"))
                .await
                .expect("first")
                .0,
            StatusCode::OK
        );
        first.shutdown().await;

        let second = TestServer::start(ServerArgs {
            bind_addr: addr.to_string(),
            ..tls_args()
        })
        .await;
        let (status, _) = client
            .post("/db/public", Bytes::from_static(b"{}"))
            .await
            .expect("after restart");
        assert_eq!(status, StatusCode::OK, "http2={http2}");
        assert_eq!(second.handler.requests().len(), 1);
        second.shutdown().await;
    }
}

/// Reads until the peer closes (EOF or reset); None if it is still open after `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A minimal HTTP/1 POST on a raw socket; the status line of the answer.
async fn raw_post(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    stream
        .write_all(b"POST /db/public HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_slow_header_is_closed_by_the_header_read_timeout() {
    let srv = TestServer::start(ServerArgs {
        http_header_read_timeout: Duration::from_secs(1),
        ..args()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    let started = std::time::Instant::now();
    stream
        .write_all(b"POST /db/public HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("request line");
    // One header line every 200 ms: the connection is never idle, the header never complete.
    let mut closed = false;
    for i in 0..50 {
        if closed_within(&mut stream, Duration::from_millis(200))
            .await
            .is_some()
            || stream
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
        {
            closed = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(closed, "still open after {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    assert!(srv.handler.requests().is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn a_connection_without_requests_is_closed_by_the_idle_timeout() {
    let srv = TestServer::start(ServerArgs {
        http_idle_timeout: Duration::from_secs(1),
        ..args()
    })
    .await;
    // Silent from the start (no request at all), and idle after one request.
    let mut silent = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    let mut used = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    assert_eq!(raw_post(&mut used).await, "HTTP/1.1 200 OK");
    assert!(closed_within(&mut silent, WAIT).await.is_some());
    assert!(closed_within(&mut used, WAIT).await.is_some());
    srv.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_a_freed_slot_is_reused() {
    let srv = TestServer::start(ServerArgs {
        max_connections: 2,
        ..args()
    })
    .await;
    let mut first = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    let mut second = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    // Both are served (their slots are taken before the third arrives).
    assert_eq!(raw_post(&mut first).await, "HTTP/1.1 200 OK");
    assert_eq!(raw_post(&mut second).await, "HTTP/1.1 200 OK");
    let mut third = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    let answer = closed_within(&mut third, WAIT).await;
    assert_eq!(answer, Some(Vec::new()), "closed without an answer");
    assert!(closed_within(&mut first, Duration::from_millis(100))
        .await
        .is_none());

    drop(first);
    let status = eventually("a slot to free up", WAIT, || async {
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.ok()?;
        s.write_all(b"POST /db/public HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            .await
            .ok()?;
        let got = closed_within(&mut s, Duration::from_millis(300)).await;
        match got {
            // Refused: closed without a byte.
            Some(b) if b.is_empty() => None,
            Some(b) => Some(String::from_utf8_lossy(&b).lines().next()?.to_string()),
            // Still open: it was answered and kept alive; read what arrived.
            None => Some("HTTP/1.1 200 OK".to_string()),
        }
    })
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(raw_post(&mut second).await, "HTTP/1.1 200 OK");
    srv.shutdown().await;
}

#[tokio::test]
async fn the_http2_stream_cap_is_advertised() {
    use tokio::io::AsyncReadExt;
    let srv = TestServer::start(ServerArgs {
        http2_max_concurrent_streams: 7,
        ..args()
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    // h2c with prior knowledge: the preface and an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let mut header = [0u8; 9];
    tokio::time::timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("in time")
        .expect("frame header");
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    assert_eq!(header[3], 0x4, "the server's first frame is SETTINGS");
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.expect("settings");
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS is 0x3.
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
    srv.shutdown().await;
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_a_400() {
    let srv = TestServer::start(tls_args()).await;
    let mut stream = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /_/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = closed_within(&mut stream, WAIT).await.expect("closed");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{text}");
    assert!(
        text.ends_with("Client sent an HTTP request to an HTTPS server.\n"),
        "{text}"
    );
    // TLS clients are still served.
    let (status, _) = srv.client(true).get("/_/healthz").await.expect("healthz");
    assert_eq!(status, StatusCode::OK);
    srv.shutdown().await;
}

#[tokio::test]
async fn changefeed_urls_refuse_other_methods_with_405() {
    let srv = TestServer::start(args()).await;
    let client = srv.client(true);
    for method in [Method::GET, Method::DELETE, Method::PATCH] {
        let resp = client
            .request(method.clone(), "/db/public", Bytes::new())
            .await
            .expect("request");
        assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(resp.headers["allow"], "POST, PUT");
    }
    assert!(srv.handler.requests().is_empty());
    let (status, _) = client.get("/_/healthz").await.expect("healthz");
    assert_eq!(status, StatusCode::OK);
    srv.shutdown().await;
}

/// With nothing in flight, stopping does not wait out the grace period.
#[tokio::test]
async fn an_idle_sink_stops_without_waiting_for_the_grace_period() {
    let db = crate::support::Db::kv("idle_stop").await;
    let sink = crate::support::sink::Sink::start(&db, &["--gracePeriod=30s"]).await;
    sink.post_ok(
        "/idle_stop/public",
        crate::support::sink::batch(vec![crate::support::sink::upsert(
            "kv",
            serde_json::json!([1]),
            serde_json::json!({"k": 1, "v": "a"}),
            1,
        )]),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(15), sink.stop())
        .await
        .expect("an idle sink stops well within its 30 s grace period");
}
