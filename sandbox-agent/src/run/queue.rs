//! The local prompt queue: runs prompts one at a time, in the order they arrived, and routes `stop` to
//! the running prompt (or removes a queued one). In an isolated sandbox it asks the host for a snapshot
//! after every prompt (and when the session asks), and on shutdown it stops the running prompt — whose
//! work in progress is committed and pushed — takes a last snapshot and ends.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use nightshift_protocol::{Author, Event, PromptStatus};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::agent_loop::{self, Agent};
use super::egress;

/// A prompt to work on, as the session sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRequest {
    /// Prompt id.
    pub prompt_id: String,
    /// The text.
    pub text: String,
    /// Who asked (the commit author, once the agent commits).
    pub author: Author,
    /// Model id; empty means the agent's default.
    pub model: String,
}

/// What the link passes on from the session.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptCommand {
    /// Queue a prompt.
    Run(PromptRequest),
    /// Stop the running prompt, or the given one.
    Stop {
        /// Prompt to stop; `None` means whatever runs.
        prompt_id: Option<String>,
    },
    /// Take a snapshot now.
    Snapshot {
        /// Why (as the session said it).
        reason: String,
    },
    /// The sandbox is about to end: drop the local queue (the session keeps its own), stop the running
    /// prompt (committed and pushed as work in progress), take a last snapshot and end the queue.
    Shutdown {
        /// Why.
        reason: String,
    },
}

/// The host's snapshots, asked for over the egress socket of an isolated sandbox.
#[derive(Debug, Clone)]
pub struct Snapshots {
    socket: PathBuf,
}

impl Snapshots {
    /// Snapshots through the host's egress socket at `socket`.
    pub fn new(socket: PathBuf) -> Snapshots {
        Snapshots { socket }
    }

    /// Ask for a snapshot and log a `snapshot` event with its id; a failure is a log line (the host
    /// snapshots every sandbox again when it ends).
    async fn take(&self, reason: &str, events: &mpsc::Sender<Event>) {
        let reason = snapshot_reason(reason);
        let started = std::time::Instant::now();
        match egress::request_snapshot(&self.socket, &reason).await {
            Ok(id) => {
                tracing::info!(snapshot_id = %id, %reason, snapshot_ms = started.elapsed().as_millis() as u64, "snapshot taken");
                let _ = events.send(Event::Snapshot { id, reason }).await;
            }
            Err(error) => tracing::warn!(%error, %reason, "the host did not take a snapshot"),
        }
    }
}

/// `reason` as the host takes it: 1-40 of `a-z`, `0-9` and `_` (others become `_`).
fn snapshot_reason(reason: &str) -> String {
    let cleaned: String = reason
        .trim()
        .chars()
        .take(40)
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    if cleaned.is_empty() {
        "requested".to_owned()
    } else {
        cleaned
    }
}

struct Running {
    prompt_id: String,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Run the queue until the command channel closes (then stop the running prompt and return) or a
/// [`PromptCommand::Shutdown`] is done. With `snapshots`, a snapshot follows every prompt.
pub async fn run(
    agent: Arc<Agent>,
    mut commands: mpsc::UnboundedReceiver<PromptCommand>,
    events: mpsc::Sender<Event>,
    snapshots: Option<Snapshots>,
) {
    let mut queue: VecDeque<PromptRequest> = VecDeque::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut running: Option<Running> = None;
    loop {
        if running.is_none() {
            if let Some(request) = queue.pop_front() {
                let cancel = CancellationToken::new();
                let prompt_id = request.prompt_id.clone();
                let task = tokio::spawn({
                    let agent = Arc::clone(&agent);
                    let events = events.clone();
                    let cancel = cancel.clone();
                    async move { agent_loop::run_prompt(&agent, &request, &events, &cancel).await }
                });
                running = Some(Running {
                    prompt_id,
                    cancel,
                    task,
                });
            }
        }
        tokio::select! {
            command = commands.recv() => match command {
                None => {
                    if let Some(running) = running.take() {
                        running.cancel.cancel();
                        let _ = running.task.await;
                    }
                    return;
                }
                Some(PromptCommand::Run(request)) => {
                    if seen.insert(request.prompt_id.clone()) {
                        tracing::info!(prompt_id = %request.prompt_id, queued = queue.len(), "prompt received");
                        queue.push_back(request);
                    } else {
                        tracing::info!(prompt_id = %request.prompt_id, "ignoring repeated run_prompt");
                    }
                }
                Some(PromptCommand::Stop { prompt_id }) => {
                    stop(prompt_id, running.as_ref(), &mut queue, &events).await;
                }
                Some(PromptCommand::Snapshot { reason }) => match &snapshots {
                    // Between prompts the workspace is still; during one, the snapshot is of the
                    // moment (a tool may be writing).
                    Some(snapshots) => snapshots.take(&reason, &events).await,
                    None => tracing::info!(%reason, "snapshot asked for, but this sandbox has no host to take it"),
                },
                Some(PromptCommand::Shutdown { reason }) => {
                    tracing::info!(%reason, queued = queue.len(), running = running.is_some(), "shutting down");
                    queue.clear();
                    if let Some(running) = running.take() {
                        running.cancel.cancel();
                        let _ = running.task.await;
                    }
                    if let Some(snapshots) = &snapshots {
                        agent.tidy_for_snapshot().await;
                        snapshots.take("shutdown", &events).await;
                    }
                    return;
                }
            },
            joined = join(&mut running), if running.is_some() => {
                let finished = running.take();
                if queue.is_empty() {
                    // Nothing left to do: the `session.idle` hooks run beside the queue.
                    tokio::spawn({
                        let agent = Arc::clone(&agent);
                        let events = events.clone();
                        async move { agent.on_idle(&events).await }
                    });
                }
                if let (Err(error), Some(finished)) = (joined, finished) {
                    tracing::error!(prompt_id = %finished.prompt_id, %error, "prompt task failed");
                    let _ = events
                        .send(Event::PromptFinished {
                            prompt_id: finished.prompt_id,
                            status: PromptStatus::Failed,
                            error: Some(format!("agent task failed: {error}")),
                        })
                        .await;
                }
                if let Some(snapshots) = &snapshots {
                    agent.tidy_for_snapshot().await;
                    snapshots.take("prompt_finished", &events).await;
                }
            }
        }
    }
}

/// Wait for the running prompt's task; never resolves when nothing runs.
async fn join(running: &mut Option<Running>) -> Result<(), tokio::task::JoinError> {
    match running {
        Some(running) => (&mut running.task).await,
        None => std::future::pending().await,
    }
}

async fn stop(
    prompt_id: Option<String>,
    running: Option<&Running>,
    queue: &mut VecDeque<PromptRequest>,
    events: &mpsc::Sender<Event>,
) {
    match (prompt_id, running) {
        (None, Some(running)) => running.cancel.cancel(),
        (Some(id), Some(running)) if id == running.prompt_id => running.cancel.cancel(),
        (Some(id), _) => {
            if let Some(position) = queue.iter().position(|request| request.prompt_id == id) {
                queue.remove(position);
                let _ = events
                    .send(Event::PromptFinished {
                        prompt_id: id,
                        status: PromptStatus::Stopped,
                        error: None,
                    })
                    .await;
            } else {
                tracing::info!(prompt_id = %id, "stop for a prompt that is neither running nor queued");
            }
        }
        (None, None) => tracing::info!("stop with nothing running"),
    }
}

#[cfg(test)]
mod tests {
    use super::snapshot_reason;

    #[test]
    fn snapshot_reasons_are_what_the_host_takes() {
        assert_eq!(snapshot_reason("prompt_finished"), "prompt_finished");
        assert_eq!(snapshot_reason(" Before Expiry! "), "before_expiry_");
        assert_eq!(snapshot_reason(""), "requested");
        assert_eq!(snapshot_reason(&"x".repeat(100)).len(), 40);
    }
}
