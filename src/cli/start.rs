//! `cdc-sink start` and `cdc-sink preflight`.

use crate::apply::Applier;
use crate::auth::{AuthArgs, Authenticator};
use crate::checkpoint::{AppliedRanges, Checkpoints, Leases};
use crate::script::Userscript;
use crate::sequence::{Hooks, Parts, SequenceArgs, Sequencer};
use crate::server::ServerArgs;
use crate::source::webhook::DecodeLimits;
use crate::source::{Ingest, SourceArgs};
use crate::stage::{StageArgs, Stager};
use crate::target::TargetArgs;
use anyhow::{bail, Context};
use clap::{Args as _, Parser};
use std::sync::Arc;

#[derive(clap::Args, Debug, Clone)]
pub struct StartArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub stage: StageArgs,
    #[command(flatten)]
    pub sequence: SequenceArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub apply: crate::apply::ApplyArgs,
    /// TypeScript or JavaScript userscript: dispatch, per-table options, merges.
    #[arg(long = "userscript", env = "CDC_SINK_USERSCRIPT")]
    pub userscript: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub script: crate::script::ScriptArgs,
}

impl StartArgs {
    fn validate(&self) -> anyhow::Result<()> {
        self.server.validate()?;
        self.target.validate()?;
        self.sequence.validate()?;
        self.auth.validate()?;
        self.apply.validate()?;
        if !self.auth.tls_client_schemas.is_empty() && self.server.tls_client_ca.is_none() {
            anyhow::bail!("--tlsClientSchemas needs --tlsClientCA (client certificates are not requested without it)");
        }
        if self.sequence.best_effort_only && self.target.separate_staging() {
            anyhow::bail!(
                "--bestEffortOnly needs staging in the target database (it stages and applies \
in one transaction): drop --stagingConn or --bestEffortOnly"
            );
        }
        Ok(())
    }
}

/// A running sink: what `start` runs until a signal, and what tests drive directly.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Graceful stop within `--gracePeriod`: in-flight requests and flushes finish, or are
    /// abandoned at its end.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.context("server task")?
    }

    /// Waits until the server stops by itself (after a signal).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("server task")?
    }
}

/// A `start` command line made ready to run: flags parsed, the userscript loaded (its top
/// level runs once, here) and its `setOptions` applied over the command line.
pub struct Prepared {
    pub args: StartArgs,
    pub script: Option<Userscript>,
}

/// The command line of a sink on a random loopback port with a self-signed certificate and
/// no authentication, in front of `target_url`: what the benchmark and the tests run
/// in-process.
pub fn loopback_argv(target_url: &str, extra: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "cdc-sink",
        "start",
        "--bindAddr",
        "127.0.0.1:0",
        "--tlsSelfSigned",
        "--disableAuthentication",
        "--targetConn",
        target_url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

/// The long names of the `start` flags (what `setOptions` may set), each with whether it
/// takes a value (`false` for switches).
pub fn start_flags() -> Vec<(String, bool)> {
    StartArgs::augment_args(clap::Command::new("start"))
        .get_arguments()
        .filter_map(|a| {
            a.get_long()
                .map(|l| (l.to_string(), a.get_action().takes_values()))
        })
        .collect()
}

/// Parses a whole command line (`cdc-sink … start …`) into a [`Prepared`] start.
pub fn prepare(argv: Vec<String>) -> anyhow::Result<Prepared> {
    let parse = |argv: &[String]| -> anyhow::Result<StartArgs> {
        match super::Cli::try_parse_from(argv)?.command {
            super::Command::Start(args) => Ok(*args),
            _ => bail!("not a start command line"),
        }
    };
    let args = parse(&argv)?;
    let Some(path) = args.userscript.clone() else {
        return Ok(Prepared { args, script: None });
    };
    let flags = start_flags();
    let names: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).collect();
    let script = Userscript::load_with(&path, &names, args.script.runtime_options())
        .with_context(|| format!("loading {}", path.display()))?;
    if script.options().is_empty() {
        return Ok(Prepared {
            args,
            script: Some(script),
        });
    }
    // setOptions wins over the command line, as if its flags came last.
    let mut argv = argv;
    for (name, value) in script.options() {
        let takes_value = flags
            .iter()
            .find(|(n, _)| n == name)
            .is_some_and(|(_, v)| *v);
        if takes_value {
            argv.push(format!("--{name}={value}"));
        } else if value == "true" {
            argv.push(format!("--{name}"));
        } else if value != "false" {
            bail!("userscript setOptions: flag {name} is a switch; use \"true\" or \"false\", not {value:?}");
        }
    }
    let loaded_with = args.script.clone();
    let args = parse(&argv).context("applying the userscript's setOptions")?;
    let script = if args.script == loaded_with {
        script
    } else {
        // The engine's own limits came from the script: start it again under them.
        let again = Userscript::load_with(&path, &names, args.script.runtime_options())
            .with_context(|| format!("loading {} with its engine options", path.display()))?;
        if again.options() != script.options() {
            bail!("userscript setOptions: the options differ when the script runs again");
        }
        again
    };
    tracing::info!(
        options = script.options().len(),
        "userscript options applied"
    );
    Ok(Prepared {
        args,
        script: Some(script),
    })
}

/// Opens the databases, prepares staging, binds the listeners and starts serving.
pub async fn launch(prepared: Prepared) -> anyhow::Result<Running> {
    let Prepared { args, script } = prepared;
    args.validate()?;
    let hooks = script.map(Hooks::new);
    crate::metrics::install();
    let crate::target::Opened {
        target,
        staging,
        control,
        gate,
    } = args.target.open_all().await.context("opening databases")?;
    crate::target::spawn_pool_metrics(&target);
    let separate_staging = args.target.separate_staging();
    if separate_staging {
        crate::target::spawn_pool_metrics(&staging);
    }
    crate::target::spawn_pool_metrics(&control);
    let stager = Arc::new(Stager::open(staging.clone(), &args.stage.staging_schema).await?);
    let checkpoints = Checkpoints::open(staging.clone(), stager.schema()).await?;
    let leases = Arc::new(Leases::open(control.clone(), stager.schema()).await?);
    let ranges = Arc::new(AppliedRanges::open(&staging, stager.schema()).await?);
    let auth = Authenticator::open(
        &args.auth,
        &args.server.bind_addr,
        &staging,
        stager.schema(),
    )
    .await?;
    let applier = Applier::with_options(
        target.clone(),
        args.target.schema_refresh,
        args.apply.clone(),
    );
    let sequencer = Sequencer::new(Parts {
        args: args.sequence.clone(),
        target: target.clone(),
        separate_staging,
        stager: stager.clone(),
        checkpoints: checkpoints.clone(),
        ranges,
        leases,
        applier: applier.clone(),
        hooks: hooks.clone(),
        pipelines: Default::default(),
        control,
    });
    sequencer.recover().await?;
    let clock = crate::source::TargetClock::open(&target, args.source.max_clock_skew)
        .await
        .context("reading the target clock")?;
    let handler = Ingest {
        target,
        staging,
        auth,
        applier,
        stager,
        checkpoints,
        sequencer: sequencer.clone(),
        hooks,
        limits: DecodeLimits {
            ndjson_line_bytes: args.source.ndjson_buffer_size,
        },
        clock,
        schemas: Default::default(),
        dropped: Default::default(),
        gate,
    }
    .into_handler();
    let bound = crate::server::bind(&args.server).await?;
    let (addr, metrics_addr, tls) = (bound.local_addr(), bound.metrics_addr(), bound.tls());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = args.server.grace_period;
    let stopping = sequencer.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = stop_rx => {}
        }
        // Pipelines stop alongside the server's drain, within the same grace period.
        stopping.stop(tokio::time::Instant::now() + grace);
    };
    let task = tokio::spawn(async move {
        let served = bound.serve(Arc::new(handler), shutdown).await;
        sequencer.shutdown().await;
        served?;
        tracing::info!("stopped");
        Ok(())
    });
    Ok(Running {
        addr,
        metrics_addr,
        tls,
        stop: Some(stop_tx),
        task,
    })
}

pub async fn start(argv: Vec<String>) -> anyhow::Result<()> {
    launch(prepare(argv)?).await?.wait().await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}

#[derive(clap::Args, Debug, Clone)]
pub struct PreflightArgs {
    #[arg(long = "targetConn", env = "CDC_SINK_TARGET_CONN")]
    pub target_conn: String,
    #[arg(long = "stagingConn", env = "CDC_SINK_STAGING_CONN")]
    pub staging_conn: Option<String>,
    /// Other `start` flags are tolerated so a whole command line can be pasted.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

pub async fn preflight(args: PreflightArgs) -> anyhow::Result<()> {
    let settings = crate::target::PoolSettings {
        max_connections: 2,
        max_lifetime: std::time::Duration::from_secs(60),
        idle_timeout: std::time::Duration::from_secs(60),
        idle_in_transaction: std::time::Duration::from_secs(30),
    };
    let mut urls = vec![("target", args.target_conn.clone())];
    if let Some(s) = args.staging_conn.filter(|s| !s.is_empty()) {
        urls.push(("staging", s));
    }
    for (what, url) in urls {
        let db = crate::target::open(&url, what, &settings).await?;
        sqlx::query("SELECT 1")
            .execute(&db.pool)
            .await
            .with_context(|| format!("{what}: SELECT 1"))?;
        println!(
            "{what}: ok ({}, database {})",
            db.dialect.name(),
            db.database
        );
    }
    Ok(())
}
