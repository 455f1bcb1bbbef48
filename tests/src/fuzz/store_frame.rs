//! Target `store_frame`: one payload of the rendezvous store's wire format, decoded as a request
//! (what the server reads from any client, including strangers) and as a response (what a client
//! reads from the server).

use std::path::Path;

use bellows_dist::store::wire;

/// Runs one input. Property: whatever decodes re-encodes to exactly the same bytes (the format
/// has one encoding per message, so nothing is silently reinterpreted).
pub fn run(data: &[u8], _scratch: &Path) {
    if let Some(again) = wire::reencode_request(data) {
        assert_eq!(again, data, "request decode/encode is not the identity");
    }
    if let Some(again) = wire::reencode_response(data) {
        assert_eq!(again, data, "response decode/encode is not the identity");
    }
}
