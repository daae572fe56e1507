//! `cdc-sink verify`: compares one table on two databases (east/west, source/target).
//!
//! Both sides are cut into the same key buckets (ranges of an integer key, hash buckets
//! otherwise); per bucket we compare the row count and an order-independent sum of row hashes.
//! Only differing buckets are read row by row to name missing, extra and changed keys. Each
//! check reads the two sides at slightly different moments, so a table under writes is judged
//! by [`watch`]: in sync for N checks in a row.

use crate::config::parse_duration;
use crate::ident::{parse_dotted, Ident};
use crate::metrics as m;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Rows read per side, over all differing buckets, before the report settles for "at least".
const MAX_DIFF_ROWS: i64 = 200_000;
/// Rows per bucket the bucket count aims at.
const ROWS_PER_BUCKET: i64 = 2_000;
const MAX_BUCKETS: i64 = 1024;

/// Flags of `cdc-sink verify`.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    /// First database URL (e.g. east, or the changefeed source).
    #[arg(long = "source", env = "CDC_SINK_VERIFY_SOURCE")]
    pub source: String,
    /// Second database URL (e.g. west, or the sink's target).
    #[arg(long = "target", env = "CDC_SINK_VERIFY_TARGET")]
    pub target: String,
    /// Table as db.schema.table (the database overrides the URLs'), schema.table or table.
    #[arg(long = "table", default_value = "kv.public.kv")]
    pub table: String,
    /// Check repeatedly at this interval until --clean checks in a row find no difference.
    #[arg(long = "watch", value_parser = parse_duration)]
    pub watch: Option<Duration>,
    /// Consecutive clean checks that end --watch successfully.
    #[arg(long = "clean", default_value_t = 3)]
    pub clean: u32,
    /// Give up watching after this long.
    #[arg(long = "timeout", default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Columns to leave out of the comparison (comma-separated).
    #[arg(long = "ignore-columns", value_delimiter = ',')]
    pub ignore_columns: Vec<String>,
    /// Divergent keys to list per kind.
    #[arg(long = "sample", default_value_t = 5)]
    pub sample: usize,
    /// One JSON report per check on standard output.
    #[arg(long = "json")]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Config(String),
    #[error("could not connect to the {side} database")]
    Connect {
        side: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not {what} on the {side} database")]
    Sql {
        what: &'static str,
        side: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("table {table} does not exist on the {side} database")]
    NoTable { table: String, side: &'static str },
    #[error("table {table} has no primary key on the {side} database")]
    NoKey { table: String, side: &'static str },
    #[error("the primary keys of {0} differ between the two databases")]
    KeyMismatch(String),
}

/// A table named as `db.schema.table`, `schema.table` or `table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    pub database: Option<String>,
    pub schema: String,
    pub name: String,
}

impl TableRef {
    pub fn parse(s: &str) -> Result<TableRef, VerifyError> {
        let parts =
            parse_dotted(s.trim()).map_err(|e| VerifyError::Config(format!("table: {e}")))?;
        let raw: Vec<String> = parts.iter().map(|p| p.raw().to_string()).collect();
        let (database, schema, name) = match raw.as_slice() {
            [t] => (None, "public".to_string(), t.clone()),
            [s, t] => (None, s.clone(), t.clone()),
            [d, s, t] => (Some(d.clone()), s.clone(), t.clone()),
            _ => {
                return Err(VerifyError::Config(format!(
                    "table {s:?} has too many parts"
                )))
            }
        };
        Ok(TableRef {
            database,
            schema,
            name,
        })
    }

    fn quoted(&self) -> String {
        format!(
            "{}.{}",
            Ident::new(self.schema.clone()).quoted(),
            Ident::new(self.name.clone()).quoted()
        )
    }
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(d) = &self.database {
            write!(f, "{d}.")?;
        }
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// How a key differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// In the source, not in the target.
    Missing,
    /// In the target, not in the source.
    Extra,
    /// In both, with different values.
    Changed,
}

/// One comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub table: String,
    pub source_rows: i64,
    pub target_rows: i64,
    pub buckets: i64,
    pub differing_buckets: usize,
    pub missing: u64,
    pub extra: u64,
    pub changed: u64,
    /// False when too many rows differ to read them all: the counts are then lower bounds.
    pub exact: bool,
    /// A few divergent keys per kind, as PostgreSQL row text, e.g. `(42)`.
    pub samples: Vec<(DiffKind, String)>,
    /// Columns compared (after --ignore-columns) and those present on one side only.
    pub columns: Vec<String>,
    pub only_in_source: Vec<String>,
    pub only_in_target: Vec<String>,
    pub elapsed_seconds: f64,
}

impl Report {
    pub fn in_sync(&self) -> bool {
        self.differing_buckets == 0
            && self.source_rows == self.target_rows
            && self.missing + self.extra + self.changed == 0
    }

    pub fn divergent(&self) -> u64 {
        self.missing + self.extra + self.changed
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: source {} rows, target {} rows; ",
            self.table, self.source_rows, self.target_rows
        )?;
        if self.in_sync() {
            write!(f, "in sync ({} key buckets match)", self.buckets)?;
        } else {
            let bound = if self.exact { "" } else { "at least " };
            write!(
                f,
                "{} of {} key buckets differ: {bound}{} missing, {bound}{} extra, {bound}{} changed",
                self.differing_buckets, self.buckets, self.missing, self.extra, self.changed
            )?;
            for (kind, key) in &self.samples {
                write!(f, "\n  {kind:?} {key}")?;
            }
        }
        if !self.only_in_source.is_empty() || !self.only_in_target.is_empty() {
            write!(
                f,
                "\n  columns only in source {:?}, only in target {:?} (not compared)",
                self.only_in_source, self.only_in_target
            )?;
        }
        Ok(())
    }
}

/// Options of one comparison.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    pub ignore_columns: Vec<String>,
    /// Divergent keys to list per kind.
    pub sample: usize,
}

/// What a table looks like on one side.
struct Layout {
    columns: Vec<String>,
    key: Vec<String>,
    /// The key is one integer column: buckets are key ranges.
    integer_key: bool,
}

async fn layout(
    pool: &PgPool,
    table: &TableRef,
    side: &'static str,
) -> Result<Layout, VerifyError> {
    let sql_err = |what| move |source| VerifyError::Sql { what, side, source };
    let rel: Option<i64> = sqlx::query_scalar("SELECT to_regclass($1)::oid::int8")
        .bind(table.quoted())
        .fetch_one(pool)
        .await
        .map_err(sql_err("look up the table"))?;
    let Some(oid) = rel else {
        return Err(VerifyError::NoTable {
            table: table.to_string(),
            side,
        });
    };
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::int8::oid AND attnum > 0 \
         AND NOT attisdropped ORDER BY attname",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(sql_err("read the columns"))?;
    let key: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, NULL) FROM pg_index i \
         CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
         WHERE i.indrelid = $1::int8::oid AND i.indisprimary ORDER BY k.n",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(sql_err("read the primary key"))?;
    if key.is_empty() {
        return Err(VerifyError::NoKey {
            table: table.to_string(),
            side,
        });
    }
    let integer_key =
        key.len() == 1 && matches!(key[0].1.as_str(), "bigint" | "integer" | "smallint");
    Ok(Layout {
        columns,
        key: key.into_iter().map(|k| k.0).collect(),
        integer_key,
    })
}

/// Opens a small pool for one side; `database` overrides the URL's.
pub async fn connect(
    url: &str,
    database: Option<&str>,
    side: &'static str,
) -> Result<PgPool, VerifyError> {
    let settings = crate::target::PoolSettings {
        max_connections: 2,
        max_lifetime: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(600),
        idle_in_transaction: Duration::from_secs(600),
    };
    let mut opts: PgConnectOptions = crate::target::connect_options(url, &settings)
        .map_err(|e| VerifyError::Config(format!("{side} url: {e}")))?
        .application_name("cdc-sink verify")
        // Row text (timestamps, floats) must print the same on both sides.
        .options([
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO"),
            ("extra_float_digits", "1"),
        ]);
    if let Some(d) = database {
        opts = opts.database(d);
    }
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(|source| VerifyError::Connect { side, source })
}

/// Compares `table` on the two pools.
pub async fn compare(
    source: &PgPool,
    target: &PgPool,
    table: &TableRef,
    opts: &CompareOptions,
) -> Result<Report, VerifyError> {
    let began = Instant::now();
    let (ls, lt) = tokio::try_join!(
        layout(source, table, "source"),
        layout(target, table, "target")
    )?;
    if ls.key != lt.key {
        return Err(VerifyError::KeyMismatch(table.to_string()));
    }
    let ignored = |c: &String| opts.ignore_columns.iter().any(|i| i == c);
    let cs: BTreeSet<&String> = ls.columns.iter().filter(|c| !ignored(c)).collect();
    let ct: BTreeSet<&String> = lt.columns.iter().filter(|c| !ignored(c)).collect();
    let columns: Vec<String> = cs.intersection(&ct).map(|c| (*c).clone()).collect();
    let only_in_source = cs.difference(&ct).map(|c| (*c).clone()).collect();
    let only_in_target = ct.difference(&cs).map(|c| (*c).clone()).collect();
    let quote = |c: &String| Ident::new(c.clone()).quoted();
    let row_text = format!(
        "ROW({})::text",
        columns.iter().map(quote).collect::<Vec<_>>().join(", ")
    );
    let key_text = format!(
        "ROW({})::text",
        ls.key.iter().map(quote).collect::<Vec<_>>().join(", ")
    );
    let t = table.quoted();
    let integer_key = ls.integer_key && lt.integer_key;

    // Bucket count and (integer keys) the key range, from both sides so they agree.
    let stats_sql = if integer_key {
        format!(
            "SELECT count(*), min({k})::int8, max({k})::int8 FROM {t}",
            k = quote(&ls.key[0])
        )
    } else {
        format!("SELECT count(*), NULL::int8, NULL::int8 FROM {t}")
    };
    let stats = |pool: &PgPool, side: &'static str| {
        let sql = stats_sql.clone();
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (i64, Option<i64>, Option<i64>)>(&sql)
                .fetch_one(&pool)
                .await
                .map_err(|source| VerifyError::Sql {
                    what: "count rows",
                    side,
                    source,
                })
        }
    };
    let (ss, st) = tokio::try_join!(stats(source, "source"), stats(target, "target"))?;
    let buckets = (ss.0.max(st.0) / ROWS_PER_BUCKET + 1).clamp(1, MAX_BUCKETS);
    let bucket_expr = match (
        integer_key,
        ss.1.into_iter().chain(st.1).min(),
        ss.2.into_iter().chain(st.2).max(),
    ) {
        (true, Some(lo), Some(hi)) => {
            let width = (i128::from(hi) - i128::from(lo) + 1).max(1);
            format!(
                "least(floor(({k}::numeric - ({lo})) * {buckets} / {width})::int8, {last})",
                k = quote(&ls.key[0]),
                last = buckets - 1
            )
        }
        _ => format!("(abs(hashtext({key_text})::int8) % {buckets})"),
    };

    // Per bucket: count and two halves of the summed md5s (sums do not depend on row order).
    let bucket_sql = format!(
        "SELECT b, count(*), sum(('x' || substr(h, 1, 16))::bit(64)::int8::numeric)::text, \
         sum(('x' || substr(h, 17, 16))::bit(64)::int8::numeric)::text \
         FROM (SELECT {bucket_expr} AS b, md5({row_text}) AS h FROM {t}) AS r GROUP BY b"
    );
    let sums = |pool: &PgPool, side: &'static str| {
        let sql = bucket_sql.clone();
        let pool = pool.clone();
        async move {
            let rows: Vec<(i64, i64, String, String)> = sqlx::query_as(&sql)
                .fetch_all(&pool)
                .await
                .map_err(|source| VerifyError::Sql {
                    what: "hash key buckets",
                    side,
                    source,
                })?;
            Ok::<_, VerifyError>(
                rows.into_iter()
                    .map(|(b, n, h1, h2)| (b, (n, h1, h2)))
                    .collect::<HashMap<_, _>>(),
            )
        }
    };
    let (bs, bt) = tokio::try_join!(sums(source, "source"), sums(target, "target"))?;
    let mut differing: Vec<i64> = bs
        .keys()
        .chain(bt.keys())
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|b| bs.get(b) != bt.get(b))
        .collect();
    differing.sort_unstable();

    let mut report = Report {
        table: table.to_string(),
        source_rows: bs.values().map(|v| v.0).sum(),
        target_rows: bt.values().map(|v| v.0).sum(),
        buckets,
        differing_buckets: differing.len(),
        missing: 0,
        extra: 0,
        changed: 0,
        exact: true,
        samples: Vec::new(),
        columns,
        only_in_source,
        only_in_target,
        elapsed_seconds: 0.0,
    };
    if !differing.is_empty() {
        let key_order = if integer_key {
            quote(&ls.key[0])
        } else {
            key_text.clone()
        };
        let rows_sql = format!(
            "SELECT {key_text}, md5({row_text}) FROM {t} WHERE {bucket_expr} = ANY($1) \
             ORDER BY {key_order} LIMIT {}",
            MAX_DIFF_ROWS + 1
        );
        let rows = |pool: &PgPool, side: &'static str| {
            let sql = rows_sql.clone();
            let pool = pool.clone();
            let differing = differing.clone();
            async move {
                sqlx::query_as::<_, (String, String)>(&sql)
                    .bind(&differing)
                    .fetch_all(&pool)
                    .await
                    .map_err(|source| VerifyError::Sql {
                        what: "read differing rows",
                        side,
                        source,
                    })
            }
        };
        let (rs, rt) = tokio::try_join!(rows(source, "source"), rows(target, "target"))?;
        report.exact = rs.len() as i64 <= MAX_DIFF_ROWS && rt.len() as i64 <= MAX_DIFF_ROWS;
        // Keep the source's key order for samples.
        let target_rows: HashMap<&str, &str> =
            rt.iter().map(|(k, h)| (k.as_str(), h.as_str())).collect();
        let source_keys: HashMap<&str, &str> =
            rs.iter().map(|(k, h)| (k.as_str(), h.as_str())).collect();
        let mut samples: BTreeMap<u8, Vec<(DiffKind, String)>> = BTreeMap::new();
        let mut note = |kind: DiffKind, key: &str, counter: &mut u64| {
            *counter += 1;
            let list = samples.entry(kind as u8).or_default();
            if list.len() < opts.sample {
                list.push((kind, key.to_string()));
            }
        };
        for (k, h) in &rs {
            match target_rows.get(k.as_str()) {
                None => note(DiffKind::Missing, k, &mut report.missing),
                Some(th) if th != h => note(DiffKind::Changed, k, &mut report.changed),
                Some(_) => {}
            }
        }
        for (k, _) in &rt {
            if !source_keys.contains_key(k.as_str()) {
                note(DiffKind::Extra, k, &mut report.extra);
            }
        }
        report.samples = samples.into_values().flatten().collect();
    }
    report.elapsed_seconds = began.elapsed().as_secs_f64();
    metrics::gauge!(m::VERIFY_DIVERGENT_ROWS, m::LABEL_TABLE => report.table.clone())
        .set(report.divergent() as f64);
    Ok(report)
}

/// How a watch ended.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WatchOutcome {
    pub checks: u32,
    /// Consecutive clean checks at the end.
    pub clean: u32,
    pub in_sync: bool,
    pub last: Option<Report>,
}

/// Compares every `interval` until `clean` consecutive checks find no difference (then
/// `in_sync`), `timeout` passes or `cancel` fires. `on_report` sees each report with the
/// current run of clean checks.
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    source: &PgPool,
    target: &PgPool,
    table: &TableRef,
    opts: &CompareOptions,
    interval: Duration,
    clean: u32,
    timeout: Duration,
    cancel: CancellationToken,
    mut on_report: impl FnMut(&Report, u32),
) -> Result<WatchOutcome, VerifyError> {
    let deadline = Instant::now() + timeout;
    let mut outcome = WatchOutcome {
        checks: 0,
        clean: 0,
        in_sync: false,
        last: None,
    };
    loop {
        let report = compare(source, target, table, opts).await?;
        outcome.checks += 1;
        outcome.clean = if report.in_sync() {
            outcome.clean + 1
        } else {
            0
        };
        metrics::gauge!(m::VERIFY_CLEAN_CHECKS, m::LABEL_TABLE => report.table.clone())
            .set(f64::from(outcome.clean));
        on_report(&report, outcome.clean);
        outcome.last = Some(report);
        if outcome.clean >= clean.max(1) {
            outcome.in_sync = true;
            return Ok(outcome);
        }
        if Instant::now() + interval > deadline {
            return Ok(outcome);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(outcome),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo spawns these on the multi-threaded runtime.
    #[allow(dead_code)]
    fn futures_are_send(p: &'static PgPool, t: &'static TableRef, o: &'static CompareOptions) {
        fn is_send<T: Send>(_: T) {}
        is_send(compare(p, p, t, o));
        is_send(connect("", None, "source"));
        is_send(watch(
            p,
            p,
            t,
            o,
            Duration::ZERO,
            1,
            Duration::ZERO,
            CancellationToken::new(),
            |_, _| {},
        ));
    }

    #[test]
    fn table_names_parse_and_reports_print() {
        let t = TableRef::parse("kv.public.kv").expect("ok");
        assert_eq!(t.database.as_deref(), Some("kv"));
        assert_eq!(t.quoted(), "\"public\".\"kv\"");
        assert_eq!(TableRef::parse("t").expect("ok").schema, "public");
        assert!(TableRef::parse("a.b.c.d").is_err());
        let mut r = Report {
            table: "kv.public.kv".into(),
            source_rows: 3,
            target_rows: 3,
            buckets: 1,
            differing_buckets: 0,
            missing: 0,
            extra: 0,
            changed: 0,
            exact: true,
            samples: vec![],
            columns: vec!["k".into(), "v".into()],
            only_in_source: vec![],
            only_in_target: vec![],
            elapsed_seconds: 0.0,
        };
        assert!(r.in_sync());
        assert!(r.to_string().contains("in sync"));
        r.differing_buckets = 1;
        r.missing = 1;
        r.samples = vec![(DiffKind::Missing, "(7)".into())];
        assert!(!r.in_sync());
        assert!(r.to_string().contains("Missing (7)"), "{r}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["samples"][0][0], "missing");
    }
}
