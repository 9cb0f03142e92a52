//! A minimal SMTP server for SMTP clients such as swaks. It answers every
//! command, but holds the reply to the end of each message's data until the
//! test releases it, so that sessions overlap for as long as the test needs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::listener::listening_socket;

/// The longest a session is held when the test never releases it.
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);

/// What the sessions have done so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SmtpCounts {
    /// Sessions accepted.
    pub sessions: u64,
    /// Sessions waiting for their end-of-data reply.
    pub held: u64,
    /// Messages accepted with 250 after the hold.
    pub delivered: u64,
}

#[derive(Debug, Default)]
struct Gate {
    counts: Mutex<(SmtpCounts, bool)>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, (SmtpCounts, bool)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut SmtpCounts)) {
        change(&mut self.lock().0);
        self.changed.notify_all();
    }

    /// Counts the session as held until released (or `HOLD_LIMIT`).
    fn hold(&self) {
        let deadline = Instant::now() + HOLD_LIMIT;
        let mut guard = self.lock();
        guard.0.held += 1;
        self.changed.notify_all();
        while !guard.1 && Instant::now() < deadline {
            guard = match self.changed.wait_timeout(guard, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        guard.0.held -= 1;
        self.changed.notify_all();
    }
}

/// An SMTP server on one address, served until dropped.
#[derive(Debug)]
pub struct SmtpServer {
    addr: SocketAddr,
    gate: Arc<Gate>,
    thread: Option<JoinHandle<()>>,
}

impl SmtpServer {
    /// Listens on `addr` (e.g. 127.0.120.1:25).
    pub fn start(addr: impl Into<SocketAddr>) -> Result<SmtpServer> {
        let addr = addr.into();
        let listener = listening_socket(addr)?;
        let gate = Arc::new(Gate::default());
        let shared = Arc::clone(&gate);
        let thread = std::thread::spawn(move || accept_sessions(&listener, &shared));
        Ok(SmtpServer {
            addr,
            gate,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counts(&self) -> SmtpCounts {
        self.gate.lock().0
    }

    /// Lets every held session, and every later one, finish.
    pub fn release(&self) {
        self.gate.lock().1 = true;
        self.gate.changed.notify_all();
    }

    /// Waits until `ready` holds for the counts; fails with them after
    /// `timeout`.
    pub fn wait(&self, timeout: Duration, ready: impl Fn(&SmtpCounts) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut guard = self.gate.lock();
        while !ready(&guard.0) {
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "{}: SMTP sessions not as expected: {:?}",
                    self.addr,
                    guard.0
                );
            }
            guard = match self.gate.changed.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        Ok(())
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.release();
        self.gate.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_sessions(listener: &TcpListener, gate: &Arc<Gate>) {
    while !gate.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                gate.update(|c| c.sessions += 1);
                let gate = Arc::clone(gate);
                std::thread::spawn(move || {
                    let _ = session(stream, &gate);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One SMTP session, answered line by line.
fn session(stream: TcpStream, gate: &Gate) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = stream.try_clone()?;
    let mut lines = BufReader::new(stream);
    out.write_all(b"220 qthrottle-test ESMTP\r\n")?;
    let mut in_data = false;
    let mut line = String::new();
    while lines.read_line(&mut line)? > 0 {
        let command = line.trim_end().to_ascii_uppercase();
        line.clear();
        let reply = if in_data {
            if command != "." {
                continue;
            }
            in_data = false;
            gate.hold();
            gate.update(|c| c.delivered += 1);
            "250 queued"
        } else {
            match reply_to(&command) {
                Some("354 go ahead") => {
                    in_data = true;
                    "354 go ahead"
                }
                Some(reply) => reply,
                None => {
                    out.write_all(b"221 bye\r\n")?;
                    return Ok(());
                }
            }
        };
        out.write_all(format!("{reply}\r\n").as_bytes())?;
    }
    Ok(())
}

/// The reply to a command outside DATA; None for QUIT.
fn reply_to(command: &str) -> Option<&'static str> {
    let verb = command.split_whitespace().next().unwrap_or("");
    Some(match verb {
        "EHLO" => "250-qthrottle-test\r\n250 8BITMIME",
        "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => "250 ok",
        "DATA" => "354 go ahead",
        "QUIT" => return None,
        _ => "502 not implemented",
    })
}
