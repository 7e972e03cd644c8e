//! Child processes of the benches: the sluice binary beside the bench, JVM peers whose
//! jars come from Maven Central into a cache outside the clone, and what each costs
//! (CPU seconds, peak RSS) read from `/proc` while it still runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context as _, Result, bail};

/// The sluice binary built beside the bench.
pub fn sluice_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("sluice");
    if !bin.exists() {
        bail!("no sluice binary beside the bench at {}: cargo build --release -p sluice", bin.display());
    }
    Ok(bin)
}

/// The runtime jars of `pom` (a `pom`-packaged project under `bench/`), fetched once by
/// `mvn dependency:copy-dependencies` into `/var/cache/sluice/<name>`; `marker` is a jar
/// whose presence says the copy is complete.
pub fn maven_libs(name: &str, pom: &Path, marker: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(format!("/var/cache/sluice/{name}"));
    if dir.join(marker).exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("fetching {name} from Maven Central into {}", dir.display());
    let st = Command::new("mvn")
        .args(["-q", "-B", "-f"])
        .arg(pom)
        .args(["dependency:copy-dependencies", "-DincludeScope=runtime"])
        .arg(format!("-DoutputDirectory={}", tmp.display()))
        .status()
        .context("run mvn (install Maven)")?;
    if !st.success() {
        bail!("mvn could not fetch the dependencies of {}", pom.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// The `java` to run peers with (`JAVA` overrides).
pub fn java() -> Command {
    Command::new(std::env::var("JAVA").unwrap_or_else(|_| "java".into()))
}

/// CPU seconds and peak RSS (MB) of a running process.
pub fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0; // utime, stime (fields 14, 15)
    (cpu, crate::status_kb(&format!("/proc/{pid}/status"), "VmHWM:").max(0.0) / 1024.0)
}

/// Context switches (voluntary, involuntary) of every thread of a running process.
pub fn context_switches(pid: u32) -> (u64, u64) {
    let mut sum = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let status = t.path().join("status");
        let field = |name: &str| crate::status_kb(&status.to_string_lossy(), name).max(0.0) as u64;
        sum.0 += field("voluntary_ctxt_switches:");
        sum.1 += field("nonvoluntary_ctxt_switches:");
    }
    sum
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `sluice_events_total` of a pipeline process, from its `/metrics` (0 until it serves).
pub fn events_applied(agent: &ureq::Agent, port: u16) -> u64 {
    let Ok(mut resp) = agent.get(&format!("http://127.0.0.1:{port}/metrics")).call() else { return 0 };
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    text.lines().filter(|l| l.starts_with("sluice_events_total")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>()
        as u64
}

/// A child killed (and reaped) when dropped, so a failed bench leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
