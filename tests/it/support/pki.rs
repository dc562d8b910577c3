//! A throw-away test PKI made with the openssl CLI: a CA and the server and client
//! certificates it issues (for etcd over TLS, TLS passthrough and TLS termination).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{require_binary, run_bounded, tempdir};

/// A throw-away CA (EC P-256) that issues server and client certificates.
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let bin = require_binary("openssl", "apt-get install -y openssl");
    let mut cmd = Command::new(bin);
    cmd.args(args).current_dir(dir);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` with a new P-256 key written to `key` (unencrypted), and `args`.
fn new_key(dir: &Path, key: &str, args: &[&str]) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
    ];
    all.extend_from_slice(args);
    openssl(dir, &all);
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempdir("edge-pki");
        new_key(
            dir.path(),
            "ca-key.pem",
            &[
                "-x509",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=routemesh test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki { dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues `name.pem` / `name-key.pem` for `cn` with `sans` (e.g. "IP:127.0.0.1",
    /// "DNS:a.example.com"); usable for both server and client auth.
    pub fn issue(&self, name: &str, cn: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let ext = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n{}",
            if sans.is_empty() {
                String::new()
            } else {
                format!("subjectAltName={}\n", sans.join(","))
            }
        );
        fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        let key = format!("{name}-key.pem");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        new_key(d, &key, &["-out", &csr, "-subj", &subj]);
        let extfile = format!("{name}.ext");
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
        (d.join(cert), d.join(key))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
