//! A stand-in for `bartleby serve` that runs only the status page, for
//! tests/status/ and for working on the page's look.
//!
//! ```text
//! cargo run --example status_demo -- CONFIG [RAM]
//! ```
//!
//! Reads CONFIG, creates the spool (the tests seed it with queue files
//! first), fills the shared stats with plausible values and a few log lines
//! (one with HTML in it, to test escaping), starts the page and sleeps. With
//! a second argument `RAM` it reports the spool as not persistent.
//! Prints `ready` on stdout once the page is listening.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bartleby::config::Config;
use bartleby::logging::{self, QMGR, SMTP, SMTPD};
use bartleby::spool::Spool;
use bartleby::stats::Stats;

fn main() {
    // What `main` should do before any thread exists: tiny_http's threads
    // take std's default stack size, which this variable sets (2 MiB otherwise).
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_MIN_STACK", "65536") };
    }
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: status_demo CONFIG [RAM]");
    let cfg = Arc::new(Config::load(Path::new(path)).unwrap_or_else(|e| panic!("{e}")));
    logging::init(&logging::Options {
        level: log::LevelFilter::Info,
        file: None,
        format: logging::Format::Syslog,
        hostname: "backup.example.org",
        log_host: None,
    })
    .expect("logging");
    Spool::create(&cfg.spool).expect("spool");

    let stats = Arc::new(Stats::new());
    stats.received.store(42, Ordering::Relaxed);
    stats.delivered.store(17, Ordering::Relaxed);
    stats.deferred.store(9, Ordering::Relaxed);
    stats.bounced.store(1, Ordering::Relaxed);
    stats.rejected.store(3, Ordering::Relaxed);
    stats.connections.store(2, Ordering::Relaxed);
    stats.primary_result(true, "");
    stats.primary_result(false, "connect to 127.0.0.1:1: Connection refused <b>(os error 111)</b>");
    if args.get(2).map(String::as_str) == Some("RAM") {
        stats.persistent_spool.store(false, Ordering::Relaxed);
        *stats.spool_note.lock().unwrap() = "No disk found: the spool is on a RAM disk & mail is lost at power-off.".into();
    }
    log::info!(target: SMTPD, "6940A9A90F3A2: client=mx.sender.test[192.0.2.1]");
    log::info!(target: QMGR, "6940A9A90F3A2: from=<<script>alert(1)</script>@evil.test>, size=1234, nrcpt=1 (queue active)");
    log::info!(
        target: SMTP,
        "6940A9A90F3A2: to=<bob@example.org>, relay=none, delay=0.12, delays=0/0.1/0.02/0, dsn=4.4.1, status=deferred (421 4.4.1 connect to mail.example.org[192.0.2.25]:25: Connection refused)"
    );
    log::info!(target: QMGR, "queue run: 3 messages, 0 delivered, 3 deferred");

    if let Err(e) = bartleby::status::start(cfg.clone(), stats.clone()) {
        eprintln!("status_demo: {e}");
        std::process::exit(1);
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
