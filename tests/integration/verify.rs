//! The verifier against two real databases: in sync, changed, missing and extra rows, watch.

use crate::support::Db;
use cdc_sink::verify::{self, CompareOptions, DiffKind, RepairOptions, Side, Step, TableRef};
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

#[tokio::test]
async fn repair_copies_changed_missing_and_extra_rows_from_the_authoritative_side() {
    let (db, copy) = pair(
        "CREATE TABLE public.t (k INT8 PRIMARY KEY, v TEXT, at TIMESTAMPTZ, n NUMERIC, \
         _source TEXT, _timestamp DECIMAL, doubled INT8 GENERATED ALWAYS AS (k * 2) STORED)",
        "INSERT INTO public.t (k, v, at, n, _source, _timestamp) SELECT g, 'v' || g, \
         '2024-01-01'::timestamptz + g * interval '1s', g / 7.0, 'east', g \
         FROM generate_series(1, 3000) g",
    )
    .await;
    let table = TableRef::parse("public.t").expect("name");
    // Writes that reached only the copy while it served alone, and a column only it has.
    sqlx::raw_sql(
        "ALTER TABLE public.t ADD COLUMN note TEXT DEFAULT 'kept'; \
         UPDATE public.t SET v = 'west', _source = 'west', _timestamp = 9e9 WHERE k % 100 = 0; \
         DELETE FROM public.t WHERE k BETWEEN 1000 AND 1009; \
         INSERT INTO public.t (k, v) SELECT g, 'extra' FROM generate_series(3001, 3005) g",
    )
    .execute(&copy)
    .await
    .expect("diverge");
    let mut steps = Vec::new();
    let from_source = RepairOptions {
        from: Side::Source,
        batch: 7,
    };
    let r = verify::compare_and_repair(
        &db.pool,
        &copy,
        &table,
        &CompareOptions::default(),
        Some(from_source),
        5,
        |s| {
            steps.push(match s {
                Step::Compared(r, _) => format!(
                    "compared {} {} {} {}",
                    r.missing,
                    r.extra,
                    r.changed,
                    r.in_sync()
                ),
                Step::Repaired(r) => format!(
                    "repaired {} {} {} {} {}->{}",
                    r.keys, r.upserted, r.deleted, r.batches, r.from, r.to
                ),
            })
        },
    )
    .await
    .expect("repair");
    assert!(r.in_sync(), "{r}");
    assert_eq!(
        steps,
        [
            "compared 10 5 29 false",
            "repaired 44 39 5 7 source->target",
            "compared 0 0 0 true"
        ]
    );
    // Hidden columns came along; the copy's own column kept its values and default.
    let (west, kept): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE _source <> 'east'), count(*) FILTER (WHERE note = 'kept') \
         FROM public.t",
    )
    .fetch_one(&copy)
    .await
    .expect("count");
    assert_eq!((west, kept), (0, 3000));

    // The other way round: the copy is authoritative, the generated column is left alone.
    db.exec(
        "DELETE FROM public.t WHERE k = 1; UPDATE public.t SET v = 'late' WHERE k = 2; \
         INSERT INTO public.t (k, v) VALUES (9000, 'only here')",
    )
    .await;
    let from_target = RepairOptions {
        from: Side::Target,
        batch: 100,
    };
    let r = verify::compare_and_repair(
        &db.pool,
        &copy,
        &table,
        &CompareOptions::default(),
        Some(from_target),
        5,
        |_| {},
    )
    .await
    .expect("repair back");
    assert!(r.in_sync(), "{r}");
    let row: (String, i64) = sqlx::query_as("SELECT v, doubled FROM public.t WHERE k = 2")
        .fetch_one(&db.pool)
        .await
        .expect("row");
    assert_eq!(row, ("v2".to_string(), 4));
    assert_eq!(db.count("public.t").await, 3000);
}

const LOG: &str = "\n--- log ---\n";

/// Runs the `cdc-sink verify` binary; success, and standard output followed by the log.
async fn verify_cli(args: Vec<String>) -> (bool, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .arg("verify")
            .args(&args)
            .output()
            .expect("run cdc-sink verify")
    })
    .await
    .expect("join");
    (
        out.status.success(),
        format!(
            "{}{LOG}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn verify_repair_watch_prints_failback_ready_after_the_clean_checks() {
    let (db, copy) = pair(
        "CREATE TABLE public.t (a TEXT, b INT, v JSONB, PRIMARY KEY (a, b))",
        "INSERT INTO public.t SELECT 'key ' || g, g % 3, jsonb_build_object('g', g) FROM generate_series(1, 600) g",
    )
    .await;
    let diverge = || async {
        sqlx::raw_sql(
            "DELETE FROM public.t WHERE b = 0 AND a < 'key 3'; \
             UPDATE public.t SET v = '{\"g\": -1}' WHERE b = 1 AND a < 'key 2'; \
             INSERT INTO public.t VALUES ('west only', 7, '{}')",
        )
        .execute(&copy)
        .await
        .expect("diverge");
    };
    diverge().await;
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "--source",
            &db.url(),
            "--target",
            &db.cluster.url("copy"),
            "--table",
            "public.t",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let (ok, out) = verify_cli(args(&[])).await;
    assert!(!ok, "differs before the repair: {out}");
    assert!(
        !verify_cli(args(&["--from", "source"])).await.0,
        "--from alone is refused"
    );

    let (ok, out) = verify_cli(args(&[
        "--repair",
        "--from",
        "source",
        "--watch",
        "200ms",
        "--clean",
        "2",
        "--timeout",
        "60s",
    ]))
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("on the target database from the source database"),
        "{out}"
    );
    assert!(out.contains("in sync for 2 consecutive checks"), "{out}");
    let stdout = out.split(LOG).next().unwrap_or_default();
    assert!(stdout.trim_end().ends_with("failback ready"), "{out}");
    assert_eq!(
        verify::compare(
            &db.pool,
            &copy,
            &TableRef::parse("public.t").expect("name"),
            &CompareOptions::default()
        )
        .await
        .expect("compare")
        .divergent(),
        0
    );

    // JSON: the report, the repair, the report after it.
    diverge().await;
    let (ok, out) = verify_cli(args(&["--repair", "--from", "source", "--json"])).await;
    assert!(ok, "{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0]["extra"], 1, "{out}");
    assert_eq!(lines[1]["repair"]["from"], "source");
    assert_eq!(lines[1]["repair"]["deleted"], 1);
    assert_eq!(lines[2]["missing"].as_u64(), Some(0), "{out}");
    let (ok, out) = verify_cli(args(&["--watch", "100ms", "--clean", "2", "--json"])).await;
    assert!(ok, "{out}");
    let last: serde_json::Value =
        serde_json::from_str(out.lines().rfind(|l| l.starts_with('{')).expect("a line"))
            .expect("json");
    assert_eq!(
        (
            last["consecutive_clean"].as_u64(),
            last["failback_ready"].as_bool()
        ),
        (Some(2), Some(true))
    );
}
