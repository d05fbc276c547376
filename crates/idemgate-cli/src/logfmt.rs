//! A faster text format for the one log line every request writes.
//!
//! `tracing-subscriber`'s `Full` format builds each line through `core::fmt`: the
//! timestamp's civil date is computed and formatted field by field, every value goes
//! through `Debug` and an escaping guard. For the per-request line that is about a
//! fifth of the CPU a replay costs. [`RequestLines`] writes that line itself, byte for
//! byte as `Full` would (the tests compare them), and hands every other event, and any
//! request line it cannot write identically (a span in scope, a value that would need
//! escaping, colours), to the stock format.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the per-request line (see `idemgate::layer`).
const REQUEST_TARGET: &str = "idemgate::request";

/// Writes `idemgate::request` lines itself; everything else goes to `stock`.
pub(crate) struct RequestLines<F> {
    stock: F,
}

impl<F> RequestLines<F> {
    pub(crate) fn new(stock: F) -> Self {
        Self { stock }
    }
}

thread_local! {
    /// The line being built, and the second whose `YYYY-MM-DDTHH:MM:SS.` prefix it caches.
    static SCRATCH: RefCell<(String, Option<(u64, String)>)> = const { RefCell::new((String::new(), None)) };
}

impl<S, N, F> FormatEvent<S, N> for RequestLines<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let plain_case = meta.target() == REQUEST_TARGET
            && *meta.level() == Level::INFO
            && !writer.has_ansi_escapes()
            && ctx.event_scope().is_none_or(|mut scope| scope.next().is_none());
        if plain_case {
            let written = SCRATCH.with(|scratch| {
                // Busy only if formatting a field logged another request line.
                let mut scratch = scratch.try_borrow_mut().ok()?;
                let (line, second) = &mut *scratch;
                line.clear();
                push_timestamp(line, second, SystemTime::now());
                line.push_str(" INFO ");
                line.push_str(REQUEST_TARGET);
                line.push_str(": ");
                let mut fields = Fields { line, plain: true, first: true };
                event.record(&mut fields);
                if !fields.plain {
                    return None;
                }
                line.push('\n');
                Some(writer.write_str(line))
            });
            if let Some(result) = written {
                return result;
            }
        }
        self.stock.format_event(ctx, writer, event)
    }
}

/// Appends `at` as `Full`'s timer writes it (`2026-11-29T03:12:05.105554Z `), the date
/// and time of day from `cache` while the second is the same.
fn push_timestamp(line: &mut String, cache: &mut Option<(u64, String)>, at: SystemTime) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let prefix = match cache {
        Some((cached, prefix)) if *cached == secs => prefix,
        _ => {
            let (y, mo, d) = civil_from_days(secs / 86_400);
            let tod = secs % 86_400;
            let prefix = format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.", tod / 3600, tod / 60 % 60, tod % 60);
            &mut cache.insert((secs, prefix)).1
        }
    };
    line.push_str(prefix);
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    line.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
    line.push_str("Z ");
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Records fields as `DefaultFields` does: the message bare, then ` name=value`. Clears
/// `plain` at anything it would not write identically.
struct Fields<'a> {
    line: &'a mut String,
    plain: bool,
    first: bool,
}

impl Fields<'_> {
    fn pad(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.line.push(' ');
        }
    }

    /// Starts ` name=`, or gives up on a name the stock format writes otherwise (the
    /// message bare, a raw identifier without its `r#`).
    fn named(&mut self, field: &Field) -> bool {
        if field.name() == "message" || field.name().starts_with("r#") {
            self.plain = false;
            return false;
        }
        self.pad();
        self.line.push_str(field.name());
        self.line.push('=');
        true
    }

    /// ` name=value` of a number or a bool, as `Debug` writes it (as the stock format does).
    fn value(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.named(field) {
            let _ = write!(self.line, "{value:?}");
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // `Debug` of a str escapes quotes, backslashes and anything unprintable; such
        // values (rare: a route name from the config) take the stock path.
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
            self.plain = false;
            return;
        }
        if !self.named(field) {
            return;
        }
        self.line.push('"');
        self.line.push_str(value);
        self.line.push('"');
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.value(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.value(field, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.value(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.value(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() != "message" {
            // Arbitrary `Debug` output may need the stock format's escaping.
            self.plain = false;
            return;
        }
        self.pad();
        let start = self.line.len();
        let _ = write!(self.line, "{value:?}");
        // The stock format escapes control characters in a message: only plain
        // printable ASCII is written as is.
        if !self.line[start..].bytes().all(|b| (0x20..0x7f).contains(&b)) {
            self.plain = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }

    impl Sink {
        /// The lines written, each without its timestamp (the first word).
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(|l| l.split_once(' ').unwrap().1.to_owned()).collect()
        }

        fn timestamps(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(|l| l.split_once(' ').unwrap().0.to_owned()).collect()
        }
    }

    /// Emits the same events under the stock format and under ours.
    fn both(emit: impl Fn()) -> (Sink, Sink) {
        let stock = Sink::default();
        let subscriber = tracing_subscriber::fmt().with_writer(stock.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, &emit);
        let ours = Sink::default();
        let format = RequestLines::new(tracing_subscriber::fmt::format().with_ansi(false));
        let subscriber =
            tracing_subscriber::fmt().with_writer(ours.clone()).with_ansi(false).event_format(format).finish();
        tracing::subscriber::with_default(subscriber, &emit);
        (stock, ours)
    }

    fn request(route: &str, key: &str, latency_ms: f64) {
        tracing::info!(
            target: "idemgate::request",
            route,
            outcome = "replayed",
            status = 200u16,
            latency_ms,
            key,
            "request"
        );
    }

    #[test]
    fn request_lines_are_byte_identical_to_the_stock_format() {
        let (stock, ours) = both(|| {
            request("default", "d1d9fcfc192c", 0.006);
            request("chat", "-", 1234.5);
            request("default", "0123456789ab", 2.9999999999999997e-5);
            // Values that need escaping go through the stock format.
            request("quo\"te", "-", 1.0);
            request("tab\there", "-", 1.0);
            request("\u{1b}[31mred", "-", 1.0);
            request("zürich", "-", 1.0);
            tracing::info!(target: "idemgate::request", error = ?std::io::ErrorKind::Other, "request");
            tracing::info!(target: "idemgate::request", status = 200u16, "bell \u{7} and del \u{7f} and \u{85}");
            tracing::info!(target: "idemgate::request", r#type = "raw", "request");
            tracing::info!(target: "idemgate::request", message = 7u64);
            // Other events, levels and spans are the stock format's.
            tracing::info!(target: "idemgate::serve", listen = "127.0.0.1:8080", "listening");
            tracing::warn!(target: "idemgate::request", route = "default", "request");
            let span = tracing::info_span!("outer", id = 7);
            let _in = span.enter();
            request("default", "-", 1.0);
        });
        assert_eq!(ours.lines().len(), 14);
        assert_eq!(ours.lines(), stock.lines());
        assert_eq!(
            ours.lines()[0],
            r#" INFO idemgate::request: request route="default" outcome="replayed" status=200 latency_ms=0.006 key="d1d9fcfc192c""#
        );
    }

    #[test]
    fn timestamps_have_the_stock_shape_and_time() {
        let (stock, ours) = both(|| request("default", "-", 1.0));
        let (ours, stock) = (&ours.timestamps()[0], &stock.timestamps()[0]);
        assert_eq!(ours.len(), stock.len(), "{ours} vs {stock}");
        // Both were taken within the same minute of the test run.
        assert_eq!(ours[..15], stock[..15], "{ours} vs {stock}");
        assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.');
    }

    #[test]
    fn timestamps_match_known_instants() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000000Z "),
            (951_782_400, 7, "2000-02-29T00:00:00.000007Z "),
            (1_798_761_599, 999_999, "2026-12-31T23:59:59.999999Z "),
            (1_804_129_925, 105_554, "2027-03-04T03:12:05.105554Z "),
            (4_107_542_400, 500_000, "2100-03-01T00:00:00.500000Z "),
        ];
        let mut cache = None;
        for (secs, micros, expected) in cases {
            for _ in 0..2 {
                let mut line = String::new();
                let at = UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000);
                push_timestamp(&mut line, &mut cache, at);
                assert_eq!(line, expected);
            }
        }
    }
}
