//! The userscript's `dispatch` throughput (`cdc-sink userscript bench`, and a line of the
//! `cdc-sink bench` report), and the userscript the benchmarks run.

use crate::hlc::Hlc;
use crate::ident::{Schema, Table};
use crate::mutation::Mutation;
use crate::script::{schema_from_specs, ScriptError, Userscript};
use std::time::Instant;

/// The userscript both benchmarks run, on source `userscript.public`: the active-active logic
/// (a dispatch that drops documents whose `_source` is `bench`, compare-and-set on `ts`, and a
/// standard merge that sends what it cannot merge to the dead-letter queue). `cdc-sink bench`
/// runs all of it in the sink; [`bench_dispatch`] times its `dispatch` alone.
pub const USERSCRIPT: &str = r#"import * as api from "cdc-sink@v1";
api.configureSource("userscript.public", {
  dispatch: (doc, meta) => {
    const ret = {};
    if (doc._source !== "bench") { ret[meta.table] = [doc]; }
    return ret;
  },
  deletesTo: "",
});
api.configureTable("kv", { cas: ["ts"], merge: api.standardMerge(() => ({ dlq: "kv" })) });
"#;

/// What [`bench_dispatch`] measured, in documents per second.
#[derive(Clone, Copy, Debug, Default)]
pub struct DispatchRate {
    /// Per second of the engine thread's own CPU time: what one JS thread does, unaffected by
    /// whatever else shares the cores.
    pub per_thread: f64,
    /// Per second of the whole exchange, the caller's side (batching, hops, dropping results)
    /// included: the smaller of wall and process CPU time.
    pub with_caller: f64,
}

/// Dispatch throughput of one engine thread: `rows` five-field documents through the
/// active-active filter, in batches of 1,000.
pub async fn bench_dispatch(rows: usize) -> Result<DispatchRate, ScriptError> {
    let dir = std::env::temp_dir().join(format!(
        "cdc-sink-bench-{}-{}",
        std::process::id(),
        Hlc::from_system_time(std::time::SystemTime::now()).nanos()
    ));
    let io = |e: std::io::Error| ScriptError::Read {
        file: dir.display().to_string(),
        error: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let file = dir.join("bench.ts");
    std::fs::write(&file, USERSCRIPT).map_err(io)?;
    let loaded = Userscript::load(&file, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    let script = loaded?;
    let schema = Schema::new("userscript", "public");
    let info = schema_from_specs(
        &schema,
        &["kv=k:INT8:pk,v:TEXT,n:INT8,_source:TEXT,_timestamp:TIMESTAMPTZ".to_string()],
    )?;
    let table = Table::new(schema.clone(), "kv");
    let muts: Vec<(Table, Mutation)> = (0..rows.max(1))
        .map(|i| {
            let after = format!(
                r#"{{"k":{i},"v":"value-{i}","n":{},"_source":"{}","_timestamp":"2024-02-23T23:39:22.135792Z"}}"#,
                i * 7,
                if i % 10 == 0 { "bench" } else { "east" }
            );
            (
                table.clone(),
                Mutation {
                    time: Hlc::new(1_700_000_000_000_000_000 + i as i64, 0),
                    key: format!("[{i}]"),
                    after: Some(after),
                    before: None,
                },
            )
        })
        .collect();
    // Warm the engine (first calls compile and allocate).
    script
        .dispatch(&schema, &info, muts.iter().take(1000).cloned().collect())
        .await?;
    let start = Instant::now();
    let cpu = cpu_seconds();
    let engine = script.engine_cpu();
    let mut it = muts.into_iter().peekable();
    while it.peek().is_some() {
        let batch: Vec<_> = it.by_ref().take(1000).collect();
        script.dispatch(&schema, &info, batch).await?;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    let engine = (script.engine_cpu() - engine).as_secs_f64();
    let n = rows.max(1) as f64;
    Ok(DispatchRate {
        per_thread: n / engine.max(f64::EPSILON),
        // Other processes competing for the cores stretch wall time, not CPU time.
        with_caller: n / wall.min(cpu.max(f64::EPSILON)),
    })
}

/// User and system CPU time of the whole process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dispatch_runs_at_speed() {
        // A smoke check of the benchmark; the figure itself is measured in release builds.
        let rate = bench_dispatch(5_000).await.unwrap();
        assert!(rate.per_thread > 1_000.0, "{rate:?}");
        assert!(rate.with_caller > 1_000.0, "{rate:?}");
        assert!(rate.per_thread >= rate.with_caller * 0.9, "{rate:?}");
    }
}
