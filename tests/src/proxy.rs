//! A loopback TCP proxy whose connections a test can cut at will: the agent dials the Worker through it
//! (the Worker's `PUBLIC_URL` points here), so a test can break the agent↔object link mid-prompt.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running proxy; stops on drop.
pub struct CutProxy {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    /// Bumped by [`CutProxy::cut`]; every connection ends when it changes.
    generation: watch::Sender<u64>,
    accepted: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listen on a free loopback port; connections wait for [`CutProxy::set_target`].
    pub async fn bind() -> anyhow::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let accepted: Arc<Mutex<u64>> = Arc::default();
        let (generation, _) = watch::channel(0u64);
        let task = tokio::spawn(accept(
            listener,
            Arc::clone(&target),
            generation.clone(),
            Arc::clone(&accepted),
        ));
        Ok(CutProxy {
            addr,
            target,
            generation,
            accepted,
            task,
        })
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where connections go.
    pub fn set_target(&self, target: SocketAddr) {
        if let Ok(mut slot) = self.target.lock() {
            *slot = Some(target);
        }
    }

    /// Drop every open connection (both directions, at once); new connections are still accepted.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.lock().map(|n| *n).unwrap_or(0)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: Arc<Mutex<Option<SocketAddr>>>,
    generation: watch::Sender<u64>,
    accepted: Arc<Mutex<u64>>,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        if let Ok(mut n) = accepted.lock() {
            *n += 1;
        }
        let Some(target) = target.lock().ok().and_then(|t| *t) else {
            continue;
        };
        let mut cut = generation.subscribe();
        connections.spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut in_read, mut in_write) = inbound.into_split();
            let (mut out_read, mut out_write) = outbound.into_split();
            tokio::select! {
                _ = tokio::io::copy(&mut in_read, &mut out_write) => {}
                _ = tokio::io::copy(&mut out_read, &mut in_write) => {}
                _ = cut.changed() => {}
            }
        });
        while connections.try_join_next().is_some() {}
    }
}
