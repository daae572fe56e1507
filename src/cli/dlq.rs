//! `cdc-sink dlq list|show|purge|replay`: inspect, delete and re-apply the dead-letter queue
//! of a target schema (README "Conflicts") without hand-written SQL.
//!
//! Queues with the optional `source_table` column record which table a row came from; `list`
//! and `purge` can then select by table and `replay` sends each row to its own table. Rows
//! without one (older queues, or rows written before the column was added) are attributed to
//! the table the operator names. Replay re-applies each row through the sequencer's apply
//! path (compare-and-set, merge) in source-time order, one savepoint per row: a row that
//! applies is deleted from the queue in the same transaction; one that loses again is rolled
//! back and stays. Each batch commits on its own, so an interrupted replay leaves every row
//! either applied and gone or untouched, and running it again resumes.

use crate::apply::{Applier, ApplyArgs, TableConfigs, TableSchema, DEFAULT_DLQ_TABLE};
use crate::hlc::Hlc;
use crate::ident::{Ident, Schema, Table};
use crate::metrics::{DLQ_PURGED, DLQ_REPLAYED, LABEL_RESULT, LABEL_SCHEMA};
use crate::mutation::{Mutation, TableBatches};
use crate::script::Userscript;
use crate::sequence::{write_ordered_counted, SequenceError};
use crate::target::{Database, Dialect, TargetArgs};
use anyhow::Context;
use serde_json::{json, Value};
use sqlx::Acquire;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot {what} the dead-letter queue {table}")]
    Sql {
        what: &'static str,
        table: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("table {0} is not in the target schema")]
    UnknownTable(String),
    #[error(
        "the dead-letter queue {table} does not record source tables, so rows cannot be \
         selected by table: add the column with `ALTER TABLE {table} ADD COLUMN source_table \
         TEXT` (rows dead-lettered from then on record it), or select rows by --dlq"
    )]
    NoTableColumn { table: String },
    #[error(
        "the dead-letter queue {0} does not record source tables: name the table the rows \
         belong to with --table"
    )]
    TableNeeded(String),
    #[error("--table {name:?} is not a table name")]
    TableName {
        name: String,
        #[source]
        error: crate::ident::IdentError,
    },
    #[error(
        "refusing to purge every row of the dead-letter queue: select rows (--dlq, --from, \
         --to, --limit) or pass --all"
    )]
    Unfiltered,
    #[error(transparent)]
    Apply(#[from] SequenceError),
}

/// Which dead-letter rows a command works on. Source times are HLCs, `from` inclusive and
/// `to` exclusive.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Selection {
    /// Only rows dead-lettered from this table of the schema (needs the queue's
    /// `source_table` column); rows with no recorded table match any table.
    #[arg(long = "table")]
    pub table: Option<String>,
    /// Only rows with this dlq name (the name the merge function answered).
    #[arg(long = "dlq")]
    pub dlq: Option<String>,
    /// Only rows whose source time is at or after this HLC (`nanos.logical`, as `list`
    /// prints it, e.g. `1733450000000000000.0000000000`).
    #[arg(long = "from")]
    pub from: Option<Hlc>,
    /// Only rows whose source time is before this HLC.
    #[arg(long = "to")]
    pub to: Option<Hlc>,
    /// At most this many rows (the oldest first).
    #[arg(long = "limit")]
    pub limit: Option<i64>,
}

impl Selection {
    fn is_everything(&self) -> bool {
        self.table.is_none()
            && self.dlq.is_none()
            && self.from.is_none()
            && self.to.is_none()
            && self.limit.is_none()
    }
}

/// One dead-letter row. `after` is `None` for a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DlqRow {
    pub event: String,
    pub(crate) dlq_name: String,
    pub time: Hlc,
    pub after: Option<String>,
    pub(crate) before: Option<String>,
    /// When it was dead-lettered; `None` if the table has no `dlq_time` column.
    pub dlq_time: Option<String>,
    /// The table (in the queue's schema, lower-cased) it came from; `None` when not recorded.
    pub source_table: Option<String>,
}

impl DlqRow {
    fn to_json(&self) -> Value {
        let parse = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                .unwrap_or(Value::Null)
        };
        json!({
            "event": self.event,
            "dlq_name": self.dlq_name,
            "source_table": self.source_table,
            "source_time": self.time.to_string(),
            "dlq_time": self.dlq_time,
            "data_after": parse(&self.after),
            "data_before": parse(&self.before),
        })
    }
}

/// The dead-letter table of `schema` named `name`, as SQL.
pub fn dlq_table(schema: &Schema, name: &str) -> Table {
    Table::new(schema.clone(), name)
}

fn sql_name(dialect: Dialect, table: &Table) -> String {
    match dialect {
        Dialect::Postgres => table.quoted_in_db(),
        Dialect::Cockroach => table.quoted(),
    }
}

/// The columns of a [`RawRow`], from a DLQ table aliased `d`. `dlq_time` and `source_table`
/// are read through JSON so tables created without those columns still work.
const ROW_COLUMNS: &str = "d.event::TEXT, d.dlq_name, d.source_nanos, d.source_logical, \
d.data_after::TEXT, d.data_before::TEXT, to_jsonb(d) ->> 'dlq_time', to_jsonb(d) ->> 'source_table'";

/// Rows ordered by source time, then event; `$1..$5` and `$10` (the table) are the
/// selection, `$6..$8` the position to continue after (all NULL from the start), `$9` the
/// limit. The event is compared as text so any key type (UUID, serial) works. A row with no
/// recorded table matches any table.
fn select_sql(dialect: Dialect, table: &Table) -> String {
    format!(
        "SELECT {ROW_COLUMNS} FROM {} AS d \
         WHERE ($1::TEXT IS NULL OR d.dlq_name = $1) \
         AND ($2::INT8 IS NULL OR (d.source_nanos, d.source_logical) >= ($2::INT8, $3::INT8)) \
         AND ($4::INT8 IS NULL OR (d.source_nanos, d.source_logical) < ($4::INT8, $5::INT8)) \
         AND ($6::INT8 IS NULL OR (d.source_nanos, d.source_logical, d.event::TEXT) > ($6::INT8, $7::INT8, $8::TEXT)) \
         AND ($10::TEXT IS NULL OR coalesce(to_jsonb(d) ->> 'source_table', $10) = $10) \
         ORDER BY d.source_nanos, d.source_logical, d.event::TEXT LIMIT $9",
        sql_name(dialect, table)
    )
}

type RawRow = (
    String,
    String,
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
);

fn to_row(r: RawRow) -> DlqRow {
    let json_null = |s: String| (s != "null").then_some(s);
    DlqRow {
        event: r.0,
        dlq_name: r.1,
        time: Hlc::new(r.2, r.3 as i32),
        after: json_null(r.4),
        before: json_null(r.5),
        dlq_time: r.6,
        source_table: r.7,
    }
}

/// The lower-cased name a `--table` argument stands for in `schema`.
fn table_filter(schema: &Schema, name: &str) -> Result<String, DlqError> {
    Table::parse_in(schema, name)
        .map(|t| t.name.canonical())
        .map_err(|error| DlqError::TableName {
            name: name.to_string(),
            error,
        })
}

/// Wraps a database error of `what` on the queue `table`.
fn sql_err(what: &'static str, table: &Table) -> impl FnOnce(sqlx::Error) -> DlqError {
    let table = table.to_string();
    move |error| DlqError::Sql { what, table, error }
}

/// Whether the queue has the `source_table` column.
pub(crate) async fn records_tables(db: &Database, table: &Table) -> Result<bool, DlqError> {
    let columns = match db.dialect {
        Dialect::Postgres => "information_schema.columns".to_string(),
        Dialect::Cockroach => format!("{}.information_schema.columns", table.schema.db.quoted()),
    };
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {columns} WHERE lower(table_schema) = lower($1) \
         AND lower(table_name) = lower($2) AND column_name = 'source_table'"
    ))
    .bind(table.schema.schema.raw())
    .bind(table.name.raw())
    .fetch_one(&db.pool)
    .await
    .map_err(sql_err("read", table))?;
    Ok(n > 0)
}

async fn select(
    db: &Database,
    table: &Table,
    sel: &Selection,
    after: Option<&DlqRow>,
    limit: Option<i64>,
) -> Result<Vec<DlqRow>, DlqError> {
    let rows: Vec<RawRow> = sqlx::query_as(&select_sql(db.dialect, table))
        .bind(sel.dlq.as_deref())
        .bind(sel.from.map(|h| h.nanos()))
        .bind(sel.from.map(|h| i64::from(h.logical())))
        .bind(sel.to.map(|h| h.nanos()))
        .bind(sel.to.map(|h| i64::from(h.logical())))
        .bind(after.map(|r| r.time.nanos()))
        .bind(after.map(|r| i64::from(r.time.logical())))
        .bind(after.map(|r| r.event.as_str()))
        .bind(limit)
        .bind(
            sel.table
                .as_deref()
                .map(|t| table_filter(&table.schema, t))
                .transpose()?,
        )
        .fetch_all(&db.pool)
        .await
        .map_err(sql_err("read", table))?;
    Ok(rows.into_iter().map(to_row).collect())
}

/// The selected rows, oldest first. Selecting by table needs the `source_table` column.
pub async fn list(db: &Database, table: &Table, sel: &Selection) -> Result<Vec<DlqRow>, DlqError> {
    if sel.table.is_some() && !records_tables(db, table).await? {
        return Err(DlqError::NoTableColumn {
            table: sql_name(db.dialect, table),
        });
    }
    select(db, table, sel, None, sel.limit).await
}

/// The row with this event id.
pub async fn show(db: &Database, table: &Table, event: &str) -> Result<Option<DlqRow>, DlqError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM {} AS d WHERE d.event::TEXT = $1",
        sql_name(db.dialect, table)
    );
    let row: Option<RawRow> = sqlx::query_as(&sql)
        .bind(event)
        .fetch_optional(&db.pool)
        .await
        .map_err(sql_err("read", table))?;
    Ok(row.map(to_row))
}

async fn delete_events(
    conn: &mut sqlx::PgConnection,
    dialect: Dialect,
    table: &Table,
    events: &[String],
) -> Result<u64, DlqError> {
    let sql = format!(
        "DELETE FROM {} WHERE event::TEXT = ANY($1::TEXT[])",
        sql_name(dialect, table)
    );
    let done = sqlx::query(&sql)
        .bind(events)
        .execute(conn)
        .await
        .map_err(sql_err("delete from", table))?;
    Ok(done.rows_affected())
}

/// Deletes the selected rows (or, with `dry_run`, only returns them). An empty selection is
/// refused unless `all`.
pub async fn purge(
    db: &Database,
    table: &Table,
    sel: &Selection,
    all: bool,
    dry_run: bool,
) -> Result<Vec<DlqRow>, DlqError> {
    if sel.is_everything() && !all {
        return Err(DlqError::Unfiltered);
    }
    let rows = list(db, table, sel).await?;
    if dry_run || rows.is_empty() {
        return Ok(rows);
    }
    let events: Vec<String> = rows.iter().map(|r| r.event.clone()).collect();
    let mut conn = db.acquire().await.map_err(sql_err("delete from", table))?;
    let n = delete_events(&mut conn, db.dialect, table, &events).await?;
    metrics::counter!(DLQ_PURGED, LABEL_SCHEMA => table.schema.canonical()).increment(n);
    tracing::info!(dlq = %table, rows = n, "purged dead-letter rows");
    Ok(rows)
}

/// What a replay did so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Applied and removed from the queue.
    pub applied: u64,
    /// Lost again (compare-and-set, or the merge function dropped or dead-lettered it): kept.
    pub lost: u64,
    /// Refused by the target, or not a row of the table: kept.
    pub failed: u64,
    pub batches: u64,
    /// Stopped by the progress callback before the selection was exhausted.
    pub interrupted: bool,
}

/// The mutation a dead-letter row stands for: its key is read from the row image by the
/// table's primary key.
fn to_mutation(ts: &TableSchema, row: &DlqRow) -> Result<Mutation, String> {
    let image = row
        .after
        .as_deref()
        .or(row.before.as_deref())
        .ok_or("no row image")?;
    let Value::Object(map) = serde_json::from_str::<Value>(image).map_err(|e| e.to_string())?
    else {
        return Err("the row image is not a JSON object".into());
    };
    let mut key = Vec::new();
    for col in ts.primary_key() {
        let v = map
            .iter()
            .find(|(k, _)| Ident::new(k.as_str()) == col.name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| format!("the row image has no key column {}", col.name.raw()))?;
        key.push(v);
    }
    Ok(Mutation {
        time: row.time,
        key: Value::Array(key).to_string(),
        after: row.after.clone(),
        before: row.before.clone(),
    })
}

fn count(schema: &Schema, result: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(DLQ_REPLAYED, LABEL_SCHEMA => schema.canonical(), LABEL_RESULT => result)
            .increment(n);
    }
}

/// Re-applies the selected rows of `dlq` in source-time order, `batch` rows per target
/// transaction; `progress` sees the running totals after each committed batch and may stop
/// the replay. Table options (CAS columns, merge) are those `applier` has.
///
/// A row goes to the table it records (the queue's `source_table` column); one that records
/// none goes to `sel.table`, and without that is kept and counted as failed. A queue without
/// the column needs `sel.table`, which all selected rows then go to.
///
/// The userscript's `map` is not run again: a dead-letter row holds the mutation as it was
/// handed to the table, already mapped.
pub async fn replay(
    applier: &Applier,
    db: &Database,
    dlq: &Table,
    sel: &Selection,
    batch: usize,
    mut progress: impl FnMut(&ReplayReport) -> ControlFlow<()>,
) -> Result<ReplayReport, DlqError> {
    let schema = &dlq.schema;
    let info = applier
        .schemas()
        .schema(schema)
        .await
        .map_err(SequenceError::from)?;
    let named = match sel.table.as_deref() {
        Some(t) => {
            let name = table_filter(schema, t)?;
            let table = Table::new(schema.clone(), name);
            let ts = info
                .table(&table)
                .cloned()
                .ok_or_else(|| DlqError::UnknownTable(table.to_string()))?;
            Some(ts)
        }
        None if records_tables(db, dlq).await? => None,
        None => return Err(DlqError::TableNeeded(dlq.to_string())),
    };
    let mut report = ReplayReport::default();
    let mut last: Option<DlqRow> = None;
    let mut remaining = sel.limit;
    loop {
        let take = (batch.max(1) as i64).min(remaining.unwrap_or(i64::MAX));
        if take <= 0 {
            break;
        }
        let rows = select(db, dlq, sel, last.as_ref(), Some(take)).await?;
        if rows.is_empty() {
            break;
        }
        let mut tx = db.begin().await.map_err(sql_err("replay", dlq))?;
        let mut applied = Vec::new();
        let (mut lost, mut failed) = (0u64, 0u64);
        for row in &rows {
            let recorded = row
                .source_table
                .as_deref()
                .and_then(|t| info.table(&Table::new(schema.clone(), t)));
            let Some(ts) = recorded.or(named.as_ref()) else {
                tracing::warn!(event = %row.event, dlq = %dlq, recorded = row.source_table.is_some(),
                    "dead-letter row names no table of the schema (pass --table); kept");
                failed += 1;
                continue;
            };
            let table = &ts.table;
            let m = match to_mutation(ts, row) {
                Ok(m) => m,
                Err(detail) => {
                    tracing::warn!(event = %row.event, table = %table, %detail,
                        "dead-letter row does not fit the table; kept");
                    failed += 1;
                    continue;
                }
            };
            let mut one = TableBatches::new();
            one.insert(ts.table.clone(), vec![m]);
            let mut sp = tx.begin().await.map_err(sql_err("replay", dlq))?;
            match write_ordered_counted(applier, None, &mut sp, &info, &one).await {
                Ok(s) if s.conflicts > s.resolved => {
                    sp.rollback().await.map_err(sql_err("replay", dlq))?;
                    lost += 1;
                }
                Ok(_) => {
                    sp.commit().await.map_err(sql_err("replay", dlq))?;
                    applied.push(row.event.clone());
                }
                Err(e) if e.is_unavailable() => return Err(e.into()),
                Err(e) => {
                    sp.rollback().await.map_err(sql_err("replay", dlq))?;
                    tracing::warn!(event = %row.event, table = %table, error = %crate::error::ErrorChain(&e),
                        "dead-letter row refused by the target; kept");
                    failed += 1;
                }
            }
        }
        delete_events(&mut tx, db.dialect, dlq, &applied).await?;
        tx.commit().await.map_err(sql_err("replay", dlq))?;
        count(schema, "applied", applied.len() as u64);
        count(schema, "lost", lost);
        count(schema, "failed", failed);
        report.applied += applied.len() as u64;
        report.lost += lost;
        report.failed += failed;
        report.batches += 1;
        if let Some(r) = remaining.as_mut() {
            *r -= rows.len() as i64;
        }
        last = rows.last().cloned();
        if progress(&report).is_break() {
            report.interrupted = true;
            break;
        }
    }
    tracing::info!(dlq = %dlq, applied = report.applied, lost = report.lost,
        failed = report.failed, "dead-letter replay finished");
    Ok(report)
}

#[derive(clap::Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub(crate) command: DlqCommand,
}

#[derive(clap::Args, Debug)]
pub(crate) struct Common {
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    /// The target schema (`db.schema`).
    pub(crate) schema: String,
    /// The dead-letter table's name in the schema.
    #[arg(long = "dlqTableName", env = "CDC_SINK_DLQ_TABLE_NAME", default_value = DEFAULT_DLQ_TABLE)]
    pub(crate) dlq_table_name: String,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// Print the selected rows, oldest first (a table, or `--json`).
    List {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sel: Selection,
        /// One JSON array instead of a table.
        #[arg(long = "json")]
        json: bool,
    },
    /// Print one row in full.
    Show {
        #[command(flatten)]
        common: Common,
        /// The row's `event` id.
        event: String,
    },
    /// Delete the selected rows.
    Purge {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sel: Selection,
        /// Only print what would be deleted.
        #[arg(long = "dry-run")]
        dry_run: bool,
        /// Allow purging without any selection.
        #[arg(long = "all")]
        all: bool,
    },
    /// Re-apply the selected rows to the table each came from, or to `--table` when the queue
    /// does not record it (compare-and-set and merge as configured by `--userscript`); rows
    /// that apply leave the queue, rows that lose again stay.
    Replay {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sel: Selection,
        /// The userscript whose table options (cas, merge) apply.
        #[arg(long = "userscript")]
        userscript: Option<std::path::PathBuf>,
        /// Rows per target transaction.
        #[arg(long = "batch", default_value_t = 100)]
        batch: usize,
    },
}

async fn open(common: &Common) -> anyhow::Result<(Database, Schema, Table)> {
    common.target.validate()?;
    let (target, _staging) = common.target.open().await.context("opening databases")?;
    let schema =
        Schema::parse(&common.schema).with_context(|| format!("schema {:?}", common.schema))?;
    let table = dlq_table(&schema, &common.dlq_table_name);
    Ok((target, schema, table))
}

fn print_table(rows: &[DlqRow]) {
    println!(
        "{:<38} {:<16} {:<16} {:<32} {:<7} DATA",
        "EVENT", "DLQ", "TABLE", "SOURCE TIME", "KIND"
    );
    for r in rows {
        let (kind, data) = match (&r.after, &r.before) {
            (Some(a), _) => ("upsert", a.as_str()),
            (None, Some(b)) => ("delete", b.as_str()),
            (None, None) => ("delete", ""),
        };
        let mut data: String = data.chars().take(60).collect();
        if data.len()
            < r.after
                .as_deref()
                .or(r.before.as_deref())
                .unwrap_or("")
                .len()
        {
            data.push('…');
        }
        println!(
            "{:<38} {:<16} {:<16} {:<32} {:<7} {data}",
            r.event,
            r.dlq_name,
            r.source_table.as_deref().unwrap_or("-"),
            r.time.to_string(),
            kind
        );
    }
    println!("({} rows)", rows.len());
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List { common, sel, json } => {
            let (db, _, table) = open(&common).await?;
            let rows = list(&db, &table, &sel).await?;
            if json {
                let all: Vec<Value> = rows.iter().map(DlqRow::to_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print_table(&rows);
            }
        }
        DlqCommand::Show { common, event } => {
            let (db, _, table) = open(&common).await?;
            let Some(row) = show(&db, &table, &event).await? else {
                anyhow::bail!("no row with event {event} in {table}");
            };
            println!("{}", serde_json::to_string_pretty(&row.to_json())?);
        }
        DlqCommand::Purge {
            common,
            sel,
            dry_run,
            all,
        } => {
            let (db, _, table) = open(&common).await?;
            let rows = purge(&db, &table, &sel, all, dry_run).await?;
            print_table(&rows);
            if dry_run {
                println!("dry run: {} rows would be deleted", rows.len());
            } else {
                println!("deleted {} rows", rows.len());
            }
        }
        DlqCommand::Replay {
            common,
            sel,
            userscript,
            batch,
        } => {
            let (db, _, dlq) = open(&common).await?;
            // The userscript's table options (compare-and-set, merge) decide how a replayed
            // row is written; its `map` is not run again.
            let script = match userscript {
                Some(path) => {
                    let flags = crate::sink::start_flags();
                    let names: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).collect();
                    let script = Userscript::load(&path, &names)
                        .with_context(|| format!("loading {}", path.display()))?;
                    Some(Arc::new(script) as Arc<dyn TableConfigs>)
                }
                None => None,
            };
            let applier = Applier::with_options(
                db.clone(),
                Duration::from_secs(60),
                ApplyArgs {
                    dlq_table_name: common.dlq_table_name.clone(),
                    // A replayed row that loses is rolled back, never dead-lettered again.
                    dlq_auto_create: false,
                },
                script,
            );
            let report = replay(&applier, &db, &dlq, &sel, batch, |r| {
                println!(
                    "batch {}: applied {}, lost again {}, failed {}",
                    r.batches, r.applied, r.lost, r.failed
                );
                ControlFlow::Continue(())
            })
            .await?;
            println!(
                "replayed: {} applied and removed, {} lost again and kept, {} failed and kept",
                report.applied, report.lost, report.failed
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selection_reads_every_filter_and_continues_after_the_last_row() {
        let sql = select_sql(
            Dialect::Postgres,
            &dlq_table(&Schema::new("db", "public"), "cdc_sink_dlq"),
        );
        assert!(
            sql.contains(r#"FROM "public"."cdc_sink_dlq" AS d"#),
            "{sql}"
        );
        for p in [
            "$1",
            "$3::INT8",
            "$5::INT8",
            "$8::TEXT",
            "LIMIT $9",
            "'source_table', $10) = $10",
        ] {
            assert!(sql.contains(p), "{p} missing: {sql}");
        }
    }

    #[test]
    fn a_mutation_takes_its_key_from_the_image_in_key_order() {
        let t = Table::new(Schema::new("db", "public"), "t");
        let col = |n: &str, primary| crate::apply::Column {
            name: Ident::new(n),
            primary,
            data_type: "INT8".into(),
            default: None,
            ignored: false,
        };
        let ts = TableSchema {
            table: t,
            columns: vec![col("b", true), col("a", true), col("v", false)],
        };
        let row = DlqRow {
            event: "1".into(),
            dlq_name: "x".into(),
            time: Hlc::new(5, 1),
            after: None,
            before: Some(r#"{"A": 1, "b": "two", "v": 3}"#.into()),
            dlq_time: None,
            source_table: None,
        };
        let m = to_mutation(&ts, &row).expect("fits");
        assert_eq!(m.key, r#"["two",1]"#);
        assert!(m.is_delete());
        let bad = DlqRow {
            before: Some(r#"{"b": 1}"#.into()),
            ..row
        };
        assert_eq!(
            to_mutation(&ts, &bad).unwrap_err(),
            "the row image has no key column a"
        );
    }
}
