//! The parts of `cdc-sink bench`: the rows, the changefeed bodies that carry them, the raw sqlx
//! baseline, and the report. The command in `cli::bench` runs them against our server.

pub mod dispatch;

pub use dispatch::{bench_dispatch, DispatchRate, USERSCRIPT};

use crate::hlc::Hlc;
use bytes::Bytes;
use serde::Serialize;
use sqlx::PgPool;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("baseline write failed")]
    Sql(#[from] sqlx::Error),
}

/// The kv table every path writes: a key, a value and a version for compare-and-set.
pub const KV_DDL: &str =
    "CREATE TABLE IF NOT EXISTS public.kv (k INT8 PRIMARY KEY, v BYTEA NOT NULL, ts TIMESTAMPTZ NOT NULL)";

/// Deterministic rows: key `i`, `value_bytes` pseudo-random bytes, a version time.
pub struct Rows {
    pub keys: Vec<i64>,
    pub values: Vec<Vec<u8>>,
    pub versions: Vec<String>,
    pub times: Vec<Hlc>,
}

impl Rows {
    /// `n` rows, one source timestamp per 100 of them, 1 ms apart: 100,000 rows per second of
    /// source time, a busy changefeed.
    pub fn generate(n: usize, value_bytes: usize) -> Rows {
        Rows::generate_at(n, value_bytes, 100_000.0)
    }

    /// `n` rows written at `per_second` rows per second of source time (100 per timestamp).
    pub fn generate_at(n: usize, value_bytes: usize, per_second: f64) -> Rows {
        let step = (100.0 / per_second.max(1e-3) * 1e9) as i64;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            // xorshift: reproducible, no dependency, good enough for incompressible values
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = 1_700_000_000_000_000_000i64;
        let mut rows = Rows {
            keys: Vec::with_capacity(n),
            values: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            times: Vec::with_capacity(n),
        };
        for i in 0..n {
            rows.keys.push(i as i64);
            rows.values
                .push((0..value_bytes).map(|_| next() as u8).collect());
            // One source timestamp per 100 rows: a source transaction of 100 rows.
            let t = Hlc::new(base + (i / 100) as i64 * step, (i % 100) as i32);
            rows.times.push(t);
            rows.versions.push(format!(
                "2023-11-14T22:13:{:02}.{:06}Z",
                (i / 1_000_000) % 60,
                i % 1_000_000
            ));
        }
        rows
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The last row's time: the resolved timestamp that completes the run.
    pub fn last_time(&self) -> Hlc {
        self.times.last().copied().unwrap_or(Hlc::ZERO)
    }

    /// Rows whose time is after `t`: what a checkpoint at `t` has still to apply.
    pub fn after(&self, t: Hlc) -> usize {
        self.len() - self.times.partition_point(|x| *x <= t)
    }

    /// Webhook bodies of about `batch_bytes` each, in CockroachDB's format, table `kv`, with
    /// the number of rows each carries.
    pub fn webhook_bodies(&self, batch_bytes: usize) -> Vec<(Bytes, usize)> {
        let mut bodies = Vec::new();
        let mut elements = String::new();
        let mut n = 0usize;
        let mut hex = String::new();
        let flush = |elements: &mut String, n: &mut usize, bodies: &mut Vec<(Bytes, usize)>| {
            if *n > 0 {
                let body = format!("{{\"payload\":[{elements}],\"length\":{n}}}");
                bodies.push((Bytes::from(body), *n));
                elements.clear();
                *n = 0;
            }
        };
        for i in 0..self.len() {
            hex.clear();
            for b in &self.values[i] {
                let _ = write!(hex, "{b:02x}");
            }
            if n > 0 {
                elements.push(',');
            }
            let _ = write!(
                elements,
                "{{\"after\":{{\"k\":{k},\"ts\":\"{ts}\",\"v\":\"\\\\x{hex}\"}},\"key\":[{k}],\"topic\":\"kv\",\"updated\":\"{u}\"}}",
                k = self.keys[i],
                ts = self.versions[i],
                u = self.times[i]
            );
            n += 1;
            if elements.len() >= batch_bytes {
                flush(&mut elements, &mut n, &mut bodies);
            }
        }
        flush(&mut elements, &mut n, &mut bodies);
        bodies
    }
}

/// The baseline: the same rows written by raw sqlx, 1,000 per compare-and-set upsert statement
/// with native binary parameters, on one connection. Nothing we do can beat it by much.
pub async fn baseline(pool: &PgPool, rows: &Rows) -> Result<Duration, BenchError> {
    let sql = "INSERT INTO public.kv AS x (k, v, ts) \
SELECT * FROM unnest($1::INT8[], $2::BYTEA[], $3::TEXT[]::TIMESTAMPTZ[]) \
ON CONFLICT (k) DO UPDATE SET v = excluded.v, ts = excluded.ts WHERE x.ts < excluded.ts";
    let mut conn = pool.acquire().await?;
    let started = Instant::now();
    for chunk in (0..rows.len()).collect::<Vec<_>>().chunks(1000) {
        let (a, b) = (chunk[0], chunk[chunk.len() - 1] + 1);
        sqlx::query(sql)
            .bind(&rows.keys[a..b])
            .bind(&rows.values[a..b])
            .bind(&rows.versions[a..b])
            .execute(&mut *conn)
            .await?;
    }
    Ok(started.elapsed())
}

/// One measured path.
#[derive(Clone, Debug, Serialize)]
pub struct Measure {
    pub name: &'static str,
    pub seconds: f64,
    pub rows_per_s: f64,
}

impl Measure {
    pub fn new(name: &'static str, rows: usize, took: Duration) -> Measure {
        let seconds = took.as_secs_f64();
        Measure {
            name,
            seconds,
            rows_per_s: rows as f64 / seconds.max(1e-9),
        }
    }
}

/// A table's size and tuples after a run, from PostgreSQL's statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableStats {
    /// `pg_total_relation_size`: heap, indexes and TOAST.
    pub bytes: i64,
    pub live_tuples: i64,
    pub dead_tuples: i64,
    pub autovacuums: i64,
}

/// The statistics of `table` (a regclass spelling: `public.kv`, `_cdc_sink."x"`); zeros when
/// the table does not exist. Tuples are counted by scanning the table (`pgstattuple`): the
/// cumulative statistics lag behind the backends that wrote them.
pub async fn table_stats(pool: &PgPool, table: &str) -> Result<TableStats, BenchError> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        .execute(pool)
        .await?;
    let row: Option<(i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT pg_total_relation_size(c.oid), t.tuple_count, t.dead_tuple_count, \
coalesce(s.autovacuum_count, 0) FROM pg_class c CROSS JOIN LATERAL pgstattuple(c.oid) AS t \
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid WHERE c.oid = to_regclass($1)",
    )
    .bind(table)
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(
            |(bytes, live_tuples, dead_tuples, autovacuums)| TableStats {
                bytes,
                live_tuples,
                dead_tuples,
                autovacuums,
            },
        )
        .unwrap_or_default())
}

/// One point of the scaling curve: the baseline and the consistent path at one size.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRow {
    pub rows: usize,
    pub baseline_rows_per_s: f64,
    pub consistent_rows_per_s: f64,
    /// Consistent over baseline at this size.
    pub ratio: f64,
    /// Consistent rows/s over that of the curve's first (smallest) size.
    pub relative: f64,
    pub staging: TableStats,
    pub target: TableStats,
}

/// One look at a draining backlog.
#[derive(Clone, Debug, Serialize)]
pub struct DrainSample {
    /// Since the resolved timestamp was acknowledged.
    pub seconds: f64,
    /// Staged rows the committed checkpoint has not reached yet.
    pub remaining_rows: usize,
    /// Source time between the committed checkpoint and the resolved timestamp.
    pub lag_seconds: f64,
    /// The sink process's resident memory.
    pub rss_mib: f64,
}

/// A backlog staged with no resolved timestamp, then drained by one.
#[derive(Clone, Debug, Serialize)]
pub struct Drain {
    pub rows: usize,
    /// Source time the backlog spans (its rows were written at the lag measurement's rate).
    pub span_seconds: f64,
    pub seconds: f64,
    pub rows_per_s: f64,
    /// The raw baseline at the same size, in the same run.
    pub baseline_rows_per_s: f64,
    pub ratio: f64,
    /// The sink process's largest resident memory while draining, and over its whole life
    /// (staging included).
    pub peak_rss_mib: f64,
    pub hwm_rss_mib: f64,
    pub samples: Vec<DrainSample>,
}

/// Replication lag of `cdc-sink demo` (two clusters, changefeed emulators, a sink each way).
#[derive(Clone, Debug, Serialize)]
pub struct Lag {
    /// Writes per second asked of each side's workload, and what both sides achieved together.
    pub rate_per_side: f64,
    pub rows_per_s: f64,
    pub seconds: f64,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub converged: bool,
}

/// The one-line JSON summary of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub rows: usize,
    pub value_bytes: usize,
    pub batch_bytes: usize,
    pub requests: usize,
    pub baseline_rows_per_s: f64,
    pub immediate_rows_per_s: f64,
    pub best_effort_rows_per_s: f64,
    pub consistent_rows_per_s: f64,
    pub immediate_ratio: f64,
    pub best_effort_ratio: f64,
    pub consistent_ratio: f64,
    pub userscript_rows_per_s: f64,
    pub userscript_ratio: f64,
    /// Share of the consistent path's throughput the userscript costs (0.05 = 5 %).
    pub userscript_cost: f64,
    /// `dispatch` documents per second on one JavaScript thread, in isolation (per second of
    /// that thread's CPU time).
    pub dispatch_docs_per_s: f64,
    /// The same, counting the caller's side of each batch too (wall or process CPU time).
    pub dispatch_with_caller_docs_per_s: f64,
    /// Alternated runs of the consistent and userscript paths; the best of each is reported.
    pub repeat: usize,
    /// Drain rate over the baseline at the same size (`None`: not measured).
    pub drain_ratio: Option<f64>,
    pub drain: Option<Drain>,
    /// The demo's p99 replication lag (`None`: not measured).
    pub lag_p99_seconds: Option<f64>,
    pub lag: Option<Lag>,
    pub scaling: Vec<ScaleRow>,
}

impl Summary {
    pub fn new(
        rows: usize,
        value_bytes: usize,
        batch_bytes: usize,
        requests: usize,
        measures: &[Measure],
        dispatch: DispatchRate,
    ) -> Summary {
        let get = |n: &str| {
            measures
                .iter()
                .find(|m| m.name == n)
                .map(|m| m.rows_per_s)
                .unwrap_or(0.0)
        };
        let base = get("baseline");
        let ratio = |v: f64| if base > 0.0 { v / base } else { 0.0 };
        Summary {
            rows,
            value_bytes,
            batch_bytes,
            requests,
            baseline_rows_per_s: base,
            immediate_rows_per_s: get("immediate"),
            best_effort_rows_per_s: get("best_effort"),
            consistent_rows_per_s: get("consistent"),
            immediate_ratio: ratio(get("immediate")),
            best_effort_ratio: ratio(get("best_effort")),
            consistent_ratio: ratio(get("consistent")),
            userscript_rows_per_s: get("userscript"),
            userscript_ratio: ratio(get("userscript")),
            userscript_cost: if get("consistent") > 0.0 && get("userscript") > 0.0 {
                1.0 - get("userscript") / get("consistent")
            } else {
                0.0
            },
            dispatch_docs_per_s: dispatch.per_thread,
            dispatch_with_caller_docs_per_s: dispatch.with_caller,
            repeat: 1,
            drain_ratio: None,
            drain: None,
            lag_p99_seconds: None,
            lag: None,
            scaling: Vec::new(),
        }
    }

    pub fn set_drain(&mut self, drain: Drain) {
        self.drain_ratio = Some(drain.ratio);
        self.drain = Some(drain);
    }

    pub fn set_lag(&mut self, lag: Lag) {
        self.lag_p99_seconds = Some(lag.p99_seconds);
        self.lag = Some(lag);
    }

    /// A human-readable table.
    pub fn table(&self, measures: &[Measure]) -> String {
        let mut out = format!(
            "{} rows of {} bytes, {} webhook requests of ~{} KiB (HTTP/2 + TLS)\n",
            self.rows,
            self.value_bytes,
            self.requests,
            self.batch_bytes / 1024
        );
        out.push_str(&format!(
            "{:<12} {:>10} {:>14} {:>8}\n",
            "path", "seconds", "rows/s", "ratio"
        ));
        let base = self.baseline_rows_per_s;
        for m in measures {
            let ratio = if base > 0.0 { m.rows_per_s / base } else { 0.0 };
            out.push_str(&format!(
                "{:<12} {:>10.3} {:>14.0} {:>8.2}\n",
                m.name, m.seconds, m.rows_per_s, ratio
            ));
        }
        if self.repeat > 1 {
            out.push_str(&format!(
                "consistent and userscript: best of {} alternated runs each\n",
                self.repeat
            ));
        }
        out.push_str(&format!(
            "userscript cost: {:.1} % of the consistent path; dispatch alone: {:.0} docs/s per JS thread ({:.0} with the caller's side)\n",
            self.userscript_cost * 100.0,
            self.dispatch_docs_per_s,
            self.dispatch_with_caller_docs_per_s
        ));
        if let Some(d) = &self.drain {
            out.push_str(&format!(
                "\nbacklog drain: {} rows ({:.0} s of source time) staged, then one resolved timestamp\n\
drained in {:.2} s: {:.0} rows/s, {:.2} of the baseline at that size ({:.0} rows/s); sink RSS peak {:.0} MiB while draining, {:.0} MiB over its life\n",
                d.rows, d.span_seconds, d.seconds, d.rows_per_s, d.ratio, d.baseline_rows_per_s, d.peak_rss_mib, d.hwm_rss_mib
            ));
            out.push_str(&format!(
                "{:>8} {:>14} {:>12} {:>8}\n",
                "seconds", "rows left", "lag (s)", "RSS MiB"
            ));
            for s in &d.samples {
                out.push_str(&format!(
                    "{:>8.1} {:>14} {:>12.1} {:>8.0}\n",
                    s.seconds, s.remaining_rows, s.lag_seconds, s.rss_mib
                ));
            }
        }
        if !self.scaling.is_empty() {
            out.push_str(
                "\nscaling (consistent path; sizes after the run, before any manual vacuum)\n",
            );
            out.push_str(&format!(
                "{:>9} {:>12} {:>12} {:>6} {:>9} {:>11} {:>11} {:>10} {:>11} {:>10}\n",
                "rows",
                "baseline/s",
                "consistent/s",
                "ratio",
                "relative",
                "staging MiB",
                "staging dead",
                "target MiB",
                "target dead",
                "autovacuum"
            ));
            for r in &self.scaling {
                out.push_str(&format!(
                    "{:>9} {:>12.0} {:>12.0} {:>6.2} {:>9.2} {:>11.1} {:>11} {:>10.1} {:>11} {:>10}\n",
                    r.rows,
                    r.baseline_rows_per_s,
                    r.consistent_rows_per_s,
                    r.ratio,
                    r.relative,
                    mib(r.staging.bytes),
                    r.staging.dead_tuples,
                    mib(r.target.bytes),
                    r.target.dead_tuples,
                    r.staging.autovacuums + r.target.autovacuums
                ));
            }
        }
        if let Some(l) = &self.lag {
            out.push_str(&format!(
                "\nreplication lag (cdc-sink demo, {:.0} writes/s asked per side, {:.0} rows/s done in all, resolved every 1 s, {:.0} s): p50 {:.2} s, p99 {:.2} s{}\n",
                l.rate_per_side,
                l.rows_per_s,
                l.seconds,
                l.p50_seconds,
                l.p99_seconds,
                if l.converged { "" } else { " (did NOT converge)" }
            ));
        }
        out
    }
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_changefeed_batches_that_decode_and_carry_every_row() {
        use crate::source::webhook::{decode, parse_path, DecodeLimits, Payload};
        let rows = Rows::generate(250, 16);
        let bodies = rows.webhook_bodies(4096);
        assert!(bodies.len() > 1, "split by size");
        let route = parse_path("/kv/public").unwrap();
        let mut seen = 0;
        for (b, _) in &bodies {
            let Payload::Mutations(m) = decode(&route, b, &(), &DecodeLimits::default()).unwrap()
            else {
                panic!("mutations expected")
            };
            seen += m.len();
        }
        assert_eq!(seen, 250);
        assert!(
            rows.times.windows(2).all(|w| w[0] < w[1]),
            "strictly increasing times"
        );
    }
}
