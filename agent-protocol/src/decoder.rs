//! Streaming frame decoder.

use alloc::vec::Vec;

use crate::codec::decode_frame;
use crate::{DecodeError, Frame, MAX_FRAME_LEN};

/// Incremental decoder: push bytes as they arrive, pop whole frames.
///
/// Memory use is bounded by what was pushed and not yet popped; the decoder
/// never allocates on the strength of a length field. After a fatal error
/// ([`DecodeError::BadLength`]) it is *poisoned*: it drops its buffer,
/// ignores further input and returns that error again from every
/// [`FrameDecoder::next_frame`].
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    poisoned: Option<DecodeError>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.poisoned.is_some() {
            return;
        }
        // Reclaim consumed space before growing.
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= self.buf.len() / 2) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Pops the next whole frame, if one is buffered.
    ///
    /// A non-fatal error consumes the offending frame; call again for the
    /// next one. A fatal error poisons the decoder.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let pending = &self.buf[self.pos..];
        match decode_frame(pending) {
            Ok(Some((frame, used))) => {
                self.pos += used;
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) if e.is_fatal() => {
                self.buf = Vec::new();
                self.pos = 0;
                self.poisoned = Some(e.clone());
                Err(e)
            }
            Err(e) => {
                // Non-fatal errors are only produced once the whole frame is
                // present, so its extent is the validated length field.
                let len = pending
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .unwrap_or(0);
                self.pos += (4 + len).min(pending.len());
                Err(e)
            }
        }
    }

    /// The bytes buffered and not yet returned as frames (the start of an incomplete
    /// frame, or frames not popped yet), oldest first.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Drops up to `max` buffered bytes (the raw bytes of a channel test that arrived with
    /// the frame announcing them, see "Channel tests" in the crate docs); returns how many
    /// were dropped. A poisoned decoder has none.
    pub fn discard(&mut self, max: usize) -> usize {
        let n = self.buffered_len().min(max);
        self.pos += n;
        n
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether a fatal error has been seen.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Largest number of bytes that can be buffered while a frame is
    /// incomplete (header + [`MAX_FRAME_LEN`]); useful to size read buffers.
    pub const fn max_frame_bytes() -> usize {
        4 + MAX_FRAME_LEN
    }
}
