//! Descriptors 0 and 1, which carry the protocol: made valid at start, read
//! and written without blocking the event loop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::server::Event;

/// Make descriptors 0, 1 and 2 valid, each closed one onto /dev/null, so
/// that nothing opened later lands on a protocol descriptor. Opens nothing
/// and allocates nothing when all three are open.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        // SAFETY: open with a static NUL-terminated path; the lowest free
        // descriptor is `fd` itself, since all below it are open.
        let opened = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if opened != fd && opened >= 0 {
            // SAFETY: moving the descriptor we just opened to `fd`.
            unsafe {
                libc::dup2(opened, fd);
                libc::close(opened);
            }
        }
    }
}

/// A standard descriptor; never closed by this module.
struct Std(RawFd);

impl AsRawFd for Std {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fd 0 and 1 stay open for the life of the process.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Watch a standard descriptor with the event loop.
fn watch(fd: RawFd, interest: Interest) -> io::Result<AsyncFd<Std>> {
    set_nonblocking(fd)?;
    // SAFETY: descriptors 0 and 1 stay open for the life of the process,
    // longer than the AsyncFd that watches them.
    unsafe { AsyncFd::register_with_interest(Std(fd), interest) }.map_err(|e| e.into_parts().1)
}

fn raw_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: fd stays open; reading into a buffer we own.
    let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn raw_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: fd stays open; writing from a buffer we own.
    let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Read the commands on descriptor 0 and pass them on; a thread does it if
/// the descriptor cannot be polled (a regular file).
pub async fn read_commands(events: UnboundedSender<Event>) {
    let watched = watch(0, Interest::READABLE);
    let Ok(fd) = watched else {
        std::thread::spawn(move || read_blocking(events));
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(mut guard) = fd.readable().await else {
            break;
        };
        match guard.try_io(|_| raw_read(0, &mut buf)) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                let _ = events.send(Event::Input(buf[..n].to_vec()));
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => break,
            Err(_would_block) => {}
        }
    }
    let _ = events.send(Event::InputEnd);
}

fn read_blocking(events: UnboundedSender<Event>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match raw_read(0, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = events.send(Event::Input(buf[..n].to_vec()));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = events.send(Event::InputEnd);
}

/// Write the reports to descriptor 1 in order. After a write error nothing
/// more is written, as with qmail's spawner, and the reports are dropped.
pub async fn write_reports(mut reports: UnboundedReceiver<Vec<u8>>) {
    let fd = watch(1, Interest::WRITABLE).ok();
    let mut writing = true;
    let mut batch = Vec::new();
    while reports.recv_many(&mut batch, 64).await > 0 {
        for chunk in batch.drain(..) {
            if writing {
                writing = write_all(fd.as_ref(), &chunk).await.is_ok();
            }
        }
    }
}

async fn write_all(fd: Option<&AsyncFd<Std>>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let written = match fd {
            Some(fd) => {
                let mut guard = fd.writable().await?;
                match guard.try_io(|_| raw_write(1, data)) {
                    Ok(r) => r,
                    Err(_would_block) => continue,
                }
            }
            None => raw_write(1, data),
        };
        match written {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
