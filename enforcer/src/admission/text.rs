//! Bounds on what the webhook repeats of what it was sent.
//!
//! Every answer and log line of the webhook names things its client wrote (a pod's name, a
//! container's, a label's value, a field serde could not read), and a review arrives before
//! the API server validates the pod, from whoever reaches the port. Quoted whole, once per
//! problem, a 1 MB name made a 3 GB answer, and a 4 MB string a 14 MB error message. So
//! names are [`cut`] to [`NAME_BYTES`] and other text is [`shown`] up to a bound, before it
//! is formatted into a message.

use std::fmt::{self, Display, Write};

/// The most bytes of a name (of a pod, namespace, container, volume, capability, host, path,
/// runtime class, user, kind or resource) a message repeats: the longest Kubernetes object
/// name (a DNS subdomain).
pub const NAME_BYTES: usize = 253;

/// `text` cut to at most `max` bytes at a character boundary, ending `...` when cut.
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// `value` as `Display` writes it, stopped after `max` bytes (ending `...`): the rest is
/// never formatted.
pub fn shown(value: impl Display, max: usize) -> String {
    bounded(value, max, false).0
}

/// [`shown`], and the number of bytes of `value` left out (0 when it is whole): the rest is
/// formatted to be counted, never kept.
pub fn shown_counted(value: impl Display, max: usize) -> (String, usize) {
    bounded(value, max, true)
}

fn bounded(value: impl Display, max: usize, count_rest: bool) -> (String, usize) {
    let mut out = Bounded {
        text: String::new(),
        max,
        full: false,
        count_rest,
        left: 0,
    };
    // An error here is `Bounded` saying it is full.
    let _ = write!(out, "{value}");
    if out.full {
        out.text.push_str("...");
    }
    (out.text, out.left)
}

/// A `String` that takes at most `max` bytes, then refuses (which stops `write!`), or, with
/// `count_rest`, takes nothing more and counts what it is given (`left`).
struct Bounded {
    text: String,
    max: usize,
    full: bool,
    count_rest: bool,
    left: usize,
}

impl Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.max.saturating_sub(3).saturating_sub(self.text.len());
        if s.len() <= room && !self.full {
            self.text.push_str(s);
            return Ok(());
        }
        let mut end = if self.full { 0 } else { room.min(s.len()) };
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.full = true;
        self.left += s.len() - end;
        if self.count_rest {
            Ok(())
        } else {
            Err(fmt::Error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_and_text_is_shown_up_to_a_bound() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("0123456789abc", 10), "0123456...");
        // Never inside a character: é is two bytes.
        assert_eq!(cut(&"é".repeat(10), 10), "ééé...");
        assert_eq!(shown("short", 10), "short");
        assert_eq!(
            shown(format_args!("{}{}", "0123456", "789abc"), 10),
            "0123456..."
        );
        assert_eq!(shown("é".repeat(10), 10), "ééé...");
        let long = "x".repeat(1 << 20);
        assert_eq!(shown(format_args!("a {long:?} b"), 8).len(), 8);
    }
}
