//! A whole sink, assembled: the `start` flags, a command line made ready to run (the
//! userscript loaded and its `setOptions` applied over the flags), and the launch that opens
//! the databases, wires staging, checkpoints, sequencing, apply and ingest together and serves.
//! The `start` command, the tests and the benchmark all run a sink through here.

use crate::apply::{Applier, ApplyError};
use crate::auth::{AuthArgs, AuthError, Authenticator};
use crate::checkpoint::{AppliedRanges, CheckpointError, Checkpoints, Leases};
use crate::script::{ScriptError, Userscript};
use crate::sequence::{Parts, SequenceArgs, SequenceError, Sequencer};
use crate::server::{ServerArgs, ServerError};
use crate::source::webhook::DecodeLimits;
use crate::source::{Ingest, SourceArgs};
use crate::stage::{StageArgs, StageError, Stager};
use crate::target::{TargetArgs, TargetError};
use clap::{Args as _, FromArgMatches as _};
use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can stop a sink from starting, or end it. Display is one line; causes are
/// sources.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Flags(clap::Error),
    #[error("not a start command line")]
    NotStart,
    #[error("loading {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: ScriptError,
    },
    #[error("loading {} with its engine options", path.display())]
    Reload {
        path: PathBuf,
        #[source]
        source: ScriptError,
    },
    #[error(
        "userscript setOptions: flag {name} is a switch; use \"true\" or \"false\", not {value:?}"
    )]
    Switch { name: String, value: String },
    #[error("applying the userscript's setOptions")]
    SetOptions(#[source] clap::Error),
    #[error("userscript setOptions: the options differ when the script runs again")]
    OptionsDiffer,
    #[error(
        "--tlsClientSchemas needs --tlsClientCA (client certificates are not requested without it)"
    )]
    ClientSchemasWithoutCa,
    #[error(
        "--bestEffortOnly needs staging in the target database (it stages and applies \
in one transaction): drop --stagingConn or --bestEffortOnly"
    )]
    BestEffortOnlyWithSeparateStaging,
    #[error("opening databases")]
    Open(#[source] TargetError),
    #[error("reading the target clock")]
    Clock(#[source] sqlx::Error),
    #[error("server task")]
    Task(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

#[derive(clap::Args, Debug, Clone)]
pub struct StartArgs {
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    #[command(flatten)]
    pub(crate) stage: StageArgs,
    #[command(flatten)]
    pub sequence: SequenceArgs,
    #[command(flatten)]
    pub(crate) source: SourceArgs,
    #[command(flatten)]
    pub(crate) auth: AuthArgs,
    #[command(flatten)]
    pub(crate) apply: crate::apply::ApplyArgs,
    /// TypeScript or JavaScript userscript: dispatch, per-table options, merges.
    #[arg(long = "userscript", env = "CDC_SINK_USERSCRIPT")]
    pub(crate) userscript: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub script: crate::script::ScriptArgs,
}

impl StartArgs {
    fn validate(&self) -> Result<(), SinkError> {
        self.server.validate()?;
        self.target.validate()?;
        self.sequence.validate()?;
        self.auth.validate()?;
        self.apply.validate()?;
        if !self.auth.tls_client_schemas.is_empty() && self.server.tls_client_ca.is_none() {
            return Err(SinkError::ClientSchemasWithoutCa);
        }
        if self.sequence.best_effort_only && self.target.separate_staging() {
            return Err(SinkError::BestEffortOnlyWithSeparateStaging);
        }
        Ok(())
    }
}

/// A running sink: what `start` runs until a signal, and what tests drive directly.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), SinkError>>,
}

impl Running {
    /// Graceful stop within `--gracePeriod`: in-flight requests and flushes finish, or are
    /// abandoned at its end.
    pub async fn stop(mut self) -> Result<(), SinkError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task).await.map_err(SinkError::Task)?
    }

    /// Waits until the server stops by itself (after a signal).
    pub(crate) async fn wait(mut self) -> Result<(), SinkError> {
        (&mut self.task).await.map_err(SinkError::Task)?
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
pub(crate) fn start_flags() -> Vec<(String, bool)> {
    StartArgs::augment_args(clap::Command::new("start"))
        .get_arguments()
        .filter_map(|a| {
            a.get_long()
                .map(|l| (l.to_string(), a.get_action().takes_values()))
        })
        .collect()
}

/// `cdc-sink start …` and nothing else: the command tree [`prepare`] parses with. A later
/// flag wins over an earlier one, as in the binary's tree, which `setOptions` relies on.
fn start_only() -> clap::Command {
    clap::Command::new("cdc-sink")
        .args_override_self(true)
        .subcommand(StartArgs::augment_args(clap::Command::new("start")))
}

/// Parses `argv` with `tree`; `None` when it is not a `start` command line.
fn parse(tree: &clap::Command, argv: &[String]) -> Result<Option<StartArgs>, clap::Error> {
    let mut matches = tree.clone().try_get_matches_from(argv)?;
    match matches.remove_subcommand() {
        Some((name, mut start)) if name == "start" => StartArgs::from_arg_matches_mut(&mut start)
            .map(Some)
            .map_err(|e| e.format(&mut tree.clone())),
        _ => Ok(None),
    }
}

/// Parses a `cdc-sink start …` command line into a [`Prepared`] start.
pub fn prepare(argv: Vec<String>) -> Result<Prepared, SinkError> {
    prepare_with(argv, start_only())
}

/// Like [`prepare`], parsing with `tree`, a whole command tree whose `start` subcommand has
/// the [`StartArgs`] flags: the binary's, whose command lines may also carry the flags every
/// command shares.
pub(crate) fn prepare_with(argv: Vec<String>, tree: clap::Command) -> Result<Prepared, SinkError> {
    let args = parse(&tree, &argv)
        .map_err(SinkError::Flags)?
        .ok_or(SinkError::NotStart)?;
    let Some(path) = args.userscript.clone() else {
        return Ok(Prepared { args, script: None });
    };
    let flags = start_flags();
    let names: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).collect();
    let script =
        Userscript::load_with(&path, &names, args.script.runtime_options()).map_err(|source| {
            SinkError::Load {
                path: path.clone(),
                source,
            }
        })?;
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
            return Err(SinkError::Switch {
                name: name.clone(),
                value: value.clone(),
            });
        }
    }
    let loaded_with = args.script.clone();
    let args = parse(&tree, &argv)
        .map_err(SinkError::SetOptions)?
        .ok_or(SinkError::NotStart)?;
    let script = if args.script == loaded_with {
        script
    } else {
        // The engine's own limits came from the script: start it again under them.
        let again = Userscript::load_with(&path, &names, args.script.runtime_options()).map_err(
            |source| SinkError::Reload {
                path: path.clone(),
                source,
            },
        )?;
        if again.options() != script.options() {
            return Err(SinkError::OptionsDiffer);
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
pub async fn launch(prepared: Prepared) -> Result<Running, SinkError> {
    let Prepared { args, script } = prepared;
    args.validate()?;
    crate::metrics::install();
    let crate::target::Opened {
        target,
        staging,
        control,
        gate,
    } = args.target.open_all().await.map_err(SinkError::Open)?;
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
        script
            .clone()
            .map(|s| Arc::new(s) as Arc<dyn crate::apply::TableConfigs>),
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
        script: script.clone(),
        pipelines: Default::default(),
        control,
    });
    sequencer.recover().await?;
    let clock = crate::source::TargetClock::open(&target, args.source.max_clock_skew)
        .await
        .map_err(SinkError::Clock)?;
    let handler = Ingest {
        target,
        staging,
        auth,
        applier,
        sequencer: sequencer.clone(),
        script,
        limits: DecodeLimits {
            ndjson_line_bytes: args.source.ndjson_buffer_size,
        },
        clock,
        schemas: Default::default(),
        gate,
    }
    .into_handler();
    let bound = crate::server::bind(&args.server).await?;
    let (addr, metrics_addr) = (bound.local_addr(), bound.metrics_addr());
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
        stop: Some(stop_tx),
        task,
    })
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
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
