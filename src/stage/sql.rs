//! Staging SQL for both dialects, kept in one place and golden-tested.

use crate::ident::{parse_dotted, Ident, Table};
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

    /// The quoted staging table of a target table.
    pub fn table(&self, table: &Table) -> String {
        self.object(&table.staging_name())
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

/// DDL of one staging table. CockroachDB keeps the reference's column families and index.
pub fn create_table(dialect: Dialect, quoted: &str, bare: &str) -> Vec<String> {
    match dialect {
        Dialect::Postgres => vec![format!(
            "CREATE TABLE IF NOT EXISTS {quoted} (\
nanos INT8 NOT NULL, logical INT8 NOT NULL, key TEXT NOT NULL, \
mut BYTEA NOT NULL, before BYTEA, applied BOOL NOT NULL DEFAULT false, \
PRIMARY KEY (nanos, logical, key))"
        )],
        Dialect::Cockroach => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {quoted} (\
nanos INT8 NOT NULL, logical INT8 NOT NULL, key STRING NOT NULL, \
mut BYTES NOT NULL, before BYTES NULL, applied BOOL NOT NULL DEFAULT false, \
PRIMARY KEY (nanos, logical, key), \
FAMILY cold (nanos, logical, key, mut, before), FAMILY hot (applied))"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS {} ON {quoted} (key) STORING (applied)",
                Ident::new(format!("{bare}_key_applied")).quoted()
            ),
        ],
    }
}

/// One statement staging every table of a request; returns one count of inserted rows per table.
pub fn insert(tables: &[String]) -> String {
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

/// Keyset-paginated read of unapplied rows in `(after, upto]`; with `resume` the cursor is
/// `(after, $6)` so a large source transaction can be read in pages.
pub fn read(table: &str, resume: bool) -> String {
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

/// Session settings of a staging read transaction (see `Stager::reader`).
pub fn read_settings(dialect: Dialect) -> Option<&'static str> {
    match dialect {
        Dialect::Postgres => Some(
            "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)",
        ),
        Dialect::Cockroach => None,
    }
}

/// Deletes staged rows in `(after, upto]`. The lower bound matters: without it every delete
/// walks the index entries of all rows deleted before it that vacuum has not removed yet.
pub fn retire(table: &str) -> String {
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
    fn golden_staging_ddl() {
        assert_eq!(
            create_table(Dialect::Postgres, "\"_cdc_sink\".\"kv_public_kv\"", "kv_public_kv"),
            ["CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"kv_public_kv\" (nanos INT8 NOT NULL, logical INT8 NOT NULL, key TEXT NOT NULL, mut BYTEA NOT NULL, before BYTEA, applied BOOL NOT NULL DEFAULT false, PRIMARY KEY (nanos, logical, key))"]
        );
        assert_eq!(
            create_table(Dialect::Cockroach, "\"_cdc_sink\".\"public\".\"kv_public_kv\"", "kv_public_kv"),
            [
                "CREATE TABLE IF NOT EXISTS \"_cdc_sink\".\"public\".\"kv_public_kv\" (nanos INT8 NOT NULL, logical INT8 NOT NULL, key STRING NOT NULL, mut BYTES NOT NULL, before BYTES NULL, applied BOOL NOT NULL DEFAULT false, PRIMARY KEY (nanos, logical, key), FAMILY cold (nanos, logical, key, mut, before), FAMILY hot (applied))",
                "CREATE INDEX IF NOT EXISTS \"kv_public_kv_key_applied\" ON \"_cdc_sink\".\"public\".\"kv_public_kv\" (key) STORING (applied)"
            ]
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
    }
}
