//! Request authentication, as the Go cdc-sink does it (README.md, "Securing the sink"): a JWT
//! from the `Authorization: Bearer` header or the `access_token` parameter, signed
//! (ES256/384/512, RS256/384/512) by an active key of the staging table `jwt_public_keys`, not
//! revoked in `jwt_revoked_ids`, and listing the request's schema. Keys and revocations are
//! cached: loaded at start, reloaded every `--jwtRefresh` and on SIGHUP. With
//! `--disableAuthentication` every request is accepted (and a listener beyond loopback says so
//! every hour).

pub mod claims;
mod es512;
pub mod keys;
pub(crate) mod token;

use crate::config::parse_duration;
use crate::ident::Schema;
use crate::metrics as m;
use crate::stage::StagingSchema;
use crate::target::Database;
use keys::{Alg, KeySet, Tables, VerifyFailure};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::AbortHandle;

/// How often an open listener beyond loopback is reported.
const OPEN_WARNING_EVERY: Duration = Duration::from_secs(3600);

#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct AuthArgs {
    /// Accept every request without a token (only behind a trusted network).
    #[arg(
        long = "disableAuthentication",
        env = "CDC_SINK_DISABLE_AUTHENTICATION",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        default_value = "false",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(crate) disable_authentication: bool,
    /// NAME=db.schema: a client certificate whose DNS or IP subject alternative name, or subject common name, is NAME may write db.schema without a token (`*` matches a part; repeat or comma-separate; needs --tlsClientCA)
    #[arg(
        long = "tlsClientSchemas",
        env = "CDC_SINK_TLS_CLIENT_SCHEMAS",
        value_delimiter = ','
    )]
    pub(crate) tls_client_schemas: Vec<String>,
    /// How often JWT keys and revocations are reloaded (0 disables; SIGHUP reloads too).
    #[arg(long = "jwtRefresh", env = "CDC_SINK_JWT_REFRESH", default_value = "1m0s", value_parser = parse_duration)]
    pub(crate) jwt_refresh: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("could not create the jwt tables")]
    Ddl(#[source] sqlx::Error),
    #[error("could not load jwt keys")]
    Load(#[source] sqlx::Error),
    #[error("jwt_public_keys row {id}: {reason}")]
    BadKey { id: String, reason: String },
    #[error("invalid --tlsClientSchemas {entry:?}: {reason}")]
    ClientSchemas { entry: String, reason: &'static str },
}

/// A client certificate name and a schema it may write.
#[derive(Debug, Clone)]
struct CertGrant {
    /// The name as given, compared with the subject common name.
    name: String,
    /// The name as a DNS name or IP address, compared with the subject alternative names;
    /// None when it is neither (a common name such as `feed client`).
    san: Option<rustls_pki_types::ServerName<'static>>,
    schema: Vec<String>,
}

impl AuthArgs {
    pub(crate) fn validate(&self) -> Result<(), AuthError> {
        self.cert_grants().map(drop)
    }

    fn cert_grants(&self) -> Result<Vec<CertGrant>, AuthError> {
        self.tls_client_schemas
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|entry| {
                let bad = |reason| AuthError::ClientSchemas {
                    entry: entry.clone(),
                    reason,
                };
                let (name, schema) = entry
                    .trim()
                    .split_once('=')
                    .ok_or_else(|| bad("expected NAME=db.schema"))?;
                let name = name.trim();
                if name.is_empty() {
                    return Err(bad("expected NAME=db.schema"));
                }
                let san = rustls_pki_types::ServerName::try_from(name.to_string()).ok();
                let parts = crate::ident::parse_dotted(schema)
                    .map_err(|_| bad("expected NAME=db.schema"))?;
                if parts.len() != 2 {
                    return Err(bad("expected NAME=db.schema"));
                }
                Ok(CertGrant {
                    name: name.to_string(),
                    san,
                    schema: parts.iter().map(|p| p.raw().to_string()).collect(),
                })
            })
            .collect()
    }
}

/// Whether a (handshake-verified) client certificate has a name granted `schema`: a DNS or IP
/// subject alternative name as TLS checks it (wildcard DNS names in the certificate match), or
/// a subject common name equal to the granted name (ASCII case ignored, no wildcards).
fn cert_grants_schema(
    grants: &[CertGrant],
    der: &rustls_pki_types::CertificateDer<'_>,
    schema: &Schema,
) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let common_names = subject_common_names(der);
    grants.iter().any(|g| {
        claims::matches(&g.schema, schema)
            && (g
                .san
                .as_ref()
                .is_some_and(|n| cert.verify_is_valid_for_subject_name(n).is_ok())
                || common_names
                    .iter()
                    .any(|cn| cn.eq_ignore_ascii_case(&g.name)))
    })
}

/// The `commonName` values of a certificate's subject that are UTF8String, PrintableString
/// or IA5String (what CAs write); empty if the certificate cannot be read.
fn subject_common_names(der: &[u8]) -> Vec<String> {
    use keys::{expect, tlv, CONTEXT_0, INTEGER, OID, SEQUENCE};
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    const SET: u8 = 0x31;
    let subject = || -> Option<&[u8]> {
        let (cert, _) = expect(der, SEQUENCE)?;
        let (tbs, _) = expect(cert, SEQUENCE)?;
        let tbs = match tlv(tbs)? {
            (CONTEXT_0, _, rest) => rest,
            _ => tbs,
        };
        let (_, rest) = expect(tbs, INTEGER)?; // serial
        let (_, rest) = expect(rest, SEQUENCE)?; // signature algorithm
        let (_, rest) = expect(rest, SEQUENCE)?; // issuer
        let (_, rest) = expect(rest, SEQUENCE)?; // validity
        expect(rest, SEQUENCE).map(|(subject, _)| subject)
    };
    let mut names = Vec::new();
    let mut rdns = subject().unwrap_or_default();
    while let Some((set, rest)) = expect(rdns, SET) {
        rdns = rest;
        let mut atvs = set;
        while let Some((atv, rest)) = expect(atvs, SEQUENCE) {
            atvs = rest;
            let Some((OID_CN, value)) = expect(atv, OID) else {
                continue;
            };
            if let Some((0x0c | 0x13 | 0x16, text, _)) = tlv(value) {
                if let Ok(text) = std::str::from_utf8(text) {
                    names.push(text.to_string());
                }
            }
        }
    }
    names
}

/// Why a request was refused; its reason is the 401 body, its label the metric's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    MissingToken,
    Malformed,
    Algorithm,
    Signature,
    Claims,
    Expired,
    NotYetValid,
    IssuedInFuture,
    MissingJti,
    NoSchemas,
    Revoked,
    Schema,
}

impl Denied {
    /// One line for the client; never contains the token.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Denied::MissingToken => "no bearer token or access_token",
            Denied::Malformed => "token is malformed",
            Denied::Algorithm => {
                "signing algorithm not accepted (ES256, ES384, ES512, RS256, RS384, RS512)"
            }
            Denied::Signature => "no active key verifies the token",
            Denied::Claims => "token claims are malformed",
            Denied::Expired => "token is expired",
            Denied::NotYetValid => "token is not valid yet",
            Denied::IssuedInFuture => "token used before issued",
            Denied::MissingJti => "id field is required",
            Denied::NoSchemas => "no cdc-sink.schemas defined",
            Denied::Revoked => "token is revoked",
            Denied::Schema => "token does not grant this schema",
        }
    }

    /// The bounded `reason` label of the auth metric.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Denied::MissingToken => "missing_token",
            Denied::Malformed => "malformed",
            Denied::Algorithm => "algorithm",
            Denied::Signature => "signature",
            Denied::Claims => "claims",
            Denied::Expired => "expired",
            Denied::NotYetValid => "not_yet_valid",
            Denied::IssuedInFuture => "issued_in_future",
            Denied::MissingJti => "missing_jti",
            Denied::NoSchemas => "no_schemas",
            Denied::Revoked => "revoked",
            Denied::Schema => "schema",
        }
    }
}

/// Decides whether a request may write to a schema. Cheap to clone; the background tasks
/// (key refresh, open-listener warning) stop when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Authenticator {
    jwt: Option<Arc<Jwt>>,
    cert_grants: Arc<Vec<CertGrant>>,
    _tasks: Arc<Tasks>,
}

struct Jwt {
    staging: Database,
    tables: Tables,
    keys: RwLock<Arc<KeySet>>,
}

#[derive(Default)]
struct Tasks(Mutex<Vec<AbortHandle>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

impl Tasks {
    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(fut).abort_handle();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Whether `bind_addr` (`host:port`) listens on loopback only; every interface (`:port`) and
/// names other than `localhost` count as reachable from elsewhere.
pub(crate) fn is_loopback_bind(bind_addr: &str) -> bool {
    let host = bind_addr
        .trim()
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or("");
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Authenticator {
    /// With authentication on: creates the key tables, loads the key set (failure stops the
    /// start) and starts the refresh task. Off: warns when the listener is reachable from
    /// other hosts, now and every hour.
    pub(crate) async fn open(
        args: &AuthArgs,
        bind_addr: &str,
        staging: &Database,
        schema: &StagingSchema,
    ) -> Result<Authenticator, AuthError> {
        let tasks = Arc::new(Tasks::default());
        let cert_grants = Arc::new(args.cert_grants()?);
        metrics::gauge!(m::AUTH_DISABLED).set(f64::from(u8::from(args.disable_authentication)));
        if args.disable_authentication {
            if is_loopback_bind(bind_addr) {
                tracing::info!("authentication disabled: every request is accepted");
            } else {
                let addr = bind_addr.to_string();
                tasks.spawn(async move {
                    let mut every = tokio::time::interval(OPEN_WARNING_EVERY);
                    loop {
                        every.tick().await;
                        tracing::warn!(bind_addr = %addr, "authentication disabled on a listener reachable from other hosts: anyone who reaches it can write any schema");
                    }
                });
            }
            return Ok(Authenticator {
                jwt: None,
                cert_grants,
                _tasks: tasks,
            });
        }
        let tables = Tables::new(schema);
        crate::target::run_ddl(staging, &tables.ddl(staging.dialect))
            .await
            .map_err(AuthError::Ddl)?;
        let set = tables.load(staging).await?;
        note_refresh(&set);
        let jwt = Arc::new(Jwt {
            staging: staging.clone(),
            tables,
            keys: RwLock::new(Arc::new(set)),
        });
        // Registered before start returns, so an early SIGHUP cannot take the default action
        // (ending the process).
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %crate::error::ErrorChain(&e), "cannot listen for SIGHUP; jwt keys reload on the timer only");
                None
            }
        };
        tasks.spawn(refresh_loop(Arc::downgrade(&jwt), args.jwt_refresh, hangup));
        Ok(Authenticator {
            jwt: Some(jwt),
            cert_grants,
            _tasks: tasks,
        })
    }

    /// Whether the request may write to `schema`: a client certificate mapped to it by
    /// `--tlsClientSchemas`, else a token. Records the verdict in the metrics.
    pub(crate) fn check(
        &self,
        headers: &http::HeaderMap,
        access_token: Option<&str>,
        client_cert: Option<&rustls_pki_types::CertificateDer<'_>>,
        schema: &Schema,
    ) -> Result<(), Denied> {
        let accept = |reason: &'static str| {
            metrics::counter!(m::AUTH_REQUESTS, m::LABEL_RESULT => "accepted", m::LABEL_REASON => reason)
                .increment(1);
            Ok(())
        };
        let Some(jwt) = &self.jwt else {
            return accept("disabled");
        };
        if client_cert.is_some_and(|c| cert_grants_schema(&self.cert_grants, c, schema)) {
            return accept("client_certificate");
        }
        let verdict = token::bearer(headers, access_token)
            .ok_or(Denied::MissingToken)
            .and_then(|t| jwt.verify(t, schema));
        let (result, reason) = match verdict {
            Ok(()) => ("accepted", "token"),
            Err(d) => ("denied", d.label()),
        };
        metrics::counter!(m::AUTH_REQUESTS, m::LABEL_RESULT => result, m::LABEL_REASON => reason)
            .increment(1);
        verdict
    }
}

/// The `alg` of a compact JWS with exactly three parts.
fn header_alg(token: &str) -> Result<Alg, Denied> {
    use base64::Engine as _;
    let parts: Vec<&str> = token.split('.').collect();
    let [header, _, _] = parts.as_slice() else {
        return Err(Denied::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Denied::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| Denied::Malformed)?;
    let alg = header
        .get("alg")
        .and_then(|a| a.as_str())
        .ok_or(Denied::Malformed)?;
    // `none`, HMAC (whose secret would be a public key) and the rest are refused here.
    Alg::from_name(alg).ok_or(Denied::Algorithm)
}

impl Jwt {
    fn verify(&self, token: &str, schema: &Schema) -> Result<(), Denied> {
        let alg = header_alg(token)?;
        let set = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut malformed = false;
        let verified = set
            .keys
            .iter()
            .filter(|k| k.algs.contains(&alg))
            .find_map(|k| match k.verify(token, alg) {
                Ok(claims) => Some(claims),
                Err(f) => {
                    malformed |= f == VerifyFailure::Malformed;
                    None
                }
            });
        let Some(claims) = verified else {
            return Err(if malformed {
                Denied::Malformed
            } else {
                Denied::Signature
            });
        };
        let claims = claims::Claims::parse(&claims, now_secs())?;
        if set.revoked.contains(&claims.jti) {
            return Err(Denied::Revoked);
        }
        if claims.grants(schema) {
            Ok(())
        } else {
            Err(Denied::Schema)
        }
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        match self.tables.load(&self.staging).await {
            Ok(set) => {
                note_refresh(&set);
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                Ok(())
            }
            Err(e) => {
                metrics::counter!(m::JWT_REFRESH_ERRORS).increment(1);
                tracing::warn!(error = %crate::error::ErrorChain(&e), "jwt key refresh failed; keeping the previous keys");
                Err(e)
            }
        }
    }
}

fn note_refresh(set: &KeySet) {
    metrics::gauge!(m::JWT_LAST_REFRESH_TIME).set(now_secs());
    tracing::debug!(
        keys = set.keys.len(),
        revoked = set.revoked.len(),
        "jwt keys loaded"
    );
}

/// Reloads every `every` (0: never) and on SIGHUP, until the authenticator is gone.
async fn refresh_loop(
    jwt: Weak<Jwt>,
    every: Duration,
    mut hangup: Option<tokio::signal::unix::Signal>,
) {
    let mut tick = (!every.is_zero())
        .then(|| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    loop {
        tokio::select! {
            _ = async { match &mut tick { Some(t) => { t.tick().await; } None => std::future::pending().await } } => {}
            _ = async { match &mut hangup { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                tracing::info!("sighup: reloading jwt keys");
            }
        }
        let Some(jwt) = jwt.upgrade() else { return };
        // Failures are logged and counted inside.
        let _ = jwt.refresh().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_binds_are_told_from_open_ones() {
        for a in ["127.0.0.1:0", "[::1]:26258", "localhost:1", "127.0.0.2:5"] {
            assert!(is_loopback_bind(a), "{a}");
        }
        for a in [
            ":26258",
            "0.0.0.0:1",
            "[::]:1",
            "10.0.0.1:1",
            "sink.example:1",
        ] {
            assert!(!is_loopback_bind(a), "{a}");
        }
    }

    #[test]
    fn only_the_reference_algorithms_are_accepted() {
        use base64::Engine as _;
        let tok = |header: &str| {
            format!(
                "{}.e30.sig",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header)
            )
        };
        for alg in ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512"] {
            assert_eq!(
                header_alg(&tok(&format!(r#"{{"alg":"{alg}"}}"#))).map(Alg::name),
                Ok(alg)
            );
        }
        for alg in ["none", "HS256", "HS512", "PS256", "EdDSA", "es512", "ES521"] {
            assert_eq!(
                header_alg(&tok(&format!(r#"{{"alg":"{alg}"}}"#))),
                Err(Denied::Algorithm),
                "{alg}"
            );
        }
        assert_eq!(header_alg("a.b"), Err(Denied::Malformed));
        assert_eq!(header_alg("a.b.c.d"), Err(Denied::Malformed));
        assert_eq!(header_alg("!!.e30.x"), Err(Denied::Malformed));
        assert_eq!(header_alg(&tok(r#"{"typ":"JWT"}"#)), Err(Denied::Malformed));
    }

    #[test]
    fn client_certificate_names_map_to_schemas() {
        let args = |v: &[&str]| AuthArgs {
            tls_client_schemas: v.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let grants = args(&["feed.example=kv.public", "10.0.0.1=kv.*"])
            .cert_grants()
            .expect("valid");
        let cert = |san: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let params = rcgen::CertificateParams::new(vec![san.to_string()]).expect("params");
            params.self_signed(&key).expect("cert").der().clone()
        };
        let kv = Schema::new("KV", "public");
        assert!(cert_grants_schema(&grants, &cert("feed.example"), &kv));
        assert!(!cert_grants_schema(
            &grants,
            &cert("feed.example"),
            &Schema::new("kv", "x")
        ));
        assert!(cert_grants_schema(
            &grants,
            &cert("10.0.0.1"),
            &Schema::new("kv", "x")
        ));
        assert!(!cert_grants_schema(&grants, &cert("other.example"), &kv));
        for bad in [
            "feed.example",
            "feed.example=kv",
            "=kv.public",
            " =kv.public",
        ] {
            assert!(args(&[bad]).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn client_certificate_common_names_map_to_schemas() {
        let grants = AuthArgs {
            tls_client_schemas: vec!["Feed Client=kv.public".into(), "feed-2=kv.*".into()],
            ..Default::default()
        }
        .cert_grants()
        .expect("valid");
        let cert = |cn: &str, san: &str| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::new(vec![san.to_string()]).expect("params");
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, "feed-2");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            params.self_signed(&key).expect("cert").der().clone()
        };
        let kv = Schema::new("kv", "public");
        assert_eq!(
            subject_common_names(&cert("Feed Client", "x.example")),
            vec!["Feed Client"]
        );
        assert!(subject_common_names(b"not a certificate").is_empty());
        // The CN alone grants; case is ignored, the whole name must match.
        assert!(cert_grants_schema(
            &grants,
            &cert("feed client", "x.example"),
            &kv
        ));
        assert!(!cert_grants_schema(
            &grants,
            &cert("Feed Client 2", "x.example"),
            &kv
        ));
        assert!(!cert_grants_schema(
            &grants,
            &cert("Feed Client", "x.example"),
            &Schema::new("other", "public")
        ));
        // A DNS-shaped grant matches the CN too, and only the CN: other subject parts do not.
        assert!(cert_grants_schema(
            &grants,
            &cert("FEED-2", "x.example"),
            &Schema::new("kv", "s")
        ));
        assert!(!cert_grants_schema(
            &grants,
            &cert("other", "x.example"),
            &Schema::new("kv", "s")
        ));
    }

    #[test]
    fn reasons_never_repeat_input() {
        // Static texts only: nothing a client sent can come back in a 401.
        for d in [Denied::MissingToken, Denied::Malformed, Denied::Schema] {
            assert!(!d.reason().is_empty() && !d.label().contains(' '));
        }
    }
}
