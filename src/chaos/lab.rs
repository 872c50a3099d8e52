//! The hosts of a chaos run: one Linux network namespace per node and one for the clients, all
//! wired to a bridge that lives in a namespace of its own. The harness moves its own threads
//! into the client namespace ([`enter_client_ns`]), so none of its traffic ever leaves the lab:
//! the machine's own namespace gets no address and no route, and once the lab is gone a late
//! packet finds no route at all. Everything is created under fixed `chaos-` names, removed again
//! by [`Lab::teardown`] (also on drop), and swept at the next start if a run was killed before
//! it could clean up.
//!
//! Addresses are in one /24 that exists only on these links: the clients are `.1`, node N is
//! `.(10 + N)`. Faults are iptables rules and qdiscs inside the node namespaces; removing a
//! namespace removes its rules.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The namespace that holds the bridge.
const SWITCH_NS: &str = "chaos-sw";
/// The namespace the harness's clients run in.
pub const CLIENT_NS: &str = "chaos-c";

/// A failed setup or fault command, with what was run.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {reason}")]
pub struct LabError {
    pub command: String,
    pub reason: String,
}

/// Runs a command to completion; fails on a non-zero exit with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| LabError {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError {
            command,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// The namespace of node `id`.
pub fn node_ns(id: u64) -> String {
    format!("chaos-n{id}")
}

/// The source name of the nodes' tmpfs mounts, by which a later run finds leftovers.
const TMPFS_SOURCE: &str = "chaos-tmpfs";

/// Held for the whole run, so two runs never share (and tear down) the same namespaces.
const LOCK_FILE: &str = "/run/chatraftd-chaos.lock";

pub struct Lab {
    /// The flock on `LOCK_FILE`, released when the lab is dropped.
    _lock: nix::fcntl::Flock<std::fs::File>,
    /// First three octets of the lab's /24, e.g. "10.77.0".
    prefix: String,
    nodes: u64,
    /// tmpfs mounts to unmount at teardown.
    mounts: Vec<PathBuf>,
    torn_down: bool,
}

impl Lab {
    /// Creates the namespaces, bridge and links for `nodes` nodes in `prefix`.0/24. Leftovers
    /// of an earlier run that died are removed first. The prefix is private to the lab's
    /// namespaces, so it cannot clash with the machine's own routes.
    pub fn create(prefix: &str, nodes: u64) -> Result<Lab, LabError> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .map_err(|e| LabError {
                command: format!("open {LOCK_FILE}"),
                reason: e.to_string(),
            })?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| LabError {
                command: format!("flock {LOCK_FILE}"),
                reason: format!("another chatraftd-chaos run holds the lab ({e})"),
            })?;
        sweep();
        let mut lab = Lab {
            _lock: lock,
            prefix: prefix.to_string(),
            nodes,
            mounts: Vec::new(),
            torn_down: false,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<(), LabError> {
        let sw = SWITCH_NS;
        run("ip", &["netns", "add", sw])?;
        run("ip", &["-n", sw, "link", "set", "lo", "up"])?;
        run("ip", &["-n", sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", sw, "link", "set", "br0", "up"])?;
        // The clients' namespace, like a node's.
        run("ip", &["netns", "add", CLIENT_NS])?;
        run("ip", &["-n", CLIENT_NS, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n", sw, "link", "add", "c0", "type", "veth", "peer", "name", "eth0", "netns",
                CLIENT_NS,
            ],
        )?;
        run(
            "ip",
            &["-n", sw, "link", "set", "dev", "c0", "master", "br0", "up"],
        )?;
        run(
            "ip",
            &[
                "-n",
                CLIENT_NS,
                "addr",
                "add",
                &format!("{}/24", self.client_addr()),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", CLIENT_NS, "link", "set", "eth0", "up"])?;
        for id in 1..=self.nodes {
            let ns = node_ns(id);
            let port = format!("v{id}");
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ],
            )?;
            run(
                "ip",
                &["-n", sw, "link", "set", "dev", &port, "master", "br0", "up"],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", self.addr(id)),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The address of node `id`.
    pub fn addr(&self, id: u64) -> String {
        format!("{}.{}", self.prefix, 10 + id)
    }

    /// The clients' address, the source of every client request.
    pub fn client_addr(&self) -> String {
        format!("{}.1", self.prefix)
    }

    /// Mounts a tmpfs of `mb` MiB at `dir`, so a node's disk can be filled on purpose without
    /// touching the machine's own.
    pub fn mount_tmpfs(&mut self, dir: &Path, mb: u64) -> Result<(), LabError> {
        std::fs::create_dir_all(dir).map_err(|e| LabError {
            command: format!("mkdir {}", dir.display()),
            reason: e.to_string(),
        })?;
        let opts = format!("size={mb}m,mode=0700");
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &opts,
                "chaos-tmpfs",
                &dir.to_string_lossy(),
            ],
        )?;
        self.mounts.push(dir.to_path_buf());
        Ok(())
    }

    /// Runs a command inside node `id`'s namespace.
    pub fn exec(&self, id: u64, program: &str, args: &[&str]) -> Result<String, LabError> {
        let ns = node_ns(id);
        let mut full = vec!["netns", "exec", &ns, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Drops every packet between node `a` and node `b`, in both directions.
    pub fn cut(&self, a: u64, b: u64) -> Result<(), LabError> {
        self.cut_one_way(a, b)?;
        self.cut_one_way(b, a)
    }

    /// Node `to` no longer receives anything from node `from` (its answers still leave).
    pub fn cut_one_way(&self, from: u64, to: u64) -> Result<(), LabError> {
        let src = self.addr(from);
        self.exec(
            to,
            "iptables",
            &["-w", "-A", "INPUT", "-s", &src, "-j", "DROP"],
        )
        .map(|_| ())
    }

    /// Every node drops this share of the packets it receives, from anyone.
    pub fn lose_packets(&self, id: u64, probability: f64) -> Result<(), LabError> {
        let p = format!("{probability:.2}");
        self.exec(
            id,
            "iptables",
            &[
                "-w",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ],
        )
        .map(|_| ())
    }

    /// A slow, lossy link on node `id`: netem delay and loss where the kernel has netem,
    /// otherwise a token bucket that queues (and so delays) everything past a low rate.
    pub fn slow_link(&self, id: u64, netem: bool) -> Result<(), LabError> {
        let args: &[&str] = if netem {
            &[
                "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "60ms", "30ms", "loss",
                "3%",
            ]
        } else {
            &[
                "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "256kbit", "burst", "4kb",
                "latency", "400ms",
            ]
        };
        self.exec(id, "tc", args).map(|_| ())
    }

    /// Removes every rule and qdisc from node `id`.
    pub fn heal(&self, id: u64) -> Result<(), LabError> {
        self.exec(id, "iptables", &["-w", "-F"])?;
        // No root qdisc of ours is not an error.
        let _ = self.exec(id, "tc", &["qdisc", "del", "dev", "eth0", "root"]);
        Ok(())
    }

    /// Whether this kernel has the netem qdisc (many container kernels lack it).
    pub fn has_netem(&self) -> bool {
        let ok = self
            .exec(
                1,
                "tc",
                &["qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            )
            .is_ok();
        if ok {
            let _ = self.exec(1, "tc", &["qdisc", "del", "dev", "lo", "root"]);
        }
        ok
    }

    /// Removes everything the lab created. Every node process must be gone already (or at least
    /// killed): a namespace is only freed once its last process has exited.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for dir in self.mounts.drain(..) {
            // Lazy: a killed node may still hold files open for a moment.
            if let Err(e) = run("umount", &["-l", &dir.to_string_lossy()]) {
                eprintln!("chatraftd-chaos: cleanup: {e}");
            }
        }
        sweep();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Unmounts every leftover node disk and removes every `chaos-` namespace, killing any process still inside a node namespace (only
/// ever one of ours: a node of an earlier run whose harness was killed; the lock file makes
/// sure no other run is going on).
pub fn sweep() {
    // Data disks of a run that was killed: tmpfs mounts named after the lab.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        if let (Some(TMPFS_SOURCE), Some(dir)) = (fields.next(), fields.next()) {
            let _ = run("umount", &["-l", dir]);
        }
    }
    let list = run("ip", &["netns", "list"]).unwrap_or_default();
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with("chaos-") {
            continue;
        }
        // Only node namespaces hold daemons; the clients' namespace holds this very process.
        let me = std::process::id() as i32;
        let pids = if name.starts_with("chaos-n") {
            run("ip", &["netns", "pids", name])
        } else {
            Ok(String::new())
        };
        if let Ok(pids) = pids {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|p| *p != me)
            {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        if let Err(e) = run("ip", &["netns", "del", name]) {
            eprintln!("chatraftd-chaos: cleanup: {e}");
        }
    }
}

/// Moves the calling thread into the clients' namespace. Every thread of the harness that
/// opens a socket must call this first (the runtime's threads do, on start).
pub fn enter_client_ns() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{CLIENT_NS}"))?;
    // SAFETY: setns only changes this thread's network namespace; the descriptor is valid for
    // the duration of the call.
    let rc = unsafe { nix::libc::setns(file.as_raw_fd(), nix::libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
