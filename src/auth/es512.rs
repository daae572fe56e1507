//! ES512 (ECDSA on P-521 with SHA-512) for compact JWS tokens. `jsonwebtoken` signs and
//! verifies everything else on `ring`, which has no P-521; here the RustCrypto `p521` crate
//! does the curve arithmetic and this module only splits and joins the token (RFC 7515 §7.1,
//! signature as the fixed-width `r || s` of RFC 7518 §3.4).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p521::ecdsa::signature::{Signer as _, Verifier as _};
use p521::ecdsa::{Signature, SigningKey, VerifyingKey};

/// Why a token was not verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Not three base64url parts, or a payload that is not a JSON object.
    Malformed,
    /// The signature does not verify under the key.
    Signature,
}

/// Checks the signature of `token` (whose header the caller has read and found `ES512`) and
/// returns its claims. The payload is decoded only once the signature holds.
pub(crate) fn verify(key: &VerifyingKey, token: &str) -> Result<serde_json::Value, Failure> {
    let (signed, signature) = token.rsplit_once('.').ok_or(Failure::Malformed)?;
    let (_, payload) = signed.split_once('.').ok_or(Failure::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| Failure::Malformed)?;
    // A signature of another width (or with r or s out of range) cannot be one of this key's.
    let signature = Signature::from_slice(&signature).map_err(|_| Failure::Signature)?;
    key.verify(signed.as_bytes(), &signature)
        .map_err(|_| Failure::Signature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| Failure::Malformed)?;
    match serde_json::from_slice(&payload) {
        Ok(claims @ serde_json::Value::Object(_)) => Ok(claims),
        _ => Err(Failure::Malformed),
    }
}

/// A compact ES512 token for `claims`, with the header `jsonwebtoken` writes for the others.
pub(crate) fn sign(
    key: &SigningKey,
    claims: &impl serde::Serialize,
) -> Result<String, serde_json::Error> {
    let header = serde_json::json!({"typ": "JWT", "alg": "ES512"});
    let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?));
    let signature: Signature = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Bytes of an ES512 signature: two 66-byte integers.
    const SIGNATURE_BYTES: usize = 132;

    /// A fixed key: 65 bytes of `seed` under a zero top byte, well below the group order.
    fn key(seed: u8) -> SigningKey {
        let mut scalar = [seed; 66];
        scalar[0] = 0;
        SigningKey::from_slice(&scalar).expect("scalar below the order")
    }

    #[test]
    fn signed_tokens_verify_with_their_key_only() {
        let claims = json!({"jti": "a", "x": [1, 2]});
        let token = sign(&key(1), &claims).expect("sign");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header["alg"], "ES512");
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[2]).expect("b64").len(),
            SIGNATURE_BYTES
        );
        assert_eq!(verify(&VerifyingKey::from(&key(1)), &token), Ok(claims));
        assert_eq!(
            verify(&VerifyingKey::from(&key(2)), &token),
            Err(Failure::Signature)
        );
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let public = VerifyingKey::from(&key(3));
        let token = sign(&key(3), &json!({"jti": "a"})).expect("sign");
        let (head, rest) = token.split_once('.').expect("parts");
        let (_, sig) = rest.split_once('.').expect("parts");
        // Another payload under the same signature.
        let other = URL_SAFE_NO_PAD.encode(br#"{"jti":"b"}"#);
        assert_eq!(
            verify(&public, &format!("{head}.{other}.{sig}")),
            Err(Failure::Signature)
        );
        // A flipped signature bit, a short signature, a missing one, garbage.
        let mut bytes = URL_SAFE_NO_PAD.decode(sig).expect("b64");
        bytes[10] ^= 1;
        let flipped = URL_SAFE_NO_PAD.encode(&bytes);
        let short = URL_SAFE_NO_PAD.encode(&bytes[..64]);
        for (bad, want) in [
            (
                format!("{head}.{rest}").replace(sig, &flipped),
                Failure::Signature,
            ),
            (
                format!("{head}.{rest}").replace(sig, &short),
                Failure::Signature,
            ),
            (
                format!("{head}.{rest}").replace(sig, ""),
                Failure::Signature,
            ),
            (
                format!("{head}.{rest}").replace(sig, "!!"),
                Failure::Malformed,
            ),
            ("nodots".to_string(), Failure::Malformed),
            ("one.dot".to_string(), Failure::Malformed),
        ] {
            assert_eq!(verify(&public, &bad), Err(want), "{bad}");
        }
        // An all-zero signature (r = s = 0) is never valid.
        let zero = URL_SAFE_NO_PAD.encode([0u8; SIGNATURE_BYTES]);
        assert_eq!(
            verify(&public, &format!("{head}.{}", rest.replace(sig, &zero))),
            Err(Failure::Signature)
        );
    }

    #[test]
    fn a_verified_payload_must_be_a_json_object() {
        // Signed garbage still verifies, but is not a claim set.
        let k = key(4);
        let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES512"}"#);
        for payload in [b"[1]".as_slice(), b"not json".as_slice()] {
            let signed = format!("{head}.{}", URL_SAFE_NO_PAD.encode(payload));
            let sig: Signature = k.sign(signed.as_bytes());
            let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
            assert_eq!(
                verify(&VerifyingKey::from(&k), &token),
                Err(Failure::Malformed)
            );
        }
    }
}
