//! `cargo xtask bench spawner`: the spawner's throughput and CPU time per
//! delivery with a qmail-remote that exits at once, at 100, 1,000 and 10,000
//! deliveries in flight, and its own memory per delivery in flight.
//!
//! CPU is the spawner's and its workers' own (user + system, from
//! /proc/PID/stat), not that of the qmail-remote processes. Memory is the
//! resident size of the spawner and its workers with N deliveries in flight,
//! less the same with one delivery, divided by N.
//!
//! Options: `--total N` (deliveries per run, default 20000),
//! `--held N` (deliveries in flight for the memory figure, default 10000).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use qthrottle_tests::rspawn::{Answer, FakeDaemon, Options, QmailDir, Spawner, Wire, children};

const DOMAIN: &str = "bench.example";
const TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-spawner: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name);
    at.and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run() -> Result<()> {
    let total = arg("--total", 20_000);
    let held = arg("--held", 10_000);
    let qmail = QmailDir::new()?;
    let socket = qmail.path().join("control.sock");
    let answer = Answer {
        group: "bench".into(),
        limit: 1_000_000,
        ttl: 3600,
    };
    let _daemon = FakeDaemon::start(&socket, &[(DOMAIN, answer)])?;
    let message = qmail.message("Subject: bench\n\nbody\n")?;
    println!("spawner benchmark: qmail-remote exits at once; CPU is spawner + workers");
    println!(
        "{:>10} {:>10} {:>14} {:>18}",
        "in flight", "deliveries", "deliveries/s", "CPU us/delivery"
    );
    for in_flight in [100, 1_000, 10_000] {
        let (rate, cpu) = throughput(&qmail, &socket, &message, in_flight, total.max(in_flight))?;
        println!(
            "{in_flight:>10} {:>10} {rate:>14.0} {cpu:>18.1}",
            total.max(in_flight)
        );
    }
    let per_delivery = memory(&qmail, &socket, &message, held)?;
    println!("own memory per delivery in flight at {held} in flight: {per_delivery:.0} bytes");
    Ok(())
}

fn start(qmail: &QmailDir, socket: &std::path::Path, concurrency: usize) -> Result<Spawner> {
    let mut opts = Options::new(Wire::TwoByte, concurrency as u32, socket);
    if let Some(remote) = std::env::var_os("BENCH_QMAILREMOTE") {
        opts = opts.env("QMAILREMOTE", remote.to_string_lossy());
    }
    Spawner::start(qmail, &opts)
}

/// Keep `in_flight` deliveries going until `total` are reported.
fn throughput(
    qmail: &QmailDir,
    socket: &std::path::Path,
    message: &str,
    in_flight: usize,
    total: usize,
) -> Result<(f64, f64)> {
    let mut spawner = start(qmail, socket, in_flight)?;
    let recipient = format!("bench@{DOMAIN}");
    let started = Instant::now();
    let cpu_before = cpu_seconds(spawner.pid())?;
    let mut batch = Vec::new();
    for n in 0..in_flight {
        batch.extend(spawner.command_bytes(n as u16, message, "a@b", &recipient));
    }
    spawner.send_raw(&batch)?;
    let mut sent = in_flight;
    for _ in 0..total {
        let report = spawner.report(TIMEOUT)?;
        if report.letter != 'K' {
            bail!("delivery failed: {report:?}");
        }
        if sent < total {
            spawner.send(report.delnum, message, "a@b", &recipient)?;
            sent += 1;
        }
    }
    let cpu = cpu_seconds(spawner.pid())? - cpu_before;
    let elapsed = started.elapsed().as_secs_f64();
    spawner.wait(TIMEOUT)?;
    Ok((total as f64 / elapsed, cpu * 1e6 / total as f64))
}

/// Resident memory per delivery in flight, with `held` deliveries asleep.
fn memory(qmail: &QmailDir, socket: &std::path::Path, message: &str, held: usize) -> Result<f64> {
    let mut spawner = start(qmail, socket, held)?;
    let sleeper = format!("sleep=600000@{DOMAIN}");
    spawner.send(0, message, "a@b", &sleeper)?;
    wait_children(spawner.pid(), 1)?;
    let idle = rss_bytes(spawner.pid())?;
    let mut batch = Vec::new();
    for n in 1..held {
        batch.extend(spawner.command_bytes(n as u16, message, "a@b", &sleeper));
    }
    spawner.send_raw(&batch)?;
    wait_children(spawner.pid(), held)?;
    let busy = rss_bytes(spawner.pid())?;
    for pid in descendants(spawner.pid())?.1 {
        // SAFETY: kill(2) on a sleeping qmail-remote stand-in we started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    spawner.reports(held, TIMEOUT)?;
    spawner.wait(TIMEOUT)?;
    Ok((busy as f64 - idle as f64) / (held - 1) as f64)
}

/// The workers of the spawner `pid` and their children (qmail-remote).
fn descendants(pid: u32) -> Result<(Vec<u32>, Vec<u32>)> {
    let workers = children(pid)?;
    let mut remotes = Vec::new();
    for w in &workers {
        remotes.extend(children(*w)?);
    }
    Ok((workers, remotes))
}

fn wait_children(pid: u32, n: usize) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while descendants(pid)?.1.len() < n {
        if Instant::now() > deadline {
            bail!("fewer than {n} deliveries in flight after {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// User + system CPU of the spawner and its workers, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let ticks = 100.0; // USER_HZ
    let mut total = 0.0;
    for p in std::iter::once(pid).chain(descendants(pid)?.0) {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat"))?;
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        total += (field(11) + field(12)) / ticks;
    }
    Ok(total)
}

/// Resident memory of the spawner and its workers, in bytes.
fn rss_bytes(pid: u32) -> Result<u64> {
    let mut total = 0;
    for p in std::iter::once(pid).chain(descendants(pid)?.0) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap_or("");
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        total += kb * 1024;
    }
    Ok(total)
}
