//! The delivery client against an arbitrary primary.
//!
//! Input: byte 0 holds flags, the rest is everything the primary says, cut
//! into pieces at each 0xFF byte (the 0xFF bytes themselves are dropped).
//!
//! Flags bit 0 clear: `ReplyParser` alone.
//! 1. Cutting never matters: the replies and faults, and how many bytes each
//!    used, are the same whether the output comes whole, in the pieces, or
//!    byte by byte.
//! 2. Bounds: a reply's text is printable, starts with its code, holds at
//!    most MAX_REPLY_TEXT bytes; at most MAX_REPLY_LINES kept lines; the
//!    parser never holds more than MAX_REPLY_LINE bytes.
//!
//! Flags bit 0 set: a whole delivery (`Connection::handshake`, `deliver`,
//! `quit`) over an in-memory pipe, with time paused (every timeout fires at
//! once when nothing else can run). The primary hands over its next piece
//! only when the client waits for input, as a real peer answers a command;
//! after the last piece it falls silent (bit 1 clear) or closes (bit 1 set).
//! Bit 2: one recipient instead of two.
//! 3. No panic, and the delivery ends.
//! 4. THE invariant: a recipient comes back sent only if the client wrote
//!    the whole message, dot-stuffed, and the end-of-data line, then waited
//!    for the primary, and the pieces the primary handed over while the
//!    client waited there hold a 2xx reply, exactly: starting with the first
//!    piece after the end of data and ending where a piece ends (so no byte
//!    sent before the end of data, and nothing after the reply, was taken
//!    for it).
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, Waker};

mod watched;
use watched::Watched;

use bartleby::config::Config;
use bartleby::delivery::{Connection, MAX_REPLY_LINE, MAX_REPLY_LINES, MAX_REPLY_TEXT, Malformed, Parsed, ReplyParser};
use bartleby::spool::{Envelope, QueuedMessage, Spool};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadBuf};

const BODY: &[u8] = b"Subject: fuzz\r\n\r\n.dot line\r\nbody\r\n..\r\n.\r\nend\r\n";
const STUFFED: &[u8] = b"Subject: fuzz\r\n\r\n..dot line\r\nbody\r\n...\r\n..\r\nend\r\n.\r\n";

struct Harness {
    /// Time paused: a timeout fires at once when nothing else can run.
    rt: tokio::runtime::Runtime,
    spool: Spool,
    cfg: Config,
    two: QueuedMessage,
    one: QueuedMessage,
    _root: PathBuf,
}

fn queue(spool: &Spool, id: &str, rcpts: &[&str]) -> QueuedMessage {
    let env = Envelope {
        id: id.try_into().expect("queue id"),
        arrival: 1,
        client: "client.test[192.0.2.1]".into(),
        helo: "client.test".into(),
        sender: "alice@sender.test".into(),
        body_8bit: false,
        smtputf8: false,
        recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut w = spool.begin(&env).expect("begin");
    w.write(BODY).expect("write");
    w.finish().expect("finish");
    spool.read(id).expect("read")
}

static H: LazyLock<Harness> = LazyLock::new(|| {
    let root = std::env::temp_dir().join(format!("bartleby-fuzz-reply-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let spool = Spool::create(&root).expect("spool");
    let cfg = Config::parse(
        &format!(
            "hostname = \"backup.example.org\"\nspool = \"{}\"\nrelay_domains = [\"example.org\"]\n\
             primary = \"primary.example.org:25\"\ndelivery_timeout = \"30s\"\n",
            root.display()
        ),
        "fuzz.toml".as_ref(),
    )
    .expect("config");
    let two = queue(&spool, "AAAA0000000A1", &["bob@example.org", "carol@example.org"]);
    let one = queue(&spool, "AAAA0000000A2", &["dave@example.org"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("runtime");
    Harness { rt, spool, cfg, two, one, _root: root }
});

static DEBUG: LazyLock<bool> = LazyLock::new(|| std::env::var_os("BARTLEBY_FUZZ_DEBUG").is_some());

// ---- the parser alone ------------------------------------------------------

type Step = (usize, Result<Parsed, Malformed>);

/// Parses `pieces` fed one after the other, as the connection does (bytes
/// a result left unused are fed again). Returns each result with the
/// absolute offset where it ended, and the bytes left over.
fn parse(pieces: &[&[u8]]) -> (Vec<Step>, usize) {
    let mut p = ReplyParser::new();
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        pending.extend_from_slice(piece);
        loop {
            let (n, r) = p.feed(&pending);
            assert!(n <= pending.len(), "used {n} of {} bytes", pending.len());
            assert!(p.buffered() < MAX_REPLY_LINE, "parser holds {} bytes", p.buffered());
            pending.drain(..n);
            offset += n;
            match r {
                Some(r) => out.push((offset, r)),
                None => {
                    assert!(pending.is_empty(), "no result, yet {} bytes left unused", pending.len());
                    break;
                }
            }
        }
    }
    (out, pending.len())
}

fn check_reply(p: &Parsed) {
    let t = &p.reply.text;
    assert!(p.reply.code <= 999);
    assert!(t.len() <= MAX_REPLY_TEXT, "text of {} bytes", t.len());
    assert!(t.starts_with(&format!("{:03}", p.reply.code)), "text {t:?} for code {}", p.reply.code);
    assert!(!t.chars().any(|c| c.is_control()), "control character in {t:?}");
    assert!(p.lines.len() <= MAX_REPLY_LINES);
    assert!(p.lines.iter().all(|l| l.len() <= 80 && !l.chars().any(char::is_control)));
}

fn parser_only(pieces: &[&[u8]]) {
    let whole: Vec<u8> = pieces.concat();
    let (reference, left) = parse(&[whole.as_slice()]);
    for (_, r) in &reference {
        match r {
            Ok(p) => check_reply(p),
            Err(Malformed::NotAReply(l)) => assert!(l.len() <= 100 && !l.chars().any(char::is_control)),
            Err(_) => {}
        }
    }
    assert_eq!(parse(pieces), (reference.clone(), left), "pieces changed the result");
    let bytes: Vec<&[u8]> = whole.chunks(1).collect();
    assert_eq!(parse(&bytes), (reference, left), "byte by byte changed the result");
}

// ---- a whole delivery -----------------------------------------------------


/// Everything the client wrote so far, without waiting.
fn drain(rd: &mut DuplexStream, out: &mut Vec<u8>) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = [0u8; 4096];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut *rd).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => out.extend_from_slice(rb.filled()),
            _ => break,
        }
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

fn conversation(pieces: &[&[u8]], close: bool, msg: &QueuedMessage) {
    let h = &*H;
    let (outcome, client_out, marks) = h.rt.block_on(async {
        let (primary_side, client_rd) = tokio::io::duplex(1 << 20);
        let (client_wr, mut primary_rd) = tokio::io::duplex(1 << 20);
        let idle = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let rd = Watched { inner: client_rd, idle: idle.clone() };
        let client = {
            let done = done.clone();
            async move {
                let r = match Connection::handshake(Box::new(rd), Box::new(client_wr), None, "primary.example.org[192.0.2.25]:25".into(), &h.cfg).await {
                    Ok(mut c) => {
                        let o = c.deliver(&h.spool, msg).await;
                        if o.reusable {
                            c.quit().await;
                        }
                        Some(o)
                    }
                    Err(_) => None,
                };
                done.store(true, Ordering::SeqCst);
                r
            }
        };
        let primary = async {
            let mut wr = primary_side;
            let mut out = Vec::new();
            // (client output length when the piece was handed over, piece start)
            let mut marks = Vec::new();
            let mut at = 0;
            for p in pieces {
                while !idle.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
                    tokio::task::yield_now().await;
                }
                if done.load(Ordering::SeqCst) {
                    break;
                }
                drain(&mut primary_rd, &mut out);
                marks.push((out.len(), at));
                at += p.len();
                idle.store(false, Ordering::SeqCst);
                if wr.write_all(p).await.is_err() {
                    break;
                }
            }
            // Silence keeps the pipe open until the client gives up.
            let wr = if close { None } else { Some(wr) };
            (wr, out, marks, primary_rd)
        };
        let (outcome, (_wr, mut out, marks, mut primary_rd)) = tokio::join!(client, primary);
        drain(&mut primary_rd, &mut out);
        (outcome, out, marks)
    });
    let Some(outcome) = outcome else { return };
    if *DEBUG {
        eprintln!("--- client:\n{}\n--- outcome: {outcome:?}", String::from_utf8_lossy(&client_out));
    }
    let sent: Vec<_> = outcome.rcpts.iter().filter(|(_, r)| r.is_ok()).collect();
    assert!(outcome.rcpts.len() == msg.pending().count());
    if sent.is_empty() {
        return;
    }
    // Sent: the client wrote the message and the end of data ...
    let data = find(&client_out, b"DATA\r\n", 0).unwrap_or_else(|| panic!("sent {sent:?} without DATA"));
    let body = find(&client_out, STUFFED, data).unwrap_or_else(|| panic!("sent {sent:?} without the whole message"));
    let end = body + STUFFED.len();
    // ... then waited, and the primary's pieces handed over while it waited
    // (its output still ending with the end of data) hold a 2xx reply that
    // starts with the first of them and ends where the last of them ends:
    // nothing it read before the end of data, nothing more than the reply.
    let whole: Vec<u8> = pieces.concat();
    let (first_len, from) = *marks.iter().find(|(len, _)| *len >= end).unwrap_or_else(|| panic!("sent {sent:?}, but nothing came after the end of data"));
    assert_eq!(first_len, end, "sent {sent:?}, but the client wrote more after the end of data before any reply came");
    let (replies, _) = parse(&[&whole[from..]]);
    let (used, first) = replies.first().unwrap_or_else(|| panic!("sent {sent:?} on no reply"));
    let first = first.as_ref().unwrap_or_else(|e| panic!("sent {sent:?} on {e:?}"));
    assert!(first.reply.is_ok(), "sent {sent:?} on {:?}", first.reply);
    let reply_end = from + used;
    for (len, at) in &marks {
        if *at >= from && *at < reply_end {
            assert_eq!(*len, end, "sent {sent:?}, but part of the reply came after the client wrote more");
        }
    }
    let handed = marks.last().map_or(0, |(_, at)| *at + pieces[marks.len() - 1].len());
    assert!(
        marks.iter().any(|(_, at)| *at == reply_end) || reply_end == handed,
        "sent {sent:?} on a reply followed by more output ({reply_end} of {handed} bytes handed over)"
    );
    for (_, r) in &sent {
        assert_eq!(r.code, first.reply.code);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let pieces: Vec<&[u8]> = rest.split(|&b| b == 0xff).collect();
    if flags & 1 == 0 {
        parser_only(&pieces);
    } else {
        let h = &*H;
        let msg = if flags & 4 == 0 { &h.two } else { &h.one };
        conversation(&pieces, flags & 2 != 0, msg);
    }
    let _ = std::io::stderr().flush();
});
