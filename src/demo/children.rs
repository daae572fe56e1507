//! The demo's child processes (sinks, HAProxy, Prometheus). Each logs to a file in the demo's
//! directory and runs in its own process group, so a terminal's Ctrl-C reaches the demo alone,
//! which stops them in order; the kernel sends each a SIGTERM should the demo die without
//! stopping them.

use super::DemoError;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

struct Child {
    name: String,
    pid: u32,
    process: tokio::process::Child,
}

/// The running children, by name.
pub(crate) struct Children {
    dir: PathBuf,
    running: Mutex<Vec<Child>>,
}

impl Children {
    /// Children whose logs go to `dir/NAME.log`.
    pub(crate) fn new(dir: &Path) -> Children {
        Children {
            dir: dir.to_path_buf(),
            running: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts `program` as child `name`; its stdout and stderr go to its log file.
    pub(crate) fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> Result<u32, DemoError> {
        let log = std::fs::File::create(self.log_path(name))
            .map_err(|e| DemoError::Write(self.log_path(name), e))?;
        let err_log = log
            .try_clone()
            .map_err(|e| DemoError::Write(self.log_path(name), e))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = cmd
            .spawn()
            .map_err(|e| DemoError::Spawn(program.display().to_string(), e))?;
        let pid = process.id().unwrap_or(0);
        tracing::debug!(child = name, pid, "started");
        self.running.lock().expect("poisoned").push(Child {
            name: name.to_string(),
            pid,
            process,
        });
        Ok(pid)
    }

    /// How child `name` ended, once it has (`None` while it runs or when it is unknown).
    pub(crate) fn exited(&self, name: &str) -> Option<String> {
        let mut running = self.running.lock().expect("poisoned");
        let child = running.iter_mut().find(|c| c.name == name)?;
        match child.process.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The last lines of child `name`'s log, for an error message.
    pub(crate) fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        let running = self.running.lock().expect("poisoned");
        running.iter().find(|c| c.name == name).map(|c| c.pid)
    }

    /// Every running child's name and pid, in start order.
    pub(crate) fn pids(&self) -> Vec<(String, u32)> {
        let running = self.running.lock().expect("poisoned");
        running.iter().map(|c| (c.name.clone(), c.pid)).collect()
    }

    /// SIGKILL to child `name`, which is then reaped and forgotten; its pid.
    pub(crate) async fn kill9(&self, name: &str) -> Option<u32> {
        let mut child = {
            let mut running = self.running.lock().expect("poisoned");
            let i = running.iter().position(|c| c.name == name)?;
            running.remove(i)
        };
        let _ = child.process.start_kill();
        let _ = child.process.wait().await;
        tracing::debug!(child = name, pid = child.pid, "killed");
        Some(child.pid)
    }

    /// SIGTERM to every child, then SIGKILL to those still running after `within`.
    pub(crate) async fn stop_all(&self, within: Duration) {
        let children: Vec<Child> = std::mem::take(&mut *self.running.lock().expect("poisoned"));
        for c in &children {
            // SAFETY: kill(2) on the pid of a child not yet reaped, so not reused.
            unsafe {
                libc::kill(c.pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + within;
        for mut c in children {
            if tokio::time::timeout_at(deadline, c.process.wait())
                .await
                .is_err()
            {
                tracing::warn!(child = %c.name, pid = c.pid, "did not stop on SIGTERM; killing");
                let _ = c.process.start_kill();
                let _ = c.process.wait().await;
            }
        }
    }
}

/// The first `program` on `PATH`, else in the sbin directories: Debian installs HAProxy in
/// `/usr/sbin`, which an unprivileged user's `PATH` usually lacks.
pub(crate) fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = path.to_str().unwrap_or("");
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/local/sbin", "/usr/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn children_are_killed_and_stopped_and_their_logs_kept() {
        let dir = tempfile::tempdir().unwrap();
        let children = Children::new(dir.path());
        let sh = on_path("sh").expect("sh");
        let script = |s: &str| vec!["-c".to_string(), s.to_string()];
        children
            .spawn("a", &sh, &script("echo hello; exec sleep 60"))
            .unwrap();
        children.spawn("b", &sh, &script("exec sleep 60")).unwrap();
        let b = children.pid("b").unwrap();
        let a = children.pid("a").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !children.log_tail("a").contains("hello") {
            assert!(std::time::Instant::now() < deadline, "no log from a");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(children.exited("a").is_none());
        assert_eq!(children.kill9("a").await, Some(a));
        assert!(children.pid("a").is_none());
        assert!(
            children.log_tail("a").contains("hello"),
            "the log outlives the child"
        );
        children.stop_all(Duration::from_secs(5)).await;
        assert!(children.pids().is_empty());
        // The pid is reaped: signalling it fails.
        assert_ne!(unsafe { libc::kill(b as libc::pid_t, 0) }, 0);
    }
}
