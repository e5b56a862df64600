//! Human sizes (`512Mi`, `8Gi`, `64Gi`, `1G`, `1048576`) and durations (`500ms`, `5s`, `2m`).

use std::fmt;
use std::time::Duration;

/// A size that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size {0:?} is empty: write a number with a unit, e.g. 8Gi")]
    Empty(String),
    #[error(
        "size {0:?} is not a number with a unit: use Ki, Mi, Gi, Ti (or K, M, G, T), e.g. 8Gi"
    )]
    Invalid(String),
    #[error("size {0:?} is zero: an envelope must be larger than nothing")]
    Zero(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parse a size in bytes. Binary suffixes (`Ki`, `Mi`, `Gi`, `Ti`, optionally followed by `B`)
/// are powers of 1024, decimal ones (`K`, `M`, `G`, `T`) powers of 1000, as in Kubernetes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty(input.to_owned()));
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::Invalid(input.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(input.to_owned()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "K" | "k" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        _ => return Err(SizeError::Invalid(input.to_owned())),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| SizeError::Overflow(input.to_owned()))?;
    if bytes == 0 {
        return Err(SizeError::Zero(input.to_owned()));
    }
    Ok(bytes)
}

/// Bytes shown the way people read them: `8.0 GiB`, `512.0 MiB`, `900 B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        let b = self.0;
        if b < 1024 {
            return write!(f, "{b} B");
        }
        let mut v = b as f64 / 1024.0;
        let mut unit = UNITS[0];
        for u in &UNITS[1..] {
            if v < 1024.0 {
                break;
            }
            v /= 1024.0;
            unit = u;
        }
        write!(f, "{v:.1} {unit}")
    }
}

/// A duration that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("duration {0:?} is not a number with a unit: use ms, s, m or h, e.g. 10s")]
pub struct DurationError(pub String);

/// Parse `250ms`, `10s`, `2m`, `1h`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError(input.to_owned()))?;
    let secs = |m: u64| n.checked_mul(m).map(Duration::from_secs);
    let d = match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        _ => None,
    };
    d.ok_or_else(|| DurationError(input.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_table() {
        let ok: &[(&str, u64)] = &[
            ("512Mi", 512 << 20),
            ("8Gi", 8 << 30),
            ("64Gi", 64 << 30),
            ("64GiB", 64 << 30),
            ("1Ti", 1 << 40),
            ("4Ki", 4096),
            ("1G", 1_000_000_000),
            ("1048576", 1 << 20),
            (" 2Mi ", 2 << 20),
        ];
        for (s, want) in ok {
            assert_eq!(parse_size(s), Ok(*want), "{s}");
        }
        type Pred = fn(&SizeError) -> bool;
        let bad: &[(&str, Pred)] = &[
            ("", |e| matches!(e, SizeError::Empty(_))),
            ("Gi", |e| matches!(e, SizeError::Invalid(_))),
            ("8gb", |e| matches!(e, SizeError::Invalid(_))),
            ("8 Gx", |e| matches!(e, SizeError::Invalid(_))),
            ("-1Gi", |e| matches!(e, SizeError::Invalid(_))),
            ("1.5Gi", |e| matches!(e, SizeError::Invalid(_))),
            ("0Gi", |e| matches!(e, SizeError::Zero(_))),
            ("0", |e| matches!(e, SizeError::Zero(_))),
            ("99999999999Ti", |e| matches!(e, SizeError::Overflow(_))),
        ];
        for (s, pred) in bad {
            let e = parse_size(s).expect_err(s);
            assert!(pred(&e), "{s}: {e}");
        }
    }

    #[test]
    fn bytes_display() {
        assert_eq!(Bytes(8 << 30).to_string(), "8.0 GiB");
        assert_eq!(Bytes(64 << 20).to_string(), "64.0 MiB");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(10).to_string(), "10 B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }
}
