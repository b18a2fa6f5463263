//! Every registry notification parser (all eleven sources of SPEC section 9): any body gives
//! a result or an error, never a panic. `ISTREAM_FUZZ_SOURCE=<name>` fuzzes one source alone.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let only = std::env::var("ISTREAM_FUZZ_SOURCE").ok();
    for source in istream::hooks::SOURCES {
        if only.as_deref().is_none_or(|o| o == source) {
            let _ = istream::hooks::parse_for_fuzz(source, data);
        }
    }
});
