//! Writing mutations to the target: column mapping and the SQL that upserts and deletes
//! rows. The [`Applier`] only writes; what it needs to know it asks for:
//!
//! - the target's tables come from a [`SchemaCache`] (`schema.rs`: introspection and the cache
//!   of what was read, reloaded after `--schemaRefresh` or when the target says it changed).
//!   The applier holds one ([`Applier::schemas`]); ingest, the mode choice and the pipelines
//!   read the same one.
//! - each table's options ([`TableConfig`]) come from a [`TableConfigs`] given at construction
//!   (`config.rs`; the userscript implements it), asked once per table.
//!
//! Per table, the applier keeps a plan: the upsert and delete statements (one array parameter
//! per column, `unnest`ed into rows, so any number of rows shares one prepared statement) and
//! the mapping from payload properties to those arrays. Plans are rebuilt when the table's
//! columns change, or its options are replaced ([`Applier::set_config`]). Tables with
//! compare-and-set columns or deadlines take the conditional path (`cas`): losers are dropped,
//! or resolved by the table's merge function ([`merge`]; the standard three-way merge is
//! [`standard::merge`]) into unconditional writes and dead-letter rows (`dlq`).

pub(crate) mod canonical;
mod cas;
mod config;
mod dlq;
mod mapping;
pub mod merge;
mod schema;
mod sql;
pub mod standard;
pub mod value;

pub use config::{ApplyArgs, TableConfig, TableConfigs, DEFAULT_DLQ_TABLE, DEFAULT_ROW_LIMIT};
pub use schema::{dependency_levels, type_name, Column, SchemaCache, SchemaInfo, TableSchema};

use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::metrics::{
    APPLY_CONFLICTS, APPLY_DELETES, APPLY_DURATION, APPLY_ERRORS, APPLY_MUTATION_AGE,
    APPLY_RESOLVES, APPLY_UPSERTS,
};
use crate::mutation::Mutation;
use crate::target::{self, Database, Dialect};
use mapping::{Batch, Plan};
use schema::DRIFT_REFRESH;
use sqlx::PgConnection;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// What one [`Applier::apply`] call did, after de-duplication by key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Rows upserted (compare-and-set winners only, on the conditional path).
    pub upserts: u64,
    /// Rows deleted (by key; CAS-guarded deletes only when accepted).
    pub deletes: u64,
    /// Compare-and-set or deadline losers (refused deletes included).
    pub conflicts: u64,
    /// Losers written as the merge function answered (`apply`).
    pub resolved: u64,
    /// Losers sent to the dead-letter queue.
    pub dead_lettered: u64,
}

impl ApplyStats {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: ApplyStats) {
        self.upserts += other.upserts;
        self.deletes += other.deletes;
        self.conflicts += other.conflicts;
        self.resolved += other.resolved;
        self.dead_lettered += other.dead_lettered;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("schema {schema} is not in the connected database {database}")]
    WrongDatabase { schema: String, database: String },
    #[error("cannot read the schema {schema}")]
    Introspect {
        schema: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("cyclical FK references involving tables {tables}")]
    Cycle { tables: String },
    #[error("table {table} has more than one column named {column} (names are case-insensitive)")]
    ColumnCollision { table: String, column: String },
    #[error("table {0} not found in the target schema")]
    UnknownTable(String),
    #[error(
        "tables {first} and {second} differ only in case; cdc-sink names tables \
         case-insensitively and cannot tell them apart: rename one of them"
    )]
    TableCollision { first: String, second: String },
    #[error("{0}")]
    Config(String),
    #[error("merge failed for {table}")]
    Merge {
        table: String,
        #[source]
        error: merge::MergeError,
    },
    #[error("a merge function for {table} returned a row that does not fit the table: {detail}")]
    MergedRow { table: String, detail: String },
    #[error(
        "the dead-letter queue table {table} must be created in the target database \
         (or start with --dlqAutoCreate): {ddl}"
    )]
    DlqMissing { table: String, ddl: String },
    #[error("dlq table {table} was found, but it is missing the following columns: {missing}")]
    DlqColumns { table: String, missing: String },
    #[error("cannot create the dead-letter queue table {table}")]
    DlqCreate {
        table: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("schema drift detected in {table} at payload object offset {offset}: {detail}")]
    Drift {
        table: String,
        offset: usize,
        detail: String,
    },
    #[error(
        "schema drift detected in {table}: inconsistent number of key columns: \
         received {received} expect {expected}: key {key}@{time}"
    )]
    KeyLength {
        table: String,
        received: usize,
        expected: usize,
        key: String,
        time: Hlc,
    },
    #[error("invalid payload for {table}: {detail}")]
    Payload { table: String, detail: String },
    #[error("cannot write to {table}")]
    Write {
        table: String,
        #[source]
        error: sqlx::Error,
    },
    #[error("the schema of {table} changed while applying; retry the transaction")]
    SchemaChanged { table: String },
}

impl ApplyError {
    fn database_error(&self) -> Option<&sqlx::Error> {
        match self {
            ApplyError::Introspect { error, .. }
            | ApplyError::Write { error, .. }
            | ApplyError::DlqCreate { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The target database is unreachable or overloaded, or creating the dead-letter table
    /// kept losing races with other instances (HTTP 503, try later).
    pub fn is_unavailable(&self) -> bool {
        if let ApplyError::DlqCreate { error, .. } = self {
            if target::is_ddl_race(&target::sqlstate(error)) {
                return true;
            }
        }
        self.database_error().is_some_and(target::is_unavailable)
    }

    /// Running the same work again may succeed: serialization failures, dropped connections,
    /// a schema reload that needs a fresh transaction.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ApplyError::SchemaChanged { .. })
            || self
                .database_error()
                .is_some_and(|e| target::is_retryable_sqlstate(&target::sqlstate(e)))
    }

    /// The SQLSTATE of a database error (e.g. `23503` for a deferrable FK violation).
    pub fn sqlstate(&self) -> Option<String> {
        self.database_error().map(target::sqlstate)
    }
}

/// SQLSTATEs meaning our idea of the table is out of date: undefined column, table or type,
/// a changed column type, a changed primary key.
fn is_schema_change(e: &sqlx::Error) -> bool {
    matches!(
        target::sqlstate(e).as_str(),
        "42703" | "42P01" | "42704" | "42804" | "42P10"
    )
}

/// Why executing a batch failed: a statement (perhaps our schema is out of date) or anything
/// else.
pub(crate) enum Failure {
    Sql(sqlx::Error),
    Apply(ApplyError),
}

struct Inner {
    target: Database,
    options: ApplyArgs,
    schemas: SchemaCache,
    /// Asked for a table's options the first time its plan is built.
    table_configs: Option<Arc<dyn TableConfigs>>,
    dlqs: Mutex<HashMap<Schema, Arc<dlq::DlqTable>>>,
    /// The options of every table planned so far, as `table_configs` answered (or as
    /// [`Applier::set_config`] replaced them).
    configs: RwLock<HashMap<Table, Arc<TableConfig>>>,
    plans: Mutex<HashMap<Table, Arc<Plan>>>,
    default_config: Arc<TableConfig>,
}

/// Writes mutations to target tables. Cheap to clone; all clones share caches. The target's
/// schemas come from its [`SchemaCache`], each table's options from its [`TableConfigs`].
#[derive(Clone)]
pub struct Applier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("dialect", &self.inner.target.dialect)
            .field("database", &self.inner.target.database)
            .finish_non_exhaustive()
    }
}

impl Applier {
    /// `refresh` is how long a loaded schema is trusted (`--schemaRefresh`). Default
    /// [`ApplyArgs`], and every table with the default options.
    pub fn new(target: Database, refresh: Duration) -> Self {
        Self::with_options(target, refresh, ApplyArgs::default(), None)
    }

    /// Like [`Applier::new`], with the apply flags (dead-letter table name and creation) and
    /// where each table's options come from (the userscript, when there is one).
    pub fn with_options(
        target: Database,
        refresh: Duration,
        options: ApplyArgs,
        table_configs: Option<Arc<dyn TableConfigs>>,
    ) -> Self {
        Applier {
            inner: Arc::new(Inner {
                schemas: SchemaCache::new(target.clone(), refresh),
                target,
                options,
                table_configs,
                dlqs: Mutex::new(HashMap::new()),
                configs: RwLock::new(HashMap::new()),
                plans: Mutex::new(HashMap::new()),
                default_config: Arc::new(TableConfig::default()),
            }),
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.inner.target.dialect
    }

    /// The target's schemas, as this applier sees them; shared with whoever else asks.
    pub fn schemas(&self) -> &SchemaCache {
        &self.inner.schemas
    }

    /// Replaces the options of `table`, whatever the [`TableConfigs`] answers: for tests and
    /// tools that build options in code. The next apply rebuilds its SQL.
    pub fn set_config(&self, table: &Table, cfg: TableConfig) {
        self.inner
            .configs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(table.clone(), Arc::new(cfg));
    }

    /// The options of `table`: asked of the [`TableConfigs`] once, then kept, so the plan
    /// (which compares them by identity) is rebuilt only when they are replaced.
    fn config(&self, table: &Table) -> Arc<TableConfig> {
        let known = self
            .inner
            .configs
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .cloned();
        if let Some(cfg) = known {
            return cfg;
        }
        let asked = self
            .inner
            .table_configs
            .as_ref()
            .and_then(|c| c.table_config(table))
            .map(Arc::new)
            .unwrap_or_else(|| self.inner.default_config.clone());
        self.inner
            .configs
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(table.clone())
            .or_insert(asked)
            .clone()
    }

    /// The dead-letter table's name in each target schema (`--dlqTableName`).
    pub fn dlq_table_name(&self) -> &str {
        &self.inner.options.dlq_table_name
    }

    /// The plan of `table`, rebuilt when its columns or configuration changed.
    async fn plan(&self, conn: &mut PgConnection, table: &Table) -> Result<Arc<Plan>, ApplyError> {
        let schemas = &self.inner.schemas;
        let info = schemas.current(Some(&mut *conn), &table.schema).await?;
        let ts = match info.table(table) {
            Some(ts) => ts.clone(),
            // Perhaps created since the last load.
            None if schemas.loaded_before(&table.schema, DRIFT_REFRESH) => schemas
                .load(Some(conn), &table.schema)
                .await?
                .table(table)
                .cloned()
                .ok_or_else(|| ApplyError::UnknownTable(table.to_string()))?,
            None => return Err(ApplyError::UnknownTable(table.to_string())),
        };
        let cfg = self.config(table);
        let mut plans = self
            .inner
            .plans
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = plans.get(table) {
            if Arc::ptr_eq(&p.schema, &ts) && Arc::ptr_eq(&p.config, &cfg) {
                return Ok(p.clone());
            }
        }
        let plan = Arc::new(Plan::new(self.inner.target.dialect, ts, cfg)?);
        plans.insert(table.clone(), plan.clone());
        Ok(plan)
    }

    /// Writes one table's mutations through `conn` (inside the caller's transaction when it has
    /// one): last version per key wins, deletes first, then upserts, at most `row_limit` rows
    /// per statement. The whole batch is validated before anything is written.
    ///
    /// With compare-and-set columns or deadlines, losers are dropped or go through the table's
    /// merge function, and the call runs in a savepoint (a transaction when `conn` has none),
    /// so it writes all or nothing. The locks it takes on losers last until the caller's
    /// commit.
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        muts: &[Mutation],
    ) -> Result<ApplyStats, ApplyError> {
        if muts.is_empty() {
            return Ok(ApplyStats::default());
        }
        let start = Instant::now();
        let result = self.apply_once_or_twice(conn, table, muts).await;
        let labels = crate::metrics::table_labels(table);
        match &result {
            Ok((stats, times)) => {
                metrics::counter!(APPLY_UPSERTS, &labels).increment(stats.upserts);
                metrics::counter!(APPLY_DELETES, &labels).increment(stats.deletes);
                if stats.conflicts > 0 {
                    metrics::counter!(APPLY_CONFLICTS, &labels).increment(stats.conflicts);
                }
                if stats.resolved > 0 {
                    metrics::counter!(APPLY_RESOLVES, &labels).increment(stats.resolved);
                }
                metrics::histogram!(APPLY_DURATION, &labels).record(start.elapsed().as_secs_f64());
                let now = Hlc::from_system_time(SystemTime::now()).seconds();
                let age = metrics::histogram!(APPLY_MUTATION_AGE, &labels);
                for t in times {
                    age.record((now - t.seconds()).max(0.0));
                }
                tracing::debug!(table = %table, upserts = stats.upserts, deletes = stats.deletes,
                    conflicts = stats.conflicts, resolved = stats.resolved,
                    dead_lettered = stats.dead_lettered,
                    elapsed_ms = start.elapsed().as_millis() as u64, "applied batch");
            }
            Err(e) => {
                metrics::counter!(APPLY_ERRORS, &labels).increment(1);
                // The caller logs the error itself; its text may quote row values.
                tracing::debug!(table = %table, code = e.sqlstate().as_deref().unwrap_or("none"), "apply failed");
            }
        }
        result.map(|(stats, _)| stats)
    }

    /// Runs the batch; when the target says our schema is out of date, reloads it and runs the
    /// batch once more with rebuilt SQL.
    async fn apply_once_or_twice(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        muts: &[Mutation],
    ) -> Result<(ApplyStats, Vec<Hlc>), ApplyError> {
        let mut plan = self.plan(conn, table).await?;
        let batch = match plan.prepare(muts) {
            Ok(b) => b,
            // The target may have gained the columns since we last looked: the source and the
            // target are usually altered together.
            Err(ApplyError::Drift { .. })
                if self
                    .inner
                    .schemas
                    .loaded_before(&table.schema, DRIFT_REFRESH) =>
            {
                tracing::info!(table = %table, "payload does not match the cached schema; reloading");
                self.inner
                    .schemas
                    .load(Some(&mut *conn), &table.schema)
                    .await?;
                plan = self.plan(conn, table).await?;
                plan.prepare(muts)?
            }
            Err(e) => return Err(e),
        };
        let error = match self.execute(conn, table, &plan, &batch, muts).await {
            Ok(stats) => return Ok((stats, batch.times)),
            Err(Failure::Sql(e)) if is_schema_change(&e) => e,
            Err(Failure::Sql(error)) => {
                return Err(ApplyError::Write {
                    table: table.to_string(),
                    error,
                })
            }
            Err(Failure::Apply(e)) => return Err(e),
        };
        tracing::info!(table = %table, code = %target::sqlstate(&error), "target schema changed; reloading");
        // The pool, not `conn`: a failed statement has aborted the caller's transaction.
        self.inner.schemas.refresh(&table.schema).await?;
        let replanned = self.plan(conn, table).await?;
        if Arc::ptr_eq(&replanned, &plan) {
            return Err(ApplyError::Write {
                table: table.to_string(),
                error,
            });
        }
        let batch = replanned.prepare(muts)?;
        match self.execute(conn, table, &replanned, &batch, muts).await {
            Ok(stats) => Ok((stats, batch.times)),
            Err(Failure::Sql(e)) if target::sqlstate(&e) == "25P02" => {
                Err(ApplyError::SchemaChanged {
                    table: table.to_string(),
                })
            }
            Err(Failure::Sql(error)) => Err(ApplyError::Write {
                table: table.to_string(),
                error,
            }),
            Err(Failure::Apply(e)) => Err(e),
        }
    }

    /// Sends the batch's statements: deletes, then upserts (conditionally when configured).
    async fn execute(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        plan: &Plan,
        batch: &Batch,
        muts: &[Mutation],
    ) -> Result<ApplyStats, Failure> {
        if plan.conditional.is_some() {
            return self.apply_conditional(conn, table, plan, batch, muts).await;
        }
        let statements = batch
            .deletes
            .iter()
            .map(|c| (plan.delete_sql.as_str(), c))
            .chain(batch.upserts.iter().map(|c| (plan.upsert_sql.as_str(), c)));
        for (sql, chunk) in statements {
            cas::bind(sqlx::query(sql), chunk)
                .execute(&mut *conn)
                .await
                .map_err(Failure::Sql)?;
        }
        Ok(batch.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>(_: &T) {}
    fn assert_send<T: Send>(_: T) {}

    /// The applier is shared across tasks and its futures run on the multi-threaded runtime.
    #[allow(dead_code, unreachable_code, clippy::diverging_sub_expression)]
    fn applier_and_its_futures_are_send(a: Applier, conn: &mut PgConnection, t: Table, s: Schema) {
        assert_send_sync(&a);
        assert_send(a.apply(conn, &t, &[]));
        assert_send_sync(a.schemas());
        assert_send(a.schemas().schema(&s));
        assert_send(a.schemas().refresh(&s));
    }

    /// Counts the questions; configures `cas` on every table.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl TableConfigs for Counting {
        fn table_config(&self, _: &Table) -> Option<TableConfig> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(TableConfig {
                cas: vec![crate::ident::Ident::new("ver")],
                ..TableConfig::default()
            })
        }
    }

    fn lazy_target() -> Database {
        Database {
            pool: sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://localhost/nowhere")
                .expect("lazy pool"),
            dialect: Dialect::Postgres,
            database: "nowhere".into(),
            name: "target",
        }
    }

    /// The plan cache compares options by identity: a table's options must be asked once and
    /// then stay the same `Arc` until replaced.
    #[tokio::test]
    async fn table_options_are_asked_once_per_table_and_replacing_them_wins() {
        let asked = Arc::new(Counting(Default::default()));
        let a = Applier::with_options(
            lazy_target(),
            Duration::from_secs(60),
            ApplyArgs::default(),
            Some(asked.clone()),
        );
        let t = Table::new(Schema::new("nowhere", "public"), "t");
        let u = Table::new(Schema::new("nowhere", "public"), "u");
        let first = a.config(&t);
        assert_eq!(first.cas, [crate::ident::Ident::new("ver")]);
        assert!(Arc::ptr_eq(&first, &a.config(&t)));
        a.config(&u);
        assert_eq!(asked.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        a.set_config(&t, TableConfig::default());
        assert!(a.config(&t).cas.is_empty());
        assert_eq!(asked.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        // Without a source, every table has the defaults.
        let plain = Applier::new(lazy_target(), Duration::from_secs(60));
        assert_eq!(*plain.config(&t), TableConfig::default());
    }

    #[tokio::test]
    async fn the_schema_cache_refuses_a_schema_of_another_database_without_asking_it() {
        let a = Applier::new(lazy_target(), Duration::from_secs(60));
        let err = a
            .schemas()
            .schema(&Schema::new("elsewhere", "public"))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "schema elsewhere.public is not in the connected database nowhere"
        );
        assert!(a.schemas().cached_schemas().is_empty());
    }

    #[test]
    fn errors_classify_for_status_codes() {
        let e = ApplyError::SchemaChanged { table: "t".into() };
        assert!(e.is_retryable() && !e.is_unavailable());
        let e = ApplyError::Write {
            table: "t".into(),
            error: sqlx::Error::PoolTimedOut,
        };
        assert!(e.is_unavailable() && !e.is_retryable());
        assert_eq!(e.to_string(), "cannot write to t");
        assert_eq!(
            crate::error::ErrorChain(&e).to_string(),
            "cannot write to t: pool timed out while waiting for an open connection"
        );
        let e = ApplyError::Drift {
            table: "t".into(),
            offset: 3,
            detail: "missing PK columns: k".into(),
        };
        assert!(!e.is_retryable() && !e.is_unavailable() && e.sqlstate().is_none());
    }
}
