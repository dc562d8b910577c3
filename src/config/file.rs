//! The raw serde shape of the TOML file, exactly as written by the user: one field per
//! section, each section's shape in its own file (`node.rs`, `listener.rs`, ...).
//!
//! Every value is `Spanned` so validation can point at it. Unknown keys are not rejected
//! here: they are collected by `serde_ignored` so that all of them are reported at once, and
//! placed back in the document by `span_of`. This module holds no defaults and no checks.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::Spanned;

use super::admin::RawAdmin;
use super::discovery::RawDiscovery;
use super::error::Issues;
use super::http::RawHttp;
use super::listener::RawListener;
use super::log::RawLog;
use super::node::RawNode;
use super::runtime::RawRuntime;
use super::service::RawService;
use super::task::RawTask;

pub type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub node: Option<S<RawNode>>,
    #[serde(default)]
    pub discovery: Option<S<RawDiscovery>>,
    #[serde(default)]
    pub admin: Option<S<RawAdmin>>,
    #[serde(default)]
    pub listener: Vec<S<RawListener>>,
    #[serde(default)]
    pub service: BTreeMap<String, S<RawService>>,
    #[serde(default)]
    pub task: Vec<S<RawTask>>,
    #[serde(default)]
    pub http: Option<S<RawHttp>>,
    #[serde(default)]
    pub log: Option<S<RawLog>>,
    #[serde(default)]
    pub runtime: Option<S<RawRuntime>>,
    #[serde(default)]
    pub dns: Option<S<super::dns::RawDns>>,
    #[serde(default)]
    pub docker: Option<S<super::docker::RawDocker>>,
    #[serde(default)]
    pub acme: Option<S<super::acme::RawAcme>>,
}

/// Reads `source` as TOML into `T`. A syntax error or a value of the wrong type is reported at
/// its position and gives `None` (nothing else can be checked then); each key `T` does not
/// know is reported at its own position.
pub(super) fn deserialize<T: DeserializeOwned>(source: &str, issues: &mut Issues) -> Option<T> {
    let table = match toml::de::DeTable::parse(source) {
        Ok(t) => t,
        Err(e) => {
            issues.at(
                e.span().unwrap_or(0..0),
                format!("invalid TOML: {}", e.message().trim()),
            );
            return None;
        }
    };
    let mut unknown: Vec<Vec<String>> = Vec::new();
    let raw: T = match toml::Deserializer::parse(source)
        .and_then(|de| serde_ignored::deserialize(de, |p| unknown.push(path_segments(&p))))
    {
        Ok(raw) => raw,
        Err(e) => {
            issues.at(
                e.span().unwrap_or(0..0),
                format!("{} (see config/example.toml)", e.message().trim()),
            );
            return None;
        }
    };
    for segments in unknown {
        let span = span_of(table.get_ref(), &segments).unwrap_or(0..0);
        let key = segments.join(".");
        issues.at(
            span,
            format!(
                "unknown key `{key}`: remove it or check its spelling (config/example.toml lists every key)"
            ),
        );
    }
    Some(raw)
}

/// The key path of an ignored value, without serde's internal wrappers (Spanned's fields).
fn path_segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path as P;
    let mut out = Vec::new();
    let mut cur = path;
    loop {
        match cur {
            P::Root => break,
            P::Seq { parent, index } => {
                out.push(index.to_string());
                cur = parent;
            }
            P::Map { parent, key } => {
                if !key.starts_with("$__") {
                    out.push(key.clone());
                }
                cur = parent;
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                cur = parent
            }
        }
    }
    out.reverse();
    out
}

/// The span of the key at `segments` (array indices as numbers) in the parsed document.
fn span_of(table: &toml::de::DeTable<'_>, segments: &[String]) -> Option<Range<usize>> {
    use toml::de::DeValue;
    let (first, rest) = segments.split_first()?;
    let (key, value) = table.iter().find(|(k, _)| k.get_ref().as_ref() == first)?;
    if rest.is_empty() {
        return Some(key.span());
    }
    let mut value = value;
    let mut rest = rest;
    // Walk through arrays (of tables) by index.
    while let DeValue::Array(items) = value.get_ref() {
        let (idx, r) = rest.split_first()?;
        value = items.get(idx.parse::<usize>().ok()?)?;
        rest = r;
        if rest.is_empty() {
            return Some(value.span());
        }
    }
    match value.get_ref() {
        DeValue::Table(t) => span_of(t, rest).or(Some(key.span())),
        _ => Some(key.span()),
    }
}

/// The dotted path of the innermost key whose value holds byte `offset` of `source` (array
/// elements by index, as unknown keys are named); `None` outside every value.
pub(super) fn key_at(source: &str, offset: usize) -> Option<String> {
    use toml::de::DeValue;
    // Tables are searched whole: the span of a `[table]` is its header, not its keys.
    fn find(value: &toml::Spanned<DeValue<'_>>, offset: usize) -> Option<Vec<String>> {
        let inner = match value.get_ref() {
            DeValue::Table(t) => t.iter().find_map(|(k, v)| {
                let mut path = find(v, offset)?;
                path.insert(0, k.get_ref().to_string());
                Some(path)
            }),
            DeValue::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
                let mut path = find(v, offset)?;
                path.insert(0, i.to_string());
                Some(path)
            }),
            _ => None,
        };
        inner.or_else(|| value.span().contains(&offset).then(Vec::new))
    }
    let table = toml::de::DeTable::parse(source).ok()?;
    let root = toml::Spanned::new(0..0, DeValue::Table(table.into_inner()));
    find(&root, offset)
        .filter(|p| !p.is_empty())
        .map(|p| p.join("."))
}
