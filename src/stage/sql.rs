//! Staging SQL for both dialects, kept in one place and golden-tested.

use crate::ident::{fit_identifier, parse_dotted, Ident, Table};
use crate::target::Dialect;
use std::fmt;

/// Where staging tables live: a schema of the target database on PostgreSQL, a database
/// (schema `public`) on CockroachDB.
#[derive(Clone, Debug)]
pub struct StagingSchema {
    dialect: Dialect,
    db: Option<Ident>,
    schema: Ident,
}

impl StagingSchema {
    /// `name` is `_cdc_sink` or `_cdc_sink.public`; on PostgreSQL a two-part name must name the
    /// connected database.
    pub fn parse(name: &str, dialect: Dialect, connected_db: &str) -> Result<Self, String> {
        let parts = parse_dotted(name).map_err(|e| e.to_string())?;
        match (dialect, parts.as_slice()) {
            (Dialect::Cockroach, [db]) => Ok(StagingSchema {
                dialect,
                db: Some(db.clone()),
                schema: Ident::new("public"),
            }),
            (Dialect::Cockroach, [db, schema]) => Ok(StagingSchema {
                dialect,
                db: Some(db.clone()),
                schema: schema.clone(),
            }),
            (Dialect::Postgres, [schema]) => Ok(StagingSchema {
                dialect,
                db: None,
                schema: schema.clone(),
            }),
            (Dialect::Postgres, [db, schema]) if db == &Ident::new(connected_db) => Ok(StagingSchema {
                dialect,
                db: None,
                schema: schema.clone(),
            }),
            (Dialect::Postgres, [db, _]) => Err(format!(
                "on postgresql the staging schema lives in the connected database {connected_db:?}, not {:?}",
                db.raw()
            )),
            _ => Err("expected `schema` or `database.schema`".into()),
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The quoted prefix of every staging object.
    pub fn quoted(&self) -> String {
        match &self.db {
            Some(db) => format!("{}.{}", db.quoted(), self.schema.quoted()),
            None => self.schema.quoted(),
        }
    }

    /// The quoted name of a staging-schema object (`checkpoints`, `leases`, a staging table).
    pub fn object(&self, name: &str) -> String {
        format!("{}.{}", self.quoted(), Ident::new(name).quoted())
    }

    /// The bare name of a target table's staging table: `db_schema_table`, with a hash
    /// suffix where the dialect would cut it (see [`crate::ident::fit_identifier`]).
    pub fn table_name(&self, table: &Table) -> String {
        table.staging_name_within(self.dialect.identifier_limit())
    }

    /// The quoted staging table of a target table.
    pub fn table(&self, table: &Table) -> String {
        self.object(&self.table_name(table))
    }

    /// Creates the staging namespace.
    pub fn bootstrap_sql(&self) -> Vec<String> {
        match (&self.dialect, &self.db) {
            (Dialect::Cockroach, Some(db)) => {
                vec![format!("CREATE DATABASE IF NOT EXISTS {}", db.quoted())]
            }
            _ => vec![format!("CREATE SCHEMA IF NOT EXISTS {}", self.quoted())],
        }
    }
}

impl fmt::Display for StagingSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.db {
            Some(db) => write!(f, "{}.{}", db, self.schema),
            None => write!(f, "{}", self.schema),
        }
    }
}

/// The name of a staging table's index on `key` (the reference's), fitted like the table's
/// name: index names share the schema's namespace, so a cut one could name another's index.
pub(super) fn key_index_name(dialect: Dialect, bare: &str) -> String {
    fit_identifier(&format!("{bare}_key_applied"), dialect.identifier_limit())
}

/// The staging registry: which target table owns each staging table name, so that two tables
/// whose names map to one staging table are refused instead of sharing it.
pub(super) const REGISTRY: &str = "staging_tables";

pub(super) fn registry_ddl(dialect: Dialect, quoted: &str) -> String {
    let text = match dialect {
        Dialect::Postgres => "TEXT",
        Dialect::Cockroach => "STRING",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {quoted} (staging_name {text} PRIMARY KEY, \
group_name {text} NOT NULL, table_name {text} NOT NULL)"
    )
}

/// Claims a staging name for `(group_name, table_name)` unless someone holds it (`$1..$3`).
pub(super) fn registry_claim(quoted: &str) -> String {
    format!(
        "INSERT INTO {quoted} (staging_name, group_name, table_name) VALUES ($1, $2, $3) \
ON CONFLICT (staging_name) DO NOTHING"
    )
}

/// The owner of a staging name (`$1`).
pub(super) fn registry_owner(quoted: &str) -> String {
    format!("SELECT group_name, table_name FROM {quoted} WHERE staging_name = $1")
}

/// The registered tables of one schema (`$1` is its group name).
pub(super) fn registry_tables(quoted: &str) -> String {
    format!("SELECT table_name FROM {quoted} WHERE group_name = $1 ORDER BY table_name")
}

/// DDL of one staging table. CockroachDB keeps the reference's column families and index.
/// PostgreSQL gets the index on `key` only with `key_index`: [`stage_if_exists`] needs it, and
/// every staged row pays for it (measured: a third to two thirds more time per staging
/// insert), so it is built only for schemas that run best-effort (see [`key_index_sql`]).
pub(super) fn create_table(
    dialect: Dialect,
    quoted: &str,
    bare: &str,
    key_index: bool,
) -> Vec<String> {
    let index = Ident::new(key_index_name(dialect, bare)).quoted();
    match dialect {
        Dialect::Postgres => {
            let mut ddl = vec![format!(
                "CREATE TABLE IF NOT EXISTS {quoted} (\
nanos INT8 NOT NULL, logical INT8 NOT NULL, key TEXT NOT NULL, \
mut BYTEA NOT NULL, before BYTEA, applied BOOL NOT NULL DEFAULT false, \
PRIMARY KEY (nanos, logical, key))"
            )];
            if key_index {
                ddl.push(format!(
                    "CREATE INDEX IF NOT EXISTS {index} ON {quoted} (key) INCLUDE (applied)"
                ));
            }
            ddl
        }
        Dialect::Cockroach => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {quoted} (\
nanos INT8 NOT NULL, logical INT8 NOT NULL, key STRING NOT NULL, \
mut BYTES NOT NULL, before BYTES NULL, applied BOOL NOT NULL DEFAULT false, \
PRIMARY KEY (nanos, logical, key), \
FAMILY cold (nanos, logical, key, mut, before), FAMILY hot (applied))"
            ),
            format!("CREATE INDEX IF NOT EXISTS {index} ON {quoted} (key) STORING (applied)"),
        ],
    }
}

/// One statement staging every table of a request; returns one count of inserted rows per table.
pub(super) fn insert(tables: &[String]) -> String {
    let mut ctes = Vec::with_capacity(tables.len());
    let mut counts = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        let p = i * 5;
        ctes.push(format!(
            "s{i} AS (INSERT INTO {t} (nanos, logical, key, mut, before) \
SELECT * FROM unnest(${}::INT8[], ${}::INT8[], ${}::TEXT[], ${}::BYTEA[], ${}::BYTEA[]) \
ON CONFLICT DO NOTHING RETURNING 1)",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5
        ));
        counts.push(format!("(SELECT count(*) FROM s{i})"));
    }
    format!("WITH {} SELECT {}", ctes.join(", "), counts.join(", "))
}

/// PostgreSQL: streams one table's rows in binary COPY format (see [`copy_rows`]). COPY writes
/// a page of rows per log record where the insert writes one per row, but it cannot skip rows
/// already staged: a duplicate fails it, and the caller stages with [`insert`] instead.
pub(super) fn copy(table: &str) -> String {
    format!("COPY {table} (nanos, logical, key, mut, before) FROM STDIN WITH (FORMAT binary)")
}

/// The binary COPY stream of [`copy`]'s five columns: a signature and two zero words, then per
/// row a field count and each field as a big-endian length (-1 for NULL) and its bytes
/// (integers as 8 big-endian bytes, text as UTF-8), and a -1 trailer.
pub(super) fn copy_rows<'a>(
    rows: impl ExactSizeIterator<Item = (i64, i64, &'a str, &'a [u8], Option<&'a [u8]>)>,
    size_hint: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + 2 + size_hint + rows.len() * 48);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    for (nanos, logical, key, mutation, before) in rows {
        out.extend_from_slice(&5i16.to_be_bytes());
        field(&mut out, &nanos.to_be_bytes());
        field(&mut out, &logical.to_be_bytes());
        field(&mut out, key.as_bytes());
        field(&mut out, mutation);
        match before {
            Some(b) => field(&mut out, b),
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// PostgreSQL: statements that build the `key` index of an existing staging table without
/// blocking its writers, drop a broken one (a build that was interrupted leaves an invalid
/// index behind), and report its state: `(valid, being built)`, no row when it is missing.
/// `qualified` is the schema-qualified index name, as text for `to_regclass` (`$1`).
pub(super) struct KeyIndexSql {
    pub create: String,
    pub drop: String,
    pub status: &'static str,
}

pub(super) fn key_index_sql(quoted_table: &str, index: &str, qualified: &str) -> KeyIndexSql {
    let index = Ident::new(index).quoted();
    KeyIndexSql {
        create: format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {quoted_table} (key) INCLUDE (applied)"
        ),
        drop: format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"),
        status: "SELECT i.indisvalid, EXISTS (SELECT 1 FROM pg_stat_progress_create_index p \
WHERE p.index_relid = i.indexrelid) FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
    }
}

/// Best-effort ingest: one statement that, for every table of a request, stages the proposed
/// mutations whose key already has unapplied staged rows (so a key's versions keep their
/// order) and returns `(table index, key, rows inserted in that table)` for each of them; the
/// caller applies the others directly. Parameters as in [`insert`]. The lookup goes through
/// the `key` index (forced on CockroachDB, as the reference does, so it never scans a table).
pub(super) fn stage_if_exists(dialect: Dialect, tables: &[String]) -> String {
    let hint = match dialect {
        Dialect::Postgres => "",
        Dialect::Cockroach => "@{NO_FULL_SCAN}",
    };
    let mut ctes = Vec::with_capacity(tables.len() * 3);
    let mut selects = Vec::with_capacity(tables.len());
    for (i, t) in tables.iter().enumerate() {
        let p = i * 5;
        ctes.push(format!(
            "p{i} AS (SELECT * FROM unnest(${}::INT8[], ${}::INT8[], ${}::TEXT[], ${}::BYTEA[], ${}::BYTEA[]) \
AS p (nanos, logical, key, mut, before))",
            p + 1,
            p + 2,
            p + 3,
            p + 4,
            p + 5
        ));
        ctes.push(format!(
            "h{i} AS (SELECT * FROM p{i} WHERE EXISTS \
(SELECT 1 FROM {t}{hint} AS s WHERE s.key = p{i}.key AND NOT s.applied))"
        ));
        ctes.push(format!(
            "i{i} AS (INSERT INTO {t} (nanos, logical, key, mut, before) \
SELECT nanos, logical, key, mut, before FROM h{i} ON CONFLICT DO NOTHING RETURNING 1)"
        ));
        selects.push(format!(
            "SELECT {i}::INT8, key, (SELECT count(*) FROM i{i}) FROM h{i}"
        ));
    }
    format!("WITH {} {}", ctes.join(", "), selects.join(" UNION ALL "))
}

/// Keyset-paginated read of unapplied rows in `(after, upto]`; with `resume` the cursor is
/// `(after, $6)` so a large source transaction can be read in pages.
pub(super) fn read(table: &str, resume: bool) -> String {
    let lower = if resume {
        "(nanos, logical, key) > ($1, $2, $6)"
    } else {
        "(nanos, logical) > ($1, $2)"
    };
    format!(
        "SELECT nanos, logical, key, mut, before FROM {table} \
WHERE {lower} AND (nanos, logical) <= ($3, $4) AND NOT applied \
ORDER BY nanos, logical, key LIMIT $5"
    )
}

/// Counts unapplied rows after `($1, $2)`, at most `$3`. The primary-key order keeps the scan
/// on the index from the lower bound (in a read transaction, see `read_settings`): it visits
/// about `$3` entries however many rows the table holds before the bound (measured on
/// PostgreSQL with 2,000,000 staged rows: 40 ms at the cap of 100,000).
pub(super) fn count_unapplied(table: &str) -> String {
    format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} \
WHERE (nanos, logical) > ($1, $2) AND NOT applied ORDER BY nanos, logical LIMIT $3) AS backlog"
    )
}

/// Session settings of a staging read transaction (see `Stager::reader`).
pub(super) fn read_settings(dialect: Dialect) -> Option<&'static str> {
    match dialect {
        Dialect::Postgres => Some(
            "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)",
        ),
        Dialect::Cockroach => None,
    }
}

/// Deletes staged rows in `(after, upto]`. The lower bound matters: without it every delete
/// walks the index entries of all rows deleted before it that vacuum has not removed yet.
pub(super) fn retire(table: &str) -> String {
    format!(
        "DELETE FROM {table} WHERE (nanos, logical) > ($1, $2) AND (nanos, logical) <= ($3, $4)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::Schema;

    #[test]
    fn staging_lives_in_a_schema_on_postgres_and_a_database_on_cockroach() {
        let pg = StagingSchema::parse("_cdc_sink", Dialect::Postgres, "kv").unwrap();
        let t = Table::new(Schema::new("kv", "public"), "KV");
        assert_eq!(pg.table(&t), "\"_cdc_sink\".\"kv_public_kv\"");
        assert_eq!(
            pg.bootstrap_sql(),
            ["CREATE SCHEMA IF NOT EXISTS \"_cdc_sink\""]
        );
        let pg2 = StagingSchema::parse("kv._cdc_sink", Dialect::Postgres, "kv").unwrap();
        assert_eq!(pg2.quoted(), "\"_cdc_sink\"");
        assert!(StagingSchema::parse("other._cdc_sink", Dialect::Postgres, "kv").is_err());

        let crdb = StagingSchema::parse("_cdc_sink", Dialect::Cockroach, "defaultdb").unwrap();
        assert_eq!(crdb.table(&t), "\"_cdc_sink\".\"public\".\"kv_public_kv\"");
        assert_eq!(
            crdb.bootstrap_sql(),
            ["CREATE DATABASE IF NOT EXISTS \"_cdc_sink\""]
        );
        assert_eq!(
            crdb.object("checkpoints"),
            "\"_cdc_sink\".\"public\".\"checkpoints\""
        );
    }

    #[test]
    fn copy_rows_follow_the_binary_copy_layout() {
        let rows = [
            (1i64, 2i64, "[1]", &b"{}"[..], None),
            (-1, 0, "", &b"null"[..], Some(&b"x"[..])),
        ];
        let out = copy_rows(rows.iter().copied(), 0);
        let mut want: Vec<u8> = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        want.extend([
            0, 5, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2,
        ]);
        want.extend([
            0, 0, 0, 3, b'[', b'1', b']', 0, 0, 0, 2, b'{', b'}', 0xff, 0xff, 0xff, 0xff,
        ]);
        want.extend([
            0, 5, 0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([
            0, 0, 0, 4, b'n', b'u', b'l', b'l', 0, 0, 0, 1, b'x', 0xff, 0xff,
        ]);
        assert_eq!(out, want);
        assert_eq!(
            copy("\"_cdc_sink\".\"t\""),
            "COPY \"_cdc_sink\".\"t\" (nanos, logical, key, mut, before) FROM STDIN WITH (FORMAT binary)"
        );
    }

    #[test]
    fn golden_staging_ddl() {
        let pg_table = "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"kv_public_kv\" (nanos INT8 NOT NULL, logical INT8 NOT NULL, key TEXT NOT NULL, mut BYTEA NOT NULL, before BYTEA, applied BOOL NOT NULL DEFAULT false, PRIMARY KEY (nanos, logical, key))";
        assert_eq!(
            create_table(
                Dialect::Postgres,
                "\"_cdc_sink\".\"kv_public_kv\"",
                "kv_public_kv",
                false
            ),
            [pg_table]
        );
        assert_eq!(
            create_table(Dialect::Postgres, "\"_cdc_sink\".\"kv_public_kv\"", "kv_public_kv", true),
            [
                pg_table,
                "CREATE INDEX IF NOT EXISTS \"kv_public_kv_key_applied\" ON \"_cdc_sink\".\"kv_public_kv\" (key) INCLUDE (applied)"
            ]
        );
        // CockroachDB always has the reference's index.
        for key_index in [false, true] {
            assert_eq!(
            create_table(Dialect::Cockroach, "\"_cdc_sink\".\"public\".\"kv_public_kv\"", "kv_public_kv", key_index),
            [
                "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"public\".\"kv_public_kv\" (nanos INT8 NOT NULL, logical INT8 NOT NULL, key STRING NOT NULL, mut BYTES NOT NULL, before BYTES NULL, applied BOOL NOT NULL DEFAULT false, PRIMARY KEY (nanos, logical, key), FAMILY cold (nanos, logical, key, mut, before), FAMILY hot (applied))",
                "CREATE INDEX IF NOT EXISTS \"kv_public_kv_key_applied\" ON \"_cdc_sink\".\"public\".\"kv_public_kv\" (key) STORING (applied)"
            ]
        );
        }
    }

    #[test]
    fn golden_long_staging_names_per_dialect() {
        let long = Table::new(
            Schema::new("production_analytics", "reporting"),
            "customer_subscription_billing_events_archive_2023",
        );
        let pg =
            StagingSchema::parse("_cdc_sink", Dialect::Postgres, "production_analytics").unwrap();
        assert_eq!(
            pg.table(&long),
            "\"_cdc_sink\".\"production_analytics_reporting_customer_subscr_1150880afa7d025c\""
        );
        let bare = pg.table_name(&long);
        assert_eq!(
            create_table(Dialect::Postgres, &pg.table(&long), &bare, true)[1],
            "CREATE INDEX IF NOT EXISTS \"production_analytics_reporting_customer_subscr_9c683c5c3934190f\" ON \"_cdc_sink\".\"production_analytics_reporting_customer_subscr_1150880afa7d025c\" (key) INCLUDE (applied)"
        );
        // The table name fits, its index name does not.
        let kv = Table::new(
            Schema::new("kv", "public"),
            "customer_subscription_billing_events_archive_23",
        );
        assert_eq!(
            pg.table_name(&kv),
            "kv_public_customer_subscription_billing_events_archive_23"
        );
        assert_eq!(
            key_index_name(Dialect::Postgres, &pg.table_name(&kv)),
            "kv_public_customer_subscription_billing_events_2453387588d002d4"
        );
        // CockroachDB keeps every name whole.
        let crdb = StagingSchema::parse("_cdc_sink", Dialect::Cockroach, "defaultdb").unwrap();
        assert_eq!(
            crdb.table_name(&long),
            "production_analytics_reporting_customer_subscription_billing_events_archive_2023"
        );
        assert_eq!(
            key_index_name(Dialect::Cockroach, &crdb.table_name(&long)),
            "production_analytics_reporting_customer_subscription_billing_events_archive_2023_key_applied"
        );
    }

    #[test]
    fn golden_registry_sql() {
        assert_eq!(
            registry_ddl(Dialect::Postgres, "\"_cdc_sink\".\"staging_tables\""),
            "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"staging_tables\" (staging_name TEXT PRIMARY KEY, group_name TEXT NOT NULL, table_name TEXT NOT NULL)"
        );
        assert_eq!(
            registry_ddl(Dialect::Cockroach, "\"_cdc_sink\".\"public\".\"staging_tables\""),
            "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"public\".\"staging_tables\" (staging_name STRING PRIMARY KEY, group_name STRING NOT NULL, table_name STRING NOT NULL)"
        );
        assert_eq!(
            registry_claim("r"),
            "INSERT INTO r (staging_name, group_name, table_name) VALUES ($1, $2, $3) ON CONFLICT (staging_name) DO NOTHING"
        );
        assert_eq!(
            registry_owner("r"),
            "SELECT group_name, table_name FROM r WHERE staging_name = $1"
        );
        assert_eq!(
            registry_tables("r"),
            "SELECT table_name FROM r WHERE group_name = $1 ORDER BY table_name"
        );
    }

    #[test]
    fn golden_key_index_sql() {
        let sql = key_index_sql(
            "\"_cdc_sink\".\"kv_public_kv\"",
            &key_index_name(Dialect::Postgres, "kv_public_kv"),
            "\"_cdc_sink\".\"kv_public_kv_key_applied\"",
        );
        assert_eq!(
            sql.create,
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"kv_public_kv_key_applied\" ON \"_cdc_sink\".\"kv_public_kv\" (key) INCLUDE (applied)"
        );
        assert_eq!(
            sql.drop,
            "DROP INDEX CONCURRENTLY IF EXISTS \"_cdc_sink\".\"kv_public_kv_key_applied\""
        );
        assert_eq!(
            sql.status,
            "SELECT i.indisvalid, EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = i.indexrelid) FROM pg_index i WHERE i.indexrelid = to_regclass($1)"
        );
    }

    #[test]
    fn golden_stage_if_exists() {
        assert_eq!(
            stage_if_exists(Dialect::Postgres, &["a".into(), "b".into()]),
            "WITH p0 AS (SELECT * FROM unnest($1::INT8[], $2::INT8[], $3::TEXT[], $4::BYTEA[], $5::BYTEA[]) AS p (nanos, logical, key, mut, before)), \
h0 AS (SELECT * FROM p0 WHERE EXISTS (SELECT 1 FROM a AS s WHERE s.key = p0.key AND NOT s.applied)), \
i0 AS (INSERT INTO a (nanos, logical, key, mut, before) SELECT nanos, logical, key, mut, before FROM h0 ON CONFLICT DO NOTHING RETURNING 1), \
p1 AS (SELECT * FROM unnest($6::INT8[], $7::INT8[], $8::TEXT[], $9::BYTEA[], $10::BYTEA[]) AS p (nanos, logical, key, mut, before)), \
h1 AS (SELECT * FROM p1 WHERE EXISTS (SELECT 1 FROM b AS s WHERE s.key = p1.key AND NOT s.applied)), \
i1 AS (INSERT INTO b (nanos, logical, key, mut, before) SELECT nanos, logical, key, mut, before FROM h1 ON CONFLICT DO NOTHING RETURNING 1) \
SELECT 0::INT8, key, (SELECT count(*) FROM i0) FROM h0 UNION ALL SELECT 1::INT8, key, (SELECT count(*) FROM i1) FROM h1"
        );
        assert_eq!(
            stage_if_exists(Dialect::Cockroach, &["\"_cdc_sink\".\"public\".\"kv_public_kv\"".into()]),
            "WITH p0 AS (SELECT * FROM unnest($1::INT8[], $2::INT8[], $3::TEXT[], $4::BYTEA[], $5::BYTEA[]) AS p (nanos, logical, key, mut, before)), \
h0 AS (SELECT * FROM p0 WHERE EXISTS (SELECT 1 FROM \"_cdc_sink\".\"public\".\"kv_public_kv\"@{NO_FULL_SCAN} AS s WHERE s.key = p0.key AND NOT s.applied)), \
i0 AS (INSERT INTO \"_cdc_sink\".\"public\".\"kv_public_kv\" (nanos, logical, key, mut, before) SELECT nanos, logical, key, mut, before FROM h0 ON CONFLICT DO NOTHING RETURNING 1) \
SELECT 0::INT8, key, (SELECT count(*) FROM i0) FROM h0"
        );
    }

    #[test]
    fn golden_staging_queries() {
        assert_eq!(
            insert(&["a".into(), "b".into()]),
            "WITH s0 AS (INSERT INTO a (nanos, logical, key, mut, before) SELECT * FROM unnest($1::INT8[], $2::INT8[], $3::TEXT[], $4::BYTEA[], $5::BYTEA[]) ON CONFLICT DO NOTHING RETURNING 1), \
s1 AS (INSERT INTO b (nanos, logical, key, mut, before) SELECT * FROM unnest($6::INT8[], $7::INT8[], $8::TEXT[], $9::BYTEA[], $10::BYTEA[]) ON CONFLICT DO NOTHING RETURNING 1) \
SELECT (SELECT count(*) FROM s0), (SELECT count(*) FROM s1)"
        );
        assert_eq!(
            read("t", false),
            "SELECT nanos, logical, key, mut, before FROM t WHERE (nanos, logical) > ($1, $2) AND (nanos, logical) <= ($3, $4) AND NOT applied ORDER BY nanos, logical, key LIMIT $5"
        );
        assert!(read("t", true).contains("(nanos, logical, key) > ($1, $2, $6)"));
        assert_eq!(
            retire("t"),
            "DELETE FROM t WHERE (nanos, logical) > ($1, $2) AND (nanos, logical) <= ($3, $4)"
        );
        assert_eq!(
            count_unapplied("t"),
            "SELECT count(*) FROM (SELECT 1 FROM t WHERE (nanos, logical) > ($1, $2) AND NOT applied ORDER BY nanos, logical LIMIT $3) AS backlog"
        );
    }
}
