//! The test fixtures themselves, checked without a qthrottle daemon: the
//! probe, the counting listener and the holding SMTP server.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use qthrottle_tests::env::{cgroup2_mount, have_root, remove_cgroup};
use qthrottle_tests::listener::Listener;
use qthrottle_tests::probe::{LoopMode, Outcome, Probe, spawn_into_cgroup};
use qthrottle_tests::smtp::SmtpServer;

const WAIT: Duration = Duration::from_secs(10);

fn addr(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 199, host)
}

/// A bare cgroup with nothing attached, removed on drop.
struct PlainCgroup(PathBuf);

impl PlainCgroup {
    fn new(tag: &str) -> Result<PlainCgroup> {
        let path = cgroup2_mount()?.join(format!("qt-fixture-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).context("failed to create a cgroup")?;
        Ok(PlainCgroup(path))
    }
}

impl Drop for PlainCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

#[test]
fn probe_runs_in_the_cgroup() -> Result<()> {
    if !have_root("probe_runs_in_the_cgroup") {
        return Ok(());
    }
    let cgroup = PlainCgroup::new("probe")?;
    let mut command = Command::new(qthrottle_tests::probe::probe_bin()?);
    spawn_into_cgroup(&mut command, &cgroup.0)?;
    let mut inside = Probe::from_command(command)?;
    let name = cgroup
        .0
        .file_name()
        .context("cgroup name")?
        .to_string_lossy()
        .into_owned();
    assert_eq!(inside.cgroup()?, format!("/{name}"));
    let mut outside = Probe::outside()?;
    assert_ne!(outside.cgroup()?, format!("/{name}"));
    Ok(())
}

#[test]
fn listener_counts_open_connections() -> Result<()> {
    let listener = Listener::start((addr(1), 2501))?;
    let mut probe = Probe::outside()?;
    let ids: Vec<u32> = (0..3)
        .map(|_| probe.connect_ok(addr(1), 2501))
        .collect::<Result<_>>()?;
    listener.wait_open(3, WAIT)?;
    probe.close(ids[0])?;
    listener.wait_open(2, WAIT)?;
    assert_eq!(probe.write(ids[1])?, Outcome::Ok);
    probe.close(ids[1])?;
    probe.close(ids[2])?;
    listener.wait_open(0, WAIT)?;
    assert_eq!((listener.max_open(), listener.accepted()), (3, 3));
    Ok(())
}

#[test]
fn listener_on_ipv6_and_mapped_probe() -> Result<()> {
    let v6 = Listener::start((Ipv6Addr::LOCALHOST, 2502))?;
    let v4 = Listener::start((addr(2), 2502))?;
    let mut probe = Probe::outside()?;
    probe.connect_ok(Ipv6Addr::LOCALHOST, 2502)?;
    probe.connect_ok(addr(2).to_ipv6_mapped(), 2502)?;
    v6.wait_open(1, WAIT)?;
    v4.wait_open(1, WAIT)?;
    Ok(())
}

#[test]
fn refused_connect_can_be_retried_on_the_same_socket() -> Result<()> {
    let mut probe = Probe::outside()?;
    let first = probe.connect(addr(3), 2503)?;
    assert_eq!(first.outcome, Outcome::Err("ECONNREFUSED".to_owned()));
    let listener = Listener::start((addr(3), 2503))?;
    let again = probe.retry(first.id, addr(3), 2503)?;
    assert_eq!(again.outcome, Outcome::Ok);
    listener.wait_open(1, WAIT)?;
    assert_eq!(probe.udp(addr(3), 2503)?, Outcome::Ok);
    Ok(())
}

#[test]
fn wait_loop_never_overlaps_on_the_server() -> Result<()> {
    let listener = Listener::start((addr(4), 2504))?;
    let mut probe = Probe::outside()?;
    probe.start_loop(addr(4), 2504, 1.0, LoopMode::Wait)?;
    let counts = probe.finish_loop(WAIT)?;
    assert!(counts.ok > 100, "too few connections: {counts:?}");
    assert_eq!((counts.eperm, counts.other), (0, 0), "{counts:?}");
    assert_eq!(listener.max_open(), 1);
    listener.wait_open(0, WAIT)?;
    assert_eq!(listener.accepted(), counts.ok);
    Ok(())
}

#[test]
fn abort_loop_connects_and_resets() -> Result<()> {
    let listener = Listener::start((addr(5), 2505))?;
    let mut probe = Probe::outside()?;
    probe.start_loop(addr(5), 2505, 1.0, LoopMode::Abort)?;
    let counts = probe.finish_loop(WAIT)?;
    assert!(counts.ok > 100, "too few connections: {counts:?}");
    assert_eq!((counts.eperm, counts.other), (0, 0), "{counts:?}");
    listener.wait_open(0, WAIT)?;
    Ok(())
}

fn swaks(server: SocketAddr) -> Command {
    let mut command = Command::new("swaks");
    command.args(["--server", &server.to_string(), "--to", "user@example.com"]);
    command.args(["--from", "sender@example.net", "--helo", "qthrottle.test"]);
    command.args(["--timeout", "60"]);
    command
}

fn finish(child: std::process::Child) -> Result<Output> {
    child.wait_with_output().context("failed to wait for swaks")
}

#[test]
fn smtp_server_holds_swaks_sessions() -> Result<()> {
    if Command::new("swaks").arg("--version").output().is_err() {
        eprintln!("skipping smtp_server_holds_swaks_sessions: swaks is not installed");
        return Ok(());
    }
    let server = SmtpServer::start((addr(6), 25))?;
    let piped = || -> Result<std::process::Child> {
        let mut command = swaks(server.addr());
        command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command.spawn().context("failed to start swaks")
    };
    let first = piped()?;
    let second = piped()?;
    server.wait(WAIT, |c| c.held == 2)?;
    assert_eq!(server.counts().delivered, 0);
    server.release();
    for child in [first, second] {
        let output = finish(child)?;
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "swaks failed: {text}");
        assert!(text.contains("250 queued"), "{text}");
    }
    assert_eq!(server.counts().delivered, 2);
    Ok(())
}
