//! The userscript's `apply` callback against a real PostgreSQL: `getTX()` queries, statements
//! and the normal pipeline, inside the caller's transaction.

use crate::support::Db;
use cdc_sink::apply::Applier;
use cdc_sink::hlc::Hlc;
use cdc_sink::ident::{Schema, Table};
use cdc_sink::mutation::Mutation;
use cdc_sink::script::{ScriptError, Userscript};
use cdc_sink::target::{Database, Dialect};
use std::time::Duration;

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

fn up(t: i64, k: i64, after: &str) -> Mutation {
    Mutation {
        time: Hlc::new(t, 0),
        key: format!("[{k}]"),
        after: Some(after.to_string()),
        before: None,
    }
}

fn script(text: &str) -> (tempfile::TempDir, Userscript) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("apply.ts");
    std::fs::write(&path, text).expect("write");
    let s = Userscript::load(&path, &[]).unwrap_or_else(|e| panic!("load: {e}"));
    (dir, s)
}

const APPLY_SCRIPT: &str = r#"import * as api from "cdc-sink@v1";
import { ApplyOp } from "cdc-sink@v1";

api.configureTable("kv", {
  apply: async (ops: ApplyOp[]) => {
    const tx = api.getTX();
    const cols = tx.columns().map((c) => c.name + (c.primary ? "*" : "")).join(",");
    const keep = ops.filter((op) => op.action === "delete" || op.data?._source !== "west");
    for (const op of ops) {
      await tx.exec("INSERT INTO audit (k, what, cols) VALUES ($1, $2, $3)", op.pk[0], op.action, cols);
    }
    const before = await tx.query("SELECT count(*), bool_and(true), $1::JSONB FROM kv WHERE k > $2", { a: 1 }, "0");
    await tx.apply(keep);
    const after = await tx.query("SELECT count(*) FROM kv");
    await tx.exec("INSERT INTO audit (k, what, cols) VALUES (0, $1, $2)",
      "rows " + before[0][0] + "->" + after[0][0] + " " + before[0][1] + " " + before[0][2].a, tx.table());
  },
});
"#;

#[tokio::test]
async fn async_apply_uses_the_target_transaction() {
    let db = Db::new("script_apply").await;
    db.exec(
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT, _source TEXT);
         CREATE TABLE audit (id SERIAL PRIMARY KEY, k INT8, what TEXT, cols TEXT);
         INSERT INTO kv VALUES (100, 'old', 'east');",
    )
    .await;
    let (_d, s) = script(APPLY_SCRIPT);
    let table = Table::new(Schema::new(db.name.as_str(), "public"), "kv");
    assert!(s.has_apply(&table));
    let a = applier(&db);
    let muts = vec![
        up(10, 1, r#"{"k":1,"v":"a","_source":"east"}"#),
        up(11, 2, r#"{"k":2,"v":"b","_source":"west"}"#),
        Mutation {
            time: Hlc::new(12, 0),
            key: "[100]".into(),
            after: None,
            before: None,
        },
    ];
    let mut tx = db.pool.begin().await.unwrap();
    s.apply(&table, &muts, &mut tx, &a)
        .await
        .unwrap_or_else(|e| panic!("apply: {e}"));
    // Nothing is visible outside the transaction until it commits.
    assert_eq!(db.count("audit").await, 0);
    tx.commit().await.unwrap();
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT k, v FROM kv ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, "a".to_string())]);
    let audit: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT k, what, cols FROM audit ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        audit,
        vec![
            (1, "upsert".into(), "k*,_source,v".into()),
            (2, "upsert".into(), "k*,_source,v".into()),
            (100, "delete".into(), "k*,_source,v".into()),
            (
                0,
                "rows 1->1 true 1".into(),
                format!("\"{}\".\"public\".\"kv\"", db.name)
            ),
        ]
    );
}

#[tokio::test]
async fn apply_callbacks_know_the_replication_keys_of_the_target_tables() {
    let db = Db::new("script_replication_key").await;
    db.exec(
        "CREATE TABLE kv (region TEXT, k INT8, v TEXT, PRIMARY KEY (region, k));
         CREATE TABLE audit (id INT8 PRIMARY KEY, what TEXT);",
    )
    .await;
    let (_d, s) = script(
        r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {
  apply: async (ops: any[]) => {
    let i = 0;
    for (const op of ops) {
      const key = op.data ? api.replicationKey("kv", op.data) : api.replicationKey("kv", { k: op.pk[1], region: op.pk[0] });
      await api.getTX().exec("INSERT INTO audit VALUES ($1, $2)", ++i, key + " " + api.replicationKey("audit", { id: i, what: "x" }));
    }
    await api.getTX().apply(ops);
  },
});
"#,
    );
    let table = Table::new(Schema::new(db.name.as_str(), "public"), "kv");
    let a = applier(&db);
    let muts = vec![
        Mutation {
            time: Hlc::new(10, 0),
            key: r#"["east",9007199254740995]"#.into(),
            after: Some(r#"{"v":"a","k":9007199254740995,"region":"east"}"#.into()),
            before: None,
        },
        Mutation {
            time: Hlc::new(11, 0),
            key: r#"["west",-3]"#.into(),
            after: None,
            before: None,
        },
    ];
    let mut tx = db.pool.begin().await.unwrap();
    s.apply(&table, &muts, &mut tx, &a)
        .await
        .unwrap_or_else(|e| panic!("apply: {e}"));
    tx.commit().await.unwrap();
    let audit: Vec<(i64, String)> = sqlx::query_as("SELECT id, what FROM audit ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    // The keys are the staged keys of the rows, 64-bit values exact.
    assert_eq!(
        audit,
        vec![
            (1, format!("{} [1]", muts[0].key)),
            (2, format!("{} [2]", muts[1].key)),
        ]
    );
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT region, k FROM kv")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![("east".to_string(), 9007199254740995)]);
}

#[tokio::test]
async fn a_failing_statement_rejects_the_promise_and_fails_the_batch() {
    let db = Db::new("script_apply_error").await;
    db.exec("CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let (_d, s) = script(
        r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {
  apply: async (ops: any[]) => {
    let caught = "";
    try {
      await api.getTX().exec("INSERT INTO nowhere VALUES (1)");
    } catch (e) {
      caught = String(e);
    }
    if (!caught.includes("nowhere")) throw new Error("expected a rejection, got " + caught);
    await api.getTX().query("SELECT 1");
  },
});
"#,
    );
    let table = Table::new(Schema::new(db.name.as_str(), "public"), "kv");
    let a = applier(&db);
    let mut tx = db.pool.begin().await.unwrap();
    let e = s
        .apply(&table, &[up(1, 1, r#"{"k":1,"v":"a"}"#)], &mut tx, &a)
        .await
        .unwrap_err();
    // The first error aborted the transaction; the second statement fails and is not caught.
    assert!(matches!(e, ScriptError::Js { .. }), "{e}");
    assert!(e.to_string().contains("apply.ts"), "{e}");
    drop(tx);
    assert_eq!(db.count("kv").await, 0);
}

#[test]
fn set_options_override_the_command_line_and_unknown_flags_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ok = dir.path().join("ok.ts");
    std::fs::write(
        &ok,
        "import * as api from \"cdc-sink@v1\";\napi.setOptions({flushSize: \"7\", immediate: \"true\"});\n",
    )
    .unwrap();
    let argv = cdc_sink::sink::loopback_argv(
        "postgres://postgres@127.0.0.1:1/kv",
        &["--flushSize", "500", "--userscript", ok.to_str().unwrap()],
    );
    let prepared = cdc_sink::sink::prepare(argv).expect("script options apply");
    assert_eq!(
        prepared.args.sequence.flush_size, 7,
        "setOptions wins over the command line"
    );
    assert!(prepared.args.sequence.immediate);
    assert!(prepared.script.is_some());

    let bad = dir.path().join("bad.ts");
    std::fs::write(
        &bad,
        "import * as api from \"cdc-sink@v1\";\napi.setOptions({noSuchFlag: \"1\"});\n",
    )
    .unwrap();
    let argv = cdc_sink::sink::loopback_argv(
        "postgres://postgres@127.0.0.1:1/kv",
        &["--userscript", bad.to_str().unwrap()],
    );
    // With its causes, as the command line prints it.
    let err = cdc_sink::sink::prepare(argv)
        .err()
        .expect("unknown flag refused");
    let err = cdc_sink::error::ErrorChain(&err).to_string();
    assert!(err.contains("noSuchFlag"), "{err}");
}

#[tokio::test]
async fn a_quote_and_backslash_parameter_is_stored_verbatim_when_strings_are_not_conforming() {
    let db = Db::new("script_injection").await;
    db.exec(
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT);
         CREATE TABLE audit (k INT8 PRIMARY KEY, v TEXT);
         CREATE TABLE canary (id INT8);",
    )
    .await;
    db.exec(&format!(
        "ALTER DATABASE \"{}\" SET standard_conforming_strings = off",
        db.name
    ))
    .await;
    let (_d, s) = script(
        r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {
  apply: async (ops: any[]) => {
    for (const op of ops) {
      await api.getTX().exec("INSERT INTO audit (k, v) VALUES ($1, $2)", op.data.k, op.data.v);
    }
    const got = await api.getTX().query("SELECT v FROM audit WHERE v = $1", ops[0].data.v);
    if (got.length !== 1) throw new Error("query found " + got.length + " rows");
  },
});
"#,
    );
    let table = Table::new(Schema::new(db.name.as_str(), "public"), "kv");
    let value = r"x\'); DROP TABLE public.canary; --";
    let after = serde_json::json!({ "k": 1, "v": value }).to_string();
    // A pool of our own (not the server's, which pins the setting) so the database default
    // applies: the literal alone must hold.
    let raw = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url())
        .await
        .expect("connect");
    let (setting,): (String,) = sqlx::query_as("SHOW standard_conforming_strings")
        .fetch_one(&raw)
        .await
        .unwrap();
    assert_eq!(
        setting, "off",
        "the database default must reach new sessions"
    );
    let mut tx = raw.begin().await.unwrap();
    s.apply(&table, &[up(1, 1, &after)], &mut tx, &applier(&db))
        .await
        .unwrap_or_else(|e| panic!("apply: {e}"));
    tx.commit().await.unwrap();
    let (canary,): (Option<String>,) = sqlx::query_as("SELECT to_regclass('public.canary')::TEXT")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(canary.as_deref(), Some("canary"));
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT k, v FROM audit")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, value.to_string())]);

    // The server's own sessions are pinned to the standard meaning.
    let settings = cdc_sink::target::PoolSettings {
        max_connections: 2,
        max_lifetime: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        idle_in_transaction: Duration::from_secs(60),
    };
    let target = cdc_sink::target::open(&db.url(), "target", &settings)
        .await
        .expect("open");
    let (setting,): (String,) = sqlx::query_as("SHOW standard_conforming_strings")
        .fetch_one(&target.pool)
        .await
        .unwrap();
    assert_eq!(setting, "on");
}

/// Applies one row of a new `kv` table in database `name` through a script whose `apply`
/// statement fails; the error's text, after the transaction was dropped.
async fn failed_apply(name: &str, statement: &str) -> (Db, String) {
    let db = Db::new(name).await;
    db.exec("CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let (_d, s) = script(&format!(
        r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {{
  apply: async (ops: any[]) => {{
    await api.getTX().exec({statement});
  }},
}});
"#
    ));
    let table = Table::new(Schema::new(db.name.as_str(), "public"), "kv");
    let mut tx = db.pool.begin().await.unwrap();
    let e = s
        .apply(
            &table,
            &[up(1, 1, r#"{"k":1,"v":"a"}"#)],
            &mut tx,
            &applier(&db),
        )
        .await
        .unwrap_err()
        .to_string();
    drop(tx);
    (db, e)
}

#[tokio::test]
async fn a_nul_in_a_statement_parameter_rejects_the_promise() {
    let (db, e) = failed_apply(
        "script_nul",
        r#""INSERT INTO kv VALUES ($1, $2)", 1, "a\u0000b""#,
    )
    .await;
    assert!(e.contains("NUL"), "{e}");
    assert_eq!(db.count("kv").await, 0);
}

#[tokio::test]
async fn a_failed_statement_tells_the_script_its_sqlstate_but_no_value() {
    // The statement spells a value the server quotes back in its message.
    let (_db, e) = failed_apply(
        "script_err",
        r#""INSERT INTO kv VALUES ('secret-marker-7', 'a')""#,
    )
    .await;
    assert!(e.contains("22P02"), "{e}");
    assert!(!e.contains("secret-marker-7"), "{e}");
}

#[tokio::test]
async fn bound_parameters_reach_typed_columns_and_results_come_back_as_exact_text() {
    let db = Db::new("script_types").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE DOMAIN short_text AS TEXT CHECK (length(VALUE) < 10);
         CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT);
         CREATE TABLE typed (k INT8 PRIMARY KEY, n NUMERIC, f FLOAT8, t TIMESTAMPTZ, u UUID,
                             j JSONB, m mood, d short_text, b BOOL, a INT4[], i INT2);
         CREATE TABLE seen (id SERIAL PRIMARY KEY, what TEXT);",
    )
    .await;
    let (_d, s) = script(
        r#"import * as api from "cdc-sink@v1";
api.configureTable("kv", {
  apply: async (ops: any[]) => {
    const tx = api.getTX();
    await tx.exec(
      "INSERT INTO typed VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
      "9007199254740995", "12345678901234567890.123456789", "1e+30", "2024-02-23T23:39:22.135792Z",
      "0e9f8d2c-58d0-4b7e-9c51-6d1e5a8f0b11", { a: [1, "x"] }, "sad", "short", "true", "{1,2,3}", null);
    const rows = await tx.query(
      "SELECT k, n, f, t, u, j, m, d, b, a, i, n * $2 AS n2, $3::TEXT || 'x' FROM typed WHERE k = $1",
      "9007199254740995", "2", "it's\\");
    const r = rows[0];
    const parts = r.map((c: any) => c === null ? "null" : typeof c === "object" ? JSON.stringify(c) : String(c));
    await tx.exec("INSERT INTO seen (what) VALUES ($1)", parts.join("|"));
    // Spellings only the server reads.
    await tx.exec("INSERT INTO kv (k, v) VALUES ($1, $2)", " +12 ", "x");
  },
});
"#,
    );
    let table = Table::new(Schema::new(db.name.as_str(), "public"), "kv");
    let mut tx = db.pool.begin().await.unwrap();
    s.apply(
        &table,
        &[up(1, 1, r#"{"k":1,"v":"a"}"#)],
        &mut tx,
        &applier(&db),
    )
    .await
    .unwrap_or_else(|e| panic!("apply: {e}"));
    tx.commit().await.unwrap();
    let (seen,): (String,) = sqlx::query_as("SELECT what FROM seen")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        seen,
        "9007199254740995|12345678901234567890.123456789|1e+30|2024-02-23 23:39:22.135792+00|\
         0e9f8d2c-58d0-4b7e-9c51-6d1e5a8f0b11|{\"a\":[\"1\",\"x\"]}|sad|short|true|{1,2,3}|null|\
         24691357802469135780.246913578|it's\\x"
    );
    // Numbers inside JSON reach the script as exact decimal strings; the stored value kept
    // its number.
    let (j,): (String,) = sqlx::query_as("SELECT j::TEXT FROM typed")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(j, r#"{"a": [1, "x"]}"#);
    assert_eq!(db.kv_rows().await, vec![(12, Some("x".to_string()))]);
}

#[test]
fn set_options_may_set_the_engine_limits_of_the_script_itself() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("limits.ts");
    std::fs::write(
        &path,
        "import * as api from \"cdc-sink@v1\";\napi.setOptions({userscriptDeadline: \"5s\", userscriptMaxStuck: \"7\"});\n",
    )
    .unwrap();
    let argv = cdc_sink::sink::loopback_argv(
        "postgres://postgres@127.0.0.1:1/kv",
        &["--userscript", path.to_str().unwrap()],
    );
    let prepared = cdc_sink::sink::prepare(argv).expect("script options apply");
    assert_eq!(prepared.args.script.deadline, Duration::from_secs(5));
    assert_eq!(prepared.args.script.max_stuck, 7);
    assert!(prepared.script.is_some());
}
