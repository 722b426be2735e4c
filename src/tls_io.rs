//! A TLS stream over an async byte stream whose handshake computations run
//! off the runtime (feature `tls`).
//!
//! A handshake costs a 486 about 0.6 s of CPU with an ECDSA key (3.2 s with
//! RSA-2048): done inside a poll, as tokio-rustls does it, it would stop
//! every other session and the scheduler meanwhile, on the relay's one
//! thread. Here the handshake's `process_new_packets` (where the key
//! exchange and the signatures are computed) runs on the blocking pool;
//! the socket I/O stays on the runtime. After the handshake, records are
//! decrypted inline (AES/ChaCha on a few KB: cheap).

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::Connection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// TLS over `S`, after [`handshake`].
pub struct TlsIo<S> {
    io: S,
    pub conn: Connection,
    /// The peer closed the socket (no more TLS records).
    eof: bool,
    /// close_notify queued.
    closing: bool,
}

/// The runtime's `S` as std's Read/Write for rustls: Pending is WouldBlock.
struct Adapter<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for Adapter<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        match Pin::new(&mut *self.io).poll_read(self.cx, &mut rb) {
            Poll::Ready(Ok(())) => Ok(rb.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for Adapter<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// TLS records held for the peer per session: a few replies inbound, two
/// BufWriter loads of a message body outbound.
const SEND_LIMIT: usize = 16 * 1024;

/// Handshake computations running on the blocking pool (at most one: a
/// 486 has one CPU, and the pool has 2 threads, see main.rs).
static COMPUTING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Runs the handshake of `conn` over `io`: I/O here, the computations on
/// the blocking pool. Plaintext the peer sent right after its Finished
/// stays buffered in the connection for the first read.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(mut conn: Connection, mut io: S) -> io::Result<TlsIo<S>> {
    // Encrypted data waiting for a slow (or never reading) peer: at most
    // SEND_LIMIT per session (a write waits beyond it), not rustls's 64 KB.
    conn.set_buffer_limit(Some(SEND_LIMIT));
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    loop {
        while conn.wants_write() {
            out.clear();
            conn.write_tls(&mut out)?;
            io.write_all(&out).await?;
        }
        io.flush().await?;
        if !conn.is_handshaking() {
            break;
        }
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed during the TLS handshake"));
        }
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            if conn.read_tls(&mut rd)? == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS handshake: input not taken"));
            }
            // One handshake computation in the pool at a time (FIFO, so
            // one client with many connections waits its turn like the
            // others): the pool's other thread stays free for the spool's
            // fsync and the scheduler's probe. The permit goes with the
            // job, so a handshake timed out meanwhile still holds it until
            // its computation ends.
            let permit = COMPUTING.acquire().await.map_err(io::Error::other)?;
            let (c, r) = tokio::task::spawn_blocking(move || {
                let r = conn.process_new_packets().map(|_| ());
                drop(permit);
                (conn, r)
            })
            .await
            .map_err(io::Error::other)?;
            conn = c;
            if let Err(e) = r {
                // The alert, if any, then the error.
                out.clear();
                let _ = conn.write_tls(&mut out);
                let _ = io.write_all(&out).await;
                return Err(invalid(e));
            }
        }
    }
    Ok(TlsIo { io, conn, eof: false, closing: false })
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsIo<S> {
    /// Writes out every TLS record waiting.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Adapter { io: &mut self.io, cx }) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.conn.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    // 0: close_notify (or no room in `buf`): end of stream.
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: an end of stream too (the
                // session sees a lost connection, as with plain TCP).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Alerts or key updates owed to the peer go out first.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            match this.conn.read_tls(&mut Adapter { io: &mut this.io, cx }) {
                Ok(0) => this.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(e) = this.conn.process_new_packets() {
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(invalid(e)));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut n = this.conn.writer().write(buf)?;
        match this.poll_send(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if n == 0 => return Poll::Pending,
            Poll::Ready(Ok(())) if n == 0 && !buf.is_empty() => n = this.conn.writer().write(buf)?,
            _ => {}
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.writer().flush()?;
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.conn.send_close_notify();
            this.closing = true;
        }
        match this.poll_send(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    /// The key of `crate::tls::tests::CERT` (a test key, nothing else).
    pub(crate) const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQge9KCh2Hzlo0C6nKJ
eXJBM3PQQwqQHedoVeLPfVKqO4GhRANCAAT6VJ+54OSdUxRuC27vM5zDdG4AGaMK
lqow0IPJzR8V0k4o6wGHRnGbhZsn7DXSohRfFIw7uf18d0wgwr7oh2Pu
-----END PRIVATE KEY-----";

    /// The test pair written to a fresh directory, loaded; a config with
    /// `[tls] primary = "encrypt"` and its client side.
    fn fixture(tag: &str) -> (std::path::PathBuf, crate::tls::Pair, crate::config::Config, crate::tls::Client) {
        let dir = std::env::temp_dir().join(format!("bartleby-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, crate::tls::tests::CERT).unwrap();
        std::fs::write(&key, KEY).unwrap();
        let pair = crate::tls::load_pair(&cert, &key).unwrap();
        let cfg = crate::config::Config::parse(
            "hostname = \"b.example.org\"\nrelay_domains = [\"example.org\"]\nprimary = \"192.0.2.1:25\"\n[tls]\nprimary = \"encrypt\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let client = crate::tls::Client::new(&cfg).unwrap().unwrap();
        (dir, pair, cfg, client)
    }

    #[test]
    fn both_sides_talk_through_tls_io() {
        let (dir, pair, _, client) = fixture("io");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (a, b) = tokio::io::duplex(4096);
            let server = async {
                let s = crate::tls::accept(Arc::clone(&pair.config), a).await.unwrap();
                let (rd, mut wr) = tokio::io::split(s);
                let mut rd = BufReader::new(rd);
                let mut line = String::new();
                rd.read_line(&mut line).await.unwrap();
                assert_eq!(line, "EHLO client\r\n");
                // 100 KB: several records, more than the pipe holds.
                let big = vec![b'x'; 100_000];
                wr.write_all(&big).await.unwrap();
                wr.flush().await.unwrap();
                // The client's close_notify: end of stream.
                let mut rest = Vec::new();
                rd.read_to_end(&mut rest).await.unwrap();
                assert_eq!(rest, b"bye");
                wr.shutdown().await.unwrap();
            };
            let client = async {
                let (mut c, trust, what) = client.connect("mx.example.org", b).await.unwrap();
                // Not vouched for by any ca_file: "Untrusted", as Postfix says.
                assert_eq!(trust, crate::tls::Trust::Untrusted);
                assert!(what.starts_with("TLSv1.3 with cipher TLS_"), "{what}");
                c.write_all(b"EHLO client\r\n").await.unwrap();
                c.flush().await.unwrap();
                let mut got = vec![0u8; 100_000];
                c.read_exact(&mut got).await.unwrap();
                assert!(got.iter().all(|&b| b == b'x'));
                c.write_all(b"bye").await.unwrap();
                c.shutdown().await.unwrap();
                let mut end = Vec::new();
                c.read_to_end(&mut end).await.unwrap();
                assert!(end.is_empty());
            };
            tokio::join!(server, client);
        });
        // A peer that closes mid-handshake: an error, not a hang.
        rt.block_on(async {
            let (a, b) = tokio::io::duplex(4096);
            drop(b);
            assert!(crate::tls::accept(Arc::clone(&pair.config), a).await.is_err());
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer that never reads: what one session holds for it is bounded
    /// by the TLS layer's send buffer (rustls's default is 64 KB: for 20
    /// sessions, 1.3 MB, a third of the relay's memory target). Here a
    /// write of 200 KB to a 1 KB pipe nobody reads.
    #[test]
    fn a_peer_that_never_reads_holds_little() {
        let (dir, pair, _, client) = fixture("hold");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let taken = rt.block_on(async {
            let (a, b) = tokio::io::duplex(1024);
            let (server, client) = tokio::join!(crate::tls::accept(Arc::clone(&pair.config), a), client.connect("mx.example.org", b));
            let (mut s, _c) = (server.unwrap(), client.unwrap());
            let big = vec![b'x'; 200_000];
            let mut taken = 0;
            while taken < big.len() {
                match tokio::time::timeout(std::time::Duration::from_millis(200), s.write(&big[taken..])).await {
                    Ok(Ok(n)) => taken += n,
                    _ => break,
                }
            }
            taken
        });
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("{taken} bytes taken for a peer that reads nothing");
        assert!(taken <= 20_000, "{taken} bytes taken for a peer that reads nothing");
    }

    /// Many handshakes at once must not fill the blocking pool (2 threads
    /// on the appliance, see main.rs): the spool's fsync and the
    /// scheduler's probe run there too, and a 250 after DATA waits for the
    /// fsync. A 486 spends 0.6 s (ECDSA) to 3.2 s (RSA) per handshake: 20
    /// queued handshakes would hold a commit back for 12 s to a minute.
    /// Here, while 8 handshakes are under way, a no-op job in the pool must
    /// start at once, not after the handshakes' computations queued before it.
    #[test]
    fn handshakes_leave_a_pool_thread_for_the_spool() {
        let (dir, pair, cfg, client) = fixture("pool");
        // As main.rs builds the appliance's runtime.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().max_blocking_threads(2).build().unwrap();
        let (worst, all) = rt.block_on(async {
            let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let d = done.clone();
            let probe = tokio::spawn(async move {
                let mut worst = std::time::Duration::ZERO;
                while !d.load(std::sync::atomic::Ordering::SeqCst) {
                    let t = std::time::Instant::now();
                    let waited = tokio::task::spawn_blocking(move || t.elapsed()).await.unwrap();
                    worst = worst.max(waited);
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                worst
            });
            let started = std::time::Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..8 {
                let (a, b) = tokio::io::duplex(4096);
                let config = Arc::clone(&pair.config);
                set.spawn(async move { crate::tls::accept(config, a).await.map(|_| ()) });
                let c = crate::tls::Client::new(&cfg).unwrap().unwrap();
                set.spawn(async move { c.connect("mx.example.org", b).await.map(|_| ()) });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
            let all = started.elapsed();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (probe.await.unwrap(), all)
        });
        drop(client);
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("8 handshakes in {all:?}; a pool job waited at most {worst:?}");
        assert!(worst * 10 < all, "a pool job waited {worst:?} behind handshakes (8 handshakes took {all:?})");
    }
}
