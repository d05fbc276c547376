//! A TCP proxy on loopback between a store and the server, which a test can cut
//! (connections reset, new ones refused) or black-hole (nothing gets through, nothing
//! is closed), to stage an outage without touching the shared server.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Forwards both ways.
    Pass,
    /// Resets every connection and refuses new ones, like a server that is down.
    Cut,
    /// Holds every connection open and forwards nothing, like a dead network path.
    Blackhole,
}

/// The running proxy; dropping it stops it and closes its connections.
pub(crate) struct Proxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free loopback port, forwarding to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("the proxy binds");
        let addr = listener.local_addr().expect("the proxy has an address");
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let accept = tokio::spawn({
            let mode = Arc::clone(&mode);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(serve(client, upstream, mode.subscribe()));
                }
            }
        });
        Self { addr, mode, accept }
    }

    /// The proxy's address.
    pub(crate) const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches what the proxy does, for connections open now and later.
    pub(crate) fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Ends every connection task.
        self.set(Mode::Cut);
    }
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let current = *mode.borrow_and_update();
    match current {
        Mode::Cut => return,
        Mode::Blackhole => {
            // Held until the mode changes, then dropped.
            let _ = mode.changed().await;
            return;
        }
        Mode::Pass => {}
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else { return };
    let changed = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        changed = mode.wait_for(|m| *m != Mode::Pass) => changed.map(|m| *m).ok(),
    };
    if changed == Some(Mode::Blackhole) {
        // Stop forwarding, keep both ends open until the next change.
        let _ = mode.changed().await;
    }
}
