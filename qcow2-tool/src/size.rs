//! Byte counts: parsing with QEMU's suffix rules, and QEMU's human-readable
//! renderings.

use std::fmt;

/// Why a size string was rejected, in `qemu_strtosz` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number, or an unknown or misplaced suffix (`-EINVAL`).
    Invalid,
    /// Negative, or too large for 64 bits (`-ERANGE`).
    Range,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Invalid => f.write_str("invalid size"),
            SizeError::Range => f.write_str("size out of range"),
        }
    }
}

/// The multiplier of a unit suffix: `B`, `K`, `M`, `G`, `T`, `P`, `E` in
/// either case, powers of 1024.
/// Parses a whole string as an unsigned integer the way C's `strtoull`
/// with base 0 does (decimal, `0x` hexadecimal or `0` octal, after optional
/// blanks and sign), as qemu-io and qemu-img do for counts and patterns.
/// `-0` is 0; any other negative value or overflow is a range error.
pub fn parse_c_unsigned(text: &str) -> Result<u64, SizeError> {
    let s = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_hexdigit()));
    let (digits, radix) = match hex {
        Some(rest) => (rest, 16),
        None if s.starts_with('0') => (s, 8),
        None => (s, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Invalid);
    }
    match u64::from_str_radix(digits, radix) {
        Ok(0) => Ok(0),
        Ok(n) if !negative => Ok(n),
        _ => Err(SizeError::Range),
    }
}

fn suffix_mul(c: Option<u8>) -> Option<u64> {
    let shift = match c?.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1 << shift)
}

/// An unsigned integer in `radix` at the start of `s`, like `strtoull`:
/// leading whitespace and a sign are allowed. Returns the value, how many
/// bytes were consumed, and whether the number was negative; `None` if no
/// digit was found. Overflow saturates and is reported as `Range`.
fn strtou64(s: &[u8], radix: u32) -> Option<(Result<u64, SizeError>, usize, bool)> {
    let mut i = s.iter().take_while(|c| c.is_ascii_whitespace()).count();
    let negative = s.get(i) == Some(&b'-');
    if matches!(s.get(i), Some(b'-' | b'+')) {
        i += 1;
    }
    if radix == 16
        && s.get(i) == Some(&b'0')
        && matches!(s.get(i + 1), Some(b'x' | b'X'))
        && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        i += 2;
    }
    let start = i;
    let mut value: Result<u64, SizeError> = Ok(0);
    while let Some(d) = s.get(i).and_then(|&c| char::from(c).to_digit(radix)) {
        value = value.and_then(|v| {
            v.checked_mul(u64::from(radix))
                .and_then(|v| v.checked_add(u64::from(d)))
                .ok_or(SizeError::Range)
        });
        i += 1;
    }
    (i > start).then_some((value, i, negative))
}

/// Parses a byte count the way QEMU's `qemu_strtosz` does: a decimal
/// integer, optionally with a fraction, then an optional suffix (`B`, `K`,
/// `M`, `G`, `T`, `P`, `E`, any case, powers of 1024); or a hexadecimal
/// `0x` integer without fraction or suffix. A fraction needs a suffix other
/// than `B`, and is rounded to the nearest byte.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.as_bytes();
    let parsed = strtou64(s, 10);
    let (mut val, mut end, mut valf) = (0u64, 0usize, 0u64);
    match parsed {
        Some((Err(e), _, _)) => return Err(e),
        Some((Ok(_), _, true)) => return Err(SizeError::Range),
        Some((Ok(v), e, false)) => (val, end) = (v, e),
        None => {}
    }
    let next = s.get(end).copied();
    if parsed.is_some() && val == 0 && matches!(next, Some(b'x' | b'X')) {
        // Hexadecimal: no fraction and no suffix.
        let (v, e, _) = strtou64(s, 16).ok_or(SizeError::Invalid)?;
        val = v?;
        end = e;
        let next = s.get(end).copied();
        if next == Some(b'.') || suffix_mul(next).is_some() {
            return Err(SizeError::Invalid);
        }
    } else if next == Some(b'.') || (parsed.is_none() && s.contains(&b'.')) {
        if parsed.is_none() {
            // Only whitespace may precede a fraction without integer part.
            end = s.iter().take_while(|c| c.is_ascii_whitespace()).count();
            if s.get(end) != Some(&b'.') {
                return Err(SizeError::Invalid);
            }
        }
        let digits = s
            .get(end + 1..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if parsed.is_none() && digits == 0 {
            return Err(SizeError::Invalid);
        }
        let fraction_text = text.get(end..end + 1 + digits).unwrap_or(".");
        let fraction: f64 = format!("0{fraction_text}0").parse().unwrap_or(0.0);
        // 0.64 fixed point, as QEMU computes it.
        valf = (fraction * 18_446_744_073_709_551_616.0) as u64;
        end += 1 + digits;
    } else if parsed.is_none() {
        return Err(SizeError::Invalid);
    }
    let next = s.get(end).copied();
    let mul = match suffix_mul(next) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if end != s.len() {
        return Err(SizeError::Invalid);
    }
    if mul == 1 {
        return if valf == 0 {
            Ok(val)
        } else {
            Err(SizeError::Invalid)
        };
    }
    // Exact 64.64 fixed-point product, rounding half a byte upward.
    let frac = u128::from(valf) * u128::from(mul);
    let total = u128::from(val) * u128::from(mul) + (frac >> 64) + ((frac >> 63) & 1);
    u64::try_from(total).map_err(|_| SizeError::Range)
}

/// Formats `x` like C's `printf("%.3g", x)` for finite non-negative `x`.
fn format_g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    // Round to three significant digits first; that fixes the exponent.
    let sci = format!("{x:.2e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!(
            "{}e{sign}{:02}",
            strip(mantissa.to_string()),
            exp.unsigned_abs()
        )
    } else {
        let decimals = usize::try_from(2 - exp).unwrap_or(0);
        strip(format!("{x:.decimals$}"))
    }
}

/// Renders a byte count like QEMU's `size_to_str`: three significant digits
/// and a binary unit, e.g. `196 KiB`, `12.5 KiB`, `0 B`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // Switch to the next unit once the integer part reaches 1000.
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp's exponent: scaled = m * 2^exponent with m in [0.5, 1).
    let exponent = if scaled == 0.0 {
        0
    } else {
        ((scaled.to_bits() >> 52) & 0x7ff) as i64 - 1022
    };
    let i = usize::try_from((exponent - 1).max(0) / 10)
        .unwrap_or(0)
        .min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_unsigned_follows_strtoull_base_0() {
        assert_eq!(parse_c_unsigned("0x1f"), Ok(31));
        assert_eq!(parse_c_unsigned(" 017"), Ok(15));
        assert_eq!(parse_c_unsigned("+42"), Ok(42));
        assert_eq!(parse_c_unsigned("-0"), Ok(0));
        assert_eq!(parse_c_unsigned("-1"), Err(SizeError::Range));
        assert_eq!(
            parse_c_unsigned("99999999999999999999"),
            Err(SizeError::Range)
        );
        assert_eq!(parse_c_unsigned("09"), Err(SizeError::Invalid));
        assert_eq!(parse_c_unsigned("1k"), Err(SizeError::Invalid));
        assert_eq!(parse_c_unsigned(""), Err(SizeError::Invalid));
    }

    #[test]
    fn parses_like_qemu() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("7b"), Ok(7));
        assert_eq!(parse_size("0x10"), Ok(16));
        assert_eq!(parse_size("0X10"), Ok(16));
        assert_eq!(parse_size("00012"), Ok(12));
        assert_eq!(parse_size("+5"), Ok(5));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("1.5G"), Ok(1536 << 20));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("1."), Ok(1));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size("0.0001k"), Ok(0));
        assert_eq!(parse_size("1.9999999999999999999999k"), Ok(2048));
    }

    #[test]
    fn rejects_like_qemu() {
        for bad in [
            "", "abc", "1kb", "1k5", "0x1k", "0x", "1.5", "1.5b", ".k", "5.0001", "1 k", "k", "-",
            ".",
        ] {
            assert_eq!(parse_size(bad), Err(SizeError::Invalid), "{bad:?}");
        }
        for big in [
            "-1",
            "-0",
            "16E",
            "99999999999999999999",
            "0x10000000000000000",
        ] {
            assert_eq!(parse_size(big), Err(SizeError::Range), "{big:?}");
        }
    }

    #[test]
    fn renders_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(12800), "12.5 KiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(10 << 20), "10 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(1_023_693), "1e+03 KiB");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
    }
}
