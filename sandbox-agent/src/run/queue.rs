//! The local prompt queue: runs prompts one at a time, in the order they arrived, and routes `stop` to
//! the running prompt (or removes a queued one).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use nightshift_protocol::{Author, Event, PromptStatus};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::agent_loop::{self, Agent};

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
}

struct Running {
    prompt_id: String,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Run the queue until the command channel closes (then stop the running prompt and return).
pub async fn run(
    agent: Arc<Agent>,
    mut commands: mpsc::UnboundedReceiver<PromptCommand>,
    events: mpsc::Sender<Event>,
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
