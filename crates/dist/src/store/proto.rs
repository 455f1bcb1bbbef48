//! The store's wire format: `u32` little-endian length, then a payload of at most [`MAX_FRAME`] bytes.
//!
//! A payload is an opcode byte followed by fields; byte strings are `u32` length + bytes, integers are
//! little-endian. The first frame on a connection must be a hello carrying [`MAGIC`], [`VERSION`] and the job token.

/// The largest payload either side accepts (64 MiB); a larger length prefix closes the connection.
pub const MAX_FRAME: usize = 64 << 20;
/// Hello magic.
pub(crate) const MAGIC: &[u8; 4] = b"BLWS";
/// Protocol version.
pub(crate) const VERSION: u8 = 1;

/// A client request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    Hello { token: Vec<u8> },
    Set { key: String, value: Vec<u8> },
    Get { key: String, timeout_ms: u64 },
    Add { key: String, delta: i64 },
    Wait { keys: Vec<String>, timeout_ms: u64 },
    Check { keys: Vec<String> },
    Delete { key: String },
}

/// A server response.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Response {
    Ok,
    Value(Vec<u8>),
    Int(i64),
    Bool(bool),
    Timeout,
    Err(String),
}

#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(&(v.len() as u32).to_le_bytes());
        self.0.extend_from_slice(v);
        self
    }
    fn keys(self, keys: &[String]) -> Self {
        let mut w = self.u64(keys.len() as u64);
        for k in keys {
            w = w.bytes(k.as_bytes());
        }
        w
    }
}

struct R<'a>(&'a [u8]);

impl R<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
    fn keys(&mut self) -> Option<Vec<String>> {
        let n = self.u64()?;
        if n > self.0.len() as u64 {
            return None;
        }
        (0..n).map(|_| self.string()).collect()
    }
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

impl Request {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let w = W::default();
        let w = match self {
            Request::Hello { token } => {
                let mut w = w.u8(0);
                w.0.extend_from_slice(MAGIC);
                w.u8(VERSION).bytes(token)
            }
            Request::Set { key, value } => w.u8(1).bytes(key.as_bytes()).bytes(value),
            Request::Get { key, timeout_ms } => w.u8(2).bytes(key.as_bytes()).u64(*timeout_ms),
            Request::Add { key, delta } => w.u8(3).bytes(key.as_bytes()).u64(*delta as u64),
            Request::Wait { keys, timeout_ms } => w.u8(4).keys(keys).u64(*timeout_ms),
            Request::Check { keys } => w.u8(5).keys(keys),
            Request::Delete { key } => w.u8(6).bytes(key.as_bytes()),
        };
        w.0
    }

    /// Parses a payload; `None` for anything malformed (unknown opcode, short or trailing bytes, bad UTF-8).
    pub(crate) fn decode(p: &[u8]) -> Option<Request> {
        let mut r = R(p);
        let req = match r.u8()? {
            0 => {
                if r.take(4)? != MAGIC || r.u8()? != VERSION {
                    return None;
                }
                Request::Hello { token: r.bytes()? }
            }
            1 => Request::Set {
                key: r.string()?,
                value: r.bytes()?,
            },
            2 => Request::Get {
                key: r.string()?,
                timeout_ms: r.u64()?,
            },
            3 => Request::Add {
                key: r.string()?,
                delta: r.u64()? as i64,
            },
            4 => Request::Wait {
                keys: r.keys()?,
                timeout_ms: r.u64()?,
            },
            5 => Request::Check { keys: r.keys()? },
            6 => Request::Delete { key: r.string()? },
            _ => return None,
        };
        r.end()?;
        Some(req)
    }
}

impl Response {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let w = W::default();
        let w = match self {
            Response::Ok => w.u8(0),
            Response::Value(v) => w.u8(1).bytes(v),
            Response::Int(i) => w.u8(2).u64(*i as u64),
            Response::Bool(b) => w.u8(3).u8(u8::from(*b)),
            Response::Timeout => w.u8(4),
            Response::Err(m) => w.u8(5).bytes(m.as_bytes()),
        };
        w.0
    }

    pub(crate) fn decode(p: &[u8]) -> Option<Response> {
        let mut r = R(p);
        let resp = match r.u8()? {
            0 => Response::Ok,
            1 => Response::Value(r.bytes()?),
            2 => Response::Int(r.u64()? as i64),
            // Exactly 0 or 1: one encoding per message (found by the `store_frame` fuzz target).
            3 => match r.u8()? {
                0 => Response::Bool(false),
                1 => Response::Bool(true),
                _ => return None,
            },
            4 => Response::Timeout,
            5 => Response::Err(r.string()?),
            _ => return None,
        };
        r.end()?;
        Some(resp)
    }
}

/// Frames a payload: length prefix + bytes.
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let reqs = [
            Request::Hello {
                token: b"tok".to_vec(),
            },
            Request::Set {
                key: "k".into(),
                value: vec![1, 2, 3],
            },
            Request::Get {
                key: "k".into(),
                timeout_ms: 7,
            },
            Request::Add {
                key: "c".into(),
                delta: -3,
            },
            Request::Wait {
                keys: vec!["a".into(), "b".into()],
                timeout_ms: 9,
            },
            Request::Check { keys: vec![] },
            Request::Delete { key: "k".into() },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
        let resps = [
            Response::Ok,
            Response::Value(vec![0; 3]),
            Response::Int(-1),
            Response::Bool(true),
            Response::Timeout,
            Response::Err("x".into()),
        ];
        for r in resps {
            assert_eq!(Response::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        let good = Request::Set {
            key: "k".into(),
            value: vec![1],
        }
        .encode();
        assert_eq!(Request::decode(&good[..good.len() - 1]), None);
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(Request::decode(&trailing), None);
        assert_eq!(Request::decode(&[99]), None);
        assert_eq!(Request::decode(&[]), None);
        // A key count far larger than the payload must not allocate.
        assert_eq!(
            Request::decode(&[5, 255, 255, 255, 255, 255, 255, 255, 255]),
            None
        );
        assert_eq!(Response::decode(&[3, 9]), None, "a bool is 0 or 1");
        let mut bad_magic = Request::Hello { token: vec![] }.encode();
        bad_magic[1] = b'X';
        assert_eq!(Request::decode(&bad_magic), None);
    }
}
