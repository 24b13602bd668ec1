//! Random identifiers and tokens, and hashing of secrets that are stored.

use sha2::{Digest, Sha256};

use crate::error::AppError;

/// `bytes` random bytes from the runtime's Web Crypto, hex encoded.
pub fn random_hex(bytes: usize) -> Result<String, AppError> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(|e| AppError::Internal(format!("random: {e}")))?;
    Ok(hex::encode(buf))
}

/// SHA-256 of `secret`, hex encoded: what is stored instead of a token.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Equality that takes the same time wherever the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `id` looks like a session id (32 lowercase hex digits).
pub fn is_session_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
