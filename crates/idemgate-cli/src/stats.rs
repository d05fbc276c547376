//! `idemgate stats`: reads a running gateway's `/metrics` and summarises it.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Flags of `idemgate stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// The gateway's admin listener
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090", value_name = "ADDR")]
    admin: String,
}

pub(crate) async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let url: http::Uri = format!("http://{}/metrics", args.admin).parse().context("invalid --admin address")?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let res = tokio::time::timeout(std::time::Duration::from_secs(5), client.get(url.clone()))
        .await
        .with_context(|| format!("{url} did not answer within 5s"))?
        .with_context(|| format!("cannot reach {url}; is `idemgate serve` running with this admin address?"))?;
    if !res.status().is_success() {
        bail!("{url} answered {}", res.status());
    }
    let body = res.into_body().collect().await.context("cannot read /metrics")?.to_bytes();
    super::out(&summarise(&String::from_utf8_lossy(&body)))
}

/// Sums each metric by the label of interest, from Prometheus text.
fn summarise(text: &str) -> String {
    let mut outcomes: BTreeMap<String, f64> = BTreeMap::new();
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        if name == "idemgate_requests_total" {
            let outcome = label(labels, "outcome").unwrap_or("?").to_owned();
            *outcomes.entry(outcome).or_default() += value;
        } else {
            *totals.entry(name).or_default() += value;
        }
    }
    let get = |o: &str| outcomes.get(o).copied().unwrap_or(0.0);
    let mut out = String::from("requests by outcome:\n");
    for (outcome, n) in &outcomes {
        out += &format!("  {outcome:<12} {n}\n");
    }
    let served = get("replayed") + get("joined");
    let hits = served + get("executed");
    if hits > 0.0 {
        out += &format!("hit rate:     {:.1}% (replayed + joined over those plus executed)\n", 100.0 * served / hits);
    }
    for (name, title) in [
        ("idemgate_duplicates_total", "duplicates"),
        ("idemgate_upstream_requests_total", "upstream calls"),
        ("idemgate_lease_takeovers_total", "lease takeovers"),
        ("idemgate_inflight", "in flight"),
    ] {
        if let Some(v) = totals.get(name) {
            out += &format!("{title:<13} {v}\n");
        }
    }
    out
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix("=\"")?.split('"').next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_outcomes_and_hit_rate() {
        let text = "# TYPE idemgate_requests_total counter\n\
            idemgate_requests_total{route=\"a\",outcome=\"executed\"} 2\n\
            idemgate_requests_total{route=\"b\",outcome=\"executed\"} 2\n\
            idemgate_requests_total{route=\"a\",outcome=\"replayed\"} 4\n\
            idemgate_duplicates_total 4\n";
        let s = summarise(text);
        assert!(s.contains("executed     4"), "{s}");
        assert!(s.contains("hit rate:     50.0%"), "{s}");
        assert!(s.contains("duplicates    4"), "{s}");
    }
}
