//! Resident memory that follows the tags tracked, not what start-up once needed. glibc's
//! allocator gives each thread that allocates concurrently its own arena and keeps freed pages
//! mapped: on a two-core engine with a blocking pool for SQLite that was 20 MB of idle arenas
//! at 4,000 tags, and a large `triggers.toml` leaves its parse tree's pages behind. Two arenas
//! and a trim after the start-up work and once a minute keep RSS near what is live (`cargo bench --bench
//! scheduler` shows it). Elsewhere (musl, other systems) these are no-ops.
#![allow(unsafe_code)]

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
    fn malloc_trim(pad: usize) -> i32;
}

/// Caps glibc's arenas at two; call before the runtime starts its threads.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive
        // value, and calling it while other threads allocate is allowed by glibc.
        unsafe {
            mallopt(M_ARENA_MAX, 2);
        }
    }
}

/// Returns freed heap pages to the system (after start-up's large transient allocations).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's own locks.
    unsafe {
        malloc_trim(0);
    }
}

/// Trims once a minute until cancelled: checks interleave short-lived request buffers with
/// long-lived scheduler state, and the freed pages between them would otherwise stay resident.
pub async fn run_trimmer(cancel: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    }
}
