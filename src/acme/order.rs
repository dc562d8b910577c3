//! One ACME order, run by the node holding the certificate's lock: the shared account
//! (created once, kept sealed in etcd), challenges published in etcd under this node's
//! lease so that every node answers them, then finalization with a fresh key. IO at the
//! edge: instant-acme towards the CA, etcd-client towards the cluster.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};

use super::seal::{self, SealKey};
use super::store::{
    AccountRecord, CertRecord, ChallengeRecord, account_key, cert_key, challenge_key, to_json,
};
use crate::config::acme::{AcmeConfig, ChallengeKind};
use crate::snapshot::SharedSnapshot;

/// Why an order failed (shown in `acme/status/{name}`, /routes and the log).
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the account in etcd: {0}")]
    Account(String),
    #[error("{0}")]
    Order(String),
}

/// What an order needs besides the names.
pub struct OrderCtx<'a> {
    pub client: &'a mut Client,
    pub prefix: &'a str,
    pub node: &'a str,
    pub lease: i64,
    pub acme: &'a AcmeConfig,
    pub key: &'a SealKey,
    pub snapshot: &'a SharedSnapshot,
}

/// Bound on each poll of the CA (validation, issuance).
const POLL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a challenge written to etcd may take to reach this node's own snapshot, and
/// the grace after it for the other nodes' watches (they see the same revision within
/// milliseconds on a healthy cluster).
const PUBLISH_WITHIN: Duration = Duration::from_secs(5);
const PUBLISH_GRACE: Duration = Duration::from_secs(1);

fn builder(acme: &AcmeConfig) -> Result<instant_acme::AccountBuilder, OrderError> {
    Ok(match &acme.ca_file {
        Some(p) => Account::builder_with_root(p)?,
        None => Account::builder()?,
    })
}

/// The cluster's account: from etcd, or created and stored (first writer wins; a node
/// that loses the race uses the stored one).
pub async fn account(ctx: &mut OrderCtx<'_>) -> Result<Account, OrderError> {
    let k = account_key(ctx.prefix);
    let stored = ctx.client.get(k.as_str(), None).await?;
    if let Some(kv) = stored.kvs().first() {
        let rec = AccountRecord::parse(kv.value()).map_err(OrderError::Account)?;
        if rec.directory == ctx.acme.directory {
            return restore(ctx, &k, &rec).await;
        }
        tracing::info!(old = %rec.directory, new = %ctx.acme.directory, "ACME directory changed: creating a new account");
    }
    let contact = (!ctx.acme.email.is_empty()).then(|| format!("mailto:{}", ctx.acme.email));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder(ctx.acme)?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            ctx.acme.directory.clone(),
            None,
        )
        .await?;
    let json = serde_json::to_vec(&creds).map_err(|e| OrderError::Account(e.to_string()))?;
    let sealed =
        seal::seal_random(ctx.key, &k, &json).map_err(|e| OrderError::Account(e.to_string()))?;
    let rec = AccountRecord {
        directory: ctx.acme.directory.clone(),
        credentials: sealed,
    };
    ctx.client.put(k.as_str(), to_json(&rec), None).await?;
    tracing::info!(directory = %ctx.acme.directory, id = account.id(), "ACME account created");
    Ok(account)
}

async fn restore(ctx: &OrderCtx<'_>, k: &str, rec: &AccountRecord) -> Result<Account, OrderError> {
    let json = seal::open(ctx.key, k, &rec.credentials)
        .map_err(|e| OrderError::Account(format!("{k}: {e}")))?;
    let creds: AccountCredentials =
        serde_json::from_slice(&json).map_err(|e| OrderError::Account(format!("{k}: {e}")))?;
    Ok(builder(ctx.acme)?.from_credentials(creds).await?)
}

/// Orders a certificate for `domains` named `name`. Every challenge token written to etcd
/// is pushed on `tokens` (the caller deletes them, whatever the outcome).
pub async fn order(
    ctx: &mut OrderCtx<'_>,
    name: &str,
    domains: &[String],
    tokens: &mut Vec<String>,
) -> Result<CertRecord, OrderError> {
    let account = account(ctx).await?;
    let ids: Vec<Identifier> = domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    let (kind, kind_name) = match ctx.acme.challenge {
        ChallengeKind::Http01 => (ChallengeType::Http01, "http-01"),
        ChallengeKind::TlsAlpn01 => (ChallengeType::TlsAlpn01, "tls-alpn-01"),
    };
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut a = a?;
        match a.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => {
                return Err(OrderError::Order(format!("an authorization is {other:?}")));
            }
        }
        let mut challenge = a
            .challenge(kind.clone())
            .ok_or_else(|| OrderError::Order(format!("the CA offers no {kind_name} challenge")))?;
        let token = challenge.token.clone();
        let domain = challenge.identifier().to_string();
        let rec = ChallengeRecord {
            name: name.to_string(),
            domain: domain.clone(),
            kind: kind_name.to_string(),
            key_authorization: challenge.key_authorization().as_str().to_string(),
        };
        let k = challenge_key(ctx.prefix, &token);
        ctx.client
            .put(
                k.as_str(),
                to_json(&rec),
                Some(PutOptions::new().with_lease(ctx.lease)),
            )
            .await?;
        tokens.push(token.clone());
        wait_published(ctx.snapshot, &token).await;
        tracing::info!(
            certificate = name,
            domain,
            challenge = kind_name,
            "ACME challenge published to every node"
        );
        challenge.set_ready().await?;
    }
    let retry = RetryPolicy::new().timeout(POLL_TIMEOUT);
    let status = order.poll_ready(&retry).await?;
    if status != OrderStatus::Ready {
        return Err(OrderError::Order(format!(
            "the order is {status:?} after validation"
        )));
    }
    let key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&retry).await?;
    let (not_before, not_after, issuer) = leaf_info(&chain_pem).map_err(OrderError::Order)?;
    let key = seal::seal_random(ctx.key, &cert_key(ctx.prefix, name), key_pem.as_bytes())
        .map_err(|e| OrderError::Order(e.to_string()))?;
    Ok(CertRecord {
        domains: domains.to_vec(),
        chain_pem,
        key,
        not_before,
        not_after,
        issuer,
        node: ctx.node.to_string(),
    })
}

/// Waits (bounded) until this node's snapshot answers `token`, then a short grace for the
/// other nodes.
async fn wait_published(snapshot: &SharedSnapshot, token: &str) {
    let deadline = tokio::time::Instant::now() + PUBLISH_WITHIN;
    while tokio::time::Instant::now() < deadline {
        let s = snapshot.load();
        if s.acme.http01.contains_key(token) || s.acme.has_challenge(token) {
            break;
        }
        drop(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(PUBLISH_GRACE).await;
}

/// NOT BEFORE, NOT AFTER (Unix seconds) and issuer of the first certificate of a PEM chain.
pub fn leaf_info(chain_pem: &str) -> Result<(u64, u64, String), String> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("the CA sent no certificate")?
        .map_err(|e| format!("the CA's certificate chain: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)
        .map_err(|e| format!("the CA's certificate: {e}"))?;
    let v = cert.validity();
    let secs = |t: x509_parser::time::ASN1Time| t.timestamp().max(0) as u64;
    Ok((
        secs(v.not_before),
        secs(v.not_after),
        cert.issuer().to_string(),
    ))
}
