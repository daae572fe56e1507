//! `cdc-sink jwt keys|add-key|revoke`: the key and revocation tables of the staging schema
//! without hand-written SQL. Running sinks follow at their next refresh (or SIGHUP).

use crate::auth::keys::{parse_public_key, Tables};
use crate::stage::{StageArgs, StagingSchema};
use crate::target::{Database, TargetArgs};
use anyhow::{bail, Context};
use base64::Engine as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct JwtArgs {
    #[command(subcommand)]
    pub(crate) command: JwtCommand,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum JwtCommand {
    /// List the verification keys: id, active, the algorithms each verifies.
    Keys(ConnArgs),
    /// Install a PEM public key (checked first); prints its id.
    AddKey {
        #[command(flatten)]
        conn: ConnArgs,
        /// PEM `PUBLIC KEY` file (P-256, P-384, P-521 or RSA).
        file: PathBuf,
    },
    /// Revoke a token: its `jti`, or the token itself (only its `jti` is read).
    Revoke {
        #[command(flatten)]
        conn: ConnArgs,
        /// A `jti`, or a whole token.
        id: String,
    },
}

#[derive(clap::Args, Debug)]
pub(crate) struct ConnArgs {
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    #[command(flatten)]
    pub(crate) stage: StageArgs,
}

/// The staging database and its key tables (created if missing, as `start` does).
async fn open(conn: &ConnArgs) -> anyhow::Result<(Database, Tables)> {
    conn.target.validate()?;
    let (_, staging) = conn.target.open().await.context("opening databases")?;
    let name = &conn.stage.staging_schema;
    let schema = StagingSchema::parse(name, staging.dialect, &staging.database)
        .map_err(|e| anyhow::anyhow!("--stagingSchema {name:?}: {e}"))?;
    let tables = Tables::new(&schema);
    crate::target::run_ddl(&staging, &tables.ddl(staging.dialect))
        .await
        .context("creating the jwt tables")?;
    Ok((staging, tables))
}

/// The `jti` of a compact token, or `id` itself when it is not one.
pub(crate) fn token_id(id: &str) -> anyhow::Result<String> {
    let parts: Vec<&str> = id.trim().split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        return Ok(id.trim().to_string());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .context("the token's payload is not base64url")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).context("the token's payload is not JSON")?;
    match claims.get("jti").and_then(|j| j.as_str()) {
        Some(jti) if !jti.is_empty() => Ok(jti.to_string()),
        _ => bail!("the token has no jti"),
    }
}

pub(crate) async fn run(args: JwtArgs) -> anyhow::Result<()> {
    match args.command {
        JwtCommand::Keys(conn) => {
            let (db, tables) = open(&conn).await?;
            let rows: Vec<(String, bool, String)> = sqlx::query_as(&format!(
                "SELECT id::TEXT, active, public_key FROM {} ORDER BY id",
                tables.keys
            ))
            .fetch_all(&db.pool)
            .await?;
            for (id, active, pem) in rows {
                let what = match parse_public_key(&pem) {
                    Ok(k) => k
                        .algs
                        .iter()
                        .map(|a| a.name())
                        .collect::<Vec<_>>()
                        .join(","),
                    Err(e) => format!("INVALID: {e} (sinks keep their previous keys)"),
                };
                let state = if active { "active" } else { "inactive" };
                println!("{id}  {state}  {what}");
            }
            Ok(())
        }
        JwtCommand::AddKey { conn, file } => {
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            parse_public_key(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let (db, tables) = open(&conn).await?;
            let id: String = sqlx::query_scalar(&format!(
                "INSERT INTO {} (public_key) VALUES ($1) RETURNING id::TEXT",
                tables.keys
            ))
            .bind(pem.trim_end())
            .fetch_one(&db.pool)
            .await?;
            println!("{id}");
            Ok(())
        }
        JwtCommand::Revoke { conn, id } => {
            let jti = token_id(&id)?;
            let (db, tables) = open(&conn).await?;
            sqlx::query(&format!(
                "INSERT INTO {} (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
                tables.revoked
            ))
            .bind(&jti)
            .execute(&db.pool)
            .await?;
            println!("revoked {jti}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_takes_a_jti_or_a_token() {
        assert_eq!(token_id(" abc-1 ").expect("jti"), "abc-1");
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"jti":"the-id"}"#);
        assert_eq!(
            token_id(&format!("e30.{payload}.sig")).expect("token"),
            "the-id"
        );
        let no_jti = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("{}");
        assert!(token_id(&format!("e30.{no_jti}.sig")).is_err());
    }
}
