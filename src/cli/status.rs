//! `cdc-sink status --url …`: an instance's `/_/status` report as a table.

use crate::server::client::{Client, ClientOptions};
use anyhow::{bail, Context};
use serde_json::Value;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Base URL of the instance's diagnostics: its `--metricsAddr` when set
    /// (`http://host:port`), else its main address.
    #[arg(long = "url")]
    pub(crate) url: String,
    /// Accept any server certificate (a self-signed main port).
    #[arg(long = "insecureSkipVerify")]
    pub(crate) insecure_skip_verify: bool,
    /// Print the JSON as served.
    #[arg(long = "json")]
    pub(crate) json: bool,
}

pub(crate) async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(
        &args.url,
        ClientOptions {
            insecure_skip_verify: args.insecure_skip_verify,
            ..Default::default()
        },
    )
    .context("--url")?;
    let (status, body) = client
        .get("/_/status")
        .await
        .with_context(|| format!("fetching {}/_/status", args.url))?;
    if !status.is_success() {
        bail!("{}: {}", status.as_u16(), body.trim());
    }
    let report: Value = serde_json::from_str(&body).context("the status is not JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}s"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The report as text: the instance, then one line per schema.
pub fn render(report: &Value) -> String {
    let i = &report["instance"];
    let mut out = format!(
        "instance {} version {} up {}s userscript {}\n",
        text(&i["id"]),
        text(&i["version"]),
        text(&i["uptime_seconds"]),
        text(&i["userscript"]),
    );
    let rows: Vec<[String; 11]> = report["schemas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let lease = &s["lease"];
            let holder = match lease["held"].as_bool() {
                Some(true) => text(&lease["holder"]),
                Some(false) => format!("(expired) {}", text(&lease["holder"])),
                None => "-".into(),
            };
            [
                text(&s["schema"]),
                text(&s["mode"]),
                text(&s["committed"]),
                text(&s["proposed"]),
                text(&s["target_lag_seconds"]),
                text(&s["source_lag_seconds"]),
                text(&s["staged_backlog_rows"]),
                holder,
                text(&lease["since"]),
                text(&lease["expires"]),
                text(&s["dlq_rows"]),
            ]
        })
        .collect();
    let header = [
        "SCHEMA",
        "MODE",
        "COMMITTED",
        "PROPOSED",
        "TARGET LAG",
        "SOURCE LAG",
        "BACKLOG",
        "LEASE HOLDER",
        "LEASE SINCE",
        "LEASE EXPIRES",
        "DLQ",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    out.push_str(&line(header.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        out.push_str("(no schemas with checkpoints)\n");
    }
    for s in report["schemas"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let b = &s["blocked"];
        if b.is_null() {
            continue;
        }
        let poison = if b["table"].is_null() {
            "no single mutation found".to_string()
        } else {
            format!(
                "poison {} key {} at {}",
                text(&b["table"]),
                text(&b["key"]),
                text(&b["time"])
            )
        };
        out.push_str(&format!(
            "{} blocked: {poison}; next retry at unix {}: {}\n",
            text(&s["schema"]),
            text(&b["next_retry_unix"]),
            text(&b["error"])
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_a_line_per_schema_and_marks_an_expired_lease() {
        let report = json!({
            "instance": {"id": "h:1", "version": "0.1.0", "uptime_seconds": 5, "userscript": false},
            "schemas": [{
                "schema": "kv.public", "mode": "consistent", "committed": "10.0000000000",
                "proposed": "12.0000000000", "target_lag_seconds": 2.25,
                "source_lag_seconds": 0.5, "staged_backlog_rows": 3,
                "lease": {"holder": "h:1", "since": "2025-12-31", "expires": "2026-01-01",
                    "held": false},
                "dlq_rows": null,
                "blocked": {"table": "kv.public.kv", "key": "[1]", "time": "1.0000000000",
                    "error": "refused", "next_retry_unix": 100}
            }]
        });
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "instance h:1 version 0.1.0 up 5s userscript false"
        );
        assert!(lines[1].starts_with("SCHEMA     MODE"), "{text}");
        assert!(lines[2].starts_with("kv.public  consistent"), "{text}");
        for cell in [
            "2.2s",
            "0.5s",
            " 3 ",
            "(expired) h:1",
            "2025-12-31",
            "2026-01-01",
        ] {
            assert!(lines[2].contains(cell), "{cell} missing: {text}");
        }
        assert!(lines[2].ends_with('-'), "{text}");
        assert_eq!(
            lines[3],
            "kv.public blocked: poison kv.public.kv key [1] at 1.0000000000; next retry at unix 100: refused"
        );
    }
}
