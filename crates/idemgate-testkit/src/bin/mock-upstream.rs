//! `mock-upstream`: the fake OpenAI and Anthropic upstream of
//! [`idemgate_testkit::mock`] as a process, for tests written in other languages.
//!
//! ```text
//! mock-upstream [--listen 127.0.0.1:0] [--chunks N] [--chunk-delay-ms N]
//! ```
//!
//! Once it accepts connections it prints exactly one line to stdout,
//! `mock-upstream listening on http://127.0.0.1:PORT`, and then runs until SIGTERM or
//! SIGINT, on which it exits 0.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use idemgate_testkit::mock::{MockConfig, MockUpstream};

const USAGE: &str = "usage: mock-upstream [--listen ADDR] [--chunks N] [--chunk-delay-ms N]";

fn main() -> ExitCode {
    let config = match parse(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            let _ = writeln!(std::io::stderr(), "mock-upstream: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "mock-upstream: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: MockConfig) -> ExitCode {
    // Signals are hooked before the ready line, so a SIGTERM sent as soon as the line
    // is read already means a clean exit.
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "mock-upstream: cannot wait for signals: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mock = match MockUpstream::start_with(config).await {
        Ok(mock) => mock,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "mock-upstream: cannot listen: {err}");
            return ExitCode::FAILURE;
        }
    };
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "mock-upstream listening on {}", mock.url());
        let _ = stdout.flush();
    }
    signals.recv().await;
    mock.shutdown().await;
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT, hooked.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    #[cfg(not(unix))]
    fn new() -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// Waits for the first of them.
    #[cfg(unix)]
    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    #[cfg(not(unix))]
    async fn recv(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The config the arguments ask for, or `None` for `--help`.
fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<MockConfig>, String> {
    let mut config = MockConfig::new();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = match inline.or_else(|| args.next()) {
            Some(value) => value,
            None => return Err(format!("{flag} needs a value")),
        };
        config = match flag.as_str() {
            "--listen" => {
                let addr: SocketAddr = value.parse().map_err(|_| format!("--listen: not an address: {value}"))?;
                config.with_listen(addr)
            }
            "--chunks" => config.with_chunks(value.parse().map_err(|_| format!("--chunks: not a number: {value}"))?),
            "--chunk-delay-ms" => {
                let ms: u64 = value.parse().map_err(|_| format!("--chunk-delay-ms: not a number: {value}"))?;
                config.with_chunk_delay(Duration::from_millis(ms))
            }
            _ => return Err(format!("unknown argument {flag}")),
        };
    }
    Ok(Some(config))
}
