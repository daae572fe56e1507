//! `cdc-sink demo` end to end: two clusters, two sinks with the active-active userscript, two
//! changefeed emulators and conflicting workloads converge.

use std::process::Command;

fn run_demo(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "demo",
        "--duration",
        "4s",
        "--rate",
        "40",
        "--json",
        "--converge-timeout",
        "60s",
    ];
    args.extend_from_slice(extra);
    crate::support::process::run_json(&args)
}

fn check(s: &serde_json::Value) {
    assert_eq!(s["converged"], true, "{s}");
    assert_eq!(s["divergent_rows"], 0, "{s}");
    assert_eq!(s["east_rows"], s["west_rows"], "{s}");
    assert!(
        s["east_writes"].as_u64().unwrap() > 0 && s["west_writes"].as_u64().unwrap() > 0,
        "{s}"
    );
    // Both sides wrote the same keys at the same time: conflicts happened, and each key left
    // at most one losing version in a dead-letter queue.
    let dlq = s["dlq_rows_east"].as_u64().unwrap() + s["dlq_rows_west"].as_u64().unwrap();
    assert!(dlq > 0 && dlq <= s["east_rows"].as_u64().unwrap(), "{s}");
    // The feeds authenticated: the sinks accepted their tokens.
    assert!(s["token_requests"].as_u64().unwrap() > 0, "{s}");
    for key in ["rows_per_second", "lag_p50_seconds", "lag_p99_seconds"] {
        assert!(s[key].as_f64().is_some(), "{key} in {s}");
    }
}

#[test]
fn the_demo_converges_under_conflicting_workloads() {
    check(&run_demo(&[]));
}

#[test]
fn the_demo_converges_with_chaotic_feeds() {
    check(&run_demo(&["--chaos", "0.3"]));
}

/// True while a process with this pid exists.
fn alive(pid: u64) -> bool {
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Every child the summary lists (sinks, balancers, Prometheus) is gone.
fn check_children_gone(s: &serde_json::Value) {
    for p in s["processes"].as_array().expect("processes") {
        let pid = p[1].as_u64().expect("pid");
        assert!(
            !alive(pid),
            "{} (pid {pid}) still runs after the demo",
            p[0]
        );
    }
}

#[test]
fn the_demo_converges_with_one_sink_of_each_direction_killed() {
    let s = run_demo(&["--sinks", "2", "--kill-one", "--duration", "6s"]);
    check(&s);
    assert_eq!(s["sinks_per_direction"], 2, "{s}");
    let killed = s["killed"].as_array().expect("killed");
    assert_eq!(killed.len(), 2, "one sink of each direction: {s}");
    let names: Vec<&str> = killed.iter().map(|k| k["sink"].as_str().unwrap()).collect();
    assert!(names[0].starts_with("east_sink_"), "{s}");
    assert!(names[1].starts_with("west_sink_"), "{s}");
    for k in killed {
        assert!(!alive(k["pid"].as_u64().unwrap()), "{k}");
        // The killed sink held its direction's lease, which went to the surviving sink.
        assert_eq!(k["held_lease"], true, "{k}");
        assert!(
            k["lease_taken_over_after_seconds"].as_f64().is_some(),
            "{k}"
        );
        let dead = k["sink"].as_str().unwrap();
        let by = k["lease_taken_over_by"].as_str();
        let by = by.unwrap_or_else(|| panic!("no new holder named: {k}"));
        assert!(by != dead && by[..4] == dead[..4], "{k}");
    }
    // The summary lists what still ran: the surviving sink of each direction and both
    // balancers, none of them left behind.
    let running: Vec<&str> = s["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(running.len(), 4, "{s}");
    assert!(
        running.contains(&"east_lb") && running.contains(&"west_lb"),
        "{s}"
    );
    // HAProxy balanced requests over both sinks of each direction, then stopped routing to
    // the killed one once its checks failed.
    let servers = s["balancer_servers"].as_array().expect("balancer_servers");
    assert_eq!(servers.len(), 4, "{s}");
    for b in servers {
        let status = b["status"].as_str().unwrap();
        let was_killed = names.contains(&b["server"].as_str().unwrap());
        assert_eq!(status.starts_with("DOWN"), was_killed, "{b}");
        assert!(b["requests"].as_u64().unwrap() > 0, "{b}");
    }
    assert!(s["feed_batches"].as_u64().unwrap() > 0, "{s}");
    assert!(s["feed_retries"].as_u64().is_some(), "{s}");
    check_children_gone(&s);
}

/// `--monitor --keep`: while the demo runs, its Prometheus has every sink and both HAProxys up
/// and serves the sinks' metrics; Ctrl-C (SIGINT) stops Prometheus, HAProxy and the sinks.
#[tokio::test]
async fn the_monitor_scrapes_every_sink_and_balancer_until_ctrl_c() {
    use cdc_sink::server::client::{Client, ClientOptions};
    use std::io::BufRead;
    use std::process::Stdio;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["demo", "--sinks", "2", "--monitor", "--keep", "--json"])
        .args([
            "--duration",
            "3s",
            "--rate",
            "40",
            "--converge-timeout",
            "60s",
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run cdc-sink demo");
    // Should the test fail while the demo runs with `--keep`, Ctrl-C it: it then stops its
    // sinks, balancers and Prometheus instead of leaving them running.
    struct Interrupt(u32);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            if std::thread::panicking() {
                // SAFETY: kill(2) on our child's pid.
                unsafe {
                    libc::kill(self.0 as libc::pid_t, libc::SIGINT);
                }
            }
        }
    }
    let _interrupt = Interrupt(demo.id());
    let stdout = demo.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with('{'))
    })
    .await
    .unwrap();
    let tail = || std::fs::read_to_string(&log).unwrap_or_default();
    let Some(line) = line else {
        let _ = demo.kill();
        panic!("no summary from the demo: {}", tail());
    };
    let s: serde_json::Value = serde_json::from_str(&line).expect("json summary");
    assert_eq!(s["converged"], true, "{s}");
    // Each request is balanced on its own: both sinks of a direction got some.
    let servers = s["balancer_servers"].as_array().expect("balancer_servers");
    assert_eq!(servers.len(), 4, "{s}");
    for b in servers {
        assert_eq!(b["status"], "UP", "{b}");
        assert!(b["requests"].as_u64().unwrap() > 0, "{b}");
    }
    let url = s["prometheus_url"]
        .as_str()
        .expect("prometheus_url")
        .to_string();
    let api = Client::new(
        &url,
        ClientOptions {
            http2: false,
            ..Default::default()
        },
    )
    .unwrap();
    let query = |q: &'static str| {
        let api = api.clone();
        async move {
            let (status, body) = api.get(q).await.ok()?;
            (status == http::StatusCode::OK).then_some(())?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["data"]["result"].as_array().cloned()
        }
    };
    // Four sinks and two balancers, every one up.
    let up = crate::support::eventually("every target up", Duration::from_secs(30), || async {
        let r = query("/api/v1/query?query=up").await?;
        (r.len() == 6 && r.iter().all(|m| m["value"][1] == "1")).then_some(r)
    })
    .await;
    let jobs = |job: &str| up.iter().filter(|m| m["metric"]["job"] == job).count();
    assert_eq!((jobs("cdc-sink"), jobs("haproxy")), (4, 2), "{up:?}");
    // The sinks' own metrics arrive, and HAProxy's exporter counts the requests it balanced.
    crate::support::eventually(
        "token requests in prometheus",
        Duration::from_secs(15),
        || async {
            let r = query("/api/v1/query?query=sum(auth_requests_total%7Breason%3D%22token%22%7D)")
                .await?;
            let v: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
            (v > 0.0).then_some(())
        },
    )
    .await;
    crate::support::eventually(
        "haproxy requests in prometheus",
        Duration::from_secs(15),
        || async {
            let r = query("/api/v1/query?query=sum(haproxy_backend_http_requests_total)").await?;
            let v: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
            (v > 0.0).then_some(())
        },
    )
    .await;

    // The dashboard lights up on the demo: every cdc-sink panel query, and the reference
    // dashboards' reads, answer with a series.
    crate::deploy::every_panel_query_answers(&api).await;

    assert_eq!(
        unsafe { libc::kill(demo.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let status = crate::support::eventually("the demo to exit", Duration::from_secs(60), || {
        let got = demo.try_wait().unwrap();
        async move { got }
    })
    .await;
    assert!(status.success(), "{status}: {}", tail());
    check_children_gone(&s);
    assert!(
        api.get("/-/ready").await.is_err(),
        "prometheus still answers"
    );
}

/// A failure half way (here a Prometheus that will not start, after the sinks and balancers
/// have) stops every child the demo started and says why, keeping their logs.
#[test]
fn a_failed_start_stops_the_sinks_and_balancers_it_started() {
    use std::os::unix::fs::PermissionsExt;
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("prometheus");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake prometheus refuses to start' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args(["demo", "--sinks", "2", "--monitor", "--json"])
        .env("PATH", path)
        .output()
        .expect("run cdc-sink demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("prometheus exited") && stderr.contains("fake prometheus refuses"),
        "{stderr}"
    );
    let dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("logs of the sinks and balancers are kept in "))
        .expect("the kept log directory")
        .trim()
        .to_string();
    // The sinks ran with their userscript from that directory and HAProxy with its config
    // there: no process may still name it.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&dir))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
    assert!(std::path::Path::new(&dir).join("east_sink_1.log").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
