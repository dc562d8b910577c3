//! Checks of one value, shared by every section: durations, bounded whole numbers, names,
//! socket addresses, one-of choices, server names and paths relative to the config file.
//! Each reports a problem at the value's position and returns a usable default, so one pass
//! finds every problem in the file.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::Issues;
use super::file::S;
use super::names::NameError;

pub(super) fn span<T>(s: &S<T>) -> Range<usize> {
    s.span()
}

pub(super) fn duration(
    issues: &mut Issues,
    v: &Option<S<String>>,
    default: Duration,
    key: &str,
) -> Duration {
    let Some(v) = v else { return default };
    match humantime::parse_duration(v.get_ref().trim()) {
        Ok(d) => d,
        Err(e) => {
            issues.at(
                span(v),
                format!(
                    "`{key}`: {:?} is not a duration ({e}); write a string like \"500ms\", \"3s\" or \"1m\"",
                    v.get_ref()
                ),
            );
            default
        }
    }
}

pub(super) fn positive_duration(
    issues: &mut Issues,
    v: &Option<S<String>>,
    default: Duration,
    key: &str,
) -> Duration {
    let d = duration(issues, v, default, key);
    if d.is_zero() {
        if let Some(v) = v {
            issues.at(span(v), format!("`{key}` must be greater than zero"));
        }
        return default;
    }
    d
}

pub(super) fn int_in(
    issues: &mut Issues,
    v: &Option<S<i64>>,
    default: i64,
    range: std::ops::RangeInclusive<i64>,
    key: &str,
) -> i64 {
    let Some(v) = v else { return default };
    let n = *v.get_ref();
    if range.contains(&n) {
        n
    } else {
        issues.at(
            span(v),
            format!(
                "`{key}` = {n} is out of range: use a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        );
        default
    }
}

pub(super) fn name<T>(
    issues: &mut Issues,
    v: &S<String>,
    key: &str,
    make: fn(&str) -> Result<T, NameError>,
) -> Option<T> {
    match make(v.get_ref()) {
        Ok(n) => Some(n),
        Err(e) => {
            issues.at(span(v), format!("`{key}`: {e}"));
            None
        }
    }
}

pub(super) fn socket_addr(issues: &mut Issues, v: &S<String>, key: &str) -> Option<SocketAddr> {
    match v.get_ref().trim().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            issues.at(
                span(v),
                format!(
                    "`{key}`: {:?} is not an IP:PORT address; write e.g. \"0.0.0.0:80\", \"10.0.0.2:1884\" or \"[::1]:80\"",
                    v.get_ref()
                ),
            );
            None
        }
    }
}

pub(super) fn one_of<T: Copy>(
    issues: &mut Issues,
    v: &Option<S<String>>,
    default: T,
    choices: &[(&str, T)],
    key: &str,
) -> T {
    let Some(v) = v else { return default };
    match choices.iter().find(|(s, _)| *s == v.get_ref()) {
        Some((_, t)) => *t,
        None => {
            let names: Vec<String> = choices.iter().map(|(s, _)| format!("\"{s}\"")).collect();
            issues.at(
                span(v),
                format!(
                    "`{key}` = {:?} is not supported: use one of {}",
                    v.get_ref(),
                    names.join(", ")
                ),
            );
            default
        }
    }
}

/// Relative paths are relative to the config file.
pub(super) fn resolve(config: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    }
}

/// Exact host name or `*.suffix`, lower-cased.
pub(super) fn server_name(s: &str) -> Option<String> {
    let v = s.trim().to_ascii_lowercase();
    let bare = v.strip_prefix("*.").unwrap_or(&v);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && !bare.starts_with('.')
        && !bare.ends_with('.')
        && bare
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
    ok.then_some(v)
}
