//! `GET /metrics`: the Prometheus text format (version 0.0.4).
//!
//! Role: the figures for a monitoring system, from the same snapshots as
//! the page ([`super::view`]). May touch: the spool (read only),
//! /proc/uptime, the shared Stats.

use std::sync::atomic::Ordering;

use super::render;
use super::routes::Ctx;
use super::view::{freshness, verify_view};
use super::push;
use std::fmt::Write as _;
use crate::logging;
use crate::policy::Source;
use crate::spool::{self, Spool};
use crate::stats::Stats;
use crate::util::now;

/// `GET /metrics`. Queue figures come from the spool (authoritative, right
/// even just after a restart), counters from [`Stats`].
pub(super) fn render(ctx: &Ctx) -> String {
    let st = &ctx.stats;
    let q = render::QueueView::read(Spool::open(&ctx.cfg.spool), 0);
    let t = now();
    let mut o = String::with_capacity(3072);
    metric(&mut o, "bartleby_spool_readable", "gauge", "1 if the spool could be listed.", u8::from(q.error.is_none()));
    machine(&mut o, st);
    queue(&mut o, &q, t);
    activity(&mut o, st);
    tls(&mut o, st);
    limits_and_log(&mut o, ctx);
    spool_and_primary(&mut o, ctx);
    recipients(&mut o, ctx, t);
    verify(&mut o, ctx, t);
    let started = st.started.load(Ordering::Relaxed) as u64;
    metric(&mut o, "bartleby_uptime_seconds", "gauge", "Seconds since the relay started.", t.saturating_sub(started));
    o
}

/// One metric with its HELP and TYPE lines.
fn metric(o: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = write!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
}

/// A text as a label value: backslash, double quote and line feed escaped
/// (the exposition format's three escapes), so no text can end the label
/// or the line.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Problems found at start, the machine's uptime and memory.
fn machine(o: &mut String, st: &Stats) {
    let alerts = st.alerts.lock().map(|a| a.clone()).unwrap_or_default();
    metric(o, "bartleby_alerts", "gauge", "Problems found at start that need the administrator (each one below as bartleby_alert).", alerts.len());
    if !alerts.is_empty() {
        o.push_str("# HELP bartleby_alert A problem found at start, in plain words.\n# TYPE bartleby_alert gauge\n");
        for a in &alerts {
            let _ = writeln!(o, "bartleby_alert{{message=\"{}\"}} 1", label_value(a));
        }
    }
    // the machine's own clock (also under an emulator's instruction
    // counting, where the host's clock says nothing about the guest's speed)
    if let Some(up) = std::fs::read_to_string("/proc/uptime").ok().and_then(|u| u.split_whitespace().next().and_then(|x| x.parse::<f64>().ok())) {
        metric(o, "bartleby_machine_uptime_seconds", "gauge", "Seconds since the machine booted (/proc/uptime, 10 ms steps).", crate::util::decimal(up, 2));
    }
    let sys = render::SystemView::read();
    if sys.mem_total > 0 {
        metric(o, "bartleby_memory_available_bytes", "gauge", "MemAvailable of the machine.", sys.mem_available);
        metric(
            o,
            "bartleby_memory_short",
            "gauge",
            "1 if the machine has less than 512 kB available: the relay may refuse mail or be stopped by the kernel.",
            u8::from(sys.mem_available < crate::init::MEM_SHORT_KB * 1024),
        );
    }
}

/// The queue, as the spool holds it now.
fn queue(o: &mut String, q: &render::QueueView, t: u64) {
    metric(o, "bartleby_queue_messages", "gauge", "Messages in the queue.", q.count);
    metric(o, "bartleby_queue_bytes", "gauge", "Bytes of message data in the queue.", q.bytes);
    metric(
        o,
        "bartleby_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest queued message (0 when the queue is empty).",
        q.oldest.map_or(0, |a| t.saturating_sub(a)),
    );
}

/// What the relay did since start, and its sessions now.
fn activity(o: &mut String, st: &Stats) {
    let counters = [
        ("bartleby_received_total", "Messages accepted since start.", &st.received),
        ("bartleby_delivered_total", "Messages delivered to the primary since start.", &st.delivered),
        ("bartleby_deferred_total", "Delivery attempts deferred since start.", &st.deferred),
        ("bartleby_bounced_total", "Messages bounced since start.", &st.bounced),
        ("bartleby_rejected_total", "SMTP transactions rejected since start.", &st.rejected),
        ("bartleby_flush_requests_total", "Queue flushes requested since start.", &st.flush_requests),
    ];
    for (name, help, c) in counters {
        metric(o, name, "counter", help, Stats::get(c));
    }
    metric(o, "bartleby_connections", "gauge", "SMTP sessions open now.", Stats::get(&st.connections));
}

/// STARTTLS: the certificate's expiry, a refused reload.
fn tls(o: &mut String, st: &Stats) {
    let tls = st.tls.lock().map(|t| t.clone()).unwrap_or_default();
    if let Some(i) = &tls.info {
        metric(o, "bartleby_tls_certificate_expiry_seconds", "gauge", "notAfter of the STARTTLS certificate in force (unix time).", i.not_after);
    }
    if tls.configured {
        metric(
            o,
            "bartleby_tls_certificate_reload_failed",
            "gauge",
            "1 if the certificate and key files on disk were refused (the pair in force is older, or none).",
            u8::from(!tls.warning.is_empty()),
        );
    }
}

/// Per-client limits, the log host, the clients tracked.
fn limits_and_log(o: &mut String, ctx: &Ctx) {
    let (st, cfg) = (&ctx.stats, &ctx.cfg);
    o.push_str("# HELP bartleby_client_limit_refusals_total Refusals by a per-client limit since start.\n# TYPE bartleby_client_limit_refusals_total counter\n");
    for (label, c) in [
        ("connections", &st.client_refusals_connections),
        ("queue_share", &st.client_refusals_queue_share),
        ("rate", &st.client_refusals_rate),
    ] {
        let _ = writeln!(o, "bartleby_client_limit_refusals_total{{limit=\"{label}\"}} {}", Stats::get(c));
    }
    if cfg.log_host.is_some() {
        metric(
            o,
            "bartleby_log_host_dropped_total",
            "counter",
            "Log lines not sent to log_host (the socket could not take them at once) since start.",
            logging::log_host_dropped(),
        );
    }
    metric(o, "bartleby_clients_tracked", "gauge", "Clients in the per-client limits table.", st.clients.tracked());
}

/// The spool's disk and writes, the primary, persistence.
fn spool_and_primary(o: &mut String, ctx: &Ctx) {
    let (st, cfg) = (&ctx.stats, &ctx.cfg);
    if let Ok(d) = spool::disk_space(&cfg.spool) {
        metric(o, "bartleby_spool_free_bytes", "gauge", "Space available on the spool file system.", d.avail);
        metric(o, "bartleby_spool_size_bytes", "gauge", "Size of the spool file system.", d.total);
        if d.files > 0 {
            metric(o, "bartleby_spool_free_inodes", "gauge", "Inodes available on the spool file system.", d.favail);
        }
    }
    metric(
        o,
        "bartleby_spool_unrecorded_messages",
        "gauge",
        "Delivered messages the spool could not record yet (delivered again after a restart now).",
        Stats::get(&st.spool_unrecorded),
    );
    metric(
        o,
        "bartleby_spool_recording",
        "gauge",
        "0 while a spool write failed and the write probe has not passed (MAIL gets 452; deliveries suspended or, on a full spool, only messages with one recipient left).",
        u8::from(!st.spool_unwritable.load(Ordering::Relaxed)),
    );
    // Unknown before the first attempt: NaN, so "== 0" alerts do not fire.
    let up = match st.primary().up {
        Some(true) => "1",
        Some(false) => "0",
        None => "NaN",
    };
    metric(o, "bartleby_primary_up", "gauge", "1 if the last connection to the primary succeeded.", up);
    metric(
        o,
        "bartleby_persistent_spool",
        "gauge",
        "1 if the spool is on persistent storage.",
        u8::from(st.check_spool(&cfg.spool)),
    );
}

/// The recipients list in force: size, state, source, age; pushes.
fn recipients(o: &mut String, ctx: &Ctx, t: u64) {
    let (st, cfg) = (&ctx.stats, &ctx.cfg);
    let fr = freshness(ctx, t);
    if cfg.recipients.is_some() || fr.source != Source::None || fr.push {
        metric(o, "bartleby_recipients_entries", "gauge", "Entries of the recipients list in force.", Stats::get(&st.recipients_entries));
        let unusable = st.recipients_unusable.load(Ordering::Relaxed);
        let kept = !unusable && st.recipients_kept.lock().map(|s| !s.is_empty()).unwrap_or(false);
        metric(o, "bartleby_recipients_list_kept", "gauge", "1 if the last reload of the recipients list was refused and the previous list kept.", u8::from(kept));
        metric(
            o,
            "bartleby_recipients_list_usable",
            "gauge",
            "0 if no recipients list can be used: every recipient gets 451 4.3.0.",
            u8::from(!unusable),
        );
        o.push_str("# HELP bartleby_recipients_source 1 for where the recipients list in force came from.\n# TYPE bartleby_recipients_source gauge\n");
        for s in [Source::File, Source::Push, Source::LastGood] {
            let _ = writeln!(o, "bartleby_recipients_source{{source=\"{}\"}} {}", s.label(), u8::from(fr.source == s));
        }
        if fr.updated > 0 {
            metric(
                o,
                "bartleby_recipients_last_update_timestamp_seconds",
                "gauge",
                "When the recipients list in force was taken from its source (file modification time, or the push).",
                fr.updated,
            );
            metric(o, "bartleby_recipients_list_age_seconds", "gauge", "Age of the recipients list in force.", t.saturating_sub(fr.updated));
        }
        metric(
            o,
            "bartleby_recipients_stale",
            "gauge",
            "1 if the recipients list was not refreshed within [status] recipients_max_age.",
            u8::from(fr.stale),
        );
    }
    if fr.push {
        o.push_str("# HELP bartleby_recipients_pushes_total Pushes of the recipients list (PUT /recipients) since start, by result.\n# TYPE bartleby_recipients_pushes_total counter\n");
        for r in push::Outcome::ALL {
            let _ = writeln!(o, "bartleby_recipients_pushes_total{{result=\"{}\"}} {}", r.label(), ctx.gate.push.counted(r));
        }
    }
}

/// Recipient verification's cache and probes, when on.
fn verify(o: &mut String, ctx: &Ctx, t: u64) {
    let (st, cfg) = (&ctx.stats, &ctx.cfg);
    if cfg.verify_recipients {
        let v = verify_view(cfg, st, t);
        o.push_str("# HELP bartleby_verify_cache_entries Entries of the recipient verification cache.\n# TYPE bartleby_verify_cache_entries gauge\n");
        let _ = writeln!(o, "bartleby_verify_cache_entries{{kind=\"positive\"}} {}", v.positive);
        let _ = writeln!(o, "bartleby_verify_cache_entries{{kind=\"negative\"}} {}", v.negative);
        metric(o, "bartleby_verify_cache_hits_total", "counter", "Recipient lookups answered from the verification cache.", v.hits);
        metric(o, "bartleby_verify_cache_misses_total", "counter", "Recipient lookups not in the verification cache.", v.misses);
        metric(o, "bartleby_verify_probes_total", "counter", "Verification probes sent to the primary (RCPT TO).", v.probes);
        metric(o, "bartleby_verify_probes_answered_total", "counter", "Verification probes the primary answered (2xx, 4xx or 5xx).", v.answered);
        metric(o, "bartleby_verify_last_refresh_timestamp_seconds", "gauge", "When the primary last answered a probe with yes or no (0: never).", v.last_refresh);
        metric(o, "bartleby_verify_stale", "gauge", "1 if the primary has not refreshed the verification cache within [status] recipients_max_age.", u8::from(v.stale));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An alert text holds what the spool path or a device name holds: a
    /// quote, a backslash or a line feed must not end the label or the
    /// line (a scraper would drop the whole exposition, or read a forged
    /// sample from the second line).
    #[test]
    fn label_values_cannot_break_out() {
        let hostile = "disk \"sda2\"} 1\nbartleby_primary_up 1\\";
        let v = label_value(hostile);
        assert_eq!(v, "disk \\\"sda2\\\"} 1\\nbartleby_primary_up 1\\\\");
        assert!(!v.contains('\n'));
        // Read back as a scraper reads it: the label ends at our own quote,
        // and unescapes to the text.
        let line = format!("bartleby_alert{{message=\"{v}\"}} 1");
        let mut chars = line.strip_prefix("bartleby_alert{message=\"").unwrap().chars();
        let mut text = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => text.push(match chars.next().unwrap() {
                    'n' => '\n',
                    e => e,
                }),
                '"' => break,
                c => text.push(c),
            }
        }
        assert_eq!(text, hostile);
        assert_eq!(chars.as_str(), "} 1", "{line}");
    }

    #[test]
    fn metric_has_help_type_and_sample() {
        let mut o = String::new();
        metric(&mut o, "bartleby_x", "gauge", "An x.", 7);
        assert_eq!(o, "# HELP bartleby_x An x.\n# TYPE bartleby_x gauge\nbartleby_x 7\n");
    }
}
