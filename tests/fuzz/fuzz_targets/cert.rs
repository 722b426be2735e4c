//! The certificate reader (subject, subjectAltName, notAfter) of the page
//! and the log, against arbitrary DER: it reads the `[tls] certificate`
//! file at start and at every reload, on PID 1.
//! 1. No panic, no endless loop.
//! 2. Bounds: at most 20 names of at most 253 characters, printable; a
//!    subject of at most a few hundred bytes without control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(i) = bartleby::tls::cert_info(data) else { return };
    assert!(i.names.len() <= 20, "{} names", i.names.len());
    for n in &i.names {
        assert!(n.chars().count() <= 253, "name of {} chars", n.chars().count());
        assert!(!n.chars().any(char::is_control), "{n:?}");
    }
    assert!(i.subject.len() <= 1024, "subject of {} bytes", i.subject.len());
    assert!(!i.subject.chars().any(char::is_control), "{:?}", i.subject);
});
