//! `stream-bench`: the streaming figures of BENCHMARKS.md, measured in one run.
//!
//! ```text
//! stream-bench ttfb   --direct URL --gateway [NAME=]URL ... [--requests 400] [--interval-ms 25]
//!                     [--chunks 5] [--chunk-delay-ms 20]
//! stream-bench replay --gateway [NAME=]URL ... [--direct URL] [--chunks 200] [--seconds 5] [--concurrency 16]
//! stream-bench hold   --gateway URL --pid PID [--streams 1000] [--chunks 20] [--chunk-delay-ms 100]
//!                     [--idle-seconds 1] [--settle-seconds 3] [--label TEXT] [--no-header]
//! ```
//!
//! `--gateway` may be given more than once; `NAME=` labels its rows (default "through
//! idemgate"). Every subcommand prints a markdown table on stdout.
//!
//! - `ttfb` (an SSE miss) sends the same streamed chat completion, each with a fresh key,
//!   to the mock upstream directly and to every gateway, interleaved (one to each target
//!   every `interval`, open loop), and reports the time to the first body byte (TTFB)
//!   and to the last (TTLB) of each, plus the difference of each gateway's percentiles
//!   to the direct ones ("added by").
//!   Columns: target, TTFB p50/p90/p99/max, TTLB p50/p99, errors (in ms).
//! - `replay` (an SSE replay) records one stream of `chunks` events on each gateway, then
//!   replays it as fast as `concurrency` clients can read it for `seconds`, checking every
//!   replay is byte-identical; with `--direct`, the mock generating the same stream
//!   without pauses is measured the same way first, as the reference.
//!   Columns: target, streams/s, MB/s, TTFB p50/p99, TTLB p50/p99, ratio to direct, errors.
//! - `hold` (the memory row) samples the resident set (`VmRSS` of `/proc/PID/status`,
//!   every 100 ms) of the gateway process `PID`: idle, while `streams` slow streamed
//!   requests (each with a fresh key, all started at once, each on its own connection)
//!   are open, and `settle` seconds after they all ended.
//!   Columns: label, streams, peak open, ok, RSS idle/peak/after MB, VmHWM MB, wall s.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Write the confirmation email"}]}"#;

/// The SSE terminator of an OpenAI chat stream: a stream that lacks it was cut.
const DONE: &[u8] = b"data: [DONE]";

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).map(String::as_str)
    }

    /// Every value given to a repeatable option.
    fn all(&self, name: &str) -> Vec<&str> {
        self.0.windows(2).filter(|w| w[0] == name).map(|w| w[1].as_str()).collect()
    }

    fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        self.get(name).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{name} takes a number, not {v:?}")))
    }

    fn url(&self, name: &str) -> Result<String, String> {
        self.get(name).map(|u| u.trim_end_matches('/').to_owned()).ok_or_else(|| format!("{name} URL is required"))
    }

    /// The `--gateway [NAME=]URL` targets, at least one.
    fn gateways(&self) -> Result<Vec<Target>, String> {
        let targets: Vec<Target> = self.all("--gateway").into_iter().map(Target::parse).collect();
        if targets.is_empty() { Err("--gateway URL is required".into()) } else { Ok(targets) }
    }
}

/// A labelled base URL.
#[derive(Clone)]
struct Target {
    name: String,
    url: String,
}

impl Target {
    /// `NAME=URL` or a bare `URL` (named "through idemgate"). The name ends at the `=`
    /// before `http`, so it may itself hold `=` or `://` (`idemgate memory://`).
    fn parse(spec: &str) -> Self {
        match spec.find("=http") {
            Some(i) => Self { name: spec[..i].to_owned(), url: spec[i + 1..].trim_end_matches('/').to_owned() },
            None => Self { name: "through idemgate".to_owned(), url: spec.trim_end_matches('/').to_owned() },
        }
    }
}

fn main() -> ExitCode {
    let args = Args(std::env::args().skip(1).collect());
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    let res = match args.0.first().map(String::as_str) {
        Some("ttfb") => runtime.block_on(ttfb(&args)),
        Some("replay") => runtime.block_on(replay(&args)),
        Some("hold") => runtime.block_on(hold(&args)),
        _ => Err("usage: stream-bench ttfb|replay|hold ... (see the source's header)".into()),
    };
    match res {
        Ok(report) => {
            let _ = std::io::stdout().write_all(report.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "stream-bench: {message}");
    ExitCode::FAILURE
}

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

fn request(url: &str, key: &str, chunks: u64, delay_ms: u64) -> Result<Request<Full<Bytes>>, String> {
    Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .header("idempotency-key", key)
        .header("x-mock-chunks", chunks.to_string())
        .header("x-mock-chunk-delay-ms", delay_ms.to_string())
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .map_err(|e| e.to_string())
}

/// One streamed response: the time to its first and to its last body byte, and the body.
struct Streamed {
    ttfb: Duration,
    ttlb: Duration,
    body: Bytes,
}

/// Sends one request and reads the whole body. `opened` is called once, at the first
/// body byte (the `hold` subcommand counts open streams with it).
async fn stream(client: &HttpClient, req: Request<Full<Bytes>>, opened: impl FnOnce()) -> Result<Streamed, String> {
    let start = Instant::now();
    let res = client.request(req).await.map_err(|e| format!("request failed: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("answered {}", res.status()));
    }
    let mut body = res.into_body();
    let mut ttfb = None;
    let mut opened = Some(opened);
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body failed: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if ttfb.is_none() {
                ttfb = Some(start.elapsed());
                if let Some(f) = opened.take() {
                    f();
                }
            }
            all.extend_from_slice(data);
        }
    }
    let ttlb = start.elapsed();
    Ok(Streamed { ttfb: ttfb.unwrap_or(ttlb), ttlb, body: Bytes::from(all) })
}

/// Nearest-rank quantile of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// `a - b` in milliseconds, signed: a gateway can come out ahead of direct by noise.
fn diff_ms(a: Duration, b: Duration) -> String {
    format!("{:.3}", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
}

/// Time samples of one target, sorted once all are in.
#[derive(Default)]
struct Samples {
    ttfb: Vec<Duration>,
    ttlb: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Samples {
    fn push(&mut self, res: Result<Streamed, String>) {
        match res {
            Ok(s) => {
                self.ttfb.push(s.ttfb);
                self.ttlb.push(s.ttlb);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn sort(&mut self) {
        self.ttfb.sort();
        self.ttlb.sort();
    }
}

/// Reports the first error of any target on stderr, so a failing row is explained.
fn report_errors(names: &[String], samples: &[Samples]) {
    for (name, s) in names.iter().zip(samples) {
        if let Some(e) = &s.first_error {
            let _ = writeln!(std::io::stderr(), "stream-bench: {name}: {} errors, the first: {e}", s.errors);
        }
    }
}

async fn ttfb(args: &Args) -> Result<String, String> {
    let mut targets = vec![Target { name: "direct to the mock".into(), url: args.url("--direct")? }];
    targets.extend(args.gateways()?);
    let n = args.num("--requests", 400)?;
    let interval = Duration::from_millis(args.num("--interval-ms", 25)?.max(1));
    let chunks = args.num("--chunks", 5)?;
    let delay = args.num("--chunk-delay-ms", 20)?;
    let client = client();
    let run = u64::from(std::process::id());
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(interval);
    for i in 0..n {
        tick.tick().await;
        for (t, target) in targets.iter().enumerate() {
            let req = request(&target.url, &format!("ttfb-{run}-{i}-{t}"), chunks, delay)?;
            let client = client.clone();
            tasks.push(tokio::spawn(async move { (t, stream(&client, req, || ()).await) }));
        }
    }
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    for task in tasks {
        let (t, res) = task.await.map_err(|e| e.to_string())?;
        samples[t].push(res);
    }
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    report_errors(&names, &samples);
    let mut out = format!(
        "SSE miss: a streamed chat completion ({chunks} events, {delay} ms apart), {n} requests to each target, \
         one every {} ms per target, interleaved, fresh keys (every request through a gateway a miss)\n\n\
         | target | TTFB p50 ms | TTFB p90 ms | TTFB p99 ms | TTFB max ms | TTLB p50 ms | TTLB p99 ms | errors |\n\
         |---|---|---|---|---|---|---|---|\n",
        interval.as_millis()
    );
    let qs = [0.5, 0.9, 0.99, 1.0];
    let mut first = Vec::new();
    let mut last = Vec::new();
    for (name, s) in names.iter().zip(samples.iter_mut()) {
        s.sort();
        let f: Vec<Duration> = qs.iter().map(|&q| quantile(&s.ttfb, q)).collect();
        let l = [quantile(&s.ttlb, 0.5), quantile(&s.ttlb, 0.99)];
        out += &format!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |\n",
            ms(f[0]),
            ms(f[1]),
            ms(f[2]),
            ms(f[3]),
            ms(l[0]),
            ms(l[1]),
            s.errors
        );
        first.push(f);
        last.push(l);
    }
    for i in 1..names.len() {
        let d = |k: usize| diff_ms(first[i][k], first[0][k]);
        let e = |k: usize| diff_ms(last[i][k], last[0][k]);
        let name = names[i].trim_start_matches("through ");
        out += &format!("| added by {name} | {} | {} | {} | | {} | {} | |\n", d(0), d(1), d(2), e(0), e(1));
    }
    Ok(out)
}

/// One closed-loop replay measurement: `concurrency` clients read the stream `key`
/// (recorded as `original` when given) from `url` until `deadline`.
async fn replay_loop(
    client: &HttpClient,
    url: &str,
    key: Option<&str>,
    original: Option<Bytes>,
    chunks: u64,
    concurrency: u64,
    seconds: u64,
) -> Result<(Samples, u64, f64), String> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let bytes = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, url, key, original, bytes) =
            (client.clone(), url.to_owned(), key.map(str::to_owned), original.clone(), bytes.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut i = 0u64;
            while Instant::now() < deadline {
                // Direct: a fresh key each time (the mock ignores it); a gateway: the recorded key.
                let k = key.clone().unwrap_or_else(|| format!("direct-{}-{w}-{i}", std::process::id()));
                i += 1;
                let res = match request(&url, &k, chunks, 0) {
                    Ok(req) => stream(&client, req, || ()).await,
                    Err(e) => Err(e),
                };
                let res = res.and_then(|s| match &original {
                    Some(o) if s.body != *o => Err("a replay differed from the original".to_owned()),
                    _ => Ok(s),
                });
                if let Ok(s) = &res {
                    bytes.fetch_add(s.body.len() as u64, Ordering::Relaxed);
                }
                samples.push(res);
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for w in workers {
        let s = w.await.map_err(|e| e.to_string())?;
        all.ttfb.extend(s.ttfb);
        all.ttlb.extend(s.ttlb);
        all.errors += s.errors;
        if all.first_error.is_none() {
            all.first_error = s.first_error;
        }
    }
    all.sort();
    Ok((all, bytes.load(Ordering::Relaxed), start.elapsed().as_secs_f64()))
}

async fn replay(args: &Args) -> Result<String, String> {
    let gateways = args.gateways()?;
    let direct = args.get("--direct").map(|u| u.trim_end_matches('/').to_owned());
    let chunks = args.num("--chunks", 200)?;
    let seconds = args.num("--seconds", 5)?;
    let concurrency = args.num("--concurrency", 16)?.max(1);
    let client = client();
    let mut rows = Vec::new();
    let mut names = Vec::new();
    let mut all_samples = Vec::new();
    let mut size = 0;
    if let Some(url) = &direct {
        let (s, bytes, elapsed) = replay_loop(&client, url, None, None, chunks, concurrency, seconds).await?;
        rows.push(("direct to the mock (generated, no pauses)".to_owned(), s.ttfb.len(), bytes, elapsed));
        names.push("direct".to_owned());
        all_samples.push(s);
    }
    for (g, gateway) in gateways.iter().enumerate() {
        let key = format!("replay-{}-{chunks}-{g}", std::process::id());
        let original = stream(&client, request(&gateway.url, &key, chunks, 0)?, || ()).await?.body;
        size = original.len();
        let (s, bytes, elapsed) =
            replay_loop(&client, &gateway.url, Some(&key), Some(original), chunks, concurrency, seconds).await?;
        rows.push((gateway.name.clone(), s.ttfb.len(), bytes, elapsed));
        names.push(gateway.name.clone());
        all_samples.push(s);
    }
    report_errors(&names, &all_samples);
    let mut out = format!(
        "SSE replay: one recorded {chunks}-event stream ({size} bytes), {concurrency} clients for {seconds} s per \
         target, one target after the other; every replay checked byte-identical to the original\n\n\
         | target | streams/s | MB/s | TTFB p50 ms | TTFB p99 ms | TTLB p50 ms | TTLB p99 ms | vs direct | errors |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    let reference = direct.as_ref().map(|_| rows[0].1 as f64 / rows[0].3);
    for ((name, n, bytes, elapsed), s) in rows.iter().zip(&all_samples) {
        let rate = *n as f64 / elapsed;
        let ratio = reference.map_or_else(String::new, |r| format!("{:.2}", rate / r));
        out += &format!(
            "| {name} | {rate:.0} | {:.1} | {} | {} | {} | {} | {ratio} | {} |\n",
            *bytes as f64 / elapsed / 1e6,
            ms(quantile(&s.ttfb, 0.5)),
            ms(quantile(&s.ttfb, 0.99)),
            ms(quantile(&s.ttlb, 0.5)),
            ms(quantile(&s.ttlb, 0.99)),
            s.errors
        );
    }
    Ok(out)
}

/// `VmRSS` and `VmHWM` of a process, in kB.
fn memory_kb(pid: u32) -> Result<(u64, u64), String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("cannot read /proc/{pid}: {e}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

async fn hold(args: &Args) -> Result<String, String> {
    let gateway = args.url("--gateway")?;
    let pid = u32::try_from(args.num("--pid", 0)?).map_err(|_| "--pid is out of range")?;
    if pid == 0 {
        return Err("--pid PID (the gateway process to watch) is required".into());
    }
    let streams = args.num("--streams", 1000)?;
    let chunks = args.num("--chunks", 20)?;
    let delay = args.num("--chunk-delay-ms", 100)?;
    let idle_for = Duration::from_secs(args.num("--idle-seconds", 1)?);
    let settle = Duration::from_secs(args.num("--settle-seconds", 3)?);
    let label = args.get("--label").unwrap_or("idemgate");

    // Idle: the largest sample over `idle_for`, before any stream.
    let mut idle = memory_kb(pid)?.0;
    let idle_until = Instant::now() + idle_for;
    while Instant::now() < idle_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        idle = idle.max(memory_kb(pid)?.0);
    }

    // Sample every 100 ms while the streams run; stop when told.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                every.tick().await;
                if let Ok((rss, _)) = memory_kb(pid) {
                    peak = peak.max(rss);
                }
            }
            peak
        })
    };

    let client = client();
    let open = Arc::new(AtomicUsize::new(0));
    let peak_open = Arc::new(AtomicUsize::new(0));
    // Long enough for every stream, with room for a slow start of 1,000 connections.
    let limit = Duration::from_millis(chunks * delay) + Duration::from_secs(30);
    let started = Instant::now();
    let run = std::process::id();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let req = request(&gateway, &format!("hold-{run}-{i}"), chunks, delay)?;
        let (client, open, peak_open) = (client.clone(), open.clone(), peak_open.clone());
        tasks.push(tokio::spawn(async move {
            let was_open = AtomicBool::new(false);
            let opened = || {
                was_open.store(true, Ordering::Relaxed);
                let now = open.fetch_add(1, Ordering::Relaxed) + 1;
                peak_open.fetch_max(now, Ordering::Relaxed);
            };
            let res = tokio::time::timeout(limit, stream(&client, req, opened)).await;
            let res = match res {
                Ok(Ok(s)) if s.body.windows(DONE.len()).any(|w| w == DONE) => Ok(()),
                Ok(Ok(_)) => Err("a stream ended without its terminator".to_owned()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("a stream took longer than {limit:?}")),
            };
            if was_open.load(Ordering::Relaxed) {
                open.fetch_sub(1, Ordering::Relaxed);
            }
            res
        }));
    }
    let mut ok = 0u64;
    let mut first_error = None;
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok(()) => ok += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let wall = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.map_err(|e| e.to_string())?;
    if let Some(e) = first_error {
        let _ = writeln!(std::io::stderr(), "stream-bench hold: {} streams failed, the first: {e}", streams - ok);
    }

    // After: the last sample once the clients have hung up (their idle keep-alive
    // connections closed, as a client's pool does) and the process had `settle` to
    // give memory back.
    drop(client);
    tokio::time::sleep(settle).await;
    let (after, hwm) = memory_kb(pid)?;

    let mut out = String::new();
    if !args.flag("--no-header") {
        out += &format!(
            "Memory: {streams} concurrent streamed requests ({chunks} events, {delay} ms apart, fresh keys, all \
             started at once); RSS sampled every 100 ms, \"after\" {} s after the last stream ended and the client \
             closed its connections\n\n\
             | gateway | streams | peak open | ok | RSS idle MB | RSS peak MB | RSS after MB | VmHWM MB | wall s |\n\
             |---|---|---|---|---|---|---|---|---|\n",
            settle.as_secs()
        );
    }
    out += &format!(
        "| {label} | {streams} | {} | {ok} | {} | {} | {} | {} | {:.1} |\n",
        peak_open.load(Ordering::Relaxed),
        mb(idle),
        mb(peak.max(idle)),
        mb(after),
        mb(hwm),
        wall.as_secs_f64()
    );
    Ok(out)
}
