//! The DATA phase as a pure byte-stream parser: end-of-data detection,
//! dot-unstuffing, bare CR/LF handling and header counting.
//!
//! Why not smtp-proto's `DataReceiver`: it misses an empty body and a
//! leading `..` unless primed, passes bare CR and LF into the body, and when
//! its output is drained to disk between reads it can leave a stray CR. A
//! relay must be exact here (SMTP smuggling, CVE-2023-51764), so this small
//! state machine owns the rules:
//!
//! * data ends only at `CR LF . CR LF`, where the first CR LF is a real one;
//! * a bare LF or bare CR is counted and, in the stored copy, becomes CR LF
//!   (the caller refuses the message instead when configured to reject);
//!   a `.` line after a bare line end is data, never the end;
//! * the stored copy therefore only ever contains CR LF line ends, and the
//!   delivery client dot-stuffs every line that starts with `.`;
//! * memory is bounded: a line longer than [`LINE_CHUNK`] is passed on in
//!   pieces, so a message is never held whole.

/// The offset of the first bare CR or bare LF in `s`, if any. Stored
/// messages must have none (the invariant the DATA parser keeps).
pub fn first_bare_newline(s: &[u8]) -> Option<usize> {
    s.iter().enumerate().position(|(i, &c)| match c {
        b'\n' => i == 0 || s[i - 1] != b'\r',
        b'\r' => s.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// Longest piece of a line kept in memory before it is passed on.
pub const LINE_CHUNK: usize = 1024;

/// Streaming DATA parser. Feed it what the socket gives; it emits the
/// message as it must be stored.
#[derive(Debug)]
pub struct DataParser {
    line: Vec<u8>,
    /// The current line began at a line start (not a continuation piece).
    bol: bool,
    /// The previous line ended with a real CR LF.
    prev_crlf: bool,
    /// The last byte seen was a CR whose meaning depends on the next byte.
    pending_cr: bool,
    /// Still inside the header section.
    pub in_headers: bool,
    /// `Received:` header lines seen.
    pub received: u32,
    /// Bare CR or LF seen (each one counted).
    pub bare_newlines: u32,
}

impl Default for DataParser {
    fn default() -> Self {
        Self::new()
    }
}

impl DataParser {
    pub fn new() -> DataParser {
        DataParser {
            line: Vec::with_capacity(LINE_CHUNK),
            bol: true,
            prev_crlf: true,
            pending_cr: false,
            in_headers: true,
            received: 0,
            bare_newlines: 0,
        }
    }

    /// Consumes input. Returns `Some(n)` when the end-of-data line was found
    /// after `n` bytes of `input` (the rest belongs to the next command), or
    /// `None` when all of `input` was consumed and more is needed. `out`
    /// receives the message bytes to store.
    pub fn feed(&mut self, input: &[u8], out: &mut dyn FnMut(&[u8])) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            // Fast path: copy a run of ordinary bytes.
            if !self.pending_cr {
                let run = input[i..].iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(input.len() - i);
                let mut run_bytes = &input[i..i + run];
                while !run_bytes.is_empty() {
                    let room = LINE_CHUNK - self.line.len();
                    let take = room.min(run_bytes.len());
                    self.line.extend_from_slice(&run_bytes[..take]);
                    run_bytes = &run_bytes[take..];
                    if self.line.len() >= LINE_CHUNK {
                        self.flush_piece(out);
                    }
                }
                i += run;
                if i >= input.len() {
                    break;
                }
            }
            let c = input[i];
            i += 1;
            match c {
                b'\n' => {
                    let crlf = self.pending_cr;
                    self.pending_cr = false;
                    if !crlf {
                        self.bare_newlines += 1;
                    }
                    if self.end_line(crlf, out) {
                        return Some(i);
                    }
                }
                b'\r' => {
                    if self.pending_cr {
                        // The previous CR stood alone.
                        self.bare_newlines += 1;
                        self.end_line(false, out);
                    }
                    self.pending_cr = true;
                }
                other => {
                    // Only reached with a pending CR: it stood alone.
                    self.pending_cr = false;
                    self.bare_newlines += 1;
                    self.end_line(false, out);
                    self.line.push(other);
                }
            }
        }
        None
    }

    /// Passes on the first piece of an over-long line.
    fn flush_piece(&mut self, out: &mut dyn FnMut(&[u8])) {
        let start = usize::from(self.bol && self.line.first() == Some(&b'.'));
        self.note_header(&self.line.clone());
        out(&self.line[start..]);
        self.line.clear();
        self.bol = false;
    }

    fn note_header(&mut self, content: &[u8]) {
        if self.in_headers && self.bol {
            if content.is_empty() {
                self.in_headers = false;
            } else if content.len() >= 9 && content[..9].eq_ignore_ascii_case(b"received:") {
                self.received += 1;
            }
        }
    }

    /// Ends the current line. Returns true at the end-of-data line.
    fn end_line(&mut self, crlf: bool, out: &mut dyn FnMut(&[u8])) -> bool {
        if self.bol && self.prev_crlf && crlf && self.line == b"." {
            self.line.clear();
            return true;
        }
        let start = usize::from(self.bol && self.line.first() == Some(&b'.'));
        let content = std::mem::take(&mut self.line);
        self.note_header(&content[start..]);
        out(&content[start..]);
        out(b"\r\n");
        self.line = content;
        self.line.clear();
        self.bol = true;
        self.prev_crlf = crlf;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the parser over `input` fed in pieces of `step` bytes.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Option<usize>, DataParser) {
        let mut p = DataParser::new();
        let mut stored = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + step).min(input.len());
            if let Some(n) = p.feed(&input[pos..end], &mut |b| stored.extend_from_slice(b)) {
                return (stored, Some(pos + n), p);
            }
            pos = end;
        }
        (stored, None, p)
    }

    fn all_steps(input: &[u8]) -> (Vec<u8>, Option<usize>, DataParser) {
        let first = run(input, input.len().max(1));
        for step in 1..8 {
            let r = run(input, step);
            assert_eq!((r.0.clone(), r.1), (first.0.clone(), first.1), "step {step}");
        }
        first
    }

    #[test]
    fn plain_message_and_pipelined_rest() {
        let (s, end, p) = all_steps(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(s, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(end, Some(24));
        assert!(!p.in_headers);
        assert_eq!(p.bare_newlines, 0);
    }

    #[test]
    fn empty_message_and_leading_dots() {
        let (s, end, _) = all_steps(b".\r\n");
        assert_eq!((s.as_slice(), end), (&b""[..], Some(3)));
        let (s, _, _) = all_steps(b"..first\r\n..\r\n.\r\n");
        assert_eq!(s, b".first\r\n.\r\n");
    }

    #[test]
    fn smuggling_sequences_are_not_the_end() {
        for evil in [&b"a\n.\r\nMAIL FROM:<x@y>\r\n"[..], b"a\r\n.\nMAIL\r\n", b"a\r.\r\nMAIL\r\n", b"a\r\n.\rMAIL\r\n"] {
            let (s, end, p) = all_steps(evil);
            assert_eq!(end, None, "{:?}", String::from_utf8_lossy(evil));
            assert!(p.bare_newlines > 0);
            // Stored copy has only CRLF line ends.
            assert_eq!(first_bare_newline(&s), None);
        }
        // After a normalised line end, the real end still works.
        let (s, end, _) = all_steps(b"a\nb\r\n.\r\n");
        assert_eq!(s, b"a\r\nb\r\n");
        assert_eq!(end, Some(8));
    }

    #[test]
    fn bare_newline_finder() {
        assert_eq!(first_bare_newline(b"a\r\nb\r\n"), None);
        assert_eq!(first_bare_newline(b"a\nb"), Some(1));
        assert_eq!(first_bare_newline(b"\nb"), Some(0));
        assert_eq!(first_bare_newline(b"ab\r"), Some(2));
        assert_eq!(first_bare_newline(b"a\r\r\n"), Some(1));
    }

    #[test]
    fn long_lines_stream_in_pieces() {
        let mut msg = vec![b'x'; 5000];
        msg.extend_from_slice(b"\r\n.\r\n");
        let (s, end, _) = all_steps(&msg);
        assert_eq!(s.len(), 5002);
        assert_eq!(end, Some(5005));
        // A piece boundary never makes a line start: ".x" inside a long line stays.
        let mut msg = vec![b'y'; LINE_CHUNK];
        msg.extend_from_slice(b".z\r\n.\r\n");
        let (s, _, _) = all_steps(&msg);
        assert_eq!(&s[LINE_CHUNK..], b".z\r\n");
    }

    #[test]
    fn counts_received_headers_only_in_header() {
        let (_, _, p) = all_steps(b"Received: a\r\nreceived: b\r\n\tcont\r\nX: y\r\n\r\nReceived: body\r\n.\r\n");
        assert_eq!(p.received, 2);
    }
}
