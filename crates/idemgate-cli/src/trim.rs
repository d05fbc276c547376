//! Gives the heap back to the system after a burst of traffic.
//!
//! glibc's malloc keeps what a thread frees in that thread's arena, and gives an
//! arena's memory back only from its top: after a burst of 1,000 streams, whose
//! buffers are freed but interleaved with records that live on, RSS stays near its
//! peak for good. `malloc_trim` releases the free pages wherever they are. It is called
//! once a burst is over (the runtime's live tasks, or the proxy's open connections
//! where they run on threads of their own, fell to half their peak since the last
//! trim), never under steady load, where it would only give back pages the next
//! requests fault in again.

use std::future::Future;
use std::time::Duration;

/// How often the load is looked at.
const EVERY: Duration = Duration::from_secs(1);
/// Bursts smaller than this (live tasks and open connections) leave too little behind
/// to bother.
const MIN_PEAK: usize = 256;

/// Watches the runtime until `stop`, trimming the heap after each burst.
pub(crate) async fn after_bursts(stop: impl Future<Output = ()>) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut stop = std::pin::pin!(stop);
    let mut every = tokio::time::interval(EVERY);
    let mut peak = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = &mut stop => return,
        }
        // Connections served on this runtime are among its tasks too: the larger of
        // the two, not their sum.
        let alive = metrics.num_alive_tasks().max(idemgate_proxy::open_connections());
        peak = peak.max(alive);
        if peak >= MIN_PEAK && alive <= peak / 2 {
            let started = std::time::Instant::now();
            // Off the workers: it takes each arena's lock in turn, for milliseconds
            // on a large heap.
            let _ = tokio::task::spawn_blocking(trim).await;
            tracing::debug!(target: "idemgate::serve", peak, alive, took = ?started.elapsed(), "heap trimmed after a burst");
            peak = alive;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "malloc_trim is a C function with no safe wrapper")]
fn trim() {
    // SAFETY: malloc_trim takes a plain integer and only works on glibc's own heap,
    // under glibc's own locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators give memory back by their own rules.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
