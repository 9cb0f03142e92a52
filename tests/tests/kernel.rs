//! qthrottle against the real kernel: a daemon per test, its own cgroup and
//! pins, probes connecting from inside the cgroup, listeners counting what
//! arrives. Each test owns the loopback network 127.0.NET.0/24 of its Setup.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use qthrottle_tests::daemon::Daemon;
use qthrottle_tests::dns::DnsServer;
use qthrottle_tests::env::{Group, GroupStatus, Setup, TestEnv, WRAPPED, have_root};
use qthrottle_tests::listener::Listener;
use qthrottle_tests::probe::{LoopMode, Outcome, Probe};
use qthrottle_tests::smtp::SmtpServer;
use serde_json::json;

/// Bound for anything that should happen at once (counts after a close).
const WAIT: Duration = Duration::from_secs(10);
/// Bound for a configuration change to reach the kernel (promised: 1 s).
const APPLY: Duration = Duration::from_secs(5);

macro_rules! root_or_skip {
    ($name:expr) => {
        if !have_root($name) {
            return Ok(());
        }
    };
}

/// The status of `group` once `ready` holds (or the last one after WAIT,
/// for the caller's assertion to show).
fn status_when(
    env: &TestEnv,
    group: &str,
    ready: impl Fn(&GroupStatus) -> bool,
) -> Result<GroupStatus> {
    Ok(env.wait_group(group, WAIT, ready)?.0)
}

/// (limit, open, allowed, refused) of `group` once `open` is as expected.
fn counts_when_open(env: &TestEnv, group: &str, open: u64) -> Result<(u64, u64, u64, u64)> {
    let s = status_when(env, group, |s| s.open == open)?;
    Ok((s.limit, s.open, s.allowed, s.refused))
}

/// Fails if any group shows a counter that went below zero.
fn assert_no_wrapped(env: &TestEnv) -> Result<()> {
    for group in env.status()? {
        let counts = [group.open, group.allowed, group.refused];
        assert!(
            counts.iter().all(|&c| c < WRAPPED),
            "negative count: {group:?}"
        );
    }
    Ok(())
}

fn connect_all(
    probe: &mut Probe,
    addr: impl Into<IpAddr>,
    port: u16,
    n: usize,
) -> Result<Vec<u32>> {
    let addr = addr.into();
    (0..n).map(|_| probe.connect_ok(addr, port)).collect()
}

fn close_all(probe: &mut Probe, ids: &[u32]) -> Result<()> {
    ids.iter().try_for_each(|&id| probe.close(id))
}

/// Connects and expects EPERM; returns the refused socket's id.
fn refused(probe: &mut Probe, addr: impl Into<IpAddr>, port: u16, what: &str) -> Result<u32> {
    let addr = addr.into();
    let attempt = probe.connect(addr, port)?;
    assert_eq!(
        attempt.outcome,
        Outcome::eperm(),
        "{what}: connect to {addr} port {port}"
    );
    Ok(attempt.id)
}

#[test]
fn limit_two_refuses_the_third_and_frees_on_close() -> Result<()> {
    root_or_skip!("limit_two_refuses_the_third_and_frees_on_close");
    let env = Setup::new(100)
        .group(Group::new("pair", 2).address("127.0.100.1"))
        .build()?;
    let a = env.addr(1);
    let listener = Listener::start((a, 25))?;
    let daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let first = probe.connect_ok(a, 25)?;
    let second = probe.connect_ok(a, 25)?;
    let third = refused(&mut probe, a, 25, "third connection, limit 2")?;
    assert_eq!(counts_when_open(&env, "pair", 2)?, (2, 2, 2, 1));
    probe.close(first)?;
    probe.close(third)?;
    let fourth = probe.connect_ok(a, 25)?;
    let fifth = refused(
        &mut probe,
        a,
        25,
        "closing a refused socket gives no slot back",
    )?;
    listener.wait_open(2, WAIT)?;
    close_all(&mut probe, &[second, fourth, fifth])?;
    assert_eq!(counts_when_open(&env, "pair", 0)?, (2, 0, 3, 2));
    listener.wait_open(0, WAIT)?;
    assert_eq!(listener.max_open(), 2);
    let line = daemon.wait_for_log("refused", WAIT)?;
    assert!(
        line.contains("pair") && line.contains("127.0.100.1"),
        "refusal log: {line}"
    );
    Ok(())
}

#[test]
fn exec_runs_the_command_in_the_cgroup() -> Result<()> {
    root_or_skip!("exec_runs_the_command_in_the_cgroup");
    let env = Setup::new(114)
        .group(Group::new("one", 1).address("127.0.114.1"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::via_exec(&env)?;
    assert_eq!(probe.cgroup()?, format!("/{}", env.name()));
    probe.connect_ok(a, 25)?;
    refused(
        &mut probe,
        a,
        25,
        "second connection under qthrottle exec, limit 1",
    )?;
    Ok(())
}

#[test]
fn cidr_group_shares_one_limit_and_literal_address_wins() -> Result<()> {
    root_or_skip!("cidr_group_shares_one_limit_and_literal_address_wins");
    let env = Setup::new(101)
        .group(Group::new("net", 2).address("127.0.101.0/24"))
        .group(Group::new("host", 1).address("127.0.101.9"))
        .build()?;
    let listeners: Vec<Listener> = [1, 2, 3, 9]
        .iter()
        .map(|&h| Listener::start((env.addr(h), 25)))
        .collect::<Result<_>>()?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    probe.connect_ok(env.addr(1), 25)?;
    probe.connect_ok(env.addr(2), 25)?;
    refused(
        &mut probe,
        env.addr(3),
        25,
        "third address of a /24 group of limit 2",
    )?;
    refused(
        &mut probe,
        env.addr(1),
        25,
        "first address again, group full",
    )?;
    probe.connect_ok(env.addr(9), 25)?;
    refused(
        &mut probe,
        env.addr(9),
        25,
        "literal address group of limit 1",
    )?;
    let net = counts_when_open(&env, "net", 2)?;
    assert_eq!(net, (2, 2, 2, 2));
    assert_eq!(counts_when_open(&env, "host", 1)?, (1, 1, 1, 1));
    assert!(
        env.group_status("net")?
            .addresses
            .iter()
            .any(|a| a == "127.0.101.0/24")
    );
    drop(listeners);
    Ok(())
}

#[test]
fn default_limit_applies_per_ungrouped_address() -> Result<()> {
    root_or_skip!("default_limit_applies_per_ungrouped_address");
    let env = Setup::new(102)
        .default_limit(2)
        .group(Group::new("other", 5).address("127.0.102.200"))
        .build()?;
    let (a, b) = (env.addr(1), env.addr(2));
    let _listeners = (Listener::start((a, 25))?, Listener::start((b, 25))?);
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let on_a = connect_all(&mut probe, a, 25, 2)?;
    refused(
        &mut probe,
        a,
        25,
        "third to an ungrouped address, default limit 2",
    )?;
    connect_all(&mut probe, b, 25, 2)?;
    refused(
        &mut probe,
        b,
        25,
        "third to a second ungrouped address, default limit 2",
    )?;
    probe.close(on_a[0])?;
    probe.connect_ok(a, 25)?;
    refused(&mut probe, a, 25, "ungrouped address full again")?;
    Ok(())
}

#[test]
fn udp_other_ports_and_outside_processes_are_untouched() -> Result<()> {
    root_or_skip!("udp_other_ports_and_outside_processes_are_untouched");
    let env = Setup::new(103)
        .group(Group::new("tight", 1).address("127.0.103.1"))
        .build()?;
    let a = env.addr(1);
    let smtp = Listener::start((a, 25))?;
    let other = Listener::start((a, 2603))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    probe.connect_ok(a, 25)?;
    refused(&mut probe, a, 25, "second connection, limit 1")?;
    connect_all(&mut probe, a, 2603, 3).context("other port from the cgroup")?;
    for _ in 0..3 {
        assert_eq!(
            probe.udp(a, 25)?,
            Outcome::Ok,
            "UDP to port 25 from the cgroup"
        );
    }
    let mut outside = Probe::outside()?;
    connect_all(&mut outside, a, 25, 3).context("port 25 from outside the cgroup")?;
    other.wait_open(3, WAIT)?;
    smtp.wait_open(4, WAIT)?;
    assert_eq!(counts_when_open(&env, "tight", 1)?, (1, 1, 1, 1));
    Ok(())
}

#[test]
fn ipv6_loopback_is_counted() -> Result<()> {
    root_or_skip!("ipv6_loopback_is_counted");
    let port = 2604;
    let env = Setup::new(104)
        .ports(&[port])
        .group(Group::new("six", 2).address("::1"))
        .build()?;
    let listener = Listener::start((Ipv6Addr::LOCALHOST, port))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let ids = connect_all(&mut probe, Ipv6Addr::LOCALHOST, port, 2)?;
    let third = refused(
        &mut probe,
        Ipv6Addr::LOCALHOST,
        port,
        "third to ::1, limit 2",
    )?;
    assert_eq!(counts_when_open(&env, "six", 2)?, (2, 2, 2, 1));
    listener.wait_open(2, WAIT)?;
    close_all(&mut probe, &ids)?;
    probe.close(third)?;
    assert_eq!(counts_when_open(&env, "six", 0)?, (2, 0, 2, 1));
    Ok(())
}

#[test]
fn ipv4_mapped_destination_counts_as_ipv4() -> Result<()> {
    root_or_skip!("ipv4_mapped_destination_counts_as_ipv4");
    let env = Setup::new(105)
        .group(Group::new("mapped", 2).address("127.0.105.1"))
        .build()?;
    let a = env.addr(1);
    let mapped = a.to_ipv6_mapped();
    let listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let via_v6 = probe.connect_ok(mapped, 25)?;
    let via_v4 = probe.connect_ok(a, 25)?;
    refused(&mut probe, mapped, 25, "mapped address, group full")?;
    refused(&mut probe, a, 25, "IPv4 address, group full")?;
    assert_eq!(counts_when_open(&env, "mapped", 2)?, (2, 2, 2, 2));
    probe.close(via_v6)?;
    assert_eq!(counts_when_open(&env, "mapped", 1)?, (2, 1, 2, 2));
    let again = probe.connect_ok(a, 25)?;
    listener.wait_open(2, WAIT)?;
    close_all(&mut probe, &[via_v4, again])?;
    assert_eq!(counts_when_open(&env, "mapped", 0)?.1, 0);
    Ok(())
}

#[test]
fn connect_retried_after_econnrefused_counts_once() -> Result<()> {
    root_or_skip!("connect_retried_after_econnrefused_counts_once");
    let env = Setup::new(106)
        .group(Group::new("retry", 2).address("127.0.106.9"))
        .build()?;
    let a = env.addr(9);
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let first = probe.connect(a, 25)?;
    assert_eq!(
        first.outcome,
        Outcome::Err("ECONNREFUSED".to_owned()),
        "nothing listens"
    );
    let again = probe.retry(first.id, a, 25)?;
    assert_eq!(
        again.outcome,
        Outcome::Err("ECONNREFUSED".to_owned()),
        "retry, nothing listens"
    );
    let open = status_when(&env, "retry", |s| s.open == 1)?.open;
    assert_eq!(open, 1, "one socket connected twice without success");
    let listener = Listener::start((a, 25))?;
    assert_eq!(
        probe.retry(first.id, a, 25)?.outcome,
        Outcome::Ok,
        "retry with a listener"
    );
    listener.wait_open(1, WAIT)?;
    assert_eq!(
        env.group_status("retry")?.open,
        1,
        "one socket connected three times"
    );
    let other = probe.connect_ok(a, 25)?;
    refused(&mut probe, a, 25, "limit 2 with two sockets")?;
    probe.close(first.id)?;
    probe.close(other)?;
    let s = status_when(&env, "retry", |s| s.open == 0)?;
    assert_eq!(s.open, 0, "all sockets closed: {s:?}");
    Ok(())
}

#[test]
fn limit_holds_under_contention() -> Result<()> {
    root_or_skip!("limit_holds_under_contention");
    const LIMIT: u64 = 4;
    const PROBES: usize = 16;
    let env = Setup::new(107)
        .group(Group::new("busy", 4).address("127.0.107.1"))
        .build()?;
    let a = env.addr(1);
    let listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probes: Vec<Probe> = (0..PROBES)
        .map(|_| Probe::in_cgroup(&env))
        .collect::<Result<_>>()?;
    for probe in &mut probes {
        // Wait mode: a probe closes only after the listener has closed, so
        // the listener never counts a connection the kernel released.
        probe.start_loop(a, 25, 5.0, LoopMode::Wait)?;
    }
    let mut total = qthrottle_tests::probe::LoopCounts::default();
    for probe in &mut probes {
        let counts = probe.finish_loop(Duration::from_secs(120))?;
        assert_eq!(
            counts.other, 0,
            "connect failed otherwise than EPERM: {counts:?}"
        );
        total.ok += counts.ok;
        total.eperm += counts.eperm;
    }
    eprintln!(
        "contention: {total:?}, listener max open {}",
        listener.max_open()
    );
    assert!(
        listener.max_open() <= LIMIT,
        "listener saw {} at once",
        listener.max_open()
    );
    assert!(
        total.ok > 0 && total.eperm > 0,
        "no contention happened: {total:?}"
    );
    listener.wait_open(0, WAIT)?;
    let s = status_when(&env, "busy", |s| s.open == 0)?;
    assert_eq!(
        (s.open, s.allowed, s.refused),
        (0, total.ok, total.eperm),
        "{s:?}"
    );
    assert_eq!(listener.accepted(), total.ok);
    Ok(())
}

#[test]
fn limit_holds_after_daemon_sigkill_and_restart_adopts_counts() -> Result<()> {
    root_or_skip!("limit_holds_after_daemon_sigkill_and_restart_adopts_counts");
    let env = Setup::new(108)
        .group(Group::new("kept", 2).address("127.0.108.1"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let mut daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let ids = connect_all(&mut probe, a, 25, 2)?;
    daemon.kill()?;
    refused(&mut probe, a, 25, "daemon killed, group full")?;
    let mut late = Probe::in_cgroup(&env)?;
    refused(&mut late, a, 25, "daemon killed, new process, group full")?;
    assert_eq!(
        env.group_status("kept")?.open,
        2,
        "status with the daemon down"
    );
    daemon.restart()?;
    let s = env.group_status("kept")?;
    assert_eq!((s.limit, s.open), (2, 2), "status after restart: {s:?}");
    refused(&mut probe, a, 25, "daemon restarted, group full")?;
    probe.close(ids[0])?;
    let id = probe.connect_ok(a, 25)?;
    close_all(&mut probe, &[ids[1], id])?;
    assert_eq!(counts_when_open(&env, "kept", 0)?.1, 0);
    assert_no_wrapped(&env)
}

/// Connects twice to `addr` until the second one is refused (the limit is 1
/// and in force); false when that did not happen within `APPLY`.
fn becomes_limited_to_one(probe: &mut Probe, addr: Ipv4Addr) -> Result<bool> {
    let start = Instant::now();
    while start.elapsed() < APPLY {
        let first = probe.connect_ok(addr, 25)?;
        let second = probe.connect(addr, 25)?;
        close_all(probe, &[first, second.id])?;
        if second.outcome == Outcome::eperm() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

#[test]
fn limit_set_and_rm_apply_while_the_daemon_runs() -> Result<()> {
    root_or_skip!("limit_set_and_rm_apply_while_the_daemon_runs");
    let env = Setup::new(109)
        .group(Group::new("first", 5).address("127.0.109.1"))
        .build()?;
    let (a, b) = (env.addr(1), env.addr(2));
    let _listeners = (Listener::start((a, 25))?, Listener::start((b, 25))?);
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let ids = connect_all(&mut probe, b, 25, 2).context("ungrouped, default limit 10")?;
    close_all(&mut probe, &ids)?;
    env.cli(&["limit", "set", "second", "1", "--address", "127.0.109.2"])?
        .ok()?;
    assert!(
        becomes_limited_to_one(&mut probe, b)?,
        "new group not enforced within {APPLY:?}"
    );
    env.cli(&["limit", "set", "first", "1", "--address", "127.0.109.1"])?
        .ok()?;
    assert!(
        becomes_limited_to_one(&mut probe, a)?,
        "new limit not enforced within {APPLY:?}"
    );
    let text = std::fs::read_to_string(env.config_path())?;
    assert!(
        text.starts_with("# qthrottle test configuration"),
        "comment lost:\n{text}"
    );
    let (first, second) = (text.find("\"first\""), text.find("\"second\""));
    assert!(
        first.is_some() && first < second,
        "group order changed:\n{text}"
    );
    env.cli(&["limit", "rm", "second"])?.ok()?;
    let start = Instant::now();
    while env.status()?.iter().any(|g| g.name == "second") && start.elapsed() < APPLY {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids = connect_all(&mut probe, b, 25, 3).context("group removed: default limit 10")?;
    close_all(&mut probe, &ids)
}

/// The line (1-based) of the first line of `text` equal to `line`.
fn line_number(text: &str, line: &str) -> Result<usize> {
    let index = text.lines().position(|l| l == line);
    Ok(index.with_context(|| format!("no line {line:?} in:\n{text}"))? + 1)
}

#[test]
fn bad_configuration_is_rejected_and_old_limits_stay() -> Result<()> {
    root_or_skip!("bad_configuration_is_rejected_and_old_limits_stay");
    let env = Setup::new(110)
        .group(Group::new("keep", 1).address("127.0.110.1"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    probe.connect_ok(a, 25)?;
    let good = env.config_text();
    let line = line_number(&good, "limit = 1")?;
    let bad: String = good
        .lines()
        .map(|l| {
            if l == "limit = 1" {
                "limit = \"lots\"\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    env.write_config_text(&bad)?;
    let where_ = format!("{}:{line}:", env.config_path().display());

    let out = env.cli(&["limit", "set", "more", "3", "--address", "127.0.110.5"])?;
    assert_eq!(out.code, Some(1), "limit set on a bad file: {out:?}");
    assert!(out.stderr.starts_with("qthrottle: "), "{out:?}");
    assert!(
        out.stderr.contains(&where_) && out.stderr.contains("limit"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read_to_string(env.config_path())?,
        bad,
        "bad file was changed"
    );

    let answer = env.control(&json!({"op": "reload"}))?;
    assert_eq!(answer["status"], "error", "reload of a bad file: {answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&where_),
        "reload error without file:line: {answer}"
    );

    daemon.signal(Signal::SIGHUP)?;
    daemon
        .wait_for_log(&where_, WAIT)
        .context("SIGHUP with a bad file")?;
    refused(&mut probe, a, 25, "old limit 1 after rejected reloads")?;

    // status reads the pin path from the file: put the good file back first.
    env.write_config_text(&good)?;
    let s = env.group_status("keep")?;
    assert_eq!(
        (s.limit, s.open),
        (1, 1),
        "old limits after rejected reloads: {s:?}"
    );
    env.cli(&["limit", "set", "keep", "2", "--address", "127.0.110.1"])?
        .ok()?;
    let s = env.wait_group("keep", APPLY, |s| s.limit == 2)?.0;
    assert_eq!(s.limit, 2, "a good file applies again: {s:?}");
    Ok(())
}

#[test]
fn lowering_a_limit_refuses_new_and_keeps_open_connections() -> Result<()> {
    root_or_skip!("lowering_a_limit_refuses_new_and_keeps_open_connections");
    let env = Setup::new(111)
        .group(Group::new("lower", 3).address("127.0.111.1"))
        .build()?;
    let a = env.addr(1);
    let listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let ids = connect_all(&mut probe, a, 25, 3)?;
    env.cli(&["limit", "set", "lower", "1", "--address", "127.0.111.1"])?
        .ok()?;
    let s = env.wait_group("lower", APPLY, |s| s.limit == 1)?.0;
    assert_eq!((s.limit, s.open), (1, 3), "limit lowered below open: {s:?}");
    refused(&mut probe, a, 25, "3 open, limit lowered to 1")?;
    for &id in &ids {
        assert_eq!(
            probe.write(id)?,
            Outcome::Ok,
            "open connection {id} was touched"
        );
    }
    assert_eq!(listener.open(), 3, "open connections were closed");
    probe.close(ids[0])?;
    refused(&mut probe, a, 25, "2 open, limit 1")?;
    probe.close(ids[1])?;
    refused(&mut probe, a, 25, "1 open, limit 1")?;
    probe.close(ids[2])?;
    probe.connect_ok(a, 25).context("0 open, limit 1")?;
    refused(&mut probe, a, 25, "1 open again, limit 1")?;
    Ok(())
}

#[test]
fn removed_group_gives_slots_back_to_its_own_counter() -> Result<()> {
    root_or_skip!("removed_group_gives_slots_back_to_its_own_counter");
    let env = Setup::new(112)
        .group(Group::new("old", 3).address("127.0.112.1"))
        .group(Group::new("stay", 1).address("127.0.112.3"))
        .build()?;
    let (a, b) = (env.addr(1), env.addr(2));
    let _listeners = (Listener::start((a, 25))?, Listener::start((b, 25))?);
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let old = connect_all(&mut probe, a, 25, 2)?;
    env.cli(&["limit", "rm", "old"])?.ok()?;
    env.cli(&["limit", "set", "new", "2", "--address", "127.0.112.2"])?
        .ok()?;
    let s = env.wait_group("new", APPLY, |s| s.limit == 2)?.0;
    assert_eq!(s.open, 0, "a new group starts at 0: {s:?}");
    let new = connect_all(&mut probe, b, 25, 2).context("new group of limit 2")?;
    refused(&mut probe, b, 25, "new group full")?;
    close_all(&mut probe, &old)?;
    assert_no_wrapped(&env)?;
    let s = env.group_status("new")?;
    assert_eq!(
        s.open, 2,
        "closing the removed group's sockets changed another group: {s:?}"
    );
    refused(&mut probe, b, 25, "new group still full")?;
    connect_all(&mut probe, a, 25, 3).context("removed group's address: default limit 10")?;
    close_all(&mut probe, &new)?;
    assert_eq!(counts_when_open(&env, "new", 0)?.1, 0);
    assert_no_wrapped(&env)
}

// DNS-based groups, against a DNS server on loopback serving these records.
const ZONE: &str = "
alpha.test.            MX     10 mx.provider.test.
beta.test.             MX     20 mx.provider.test.
mx.provider.test.      A      127.0.120.1
two.test.              MX     10 mx1.two.test.
two.test.              MX     20 mx2.two.test.
mx1.two.test.          A      127.0.121.1
mx2.two.test.          A      127.0.121.2
nullmx.test.           MX     0 .
nullmx.test.           A      127.0.122.1
real.test.             A      127.0.122.2
alias.test.            MX     10 mail.alias.test.
mail.alias.test.       CNAME  real.hosting.test.
real.hosting.test.     A      127.0.123.1
";

/// Waits until `group` has resolved at least `count` addresses.
fn resolved(env: &TestEnv, group: &str, count: usize) -> Result<GroupStatus> {
    let (s, done) = env.wait_group(group, WAIT, |s| s.addresses.len() >= count)?;
    if !done {
        bail!(
            "group {group} resolved to {:?}, expected {count} addresses",
            s.addresses
        );
    }
    Ok(s)
}

#[test]
fn domains_with_the_same_mx_share_one_limit() -> Result<()> {
    root_or_skip!("domains_with_the_same_mx_share_one_limit");
    let dns = DnsServer::start(ZONE)?;
    let env = Setup::new(120)
        .nameserver(dns.addr())
        .group(
            Group::new("provider", 2)
                .domain("alpha.test")
                .domain("beta.test"),
        )
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let s = resolved(&env, "provider", 1)?;
    assert_eq!(s.addresses.len(), 1, "{s:?}");
    assert!(s.has_address("127.0.120.1"), "{s:?}");
    let mut probe = Probe::in_cgroup(&env)?;
    connect_all(&mut probe, a, 25, 2)?;
    refused(&mut probe, a, 25, "shared MX host, limit 2")?;
    Ok(())
}

#[test]
fn domain_with_two_mx_hosts_has_both_addresses() -> Result<()> {
    root_or_skip!("domain_with_two_mx_hosts_has_both_addresses");
    let dns = DnsServer::start(ZONE)?;
    let env = Setup::new(121)
        .nameserver(dns.addr())
        .group(Group::new("two", 3).domain("two.test"))
        .build()?;
    let (a, b) = (env.addr(1), env.addr(2));
    let _listeners = (Listener::start((a, 25))?, Listener::start((b, 25))?);
    let _daemon = Daemon::start(&env)?;
    let s = resolved(&env, "two", 2)?;
    assert!(
        s.has_address("127.0.121.1") && s.has_address("127.0.121.2"),
        "{s:?}"
    );
    let mut probe = Probe::in_cgroup(&env)?;
    connect_all(&mut probe, a, 25, 2)?;
    probe.connect_ok(b, 25)?;
    refused(
        &mut probe,
        b,
        25,
        "second MX host of a group of limit 3 holding 3",
    )?;
    Ok(())
}

#[test]
fn null_mx_domain_adds_no_address() -> Result<()> {
    root_or_skip!("null_mx_domain_adds_no_address");
    let dns = DnsServer::start(ZONE)?;
    let env = Setup::new(122)
        .default_limit(3)
        .nameserver(dns.addr())
        .group(
            Group::new("null", 1)
                .domain("nullmx.test")
                .domain("real.test"),
        )
        .build()?;
    let (a, b) = (env.addr(1), env.addr(2));
    let _listeners = (Listener::start((a, 25))?, Listener::start((b, 25))?);
    let _daemon = Daemon::start(&env)?;
    let s = resolved(&env, "null", 1)?;
    assert!(
        s.has_address("127.0.122.2"),
        "the domain without MX gives its A: {s:?}"
    );
    assert!(
        !s.has_address("127.0.122.1"),
        "a null MX domain gave its A: {s:?}"
    );
    let mut probe = Probe::in_cgroup(&env)?;
    connect_all(&mut probe, a, 25, 3).context("null MX domain's A: default limit 3")?;
    refused(&mut probe, a, 25, "default limit 3")?;
    Ok(())
}

#[test]
fn mx_pointing_at_a_cname_resolves() -> Result<()> {
    root_or_skip!("mx_pointing_at_a_cname_resolves");
    let dns = DnsServer::start(ZONE)?;
    let env = Setup::new(123)
        .nameserver(dns.addr())
        .group(Group::new("alias", 1).domain("alias.test"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let s = resolved(&env, "alias", 1)?;
    assert!(s.has_address("127.0.123.1"), "{s:?}");
    let mut probe = Probe::in_cgroup(&env)?;
    probe.connect_ok(a, 25)?;
    refused(&mut probe, a, 25, "MX via CNAME, limit 1")?;
    Ok(())
}

fn swaks(env: &TestEnv, server: Ipv4Addr) -> Result<Child> {
    let mut command: Command = env.command();
    command
        .arg("exec")
        .arg("--config")
        .arg(env.config_path())
        .arg("--")
        .arg("swaks");
    command.args([
        "--server",
        &format!("{server}:25"),
        "--to",
        "user@example.com",
    ]);
    command.args(["--from", "sender@example.net", "--helo", "qthrottle.test"]);
    command
        .args(["--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
        .spawn()
        .context("failed to start swaks under qthrottle exec")
}

/// Waits for a child with a bound; its output with stdout and stderr joined.
fn finish(mut child: Child, timeout: Duration) -> Result<(Output, String)> {
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            bail!("swaks still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output, text))
}

#[test]
fn third_concurrent_swaks_is_refused_and_two_complete() -> Result<()> {
    root_or_skip!("third_concurrent_swaks_is_refused_and_two_complete");
    if Command::new("swaks").arg("--version").output().is_err() {
        bail!("swaks is not installed (apt-get install swaks)");
    }
    let env = Setup::new(113)
        .group(Group::new("mx", 2).address("127.0.113.1"))
        .build()?;
    let a = env.addr(1);
    let server = SmtpServer::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let first = swaks(&env, a)?;
    server.wait(WAIT, |c| c.held == 1)?;
    let second = swaks(&env, a)?;
    server.wait(WAIT, |c| c.held == 2)?;
    let (third, text) = finish(swaks(&env, a)?, Duration::from_secs(60))?;
    assert!(!third.status.success(), "third swaks succeeded:\n{text}");
    assert!(
        text.contains("Operation not permitted"),
        "third swaks output:\n{text}"
    );
    assert_eq!(
        server.counts().sessions,
        2,
        "the third session reached the server"
    );
    server.release();
    for child in [first, second] {
        let (output, text) = finish(child, Duration::from_secs(60))?;
        assert!(output.status.success(), "held swaks failed:\n{text}");
        assert!(text.contains("250 queued"), "held swaks output:\n{text}");
    }
    let s = status_when(&env, "mx", |s| s.open == 0)?;
    assert_eq!((s.open, s.allowed, s.refused), (0, 2, 1), "{s:?}");
    Ok(())
}

#[test]
fn reloads_never_leave_a_grouped_address_unlimited() -> Result<()> {
    root_or_skip!("reloads_never_leave_a_grouped_address_unlimited");
    let env = Setup::new(115)
        .group(Group::new("hold", 1).address("127.0.115.1"))
        .build()?;
    let a = env.addr(1);
    let listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut holder = Probe::in_cgroup(&env)?;
    holder.connect_ok(a, 25)?;
    let mut looper = Probe::in_cgroup(&env)?;
    looper.start_loop(a, 25, 4.0, LoopMode::Abort)?;
    // Move the group's address between a literal and a range covering it,
    // and change other groups, while the loop connects.
    let start = Instant::now();
    let mut reloads = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let covering = if reloads % 2 == 0 {
            "127.0.115.0/30"
        } else {
            "127.0.115.1"
        };
        env.cli(&["limit", "set", "hold", "1", "--address", covering])?
            .ok()?;
        let other = format!("127.0.115.{}", 10 + reloads % 50);
        env.cli(&["limit", "set", "other", "3", "--address", &other])?
            .ok()?;
        reloads += 1;
    }
    let counts = looper.finish_loop(Duration::from_secs(60))?;
    eprintln!("{reloads} reloads, loop {counts:?}");
    assert_eq!(
        counts.ok, 0,
        "connects got through during {reloads} reloads: {counts:?}"
    );
    assert!(counts.eperm > 0 && counts.other == 0, "{counts:?}");
    assert_eq!(listener.max_open(), 1);
    assert_eq!(env.group_status("hold")?.open, 1);
    Ok(())
}

#[test]
fn address_claimed_by_two_groups_goes_to_the_lower_limit() -> Result<()> {
    root_or_skip!("address_claimed_by_two_groups_goes_to_the_lower_limit");
    let env = Setup::new(116)
        .group(Group::new("wide", 3).address("127.0.116.1"))
        .group(Group::new("narrow", 2).address("127.0.116.1"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    connect_all(&mut probe, a, 25, 2)?;
    refused(&mut probe, a, 25, "address claimed with limits 3 and 2")?;
    assert_eq!(env.group_status("narrow")?.open, 2);
    let shown: Vec<String> = env
        .status()?
        .iter()
        .map(|g| g.conflicts.to_string())
        .collect();
    assert!(
        shown.iter().any(|c| c.contains("127.0.116.1")),
        "no conflict shown: {shown:?}"
    );
    Ok(())
}

#[test]
fn attach_moves_a_running_process_in() -> Result<()> {
    root_or_skip!("attach_moves_a_running_process_in");
    let env = Setup::new(117)
        .group(Group::new("late", 1).address("127.0.117.1"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::outside()?;
    connect_all(&mut probe, a, 25, 2).context("not attached yet")?;
    env.cli(&["attach", &probe.pid().to_string()])?.ok()?;
    assert_eq!(probe.cgroup()?, format!("/{}", env.name()));
    probe.connect_ok(a, 25)?;
    refused(&mut probe, a, 25, "attached process, limit 1")?;
    Ok(())
}

#[test]
fn sigterm_exits_and_leaves_enforcement_in_place() -> Result<()> {
    root_or_skip!("sigterm_exits_and_leaves_enforcement_in_place");
    let env = Setup::new(118)
        .group(Group::new("stays", 1).address("127.0.118.1"))
        .build()?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let mut daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    let id = probe.connect_ok(a, 25)?;
    daemon.signal(Signal::SIGTERM)?;
    assert_eq!(
        daemon.wait_exit(WAIT)?,
        Some(0),
        "exit status after SIGTERM"
    );
    refused(&mut probe, a, 25, "daemon stopped, limit 1")?;
    probe.close(id)?;
    let s = status_when(&env, "stays", |s| s.open == 0)?;
    assert_eq!((s.open, s.allowed, s.refused), (0, 1, 1), "{s:?}");
    probe
        .connect_ok(a, 25)
        .context("slot given back with the daemon stopped")?;
    Ok(())
}

/// Per-address counting of ungrouped destinations under contention: many
/// processes connecting and closing toward two addresses never get more than
/// the default limit through at once, and every count returns to zero.
/// (A first design that deleted idle per-address counters let a connect that
/// raced the deletion through uncounted; this caught it.)
#[test]
fn ungrouped_counts_hold_under_contention() -> Result<()> {
    root_or_skip!("ungrouped_counts_hold_under_contention");
    const LIMIT: u64 = 2;
    let env = Setup::new(124).default_limit(2).build()?;
    let targets = [env.addr(1), env.addr(2)];
    let listeners: Vec<Listener> = targets
        .iter()
        .map(|a| Listener::start((*a, 25)))
        .collect::<Result<_>>()?;
    let _daemon = Daemon::start(&env)?;
    let mut probes: Vec<Probe> = (0..12)
        .map(|_| Probe::in_cgroup(&env))
        .collect::<Result<_>>()?;
    for (i, probe) in probes.iter_mut().enumerate() {
        probe.start_loop(targets[i % 2], 25, 3.0, LoopMode::Wait)?;
    }
    let mut total = qthrottle_tests::probe::LoopCounts::default();
    for probe in &mut probes {
        let counts = probe.finish_loop(Duration::from_secs(120))?;
        assert_eq!(
            counts.other, 0,
            "connect failed otherwise than EPERM: {counts:?}"
        );
        total.ok += counts.ok;
        total.eperm += counts.eperm;
    }
    eprintln!("ungrouped contention: {total:?}");
    for l in &listeners {
        assert!(
            l.max_open() <= LIMIT,
            "listener saw {} at once",
            l.max_open()
        );
        l.wait_open(0, WAIT)?;
    }
    assert!(
        total.ok > 0 && total.eperm > 0,
        "no contention happened: {total:?}"
    );
    let s = status_when(&env, "(default)", |s| s.open == 0)?;
    assert_eq!(
        (s.open, s.allowed, s.refused),
        (0, total.ok, total.eperm),
        "{s:?}"
    );
    assert!(
        s.addresses.is_empty(),
        "addresses still counted open: {:?}",
        s.addresses
    );
    assert_no_wrapped(&env)?;
    Ok(())
}

/// When the kernel's table of counted connections is full, a connect is let
/// through uncounted by default (`map_full = "open"`), refused with
/// `map_full = "closed"`, and every such event is counted in status.
#[test]
fn full_connection_table_fails_open_or_closed_and_is_counted() -> Result<()> {
    root_or_skip!("full_connection_table_fails_open_or_closed_and_is_counted");
    let env = Setup::new(125)
        .group(Group::new("roomy", 5).address("127.0.125.1"))
        .build()?;
    let base = env.config_text();
    // One entry: the second open connection cannot be recorded.
    env.write_config_text(&base.replacen("ports = ", "max_connections = 1\nports = ", 1))?;
    let a = env.addr(1);
    let _listener = Listener::start((a, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut probe = Probe::in_cgroup(&env)?;
    probe.connect_ok(a, 25)?;
    probe.connect_ok(a, 25)?;
    let s = status_when(&env, "roomy", |s| s.open == 1)?;
    assert_eq!(s.open, 1, "only the recorded connection is counted: {s:?}");
    assert_eq!(map_full_events(&env)?, 1);
    let closed = base.replacen(
        "ports = ",
        "max_connections = 1\nmap_full = \"closed\"\nports = ",
        1,
    );
    env.write_config_text(&closed)?;
    assert_eq!(env.control(&json!({"op": "reload"}))?["status"], "ok");
    refused(&mut probe, a, 25, "table full with map_full = closed")?;
    assert_eq!(map_full_events(&env)?, 2);
    Ok(())
}

/// The kernel's map-full counter, from the `(default)` row of status.
fn map_full_events(env: &TestEnv) -> Result<u64> {
    let out = env.cli(&["status", "--json"])?;
    let rows: serde_json::Value = serde_json::from_str(&out.stdout)?;
    let default = rows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == "(default)"))
        .context("no (default) row in status")?;
    default["kernel_events"]["map_full"]
        .as_u64()
        .context("no map_full counter in status")
}

/// Hundreds of long-lived connections take a block of neighbouring entries in
/// the kernel's table of counted sockets; a flood of short connections whose
/// cookies wrap onto that block must still find room (no map-full event, so
/// nothing goes through uncounted) and the flooded group's limit must hold.
#[test]
fn long_lived_connections_do_not_fill_the_socket_table() -> Result<()> {
    root_or_skip!("long_lived_connections_do_not_fill_the_socket_table");
    let env = Setup::new(126)
        .group(Group::new("held", 1000).address("127.0.126.1"))
        .group(Group::new("busy", 2).address("127.0.126.2"))
        .build()?;
    let (held, busy) = (env.addr(1), env.addr(2));
    let _held_listener = Listener::start((held, 25))?;
    let listener = Listener::start((busy, 25))?;
    let _daemon = Daemon::start(&env)?;
    let mut holder = Probe::in_cgroup(&env)?;
    connect_all(&mut holder, held, 25, 300)?;
    let mut probes: Vec<Probe> = (0..8)
        .map(|_| Probe::in_cgroup(&env))
        .collect::<Result<_>>()?;
    for probe in &mut probes {
        probe.start_loop(busy, 25, 4.0, LoopMode::Wait)?;
    }
    let mut total = qthrottle_tests::probe::LoopCounts::default();
    for probe in &mut probes {
        let counts = probe.finish_loop(Duration::from_secs(120))?;
        total.ok += counts.ok;
        total.eperm += counts.eperm;
    }
    eprintln!(
        "with 300 held: {total:?}, listener max {}",
        listener.max_open()
    );
    assert!(
        listener.max_open() <= 2,
        "listener saw {} at once",
        listener.max_open()
    );
    assert_eq!(
        map_full_events(&env)?,
        0,
        "the table reported full while nearly empty"
    );
    let s = status_when(&env, "held", |s| s.open == 300)?;
    assert_eq!(s.open, 300);
    Ok(())
}
