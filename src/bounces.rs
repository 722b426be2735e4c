//! Bounces: RFC 3464 delivery status notifications.
//!
//! A bounce is an ordinary message queued with the null sender `<>` to the
//! original sender and delivered the same way as all other mail (to the
//! primary, which routes it on). It is a `multipart/report` with a
//! human-readable part, a `message/delivery-status` part and the original
//! headers (`text/rfc822-headers`): the body is not returned, which keeps
//! bounces small and backscatter harmless.
//!
//! Never bounce a bounce (RFC 5321 6.1): mail from `<>` that fails is logged
//! and dropped.

use std::io::{self, BufRead, Read};

use crate::config::Config;
use crate::delivery::Reply;
use crate::spool::{Envelope, QueuedMessage, Spool};
use crate::util;

/// How much of the original header section a bounce carries at most.
const MAX_RETURNED_HEADERS: u64 = 64 * 1024;

/// Why recipients failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The primary refused them with a 5xx.
    Rejected,
    /// They were still undelivered at max_queue_lifetime.
    Expired,
}

/// Writes a bounce for `failed` recipients of `msg` into the spool (not yet
/// durable: the caller commits). Returns the new queue ID, or `None` when the
/// original sender is `<>` (no bounce for a bounce).
pub fn queue_bounce(
    cfg: &Config,
    spool: &Spool,
    msg: &QueuedMessage,
    failed: &[(String, Reply)],
    reason: Reason,
) -> io::Result<Option<util::QueueId>> {
    if msg.env.sender.is_empty() || failed.is_empty() {
        return Ok(None);
    }
    let now = util::now();
    let id = util::new_queue_id();
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
    };
    let mut w = spool.begin(&env)?;
    let boundary = format!("{id}.{now}/{}", cfg.hostname);
    let (primary_host, _) = crate::config::split_host_port(&cfg.primary).unwrap_or_default();
    let mut text = String::with_capacity(2048);
    let mut h = |s: &str| {
        text.push_str(s);
        text.push_str("\r\n");
    };
    h(&format!("Received: by {} (Bartleby) id {id}; {}", cfg.hostname, util::rfc5322_date(now)));
    h(&format!("Date: {}", util::rfc5322_date(now)));
    h(&format!("From: MAILER-DAEMON@{} (Mail Delivery System)", cfg.hostname));
    h(&format!("To: {}", msg.env.sender));
    h(match reason {
        Reason::Rejected => "Subject: Undelivered Mail Returned to Sender",
        Reason::Expired => "Subject: Undelivered Mail Returned to Sender (delivery time expired)",
    });
    h(&format!("Message-ID: <{id}.bounce@{}>", cfg.hostname));
    h("Auto-Submitted: auto-replied");
    h("MIME-Version: 1.0");
    h(&format!("Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\""));
    h("Content-Transfer-Encoding: 7bit");
    h("");
    h("This is a MIME-encapsulated message.");
    h("");
    h(&format!("--{boundary}"));
    h("Content-Description: Notification");
    h("Content-Type: text/plain; charset=us-ascii");
    h("");
    h(&format!("This is the mail system at host {}, a backup mail server.", cfg.hostname));
    h("");
    match reason {
        Reason::Rejected => {
            h("I'm sorry to have to inform you that your message could not");
            h("be delivered to one or more recipients: the destination's");
            h("primary mail server refused them.");
        }
        Reason::Expired => {
            let days = cfg.max_queue_lifetime.as_secs() as f64 / 86400.0;
            h("I'm sorry to have to inform you that your message could not");
            h(&format!("be delivered to one or more recipients within {days:.1} days: the"));
            h("destination's primary mail server could not be reached.");
        }
    }
    h("");
    // Only the headers are returned (text/rfc822-headers below); Postfix's
    // template would say "It's attached below." here even then.
    h("The headers of your message are attached below; its text is");
    h("not returned.");
    h("");
    h("For further assistance, please send mail to postmaster.");
    h("");
    for (rcpt, reply) in failed {
        h(&format!("<{rcpt}>: {}", ascii(&reply.text)));
    }
    h("");
    h(&format!("--{boundary}"));
    h("Content-Description: Delivery report");
    h("Content-Type: message/delivery-status");
    h("");
    h(&format!("Reporting-MTA: dns; {}", cfg.hostname));
    h(&format!("X-Bartleby-Queue-ID: {}", msg.env.id));
    h(&format!("X-Bartleby-Sender: rfc822; {}", msg.env.sender));
    h(&format!("Arrival-Date: {}", util::rfc5322_date(msg.env.arrival)));
    for (rcpt, reply) in failed {
        h("");
        h(&format!("Final-Recipient: rfc822; {rcpt}"));
        h(&format!("Original-Recipient: rfc822; {rcpt}"));
        h("Action: failed");
        let status = match reason {
            Reason::Rejected => reply.enhanced().filter(|s| s.starts_with('5')).unwrap_or("5.0.0").to_string(),
            // Held for SMTPUTF8 until now: 5.6.7, as Postfix says at once.
            Reason::Expired if reply.enhanced() == Some("4.6.7") => "5.6.7".to_string(),
            Reason::Expired => "4.4.7".to_string(),
        };
        h(&format!("Status: {status}"));
        if reason == Reason::Rejected || reply.code >= 400 && !reply.text.contains("connect to") {
            h(&format!("Remote-MTA: dns; {primary_host}"));
        }
        h(&format!("Diagnostic-Code: smtp; {}", ascii(&reply.text)));
        if msg.state.last_attempt > 0 {
            h(&format!("Last-Attempt-Date: {}", util::rfc5322_date(msg.state.last_attempt)));
        }
    }
    h("");
    h(&format!("--{boundary}"));
    h("Content-Description: Undelivered Message Headers");
    h("Content-Type: text/rfc822-headers");
    h("");
    if let Err(e) = w.write(text.as_bytes()) {
        w.abort();
        return Err(e);
    }
    // The original header section, streamed from the spool.
    let res = (|| -> io::Result<()> {
        let (rd, size) = spool.open_data(&msg.env.id)?;
        let mut rd = rd.take(size.min(MAX_RETURNED_HEADERS));
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            let n = rd.read_until(b'\n', &mut line)?;
            if n == 0 || line == b"\r\n" {
                break;
            }
            w.write(&line)?;
        }
        if line.last() != Some(&b'\n') && !line.is_empty() {
            w.write(b"\r\n")?;
        }
        w.write(format!("\r\n--{boundary}--\r\n").as_bytes())
    })();
    if let Err(e) = res {
        w.abort();
        return Err(e);
    }
    w.finish()?;
    Ok(Some(id))
}

/// Diagnostic text as 7-bit printable ASCII on one line.
fn ascii(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).take(900).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Envelope;

    /// The text of the bounce written for `reason`.
    fn bounce_text(reason: Reason) -> String {
        let root = std::env::temp_dir().join(format!("bartleby-bounce-{reason:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::create(&root).unwrap();
        let cfg = Config::parse(
            "hostname = \"backup.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"mail.example.org:25\"\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let env = Envelope {
            id: util::QueueId::try_from("AAAA000000001").unwrap(),
            arrival: 1_795_320_958,
            client: "mx.sender.test[192.0.2.1]".into(),
            helo: "mx.sender.test".into(),
            sender: "alice@sender.test".into(),
            body_8bit: false,
            smtputf8: false,
            recipients: vec!["bob@example.org".into()],
        };
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
}
