//! Reading response bodies within a byte limit and a time limit.
//!
//! Shared by the crate's HTTP clients: a body is read chunk by chunk as it
//! arrives and the limit is checked before each chunk is kept (the buffer's
//! capacity never passes it either), so a server sending gigabytes costs at
//! most the limit plus one chunk of memory.

use std::time::Duration;

/// Why a bounded body read stopped.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The body is larger than the limit (by `Content-Length`, or by what
    /// arrived).
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The connection failed while reading.
    Read(reqwest::Error),
}

/// The cause of a "body too large" error: the limit it passed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TooLarge(pub(crate) usize);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "response body larger than {} bytes", self.0)
    }
}

impl std::error::Error for TooLarge {}

/// Reads a whole 2xx body of at most `limit` bytes.
///
/// A declared `Content-Length` over the limit fails before reading; an
/// undeclared or lying length fails as soon as the bytes received pass the
/// limit, and the rest is never read (dropping the response closes the
/// connection).
pub(crate) async fn read_limited(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let declared = resp.content_length().unwrap_or(0);
    if declared > limit as u64 {
        return Err(BodyError::TooLarge { limit });
    }
    // A declared length below the limit is trusted for the first
    // allocation only.
    let mut body = Vec::with_capacity(declared as usize);
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Read)? {
        append_within(&mut body, &chunk, limit)?;
    }
    Ok(body)
}

/// Appends `chunk` to `body` unless the sum passes `limit`. The buffer
/// grows by doubling as `Vec` does, but its capacity never passes the limit.
fn append_within(body: &mut Vec<u8>, chunk: &[u8], limit: usize) -> Result<(), BodyError> {
    if chunk.len() > limit.saturating_sub(body.len()) {
        return Err(BodyError::TooLarge { limit });
    }
    let need = body.len() + chunk.len();
    if need > body.capacity() {
        let target = body.capacity().saturating_mul(2).max(need).min(limit);
        body.reserve_exact(target - body.len());
    }
    body.extend_from_slice(chunk);
    Ok(())
}

/// Cap on what is kept of an error body (4xx, 5xx): enough for any
/// provider's error object, never the whole of a hostile one.
pub(crate) const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Reads at most [`ERROR_BODY_LIMIT`] bytes of an error body, for at most
/// `timeout` (`None`: no limit). What arrived by then is returned: a
/// failure to read the rest does not change what the status and headers
/// say.
pub(crate) async fn read_error_prefix(
    mut resp: reqwest::Response,
    timeout: Option<Duration>,
) -> Vec<u8> {
    let mut body = Vec::new();
    let read = async {
        while body.len() < ERROR_BODY_LIMIT {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    let room = ERROR_BODY_LIMIT - body.len();
                    body.extend_from_slice(&c[..c.len().min(room)]);
                }
                _ => break,
            }
        }
    };
    match timeout {
        Some(t) => {
            let _ = tokio::time::timeout(t, read).await;
        }
        None => read.await,
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the chunks: the body is their concatenation while it
        /// fits, "too large" exactly when it would not, and the buffer's
        /// capacity never passes the limit.
        #[test]
        fn append_within_keeps_the_limit(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
            limit in 1usize..4000,
        ) {
            let mut body = Vec::new();
            let mut expect = Vec::new();
            for c in &chunks {
                let fits = expect.len() + c.len() <= limit;
                let r = append_within(&mut body, c, limit);
                prop_assert_eq!(r.is_ok(), fits);
                if !fits {
                    break;
                }
                expect.extend_from_slice(c);
                prop_assert!(body.capacity() <= limit);
            }
            prop_assert_eq!(body, expect);
        }
    }
}
