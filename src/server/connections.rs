//! Accepting and serving connections: connection limits and refusals, the TLS handshake or
//! cleartext HTTP/1.1 and h2c, idle timeouts, and the HTTP/1.1 + HTTP/2 connection builder.

use super::*;

/// Per-connection limits, from the flags.
#[derive(Clone, Debug)]
pub(super) struct ConnLimits {
    pub(super) idle: Option<Duration>,
    pub(super) tcp_keepalive: Option<Duration>,
    pub(super) max_connections: usize,
}

impl ConnLimits {
    pub(super) fn new(args: &ServerArgs) -> ConnLimits {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        ConnLimits {
            idle: nonzero(args.http_idle_timeout),
            tcp_keepalive: nonzero(args.tcp_keepalive),
            max_connections: args.max_connections,
        }
    }
}

/// The connection builder: hyper's timeouts only run with a timer, so both protocols get one.
pub(super) fn connection_builder(args: &ServerArgs) -> auto::Builder<TokioExecutor> {
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
pub(super) struct Refusals {
    pub(super) since_log: u64,
    pub(super) logged: Option<Instant>,
}

impl Refusals {
    pub(super) fn refused(&mut self, limit: usize) {
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
pub(super) async fn accept_loop(
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
pub(super) struct Activity {
    pub(super) inflight: AtomicUsize,
    pub(super) last: std::sync::Mutex<Instant>,
}

pub(super) struct Busy(Arc<Activity>);

impl Activity {
    pub(super) fn begin(self: &Arc<Self>) -> Busy {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    pub(super) fn last(&self) -> Instant {
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
pub(super) async fn idle_for(activity: &Activity, limit: Option<Duration>) {
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
pub(super) async fn refused_plain_http(stream: &mut TcpStream) -> bool {
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
pub(super) async fn serve_connection(
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
pub(super) async fn drive<I>(
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
