//! `cdc-sink make-jwt`: mint a token for the sink as the Go cdc-sink's `make-jwt` does, and,
//! beyond it, `--expires` and `--generate-key` (a new key pair plus the SQL that installs its
//! public key).

use crate::auth::{claims, keys};
use crate::config::parse_duration;
use crate::ident::parse_dotted;
use anyhow::{bail, Context};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Args, Debug)]
pub struct MakeJwtArgs {
    /// Schema the token grants, `database.schema` (`*` matches any part); repeat or comma-separate
    #[arg(short = 'a', long = "allow", value_delimiter = ',')]
    pub(crate) allow: Vec<String>,
    /// PEM private key to sign with: PKCS#8, SEC1 (EC) or PKCS#1 (RSA); P-256, P-384, P-521 or RSA
    #[arg(short = 'k', long = "key")]
    pub(crate) key: Option<PathBuf>,
    /// Write the token to this file (mode 0600) instead of standard output
    #[arg(short = 'o', long = "out")]
    pub(crate) out: Option<PathBuf>,
    /// Print the unsigned claims instead of a token (no key needed)
    #[arg(long = "claim")]
    pub(crate) claim: bool,
    /// Token lifetime (Go duration, e.g. 720h); without it the token does not expire
    #[arg(long = "expires", value_parser = parse_duration)]
    pub(crate) expires: Option<Duration>,
    /// Write a new key pair (--key, mode 0600, and its .pub.pem) and print the SQL that installs the public key
    #[arg(long = "generate-key")]
    pub(crate) generate_key: bool,
    /// Algorithm of the key --generate-key writes: ES256 (P-256), ES384 (P-384) or ES512 (P-521)
    #[arg(long = "alg", value_enum, ignore_case = true, default_value = "ES256")]
    pub(crate) alg: KeyAlg,
    /// Staging schema named in the SQL printed by --generate-key
    #[arg(long = "stagingSchema", default_value = "_cdc_sink")]
    pub(crate) staging_schema: String,
}

/// The curve of a generated key, named by the token algorithm it signs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyAlg {
    #[value(name = "ES256")]
    Es256,
    #[value(name = "ES384")]
    Es384,
    #[value(name = "ES512")]
    Es512,
}

/// A new key pair for `alg`: (private PKCS#8 PEM, public SPKI PEM).
pub(crate) fn generate_key(alg: KeyAlg) -> anyhow::Result<(String, String)> {
    let rcgen_alg = match alg {
        KeyAlg::Es256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyAlg::Es384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyAlg::Es512 => {
            // ring (under rcgen) has no P-521.
            use p521::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
            let key = p521::SecretKey::random(&mut p521::elliptic_curve::rand_core::OsRng);
            let private = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("encoding the P-521 key: {e}"))?;
            let public = key
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("encoding the P-521 public key: {e}"))?;
            return Ok((private.to_string(), public));
        }
    };
    let pair = rcgen::KeyPair::generate_for(rcgen_alg).context("generating the key")?;
    Ok((pair.serialize_pem(), pair.public_key_pem()))
}

/// The public key file written beside `key`: `k.pem` → `k.pub.pem`, else `k.pub`.
pub(crate) fn public_key_path(key: &Path) -> PathBuf {
    let name = key.file_name().map(|n| n.to_string_lossy().to_string());
    match name.as_deref().and_then(|n| n.strip_suffix(".pem")) {
        Some(stem) => key.with_file_name(format!("{stem}.pub.pem")),
        None => key.with_file_name(format!("{}.pub", name.unwrap_or_default())),
    }
}

/// `database.schema` values into claim entries; two parts each.
fn schemas(allow: &[String]) -> anyhow::Result<Vec<Vec<String>>> {
    let list: Vec<&String> = allow.iter().filter(|a| !a.trim().is_empty()).collect();
    if list.is_empty() {
        bail!("no schemas specified");
    }
    list.into_iter()
        .map(|a| {
            let parts = parse_dotted(a.trim()).with_context(|| format!("--allow {a:?}"))?;
            if parts.len() != 2 {
                bail!("--allow {a:?}: expected database.schema (use * for any part)");
            }
            Ok(parts.iter().map(|p| p.raw().to_string()).collect())
        })
        .collect()
}

/// The SQL that installs `public_pem` as an active key.
pub(crate) fn install_sql(staging_schema: &str, public_pem: &str) -> anyhow::Result<String> {
    let parts = parse_dotted(staging_schema).context("--stagingSchema")?;
    let mut table: Vec<String> = parts.iter().map(|p| p.quoted()).collect();
    table.push(keys::KEYS_TABLE.to_string());
    Ok(format!(
        "INSERT INTO {} (public_key) VALUES ('{}');\n",
        table.join("."),
        public_pem.trim_end().replace('\'', "''")
    ))
}

fn write_private(path: &Path, contents: &[u8], create_new: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))
}

/// Signs claims for `allow` with the key in `pem`.
pub fn token(pem: &[u8], allow: &[String], expires: Option<Duration>) -> anyhow::Result<String> {
    let schemas = schemas(allow)?;
    let key = keys::parse_private_key(pem).map_err(anyhow::Error::msg)?;
    let claims = claims::mint(&schemas, expiry(expires));
    key.sign(&claims)
        .map_err(|e| anyhow::anyhow!("signing the token: {e}"))
}

fn expiry(expires: Option<Duration>) -> Option<u64> {
    expires.map(|d| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(d)
            .as_secs()
    })
}

pub(crate) fn run(args: MakeJwtArgs) -> anyhow::Result<()> {
    if args.generate_key {
        let Some(key_path) = &args.key else {
            bail!("--generate-key needs -k/--key: where to write the private key");
        };
        if !args.allow.is_empty() && args.out.is_none() {
            bail!("with --generate-key, write the token with -o/--out (standard output carries the SQL)");
        }
        let (private, public) = generate_key(args.alg)?;
        let sql = install_sql(&args.staging_schema, &public)?;
        write_private(key_path, private.as_bytes(), true)?;
        let pub_path = public_key_path(key_path);
        std::fs::write(&pub_path, &public)
            .with_context(|| format!("writing {}", pub_path.display()))?;
        eprintln!(
            "wrote {} (private) and {} (public); install the public key with the SQL below, \
then send SIGHUP to the sink or wait for --jwtRefresh",
            key_path.display(),
            pub_path.display()
        );
        print!("{sql}");
        if args.allow.is_empty() {
            return Ok(());
        }
    }
    if args.claim {
        let claims = claims::mint(&schemas(&args.allow)?, expiry(args.expires));
        println!("{}", serde_json::to_string_pretty(&claims)?);
        return Ok(());
    }
    let Some(key_path) = &args.key else {
        bail!("-k/--key is required to sign a token (or use --claim)");
    };
    let pem = std::fs::read(key_path).with_context(|| format!("reading {}", key_path.display()))?;
    let jwt = token(&pem, &args.allow, args.expires)
        .with_context(|| format!("key {}", key_path.display()))?;
    match &args.out {
        Some(out) => write_private(out, format!("{jwt}\n").as_bytes(), false),
        None => {
            println!("{jwt}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_need_two_parts() {
        let s = schemas(&["kv.public".into(), "other.*".into()]).expect("valid");
        assert_eq!(s, vec![vec!["kv", "public"], vec!["other", "*"]]);
        assert_eq!(
            schemas(&["\"My.Db\".public".into()]).expect("quoted"),
            vec![vec!["My.Db", "public"]]
        );
        assert_eq!(
            schemas(&[]).expect_err("none").to_string(),
            "no schemas specified"
        );
        assert!(schemas(&["kv".into()]).is_err());
        assert!(schemas(&["a.b.c".into()]).is_err());
    }

    #[test]
    fn generated_keys_sign_tokens_their_public_key_verifies() {
        use crate::auth::keys::{parse_private_key, parse_public_key, Alg};
        for (alg, want) in [
            (KeyAlg::Es256, Alg::ES256),
            (KeyAlg::Es384, Alg::ES384),
            (KeyAlg::Es512, Alg::ES512),
        ] {
            let (private, public) = generate_key(alg).expect("generate");
            assert!(
                private.starts_with("-----BEGIN PRIVATE KEY-----"),
                "{private}"
            );
            let signer = parse_private_key(private.as_bytes()).expect("private");
            assert_eq!(signer.alg, want);
            let verifier = parse_public_key(&public).expect("public");
            assert_eq!(verifier.algs, &[want]);
            let jwt = token(private.as_bytes(), &["kv.public".into()], None).expect("token");
            let claims = verifier.verify(&jwt, want).expect("verifies");
            assert!(claims["jti"].is_string());
        }
    }

    #[test]
    fn public_key_paths_sit_beside_the_private_key() {
        assert_eq!(
            public_key_path(Path::new("/x/sink.pem")),
            Path::new("/x/sink.pub.pem")
        );
        assert_eq!(public_key_path(Path::new("k")), Path::new("k.pub"));
    }

    #[test]
    fn install_sql_names_the_staging_table() {
        let sql = install_sql("_cdc_sink", "-----BEGIN PUBLIC KEY-----\nAA\n").expect("sql");
        assert_eq!(
            sql,
            "INSERT INTO \"_cdc_sink\".jwt_public_keys (public_key) VALUES ('-----BEGIN PUBLIC KEY-----\nAA');\n"
        );
    }
}
