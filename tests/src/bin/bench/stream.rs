//! Stamped token streams (`[script:tokens … stamp=1]`, each delta `tok{i}@{unix_micros} `, the
//! time the model stub sent it) as watched by an [`Audience`] of clients, each read by its own
//! task, and what reached them ([`Delivery`]).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use nightshift_protocol::{Event, ServerMessage};
use nightshift_tests::Ws;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::latency::Latency;
use crate::report::round3;

/// A client that hears nothing at all for this long has lost its connection.
const SILENCE: Duration = Duration::from_secs(120);

/// One token as one client received it.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// Its prompt.
    pub prompt_id: String,
    /// The delta's text.
    pub text: String,
    /// When the client's task had it, Unix µs.
    pub received_us: u128,
    /// When the SessionObject logged it (`ts_ms`, workerd's clock, whole ms).
    pub logged_ms: u64,
}

/// Wall clock now, Unix µs.
pub fn unix_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_micros())
}

/// `tok{i}@{unix_micros} ` → `(i, unix_micros)`.
pub fn parse_stamp(text: &str) -> Option<(usize, u128)> {
    let (index, stamp) = text.trim_end().strip_prefix("tok")?.split_once('@')?;
    Some((index.parse().ok()?, stamp.parse().ok()?))
}

/// Clients watching one session, each read by its own task, which records every token with the
/// time it arrived.
pub struct Audience {
    readers: Vec<JoinHandle<anyhow::Result<Vec<Receipt>>>>,
    finished_tx: mpsc::UnboundedSender<String>,
    finished_rx: mpsc::UnboundedReceiver<String>,
    /// `prompt_finished` seen, per prompt: how many clients.
    finished: HashMap<String, usize>,
    stop: watch::Sender<bool>,
}

impl Audience {
    pub fn new() -> Audience {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Audience {
            readers: Vec::new(),
            finished_tx,
            finished_rx,
            finished: HashMap::new(),
            stop: watch::Sender::new(false),
        }
    }

    /// How many clients.
    pub fn len(&self) -> usize {
        self.readers.len()
    }

    /// Start reading `ws` (already past `welcome`) in its own task.
    pub fn add(&mut self, mut ws: Ws) {
        let finished = self.finished_tx.clone();
        let mut stop = self.stop.subscribe();
        self.readers.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            loop {
                let message = tokio::select! {
                    biased;
                    _ = stop.changed() => return Ok(receipts),
                    message = ws.next_message(SILENCE) => message?,
                };
                let received_us = unix_micros();
                let ServerMessage::Event(envelope) = message else {
                    continue;
                };
                match envelope.event {
                    Event::Token { prompt_id, text } => receipts.push(Receipt {
                        prompt_id,
                        text,
                        received_us,
                        logged_ms: envelope.ts_ms,
                    }),
                    Event::PromptFinished { prompt_id, .. } => {
                        let _ = finished.send(prompt_id);
                    }
                    _ => {}
                }
            }
        }));
    }

    /// Wait until every client has seen `prompt_id` finish, or `timeout`; returns how many did. A
    /// client whose connection ended is an error.
    pub async fn until_finished(
        &mut self,
        prompt_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.finished.get(prompt_id).copied().unwrap_or(0);
            if seen >= self.readers.len() {
                return Ok(seen);
            }
            if let Some(ended) = self.readers.iter_mut().find(|reader| reader.is_finished()) {
                match ended.await.context("a client task panicked")? {
                    Err(error) => return Err(error.context("a client's connection failed")),
                    Ok(_) => bail!("a client stopped reading"),
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(seen);
            }
            let tick = remaining.min(Duration::from_millis(100));
            if let Ok(Some(prompt)) = tokio::time::timeout(tick, self.finished_rx.recv()).await {
                *self.finished.entry(prompt).or_default() += 1;
            }
        }
    }

    /// Stop every reader; what each client received, in client order.
    pub async fn finish(self) -> anyhow::Result<Vec<Vec<Receipt>>> {
        let _ = self.stop.send(true);
        let mut all = Vec::with_capacity(self.readers.len());
        for reader in self.readers {
            all.push(
                reader
                    .await
                    .context("a client task panicked")?
                    .context("a client's connection failed")?,
            );
        }
        Ok(all)
    }
}

/// How one prompt's stamped stream of `count` tokens reached a set of clients.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Receipt time − emission stamp, for every token received the first time.
    pub latency: Latency,
    /// The first part of `latency`: `ts_ms` − emission stamp (agent and agent socket; whole ms).
    pub to_log: Latency,
    /// The second part: receipt time − `ts_ms` (SessionObject broadcast and client socket).
    pub from_log: Latency,
    /// Tokens never received, summed over clients.
    pub lost: usize,
    /// Tokens received more than once.
    pub duplicated: usize,
    /// Tokens received after one with a higher index.
    pub out_of_order: usize,
    /// Token texts of the prompt that carry no stamp (or an index out of range).
    pub unstamped: usize,
    /// Tokens received the first time, summed over clients.
    pub delivered: usize,
    /// Earliest emission stamp, Unix µs.
    pub first_emitted_us: Option<u128>,
    /// Latest emission stamp, Unix µs.
    pub last_emitted_us: Option<u128>,
    /// Latest receipt, Unix µs.
    pub last_received_us: Option<u128>,
}

impl Delivery {
    /// Check what each client received of `prompt_id` against `tok0 … tok{count-1}`, each once, in
    /// order.
    pub fn of(prompt_id: &str, count: usize, clients: &[Vec<Receipt>]) -> Delivery {
        let mut delivery = Delivery::default();
        for receipts in clients {
            let mut seen = vec![false; count];
            let mut previous: Option<usize> = None;
            for receipt in receipts.iter().filter(|r| r.prompt_id == prompt_id) {
                let Some((index, emitted_us)) =
                    parse_stamp(&receipt.text).filter(|(i, _)| *i < count)
                else {
                    delivery.unstamped += 1;
                    continue;
                };
                if previous.is_some_and(|previous| index <= previous) {
                    delivery.out_of_order += 1;
                }
                previous = Some(index);
                if std::mem::replace(&mut seen[index], true) {
                    delivery.duplicated += 1;
                    continue;
                }
                delivery.delivered += 1;
                let (emitted, logged, received) = (
                    emitted_us as f64 / 1000.0,
                    receipt.logged_ms as f64,
                    receipt.received_us as f64 / 1000.0,
                );
                delivery.latency.push(received - emitted);
                delivery.to_log.push(logged - emitted);
                delivery.from_log.push(received - logged);
                delivery.first_emitted_us = Some(
                    delivery
                        .first_emitted_us
                        .map_or(emitted_us, |t| t.min(emitted_us)),
                );
                delivery.last_emitted_us = Some(
                    delivery
                        .last_emitted_us
                        .map_or(emitted_us, |t| t.max(emitted_us)),
                );
                delivery.last_received_us = Some(
                    delivery
                        .last_received_us
                        .map_or(receipt.received_us, |t| t.max(receipt.received_us)),
                );
            }
            delivery.lost += seen.iter().filter(|s| !**s).count();
        }
        delivery
    }

    /// Nothing lost, duplicated, reordered or malformed.
    pub fn is_intact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0 && self.unstamped == 0
    }

    /// Tokens delivered per second, from the first emission to the last receipt.
    pub fn delivered_per_s(&self) -> Option<f64> {
        let span_us = self.last_received_us?.checked_sub(self.first_emitted_us?)?;
        (span_us > 0).then(|| self.delivered as f64 / (span_us as f64 / 1e6))
    }

    /// Tokens the model emitted per second (one stream), from its first to its last stamp.
    pub fn emitted_per_s(&self, count: usize) -> Option<f64> {
        let span_us = self.last_emitted_us?.checked_sub(self.first_emitted_us?)?;
        (span_us > 0).then(|| (count.saturating_sub(1)) as f64 / (span_us as f64 / 1e6))
    }

    /// `lost`, `duplicated`, `out_of_order`, `unstamped`, `samples` and the two parts of the
    /// latency for a row.
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut extra = serde_json::Map::new();
        extra.insert(
            "emit_to_log_p50_ms".into(),
            self.to_log.p50().map(round3).into(),
        );
        extra.insert(
            "emit_to_log_p99_ms".into(),
            self.to_log.p99().map(round3).into(),
        );
        extra.insert(
            "log_to_client_p50_ms".into(),
            self.from_log.p50().map(round3).into(),
        );
        extra.insert(
            "log_to_client_p99_ms".into(),
            self.from_log.p99().map(round3).into(),
        );
        extra.insert("lost".into(), self.lost.into());
        extra.insert("duplicated".into(), self.duplicated.into());
        extra.insert("out_of_order".into(), self.out_of_order.into());
        extra.insert("unstamped".into(), self.unstamped.into());
        extra.insert("samples".into(), self.latency.count().into());
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_stamp, Delivery, Receipt};

    fn receipt(text: &str, received_us: u128) -> Receipt {
        Receipt {
            prompt_id: "p".into(),
            text: text.into(),
            received_us,
            logged_ms: 0,
        }
    }

    #[test]
    fn stamps_parse() {
        assert_eq!(
            parse_stamp("tok12@1700000000123456 "),
            Some((12, 1_700_000_000_123_456))
        );
        assert_eq!(parse_stamp("tok12 "), None);
        assert_eq!(parse_stamp("hello@1 "), None);
    }

    #[test]
    fn losses_duplicates_and_reordering_are_counted() {
        let clean = vec![
            receipt("tok0@1000 ", 3000),
            receipt("tok1@2000 ", 4000),
            receipt("tok2@3000 ", 5000),
        ];
        let messy = vec![
            receipt("tok1@2000 ", 4000),
            receipt("tok0@1000 ", 4500),
            receipt("tok0@1000 ", 4600),
            receipt("garbage ", 4700),
        ];
        let mut other_prompt = receipt("tok2@3000 ", 9000);
        other_prompt.prompt_id = "q".into();
        let delivery = Delivery::of("p", 3, &[clean, messy, vec![other_prompt]]);
        assert_eq!(
            (
                delivery.lost,
                delivery.duplicated,
                delivery.out_of_order,
                delivery.unstamped
            ),
            (1 + 3, 1, 2, 1)
        );
        assert_eq!(delivery.delivered, 5);
        assert_eq!(delivery.latency.p50(), Some(2.0));
        assert_eq!(delivery.latency.percentile(100.0), Some(3.5));
        assert!(!delivery.is_intact());
        // 5 tokens from the first emission (1000 µs) to the last receipt (5000 µs).
        assert_eq!(delivery.delivered_per_s(), Some(5.0 / 0.004));
    }
}
