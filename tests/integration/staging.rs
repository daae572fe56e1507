//! Staging table names: one staging table per target table whatever the names, and bootstrap
//! and first-use DDL that any number of instances can run at the same moment.

use crate::support::process::{free_port, Process};
use crate::support::sink::{self, batch, hlc, resolved, upsert, Sink};
use crate::support::Db;
use cdc_sink::ident::{Schema, Table};
use cdc_sink::stage::Stager;
use cdc_sink::target::{self, PoolSettings};
use futures::future::join_all;
use http::StatusCode;
use serde_json::json;
use std::time::Duration;

async fn rows(db: &Db, table: &str) -> Vec<(i64, String)> {
    sqlx::query_as(&format!("SELECT k, v FROM {table} ORDER BY k"))
        .fetch_all(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("read {table}: {e}"))
}

async fn staging_table_exists(db: &Db, name: &str) -> bool {
    sqlx::query_scalar(
        "SELECT count(*) = 1 FROM pg_tables WHERE schemaname = '_cdc_sink' AND tablename = $1",
    )
    .bind(name)
    .fetch_one(&db.pool)
    .await
    .expect("pg_tables")
}

/// A stager of its own on `db`, as another instance would open it.
async fn stager(db: &Db) -> Stager {
    let settings = PoolSettings {
        max_connections: 2,
        max_lifetime: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        idle_in_transaction: Duration::from_secs(60),
    };
    let database = target::open(&db.url(), "target", &settings)
        .await
        .expect("open target");
    Stager::open(database, "_cdc_sink")
        .await
        .expect("open stager")
}

#[tokio::test]
async fn tables_whose_staging_names_share_63_bytes_keep_their_own_rows() {
    let db = Db::new("production_analytics").await;
    let tables = [
        "customer_subscription_billing_events_archive_2023",
        "customer_subscription_billing_events_archive_2024",
        "événements_facturation_abonnés_archivés_2023",
        "événements_facturation_abonnés_archivés_2024",
        // `production_analytics_reporting_` + this is 63 bytes, ending in a 2-byte character.
        "données_clients_archivées_xyé",
    ];
    db.exec("CREATE SCHEMA reporting").await;
    for t in tables {
        db.exec(&format!(
            "CREATE TABLE reporting.\"{t}\" (k INT8 PRIMARY KEY, v TEXT NOT NULL)"
        ))
        .await;
    }
    let sink = Sink::start(&db, &[]).await;
    let elements = tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let k = i as i64 + 1;
            upsert(
                t,
                json!([k]),
                json!({"k": k, "v": format!("row-of-{t}")}),
                1,
            )
        })
        .collect();
    sink.post_ok("/production_analytics/reporting", batch(elements))
        .await;
    sink.post_ok("/production_analytics/reporting", resolved(2))
        .await;
    sink::committed(&db.pool, "production_analytics.reporting", hlc(2)).await;
    for (i, t) in tables.iter().enumerate() {
        assert_eq!(
            rows(&db, &format!("reporting.\"{t}\"")).await,
            [(i as i64 + 1, format!("row-of-{t}"))],
            "{t} holds its own row only"
        );
    }
    // A name that fits keeps today's staging table name: older staging tables keep working.
    let fits = "production_analytics_reporting_données_clients_archivées_xyé";
    assert_eq!(fits.len(), 63);
    assert!(staging_table_exists(&db, fits).await);
    assert!(
        staging_table_exists(
            &db,
            "production_analytics_reporting_customer_subscr_1150880afa7d025c"
        )
        .await
    );

    let schema = Schema::new("production_analytics", "reporting");
    let mut registered = stager(&db)
        .await
        .registered(&schema)
        .await
        .expect("registered");
    registered.sort();
    let mut want: Vec<Table> = tables
        .iter()
        .map(|t| Table::new(schema.clone(), *t))
        .collect();
    want.sort();
    assert_eq!(registered, want);
    sink.stop().await;
}

#[tokio::test]
async fn a_table_whose_staging_name_is_taken_is_refused_naming_both() {
    // `a.b_c.t` and `a.b.c_t` both stage into `a_b_c_t`.
    let db = Db::new("a").await;
    db.exec(
        "CREATE SCHEMA b_c; CREATE TABLE b_c.t (k INT8 PRIMARY KEY, v TEXT NOT NULL); \
         CREATE SCHEMA b; CREATE TABLE b.c_t (k INT8 PRIMARY KEY, v TEXT NOT NULL); \
         CREATE TABLE b.other (k INT8 PRIMARY KEY, v TEXT NOT NULL)",
    )
    .await;
    let sink = Sink::start(&db, &[]).await;
    sink.post_ok(
        "/a/b_c",
        batch(vec![upsert(
            "t",
            json!([1]),
            json!({"k": 1, "v": "first"}),
            1,
        )]),
    )
    .await;

    let (status, body) = sink
        .post(
            "/a/b",
            batch(vec![upsert(
                "c_t",
                json!([1]),
                json!({"k": 1, "v": "second"}),
                1,
            )]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("a.b_c.t") && body.contains("a.b.c_t") && body.contains("a_b_c_t"),
        "{body}"
    );

    // The first table keeps working.
    sink.post_ok(
        "/a/b_c",
        batch(vec![upsert(
            "t",
            json!([2]),
            json!({"k": 2, "v": "later"}),
            2,
        )]),
    )
    .await;
    sink.post_ok("/a/b_c", resolved(3)).await;
    sink::committed(&db.pool, "a.b_c", hlc(3)).await;
    assert_eq!(
        rows(&db, "b_c.t").await,
        [(1, "first".to_string()), (2, "later".to_string())]
    );
    assert!(rows(&db, "b.c_t").await.is_empty());

    // The refused table's schema keeps applying its other tables.
    sink.post_ok(
        "/a/b",
        batch(vec![upsert(
            "other",
            json!([1]),
            json!({"k": 1, "v": "unrelated"}),
            4,
        )]),
    )
    .await;
    sink.post_ok("/a/b", resolved(4)).await;
    sink::committed(&db.pool, "a.b", hlc(4)).await;
    assert_eq!(rows(&db, "b.other").await, [(1, "unrelated".to_string())]);
    sink.stop().await;
}

#[tokio::test]
async fn tables_that_differ_only_in_case_are_refused_naming_both() {
    let db = Db::new("cased").await;
    db.exec(
        "CREATE TABLE public.\"Foo\" (k INT8 PRIMARY KEY, a TEXT); \
         CREATE TABLE public.foo (id INT8 PRIMARY KEY, b TEXT)",
    )
    .await;
    let sink = Sink::start(&db, &[]).await;
    let (status, body) = sink
        .post(
            "/cased/public",
            batch(vec![upsert(
                "foo",
                json!([1]),
                json!({"id": 1, "b": "x"}),
                1,
            )]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("cased.public.Foo") && body.contains("cased.public.foo"),
        "{body}"
    );
    assert_eq!(db.count("public.foo").await, 0);
    sink.stop().await;
}

/// Best-effort mode applies each request at once: a first request creates the staging table
/// (with its key index) and, for a stale row, the dead-letter table.
const DLQ_SCRIPT: &str = r#"import * as api from "cdc-sink@v1";
api.configureTable("t", {
  cas: ["ver"],
  merge: api.standardMerge(() => ({ dlq: "stale" })),
});
"#;

/// Creates schema `fresh` with table `t` holding keys 1..=4 at version 100.
fn fresh_schema(db: &Db, database: &str) {
    db.cluster
        .psql(
            database,
            "CREATE SCHEMA fresh; CREATE TABLE fresh.t (k INT8 PRIMARY KEY, ver INT8 NOT NULL, v TEXT); \
             INSERT INTO fresh.t SELECT k, 100, 'target' FROM generate_series(1, 4) AS k",
        )
        .expect("create schema fresh");
}

/// Every sink sends its first request for schema `fresh` at the same moment: a stale row
/// (dead-lettered) and a new one.
async fn first_requests_together(sinks: &[Sink], database: &str) {
    let path = format!("/{database}/fresh");
    let answers = join_all(sinks.iter().enumerate().map(|(i, s)| {
        let k = i as i64 + 1;
        s.post(
            &path,
            batch(vec![
                upsert("t", json!([k]), json!({"k": k, "ver": 1, "v": "stale"}), 1),
                upsert(
                    "t",
                    json!([k + 10]),
                    json!({"k": k + 10, "ver": 1, "v": "new"}),
                    1,
                ),
            ]),
        )
    }))
    .await;
    for (status, body) in answers {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

#[tokio::test]
async fn instances_started_together_on_a_fresh_database_all_come_up_and_serve() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("dlq.ts");
    std::fs::write(&script, DLQ_SCRIPT).expect("write script");
    let script = script.to_str().expect("utf-8 path").to_string();
    let flags = [
        "--bestEffortOnly",
        "--dlqAutoCreate",
        "--userscript",
        script.as_str(),
    ];
    let db = Db::new("race_0").await;
    for round in 0..10 {
        let database = format!("race_{round}");
        if round > 0 {
            db.cluster
                .psql("postgres", &format!("CREATE DATABASE {database}"))
                .expect("create database");
        }
        let url = db.cluster.url(&database);
        let n = 3 + round % 2;
        let sinks = join_all((0..n).map(|_| Sink::start_url(&url, &flags))).await;
        fresh_schema(&db, &database);
        first_requests_together(&sinks, &database).await;
        let pool = sqlx::PgPool::connect(&url).await.expect("connect");
        let (dead, new): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM fresh.cdc_sink_dlq), \
             (SELECT count(*) FROM fresh.t WHERE v = 'new')",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        assert_eq!((dead, new), (n as i64, n as i64), "round {round}");
        pool.close().await;
        join_all(sinks.into_iter().map(Sink::stop)).await;
    }
}

#[tokio::test]
async fn processes_started_together_on_a_fresh_database_all_come_up_and_serve() {
    let db = Db::new("procs_0").await;
    for round in 0..3 {
        let database = format!("procs_{round}");
        if round > 0 {
            db.cluster
                .psql("postgres", &format!("CREATE DATABASE {database}"))
                .expect("create database");
        }
        let url = db.cluster.url(&database);
        let flags = ["--bestEffortOnly", "--targetConn", url.as_str()];
        let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
        // `Process::start` spawns before its first await: the processes start together.
        let procs = join_all(ports.iter().map(|p| Process::start(&db, *p, &flags))).await;
        fresh_schema(&db, &database);
        let path = format!("/{database}/fresh");
        let answers = join_all(procs.iter().enumerate().map(|(i, p)| {
            let k = i as i64 + 11;
            p.post(
                &path,
                batch(vec![upsert(
                    "t",
                    json!([k]),
                    json!({"k": k, "ver": 1, "v": "new"}),
                    1,
                )]),
            )
        }))
        .await;
        assert!(
            answers.iter().all(|s| *s == StatusCode::OK),
            "round {round}: {answers:?}"
        );
        let n = db
            .cluster
            .psql(&database, "SELECT count(*) FROM fresh.t")
            .expect("count");
        assert_eq!(n.trim(), "8", "round {round}");
    }
}

/// A request staged again, whole or in part (a redelivery), keeps one row per (time, key):
/// copying it fails on the staged rows, and the insert that skips them stages only the new
/// ones, counting the others as duplicates.
#[tokio::test]
async fn a_request_overlapping_staged_rows_stages_only_its_new_ones() {
    use cdc_sink::hlc::Hlc;
    use cdc_sink::mutation::{Mutation, TableBatches};
    let db = Db::new("stage_overlap").await;
    db.exec("CREATE TABLE public.t (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let stager = stager(&db).await;
    let table = Table::new(Schema::new(&db.name, "public"), "t");
    let batch_of = |keys: std::ops::Range<i64>| -> TableBatches {
        let muts = keys
            .map(|k| Mutation {
                time: Hlc::new(1_000 + k, 0),
                key: format!("[{k}]"),
                after: Some(format!("{{\"k\":{k},\"v\":\"v{k}\"}}")),
                before: None,
            })
            .collect();
        [(table.clone(), muts)].into_iter().collect()
    };
    let first = stager.stage(&batch_of(0..10)).await.expect("stage 0..10");
    assert_eq!((first.staged, first.duplicates), (10, 0));
    let again = stager
        .stage(&batch_of(0..10))
        .await
        .expect("stage 0..10 again");
    assert_eq!((again.staged, again.duplicates), (0, 10));
    let overlap = stager.stage(&batch_of(5..15)).await.expect("stage 5..15");
    assert_eq!((overlap.staged, overlap.duplicates), (5, 5));
    let staged: Vec<(i64, String)> = sqlx::query_as(&format!(
        "SELECT nanos, convert_from(mut, 'UTF8') FROM {} ORDER BY nanos",
        stager.staging_table(&table)
    ))
    .fetch_all(&db.pool)
    .await
    .expect("read staging");
    assert_eq!(staged.len(), 15);
    for (i, (nanos, doc)) in staged.iter().enumerate() {
        assert_eq!(*nanos, 1_000 + i as i64);
        assert_eq!(doc, &format!("{{\"k\":{i},\"v\":\"v{i}\"}}"));
    }
}
