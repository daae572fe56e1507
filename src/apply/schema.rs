//! The target schema: introspection of tables, their columns as the applier needs them,
//! and the foreign-key dependency order (tables that reference no other come first, and each child sits one level below its deepest parent); and the [`SchemaCache`] that keeps what was
//! read, shared by the applier and everyone else who asks about the target's tables.

use super::{sql, ApplyError};
use crate::ident::{Ident, Schema, Table};
use crate::target::{Database, Dialect};
use sqlx::PgConnection;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One column of a target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Spelled as in the catalog.
    pub name: Ident,
    pub primary: bool,
    /// Type to cast to: `INT8`, `TEXT[]`, `TEXT COLLATE "C"`, `"db"."sch"."MyEnum"`.
    pub data_type: String,
    /// The DEFAULT expression, verbatim.
    pub default: Option<String>,
    /// Generated (computed) columns are never written.
    pub ignored: bool,
}

/// A target table: PK columns first in key order, then the others by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// Spelled as in the catalog.
    pub table: Table,
    pub columns: Vec<Column>,
}

impl TableSchema {
    pub fn primary_key(&self) -> impl Iterator<Item = &Column> {
        self.columns.iter().take_while(|c| c.primary)
    }

    pub fn column(&self, name: &Ident) -> Option<&Column> {
        self.columns.iter().find(|c| &c.name == name)
    }
}

/// Everything known about one target schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaInfo {
    pub tables: BTreeMap<Table, Arc<TableSchema>>,
    /// Tables grouped by FK depth: level 0 references nothing; alphabetical inside a level.
    pub levels: Vec<Vec<Table>>,
}

impl SchemaInfo {
    pub fn table(&self, table: &Table) -> Option<&Arc<TableSchema>> {
        self.tables.get(table)
    }

    /// Keeps the previous `Arc` of every unchanged table, so prepared SQL survives a refresh.
    pub(crate) fn reuse(mut self, old: &SchemaInfo) -> SchemaInfo {
        for (t, ts) in self.tables.iter_mut() {
            if let Some(prev) = old.tables.get(t) {
                if **prev == **ts {
                    *ts = prev.clone();
                }
            }
        }
        self
    }
}

/// Minimum age of a cached schema before a table or a payload that does not fit it triggers a
/// reload; bounds the introspection load while a real drift keeps failing.
pub(super) const DRIFT_REFRESH: Duration = Duration::from_secs(1);

/// How long one caller's claim on reloading a stale schema holds off the others.
const RELOAD_CLAIM: Duration = Duration::from_secs(30);

struct Cached {
    info: Arc<SchemaInfo>,
    loaded: Instant,
    /// One caller reloads a stale schema; the others keep using the old one meanwhile. A
    /// time, not a flag, so a reload whose future was dropped does not block later ones.
    reloading: Option<Instant>,
}

enum Lookup {
    Fresh(Arc<SchemaInfo>),
    /// Stale, and this caller now owns the reload.
    Reload(Arc<SchemaInfo>),
    Missing,
}

struct CacheInner {
    target: Database,
    refresh: Duration,
    schemas: Mutex<HashMap<Schema, Cached>>,
}

/// The target schemas this process has loaded, each trusted for the refresh interval
/// (`--schemaRefresh`) and then reloaded by one caller while the others keep the previous one.
/// Cheap to clone; all clones share the cache. The applier holds one
/// ([`super::Applier::schemas`]); ingest, the mode choice and the pipelines ask it too.
#[derive(Clone)]
pub struct SchemaCache {
    inner: Arc<CacheInner>,
}

impl std::fmt::Debug for SchemaCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaCache")
            .field("database", &self.inner.target.database)
            .field("refresh", &self.inner.refresh)
            .finish_non_exhaustive()
    }
}

impl SchemaCache {
    /// `refresh` is how long a loaded schema is trusted.
    pub fn new(target: Database, refresh: Duration) -> SchemaCache {
        SchemaCache {
            inner: Arc::new(CacheInner {
                target,
                refresh,
                schemas: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The schemas loaded so far (those this process has written to or been asked about).
    pub fn cached_schemas(&self) -> Vec<Schema> {
        let mut out: Vec<Schema> = self
            .inner
            .schemas
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        out.sort_by_key(|s| s.canonical());
        out
    }

    /// The schema, from cache while younger than the refresh interval.
    pub async fn schema(&self, schema: &Schema) -> Result<Arc<SchemaInfo>, ApplyError> {
        self.current(None, schema).await
    }

    /// Reloads the schema now.
    pub async fn refresh(&self, schema: &Schema) -> Result<Arc<SchemaInfo>, ApplyError> {
        self.check_database(schema)?;
        self.load(None, schema).await
    }

    /// PostgreSQL resolves names only inside the connected database.
    fn check_database(&self, schema: &Schema) -> Result<(), ApplyError> {
        let t = &self.inner.target;
        if t.dialect == Dialect::Postgres && schema.db != Ident::new(t.database.as_str()) {
            return Err(ApplyError::WrongDatabase {
                schema: schema.to_string(),
                database: t.database.clone(),
            });
        }
        Ok(())
    }

    fn lookup(&self, schema: &Schema) -> Lookup {
        let mut schemas = self
            .inner
            .schemas
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match schemas.get_mut(schema) {
            None => Lookup::Missing,
            Some(c)
                if c.loaded.elapsed() < self.inner.refresh
                    || c.reloading.is_some_and(|t| t.elapsed() < RELOAD_CLAIM) =>
            {
                Lookup::Fresh(c.info.clone())
            }
            Some(c) => {
                c.reloading = Some(Instant::now());
                Lookup::Reload(c.info.clone())
            }
        }
    }

    /// The cached schema, reloaded through `conn` (or the pool) when stale. Reload errors after
    /// the first load are only logged: the previous schema stays in use.
    pub(super) async fn current(
        &self,
        conn: Option<&mut PgConnection>,
        schema: &Schema,
    ) -> Result<Arc<SchemaInfo>, ApplyError> {
        self.check_database(schema)?;
        match self.lookup(schema) {
            Lookup::Fresh(info) => Ok(info),
            Lookup::Missing => self.load(conn, schema).await,
            Lookup::Reload(old) => match self.load(conn, schema).await {
                Ok(info) => Ok(info),
                Err(e) => {
                    tracing::warn!(schema = %schema, error = %crate::error::ErrorChain(&e), "schema refresh failed; keeping the previous schema");
                    Ok(old)
                }
            },
        }
    }

    /// Reads the schema through `conn` (or the pool) and caches it, keeping the previous
    /// `Arc` of every unchanged table.
    pub(super) async fn load(
        &self,
        conn: Option<&mut PgConnection>,
        schema: &Schema,
    ) -> Result<Arc<SchemaInfo>, ApplyError> {
        let dialect = self.inner.target.dialect;
        let loaded = match conn {
            Some(c) => load(c, dialect, schema).await,
            None => match self.inner.target.acquire().await {
                Ok(mut c) => load(&mut c, dialect, schema).await,
                Err(error) => Err(ApplyError::Introspect {
                    schema: schema.to_string(),
                    error,
                }),
            },
        };
        let mut schemas = self
            .inner
            .schemas
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match loaded {
            Ok(info) => {
                let info = match schemas.get(schema) {
                    Some(old) => info.reuse(&old.info),
                    None => info,
                };
                let info = Arc::new(info);
                tracing::debug!(schema = %schema, tables = info.tables.len(), "loaded target schema");
                schemas.insert(
                    schema.clone(),
                    Cached {
                        info: info.clone(),
                        loaded: Instant::now(),
                        reloading: None,
                    },
                );
                Ok(info)
            }
            Err(e) => {
                // Try again after another interval rather than on every call.
                if let Some(c) = schemas.get_mut(schema) {
                    c.reloading = None;
                    c.loaded = Instant::now();
                }
                Err(e)
            }
        }
    }

    /// Whether the cached schema was loaded more than `age` ago (or not at all).
    pub(super) fn loaded_before(&self, schema: &Schema, age: Duration) -> bool {
        let schemas = self
            .inner
            .schemas
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        schemas
            .get(schema)
            .is_none_or(|c| c.loaded.elapsed() >= age)
    }
}

/// The type string the reference builds from the catalog's `udt_*` parts: built-ins as their
/// upper-cased short name, user-defined types as a quoted three-part name, `[]` for arrays and
/// ` COLLATE "x"` when a collation is set.
pub fn type_name(
    data_type: &str,
    udt_catalog: &str,
    udt_schema: &str,
    udt_name: &str,
    collation: Option<&str>,
) -> String {
    let (base, array) = match udt_name.strip_prefix('_') {
        Some(b) if data_type.eq_ignore_ascii_case("ARRAY") => (b, "[]"),
        _ => (udt_name, ""),
    };
    // PostGIS installs its types outside pg_catalog; they still get the short spelling that
    // selects the GeoJSON conversion.
    let builtin = udt_schema == "pg_catalog" || matches!(base, "geography" | "geometry");
    let mut s = if builtin {
        base.to_uppercase()
    } else {
        format!(
            "{}.{}.{}",
            Ident::new(udt_catalog).quoted(),
            Ident::new(udt_schema).quoted(),
            Ident::new(base).quoted()
        )
    };
    s.push_str(array);
    if let Some(c) = collation.filter(|c| !c.is_empty()) {
        s.push_str(" COLLATE ");
        s.push_str(&Ident::new(c).quoted());
    }
    s
}

/// One row of [`sql::columns_query`].
type ColumnRow = (
    String,
    String,
    String,
    String,
    Option<i64>,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// Reads `schema` through `conn` (the caller's connection, so a refresh never waits for a
/// pool slot held by the caller itself).
pub(crate) async fn load(
    conn: &mut PgConnection,
    dialect: Dialect,
    schema: &Schema,
) -> Result<SchemaInfo, ApplyError> {
    let introspect = |error| ApplyError::Introspect {
        schema: schema.to_string(),
        error,
    };
    let rows: Vec<ColumnRow> = sqlx::query_as(&sql::columns_query(dialect, schema))
        .bind(schema.schema.raw())
        .fetch_all(&mut *conn)
        .await
        .map_err(introspect)?;
    let fks: Vec<(String, String)> = sqlx::query_as(&sql::foreign_keys_query(dialect, schema))
        .bind(schema.schema.raw())
        .fetch_all(&mut *conn)
        .await
        .map_err(introspect)?;

    let mut by_table: BTreeMap<Table, Vec<(Option<i64>, Column)>> = BTreeMap::new();
    for (
        catalog,
        sch,
        table,
        name,
        pk,
        data_type,
        udt_catalog,
        udt_schema,
        udt_name,
        collation,
        default,
        generated,
    ) in rows
    {
        let table = Table::new(Schema::new(catalog, sch), table);
        // `"Foo"` and `foo` would share one entry here and one staging table.
        if let Some((known, _)) = by_table.get_key_value(&table) {
            if known.name.raw() != table.name.raw() {
                return Err(ApplyError::TableCollision {
                    first: known.to_string(),
                    second: table.to_string(),
                });
            }
        }
        let column = Column {
            name: Ident::new(name),
            primary: pk.is_some(),
            data_type: type_name(
                &data_type,
                &udt_catalog,
                &udt_schema,
                &udt_name,
                collation.as_deref(),
            ),
            default,
            ignored: generated.is_some_and(|g| !matches!(g.as_str(), "NEVER" | "NO")),
        };
        by_table.entry(table).or_default().push((pk, column));
    }
    let mut tables = BTreeMap::new();
    for (table, cols) in by_table {
        let ts = table_schema(table.clone(), cols)?;
        tables.insert(table, Arc::new(ts));
    }
    let names: BTreeSet<Table> = tables.keys().cloned().collect();
    let edges = fks.into_iter().map(|(child, parent)| {
        (
            Table::new(schema.clone(), child),
            Table::new(schema.clone(), parent),
        )
    });
    let levels = dependency_levels(&names, edges)?;
    // Keep the catalog spelling in the levels.
    let levels = levels
        .into_iter()
        .map(|level| {
            level
                .into_iter()
                .map(|t| {
                    tables
                        .get_key_value(&t)
                        .map(|(k, _)| k.clone())
                        .unwrap_or(t)
                })
                .collect()
        })
        .collect();
    Ok(SchemaInfo { tables, levels })
}

/// Orders the columns and supplies the synthetic `rowid` key of a table without one.
fn table_schema(table: Table, cols: Vec<(Option<i64>, Column)>) -> Result<TableSchema, ApplyError> {
    let mut seen = HashSet::new();
    for (_, c) in &cols {
        if !seen.insert(c.name.clone()) {
            return Err(ApplyError::ColumnCollision {
                table: table.to_string(),
                column: c.name.to_string(),
            });
        }
    }
    let (mut pk, mut rest): (Vec<_>, Vec<_>) = cols.into_iter().partition(|(p, _)| p.is_some());
    pk.sort_by_key(|(p, _)| *p);
    rest.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let mut columns: Vec<Column> = pk.into_iter().chain(rest).map(|(_, c)| c).collect();
    if !columns.iter().any(|c| c.primary) {
        let rowid = Ident::new("rowid");
        match columns.iter().position(|c| c.name == rowid) {
            Some(i) => {
                let mut c = columns.remove(i);
                c.primary = true;
                columns.insert(0, c);
            }
            None => columns.insert(
                0,
                Column {
                    name: rowid,
                    primary: true,
                    data_type: "INT8".into(),
                    default: None,
                    ignored: false,
                },
            ),
        }
    }
    Ok(TableSchema { table, columns })
}

/// Groups tables by FK depth: roots (referencing nothing) are level 0, a child is one deeper
/// than its deepest parent. Self-references and references leaving the set are ignored; a cycle
/// is an error naming the tables that cannot be ordered.
pub fn dependency_levels(
    tables: &BTreeSet<Table>,
    edges: impl IntoIterator<Item = (Table, Table)>,
) -> Result<Vec<Vec<Table>>, ApplyError> {
    let mut parents: HashMap<&Table, BTreeSet<&Table>> =
        tables.iter().map(|t| (t, BTreeSet::new())).collect();
    let edges: Vec<(Table, Table)> = edges.into_iter().collect();
    for (child, parent) in &edges {
        if child == parent {
            continue;
        }
        let (Some(c), Some(p)) = (tables.get(child), tables.get(parent)) else {
            continue;
        };
        if let Some(set) = parents.get_mut(c) {
            set.insert(p);
        }
    }
    let mut level_of: HashMap<&Table, usize> = HashMap::new();
    let mut levels: Vec<Vec<Table>> = Vec::new();
    while level_of.len() < tables.len() {
        // Tables whose parents all have a level; their own level is one past the deepest.
        let ready: Vec<(&Table, usize)> = tables
            .iter()
            .filter(|t| !level_of.contains_key(t))
            .filter_map(|t| {
                parents[t]
                    .iter()
                    .map(|p| level_of.get(p).map(|l| l + 1))
                    .try_fold(0, |acc, l| l.map(|l| acc.max(l)))
                    .map(|l| (t, l))
            })
            .collect();
        if ready.is_empty() {
            let stuck: Vec<String> = tables
                .iter()
                .filter(|t| !level_of.contains_key(t))
                .map(|t| t.to_string())
                .collect();
            return Err(ApplyError::Cycle {
                tables: stuck.join(", "),
            });
        }
        for (t, l) in ready {
            level_of.insert(t, l);
            if levels.len() <= l {
                levels.resize_with(l + 1, Vec::new);
            }
            levels[l].push(t.clone());
        }
    }
    for level in &mut levels {
        level.sort();
    }
    Ok(levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> Table {
        Table::new(Schema::new("db", "public"), name)
    }

    fn set(names: &[&str]) -> BTreeSet<Table> {
        names.iter().map(|n| t(n)).collect()
    }

    fn names(levels: &[Vec<Table>]) -> Vec<Vec<String>> {
        levels
            .iter()
            .map(|l| l.iter().map(|t| t.name.raw().to_string()).collect())
            .collect()
    }

    #[test]
    fn levels_follow_the_deepest_parent() {
        let tables = set(&["orders", "customers", "items", "lines", "audit", "Zeta"]);
        let edges = [
            (t("orders"), t("customers")),
            (t("lines"), t("orders")),
            (t("lines"), t("items")),
            (t("audit"), t("audit")),
            (t("audit"), t("elsewhere")),
            (t("zeta"), t("Lines")),
        ];
        let levels = dependency_levels(&tables, edges).unwrap();
        assert_eq!(
            names(&levels),
            [
                vec!["audit", "customers", "items"],
                vec!["orders"],
                vec!["lines"],
                vec!["Zeta"],
            ]
        );
    }

    #[test]
    fn an_fk_cycle_is_an_error_naming_its_tables() {
        let tables = set(&["a", "b", "c", "root"]);
        let edges = [
            (t("a"), t("b")),
            (t("b"), t("c")),
            (t("c"), t("a")),
            (t("a"), t("root")),
        ];
        let err = dependency_levels(&tables, edges).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cyclical FK references involving tables db.public.a, db.public.b, db.public.c"
        );
    }

    #[test]
    fn an_empty_schema_has_no_levels() {
        assert!(dependency_levels(&BTreeSet::new(), []).unwrap().is_empty());
    }

    #[test]
    fn type_names_follow_the_reference_spelling() {
        assert_eq!(
            type_name("bigint", "db", "pg_catalog", "int8", None),
            "INT8"
        );
        assert_eq!(
            type_name("ARRAY", "db", "pg_catalog", "_text", None),
            "TEXT[]"
        );
        assert_eq!(
            type_name("character varying", "db", "pg_catalog", "varchar", None),
            "VARCHAR"
        );
        assert_eq!(
            type_name("text", "db", "pg_catalog", "text", Some("C")),
            r#"TEXT COLLATE "C""#
        );
        assert_eq!(
            type_name("USER-DEFINED", "MyDb", "public", "MyEnum", None),
            r#""MyDb"."public"."MyEnum""#
        );
        assert_eq!(
            type_name("ARRAY", "MyDb", "public", "_MyEnum", None),
            r#""MyDb"."public"."MyEnum"[]"#
        );
        assert_eq!(
            type_name("USER-DEFINED", "db", "public", "_odd", None),
            r#""db"."public"."_odd""#
        );
        assert_eq!(
            type_name("USER-DEFINED", "db", "public", "geography", None),
            "GEOGRAPHY"
        );
        assert_eq!(
            type_name(
                "timestamp with time zone",
                "db",
                "pg_catalog",
                "timestamptz",
                None
            ),
            "TIMESTAMPTZ"
        );
    }

    fn col(name: &str, pk: Option<i64>) -> (Option<i64>, Column) {
        (
            pk,
            Column {
                name: Ident::new(name),
                primary: pk.is_some(),
                data_type: "INT8".into(),
                default: None,
                ignored: false,
            },
        )
    }

    #[test]
    fn columns_put_the_key_first_in_key_order() {
        let ts = table_schema(
            t("x"),
            vec![
                col("b", None),
                col("k2", Some(2)),
                col("A", None),
                col("k1", Some(1)),
            ],
        )
        .unwrap();
        let order: Vec<_> = ts.columns.iter().map(|c| c.name.raw()).collect();
        assert_eq!(order, ["k1", "k2", "A", "b"]);
        assert_eq!(ts.primary_key().count(), 2);
    }

    #[test]
    fn a_table_without_key_gets_rowid() {
        let ts = table_schema(t("x"), vec![col("v", None)]).unwrap();
        assert_eq!(ts.columns[0].name.raw(), "rowid");
        assert!(ts.columns[0].primary);
        assert_eq!(ts.columns[0].data_type, "INT8");
        let ts = table_schema(t("x"), vec![col("v", None), col("rowid", None)]).unwrap();
        assert_eq!(ts.columns.len(), 2);
        assert!(ts.columns[0].primary && ts.columns[0].name.raw() == "rowid");
    }

    #[test]
    fn case_insensitive_column_collisions_are_an_error() {
        let err = table_schema(
            t("x"),
            vec![col("k", Some(1)), col("Val", None), col("val", None)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("val"), "{err}");
    }
}
