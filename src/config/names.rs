//! Newtypes for the names that appear in etcd keys and metric labels, so a service name is
//! never passed where a task id was meant. All three share one rule: 1–128 characters from
//! `[A-Za-z0-9._-]` (they become path segments of etcd keys, so no `/`).

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} {value:?} is not valid: use 1-128 characters from A-Z a-z 0-9 . _ - (no '/' or spaces)"
)]
pub struct NameError {
    pub kind: &'static str,
    pub value: String,
}

pub(crate) fn check_name(kind: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            kind,
            value: value.to_string(),
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// Validates and wraps a name.
            pub fn new(value: &str) -> Result<Self, NameError> {
                check_name($kind, value)?;
                Ok($ty(Arc::from(value)))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                $ty::new(&value)
            }
        }
        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.0.to_string()
            }
        }
        impl std::str::FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                $ty::new(s)
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A service: what a listener forwards to (`web`, `mqtt`).
    ServiceName,
    "service name"
);
name_type!(
    /// One task of a service: a live container's IP:port, unique within its service.
    TaskId,
    "task id"
);
name_type!(
    /// A node: one machine running the daemon.
    NodeName,
    "node name"
);

impl TaskId {
    /// The id given to a task that was registered without one: `{node}-{ip}-{port}`, with
    /// the address's separators turned into `-` so it is a valid key segment.
    pub fn derived(node: Option<&NodeName>, addr: std::net::SocketAddr) -> TaskId {
        let ip: String = addr
            .ip()
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let raw = match node {
            Some(n) => format!("{n}-{ip}-{}", addr.port()),
            None => format!("{ip}-{}", addr.port()),
        };
        let raw: String = raw.chars().take(128).collect();
        TaskId(Arc::from(raw.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_slashes_and_empty() {
        assert!(ServiceName::new("web").is_ok());
        assert!(ServiceName::new("a.b_c-1").is_ok());
        assert!(ServiceName::new("").is_err());
        assert!(ServiceName::new("a/b").is_err());
        assert!(NodeName::new("n 1").is_err());
        assert!(TaskId::new(&"x".repeat(129)).is_err());
    }

    #[test]
    fn derived_ids_are_valid() {
        let n = NodeName::new("n1").unwrap();
        let id = TaskId::derived(Some(&n), "10.0.0.2:1884".parse().unwrap());
        assert_eq!(id.as_str(), "n1-10-0-0-2-1884");
        let id6 = TaskId::derived(None, "[::1]:80".parse().unwrap());
        assert!(TaskId::new(id6.as_str()).is_ok());
    }
}
