//! `idemgate serve`: the proxy and admin listeners, the sweeper, logs and metrics.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use idemgate::Store;
use idemgate_proxy::{Admin, Proxy, UpstreamClient, serve, serve_admin, serve_on_threads};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use crate::config::{self, Config, ConfigArgs, LogFormat, StoreUrl};

/// Latency buckets in seconds: from a replay (sub-millisecond) to a long generation.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0];

/// How many expired records one sweep statement deletes.
const SWEEP_BATCH: usize = 1000;

pub(crate) fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let config = config::load(&args)?;
    // Held until the process ends: dropping it flushes the log lines still queued.
    let _log = init_logging(config.log_format)?;
    // On `postgres://` this runtime's workers serve the requests; elsewhere they accept,
    // and the connection threads serve.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.get())
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(serve_until_signal(config))
}

/// Logs to stderr through a batching writer thread (see [`crate::logbuf`]), so a
/// request never waits on a `write(2)` of its log line. Should stderr block long
/// enough for the buffer to fill, lines are dropped (and counted) rather than requests
/// slowed.
fn init_logging(format: LogFormat) -> anyhow::Result<crate::logbuf::Guard> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a pipe or a file gets plain `key=value` fields.
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = crate::logbuf::new(std::io::stderr()).context("cannot start the log writer")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        // The per-request line has its own writer (see `logfmt`); on a terminal the
        // stock format colours it instead.
        LogFormat::Text if !ansi => {
            let lines = crate::logfmt::RequestLines::new(tracing_subscriber::fmt::format().with_ansi(false));
            builder.event_format(lines).init();
        }
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    Ok(guard)
}

fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    idemgate::metrics::describe();
    metrics::describe_counter!(idemgate_proxy::UPSTREAM_REQUESTS_TOTAL, "Upstream calls by route and status");
    metrics::describe_histogram!(
        idemgate_proxy::UPSTREAM_SECONDS,
        metrics::Unit::Seconds,
        "Time to the upstream's response head, by route"
    );
    Ok(handle)
}

async fn serve_until_signal(config: Config) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let store = crate::store::open(&config.store).await?;
    let extra_roots = config.upstream_ca.as_ref().map(|(_, certs)| certs.clone()).unwrap_or_default();
    let client = UpstreamClient::trusting(config.timeouts, extra_roots).context("cannot build the upstream client")?;
    let routes = config.routes.iter().map(config::RouteConfig::to_route).collect();
    let proxy = Proxy::new(routes, store.clone(), client).context("invalid route")?;

    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    let listen = listener.local_addr().context("listener address")?;
    let admin = admin_listener.local_addr().context("admin listener address")?;
    tracing::info!(
        listen = %listen,
        admin = %admin,
        store = %config.store,
        routes = config.routes.len(),
        "listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let render = metrics.clone();
    let admin_task = tokio::spawn(serve_admin(
        admin_listener,
        Admin::new(move || render.render(), store.clone()),
        stopped(stop_rx.clone()),
    ));
    let upkeep = tokio::spawn(upkeep(metrics, stopped(stop_rx.clone())));
    let sweeper = tokio::spawn(sweep(store, config.sweep_interval, stopped(stop_rx.clone())));
    let trimmer = tokio::spawn(crate::trim::after_bursts(stopped(stop_rx.clone())));
    // Memory and SQLite answer without tasks of their own, and Redis gives each
    // connection thread connections of its own: their requests run on one thread per
    // core. PostgreSQL's pool drives its connections from tasks on this runtime, so
    // its requests stay on it too.
    let per_core = !matches!(config.store, StoreUrl::Postgres(_));
    let threads = config.threads;
    let mut proxy_task = tokio::spawn(async move {
        if per_core {
            return serve_on_threads(listener, proxy, threads, stopped(stop_rx)).await;
        }
        serve(listener, proxy, stopped(stop_rx)).await;
        Ok(())
    });

    // The proxy ends before the signal only when it could not start.
    let early = tokio::select! {
        () = shutdown_signal() => None,
        ended = &mut proxy_task => Some(ended),
    };
    match &early {
        None => tracing::info!("shutting down: no new connections; waiting for open ones"),
        Some(_) => tracing::error!("the proxy stopped; shutting down"),
    }
    let _ = stop_tx.send(true);
    let ended = match early {
        Some(ended) => ended,
        None => proxy_task.await,
    };
    let _ = tokio::join!(admin_task, upkeep, sweeper, trimmer);
    ended.context("the proxy task panicked")?.context("cannot serve the proxy")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

/// The Prometheus recorder needs its histograms drained now and then.
async fn upkeep(handle: PrometheusHandle, stop: impl std::future::Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = every.tick() => handle.run_upkeep(),
            () = &mut stop => return,
        }
    }
}

/// Deletes expired records in batches, every `interval`.
async fn sweep(store: Arc<dyn Store>, interval: Duration, stop: impl std::future::Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    let mut every = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = &mut stop => return,
        }
        loop {
            match store.sweep(SWEEP_BATCH).await {
                Ok(n) if n == SWEEP_BATCH => continue,
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(deleted = n, "swept expired records");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sweep failed; will retry");
                    break;
                }
            }
        }
    }
}
