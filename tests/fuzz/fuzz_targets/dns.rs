//! The DNS response parser against an arbitrary server.
//!
//! Input: the bytes of a response to the query `example.org`/MX with ID
//! 0x1234, or, when byte 1 is odd, `example.org`/A with ID 0x1235 (most
//! inputs will not match: the parser must say "wrong ID"; the seeds match).
//! 1. No panic, no endless loop (compression pointers).
//! 2. Bounds: at most MAX_RECORDS records, names of at most 253 bytes in
//!    host-name characters, lower case, only records of the asked type.
//! 3. An answer is accepted only for our ID and question.
#![no_main]

use bartleby::dns::{self, MAX_RECORDS, Rdata, TYPE_A, TYPE_MX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (id, qtype) = if data.get(1).is_some_and(|b| b & 1 == 1) { (0x1235, TYPE_A) } else { (0x1234, TYPE_MX) };
    let Ok(r) = dns::parse(data, id, "example.org", qtype) else { return };
    assert_eq!(&data[..2], &id.to_be_bytes(), "accepted another ID");
    let q = dns::query(id, "example.org", qtype).unwrap();
    assert_eq!(data[12..q.len()].to_ascii_lowercase(), q[12..], "accepted another question");
    assert!(r.records.len() <= MAX_RECORDS);
    for rec in &r.records {
        match rec {
            Rdata::A(_) => assert_eq!(qtype, TYPE_A),
            Rdata::Aaaa(_) => panic!("AAAA record for an {qtype} question"),
            Rdata::Mx(_, host) => {
                assert_eq!(qtype, TYPE_MX);
                assert!(host.len() <= 253, "name of {} bytes", host.len());
                assert!(host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'), "{host:?}");
            }
        }
    }
});
