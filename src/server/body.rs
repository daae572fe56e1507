//! Changefeed request bodies: admission against the server-wide budget of body bytes in
//! flight (`--maxInflightBytes`), the per-request limit (`--maxRequestBytes`, applied to the
//! decompressed size too) and `Content-Encoding` (gzip, zstd).
//!
//! A request reserves its declared `Content-Length` before anything is read, and bodies without
//! one reserve as their frames arrive; a reservation that does not fit is refused at once with
//! 503, so memory is bounded whatever the number of concurrent requests. The reservation is held
//! until the request's processing ends, whichever way it ends.

use crate::metrics as m;
use bytes::{Bytes, BytesMut};
use http::header::CONTENT_ENCODING;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;
use std::io::Read;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// What decompression reads per step: the limits are checked between steps.
const INFLATE_STEP: usize = 256 << 10;
/// Zstandard decoders are expected to handle windows of at least 8 MiB (RFC 8878).
const MIN_ZSTD_WINDOW: u64 = 8 << 20;
/// The longest `Content-Encoding` value echoed back in a 415.
const MAX_ECHOED_ENCODING: usize = 40;

/// Why a body was not accepted. Display is the one-line reason the client is answered with;
/// what the transport or the decoder said is folded into that text (it is the reason, and the
/// type stays comparable), never exposed as a source chain.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum BodyError {
    #[error("request body larger than {limit} bytes (--maxRequestBytes)")]
    TooLarge { limit: u64 },
    #[error("decompressed request body larger than {limit} bytes (--maxRequestBytes)")]
    DecompressedTooLarge { limit: u64 },
    #[error(
        "server busy: request bodies in flight would exceed {budget} bytes (--maxInflightBytes)"
    )]
    Busy { budget: u64 },
    #[error("unsupported Content-Encoding {0:?}; accepted: gzip, zstd, identity")]
    UnsupportedEncoding(String),
    #[error("could not read request body: {0}")]
    Read(String),
    #[error("could not decompress the {encoding} request body: {reason}")]
    Corrupt {
        encoding: &'static str,
        reason: String,
    },
}

impl BodyError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } | BodyError::DecompressedTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            BodyError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            BodyError::Read(_) | BodyError::Corrupt { .. } => StatusCode::BAD_REQUEST,
        }
    }
}

/// The codings a body may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// The body's coding from its `Content-Encoding` header; more than one coding (other than
    /// `identity`) is refused, as changefeeds apply one.
    pub(crate) fn of(headers: &HeaderMap) -> Result<Encoding, BodyError> {
        let mut found = Encoding::Identity;
        for value in headers.get_all(CONTENT_ENCODING) {
            let text = String::from_utf8_lossy(value.as_bytes());
            for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let this = match coding.to_ascii_lowercase().as_str() {
                    "identity" => continue,
                    "gzip" | "x-gzip" => Encoding::Gzip,
                    "zstd" => Encoding::Zstd,
                    _ => return Err(unsupported(coding)),
                };
                if found != Encoding::Identity {
                    return Err(unsupported(&text));
                }
                found = this;
            }
        }
        Ok(found)
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }
}

fn unsupported(text: &str) -> BodyError {
    BodyError::UnsupportedEncoding(text.chars().take(MAX_ECHOED_ENCODING).collect())
}

/// The server-wide budget of body bytes in flight.
#[derive(Clone, Debug)]
pub(crate) struct Budget {
    free: Arc<Semaphore>,
    total: u64,
}

impl Budget {
    pub(crate) fn new(total: u64) -> Budget {
        let permits = usize::try_from(total)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Budget {
            free: Arc::new(Semaphore::new(permits)),
            total,
        }
    }

    /// An empty reservation, to be grown as the body's size becomes known.
    pub(crate) fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: 0,
        }
    }

    /// Bytes not reserved now.
    #[cfg(test)]
    fn available(&self) -> u64 {
        self.free.available_permits() as u64
    }
}

/// Bytes of the budget held by one request; given back when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Budget,
    held: u64,
}

impl Reservation {
    /// Holds at least `bytes` in all, or fails without waiting (keeping what it held).
    pub(crate) fn grow_to(&mut self, bytes: u64) -> Result<(), BodyError> {
        while self.held < bytes {
            let step = u32::try_from(bytes - self.held).unwrap_or(u32::MAX);
            match self.budget.free.try_acquire_many(step) {
                Ok(permit) => {
                    permit.forget();
                    self.held += u64::from(step);
                    metrics::gauge!(m::HTTP_INFLIGHT_BYTES).increment(f64::from(step));
                }
                Err(_) => {
                    metrics::counter!(m::HTTP_OVER_BUDGET).increment(1);
                    return Err(BodyError::Busy {
                        budget: self.budget.total,
                    });
                }
            }
        }
        Ok(())
    }

    /// Gives back what is held beyond `bytes`.
    pub(crate) fn shrink_to(&mut self, bytes: u64) {
        if self.held > bytes {
            self.release(self.held - bytes);
        }
    }

    #[cfg(test)]
    fn held(&self) -> u64 {
        self.held
    }

    fn release(&mut self, bytes: u64) {
        self.held -= bytes;
        self.budget
            .free
            .add_permits(usize::try_from(bytes).unwrap_or(usize::MAX));
        metrics::gauge!(m::HTTP_INFLIGHT_BYTES).decrement(bytes as f64);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held > 0 {
            self.release(self.held);
        }
    }
}

/// Reads a whole body within `limit` bytes (before and after decompression) and the budget.
/// The declared size is reserved and checked before anything is read; the returned
/// reservation covers the returned bytes and must be kept while they are in use.
pub(crate) async fn read<B>(
    body: B,
    headers: &HeaderMap,
    limit: u64,
    budget: &Budget,
) -> Result<(Bytes, Reservation), BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let encoding = Encoding::of(headers)?;
    // A declared Content-Length over the limit is refused without reading anything.
    let declared = body.size_hint().lower();
    if declared > limit {
        return Err(BodyError::TooLarge { limit });
    }
    let mut reservation = budget.reservation();
    reservation.grow_to(declared)?;
    let raw = collect(body, declared, limit, &mut reservation).await?;
    if encoding == Encoding::Identity {
        return Ok((raw, reservation));
    }
    // Decompression is CPU work of up to `limit` bytes of output: off the async workers.
    tokio::task::spawn_blocking(move || {
        let out = decompress(encoding, &raw, limit, &mut reservation)?;
        drop(raw);
        reservation.shrink_to(out.len() as u64);
        Ok((out, reservation))
    })
    .await
    .map_err(|e| BodyError::Read(format!("decompression task failed: {e}")))?
}

/// Reads the frames of `body`, reserving past `declared` as they come.
async fn collect<B>(
    mut body: B,
    declared: u64,
    limit: u64,
    reservation: &mut Reservation,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    // One frame (the common case for small bodies) is passed on without copying; more are
    // copied once into a buffer sized by the declared length when there is one.
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        total += data.len() as u64;
        if total > limit {
            return Err(BodyError::TooLarge { limit });
        }
        reservation.grow_to(total)?;
        match (&mut buf, first.take()) {
            (Some(b), _) => b.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(one)) => {
                let mut b = BytesMut::with_capacity(declared.max(total) as usize);
                b.extend_from_slice(&one);
                b.extend_from_slice(&data);
                buf = Some(b);
            }
        }
    }
    Ok(match (buf, first) {
        (Some(b), _) => b.freeze(),
        (None, Some(one)) => one,
        (None, None) => Bytes::new(),
    })
}

/// Decompresses `raw`, refusing as soon as the output passes `limit` or does not fit the
/// budget (the compressed bytes stay reserved meanwhile).
fn decompress(
    encoding: Encoding,
    raw: &[u8],
    limit: u64,
    reservation: &mut Reservation,
) -> Result<Bytes, BodyError> {
    let compressed = raw.len() as u64;
    let corrupt = |e: std::io::Error| BodyError::Corrupt {
        encoding: encoding.name(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    match encoding {
        Encoding::Identity => out.extend_from_slice(raw),
        Encoding::Gzip => {
            let mut r = flate2::read::MultiGzDecoder::new(raw);
            drain(&mut r, &mut out, limit, compressed, reservation).map_err(|e| e.or(corrupt))?;
        }
        Encoding::Zstd => {
            let mut input = raw;
            // A stream may hold several frames, and skippable frames between them.
            while !input.is_empty() {
                let mut frame = ruzstd::decoding::FrameDecoder::new();
                frame.set_max_window_size(limit.max(MIN_ZSTD_WINDOW));
                let mut r =
                    match ruzstd::decoding::StreamingDecoder::new_with_decoder(&mut input, frame) {
                        Ok(r) => r,
                        Err(ruzstd::decoding::errors::FrameDecoderError::ReadFrameHeaderError(
                            ruzstd::decoding::errors::ReadFrameHeaderError::SkipFrame {
                                length,
                                ..
                            },
                        )) => {
                            input = input.get(length as usize..).ok_or_else(|| {
                                corrupt(std::io::Error::other("truncated skippable frame"))
                            })?;
                            continue;
                        }
                        Err(e) => return Err(corrupt(std::io::Error::other(e))),
                    };
                drain(&mut r, &mut out, limit, compressed, reservation)
                    .map_err(|e| e.or(corrupt))?;
                let frame = r.into_frame_decoder();
                if let Some(sent) = frame.get_checksum_from_data() {
                    if frame.get_calculated_checksum() != Some(sent) {
                        return Err(corrupt(std::io::Error::other("checksum mismatch")));
                    }
                }
            }
        }
    }
    Ok(Bytes::from(out))
}

/// A failure while draining a decoder: a refusal, or the decoder's own error.
enum Drain {
    Refused(BodyError),
    Decoder(std::io::Error),
}

impl Drain {
    fn or(self, corrupt: impl Fn(std::io::Error) -> BodyError) -> BodyError {
        match self {
            Drain::Refused(e) => e,
            Drain::Decoder(e) => corrupt(e),
        }
    }
}

/// Appends everything `r` yields to `out`, step by step, within `limit` bytes of output and
/// the budget (which also holds the `compressed` input).
fn drain(
    r: &mut impl Read,
    out: &mut Vec<u8>,
    limit: u64,
    compressed: u64,
    reservation: &mut Reservation,
) -> Result<(), Drain> {
    loop {
        let len = out.len();
        let room = usize::try_from(limit + 1)
            .unwrap_or(usize::MAX)
            .saturating_sub(len)
            .min(INFLATE_STEP);
        // One byte past the limit is enough to know the body is too large.
        if room == 0 {
            return Err(Drain::Refused(BodyError::DecompressedTooLarge { limit }));
        }
        reservation
            .grow_to(compressed + (len + room) as u64)
            .map_err(Drain::Refused)?;
        out.resize(len + room, 0);
        let n = match r.read(&mut out[len..]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => {
                out.truncate(len);
                return Err(Drain::Decoder(e));
            }
        };
        out.truncate(len + n);
        if n == 0 {
            return Ok(());
        }
        if out.len() as u64 > limit {
            return Err(Drain::Refused(BodyError::DecompressedTooLarge { limit }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;
    use http::HeaderValue;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;
    use std::io::Write;

    fn headers(encoding: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(e) = encoding {
            h.insert(CONTENT_ENCODING, HeaderValue::from_str(e).unwrap());
        }
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    /// A body in `chunks` frames without a declared length (chunked transfer).
    fn chunked(
        data: &[u8],
        chunks: usize,
    ) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Unpin> {
        let size = data.len().div_ceil(chunks.max(1)).max(1);
        let frames: Vec<_> = data
            .chunks(size)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    async fn read_full(
        data: Vec<u8>,
        encoding: Option<&str>,
        limit: u64,
        budget: &Budget,
    ) -> Result<(Bytes, Reservation), BodyError> {
        read(
            Full::new(Bytes::from(data)),
            &headers(encoding),
            limit,
            budget,
        )
        .await
    }

    #[test]
    fn encodings_are_read_case_insensitively_and_unknown_ones_refused() {
        assert_eq!(Encoding::of(&headers(None)), Ok(Encoding::Identity));
        assert_eq!(Encoding::of(&headers(Some("GZip"))), Ok(Encoding::Gzip));
        assert_eq!(Encoding::of(&headers(Some("x-gzip"))), Ok(Encoding::Gzip));
        assert_eq!(Encoding::of(&headers(Some(" zstd "))), Ok(Encoding::Zstd));
        assert_eq!(
            Encoding::of(&headers(Some("identity, zstd"))),
            Ok(Encoding::Zstd)
        );
        for bad in ["br", "deflate", "gzip, zstd", "gzip, gzip"] {
            let e = Encoding::of(&headers(Some(bad))).unwrap_err();
            assert_eq!(e.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        let e = Encoding::of(&headers(Some(&"x".repeat(500)))).unwrap_err();
        assert!(e.to_string().len() < 120, "{e}");
    }

    #[tokio::test]
    async fn plain_bodies_are_read_whole_and_their_bytes_stay_reserved() {
        let budget = Budget::new(1000);
        let (body, held) = read_full(vec![b'a'; 600], None, 1000, &budget)
            .await
            .unwrap();
        assert_eq!(body.len(), 600);
        assert_eq!((held.held(), budget.available()), (600, 400));
        // The rest of the budget is too small for a second such body: refused before reading.
        let e = read_full(vec![b'b'; 600], None, 1000, &budget)
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::Busy { budget: 1000 });
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(budget.available(), 400, "a refusal keeps nothing");
        drop(held);
        assert_eq!(budget.available(), 1000);
        read_full(vec![b'b'; 600], None, 1000, &budget)
            .await
            .expect("fits once the first is done");
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test]
    async fn chunked_bodies_reserve_as_they_arrive() {
        let budget = Budget::new(1000);
        let data: Vec<u8> = (0..900u32).map(|i| i as u8).collect();
        let (body, held) = read(chunked(&data, 7), &headers(None), 1000, &budget)
            .await
            .unwrap();
        assert_eq!(&body[..], &data[..]);
        assert_eq!(held.held(), 900);
        // Another one starts, and is refused once it passes what is left.
        let e = read(chunked(&data, 7), &headers(None), 1000, &budget)
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::Busy { budget: 1000 });
        assert_eq!(budget.available(), 100);
        drop(held);
        // Over the limit: 413 as soon as the total passes it.
        let e = read(chunked(&data, 3), &headers(None), 500, &budget)
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::TooLarge { limit: 500 });
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let budget = Budget::new(10_000);
        let e = read_full(vec![0; 2000], None, 1000, &budget)
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::TooLarge { limit: 1000 });
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn gzip_and_zstd_bodies_are_decompressed_and_only_their_output_stays_reserved() {
        let text =
            br#"{"payload":[{"after":{"k":1},"key":[1],"topic":"t","updated":"1.0"}]}"#.repeat(200);
        let budget = Budget::new(1 << 20);
        for (name, packed) in [("gzip", gzip(&text)), ("zstd", zstd(&text))] {
            assert!(packed.len() < text.len() / 4, "{name} compresses");
            let (body, held) = read_full(packed.clone(), Some(name), 1 << 20, &budget)
                .await
                .unwrap();
            assert_eq!(&body[..], &text[..], "{name}");
            assert_eq!(held.held(), text.len() as u64, "{name}");
            drop(held);
            // Chunked too.
            let (body, _) = read(chunked(&packed, 5), &headers(Some(name)), 1 << 20, &budget)
                .await
                .unwrap();
            assert_eq!(&body[..], &text[..], "{name}");
        }
        assert_eq!(budget.available(), 1 << 20);
    }

    #[tokio::test]
    async fn concatenated_members_and_frames_are_all_read() {
        let budget = Budget::new(1 << 20);
        let mut two = gzip(b"hello ");
        two.extend(gzip(b"world"));
        let (body, _) = read_full(two, Some("gzip"), 100, &budget).await.unwrap();
        assert_eq!(&body[..], b"hello world");
        let mut two = zstd(b"hello ");
        // A skippable frame between two data frames.
        two.extend([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        two.extend(zstd(b"world"));
        let (body, _) = read_full(two, Some("zstd"), 100, &budget).await.unwrap();
        assert_eq!(&body[..], b"hello world");
    }

    #[tokio::test]
    async fn a_bomb_is_refused_once_its_output_passes_the_limit() {
        let limit = 1 << 20;
        let zeros = vec![0u8; 64 << 20];
        let budget = Budget::new(64 << 20);
        for (name, packed) in [("gzip", gzip(&zeros)), ("zstd", zstd(&zeros))] {
            assert!(packed.len() < limit as usize, "{name}: {}", packed.len());
            let e = read_full(packed, Some(name), limit, &budget)
                .await
                .unwrap_err();
            assert_eq!(e, BodyError::DecompressedTooLarge { limit }, "{name}");
            assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(budget.available(), 64 << 20, "{name}");
        }
        // Within the limit but not within the budget: 503, not 413.
        let small = Budget::new(2 << 20);
        let e = read_full(gzip(&zeros[..3 << 20]), Some("gzip"), 8 << 20, &small)
            .await
            .unwrap_err();
        assert_eq!(e, BodyError::Busy { budget: 2 << 20 });
        assert_eq!(small.available(), 2 << 20);
    }

    #[tokio::test]
    async fn corrupt_compressed_bodies_are_400() {
        let budget = Budget::new(1 << 20);
        for name in ["gzip", "zstd"] {
            let e = read_full(b"not compressed at all".to_vec(), Some(name), 1000, &budget)
                .await
                .unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{name}: {e}");
            assert!(e.to_string().contains(name), "{e}");
        }
        let mut cut = gzip(&[b'x'; 5000]);
        cut.truncate(cut.len() - 6);
        let e = read_full(cut, Some("gzip"), 10_000, &budget)
            .await
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(budget.available(), 1 << 20);
    }
}
