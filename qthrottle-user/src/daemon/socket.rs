//! The control socket: root-owned, read-write for the configured group, one
//! JSON request and one JSON response per line. Each connection is served by
//! its own task; requests go to the daemon's loop, which owns all state.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::Context as _;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
};

use crate::control::{Request, Response};

/// A request with the way back to its connection.
pub type Call = (Request, oneshot::Sender<Response>);

/// Binds the socket, replacing a stale one, with mode 0660 and the group set.
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another daemon is listening on {}", path.display());
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e)
                .with_context(|| format!("failed to remove stale socket {}", path.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("failed to bind {}", path.display()))?;
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("failed to look up group {name}"))?
                .with_context(|| format!("socket_group {name} does not exist"))?
                .gid,
        ),
        None => nix::unistd::Group::from_name("qmail")
            .ok()
            .flatten()
            .map(|g| g.gid),
    };
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), gid)
        .with_context(|| format!("failed to chown {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to chmod {}", path.display()))?;
    Ok(listener)
}

/// Longest request line accepted; a longer one closes the connection.
const MAX_LINE: u64 = 64 * 1024;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;

/// Accepts connections for ever, handing each to its own task.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(connection(stream, calls.clone(), permit));
                }
                Err(_) => warn_once_a_minute(
                    &mut last_warning,
                    "control socket: too many connections; closing new ones",
                ),
            },
            Err(err) => {
                warn_once_a_minute(
                    &mut last_warning,
                    &format!("control socket accept failed: {err}"),
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn warn_once_a_minute(last: &mut Option<Instant>, message: &str) {
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
        tracing::warn!("{message}");
        *last = Some(Instant::now());
    }
}

async fn connection(stream: UnixStream, calls: mpsc::Sender<Call>, _permit: OwnedSemaphorePermit) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with(b"\n") && line.len() as u64 >= MAX_LINE => return,
            Ok(_) => {}
        }
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(request) => ask(&calls, request).await,
            Err(err) => Response::Error {
                message: format!("bad request: {err}"),
            },
        };
        let Ok(mut text) = serde_json::to_string(&response) else {
            return;
        };
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn ask(calls: &mpsc::Sender<Call>, request: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    if calls.send((request, tx)).await.is_err() {
        return Response::Error {
            message: "the daemon is stopping".into(),
        };
    }
    rx.await.unwrap_or(Response::Error {
        message: "the daemon dropped the request".into(),
    })
}

/// Client side: one request, one response (for the CLI).
pub fn request(
    path: &Path,
    request: &Request,
    timeout: std::time::Duration,
) -> anyhow::Result<Response> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("failed to connect to the daemon at {}", path.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .context("failed to set a timeout")?;
    let mut text = serde_json::to_string(request).context("failed to encode the request")?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .context("failed to send the request")?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .context("failed to read the daemon's answer")?;
    serde_json::from_str(&line).context("failed to decode the daemon's answer")
}
