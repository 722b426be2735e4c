//! Cross-site request defences of the status page: the per-process random
//! token of the flush form, the `Origin`/`Referer` check, constant-time
//! comparison of secrets, and `POST /flush` itself (with its rate limit).
//!
//! Role: decide whether a flush came from our own page. May touch: the
//! shared Stats (a flush request), the handler's last-flush time.

use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

use tiny_http::Request;

use super::backend::{header, send, text};
use super::gate;
use super::routes::Ctx;
use crate::logging::STATUS;

/// 128 random bits as hex, from the kernel ([`crate::sys::random_bytes`];
/// std's `RandomState`, itself seeded from the kernel, if it gives none).
pub(super) fn random_hex() -> String {
    let mut b = [0u8; 16];
    if !crate::sys::random_bytes(&mut b) {
        use std::hash::{BuildHasher, RandomState};
        let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b[..8].copy_from_slice(&RandomState::new().hash_one((t, std::process::id())).to_le_bytes());
        b[8..].copy_from_slice(&RandomState::new().hash_one((t, 1u8)).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Equality that does not stop at the first difference (for secrets).
pub(super) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// True when `url` (an Origin or Referer value) is `http(s)://host` or below it.
pub(super) fn same_origin(url: &str, host: &str) -> bool {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(r) => {
            let authority = r.split(['/', '?', '#']).next().unwrap_or("");
            authority.eq_ignore_ascii_case(host)
        }
        None => false,
    }
}

/// Whether a flush form came from our own page: the form's `token` field is
/// the page's token, and `Origin` (or, failing that, `Referer`), when the
/// browser sends one, names the `Host` the request was sent to.
fn from_our_page(body: &str, token: &str, host: &str, origin: Option<&str>, referer: Option<&str>) -> bool {
    let token_ok = body.split('&').filter_map(|kv| kv.split_once('=')).any(|(k, v)| k == "token" && same(v.trim(), token));
    // The token proves the form came from our page; Origin/Referer, when the
    // browser sends them, must agree (belt and braces against CSRF).
    let origin_ok = match (origin, referer) {
        (Some(o), _) => !host.is_empty() && same_origin(o, host),
        (None, Some(r)) => !host.is_empty() && same_origin(r, host),
        (None, None) => true,
    };
    token_ok && origin_ok
}

/// Whole seconds left of `interval` since `since` (rounded up, at least 1).
fn wait_secs(interval: Duration, since: Duration) -> u64 {
    let left = interval.saturating_sub(since);
    (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
}

/// `POST /flush`: vetted by [`from_our_page`], at most one per `[status] flush_interval`.
pub(super) fn flush(mut rq: Request, ctx: &mut Ctx, peer: &str) {
    let mut body = Vec::with_capacity(128);
    let _ = rq.as_reader().take(gate::MAX_BODY as u64).read_to_end(&mut body);
    let body = String::from_utf8_lossy(&body);
    if !from_our_page(&body, &ctx.token, header(&rq, "Host").unwrap_or(""), header(&rq, "Origin"), header(&rq, "Referer")) {
        log::warn!(target: STATUS, "warning: status page: refused a cross-site or stale flush from {peer}");
        return text(rq, 403, "403 Forbidden: this flush did not come from the status page (reload the page and try again)", &[]);
    }
    let interval = ctx.cfg.status.flush_interval;
    if let Some(t) = ctx.last_flush {
        let since = t.elapsed();
        if since < interval {
            let wait = wait_secs(interval, since);
            let msg = format!("429 Too Many Requests: the queue was flushed moments ago; try again in {wait} s");
            return text(rq, 429, &msg, &[("Retry-After", &wait.to_string())]);
        }
    }
    ctx.last_flush = Some(Instant::now());
    ctx.stats.request_flush();
    log::info!(target: STATUS, "flush requested from the status page by {peer}");
    send(rq, 303, "text/plain; charset=utf-8", b"303 See Other: /?flushed=1\n".to_vec(), &[("Location", "/?flushed=1")]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert!(same_origin("http://192.168.1.5:8080", "192.168.1.5:8080"));
        assert!(same_origin("http://relay.lan/?x", "RELAY.lan"));
        assert!(!same_origin("http://relay.lan.evil.test/", "relay.lan"));
        assert!(!same_origin("null", "relay.lan"));
        assert!(!same_origin("http://relay.lan:81", "relay.lan"));
    }

    #[test]
    fn random_tokens_differ() {
        let (a, b) = (random_hex(), random_hex());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(same(&a, &a) && !same(&a, &b));
    }

    /// Hostile forms first: no token, a wrong or truncated one, a token
    /// under another field name, a foreign Origin, a foreign Referer when
    /// Origin is missing, an Origin with no Host to compare with.
    #[test]
    fn flush_only_from_our_page() {
        let t = "0123456789abcdef0123456789abcdef";
        let host = "relay.lan:8080";
        let good = format!("token={t}");
        assert!(!from_our_page("", t, host, None, None));
        assert!(!from_our_page("token=", t, host, None, None));
        assert!(!from_our_page(&format!("token={}", &t[..31]), t, host, None, None));
        assert!(!from_our_page(&format!("xtoken={t}"), t, host, None, None));
        assert!(!from_our_page(&good, t, host, Some("http://evil.test"), None));
        assert!(!from_our_page(&good, t, host, None, Some("http://evil.test/relay.lan:8080")));
        assert!(!from_our_page(&good, t, "", Some("http://relay.lan:8080"), None));
        assert!(!from_our_page(&good, t, host, Some("null"), Some("http://relay.lan:8080/")));
        // ours: with or without Origin/Referer, among other fields
        assert!(from_our_page(&good, t, host, None, None));
        assert!(from_our_page(&format!("a=1&token={t}&b=2"), t, host, Some("http://relay.lan:8080"), None));
        assert!(from_our_page(&good, t, host, None, Some("http://RELAY.lan:8080/?x=1")));
    }

    #[test]
    fn flush_wait_rounds_up() {
        let s = Duration::from_secs;
        assert_eq!(wait_secs(s(60), s(0)), 60);
        assert_eq!(wait_secs(s(60), Duration::from_millis(59_001)), 1);
        assert_eq!(wait_secs(s(60), Duration::from_millis(58_999)), 2);
        assert_eq!(wait_secs(s(60), s(60)), 1);
        assert_eq!(wait_secs(s(60), s(61)), 1);
    }
}
