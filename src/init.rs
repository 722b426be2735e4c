//! PID 1 duties on the appliance image: pseudo filesystems, finding the
//! configuration and the spool disk, the network, reaping children, and a
//! clean shutdown (sync, unmount, reboot) that never returns.
//!
//! The image boots a kernel plus an initramfs whose `/init` is the bartleby
//! binary itself; there is no shell and no BusyBox. Disk layout written by
//! `make image`:
//!
//! * partition 1, FAT16, holds SYSLINUX, the kernel and `bartleby.toml`
//!   (the administrator edits this file on any PC);
//! * partition 2, ext4 labelled `BSPOOL`, is the persistent spool.
//!
//! The floppy and the CD carry `bartleby.toml` too. The kernel command line
//! set by the boot loader says which medium booted (`bartleby.boot=disk|cd|floppy`);
//! that medium's config wins, then any disk, floppy, CD, and finally the copy
//! built into the initramfs (`/etc/bartleby.toml`). `bartleby.spool=/dev/sdXN`
//! overrides the spool device, `bartleby.spool=tmpfs` forces a RAM spool.
//!
//! Everything here reports on the console in plain words and keeps going when
//! something is missing: an appliance without a disk still relays (with a RAM
//! spool, said loudly), and one without a lease still answers on its
//! link-local address.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

macro_rules! say {
    ($($a:tt)*) => { eprintln!("bartleby-init: {}", format_args!($($a)*)) };
}

/// What `boot` found.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// The configuration file to load.
    pub config_path: PathBuf,
    /// True when the spool directory is on a disk (survives power loss).
    pub persistent_spool: bool,
    /// One line saying where the spool lives (also printed on the console).
    pub spool_note: String,
}

const BOOT_MNT: &str = "/boot";
const CD_MNT: &str = "/cdrom";
const BUILTIN_CONFIG: &str = "/etc/bartleby.toml";
const DEFAULT_SPOOL: &str = "/var/spool/bartleby";
const SPOOL_LABEL: &str = "BSPOOL";

/// Called by main when running as PID 1: mounts, config, spool, network.
pub fn boot() -> BootInfo {
    let t0 = Instant::now();
    mount_pseudo();
    ensure_console();
    console_tee();
    // ctrl-alt-del: SIGINT to PID 1 instead of an immediate reboot
    // SAFETY: reboot(2) with CAD_OFF only changes a kernel flag.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let arg = |k: &str| cmdline.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
    say!("{}", fs::read_to_string("/proc/version").unwrap_or_default().trim());
    if let Err(e) = crate::netcfg::set_up("lo") {
        say!("lo: {e}");
    }

    let parts = partitions(Duration::from_secs(3));
    say!("block devices: {}", if parts.is_empty() { "none".to_string() } else { parts.join(" ") });

    let config_path = find_config(&parts, arg("bartleby.boot=").as_deref());
    let text = fs::read_to_string(&config_path).unwrap_or_default();
    let cfg = MiniToml::parse(&text);

    if let Some(h) = cfg.get("", "hostname") {
        set_hostname(h);
    }

    let spool = PathBuf::from(cfg.get("", "spool").unwrap_or(DEFAULT_SPOOL));
    let (persistent_spool, spool_note) = mount_spool(&parts, &spool, arg("bartleby.spool=").as_deref());
    let banner = if persistent_spool { "" } else { "WARNING: " };
    say!("{banner}{spool_note}");

    let iface = cfg.get("network", "interface");
    let address = cfg.get("network", "address").unwrap_or("dhcp");
    let gateway = cfg.get("network", "gateway");
    let dns = cfg.get_list("network", "dns");
    match crate::netcfg::configure(iface, address, gateway, &dns) {
        Ok(s) => say!("network: {s}"),
        Err(e) => say!("network: {e}"),
    }
    say!("boot done in {:.1}s; {}", t0.elapsed().as_secs_f32(), meminfo());
    // one more memory report once the relay has settled
    let _ = std::thread::Builder::new().name("meminfo".into()).stack_size(32 * 1024).spawn(|| {
        std::thread::sleep(Duration::from_secs(20));
        say!("after start: {}", meminfo());
    });
    BootInfo { config_path, persistent_spool, spool_note }
}

/// Called by main after the relay stopped (or on a fatal error): stop other
/// processes, sync, unmount (or remount read-only), then reboot or power off.
pub fn shutdown(reboot: bool) -> ! {
    say!("{}", if reboot { "rebooting" } else { "powering off" });
    // SAFETY: plain syscalls with no pointers.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    reap_children();
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            Some((dir.replace("\\040", " "), fstype.to_string()))
        })
        .filter(|(dir, fstype)| dir != "/" && !matches!(fstype.as_str(), "proc" | "sysfs" | "devtmpfs" | "rootfs"))
        .map(|(d, _)| d)
        .collect();
    for dir in targets.iter().rev() {
        let Ok(c) = CString::new(dir.as_str()) else { continue };
        // SAFETY: c is a valid NUL-terminated path.
        let r = unsafe { libc::umount2(c.as_ptr(), 0) };
        if r != 0 {
            let ro = unsafe {
                libc::mount(std::ptr::null(), c.as_ptr(), std::ptr::null(), libc::MS_REMOUNT | libc::MS_RDONLY, std::ptr::null())
            };
            say!("{dir}: busy, {}", if ro == 0 { "remounted read-only" } else { "left mounted (synced)" });
        }
    }
    unsafe { libc::sync() };
    // let the console thread (console_tee) drain the last lines
    std::thread::sleep(Duration::from_millis(300));
    let cmd = if reboot { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF };
    unsafe { libc::reboot(cmd) };
    // power off is not possible on every 486 (no APM/ACPI): halt instead
    unsafe { libc::reboot(libc::RB_HALT_SYSTEM) };
    loop {
        // SAFETY: pause(2) has no arguments.
        unsafe { libc::pause() };
    }
}

/// Reaps every exited child without blocking (PID 1 inherits all orphans).
pub fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

/// `MemTotal`/`MemFree`/`MemAvailable` from /proc/meminfo in one line.
pub fn meminfo() -> String {
    let m = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        m.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    format!("MemTotal {} kB, MemFree {} kB, MemAvailable {} kB", get("MemTotal:"), get("MemFree:"), get("MemAvailable:"))
}

// ------------------------------------------------------------------ mounts

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    let _ = fs::create_dir_all(target);
    let (s, t, f, d) = (
        CString::new(src)?,
        CString::new(target)?,
        CString::new(fstype)?,
        CString::new(data)?,
    );
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr() as *const libc::c_void) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

fn umount(target: &str) {
    if let Ok(t) = CString::new(target) {
        // SAFETY: valid path string.
        unsafe { libc::umount2(t.as_ptr(), 0) };
    }
}

fn mount_pseudo() {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (src, dir, fstype, flags, data) in [
        ("proc", "/proc", "proc", nodev, ""),
        ("sysfs", "/sys", "sysfs", nodev, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777,size=2m"),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755,size=512k"),
    ] {
        match mount(src, dir, fstype, flags, data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => say!("mount {dir}: {e}"),
        }
    }
}

/// Makes sure fds 0, 1, 2 are open on the console (the kernel opens them only
/// when /dev/console existed in the initramfs).
fn ensure_console() {
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
fn console_tee() {
    let active = fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let names: Vec<&str> = active.split_whitespace().collect();
    let is_vt = |n: &str| n.len() > 3 && n.starts_with("tty") && n[3..].bytes().all(|b| b.is_ascii_digit());
    // the kernel lists the console behind /dev/console last
    let Some(main) = names.last() else { return };
    if is_vt(main) || !names.iter().any(|n| is_vt(n)) {
        return;
    }
    // SAFETY: plain fd syscalls on fds we own; the buffers outlive the calls.
    unsafe {
        let vga = libc::open(c"/dev/tty0".as_ptr(), libc::O_WRONLY | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if vga < 0 {
            return;
        }
        let serial = libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3);
        let mut p = [0i32; 2];
        if serial < 0 || libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            libc::close(vga);
            return;
        }
        let (rd, wr) = (p[0], p[1]);
        let spawned = std::thread::Builder::new().name("console".into()).stack_size(16 * 1024).spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                let n = libc::read(rd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
                if n <= 0 {
                    if n < 0 && *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    break;
                }
                let n = n as usize;
                let mut off = 0;
                while off < n {
                    let w = libc::write(serial, buf[off..n].as_ptr() as *const libc::c_void, n - off);
                    if w <= 0 {
                        break;
                    }
                    off += w as usize;
                }
                let _ = libc::write(vga, buf.as_ptr() as *const libc::c_void, n);
            }
        });
        if spawned.is_err() {
            libc::close(rd);
            libc::close(wr);
            return;
        }
        libc::dup2(wr, 1);
        libc::dup2(wr, 2);
        libc::close(wr);
    }
}

fn set_hostname(h: &str) {
    let short = h.trim();
    if short.is_empty() {
        return;
    }
    // SAFETY: pointer/length of a live byte slice.
    unsafe { libc::sethostname(short.as_ptr() as *const libc::c_char, short.len()) };
}

/// Block devices from /proc/partitions (whole disks listed too), waiting up
/// to `wait` for at least one to show up.
fn partitions(wait: Duration) -> Vec<String> {
    let until = Instant::now() + wait;
    loop {
        let mut names: Vec<String> = fs::read_to_string("/proc/partitions")
            .unwrap_or_default()
            .lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
            .filter(|n| !n.starts_with("ram") && !n.starts_with("loop"))
            .collect();
        // floppy drives have no size (so no /proc/partitions line) until a disk is read
        if let Ok(d) = fs::read_dir("/sys/block") {
            for e in d.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("fd") && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        if !names.is_empty() || Instant::now() >= until {
            return names;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn kind(dev: &str) -> &'static str {
    if dev.starts_with("sr") {
        "cd"
    } else if dev.starts_with("fd") {
        "floppy"
    } else {
        "disk"
    }
}

/// Finds bartleby.toml: on the boot medium first, then disk, floppy, CD,
/// then the built-in default.
fn find_config(parts: &[String], boot: Option<&str>) -> PathBuf {
    let mut order: Vec<&str> = vec!["disk", "floppy", "cd"];
    if let Some(b) = boot
        && let Some(i) = order.iter().position(|k| *k == b)
    {
        let k = order.remove(i);
        order.insert(0, k);
    }
    for k in order {
        for dev in parts.iter().filter(|d| kind(d) == k) {
            // a whole disk that has partitions is not itself a filesystem
            if k == "disk" && parts.iter().any(|p| p != dev && p.starts_with(dev.as_str())) {
                continue;
            }
            // skip ext* (the spool) quickly
            if ext_label(&format!("/dev/{dev}")).is_some() {
                continue;
            }
            let (mnt, types): (&str, &[&str]) = if k == "cd" { (CD_MNT, &["iso9660"]) } else { (BOOT_MNT, &["vfat", "msdos"]) };
            for t in types {
                if mount(&format!("/dev/{dev}"), mnt, t, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV, "").is_ok() {
                    let p = Path::new(mnt).join("bartleby.toml");
                    if p.is_file() {
                        say!("configuration: {} (on /dev/{dev}, {k}, mounted read-only at {mnt})", p.display());
                        return p;
                    }
                    umount(mnt);
                    break;
                }
            }
        }
    }
    say!("configuration: no bartleby.toml on any disk, floppy or CD; using the built-in {BUILTIN_CONFIG}");
    PathBuf::from(BUILTIN_CONFIG)
}

/// The volume label if `dev` holds an ext2/3/4 filesystem.
fn ext_label(dev: &str) -> Option<String> {
    let mut f = fs::File::open(dev).ok()?;
    let mut sb = [0u8; 256];
    f.seek(SeekFrom::Start(1024)).ok()?;
    f.read_exact(&mut sb).ok()?;
    if sb[0x38] != 0x53 || sb[0x39] != 0xEF {
        return None;
    }
    let name = &sb[0x78..0x88];
    let end = name.iter().position(|b| *b == 0).unwrap_or(16);
    Some(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Mounts the persistent spool (ext4 labelled BSPOOL, or the device named on
/// the kernel command line) at `spool`; falls back to tmpfs.
fn mount_spool(parts: &[String], spool: &Path, forced: Option<&str>) -> (bool, String) {
    let target = spool.to_string_lossy().into_owned();
    let _ = fs::create_dir_all(&target);
    let mut candidates: Vec<String> = Vec::new();
    match forced {
        Some("tmpfs") => {}
        Some(dev) => candidates.push(dev.to_string()),
        None => {
            for p in parts.iter().filter(|p| kind(p) == "disk") {
                let dev = format!("/dev/{p}");
                if ext_label(&dev).as_deref() == Some(SPOOL_LABEL) {
                    candidates.push(dev);
                }
            }
        }
    }
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
    for dev in &candidates {
        match mount(dev, &target, "ext4", flags, "") {
            Ok(()) => {
                let free = statvfs_free(&target).map(|b| format!(", {} MB free", b / 1_000_000)).unwrap_or_default();
                return (true, format!("spool: {dev} (ext4, label {SPOOL_LABEL}) mounted at {target}{free}; queued mail survives power loss"));
            }
            Err(e) => say!("spool: cannot mount {dev} at {target}: {e}"),
        }
    }
    let why = match forced {
        Some("tmpfs") => "bartleby.spool=tmpfs on the kernel command line".to_string(),
        _ if candidates.is_empty() => format!("no disk partition labelled {SPOOL_LABEL} was found"),
        _ => format!("{} could not be mounted", candidates.join(", ")),
    };
    let note = match mount("tmpfs", &target, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "mode=0700,size=25%") {
        Ok(()) => format!(
            "spool: IN RAM ONLY (tmpfs at {target}, {} kB max) because {why}. Queued mail is LOST on power failure or reboot. Attach a disk with an ext4 partition labelled {SPOOL_LABEL} for a persistent spool.",
            statvfs_free(&target).map(|b| b / 1024).unwrap_or(0)
        ),
        Err(e) => format!("spool: IN RAM ONLY (initramfs directory {target}; tmpfs failed: {e}) because {why}. Queued mail is LOST on power failure or reboot."),
    };
    (false, note)
}

fn statvfs_free(path: &str) -> Option<u64> {
    let c = CString::new(path).ok()?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

// ------------------------------------------------------- tiny TOML reader

/// Just enough TOML for the few keys init needs before main's parser runs:
/// `key = "string"`, `key = ["a", "b"]` (may span lines), `[table]`, comments.
struct MiniToml {
    items: Vec<(String, String, Vec<String>)>,
}

impl MiniToml {
    fn parse(text: &str) -> MiniToml {
        let mut items = Vec::new();
        let mut table = String::new();
        let mut pending: Option<(String, String)> = None;
        for raw in text.lines() {
            let line = strip_comment(raw).trim();
            if let Some((key, mut acc)) = pending.take() {
                acc.push(' ');
                acc.push_str(line);
                if acc.contains(']') {
                    items.push((table.clone(), key, strings(&acc)));
                } else {
                    pending = Some((key, acc));
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') && !line.contains('=') {
                table = line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
                continue;
            }
            let Some((k, v)) = line.split_once('=') else { continue };
            let (k, v) = (k.trim().trim_matches('"').to_string(), v.trim());
            if v.starts_with('[') && !v.contains(']') {
                pending = Some((k, v.to_string()));
            } else {
                items.push((table.clone(), k, strings(v)));
            }
        }
        MiniToml { items }
    }
    fn get(&self, table: &str, key: &str) -> Option<&str> {
        self.items.iter().rev().find(|(t, k, _)| t == table && k == key).and_then(|(_, _, v)| v.first()).map(String::as_str)
    }
    fn get_list(&self, table: &str, key: &str) -> Vec<String> {
        self.items.iter().rev().find(|(t, k, _)| t == table && k == key).map(|(_, _, v)| v.clone()).unwrap_or_default()
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The quoted strings in a value (a bare value counts as one string).
fn strings(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut parts = v.split('"');
    parts.next();
    while let Some(s) = parts.next() {
        out.push(s.to_string());
        parts.next();
    }
    if out.is_empty() && !v.trim().is_empty() && !v.trim().starts_with('[') {
        out.push(v.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mini_toml() {
        let t = MiniToml::parse(
            "hostname = \"mx2.example.org\" # comment\nspool = \"/var/spool/bartleby\"\nlisten = [\"0.0.0.0:25\",\n  \"[::]:25\"]\n\
             [status]\nlisten = \"0.0.0.0:80\"\n[network]\naddress = \"dhcp\"\ndns = [\"10.0.2.3\", \"1.1.1.1\"]\nmtu = 1500\n",
        );
        assert_eq!(t.get("", "hostname"), Some("mx2.example.org"));
        assert_eq!(t.get("", "spool"), Some("/var/spool/bartleby"));
        assert_eq!(t.get_list("", "listen"), vec!["0.0.0.0:25", "[::]:25"]);
        assert_eq!(t.get("status", "listen"), Some("0.0.0.0:80"));
        assert_eq!(t.get("network", "address"), Some("dhcp"));
        assert_eq!(t.get_list("network", "dns"), vec!["10.0.2.3", "1.1.1.1"]);
        assert_eq!(t.get("network", "mtu"), Some("1500"));
        assert_eq!(t.get("network", "gateway"), None);
        assert_eq!(t.get("", "nothing"), None);
    }
}
