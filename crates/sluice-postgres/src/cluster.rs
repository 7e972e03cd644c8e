//! Throwaway PostgreSQL clusters for tests, benchmarks and the demo.
//!
//! A cluster is `initdb`ed into a temporary directory with `wal_level=logical` on a free
//! port. When the current user is root, the server runs as the `postgres` user (or
//! `nobody`), since Postgres refuses to run as root. A small shell supervisor owns the
//! server and reads commands from a pipe held by this process: when this process exits,
//! even by `kill -9`, the pipe closes and the supervisor stops the server and removes
//! its directory, so no cluster outlives the tests that made it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "sluice-test-superuser";

pub struct TempCluster {
    pub port: u16,
    dir: PathBuf,
    supervisor: Child,
    control: Option<ChildStdin>,
}

fn bin_dir() -> std::io::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().ok_or_else(|| std::io::Error::other("no PostgreSQL server found: install it (Debian: apt-get install postgresql-15)"))
}

pub(crate) fn run_as() -> Option<&'static str> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return None;
    }
    let has_postgres = Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success());
    Some(if has_postgres { "postgres" } else { "nobody" })
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn command(user: Option<&str>, program: &Path) -> Command {
    match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl TempCluster {
    /// Starts a new cluster; `extra_conf` lines are appended to `postgresql.conf`.
    pub fn start(extra_conf: &[&str]) -> std::io::Result<TempCluster> {
        let bin = bin_dir()?;
        let user = run_as();
        let dir = tempfile::Builder::new().prefix("sluice-pg-").tempdir()?.keep();
        let data = dir.join("data");
        std::fs::write(dir.join("pwfile"), SUPERUSER_PASSWORD)?;
        if let Some(u) = user {
            let ok = Command::new("chown").args(["-R", &format!("{u}:")]).arg(&dir).status()?.success();
            if !ok {
                return Err(std::io::Error::other(format!("could not chown {} to {u}", dir.display())));
            }
        }
        let out = command(user, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", dir.join("pwfile").display()))
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr))));
        }
        let port = free_port()?;
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf"))?;
        writeln!(
            conf,
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 32\nmax_wal_senders = 32\nmax_connections = 200\n\
             fsync = off\nfull_page_writes = off\nshared_buffers = 128MB\n\
             wal_sender_timeout = 30s\nlog_min_messages = warning\nlogging_collector = off",
            dir.display()
        )?;
        for line in extra_conf {
            writeln!(conf, "{line}")?;
        }
        drop(conf);
        // The supervisor: starts the server, obeys `stop`/`start` lines, and on end of
        // input (this process gone) stops the server and removes the directory.
        let script = r#"
            start() { "$BIN/postgres" -D "$DATA" >>"$DIR/server.log" 2>&1 & pid=$!; }
            stop() { if [ -n "$pid" ]; then kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=; fi; }
            start
            while read -r cmd; do
                case "$cmd" in
                    stop) stop; echo stopped >>"$DIR/control.log" ;;
                    start) start ;;
                    kill) kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid= ;;
                esac
            done
            stop
            rm -rf "$DIR"
        "#;
        let mut sup = command(user, Path::new("/bin/sh"));
        sup.args(["-c", script])
            .env("BIN", &bin)
            .env("DATA", &data)
            .env("DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut supervisor = sup.spawn()?;
        let control = supervisor.stdin.take().expect("piped stdin");
        let cluster = TempCluster { port, dir, supervisor, control: Some(control) };
        cluster.wait_ready(Duration::from_secs(60))?;
        Ok(cluster)
    }

    fn send(&mut self, cmd: &str) -> std::io::Result<()> {
        let control = self.control.as_mut().ok_or_else(|| std::io::Error::other("cluster closed"))?;
        writeln!(control, "{cmd}")?;
        control.flush()
    }

    /// Fast shutdown (SIGINT), then waits until the server is gone.
    pub fn stop(&mut self) -> std::io::Result<()> {
        let log = self.dir.join("control.log");
        let before = std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0);
        self.send("stop")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(&log).map(|s| s.lines().count()).unwrap_or(0) == before {
            if Instant::now() > deadline {
                return Err(std::io::Error::other("postgres did not stop within 60 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn start_again(&mut self) -> std::io::Result<()> {
        self.send("start")?;
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            // Ready means it accepts connections and has left recovery / startup.
            let ok = Command::new(bin_dir()?.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                return Err(std::io::Error::other(format!("postgres did not start: {log}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A libpq-style connection string for the superuser.
    pub fn dsn(&self, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname={dbname}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        // Closing the pipe makes the supervisor stop the server and clean up.
        drop(self.control.take());
        let _ = self.supervisor.wait();
    }
}

/// A superuser connection to a throwaway cluster on this machine.
/// TLS when the cluster offers it (`prefer`), so it also reaches a cluster that takes
/// only TLS connections; the server's own session defaults.
pub async fn superuser_client(port: u16, db: &str) -> crate::Result<tokio_postgres::Client> {
    let cfg = crate::PgConnConfig::new("127.0.0.1", port, SUPERUSER, SUPERUSER_PASSWORD.to_string().into(), db);
    crate::connect_as(&cfg, "a test cluster", "", "sluice-test").await
}
