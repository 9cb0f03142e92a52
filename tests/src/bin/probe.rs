//! A small program the kernel tests run inside a qthrottle cgroup. It reads
//! one command per line on stdin and answers one line on stdout:
//!
//! - `connect ADDR PORT`: a new TCP socket (AF_INET for an IPv4 ADDR,
//!   AF_INET6 for an IPv6 one, so `::ffff:a.b.c.d` goes through an AF_INET6
//!   socket) connects and is kept: `ok ID` or `err ERRNO ID`.
//! - `retry ID ADDR PORT`: connects socket ID again: `ok ID` or `err ERRNO ID`.
//! - `close ID`: closes socket ID with SO_LINGER 0: `closed ID`.
//! - `send ID`: writes one line on socket ID: `sent ID` or `err ERRNO ID`.
//! - `udp ADDR PORT`: a UDP socket connects and sends a datagram: `ok` or
//!   `err ERRNO`.
//! - `loop ADDR PORT SECONDS [abort|wait]`: connects and closes for SECONDS:
//!   `loop OK EPERM OTHER [FIRST_OTHER_ERRNO]`. `abort` (the default)
//!   closes at once with SO_LINGER 0. `wait` shuts down its side and waits
//!   until the server closes before closing, so the server only ever sees a
//!   connection while it is still counted in the kernel.
//! - `cgroup`: `cgroup PATH` from /proc/self/cgroup.
//!
//! A malformed command answers `bad MESSAGE`. It prints `probe PID` once at
//! start and exits at end of input.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, Shutdown, SockFlag, SockType, SockaddrStorage, connect, recv, send,
    setsockopt, shutdown, socket, sockopt,
};
use nix::sys::time::TimeVal;

fn main() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "probe {}", std::process::id())?;
    out.flush()?;
    let mut probe = Probe::default();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("failed to read a command")?;
        let answer = probe.run(&line).unwrap_or_else(|e| format!("bad {e:#}"));
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// The sockets kept by ID.
#[derive(Default)]
struct Probe {
    sockets: HashMap<u32, OwnedFd>,
    next_id: u32,
}

impl Probe {
    fn run(&mut self, line: &str) -> Result<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["connect", addr, port] => self.connect(destination(addr, port)?),
            ["retry", id, addr, port] => self.retry(id.parse()?, destination(addr, port)?),
            ["close", id] => self.close(id.parse()?),
            ["send", id] => self.send(id.parse()?),
            ["udp", addr, port] => Ok(udp(destination(addr, port)?)),
            ["loop", addr, port, secs] => run_loop(destination(addr, port)?, secs, "abort"),
            ["loop", addr, port, secs, mode] => run_loop(destination(addr, port)?, secs, mode),
            ["cgroup"] => own_cgroup(),
            _ => bail!("unknown command {line:?}"),
        }
    }

    fn connect(&mut self, to: SocketAddr) -> Result<String> {
        let fd = tcp_socket(to)?;
        let id = self.next_id;
        self.next_id += 1;
        let result = connect(fd.as_raw_fd(), &SockaddrStorage::from(to));
        self.sockets.insert(id, fd);
        Ok(answer(result, id))
    }

    fn retry(&mut self, id: u32, to: SocketAddr) -> Result<String> {
        let fd = self
            .sockets
            .get(&id)
            .with_context(|| format!("no socket {id}"))?;
        Ok(answer(
            connect(fd.as_raw_fd(), &SockaddrStorage::from(to)),
            id,
        ))
    }

    fn close(&mut self, id: u32) -> Result<String> {
        let fd = self
            .sockets
            .remove(&id)
            .with_context(|| format!("no socket {id}"))?;
        abort(fd);
        Ok(format!("closed {id}"))
    }

    fn send(&mut self, id: u32) -> Result<String> {
        let fd = self
            .sockets
            .get(&id)
            .with_context(|| format!("no socket {id}"))?;
        Ok(
            match send(fd.as_raw_fd(), b"probe\r\n", MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => format!("sent {id}"),
                Err(e) => format!("err {e:?} {id}"),
            },
        )
    }
}

fn destination(addr: &str, port: &str) -> Result<SocketAddr> {
    let ip: IpAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr:?}"))?;
    let port: u16 = port.parse().with_context(|| format!("bad port {port:?}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn answer(result: nix::Result<()>, id: u32) -> String {
    match result {
        Ok(()) => format!("ok {id}"),
        Err(e) => format!("err {e:?} {id}"),
    }
}

fn family(to: SocketAddr) -> AddressFamily {
    if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn tcp_socket(to: SocketAddr) -> Result<OwnedFd> {
    let fd = socket(family(to), SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .context("failed to create a TCP socket")?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, sockopt::Linger, &linger).context("failed to set SO_LINGER")?;
    Ok(fd)
}

/// Closes a socket with SO_LINGER 0 already set: a reset, no TIME_WAIT.
fn abort(fd: OwnedFd) {
    drop(fd);
}

fn udp(to: SocketAddr) -> String {
    let result =
        socket(family(to), SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).and_then(|fd| {
            connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
            send(fd.as_raw_fd(), b"probe", MsgFlags::empty())
        });
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("err {e:?}"),
    }
}

/// Counts of one loop run.
#[derive(Default)]
struct LoopCounts {
    ok: u64,
    eperm: u64,
    other: u64,
    first_other: Option<Errno>,
}

fn run_loop(to: SocketAddr, secs: &str, mode: &str) -> Result<String> {
    let secs: f64 = secs
        .parse()
        .with_context(|| format!("bad seconds {secs:?}"))?;
    let wait = match mode {
        "abort" => false,
        "wait" => true,
        _ => bail!("bad loop mode {mode:?}"),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut counts = LoopCounts::default();
    while Instant::now() < deadline {
        let fd = tcp_socket(to)?;
        match connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
            Ok(()) => {
                counts.ok += 1;
                if wait {
                    wait_for_server_close(&fd);
                }
            }
            Err(Errno::EPERM) => counts.eperm += 1,
            Err(e) => {
                counts.other += 1;
                counts.first_other.get_or_insert(e);
            }
        }
        abort(fd);
    }
    let first = counts
        .first_other
        .map(|e| format!(" {e:?}"))
        .unwrap_or_default();
    Ok(format!(
        "loop {} {} {}{first}",
        counts.ok, counts.eperm, counts.other
    ))
}

/// Sends FIN and reads until the server's FIN or reset (at most 10 s).
fn wait_for_server_close(fd: &OwnedFd) {
    let _ = setsockopt(fd, sockopt::ReceiveTimeout, &TimeVal::new(10, 0));
    let _ = shutdown(fd.as_fd().as_raw_fd(), Shutdown::Write);
    let mut buf = [0u8; 256];
    while let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
        if n == 0 {
            break;
        }
    }
}

fn own_cgroup() -> Result<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").context("failed to read cgroup")?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("?");
    Ok(format!("cgroup {path}"))
}
