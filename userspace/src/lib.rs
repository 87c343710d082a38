//! fae: a Thrift RPC appliance serving the FunServant API.
//!
//! Layers, each importing only those above it in this list: [`wire`] (Thrift encoding, no I/O), [`servant`]
//! (the API's logic over `wire` views), [`engine`] (sessions, event loops, metrics), [`admin`] (HTTP), and
//! [`config`], which every layer reads.

#![deny(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod client;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod filter;
pub mod fuzzing;
pub mod reload;
pub mod servant;
pub mod sock;
pub mod wire;
