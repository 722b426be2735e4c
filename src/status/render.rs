//! Rendering of the status page and the JSON queue (the metrics are
//! [`super::metrics`]'s).
//!
//! Role: HTML and JSON from a snapshot ([`PageData`], the spool for the
//! JSON). May touch: nothing but the spool it is given (read only) and
//! sysinfo's memory figures.
//!
//! Everything is written by hand into a `String` (no template engine, no
//! serde): it keeps the binary small and makes the escaping explicit. Every
//! string that comes from mail (senders, recipients, errors, log lines) goes
//! through [`html`] or [`json`]; nothing else is ever written raw except our
//! own constants and numbers.
//!
//! Memory is bounded on purpose: the page shows at most [`MAX_ROWS`] messages,
//! at most [`MAX_RCPTS`] recipients per message and cuts long strings at
//! [`MAX_TEXT`] characters, so a queue of 10,000 messages with 100 recipients
//! each still renders a page of a few hundred KiB at most.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::time::Duration;

use crate::spool::{DiskSpace, QueuedMessage, RcptStatus, Spool};
use crate::policy::Source;
use crate::stats::PrimaryState;
use crate::util::{human_duration, iso_date};

/// Queue rows shown on the page; the rest are counted ("and N more").
pub const MAX_ROWS: usize = 200;
/// Recipients shown per row.
pub const MAX_RCPTS: usize = 3;
/// Longest sender/recipient/error text shown, in characters.
pub const MAX_TEXT: usize = 160;
/// Log lines shown.
pub const LOG_LINES: usize = 50;

/// Appends `s` HTML-escaped (text and attribute values). Control characters
/// become spaces so a hostile error text cannot break the layout.
pub fn html(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
}

/// A run of this many characters without a space gets a line break
/// opportunity (`<wbr>`): a table column is at least as wide as its longest
/// word, and a sender can make that 160 characters.
const MAX_WORD: usize = 24;

/// Appends `s` HTML-escaped, cut at `max` characters with an ellipsis, with
/// a `<wbr>` in every run of more than [`MAX_WORD`] characters without a space.
pub fn html_cut(out: &mut String, s: &str, max: usize) {
    let mut run = 0;
    let mut buf = [0u8; 4];
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            return;
        }
        run = if c.is_whitespace() { 0 } else { run + 1 };
        if run > MAX_WORD {
            out.push_str("<wbr>");
            run = 1;
        }
        html(out, c.encode_utf8(&mut buf));
    }
}

/// Appends `s` as a JSON string literal, quotes included (RFC 8259 §7).
pub fn json(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // U+2028/2029 are valid JSON but break JavaScript string literals.
            c if (c as u32) < 0x20 || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Bytes for people: `44 B`, `1.5 KiB`, `20 MiB`, `3.2 GiB` (powers of 1024, like `df -h`),
/// rounded as float formatting rounds, from integers alone ([`crate::util::fraction`]).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while n >> (10 * u) >= 1024 && u < UNITS.len() - 1 {
        u += 1;
    }
    let shift = 10 * u as u32;
    match u {
        0 => format!("{n} B"),
        _ if n < 10 << shift => format!("{} {}", crate::util::fraction(n.into(), shift, 1), UNITS[u]),
        _ => format!("{} {}", crate::util::fraction(n.into(), shift, 0), UNITS[u]),
    }
}

/// What the queue holds: totals over every message, and the first
/// [`MAX_ROWS`] messages (oldest first) in full.
#[derive(Default)]
pub struct QueueView {
    pub count: u64,
    pub bytes: u64,
    pub oldest: Option<u64>,
    pub rows: Vec<QueuedMessage>,
    /// Queue files that could not be read (shown, never fatal).
    pub unreadable: u32,
    /// The first [`MAX_ROWS`] of them: ID and reason.
    pub unreadable_rows: Vec<(String, String)>,
    /// Set when the spool itself could not be opened or listed.
    pub error: Option<String>,
}

impl QueueView {
    /// Reads the spool one message at a time, keeping at most `keep` in
    /// memory. Messages that vanish meanwhile (delivered) are skipped.
    pub fn read(spool: io::Result<Spool>, keep: usize) -> QueueView {
        let mut v = QueueView::default();
        let spool = match spool {
            Ok(s) => s,
            Err(e) => {
                v.error = Some(e.to_string());
                return v;
            }
        };
        let ids = match spool.ids() {
            Ok(ids) => ids,
            Err(e) => {
                v.error = Some(e.to_string());
                return v;
            }
        };
        for id in &ids {
            if v.rows.len() >= keep {
                // Beyond the rows shown, only the envelope header is read
                // (no state file): a page view or a scrape of a queue of
                // 10,000 on a 486 must stay cheap.
                match spool.summary(id) {
                    Ok((arrival, size)) => {
                        v.count += 1;
                        v.bytes += size;
                        v.oldest = Some(v.oldest.map_or(arrival, |o| o.min(arrival)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => v.note_unreadable(id, &e),
                }
                continue;
            }
            match spool.read(id) {
                Ok(m) => {
                    v.count += 1;
                    v.bytes += m.size;
                    v.oldest = Some(v.oldest.map_or(m.env.arrival, |o| o.min(m.env.arrival)));
                    v.rows.push(m);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => v.note_unreadable(id, &e),
            }
        }
        v
    }

    fn note_unreadable(&mut self, id: &str, e: &io::Error) {
        self.unreadable += 1;
        if self.unreadable_rows.len() < MAX_ROWS {
            self.unreadable_rows.push((id.to_string(), e.to_string()));
        }
    }
}

/// Memory, uptime and load from sysinfo (memory only: never `new_all`,
/// which would enumerate every process on the 486).
#[derive(Default)]
pub struct SystemView {
    pub mem_total: u64,
    pub mem_available: u64,
    pub uptime: Option<u64>,
    pub load: Option<(f64, f64, f64)>,
}

impl SystemView {
    pub fn read() -> SystemView {
        use sysinfo::{MemoryRefreshKind, RefreshKind, System};
        let mut v = SystemView::default();
        if let Ok(sys) =
            System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()))
        {
            v.mem_total = sys.total_memory();
            v.mem_available = sys.available_memory();
        }
        v.uptime = System::uptime().ok();
        v.load = System::load_average().ok().map(|l| (l.one, l.five, l.fifteen));
        v
    }
}

/// The recipients file's state, for the page.
pub enum RecipientsList {
    NotConfigured,
    Missing(String),
    Present,
}

/// Where the recipients list in force came from and how fresh it is.
pub struct Freshness {
    pub source: crate::policy::Source,
    /// When it was taken from its source (unix seconds; 0: never).
    pub updated: u64,
    /// Not refreshed within `[status] recipients_max_age`.
    pub stale: bool,
    /// Where it is: the file, or its copy in the spool.
    pub path: String,
    /// `PUT /recipients` is configured.
    pub push: bool,
}

/// Everything the page shows, gathered before rendering.
pub struct PageData<'a> {
    pub hostname: &'a str,
    pub primary_name: &'a str,
    pub spool_path: &'a str,
    pub now: u64,
    pub started: u64,
    pub queue: QueueView,
    pub disk: Result<DiskSpace, String>,
    pub system: SystemView,
    pub primary: PrimaryState,
    /// The scheduler's dead-host cache (unix seconds, 0: none).
    pub primary_retry_at: u64,
    /// With `primary = "mx"`: each recipient domain's route (domain, the
    /// hosts or why none, a warning).
    pub routes: Vec<(String, String, bool)>,
    pub counters: [(&'static str, u32); 7],
    pub persistent_spool: bool,
    pub spool_note: String,
    /// A write to the spool failed and the write probe has not passed yet.
    pub spool_unwritable: bool,
    /// The spool records removals but not delivery states (a full disk).
    pub spool_removals_only: bool,
    pub recipients_path: Option<String>,
    pub recipients: RecipientsList,
    pub recipients_max_age: Duration,
    pub freshness: Freshness,
    pub log: Vec<String>,
    pub token: &'a str,
    pub flushed: bool,
    pub flush_interval: Duration,
    pub recipients_entries: u32,
    /// Why the last reload of the recipients list was refused (empty: none).
    pub recipients_kept: String,
    /// No recipients list can be used: every recipient gets 451 4.3.0
    /// (`recipients_kept` says why).
    pub recipients_unusable: bool,
    pub client_limits: crate::clients::Limits,
    /// The last client a per-client limit refused, if recent.
    pub client_limited: Option<crate::clients::Limited>,
    /// Recipient verification, when `verify_recipients` is on.
    pub verify: Option<VerifyView>,
    /// STARTTLS: the certificate in force, the last reload's warning.
    pub tls: crate::tls::TlsState,
    /// This binary was built with TLS (the floppy's may not be).
    pub tls_built: bool,
    /// Problems found at start, in plain words (see `Stats::alerts`).
    pub alerts: Vec<String>,
}

/// Recipient verification's figures (see [`crate::verify`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyView {
    pub positive: u32,
    pub negative: u32,
    pub hits: u32,
    pub misses: u32,
    pub probes: u32,
    pub answered: u32,
    /// When the primary last answered a probe (unix seconds, 0: never).
    pub last_refresh: u64,
    /// The primary has answered before, but not within `[status]
    /// recipients_max_age`: the cache is ageing while the primary is away.
    pub stale: bool,
}

const CSS: &str = "\
body{font:15px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa;overflow-wrap:anywhere}\
main{max-width:1180px;margin:0 auto;padding:12px 16px 32px}\
header{background:#24292f;color:#fff;padding:10px 16px}\
header h1{font-size:20px;margin:0;display:inline}\
header span{color:#c9d1d9;margin-left:10px}\
h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}\
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de}\
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}\
th{background:#f0f3f6;font-weight:600;white-space:nowrap}\
table.kv th{width:12em}\
#df td,#df th{padding:3px 6px}\
td.n{text-align:right;white-space:nowrap}\
td.id,.mono,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}\
.scroll{overflow-x:auto}\
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.dim{color:#656d76}\
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;margin:10px 0}\
.alert{background:#ffebe9;border:1px solid #cf222e;padding:8px 12px;margin:10px 0}\
.note{background:#dafbe1;border:1px solid #1a7f37;padding:8px 12px;margin:10px 0}\
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:12px}\
.card{background:#fff;border:1px solid #d0d7de;padding:8px 14px;min-width:110px;flex:1;overflow-wrap:normal}\
#counters .card b{font-size:17px}\
.card b{display:block;font-size:20px}\
.card .sep{display:none}\
.cols{display:flex;flex-wrap:wrap;gap:0 20px}.cols section{flex:1 1 460px;min-width:0}\
.held{white-space:normal}\
td.id{white-space:nowrap}#queue-table{overflow-wrap:normal}\
/* Phones: a key-value row keeps its label beside a short value, a long one goes below. */\
@media(max-width:600px){main{padding:8px}\
table.kv,table.kv>tbody{display:block}\
table.kv>tbody>tr{display:flex;flex-wrap:wrap;border-bottom:1px solid #eaeef2}\
table.kv>tbody>tr>th{flex:1 0 8em;width:auto;white-space:normal;border:0}\
table.kv>tbody>tr>td{flex:1000 1 auto;min-width:0;border:0}}\
/* Below desktop width each queued message is a card, its cells labelled here. */\
@media(max-width:1080px){#queue-table,#queue-table>tbody{display:block}#queue-table thead{display:none}\
#queue-table tr{display:block;padding:4px 0;border-bottom:2px solid #d0d7de;overflow-wrap:anywhere}\
#queue-table td{display:block;border:0;padding:1px 8px;text-align:left;white-space:normal}\
#queue-table td:nth-child(-n+3),#queue-table td:nth-child(6),#queue-table td:nth-child(7){display:inline-block}\
#queue-table td::before{font:600 14px system-ui,sans-serif;color:#656d76}\
#queue-table td:nth-child(1)::before{content:'ID '}#queue-table td:nth-child(2)::before{content:'Age '}\
#queue-table td:nth-child(3)::before{content:'Size '}#queue-table td:nth-child(4)::before{content:'Sender '}\
#queue-table td:nth-child(5)::before{content:'Recipients '}#queue-table td:nth-child(6)::before{content:'Attempts '}\
#queue-table td:nth-child(7)::before{content:'Next retry '}#queue-table td:nth-child(8)::before{content:'Last error '}}\
form{margin:8px 0}\
button{font:inherit;padding:6px 14px;background:#1f883d;color:#fff;border:1px solid #1a7f37;border-radius:6px;cursor:pointer}\
pre{background:#fff;border:1px solid #d0d7de;padding:8px;overflow-x:auto;white-space:pre-wrap;word-break:break-all;margin:0}\
footer{color:#656d76;font-size:13px;margin-top:24px}\
";

/// `HH:MM:SS` (UTC) of a unix time.
fn clock(t: u64) -> String {
    let s = t % 86400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// When a message not yet tried waits for the dead-host cache: the
/// scheduler found the primary down and holds new mail until `retry_at`
/// (`minimal_backoff` after that failure) instead of trying it at once. Its
/// own state (no attempt yet) would say "due now".
pub fn held_until(m: &QueuedMessage, now: u64, retry_at: u64) -> Option<u64> {
    (m.state.attempts == 0 && m.state.next_attempt <= now && retry_at > now).then_some(retry_at)
}

fn when(out: &mut String, t: Option<u64>, now: u64) {
    match t {
        None | Some(0) => out.push_str("<span class=\"dim\">never</span>"),
        Some(t) => {
            let _ = write!(out, "{} <span class=\"dim\">({} ago)</span>", iso_date(t), human_duration(now.saturating_sub(t)));
        }
    }
}

/// Renders `GET /`: each part of the page by its own step, in page order.
pub fn page(d: &PageData) -> String {
    let mut o = String::with_capacity(16 * 1024 + d.queue.rows.len() * 400);
    head(&mut o, d);
    // Notices first: what an administrator must act on.
    relay_notices(&mut o, d);
    recipients_notices(&mut o, d);
    other_notices(&mut o, d);
    cards(&mut o, d);
    // The primary and the machine, side by side on wide screens.
    o.push_str("<div class=\"cols\"><section>");
    primary_table(&mut o, d);
    o.push_str("</section><section>");
    o.push_str("<h2>System</h2>\n<table class=\"kv\" id=\"system\">");
    tls_row(&mut o, d);
    spool_rows(&mut o, d);
    machine_rows(&mut o, d);
    recipients_row(&mut o, d);
    verify_row(&mut o, d);
    limits_rows(&mut o, d);
    o.push_str("</section></div>\n");
    counters(&mut o, d);
    queue_section(&mut o, d);
    log_and_footer(&mut o, d);
    o
}

/// The document head, the styles and the header bar.
fn head(o: &mut String, d: &PageData) {
    o.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    o.push_str("<meta name=\"robots\" content=\"noindex\">\n<title>Bartleby status: ");
    html(o, d.hostname);
    let _ = write!(o, "</title>\n<style>{CSS}</style></head>\n<body>\n<header><h1>Bartleby</h1><span>backup MX ");
    html(o, d.hostname);
    o.push_str("</span></header>\n<main>\n");
}

/// Notices about the relay itself: a flush just asked for, problems found
/// at start, memory, a spool in RAM, the primary down.
fn relay_notices(o: &mut String, d: &PageData) {
    if d.flushed {
        o.push_str("<p class=\"note\" id=\"flushed\">Flush requested: the queue manager is retrying every queued message now.</p>\n");
    }
    start_alerts(o, &d.alerts);
    let short_kb = crate::init::MEM_SHORT_KB;
    if d.system.mem_total > 0 && d.system.mem_available < short_kb * 1024 {
        let _ = writeln!(
            o,
            "<p class=\"alert\" id=\"memory-short\"><strong>Memory is short:</strong> {} available of {} (below {short_kb} kB). The relay may refuse mail or be stopped by the kernel; give the machine more RAM.</p>",
            human_bytes(d.system.mem_available),
            human_bytes(d.system.mem_total)
        );
    }
    if !d.persistent_spool {
        o.push_str("<p class=\"alert\" id=\"spool-warning\"><strong>Warning: the spool is not persistent.</strong> ");
        if d.spool_note.is_empty() {
            o.push_str("Queued mail is kept in RAM and is lost on power failure or reboot.");
        } else {
            html(o, &d.spool_note);
        }
        o.push_str("</p>\n");
    }
    if d.primary.up == Some(false) {
        o.push_str("<p class=\"alert\">The primary mail server ");
        html(o, d.primary_name);
        o.push_str(" is not reachable");
        if let Some(t) = d.primary.down_since {
            let _ = write!(o, " (down for {})", human_duration(d.now.saturating_sub(t)));
        }
        o.push_str(": mail is being queued here.</p>\n");
    }
}

/// Notices about the recipients list: unreadable, stale, unusable, kept.
fn recipients_notices(o: &mut String, d: &PageData) {
    let fr = &d.freshness;
    match &d.recipients {
        RecipientsList::Missing(e) if fr.source != Source::Push => {
            o.push_str("<p class=\"warn\" id=\"recipients-warning\">Warning: the recipients list ");
            html(o, d.recipients_path.as_deref().unwrap_or(""));
            o.push_str(" cannot be read (");
            html(o, e);
            o.push_str(").</p>\n");
        }
        _ if fr.stale => {
            o.push_str("<p class=\"warn\" id=\"recipients-warning\">Warning: the recipients list ");
            match fr.source {
                Source::Push => o.push_str("pushed by the primary"),
                Source::LastGood => o.push_str("(the last good list) "),
                _ => {}
            }
            if fr.source != Source::Push {
                html(o, &fr.path);
            }
            let _ = writeln!(
                o,
                " has not been refreshed for {} (more than {}): it may not know recent addresses{}.</p>",
                human_duration(d.now.saturating_sub(fr.updated)),
                human_duration(d.recipients_max_age.as_secs()),
                if fr.push { "; is the primary's job that pushes it still running?" } else { "" }
            );
        }
        _ => {}
    }
    if d.recipients_unusable {
        let _ = write!(
            o,
            "<p class=\"alert\" id=\"recipients-unusable\">No usable recipients list: every recipient gets 451 4.3.0 (try again later) until {}: ",
            if fr.source == Source::Push { "the next push" } else { "the file is fixed" }
        );
        html(o, d.recipients_kept.strip_prefix("recipients list ").unwrap_or(&d.recipients_kept));
        o.push_str(". Senders retry; no mail is refused for good. (An empty file is never taken: to refuse all mail for a domain, remove it from relay_domains.)</p>\n");
    } else if !d.recipients_kept.is_empty() {
        o.push_str("<p class=\"warn\" id=\"recipients-kept\">Warning: the recipients list was not reloaded: ");
        html(o, d.recipients_kept.strip_prefix("recipients list ").unwrap_or(&d.recipients_kept));
        let _ = writeln!(
            o,
            ". Kept the previous list ({} entries) until the file changes again; send SIGHUP to take the file as it is.</p>",
            d.recipients_entries
        );
    }
}

/// Notices about routes, TLS, per-client limits, spool writes and reads.
fn other_notices(o: &mut String, d: &PageData) {
    let q = &d.queue;
    for (dom, text, _) in d.routes.iter().filter(|r| r.2) {
        o.push_str("<p class=\"warn\" id=\"route-warning\">Warning: mail for ");
        html(o, dom);
        o.push_str(": ");
        html_cut(o, text, 300);
        o.push_str(if text.contains("loops back to myself") {
            ". Bartleby is its best MX (or as good as the best): it keeps the mail until the MX records name a more preferred host.</p>\n"
        } else {
            ".</p>\n"
        });
    }
    if !d.tls.warning.is_empty() {
        o.push_str("<p class=\"warn\" id=\"tls-warning\">Warning: TLS: ");
        html_cut(o, &d.tls.warning, 400);
        o.push_str(".</p>\n");
    }
    if let Some(i) = &d.tls.info {
        let left = i.not_after.saturating_sub(d.now);
        if left < crate::tls::EXPIRY_WARNING_DAYS * 86_400 {
            let (cls, what) = if left == 0 { ("alert", "has expired".to_string()) } else { ("warn", format!("expires in {}", human_duration(left))) };
            let _ = write!(o, "<p class=\"{cls}\" id=\"tls-expiry\">Warning: the TLS certificate {what} ({}): ", iso_date(i.not_after));
            o.push_str("senders whose domain enforces MTA-STS skip this host without a valid certificate. Put a renewed one in place of the files; it is taken without a restart.</p>\n");
        }
    }
    if let Some(l) = &d.client_limited {
        o.push_str("<p class=\"warn\" id=\"client-limit\">Client ");
        html(o, &l.client);
        let _ = writeln!(
            o,
            " is being limited: {}; {} refusal{}, the last {} ago.</p>",
            l.limit.describe(),
            l.count,
            if l.count == 1 { "" } else { "s" },
            human_duration(d.now.saturating_sub(l.last))
        );
    }
    if d.spool_removals_only {
        o.push_str("<p class=\"alert\" id=\"spool-unwritable\"><strong>The spool cannot record delivery states</strong> (full, or <code>state/</code> not writable). Only messages with one recipient left are delivered (their removal frees space); the others wait, and new mail is refused with 452, until it can (see the log).</p>\n");
    } else if d.spool_unwritable {
        o.push_str("<p class=\"alert\" id=\"spool-unwritable\"><strong>The spool cannot be written.</strong> New mail is refused with 452, and deliveries are suspended if it cannot record their results, until it is writable again; messages delivered meanwhile would be delivered again after a restart (see the log).</p>\n");
    }
    if let Some(e) = &q.error {
        o.push_str("<p class=\"alert\">Cannot read the spool: ");
        html(o, e);
        o.push_str("</p>\n");
    }
}

/// The primary's state in a word, and its CSS class.
fn primary_word(up: Option<bool>) -> (&'static str, &'static str) {
    match up {
        Some(true) => ("ok", "reachable"),
        Some(false) => ("bad", "unreachable"),
        None => ("dim", "not tried yet"),
    }
}

/// At a glance: the queue, the primary, the spool disk.
fn cards(o: &mut String, d: &PageData) {
    let q = &d.queue;
    o.push_str("<div class=\"cards\">");
    let _ = write!(o, "<div class=\"card\">Queued<span class=\"sep\">: </span><b id=\"queue-count\">{}</b></div>", q.count);
    let _ = write!(o, "<div class=\"card\">Queue size<span class=\"sep\">: </span><b>{}</b></div>", human_bytes(q.bytes));
    let _ = write!(
        o,
        "<div class=\"card\">Oldest<span class=\"sep\">: </span><b>{}</b></div>",
        q.oldest.map_or("–".to_string(), |t| human_duration(d.now.saturating_sub(t)))
    );
    let (cls, txt) = primary_word(d.primary.up);
    let _ = write!(o, "<div class=\"card\">Primary<span class=\"sep\">: </span><b class=\"{cls}\">{txt}</b></div>");
    if let Ok(ds) = &d.disk {
        let _ = write!(o, "<div class=\"card\">Spool disk free<span class=\"sep\">: </span><b>{}</b></div>", human_bytes(ds.avail));
    }
    o.push_str("</div>\n");
}

/// The primary mail server: its state, last delivery and error, routes, next try.
fn primary_table(o: &mut String, d: &PageData) {
    let (cls, txt) = primary_word(d.primary.up);
    o.push_str("<h2>Primary mail server</h2>\n<table class=\"kv\" id=\"primary\">");
    o.push_str("<tr><th>Host</th><td class=\"mono\">");
    html(o, d.primary_name);
    let _ = write!(o, "</td></tr><tr><th>State</th><td class=\"{cls}\">{txt}</td></tr>");
    o.push_str("<tr><th>Last successful delivery</th><td>");
    when(o, d.primary.last_success, d.now);
    o.push_str("</td></tr><tr><th>Last attempt</th><td>");
    when(o, d.primary.last_attempt, d.now);
    o.push_str("</td></tr><tr><th>Last error</th><td>");
    if d.primary.last_error.is_empty() {
        o.push_str("<span class=\"dim\">none</span>");
    } else {
        html_cut(o, &d.primary.last_error, 300);
    }
    o.push_str("</td></tr><tr><th>Down since</th><td>");
    match d.primary.down_since {
        Some(t) => when(o, Some(t), d.now),
        None => o.push_str("<span class=\"dim\">–</span>"),
    }
    o.push_str("</td></tr>");
    for (dom, text, warn) in &d.routes {
        o.push_str("<tr><th>Route for ");
        html(o, dom);
        let _ = write!(o, "</th><td class=\"mono{}\" id=\"route\">", if *warn { " bad" } else { "" });
        html_cut(o, text, 300);
        o.push_str("</td></tr>");
    }
    if d.primary_retry_at > d.now {
        let _ = write!(
            o,
            "<tr><th>Next try</th><td><span title=\"{}\">{} UTC</span> <span class=\"dim\">(in {}): new mail waits until then</span></td></tr>",
            iso_date(d.primary_retry_at),
            clock(d.primary_retry_at),
            human_duration(d.primary_retry_at - d.now)
        );
    }
    o.push_str("</table>\n");
}

/// The TLS row of the system table: the certificate in force, or why none.
fn tls_row(o: &mut String, d: &PageData) {
    o.push_str("<tr><th>TLS (STARTTLS)</th><td id=\"tls\">");
    match (&d.tls.info, d.tls.configured, d.tls_built) {
        (Some(i), _, _) => {
            o.push_str("<span class=\"mono\">");
            html(o, &i.subject);
            o.push_str("</span><br>names: <span class=\"mono\">");
            html(o, &i.names.join(" "));
            let left = i.not_after.saturating_sub(d.now);
            let _ = write!(
                o,
                "</span><br>expires {} <span class=\"{}\">({} days)</span>",
                iso_date(i.not_after),
                if left < crate::tls::EXPIRY_WARNING_DAYS * 86_400 { "bad" } else { "dim" },
                left / 86_400
            );
        }
        (None, true, _) => o.push_str("<span class=\"bad\">configured, but no usable certificate: not offered</span>"),
        (None, false, true) => o.push_str("<span class=\"dim\">not configured ([tls] certificate)</span>"),
        (None, false, false) => o.push_str("<span class=\"dim\">not in this build (the floppy image may leave TLS out)</span>"),
    }
    o.push_str("</td></tr>");
}

/// The spool rows of the system table: directory, file system, inodes.
fn spool_rows(o: &mut String, d: &PageData) {
    o.push_str("<tr><th>Spool directory</th><td class=\"mono\">");
    html(o, d.spool_path);
    o.push_str("</td></tr><tr><th>Spool file system</th><td>");
    match &d.disk {
        Ok(ds) => {
            let _ = write!(
                o,
                "<table id=\"df\"><tr><th>Size</th><th>Used</th><th>Avail</th><th>Use%</th></tr><tr><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}%</td></tr></table>",
                human_bytes(ds.total),
                human_bytes(ds.used),
                human_bytes(ds.avail),
                ds.percent_used()
            );
            if ds.read_only {
                o.push_str(" <span class=\"bad\">read-only</span>");
            }
            if ds.files > 0 {
                let _ = write!(o, "</td></tr><tr><th>Spool inodes free</th><td id=\"inodes\">{} of {}", ds.favail, ds.files);
            }
        }
        Err(e) => {
            o.push_str("<span class=\"bad\">cannot read: ");
            html(o, e);
            o.push_str("</span>");
        }
    }
    o.push_str("</td></tr>");
}

/// The machine rows of the system table: memory, uptimes, load.
fn machine_rows(o: &mut String, d: &PageData) {
    let s = &d.system;
    if s.mem_total > 0 {
        let _ = write!(
            o,
            "<tr><th>Memory</th><td>{} available of {} ({}% used)</td></tr>",
            human_bytes(s.mem_available),
            human_bytes(s.mem_total),
            100 - (s.mem_available.min(s.mem_total) * 100 / s.mem_total)
        );
    }
    if let Some(u) = s.uptime {
        let _ = write!(o, "<tr><th>Machine uptime</th><td>{}</td></tr>", human_duration(u));
    }
    let _ = write!(o, "<tr><th>Relay running for</th><td>{}</td></tr>", human_duration(d.now.saturating_sub(d.started)));
    if let Some((a, b, c)) = s.load {
        let [a, b, c] = [a, b, c].map(|l| crate::util::decimal(l, 2));
        let _ = write!(o, "<tr><th>Load average</th><td>{a} {b} {c}</td></tr>");
    }
}

/// The recipients list row (its cell is closed by the next row).
fn recipients_row(o: &mut String, d: &PageData) {
    let fr = &d.freshness;
    o.push_str("<tr><th>Recipients list</th><td id=\"recipients\">");
    match (&d.recipients, fr.source) {
        _ if d.recipients_unusable => {
            o.push_str("<span class=\"bad\">no usable list: 451 to every recipient</span> <span class=\"mono\">");
            html(o, &fr.path);
            o.push_str("</span>");
        }
        (RecipientsList::Missing(_), Source::None | Source::File) => {
            o.push_str("<span class=\"bad\">missing</span> <span class=\"mono\">");
            html(o, d.recipients_path.as_deref().unwrap_or(""));
            o.push_str("</span>");
        }
        (_, Source::None) => {
            o.push_str("<span class=\"dim\">not configured: every address in the relay domains is accepted");
            if fr.push {
                o.push_str(" (until the primary pushes a list)");
            }
            o.push_str("</span>");
        }
        (_, source) => {
            let how = match source {
                Source::Push => "pushed by the primary",
                Source::LastGood => "the last good list (the configured one cannot be used)",
                _ => "from the file",
            };
            let _ = write!(
                o,
                "{} entries, {how}, <span class=\"{}\" title=\"{}\">updated {} ago</span> <span class=\"mono\">",
                d.recipients_entries,
                if fr.stale { "bad" } else { "ok" },
                iso_date(fr.updated),
                human_duration(d.now.saturating_sub(fr.updated))
            );
            html(o, &fr.path);
            o.push_str("</span>");
        }
    }
}

/// Recipient verification's row, when on (it closes the cell before it).
fn verify_row(o: &mut String, d: &PageData) {
    if let Some(v) = &d.verify {
        let lookups = v.hits as u64 + v.misses as u64;
        let rate = match (v.hits as u64 * 100).checked_div(lookups) {
            None => "no lookups yet".to_string(),
            Some(pc) => format!("{pc}% of {lookups} lookups from the cache"),
        };
        let last = if v.last_refresh == 0 {
            "never answered yet".to_string()
        } else {
            format!("last answer {} ago", human_duration(d.now.saturating_sub(v.last_refresh)))
        };
        let last = if v.stale {
            format!(
                "<span class=\"bad\">{last}: the cache has not been refreshed by the primary within {} (recipients_max_age)</span>",
                human_duration(d.recipients_max_age.as_secs())
            )
        } else {
            last
        };
        let _ = write!(
            o,
            "</td></tr><tr><th>Recipient verification</th><td id=\"verify\">{} known, {} unknown cached; {rate}; {} probes, {} answered by the primary, {last}",
            v.positive, v.negative, v.probes, v.answered
        );
    }
}

/// The per-client limits and the spool's persistence (closing the cell before them and the table).
fn limits_rows(o: &mut String, d: &PageData) {
    // Per client (an IPv4 address or an IPv6 /64).
    let lim = &d.client_limits;
    let sessions = match lim.connections {
        0 => "no session limit".to_string(),
        n => format!("{n} sessions (the last {} slots only for clients without one)", lim.reserve),
    };
    let queued = match lim.queued {
        0 => "no queue share".to_string(),
        n => format!("{n} queued messages"),
    };
    let rate = match lim.rate {
        0 => "no message rate limit".to_string(),
        n => format!("{n} messages per {}", human_duration(lim.rate_unit)),
    };
    let _ = write!(o, "</td></tr><tr><th>Per-client limits</th><td id=\"client-limits\">{sessions}, {queued}, {rate}</td></tr>");
    o.push_str("<tr><th>Spool</th><td>");
    if d.persistent_spool {
        o.push_str("<span class=\"ok\">persistent</span>");
    } else {
        o.push_str("<span class=\"bad\">not persistent (RAM)</span>");
    }
    o.push_str("</td></tr></table>\n");
}

/// The counters since start.
fn counters(o: &mut String, d: &PageData) {
    o.push_str("<h2>Since start</h2>\n<div class=\"cards\" id=\"counters\">");
    for (name, v) in &d.counters {
        let _ = write!(o, "<div class=\"card\">{name}<span class=\"sep\">: </span><b>{v}</b></div>");
    }
    o.push_str("</div>\n");
}

/// The queue: its size, the flush button, the first rows, unreadable files.
fn queue_section(o: &mut String, d: &PageData) {
    let q = &d.queue;
    let _ = writeln!(o, "<h2 id=\"queue\">Queue: {} message{}, {}</h2>", q.count, if q.count == 1 { "" } else { "s" }, human_bytes(q.bytes));
    o.push_str("<form method=\"post\" action=\"/flush\"><input type=\"hidden\" name=\"token\" value=\"");
    html(o, d.token);
    let _ = writeln!(
        o,
        "\"><button type=\"submit\">Flush queue now</button> <span class=\"dim\">retries every queued message at once (at most once every {})</span></form>",
        human_duration(d.flush_interval.as_secs())
    );
    if q.count == 0 && q.error.is_none() {
        o.push_str("<p class=\"dim\">The queue is empty.</p>\n");
    } else {
        // On a phone each row is a card whose cells are labelled by the CSS
        // (`#queue-table td:nth-child(N)::before`): keep both in step.
        o.push_str("<div class=\"scroll\"><table id=\"queue-table\"><thead><tr><th>ID</th><th>Age</th><th>Size</th><th>Sender</th><th>Recipients</th><th>Attempts</th><th>Next retry</th><th>Last error</th></tr></thead>\n<tbody>\n");
        for m in &q.rows {
            queue_row(o, m, d.now, d.primary_retry_at);
        }
        o.push_str("</tbody></table></div>\n");
        let more = q.count.saturating_sub(q.rows.len() as u64);
        if more > 0 {
            let _ = writeln!(o, "<p id=\"queue-more\">… and {more} more message{} not shown (oldest first; the full list is at <a href=\"/api/queue\">/api/queue</a>).</p>", if more == 1 { "" } else { "s" });
        }
    }
    if q.unreadable > 0 {
        let _ = writeln!(o, "<p class=\"warn\">{} queue file(s) could not be read:</p>\n<ul id=\"unreadable\">", q.unreadable);
        for (id, why) in &q.unreadable_rows {
            o.push_str("<li><span class=\"id\">");
            html(o, id);
            o.push_str("</span>: ");
            html_cut(o, why, MAX_TEXT * 2);
            o.push_str("</li>\n");
        }
        o.push_str("</ul>\n");
    }
}

/// The recent log and the footer.
fn log_and_footer(o: &mut String, d: &PageData) {
    let skip = d.log.len().saturating_sub(LOG_LINES);
    let _ = write!(o, "<h2>Recent log (last {})</h2>\n<pre id=\"log\">", d.log.len() - skip);
    if d.log.is_empty() {
        o.push_str("(nothing logged yet)");
    }
    for l in &d.log[skip..] {
        html(o, l);
        o.push('\n');
    }
    o.push_str("</pre>\n");
    let _ = write!(
        o,
        "<footer>Generated {} · <a href=\"/\">reload</a> · <a href=\"/api/queue\">queue as JSON</a> · <a href=\"/metrics\">metrics</a></footer>\n</main></body></html>\n",
        iso_date(d.now)
    );
}


fn queue_row(o: &mut String, m: &QueuedMessage, now: u64, retry_at: u64) {
    let st = &m.state;
    o.push_str("<tr><td class=\"id\">");
    html(o, &m.env.id);
    let _ = write!(
        o,
        "</td><td class=\"n\" title=\"{}\">{}</td><td class=\"n\">{}</td><td>",
        iso_date(m.env.arrival),
        human_duration(now.saturating_sub(m.env.arrival)),
        human_bytes(m.size)
    );
    if m.env.sender.is_empty() {
        o.push_str("<span class=\"dim\">&lt;&gt;</span>");
    } else {
        html_cut(o, &m.env.sender, MAX_TEXT);
    }
    o.push_str("</td><td>");
    for (i, r) in m.recipients.iter().take(MAX_RCPTS).enumerate() {
        if i > 0 {
            o.push_str("<br>");
        }
        html_cut(o, &r.addr, MAX_TEXT);
        match r.status {
            RcptStatus::Pending => {}
            RcptStatus::Sent => o.push_str(" <span class=\"ok\">(sent)</span>"),
            RcptStatus::Bounced => o.push_str(" <span class=\"bad\">(bounced)</span>"),
        }
    }
    if m.recipients.len() > MAX_RCPTS {
        let _ = write!(o, "<br><span class=\"dim\">+{} more</span>", m.recipients.len() - MAX_RCPTS);
    }
    let _ = write!(o, "</td><td class=\"n\">{}</td><td class=\"n\">", st.attempts);
    if let Some(t) = held_until(m, now, retry_at) {
        let _ = write!(o, "<span class=\"held\" title=\"{}\">waiting for the primary (next try {} UTC)</span>", iso_date(t), clock(t));
    } else if st.next_attempt <= now {
        o.push_str("now");
    } else {
        let _ = write!(o, "<span title=\"{}\">in {}</span>", iso_date(st.next_attempt), human_duration(st.next_attempt - now));
    }
    o.push_str("</td><td>");
    html_cut(o, &st.last_error, MAX_TEXT);
    o.push_str("</td></tr>\n");
}

/// Writes one message of `/api/queue` as a JSON object into `o`.
/// `next_attempt` is when the scheduler will try it (see [`held_until`]).
pub fn json_message(o: &mut String, m: &QueuedMessage, now: u64, retry_at: u64) {
    o.push_str("{\"id\":");
    json(o, &m.env.id);
    let _ = write!(o, ",\"size\":{},\"sender\":", m.size);
    json(o, &m.env.sender);
    o.push_str(",\"recipients\":[");
    for (i, r) in m.recipients.iter().enumerate() {
        if i > 0 {
            o.push(',');
        }
        json(o, &r.addr);
    }
    let held = held_until(m, now, retry_at);
    let _ = write!(
        o,
        "],\"arrival\":{},\"arrival_iso\":\"{}\",\"attempts\":{},\"next_attempt\":{},\"waiting_for_primary\":{},\"last_error\":",
        m.env.arrival,
        iso_date(m.env.arrival),
        m.state.attempts,
        held.unwrap_or(m.state.next_attempt),
        held.is_some()
    );
    json(o, &m.state.last_error);
    if let Some(e) = &m.state_error {
        o.push_str(",\"state_error\":");
        json(o, e);
    }
    o.push('}');
}

/// Streams `/api/queue` to `w`, one message at a time: the queue may hold
/// thousands of messages, and the JSON is never held in memory whole.
/// `routes`: with `primary = "mx"`, where each domain routes now (domain,
/// hosts or why none, a warning), listed as `"routes"`.
pub fn write_queue_json<W: Write>(w: &mut W, spool: &Spool, now: u64, retry_at: u64, routes: &[(String, String, bool)]) -> io::Result<()> {
    let ids = spool.ids()?;
    let mut buf = String::with_capacity(1024);
    let (mut count, mut bytes) = (0u64, 0u64);
    // Unreadable files are listed after the messages, at most MAX_ROWS of
    // them in memory (the rest only counted).
    let mut unreadable: Vec<(&str, String)> = Vec::new();
    let mut unreadable_n = 0u64;
    w.write_all(b"{\"messages\":[")?;
    for id in &ids {
        let m = match spool.read(id) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // delivered meanwhile
            Err(e) => {
                unreadable_n += 1;
                if unreadable.len() < MAX_ROWS {
                    unreadable.push((id.as_str(), e.to_string()));
                }
                continue;
            }
        };
        buf.clear();
        if count > 0 {
            buf.push(',');
        }
        json_message(&mut buf, &m, now, retry_at);
        w.write_all(buf.as_bytes())?;
        count += 1;
        bytes += m.size;
    }
    buf.clear();
    buf.push_str("],\"unreadable\":[");
    for (i, (id, why)) in unreadable.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        buf.push_str("{\"id\":");
        json(&mut buf, id);
        buf.push_str(",\"error\":");
        json(&mut buf, why);
        buf.push('}');
    }
    buf.push_str("],\"routes\":[");
    for (i, (domain, route, warning)) in routes.iter().enumerate() {
        if i > 0 {
            buf.push(',');
        }
        buf.push_str("{\"domain\":");
        json(&mut buf, domain);
        buf.push_str(",\"route\":");
        json(&mut buf, route);
        let _ = write!(buf, ",\"warning\":{warning}}}");
    }
    w.write_all(buf.as_bytes())?;
    writeln!(w, "],\"unreadable_count\":{unreadable_n},\"count\":{count},\"bytes\":{bytes}}}")
}

/// The problems found at start (`Stats::alerts`), one paragraph each.
/// The id is on the first only (an id names one element).
fn start_alerts(o: &mut String, alerts: &[String]) {
    for (i, a) in alerts.iter().enumerate() {
        o.push_str(if i == 0 { "<p class=\"alert\" id=\"start-alert\">" } else { "<p class=\"alert\">" });
        o.push_str("<strong>Attention:</strong> ");
        html(o, a);
        o.push_str("</p>\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{DeliveryState, Envelope, Recipient};

    #[test]
    fn long_words_get_break_opportunities() {
        let (w, a) = (MAX_WORD, |n: usize| "a".repeat(n));
        let mut o = String::new();
        html_cut(&mut o, &format!("{}@b.test", a(2 * w + 10)), 160);
        assert_eq!(o, format!("{}<wbr>{}<wbr>{}@b.test", a(w), a(w), a(10)));
        // Words up to MAX_WORD are left alone; spaces restart the count.
        let mut o = String::new();
        html_cut(&mut o, &format!("<{}> {}", a(w - 2), a(w)), 160);
        assert_eq!(o, format!("&lt;{}&gt; {}", a(w - 2), a(w)));
        let mut o = String::new();
        html_cut(&mut o, "é<&x", 2);
        assert_eq!(o, "é&lt;…");
    }

    /// A RAM spool because the disk is missing gives two alerts at once
    /// (the missing disk, the limits cut to fit): each one escaped, and the
    /// page's ids stay unique (HTML: an id names one element).
    #[test]
    fn start_alerts_escaped_and_ids_unique() {
        let mut o = String::new();
        start_alerts(&mut o, &["The spool disk is MISSING: <sda2> & \"x\"".into(), "limits cut".into()]);
        assert!(o.contains("MISSING: &lt;sda2&gt; &amp; "), "{o}");
        assert!(!o.contains("<sda2>"), "{o}");
        assert_eq!(o.matches("id=\"start-alert\"").count(), 1, "{o}");
        assert_eq!(o.matches("<strong>Attention:</strong>").count(), 2, "{o}");
        let mut none = String::new();
        start_alerts(&mut none, &[]);
        assert_eq!(none, "");
    }

    /// The integer `human_bytes` writes what the float one it replaced
    /// wrote (kept here as the reference): ties (1280 B = 1.25 KiB -> "1.2"),
    /// carries (10 188 B = 9.95 KiB -> "9.9", 10 199 -> "10.0"), unit edges.
    #[test]
    fn human_bytes_as_the_float_version_wrote() {
        fn float_version(n: u64) -> String {
            const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
            let mut v = n as f64;
            let mut u = 0;
            while v >= 1024.0 && u < UNITS.len() - 1 {
                v /= 1024.0;
                u += 1;
            }
            if u == 0 {
                format!("{n} B")
            } else if v < 10.0 {
                format!("{v:.1} {}", UNITS[u])
            } else {
                format!("{v:.0} {}", UNITS[u])
            }
        }
        let mut ns: Vec<u64> = (0..40_000).chain([1023, 1024, 1280, 10_188, 10_199, 10_240, 1_048_575, 1_048_576, 5 << 40, 3 << 50, 1 << 53]).collect();
        for k in 1..5u32 {
            let unit = 1u64 << (10 * k);
            for f in [1, 2, 3, 5, 9, 10, 11, 99, 100, 1023, 1024] {
                ns.extend([f * unit - 1, f * unit, f * unit + 1, f * unit + unit / 2, f * unit + unit / 20, f * unit + unit / 20 * 3]);
            }
        }
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ns.push(x >> (x % 53 + 11));
        }
        for n in ns {
            assert_eq!(human_bytes(n), float_version(n), "{n}");
        }
        assert_eq!(human_bytes(1280), "1.2 KiB");
        assert_eq!(human_bytes(44), "44 B");
    }

    /// A page with every notice, row and branch on (`rich`), or a quiet one.
    fn fixture(rich: bool, variant: u8) -> PageData<'static> {
        let now = 1_796_000_000;
        let mut rows = vec![message(0, 0), message(3, now + 600)];
        rows[1].recipients.push(Recipient { addr: "x\"<y>@example.org".into(), status: RcptStatus::Bounced, error: "550 <b>no</b>".into() });
        let even = variant.is_multiple_of(2);
        let source = [Source::None, Source::File, Source::Push, Source::LastGood][usize::from(variant % 4)];
        PageData {
            hostname: "backup<&>.example.org",
            primary_name: "mx.example.org:25",
            spool_path: "/var/spool/bartleby",
            now,
            started: now - 4000,
            queue: QueueView {
                count: if rich { 250 } else { 0 },
                bytes: if rich { 1_234_567 } else { 0 },
                oldest: rich.then_some(now - 90_000),
                rows: if rich { rows } else { Vec::new() },
                unreadable: u32::from(rich),
                unreadable_rows: if rich { vec![("ABCDEF123".into(), "permission <denied>".into())] } else { Vec::new() },
                error: rich.then(|| "spool: I/O error".into()),
            },
            disk: if rich { Ok(DiskSpace { total: 1 << 30, used: 3 << 28, avail: 1 << 28, files: 65536, favail: 1000, read_only: even }) } else { Err("statvfs: <gone>".into()) },
            system: SystemView { mem_total: 16 << 20, mem_available: if rich { 300 << 10 } else { 8 << 20 }, uptime: rich.then_some(100_000), load: rich.then_some((0.125, 1.0, 12.57)) },
            primary: PrimaryState { up: [None, Some(true), Some(false)][usize::from(variant % 3)], last_success: Some(now - 100), last_attempt: rich.then_some(now - 5), last_error: if rich { "421 <busy>".into() } else { String::new() }, down_since: rich.then_some(now - 3600) },
            primary_retry_at: if rich { now + 290 } else { 0 },
            routes: if rich { vec![("example.org".into(), "mx1 loops back to myself".into(), true), ("b.test".into(), "mx.b.test".into(), false)] } else { Vec::new() },
            counters: [("Received", 1), ("Delivered", 2), ("Deferred", 3), ("Bounced", 4), ("Rejected", 5), ("SMTP sessions now", 6), ("Flush requests", 7)],
            persistent_spool: !rich,
            spool_note: if even { String::new() } else { "RAM <disk>".into() },
            spool_unwritable: rich,
            spool_removals_only: rich && !even,
            recipients_path: Some("/etc/bartleby/recipients".into()),
            recipients: match variant % 3 {
                0 => RecipientsList::Missing("no such <file>".into()),
                1 => RecipientsList::Present,
                _ => RecipientsList::NotConfigured,
            },
            recipients_max_age: Duration::from_secs(86400),
            freshness: Freshness { source, updated: now - 200_000, stale: rich, path: "/var/spool/bartleby/recipients.pushed".into(), push: even },
            log: (0..if rich { 60 } else { 0 }).map(|i| format!("line {i} <x>")).collect(),
            token: "0123456789abcdef",
            flushed: rich,
            flush_interval: Duration::from_secs(60),
            recipients_entries: 17,
            recipients_kept: if rich { "recipients list /etc/r: line 3: bad <address>".into() } else { String::new() },
            recipients_unusable: rich && even,
            client_limits: crate::clients::Limits { connections: if rich { 10 } else { 0 }, reserve: 2, queued: if rich { 50 } else { 0 }, rate: if rich { 30 } else { 0 }, rate_unit: 60 },
            client_limited: rich.then(|| crate::clients::Limited { client: "192.0.2.1".into(), limit: crate::clients::Limit::Rate, last: now - 30, count: 3 }),
            verify: rich.then_some(VerifyView { positive: 3, negative: 4, hits: 10, misses: 5, probes: 6, answered: 5, last_refresh: if even { 0 } else { now - 50 }, stale: !even }),
            tls: crate::tls::TlsState {
                configured: rich,
                info: (rich && variant != 2).then(|| crate::tls::CertInfo { subject: "CN=<backup>".into(), names: vec!["backup.example.org".into()], not_after: now + 3 * 86400 * u64::from(variant) }),
                warning: if rich { "reload refused: <key>".into() } else { String::new() },
            },
            tls_built: even,
            alerts: if rich { vec!["disk <missing>".into()] } else { Vec::new() },
        }
    }

    /// The page's parts, each written by its own step, in their order, and
    /// every text from outside escaped. (`BARTLEBY_PAGE_DUMP=DIR` writes the
    /// fixtures' pages there, to compare two versions of the renderer.)
    #[test]
    fn page_sections_in_order_and_escaped() {
        let dump = std::env::var_os("BARTLEBY_PAGE_DUMP");
        for rich in [true, false] {
            for variant in 0..6 {
                let p = page(&fixture(rich, variant));
                if let Some(d) = &dump {
                    std::fs::write(std::path::Path::new(d).join(format!("page-{rich}-{variant}.html")), &p).unwrap();
                }
                assert!(p.starts_with("<!DOCTYPE html>\n") && p.ends_with("</main></body></html>\n"), "{p}");
                let order = ["<header>", "<div class=\"cards\">", "<h2>Primary mail server</h2>", "<h2>System</h2>", "<h2>Since start</h2>", "<h2 id=\"queue\">", "<h2>Recent log", "<footer>"];
                let at: Vec<usize> = order.iter().map(|m| p.find(m).unwrap_or_else(|| panic!("{m} missing"))).collect();
                assert!(at.windows(2).all(|w| w[0] < w[1]), "{at:?}");
                for raw in ["<b>no", "<x>", "<&>", "<busy>", "<key>", "<missing>", "<denied>", "<gone>", "<disk>", "<address>", "<file>", "<backup>"] {
                    assert!(!p.contains(raw), "{raw} unescaped");
                }
                assert_eq!(p.contains("id=\"flushed\""), rich);
                assert_eq!(p.contains("The queue is empty."), !rich);
                if rich {
                    assert!(p.contains("id=\"memory-short\"") && p.contains("id=\"client-limit\"") && p.contains("id=\"queue-more\""), "{p}");
                    assert!(p.contains("<td>0.12 1.00 12.57</td>"), "{p}");
                    assert!(p.contains("<b>1.2 MiB</b>"), "{p}");
                }
            }
        }
    }

    fn message(attempts: u32, next_attempt: u64) -> QueuedMessage {
        QueuedMessage {
            env: Envelope { id: "6940A9A90F3A2".try_into().unwrap(), arrival: 1_000, sender: "a@b.test".into(), ..Default::default() },
            size: 10,
            state: DeliveryState { attempts, next_attempt, ..Default::default() },
            recipients: vec![Recipient { addr: "c@example.org".into(), status: RcptStatus::Pending, error: String::new() }],
            state_error: None,
        }
    }

    #[test]
    fn mail_held_by_the_dead_host_cache() {
        let now = 100_000;
        let retry = now + 290; // 03:51:30 UTC
        // Never tried, the primary down: waits for the cache, not "now".
        let m = message(0, 0);
        assert_eq!(held_until(&m, now, retry), Some(retry));
        let mut row = String::new();
        queue_row(&mut row, &m, now, retry);
        assert!(row.contains("waiting for the primary (next try 03:51:30 UTC)"), "{row}");
        assert!(!row.contains(">now<"), "{row}");
        let mut j = String::new();
        json_message(&mut j, &m, now, retry);
        assert!(j.contains(&format!("\"attempts\":0,\"next_attempt\":{retry},\"waiting_for_primary\":true")), "{j}");
        // The cache has expired, or the message has its own schedule.
        assert_eq!(held_until(&m, now, now), None);
        assert_eq!(held_until(&message(2, now - 5), now, retry), None);
        assert_eq!(held_until(&message(0, now + 600), now, retry), None);
        let mut row = String::new();
        queue_row(&mut row, &m, now, 0);
        assert!(row.contains(">now<"), "{row}");
        let mut j = String::new();
        json_message(&mut j, &message(3, now + 600), now, retry);
        assert!(j.contains(&format!("\"next_attempt\":{},\"waiting_for_primary\":false", now + 600)), "{j}");
    }
}
