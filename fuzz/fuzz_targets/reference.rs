//! Image, stream tag and stream image references: never panic, and whatever parses as an
//! image reference prints back to itself.
#![no_main]

use istream::model::{ImageRef, StreamImageRef, StreamTagRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = ImageRef::parse(s) {
        assert_eq!(ImageRef::parse(&r.to_string()).as_ref(), Ok(&r), "{s:?}");
    }
    let _ = StreamTagRef::parse(s, "default");
    let _ = StreamImageRef::parse(s, "default");
});
