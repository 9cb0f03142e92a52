//! The spawner's side of its worker processes: started as they are needed,
//! each given deliveries until it holds its share, their reports read back.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use super::frame;
use super::server::Event;
use super::worker::WORKER_ARG;

/// Deliveries a worker takes before another worker is started.
const SHARE: usize = 4_000;
/// Most workers: enough for the largest concurrency the protocol allows.
const MAX_WORKERS: usize = 65_536 / SHARE + 1;

struct Handle {
    frames: Vec<u8>,
    to_worker: UnboundedSender<Vec<u8>>,
    writer: JoinHandle<()>,
    load: usize,
    alive: bool,
    child: Child,
}

/// All workers.
pub struct Pool {
    workers: Vec<Handle>,
    queue_uid: u32,
    events: UnboundedSender<Event>,
}

impl Pool {
    pub fn new(queue_uid: u32, events: UnboundedSender<Event>) -> Self {
        Pool {
            workers: Vec::new(),
            queue_uid,
            events,
        }
    }

    /// Hand a delivery to a worker; returns which one.
    pub fn start(&mut self, id: u16, payload: &[u8]) -> io::Result<usize> {
        let w = self.pick()?;
        let handle = &mut self.workers[w];
        frame::put(&mut handle.frames, id, payload);
        handle.load += 1;
        Ok(w)
    }

    /// A delivery of worker `w` was reported.
    pub fn done(&mut self, w: usize) {
        if let Some(handle) = self.workers.get_mut(w) {
            handle.load = handle.load.saturating_sub(1);
        }
    }

    /// Worker `w` is gone; its deliveries are lost.
    pub fn gone(&mut self, w: usize) {
        if let Some(handle) = self.workers.get_mut(w) {
            handle.alive = false;
            handle.load = 0;
            let _ = handle.child.try_wait();
        }
    }

    /// Send what was handed to the workers since the last flush.
    pub fn flush(&mut self) {
        for handle in self.workers.iter_mut().filter(|h| !h.frames.is_empty()) {
            let frames = std::mem::take(&mut handle.frames);
            let _ = handle.to_worker.send(frames);
        }
    }

    /// Close the workers' sockets once everything handed to them is sent;
    /// returns the worker processes, which exit when they see the end.
    pub async fn close(self) -> Vec<Child> {
        let mut children = Vec::new();
        for handle in self.workers {
            drop(handle.to_worker);
            let _ = handle.writer.await;
            children.push(handle.child);
        }
        children
    }

    fn pick(&mut self) -> io::Result<usize> {
        let alive = |h: &&Handle| h.alive;
        if let Some(w) = self.workers.iter().position(|h| h.alive && h.load < SHARE) {
            return Ok(w);
        }
        if self.workers.iter().filter(alive).count() < MAX_WORKERS {
            return self.launch();
        }
        let least = self.workers.iter().enumerate().filter(|(_, h)| h.alive);
        least
            .min_by_key(|(_, h)| h.load)
            .map(|(w, _)| w)
            .ok_or_else(|| io::ErrorKind::Other.into())
    }

    fn launch(&mut self) -> io::Result<usize> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let child = Command::new("/proc/self/exe")
            .arg0("qmail-rspawn")
            .arg(WORKER_ARG)
            .arg(self.queue_uid.to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()?;
        ours.set_nonblocking(true)?;
        let (reader, writer) = UnixStream::from_std(ours)?.into_split();
        let w = self.workers.len();
        let (to_worker, frames) = unbounded_channel();
        let writer = tokio::task::spawn_local(write_frames(writer, frames));
        tokio::task::spawn_local(read_reports(w, reader, self.events.clone()));
        let handle = Handle {
            frames: Vec::new(),
            to_worker,
            writer,
            load: 0,
            alive: true,
            child,
        };
        self.workers.push(handle);
        Ok(w)
    }
}

async fn write_frames(mut writer: OwnedWriteHalf, mut frames: UnboundedReceiver<Vec<u8>>) {
    let mut batch = Vec::new();
    while frames.recv_many(&mut batch, 64).await > 0 {
        for chunk in batch.drain(..) {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

async fn read_reports(w: usize, mut reader: OwnedReadHalf, events: UnboundedSender<Event>) {
    let mut frames = frame::Reader::default();
    loop {
        let buf = frames.buffer();
        buf.reserve(64 * 1024);
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while let Some((id, report)) = frames.frame() {
            let _ = events.send(Event::Done {
                worker: w,
                id,
                report: report.to_vec(),
            });
        }
    }
    let _ = events.send(Event::WorkerGone(w));
}
