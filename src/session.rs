//! The SMTP server session: one per client connection.
//!
//! Reads commands line by line (strict CR LF, bounded length, bounded time),
//! parses them with smtp-proto, applies [`policy`](crate::policy), streams
//! DATA through [`DataParser`](crate::data::DataParser) into the spool, and
//! answers "250" only after the committer reports the message durable.
//!
//! Two halves: `Conn` is the protocol (the session's state and its verbs;
//! every verb handler returns a [`Reply`], and `Conn::answer` writes it and
//! counts errors and junk commands, in one place); `Session` is the I/O
//! around it (the command loop, the DATA phase, flushing replies), generic
//! over the socket (clear or TLS).
//!
//! May touch: the spool (one queue file per transaction, through
//! [`Spool::begin`] and the committer), the shared counters, the scheduler's
//! channel. Never blocks the runtime (no file is read here but the queue
//! file being written).
//!
//! Memory per session is small and fixed: a 4 KiB read buffer, one command
//! line, one 1 KiB DATA line piece and the spool writer's 4 KiB buffer.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Error as ProtoError, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::timeout;

use crate::config::{BareNewline, Cidr, Config};
use crate::data::DataParser;
use crate::logging::SMTPD;
use crate::policy::{self, Recipients};
use crate::reply::{Reply, Then};
use crate::spool::{Committer, Envelope, Spool, SpoolWriter, Ticket};
use crate::stats::Stats;
use crate::util::{self, QueueId};

/// Junk commands (EHLO, HELO, NOOP, RSET, VRFY, ETRN, HELP) allowed between
/// two accepted messages; past it the session is closed with 421. After
/// Postfix's smtpd_junk_command_limit (100, reset when mail is delivered),
/// which past the limit counts each junk command as an error until its hard
/// error limit disconnects; Postfix does not count EHLO/HELO, here a loop of
/// them would otherwise hold a connection slot forever.
const JUNK_LIMIT: u32 = 100;
/// Read buffer per session.
const READ_BUF: usize = 4096;
/// Replies held for a pipelining client before they are written.
const OUT_MAX: usize = 4096;

/// What every session shares (built once by the server).
pub struct Shared {
    pub cfg: Arc<Config>,
    pub spool: Spool,
    pub committer: Committer,
    pub stats: Arc<Stats>,
    /// The recipients list in force (a snapshot; reloaded off the runtime).
    pub recipients: Recipients,
    /// New committed messages go to the scheduler here.
    pub queued: UnboundedSender<(QueueId, u64)>,
    /// Hosts that may send ETRN.
    pub etrn_allow: Vec<Cidr>,
    /// Recipient verification against the primary (`verify_recipients`).
    pub verifier: Option<Arc<crate::verify::Verifier>>,
    /// STARTTLS: the certificate in force (None: not configured).
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<crate::tls::Server>>,
}

struct Txn {
    id: QueueId,
    sender: String,
    body_8bit: bool,
    /// SMTPUTF8 on MAIL: UTF-8 addresses allowed, flag kept in the queue.
    smtputf8: bool,
    rcpts: Vec<String>,
    /// DSN: RET and ENVID of MAIL, NOTIFY and ORCPT of each of `rcpts`.
    dsn: crate::dsn::MailDsn,
    rcpt_dsn: Vec<crate::dsn::RcptDsn>,
}

enum LineRead {
    Line,
    TooLong,
    Eof,
}

/// How a session's command loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Close {
    /// Replies may be held in `out`: flush them (best effort) and close.
    After,
    /// QUIT was answered.
    Quit,
    /// The peer went away or the socket failed.
    Gone,
    /// STARTTLS was answered 220: the TLS handshake comes next.
    StartTls,
}

/// A transaction's queue file, begun at DATA.
struct QueueFile {
    txn: Txn,
    w: SpoolWriter,
    /// The committer's ticket taken before the file was begun.
    ticket: Ticket,
    /// The arrival time (Unix seconds).
    now: u64,
    /// Writing the Received header failed: said after the body.
    io_error: Option<std::io::Error>,
}

/// A message body as received: what the parser saw, and whether it was
/// stored whole.
struct Body {
    parser: DataParser,
    too_big: bool,
    io_error: Option<std::io::Error>,
}

/// A session: its protocol state, and the socket its replies go to.
struct Session<'a, W> {
    st: Conn<'a>,
    wr: W,
}

/// A session's protocol state and its verbs: every verb handler returns
/// a [`Reply`] and [`Conn::answer`] writes and counts it. Nothing here
/// depends on the socket's type (one copy of it in the binary, TLS or not).
struct Conn<'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    client: String,
    helo: Option<String>,
    esmtp: bool,
    txn: Option<Txn>,
    errors: u32,
    junk: u32,
    /// The TLS session, as Postfix records it ("TLSv1.3 with cipher ...").
    tls: Option<String>,
    /// Replies not written yet.
    out: Vec<u8>,
}

/// What a command line leads to.
enum Step {
    Reply(Reply),
    /// DATA: the session reads the message.
    Data,
}

/// Runs one SMTP session to its end.
pub async fn run<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(READ_BUF, rd);
    let client = format!("unknown[{}]", peer.ip().to_canonical());
    log::info!(target: SMTPD, "connect from {client}");
    let mut s = Session::new(&shared, peer, client, wr);
    Reply::new(220, "", format!("{} ESMTP Bartleby", shared.cfg.hostname)).write(&mut s.st.out);
    let mut line = Vec::with_capacity(256);
    let Err(end) = s.serve(&mut rd, &mut line).await;
    #[cfg(feature = "tls")]
    if end == Close::StartTls {
        return starttls(s, rd, line).await;
    }
    s.finish(end).await;
}

/// After "220 Ready to start TLS": the handshake (within
/// `command_timeout`, in the session's connection slot, so it counts
/// toward the per-client limits), then the session starts over inside TLS
/// with every guarantee of the loop (it is the same code).
///
/// Plaintext the client pipelined after STARTTLS is in `rd`'s buffer and
/// is thrown away with it, never read as a command inside TLS (the
/// CVE-2011-0411 class): Postfix purges it the same way
/// (vstream_fpurge after its 220).
#[cfg(feature = "tls")]
async fn starttls<S>(mut s: Session<'_, tokio::io::WriteHalf<S>>, rd: BufReader<tokio::io::ReadHalf<S>>, mut line: Vec<u8>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = s.st.shared;
    let cfg = &shared.cfg;
    if s.flush().await.is_err() {
        log::info!(target: SMTPD, "lost connection after STARTTLS from {}", s.st.client);
        log::info!(target: SMTPD, "disconnect from {}", s.st.client);
        return;
    }
    if !rd.buffer().is_empty() {
        log::warn!(
            target: SMTPD,
            "warning: {}: {} bytes of plaintext pipelined after STARTTLS discarded (command injection attempt?)",
            s.st.client,
            rd.buffer().len()
        );
    }
    let Some(config) = shared.tls.as_ref().and_then(|t| t.config()) else {
        log::info!(target: SMTPD, "disconnect from {}", s.st.client);
        return;
    };
    let stream = rd.into_inner().unsplit(s.wr);
    let tls = match timeout(cfg.command_timeout, crate::tls::accept(config, stream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            log::info!(target: SMTPD, "SSL_accept error from {}: {e}", s.st.client);
            log::info!(target: SMTPD, "lost connection after STARTTLS from {}", s.st.client);
            log::info!(target: SMTPD, "disconnect from {}", s.st.client);
            return;
        }
        Err(_) => {
            log::info!(target: SMTPD, "SSL_accept error from {}: timeout", s.st.client);
            log::info!(target: SMTPD, "timeout after STARTTLS from {}", s.st.client);
            log::info!(target: SMTPD, "disconnect from {}", s.st.client);
            return;
        }
    };
    let what = crate::tls::describe_conn(&tls.conn);
    log::info!(target: SMTPD, "Anonymous TLS connection established from {}: {what}", s.st.client);
    let (trd, twr) = tokio::io::split(tls);
    let mut trd = BufReader::with_capacity(READ_BUF, trd);
    // RFC 3207 4.2: the client must start over with EHLO; nothing said
    // before the handshake counts (Postfix: helo_reset, mail_reset). The
    // error and junk counts go on.
    let mut t = Session::new(shared, s.st.peer, std::mem::take(&mut s.st.client), twr);
    t.st.errors = s.st.errors;
    t.st.junk = s.st.junk;
    t.st.tls = Some(what);
    t.st.out = std::mem::take(&mut s.st.out);
    t.st.out.clear();
    let Err(end) = t.serve(&mut trd, &mut line).await;
    t.finish(end).await;
}
/// Reads one line (through LF) into `buf`, at most `max` bytes. A longer
/// line is consumed and reported as `TooLong`, never stored.
async fn read_line<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, buf: &mut Vec<u8>, max: usize) -> std::io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    loop {
        let avail = rd.fill_buf().await?;
        if avail.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (take, done) = match avail.iter().position(|&c| c == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&avail[..take]);
            }
        }
        rd.consume(take);
        if done {
            return Ok(if too_long { LineRead::TooLong } else { LineRead::Line });
        }
    }
}

/// The reply to a command smtp-proto could not parse.
fn parse_error(e: ProtoError) -> Reply {
    match e {
        ProtoError::UnknownCommand => Reply::error(500, "5.5.2", "Error: command not recognized"),
        ProtoError::InvalidSenderAddress => Reply::error(501, "5.1.7", "Bad sender address syntax"),
        ProtoError::InvalidRecipientAddress => Reply::error(501, "5.1.3", "Bad recipient address syntax"),
        ProtoError::SyntaxError { syntax } => Reply::error(501, "5.5.4", format!("Syntax: {syntax}")),
        ProtoError::InvalidParameter { param } => Reply::error(501, "5.5.4", format!("Invalid parameter {param}")),
        ProtoError::UnsupportedParameter { param } => {
            Reply::error(555, "5.5.4", format!("Unsupported option: {}", param.chars().take(40).collect::<String>()))
        }
        _ => Reply::error(500, "5.5.2", "Error: command not recognized"),
    }
}

impl<'a, W: AsyncWrite + Unpin> Session<'a, W> {
    fn new(shared: &'a Shared, peer: SocketAddr, client: String, wr: W) -> Self {
        let st = Conn {
            shared,
            peer,
            client,
            helo: None,
            esmtp: false,
            txn: None,
            errors: 0,
            junk: 0,
            tls: None,
            out: Vec::with_capacity(512),
        };
        Session { st, wr }
    }

    /// The command loop, from the greeting (or the handshake) on: reads a
    /// command, answers it, until the session ends.
    async fn serve<R: AsyncRead + Unpin>(&mut self, rd: &mut BufReader<R>, line: &mut Vec<u8>) -> Result<std::convert::Infallible, Close> {
        let cfg = self.st.shared.cfg.clone();
        self.flush().await?;
        loop {
            let reply = match timeout(cfg.command_timeout, read_line(rd, line, cfg.max_line_length)).await {
                Err(_) => Reply::new(421, "4.4.2", format!("{} Error: timeout exceeded", cfg.hostname)).then(Then::Close),
                Ok(Err(_)) => return Err(Close::Gone),
                // Replies to pipelined commands may still be waiting: send
                // them (best effort), so a queued message's 250 is not lost.
                Ok(Ok(LineRead::Eof)) => return Err(Close::After),
                Ok(Ok(LineRead::TooLong)) => Reply::error(500, "5.5.2", "Error: line too long"),
                Ok(Ok(LineRead::Line)) => match self.st.command(line).await {
                    Step::Reply(r) => r,
                    Step::Data => self.data(rd).await?,
                },
            };
            self.st.answer(reply)?;
            // Pipelined commands: replies go out in one write, but at most
            // OUT_MAX bytes are held (a client pipelining thousands of
            // RCPTs, each refused with a long verification reply, would
            // otherwise make the buffer grow with every command).
            if rd.buffer().is_empty() || self.st.out.len() >= OUT_MAX {
                self.flush().await?;
            }
        }
    }

    /// The end of a session, however it ended.
    async fn finish(mut self, end: Close) {
        if matches!(end, Close::After | Close::Quit) {
            let _ = self.flush().await;
        }
        // With no recipient accepted there is no queue file to speak of (Postfix
        // has no queue ID before the first accepted RCPT either).
        if let Some(t) = self.st.txn.take().filter(|t| !t.rcpts.is_empty()) {
            log::info!(target: SMTPD, "{}: lost connection or aborted before DATA completed", t.id);
        }
        // Bounded: in TLS the close_notify (and replies still held by the
        // TLS layer) must be written first, and a client that never reads
        // would otherwise hold the session and its slot forever. In clear
        // this returns at once.
        let _ = timeout(self.st.shared.cfg.command_timeout.min(Duration::from_secs(60)), self.wr.shutdown()).await;
        log::info!(target: SMTPD, "disconnect from {}", self.st.client);
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if self.st.out.is_empty() {
            return Ok(());
        }
        let r = timeout(Duration::from_secs(60), self.wr.write_all(&self.st.out)).await;
        self.st.out.clear();
        match r {
            Ok(Ok(())) => Ok(()),
            _ => Err(Close::Gone),
        }
    }

    /// DATA: the checks, the queue file with its Received header, 354, the
    /// body, then 250 once the message is durable. `Err` only when the
    /// peer is gone.
    async fn data<R: AsyncRead + Unpin>(&mut self, rd: &mut BufReader<R>) -> Result<Reply, Close> {
        let QueueFile { txn, mut w, ticket, now, io_error } = match self.st.open_queue_file(!rd.buffer().is_empty()) {
            Ok(opened) => opened,
            Err(r) => return Ok(r),
        };
        Reply::new(354, "", "End data with <CR><LF>.<CR><LF>").write(&mut self.st.out);
        if let Err(c) = self.flush().await {
            w.abort();
            return Err(c);
        }
        let body = match self.st.receive(rd, &mut w, io_error, &txn.id).await {
            Ok(b) => b,
            Err(end) => {
                w.abort();
                return end.ok_or(Close::Gone);
            }
        };
        if let Some(r) = self.st.body_refused(&body, &txn.id) {
            w.abort();
            return Ok(r);
        }
        if body.parser.bare_newlines > 0 {
            log::info!(target: SMTPD, "{}: {} bare <CR>/<LF> from {} normalised to <CR><LF>", txn.id, body.parser.bare_newlines, self.st.client);
        }
        Ok(self.st.commit(w, ticket, txn, now).await)
    }
}

impl Conn<'_> {
    /// Writes a verb's reply and does what it says next: the one place
    /// where errors and junk commands are counted.
    fn answer(&mut self, r: Reply) -> Result<(), Close> {
        r.write(&mut self.out);
        match r.then {
            Then::Next => Ok(()),
            Then::Error => self.count_error(),
            Then::Junk => self.count_junk(),
            Then::Close => Err(Close::After),
            Then::Quit => Err(Close::Quit),
            Then::StartTls => Err(Close::StartTls),
        }
    }

    /// Counts an error; past the budget the session is closed.
    fn count_error(&mut self) -> Result<(), Close> {
        self.errors += 1;
        if self.errors > self.shared.cfg.error_limit {
            log::warn!(target: SMTPD, "warning: too many errors from {}", self.client);
            let hostname = &self.shared.cfg.hostname;
            Reply::new(421, "4.7.0", format!("{hostname} Error: too many errors")).write(&mut self.out);
            return Err(Close::After);
        }
        Ok(())
    }

    fn count_junk(&mut self) -> Result<(), Close> {
        self.junk += 1;
        if self.junk > JUNK_LIMIT {
            let hostname = &self.shared.cfg.hostname;
            Reply::new(421, "4.7.0", format!("{hostname} Error: too many junk commands")).write(&mut self.out);
            return Err(Close::After);
        }
        Ok(())
    }

    /// A policy refusal: counted in the statistics and as an error.
    fn refuse(&self, r: policy::Refusal) -> Reply {
        Stats::inc(&self.shared.stats.rejected);
        r.into()
    }

    /// Handles one command line: its reply, or `Step::Data` for a DATA
    /// the session's I/O side takes over.
    async fn command(&mut self, line: &[u8]) -> Step {
        // Strict CR LF: a bare LF line end or a CR inside the line is refused
        // (Postfix smtpd_forbid_bare_newline = reject for commands).
        let body = match line.strip_suffix(b"\r\n") {
            Some(b) if !b.contains(&b'\r') => b,
            _ => return Step::Reply(Reply::error(500, "5.5.2", "Error: bare <CR> or <LF> received; commands end with <CR><LF>")),
        };
        // DSN parameters are checked by mail() and rcpt() on `body`.
        let stripped = crate::dsn::without_params(line);
        let req = match Request::parse(&mut stripped.as_deref().unwrap_or(line).iter()) {
            Ok(r) => r,
            Err(e) => return Step::Reply(parse_error(e)),
        };
        Step::Reply(match req {
            Request::Ehlo { host } if !host.is_empty() => self.ehlo(&host, true),
            Request::Helo { host } if !host.is_empty() => self.ehlo(&host, false),
            Request::Ehlo { .. } | Request::Helo { .. } => Reply::error(501, "5.5.4", "Syntax: EHLO hostname"),
            Request::Lhlo { .. } => Reply::error(500, "5.5.2", "Error: command not recognized"),
            Request::Mail { from } => self.mail(body, &from.address, from.flags),
            Request::Rcpt { to } => self.rcpt(body, &to.address, to.flags).await,
            Request::Data => return Step::Data,
            Request::Rset => {
                self.txn = None;
                Reply::new(250, "2.0.0", "Ok").then(Then::Junk)
            }
            Request::Noop { .. } => Reply::new(250, "2.0.0", "Ok").then(Then::Junk),
            Request::Quit => Reply::new(221, "2.0.0", "Bye").then(Then::Quit),
            Request::Vrfy { .. } | Request::Expn { .. } => Reply::new(502, "5.5.1", "Error: command disabled on a backup MX").then(Then::Junk),
            Request::Help { .. } => Reply::new(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT ETRN").then(Then::Junk),
            Request::Etrn { name } => self.etrn(&name).then(Then::Junk),
            Request::StartTls => self.starttls(body.len() > "STARTTLS".len()),
            Request::Auth { .. } | Request::Bdat { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                Reply::error(502, "5.5.1", "Error: command not implemented")
            }
        })
    }

    /// EHLO (`esmtp`) or HELO with a host name: a new start, counted as
    /// junk (or a loop of EHLO would hold a slot forever).
    ///
    /// The EHLO reply is written here rather than by smtp-proto's
    /// `EhloResponse`: that one adds " you had me at EHLO" to the first line
    /// and orders the keywords by its bit values, so the bytes clients and
    /// tests see would change.
    fn ehlo(&mut self, host: &str, esmtp: bool) -> Reply {
        let cfg = &self.shared.cfg;
        self.txn = None;
        self.helo = Some(clean_helo(host));
        self.esmtp = esmtp;
        if !esmtp {
            return Reply::new(250, "", cfg.hostname.clone()).then(Then::Junk);
        }
        let mut lines = vec![cfg.hostname.clone(), "PIPELINING".to_string(), format!("SIZE {}", cfg.max_message_size), "ETRN".to_string()];
        if self.offers_starttls() {
            lines.push("STARTTLS".to_string());
        }
        lines.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "DSN"].map(String::from));
        Reply::lines(250, lines).then(Then::Junk)
    }

    /// STARTTLS (RFC 3207), answered as Postfix's smtpd does.
    fn starttls(&mut self, arg_given: bool) -> Reply {
        if arg_given {
            return Reply::error(501, "5.5.4", "Syntax: STARTTLS");
        }
        if self.tls.is_some() {
            return Reply::error(554, "5.5.1", "Error: TLS already active");
        }
        if !self.offers_starttls() {
            return Reply::error(502, "5.5.1", "Error: command not implemented");
        }
        Reply::new(220, "2.0.0", "Ready to start TLS").then(Then::StartTls)
    }

    /// STARTTLS is offered: a usable certificate, and not in TLS yet.
    fn offers_starttls(&self) -> bool {
        #[cfg(feature = "tls")]
        {
            self.tls.is_none() && self.shared.tls.as_ref().is_some_and(|t| t.config().is_some())
        }
        #[cfg(not(feature = "tls"))]
        false
    }

    fn mail(&mut self, line: &[u8], parsed: &str, flags: u64) -> Reply {
        let cfg = self.shared.cfg.clone();
        if self.helo.is_none() {
            return Reply::error(503, "5.5.1", "Error: send HELO/EHLO first");
        }
        if self.txn.is_some() {
            return Reply::error(503, "5.5.1", "Error: nested MAIL command");
        }
        let smtputf8 = flags & MAIL_SMTPUTF8 != 0;
        // DSN (RFC 3461): RET and ENVID, checked and worded as Postfix.
        let dsn = match crate::dsn::mail_params(line) {
            Ok(d) => d,
            Err(text) => return Reply::error(501, "5.5.4", text),
        };
        let size = match policy::size_param(line) {
            Ok(s) => s.unwrap_or(0),
            Err(()) => return Reply::error(501, "5.5.4", "Bad SIZE parameter"),
        };
        if size > cfg.max_message_size {
            return Reply::error(552, "5.3.4", "Message size exceeds fixed limit");
        }
        let raw = policy::raw_path(line).unwrap_or(parsed);
        let sender = match policy::check_sender(raw, smtputf8) {
            Ok(s) => s,
            Err(r) => return self.refuse(r),
        };
        if let Some(why) = self.no_room(size) {
            // One line a minute: a flooder retries MAIL as fast as it can.
            static WARN: util::LogLimiter = util::LogLimiter::new();
            if let Some(n) = WARN.allow(util::now()) {
                log::warn!(target: SMTPD, "warning: {}: refusing mail: {why}{}", self.client, util::LogLimiter::unlogged(n));
            }
            return Reply::new(452, "4.3.1", "Insufficient system storage");
        }
        // Per-client limits: one client's share of the queue, its MAIL rate.
        let limits = crate::clients::Limits::of(&cfg);
        if let Err(r) = self.shared.stats.clients.check_mail(self.peer.ip(), &limits, util::now()) {
            return self.client_limited(r, &limits);
        }
        let id = util::new_queue_id();
        self.txn = Some(Txn { id, sender, body_8bit: flags & MAIL_BODY_8BITMIME != 0, smtputf8, rcpts: Vec::new(), dsn, rcpt_dsn: Vec::new() });
        Reply::new(250, "2.1.0", "Ok")
    }

    /// Why a message of `size` bytes cannot be taken now (disk, inodes,
    /// queue space, a spool that cannot be written): said with 452 at MAIL
    /// rather than 250 and lose it later (or 451 at DATA).
    fn no_room(&self, size: u64) -> Option<String> {
        let cfg = &self.shared.cfg;
        let inode_reserve = crate::spool::inode_reserve(cfg.max_connections, cfg.delivery_connections);
        match self.shared.spool.disk_space() {
            Err(e) => Some(format!("cannot check spool free space: {e}")),
            Ok(d) if d.read_only => Some("spool file system is read-only".to_string()),
            Ok(d) if d.avail < cfg.min_free_space.saturating_add(size) => Some("spool free space below reserve".to_string()),
            // files == 0: no inode limit (btrfs).
            Ok(d) if d.files > 0 && d.favail < inode_reserve => {
                Some(format!("spool free inodes ({}) below reserve ({inode_reserve})", d.favail))
            }
            Ok(_) if self.shared.stats.spool_unwritable.load(std::sync::atomic::Ordering::Relaxed) => {
                Some("spool not writable (a write failed; waiting for the scheduler's probe)".to_string())
            }
            Ok(_) if Stats::get(&self.shared.stats.queue_messages) as usize >= cfg.max_queue_messages => Some("queue is full".to_string()),
            Ok(_) => None,
        }
    }

    /// Refuses MAIL for a per-client limit, as Postfix words its rate limit.
    /// Logged at most once a minute per client and limit (see clients.rs);
    /// the counters count every refusal.
    fn client_limited(&self, r: crate::clients::Refused, limits: &crate::clients::Limits) -> Reply {
        use crate::clients::{Limit, Warn};
        let ip = self.peer.ip().to_canonical();
        let st = &self.shared.stats;
        let n = r.n;
        let log = match r.warn {
            Warn::Log { earlier } => {
                crate::clients::log_unlogged(crate::clients::ClientKey::of(ip), earlier);
                true
            }
            Warn::Quiet => false,
        };
        // Counted as an error: a client that keeps trying is cut off at
        // error_limit and its slot freed.
        match r.limit {
            Limit::QueueShare => {
                Stats::inc(&st.client_refusals_queue_share);
                if log {
                    log::warn!(
                        target: SMTPD,
                        "warning: Queue share limit exceeded: {n} messages from {} in the queue (smtpd_client_queue_share: {})",
                        self.client,
                        limits.queued
                    );
                }
                Reply::error(452, "4.3.1", format!("Error: too much mail from {ip} in the queue; try again later"))
            }
            // (check_mail never answers Connections.)
            Limit::Rate | Limit::Connections => {
                Stats::inc(&st.client_refusals_rate);
                if log {
                    log::warn!(target: SMTPD, "warning: Message delivery request rate limit exceeded: {n} from {} for service smtp", self.client);
                }
                Reply::error(450, "4.7.1", format!("Error: too much mail from {ip}"))
            }
        }
    }

    async fn rcpt(&mut self, line: &[u8], parsed: &str, flags: u64) -> Reply {
        let cfg = self.shared.cfg.clone();
        let Some(txn) = &self.txn else {
            return Reply::error(503, "5.5.1", "Error: need MAIL command");
        };
        // NOTIFY and ORCPT were taken out of what smtp-proto parsed: any
        // flag left is an extension not offered (RRVS, CONNEG).
        if flags != 0 {
            return Reply::error(555, "5.5.4", "Unsupported option");
        }
        // DSN (RFC 3461): NOTIFY and ORCPT, checked and worded as Postfix.
        let dsn = match crate::dsn::rcpt_params(line) {
            Ok(d) => d,
            Err(text) => return Reply::error(501, "5.5.4", text),
        };
        if txn.rcpts.len() >= cfg.max_recipients {
            return Reply::new(452, "4.5.3", "Error: too many recipients");
        }
        let Some(raw) = policy::raw_path(line) else {
            return Reply::error(501, "5.5.4", "Syntax: RCPT TO:<address>");
        };
        // A snapshot: no file is read here (the watcher thread does that).
        let verdict = match policy::check_address(&cfg, raw, parsed, txn.smtputf8) {
            Ok(addr) => self.listed_or_verified(addr).await,
            Err(r) => Err(r),
        };
        match verdict {
            Ok(addr) => {
                self.add_rcpt(addr, dsn);
                Reply::new(250, "2.1.5", "Ok")
            }
            Err(r) => {
                // NOQUEUE until a recipient was accepted, then the queue
                // ID, as Postfix (which creates the queue file then).
                log::info!(
                    target: SMTPD,
                    "{}: reject: RCPT from {}: {}; from=<{}> to=<{}> proto={} helo=<{}>",
                    if txn.rcpts.is_empty() { "NOQUEUE" } else { txn.id.as_str() },
                    self.client,
                    r.line(),
                    txn.sender,
                    raw,
                    if self.esmtp { "ESMTP" } else { "SMTP" },
                    self.helo.as_deref().unwrap_or("")
                );
                self.refuse(r)
            }
        }
    }

    /// An accepted recipient joins the transaction (once: a repeated one is
    /// answered 250 and kept once).
    fn add_rcpt(&mut self, addr: String, dsn: crate::dsn::RcptDsn) {
        if let Some(t) = self.txn.as_mut()
            && !t.rcpts.iter().any(|r| r.eq_ignore_ascii_case(&addr))
        {
            if t.rcpts.is_empty() {
                // As Postfix's smtpd, when the first recipient is accepted
                // (and its queue file created): pflogsumm counts a message
                // received here.
                log::info!(target: SMTPD, "{}: client={}", t.id, self.client);
            }
            t.rcpts.push(addr);
            t.rcpt_dsn.push(dsn);
        }
    }

    /// The recipients list, then (with `verify_recipients`) the primary's
    /// answer, fresh or cached. The list wins when it has the address. One
    /// it lacks is verified too (the file may be stale; the primary is the
    /// authority); with no answer to be had then, it gets 450 (neither the
    /// list nor the primary vouched for it: no backscatter, and no
    /// permanent refusal because of a stale file).
    async fn listed_or_verified(&self, addr: String) -> Result<String, policy::Refusal> {
        use crate::verify::Verdict;
        use policy::Listed;
        let listed = self.shared.recipients.get().listed(&addr);
        let Some(v) = &self.shared.verifier else {
            return match listed.refusal(&addr) {
                Some(r) => Err(r),
                None => Ok(addr),
            };
        };
        if listed == Listed::Yes {
            return Ok(addr);
        }
        let primary = &self.shared.cfg.primary;
        let cut = |s: &str| s[..s.floor_char_boundary(200)].to_string();
        match v.verify(&addr).await {
            Verdict::Accept => Ok(addr),
            Verdict::Reject { cached: true, .. } => Err(policy::unverified_reject(&addr, "User unknown (the primary's answer, cached)")),
            Verdict::Reject { said, .. } => Err(policy::unverified_reject(&addr, &format!("host {primary} said: {}", cut(&said)))),
            Verdict::Defer(why) => Err(policy::unverified_defer(&addr, &cut(&why))),
            Verdict::Unknown(why) => match listed {
                Listed::No => Err(policy::unverified_defer(&addr, "not in the recipients list, and the primary cannot be asked now")),
                Listed::Unusable => Err(policy::lookup_failed(&addr)),
                _ if v.unknown_accepts() => Ok(addr),
                _ => {
                    let _ = why;
                    Err(policy::unverified_defer(&addr, "the primary cannot be asked now"))
                }
            },
        }
    }

    /// ETRN (RFC 1985), answered as Postfix's smtpd does (the loop counts
    /// it as junk, whatever the answer).
    fn etrn(&mut self, name: &str) -> Reply {
        let cfg = &self.shared.cfg;
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1", "Error: send HELO/EHLO first");
        }
        if self.txn.is_some() {
            return Reply::new(503, "5.5.1", "Error: MAIL transaction in progress");
        }
        let name = name.trim();
        if name.is_empty() {
            return Reply::new(500, "5.5.4", "Syntax: ETRN domain");
        }
        if !crate::config::allowed(&self.shared.etrn_allow, self.peer.ip()) && !crate::route::is_primary_addr(self.peer.ip()) {
            log::info!(target: SMTPD, "reject: ETRN from {}: 459 4.7.1 client not allowed", self.client);
            return Reply::new(459, "4.7.1", format!("<{name}>: Client access denied"));
        }
        if name.starts_with('#') {
            return Reply::new(458, "4.5.0", format!("Unable to queue messages for node <{name}>"));
        }
        let domain = name.trim_start_matches('@').trim_end_matches('.');
        let known = cfg.is_relay_domain(domain)
            || (name.starts_with('@') && cfg.relay_domains.iter().any(|d| d.ends_with(&format!(".{}", domain.to_ascii_lowercase()))));
        if !known {
            return Reply::new(459, "4.7.1", format!("<{name}>: service unavailable"));
        }
        let waiting = Stats::get(&self.shared.stats.queue_messages);
        self.shared.stats.request_flush();
        log::info!(target: SMTPD, "ETRN {name} from {}: queue run started ({waiting} messages)", self.client);
        if waiting == 0 {
            Reply::new(251, "2.0.0", format!("No messages waiting for node {domain}"))
        } else {
            Reply::new(250, "2.0.0", "Queuing started")
        }
    }

    /// DATA up to the 354: refused (no recipient, stuffing), or the
    /// transaction with its queue file begun and the Received header in it
    /// (a write error kept for after the body: the client is told then).
    fn open_queue_file(&mut self, stuffed: bool) -> Result<QueueFile, Reply> {
        if let Some(r) = self.data_refused(stuffed) {
            return Err(r);
        }
        let Some(txn) = self.txn.take() else {
            return Err(Reply::error(503, "5.5.1", "Error: need RCPT command"));
        };
        let now = util::now();
        let ticket = self.shared.committer.ticket();
        let mut w = match self.shared.spool.begin(&self.envelope(&txn, now)) {
            Ok(w) => w,
            Err(e) => {
                log::error!(target: SMTPD, "error: {}: cannot create queue file: {e}", txn.id);
                return Err(self.write_error());
            }
        };
        let io_error = w.write(self.received_header(&txn, now).as_bytes()).err();
        Ok(QueueFile { txn, w, ticket, now, io_error })
    }

    /// DATA refused before 354: no transaction, no recipient, or bytes
    /// sent before the 354 (`stuffed`).
    fn data_refused(&mut self, stuffed: bool) -> Option<Reply> {
        match &self.txn {
            None => return Some(Reply::error(503, "5.5.1", "Error: need RCPT command")),
            Some(t) if t.rcpts.is_empty() => return Some(Reply::error(554, "5.5.1", "Error: no valid recipients")),
            _ => {}
        }
        // A client must wait for 354 before sending the message; bytes
        // already waiting mean command/data stuffing. Refuse and close.
        if stuffed {
            log::warn!(target: SMTPD, "warning: {}: SMTP protocol synchronization error after DATA", self.client);
            self.txn = None;
            return Some(Reply::new(554, "5.5.0", "Error: SMTP protocol synchronization").then(Then::Close));
        }
        None
    }

    /// 451 for a queue file that could not be written (the caller logged why).
    fn write_error(&self) -> Reply {
        self.shared.stats.spool_write_failed();
        Reply::new(451, "4.3.0", "Error: queue file write error")
    }

    /// The queue file's envelope.
    fn envelope(&self, txn: &Txn, now: u64) -> Envelope {
        Envelope {
            id: txn.id.clone(),
            arrival: now,
            client: self.client.clone(),
            helo: self.helo.clone().unwrap_or_default(),
            sender: txn.sender.clone(),
            body_8bit: txn.body_8bit,
            smtputf8: txn.smtputf8,
            recipients: txn.rcpts.clone(),
            ret: txn.dsn.ret.clone(),
            envid: txn.dsn.envid.clone(),
            // Kept only when some recipient has parameters.
            dsn: if txn.rcpt_dsn.iter().all(|d| d.is_empty()) { Vec::new() } else { txn.rcpt_dsn.clone() },
        }
    }

    /// The Received header put on top of the message.
    fn received_header(&self, txn: &Txn, now: u64) -> String {
        let helo = self.helo.as_deref().unwrap_or_default();
        let for_clause = if txn.rcpts.len() == 1 { format!("\r\n\tfor <{}>", txn.rcpts[0]) } else { String::new() };
        // As Postfix (smtpd_tls_received_header): the TLS session in a
        // comment, and the protocol with an S (RFC 3848: ESMTPS).
        let using = self.tls.as_ref().map(|t| format!("\r\n\t(using {t})")).unwrap_or_default();
        format!(
            "Received: from {helo} ({} [{}]){using}\r\n\tby {} (Bartleby) with {}{} id {}{for_clause};\r\n\t{}\r\n",
            self.client.split('[').next().unwrap_or("unknown"),
            self.peer.ip().to_canonical(),
            self.shared.cfg.hostname,
            // RFC 6531 3.7.3: UTF8SMTP, UTF8ESMTP (as Postfix).
            match (txn.smtputf8, self.esmtp) {
                (true, _) => "UTF8ESMTP",
                (false, true) => "ESMTP",
                (false, false) => "SMTP",
            },
            if self.tls.is_some() { "S" } else { "" },
            txn.id,
            util::rfc5322_date(now)
        )
    }

    /// Streams the body into `w` up to the end of data. `Err(Some(reply))`:
    /// timed out (the reply closes the session); `Err(None)`: the peer is
    /// gone. A body over the size limit is read to its end but not stored.
    ///
    /// Each read waits at most data_timeout, and the whole DATA phase at
    /// most data_timeout plus one second per min_data_rate bytes received
    /// (the idea of Postfix's smtpd_min_data_rate, which Postfix applies
    /// only with smtpd_per_request_deadline; here always): a client that
    /// drips a byte just within each timeout cannot hold a slot for days.
    async fn receive<R: AsyncRead + Unpin>(
        &self,
        rd: &mut BufReader<R>,
        w: &mut SpoolWriter,
        mut io_error: Option<std::io::Error>,
        id: &QueueId,
    ) -> Result<Body, Option<Reply>> {
        let cfg = &self.shared.cfg;
        let mut parser = DataParser::new();
        let max = cfg.max_message_size;
        let mut too_big = false;
        let started = tokio::time::Instant::now();
        let mut got: u64 = 0;
        loop {
            let mut wait = cfg.data_timeout;
            if let Some(secs) = got.checked_div(cfg.min_data_rate) {
                let allowed = cfg.data_timeout + Duration::from_secs(secs);
                wait = wait.min(allowed.saturating_sub(started.elapsed()));
            }
            let avail = match timeout(wait, rd.fill_buf()).await {
                Err(_) => {
                    log::info!(target: SMTPD, "{id}: timeout after DATA from {}", self.client);
                    return Err(Some(Reply::new(421, "4.4.2", format!("{} Error: timeout exceeded", cfg.hostname)).then(Then::Close)));
                }
                Ok(Err(_)) => return Err(None),
                Ok(Ok([])) => {
                    log::info!(target: SMTPD, "{id}: lost connection after DATA from {}", self.client);
                    return Err(None);
                }
                Ok(Ok(a)) => a,
            };
            let mut sink = |b: &[u8]| {
                if too_big || io_error.is_some() {
                    return;
                }
                if w.size() + b.len() as u64 > max {
                    too_big = true;
                    return;
                }
                if let Err(e) = w.write(b) {
                    io_error = Some(e);
                }
            };
            let end = parser.feed(avail, &mut sink);
            let n = end.unwrap_or(avail.len());
            got += n as u64;
            rd.consume(n);
            if end.is_some() {
                return Ok(Body { parser, too_big, io_error });
            }
        }
    }

    /// A body received whole but refused: too big, a mail loop, bare line
    /// ends refused by `bare_newline`, or a queue file write error.
    fn body_refused(&self, body: &Body, id: &QueueId) -> Option<Reply> {
        let cfg = &self.shared.cfg;
        let (code, status, text): (u16, &'static str, Cow<'static, str>) = if body.too_big {
            (552, "5.3.4", "Error: message file too big".into())
        } else if body.parser.received > cfg.max_received_headers {
            (554, "5.4.6", format!("Error: too many hops ({} Received: headers): mail loop?", body.parser.received).into())
        } else if body.parser.bare_newlines > 0 && cfg.bare_newline == BareNewline::Reject {
            (550, "5.5.2", "Error: bare <CR> or <LF> received in message data".into())
        } else if let Some(e) = &body.io_error {
            log::error!(target: SMTPD, "error: {id}: queue file write error: {e}");
            self.shared.stats.spool_write_failed();
            (451, "4.3.0", "Error: queue file write error".into())
        } else {
            return None;
        };
        log::info!(target: SMTPD, "{id}: reject: DATA from {}: {code} {status} {text}", self.client);
        Stats::inc(&self.shared.stats.rejected);
        Some(if code >= 500 { Reply::error(code, status, text) } else { Reply::new(code, status, text) })
    }

    /// The end of DATA: the queue file closed and made durable, then the
    /// scheduler told and 250 said (never before).
    async fn commit(&mut self, w: SpoolWriter, ticket: Ticket, txn: Txn, now: u64) -> Reply {
        let size = match w.finish() {
            Ok(s) => s,
            Err(e) => {
                log::error!(target: SMTPD, "error: {}: queue file write error: {e}", txn.id);
                return self.write_error();
            }
        };
        // Durability: no "250" before the message and its queue entry are
        // on stable storage.
        if let Err(e) = self.shared.committer.commit(ticket).await {
            log::error!(target: SMTPD, "error: {}: cannot make queue file durable: {e}", txn.id);
            self.shared.stats.spool_write_failed();
            let _ = self.shared.spool.remove(&txn.id);
            return Reply::new(451, "4.3.0", "Error: queue file write error");
        }
        // Postfix's qmgr logs this as the message enters its active queue
        // (here: at once, the scheduler is told below).
        log::info!(
            target: crate::logging::QMGR,
            "{}: from=<{}>, size={size}, nrcpt={} (queue active)",
            txn.id,
            txn.sender,
            txn.rcpts.len()
        );
        Stats::inc(&self.shared.stats.received);
        self.shared.stats.clients.queued(self.peer.ip(), now);
        let _ = self.shared.queued.send((txn.id.clone(), size));
        // As Postfix: a client that delivers mail is not idling, so the
        // junk count starts again (clients that RSET between messages would
        // otherwise be cut off after a hundred).
        self.junk = 0;
        Reply::new(250, "2.0.0", format!("Ok: queued as {}", txn.id))
    }
}

/// The HELO name as it may appear in a header: printable ASCII, bounded.
fn clean_helo(h: &str) -> String {
    h.chars().filter(|c| c.is_ascii_graphic()).take(255).collect()
}

/// The session at its seam: a Session driven over an in-memory duplex
/// stream, with a spool in a temporary directory, asserting the exact
/// bytes a hostile or pipelining client gets. Postfix's behaviour in the
/// same case is said at each test.
#[cfg(test)]
mod seam_tests {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, DuplexStream};

    const HOST: &str = "backup.example.org";

    struct Fixture {
        root: PathBuf,
        rt: tokio::runtime::Runtime,
        shared: Arc<Shared>,
        _queued: tokio::sync::mpsc::UnboundedReceiver<(QueueId, u64)>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// A relay for example.org with a fresh spool; `extra` adds config lines.
    fn fixture(name: &str, extra: &str) -> Fixture {
        let root = std::env::temp_dir().join(format!("bartleby-session-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let spool = Spool::create(&root.join("spool")).unwrap();
        let cfg = Config::parse(
            &format!(
                "hostname = \"{HOST}\"\nspool = \"{}\"\nrelay_domains = [\"example.org\"]\nprimary = \"127.0.0.1:9\"\n\
                 min_free_space = 1\n{extra}",
                root.join("spool").display()
            ),
            "t.toml".as_ref(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let committer = {
            let _g = rt.enter();
            Committer::start(&spool).unwrap()
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            cfg: Arc::new(cfg),
            spool,
            committer,
            stats: Arc::new(Stats::new()),
            recipients: Recipients::new(policy::RecipientList::load(None).unwrap()),
            queued: tx,
            etrn_allow: Vec::new(),
            verifier: None,
            #[cfg(feature = "tls")]
            tls: None,
        });
        Fixture { root, rt, shared, _queued: rx }
    }

    /// The client's end of a session.
    struct Client(DuplexStream);

    impl Client {
        async fn send(&mut self, b: &[u8]) {
            self.0.write_all(b).await.unwrap();
        }

        /// One whole reply (through its last line, "ddd text").
        async fn reply(&mut self) -> String {
            let mut got = Vec::new();
            loop {
                let mut c = [0u8; 1];
                let n = timeout(Duration::from_secs(10), self.0.read(&mut c)).await.expect("no reply in 10 s").unwrap();
                assert_eq!(n, 1, "the session closed in the middle of a reply: {}", String::from_utf8_lossy(&got));
                got.push(c[0]);
                let line_start = got[..got.len() - 1].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if got.ends_with(b"\r\n") && got.get(line_start + 3) == Some(&b' ') {
                    return String::from_utf8(got).unwrap();
                }
            }
        }

        /// Everything until the session closes.
        async fn rest(&mut self) -> String {
            let mut got = Vec::new();
            timeout(Duration::from_secs(10), self.0.read_to_end(&mut got)).await.expect("the session did not close").unwrap();
            String::from_utf8(got).unwrap()
        }
    }

    impl Fixture {
        /// Runs `script` as the client of one session (the greeting read).
        fn talk<F: std::future::Future<Output = ()>>(&self, script: impl FnOnce(Client) -> F) {
            let shared = self.shared.clone();
            self.rt.block_on(async move {
                let (a, b) = tokio::io::duplex(1 << 20);
                let session = tokio::spawn(run(a, "192.0.2.7:4000".parse().unwrap(), shared));
                let mut c = Client(b);
                assert_eq!(c.reply().await, format!("220 {HOST} ESMTP Bartleby\r\n"));
                script(c).await;
                timeout(Duration::from_secs(10), session).await.expect("the session did not end").unwrap();
            });
        }

        fn queue(&self) -> Vec<QueueId> {
            self.shared.spool.ids().unwrap()
        }

        fn stored(&self, id: &str) -> Vec<u8> {
            let (mut r, _) = self.shared.spool.open_data(id).unwrap();
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        }
    }

    fn ehlo_reply(size: u64) -> String {
        format!("250-{HOST}\r\n250-PIPELINING\r\n250-SIZE {size}\r\n250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 DSN\r\n")
    }

    /// Without a certificate STARTTLS is neither offered nor accepted.
    /// Postfix with smtpd_tls_security_level = none: no STARTTLS keyword
    /// and "502 5.5.1 Error: command not implemented".
    #[test]
    fn starttls_absent() {
        let f = fixture("notls", "max_message_size = 65536\n");
        f.talk(|mut c| async move {
            c.send(b"EHLO client.test\r\n").await;
            assert_eq!(c.reply().await, ehlo_reply(65536));
            c.send(b"STARTTLS\r\n").await;
            assert_eq!(c.reply().await, "502 5.5.1 Error: command not implemented\r\n");
            c.send(b"STARTTLS now\r\n").await;
            assert_eq!(c.reply().await, "501 5.5.4 Syntax: STARTTLS\r\n");
            c.send(b"HELO client.test\r\n").await;
            assert_eq!(c.reply().await, format!("250 {HOST}\r\n"));
            c.send(b"QUIT\r\n").await;
            assert_eq!(c.rest().await, "221 2.0.0 Bye\r\n");
        });
    }

    /// A command must end in CR LF: a bare LF, or a CR inside the line, is
    /// refused and the session goes on (Postfix 3.9,
    /// smtpd_forbid_bare_newline = reject: "Error: bare <LF> received").
    #[test]
    fn bare_newline_in_a_command() {
        let f = fixture("barelf", "");
        f.talk(|mut c| async move {
            let refused = "500 5.5.2 Error: bare <CR> or <LF> received; commands end with <CR><LF>\r\n";
            c.send(b"NOOP\n").await;
            assert_eq!(c.reply().await, refused);
            c.send(b"NO\rOP\r\n").await;
            assert_eq!(c.reply().await, refused);
            c.send(b"NOOP\r\r\n").await;
            assert_eq!(c.reply().await, refused);
            c.send(b"NOOP\r\n").await;
            assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
            c.send(b"QUIT\r\n").await;
            assert_eq!(c.rest().await, "221 2.0.0 Bye\r\n");
        });
    }

    /// A line over max_line_length is read to its end, refused, never
    /// stored; the next command is read as one (Postfix: line_length_limit
    /// 2048, "500 5.5.2 Error: line too long" ... here without the
    /// truncated command being run).
    #[test]
    fn line_over_the_limit() {
        let f = fixture("longline", "max_line_length = 512\n");
        f.talk(|mut c| async move {
            let mut long = b"MAIL FROM:<".to_vec();
            long.extend(std::iter::repeat_n(b'a', 5000));
            long.extend_from_slice(b"@example.org>\r\nNOOP\r\n");
            c.send(&long).await;
            assert_eq!(c.reply().await, "500 5.5.2 Error: line too long\r\n");
            assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
            // Exactly at the limit (the CR LF included) is a line.
            let mut at = b"NOOP ".to_vec();
            at.extend(std::iter::repeat_n(b'x', 512 - 7));
            at.extend_from_slice(b"\r\n");
            c.send(&at).await;
            assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
            at.insert(5, b'x');
            c.send(&at).await;
            assert_eq!(c.reply().await, "500 5.5.2 Error: line too long\r\n");
            c.send(b"QUIT\r\n").await;
            assert_eq!(c.rest().await, "221 2.0.0 Bye\r\n");
        });
    }

    /// Pipelined commands (RFC 2920) get every reply, in order, in one
    /// write; a refused recipient does not disturb the others.
    #[test]
    fn pipelining() {
        let f = fixture("pipelining", "max_message_size = 65536\n");
        f.talk(|mut c| async move {
            c.send(b"EHLO client.test\r\nMAIL FROM:<alice@sender.test> SIZE=100\r\nRCPT TO:<bob@example.org>\r\n\
                     RCPT TO:<eve@other.test>\r\nRCPT TO:<carol@example.org>\r\nNOOP\r\nRSET\r\nQUIT\r\n")
                .await;
            let want = format!(
                "{}250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.7.1 <eve@other.test>: Relay access denied\r\n250 2.1.5 Ok\r\n\
                 250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n",
                ehlo_reply(65536)
            );
            assert_eq!(c.rest().await, want);
        });
        assert_eq!(Stats::get(&f.shared.stats.rejected), 1);
        assert!(f.queue().is_empty());
    }

    /// RCPT before MAIL is an error; errors are counted once each, junk
    /// commands between them are not, and past error_limit the session
    /// is closed with 421 (Postfix: "503 5.5.1 Error: need MAIL command",
    /// then smtpd_hard_error_limit: "421 4.7.0 ... Error: too many errors").
    #[test]
    fn rcpt_before_mail_and_the_error_limit() {
        let f = fixture("errors", "error_limit = 3\n");
        f.talk(|mut c| async move {
            let need_mail = "503 5.5.1 Error: need MAIL command\r\n";
            c.send(b"HELO client.test\r\n").await;
            assert_eq!(c.reply().await, format!("250 {HOST}\r\n"));
            for _ in 0..3 {
                c.send(b"RCPT TO:<bob@example.org>\r\n").await;
                assert_eq!(c.reply().await, need_mail);
                c.send(b"NOOP\r\n").await;
                assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
            }
            c.send(b"RCPT TO:<bob@example.org>\r\n").await;
            assert_eq!(c.rest().await, format!("{need_mail}421 4.7.0 {HOST} Error: too many errors\r\n"));
        });
    }

    /// Past max_recipients each RCPT gets 452 4.5.3 and is not counted as
    /// an error; the message goes to the recipients accepted. Postfix
    /// (smtpd_recipient_limit) answers the same, and counts an error only
    /// past smtpd_recipient_overshoot_limit (1000).
    #[test]
    fn too_many_recipients() {
        let f = fixture("rcpts", "max_recipients = 100\nerror_limit = 1\n");
        f.talk(|mut c| async move {
            let mut script = b"EHLO client.test\r\nMAIL FROM:<alice@sender.test>\r\n".to_vec();
            for i in 0..103 {
                script.extend_from_slice(format!("RCPT TO:<user{i}@example.org>\r\n").as_bytes());
            }
            c.send(&script).await;
            c.reply().await;
            assert_eq!(c.reply().await, "250 2.1.0 Ok\r\n");
            for _ in 0..100 {
                assert_eq!(c.reply().await, "250 2.1.5 Ok\r\n");
            }
            for _ in 0..3 {
                assert_eq!(c.reply().await, "452 4.5.3 Error: too many recipients\r\n");
            }
            c.send(b"DATA\r\n").await;
            assert_eq!(c.reply().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
            c.send(b"Subject: many\r\n\r\nbody\r\n.\r\n").await;
            assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued as "));
            c.send(b"QUIT\r\n").await;
            assert_eq!(c.rest().await, "221 2.0.0 Bye\r\n");
        });
        let q = f.queue();
        assert_eq!(q.len(), 1);
        let m = f.shared.spool.read(&q[0]).unwrap();
        assert_eq!(m.env.recipients.len(), 100);
        assert_eq!(m.env.recipients[99], "user99@example.org");
    }

    /// 8-bit data is stored byte for byte, across read buffers and line
    /// pieces; the same data past max_message_size is read to its end and
    /// refused with 552 5.3.4 (Postfix: "552 5.3.4 Error: message file too
    /// big"), nothing of it is queued, and the session goes on.
    #[test]
    fn eight_bit_data_across_the_size_limit() {
        let f = fixture("8bit", "max_message_size = 65536\n");
        // 8-bit lines of 1500 bytes: longer than a line piece (1 KiB),
        // and the body crosses several 4 KiB reads.
        let line: Vec<u8> = (0..1500u32).map(|i| 0x80 + (i % 0x80) as u8).chain(*b"\r\n").collect();
        let small = line.repeat(20); // 30 KB
        let big = line.repeat(50); // 75 KB, over 64 KiB
        let (small2, big2) = (small.clone(), big.clone());
        let id = std::rc::Rc::new(std::cell::RefCell::new(String::new()));
        let id2 = id.clone();
        f.talk(|mut c| async move {
            c.send(b"EHLO client.test\r\n").await;
            c.reply().await;
            for (body, ok) in [(&big2, false), (&small2, true)] {
                c.send(b"MAIL FROM:<alice@sender.test> BODY=8BITMIME\r\n").await;
                assert_eq!(c.reply().await, "250 2.1.0 Ok\r\n");
                c.send(b"RCPT TO:<bob@example.org>\r\n").await;
                assert_eq!(c.reply().await, "250 2.1.5 Ok\r\n");
                c.send(b"DATA\r\n").await;
                assert_eq!(c.reply().await, "354 End data with <CR><LF>.<CR><LF>\r\n");
                c.send(b"Subject: 8 bit\r\n\r\n").await;
                c.send(body).await;
                c.send(b".\r\n").await;
                let r = c.reply().await;
                if ok {
                    let qid = r.strip_prefix("250 2.0.0 Ok: queued as ").and_then(|s| s.strip_suffix("\r\n")).expect(&r);
                    *id2.borrow_mut() = qid.to_string();
                } else {
                    assert_eq!(r, "552 5.3.4 Error: message file too big\r\n");
                }
            }
            c.send(b"QUIT\r\n").await;
            assert_eq!(c.rest().await, "221 2.0.0 Bye\r\n");
        });
        let id = id.borrow().clone();
        assert_eq!(f.queue().iter().map(|q| q.to_string()).collect::<Vec<_>>(), std::slice::from_ref(&id));
        let stored = f.stored(&id);
        assert!(stored.starts_with(b"Received: from client.test (unknown [192.0.2.7])\r\n"), "{}", String::from_utf8_lossy(&stored[..80]));
        let mut want = b"Subject: 8 bit\r\n\r\n".to_vec();
        want.extend_from_slice(&small);
        assert!(stored.ends_with(&want), "the 8-bit body was not stored byte for byte");
        assert!(f.shared.spool.read(&id).unwrap().env.body_8bit);
    }

    /// Bytes sent before the 354 (command or data stuffing, the SMTP
    /// smuggling family): refused and closed, nothing queued (Postfix:
    /// "554 5.5.0 Error: SMTP protocol synchronization" for a client that
    /// talks before the greeting or the 354 where it must wait).
    #[test]
    fn data_sent_before_354_is_stuffing() {
        let f = fixture("stuffing", "");
        f.talk(|mut c| async move {
            c.send(b"HELO client.test\r\nMAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\n").await;
            for _ in 0..3 {
                c.reply().await;
            }
            c.send(b"DATA\r\nSubject: smuggled\r\n\r\nbody\r\n.\r\n").await;
            assert_eq!(c.rest().await, "554 5.5.0 Error: SMTP protocol synchronization\r\n");
        });
        assert!(f.queue().is_empty());
    }

    /// Junk commands (NOOP, RSET, EHLO, ...) are counted apart from
    /// errors; past 100 the session is closed with 421, and a queued
    /// message starts the count again (Postfix: smtpd_junk_command_limit
    /// 100, reset when mail is delivered; Postfix then counts errors until
    /// its hard limit, here it closes at once).
    #[test]
    fn junk_limit_and_its_reset_by_a_queued_message() {
        let f = fixture("junk", "");
        f.talk(|mut c| async move {
            c.send(&b"NOOP\r\n".repeat(99)).await;
            for _ in 0..99 {
                assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
            }
            c.send(b"HELO client.test\r\nMAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@example.org>\r\n").await;
            assert_eq!(c.reply().await, format!("250 {HOST}\r\n"));
            c.reply().await;
            c.reply().await;
            c.send(b"DATA\r\n").await;
            c.reply().await;
            c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n").await;
            assert!(c.reply().await.starts_with("250 2.0.0 Ok: queued as "));
            c.send(&b"RSET\r\n".repeat(101)).await;
            for _ in 0..100 {
                assert_eq!(c.reply().await, "250 2.0.0 Ok\r\n");
            }
            assert_eq!(c.rest().await, format!("250 2.0.0 Ok\r\n421 4.7.0 {HOST} Error: too many junk commands\r\n"));
        });
    }

    /// A client that says nothing gets 421 4.4.2 after command_timeout and
    /// is closed (Postfix: smtpd_timeout, "421 4.4.2 host Error: timeout
    /// exceeded").
    #[test]
    fn silent_client_times_out() {
        let f = fixture("timeout", "command_timeout = 1\n");
        f.talk(|mut c| async move {
            let t = std::time::Instant::now();
            assert_eq!(c.rest().await, format!("421 4.4.2 {HOST} Error: timeout exceeded\r\n"));
            assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
        });
    }

    /// Commands smtp-proto cannot parse, or that are not offered, are
    /// errors with Postfix's wording.
    #[test]
    fn unknown_and_unsupported_commands() {
        let f = fixture("unknown", "");
        f.talk(|mut c| async move {
            c.send(b"EHLO client.test\r\n").await;
            c.reply().await;
            for (cmd, want) in [
                (&b"FOO bar\r\n"[..], "500 5.5.2 Error: command not recognized\r\n"),
                (b"LHLO client.test\r\n", "500 5.5.2 Error: command not recognized\r\n"),
                // smtp-proto's wording (Postfix: "501 Syntax: EHLO hostname").
                (b"EHLO\r\n", "501 5.5.4 Syntax: EHLO domain\r\n"),
                (b"AUTH PLAIN AGFAAGI=\r\n", "502 5.5.1 Error: command not implemented\r\n"),
                (b"BDAT 10 LAST\r\n", "502 5.5.1 Error: command not implemented\r\n"),
                (b"VRFY bob\r\n", "502 5.5.1 Error: command disabled on a backup MX\r\n"),
                // smtp-proto refuses it before policy::size_param sees it.
                (b"MAIL FROM:<alice@sender.test> SIZE=x\r\n", "501 5.5.4 Invalid parameter SIZE\r\n"),
                (b"MAIL FROM:<alice@sender.test> SIZE=99999999999\r\n", "552 5.3.4 Message size exceeds fixed limit\r\n"),
            ] {
                c.send(cmd).await;
                assert_eq!(c.reply().await, want, "{}", String::from_utf8_lossy(cmd));
            }
            c.send(b"QUIT\r\n").await;
            assert_eq!(c.rest().await, "221 2.0.0 Bye\r\n");
        });
    }

    /// DATA without a recipient: 503 with no MAIL, 554 with no accepted
    /// recipient (as Postfix).
    #[test]
    fn data_without_recipients() {
        let f = fixture("norcpt", "");
        f.talk(|mut c| async move {
            c.send(b"HELO client.test\r\nDATA\r\nMAIL FROM:<alice@sender.test>\r\nRCPT TO:<eve@other.test>\r\nDATA\r\nQUIT\r\n").await;
            assert_eq!(
                c.rest().await,
                format!(
                    "250 {HOST}\r\n503 5.5.1 Error: need RCPT command\r\n250 2.1.0 Ok\r\n\
                     550 5.7.1 <eve@other.test>: Relay access denied\r\n554 5.5.1 Error: no valid recipients\r\n221 2.0.0 Bye\r\n"
                )
            );
        });
    }
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A client inside TLS that stops reading: our replies fill the socket
    /// and the TLS layer's buffer. After command_timeout the session must
    /// still end and give back its slot. In clear the kernel keeps the last
    /// reply and shutdown(2) returns at once; in TLS the close_notify (and
    /// the replies before it) must be written first, and a socket that
    /// never drains held the session forever. Postfix bounds every write of
    /// smtpd, the TLS shutdown included, by smtpd_timeout.
    #[test]
    fn a_tls_client_that_never_reads_does_not_hold_its_session() {
        let root = std::env::temp_dir().join(format!("bartleby-session-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let (cert, key) = (root.join("cert.pem"), root.join("key.pem"));
        std::fs::write(&cert, crate::tls::tests::CERT).unwrap();
        std::fs::write(&key, crate::tls_io::tests::KEY).unwrap();
        let spool = Spool::create(&root.join("spool")).unwrap();
        let cfg = Config::parse(
            &format!(
                "hostname = \"backup.example.org\"\nspool = \"{}\"\nrelay_domains = [\"example.org\"]\nprimary = \"127.0.0.1:9\"\n\
                 command_timeout = 1\nmin_free_space = 1\n[tls]\ncertificate = \"{}\"\nkey = \"{}\"\nprimary = \"encrypt\"\n",
                root.join("spool").display(),
                cert.display(),
                key.display()
            ),
            "t.toml".as_ref(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stats = Arc::new(Stats::new());
        let committer = {
            let _g = rt.enter();
            Committer::start(&spool).unwrap()
        };
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let client = crate::tls::Client::new(&cfg).unwrap().unwrap();
        let ctx = Arc::new(Shared {
            tls: crate::tls::Server::start(&cfg, stats.clone()),
            cfg: Arc::new(cfg),
            spool,
            committer,
            stats,
            recipients: Recipients::new(policy::RecipientList::load(None).unwrap()),
            queued: tx,
            etrn_allow: Vec::new(),
            verifier: None,
        });
        assert!(ctx.tls.as_ref().unwrap().config().is_some());
        let ended = rt.block_on(async {
            let (a, mut b) = tokio::io::duplex(8192);
            let session = tokio::spawn(run(a, "192.0.2.7:4000".parse().unwrap(), ctx));
            async fn upto<R: AsyncRead + Unpin>(r: &mut R, end: &[u8]) -> Vec<u8> {
                let mut got = Vec::new();
                while !got.ends_with(end) {
                    let mut c = [0u8; 1];
                    assert_eq!(r.read(&mut c).await.unwrap(), 1, "{}", String::from_utf8_lossy(&got));
                    got.push(c[0]);
                }
                got
            }
            upto(&mut b, b"\r\n").await;
            b.write_all(b"EHLO client.test\r\n").await.unwrap();
            upto(&mut b, b"250 DSN\r\n").await;
            b.write_all(b"STARTTLS\r\n").await.unwrap();
            assert!(upto(&mut b, b"\r\n").await.starts_with(b"220 "));
            let (mut t, _, _) = client.connect("backup.example.org", b).await.unwrap();
            // 90 EHLOs (under the junk limit), ~190 bytes of reply each,
            // never read: more than the pipe holds.
            t.write_all(&b"EHLO client.test\r\n".repeat(90)).await.unwrap();
            t.flush().await.unwrap();
            // command_timeout is 1 s; give it 5.
            let ended = timeout(Duration::from_secs(5), session).await.is_ok();
            drop(t);
            ended
        });
        let _ = std::fs::remove_dir_all(&root);
        assert!(ended, "the session was still waiting to write to a client that never reads, 5 s after command_timeout (1 s)");
    }
}
