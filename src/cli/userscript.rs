//! `cdc-sink userscript`: print the API, check a script, dry-run it on a webhook payload.

use crate::ident::Schema;
use crate::script::{self, Userscript};
use crate::source::webhook::{self, DecodeLimits, Payload, PrimaryKeys};
use anyhow::{bail, Context};
use clap::CommandFactory;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UserscriptArgs {
    /// Print the TypeScript declarations of the `cdc-sink@v1` module.
    #[arg(long = "api")]
    pub(crate) api: bool,
    #[command(subcommand)]
    pub(crate) command: Option<UserscriptCommand>,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum UserscriptCommand {
    /// Load a script and print what it configures.
    Check {
        /// The script (.ts or .js).
        file: PathBuf,
    },
    /// Dry-run a script's dispatch and map on a webhook payload (no database).
    Run {
        file: PathBuf,
        /// A webhook request body (`{"payload":[…]}`).
        #[arg(long = "payload")]
        payload: PathBuf,
        /// The source, `db.schema` (defaults to the only configured source).
        #[arg(long = "source")]
        source: Option<String>,
        /// Target tables: `db.schema.table=col:TYPE[:pk],…`, repeatable.
        #[arg(long = "table-columns")]
        table_columns: Vec<String>,
    },
    /// Measure dispatch throughput of one engine thread.
    #[command(hide = true)]
    Bench {
        #[arg(long = "rows", default_value_t = 200_000)]
        rows: usize,
    },
}

pub(crate) fn run(args: UserscriptArgs) -> anyhow::Result<()> {
    if args.api {
        print!("{}", script::API_DTS);
        return Ok(());
    }
    let flags = crate::sink::start_flags();
    let flags: Vec<&str> = flags.iter().map(|(n, _)| n.as_str()).collect();
    match args.command {
        None => {
            let mut cmd = super::Cli::command();
            cmd.build();
            if let Some(sub) = cmd.find_subcommand_mut("userscript") {
                sub.print_help()?;
            }
            Ok(())
        }
        Some(UserscriptCommand::Check { file }) => {
            let s = Userscript::load(&file, &flags)?;
            print!("{}", s.captured().describe());
            Ok(())
        }
        Some(UserscriptCommand::Run {
            file,
            payload,
            source,
            table_columns,
        }) => {
            let s = Userscript::load(&file, &flags)?;
            let rt = super::runtime()?;
            rt.block_on(dry_run(&s, &payload, source, &table_columns))
        }
        Some(UserscriptCommand::Bench { rows }) => {
            let rt = super::runtime()?;
            let rate = rt.block_on(crate::bench::bench_dispatch(rows))?;
            println!(
                "dispatch: {:.0} docs/s per engine thread (its CPU time), {:.0} docs/s with the caller's side ({rows} rows)",
                rate.per_thread, rate.with_caller
            );
            Ok(())
        }
    }
}

struct Keys<'a>(&'a crate::apply::SchemaInfo);

impl PrimaryKeys for Keys<'_> {
    fn primary_key(&self, table: &crate::ident::Table) -> Option<Vec<crate::ident::Ident>> {
        self.0
            .tables
            .get(table)
            .map(|t| t.primary_key().map(|c| c.name.clone()).collect())
    }
}

async fn dry_run(
    s: &Userscript,
    payload: &std::path::Path,
    source: Option<String>,
    specs: &[String],
) -> anyhow::Result<()> {
    let source = match source {
        Some(x) => x,
        None => {
            let srcs: Vec<&String> = s.captured().sources.values().map(|o| &o.name).collect();
            match srcs.as_slice() {
                [one] => (*one).clone(),
                _ => bail!(
                    "pass --source db.schema (the script configures {} sources)",
                    srcs.len()
                ),
            }
        }
    };
    let schema = Schema::parse(&source).with_context(|| format!("--source {source}"))?;
    let info = script::schema_from_specs(&schema, specs)?;
    let body = std::fs::read(payload).with_context(|| format!("reading {}", payload.display()))?;
    let route = webhook::parse_path(&format!("/{}/{}", schema.db.raw(), schema.schema.raw()))?;
    let decoded = webhook::decode(
        &route,
        &body,
        &Keys(&info),
        &DecodeLimits {
            ndjson_line_bytes: 1 << 20,
        },
    )?;
    let muts = match decoded {
        Payload::Mutations(m) => m,
        Payload::Resolved(ts) => {
            println!("resolved {ts}");
            return Ok(());
        }
        Payload::Empty => {
            println!("empty payload");
            return Ok(());
        }
    };
    let received = muts.len();
    let routed = s.dispatch(&schema, &info, muts).await?;
    println!("dispatch: {received} rows in, {} out", routed.len());
    let grouped = crate::mutation::group_by_table(routed);
    for (table, muts) in grouped {
        let n = muts.len();
        let mapped = if s.has_map(&table) {
            let m = s.map(&table, &info, muts).await?;
            println!("map {table}: {n} rows in, {} out", m.len());
            m
        } else {
            muts
        };
        for m in mapped {
            match &m.after {
                Some(a) => println!("{table} upsert {} {a}", m.key),
                None => println!("{table} delete {}", m.key),
            }
        }
        if s.has_apply(&table) {
            println!("{table}: rows are written by the script's apply callback");
        }
    }
    Ok(())
}
