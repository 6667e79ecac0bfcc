//! Whether text from outside (host facts, names given to admin commands) is
//! safe to show to an analyst as it is.

/// Completes "the NAME ..." when [`is_safe_to_show`] refuses a text.
pub const UNSAFE_TEXT: &str = "must not contain control characters (such as escapes and new \
     lines) or invisible formatting characters (such as bidirectional overrides, zero-width \
     spaces, U+FEFF, U+2028 and U+2029)";

/// Whether `c` could change how text around it is shown rather than show
/// as itself: a control character (Unicode Cc: C0, DEL, C1, so terminal
/// escapes and new lines), a format character (Unicode Cf: bidirectional
/// overrides and isolates, zero-width spaces and joiners, the byte order
/// mark, soft hyphen, invisible operators, tags), or the line and paragraph
/// separators U+2028 and U+2029.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

/// Whether `text` holds no character that [`is_unsafe_char`] refuses.
pub fn is_safe_to_show(text: &str) -> bool {
    !text.chars().any(is_unsafe_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_format_characters_are_unsafe() {
        for bad in [
            "a\u{1b}[31mred",
            "line\nbreak",
            "tab\there",
            "del\u{7f}",
            "c1\u{9b}",
            "bidi\u{202E}txt.exe",
            "lre\u{202A}",
            "isolate\u{2066}x\u{2069}",
            "zero\u{200B}width",
            "zwj\u{200D}",
            "rlm\u{200F}",
            "\u{FEFF}bom",
            "sep\u{2028}",
            "para\u{2029}",
            "soft\u{AD}hyphen",
            "tag\u{E0041}",
        ] {
            assert!(!is_safe_to_show(bad), "{bad:?}");
        }
        for good in [
            "Ubuntu 24.04 LTS",
            "Windows 11 Pro",
            "Tier 1 — Analysts",
            "Zoë Ångström",
            "東京 オフィス",
            "עברית",
            "emoji 🛡️",
            "",
        ] {
            assert!(is_safe_to_show(good), "{good:?}");
        }
    }
}
