//! Compare-and-set, deadlines, merge and the dead-letter queue against a real PostgreSQL.

use crate::support::Db;
use cdc_sink::apply::merge::{self, Conflict, MergeError, MergeFn, Merger, Resolution};
use cdc_sink::apply::standard;
use cdc_sink::apply::{Applier, ApplyArgs, ApplyError, ApplyStats, TableConfig};
use cdc_sink::hlc::Hlc;
use cdc_sink::ident::{Ident, Schema, Table};
use cdc_sink::mutation::Mutation;
use cdc_sink::target::{Database, Dialect};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn applier_with(db: &Db, options: ApplyArgs) -> Applier {
    Applier::with_options(
        Database {
            pool: db.pool.clone(),
            dialect: Dialect::Postgres,
            database: db.name.clone(),
            name: "target",
        },
        Duration::from_secs(3600),
        options,
        None,
    )
}

fn applier(db: &Db) -> Applier {
    applier_with(db, ApplyArgs::default())
}

fn table(db: &Db, name: &str) -> Table {
    Table::new(Schema::new(db.name.as_str(), "public"), name)
}

fn cas(cols: &[&str]) -> TableConfig {
    TableConfig {
        cas: cols.iter().map(|c| Ident::new(*c)).collect(),
        ..Default::default()
    }
}

static CLOCK: AtomicI64 = AtomicI64::new(1_000_000);

fn tick() -> Hlc {
    Hlc::new(CLOCK.fetch_add(1, Ordering::Relaxed), 7)
}

fn up(key: Value, after: Value) -> Mutation {
    Mutation {
        time: tick(),
        key: key.to_string(),
        after: Some(after.to_string()),
        before: None,
    }
}

fn up_from(key: Value, before: Value, after: Value) -> Mutation {
    Mutation {
        before: Some(before.to_string()),
        ..up(key, after)
    }
}

fn del(key: Value, before: Option<Value>) -> Mutation {
    Mutation {
        time: tick(),
        key: key.to_string(),
        after: None,
        before: before.map(|b| b.to_string()),
    }
}

/// Applies in a transaction of its own, committed on success.
async fn apply(
    a: &Applier,
    db: &Db,
    t: &Table,
    muts: &[Mutation],
) -> Result<ApplyStats, ApplyError> {
    let mut tx = db.pool.begin().await.expect("begin");
    let r = a.apply(&mut tx, t, muts).await;
    if r.is_ok() {
        tx.commit().await.expect("commit");
    }
    r
}

async fn rows<T>(db: &Db, sql: &str) -> Vec<T>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    sqlx::query_as(sql)
        .fetch_all(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

type Answer = Box<dyn Fn(&Conflict) -> Result<Resolution, MergeError> + Send + Sync>;

/// A merger that records what it sees and answers with `answer`.
struct Scripted {
    seen: Arc<Mutex<Vec<Conflict>>>,
    answer: Answer,
}

impl Merger for Scripted {
    fn merge(
        &self,
        conflicts: Vec<Conflict>,
    ) -> BoxFuture<'static, Result<Vec<Resolution>, MergeError>> {
        let out: Result<Vec<Resolution>, MergeError> = conflicts.iter().map(&self.answer).collect();
        self.seen.lock().expect("lock").extend(conflicts);
        futures::future::ready(out).boxed()
    }
}

fn scripted(
    answer: impl Fn(&Conflict) -> Result<Resolution, MergeError> + Send + Sync + 'static,
) -> (MergeFn, Arc<Mutex<Vec<Conflict>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let m = MergeFn(Arc::new(Scripted {
        seen: seen.clone(),
        answer: Box::new(answer),
    }));
    (m, seen)
}

fn js(text: &str) -> Value {
    serde_json::from_str(text).expect("json")
}

/// The dead-letter rows, oldest mutation first: (name, nanos, logical, after, before).
async fn dead_letters(db: &Db) -> Vec<(String, i64, i64, Value, Value)> {
    let raw: Vec<(String, i64, i64, String, String)> = rows(
        db,
        "SELECT dlq_name, source_nanos, source_logical, data_after::TEXT, data_before::TEXT \
         FROM cdc_sink_dlq ORDER BY source_nanos",
    )
    .await;
    raw.into_iter()
        .map(|(n, s, l, a, b)| (n, s, l, js(&a), js(&b)))
        .collect()
}

fn prop<'a>(row: &'a Option<merge::Row>, name: &str) -> Option<&'a Value> {
    row.as_ref().and_then(|r| r.get(name))
}

#[tokio::test]
async fn cas_compares_with_the_column_type_not_as_text() {
    let db = Db::new("cas_types").await;
    db.exec("CREATE TABLE n (k INT8 PRIMARY KEY, ver INT8, v TEXT); CREATE TABLE s (k INT8 PRIMARY KEY, ver TEXT, v TEXT)")
        .await;
    let a = applier(&db);
    for name in ["n", "s"] {
        a.set_config(&table(&db, name), cas(&["ver"]));
        let t = table(&db, name);
        apply(
            &a,
            &db,
            &t,
            &[up(json!([1]), json!({"k": 1, "ver": 9, "v": "nine"}))],
        )
        .await
        .expect("insert");
        let stats = apply(
            &a,
            &db,
            &t,
            &[up(json!([1]), json!({"k": 1, "ver": 10, "v": "ten"}))],
        )
        .await
        .expect("update");
        let got: Vec<(String,)> = rows(&db, &format!("SELECT v FROM {name}")).await;
        match name {
            // 10 > 9 numerically.
            "n" => {
                assert_eq!(got, [("ten".to_string(),)]);
                assert_eq!((stats.upserts, stats.conflicts), (1, 0));
            }
            // '10' < '9' as text: the update loses.
            _ => {
                assert_eq!(got, [("nine".to_string(),)]);
                assert_eq!((stats.upserts, stats.conflicts), (0, 1));
            }
        }
    }
}

#[tokio::test]
async fn cas_orders_timestamps_by_instant_and_tuples_lexicographically() {
    let db = Db::new("cas_time").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, ts TIMESTAMPTZ, seq INT8, v TEXT)")
        .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(&t, cas(&["ts", "seq"]));
    apply(
        &a,
        &db,
        &t,
        &[up(
            json!([1]),
            json!({"k": 1, "ts": "2024-01-01T12:00:00+02:00", "seq": 5, "v": "a"}),
        )],
    )
    .await
    .expect("insert");
    // 09:59 UTC is before 10:00 UTC although its text sorts after.
    let s = apply(
        &a,
        &db,
        &t,
        &[up(
            json!([1]),
            json!({"k": 1, "ts": "2024-01-01T09:59:00Z", "seq": 9, "v": "older"}),
        )],
    )
    .await
    .expect("older");
    assert_eq!(s.conflicts, 1);
    // Same instant, greater second element: wins.
    let s = apply(
        &a,
        &db,
        &t,
        &[up(
            json!([1]),
            json!({"k": 1, "ts": "2024-01-01T10:00:00Z", "seq": 6, "v": "later"}),
        )],
    )
    .await
    .expect("later");
    assert_eq!((s.upserts, s.conflicts), (1, 0));
    let got: Vec<(String, i64)> = rows(&db, "SELECT v, seq FROM t").await;
    assert_eq!(got, [("later".to_string(), 6)]);
}

#[tokio::test]
async fn null_cas_values_and_equal_tuples_are_conflicts() {
    let db = Db::new("cas_null").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, a INT8, b INT8, v TEXT);
         INSERT INTO t VALUES (1, 1, 5, 'one'), (2, NULL, 5, 'two'), (3, 1, NULL, 'three'), (4, 1, 5, 'four')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(&t, cas(&["a", "b"]));
    let s = apply(
        &a,
        &db,
        &t,
        &[
            // (1, NULL) > (1, 5) is NULL: refused.
            up(json!([1]), json!({"k": 1, "a": 1, "b": null, "v": "x"})),
            // Anything compared with a NULL target element is NULL: refused.
            up(json!([2]), json!({"k": 2, "a": 9, "b": 9, "v": "x"})),
            // (2, 0) > (1, NULL) is decided by the first element: written.
            up(json!([3]), json!({"k": 3, "a": 2, "b": 0, "v": "x"})),
            // Equal tuples: refused.
            up(json!([4]), json!({"k": 4, "a": 1, "b": 5, "v": "x"})),
            // No target row: inserted whatever its CAS values.
            up(json!([5]), json!({"k": 5, "a": null, "b": null, "v": "x"})),
        ],
    )
    .await
    .expect("apply");
    assert_eq!((s.upserts, s.conflicts), (2, 3));
    let got: Vec<(i64, String)> = rows(&db, "SELECT k, v FROM t ORDER BY k").await;
    let want = [(1, "one"), (2, "two"), (3, "x"), (4, "four"), (5, "x")];
    assert_eq!(got, want.map(|(k, v)| (k, v.to_string())));
}

#[tokio::test]
async fn deadlines_drop_stale_upserts_and_report_only_those_with_a_target_row() {
    let db = Db::new("deadlines").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, at TIMESTAMPTZ, v TEXT);
         INSERT INTO t VALUES (1, now(), 'old'), (2, now(), 'old')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let (m, seen) = scripted(|_| Ok(Resolution::Drop));
    a.set_config(
        &t,
        TableConfig {
            deadlines: vec![(Ident::new("at"), Duration::from_secs(600))],
            merge: Some(m),
            ..Default::default()
        },
    );
    let s = apply(
        &a,
        &db,
        &t,
        &[
            up(
                json!([1]),
                json!({"k": 1, "at": "2000-01-01T00:00:00Z", "v": "stale"}),
            ),
            up(
                json!([2]),
                json!({"k": 2, "at": null, "v": "null is expired"}),
            ),
            up(
                json!([3]),
                json!({"k": 3, "at": "2000-01-01T00:00:00Z", "v": "stale"}),
            ),
            up(
                json!([4]),
                json!({"k": 4, "at": "2999-01-01T00:00:00Z", "v": "fresh"}),
            ),
        ],
    )
    .await
    .expect("apply");
    assert_eq!((s.upserts, s.conflicts), (1, 2));
    let got: Vec<(i64, String)> = rows(&db, "SELECT k, v FROM t ORDER BY k").await;
    assert_eq!(
        got,
        [(1, "old"), (2, "old"), (4, "fresh")].map(|(k, v)| (k, v.to_string()))
    );
    let seen = seen.lock().unwrap();
    let keys: Vec<&Value> = seen.iter().filter_map(|c| prop(&c.target, "k")).collect();
    assert_eq!(keys, [&json!(1), &json!(2)]);
}

#[tokio::test]
async fn deadlines_and_cas_together_need_both_to_pass() {
    let db = Db::new("deadline_cas").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, at TIMESTAMPTZ, ver INT8, v TEXT);
         INSERT INTO t VALUES (1, now(), 5, 'old'), (2, now(), 5, 'old'), (3, now(), 5, 'old')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(
        &t,
        TableConfig {
            cas: vec![Ident::new("ver")],
            deadlines: vec![(Ident::new("at"), Duration::from_secs(3600))],
            ..Default::default()
        },
    );
    let s = apply(
        &a,
        &db,
        &t,
        &[
            up(
                json!([1]),
                json!({"k": 1, "at": "2000-01-01T00:00:00Z", "ver": 9, "v": "expired"}),
            ),
            up(
                json!([2]),
                json!({"k": 2, "at": "2999-01-01T00:00:00Z", "ver": 4, "v": "older"}),
            ),
            up(
                json!([3]),
                json!({"k": 3, "at": "2999-01-01T00:00:00Z", "ver": 6, "v": "newer"}),
            ),
        ],
    )
    .await
    .expect("apply");
    assert_eq!((s.upserts, s.conflicts), (1, 2));
    let got: Vec<(i64, String)> = rows(&db, "SELECT k, v FROM t ORDER BY k").await;
    assert_eq!(
        got,
        [(1, "old"), (2, "old"), (3, "newer")].map(|(k, v)| (k, v.to_string()))
    );
}

#[tokio::test]
async fn a_custom_merger_applies_dead_letters_or_drops_each_conflict() {
    let db = Db::new("custom_merge").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT, n NUMERIC, b BYTEA, ts TIMESTAMPTZ, j JSONB);
         INSERT INTO t SELECT k, 10, 'target', 1.50, '\\x0aff', '2024-01-01T00:00:00Z', '{\"x\": [1, 2]}'
           FROM generate_series(1, 3) AS k",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let (m, seen) = scripted(|c| {
        let k = prop(&c.proposed, "k")
            .and_then(|v| v.as_str().map(String::from).or(Some(v.to_string())));
        Ok(match k.as_deref() {
            Some("1") => {
                let mut row = c.target.clone().expect("target");
                row.insert("v".into(), json!("merged"));
                Resolution::Apply(row)
            }
            Some("2") => Resolution::Dlq("custom".into()),
            _ => Resolution::Drop,
        })
    });
    a.set_config(
        &t,
        TableConfig {
            merge: Some(m),
            ..cas(&["ver"])
        },
    );
    let muts: Vec<Mutation> = (1..=3)
        .map(|k| {
            up_from(
                json!([k]),
                json!({"k": k, "ver": 8, "v": "before"}),
                json!({"K": k, "VER": 9, "v": "proposed"}),
            )
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    // Target values must come back in UTC whatever the session's zone.
    sqlx::query("SET LOCAL TimeZone = 'Asia/Kolkata'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let s = a.apply(&mut tx, &t, &muts).await.expect("apply");
    tx.commit().await.unwrap();
    assert_eq!(
        s,
        ApplyStats {
            upserts: 0,
            deletes: 0,
            conflicts: 3,
            resolved: 1,
            dead_lettered: 1
        }
    );

    let got: Vec<(i64, String, i64)> = rows(&db, "SELECT k, v, ver FROM t ORDER BY k").await;
    assert_eq!(
        got,
        [(1, "merged", 10), (2, "target", 10), (3, "target", 10)].map(|(k, v, n)| (
            k,
            v.to_string(),
            n
        ))
    );
    let dlq = dead_letters(&db).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].0, "custom");
    assert_eq!((dlq[0].1, dlq[0].2), (muts[1].time.nanos(), 7));
    assert_eq!(
        dlq[0].3,
        json!({"K": 2, "VER": 9, "v": "proposed"}),
        "the original payload"
    );
    assert_eq!(dlq[0].4, json!({"k": 2, "ver": 8, "v": "before"}));

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "one call with every conflict");
    let c = &seen[0];
    assert_eq!(c.meta.table, t);
    assert_eq!(c.meta.time, muts[0].time);
    assert_eq!(c.meta.primary_key, ["k"]);
    // Property names follow the columns; the values are exact.
    assert_eq!(c.proposed.as_ref().unwrap().get("ver"), Some(&json!(9)));
    assert_eq!(c.before.as_ref().unwrap().get("v"), Some(&json!("before")));
    let target = c.target.as_ref().expect("target row");
    assert_eq!(target.get("ver").unwrap().to_string(), "10");
    assert_eq!(target.get("n").unwrap().to_string(), "1.50");
    assert_eq!(target.get("b"), Some(&json!("\\x0aff")));
    assert_eq!(target.get("ts"), Some(&json!("2024-01-01T00:00:00Z")));
    assert_eq!(target.get("j"), Some(&json!({"x": [1, 2]})));
    assert!(c.unmerged.is_empty());
}

#[tokio::test]
async fn a_failing_merger_fails_the_batch_and_writes_nothing() {
    let db = Db::new("merge_fails").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); INSERT INTO t VALUES (1, 5, 'a')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let (m, _) = scripted(|_| Err(MergeError::Failed("no way".into())));
    a.set_config(
        &t,
        TableConfig {
            merge: Some(m),
            ..cas(&["ver"])
        },
    );
    let mut tx = db.pool.begin().await.unwrap();
    let err = a
        .apply(
            &mut tx,
            &t,
            &[
                up(json!([1]), json!({"k": 1, "ver": 4, "v": "loser"})),
                up(json!([2]), json!({"k": 2, "ver": 1, "v": "winner"})),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ApplyError::Merge { .. }), "{err}");
    assert_eq!(
        cdc_sink::error::ErrorChain(&err).to_string(),
        format!("merge failed for {t}: merge function failed: no way")
    );
    // The caller's transaction is still usable: the apply rolled back to its savepoint.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mut *tx)
        .await
        .expect("transaction still usable");
    assert_eq!(n, 1, "the winner was rolled back with the rest");
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn standard_merge_takes_what_only_the_source_changed() {
    let db = Db::new("standard").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, a TEXT, b INT8, c TEXT);
         INSERT INTO t VALUES (1, 10, 'a0', 1, 'target-c'), (2, 10, 'a0', 1, 'c0'), (3, 10, 'a0', 7, 'c0')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let (fallback, seen) = scripted(|_| Ok(Resolution::Dlq("fallback".into())));
    a.set_config(
        &t,
        TableConfig {
            merge: Some(standard::merge(Some(fallback))),
            ..cas(&["ver"])
        },
    );
    let before = |k: i64| json!({"k": k, "ver": 9, "a": "a0", "b": 1, "c": "c0"});
    let s = apply(
        &a,
        &db,
        &t,
        &[
            // The source changed `a`; the target changed only `c`: both survive.
            up_from(
                json!([1]),
                before(1),
                json!({"k": 1, "ver": 9, "a": "a1", "b": "1", "c": "c0"}),
            ),
            // The source's change is already in the target (as a number written as text).
            up_from(
                json!([2]),
                before(2),
                json!({"k": 2, "ver": 9, "a": "a0", "b": 1, "c": "c0"}),
            ),
            // Both changed `b`: unmerged, to the fallback.
            up_from(
                json!([3]),
                before(3),
                json!({"k": 3, "ver": 9, "a": "a0", "b": 2, "c": "c0"}),
            ),
        ],
    )
    .await
    .expect("apply");
    assert_eq!((s.conflicts, s.resolved, s.dead_lettered), (3, 2, 1));
    let got: Vec<(i64, i64, String, i64, String)> =
        rows(&db, "SELECT k, ver, a, b, c FROM t ORDER BY k").await;
    assert_eq!(
        got,
        [
            (1, 10, "a1", 1, "target-c"),
            (2, 10, "a0", 1, "c0"),
            (3, 10, "a0", 7, "c0")
        ]
        .map(|(k, v, a, b, c)| (k, v, a.to_string(), b, c.to_string()))
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].unmerged, ["b"]);
    assert_eq!(prop(&seen[0].target, "b"), Some(&json!(7)));
}

#[tokio::test]
async fn standard_merge_without_before_is_two_way() {
    let db = Db::new("two_way").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT);
         INSERT INTO t VALUES (1, 10, 'same'), (2, 10, 'differs')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let (fallback, seen) = scripted(|_| Ok(Resolution::Drop));
    a.set_config(
        &t,
        TableConfig {
            merge: Some(standard::merge(Some(fallback))),
            ..cas(&["ver"])
        },
    );
    let s = apply(
        &a,
        &db,
        &t,
        &[
            up(json!([1]), json!({"k": 1, "ver": 10, "v": "same"})),
            up(json!([2]), json!({"k": 2, "ver": 10, "v": "proposed"})),
        ],
    )
    .await
    .expect("apply");
    assert_eq!((s.conflicts, s.resolved), (2, 1));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(prop(&seen[0].target, "k"), Some(&json!(2)));
    assert_eq!(seen[0].unmerged, ["v"]);
    let got: Vec<(i64, String)> = rows(&db, "SELECT k, v FROM t ORDER BY k").await;
    assert_eq!(
        got,
        [(1, "same"), (2, "differs")].map(|(k, v)| (k, v.to_string()))
    );
}

#[tokio::test]
async fn standard_merge_reconciles_unmapped_properties_through_extras() {
    let db = Db::new("extras_merge").await;
    db.exec(
        r#"CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT, extra JSONB);
           INSERT INTO t VALUES (1, 10, 'v0', '{"color": "red", "size": 2}')"#,
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(
        &t,
        TableConfig {
            extras: Some(Ident::new("extra")),
            merge: Some(standard::merge(None)),
            ..cas(&["ver"])
        },
    );
    apply(
        &a,
        &db,
        &t,
        &[up_from(
            json!([1]),
            json!({"k": 1, "ver": 9, "v": "v0", "color": "blue", "size": 2}),
            json!({"k": 1, "ver": 9, "v": "v1", "color": "blue", "size": 3, "shape": "round"}),
        )],
    )
    .await
    .expect("apply");
    let got: Vec<(String, String)> = rows(&db, "SELECT v, extra::TEXT FROM t").await;
    // `color` changed on the target only; `size` and `shape` on the source only.
    assert_eq!(got[0].0, "v1");
    assert_eq!(
        js(&got[0].1),
        json!({"color": "red", "size": 3, "shape": "round"})
    );
}

#[tokio::test]
async fn an_unmerged_conflict_without_fallback_fails_the_batch() {
    let db = Db::new("no_fallback").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); INSERT INTO t VALUES (1, 10, 'target')")
        .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(
        &t,
        TableConfig {
            merge: Some(standard::merge(None)),
            ..cas(&["ver"])
        },
    );
    let err = apply(
        &a,
        &db,
        &t,
        &[up_from(
            json!([1]),
            json!({"k": 1, "ver": 8, "v": "b"}),
            json!({"k": 1, "ver": 9, "v": "p"}),
        )],
    )
    .await
    .unwrap_err();
    let text = cdc_sink::error::ErrorChain(&err).to_string();
    assert!(
        text.contains("unmerged data conflict") && text.contains(r#"["v", "ver"]"#),
        "{text}"
    );
    assert!(!text.contains("target"), "no row values in errors: {text}");
}

#[tokio::test]
async fn without_a_merge_function_losers_are_dropped_and_nothing_is_dead_lettered() {
    let db = Db::new("lww").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); INSERT INTO t VALUES (1, 10, 'target')")
        .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(&t, cas(&["ver"]));
    let s = apply(
        &a,
        &db,
        &t,
        &[up(json!([1]), json!({"k": 1, "ver": 3, "v": "stale"}))],
    )
    .await
    .expect("apply");
    assert_eq!((s.upserts, s.conflicts, s.dead_lettered), (0, 1, 0));
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'cdc_sink_dlq'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(n, 0, "no dead-letter table without a merge function");
}

fn to_dlq() -> TableConfig {
    TableConfig {
        merge: Some(standard::merge(Some(MergeFn(Arc::new(Scripted {
            seen: Arc::default(),
            answer: Box::new(|_| Ok(Resolution::Dlq("q".into()))),
        }))))),
        ..cas(&["ver"])
    }
}

#[tokio::test]
async fn the_dead_letter_table_is_created_when_missing() {
    let db = Db::new("dlq_create").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); INSERT INTO t VALUES (1, 10, 'a')",
    )
    .await;
    let a = applier_with(
        &db,
        ApplyArgs {
            dlq_table_name: "Conflicts".into(),
            dlq_auto_create: true,
        },
    );
    let t = table(&db, "t");
    a.set_config(&t, to_dlq());
    let s = apply(
        &a,
        &db,
        &t,
        &[up(json!([1]), json!({"k": 1, "ver": 9, "v": "b"}))],
    )
    .await
    .expect("apply");
    assert_eq!(s.dead_lettered, 1);
    let cols: Vec<(String, String, String)> = rows(
        &db,
        "SELECT column_name::TEXT, data_type::TEXT, is_nullable::TEXT FROM information_schema.columns \
         WHERE table_name = 'Conflicts' ORDER BY ordinal_position",
    )
    .await;
    let want = [
        ("event", "uuid", "NO"),
        ("dlq_name", "text", "NO"),
        ("source_nanos", "bigint", "NO"),
        ("source_logical", "bigint", "NO"),
        ("data_after", "jsonb", "NO"),
        ("data_before", "jsonb", "NO"),
        ("dlq_time", "timestamp with time zone", "NO"),
        ("source_table", "text", "YES"),
    ];
    assert_eq!(
        cols,
        want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    let got: Vec<(String, String, bool, String)> = rows(
        &db,
        r#"SELECT dlq_name, data_before::TEXT, dlq_time <= now(), source_table FROM "Conflicts""#,
    )
    .await;
    assert_eq!(
        got,
        [("q".to_string(), "null".to_string(), true, "t".to_string())]
    );
    // A second batch reuses it.
    apply(
        &a,
        &db,
        &t,
        &[up(json!([1]), json!({"k": 1, "ver": 8, "v": "c"}))],
    )
    .await
    .expect("apply again");
    assert_eq!(db.count(r#""Conflicts""#).await, 2);
}

#[tokio::test]
async fn a_missing_dead_letter_table_is_an_error_naming_the_ddl_when_creation_is_off() {
    let db = Db::new("dlq_refuse").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); INSERT INTO t VALUES (1, 10, 'a')",
    )
    .await;
    let a = applier_with(
        &db,
        ApplyArgs {
            dlq_auto_create: false,
            ..ApplyArgs::default()
        },
    );
    let t = table(&db, "t");
    a.set_config(&t, to_dlq());
    let stale = [up(json!([1]), json!({"k": 1, "ver": 9, "v": "b"}))];
    let err = apply(&a, &db, &t, &stale).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ApplyError::DlqMissing { .. }), "{text}");
    assert!(
        text.starts_with(&format!(
            "the dead-letter queue table {}.public.cdc_sink_dlq must be created",
            db.name
        )),
        "{text}"
    );
    assert!(
        text.contains(r#"CREATE TABLE IF NOT EXISTS "public"."cdc_sink_dlq" (event UUID"#),
        "{text}"
    );
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'cdc_sink_dlq'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(n, 0);

    // Created by hand (the schema is reloaded once when the table is not known): it works.
    db.exec("CREATE TABLE cdc_sink_dlq (event SERIAL PRIMARY KEY, dlq_name TEXT NOT NULL, source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, data_before JSONB NOT NULL)")
        .await;
    apply(&a, &db, &t, &stale)
        .await
        .expect("apply with the table");
    assert_eq!(db.count("cdc_sink_dlq").await, 1);
}

#[tokio::test]
async fn a_dead_letter_table_lacking_columns_is_an_error_listing_them() {
    let db = Db::new("dlq_cols").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT); INSERT INTO t VALUES (1, 10, 'a');
         CREATE TABLE cdc_sink_dlq (event INT8 PRIMARY KEY, dlq_name TEXT, data_after JSONB)",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(&t, to_dlq());
    let err = apply(
        &a,
        &db,
        &t,
        &[up(json!([1]), json!({"k": 1, "ver": 9, "v": "b"}))],
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "dlq table {}.public.cdc_sink_dlq was found, but it is missing the following columns: \
             source_nanos, source_logical, data_before",
            db.name
        )
    );
}

#[tokio::test]
async fn cas_guarded_deletes_apply_only_when_the_target_is_not_newer() {
    let db = Db::new("guarded").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, v TEXT);
         INSERT INTO t VALUES (1, 5, 'current'), (2, 7, 'newer'), (3, 5, 'no before'), (4, NULL, 'null')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    let (fallback, seen) = scripted(|_| Ok(Resolution::Dlq("deletes".into())));
    a.set_config(
        &t,
        TableConfig {
            merge: Some(standard::merge(Some(fallback))),
            ..cas(&["ver"])
        },
    );
    let s = apply(
        &a,
        &db,
        &t,
        &[
            del(json!([1]), Some(json!({"k": 1, "ver": 5, "v": "current"}))),
            del(json!([2]), Some(json!({"k": 2, "ver": 6, "v": "older"}))),
            del(json!([3]), None),
            del(json!([4]), Some(json!({"k": 4, "ver": 1, "v": "null"}))),
            del(json!([9]), Some(json!({"k": 9, "ver": 1}))),
        ],
    )
    .await
    .expect("apply");
    assert_eq!((s.deletes, s.conflicts, s.dead_lettered), (2, 2, 2));
    let got: Vec<(i64, String)> = rows(&db, "SELECT k, v FROM t ORDER BY k").await;
    assert_eq!(
        got,
        [(2, "newer"), (4, "null")].map(|(k, v)| (k, v.to_string()))
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].proposed.is_none());
    assert_eq!(seen[0].unmerged, ["v", "ver"], "what changed since before");
    let dlq = dead_letters(&db).await;
    assert_eq!(dlq.len(), 2);
    assert_eq!(dlq[0].3, Value::Null, "a delete has no after image");
    assert_eq!(dlq[0].4, json!({"k": 2, "ver": 6, "v": "older"}));
}

#[tokio::test]
async fn deletes_without_cas_columns_or_before_apply_as_before() {
    let db = Db::new("plain_deletes").await;
    db.exec(
        "CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8, at TIMESTAMPTZ);
         INSERT INTO t VALUES (1, 9, now()), (2, 9, now())",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "t");
    a.set_config(
        &t,
        TableConfig {
            deadlines: vec![(Ident::new("at"), Duration::from_secs(1))],
            ..Default::default()
        },
    );
    // Deadlines alone do not guard deletes, even with a stale before image.
    let s = apply(
        &a,
        &db,
        &t,
        &[del(
            json!([1]),
            Some(json!({"k": 1, "ver": 1, "at": "2000-01-01T00:00:00Z"})),
        )],
    )
    .await
    .expect("apply");
    assert_eq!((s.deletes, s.conflicts), (1, 0));
    a.set_config(&t, cas(&["ver"]));
    let s = apply(&a, &db, &t, &[del(json!([2]), None)])
        .await
        .expect("apply");
    assert_eq!((s.deletes, s.conflicts), (1, 0));
    assert_eq!(db.count("t").await, 0);
}

#[tokio::test]
async fn concurrent_writers_on_the_same_keys_keep_the_greatest_version() {
    let db = Db::new("concurrent").await;
    db.exec("CREATE TABLE t (k INT8 PRIMARY KEY, ver INT8 NOT NULL, v TEXT)")
        .await;
    let a = applier(&db);
    let t = table(&db, "t");
    // The merger checks that every loser really lost against the row it reads back.
    let (m, seen) = scripted(|c| {
        let ver = |r: &Option<merge::Row>| {
            prop(r, "ver")
                .and_then(|v| v.to_string().trim_matches('"').parse::<i64>().ok())
                .expect("ver")
        };
        if ver(&c.target) < ver(&c.proposed) {
            return Err(MergeError::Failed("a loser that should have won".into()));
        }
        Ok(Resolution::Drop)
    });
    a.set_config(
        &t,
        TableConfig {
            merge: Some(m),
            ..cas(&["ver"])
        },
    );

    const KEYS: i64 = 20;
    const WRITERS: i64 = 4;
    const ROUNDS: i64 = 15;
    let version = Arc::new(AtomicI64::new(1));
    let max = Arc::new(Mutex::new(vec![0i64; KEYS as usize + 1]));
    let total = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (a, t, pool) = (a.clone(), t.clone(), db.pool.clone());
        let (version, max, total) = (version.clone(), max.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                // Every writer covers all keys, in a different order each time.
                let mut keys: Vec<i64> = (1..=KEYS).collect();
                keys.rotate_left(((w * 7 + round * 3) % KEYS) as usize);
                if (w + round) % 2 == 1 {
                    keys.reverse();
                }
                let muts: Vec<Mutation> = keys
                    .iter()
                    .map(|&k| {
                        let ver = version.fetch_add(1, Ordering::Relaxed);
                        let mut max = max.lock().unwrap();
                        max[k as usize] = max[k as usize].max(ver);
                        up(
                            json!([k]),
                            json!({"k": k, "ver": ver, "v": format!("w{w}")}),
                        )
                    })
                    .collect();
                let mut tx = pool.begin().await.expect("begin");
                let s = a.apply(&mut tx, &t, &muts).await.expect("apply");
                tx.commit().await.expect("commit");
                assert_eq!(s.upserts + s.conflicts, KEYS as u64);
                total.fetch_add((s.upserts + s.conflicts) as i64, Ordering::Relaxed);
            }
        }));
    }
    // An outside writer bumps versions too, as a local workload would.
    let pool = db.pool.clone();
    let bump = version.clone();
    let maxes = max.clone();
    let outside = tokio::spawn(async move {
        for _ in 0..ROUNDS {
            let ver = bump.fetch_add(1, Ordering::Relaxed);
            let k = ver % KEYS + 1;
            let mut tx = pool.begin().await.expect("begin");
            let n = sqlx::query("UPDATE t SET ver = $1, v = 'outside' WHERE k = $2 AND ver < $1")
                .bind(ver)
                .bind(k)
                .execute(&mut *tx)
                .await
                .expect("outside update")
                .rows_affected();
            tx.commit().await.expect("commit");
            if n == 1 {
                let mut max = maxes.lock().unwrap();
                max[k as usize] = max[k as usize].max(ver);
            }
        }
    });
    for task in tasks {
        task.await.expect("writer");
    }
    outside.await.expect("outside writer");
    assert_eq!(total.load(Ordering::Relaxed), KEYS * WRITERS * ROUNDS);
    let got: Vec<(i64, i64)> = rows(&db, "SELECT k, ver FROM t ORDER BY k").await;
    let max = max.lock().unwrap();
    let want: Vec<(i64, i64)> = (1..=KEYS).map(|k| (k, max[k as usize])).collect();
    assert_eq!(got, want);
    assert!(!seen.lock().unwrap().is_empty(), "writers did conflict");
}

#[tokio::test]
async fn active_active_losers_land_in_the_dlq_with_their_columns() {
    let db = Db::new("kv").await;
    db.exec(
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT, _source TEXT NOT NULL DEFAULT 'west', _timestamp TIMESTAMPTZ NOT NULL DEFAULT now());
         INSERT INTO kv VALUES (1, 'west wrote', 'west', '2024-05-01T10:00:02Z'), (2, 'same', 'east', '2024-05-01T10:00:01Z'), (3, 'west wrote', 'west', '2024-05-01T10:00:02Z')",
    )
    .await;
    let a = applier(&db);
    let t = table(&db, "kv");
    // The seed's `standardMerge(() => ({ dlq: table }))`.
    let (fallback, _) = scripted(|_| Ok(Resolution::Dlq("kv".into())));
    a.set_config(
        &t,
        TableConfig {
            merge: Some(standard::merge(Some(fallback))),
            ..cas(&["_timestamp"])
        },
    );
    let east =
        |k: i64, v: &str, ts: &str| json!({"k": k, "v": v, "_source": "east", "_timestamp": ts});
    let stale = up_from(
        json!([1]),
        east(1, "original", "2024-05-01T09:00:00Z"),
        east(1, "east wrote", "2024-05-01T10:00:01Z"),
    );
    let s = apply(
        &a,
        &db,
        &t,
        &[
            // East's version is older than west's: a conflict the merge cannot settle.
            stale.clone(),
            // A replay of the version west already has: merges to a no-op.
            up_from(
                json!([2]),
                east(2, "original", "2024-05-01T09:00:00Z"),
                east(2, "same", "2024-05-01T10:00:01.000+00:00"),
            ),
            // East's version is newer: it simply wins.
            up_from(
                json!([3]),
                east(3, "original", "2024-05-01T09:00:00Z"),
                east(3, "east is newer", "2024-05-01T10:00:03Z"),
            ),
        ],
    )
    .await
    .expect("apply");
    assert_eq!(
        (s.upserts, s.conflicts, s.resolved, s.dead_lettered),
        (1, 2, 1, 1)
    );
    let got: Vec<(i64, String, String)> =
        rows(&db, "SELECT k, v, _source FROM kv ORDER BY k").await;
    assert_eq!(
        got,
        [
            (1, "west wrote", "west"),
            (2, "same", "east"),
            (3, "east is newer", "east")
        ]
        .map(|(k, v, s)| (k, v.to_string(), s.to_string()))
    );
    let dlq = dead_letters(&db).await;
    assert_eq!(
        dlq,
        [(
            "kv".to_string(),
            stale.time.nanos(),
            i64::from(stale.time.logical()),
            east(1, "east wrote", "2024-05-01T10:00:01Z"),
            east(1, "original", "2024-05-01T09:00:00Z"),
        )]
    );
}
