//! `sweep`: a `SCAN` over this prefix's records that goes on where the last call
//! stopped, with one script per page deciding, on the server's clock, which records
//! are expired and deleting them.
//!
//! Redis deletes every record by itself a margin after its expiry (`PEXPIRE`), so a
//! sweep only removes records sooner; a gateway that never sweeps still stays
//! bounded. One call examines at most one full pass over the keyspace (of each
//! primary, in a cluster), so a call that deletes fewer than its limit has found
//! every record that was expired when its pass began.

use std::time::Duration;

use idemgate::StoreError;
use idemgate::clock::duration_millis;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Value};

use crate::bounded;
use crate::conn::Conn;
use crate::scripts::sweep_source;

/// How many keys one `SCAN` step asks for.
const SCAN_COUNT: usize = 256;

/// Where a sweep pass stands. Kept between calls; a call that fails drops the page it
/// was examining (Redis expires those records anyway).
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    /// The nodes still to scan in this pass, each with its cursor; empty between
    /// passes.
    nodes: Vec<(Node, u64)>,
    /// Records scanned and not yet examined, and the node they were scanned on.
    pending: Vec<String>,
    pending_on: Option<Node>,
}

/// A node to scan: the one server, or a cluster primary.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Single,
    Primary { host: String, port: u16 },
}

/// What a sweep needs from the store.
pub(crate) struct Sweeper<'a> {
    pub(crate) conn: &'a Conn,
    /// The records' `SCAN MATCH` pattern.
    pub(crate) pattern: &'a str,
    /// How long after its lease an in-flight record is kept.
    pub(crate) grace: Duration,
    /// The bound on each step.
    pub(crate) timeout: Duration,
}

impl Sweeper<'_> {
    /// Deletes up to `limit` expired records, going on from `cursor`.
    pub(crate) async fn sweep(&self, cursor: &mut Cursor, limit: usize) -> Result<usize, StoreError> {
        let mut deleted = 0;
        let mut new_pass = false;
        while deleted < limit {
            if !cursor.pending.is_empty() {
                let node = cursor.pending_on.clone().unwrap_or(Node::Single);
                let (n, examined) = self.examine(&node, &cursor.pending, limit - deleted).await?;
                deleted += n;
                // The script examines every key unless it reached the limit.
                cursor.pending.drain(..examined.clamp(1, cursor.pending.len()));
                continue;
            }
            if cursor.nodes.is_empty() {
                if new_pass {
                    break;
                }
                cursor.nodes = self.nodes().await?.into_iter().map(|n| (n, 0)).collect();
                new_pass = true;
            }
            let Some((node, at)) = cursor.nodes.last().cloned() else { break };
            let (next, keys) = self.scan(&node, at).await?;
            match cursor.nodes.last_mut() {
                Some(last) if next != 0 => last.1 = next,
                _ => {
                    cursor.nodes.pop();
                }
            }
            cursor.pending = keys;
            cursor.pending_on = Some(node);
        }
        Ok(deleted)
    }

    async fn query(&self, node: &Node, cmd: Cmd) -> Result<Value, StoreError> {
        let query = async {
            match (self.conn.clone(), node) {
                (Conn::Cluster(mut c), Node::Primary { host, port }) => {
                    let at = SingleNodeRoutingInfo::ByAddress { host: host.clone(), port: *port };
                    // A routed command answers a server error as a value.
                    c.route_command(cmd, RoutingInfo::SingleNode(at)).await.and_then(Value::extract_error)
                }
                (mut conn, _) => cmd.query_async(&mut conn).await,
            }
        };
        bounded("sweep", self.timeout, query).await
    }

    /// The nodes a pass scans: the server, or every cluster primary.
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let Conn::Cluster(mut c) = self.conn.clone() else { return Ok(vec![Node::Single]) };
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let random = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let slots =
            bounded("sweep", self.timeout, async { c.route_command(cmd, random).await?.extract_error() }).await?;
        primaries(slots).ok_or_else(|| StoreError::corrupt("redis answered CLUSTER SLOTS in an unknown shape"))
    }

    async fn scan(&self, node: &Node, at: u64) -> Result<(u64, Vec<String>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at).arg("MATCH").arg(self.pattern).arg("COUNT").arg(SCAN_COUNT).arg("TYPE").arg("hash");
        let page = self.query(node, cmd).await?;
        redis::from_redis_value(page).map_err(|_| StoreError::corrupt("redis answered SCAN in an unknown shape"))
    }

    /// Runs the sweep script on `keys`; answers how many it deleted and examined.
    async fn examine(&self, node: &Node, keys: &[String], limit: usize) -> Result<(usize, usize), StoreError> {
        // The keys go as arguments: declared keys must share one slot, and a page
        // spans the node's slots.
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(sweep_source(matches!(node, Node::Primary { .. }))).arg(0);
        cmd.arg(limit).arg(duration_millis(self.grace)).arg(keys);
        let answer = self.query(node, cmd).await?;
        redis::from_redis_value(answer)
            .map_err(|_| StoreError::corrupt("the sweep script answered in an unknown shape"))
    }
}

/// The primaries in a `CLUSTER SLOTS` answer: `[[start, end, [host, port, ...], replicas...], ...]`.
fn primaries(slots: Value) -> Option<Vec<Node>> {
    let Value::Array(ranges) = slots else { return None };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else { return None };
        let Some(Value::Array(primary)) = range.get(2) else { return None };
        let host = match primary.first()? {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = primary.get(1) else { return None };
        let node = Node::Primary { host, port: u16::try_from(*port).ok()? };
        if !out.contains(&node) {
            out.push(node);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_the_primaries_of_cluster_slots() {
        let range = |start, end, port| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![bulk("127.0.0.1"), Value::Int(port), bulk("id")]),
                Value::Array(vec![bulk("127.0.0.2"), Value::Int(9999), bulk("replica")]),
            ])
        };
        let slots = Value::Array(vec![range(0, 5000, 7001), range(5001, 10000, 7002), range(10001, 16383, 7001)]);
        let at = |port| Node::Primary { host: "127.0.0.1".into(), port };
        assert_eq!(primaries(slots), Some(vec![at(7001), at(7002)]));
        assert_eq!(primaries(Value::Int(1)), None);
    }
}
