//! The verifier against two real databases: in sync, changed, missing and extra rows, watch.

use crate::support::Db;
use cdc_sink::verify::{self, CompareOptions, DiffKind, TableRef};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `db` plus a second database "copy" on the same cluster, both holding `ddl` and `fill`.
async fn pair(ddl: &str, fill: &str) -> (Db, sqlx::PgPool) {
    let db = Db::new("orig").await;
    db.cluster
        .psql("postgres", "CREATE DATABASE copy")
        .expect("second database");
    let copy = verify::connect(&db.cluster.url("postgres"), Some("copy"), "target")
        .await
        .expect("connect");
    for pool in [&db.pool, &copy] {
        sqlx::raw_sql(&format!("{ddl}; {fill}"))
            .execute(pool)
            .await
            .expect("fill");
    }
    (db, copy)
}

#[tokio::test]
async fn identical_tables_are_in_sync_and_each_difference_is_named() {
    let (db, copy) = pair(
        "CREATE TABLE public.t (k INT8 PRIMARY KEY, v TEXT, at TIMESTAMPTZ, n NUMERIC)",
        "INSERT INTO public.t SELECT g, 'v' || g, '2024-01-01'::timestamptz + g * interval '1s', g / 7.0 FROM generate_series(1, 5000) g",
    )
    .await;
    let table = TableRef::parse("public.t").expect("name");
    let opts = CompareOptions {
        sample: 5,
        ..Default::default()
    };
    let r = verify::compare(&db.pool, &copy, &table, &opts)
        .await
        .expect("compare");
    assert!(r.in_sync(), "{r}");
    assert_eq!((r.source_rows, r.target_rows), (5000, 5000));
    assert!(r.buckets > 1, "several key ranges");

    sqlx::raw_sql(
        "UPDATE public.t SET v = 'changed' WHERE k = 17; DELETE FROM public.t WHERE k = 4242; \
         INSERT INTO public.t VALUES (9999, 'extra', NULL, NULL)",
    )
    .execute(&copy)
    .await
    .expect("diverge");
    let r = verify::compare(&db.pool, &copy, &table, &opts)
        .await
        .expect("compare");
    assert!(!r.in_sync());
    assert_eq!((r.missing, r.extra, r.changed), (1, 1, 1), "{r}");
    assert!(r.exact);
    let mut samples = r.samples.clone();
    samples.sort_by_key(|s| s.1.clone());
    assert_eq!(
        samples,
        vec![
            (DiffKind::Changed, "(17)".to_string()),
            (DiffKind::Missing, "(4242)".to_string()),
            (DiffKind::Extra, "(9999)".to_string()),
        ]
    );
    let text = r.to_string();
    assert!(
        text.contains("1 missing") && text.contains("Extra (9999)"),
        "{text}"
    );

    // A column present on one side only is reported and left out; ignoring a column works.
    sqlx::raw_sql("ALTER TABLE public.t ADD COLUMN only_here INT")
        .execute(&copy)
        .await
        .expect("alter");
    let opts = CompareOptions {
        ignore_columns: vec!["v".into()],
        sample: 5,
    };
    let r = verify::compare(&db.pool, &copy, &table, &opts)
        .await
        .expect("compare");
    assert_eq!(r.only_in_target, vec!["only_here".to_string()]);
    assert_eq!((r.missing, r.extra, r.changed), (1, 1, 0), "v ignored: {r}");
}

#[tokio::test]
async fn text_keys_use_hash_buckets_and_watch_reports_convergence() {
    let (db, copy) = pair(
        "CREATE TABLE public.t (a TEXT, b INT, v JSONB, PRIMARY KEY (a, b))",
        "INSERT INTO public.t SELECT 'key ' || g, g % 3, jsonb_build_object('g', g) FROM generate_series(1, 3000) g",
    )
    .await;
    let table = TableRef::parse("orig.public.t").expect("name");
    sqlx::raw_sql("DELETE FROM public.t WHERE b = 0")
        .execute(&copy)
        .await
        .expect("diverge");
    let r = verify::compare(&db.pool, &copy, &table, &CompareOptions::default())
        .await
        .expect("compare");
    assert_eq!(r.missing, 1000, "{r}");
    assert!(r.differing_buckets > 0);

    // Repair it while watching: the watch ends in sync after 2 clean checks.
    let repair = copy.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        sqlx::raw_sql("INSERT INTO public.t SELECT 'key ' || g, g % 3, jsonb_build_object('g', g) FROM generate_series(1, 3000) g WHERE g % 3 = 0")
            .execute(&repair)
            .await
            .expect("repair");
    });
    let mut seen = Vec::new();
    let outcome = verify::watch(
        &db.pool,
        &copy,
        &table,
        &CompareOptions::default(),
        Duration::from_millis(200),
        2,
        Duration::from_secs(30),
        CancellationToken::new(),
        |r, clean| seen.push((r.in_sync(), clean)),
    )
    .await
    .expect("watch");
    assert!(outcome.in_sync);
    assert_eq!(outcome.clean, 2);
    assert_eq!(seen.first(), Some(&(false, 0)), "{seen:?}");
    assert_eq!(seen.last(), Some(&(true, 2)), "{seen:?}");

    // A watch that never converges gives up at its timeout.
    sqlx::raw_sql("DELETE FROM public.t WHERE a = 'key 1'")
        .execute(&copy)
        .await
        .expect("diverge");
    let outcome = verify::watch(
        &db.pool,
        &copy,
        &table,
        &CompareOptions::default(),
        Duration::from_millis(100),
        2,
        Duration::from_millis(500),
        CancellationToken::new(),
        |_, _| {},
    )
    .await
    .expect("watch");
    assert!(!outcome.in_sync);
    assert!(outcome.checks >= 2);
}
