//! Config errors: each one knows where in the file it was found and how to fix it.
//!
//! Owns the `file:line:col: message` rendering used by `routemesh check` and by the
//! daemon at start-up and reload. Does not know the schema (that is `file.rs`).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// 1-based line, or 0 when the problem has no position (e.g. the file is unreadable).
    pub line: usize,
    /// 1-based column (in characters).
    pub col: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in one config file, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The file as the user named it (shown verbatim in each line).
    pub file: PathBuf,
    /// All issues found; never empty.
    pub issues: Vec<ConfigIssue>,
}

impl ConfigError {
    pub(crate) fn single(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            issues: vec![ConfigIssue {
                line: 0,
                col: 0,
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if issue.line == 0 {
                write!(f, "{}: {}", self.file.display(), issue.message)?;
            } else {
                write!(
                    f,
                    "{}:{}:{}: {}",
                    self.file.display(),
                    issue.line,
                    issue.col,
                    issue.message
                )?;
            }
        }
        Ok(())
    }
}

/// Collects issues while validating; positions are byte spans into `source`.
pub(crate) struct Issues<'a> {
    source: &'a str,
    found: Vec<(usize, ConfigIssue)>,
}

impl<'a> Issues<'a> {
    pub(crate) fn new(source: &'a str) -> Self {
        Issues {
            source,
            found: Vec::new(),
        }
    }

    /// Records a problem at `span` (byte range into the source).
    pub(crate) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.source, span.start);
        self.found.push((
            span.start,
            ConfigIssue {
                line,
                col,
                message: message.into(),
            },
        ));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    pub(crate) fn into_error(mut self, file: &Path) -> ConfigError {
        self.sort();
        ConfigError {
            file: file.to_path_buf(),
            issues: self.found.into_iter().map(|(_, i)| i).collect(),
        }
    }

    /// Each message with its byte offset, in source order: for a value that has no file
    /// position of its own (a listener published in etcd, validated through a document made
    /// from its JSON), whose caller names the problem some other way.
    pub(crate) fn into_located(mut self) -> Vec<(usize, String)> {
        self.sort();
        self.found
            .into_iter()
            .map(|(at, i)| (at, i.message))
            .collect()
    }

    fn sort(&mut self) {
        self.found.sort_by_key(|(offset, _)| *offset);
        self.found.dedup_by(|a, b| a.1 == b.1);
    }
}

/// 1-based line and column (in chars) of a byte offset.
pub(crate) fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..floor_char_boundary(source, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 8), (2, 3));
        assert_eq!(line_col(src, 999), (3, 1));
    }

    #[test]
    fn display_is_file_line_col() {
        let mut issues = Issues::new("x = 1\ny = 2\n");
        issues.at(6..7, "bad y");
        issues.at(0..1, "bad x");
        let err = issues.into_error(Path::new("c.toml"));
        assert_eq!(err.to_string(), "c.toml:1:1: bad x\nc.toml:2:1: bad y");
    }
}
