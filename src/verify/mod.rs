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
    pub(crate) source: String,
    /// Second database URL (e.g. west, or the sink's target).
    #[arg(long = "target", env = "CDC_SINK_VERIFY_TARGET")]
    pub(crate) target: String,
    /// Table as db.schema.table (the database overrides the URLs'), schema.table or table.
    #[arg(long = "table", default_value = "kv.public.kv")]
    pub(crate) table: String,
    /// Check repeatedly at this interval until --clean checks in a row find no difference.
    #[arg(long = "watch", value_parser = parse_duration)]
    pub(crate) watch: Option<Duration>,
    /// Consecutive clean checks that end --watch successfully.
    #[arg(long = "clean", default_value_t = 3)]
    pub(crate) clean: u32,
    /// Give up watching after this long.
    #[arg(long = "timeout", default_value = "10m", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
    /// Columns to leave out of the comparison (comma-separated).
    #[arg(long = "ignore-columns", value_delimiter = ',')]
    pub(crate) ignore_columns: Vec<String>,
    /// Divergent keys to list per kind.
    #[arg(long = "sample", default_value_t = 5)]
    pub(crate) sample: usize,
    /// One JSON report per check on standard output.
    #[arg(long = "json")]
    pub(crate) json: bool,
    /// After reporting divergent keys, copy the --from side's version of each (insert,
    /// update or delete) to the other side, through plain SQL (no compare-and-set, no merge):
    /// for failback once writes stopped on one side.
    #[arg(long = "repair", requires = "from")]
    pub(crate) repair: bool,
    /// The authoritative side for --repair.
    #[arg(long = "from", value_enum, requires = "repair")]
    pub(crate) from: Option<Side>,
    /// Keys per repair transaction.
    #[arg(long = "repair-batch", default_value_t = 500)]
    pub(crate) repair_batch: usize,
}

/// One of the two databases.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Target,
}

impl Side {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }

    pub(crate) fn other(self) -> Side {
        match self {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Config(String),
    #[error("invalid table name")]
    TableName(#[source] crate::ident::IdentError),
    #[error("invalid {side} url")]
    Url {
        side: &'static str,
        #[source]
        source: crate::target::TargetError,
    },
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
    pub(crate) database: Option<String>,
    pub(crate) schema: String,
    pub(crate) name: String,
}

impl TableRef {
    pub fn parse(s: &str) -> Result<TableRef, VerifyError> {
        let parts = parse_dotted(s.trim()).map_err(VerifyError::TableName)?;
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
    pub(crate) table: String,
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
    /// Every divergent key found (up to the row limit), as a JSON object of the key columns:
    /// what a repair works on.
    #[serde(skip)]
    pub(crate) keys: Vec<String>,
    /// Columns compared (after --ignore-columns) and those present on one side only.
    pub(crate) columns: Vec<String>,
    pub(crate) only_in_source: Vec<String>,
    pub only_in_target: Vec<String>,
    pub(crate) elapsed_seconds: f64,
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
    /// Generated columns (computed by the database, never written).
    generated: Vec<String>,
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
    let all: Vec<(String, bool)> = sqlx::query_as(
        "SELECT attname::text, attgenerated <> '' FROM pg_attribute \
         WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped ORDER BY attname",
    )
    .bind(oid)
    .fetch_all(pool)
    .await
    .map_err(sql_err("read the columns"))?;
    let columns = all.iter().map(|c| c.0.clone()).collect();
    let generated = all.into_iter().filter(|c| c.1).map(|c| c.0).collect();
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
        generated,
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
        .map_err(|source| VerifyError::Url { side, source })?
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
    let key_json = key_object(&ls.key);
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
        keys: Vec::new(),
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
            "SELECT {key_text}, md5({row_text}), {key_json} FROM {t} WHERE {bucket_expr} = ANY($1) \
             ORDER BY {key_order} LIMIT {}",
            MAX_DIFF_ROWS + 1
        );
        let rows = |pool: &PgPool, side: &'static str| {
            let sql = rows_sql.clone();
            let pool = pool.clone();
            let differing = differing.clone();
            async move {
                sqlx::query_as::<_, (String, String, String)>(&sql)
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
        let target_rows: HashMap<&str, &str> = rt
            .iter()
            .map(|(k, h, _)| (k.as_str(), h.as_str()))
            .collect();
        let source_keys: HashMap<&str, &str> = rs
            .iter()
            .map(|(k, h, _)| (k.as_str(), h.as_str()))
            .collect();
        let mut keys = Vec::new();
        let mut samples: BTreeMap<u8, Vec<(DiffKind, String)>> = BTreeMap::new();
        let mut note = |kind: DiffKind, key: &str, counter: &mut u64| {
            *counter += 1;
            let list = samples.entry(kind as u8).or_default();
            if list.len() < opts.sample {
                list.push((kind, key.to_string()));
            }
        };
        for (k, h, j) in &rs {
            match target_rows.get(k.as_str()) {
                None => note(DiffKind::Missing, k, &mut report.missing),
                Some(th) if th != h => note(DiffKind::Changed, k, &mut report.changed),
                Some(_) => continue,
            }
            keys.push(j.clone());
        }
        for (k, _, j) in &rt {
            if !source_keys.contains_key(k.as_str()) {
                note(DiffKind::Extra, k, &mut report.extra);
                keys.push(j.clone());
            }
        }
        report.keys = keys;
        report.samples = samples.into_values().flatten().collect();
    }
    report.elapsed_seconds = began.elapsed().as_secs_f64();
    metrics::gauge!(m::VERIFY_DIVERGENT_ROWS, m::LABEL_TABLE => report.table.clone())
        .set(report.divergent() as f64);
    Ok(report)
}

/// `jsonb_build_object('k1', "k1", …)::text` over the key columns: a key as JSON, which
/// `jsonb_populate_recordset` turns back into typed values on either side.
fn key_object(key: &[String]) -> String {
    let pairs: Vec<String> = key
        .iter()
        .map(|k| {
            format!(
                "'{}', {}",
                k.replace('\'', "''"),
                Ident::new(k.clone()).quoted()
            )
        })
        .collect();
    format!("jsonb_build_object({})::text", pairs.join(", "))
}

/// What a repair did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RepairReport {
    pub(crate) table: String,
    /// The authoritative side, and the side written.
    pub from: &'static str,
    pub to: &'static str,
    /// Divergent keys handled.
    pub keys: u64,
    /// Rows inserted or updated to the authoritative side's version.
    pub upserted: u64,
    /// Rows deleted because the authoritative side has no row with their key.
    pub deleted: u64,
    pub batches: u64,
    pub(crate) elapsed_seconds: f64,
}

impl std::fmt::Display for RepairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: repaired {} keys on the {} database from the {} database: {} inserted or \
             updated, {} deleted ({} batches)",
            self.table, self.keys, self.to, self.from, self.upserted, self.deleted, self.batches
        )
    }
}

/// The statements a repair runs for one table, over JSON arrays of key objects and of the
/// authoritative rows (as `to_jsonb`).
#[derive(Debug, PartialEq, Eq)]
struct RepairSql {
    /// On the authoritative side: its rows with those keys (`$1`).
    read: String,
    /// On the written side: rows with a key in `$1` and none in the rows `$2`.
    delete: String,
    /// On the written side: the rows `$1` inserted, or written over the row with the same key.
    upsert: String,
}

/// `table` is quoted; `key` the key columns; `write` the columns written (both sides have
/// them and they are not generated on the written side).
fn repair_sql(table: &str, key: &[String], write: &[String]) -> RepairSql {
    let q = |c: &String| Ident::new(c.clone()).quoted();
    let key_row = |alias: &str| {
        format!(
            "({})",
            key.iter()
                .map(|k| format!("{alias}.{}", q(k)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cols = write.iter().map(q).collect::<Vec<_>>().join(", ");
    let keys = key.iter().map(q).collect::<Vec<_>>().join(", ");
    let set: Vec<String> = write
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{} = excluded.{}", q(c), q(c)))
        .collect();
    let on_conflict = if set.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", set.join(", "))
    };
    RepairSql {
        read: format!(
            "SELECT to_jsonb(x)::text FROM {table} AS x \
             JOIN jsonb_populate_recordset(NULL::{table}, $1::jsonb) AS k ON {} = {}",
            key_row("x"),
            key_row("k")
        ),
        delete: format!(
            "DELETE FROM {table} AS x USING jsonb_populate_recordset(NULL::{table}, $1::jsonb) AS k \
             WHERE {xk} = {kk} AND NOT EXISTS (SELECT 1 FROM \
             jsonb_populate_recordset(NULL::{table}, $2::jsonb) AS r WHERE {rk} = {kk})",
            xk = key_row("x"),
            kk = key_row("k"),
            rk = key_row("r"),
        ),
        upsert: format!(
            "INSERT INTO {table} ({cols}) SELECT {cols} FROM \
             jsonb_populate_recordset(NULL::{table}, $1::jsonb) ON CONFLICT ({keys}) {on_conflict}"
        ),
    }
}

/// Copies the `from` side's version of each of `keys` (JSON key objects, as
/// [`Report::keys`]) to the other side, `batch` keys per transaction there: rows the
/// authoritative side has are inserted or written over, the others deleted. Every column
/// both sides have is written, hidden ones included; columns only the written side has keep
/// their value (or default). Plain SQL: no compare-and-set, no merge, no foreign key order.
pub(crate) async fn repair(
    source: &PgPool,
    target: &PgPool,
    table: &TableRef,
    from: Side,
    keys: &[String],
    batch: usize,
) -> Result<RepairReport, VerifyError> {
    let began = Instant::now();
    let to = from.other();
    let (auth, written) = match from {
        Side::Source => (source, target),
        Side::Target => (target, source),
    };
    let (la, lw) = tokio::try_join!(
        layout(auth, table, from.name()),
        layout(written, table, to.name())
    )?;
    if la.key != lw.key {
        return Err(VerifyError::KeyMismatch(table.to_string()));
    }
    let write: Vec<String> = lw
        .columns
        .iter()
        .filter(|c| la.columns.contains(c) && !lw.generated.contains(c))
        .cloned()
        .collect();
    let sql = repair_sql(&table.quoted(), &lw.key, &write);
    let mut report = RepairReport {
        table: table.to_string(),
        from: from.name(),
        to: to.name(),
        ..Default::default()
    };
    for chunk in keys.chunks(batch.max(1)) {
        let key_json = format!("[{}]", chunk.join(","));
        let rows: Vec<String> = sqlx::query_scalar(&sql.read)
            .bind(&key_json)
            .fetch_all(auth)
            .await
            .map_err(|source| VerifyError::Sql {
                what: "read the rows to repair",
                side: from.name(),
                source,
            })?;
        let row_json = format!("[{}]", rows.join(","));
        let err = |what| {
            move |source| VerifyError::Sql {
                what,
                side: to.name(),
                source,
            }
        };
        let mut tx = written.begin().await.map_err(err("repair rows"))?;
        let deleted = sqlx::query(&sql.delete)
            .bind(&key_json)
            .bind(&row_json)
            .execute(&mut *tx)
            .await
            .map_err(err("delete rows"))?
            .rows_affected();
        let upserted = sqlx::query(&sql.upsert)
            .bind(&row_json)
            .execute(&mut *tx)
            .await
            .map_err(err("write rows"))?
            .rows_affected();
        tx.commit().await.map_err(err("repair rows"))?;
        report.keys += chunk.len() as u64;
        report.deleted += deleted;
        report.upserted += upserted;
        report.batches += 1;
        for (kind, n) in [("upsert", upserted), ("delete", deleted)] {
            metrics::counter!(m::VERIFY_REPAIRED_ROWS, m::LABEL_TABLE => report.table.clone(),
                m::LABEL_KIND => kind)
            .increment(n);
        }
        tracing::debug!(table = %report.table, to = to.name(), upserted, deleted, "repaired a batch");
    }
    report.elapsed_seconds = began.elapsed().as_secs_f64();
    tracing::info!(table = %report.table, from = from.name(), to = to.name(), keys = report.keys,
        upserted = report.upserted, deleted = report.deleted, "repaired divergent rows");
    Ok(report)
}

/// How a `--repair` runs: from which side, how many keys per transaction.
#[derive(Clone, Copy, Debug)]
pub struct RepairOptions {
    pub from: Side,
    pub batch: usize,
}

/// Compares, and while keys differ and `repair` is set, repairs them and compares again
/// (more than one round when more rows differed than one comparison reads), at most
/// `rounds` repairs. `on_step` sees each report and each repair.
pub async fn compare_and_repair(
    source: &PgPool,
    target: &PgPool,
    table: &TableRef,
    opts: &CompareOptions,
    repair_with: Option<RepairOptions>,
    rounds: u32,
    mut on_step: impl FnMut(Step<'_>),
) -> Result<Report, VerifyError> {
    let mut report = compare(source, target, table, opts).await?;
    on_step(Step::Compared(&report, None));
    let Some(r) = repair_with else {
        return Ok(report);
    };
    for _ in 0..rounds {
        if report.in_sync() || report.keys.is_empty() {
            break;
        }
        let done = repair(source, target, table, r.from, &report.keys, r.batch).await?;
        on_step(Step::Repaired(&done));
        report = compare(source, target, table, opts).await?;
        on_step(Step::Compared(&report, None));
    }
    Ok(report)
}

/// What [`compare_and_repair`] and [`watch_and_repair`] report as they go.
#[derive(Clone, Copy, Debug)]
pub enum Step<'a> {
    /// A comparison; in a watch, with the clean checks in a row so far, counting it.
    Compared(&'a Report, Option<u32>),
    Repaired(&'a RepairReport),
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
    watch_and_repair(
        source,
        target,
        table,
        opts,
        None,
        WatchOptions {
            interval,
            clean,
            timeout,
        },
        cancel,
        |step| {
            if let Step::Compared(r, Some(clean)) = step {
                on_report(r, clean);
            }
        },
    )
    .await
}

/// When a watch checks and when it stops.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WatchOptions {
    pub(crate) interval: Duration,
    /// Consecutive clean checks that end it in sync ("failback ready").
    pub(crate) clean: u32,
    pub(crate) timeout: Duration,
}

/// [`watch`], where a check that finds differences also repairs them when `repair_with` is
/// set (one repair per check; the check still counts as not clean, and the next one, an
/// interval later, sees whether writes still arrive). The `verify_failback_ready` gauge is 1
/// once the watch ends in sync.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn watch_and_repair(
    source: &PgPool,
    target: &PgPool,
    table: &TableRef,
    opts: &CompareOptions,
    repair_with: Option<RepairOptions>,
    w: WatchOptions,
    cancel: CancellationToken,
    mut on_step: impl FnMut(Step<'_>),
) -> Result<WatchOutcome, VerifyError> {
    let deadline = Instant::now() + w.timeout;
    let mut outcome = WatchOutcome {
        checks: 0,
        clean: 0,
        in_sync: false,
        last: None,
    };
    let label = table.to_string();
    metrics::gauge!(m::VERIFY_FAILBACK_READY, m::LABEL_TABLE => label.clone()).set(0.0);
    loop {
        let report = compare(source, target, table, opts).await?;
        outcome.checks += 1;
        outcome.clean = if report.in_sync() {
            outcome.clean + 1
        } else {
            0
        };
        metrics::gauge!(m::VERIFY_CLEAN_CHECKS, m::LABEL_TABLE => label.clone())
            .set(f64::from(outcome.clean));
        on_step(Step::Compared(&report, Some(outcome.clean)));
        if let (Some(r), false) = (repair_with, report.keys.is_empty()) {
            let done = repair(source, target, table, r.from, &report.keys, r.batch).await?;
            on_step(Step::Repaired(&done));
        }
        outcome.last = Some(report);
        if outcome.clean >= w.clean.max(1) {
            outcome.in_sync = true;
            metrics::gauge!(m::VERIFY_FAILBACK_READY, m::LABEL_TABLE => label).set(1.0);
            return Ok(outcome);
        }
        if Instant::now() + w.interval > deadline {
            return Ok(outcome);
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(outcome),
            _ = tokio::time::sleep(w.interval) => {}
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
    fn golden_repair_sql() {
        let sql = repair_sql(
            "\"public\".\"t\"",
            &["a".into(), "b".into()],
            &["_source".into(), "a".into(), "b".into(), "v".into()],
        );
        assert_eq!(
            sql.read,
            r#"SELECT to_jsonb(x)::text FROM "public"."t" AS x JOIN jsonb_populate_recordset(NULL::"public"."t", $1::jsonb) AS k ON (x."a", x."b") = (k."a", k."b")"#
        );
        assert_eq!(
            sql.delete,
            r#"DELETE FROM "public"."t" AS x USING jsonb_populate_recordset(NULL::"public"."t", $1::jsonb) AS k WHERE (x."a", x."b") = (k."a", k."b") AND NOT EXISTS (SELECT 1 FROM jsonb_populate_recordset(NULL::"public"."t", $2::jsonb) AS r WHERE (r."a", r."b") = (k."a", k."b"))"#
        );
        assert_eq!(
            sql.upsert,
            r#"INSERT INTO "public"."t" ("_source", "a", "b", "v") SELECT "_source", "a", "b", "v" FROM jsonb_populate_recordset(NULL::"public"."t", $1::jsonb) ON CONFLICT ("a", "b") DO UPDATE SET "_source" = excluded."_source", "v" = excluded."v""#
        );
        let only_key = repair_sql("\"t\"", &["k".into()], &["k".into()]);
        assert!(only_key.upsert.ends_with("ON CONFLICT (\"k\") DO NOTHING"));
        assert_eq!(
            key_object(&["it's".into()]),
            r#"jsonb_build_object('it''s', "it's")::text"#
        );
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
            keys: vec![],
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
