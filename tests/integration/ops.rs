//! Operator tooling against a real PostgreSQL: `cdc-sink dlq` list, show, purge and replay;
//! the readiness probe and `/_/status`.

use crate::support::process::{free_port, Process};
use crate::support::sink::{self, batch, hlc, resolved, upsert, Sink};
use crate::support::{eventually, Db};
use cdc_sink::apply::merge::{Conflict, MergeError, MergeFn, Merger, Resolution};
use cdc_sink::apply::{Applier, TableConfig};
use cdc_sink::cli::dlq::{self, DlqError, ReplayReport, Selection};
use cdc_sink::hlc::Hlc;
use cdc_sink::ident::{Ident, Schema, Table};
use cdc_sink::mutation::Mutation;
use cdc_sink::server::client::Client;
use cdc_sink::target::{Database, Dialect};
use clap::Parser;
use futures::future::BoxFuture;
use futures::FutureExt;
use http::StatusCode;
use serde_json::json;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

/// Sends every compare-and-set loser to the dead-letter queue under one name.
struct ToDlq(&'static str);

impl Merger for ToDlq {
    fn merge(
        &self,
        conflicts: Vec<Conflict>,
    ) -> BoxFuture<'static, Result<Vec<Resolution>, MergeError>> {
        let out = conflicts
            .iter()
            .map(|_| Resolution::Dlq(self.0.to_string()))
            .collect();
        futures::future::ready(Ok(out)).boxed()
    }
}

fn database(db: &Db) -> Database {
    Database {
        pool: db.pool.clone(),
        dialect: Dialect::Postgres,
        database: db.name.clone(),
        name: "target",
    }
}

fn schema(db: &Db) -> Schema {
    Schema::new(db.name.as_str(), "public")
}

/// An applier where `t` and `u` keep the higher `ver`, their losers going to queues `a` and
/// `b`.
fn applier(db: &Db) -> Applier {
    let a = Applier::new(database(db), Duration::from_secs(3600));
    for (name, q) in [("t", "a"), ("u", "b")] {
        a.set_config(
            &Table::new(schema(db), name),
            TableConfig {
                cas: vec![Ident::new("ver")],
                merge: Some(MergeFn(Arc::new(ToDlq(q)))),
                ..Default::default()
            },
        );
    }
    a
}

fn at(n: i64) -> Hlc {
    Hlc::new(1_000 + n, 0)
}

fn up(k: i64, ver: i64, n: i64) -> Mutation {
    Mutation {
        time: at(n),
        key: json!([k]).to_string(),
        after: Some(json!({"k": k, "ver": ver, "v": format!("dlq{k}")}).to_string()),
        before: None,
    }
}

/// Tables `t` (keys 1..=4) and `u` (key 1) at `ver` 10, and five dead-letter rows: versions
/// 5..=8 of `t`'s keys at source times 1..=4 (queue `a`) and version 5 of `u`'s at 5 (`b`).
async fn setup(name: &str) -> (Db, Applier) {
    let db = Db::new(name).await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); \
         CREATE TABLE u (k INT8 PRIMARY KEY, ver INT8, v TEXT); \
         INSERT INTO t SELECT k, 10, 'target' FROM generate_series(1, 4) AS k; \
         INSERT INTO u VALUES (1, 10, 'target')",
    )
    .await;
    let a = applier(&db);
    let mut tx = db.pool.begin().await.expect("begin");
    let t: Vec<Mutation> = (1..=4).map(|k| up(k, k + 4, k)).collect();
    let s = a
        .apply(&mut tx, &Table::new(schema(&db), "t"), &t)
        .await
        .expect("apply t");
    assert_eq!(s.dead_lettered, 4);
    let s = a
        .apply(&mut tx, &Table::new(schema(&db), "u"), &[up(1, 5, 5)])
        .await
        .expect("apply u");
    assert_eq!(s.dead_lettered, 1);
    tx.commit().await.expect("commit");
    (db, a)
}

fn queue(db: &Db) -> Table {
    dlq::dlq_table(&schema(db), "cdc_sink_dlq")
}

async fn times(db: &Db, sel: &Selection) -> Vec<Hlc> {
    dlq::list(&database(db), &queue(db), sel)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.time)
        .collect()
}

fn in_queue(name: &str) -> Selection {
    Selection {
        dlq: Some(name.into()),
        ..Default::default()
    }
}

async fn t_rows(db: &Db) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT k, ver FROM t ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .expect("read t")
}

#[tokio::test]
async fn dlq_list_filters_show_and_purge_select_exactly_their_rows() {
    let (db, _) = setup("ops_list").await;
    let all = Selection::default();
    assert_eq!(times(&db, &all).await, (1..=5).map(at).collect::<Vec<_>>());
    assert_eq!(times(&db, &in_queue("b")).await, [at(5)]);
    let window = Selection {
        from: Some(at(2)),
        to: Some(at(4)),
        ..Default::default()
    };
    assert_eq!(times(&db, &window).await, [at(2), at(3)]);
    let first = Selection {
        limit: Some(2),
        ..in_queue("a")
    };
    assert_eq!(times(&db, &first).await, [at(1), at(2)]);

    let rows = dlq::list(&database(&db), &queue(&db), &in_queue("b"))
        .await
        .expect("list");
    let shown = dlq::show(&database(&db), &queue(&db), &rows[0].event)
        .await
        .expect("show")
        .expect("found");
    assert_eq!(shown, rows[0]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(shown.after.as_deref().expect("upsert"))
            .expect("json"),
        json!({"k": 1, "ver": 5, "v": "dlq1"})
    );
    assert!(shown.dlq_time.is_some());
    assert!(dlq::show(&database(&db), &queue(&db), "no-such-event")
        .await
        .expect("show")
        .is_none());

    let refused = dlq::purge(&database(&db), &queue(&db), &all, false, false).await;
    assert!(matches!(refused, Err(DlqError::Unfiltered)), "{refused:?}");
    let dry = dlq::purge(&database(&db), &queue(&db), &window, false, true)
        .await
        .expect("dry run");
    assert_eq!(dry.len(), 2);
    assert_eq!(
        db.count("cdc_sink_dlq").await,
        5,
        "a dry run deletes nothing"
    );
    let gone = dlq::purge(&database(&db), &queue(&db), &window, false, false)
        .await
        .expect("purge");
    assert_eq!(gone, dry);
    assert_eq!(times(&db, &all).await, [at(1), at(4), at(5)]);
    dlq::purge(&database(&db), &queue(&db), &all, true, false)
        .await
        .expect("purge --all");
    assert_eq!(db.count("cdc_sink_dlq").await, 0);
}

#[tokio::test]
async fn dlq_replay_applies_rows_that_now_win_and_keeps_those_that_still_lose() {
    let (db, a) = setup("ops_replay").await;
    // Keys 1 and 3 fell behind their dead-lettered versions; 2 and 4 did not.
    db.exec("UPDATE t SET ver = 1 WHERE k IN (1, 3)").await;
    let report = dlq::replay(&a, &database(&db), &queue(&db), &in_queue("a"), 10, |_| {
        ControlFlow::Continue(())
    })
    .await
    .expect("replay");
    assert_eq!(
        report,
        ReplayReport {
            applied: 2,
            lost: 2,
            failed: 0,
            batches: 1,
            interrupted: false
        }
    );
    assert_eq!(t_rows(&db).await, [(1, 5), (2, 10), (3, 7), (4, 10)]);
    // The losers stay once (not dead-lettered again); queue b is untouched.
    assert_eq!(
        times(&db, &Selection::default()).await,
        [at(2), at(4), at(5)]
    );

    let again = dlq::replay(&a, &database(&db), &queue(&db), &in_queue("a"), 10, |_| {
        ControlFlow::Continue(())
    })
    .await
    .expect("replay again");
    assert_eq!((again.applied, again.lost), (0, 2));
    assert_eq!(
        times(&db, &Selection::default()).await,
        [at(2), at(4), at(5)]
    );
}

#[tokio::test]
async fn an_interrupted_dlq_replay_resumes_where_it_stopped() {
    let (db, a) = setup("ops_resume").await;
    db.exec("UPDATE t SET ver = 1").await;
    let stopped = dlq::replay(&a, &database(&db), &queue(&db), &in_queue("a"), 1, |_| {
        ControlFlow::Break(())
    })
    .await
    .expect("replay");
    assert_eq!((stopped.applied, stopped.interrupted), (1, true));
    assert_eq!(t_rows(&db).await, [(1, 5), (2, 1), (3, 1), (4, 1)]);
    assert_eq!(times(&db, &in_queue("a")).await, [at(2), at(3), at(4)]);

    let mut seen = Vec::new();
    let resumed = dlq::replay(&a, &database(&db), &queue(&db), &in_queue("a"), 2, |r| {
        seen.push(r.applied);
        ControlFlow::Continue(())
    })
    .await
    .expect("resume");
    assert_eq!((resumed.applied, resumed.lost), (3, 0));
    assert_eq!(seen, [2, 3], "progress after each batch");
    assert_eq!(t_rows(&db).await, [(1, 5), (2, 6), (3, 7), (4, 8)]);
    assert!(times(&db, &in_queue("a")).await.is_empty());
    assert_eq!(times(&db, &in_queue("b")).await, [at(5)]);
}

fn of_table(table: &str) -> Selection {
    Selection {
        table: Some(table.into()),
        ..Default::default()
    }
}

async fn u_rows(db: &Db) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT k, ver FROM u ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .expect("read u")
}

#[tokio::test]
async fn dlq_rows_record_their_table_which_list_filters_on_and_replay_follows() {
    let (db, a) = setup("ops_by_table").await;
    let q = || (database(&db), queue(&db));
    let (d, t) = q();
    assert_eq!(times(&db, &of_table("u")).await, [at(5)]);
    assert_eq!(
        times(&db, &of_table("T")).await,
        (1..=4).map(at).collect::<Vec<_>>()
    );
    // Combined with the queue name, the time window and the limit.
    let sel = Selection {
        from: Some(at(2)),
        to: Some(at(5)),
        limit: Some(2),
        ..of_table("t")
    };
    assert_eq!(times(&db, &sel).await, [at(2), at(3)]);
    assert!(times(
        &db,
        &Selection {
            dlq: Some("b".into()),
            ..of_table("t")
        }
    )
    .await
    .is_empty());
    let rows = dlq::list(&d, &t, &of_table("u")).await.expect("list");
    assert_eq!(rows[0].source_table.as_deref(), Some("u"));
    assert!(matches!(
        dlq::list(&d, &t, &of_table("no.such.name.here")).await,
        Err(DlqError::TableName { .. })
    ));

    // Only u's row, to u, although queue a's rows of t would win now too.
    db.exec("UPDATE t SET ver = 1; UPDATE u SET ver = 1").await;
    let r = dlq::replay(
        &a,
        &d,
        &t,
        &of_table("u"),
        10,
        |_| ControlFlow::Continue(()),
    )
    .await
    .expect("replay u");
    assert_eq!((r.applied, r.lost, r.failed), (1, 0, 0));
    assert_eq!(u_rows(&db).await, [(1, 5)]);
    assert_eq!(t_rows(&db).await, [(1, 1), (2, 1), (3, 1), (4, 1)]);
    // No table named: each row goes to the table it records.
    let r = dlq::replay(&a, &d, &t, &Selection::default(), 10, |_| {
        ControlFlow::Continue(())
    })
    .await
    .expect("replay all");
    assert_eq!((r.applied, r.lost, r.failed), (4, 0, 0));
    assert_eq!(t_rows(&db).await, [(1, 5), (2, 6), (3, 7), (4, 8)]);
    assert_eq!(db.count("cdc_sink_dlq").await, 0);
}

#[tokio::test]
async fn a_reference_shaped_dlq_keeps_working_and_table_selection_says_how_to_add_the_column() {
    let db = Db::new("ops_ref_dlq").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); \
         INSERT INTO t SELECT k, 10, 'target' FROM generate_series(1, 2) AS k; \
         CREATE TABLE cdc_sink_dlq (event SERIAL PRIMARY KEY, dlq_name TEXT NOT NULL, \
         source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, \
         data_before JSONB NOT NULL, dlq_time TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await;
    let a = applier(&db);
    let t = Table::new(schema(&db), "t");
    let lose = |k: i64, n: i64| {
        let a = &a;
        let t = &t;
        let db = &db;
        async move {
            let mut tx = db.pool.begin().await.expect("begin");
            let s = a.apply(&mut tx, t, &[up(k, 5, n)]).await.expect("apply");
            assert_eq!(s.dead_lettered, 1);
            tx.commit().await.expect("commit");
        }
    };
    lose(1, 1).await;
    let (d, q) = (database(&db), queue(&db));
    let untagged = dlq::list(&d, &q, &Selection::default())
        .await
        .expect("list");
    assert_eq!(untagged.len(), 1);
    assert_eq!(untagged[0].source_table, None);
    let err = dlq::list(&d, &q, &of_table("t"))
        .await
        .expect_err("no column");
    assert!(matches!(err, DlqError::NoTableColumn { .. }), "{err:?}");
    assert!(
        err.to_string().contains("ADD COLUMN source_table TEXT"),
        "{err}"
    );
    let err = dlq::replay(&a, &d, &q, &Selection::default(), 10, |_| {
        ControlFlow::Continue(())
    })
    .await
    .expect_err("no table to replay to");
    assert!(matches!(err, DlqError::TableNeeded(_)), "{err:?}");

    // Once the column is added, rows dead-lettered after the next schema load record their
    // table; older rows match any table filter.
    db.exec("ALTER TABLE cdc_sink_dlq ADD COLUMN source_table TEXT")
        .await;
    a.schemas().refresh(&schema(&db)).await.expect("refresh");
    lose(2, 2).await;
    let rows = dlq::list(&d, &q, &of_table("t")).await.expect("list");
    let tables: Vec<Option<&str>> = rows.iter().map(|r| r.source_table.as_deref()).collect();
    assert_eq!(tables, [None, Some("t")]);
    db.exec("UPDATE t SET ver = 1").await;
    let r = dlq::replay(
        &a,
        &d,
        &q,
        &of_table("t"),
        10,
        |_| ControlFlow::Continue(()),
    )
    .await
    .expect("replay");
    assert_eq!((r.applied, r.failed), (2, 0));
    assert_eq!(t_rows(&db).await, [(1, 5), (2, 5)]);
}

async fn probe(client: &Client, path: &str) -> Option<StatusCode> {
    client.get(path).await.ok().map(|(status, _)| status)
}

#[tokio::test]
async fn ready_is_503_on_both_listeners_while_the_target_is_down_and_200_after() {
    let db = Db::kv("ops_ready").await;
    let sink = Sink::start(&db, &["--metricsAddr", "127.0.0.1:0"]).await;
    sink.post_ok(
        "/ops_ready/public",
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    let metrics = Client::new(
        &format!("http://{}", sink.metrics_addr().expect("metrics listener")),
        Default::default(),
    )
    .expect("client");
    let clients = [&sink.client, &metrics];
    for c in clients {
        assert_eq!(probe(c, "/_/ready").await, Some(StatusCode::OK));
    }

    db.cluster.stop().expect("stop postgresql");
    for c in clients {
        for path in ["/_/ready", "/_/healthz"] {
            eventually(path, Duration::from_secs(30), || async {
                (probe(c, path).await == Some(StatusCode::SERVICE_UNAVAILABLE)).then_some(())
            })
            .await;
        }
    }

    db.cluster.restart().expect("restart postgresql");
    for c in clients {
        eventually("ready again", Duration::from_secs(30), || async {
            (probe(c, "/_/ready").await == Some(StatusCode::OK)).then_some(())
        })
        .await;
    }
    sink.stop().await;
}

#[tokio::test]
async fn status_reports_checkpoints_backlog_lease_and_dead_letters_after_traffic() {
    let db = Db::kv("ops_status").await;
    db.exec(
        "CREATE TABLE cdc_sink_dlq (event SERIAL PRIMARY KEY, dlq_name TEXT NOT NULL, \
         source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, \
         data_before JSONB NOT NULL); \
         INSERT INTO cdc_sink_dlq (dlq_name, source_nanos, source_logical, data_after, data_before) \
         VALUES ('q', 1, 0, '{}', 'null'); \
         CREATE SCHEMA _cdc_sink; \
         CREATE TABLE _cdc_sink.leases (name TEXT PRIMARY KEY, expires TIMESTAMPTZ NOT NULL, \
         nonce UUID NOT NULL, hostname TEXT NOT NULL)",
    )
    .await;
    let sink = Sink::start(&db, &["--metricsAddr", "127.0.0.1:0"]).await;
    sink.post_ok(
        "/ops_status/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1),
            upsert("kv", json!([2]), json!({"k": 2, "v": "b"}), 3),
        ]),
    )
    .await;
    sink.post_ok("/ops_status/public", resolved(2)).await;
    sink::committed(&db.pool, "ops_status.public", hlc(2)).await;
    let metrics = Client::new(
        &format!("http://{}", sink.metrics_addr().expect("metrics listener")),
        Default::default(),
    )
    .expect("client");
    // Key 1 is applied at 2; key 2 (at 3) waits for a later resolved timestamp.
    let report: serde_json::Value = eventually("status", Duration::from_secs(20), || async {
        let (status, body) = metrics.get("/_/status").await.ok()?;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        (v["schemas"][0]["staged_backlog_rows"] == json!(1)).then_some(v)
    })
    .await;
    let s = &report["schemas"][0];
    assert_eq!(s["schema"], "ops_status.public");
    assert_eq!(s["mode"], "consistent");
    assert_eq!(s["committed"], hlc(2).to_string());
    assert_eq!(s["proposed"], hlc(2).to_string());
    assert!(s["target_lag_seconds"].as_f64().expect("lag") > 0.0);
    assert_eq!(s["lease"]["held"], true, "{report}");
    assert_eq!(s["lease"]["holder"], report["instance"]["id"]);
    // A leases table of an older version gained the acquisition time at start.
    let since = s["lease"]["since"].as_str().expect("since").to_string();
    let expires = s["lease"]["expires"].as_str().expect("expires").to_string();
    let order: bool = sqlx::query_scalar("SELECT $1::TIMESTAMPTZ < $2::TIMESTAMPTZ")
        .bind(&since)
        .bind(&expires)
        .fetch_one(&db.pool)
        .await
        .expect("compare");
    assert!(order, "since {since} before expires {expires}");
    assert_eq!(s["dlq_rows"], 1);
    assert_eq!(report["instance"]["version"], env!("CARGO_PKG_VERSION"));
    let table = cdc_sink::cli::status::render(&report);
    assert!(table.contains("ops_status.public  consistent"), "{table}");
    assert!(
        table.contains("LEASE SINCE") && table.contains(&since),
        "{table}"
    );
    // Renewals move the expiry, never the acquisition time.
    eventually("the lease is renewed", Duration::from_secs(30), || async {
        let (_, body) = metrics.get("/_/status").await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let lease = &v["schemas"][0]["lease"];
        assert_eq!(lease["since"], json!(since), "{v}");
        (lease["expires"] != json!(expires)).then_some(())
    })
    .await;

    // Kept off the main port, which names the right one.
    let (status, body) = sink.client.get("/_/status").await.expect("main");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("--metricsAddr"), "{body}");
    sink.stop().await;
}

#[tokio::test]
async fn the_dlq_command_replays_with_the_userscript_table_options() {
    let (db, _) = setup("ops_cli").await;
    db.exec("UPDATE t SET ver = 1 WHERE k = 1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("merge.ts");
    std::fs::write(
        &script,
        r#"import * as api from "cdc-sink@v1";
api.configureTable("t", { cas: ["ver"], merge: () => ({ dlq: "a" }) });
"#,
    )
    .expect("write");
    let url = db.url();
    let group = format!("{}.public", db.name);
    let run = |args: &[&str]| {
        let mut argv = vec!["cdc-sink", "dlq"];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&[group.as_str(), "--targetConn", url.as_str()]);
        let cli = cdc_sink::cli::Cli::try_parse_from(argv).expect("parses");
        let cdc_sink::cli::Command::Dlq(args) = cli.command else {
            panic!("dlq expected")
        };
        cdc_sink::cli::dlq::run(args)
    };
    run(&["list", "--dlq", "a"]).await.expect("list");
    run(&["purge", "--dlq", "b", "--dry-run"])
        .await
        .expect("dry run");
    assert!(run(&["purge"]).await.is_err(), "unfiltered purge refused");
    assert_eq!(db.count("cdc_sink_dlq").await, 5);
    run(&[
        "replay",
        "--table",
        "t",
        "--dlq",
        "a",
        "--batch",
        "2",
        "--userscript",
        script.to_str().expect("utf-8 path"),
    ])
    .await
    .expect("replay");
    // Only key 1 now wins: the userscript's cas and merge decided, not a plain upsert.
    assert_eq!(t_rows(&db).await, [(1, 5), (2, 10), (3, 10), (4, 10)]);
    assert_eq!(
        times(&db, &Selection::default()).await,
        [at(2), at(3), at(4), at(5)]
    );
}

#[tokio::test]
async fn status_names_the_poison_mutation_that_blocks_a_schema_until_it_applies() {
    let db = Db::kv("ops_poison").await;
    db.exec("ALTER TABLE kv ADD CONSTRAINT no_bad CHECK (v <> 'bad')")
        .await;
    let sink = Sink::start(&db, &["--metricsAddr", "127.0.0.1:0"]).await;
    let metrics = Client::new(
        &format!("http://{}", sink.metrics_addr().expect("metrics listener")),
        Default::default(),
    )
    .expect("client");
    sink.post_ok(
        "/ops_poison/public",
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "good"}), 1),
            upsert("kv", json!([2]), json!({"k": 2, "v": "bad"}), 1),
        ]),
    )
    .await;
    sink.post_ok("/ops_poison/public", resolved(2)).await;
    let status = || async {
        let (_, body) = metrics.get("/_/status").await.ok()?;
        serde_json::from_str::<serde_json::Value>(&body).ok()
    };
    let blocked = eventually("poison reported", Duration::from_secs(30), || async {
        let v = status().await?;
        let b = v["schemas"][0]["blocked"].clone();
        (!b["table"].is_null()).then_some(b)
    })
    .await;
    assert!(
        blocked["table"].as_str().expect("table").ends_with("kv"),
        "{blocked}"
    );
    assert_eq!(blocked["key"], "[2]");
    assert_eq!(blocked["time"], hlc(1).to_string());
    assert!(
        blocked["error"].as_str().expect("error").contains("no_bad"),
        "{blocked}"
    );
    assert!(blocked["next_retry_unix"].as_f64().expect("retry") > 0.0);

    db.exec("ALTER TABLE kv DROP CONSTRAINT no_bad").await;
    sink::committed(&db.pool, "ops_poison.public", hlc(2)).await;
    eventually("cleared", Duration::from_secs(30), || async {
        status().await?["schemas"][0]["blocked"]
            .is_null()
            .then_some(())
    })
    .await;
    sink.stop().await;
}

async fn lease_since(client: &Client) -> Option<String> {
    let (_, body) = client.get("/_/status").await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["schemas"][0]["lease"]["since"]
        .as_str()
        .map(str::to_string)
}

async fn lease_holder(client: &Client) -> Option<(String, String)> {
    let (status, body) = client.get("/_/status").await.ok()?;
    if status != StatusCode::OK {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let lease = &v["schemas"][0]["lease"];
    (lease["held"] == true).then(|| {
        (
            lease["holder"].as_str().unwrap_or_default().to_string(),
            v["instance"]["id"].as_str().unwrap_or_default().to_string(),
        )
    })
}

#[tokio::test]
async fn status_follows_the_lease_to_another_instance_when_the_holder_stops() {
    let db = Db::kv("ops_lease").await;
    let a = Sink::start(&db, &[]).await;
    let b = Process::start(&db, free_port(), &[]).await;
    a.post_ok(
        "/ops_lease/public",
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    a.post_ok("/ops_lease/public", resolved(2)).await;
    sink::committed(&db.pool, "ops_lease.public", hlc(2)).await;
    let (holder, a_id) = eventually("a holds the lease", Duration::from_secs(20), || async {
        lease_holder(&a.client).await
    })
    .await;
    assert_eq!(holder, a_id);
    let a_since = lease_since(&a.client).await.expect("a's since");

    a.stop().await;
    assert_eq!(
        b.post(
            "/ops_lease/public",
            batch(vec![upsert("kv", json!([2]), json!({"k": 2, "v": "b"}), 3)]),
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        b.post("/ops_lease/public", resolved(4)).await,
        StatusCode::OK
    );
    let (holder, b_id) = eventually("b holds the lease", Duration::from_secs(30), || async {
        lease_holder(&b.client)
            .await
            .filter(|(holder, id)| holder == id)
    })
    .await;
    assert_eq!(holder, b_id);
    assert_ne!(b_id, a_id, "instances are told apart");
    let b_since = lease_since(&b.client).await.expect("b's since");
    let later: bool = sqlx::query_scalar("SELECT $1::TIMESTAMPTZ < $2::TIMESTAMPTZ")
        .bind(&a_since)
        .bind(&b_since)
        .fetch_one(&db.pool)
        .await
        .expect("compare");
    assert!(later, "b took the lease ({b_since}) after a ({a_since})");
}
