//! The command tree. Each subcommand's flags are the `clap::Args` of the module that owns them;
//! this is the only place that uses `anyhow`.

mod bench;
mod checkpoint;
mod demo;
pub mod dlq;
mod feed;
mod healthcheck;
mod jwt;
pub mod make_jwt;
mod start;
pub mod status;
mod userscript;
mod verify;
mod workload;

use crate::error::ErrorChain;
use clap::{ArgAction, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    args_override_self = true,
    name = "cdc-sink",
    version,
    about = "CockroachDB changefeed sink for active-active replication"
)]
pub struct Cli {
    #[command(flatten)]
    pub(crate) log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Logging flags, shared by every command.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct LogArgs {
    /// More logging: once for debug, twice for trace.
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    /// `text`, or `fluent` for one JSON object per line.
    #[arg(long = "logFormat", env = "CDC_SINK_LOG_FORMAT", default_value = "text", global = true, value_parser = ["text", "fluent", "json"])]
    pub(crate) log_format: String,
    /// Append logs to this file instead of standard error.
    #[arg(
        long = "logDestination",
        env = "CDC_SINK_LOG_DESTINATION",
        global = true
    )]
    pub(crate) log_destination: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the changefeed sink server.
    Start(Box<crate::sink::StartArgs>),
    /// Check that the target database can be reached (accepts a whole `start` command line).
    Preflight(start::PreflightArgs),
    /// Measure throughput against a raw sqlx baseline on a throwaway PostgreSQL.
    Bench(bench::BenchArgs),
    /// Run the whole active-active loop on this machine: two PostgreSQL clusters, two sinks,
    /// two changefeeds, conflicting workloads, then verify and summarise.
    Demo(demo::DemoArgs),
    /// Mint a JWT for the sink (`-k key.pem -a db.schema`), or generate a key pair with the SQL
    /// that installs it (`--generate-key`).
    MakeJwt(make_jwt::MakeJwtArgs),
    /// JWT keys and revocations in the staging schema: `jwt keys`, `jwt add-key FILE`,
    /// `jwt revoke JTI|TOKEN`.
    Jwt(jwt::JwtArgs),
    /// Probe a running sink's `/_/healthz` (exit 0 on 200): the container HEALTHCHECK.
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Print the version.
    Version,
    /// Emulate a CockroachDB changefeed from a PostgreSQL source into a sink.
    Feed(Box<crate::feed::FeedArgs>),
    /// Write workloads (`kv`).
    #[command(subcommand)]
    Workload(workload::WorkloadCommand),
    /// Compare a table on two databases.
    Verify(Box<crate::verify::VerifyArgs>),
    /// Userscript tools: print the API (`--api`), check a script, dry-run it on a payload.
    Userscript(userscript::UserscriptArgs),
    /// Show the checkpoints, or reset one set wrong (`checkpoint reset db.schema --to …`).
    Checkpoint(checkpoint::CheckpointArgs),
    /// The dead-letter queue of a target schema: `dlq list|show|purge|replay db.schema`.
    Dlq(dlq::DlqArgs),
    /// Print an instance's `/_/status` as a table (`status --url http://metricsAddr`).
    Status(status::StatusArgs),
}

pub fn run(cli: Cli) -> ExitCode {
    // Commands that run servers in-process for their own report keep those servers quiet.
    let quiet = matches!(
        cli.command,
        Command::Demo(_) | Command::Bench(_) | Command::Healthcheck(_)
    );
    if let Err(e) = init_logging(&cli.log, quiet) {
        eprintln!("error: {}", ErrorChain(e.as_ref()));
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Version => {
            println!("cdc-sink {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        // Parsed again with the userscript's setOptions applied over the command line.
        Command::Start(_) => {
            runtime().and_then(|rt| rt.block_on(start::start(std::env::args().collect())))
        }
        Command::Preflight(args) => runtime().and_then(|rt| rt.block_on(start::preflight(args))),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(bench::run(args))),
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(demo::run(args))),
        Command::Feed(args) => runtime().and_then(|rt| rt.block_on(feed::feed(*args))),
        Command::Workload(cmd) => runtime().and_then(|rt| rt.block_on(workload::workload(cmd))),
        Command::Verify(args) => runtime().and_then(|rt| rt.block_on(verify::verify(*args))),
        Command::Userscript(args) => userscript::run(args),
        Command::MakeJwt(args) => make_jwt::run(args),
        Command::Jwt(args) => runtime().and_then(|rt| rt.block_on(jwt::run(args))),
        Command::Checkpoint(args) => runtime().and_then(|rt| rt.block_on(checkpoint::run(args))),
        Command::Dlq(args) => runtime().and_then(|rt| rt.block_on(dlq::run(args))),
        Command::Status(args) => runtime().and_then(|rt| rt.block_on(status::run(args))),
        Command::Healthcheck(args) => runtime().and_then(|rt| rt.block_on(healthcheck::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain = ErrorChain(e.as_ref());
            tracing::error!(error = %chain, "exiting");
            eprintln!("error: {chain}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init_logging(args: &LogArgs, quiet: bool) -> anyhow::Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let level = match args.verbose {
        0 if quiet => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // Our own crate at the chosen level; noisy dependencies stay at warn unless RUST_LOG says.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,cdc_sink={level},cdc_sink::userscript={level}"
        ))
    });
    // Colours only on a terminal: files and pipes get plain text that tools can grep.
    let ansi =
        args.log_destination.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(ansi);
    let writer: tracing_subscriber::fmt::writer::BoxMakeWriter = match &args.log_destination {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(file))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    // The counter sits over the filter: it counts what is written.
    let counter = crate::metrics::LogCounter;
    let result = if args.log_format == "text" {
        builder
            .with_writer(writer)
            .finish()
            .with(counter)
            .try_init()
    } else {
        builder
            .json()
            .with_writer(writer)
            .finish()
            .with(counter)
            .try_init()
    };
    anyhow::Context::context(result, "logging")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn set_options_and_the_checkpoint_command_know_the_guard_flags() {
        assert!(crate::sink::start_flags().contains(&("maxClockSkew".to_string(), true)));
        let cli = Cli::try_parse_from([
            "cdc-sink",
            "start",
            "--disableAuthentication",
            "--maxClockSkew",
            "10m",
        ])
        .expect("parses");
        let Command::Start(args) = cli.command else {
            panic!("start expected")
        };
        assert_eq!(
            args.source.max_clock_skew,
            std::time::Duration::from_secs(600)
        );
        let cli = Cli::try_parse_from([
            "cdc-sink",
            "checkpoint",
            "reset",
            "kv.public",
            "--to",
            "now-1h",
            "--targetConn",
            "postgresql://x/kv",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Command::Checkpoint(_)));
    }

    #[test]
    fn the_dlq_command_parses_its_selection() {
        let cli = Cli::try_parse_from([
            "cdc-sink",
            "dlq",
            "replay",
            "kv.public",
            "--targetConn",
            "postgresql://x/kv",
            "--table",
            "t",
            "--dlq",
            "a",
            "--from",
            "5.0000000001",
            "--limit",
            "10",
        ])
        .expect("parses");
        let Command::Dlq(args) = cli.command else {
            panic!("dlq expected")
        };
        let dlq::DlqCommand::Replay { sel, batch, .. } = args.command else {
            panic!("replay expected")
        };
        assert_eq!((sel.table.as_deref(), batch), (Some("t"), 100));
        assert_eq!(sel.dlq.as_deref(), Some("a"));
        assert_eq!(sel.from, Some(crate::hlc::Hlc::new(5, 1)));
        assert_eq!((sel.to, sel.limit), (None, Some(10)));
    }

    #[test]
    fn verify_repairs_only_from_a_named_side() {
        let parse = |extra: &[&str]| {
            let argv = [
                "cdc-sink", "verify", "--source", "pg://a/x", "--target", "pg://b/x",
            ];
            Cli::try_parse_from(argv.iter().chain(extra)).map(|cli| match cli.command {
                Command::Verify(v) => (v.repair, v.from, v.repair_batch),
                _ => panic!("verify expected"),
            })
        };
        assert_eq!(
            parse(&["--repair", "--from", "target", "--repair-batch", "10"]).expect("parses"),
            (true, Some(crate::verify::Side::Target), 10)
        );
        assert_eq!(parse(&[]).expect("parses"), (false, None, 500));
        for bad in [
            &["--repair"][..],
            &["--from", "source"],
            &["--repair", "--from", "east"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn start_authenticates_unless_told_not_to_and_a_later_flag_wins() {
        let auth = |args: &[&str]| {
            let argv = ["cdc-sink", "start", "--targetConn", "postgresql://x/kv"];
            let cli = Cli::try_parse_from(argv.iter().chain(args)).expect("parses");
            let Command::Start(start) = cli.command else {
                panic!("start expected")
            };
            start.auth.disable_authentication
        };
        assert!(!auth(&[]), "JWT by default");
        assert!(auth(&["--disableAuthentication"]));
        assert!(auth(&["--disableAuthentication=true"]));
        assert!(!auth(&[
            "--disableAuthentication",
            "--disableAuthentication=false"
        ]));
    }

    #[test]
    fn make_jwt_takes_the_reference_flags() {
        let cli = Cli::try_parse_from([
            "cdc-sink",
            "make-jwt",
            "-k",
            "k.pem",
            "-a",
            "a.b,c.*",
            "-a",
            "d.e",
            "-o",
            "t.jwt",
            "--expires",
            "720h",
        ])
        .expect("parses");
        let Command::MakeJwt(args) = cli.command else {
            panic!("make-jwt expected")
        };
        assert_eq!(args.allow, ["a.b", "c.*", "d.e"]);
        assert_eq!(
            args.expires,
            Some(std::time::Duration::from_secs(720 * 3600))
        );
    }

    #[test]
    fn start_accepts_the_reference_flags_and_env() {
        let cli = Cli::try_parse_from([
            "cdc-sink",
            "start",
            "--bindAddr",
            ":30004",
            "--metricsAddr",
            ":30005",
            "--tlsSelfSigned",
            "--disableAuthentication",
            "--targetConn",
            "postgresql://root@local:26257/?sslmode=disable",
            "--flushSize",
            "500",
            "--dlqTableName",
            "my_dlq",
        ])
        .expect("parses");
        let Command::Start(args) = cli.command else {
            panic!("start expected")
        };
        assert_eq!(args.server.bind_addr, ":30004");
        assert_eq!(args.sequence.flush_size, 500);
        assert_eq!(args.apply.dlq_table_name, "my_dlq");
        assert_eq!(args.stage.staging_schema, "_cdc_sink");
        assert_eq!(
            args.sequence.retire_offset,
            std::time::Duration::from_secs(86400)
        );
    }
}
