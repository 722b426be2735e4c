//! Internationalized domain names, the small part Bartleby needs: Punycode
//! (RFC 3492) and the conversion of a domain to its ASCII form (A-labels,
//! RFC 5890), so that `bücher.example` and `xn--bcher-kva.example` are the
//! same domain wherever domains are compared.
//!
//! No Unicode tables: no NFC, no IDNA2008 code point classes, no UTS #46
//! mapping other than lower-casing the common scripts ([`lower`]; std's
//! `to_lowercase` alone would add 17 KB to the i486 binary). That is
//! enough to *compare* names safely: a domain is compared in its A-label
//! form, an `xn--` label is taken only when it is the exact Punycode of a
//! lower-case non-ASCII label (so two different DNS names never compare
//! equal), and what is delivered is the domain that was checked.

const BASE: u32 = 36;
const TMIN: u32 = 1;
const TMAX: u32 = 26;
const SKEW: u32 = 38;
const DAMP: u32 = 700;
const INITIAL_BIAS: u32 = 72;
const INITIAL_N: u32 = 128;
/// Longest label, in bytes of its A-label form (RFC 1035).
pub const MAX_LABEL: usize = 63;
/// Longest domain name in ASCII form, without a final dot.
pub const MAX_DOMAIN: usize = 253;

fn threshold(k: u32, bias: u32) -> u32 {
    if k <= bias {
        TMIN
    } else if k >= bias + TMAX {
        TMAX
    } else {
        k - bias
    }
}

fn adapt(delta: u32, points: u32, first: bool) -> u32 {
    let mut delta = if first { delta / DAMP } else { delta / 2 };
    delta += delta / points;
    let mut k = 0;
    while delta > ((BASE - TMIN) * TMAX) / 2 {
        delta /= BASE - TMIN;
        k += BASE;
    }
    k + (BASE - TMIN + 1) * delta / (delta + SKEW)
}

fn digit(d: u32) -> char {
    char::from(if d < 26 { b'a' + d as u8 } else { b'0' + (d - 26) as u8 })
}

/// Punycode of `input` (without the `xn--` prefix). `None` on overflow,
/// which a label short enough for DNS never reaches.
pub fn encode(input: &str) -> Option<String> {
    let points: Vec<u32> = input.chars().map(u32::from).collect();
    let mut out: String = input.chars().filter(char::is_ascii).collect();
    let basic = out.len() as u32;
    if basic > 0 {
        out.push('-');
    }
    let (mut n, mut delta, mut bias, mut h) = (INITIAL_N, 0u32, INITIAL_BIAS, basic);
    while (h as usize) < points.len() {
        let m = points.iter().copied().filter(|&c| c >= n).min()?;
        delta = delta.checked_add((m - n).checked_mul(h + 1)?)?;
        n = m;
        for &c in &points {
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = threshold(k, bias);
                    if q < t {
                        break;
                    }
                    out.push(digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                out.push(digit(q));
                bias = adapt(delta, h + 1, h == basic);
                delta = 0;
                h += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n = n.checked_add(1)?;
    }
    Some(out)
}

/// Decodes Punycode (without the `xn--` prefix). `None` for anything
/// malformed: a character that is not a Punycode digit, an overflow, a code
/// point that is not a character or is ASCII (RFC 3492 6.2).
pub fn decode(input: &str) -> Option<String> {
    if !input.is_ascii() {
        return None;
    }
    let (basic, rest) = match input.rfind('-') {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => ("", input),
    };
    let mut out: Vec<char> = basic.chars().collect();
    let (mut n, mut i, mut bias) = (INITIAL_N, 0u32, INITIAL_BIAS);
    let mut digits = rest.bytes();
    let mut next = digits.next();
    while next.is_some() {
        let old = i;
        let mut w = 1u32;
        let mut k = BASE;
        loop {
            let d = match next? {
                c @ b'a'..=b'z' => c - b'a',
                c @ b'A'..=b'Z' => c - b'A',
                c @ b'0'..=b'9' => c - b'0' + 26,
                _ => return None,
            } as u32;
            next = digits.next();
            i = i.checked_add(d.checked_mul(w)?)?;
            let t = threshold(k, bias);
            if d < t {
                break;
            }
            w = w.checked_mul(BASE - t)?;
            k += BASE;
        }
        let len = out.len() as u32 + 1;
        bias = adapt(i - old, len, old == 0);
        n = n.checked_add(i / len)?;
        i %= len;
        if n < INITIAL_N {
            return None;
        }
        out.insert(i as usize, char::from_u32(n)?);
        i += 1;
    }
    Some(out.into_iter().collect())
}

/// Lower case for the scripts most names use: ASCII, Latin-1, Latin
/// Extended-A, Vietnamese (Latin Extended Additional), Greek, Cyrillic.
/// Other characters stay as written. std's `to_lowercase` would cost 17 KB
/// of the i486 binary for its full table. Safe for comparisons because
/// everything (relay_domains, the recipients list, the address checked,
/// the address stored and delivered) goes through this one function: an
/// upper-case letter outside these scripts only fails to match its lower
/// case (a refusal), it never makes two different names equal.
pub fn lower(c: char) -> char {
    let u = c as u32;
    let l = match u {
        0x41..=0x5A => u + 32,
        0xC0..=0xDE if u != 0xD7 => u + 32,
        // İ (0x130) lower-cases to two characters: left alone.
        0x100..=0x12F | 0x132..=0x137 | 0x14A..=0x177 if u & 1 == 0 => u + 1,
        0x139..=0x148 | 0x179..=0x17E if u & 1 == 1 => u + 1,
        0x178 => 0xFF,
        0x1E00..=0x1E95 | 0x1EA0..=0x1EFF if u & 1 == 0 => u + 1,
        0x391..=0x3A1 | 0x3A3..=0x3AB => u + 32,
        0x410..=0x42F => u + 32,
        0x400..=0x40F => u + 80,
        0x460..=0x481 | 0x48A..=0x4BF | 0x4D0..=0x52F if u & 1 == 0 => u + 1,
        _ => u,
    };
    char::from_u32(l).unwrap_or(c)
}

/// `s` through [`lower`].
pub fn lowercase(s: &str) -> String {
    s.chars().map(lower).collect()
}

/// A non-ASCII character fit for an address or a U-label: not a control
/// (C1 included), not a space, not an invisible formatting character (zero
/// widths, bidi overrides, line separators), not U+FFFD.
pub fn visible(c: char) -> bool {
    !c.is_control()
        && !c.is_whitespace()
        && !matches!(c, '\u{FFFD}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}')
}

/// A character that may stand in a U-label: ASCII letters, digits and
/// hyphens, or a [`visible`] non-ASCII character (the rest of the checks
/// are on the A-label form).
fn label_char(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphanumeric() || c == '-';
    }
    visible(c)
}

/// The ASCII form of one label, lower-case. See [`to_ascii`].
fn label_to_ascii(label: &str) -> Option<String> {
    if label.is_empty() {
        return None;
    }
    if label.is_ascii() {
        let l = label.to_ascii_lowercase();
        if l.len() > MAX_LABEL || !l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
        if let Some(p) = l.strip_prefix("xn--") {
            // An A-label: only the exact Punycode of a lower-case label
            // with a non-ASCII character (no "xn--abc-", no upper case in
            // the decoded form, no characters a U-label may not hold).
            let u = decode(p)?;
            let ok = !u.is_ascii() && u.chars().all(label_char) && lowercase(&u) == u && encode(&u)? == p;
            return ok.then_some(l);
        }
        return Some(l);
    }
    // A U-label: 63 bytes of A-label hold far fewer characters than this.
    if label.chars().count() > MAX_LABEL || !label.chars().all(label_char) {
        return None;
    }
    let lower = lowercase(label);
    let a = format!("xn--{}", encode(&lower)?);
    (a.len() <= MAX_LABEL).then_some(a)
}

/// The domain in lower-case ASCII, its non-ASCII labels as A-labels
/// (`Bücher.Example` → `xn--bcher-kva.example`). `None` when it cannot be a
/// domain name: an empty label, a label over 63 bytes or a name over 253
/// bytes in ASCII form, a character other than letters, digits and hyphens
/// in an ASCII label, a control or invisible character, an `xn--` label
/// that is not well-formed Punycode of a lower-case non-ASCII label.
pub fn to_ascii(domain: &str) -> Option<String> {
    // Bounded before any work: 253 bytes of ASCII form hold at most 253
    // characters, each at most 4 bytes.
    if domain.is_empty() || domain.len() > 4 * MAX_DOMAIN {
        return None;
    }
    let mut out = String::with_capacity(domain.len());
    for (i, label) in domain.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(&label_to_ascii(label)?);
        if out.len() > MAX_DOMAIN {
            return None;
        }
    }
    Some(out)
}

/// The address with its domain in ASCII form (for a server without
/// SMTPUTF8); the address unchanged when its domain is ASCII already or
/// cannot be converted.
pub fn address_to_ascii(addr: &str) -> std::borrow::Cow<'_, str> {
    match addr.rsplit_once('@') {
        Some((local, domain)) if !domain.is_ascii() => match to_ascii(domain) {
            Some(d) => std::borrow::Cow::Owned(format!("{local}@{d}")),
            None => std::borrow::Cow::Borrowed(addr),
        },
        _ => std::borrow::Cow::Borrowed(addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 3492 section 7.1, sample strings: (code points, Punycode).
    const SAMPLES: &[(&str, &str)] = &[
        // (A) Arabic (Egyptian)
        (
            "\u{0644}\u{064A}\u{0647}\u{0645}\u{0627}\u{0628}\u{062A}\u{0643}\u{0644}\u{0645}\u{0648}\u{0634}\u{0639}\u{0631}\u{0628}\u{064A}\u{061F}",
            "egbpdaj6bu4bxfgehfvwxn",
        ),
        // (B) Chinese (simplified)
        ("\u{4ED6}\u{4EEC}\u{4E3A}\u{4EC0}\u{4E48}\u{4E0D}\u{8BF4}\u{4E2D}\u{6587}", "ihqwcrb4cv8a8dqg056pqjye"),
        // (D) Czech
        (
            "Pro\u{010D}prost\u{011B}nemluv\u{00ED}\u{010D}esky",
            "Proprostnemluvesky-uyb24dma41a",
        ),
        // (I) Russian (upper case kept as in the RFC's mixed-case sample)
        (
            "\u{043F}\u{043E}\u{0447}\u{0435}\u{043C}\u{0443}\u{0436}\u{0435}\u{043E}\u{043D}\u{0438}\u{043D}\u{0435}\u{0433}\u{043E}\u{0432}\u{043E}\u{0440}\u{044F}\u{0442}\u{043F}\u{043E}\u{0440}\u{0443}\u{0441}\u{0441}\u{043A}\u{0438}",
            "b1abfaaepdrnnbgefbadotcwatmq2g4l",
        ),
        // (L) Japanese: 3<nen>B<gumi><kinpachi><sensei>
        ("3\u{5E74}B\u{7D44}\u{91D1}\u{516B}\u{5148}\u{751F}", "3B-ww4c5e180e575a65lsy2b"),
        // (M) Japanese: <amuro><namie>-with-SUPER-MONKEYS
        (
            "\u{5B89}\u{5BA4}\u{5948}\u{7F8E}\u{6075}-with-SUPER-MONKEYS",
            "-with-SUPER-MONKEYS-pc58ag80a8qai00g7n9n",
        ),
        // (R) <sono><supiido><de>
        ("\u{305D}\u{306E}\u{30B9}\u{30D4}\u{30FC}\u{30C9}\u{3067}", "d9juau41awczczp"),
        // (S) -> $1.00 <-
        ("-> $1.00 <-", "-> $1.00 <--"),
    ];

    #[test]
    fn rfc3492_samples() {
        for (u, p) in SAMPLES {
            assert_eq!(encode(u).as_deref(), Some(*p), "encode {u}");
            assert_eq!(decode(p).as_deref(), Some(*u), "decode {p}");
        }
    }

    #[test]
    fn known_idns() {
        assert_eq!(to_ascii("bücher.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(to_ascii("BÜCHER.Example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(to_ascii("münchen.example").as_deref(), Some("xn--mnchen-3ya.example"));
        assert_eq!(to_ascii("例え.テスト").as_deref(), Some("xn--r8jz45g.xn--zckzah"));
        assert_eq!(to_ascii("XN--BCHER-KVA.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(decode("bcher-kva").as_deref(), Some("bücher"));
        assert_eq!(decode("r8jz45g").as_deref(), Some("例え"));
        assert_eq!(to_ascii("müller.example").as_deref(), Some("xn--mller-kva.example"));
        assert_eq!(to_ascii("Example.ORG").as_deref(), Some("example.org"));
        assert_ne!(to_ascii("bucher.example"), to_ascii("bücher.example"));
        assert_eq!(address_to_ascii("bob@bücher.example"), "bob@xn--bcher-kva.example");
        assert_eq!(address_to_ascii("müller@example.org"), "müller@example.org");
    }

    #[test]
    fn lower_agrees_with_std_where_it_maps() {
        let mut mapped = 0;
        for u in 0..0x3000u32 {
            let Some(c) = char::from_u32(u) else { continue };
            let l = lower(c);
            let std: Vec<char> = c.to_lowercase().collect();
            if l != c {
                assert_eq!(std, [l], "U+{u:04X}");
                mapped += 1;
            } else {
                // Every capital of the covered blocks is mapped (but İ).
                let covered = [0xC0..0x180, 0x391..0x3AC, 0x400..0x430, 0x1E00..0x1E96, 0x1EA0..0x1F00];
                let cap = std.len() == 1 && std[0] != c;
                assert!(!(cap && u != 0x130 && covered.iter().any(|r| r.contains(&u))), "U+{u:04X} unmapped");
            }
        }
        assert!(mapped > 400, "{mapped}");
        assert_eq!(lowercase("MÜNCHEN Ärger ŁÓDŹ ΑΘΗΝΑ МОСКВА ĐÀ NẴNG"), "münchen ärger łódź αθηνα москва đà nẵng");
    }

    #[test]
    fn malformed_names_are_refused() {
        for bad in [
            "",
            "a..b",
            ".a",
            "xn--.example",
            // Decodes to plain ASCII: not an A-label.
            "xn--bcher-.example",
            "xn--abc-.example",
            // Not Punycode digits, overflow, a code point past Unicode.
            "xn--bcher-kv_.example",
            "xn--99999999999999999999.example",
            "xn--zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz.example",
            "a b.example",
            "tab\t.example",
            "zero\u{200b}width.example",
            "under_score.example",
        ] {
            assert_eq!(to_ascii(bad), None, "{bad:?}");
        }
        // Not canonical: decodes to upper case (Ü: another DNS name than
        // ü's xn--tda, and no valid A-label).
        assert_eq!(to_ascii(&format!("xn--{}.example", encode("Ü").unwrap())), None);
        assert_eq!(to_ascii("xn--tda.example").as_deref(), Some("xn--tda.example"), "ü alone");
        // 63 bytes in A-label form, not in U-label form.
        let ok = "a".repeat(55) + "ü";
        assert!(to_ascii(&ok).unwrap().len() <= MAX_LABEL, "{:?}", to_ascii(&ok));
        assert_eq!(to_ascii(&("a".repeat(59) + "ü")), None);
        assert_eq!(to_ascii(&"ü".repeat(64)), None);
        assert_eq!(to_ascii(&"a".repeat(64)), None);
        // Whole name over 253 bytes.
        let long = ["abcdefghi"; 26].join(".");
        assert!(long.len() > MAX_DOMAIN);
        assert_eq!(to_ascii(&long), None);
        assert_eq!(to_ascii(&"é".repeat(2000)), None);
    }

    #[test]
    fn decoding_never_panics_on_junk() {
        // Every short string over the digit alphabet and a few others.
        let alphabet = b"az09-AZ_.";
        let mut s = Vec::new();
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    for d in alphabet {
                        s.clear();
                        s.extend_from_slice(&[*a, *b, *c, *d]);
                        let t = std::str::from_utf8(&s).unwrap();
                        if let Some(u) = decode(t) {
                            // What decodes encodes back to something that
                            // decodes to the same.
                            let e = encode(&u).unwrap();
                            assert_eq!(decode(&e).as_deref(), Some(u.as_str()), "{t}");
                        }
                        let _ = to_ascii(&format!("xn--{t}"));
                    }
                }
            }
        }
    }
}
