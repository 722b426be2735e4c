//! STARTTLS in and out (cargo feature `tls`, on by default).
//!
//! The stack is rustls with the RustCrypto provider built with its
//! portable ("soft") backends (see `.cargo/config.toml`): ring does not
//! build for the i486 target, and the CPUID-selected SIMD paths of the
//! RustCrypto crates fail the instruction audit (image/check-486.sh).
//!
//! Inbound: [`Server`] holds the certificate and key in force; a thread
//! looks at the files' modification times every few seconds and swaps in a
//! renewed pair, or keeps the old one and warns when the new one is bad.
//! Outbound: [`Client`] does STARTTLS to the primary at the level of
//! `[tls] primary` (Postfix's smtp_tls_security_level) and says how far the
//! primary's certificate could be trusted, in Postfix's words.
//!
//! The certificate facts the page shows ([`CertInfo`]) come from a small
//! DER reader here, not from an X.509 crate (every KB counts on a floppy).

use std::path::Path;

/// Largest certificate chain or key file read (a chain is a few KB).
pub const MAX_PEM_BYTES: u64 = 256 * 1024;

/// What the page and `/metrics` show of the certificate in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject as `CN=..., O=...`.
    pub subject: String,
    /// The DNS names and addresses of subjectAltName.
    pub names: Vec<String>,
    /// notAfter, unix seconds.
    pub not_after: u64,
}

/// The inbound TLS state kept in [`crate::stats::Stats`] for the page.
#[derive(Debug, Clone, Default)]
pub struct TlsState {
    /// STARTTLS is configured (`[tls] certificate`).
    pub configured: bool,
    /// The certificate offered now (None: none usable, no STARTTLS).
    pub info: Option<CertInfo>,
    /// Why the files on disk are not the pair in force (a reload was
    /// refused); empty when they agree.
    pub warning: String,
}

/// Days before expiry from which the page warns.
pub const EXPIRY_WARNING_DAYS: u64 = 14;

/// Reads a PEM file named in the configuration: a regular file, bounded.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    crate::util::read_small_file(path, MAX_PEM_BYTES).map(|(b, _)| b).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

// ---------------------------------------------------------------- DER reader

/// One DER element: tag, contents, and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 3 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Unix seconds of a UTCTime (tag 0x17) or GeneralizedTime (0x18).
fn der_time(tag: u8, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let y: u64 = s.get(..2)?.parse().ok()?;
            (if y < 50 { 2000 + y } else { 1900 + y }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    if rest.len() < 10 || !rest.bytes().take(10).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| -> u64 { rest[i..i + 2].parse().unwrap_or(0) };
    let (mon, day, h, m, sec) = (n(0), n(2), n(4), n(6), n(8));
    if !(1..=12).contains(&mon) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm), in u64 from 1970.
    let (y, mo) = if mon <= 2 { (year - 1, mon + 9) } else { (year, mon - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// `CN=..., O=...` from a Name (the contents of its SEQUENCE).
fn der_name(mut name: &[u8]) -> String {
    let mut out = String::new();
    while let Some((_, set, rest)) = der(name) {
        name = rest;
        // A name is a few attributes; more are cut (the page and a log line).
        if out.len() > 400 {
            out.push_str(", ...");
            break;
        }
        let Some((_, atv, _)) = der(set) else { continue };
        let Some((_, oid, val)) = der(atv) else { continue };
        let key = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x06] => "C",
            [0x55, 0x04, 0x07] => "L",
            [0x55, 0x04, 0x08] => "ST",
            [0x55, 0x04, 0x0a] => "O",
            [0x55, 0x04, 0x0b] => "OU",
            _ => continue,
        };
        let Some((_, v, _)) = der(val) else { continue };
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(key);
        out.push('=');
        out.extend(String::from_utf8_lossy(v).chars().filter(|c| !c.is_control()).take(100));
    }
    out
}

/// The page's facts of a DER certificate: subject, subjectAltName, notAfter.
pub fn cert_info(cert: &[u8]) -> Option<CertInfo> {
    let (_, c, _) = der(cert)?;
    let (_, tbs, _) = der(c)?;
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r; // version
    }
    let (_, _, r) = der(rest)?; // serialNumber
    let (_, _, r) = der(r)?; // signature
    let (_, _, r) = der(r)?; // issuer
    let (_, validity, r) = der(r)?;
    let (_, _, v) = der(validity)?;
    let (ttag, tval, _) = der(v)?;
    let not_after = der_time(ttag, tval)?;
    let (_, subject, r) = der(r)?;
    let (_, _, mut r) = der(r)?; // subjectPublicKeyInfo
    let mut names = Vec::new();
    while let Some((tag, v, more)) = der(r) {
        r = more;
        if tag != 0xa3 {
            continue;
        }
        let Some((_, mut exts, _)) = der(v) else { break };
        while let Some((_, ext, more)) = der(exts) {
            exts = more;
            let Some((_, oid, e)) = der(ext) else { continue };
            if oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            let mut e = e;
            // critical BOOLEAN, optional
            if let Some((0x01, _, after)) = der(e) {
                e = after;
            }
            let Some((0x04, octets, _)) = der(e) else { continue };
            let Some((_, mut gns, _)) = der(octets) else { continue };
            while let Some((gtag, gv, more)) = der(gns) {
                gns = more;
                match (gtag, gv.len()) {
                    (0x82, _) => names.push(String::from_utf8_lossy(gv).chars().filter(|c| c.is_ascii_graphic()).take(253).collect()),
                    (0x87, 4) => names.push(std::net::Ipv4Addr::new(gv[0], gv[1], gv[2], gv[3]).to_string()),
                    (0x87, 16) => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(gv);
                        names.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                    _ => {}
                }
                if names.len() >= 20 {
                    break;
                }
            }
        }
    }
    Some(CertInfo { subject: der_name(subject), names, not_after })
}

/// OpenSSL's (and so Postfix's) name of a rustls cipher suite name, and
/// its bits.
pub fn openssl_cipher(rustls_name: &str) -> (String, u32) {
    let bits = if rustls_name.contains("AES_128") { 128 } else { 256 };
    if let Some(rest) = rustls_name.strip_prefix("TLS13_") {
        return (format!("TLS_{rest}"), bits);
    }
    let name = rustls_name
        .strip_prefix("TLS_")
        .unwrap_or(rustls_name)
        .replace("_WITH_", "_")
        .replace("AES_128", "AES128")
        .replace("AES_256", "AES256")
        .replace("_POLY1305_SHA256", "_POLY1305")
        .replace('_', "-");
    (name, bits)
}

#[cfg(feature = "tls")]
pub use imp::*;

#[cfg(feature = "tls")]
mod imp {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
    use tokio::io::{AsyncRead, AsyncWrite};

    use super::{CertInfo, read_pem};
    use crate::config::{Config, TlsLevel};
    use crate::logging::MASTER;
    use crate::stats::Stats;

    pub use crate::tls_io::TlsIo;

    /// How often the watcher looks at the certificate and key files.
    const WATCH_INTERVAL: Duration = Duration::from_secs(2);

    /// The crypto provider (one per process).
    pub fn provider() -> Arc<CryptoProvider> {
        static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
        P.get_or_init(|| Arc::new(rustls_rustcrypto::provider())).clone()
    }

    /// `TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128/128 bits)`, as
    /// Postfix logs and records it.
    pub fn describe(c: &rustls::CommonState) -> String {
        let version = match c.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(v) => format!("{v:?}"),
            None => "TLS".to_string(),
        };
        let suite = c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
        let (name, bits) = super::openssl_cipher(&suite);
        format!("{version} with cipher {name} ({bits}/{bits} bits)")
    }

    /// Loads the PEM chain in `path`.
    fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
        let pem = read_pem(path)?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: not a PEM certificate file: {e:?}", path.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate (-----BEGIN CERTIFICATE-----) in the file", path.display()));
        }
        Ok(chain)
    }

    /// A certificate and key that belong together, ready to serve.
    pub struct Pair {
        pub config: Arc<ServerConfig>,
        pub info: CertInfo,
    }

    /// Loads and checks a certificate chain and its key: both parse, the key
    /// is one the provider can sign with, and it is the key of the first
    /// certificate (a signature made with it verifies with the
    /// certificate's public key). Errors name the file at fault.
    pub fn load_pair(cert: &Path, key: &Path) -> Result<Pair, String> {
        let chain = load_chain(cert)?;
        let info = super::cert_info(&chain[0]).ok_or_else(|| format!("{}: the first certificate cannot be read (not X.509 DER)", cert.display()))?;
        let key_pem = read_pem(key)?;
        let der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("{}: no private key (PKCS#8, EC or RSA PEM) in the file: {e:?}", key.display()))?;
        let p = provider();
        let signing = p
            .key_provider
            .load_private_key(der.clone_key())
            .map_err(|e| format!("{}: unusable private key (ECDSA P-256/P-384 or RSA expected): {e}", key.display()))?;
        let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| format!("{}: the first certificate is not usable: {e:?}", cert.display()))?;
        let algs = &p.signature_verification_algorithms;
        let signer = signing
            .choose_scheme(&algs.supported_schemes())
            .ok_or_else(|| format!("{}: no signature scheme for this key", key.display()))?;
        const PROBE: &[u8] = b"bartleby: does this key belong to this certificate?";
        let sig = signer.sign(PROBE).map_err(|e| format!("{}: cannot sign with the key: {e}", key.display()))?;
        let verifiers = algs.mapping.iter().find(|(s, _)| *s == signer.scheme()).map(|(_, a)| *a).unwrap_or(&[]);
        if !verifiers.iter().any(|a| ee.verify_signature(*a, PROBE, &sig).is_ok()) {
            return Err(format!(
                "{}: the key does not match the certificate in {} (subject {})",
                key.display(),
                cert.display(),
                info.subject
            ));
        }
        let mut config = ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, der)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        // No session cache, no tickets: a backup MX sees few repeat
        // clients, and each cached session is RAM on a 16 MB machine.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Pair { config: Arc::new(config), info })
    }

    /// What identifies a file's content for the watcher.
    type Stamp = (i64, i64, u64, u64);

    fn stamp(p: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
    }

    /// The inbound side: the pair in force, swapped when the files change.
    pub struct Server {
        cert: PathBuf,
        key: PathBuf,
        current: Mutex<Option<Arc<ServerConfig>>>,
        stats: Arc<Stats>,
    }

    impl Server {
        /// Loads the pair of `[tls]` (None without a certificate) and
        /// starts its watcher. A bad pair at start is logged and shown on
        /// the page; STARTTLS is then not offered until the files are
        /// fixed (`check` refuses such a pair before that).
        pub fn start(cfg: &Config, stats: Arc<Stats>) -> Option<Arc<Server>> {
            let (cert, key) = (cfg.tls.certificate.clone()?, cfg.tls.key.clone()?);
            let s = Arc::new(Server { cert, key, current: Mutex::new(None), stats });
            let stamps = (stamp(&s.cert), stamp(&s.key));
            s.reload(true);
            let w = s.clone();
            let spawned = std::thread::Builder::new().name("tls-watch".into()).stack_size(256 * 1024).spawn(move || {
                let mut seen = stamps;
                loop {
                    std::thread::sleep(WATCH_INTERVAL);
                    let now = (stamp(&w.cert), stamp(&w.key));
                    if now != seen {
                        seen = now;
                        w.reload(false);
                    }
                }
            });
            if let Err(e) = spawned {
                log::warn!(target: MASTER, "warning: TLS: cannot start the certificate watcher: {e}; renewed certificates need a restart");
            }
            Some(s)
        }

        fn reload(&self, first: bool) {
            let mut state = self.stats.tls.lock().map(|g| g.clone()).unwrap_or_default();
            state.configured = true;
            match load_pair(&self.cert, &self.key) {
                Ok(p) => {
                    if let Ok(mut c) = self.current.lock() {
                        *c = Some(p.config);
                    }
                    log::info!(
                        target: MASTER,
                        "TLS: {} certificate {} (subject {}, names {}, expires {})",
                        if first { "serving" } else { "reloaded: now serving" },
                        self.cert.display(),
                        p.info.subject,
                        p.info.names.join(" "),
                        crate::util::rfc5322_date(p.info.not_after)
                    );
                    state.info = Some(p.info);
                    state.warning.clear();
                }
                Err(e) => {
                    let kept = if state.info.is_some() {
                        "the certificate in force is kept"
                    } else {
                        "STARTTLS is not offered until this is fixed"
                    };
                    log::warn!(target: MASTER, "warning: TLS: {e}; {kept}");
                    state.warning = format!("{e}; {kept}");
                }
            }
            if let Ok(mut g) = self.stats.tls.lock() {
                *g = state;
            }
        }

        /// The configuration to answer STARTTLS with, if any is usable.
        pub fn config(&self) -> Option<Arc<ServerConfig>> {
            self.current.lock().ok()?.clone()
        }
    }

    /// Runs the server side of the handshake on `stream`.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(config: Arc<ServerConfig>, stream: S) -> std::io::Result<TlsIo<S>> {
        let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
        crate::tls_io::handshake(rustls::Connection::Server(conn), stream).await
    }

    /// [`describe`] of either side.
    pub fn describe_conn(c: &rustls::Connection) -> String {
        match c {
            rustls::Connection::Client(c) => describe(c),
            rustls::Connection::Server(c) => describe(c),
        }
    }

    /// How far the primary's certificate was checked, in Postfix's words.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Trust {
        /// Not checked, or not vouched for by `ca_file`.
        Untrusted,
        /// Signed by a CA of `ca_file`, but not for this host name.
        Trusted,
        /// Signed by a CA of `ca_file` for this host name, or the pinned
        /// fingerprint.
        Verified,
    }

    impl Trust {
        pub fn word(self) -> &'static str {
            match self {
                Trust::Untrusted => "Untrusted",
                Trust::Trusted => "Trusted",
                Trust::Verified => "Verified",
            }
        }
    }

    /// The outbound side: one per process, from `[tls]`.
    pub struct Client {
        pub level: TlsLevel,
        config: Arc<ClientConfig>,
        roots: Option<Arc<rustls::client::WebPkiServerVerifier>>,
        fingerprint: Option<[u8; 32]>,
    }

    /// Accepts any certificate, so that the handshake completes and the
    /// policy is decided afterwards (as Postfix does: it may then even send
    /// QUIT). The handshake signatures are still verified.
    #[derive(Debug)]
    struct Afterwards(Arc<CryptoProvider>);

    impl ServerCertVerifier for Afterwards {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn verify_tls13_signature(&self, m: &[u8], c: &CertificateDer<'_>, d: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    impl Client {
        /// Builds the client side of `[tls]`; None when TLS to the primary
        /// is off. Errors name the file (`ca_file`).
        pub fn new(cfg: &Config) -> Result<Option<Client>, String> {
            let t = &cfg.tls;
            if t.primary == TlsLevel::None {
                return Ok(None);
            }
            let p = provider();
            let roots = match &t.ca_file {
                None => None,
                Some(path) => {
                    let mut store = rustls::RootCertStore::empty();
                    for c in load_chain(path)? {
                        store.add(c).map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
                    }
                    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), p.clone())
                        .build()
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    Some(v)
                }
            };
            let mut config = ClientConfig::builder_with_provider(p.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Afterwards(p)))
                .with_no_client_auth();
            // A few sessions to resume: a full handshake costs a 486 dearly.
            config.resumption = rustls::client::Resumption::in_memory_sessions(8);
            Ok(Some(Client { level: t.primary, config: Arc::new(config), roots, fingerprint: t.primary_fingerprint }))
        }

        /// The process's client, built on first use from `cfg` (the
        /// configuration does not change while running). Err: `ca_file`
        /// unusable (logged once by the caller's defer reason).
        pub fn get(cfg: &Config) -> &'static Result<Option<Client>, String> {
            static C: OnceLock<Result<Option<Client>, String>> = OnceLock::new();
            C.get_or_init(|| Client::new(cfg))
        }

        /// STARTTLS's handshake with `host` over `stream`; then how far its
        /// certificate is to be trusted, and the session's description.
        pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
            &self,
            host: &str,
            stream: S,
        ) -> std::io::Result<(TlsIo<S>, Trust, String)> {
            let name = ServerName::try_from(host.trim_end_matches('.').to_string())
                .unwrap_or_else(|_| ServerName::try_from("invalid.invalid".to_string()).expect("a valid name"));
            let conn = rustls::ClientConnection::new(self.config.clone(), name.clone()).map_err(std::io::Error::other)?;
            let tls = crate::tls_io::handshake(rustls::Connection::Client(conn), stream).await?;
            let trust = self.judge(tls.conn.peer_certificates().unwrap_or(&[]), &name);
            let what = describe_conn(&tls.conn);
            Ok((tls, trust, what))
        }

        /// Trust of a chain presented for `name`.
        pub fn judge(&self, chain: &[CertificateDer<'_>], name: &ServerName<'_>) -> Trust {
            let Some(leaf) = chain.first() else { return Trust::Untrusted };
            if let Some(pin) = &self.fingerprint {
                use sha2::Digest;
                let got: [u8; 32] = sha2::Sha256::digest(leaf.as_ref()).into();
                if &got != pin {
                    return Trust::Untrusted;
                }
                if self.roots.is_none() {
                    return Trust::Verified;
                }
            }
            let Some(v) = &self.roots else { return Trust::Untrusted };
            match v.verify_server_cert(leaf, &chain[1..], name, &[], UnixTime::now()) {
                Ok(_) => Trust::Verified,
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => Trust::Trusted,
                Err(_) => Trust::Untrusted,
            }
        }
    }

    /// SHA-256 of a DER certificate as `sha256:AB:CD:...`.
    pub fn fingerprint(der: &[u8]) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(der);
        let hex: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
        format!("sha256:{}", hex.join(":"))
    }

    /// `bartleby check`: the pair and the CA file load.
    pub fn check(cfg: &Config) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        if let (Some(c), Some(k)) = (&cfg.tls.certificate, &cfg.tls.key) {
            let p = load_pair(c, k)?;
            let chain = load_chain(c)?;
            out.push(format!(
                "TLS certificate: {} (subject {}, names {}, expires {}, {})",
                c.display(),
                p.info.subject,
                p.info.names.join(" "),
                crate::util::rfc5322_date(p.info.not_after),
                fingerprint(&chain[0])
            ));
        }
        if let Some(cl) = Client::new(cfg)? {
            out.push(format!("TLS to the primary: {:?}", cl.level).to_lowercase());
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(0x18, b"20000229120000Z"), Some(951_825_600));
        assert_eq!(der_time(0x18, b"20381231000000"), None);
        assert_eq!(der_time(0x17, b"7013010000Z"), None);
    }

    #[test]
    fn cipher_names_as_openssl() {
        assert_eq!(openssl_cipher("TLS13_AES_128_GCM_SHA256"), ("TLS_AES_128_GCM_SHA256".into(), 128));
        assert_eq!(openssl_cipher("TLS13_CHACHA20_POLY1305_SHA256"), ("TLS_CHACHA20_POLY1305_SHA256".into(), 256));
        assert_eq!(openssl_cipher("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"), ("ECDHE-ECDSA-AES256-GCM-SHA384".into(), 256));
        assert_eq!(openssl_cipher("TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"), ("ECDHE-RSA-CHACHA20-POLY1305".into(), 256));
        assert_eq!(openssl_cipher("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"), ("ECDHE-RSA-AES128-GCM-SHA256".into(), 128));
    }

    /// `openssl x509 -req ... -days 3650` with subjectAltName
    /// DNS:mx.example.org, DNS:localhost, IP:127.0.0.1.
    #[cfg(feature = "tls")]
    pub const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBuDCCAV6gAwIBAgIURkz9Q4QDJCpLOUBTJYbk+oIiKGAwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHVGVzdCBDQTAeFw0yNjEyMDMxNTI0NTZaFw0zNjExMzAxNTI0
NTZaMCsxFzAVBgNVBAMMDm14LmV4YW1wbGUub3JnMRAwDgYDVQQKDAdFeGFtcGxl
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+lSfueDknVMUbgtu7zOcw3RuABmj
CpaqMNCDyc0fFdJOKOsBh0Zxm4WbJ+w10qIUXxSMO7n9fHdMIMK+6Idj7qN5MHcw
KgYDVR0RBCMwIYIObXguZXhhbXBsZS5vcmeCCWxvY2FsaG9zdIcEfwAAATAJBgNV
HRMEAjAAMB0GA1UdDgQWBBTvkEpTbqB8e7PdnWeEltW4lCdTgTAfBgNVHSMEGDAW
gBR6meRST6iCJakP9xF1hUiMwyEQJDAKBggqhkjOPQQDAgNIADBFAiAjrf2ZQOaA
UXbSerKFpYegjty0EXe5QYyYswxs8SninQIhAO491CIclPetdHzR2fcvu+D7Mh1f
JCu82yJHhVOHuOBh
-----END CERTIFICATE-----";

    #[cfg(feature = "tls")]
    #[test]
    fn reads_subject_names_and_expiry() {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let der = CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap();
        let i = cert_info(&der).unwrap();
        assert_eq!(i.subject, "CN=mx.example.org, O=Example");
        assert_eq!(i.names, ["mx.example.org", "localhost", "127.0.0.1"]);
        // notAfter=Nov 30 15:24:56 2036 GMT (`openssl x509 -noout -enddate`)
        assert_eq!(i.not_after, 2_111_671_496); // date -d "2036-11-30 15:24:56Z" +%s
        // Every cut of it is refused, never a panic.
        for n in 0..der.len() {
            assert_eq!(cert_info(&der[..n]), None);
        }
        assert_eq!(
            fingerprint(&der),
            "sha256:1A:2E:3D:56:70:72:99:FF:7E:57:68:02:D8:F7:2C:DF:0F:A9:44:FF:D8:4C:7D:82:D2:62:08:A2:F4:57:33:30"
        );
    }

    /// A Name of 300 RDNs (a cert file may hold 256 KB): the subject shown
    /// on the page and logged in one line stays short.
    #[test]
    fn a_subject_of_many_attributes_is_bounded() {
        let rdn = {
            let v = [&[0x0c, 100][..], &[b'a'; 100][..]].concat();
            let atv = [&[0x30, 107, 0x06, 3, 0x55, 0x04, 0x03][..], &v[..]].concat();
            [&[0x31, 109][..], &atv[..]].concat()
        };
        let name = rdn.repeat(300);
        let s = der_name(&name);
        assert!(s.starts_with("CN=aaaa"), "{s}");
        assert!(s.len() <= 512, "subject of {} bytes", s.len());
    }

    #[test]
    fn truncated_der_is_none_not_a_panic() {
        for n in 0..40 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 0x30) as u8).collect();
            let _ = cert_info(&junk);
        }
        assert_eq!(der(&[0x30, 0x84, 1, 2, 3, 4]), None);
        assert_eq!(der(&[0x30, 0x05, 1]), None);
    }
}
