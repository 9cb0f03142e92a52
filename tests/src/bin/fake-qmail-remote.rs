//! A stand-in for qmail-remote: `HOST SENDER RECIPIENT`, the message on
//! stdin, qmail-remote's report format on stdout and its exit codes.
//!
//! With `FAKE_REMOTE_SMTP=IP:PORT` it delivers over a real SMTP connection to
//! that address; without it, it accepts at once. The recipient's local part
//! holds `+`-separated directives that make it misbehave:
//! `sleep=MS` (wait first), `exit=N` (no output, exit N), `crash` (abort),
//! `empty` (no output, exit 0), `long=N` (an N-byte success text), `perm` and
//! `temp` (recipient refused), `echo` (report the arguments and message size),
//! `closeout=MS` (close stdout, then sleep, then exit), `gate` (wait until
//! the FIFO named by `FAKE_REMOTE_GATE` is opened for writing).
//! Kept small on purpose: tests run 20,000 of it at once, and it starts as
//! a C program does (no Rust runtime set-up), so that the spawner benchmark
//! measures the spawner rather than its child's start-up.

#![no_main]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[unsafe(no_mangle)]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    run();
}

fn run() -> ! {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        finish(b"DI (qmail-remote) was invoked improperly. (#5.3.5)\n\0");
    }
    let (host, sender, recipient) = (&args[1], &args[2], &args[3]);
    let mut message = Vec::new();
    if std::io::stdin().read_to_end(&mut message).is_err() {
        finish(b"ZUnable to read message. (#4.3.0)\n\0");
    }
    let local = recipient
        .rsplit_once('@')
        .map_or(recipient.as_str(), |(l, _)| l);
    let mut report = None;
    for directive in local.split('+') {
        report = obey(directive, [host, sender, recipient], message.len()).or(report);
    }
    let report = report.unwrap_or_else(|| deliver(sender, recipient, &message));
    finish(&report);
}

/// Carry out one directive; some decide the report.
fn obey(directive: &str, args: [&String; 3], size: usize) -> Option<Vec<u8>> {
    let (name, value) = directive.split_once('=').unwrap_or((directive, ""));
    let number = value.parse::<u64>().unwrap_or(0);
    match name {
        "sleep" => std::thread::sleep(Duration::from_millis(number)),
        "exit" => std::process::exit(number as i32),
        "crash" => std::process::abort(),
        "empty" => std::process::exit(0),
        "closeout" => close_stdout_and_linger(number),
        "gate" => wait_at_gate(),
        "long" => return Some(long_report(number as usize)),
        "perm" => return Some(b"h127.0.0.1 does not like recipient.\n\0DGiving up.\n\0".to_vec()),
        "temp" => return Some(b"s127.0.0.1 does not like recipient.\n\0ZGiving up.\n\0".to_vec()),
        "echo" => {
            let [host, sender, recipient] = args;
            let text =
                format!("r\0Khost={host} sender={sender} recipient={recipient} size={size}\n\0");
            return Some(text.into_bytes());
        }
        _ => {}
    }
    None
}

/// Opening a FIFO for reading blocks until someone opens it for writing:
/// thousands of these wait at no cost and are let go at once.
fn wait_at_gate() {
    if let Some(path) = std::env::var_os("FAKE_REMOTE_GATE") {
        let _ = std::fs::File::open(path);
    }
}

fn long_report(len: usize) -> Vec<u8> {
    let mut report = b"r\0K".to_vec();
    report.extend(std::iter::repeat_n(b'x', len));
    report.extend_from_slice(b"\n\0");
    report
}

fn close_stdout_and_linger(ms: u64) -> ! {
    // SAFETY: closing our own stdout; nothing writes to it afterwards.
    unsafe { libc::close(1) };
    std::thread::sleep(Duration::from_millis(ms));
    std::process::exit(0)
}

/// Deliver over SMTP if a server is named, else accept at once.
fn deliver(sender: &str, recipient: &str, message: &[u8]) -> Vec<u8> {
    let Ok(server) = std::env::var("FAKE_REMOTE_SMTP") else {
        return b"r\0Kaccepted without a connection.\n\0".to_vec();
    };
    let stream = match TcpStream::connect(server.as_str()) {
        Ok(stream) => stream,
        Err(e) => {
            let text =
                format!("ZSorry, I wasn't able to establish an SMTP connection: {e}. (#4.4.1)\n\0");
            return text.into_bytes();
        }
    };
    match smtp(&stream, sender, recipient, message) {
        Ok(reply) => {
            format!("r\0K{server} accepted message./Remote host said: {reply}\n\0").into_bytes()
        }
        Err(e) => {
            format!("ZConnected to {server} but connection died: {e}. (#4.4.2)\n\0").into_bytes()
        }
    }
}

fn smtp(
    stream: &TcpStream,
    sender: &str,
    recipient: &str,
    message: &[u8],
) -> std::io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut from = BufReader::new(stream);
    let mut to = stream;
    expect(&mut from, "2")?;
    for command in [
        "HELO fake\r\n".to_string(),
        format!("MAIL FROM:<{sender}>\r\n"),
    ] {
        to.write_all(command.as_bytes())?;
        expect(&mut from, "2")?;
    }
    to.write_all(format!("RCPT TO:<{recipient}>\r\n").as_bytes())?;
    expect(&mut from, "2")?;
    to.write_all(b"DATA\r\n")?;
    expect(&mut from, "3")?;
    to.write_all(message)?;
    to.write_all(b"\r\n.\r\n")?;
    let reply = expect(&mut from, "2")?;
    to.write_all(b"QUIT\r\n")?;
    Ok(reply)
}

/// Read one reply (all its lines); fail unless it starts with `class`.
fn expect(from: &mut impl BufRead, class: &str) -> std::io::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if from.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    let line = line.trim_end().to_string();
    if !line.starts_with(class) {
        return Err(std::io::Error::other(format!("unexpected reply {line}")));
    }
    Ok(line)
}

fn finish(report: &[u8]) -> ! {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(report);
    let _ = out.flush();
    std::process::exit(0)
}
