//! The database failing or saturated: fast 503s while it is unreachable, leases that ingest
//! cannot starve, shutdown within the grace period, and no row values in logs or answers.

use crate::support::process::{free_port, Process};
use crate::support::sink::{batch, hlc, is_committed, resolved, upsert};
use crate::support::{eventually, Db};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn log_file(path: &Path) -> Stdio {
    std::fs::File::create(path).expect("log file").into()
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read log")
}

fn rows(t: i64, keys: std::ops::Range<i64>) -> String {
    batch(
        keys.map(|k| upsert("kv", json!([k]), json!({"k": k, "v": format!("t{t}")}), t))
            .collect(),
    )
}

/// Sends SIGTERM and returns how long the process took to exit (panics after `limit`).
async fn terminate(p: &mut Process, limit: Duration) -> Duration {
    let started = Instant::now();
    assert_eq!(
        unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) },
        0,
        "SIGTERM"
    );
    let child = std::sync::Mutex::new(&mut p.child);
    eventually("the sink to exit", limit, || {
        let exited = child.lock().expect("poisoned").try_wait().ok().flatten();
        async move { exited.map(|_| ()) }
    })
    .await;
    started.elapsed()
}

async fn stop_cluster(db: &Db) {
    // pg_ctl blocks: keep it off the runtime's worker.
    tokio::task::block_in_place(|| db.cluster.stop().expect("stop postgresql"));
}

async fn start_cluster(db: &Db) {
    tokio::task::block_in_place(|| db.cluster.restart().expect("restart postgresql"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_answered_503_at_once_and_does_not_hold_up_shutdown() {
    let db = Db::kv("dbfail_down").await;
    let port = free_port();
    let mut p = Process::start(&db, port, &[]).await;
    let path = "/dbfail_down/public";
    assert_eq!(p.post(path, rows(1, 0..10)).await, StatusCode::OK);
    assert_eq!(p.post(path, resolved(1)).await, StatusCode::OK);
    eventually("apply", Duration::from_secs(20), || async {
        (db.count("public.kv").await == 10).then_some(())
    })
    .await;

    stop_cluster(&db).await;
    for attempt in 0..3 {
        let started = Instant::now();
        let answer = p
            .client
            .request(Method::POST, path, Bytes::from(rows(2, 0..10)))
            .await
            .expect("an answer");
        let took = started.elapsed();
        eprintln!("attempt {attempt}: {} after {took:?}", answer.status);
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.body
        );
        assert!(
            answer.headers.contains_key(http::header::RETRY_AFTER),
            "503 without Retry-After"
        );
        // CockroachDB's webhook client gives up after a few seconds by default.
        assert!(
            took < Duration::from_millis(1500),
            "attempt {attempt}: 503 after {took:?}"
        );
    }

    start_cluster(&db).await;
    eventually(
        "ingest to recover with the database",
        Duration::from_secs(20),
        || async { (p.post(path, rows(2, 0..10)).await == StatusCode::OK).then_some(()) },
    )
    .await;

    // A pipeline holds the lease; the database goes away; SIGTERM must not wait for the
    // pool's acquire timeout (10 s) nor the grace period (30 s by default).
    assert_eq!(p.post(path, resolved(2)).await, StatusCode::OK);
    stop_cluster(&db).await;
    let took = terminate(&mut p, Duration::from_secs(20)).await;
    eprintln!("shutdown with the database down took {took:?}");
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    start_cluster(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_holding_every_connection_cannot_starve_the_lease() {
    let db = Db::new("dbfail_lease").await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT); CREATE SCHEMA other; CREATE TABLE other.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("sink.log");
    let port = free_port();
    let p = Process::start_logging(
        &db,
        port,
        &["--targetMaxPoolSize", "4", "--httpResponseTimeout", "2m"],
        log_file(&log),
    )
    .await;
    // The pipeline of `other` runs and holds its lease.
    assert_eq!(
        p.post("/dbfail_lease/other", rows(1, 0..5)).await,
        StatusCode::OK
    );
    assert_eq!(
        p.post("/dbfail_lease/other", resolved(1)).await,
        StatusCode::OK
    );
    eventually("other applied", Duration::from_secs(20), || async {
        (db.count("other.kv").await == 5).then_some(())
    })
    .await;
    // `public` has a staging table, which a session of ours now locks: every request to
    // `public` waits on it while holding a connection.
    assert_eq!(
        p.post("/dbfail_lease/public", rows(1, 0..5)).await,
        StatusCode::OK
    );
    let mut lock = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE _cdc_sink.dbfail_lease_public_kv IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the staging table");
    let client = p.client.clone();
    let mut stuck = Vec::new();
    for i in 0..12 {
        let client = client.clone();
        stuck.push(tokio::spawn(async move {
            client
                .post(
                    "/dbfail_lease/public",
                    Bytes::from(rows(2, i * 10..i * 10 + 10)),
                )
                .await
                .map(|(s, _)| s)
        }));
    }
    eventually(
        "ingest requests waiting on the lock",
        Duration::from_secs(20),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'dbfail_lease' AND wait_event_type = 'Lock' AND application_name = 'cdc-sink'",
            )
            .fetch_one(&db.pool)
            .await
            .expect("pg_stat_activity");
            (waiting >= 2).then_some(())
        },
    )
    .await;
    // Longer than a lease lifetime (10 s) with ingest saturated: the lease of `other` must
    // stay unexpired throughout.
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let live: Option<bool> = sqlx::query_scalar(
            "SELECT expires > now() FROM _cdc_sink.leases WHERE name LIKE '%other%'",
        )
        .fetch_optional(&db.pool)
        .await
        .expect("read lease");
        assert_eq!(live, Some(true), "the lease of `other` expired or vanished");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lock.commit().await.expect("unlock");
    for s in stuck {
        assert_eq!(
            s.await.expect("join").expect("answer"),
            StatusCode::OK,
            "queued requests go through once the lock is gone"
        );
    }
    assert_eq!(
        p.post("/dbfail_lease/public", resolved(2)).await,
        StatusCode::OK
    );
    eventually("public applied", Duration::from_secs(20), || async {
        (db.count("public.kv").await == 120).then_some(())
    })
    .await;
    drop(p);
    let text = log_text(&log);
    assert!(!text.contains("apply lease lost"), "{text}");
    assert!(!text.contains("could not renew"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_window_exits_within_the_grace_period_and_resumes_exactly_once() {
    let db = Db::kv("dbfail_term").await;
    // Every write to the target is counted: applying anything twice shows.
    db.exec(
        "CREATE TABLE public.writes (k INT8 NOT NULL);
         CREATE FUNCTION public.count_write() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO public.writes VALUES (NEW.k); RETURN NEW; END $$;
         CREATE TRIGGER count_write AFTER INSERT OR UPDATE ON public.kv
           FOR EACH ROW EXECUTE FUNCTION public.count_write();",
    )
    .await;
    let port = free_port();
    let flags = [
        "--gracePeriod",
        "3s",
        "--flushSize",
        "10",
        "--parallelism",
        "1",
    ];
    let mut p = Process::start(&db, port, &flags).await;
    let path = "/dbfail_term/public";
    for t in 1..=10 {
        assert_eq!(
            p.post(path, rows(t, (t - 1) * 10..t * 10)).await,
            StatusCode::OK
        );
    }
    // The first flush of the window waits on this lock for as long as the test wants.
    let mut lock = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE public.kv IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the target table");
    assert_eq!(p.post(path, resolved(10)).await, StatusCode::OK);
    eventually("a flush waiting on the lock", Duration::from_secs(20), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'dbfail_term' AND wait_event_type = 'Lock' AND application_name = 'cdc-sink'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity");
        (waiting >= 1).then_some(())
    })
    .await;
    let took = terminate(&mut p, Duration::from_secs(30)).await;
    eprintln!("exit after SIGTERM took {took:?}");
    // The grace period, plus the process's own teardown on a loaded machine.
    assert!(
        took < Duration::from_secs(4),
        "exit took {took:?} with a grace period of 3s"
    );
    lock.commit().await.expect("unlock");
    drop(p);

    let p = Process::start(&db, port, &flags).await;
    eventually(
        "the window applied after restart",
        Duration::from_secs(60),
        || async {
            is_committed(&db.pool, "dbfail_term.public", hlc(10))
                .await
                .then_some(())
        },
    )
    .await;
    let want: Vec<(i64, Option<String>)> = (1..=10)
        .flat_map(|t| ((t - 1) * 10..t * 10).map(move |k| (k, Some(format!("t{t}")))))
        .collect();
    assert_eq!(db.kv_rows().await, want, "the target holds what was sent");
    assert_eq!(
        db.count("public.writes").await,
        100,
        "each row written once"
    );
    assert_eq!(db.count("_cdc_sink.dbfail_term_public_kv").await, 0);
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_in_database_errors_reach_neither_logs_nor_answers() {
    let db = Db::new("dbfail_values").await;
    db.exec(
        "CREATE TABLE public.nums (k INT8 PRIMARY KEY, n INT8);
         CREATE TABLE public.uq (k INT8 PRIMARY KEY, v TEXT UNIQUE);",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = "/dbfail_values/public";

    // Consistent mode: the value is staged, then refused at apply time.
    let log = dir.path().join("consistent.log");
    let p = Process::start_logging(&db, free_port(), &[], log_file(&log)).await;
    let marker = "Zq7marker-apply";
    let body = batch(vec![upsert(
        "nums",
        json!([1]),
        json!({"k": 1, "n": marker}),
        1,
    )]);
    assert_eq!(p.post(path, body).await, StatusCode::OK);
    assert_eq!(p.post(path, resolved(1)).await, StatusCode::OK);
    eventually(
        "the apply failure logged",
        Duration::from_secs(30),
        || async {
            log_text(&log)
                .contains("poison mutation blocks the schema")
                .then_some(())
        },
    )
    .await;
    drop(p);
    let text = log_text(&log);
    assert!(text.contains("22P02"), "the SQLSTATE is logged: {text}");
    assert!(
        !text.contains(marker),
        "a row value reached the log: {text}"
    );

    // Immediate mode: the target refuses the request itself and the answer says why.
    let log = dir.path().join("immediate.log");
    let p = Process::start_logging(&db, free_port(), &["--immediate"], log_file(&log)).await;
    let marker = "Zq7marker-immediate";
    let body = batch(vec![upsert(
        "nums",
        json!([2]),
        json!({"k": 2, "n": marker}),
        2,
    )]);
    let (status, answer) = p
        .post_within(path, body, Duration::from_secs(30))
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer.contains("22P02"), "{answer}");
    assert!(
        !answer.contains(marker),
        "a row value in the answer: {answer}"
    );

    let marker = "Zq7marker-unique";
    let first = batch(vec![upsert(
        "uq",
        json!([1]),
        json!({"k": 1, "v": marker}),
        3,
    )]);
    assert_eq!(p.post(path, first).await, StatusCode::OK);
    let second = batch(vec![upsert(
        "uq",
        json!([2]),
        json!({"k": 2, "v": marker}),
        4,
    )]);
    let (status, answer) = p
        .post_within(path, second, Duration::from_secs(30))
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer.contains("uq_v_key"),
        "the constraint is named: {answer}"
    );
    assert!(
        !answer.contains(marker),
        "a row value in the answer: {answer}"
    );
    drop(p);
    let text = log_text(&log);
    assert!(
        !text.contains("Zq7marker"),
        "a row value reached the log: {text}"
    );
}
