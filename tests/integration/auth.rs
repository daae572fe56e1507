//! JWT authentication on a real sink, as the Go cdc-sink does it: what is refused and why, keys
//! and revocations picked up while running (timer and SIGHUP), the token kept out of logs, and
//! `make-jwt` round trips for every key form.

use crate::support::http::{args as server_args, TestServer};
use crate::support::process::{free_port, Process};
use crate::support::sink::{batch, upsert, Sink};
use crate::support::{eventually, Db};
use base64::Engine as _;
use bytes::Bytes;
use cdc_sink::auth::claims::{NAMESPACE, NAMESPACE_LEGACY};
use cdc_sink::auth::keys::parse_private_key;
use cdc_sink::cli::make_jwt;
use cdc_sink::server::{Client, ClientOptions};
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const EMPTY: &str = r#"{"payload":[],"length":0}"#;
const DENIED: &str = "missing or invalid access token: ";

async fn db_with_kv(name: &str) -> Db {
    let db = Db::new(name).await;
    db.exec("CREATE TABLE public.kv (k INT8 PRIMARY KEY, v TEXT)")
        .await;
    db
}

fn client(addr: SocketAddr, authorization: Option<&str>) -> Client {
    Client::new(
        &format!("https://{addr}"),
        ClientOptions {
            insecure_skip_verify: true,
            headers: authorization
                .map(|a| vec![("authorization".to_string(), a.to_string())])
                .unwrap_or_default(),
            ..Default::default()
        },
    )
    .expect("client")
}

/// Posts `body` with `Authorization: Bearer token` (or no header).
async fn post(
    addr: SocketAddr,
    token: Option<&str>,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    client(addr, auth.as_deref())
        .post(path, Bytes::from(body.to_string()))
        .await
        .expect("request reaches the sink")
}

/// Asserts a 401 whose one-line body gives `reason` and does not repeat the token.
async fn refused(addr: SocketAddr, token: Option<&str>, path: &str, reason: &str) {
    let (status, body) = post(addr, token, path, EMPTY).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body, format!("{DENIED}{reason}\n"));
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        assert!(!body.contains(t), "the 401 body repeats the token");
    }
}

async fn accepted(addr: SocketAddr, token: &str, path: &str) {
    let (status, body) = post(addr, Some(token), path, EMPTY).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "OK\n"));
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A P-256 key pair made by the crate: (private PKCS#8 PEM, public SPKI PEM).
fn p256() -> (String, String) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    (pair.serialize_pem(), pair.public_key_pem())
}

fn sign(private_pem: &str, claims: &Value) -> String {
    let key = parse_private_key(private_pem.as_bytes()).expect("private key");
    key.sign(claims).expect("sign")
}

fn claims(ns: &str, schemas: Value) -> Value {
    json!({"jti": uuid::Uuid::new_v4().to_string(), "iss": "cdc-sink", ns: {"schemas": schemas}})
}

async fn install_key(db: &Db, public_pem: &str) {
    sqlx::query("INSERT INTO _cdc_sink.jwt_public_keys (public_key) VALUES ($1)")
        .bind(public_pem)
        .execute(&db.pool)
        .await
        .expect("install key");
}

async fn revoke(db: &Db, token: &str) {
    let payload = token.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64");
    let claims: Value = serde_json::from_slice(&bytes).expect("json");
    sqlx::query("INSERT INTO _cdc_sink.jwt_revoked_ids (id) VALUES ($1)")
        .bind(claims["jti"].as_str().expect("jti"))
        .execute(&db.pool)
        .await
        .expect("revoke");
}

/// Polls until a request with `token` gets `want`.
async fn until_status(addr: SocketAddr, token: &str, want: StatusCode, what: &str) {
    eventually(what, Duration::from_secs(10), || async {
        (post(addr, Some(token), "/auth_t/public", EMPTY).await.0 == want).then_some(())
    })
    .await
}

fn auth_flags(refresh: &str) -> Vec<String> {
    vec![
        "--disableAuthentication=false".to_string(),
        format!("--jwtRefresh={refresh}"),
    ]
}

#[tokio::test]
async fn tokens_are_verified_as_the_reference_does() {
    let db = db_with_kv("auth_t").await;
    let flags = auth_flags("100ms");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sink = Sink::start(&db, &flags).await;
    let addr = sink.addr();
    let path = "/auth_t/public";
    let (private, public) = p256();
    install_key(&db, &public).await;
    let good = make_jwt::token(private.as_bytes(), &["auth_t.public".into()], None).expect("mint");
    // Picked up by the timed refresh.
    until_status(addr, &good, StatusCode::OK, "the new key").await;

    // A real write goes through with the token, by header and by query parameter.
    let row = batch(vec![upsert("kv", json!([1]), json!({"k": 1, "v": "a"}), 1)]);
    let (status, body) = post(addr, Some(&good), path, &row).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = client(addr, None)
        .post(&format!("{path}?access_token={good}"), Bytes::from(EMPTY))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::OK);
    // An Authorization header of another scheme hides the query parameter.
    let (status, body) = client(addr, Some("Basic dXNlcjpwdw=="))
        .post(&format!("{path}?access_token={good}"), Bytes::from(EMPTY))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, format!("{DENIED}no bearer token or access_token\n"));

    refused(addr, None, path, "no bearer token or access_token").await;
    refused(addr, Some("abc"), path, "token is malformed").await;
    let parts: Vec<&str> = good.split('.').collect();
    refused(
        addr,
        Some(&parts[..2].join(".")),
        path,
        "token is malformed",
    )
    .await;
    refused(addr, Some(&format!("{good}.x")), path, "token is malformed").await;

    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let body_claims = claims(NAMESPACE_LEGACY, json!([["auth_t", "public"]]));
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&body_claims)
    );
    let algs = "signing algorithm not accepted (ES256, ES384, ES512, RS256, RS384, RS512)";
    refused(addr, Some(&none), path, algs).await;
    // The classic confusion: HMAC keyed with the public key text.
    let hs256 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &body_claims,
        &EncodingKey::from_secret(public.as_bytes()),
    )
    .expect("hs256");
    refused(addr, Some(&hs256), path, algs).await;

    let mut expired = claims(NAMESPACE_LEGACY, json!([["auth_t", "public"]]));
    expired["exp"] = json!(now() - 60);
    refused(
        addr,
        Some(&sign(&private, &expired)),
        path,
        "token is expired",
    )
    .await;
    let mut early = claims(NAMESPACE_LEGACY, json!([["auth_t", "public"]]));
    early["nbf"] = json!(now() + 3600);
    refused(
        addr,
        Some(&sign(&private, &early)),
        path,
        "token is not valid yet",
    )
    .await;
    let mut no_jti = claims(NAMESPACE_LEGACY, json!([["auth_t", "public"]]));
    no_jti.as_object_mut().expect("object").remove("jti");
    refused(
        addr,
        Some(&sign(&private, &no_jti)),
        path,
        "id field is required",
    )
    .await;
    let no_schemas = json!({"jti": "x", "iss": "cdc-sink"});
    refused(
        addr,
        Some(&sign(&private, &no_schemas)),
        path,
        "no cdc-sink.schemas defined",
    )
    .await;

    let schema_reason = "token does not grant this schema";
    let other = sign(
        &private,
        &claims(NAMESPACE_LEGACY, json!([["other", "public"]])),
    );
    refused(addr, Some(&other), path, schema_reason).await;
    let one_part = sign(&private, &claims(NAMESPACE_LEGACY, json!([["auth_t"]])));
    refused(addr, Some(&one_part), path, schema_reason).await;
    let star = sign(
        &private,
        &claims(NAMESPACE_LEGACY, json!([["AUTH_T", "*"]])),
    );
    accepted(addr, &star, path).await;
    let stars = sign(&private, &claims(NAMESPACE_LEGACY, json!([["*", "*"]])));
    accepted(addr, &stars, path).await;
    let newer = sign(&private, &claims(NAMESPACE, json!([["auth_t", "public"]])));
    accepted(addr, &newer, path).await;
    let expiring = make_jwt::token(
        private.as_bytes(),
        &["auth_t.*".into()],
        Some(Duration::from_secs(3600)),
    )
    .expect("mint");
    accepted(addr, &expiring, path).await;

    // A key nobody installed, then installed while running.
    let (private_b, public_b) = p256();
    let by_b =
        make_jwt::token(private_b.as_bytes(), &["auth_t.public".into()], None).expect("mint");
    refused(addr, Some(&by_b), path, "no active key verifies the token").await;
    install_key(&db, &public_b).await;
    until_status(addr, &by_b, StatusCode::OK, "a key added while running").await;

    // Revoked while running.
    revoke(&db, &good).await;
    until_status(addr, &good, StatusCode::UNAUTHORIZED, "a revocation").await;
    refused(addr, Some(&good), path, "token is revoked").await;
    accepted(addr, &by_b, path).await;

    // A bad key row fails the refresh; the previous set stays in force.
    db.exec("INSERT INTO _cdc_sink.jwt_public_keys (public_key) VALUES ('not a key')")
        .await;
    eventually("a failed refresh", Duration::from_secs(10), || async {
        let text = sink.metrics().await;
        text.lines()
            .any(|l| l.starts_with("jwt_refresh_errors_total ") && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
    accepted(addr, &by_b, path).await;
    refused(addr, Some(&good), path, "token is revoked").await;

    let text = sink.metrics().await;
    for reason in [
        "token",
        "expired",
        "revoked",
        "algorithm",
        "schema",
        "missing_token",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with("auth_requests_total{")
                && l.contains(&format!("reason=\"{reason}\""))),
            "auth_requests_total with reason {reason}"
        );
    }
    assert!(text
        .lines()
        .any(|l| l.starts_with("jwt_last_refresh_time ")));
    sink.stop().await;

    // At start a bad key row is fatal.
    let argv = cdc_sink::sink::loopback_argv(&db.url(), &flags);
    let err = match cdc_sink::sink::launch(cdc_sink::sink::prepare(argv).expect("flags")).await {
        Ok(_) => panic!("a sink started with a bad key row"),
        // With its causes, as the command line prints it.
        Err(e) => cdc_sink::error::ErrorChain(&e).to_string(),
    };
    assert!(err.contains("jwt_public_keys row"), "{err}");
}

#[tokio::test]
async fn the_access_token_parameter_is_taken_out_of_the_query() {
    let srv = TestServer::start(server_args()).await;
    let (status, _) = srv
        .client(true)
        .post(
            "/db/public?x=1&access_token=s3cret.tok.en&y=2",
            Bytes::from(EMPTY),
        )
        .await
        .expect("post");
    assert_eq!(status, StatusCode::OK);
    let seen = srv.handler.requests();
    assert_eq!(seen[0].query.as_deref(), Some("x=1&y=2"));
    assert_eq!(seen[0].access_token.as_deref(), Some("s3cret.tok.en"));
    assert!(!format!("{:?}", seen[0]).contains("s3cret"));
    srv.shutdown().await;
}

fn sighup(p: &Process) {
    let pid = i32::try_from(p.child.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "SIGHUP");
}

#[tokio::test]
async fn sighup_reloads_keys_in_the_real_binary_and_tokens_stay_out_of_its_log() {
    let db = db_with_kv("auth_p").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("sink.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let port = free_port();
    let p = Process::start_logging(
        &db,
        port,
        &["--disableAuthentication=false", "--jwtRefresh=0", "-v"],
        log.into(),
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let path = "/auth_p/public";
    let (private, public) = p256();
    let token = make_jwt::token(private.as_bytes(), &["auth_p.public".into()], None).expect("mint");
    install_key(&db, &public).await;
    // No timer: the key stays unknown until SIGHUP.
    refused(addr, Some(&token), path, "no active key verifies the token").await;
    sighup(&p);
    eventually("sighup loads the key", Duration::from_secs(10), || async {
        (post(addr, Some(&token), path, EMPTY).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let (status, _) = client(addr, None)
        .post(&format!("{path}?access_token={token}"), Bytes::from(EMPTY))
        .await
        .expect("post");
    assert_eq!(status, StatusCode::OK);
    revoke(&db, &token).await;
    accepted(addr, &token, path).await;
    sighup(&p);
    eventually(
        "sighup loads the revocation",
        Duration::from_secs(10),
        || async {
            (post(addr, Some(&token), path, EMPTY).await.0 == StatusCode::UNAUTHORIZED)
                .then_some(())
        },
    )
    .await;
    let (status, _) = client(addr, None)
        .post(
            &format!("{path}?access_token={token}&x=1"),
            Bytes::from(EMPTY),
        )
        .await
        .expect("post");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    drop(p);
    let text = std::fs::read_to_string(&log_path).expect("log");
    assert!(text.contains("sighup: reloading jwt keys"), "{text}");
    assert!(text.contains("changefeed request refused"), "{text}");
    assert!(!text.contains(&token), "the token reached the log");
    assert!(
        !text.contains("access_token="),
        "the query parameter reached the log"
    );
}

#[tokio::test]
async fn an_open_listener_beyond_loopback_is_reported() {
    let db = db_with_kv("auth_o").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("sink.log");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args([
            "start",
            "--bindAddr",
            &format!(":{port}"),
            "--tlsSelfSigned",
        ])
        .args(["--disableAuthentication", "--targetConn", &db.url()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn");
    let _child = KillOnDrop(child);
    let c = client(format!("127.0.0.1:{port}").parse().expect("addr"), None);
    let varz = eventually("sink metrics", Duration::from_secs(30), || async {
        match c.get("/_/varz").await {
            Ok((StatusCode::OK, text)) => Some(text),
            _ => None,
        }
    })
    .await;
    assert!(varz.lines().any(|l| l == "auth_disabled 1"), "{varz}");
    eventually("the warning", Duration::from_secs(10), || async {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains("authentication disabled on a listener reachable from other hosts")
            .then_some(())
    })
    .await;
}

/// Stops the child even when the test panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs openssl, which writes the key forms the reference reads.
fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (it comes with the postgresql packages)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (private key file, PEM label it must carry, public key PEM, expected alg).
fn openssl_keys(dir: &Path) -> Vec<(PathBuf, &'static str, String, &'static str)> {
    let mut out = Vec::new();
    let p = |n: &str| dir.join(n).to_string_lossy().to_string();
    for (name, gen, alg) in [
        (
            "p256",
            vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "ES256",
        ),
        (
            "p384",
            vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
            "ES384",
        ),
        (
            "p521",
            vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
            "ES512",
        ),
        (
            "rsa",
            vec!["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            "RS256",
        ),
    ] {
        let pkcs8 = p(&format!("{name}.pkcs8.pem"));
        let mut args = vec!["genpkey"];
        args.extend(gen);
        args.extend(["-out", &pkcs8]);
        openssl(&args);
        let public = p(&format!("{name}.pub.pem"));
        openssl(&["pkey", "-in", &pkcs8, "-pubout", "-out", &public]);
        let public = std::fs::read_to_string(&public).expect("public key");
        let (legacy, label) = if name == "rsa" {
            let f = p("rsa.pkcs1.pem");
            openssl(&["rsa", "-in", &pkcs8, "-traditional", "-out", &f]);
            (f, "RSA PRIVATE KEY")
        } else {
            let f = p(&format!("{name}.sec1.pem"));
            openssl(&["ec", "-in", &pkcs8, "-out", &f]);
            (f, "EC PRIVATE KEY")
        };
        out.push((pkcs8.into(), "PRIVATE KEY", public.clone(), alg));
        out.push((legacy.into(), label, public, alg));
    }
    out
}

/// The `alg` of a token's header (read by hand: `jsonwebtoken` has no ES512).
fn header_alg(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .expect("base64");
    let header: Value = serde_json::from_slice(&header).expect("json");
    header["alg"].as_str().expect("alg").to_string()
}

#[tokio::test]
async fn make_jwt_round_trips_for_every_key_form() {
    let db = db_with_kv("auth_m").await;
    let flags = auth_flags("100ms");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sink = Sink::start(&db, &flags).await;
    let addr = sink.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = openssl_keys(dir.path());
    for (_, _, public, _) in keys.iter().step_by(2) {
        install_key(&db, public).await;
    }
    let bin = env!("CARGO_BIN_EXE_cdc-sink");
    for (i, (key, label, _, alg)) in keys.iter().enumerate() {
        let pem = std::fs::read_to_string(key).expect("key");
        assert!(
            pem.contains(&format!("BEGIN {label}-----")),
            "{key:?} is {label}"
        );
        let out = dir.path().join(format!("{i}.jwt"));
        let status = Command::new(bin)
            .args(["make-jwt", "-k"])
            .arg(key)
            .args(["-a", "auth_m.public,other.*", "--expires", "720h", "-o"])
            .arg(&out)
            .status()
            .expect("make-jwt");
        assert!(status.success(), "make-jwt with {key:?}");
        let token = std::fs::read_to_string(&out).expect("token");
        let token = token.trim();
        assert_eq!(header_alg(token), *alg, "{key:?}");
        until_status_at(addr, token, "/auth_m/public", StatusCode::OK, key).await;
        refused(
            addr,
            Some(token),
            "/auth_m/other",
            "token does not grant this schema",
        )
        .await;
    }

    // --claim prints the unsigned claims; no key needed.
    let out = Command::new(bin)
        .args(["make-jwt", "--claim", "-a", "auth_m.public"])
        .output()
        .expect("make-jwt --claim");
    let claim: Value = serde_json::from_slice(&out.stdout).expect("claim json");
    assert_eq!(
        claim[NAMESPACE_LEGACY]["schemas"],
        json!([["auth_m", "public"]])
    );
    assert_eq!(claim["iss"], "cdc-sink");

    // --generate-key: a key pair, the SQL that installs it, and a token.
    let key = dir.path().join("gen.pem");
    let jwt = dir.path().join("gen.jwt");
    let out = Command::new(bin)
        .args(["make-jwt", "--generate-key", "-k"])
        .arg(&key)
        .args(["-a", "auth_m.public", "-o"])
        .arg(&jwt)
        .output()
        .expect("make-jwt --generate-key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(dir.path().join("gen.pub.pem").exists());
    let token = std::fs::read_to_string(&jwt).expect("token");
    let token = token.trim();
    refused(
        addr,
        Some(token),
        "/auth_m/public",
        "no active key verifies the token",
    )
    .await;
    db.exec(&String::from_utf8(out.stdout).expect("sql")).await;
    until_status_at(addr, token, "/auth_m/public", StatusCode::OK, &key).await;
    // It refuses to overwrite a key.
    let again = Command::new(bin)
        .args(["make-jwt", "--generate-key", "-k"])
        .arg(&key)
        .stderr(Stdio::null())
        .status()
        .expect("make-jwt");
    assert!(!again.success());

    // --generate-key --alg ES512: a P-521 pair whose tokens are ES512.
    let key = dir.path().join("gen521.pem");
    let jwt = dir.path().join("gen521.jwt");
    let out = Command::new(bin)
        .args(["make-jwt", "--generate-key", "--alg", "ES512", "-k"])
        .arg(&key)
        .args(["-a", "auth_m.public", "-o"])
        .arg(&jwt)
        .output()
        .expect("make-jwt --generate-key --alg ES512");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(&jwt).expect("token");
    let token = token.trim();
    assert_eq!(header_alg(token), "ES512");
    // openssl reads the written key as P-521.
    let text = Command::new("openssl")
        .args(["pkey", "-noout", "-text", "-in"])
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("P-521"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    db.exec(&String::from_utf8(out.stdout).expect("sql")).await;
    until_status_at(addr, token, "/auth_m/public", StatusCode::OK, &key).await;
    sink.stop().await;
}

/// A P-521 key pair from openssl in `dir`: (PKCS#8 private key file, public SPKI PEM).
fn openssl_p521(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let (pv, pb) = (private.to_string_lossy(), public.to_string_lossy());
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-521",
        "-out",
        &pv,
    ]);
    openssl(&["pkey", "-in", &pv, "-pubout", "-out", &pb]);
    let public_pem = std::fs::read_to_string(&public).expect("public key");
    (private, public_pem)
}

/// An ES512 token signed by openssl itself (not by this crate): its DER signature turned into
/// the fixed-width `r || s` of JWS.
fn openssl_es512_token(dir: &Path, private: &Path, claims: &Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"ES512","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let input = dir.join("signing-input");
    let sig = dir.join("signature.der");
    std::fs::write(&input, &signed).expect("write");
    openssl(&[
        "dgst",
        "-sha512",
        "-sign",
        &private.to_string_lossy(),
        "-out",
        &sig.to_string_lossy(),
        &input.to_string_lossy(),
    ]);
    let der = std::fs::read(&sig).expect("signature");
    // SEQUENCE { INTEGER r, INTEGER s }; P-521 signatures need a two-byte length (0x81 nn).
    let mut rest = match der.as_slice() {
        [0x30, 0x81, _, rest @ ..] => rest,
        [0x30, _, rest @ ..] => rest,
        other => panic!("unexpected signature {other:?}"),
    };
    let mut fixed = Vec::new();
    for _ in 0..2 {
        let [0x02, len, tail @ ..] = rest else {
            panic!("unexpected signature integer");
        };
        let (int, tail) = tail.split_at(usize::from(*len));
        let int: Vec<u8> = int.iter().copied().skip_while(|b| *b == 0).collect();
        fixed.extend(std::iter::repeat_n(0u8, 66 - int.len()));
        fixed.extend(int);
        rest = tail;
    }
    format!("{signed}.{}", b64(&fixed))
}

#[tokio::test]
async fn es512_tokens_verify_only_with_their_p521_key() {
    let db = db_with_kv("auth_e").await;
    let flags = auth_flags("100ms");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sink = Sink::start(&db, &flags).await;
    let addr = sink.addr();
    let path = "/auth_e/public";
    let dir = tempfile::tempdir().expect("tempdir");
    let (key_a, public_a) = openssl_p521(dir.path(), "a");
    let (key_b, public_b) = openssl_p521(dir.path(), "b");
    let pem_a = std::fs::read(&key_a).expect("key");
    let token = make_jwt::token(&pem_a, &["auth_e.public".into()], None).expect("mint");
    assert_eq!(header_alg(&token), "ES512");
    let by_openssl = openssl_es512_token(
        dir.path(),
        &key_a,
        &claims(NAMESPACE, json!([["auth_e", "public"]])),
    );

    // Only a P-256 key: an ES512 token finds no key of its type.
    let (p256_private, p256_public) = p256();
    install_key(&db, &p256_public).await;
    let p256_token =
        make_jwt::token(p256_private.as_bytes(), &["auth_e.public".into()], None).expect("mint");
    until_status_at(addr, &p256_token, path, StatusCode::OK, Path::new("p256")).await;
    refused(addr, Some(&token), path, "no active key verifies the token").await;
    // Nor does an ES256 signature relabelled ES512 pass through the P-256 key.
    let (_, rest) = p256_token.split_once('.').expect("token");
    let relabelled = format!(
        "{}.{rest}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"ES512","typ":"JWT"}"#)
    );
    refused(
        addr,
        Some(&relabelled),
        path,
        "no active key verifies the token",
    )
    .await;

    // Another P-521 key, loaded (its own token passes): the signature does not verify under it.
    install_key(&db, &public_b).await;
    let token_b = make_jwt::token(
        &std::fs::read(&key_b).expect("key"),
        &["auth_e.public".into()],
        None,
    )
    .expect("mint");
    until_status_at(addr, &token_b, path, StatusCode::OK, &key_b).await;
    refused(addr, Some(&token), path, "no active key verifies the token").await;
    refused(
        addr,
        Some(&by_openssl),
        path,
        "no active key verifies the token",
    )
    .await;

    // Its own key: accepted, whether make-jwt or openssl signed it, and the claims still count.
    install_key(&db, &public_a).await;
    until_status_at(addr, &token, path, StatusCode::OK, &key_a).await;
    accepted(addr, &by_openssl, path).await;
    refused(
        addr,
        Some(&token),
        "/auth_e/other",
        "token does not grant this schema",
    )
    .await;
    let mut no_jti = claims(NAMESPACE, json!([["auth_e", "public"]]));
    no_jti.as_object_mut().expect("object").remove("jti");
    let pem_a = String::from_utf8(pem_a).expect("pem");
    refused(
        addr,
        Some(&sign(&pem_a, &no_jti)),
        path,
        "id field is required",
    )
    .await;
    let mut expired = claims(NAMESPACE, json!([["auth_e", "public"]]));
    expired["exp"] = json!(now() - 60);
    refused(
        addr,
        Some(&sign(&pem_a, &expired)),
        path,
        "token is expired",
    )
    .await;
    revoke(&db, &token).await;
    until_status_at(addr, &token, path, StatusCode::UNAUTHORIZED, &key_a).await;
    refused(addr, Some(&token), path, "token is revoked").await;
    sink.stop().await;
}

async fn until_status_at(addr: SocketAddr, token: &str, path: &str, want: StatusCode, what: &Path) {
    eventually(
        &format!("{want} for {what:?}"),
        Duration::from_secs(10),
        || async { (post(addr, Some(token), path, EMPTY).await.0 == want).then_some(()) },
    )
    .await
}

/// A test certificate authority.
fn test_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().expect("key");
    rcgen::CertifiedIssuer::self_signed(params, key).expect("ca")
}

/// A client certificate for `san` signed by `ca`: (certificate PEM, key PEM).
fn client_cert(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    san: &str,
) -> (Vec<u8>, Vec<u8>) {
    client_cert_named(ca, san, "feed client")
}

/// A client certificate for `san` with the subject common name `cn`, signed by `ca`.
fn client_cert_named(
    ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    san: &str,
    cn: &str,
) -> (Vec<u8>, Vec<u8>) {
    let mut params = rcgen::CertificateParams::new(vec![san.to_string()]).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, ca).expect("sign");
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

fn mtls_client(addr: SocketAddr, cert: Option<&(Vec<u8>, Vec<u8>)>, token: Option<&str>) -> Client {
    Client::new(
        &format!("https://{addr}"),
        ClientOptions {
            insecure_skip_verify: true,
            client_cert_pem: cert.cloned(),
            headers: token
                .map(|t| vec![("authorization".to_string(), format!("Bearer {t}"))])
                .unwrap_or_default(),
            ..Default::default()
        },
    )
    .expect("client")
}

async fn mtls_post(c: &Client, path: &str) -> Result<(StatusCode, String), String> {
    c.post(path, Bytes::from(EMPTY))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn client_certificates_are_required_and_map_to_schemas() {
    let db = db_with_kv("auth_c").await;
    db.exec("CREATE SCHEMA south").await;
    db.exec("CREATE TABLE south.kv (k INT8 PRIMARY KEY)").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = test_ca("sink clients");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    let ca_flag = ca_path.to_string_lossy().to_string();
    let sink = Sink::start(
        &db,
        &[
            "--disableAuthentication=false",
            "--jwtRefresh=100ms",
            "--tlsClientCA",
            &ca_flag,
            "--tlsClientSchemas",
            "east-feed.example=auth_c.public,Changefeed South=auth_c.south",
        ],
    )
    .await;
    let addr = sink.addr();
    let (public_path, other_path) = ("/auth_c/public", "/auth_c/other");

    // No certificate, or one from another authority: the handshake is refused.
    let none = mtls_post(&mtls_client(addr, None, None), public_path).await;
    assert!(none.is_err(), "{none:?}");
    let stranger = client_cert(&test_ca("someone else"), "east-feed.example");
    let untrusted = mtls_post(&mtls_client(addr, Some(&stranger), None), public_path).await;
    assert!(untrusted.is_err(), "{untrusted:?}");

    // A trusted certificate whose name is mapped writes its schema without a token, and only it.
    let east = client_cert(&ca, "east-feed.example");
    let c = mtls_client(addr, Some(&east), None);
    assert_eq!(
        mtls_post(&c, public_path).await.expect("request"),
        (StatusCode::OK, "OK\n".to_string())
    );
    let (status, body) = mtls_post(&c, other_path).await.expect("request");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // A subject common name is matched too (case ignored), and grants only its schema.
    let south = client_cert_named(&ca, "unlisted.example", "changefeed south");
    let c = mtls_client(addr, Some(&south), None);
    assert_eq!(
        mtls_post(&c, "/auth_c/south").await.expect("request"),
        (StatusCode::OK, "OK\n".to_string())
    );
    let (status, body) = mtls_post(&c, public_path).await.expect("request");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // The same common name from another authority never gets past the handshake.
    let forged = client_cert_named(&test_ca("forger"), "unlisted.example", "Changefeed South");
    assert!(
        mtls_post(&mtls_client(addr, Some(&forged), None), "/auth_c/south")
            .await
            .is_err()
    );

    // A trusted certificate of another name needs a token, as without mTLS.
    let west = client_cert(&ca, "west-feed.example");
    let (status, _) = mtls_post(&mtls_client(addr, Some(&west), None), public_path)
        .await
        .expect("request");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (private, public) = p256();
    install_key(&db, &public).await;
    let token = make_jwt::token(private.as_bytes(), &["auth_c.*".into()], None).expect("mint");
    let with_token = mtls_client(addr, Some(&west), Some(&token));
    eventually("the token over mtls", Duration::from_secs(10), || async {
        (mtls_post(&with_token, public_path).await.ok()?.0 == StatusCode::OK).then_some(())
    })
    .await;
    sink.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_client_ca_in_the_real_binary() {
    let db = db_with_kv("auth_r").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_ca, new_ca) = (test_ca("old"), test_ca("new"));
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, old_ca.pem()).expect("write ca");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
        .args([
            "start",
            "--bindAddr",
            &format!("127.0.0.1:{port}"),
            "--tlsSelfSigned",
        ])
        .args([
            "--disableAuthentication",
            "--targetConn",
            &db.url(),
            "--tlsClientCA",
        ])
        .arg(&ca_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let child = KillOnDrop(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let old_client = mtls_client(addr, Some(&client_cert(&old_ca, "feed.example")), None);
    let new_client = mtls_client(addr, Some(&client_cert(&new_ca, "feed.example")), None);
    eventually(
        "the sink with the old ca",
        Duration::from_secs(30),
        || async {
            (mtls_post(&old_client, "/auth_r/public").await.ok()?.0 == StatusCode::OK).then_some(())
        },
    )
    .await;
    assert!(mtls_post(&new_client, "/auth_r/public").await.is_err());
    std::fs::write(&ca_path, new_ca.pem()).expect("write ca");
    let pid = i32::try_from(child.0.id()).expect("pid");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "SIGHUP");
    eventually(
        "the new ca after sighup",
        Duration::from_secs(10),
        || async {
            (mtls_post(&new_client, "/auth_r/public").await.ok()?.0 == StatusCode::OK).then_some(())
        },
    )
    .await;
    // New connections from the old authority are refused (a fresh client: no pooled connection).
    let old_again = mtls_client(addr, Some(&client_cert(&old_ca, "feed.example")), None);
    assert!(mtls_post(&old_again, "/auth_r/public").await.is_err());
}

#[tokio::test]
async fn the_jwt_command_installs_keys_and_revokes_tokens() {
    let db = db_with_kv("auth_j").await;
    let flags = auth_flags("100ms");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sink = Sink::start(&db, &flags).await;
    let addr = sink.addr();
    let dir = tempfile::tempdir().expect("tempdir");
    let (private, public) = p256();
    let pub_path = dir.path().join("k.pub.pem");
    std::fs::write(&pub_path, &public).expect("write");
    std::fs::write(dir.path().join("bad.pem"), "not a key").expect("write");
    let jwt = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cdc-sink"))
            .arg("jwt")
            .args(args)
            .args(["--targetConn", &db.url()])
            .output()
            .expect("cdc-sink jwt");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, _) = jwt(&["add-key", &dir.path().join("bad.pem").to_string_lossy()]);
    assert!(!ok, "an invalid key is refused before it reaches the table");
    let (ok, id) = jwt(&["add-key", &pub_path.to_string_lossy()]);
    assert!(ok);
    let (ok, listed) = jwt(&["keys"]);
    assert!(ok);
    assert_eq!(listed.trim(), format!("{}  active  ES256", id.trim()));
    // A P-521 key is listed with the one algorithm it verifies.
    let (_, p521_public) = openssl_p521(dir.path(), "p521");
    let p521_path = dir.path().join("p521.pub.pem");
    assert_eq!(
        std::fs::read_to_string(&p521_path).expect("pub"),
        p521_public
    );
    let (ok, p521_id) = jwt(&["add-key", &p521_path.to_string_lossy()]);
    assert!(ok);
    let (ok, listed) = jwt(&["keys"]);
    assert!(ok);
    assert!(
        listed
            .lines()
            .any(|l| l == format!("{}  active  ES512", p521_id.trim())),
        "{listed}"
    );
    assert_eq!(listed.lines().count(), 2, "{listed}");

    let path = "/auth_j/public";
    let token = make_jwt::token(private.as_bytes(), &["auth_j.public".into()], None).expect("mint");
    until_status_at(addr, &token, path, StatusCode::OK, &pub_path).await;
    let (ok, said) = jwt(&["revoke", &token]);
    assert!(ok && said.starts_with("revoked "), "{said}");
    assert!(!said.contains(&token));
    until_status_at(addr, &token, path, StatusCode::UNAUTHORIZED, &pub_path).await;
    refused(addr, Some(&token), path, "token is revoked").await;
    sink.stop().await;
}
