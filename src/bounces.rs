//! Bounces: RFC 3464 delivery status notifications. Role: writes a
//! notification into the spool (not durable: the scheduler commits and
//! schedules it); reads the original's queue file; touches nothing else.
//!
//! A bounce is an ordinary message queued with the null sender `<>` to the
//! original sender and delivered the same way as all other mail (to the
//! primary, which routes it on). It is a `multipart/report` with a
//! human-readable part, a `message/delivery-status` part and the original
//! headers (`text/rfc822-headers`): the body is returned only when the
//! sender asked for it (DSN `RET=FULL`) and it fits `bounce_size_limit`,
//! which keeps bounces small and backscatter harmless. The same writer
//! makes delay warnings and "relayed" success notices (DSN, RFC 3461).
//!
//! Never bounce a bounce (RFC 5321 6.1): mail from `<>` that fails is logged
//! and dropped; nor any other notice to `<>`.

use std::io::{self, BufRead, Read};

use crate::config::Config;
use crate::dsn;
use crate::delivery::Reply;
use crate::spool::{Envelope, QueuedMessage, Spool};
use crate::util;

/// How much of the original header section a bounce carries at most.
const MAX_RETURNED_HEADERS: u64 = 64 * 1024;
/// Room kept for a bounce's own text when the original is returned whole:
/// the bounce stays within `max_message_size`.
const BOUNCE_OVERHEAD: u64 = 16 * 1024;
/// And for each recipient reported: its line in the notice and its
/// delivery-status block (two addresses, an ORCPT, the diagnostic twice).
const RCPT_OVERHEAD: u64 = 3 * 1024;

/// What the notification reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The primary refused them with a 5xx.
    Rejected,
    /// They were still undelivered at max_queue_lifetime.
    Expired,
    /// Still undelivered after the delay warning time (a warning only).
    Delayed,
    /// Delivered to a primary that does not offer DSN, and the sender asked
    /// for NOTIFY=SUCCESS: "relayed".
    Relayed,
}

impl Reason {
    /// The NOTIFY condition that asks for it.
    pub fn notify(self) -> u8 {
        match self {
            Reason::Rejected | Reason::Expired => dsn::FAILURE,
            Reason::Delayed => dsn::DELAY,
            Reason::Relayed => dsn::SUCCESS,
        }
    }

    /// A non-delivery notice (the others only report).
    pub fn is_failure(self) -> bool {
        matches!(self, Reason::Rejected | Reason::Expired)
    }

    /// What Postfix logs for it: "ID: sender ... notification: NEWID".
    pub fn log_name(self) -> &'static str {
        match self {
            Reason::Rejected | Reason::Expired => "non-delivery",
            Reason::Delayed => "delay",
            Reason::Relayed => "delivery status",
        }
    }
}

/// Writes a notification for the recipients in `list` of `msg` into the
/// spool (not yet durable: the caller commits). Returns the new queue ID,
/// or `None` when the original sender is `<>` (no bounce for a bounce).
/// The caller has kept only the recipients whose NOTIFY asks for it.
pub fn queue_bounce(
    cfg: &Config,
    spool: &Spool,
    msg: &QueuedMessage,
    list: &[(String, Reply)],
    reason: Reason,
) -> io::Result<Option<util::QueueId>> {
    if msg.env.sender.is_empty() || list.is_empty() {
        return Ok(None);
    }
    let now = util::now();
    let id = util::new_queue_id();
    let n = Notice { cfg, msg, list, reason, now, full: returns_full(cfg, msg, list.len(), reason), boundary: format!("{id}.{now}/{}", cfg.hostname) };
    let env = Envelope {
        id: id.clone(),
        arrival: now,
        client: "local".into(),
        helo: cfg.hostname.clone(),
        sender: String::new(),
        // UTF-8 addresses in its text, 8-bit headers returned: 8BITMIME.
        body_8bit: msg.env.body_8bit || msg.env.smtputf8,
        // Addressed to a UTF-8 sender: an SMTPUTF8 message itself.
        smtputf8: !msg.env.sender.is_ascii(),
        recipients: vec![msg.env.sender.clone()],
        ..Default::default()
    };
    let mut w = spool.begin(&env)?;
    let mut t = Text(String::with_capacity(2048));
    n.headers(&mut t, &id, env.body_8bit);
    n.explanation(&mut t);
    n.delivery_status(&mut t);
    n.original_part(&mut t, env.body_8bit);
    // The original, streamed from the spool in small pieces (never whole
    // in memory): all of it with RET=FULL, else its header section.
    let res = w.write(t.0.as_bytes()).and_then(|()| copy_original(spool, msg, n.full, &mut w)).and_then(|()| w.write(format!("\r\n--{}--\r\n", n.boundary).as_bytes()));
    if let Err(e) = res {
        w.abort();
        return Err(e);
    }
    w.finish()?;
    Ok(Some(id))
}

/// RET=FULL returns the whole message, for failures only (Postfix returns
/// headers with delay and success notices), and only within
/// bounce_size_limit and what max_message_size leaves for the bounce of
/// `rcpts` recipients.
fn returns_full(cfg: &Config, msg: &QueuedMessage, rcpts: usize, reason: Reason) -> bool {
    reason.is_failure()
        && msg.env.ret == "FULL"
        && msg.size <= cfg.bounce_size_limit
        && msg.size.saturating_add(BOUNCE_OVERHEAD).saturating_add(RCPT_OVERHEAD.saturating_mul(rcpts as u64)) <= cfg.max_message_size
}

/// The text of a notification, a line at a time (CR LF added).
struct Text(String);

impl Text {
    fn h(&mut self, s: &str) {
        self.0.push_str(s);
        self.0.push_str("\r\n");
    }
}

/// What one notification is about.
struct Notice<'a> {
    cfg: &'a Config,
    msg: &'a QueuedMessage,
    list: &'a [(String, Reply)],
    reason: Reason,
    now: u64,
    /// The whole original is returned (else its headers).
    full: bool,
    boundary: String,
}

impl Notice<'_> {
    /// The header section and the MIME preamble.
    fn headers(&self, t: &mut Text, id: &util::QueueId, body_8bit: bool) {
        let (cfg, now) = (self.cfg, self.now);
        t.h(&format!("Received: by {} (Bartleby) id {id}; {}", cfg.hostname, util::rfc5322_date(now)));
        t.h(&format!("Date: {}", util::rfc5322_date(now)));
        t.h(&format!("From: MAILER-DAEMON@{} (Mail Delivery System)", cfg.hostname));
        t.h(&format!("To: {}", self.msg.env.sender));
        t.h(match self.reason {
            Reason::Rejected => "Subject: Undelivered Mail Returned to Sender",
            Reason::Expired => "Subject: Undelivered Mail Returned to Sender (delivery time expired)",
            Reason::Delayed => "Subject: Delayed Mail (still being retried)",
            Reason::Relayed => "Subject: Successful Mail Delivery Report",
        });
        t.h(&format!("Message-ID: <{id}.bounce@{}>", cfg.hostname));
        t.h("Auto-Submitted: auto-replied");
        t.h("MIME-Version: 1.0");
        t.h(&format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{}\"", self.boundary));
        t.h(if body_8bit { "Content-Transfer-Encoding: 8bit" } else { "Content-Transfer-Encoding: 7bit" });
        t.h("");
        t.h("This is a MIME-encapsulated message.");
        t.h("");
    }

    /// The human-readable part.
    fn explanation(&self, t: &mut Text) {
        let (cfg, msg) = (self.cfg, self.msg);
        let lifetime = cfg.max_queue_lifetime.as_secs();
        t.h(&format!("--{}", self.boundary));
        t.h("Content-Description: Notification");
        t.h("Content-Type: text/plain; charset=us-ascii");
        t.h("");
        t.h(&format!("This is the mail system at host {}, a backup mail server.", cfg.hostname));
        t.h("");
        match self.reason {
            Reason::Rejected => {
                t.h("I'm sorry to have to inform you that your message could not");
                t.h("be delivered to one or more recipients: the destination's");
                t.h("primary mail server refused them.");
            }
            Reason::Expired => {
                let days = lifetime as f64 / 86400.0;
                t.h("I'm sorry to have to inform you that your message could not");
                t.h(&format!("be delivered to one or more recipients within {} days: the", util::decimal(days, 1)));
                t.h("destination's primary mail server could not be reached.");
            }
            Reason::Delayed => {
                let hours = self.now.saturating_sub(msg.env.arrival) as f64 / 3600.0;
                t.h("####################################################################");
                t.h("# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #");
                t.h("####################################################################");
                t.h("");
                t.h(&format!("Your message could not be delivered for {} hour(s).", util::decimal(hours, 1)));
                t.h(&format!("It will be retried until {}.", util::rfc5322_date(msg.env.arrival.saturating_add(lifetime))));
            }
            Reason::Relayed => {
                t.h("Your message was successfully delivered to the destination(s)");
                t.h("listed below. If the message was delivered to mailbox you will");
                t.h("receive no further notifications. Otherwise you may still receive");
                t.h("notifications of mail delivery errors from other systems.");
            }
        }
        t.h("");
        if self.full {
            t.h("Your message is attached below.");
        } else if self.reason.is_failure() && msg.env.ret == "FULL" {
            t.h(&format!("Your message is too large to return ({} bytes); its headers", msg.size));
            t.h("are attached below.");
        } else {
            // Postfix's template would say "It's attached below." even then.
            t.h("The headers of your message are attached below; its text is");
            t.h("not returned.");
        }
        t.h("");
        t.h("For further assistance, please send mail to postmaster.");
        t.h("");
        for (rcpt, reply) in self.list {
            match self.reason {
                Reason::Relayed => t.h(&format!("<{rcpt}>: delivered to a host that does not support DSN: {}", ascii(&reply.text))),
                _ => t.h(&format!("<{rcpt}>: {}", ascii(&reply.text))),
            }
        }
        t.h("");
    }

    /// The `message/delivery-status` part: per-message fields (RFC 3464
    /// 2.2), in Postfix's order, then a block per recipient.
    fn delivery_status(&self, t: &mut Text) {
        let msg = self.msg;
        t.h(&format!("--{}", self.boundary));
        t.h("Content-Description: Delivery report");
        t.h("Content-Type: message/delivery-status");
        t.h("");
        t.h(&format!("Reporting-MTA: dns; {}", self.cfg.hostname));
        if !msg.env.envid.is_empty() {
            // Decoded, as Postfix writes it (the xtext was checked printable).
            t.h(&format!("Original-Envelope-Id: {}", dsn::printable(&dsn::xtext_decode(&msg.env.envid).unwrap_or_default())));
        }
        t.h(&format!("X-Bartleby-Queue-ID: {}", msg.env.id));
        t.h(&format!("X-Bartleby-Sender: rfc822; {}", msg.env.sender));
        t.h(&format!("Arrival-Date: {}", util::rfc5322_date(msg.env.arrival)));
        for (rcpt, reply) in self.list {
            t.h("");
            self.recipient_fields(t, rcpt, reply);
        }
        t.h("");
    }

    /// Per-recipient fields (RFC 3464 2.3).
    fn recipient_fields(&self, t: &mut Text, rcpt: &str, reply: &Reply) {
        let (cfg, msg, reason) = (self.cfg, self.msg, self.reason);
        let lifetime = cfg.max_queue_lifetime.as_secs();
        t.h(&format!("Final-Recipient: rfc822; {rcpt}"));
        let orig = msg.env.dsn_of(rcpt).original().unwrap_or_else(|| format!("rfc822; {rcpt}"));
        t.h(&format!("Original-Recipient: {orig}"));
        let (action, status) = match reason {
            Reason::Rejected => ("failed", reply.enhanced().filter(|s| s.starts_with('5')).unwrap_or("5.0.0").to_string()),
            // Held for SMTPUTF8 until now: 5.6.7, as Postfix says at once.
            Reason::Expired if reply.enhanced() == Some("4.6.7") => ("failed", "5.6.7".to_string()),
            Reason::Expired => ("failed", "4.4.7".to_string()),
            Reason::Delayed => ("delayed", reply.enhanced().filter(|s| s.starts_with('4')).unwrap_or("4.0.0").to_string()),
            Reason::Relayed => ("relayed", "2.0.0".to_string()),
        };
        t.h(&format!("Action: {action}"));
        t.h(&format!("Status: {status}"));
        if matches!(reason, Reason::Rejected | Reason::Relayed) || reply.code >= 400 && !reply.text.contains("connect to") {
            // The host that answered ("host NAME[ADDR] said: ..."), else the
            // configured primary; none with MX routing and no host named.
            let (primary_host, _) = crate::config::split_host_port(&cfg.primary).unwrap_or_default();
            let named = reply.text.strip_prefix("host ").and_then(|t| t.split('[').next()).filter(|n| !n.is_empty() && !n.contains(' '));
            let fixed = (!cfg.primary_list.is_empty() && !primary_host.is_empty()).then_some(primary_host.as_str());
            if let Some(mta) = named.or(fixed) {
                t.h(&format!("Remote-MTA: dns; {}", ascii(mta)));
            }
        }
        t.h(&format!("Diagnostic-Code: smtp; {}", ascii(&reply.text)));
        if msg.state.last_attempt > 0 {
            t.h(&format!("Last-Attempt-Date: {}", util::rfc5322_date(msg.state.last_attempt)));
        }
        if reason == Reason::Delayed {
            t.h(&format!("Will-Retry-Until: {}", util::rfc5322_date(msg.env.arrival.saturating_add(lifetime))));
        }
    }

    /// The headers of the part that returns the original (whole or its
    /// header section).
    fn original_part(&self, t: &mut Text, body_8bit: bool) {
        t.h(&format!("--{}", self.boundary));
        let undelivered = if matches!(self.reason, Reason::Relayed) { "" } else { "Undelivered " };
        if self.full {
            t.h(&format!("Content-Description: {undelivered}Message"));
            t.h("Content-Type: message/rfc822");
            if body_8bit {
                t.h("Content-Transfer-Encoding: 8bit");
            }
        } else {
            t.h(&format!("Content-Description: {undelivered}Message Headers"));
            t.h("Content-Type: text/rfc822-headers");
        }
        t.h("");
    }
}

/// Copies the original from the spool into the notification: all of it
/// (`full`), else its header section (at most [`MAX_RETURNED_HEADERS`]),
/// ending in a line end.
fn copy_original(spool: &Spool, msg: &QueuedMessage, full: bool, w: &mut crate::spool::SpoolWriter) -> io::Result<()> {
    let (mut rd, size) = spool.open_data(&msg.env.id)?;
    let mut last = b'\n';
    if full {
        let mut buf = [0u8; 4096];
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "queue file shorter than its header says"));
            }
            w.write(&buf[..n])?;
            last = buf[n - 1];
            left -= n as u64;
        }
    } else {
        let mut rd = rd.take(size.min(MAX_RETURNED_HEADERS));
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            let n = rd.read_until(b'\n', &mut line)?;
            if n == 0 || line == b"\r\n" {
                break;
            }
            w.write(&line)?;
            last = line[n - 1];
        }
    }
    if last != b'\n' {
        w.write(b"\r\n")?;
    }
    Ok(())
}

/// Diagnostic text as 7-bit printable ASCII on one line.
fn ascii(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(900).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Envelope;

    /// A fresh spool under a temporary root, and a config relaying for
    /// example.org.
    fn fixture(tag: &str) -> (std::path::PathBuf, Spool, Config) {
        let root = std::env::temp_dir().join(format!("bartleby-bounce-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::create(&root).unwrap();
        let cfg = Config::parse(
            "hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"mail.example.org:25\"\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        (root, spool, cfg)
    }

    /// The text of the bounce written for `reason`.
    fn bounce_text(reason: Reason) -> String {
        bounce_text_with(reason, |_| {})
    }

    fn bounce_text_with(reason: Reason, tweak: impl Fn(&mut Envelope)) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (root, spool, cfg) = fixture(&format!("{reason:?}-{n}"));
        let env = Envelope {
            id: util::QueueId::try_from("AAAA000000001").unwrap(),
            arrival: 1_795_320_958,
            client: "mx.sender.test[192.0.2.1]".into(),
            helo: "mx.sender.test".into(),
            sender: "alice@sender.test".into(),
            body_8bit: false,
            smtputf8: false,
            recipients: vec!["bob@example.org".into()],
            ..Default::default()
        };
        let mut env = env;
        tweak(&mut env);
        let mut w = spool.begin(&env).unwrap();
        w.write(b"Subject: hi\r\nX-Test: 1\r\n\r\nSECRET BODY LINE\r\n").unwrap();
        w.finish().unwrap();
        let msg = spool.read("AAAA000000001").unwrap();
        let failed = [("bob@example.org".to_string(), Reply::local(550, "5.1.1 <bob@example.org>: no such user"))];
        let id = queue_bounce(&cfg, &spool, &msg, &failed, reason).unwrap().unwrap();
        let (mut rd, _) = spool.open_data(&id).unwrap();
        let mut text = String::new();
        rd.read_to_string(&mut text).unwrap();
        let _ = std::fs::remove_dir_all(&root);
        text
    }

    /// RET=FULL of a queue file cut short on disk (its header says more
    /// bytes than are there): no bounce is queued, an error says why, and
    /// the original stays (the caller keeps the recipients deferred).
    #[test]
    fn ret_full_of_a_truncated_queue_file_queues_nothing() {
        let (root, spool, cfg) = fixture("trunc");
        let env = Envelope {
            id: util::QueueId::try_from("AAAA000000002").unwrap(),
            arrival: 1_795_320_958,
            sender: "alice@sender.test".into(),
            recipients: vec!["bob@example.org".into()],
            ret: "FULL".into(),
            ..Default::default()
        };
        let mut w = spool.begin(&env).unwrap();
        w.write(&[b'x'; 10_000]).unwrap();
        w.finish().unwrap();
        let msg = spool.read("AAAA000000002").unwrap();
        let path = root.join("queue/AAAA000000002");
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 5000).unwrap();
        let failed = [("bob@example.org".to_string(), Reply::local(550, "5.1.1 no such user"))];
        let err = queue_bounce(&cfg, &spool, &msg, &failed, Reason::Rejected).unwrap_err();
        // The spool's own length check refuses it before a byte is copied.
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("file holds 5000"), "{err}");
        let ids: Vec<String> = spool.ids().unwrap().iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, vec!["AAAA000000002".to_string()], "a half bounce was left in the queue");
        assert_eq!(std::fs::read_dir(root.join("incoming")).unwrap().count(), 0, "a partial bounce was left in incoming/");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// RET=FULL leaves room for each reported recipient: with many of them
    /// the original goes back as headers only, so the bounce never passes
    /// max_message_size (a fixed 16 KiB was short by ~2 KB per recipient).
    #[test]
    fn ret_full_leaves_room_for_every_reported_recipient() {
        let root = std::env::temp_dir().join(format!("bartleby-bounce-many-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::create(&root).unwrap();
        let cfg = Config::parse(
            "hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"mail.example.org:25\"\nmax_message_size = \"100K\"\nbounce_size_limit = \"1M\"\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let rcpts: Vec<String> = (0..20).map(|i| format!("user{i:02}@example.org")).collect();
        let env = Envelope {
            id: util::QueueId::try_from("AAAA000000003").unwrap(),
            arrival: 1_795_320_958,
            sender: "alice@sender.test".into(),
            recipients: rcpts.clone(),
            ret: "FULL".into(),
            ..Default::default()
        };
        let mut w = spool.begin(&env).unwrap();
        w.write(b"Subject: big\r\n\r\n").unwrap();
        w.write(&[b'x'; 78 * 1024]).unwrap();
        w.write(b"\r\n").unwrap();
        w.finish().unwrap();
        let msg = spool.read("AAAA000000003").unwrap();
        let long = format!("5.1.1 {}", "no such user ".repeat(60));
        for (n, whole) in [(1usize, true), (20, false)] {
            let failed: Vec<(String, Reply)> = rcpts[..n].iter().map(|a| (a.clone(), Reply::local(550, long.clone()))).collect();
            let id = queue_bounce(&cfg, &spool, &msg, &failed, Reason::Rejected).unwrap().unwrap();
            let (_, size) = spool.open_data(&id).unwrap();
            let mut text = String::new();
            spool.open_data(&id).unwrap().0.read_to_string(&mut text).unwrap();
            assert_eq!(text.contains("Content-Type: message/rfc822"), whole, "{n} recipients");
            assert!(size <= cfg.max_message_size, "{n} recipients: bounce of {size} bytes");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Only the headers are returned (text/rfc822-headers), so the notice
    /// must not say the message is attached. Postfix's default template says
    /// "It's attached below." even when it returns headers only (RET=HDRS
    /// or over bounce_size_limit), labelled "Undelivered Message Headers".
    #[test]
    fn says_that_only_the_headers_are_attached() {
        for reason in [Reason::Rejected, Reason::Expired] {
            let t = bounce_text(reason);
            let notice = t.split("Content-Type: message/delivery-status").next().unwrap();
            assert!(!notice.contains("It's attached below"), "{reason:?}: {notice}");
            assert!(notice.contains("The headers of your message are attached below"), "{reason:?}: {notice}");
            assert!(t.contains("Content-Type: text/rfc822-headers\r\n\r\nReceived: ") || t.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi"), "{t}");
            assert!(t.contains("X-Test: 1\r\n"), "{t}");
            assert!(!t.contains("SECRET BODY LINE"), "{reason:?}: the body was returned");
        }
    }

    /// RET=FULL returns the body (small message, default limit); ORCPT and
    /// ENVID appear decoded; delay and relayed notices say what they are
    /// and return headers only.
    #[test]
    fn dsn_fields_and_kinds() {
        let dsn = |e: &mut Envelope| {
            e.ret = "FULL".into();
            e.envid = "id+2B1".into();
            e.dsn = vec![dsn::RcptDsn { notify: "SUCCESS,FAILURE,DELAY".into(), orcpt: "rfc822;b+2Bbob@example.org".into() }];
        };
        let t = bounce_text_with(Reason::Rejected, dsn);
        assert!(t.contains("Content-Type: message/rfc822\r\n\r\n"), "{t}");
        assert!(t.contains("SECRET BODY LINE"), "{t}");
        assert!(t.contains("Original-Envelope-Id: id+1\r\n"), "{t}");
        assert!(t.contains("Original-Recipient: rfc822; b+bob@example.org\r\n"), "{t}");
        let t = bounce_text_with(Reason::Delayed, dsn);
        assert!(t.contains("Action: delayed\r\nStatus: 4.0.0\r\n"), "{t}");
        assert!(t.contains("Will-Retry-Until: "), "{t}");
        assert!(!t.contains("SECRET BODY LINE"), "{t}");
        let t = bounce_text_with(Reason::Relayed, dsn);
        assert!(t.contains("Action: relayed\r\nStatus: 2.0.0\r\n"), "{t}");
        assert!(!t.contains("SECRET BODY LINE"), "{t}");
    }
}
