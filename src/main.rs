//! `bartleby`: command line of the backup MX relay, and PID 1 on the
//! appliance. Parses the arguments, runs one command (`serve`, `mailq`,
//! `flush`, `check`), sets up the process (stack size, descriptor limit,
//! logging, the runtime) before `server::serve`.
//!
//! May touch: the process (environment, limits), stdout/stderr; the spool
//! only through `mailq`, `control` and `server`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bartleby::config::Config;
use bartleby::stats::Stats;
use bartleby::{logging, mailq, server, spool};

const DEFAULT_CONFIG: &str = "/etc/bartleby/bartleby.toml";

const USAGE: &str = "\
Usage: bartleby COMMAND [-c FILE]

A backup MX mail relay: accepts mail for the configured domains while the
primary mail server is down, spools it durably and forwards it when the
primary is back.

Commands:
  serve     run the relay in the foreground (SMTP, scheduler, status page)
  mailq     list the queue (like sendmail -bp / Postfix mailq)
  flush     ask the running server to try all queued mail now (like sendmail -q)
  check     validate the configuration file and exit

Options:
  -c, --config FILE   configuration file (default /etc/bartleby/bartleby.toml)
  -h, --help          this help
  -V, --version       version
";

struct Args {
    command: String,
    config: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut command = None;
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" | "help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                println!("bartleby {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "-c" | "--config" => config = PathBuf::from(it.next().ok_or("-c needs a file name")?),
            s if s.starts_with("--config=") => config = PathBuf::from(&s[9..]),
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`")),
            s if command.is_none() => command = Some(s.to_string()),
            s => return Err(format!("unexpected argument `{s}`")),
        }
    }
    let command = command.ok_or("no command given")?;
    Ok(Args { command, config })
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("bartleby: {e}");
        ExitCode::from(78) // EX_CONFIG
    })
}

fn main() -> ExitCode {
    // The first statement: no other thread of this process exists yet.
    small_thread_stacks();
    if std::process::id() == 1 {
        pid1();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bartleby: {e}\n\n{USAGE}");
            return ExitCode::from(64); // EX_USAGE
        }
    };
    match args.command.as_str() {
        "check" => check(&args.config),
        "mailq" => list_queue(&args.config),
        "flush" => flush(&args.config),
        "serve" => {
            raise_fd_limit();
            match load(&args.config) {
                Ok(c) => serve(c, None),
                Err(code) => code,
            }
        }
        other => {
            eprintln!("bartleby: unknown command `{other}`\n\n{USAGE}");
            ExitCode::from(64)
        }
    }
}

/// `bartleby check`: the configuration, the recipients list, the TLS files
/// and the push token as `serve` would use them.
fn check(path: &std::path::Path) -> ExitCode {
    let c = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // serve starts with a bad recipients list (451 to every recipient, or
    // the last good list): an error here.
    match bartleby::policy::RecipientList::load(c.recipients.as_deref()) {
        Ok(l) if l.is_enabled() => println!("recipients list: {} entries", l.len()),
        Ok(_) => {}
        Err(e) => {
            eprintln!("bartleby: {e}");
            return ExitCode::from(78);
        }
    }
    #[cfg(feature = "tls")]
    match bartleby::tls::check(&c) {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => {
            eprintln!("bartleby: {e}");
            return ExitCode::from(78);
        }
    }
    match bartleby::status::check_push(&c) {
        Ok(true) => println!("recipients list push: enabled (PUT /recipients)"),
        Ok(false) => {}
        Err(e) => {
            eprintln!("bartleby: {e}");
            return ExitCode::from(78);
        }
    }
    println!("{}: OK: {} relaying for {} to {}", path.display(), c.hostname, c.relay_domains.join(", "), c.primary_display());
    ExitCode::SUCCESS
}

/// `bartleby mailq`: the queue, read from the spool (no server needed).
fn list_queue(path: &std::path::Path) -> ExitCode {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let sp = match spool::Spool::open(&cfg.spool) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bartleby: {e}");
            return ExitCode::from(69);
        }
    };
    let stdout = std::io::stdout();
    match mailq::print(&sp, &mut stdout.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        // `bartleby mailq | head`: the reader has seen enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bartleby: mailq: {e}");
            ExitCode::from(74)
        }
    }
}

/// `bartleby flush`: asks the running server for a queue run.
fn flush(path: &std::path::Path) -> ExitCode {
    let cfg = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match bartleby::control::request(&cfg.spool, "flush") {
        Ok(answer) => {
            println!("bartleby: {answer}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bartleby: flush: {e}");
            ExitCode::from(69) // EX_UNAVAILABLE
        }
    }
}

/// Threads started without a stack size get 64 KiB: tiny_http starts its
/// threads with std's default stack size, and std reads RUST_MIN_STACK once,
/// at the first such spawn. 64 KiB is enough for them and keeps the address
/// space small on a 16 MB machine.
///
/// Called as the first statement of `main`, in every role (PID 1 included),
/// so that `set_var` runs while this process has one thread: std starts no
/// thread before `main`, and PID 1 has nothing else running in it (init's
/// console and memory threads start later, in `init::boot`).
fn small_thread_stacks() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread exists yet to read the environment (see
        // above); only `main`'s first statement calls this.
        unsafe { std::env::set_var("RUST_MIN_STACK", "65536") };
    }
}

/// Raises the descriptor limit to the hard limit: running out of
/// descriptors must mean 421/503 to clients, not an abort in a library.
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// PID 1 on the appliance image: mounts, config, spool disk and network
/// (`init::boot`), then the relay until SIGTERM/SIGINT (ctrl-alt-del) or
/// SIGPWR, then sync, unmount and reboot. Never returns: PID 1 exiting
/// panics the kernel, and a machine that reboots recovers by itself.
///
/// The relay runs with the configuration init parsed (and fell back on, if
/// the one on the boot media is invalid): one file, one set of values.
fn pid1() -> ! {
    raise_fd_limit();
    let mut boot = bartleby::init::boot();
    let _ = std::thread::Builder::new().name("reaper".into()).stack_size(32 * 1024).spawn(|| {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(30));
            bartleby::init::reap_children();
        }
    });
    let started = std::time::Instant::now();
    let code = match boot.config.take() {
        Some(cfg) => {
            let code = serve(cfg, Some(&boot));
            // A relay that could not start (a spool it cannot use, an address
            // it cannot bind) would reboot into the same failure at once, in
            // a loop that scrolls the reason off the screen: it stays up for
            // a minute first. A stop asked for (ctrl-alt-del, SIGTERM) is not
            // a failure and reboots at once.
            let up = started.elapsed();
            if code != ExitCode::SUCCESS && up < std::time::Duration::from_secs(60) {
                let wait = std::time::Duration::from_secs(60) - up;
                eprintln!("bartleby: the relay failed to start (see above): fix bartleby.toml on the boot medium; restarting in {} s", wait.as_secs());
                std::thread::sleep(wait);
            }
            code
        }
        None => {
            // Rebooting at once would scroll the error off the screen in a loop.
            eprintln!("bartleby: no valid configuration (see above): fix bartleby.toml on the boot medium; restarting in 60 s");
            std::thread::sleep(std::time::Duration::from_secs(60));
            ExitCode::from(78)
        }
    };
    eprintln!("bartleby: relay stopped ({code:?}); restarting the machine");
    bartleby::init::shutdown(true)
}

/// A spool too small for `min_free_space` plus one message of
/// `max_message_size` refuses every MAIL with 452: the RAM spool a 16 MB
/// appliance falls back to is about 2.5 MB, the default reserve 20 MB.
/// On a spool in RAM the two limits are cut to fit (a quarter of it for
/// one message, an eighth kept free); on a disk that small nothing is
/// changed, but the relay says it refuses all mail. Either way the
/// sentence returned goes to the console, the log and the page.
fn fit_spool(cfg: &mut Config) -> Option<String> {
    let total = spool::disk_space(&cfg.spool).ok()?.total;
    if total == 0 || cfg.min_free_space.saturating_add(cfg.max_message_size) <= total {
        return None;
    }
    let kb = |n: u64| n / 1024;
    if let Ok(Some(fs)) = bartleby::stats::spool_in_ram(&cfg.spool) {
        let (old_size, old_free) = (cfg.max_message_size, cfg.min_free_space);
        cfg.max_message_size = cfg.max_message_size.min(total / 4);
        cfg.min_free_space = cfg.min_free_space.min(total / 8);
        return Some(format!(
            "the spool is on {fs} of {} kB (RAM): messages are limited to {} kB (max_message_size {} kB) and {} kB are kept free (min_free_space {} kB), or every message would be refused",
            kb(total),
            kb(cfg.max_message_size),
            kb(old_size),
            kb(cfg.min_free_space),
            kb(old_free)
        ));
    }
    Some(format!(
        "ALL MAIL IS REFUSED (452): the spool file system {} has {} kB, less than min_free_space ({} kB) plus max_message_size ({} kB); use a bigger disk or lower the two",
        cfg.spool.display(),
        kb(total),
        kb(cfg.min_free_space),
        kb(cfg.max_message_size)
    ))
}

fn serve(mut cfg: Config, boot: Option<&bartleby::init::BootInfo>) -> ExitCode {
    let fit = fit_spool(&mut cfg);
    let cfg = Arc::new(cfg);
    let log = logging::Options {
        level: cfg.log_level,
        file: cfg.log_file.as_deref(),
        format: cfg.log_format,
        hostname: &cfg.hostname,
        log_host: cfg.log_host,
    };
    if let Err(e) = logging::init(&log) {
        eprintln!("bartleby: {e}");
        return ExitCode::from(73);
    }
    let stats = Arc::new(Stats::new());
    if let Some(b) = boot {
        if let Some(e) = &b.config_error {
            log::error!(target: logging::MASTER, "error: {e}; running with the built-in {}", b.config_path.display());
        }
        if let Ok(mut note) = stats.spool_note.lock() {
            *note = b.spool_note.clone();
        }
        if let Ok(mut a) = stats.alerts.lock() {
            a.extend(b.alerts.iter().cloned());
        }
    }
    if let Some(a) = fit {
        log::warn!(target: logging::MASTER, "warning: {a}");
        eprintln!("bartleby: WARNING: {a}");
        if let Ok(mut v) = stats.alerts.lock() {
            v.push(a);
        }
    }
    // Persistent or not is a fact of the file system the spool is on.
    match bartleby::stats::spool_in_ram(&cfg.spool) {
        Ok(Some(fs)) => log::warn!(
            target: logging::MASTER,
            "warning: spool {} is on {fs} (RAM): queued mail is lost on power failure or reboot",
            cfg.spool.display()
        ),
        Ok(None) => {}
        Err(e) => log::warn!(target: logging::MASTER, "warning: spool {}: cannot tell whether it is on disk: {e}", cfg.spool.display()),
    }
    stats.check_spool(&cfg.spool);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_stack_size(256 * 1024)
        // Held log lines go out whenever the relay has nothing to do.
        .on_thread_park(logging::flush)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bartleby: cannot start runtime: {e}");
            return ExitCode::from(71);
        }
    };
    logging::buffer_on_this_thread();
    let r = rt.block_on(server::serve(cfg, stats));
    logging::flush();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(target: logging::MASTER, "fatal: {e}");
            eprintln!("bartleby: fatal: {e}");
            ExitCode::from(75)
        }
    }
}
