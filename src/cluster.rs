//! Throwaway PostgreSQL clusters for the demo, the benchmark and the tests: `initdb` once into a
//! template shared by every process, copied per cluster, started with `pg_ctl` on a free loopback
//! port.
//! As root, the server binaries run as the `postgres` user, as PostgreSQL insists.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("postgresql server binaries not found: install them (e.g. apt-get install postgresql) or set PG_BIN")]
    NoBinaries,
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error("i/o error in {0}")]
    Io(String, #[source] std::io::Error),
    #[error("user {0:?} not found; needed to run postgresql as root")]
    NoUser(String),
}

/// Options for a new cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// `fsync=off` makes tests fast; benchmarks keep it on.
    pub fsync: bool,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<(String, String)>,
}

/// A running throwaway cluster; stopped and removed on drop (kept when dropped by a panicking
/// thread, for the post-mortem of a failed test).
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
}

/// Finds the server binaries: `PG_BIN`, then `PATH`, then the newest `/usr/lib/postgresql/*/bin`.
pub(crate) fn find_binaries() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.exists() && dir.join("pg_ctl").exists() {
                // Follow a symlink to the real bin directory so `postgres` is found beside it.
                let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                return Ok(real.parent().map(Path::to_path_buf).unwrap_or(dir));
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or(ClusterError::NoBinaries)
}

fn postgres_owner() -> Result<Option<(u32, u32)>, ClusterError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| ClusterError::Io("/etc/passwd".into(), e))?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok(Some((uid, gid)));
            }
        }
    }
    Err(ClusterError::NoUser("postgres".into()))
}

fn run(cmd: &mut Command, what: &str) -> Result<Output, ClusterError> {
    let out = cmd.output().map_err(|e| ClusterError::Io(what.into(), e))?;
    if !out.status.success() {
        let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if msg.is_empty() {
            msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        return Err(ClusterError::Command(what.into(), msg));
    }
    Ok(out)
}

fn command(bin: &Path, prog: &str, owner: Option<(u32, u32)>) -> Command {
    let mut c = Command::new(bin.join(prog));
    if let Some((uid, gid)) = owner {
        c.uid(uid).gid(gid);
    }
    c.env("LC_ALL", "C").env("LANG", "C");
    c
}

fn chown_tree(path: &Path, owner: Option<(u32, u32)>) -> Result<(), ClusterError> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| ClusterError::Io(path.display().to_string(), e))?;
    if path.is_dir() {
        for e in
            std::fs::read_dir(path).map_err(|e| ClusterError::Io(path.display().to_string(), e))?
        {
            let e = e.map_err(|e| ClusterError::Io(path.display().to_string(), e))?;
            chown_tree(&e.path(), owner)?;
        }
    }
    Ok(())
}

fn unique_dir(prefix: &str) -> Result<PathBuf, ClusterError> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "cdc-sink-{prefix}-{}-{n}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| ClusterError::Io(dir.display().to_string(), e))?;
    Ok(dir)
}

/// The template data directory, made by one `initdb` and shared by every process using the same
/// server binaries and owner, so test runs do not leave a template behind each.
fn template(bin: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf, ClusterError> {
    static TEMPLATE: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let lock = TEMPLATE.get_or_init(|| Mutex::new(None));
    let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = guard.as_ref() {
        return Ok(p.clone());
    }
    let version = run(
        command(bin, "initdb", owner).arg("--version"),
        "initdb --version",
    )?;
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bin.hash(&mut h);
        version.stdout.hash(&mut h);
        owner.hash(&mut h);
        h.finish()
    };
    let shared = std::env::temp_dir().join(format!("cdc-sink-template-{key:016x}"));
    // The marker is written last, so a directory with it holds a complete initdb.
    let ready = |root: &Path| root.join("ready").exists();
    if !ready(&shared) {
        let root = unique_dir("template-build")?;
        chown_tree(&root, owner)?;
        run(
            command(bin, "initdb", owner)
                .arg("-D")
                .arg(root.join("data"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--locale=C",
                ]),
            "initdb",
        )?;
        std::fs::write(root.join("ready"), b"")
            .map_err(|e| ClusterError::Io(root.display().to_string(), e))?;
        // Another process may have won the race (or left an unfinished directory behind).
        if std::fs::rename(&root, &shared).is_err() {
            if !ready(&shared) {
                let _ = std::fs::remove_dir_all(&shared);
                std::fs::rename(&root, &shared)
                    .map_err(|e| ClusterError::Io(shared.display().to_string(), e))?;
            } else {
                let _ = std::fs::remove_dir_all(&root);
            }
        }
    }
    let data = shared.join("data");
    *guard = Some(data.clone());
    Ok(data)
}

impl Cluster {
    /// Starts a new cluster with default options (fsync off, logical decoding on).
    pub(crate) fn start() -> Result<Cluster, ClusterError> {
        Self::start_with(ClusterOptions::default())
    }

    pub fn start_with(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin = find_binaries()?;
        let owner = postgres_owner()?;
        let template = template(&bin, owner)?;
        let root = unique_dir("pg")?;
        let data = root.join("data");
        run(
            Command::new("cp").arg("-a").arg(&template).arg(&data),
            "copy template",
        )?;
        let mut conf = String::from("\n# cdc-sink throwaway cluster\n");
        conf.push_str("listen_addresses = '127.0.0.1'\n");
        conf.push_str(&format!("unix_socket_directories = '{}'\n", root.display()));
        conf.push_str(&format!(
            "fsync = {}\n",
            if opts.fsync { "on" } else { "off" }
        ));
        if !opts.fsync {
            conf.push_str("synchronous_commit = off\nfull_page_writes = off\n");
        }
        conf.push_str("wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n");
        conf.push_str(
            "max_connections = 300\nshared_buffers = 128MB\nlog_min_messages = warning\n",
        );
        for (k, v) in &opts.settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path)
            .map_err(|e| ClusterError::Io(conf_path.display().to_string(), e))?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)
            .map_err(|e| ClusterError::Io(conf_path.display().to_string(), e))?;
        chown_tree(&root, owner)?;
        let mut cluster = Cluster {
            bin,
            root,
            port: 0,
            owner,
        };
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let log = self.root.join("postgres.log");
        run(
            command(&self.bin, "pg_ctl", self.owner)
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .arg("-o")
                .arg(format!("-p {}", self.port))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        )
        .map(drop)
        .map_err(|e| match e {
            ClusterError::Command(w, m) => {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                ClusterError::Command(
                    w,
                    format!(
                        "{m}; log: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                )
            }
            other => other,
        })
    }

    /// Stops the server (fast shutdown); [`Cluster::restart`] brings it back on the same port.
    pub fn stop(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
    }

    /// Kills the server without a checkpoint, like a power cut.
    pub fn crash(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"])
    }

    pub fn restart(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    fn pg_ctl<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<(), ClusterError> {
        run(
            command(&self.bin, "pg_ctl", self.owner)
                .arg("-D")
                .arg(self.data())
                .args(args),
            "pg_ctl",
        )
        .map(drop)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Runs SQL through `psql` (for set-up outside an async context).
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let out = run(
            command(&self.bin, "psql", None)
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                ])
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-d")
                .arg(database)
                .arg("-c")
                .arg(sql),
            "psql",
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        if std::thread::panicking() {
            eprintln!("kept postgresql cluster at {}", self.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn free_port() -> Result<u16, ClusterError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ClusterError::Io("bind".into(), e))?;
    let port = l
        .local_addr()
        .map_err(|e| ClusterError::Io("bind".into(), e))?
        .port();
    Ok(port)
}
