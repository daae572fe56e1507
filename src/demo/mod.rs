//! The pieces of `cdc-sink demo`: the active-active kv schema for each region, the embedded
//! userscripts, replication-lag sampling and the summary. The command in `cli::demo` starts
//! the clusters, sinks, feeds and workloads around them.

use serde::Serialize;

/// The two regions of the demo.
pub const REGIONS: [&str; 2] = ["east", "west"];

/// The userscripts the sinks run, shipped in `userscripts/` and embedded so the demo works
/// from any directory.
pub const SCRIPTS: [(&str, &str); 3] = [
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
pub fn script_for(region: &str) -> &'static str {
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
pub fn schema_sql(region: &str) -> String {
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
pub fn percentile(samples: &[f64], p: f64) -> f64 {
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
pub struct Summary {
    pub east_rows: i64,
    pub west_rows: i64,
    pub divergent_rows: u64,
    pub dlq_rows_east: i64,
    pub dlq_rows_west: i64,
    pub east_writes: u64,
    pub west_writes: u64,
    pub rows_per_second: f64,
    pub lag_p50_seconds: f64,
    pub lag_p99_seconds: f64,
    pub converged: bool,
    pub seconds_to_converge: f64,
    /// Changefeed requests the sinks accepted on a verified token (0 with `--insecure`).
    pub token_requests: u64,
}

impl Summary {
    pub fn text(&self) -> String {
        format!(
            "rows: east {} west {}\n\
divergent rows: {}{}\n\
dead-letter rows: east {} west {}\n\
workload writes: east {} west {} ({:.0} rows/s in all)\n\
replication lag: p50 {:.2}s p99 {:.2}s\n\
converged {:.1}s after the workloads stopped\n",
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
            self.seconds_to_converge
        )
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
