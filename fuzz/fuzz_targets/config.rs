//! The config loader: any text gives a config or an error naming file, line and key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = istream::config::Config::from_str(std::path::Path::new("fuzz.toml"), text);
});
