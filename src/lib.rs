//! Switchboard: a presence-aware routed messaging server.
//!
//! Clients hold WebSocket connections to one of many instances. Each instance
//! records in Redis which users it holds; a direct message is published only
//! to the instances holding its recipient, and a room message only reaches
//! instances with a local member. See `ARCHITECTURE.md` for the map.
//!
//! This crate is the server around the core: configuration, authentication,
//! admission, the HTTP routes, the WebSocket sessions and the assembly of an
//! instance. What a message is and where it goes lives in
//! `switchboard-core`; Redis lives in `switchboard-redis`.

pub mod admission;
pub mod auth;
pub mod config;
pub mod connection;
pub mod http;
pub mod ingest;
pub mod jwks;
pub mod server;

pub use switchboard_core::{
    bus, error, local, metrics, presence, protocol, queue, registry, router, store,
};
