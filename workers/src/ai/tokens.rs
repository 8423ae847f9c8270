//! A deterministic token estimate.
//!
//! The rule, used wherever Tally estimates tokens (the offline provider's usage, cost estimates,
//! and replies from providers that report no usage):
//! - a text counts `ceil(chars / 4)` tokens, where `chars` is its number of Unicode scalar values
//!   (so the empty text counts 0);
//! - a conversation counts, per message, the tokens of its content plus 4 tokens of overhead for
//!   the role and message framing (so an empty conversation counts 0).
//!
//! Real tokenizers differ by model; this is an estimate that is cheap, stable across releases and
//! the same on every machine.

use super::ChatMessage;

/// Tokens charged per message for its role and framing, on top of its content.
pub const MESSAGE_OVERHEAD: u64 = 4;

/// Characters per token in the estimate.
pub const CHARS_PER_TOKEN: u64 = 4;

/// Estimated tokens of `text`: `ceil(chars / 4)`. The same rule as
/// `tally_workflows::ai::tokens`, which the API's estimates use: one rule everywhere.
pub fn count(text: &str) -> u64 {
    tally_workflows::ai::tokens::count(text)
}

/// Estimated tokens of a conversation: the sum over messages of `count(content) + 4`.
pub fn count_messages(msgs: &[ChatMessage]) -> u64 {
    tally_workflows::ai::tokens::count_messages(msgs.iter().map(|m| m.content.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_per_char() {
        assert_eq!(count(""), 0);
        assert_eq!(count("a"), 1);
        assert_eq!(count("abcd"), 1);
        assert_eq!(count("abcde"), 2);
        // Four characters, more than four bytes.
        assert_eq!(count("héé€"), 1);
    }

    #[test]
    fn messages_add_overhead() {
        assert_eq!(count_messages(&[]), 0);
        let msgs = [
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "hello"),
        ];
        assert_eq!(count_messages(&msgs), (2 + 4) + (2 + 4));
    }
}
