//! The store's message decoders as a public, stable-enough surface for the fuzz targets in `fuzz/`
//! and their corpus replay test (`tests/tests/fuzz_corpus.rs`). Not needed to use the store.

use super::proto::{Request, Response};

/// Decodes `payload` as a client request (what the server reads from any connection, before and
/// after the hello) and encodes it again; `None` when it is malformed and would be refused.
pub fn reencode_request(payload: &[u8]) -> Option<Vec<u8>> {
    Request::decode(payload).map(|r| r.encode())
}

/// Decodes `payload` as a server response (what a client reads) and encodes it again; `None`
/// when it is malformed.
pub fn reencode_response(payload: &[u8]) -> Option<Vec<u8>> {
    Response::decode(payload).map(|r| r.encode())
}
