//! The one error type of the webhook decoder and its HTTP status.

use crate::hlc::HlcError;
use crate::ident::{IdentError, Table};
use http::StatusCode;

/// Why a changefeed request was refused. `Display` is a one-line reason meant for the response
/// body; inner errors are folded into the text, never exposed as a source chain.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    // ---- routing (404) ----
    #[error("request path has {0} segments, at most 7 are allowed")]
    TooManySegments(usize),
    #[error("expecting at least 2 path segments (/database/schema)")]
    TooFewSegments,
    #[error("invalid escape in path segment {0:?}")]
    BadEscape(String),
    #[error("path did not match any expected patterns")]
    NoMatch,
    #[error("invalid resolved file name {name:?}: {reason}")]
    BadResolvedName { name: String, reason: &'static str },
    #[error("invalid table name in path: {0}")]
    PathTable(IdentError),

    // ---- bad input (400) ----
    #[error("request body is empty")]
    EmptyBody,
    #[error("request body is not valid UTF-8")]
    NotUtf8,
    #[error("could not decode payload: {0}")]
    Json(String),
    #[error("unknown field \"{0}\"")]
    UnknownField(String),
    #[error("duplicate field \"{0}\"")]
    DuplicateField(String),
    #[error("field \"{field}\" must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("a payload element must be a JSON object")]
    ElementNotObject,
    #[error("invalid timestamp: {0}")]
    BadTime(HlcError),
    #[error(
        "mutation has no \"updated\" time; CREATE CHANGEFEED must specify the 'WITH updated' option"
    )]
    MissingUpdated,
    #[error(
        "could not find timestamp in field \"updated\" while attempting to parse envelope=wrapped"
    )]
    QueryMissingUpdated,
    #[error("mutation has zero time")]
    ZeroTime,
    #[error("mutation has no key")]
    MissingKey,
    #[error("mutation has an empty key")]
    EmptyKey,
    #[error("empty table name")]
    EmptyTableName,
    #[error("invalid table name: {0}")]
    TableName(IdentError),
    #[error(
        "the bare envelope is not supported for CDC queries; create the changefeed \
         WITH envelope=\"wrapped\",format=\"json\",diff"
    )]
    BareEnvelope,
    #[error("table \"{0}\" not found")]
    TableNotFound(Table),
    #[error("table \"{0}\" has no primary key")]
    NoPrimaryKey(Table),
    #[error("missing primary key: \"{0}\"")]
    MissingPrimaryKey(String),
    #[error("table \"{table}\": field \"{field}\" is nested deeper than {limit} levels")]
    TooDeep {
        table: Table,
        field: &'static str,
        limit: usize,
    },
    #[error(
        "table \"{table}\": a key of {bytes} bytes is longer than the {limit} bytes staging can index"
    )]
    KeyTooLarge {
        table: Table,
        bytes: usize,
        limit: usize,
    },
    #[error("line {line} is longer than {limit} bytes")]
    LineTooLong { line: usize, limit: usize },
    /// Locates an error inside the body (`payload[3]`, `line 7`).
    #[error("{at}: {error}")]
    At {
        at: String,
        error: Box<WebhookError>,
    },
}

impl WebhookError {
    /// 404 when the path names nothing we serve, 400 for any bad body: CockroachDB retries any
    /// non-2xx alike, so the code is free to tell people and load balancers which it was.
    pub(crate) fn status(&self) -> StatusCode {
        if self.is_routing() {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::BAD_REQUEST
        }
    }

    /// True for errors found while parsing the request path.
    pub(crate) fn is_routing(&self) -> bool {
        match self {
            WebhookError::TooManySegments(_)
            | WebhookError::TooFewSegments
            | WebhookError::BadEscape(_)
            | WebhookError::NoMatch
            | WebhookError::BadResolvedName { .. }
            | WebhookError::PathTable(_) => true,
            WebhookError::At { error, .. } => error.is_routing(),
            _ => false,
        }
    }

    /// The error without its location wrappers.
    #[cfg(test)]
    pub(crate) fn root(&self) -> &WebhookError {
        match self {
            WebhookError::At { error, .. } => error.root(),
            e => e,
        }
    }

    pub(crate) fn at(self, at: impl Into<String>) -> WebhookError {
        WebhookError::At {
            at: at.into(),
            error: Box::new(self),
        }
    }

    /// serde_json errors are already one line (message plus position).
    pub(crate) fn json(e: serde_json::Error) -> WebhookError {
        WebhookError::Json(e.to_string())
    }
}
