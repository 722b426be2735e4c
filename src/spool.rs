//! The spool: the durable queue on disk.
//!
//! Role: every file under the spool directory, and only there; its file
//! system's space comes from [`crate::sys`].
//!
//! Layout under the spool directory:
//!
//! ```text
//! queue/ID      a committed message: envelope header, blank line, message
//! state/ID      delivery state of a queued message (attempts, done recipients)
//! free/fN       files kept for reuse: a delivered message's queue file, or an
//!               empty one made ahead; a message is written into one of them
//!               and renamed into queue/ when complete. Never a message:
//!               what is there (old content, a message cut short by a
//!               crash) is overwritten by the next message
//! incoming/ID   partial messages of versions before free/ (removed at start)
//! corrupt/ID    queue files that failed their check at start (kept for the admin);
//!               also ID.state (a damaged delivery state) and anything found
//!               at start where a spool file should be but that is not one
//!               (a directory, a FIFO, a symlink; NAME.free from free/):
//!               moved, never deleted
//! ```
//!
//! A queue file is written once and never changed: the envelope (sender,
//! recipients, client) first, then the message as it streams in, then the
//! length of the message and an Adler-32 checksum of the envelope and the
//! message's first 64 KiB (see [`CHECK_SPAN`]) are written into fixed-width
//! fields of the header (`length`, `check`). The session renames `free/fN` to `queue/ID` (never over an
//! existing entry) and then waits for the committer (see [`Committer`]) to
//! make the file *and* the rename durable before it says "250". At start, a
//! queue file whose length does not match its header, or whose content does
//! not match its checksum, is moved to `corrupt/` instead of being delivered
//! truncated or mixed; files of older versions have no `check` line and are
//! checked by their length alone.
//!
//! Why files are reused: creating a file allocates an inode, which on ext4
//! costs hundreds of microseconds of system time when many inodes were
//! freed in the last seconds (it skips each of them: after a drain, the
//! next burst of mail paid this for every message). A delivered message's
//! file is renamed into `free/` instead of being unlinked, and the next
//! message is written over it: no inode and, when it fits, no block to
//! allocate; the accept path then has one rename and no create or unlink.
//! When `free/` runs low a blocking thread makes empty files there ahead
//! of need. The pool is bounded (4096 files, 32 MiB and 1/20 of the file
//! system; files above 64 KiB are unlinked), so that it never makes the
//! space check refuse mail.
//!
//! Why `syncfs` rather than `fsync` per file: one `syncfs` makes every file
//! and rename of the file system durable at once (on ext4 it forces a journal
//! commit with a cache flush), so twenty sessions finishing DATA together cost
//! one disk flush instead of forty (group commit).
//!
//! Reading (`list`, `read`) needs no running server: `mailq` and the status
//! page read the same files.
//!
//! Nothing here trusts what it finds on disk: every spool file is opened
//! with `O_NOFOLLOW | O_NONBLOCK` and checked to be a regular file (a
//! symlink is never followed, a FIFO never blocks), every error names its
//! path, and one bad entry never stops start-up or a listing: it is reported
//! and skipped or moved to `corrupt/` (Postfix's qmgr likewise skips what is
//! not a regular file and saves unparsable queue files to its corrupt queue).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::logging::MASTER;
use crate::util::{QueueId, valid_queue_id};

const MAGIC: &str = "BARTLEBY-QUEUE 1";
/// Width of the length field, so it can be rewritten in place.
const LEN_WIDTH: usize = 20;
/// Longest header line a reader accepts (an address is at most 256 octets).
const MAX_HEADER_LINE: usize = 1024;
/// Largest delivery state read: a bigger one is taken as damaged. A real
/// one holds a line of at most a few hundred bytes per recipient.
const MAX_STATE: u64 = 4 << 20;
/// The spool's subdirectories.
const SUBDIRS: [&str; 5] = ["incoming", "queue", "state", "corrupt", "free"];
/// Most files kept in `free/` for reuse (and at most 1/20 of the file
/// system's inodes); beyond it a delivered message's file is unlinked.
const POOL_MAX_FILES: usize = 4096;
/// Most bytes held by the files in `free/`: 32 MiB, and at most 1/20 of
/// the spool's file system (so that the pool never makes MAIL get 452).
const POOL_MAX_BYTES: u64 = 32 << 20;
/// Below this many files in the pool, [`Spool::refill`] makes more...
const POOL_LOW: usize = 8;
/// ... this many.
const POOL_BATCH: usize = 32;
/// A delivered message's file larger than this is unlinked, not kept.
const RECYCLE_MAX_FILE: u64 = 64 << 10;
/// A message's bytes kept in memory before they go to its file: a 4 KiB
/// message with its header and the Received line goes in one write(2).
const FILE_BUF: usize = 6144;
/// The `check` of a queue file covers its header and this much of its
/// message: what a reused file can hold of an older message (at most
/// [`RECYCLE_MAX_FILE`]). Beyond it blocks are new, and a file system that
/// orders data before metadata (ext4) never shows them before their data;
/// so start-up reads at most this much of each message, not all of it.
const CHECK_SPAN: u64 = RECYCLE_MAX_FILE;
/// Name of the file [`Spool::probe`] creates (never a queue ID).
const PROBE: &str = "write-test.tmp";
/// The directories [`Spool::probe`] writes in: what sessions (`free/`,
/// `queue/`), outcomes (`state/`, removals in `queue/`) and bounces (all
/// three) need.
pub const PROBED: [&str; 3] = ["free", "queue", "state"];

/// The envelope of a message, as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub id: QueueId,
    /// Unix seconds.
    pub arrival: u64,
    /// `host[ip]` of the client, as Postfix logs it.
    pub client: String,
    pub helo: String,
    /// The reverse path without brackets; empty for the null sender `<>`.
    pub sender: String,
    /// The client said BODY=8BITMIME.
    pub body_8bit: bool,
    /// The client said SMTPUTF8 on MAIL (RFC 6531): addresses and headers
    /// may hold UTF-8. A `smtputf8` header line; absent (older files): false.
    pub smtputf8: bool,
    pub recipients: Vec<String>,
    /// DSN (RFC 3461): RET (`FULL`, `HDRS`) and ENVID (xtext as received);
    /// empty when not given.
    pub ret: String,
    pub envid: String,
    /// NOTIFY and ORCPT of `recipients[i]`; may be shorter (absent = none).
    pub dsn: Vec<crate::dsn::RcptDsn>,
}

impl Envelope {
    /// The DSN parameters of a recipient (empty when none were given).
    /// No copy, and no search when no recipient gave any (the usual case).
    pub fn dsn_of(&self, rcpt: &str) -> &crate::dsn::RcptDsn {
        static NONE: crate::dsn::RcptDsn = crate::dsn::RcptDsn { notify: String::new(), orcpt: String::new() };
        if self.dsn.is_empty() {
            return &NONE;
        }
        self.recipients.iter().position(|r| r == rcpt).and_then(|i| self.dsn.get(i)).unwrap_or(&NONE)
    }
}

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptStatus {
    Pending,
    Sent,
    Bounced,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub addr: String,
    pub status: RcptStatus,
    /// The last reply or error for this recipient.
    pub error: String,
}

/// The mutable part of a queued message, kept in `state/ID`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryState {
    pub attempts: u32,
    /// Unix seconds of the next attempt; 0 = as soon as possible.
    pub next_attempt: u64,
    pub last_attempt: u64,
    pub last_error: String,
    /// (recipient, status, reply) for recipients no longer pending.
    pub done: Vec<(String, RcptStatus, String)>,
    /// Per-recipient last errors of pending recipients.
    pub errors: Vec<(String, String)>,
    /// A delay warning was sent (at most one per message).
    pub warned: bool,
}

/// A queued message: envelope, size and delivery state, without the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub env: Envelope,
    /// Bytes of message data (as it will be sent, Received header included).
    pub size: u64,
    pub state: DeliveryState,
    pub recipients: Vec<Recipient>,
    /// Why `state/ID` is damaged, if it is (not UTF-8, bad syntax, not a
    /// regular file). The message is then taken as never tried: every
    /// recipient pending (at worst one gets it twice, never none), and the
    /// scheduler moves the bad file to `corrupt/`. A state that cannot be
    /// read for a passing reason (EACCES, EIO, EMFILE) is not damaged: the
    /// whole message is unreadable then (see [`Spool::read`]).
    pub state_error: Option<String>,
}

impl QueuedMessage {
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients.iter().filter(|r| r.status == RcptStatus::Pending)
    }
}

/// The spool directory.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    pool: std::sync::Arc<Pool>,
}

/// The files in `free/` that [`Spool::begin`] writes new messages into: the
/// files of delivered messages, renamed there by [`Spool::remove`] instead of
/// being unlinked. Taking one costs no inode allocation (on ext4 the costly
/// part of creating a file, hundreds of microseconds when many inodes were
/// freed in the last seconds) and no block allocation when the new message
/// fits in the old one's blocks.
#[derive(Debug, Default)]
struct Pool {
    /// (name in `free/`, its length).
    free: std::sync::Mutex<Vec<(u32, u64)>>,
    /// The next name to give (`fN`).
    next: AtomicU32,
    /// Most bytes the pool may hold (0: no recycling, e.g. for `mailq`).
    max_bytes: u64,
    /// Most files (inodes) it may hold.
    max_files: usize,
    /// A background refill is under way (see [`Spool::refill`]).
    refilling: std::sync::atomic::AtomicBool,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u32, u64)>> {
        // A panic while the lock was held cannot leave the list inconsistent.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self) -> Option<(u32, u64)> {
        self.lock().pop()
    }

    fn give(&self, n: u32, len: u64) {
        self.lock().push((n, len));
    }

    /// Whether a file of `len` bytes may join the pool now.
    fn room_for(&self, len: u64) -> bool {
        let l = self.lock();
        len <= RECYCLE_MAX_FILE && l.len() < self.max_files && l.iter().map(|x| x.1).sum::<u64>() + len <= self.max_bytes
    }

    fn new_name(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

/// The name of pool file `n` in `free/` (never a queue ID: lowercase `f`).
fn free_name(n: u32) -> String {
    format!("f{n}")
}

/// The number of a pool file's name, if it is one.
fn parse_free_name(s: &str) -> Option<u32> {
    let d = s.strip_prefix('f')?;
    if d.is_empty() || d.len() > 10 || !d.bytes().all(|c| c.is_ascii_digit()) || (d.len() > 1 && d.starts_with('0')) {
        return None;
    }
    d.parse().ok()
}

/// Adler-32 (RFC 1950): the checksum of a queue file's envelope and data,
/// cheap enough for a 486 (two additions a byte).
#[derive(Debug, Clone, Copy)]
struct Adler(u32, u32);

impl Adler {
    fn new() -> Adler {
        Adler(1, 0)
    }

    fn update(&mut self, data: &[u8]) {
        // 5552: the most bytes before b can overflow 32 bits.
        for chunk in data.chunks(5552) {
            for &x in chunk {
                self.0 += x as u32;
                self.1 += self.0;
            }
            self.0 %= 65521;
            self.1 %= 65521;
        }
    }

    fn value(&self) -> u32 {
        (self.1 << 16) | self.0
    }
}

/// What `recover` found at start.
#[derive(Debug, Default)]
pub struct Recovery {
    pub queued: usize,
    pub removed_incoming: usize,
    /// Files in `free/` kept for reuse.
    pub pooled: usize,
    pub corrupt: Vec<String>,
    pub orphan_states: usize,
    /// Entries moved to `corrupt/` that were not damaged queue files
    /// (directories, FIFOs, symlinks, damaged delivery states).
    pub quarantined: usize,
    /// Queue files, or delivery states, left in place because they could
    /// not be read (EACCES, EIO): their messages are tried again later;
    /// never moved or deleted.
    pub unreadable: usize,
}

/// Space on the spool's file system (statvfs, in [`crate::sys`]).
pub use crate::sys::{DiskSpace, disk_space};

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The error with its path in front; its kind is kept (NotFound stays NotFound).
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Opens a spool file for reading. Never follows a symlink (`O_NOFOLLOW`),
/// never blocks on a FIFO (`O_NONBLOCK`), and refuses anything that is not
/// a regular file with an `InvalidData` error naming the path and what is
/// there. Other errors keep their kind and name the path too.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let f = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        // ELOOP: the last component is a symlink; ENXIO: a socket.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENXIO)) => {
            let what = fs::symlink_metadata(path).map_or("of unknown type", |m| crate::util::file_kind(m.file_type()));
            return Err(invalid(format!("{}: not a regular file ({what})", path.display())));
        }
        Err(e) => return Err(at(path, e)),
    };
    let ft = f.metadata().map_err(|e| at(path, e))?.file_type();
    if !ft.is_file() {
        return Err(invalid(format!("{}: not a regular file ({})", path.display(), crate::util::file_kind(ft))));
    }
    Ok(f)
}

/// Parses a delivery state. Strict on purpose: what does not parse is
/// treated as lost (every recipient pending again), never half-trusted.
fn parse_state(buf: &[u8]) -> Result<DeliveryState, &'static str> {
    if buf.len() as u64 > MAX_STATE {
        return Err("larger than 4 MiB");
    }
    if buf.is_empty() {
        return Err("empty file");
    }
    let text = std::str::from_utf8(buf).map_err(|_| "not UTF-8")?;
    if !text.ends_with('\n') {
        return Err("cut short (no final newline)");
    }
    let mut s = DeliveryState::default();
    let mut attempts = false;
    for line in text.lines() {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "attempts" => {
                s.attempts = v.parse().map_err(|_| "bad attempts line")?;
                attempts = true;
            }
            "next" => s.next_attempt = v.parse().map_err(|_| "bad next line")?,
            "last" => s.last_attempt = v.parse().map_err(|_| "bad last line")?,
            "error" => s.last_error = v.to_string(),
            "warned" => s.warned = v == "1",
            "sent" | "bounced" | "rcpt-error" => {
                let (addr, reply) = v.split_once(' ').unwrap_or((v, ""));
                if addr.is_empty() {
                    return Err("recipient line without an address");
                }
                match k {
                    "sent" => s.done.push((addr.to_string(), RcptStatus::Sent, reply.to_string())),
                    "bounced" => s.done.push((addr.to_string(), RcptStatus::Bounced, reply.to_string())),
                    _ => s.errors.push((addr.to_string(), reply.to_string())),
                }
            }
            _ => {} // later versions may add fields
        }
    }
    if !attempts {
        return Err("no attempts line");
    }
    Ok(s)
}

/// Fsyncs a directory, so that a rename or create in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` durably: `fill` writes the new content into `tmp` (in
/// the same directory; never through a symlink, mode 0600), which is
/// fsynced and renamed over `path`, then the directory is fsynced. A crash
/// leaves the old file or the new one, never a mix. Blocking.
pub fn replace_file(path: &Path, tmp: &Path, fill: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>) -> io::Result<()> {
    let f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(tmp)?;
    let mut w = io::BufWriter::with_capacity(4096, f);
    fill(&mut w)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    fs::rename(tmp, path)?;
    match path.parent() {
        Some(dir) => fsync_dir(dir),
        None => Ok(()),
    }
}

impl Spool {
    /// The spool at `root`, creating its directories (server side). A
    /// subdirectory that is not one (a file, a dangling symlink, a symlink
    /// to another file system, where renames between them would fail) is
    /// moved aside to `NAME.not-a-directory` (logged) and made anew.
    pub fn create(root: &Path) -> io::Result<Spool> {
        fs::create_dir_all(root).map_err(|e| at(root, e))?;
        let dev = fs::metadata(root).map_err(|e| at(root, e))?.dev();
        // A twentieth of the space and of the inodes at most, so that the
        // pool never makes the free-space or free-inode check refuse mail.
        let (max_bytes, max_files) = disk_space(root).map_or((0, 0), |d| {
            let files = if d.files == 0 { POOL_MAX_FILES } else { usize::try_from(d.files / 20).unwrap_or(POOL_MAX_FILES).min(POOL_MAX_FILES) };
            ((d.total / 20).min(POOL_MAX_BYTES), files)
        });
        let pool = Pool { max_bytes, max_files, ..Default::default() };
        let sp = Spool { root: root.to_path_buf(), pool: std::sync::Arc::new(pool) };
        for d in SUBDIRS {
            sp.ensure_dir(d, dev)?;
        }
        fsync_dir(root).map_err(|e| at(root, e))?;
        Ok(sp)
    }

    fn ensure_dir(&self, d: &str, dev: u64) -> io::Result<()> {
        let p = self.root.join(d);
        let what = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(m) if m.file_type().is_symlink() => match fs::metadata(&p) {
                Ok(t) if t.is_dir() && t.dev() == dev => return Ok(()),
                Ok(t) if t.is_dir() => "a symbolic link to a directory on another file system",
                Ok(_) => "a symbolic link to something that is not a directory",
                Err(_) => "a dangling symbolic link",
            },
            Ok(m) => crate::util::file_kind(m.file_type()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return fs::create_dir(&p).map_err(|e| at(&p, e)),
            Err(e) => return Err(at(&p, e)),
        };
        let aside = unused_name(&self.root, &format!("{d}.not-a-directory"))?;
        fs::rename(&p, &aside).map_err(|e| at(&p, e))?;
        log::warn!(target: MASTER, "warning: {}: {what}, not a directory; moved to {}, new {d}/ made", p.display(), aside.display());
        fs::create_dir(&p).map_err(|e| at(&p, e))
    }

    /// The spool at `root` for reading only (`mailq`, status page).
    pub fn open(root: &Path) -> io::Result<Spool> {
        let q = root.join("queue");
        if !q.is_dir() {
            let what = match fs::symlink_metadata(&q) {
                Ok(m) => format!("{}: not a directory ({})", q.display(), crate::util::file_kind(m.file_type())),
                Err(e) => format!("{}: {e}", q.display()),
            };
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{}: no spool here ({what})", root.display())));
        }
        Ok(Spool { root: root.to_path_buf(), pool: Default::default() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn queue_path(&self, id: &str) -> PathBuf {
        self.root.join("queue").join(id)
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.root.join("state").join(id)
    }

    /// Cleans up after a crash, and makes sure no single bad entry can stop
    /// the server or strand a message. Never fails on one entry: each is
    /// logged with its path and skipped or moved to `corrupt/`; it fails
    /// only if `queue/` itself cannot be listed.
    ///
    /// * `incoming/`: partial messages (never acknowledged) are deleted;
    ///   anything there that is not a regular file is moved to
    ///   `corrupt/NAME.incoming`.
    /// * `free/`: see [`Spool::recover_pool`].
    /// * `queue/`: a queue file that is damaged (length, checksum, header,
    ///   not a regular file) goes to `corrupt/ID` with its state (`ID.state`); one
    ///   that cannot be read (EACCES, EIO) stays where it is, with its state.
    /// * `state/`: a damaged state file (not UTF-8, cut short, bad syntax,
    ///   not a regular file) goes to `corrupt/ID.state`, and its message
    ///   counts as never tried (every recipient pending again); one that
    ///   cannot be read now (EACCES, EIO, EMFILE) stays where it is, and its
    ///   message waits until it can be read (it may record recipients
    ///   already delivered to); temporary files and states without a
    ///   message are deleted (when regular files: they are leftovers of a
    ///   crash).
    pub fn recover(&self) -> io::Result<Recovery> {
        let mut r = Recovery::default();
        // A write probe cut short by the crash: not a partial message.
        for d in PROBED {
            let _ = fs::remove_file(self.root.join(d).join(PROBE));
        }
        let mut changed = self.recover_incoming(&mut r);
        changed |= self.recover_pool(&mut r);
        changed |= self.recover_queue(&mut r)?;
        changed |= self.recover_states(&mut r);
        if changed && let Err(e) = self.sync() {
            log::error!(target: MASTER, "error: spool {}: sync after recovery: {e}", self.root.display());
        }
        Ok(r)
    }

    /// `incoming/` (versions before `free/`): partial messages are removed,
    /// anything else is moved to `corrupt/NAME.incoming`. True when the
    /// spool changed.
    fn recover_incoming(&self, r: &mut Recovery) -> bool {
        let mut changed = false;
        let incoming = self.root.join("incoming");
        match fs::read_dir(&incoming) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let p = e.path();
                    match e.file_type() {
                        Ok(t) if t.is_file() => match fs::remove_file(&p) {
                            Ok(()) => {
                                r.removed_incoming += 1;
                                changed = true;
                            }
                            Err(err) => log::warn!(target: MASTER, "warning: {}: cannot remove partial message: {err}", p.display()),
                        },
                        Ok(t) => {
                            let name = format!("{}.incoming", e.file_name().to_string_lossy());
                            changed |= self.quarantine_logged(&p, &name, &format!("not a regular file ({})", crate::util::file_kind(t)), r);
                        }
                        Err(err) => log::warn!(target: MASTER, "warning: {}: {err}", p.display()),
                    }
                }
            }
            Err(e) => log::error!(target: MASTER, "error: {}: cannot list partial messages: {e}", incoming.display()),
        }
        changed
    }

    /// `queue/`: every queue file checked; a damaged one goes to
    /// `corrupt/` with its state, an unreadable one stays. True when the
    /// spool changed; an error when the queue cannot be listed.
    fn recover_queue(&self, r: &mut Recovery) -> io::Result<bool> {
        let mut changed = false;
        for id in self.ids()? {
            match self.check(&id) {
                Ok(()) => r.queued += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    match self.quarantine(&self.queue_path(&id), &id) {
                        Ok(to) => {
                            log::warn!(target: MASTER, "warning: {id}: queue file damaged ({e}); moved to {}", to.display());
                            r.corrupt.push(id.to_string());
                            changed = true;
                            // Its state goes with it, for the admin: never deleted.
                            let sp = self.state_path(&id);
                            if fs::symlink_metadata(&sp).is_ok() {
                                match self.quarantine(&sp, &format!("{id}.state")) {
                                    Ok(to) => log::warn!(target: MASTER, "warning: {id}: its delivery state {} moved to {}", sp.display(), to.display()),
                                    Err(qe) => log::error!(target: MASTER, "error: {id}: cannot move its delivery state to corrupt/: {qe}"),
                                }
                            }
                        }
                        Err(qe) => {
                            log::error!(target: MASTER, "error: {id}: queue file damaged ({e}); cannot move it to corrupt/: {qe}; left in place");
                            r.unreadable += 1;
                        }
                    }
                }
                Err(e) => {
                    // Intact for all we know, only unreadable now: never moved, never deleted.
                    log::error!(target: MASTER, "error: {id}: cannot read queue file: {e}; left in the queue and tried again later");
                    r.unreadable += 1;
                }
            }
        }
        Ok(changed)
    }

    /// `state/`: leftovers deleted, damaged states moved to
    /// `corrupt/ID.state`, unreadable ones left in place. True when the
    /// spool changed.
    fn recover_states(&self, r: &mut Recovery) -> bool {
        let mut changed = false;
        let state = self.root.join("state");
        match fs::read_dir(&state) {
            Ok(rd) => {
                for e in rd.flatten() {
                    let p = e.path();
                    let os_name = e.file_name();
                    let name = os_name.to_string_lossy();
                    let regular = e.file_type().map(|t| t.is_file()).unwrap_or(false);
                    let what = || format!("not a regular file ({})", e.file_type().map_or("of unknown type", crate::util::file_kind));
                    let has_message = !name.ends_with(".tmp")
                        && valid_queue_id(&name)
                        && fs::symlink_metadata(self.queue_path(&name)).is_ok();
                    if !has_message {
                        // A temporary file or the state of a message that is gone.
                        if regular {
                            match fs::remove_file(&p) {
                                Ok(()) => {
                                    r.orphan_states += 1;
                                    changed = true;
                                }
                                Err(err) => log::warn!(target: MASTER, "warning: {}: cannot remove: {err}", p.display()),
                            }
                        } else {
                            changed |= self.quarantine_logged(&p, &name, &what(), r);
                        }
                        continue;
                    }
                    if let Err(err) = self.read_state(&name) {
                        if err.kind() == io::ErrorKind::NotFound {
                            continue;
                        }
                        if err.kind() != io::ErrorKind::InvalidData {
                            // Perhaps a good state, only unreadable now: the
                            // message waits for it (see `read`), never moved.
                            log::error!(
                                target: MASTER,
                                "error: {name}: cannot read delivery state: {err}; left in place, the message is tried once it can be read"
                            );
                            r.unreadable += 1;
                            continue;
                        }
                        match self.quarantine(&p, &format!("{name}.state")) {
                            Ok(to) => {
                                log::warn!(
                                    target: MASTER,
                                    "warning: {name}: delivery state unusable ({err}); moved to {}; the message counts as never tried: recipients already delivered to may get it again",
                                    to.display()
                                );
                                r.quarantined += 1;
                                changed = true;
                            }
                            Err(qe) => log::error!(target: MASTER, "error: {name}: delivery state unusable ({err}); cannot move it to corrupt/: {qe}"),
                        }
                    }
                }
            }
            Err(e) => log::error!(target: MASTER, "error: {}: cannot list delivery states: {e}", state.display()),
        }
        changed
    }

    /// Takes the files in `free/` into the pool (what is there was never a
    /// committed message: a delivered message's file, or one that was being
    /// written when the server stopped). Anything there that is not a
    /// regular file of ours (a directory, a FIFO, a symlink, a hard link, a
    /// foreign name) is moved to `corrupt/NAME.free`, never written
    /// through; files beyond the pool's limits are unlinked.
    fn recover_pool(&self, r: &mut Recovery) -> bool {
        let dir = self.root.join("free");
        let mut changed = false;
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                log::error!(target: MASTER, "error: {}: cannot list reusable files: {e}", dir.display());
                return false;
            }
        };
        // What the pool held before is found again below (recovery runs at
        // start; a name listed twice would be written by two sessions).
        self.pool.lock().clear();
        let mut found = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            let os_name = e.file_name();
            let name = os_name.to_string_lossy();
            if name == PROBE {
                continue;
            }
            let m = match fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(err) => {
                    log::warn!(target: MASTER, "warning: {}: {err}", p.display());
                    continue;
                }
            };
            let why = match parse_free_name(&name) {
                _ if !m.file_type().is_file() => format!("not a regular file ({})", crate::util::file_kind(m.file_type())),
                _ if m.nlink() != 1 => format!("a file with {} names (hard links): never written through", m.nlink()),
                None => "not a name the spool gives".to_string(),
                Some(n) => {
                    found.push((n, m.len()));
                    continue;
                }
            };
            changed |= self.quarantine_logged(&p, &format!("{name}.free"), &why, r);
        }
        found.sort_unstable();
        let next = found.last().map_or(0, |x| x.0.saturating_add(1));
        self.pool.next.fetch_max(next, Ordering::Relaxed);
        for (n, len) in found {
            if self.pool.room_for(len) {
                self.pool.give(n, len);
                r.pooled += 1;
            } else {
                let p = dir.join(free_name(n));
                match fs::remove_file(&p) {
                    Ok(()) => changed = true,
                    Err(err) => log::warn!(target: MASTER, "warning: {}: cannot remove: {err}", p.display()),
                }
            }
        }
        changed
    }

    /// Moves `from` into `corrupt/` as `name`, or `name.1`, `name.2`, ... :
    /// never over an existing entry. Returns where it went.
    pub fn quarantine(&self, from: &Path, name: &str) -> io::Result<PathBuf> {
        let to = unused_name(&self.root.join("corrupt"), name)?;
        fs::rename(from, &to).map_err(|e| at(from, e))?;
        Ok(to)
    }

    /// [`Spool::quarantine`] with the log line; true if the entry moved.
    fn quarantine_logged(&self, from: &Path, name: &str, why: &str, r: &mut Recovery) -> bool {
        match self.quarantine(from, name) {
            Ok(to) => {
                log::warn!(target: MASTER, "warning: {}: {why}; moved to {}", from.display(), to.display());
                r.quarantined += 1;
                true
            }
            Err(e) => {
                log::error!(target: MASTER, "error: {}: {why}; cannot move it to corrupt/: {e}; left in place", from.display());
                false
            }
        }
    }

    /// Moves a message's unusable delivery state to `corrupt/ID.state`
    /// (the scheduler does so before it writes a new one).
    pub fn quarantine_state(&self, id: &str) -> io::Result<PathBuf> {
        self.quarantine(&self.state_path(id), &format!("{id}.state"))
    }

    /// IDs of the committed messages, oldest first (IDs start with the time).
    /// Names that are not queue IDs are ignored (as Postfix's qmgr does).
    pub fn ids(&self) -> io::Result<Vec<QueueId>> {
        let mut v = Vec::new();
        let dir = self.root.join("queue");
        for e in fs::read_dir(&dir).map_err(|e| at(&dir, e))?.flatten() {
            let name = e.file_name();
            if let Some(s) = name.to_str()
                && valid_queue_id(s)
                && let Ok(id) = QueueId::try_from(s)
            {
                v.push(id);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Opens a queue file and reads its envelope header, checking that the
    /// file is complete (its length matches the header: a torn file is
    /// never listed or delivered as if whole) and belongs to `id` (a file
    /// copied under another name would make the scheduler act on the other
    /// message's files). Damage is an `InvalidData` error naming the path.
    #[allow(clippy::type_complexity)]
    fn open_queue_file(&self, id: &str, capacity: usize) -> io::Result<(BufReader<File>, Envelope, u64, u64, Check)> {
        let path = self.queue_path(id);
        let f = open_regular(&path)?;
        let file_len = f.metadata().map_err(|e| at(&path, e))?.len();
        let mut rd = BufReader::with_capacity(capacity, f);
        let (env, size, header_len, check) = read_header(&mut rd).map_err(|e| at(&path, e))?;
        if env.id.as_str() != id {
            return Err(invalid(format!("{}: header names another queue ID ({})", path.display(), env.id)));
        }
        if header_len.checked_add(size) != Some(file_len) {
            return Err(invalid(format!(
                "{}: header says {} bytes of message, file holds {}",
                path.display(),
                size,
                file_len.saturating_sub(header_len)
            )));
        }
        Ok((rd, env, size, header_len, check))
    }

    /// Verifies that a queue file is complete, and where its header has a
    /// checksum, that its envelope and data match it: a file reused for a
    /// message that was never acknowledged may, after a power loss, hold
    /// the new header over the old message's data (overwrites in place are
    /// not ordered with the rename into `queue/`). Reads the header and at
    /// most [`CHECK_SPAN`] bytes of the message.
    fn check(&self, id: &str) -> io::Result<()> {
        let (rd, _, size, header_len, check) = self.open_queue_file(id, 1024)?;
        let Some((want, length_at)) = check else { return Ok(()) };
        let path = self.queue_path(id);
        let f = rd.into_inner();
        let mut sum = Adler::new();
        let mut buf = vec![0u8; 4096];
        for (mut pos, end) in [(0, length_at), (header_len, header_len + size.min(CHECK_SPAN))] {
            while pos < end {
                let n = ((end - pos).min(buf.len() as u64)) as usize;
                f.read_exact_at(&mut buf[..n], pos).map_err(|e| at(&path, e))?;
                sum.update(&buf[..n]);
                pos += n as u64;
            }
        }
        if sum.value() != want {
            return Err(invalid(format!("{}: checksum mismatch (header says {want:08x}, content gives {:08x})", path.display(), sum.value())));
        }
        Ok(())
    }

    /// Starts a new message: takes a file from `free/` (a delivered
    /// message's, see [`Spool::remove`]), or creates one there when none is
    /// left, and writes the envelope into it from its start.
    /// (A queue ID in use is refused by [`SpoolWriter::finish`], which
    /// never renames over an existing entry.)
    pub fn begin(&self, env: &Envelope) -> io::Result<SpoolWriter> {
        let mut header = String::with_capacity(256 + 64 * env.recipients.len());
        let mut put = |line: &str| -> io::Result<()> {
            if line.contains('\n') || line.contains('\r') {
                return Err(invalid("newline in envelope field".into()));
            }
            header.push_str(line);
            header.push('\n');
            Ok(())
        };
        put(MAGIC)?;
        put(&format!("id {}", env.id))?;
        put(&format!("arrival {}", env.arrival))?;
        put(&format!("client {}", env.client))?;
        put(&format!("helo {}", env.helo))?;
        put(&format!("from {}", env.sender))?;
        if env.body_8bit {
            put("body 8BITMIME")?;
        }
        if env.smtputf8 {
            put("smtputf8 yes")?;
        }
        if !env.ret.is_empty() {
            put(&format!("dsn-ret {}", env.ret))?;
        }
        if !env.envid.is_empty() {
            put(&format!("dsn-envid {}", env.envid))?;
        }
        for (i, r) in env.recipients.iter().enumerate() {
            put(&format!("rcpt {r}"))?;
            // DSN parameters of the recipient just named (older versions
            // skip these lines).
            if let Some(d) = env.dsn.get(i) {
                if !d.notify.is_empty() {
                    put(&format!("rcpt-notify {}", d.notify))?;
                }
                if !d.orcpt.is_empty() {
                    put(&format!("rcpt-orcpt {}", d.orcpt))?;
                }
            }
        }
        // The checksum covers the header up to here, then the data.
        let mut sum = Adler::new();
        sum.update(header.as_bytes());
        let len_offset = (header.len() + "length ".len()) as u64;
        header.push_str(&format!("length {:0LEN_WIDTH$}\ncheck 00000000\n\n", 0));
        let (name, file, old_len) = self.take_file()?;
        let path = self.root.join("free").join(free_name(name));
        // The header stays in memory with the first data: a message that
        // fits FILE_BUF is written with one write(2), its length and
        // checksum filled in before (no pwrite).
        let mut buf = Vec::with_capacity(FILE_BUF);
        buf.extend_from_slice(header.as_bytes());
        Ok(SpoolWriter {
            file,
            buf,
            header_out: false,
            path,
            queue_path: self.queue_path(&env.id),
            len_offset,
            size: 0,
            header_len: header.len() as u64,
            sum,
            slot: Some((name, old_len)),
            pool: self.pool.clone(),
        })
    }

    /// A file of `free/` to write a message into, with its number and
    /// length: one from the pool, else a new one (`O_EXCL`). A pool file
    /// that is no longer a regular file with one name (replaced by a
    /// directory, a FIFO, a symlink or a hard link, or gone) is left alone
    /// and the next is tried: start-up quarantines what is there.
    fn take_file(&self) -> io::Result<(u32, File, u64)> {
        let dir = self.root.join("free");
        if self.pool.lock().len() < POOL_LOW && self.pool.max_bytes > 0 {
            self.refill();
        }
        while let Some((n, len)) = self.pool.take() {
            let p = dir.join(free_name(n));
            let f = OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&p);
            match f.and_then(|f| f.metadata().map(|m| (f, m))) {
                Ok((f, m)) if m.is_file() && m.nlink() == 1 => return Ok((n, f, m.len())),
                Ok((_, m)) => log::warn!(
                    target: MASTER,
                    "warning: {}: reusable file replaced by {} ({} names); not used",
                    p.display(),
                    crate::util::file_kind(m.file_type()),
                    m.nlink()
                ),
                // ELOOP: a symlink; ENXIO: a FIFO or socket; EISDIR; the
                // file gone (not its directory: see below).
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENXIO) | Some(libc::EISDIR))
                        || (e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())) =>
                {
                    log::warn!(target: MASTER, "warning: {}: reusable file unusable: {e}; not used", p.display())
                }
                // The directory or the disk (ENOTDIR, EACCES, EIO): the
                // file stays in the pool, this message fails.
                Err(e) => {
                    self.pool.give(n, len);
                    return Err(at(&p, e));
                }
            }
        }
        // create_new (O_EXCL) never follows a symlink nor opens what exists
        // (a name taken already: after 2^32 names they wrap).
        let mut tries = 0;
        loop {
            let n = self.pool.new_name();
            let p = dir.join(free_name(n));
            match OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => return Ok((n, f, 0)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
                Err(e) => return Err(at(&p, e)),
            }
        }
    }

    /// Creates [`POOL_BATCH`] empty files in `free/` for the pool, on a
    /// blocking thread, so that a burst of mail after the pool ran dry does
    /// not create files on its sessions' path. At most one refill at a
    /// time; none outside a runtime (tests, `mailq`). A failure only ends
    /// the refill: [`Spool::take_file`] creates a file itself if the pool is
    /// empty, and reports what fails then. The new files need no sync of
    /// their own: the commit of the first message written into one makes
    /// its creation durable too (one `syncfs`).
    fn refill(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if self.pool.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.pool.clone();
        let dir = self.root.join("free");
        rt.spawn_blocking(move || {
            for _ in 0..POOL_BATCH {
                if !pool.room_for(0) {
                    break;
                }
                let n = pool.new_name();
                if OpenOptions::new().write(true).create_new(true).open(dir.join(free_name(n))).is_err() {
                    break;
                }
                pool.give(n, 0);
            }
            pool.refilling.store(false, Ordering::SeqCst);
        });
    }

    /// Makes everything written to the spool durable (one `syncfs`).
    ///
    /// For one-off syncs (recovery, tests). The committer keeps its own
    /// descriptor instead: see [`syncfs`].
    pub fn sync(&self) -> io::Result<()> {
        let q = self.root.join("queue");
        syncfs(&File::open(&q).map_err(|e| at(&q, e))?)
    }

    /// Reads a queued message's envelope and state (no body). A damaged
    /// state does not fail the read: see [`QueuedMessage::state_error`]. A
    /// state that cannot be read for a passing reason (EACCES, EIO, EMFILE:
    /// any error but `InvalidData` and `NotFound`) fails it, as an
    /// unreadable queue file does: taking the state as lost would send the
    /// message again to recipients it records as done.
    pub fn read(&self, id: &str) -> io::Result<QueuedMessage> {
        let (_, env, size, _, _) = self.open_queue_file(id, 1024)?;
        let (state, state_error) = match self.read_state(id) {
            Ok(s) => (s, None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => (DeliveryState::default(), Some(e.to_string())),
            Err(e) => return Err(e),
        };
        let recipients = env
            .recipients
            .iter()
            .map(|a| {
                if let Some((_, st, reply)) = state.done.iter().find(|(r, _, _)| r == a) {
                    Recipient { addr: a.clone(), status: *st, error: reply.clone() }
                } else {
                    let error = state.errors.iter().find(|(r, _)| r == a).map(|(_, e)| e.clone()).unwrap_or_default();
                    Recipient { addr: a.clone(), status: RcptStatus::Pending, error }
                }
            })
            .collect();
        Ok(QueuedMessage { env, size, state, recipients, state_error })
    }

    /// Every queued message, oldest first, and the queue files that could
    /// not be read (ID, reason): one bad file never fails the listing.
    /// Messages that vanish while the list is read (delivered meanwhile)
    /// are skipped.
    #[allow(clippy::type_complexity)]
    pub fn list(&self) -> io::Result<(Vec<QueuedMessage>, Vec<(QueueId, String)>)> {
        let mut out = Vec::new();
        let mut bad = Vec::new();
        for id in self.ids()? {
            match self.read(&id) {
                Ok(m) => out.push(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => bad.push((id, e.to_string())),
            }
        }
        Ok((out, bad))
    }

    /// Arrival time and exact message size of a queued message, from its
    /// envelope header alone (no state file, no recipient bookkeeping): what
    /// counting a large queue needs.
    pub fn summary(&self, id: &str) -> io::Result<(u64, u64)> {
        let (_, env, size, _, _) = self.open_queue_file(id, 512)?;
        Ok((env.arrival, size))
    }

    /// Opens the message data of a queued message, positioned at its start.
    pub fn open_data(&self, id: &str) -> io::Result<(BufReader<File>, u64)> {
        let (rd, _, size, header_len, _) = self.open_queue_file(id, 4096)?;
        let mut f = rd.into_inner();
        f.seek(SeekFrom::Start(header_len)).map_err(|e| at(&self.queue_path(id), e))?;
        Ok((BufReader::with_capacity(4096, f), size))
    }

    /// The delivery state of a message (default when none was written yet).
    /// Any other failure is an error naming the path: `InvalidData` when the
    /// state is damaged (not a regular file, not UTF-8, cut short, bad
    /// syntax, too big), which callers treat as lost; any other kind when
    /// it could not be read (EACCES, EIO), which they treat as unreadable.
    pub fn read_state(&self, id: &str) -> io::Result<DeliveryState> {
        let path = self.state_path(id);
        let f = match open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DeliveryState::default()),
            Err(e) => return Err(e),
        };
        let mut buf = Vec::with_capacity(256);
        f.take(MAX_STATE + 1).read_to_end(&mut buf).map_err(|e| at(&path, e))?;
        parse_state(&buf).map_err(|why| invalid(format!("{}: damaged delivery state: {why}", path.display())))
    }

    /// Replaces the delivery state (write to a temporary file, rename).
    /// `durable` fsyncs it: needed when recipients were marked done, so a
    /// crash does not deliver them twice; not needed for a retry time.
    pub fn write_state(&self, id: &str, s: &DeliveryState, durable: bool) -> io::Result<()> {
        let clean = |t: &str| t.replace(['\r', '\n'], " ");
        let mut text = format!(
            "attempts {}\nnext {}\nlast {}\nerror {}\n",
            s.attempts,
            s.next_attempt,
            s.last_attempt,
            clean(&s.last_error)
        );
        if s.warned {
            text.push_str("warned 1\n");
        }
        for (a, st, reply) in &s.done {
            let k = if *st == RcptStatus::Sent { "sent" } else { "bounced" };
            text.push_str(&format!("{k} {a} {}\n", clean(reply)));
        }
        for (a, e) in &s.errors {
            text.push_str(&format!("rcpt-error {a} {}\n", clean(e)));
        }
        let dir = self.root.join("state");
        let tmp = dir.join(format!("{id}.tmp"));
        // A leftover (or planted) temporary is unlinked first, and the new
        // one made with O_EXCL: a symlink there is never written through.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(at(&tmp, e)),
            _ => {}
        }
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| at(&tmp, e))?;
        let written = f.write_all(text.as_bytes()).and_then(|_| if durable { f.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(at(&tmp, e));
        }
        let path = self.state_path(id);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(at(&path, e));
        }
        if durable {
            fsync_dir(&dir).map_err(|e| at(&dir, e))?;
        }
        Ok(())
    }

    /// Removes a message whose every recipient is done. Fails only if the
    /// queue file could not be removed (the message would be delivered
    /// again after a restart); a state file left behind is only logged:
    /// start-up removes it as an orphan.
    ///
    /// The queue file is renamed into `free/` for a later message to be
    /// written into (no inode to allocate then) while the pool has room;
    /// else, or if the rename fails, it is unlinked.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        let q = self.queue_path(id);
        let len = fs::symlink_metadata(&q).ok().filter(|m| m.is_file() && m.nlink() == 1).map(|m| m.len());
        let recycled = match len {
            Some(len) if self.pool.room_for(len) => {
                let n = self.pool.new_name();
                // Never over a file of the pool (names wrap after 2^32).
                match rename_noreplace(&q, &self.root.join("free").join(free_name(n))) {
                    Ok(()) => {
                        self.pool.give(n, len);
                        true
                    }
                    Err(_) => false,
                }
            }
            _ => false,
        };
        if !recycled {
            fs::remove_file(&q).map_err(|e| at(&q, e))?;
        }
        let sp = self.state_path(id);
        match fs::remove_file(&sp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                log::warn!(target: crate::logging::QMGR, "warning: {id}: cannot remove delivery state {}: {e}", sp.display());
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks that the spool can be written: in each of [`PROBED`], creates
    /// a file, writes and syncs it, removes it and syncs the directory.
    /// Returns each directory's result (in the order of [`PROBED`]): the
    /// scheduler tells a full file system (removals still work) from one
    /// that cannot record anything. Blocking, and on a failing disk it may
    /// block for long: run it off the runtime (the scheduler's prober does).
    pub fn probe(&self) -> [io::Result<()>; 3] {
        PROBED.map(|d| self.probe_dir(d))
    }

    fn probe_dir(&self, d: &str) -> io::Result<()> {
        let dir = self.root.join(d);
        let p = dir.join(PROBE);
        let _ = fs::remove_file(&p);
        let mut f = OpenOptions::new().write(true).create_new(true).open(&p).map_err(|e| at(&p, e))?;
        let r = f.write_all(b"x\n").and_then(|_| f.sync_data());
        drop(f);
        let removed = fs::remove_file(&p);
        r.map_err(|e| at(&p, e))?;
        removed.map_err(|e| at(&p, e))?;
        fsync_dir(&dir).map_err(|e| at(&dir, e))
    }

    /// Space on the spool's file system.
    pub fn disk_space(&self) -> io::Result<DiskSpace> {
        disk_space(&self.root)
    }
}

/// Free inodes the spool keeps in reserve: below it, MAIL gets 452.
///
/// Every message needs an inode for its queue file and, once tried, one
/// for its delivery state (and briefly one more for the state's temporary
/// file). What must never fail for lack of an inode: the queue file of
/// every session that already passed MAIL (`max_connections`), and, per
/// delivery connection, what recording one outcome can take (a state file,
/// its temporary, and a bounce: queue file, state, temporary = 5); plus 100
/// for the spool's own files (lock, control socket, write probes) and the
/// first deferrals of messages queued meanwhile. Default: 100 + 20 + 5 * 4
/// = 140 inodes, about 0.01 % of a small ext4 file system.
pub fn inode_reserve(max_connections: usize, delivery_connections: usize) -> u64 {
    100u64.saturating_add(max_connections as u64).saturating_add(5u64.saturating_mul(delivery_connections as u64))
}

/// A name under `dir` that nothing has yet: `name`, else `name.1`, `name.2` ...
fn unused_name(dir: &Path, name: &str) -> io::Result<PathBuf> {
    for n in 0..1000u32 {
        let p = if n == 0 { dir.join(name) } else { dir.join(format!("{name}.{n}")) };
        match fs::symlink_metadata(&p) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(at(&p, e)),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: 1000 entries named {name}.N already", dir.display())))
}

/// The checksum a queue file's header gives (files from versions before
/// it have none): its value, and the offset of the `length` line, where
/// the bytes it covers in the header end (see [`Spool::begin`]).
type Check = Option<(u32, u64)>;

/// Reads and parses the envelope header; returns it, the message length,
/// the header length in bytes and its checksum.
fn read_header<R: BufRead>(rd: &mut R) -> io::Result<(Envelope, u64, u64, Check)> {
    let mut env = Envelope::default();
    let mut size: Option<u64> = None;
    let mut check: Option<u32> = None;
    let mut length_at = 0u64;
    let mut header_len = 0u64;
    let mut line = Vec::with_capacity(128);
    let mut first = true;
    loop {
        line.clear();
        let n = rd.by_ref().take(MAX_HEADER_LINE as u64).read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(invalid("envelope header cut short".into()));
        }
        let line_at = header_len;
        header_len += n as u64;
        line.pop();
        let text = std::str::from_utf8(&line).map_err(|_| invalid("envelope header is not UTF-8".into()))?;
        if first {
            if text != MAGIC {
                return Err(invalid("not a Bartleby queue file".into()));
            }
            first = false;
            continue;
        }
        if text.is_empty() {
            break;
        }
        let (k, v) = text.split_once(' ').unwrap_or((text, ""));
        match k {
            "id" => env.id = QueueId::try_from(v).map_err(|_| invalid("bad id".into()))?,
            "arrival" => env.arrival = v.parse().map_err(|_| invalid("bad arrival".into()))?,
            "client" => env.client = v.to_string(),
            "helo" => env.helo = v.to_string(),
            "from" => env.sender = v.to_string(),
            "body" => env.body_8bit = v == "8BITMIME",
            "smtputf8" => env.smtputf8 = v == "yes",
            "rcpt" => env.recipients.push(v.to_string()),
            "dsn-ret" => env.ret = v.to_string(),
            "dsn-envid" => env.envid = v.to_string(),
            "rcpt-notify" | "rcpt-orcpt" if !env.recipients.is_empty() => {
                env.dsn.resize(env.recipients.len(), Default::default());
                if let Some(d) = env.dsn.last_mut() {
                    if k == "rcpt-notify" {
                        d.notify = v.to_string();
                    } else {
                        d.orcpt = v.to_string();
                    }
                }
            }
            "length" => {
                size = Some(v.parse().map_err(|_| invalid("bad length".into()))?);
                length_at = line_at;
            }
            "check" => {
                if v.len() != 8 {
                    return Err(invalid("bad check".into()));
                }
                check = Some(u32::from_str_radix(v, 16).map_err(|_| invalid("bad check".into()))?);
            }
            _ => {} // later versions may add fields
        }
    }
    let size = size.ok_or_else(|| invalid("no length in header".into()))?;
    Ok((env, size, header_len, check.map(|c| (c, length_at))))
}

/// A message being written into a file of `free/`.
pub struct SpoolWriter {
    file: File,
    /// Bytes not yet written to `file`: the header and the first data
    /// until FILE_BUF is reached.
    buf: Vec<u8>,
    /// The header has gone to the file (the message outgrew FILE_BUF):
    /// length and checksum are then written into it in place at the end.
    header_out: bool,
    path: PathBuf,
    queue_path: PathBuf,
    len_offset: u64,
    size: u64,
    header_len: u64,
    sum: Adler,
    /// The file's number in `free/` and its length before, until it moves
    /// to `queue/`; given back to the pool if the message is not finished.
    slot: Option<(u32, u64)>,
    pool: std::sync::Arc<Pool>,
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        // Never renamed into queue/: the file is still in free/, whatever
        // it holds (a partial message is never read from there).
        if let Some((n, len)) = self.slot.take() {
            let written = self.header_len + self.size;
            if written.max(len) <= RECYCLE_MAX_FILE {
                self.pool.give(n, len.max(written));
            } else {
                // A large partial (a message refused as too big) would hold
                // its space in free/ until reused.
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl SpoolWriter {
    /// Appends message data.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.buf.len() + data.len() > FILE_BUF {
            self.file.write_all(&self.buf)?;
            self.buf.clear();
            self.header_out = true;
        }
        if data.len() >= FILE_BUF {
            self.file.write_all(data)?;
        } else {
            self.buf.extend_from_slice(data);
        }
        if self.size < CHECK_SPAN {
            let n = (CHECK_SPAN - self.size).min(data.len() as u64) as usize;
            self.sum.update(&data[..n]);
        }
        self.size += data.len() as u64;
        Ok(())
    }

    /// Bytes of message data written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Completes the file (length and checksum into the header; a longer
    /// file, reused, cut to this message's end) and moves it into `queue/`.
    /// The message is not yet durable: the caller must wait for
    /// [`Committer::commit`] before "250". On failure the file stays in
    /// `free/`, never half in the queue.
    pub fn finish(mut self) -> io::Result<u64> {
        let commit = format!("{:0LEN_WIDTH$}\ncheck {:08x}", self.size, self.sum.value());
        let at_len = self.len_offset as usize;
        if self.header_out {
            self.file.write_all(&self.buf).map_err(|e| at(&self.path, e))?;
            self.file.write_all_at(commit.as_bytes(), self.len_offset).map_err(|e| at(&self.path, e))?;
        } else {
            // All of it still here: the header completed, then one write.
            self.buf[at_len..at_len + commit.len()].copy_from_slice(commit.as_bytes());
            self.file.write_all(&self.buf).map_err(|e| at(&self.path, e))?;
        }
        self.buf = Vec::new();
        let f = &self.file;
        let end = self.header_len + self.size;
        if self.slot.is_some_and(|(_, old)| old > end) {
            f.set_len(end).map_err(|e| at(&self.path, e))?;
        }
        rename_noreplace(&self.path, &self.queue_path).map_err(|e| at(&self.queue_path, e))?;
        self.slot = None;
        Ok(self.size)
    }

    /// Throws the partial message away: its file goes back to the pool.
    pub fn abort(self) {}
}

/// Renames `from` to `to` unless `to` exists (`renameat2` with
/// `RENAME_NOREPLACE`: one atomic call). On a kernel or file system without
/// it, checks first and renames (not atomic, as before it).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("NUL in path".into()));
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths we own; renameat2 only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "queue ID in use"));
    }
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(e);
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "queue ID in use"));
    }
    fs::rename(from, to)
}

/// `syncfs(2)` on the file system holding `fd`.
///
/// It reports a writeback error (EIO, ENOSPC on thin storage) that happened
/// on that file system since the previous `syncfs` through the *same* open
/// file, or since it was opened: the kernel keeps one error cursor per open
/// file (errseq). A descriptor opened just for the call would only see
/// errors from that instant on, so one that struck between two commits,
/// while a message's pages were written back early, would pass unseen.
pub fn syncfs(fd: &File) -> io::Result<()> {
    // SAFETY: syncfs takes a valid open descriptor, owned by `fd`.
    let rc = unsafe { libc::syncfs(fd.as_raw_fd()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Group commit: sessions that finished a message ask for a sync and wait;
/// one `syncfs` on a blocking thread serves all who asked before it began.
///
/// A writeback error is reported by one `syncfs` only, and not necessarily
/// the one its message waits on: the kernel may write a long message's pages
/// back early, fail, and tell the next commit, which belongs to some other
/// session. So every failed sync is counted, and a message commits only if
/// no sync failed between its [`Committer::ticket`] (taken before its file
/// was created) and its own successful sync. A false alarm costs the client
/// a 451 and a retry; a missed one would cost a message.
#[derive(Clone)]
pub struct Committer {
    tx: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<Result<(), String>>>,
    failures: std::sync::Arc<AtomicU32>,
}

/// The committer's failure count when a message's file was begun.
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u32);

impl Committer {
    /// Starts the committer task on the current runtime. It opens the queue
    /// directory once, before any message is written, and syncs through
    /// that descriptor for the life of the server (see [`syncfs`]).
    pub fn start(spool: &Spool) -> io::Result<Committer> {
        let fd = File::open(spool.root.join("queue"))?;
        Ok(Committer::with_sync(move || syncfs(&fd)))
    }

    /// The committer with its sync operation given (tests inject failures).
    fn with_sync(sync: impl Fn() -> io::Result<()> + Send + Sync + 'static) -> Committer {
        let sync = std::sync::Arc::new(sync);
        let failures = std::sync::Arc::new(AtomicU32::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<Result<(), String>>>();
        let count = failures.clone();
        tokio::spawn(async move {
            let mut waiters = Vec::new();
            while let Some(first) = rx.recv().await {
                waiters.push(first);
                while let Ok(w) = rx.try_recv() {
                    waiters.push(w);
                }
                let sync = sync.clone();
                let res = tokio::task::spawn_blocking(move || sync())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()));
                if let Err(e) = &res {
                    // Counted before anyone hears of it, so that every
                    // message begun earlier and committed later sees it.
                    count.fetch_add(1, Ordering::SeqCst);
                    log::error!("spool sync failed: {e}");
                }
                for w in waiters.drain(..) {
                    let _ = w.send(res.clone());
                }
            }
        });
        Committer { tx, failures }
    }

    /// Taken before a message's queue file is created; handed to
    /// [`Committer::commit`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.failures.load(Ordering::SeqCst))
    }

    /// Waits until everything written before this call is on stable storage.
    /// Fails if this sync failed, or if any sync failed since `since`: a
    /// writeback error in between may have struck this message's pages.
    pub async fn commit(&self, since: Ticket) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(tx).map_err(|_| "committer stopped".to_string())?;
        rx.await.map_err(|_| "committer stopped".to_string())??;
        if self.failures.load(Ordering::SeqCst) != since.0 {
            return Err("an earlier spool sync failed while this message was being written".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writeback error reported to another message's sync still fails
    /// every message begun before it; messages begun after it commit.
    #[test]
    fn committer_failure_reaches_messages_begun_before_it() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let fail_next = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = fail_next.clone();
            let c = Committer::with_sync(move || {
                if flag.swap(false, Ordering::SeqCst) { Err(io::Error::from_raw_os_error(libc::EIO)) } else { Ok(()) }
            });
            let long = c.ticket(); // a long message begins
            let short = c.ticket(); // a short one begins and finishes first
            fail_next.store(true, Ordering::SeqCst);
            // glibc and musl word EIO differently.
            let eio = io::Error::from_raw_os_error(libc::EIO).to_string();
            assert!(c.commit(short).await.unwrap_err().contains(&eio));
            // The long message's own sync succeeds, yet it must not be acknowledged.
            assert!(c.commit(long).await.unwrap_err().contains("earlier spool sync failed"));
            let later = c.ticket();
            assert_eq!(c.commit(later).await, Ok(()));
        });
    }

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("bartleby-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn env(id: &str) -> Envelope {
        Envelope {
            id: QueueId::try_from(id).unwrap(),
            arrival: 1_795_320_958,
            client: "mx.sender.test[192.0.2.1]".into(),
            helo: "mx.sender.test".into(),
            sender: "alice@sender.test".into(),
            body_8bit: true,
            smtputf8: false,
            recipients: vec!["bob@example.org".into(), "carol@example.org".into()],
            ..Default::default()
        }
    }

    /// A queue file and state written by the version before DSN (no
    /// dsn-*/rcpt-* lines, no `warned`) still read: no DSN parameters.
    #[test]
    fn reads_a_queue_file_from_before_dsn() {
        let root = tmp("old");
        let sp = Spool::create(&root).unwrap();
        let body = b"Subject: old\r\n\r\nbody\r\n";
        let mut f = format!(
            "BARTLEBY-QUEUE 1\nid AAAA000000009\narrival 1795320958\nclient mx.sender.test[192.0.2.1]\nhelo mx.sender.test\nfrom alice@sender.test\nbody 8BITMIME\nrcpt bob@example.org\nrcpt carol@example.org\nlength {:020}\n\n",
            body.len()
        )
        .into_bytes();
        f.extend_from_slice(body);
        fs::write(root.join("queue/AAAA000000009"), f).unwrap();
        fs::write(root.join("state/AAAA000000009"), "attempts 1\nnext 0\nlast 5\nerror 421 x\nsent bob@example.org 250 ok\n").unwrap();
        let m = sp.read("AAAA000000009").unwrap();
        assert_eq!(m.env, env("AAAA000000009"));
        assert!(m.env.ret.is_empty() && m.env.envid.is_empty() && m.env.dsn.is_empty());
        assert!(m.env.dsn_of("carol@example.org").is_empty());
        assert!(!m.state.warned);
        assert_eq!(m.pending().count(), 1);
        // And the new fields round-trip.
        let mut e = env("AAAA00000000A");
        e.ret = "FULL".into();
        e.envid = "QQ+2B1".into();
        e.dsn = vec![Default::default(), crate::dsn::RcptDsn { notify: "SUCCESS,DELAY".into(), orcpt: "rfc822;c+40x".into() }];
        sp.begin(&e).unwrap().finish().unwrap();
        let back = sp.read("AAAA00000000A").unwrap().env;
        assert_eq!(back.dsn_of("carol@example.org").notify, "SUCCESS,DELAY");
        assert!(back.dsn_of("bob@example.org").is_empty());
        assert_eq!((back.ret.as_str(), back.envid.as_str()), ("FULL", "QQ+2B1"));
        let st = DeliveryState { attempts: 1, warned: true, ..Default::default() };
        sp.write_state("AAAA00000000A", &st, false).unwrap();
        assert!(sp.read_state("AAAA00000000A").unwrap().warned);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn smtputf8_flag_is_kept_and_old_files_read_without_it() {
        let root = tmp("utf8");
        let sp = Spool::create(&root).unwrap();
        let mut e = env("AAAA000000009");
        e.smtputf8 = true;
        e.sender = "jörg@sender.test".into();
        e.recipients = vec!["müller@bücher.example".into()];
        let mut w = sp.begin(&e).unwrap();
        w.write("Subject: Grüße\r\n\r\nü\r\n".as_bytes()).unwrap();
        w.finish().unwrap();
        assert_eq!(sp.read("AAAA000000009").unwrap().env, e);
        // A queue file as the version before SMTPUTF8 wrote it.
        let data = b"Subject: old\r\n\r\nbody\r\n";
        let head = format!(
            "{MAGIC}\nid AAAA00000000A\narrival 1795320958\nclient c[192.0.2.1]\nhelo c.test\nfrom alice@sender.test\nbody 8BITMIME\nrcpt bob@example.org\nlength {:0LEN_WIDTH$}\n\n",
            data.len()
        );
        let mut f = head.into_bytes();
        f.extend_from_slice(data);
        fs::write(root.join("queue").join("AAAA00000000A"), f).unwrap();
        let m = sp.read("AAAA00000000A").unwrap();
        assert!(!m.env.smtputf8);
        assert!(m.env.body_8bit);
        assert_eq!(m.env.recipients, vec!["bob@example.org".to_string()]);
        assert_eq!(m.size, data.len() as u64);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn write_read_list_remove() {
        let root = tmp("wr");
        let sp = Spool::create(&root).unwrap();
        let mut w = sp.begin(&env("AAAA000000001")).unwrap();
        w.write(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
        assert_eq!(w.finish().unwrap(), 21);
        sp.sync().unwrap();
        let m = sp.read("AAAA000000001").unwrap();
        assert_eq!(m.env, env("AAAA000000001"));
        assert_eq!(m.size, 21);
        assert_eq!(m.pending().count(), 2);
        let (mut rd, n) = sp.open_data("AAAA000000001").unwrap();
        let mut body = Vec::new();
        rd.read_to_end(&mut body).unwrap();
        assert_eq!(n, 21);
        assert_eq!(body, b"Subject: hi\r\n\r\nbody\r\n");

        let st = DeliveryState {
            attempts: 2,
            next_attempt: 99,
            last_attempt: 98,
            last_error: "421 4.3.2 busy".into(),
            done: vec![("bob@example.org".into(), RcptStatus::Sent, "250 ok".into())],
            errors: vec![("carol@example.org".into(), "450 4.2.1 mailbox busy".into())],
            warned: false,
        };
        sp.write_state("AAAA000000001", &st, true).unwrap();
        let m = sp.read("AAAA000000001").unwrap();
        assert_eq!(m.state, st);
        assert_eq!(m.recipients[0].status, RcptStatus::Sent);
        assert_eq!(m.recipients[1].error, "450 4.2.1 mailbox busy");
        assert_eq!(sp.list().unwrap().0.len(), 1);
        sp.remove("AAAA000000001").unwrap();
        assert!(sp.list().unwrap().0.is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn recover_cleans_partial_and_truncated() {
        let root = tmp("rec");
        let sp = Spool::create(&root).unwrap();
        // Partial: never finished (crash during DATA).
        let mut w = sp.begin(&env("AAAA000000002")).unwrap();
        w.write(b"half a mess").unwrap();
        // A crash: the writer never returns its file to the pool.
        std::mem::forget(w);
        // Complete.
        let mut w = sp.begin(&env("AAAA000000003")).unwrap();
        w.write(b"x\r\n").unwrap();
        w.finish().unwrap();
        // Committed, then truncated (a torn write).
        let mut w = sp.begin(&env("AAAA000000004")).unwrap();
        w.write(b"0123456789\r\n").unwrap();
        w.finish().unwrap();
        let f = OpenOptions::new().write(true).open(root.join("queue/AAAA000000004")).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - 4).unwrap();
        // Orphan state.
        fs::write(root.join("state/AAAA000000009"), "attempts 1\n").unwrap();
        // A partial message the version before left in incoming/.
        fs::write(root.join("incoming/AAAA000000008"), "BARTLEBY-QUEUE 1\nid AAAA000000008\n").unwrap();
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!(r.removed_incoming, 1);
        // The partial message stays in free/, for reuse; never in queue/.
        assert_eq!(r.pooled, 1);
        assert_eq!(fs::read_dir(root.join("free")).unwrap().count(), 1);
        assert_eq!(r.queued, 1);
        assert_eq!(r.corrupt, vec!["AAAA000000004".to_string()]);
        assert_eq!(r.orphan_states, 1);
        assert!(root.join("corrupt/AAAA000000004").exists());
        assert_eq!(sp.ids().unwrap().len(), 1);
        fs::remove_dir_all(root).unwrap();
    }

    fn queued(sp: &Spool, id: &str) {
        let mut w = sp.begin(&env(id)).unwrap();
        w.write(b"Subject: x\r\n\r\nbody\r\n").unwrap();
        w.finish().unwrap();
    }

    fn mkfifo(p: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Nothing blocks and nothing is followed: a FIFO, a symlink (even to a
    /// good file), a directory are refused at once, naming the path.
    #[test]
    fn open_regular_refuses_what_is_not_a_file() {
        let root = tmp("open");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("file"), "x").unwrap();
        mkfifo(&root.join("fifo"));
        std::os::unix::fs::symlink(root.join("file"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("zero")).unwrap();
        fs::create_dir(root.join("dir")).unwrap();
        assert!(open_regular(&root.join("file")).is_ok());
        for (name, what) in [("fifo", "a FIFO"), ("link", "a symbolic link"), ("zero", "a symbolic link"), ("dir", "a directory")] {
            let e = open_regular(&root.join(name)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{name}");
            assert!(e.to_string().contains(&root.join(name).display().to_string()), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let e = open_regular(&root.join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("missing"), "{e}");
        fs::remove_dir_all(root).unwrap();
    }

    /// A damaged state is never half-trusted: the message reads with every
    /// recipient pending and the reason, so none is dropped.
    #[test]
    fn damaged_state_counts_as_never_tried() {
        let root = tmp("state");
        let sp = Spool::create(&root).unwrap();
        let id = "AAAA000000010";
        queued(&sp, id);
        let good = "attempts 1\nnext 0\nlast 0\nerror x\nsent bob@example.org 250 ok\n";
        for (bad, why) in [
            (&b"attempts 1\nsent bob@example.org 250 \xff\n"[..], "not UTF-8"),
            (&good.as_bytes()[..good.len() - 3], "cut short"),
            (b"", "empty"),
            (b"sent bob@example.org 250 ok\n", "no attempts"),
            (b"attempts lots\n", "bad attempts"),
        ] {
            fs::write(root.join("state").join(id), bad).unwrap();
            let m = sp.read(id).unwrap();
            assert!(m.state_error.as_deref().unwrap_or("").contains(why), "{:?}", m.state_error);
            assert_eq!(m.pending().count(), 2, "{why}");
        }
        fs::write(root.join("state").join(id), good).unwrap();
        let m = sp.read(id).unwrap();
        assert_eq!((m.state_error.clone(), m.pending().count()), (None, 1));
        fs::remove_dir_all(root).unwrap();
    }

    /// Start-up moves bad entries to corrupt/ (never over an older one),
    /// keeps damaged files' states, never blocks on a FIFO, never fails.
    #[test]
    fn recover_quarantines_and_never_overwrites() {
        let root = tmp("quar");
        let sp = Spool::create(&root).unwrap();
        for id in ["AAAA000000020", "AAAA000000021", "AAAA000000022"] {
            queued(&sp, id);
            sp.write_state(id, &DeliveryState { attempts: 1, ..Default::default() }, false).unwrap();
        }
        // A torn queue file whose name is taken in corrupt/ already.
        let torn = root.join("queue/AAAA000000020");
        let f = OpenOptions::new().write(true).open(&torn).unwrap();
        f.set_len(f.metadata().unwrap().len() - 2).unwrap();
        fs::write(root.join("corrupt/AAAA000000020"), "older").unwrap();
        // A FIFO in queue/, a directory in incoming/, a non-UTF-8 state, a
        // symlinked state, a queue file copied under another ID.
        mkfifo(&root.join("queue/AAAA000000030"));
        fs::create_dir(root.join("incoming/AAAA000000031")).unwrap();
        fs::write(root.join("state/AAAA000000021"), b"attempts \xff\n").unwrap();
        fs::remove_file(root.join("state/AAAA000000022")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.join("state/AAAA000000022")).unwrap();
        fs::copy(root.join("queue/AAAA000000022"), root.join("queue/AAAA000000032")).unwrap();
        let r = sp.recover().unwrap();
        assert_eq!(r.queued, 2);
        assert_eq!(r.corrupt, vec!["AAAA000000020".to_string(), "AAAA000000030".into(), "AAAA000000032".into()]);
        assert_eq!(fs::read_to_string(root.join("corrupt/AAAA000000020")).unwrap(), "older");
        assert!(root.join("corrupt/AAAA000000020.1").is_file());
        assert!(root.join("corrupt/AAAA000000020.state").is_file());
        assert!(root.join("corrupt/AAAA000000031.incoming").is_dir());
        assert_eq!(fs::read(root.join("corrupt/AAAA000000021.state")).unwrap(), b"attempts \xff\n");
        assert!(fs::symlink_metadata(root.join("corrupt/AAAA000000022.state")).unwrap().file_type().is_symlink());
        assert_eq!(sp.list().unwrap().0.iter().filter(|m| m.state_error.is_none()).count(), 2);
        fs::remove_dir_all(root).unwrap();
    }

    /// A spool subdirectory that is a file is moved aside, not fatal.
    #[test]
    fn create_moves_aside_what_is_not_a_directory() {
        let root = tmp("aside");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("state"), "not a dir").unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", root.join("incoming")).unwrap();
        let sp = Spool::create(&root).unwrap();
        assert!(root.join("state").is_dir() && root.join("incoming").is_dir());
        assert_eq!(fs::read_to_string(root.join("state.not-a-directory")).unwrap(), "not a dir");
        assert!(fs::symlink_metadata(root.join("incoming.not-a-directory")).is_ok());
        queued(&sp, "AAAA000000040");
        fs::remove_dir_all(root).unwrap();
    }

    /// A symlink planted at the state's temporary name is replaced, never
    /// written through.
    #[test]
    fn write_state_never_writes_through_a_symlink() {
        let root = tmp("tmplink");
        let sp = Spool::create(&root).unwrap();
        queued(&sp, "AAAA000000050");
        let victim = root.join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("state/AAAA000000050.tmp")).unwrap();
        sp.write_state("AAAA000000050", &DeliveryState { attempts: 3, ..Default::default() }, true).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(sp.read_state("AAAA000000050").unwrap().attempts, 3);
        fs::remove_dir_all(root).unwrap();
    }

    fn free_files(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root.join("free")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    fn put(sp: &Spool, id: &str, body: &[u8]) {
        let mut w = sp.begin(&env(id)).unwrap();
        w.write(body).unwrap();
        w.finish().unwrap();
    }

    /// A delivered message's file is reused for the next one: no new file,
    /// the stale tail of a longer old message cut off, the new one whole
    /// and checked at start.
    #[test]
    fn delivered_file_is_reused_and_cut_to_the_new_message() {
        let root = tmp("reuse");
        let sp = Spool::create(&root).unwrap();
        put(&sp, "AAAA000000060", &[b'a'; 9000]);
        let ino = fs::metadata(root.join("queue/AAAA000000060")).unwrap().ino();
        sp.remove("AAAA000000060").unwrap();
        assert!(!root.join("queue/AAAA000000060").exists());
        assert_eq!(free_files(&root).len(), 1);
        put(&sp, "AAAA000000061", b"short\r\n");
        assert!(free_files(&root).is_empty(), "a new file was made: {:?}", free_files(&root));
        let p = root.join("queue/AAAA000000061");
        assert_eq!(fs::metadata(&p).unwrap().ino(), ino);
        let m = sp.read("AAAA000000061").unwrap();
        assert_eq!(m.size, 7);
        let mut body = Vec::new();
        sp.open_data("AAAA000000061").unwrap().0.read_to_end(&mut body).unwrap();
        assert_eq!(body, b"short\r\n");
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!((r.queued, r.corrupt.len()), (1, 0));
        fs::remove_dir_all(root).unwrap();
    }

    /// Hostile: the checksum catches what the length cannot: a byte changed
    /// in place, and the new header over the old message's data (a reused
    /// file after a power loss, the overwrite of the data not on disk).
    /// Both go to corrupt/, never delivered.
    #[test]
    fn wrong_checksum_or_stale_data_goes_to_corrupt() {
        let root = tmp("csum");
        let sp = Spool::create(&root).unwrap();
        put(&sp, "AAAA000000070", b"Subject: one\r\n\r\nfirst body\r\n");
        put(&sp, "AAAA000000071", b"Subject: two\r\n\r\nsecond body\r\n");
        let p = root.join("queue/AAAA000000070");
        let mut d = fs::read(&p).unwrap();
        let at = d.len() - 5;
        d[at] ^= 0x20;
        fs::write(&p, &d).unwrap();
        // The header of 72 over 71's old data of the same length.
        put(&sp, "AAAA000000072", b"Subject: two\r\n\r\nsecond BODY\r\n");
        let old = fs::read(root.join("queue/AAAA000000071")).unwrap();
        let p2 = root.join("queue/AAAA000000072");
        let mut d2 = fs::read(&p2).unwrap();
        let n = d2.len();
        d2[n - 13..].copy_from_slice(&old[old.len() - 13..]);
        fs::write(&p2, &d2).unwrap();
        assert_eq!(sp.read("AAAA000000072").unwrap().size, 29, "the length alone cannot tell");
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!(r.corrupt, vec!["AAAA000000070".to_string(), "AAAA000000072".into()]);
        assert_eq!(r.queued, 1);
        assert_eq!(fs::read(root.join("corrupt/AAAA000000070")).unwrap(), d);
        // A checksum field that does not parse: damaged too.
        put(&sp, "AAAA000000073", b"x\r\n");
        let p3 = root.join("queue/AAAA000000073");
        let t = fs::read_to_string(&p3).unwrap();
        let at = t.find("check ").unwrap() + 6;
        fs::write(&p3, format!("{}zzzzzzzz{}", &t[..at], &t[at + 8..])).unwrap();
        assert_eq!(sp.read("AAAA000000073").unwrap_err().kind(), io::ErrorKind::InvalidData);
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!(r.corrupt, vec!["AAAA000000073".to_string()]);
        fs::remove_dir_all(root).unwrap();
    }

    /// Hostile: a queue file cut within its header (torn header), and a
    /// zero-length one: damaged, moved to corrupt/ with their names.
    /// A zero-length file in free/ is only an unused file: reused.
    #[test]
    fn torn_header_and_zero_length() {
        let root = tmp("torn");
        let sp = Spool::create(&root).unwrap();
        put(&sp, "AAAA000000080", b"x\r\n");
        put(&sp, "AAAA000000081", b"y\r\n");
        let p = root.join("queue/AAAA000000080");
        let d = fs::read(&p).unwrap();
        fs::write(&p, &d[..40]).unwrap();
        fs::write(root.join("queue/AAAA000000081"), b"").unwrap();
        fs::write(root.join("free/f7"), b"").unwrap();
        let sp = Spool::create(&root).unwrap();
        let r = sp.recover().unwrap();
        assert_eq!(r.corrupt, vec!["AAAA000000080".to_string(), "AAAA000000081".into()]);
        assert_eq!((r.queued, r.pooled), (0, 1));
        put(&sp, "AAAA000000082", b"z\r\n");
        assert!(free_files(&root).is_empty());
        // New names do not reuse one found at start.
        put(&sp, "AAAA000000083", b"z\r\n");
        sp.remove("AAAA000000083").unwrap();
        assert_eq!(free_files(&root), vec!["f9".to_string()]);
        fs::remove_dir_all(root).unwrap();
    }

    /// A queue file as the version before this one wrote it (no check
    /// line, exact length) is read, passes recovery and is delivered and
    /// reused like a new one; old content left in free/ is never a message.
    #[test]
    fn old_format_queue_file_after_an_upgrade() {
        let root = tmp("upgrade");
        let sp = Spool::create(&root).unwrap();
        let body = b"Subject: old\r\n\r\nbody\r\n";
        let mut f = format!(
            "BARTLEBY-QUEUE 1\nid AAAA000000090\narrival 1795320958\nclient c[192.0.2.1]\nhelo c.test\nfrom alice@sender.test\nrcpt bob@example.org\nlength {:020}\n\n",
            body.len()
        )
        .into_bytes();
        f.extend_from_slice(body);
        fs::write(root.join("queue/AAAA000000090"), &f).unwrap();
        // The same, cut short: damaged, as before.
        fs::write(root.join("queue/AAAA000000091"), &f[..f.len() - 1]).unwrap();
        // A complete old message in free/ (not a queue file there).
        fs::write(root.join("free/f3"), &f).unwrap();
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!((r.queued, r.pooled), (1, 1));
        assert_eq!(r.corrupt, vec!["AAAA000000091".to_string()]);
        assert_eq!(sp.ids().unwrap().len(), 1);
        assert_eq!(sp.read("AAAA000000090").unwrap().size, body.len() as u64);
        sp.remove("AAAA000000090").unwrap();
        assert!(sp.ids().unwrap().is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    /// Hostile: what replaces a pool file in free/ (a directory, a symlink
    /// to a file outside, a hard link to one, nothing at all) is never
    /// written into: the next file is used, and start-up moves what is not
    /// ours to corrupt/.
    #[test]
    fn pool_file_replaced_or_gone() {
        let root = tmp("poolhostile");
        let sp = Spool::create(&root).unwrap();
        for id in ["AAAA0000000A0", "AAAA0000000A1", "AAAA0000000A2", "AAAA0000000A3"] {
            put(&sp, id, b"x\r\n");
            sp.remove(id).unwrap();
        }
        // free/ itself gone: an error naming it, the pool kept (once for
        // all: not one warning per pooled file).
        assert_eq!(free_files(&root).len(), 1);
        fs::rename(root.join("free"), root.join("free.away")).unwrap();
        let e = sp.begin(&env("AAAA0000000B9")).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("free"), "{e}");
        fs::rename(root.join("free.away"), root.join("free")).unwrap();
        put(&sp, "AAAA0000000B8", b"x\r\n");
        sp.remove("AAAA0000000B8").unwrap();
        assert_eq!(free_files(&root).len(), 1, "the pooled file was forgotten");
        // put reuses the one file: make four distinct pool files.
        let mut ws: Vec<SpoolWriter> = (0..4).map(|i| sp.begin(&env(&format!("AAAA0000000B{i}"))).unwrap()).collect();
        ws.drain(..).for_each(|w| w.abort());
        let names = free_files(&root);
        assert_eq!(names.len(), 4, "{names:?}");
        let victim = root.join("victim");
        fs::write(&victim, "precious").unwrap();
        let [a, b, c, d] = [0, 1, 2, 3].map(|i| root.join("free").join(&names[i]));
        fs::remove_file(&a).unwrap();
        fs::create_dir(&a).unwrap();
        fs::remove_file(&b).unwrap();
        std::os::unix::fs::symlink(&victim, &b).unwrap();
        fs::remove_file(&c).unwrap();
        fs::hard_link(&victim, &c).unwrap();
        fs::remove_file(&d).unwrap();
        for i in 0..4 {
            put(&sp, &format!("AAAA0000000C{i}"), b"new message\r\n");
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(sp.ids().unwrap().len(), 4);
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!(r.queued, 4);
        assert_eq!(r.quarantined, 3);
        assert!(root.join("corrupt").join(format!("{}.free", names[0])).is_dir());
        assert!(fs::symlink_metadata(root.join("corrupt").join(format!("{}.free", names[1]))).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(root.join("corrupt").join(format!("{}.free", names[2]))).unwrap(), "precious");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        fs::remove_dir_all(root).unwrap();
    }

    /// A queue ID in use is never renamed over; a file too big for the
    /// pool is unlinked, not kept.
    #[test]
    fn id_in_use_and_big_files() {
        let root = tmp("inuse");
        let sp = Spool::create(&root).unwrap();
        put(&sp, "AAAA0000000D0", b"first\r\n");
        let before = fs::read(root.join("queue/AAAA0000000D0")).unwrap();
        let mut w = sp.begin(&env("AAAA0000000D0")).unwrap();
        w.write(b"second\r\n").unwrap();
        assert_eq!(w.finish().unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(root.join("queue/AAAA0000000D0")).unwrap(), before);
        assert_eq!(free_files(&root).len(), 1, "the refused message's file is back in the pool");
        put(&sp, "AAAA0000000D1", &vec![b'b'; (RECYCLE_MAX_FILE + 1) as usize]);
        sp.remove("AAAA0000000D1").unwrap();
        assert!(free_files(&root).is_empty());
        assert!(sp.ids().unwrap().len() == 1);
        fs::remove_dir_all(root).unwrap();
    }

    /// Hostile: names of free/ that wrap (or were taken by hand) are
    /// never written over, neither by a removal nor by a new file.
    #[test]
    fn free_names_never_overwrite() {
        let root = tmp("wrap");
        let sp = Spool::create(&root).unwrap();
        put(&sp, "AAAA0000000E0", b"x\r\n");
        fs::write(root.join("free/f1"), "in the pool").unwrap();
        fs::write(root.join("free/f2"), "also").unwrap();
        sp.pool.next.store(1, Ordering::Relaxed);
        sp.remove("AAAA0000000E0").unwrap();
        assert_eq!(fs::read_to_string(root.join("free/f1")).unwrap(), "in the pool");
        assert!(sp.ids().unwrap().is_empty());
        sp.pool.next.store(1, Ordering::Relaxed);
        sp.pool.lock().clear();
        put(&sp, "AAAA0000000E1", b"y\r\n");
        assert_eq!(fs::read_to_string(root.join("free/f1")).unwrap(), "in the pool");
        assert_eq!(fs::read_to_string(root.join("free/f2")).unwrap(), "also");
        assert_eq!(sp.read("AAAA0000000E1").unwrap().size, 3);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn free_names() {
        assert_eq!(parse_free_name(&free_name(0)), Some(0));
        assert_eq!(parse_free_name(&free_name(u32::MAX)), Some(u32::MAX));
        for bad in ["f", "f01", "f4294967296", "F1", "f1.tmp", "f-1", "g1", "f12345678901"] {
            assert_eq!(parse_free_name(bad), None, "{bad}");
        }
    }

    /// The check covers the first CHECK_SPAN bytes of a message: a byte
    /// changed there is caught, one beyond is the length's and the file
    /// system's business (start-up reads no more of a big message).
    #[test]
    fn check_spans_the_reusable_part() {
        let root = tmp("span");
        let sp = Spool::create(&root).unwrap();
        let big = vec![b'q'; (CHECK_SPAN + 1000) as usize];
        put(&sp, "AAAA0000000F0", &big);
        put(&sp, "AAAA0000000F1", &big);
        let p0 = root.join("queue/AAAA0000000F0");
        let mut d = fs::read(&p0).unwrap();
        let n = d.len();
        d[n - (big.len() - 10)] = b'Q';
        fs::write(&p0, &d).unwrap();
        let p1 = root.join("queue/AAAA0000000F1");
        let mut d = fs::read(&p1).unwrap();
        let n = d.len();
        d[n - 10] = b'Q';
        fs::write(&p1, &d).unwrap();
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert_eq!(r.corrupt, vec!["AAAA0000000F0".to_string()]);
        assert_eq!(r.queued, 1);
        fs::remove_dir_all(root).unwrap();
    }

    /// The message's bytes are held in memory up to FILE_BUF and its
    /// length and checksum filled in there (one write); beyond it they are
    /// written as they come and the header completed in place. Every way
    /// across that boundary reads back whole and passes the check at start.
    #[test]
    fn held_and_written_out_messages_read_back() {
        let root = tmp("filebuf");
        let sp = Spool::create(&root).unwrap();
        let pieces: Vec<Vec<u8>> = (0..40u8).map(|i| vec![b'a' + i % 26; 37 + 301 * usize::from(i)]).collect();
        let mut many = env("AAAA000000FB3");
        many.recipients = (0..300).map(|i| format!("user{i}@example.org")).collect();
        let cases: [(&str, Envelope, Vec<&[u8]>); 5] = [
            ("AAAA000000FB0", env("AAAA000000FB0"), vec![b"small\r\n"]),
            ("AAAA000000FB1", env("AAAA000000FB1"), pieces.iter().map(|p| p.as_slice()).collect()),
            ("AAAA000000FB2", env("AAAA000000FB2"), vec![b"x\r\n", &pieces[39], b"y\r\n"]),
            ("AAAA000000FB3", many.clone(), vec![b"to many\r\n"]),
            ("AAAA000000FB4", { let mut e = many.clone(); e.id = QueueId::try_from("AAAA000000FB4").unwrap(); e }, vec![]),
        ];
        for (id, e, parts) in &cases {
            let mut w = sp.begin(e).unwrap();
            for p in parts {
                w.write(p).unwrap();
            }
            let want: Vec<u8> = parts.concat();
            assert_eq!(w.finish().unwrap(), want.len() as u64, "{id}");
            let (mut rd, n) = sp.open_data(id).unwrap();
            let mut body = Vec::new();
            rd.read_to_end(&mut body).unwrap();
            assert_eq!((n, body == want), (want.len() as u64, true), "{id}");
            assert_eq!(sp.read(id).unwrap().env.recipients.len(), e.recipients.len());
        }
        sp.sync().unwrap();
        let r = Spool::create(&root).unwrap().recover().unwrap();
        assert!(r.corrupt.is_empty(), "{:?}", r.corrupt);
        assert_eq!(r.queued, cases.len());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn adler32_known_values() {
        let mut a = Adler::new();
        a.update(b"Wikipedia");
        assert_eq!(a.value(), 0x11E6_0398);
        let mut z = Adler::new();
        z.update(&vec![0xffu8; 100_000]);
        // zlib.adler32(b"\xff" * 100000)
        assert_eq!(z.value(), 0x149a_302c);
    }

    #[test]
    fn rejects_newline_in_envelope() {
        let root = tmp("nl");
        let sp = Spool::create(&root).unwrap();
        let mut e = env("AAAA000000005");
        e.recipients.push("x@example.org\nrcpt evil@evil.test".into());
        assert!(sp.begin(&e).is_err());
        fs::remove_dir_all(root).unwrap();
    }
}
