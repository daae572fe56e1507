//! Connections to the target (and staging) database: pools, dialect detection and the retry
//! rules shared by every step that writes.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// The SQL dialect of a database we talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Cockroach,
}

impl Dialect {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgresql",
            Dialect::Cockroach => "cockroachdb",
        }
    }

    /// The longest identifier, in bytes, the database keeps as written: PostgreSQL silently
    /// cuts longer ones (NAMEDATALEN − 1), CockroachDB does not cut.
    pub(crate) fn identifier_limit(self) -> Option<usize> {
        match self {
            Dialect::Postgres => Some(63),
            Dialect::Cockroach => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid connection string")]
    Url(#[source] sqlx::Error),
    #[error("cannot connect to {what}")]
    Connect {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "unsupported connection scheme {0:?}: use postgres://, postgresql://, pg:// or pgx://"
    )]
    Scheme(String),
    #[error("targetConn must be set")]
    Missing,
}

/// Pool settings for one database (target or staging).
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub max_lifetime: Duration,
    pub idle_timeout: Duration,
    /// Server-side `idle_in_transaction_session_timeout`.
    pub idle_in_transaction: Duration,
}

/// An open database with its detected dialect and the database name the URL connects to.
#[derive(Clone, Debug)]
pub struct Database {
    pub pool: PgPool,
    pub dialect: Dialect,
    pub database: String,
    /// The `pool` label of its metrics (`target`, `staging`, `control`).
    pub name: &'static str,
}

impl Database {
    /// Begins a transaction on a connection from [`Database::acquire`].
    pub(crate) async fn begin(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        sqlx::Transaction::begin(self.acquire().await?, None).await
    }

    /// Takes a connection from the pool, counting the wait in `pool_acquire_wait_*` and, when
    /// it opens a new connection, the time to open it in `pool_dial_latency_seconds`.
    pub(crate) async fn acquire(
        &self,
    ) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        acquire_counted(&self.pool, self.name).await
    }
}

/// See [`Database::acquire`].
async fn acquire_counted(
    pool: &PgPool,
    name: &'static str,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
    let started = std::time::Instant::now();
    let result = ACQUIRE_STARTED.scope(started, pool.acquire()).await;
    let l = [(crate::metrics::LABEL_POOL, name)];
    match &result {
        Ok(_) => {
            metrics::counter!(crate::metrics::POOL_ACQUIRE_WAIT_COUNT, &l).increment(1);
            metrics::gauge!(crate::metrics::POOL_ACQUIRE_WAIT_SECONDS, &l)
                .increment(started.elapsed().as_secs_f64());
        }
        // The pool's own verdicts; anything else came from opening a connection.
        Err(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed) => {}
        Err(_) => metrics::counter!(crate::metrics::POOL_DIAL_ERRORS, &l).increment(1),
    }
    result
}

tokio::task_local! {
    /// When the acquire running in this task began: a connection it opens is timed from it.
    static ACQUIRE_STARTED: std::time::Instant;
}

/// Accepts the reference's schemes (`pg`, `pgx` are aliases of `postgres`).
fn normalise_url(url: &str) -> Result<String, TargetError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(TargetError::Scheme(String::new()));
    };
    match scheme {
        "postgres" | "postgresql" => Ok(url.to_string()),
        "pg" | "pgx" => Ok(format!("postgres://{rest}")),
        other => Err(TargetError::Scheme(other.to_string())),
    }
}

/// Parses a connection URL into options carrying our session settings.
pub(crate) fn connect_options(
    url: &str,
    settings: &PoolSettings,
) -> Result<PgConnectOptions, TargetError> {
    let url = normalise_url(url)?;
    let mut opts = PgConnectOptions::from_str(&url).map_err(TargetError::Url)?;
    if !url.contains("application_name=") {
        opts = opts.application_name("cdc-sink");
    }
    let idle_ms = settings.idle_in_transaction.as_millis().max(1).to_string();
    opts = opts
        // standard_conforming_strings: a database or role may still set the legacy `off`, under
        // which backslashes in ordinary literals are escapes; pin the standard meaning.
        .options([
            ("idle_in_transaction_session_timeout", idle_ms.as_str()),
            ("standard_conforming_strings", "on"),
        ])
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(5));
    Ok(opts)
}

/// Opens a pool and detects whether it is CockroachDB or PostgreSQL.
pub async fn open(
    url: &str,
    what: &'static str,
    settings: &PoolSettings,
) -> Result<Database, TargetError> {
    open_watched(url, what, settings).await.map(|(db, _)| db)
}

/// [`open`], with the [`Health`] its successful connections report to.
pub(crate) async fn open_watched(
    url: &str,
    what: &'static str,
    settings: &PoolSettings,
) -> Result<(Database, Arc<Health>), TargetError> {
    let opts = connect_options(url, settings)?;
    let health = Health::new(what, opts.clone());
    let connected = health.clone();
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections.max(2))
        .min_connections(0)
        .max_lifetime(Some(settings.max_lifetime))
        .idle_timeout(Some(settings.idle_timeout))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .after_connect(move |_conn, _meta| {
            connected.ok();
            Box::pin(async move {
                record_dial(what);
                Ok(())
            })
        })
        .connect_lazy_with(opts);
    crate::metrics::register_pool(what);
    // The first connection is opened here, through a counted acquire: it is timed.
    let mut conn = acquire_counted(&pool, what)
        .await
        .map_err(|source| TargetError::Connect { what, source })?;
    let (version, database): (String, String) =
        sqlx::query_as("SELECT version(), current_database()")
            .fetch_one(&mut *conn)
            .await
            .map_err(|source| TargetError::Connect { what, source })?;
    drop(conn);
    let dialect = if version.contains("CockroachDB") {
        Dialect::Cockroach
    } else {
        Dialect::Postgres
    };
    tracing::info!(what, dialect = dialect.name(), database = %database, "connected");
    Ok((
        Database {
            pool,
            dialect,
            database,
            name: what,
        },
        health,
    ))
}

/// How long a statement waits for a pooled connection: queueing under load is normal;
/// ingest does not wait this long for an unreachable database (see [`Health`]).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// The `pool` label of the control pool.
pub(crate) const CONTROL: &str = "control";

/// Connections of the control pool: lease renewals and checkpoint commits, short statements
/// that must not queue behind ingest or bulk apply work.
const CONTROL_CONNECTIONS: u32 = 4;

/// A small pool of its own on the database of `db` (see [`CONTROL_CONNECTIONS`]).
pub(crate) fn control_pool(
    url: &str,
    db: &Database,
    settings: &PoolSettings,
) -> Result<Database, TargetError> {
    let opts = connect_options(url, settings)?;
    let pool = PgPoolOptions::new()
        .max_connections(CONTROL_CONNECTIONS)
        .min_connections(0)
        .max_lifetime(Some(settings.max_lifetime))
        .idle_timeout(Some(settings.idle_timeout))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
        .after_connect(|_conn, _meta| {
            Box::pin(async {
                record_dial(CONTROL);
                Ok(())
            })
        })
        .connect_lazy_with(opts);
    crate::metrics::register_pool(CONTROL);
    Ok(Database {
        pool,
        dialect: db.dialect,
        database: db.database.clone(),
        name: CONTROL,
    })
}

/// Counts a connection just opened and, when a counted acquire opened it, times it.
fn record_dial(pool: &'static str) {
    let l = [(crate::metrics::LABEL_POOL, pool)];
    metrics::counter!(crate::metrics::POOL_DIAL_SUCCESS, &l).increment(1);
    if let Ok(started) = ACQUIRE_STARTED.try_with(|s| *s) {
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!(crate::metrics::POOL_DIAL_LATENCY, &l).record(secs);
        metrics::histogram!(crate::metrics::POOL_SQL_READY_LATENCY, &l).record(secs);
    }
}

/// SQLSTATEs worth retrying at once: serialization failures and dropped connections.
pub(crate) fn is_retryable_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "40003" | "08003" | "08006" | "57P01"
    )
}

/// Whether an error means the database is unreachable or overloaded (HTTP 503), as opposed to
/// a statement the database refused (bad data: HTTP 400).
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            is_retryable_sqlstate(&c)
                || c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57")
                || c == "55P03"
        }),
        _ => false,
    }
}

/// The SQLSTATE of an error, or `unknown`.
pub(crate) fn sqlstate(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .map(|c| c.into_owned())
            .unwrap_or_else(|| "unknown".into()),
        _ => "unknown".into(),
    }
}

/// Runs `op` again, immediately, up to ten times while it fails with a retryable SQLSTATE.
pub(crate) async fn retry<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    metrics::counter!(crate::metrics::RETRY_ACTIONS).increment(1);
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let code = sqlstate(&e);
                attempt += 1;
                if attempt < 10 && is_retryable_sqlstate(&code) {
                    metrics::counter!(crate::metrics::RETRY_RETRIED, crate::metrics::LABEL_CODE => code).increment(1);
                    continue;
                }
                metrics::counter!(crate::metrics::RETRY_ABORTED, crate::metrics::LABEL_CODE => code).increment(1);
                return Err(e);
            }
        }
    }
}

/// SQLSTATEs of DDL that lost a race with a concurrent creator of the same object:
/// `CREATE … IF NOT EXISTS` checks before it inserts into the catalog, so two sessions can both
/// pass the check (unique violation on a catalog index, duplicate table, schema or object).
/// Running the statement again finds the object and does nothing.
pub(crate) fn is_ddl_race(code: &str) -> bool {
    matches!(code, "23505" | "42P07" | "42P06" | "42710")
}

/// The PostgreSQL advisory lock every cdc-sink DDL transaction takes ("cdcsink" in ASCII), so
/// instances started together create the staging objects one after the other.
const DDL_LOCK: i64 = 0x0063_6463_7369_6e6b;

/// Runs idempotent DDL (`… IF NOT EXISTS`) so that any number of sessions may run it at once:
/// on PostgreSQL in one transaction under [`DDL_LOCK`]; on CockroachDB (no advisory locks)
/// statement by statement. Either way a lost race (see [`is_ddl_race`]) or a retryable error
/// runs it again. Not for `CREATE INDEX CONCURRENTLY`, which cannot run in a transaction:
/// see [`ddl_retry`].
pub(crate) async fn run_ddl(db: &Database, stmts: &[String]) -> Result<(), sqlx::Error> {
    let mut attempt: u32 = 0;
    loop {
        match run_ddl_once(db, stmts).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                attempt += 1;
                if !retry_ddl(&e, attempt).await {
                    return Err(e);
                }
            }
        }
    }
}

async fn run_ddl_once(db: &Database, stmts: &[String]) -> Result<(), sqlx::Error> {
    match db.dialect {
        Dialect::Postgres => {
            let mut tx = db.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(DDL_LOCK)
                .execute(&mut *tx)
                .await?;
            // Holding the DDL lock, never wait long for a table lock: the holder of that lock
            // may itself be waiting for this DDL lock (an apply transaction creating its
            // dead-letter table), a cycle PostgreSQL cannot see. Give way and try again.
            sqlx::query("SELECT set_config('lock_timeout', '1s', true)")
                .execute(&mut *tx)
                .await?;
            for stmt in stmts {
                sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(stmt)).await?;
            }
            tx.commit().await
        }
        Dialect::Cockroach => {
            for stmt in stmts {
                sqlx::raw_sql(stmt).execute(&db.pool).await?;
            }
            Ok(())
        }
    }
}

/// Runs `op` again, after a short growing pause, while it fails with a lost DDL race, a lock
/// timeout or a retryable SQLSTATE (at most 20 times).
pub(crate) async fn ddl_retry<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt: u32 = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                attempt += 1;
                if !retry_ddl(&e, attempt).await {
                    return Err(e);
                }
            }
        }
    }
}

/// Whether failed attempt number `attempt` is worth another (a lost race, a lock wait that
/// timed out, a retryable error); pauses a little first.
async fn retry_ddl(e: &sqlx::Error, attempt: u32) -> bool {
    let code = sqlstate(e);
    if attempt >= 20 || !(is_ddl_race(&code) || code == "55P03" || is_retryable_sqlstate(&code)) {
        return false;
    }
    tracing::debug!(code = %code, attempt, "ddl raced with another session; running it again");
    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_ddl_races_are_told_apart_from_other_errors() {
        for code in ["23505", "42P07", "42P06", "42710"] {
            assert!(is_ddl_race(code), "{code}");
        }
        assert!(!is_ddl_race("42601"));
        assert!(!is_ddl_race("23503"));
        assert_eq!(Dialect::Postgres.identifier_limit(), Some(63));
        assert_eq!(Dialect::Cockroach.identifier_limit(), None);
    }

    #[test]
    fn accepts_the_reference_url_schemes() {
        assert_eq!(normalise_url("pgx://u@h/db").unwrap(), "postgres://u@h/db");
        assert_eq!(normalise_url("postgresql://h").unwrap(), "postgresql://h");
        assert!(matches!(normalise_url("mysql://h"), Err(TargetError::Scheme(s)) if s == "mysql"));
    }

    #[test]
    fn quoted_values_are_masked_but_names_kept() {
        assert_eq!(
            mask_quoted(
                "invalid input syntax for type integer: \"s3cret\"",
                "22P02",
                &[]
            ),
            "invalid input syntax for type integer: \"…\""
        );
        assert_eq!(
            mask_quoted(
                "value \"99999999999\" is out of range for type integer",
                "22003",
                &[]
            ),
            "value \"…\" is out of range for type integer"
        );
        assert_eq!(
            mask_quoted(
                "duplicate key value violates unique constraint \"kv_v_key\"",
                "23505",
                &["kv", "kv_v_key"]
            ),
            "duplicate key value violates unique constraint \"kv_v_key\""
        );
        assert_eq!(
            mask_quoted(
                "could not parse \"x\" as type int: parsing \"x",
                "22P02",
                &[]
            ),
            "could not parse \"…\" as type int: parsing \"…\""
        );
        assert_eq!(
            mask_quoted("relation \"public.nope\" does not exist", "42P01", &[]),
            "relation \"public.nope\" does not exist"
        );
        let other = sqlx::Error::PoolTimedOut;
        assert_eq!(safe(&other).to_string(), other.to_string());
    }

    #[test]
    fn ingest_leaves_a_quarter_of_the_pool_to_the_pipelines() {
        assert_eq!(ingest_permits(128), 96);
        assert_eq!(ingest_permits(8), 6);
        assert_eq!(ingest_permits(4), 2);
        assert_eq!(ingest_permits(2), 1);
    }
}

/// Flags for the target and staging connections.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct TargetArgs {
    /// Target database URL (postgres://, postgresql://, pg:// or pgx://); CockroachDB or
    /// PostgreSQL is detected from `version()`.
    #[arg(long = "targetConn", env = "CDC_SINK_TARGET_CONN")]
    pub(crate) target_conn: Option<String>,
    /// Maximum target connections.
    #[arg(
        long = "targetMaxPoolSize",
        env = "CDC_SINK_TARGET_MAX_POOL_SIZE",
        default_value_t = 128
    )]
    pub(crate) target_max_pool_size: u32,
    /// Maximum lifetime of a target connection.
    #[arg(long = "targetMaxLifetime", env = "CDC_SINK_TARGET_MAX_LIFETIME", default_value = "5m0s", value_parser = crate::config::parse_duration)]
    pub(crate) target_max_lifetime: Duration,
    /// Maximum idle time of a target connection.
    #[arg(long = "targetIdleTime", env = "CDC_SINK_TARGET_IDLE_TIME", default_value = "1m0s", value_parser = crate::config::parse_duration)]
    pub(crate) target_idle_time: Duration,
    /// Accepted for compatibility (connection lifetimes are not jittered).
    #[arg(long = "targetJitterTime", env = "CDC_SINK_TARGET_JITTER_TIME", default_value = "15s", value_parser = crate::config::parse_duration)]
    pub(crate) target_jitter_time: Duration,
    /// Prepared statements kept per target connection.
    #[arg(
        long = "targetStatementCacheSize",
        env = "CDC_SINK_TARGET_STATEMENT_CACHE_SIZE",
        default_value_t = 128
    )]
    pub(crate) target_statement_cache_size: usize,
    /// The target's idle_in_transaction_session_timeout.
    #[arg(long = "applyTimeout", env = "CDC_SINK_APPLY_TIMEOUT", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub(crate) apply_timeout: Duration,
    /// Staging database URL (PostgreSQL or CockroachDB); empty means the target database, where
    /// each apply transaction also deletes the staged rows it applied.
    #[arg(long = "stagingConn", env = "CDC_SINK_STAGING_CONN")]
    pub(crate) staging_conn: Option<String>,
    /// Maximum staging connections.
    #[arg(
        long = "stagingMaxPoolSize",
        env = "CDC_SINK_STAGING_MAX_POOL_SIZE",
        default_value_t = 128
    )]
    pub(crate) staging_max_pool_size: u32,
    #[arg(long = "stagingMaxLifetime", env = "CDC_SINK_STAGING_MAX_LIFETIME", default_value = "5m0s", value_parser = crate::config::parse_duration)]
    pub(crate) staging_max_lifetime: Duration,
    #[arg(long = "stagingIdleTime", env = "CDC_SINK_STAGING_IDLE_TIME", default_value = "1m0s", value_parser = crate::config::parse_duration)]
    pub(crate) staging_idle_time: Duration,
    #[arg(long = "stagingJitterTime", env = "CDC_SINK_STAGING_JITTER_TIME", default_value = "15s", value_parser = crate::config::parse_duration)]
    pub(crate) staging_jitter_time: Duration,
    /// How often the target schema is reloaded (0 disables periodic reloads).
    #[arg(long = "schemaRefresh", env = "CDC_SINK_SCHEMA_REFRESH", default_value = "1m0s", value_parser = crate::config::parse_duration)]
    pub(crate) schema_refresh: Duration,
}

impl TargetArgs {
    pub(crate) fn validate(&self) -> Result<(), TargetError> {
        if self.target_conn.as_deref().unwrap_or("").is_empty() {
            return Err(TargetError::Missing);
        }
        Ok(())
    }

    pub(crate) fn target_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.target_max_pool_size,
            max_lifetime: self.target_max_lifetime,
            idle_timeout: self.target_idle_time,
            idle_in_transaction: self.apply_timeout,
        }
    }

    pub(crate) fn staging_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.staging_max_pool_size,
            max_lifetime: self.staging_max_lifetime,
            idle_timeout: self.staging_idle_time,
            idle_in_transaction: Duration::from_secs(60),
        }
    }

    /// `--stagingConn` names another database than `--targetConn`.
    pub(crate) fn separate_staging(&self) -> bool {
        self.staging_conn
            .as_deref()
            .is_some_and(|s| !s.is_empty() && Some(s) != self.target_conn.as_deref())
    }

    /// Opens the target and the staging database (the same pool when `--stagingConn` is unset
    /// or equal to `--targetConn`).
    pub(crate) async fn open(&self) -> Result<(Database, Database), TargetError> {
        let opened = self.open_all().await?;
        Ok((opened.target, opened.staging))
    }

    /// Opens the target, the staging database and the control pool on staging, with the
    /// health of each database ingest uses.
    pub(crate) async fn open_all(&self) -> Result<Opened, TargetError> {
        let url = self.target_conn.as_deref().ok_or(TargetError::Missing)?;
        let target_settings = self.target_settings();
        let (target, target_health) = open_watched(url, "target", &target_settings).await?;
        let mut health = vec![target_health];
        let mut ingest_pool = self.target_max_pool_size.max(2);
        let (staging, control) = match self.staging_conn.as_deref() {
            Some(s) if self.separate_staging() => {
                let settings = self.staging_settings();
                let (staging, staging_health) = open_watched(s, "staging", &settings).await?;
                health.push(staging_health);
                ingest_pool = ingest_pool.min(self.staging_max_pool_size.max(2));
                let control = control_pool(s, &staging, &settings)?;
                (staging, control)
            }
            _ => {
                let control = control_pool(url, &target, &target_settings)?;
                (target.clone(), control)
            }
        };
        Ok(Opened {
            target,
            staging,
            control,
            gate: Gate::new(health, ingest_pool),
        })
    }
}

/// The databases a running sink uses.
pub(crate) struct Opened {
    pub(crate) target: Database,
    pub(crate) staging: Database,
    /// Leases and checkpoint commits (on the staging database).
    pub(crate) control: Database,
    /// What ingest passes before using `target` and `staging`.
    pub(crate) gate: Gate,
}

/// Publishes the pool gauges (`pool_*{pool}`) every few seconds while the pool is open.
pub(crate) fn spawn_pool_metrics(db: &Database) {
    let pool_name = db.name;
    let pool = db.pool.clone();
    tokio::spawn(async move {
        let labels = [(crate::metrics::LABEL_POOL, pool_name)];
        while !pool.is_closed() {
            let size = pool.size();
            let idle = pool.num_idle() as u32;
            metrics::gauge!(crate::metrics::POOL_ACQUIRED, &labels)
                .set(f64::from(size.saturating_sub(idle)));
            metrics::gauge!(crate::metrics::POOL_IDLE, &labels).set(f64::from(idle));
            metrics::gauge!(crate::metrics::POOL_MAX, &labels)
                .set(f64::from(pool.options().get_max_connections()));
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// A database error as it may be logged or answered: the SQLSTATE, the names the server
/// attached (schema, table, column, constraint, type) and the message with every quoted part
/// that is not one of those names masked. PostgreSQL and CockroachDB quote the offending value
/// in messages such as `invalid input syntax for type integer: "…"` and in `DETAIL` (key
/// values of a unique violation), so the detail is dropped and such quotes are masked.
/// Errors that are not from the database server print as they are: they carry no row values.
pub(crate) struct Safe<'a>(pub &'a sqlx::Error);

/// [`Safe`] for `e`.
pub(crate) fn safe(e: &sqlx::Error) -> Safe<'_> {
    Safe(e)
}

impl std::fmt::Display for Safe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sqlx::Error::Database(db) = self.0 else {
            return write!(f, "{}", self.0);
        };
        let code = db.code().map(|c| c.into_owned());
        let code = code.as_deref().unwrap_or("unknown");
        let mut names: Vec<(&str, String)> = Vec::new();
        if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            let fields = [
                ("schema", pg.schema()),
                ("table", pg.table()),
                ("column", pg.column()),
                ("constraint", pg.constraint()),
                ("type", pg.data_type()),
            ];
            names.extend(
                fields
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v?.to_string()))),
            );
        } else if let Some(c) = db.constraint() {
            names.push(("constraint", c.to_string()));
        }
        let keep: Vec<&str> = names.iter().map(|(_, v)| v.as_str()).collect();
        write!(
            f,
            "{} (SQLSTATE {code}",
            mask_quoted(db.message(), code, &keep)
        )?;
        for (k, v) in &names {
            write!(f, ", {k} {v}")?;
        }
        write!(f, ")")
    }
}

/// Masks the double-quoted parts of a server message that may be values. Messages of the
/// classes about names (syntax and undefined objects, `42…`; wrong database or schema,
/// `3D…`, `3F…`) quote only identifiers and are kept whole; elsewhere a quoted part is kept
/// only when it is one of the names in `keep`.
fn mask_quoted(message: &str, code: &str, keep: &[&str]) -> String {
    if ["42", "3D", "3F"].iter().any(|c| code.starts_with(c)) {
        return message.to_string();
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('"') else {
            // An unterminated quote: whatever follows may be a value.
            out.push_str("…\"");
            return out;
        };
        let quoted = &after[..close];
        out.push_str(if keep.contains(&quoted) {
            quoted
        } else {
            "…"
        });
        out.push('"');
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// How long an ingest request waits on the database before its health is questioned.
const STALL: Duration = Duration::from_millis(200);
/// A success this recent shows the database answers: no probe is needed.
const FRESH: Duration = Duration::from_millis(500);
/// The longest a probe may take to connect before the database counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a database found unreachable is tried again.
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Whether one database answers, as ingest sees it. The pool retries a refused connection
/// until its acquire timeout, far longer than a changefeed waits for an answer, so a request
/// that waits a little while nothing else succeeded triggers a probe (a fresh connection of
/// its own, bounded by [`PROBE_TIMEOUT`]). A failed probe marks the database down: waiting
/// requests and new ones are refused at once, and the probe is repeated until a connection
/// succeeds. A busy database still answers the probe, so queueing under load is not refused.
pub(crate) struct Health {
    what: &'static str,
    opts: PgConnectOptions,
    started: std::time::Instant,
    /// Milliseconds after `started` of the last sign of life.
    last_ok: std::sync::atomic::AtomicU64,
    probing: std::sync::atomic::AtomicBool,
    down: tokio::sync::watch::Sender<bool>,
}

impl Health {
    pub(crate) fn new(what: &'static str, opts: PgConnectOptions) -> Arc<Health> {
        Arc::new(Health {
            what,
            opts,
            started: std::time::Instant::now(),
            last_ok: Default::default(),
            probing: Default::default(),
            down: tokio::sync::watch::channel(false).0,
        })
    }

    pub(crate) fn what(&self) -> &'static str {
        self.what
    }

    pub(crate) fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    /// The database answered.
    pub(crate) fn ok(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_ok
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        self.down.send_if_modified(|down| {
            if *down {
                tracing::info!(what = self.what, "database reachable again");
            }
            std::mem::replace(down, false)
        });
    }

    fn fresh(&self) -> bool {
        let last = self.last_ok.load(std::sync::atomic::Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(last) < FRESH.as_millis() as u64
    }

    /// An operation failed with `e`: if it looks like a lost connection, probe.
    pub(crate) fn failed(self: &Arc<Self>, e: &sqlx::Error) {
        let code = sqlstate(e);
        if matches!(
            e,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::Protocol(_)
        ) || code.starts_with("08")
            || code == "57P01"
            || code == "57P03"
        {
            self.probe();
        }
    }

    /// Starts a probe unless one runs; it repeats while the database is unreachable.
    fn probe(self: &Arc<Self>) {
        if self.probing.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let reachable = match tokio::time::timeout(PROBE_TIMEOUT, this.opts.connect()).await
                {
                    Ok(Ok(conn)) => {
                        let _ = sqlx::Connection::close(conn).await;
                        true
                    }
                    // The server answered but refused this session (too many clients, bad
                    // credentials): it is reachable, and the pool reports the real error.
                    Ok(Err(sqlx::Error::Database(db))) => db
                        .code()
                        .is_some_and(|c| !(c.starts_with("08") || c == "57P01" || c == "57P03")),
                    Ok(Err(_)) | Err(_) => false,
                };
                if reachable {
                    this.ok();
                    break;
                }
                this.down.send_if_modified(|down| {
                    if !*down {
                        tracing::warn!(
                            what = this.what,
                            "database unreachable; refusing changefeed requests until it answers"
                        );
                    }
                    !std::mem::replace(down, true)
                });
                tokio::time::sleep(PROBE_EVERY).await;
            }
            this.probing
                .store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// Resolves once the database is found unreachable while the caller waits on it: after
    /// [`STALL`] with no recent sign of life, a probe decides.
    pub(crate) async fn unreachable(self: &Arc<Self>) {
        let mut down = self.down.subscribe();
        tokio::time::sleep(STALL).await;
        loop {
            if *down.borrow_and_update() {
                return;
            }
            if !self.fresh() {
                self.probe();
            }
            tokio::select! {
                _ = down.changed() => {}
                _ = tokio::time::sleep(STALL) => {}
            }
        }
    }
}

/// The database is unreachable (HTTP 503 at once).
#[derive(Debug, thiserror::Error)]
#[error("the {0} database is unreachable")]
pub(crate) struct Unreachable(pub &'static str);

/// What stands between a changefeed request and the pools: the databases' [`Health`], and
/// permits that keep connections for the apply pipelines (reading windows, applying,
/// checkpoints), so that ingest alone can never hold every connection.
pub(crate) struct Gate {
    health: Vec<Arc<Health>>,
    permits: tokio::sync::Semaphore,
}

impl Gate {
    /// `pool_size` is the smaller of the pools ingest uses; a quarter of it (at least two
    /// connections) is kept from ingest.
    pub(crate) fn new(health: Vec<Arc<Health>>, pool_size: u32) -> Gate {
        Gate {
            health,
            permits: tokio::sync::Semaphore::new(ingest_permits(pool_size)),
        }
    }

    /// Runs `work` (which uses at most one connection of each pool at a time) under a
    /// permit; refuses at once while a database is down, and gives up on `work` as soon as
    /// one is found down while it waits.
    pub(crate) async fn run<T, E: From<Unreachable>>(
        &self,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        if let Some(down) = self.down() {
            return Err(down.into());
        }
        let unreachable = async {
            if self.health.is_empty() {
                return std::future::pending().await;
            }
            let watches = self.health.iter().map(|h| Box::pin(h.unreachable()));
            let (_, i, _) = futures::future::select_all(watches).await;
            Unreachable(self.health[i].what())
        };
        let gated = async {
            let _permit = self.permits.acquire().await.expect("never closed");
            work.await
        };
        tokio::select! {
            r = gated => r,
            u = unreachable => Err(u.into()),
        }
    }

    /// The first database known to be unreachable, if any.
    pub(crate) fn down(&self) -> Option<Unreachable> {
        self.health
            .iter()
            .find(|h| h.is_down())
            .map(|h| Unreachable(h.what()))
    }

    /// Records the outcome of a request's database work.
    pub(crate) fn observe(&self, outcome: Result<(), &sqlx::Error>) {
        for h in &self.health {
            match outcome {
                Ok(()) => h.ok(),
                Err(e) => h.failed(e),
            }
        }
    }
}

/// Connections of a pool of `pool_size` that ingest may hold at once.
fn ingest_permits(pool_size: u32) -> usize {
    let reserved = (pool_size / 4).max(2);
    pool_size.saturating_sub(reserved).max(1) as usize
}
