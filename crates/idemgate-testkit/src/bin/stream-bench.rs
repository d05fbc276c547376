//! `stream-bench`: the streaming figures of BENCHMARKS.md, measured in one run.
//!
//! ```text
//! stream-bench ttfb   --direct URL --gateway URL [--requests 400] [--interval-ms 25] [--chunks 5] [--chunk-delay-ms 20]
//! stream-bench replay --gateway URL [--chunks 200] [--seconds 5] [--concurrency 16]
//! ```
//!
//! `ttfb` sends the same streamed chat completion, each with a fresh key, to the mock
//! upstream directly and through the gateway, interleaved (one of each every
//! `interval`, open loop), and reports the time to the first body byte of each. `replay`
//! records one stream of `chunks` events, then replays it as fast as `concurrency`
//! clients can read it, checking every replay is byte-identical.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const BODY: &str = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Write the confirmation email"}]}"#;

struct Args(Vec<String>);

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().position(|a| a == name).and_then(|i| self.0.get(i + 1)).map(String::as_str)
    }

    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        self.get(name).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{name} takes a number, not {v:?}")))
    }

    fn url(&self, name: &str) -> Result<String, String> {
        self.get(name).map(|u| u.trim_end_matches('/').to_owned()).ok_or_else(|| format!("{name} URL is required"))
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
        _ => Err("usage: stream-bench ttfb|replay ... (see the source's header)".into()),
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

/// Sends one request; returns the time to the first body byte and the whole body.
async fn first_byte(client: &HttpClient, req: Request<Full<Bytes>>) -> Result<(Duration, Bytes), String> {
    let start = Instant::now();
    let res = client.request(req).await.map_err(|e| format!("request failed: {e}"))?;
    if !res.status().is_success() {
        return Err(format!("answered {}", res.status()));
    }
    let mut body = res.into_body();
    let mut ttfb = None;
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body failed: {e}"))?;
        if let Some(data) = frame.data_ref() {
            ttfb.get_or_insert_with(|| start.elapsed());
            all.extend_from_slice(data);
        }
    }
    Ok((ttfb.unwrap_or_else(|| start.elapsed()), Bytes::from(all)))
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

async fn ttfb(args: &Args) -> Result<String, String> {
    let direct = args.url("--direct")?;
    let gateway = args.url("--gateway")?;
    let n = args.num("--requests", 400)?;
    let interval = Duration::from_millis(args.num("--interval-ms", 25)?);
    let chunks = args.num("--chunks", 5)?;
    let delay = args.num("--chunk-delay-ms", 20)?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let run = u64::from(std::process::id());
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(interval);
    for i in 0..n {
        tick.tick().await;
        for (target, url) in [(0usize, &direct), (1, &gateway)] {
            let req = request(url, &format!("ttfb-{run}-{i}-{target}"), chunks, delay)?;
            let client = client.clone();
            tasks.push(tokio::spawn(async move { (target, first_byte(&client, req).await) }));
        }
    }
    let mut times = [Vec::new(), Vec::new()];
    for t in tasks {
        let (target, res) = t.await.map_err(|e| e.to_string())?;
        times[target].push(res?.0);
    }
    let mut out = format!(
        "time to first byte of a streamed chat completion ({chunks} events, {delay} ms apart), {n} requests each, \
         one every {} ms per target, fresh keys (every request a miss)\n\n\
         | target | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|\n",
        interval.as_millis()
    );
    let mut q = [[Duration::ZERO; 3]; 2];
    for (i, name) in ["direct to the mock", "through idemgate"].iter().enumerate() {
        times[i].sort();
        let t = &times[i];
        q[i] = [quantile(t, 0.5), quantile(t, 0.9), quantile(t, 0.99)];
        out += &format!(
            "| {name} | {} | {} | {} | {} |\n",
            ms(q[i][0]),
            ms(q[i][1]),
            ms(q[i][2]),
            ms(t.last().copied().unwrap_or_default())
        );
    }
    let added = |k: usize| ms(q[1][k].saturating_sub(q[0][k]));
    out += &format!("| added by idemgate | {} | {} | {} | |\n", added(0), added(1), added(2));
    Ok(out)
}

async fn replay(args: &Args) -> Result<String, String> {
    let gateway = args.url("--gateway")?;
    let chunks = args.num("--chunks", 200)?;
    let seconds = args.num("--seconds", 5)?;
    let concurrency = args.num("--concurrency", 16)?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let key = format!("replay-{}-{chunks}", std::process::id());
    let (_, original) = first_byte(&client, request(&gateway, &key, chunks, 0)?).await?;
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, gateway, key, original, done) =
            (client.clone(), gateway.clone(), key.clone(), original.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let (_, body) = first_byte(&client, request(&gateway, &key, chunks, 0)?).await?;
                if body != original {
                    return Err("a replay differed from the original".to_owned());
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, String>(())
        }));
    }
    for w in workers {
        w.await.map_err(|e| e.to_string())??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed) as f64;
    Ok(format!(
        "replay of one recorded {chunks}-event stream ({} bytes), {concurrency} clients for {seconds} s: \
         {:.0} replays/s, {:.1} MB/s, every replay byte-identical\n",
        original.len(),
        n / elapsed,
        n * original.len() as f64 / elapsed / 1e6
    ))
}
