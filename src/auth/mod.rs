//! Request authentication. JWT verification is not built yet: until it is, the server refuses
//! to start unless `--disableAuthentication` says that every request may be trusted.

use crate::config::parse_duration;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// Accept every request without a token (only behind a trusted network).
    #[arg(
        long = "disableAuthentication",
        env = "CDC_SINK_DISABLE_AUTHENTICATION"
    )]
    pub disable_authentication: bool,
    /// How often JWT keys and revocations are reloaded (0 disables).
    #[arg(long = "jwtRefresh", env = "CDC_SINK_JWT_REFRESH", default_value = "1m0s", value_parser = parse_duration)]
    pub jwt_refresh: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "JWT authentication is not available in this version; start with --disableAuthentication \
(and keep the listener on a trusted network) to accept changefeed requests"
    )]
    JwtUnavailable,
}

impl AuthArgs {
    pub fn validate(&self) -> Result<(), AuthError> {
        if self.disable_authentication {
            Ok(())
        } else {
            Err(AuthError::JwtUnavailable)
        }
    }
}

/// Decides whether a request may write to a schema.
#[derive(Clone, Debug)]
pub struct Authenticator {
    disabled: bool,
}

impl Authenticator {
    pub fn new(args: &AuthArgs) -> Result<Self, AuthError> {
        args.validate()?;
        if args.disable_authentication {
            tracing::warn!("authentication disabled: every request is accepted");
        }
        Ok(Authenticator {
            disabled: args.disable_authentication,
        })
    }

    /// Whether the request (its headers and query) may write to `schema`.
    pub fn allows(
        &self,
        _headers: &http::HeaderMap,
        _query: Option<&str>,
        _schema: &crate::ident::Schema,
    ) -> bool {
        self.disabled
    }
}
