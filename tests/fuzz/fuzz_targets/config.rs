//! `Config::parse` on arbitrary text: never panics; an error always says
//! something; an accepted configuration respects the documented minimums.
#![no_main]

use std::path::Path;

use bartleby::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Valid UTF-8 as is; anything else through the lossy conversion, so the
    // fuzzer's byte mutations still reach the parser.
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new("fuzz.toml")) {
        Err(e) => {
            assert!(!e.message.trim().is_empty(), "empty error message: {e:?}");
            assert_eq!(e.file, "fuzz.toml");
            assert!(e.line <= text.lines().count(), "error line {} past the end of the text: {e:?}", e.line);
            assert!(!e.to_string().is_empty());
        }
        Ok(c) => {
            assert!(!c.hostname.is_empty());
            assert!(!c.relay_domains.is_empty());
            assert!(!c.primary.is_empty());
            assert!(!c.listen.is_empty());
            assert!(c.max_message_size >= 65536);
            assert!(c.max_connections >= 1);
            assert!(c.max_recipients >= 100);
            assert!(c.max_line_length >= 512);
            assert!(!c.minimal_backoff.is_zero());
            assert!(c.maximal_backoff >= c.minimal_backoff);
            assert!(c.min_free_space > 0);
        }
    }
});
