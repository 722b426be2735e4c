//! PID 1's disks: the block devices, the medium holding `bartleby.toml`
//! (mounted read-only), the ext4 spool partition labelled BSPOOL (or a
//! RAM spool, said loudly). Touches /dev nodes and mounts.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{BUILTIN_CONFIG, mount, say, umount};

const BOOT_MNT: &str = "/boot";
const CD_MNT: &str = "/cdrom";
const SPOOL_LABEL: &str = "BSPOOL";

/// Block devices from /proc/partitions (whole disks listed too), waiting up
/// to `wait` for at least one to show up.
pub(super) fn partitions(wait: Duration) -> Vec<String> {
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
            for n in &names {
                ensure_dev_node(n);
            }
            return names;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Makes `/dev/NAME` from /sys/class/block/NAME/dev when devtmpfs lacks it
/// (seen at 10 MB of RAM: /proc/partitions listed sda2, /dev had no node,
/// and the spool went to RAM).
fn ensure_dev_node(name: &str) {
    let path = format!("/dev/{name}");
    if Path::new(&path).exists() {
        return;
    }
    let Ok(dev) = fs::read_to_string(format!("/sys/class/block/{name}/dev")) else { return };
    let Some((ma, mi)) = dev.trim().split_once(':') else { return };
    let (Ok(ma), Ok(mi)) = (ma.parse::<u32>(), mi.parse::<u32>()) else { return };
    let Ok(c) = CString::new(path.as_str()) else { return };
    // SAFETY: mknod with a NUL-terminated path and a device number.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(ma, mi)) };
    if r == 0 {
        say!("{path}: missing in /dev (devtmpfs), made it ({ma}:{mi})");
    } else {
        say!("{path}: missing in /dev and cannot be made: {}", std::io::Error::last_os_error());
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
pub(super) fn find_config(parts: &[String], boot: Option<&str>) -> PathBuf {
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
pub(super) fn mount_spool(parts: &[String], spool: &Path, forced: Option<&str>) -> (bool, String) {
    let target = spool.to_string_lossy().into_owned();
    if let Err(e) = fs::create_dir_all(&target) {
        // The root is read-only on the disk and floppy boots: a `spool` path
        // that is not already there can be neither made nor mounted on.
        say!("ERROR: spool: the directory {target} named by `spool` in bartleby.toml does not exist and cannot be made ({e}); the image has /var/spool/bartleby (the default)");
    }
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

/// Bytes free for the relay on the file system at `path` (the spool's
/// statvfs, [`crate::spool::disk_space`]).
fn statvfs_free(path: &str) -> Option<u64> {
    crate::spool::disk_space(Path::new(path)).ok().map(|d| d.avail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_label_reads_only_an_ext_superblock() {
        let d = std::env::temp_dir().join(format!("bartleby-disks-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let img = |name: &str, len: usize, magic: bool, label: &[u8]| {
            let mut b = vec![0u8; len];
            if magic && len >= 1024 + 0x3A {
                b[1024 + 0x38] = 0x53;
                b[1024 + 0x39] = 0xEF;
            }
            if len >= 1024 + 0x88 {
                b[1024 + 0x78..1024 + 0x78 + label.len()].copy_from_slice(label);
            }
            let p = d.join(name);
            fs::write(&p, b).unwrap();
            p.to_string_lossy().into_owned()
        };
        assert_eq!(ext_label(&img("spool", 4096, true, b"BSPOOL")).as_deref(), Some(SPOOL_LABEL));
        // a label of all 16 bytes (no NUL), one not UTF-8
        assert_eq!(ext_label(&img("full", 4096, true, b"ABCDEFGHIJKLMNOP")).as_deref(), Some("ABCDEFGHIJKLMNOP"));
        assert_eq!(ext_label(&img("latin1", 4096, true, b"caf\xe9")).as_deref(), Some("caf\u{fffd}"));
        // no magic (a FAT or blank disk), a file shorter than the superblock, none at all
        assert_eq!(ext_label(&img("fat", 4096, false, b"BSPOOL")), None);
        assert_eq!(ext_label(&img("short", 1100, true, b"")), None);
        assert_eq!(ext_label(&d.join("missing").to_string_lossy()), None);
        assert_eq!((kind("sr0"), kind("fd0"), kind("sda2"), kind("vda")), ("cd", "floppy", "disk", "disk"));
        let _ = fs::remove_dir_all(&d);
    }
}
