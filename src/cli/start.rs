//! `cdc-sink start` and `cdc-sink preflight`. The sink itself is assembled in [`crate::sink`].

use anyhow::Context;
use clap::CommandFactory;

/// Runs a sink until SIGINT or SIGTERM. `argv` is the whole command line: the userscript's
/// `setOptions` are applied by parsing it again with them appended.
pub(super) async fn start(argv: Vec<String>) -> anyhow::Result<()> {
    let prepared = crate::sink::prepare_with(argv, super::Cli::command())?;
    crate::sink::launch(prepared).await?.wait().await?;
    Ok(())
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

pub(super) async fn preflight(args: PreflightArgs) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_start_line_parses_as_the_whole_command_tree_parses_it() {
        let argv = crate::sink::loopback_argv(
            "postgresql://x/kv",
            &[
                "--flushSize",
                "500",
                "--flushSize=7",
                "--bestEffortWindow=0",
            ],
        );
        let lone = crate::sink::prepare(argv.clone()).expect("parses alone");
        let whole = crate::sink::prepare_with(argv, super::super::Cli::command()).expect("parses");
        assert_eq!(lone.args.sequence.flush_size, 7, "a later flag wins");
        assert_eq!(format!("{:?}", lone.args), format!("{:?}", whole.args));
        let err = crate::sink::prepare(vec!["cdc-sink".into(), "start".into(), "--nope".into()])
            .err()
            .expect("unknown flag refused");
        assert!(err.to_string().contains("--nope"), "{err}");
    }
}
