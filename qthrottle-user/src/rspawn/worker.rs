//! A worker process: runs qmail-remote for each delivery the spawner hands it
//! over descriptor 0, collects the output, reaps the child, and sends the
//! report back. A small single-threaded epoll loop.

use std::ffi::{CStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{Mode, SFlag, fstat};
use nix::unistd::pipe2;

use super::child::{Launcher, Program};
use super::frame;
use super::report;
use super::wire::answer;

/// The argument that makes the binary a worker; the queue owner's uid follows.
pub const WORKER_ARG: &str = "--rspawn-worker";

const CONTROL: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_DELIVERY: usize = 2;

/// Run as a worker: `args` are what follows [`WORKER_ARG`].
pub fn main(args: &[OsString]) -> ExitCode {
    let uid = args
        .first()
        .and_then(|a| a.to_str())
        .and_then(|a| a.parse().ok());
    let Some(queue_uid) = uid else {
        return ExitCode::from(111);
    };
    match Worker::new(queue_uid).and_then(|mut w| w.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(111),
    }
}

struct Running {
    id: u16,
    pid: libc::pid_t,
    pipe: Option<OwnedFd>,
    output: Vec<u8>,
}

struct Worker {
    launcher: Launcher,
    poll: Poll,
    signals: SignalFd,
    control: OwnedFd,
    queue_uid: u32,
    reader: frame::Reader,
    out: Vec<u8>,
    slots: Vec<Option<Running>>,
    free: Vec<usize>,
    running: usize,
    /// Deliveries whose output ended before their child was reaped.
    ended: Vec<usize>,
    input_open: bool,
}

impl Worker {
    fn new(queue_uid: u32) -> io::Result<Self> {
        // The launcher takes the staging descriptors, so it comes first.
        let launcher = Launcher::new(Program::from_env())?;
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // SAFETY: descriptor 0 is the socket to the spawner, given to this
        // process for its own use; nothing else in the worker owns it.
        let control = unsafe { OwnedFd::from_raw_fd(0) };
        set_nonblocking(&control)?;
        let poll = Poll::new()?;
        let both = Interest::READABLE | Interest::WRITABLE;
        poll.registry()
            .register(&mut SourceFd(&control.as_raw_fd()), CONTROL, both)?;
        let signal_fd = signals.as_fd().as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&signal_fd), SIGNALS, Interest::READABLE)?;
        Ok(Worker {
            launcher,
            poll,
            signals,
            control,
            queue_uid,
            reader: frame::Reader::default(),
            out: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            running: 0,
            ended: Vec::new(),
            input_open: true,
        })
    }

    /// Until the spawner closes its socket and every delivery is reported.
    /// Every source is edge-triggered: each is read until it would block.
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        while self.input_open || self.running > 0 || !self.out.is_empty() {
            match self.poll.poll(&mut events, None) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            }
            for event in &events {
                match event.token() {
                    CONTROL => self.read_control()?,
                    SIGNALS => self.reap_ended()?,
                    Token(t) => self.read_output(t - FIRST_DELIVERY)?,
                }
            }
            self.flush()?;
        }
        Ok(())
    }

    /// Read the spawner's frames and start each delivery.
    fn read_control(&mut self) -> io::Result<()> {
        while self.input_open {
            let buf = self.reader.buffer();
            let at = buf.len();
            buf.resize(at + 64 * 1024, 0);
            let r = nix::unistd::read(&self.control, &mut buf[at..]);
            buf.truncate(at + *r.as_ref().unwrap_or(&0));
            match r {
                Ok(0) => self.input_open = false,
                Ok(_) => self.start_frames(),
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn start_frames(&mut self) {
        let mut starts = Vec::new();
        while let Some((id, payload)) = self.reader.frame() {
            starts.push((id, payload.to_vec()));
        }
        for (id, payload) in starts {
            if let Err(text) = self.start(id, &payload) {
                frame::put(&mut self.out, id, text);
            }
        }
    }

    /// Open the message, check it as qmail does, and start qmail-remote.
    fn start(&mut self, id: u16, payload: &[u8]) -> Result<(), &'static [u8]> {
        let [messid, sender, recip] = split_fields(payload).ok_or(answer::CANNOT_OPEN)?;
        let host = host_cstr(recip).ok_or(answer::NO_HOST)?;
        let message = self.open_message(messid)?;
        let (output, pipe_in) = pipe2(OFlag::O_CLOEXEC).map_err(|_| answer::CANNOT_PIPE)?;
        set_nonblocking(&output).map_err(|_| answer::CANNOT_PIPE)?;
        let pid = self
            .launcher
            .spawn(message, pipe_in, [host, sender, recip])
            .map_err(|_| answer::CANNOT_FORK)?;
        let slot = self.slots_insert(Running {
            id,
            pid,
            pipe: None,
            output: Vec::new(),
        });
        let token = Token(FIRST_DELIVERY + slot);
        let source = &mut SourceFd(&output.as_raw_fd());
        if self
            .poll
            .registry()
            .register(source, token, Interest::READABLE)
            .is_err()
        {
            // Unwatchable pipe: let the child finish on its own and report
            // without its output rather than never.
            drop(output);
            self.output_ended(slot);
            return Ok(());
        }
        if let Some(run) = self.slots[slot].as_mut() {
            run.pipe = Some(output);
        }
        Ok(())
    }

    fn open_message(&self, messid: &CStr) -> Result<OwnedFd, &'static [u8]> {
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let message = open(messid, flags, Mode::empty()).map_err(|_| answer::CANNOT_OPEN)?;
        let st = fstat(&message).map_err(|_| answer::CANNOT_FSTAT)?;
        if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
            return Err(answer::WRONG_TYPE);
        }
        if st.st_uid != self.queue_uid {
            return Err(answer::WRONG_OWNER);
        }
        Ok(message)
    }

    fn slots_insert(&mut self, run: Running) -> usize {
        self.running += 1;
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(run);
                slot
            }
            None => {
                self.slots.push(Some(run));
                self.slots.len() - 1
            }
        }
    }

    /// Collect a child's output; at its end, report once the child is reaped.
    fn read_output(&mut self, slot: usize) -> io::Result<()> {
        let Some(run) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let Some(pipe) = run.pipe.as_ref() else {
            return Ok(());
        };
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(pipe, &mut buf) {
                Ok(0) | Err(Errno::EIO) => break,
                Ok(n) => run.output.extend_from_slice(&buf[..n]),
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        run.pipe = None;
        self.output_ended(slot);
        Ok(())
    }

    fn output_ended(&mut self, slot: usize) {
        if !self.try_reap(slot) {
            self.ended.push(slot);
        }
    }

    /// Reap the slot's child if it has exited, and report it.
    fn try_reap(&mut self, slot: usize) -> bool {
        let Some(run) = self.slots[slot].as_ref() else {
            return true;
        };
        let mut wstat = 0;
        // SAFETY: waitpid on our own child's pid with a valid status pointer.
        let r = unsafe { libc::waitpid(run.pid, &mut wstat, libc::WNOHANG | libc::__WALL) };
        if r == 0 || (r == -1 && Errno::last() == Errno::EINTR) {
            return false;
        }
        // ECHILD cannot happen for our own unreaped child; if it does, the
        // report says the child crashed rather than never coming.
        let wstat = if r == run.pid { wstat } else { libc::SIGKILL };
        let Some(run) = self.slots[slot].take() else {
            return true;
        };
        self.free.push(slot);
        self.running -= 1;
        frame::put(&mut self.out, run.id, &report::build(wstat, &run.output));
        true
    }

    /// Children whose output ended earlier may have exited now.
    fn reap_ended(&mut self) -> io::Result<()> {
        while let Some(_info) = self.signals.read_signal()? {}
        let ended = std::mem::take(&mut self.ended);
        for slot in ended {
            if !self.try_reap(slot) {
                self.ended.push(slot);
            }
        }
        Ok(())
    }

    /// Send the reports gathered so far, as far as the socket takes them.
    fn flush(&mut self) -> io::Result<()> {
        let mut sent = 0;
        while sent < self.out.len() {
            match nix::unistd::write(&self.control, &self.out[sent..]) {
                Ok(n) => sent += n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.out.drain(..sent);
        Ok(())
    }
}

fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// `messid\0sender\0recipient\0` as three C strings.
fn split_fields(payload: &[u8]) -> Option<[&CStr; 3]> {
    let first = CStr::from_bytes_until_nul(payload).ok()?;
    let rest = &payload[first.to_bytes().len() + 1..];
    let second = CStr::from_bytes_until_nul(rest).ok()?;
    let rest = &rest[second.to_bytes().len() + 1..];
    let third = CStr::from_bytes_until_nul(rest).ok()?;
    Some([first, second, third])
}

/// The part of the recipient after its last `@`, as a C string.
fn host_cstr(recip: &CStr) -> Option<&CStr> {
    let bytes = recip.to_bytes_with_nul();
    let at = bytes.iter().rposition(|&b| b == b'@')?;
    CStr::from_bytes_with_nul(&bytes[at + 1..]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_host_are_cut_without_copying() {
        let [m, s, r] = split_fields(b"12\0a@b\0x@y@z.example\0").unwrap();
        assert_eq!((m.to_bytes(), s.to_bytes()), (&b"12"[..], &b"a@b"[..]));
        assert_eq!(host_cstr(r).unwrap().to_bytes(), b"z.example");
        assert!(split_fields(b"12\0a@b\0").is_none());
    }
}
