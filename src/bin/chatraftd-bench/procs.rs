//! Processes the bench starts: free loopback ports, a work dir removed at the end, child
//! processes that are killed when dropped (also on panic or Ctrl-C) and when the bench itself
//! dies (`PR_SET_PDEATHSIG`), and CPU/memory readings from `/proc`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

/// Ports handed out in this run, so two servers never get the same one.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0 must work on any Linux host");
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// A directory for one run's data; removed when dropped unless `keep` is set.
pub struct WorkDir {
    pub path: PathBuf,
    keep: bool,
}

impl WorkDir {
    pub fn create(parent: &Path, keep: bool) -> std::io::Result<Self> {
        let path = parent.join(format!("chatraftd-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir { path, keep })
    }

    pub fn sub(&self, name: &str) -> std::io::Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept the work dir {}", self.path.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("bench: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// One server process; killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`. The child gets SIGKILL when
    /// the thread that started it exits, so a bench killed with -9 leaves no server behind.
    /// (Only async worker threads or the main thread start processes: both live until the
    /// bench ends.)
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("{name}: cannot open {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{name}: cannot dup log fd: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{name}: cannot start {:?}: {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// SIGTERM, then wait (polling) until it exits; SIGKILL after `grace`.
    /// Returns how long the clean stop took.
    pub async fn stop(&mut self, grace: Duration) -> Duration {
        let start = Instant::now();
        let Some(child) = self.child.as_mut() else {
            return Duration::ZERO;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = start + grace;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "bench: {} did not stop within {grace:?}; killing it",
                    self.name
                );
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = None;
        start.elapsed()
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ) on every architecture we run.
const TICKS_PER_SEC: f64 = 100.0;

/// User plus system CPU seconds a process has used.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. indexes 11 and 12 after the state field.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / TICKS_PER_SEC
}

/// Context switches (voluntary and not) of each live thread of a process, by thread id.
pub fn context_switches(pid: u32) -> HashMap<u32, u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse::<u32>().ok()?;
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let n = status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
            Some((tid, n))
        })
        .collect()
}

/// The context switches of `pids` between two readings of [`context_switches`] per process:
/// each thread's own difference, a new thread's whole count. A thread that ended meanwhile
/// (tokio's idle blocking threads do) is missing from the second reading and its switches
/// in between are not counted, so this is a lower bound, but never one that counts a
/// thread's earlier life against the window.
pub fn switches_between(before: &[HashMap<u32, u64>], after: &[HashMap<u32, u64>]) -> u64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            a.iter()
                .map(|(tid, n)| n.saturating_sub(b.get(tid).copied().unwrap_or(0)))
                .sum::<u64>()
        })
        .sum()
}

/// CPU and context switches of the servers and of the bench itself over a stretch of a run.
pub struct Meter {
    pids: Vec<u32>,
    server_cpu: f64,
    bench_cpu: f64,
    switches: Vec<HashMap<u32, u64>>,
}

/// What a [`Meter`] measured: CPU seconds (user plus system) and the servers' switches.
pub struct Usage {
    pub server_cpu: f64,
    pub bench_cpu: f64,
    pub server_switches: u64,
}

impl Meter {
    pub fn start(pids: &[u32]) -> Meter {
        Meter {
            pids: pids.to_vec(),
            server_cpu: pids.iter().map(|&p| cpu_secs(p)).sum(),
            bench_cpu: cpu_secs(std::process::id()),
            switches: pids.iter().map(|&p| context_switches(p)).collect(),
        }
    }

    /// What was used since [`Meter::start`].
    pub fn read(&self) -> Usage {
        let now = Meter::start(&self.pids);
        Usage {
            server_cpu: now.server_cpu - self.server_cpu,
            bench_cpu: now.bench_cpu - self.bench_cpu,
            server_switches: switches_between(&self.switches, &now.switches),
        }
    }
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Raises this process's open-file limit to its hard limit (children inherit it), and
/// returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_count_each_thread_inside_the_window_only() {
        let before = vec![HashMap::from([(1, 100), (2, 50), (3, 7)])];
        // Thread 3 ended, thread 4 started.
        let after = vec![HashMap::from([(1, 110), (2, 55), (4, 3)])];
        assert_eq!(switches_between(&before, &after), 10 + 5 + 3);
        let mine = context_switches(std::process::id());
        assert!(!mine.is_empty(), "this process has threads");
    }
}
