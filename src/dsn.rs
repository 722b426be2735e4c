//! DSN parameters (RFC 3461): RET and ENVID on MAIL, NOTIFY and ORCPT on
//! RCPT. Read from the raw command line (smtp-proto decodes xtext and lets
//! `+ZZ` or `NOTIFY=SUCCESS,NEVER` through), validated as Postfix's smtpd
//! does, and kept as received: they are passed on to a primary unchanged.
//! Pure functions of the command line; where its path ends is policy's
//! scanner ([`crate::policy::path_end`]).

/// NOTIFY bits.
pub const NEVER: u8 = 1;
pub const SUCCESS: u8 = 2;
pub const FAILURE: u8 = 4;
pub const DELAY: u8 = 8;

/// RFC 3461 4.4: an ENVID is at most 100 characters.
const MAX_ENVID: usize = 100;
/// RFC 3461 4.2: an ORCPT (addr-type, ";" and the xtext) at most 500.
const MAX_ORCPT: usize = 500;

/// The DSN parameters of one recipient, as received; empty when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptDsn {
    /// The NOTIFY value (`SUCCESS,DELAY`).
    pub notify: String,
    /// The ORCPT value (`rfc822;bob+40example.org`).
    pub orcpt: String,
}

impl RcptDsn {
    pub fn is_empty(&self) -> bool {
        self.notify.is_empty() && self.orcpt.is_empty()
    }

    /// The NOTIFY bits; 0 when NOTIFY was not given.
    pub fn mask(&self) -> u8 {
        notify_mask(&self.notify).unwrap_or(0)
    }

    /// Whether a notice of this kind is wanted (RFC 3461 4.1: without
    /// NOTIFY, failures and, at the MTA's choice, delays are reported).
    pub fn wants(&self, what: u8) -> bool {
        match self.mask() {
            0 => what != SUCCESS,
            m => m & what != 0,
        }
    }

    /// The original recipient, decoded, for Original-Recipient
    /// (`rfc822; bob@example.org`); `None` without ORCPT.
    pub fn original(&self) -> Option<String> {
        let (ty, x) = self.orcpt.split_once(';')?;
        Some(format!("{ty}; {}", printable(&xtext_decode(x)?)))
    }
}

/// The bits of a NOTIFY value: NEVER alone, or a list of SUCCESS, FAILURE,
/// DELAY (any case). `None` when malformed.
pub fn notify_mask(v: &str) -> Option<u8> {
    let mut m = 0u8;
    for w in v.split(',') {
        let b = match w.to_ascii_uppercase().as_str() {
            "NEVER" => NEVER,
            "SUCCESS" => SUCCESS,
            "FAILURE" => FAILURE,
            "DELAY" => DELAY,
            _ => return None,
        };
        m |= b;
    }
    if m == 0 || (m & NEVER != 0 && m != NEVER) {
        return None;
    }
    Some(m)
}

/// Checks xtext (RFC 3461 4): printable ASCII but `+` and `=`, and `+HH`
/// hex escapes (Postfix takes lower-case hex digits too).
pub fn valid_xtext(s: &str) -> bool {
    xtext_decode(s).is_some()
}

/// Decodes xtext; `None` when it is not valid xtext.
pub fn xtext_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let h = |c: u8| (c as char).to_digit(16);
                let v = h(*b.get(i + 1)?)? << 4 | h(*b.get(i + 2)?)?;
                out.push(v as u8);
                i += 3;
            }
            b'=' => return None,
            c @ 0x21..=0x7e => {
                out.push(c);
                i += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Decoded text as printable ASCII (anything else as `?`).
pub fn printable(b: &[u8]) -> String {
    b.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '?' }).collect()
}

/// The DSN parameters of a MAIL command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailDsn {
    /// `FULL`, `HDRS` or empty.
    pub ret: String,
    /// The ENVID xtext as received, or empty.
    pub envid: String,
}

/// The parameters of a MAIL or RCPT line: what follows the path (the path
/// ends at the first `>` outside a quoted string).
fn params(line: &[u8]) -> &[u8] {
    let Some(colon) = line.iter().position(|&c| c == b':') else { return &[] };
    let rest = &line[colon + 1..];
    let start = rest.iter().position(|&c| c != b' ').unwrap_or(rest.len());
    let rest = &rest[start..];
    if rest.first() != Some(&b'<') {
        return rest.iter().position(|&c| c == b' ').map_or(&[], |i| &rest[i..]);
    }
    crate::policy::path_end(&rest[1..]).map_or(&[], |i| &rest[i + 2..])
}

/// Splits `KEY=value` words; yields (upper-case key, value bytes).
fn words(line: &[u8]) -> impl Iterator<Item = (String, &[u8])> {
    params(line).split(|&c| c == b' ').filter(|w| !w.is_empty()).map(|w| {
        let (k, v) = match w.iter().position(|&c| c == b'=') {
            Some(i) => (&w[..i], &w[i + 1..]),
            None => (w, &w[w.len()..]),
        };
        (String::from_utf8_lossy(k).to_ascii_uppercase(), v)
    })
}

/// The line without its DSN parameters, for smtp-proto (which decodes
/// xtext, knows only `rfc822` ORCPTs and lets some bad values through):
/// they are checked here instead. `None` when there are none.
pub fn without_params(line: &[u8]) -> Option<Vec<u8>> {
    let p = params(line);
    // Only MAIL's on MAIL and RCPT's on RCPT: NOTIFY on MAIL stays for
    // smtp-proto to refuse (555), as Postfix does.
    let keys: &[&str] = match line.get(..4) {
        Some(v) if v.eq_ignore_ascii_case(b"MAIL") => &["RET", "ENVID"],
        Some(v) if v.eq_ignore_ascii_case(b"RCPT") => &["NOTIFY", "ORCPT"],
        _ => return None,
    };
    let is_dsn = |w: &[u8]| {
        let k = w.split(|&c| c == b'=').next().unwrap_or(w);
        w.contains(&b'=') && keys.iter().any(|d| k.eq_ignore_ascii_case(d.as_bytes()))
    };
    if !p.split(|&c| c == b' ').any(is_dsn) {
        return None;
    }
    let head = &line[..line.len() - p.len()];
    let mut out = head.to_vec();
    // The last word holds the CR LF: keep it.
    let body = p.strip_suffix(b"\r\n").unwrap_or(p);
    for w in body.split(|&c| c == b' ').filter(|w| !w.is_empty() && !is_dsn(w)) {
        out.push(b' ');
        out.extend_from_slice(w);
    }
    out.extend_from_slice(&p[body.len()..]);
    Some(out)
}

/// The RET and ENVID of a MAIL line, or the reply text of Postfix's smtpd
/// for a malformed or repeated one (sent as 501 5.5.4).
pub fn mail_params(line: &[u8]) -> Result<MailDsn, &'static str> {
    let mut d = MailDsn::default();
    let (mut ret, mut envid) = (false, false);
    for (k, v) in words(line) {
        match k.as_str() {
            "RET" => {
                let v = std::str::from_utf8(v).unwrap_or("").to_ascii_uppercase();
                if ret || (v != "FULL" && v != "HDRS") {
                    return Err("Bad RET parameter syntax");
                }
                ret = true;
                d.ret = v;
            }
            "ENVID" => {
                let v = std::str::from_utf8(v).unwrap_or("");
                let decoded = xtext_decode(v);
                if envid || v.is_empty() || v.len() > MAX_ENVID || decoded.is_none_or(|t| t.iter().any(|&c| !(0x20..0x7f).contains(&c))) {
                    return Err("Bad ENVID parameter syntax");
                }
                envid = true;
                d.envid = v.to_string();
            }
            _ => {}
        }
    }
    Ok(d)
}

/// The NOTIFY and ORCPT of a RCPT line, or the reply text of Postfix's
/// smtpd for a malformed or repeated one (sent as 501 5.5.4).
pub fn rcpt_params(line: &[u8]) -> Result<RcptDsn, &'static str> {
    let mut d = RcptDsn::default();
    let (mut notify, mut orcpt) = (false, false);
    for (k, v) in words(line) {
        match k.as_str() {
            "NOTIFY" => {
                let v = std::str::from_utf8(v).unwrap_or("");
                if notify || notify_mask(v).is_none() {
                    return Err("Error: Bad NOTIFY parameter syntax");
                }
                notify = true;
                d.notify = v.to_string();
            }
            "ORCPT" => {
                let v = std::str::from_utf8(v).unwrap_or("");
                let ok = match v.split_once(';') {
                    Some((ty, x)) => {
                        !ty.is_empty()
                            && ty.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                            && !x.is_empty()
                            && v.len() <= MAX_ORCPT
                            && xtext_decode(x).is_some_and(|t| !t.contains(&0))
                    }
                    None => false,
                };
                if orcpt || !ok {
                    return Err("Error: Bad ORCPT parameter syntax");
                }
                orcpt = true;
                d.orcpt = v.to_string();
            }
            _ => {}
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_as_postfix() {
        assert_eq!(notify_mask("NEVER"), Some(NEVER));
        assert_eq!(notify_mask("success,Delay"), Some(SUCCESS | DELAY));
        assert_eq!(notify_mask("NEVER,SUCCESS"), None);
        assert_eq!(notify_mask("SUCCESS,NEVER"), None);
        assert_eq!(notify_mask("FOO"), None);
        assert_eq!(notify_mask(""), None);
        assert_eq!(notify_mask("SUCCESS,"), None);
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_decode("a+2Bb").unwrap(), b"a+b");
        assert!(xtext_decode("+ZZ").is_none());
        assert!(xtext_decode("+4").is_none());
        assert!(xtext_decode("a=b").is_none());
        assert!(xtext_decode("é").is_none());
    }

    #[test]
    fn mail_and_rcpt_lines() {
        let m = mail_params(b"MAIL FROM:<a@b> RET=hdrs ENVID=QQ+2B1 SIZE=10").unwrap();
        assert_eq!((m.ret.as_str(), m.envid.as_str()), ("HDRS", "QQ+2B1"));
        assert_eq!(mail_params(b"MAIL FROM:<a@b> RET=FULL RET=HDRS"), Err("Bad RET parameter syntax"));
        assert!(mail_params(format!("MAIL FROM:<a@b> ENVID={}", "x".repeat(101)).as_bytes()).is_err());
        assert!(mail_params(format!("MAIL FROM:<a@b> ENVID={}", "x".repeat(100)).as_bytes()).is_ok());
        // A parameter-like string inside the quoted path is not one.
        assert_eq!(mail_params(b"MAIL FROM:<\"RET=X>\"@b>").unwrap(), MailDsn::default());
        let r = rcpt_params(b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40x").unwrap();
        assert_eq!(r.original().unwrap(), "rfc822; b@x");
        assert!(r.wants(SUCCESS) && !r.wants(DELAY));
        assert!(rcpt_params(b"RCPT TO:<b@example.org> ORCPT=rfc822").is_err());
        assert!(rcpt_params(b"RCPT TO:<b@example.org> ORCPT=rfc822;+ZZ").is_err());
        assert!(rcpt_params(b"RCPT TO:<b@example.org> NOTIFY=NEVER NOTIFY=NEVER").is_err());
        assert_eq!(
            without_params(b"MAIL FROM:<a@b> RET=FULL SIZE=5 ENVID=x\r\n").unwrap(),
            b"MAIL FROM:<a@b> SIZE=5\r\n"
        );
        assert_eq!(without_params(b"RCPT TO:<b@c> NOTIFY=NEVER\r\n").unwrap(), b"RCPT TO:<b@c>\r\n");
        assert!(without_params(b"RCPT TO:<b@c>\r\n").is_none());
        assert!(without_params(b"RCPT TO:<b@c> RET=FULL\r\n").is_none());
        assert!(without_params(b"MAIL FROM:<b@c> NOTIFY=NEVER\r\n").is_none());
        assert!(RcptDsn::default().wants(FAILURE) && !RcptDsn::default().wants(SUCCESS));
    }

    /// Random lines built from the bytes that matter never panic, and a
    /// stripped line is never longer than the original.
    #[test]
    fn random_lines_never_panic() {
        const ALPHABET: &[u8] = b"MAILRCPTFROM:TO<>\" =+;,NOTIFYNEVERSUCCESSORCPTENVIDRETFULLHDRS\r\n\xc3\xa9AZaz09";
        let mut x: u32 = 12345;
        for _ in 0..20_000 {
            let mut line = Vec::new();
            let n = (x % 60) as usize;
            for _ in 0..n {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                line.push(ALPHABET[(x >> 16) as usize % ALPHABET.len()]);
            }
            for prefix in [&b"MAIL FROM:"[..], b"RCPT TO:", b""] {
                let mut l = prefix.to_vec();
                l.extend_from_slice(&line);
                let _ = mail_params(&l);
                let _ = rcpt_params(&l);
                if let Some(s) = without_params(&l) {
                    assert!(s.len() <= l.len());
                }
            }
        }
    }
}
