//! Timestamps on the wire: ISO 8601 UTC with seven fractional digits and `Z`.
//!
//! Internally a timestamp is an `i64` count of nanoseconds since the Unix
//! epoch; this module converts both ways without a calendar dependency.

/// Formats nanoseconds since the Unix epoch as `2024-01-02T03:04:05.1234567Z`.
pub fn format_utc(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:07}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        sub / 100
    )
}

/// Parses an ISO 8601 date-time (`YYYY-MM-DDTHH:MM[:SS[.fff…]](Z|±HH:MM)`) or a
/// date (`YYYY-MM-DD`, midnight UTC) into nanoseconds since the Unix epoch.
pub fn parse_utc(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    if bytes.len() < 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let mut seconds_of_day = 0i64;
    let mut fraction_nanos = 0i64;
    let mut offset_seconds = 0i64;
    if bytes.len() > 10 {
        if !matches!(bytes[10], b'T' | b't') || bytes.len() < 16 || bytes[13] != b':' {
            return None;
        }
        let (hour, minute) = (num(11..13)?, num(14..16)?);
        let mut pos = 16;
        let mut second = 0;
        if bytes.get(pos) == Some(&b':') {
            second = num(pos + 1..pos + 3)?;
            pos += 3;
            if bytes.get(pos) == Some(&b'.') {
                pos += 1;
                let start = pos;
                while pos < bytes.len() && bytes[pos].is_ascii_digit() {
                    pos += 1;
                }
                let digits = &text[start..pos];
                if digits.is_empty() {
                    return None;
                }
                let mut scaled = String::from(&digits[..digits.len().min(9)]);
                while scaled.len() < 9 {
                    scaled.push('0');
                }
                fraction_nanos = scaled.parse().ok()?;
            }
        }
        if hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        seconds_of_day = hour * 3600 + minute * 60 + second;
        match bytes.get(pos) {
            Some(b'Z' | b'z') if pos + 1 == bytes.len() => {}
            Some(sign @ (b'+' | b'-')) if pos + 6 == bytes.len() && bytes[pos + 3] == b':' => {
                let (oh, om) = (num(pos + 1..pos + 3)?, num(pos + 4..pos + 6)?);
                if oh > 23 || om > 59 {
                    return None;
                }
                offset_seconds = (oh * 3600 + om * 60) * if *sign == b'+' { 1 } else { -1 };
            }
            _ => return None,
        }
    }
    let secs = days_from_civil(year, month, day) * 86_400 + seconds_of_day - offset_seconds;
    // Outside what nanoseconds in an i64 hold (1677 to 2262), clamp: the
    // common "far future" and "beginning of time" bounds still compare right.
    let nanos = i128::from(secs) * 1_000_000_000 + i128::from(fraction_nanos);
    Some(nanos.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's algorithms for the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_seven_digits() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(
            format_utc(1_704_164_645_123_456_789),
            "2024-01-02T03:04:05.1234567Z"
        );
    }

    #[test]
    fn parses_what_it_formats_and_common_forms() {
        let t = 1_704_164_645_123_456_700;
        assert_eq!(parse_utc(&format_utc(t)), Some(t));
        assert_eq!(parse_utc("2024-01-02"), Some(1_704_153_600_000_000_000));
        assert_eq!(
            parse_utc("2024-01-02T05:04:05+02:00"),
            Some(1_704_164_645_000_000_000)
        );
        assert_eq!(
            parse_utc("2024-02-29T00:00Z"),
            Some(1_709_164_800_000_000_000)
        );
        assert_eq!(parse_utc("9999-12-31T00:00:00Z"), Some(i64::MAX));
        assert_eq!(parse_utc("0001-01-01"), Some(i64::MIN));
        for bad in [
            "",
            "2024-13-01",
            "2023-02-29",
            "2024-01-02T25:00Z",
            "2024-01-02T03:04:05",
            "x024-01-01",
            "2024-01-02T03:04:05.Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
}
