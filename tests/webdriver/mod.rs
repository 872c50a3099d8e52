//! A small WebDriver client: enough of the W3C protocol (JSON over HTTP) to drive a headless
//! Chromium through `chromedriver` — sessions, navigation, elements, keys, clicks, scripts,
//! alerts and screenshots.
//!
//! [`Driver::start`] runs `chromedriver` on a free loopback port in a process group of its
//! own, and gives every browser a profile folder inside one temp dir. Dropping the driver
//! ends each session, kills the process group, then kills any process still running from
//! that temp dir (a browser that left the group), so nothing outlives a test, also when it
//! panics.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use hyper::Method;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::common::http::Http;
use crate::common::{free_port, wait_until};

/// The key of an element reference in W3C WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where the browser and its driver are, when both are installed.
#[derive(Debug, Clone)]
pub struct Browser {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

impl Browser {
    /// Finds `chromium` and `chromedriver` on `PATH`.
    pub fn find() -> Result<Browser, String> {
        let chromium = which("chromium").ok_or("`chromium` is not on PATH")?;
        let chromedriver = which("chromedriver").ok_or("`chromedriver` is not on PATH")?;
        Ok(Browser {
            chromium,
            chromedriver,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A running `chromedriver`.
pub struct Driver {
    http: Http,
    addr: String,
    browser: Browser,
    child: Child,
    /// Browser profiles and the driver's log; every browser process names this dir.
    dir: tempfile::TempDir,
    /// Sessions not yet deleted, to end on drop.
    open: Arc<Mutex<Vec<String>>>,
    profiles: usize,
}

impl Driver {
    pub async fn start(browser: Browser) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("chatraftd-browser-")
            .tempdir()
            .expect("creating a temp dir for the browser");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("chromedriver.log"))
            .expect("creating the driver log");
        let child = Command::new(&browser.chromedriver)
            .arg(format!("--port={port}"))
            // Only this machine may connect (also the default; said out loud).
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            // Its own process group, so drop can kill it and the browsers it started at once.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", browser.chromedriver.display()));
        let driver = Driver {
            http: Http::new(),
            addr: format!("127.0.0.1:{port}"),
            browser,
            child,
            dir,
            open: Arc::new(Mutex::new(Vec::new())),
            profiles: 0,
        };
        let (http, addr) = (driver.http.clone(), driver.addr.clone());
        wait_until("chromedriver to be ready", Duration::from_secs(20), || {
            let (http, addr) = (http.clone(), addr.clone());
            async move {
                let r = http.get(&addr, "/status").await?;
                let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                if v["value"]["ready"] == json!(true) {
                    Ok(())
                } else {
                    Err(format!("status {v}"))
                }
            }
        })
        .await;
        driver
    }

    /// Opens a new headless browser with a window of `width` x `height` CSS pixels.
    pub async fn session(&mut self, width: u32, height: u32) -> Session {
        self.profiles += 1;
        let profile = self.dir.path().join(format!("profile-{}", self.profiles));
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    // Leave a dialog open, so a test can see that one was opened.
                    "unhandledPromptBehavior": "ignore",
                    "goog:chromeOptions": {
                        "binary": self.browser.chromium,
                        "args": [
                            "--headless=new",
                            // CI runs as root, where Chromium's sandbox cannot start.
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--no-first-run",
                            "--no-default-browser-check",
                            "--disable-extensions",
                            "--disable-background-networking",
                            "--disable-component-update",
                            "--disable-crash-reporter",
                            "--disable-breakpad",
                            "--hide-scrollbars",
                            "--force-device-scale-factor=1",
                            format!("--window-size={width},{height}"),
                            format!("--user-data-dir={}", profile.display()),
                        ]
                    }
                }
            }
        });
        let v = call(
            &self.http,
            &self.addr,
            Method::POST,
            "/session",
            Some(&caps),
        )
        .await
        .unwrap_or_else(|e| panic!("starting a browser session: {e}"));
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {v}"))
            .to_owned();
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.clone());
        let s = Session {
            http: self.http.clone(),
            addr: self.addr.clone(),
            id,
            open: self.open.clone(),
        };
        s.set_window(width, height).await;
        s
    }

    /// The driver's own log, for a failing test's output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A clean end first: the driver closes its browser. Blocking I/O with short
        // timeouts, since drop cannot await.
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        for id in open {
            delete_session_blocking(&self.addr, &id);
        }
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
        kill_processes_naming(self.dir.path());
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "\n----- chromedriver, last lines -----\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Ends a session with a plain blocking HTTP request (used from drop).
fn delete_session_blocking(addr: &str, id: &str) {
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let req = format!(
        "DELETE /session/{id} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if conn.write_all(req.as_bytes()).is_ok() {
        let mut sink = Vec::new();
        let _ = conn.read_to_end(&mut sink);
    }
}

/// Kills (SIGKILL, by pid) every process whose command line names `dir`: browsers started
/// for this driver that are still running after their driver's group was killed.
fn kill_processes_naming(dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Sends one WebDriver command; returns `value` of the answer, or the WebDriver error.
async fn call(
    http: &Http,
    addr: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, WebDriverError> {
    let body = body.map(|b| serde_json::to_vec(b).expect("JSON always serializes"));
    let headers: &[(&str, &str)] = if body.is_some() {
        &[("content-type", "application/json; charset=utf-8")]
    } else {
        &[]
    };
    let r = http
        .request(method, addr, path, headers, body.unwrap_or_default())
        .await
        .map_err(|e| WebDriverError {
            error: "no answer".into(),
            message: e,
        })?;
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| WebDriverError {
        error: "bad answer".into(),
        message: format!("{} {e}: {}", r.status, r.text()),
    })?;
    if r.is_success() {
        Ok(v["value"].clone())
    } else {
        Err(WebDriverError {
            error: v["value"]["error"].as_str().unwrap_or("unknown").to_owned(),
            message: v["value"]["message"].as_str().unwrap_or("").to_owned(),
        })
    }
}

/// A WebDriver error answer: `error` is the protocol's code, such as "no such alert".
#[derive(Debug, Clone)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // chromedriver's messages carry a long stack trace; the first line says it all.
        let first = self.message.lines().next().unwrap_or("");
        write!(f, "{}: {first}", self.error)
    }
}

/// One browser window.
pub struct Session {
    http: Http,
    addr: String,
    id: String,
    open: Arc<Mutex<Vec<String>>>,
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Session {
    async fn cmd(&self, method: Method, path: &str, body: Option<&Value>) -> Value {
        let full = format!("/session/{}{path}", self.id);
        call(&self.http, &self.addr, method.clone(), &full, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    pub async fn set_window(&self, width: u32, height: u32) {
        self.cmd(
            Method::POST,
            "/window/rect",
            Some(&json!({"width": width, "height": height})),
        )
        .await;
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", Some(&json!({ "url": url })))
            .await;
    }

    pub async fn find(&self, css: &str) -> Element {
        let v = self
            .cmd(
                Method::POST,
                "/element",
                Some(&json!({"using": "css selector", "value": css})),
            )
            .await;
        Element(
            v[ELEMENT_KEY]
                .as_str()
                .unwrap_or_else(|| panic!("no element reference for {css:?}: {v}"))
                .to_owned(),
        )
    }

    /// Types `text` into an element (focusing it first).
    pub async fn send_keys(&self, el: &Element, text: &str) {
        self.cmd(
            Method::POST,
            &format!("/element/{}/value", el.0),
            Some(&json!({ "text": text })),
        )
        .await;
    }

    pub async fn clear(&self, el: &Element) {
        self.cmd(
            Method::POST,
            &format!("/element/{}/clear", el.0),
            Some(&json!({})),
        )
        .await;
    }

    pub async fn click(&self, el: &Element) {
        self.cmd(
            Method::POST,
            &format!("/element/{}/click", el.0),
            Some(&json!({})),
        )
        .await;
    }

    /// Runs `script` as a function body with `args`; returns what it returns.
    pub async fn exec(&self, script: &str, args: &[Value]) -> Value {
        self.cmd(
            Method::POST,
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` until `check` accepts its result, at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        script: &str,
        mut check: impl FnMut(&Value) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.exec(script, &[]).await;
            let last = match check(&v) {
                Ok(t) => return t,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The text of an open alert, confirm or prompt dialog; `None` when there is none.
    pub async fn alert_text(&self) -> Option<String> {
        let path = format!("/session/{}/alert/text", self.id);
        match call(&self.http, &self.addr, Method::GET, &path, None).await {
            Ok(v) => Some(v.as_str().unwrap_or_default().to_owned()),
            Err(e) if e.error == "no such alert" => None,
            Err(e) => panic!("WebDriver GET /alert/text: {e}"),
        }
    }

    /// Saves a PNG of the window's viewport to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self.cmd(Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("a screenshot is a base64 string"))
            .expect("a screenshot decodes");
        assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("creating the screenshot dir");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Ends the session and closes its browser.
    pub async fn close(self) {
        let path = format!("/session/{}", self.id);
        let _ = call(&self.http, &self.addr, Method::DELETE, &path, None).await;
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|s| *s != self.id);
    }
}
