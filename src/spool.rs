//! The spool: the durable queue on disk.
//!
//! Layout under the spool directory:
//!
//! ```text
//! incoming/ID   a message being received (never trusted; removed at start)
//! queue/ID      a committed message: envelope header, blank line, message
//! state/ID      delivery state of a queued message (attempts, done recipients)
//! corrupt/ID    queue files that failed their check at start (kept for the admin)
//! ```
//!
//! A queue file is written once and never changed: the envelope (sender,
//! recipients, client) first, then the message as it streams in, then the
//! length of the message is written into a fixed-width field of the header.
//! The session renames `incoming/ID` to `queue/ID` and then waits for the
//! committer (see [`Committer`]) to make the file *and* the rename durable
//! before it says "250". At start, a queue file whose length does not match
//! its header is moved to `corrupt/` instead of being delivered truncated.
//!
//! Why `syncfs` rather than `fsync` per file: one `syncfs` makes every file
//! and rename of the file system durable at once (on ext4 it forces a journal
//! commit with a cache flush), so twenty sessions finishing DATA together cost
//! one disk flush instead of forty (group commit).
//!
//! Reading (`list`, `read`) needs no running server: `mailq` and the status
//! page read the same files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::util::{QueueId, valid_queue_id};

const MAGIC: &str = "BARTLEBY-QUEUE 1";
/// Width of the length field, so it can be rewritten in place.
const LEN_WIDTH: usize = 20;
/// Longest header line a reader accepts (an address is at most 256 octets).
const MAX_HEADER_LINE: usize = 1024;

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
    pub recipients: Vec<String>,
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
}

/// A queued message: envelope, size and delivery state, without the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub env: Envelope,
    /// Bytes of message data (as it will be sent, Received header included).
    pub size: u64,
    pub state: DeliveryState,
    pub recipients: Vec<Recipient>,
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
}

/// What `recover` found at start.
#[derive(Debug, Default)]
pub struct Recovery {
    pub queued: usize,
    pub removed_incoming: usize,
    pub corrupt: Vec<String>,
    pub orphan_states: usize,
}

/// Space on the spool's file system, as `df` shows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskSpace {
    pub total: u64,
    pub used: u64,
    /// Available to an unprivileged writer (df's "Avail").
    pub avail: u64,
}

impl DiskSpace {
    pub fn percent_used(&self) -> u32 {
        let denom = self.used + self.avail;
        if denom == 0 { 0 } else { (self.used as u128 * 100).div_ceil(denom as u128) as u32 }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Fsyncs a directory, so that a rename or create in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// The spool at `root`, creating its directories (server side).
    pub fn create(root: &Path) -> io::Result<Spool> {
        for d in ["", "incoming", "queue", "state", "corrupt"] {
            let p = root.join(d);
            if !p.is_dir() {
                fs::create_dir_all(&p)?;
            }
        }
        fsync_dir(root)?;
        Ok(Spool { root: root.to_path_buf() })
    }

    /// The spool at `root` for reading only (`mailq`, status page).
    pub fn open(root: &Path) -> io::Result<Spool> {
        if !root.join("queue").is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: no spool here (no queue/ directory)", root.display()),
            ));
        }
        Ok(Spool { root: root.to_path_buf() })
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

    /// Path of the control socket (`bartleby flush` talks to the server there).
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// Cleans up after a crash: partial messages in `incoming/` are deleted
    /// (they were never acknowledged), queue files that fail the length check
    /// are moved to `corrupt/`, state files without a message are removed.
    pub fn recover(&self) -> io::Result<Recovery> {
        let mut r = Recovery::default();
        for e in fs::read_dir(self.root.join("incoming"))? {
            let e = e?;
            fs::remove_file(e.path())?;
            r.removed_incoming += 1;
        }
        for id in self.ids()? {
            match self.check(&id) {
                Ok(()) => r.queued += 1,
                Err(err) => {
                    log::warn!("{id}: queue file damaged ({err}); moved to corrupt/");
                    fs::rename(self.queue_path(&id), self.root.join("corrupt").join(id.as_str()))?;
                    let _ = fs::remove_file(self.state_path(&id));
                    r.corrupt.push(id.to_string());
                }
            }
        }
        for e in fs::read_dir(self.root.join("state"))? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") || !self.queue_path(&name).exists() {
                fs::remove_file(e.path())?;
                r.orphan_states += 1;
            }
        }
        if r.removed_incoming > 0 || !r.corrupt.is_empty() || r.orphan_states > 0 {
            self.sync()?;
        }
        Ok(r)
    }

    /// IDs of the committed messages, oldest first (IDs start with the time).
    pub fn ids(&self) -> io::Result<Vec<QueueId>> {
        let mut v = Vec::new();
        for e in fs::read_dir(self.root.join("queue"))? {
            let e = e?;
            let name = e.file_name();
            if let Some(s) = name.to_str()
                && valid_queue_id(s)
                    && let Ok(id) = QueueId::try_from(s) {
                        v.push(id);
                    }
        }
        v.sort();
        Ok(v)
    }

    /// Verifies that a queue file is complete.
    fn check(&self, id: &str) -> io::Result<()> {
        let f = File::open(self.queue_path(id))?;
        let file_len = f.metadata()?.len();
        let mut rd = BufReader::with_capacity(1024, f);
        let (_, size, header_len) = read_header(&mut rd)?;
        if header_len + size != file_len {
            return Err(invalid(format!("header says {} bytes of message, file holds {}", size, file_len.saturating_sub(header_len))));
        }
        Ok(())
    }

    /// Starts a new message: creates `incoming/ID` and writes the envelope.
    pub fn begin(&self, env: &Envelope) -> io::Result<SpoolWriter> {
        let path = self.root.join("incoming").join(env.id.as_str());
        if self.queue_path(&env.id).exists() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "queue ID in use"));
        }
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
        for r in &env.recipients {
            put(&format!("rcpt {r}"))?;
        }
        let len_offset = (header.len() + "length ".len()) as u64;
        header.push_str(&format!("length {:0width$}\n\n", 0, width = LEN_WIDTH));
        let file = OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut w = BufWriter::with_capacity(4096, file);
        if let Err(e) = w.write_all(header.as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(SpoolWriter { w, path, queue_path: self.queue_path(&env.id), len_offset, size: 0 })
    }

    /// Makes everything written to the spool durable (one `syncfs`).
    ///
    /// For one-off syncs (recovery, tests). The committer keeps its own
    /// descriptor instead: see [`syncfs`].
    pub fn sync(&self) -> io::Result<()> {
        syncfs(&File::open(self.root.join("queue"))?)
    }

    /// Reads a queued message's envelope and state (no body).
    pub fn read(&self, id: &str) -> io::Result<QueuedMessage> {
        let f = File::open(self.queue_path(id))?;
        let mut rd = BufReader::with_capacity(1024, f);
        let (env, size, _) = read_header(&mut rd)?;
        let state = self.read_state(id)?;
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
        Ok(QueuedMessage { env, size, state, recipients })
    }

    /// Every queued message, oldest first. Messages that vanish while the
    /// list is read (delivered meanwhile) are skipped.
    pub fn list(&self) -> io::Result<Vec<QueuedMessage>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            match self.read(&id) {
                Ok(m) => out.push(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{id}: {e}"))),
            }
        }
        Ok(out)
    }

    /// Arrival time and exact message size of a queued message, from its
    /// envelope header alone (no state file, no recipient bookkeeping): what
    /// counting a large queue needs.
    pub fn summary(&self, id: &str) -> io::Result<(u64, u64)> {
        let f = File::open(self.queue_path(id))?;
        let mut rd = BufReader::with_capacity(512, f);
        let (env, size, _) = read_header(&mut rd)?;
        Ok((env.arrival, size))
    }

    /// Opens the message data of a queued message, positioned at its start.
    pub fn open_data(&self, id: &str) -> io::Result<(BufReader<File>, u64)> {
        let f = File::open(self.queue_path(id))?;
        let mut rd = BufReader::with_capacity(4096, f);
        let (_, size, header_len) = read_header(&mut rd)?;
        let mut f = rd.into_inner();
        f.seek(SeekFrom::Start(header_len))?;
        Ok((BufReader::with_capacity(4096, f), size))
    }

    /// The delivery state of a message (default when none was written yet).
    pub fn read_state(&self, id: &str) -> io::Result<DeliveryState> {
        let text = match fs::read_to_string(self.state_path(id)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DeliveryState::default()),
            Err(e) => return Err(e),
        };
        let mut s = DeliveryState::default();
        for line in text.lines() {
            let (k, v) = line.split_once(' ').unwrap_or((line, ""));
            match k {
                "attempts" => s.attempts = v.parse().unwrap_or(0),
                "next" => s.next_attempt = v.parse().unwrap_or(0),
                "last" => s.last_attempt = v.parse().unwrap_or(0),
                "error" => s.last_error = v.to_string(),
                "sent" | "bounced" | "rcpt-error" => {
                    let (addr, reply) = v.split_once(' ').unwrap_or((v, ""));
                    match k {
                        "sent" => s.done.push((addr.to_string(), RcptStatus::Sent, reply.to_string())),
                        "bounced" => s.done.push((addr.to_string(), RcptStatus::Bounced, reply.to_string())),
                        _ => s.errors.push((addr.to_string(), reply.to_string())),
                    }
                }
                _ => {}
            }
        }
        Ok(s)
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
        for (a, st, reply) in &s.done {
            let k = if *st == RcptStatus::Sent { "sent" } else { "bounced" };
            text.push_str(&format!("{k} {a} {}\n", clean(reply)));
        }
        for (a, e) in &s.errors {
            text.push_str(&format!("rcpt-error {a} {}\n", clean(e)));
        }
        let tmp = self.root.join("state").join(format!("{id}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        if durable {
            f.sync_data()?;
        }
        fs::rename(&tmp, self.state_path(id))?;
        if durable {
            fsync_dir(&self.root.join("state"))?;
        }
        Ok(())
    }

    /// Removes a message whose every recipient is done.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        fs::remove_file(self.queue_path(id))?;
        match fs::remove_file(self.state_path(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Space on the spool's file system.
    pub fn disk_space(&self) -> io::Result<DiskSpace> {
        disk_space(&self.root)
    }
}

/// Space on the file system holding `path` (statvfs, as `df` computes it).
pub fn disk_space(path: &Path) -> io::Result<DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| invalid("NUL in path".into()))?;
    // SAFETY: statvfs writes into the zeroed struct we own; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    let total = st.f_blocks as u64 * frsize;
    let free = st.f_bfree as u64 * frsize;
    Ok(DiskSpace { total, used: total.saturating_sub(free), avail: st.f_bavail as u64 * frsize })
}

/// Reads and parses the envelope header; returns it, the message length and
/// the header length in bytes.
fn read_header<R: BufRead>(rd: &mut R) -> io::Result<(Envelope, u64, u64)> {
    let mut env = Envelope::default();
    let mut size: Option<u64> = None;
    let mut header_len = 0u64;
    let mut line = Vec::with_capacity(128);
    let mut first = true;
    loop {
        line.clear();
        let n = rd.by_ref().take(MAX_HEADER_LINE as u64).read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(invalid("envelope header cut short".into()));
        }
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
            "rcpt" => env.recipients.push(v.to_string()),
            "length" => size = Some(v.parse().map_err(|_| invalid("bad length".into()))?),
            _ => {} // later versions may add fields
        }
    }
    let size = size.ok_or_else(|| invalid("no length in header".into()))?;
    Ok((env, size, header_len))
}

/// A message being written to `incoming/`.
pub struct SpoolWriter {
    w: BufWriter<File>,
    path: PathBuf,
    queue_path: PathBuf,
    len_offset: u64,
    size: u64,
}

impl SpoolWriter {
    /// Appends message data.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.w.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }

    /// Bytes of message data written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Completes the file and moves it into `queue/`. The message is not yet
    /// durable: the caller must wait for [`Committer::commit`] before "250".
    pub fn finish(mut self) -> io::Result<u64> {
        self.w.flush()?;
        let f = self.w.get_ref();
        f.write_all_at(format!("{:0width$}", self.size, width = LEN_WIDTH).as_bytes(), self.len_offset)?;
        fs::rename(&self.path, &self.queue_path)?;
        Ok(self.size)
    }

    /// Throws the partial message away.
    pub fn abort(self) {
        let _ = fs::remove_file(&self.path);
    }
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
            recipients: vec!["bob@example.org".into(), "carol@example.org".into()],
        }
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
        };
        sp.write_state("AAAA000000001", &st, true).unwrap();
        let m = sp.read("AAAA000000001").unwrap();
        assert_eq!(m.state, st);
        assert_eq!(m.recipients[0].status, RcptStatus::Sent);
        assert_eq!(m.recipients[1].error, "450 4.2.1 mailbox busy");
        assert_eq!(sp.list().unwrap().len(), 1);
        sp.remove("AAAA000000001").unwrap();
        assert!(sp.list().unwrap().is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn recover_cleans_partial_and_truncated() {
        let root = tmp("rec");
        let sp = Spool::create(&root).unwrap();
        // Partial: never finished (crash during DATA).
        let mut w = sp.begin(&env("AAAA000000002")).unwrap();
        w.write(b"half a mess").unwrap();
        drop(w);
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
        let r = sp.recover().unwrap();
        assert_eq!(r.removed_incoming, 1);
        assert_eq!(r.queued, 1);
        assert_eq!(r.corrupt, vec!["AAAA000000004".to_string()]);
        assert_eq!(r.orphan_states, 1);
        assert!(root.join("corrupt/AAAA000000004").exists());
        assert_eq!(sp.ids().unwrap().len(), 1);
        fs::remove_dir_all(root).unwrap();
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
