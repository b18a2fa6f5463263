//! Every registry notification parser (all eleven sources of SPEC section 9): any body gives
//! a result or an error, never a panic. `ISTREAM_FUZZ_SOURCE=<name>` fuzzes one source alone.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The source to fuzz alone, read once (not per input).
fn only() -> Option<&'static str> {
    static ONLY: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ONLY.get_or_init(|| std::env::var("ISTREAM_FUZZ_SOURCE").ok())
        .as_deref()
}

fuzz_target!(|data: &[u8]| {
    for source in istream::hooks::SOURCES {
        if only().is_none_or(|o| o == source) {
            let _ = istream::hooks::parse_for_fuzz(source, data);
        }
    }
});
