//! A batched log writer: log lines go into a shared buffer that one thread writes to
//! stderr at most every [`FLUSH_EVERY`] or when it holds [`FLUSH_AT`] bytes, as nginx's
//! `access_log ... buffer= flush=` does.
//!
//! `tracing-appender`'s non-blocking writer already keeps `write(2)` off the request
//! path, but it hands each line to its thread through a channel: under load that is a
//! thread wake-up and a `write(2)` per request, about a tenth of the CPU a replay costs.
//! Here a request appends its line under a mutex, and the writer thread is woken only
//! when the buffer fills or when the first line arrives after it went idle.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a line waits in the buffer.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written at once.
pub(crate) const FLUSH_AT: usize = 64 * 1024;
/// Lines beyond this many buffered bytes are dropped (and counted) rather than slow a
/// request down when stderr blocks.
const CAPACITY: usize = 8 * 1024 * 1024;

/// The `MakeWriter` handed to `tracing-subscriber`.
#[derive(Clone)]
pub(crate) struct LogBuffer {
    shared: Arc<Shared>,
}

/// Flushes what is buffered and stops the writer thread when dropped.
pub(crate) struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    dropped: u64,
    /// The writer thread sleeps without a deadline and must be woken by the next line.
    idle: bool,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind: keep logging.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A writer of `out` (stderr in the binary) and the guard that owns its thread.
pub(crate) fn new<W: Write + Send + 'static>(out: W) -> std::io::Result<(LogBuffer, Guard)> {
    let shared = Arc::new(Shared { state: Mutex::new(State::default()), wake: Condvar::new() });
    let thread = std::thread::Builder::new().name("idemgate-log".into()).spawn({
        let shared = shared.clone();
        move || write_loop(&shared, out)
    })?;
    Ok((LogBuffer { shared: shared.clone() }, Guard { shared, thread: Some(thread) }))
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::with_capacity(FLUSH_AT);
    loop {
        let mut state = shared.lock();
        if state.buf.is_empty() && !state.closed {
            state.idle = true;
            state = shared.wake.wait_while(state, |s| s.idle && !s.closed).unwrap_or_else(PoisonError::into_inner);
        }
        if state.buf.len() < FLUSH_AT && !state.closed {
            // Let more lines gather, unless the buffer fills first.
            state = shared
                .wake
                .wait_timeout_while(state, FLUSH_EVERY, |s| s.buf.len() < FLUSH_AT && !s.closed)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        std::mem::swap(&mut state.buf, &mut spare);
        let dropped = std::mem::take(&mut state.dropped);
        let closed = state.closed;
        drop(state);
        if dropped > 0 {
            let _ = writeln!(out, "idemgate: {dropped} log lines dropped: the log output could not keep up");
        }
        // Nowhere to report a failed write of the log itself.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        if spare.capacity() > 4 * FLUSH_AT {
            spare.shrink_to(FLUSH_AT);
        }
        if closed && shared.lock().buf.is_empty() {
            return;
        }
    }
}

/// How long the guard waits for the last lines to be written at exit: stderr may be a
/// pipe nobody reads any more, and exiting matters more than those lines.
const EXIT_GRACE: Duration = Duration::from_secs(1);

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let deadline = std::time::Instant::now() + EXIT_GRACE;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// One event's writer: `tracing-subscriber` formats a line, then writes it in one call.
pub(crate) struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut state = self.0.lock();
        if state.closed {
            // After the guard: write through, nothing else will.
            drop(state);
            return std::io::stderr().write(bytes);
        }
        if state.buf.len() + bytes.len() > CAPACITY {
            state.dropped += 1;
            return Ok(bytes.len());
        }
        state.buf.extend_from_slice(bytes);
        if state.idle || state.buf.len() >= FLUSH_AT {
            state.idle = false;
            drop(state);
            self.0.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that appends to a shared vector and counts its calls.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(bytes);
            s.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn contents(sink: &Sink) -> (String, usize) {
        let s = sink.0.lock().unwrap();
        (String::from_utf8(s.0.clone()).unwrap(), s.1)
    }

    #[test]
    fn lines_arrive_in_order_in_few_writes_and_all_by_the_guard() {
        let sink = Sink::default();
        let (buffer, guard) = new(sink.clone()).unwrap();
        let mut expected = String::new();
        for i in 0..10_000 {
            let line = format!("line {i}\n");
            tracing_subscriber::fmt::MakeWriter::make_writer(&buffer).write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        drop(guard);
        let (written, writes) = contents(&sink);
        assert_eq!(written, expected);
        assert!(writes < 1_000, "{writes} writes for 10,000 lines");
    }

    #[test]
    fn an_output_that_blocks_does_not_hold_up_the_exit() {
        /// Stands for a pipe nobody reads: every write blocks for good.
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                loop {
                    std::thread::park();
                }
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (buffer, guard) = new(Stuck).unwrap();
        tracing_subscriber::fmt::MakeWriter::make_writer(&buffer).write_all(b"line\n").unwrap();
        std::thread::sleep(FLUSH_EVERY * 2);
        let started = std::time::Instant::now();
        drop(guard);
        assert!(started.elapsed() < EXIT_GRACE * 3, "the guard waited {:?}", started.elapsed());
    }

    #[test]
    fn a_lone_line_is_written_within_the_flush_interval() {
        let sink = Sink::default();
        let (buffer, _guard) = new(sink.clone()).unwrap();
        tracing_subscriber::fmt::MakeWriter::make_writer(&buffer).write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + FLUSH_EVERY * 20;
        while contents(&sink).0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "a line stayed buffered");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(contents(&sink).0, "hello\n");
    }
}
