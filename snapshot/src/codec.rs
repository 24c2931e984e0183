//! The compact binary serde encoding used for every payload this crate writes.
//!
//! bincode 1.3 with explicit options: little-endian, variable-length
//! integers (LEB128-like "varint" encoding of bincode), trailing bytes
//! rejected, and a byte limit equal to the payload length when decoding, so a
//! corrupt length prefix inside the payload can never make the decoder
//! allocate or read past the bytes that actually exist.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CodecError, Error, Result};

/// Codec options with a decode/encode byte `limit`.
pub(crate) fn options(limit: u64) -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_little_endian()
        .with_varint_encoding()
        .reject_trailing_bytes()
        .with_limit(limit)
}

/// Serializes `value`.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    options(u64::MAX)
        .serialize(value)
        .map_err(|e| Error::Encode(CodecError(e)))
}

/// Deserializes exactly `bytes` (no trailing data, never reading past the slice).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    options(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| Error::Decode(CodecError(e)))
}
