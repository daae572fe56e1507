//! How an error is shown with its causes. Every error type's `Display` prints that error alone
//! and keeps its causes as `source()`s; where the whole story is wanted (the command line's
//! last words, an `error = …` log field, a 4xx answer whose reason is the cause) the error is
//! wrapped in [`ErrorChain`], which prints `error: cause: cause`.

use std::fmt;

/// An error and its causes on one line: `top: cause: cause`.
///
/// A cause whose text the line already holds is left out, since many errors (sqlx's and
/// hyper's among them) print their own cause. A database error prints as
/// [`crate::target::safe`] does (SQLSTATE and names, never the values a message may quote), and
/// the walk stops there: the server's error underneath is the same message unmasked.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = String::new();
        let mut next = Some(self.0);
        while let Some(e) = next {
            let (text, last) = match e.downcast_ref::<sqlx::Error>() {
                Some(sql) => (
                    crate::target::safe(sql).to_string(),
                    matches!(sql, sqlx::Error::Database(_)),
                ),
                None => (e.to_string(), false),
            };
            if !line.contains(&text) {
                if !line.is_empty() {
                    line.push_str(": ");
                }
                line.push_str(&text);
            }
            if last {
                break;
            }
            next = e.source();
        }
        f.write_str(&line)
    }
}

impl fmt::Debug for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorChain;

    #[derive(Debug, thiserror::Error)]
    #[error("could not open the box")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("the lid is stuck")]
    struct Middle(#[source] std::io::Error);

    /// Prints its cause itself, as many library errors do.
    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn prints_every_cause_in_order() {
        let e = Outer(Middle(std::io::Error::other("rust")));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "could not open the box: the lid is stuck: rust"
        );
    }

    #[test]
    fn an_error_without_causes_prints_alone() {
        let e = std::io::Error::other("plain");
        assert_eq!(ErrorChain(&e).to_string(), "plain");
    }

    #[test]
    fn a_cause_already_printed_is_not_repeated() {
        let e = Repeats(std::io::Error::other("gone"));
        assert_eq!(ErrorChain(&e).to_string(), "wrapped: gone");
    }

    #[test]
    fn a_driver_error_prints_as_it_is() {
        #[derive(Debug, thiserror::Error)]
        #[error("could not write")]
        struct Write(#[source] sqlx::Error);
        // Not a server error: sqlx prints it as it is, and its own cause is left out.
        let e = Write(sqlx::Error::Io(std::io::Error::other("reset")));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "could not write: error communicating with database: reset"
        );
    }

    /// A server error as the database driver hands it over: a message quoting a value.
    #[derive(Debug, thiserror::Error)]
    #[error("invalid input syntax for type integer: \"secret\"")]
    struct Refused;

    impl sqlx::error::DatabaseError for Refused {
        fn message(&self) -> &str {
            "invalid input syntax for type integer: \"secret\""
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some("22P02".into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn a_database_error_is_masked_and_its_unmasked_cause_left_out() {
        #[derive(Debug, thiserror::Error)]
        #[error("could not write")]
        struct Write(#[source] sqlx::Error);
        let e = Write(sqlx::Error::Database(Box::new(Refused)));
        let line = ErrorChain(&e).to_string();
        assert!(
            line.starts_with("could not write: invalid input syntax"),
            "{line}"
        );
        assert!(line.contains("22P02"), "{line}");
        assert!(!line.contains("secret"), "{line}");
    }

    #[test]
    fn works_on_anyhow_errors() {
        let e = anyhow::Error::new(Middle(std::io::Error::other("rust"))).context("top");
        assert_eq!(
            ErrorChain(e.as_ref()).to_string(),
            "top: the lid is stuck: rust"
        );
    }
}
