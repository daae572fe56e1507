//! Durable staging of mutations in the `_cdc_sink` schema, one staging table per target table.
//!
//! On PostgreSQL the staging schema is a schema inside the target database; on CockroachDB it is
//! the `_cdc_sink` database (schema `public`). Rows are keyed by `(nanos, logical, key)`, so a
//! redelivered mutation is a no-op. Rows are deleted in the transaction that applies them (with
//! a separate staging database, right after it). (`applied` exists for the reference's table
//! shape.)

mod sql;

use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics as m;
use crate::mutation::{Mutation, TableBatches};
use crate::target::{self, Database, Dialect};
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub use sql::StagingSchema;

/// Flags of the staging step.
#[derive(clap::Args, Debug, Clone)]
pub struct StageArgs {
    /// Where staged mutations, checkpoints and leases live: a schema of the target database on
    /// PostgreSQL, a database on CockroachDB. Created if missing.
    #[arg(
        long = "stagingSchema",
        env = "CDC_SINK_STAGING_SCHEMA",
        default_value = "_cdc_sink"
    )]
    pub staging_schema: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("staging schema {0:?} is not valid: {1}")]
    Schema(String, String),
    #[error("could not create staging table {table}")]
    Create {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not write staged mutations")]
    Write(#[source] sqlx::Error),
    #[error("could not read staged mutations of {table}")]
    Read {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not retire staged mutations of {table}")]
    Retire {
        table: String,
        #[source]
        source: sqlx::Error,
    },
    /// Two target tables map to one staging table name (`a_b.c.t` and `a.b_c.t`, or names
    /// equal up to a cut): the second is refused rather than sharing the first's rows.
    #[error(
        "staging table name {staging_name:?} is taken by table {owner}; table {table} cannot be staged"
    )]
    NameTaken {
        staging_name: String,
        owner: String,
        table: String,
    },
}

impl StageError {
    fn sql(&self) -> Option<&sqlx::Error> {
        match self {
            StageError::Schema(..) | StageError::NameTaken { .. } => None,
            StageError::Create { source, .. }
            | StageError::Read { source, .. }
            | StageError::Retire { source, .. }
            | StageError::Write(source) => Some(source),
        }
    }

    /// The SQLSTATE of a database error.
    pub fn sqlstate(&self) -> Option<String> {
        self.sql().map(target::sqlstate)
    }

    /// The database is down or overloaded, or DDL kept losing races with other instances:
    /// worth a 503 and a retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StageError::Create { source, .. } => {
                target::is_unavailable(source) || target::is_ddl_race(&target::sqlstate(source))
            }
            _ => self.sql().is_some_and(target::is_unavailable),
        }
    }

    /// The request names a table that cannot be staged (HTTP 400): retrying cannot help.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, StageError::NameTaken { .. })
    }
}

/// Counts of one staging write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageStats {
    pub staged: u64,
    pub duplicates: u64,
}

/// A staged mutation read back for apply.
#[derive(Clone, Debug)]
pub struct StagedRow {
    pub table: usize,
    pub mutation: Mutation,
}

/// Staging tables of one staging database.
pub struct Stager {
    db: Database,
    schema: StagingSchema,
    /// The quoted staging-table registry (see [`sql::REGISTRY`]).
    registry: String,
    /// Tables whose staging table this process registered and created, with its quoted name.
    known: Mutex<HashMap<Table, String>>,
    creating: tokio::sync::Mutex<()>,
    /// Index staging tables by `key` on PostgreSQL when creating them (see
    /// [`Stager::enable_key_index`]).
    key_index: AtomicBool,
    /// Staging tables known to have a valid `key` index.
    indexed: Mutex<HashSet<String>>,
}

impl Stager {
    /// Creates the staging schema and its staging-table registry if missing (the checkpoint
    /// and lease tables are created by their own modules).
    pub async fn open(db: Database, staging_schema: &str) -> Result<Stager, StageError> {
        let schema = StagingSchema::parse(staging_schema, db.dialect, &db.database)
            .map_err(|e| StageError::Schema(staging_schema.to_string(), e))?;
        let registry = schema.object(sql::REGISTRY);
        let mut ddl = schema.bootstrap_sql();
        ddl.push(sql::registry_ddl(db.dialect, &registry));
        target::run_ddl(&db, &ddl)
            .await
            .map_err(|source| StageError::Create {
                table: schema.to_string(),
                source,
            })?;
        tracing::info!(schema = %schema, "staging schema ready");
        Ok(Stager {
            db,
            schema,
            registry,
            known: Mutex::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            key_index: AtomicBool::new(false),
            indexed: Mutex::new(HashSet::new()),
        })
    }

    pub fn schema(&self) -> &StagingSchema {
        &self.schema
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn dialect(&self) -> Dialect {
        self.db.dialect
    }

    /// Makes staging tables (new ones, and existing ones the first time this process uses
    /// them) carry an index on `key`, which [`Stager::stage_if_exists`] needs so that it never
    /// scans a table. For `--bestEffortOnly`: call before the first staging write.
    /// CockroachDB staging tables always have it.
    pub fn enable_key_index(&self) {
        self.key_index.store(true, Ordering::Relaxed);
    }

    /// Whether the staging tables of `tables` all have a valid `key` index, which
    /// [`Stager::stage_if_exists`] needs not to scan them (it works without, slowly). With
    /// `build`, missing indexes, and broken ones an interrupted build left behind, are built
    /// first, without blocking writers (`CREATE INDEX CONCURRENTLY`): on a large table that
    /// takes a while. An index another connection is building is left alone: not ready yet.
    pub async fn key_index(&self, tables: &[Table], build: bool) -> Result<bool, StageError> {
        if self.db.dialect == Dialect::Cockroach {
            return Ok(true);
        }
        let mut ready = true;
        for table in tables {
            let name = self.ensure(table).await?;
            if self.indexed.lock().expect("poisoned").contains(&name) {
                continue;
            }
            let index = sql::key_index_name(self.db.dialect, &self.schema.table_name(table));
            let qualified = self.schema.object(&index);
            let stmts = sql::key_index_sql(&name, &index, &qualified);
            let failed = |source| StageError::Create {
                table: qualified.clone(),
                source,
            };
            let status = || async {
                sqlx::query_as::<_, (bool, bool)>(stmts.status)
                    .bind(&qualified)
                    .fetch_optional(&self.db.pool)
                    .await
            };
            let mut state = status().await.map_err(failed)?;
            if build && !matches!(state, Some((true, _)) | Some((false, true))) {
                if state.is_some() {
                    tracing::warn!(index = %qualified, "dropping an invalid staging index left by an interrupted build");
                    target::ddl_retry(|| sqlx::raw_sql(&stmts.drop).execute(&self.db.pool))
                        .await
                        .map_err(failed)?;
                }
                tracing::info!(table = %name, "building the staging index best-effort mode needs");
                let started = Instant::now();
                // Not under the DDL lock: it cannot run in a transaction, and it waits for
                // every transaction, including one waiting for that lock.
                target::ddl_retry(|| sqlx::raw_sql(&stmts.create).execute(&self.db.pool))
                    .await
                    .map_err(failed)?;
                tracing::info!(table = %name, elapsed_ms = started.elapsed().as_millis() as u64, "staging index built");
                state = status().await.map_err(failed)?;
            }
            if matches!(state, Some((true, _))) {
                self.indexed.lock().expect("poisoned").insert(name);
            } else {
                ready = false;
            }
        }
        Ok(ready)
    }

    /// The quoted name of `table`'s staging table.
    pub fn staging_table(&self, table: &Table) -> String {
        self.schema.table(table)
    }

    /// Registers `table` as the owner of its staging table name and creates the staging
    /// table, the first time this process uses it. Refuses a table whose staging name another
    /// table holds.
    pub async fn ensure(&self, table: &Table) -> Result<String, StageError> {
        if let Some(name) = self.known.lock().expect("poisoned").get(table) {
            return Ok(name.clone());
        }
        // One creator per process; other instances are kept apart by `run_ddl`.
        let _creating = self.creating.lock().await;
        if let Some(name) = self.known.lock().expect("poisoned").get(table) {
            return Ok(name.clone());
        }
        let bare = self.schema.table_name(table);
        let name = self.schema.object(&bare);
        self.register(table, &bare).await?;
        let key_index = self.key_index.load(Ordering::Relaxed);
        let ddl = sql::create_table(self.db.dialect, &name, &bare, key_index);
        target::run_ddl(&self.db, &ddl)
            .await
            .map_err(|source| StageError::Create {
                table: name.clone(),
                source,
            })?;
        self.known
            .lock()
            .expect("poisoned")
            .insert(table.clone(), name.clone());
        m::register_table(table);
        Ok(name)
    }

    /// Claims the staging name `bare` for `table` in the registry, or finds who holds it.
    /// A staging table created by an older version has no row yet: its first user claims it.
    async fn register(&self, table: &Table, bare: &str) -> Result<(), StageError> {
        let group = table.schema.canonical();
        let name = table.name.canonical();
        let failed = |source| StageError::Create {
            table: self.registry.clone(),
            source,
        };
        let claim = sql::registry_claim(&self.registry);
        let owner = sql::registry_owner(&self.registry);
        for _ in 0..10 {
            target::ddl_retry(|| {
                sqlx::query(&claim)
                    .bind(bare)
                    .bind(&group)
                    .bind(&name)
                    .execute(&self.db.pool)
            })
            .await
            .map_err(failed)?;
            // A separate statement: it sees a concurrent claim that made ours a no-op.
            let held: Option<(String, String)> = target::retry(|| {
                sqlx::query_as(&owner)
                    .bind(bare)
                    .fetch_optional(&self.db.pool)
            })
            .await
            .map_err(failed)?;
            match held {
                Some((g, t)) if g == group && t == name => return Ok(()),
                Some((g, t)) => {
                    return Err(StageError::NameTaken {
                        staging_name: bare.to_string(),
                        owner: format!("{g}.{t}"),
                        table: format!("{group}.{name}"),
                    })
                }
                // Removed between the two statements (by hand): claim it again.
                None => continue,
            }
        }
        Err(StageError::NameTaken {
            staging_name: bare.to_string(),
            owner: "an unstable registry row".into(),
            table: format!("{group}.{name}"),
        })
    }

    /// Every table of `schema` that has a staging table (registered by any instance).
    pub async fn registered(&self, schema: &Schema) -> Result<Vec<Table>, StageError> {
        let stmt = sql::registry_tables(&self.registry);
        let group = schema.canonical();
        let names: Vec<String> = target::retry(|| {
            sqlx::query_scalar(&stmt)
                .bind(&group)
                .fetch_all(&self.db.pool)
        })
        .await
        .map_err(|source| StageError::Read {
            table: self.registry.clone(),
            source,
        })?;
        Ok(names
            .into_iter()
            .map(|n| Table::new(schema.clone(), n))
            .collect())
    }

    /// Stages every mutation of one request atomically, so the caller may acknowledge as soon
    /// as this returns. On PostgreSQL the rows are first copied in one transaction (cheaper
    /// per row); a request holding a row staged before (a redelivery) fails that, and it is
    /// then staged by the one statement that skips staged rows, as on CockroachDB.
    pub async fn stage(&self, batches: &TableBatches) -> Result<StageStats, StageError> {
        let names = self.ensure_all(batches).await?;
        let started = Instant::now();
        let cols = columns(batches);
        if self.db.dialect == Dialect::Postgres {
            match self.copy(&names, &cols).await {
                // A copy that went through staged every row it was offered.
                Ok(()) => {
                    let all: Vec<u64> = cols.iter().map(|c| c.offered).collect();
                    return Ok(record_staged(batches, &cols, &all, started));
                }
                // Whatever failed (a duplicate, or the database), the statement below either
                // stages the request or reports the error as it always has.
                Err(e) => {
                    tracing::debug!(code = %target::sqlstate(&e), "staging by copy failed; inserting instead")
                }
            }
        }
        let stmt = sql::insert(&names);
        let result =
            target::retry(|| bind_columns(sqlx::query(&stmt), &cols).fetch_one(&self.db.pool))
                .await;
        self.record_insert(batches, &cols, result, started)
    }

    /// Copies every table's rows in one transaction (see [`Stager::stage`]).
    async fn copy(&self, names: &[String], cols: &[Columns<'_>]) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        for (name, c) in names.iter().zip(cols) {
            let rows = (0..c.nanos.len())
                .map(|i| (c.nanos[i], c.logical[i], c.keys[i], c.muts[i], c.befores[i]));
            let size: usize = c.muts.iter().map(|m| m.len()).sum::<usize>()
                + c.keys.iter().map(|k| k.len()).sum::<usize>();
            let data = sql::copy_rows(rows, size);
            let mut copy = tx.copy_in_raw(&sql::copy(name)).await?;
            copy.send(data).await?;
            copy.finish().await?;
        }
        tx.commit().await
    }

    /// Like [`Stager::stage`], inside the caller's transaction.
    pub async fn stage_on(
        &self,
        conn: &mut PgConnection,
        batches: &TableBatches,
    ) -> Result<StageStats, StageError> {
        if batches.is_empty() {
            return Ok(StageStats::default());
        }
        let names = self.ensure_all(batches).await?;
        let started = Instant::now();
        let cols = columns(batches);
        let stmt = sql::insert(&names);
        let result = bind_columns(sqlx::query(&stmt), &cols)
            .fetch_one(&mut *conn)
            .await;
        self.record_insert(batches, &cols, result, started)
    }

    /// Best-effort ingest, inside the caller's transaction: stages the mutations of `batches`
    /// whose key already has unapplied staged rows, and returns those keys per table.
    /// Everything else is left to the caller.
    pub async fn stage_if_exists(
        &self,
        conn: &mut PgConnection,
        batches: &TableBatches,
    ) -> Result<HashMap<Table, HashSet<String>>, StageError> {
        let mut hits: HashMap<Table, HashSet<String>> = HashMap::new();
        if batches.is_empty() {
            return Ok(hits);
        }
        let names = self.ensure_all(batches).await?;
        let started = Instant::now();
        let cols = columns(batches);
        let stmt = sql::stage_if_exists(self.db.dialect, &names);
        let rows = match bind_columns(sqlx::query(&stmt), &cols)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                for table in batches.keys() {
                    metrics::counter!(m::STAGE_ERRORS, &labels(table)).increment(1);
                }
                return Err(StageError::Write(e));
            }
        };
        let tables: Vec<&Table> = batches.keys().collect();
        let mut inserted: HashMap<usize, u64> = HashMap::new();
        let mut offered: HashMap<usize, u64> = HashMap::new();
        for r in rows {
            let i: i64 = r.try_get(0).map_err(StageError::Write)?;
            let key: String = r.try_get(1).map_err(StageError::Write)?;
            let n: i64 = r.try_get(2).map_err(StageError::Write)?;
            let Some(table) = usize::try_from(i).ok().and_then(|i| tables.get(i)) else {
                continue;
            };
            inserted.insert(i as usize, n.max(0) as u64);
            *offered.entry(i as usize).or_default() += 1;
            hits.entry((*table).clone()).or_default().insert(key);
        }
        for (i, n) in inserted {
            let l = labels(tables[i]);
            metrics::counter!(m::STAGE_MUTATIONS, &l).increment(n);
            metrics::counter!(m::STAGE_DUPLICATES, &l)
                .increment(offered.get(&i).copied().unwrap_or(0).saturating_sub(n));
            metrics::histogram!(m::STAGE_DURATION, &l).record(started.elapsed().as_secs_f64());
        }
        Ok(hits)
    }

    async fn ensure_all(&self, batches: &TableBatches) -> Result<Vec<String>, StageError> {
        let mut names = Vec::with_capacity(batches.len());
        for table in batches.keys() {
            names.push(self.ensure(table).await?);
        }
        Ok(names)
    }

    /// Metrics and counts of an [`sql::insert`] statement's result.
    fn record_insert(
        &self,
        batches: &TableBatches,
        cols: &[Columns<'_>],
        result: Result<sqlx::postgres::PgRow, sqlx::Error>,
        started: Instant,
    ) -> Result<StageStats, StageError> {
        let row = match result {
            Ok(row) => row,
            Err(e) => {
                for table in batches.keys() {
                    metrics::counter!(m::STAGE_ERRORS, &labels(table)).increment(1);
                }
                return Err(StageError::Write(e));
            }
        };
        let inserted = (0..cols.len())
            .map(|i| row.try_get::<i64, _>(i).map(|n| n.max(0) as u64))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(StageError::Write)?;
        Ok(record_staged(batches, cols, &inserted, started))
    }

    /// A read-only transaction for [`Stager::read`]. On PostgreSQL it steers the planner to the
    /// primary-key order: staging tables are rarely analyzed while they fill, and the planner
    /// then sorts the whole window on disk for every page (measured: 500 ms instead of 5 ms
    /// for a 10,000-row page of a 100,000-row window).
    pub async fn reader(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StageError> {
        let read = |source| StageError::Read {
            table: self.schema.to_string(),
            source,
        };
        let mut tx = self.db.begin().await.map_err(read)?;
        if let Some(settings) = sql::read_settings(self.db.dialect) {
            sqlx::query(settings)
                .execute(&mut *tx)
                .await
                .map_err(read)?;
        }
        Ok(tx)
    }

    /// Reads unapplied rows of one table with time in `(after, upto]`, in (time, key) order,
    /// at most `limit` rows, stopping early once the rows read hold `max_bytes` (at least one
    /// row is read); `resume_key` continues inside the timestamp `after` itself. Rows stream in,
    /// so a page of wide rows never holds much more than `max_bytes`.
    #[allow(clippy::too_many_arguments)]
    pub async fn read(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        after: Hlc,
        resume_key: Option<&str>,
        upto: Hlc,
        limit: usize,
        max_bytes: usize,
    ) -> Result<StagedPage, StageError> {
        use futures::TryStreamExt;
        let name = self.ensure(table).await?;
        let started = Instant::now();
        let stmt = sql::read(&name, resume_key.is_some());
        let mut q = sqlx::query(&stmt)
            .bind(after.nanos())
            .bind(i64::from(after.logical()))
            .bind(upto.nanos())
            .bind(i64::from(upto.logical()))
            .bind(limit as i64);
        if let Some(k) = resume_key {
            q = q.bind(k);
        }
        let err = |source| StageError::Read {
            table: name.clone(),
            source,
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut full = false;
        {
            let mut rows = q.fetch(&mut *conn);
            while let Some(r) = rows.try_next().await.map_err(err)? {
                let nanos: i64 = r.try_get(0).map_err(err)?;
                let logical: i64 = r.try_get(1).map_err(err)?;
                let key: String = r.try_get(2).map_err(err)?;
                let data: Vec<u8> = r.try_get(3).map_err(err)?;
                let before: Option<Vec<u8>> = r.try_get(4).map_err(err)?;
                bytes += key.len() + data.len() + before.as_ref().map_or(0, Vec::len);
                out.push(Mutation {
                    time: Hlc::new(nanos, logical.clamp(0, i32::MAX as i64) as i32),
                    key,
                    after: json_text(data),
                    before: before.and_then(json_text),
                });
                if out.len() >= limit || bytes >= max_bytes {
                    // Dropping the stream discards the rest of the result on the connection.
                    full = true;
                    break;
                }
            }
        }
        let l = labels(table);
        metrics::counter!(m::STAGE_READ_ROWS, &l).increment(out.len() as u64);
        metrics::histogram!(m::STAGE_READ_DURATION, &l).record(started.elapsed().as_secs_f64());
        Ok(StagedPage { rows: out, full })
    }

    /// Counts the unapplied staged rows of `table` after `after`, stopping at `cap`: one
    /// bounded range scan of the primary key, whatever the table's size.
    pub async fn count_unapplied(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        after: Hlc,
        cap: i64,
    ) -> Result<i64, StageError> {
        let name = self.ensure(table).await?;
        sqlx::query_scalar(&sql::count_unapplied(&name))
            .bind(after.nanos())
            .bind(i64::from(after.logical()))
            .bind(cap)
            .fetch_one(&mut *conn)
            .await
            .map_err(|source| StageError::Read {
                table: name.clone(),
                source,
            })
    }

    /// Deletes the staged rows of `table` in `(after, upto]` (applied, or redelivered
    /// duplicates of applied rows).
    pub async fn retire(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        after: Hlc,
        upto: Hlc,
    ) -> Result<u64, StageError> {
        let name = self.ensure(table).await?;
        let started = Instant::now();
        let done = sqlx::query(&sql::retire(&name))
            .bind(after.nanos())
            .bind(i64::from(after.logical()))
            .bind(upto.nanos())
            .bind(i64::from(upto.logical()))
            .execute(&mut *conn)
            .await
            .map_err(|source| {
                metrics::counter!(m::STAGE_RETIRE_ERRORS, &labels(table)).increment(1);
                StageError::Retire {
                    table: name.clone(),
                    source,
                }
            })?;
        metrics::histogram!(m::STAGE_RETIRE_DURATION, &labels(table))
            .record(started.elapsed().as_secs_f64());
        Ok(done.rows_affected())
    }
}

/// Metrics and counts of a staged request: `inserted` rows per table (in table order), the
/// rest of what each table was offered being duplicates of staged rows.
fn record_staged(
    batches: &TableBatches,
    cols: &[Columns<'_>],
    inserted: &[u64],
    started: Instant,
) -> StageStats {
    let mut stats = StageStats::default();
    for ((table, c), &n) in batches.keys().zip(cols).zip(inserted) {
        let dups = c.offered.saturating_sub(n);
        let l = labels(table);
        metrics::counter!(m::STAGE_MUTATIONS, &l).increment(n);
        metrics::counter!(m::STAGE_DUPLICATES, &l).increment(dups);
        metrics::histogram!(m::STAGE_DURATION, &l).record(started.elapsed().as_secs_f64());
        stats.staged += n;
        stats.duplicates += dups;
    }
    stats
}

fn labels(table: &Table) -> [(&'static str, String); 2] {
    [
        (m::LABEL_SCHEMA, table.schema.to_string()),
        (m::LABEL_TABLE, table.name.raw().to_string()),
    ]
}

/// Staged bytes back to JSON text; `null` means a deletion.
fn json_text(bytes: Vec<u8>) -> Option<String> {
    if bytes == b"null" {
        return None;
    }
    Some(
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

fn columns(batches: &TableBatches) -> Vec<Columns<'_>> {
    batches
        .values()
        .map(|muts| Columns::from(muts.as_slice()))
        .collect()
}

/// Binds each table's five column arrays, in table order.
fn bind_columns<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    cols: &'q [Columns<'q>],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for c in cols {
        q = q
            .bind(&c.nanos)
            .bind(&c.logical)
            .bind(&c.keys)
            .bind(&c.muts)
            .bind(&c.befores);
    }
    q
}

/// One table's batch as the column arrays the insert binds.
/// The texts are borrowed from the mutations: a request's rows are not copied again.
struct Columns<'a> {
    nanos: Vec<i64>,
    logical: Vec<i64>,
    keys: Vec<&'a str>,
    muts: Vec<&'a [u8]>,
    befores: Vec<Option<&'a [u8]>>,
    offered: u64,
}

impl<'a> From<&'a [Mutation]> for Columns<'a> {
    /// De-duplicates on (time, key), keeping the later occurrence in the request.
    fn from(muts: &'a [Mutation]) -> Self {
        let mut seen: HashMap<(Hlc, &str), usize> = HashMap::with_capacity(muts.len());
        let mut order: Vec<&Mutation> = Vec::with_capacity(muts.len());
        for mu in muts {
            match seen.get(&(mu.time, mu.key.as_str())) {
                Some(&i) => order[i] = mu,
                None => {
                    seen.insert((mu.time, mu.key.as_str()), order.len());
                    order.push(mu);
                }
            }
        }
        Columns {
            nanos: order.iter().map(|m| m.time.nanos()).collect(),
            logical: order.iter().map(|m| i64::from(m.time.logical())).collect(),
            keys: order.iter().map(|m| m.key.as_str()).collect(),
            muts: order
                .iter()
                .map(|m| m.after.as_deref().unwrap_or("null").as_bytes())
                .collect(),
            befores: order
                .iter()
                .map(|m| m.before.as_deref().map(str::as_bytes))
                .collect(),
            offered: order.len() as u64,
        }
    }
}

/// Rows read by [`Stager::read`].
#[derive(Debug, Default)]
pub struct StagedPage {
    pub rows: Vec<Mutation>,
    /// The read stopped at its row or byte limit: more rows may follow the last one.
    pub full: bool,
}
