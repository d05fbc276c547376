//! `loadgen`: an open-loop, fixed-rate load generator for the fixed-rate rows of
//! BENCHMARKS.md (`bench/run`), free of coordinated omission.
//!
//! ```text
//! loadgen --target NAME=URL [--target NAME=URL ...] [--rate 2000] [--seconds 10] [--warmup-seconds 1]
//!         [--connections 256] [--workload miss|replay] [--threads 1] [--label TEXT] [--no-header]
//! ```
//!
//! Every target gets `rate` requests per second of `POST /v1/chat/completions` (the body
//! and headers of `bench/wrk/side.lua`; `miss`: a fresh `Idempotency-Key` each, `replay`:
//! 100 keys recorded before the run). The start time of every request is fixed in
//! advance: target `k` of `n` sends its `i`-th request at `start + (i + k/n) / rate`, so
//! the targets are interleaved and see the same machine at the same moments. A scheduler
//! thread sleeps until each start time and hands the request to the async runtime;
//! latency is measured from the *scheduled* start to the last body byte. A stall in the
//! server (or in the generator) therefore delays every request scheduled during it and
//! all of that delay is counted: no coordinated omission. Requests run on up to
//! `connections` keep-alive connections per target (a request waiting for a free
//! connection waits on the clock). The first `warmup` seconds are sent but not counted.
//!
//! Output: a markdown table with one row per target (completed, errors, latency p50, p99,
//! p99.9 and max in ms, and the generator's own lag at p99: how late the scheduler
//! handed requests over, which should stay far below the latencies), then one row per
//! target after the first, "added by NAME": the difference of its percentiles to the
//! first target's (normally `direct`). Columns: label, target, completed, errors, p50,
//! p99, p99.9, max, generator lag p99.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Longest a request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The number of keys of the `replay` workload.
const REPLAY_KEYS: u64 = 100;

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).map(String::as_str)
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0.windows(2).filter(|w| w[0] == name).map(|w| w[1].as_str()).collect()
    }

    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        self.get(name).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{name} takes a number, not {v:?}")))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Miss,
    Replay,
}

/// One target: its label, base URL, client and connection limit.
struct Target {
    name: String,
    url: String,
    client: HttpClient,
    connections: Arc<Semaphore>,
}

/// What one request measured.
struct Sample {
    target: usize,
    counted: bool,
    /// From the scheduled start to the last body byte; `None` on an error.
    latency: Option<Duration>,
    /// How late the request started against its schedule.
    lag: Duration,
}

/// The chat completion request of `bench/wrk/side.lua`, for `key`.
fn request(url: &str, key: &str) -> Result<Request<Full<Bytes>>, String> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Write the order confirmation email for order {key}"}}]}}"#
    );
    Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())
}

/// Sends `req` and reads the whole answer; `Ok` only for a 2xx.
async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Result<(), String> {
    let res = client.request(req).await.map_err(|e| e.to_string())?;
    let ok = res.status().is_success();
    let status = res.status();
    res.into_body().collect().await.map_err(|e| e.to_string())?;
    if ok { Ok(()) } else { Err(format!("answered {status}")) }
}

fn main() -> ExitCode {
    match run(&Args(std::env::args().skip(1).collect())) {
        Ok(report) => {
            let _ = std::io::stdout().write_all(report.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<String, String> {
    let rate = args.num("--rate", 2000)?.max(1);
    let seconds = args.num("--seconds", 10)?;
    let warmup = args.num("--warmup-seconds", 1)?;
    let connections = usize::try_from(args.num("--connections", 256)?.max(1)).map_err(|e| e.to_string())?;
    let threads = usize::try_from(args.num("--threads", 1)?.max(1)).map_err(|e| e.to_string())?;
    let workload = match args.get("--workload").unwrap_or("miss") {
        "miss" => Workload::Miss,
        "replay" => Workload::Replay,
        other => return Err(format!("--workload is miss or replay, not {other:?}")),
    };
    let label = args.get("--label").unwrap_or("").to_owned();
    let specs = args.all("--target");
    if specs.is_empty() {
        return Err("at least one --target NAME=URL is required".into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let _guard = runtime.enter();
    let mut targets = Vec::new();
    for spec in specs {
        // The name ends at the `=` before `http`, so it may hold `://` (`idemgate memory://`).
        let i = spec.find("=http").ok_or_else(|| format!("--target takes NAME=URL, not {spec:?}"))?;
        let (name, url) = (&spec[..i], &spec[i + 1..]);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(connections).build(connector);
        targets.push(Target {
            name: name.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            client,
            connections: Arc::new(Semaphore::new(connections)),
        });
    }
    let targets = Arc::new(targets);
    let run_id = format!("{}-{}", std::process::id(), unix_nanos());

    if workload == Workload::Replay {
        // Record the replay keys on every target first.
        runtime.block_on(async {
            for t in targets.iter() {
                for k in 0..REPLAY_KEYS {
                    send(&t.client, request(&t.url, &format!("lg-replay-{run_id}-{k}"))?)
                        .await
                        .map_err(|e| format!("{}: recording the replay keys: {e}", t.name))?;
                }
            }
            Ok::<_, String>(())
        })?;
    }

    let samples = schedule(&runtime, &targets, rate, warmup, seconds, workload, &run_id)?;
    Ok(report(&targets, &samples, rate, seconds, workload, &label, args.0.iter().any(|a| a == "--no-header")))
}

fn unix_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Sends every request at its scheduled time, from a dedicated thread (the runtime's
/// timer has a 1 ms granularity, too coarse for 0.2 ms gaps), and collects the samples.
fn schedule(
    runtime: &tokio::runtime::Runtime,
    targets: &Arc<Vec<Target>>,
    rate: u64,
    warmup: u64,
    seconds: u64,
    workload: Workload,
    run_id: &str,
) -> Result<Vec<Sample>, String> {
    let n = targets.len() as u64;
    let per_target = rate * (warmup + seconds);
    let warm = rate * warmup;
    let handle = runtime.handle().clone();
    let scheduler = {
        let targets = targets.clone();
        let run_id = run_id.to_owned();
        std::thread::spawn(move || -> Result<Vec<JoinHandle<Sample>>, String> {
            let start = Instant::now() + Duration::from_millis(50);
            let mut tasks = Vec::with_capacity(usize::try_from(per_target * n).unwrap_or(0));
            for seq in 0..per_target * n {
                let (i, k) = (seq / n, usize::try_from(seq % n).unwrap_or(0));
                // target k's i-th start: start + (i + k/n) / rate = start + seq / (n × rate)
                let at = start
                    + Duration::from_nanos(
                        u64::try_from(u128::from(seq) * 1_000_000_000 / u128::from(n * rate)).unwrap_or(u64::MAX),
                    );
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let key = match workload {
                    Workload::Miss => format!("lg-miss-{run_id}-{k}-{i}"),
                    Workload::Replay => format!("lg-replay-{run_id}-{}", i % REPLAY_KEYS),
                };
                let target = &targets[k];
                let req = request(&target.url, &key)?;
                let (client, permits) = (target.client.clone(), target.connections.clone());
                let counted = i >= warm;
                tasks.push(handle.spawn(async move {
                    let lag = at.elapsed();
                    let res = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
                        send(&client, req).await
                    })
                    .await;
                    let latency = matches!(res, Ok(Ok(()))).then(|| at.elapsed());
                    Sample { target: k, counted, latency, lag }
                }));
            }
            Ok(tasks)
        })
    };
    let tasks = scheduler.join().map_err(|_| "the scheduler thread panicked".to_owned())??;
    runtime.block_on(async {
        let mut samples = Vec::with_capacity(tasks.len());
        for t in tasks {
            samples.push(t.await.map_err(|e| e.to_string())?);
        }
        Ok(samples)
    })
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

fn report(
    targets: &[Target],
    samples: &[Sample],
    rate: u64,
    seconds: u64,
    workload: Workload,
    label: &str,
    no_header: bool,
) -> String {
    let mut out = String::new();
    if !no_header {
        let w = if workload == Workload::Miss { "miss: a fresh key per request" } else { "replay: 100 recorded keys" };
        out += &format!(
            "Fixed rate ({w}): each target gets the rate for {seconds} s, interleaved with the others, open loop; \
             latency from the scheduled start (no coordinated omission); \"added by\" = the target's percentile \
             minus direct's, from the same run\n\n\
             | rate | target | completed | errors | p50 ms | p99 ms | p99.9 ms | max ms | generator lag p99 ms |\n\
             |---|---|---|---|---|---|---|---|---|\n"
        );
    }
    let label = if label.is_empty() { format!("{rate}/s") } else { label.to_owned() };
    let qs = [0.5, 0.99, 0.999, 1.0];
    let mut table = Vec::new();
    for (k, t) in targets.iter().enumerate() {
        let counted = samples.iter().filter(|s| s.target == k && s.counted);
        let (mut lat, mut lag, mut errors) = (Vec::new(), Vec::new(), 0u64);
        for s in counted {
            lag.push(s.lag);
            match s.latency {
                Some(l) => lat.push(l),
                None => errors += 1,
            }
        }
        lat.sort();
        lag.sort();
        let q: Vec<Duration> = qs.iter().map(|&q| quantile(&lat, q)).collect();
        out += &format!(
            "| {label} | {} | {} | {errors} | {} | {} | {} | {} | {} |\n",
            t.name,
            lat.len(),
            ms(q[0]),
            ms(q[1]),
            ms(q[2]),
            ms(q[3]),
            ms(quantile(&lag, 0.99))
        );
        table.push(q);
    }
    for k in 1..targets.len() {
        let d = |i: usize| format!("{:.3}", (table[k][i].as_secs_f64() - table[0][i].as_secs_f64()) * 1000.0);
        out += &format!(
            "| {label} | added by {} (vs {}) | | | {} | {} | {} | {} | |\n",
            targets[k].name,
            targets[0].name,
            d(0),
            d(1),
            d(2),
            d(3)
        );
    }
    out
}
