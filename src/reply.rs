//! An SMTP server reply, as every verb handler of [`session`](crate::session)
//! returns it: code, enhanced status, text (several lines for EHLO), and
//! what the session loop does once it is written (count an error, count a
//! junk command, close, quit, start TLS). The loop writes the reply and does
//! the counting, once, for every verb (as chasquid's and OpenSMTPD's verbs
//! return a reply and their loops count).
//!
//! Touches nothing but the bytes it writes into the caller's buffer.

use std::borrow::Cow;

/// What the session does after writing a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Nothing: read the next command.
    Next,
    /// The reply counts toward `error_limit` (past it: 421 and close).
    Error,
    /// A junk command (EHLO, HELO, NOOP, RSET, VRFY, HELP, ETRN): counts
    /// toward the junk limit (past it: 421 and close).
    Junk,
    /// Written, then the session is closed (421 timeout, 554 stuffing).
    Close,
    /// 221 to QUIT: written, then the session ends.
    Quit,
    /// 220 to STARTTLS: written, then the TLS handshake.
    StartTls,
}

/// One reply. `status` is empty for replies without an enhanced status
/// code (the greeting, HELO, 354, EHLO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: &'static str,
    pub text: Cow<'static, str>,
    /// Lines written before `text` as "code-line" (EHLO's hostname and
    /// capabilities); empty for a one-line reply.
    pub before: Vec<String>,
    pub then: Then,
}

impl Reply {
    /// A reply that is not counted.
    pub fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply { code, status, text: text.into(), before: Vec::new(), then: Then::Next }
    }

    /// A reply that counts as an error.
    pub fn error(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::new(code, status, text).then(Then::Error)
    }

    /// A multi-line reply (RFC 5321 4.2.1): every line but the last as
    /// "code-line", the last as "code line"; no enhanced status (EHLO).
    pub fn lines(code: u16, mut lines: Vec<String>) -> Reply {
        let last = lines.pop().unwrap_or_default();
        Reply { code, status: "", text: last.into(), before: lines, then: Then::Next }
    }

    /// The same reply, with what follows it.
    pub fn then(mut self, then: Then) -> Reply {
        self.then = then;
        self
    }

    /// Appends the reply's bytes to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let code = self.code.to_string();
        for l in &self.before {
            for part in [code.as_str(), "-", l, "\r\n"] {
                out.extend_from_slice(part.as_bytes());
            }
        }
        out.extend_from_slice(code.as_bytes());
        out.push(b' ');
        if !self.status.is_empty() {
            out.extend_from_slice(self.status.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(self.text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

impl From<crate::policy::Refusal> for Reply {
    /// A policy refusal counts as an error, whatever its class (a client
    /// that keeps trying refused addresses is cut off at error_limit).
    fn from(r: crate::policy::Refusal) -> Reply {
        Reply::error(r.code, r.status, r.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(r: &Reply) -> String {
        let mut v = Vec::new();
        r.write(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn one_line_with_and_without_enhanced_status() {
        assert_eq!(bytes(&Reply::new(250, "2.1.0", "Ok")), "250 2.1.0 Ok\r\n");
        assert_eq!(bytes(&Reply::new(354, "", "End data with <CR><LF>.<CR><LF>")), "354 End data with <CR><LF>.<CR><LF>\r\n");
        let e = Reply::error(500, "5.5.2", format!("Error: {}", "line too long"));
        assert_eq!(bytes(&e), "500 5.5.2 Error: line too long\r\n");
        assert_eq!(e.then, Then::Error);
        assert_eq!(Reply::new(250, "", "x").then, Then::Next);
    }

    #[test]
    fn multi_line_uses_dashes_but_on_the_last_line() {
        let r = Reply::lines(250, vec!["mx.example".into(), "PIPELINING".into(), "DSN".into()]);
        assert_eq!(bytes(&r), "250-mx.example\r\n250-PIPELINING\r\n250 DSN\r\n");
        assert_eq!(bytes(&Reply::lines(250, vec!["only".into()])), "250 only\r\n");
    }

    #[test]
    fn a_refusal_counts_as_an_error_even_when_temporary() {
        let r: Reply = crate::policy::Refusal { code: 450, status: "4.1.1", text: "<a@b>: try later".into() }.into();
        assert_eq!(r.then, Then::Error);
        assert_eq!(bytes(&r), "450 4.1.1 <a@b>: try later\r\n");
    }
}
