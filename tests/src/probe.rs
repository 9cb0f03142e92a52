//! Drives the `probe` program (src/bin/probe.rs) that makes connections
//! from inside a test's cgroup, and places commands into a cgroup.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::TestEnv;

/// How long a single probe command may take (loops add their length).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The probe binary: `$QTHROTTLE_PROBE`, else `probe` beside the running
/// executable (or beside its `deps/` directory, for test executables).
pub fn probe_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("QTHROTTLE_PROBE") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("failed to find the running executable")?;
    let mut dir = exe
        .parent()
        .context("failed to find the executable's directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let probe = dir.join("probe");
    if !probe.exists() {
        bail!("failed to find the probe binary at {}", probe.display());
    }
    Ok(probe)
}

/// Makes `command` move itself into `cgroup` before it executes, by writing
/// to `<cgroup>/cgroup.procs` in the child.
pub fn spawn_into_cgroup(command: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .context("failed to convert the cgroup path")?;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls open(2), write(2) and close(2), which are async-signal-safe; the
    // path was allocated before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, c"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
            Ok(())
        });
    }
    Ok(())
}

/// How a connect (or UDP send) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The errno's name, e.g. `EPERM` or `ECONNREFUSED`.
    Err(String),
}

impl Outcome {
    pub fn eperm() -> Outcome {
        Outcome::Err("EPERM".to_owned())
    }
}

/// One connect on a probe's socket: the socket's id and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub id: u32,
    pub outcome: Outcome,
}

/// What one `loop` command counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoopCounts {
    pub ok: u64,
    pub eperm: u64,
    pub other: u64,
    /// The errno of the first connect that failed otherwise than EPERM.
    pub first_other: Option<String>,
}

/// How a loop closes its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopMode {
    /// Close at once with a reset.
    Abort,
    /// Send FIN and wait for the server to close first.
    Wait,
}

/// A running probe process.
#[derive(Debug)]
pub struct Probe {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    pid: u32,
}

impl Probe {
    /// A probe placed in the environment's cgroup by writing its pid into
    /// `cgroup.procs` before it executes.
    pub fn in_cgroup(env: &TestEnv) -> Result<Probe> {
        let mut command = Command::new(probe_bin()?);
        spawn_into_cgroup(&mut command, env.cgroup_path())?;
        Probe::from_command(command)
    }

    /// A probe started with `qthrottle exec -- probe`.
    pub fn via_exec(env: &TestEnv) -> Result<Probe> {
        let mut command = env.command();
        command
            .arg("exec")
            .arg("--config")
            .arg(env.config_path())
            .arg("--")
            .arg(probe_bin()?);
        Probe::from_command(command)
    }

    /// A probe in the test's own cgroup, outside qthrottle's.
    pub fn outside() -> Result<Probe> {
        Probe::from_command(Command::new(probe_bin()?))
    }

    /// Starts a probe from a prepared command (stdio is set here).
    pub fn from_command(mut command: Command) -> Result<Probe> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().context("failed to start the probe")?;
        let stdin = child
            .stdin
            .take()
            .context("failed to take the probe's stdin")?;
        let stdout = child
            .stdout
            .take()
            .context("failed to take the probe's stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut probe = Probe {
            child,
            stdin,
            lines,
            pid: 0,
        };
        let hello = probe.read_line(ANSWER_TIMEOUT)?;
        let pid = hello.strip_prefix("probe ").and_then(|p| p.parse().ok());
        probe.pid = pid.with_context(|| format!("unexpected probe greeting {hello:?}"))?;
        Ok(probe)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn read_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => bail!("probe gave no answer within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                bail!("probe exited ({status:?})")
            }
        }
    }

    /// Sends one command without waiting for its answer.
    pub fn send(&mut self, command: &str) -> Result<()> {
        writeln!(self.stdin, "{command}").context("failed to write to the probe")?;
        self.stdin.flush().context("failed to write to the probe")
    }

    /// Reads the answer to a command sent with [`Probe::send`].
    pub fn answer(&mut self, timeout: Duration) -> Result<String> {
        let line = self.read_line(timeout)?;
        if let Some(message) = line.strip_prefix("bad ") {
            bail!("probe rejected a command: {message}");
        }
        Ok(line)
    }

    /// Sends a command and reads its answer.
    pub fn request(&mut self, command: &str) -> Result<String> {
        self.send(command)?;
        self.answer(ANSWER_TIMEOUT)
            .with_context(|| format!("failed to run {command:?}"))
    }

    /// A new TCP socket connects to `addr` (an AF_INET6 socket for an IPv6
    /// address, IPv4-mapped included) and is kept.
    pub fn connect(&mut self, addr: impl Into<IpAddr>, port: u16) -> Result<Attempt> {
        let line = self.request(&format!("connect {} {port}", addr.into()))?;
        parse_attempt(&line)
    }

    /// Connects socket `id` again.
    pub fn retry(&mut self, id: u32, addr: impl Into<IpAddr>, port: u16) -> Result<Attempt> {
        let line = self.request(&format!("retry {id} {} {port}", addr.into()))?;
        parse_attempt(&line)
    }

    /// Connects and fails unless it succeeded; returns the socket id.
    pub fn connect_ok(&mut self, addr: impl Into<IpAddr>, port: u16) -> Result<u32> {
        let addr = addr.into();
        let attempt = self.connect(addr, port)?;
        if attempt.outcome != Outcome::Ok {
            bail!(
                "connect to {addr} port {port} failed: {:?}",
                attempt.outcome
            );
        }
        Ok(attempt.id)
    }

    /// Closes socket `id` (a reset: SO_LINGER 0).
    pub fn close(&mut self, id: u32) -> Result<()> {
        let line = self.request(&format!("close {id}"))?;
        if line != format!("closed {id}") {
            bail!("unexpected answer to close: {line:?}");
        }
        Ok(())
    }

    /// Writes a line on socket `id`; whether that worked.
    pub fn write(&mut self, id: u32) -> Result<Outcome> {
        let line = self.request(&format!("send {id}"))?;
        Ok(if line.starts_with("sent ") {
            Outcome::Ok
        } else {
            parse_attempt(&line)?.outcome
        })
    }

    /// A UDP socket connects to `addr` and sends one datagram.
    pub fn udp(&mut self, addr: impl Into<IpAddr>, port: u16) -> Result<Outcome> {
        let line = self.request(&format!("udp {} {port}", addr.into()))?;
        Ok(match line.strip_prefix("err ") {
            Some(name) => Outcome::Err(name.to_owned()),
            None if line == "ok" => Outcome::Ok,
            None => bail!("unexpected answer to udp: {line:?}"),
        })
    }

    /// Starts a connect/close loop; collect it with [`Probe::finish_loop`].
    pub fn start_loop(
        &mut self,
        addr: impl Into<IpAddr>,
        port: u16,
        seconds: f64,
        mode: LoopMode,
    ) -> Result<()> {
        let mode = if mode == LoopMode::Wait {
            "wait"
        } else {
            "abort"
        };
        self.send(&format!("loop {} {port} {seconds} {mode}", addr.into()))
    }

    /// Waits for the counts of a loop started with [`Probe::start_loop`].
    pub fn finish_loop(&mut self, timeout: Duration) -> Result<LoopCounts> {
        let line = self.answer(timeout)?;
        parse_loop(&line)
    }

    /// The probe's cgroup path, relative to the cgroup2 mount.
    pub fn cgroup(&mut self) -> Result<String> {
        let line = self.request("cgroup")?;
        let path = line
            .strip_prefix("cgroup ")
            .context("unexpected answer to cgroup")?;
        Ok(path.to_owned())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_attempt(line: &str) -> Result<Attempt> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (outcome, id) = match words.as_slice() {
        ["ok", id] => (Outcome::Ok, id),
        ["err", name, id] => (Outcome::Err((*name).to_owned()), id),
        _ => bail!("unexpected probe answer {line:?}"),
    };
    let id = id
        .parse()
        .with_context(|| format!("bad socket id in {line:?}"))?;
    Ok(Attempt { id, outcome })
}

fn parse_loop(line: &str) -> Result<LoopCounts> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let ["loop", ok, eperm, other, rest @ ..] = words.as_slice() else {
        bail!("unexpected loop answer {line:?}");
    };
    let number = |s: &str| {
        s.parse::<u64>()
            .with_context(|| format!("bad count in {line:?}"))
    };
    Ok(LoopCounts {
        ok: number(ok)?,
        eperm: number(eperm)?,
        other: number(other)?,
        first_other: rest.first().map(|s| (*s).to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let ok = parse_attempt("ok 3").expect("ok");
        assert_eq!(
            ok,
            Attempt {
                id: 3,
                outcome: Outcome::Ok
            }
        );
        let refused = parse_attempt("err EPERM 4").expect("err");
        assert_eq!(
            refused,
            Attempt {
                id: 4,
                outcome: Outcome::eperm()
            }
        );
        assert!(parse_attempt("closed 3").is_err());
        let counts = parse_loop("loop 10 20 1 EADDRNOTAVAIL").expect("loop");
        let first_other = Some("EADDRNOTAVAIL".to_owned());
        assert_eq!(
            counts,
            LoopCounts {
                ok: 10,
                eperm: 20,
                other: 1,
                first_other
            }
        );
    }
}
