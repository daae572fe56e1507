//! `cdc-sink bench`: one throwaway PostgreSQL (fsync on), the same rows written by a raw sqlx
//! baseline and by our immediate and consistent paths over HTTP/2 + TLS, and the ratios.

use crate::bench::{self, Measure, Rows, Summary};
use crate::cluster::{Cluster, ClusterOptions};
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
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The userscript of the `userscript` path: the active-active logic on the bench's table.
const BENCH_SCRIPT: &str = r#"import * as api from "cdc-sink@v1";
api.configureSource("userscript.public", {
  dispatch: (doc, meta) => {
    const ret = {};
    if (doc._source !== "bench") { ret[meta.table] = [doc]; }
    return ret;
  },
  deletesTo: "",
});
api.configureTable("kv", { cas: ["ts"], merge: api.standardMerge(() => ({ dlq: "kv" })) });
"#;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start_with(ClusterOptions {
            fsync: true,
            settings: Vec::new(),
        })
    })
    .await??;
    for db in ["baseline", "immediate", "consistent", "userscript"] {
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
    };
    let took = through_sink(&cluster, &immediate, &bodies, &rows).await?;
    measures.push(Measure::new("immediate", rows.len(), took));

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
    };
    // The consistent path again with the active-active userscript's logic on: dispatch with a
    // `_source` filter before staging, compare-and-set on the version, standard merge.
    let dir = std::env::temp_dir().join(format!("cdc-sink-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("bench.ts");
    std::fs::write(&script, BENCH_SCRIPT)?;
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
    };
    // The userscript's cost is a ratio of two runs: alternate them and keep the best of each,
    // so that a burst of other work on the machine does not decide it.
    let (mut best_consistent, mut best_scripted) = (Duration::MAX, Duration::MAX);
    for round in 0..args.repeat.max(1) {
        for plan in [&consistent, &scripted] {
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
    measures.push(Measure::new("consistent", rows.len(), best_consistent));
    measures.push(Measure::new("userscript", rows.len(), best_scripted));
    let dispatch = crate::script::bench_dispatch(args.rows.min(200_000)).await?;

    let mut summary = Summary::new(
        rows.len(),
        args.value_bytes,
        args.batch_bytes as usize,
        bodies.len(),
        &measures,
        dispatch,
    );
    summary.repeat = args.repeat.max(1);
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
        let mut results = futures::stream::iter(chunk.iter().map(|(b, _)| b.clone()))
            .map(|body| {
                let client = client.clone();
                let path = path.clone();
                async move { client.post(&path, body).await }
            })
            .buffer_unordered(plan.concurrency.max(1));
        while let Some(r) = results.next().await {
            let (status, text) = r?;
            if !status.is_success() {
                bail!("{db}: sink answered {status}: {}", text.trim());
            }
        }
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
    if plan.resolved_every.is_some() {
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
    Ok(took)
}

/// Drops and recreates a path's database, for another run of it.
fn fresh_database(cluster: &Cluster, db: &str) -> anyhow::Result<()> {
    cluster.psql("postgres", &format!("DROP DATABASE {db} WITH (FORCE)"))?;
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
