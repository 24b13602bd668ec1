//! The client WebSocket (`/api/sessions/{id}/ws`): browsers, the side panel and API clients.

use crate::{ErrorCode, EventEnvelope, Participant, QueuedPrompt, SessionInfo, StopScope};

/// A message from a client to the session.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on every connection; replay starts after `last_seq`.
    Hello {
        /// Must equal [`crate::PROTOCOL_VERSION`].
        protocol_version: u32,
        /// Last `seq` the client has; `None` replays from the start.
        #[serde(default)]
        last_seq: Option<u64>,
        /// Free-form client name (`web`, `extension`, `cli`).
        #[serde(default)]
        client: Option<String>,
    },
    /// Send a prompt.
    Prompt {
        /// The text.
        text: String,
        /// Re-sending with the same key returns the original prompt.
        idempotency_key: String,
        /// Attachments (reserved).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attachments: Option<Vec<serde_json::Value>>,
    },
    /// Remove a queued prompt.
    CancelPrompt {
        /// Prompt id.
        prompt_id: String,
    },
    /// Stop work.
    Stop {
        /// What to stop.
        scope: StopScope,
    },
    /// Someone is typing. The sender shows as `typing` in `presence` for [`crate::TYPING_MS`] after
    /// their last `typing` (a `presence` goes to everyone when that starts and when it ends; a prompt
    /// from them ends it at once). It is also a hint to prepare a sandbox: the session asks its
    /// repository for a warm-up (at most one per socket per minute, one per session per minute at the
    /// provider). Nothing is answered, and it never fails.
    Typing {},
    /// Keep-alive; answered with `pong`.
    Ping {},
}

impl ClientMessage {
    /// Every `type` tag a client may send.
    pub const TYPES: &'static [&'static str] =
        &["hello", "prompt", "cancel_prompt", "stop", "typing", "ping"];
}

/// A message from the session to a client.
// `welcome` is much larger than the rest; messages are short-lived, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "ts", derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to `hello`; the replay follows as `event` and `events` messages.
    Welcome {
        /// The session.
        session: SessionInfo,
        /// The connected participant.
        you: Participant,
        /// Everyone in the session.
        participants: Vec<Participant>,
        /// Unfinished prompts, running first.
        queue: Vec<QueuedPrompt>,
        /// Highest `seq` in the log at this moment.
        last_seq: u64,
    },
    /// A logged event.
    Event(EventEnvelope),
    /// Several logged events in `seq` order, sent as one frame when they were logged in a burst; the same
    /// as that many `event` messages.
    Events {
        /// The events.
        events: Vec<EventEnvelope>,
    },
    /// Who is in the session and online.
    Presence {
        /// Everyone in the session.
        participants: Vec<Participant>,
    },
    /// The answer to a `prompt` from this client.
    PromptAccepted {
        /// Prompt id.
        prompt_id: String,
        /// The client's idempotency key.
        idempotency_key: String,
        /// Zero when it runs now; otherwise how many are ahead of it.
        position: u32,
    },
    /// A typed error; the connection stays open.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human detail.
        message: String,
    },
    /// Answer to `ping`.
    Pong {},
}

/// The frames that carry logged events to a client, each event given as its serialized [`EventEnvelope`]
/// (a JSON object), in order: one `event` frame for a lone event, otherwise `events` frames of at most
/// `max_bytes` each; an event that does not fit in `max_bytes` by itself goes alone as an `event` frame.
pub fn event_frames(envelopes: &[String], max_bytes: usize) -> Vec<String> {
    const EVENTS_OPEN: &str = r#"{"type":"events","events":["#;
    const EVENTS_CLOSE: &str = "]}";
    let mut frames = Vec::new();
    let mut group: Vec<&str> = Vec::new();
    let mut group_bytes = EVENTS_OPEN.len() + EVENTS_CLOSE.len();
    for envelope in envelopes {
        let added = envelope.len() + usize::from(!group.is_empty());
        if !group.is_empty() && group_bytes + added > max_bytes {
            frames.push(frame(&group, EVENTS_OPEN, EVENTS_CLOSE));
            group.clear();
            group_bytes = EVENTS_OPEN.len() + EVENTS_CLOSE.len();
        }
        group_bytes += envelope.len() + usize::from(!group.is_empty());
        group.push(envelope);
    }
    if !group.is_empty() {
        frames.push(frame(&group, EVENTS_OPEN, EVENTS_CLOSE));
    }
    frames
}

fn frame(group: &[&str], open: &str, close: &str) -> String {
    match group {
        [one] => format!(
            r#"{{"type":"event",{}"#,
            one.strip_prefix('{').unwrap_or(one)
        ),
        many => format!("{open}{}{close}", many.join(",")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, EventEnvelope};

    fn envelope(seq: u64, text: &str) -> String {
        serde_json::to_string(&EventEnvelope {
            seq,
            ts_ms: 1_000 + seq,
            event: Event::Notice {
                level: "info".into(),
                text: text.into(),
            },
        })
        .unwrap()
    }

    fn seqs(frames: &[String]) -> Vec<Vec<u64>> {
        frames
            .iter()
            .map(
                |frame| match serde_json::from_str::<ServerMessage>(frame).unwrap() {
                    ServerMessage::Event(one) => vec![one.seq],
                    ServerMessage::Events { events } => events.iter().map(|e| e.seq).collect(),
                    other => panic!("not an event frame: {other:?}"),
                },
            )
            .collect()
    }

    #[test]
    fn a_lone_event_is_an_event_frame_and_a_burst_is_one_events_frame() {
        assert!(event_frames(&[], 1024).is_empty());
        let one = event_frames(&[envelope(1, "a")], 1024);
        assert_eq!(seqs(&one), vec![vec![1]]);
        assert!(one[0].starts_with(r#"{"type":"event","#));
        let burst: Vec<String> = (1..=5).map(|seq| envelope(seq, "a")).collect();
        assert_eq!(
            seqs(&event_frames(&burst, 64 * 1024)),
            vec![vec![1, 2, 3, 4, 5]]
        );
    }

    #[test]
    fn frames_stay_under_the_budget_in_order_and_an_oversized_event_goes_alone() {
        let mut envelopes: Vec<String> = (1..=40)
            .map(|seq| envelope(seq, "x".repeat(50).as_str()))
            .collect();
        envelopes.insert(10, envelope(100, &"y".repeat(5_000)));
        let budget = 1_000;
        let frames = event_frames(&envelopes, budget);
        let flat: Vec<u64> = seqs(&frames).concat();
        let mut expected: Vec<u64> = (1..=40).collect();
        expected.insert(10, 100);
        assert_eq!(flat, expected, "every event once, in order");
        for (frame, seqs) in frames.iter().zip(seqs(&frames)) {
            if seqs == [100] {
                assert!(frame.len() > budget);
            } else {
                assert!(frame.len() <= budget, "{} bytes", frame.len());
            }
        }
        assert!(
            frames.len() <= 8,
            "small events are grouped: {} frames",
            frames.len()
        );
    }
}
