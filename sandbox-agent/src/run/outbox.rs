//! The agent's outbox: every event it produced, numbered with `producer_seq`, kept until the session
//! acknowledges it, in memory and in an append-only journal file so a restarted agent can resend.
//!
//! Invariant: `producer_seq` is contiguous from 1 per sandbox, never reused; pending entries are kept in
//! ascending order and sent in that order after every `welcome`.
//!
//! The journal holds one JSON object per line: the exact `event` frame sent on the wire, or
//! `{"type":"ack","producer_seq":N}`. It is rewritten (compacted) when nothing is pending.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nightshift_protocol::{AgentMessage, Event};

/// Journal lines beyond which the file is compacted even while events are pending.
const COMPACT_AFTER_LINES: usize = 4096;
/// Journal lines beyond which the file is compacted once nothing is pending.
const COMPACT_IDLE_AFTER_LINES: usize = 64;

/// Why the outbox could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The journal could not be read or written.
    #[error("outbox journal {path}: {source}")]
    Io {
        /// Journal path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// One pending event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its number.
    pub producer_seq: u64,
    /// The `event` frame, ready to send.
    pub frame: String,
}

#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

/// Unacknowledged events, oldest first.
#[derive(Debug)]
pub struct Outbox {
    entries: VecDeque<OutboxEntry>,
    next_seq: u64,
    acked: u64,
    journal: Option<Journal>,
}

#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JournalRecord {
    Event { producer_seq: u64 },
    Ack { producer_seq: u64 },
}

impl Outbox {
    /// An outbox that lives only in memory.
    pub fn in_memory() -> Self {
        Self {
            entries: VecDeque::new(),
            next_seq: 1,
            acked: 0,
            journal: None,
        }
    }

    /// Open (or create) the journal at `path` and recover what it holds.
    pub fn open(path: &Path) -> Result<Self, OutboxError> {
        let io = |source| OutboxError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut outbox = Self::in_memory();
        match std::fs::read_to_string(path) {
            Ok(text) => outbox.replay(&text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(error)),
        }
        let file = Self::rewrite(path, &outbox.header(), &outbox.entries).map_err(io)?;
        outbox.journal = Some(Journal {
            path: path.to_owned(),
            file,
            lines: outbox.entries.len() + 1,
        });
        Ok(outbox)
    }

    fn replay(&mut self, text: &str) {
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<JournalRecord>(line) {
                Ok(JournalRecord::Event { producer_seq }) if producer_seq >= self.next_seq => {
                    self.entries.push_back(OutboxEntry {
                        producer_seq,
                        frame: line.to_owned(),
                    });
                    self.next_seq = producer_seq + 1;
                }
                Ok(JournalRecord::Event { producer_seq }) => {
                    tracing::warn!(
                        line = number + 1,
                        producer_seq,
                        "skipping out-of-order outbox journal entry"
                    );
                }
                Ok(JournalRecord::Ack { producer_seq }) => {
                    self.drop_acked(producer_seq);
                    self.next_seq = self.next_seq.max(producer_seq + 1);
                }
                // A crash can leave a partial last line.
                Err(error) => {
                    tracing::warn!(line = number + 1, %error, "skipping garbled outbox journal line")
                }
            }
        }
        if !self.entries.is_empty() {
            tracing::info!(
                pending = self.entries.len(),
                next_seq = self.next_seq,
                "recovered outbox journal"
            );
        }
    }

    /// Number the event, keep it, and return (a copy of) its entry for sending.
    pub fn push(&mut self, event: Event) -> OutboxEntry {
        let producer_seq = self.next_seq;
        self.next_seq += 1;
        let frame = encode(&AgentMessage::Event {
            producer_seq,
            event,
        });
        self.append_to_journal(&frame);
        let entry = OutboxEntry {
            producer_seq,
            frame,
        };
        self.entries.push_back(entry.clone());
        self.compact_if_needed();
        entry
    }

    /// Cumulative acknowledgement: everything up to `producer_seq` is applied.
    pub fn ack(&mut self, producer_seq: u64) {
        if producer_seq <= self.acked {
            return;
        }
        if producer_seq >= self.next_seq {
            tracing::warn!(
                producer_seq,
                next_seq = self.next_seq,
                "session acknowledged events never produced"
            );
            self.next_seq = producer_seq + 1;
        }
        self.drop_acked(producer_seq);
        self.append_to_journal(&ack_line(producer_seq));
        self.compact_if_needed();
    }

    /// The session's `welcome`: drop what it already has. When it has seen more than we ever produced
    /// (our journal was lost), renumber what is pending after its last so nothing is dropped as a duplicate.
    pub fn welcome(&mut self, last_producer_seq: u64) {
        if last_producer_seq < self.next_seq {
            self.ack(last_producer_seq);
            return;
        }
        tracing::warn!(
            last_producer_seq,
            next_seq = self.next_seq,
            "session is ahead of this agent's outbox; renumbering pending events"
        );
        self.acked = last_producer_seq;
        self.next_seq = last_producer_seq + 1;
        let pending: Vec<OutboxEntry> = self.entries.drain(..).collect();
        for entry in pending {
            let event = serde_json::from_str::<AgentMessage>(&entry.frame);
            if let Ok(AgentMessage::Event { event, .. }) = event {
                let producer_seq = self.next_seq;
                self.next_seq += 1;
                self.entries.push_back(OutboxEntry {
                    producer_seq,
                    frame: encode(&AgentMessage::Event {
                        producer_seq,
                        event,
                    }),
                });
            }
        }
        self.compact();
    }

    /// Pending entries, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &OutboxEntry> {
        self.entries.iter()
    }

    /// Lowest pending `producer_seq` (for `hello.resume_from`).
    pub fn first_pending(&self) -> Option<u64> {
        self.entries.front().map(|entry| entry.producer_seq)
    }

    /// The number the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn drop_acked(&mut self, producer_seq: u64) {
        self.acked = self.acked.max(producer_seq);
        while self
            .entries
            .front()
            .is_some_and(|entry| entry.producer_seq <= producer_seq)
        {
            self.entries.pop_front();
        }
    }

    /// The journal's first line: everything before the first pending event is done, which also tells a
    /// restarted agent where numbering continues.
    fn header(&self) -> String {
        ack_line(
            self.first_pending()
                .unwrap_or(self.next_seq)
                .saturating_sub(1),
        )
    }

    fn append_to_journal(&mut self, line: &str) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if let Err(error) = journal.file.write_all(&bytes) {
            tracing::warn!(path = %journal.path.display(), %error, "outbox journal write failed; keeping events in memory only");
            self.journal = None;
            return;
        }
        journal.lines += 1;
    }

    fn compact_if_needed(&mut self) {
        let Some(journal) = &self.journal else { return };
        if self.entries.is_empty() && journal.lines > COMPACT_IDLE_AFTER_LINES
            || journal.lines > COMPACT_AFTER_LINES && journal.lines > 2 * self.entries.len()
        {
            self.compact();
        }
    }

    fn compact(&mut self) {
        let Some(journal) = &self.journal else { return };
        let path = journal.path.clone();
        match Self::rewrite(&path, &self.header(), &self.entries) {
            Ok(file) => {
                self.journal = Some(Journal {
                    path,
                    file,
                    lines: self.entries.len() + 1,
                })
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "outbox journal rewrite failed; keeping events in memory only");
                self.journal = None;
            }
        }
    }

    /// Write `header` and the entries to a temporary file, move it over `path`, and open it for appending.
    fn rewrite(
        path: &Path,
        header: &str,
        entries: &VecDeque<OutboxEntry>,
    ) -> std::io::Result<File> {
        let temporary = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        text.push_str(header);
        text.push('\n');
        for entry in entries {
            text.push_str(&entry.frame);
            text.push('\n');
        }
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, path)?;
        std::fs::OpenOptions::new().append(true).open(path)
    }
}

/// The journal's ack line; its number also tells a restarted agent where numbering continues.
fn ack_line(producer_seq: u64) -> String {
    format!(r#"{{"type":"ack","producer_seq":{producer_seq}}}"#)
}

/// Encode a message for the wire; our own types always serialize.
pub fn encode(message: &AgentMessage) -> String {
    serde_json::to_string(message).unwrap_or_else(|error| {
        tracing::error!(%error, "failed to encode agent message");
        r#"{"type":"heartbeat"}"#.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(text: &str) -> Event {
        Event::Notice {
            level: "info".to_owned(),
            text: text.to_owned(),
        }
    }

    fn pending(outbox: &Outbox) -> Vec<(u64, String)> {
        outbox
            .pending()
            .map(
                |entry| match serde_json::from_str::<AgentMessage>(&entry.frame) {
                    Ok(AgentMessage::Event {
                        producer_seq,
                        event: Event::Notice { text, .. },
                    }) => {
                        assert_eq!(producer_seq, entry.producer_seq);
                        (producer_seq, text)
                    }
                    other => panic!("unexpected frame {other:?}"),
                },
            )
            .collect()
    }

    fn seqs(outbox: &Outbox) -> Vec<u64> {
        outbox.pending().map(|entry| entry.producer_seq).collect()
    }

    #[test]
    fn numbering_is_contiguous_and_acks_are_cumulative() {
        let mut outbox = Outbox::in_memory();
        for text in ["a", "b", "c", "d"] {
            outbox.push(notice(text));
        }
        assert_eq!(seqs(&outbox), [1, 2, 3, 4]);
        outbox.ack(2);
        assert_eq!(pending(&outbox), [(3, "c".to_owned()), (4, "d".to_owned())]);
        outbox.ack(1); // stale ack changes nothing
        assert_eq!(seqs(&outbox), [3, 4]);
        assert_eq!(outbox.first_pending(), Some(3));
        outbox.push(notice("e"));
        outbox.welcome(3);
        assert_eq!(seqs(&outbox), [4, 5]);
        outbox.ack(5);
        assert_eq!(outbox.first_pending(), None);
        assert_eq!(outbox.push(notice("f")).producer_seq, 6);
    }

    #[test]
    fn welcome_ahead_of_us_renumbers_pending() {
        let mut outbox = Outbox::in_memory();
        outbox.push(notice("a"));
        outbox.push(notice("b"));
        outbox.welcome(10);
        assert_eq!(
            pending(&outbox),
            [(11, "a".to_owned()), (12, "b".to_owned())]
        );
        assert_eq!(outbox.push(notice("c")).producer_seq, 13);
    }

    #[test]
    fn journal_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/outbox.jsonl");
        {
            let mut outbox = Outbox::open(&path).unwrap();
            for text in ["a", "b", "c", "d"] {
                outbox.push(notice(text));
            }
            outbox.ack(2);
        }
        // A crash mid-write leaves a partial line.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(br#"{"type":"event","produc"#).unwrap();
        drop(file);

        let mut outbox = Outbox::open(&path).unwrap();
        assert_eq!(pending(&outbox), [(3, "c".to_owned()), (4, "d".to_owned())]);
        assert_eq!(outbox.push(notice("e")).producer_seq, 5);
        outbox.ack(5);
        drop(outbox);

        // Everything acknowledged: the journal is compacted, and numbering still continues.
        let mut outbox = Outbox::open(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"type\":\"ack\",\"producer_seq\":5}\n");
        assert_eq!(outbox.first_pending(), None);
        assert_eq!(outbox.push(notice("f")).producer_seq, 6);
    }

    #[test]
    fn journal_is_compacted_while_events_stay_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut outbox = Outbox::open(&path).unwrap();
        for i in 0..(COMPACT_AFTER_LINES as u64 + 10) {
            outbox.push(notice(&i.to_string()));
            outbox.ack(i); // always one pending
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= COMPACT_AFTER_LINES + 1, "{lines}");
        drop(outbox);
        let outbox = Outbox::open(&path).unwrap();
        let last = COMPACT_AFTER_LINES as u64 + 10;
        assert_eq!(pending(&outbox), [(last, (last - 1).to_string())]);
    }
}
