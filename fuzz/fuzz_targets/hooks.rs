//! Every registry notification parser (distribution, Harbor, Docker Hub, Quay): any body gives
//! a result or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for source in ["registry", "harbor", "dockerhub", "quay"] {
        let _ = istream::hooks::parse_for_fuzz(source, data);
    }
});
