//! Connections to the target (and staging) database: pools, dialect detection and the retry
//! rules shared by every step that writes.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;
use std::str::FromStr;
use std::time::Duration;

/// The SQL dialect of a database we talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Cockroach,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgresql",
            Dialect::Cockroach => "cockroachdb",
        }
    }

    /// The longest identifier, in bytes, the database keeps as written: PostgreSQL silently
    /// cuts longer ones (NAMEDATALEN − 1), CockroachDB does not cut.
    pub fn identifier_limit(self) -> Option<usize> {
        match self {
            Dialect::Postgres => Some(63),
            Dialect::Cockroach => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid connection string: {0}")]
    Url(#[source] sqlx::Error),
    #[error("cannot connect to {what}: {source}")]
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
}

impl Database {
    /// Begins a transaction on a connection from [`Database::acquire`].
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        sqlx::Transaction::begin(self.acquire().await?, None).await
    }

    /// Takes a connection from the pool, counting the wait in `pool_acquire_wait_*` and, when
    /// it opens a new connection, the time to open it in `pool_dial_latency_seconds`.
    pub async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        acquire_counted(&self.pool).await
    }
}

/// See [`Database::acquire`].
async fn acquire_counted(
    pool: &PgPool,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
    let started = std::time::Instant::now();
    let result = ACQUIRE_STARTED.scope(started, pool.acquire()).await;
    let l = [(crate::metrics::LABEL_POOL, pool_name(pool))];
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

/// The `pool` label of each open pool, keyed by the address of its options (one per pool,
/// shared by its clones): sqlx pools carry no name.
static POOL_NAMES: std::sync::Mutex<Vec<(usize, &'static str)>> = std::sync::Mutex::new(Vec::new());

fn pool_key(pool: &PgPool) -> usize {
    std::ptr::from_ref(pool.options()) as usize
}

fn pool_name(pool: &PgPool) -> &'static str {
    let key = pool_key(pool);
    POOL_NAMES
        .lock()
        .expect("poisoned")
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("target", |(_, name)| name)
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
pub fn connect_options(
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
    let opts = connect_options(url, settings)?;
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections.max(2))
        .min_connections(0)
        .max_lifetime(Some(settings.max_lifetime))
        .idle_timeout(Some(settings.idle_timeout))
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .after_connect(move |_conn, _meta| {
            Box::pin(async move {
                record_dial(what);
                Ok(())
            })
        })
        .connect_lazy_with(opts);
    {
        // A pool dropped earlier may have left its options at the same address.
        let mut names = POOL_NAMES.lock().expect("poisoned");
        let key = pool_key(&pool);
        names.retain(|(k, _)| *k != key);
        names.push((key, what));
    }
    crate::metrics::register_pool(what);
    // The first connection is opened here, through a counted acquire: it is timed.
    let mut conn = acquire_counted(&pool)
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
    Ok(Database {
        pool,
        dialect,
        database,
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
pub fn is_retryable_sqlstate(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "40003" | "08003" | "08006" | "57P01"
    )
}

/// Whether an error means the database is unreachable or overloaded (HTTP 503), as opposed to
/// a statement the database refused (bad data: HTTP 400).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
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
pub fn sqlstate(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .map(|c| c.into_owned())
            .unwrap_or_else(|| "unknown".into()),
        _ => "unknown".into(),
    }
}

/// Runs `op` again, immediately, up to ten times while it fails with a retryable SQLSTATE.
pub async fn retry<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
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
pub fn is_ddl_race(code: &str) -> bool {
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
pub async fn run_ddl(db: &Database, stmts: &[String]) -> Result<(), sqlx::Error> {
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
pub async fn ddl_retry<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
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
}

/// Flags for the target and staging connections.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Target database URL (postgres://, postgresql://, pg:// or pgx://); CockroachDB or
    /// PostgreSQL is detected from `version()`.
    #[arg(long = "targetConn", env = "CDC_SINK_TARGET_CONN")]
    pub target_conn: Option<String>,
    /// Maximum target connections.
    #[arg(
        long = "targetMaxPoolSize",
        env = "CDC_SINK_TARGET_MAX_POOL_SIZE",
        default_value_t = 128
    )]
    pub target_max_pool_size: u32,
    /// Maximum lifetime of a target connection.
    #[arg(long = "targetMaxLifetime", env = "CDC_SINK_TARGET_MAX_LIFETIME", default_value = "5m0s", value_parser = crate::config::parse_duration)]
    pub target_max_lifetime: Duration,
    /// Maximum idle time of a target connection.
    #[arg(long = "targetIdleTime", env = "CDC_SINK_TARGET_IDLE_TIME", default_value = "1m0s", value_parser = crate::config::parse_duration)]
    pub target_idle_time: Duration,
    /// Accepted for compatibility (connection lifetimes are not jittered).
    #[arg(long = "targetJitterTime", env = "CDC_SINK_TARGET_JITTER_TIME", default_value = "15s", value_parser = crate::config::parse_duration)]
    pub target_jitter_time: Duration,
    /// Prepared statements kept per target connection.
    #[arg(
        long = "targetStatementCacheSize",
        env = "CDC_SINK_TARGET_STATEMENT_CACHE_SIZE",
        default_value_t = 128
    )]
    pub target_statement_cache_size: usize,
    /// The target's idle_in_transaction_session_timeout.
    #[arg(long = "applyTimeout", env = "CDC_SINK_APPLY_TIMEOUT", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub apply_timeout: Duration,
    /// Staging database URL (PostgreSQL or CockroachDB); empty means the target database, where
    /// each apply transaction also deletes the staged rows it applied.
    #[arg(long = "stagingConn", env = "CDC_SINK_STAGING_CONN")]
    pub staging_conn: Option<String>,
    /// Maximum staging connections.
    #[arg(
        long = "stagingMaxPoolSize",
        env = "CDC_SINK_STAGING_MAX_POOL_SIZE",
        default_value_t = 128
    )]
    pub staging_max_pool_size: u32,
    #[arg(long = "stagingMaxLifetime", env = "CDC_SINK_STAGING_MAX_LIFETIME", default_value = "5m0s", value_parser = crate::config::parse_duration)]
    pub staging_max_lifetime: Duration,
    #[arg(long = "stagingIdleTime", env = "CDC_SINK_STAGING_IDLE_TIME", default_value = "1m0s", value_parser = crate::config::parse_duration)]
    pub staging_idle_time: Duration,
    #[arg(long = "stagingJitterTime", env = "CDC_SINK_STAGING_JITTER_TIME", default_value = "15s", value_parser = crate::config::parse_duration)]
    pub staging_jitter_time: Duration,
    /// How often the target schema is reloaded (0 disables periodic reloads).
    #[arg(long = "schemaRefresh", env = "CDC_SINK_SCHEMA_REFRESH", default_value = "1m0s", value_parser = crate::config::parse_duration)]
    pub schema_refresh: Duration,
}

impl TargetArgs {
    pub fn validate(&self) -> Result<(), TargetError> {
        if self.target_conn.as_deref().unwrap_or("").is_empty() {
            return Err(TargetError::Missing);
        }
        Ok(())
    }

    pub fn target_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.target_max_pool_size,
            max_lifetime: self.target_max_lifetime,
            idle_timeout: self.target_idle_time,
            idle_in_transaction: self.apply_timeout,
        }
    }

    pub fn staging_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.staging_max_pool_size,
            max_lifetime: self.staging_max_lifetime,
            idle_timeout: self.staging_idle_time,
            idle_in_transaction: Duration::from_secs(60),
        }
    }

    /// `--stagingConn` names another database than `--targetConn`.
    pub fn separate_staging(&self) -> bool {
        self.staging_conn
            .as_deref()
            .is_some_and(|s| !s.is_empty() && Some(s) != self.target_conn.as_deref())
    }

    /// Opens the target and the staging database (the same pool when `--stagingConn` is unset
    /// or equal to `--targetConn`).
    pub async fn open(&self) -> Result<(Database, Database), TargetError> {
        let url = self.target_conn.as_deref().ok_or(TargetError::Missing)?;
        let target = open(url, "target", &self.target_settings()).await?;
        let staging = match self.staging_conn.as_deref() {
            Some(s) if self.separate_staging() => {
                open(s, "staging", &self.staging_settings()).await?
            }
            _ => target.clone(),
        };
        Ok((target, staging))
    }
}

/// Publishes the pool gauges (`pool_*{pool}`) every few seconds while the pool is open.
pub fn spawn_pool_metrics(db: &Database, pool_name: &'static str) {
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
