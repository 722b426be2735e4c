//! Stand-in PID 1 for the appliance image: runs init::boot(), then answers
//! SMTP connections with a fixed 220 banner (port 25) and an HTTP request with
//! /proc/meminfo (port 80), until SIGINT/SIGTERM (reboot) or SIGUSR2/SIGPWR
//! (power off). Outside PID 1 it only prints what it would do.
#[path = "../../../src/config.rs"]
#[allow(dead_code)]
mod config;
#[path = "../../../src/init.rs"]
#[allow(dead_code)]
mod init;
#[path = "../../../src/netcfg.rs"]
#[allow(dead_code)]
mod netcfg;

use std::io::{Read, Write};
use std::net::TcpListener;

fn serve(addr: &'static str, reply: fn() -> String) {
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(move || match TcpListener::bind(addr) {
            Ok(l) => {
                for mut c in l.incoming().flatten() {
                    let _ = c.write_all(reply().as_bytes());
                    let mut b = [0u8; 512];
                    let _ = c.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                    let _ = c.read(&mut b);
                    if addr.ends_with(":25") {
                        let _ = c.write_all(b"221 bye\r\n");
                    }
                }
            }
            Err(e) => eprintln!("pid1-probe: bind {addr}: {e}"),
        })
        .ok();
}

fn main() {
    if std::env::args().any(|a| a == "--version") {
        println!("pid1-probe {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    if std::process::id() != 1 {
        println!("pid1-probe: not PID 1; {}", init::meminfo());
        return;
    }
    // block the signals we wait for before any thread starts
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD, libc::SIGUSR2, libc::SIGPWR, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let info = init::boot();
    eprintln!(
        "pid1-probe: config {} valid={} spool-note={:?}",
        info.config_path.display(),
        info.config.is_some(),
        info.spool_note
    );
    serve("0.0.0.0:25", || "220 pid1-probe ESMTP (stand-in, not the relay)\r\n".to_string());
    serve("0.0.0.0:80", || {
        let body = format!("{}\n", init::meminfo());
        format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{}", body.len(), body)
    });
    loop {
        let mut sig = 0;
        unsafe { libc::sigwait(&set, &mut sig) };
        match sig {
            libc::SIGCHLD => init::reap_children(),
            libc::SIGINT | libc::SIGTERM => init::shutdown(true),
            libc::SIGUSR2 | libc::SIGPWR => init::shutdown(false),
            _ => {}
        }
    }
}
