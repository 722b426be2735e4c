//! PID 1's console: fds 0 to 2 on /dev/console, and the copy of every line
//! to the VGA screen when the kernel's console is a serial port. Touches
//! only file descriptors 0 to 2 and /dev/tty0.

use std::fs;

/// Makes sure fds 0, 1, 2 are open on the console (the kernel opens them only
/// when /dev/console existed in the initramfs).
pub(super) fn ensure_console() {
    // SAFETY: fcntl(F_GETFD) just probes; open/dup2 on a fixed path.
    unsafe {
        if libc::fcntl(2, libc::F_GETFD) >= 0 && libc::fcntl(1, libc::F_GETFD) >= 0 {
            return;
        }
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd >= 0 {
            for t in 0..3 {
                if libc::fcntl(t, libc::F_GETFD) < 0 {
                    libc::dup2(fd, t);
                }
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

/// With `console=tty0 console=ttyS0` the kernel prints on both, but PID 1's
/// stdout/stderr (`/dev/console`) reach only the last one. When that is a
/// serial port and a VGA text console is active too, copy everything PID 1
/// and the relay write to both, through a pipe and a small thread, so a 486
/// with a monitor shows the same as the serial line. The VGA side is
/// non-blocking: Scroll Lock on the keyboard drops output instead of
/// stalling the relay.
pub(super) fn console_tee() {
    let active = fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let names: Vec<&str> = active.split_whitespace().collect();
    let is_vt = |n: &str| n.len() > 3 && n.starts_with("tty") && n[3..].bytes().all(|b| b.is_ascii_digit());
    // the kernel lists the console behind /dev/console last
    let Some(main) = names.last() else { return };
    if is_vt(main) || !names.iter().any(|n| is_vt(n)) {
        return;
    }
    use std::io::{Read, Write};
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut vga) = fs::OpenOptions::new().write(true).custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK).open("/dev/tty0") else { return };
    let Ok(serial) = std::io::stderr().as_fd().try_clone_to_owned() else { return };
    let mut serial = fs::File::from(serial);
    let Ok((mut rd, wr)) = std::io::pipe() else { return };
    let spawned = std::thread::Builder::new().name("console".into()).stack_size(16 * 1024).spawn(move || {
        let mut buf = [0u8; 512];
        loop {
            let n = match rd.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let _ = serial.write_all(&buf[..n]);
            let _ = vga.write(&buf[..n]);
        }
    });
    if spawned.is_err() {
        return;
    }
    // SAFETY: dup2 of a pipe end we own (alive until the end of this
    // function) onto stdout and stderr; no Rust object owns fds 1 and 2.
    unsafe {
        libc::dup2(wr.as_raw_fd(), 1);
        libc::dup2(wr.as_raw_fd(), 2);
    }
}

