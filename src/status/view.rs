//! What the page and the metrics show, gathered from the configuration, the
//! shared Stats and the file system before rendering (no HTML here).
//!
//! Role: read-only snapshots for [`super::render`] and [`super::metrics`].
//! May touch: the spool (read only), the recipients file's metadata.

use std::sync::atomic::Ordering;

use super::render;
use super::routes::Ctx;
use crate::config::Config;
use crate::logging;
use crate::policy::Source;
use crate::spool::{self, Spool};
use crate::stats::Stats;
use crate::util::now;

/// Whether the recipients file can be seen.
pub(super) fn recipients_list(cfg: &Config) -> render::RecipientsList {
    let Some(p) = &cfg.recipients else {
        return render::RecipientsList::NotConfigured;
    };
    match std::fs::metadata(p) {
        Ok(_) => render::RecipientsList::Present,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => render::RecipientsList::Missing("no such file".into()),
        Err(e) => render::RecipientsList::Missing(e.to_string()),
    }
}

/// Where the list in force came from, when, and whether that is too long
/// ago (`[status] recipients_max_age`; 0: never stale).
pub(super) fn freshness(ctx: &Ctx, now: u64) -> render::Freshness {
    let st = &ctx.stats;
    let source = Source::of(st.recipients_source.load(Ordering::Relaxed));
    let updated = u64::from(Stats::get(&st.recipients_updated));
    let max_age = ctx.cfg.status.recipients_max_age.as_secs();
    let path = match source {
        Source::Push => ctx.cfg.spool.join(crate::policy::PUSHED),
        Source::LastGood => ctx.cfg.spool.join(crate::policy::LAST_GOOD),
        _ => ctx.cfg.recipients.clone().unwrap_or_else(|| ctx.cfg.spool.join(crate::policy::PUSHED)),
    };
    let stale = source != Source::None && max_age > 0 && updated > 0 && now.saturating_sub(updated) > max_age;
    render::Freshness { source, updated, stale, path: path.display().to_string(), push: ctx.gate.push.enabled() }
}

pub(super) fn page_data<'a>(ctx: &'a Ctx, flushed: bool) -> render::PageData<'a> {
    let cfg = &ctx.cfg;
    let st = &ctx.stats;
    let get = |c: &std::sync::atomic::AtomicU32| Stats::get(c);
    render::PageData {
        hostname: &cfg.hostname,
        primary_name: &cfg.primary,
        spool_path: cfg.spool.to_str().unwrap_or("?"),
        now: now(),
        started: st.started.load(Ordering::Relaxed) as u64,
        queue: render::QueueView::read(Spool::open(&cfg.spool), render::MAX_ROWS),
        disk: spool::disk_space(&cfg.spool).map_err(|e| e.to_string()),
        system: render::SystemView::read(),
        primary: st.primary(),
        primary_retry_at: get(&st.primary_retry_at) as u64,
        routes: st.routes.lock().map(|m| m.clone()).unwrap_or_default(),
        counters: [
            ("Received", get(&st.received)),
            ("Delivered", get(&st.delivered)),
            ("Deferred", get(&st.deferred)),
            ("Bounced", get(&st.bounced)),
            ("Rejected", get(&st.rejected)),
            ("SMTP sessions now", get(&st.connections)),
            ("Flush requests", get(&st.flush_requests)),
        ],
        persistent_spool: st.check_spool(&cfg.spool),
        spool_note: st.spool_note.lock().map(|s| s.clone()).unwrap_or_default(),
        spool_unwritable: st.spool_unwritable.load(Ordering::Relaxed),
        spool_removals_only: st.spool_removals_only.load(Ordering::Relaxed),
        recipients_path: cfg.recipients.as_ref().map(|p| p.display().to_string()),
        recipients: recipients_list(cfg),
        recipients_max_age: cfg.status.recipients_max_age,
        freshness: freshness(ctx, now()),
        log: logging::recent_lines(),
        token: &ctx.token,
        flushed,
        flush_interval: cfg.status.flush_interval,
        recipients_entries: get(&st.recipients_entries),
        recipients_kept: st.recipients_kept.lock().map(|s| s.clone()).unwrap_or_default(),
        recipients_unusable: st.recipients_unusable.load(Ordering::Relaxed),
        client_limits: crate::clients::Limits::of(cfg),
        client_limited: st.clients.limited(now()),
        verify: cfg.verify_recipients.then(|| verify_view(cfg, st, now())),
        tls: st.tls.lock().map(|t| t.clone()).unwrap_or_default(),
        tls_built: cfg!(feature = "tls"),
        alerts: st.alerts.lock().map(|a| a.clone()).unwrap_or_default(),
    }
}

pub(super) fn verify_view(cfg: &Config, st: &Stats, now: u64) -> render::VerifyView {
    let last_refresh = u64::from(Stats::get(&st.verify_last_refresh));
    let max_age = cfg.status.recipients_max_age.as_secs();
    render::VerifyView {
        stale: max_age > 0 && last_refresh > 0 && now.saturating_sub(last_refresh) > max_age,
        positive: Stats::get(&st.verify_positive),
        negative: Stats::get(&st.verify_negative),
        hits: Stats::get(&st.verify_hits),
        misses: Stats::get(&st.verify_misses),
        probes: Stats::get(&st.verify_probes),
        answered: Stats::get(&st.verify_answered),
        last_refresh,
    }
}
