//! Connections: one for commands, one for the wake-up subscriptions, each to a single
//! server or to a cluster, each reconnecting by itself.

use std::time::Duration;

use redis::aio::{AsyncPushSender, ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::target::{Nodes, Target};

/// How a reconnecting connection backs off: a short first pause, and few attempts
/// per operation, so that an operation during an outage fails within the timeout and
/// the next one tries again.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);
const RECONNECT_RETRIES: usize = 1;
const CLUSTER_RETRIES: u32 = 3;

/// The command connection: pipelined and cloneable, never given a blocking command.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub(crate) async fn connect(target: &Target, timeout: Duration) -> RedisResult<Self> {
        match &target.nodes {
            Nodes::Single(url) => {
                let client = client(url.as_str(), target)?;
                Ok(Self::Single(ConnectionManager::new_with_config(client, manager_config(timeout)).await?))
            }
            Nodes::Cluster(nodes) => {
                let client = cluster_builder(nodes, target, timeout).build()?;
                Ok(Self::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The subscription connection: RESP3, its pushes (messages, disconnections) handed
/// to `push`, its subscriptions restored after a reconnection.
#[derive(Clone)]
pub(crate) enum SubConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl SubConn {
    pub(crate) async fn connect(target: &Target, timeout: Duration, push: impl AsyncPushSender) -> RedisResult<Self> {
        match &target.nodes {
            Nodes::Single(url) => {
                let info = url.as_str().into_connection_info()?;
                let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let client = client(info.set_redis_settings(settings), target)?;
                let config = manager_config(timeout).set_push_sender(push).set_automatic_resubscription();
                Ok(Self::Single(ConnectionManager::new_with_config(client, config).await?))
            }
            Nodes::Cluster(nodes) => {
                let client = cluster_builder(nodes, target, timeout)
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(push)
                    .build()?;
                Ok(Self::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Subscribes to one channel: plain pub/sub on one server (Redis 6 has it),
    /// sharded pub/sub in a cluster, so that a message goes to the channel's shard
    /// only.
    pub(crate) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(c) => c.subscribe(channel).await,
            Self::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    pub(crate) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Self::Single(c) => c.unsubscribe(channel).await,
            Self::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// Checks the connection, which makes it reconnect (and resubscribe) if it was
    /// lost while idle.
    pub(crate) async fn ping(&mut self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Self::Single(c) => ping.exec_async(c).await,
            Self::Cluster(c) => ping.exec_async(c).await,
        }
    }
}

/// The publish command the scripts use, matching [`SubConn::subscribe`].
pub(crate) const fn publish_command(target: &Target) -> &'static str {
    match target.nodes {
        Nodes::Single(_) => "PUBLISH",
        Nodes::Cluster(_) => "SPUBLISH",
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_number_of_retries(RECONNECT_RETRIES)
}

/// The certificates a TLS connection trusts instead of the Mozilla roots, if any.
fn certificates(target: &Target) -> Option<TlsCertificates> {
    let pem = target.root_cert.as_ref()?;
    Some(TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) })
}

fn client(info: impl IntoConnectionInfo, target: &Target) -> RedisResult<Client> {
    match certificates(target) {
        Some(certs) => Client::build_with_tls(info, certs),
        None => Client::open(info),
    }
}

fn cluster_builder(nodes: &[String], target: &Target, timeout: Duration) -> ClusterClientBuilder {
    let builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(CLUSTER_RETRIES);
    match certificates(target) {
        Some(certs) => builder.certs(certs),
        None => builder,
    }
}
