//! `idemgate`: the gateway binary and its operator commands.

mod config;
mod logbuf;
mod logfmt;
mod serve;
mod stats;
mod store;
mod trim;

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use idemgate::{Key, RecordState, Scope, StorageKey, Timestamp};

use crate::config::ConfigArgs;

#[derive(Debug, Parser)]
#[command(name = "idemgate", version, about = "Idempotency keys for LLM API calls: each keyed call runs once")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway
    Serve(#[command(flatten)] ConfigArgs),
    /// Print a fresh key (UUIDv7), or a derived one with --user and --operation
    Keygen(KeygenArgs),
    /// Show the record of a key
    Inspect(KeyArgs),
    /// Delete the record of a key (a running owner loses its lease)
    Purge(KeyArgs),
    /// Summarise a running gateway's counters (from its admin listener)
    Stats(stats::StatsArgs),
    /// Check the configuration and print what it resolves to
    CheckConfig(#[command(flatten)] ConfigArgs),
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// The user part of a derived key
    #[arg(long, requires = "operation")]
    user: Option<String>,
    /// The operation part of a derived key
    #[arg(long, requires = "user")]
    operation: Option<String>,
    /// The time the key is for, RFC 3339 (default: now)
    #[arg(long, requires = "user", value_name = "TIME")]
    at: Option<String>,
    /// The time bucket: the same user and operation within one bucket give one key
    #[arg(long, default_value = "1m", value_name = "DURATION")]
    bucket: String,
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// The client's Idempotency-Key (omit with --storage-key)
    #[arg(required_unless_present = "storage_key")]
    key: Option<String>,
    /// The caller's credential as sent, e.g. "Bearer sk-..." (default: a caller with none)
    #[arg(long, value_name = "CREDENTIAL", hide_env_values = true)]
    tenant: Option<String>,
    /// The header the credential is sent in
    #[arg(long, default_value = "authorization", value_name = "HEADER")]
    tenant_header: String,
    /// The route the key was used on
    #[arg(long, default_value = "default")]
    route: String,
    /// Address the record directly by its storage key (hex), as logs show it
    #[arg(long, conflicts_with_all = ["key", "tenant"], value_name = "HEX")]
    storage_key: Option<String>,
    /// Print the stored body to stdout
    #[arg(long)]
    body: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Keygen(args) => keygen(args),
        Command::Inspect(args) => runtime().and_then(|rt| rt.block_on(inspect(args))),
        Command::Purge(args) => runtime().and_then(|rt| rt.block_on(purge(args))),
        Command::Stats(args) => runtime().and_then(|rt| rt.block_on(stats::run(args))),
        Command::CheckConfig(args) => check_config(args),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")
}

fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).context("cannot write to stdout")
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let key = match (&args.user, &args.operation) {
        (Some(user), Some(op)) => {
            let at = match &args.at {
                Some(t) => humantime::parse_rfc3339_weak(t).with_context(|| format!("invalid --at {t:?}"))?,
                None => SystemTime::now(),
            };
            let bucket = humantime::parse_duration(&args.bucket)
                .with_context(|| format!("invalid --bucket {:?}", args.bucket))?;
            if bucket < Duration::from_secs(1) {
                bail!("invalid --bucket: must be at least 1s");
            }
            Key::derive(&[user.as_bytes(), op.as_bytes()], at, bucket)
        }
        _ => Key::generate(),
    };
    out(&format!("{}\n", key.as_str()))
}

/// The storage key a command addresses, and the config it came from.
fn storage_key(args: &KeyArgs, scope: &Scope) -> anyhow::Result<StorageKey> {
    if let Some(hex) = &args.storage_key {
        return StorageKey::from_hex(hex).context("--storage-key must be 64 hex digits");
    }
    let key = args.key.as_deref().unwrap_or_default();
    let key = Key::parse(key.as_bytes()).context("invalid key")?;
    let tenant = match &args.tenant {
        Some(credential) => scope.tenant_of(args.tenant_header.to_ascii_lowercase().as_bytes(), credential.as_bytes()),
        None => scope.tenant_of(b"", b""),
    };
    Ok(Scope::storage_key(&tenant, &args.route, &key))
}

fn time(t: Timestamp) -> String {
    humantime::format_rfc3339_millis(t.to_system_time()).to_string()
}

async fn inspect(args: KeyArgs) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let skey = storage_key(&args, &config.scope)?;
    let store = store::open(&config.store).await?;
    let Some(record) = store.get(&skey).await.context("cannot read the record")? else {
        bail!("no record for storage key {skey} (check --tenant, --tenant-header and --route)");
    };
    let mut text = format!(
        "storage key: {skey}\nfingerprint: {}\ncreated:     {}\n",
        record.fingerprint.to_hex(),
        time(record.created_at)
    );
    let now = Timestamp::from_system_time(SystemTime::now());
    let mut body = None;
    match record.state {
        RecordState::InFlight { token, lease_until } => {
            let live = if lease_until > now { "alive" } else { "expired: the next claim takes over" };
            text += &format!(
                "state:       in_flight\ntoken:       {}\nlease until: {} ({live})\n",
                token.to_text(),
                time(lease_until)
            );
        }
        RecordState::Completed { response, expires_at } => {
            let live = if expires_at > now { "served" } else { "expired: treated as absent" };
            text += &format!(
                "state:       completed\ncompleted:   {}\nexpires:     {} ({live})\nstatus:      {}\n",
                time(response.completed_at),
                time(expires_at),
                response.status
            );
            for (name, value) in &response.headers {
                text += &format!("header:      {name}: {}\n", String::from_utf8_lossy(value.as_bytes()));
            }
            text += &format!("body:        {} bytes in {} chunks\n", response.body_len(), response.chunks.len());
            body = Some(response.body());
        }
    }
    match (args.body, body) {
        (true, Some(b)) => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&b).and_then(|()| stdout.flush()).context("cannot write to stdout")
        }
        (true, None) => bail!("the record is in flight: there is no body yet"),
        (false, _) => out(&text),
    }
}

async fn purge(args: KeyArgs) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let skey = storage_key(&args, &config.scope)?;
    let store = store::open(&config.store).await?;
    if store.purge(&skey).await.context("cannot purge the record")? {
        out(&format!("purged {skey}\n"))
    } else {
        bail!("no record for storage key {skey} (check --tenant, --tenant-header and --route)")
    }
}

fn check_config(args: ConfigArgs) -> anyhow::Result<()> {
    let c = config::load(&args)?;
    let mut text = format!(
        "ok\nlisten:       {}\nadmin-listen: {}\nstore:        {}\nthreads:      {}\n",
        c.listen, c.admin_listen, c.store, c.threads
    );
    if let Some((path, certs)) = &c.upstream_ca {
        let n = certs.len();
        let plural = if n == 1 { "" } else { "s" };
        text += &format!("upstream-ca:  {} ({n} certificate{plural}, beside the public roots)\n", path.display());
    }
    for r in &c.routes {
        text += &format!(
            "route {:?}: {} -> {}{} (ttl {})\n",
            r.name,
            r.prefix,
            r.upstream,
            if r.strip_prefix { ", prefix stripped" } else { "" },
            humantime::format_duration(r.policy.ttl())
        );
    }
    out(&text)
}
