//! `cdc-sink workload kv`: runs the kv workload, printing a progress line per second.

use crate::workload::kv::{self, KvArgs, Progress};
use tokio_util::sync::CancellationToken;

#[derive(clap::Subcommand, Debug)]
pub enum WorkloadCommand {
    /// Upsert rows into kv(k INT8 PRIMARY KEY, v BYTEA), like `cockroach workload run kv`.
    Kv(KvArgs),
}

pub(crate) async fn workload(cmd: WorkloadCommand) -> anyhow::Result<()> {
    let WorkloadCommand::Kv(args) = cmd;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        crate::sink::shutdown_signal().await;
        on_signal.cancel();
    });
    println!("{}", Progress::HEADER);
    let summary = kv::run_with_progress(&args, cancel, |p| println!("{p}")).await?;
    println!("\n{}", summary);
    if let Some(next) = summary.next_seq {
        println!("next write seq: S{next}");
    }
    Ok(())
}
