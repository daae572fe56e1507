//! Regression tests of ways the sink once lost or regressed rows with several instances.

use crate::support::sink::{batch, committed, hlc, is_committed, resolved, upsert, Sink};
use crate::support::{eventually, Db};
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Staged rows of every table of the staging schema (bookkeeping tables aside).
async fn staged_rows(pool: &sqlx::PgPool) -> i64 {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = '_cdc_sink' \
         AND tablename NOT IN ('checkpoints', 'leases', 'applied_ranges', 'staging_tables')",
    )
    .fetch_all(pool)
    .await
    .expect("list staging tables");
    let mut n = 0;
    for t in tables {
        let c: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM _cdc_sink.{t}"))
            .fetch_one(pool)
            .await
            .expect("count staged rows");
        n += c;
    }
    n
}

/// Instance B stages the first rows of a table created after both started; the lease holder A,
/// whose cached schema lacks the table, must still apply them before its checkpoint passes.
#[tokio::test]
async fn a_new_table_staged_by_another_instance_is_applied_by_the_lease_holder() {
    let db = Db::kv("newtab").await;
    let a = Sink::start(&db, &[]).await;
    let b = Sink::start(&db, &[]).await;
    let path = "/newtab/public";
    a.post_ok(
        path,
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    a.post_ok(path, resolved(1)).await;
    committed(&db.pool, "newtab.public", hlc(1)).await;

    db.exec("CREATE TABLE public.newt (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    b.post_ok(
        path,
        batch(vec![
            upsert("newt", json!([1]), json!({"k": 1, "v": "x"}), 2),
            upsert("newt", json!([2]), json!({"k": 2, "v": "y"}), 3),
        ]),
    )
    .await;
    a.post_ok(path, resolved(3)).await;
    committed(&db.pool, "newtab.public", hlc(3)).await;
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT k, v FROM public.newt ORDER BY k")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, "x".into()), (2, "y".into())]);
    assert_eq!(staged_rows(&db.pool).await, 0, "applied rows stay staged");
    a.stop().await;
    b.stop().await;
}

/// Rows staged for a table that the target lacks (dropped after another instance staged them)
/// hold the checkpoint back instead of being skipped, and are applied once it exists again.
#[tokio::test]
async fn staged_rows_of_a_table_the_target_lacks_hold_the_checkpoint() {
    let db = Db::kv("gone").await;
    let a = Sink::start(&db, &[]).await;
    let b = Sink::start(&db, &[]).await;
    let path = "/gone/public";
    a.post_ok(
        path,
        batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]),
    )
    .await;
    db.exec("CREATE TABLE public.doomed (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    b.post_ok(
        path,
        batch(vec![upsert(
            "doomed",
            json!([1]),
            json!({"k": 1, "v": "x"}),
            2,
        )]),
    )
    .await;
    db.exec("DROP TABLE public.doomed").await;
    a.post_ok(path, resolved(2)).await;
    // The window is refused (and retried with backoff) for as long as the table is missing.
    eventually("the window to be refused", WAIT, || async {
        let metrics = a.metrics().await;
        metrics
            .lines()
            .filter(|l| l.starts_with("sequence_poison_backoff_total") && l.contains("gone.public"))
            // Present at 0 from the start: wait for a refusal.
            .any(|l| !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
    assert!(!is_committed(&db.pool, "gone.public", hlc(2)).await);
    db.exec("CREATE TABLE public.doomed (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    committed(&db.pool, "gone.public", hlc(2)).await;
    assert_eq!(db.count("public.doomed").await, 1);
    assert_eq!(db.count("public.kv").await, 1);
    a.stop().await;
    b.stop().await;
}

/// With separate staging, a flush that outlives its lease must not commit: another instance
/// may have taken the lease and applied newer versions of its keys meanwhile.
#[tokio::test]
async fn a_flush_outliving_its_lease_on_separate_staging_does_not_commit() {
    let db = Db::kv("fence").await;
    db.cluster
        .psql("postgres", "CREATE DATABASE staging")
        .expect("create staging database");
    let staging_url = db.cluster.url("staging");
    let staging = sqlx::PgPool::connect(&staging_url).await.unwrap();
    // The first write of v = 'old' takes longer than a lease lives (10 s); later ones do not.
    db.exec(
        "CREATE SEQUENCE public.slow_once;
         CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.v = 'old' AND nextval('public.slow_once') = 1 THEN PERFORM pg_sleep(13); END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON public.kv
           FOR EACH ROW EXECUTE FUNCTION public.slow();",
    )
    .await;
    let flags = ["--stagingConn", &staging_url, "--flushSize", "1"];
    let a = Sink::start(&db, &flags).await;
    let b = Sink::start(&db, &flags).await;
    let path = "/fence/public";
    a.post_ok(
        path,
        batch(vec![
            upsert("kv", json!([1]), json!({"k": 1, "v": "old"}), 1),
            upsert("kv", json!([1]), json!({"k": 1, "v": "new"}), 2),
        ]),
    )
    .await;
    a.post_ok(path, resolved(2)).await;
    // A is in its slow flush; B's pipeline waits for the lease.
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%INSERT INTO%kv%' AND wait_event = 'PgSleep'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if n > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the slow flush starts");
    b.post_ok(path, resolved(2)).await;
    committed(&staging, "fence.public", hlc(2)).await;
    // Whoever applied the window, the key ends at its last version, also once the slow
    // transaction has ended one way or the other.
    eventually("the slow transaction ends", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
        )
        .fetch_one(&db.pool)
        .await
        .ok()?;
        (n == 0).then_some(())
    })
    .await;
    let v: String = sqlx::query_scalar("SELECT v FROM public.kv WHERE k = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(v, "new", "a flush committed after its lease expired");
    a.stop().await;
    b.stop().await;
}

/// Best-effort mode writes straight to the target, so a redelivered old version of a key
/// applied directly would overwrite the newer one while a deferred poison row holds the
/// checkpoint back. A row at or below a recorded resolved timestamp is a redelivery: dropped.
#[tokio::test]
async fn best_effort_drops_redeliveries_below_a_recorded_resolved_timestamp() {
    let db = Db::new("bestredeliver").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT CHECK (v <> 'bad'))")
        .await;
    let sink = Sink::start(&db, &["--bestEffortOnly"]).await;
    let path = "/bestredeliver/public";
    let row = |k: i64, v: &str, at: i64| upsert("kv", json!([k]), json!({"k": k, "v": v}), at);
    // k = 2 is refused by the target and deferred: it blocks the checkpoint.
    sink.post_ok(path, batch(vec![row(2, "bad", 1)])).await;
    sink.post_ok(path, batch(vec![row(1, "v1", 2)])).await;
    sink.post_ok(path, batch(vec![row(1, "v2", 3)])).await;
    sink.post_ok(path, resolved(3)).await;
    let v = |db: &Db| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT v FROM public.kv WHERE k = 1")
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(v(&db).await.as_deref(), Some("v2"));
    sink.post_ok(path, batch(vec![row(1, "v1", 2)])).await;
    assert_eq!(
        v(&db).await.as_deref(),
        Some("v2"),
        "a redelivered old version overwrote the newer one"
    );
    assert!(!is_committed(&db.pool, "bestredeliver.public", hlc(3)).await);
    db.exec("ALTER TABLE public.kv DROP CONSTRAINT kv_v_check")
        .await;
    committed(&db.pool, "bestredeliver.public", hlc(3)).await;
    assert_eq!(v(&db).await.as_deref(), Some("v2"));
    assert_eq!(db.count("public.kv").await, 2);
    sink.stop().await;
}
