//! qmail-rspawn mode: speaks qmail-send's spawn protocol on descriptors 0 and
//! 1, runs qmail-remote for each delivery in a few worker processes, and
//! holds a delivery back while its destination group is at its limit.

mod child;
mod frame;
mod hold;
mod lookup;
mod report;
mod routes;
mod server;
mod stdio;
mod wire;
mod worker;
mod workers;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tokio::sync::mpsc::unbounded_channel;

pub use stdio::ensure_std_fds;

use crate::config;
use server::{Event, Settings};

/// qmail's exit status for a temporary failure: qmail-send tries again.
const EXIT_TEMPORARY: u8 = 111;

/// The spawner's entry point, for `qmail-rspawn` and `qthrottle rspawn`
/// (with an optional `--config PATH`). Also the entry point of its worker
/// processes, which it starts itself.
pub fn main() -> ExitCode {
    ensure_std_fds();
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == worker::WORKER_ARG) {
        return worker::main(&args[2..]);
    }
    match run(config_flag(&args).as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qthrottle: {err:#}");
            ExitCode::from(EXIT_TEMPORARY)
        }
    }
}

/// `--config PATH` or `--config=PATH`, anywhere on the command line.
fn config_flag(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--config" {
            return it.next().map(PathBuf::from);
        }
        let text = arg.to_string_lossy();
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    raise_descriptor_limit();
    let (path, explicit) = config::resolve_path(config_path);
    let config = config::load(&path, explicit).context("failed to load the configuration")?;
    let qmail_dir = std::path::absolute(&config.rspawn.qmail_dir)
        .context("failed to resolve the qmail directory")?;
    let queue = qmail_dir.join("queue/mess");
    std::env::set_current_dir(&qmail_dir)
        .and_then(|()| std::env::set_current_dir("queue/mess"))
        .with_context(|| format!("failed to change to {}", queue.display()))?;
    let queue_uid = std::fs::metadata(".")
        .with_context(|| format!("failed to stat {}", queue.display()))?
        .uid();
    clear_tcpto();
    let settings = Settings {
        wire: config.rspawn.wire,
        concurrency: config.rspawn.concurrency,
        hold_timeout: config.rspawn.hold_timeout,
        hold_queue: config.rspawn.hold_queue,
        socket: config.socket,
        routes: qmail_dir.join("control/smtproutes"),
        queue_uid,
    };
    serve(settings)
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the event loop")?;
    let local = tokio::task::LocalSet::new();
    let workers = local.block_on(&runtime, async move {
        let (events, incoming) = unbounded_channel::<Event>();
        let (reports, outgoing) = unbounded_channel();
        let writer = tokio::task::spawn_local(stdio::write_reports(outgoing));
        tokio::task::spawn_local(stdio::read_commands(events.clone()));
        let workers = server::serve(settings, events, incoming, reports).await;
        let _ = writer.await;
        workers
    });
    drop(local);
    drop(runtime);
    for mut worker in workers {
        let _ = worker.wait();
    }
    Ok(())
}

/// Raise the soft descriptor limit to the hard limit.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Forget the remote hosts qmail-remote marked as timing out, as qmail's
/// spawner does at start (running in queue/mess).
fn clear_tcpto() {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("../lock/tcpto");
    if let Ok(mut file) = file {
        let _ = file.write_all(&[0u8; 1024]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flag_is_found_in_either_form() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let flag = config_flag(&args(&["qthrottle", "rspawn", "--config", "/x.toml"]));
        assert_eq!(flag, Some(PathBuf::from("/x.toml")));
        let flag = config_flag(&args(&["qmail-rspawn", "--config=/y.toml"]));
        assert_eq!(flag, Some(PathBuf::from("/y.toml")));
        assert_eq!(config_flag(&args(&["qmail-rspawn"])), None);
    }
}
