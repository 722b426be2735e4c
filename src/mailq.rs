//! `bartleby mailq`: the queue listing in the form of `sendmail -bp` and
//! Postfix's `mailq`, read straight from the spool (no server needed).

use std::io::{self, Write};

use crate::spool::{RcptStatus, Spool};
use crate::util;

/// Writes the listing.
pub fn print(spool: &Spool, out: &mut dyn Write) -> io::Result<()> {
    let msgs = spool.list()?;
    if msgs.is_empty() {
        writeln!(out, "Mail queue is empty")?;
        return Ok(());
    }
    writeln!(out, "-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------")?;
    let mut bytes = 0u64;
    for m in &msgs {
        bytes += m.size;
        let sender = if m.env.sender.is_empty() { "MAILER-DAEMON" } else { &m.env.sender };
        writeln!(out, "{:<13} {:>8} {:<20} {}", m.env.id.as_str(), m.size, util::mailq_date(m.env.arrival), sender)?;
        let mut last_err = "";
        for r in m.recipients.iter().filter(|r| r.status == RcptStatus::Pending) {
            let err = if r.error.is_empty() { m.state.last_error.as_str() } else { r.error.as_str() };
            if !err.is_empty() && err != last_err {
                writeln!(out, "{:>15}({})", "", err.chars().take(200).collect::<String>())?;
                last_err = err;
            }
            writeln!(out, "{:>44}{}", "", r.addr)?;
        }
        writeln!(out)?;
    }
    let n = msgs.len();
    writeln!(out, "-- {} Kbytes in {} Request{}.", bytes.div_ceil(1024), n, if n == 1 { "" } else { "s" })?;
    Ok(())
}
