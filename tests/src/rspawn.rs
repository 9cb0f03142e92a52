//! Fixtures for driving the spawner exactly as qmail-send does: a qmail
//! directory with queued messages, the spawner process with a driver that
//! writes commands and parses reports, a stand-in for the daemon's control
//! socket, and an SMTP server that counts the sessions open at once.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use qthrottle::control::{GroupDeliveries, Request, Response};

use crate::env::qthrottle_bin;
use crate::listener::listening_socket;

/// The stand-in for qmail-remote: `$FAKE_QMAIL_REMOTE`, else next to the
/// running program (or its parent directory, for test binaries in `deps`),
/// else in `$QTHROTTLE_TARGET_DIR`.
pub fn fake_remote_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("FAKE_QMAIL_REMOTE") {
        return PathBuf::from(path);
    }
    let name = "fake-qmail-remote";
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dirs: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(Path::to_path_buf)
        .collect();
    dirs.extend(std::env::var_os("QTHROTTLE_TARGET_DIR").map(PathBuf::from));
    let found = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    found.unwrap_or_else(|| PathBuf::from(name))
}

/// The spawner binary: `$QTHROTTLE_RSPAWN_BIN`, else the `qthrottle` binary.
pub fn spawner_bin() -> PathBuf {
    std::env::var_os("QTHROTTLE_RSPAWN_BIN").map_or_else(qthrottle_bin, PathBuf::from)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A qmail directory (`queue/mess`, `queue/lock/tcpto`, `control`) in a
/// temporary place, removed on drop.
#[derive(Debug)]
pub struct QmailDir {
    root: PathBuf,
    next: AtomicU64,
}

impl QmailDir {
    pub fn new() -> Result<QmailDir> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("qt-rspawn-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["queue/mess/0", "queue/lock", "control", "bin"] {
            std::fs::create_dir_all(root.join(dir))
                .with_context(|| format!("failed to create {}", root.join(dir).display()))?;
        }
        std::fs::write(root.join("queue/lock/tcpto"), [1u8; 1024])
            .context("failed to write tcpto")?;
        Ok(QmailDir {
            root,
            next: AtomicU64::new(1000),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Queue a message; returns its id as qmail-send names it (`0/N`).
    pub fn message(&self, body: &str) -> Result<String> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let id = format!("0/{n}");
        let path = self.root.join("queue/mess").join(&id);
        std::fs::write(&path, body)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(id)
    }

    /// Full path of a queued message.
    pub fn message_path(&self, id: &str) -> PathBuf {
        self.root.join("queue/mess").join(id)
    }

    /// Write `control/smtproutes`.
    pub fn set_routes(&self, text: &str) -> Result<()> {
        std::fs::write(self.root.join("control/smtproutes"), text)
            .context("failed to write smtproutes")
    }

    /// The contents of `queue/lock/tcpto`.
    pub fn tcpto(&self) -> Result<Vec<u8>> {
        std::fs::read(self.root.join("queue/lock/tcpto")).context("failed to read tcpto")
    }
}

impl Drop for QmailDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Delivery numbers of one byte (stock qmail-send) or two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    OneByte,
    TwoByte,
}

/// How to run the spawner.
#[derive(Debug, Clone)]
pub struct Options {
    pub wire: Wire,
    pub concurrency: u32,
    pub hold_timeout: u64,
    pub hold_queue: usize,
    /// The daemon's control socket (need not exist).
    pub socket: PathBuf,
    /// Extra configuration text (ports, groups) for a real daemon's file.
    pub config_prefix: String,
    /// Environment for the spawner and so for qmail-remote.
    pub env: Vec<(String, String)>,
    /// Run as `qthrottle rspawn` instead of through a `qmail-rspawn` link.
    pub subcommand: bool,
}

impl Options {
    pub fn new(wire: Wire, concurrency: u32, socket: &Path) -> Options {
        Options {
            wire,
            concurrency,
            hold_timeout: 600,
            hold_queue: 10_000,
            socket: socket.to_path_buf(),
            config_prefix: String::new(),
            env: Vec::new(),
            subcommand: false,
        }
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Options {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The configuration file's text.
    pub fn config_text(&self, qmail: &QmailDir) -> String {
        let wire = match self.wire {
            Wire::OneByte => "one-byte",
            Wire::TwoByte => "two-byte",
        };
        let mut text = self.config_prefix.clone();
        if !text.contains("\nsocket =") && !text.starts_with("socket =") {
            text = format!("socket = {:?}\n{text}", self.socket.display().to_string());
        }
        let qmail_dir = qmail.path().display().to_string();
        text.push_str(&format!(
            "\n[rspawn]\nqmail_dir = {qmail_dir:?}\nwire = \"{wire}\"\nconcurrency = {}\n\
             hold_timeout = {}\nhold_queue = {}\n",
            self.concurrency, self.hold_timeout, self.hold_queue
        ));
        text
    }
}

/// One report: delivery number, K/Z/D and the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub delnum: u16,
    pub letter: char,
    pub text: String,
}

/// A running spawner, driven as qmail-send drives it.
#[derive(Debug)]
pub struct Spawner {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: Receiver<Report>,
    wire: Wire,
    /// The concurrency the spawner announced.
    pub announced: u32,
}

impl Spawner {
    /// Write the configuration into the qmail directory and start the
    /// spawner with it; waits for the announcement.
    pub fn start(qmail: &QmailDir, opts: &Options) -> Result<Spawner> {
        let mut command = Self::command(qmail, opts)?;
        Self::spawn(&mut command, opts.wire)
    }

    /// The command that runs the spawner, for callers that adjust it.
    pub fn command(qmail: &QmailDir, opts: &Options) -> Result<Command> {
        Self::wrapped_command(qmail, opts, &[])
    }

    /// The command that runs `WRAPPER... qmail-rspawn` (for example
    /// `qthrottle exec -- setpriv ... --`).
    pub fn wrapped_command(qmail: &QmailDir, opts: &Options, wrapper: &[&str]) -> Result<Command> {
        let config = qmail.path().join("qthrottle.toml");
        std::fs::write(&config, opts.config_text(qmail)).context("failed to write config")?;
        let link = qmail.path().join("bin/qmail-rspawn");
        let _ = std::fs::remove_file(&link);
        symlink(spawner_bin(), &link).context("failed to link qmail-rspawn")?;
        let mut command = match (wrapper.split_first(), opts.subcommand) {
            (Some((program, args)), _) => {
                let mut c = Command::new(program);
                c.args(args).arg(&link);
                c
            }
            (None, true) => {
                let mut c = Command::new(spawner_bin());
                c.arg("rspawn");
                c
            }
            (None, false) => Command::new(&link),
        };
        command
            .env("QTHROTTLE_CONFIG", &config)
            .env("QMAILREMOTE", fake_remote_bin())
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(command)
    }

    /// Start a prepared command and read its announcement.
    pub fn spawn(command: &mut Command, wire: Wire) -> Result<Spawner> {
        let mut child = command.spawn().context("failed to start the spawner")?;
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let mut announced = [0u8; 2];
        let width = if wire == Wire::OneByte { 1 } else { 2 };
        if let Err(e) = stdout.read_exact(&mut announced[..width]) {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            bail!("spawner announced nothing ({e}); stderr: {text}");
        }
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
        let announced = u32::from(u16::from_le_bytes(announced));
        let (tx, reports) = channel();
        std::thread::spawn(move || read_reports(stdout, wire, &tx));
        Ok(Spawner {
            child,
            stdin,
            reports,
            wire,
            announced,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many qmail-remote processes the spawner's workers run now.
    pub fn remotes_running(&self) -> Result<usize> {
        let mut n = 0;
        for worker in children(self.pid())? {
            n += children(worker)?.len();
        }
        Ok(n)
    }

    /// Send one command.
    pub fn send(&mut self, delnum: u16, messid: &str, sender: &str, recip: &str) -> Result<()> {
        let bytes = self.command_bytes(delnum, messid, sender, recip);
        self.send_raw(&bytes)
    }

    /// The bytes of one command.
    pub fn command_bytes(&self, delnum: u16, messid: &str, sender: &str, recip: &str) -> Vec<u8> {
        let mut bytes = match self.wire {
            Wire::OneByte => vec![delnum as u8],
            Wire::TwoByte => delnum.to_le_bytes().to_vec(),
        };
        for field in [messid, sender, recip] {
            bytes.extend_from_slice(field.as_bytes());
            bytes.push(0);
        }
        bytes
    }

    /// Send bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let stdin = self.stdin.as_mut().context("input already closed")?;
        stdin
            .write_all(bytes)
            .context("failed to write to the spawner")?;
        stdin.flush().context("failed to flush the spawner's input")
    }

    /// The next report, waiting at most `timeout`.
    pub fn report(&self, timeout: Duration) -> Result<Report> {
        match self.reports.recv_timeout(timeout) {
            Ok(report) => Ok(report),
            Err(RecvTimeoutError::Timeout) => bail!("no report within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("the spawner's output ended"),
        }
    }

    /// The next `n` reports, keyed by delivery number; fails on a number
    /// reported twice.
    pub fn reports(&self, n: usize, timeout: Duration) -> Result<HashMap<u16, Report>> {
        let deadline = Instant::now() + timeout;
        let mut got = HashMap::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let report = self
                .report(left)
                .with_context(|| format!("after {} reports", got.len()))?;
            if let Some(old) = got.insert(report.delnum, report) {
                bail!("delivery {} reported twice (first: {old:?})", old.delnum);
            }
        }
        Ok(got)
    }

    /// End the input, as qmail-send does when it exits.
    pub fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Wait for the spawner to exit; the reports left are returned.
    pub fn wait(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<Report>)> {
        self.close_input();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("failed to wait")? {
                let rest = self.reports.iter().collect();
                return Ok((status, rest));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("spawner still running after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child processes of `pid`.
pub fn children(pid: u32) -> Result<Vec<u32>> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    Ok(text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn read_reports(stdout: impl Read, wire: Wire, tx: &std::sync::mpsc::Sender<Report>) {
    let mut input = BufReader::with_capacity(1 << 16, stdout);
    loop {
        let mut number = [0u8; 2];
        let width = if wire == Wire::OneByte { 1 } else { 2 };
        if input.read_exact(&mut number[..width]).is_err() {
            return;
        }
        let mut text = Vec::new();
        if input.read_until(0, &mut text).is_err() || text.pop() != Some(0) {
            return;
        }
        let letter = text.first().map_or('?', |&b| char::from(b));
        let text = String::from_utf8_lossy(text.get(1..).unwrap_or_default()).into_owned();
        let report = Report {
            delnum: u16::from_le_bytes(number),
            letter,
            text,
        };
        if tx.send(report).is_err() {
            return;
        }
    }
}

/// What a fake daemon answers for one domain.
#[derive(Debug, Clone)]
pub struct Answer {
    pub group: String,
    pub limit: u32,
    pub ttl: u64,
}

#[derive(Debug, Default)]
struct Seen {
    lookups: Vec<(String, Option<String>)>,
    deliveries: Vec<std::collections::BTreeMap<String, GroupDeliveries>>,
}

/// A stand-in for the daemon's control socket: answers lookups from a table
/// (a domain not in it gets an error answer) and records every request.
#[derive(Debug)]
pub struct FakeDaemon {
    path: PathBuf,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeDaemon {
    pub fn start(path: &Path, answers: &[(&str, Answer)]) -> Result<FakeDaemon> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("failed to bind {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let table: HashMap<String, Answer> = answers
            .iter()
            .map(|(d, a)| (d.to_string(), a.clone()))
            .collect();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        let table = Arc::new(table);
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (table, seen) = (Arc::clone(&table), Arc::clone(&seen2));
                        std::thread::spawn(move || serve_control(stream, &table, &seen));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(FakeDaemon {
            path: path.to_path_buf(),
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Every lookup so far: domain and relay.
    pub fn lookups(&self) -> Vec<(String, Option<String>)> {
        self.seen
            .lock()
            .map(|s| s.lookups.clone())
            .unwrap_or_default()
    }

    /// Every deliveries report so far.
    pub fn deliveries(&self) -> Vec<std::collections::BTreeMap<String, GroupDeliveries>> {
        self.seen
            .lock()
            .map(|s| s.deliveries.clone())
            .unwrap_or_default()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_control(stream: UnixStream, table: &HashMap<String, Answer>, seen: &Mutex<Seen>) {
    let mut out = &stream;
    for line in BufReader::new(&stream).lines() {
        let Ok(line) = line else { return };
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Lookup { domain, relay }) => {
                let answer = table.get(&domain).cloned();
                if let Ok(mut s) = seen.lock() {
                    s.lookups.push((domain, relay));
                }
                match answer {
                    Some(a) => Response::Group {
                        group: a.group,
                        limit: a.limit,
                        ttl: a.ttl,
                    },
                    None => Response::Error {
                        message: "unknown domain".into(),
                    },
                }
            }
            Ok(Request::Deliveries { groups }) => {
                if let Ok(mut s) = seen.lock() {
                    s.deliveries.push(groups);
                }
                Response::Ok
            }
            Ok(Request::Reload) => Response::Ok,
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        };
        let Ok(mut text) = serde_json::to_string(&response) else {
            return;
        };
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

#[derive(Debug, Default)]
struct SessionCounts {
    open: AtomicU64,
    max_open: AtomicU64,
    delivered: AtomicU64,
}

/// An SMTP server that accepts every message after holding the end-of-data
/// reply for a while, and counts the sessions open at once.
#[derive(Debug)]
pub struct SmtpCounter {
    addr: SocketAddr,
    counts: Arc<SessionCounts>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SmtpCounter {
    pub fn start(addr: impl Into<SocketAddr>, hold: Duration) -> Result<SmtpCounter> {
        let addr = addr.into();
        let listener = listening_socket(addr)?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(SessionCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (counts2, stop2) = (Arc::clone(&counts), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let counts = Arc::clone(&counts2);
                        std::thread::spawn(move || session(stream, &counts, hold));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(SmtpCounter {
            addr,
            counts,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Most sessions open at once so far.
    pub fn max_open(&self) -> u64 {
        self.counts.max_open.load(Ordering::SeqCst)
    }

    /// Messages accepted so far.
    pub fn delivered(&self) -> u64 {
        self.counts.delivered.load(Ordering::SeqCst)
    }
}

impl Drop for SmtpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn session(stream: TcpStream, counts: &SessionCounts, hold: Duration) {
    let open = counts.open.fetch_add(1, Ordering::SeqCst) + 1;
    counts.max_open.fetch_max(open, Ordering::SeqCst);
    let _ = stream.set_nonblocking(false);
    let _ = converse(&stream, counts, hold);
    counts.open.fetch_sub(1, Ordering::SeqCst);
}

fn converse(stream: &TcpStream, counts: &SessionCounts, hold: Duration) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = stream;
    out.write_all(b"220 counter ESMTP\r\n")?;
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    let mut in_data = false;
    while lines.read_line(&mut line)? > 0 {
        let reply: &[u8] = match (in_data, line.trim_end()) {
            (true, ".") => {
                in_data = false;
                std::thread::sleep(hold);
                counts.delivered.fetch_add(1, Ordering::SeqCst);
                b"250 ok queued\r\n"
            }
            (true, _) => b"",
            (false, cmd) if cmd.eq_ignore_ascii_case("DATA") => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            (false, cmd) if cmd.eq_ignore_ascii_case("QUIT") => {
                out.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            _ => b"250 ok\r\n",
        };
        out.write_all(reply)?;
        line.clear();
    }
    Ok(())
}
