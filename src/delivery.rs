//! The delivery client: hands queued mail to the primary over SMTP.
//!
//! One connection carries many messages (RSET between them); when the
//! primary offers PIPELINING, MAIL, every RCPT and DATA go out in one write
//! (RFC 2920). The message is streamed from the spool with dot-stuffing of
//! every line that begins with `.`; the spool only holds CR LF line ends
//! (see [`data`](crate::data)), so no bare CR or LF can reach the primary.

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

use crate::config::{Config, split_host_port};
use crate::spool::{QueuedMessage, Spool};

/// A reply from the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// All lines joined with a space, CR LF removed.
    pub text: String,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        (200..300).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status code in the reply, if any (`5.1.1`).
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split_whitespace().nth(1)?;
        let parts: Vec<&str> = first.split('.').collect();
        (parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))).then_some(first)
    }

    /// A local failure, phrased as a reply (for logs and bounces).
    pub fn local(code: u16, text: impl Into<String>) -> Reply {
        Reply { code, text: format!("{code} {}", text.into()) }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The result of one message sent over an open connection.
#[derive(Debug)]
pub struct Outcome {
    /// Per recipient (in envelope order, pending ones only): the final reply.
    pub rcpts: Vec<(String, Reply)>,
    /// False when the connection must not be reused.
    pub reusable: bool,
}

/// An open, greeted connection to the primary.
pub struct Connection {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    /// `host[ip]:port` for the logs.
    pub relay: String,
    pipelining: bool,
    eightbit: bool,
    size_limit: Option<u64>,
    timeout: Duration,
    used: bool,
}

/// A failure to reach or talk to the primary at all.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub reply: Reply,
}

impl Connection {
    /// Resolves the primary, connects, reads the greeting and says EHLO
    /// (HELO when EHLO is refused).
    pub async fn open(cfg: &Config) -> Result<Connection, ConnectError> {
        let fail = |text: String| ConnectError { reply: Reply::local(421, format!("4.4.1 {text}")) };
        let (host, port) = split_host_port(&cfg.primary).map_err(fail)?;
        let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match timeout(cfg.connect_timeout, tokio::net::lookup_host((host.as_str(), port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err(fail(format!("Host or domain name not found: {host}: {e}"))),
                Err(_) => return Err(fail(format!("Host or domain name lookup timed out: {host}"))),
            },
        };
        let mut last = fail(format!("no address for {host}"));
        for addr in addrs {
            let relay = format!("{host}[{}]:{port}", addr.ip());
            let stream = match timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    last = fail(format!("connect to {relay}: {e}"));
                    continue;
                }
                Err(_) => {
                    last = fail(format!("connect to {relay}: Connection timed out"));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (r, w) = stream.into_split();
            let mut c = Connection {
                rd: BufReader::with_capacity(2048, r),
                wr: BufWriter::with_capacity(8192, w),
                relay,
                pipelining: false,
                eightbit: false,
                size_limit: None,
                timeout: cfg.delivery_timeout,
                used: false,
            };
            match c.greet(&cfg.hostname).await {
                Ok(()) => return Ok(c),
                Err(reply) => last = ConnectError { reply },
            }
        }
        Err(last)
    }

    async fn greet(&mut self, hostname: &str) -> Result<(), Reply> {
        let banner = self.read_reply().await?;
        if banner.code != 220 {
            return Err(self.refused(banner, "refused to talk to me:", ""));
        }
        self.send(&format!("EHLO {hostname}\r\n")).await?;
        let ehlo = self.read_reply_lines().await?;
        if ehlo.0.code == 250 {
            for l in &ehlo.1 {
                let kw = l.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
                match kw.as_str() {
                    "PIPELINING" => self.pipelining = true,
                    "8BITMIME" => self.eightbit = true,
                    "SIZE" => self.size_limit = l.split_whitespace().nth(1).and_then(|n| n.parse().ok()).filter(|n| *n > 0),
                    _ => {}
                }
            }
            return Ok(());
        }
        self.send(&format!("HELO {hostname}\r\n")).await?;
        let helo = self.read_reply().await?;
        if helo.code == 250 { Ok(()) } else { Err(self.refused(helo, "said:", " (in reply to HELO command)")) }
    }

    /// A refusal of the session itself (greeting, EHLO/HELO, RSET), as a
    /// temporary failure whatever its code. It says nothing about the mail:
    /// a primary that is starting up, overloaded or misconfigured may answer
    /// 554 to everyone for a while, and with one primary and no other MX a
    /// 5xx here would bounce the whole queue. Postfix defers in the same case
    /// (smtp_skip_5xx_greeting). Only replies to MAIL, RCPT and the end of
    /// data speak of a message and may be permanent.
    fn refused(&self, reply: Reply, verb: &str, context: &str) -> Reply {
        let code = if (400..500).contains(&reply.code) { reply.code } else { 421 };
        Reply { code, text: format!("host {} {verb} {}{context}", self.relay, reply.text) }
    }

    async fn send(&mut self, s: &str) -> Result<(), Reply> {
        let r = async {
            self.wr.write_all(s.as_bytes()).await?;
            self.wr.flush().await
        };
        match timeout(self.timeout, r).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Reply::local(421, format!("4.4.2 lost connection with {}: {e}", self.relay))),
            Err(_) => Err(Reply::local(421, format!("4.4.2 conversation with {} timed out", self.relay))),
        }
    }

    async fn read_reply(&mut self) -> Result<Reply, Reply> {
        self.read_reply_lines().await.map(|(r, _)| r)
    }

    /// Reads a possibly multi-line reply; also returns the text of each line
    /// after the first (the EHLO keywords).
    async fn read_reply_lines(&mut self) -> Result<(Reply, Vec<String>), Reply> {
        let relay = self.relay.clone();
        let lost = |why: &str| Reply::local(421, format!("4.4.2 {why} with {relay}"));
        let mut text = String::new();
        let mut lines = Vec::new();
        let mut line = Vec::with_capacity(128);
        for n in 0..100 {
            line.clear();
            let r = timeout(self.timeout, tokio::io::AsyncReadExt::take(&mut self.rd, 1024).read_until(b'\n', &mut line)).await;
            match r {
                Err(_) => return Err(lost("conversation timed out")),
                Ok(Err(_)) | Ok(Ok(0)) => return Err(lost("lost connection")),
                Ok(Ok(_)) => {}
            }
            let l = String::from_utf8_lossy(&line);
            let l = l.trim_end_matches(['\r', '\n']);
            if l.len() < 3 || !l.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                return Err(lost("malformed reply"));
            }
            let code: u16 = l[..3].parse().unwrap_or(0);
            let rest = l.get(4..).unwrap_or("");
            if n == 0 {
                text.push_str(l);
            } else {
                lines.push(rest.to_string());
                if text.len() < 400 {
                    text.push(' ');
                    text.push_str(rest);
                }
            }
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok((Reply { code, text }, lines));
            }
        }
        Err(lost("reply too long"))
    }

    /// Sends one message to its pending recipients.
    pub async fn deliver(&mut self, spool: &Spool, msg: &QueuedMessage) -> Outcome {
        let pending: Vec<String> = msg.pending().map(|r| r.addr.clone()).collect();
        let all = |reply: &Reply| pending.iter().map(|a| (a.clone(), reply.clone())).collect::<Vec<_>>();
        match self.deliver_inner(spool, msg, &pending).await {
            Ok(rcpts) => Outcome { rcpts, reusable: true },
            Err((reply, reusable)) => Outcome { rcpts: all(&reply), reusable },
        }
    }

    async fn deliver_inner(&mut self, spool: &Spool, msg: &QueuedMessage, pending: &[String]) -> Result<Vec<(String, Reply)>, (Reply, bool)> {
        if self.used {
            self.send("RSET\r\n").await.map_err(|r| (r, false))?;
            let r = self.read_reply().await.map_err(|r| (r, false))?;
            if !r.is_ok() {
                return Err((self.refused(r, "said:", " (in reply to RSET command)"), false));
            }
        }
        self.used = true;
        if let Some(limit) = self.size_limit
            && msg.size > limit {
                return Err((Reply::local(552, format!("5.3.4 message too big for {} ({} > {limit})", self.relay, msg.size)), true));
            }
        let mut mail = format!("MAIL FROM:<{}>", msg.env.sender);
        if self.size_limit.is_some() {
            mail.push_str(&format!(" SIZE={}", msg.size));
        }
        if msg.env.body_8bit && self.eightbit {
            mail.push_str(" BODY=8BITMIME");
        }
        mail.push_str("\r\n");
        let rcpt_lines: Vec<String> = pending.iter().map(|a| format!("RCPT TO:<{a}>\r\n")).collect();
        let mut results: Vec<(String, Reply)> = Vec::with_capacity(pending.len());
        let lost = |r: Reply| (r, false);

        if self.pipelining {
            let mut batch = mail.clone();
            for l in &rcpt_lines {
                batch.push_str(l);
            }
            batch.push_str("DATA\r\n");
            self.send(&batch).await.map_err(lost)?;
            let mail_r = self.read_reply().await.map_err(lost)?;
            for a in pending {
                let r = self.read_reply().await.map_err(lost)?;
                results.push((a.clone(), r));
            }
            let data_r = self.read_reply().await.map_err(lost)?;
            if !mail_r.is_ok() {
                if data_r.code == 354 {
                    // Should not happen (RFC 2920), but end the empty message cleanly.
                    self.send(".\r\n").await.map_err(lost)?;
                    let _ = self.read_reply().await.map_err(lost)?;
                }
                return Err((mail_r, true));
            }
            if data_r.code != 354 {
                if results.iter().all(|(_, r)| !r.is_ok()) {
                    return Ok(results);
                }
                return Ok(results.into_iter().map(|(a, r)| if r.is_ok() { (a, data_r.clone()) } else { (a, r) }).collect());
            }
            if results.iter().all(|(_, r)| !r.is_ok()) {
                self.send(".\r\n").await.map_err(lost)?;
                let _ = self.read_reply().await.map_err(lost)?;
                return Ok(results);
            }
        } else {
            self.send(&mail).await.map_err(lost)?;
            let mail_r = self.read_reply().await.map_err(lost)?;
            if !mail_r.is_ok() {
                return Err((mail_r, true));
            }
            for (a, l) in pending.iter().zip(&rcpt_lines) {
                self.send(l).await.map_err(lost)?;
                let r = self.read_reply().await.map_err(lost)?;
                results.push((a.clone(), r));
            }
            if results.iter().all(|(_, r)| !r.is_ok()) {
                return Ok(results);
            }
            self.send("DATA\r\n").await.map_err(lost)?;
            let data_r = self.read_reply().await.map_err(lost)?;
            if data_r.code != 354 {
                return Ok(results.into_iter().map(|(a, r)| if r.is_ok() { (a, data_r.clone()) } else { (a, r) }).collect());
            }
        }
        self.send_body(spool, msg).await.map_err(lost)?;
        // RFC 5321 4.5.3.2.6: allow the primary 10 minutes for the final reply.
        let saved = self.timeout;
        self.timeout = saved.max(Duration::from_secs(600)).min(saved * 2);
        let end_r = self.read_reply().await;
        self.timeout = saved;
        let end_r = end_r.map_err(lost)?;
        Ok(results.into_iter().map(|(a, r)| if r.is_ok() { (a, end_r.clone()) } else { (a, r) }).collect())
    }

    /// Streams the message with dot-stuffing, then the end-of-data line.
    async fn send_body(&mut self, spool: &Spool, msg: &QueuedMessage) -> Result<(), Reply> {
        let local = |e: std::io::Error| Reply::local(451, format!("4.3.0 cannot read queue file: {e}"));
        let (mut rd, size) = spool.open_data(&msg.env.id).map_err(local)?;
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::with_capacity(4096 + 64);
        let mut remaining = size;
        let mut at_bol = true;
        let mut last = b'\n';
        while remaining > 0 {
            let want = remaining.min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want]).map_err(local)?;
            if n == 0 {
                return Err(local(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "queue file shorter than its header says")));
            }
            remaining -= n as u64;
            out.clear();
            for &c in &buf[..n] {
                if at_bol && c == b'.' {
                    out.push(b'.');
                }
                out.push(c);
                at_bol = c == b'\n';
            }
            last = buf[n - 1];
            let w = timeout(self.timeout, self.wr.write_all(&out)).await;
            match w {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Reply::local(421, format!("4.4.2 lost connection with {} while sending message body: {e}", self.relay))),
                Err(_) => return Err(Reply::local(421, format!("4.4.2 conversation with {} timed out while sending message body", self.relay))),
            }
        }
        let tail: &str = if size == 0 || last == b'\n' { ".\r\n" } else { "\r\n.\r\n" };
        self.send(tail).await
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        if self.send("QUIT\r\n").await.is_ok() {
            let _ = timeout(Duration::from_secs(5), self.read_reply()).await;
        }
        let _ = self.wr.shutdown().await;
    }
}
