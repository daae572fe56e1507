//! Changefeed requests: routing and decoding ([`webhook`]), authentication, the schema check,
//! the userscript's `dispatch`, then the hand-off to [`Sequencer::accept`] (or
//! [`Sequencer::resolved`]), which stages or applies according to the schema's mode. A request
//! is acknowledged only once what it carried is durable.

mod guard;
pub mod webhook;

use crate::apply::{Applier, ApplyError, SchemaInfo};
use crate::auth::Authenticator;
use crate::error::ErrorChain;
use crate::hlc::Hlc;
use crate::ident::{Ident, Schema, Table};
use crate::metrics as m;
use crate::mutation::Mutation;
use crate::script::{ScriptError, Userscript};
use crate::sequence::{SequenceError, Sequencer};
use crate::server::{Handler, Request, Response};
use crate::target::{Database, Dialect};
use futures::future::BoxFuture;
use http::StatusCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use webhook::{DecodeLimits, Payload, PrimaryKeys, WebhookError};

/// Flags of the ingest step.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SourceArgs {
    /// Maximum bytes of one ndjson line.
    #[arg(
        long = "ndjsonBufferSize",
        env = "CDC_SINK_NDJSON_BUFFER_SIZE",
        default_value_t = 65_536
    )]
    pub(crate) ndjson_buffer_size: usize,
    /// Refuse (400) resolved timestamps and `updated` times further than this ahead of the
    /// target database's clock; 0 turns the check off.
    #[arg(long = "maxClockSkew", env = "CDC_SINK_MAX_CLOCK_SKEW", default_value = "1h0m0s", value_parser = crate::config::parse_duration)]
    pub(crate) max_clock_skew: Duration,
}

pub(crate) use guard::{go_duration, SchemaGate, TargetClock};

#[derive(Debug, thiserror::Error)]
pub(crate) enum IngestError {
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error("missing or invalid access token: {}", .0.reason())]
    Unauthorized(crate::auth::Denied),
    #[error("database {got:?} is not the target database {want:?}")]
    WrongDatabase { got: String, want: String },
    #[error("table {0} not found in the target schema")]
    UnknownTable(String),
    #[error("schema {0} has no tables in the target")]
    NoSuchSchema(String),
    #[error(
        "{what} {ts} is more than {skew} ahead of the target database's clock (--maxClockSkew)"
    )]
    AheadOfClock {
        what: &'static str,
        ts: Hlc,
        skew: String,
    },
    #[error("could not look up schema {schema} in the target")]
    Lookup {
        schema: String,
        #[source]
        error: sqlx::Error,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Unreachable(#[from] crate::target::Unreachable),
}

impl IngestError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            IngestError::Webhook(e) => e.status(),
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::WrongDatabase { .. } => StatusCode::NOT_FOUND,
            IngestError::UnknownTable(_) => StatusCode::BAD_REQUEST,
            IngestError::NoSuchSchema(_) => StatusCode::NOT_FOUND,
            IngestError::AheadOfClock { .. } => StatusCode::BAD_REQUEST,
            IngestError::Sequence(SequenceError::Stage(e)) if e.is_bad_input() => {
                StatusCode::BAD_REQUEST
            }
            _ if self.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Sequence(SequenceError::Checkpoint(e)) if e.is_bad_input() => {
                StatusCode::BAD_REQUEST
            }
            // The target refused the data itself (constraint, type): the request cannot succeed.
            IngestError::Apply(_) | IngestError::Sequence(SequenceError::Apply(_)) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn is_unavailable(&self) -> bool {
        match self {
            IngestError::Apply(e) => e.is_unavailable(),
            IngestError::Sequence(e) => e.is_unavailable(),
            IngestError::Script(e) => e.is_retryable(),
            IngestError::Lookup { error, .. } => crate::target::is_unavailable(error),
            IngestError::Unreachable(_) => true,
            _ => false,
        }
    }

    /// The database error underneath, if any.
    fn sql(&self) -> Option<&sqlx::Error> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = source {
            if let Some(sql) = e.downcast_ref::<sqlx::Error>() {
                return Some(sql);
            }
            source = e.source();
        }
        None
    }
}

/// The changefeed handler behind the server: everything a request may touch.
pub(crate) struct Ingest {
    pub(crate) target: Database,
    pub(crate) staging: Database,
    pub(crate) auth: Authenticator,
    pub(crate) applier: Applier,
    pub(crate) sequencer: Arc<Sequencer>,
    pub(crate) script: Option<Userscript>,
    pub(crate) limits: DecodeLimits,
    /// `--maxClockSkew` against the target's clock.
    pub(crate) clock: TargetClock,
    pub(crate) schemas: SchemaGate,
    /// Database health and the connections ingest may hold (see [`crate::target::Gate`]).
    pub(crate) gate: crate::target::Gate,
}

impl Ingest {
    /// The handler the server calls for every changefeed request.
    pub(crate) fn into_handler(self) -> IngestHandler {
        STARTED.get_or_init(Instant::now);
        IngestHandler(Arc::new(self))
    }

    async fn handle(&self, req: Request) -> Result<(), IngestError> {
        let route = webhook::parse_path(&req.path)?;
        let schema = route.schema().clone();
        if self.target.dialect == Dialect::Postgres
            && schema.db != Ident::new(&self.target.database)
        {
            return Err(IngestError::WrongDatabase {
                got: schema.db.raw().to_string(),
                want: self.target.database.clone(),
            });
        }
        self.auth
            .check(
                &req.headers,
                req.access_token.as_deref(),
                req.client_cert.as_deref(),
                &schema,
            )
            .map_err(IngestError::Unauthorized)?;
        // Before anything keyed by the schema exists: checkpoint, lease, pipeline, metrics.
        let info = self.schema_with_tables(&schema).await?;
        let payload = webhook::decode(&route, &req.body, &Keys(&info), &self.limits)?;
        // The mutations own copies of what they need: the body is not held while staging.
        drop(req);
        match payload {
            // CockroachDB never sends an empty batch; an empty body is a client mistake.
            Payload::Empty => Err(WebhookError::EmptyBody.into()),
            Payload::Resolved(ts) => {
                self.not_ahead(&schema, "resolved timestamp", ts).await?;
                Ok(self.sequencer.resolved(&schema, ts).await?)
            }
            Payload::Mutations(muts) => {
                if let Some(newest) = muts.iter().map(|(_, mu)| mu.time).max() {
                    self.not_ahead(&schema, "updated time", newest).await?;
                }
                self.mutations(&schema, info, muts).await
            }
        }
    }

    /// The schema's tables; a schema without any is refused. A schema not seen with tables
    /// before is looked up in the catalog first (so one created since start works at once),
    /// and only then loaded into the applier's cache.
    async fn schema_with_tables(&self, schema: &Schema) -> Result<Arc<SchemaInfo>, IngestError> {
        if self.schemas.is_known(schema) {
            let info = self.applier.schemas().schema(schema).await?;
            if !info.tables.is_empty() {
                return Ok(info);
            }
            self.schemas.forget(schema);
        }
        let found = self
            .schemas
            .has_tables(&self.target, schema)
            .await
            .map_err(|error| IngestError::Lookup {
                schema: schema.to_string(),
                error,
            })?;
        let info = if found {
            Some(self.applier.schemas().refresh(schema).await?).filter(|i| !i.tables.is_empty())
        } else {
            None
        };
        let Some(info) = info else {
            metrics::counter!(m::INGEST_NO_SUCH_SCHEMA).increment(1);
            return Err(IngestError::NoSuchSchema(schema.to_string()));
        };
        self.schemas.remember(schema);
        Ok(info)
    }

    /// Refuses a timestamp beyond `--maxClockSkew` ahead of the target's clock: committed, it
    /// would make every real timestamp look old.
    async fn not_ahead(
        &self,
        schema: &Schema,
        what: &'static str,
        ts: Hlc,
    ) -> Result<(), IngestError> {
        match self.clock.limit(&self.target).await {
            Some(limit) if ts > limit => {
                metrics::counter!(m::INGEST_AHEAD_OF_CLOCK, m::LABEL_SCHEMA => schema.to_string())
                    .increment(1);
                Err(IngestError::AheadOfClock {
                    what,
                    ts,
                    skew: guard::go_duration(self.clock.skew()),
                })
            }
            _ => Ok(()),
        }
    }

    async fn mutations(
        &self,
        schema: &Schema,
        mut info: Arc<SchemaInfo>,
        muts: Vec<(Table, Mutation)>,
    ) -> Result<(), IngestError> {
        let labels = [
            (m::LABEL_KIND, "cdc".to_string()),
            (m::LABEL_TARGET, schema.to_string()),
        ];
        let received = muts.len() as u64;
        metrics::counter!(m::MUTATIONS_RECEIVED, &labels).increment(received);
        // The userscript routes (and drops) rows before they are staged.
        let muts = match &self.script {
            Some(s) if s.has_dispatch(schema) => match s.dispatch(schema, &info, muts).await {
                Ok(m) => m,
                Err(e) => {
                    metrics::counter!(m::MUTATIONS_ERROR, &labels).increment(received);
                    return Err(e.into());
                }
            },
            _ => muts,
        };
        // Tables created after the schema was loaded: look again once before refusing.
        if muts.iter().any(|(t, _)| !info.tables.contains_key(t)) {
            info = self.applier.schemas().refresh(schema).await?;
            if let Some((t, _)) = muts.iter().find(|(t, _)| !info.tables.contains_key(t)) {
                metrics::counter!(m::MUTATIONS_ERROR, &labels).increment(received);
                return Err(IngestError::UnknownTable(t.to_string()));
            }
        }
        let result = self
            .sequencer
            .accept(schema, &info, muts)
            .await
            .map_err(IngestError::from);
        match &result {
            Ok(()) => metrics::counter!(m::MUTATIONS_SUCCESS, &labels).increment(received),
            Err(_) => metrics::counter!(m::MUTATIONS_ERROR, &labels).increment(received),
        }
        result
    }
}

/// Primary keys from the target schema, for CDC-query feeds.
struct Keys<'a>(&'a SchemaInfo);

impl PrimaryKeys for Keys<'_> {
    fn primary_key(&self, table: &Table) -> Option<Vec<Ident>> {
        self.0.tables.get(table).map(|t| {
            t.columns
                .iter()
                .filter(|c| c.primary)
                .map(|c| c.name.clone())
                .collect()
        })
    }
}

/// When this process built its changefeed handler: the instance's uptime.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// The `/_/status` report: per schema with checkpoints, what the sequencer reports (see
/// [`Sequencer::status`]); and this instance.
async fn status(ingest: &Ingest) -> Result<serde_json::Value, String> {
    use serde_json::json;
    let schemas = ingest.sequencer.status().await?;
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Ok(json!({
        "instance": {
            "id": format!("{host}:{}", std::process::id()),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": STARTED.get_or_init(Instant::now).elapsed().as_secs(),
            "userscript": ingest.script.is_some(),
        },
        "schemas": schemas,
    }))
}

/// The answer to a request that failed, logged with the whole error. A refusal's reason may be
/// its cause (the constraint the target named); a failure's causes are the server's business
/// and stay in the log.
fn answer(path: &str, e: &IngestError) -> Response {
    let status = e.status();
    let chain = ErrorChain(e);
    if status.is_server_error() {
        tracing::warn!(path = %path, status = status.as_u16(), error = %chain, "changefeed request failed");
    } else {
        tracing::debug!(path = %path, status = status.as_u16(), error = %chain, "changefeed request refused");
    }
    let body = if status.is_server_error() {
        e.to_string()
    } else {
        chain.to_string()
    };
    Response {
        status,
        body,
        retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(Duration::from_secs(1)),
    }
}

/// The reason a probe answers 503 with: what failed, not why (the causes go to the debug log).
fn unavailable(what: String, e: &(dyn std::error::Error + 'static)) -> String {
    tracing::debug!(reason = %what, error = %ErrorChain(e), "probe failed");
    what
}

/// The server's view of [`Ingest`]: cheap to clone into each request's task.
#[derive(Clone)]
pub(crate) struct IngestHandler(pub Arc<Ingest>);

impl Handler for IngestHandler {
    fn changefeed(&self, req: Request) -> BoxFuture<'static, Response> {
        let this = self.0.clone();
        Box::pin(async move {
            let path = req.path.clone();
            let handled = this.gate.run(this.handle(req)).await;
            match &handled {
                Ok(()) => this.gate.observe(Ok(())),
                Err(e) => {
                    if let Some(sql) = e.sql() {
                        this.gate.observe(Err(sql));
                    }
                }
            }
            match handled {
                Ok(()) => Response {
                    status: StatusCode::OK,
                    body: "OK".into(),
                    retry_after: None,
                },
                Err(e) => answer(&path, &e),
            }
        })
    }

    fn status(&self) -> BoxFuture<'static, Result<serde_json::Value, String>> {
        let this = self.0.clone();
        Box::pin(async move { status(&this).await })
    }

    /// Healthy, and every target schema this process serves loads (from cache while fresh,
    /// else introspected again).
    fn ready(&self) -> BoxFuture<'static, Result<(), String>> {
        let health = self.health();
        let schemas = self.0.applier.schemas().clone();
        Box::pin(async move {
            health.await?;
            for schema in schemas.cached_schemas() {
                schemas.schema(&schema).await.map_err(|e| {
                    unavailable(format!("target schema {schema} does not load"), &e)
                })?;
            }
            Ok(())
        })
    }

    fn health(&self) -> BoxFuture<'static, Result<(), String>> {
        let staging = self.0.staging.pool.clone();
        let target = self.0.target.pool.clone();
        let down = self.0.gate.down();
        Box::pin(async move {
            // Known unreachable: answer now rather than after the pool's acquire timeout.
            if let Some(e) = down {
                return Err(e.to_string());
            }
            sqlx::query("SELECT 1")
                .execute(&staging)
                .await
                .map_err(|e| unavailable("health check failed for staging".into(), &e))?;
            sqlx::query("SELECT 1")
                .execute(&target)
                .await
                .map_err(|e| unavailable("health check failed for target".into(), &e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_answered_with_its_top_level_message_only() {
        let e = IngestError::Lookup {
            schema: "db.public".into(),
            error: sqlx::Error::PoolTimedOut,
        };
        let r = answer("/db/public", &e);
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.body, "could not look up schema db.public in the target");
        assert_eq!(r.retry_after, Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_refusal_is_answered_with_its_reason() {
        let e = IngestError::Webhook(WebhookError::EmptyBody.at("line 1"));
        let r = answer("/db/public", &e);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body, "line 1: request body is empty");
        assert_eq!(r.retry_after, None);
    }
}
