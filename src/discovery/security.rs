//! etcd TLS and authentication: turns `[discovery] tls` and `username`/`password(_file)` into
//! etcd-client connect options. Files are read at each connect, so rotated certificates and a
//! changed password file are picked up by the next reconnect without a restart.
//!
//! TLS is rustls with the ring provider (etcd-client's `tls` feature): no C toolchain beyond
//! ring's own build, no OpenSSL at run time. Tokens are refreshed by the client itself
//! (`with_auto_token_refresh`): a request that meets an expired or invalidated token
//! authenticates again and is retried once. A request that still fails only ends the
//! discovery round; the routing table is replaced only by a successful list, so routes never
//! vanish because of an authentication problem.

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::config::EtcdSecurity;

/// `opts` with the TLS and credentials of `security`; `Err` names the unreadable file.
pub fn apply(mut opts: ConnectOptions, security: &EtcdSecurity) -> Result<ConnectOptions, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    if let Some(tls) = &security.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            t = t.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(t);
    }
    if let Some(auth) = &security.auth {
        let password = auth
            .password
            .read()
            .map_err(|e| format!("cannot read the etcd password: {e}"))?;
        opts = opts
            .with_user(auth.username.clone(), password)
            .with_auto_token_refresh(true);
    }
    Ok(opts)
}
