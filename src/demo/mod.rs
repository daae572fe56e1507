//! The pieces of `cdc-sink demo`: the active-active kv schema for each region, the embedded
//! userscripts, replication-lag sampling, the summary, the child processes (sinks, HAProxy,
//! Prometheus) and their configurations. The command in `cli::demo` starts the clusters,
//! sinks, balancers, feeds and workloads around them.

pub(crate) mod balancer;
pub(crate) mod children;
pub(crate) mod monitor;

pub(crate) use children::{on_path, Children};

use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DemoError {
    #[error("{program} is not installed (not found on PATH nor in /usr/sbin); {hint}")]
    NotInstalled {
        program: &'static str,
        hint: &'static str,
    },
    #[error("could not start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("could not write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("could not make a self-signed certificate")]
    Certificate(#[source] rcgen::Error),
    #[error("{what} rejected the configuration {path}:\n{output}")]
    Rejected {
        what: &'static str,
        path: PathBuf,
        output: String,
    },
}

/// What to install when a program the demo needs is missing.
pub(crate) const HAPROXY_HINT: &str = "--sinks above 1 puts HAProxy in front of the sinks: \
install it (Debian/Ubuntu: `sudo apt-get install haproxy`; macOS: `brew install haproxy`) or \
run with --sinks 1";
pub(crate) const PROMETHEUS_HINT: &str = "--monitor runs a local Prometheus: install it \
(Debian/Ubuntu: `sudo apt-get install prometheus`, which provides the `prometheus` binary; \
macOS: `brew install prometheus`) or run without --monitor";

/// The two regions of the demo.
pub(crate) const REGIONS: [&str; 2] = ["east", "west"];

/// The userscripts the sinks run, shipped in `userscripts/` and embedded so the demo works
/// from any directory.
pub(crate) const SCRIPTS: [(&str, &str); 3] = [
    ("repl.ts", include_str!("../../userscripts/repl.ts")),
    (
        "east_west.ts",
        include_str!("../../userscripts/east_west.ts"),
    ),
    (
        "west_east.ts",
        include_str!("../../userscripts/west_east.ts"),
    ),
];

/// The script of the sink that writes into `region` (it receives the other region's feed).
pub(crate) fn script_for(region: &str) -> &'static str {
    if region == "west" {
        "east_west.ts"
    } else {
        "west_east.ts"
    }
}

/// The kv table of one region. PostgreSQL has no `ON UPDATE`: a trigger stamps `_source` and
/// `_timestamp` on local writes, and leaves them as replicated on writes from the sink, which
/// it recognises by the sink's `application_name`. East stamps even microseconds and west odd
/// ones: two writes of one key in the same microsecond would otherwise tie on `_timestamp`,
/// each side would refuse the other's row (compare-and-set needs strictly newer), and the
/// regions would stay apart (seen with lock-step workloads on this machine).
pub(crate) fn schema_sql(region: &str) -> String {
    let parity = if region == "east" { 0 } else { 1 };
    format!(
        "CREATE TABLE public.kv (
    k INT8 PRIMARY KEY,
    v BYTEA,
    _source TEXT NOT NULL DEFAULT '{region}',
    _timestamp TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp() + INTERVAL '1 second'
);
CREATE FUNCTION public.kv_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name', true) IS DISTINCT FROM 'cdc-sink' THEN
        NEW._source := '{region}';
        NEW._timestamp := clock_timestamp() + INTERVAL '1 second';
        IF extract(microseconds FROM NEW._timestamp)::INT8 % 2 <> {parity} THEN
            NEW._timestamp := NEW._timestamp + INTERVAL '1 microsecond';
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER kv_stamp BEFORE INSERT OR UPDATE ON public.kv
    FOR EACH ROW EXECUTE FUNCTION public.kv_stamp();
CREATE TABLE public.cdc_sink_dlq (
    event UUID DEFAULT gen_random_uuid() PRIMARY KEY,
    dlq_name TEXT NOT NULL,
    source_nanos INT8 NOT NULL,
    source_logical INT8 NOT NULL,
    data_after JSONB NOT NULL,
    data_before JSONB NOT NULL,
    dlq_time TIMESTAMPTZ NOT NULL DEFAULT now(),
    source_table TEXT
);"
    )
}

/// Percentile of `samples` (nearest rank); 0 when there are none.
pub(crate) fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// What the demo prints at the end (`--json`: one line with these keys).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Summary {
    pub(crate) east_rows: i64,
    pub(crate) west_rows: i64,
    pub(crate) divergent_rows: u64,
    pub(crate) dlq_rows_east: i64,
    pub(crate) dlq_rows_west: i64,
    pub(crate) east_writes: u64,
    pub(crate) west_writes: u64,
    pub(crate) rows_per_second: f64,
    pub(crate) lag_p50_seconds: f64,
    pub(crate) lag_p99_seconds: f64,
    pub(crate) converged: bool,
    pub(crate) seconds_to_converge: f64,
    /// Changefeed requests the sinks accepted on a verified token (0 with `--insecure`).
    pub(crate) token_requests: u64,
    /// Sink instances per direction.
    pub(crate) sinks_per_direction: usize,
    /// Requests the feeds sent that failed and were sent again (a sink or balancer answering
    /// an error, or no answer).
    pub(crate) feed_retries: u64,
    /// Batches the sinks acknowledged, both feeds together.
    pub(crate) feed_batches: u64,
    /// The sinks `--kill-one` killed.
    pub(crate) killed: Vec<Killed>,
    /// The Prometheus of `--monitor`.
    pub(crate) prometheus_url: Option<String>,
    /// Its targets' health when the demo checked them, after converging.
    pub(crate) prometheus_targets: Vec<monitor::TargetHealth>,
    /// Each sink as its balancer saw it at the summary (with `--sinks` above 1).
    pub(crate) balancer_servers: Vec<balancer::ServerStats>,
    /// Every child process of the demo that was running at the summary, with its pid.
    pub(crate) processes: Vec<(String, u32)>,
}

/// A sink `--kill-one` killed with SIGKILL.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Killed {
    pub(crate) sink: String,
    pub(crate) pid: u32,
    /// Seconds after the workloads started.
    pub(crate) at_seconds: f64,
    /// Whether it held its direction's apply lease when it was killed.
    pub(crate) held_lease: bool,
    /// Seconds until another sink held the lease, when one did before the summary.
    pub(crate) lease_taken_over_after_seconds: Option<f64>,
    /// The sink that took it.
    pub(crate) lease_taken_over_by: Option<String>,
}

impl Summary {
    pub(crate) fn text(&self) -> String {
        format!(
            "rows: east {} west {}\n\
divergent rows: {}{}\n\
dead-letter rows: east {} west {}\n\
workload writes: east {} west {} ({:.0} rows/s in all)\n\
replication lag: p50 {:.2}s p99 {:.2}s\n\
converged {:.1}s after the workloads stopped\n\
sinks per direction: {}; feed requests retried: {} (of {} batches acknowledged)\n",
            self.east_rows,
            self.west_rows,
            self.divergent_rows,
            if self.converged {
                " (in sync)"
            } else {
                " (NOT in sync)"
            },
            self.dlq_rows_east,
            self.dlq_rows_west,
            self.east_writes,
            self.west_writes,
            self.rows_per_second,
            self.lag_p50_seconds,
            self.lag_p99_seconds,
            self.seconds_to_converge,
            self.sinks_per_direction,
            self.feed_retries,
            self.feed_batches
        ) + &self.extras()
    }

    fn extras(&self) -> String {
        let mut out = String::new();
        for k in &self.killed {
            out += &format!(
                "killed {} (pid {}{}) at {:.1}s",
                k.sink,
                k.pid,
                if k.held_lease {
                    ", the lease holder"
                } else {
                    ""
                },
                k.at_seconds
            );
            match (k.lease_taken_over_after_seconds, &k.lease_taken_over_by) {
                (Some(s), Some(by)) => out += &format!("; {by} took the lease {s:.1}s later\n"),
                (Some(s), None) => out += &format!("; another sink took the lease {s:.1}s later\n"),
                _ => out += "\n",
            }
        }
        for b in &self.balancer_servers {
            out += &format!(
                "{} → {}: {}, {} requests, {} errors, {} moved to another sink\n",
                b.balancer, b.server, b.status, b.requests, b.errors, b.redispatched
            );
        }
        if let Some(url) = &self.prometheus_url {
            let up = self
                .prometheus_targets
                .iter()
                .filter(|t| t.health == "up")
                .count();
            out += &format!(
                "prometheus {url}: {up} of {} targets up\n",
                self.prometheus_targets.len()
            );
            for t in self.prometheus_targets.iter().filter(|t| t.health != "up") {
                out += &format!("  {} {} is {}\n", t.job, t.name, t.health);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 50.0);
        assert_eq!(percentile(&s, 99.0), 99.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn each_sink_runs_the_script_of_its_region() {
        assert_eq!(script_for("west"), "east_west.ts");
        assert!(SCRIPTS
            .iter()
            .any(|(n, s)| *n == "east_west.ts" && s.contains("replicateTo(\"west\"")));
        assert!(schema_sql("east").contains("NEW._source := 'east'"));
    }
}
