//! Durations and rates as the config loader reads them (`interval`, `timeout`, backoffs,
//! `max_requests_per_second`): any value is accepted within its documented bounds or refused
//! with an error naming the key, never a panic and never a value that overflows later.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = std::str::from_utf8(data) else {
        return;
    };
    let v = v.replace(['"', '\n', '\\'], "");
    let text = format!(
        "[schedule]\ninterval = \"{v}\"\n[delivery]\ninitial_backoff = \"{v}\"\ntimeout = \"{v}\"\n[[registry]]\nhost = \"r.example\"\nmax_requests_per_second = {rate}\n",
        rate = if v.is_empty() { "1" } else { &v }
    );
    if let Ok(cfg) = istream::config::Config::from_str(std::path::Path::new("fuzz.toml"), &text) {
        // Whatever loads can be scheduled: the next run of the interval is computable.
        let _ = cfg.schedule.interval.next_after(chrono::Utc::now());
    }
});
