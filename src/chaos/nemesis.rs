//! Faults and their schedule. The schedule is drawn from the seed before the run starts (so a
//! seed always gives the same faults at the same offsets); which node is "the leader" is found
//! when a fault starts, and every other choice of target comes from the seeded generator.
//! After each fault window everything is healed: rules flushed, qdiscs removed, paused nodes
//! continued, dead nodes restarted, disks emptied.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::cluster::Cluster;
use super::prng::Prng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL a follower; restart it when the window ends.
    KillFollower,
    /// SIGKILL the leader; restart it when the window ends.
    KillLeader,
    /// SIGKILL every node at once; restart them all.
    KillAll,
    /// SIGSTOP the leader for the window (longer than the election timeout).
    PauseLeader,
    /// SIGSTOP a follower for the window.
    PauseFollower,
    /// Cut the leader off from every other node.
    IsolateLeader,
    /// Cut one follower off from every other node.
    IsolateFollower,
    /// Split the nodes into a random majority and minority.
    SplitMajority,
    /// One node stops receiving from another (its own packets still get through).
    OneWay,
    /// Two halves that cannot see each other, and one node that sees both.
    Bridge,
    /// A majority/minority split that comes and goes every second or so.
    Flapping,
    /// Every node drops 20% of the packets it receives.
    PacketLoss,
    /// Delay and loss with netem where the kernel has it, otherwise a slow token bucket.
    SlowNetwork,
    /// Stop (SIGTERM) and restart each node in turn, waiting until it is back.
    RollingRestart,
    /// Fill one node's disk (its tmpfs) for the window.
    DiskFull,
    /// Remove a node from the cluster under load, wipe it, and re-add it under a new id.
    RemoveReadd,
}

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::KillFollower,
        Fault::KillLeader,
        Fault::KillAll,
        Fault::PauseLeader,
        Fault::PauseFollower,
        Fault::IsolateLeader,
        Fault::IsolateFollower,
        Fault::SplitMajority,
        Fault::OneWay,
        Fault::Bridge,
        Fault::Flapping,
        Fault::PacketLoss,
        Fault::SlowNetwork,
        Fault::RollingRestart,
        Fault::DiskFull,
        Fault::RemoveReadd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillFollower => "kill-follower",
            Fault::KillLeader => "kill-leader",
            Fault::KillAll => "kill-all",
            Fault::PauseLeader => "pause-leader",
            Fault::PauseFollower => "pause-follower",
            Fault::IsolateLeader => "isolate-leader",
            Fault::IsolateFollower => "isolate-follower",
            Fault::SplitMajority => "split-majority",
            Fault::OneWay => "one-way",
            Fault::Bridge => "bridge",
            Fault::Flapping => "flapping",
            Fault::PacketLoss => "packet-loss",
            Fault::SlowNetwork => "slow-network",
            Fault::RollingRestart => "rolling-restart",
            Fault::DiskFull => "disk-full",
            Fault::RemoveReadd => "remove-readd",
        }
    }

    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Faults that change which processes exist take a window of their own.
    fn is_exclusive(self) -> bool {
        matches!(self, Fault::RollingRestart | Fault::RemoveReadd)
    }

    /// Process faults act on processes, network faults on links: one of each can share a
    /// window.
    fn is_network(self) -> bool {
        matches!(
            self,
            Fault::IsolateLeader
                | Fault::IsolateFollower
                | Fault::SplitMajority
                | Fault::OneWay
                | Fault::Bridge
                | Fault::Flapping
                | Fault::PacketLoss
                | Fault::SlowNetwork
        )
    }
}

/// One fault window of the schedule.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Offset from the start of the workload.
    pub start_ms: u64,
    pub duration_ms: u64,
    pub faults: Vec<Fault>,
}

/// Draws the schedule: fault windows of 3 to 7 s with 1.5 to 3 s of calm between them, from
/// 3 s after the workload starts to `total`. Each window's main fault is dealt from a shuffled
/// deck of `kinds`, so every kind comes up once before any comes up again. About a third of
/// the windows combine a network fault with a process fault.
pub fn schedule(seed: u64, kinds: &[Fault], total: Duration) -> Vec<Window> {
    let mut rng = Prng::fork(seed, 0x5C4E_D01E);
    let total_ms = total.as_millis() as u64;
    let mut windows = Vec::new();
    let mut t = 3000;
    if kinds.is_empty() {
        return windows;
    }
    let mut deck: Vec<Fault> = Vec::new();
    loop {
        let duration_ms = rng.between(3000, 7000);
        if t + duration_ms > total_ms {
            break;
        }
        if deck.is_empty() {
            deck = kinds.to_vec();
            rng.shuffle(&mut deck);
        }
        let Some(first) = deck.pop() else { break };
        let mut faults = vec![first];
        if rng.chance(0.33) {
            let partners: Vec<Fault> = kinds
                .iter()
                .copied()
                .filter(|k| {
                    k.is_network() != first.is_network()
                        && !k.is_exclusive()
                        && !first.is_exclusive()
                })
                .collect();
            if !partners.is_empty() {
                faults.push(*rng.pick(&partners));
            }
        }
        windows.push(Window {
            start_ms: t,
            duration_ms,
            faults,
        });
        t += duration_ms + rng.between(1500, 3000);
    }
    windows
}

/// What was done, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: Fault,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The nodes it hit.
    pub targets: Vec<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

pub struct Nemesis {
    rng: Prng,
    netem: bool,
    pub log: Vec<FaultRecord>,
    /// Nodes whose disk is full: their exit is expected.
    full_disks: Vec<u64>,
}

impl Nemesis {
    pub fn new(seed: u64, netem: bool) -> Self {
        Nemesis {
            rng: Prng::fork(seed, 0xFA_u64),
            netem,
            log: Vec::new(),
            full_disks: Vec::new(),
        }
    }

    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for r in &self.log {
            *m.entry(r.kind.name()).or_insert(0) += 1;
        }
        m
    }

    /// Runs one window: starts its faults, keeps flapping ones going, and heals at its end.
    pub async fn run_window(&mut self, cluster: &mut Cluster, window: &Window) {
        let end = Instant::now() + Duration::from_millis(window.duration_ms);
        let mut started = Vec::new();
        let mut flapping = false;
        for fault in &window.faults {
            let start_ms = cluster.elapsed_ms();
            let (targets, detail) = self.start(cluster, *fault).await;
            flapping |= *fault == Fault::Flapping;
            started.push((*fault, start_ms, targets, detail));
        }
        if flapping {
            let ids = cluster.ids();
            let mut cut = true;
            while Instant::now() < end {
                let step = Duration::from_millis(self.rng.between(500, 1500));
                tokio::time::sleep_until(end.min(Instant::now() + step)).await;
                cut = !cut;
                for id in &ids {
                    let _ = cluster.lab.heal(*id);
                }
                if cut {
                    let (a, b) = self.split(&ids);
                    partition(cluster, &a, &b);
                }
                cluster.reap(&self.full_disks);
            }
        }
        // Sleep to the window's end, looking for crashed nodes now and then.
        while Instant::now() < end {
            tokio::time::sleep_until(end.min(Instant::now() + Duration::from_millis(500))).await;
            cluster.reap(&self.full_disks);
        }
        self.heal(cluster).await;
        let end_ms = cluster.elapsed_ms();
        for (kind, start_ms, targets, detail) in started {
            self.log.push(FaultRecord {
                kind,
                start_ms,
                end_ms,
                targets,
                detail,
            });
        }
    }

    /// A random follower (any running node but the leader), or any node.
    fn follower(&mut self, cluster: &Cluster, leader: Option<u64>) -> u64 {
        let others: Vec<u64> = cluster
            .nodes
            .iter()
            .filter(|n| Some(n.id) != leader && n.running())
            .map(|n| n.id)
            .collect();
        if others.is_empty() {
            *self.rng.pick(&cluster.ids())
        } else {
            *self.rng.pick(&others)
        }
    }

    /// A random majority/minority split of `ids`.
    fn split(&mut self, ids: &[u64]) -> (Vec<u64>, Vec<u64>) {
        let mut shuffled = ids.to_vec();
        self.rng.shuffle(&mut shuffled);
        let minority = shuffled.split_off(ids.len() / 2 + 1);
        (shuffled, minority)
    }

    async fn start(&mut self, cluster: &mut Cluster, fault: Fault) -> (Vec<u64>, String) {
        let ids = cluster.ids();
        let leader = cluster.leader().await;
        let leader_or_any = match leader {
            Some(l) => l,
            None => *self.rng.pick(&ids),
        };
        match fault {
            Fault::KillFollower => {
                let f = self.follower(cluster, leader);
                cluster.kill_node(f).await;
                (vec![f], String::new())
            }
            Fault::KillLeader => {
                cluster.kill_node(leader_or_any).await;
                (vec![leader_or_any], leader_note(leader))
            }
            Fault::KillAll => {
                for id in &ids {
                    cluster.kill_node(*id).await;
                }
                // Bring them back at once rather than at the window's end: the interesting
                // part is recovering from a cluster-wide crash under load.
                for id in &ids {
                    let _ = cluster.start_node(*id);
                }
                (ids, String::new())
            }
            Fault::PauseLeader => {
                cluster.pause_node(leader_or_any);
                (vec![leader_or_any], leader_note(leader))
            }
            Fault::PauseFollower => {
                let f = self.follower(cluster, leader);
                cluster.pause_node(f);
                (vec![f], String::new())
            }
            Fault::IsolateLeader => {
                let rest: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|i| *i != leader_or_any)
                    .collect();
                partition(cluster, &[leader_or_any], &rest);
                (vec![leader_or_any], leader_note(leader))
            }
            Fault::IsolateFollower => {
                let f = self.follower(cluster, leader);
                let rest: Vec<u64> = ids.iter().copied().filter(|i| *i != f).collect();
                partition(cluster, &[f], &rest);
                (vec![f], String::new())
            }
            Fault::SplitMajority | Fault::Flapping => {
                let (a, b) = self.split(&ids);
                partition(cluster, &a, &b);
                let detail = format!("{a:?} | {b:?}");
                (b, detail)
            }
            Fault::OneWay => {
                let from = *self.rng.pick(&ids);
                let to = other(&mut self.rng, &ids, from);
                let _ = cluster.lab.cut_one_way(from, to);
                (vec![from, to], format!("{to} hears nothing from {from}"))
            }
            Fault::Bridge => {
                let mut shuffled = ids.clone();
                self.rng.shuffle(&mut shuffled);
                let bridge = shuffled.pop().unwrap_or(1);
                let half = shuffled.len() / 2;
                let (a, b) = shuffled.split_at(half);
                partition(cluster, a, b);
                (
                    vec![bridge],
                    format!("{a:?} | {b:?}, node {bridge} sees both"),
                )
            }
            Fault::PacketLoss => {
                for id in &ids {
                    let _ = cluster.lab.lose_packets(*id, 0.2);
                }
                (ids, "20% of received packets dropped on every node".into())
            }
            Fault::SlowNetwork => {
                for id in &ids {
                    let _ = cluster.lab.slow_link(*id, self.netem);
                }
                let how = if self.netem {
                    "netem 60±30 ms, 3% loss"
                } else {
                    "tbf 256 kbit/s (no netem in this kernel)"
                };
                (ids, how.into())
            }
            Fault::RollingRestart => {
                let mut notes = Vec::new();
                for id in &ids {
                    let status = cluster.stop_node(*id).await.unwrap_or_default();
                    if !status.contains("exit status: 0") {
                        notes.push(format!("node {id} stopped with {status}"));
                    }
                    if cluster.start_node(*id).is_ok() {
                        let _ = cluster.wait_healthy(*id, Duration::from_secs(10)).await;
                    }
                    let _ = wait_ready(cluster, *id, Duration::from_secs(10)).await;
                }
                (ids, notes.join("; "))
            }
            Fault::RemoveReadd => {
                let target = *self.rng.pick(&ids);
                let detail = remove_and_readd(cluster, target, &mut self.rng).await;
                (vec![target], detail)
            }
            Fault::DiskFull => {
                let target = *self.rng.pick(&ids);
                self.full_disks.push(target);
                let detail = match cluster.fill_disk(target) {
                    Ok(bytes) => format!("{} MiB of ballast", bytes >> 20),
                    Err(e) => format!("could not fill: {e}"),
                };
                (vec![target], detail)
            }
        }
    }

    /// Undoes every fault: network rules, pauses, full disks, dead processes.
    pub async fn heal(&mut self, cluster: &mut Cluster) {
        for id in cluster.ids() {
            if let Err(e) = cluster.lab.heal(id) {
                eprintln!("chatraftd-chaos: heal node {id}: {e}");
            }
            cluster.free_disk(id);
            if cluster.nodes[id as usize - 1].paused() {
                cluster.resume_node(id);
            }
        }
        // A node that hit the full disk stops its Raft and then exits; one caught in between
        // would exit later and look like a crash. Stop those now, as an operator would.
        for id in self.full_disks.clone() {
            let healthy = cluster
                .get_json(id, "/healthz", Duration::from_millis(800))
                .await
                .is_some();
            if !healthy {
                cluster.stop_node(id).await;
            }
        }
        cluster.reap(&self.full_disks);
        self.full_disks.clear();
        for id in cluster.ids() {
            if !cluster.nodes[id as usize - 1].running() {
                if let Err(e) = cluster.start_node(id) {
                    eprintln!("chatraftd-chaos: restart node {id}: {e}");
                }
            }
        }
    }
}

fn leader_note(leader: Option<u64>) -> String {
    if leader.is_none() {
        "no leader known; hit a random node".into()
    } else {
        String::new()
    }
}

fn other(rng: &mut Prng, ids: &[u64], not: u64) -> u64 {
    let rest: Vec<u64> = ids.iter().copied().filter(|i| *i != not).collect();
    if rest.is_empty() {
        not
    } else {
        *rng.pick(&rest)
    }
}

/// No packet passes between a node of `a` and a node of `b`.
fn partition(cluster: &Cluster, a: &[u64], b: &[u64]) {
    for x in a {
        for y in b {
            if let Err(e) = cluster.lab.cut(*x, *y) {
                eprintln!("chatraftd-chaos: partition: {e}");
            }
        }
    }
}

/// Removes the node in slot `target` through another node, and only once the removal is
/// committed stops it, wipes its data dir and starts it under a new id, joining through the
/// others. A node is never wiped while it may still be a member: that would be a lost disk,
/// not a membership change.
async fn remove_and_readd(cluster: &mut Cluster, target: u64, rng: &mut Prng) -> String {
    let old_id = cluster.nodes[target as usize - 1].raft_id;
    let path = format!("/api/v1/cluster/nodes/{old_id}");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut last_error = String::new();
    let removed = loop {
        if Instant::now() >= deadline {
            break false;
        }
        let via = other(rng, &cluster.ids(), target);
        let resp = cluster
            .http
            .request(
                hyper::Method::DELETE,
                &cluster.api(via),
                &path,
                &[],
                bytes::Bytes::new(),
                Duration::from_secs(35),
            )
            .await;
        match resp {
            // 404: an earlier attempt that timed out did land.
            Ok(r) if r.status == 200 || r.status == 404 => break true,
            Ok(r) => last_error = format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    if !removed {
        return format!("node id {old_id} could not be removed ({last_error}); left as it was");
    }
    cluster.stop_node(target).await;
    match cluster.wipe_as_new_node(target) {
        Ok(new_id) => {
            if let Err(e) = cluster.start_node(target) {
                return format!("node id {old_id} removed and wiped; restart failed: {e}");
            }
            format!("node id {old_id} removed, wiped, re-added as node id {new_id}")
        }
        Err(e) => format!("node id {old_id} removed; wipe failed: {e}"),
    }
}

/// Waits until node `id` answers `/readyz` (a leader known, caught up).
async fn wait_ready(cluster: &Cluster, id: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cluster
            .get_json(id, "/readyz", Duration::from_millis(500))
            .await
            .is_some()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_schedule() {
        let total = Duration::from_secs(120);
        let a = schedule(9, &Fault::ALL, total);
        let b = schedule(9, &Fault::ALL, total);
        let c = schedule(10, &Fault::ALL, total);
        let show = |w: &[Window]| format!("{w:?}");
        assert_eq!(show(&a), show(&b));
        assert_ne!(show(&a), show(&c));
        assert!(a.len() >= 10, "{} windows in 120 s", a.len());
        for w in &a {
            assert!(w.start_ms + w.duration_ms <= 120_000);
            assert!((1..=2).contains(&w.faults.len()));
        }
        for pair in a.windows(2) {
            assert!(pair[1].start_ms >= pair[0].start_ms + pair[0].duration_ms + 1500);
        }
    }

    #[test]
    fn only_the_chosen_kinds_are_scheduled() {
        let kinds = [Fault::KillLeader, Fault::Bridge];
        for w in schedule(1, &kinds, Duration::from_secs(300)) {
            assert!(w.faults.iter().all(|f| kinds.contains(f)), "{w:?}");
        }
        assert!(schedule(1, &[], Duration::from_secs(300)).is_empty());
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.name()), Some(f));
        }
    }

    #[test]
    fn every_kind_comes_up_before_any_repeats() {
        let w = schedule(3, &Fault::ALL, Duration::from_secs(600));
        assert!(w.len() > Fault::ALL.len());
        let mut first: Vec<Fault> = w[..Fault::ALL.len()].iter().map(|w| w.faults[0]).collect();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), Fault::ALL.len(), "{w:?}");
    }
}
