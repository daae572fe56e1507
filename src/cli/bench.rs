//! `cdc-sink bench`: one throwaway PostgreSQL (fsync on), the same rows written by a raw sqlx
//! baseline and by our immediate and consistent paths over HTTP/2 + TLS, and the ratios.

use crate::bench::{self, Measure, Rows, Summary};
use crate::cluster::{Cluster, ClusterOptions};
use crate::hlc::Hlc;
use crate::server::client::{Client, ClientOptions};
use anyhow::{bail, Context};
use bytes::Bytes;
use futures::StreamExt;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Rows written by every path.
    #[arg(long, default_value_t = 100_000)]
    pub rows: usize,
    /// Bytes of each row's value.
    #[arg(long = "value-bytes", default_value_t = 256)]
    pub value_bytes: usize,
    /// Approximate size of one webhook request.
    #[arg(long = "batch-bytes", default_value = "1MiB", value_parser = crate::config::parse_bytes)]
    pub batch_bytes: u64,
    /// Requests in flight at once (CockroachDB's webhook sink sends several).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Consistent mode: a resolved timestamp after every this many requests (all acknowledged),
    /// as a changefeed with `resolved` emits them while it streams.
    #[arg(long = "resolved-every", default_value_t = 8)]
    pub resolved_every: usize,
    /// `--parallelism` of the consistent and userscript paths (the sink's default if unset).
    #[arg(long)]
    pub parallelism: Option<usize>,
    /// Runs of the consistent and userscript paths, alternated; the best of each is reported.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Backlog drain: rows staged while no resolved timestamp arrives, then applied after one
    /// (0 skips it).
    #[arg(long = "drain-rows", default_value_t = 1_000_000)]
    pub drain_rows: usize,
    /// Sizes of the scaling curve: the baseline and the consistent path at each.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub scale: Vec<usize>,
    /// Adds 5,000,000 rows to the scaling curve.
    #[arg(long)]
    pub long: bool,
    /// Replication lag: `cdc-sink demo` at this many writes per second on each side (0 skips
    /// it); the drain's backlog spans the source time these writes would take.
    #[arg(long = "lag-rate", default_value_t = 2000.0)]
    pub lag_rate: f64,
    /// How long the lag measurement's workloads write.
    #[arg(long = "lag-duration", default_value = "20s", value_parser = crate::config::parse_duration)]
    pub lag_duration: Duration,
    /// The paths measured besides the baseline (to profile one of them alone).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "immediate,best_effort,consistent,userscript",
        value_parser = ["immediate", "best_effort", "consistent", "userscript"]
    )]
    pub paths: Vec<String>,
    /// Print where each path's database time went: its ten costliest statements (the cluster
    /// runs with `pg_stat_statements`).
    #[arg(long)]
    pub statements: bool,
    /// Only the paths: no drain, scaling curve or lag.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let statements = args.statements;
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start_with(ClusterOptions {
            fsync: true,
            settings: if statements {
                vec![(
                    "shared_preload_libraries".to_string(),
                    "'pg_stat_statements'".to_string(),
                )]
            } else {
                Vec::new()
            },
        })
    })
    .await??;
    for db in [
        "baseline",
        "immediate",
        "best_effort",
        "consistent",
        "userscript",
    ] {
        cluster.psql("postgres", &format!("CREATE DATABASE {db}"))?;
        cluster.psql(db, bench::KV_DDL)?;
    }
    let rows = Rows::generate(args.rows, args.value_bytes);
    let bodies = rows.webhook_bodies(args.batch_bytes as usize);
    let mut measures = Vec::new();

    let pool = sqlx::PgPool::connect(&cluster.url("baseline")).await?;
    let took = bench::baseline(&pool, &rows).await?;
    measures.push(Measure::new("baseline", rows.len(), took));
    check_count(&pool, rows.len()).await?;

    let immediate = Plan {
        db: "immediate",
        flags: vec!["--immediate".into()],
        resolved_every: None,
        concurrency: args.concurrency,
        statements,
    };
    let want = |p: &str| args.paths.iter().any(|x| x == p);
    if want("immediate") {
        let took = through_sink(&cluster, &immediate, &bodies, &rows).await?;
        measures.push(Measure::new("immediate", rows.len(), took));
    }

    // Best-effort applies each request at once where no staged row of its keys waits; the
    // resolved timestamps still come, as a changefeed sends them.
    let best_effort = Plan {
        db: "best_effort",
        flags: vec!["--bestEffortOnly".into()],
        resolved_every: Some(args.resolved_every.max(1)),
        concurrency: args.concurrency,
        statements,
    };
    if want("best_effort") {
        let took = through_sink(&cluster, &best_effort, &bodies, &rows).await?;
        measures.push(Measure::new("best_effort", rows.len(), took));
    }

    // The rows carry fixed 2023 timestamps, which would look far behind and select
    // best-effort mode: pin consistent mode (the same cost as the default while it is caught up).
    let parallelism: Vec<String> = args
        .parallelism
        .map(|n| vec!["--parallelism".to_string(), n.to_string()])
        .unwrap_or_default();
    let consistent = Plan {
        db: "consistent",
        flags: [
            vec!["--bestEffortWindow=0".to_string()],
            parallelism.clone(),
        ]
        .concat(),
        resolved_every: Some(args.resolved_every.max(1)),
        concurrency: args.concurrency,
        statements,
    };
    // The consistent path again with the active-active userscript's logic on: dispatch with a
    // `_source` filter before staging, compare-and-set on the version, standard merge.
    let dir = std::env::temp_dir().join(format!("cdc-sink-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("bench.ts");
    std::fs::write(&script, bench::USERSCRIPT)?;
    let scripted = Plan {
        db: "userscript",
        flags: [
            vec![
                "--bestEffortWindow=0".to_string(),
                format!("--userscript={}", script.display()),
            ],
            parallelism,
        ]
        .concat(),
        resolved_every: Some(args.resolved_every.max(1)),
        concurrency: args.concurrency,
        statements,
    };
    // The userscript's cost is a ratio of two runs: alternate them and keep the best of each,
    // so that a burst of other work on the machine does not decide it.
    let (mut best_consistent, mut best_scripted) = (Duration::MAX, Duration::MAX);
    for round in 0..args.repeat.max(1) {
        for plan in [&consistent, &scripted] {
            if !want(plan.db) {
                continue;
            }
            if round > 0 {
                fresh_database(&cluster, plan.db)?;
            }
            let took = through_sink(&cluster, plan, &bodies, &rows).await?;
            let best = if plan.db == consistent.db {
                &mut best_consistent
            } else {
                &mut best_scripted
            };
            *best = (*best).min(took);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (name, took) in [
        ("consistent", best_consistent),
        ("userscript", best_scripted),
    ] {
        if want(name) {
            measures.push(Measure::new(name, rows.len(), took));
        }
    }
    let dispatch = bench::bench_dispatch(args.rows.min(200_000)).await?;

    let mut summary = Summary::new(
        rows.len(),
        args.value_bytes,
        args.batch_bytes as usize,
        bodies.len(),
        &measures,
        dispatch,
    );
    summary.repeat = args.repeat.max(1);
    drop(bodies);
    if !args.quick {
        if args.drain_rows > 0 {
            summary.set_drain(drain(&cluster, &args, &consistent.flags).await?);
        }
        let mut sizes = args.scale.clone();
        if args.long {
            sizes.push(5_000_000);
        }
        sizes.retain(|n| *n > 0);
        for n in sizes {
            let first = summary.scaling.first().map(|r| r.consistent_rows_per_s);
            summary
                .scaling
                .push(scale_point(&cluster, &args, &consistent, n, first).await?);
        }
        if args.lag_rate > 0.0 {
            summary.set_lag(lag(&args).await?);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.table(&measures));
    }
    Ok(())
}

/// How one path is driven.
struct Plan {
    db: &'static str,
    flags: Vec<String>,
    /// Post a resolved timestamp after every this many requests (consistent mode).
    resolved_every: Option<usize>,
    concurrency: usize,
    /// Print the database's costliest statements after the run.
    statements: bool,
}

/// Starts a sink on the plan's database and posts every body (and, in consistent mode, the
/// resolved timestamps); the clock stops when the rows are in the target and the last window
/// is committed.
async fn through_sink(
    cluster: &Cluster,
    plan: &Plan,
    bodies: &[(Bytes, usize)],
    rows: &Rows,
) -> anyhow::Result<Duration> {
    let db = plan.db;
    let url = cluster.url(db);
    let flags: Vec<&str> = plan.flags.iter().map(String::as_str).collect();
    let argv = crate::sink::loopback_argv(&url, &flags);
    let running = crate::sink::launch(crate::sink::prepare(argv)?).await?;
    let client = Client::new(
        &format!("https://{}", running.addr),
        ClientOptions {
            insecure_skip_verify: true,
            ..Default::default()
        },
    )?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let path = format!("/{db}/public");
    let started = Instant::now();
    let group = plan.resolved_every.unwrap_or(bodies.len()).max(1);
    let mut sent_rows = 0usize;
    for chunk in bodies.chunks(group) {
        post_all(&client, &path, chunk, plan.concurrency).await?;
        sent_rows += chunk.iter().map(|(_, n)| n).sum::<usize>();
        if plan.resolved_every.is_some() {
            // Every row so far is acknowledged: the changefeed may now resolve up to the last.
            let ts = rows.times[sent_rows - 1].to_string();
            let (status, text) = client
                .post(&path, Bytes::from(format!("{{\"resolved\":\"{ts}\"}}")))
                .await?;
            if !status.is_success() {
                bail!("{db}: resolved answered {status}: {}", text.trim());
            }
        }
    }
    if plan.resolved_every.is_some() && !plan.flags.iter().any(|f| f == "--bestEffortOnly") {
        let want = rows.last_time().to_decimal();
        loop {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM _cdc_sink.checkpoints WHERE source_hlc >= $1::DECIMAL AND target_applied_at IS NOT NULL",
            )
            .bind(&want)
            .fetch_one(&pool)
            .await?;
            if done > 0 {
                break;
            }
            if started.elapsed() > Duration::from_secs(3600) {
                bail!("{db}: window not committed after an hour");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let took = started.elapsed();
    check_count(&pool, sent_rows)
        .await
        .with_context(|| format!("{db} path"))?;
    running.stop().await?;
    if plan.statements {
        print_statements(&pool, db).await?;
    }
    Ok(took)
}

/// Posts `bodies` to `path`, `concurrency` at a time, failing on any answer but success.
async fn post_all(
    client: &Client,
    path: &str,
    bodies: &[(Bytes, usize)],
    concurrency: usize,
) -> anyhow::Result<()> {
    let mut results = futures::stream::iter(bodies.iter().map(|(b, _)| b.clone()))
        .map(|body| async move { client.post(path, body).await })
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        let (status, text) = r?;
        if !status.is_success() {
            bail!("{path}: sink answered {status}: {}", text.trim());
        }
    }
    Ok(())
}

/// The backlog a sink finds after an outage: `--drain-rows` rows staged with no resolved
/// timestamp (written at `--lag-rate` rows per second of source time), then one resolved
/// timestamp covering them all. The sink is a child process so that its memory is its own;
/// the clock runs from the resolved timestamp's acknowledgement to the last checkpoint commit.
async fn drain(
    cluster: &Cluster,
    args: &BenchArgs,
    flags: &[String],
) -> anyhow::Result<bench::Drain> {
    let db = "drain";
    fresh_database(cluster, db)?;
    let per_second = if args.lag_rate > 0.0 {
        args.lag_rate
    } else {
        2000.0
    };
    let rows = Rows::generate_at(args.drain_rows, args.value_bytes, per_second);
    let baseline = baseline_at(cluster, &rows).await?;
    let bodies = rows.webhook_bodies(args.batch_bytes as usize);

    let dir = std::env::temp_dir().join(format!("cdc-sink-bench-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let children = crate::demo::Children::new(&dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = cluster.url(db);
    let mut argv: Vec<String> = crate::sink::loopback_argv(&url, &[])
        .into_iter()
        .skip(1)
        .map(|a| {
            if a == "127.0.0.1:0" {
                format!("127.0.0.1:{port}")
            } else {
                a
            }
        })
        .collect();
    argv.extend(flags.iter().cloned());
    let pid = children.spawn("sink", &std::env::current_exe()?, &argv)?;
    let client = Client::new(
        &format!("https://127.0.0.1:{port}"),
        ClientOptions {
            insecure_skip_verify: true,
            ..Default::default()
        },
    )?;
    let started = Instant::now();
    loop {
        if let Ok((status, _)) = client.get("/_/healthz").await {
            if status.is_success() {
                break;
            }
        }
        if let Some(how) = children.exited("sink") {
            bail!(
                "the drain's sink exited ({how}): {}",
                children.log_tail("sink")
            );
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the drain's sink did not answer within 60s: {}",
                children.log_tail("sink")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let path = format!("/{db}/public");
    post_all(&client, &path, &bodies, args.concurrency).await?;
    drop(bodies);

    let pool = sqlx::PgPool::connect(&url).await?;
    let last = rows.last_time();
    let (status, text) = client
        .post(&path, Bytes::from(format!("{{\"resolved\":\"{last}\"}}")))
        .await?;
    if !status.is_success() {
        bail!("{db}: resolved answered {status}: {}", text.trim());
    }
    let started = Instant::now();
    let (mut samples, mut peak_rss, mut next_sample) = (Vec::new(), 0.0f64, Duration::ZERO);
    let took = loop {
        let committed: Option<(i64, i32)> = sqlx::query_as(
            "SELECT floor(h)::INT8, ((h - floor(h)) * 10000000000)::INT4 FROM \
(SELECT max(source_hlc) AS h FROM _cdc_sink.checkpoints WHERE target_applied_at IS NOT NULL) AS c \
WHERE h IS NOT NULL",
        )
        .fetch_optional(&pool)
        .await?;
        let committed = committed.map_or(Hlc::ZERO, |(n, l)| Hlc::new(n, l));
        let rss = rss_mib(pid, "VmRSS").unwrap_or(0.0);
        peak_rss = peak_rss.max(rss);
        let elapsed = started.elapsed();
        let done = committed >= last;
        if elapsed >= next_sample || done {
            samples.push(bench::DrainSample {
                seconds: elapsed.as_secs_f64(),
                remaining_rows: rows.after(committed),
                lag_seconds: if done {
                    0.0
                } else {
                    (last.nanos() - committed.nanos().max(rows.times[0].nanos())) as f64 / 1e9
                },
                rss_mib: rss,
            });
            next_sample += Duration::from_secs(1);
        }
        if done {
            break elapsed;
        }
        if let Some(how) = children.exited("sink") {
            bail!(
                "the drain's sink exited ({how}): {}",
                children.log_tail("sink")
            );
        }
        if elapsed > Duration::from_secs(3600) {
            bail!("{db}: backlog not drained after an hour");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hwm = rss_mib(pid, "VmHWM").unwrap_or(0.0);
    check_count(&pool, rows.len()).await.context("drain")?;
    children.stop_all(Duration::from_secs(30)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let rows_per_s = rows.len() as f64 / took.as_secs_f64().max(1e-9);
    Ok(bench::Drain {
        rows: rows.len(),
        span_seconds: (last.nanos() - rows.times.first().map_or(0, |t| t.nanos())) as f64 / 1e9,
        seconds: took.as_secs_f64(),
        rows_per_s,
        baseline_rows_per_s: baseline,
        ratio: rows_per_s / baseline.max(1e-9),
        peak_rss_mib: peak_rss,
        hwm_rss_mib: hwm,
        samples,
    })
}

/// The baseline's rows per second for `rows`, in a fresh database of its own: the reference a
/// measurement at another size than `--rows` is divided by.
async fn baseline_at(cluster: &Cluster, rows: &Rows) -> anyhow::Result<f64> {
    fresh_database(cluster, "sized_baseline")?;
    let pool = sqlx::PgPool::connect(&cluster.url("sized_baseline")).await?;
    let took = bench::baseline(&pool, rows).await?;
    check_count(&pool, rows.len()).await?;
    pool.close().await;
    Ok(Measure::new("baseline", rows.len(), took).rows_per_s)
}

/// A `/proc/PID/status` memory line (`VmRSS`, `VmHWM`) in MiB.
fn rss_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// One point of the scaling curve: the baseline and the consistent path at `n` rows, with
/// the staging and target tables' sizes and dead tuples after the run.
async fn scale_point(
    cluster: &Cluster,
    args: &BenchArgs,
    consistent: &Plan,
    n: usize,
    first: Option<f64>,
) -> anyhow::Result<bench::ScaleRow> {
    let rows = Rows::generate(n, args.value_bytes);
    let baseline = baseline_at(cluster, &rows).await?;

    let bodies = rows.webhook_bodies(args.batch_bytes as usize);
    fresh_database(cluster, "scale")?;
    let plan = Plan {
        db: "scale",
        flags: consistent.flags.clone(),
        resolved_every: consistent.resolved_every,
        concurrency: consistent.concurrency,
        statements: consistent.statements,
    };
    let took = through_sink(cluster, &plan, &bodies, &rows).await?;
    let consistent_rows_per_s = rows.len() as f64 / took.as_secs_f64().max(1e-9);
    let pool = sqlx::PgPool::connect(&cluster.url("scale")).await?;
    // A backend hands its table statistics over as it exits: wait for the sink's to be gone.
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_secs(10) {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&pool)
        .await?;
        if others == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let staging: Vec<String> =
        sqlx::query_scalar("SELECT staging_name FROM _cdc_sink.staging_tables")
            .fetch_all(&pool)
            .await?;
    let mut staging_stats = bench::TableStats::default();
    for name in staging {
        let t = bench::table_stats(
            &pool,
            &format!("_cdc_sink.{}", crate::ident::Ident::new(&name).quoted()),
        )
        .await?;
        staging_stats.bytes += t.bytes;
        staging_stats.live_tuples += t.live_tuples;
        staging_stats.dead_tuples += t.dead_tuples;
        staging_stats.autovacuums += t.autovacuums;
    }
    let target = bench::table_stats(&pool, "public.kv").await?;
    pool.close().await;
    Ok(bench::ScaleRow {
        rows: n,
        baseline_rows_per_s: baseline,
        consistent_rows_per_s,
        ratio: consistent_rows_per_s / baseline.max(1e-9),
        relative: consistent_rows_per_s / first.unwrap_or(consistent_rows_per_s).max(1e-9),
        staging: staging_stats,
        target,
    })
}

/// Runs `cdc-sink demo` (this binary) at `--lag-rate` writes per second per side for
/// `--lag-duration` and reads the replication lag from its summary.
async fn lag(args: &BenchArgs) -> anyhow::Result<bench::Lag> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "demo".to_string(),
            "--rate".to_string(),
            args.lag_rate.to_string(),
            "--duration".to_string(),
            format!("{}ms", args.lag_duration.as_millis()),
            "--json".to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running cdc-sink demo")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().rev().find(|l| l.starts_with('{')) else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
        bail!(
            "cdc-sink demo printed no summary ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    };
    let v: serde_json::Value = serde_json::from_str(line).context("reading the demo's summary")?;
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    Ok(bench::Lag {
        rate_per_side: args.lag_rate,
        rows_per_s: num("rows_per_second"),
        seconds: args.lag_duration.as_secs_f64(),
        p50_seconds: num("lag_p50_seconds"),
        p99_seconds: num("lag_p99_seconds"),
        converged: v
            .get("converged")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    })
}

/// The ten statements of `db` that took the most database time, and their share of it.
async fn print_statements(pool: &sqlx::PgPool, db: &str) -> anyhow::Result<()> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await?;
    let rows: Vec<(f64, i64, i64, String)> = sqlx::query_as(
        "SELECT s.total_exec_time, s.calls, s.rows, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 110) \
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 \
ORDER BY s.total_exec_time DESC LIMIT 10",
    )
    .bind(db)
    .fetch_all(pool)
    .await?;
    let total: f64 = sqlx::query_scalar(
        "SELECT coalesce(sum(s.total_exec_time), 0)::FLOAT8 FROM pg_stat_statements s \
JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
    )
    .bind(db)
    .fetch_one(pool)
    .await?;
    eprintln!("{db}: {total:.0} ms of statement time");
    for (ms, calls, rows, q) in rows {
        eprintln!(
            "  {:>8.0} ms {:>5.1} % {:>7} calls {:>9} rows  {q}",
            ms,
            100.0 * ms / total.max(1e-9),
            calls,
            rows
        );
    }
    Ok(())
}

/// Drops and recreates a path's database, for another run of it.
fn fresh_database(cluster: &Cluster, db: &str) -> anyhow::Result<()> {
    cluster.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
    )?;
    cluster.psql("postgres", &format!("CREATE DATABASE {db}"))?;
    cluster.psql(db, bench::KV_DDL)?;
    Ok(())
}

async fn check_count(pool: &sqlx::PgPool, want: usize) -> anyhow::Result<()> {
    let got: i64 = sqlx::query_scalar("SELECT count(*) FROM public.kv")
        .fetch_one(pool)
        .await?;
    if got as usize != want {
        bail!("expected {want} rows in the target, found {got}");
    }
    Ok(())
}
