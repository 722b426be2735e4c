//! Per-client limits, after Postfix's anvil(8): how many sessions one client
//! holds, how many of its messages wait in the queue, how many MAIL commands
//! it sent in the last `anvil_rate_time_unit`.
//!
//! # What a client is
//!
//! An IPv4 address, or the /64 network of an IPv6 address. A /64 is what one
//! host (or one home connection) gets: SLAAC and privacy addresses hand a
//! host 2^64 addresses, so counting single IPv6 addresses would let one
//! client spread over as many "clients" as it likes. Postfix counted full
//! addresses until 3.8 and now aggregates by `smtpd_client_ipv6_prefix_length`
//! (default 84: it "should prevent anvil exhaustion attacks from a typical /64
//! consumer network, without penalizing legitimate usage"); a backup MX is
//! talked to by other MTAs, rarely by many unrelated ones inside one /64, so
//! Bartleby takes the whole /64 as one client.
//!
//! # The reserve
//!
//! With a cap of half of `max_connections` per client, two clients could
//! still hold every slot. So the last [`Limits::reserve`] slots
//! (`max(2, max_connections / 10)`) go only to clients that hold no session
//! yet: a client with a session is refused, with the same 421, when taking
//! one more slot would leave fewer than that free. Postfix has no such
//! reserve: anvil(8) only counts per client, and the smtpd process limit
//! (`default_process_limit`, 100) is shared by all clients; past it, new
//! connections wait in the listen queue. A per-client connection limit of 0
//! turns the reserve off too.
//!
//! # Logging
//!
//! Postfix logs every refused connection or MAIL. On the appliance the log
//! is the serial console, and one flooder wrote half a million lines in a
//! 30-minute soak: a refusal is logged at most once a minute per client and
//! limit ([`WARN_INTERVAL`]); how many were not logged is said with the next
//! line of that client, or when its entry leaves the table. The counters in
//! `/metrics` count every refusal.
//!
//! # Memory
//!
//! The table is bounded ([`TABLE_CAP`] entries). An entry with no session and
//! no queued message is idle: it is dropped at once when no rate limit is
//! configured, and otherwise kept for its rate window. When the table is
//! full, the idle entries whose rate window is over go (they hold nothing:
//! the next MAIL would start a new window); idle entries inside an open
//! window stay, or a flood of new addresses would reset every client's
//! window. Entries with sessions (at most `max_connections`) or queued
//! messages are never evicted. If nothing can go, a new client is not
//! tracked (no per-client limit applies to it; the global limits still do)
//! and a warning is logged.
//!
//! # Queued messages across restarts
//!
//! The session counts a message when it is committed, the scheduler uncounts
//! it when it leaves the queue, and at start the scheduler counts what the
//! spool holds by each queue file's `client` field, so a share survives a
//! restart. Bounces (client `local`) are not counted: they are ours.
//!
//! Two approximations, both bounded: the share is checked at MAIL against
//! committed messages, so a client may pass it by the messages in flight in
//! its own sessions (at most its session limit); and a queue file that
//! vanishes behind the scheduler's back (removed by hand) is not uncounted
//! until the next start.

use std::net::IpAddr;
use std::sync::Mutex;

use crate::config::Config;

/// Most clients tracked at once.
pub const TABLE_CAP: usize = 2048;
/// How long the page names the last client that was limited.
pub const SHOW_LIMITED_SECS: u64 = 600;
/// At most one log line per client and limit in this many seconds.
pub const WARN_INTERVAL: u32 = 60;

/// One client: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientKey {
    V4(u32),
    /// The upper 64 bits of the address.
    V6(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }

    /// The key of a queue file's `client` field (`host[addr]`); `None` for
    /// bounces (`local`) and anything else without an address.
    pub fn of_client_field(client: &str) -> Option<ClientKey> {
        let (_, rest) = client.rsplit_once('[')?;
        let addr = rest.strip_suffix(']')?;
        addr.parse::<IpAddr>().ok().map(ClientKey::of)
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::V4(a) => write!(f, "{}", std::net::Ipv4Addr::from(*a)),
            ClientKey::V6(p) => write!(f, "{}/64", std::net::Ipv6Addr::from(u128::from(*p) << 64)),
        }
    }
}

/// Which limit refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Connections,
    QueueShare,
    Rate,
}

impl Limit {
    /// Its bit in [`Slot::warned`].
    fn bit(self) -> u8 {
        match self {
            Limit::Connections => 1,
            Limit::QueueShare => 2,
            Limit::Rate => 4,
        }
    }

    /// The label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::QueueShare => "queue_share",
            Limit::Rate => "rate",
        }
    }

    /// What the page says.
    pub fn describe(self) -> &'static str {
        match self {
            Limit::Connections => "too many connections (smtpd_client_connection_count_limit)",
            Limit::QueueShare => "too much of its mail in the queue (smtpd_client_queue_share)",
            Limit::Rate => "too many messages per time unit (smtpd_client_message_rate_limit)",
        }
    }
}

/// The limits in force, from the configuration (0 = off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    /// The last slots of `max_connections` kept for clients without a
    /// session (0 when `connections` is 0).
    pub reserve: usize,
    pub queued: usize,
    pub rate: u32,
    pub rate_unit: u64,
}

impl Limits {
    pub fn of(cfg: &Config) -> Limits {
        let queued = if cfg.smtpd_client_queue_share == 0 {
            0
        } else {
            // At most 100 % of at most 10^7: no overflow even in 32 bits.
            (cfg.max_queue_messages.saturating_mul(cfg.smtpd_client_queue_share as usize) / 100).max(1)
        };
        let connections = cfg.smtpd_client_connection_count_limit;
        Limits {
            connections,
            reserve: if connections == 0 { 0 } else { (cfg.max_connections / 10).max(2) },
            queued,
            rate: cfg.smtpd_client_message_rate_limit,
            rate_unit: cfg.anvil_rate_time_unit.as_secs().max(1),
        }
    }
}

/// The last client refused by a per-client limit, for the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub client: String,
    pub limit: Limit,
    /// Unix seconds of the last refusal.
    pub last: u64,
    /// Refusals of this client for this limit in a row.
    pub count: u32,
}

/// A refusal by a per-client limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: Limit,
    /// The count that broke the limit (the client's `n`th session, its
    /// queued messages, its MAIL commands in the window).
    pub n: u32,
    /// Refused by the reserve, not by the client's own cap.
    pub reserve: bool,
    /// Log it (see [`WARN_INTERVAL`])?
    pub warn: Warn,
}

/// Whether a refusal is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warn {
    /// Log it; before it, say that `earlier` refusals of this client were
    /// not logged ([`log_unlogged`]).
    Log { earlier: u32 },
    /// Counted, not logged.
    Quiet,
}

/// Says how many refusals of `client` were not logged.
pub fn log_unlogged(client: ClientKey, n: u32) {
    if n > 0 {
        log::warn!(
            target: crate::logging::SMTPD,
            "warning: {client}: {n} more per-client limit refusals were not logged (at most one line a minute per client and limit)"
        );
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    conns: u32,
    queued: u32,
    rate_count: u32,
    /// Start of the current rate window (unix seconds, truncated to 32 bits).
    rate_start: u32,
    /// When the current minute of warnings began (unix seconds, 32 bits;
    /// 0: none yet), which limits were logged in it, and how many
    /// refusals were not logged since the last line.
    warned_at: u32,
    warned: u8,
    unlogged: u32,
}

impl Slot {
    fn idle(&self) -> bool {
        self.conns == 0 && self.queued == 0
    }

    /// Inside a rate window that is still open: its count matters.
    fn window_open(&self, now: u64, rate_unit: u64) -> bool {
        self.rate_count > 0 && u64::from((now as u32).wrapping_sub(self.rate_start)) < rate_unit
    }

    /// Whether a refusal for `limit` now is logged.
    fn warn(&mut self, limit: Limit, now: u64) -> Warn {
        let now32 = (now as u32).max(1);
        if self.warned_at == 0 || now32.wrapping_sub(self.warned_at) >= WARN_INTERVAL {
            self.warned_at = now32;
            self.warned = limit.bit();
            Warn::Log { earlier: std::mem::take(&mut self.unlogged) }
        } else if self.warned & limit.bit() == 0 {
            self.warned |= limit.bit();
            Warn::Log { earlier: 0 }
        } else {
            self.unlogged = self.unlogged.saturating_add(1);
            Warn::Quiet
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Sorted by key: compact, and no hashing (a sorted `Vec` of at most
    /// [`TABLE_CAP`] small entries costs less code and memory than a map).
    map: Vec<(ClientKey, Slot)>,
    limited: Option<Limited>,
    /// When the "table full" warning was last logged.
    full_warned: u64,
    /// `anvil_rate_time_unit` in seconds, as last given (0: not yet): which
    /// idle entries are inside an open rate window.
    rate_unit: u64,
}

impl Table {
    fn find(&self, key: ClientKey) -> Result<usize, usize> {
        self.map.binary_search_by(|(k, _)| k.cmp(&key))
    }

    fn get_mut(&mut self, key: ClientKey) -> Option<&mut Slot> {
        self.find(key).ok().map(|i| &mut self.map[i].1)
    }

    /// The slot of `key`, made if there is room.
    fn slot(&mut self, key: ClientKey, now: u64) -> Option<&mut Slot> {
        if let Ok(i) = self.find(key) {
            return Some(&mut self.map[i].1);
        }
        if self.map.len() >= TABLE_CAP {
            // Every idle entry whose rate window is over goes at once (one
            // pass for many new clients); the rest hold something.
            let unit = self.rate_unit;
            self.map.retain(|(k, s)| {
                let keep = !s.idle() || s.window_open(now, unit);
                if !keep {
                    log_unlogged(*k, s.unlogged);
                }
                keep
            });
            if self.map.len() >= TABLE_CAP {
                if now >= self.full_warned + 60 {
                    self.full_warned = now;
                    log::warn!(
                        target: crate::logging::SMTPD,
                        "warning: per-client table full ({TABLE_CAP} clients with sessions, queued mail or an open rate window): {key} is not tracked"
                    );
                }
                return None;
            }
        }
        let i = self.find(key).unwrap_or_else(|i| i);
        self.map.insert(i, (key, Slot::default()));
        Some(&mut self.map[i].1)
    }

    /// Drops an entry that holds nothing, unless its rate window is needed.
    fn tidy(&mut self, key: ClientKey, keep_idle: bool) {
        if !keep_idle
            && let Ok(i) = self.find(key)
            && self.map[i].1.idle()
        {
            let (k, s) = self.map.remove(i);
            log_unlogged(k, s.unlogged);
        }
    }

    /// A refusal of `key` for `limit`: for the page, and whether to log it.
    fn refuse(&mut self, key: ClientKey, limit: Limit, n: u32, reserve: bool, now: u64) -> Refused {
        self.note(key, limit, now);
        let warn = self.get_mut(key).map_or(Warn::Log { earlier: 0 }, |s| s.warn(limit, now));
        Refused { limit, n, reserve, warn }
    }

    fn note(&mut self, key: ClientKey, limit: Limit, now: u64) {
        let client = key.to_string();
        match &mut self.limited {
            Some(l) if l.client == client && l.limit == limit => {
                l.count = l.count.saturating_add(1);
                l.last = now;
            }
            other => *other = Some(Limited { client, limit, last: now, count: 1 }),
        }
    }
}

/// The per-client table, shared by the sessions, the scheduler and the page.
#[derive(Debug, Default)]
pub struct Clients {
    table: Mutex<Table>,
}

impl Clients {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new session of `ip`, `free` session slots (of
    /// `max_connections`) being free before it. `Ok(Some(key))`: counted
    /// (release it with [`Clients::disconnect`]); `Ok(None)`: not tracked;
    /// `Err`: refused, by the client's cap or by the reserve; `n` is the
    /// session it would have been.
    pub fn connect(&self, ip: IpAddr, limits: &Limits, now: u64, free: usize) -> Result<Option<ClientKey>, Refused> {
        let key = ClientKey::of(ip);
        let mut t = self.table();
        t.rate_unit = limits.rate_unit;
        let Some(slot) = t.slot(key, now) else { return Ok(None) };
        let over = limits.connections > 0 && slot.conns as usize >= limits.connections;
        // Taking one more would leave fewer than `reserve` slots free.
        let reserve = limits.connections > 0 && slot.conns > 0 && free <= limits.reserve;
        if over || reserve {
            let n = slot.conns.saturating_add(1);
            return Err(t.refuse(key, Limit::Connections, n, !over, now));
        }
        slot.conns += 1;
        Ok(Some(key))
    }

    /// Ends a session counted by [`Clients::connect`].
    pub fn disconnect(&self, key: ClientKey, limits: &Limits) {
        let mut t = self.table();
        t.rate_unit = limits.rate_unit;
        if let Some(s) = t.get_mut(key) {
            s.conns = s.conns.saturating_sub(1);
        }
        t.tidy(key, limits.rate > 0);
    }

    /// The per-client checks at MAIL: the queue share, then the message
    /// rate (every MAIL counts towards the rate, as in Postfix). `Err`:
    /// refused.
    pub fn check_mail(&self, ip: IpAddr, limits: &Limits, now: u64) -> Result<(), Refused> {
        if limits.queued == 0 && limits.rate == 0 {
            return Ok(());
        }
        let key = ClientKey::of(ip);
        let mut t = self.table();
        t.rate_unit = limits.rate_unit;
        let Some(slot) = t.slot(key, now) else { return Ok(()) };
        let refused = if limits.queued > 0 && slot.queued as usize >= limits.queued {
            Some((Limit::QueueShare, slot.queued))
        } else if limits.rate > 0 {
            let now32 = now as u32;
            if u64::from(now32.wrapping_sub(slot.rate_start)) >= limits.rate_unit {
                slot.rate_start = now32;
                slot.rate_count = 0;
            }
            slot.rate_count = slot.rate_count.saturating_add(1);
            (slot.rate_count > limits.rate).then_some((Limit::Rate, slot.rate_count))
        } else {
            None
        };
        match refused {
            Some((limit, n)) => Err(t.refuse(key, limit, n, false, now)),
            None => {
                t.tidy(key, limits.rate > 0);
                Ok(())
            }
        }
    }

    /// A message from `ip` is in the queue now.
    pub fn queued(&self, ip: IpAddr, now: u64) {
        if let Some(s) = self.table().slot(ClientKey::of(ip), now) {
            s.queued = s.queued.saturating_add(1);
        }
    }

    /// A queued message counted at start, by its queue file's `client` field.
    pub fn queued_at_start(&self, client: &str, now: u64) {
        if let Some(key) = ClientKey::of_client_field(client)
            && let Some(s) = self.table().slot(key, now)
        {
            s.queued = s.queued.saturating_add(1);
        }
    }

    /// A message left the queue (delivered, bounced, expired); `client` is
    /// its queue file's `client` field.
    pub fn left_queue(&self, client: &str, limits: &Limits) {
        let Some(key) = ClientKey::of_client_field(client) else { return };
        let mut t = self.table();
        if let Some(s) = t.get_mut(key) {
            s.queued = s.queued.saturating_sub(1);
        }
        t.tidy(key, limits.rate > 0);
    }

    /// Messages of `ip`'s client in the queue.
    pub fn queued_of(&self, ip: IpAddr) -> u32 {
        let t = self.table();
        t.find(ClientKey::of(ip)).map_or(0, |i| t.map[i].1.queued)
    }

    /// Clients in the table now.
    pub fn tracked(&self) -> usize {
        self.table().map.len()
    }

    /// The last client a limit refused, if that was recent.
    pub fn limited(&self, now: u64) -> Option<Limited> {
        self.table().limited.clone().filter(|l| now.saturating_sub(l.last) <= SHOW_LIMITED_SECS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const L: Limits = Limits { connections: 2, reserve: 2, queued: 3, rate: 0, rate_unit: 60 };
    /// Free slots when it does not matter.
    const FREE: usize = 1000;

    fn refused(limit: Limit, n: u32, warn: Warn) -> Refused {
        Refused { limit, n, reserve: false, warn }
    }

    #[test]
    fn keys() {
        assert_eq!(ClientKey::of(ip("192.0.2.7")).to_string(), "192.0.2.7");
        assert_eq!(ClientKey::of(ip("::ffff:192.0.2.7")), ClientKey::of(ip("192.0.2.7")));
        // One /64 is one client.
        assert_eq!(ClientKey::of(ip("2001:db8:1:2::1")), ClientKey::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(ClientKey::of(ip("2001:db8:1:2::1")), ClientKey::of(ip("2001:db8:1:3::1")));
        assert_eq!(ClientKey::of(ip("2001:db8:1:2::1")).to_string(), "2001:db8:1:2::/64");
        assert_eq!(ClientKey::of_client_field("unknown[192.0.2.7]"), Some(ClientKey::of(ip("192.0.2.7"))));
        assert_eq!(ClientKey::of_client_field("mx.example[2001:db8::1]"), Some(ClientKey::of(ip("2001:db8::5"))));
        assert_eq!(ClientKey::of_client_field("local"), None);
        assert_eq!(ClientKey::of_client_field("x[not an ip]"), None);
    }

    #[test]
    fn connection_cap_per_client() {
        let c = Clients::default();
        let a = c.connect(ip("192.0.2.1"), &L, 100, FREE).unwrap().unwrap();
        c.connect(ip("192.0.2.1"), &L, 100, FREE).unwrap();
        assert_eq!(c.connect(ip("192.0.2.1"), &L, 100, FREE), Err(refused(Limit::Connections, 3, Warn::Log { earlier: 0 })));
        assert!(c.connect(ip("192.0.2.2"), &L, 100, FREE).is_ok());
        let l = c.limited(100).unwrap();
        assert_eq!((l.client.as_str(), l.limit, l.count), ("192.0.2.1", Limit::Connections, 1));
        c.disconnect(a, &L);
        assert!(c.connect(ip("192.0.2.1"), &L, 100, FREE).is_ok());
        assert!(c.limited(100 + SHOW_LIMITED_SECS + 1).is_none());
        let off = Limits { connections: 0, ..L };
        for _ in 0..100 {
            assert!(c.connect(ip("192.0.2.3"), &off, 100, FREE).is_ok());
        }
    }

    #[test]
    fn queue_share_counts_and_bounces_are_exempt() {
        let c = Clients::default();
        let a = ip("192.0.2.1");
        c.queued_at_start("unknown[192.0.2.1]", 1);
        c.queued_at_start("local", 1);
        c.queued(a, 1);
        assert!(c.check_mail(a, &L, 1).is_ok());
        c.queued(a, 1);
        assert_eq!(c.check_mail(a, &L, 1).unwrap_err().n, 3);
        assert!(c.check_mail(ip("192.0.2.2"), &L, 1).is_ok());
        c.left_queue("unknown[192.0.2.1]", &L);
        c.left_queue("local", &L);
        assert!(c.check_mail(a, &L, 1).is_ok());
        for _ in 0..5 {
            c.left_queue("unknown[192.0.2.1]", &L);
        }
        assert_eq!(c.queued_of(a), 0);
        // Idle entries go at once when no rate limit needs them.
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn message_rate_window() {
        let c = Clients::default();
        let l = Limits { connections: 0, reserve: 0, queued: 0, rate: 3, rate_unit: 60 };
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert!(c.check_mail(a, &l, 1000).is_ok());
        }
        assert_eq!(c.check_mail(a, &l, 1000), Err(refused(Limit::Rate, 4, Warn::Log { earlier: 0 })));
        assert_eq!(c.check_mail(a, &l, 1059), Err(refused(Limit::Rate, 5, Warn::Quiet)));
        assert!(c.check_mail(ip("192.0.2.2"), &l, 1000).is_ok());
        // A new window.
        assert!(c.check_mail(a, &l, 1060).is_ok());
    }

    #[test]
    fn table_is_bounded_under_a_flood_of_addresses() {
        let c = Clients::default();
        let rate = Limits { rate: 5, ..L };
        // Idle entries kept for the rate limit are evicted when full.
        for i in 0..(3 * TABLE_CAP as u32) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let k = c.connect(ip, &rate, 1, FREE).unwrap().unwrap();
            c.disconnect(k, &rate);
            assert!(c.tracked() <= TABLE_CAP);
        }
        // Full of clients with queued mail: new ones are not tracked, and
        // nothing with queued mail is evicted.
        let c = Clients::default();
        for i in 0..(TABLE_CAP as u32 + 10) {
            c.queued(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 1);
        }
        assert_eq!(c.tracked(), TABLE_CAP);
        assert_eq!(c.queued_of(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000))), 1);
        assert_eq!(c.connect(ip("192.0.2.9"), &L, 1, FREE), Ok(None));
    }

    #[test]
    fn the_last_slots_go_to_clients_without_a_session() {
        // max_connections = 10: 5 per client, the last 2 slots reserved.
        let l = Limits { connections: 5, reserve: 2, queued: 0, rate: 0, rate_unit: 60 };
        let c = Clients::default();
        let mut free = 10;
        let mut take = |who: &str| {
            let r = c.connect(ip(who), &l, 1, free);
            if r.is_ok() {
                free -= 1;
            }
            r
        };
        for _ in 0..5 {
            assert!(take("192.0.2.1").is_ok());
        }
        assert!(!take("192.0.2.1").unwrap_err().reserve, "its own cap");
        for _ in 0..3 {
            assert!(take("192.0.2.2").is_ok());
        }
        // Two left: a client with a session may not take them...
        let e = take("192.0.2.2").unwrap_err();
        assert_eq!((e.limit, e.n, e.reserve), (Limit::Connections, 4, true));
        // ... clients without one may.
        assert!(take("192.0.2.3").is_ok());
        assert!(take("192.0.2.3").unwrap_err().reserve);
        assert!(take("192.0.2.4").is_ok());
        assert_eq!(free, 0);
        // No per-client limit: no reserve either.
        let off = Limits { connections: 0, ..l };
        assert!(c.connect(ip("192.0.2.1"), &off, 1, 1).is_ok());
    }

    #[test]
    fn refusals_are_logged_once_a_minute_per_client_and_limit() {
        let c = Clients::default();
        let l = Limits { connections: 1, reserve: 2, queued: 0, rate: 1, rate_unit: 3600 };
        let a = ip("192.0.2.1");
        c.connect(a, &l, 1000, FREE).unwrap();
        assert_eq!(c.connect(a, &l, 1000, FREE).unwrap_err().warn, Warn::Log { earlier: 0 });
        for t in 1000..1010 {
            assert_eq!(c.connect(a, &l, t, FREE).unwrap_err().warn, Warn::Quiet);
        }
        // Another limit of the same client has its own line...
        assert!(c.check_mail(a, &l, 1010).is_ok());
        assert_eq!(c.check_mail(a, &l, 1011).unwrap_err().warn, Warn::Log { earlier: 0 });
        assert_eq!(c.check_mail(a, &l, 1012).unwrap_err().warn, Warn::Quiet);
        // ... and so has another client.
        let b = ip("192.0.2.2");
        c.connect(b, &l, 1012, FREE).unwrap();
        assert_eq!(c.connect(b, &l, 1012, FREE).unwrap_err().warn, Warn::Log { earlier: 0 });
        // A minute later: one line again, with the count of those not logged.
        assert_eq!(c.connect(a, &l, 1059, FREE).unwrap_err().warn, Warn::Quiet);
        assert_eq!(c.connect(a, &l, 1060, FREE).unwrap_err().warn, Warn::Log { earlier: 12 });
        assert_eq!(c.check_mail(a, &l, 1061).unwrap_err().warn, Warn::Log { earlier: 0 });
        assert_eq!(c.connect(a, &l, 1061, FREE).unwrap_err().warn, Warn::Quiet);
    }

    #[test]
    fn a_full_table_keeps_clients_inside_a_rate_window() {
        let c = Clients::default();
        let l = Limits { connections: 0, reserve: 0, queued: 0, rate: 3, rate_unit: 60 };
        let addr = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        // A client at its rate limit, idle (no session, nothing queued).
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert!(c.check_mail(a, &l, 1000).is_ok());
        }
        // A flood of new addresses fills the table, each inside its window.
        for i in 0..(TABLE_CAP as u32 - 1) {
            assert!(c.check_mail(addr(i), &l, 1001).is_ok());
        }
        assert_eq!(c.tracked(), TABLE_CAP);
        // One more: nothing can go, so it is not tracked...
        assert!(c.check_mail(ip("192.0.2.99"), &l, 1002).is_ok());
        assert_eq!(c.tracked(), TABLE_CAP);
        // ... and the limited client's window was not reset by the flood.
        assert_eq!(c.check_mail(a, &l, 1003).unwrap_err().limit, Limit::Rate);
        // Once their windows are over, the idle entries go.
        assert!(c.check_mail(ip("192.0.2.99"), &l, 1061).is_ok());
        assert!(c.tracked() < 10, "{}", c.tracked());
        // A client with a window still open stays while others go.
        let c = Clients::default();
        for i in 0..(TABLE_CAP as u32 - 1) {
            assert!(c.check_mail(addr(i), &l, 1000).is_ok());
        }
        for _ in 0..3 {
            assert!(c.check_mail(a, &l, 1050).is_ok());
        }
        assert!(c.check_mail(ip("192.0.2.99"), &l, 1070).is_ok());
        assert_eq!(c.tracked(), 2);
        assert_eq!(c.check_mail(a, &l, 1071).unwrap_err().n, 4);
    }
}
