//! `cdc-sink checkpoint show|reset`: inspect the checkpoints, and recover one set wrong (e.g. a
//! resolved timestamp far in the future) without hand-written SQL.

use crate::checkpoint::{
    AppliedRanges, Bounds, Checkpoints, Leases, ResetTables, APPLIED_RANGES_TABLE,
};
use crate::config::parse_duration;
use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::stage::{StageArgs, Stager, StagingSchema};
use crate::target::{Database, TargetArgs};
use anyhow::{bail, Context};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    pub(crate) command: CheckpointCommand,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum CheckpointCommand {
    /// Print each schema's committed and newest proposed checkpoint, and its unapplied
    /// staged rows per table.
    Show(ShowArgs),
    /// Remove a schema's checkpoints newer than `--to`, so the feed's real resolved timestamps
    /// are accepted again (running sinks follow within seconds).
    Reset(ResetArgs),
}

#[derive(clap::Args, Debug)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    #[command(flatten)]
    pub(crate) stage: StageArgs,
    /// Only this schema (`db.schema`).
    pub(crate) schema: Option<String>,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ResetArgs {
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    #[command(flatten)]
    pub(crate) stage: StageArgs,
    /// The schema (`db.schema`).
    pub(crate) schema: String,
    /// The new newest checkpoint: an HLC (`nanos.logical`), `now`, or `now-<duration>` (e.g.
    /// `now-1h`), by the database clock. Use the cursor the changefeed will be re-created with.
    #[arg(long = "to", value_parser = ResetPoint::parse)]
    pub(crate) to: ResetPoint,
    /// Do it; without this, only print what would be done.
    #[arg(long = "yes")]
    pub(crate) yes: bool,
    /// Reset even while an instance holds the schema's apply lease: the lease is revoked and
    /// the holder starts again from the new checkpoint.
    #[arg(long = "force")]
    pub(crate) force: bool,
}

/// Where `--to` points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResetPoint {
    At(Hlc),
    /// The database clock's now, minus this.
    Ago(Duration),
}

impl ResetPoint {
    fn parse(s: &str) -> Result<ResetPoint, String> {
        let s = s.trim();
        if s == "now" {
            return Ok(ResetPoint::Ago(Duration::ZERO));
        }
        if let Some(d) = s.strip_prefix("now-") {
            return parse_duration(d).map(ResetPoint::Ago);
        }
        let hlc: Hlc = s
            .parse()
            .map_err(|e| format!("{e}; expected nanos.logical, now or now-<duration>"))?;
        if hlc.is_zero() {
            return Err("the checkpoint must not be zero".into());
        }
        Ok(ResetPoint::At(hlc))
    }
}

struct Opened {
    target: Database,
    staging: Database,
    checkpoints: std::sync::Arc<Checkpoints>,
    leases_table: String,
    ranges_table: String,
}

async fn open(target: &TargetArgs, stage: &StageArgs) -> anyhow::Result<Opened> {
    target.validate()?;
    let (target, staging) = target.open().await.context("opening databases")?;
    let schema = StagingSchema::parse(&stage.staging_schema, staging.dialect, &staging.database)
        .map_err(|e| anyhow::anyhow!("--stagingSchema {:?}: {e}", stage.staging_schema))?;
    // A reset clears applied ranges too: the table must exist even before any sink ran.
    AppliedRanges::open(&staging, &schema).await?;
    // A reset consults the lease even before any sink ran.
    Leases::open(staging.clone(), &schema).await?;
    let checkpoints = Checkpoints::open(staging.clone(), &schema).await?;
    Ok(Opened {
        target,
        staging,
        checkpoints,
        leases_table: schema.object("leases"),
        ranges_table: schema.object(APPLIED_RANGES_TABLE),
    })
}

/// The database clock as an HLC.
async fn db_now(db: &Database) -> anyhow::Result<Hlc> {
    let micros: i64 = sqlx::query_scalar("SELECT (extract(epoch FROM now()) * 1000000)::INT8")
        .fetch_one(&db.pool)
        .await
        .context("reading the database clock")?;
    Ok(Hlc::new(micros.saturating_mul(1000), 0))
}

pub(crate) async fn run(args: CheckpointArgs) -> anyhow::Result<()> {
    match args.command {
        CheckpointCommand::Show(a) => show(a).await,
        CheckpointCommand::Reset(a) => reset(a).await,
    }
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let only = args
        .schema
        .as_deref()
        .map(Schema::parse)
        .transpose()
        .context("schema")?;
    let opened = open(&args.target, &args.stage).await?;
    let stager = Stager::open(opened.staging.clone(), &args.stage.staging_schema).await?;
    let now = db_now(&opened.target).await?;
    let groups = opened.checkpoints.groups().await?;
    let mut shown = 0;
    for g in groups {
        if only.as_ref().is_some_and(|s| s.canonical() != g.group) {
            continue;
        }
        shown += 1;
        let Bounds {
            committed,
            proposed,
        } = g.bounds;
        println!("{}", g.group);
        println!("  committed: {}", describe(committed, now));
        println!("  proposed:  {}", describe(proposed, now));
        if let Ok(schema) = Schema::parse(&g.group) {
            for (table, rows, first, last) in staged(&stager, &opened.staging, &schema).await? {
                println!(
                    "  staged:    {table}: {rows} unapplied row(s) from {} to {}",
                    describe(first, now),
                    describe(last, now)
                );
            }
        }
    }
    if shown == 0 {
        println!("no checkpoints");
    }
    Ok(())
}

/// Per registered table of `schema` with unapplied staged rows: their count and the source
/// times of the oldest and newest.
async fn staged(
    stager: &Stager,
    staging: &Database,
    schema: &Schema,
) -> anyhow::Result<Vec<(Table, i64, Hlc, Hlc)>> {
    let mut out = Vec::new();
    for table in stager.registered(schema).await? {
        let sql = format!(
            "SELECT count(*), min(nanos), max(nanos) FROM {} WHERE NOT applied",
            stager.staging_table(&table)
        );
        // A registered table whose staging table is not created yet holds nothing.
        let Ok((rows, first, last)) = sqlx::query_as::<_, (i64, Option<i64>, Option<i64>)>(&sql)
            .fetch_one(&staging.pool)
            .await
        else {
            continue;
        };
        if let (true, Some(first), Some(last)) = (rows > 0, first, last) {
            out.push((table, rows, Hlc::new(first, 0), Hlc::new(last, 0)));
        }
    }
    Ok(out)
}

async fn reset(args: ResetArgs) -> anyhow::Result<()> {
    let schema = Schema::parse(&args.schema).context("schema")?;
    let opened = open(&args.target, &args.stage).await?;
    let now = db_now(&opened.target).await?;
    let to = match args.to {
        ResetPoint::At(h) => h,
        ResetPoint::Ago(d) => Hlc::new(
            now.nanos()
                .saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            0,
        ),
    };
    let lease = crate::sequence::lease_name(&schema);
    let leases = ResetTables {
        leases: &opened.leases_table,
        lease_name: &lease,
        ranges: &opened.ranges_table,
    };
    let plan = opened
        .checkpoints
        .reset(&schema, to, leases, false, args.force)
        .await?;
    if plan.rows == 0 {
        println!(
            "{}: no checkpoint newer than {}; nothing to do",
            schema.canonical(),
            describe(to, now)
        );
        return Ok(());
    }
    println!(
        "{}: remove {} checkpoint row(s) newer than {}",
        schema.canonical(),
        plan.rows,
        describe(to, now)
    );
    if let Some(c) = plan.committed {
        println!(
            "  the committed checkpoint {} becomes {}",
            describe(c, now),
            to
        );
    }
    match &plan.lease_holder {
        Some((holder, expires)) if args.force => println!(
            "  revoke the apply lease held by {holder} until {expires} (it restarts from the \
new checkpoint)"
        ),
        Some((holder, expires)) if args.yes => bail!(
            "nothing changed: the apply lease of {} is held by {holder} until {expires}; stop \
the instances serving it (or wait for the lease to expire), or pass --force to revoke it",
            schema.canonical()
        ),
        Some((holder, expires)) => println!(
            "  the apply lease is held by {holder} until {expires}: stop the instances \
serving it first, or pass --force to revoke it"
        ),
        None => {}
    }
    if !args.yes {
        bail!("nothing changed: run again with --yes to reset");
    }
    opened
        .checkpoints
        .reset(&schema, to, leases, true, args.force)
        .await?;
    println!("done; running sinks follow within a few seconds.");
    println!(
        "rows the sinks dropped as below the old checkpoint must be replayed: re-create the \
changefeed WITH cursor = '{to}'"
    );
    Ok(())
}

/// `hlc (wall time UTC[, ahead of the database clock])`.
fn describe(h: Hlc, now: Hlc) -> String {
    if h.is_zero() {
        return "none".into();
    }
    let ahead = if h > now {
        let secs = (h.nanos() - now.nanos()) / 1_000_000_000;
        format!(
            ", {} ahead of the database clock",
            crate::source::go_duration(Duration::from_secs(secs.max(0) as u64))
        )
    } else {
        String::new()
    };
    format!("{h} ({}{ahead})", wall_time(h))
}

/// `YYYY-MM-DD HH:MM:SS UTC` of an HLC's wall time.
fn wall_time(h: Hlc) -> String {
    let secs = h.nanos().div_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The inverse of [`crate::civil::days_from_civil`] (same March-based 400-year eras).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::civil::days_from_civil;

    #[test]
    fn reset_points_parse() {
        assert_eq!(
            ResetPoint::parse("now").unwrap(),
            ResetPoint::Ago(Duration::ZERO)
        );
        assert_eq!(
            ResetPoint::parse("now-1h").unwrap(),
            ResetPoint::Ago(Duration::from_secs(3600))
        );
        assert_eq!(
            ResetPoint::parse("1700000000000000000.0000000001").unwrap(),
            ResetPoint::At(Hlc::new(1_700_000_000_000_000_000, 1))
        );
        for bad in ["0.0", "yesterday", "now-1", "now+1h", ""] {
            assert!(ResetPoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wall_times_are_utc_calendar_dates() {
        for (y, m, d) in [(1970, 1, 1), (2000, 2, 29), (2023, 11, 14), (2262, 4, 11)] {
            assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
        }
        assert_eq!(
            wall_time(Hlc::new(1_700_000_000_000_000_000, 0)),
            "2023-11-14 22:13:20 UTC"
        );
        assert_eq!(
            wall_time(Hlc::new(i64::MAX, i32::MAX)),
            "2262-04-11 23:47:16 UTC"
        );
    }
}
