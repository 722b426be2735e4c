//! `bartleby mailq`: the queue listing in the form of `sendmail -bp` and
//! Postfix's `mailq`, read straight from the spool (no server needed).
//!
//! Messages are read and printed one at a time (a queue of 10,000 is never
//! held in memory). A queue file that cannot be read never fails the
//! listing: it is shown by its ID with the reason, where Postfix's showq
//! would only log "warning: open deferred ID: Permission denied" and leave
//! it out. A message whose delivery state cannot be read is listed with
//! every recipient pending, and says so.

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
