//! `cdc-sink verify`: one comparison, or a watch until the copies agree N times in a row.

use crate::verify::{self, CompareOptions, Report, TableRef, VerifyArgs};
use anyhow::bail;
use tokio_util::sync::CancellationToken;

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let table = TableRef::parse(&args.table)?;
    let db = table.database.as_deref();
    let source = verify::connect(&args.source, db, "source").await?;
    let target = verify::connect(&args.target, db, "target").await?;
    let opts = CompareOptions {
        ignore_columns: args.ignore_columns.clone(),
        sample: args.sample,
    };
    let json = args.json;
    let print = move |r: &Report, clean: Option<u32>| {
        if json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let (Some(c), Some(obj)) = (clean, v.as_object_mut()) {
                obj.insert("consecutive_clean".into(), c.into());
            }
            println!("{v}");
        } else {
            println!("{r}");
            if let Some(c) = clean.filter(|c| *c > 0) {
                println!("in sync for {c} consecutive checks");
            }
        }
    };
    let Some(interval) = args.watch else {
        let report = verify::compare(&source, &target, &table, &opts).await?;
        print(&report, None);
        if !report.in_sync() {
            bail!("{} differs", table);
        }
        return Ok(());
    };
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        super::start::shutdown_signal().await;
        on_signal.cancel();
    });
    let outcome = verify::watch(
        &source,
        &target,
        &table,
        &opts,
        interval,
        args.clean,
        args.timeout,
        cancel,
        |r, clean| print(r, Some(clean)),
    )
    .await?;
    if !outcome.in_sync {
        bail!(
            "{} was not in sync for {} consecutive checks ({} checks made)",
            table,
            args.clean,
            outcome.checks
        );
    }
    Ok(())
}
