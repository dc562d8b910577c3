//! The status page itself: one HTML document with its style and script inline (the files in
//! `page/`, embedded in the binary), served at `GET /` with a Content-Security-Policy that
//! allows exactly that style and script (by hash), requests to this origin only, and nothing
//! else: no external assets, no frames, no forms.

use std::sync::LazyLock;

use base64::Engine as _;
use bytes::Bytes;

const TEMPLATE: &str = include_str!("page/status.html");
const STYLE: &str = include_str!("page/status.css");
const SCRIPT: &str = include_str!("page/status.js");

/// The assembled page and its policy.
pub struct Page {
    pub html: Bytes,
    pub csp: String,
}

fn sha256_b64(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

/// Built once, at the first request.
pub static PAGE: LazyLock<Page> = LazyLock::new(|| {
    let html = TEMPLATE
        .replace("{{style}}", STYLE)
        .replace("{{script}}", SCRIPT);
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        sha256_b64(SCRIPT),
        sha256_b64(STYLE)
    );
    Page {
        html: Bytes::from(html),
        csp,
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_small_self_contained_and_allowed_by_its_policy() {
        let page = &*PAGE;
        assert!(page.html.len() < 150 * 1024, "{} bytes", page.html.len());
        let html = std::str::from_utf8(&page.html).unwrap();
        // The style and script sit inline exactly as hashed.
        assert!(html.contains(&format!("<style>{STYLE}</style>")));
        assert!(html.contains(&format!("<script>{SCRIPT}</script>")));
        assert_eq!(html.matches("<script").count(), 1);
        assert_eq!(html.matches("<style").count(), 1);
        // Nothing is loaded from elsewhere: no URL with a scheme, no src or url(), and no
        // inline event handler attributes (` onclick=`), which the policy would block.
        for needle in ["http://", "https://", "src=", "url(", "@import"] {
            assert!(!html.contains(needle), "{needle:?} in the page");
        }
        for (i, _) in html.match_indices(" on") {
            let name: String = html[i + 3..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase())
                .collect();
            assert!(
                !html[i + 3 + name.len()..].starts_with('='),
                "inline handler on{name}= in the page"
            );
        }
        assert!(!html.contains("{{"), "a placeholder was left");
        assert!(
            page.csp
                .starts_with("default-src 'none'; script-src 'sha256-")
        );
        assert!(page.csp.contains("connect-src 'self'"));
    }
}
