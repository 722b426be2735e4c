//! `PUT /recipients`: the primary pushes its list of valid recipients.
//!
//! The gate ([`super::gate`]) vets the request head before a byte of the
//! body is read: the peer must be in `[status] push_allow` (a list of its
//! own: the primary need not be allowed to read the page, nor the page's
//! readers to push), and it must send `Authorization: Bearer TOKEN` with the
//! token held in `[status] push_token_file`, and a `Content-Length` of at
//! most the recipients list's cap. So nobody else can make the appliance
//! write to its disk. A bearer token is never sent by a browser on its own
//! (unlike a cookie or a Basic login it remembers), so a cross-site page
//! cannot forge a push: no CSRF token is needed, unlike the page's flush.
//!
//! A forwarder thread then streams the body into a temporary file in the
//! spool directory ([`crate::policy::PUSH_TMP`]), under a deadline, and
//! hands the file's name to the serial page handler, which parses it with
//! the recipients file's own reader and swaps it in
//! ([`crate::policy::Recipients::push`]). The body is never held in the
//! gate, and the handler is not blocked while a slow body arrives.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::config::{self, Cidr};
use crate::logging::STATUS;
use crate::util::LogLimiter;

/// A push's whole body must arrive within this time: 1 MiB at 600 kbit/s.
/// (The gate's own deadline, for page requests, is 5 s.)
pub const PUSH_DEADLINE: Duration = Duration::from_secs(15);
/// A token shorter than this is not used (push stays off): it could be guessed.
pub const MIN_TOKEN: usize = 16;

/// The outcome of a push, as counted in `bartleby_recipients_pushes_total`.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Accepted,
    /// Not in `push_allow`, or push is off (no `push_allow`, no usable token file).
    Forbidden,
    /// No token, or a wrong one.
    Unauthorized,
    TooLarge,
    /// No `Content-Length` (chunked bodies are not taken).
    LengthRequired,
    /// The body was cut short or did not arrive within [`PUSH_DEADLINE`].
    Incomplete,
    /// Not a list: a bad line, not UTF-8, no entries.
    BadList,
    /// Fewer than half the entries in force, without `?force=1`.
    Shrink,
    /// The spool could not keep it.
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Accepted,
        Outcome::Forbidden,
        Outcome::Unauthorized,
        Outcome::TooLarge,
        Outcome::LengthRequired,
        Outcome::Incomplete,
        Outcome::BadList,
        Outcome::Shrink,
        Outcome::Failed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Forbidden => "forbidden",
            Outcome::Unauthorized => "unauthorized",
            Outcome::TooLarge => "too_large",
            Outcome::LengthRequired => "length_required",
            Outcome::Incomplete => "incomplete",
            Outcome::BadList => "bad_list",
            Outcome::Shrink => "shrink",
            Outcome::Failed => "failed",
        }
    }
}

/// What the push needs: its configuration, where bodies go, counters.
pub struct Push {
    pub allow: Vec<Cidr>,
    pub token_file: Option<PathBuf>,
    /// The spool directory (temporary bodies, then `recipients.push`).
    pub dir: PathBuf,
    seq: AtomicU32,
    counts: [AtomicU32; 9],
    token_warning: LogLimiter,
    auth_warning: LogLimiter,
}

/// A refusal by the gate: status, reason, extra header lines, body text.
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
    pub extra: &'static str,
    pub text: String,
}

impl Push {
    pub fn new(allow: Vec<Cidr>, token_file: Option<PathBuf>, dir: PathBuf) -> Push {
        Push {
            allow,
            token_file,
            dir,
            seq: AtomicU32::new(0),
            counts: Default::default(),
            token_warning: LogLimiter::new(),
            auth_warning: LogLimiter::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.allow.is_empty() && self.token_file.is_some()
    }

    pub fn count(&self, o: Outcome) {
        self.counts[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn counted(&self, o: Outcome) -> u32 {
        self.counts[o as usize].load(Ordering::Relaxed)
    }

    pub fn may_push(&self, peer: IpAddr) -> bool {
        config::allowed(&self.allow, peer)
    }

    /// The token, read afresh (a new token needs no restart). Err: why push
    /// is off, naming the file. The token itself is never logged.
    pub fn token(&self) -> Result<String, String> {
        let Some(p) = &self.token_file else { return Err("no [status] push_token_file".into()) };
        let what = |e: &str| format!("[status] push_token_file {}: {e}", p.display());
        let (buf, _) = crate::util::read_small_file(p, 4096).map_err(|e| what(&e.to_string()))?;
        let t = std::str::from_utf8(&buf).map_err(|_| what("not text"))?.trim_matches(|c: char| c.is_ascii_whitespace());
        if t.is_empty() {
            return Err(what("empty"));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(what("not one word of printable ASCII (RFC 6750 token)"));
        }
        if t.len() < MIN_TOKEN {
            return Err(what(&format!("shorter than {MIN_TOKEN} characters (make one with `head -c 24 /dev/urandom | base64`)")));
        }
        Ok(t.to_string())
    }

    /// Logs, at most once a minute, why push is off.
    pub fn warn_token(&self, why: &str) {
        if let Some(n) = self.token_warning.allow(crate::util::now()) {
            log::warn!(target: STATUS, "warning: status page: push of the recipients list disabled: {why}{}", LogLimiter::unlogged(n));
        }
    }

    /// Vets the head of a `PUT /recipients` (already through the gate's
    /// `Host` check): who sends it, its token, its length.
    pub fn vet(&self, head: &[u8], peer: IpAddr) -> Result<(), (Outcome, Refusal)> {
        let refuse = |o, code, reason, extra, text: String| Err((o, Refusal { code, reason, extra, text }));
        let peer = peer.to_canonical();
        if self.allow.is_empty() {
            return refuse(Outcome::Forbidden, 403, "Forbidden", "", "push of the recipients list is disabled: [status] push_allow is empty".into());
        }
        if !self.may_push(peer) {
            log::debug!(target: STATUS, "status page: refused a push from {peer} (not in [status] push_allow)");
            return refuse(Outcome::Forbidden, 403, "Forbidden", "", format!("{peer} is not in [status] push_allow"));
        }
        let token = match self.token() {
            Ok(t) => t,
            Err(why) => {
                self.warn_token(&why);
                return refuse(Outcome::Forbidden, 403, "Forbidden", "", "push of the recipients list is disabled: no usable token file (see the log)".into());
            }
        };
        let text = std::str::from_utf8(head).unwrap_or("");
        let header = |name: &str| {
            text.split('\n').skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim_matches([' ', '\t', '\r']))
            })
        };
        let given = header("authorization").and_then(|v| {
            let (scheme, cred) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| cred.trim_start_matches(' '))
        });
        let ok = given.is_some_and(|g| super::csrf::same(g, &token));
        if !ok {
            if let Some(n) = self.auth_warning.allow(crate::util::now()) {
                log::warn!(
                    target: STATUS,
                    "warning: status page: refused a push of the recipients list from {peer}: {}{}",
                    if given.is_some() { "wrong token" } else { "no Authorization: Bearer token" },
                    LogLimiter::unlogged(n)
                );
            }
            let (extra, why) = if given.is_some() {
                ("WWW-Authenticate: Bearer realm=\"bartleby\", error=\"invalid_token\"\r\n", "the token is not the one in [status] push_token_file")
            } else {
                ("WWW-Authenticate: Bearer realm=\"bartleby\"\r\n", "send Authorization: Bearer <the token in [status] push_token_file>")
            };
            return refuse(Outcome::Unauthorized, 401, "Unauthorized", extra, why.into());
        }
        if header("content-length").is_none() {
            return refuse(
                Outcome::LengthRequired,
                411,
                "Length Required",
                "",
                "send Content-Length (curl -T FILE does; a chunked body, as from a pipe, is not taken)".into(),
            );
        }
        Ok(())
    }

    /// Streams `len` bytes of body (the first ones in `have`) from `stream`
    /// into a new temporary file in the spool directory, within
    /// [`PUSH_DEADLINE`]. Returns the file's name; on a refusal, the file
    /// is gone.
    pub fn receive(&self, stream: &mut TcpStream, have: &[u8], len: usize, buf: &mut [u8]) -> Result<String, (Outcome, Refusal)> {
        let name = format!("{}{}", crate::policy::PUSH_TMP, self.seq.fetch_add(1, Ordering::Relaxed));
        let path = self.dir.join(&name);
        let fail = |o, code, reason, text: String| (o, Refusal { code, reason, extra: "", text });
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| {
                log::warn!(target: STATUS, "warning: status page: push: cannot create {}: {e}", path.display());
                fail(Outcome::Failed, 500, "Internal Server Error", format!("cannot store the list: {e}"))
            })?;
        let r = copy_body(stream, &mut f, have, len, buf);
        drop(f);
        match r {
            Ok(()) => Ok(name),
            Err(e) => {
                remove(&path);
                let peer = stream.peer_addr().map(|a| a.ip().to_canonical().to_string()).unwrap_or_else(|_| "?".into());
                Err(match e {
                    Body::Short(got) => {
                        log::warn!(target: STATUS, "warning: status page: push from {peer} cut short: {got} of {len} bytes; the list in force is kept");
                        fail(Outcome::Incomplete, 400, "Bad Request", format!("body cut short: {got} of {len} bytes"))
                    }
                    Body::Late(got) => {
                        log::warn!(
                            target: STATUS,
                            "warning: status page: push from {peer} too slow: {got} of {len} bytes in {} s; the list in force is kept",
                            PUSH_DEADLINE.as_secs()
                        );
                        fail(Outcome::Incomplete, 408, "Request Timeout", format!("the body did not arrive within {} s", PUSH_DEADLINE.as_secs()))
                    }
                    Body::Disk(e) => {
                        log::warn!(target: STATUS, "warning: status page: push: cannot write {}: {e}", path.display());
                        fail(Outcome::Failed, 500, "Internal Server Error", format!("cannot store the list: {e}"))
                    }
                })
            }
        }
    }
}

enum Body {
    Short(usize),
    Late(usize),
    Disk(io::Error),
}

fn copy_body(stream: &mut TcpStream, f: &mut std::fs::File, have: &[u8], len: usize, buf: &mut [u8]) -> Result<(), Body> {
    let deadline = Instant::now() + PUSH_DEADLINE;
    let mut got = have.len().min(len);
    f.write_all(&have[..got]).map_err(Body::Disk)?;
    while got < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Body::Late(got));
        }
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let want = buf.len().min(len - got);
        match stream.read(&mut buf[..want]) {
            Ok(0) => return Err(Body::Short(got)),
            Ok(n) => {
                f.write_all(&buf[..n]).map_err(Body::Disk)?;
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Err(Body::Late(got)),
            Err(_) => return Err(Body::Short(got)),
        }
    }
    Ok(())
}

/// Removes a temporary body (gone already once it was taken: renamed).
pub fn remove(p: &Path) {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!(target: STATUS, "warning: status page: cannot remove {}: {e}", p.display()),
    }
}

/// True for the request line of a push: `PUT /recipients` (with a query or not).
pub fn is_push(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"PUT /recipients") else { return false };
    matches!(rest.first(), Some(b' ' | b'?'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(token: Option<&str>) -> (Push, PathBuf) {
        let dir = std::env::temp_dir().join(format!("bartleby-push-{}-{}", std::process::id(), token.map_or(0, str::len)));
        let _ = std::fs::create_dir(&dir);
        let tf = dir.join("token");
        if let Some(t) = token {
            std::fs::write(&tf, t).unwrap();
        }
        (Push::new(vec![Cidr::parse("192.0.2.10/32").unwrap()], Some(tf), dir.clone()), dir)
    }

    const TOKEN: &str = "0123456789abcdefXYZ";

    #[test]
    fn vets_who_and_the_token() {
        let (p, dir) = push(Some(&format!("  {TOKEN}\n")));
        let ok: IpAddr = "192.0.2.10".parse().unwrap();
        let head = |auth: &str| format!("PUT /recipients HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3\r\n\r\n").into_bytes();
        let code = |h: &[u8], peer| p.vet(h, peer).err().map(|(_, r)| r.code);
        assert_eq!(code(&head(&format!("Authorization: Bearer {TOKEN}\r\n")), ok), None);
        assert_eq!(code(&head(&format!("authorization: bearer  {TOKEN}\r\n")), ok), None);
        assert_eq!(code(&head(&format!("Authorization: Bearer {TOKEN}\r\n")), "192.0.2.11".parse().unwrap()), Some(403));
        assert_eq!(code(&head(&format!("Authorization: Bearer {TOKEN}\r\n")), "::ffff:192.0.2.10".parse().unwrap()), None);
        assert_eq!(code(&head(""), ok), Some(401));
        assert_eq!(code(&head(&format!("Authorization: Basic {TOKEN}\r\n")), ok), Some(401));
        assert_eq!(code(&head(&format!("Authorization: Bearer {TOKEN}x\r\n")), ok), Some(401));
        assert_eq!(code(&head(&format!("Authorization: Bearer {}\r\n", &TOKEN[1..])), ok), Some(401));
        let e = p.vet(&head("Authorization: Bearer nope\r\n"), ok).err().unwrap().1;
        assert!(e.extra.contains("invalid_token") && !e.text.contains(TOKEN));
        let no_len = format!("PUT /recipients HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
        assert_eq!(code(no_len.as_bytes(), ok), Some(411));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_token_file_turns_push_off() {
        for (t, why) in [(None, "No such file"), (Some(""), "empty"), (Some("short"), "shorter than 16"), (Some("two words here ok!"), "one word")] {
            let (p, dir) = push(t);
            let e = p.token().unwrap_err();
            assert!(e.contains(why) && e.contains("push_token_file"), "{e}");
            let h = b"PUT /recipients HTTP/1.1\r\nAuthorization: Bearer short\r\nContent-Length: 1\r\n\r\n";
            assert_eq!(p.vet(h, "192.0.2.10".parse().unwrap()).err().map(|(_, r)| r.code), Some(403));
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn push_requests() {
        assert!(is_push(b"PUT /recipients HTTP/1.1\r\n"));
        assert!(is_push(b"PUT /recipients?force=1 HTTP/1.1\r\n"));
        assert!(!is_push(b"PUT /recipientsx HTTP/1.1\r\n"));
        assert!(!is_push(b"POST /recipients HTTP/1.1\r\n"));
        assert!(!is_push(b"GET / HTTP/1.1\r\n"));
    }
}
