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
//! The file is read once, by the relay's own parser ([`Config::load`]), and
//! the parsed [`Config`] goes on to the relay: init and the relay cannot
//! disagree on the hostname, the spool directory or the network. A file that
//! does not parse is reported with its file:line on the console, and both
//! fall back to the built-in copy together.
//!
//! Everything here reports on the console in plain words and keeps going when
//! something is missing: an appliance without a disk still relays (with a RAM
//! spool, said loudly), and one without a lease still answers on its
//! link-local address.
//!
//! Role: PID 1 only. Touches the machine: mounts, /dev nodes, fds 0 to 2,
//! the hostname, processes at shutdown; the network through netcfg. The one
//! console writer (`say!`) of init and netcfg is here; the console itself
//! is `init/console.rs`, the disks (config medium, spool) `init/disks.rs`.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{Config, NetworkConfig};

mod console;
mod disks;

use console::{console_tee, ensure_console};
use disks::{find_config, mount_spool, partitions};

/// One line on the console: `bartleby-init: ...` (PID 1's duties), or with
/// `@"net",` first `bartleby-net: ...` (the DHCP thread's own news). The one
/// console writer of init and netcfg.
macro_rules! say {
    (@$who:literal, $($a:tt)*) => { eprintln!(concat!("bartleby-", $who, ": {}"), format_args!($($a)*)) };
    ($($a:tt)*) => { say!(@"init", $($a)*) };
}
pub(crate) use say;

/// What `boot` found.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// The configuration file init used (the one found, or the built-in
    /// copy when the one found is invalid).
    pub config_path: PathBuf,
    /// That file, parsed: the relay runs with exactly these values. `None`
    /// when neither the file found nor the built-in copy is valid.
    pub config: Option<Config>,
    /// The error in the file found on the boot media, when init fell back.
    pub config_error: Option<String>,
    /// Why the spool is in RAM (also printed on the console); empty when
    /// init mounted a disk there. Whether the spool is persistent is not
    /// taken from here: the relay checks the mounted file system itself.
    pub spool_note: String,
    /// Problems an administrator must act on, in plain words (a spool disk
    /// that was expected but not found): printed on the console and put
    /// on the status page and in `/metrics` by the relay.
    pub alerts: Vec<String>,
}

const BUILTIN_CONFIG: &str = "/etc/bartleby.toml";
const DEFAULT_SPOOL: &str = "/var/spool/bartleby";

/// Called by main when running as PID 1: mounts, config, spool, network.
pub fn boot() -> BootInfo {
    let t0 = Instant::now();
    first_steps();
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let arg = |k: &str| cmdline.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);

    let parts = partitions(Duration::from_secs(3));
    say!("block devices: {}", if parts.is_empty() { "none".to_string() } else { parts.join(" ") });

    let found = find_config(&parts, arg("bartleby.boot=").as_deref());
    let (config_path, config, config_error) = load_config(found, Path::new(BUILTIN_CONFIG));

    if let Some(c) = &config {
        set_hostname(&c.hostname);
    }

    let spool = config.as_ref().map_or_else(|| PathBuf::from(DEFAULT_SPOOL), |c| c.spool.clone());
    let forced = arg("bartleby.spool=");
    let (persistent_spool, spool_note) = mount_spool(&parts, &spool, forced.as_deref());
    let banner = if persistent_spool { "" } else { "WARNING: " };
    say!("{banner}{spool_note}");
    let alerts: Vec<String> = if persistent_spool { None } else { missing_spool(forced.as_deref(), arg("bartleby.boot=").as_deref(), &parts) }
        .into_iter()
        .collect();

    start_network(config.as_ref());
    say!("boot done in {}s{}; {}", crate::util::decimal(t0.elapsed().as_secs_f64(), 1), since_boot(), meminfo());
    watch_memory();
    let spool_note = if persistent_spool { String::new() } else { spool_note };
    BootInfo { config_path, config, config_error, spool_note, alerts }
}

/// What comes before anything can be read from a disk: the pseudo file
/// systems, fds 0 to 2, a writable /etc, the console on both screens,
/// ctrl-alt-del as a signal, the kernel's banner, `lo` up.
fn first_steps() {
    mount_pseudo();
    ensure_console();
    writable_etc();
    console_tee();
    // ctrl-alt-del: SIGINT to PID 1 instead of an immediate reboot
    // SAFETY: reboot(2) with CAD_OFF only changes a kernel flag.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
    say!("{}", fs::read_to_string("/proc/version").unwrap_or_default().trim());
    say!("started{}", since_boot());
    if let Err(e) = crate::netcfg::set_up("lo") {
        say!("lo: {e}");
    }
}

/// The alert when the spool is in RAM but a disk was expected: booted from
/// the disk (whose second partition is the spool), or a spool device named
/// on the command line (`forced`). A RAM spool is then a fault, not a
/// choice (at 10 MB the kernel once lacked /dev/sda* and the relay quietly
/// took mail into RAM). Said on the console too.
fn missing_spool(forced: Option<&str>, boot_medium: Option<&str>, parts: &[String]) -> Option<String> {
    let why = match forced {
        Some("tmpfs") => return None,
        Some(dev) => format!("bartleby.spool={dev} names the spool device"),
        None if boot_medium == Some("disk") => "the machine booted from the disk, whose ext4 partition BSPOOL is the spool".to_string(),
        None => return None,
    };
    let a = format!(
        "The spool disk is MISSING: {why}, but it was not mounted (block devices seen: {}). Mail is kept in RAM and lost on power failure; check the disk and its cable, then reboot.",
        if parts.is_empty() { "none".to_string() } else { parts.join(" ") }
    );
    say!("ERROR: {a}");
    Some(a)
}

/// The network as configured (DHCP without a configuration); never waits on
/// it: the relay listens on 0.0.0.0 / [::] at once.
fn start_network(config: Option<&Config>) {
    let net = config.map_or_else(
        || NetworkConfig { interface: None, address: "dhcp".into(), gateway: None, dns: Vec::new(), fallback: None },
        |c| c.network.clone(),
    );
    match crate::netcfg::start(net.interface.as_deref(), &net.address, net.gateway.as_deref(), &net.dns, net.fallback.as_deref()) {
        Ok(s) => say!("network: {s}"),
        Err(e) => say!("network: {e}"),
    }
}

/// Says at once when memory is short before the relay starts (on a machine
/// this short the relay may not live until the watcher wakes up), then
/// starts the watcher: one more report once the relay has settled, then a
/// line each time memory gets short or recovers.
fn watch_memory() {
    let short_at_boot = mem_available_kb().is_some_and(|a| a < MEM_SHORT_KB);
    if short_at_boot {
        say!("WARNING: memory short: {} kB available (below {MEM_SHORT_KB} kB) before the relay starts; it may be killed or refuse mail: give the machine more RAM (8 MB is the least it is tested with)", mem_available_kb().unwrap_or(0));
    }
    let _ = std::thread::Builder::new().name("meminfo".into()).stack_size(32 * 1024).spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        say!("after start: {}", meminfo());
        let mut short = short_at_boot;
        loop {
            if let Some(avail) = mem_available_kb()
                && (avail < MEM_SHORT_KB) != short
            {
                short = !short;
                if short {
                    say!("WARNING: memory short: {avail} kB available (below {MEM_SHORT_KB} kB); the relay may be killed or refuse mail. {}", meminfo());
                } else {
                    say!("memory: {avail} kB available again");
                }
            }
            std::thread::sleep(Duration::from_secs(10));
        }
    });
}

/// Loads the configuration found on the boot media with the relay's parser;
/// when it is invalid, says so with file:line and falls back to `builtin`.
/// Returns the file used, its configuration (`None` if neither file is
/// valid) and the error of the file found.
pub fn load_config(found: PathBuf, builtin: &Path) -> (PathBuf, Option<Config>, Option<String>) {
    let e = match Config::load(&found) {
        Ok(c) => return (found, Some(c), None),
        Err(e) => e.to_string(),
    };
    say!("configuration: ERROR: {e}");
    if found != builtin {
        match Config::load(builtin) {
            Ok(c) => {
                say!("configuration: using the built-in {} instead; fix {} and reboot", builtin.display(), found.display());
                return (builtin.to_path_buf(), Some(c), Some(e));
            }
            Err(e2) => say!("configuration: ERROR: the built-in copy too: {e2}"),
        }
    }
    say!("configuration: none is usable; network by DHCP, spool at {DEFAULT_SPOOL}; the relay cannot start");
    (found, None, Some(e))
}

/// Called by main after the relay stopped (or on a fatal error): stop other
/// processes, sync, unmount (or remount read-only), then reboot or power off.
pub fn shutdown(reboot: bool) -> ! {
    say!("{}", if reboot { "rebooting" } else { "powering off" });
    // SAFETY: kill(2) takes no pointers; -1 signals every process but
    // PID 1 itself (this one), which is what shutting down means.
    unsafe {
        libc::kill(-1, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above; sync(2) takes no arguments.
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
            // SAFETY: c is a valid NUL-terminated path; the null source,
            // type and data pointers are what MS_REMOUNT takes.
            let ro = unsafe {
                libc::mount(std::ptr::null(), c.as_ptr(), std::ptr::null(), libc::MS_REMOUNT | libc::MS_RDONLY, std::ptr::null())
            };
            say!("{dir}: busy, {}", if ro == 0 { "remounted read-only" } else { "left mounted (synced)" });
        }
    }
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    // let the console thread (console_tee) drain the last lines
    std::thread::sleep(Duration::from_millis(300));
    let cmd = if reboot { libc::RB_AUTOBOOT } else { libc::RB_POWER_OFF };
    // SAFETY: reboot(2) takes a command number, no pointers; the file
    // systems are synced and unmounted (or read-only) above.
    unsafe { libc::reboot(cmd) };
    // power off is not possible on every 486 (no APM/ACPI): halt instead
    // SAFETY: as above.
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

/// As PID 1: `", 1.23s after the kernel started"` from /proc/uptime (the
/// guest's own clock: the boot time the appliance measures itself, also
/// under an emulator's instruction counting). Empty otherwise.
pub fn since_boot() -> String {
    if std::process::id() != 1 {
        return String::new();
    }
    let up = fs::read_to_string("/proc/uptime").unwrap_or_default();
    match up.split_whitespace().next() {
        Some(s) => format!(", {s}s after the kernel started"),
        None => String::new(),
    }
}

/// Below this much `MemAvailable` the console, the page and `/metrics` say
/// memory is short: a few sessions' buffers and one delivery.
pub const MEM_SHORT_KB: u64 = 512;

/// `MemAvailable` from /proc/meminfo, in kB.
pub fn mem_available_kb() -> Option<u64> {
    let m = fs::read_to_string("/proc/meminfo").ok()?;
    m.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()
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

/// The disk and the floppy boot without an initramfs: the root is the
/// disk's FAT partition, read-only (the binary runs from its page cache, the
/// 8 MB machine keeps ~1 MB it would spend on an unpacked initramfs). Then
/// /etc (resolv.conf from DHCP) becomes a small tmpfs holding copies of the
/// files that were there.
fn writable_etc() {
    if !crate::spool::disk_space(Path::new("/")).is_ok_and(|d| d.read_only) {
        return;
    }
    let files: Vec<(std::ffi::OsString, Vec<u8>)> = fs::read_dir("/etc")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .filter_map(|e| Some((e.file_name(), fs::read(e.path()).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    match mount("tmpfs", "/etc", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "mode=0755,size=256k") {
        Ok(()) => {
            for (name, data) in files {
                let _ = fs::write(Path::new("/etc").join(name), data);
            }
        }
        Err(e) => say!("/etc: read-only root and no tmpfs over it: {e}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "hostname = 'mx2.example.org' # single quotes are TOML too\r\n\
        spool = '/data/spool'\r\nrelay_domains = ['example.org']\r\nprimary = '10.0.2.2:2526'\r\n\
        [network]\r\naddress = '192.168.1.20/24'\r\ngateway = '192.168.1.1'\r\ndns = ['192.168.1.1',\r\n  '9.9.9.9']\r\n";

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bartleby-init-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn init_reads_what_the_relay_reads() {
        // the values init mounts and configures are the relay's own
        let d = dir();
        let found = d.join("bartleby.toml");
        fs::write(&found, GOOD).unwrap();
        let (path, cfg, err) = load_config(found.clone(), &d.join("builtin.toml"));
        let cfg = cfg.expect("valid");
        assert_eq!((path, err), (found, None));
        assert_eq!(cfg.hostname, "mx2.example.org");
        assert_eq!(cfg.spool, Path::new("/data/spool"));
        assert_eq!(cfg.network.address, "192.168.1.20/24");
        assert_eq!(cfg.network.gateway.as_deref(), Some("192.168.1.1"));
        assert_eq!(cfg.network.dns, vec!["192.168.1.1", "9.9.9.9"]);
        assert_eq!(crate::config::values::parse_ipv4_prefix(&cfg.network.address).unwrap(), ("192.168.1.20".parse().unwrap(), 24));
        let _ = fs::remove_dir_all(d);
    }

    #[test]
    fn invalid_config_falls_back_to_builtin_for_both() {
        let d = dir();
        let found = d.join("bartleby.toml");
        let builtin = d.join("builtin.toml");
        fs::write(&found, GOOD.replace("spool = '/data/spool'", "spool = 'data/spool'")).unwrap();
        fs::write(&builtin, GOOD.replace("/data/spool", "/var/spool/bartleby")).unwrap();
        let (path, cfg, err) = load_config(found.clone(), &builtin);
        assert_eq!(path, builtin);
        assert_eq!(cfg.expect("builtin").spool, Path::new("/var/spool/bartleby"));
        let err = err.expect("error kept");
        assert!(err.starts_with(&format!("{}:2: ", found.display())), "{err}");
        // neither valid: no configuration, the error of the file found
        fs::write(&builtin, "hostname = \"\"\n").unwrap();
        let (path, cfg, err) = load_config(found.clone(), &builtin);
        assert!(cfg.is_none());
        assert_eq!(path, found);
        assert!(err.unwrap().contains("spool"));
        let _ = fs::remove_dir_all(d);
    }
}
