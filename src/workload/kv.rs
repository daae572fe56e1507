//! The kv workload, write-only: `INSERT … ON CONFLICT (k) DO UPDATE` of one row per operation,
//! keys sequential from `--write-seq` or random, values of `--value-bytes` random bytes, paced
//! to `--max-rate` over `--concurrency` connections.

use super::{Histogram, WorkloadError};
use crate::config::parse_duration;
use crate::ident::{parse_dotted, Ident};
use crate::metrics as m;
use rand::{Rng, RngCore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Flags of `cdc-sink workload kv` (spelled as `cockroach workload run kv` spells them).
#[derive(clap::Args, Debug, Clone)]
pub struct KvArgs {
    /// Database URL.
    #[arg(long = "conn", env = "CDC_SINK_WORKLOAD_CONN")]
    pub(crate) conn: String,
    /// How long to run; 0 runs until interrupted.
    #[arg(long = "duration", default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Operations per second over all workers; 0 is unlimited.
    #[arg(long = "max-rate", default_value_t = 0.0)]
    pub max_rate: f64,
    /// Write keys in order, starting at --write-seq (otherwise random keys).
    #[arg(long = "sequential")]
    pub sequential: bool,
    /// First sequential key, as `S123`, `R123` or `123`.
    #[arg(long = "write-seq", default_value = "0", value_parser = parse_write_seq)]
    pub write_seq: i64,
    /// Bytes per value.
    #[arg(long = "value-bytes", default_value_t = 1)]
    pub value_bytes: usize,
    /// Concurrent workers (and connections).
    #[arg(long = "concurrency", default_value_t = 8)]
    pub concurrency: usize,
    /// Table to write, as db.schema.table (the database is created if missing).
    #[arg(long = "table", default_value = "kv.public.kv")]
    pub table: String,
}

impl KvArgs {
    pub fn new(conn: &str) -> KvArgs {
        KvArgs {
            conn: conn.to_string(),
            duration: Duration::from_secs(60),
            max_rate: 0.0,
            sequential: false,
            write_seq: 0,
            value_bytes: 1,
            concurrency: 8,
            table: "kv.public.kv".into(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WorkloadError> {
        let bad = |m: &str| Err(WorkloadError::Config(m.to_string()));
        if self.concurrency == 0 || self.concurrency > 256 {
            return bad("--concurrency must be between 1 and 256");
        }
        if !(self.max_rate >= 0.0 && self.max_rate.is_finite()) {
            return bad("--max-rate must be zero or positive");
        }
        if self.value_bytes > 64 << 20 {
            return bad("--value-bytes must be at most 64MiB");
        }
        if self.write_seq < 0 {
            return bad("--write-seq must not be negative");
        }
        table_parts(&self.table)?;
        Ok(())
    }
}

/// Accepts cockroach's `S<n>`/`R<n>` spellings and a bare number.
pub(crate) fn parse_write_seq(s: &str) -> Result<i64, String> {
    let digits = s.trim().trim_start_matches(['S', 'R', 's', 'r']);
    digits
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| format!("--write-seq {s:?} is not S<n>, R<n> or a number"))
}

fn table_parts(t: &str) -> Result<(Option<String>, String, String), WorkloadError> {
    let parts = parse_dotted(t).map_err(WorkloadError::Table)?;
    let raw: Vec<String> = parts.iter().map(|p| p.raw().to_string()).collect();
    Ok(match raw.as_slice() {
        [t] => (None, "public".into(), t.clone()),
        [s, t] => (None, s.clone(), t.clone()),
        [d, s, t] => (Some(d.clone()), s.clone(), t.clone()),
        _ => {
            return Err(WorkloadError::Config(format!(
                "--table {t:?} has too many parts"
            )))
        }
    })
}

/// One progress report (every second).
#[derive(Clone, Debug)]
pub struct Progress {
    pub(crate) elapsed: Duration,
    pub(crate) errors: u64,
    /// Operations in the last interval, per second.
    pub(crate) ops_per_sec: f64,
    /// Operations since the start, per second.
    pub(crate) ops_per_sec_cum: f64,
    pub(crate) p50: Duration,
    pub(crate) p95: Duration,
    pub(crate) p99: Duration,
    pub(crate) max: Duration,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "{:>7.1}s {:>8} {:>14.1} {:>14.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            self.elapsed.as_secs_f64(),
            self.errors,
            self.ops_per_sec,
            self.ops_per_sec_cum,
            ms(self.p50),
            ms(self.p95),
            ms(self.p99),
            ms(self.max)
        )
    }
}

impl Progress {
    /// The column titles matching [`Progress`]'s `Display`.
    pub(crate) const HEADER: &'static str =
        "_elapsed___errors__ops/sec(inst)___ops/sec(cum)__p50(ms)__p95(ms)__p99(ms)_pMax(ms)";
}

/// The end-of-run summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub ops: u64,
    pub errors: u64,
    pub(crate) elapsed_seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub(crate) p95_ms: f64,
    pub p99_ms: f64,
    pub(crate) max_ms: f64,
    /// Sequential runs: the next unused key (the write seq to continue from).
    pub next_seq: Option<i64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ops, {} errors in {:.1}s: {:.1} ops/s, p50 {:.1}ms, p95 {:.1}ms, p99 {:.1}ms, max {:.1}ms",
            self.ops,
            self.errors,
            self.elapsed_seconds,
            self.ops_per_sec,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

struct Shared {
    next: AtomicU64,
    ops: AtomicU64,
    errors: AtomicU64,
    interval: Mutex<Histogram>,
}

/// Runs the workload until its duration ends or `cancel` fires.
pub async fn run(args: &KvArgs, cancel: CancellationToken) -> Result<Summary, WorkloadError> {
    run_with_progress(args, cancel, |_| {}).await
}

/// [`run`], calling `progress` once a second.
pub async fn run_with_progress(
    args: &KvArgs,
    cancel: CancellationToken,
    mut progress: impl FnMut(&Progress),
) -> Result<Summary, WorkloadError> {
    args.validate()?;
    let pool = open(args).await?;
    let (_, schema, name) = table_parts(&args.table)?;
    let table = format!(
        "{}.{}",
        Ident::new(schema).quoted(),
        Ident::new(name.clone()).quoted()
    );
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (k INT8 PRIMARY KEY, v BYTEA NOT NULL)"
    ))
    .execute(&pool)
    .await
    .map_err(|source| WorkloadError::Sql {
        what: "create the kv table",
        source,
    })?;
    let upsert = format!(
        "INSERT INTO {table} (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
    );
    tracing::info!(table = %args.table, rate = args.max_rate, concurrency = args.concurrency, sequential = args.sequential, "kv workload starting");

    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        interval: Mutex::new(Histogram::default()),
    });
    let start = Instant::now();
    let end = (!args.duration.is_zero()).then(|| start + args.duration);
    let stop = cancel.child_token();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let shared = shared.clone();
        let pool = pool.clone();
        let upsert = upsert.clone();
        let stop = stop.clone();
        let args = args.clone();
        let label = name.clone();
        workers.push(tokio::spawn(async move {
            worker(&args, &pool, &upsert, &shared, start, end, &stop, &label).await
        }));
    }

    let mut total = Histogram::default();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_ops = 0u64;
    let mut last_tick = start;
    let finished = async {
        for w in &mut workers {
            let _ = w.await;
        }
    };
    tokio::pin!(finished);
    loop {
        tokio::select! {
            _ = &mut finished => break,
            _ = tick.tick() => {
                let interval = std::mem::take(&mut *shared.interval.lock().expect("histogram lock"));
                total.merge(&interval);
                let ops = shared.ops.load(Ordering::Relaxed);
                let now = Instant::now();
                let secs = now.duration_since(last_tick).as_secs_f64().max(1e-9);
                progress(&Progress {
                    elapsed: now.duration_since(start),
                    errors: shared.errors.load(Ordering::Relaxed),
                    ops_per_sec: (ops - last_ops) as f64 / secs,
                    ops_per_sec_cum: ops as f64 / now.duration_since(start).as_secs_f64().max(1e-9),
                    p50: interval.quantile(0.5),
                    p95: interval.quantile(0.95),
                    p99: interval.quantile(0.99),
                    max: interval.max(),
                });
                last_ops = ops;
                last_tick = now;
            }
        }
    }
    stop.cancel();
    total.merge(&shared.interval.lock().expect("histogram lock"));
    let elapsed = start.elapsed().as_secs_f64();
    let ops = shared.ops.load(Ordering::Relaxed);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let summary = Summary {
        ops,
        errors: shared.errors.load(Ordering::Relaxed),
        elapsed_seconds: elapsed,
        ops_per_sec: ops as f64 / elapsed.max(1e-9),
        p50_ms: ms(total.quantile(0.5)),
        p95_ms: ms(total.quantile(0.95)),
        p99_ms: ms(total.quantile(0.99)),
        max_ms: ms(total.max()),
        next_seq: args
            .sequential
            .then(|| args.write_seq + (ops + shared.errors.load(Ordering::Relaxed)) as i64),
    };
    tracing::info!(
        ops = summary.ops,
        errors = summary.errors,
        ops_per_sec = summary.ops_per_sec,
        "kv workload done"
    );
    pool.close().await;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    args: &KvArgs,
    pool: &PgPool,
    upsert: &str,
    shared: &Shared,
    start: Instant,
    end: Option<Instant>,
    stop: &CancellationToken,
    table: &str,
) {
    let mut value = vec![0u8; args.value_bytes];
    loop {
        if stop.is_cancelled() {
            return;
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        // Operation i is due at start + i/rate; the schedule ends the run, so sequential keys
        // written are exactly write_seq .. write_seq + ops.
        let due = if args.max_rate > 0.0 {
            start + Duration::from_secs_f64(i as f64 / args.max_rate)
        } else {
            Instant::now()
        };
        if end.is_some_and(|e| due >= e) {
            return;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(due.into()) => {}
        }
        let key = {
            let mut rng = rand::rng();
            rng.fill_bytes(&mut value);
            if args.sequential {
                args.write_seq.saturating_add(i as i64)
            } else {
                rng.random_range(0..i64::MAX)
            }
        };
        let began = Instant::now();
        let result = sqlx::query(upsert)
            .bind(key)
            .bind(&value)
            .execute(pool)
            .await;
        match result {
            Ok(_) => {
                shared.ops.fetch_add(1, Ordering::Relaxed);
                shared
                    .interval
                    .lock()
                    .expect("histogram lock")
                    .record(began.elapsed());
                metrics::counter!(m::WORKLOAD_OPS, m::LABEL_TABLE => table.to_string())
                    .increment(1);
            }
            Err(e) => {
                let n = shared.errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::WORKLOAD_ERRORS, m::LABEL_TABLE => table.to_string())
                    .increment(1);
                // One line per hundred failures is enough to see an outage.
                if n.is_multiple_of(100) {
                    tracing::warn!(error = %crate::error::ErrorChain(&e), errors = n + 1, "kv write failed");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// Connects to the table's database, creating it first if it does not exist.
async fn open(args: &KvArgs) -> Result<PgPool, WorkloadError> {
    let settings = crate::target::PoolSettings {
        max_connections: args.concurrency as u32,
        max_lifetime: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(600),
        idle_in_transaction: Duration::from_secs(60),
    };
    let base: PgConnectOptions = crate::target::connect_options(&args.conn, &settings)
        .map_err(WorkloadError::Conn)?
        .application_name("cdc-sink workload");
    let (db, _, _) = table_parts(&args.table)?;
    let opts = match &db {
        Some(d) if base.get_database() != Some(d.as_str()) => {
            let mut conn = base
                .connect()
                .await
                .map_err(|source| WorkloadError::Connect {
                    what: "--conn".into(),
                    source,
                })?;
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(d)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|source| WorkloadError::Sql {
                        what: "look up the database",
                        source,
                    })?;
            if !exists {
                let create = format!("CREATE DATABASE {}", Ident::new(d.clone()).quoted());
                sqlx::query(&create)
                    .persistent(false)
                    .execute(&mut conn)
                    .await
                    .map_err(|source| WorkloadError::Sql {
                        what: "create the database",
                        source,
                    })?;
                tracing::info!(database = %d, "database created");
            }
            base.database(d)
        }
        _ => base,
    };
    PgPoolOptions::new()
        .max_connections(args.concurrency as u32)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(|source| WorkloadError::Connect {
            what: "the workload database".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo spawns runs on the multi-threaded runtime.
    #[allow(dead_code)]
    fn runs_are_send(args: &'static KvArgs) {
        fn is_send<T: Send>(_: T) {}
        is_send(run(args, CancellationToken::new()));
    }

    #[test]
    fn write_seq_and_table_names_parse() {
        assert_eq!(parse_write_seq("S100"), Ok(100));
        assert_eq!(parse_write_seq("R7"), Ok(7));
        assert_eq!(parse_write_seq("0"), Ok(0));
        assert!(parse_write_seq("X1").is_err());
        assert!(parse_write_seq("S-1").is_err());
        assert_eq!(
            table_parts("kv.public.kv").expect("ok"),
            (Some("kv".into()), "public".into(), "kv".into())
        );
        assert_eq!(
            table_parts("kv").expect("ok"),
            (None, "public".into(), "kv".into())
        );
        let mut a = KvArgs::new("postgres://x/");
        assert!(a.validate().is_ok());
        a.concurrency = 0;
        assert!(a.validate().is_err());
    }
}
