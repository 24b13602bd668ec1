//! Decoding of incoming WebSocket frames into typed messages, with a typed reason for every refusal.

use crate::{AgentMessage, ClientMessage, ErrorCode, MAX_FRAME_BYTES};

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Error code for the answer.
    pub code: ErrorCode,
    /// Human detail (never echoes the frame).
    pub message: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for DecodeError {}

fn decode<T: serde::de::DeserializeOwned>(frame: &str, known: &[&str]) -> Result<T, DecodeError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError {
            code: ErrorCode::FrameTooLarge,
            message: format!(
                "frame of {} bytes exceeds the limit of {MAX_FRAME_BYTES}",
                frame.len()
            ),
        });
    }
    let value: serde_json::Value = serde_json::from_str(frame).map_err(|e| DecodeError {
        code: ErrorCode::InvalidJson,
        message: format!("frame is not valid json: {e}"),
    })?;
    let Some(kind) = value
        .get("type")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
    else {
        return Err(DecodeError {
            code: ErrorCode::InvalidMessage,
            message: "message has no string `type` field".to_owned(),
        });
    };
    if !known.contains(&kind.as_str()) {
        let shown: String = kind.chars().take(64).collect();
        return Err(DecodeError {
            code: ErrorCode::UnknownType,
            message: format!("unknown message type `{shown}`"),
        });
    }
    serde_json::from_value(value).map_err(|e| DecodeError {
        code: ErrorCode::InvalidMessage,
        message: format!("invalid `{kind}` message: {e}"),
    })
}

/// Decode a text frame from a client.
pub fn decode_client_message(frame: &str) -> Result<ClientMessage, DecodeError> {
    decode(frame, ClientMessage::TYPES)
}

/// Decode a text frame from an agent.
pub fn decode_agent_message(frame: &str) -> Result<AgentMessage, DecodeError> {
    decode(frame, AgentMessage::TYPES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(frame: &str, expected: ErrorCode) {
        let err = decode_client_message(frame).unwrap_err();
        assert_eq!(err.code, expected, "{frame}: {err}");
    }

    #[test]
    fn refusals_are_typed() {
        check("{not json", ErrorCode::InvalidJson);
        check("[]", ErrorCode::InvalidMessage);
        check(r#"{"type": 3}"#, ErrorCode::InvalidMessage);
        check(r#"{"type":"launch_missiles"}"#, ErrorCode::UnknownType);
        check(r#"{"type":"prompt","text":1}"#, ErrorCode::InvalidMessage);
        check(
            r#"{"type":"stop","scope":"galaxy"}"#,
            ErrorCode::InvalidMessage,
        );
        let big = format!(
            r#"{{"type":"ping","pad":"{}"}}"#,
            "x".repeat(MAX_FRAME_BYTES)
        );
        check(&big, ErrorCode::FrameTooLarge);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let msg = decode_client_message(r#"{"type":"ping","extra":true}"#).unwrap();
        assert_eq!(msg, ClientMessage::Ping {});
    }

    #[test]
    fn agent_frames_decode() {
        let msg = decode_agent_message(r#"{"type":"heartbeat"}"#).unwrap();
        assert_eq!(msg, AgentMessage::Heartbeat {});
        let err = decode_agent_message(r#"{"type":"prompt","text":"x","idempotency_key":"k"}"#)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownType);
    }
}
