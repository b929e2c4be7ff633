//! Postgres binary `COPY … FROM STDIN (FORMAT binary)` rows, written by hand: a header,
//! then per row a field count and each field as a length and its bytes in the type's
//! binary form, then a trailer. Bytes go in as they are (no hex, no escaping), which
//! halves the block commit's time next to the text format.
//! Format: <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>.

/// The signature, flags and header-extension length every binary COPY starts with.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Builds the bytes of one binary COPY.
pub struct CopyRows {
    out: Vec<u8>,
}

impl CopyRows {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut out = Vec::with_capacity(bytes + HEADER.len() + 2);
        out.extend_from_slice(HEADER);
        Self { out }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.out.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.out.extend_from_slice(bytes);
        self
    }

    /// BIGINT.
    pub fn int8(&mut self, v: i64) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// INTEGER.
    pub fn int4(&mut self, v: i32) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    /// TEXT (UTF-8 as is).
    pub fn text(&mut self, v: &str) -> &mut Self {
        self.field(v.as_bytes())
    }

    /// BYTEA, or NULL for `None`.
    pub fn bytea(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(bytes) => self.field(bytes),
            None => {
                self.out.extend_from_slice(&(-1i32).to_be_bytes());
                self
            }
        }
    }

    /// NUMERIC holding a non-negative integer.
    pub fn numeric(&mut self, v: u128) -> &mut Self {
        self.field(&numeric(v))
    }

    /// The finished COPY data (with its trailer).
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&(-1i16).to_be_bytes());
        self.out
    }
}

/// A non-negative integer in NUMERIC's binary form: digit count, weight (of the first
/// digit, in powers of 10,000), sign, display scale, then base-10,000 digits, most
/// significant first, trailing zero digits left out.
pub fn numeric(mut v: u128) -> Vec<u8> {
    let mut digits: Vec<i16> = Vec::new();
    while v > 0 {
        digits.push((v % 10_000) as i16);
        v /= 10_000;
    }
    digits.reverse();
    let weight = digits.len() as i16 - 1;
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let mut out = Vec::with_capacity(8 + 2 * digits.len());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&if digits.is_empty() { 0i16 } else { weight }.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes()); // positive
    out.extend_from_slice(&0u16.to_be_bytes()); // no decimals
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(bytes: &[u8]) -> Vec<i16> {
        bytes.chunks(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }

    #[test]
    fn numerics_are_base_10000_digits_with_weight_and_no_trailing_zeros() {
        // [ndigits, weight, sign, dscale, digits…]
        assert_eq!(words(&numeric(0)), vec![0, 0, 0, 0]);
        assert_eq!(words(&numeric(7)), vec![1, 0, 0, 0, 7]);
        assert_eq!(words(&numeric(10_000)), vec![1, 1, 0, 0, 1]);
        assert_eq!(words(&numeric(123_450_006)), vec![3, 2, 0, 0, 1, 2345, 6]);
        assert_eq!(words(&numeric(10u128.pow(20))), vec![1, 5, 0, 0, 1]);
        let max = words(&numeric(u128::MAX));
        assert_eq!((max[0], max[1]), (10, 9), "39 decimal digits: 10 groups");
        assert_eq!(max[4], 340, "340282366920938463463374607431768211455: its first group is 340");
    }

    #[test]
    fn rows_are_counted_fields_between_header_and_trailer() {
        let mut rows = CopyRows::with_capacity(64);
        rows.row(3).int8(-1).text("a\tb").bytea(None);
        let bytes = rows.finish();
        assert!(bytes.starts_with(b"PGCOPY\n\xff\r\n\0"));
        let body = &bytes[HEADER.len()..];
        assert_eq!(&body[..2], &3i16.to_be_bytes());
        assert_eq!(&body[2..6], &8i32.to_be_bytes());
        assert_eq!(&body[6..14], &(-1i64).to_be_bytes());
        assert_eq!(&body[14..18], &3i32.to_be_bytes());
        assert_eq!(&body[18..21], b"a\tb", "text goes in unescaped");
        assert_eq!(&body[21..25], &(-1i32).to_be_bytes(), "NULL");
        assert_eq!(&body[25..], &(-1i16).to_be_bytes(), "trailer");
    }
}
