//! `[acme]` (issue 19): certificates for the whole cluster from Pebble, the ACME test CA, on
//! the 3-node network-namespace lab. One certificate is ordered once for three nodes and
//! served by all three (the leaf each node sends is checked against Pebble's root); the
//! ordering node powered off mid-order leaves it to another; renewal swaps the certificate
//! on every node while an open TLS connection keeps working; with Pebble down the last good
//! certificate keeps serving and the failure shows in /routes, the metrics and `cert ls`; a
//! node with another key_file says so, naming the key, and keeps running. Pebble validates
//! for real (http-01 on port 80, tls-alpn-01 on 443 of the address the test DNS gives);
//! listeners with `tls.acme` come from the TOML or from etcd.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::Task;
use crate::support::etcd::Etcdctl;
use crate::support::http::get_within;
use crate::support::lab::Lab;
use crate::support::pebble::{Pebble, TestDns, TlsConn, served_leaf};
use crate::support::wait::eventually_ok;
use crate::support::{eventually, eventually_value, tempdir};

/// The certificate's only name (and so its name in etcd, /routes and `cert ls`).
const NAME: &str = "www.mesh.test";
const CERT_KEY: &str = "/routemesh/acme/certs/www.mesh.test";
/// Bound for an order to complete once a node may take it (lock tick, validation, issuance).
const ISSUED: Duration = Duration::from_secs(45);

/// A lab with Pebble and the test DNS, every node's daemon config holding `[acme]` and a
/// `secure` listener on :443 with `tls.acme`; nginx `web` on n2 (registered by n2).
struct AcmeLab {
    lab: Lab,
    dns: TestDns,
    pebble: Pebble,
    _keys: tempfile::TempDir,
    /// The key file every node uses.
    key: PathBuf,
    /// Another key (the misconfigured node).
    other_key: PathBuf,
    web: std::net::SocketAddr,
    challenge: &'static str,
    renew_before: &'static str,
}

impl AcmeLab {
    fn new(validity_secs: u64, challenge: &'static str, renew_before: &'static str) -> AcmeLab {
        let mut lab = Lab::start("http");
        let ips = [lab.ip(1), lab.ip(2), lab.ip(3)];
        let dns = TestDns::start(lab.host_ip(), &ips);
        let pebble = Pebble::start(lab.host_ip(), dns.addr, validity_secs);
        let keys = tempdir("acme-keys");
        let key = keys.path().join("acme.key");
        let other_key = keys.path().join("other.key");
        std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
        std::fs::write(&other_key, "c3".repeat(32)).unwrap();
        let web = lab.start_nginx(2, &["w1"])[0];
        let mut a = AcmeLab {
            lab,
            dns,
            pebble,
            _keys: keys,
            key,
            other_key,
            web,
            challenge,
            renew_before,
        };
        for i in 1..=3 {
            let extra = a.extra(false);
            a.lab.set_daemon_extra(i, &extra);
        }
        a
    }

    fn extra(&self, wrong_key: bool) -> String {
        let key = if wrong_key {
            &self.other_key
        } else {
            &self.key
        };
        format!(
            "[[listener]]\nname = \"secure\"\nlisten = \"0.0.0.0:443\"\nprotocol = \"http\"\nservice = \"web\"\ntls = {{ acme = [\"{NAME}\"] }}\n\n{}",
            self.pebble
                .acme_toml(self.challenge, self.renew_before, key)
        )
    }

    fn start(&mut self, i: usize) {
        let tasks = if i == 2 {
            vec![Task::new("web", self.web).id("w1")]
        } else {
            vec![]
        };
        self.lab.start_daemon(i, &tasks);
    }

    fn secure(&self, i: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.lab.ip(i), 443))
    }

    /// The leaf every node of `nodes` serves, once they all serve the same one verified
    /// against Pebble's root (and, with `not`, a different one from that).
    fn served_by(&self, nodes: &[usize], not: Option<&[u8]>, within: Duration) -> Vec<u8> {
        let root = self.pebble.root_file();
        eventually_value(
            within,
            &format!("nodes {nodes:?} to serve one certificate for {NAME} from Pebble"),
            || {
                let leaves: Vec<Vec<u8>> = nodes
                    .iter()
                    .map(|&i| served_leaf(self.secure(i), NAME, &root).ok())
                    .collect::<Option<_>>()?;
                let first = leaves[0].clone();
                (leaves.iter().all(|l| *l == first) && not != Some(first.as_slice()))
                    .then_some(first)
            },
        )
    }

    fn metric(&self, i: usize, line_start: &str) -> f64 {
        let Ok((200, body)) = get_within(self.lab.admin(i), "/metrics", Duration::from_secs(2))
        else {
            return 0.0;
        };
        body.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn orders(&self, nodes: &[usize], result: &str) -> f64 {
        let line = format!("routemesh_acme_orders_total{{result=\"{result}\"}}");
        nodes.iter().map(|&i| self.metric(i, &line)).sum()
    }

    /// Waits until `nodes` have counted one successful order between them, then checks
    /// that no second one follows at once.
    fn one_order(&self, nodes: &[usize]) {
        eventually(Duration::from_secs(5), "the order to be counted", || {
            self.orders(nodes, "success") >= 1.0
        });
        assert_eq!(
            self.orders(nodes, "success"),
            1.0,
            "one order for {nodes:?}"
        );
    }

    fn cert_record(&self) -> Option<serde_json::Value> {
        self.lab
            .get(CERT_KEY)
            .and_then(|v| serde_json::from_str(&v).ok())
    }

    /// Node `i`'s /routes entry for the certificate.
    fn routes_cert(&self, i: usize) -> Option<serde_json::Value> {
        self.lab.routes(i)?["certificates"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == NAME)
            .cloned()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn one_order_for_three_nodes_and_renewal_swaps_everywhere_under_an_open_connection() {
    // 40 s certificates: renewed half-way (renew_before is longer than that).
    let mut a = AcmeLab::new(40, "http-01", "30d");
    for i in 1..=3 {
        a.start(i);
    }
    let first = a.served_by(&[1, 2, 3], None, ISSUED);
    // One order for the whole cluster (counted once the orderer has recorded it).
    a.one_order(&[1, 2, 3]);
    assert_eq!(a.orders(&[1, 2, 3], "error"), 0.0);
    let rec = a.cert_record().expect("the certificate in etcd");
    assert_eq!(rec["domains"], serde_json::json!([NAME]));
    assert!(
        rec["key"].as_str().unwrap().starts_with("v1:"),
        "the private key is sealed: {rec}"
    );
    assert!(!rec.to_string().contains("PRIVATE KEY"), "{rec}");
    // Each node lists it as valid and served (once the orderer has released its lock) and
    // exports its expiry (refreshed every 2 s).
    for i in 1..=3 {
        eventually_ok(
            Duration::from_secs(5),
            &format!("n{i} to list the certificate as valid, served, with its expiry"),
            || {
                let c = a.routes_cert(i).ok_or("not in /routes")?;
                let expiry = a.metric(
                    i,
                    &format!("routemesh_tls_certificate_expiry_seconds{{name=\"{NAME}\"}}"),
                );
                if c["state"] == "valid" && c["serving"] == true && expiry as u64 > unix_now() {
                    Ok(())
                } else {
                    Err(format!("{c}; expiry metric {expiry}"))
                }
            },
        );
    }
    let ls = a.lab.cli_ok(&["cert", "ls"]);
    assert!(
        ls.contains("NOT AFTER")
            && ls.contains(NAME)
            && ls.contains("valid")
            && ls.contains("Pebble"),
        "{ls}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&a.lab.cli_ok(&["cert", "ls", "--json"])).unwrap();
    assert_eq!(json[0]["name"], NAME);

    // An open connection through n1 (HTTP/1.1 keep-alive to nginx on n2).
    let root = a.pebble.root_file();
    let mut conn = TlsConn::open(a.secure(1), NAME, &root).expect("TLS to n1");
    assert_eq!(conn.leaf(), first);
    assert_eq!(conn.get(NAME, "/").unwrap(), 200);

    // Renewal: every node swaps to the new certificate.
    let second = a.served_by(&[1, 2, 3], Some(&first), Duration::from_secs(40));
    assert_ne!(second, first);
    eventually(Duration::from_secs(5), "the renewal to be counted", || {
        a.orders(&[1, 2, 3], "success") >= 2.0
    });
    // The connection opened before the swap still works, on its old session.
    assert_eq!(conn.get(NAME, "/").unwrap(), 200);
    assert_eq!(conn.leaf(), first);
}

#[test]
fn ordering_node_powered_off_mid_order_another_completes() {
    let mut a = AcmeLab::new(3600, "http-01", "30d");
    for i in 1..=3 {
        a.start(i);
    }
    // Mid-order: a challenge is published and the order's lock is held.
    let holder = eventually_value(
        ISSUED,
        "a node to publish a challenge while holding the order lock",
        || {
            if a.lab.get_prefix("/routemesh/acme/challenges/").is_empty() {
                return None;
            }
            let node = a.lab.get(&format!("/routemesh/acme/locks/{NAME}"))?;
            node.trim().strip_prefix('n')?.parse::<usize>().ok()
        },
    );
    assert!(
        a.cert_record().is_none(),
        "the order finished before the power-off; nothing was interrupted"
    );
    a.lab.power_off(holder);
    let live: Vec<usize> = (1..=3).filter(|&i| i != holder).collect();
    a.dns
        .set(&live.iter().map(|&i| a.lab.ip(i)).collect::<Vec<_>>());
    // Its lease expires with it, and so do the lock and its challenges: another node orders.
    let leaf = a.served_by(&live, None, Duration::from_secs(60));
    assert!(!leaf.is_empty());
    let rec = a.cert_record().expect("the certificate in etcd");
    assert_ne!(
        rec["node"],
        format!("n{holder}"),
        "ordered by a live node: {rec}"
    );
    a.one_order(&live);
    eventually(Duration::from_secs(5), "the lock to be released", || {
        a.lab
            .get(&format!("/routemesh/acme/locks/{NAME}"))
            .is_none()
    });
}

#[test]
fn ca_down_keeps_the_last_certificate_and_a_wrong_key_file_is_named() {
    // 40 s certificates, renewed about 20 s after issuance.
    let mut a = AcmeLab::new(40, "http-01", "30d");
    a.start(1);
    a.start(2);
    let first = a.served_by(&[1, 2], None, ISSUED);

    // n3 with another key file: it cannot open the private key, says which key, keeps
    // running and does not replace the certificate.
    let wrong = a.extra(true);
    a.lab.set_daemon_extra(3, &wrong);
    a.start(3);
    let c = eventually_value(
        Duration::from_secs(10),
        "n3's /routes to show why it cannot serve the certificate",
        || a.routes_cert(3).filter(|c| c["last_error"].is_string()),
    );
    let why = c["last_error"].as_str().unwrap();
    assert!(
        why.contains(CERT_KEY) && why.contains("key_file") && why.contains("sealed with key"),
        "{why}"
    );
    assert_eq!(c["serving"], false);
    assert!(a.lab.daemon_log(3).contains(CERT_KEY));
    assert!(a.lab.daemon_alive(3));
    assert_eq!(
        get_within(a.lab.admin(3), "/healthz", Duration::from_secs(2))
            .map(|r| r.0)
            .ok(),
        Some(200)
    );

    // The CA goes away before the renewal is due: the renewal fails visibly, and the last
    // good certificate keeps serving.
    let root = a.pebble.root_file();
    a.pebble.stop();
    let failed = eventually_value(
        Duration::from_secs(40),
        "a failed renewal to show in /routes",
        || {
            [1, 2]
                .into_iter()
                .filter_map(|i| a.routes_cert(i))
                .find(|c| c["state"] == "failed")
        },
    );
    assert!(
        failed["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failed}"
    );
    eventually(
        Duration::from_secs(5),
        "the failed order to be counted",
        || a.orders(&[1, 2, 3], "error") >= 1.0,
    );
    // Still the first certificate (and still valid), on both nodes that can serve it.
    for i in [1, 2] {
        let served = served_leaf(a.secure(i), NAME, &root).unwrap_or_else(|e| panic!("n{i}: {e}"));
        assert_eq!(served, first, "n{i} serves the last good certificate");
    }
    let ls = a.lab.cli_ok(&["cert", "ls"]);
    assert!(ls.contains("failed"), "{ls}");
    assert!(a.lab.daemon_alive(3));
}

#[test]
fn tls_alpn_01_validates_through_a_listener_published_in_etcd() {
    let mut a = AcmeLab::new(3600, "tls-alpn-01", "30d");
    // No TOML listener with tls.acme here: the `secure` listener is published in etcd.
    for i in 1..=3 {
        let acme = a.pebble.acme_toml(a.challenge, a.renew_before, &a.key);
        a.lab.set_daemon_extra(i, &acme);
        a.start(i);
    }
    a.lab.put(
        "/routemesh/listeners/secure",
        &format!(
            r#"{{"listen":"0.0.0.0:443","protocol":"http","service":"web","tls":{{"acme":["{NAME}"]}}}}"#
        ),
    );
    a.served_by(&[1, 2, 3], None, ISSUED);
    a.one_order(&[1, 2, 3]);
}
