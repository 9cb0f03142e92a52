//! Measures what qthrottle's kernel programs cost: the average run time per
//! call of each program (from the kernel's BPF run-time statistics) on the
//! counted, refused and unmatched connect paths, and the time of a
//! connect()+close() loop with the programs attached against a cgroup with
//! nothing attached. Needs root and a built `qthrottle` (see QTHROTTLE_BIN).
//!
//! Usage: `bench-kernel [--iterations N]`. It runs its loops as child
//! processes of itself (`bench-kernel loop ADDR PORT N`) placed in a cgroup.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::socket::{SockaddrStorage, connect};
use qthrottle_tests::daemon::Daemon;
use qthrottle_tests::env::{Group, Setup, TestEnv, cgroup2_mount, remove_cgroup};
use qthrottle_tests::listener::{abort, listening_socket};
use qthrottle_tests::probe::spawn_into_cgroup;

/// Loopback network of the benchmark (the tests use 100 to 149).
const NET: u8 = 250;
/// A port outside the limited ones.
const UNMATCHED_PORT: u16 = 2650;
const DEFAULT_ITERATIONS: u64 = 20_000;
/// Timed loops per path and side.
const ROUNDS: usize = 3;

/// Attach types of the programs (enum bpf_attach_type).
const ATTACH_TYPES: [(u32, &str); 3] = [(10, "connect4"), (11, "connect6"), (34, "sock_release")];

/// bpf(2) commands used here.
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_PROG_QUERY: i64 = 16;
const BPF_ENABLE_STATS: i64 = 32;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["loop", addr, port, n] => child_loop(addr, port, n),
        [] => bench(DEFAULT_ITERATIONS),
        ["--iterations", n] => bench(n.parse().context("failed to parse --iterations")?),
        _ => bail!("usage: bench-kernel [--iterations N]"),
    }
}

/// One connect path to measure.
struct ConnectPath {
    name: &'static str,
    to: SocketAddr,
}

fn paths(env: &TestEnv) -> Vec<ConnectPath> {
    let v4 = |host, port| SocketAddr::new(IpAddr::V4(env.addr(host)), port);
    vec![
        ConnectPath {
            name: "counted",
            to: v4(1, 25),
        },
        ConnectPath {
            name: "refused",
            to: v4(2, 25),
        },
        ConnectPath {
            name: "unmatched",
            to: v4(1, UNMATCHED_PORT),
        },
        ConnectPath {
            name: "counted v6",
            to: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 25),
        },
    ]
}

fn bench(iterations: u64) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-kernel needs root (cgroups, bpf programs)");
    }
    let env = Setup::new(NET)
        .group(
            Group::new("room", 1_000_000)
                .address(format!("127.0.{NET}.1"))
                .address("::1"),
        )
        .group(Group::new("full", 0).address(format!("127.0.{NET}.2")))
        .build()?;
    let paths = paths(&env);
    for path in &paths {
        sink(path.to)?;
    }
    let mut daemon = Daemon::start(&env)?;
    daemon.log_on_drop(false);
    let bare = BareCgroup::create()?;
    let _stats = enable_stats()?;
    let programs = attached_programs(env.cgroup_path())?;
    println!("{iterations} connect()+close() per loop, best of {ROUNDS} loops per side");
    println!("program columns: average ns per call; loop columns: ns per connect()+close()");
    println!(
        "{:<12} {:>10} {:>10} {:>13} {:>12} {:>12} {:>7}",
        "path", "connect4", "connect6", "sock_release", "attached", "detached", "ratio"
    );
    for path in &paths {
        measure(path, iterations, &programs, env.cgroup_path(), &bare.0)?;
    }
    Ok(())
}

fn measure(
    path: &ConnectPath,
    iterations: u64,
    programs: &[Program],
    attached: &Path,
    detached: &Path,
) -> Result<()> {
    run_loop(attached, path.to, iterations / 10)?;
    run_loop(detached, path.to, iterations / 10)?;
    let before = snapshot(programs)?;
    let (mut attached_ns, mut detached_ns) = (u64::MAX, u64::MAX);
    // Alternate and keep each side's best round: loopback timing is noisy.
    for _ in 0..ROUNDS {
        attached_ns = attached_ns.min(run_loop(attached, path.to, iterations)?);
        detached_ns = detached_ns.min(run_loop(detached, path.to, iterations)?);
    }
    let cells = per_call(&before, &snapshot(programs)?);
    let cell = |name| cells.get(name).cloned().unwrap_or_else(|| "-".to_owned());
    let per_iteration = |total: u64| total / iterations.max(1);
    let ratio = attached_ns as f64 / detached_ns.max(1) as f64;
    println!(
        "{:<12} {:>10} {:>10} {:>13} {:>12} {:>12} {:>7.2}",
        path.name,
        cell("connect4"),
        cell("connect6"),
        cell("sock_release"),
        per_iteration(attached_ns),
        per_iteration(detached_ns),
        ratio
    );
    Ok(())
}

/// Average ns per call of each program between two snapshots.
fn per_call(before: &Snapshot, after: &Snapshot) -> BTreeMap<&'static str, String> {
    let mut cells = BTreeMap::new();
    for (name, (time, count)) in after {
        let (time0, count0) = before.get(name).copied().unwrap_or_default();
        let calls = count.saturating_sub(count0);
        if let Some(average) = time.saturating_sub(time0).checked_div(calls) {
            cells.insert(*name, average.to_string());
        }
    }
    cells
}

/// A cgroup with nothing attached, for the loops without programs.
struct BareCgroup(PathBuf);

impl BareCgroup {
    fn create() -> Result<BareCgroup> {
        let path = cgroup2_mount()?.join(format!("qt-bench-{}-bare", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(BareCgroup(path))
    }
}

impl Drop for BareCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

/// A listener that accepts and resets every connection at once.
fn sink(addr: SocketAddr) -> Result<()> {
    let listener = listening_socket(addr)?;
    listener
        .set_nonblocking(false)
        .context("failed to make the listener blocking")?;
    std::thread::spawn(move || {
        while let Ok((stream, _)) = listener.accept() {
            abort(stream);
        }
    });
    Ok(())
}

/// Runs `n` connects from a child in `cgroup`; the loop's time in ns.
fn run_loop(cgroup: &Path, to: SocketAddr, n: u64) -> Result<u64> {
    let exe = std::env::current_exe().context("failed to find bench-kernel itself")?;
    let mut command = Command::new(exe);
    command
        .arg("loop")
        .arg(to.ip().to_string())
        .arg(to.port().to_string())
        .arg(n.to_string());
    spawn_into_cgroup(&mut command, cgroup)?;
    let output = command.output().context("failed to run a connect loop")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "connect loop failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let ns = text.split_whitespace().next().and_then(|w| w.parse().ok());
    ns.with_context(|| format!("unexpected loop output {text:?}"))
}

/// The child side: `n` connect()+close() with SO_LINGER 0; prints
/// `NS OK ERR`.
fn child_loop(addr: &str, port: &str, n: &str) -> Result<()> {
    let to = SocketAddr::new(addr.parse()?, port.parse()?);
    let n: u64 = n.parse()?;
    let target = SockaddrStorage::from(to);
    let (mut ok, mut err) = (0u64, 0u64);
    let start = Instant::now();
    for _ in 0..n {
        let fd = socket_for(to)?;
        match connect(fd.as_raw_fd(), &target) {
            Ok(()) => ok += 1,
            // The sink may reset a connection before connect() returns.
            Err(Errno::ECONNRESET) => ok += 1,
            Err(Errno::EPERM | Errno::ECONNREFUSED) => err += 1,
            Err(e) => bail!("connect to {to} failed: {e}"),
        }
    }
    println!("{} {ok} {err}", start.elapsed().as_nanos());
    Ok(())
}

fn socket_for(to: SocketAddr) -> Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .context("failed to create a socket")?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, sockopt::Linger, &linger).context("failed to set SO_LINGER")?;
    Ok(fd)
}

/// A `union bpf_attr`, large enough for every command used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }

    fn set_u32(&mut self, offset: usize, value: u32) {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
    }

    fn set_u64(&mut self, offset: usize, value: u64) {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        bytes.copy_from_slice(&self.0[offset..offset + 4]);
        u32::from_ne_bytes(bytes)
    }
}

/// bpf(2); returns the non-negative result.
fn bpf(command: i64, attr: &mut Attr) -> Result<i64> {
    // SAFETY: `attr` is a zero-initialised buffer of the size passed, and
    // any pointer stored in it refers to memory that outlives the call.
    let result =
        unsafe { libc::syscall(libc::SYS_bpf, command, attr.0.as_mut_ptr(), attr.0.len()) };
    if result < 0 {
        return Err(std::io::Error::last_os_error()).context("failed to call bpf");
    }
    Ok(result)
}

fn fd_from(result: i64) -> Result<OwnedFd> {
    let fd = i32::try_from(result).context("failed to convert a descriptor")?;
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Turns on BPF run-time statistics for as long as the descriptor lives.
fn enable_stats() -> Result<OwnedFd> {
    let mut attr = Attr::new(); // type = BPF_STATS_RUN_TIME (0)
    fd_from(bpf(BPF_ENABLE_STATS, &mut attr).context("failed to enable BPF statistics")?)
}

/// A program attached to the benchmark's cgroup.
struct Program {
    name: &'static str,
    fd: OwnedFd,
}

fn attached_programs(cgroup: &Path) -> Result<Vec<Program>> {
    let path = CString::new(cgroup.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid NUL-terminated string; the result is checked.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("failed to open the cgroup");
    }
    // SAFETY: open(2) returned a new descriptor that nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut programs = Vec::new();
    for (attach_type, name) in ATTACH_TYPES {
        for id in query(&dir, attach_type)? {
            let mut attr = Attr::new();
            attr.set_u32(0, id);
            let fd = fd_from(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)?;
            programs.push(Program { name, fd });
        }
    }
    if programs.is_empty() {
        bail!("no programs attached to {}", cgroup.display());
    }
    Ok(programs)
}

/// Ids of the programs attached to the cgroup `dir` for `attach_type`.
fn query(dir: &OwnedFd, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = [0u32; 16];
    let mut attr = Attr::new();
    attr.set_u32(
        0,
        u32::try_from(dir.as_raw_fd()).context("bad cgroup descriptor")?,
    );
    attr.set_u32(4, attach_type);
    attr.set_u64(16, ids.as_mut_ptr() as u64);
    attr.set_u32(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut attr).context("failed to query the cgroup's programs")?;
    let count = (attr.u32_at(24) as usize).min(ids.len());
    Ok(ids[..count].to_vec())
}

/// (run_time_ns, run_cnt) per program name, summed.
type Snapshot = BTreeMap<&'static str, (u64, u64)>;

fn snapshot(programs: &[Program]) -> Result<Snapshot> {
    let mut totals = BTreeMap::new();
    for program in programs {
        let path = format!("/proc/self/fdinfo/{}", program.fd.as_raw_fd());
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
        let field = |key: &str| -> u64 {
            let line = text.lines().find_map(|l| l.strip_prefix(key));
            line.and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        let entry = totals.entry(program.name).or_insert((0, 0));
        entry.0 += field("run_time_ns:");
        entry.1 += field("run_cnt:");
    }
    Ok(totals)
}
