//! A small TCP key-value store for rendezvous: set / get (blocking until the key exists) / add / wait /
//! barrier, in the spirit of PyTorch's `TCPStore`.
//!
//! The server ([`StoreServer`]) runs tokio on a background thread; the client ([`StoreClient`]) is blocking.
//! Frames are length-prefixed with a maximum size of [`MAX_FRAME`] bytes, and every connection must first
//! present the job token.

mod client;
mod proto;
mod server;
pub mod wire;

pub use client::StoreClient;
pub use proto::MAX_FRAME;
pub use server::StoreServer;
