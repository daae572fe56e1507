//! `cdc-sink verify`: one comparison, or a watch until the copies agree N times in a row
//! ("failback ready"); with `--repair --from SIDE`, divergent rows are copied from that side.

use crate::verify::{
    self, CompareOptions, RepairOptions, Step, TableRef, VerifyArgs, WatchOptions,
};
use anyhow::bail;
use tokio_util::sync::CancellationToken;

/// Repairs at most this many times in one run without `--watch` (each reads up to the
/// comparison's row limit of divergent rows).
const REPAIR_ROUNDS: u32 = 20;

pub(crate) async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let table = TableRef::parse(&args.table)?;
    let db = table.database.as_deref();
    let source = verify::connect(&args.source, db, "source").await?;
    let target = verify::connect(&args.target, db, "target").await?;
    let opts = CompareOptions {
        ignore_columns: args.ignore_columns.clone(),
        sample: args.sample,
    };
    let repair = match (args.repair, args.from) {
        (true, Some(from)) => Some(RepairOptions {
            from,
            batch: args.repair_batch,
        }),
        (true, None) => bail!("--repair needs --from source or --from target"),
        (false, _) => None,
    };
    let json = args.json;
    let want = args.clean.max(1);
    let print = move |step: Step<'_>| match step {
        Step::Compared(r, clean) => {
            let ready = clean.is_some_and(|c| c >= want);
            if json {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                if let (Some(c), Some(obj)) = (clean, v.as_object_mut()) {
                    obj.insert("consecutive_clean".into(), c.into());
                    obj.insert("failback_ready".into(), ready.into());
                }
                println!("{v}");
            } else {
                println!("{r}");
                if let Some(c) = clean.filter(|c| *c > 0) {
                    println!("in sync for {c} consecutive checks");
                }
                if ready {
                    println!("failback ready");
                }
            }
        }
        Step::Repaired(r) => {
            if json {
                println!("{}", serde_json::json!({ "repair": r }));
            } else {
                println!("{r}");
            }
        }
    };
    let Some(interval) = args.watch else {
        let report = verify::compare_and_repair(
            &source,
            &target,
            &table,
            &opts,
            repair,
            REPAIR_ROUNDS,
            print,
        )
        .await?;
        if !report.in_sync() {
            bail!("{} differs", table);
        }
        return Ok(());
    };
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        crate::sink::shutdown_signal().await;
        on_signal.cancel();
    });
    let outcome = verify::watch_and_repair(
        &source,
        &target,
        &table,
        &opts,
        repair,
        WatchOptions {
            interval,
            clean: args.clean,
            timeout: args.timeout,
        },
        cancel,
        print,
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
