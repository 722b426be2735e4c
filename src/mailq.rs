//! `bartleby mailq`: the queue listing in the form of `sendmail -bp` and
//! Postfix's `mailq`, read straight from the spool (no server needed).
//!
//! Messages are read and printed one at a time (a queue of 10,000 is never
//! held in memory). A queue file that cannot be read never fails the
//! listing: it is shown by its ID with the reason, where Postfix's showq
//! would only log "warning: open deferred ID: Permission denied" and leave
//! it out. A message whose delivery state cannot be read is listed with
//! every recipient pending, and says so.
//!
//! May touch: reads the spool; writes only to `out`.

use std::io::{self, Write};

use crate::spool::{RcptStatus, Spool};
use crate::util;

/// Writes the listing.
pub fn print(spool: &Spool, out: &mut dyn Write) -> io::Result<()> {
    let ids = spool.ids()?;
    if ids.is_empty() {
        writeln!(out, "Mail queue is empty")?;
        return Ok(());
    }
    writeln!(out, "-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------")?;
    let mut bytes = 0u64;
    let (mut n, mut unreadable) = (0usize, 0usize);
    for id in &ids {
        let m = match spool.read(id) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // delivered meanwhile
            Err(e) => {
                unreadable += 1;
                writeln!(out, "{:<13} {:>8} (unreadable: {})\n", id.as_str(), "?", cut(&e.to_string(), 300))?;
                continue;
            }
        };
        n += 1;
        bytes += m.size;
        let sender = if m.env.sender.is_empty() { "MAILER-DAEMON" } else { &m.env.sender };
        writeln!(out, "{:<13} {:>8} {:<20} {}", m.env.id.as_str(), m.size, util::mailq_date(m.env.arrival), sender)?;
        if let Some(e) = &m.state_error {
            writeln!(out, "{:>15}(delivery state damaged, every recipient counts as pending: {})", "", cut(e, 200))?;
        }
        let mut last_err = "";
        for r in m.recipients.iter().filter(|r| r.status == RcptStatus::Pending) {
            let err = if r.error.is_empty() { m.state.last_error.as_str() } else { r.error.as_str() };
            if !err.is_empty() && err != last_err {
                writeln!(out, "{:>15}({})", "", cut(err, 200))?;
                last_err = err;
            }
            writeln!(out, "{:>44}{}", "", r.addr)?;
        }
        writeln!(out)?;
    }
    write!(out, "-- {} Kbytes in {} Request{}", bytes.div_ceil(1024), n, if n == 1 { "" } else { "s" })?;
    if unreadable > 0 {
        write!(out, ", {unreadable} unreadable")?;
    }
    writeln!(out, ".")?;
    Ok(())
}

fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Envelope;
    use crate::util::QueueId;

    fn listing(spool: &Spool) -> String {
        let mut out = Vec::new();
        print(spool, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn queue(spool: &Spool, sender: &str, rcpts: &[&str], body: &[u8], arrival: u64) -> (QueueId, u64) {
        let env = Envelope {
            id: util::new_queue_id(),
            arrival,
            client: "unknown[192.0.2.7]".into(),
            helo: "client.test".into(),
            sender: sender.into(),
            recipients: rcpts.iter().map(|r| r.to_string()).collect(),
            ..Envelope::default()
        };
        let mut w = spool.begin(&env).unwrap();
        w.write(body).unwrap();
        (env.id, w.finish().unwrap())
    }

    /// The layout of Postfix's mailq (showq): a title line, per message
    /// the ID, size, arrival and sender, each pending recipient indented
    /// to column 45, a blank line; the total in Kbytes. The null sender is
    /// shown as MAILER-DAEMON. A queue file that cannot be read is listed
    /// with the reason (Postfix leaves it out and logs a warning) and
    /// counted apart; the listing never fails on it.
    #[test]
    fn listing_as_postfix_mailq_with_an_unreadable_file() {
        let root = std::env::temp_dir().join(format!("bartleby-mailq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::create(&root).unwrap();
        assert_eq!(listing(&spool), "Mail queue is empty\n");

        let t = 1_700_000_000;
        let (a, size_a) = queue(&spool, "alice@sender.test", &["bob@example.org", "carol@example.org"], &[b'x'; 1500], t);
        let (b, size_b) = queue(&spool, "", &["postmaster@example.org"], b"bounce\r\n", t + 60);
        // Garbage where a queue file should be: not a spool file at all.
        let bad = util::new_queue_id();
        std::fs::write(root.join("queue").join(bad.as_str()), b"not a queue file\n").unwrap();

        let got = listing(&spool);
        let title = "-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------\n";
        assert!(got.starts_with(title), "{got}");
        let pad = " ".repeat(44);
        let entry_a = format!(
            "{:<13} {:>8} {:<20} alice@sender.test\n{pad}bob@example.org\n{pad}carol@example.org\n\n",
            a.as_str(),
            size_a,
            util::mailq_date(t)
        );
        let entry_b = format!("{:<13} {:>8} {:<20} MAILER-DAEMON\n{pad}postmaster@example.org\n\n", b.as_str(), size_b, util::mailq_date(t + 60));
        assert!(got.contains(&entry_a), "{got}");
        assert!(got.contains(&entry_b), "{got}");
        let unreadable = format!("{:<13} {:>8} (unreadable: ", bad.as_str(), "?");
        assert!(got.contains(&unreadable), "{got}");
        let total = format!("-- {} Kbytes in 2 Requests, 1 unreadable.\n", (size_a + size_b).div_ceil(1024));
        assert!(got.ends_with(&total), "{got}");
        assert_eq!(got.matches('\n').count(), 1 + 4 + 3 + 2 + 1, "{got}");

        // A recipient delivered is not listed; the pending one shows its
        // last error above it, as Postfix shows the defer reason.
        let st = crate::spool::DeliveryState {
            attempts: 1,
            last_error: "connect to 127.0.0.1:9: Connection refused".into(),
            done: vec![("bob@example.org".into(), RcptStatus::Sent, "250 2.0.0 Ok".into())],
            errors: vec![("carol@example.org".into(), "host 127.0.0.1 said: 452 4.2.2 Mailbox full".into())],
            ..Default::default()
        };
        spool.write_state(&a, &st, false).unwrap();
        let got = listing(&spool);
        let entry_a = format!(
            "{:<13} {:>8} {:<20} alice@sender.test\n{:>15}(host 127.0.0.1 said: 452 4.2.2 Mailbox full)\n{pad}carol@example.org\n\n",
            a.as_str(),
            size_a,
            util::mailq_date(t),
            ""
        );
        assert!(got.contains(&entry_a), "{got}");
        assert!(!got.contains("bob@example.org"), "{got}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
