//! A TCP listener that accepts on one address, holds every connection open
//! until its peer closes, and counts how many are open at once.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

/// The listen backlog: loops of thousands of connects must never see a
/// dropped SYN (and its one-second retransmit).
pub const BACKLOG: i32 = 4096;

/// Counters shared between the listener thread and the test.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    max_open: AtomicU64,
    accepted: AtomicU64,
    stop: AtomicBool,
}

/// A listening socket served by its own thread until dropped.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Listens on `addr` (e.g. 127.0.101.1:25 or [::1]:2525).
    pub fn start(addr: impl Into<SocketAddr>) -> Result<Listener> {
        let addr = addr.into();
        let socket = listening_socket(addr)?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let thread = std::thread::spawn(move || serve(&socket, &shared));
        Ok(Listener {
            addr,
            counters,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted and not yet closed by their peer.
    pub fn open(&self) -> u64 {
        self.counters.open.load(Ordering::SeqCst)
    }

    /// The most connections ever open at once.
    pub fn max_open(&self) -> u64 {
        self.counters.max_open.load(Ordering::SeqCst)
    }

    /// Connections accepted in all.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Waits until exactly `n` connections are open.
    pub fn wait_open(&self, n: u64, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        while self.open() != n {
            if start.elapsed() >= timeout {
                bail!(
                    "{}: {} connections open, expected {n}",
                    self.addr,
                    self.open()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.counters.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A non-blocking listening socket with SO_REUSEADDR and a large backlog.
pub fn listening_socket(addr: SocketAddr) -> Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd: OwnedFd =
        socket(family, SockType::Stream, flags, None).context("failed to create a socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("failed to set SO_REUSEADDR")?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).context("failed to set IPV6_V6ONLY")?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("failed to bind {addr}"))?;
    let backlog = Backlog::new(BACKLOG).context("failed to size the backlog")?;
    listen(&fd, backlog).with_context(|| format!("failed to listen on {addr}"))?;
    Ok(TcpListener::from(fd))
}

/// Closes a connection with a reset, leaving no TIME_WAIT behind.
pub fn abort(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(&stream, sockopt::Linger, &linger);
    drop(stream);
}

fn serve(listener: &TcpListener, counters: &Counters) {
    let mut conns: Vec<TcpStream> = Vec::new();
    while !counters.stop.load(Ordering::SeqCst) {
        wait_readable(listener, &conns);
        conns.retain_mut(|conn| {
            let open = still_open(conn);
            if !open {
                counters.open.fetch_sub(1, Ordering::SeqCst);
            }
            open
        });
        while let Ok((conn, _)) = listener.accept() {
            if conn.set_nonblocking(true).is_err() {
                continue;
            }
            let open = counters.open.fetch_add(1, Ordering::SeqCst) + 1;
            counters.max_open.fetch_max(open, Ordering::SeqCst);
            counters.accepted.fetch_add(1, Ordering::SeqCst);
            conns.push(conn);
        }
    }
    conns.into_iter().for_each(abort);
}

/// Reads whatever the peer sent; false once it closed or reset. A closed
/// connection is closed here too.
fn still_open(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(&*conn, sockopt::Linger, &linger);
    false
}

/// Waits up to 50 ms for the listener or any connection to be readable.
fn wait_readable(listener: &TcpListener, conns: &[TcpStream]) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
        .chain(conns.iter().map(AsRawFd::as_raw_fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let count = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `fds` is a valid, exclusively borrowed array of `count`
    // pollfd entries for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), count, 50) };
}
