//! The few system calls several roles share, each written once: a file
//! system's space (`statvfs`) and random bytes (`getrandom`).
//!
//! Role: thin, safe wrappers around libc; no policy (what a caller does with
//! the figures, or how much randomness it needs, is the caller's). May touch
//! only the kernel; nothing here logs, allocates beyond its result, or blocks.

use std::io;
use std::path::Path;

/// Space on a file system, as `df` shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskSpace {
    pub total: u64,
    pub used: u64,
    /// Available to an unprivileged writer (df's "Avail").
    pub avail: u64,
    /// Inodes in all, and free for an unprivileged writer (`df -i`); both 0
    /// on file systems without an inode limit (btrfs).
    pub files: u64,
    pub favail: u64,
    /// Mounted read-only (statvfs ST_RDONLY).
    pub read_only: bool,
}

impl DiskSpace {
    pub fn percent_used(&self) -> u32 {
        let denom = self.used + self.avail;
        if denom == 0 { 0 } else { (self.used as u128 * 100).div_ceil(denom as u128) as u32 }
    }
}

/// Space on the file system holding `path` (statvfs(2), as `df` computes it).
/// The fields are widened to u64 before they are multiplied: on the i486
/// they are 32-bit, and blocks x block size overflows 32 bits at 4 GiB.
pub fn disk_space(path: &Path) -> io::Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in path"))?;
    // SAFETY: statvfs writes into the zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (frsize, blocks, bfree, bavail) = (st.f_frsize as u64, st.f_blocks as u64, st.f_bfree as u64, st.f_bavail as u64);
    let total = blocks * frsize;
    let (files, favail) = (st.f_files as u64, st.f_favail as u64);
    Ok(DiskSpace {
        total,
        used: total.saturating_sub(bfree * frsize),
        avail: bavail * frsize,
        files,
        favail,
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

/// GRND_INSECURE (Linux 5.6): never waits for the entropy pool.
const GRND_INSECURE: libc::c_uint = 0x0004;

/// Fills `buf` from the kernel's random pool without ever waiting: on a 486
/// without a TSC the pool can take minutes to initialise at boot, and
/// nothing here needs more than the kernel has then (query IDs, DHCP
/// transaction IDs, the status page's CSRF token). GRND_INSECURE, or
/// GRND_NONBLOCK on kernels before 5.6. False when neither filled it (the
/// caller then mixes in what it has: the clock, the process ID).
pub fn random_bytes(buf: &mut [u8]) -> bool {
    for flags in [GRND_INSECURE, libc::GRND_NONBLOCK] {
        // SAFETY: getrandom writes at most buf.len() bytes into the buffer we own.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), flags) };
        if usize::try_from(n).is_ok_and(|n| n == buf.len()) {
            return true;
        }
    }
    false
}

/// A random u32 ([`random_bytes`]); when the kernel gives none (never on
/// Linux 3.17 and later), one from the clock and the process ID.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if random_bytes(&mut b) {
        return u32::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    t.subsec_nanos() ^ (std::process::id() << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_of_a_real_file_system() {
        let d = disk_space(Path::new("/")).unwrap();
        assert!(d.total > 0 && d.avail <= d.total && d.used <= d.total, "{d:?}");
        assert!(d.percent_used() <= 100);
    }

    #[test]
    fn space_errors_name_the_failure() {
        let e = disk_space(Path::new("/no/such/dir/for/bartleby")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        // a NUL cannot reach the kernel
        let e = disk_space(Path::new("/tmp\0/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn percent_rounds_up_and_survives_zero() {
        assert_eq!(DiskSpace::default().percent_used(), 0);
        let d = DiskSpace { used: 1, avail: 999, ..Default::default() };
        assert_eq!(d.percent_used(), 1);
        let d = DiskSpace { used: u64::MAX / 2, avail: u64::MAX / 2, ..Default::default() };
        assert_eq!(d.percent_used(), 50);
    }

    #[test]
    fn random_fills_and_differs() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        assert!(random_bytes(&mut a) && random_bytes(&mut b));
        assert_ne!(a, b);
        assert!(random_bytes(&mut []));
        assert_ne!((random_u32(), random_u32(), random_u32()), (0, 0, 0));
    }
}
