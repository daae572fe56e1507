//! `cdc-sink demo`: the whole active-active loop on this machine. Two throwaway PostgreSQL
//! clusters (east, west), sinks in front of each running the active-active userscript (one,
//! or several behind an HAProxy), a changefeed emulator from each into the other's sinks, and
//! conflicting kv workloads on both; then it waits for the two sides to agree and prints a
//! summary. The sinks, balancers and Prometheus are child processes, stopped on every exit.

use crate::cluster::Cluster;
use crate::demo::balancer::{self, Balancer};
use crate::demo::monitor::{self, ScrapeTarget, TargetHealth};
use crate::demo::{self, Children, DemoError, Killed, Summary, REGIONS, SCRIPTS};
use crate::feed::{Feed, FeedArgs, FeedStats};
use crate::server::client::{Client, ClientOptions};
use crate::verify::{self, CompareOptions, TableRef};
use crate::workload::kv::{self as kv, KvArgs};
use anyhow::{anyhow, bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the workloads write.
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub(crate) duration: Duration,
    /// Writes per second on each side.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) rate: f64,
    /// Workload connections per side.
    #[arg(long, default_value_t = 4)]
    pub(crate) concurrency: usize,
    /// Bytes per value.
    #[arg(long = "value-bytes", default_value_t = 16)]
    pub(crate) value_bytes: usize,
    /// Start the west workload at this key (0: both sides write the same keys and conflict).
    #[arg(long = "west-start", default_value_t = 0)]
    pub(crate) west_start: i64,
    /// Feed fault injection: probability of re-sending an earlier batch.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) chaos: f64,
    /// Give up waiting for the two sides to agree after this long.
    #[arg(long = "converge-timeout", default_value = "2m", value_parser = crate::config::parse_duration)]
    pub(crate) converge_timeout: Duration,
    /// Print the summary as one JSON line.
    #[arg(long)]
    pub(crate) json: bool,
    /// Keep everything running after the summary, until Ctrl-C.
    #[arg(long)]
    pub(crate) keep: bool,
    /// Run the sinks open: no keys, no tokens.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Sink instances per direction, sharing that direction's target database (they agree
    /// through its leases); above 1 they sit behind an HAProxy, which must be installed.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) sinks: u16,
    /// Run a Prometheus (which must be installed) scraping every sink and balancer, and print
    /// its URL.
    #[arg(long)]
    pub(crate) monitor: bool,
    /// Kill one sink of each direction with SIGKILL a third of the way into the workloads
    /// (needs --sinks 2 or more); the others take over.
    #[arg(long = "kill-one")]
    pub(crate) kill_one: bool,
}

/// One sink process.
struct SinkProc {
    name: String,
    addr: SocketAddr,
    metrics: SocketAddr,
}

/// One region: its cluster, its sinks and, with several sinks, their balancer.
struct Region {
    name: &'static str,
    cluster: Cluster,
    sinks: Vec<SinkProc>,
    balancer: Option<BalancerProc>,
}

struct BalancerProc {
    name: String,
    listen: SocketAddr,
    monitor: SocketAddr,
}

impl Region {
    /// Where the other region's feed posts: the balancer, or the one sink.
    fn entry(&self) -> SocketAddr {
        self.balancer
            .as_ref()
            .map(|b| b.listen)
            .unwrap_or(self.sinks[0].addr)
    }
}

/// The programs the options need, found before anything starts.
struct Programs {
    haproxy: Option<PathBuf>,
    prometheus: Option<PathBuf>,
}

impl Programs {
    fn find(args: &DemoArgs) -> anyhow::Result<Programs> {
        if args.kill_one && args.sinks < 2 {
            bail!("--kill-one needs --sinks 2 or more: with one sink per direction none would be left to take over");
        }
        let need = |wanted: bool, program: &'static str, hint: &'static str| {
            if !wanted {
                return Ok(None);
            }
            demo::on_path(program)
                .map(Some)
                .ok_or(DemoError::NotInstalled { program, hint })
        };
        Ok(Programs {
            haproxy: need(args.sinks > 1, "haproxy", demo::HAPROXY_HINT)?,
            prometheus: need(args.monitor, "prometheus", demo::PROMETHEUS_HINT)?,
        })
    }
}

/// What is left running after the summary: the clusters, feeds and URLs for `--keep`.
struct Live {
    regions: Vec<Region>,
    feeds: Vec<tokio::task::JoinHandle<()>>,
    summary: Summary,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let programs = Programs::find(&args)?;
    let dir = std::env::temp_dir().join(format!("cdc-sink-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let children = Children::new(&dir);
    let cancel = CancellationToken::new();
    // Ctrl-C or SIGTERM while it runs: everything below is dropped, the children stopped.
    let outcome = tokio::select! {
        r = demo(&args, &programs, &dir, &children, &cancel) => r,
        _ = crate::sink::shutdown_signal() => Err(anyhow!("interrupted")),
    };
    let live = match outcome {
        Ok(live) => live,
        Err(e) => {
            cancel.cancel();
            children.stop_all(Duration::from_secs(10)).await;
            eprintln!(
                "logs of the sinks and balancers are kept in {}",
                dir.display()
            );
            return Err(e);
        }
    };
    if args.keep {
        print_urls(&live, &children, &dir);
        eprintln!("running until Ctrl-C");
        crate::sink::shutdown_signal().await;
    }
    cancel.cancel();
    for f in live.feeds {
        let _ = f.await;
    }
    children.stop_all(Duration::from_secs(10)).await;
    drop(live.regions);
    let _ = std::fs::remove_dir_all(&dir);
    if !live.summary.converged {
        bail!(
            "east and west did not converge within {:?}",
            args.converge_timeout
        );
    }
    Ok(())
}

fn print_urls(live: &Live, children: &Children, dir: &Path) {
    for r in &live.regions {
        eprintln!("{} database: {}", r.name, r.cluster.url("kv"));
        for s in &r.sinks {
            if children.pid(&s.name).is_none() {
                eprintln!("{} sink {}: killed", r.name, s.name);
                continue;
            }
            eprintln!(
                "{} sink {}: https://{} metrics http://{}/_/varz",
                r.name, s.name, s.addr, s.metrics
            );
        }
        if let Some(b) = &r.balancer {
            eprintln!(
                "{} balancer {}: https://{} stats http://{}/stats metrics http://{}/metrics",
                r.name, b.name, b.listen, b.monitor, b.monitor
            );
        }
    }
    if let Some(url) = &live.summary.prometheus_url {
        eprintln!("prometheus: {url}");
    }
    eprintln!("logs: {}", dir.display());
}

async fn demo(
    args: &DemoArgs,
    programs: &Programs,
    dir: &Path,
    children: &Children,
    cancel: &CancellationToken,
) -> anyhow::Result<Live> {
    let say = |line: String| {
        if !args.json {
            eprintln!("{line}");
        }
    };
    let scripts = write_scripts(dir)?;
    say(format!(
        "starting two postgresql clusters (east, west); scripts and logs in {}",
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
    // One key per direction, installed in its staging schema before its sinks start: every
    // sink of the direction reads it there, so the feed's one token works through a balancer.
    let mut tokens = Vec::new();
    if args.insecure {
        say("sinks run open (--insecure)".to_string());
    } else {
        for cluster in &clusters {
            tokens.push(install_key(cluster).await.context("installing a jwt key")?);
        }
        say("sinks require tokens: a key per target, a token per feed".to_string());
    }
    let mut regions = Vec::new();
    for (cluster, name) in clusters.into_iter().zip(REGIONS) {
        let script = scripts.join(demo::script_for(name));
        let names: Vec<String> = (1..=args.sinks)
            .map(|i| format!("{name}_sink_{i}"))
            .collect();
        let started = futures::future::join_all(names.iter().map(|n| {
            with_fresh_ports(children, n, || async {
                let sink = spawn_sink(children, n, &cluster, &script, args.insecure)?;
                sink_ready(children, &sink).await?;
                Ok(sink)
            })
        }))
        .await;
        let sinks = started.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let balancer = match &programs.haproxy {
            Some(haproxy) => Some(
                with_fresh_ports(children, &format!("{name}_lb"), || {
                    start_balancer(children, haproxy, dir, name, &sinks)
                })
                .await?,
            ),
            None => None,
        };
        let mut line = format!("{name}: postgresql on port {}", cluster.port());
        for s in &sinks {
            line += &format!(", {} on https://{}", s.name, s.addr);
        }
        if let Some(b) = &balancer {
            line += &format!(", haproxy on https://{}", b.listen);
        }
        say(line);
        regions.push(Region {
            name,
            cluster,
            sinks,
            balancer,
        });
    }
    let prometheus_url = match &programs.prometheus {
        Some(p) => {
            let url = with_fresh_ports(children, "prometheus", || {
                start_prometheus(children, p, dir, &regions)
            })
            .await?;
            say(format!("prometheus on {url}"));
            Some(url)
        }
        None => None,
    };

    // Each region's changes go to the other region's sinks.
    let mut feeds = Vec::new();
    let mut feed_stats: Vec<Arc<FeedStats>> = Vec::new();
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let mut fa = FeedArgs::new(
            &regions[from].cluster.url("kv"),
            &["kv.public.kv"],
            &format!("https://{}/kv/public", regions[to].entry()),
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
                tracing::error!(feed = %name, error = %crate::error::ErrorChain(&e), "feed stopped");
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
    let killed = Arc::new(Mutex::new(Vec::<Killed>::new()));
    let killer = args.kill_one.then(|| {
        let victims: Vec<(String, Vec<String>)> = regions
            .iter()
            .map(|r| {
                (
                    r.name.to_string(),
                    r.sinks.iter().map(|s| s.name.clone()).collect(),
                )
            })
            .collect();
        kill_one_each(
            children,
            victims,
            pools.clone(),
            args.duration / 3,
            started,
            killed.clone(),
            args.json,
        )
    });
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
    let writes = async {
        tokio::try_join!(
            kv::run_with_progress(&ea, cancel.child_token(), progress("east")),
            kv::run_with_progress(&wa, cancel.child_token(), progress("west"))
        )
    };
    // The killer runs alongside the workloads and, watching for the takeover, a while after.
    let killer = async {
        if let Some(k) = killer {
            k.await;
        }
    };
    let main = async {
        let (es, ws) = writes.await?;
        let wrote = started.elapsed();
        say("workloads done; waiting for east and west to agree".to_string());
        let converging = Instant::now();
        let outcome = watch_convergence(&pools, args, cancel).await?;
        Ok::<_, anyhow::Error>((es, ws, wrote, outcome, converging.elapsed()))
    };
    let (done, ()) = tokio::join!(main, killer);
    let (es, ws, wrote, outcome, converge_took) = done?;
    sampler.abort();

    let count = |pool: &sqlx::PgPool, sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let prometheus_targets = match &prometheus_url {
        Some(url) => prometheus_targets(url).await,
        None => Vec::new(),
    };
    let mut balancer_servers = Vec::new();
    for b in regions.iter().filter_map(|r| r.balancer.as_ref()) {
        balancer_servers.extend(balancer_stats(b).await);
    }
    let live_sinks: Vec<SocketAddr> = regions
        .iter()
        .flat_map(|r| r.sinks.iter())
        .filter(|s| children.pid(&s.name).is_some())
        .map(|s| s.metrics)
        .collect();
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
        seconds_to_converge: converge_took.as_secs_f64(),
        token_requests: token_requests(&live_sinks).await,
        sinks_per_direction: args.sinks as usize,
        feed_retries: feed_stats
            .iter()
            .map(|s| s.retries.load(Ordering::Relaxed))
            .sum(),
        feed_batches: feed_stats
            .iter()
            .map(|s| s.batches.load(Ordering::Relaxed))
            .sum(),
        killed: killed.lock().expect("poisoned").clone(),
        prometheus_url,
        prometheus_targets,
        balancer_servers,
        processes: children.pids(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.text());
        for (kind, key) in last.map(|r| r.samples.clone()).unwrap_or_default() {
            println!("  divergent key {key} ({kind:?})");
        }
    }
    Ok(Live {
        regions,
        feeds,
        summary,
    })
}

async fn watch_convergence(
    pools: &[sqlx::PgPool; 2],
    args: &DemoArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<verify::WatchOutcome> {
    let table = TableRef::parse("public.kv")?;
    let quiet = args.json;
    Ok(verify::watch(
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
    .await?)
}

fn write_scripts(dir: &Path) -> anyhow::Result<PathBuf> {
    for (name, text) in SCRIPTS {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(dir.to_path_buf())
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

/// A port free on the loopback interface now (the child that binds it comes a moment later).
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// A plain HTTP/1.1 client for a metrics listener or Prometheus.
fn http_client(addr: &str) -> anyhow::Result<Client> {
    Ok(Client::new(
        &format!("http://{addr}"),
        ClientOptions {
            http2: false,
            ..Default::default()
        },
    )?)
}

/// Runs `start`, which starts child `name` on ports found free a moment before it binds them:
/// should another process take one in between, the child exits before it is ready, and is
/// started again on new ports (three attempts in all).
async fn with_fresh_ports<T, F, Fut>(children: &Children, name: &str, start: F) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut attempt = 1;
    loop {
        match start().await {
            Ok(t) => return Ok(t),
            Err(e) if attempt < 3 && children.exited(name).is_some() => {
                tracing::warn!(child = name, attempt, error = %crate::error::ErrorChain(e.as_ref()), "child exited before it was ready; starting it again");
                children.kill9(name).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Starts a sink process (this binary's `start`) on fresh loopback ports.
fn spawn_sink(
    children: &Children,
    name: &str,
    cluster: &Cluster,
    script: &Path,
    insecure: bool,
) -> anyhow::Result<SinkProc> {
    let (addr, metrics) = (free_port()?, free_port()?);
    let exe = std::env::current_exe().context("finding this program")?;
    let mut argv: Vec<String> = vec![
        "start".into(),
        "--bindAddr".into(),
        addr.to_string(),
        "--metricsAddr".into(),
        metrics.to_string(),
        "--tlsSelfSigned".into(),
        "--targetConn".into(),
        cluster.url("kv"),
        "--userscript".into(),
        script.display().to_string(),
    ];
    if insecure {
        argv.push("--disableAuthentication".into());
    }
    children.spawn(name, &exe, &argv)?;
    Ok(SinkProc {
        name: name.to_string(),
        addr,
        metrics,
    })
}

/// Waits until `what` answers `path` with 200 on `client`, failing early when child `name`
/// exits; the error carries the end of its log.
async fn ready(
    children: &Children,
    name: &str,
    client: &Client,
    path: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = children.exited(name) {
            bail!(
                "{name} exited ({status}) before it was ready; the end of its log:\n{}",
                children.log_tail(name)
            );
        }
        if let Ok(Ok((http::StatusCode::OK, _))) =
            tokio::time::timeout(Duration::from_secs(2), client.get(path)).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name} was not ready within {within:?}; the end of its log:\n{}",
                children.log_tail(name)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sink_ready(children: &Children, sink: &SinkProc) -> anyhow::Result<()> {
    let client = http_client(&sink.metrics.to_string())?;
    ready(
        children,
        &sink.name,
        &client,
        "/_/healthz",
        Duration::from_secs(60),
    )
    .await
}

/// Writes, checks (`haproxy -c`) and starts the balancer of `region`'s sinks.
async fn start_balancer(
    children: &Children,
    haproxy: &Path,
    dir: &Path,
    region: &str,
    sinks: &[SinkProc],
) -> anyhow::Result<BalancerProc> {
    let cert = dir.join(format!("{region}_lb.pem"));
    std::fs::write(&cert, balancer::certificate_pem()?)
        .map_err(|e| DemoError::Write(cert.clone(), e))?;
    let addrs: Vec<SocketAddr> = sinks.iter().map(|s| s.addr).collect();
    let b = Balancer {
        region,
        listen: free_port()?,
        monitor: free_port()?,
        cert: &cert,
        sinks: &addrs,
    };
    let config = dir.join(format!("{region}_lb.cfg"));
    std::fs::write(&config, b.config()).map_err(|e| DemoError::Write(config.clone(), e))?;
    balancer::check(haproxy, &config)?;
    let name = format!("{region}_lb");
    // -db: in the foreground, logging to its standard output.
    children.spawn(
        &name,
        haproxy,
        &["-db".into(), "-f".into(), config.display().to_string()],
    )?;
    let client = http_client(&b.monitor.to_string())?;
    ready(
        children,
        &name,
        &client,
        "/healthz",
        Duration::from_secs(20),
    )
    .await?;
    Ok(BalancerProc {
        name,
        listen: b.listen,
        monitor: b.monitor,
    })
}

/// Starts Prometheus scraping every sink and balancer; its URL once it is ready.
async fn start_prometheus(
    children: &Children,
    prometheus: &Path,
    dir: &Path,
    regions: &[Region],
) -> anyhow::Result<String> {
    let mut targets = Vec::new();
    for r in regions {
        for s in &r.sinks {
            targets.push(ScrapeTarget {
                job: "cdc-sink",
                cluster: r.name.to_string(),
                name: s.name.clone(),
                addr: s.metrics,
            });
        }
        if let Some(b) = &r.balancer {
            targets.push(ScrapeTarget {
                job: "haproxy",
                cluster: r.name.to_string(),
                name: b.name.clone(),
                addr: b.monitor,
            });
        }
    }
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, monitor::config(&targets))
        .map_err(|e| DemoError::Write(config.clone(), e))?;
    let addr = free_port()?;
    let argv = vec![
        format!("--config.file={}", config.display()),
        format!(
            "--storage.tsdb.path={}",
            dir.join("prometheus-data").display()
        ),
        format!("--web.listen-address={addr}"),
        "--log.level=warn".into(),
    ];
    children.spawn("prometheus", prometheus, &argv)?;
    let client = http_client(&addr.to_string())?;
    ready(
        children,
        "prometheus",
        &client,
        "/-/ready",
        Duration::from_secs(60),
    )
    .await?;
    Ok(format!("http://{addr}"))
}

/// The balancer's view of its sinks, from its statistics page.
async fn balancer_stats(b: &BalancerProc) -> Vec<balancer::ServerStats> {
    let Ok(client) = http_client(&b.monitor.to_string()) else {
        return Vec::new();
    };
    match tokio::time::timeout(Duration::from_secs(5), client.get("/stats;csv")).await {
        Ok(Ok((http::StatusCode::OK, text))) => balancer::parse_stats_csv(&b.name, &text),
        _ => Vec::new(),
    }
}

/// Prometheus's view of its targets once each has been scraped at least once (or after 15 s).
async fn prometheus_targets(url: &str) -> Vec<TargetHealth> {
    let Ok(client) = http_client(url.trim_start_matches("http://")) else {
        return Vec::new();
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = match client.get("/api/v1/targets").await {
            Ok((http::StatusCode::OK, body)) => monitor::parse_targets(&body),
            _ => None,
        };
        if let Some(t) = &got {
            if t.iter().all(|t| t.health != "unknown") || Instant::now() > deadline {
                return got.unwrap_or_default();
            }
        } else if Instant::now() > deadline {
            return Vec::new();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The pid in a lease's `hostname` (`host:pid`) of the direction whose staging `pool` reads.
async fn lease_holder(pool: &sqlx::PgPool) -> Option<u32> {
    let holder: Option<String> = sqlx::query_scalar(
        "SELECT hostname FROM _cdc_sink.leases WHERE expires > now() ORDER BY expires DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .ok()
    .flatten();
    holder?.rsplit(':').next()?.parse().ok()
}

/// `--kill-one`: after `after`, SIGKILL one sink of each region (the holder of its apply lease,
/// once there is one, waiting up to 5 s for it), then watch for another sink to take the lease
/// (up to 30 s).
async fn kill_one_each(
    children: &Children,
    regions: Vec<(String, Vec<String>)>,
    pools: [sqlx::PgPool; 2],
    after: Duration,
    started: Instant,
    killed: Arc<Mutex<Vec<Killed>>>,
    quiet: bool,
) {
    tokio::time::sleep(after).await;
    let mut watching = Vec::new();
    for ((region, sinks), pool) in regions.iter().zip(&pools) {
        // The lease holder is the interesting victim; wait a little for one to exist.
        let mut holder = lease_holder(pool).await;
        let wait_until = Instant::now() + Duration::from_secs(5);
        while holder.is_none() && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            holder = lease_holder(pool).await;
        }
        let victim = sinks
            .iter()
            .find(|s| holder.is_some() && children.pid(s) == holder)
            .unwrap_or(&sinks[0]);
        let held_lease = holder.is_some() && children.pid(victim) == holder;
        let Some(pid) = children.kill9(victim).await else {
            continue;
        };
        let at = started.elapsed();
        if !quiet {
            eprintln!(
                "  {:>4.0}s  killed {victim} (pid {pid}{}) with SIGKILL",
                at.as_secs_f64(),
                if held_lease { ", the lease holder" } else { "" }
            );
        }
        tracing::info!(region = %region, sink = %victim, pid, held_lease, "killed a sink");
        killed.lock().expect("poisoned").push(Killed {
            sink: victim.clone(),
            pid,
            at_seconds: at.as_secs_f64(),
            held_lease,
            lease_taken_over_after_seconds: None,
            lease_taken_over_by: None,
        });
        if held_lease {
            watching.push((killed.lock().expect("poisoned").len() - 1, pool, pid, at));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !watching.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (i, pool, pid, at) in watching {
            match lease_holder(pool).await {
                Some(h) if h != pid => {
                    let took = started.elapsed().saturating_sub(at).as_secs_f64();
                    let by = children
                        .pids()
                        .into_iter()
                        .find(|(_, p)| *p == h)
                        .map(|(name, _)| name);
                    let mut k = killed.lock().expect("poisoned");
                    k[i].lease_taken_over_after_seconds = Some(took);
                    k[i].lease_taken_over_by = by.clone();
                    if !quiet {
                        eprintln!(
                            "  {:>4.0}s  {} took the lease of {}, {took:.1}s after the kill",
                            started.elapsed().as_secs_f64(),
                            by.as_deref().unwrap_or("another sink"),
                            k[i].sink
                        );
                    }
                }
                _ => still.push((i, pool, pid, at)),
            }
        }
        watching = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Requests the running sinks accepted on a verified token, from their metrics listeners.
async fn token_requests(metrics: &[SocketAddr]) -> u64 {
    let mut total = 0.0;
    for addr in metrics {
        let Ok(client) = http_client(&addr.to_string()) else {
            continue;
        };
        if let Ok(Ok((http::StatusCode::OK, text))) =
            tokio::time::timeout(Duration::from_secs(5), client.get("/_/varz")).await
        {
            total += text
                .lines()
                .filter(|l| {
                    l.starts_with(crate::metrics::AUTH_REQUESTS) && l.contains("reason=\"token\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total as u64
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_that_exits_before_it_is_ready_is_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let children = Children::new(dir.path());
        let (tried, up) = (dir.path().join("tried"), dir.path().join("up"));
        let sh = demo::on_path("sh").expect("sh");
        // The first start exits at once, as a child whose port was taken; the second stays.
        let script = format!(
            "if [ -e {t} ]; then touch {u}; exec sleep 60; else touch {t}; exit 1; fi",
            t = tried.display(),
            u = up.display()
        );
        let starts = std::sync::atomic::AtomicUsize::new(0);
        let pid = with_fresh_ports(&children, "c", || async {
            starts.fetch_add(1, Ordering::Relaxed);
            let pid = children.spawn("c", &sh, &["-c".into(), script.clone()])?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !up.exists() {
                if let Some(status) = children.exited("c") {
                    bail!("c exited ({status})");
                }
                if Instant::now() > deadline {
                    bail!("c not ready");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(pid)
        })
        .await
        .expect("started on the second attempt");
        assert_eq!(starts.load(Ordering::Relaxed), 2);
        assert_eq!(children.pids(), vec![("c".to_string(), pid)]);
        children.stop_all(Duration::from_secs(5)).await;

        // A child that never gets ready is given up after three starts.
        let starts = std::sync::atomic::AtomicUsize::new(0);
        let failed = with_fresh_ports(&children, "d", || async {
            starts.fetch_add(1, Ordering::Relaxed);
            children.spawn("d", &sh, &["-c".into(), "exit 2".into()])?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while children.exited("d").is_none() {
                assert!(Instant::now() < deadline, "d did not exit");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err::<(), _>(anyhow!("d exited"))
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(starts.load(Ordering::Relaxed), 3);
    }
}
