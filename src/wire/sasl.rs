//! SASL PLAIN (RFC 4616): the message `authzid NUL authcid NUL password`, in base64 on the
//! wire. The proxy reads it from clients and writes it to backends; the sync engine writes it.

use base64::Engine;

/// Encodes a PLAIN response as base64.
pub fn plain_response(authzid: Option<&str>, authcid: &[u8], password: &[u8]) -> String {
    let mut raw = Vec::with_capacity(authcid.len() * 2 + password.len() + 2);
    raw.extend_from_slice(authzid.unwrap_or("").as_bytes());
    raw.push(0);
    raw.extend_from_slice(authcid);
    raw.push(0);
    raw.extend_from_slice(password);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The three fields of a decoded PLAIN message; `None` unless there are exactly three.
pub fn plain_fields(data: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut parts = data.split(|&b| b == 0);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(authzid), Some(authcid), Some(password), None) => Some((authzid, authcid, password)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_round_trip() {
        let enc = plain_response(Some("alice@x"), b"admin", b"s3cret");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(enc)
            .expect("base64");
        assert_eq!(
            plain_fields(&raw),
            Some((&b"alice@x"[..], &b"admin"[..], &b"s3cret"[..]))
        );
        assert_eq!(plain_fields(b"a\0b"), None);
        assert_eq!(plain_fields(b"a\0b\0c\0d"), None);
    }
}
