//! Keys: the verification key set read from `jwt_public_keys` and `jwt_revoked_ids`, and the
//! private keys `make-jwt` signs with. Signatures are the `jsonwebtoken` crate's (on `ring`),
//! except ES512, which `ring` lacks and [`super::es512`] does with the `p521` crate; this module
//! only unwraps the DER containers (SPKI, PKCS#8, SEC1, PKCS#1) to hand them the key bytes they
//! expect and to learn each key's curve.

use super::es512;
use super::AuthError;
use crate::stage::StagingSchema;
use crate::target::{Database, Dialect};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use std::collections::HashSet;

pub(crate) const KEYS_TABLE: &str = "jwt_public_keys";
pub(crate) const REVOKED_TABLE: &str = "jwt_revoked_ids";

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_P521: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];

pub(super) const SEQUENCE: u8 = 0x30;
pub(super) const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
pub(super) const OID: u8 = 0x06;
pub(super) const CONTEXT_0: u8 = 0xa0;

/// A token algorithm the sink accepts (the reference's list). `jsonwebtoken` has no ES512.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alg {
    ES256,
    ES384,
    ES512,
    RS256,
    RS384,
    RS512,
}

impl Alg {
    /// The `alg` header value; anything else (`none`, HS*, PS*, EdDSA, other case) is None.
    pub(crate) fn from_name(name: &str) -> Option<Alg> {
        Some(match name {
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "ES512" => Alg::ES512,
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::ES512 => "ES512",
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
        }
    }

    /// The `jsonwebtoken` algorithm; None for ES512, which it cannot do.
    fn jwt(self) -> Option<Algorithm> {
        match self {
            Alg::ES256 => Some(Algorithm::ES256),
            Alg::ES384 => Some(Algorithm::ES384),
            Alg::ES512 => None,
            Alg::RS256 => Some(Algorithm::RS256),
            Alg::RS384 => Some(Algorithm::RS384),
            Alg::RS512 => Some(Algorithm::RS512),
        }
    }
}

/// The algorithms a key verifies: one per curve, any RSA one for RSA.
const EC_P256: &[Alg] = &[Alg::ES256];
const EC_P384: &[Alg] = &[Alg::ES384];
const EC_P521: &[Alg] = &[Alg::ES512];
const RSA: &[Alg] = &[Alg::RS256, Alg::RS384, Alg::RS512];

/// What checks a signature.
enum Verifier {
    Ring(DecodingKey),
    P521(p521::ecdsa::VerifyingKey),
}

/// One verification key and the token algorithms it may verify.
pub(crate) struct Key {
    pub(crate) algs: &'static [Alg],
    verifier: Verifier,
}

/// Why a key did not verify a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VerifyFailure {
    Malformed,
    Signature,
}

impl Key {
    /// The claims of `token`, whose header says `alg`, if this key verifies it. A key verifies
    /// only the algorithms of its type (`algs`), whatever the header says.
    pub(crate) fn verify(&self, token: &str, alg: Alg) -> Result<serde_json::Value, VerifyFailure> {
        if !self.algs.contains(&alg) {
            return Err(VerifyFailure::Signature);
        }
        match (&self.verifier, alg.jwt()) {
            (Verifier::P521(key), None) => es512::verify(key, token).map_err(|f| match f {
                es512::Failure::Malformed => VerifyFailure::Malformed,
                es512::Failure::Signature => VerifyFailure::Signature,
            }),
            (Verifier::Ring(key), Some(alg)) => {
                // The signature is all the crate checks; the claims follow the reference in
                // the caller.
                let mut validation = Validation::new(alg);
                validation.required_spec_claims.clear();
                validation.validate_exp = false;
                validation.validate_nbf = false;
                validation.validate_aud = false;
                jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
                    .map(|data| data.claims)
                    .map_err(|e| {
                        use jsonwebtoken::errors::ErrorKind;
                        match e.kind() {
                            ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                                VerifyFailure::Malformed
                            }
                            _ => VerifyFailure::Signature,
                        }
                    })
            }
            _ => Err(VerifyFailure::Signature),
        }
    }
}

/// What a refresh loads: the active keys, in table order, and the revoked token ids.
#[derive(Default)]
pub(crate) struct KeySet {
    pub(crate) keys: Vec<Key>,
    pub(crate) revoked: HashSet<String>,
}

/// Reads one DER element: (tag, contents, the rest). Definite lengths only.
pub(super) fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

pub(super) fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, value, rest) = tlv(input)?;
    (tag == want).then_some((value, rest))
}

fn der_element(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

fn curve_algs(oid: &[u8]) -> Result<&'static [Alg], String> {
    match oid {
        OID_P256 => Ok(EC_P256),
        OID_P384 => Ok(EC_P384),
        OID_P521 => Ok(EC_P521),
        _ => Err("unsupported elliptic curve (use P-256, P-384, P-521 or RSA)".into()),
    }
}

/// A PEM `PUBLIC KEY` (SPKI) block of an EC or RSA key.
pub(crate) fn parse_public_key(pem: &str) -> Result<Key, String> {
    let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "not a PEM PUBLIC KEY block".to_string())?;
    let bad = || "not a valid SubjectPublicKeyInfo".to_string();
    let (info, _) = expect(spki.as_ref(), SEQUENCE).ok_or_else(bad)?;
    let (alg_id, rest) = expect(info, SEQUENCE).ok_or_else(bad)?;
    let (bits, _) = expect(rest, BIT_STRING).ok_or_else(bad)?;
    let key = match bits.split_first() {
        Some((0, key)) if !key.is_empty() => key,
        _ => return Err(bad()),
    };
    let (alg, params) = expect(alg_id, OID).ok_or_else(bad)?;
    match alg {
        OID_RSA => {
            // PKCS#1 RSAPublicKey: SEQUENCE { modulus, publicExponent }.
            let (inner, _) = expect(key, SEQUENCE).ok_or_else(bad)?;
            let (_, rest) = expect(inner, INTEGER).ok_or_else(bad)?;
            expect(rest, INTEGER).ok_or_else(bad)?;
            Ok(Key {
                algs: RSA,
                verifier: Verifier::Ring(DecodingKey::from_rsa_der(key)),
            })
        }
        OID_EC => {
            let (curve, _) = expect(params, OID).ok_or_else(bad)?;
            let algs = curve_algs(curve)?;
            let point_len = match curve {
                OID_P256 => 65,
                OID_P384 => 97,
                _ => 133,
            };
            if key.len() != point_len || key[0] != 0x04 {
                return Err("EC public key is not an uncompressed point of its curve".into());
            }
            let verifier = if curve == OID_P521 {
                // Also checks that the point is on the curve.
                Verifier::P521(
                    p521::ecdsa::VerifyingKey::from_sec1_bytes(key)
                        .map_err(|_| "EC public key is not a point of P-521".to_string())?,
                )
            } else {
                Verifier::Ring(DecodingKey::from_ec_der(key))
            };
            Ok(Key { algs, verifier })
        }
        _ => Err("not an EC or RSA public key".into()),
    }
}

enum Signer {
    Ring(EncodingKey),
    P521(p521::ecdsa::SigningKey),
}

/// A private key for signing, with the algorithm the reference picks for it.
pub struct SigningKey {
    pub(crate) alg: Alg,
    signer: Signer,
}

impl SigningKey {
    /// A compact token for `claims`.
    pub fn sign(&self, claims: &impl serde::Serialize) -> Result<String, String> {
        match (&self.signer, self.alg.jwt()) {
            (Signer::Ring(key), Some(alg)) => {
                jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key)
                    .map_err(|e| e.to_string())
            }
            (Signer::P521(key), None) => es512::sign(key, claims).map_err(|e| e.to_string()),
            _ => Err(format!("no signer for {}", self.alg.name())),
        }
    }
}

/// The first private key of a PEM file: PKCS#8 `PRIVATE KEY`, SEC1 `EC PRIVATE KEY` or PKCS#1
/// `RSA PRIVATE KEY`. P-256 signs ES256, P-384 ES384, P-521 ES512, RSA RS256.
pub fn parse_private_key(pem: &[u8]) -> Result<SigningKey, String> {
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY PEM block found".to_string()
    })?;
    let bad = |what: &str| format!("not a valid {what} key");
    // `sec1` is the ECPrivateKey (inside the PKCS#8 one for that form), `pkcs8` what ring
    // signs from.
    let ec = |curve: &[u8], sec1: &[u8], pkcs8: Vec<u8>| -> Result<SigningKey, String> {
        let alg = match curve_algs(curve)? {
            [alg] => *alg,
            _ => return Err("unsupported elliptic curve".into()),
        };
        let signer = if alg == Alg::ES512 {
            let scalar = sec1_private(sec1).ok_or_else(|| bad("P-521"))?;
            Signer::P521(p521::ecdsa::SigningKey::from_slice(scalar).map_err(|_| bad("P-521"))?)
        } else {
            Signer::Ring(EncodingKey::from_ec_der(&pkcs8))
        };
        Ok(SigningKey { alg, signer })
    };
    match key {
        PrivateKeyDer::Pkcs1(k) => Ok(SigningKey {
            alg: Alg::RS256,
            signer: Signer::Ring(EncodingKey::from_rsa_der(k.secret_pkcs1_der())),
        }),
        PrivateKeyDer::Sec1(k) => {
            let der = k.secret_sec1_der();
            let curve = sec1_curve(der).ok_or_else(|| {
                "SEC1 key without its curve parameters: convert it to PKCS#8".to_string()
            })?;
            // ring signs from PKCS#8 only: wrap the SEC1 structure in a PrivateKeyInfo.
            let mut alg_id = der_element(OID, OID_EC);
            alg_id.extend(der_element(OID, curve));
            let mut info = der_element(INTEGER, &[0]);
            info.extend(der_element(SEQUENCE, &alg_id));
            info.extend(der_element(OCTET_STRING, der));
            ec(curve, der, der_element(SEQUENCE, &info))
        }
        PrivateKeyDer::Pkcs8(k) => {
            let der = k.secret_pkcs8_der();
            let (info, _) = expect(der, SEQUENCE).ok_or_else(|| bad("PKCS#8"))?;
            let (_, rest) = expect(info, INTEGER).ok_or_else(|| bad("PKCS#8"))?;
            let (alg_id, rest) = expect(rest, SEQUENCE).ok_or_else(|| bad("PKCS#8"))?;
            let (alg, params) = expect(alg_id, OID).ok_or_else(|| bad("PKCS#8"))?;
            match alg {
                OID_RSA => {
                    let (pkcs1, _) = expect(rest, OCTET_STRING).ok_or_else(|| bad("PKCS#8"))?;
                    Ok(SigningKey {
                        alg: Alg::RS256,
                        signer: Signer::Ring(EncodingKey::from_rsa_der(pkcs1)),
                    })
                }
                OID_EC => {
                    let (curve, _) = expect(params, OID).ok_or_else(|| bad("PKCS#8"))?;
                    let (sec1, _) = expect(rest, OCTET_STRING).ok_or_else(|| bad("PKCS#8"))?;
                    ec(curve, sec1, der.to_vec())
                }
                _ => Err("not an EC or RSA private key".into()),
            }
        }
        _ => Err("unsupported private key format".into()),
    }
}

/// The private scalar of a SEC1 ECPrivateKey.
fn sec1_private(der: &[u8]) -> Option<&[u8]> {
    let (key, _) = expect(der, SEQUENCE)?;
    let (_, rest) = expect(key, INTEGER)?;
    expect(rest, OCTET_STRING).map(|(scalar, _)| scalar)
}

/// The named curve of a SEC1 ECPrivateKey (`parameters [0]`).
fn sec1_curve(der: &[u8]) -> Option<&[u8]> {
    let (key, _) = expect(der, SEQUENCE)?;
    let (_, rest) = expect(key, INTEGER)?;
    let (_, rest) = expect(rest, OCTET_STRING)?;
    let (params, _) = expect(rest, CONTEXT_0)?;
    expect(params, OID).map(|(oid, _)| oid)
}

/// The key and revocation tables of a staging schema.
#[derive(Clone, Debug)]
pub(crate) struct Tables {
    pub(crate) keys: String,
    pub(crate) revoked: String,
}

impl Tables {
    pub(crate) fn new(staging: &StagingSchema) -> Tables {
        Tables {
            keys: staging.object(KEYS_TABLE),
            revoked: staging.object(REVOKED_TABLE),
        }
    }

    /// The two tables with the Go cdc-sink's columns, so that keys and revocations written for
    /// it work unchanged; created if missing.
    pub(crate) fn ddl(&self, dialect: Dialect) -> Vec<String> {
        let text = match dialect {
            Dialect::Postgres => "TEXT",
            Dialect::Cockroach => "STRING",
        };
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id UUID PRIMARY KEY DEFAULT gen_random_uuid(), \
public_key {text} NOT NULL, active BOOL NOT NULL DEFAULT true)",
                self.keys
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id {text} PRIMARY KEY)",
                self.revoked
            ),
        ]
    }

    /// Reads the active keys and the revoked ids. A row that is not a usable public key
    /// fails the whole load, so the caller keeps the set it has.
    pub(crate) async fn load(&self, db: &Database) -> Result<KeySet, AuthError> {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT id::TEXT, public_key FROM {} WHERE active ORDER BY id",
            self.keys
        ))
        .fetch_all(&db.pool)
        .await
        .map_err(AuthError::Load)?;
        let mut keys = Vec::with_capacity(rows.len());
        for (id, pem) in rows {
            let key = parse_public_key(&pem).map_err(|reason| AuthError::BadKey {
                id: id.clone(),
                reason,
            })?;
            keys.push(key);
        }
        let revoked: Vec<String> = sqlx::query_scalar(&format!("SELECT id FROM {}", self.revoked))
            .fetch_all(&db.pool)
            .await
            .map_err(AuthError::Load)?;
        Ok(KeySet {
            keys,
            revoked: revoked.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_elements_round_trip_short_and_long_lengths() {
        for len in [0usize, 5, 127, 128, 300, 70_000] {
            let body = vec![7u8; len];
            let enc = der_element(OCTET_STRING, &body);
            let (tag, value, rest) = tlv(&enc).expect("parses");
            assert_eq!((tag, value.len(), rest.len()), (OCTET_STRING, len, 0));
        }
        // Truncated or indefinite lengths are refused.
        assert!(tlv(&[0x30, 0x05, 1, 2]).is_none());
        assert!(tlv(&[0x30, 0x80]).is_none());
        assert!(tlv(&[]).is_none());
    }

    #[test]
    fn generated_keys_parse_with_their_algorithms() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let public = parse_public_key(&pair.public_key_pem()).expect("public");
        assert_eq!(public.algs, EC_P256);
        let private = parse_private_key(pair.serialize_pem().as_bytes()).expect("private");
        assert_eq!(private.alg, Alg::ES256);
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        assert_eq!(
            parse_public_key(&pair.public_key_pem())
                .expect("public")
                .algs,
            EC_P384
        );
    }

    #[test]
    fn a_key_verifies_only_the_algorithms_of_its_type() {
        use p521::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
        let secret = p521::SecretKey::random(&mut p521::elliptic_curve::rand_core::OsRng);
        let p521_private = secret.to_pkcs8_pem(LineEnding::LF).expect("pem");
        let p521_public = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        let p521 = parse_public_key(&p521_public).expect("public");
        assert_eq!(p521.algs, EC_P521);
        let signer = parse_private_key(p521_private.as_bytes()).expect("private");
        assert_eq!(signer.alg, Alg::ES512);
        let token = signer.sign(&serde_json::json!({"jti": "x"})).expect("sign");
        assert_eq!(
            p521.verify(&token, Alg::ES512).expect("verifies")["jti"],
            "x"
        );
        // The same token claimed as another algorithm, or checked by a P-256 key: refused.
        assert_eq!(
            p521.verify(&token, Alg::ES256).err(),
            Some(VerifyFailure::Signature)
        );
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let p256 = parse_public_key(&pair.public_key_pem()).expect("public");
        assert_eq!(
            p256.verify(&token, Alg::ES512).err(),
            Some(VerifyFailure::Signature)
        );
        // A P-521 SPKI whose point is off the curve (last byte of y changed) is not a key.
        use base64::Engine as _;
        let mut der = SubjectPublicKeyInfoDer::from_pem_slice(p521_public.as_bytes())
            .expect("spki")
            .to_vec();
        *der.last_mut().expect("point") ^= 1;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let bad = format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n");
        assert_eq!(
            parse_public_key(&bad).err().as_deref(),
            Some("EC public key is not a point of P-521")
        );
    }

    #[test]
    fn non_keys_are_refused() {
        assert!(parse_public_key("not pem").is_err());
        let cert = crate::server::self_signed_pem().expect("cert").cert_pem;
        assert!(
            parse_public_key(&cert).is_err(),
            "a certificate is not a key"
        );
        let truncated = "-----BEGIN PUBLIC KEY-----\nMBMGByqGSM49AgEGCCqGSM49AwEHAwIABA==\n-----END PUBLIC KEY-----\n";
        assert!(parse_public_key(truncated).is_err());
        assert!(parse_private_key(b"nothing").is_err());
    }
}
