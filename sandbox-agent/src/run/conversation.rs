//! The conversation the agent keeps across the prompts of a session, and its compaction: when the
//! conversation nears the model's context window, the outputs of older tool calls are replaced by a short
//! note, newest kept, so the model keeps the thread (what was asked, what it did and said) and loses only
//! bulk it can re-read with its tools.
//!
//! Invariant: the message list is always valid to send: every assistant `tool_use` is answered by a
//! `tool_result` in the next message, and a turn that was stopped or failed is closed by an assistant
//! message, so user and assistant turns alternate.

use super::provider::{ContentBlock, Message, ToolResultBlock};

/// Share of the context window at which older tool outputs are compacted.
pub const COMPACT_AT_PERCENT: u64 = 75;
/// Share of the context window compaction aims to get under.
pub const COMPACT_TO_PERCENT: u64 = 50;
/// The most recent tool results that are never compacted.
pub const KEEP_RECENT_RESULTS: usize = 6;
/// Tool outputs shorter than this are left alone: compacting them saves nothing.
const MIN_COMPACTABLE_BYTES: usize = 400;
/// Rough bytes per token for estimates (a conservative figure for code and English).
const BYTES_PER_TOKEN: u64 = 3;

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Tool outputs replaced.
    pub outputs: usize,
    /// Bytes of output removed.
    pub bytes_removed: usize,
    /// Estimated tokens before.
    pub tokens_before: u64,
    /// Estimated tokens after.
    pub tokens_after: u64,
}

/// The conversation of a session.
#[derive(Debug, Default, Clone)]
pub struct Conversation {
    messages: Vec<Message>,
    /// Input tokens the provider counted for the latest call (prompt + cache), the best measure of size.
    last_input_tokens: u64,
    /// Estimated size of the messages at the time of that call.
    estimate_at_last_call: u64,
}

impl Conversation {
    /// The messages, ready to send.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// A new prompt from a person.
    pub fn push_user(&mut self, text: &str) {
        self.messages.push(Message::User {
            text: text.to_owned(),
        });
    }

    /// The model's reply.
    pub fn push_assistant(&mut self, content: Vec<ContentBlock>) {
        self.messages.push(Message::Assistant { content });
    }

    /// The results of the tool calls of the previous assistant message.
    pub fn push_tool_results(&mut self, results: Vec<ToolResultBlock>) {
        self.messages.push(Message::ToolResults { results });
    }

    /// Close a turn that ended early (stopped, failed): keep the alternation valid and tell the model,
    /// in the next call, what happened.
    pub fn close_turn(&mut self, note: &str) {
        match self.messages.last() {
            Some(Message::Assistant { content }) => {
                // A `tool_use` left unanswered must still get its result.
                let unanswered: Vec<ToolResultBlock> = content
                    .iter()
                    .filter_map(|block| match block {
                        ContentBlock::ToolUse { id, .. } => Some(ToolResultBlock {
                            call_id: id.clone(),
                            content: note.to_owned(),
                            is_error: true,
                        }),
                        _ => None,
                    })
                    .collect();
                if !unanswered.is_empty() {
                    self.push_tool_results(unanswered);
                    self.push_assistant(vec![ContentBlock::Text(format!("[{note}]"))]);
                }
            }
            Some(Message::User { .. } | Message::ToolResults { .. }) => {
                self.push_assistant(vec![ContentBlock::Text(format!("[{note}]"))]);
            }
            None => {}
        }
    }

    /// Record the provider's count of input tokens for the call just made with these messages.
    pub fn record_input_tokens(&mut self, input_tokens: u64) {
        self.last_input_tokens = input_tokens;
        self.estimate_at_last_call = self.estimated_bytes() / BYTES_PER_TOKEN;
    }

    /// The conversation's size in tokens, on the safe side: the larger of the provider's last count
    /// plus an estimate of what was added since, and an estimate of the whole from its bytes.
    pub fn tokens(&self) -> u64 {
        let estimate = self.estimated_bytes() / BYTES_PER_TOKEN;
        let counted = self
            .last_input_tokens
            .saturating_add(estimate.saturating_sub(self.estimate_at_last_call));
        counted.max(estimate)
    }

    fn estimated_bytes(&self) -> u64 {
        let bytes: usize = self
            .messages
            .iter()
            .map(|message| match message {
                Message::User { text } => text.len(),
                Message::Assistant { content } => content.iter().map(block_bytes).sum(),
                Message::ToolResults { results } => results
                    .iter()
                    .map(|r| r.content.len() + r.call_id.len())
                    .sum(),
            })
            .sum();
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// Compact older tool outputs when the conversation (plus `reserve_tokens` for the reply and the
    /// system prompt) passes [`COMPACT_AT_PERCENT`] of `window_tokens`; `None` when nothing was needed
    /// or nothing could be compacted.
    pub fn compact_if_needed(
        &mut self,
        window_tokens: u64,
        reserve_tokens: u64,
    ) -> Option<Compaction> {
        let tokens_before = self.tokens().saturating_add(reserve_tokens);
        if tokens_before.saturating_mul(100) < window_tokens.saturating_mul(COMPACT_AT_PERCENT) {
            return None;
        }
        let goal = window_tokens.saturating_mul(COMPACT_TO_PERCENT) / 100;
        let total_results: usize = self
            .messages
            .iter()
            .map(|m| match m {
                Message::ToolResults { results } => results.len(),
                _ => 0,
            })
            .sum();
        let compactable = total_results.saturating_sub(KEEP_RECENT_RESULTS);
        let mut outputs = 0;
        let mut bytes_removed = 0usize;
        let mut seen = 0usize;
        'outer: for message in &mut self.messages {
            let Message::ToolResults { results } = message else {
                continue;
            };
            for result in results.iter_mut() {
                if seen >= compactable {
                    break 'outer;
                }
                seen += 1;
                if result.content.len() < MIN_COMPACTABLE_BYTES || is_compacted(&result.content) {
                    continue;
                }
                let note = format!(
                    "[output compacted to save context: {} bytes removed; run the tool again if you need it]",
                    result.content.len()
                );
                bytes_removed += result.content.len().saturating_sub(note.len());
                result.content = note;
                outputs += 1;
                let removed_tokens =
                    u64::try_from(bytes_removed).unwrap_or(u64::MAX) / BYTES_PER_TOKEN;
                if tokens_before.saturating_sub(removed_tokens) <= goal {
                    break 'outer;
                }
            }
        }
        if outputs == 0 {
            return None;
        }
        let removed_tokens = u64::try_from(bytes_removed).unwrap_or(u64::MAX) / BYTES_PER_TOKEN;
        // The provider's count no longer describes these messages; estimate from here on.
        self.last_input_tokens = self.last_input_tokens.saturating_sub(removed_tokens);
        self.estimate_at_last_call = self.estimated_bytes() / BYTES_PER_TOKEN;
        Some(Compaction {
            outputs,
            bytes_removed,
            tokens_before,
            tokens_after: tokens_before.saturating_sub(removed_tokens),
        })
    }
}

fn is_compacted(content: &str) -> bool {
    content.starts_with("[output compacted")
}

fn block_bytes(block: &ContentBlock) -> usize {
    match block {
        ContentBlock::Text(text) => text.len(),
        ContentBlock::Thinking {
            thinking,
            signature,
        } => thinking.len() + signature.len(),
        ContentBlock::RedactedThinking { data } => data.len(),
        ContentBlock::ToolUse { id, name, input } => {
            id.len() + name.len() + input.to_string().len()
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn turn(conversation: &mut Conversation, call: usize, output_bytes: usize) {
        conversation.push_assistant(vec![ContentBlock::ToolUse {
            id: format!("call{call}"),
            name: "read_file".to_owned(),
            input: json!({"path": "big.txt"}),
        }]);
        conversation.push_tool_results(vec![ToolResultBlock {
            call_id: format!("call{call}"),
            content: "x".repeat(output_bytes),
            is_error: false,
        }]);
    }

    #[test]
    fn small_conversations_are_left_alone() {
        let mut conversation = Conversation::default();
        conversation.push_user("hello");
        turn(&mut conversation, 0, 10_000);
        assert_eq!(conversation.compact_if_needed(200_000, 8_000), None);
    }

    #[test]
    fn older_outputs_are_compacted_newest_kept() {
        let mut conversation = Conversation::default();
        conversation.push_user("read everything");
        for call in 0..20 {
            turn(&mut conversation, call, 30_000);
        }
        // 20 × 30 kB ≈ 200k tokens at 3 bytes per token: past 75 % of a 200k window.
        let compaction = conversation
            .compact_if_needed(200_000, 8_000)
            .expect("compacted");
        assert!(
            compaction.outputs > 0 && compaction.tokens_after <= 100_000,
            "{compaction:?}"
        );
        let results: Vec<&ToolResultBlock> = conversation
            .messages()
            .iter()
            .filter_map(|m| match m {
                Message::ToolResults { results } => results.first(),
                _ => None,
            })
            .collect();
        assert!(results.first().is_some_and(|r| is_compacted(&r.content)));
        for recent in results.iter().rev().take(KEEP_RECENT_RESULTS) {
            assert_eq!(recent.content.len(), 30_000, "recent outputs stay whole");
        }
        // Every tool_use still has its result.
        assert_eq!(results.len(), 20);
        assert!(conversation
            .compact_if_needed(200_000, 8_000)
            .is_none_or(|c| c.outputs > 0));
    }

    #[test]
    fn the_provider_count_drives_the_decision() {
        let mut conversation = Conversation::default();
        conversation.push_user("hi");
        for call in 0..10 {
            turn(&mut conversation, call, 1_000);
        }
        assert_eq!(conversation.compact_if_needed(200_000, 0), None);
        // The provider says the conversation is much bigger than our estimate (e.g. images, a long system prompt).
        conversation.record_input_tokens(180_000);
        let compaction = conversation
            .compact_if_needed(200_000, 0)
            .expect("compacted");
        assert!(compaction.outputs >= 1);
    }

    #[test]
    fn closing_a_stopped_turn_answers_every_tool_use() {
        let mut conversation = Conversation::default();
        conversation.push_user("go");
        conversation.push_assistant(vec![
            ContentBlock::Text("running two tools".to_owned()),
            ContentBlock::ToolUse {
                id: "a".into(),
                name: "bash".into(),
                input: json!({}),
            },
            ContentBlock::ToolUse {
                id: "b".into(),
                name: "bash".into(),
                input: json!({}),
            },
        ]);
        conversation.close_turn("stopped by a participant");
        let [.., Message::ToolResults { results }, Message::Assistant { .. }] =
            conversation.messages()
        else {
            panic!(
                "expected results then an assistant note: {:?}",
                conversation.messages()
            );
        };
        let ids: Vec<&str> = results.iter().map(|r| r.call_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);

        let mut conversation = Conversation::default();
        conversation.push_user("go");
        conversation.close_turn("failed");
        assert!(matches!(
            conversation.messages(),
            [Message::User { .. }, Message::Assistant { .. }]
        ));
    }
}
