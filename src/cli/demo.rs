//! `cdc-sink demo`: the whole active-active loop on this machine. Two throwaway PostgreSQL
//! clusters (east, west), a sink in front of each running the active-active userscript, a
//! changefeed emulator from each into the other's sink, and conflicting kv workloads on both;
//! then it waits for the two sides to agree and prints a summary.

use crate::cluster::Cluster;
use crate::demo::{self, Summary, REGIONS, SCRIPTS};
use crate::feed::{Feed, FeedArgs};
use crate::verify::{self, CompareOptions, TableRef};
use crate::workload::kv::{self as kv, KvArgs};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the workloads write.
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Writes per second on each side.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Workload connections per side.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Bytes per value.
    #[arg(long = "value-bytes", default_value_t = 16)]
    pub value_bytes: usize,
    /// Start the west workload at this key (0: both sides write the same keys and conflict).
    #[arg(long = "west-start", default_value_t = 0)]
    pub west_start: i64,
    /// Feed fault injection: probability of re-sending an earlier batch.
    #[arg(long, default_value_t = 0.0)]
    pub chaos: f64,
    /// Give up waiting for the two sides to agree after this long.
    #[arg(long = "converge-timeout", default_value = "2m", value_parser = crate::config::parse_duration)]
    pub converge_timeout: Duration,
    /// Print the summary as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Keep everything running after the summary, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Run the sinks open: no keys, no tokens.
    #[arg(long)]
    pub insecure: bool,
}

/// One region: its cluster and its sink.
struct Region {
    name: &'static str,
    cluster: Cluster,
    sink: super::Running,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    let scripts = write_scripts()?;
    say(format!(
        "starting two postgresql clusters (east, west); scripts in {}",
        scripts.display()
    ));
    let (east, west) = tokio::try_join!(
        tokio::task::spawn_blocking(Cluster::start),
        tokio::task::spawn_blocking(Cluster::start)
    )?;
    let clusters = [east?, west?];
    for (cluster, region) in clusters.iter().zip(REGIONS) {
        cluster.psql("postgres", "CREATE DATABASE kv")?;
        cluster.psql("kv", &demo::schema_sql(region))?;
    }
    let mut regions = Vec::new();
    // One key per sink, installed before it starts; the feeds into it carry its token.
    let mut tokens = Vec::new();
    if args.insecure {
        say("sinks run open (--insecure)".to_string());
    } else {
        for cluster in &clusters {
            tokens.push(install_key(cluster).await.context("installing a jwt key")?);
        }
        say("sinks require tokens: a key per sink, a token per feed".to_string());
    }
    for (cluster, name) in clusters.into_iter().zip(REGIONS) {
        let script = scripts.join(demo::script_for(name));
        let sink = launch_sink(&cluster, &script, args.keep, args.insecure)
            .await
            .with_context(|| format!("{name} sink"))?;
        say(format!(
            "{name}: postgresql on port {}, sink on https://{}",
            cluster.port(),
            sink.addr
        ));
        regions.push(Region {
            name,
            cluster,
            sink,
        });
    }

    // Each region's changes go to the other region's sink.
    let cancel = CancellationToken::new();
    let mut feeds = Vec::new();
    let mut feed_stats = Vec::new();
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let mut fa = FeedArgs::new(
            &regions[from].cluster.url("kv"),
            &["kv.public.kv"],
            &format!("https://{}/kv/public", regions[to].sink.addr),
        );
        fa.insecure_skip_verify = true;
        fa.diff = true;
        fa.chaos = args.chaos;
        fa.slot = "cdc_sink_demo".into();
        fa.auth_header = tokens.get(to).cloned();
        let feed = Feed::new(fa)?;
        feed_stats.push(feed.stats());
        let token = cancel.child_token();
        let name = format!("{}→{}", regions[from].name, regions[to].name);
        feeds.push(tokio::spawn(async move {
            if let Err(e) = feed.run(token).await {
                tracing::error!(feed = %name, error = %e, "feed stopped");
            }
        }));
    }
    for r in &regions {
        wait_for_slot(&r.cluster).await?;
    }
    say(format!(
        "feeds running; workloads write {:.0} rows/s on each side for {:?} ({})",
        args.rate,
        args.duration,
        if args.west_start == 0 {
            "same keys: conflicts"
        } else {
            "disjoint keys"
        }
    ));

    let pools = [
        verify::connect(&regions[0].cluster.url("kv"), None, "east").await?,
        verify::connect(&regions[1].cluster.url("kv"), None, "west").await?,
    ];
    let lags = Arc::new(Mutex::new(Vec::<f64>::new()));
    let sampler = spawn_lag_sampler(pools.clone(), lags.clone(), cancel.child_token());

    let started = Instant::now();
    let workload = |url: String, start: i64| {
        let mut k = KvArgs::new(&url);
        k.duration = args.duration;
        k.max_rate = args.rate;
        k.sequential = true;
        k.write_seq = start;
        k.value_bytes = args.value_bytes;
        k.concurrency = args.concurrency;
        k
    };
    let (ea, wa) = (
        workload(regions[0].cluster.url("kv"), 0),
        workload(regions[1].cluster.url("kv"), args.west_start),
    );
    let quiet = args.json;
    let progress = |side: &'static str| {
        move |p: &kv::Progress| {
            if !quiet && side == "east" {
                eprintln!(
                    "  {:>4.0}s  writing {:>5.0} rows/s per side",
                    p.elapsed.as_secs_f64(),
                    p.ops_per_sec
                );
            }
        }
    };
    let (es, ws) = tokio::try_join!(
        kv::run_with_progress(&ea, cancel.child_token(), progress("east")),
        kv::run_with_progress(&wa, cancel.child_token(), progress("west"))
    )?;
    let wrote = started.elapsed();
    say("workloads done; waiting for east and west to agree".to_string());

    let converging = Instant::now();
    let table = TableRef::parse("public.kv")?;
    let outcome = verify::watch(
        &pools[0],
        &pools[1],
        &table,
        &CompareOptions {
            ignore_columns: Vec::new(),
            sample: 5,
        },
        Duration::from_secs(1),
        3,
        args.converge_timeout,
        cancel.child_token(),
        |r, clean| {
            if !quiet {
                eprintln!(
                    "  east {} rows, west {} rows, {} divergent, {} clean checks in a row",
                    r.source_rows,
                    r.target_rows,
                    r.divergent(),
                    clean
                );
            }
        },
    )
    .await?;
    let converge_secs = converging.elapsed().as_secs_f64();
    sampler.abort();

    let count = |pool: &sqlx::PgPool, sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let lags = lags.lock().expect("poisoned").clone();
    let last = outcome.last.as_ref();
    let summary = Summary {
        east_rows: count(&pools[0], "SELECT count(*) FROM public.kv").await?,
        west_rows: count(&pools[1], "SELECT count(*) FROM public.kv").await?,
        divergent_rows: last.map(|r| r.divergent()).unwrap_or(0),
        dlq_rows_east: count(&pools[0], "SELECT count(*) FROM public.cdc_sink_dlq").await?,
        dlq_rows_west: count(&pools[1], "SELECT count(*) FROM public.cdc_sink_dlq").await?,
        east_writes: es.ops,
        west_writes: ws.ops,
        rows_per_second: (es.ops + ws.ops) as f64 / wrote.as_secs_f64().max(1e-9),
        lag_p50_seconds: demo::percentile(&lags, 50.0),
        lag_p99_seconds: demo::percentile(&lags, 99.0),
        converged: outcome.in_sync,
        seconds_to_converge: converge_secs,
        token_requests: token_requests(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.text());
        for (kind, key) in last.map(|r| r.samples.clone()).unwrap_or_default() {
            println!("  divergent key {key} ({kind:?})");
        }
    }

    if args.keep {
        for r in &regions {
            if let Some(m) = r.sink.metrics_addr {
                eprintln!("{} sink metrics: http://{m}/_/varz", r.name);
            }
            eprintln!("{} database: {}", r.name, r.cluster.url("kv"));
        }
        eprintln!("running until Ctrl-C");
        super::start::shutdown_signal().await;
    }
    cancel.cancel();
    for f in feeds {
        let _ = f.await;
    }
    for r in regions {
        r.sink.stop().await?;
    }
    let _ = std::fs::remove_dir_all(&scripts);
    if !summary.converged {
        bail!(
            "east and west did not converge within {:?}",
            args.converge_timeout
        );
    }
    Ok(())
}

fn write_scripts() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("cdc-sink-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, text) in SCRIPTS {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(dir)
}

/// Creates the key tables of the cluster's staging schema, installs a new P-256 key and returns
/// the `Authorization` value of a token for `kv.public` signed by it.
async fn install_key(cluster: &Cluster) -> anyhow::Result<String> {
    use crate::auth::keys::Tables;
    use crate::target::Dialect;
    let settings = crate::target::PoolSettings {
        max_connections: 2,
        max_lifetime: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        idle_in_transaction: Duration::from_secs(30),
    };
    let db = crate::target::open(&cluster.url("kv"), "staging", &settings).await?;
    let staging = crate::stage::StagingSchema::parse(STAGING, Dialect::Postgres, "kv")
        .map_err(anyhow::Error::msg)?;
    let mut ddl = vec![format!("CREATE SCHEMA IF NOT EXISTS {}", staging.quoted())];
    ddl.extend(Tables::new(&staging).ddl(db.dialect));
    crate::target::run_ddl(&db, &ddl).await?;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    sqlx::raw_sql(&super::make_jwt::install_sql(
        STAGING,
        &pair.public_key_pem(),
    )?)
    .execute(&db.pool)
    .await?;
    db.pool.close().await;
    let token = super::make_jwt::token(
        pair.serialize_pem().as_bytes(),
        &["kv.public".to_string()],
        None,
    )?;
    Ok(format!("Bearer {token}"))
}

const STAGING: &str = "_cdc_sink";

/// Requests accepted on a verified token so far, from this process's metrics.
fn token_requests() -> u64 {
    crate::metrics::render()
        .lines()
        .filter(|l| l.starts_with(crate::metrics::AUTH_REQUESTS) && l.contains("reason=\"token\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn launch_sink(
    cluster: &Cluster,
    script: &std::path::Path,
    metrics: bool,
    insecure: bool,
) -> anyhow::Result<super::Running> {
    let url = cluster.url("kv");
    let script = script.display().to_string();
    let mut extra = vec!["--userscript", &script];
    if !insecure {
        extra.push("--disableAuthentication=false");
    }
    if metrics {
        extra.extend_from_slice(&["--metricsAddr", "127.0.0.1:0"]);
    }
    let argv = super::loopback_argv(&url, &extra);
    super::launch(super::prepare(argv)?).await
}

/// The feed creates its replication slot when it starts; writes before that would be missed.
async fn wait_for_slot(cluster: &Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = cluster.psql("kv", "SELECT count(*) FROM pg_replication_slots")?;
        if n.trim() != "0" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the feed did not create its replication slot within 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples, twice a second, how far each target's committed checkpoint is behind now.
fn spawn_lag_sampler(
    pools: [sqlx::PgPool; 2],
    lags: Arc<Mutex<Vec<f64>>>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let sql =
            "SELECT extract(epoch FROM clock_timestamp())::FLOAT8 - max(source_hlc)::FLOAT8 / 1e9 \
FROM _cdc_sink.checkpoints WHERE group_name = 'kv.public' AND target_applied_at IS NOT NULL";
        while !cancel.is_cancelled() {
            for pool in &pools {
                if let Ok(Some(lag)) = sqlx::query_scalar::<_, Option<f64>>(sql)
                    .fetch_one(pool)
                    .await
                {
                    lags.lock().expect("poisoned").push(lag.max(0.0));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
