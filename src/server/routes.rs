//! What each request gets: the diagnostic routes (`/_/healthz`, `/_/ready`, `/_/varz`,
//! `/metrics`) and the changefeed hand-off to the [`Handler`], with the response timeout and
//! the body admission.

use super::*;

pub(super) struct MainState {
    pub(super) handler: Arc<dyn Handler>,
    /// `--metricsAddr`, which alone serves the metrics when set.
    pub(super) metrics_addr: Option<SocketAddr>,
    pub(super) response_timeout: Duration,
    pub(super) max_request_bytes: u64,
    /// `--maxInflightBytes`: every changefeed body holds a reservation of it.
    pub(super) budget: body::Budget,
    pub(super) inflight: mpsc::Sender<()>,
    pub(super) abort: watch::Receiver<bool>,
}

#[derive(Clone)]
pub(super) enum Routes {
    Main(Arc<MainState>),
    /// `--metricsAddr`: the diagnostics only.
    Metrics(Arc<MainState>),
}

type HttpResponse = hyper::Response<Full<Bytes>>;

pub(super) async fn route(
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
pub(super) async fn status(state: &MainState) -> HttpResponse {
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
pub(super) async fn probe(
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

pub(super) async fn changefeed(
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

pub(super) fn timed_out(limit: Duration) -> Response {
    Response::text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("request timed out after {}", format_duration(limit)),
    )
    .with_retry_after(RETRY_AFTER_DEFAULT)
}

/// Records the changefeed metrics and renders the response.
pub(super) fn finish(start: std::time::Instant, resp: Response) -> HttpResponse {
    metrics::counter!(m::HTTP_STATUS_CODES, m::LABEL_CODE => resp.status.as_str().to_string())
        .increment(1);
    metrics::histogram!(m::HTTP_LATENCY).record(start.elapsed().as_secs_f64());
    text_response(&resp)
}

/// The answer to a body that was not accepted: 413, 415 (naming the codings we read), 503 with
/// `Retry-After` when the budget is spent, or 400.
pub(super) fn body_refused(start: std::time::Instant, e: &body::BodyError) -> HttpResponse {
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

pub(super) fn not_found() -> HttpResponse {
    text_response(&Response::text(StatusCode::NOT_FOUND, "404 page not found"))
}

pub(super) fn metrics_response() -> HttpResponse {
    let mut r = hyper::Response::new(Full::new(Bytes::from(crate::metrics::render())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT));
    r.headers_mut()
        .insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// One line of text: inner line breaks become spaces, and it ends with `\n`.
pub(super) fn text_response(resp: &Response) -> HttpResponse {
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
