//! The store server: a tokio runtime on its own thread, serving many clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::proto::{frame, Request, Response, MAX_FRAME};
use crate::error::{Error, Result};

/// How long a new connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Notify,
}

impl State {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A poisoned map only means a handler panicked mid-update of a plain HashMap; the data is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running key-value store; stops when dropped.
///
/// Binds exactly the address it is given (use `127.0.0.1:0` for a private ephemeral port).
/// Connections must start with a hello carrying the job token; strangers, wrong tokens and malformed
/// frames get their connection closed while the server keeps serving everyone else.
///
/// ```
/// use bellows_dist::store::{StoreClient, StoreServer};
/// use std::time::Duration;
/// let server = StoreServer::bind("127.0.0.1:0", "secret").unwrap();
/// let mut c = StoreClient::connect(&server.local_addr().to_string(), "secret", Duration::from_secs(5)).unwrap();
/// c.set("k", b"v").unwrap();
/// assert_eq!(c.get("k", Duration::from_secs(1)).unwrap(), b"v");
/// ```
pub struct StoreServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Binds `addr` (`host:port`) and starts serving on a background thread.
    ///
    /// # Errors
    /// [`Error::Io`] if the address cannot be bound.
    pub fn bind(addr: &str, token: &str) -> Result<StoreServer> {
        let io = |what, source| Error::Io {
            what,
            addr: addr.to_string(),
            source,
        };
        let std_listener = std::net::TcpListener::bind(addr).map_err(|e| io("bind store on", e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| io("configure store socket", e))?;
        let local = std_listener
            .local_addr()
            .map_err(|e| io("read address of store", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io("start store runtime for", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = token.as_bytes().to_vec();
        let thread = std::thread::Builder::new()
            .name(format!("bellows-store-{}", local.port()))
            .spawn(move || runtime.block_on(serve(std_listener, token, rx)))
            .map_err(|e| io("spawn store thread for", e))?;
        Ok(StoreServer {
            addr: local,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The address actually bound (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    token: Vec<u8>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        return;
    };
    let state = Arc::new(State::default());
    let token: Arc<[u8]> = token.into();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    let _ = stream.set_nodelay(true);
                    tasks.spawn(handle(stream, state.clone(), token.clone()));
                }
                // Reap finished connections so the set does not grow without bound.
                while tasks.try_join_next().is_some() {}
            }
        }
    }
    tasks.abort_all();
}

async fn read_frame(s: &mut TcpStream) -> std::result::Result<Vec<u8>, String> {
    let len = s.read_u32_le().await.map_err(|e| e.to_string())? as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "frame of {len} bytes exceeds the limit of {MAX_FRAME}"
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf)
}

async fn reply(s: &mut TcpStream, r: &Response) -> bool {
    s.write_all(&frame(&r.encode())).await.is_ok()
}

async fn handle(mut s: TcpStream, state: Arc<State>, token: Arc<[u8]>) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut s)).await {
        Ok(Ok(p)) => Request::decode(&p),
        _ => return,
    };
    match hello {
        Some(Request::Hello { token: t }) if *t == *token => {
            if !reply(&mut s, &Response::Ok).await {
                return;
            }
        }
        Some(Request::Hello { .. }) => {
            reply(&mut s, &Response::Err("wrong job token".into())).await;
            return;
        }
        _ => {
            reply(
                &mut s,
                &Response::Err("expected a bellows store hello".into()),
            )
            .await;
            return;
        }
    }
    loop {
        let payload = match read_frame(&mut s).await {
            Ok(p) => p,
            Err(e) => {
                reply(&mut s, &Response::Err(e)).await;
                return;
            }
        };
        let Some(req) = Request::decode(&payload) else {
            reply(&mut s, &Response::Err("malformed request".into())).await;
            return;
        };
        let resp = execute(&state, req).await;
        if !reply(&mut s, &resp).await {
            return;
        }
    }
}

async fn execute(state: &State, req: Request) -> Response {
    match req {
        Request::Hello { .. } => Response::Err("duplicate hello".into()),
        Request::Set { key, value } => {
            state.lock().insert(key, value);
            state.changed.notify_waiters();
            Response::Ok
        }
        Request::Add { key, delta } => {
            let mut map = state.lock();
            let current = match map.get(&key) {
                None => 0,
                Some(v) => match std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(n) => n,
                    None => return Response::Err(format!("key {key:?} does not hold an integer")),
                },
            };
            let new = current.wrapping_add(delta);
            map.insert(key, new.to_string().into_bytes());
            drop(map);
            state.changed.notify_waiters();
            Response::Int(new)
        }
        Request::Check { keys } => {
            let map = state.lock();
            Response::Bool(keys.iter().all(|k| map.contains_key(k)))
        }
        Request::Delete { key } => {
            let existed = state.lock().remove(&key).is_some();
            Response::Bool(existed)
        }
        Request::Get { key, timeout_ms } => {
            let found = wait_for(state, timeout_ms, |m| m.get(&key).cloned()).await;
            found.map_or(Response::Timeout, Response::Value)
        }
        Request::Wait { keys, timeout_ms } => {
            let found = wait_for(state, timeout_ms, |m| {
                keys.iter().all(|k| m.contains_key(k)).then_some(())
            })
            .await;
            found.map_or(Response::Timeout, |()| Response::Ok)
        }
    }
}

/// Polls `probe` on every change until it returns `Some` or `timeout_ms` passes.
async fn wait_for<T>(
    state: &State,
    timeout_ms: u64,
    probe: impl Fn(&HashMap<String, Vec<u8>>) -> Option<T>,
) -> Option<T> {
    // Clamped to a week so that a huge client value cannot overflow the clock.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(timeout_ms.min(7 * 24 * 3600 * 1000));
    loop {
        let notified = state.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(v) = probe(&state.lock()) {
            return Some(v);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}
