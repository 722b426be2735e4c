//! `DataParser` alone.
//!
//! 1. Chunking never matters: the end position, the stored bytes and the
//!    counters are the same whether the input comes whole, byte by byte, in
//!    small steps or split where the fuzzer says.
//! 2. The stored copy has only CR LF line ends (no bare CR, no bare LF).
//! 3. The end is only ever `CR LF . CR LF` (or `. CR LF` at the very start).
//! 4. Transparency (RFC 5321 4.5.2): a clean CR LF message, dot-stuffed and
//!    terminated, comes back out byte for byte.
#![no_main]

use bartleby::data::DataParser;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    stored: Vec<u8>,
    end: Option<usize>,
    bare_newlines: u32,
    received: u32,
    in_headers: bool,
}

/// Feeds `input` cut at `cuts` (sorted offsets), stopping at the end line.
fn run(input: &[u8], cuts: &[usize]) -> Outcome {
    let mut p = DataParser::new();
    let mut stored = Vec::new();
    let mut start = 0;
    let mut end = None;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        let cut = cut.clamp(start, input.len());
        if let Some(n) = p.feed(&input[start..cut], &mut |b| stored.extend_from_slice(b)) {
            assert!(n <= cut - start, "end {n} past the fed piece of {} bytes", cut - start);
            end = Some(start + n);
            break;
        }
        start = cut;
    }
    Outcome { stored, end, bare_newlines: p.bare_newlines, received: p.received, in_headers: p.in_headers }
}

fn steps(len: usize, step: usize) -> Vec<usize> {
    (1..).map(|i| i * step).take_while(|&c| c < len).collect()
}

fn assert_crlf_only(s: &[u8]) {
    if let Some(i) = bartleby::data::first_bare_newline(s) {
        panic!("bare CR/LF at {i} in stored {:?}", String::from_utf8_lossy(s));
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many fuzzer-chosen cuts; then that many u16 offsets.
    let (ncuts, rest) = match data.split_first() {
        Some((b, r)) => ((*b % 8) as usize, r),
        None => (0, data),
    };
    let hdr = (ncuts * 2).min(rest.len());
    let (cut_bytes, input) = rest.split_at(hdr);
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]) as usize % (input.len() + 1))
        .collect();
    cuts.sort_unstable();

    let whole = run(input, &[]);
    for other in [run(input, &cuts), run(input, &steps(input.len(), 1)), run(input, &steps(input.len(), 2)), run(input, &steps(input.len(), 3)), run(input, &steps(input.len(), 1023))] {
        assert_eq!(whole, other, "chunking changed the result; cuts {cuts:?}");
    }
    assert_crlf_only(&whole.stored);
    if let Some(end) = whole.end {
        let head = &input[..end];
        assert!(head == b".\r\n" || head.ends_with(b"\r\n.\r\n"), "end at {end} after {:?}", String::from_utf8_lossy(head));
        // The end must be the first one: no earlier prefix ends the data.
        let earlier = run(&input[..end - 1], &[]);
        assert_eq!(earlier.end, None, "an earlier end was skipped");
    }
    if whole.bare_newlines == 0 && whole.end.is_none() {
        // Without bare line ends, nothing but complete CRLF lines is stored.
        assert!(whole.stored.len() <= input.len());
    }

    // Transparency: build a clean message from the input's lines.
    let mut msg = Vec::new();
    for line in input.split(|&c| c == b'\n') {
        msg.extend(line.iter().copied().filter(|&c| c != b'\r'));
        msg.extend_from_slice(b"\r\n");
    }
    let mut wire = Vec::new();
    for line in msg.split_inclusive(|&c| c == b'\n') {
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    wire.extend_from_slice(b"QUIT\r\n");
    let got = run(&wire, &cuts);
    assert_eq!(got.end, Some(wire.len() - 6), "end of a clean message");
    assert_eq!(got.bare_newlines, 0);
    assert!(got.stored == msg, "stored {:?} != sent {:?}", String::from_utf8_lossy(&got.stored), String::from_utf8_lossy(&msg));
});
