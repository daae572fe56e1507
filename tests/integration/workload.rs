//! The kv workload against real PostgreSQL: pacing, key sequences, table and database set-up.

use crate::support::Db;
use cdc_sink::workload::kv::{self, KvArgs};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn sequential_writes_keep_the_rate_and_start_at_the_write_seq() {
    let db = Db::new("kv").await;
    let mut args = KvArgs::new(&db.url());
    args.table = "kv.public.kv".into();
    args.duration = Duration::from_secs(3);
    args.max_rate = 100.0;
    args.sequential = true;
    args.write_seq = 500;
    args.value_bytes = 10;
    args.concurrency = 4;
    let mut lines = 0;
    let summary = kv::run_with_progress(&args, CancellationToken::new(), |_| lines += 1)
        .await
        .expect("workload runs");
    // 3s at 100/s: 300 operations, within 20%.
    assert!((240..=360).contains(&summary.ops), "{summary}");
    assert!((80.0..=120.0).contains(&summary.ops_per_sec), "{summary}");
    assert_eq!(summary.errors, 0);
    assert!(lines >= 2, "a progress report per second");
    assert!(summary.p50_ms > 0.0 && summary.p99_ms >= summary.p50_ms);
    let (min, max, n, short): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT min(k), max(k), count(*), count(*) FILTER (WHERE length(v) <> 10) FROM public.kv",
    )
    .fetch_one(&db.pool)
    .await
    .expect("read keys");
    assert_eq!((min, n, short), (500, summary.ops as i64, 0));
    assert_eq!(max, 500 + summary.ops as i64 - 1, "no gaps");
    assert_eq!(summary.next_seq, Some(500 + summary.ops as i64));

    // Continuing from the same seq overwrites the same keys instead of adding rows.
    args.duration = Duration::from_secs(1);
    let again = kv::run(&args, CancellationToken::new())
        .await
        .expect("again");
    assert!(again.ops > 0);
    assert_eq!(db.count("public.kv").await, summary.ops as i64);
}

#[tokio::test]
async fn random_keys_and_a_missing_database_are_handled() {
    let db = Db::new("postgres_side").await;
    // The table names another database: it is created.
    let mut args = KvArgs::new(&db.url());
    args.table = "other.public.kv".into();
    args.duration = Duration::from_millis(1500);
    args.max_rate = 200.0;
    args.concurrency = 2;
    let cancel = CancellationToken::new();
    let summary = kv::run(&args, cancel).await.expect("workload runs");
    assert!(summary.ops > 100, "{summary}");
    assert_eq!(summary.next_seq, None);
    let out = db
        .cluster
        .psql(
            "other",
            "SELECT count(DISTINCT k), count(*), min(k) >= 0 FROM public.kv",
        )
        .expect("psql");
    let fields: Vec<&str> = out.trim().split('|').collect();
    assert_eq!(fields[0], fields[1], "random keys do not repeat: {out}");
    assert_eq!(fields[1], summary.ops.to_string());
    assert_eq!(fields[2], "t");
}

#[tokio::test]
async fn cancelling_stops_a_run_early() {
    let db = Db::new("kv").await;
    let mut args = KvArgs::new(&db.url());
    args.table = "public.kv".into();
    args.duration = Duration::from_secs(600);
    args.max_rate = 50.0;
    let cancel = CancellationToken::new();
    let stopper = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        stopper.cancel();
    });
    let started = std::time::Instant::now();
    let summary = kv::run(&args, cancel).await.expect("workload runs");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(summary.ops > 0 && summary.ops < 100, "{summary}");
}
