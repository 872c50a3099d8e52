//! The daemon as systemd sees it: a real `chatraftd` process with `$NOTIFY_SOCKET` pointing
//! at our datagram socket. READY=1 comes only once both listeners accept connections, STATUS=
//! follows the role, SIGHUP re-reads the config (RELOADING=1, then READY=1), and SIGTERM sends
//! STOPPING=1 and ends with exit status 0.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(path: &Path, data: &Path, api: u16, raft: u16, extra: &str) {
    let secret = path.with_file_name("cluster-secret");
    std::fs::write(&secret, "systemd-test-cluster-secret-0123456789\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = format!(
        "node_id = 1\nbootstrap = true\ndata_dir = {data:?}\n\
         [api]\nlisten = \"127.0.0.1:{api}\"\n{extra}\n\
         [raft]\nlisten = \"127.0.0.1:{raft}\"\n\
         [security]\ncluster_secret_file = {secret:?}\n"
    );
    std::fs::write(path, text).unwrap();
}

/// Kills the child if a check fails, so no daemon outlives the test.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Receives notify messages until one satisfies `want`, or panics at the deadline.
fn recv_until(sock: &UnixDatagram, what: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if want(&msg) {
                    return msg;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {what} from the daemon within 30 s");
}

fn wait_for_log(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{needle:?} not logged; log:\n{}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

#[test]
fn notify_reload_and_stop_as_systemd_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&notify_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (api, raft) = (free_port(), free_port());
    let config = dir.path().join("chatraftd.toml");
    let data = dir.path().join("data");
    write_config(&config, &data, api, raft, "");
    let log_path = dir.path().join("stderr.log");

    let child = Command::new(env!("CARGO_BIN_EXE_chatraftd"))
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let pid = Pid::from_raw(daemon.0.id() as i32);

    recv_until(&sock, "READY=1", |m| m.lines().any(|l| l == "READY=1"));
    // Ready means both listeners already accept connections.
    TcpStream::connect(("127.0.0.1", api)).expect("API listener bound before READY=1");
    TcpStream::connect(("127.0.0.1", raft)).expect("Raft listener bound before READY=1");
    let status = recv_until(&sock, "STATUS= as leader", |m| {
        m.starts_with("STATUS=leader, term 1, leader 1, commit index")
    });
    assert!(!status.contains('\n'), "{status:?}");

    // A live key and a restart-only key change; SIGHUP applies the first, names the second.
    write_config(
        &config,
        &data,
        api,
        raft,
        "sse_keepalive_secs = 7\n[log]\nlevel = \"debug\"",
    );
    kill(pid, Signal::SIGHUP).unwrap();
    recv_until(&sock, "RELOADING=1", |m| {
        m.starts_with("RELOADING=1\nMONOTONIC_USEC=")
    });
    recv_until(&sock, "READY=1 after the reload", |m| m == "READY=1");
    wait_for_log(&log_path, "reload: log.level applied");
    wait_for_log(&log_path, "api.sse_keepalive_secs changed");

    // A config that no longer loads changes nothing and does not stop the node.
    std::fs::write(&config, "node_id = \"x\"\n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    recv_until(&sock, "READY=1 after a bad reload", |m| m == "READY=1");
    wait_for_log(&log_path, "reload: config not applied");
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "a bad reload stopped the node"
    );

    kill(pid, Signal::SIGTERM).unwrap();
    recv_until(&sock, "STOPPING=1", |m| m.starts_with("STOPPING=1"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}
