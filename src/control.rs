//! The control socket: `bartleby flush` (and a `ping` for tests) talk to a
//! running server over a Unix socket in the spool directory, one command
//! line in, one answer line out ("ok ..." or "error ...").
//!
//! Both sides live here: [`request`] is the command line's client (blocking,
//! std), [`handle`] answers one connection on the server's runtime. The
//! server only listens and accepts (see `server.rs`).
//!
//! May touch: the shared counters (reads the queue size, asks for a queue
//! run); nothing else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::stats::Stats;

/// The longest command line read; the rest is ignored.
const MAX_LINE: u64 = 128;

/// Where the socket is, in the spool directory.
pub fn socket_path(spool_root: &Path) -> PathBuf {
    spool_root.join("control.sock")
}

/// The answer to one command line.
pub fn answer(line: &str, stats: &Stats) -> String {
    let n = Stats::get(&stats.queue_messages);
    match line.trim() {
        "flush" => {
            stats.request_flush();
            format!("ok queue run started: {n} messages in the queue\n")
        }
        "ping" => format!("ok {n} messages in the queue\n"),
        other => format!("error unknown command `{}`\n", other.chars().take(20).collect::<String>()),
    }
}

/// Answers one connection: at most [`MAX_LINE`] bytes read, within 5 s.
pub async fn handle(stream: UnixStream, stats: &Stats) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::with_capacity(MAX_LINE as usize, tokio::io::AsyncReadExt::take(r, MAX_LINE));
    if tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await.is_err() {
        return;
    }
    let _ = w.write_all(answer(&line, stats).as_bytes()).await;
}

/// Client side (`bartleby flush`): sends `cmd`, returns the text after
/// "ok ", or the answer (or why there is none) as the error.
pub fn request(spool_root: &Path, cmd: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let path = socket_path(spool_root);
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| format!("no bartleby server is running on spool {} ({}: {e})", spool_root.display(), path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(format!("{cmd}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    s.take(512).read_to_string(&mut answer).map_err(|e| e.to_string())?;
    match answer.strip_prefix("ok ") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => Err(answer.trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn answers_flush_ping_and_refuses_the_rest() {
        let stats = Stats::new();
        assert_eq!(answer("ping\n", &stats), "ok 0 messages in the queue\n");
        assert_eq!(Stats::get(&stats.flush_requests), 0);
        assert_eq!(answer("flush\n", &stats), "ok queue run started: 0 messages in the queue\n");
        assert_eq!(Stats::get(&stats.flush_requests), 1);
        // A hostile line: cut to 20 characters in the answer.
        assert_eq!(answer(&format!("{}\n", "x".repeat(500)), &stats), format!("error unknown command `{}`\n", "x".repeat(20)));
        assert_eq!(answer("", &stats), "error unknown command ``\n");
    }

    /// The client against the server side over a real socket: the flush is
    /// asked for, the error and "no server" cases are said.
    #[test]
    fn client_and_server_over_the_socket() {
        let root = std::env::temp_dir().join(format!("bartleby-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let e = request(&root, "ping").unwrap_err();
        assert!(e.starts_with("no bartleby server is running on spool "), "{e}");
        let stats = Arc::new(Stats::new());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let l = {
            let _g = rt.enter();
            tokio::net::UnixListener::bind(socket_path(&root)).unwrap()
        };
        let st = stats.clone();
        let server = std::thread::spawn(move || {
            rt.block_on(async {
                for _ in 0..3 {
                    let (c, _) = l.accept().await.unwrap();
                    handle(c, &st).await;
                }
            })
        });
        assert_eq!(request(&root, "ping"), Ok("0 messages in the queue".to_string()));
        assert_eq!(request(&root, "flush"), Ok("queue run started: 0 messages in the queue".to_string()));
        assert_eq!(request(&root, "shutdown"), Err("error unknown command `shutdown`".to_string()));
        server.join().unwrap();
        assert_eq!(Stats::get(&stats.flush_requests), 1, "one flush asked for");
        let _ = std::fs::remove_dir_all(&root);
    }
}
