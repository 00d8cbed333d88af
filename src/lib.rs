//! Switchboard: a presence-aware routed messaging server.
//!
//! Clients hold WebSocket connections to one of many instances. Each instance
//! records in Redis which users it holds; a direct message is published only
//! to the instances holding its recipient, and a room message only reaches
//! instances with a local member. See `ARCHITECTURE.md` for the map.

pub mod auth;
pub mod bus;
pub mod config;
pub mod connection;
pub mod http;
pub mod keyed_lock;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod redis;
pub mod registry;
pub mod router;
pub mod server;

#[cfg(test)]
mod proptests;
