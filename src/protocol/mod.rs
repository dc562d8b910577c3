//! Sans-IO protocol code: parsers, framers and editors that take bytes and give verdicts,
//! with no sockets and no clock, each with its property tests beside it. The proxies in
//! `crate::proxy` do the IO and call into these.

pub mod http1;
