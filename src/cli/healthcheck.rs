//! `cdc-sink healthcheck`: probe a running sink's `/_/healthz` and exit 0 only on 200, so a
//! container's HEALTHCHECK needs no curl in the image.

use crate::server::client::{Client, ClientOptions};
use anyhow::{bail, Context};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct HealthcheckArgs {
    /// The sink's `--bindAddr` port (or its `--metricsAddr` port with `--http`).
    #[arg(long, env = "CDC_SINK_HEALTHCHECK_PORT", default_value_t = 30004)]
    pub(crate) port: u16,
    /// Host to probe; the container itself by default.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Plain HTTP (a `--metricsAddr` listener) instead of TLS.
    #[arg(long)]
    pub(crate) http: bool,
    /// Accept any server certificate (the sink's `--tlsSelfSigned` certificate).
    #[arg(long = "insecureSkipVerify")]
    pub(crate) insecure_skip_verify: bool,
    /// PEM certificate to trust instead (e.g. the sink's `--tlsCertificate`).
    #[arg(long = "caCert", conflicts_with = "insecure_skip_verify")]
    pub(crate) ca_cert: Option<std::path::PathBuf>,
    /// Give up after this long (e.g. `5s`).
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration)]
    pub(crate) timeout: Duration,
}

impl HealthcheckArgs {
    fn url(&self) -> String {
        let scheme = if self.http { "http" } else { "https" };
        // An IPv6 literal needs brackets in a URL.
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

pub(crate) async fn run(args: HealthcheckArgs) -> anyhow::Result<()> {
    if !args.http && !args.insecure_skip_verify && args.ca_cert.is_none() {
        bail!(
            "a TLS probe needs --insecureSkipVerify or --caCert (or --http for a metrics listener)"
        );
    }
    let ca_cert_pem = match &args.ca_cert {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let url = args.url();
    let client = Client::new(
        &url,
        ClientOptions {
            insecure_skip_verify: args.insecure_skip_verify,
            ca_cert_pem,
            ..Default::default()
        },
    )?;
    let (status, body) = tokio::time::timeout(args.timeout, client.get("/_/healthz"))
        .await
        .with_context(|| format!("{url}/_/healthz did not answer within {:?}", args.timeout))??;
    if status != http::StatusCode::OK {
        bail!("{url}/_/healthz answered {status}: {}", body.trim());
    }
    println!("ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: HealthcheckArgs,
    }

    #[test]
    fn urls_bracket_ipv6_and_pick_the_scheme() {
        let parse = |argv: &[&str]| {
            Wrap::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
                .expect("parses")
                .args
        };
        assert_eq!(parse(&[]).url(), "https://127.0.0.1:30004");
        assert_eq!(
            parse(&["--host", "::1", "--port", "1", "--http"]).url(),
            "http://[::1]:1"
        );
        assert!(Wrap::try_parse_from(["x", "--insecureSkipVerify", "--caCert", "c.pem"]).is_err());
    }
}
