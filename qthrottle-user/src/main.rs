//! The `qthrottle` binary: parse the command line, run the command, turn the
//! outcome into an exit status. Invoked as `qmail-rspawn`, it is the spawner.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use qthrottle::{
    cgroup,
    config::{self, Config},
    control::{Request, Response},
    daemon::{self, socket},
    kernel, status,
};

/// Per-destination limits on outbound SMTP connections, enforced in the kernel.
#[derive(Parser)]
#[command(name = "qthrottle", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Configuration file [default: /etc/qthrottle/qthrottle.toml]
    #[arg(long, value_name = "PATH", env = "QTHROTTLE_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, keep the kernel maps current, serve the control socket (foreground).
    Daemon(ConfigArg),
    /// Show each group's limit, open connections and counters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Show the kernel's run-time statistics of each program instead
        /// (average cost per call; needs `sysctl kernel.bpf_stats_enabled=1`).
        #[arg(long)]
        programs: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Edit the groups in the configuration file and have the daemon apply them.
    #[command(subcommand)]
    Limit(LimitCommand),
    /// Run a command inside the qthrottle cgroup.
    Exec {
        #[command(flatten)]
        config: ConfigArg,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Move a running process into the qthrottle cgroup.
    Attach {
        /// Process id.
        pid: u32,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Detach the programs and remove the pinned state.
    Unload(ConfigArg),
    /// Run as qmail's spawner (what `qmail-rspawn` runs).
    Rspawn(ConfigArg),
}

#[derive(Subcommand)]
enum LimitCommand {
    /// Create or replace a group.
    Set {
        /// Group name.
        name: String,
        /// Most open connections toward the group.
        limit: u32,
        /// A mail domain whose MX addresses join the group (repeatable).
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        /// An address or CIDR range (repeatable).
        #[arg(long = "address", value_name = "ADDRESS")]
        addresses: Vec<String>,
        /// Domains whose MX hosts all end with this suffix join the group (repeatable).
        #[arg(long = "mx-suffix", value_name = "SUFFIX")]
        mx_suffixes: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a group.
    Rm {
        /// Group name.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the configured groups.
    List(ConfigArg),
}

fn main() -> ExitCode {
    // Before anything opens a descriptor: qmail-start runs the spawner with
    // descriptor 2 closed, and the first file opened would land there.
    qthrottle::rspawn::ensure_std_fds();
    let invoked_as = std::env::args_os().next().unwrap_or_default();
    if Path::new(&invoked_as)
        .file_name()
        .is_some_and(|n| n == "qmail-rspawn")
    {
        return qthrottle::rspawn::main();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(),
        Err(err) => {
            let text = err.to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("qthrottle: {text}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::Rspawn(_)) {
        return qthrottle::rspawn::main();
    }
    if !matches!(cli.command, Command::Daemon(_) | Command::Rspawn(_)) {
        // `qthrottle status | head` should end quietly, as other tools do.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    init_logging();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qthrottle: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One line per event on stderr, no timestamps (the supervisor's logger adds
/// them), colours only on a terminal. QTHROTTLE_LOG sets the level.
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("QTHROTTLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(LogLine)
        .init();
}

/// `LEVEL message key=value...`, nothing before the level.
struct LogLine;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LogLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "{} ", event.metadata().level())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Daemon(c) => {
            require_root("daemon")?;
            let (path, explicit) = config::resolve_path(c.config.as_deref());
            daemon::run(path, explicit)
        }
        Command::Status {
            json,
            programs: true,
            config,
        } => show_programs(&paths(&config)?, json),
        Command::Status {
            json,
            programs: false,
            config,
        } => show_status(&paths(&config)?, json),
        Command::Limit(cmd) => limit(cmd),
        Command::Exec { config, command } => exec(&paths(&config)?, &command),
        Command::Attach { pid: 0, .. } => bail!("process id 0 is not a process"),
        Command::Attach { pid, config } => {
            let dir = cgroup::resolve(&paths(&config)?.cgroup)?;
            cgroup::attach(&dir, pid)?;
            println!("moved process {pid} into {}", dir.display());
            Ok(())
        }
        Command::Unload(c) => unload(&paths(&c)?),
        Command::Rspawn(_) => unreachable!("dispatched before logging starts"),
    }
}

fn load(arg: &ConfigArg) -> anyhow::Result<Config> {
    let (path, explicit) = config::resolve_path(arg.config.as_deref());
    Ok(config::load(&path, explicit)?)
}

/// The configuration for commands that only need its paths (status, exec,
/// attach, unload): they must keep working while the file has an error the
/// running daemon refused, so they fall back to the paths it still names.
fn paths(arg: &ConfigArg) -> anyhow::Result<Config> {
    let (path, explicit) = config::resolve_path(arg.config.as_deref());
    match config::load(&path, explicit) {
        Ok(config) => Ok(config),
        Err(err @ config::ConfigError::Invalid { .. }) => {
            let Some(config) = config::paths_of(&path) else {
                return Err(err.into());
            };
            eprintln!("qthrottle: warning: {err}");
            eprintln!(
                "qthrottle: warning: using the paths that file names; the daemon keeps its last good configuration"
            );
            Ok(config)
        }
        Err(err) => Err(err.into()),
    }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} must run as root");
    }
    Ok(())
}

fn show_status(config: &Config, json: bool) -> anyhow::Result<()> {
    let (rows, events) = status::collect(config)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("failed to encode status")?
        );
    } else {
        print!("{}", status::render(&rows, &events));
    }
    Ok(())
}

fn show_programs(config: &Config, json: bool) -> anyhow::Result<()> {
    let stats = kernel::program_stats(&config.pin_path)?;
    for s in &stats {
        let ns = s.run_time.as_nanos() as u64;
        let avg = ns.checked_div(s.run_count).unwrap_or(0);
        if json {
            println!(
                r#"{{"program":"{}","run_time_ns":{ns},"run_count":{},"avg_ns":{avg}}}"#,
                s.name, s.run_count
            );
        } else {
            println!(
                "{:<20} runs={:<12} total={}ns avg={}ns",
                s.name, s.run_count, ns, avg
            );
        }
    }
    Ok(())
}

fn limit(cmd: LimitCommand) -> anyhow::Result<()> {
    let (arg, done) = match cmd {
        LimitCommand::List(c) => return list(&c),
        LimitCommand::Set {
            name,
            limit,
            domains,
            addresses,
            mx_suffixes,
            config,
        } => {
            let (path, _) = config::resolve_path(config.config.as_deref());
            config::set_group(&path, &name, limit, &domains, &addresses, &mx_suffixes)?;
            (
                config,
                format!("group {name} set to limit {limit} in {}", path.display()),
            )
        }
        LimitCommand::Rm { name, config } => {
            let (path, _) = config::resolve_path(config.config.as_deref());
            config::remove_group(&path, &name)?;
            (
                config,
                format!("group {name} removed from {}", path.display()),
            )
        }
    };
    println!("{done}");
    let socket = load(&arg)?.socket;
    match socket::request(&socket, &Request::Reload, Duration::from_secs(30)) {
        Ok(Response::Ok) => println!("applied by the running daemon"),
        Ok(Response::Error { message }) => bail!("the daemon rejected the change: {message}"),
        Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
        Err(_) => println!(
            "the daemon is not running ({}): the change applies when it starts",
            socket.display()
        ),
    }
    Ok(())
}

fn list(arg: &ConfigArg) -> anyhow::Result<()> {
    let (path, explicit) = config::resolve_path(arg.config.as_deref());
    for g in config::list_groups(&path, explicit)? {
        let addresses: Vec<String> = g
            .addresses
            .iter()
            .map(|a| qthrottle::plan::host(*a))
            .collect();
        println!(
            "{} limit={} domains={} mx_suffixes={} addresses={}",
            g.name,
            g.limit,
            dash(&g.domains),
            dash(&g.mx_suffixes),
            dash(&addresses)
        );
    }
    Ok(())
}

fn dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn exec(config: &Config, command: &[OsString]) -> anyhow::Result<()> {
    let dir = cgroup::resolve(&config.cgroup)?;
    if !dir.is_dir() && nix::unistd::geteuid().is_root() {
        cgroup::create(&dir)?;
    }
    if !config.pin_path.join("link_connect4").exists() {
        eprintln!(
            "qthrottle: warning: no programs attached yet (is the daemon running?); connections are not limited until they are"
        );
    }
    cgroup::attach(&dir, 0)?;
    let (program, args) = command.split_first().context("no command given")?;
    let err = std::process::Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("failed to run {}", program.to_string_lossy()))
}

fn unload(config: &Config) -> anyhow::Result<()> {
    require_root("unload")?;
    if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
        bail!(
            "the daemon is running (control socket {}): stop it first, or it would go on thinking limits are enforced",
            config.socket.display()
        );
    }
    let removed = kernel::unload(&config.pin_path)?;
    println!(
        "removed {} pinned objects from {}",
        removed.len(),
        config.pin_path.display()
    );
    let dir = cgroup::resolve(&config.cgroup)?;
    if cgroup::remove_if_empty(&dir)? {
        println!("removed cgroup {}", dir.display());
    } else if dir.exists() {
        println!(
            "cgroup {} still has processes; left in place",
            dir.display()
        );
    }
    let _ = std::fs::remove_file(daemon::state::path(&config.state_dir));
    Ok(())
}
