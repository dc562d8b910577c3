//! A test PKI made with the openssl CLI, and a single etcd member with TLS and client
//! certificate auth (`--client-cert-auth`) or with user/password auth (`etcdctl auth enable`).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::etcd::ctl_run;
use super::util::{free_port, require_binary, run_bounded, tail_file, tempdir, unique_name};

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

impl Pki {
    pub fn new() -> Pki {
        let dir = tempdir("edge-pki");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca-key.pem",
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
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
            ],
        );
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

/// How the member is secured.
pub enum Security {
    /// https with `--client-cert-auth`; etcdctl uses the `client` certificate.
    Mtls,
    /// http with `auth enable`; user `root`/`rootpw` for etcdctl, and `user`/`password` with
    /// read-write on `prefix` for the daemon.
    Auth {
        token_ttl_secs: u32,
        user: String,
        password: String,
        prefix: String,
    },
}

/// One secured etcd member in a temp dir.
pub struct SecureEtcd {
    pub pki: Pki,
    client_port: u16,
    https: bool,
    /// Extra etcdctl flags (certificates or the root user).
    ctl_flags: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl SecureEtcd {
    pub fn start(security: Security) -> SecureEtcd {
        let pki = Pki::new();
        let name = unique_name("rm-etcd-sec");
        let (client_port, peer_port) = (free_port(), free_port());
        let dir = tempdir(&name);
        let https = matches!(security, Security::Mtls);
        let scheme = if https { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", dir.path().join("data").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={name}={peer_url}"),
            "--initial-cluster-state=new".into(),
            format!("--initial-cluster-token={name}"),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
            "--log-level=warn".into(),
        ];
        let mut ctl_flags = Vec::new();
        match &security {
            Security::Mtls => {
                let (cert, key) = pki.issue("server", "127.0.0.1", &["IP:127.0.0.1"]);
                let (ccert, ckey) = pki.issue("client", "etcdctl", &[]);
                args.extend([
                    format!("--cert-file={}", cert.display()),
                    format!("--key-file={}", key.display()),
                    format!("--trusted-ca-file={}", pki.ca().display()),
                    "--client-cert-auth".into(),
                ]);
                ctl_flags.extend([
                    format!("--cacert={}", pki.ca().display()),
                    format!("--cert={}", ccert.display()),
                    format!("--key={}", ckey.display()),
                ]);
            }
            Security::Auth { token_ttl_secs, .. } => {
                args.push(format!("--auth-token-ttl={token_ttl_secs}"));
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new(require_binary("etcd", super::etcd::ETCD_SETUP_HINT))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let mut etcd = SecureEtcd {
            pki,
            client_port,
            https,
            ctl_flags,
            dir,
            child: Some(child),
        };
        etcd.wait_healthy();
        if let Security::Auth {
            user,
            password,
            prefix,
            ..
        } = &security
        {
            etcd.ctl(&["user", "add", "root:rootpw"]);
            etcd.ctl(&["role", "add", "root"]);
            etcd.ctl(&["user", "grant-role", "root", "root"]);
            etcd.ctl(&["user", "add", &format!("{user}:{password}")]);
            etcd.ctl(&["role", "add", "routemesh"]);
            etcd.ctl(&[
                "role",
                "grant-permission",
                "routemesh",
                "--prefix=true",
                "readwrite",
                &format!("{prefix}/"),
            ]);
            etcd.ctl(&["user", "grant-role", user, "routemesh"]);
            etcd.ctl(&["auth", "enable"]);
            etcd.ctl_flags.push("--user=root:rootpw".into());
            etcd.ctl(&["endpoint", "health"]);
        }
        etcd
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("etcd exited at start ({status}): {}", self.log_tail());
            }
            if self.try_ctl(&["endpoint", "health"], None).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "secure etcd not healthy: {}",
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn log_tail(&self) -> String {
        tail_file(&self.dir.path().join("etcd.log"), 30)
    }

    pub fn try_ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, String> {
        let mut all: Vec<&str> = self.ctl_flags.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        ctl_run(&self.endpoint(), &all, stdin, Duration::from_secs(15))
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args, None)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"))
    }

    pub fn put(&self, key: &str, value: &str) {
        self.try_ctl(&["put", "--", key], Some(value.as_bytes()))
            .unwrap_or_else(|e| panic!("etcdctl put {key}: {e}"));
    }
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
