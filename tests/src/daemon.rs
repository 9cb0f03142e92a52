//! A `qthrottle daemon` run for one test environment: started, waited for
//! until it logs `ready`, killed and restarted at will, its stderr kept.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::env::{TestEnv, qthrottle_bin};

/// How long a daemon may take to log `ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines a daemon wrote to stderr, and whether its stderr has closed.
#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// Which run of the daemon writes now.
    run: u64,
    /// Whether the current run's stderr has closed.
    closed: bool,
}

/// Stderr of every run of one daemon, shared with the reader threads.
#[derive(Debug, Default)]
pub struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn push(&self, line: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.lines.push(line);
        self.changed.notify_all();
    }

    fn close(&self, run: u64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.run == run {
            state.closed = true;
            self.changed.notify_all();
        }
    }

    /// Starts a new run; returns its number and its first line's index.
    fn reopen(&self) -> (u64, usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.run += 1;
        state.closed = false;
        state.lines.push("---- daemon started ----".to_owned());
        (state.run, state.lines.len())
    }

    /// Every line so far, one per line.
    pub fn text(&self) -> String {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.lines.join("\n")
    }

    /// Waits until a line from index `from` on contains `needle`. Fails when
    /// the timeout passes or the stream closes first.
    fn wait_for(&self, from: usize, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let found = state.lines.iter().skip(from).find(|l| l.contains(needle));
            if let Some(line) = found {
                return Ok(line.clone());
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                let why = if state.closed {
                    "daemon exited"
                } else {
                    "timed out"
                };
                bail!(
                    "{why} before logging {needle:?}; log:\n{}",
                    state.lines.join("\n")
                );
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// A running (or killed) `qthrottle daemon --config PATH`.
#[derive(Debug)]
pub struct Daemon {
    config: PathBuf,
    child: Option<Child>,
    log: Arc<Log>,
    /// Index of the current run's first log line.
    run_from: usize,
    /// Whether dropping prints the whole log (test harnesses show it only
    /// for a failing test).
    log_on_drop: bool,
}

impl Daemon {
    /// Starts the daemon for `env` and waits until it logs `ready`.
    pub fn start(env: &TestEnv) -> Result<Daemon> {
        let mut daemon = Daemon {
            config: env.config_path(),
            child: None,
            log: Arc::default(),
            run_from: 0,
            log_on_drop: true,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    fn spawn(&mut self) -> Result<()> {
        let (run, from) = self.log.reopen();
        self.run_from = from;
        let mut child = Command::new(qthrottle_bin())
            .arg("daemon")
            .arg("--config")
            .arg(&self.config)
            .env("QTHROTTLE_CONFIG", &self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {} daemon", qthrottle_bin().display()))?;
        let stderr = child
            .stderr
            .take()
            .context("failed to take the daemon's stderr")?;
        self.child = Some(child);
        read_lines(stderr, Arc::clone(&self.log), run);
        self.log
            .wait_for(from, "ready", READY_TIMEOUT)
            .context("failed to start the daemon")?;
        Ok(())
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("failed to kill the daemon")?;
            child.wait().context("failed to reap the daemon")?;
        }
        Ok(())
    }

    /// Kills the daemon if it runs, starts it again with the same
    /// configuration and waits for its new `ready` line.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Sends a signal (SIGHUP to reload, SIGTERM to stop).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("the daemon is not running")?;
        let pid = Pid::from_raw(i32::try_from(pid).context("failed to convert the daemon pid")?);
        kill(pid, signal).with_context(|| format!("failed to send {signal} to the daemon"))
    }

    /// Waits until the daemon exits by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let child = self.child.as_mut().context("the daemon is not running")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().context("failed to wait for the daemon")? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                bail!(
                    "daemon still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a log line of the current run containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.log.wait_for(self.run_from, needle, timeout)
    }

    /// Whether dropping the daemon prints its log to stderr (the default).
    pub fn log_on_drop(&mut self, print: bool) {
        self.log_on_drop = print;
    }

    /// Everything the daemon logged, all runs.
    pub fn log(&self) -> String {
        self.log.text()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("{e:#}");
        }
        if self.log_on_drop {
            eprintln!("daemon log ({}):\n{}", self.config.display(), self.log());
        }
    }
}

fn read_lines(stderr: ChildStderr, log: Arc<Log>, run: u64) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            match line {
                Ok(line) => log.push(line),
                Err(_) => break,
            }
        }
        log.close(run);
    });
}
