//! A TCP proxy the chaos harness can sever: clients connect to it instead of the server, and
//! the harness cuts their connections whenever it likes, as a network failure would.
//!
//! A cut closes both sides with `SO_LINGER 0`, so the client and the server each see a reset
//! (`ECONNRESET`) rather than an orderly end of stream, and whatever was still buffered in the
//! proxy is dropped. A connection the upstream resets is passed on as a reset; one the upstream
//! refuses (it is restarting) is reset at once.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem_runtime::broker::CancellationToken;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The open connections, by id, each with the token that cuts it.
type Registry = Arc<Mutex<HashMap<u64, CancellationToken>>>;

/// How long a new connection waits for the upstream to accept before it is reset.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP proxy on 127.0.0.1 in front of a server on 127.0.0.1, whose connections can be cut.
///
/// Dropping it stops accepting and cuts every connection still open.
pub(crate) struct Proxy {
    port: u16,
    connections: Registry,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `upstream`
    /// (127.0.0.1:`upstream_port`). An upstream that refuses (restarting) closes the client
    /// connection at once.
    pub(crate) async fn start(upstream_port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let connections = Registry::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream_port,
            Arc::clone(&connections),
        ));
        Ok(Self {
            port,
            connections,
            accept,
        })
    }

    /// The port it listens on (127.0.0.1).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Cuts every connection open through the proxy now, both directions (the client sees its
    /// socket reset; so does the upstream), and returns how many it cut. New connections are
    /// accepted as before.
    pub(crate) fn sever_all(&self) -> usize {
        let cut: Vec<CancellationToken> = self.registry().drain().map(|(_, cut)| cut).collect();
        for token in &cut {
            token.cancel();
        }
        cut.len()
    }

    /// Cuts one open connection chosen at random; false if none was open.
    pub(crate) fn sever_one(&self) -> bool {
        let token = {
            let mut registry = self.registry();
            if registry.is_empty() {
                return false;
            }
            let nth = fastrand::usize(..registry.len());
            let id = registry.keys().nth(nth).copied();
            id.and_then(|id| registry.remove(&id))
        };
        token.inspect(CancellationToken::cancel).is_some()
    }

    /// The registry, locked (a poisoned lock is still usable: it holds only tokens).
    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<u64, CancellationToken>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Proxy {
    /// Stops accepting and cuts every connection still open.
    fn drop(&mut self) {
        self.accept.abort();
        self.sever_all();
    }
}

/// Accepts connections until aborted, each relayed by a task of its own.
async fn accept_loop(listener: TcpListener, upstream_port: u16, connections: Registry) {
    let mut next_id = 0_u64;
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of descriptors, or a connection reset before it was accepted.
                tracing::warn!(%error, "proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let cut = CancellationToken::new();
        connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, cut.clone());
        let registered = Registered {
            connections: Arc::clone(&connections),
            id,
        };
        tokio::spawn(async move {
            let _registered = registered;
            relay(client, upstream_port, cut).await;
        });
    }
}

/// Removes a connection from the registry when its task ends (or is dropped).
struct Registered {
    connections: Registry,
    id: u64,
}

impl Drop for Registered {
    /// Unregisters the connection (a no-op when a sever already did).
    fn drop(&mut self) {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Relays between `client` and the upstream until either side closes, or until `cut`.
async fn relay(mut client: TcpStream, upstream_port: u16, cut: CancellationToken) {
    let _ = client.set_nodelay(true);
    let connecting = tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect((Ipv4Addr::LOCALHOST, upstream_port)),
    );
    let upstream = tokio::select! {
        biased;
        () = cut.cancelled() => None,
        connected = connecting => match connected {
            Ok(Ok(upstream)) => Some(upstream),
            Ok(Err(error)) => {
                tracing::debug!(%error, upstream_port, "proxy: upstream refused");
                None
            }
            Err(_) => {
                tracing::debug!(upstream_port, "proxy: upstream connect timed out");
                None
            }
        },
    };
    let Some(mut upstream) = upstream else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = upstream.set_nodelay(true);
    // The cut first: once severed, not one more byte is relayed, even when both sides have
    // something ready in the same poll.
    let reset = tokio::select! {
        biased;
        () = cut.cancelled() => true,
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => copied.is_err(),
    };
    if reset {
        // Severed, or one side reset or failed: the other sees a reset too.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}
