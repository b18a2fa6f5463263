//! A registry's `WWW-Authenticate` challenge and its token service's reply (untrusted: any
//! header and body, a huge `expires_in` included): a token or an error, never a panic. The
//! input is the header, a NUL byte, then the reply body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let header = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    let _ = istream::registry::auth_for_fuzz(&header, body);
});
