//! The Prometheus of `demo --monitor`: its configuration (every sink's metrics listener, job
//! `cdc-sink`, and every HAProxy's exporter, job `haproxy`, labelled by `cluster` as the
//! compose demo's are) and what its HTTP API says about its targets.

use serde::Serialize;
use std::net::SocketAddr;

/// One endpoint Prometheus scrapes.
#[derive(Clone, Debug)]
pub(crate) struct ScrapeTarget {
    /// `cdc-sink` or `haproxy`.
    pub(crate) job: &'static str,
    pub(crate) cluster: String,
    /// The sink's or balancer's name, e.g. `east_sink_1`.
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
}

/// The configuration file's text. JSON is YAML, and needs no quoting rules of its own.
pub(crate) fn config(targets: &[ScrapeTarget]) -> String {
    let mut jobs: Vec<serde_json::Value> = Vec::new();
    for (job, path) in [("cdc-sink", "/_/varz"), ("haproxy", "/metrics")] {
        let statics: Vec<serde_json::Value> = targets
            .iter()
            .filter(|t| t.job == job)
            .map(|t| {
                serde_json::json!({
                    "targets": [t.addr.to_string()],
                    "labels": {"cluster": t.cluster, "name": t.name},
                })
            })
            .collect();
        if !statics.is_empty() {
            jobs.push(serde_json::json!({
                "job_name": job,
                "metrics_path": path,
                "static_configs": statics,
            }));
        }
    }
    let doc = serde_json::json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": jobs,
    });
    serde_json::to_string_pretty(&doc).expect("a json value serialises")
}

/// A target as `/api/v1/targets` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct TargetHealth {
    pub(crate) job: String,
    pub(crate) name: String,
    /// `up`, `down` or `unknown` (not scraped yet).
    pub(crate) health: String,
}

/// The active targets in an `/api/v1/targets` answer.
pub(crate) fn parse_targets(body: &str) -> Option<Vec<TargetHealth>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let active = v.get("data")?.get("activeTargets")?.as_array()?;
    let label = |t: &serde_json::Value, k: &str| {
        t.get("labels")
            .and_then(|l| l.get(k))
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_string()
    };
    Some(
        active
            .iter()
            .map(|t| TargetHealth {
                job: label(t, "job"),
                name: label(t, "name"),
                health: t
                    .get("health")
                    .and_then(|h| h.as_str())
                    .unwrap_or("")
                    .to_string(),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_scraped_with_its_job_path_and_labels() {
        let t = |job, name: &str, port: u16| ScrapeTarget {
            job,
            cluster: "east".into(),
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let text = config(&[
            t("cdc-sink", "east_sink_1", 1001),
            t("cdc-sink", "east_sink_2", 1002),
            t("haproxy", "east_lb", 1003),
        ]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let jobs = v["scrape_configs"].as_array().unwrap();
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0]["job_name"], "cdc-sink");
        assert_eq!(jobs[0]["metrics_path"], "/_/varz");
        assert_eq!(jobs[0]["static_configs"].as_array().unwrap().len(), 2);
        assert_eq!(jobs[0]["static_configs"][1]["targets"][0], "127.0.0.1:1002");
        assert_eq!(
            jobs[0]["static_configs"][1]["labels"]["name"],
            "east_sink_2"
        );
        assert_eq!(jobs[1]["metrics_path"], "/metrics");
    }

    #[test]
    fn target_health_is_read_from_the_api_answer() {
        let body = r#"{"status":"success","data":{"activeTargets":[
            {"labels":{"job":"cdc-sink","name":"east_sink_1"},"health":"up"},
            {"labels":{"job":"haproxy","name":"east_lb"},"health":"down"}],"droppedTargets":[]}}"#;
        let t = parse_targets(body).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].health, "up");
        assert_eq!(t[1].job, "haproxy");
        assert!(parse_targets("not json").is_none());
    }

    /// promtool accepts what we generate, when it is installed (CI installs Prometheus).
    #[test]
    fn promtool_accepts_the_generated_config() {
        let Some(promtool) = super::super::on_path("promtool") else {
            eprintln!("promtool is not installed; skipped");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prometheus.yml");
        let target = ScrapeTarget {
            job: "cdc-sink",
            cluster: "west".into(),
            name: "west_sink_1".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 9)),
        };
        std::fs::write(&path, config(&[target])).unwrap();
        let out = std::process::Command::new(promtool)
            .args(["check", "config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
