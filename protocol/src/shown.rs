//! Text a peer chose, made safe to put in a log line.
//!
//! A client id, a topic, a site or an alarm detail comes from whoever is on the other end of a
//! socket. Logged as it came, a 64 KiB topic repeated on every refusal fills the disk, and a
//! newline in a client id forges a whole log line of its own. [`Shown`] is the one way such a value
//! reaches a log: it escapes every control character (`\n`, `\r`, ESC, …, as Rust's `escape_debug`
//! writes them) and cuts the text at [`Shown::MAX_CHARS`] characters, saying how much it left out.
//! Both happen while formatting, so a value that is never logged costs nothing.

use std::fmt;

/// A peer-chosen string for a log field: `%Shown(&topic)` or `tracing::field::display(Shown(…))`.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl Shown<'_> {
    /// Characters of the value a log line keeps; enough for any name a real client uses.
    pub const MAX_CHARS: usize = 120;
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(Self::MAX_CHARS) {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(f, "{}", c.escape_debug())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "…(+{} bytes)", self.0.len() - at)?;
        }
        Ok(())
    }
}

/// [`Shown`] over bytes that may not be UTF-8 (an MQTT topic straight off the wire).
#[derive(Debug, Clone, Copy)]
pub struct ShownBytes<'a>(pub &'a [u8]);

impl fmt::Display for ShownBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.0.len().min(Shown::MAX_CHARS * 4);
        let text = String::from_utf8_lossy(&self.0[..cut]);
        let shown = Shown(&text);
        if cut < self.0.len() {
            // Count what was left out in bytes of the original, not of the lossy copy.
            let kept: String = text.chars().take(Shown::MAX_CHARS).collect();
            write!(
                f,
                "{}…(+{} bytes)",
                Shown(&kept),
                self.0.len() - kept.len().min(cut)
            )
        } else {
            write!(f, "{shown}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_so_no_line_can_be_forged() {
        let forged = "C1\n2026-12-03T08:00:00Z INFO broker: admin logged in\r\x1b[31m";
        let shown = Shown(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\x1b'));
        assert_eq!(
            shown,
            "C1\\n2026-12-03T08:00:00Z INFO broker: admin logged in\\r\\u{1b}[31m"
        );
        assert_eq!(Shown("a\u{2028}b").to_string(), "a\\u{2028}b");
    }

    #[test]
    fn long_values_are_cut_and_say_how_much_was_left_out() {
        let topic = "dev/".to_owned() + &"x".repeat(65_000);
        let shown = Shown(&topic).to_string();
        assert!(shown.starts_with("dev/xxx"));
        assert!(shown.ends_with(&format!("…(+{} bytes)", topic.len() - 120)));
        assert!(shown.len() < 160, "{} bytes", shown.len());
        let exact = "y".repeat(Shown::MAX_CHARS);
        assert_eq!(Shown(&exact).to_string(), exact, "nothing cut at the limit");
    }

    #[test]
    fn multibyte_text_is_cut_on_a_character_boundary() {
        let site = "大阪".repeat(100);
        let shown = Shown(&site).to_string();
        assert!(shown.starts_with(&"大阪".repeat(60)));
        assert!(shown.ends_with(&format!("…(+{} bytes)", 80 * 3)));
    }

    #[test]
    fn bytes_that_are_not_utf8_are_shown_lossily_and_cut() {
        assert_eq!(ShownBytes(b"dev/\xff\n").to_string(), "dev/\u{fffd}\\n");
        let long = vec![b'a'; 10_000];
        let shown = ShownBytes(&long).to_string();
        assert!(
            shown.ends_with(&format!("…(+{} bytes)", 10_000 - 120)),
            "{shown}"
        );
    }
}
