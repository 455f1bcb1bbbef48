//! The blocking store client.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::proto::{frame, Request, Response, MAX_FRAME};
use crate::error::{Error, Result};

/// Extra time a client waits beyond a request's own timeout for the server's answer.
const SLACK: Duration = Duration::from_secs(5);

/// A blocking connection to a [`crate::store::StoreServer`].
///
/// `get`, `wait` and `barrier` block until the keys exist or their timeout passes. Not `Sync`:
/// share one behind a `Mutex` or open one per thread.
pub struct StoreClient {
    addr: String,
    stream: TcpStream,
    /// The timeout used for plain requests (set, add, ...).
    timeout: Duration,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl StoreClient {
    /// Connects to `addr` (`host:port`), retrying until `timeout` (the server may still be starting),
    /// and presents `token`.
    ///
    /// # Errors
    /// [`Error::Store`] if the server refuses the token or is not a bellows store;
    /// [`Error::StoreTimeout`] if nothing accepts the connection in time.
    pub fn connect(addr: &str, token: &str, timeout: Duration) -> Result<StoreClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut it| {
                    it.next()
                        .ok_or_else(|| "resolves to no address".to_string())
                })
                .and_then(|sa| {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10));
                    TcpStream::connect_timeout(&sa, left.min(Duration::from_secs(5)))
                        .map_err(|e| e.to_string())
                });
            match attempt {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(Error::Store {
                        addr: addr.to_string(),
                        message: format!(
                            "cannot connect within {:.1} s: {e}",
                            timeout.as_secs_f64()
                        ),
                    })
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let mut client = StoreClient {
            addr: addr.to_string(),
            stream,
            timeout: timeout.max(Duration::from_secs(1)),
        };
        match client.request(
            &Request::Hello {
                token: token.as_bytes().to_vec(),
            },
            client.timeout,
        )? {
            Response::Ok => Ok(client),
            other => Err(client.unexpected("hello", other)),
        }
    }

    /// The address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The local address of the connection (the interface that routes to the store).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.stream.local_addr().ok().map(|a| a.ip())
    }

    /// Stores `value` under `key`, replacing any previous value, and wakes waiters.
    ///
    /// # Errors
    /// [`Error::Store`] on connection failure.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        match self.request(
            &Request::Set {
                key: key.into(),
                value: value.to_vec(),
            },
            self.timeout,
        )? {
            Response::Ok => Ok(()),
            other => Err(self.unexpected("set", other)),
        }
    }

    /// Returns the value of `key`, waiting up to `timeout` for it to be set.
    ///
    /// # Errors
    /// [`Error::StoreTimeout`] if the key does not appear in time; [`Error::Store`] on connection failure.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        match self.request(
            &Request::Get {
                key: key.into(),
                timeout_ms: millis(timeout),
            },
            timeout + SLACK,
        )? {
            Response::Value(v) => Ok(v),
            Response::Timeout => Err(self.timed_out("get", key, timeout)),
            other => Err(self.unexpected("get", other)),
        }
    }

    /// Atomically adds `delta` to the integer at `key` (missing counts as 0) and returns the new value.
    ///
    /// # Errors
    /// [`Error::Store`] if the key holds a non-integer or on connection failure.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        match self.request(
            &Request::Add {
                key: key.into(),
                delta,
            },
            self.timeout,
        )? {
            Response::Int(n) => Ok(n),
            other => Err(self.unexpected("add", other)),
        }
    }

    /// Waits until every key in `keys` exists.
    ///
    /// # Errors
    /// [`Error::StoreTimeout`] naming the first key list entry if they do not all appear in time.
    pub fn wait(&mut self, keys: &[&str], timeout: Duration) -> Result<()> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let first = keys.join(",");
        match self.request(
            &Request::Wait {
                keys,
                timeout_ms: millis(timeout),
            },
            timeout + SLACK,
        )? {
            Response::Ok => Ok(()),
            Response::Timeout => Err(self.timed_out("wait", &first, timeout)),
            other => Err(self.unexpected("wait", other)),
        }
    }

    /// Whether every key in `keys` exists, without waiting.
    ///
    /// # Errors
    /// [`Error::Store`] on connection failure.
    pub fn check(&mut self, keys: &[&str]) -> Result<bool> {
        let keys = keys.iter().map(|k| k.to_string()).collect();
        match self.request(&Request::Check { keys }, self.timeout)? {
            Response::Bool(b) => Ok(b),
            other => Err(self.unexpected("check", other)),
        }
    }

    /// Removes `key`; returns whether it existed.
    ///
    /// # Errors
    /// [`Error::Store`] on connection failure.
    pub fn delete(&mut self, key: &str) -> Result<bool> {
        match self.request(&Request::Delete { key: key.into() }, self.timeout)? {
            Response::Bool(b) => Ok(b),
            other => Err(self.unexpected("delete", other)),
        }
    }

    /// Blocks until `world` clients have entered the barrier called `name` (use each name once).
    ///
    /// # Errors
    /// [`Error::StoreTimeout`] (the message says how many arrived) if not all arrive in time.
    pub fn barrier(&mut self, name: &str, world: usize, timeout: Duration) -> Result<()> {
        let count_key = format!("barrier/{name}/arrived");
        let done_key = format!("barrier/{name}/done");
        let arrived = self.add(&count_key, 1)?;
        if arrived == world as i64 {
            self.set(&done_key, b"1")?;
        }
        match self.get(&done_key, timeout) {
            Ok(_) => Ok(()),
            Err(Error::StoreTimeout { .. }) => {
                let arrived = self.add(&count_key, 0).unwrap_or(-1);
                Err(self.timed_out(
                    "barrier",
                    &format!("{name} ({arrived} of {world} arrived)"),
                    timeout,
                ))
            }
            Err(e) => Err(e),
        }
    }

    fn request(&mut self, req: &Request, timeout: Duration) -> Result<Response> {
        let payload = req.encode();
        if payload.len() > MAX_FRAME {
            return Err(self.err(format!(
                "request of {} bytes exceeds the limit of {MAX_FRAME}",
                payload.len()
            )));
        }
        self.stream
            .set_write_timeout(Some(timeout))
            .and_then(|()| self.stream.set_read_timeout(Some(timeout)))
            .and_then(|()| self.stream.write_all(&frame(&payload)))
            .map_err(|e| self.err(format!("send failed: {e}")))?;
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .map_err(|e| self.err(format!("no reply: {e}")))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(self.err(format!(
                "reply of {len} bytes exceeds the limit of {MAX_FRAME}"
            )));
        }
        let mut buf = vec![0u8; len];
        self.stream
            .read_exact(&mut buf)
            .map_err(|e| self.err(format!("truncated reply: {e}")))?;
        Response::decode(&buf).ok_or_else(|| self.err("malformed reply".to_string()))
    }

    fn err(&self, message: String) -> Error {
        Error::Store {
            addr: self.addr.clone(),
            message,
        }
    }

    fn unexpected(&self, op: &str, r: Response) -> Error {
        match r {
            Response::Err(m) => self.err(format!("{op} refused: {m}")),
            other => self.err(format!("{op}: unexpected reply {other:?}")),
        }
    }

    fn timed_out(&self, op: &'static str, key: &str, timeout: Duration) -> Error {
        Error::StoreTimeout {
            addr: self.addr.clone(),
            op,
            key: key.to_string(),
            secs: timeout.as_secs_f64(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
