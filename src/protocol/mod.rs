//! Sans-IO protocol code: parsers, framers and editors of the bytes a connection carries. Each
//! takes the bytes received so far and says "need more", "complete" (with what it found) or
//! why they can never be valid; none touches a socket, a clock or the routing state, so each
//! is unit- and property-tested beside its code. The proxy (`crate::proxy`) reads the sockets
//! and calls them.
//!
//! - `http1`          the HTTP/1.1 codec: request and response heads, body framing, the one
//!   header editor (hop-by-hop and forwarding headers)
//! - `mqtt`           the MQTT CONNECT: client id for client-id routing
//! - `proxy_protocol` the PROXY protocol v1/v2 header: parse (accept_proxy) and encode (send_proxy)
//! - `client_hello`   the TLS ClientHello: the SNI that tls listeners route by

pub mod client_hello;
pub mod http1;
pub mod mqtt;
pub mod proxy_protocol;
