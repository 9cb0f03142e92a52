//! The spawner driven exactly as qmail-send drives it, with a stand-in for
//! qmail-remote: the protocol, every answer, holding per destination group,
//! scale, and (with the real daemon and kernel) the limit end to end.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use qthrottle_tests::daemon::Daemon;
use qthrottle_tests::dns::DnsServer;
use qthrottle_tests::env::{Group, Setup, TestEnv, have_root, qthrottle_bin};
use qthrottle_tests::rspawn::{
    Answer, FakeDaemon, Options, QmailDir, Report, SmtpCounter, Spawner, Wire,
};

const WAIT: Duration = Duration::from_secs(60);
const MESSAGE: &str = "Subject: test\n\nhello\n";

fn fake_in_place() {
    if std::env::var_os("FAKE_QMAIL_REMOTE").is_none() {
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var("FAKE_QMAIL_REMOTE", env!("CARGO_BIN_EXE_fake-qmail-remote")) };
    }
}

/// A qmail directory, one queued message, and options whose daemon socket
/// does not exist yet.
fn setup(wire: Wire, concurrency: u32) -> Result<(QmailDir, String, Options)> {
    fake_in_place();
    let qmail = QmailDir::new()?;
    let message = qmail.message(MESSAGE)?;
    let socket = qmail.path().join("control.sock");
    Ok((qmail, message, Options::new(wire, concurrency, &socket)))
}

/// `setup` with a daemon that places no domain in any group.
fn setup_placing_nothing(
    wire: Wire,
    concurrency: u32,
) -> Result<(QmailDir, String, Options, FakeDaemon)> {
    let (qmail, message, opts) = setup(wire, concurrency)?;
    let daemon = FakeDaemon::start(&opts.socket, &[])?;
    Ok((qmail, message, opts, daemon))
}

fn one(spawner: &Spawner) -> Result<Report> {
    spawner.report(WAIT)
}

fn expect_report(report: &Report, letter: char, text: &str) -> Result<()> {
    ensure!(
        report.letter == letter && report.text == text,
        "expected {letter}{text:?}, got {report:?}"
    );
    Ok(())
}

#[test]
fn one_byte_wire_announces_runs_and_clears_tcpto() -> Result<()> {
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::OneByte, 120)?;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    ensure!(spawner.announced == 120, "announced {}", spawner.announced);
    ensure!(qmail.tcpto()? == vec![0u8; 1024], "tcpto not cleared");
    spawner.send(7, &message, "from@a.example", "echo@Dest.Example")?;
    let report = one(&spawner)?;
    ensure!(report.delnum == 7, "{report:?}");
    let args = "host=Dest.Example sender=from@a.example recipient=echo@Dest.Example";
    ensure!(
        report.letter == 'K' && report.text.starts_with(args),
        "{report:?}"
    );
    ensure!(
        report.text.contains(&format!("size={}", MESSAGE.len())),
        "{report:?}"
    );
    let (status, rest) = spawner.wait(WAIT)?;
    ensure!(status.success() && rest.is_empty(), "{status:?} {rest:?}");
    Ok(())
}

#[test]
fn two_byte_wire_and_subcommand() -> Result<()> {
    let (qmail, message, mut opts, _daemon) = setup_placing_nothing(Wire::TwoByte, 300)?;
    opts.subcommand = true;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    ensure!(spawner.announced == 300, "announced {}", spawner.announced);
    spawner.send(299, &message, "", "a@b.example")?;
    spawner.send(256, &message, "", "a@b.example")?;
    spawner.send(300, &message, "", "a@b.example")?;
    let reports = spawner.reports(3, WAIT)?;
    ensure!(
        reports[&299].letter == 'K' && reports[&256].letter == 'K',
        "{reports:?}"
    );
    expect_report(
        &reports[&300],
        'Z',
        "Internal error: delnum too big. (#4.3.5)\n",
    )?;
    Ok(())
}

#[test]
fn every_validation_answer_is_qmails() -> Result<()> {
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::OneByte, 20)?;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    let foreign = qmail.message(MESSAGE)?;
    std::os::unix::fs::chown(qmail.message_path(&foreign), Some(65534), None)?;
    let cases: Vec<(u16, String, &str, char, &str)> = vec![
        (
            20,
            message.clone(),
            "a@b",
            'Z',
            "Internal error: delnum too big. (#4.3.5)\n",
        ),
        (
            2,
            "12x".into(),
            "a@b",
            'D',
            "Internal error: messid has nonnumerics. (#5.3.5)\n",
        ),
        (
            3,
            "/12".into(),
            "a@b",
            'D',
            "Internal error: messid has nonnumerics. (#5.3.5)\n",
        ),
        (
            4,
            "1".repeat(100),
            "a@b",
            'D',
            "Internal error: messid too long. (#5.3.5)\n",
        ),
        (
            5,
            "1".repeat(99),
            "a@b",
            'Z',
            "qmail-spawn unable to open message. (#4.3.0)\n",
        ),
        (
            6,
            String::new(),
            "a@b",
            'D',
            "Internal error: messid too short. (#5.3.5)\n",
        ),
        (
            7,
            message.clone(),
            "nohost",
            'D',
            "Sorry, address must include host name. (#5.1.3)\n",
        ),
        (
            8,
            "0/99999".into(),
            "a@b",
            'Z',
            "qmail-spawn unable to open message. (#4.3.0)\n",
        ),
        (
            9,
            "0".into(),
            "a@b",
            'Z',
            "Sorry, message has wrong type. (#4.3.5)\n",
        ),
        (
            10,
            foreign,
            "a@b",
            'Z',
            "Sorry, message has wrong owner. (#4.3.5)\n",
        ),
    ];
    for (delnum, messid, recip, letter, text) in &cases {
        spawner.send(*delnum, messid, "s@x", recip)?;
        let report = one(&spawner)?;
        ensure!(report.delnum == *delnum, "{report:?}");
        expect_report(&report, *letter, text).with_context(|| format!("delivery {delnum}"))?;
    }
    in_use_and_out_of_memory(&mut spawner, &message)
}

fn in_use_and_out_of_memory(spawner: &mut Spawner, message: &str) -> Result<()> {
    spawner.send(1, message, "s@x", "sleep=800@b")?;
    spawner.send(1, message, "s@x", "a@b")?;
    expect_report(
        &one(spawner)?,
        'Z',
        "Internal error: delnum in use. (#4.3.5)\n",
    )?;
    expect_report(&one(spawner)?, 'K', "accepted without a connection.\n")?;
    let huge = "x".repeat((1 << 20) + 10);
    spawner.send(11, message, &huge, "a@b")?;
    expect_report(&one(spawner)?, 'Z', "qmail-spawn out of memory. (#4.3.0)\n")
}

#[test]
fn exit_codes_crashes_and_output_become_qmails_reports() -> Result<()> {
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::OneByte, 50)?;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    let long = format!("{}\n", "x".repeat(100_000));
    let cases: Vec<(&str, char, &str)> = vec![
        ("exit=111", 'Z', "Unable to run qmail-remote.\n"),
        ("exit=100", 'D', "Unable to run qmail-remote.\n"),
        ("exit=3", 'D', "Unable to run qmail-remote.\n"),
        ("crash", 'Z', "qmail-remote crashed.\n"),
        ("empty", 'Z', "qmail-remote produced no output.\n"),
        ("closeout=300", 'Z', "qmail-remote produced no output.\n"),
        (
            "perm",
            'D',
            "127.0.0.1 does not like recipient.\nGiving up.\n",
        ),
        (
            "temp",
            'Z',
            "127.0.0.1 does not like recipient.\nGiving up.\n",
        ),
        ("long=100000", 'K', &long),
    ];
    for (n, (local, _, _)) in cases.iter().enumerate() {
        spawner.send(n as u16, &message, "s@x", &format!("{local}@h.example"))?;
    }
    let reports = spawner.reports(cases.len(), WAIT)?;
    for (n, (local, letter, text)) in cases.iter().enumerate() {
        expect_report(&reports[&(n as u16)], *letter, text).with_context(|| local.to_string())?;
    }
    Ok(())
}

#[test]
fn missing_qmail_remote_is_permanent() -> Result<()> {
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::OneByte, 5)?;
    let opts = opts.env("QMAILREMOTE", qmail.path().join("bin/absent").display());
    let mut spawner = Spawner::start(&qmail, &opts)?;
    spawner.send(0, &message, "s@x", "a@b")?;
    expect_report(&one(&spawner)?, 'D', "Unable to run qmail-remote.\n")
}

#[test]
fn deliveries_complete_out_of_order() -> Result<()> {
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::OneByte, 5)?;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    spawner.send(1, &message, "s@x", "sleep=1500@slow.example")?;
    spawner.send(2, &message, "s@x", "sleep=10@fast.example")?;
    let first = one(&spawner)?;
    let second = one(&spawner)?;
    ensure!(
        first.delnum == 2 && second.delnum == 1,
        "{first:?} then {second:?}"
    );
    Ok(())
}

#[test]
fn end_of_input_finishes_deliveries_in_flight() -> Result<()> {
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::OneByte, 5)?;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    for n in 0..3 {
        spawner.send(n, &message, "s@x", "sleep=700@a.example")?;
    }
    spawner.send_raw(&[4, b'1'])?;
    let (status, reports) = spawner.wait(WAIT)?;
    ensure!(status.code() == Some(0), "{status:?}");
    let mut numbers: Vec<u16> = reports.iter().map(|r| r.delnum).collect();
    numbers.sort();
    ensure!(numbers == [0, 1, 2], "{reports:?}");
    ensure!(reports.iter().all(|r| r.letter == 'K'), "{reports:?}");
    Ok(())
}

#[test]
fn twenty_thousand_deliveries_in_flight_at_once() -> Result<()> {
    const N: u16 = 20_000;
    let (qmail, message, opts, _daemon) = setup_placing_nothing(Wire::TwoByte, u32::from(N))?;
    let gate = qmail.path().join("gate");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let opts = opts.env("FAKE_REMOTE_GATE", gate.display());
    let mut spawner = Spawner::start(&qmail, &opts)?;
    let mut batch = Vec::new();
    for n in 0..N {
        batch.extend(spawner.command_bytes(n, &message, "s@x", "gate@many.example"));
    }
    spawner.send_raw(&batch)?;
    wait_running(&spawner, usize::from(N), Duration::from_secs(600))?;
    // Keep the gate open for writing until every report is in: a remote that
    // reaches the gate only now must not wait for a writer that has gone.
    let opened = std::fs::OpenOptions::new().write(true).open(&gate)?;
    let reports = spawner.reports(usize::from(N), Duration::from_secs(600))?;
    drop(opened);
    ensure!(
        reports.values().all(|r| r.letter == 'K'),
        "a delivery failed"
    );
    let (status, rest) = spawner.wait(WAIT)?;
    ensure!(
        status.success() && rest.is_empty(),
        "extra reports: {rest:?}"
    );
    Ok(())
}

fn wait_running(spawner: &Spawner, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let running = spawner.remotes_running()?;
        if running >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {running} of {n} deliveries in flight");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn group(name: &str, limit: u32) -> Answer {
    Answer {
        group: name.into(),
        limit,
        ttl: 3600,
    }
}

#[test]
fn hold_timeout_and_full_queue_end_in_z_naming_the_group() -> Result<()> {
    let (qmail, message, mut opts) = setup(Wire::OneByte, 10)?;
    let daemon = FakeDaemon::start(&opts.socket, &[("orange.example", group("orange", 1))])?;
    opts.hold_timeout = 2;
    opts.hold_queue = 2;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    spawner.send(1, &message, "s@x", "sleep=5000@orange.example")?;
    for n in 2..=4 {
        spawner.send(n, &message, "s@x", "a@orange.example")?;
    }
    let reports = spawner.reports(4, WAIT)?;
    let overflow = &reports[&4];
    ensure!(
        overflow.letter == 'Z' && overflow.text.contains("group orange"),
        "{overflow:?}"
    );
    ensure!(
        overflow.text.contains("2 deliveries already waiting"),
        "{overflow:?}"
    );
    for n in [2, 3] {
        let r = &reports[&n];
        ensure!(r.letter == 'Z' && r.text.contains("group orange"), "{r:?}");
        ensure!(r.text.contains("waited 2 seconds"), "{r:?}");
    }
    ensure!(reports[&1].letter == 'K', "{:?}", reports[&1]);
    ensure!(daemon.lookups().len() == 1, "{:?}", daemon.lookups());
    Ok(())
}

#[test]
fn holding_keeps_a_group_at_its_limit_and_reports_to_the_daemon() -> Result<()> {
    let (qmail, message, opts) = setup(Wire::OneByte, 60)?;
    let domains: Vec<String> = (0..30).map(|i| format!("d{i}.example")).collect();
    let answers: Vec<(&str, Answer)> = domains
        .iter()
        .map(|d| (d.as_str(), group("g3", 3)))
        .collect();
    let daemon = FakeDaemon::start(&opts.socket, &answers)?;
    let smtp = SmtpCounter::start(([127, 0, 0, 1], 0), Duration::from_millis(150))?;
    qmail.set_routes(".relayed.example:relay.test:2525\n")?;
    let opts = opts.env("FAKE_REMOTE_SMTP", smtp.addr());
    let mut spawner = Spawner::start(&qmail, &opts)?;
    for (n, domain) in domains.iter().enumerate() {
        spawner.send(n as u16, &message, "s@x", &format!("rcpt@{domain}"))?;
    }
    let reports = spawner.reports(30, WAIT)?;
    ensure!(reports.values().all(|r| r.letter == 'K'), "{reports:?}");
    ensure!(
        smtp.max_open() == 3,
        "sessions open at once: {}",
        smtp.max_open()
    );
    ensure!(smtp.delivered() == 30, "delivered {}", smtp.delivered());
    spawner.send(40, &message, "s@x", "rcpt@x.relayed.example")?;
    ensure!(one(&spawner)?.letter == 'K', "relayed delivery failed");
    let relayed = (
        "x.relayed.example".to_string(),
        Some("relay.test".to_string()),
    );
    ensure!(
        daemon.lookups().contains(&relayed),
        "{:?}",
        daemon.lookups()
    );
    let told = daemon.deliveries();
    let held = told
        .iter()
        .filter_map(|g| g.get("g3"))
        .any(|d| d.in_flight == 3 && d.held > 0);
    ensure!(held, "daemon never told of held deliveries: {told:?}");
    Ok(())
}

#[test]
fn unreachable_daemon_means_spawning_without_holding_said_once() -> Result<()> {
    let (qmail, message, opts) = setup(Wire::OneByte, 10)?;
    let mut spawner = Spawner::start(&qmail, &opts)?;
    for n in 0..5 {
        spawner.send(n, &message, "s@x", "sleep=300@nowhere.example")?;
    }
    let reports = spawner.reports(5, WAIT)?;
    ensure!(reports.values().all(|r| r.letter == 'K'), "{reports:?}");
    let noted = reports
        .values()
        .filter(|r| r.text.contains("could not reach its daemon"))
        .count();
    ensure!(noted == 1, "the outage was said {noted} times: {reports:?}");
    Ok(())
}

// ---- with the real daemon and kernel ----

const PORT: u16 = 2525;

/// Whether the daemon can run here; prints why not.
fn daemon_available(test: &str) -> bool {
    if !have_root(test) {
        return false;
    }
    let help = std::process::Command::new(qthrottle_bin())
        .args(["daemon", "--help"])
        .output();
    if help.is_ok_and(|o| o.status.success()) {
        return true;
    }
    eprintln!(
        "skipping {test}: {} has no daemon",
        qthrottle_bin().display()
    );
    false
}

/// Thirty domains whose MX hosts all lie under `.shared.test`, one address.
fn shared_mx_zone(addr: std::net::Ipv4Addr) -> String {
    let mut zone = format!("mx.shared.test. 60 IN A {addr}\n");
    for i in 0..30 {
        zone.push_str(&format!("d{i}.test. 60 IN MX 10 mx.shared.test.\n"));
    }
    zone
}

struct Stage {
    env: TestEnv,
    _dns: DnsServer,
    smtp: SmtpCounter,
    qmail: QmailDir,
    message: String,
}

fn stage(net: u8, extra_config: &str) -> Result<Stage> {
    fake_in_place();
    let dns = DnsServer::start(&shared_mx_zone(std::net::Ipv4Addr::new(127, 0, net, 5)))?;
    let env = Setup::new(net)
        .ports(&[PORT])
        .nameserver(dns.addr())
        .group(Group::new("shared", 3).mx_suffix(".shared.test"))
        .build()?;
    let text = format!("{extra_config}{}", env.config_text());
    env.write_config_text(&text)?;
    let smtp = SmtpCounter::start((env.addr(5), PORT), Duration::from_millis(300))?;
    let qmail = QmailDir::new()?;
    let message = qmail.message(MESSAGE)?;
    Ok(Stage {
        env,
        _dns: dns,
        smtp,
        qmail,
        message,
    })
}

impl Stage {
    fn options(&self) -> Options {
        let mut opts = Options::new(Wire::OneByte, 100, &self.env.socket_path())
            .env("FAKE_REMOTE_SMTP", self.smtp.addr());
        opts.config_prefix = std::fs::read_to_string(self.env.config_path()).unwrap_or_default();
        opts
    }

    /// The spawner inside the test's cgroup, through `qthrottle exec`.
    fn spawner(&self, opts: &Options, setpriv: &[&str]) -> Result<Spawner> {
        let bin = qthrottle_bin();
        let config = self.env.config_path();
        let mut wrapper = vec![bin.to_str().context("path")?, "exec", "--config"];
        wrapper.push(config.to_str().context("path")?);
        wrapper.push("--");
        wrapper.extend_from_slice(setpriv);
        let mut command = Spawner::wrapped_command(&self.qmail, opts, &wrapper)?;
        Spawner::spawn(&mut command, opts.wire)
    }

    fn run_thirty(&self, spawner: &mut Spawner) -> Result<HashMap<u16, Report>> {
        for i in 0..30u16 {
            spawner.send(i, &self.message, "s@x", &format!("rcpt@d{i}.test"))?;
        }
        spawner.reports(30, Duration::from_secs(120))
    }
}

#[test]
fn real_daemon_group_of_three_holds_thirty_deliveries() -> Result<()> {
    if !daemon_available("real_daemon_group_of_three_holds_thirty_deliveries") {
        return Ok(());
    }
    let stage = stage(160, "")?;
    let _daemon = Daemon::start(&stage.env)?;
    let mut spawner = stage.spawner(&stage.options(), &[])?;
    let reports = stage.run_thirty(&mut spawner)?;
    ensure!(reports.values().all(|r| r.letter == 'K'), "{reports:?}");
    ensure!(
        stage.smtp.max_open() == 3,
        "{} open at once",
        stage.smtp.max_open()
    );
    ensure!(
        stage.smtp.delivered() == 30,
        "{} delivered",
        stage.smtp.delivered()
    );
    let status = stage.env.group_status("shared")?;
    ensure!(status.refused == 0, "kernel refused {}", status.refused);
    ensure!(
        status.allowed >= 30,
        "kernel counted {} connects",
        status.allowed
    );
    Ok(())
}

#[test]
fn real_daemon_stopped_kernel_still_enforces() -> Result<()> {
    if !daemon_available("real_daemon_stopped_kernel_still_enforces") {
        return Ok(());
    }
    let stage = stage(161, "")?;
    let mut daemon = Daemon::start(&stage.env)?;
    for i in 0..30 {
        let answer = stage
            .env
            .control(&serde_json::json!({"op": "lookup", "domain": format!("d{i}.test")}))?;
        ensure!(answer["status"] == "group", "{answer}");
    }
    daemon.kill()?;
    let mut spawner = stage.spawner(&stage.options(), &[])?;
    let reports = stage.run_thirty(&mut spawner)?;
    let refused = reports
        .values()
        .filter(|r| r.text.contains("not permitted"))
        .count();
    ensure!(reports.values().all(|r| r.letter != 'D'), "{reports:?}");
    ensure!(
        stage.smtp.max_open() <= 3,
        "{} open at once",
        stage.smtp.max_open()
    );
    ensure!(refused > 0, "the kernel refused nothing: {reports:?}");
    let noted = reports
        .values()
        .filter(|r| r.text.contains("could not reach its daemon"))
        .count();
    ensure!(noted == 1, "the outage was said {noted} times");
    Ok(())
}

#[test]
fn real_daemon_unprivileged_spawner_reaches_it_through_the_socket() -> Result<()> {
    if !daemon_available("real_daemon_unprivileged_spawner_reaches_it_through_the_socket") {
        return Ok(());
    }
    let stage = stage(162, "socket_group = \"nogroup\"\n")?;
    let _daemon = Daemon::start(&stage.env)?;
    for dir in [stage.env.dir(), stage.qmail.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--init-groups",
        "--",
    ];
    let mut spawner = stage.spawner(&stage.options(), &setpriv)?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", spawner.pid()))?;
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    ensure!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "spawner runs as {uid}"
    );
    let reports = stage.run_thirty(&mut spawner)?;
    ensure!(reports.values().all(|r| r.letter == 'K'), "{reports:?}");
    ensure!(
        !reports.values().any(|r| r.text.contains("could not reach")),
        "{reports:?}"
    );
    ensure!(
        stage.smtp.max_open() <= 3,
        "{} open at once",
        stage.smtp.max_open()
    );
    let status = stage.env.group_status("shared")?;
    ensure!(status.refused == 0, "kernel refused {}", status.refused);
    Ok(())
}
