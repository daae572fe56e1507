//! The applier against a real PostgreSQL: types, column mapping, SQL shapes and schema changes.

use crate::support::{eventually, Db};
use cdc_sink::apply::{Applier, ApplyError, TableConfig};
use cdc_sink::hlc::Hlc;
use cdc_sink::ident::{Ident, Schema, Table};
use cdc_sink::mutation::Mutation;
use cdc_sink::target::{Database, Dialect};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

fn applier(db: &Db) -> Applier {
    Applier::new(
        Database {
            pool: db.pool.clone(),
            dialect: Dialect::Postgres,
            database: db.name.clone(),
            name: "target",
        },
        Duration::from_secs(3600),
    )
}

fn table(db: &Db, name: &str) -> Table {
    Table::new(Schema::new(db.name.as_str(), "public"), name)
}

static CLOCK: AtomicI64 = AtomicI64::new(1_000);

fn now() -> Hlc {
    Hlc::new(CLOCK.fetch_add(1, Ordering::Relaxed), 0)
}

fn up(key: &str, after: &str) -> Mutation {
    Mutation {
        time: now(),
        key: key.into(),
        after: Some(after.into()),
        before: None,
    }
}

fn del(key: &str) -> Mutation {
    Mutation {
        time: now(),
        key: key.into(),
        after: None,
        before: None,
    }
}

async fn apply(
    a: &Applier,
    db: &Db,
    t: &Table,
    muts: &[Mutation],
) -> Result<cdc_sink::apply::ApplyStats, ApplyError> {
    let mut conn = db.pool.acquire().await.expect("acquire");
    a.apply(&mut conn, t, muts).await
}

async fn scalar<T>(db: &Db, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// One row of the type matrix (the column types the Go cdc-sink's own tests round-trip): a
/// column type, the JSON a changefeed sends, the value it must equal once stored (a SQL
/// expression), and whether it also serves as a primary key.
struct Case {
    name: &'static str,
    ty: &'static str,
    json: &'static str,
    want: &'static str,
    pk: bool,
    /// The key a changefeed would send for the stored value, when it differs from `json`.
    key: Option<&'static str>,
}

const fn case(
    name: &'static str,
    ty: &'static str,
    json: &'static str,
    want: &'static str,
    pk: bool,
) -> Case {
    Case {
        name,
        ty,
        json,
        want,
        pk,
        key: None,
    }
}

const CASES: &[Case] = &[
    case(
        "string_array",
        "TEXT[]",
        r#"["sky","road","car"]"#,
        "'{sky,road,car}'",
        false,
    ),
    case(
        "string_array_escaping",
        "TEXT[]",
        r#"["a,b","q\"u","b\\s",null,"NULL","","{x}"]"#,
        r#"ARRAY['a,b', 'q"u', 'b\s', NULL, 'NULL', '', '{x}']"#,
        false,
    ),
    case("int_array", "INT8[]", "[1,2,3]", "'{1,2,3}'", false),
    case(
        "int_array_nested",
        "INT8[]",
        "[[1,2],[3,null]]",
        "'{{1,2},{3,NULL}}'",
        false,
    ),
    case("bool", "BOOL", "true", "true", true),
    case(
        "bool_array",
        "BOOL[]",
        "[true,false,null]",
        "'{t,f,NULL}'",
        false,
    ),
    case(
        "bytes",
        "BYTEA",
        r#""\\x613162326333""#,
        r"'\x613162326333'",
        true,
    ),
    case(
        "collated",
        r#"TEXT COLLATE "C""#,
        r#""Zebra""#,
        "'Zebra'",
        true,
    ),
    case("date", "DATE", r#""2016-01-25""#, "'2016-01-25'", true),
    case("decimal", "NUMERIC", "1.2345", "1.2345", true),
    case("decimal_6_0", "NUMERIC(6,0)", "4e+2", "400", true),
    Case {
        key: Some("[498.77]"),
        ..case("decimal_6_2", "NUMERIC(6,2)", "4.98765e+2", "498.77", true)
    },
    case("decimal_600_2", "NUMERIC(600,2)", "4e+50", "4e50", true),
    case("float", "FLOAT8", "1.5e-3", "0.0015", true),
    case("inet", "INET", r#""192.168.0.1""#, "'192.168.0.1'", true),
    case("int", "INT8", "9007199254740995", "9007199254740995", true),
    case(
        "serial8",
        "INT8",
        "148591304110702593",
        "148591304110702593",
        true,
    ),
    case("interval", "INTERVAL", r#""02:30:30""#, "'02:30:30'", true),
    case(
        "jsonb",
        "JSONB",
        r#"{"a":[1,2.5,{"b":null,"c":[true,"x",4e+2]}],"d":{"e":{"f":"g\"h"}},"i":-0.000001}"#,
        r#"'{"a":[1,2.5,{"b":null,"c":[true,"x",400]}],"d":{"e":{"f":"g\"h"}},"i":-0.000001}'"#,
        false,
    ),
    case(
        "jsonb_string",
        "JSONB",
        r#""just text""#,
        r#"'"just text"'"#,
        false,
    ),
    case(
        "string",
        "TEXT",
        r#""a1\\b/2?c\"3""#,
        r#"'a1\b/2?c"3'"#,
        true,
    ),
    case(
        "time",
        "TIME",
        r#""01:23:45.123456""#,
        "'01:23:45.123456'",
        true,
    ),
    case(
        "timestamp",
        "TIMESTAMP",
        r#""2016-01-25T10:10:10.123456""#,
        "'2016-01-25 10:10:10.123456'",
        true,
    ),
    case(
        "timestamptz",
        "TIMESTAMPTZ",
        r#""2016-01-25T10:10:10-05:00""#,
        "'2016-01-25T15:10:10+00:00'",
        true,
    ),
    case(
        "uuid",
        "UUID",
        r#""7f9c24e8-3b12-4fef-91e0-56a2d5a246ec""#,
        "'7f9c24e8-3b12-4fef-91e0-56a2d5a246ec'",
        true,
    ),
    case("varchar", "VARCHAR(2048)", r#""hello""#, "'hello'", true),
    case(
        "varchar_array",
        "VARCHAR(2048)[]",
        r#"["a","b c"]"#,
        "'{a,\"b c\"}'",
        false,
    ),
    case(
        "varbit",
        "BIT VARYING",
        r#""10010101""#,
        "B'10010101'",
        true,
    ),
    case("bit8", "BIT(8)", r#""10010101""#, "B'10010101'", true),
    case("enum", r#""MixedEnum""#, r#""Foo""#, "'Foo'", true),
    case(
        "enum_array",
        r#""MixedEnum"[]"#,
        r#"["Foo","bar",null]"#,
        "'{Foo,bar,NULL}'",
        false,
    ),
];

#[tokio::test]
async fn every_type_round_trips_and_deletes_by_key() {
    let db = Db::new("types").await;
    db.exec(r#"CREATE TYPE "MixedEnum" AS ENUM ('Foo', 'bar')"#)
        .await;
    for c in CASES {
        db.exec(&format!(
            "CREATE TABLE rt_{} (id INT8 PRIMARY KEY, v {})",
            c.name, c.ty
        ))
        .await;
        if c.pk {
            db.exec(&format!(
                "CREATE TABLE pk_{} (k {} PRIMARY KEY)",
                c.name, c.ty
            ))
            .await;
        }
    }
    let a = applier(&db);
    let mut failures = Vec::new();
    for c in CASES {
        // A value and its `_null` variant.
        let t = table(&db, &format!("rt_{}", c.name));
        let muts = [
            up("[1]", &format!(r#"{{"id":1,"v":{}}}"#, c.json)),
            up("[2]", r#"{"id":2,"v":null}"#),
        ];
        if let Err(e) = apply(&a, &db, &t, &muts).await {
            failures.push(format!("{}: upsert: {e}", c.name));
            continue;
        }
        let check = format!(
            "SELECT count(*) FROM rt_{} WHERE (id = 1 AND v IS NOT DISTINCT FROM ({})::{}) OR (id = 2 AND v IS NULL)",
            c.name, c.want, c.ty
        );
        let n: i64 = scalar(&db, &check).await;
        if n != 2 {
            let got: Option<String> = scalar(
                &db,
                &format!("SELECT v::TEXT FROM rt_{} WHERE id = 1", c.name),
            )
            .await;
            failures.push(format!("{}: stored {got:?}, want {}", c.name, c.want));
        }
        if let Err(e) = apply(&a, &db, &t, &[del("[1]"), del("[2]")]).await {
            failures.push(format!("{}: delete: {e}", c.name));
        } else if db.count(&format!("rt_{}", c.name)).await != 0 {
            failures.push(format!("{}: rows left after delete", c.name));
        }

        if !c.pk {
            continue;
        }
        let t = table(&db, &format!("pk_{}", c.name));
        let key = c
            .key
            .map(String::from)
            .unwrap_or_else(|| format!("[{}]", c.json));
        if let Err(e) = apply(&a, &db, &t, &[up(&key, &format!(r#"{{"k":{}}}"#, c.json))]).await {
            failures.push(format!("{}: key upsert: {e}", c.name));
            continue;
        }
        let n: i64 = scalar(
            &db,
            &format!(
                "SELECT count(*) FROM pk_{} WHERE k = ({})::{}",
                c.name, c.want, c.ty
            ),
        )
        .await;
        if n != 1 {
            failures.push(format!("{}: key not stored as {}", c.name, c.want));
        }
        // Upserting an existing PK-only row is a no-op, not an error.
        if let Err(e) = apply(&a, &db, &t, &[up(&key, &format!(r#"{{"k":{}}}"#, c.json))]).await {
            failures.push(format!("{}: key re-upsert: {e}", c.name));
        }
        match apply(&a, &db, &t, &[del(&key)]).await {
            Err(e) => failures.push(format!("{}: key delete: {e}", c.name)),
            Ok(_) if db.count(&format!("pk_{}", c.name)).await != 0 => {
                failures.push(format!("{}: key {key} not deleted", c.name))
            }
            Ok(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "type matrix failures:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn the_last_version_of_each_key_wins_within_one_call() {
    let db = Db::new("lastwins").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, v TEXT)").await;
    let a = applier(&db);
    let t = table(&db, "t");
    let m = |time: i64, key: &str, after: Option<&str>| Mutation {
        time: Hlc::new(time, 0),
        key: key.into(),
        after: after.map(String::from),
        before: None,
    };
    let muts = [
        m(10, "[1]", Some(r#"{"k":1,"v":"old"}"#)),
        m(30, "[1]", Some(r#"{"k":1,"v":"new"}"#)),
        m(20, "[1]", None),
        m(10, "[2]", Some(r#"{"k":2,"v":"gone"}"#)),
        m(20, "[2]", None),
        m(5, "[3]", Some(r#"{"k":3,"v":"three"}"#)),
    ];
    let stats = apply(&a, &db, &t, &muts).await.unwrap();
    assert_eq!((stats.upserts, stats.deletes), (2, 1));
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT k, v FROM t ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, [(1, "new".to_string()), (3, "three".to_string())]);
}

#[tokio::test]
async fn absent_properties_write_the_default_and_explicit_nulls_write_null() {
    let db = Db::new("defaults").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, v TEXT, d TEXT DEFAULT 'dflt', n INT8 DEFAULT 42, s SERIAL)")
        .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let rows = || async {
        sqlx::query_as::<_, (i64, Option<String>, Option<String>, Option<i64>)>(
            "SELECT k, v, d, n FROM t ORDER BY k",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    // Insert: absent → default, null → NULL; rows of different shapes in one statement.
    apply(
        &a,
        &db,
        &t,
        &[
            up("[1]", r#"{"k":1}"#),
            up("[2]", r#"{"k":2,"v":"x","d":null,"n":null}"#),
            up("[3]", r#"{"k":3,"d":"set","n":7}"#),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        rows().await,
        [
            (1, None, Some("dflt".into()), Some(42)),
            (2, Some("x".into()), None, None),
            (3, None, Some("set".into()), Some(7)),
        ]
    );
    let serials: i64 = scalar(&db, "SELECT count(DISTINCT s) FROM t").await;
    assert_eq!(serials, 3);
    // Update: a full-row replacement, so absent columns go back to their default (or NULL).
    apply(
        &a,
        &db,
        &t,
        &[
            up("[1]", r#"{"k":1,"d":"now set","n":null}"#),
            up("[2]", r#"{"k":2}"#),
            up("[3]", r#"{"k":3,"v":"y"}"#),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        rows().await,
        [
            (1, None, Some("now set".into()), None),
            (2, None, Some("dflt".into()), Some(42)),
            (3, Some("y".into()), Some("dflt".into()), Some(42)),
        ]
    );
}

#[tokio::test]
async fn generated_columns_are_never_written() {
    let db = Db::new("generated").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, v INT8, twice INT8 GENERATED ALWAYS AS (v * 2) STORED);
         CREATE TABLE g (a INT8, b INT8 GENERATED ALWAYS AS (a + 1) STORED, v TEXT, PRIMARY KEY (a, b));",
    )
    .await;
    let a = applier(&db);
    let info = a
        .schemas()
        .schema(&Schema::new(db.name.as_str(), "public"))
        .await
        .unwrap();
    let ts = info.table(&table(&db, "t")).unwrap();
    assert!(ts
        .columns
        .iter()
        .any(|c| c.name == Ident::new("twice") && c.ignored));

    apply(
        &a,
        &db,
        &table(&db, "t"),
        &[up("[1]", r#"{"k":1,"v":3,"twice":100}"#)],
    )
    .await
    .unwrap();
    let twice: i64 = scalar(&db, "SELECT twice FROM t WHERE k = 1").await;
    assert_eq!(twice, 6);

    // A generated key column is not written but still identifies the row to delete.
    let g = table(&db, "g");
    apply(&a, &db, &g, &[up("[1,2]", r#"{"a":1,"b":999,"v":"x"}"#)])
        .await
        .unwrap();
    apply(&a, &db, &g, &[up("[1,2]", r#"{"a":1,"b":2,"v":"y"}"#)])
        .await
        .unwrap();
    let v: String = scalar(&db, "SELECT v FROM g WHERE a = 1 AND b = 2").await;
    assert_eq!(v, "y");
    apply(&a, &db, &g, &[del("[1,2]")]).await.unwrap();
    assert_eq!(db.count("g").await, 0);
}

#[tokio::test]
async fn payloads_that_do_not_fit_the_table_are_schema_drift() {
    let db = Db::new("drift").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, v TEXT)").await;
    let a = applier(&db);
    let t = table(&db, "t");
    let err = apply(
        &a,
        &db,
        &t,
        &[
            up("[1]", r#"{"k":1,"v":"ok"}"#),
            up("[2]", r#"{"k":2,"zz":1,"Aa":true}"#),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("schema drift detected in {}.public.t at payload object offset 1: unexpected columns: Aa, zz", db.name)
    );
    assert!(!err.is_retryable() && !err.is_unavailable());
    // Nothing is written when any row is refused.
    assert_eq!(db.count("t").await, 0);

    let err = apply(&a, &db, &t, &[up("[1]", r#"{"v":"no key"}"#)])
        .await
        .unwrap_err();
    assert!(err.to_string().ends_with("missing PK columns: k"), "{err}");

    let err = apply(&a, &db, &t, &[del("[1,2]")]).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("inconsistent number of key columns: received 2 expect 1: key [1,2]@"),
        "{err}"
    );

    // A value the column cannot hold is the database's error, reported with the table.
    let err = apply(&a, &db, &t, &[up("[1]", r#"{"k":"one"}"#)])
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("22P02"), "{err}");
    assert!(
        cdc_sink::error::ErrorChain(&err)
            .to_string()
            .starts_with(&format!("cannot write to {}.public.t: ", db.name)),
        "{err}"
    );

    // Unknown tables are refused.
    let err = apply(&a, &db, &table(&db, "nosuch"), &[up("[1]", r#"{"k":1}"#)])
        .await
        .unwrap_err();
    assert!(matches!(err, ApplyError::UnknownTable(_)), "{err}");
}

#[tokio::test]
async fn extras_ignore_and_expressions_shape_the_written_row() {
    let db = Db::new("options").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, v TEXT, extra JSONB, fixed TEXT, ign TEXT DEFAULT 'keep')")
        .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(
        &t,
        TableConfig {
            extras: Some(Ident::new("Extra")),
            ignore: ["ign", "junk"].into_iter().map(Ident::new).collect(),
            exprs: [
                (Ident::new("k"), "2 * $0".to_string()),
                (Ident::new("fixed"), "'fixed'".to_string()),
                (Ident::new("v"), "upper($0)".to_string()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        },
    );
    apply(
        &a,
        &db,
        &t,
        &[
            up(
                "[21]",
                r#"{"k":21,"v":"a","heretofore":"unseen","are":"OK","junk":1,"ign":"no","fixed":"no"}"#,
            ),
            up("[5]", r#"{"k":5,"v":"b"}"#),
        ],
    )
    .await
    .unwrap();
    let rows: Vec<(i64, String, Option<String>, String, String)> =
        sqlx::query_as("SELECT k, v, extra::TEXT, fixed, ign FROM t ORDER BY k")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [
            (10, "B".into(), None, "fixed".into(), "keep".into()),
            (
                42,
                "A".into(),
                Some(r#"{"are": "OK", "heretofore": "unseen"}"#.into()),
                "fixed".into(),
                "keep".into()
            ),
        ]
    );
    // Deletes go through the key expressions too.
    apply(&a, &db, &t, &[del("[21]")]).await.unwrap();
    let left: Vec<i64> = sqlx::query_scalar("SELECT k FROM t")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, [10]);

    // A configuration naming a missing column is refused.
    a.set_config(
        &t,
        TableConfig {
            extras: Some(Ident::new("nope")),
            ..Default::default()
        },
    );
    let err = apply(&a, &db, &t, &[up("[1]", r#"{"k":1}"#)])
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "extras column name nope not found in table {}.public.t",
            db.name
        )
    );
}

#[tokio::test]
async fn fk_dependency_levels_come_from_the_target_schema() {
    let db = Db::new("fks").await;
    db.exec(
        r#"CREATE TABLE parent (id INT8 PRIMARY KEY);
           CREATE TABLE "Child" (id INT8 PRIMARY KEY, p INT8 REFERENCES parent (id));
           CREATE TABLE grandchild (id INT8 PRIMARY KEY, c INT8 REFERENCES "Child" (id), p INT8 REFERENCES parent (id));
           CREATE TABLE tree (id INT8 PRIMARY KEY, up INT8 REFERENCES tree (id));
           CREATE TABLE alone (id INT8 PRIMARY KEY);
           CREATE VIEW not_a_table AS SELECT 1 AS x;
           CREATE SCHEMA other;
           CREATE TABLE other.x (id INT8 PRIMARY KEY, p INT8 REFERENCES public.grandchild (id));
           CREATE SCHEMA cyc;
           CREATE TABLE cyc.a (id INT8 PRIMARY KEY, b INT8);
           CREATE TABLE cyc.b (id INT8 PRIMARY KEY, a INT8 REFERENCES cyc.a (id));
           ALTER TABLE cyc.a ADD FOREIGN KEY (b) REFERENCES cyc.b (id);"#,
    )
    .await;
    let a = applier(&db);
    let info = a
        .schemas()
        .schema(&Schema::new(db.name.to_uppercase(), "PUBLIC"))
        .await
        .unwrap();
    let levels: Vec<Vec<&str>> = info
        .levels
        .iter()
        .map(|l| l.iter().map(|t| t.name.raw()).collect())
        .collect();
    assert_eq!(
        levels,
        [
            vec!["alone", "parent", "tree"],
            vec!["Child"],
            vec!["grandchild"]
        ]
    );
    assert_eq!(info.tables.len(), 5);
    // The catalog spelling is kept for quoting.
    let child = info.table(&table(&db, "child")).unwrap();
    assert_eq!(child.table.name.raw(), "Child");
    assert_eq!(child.table.schema.schema.raw(), "public");

    let err = a
        .schemas()
        .schema(&Schema::new(db.name.as_str(), "cyc"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cyclical FK references involving tables {0}.cyc.a, {0}.cyc.b",
            db.name
        )
    );
    let err = a
        .schemas()
        .schema(&Schema::new("elsewhere", "public"))
        .await
        .unwrap_err();
    assert!(matches!(err, ApplyError::WrongDatabase { .. }), "{err}");
}

/// Counts the statements (not rows) that write `table`, with statement-level triggers.
async fn count_statements(db: &Db, table: &str) {
    db.exec(&format!(
        "CREATE TABLE IF NOT EXISTS stmts (op TEXT PRIMARY KEY, n INT8 NOT NULL);
         INSERT INTO stmts VALUES ('INSERT', 0), ('DELETE', 0) ON CONFLICT DO NOTHING;
         CREATE OR REPLACE FUNCTION count_stmt() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN UPDATE stmts SET n = n + 1 WHERE op = TG_OP; RETURN NULL; END $$;
         CREATE TRIGGER {table}_ins AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION count_stmt();
         CREATE TRIGGER {table}_del AFTER DELETE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION count_stmt();"
    ))
    .await;
}

async fn statements(db: &Db, op: &str) -> i64 {
    scalar(db, &format!("SELECT n FROM stmts WHERE op = '{op}'")).await
}

#[tokio::test]
async fn a_5000_row_batch_goes_through_in_few_statements() {
    let db = Db::new("bulk").await;
    db.exec("CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT NOT NULL, ts TIMESTAMPTZ DEFAULT now())")
        .await;
    count_statements(&db, "kv").await;
    let a = applier(&db);
    let t = table(&db, "kv");
    let rows = |gen: &str| -> Vec<Mutation> {
        (0..5000)
            .map(|k| {
                up(
                    &format!("[{k}]"),
                    &format!(r#"{{"k":{k},"v":"{gen}-{k:0>32}"}}"#),
                )
            })
            .collect()
    };

    let start = Instant::now();
    let stats = apply(&a, &db, &t, &rows("insert")).await.unwrap();
    let inserted = start.elapsed();
    assert_eq!(stats.upserts, 5000);
    assert_eq!(db.count("kv").await, 5000);
    assert_eq!(statements(&db, "INSERT").await, 5);

    // Updates of existing rows, in one statement with a larger row limit.
    a.set_config(
        &t,
        TableConfig {
            row_limit: Some(5000),
            ..Default::default()
        },
    );
    let start = Instant::now();
    apply(&a, &db, &t, &rows("update")).await.unwrap();
    let updated = start.elapsed();
    assert_eq!(statements(&db, "INSERT").await, 6);
    let updated_rows: i64 = scalar(&db, "SELECT count(*) FROM kv WHERE v LIKE 'update-%'").await;
    assert_eq!(updated_rows, 5000);

    let keys: Vec<Mutation> = (0..5000).map(|k| del(&format!("[{k}]"))).collect();
    let stats = apply(&a, &db, &t, &keys).await.unwrap();
    assert_eq!(stats.deletes, 5000);
    assert_eq!(db.count("kv").await, 0);
    assert_eq!(statements(&db, "DELETE").await, 1);
    eprintln!("5000 rows: insert {inserted:?}, update {updated:?} (debug build)");
}

#[tokio::test]
async fn a_changed_target_table_is_reloaded_and_the_batch_retried() {
    let db = Db::new("altered").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, v TEXT)").await;
    let a = applier(&db);
    let t = table(&db, "t");
    apply(&a, &db, &t, &[up("[1]", r#"{"k":1,"v":"a"}"#)])
        .await
        .unwrap();

    // A column added on both sides is picked up when a payload carries it.
    db.exec("ALTER TABLE t ADD COLUMN w TEXT").await;
    eventually(
        "the new column to be used",
        Duration::from_secs(10),
        || async {
            apply(&a, &db, &t, &[up("[2]", r#"{"k":2,"v":"b","w":"5"}"#)])
                .await
                .ok()
        },
    )
    .await;

    // A changed column type makes the cached statement fail. Inside a transaction the
    // transaction is lost, so the caller is told to retry it; the retry uses the new SQL.
    db.exec("ALTER TABLE t ALTER COLUMN w TYPE INT8 USING w::INT8")
        .await;
    let mut tx = db.pool.begin().await.unwrap();
    let err = a
        .apply(&mut tx, &t, &[up("[3]", r#"{"k":3,"w":7}"#)])
        .await
        .unwrap_err();
    assert!(matches!(err, ApplyError::SchemaChanged { .. }), "{err}");
    assert!(err.is_retryable());
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    a.apply(&mut tx, &t, &[up("[3]", r#"{"k":3,"w":7}"#)])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // Outside a transaction the applier retries by itself.
    db.exec("ALTER TABLE t ALTER COLUMN w TYPE BOOL USING w <> 0")
        .await;
    apply(&a, &db, &t, &[up("[4]", r#"{"k":4,"w":true}"#)])
        .await
        .unwrap();
    let rows: Vec<(i64, Option<bool>)> = sqlx::query_as("SELECT k, w FROM t ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        [(1, None), (2, Some(true)), (3, Some(true)), (4, Some(true))]
    );
}
