//! The command tree. Each subcommand's flags are the `clap::Args` of the module that owns them.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "cdc-sink", version, about = "CockroachDB changefeed sink for active-active replication")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the version.
    Version,
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Version => {
            println!("cdc-sink {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
