//! `[[task]]` tables: the tasks this node hosts (etcd backend, written under its lease) or
//! the whole routing table (static backend).

use std::net::SocketAddr;

use serde::Deserialize;

use super::file::S;
use super::names::{ServiceName, TaskId};

#[derive(Debug, Default, Deserialize)]
pub struct RawTask {
    pub service: Option<S<String>>,
    pub addr: Option<S<String>>,
    pub id: Option<S<String>>,
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    pub service: ServiceName,
    pub addr: SocketAddr,
    pub id: TaskId,
    pub weight: u32,
}
