//! `sandbox-agent run`: the agent inside a sandbox. It dials its session ([`link`]), takes prompts one at
//! a time ([`queue`]), works on each with a model ([`provider`]) and the workspace tools ([`tools`],
//! confined by [`workspace`], writes held back by the sync [`gate`], every step put to the [`hook`]s)
//! in the [`agent_loop`], commits and pushes with [`git`], and streams every event back through the
//! acknowledged, journaled [`outbox`].
//!
//! Task layout: the link task owns the socket and the outbox; the queue task owns the prompts; each
//! prompt runs in its own task. Events flow prompt → queue-owned channel → link; commands flow
//! link → queue. So the link keeps heartbeating and taking `stop` while a prompt runs.

pub mod agent_loop;
pub mod conversation;
pub mod egress;
pub mod gate;
pub mod git;
pub mod hook;
pub mod link;
pub mod outbox;
pub mod provider;
pub mod queue;
pub mod tools;
pub mod workspace;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;

use crate::env;
use agent_loop::{Agent, AgentConfig};
use git::Git;
use link::{LinkChannels, LinkConfig, SandboxToken};
use outbox::Outbox;
use provider::{ApiKey, ProviderConfig, Providers};
use queue::PromptCommand;
use tools::ToolLimits;
use workspace::Workspace;

/// Events buffered between the prompt task and the link before the prompt waits.
const EVENT_CHANNEL_CAPACITY: usize = 1024;
/// How long the agent takes, after SIGTERM, to stop, commit and push, snapshot and deliver its events
/// (the host waits 10 s before it kills).
const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(8);
/// After the work is extracted, how long a shutting-down agent that is not connected to its session
/// waits for the link to come back and deliver its last events.
const UNDELIVERABLE_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);
/// The git catch-up starts at the session's first `welcome`, or after this long without one.
const CATCH_UP_DEFER_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Arguments of `sandbox-agent run`; every one can come from the environment.
#[derive(clap::Args)]
pub struct RunArgs {
    /// WebSocket URL of the session's agent route (`ws://…/sandbox/{id}/ws`).
    #[arg(long, env = env::CONNECT_URL)]
    pub connect_url: String,
    /// Per-sandbox token presented as `Authorization: Bearer …`.
    #[arg(long, env = env::SANDBOX_TOKEN, hide_env_values = true)]
    pub sandbox_token: String,
    /// Sandbox id reported in `hello`.
    #[arg(long, env = env::SANDBOX_ID)]
    pub sandbox_id: String,
    /// Workspace root: the git working copy the tools are confined to.
    #[arg(long, env = env::WORKSPACE)]
    pub workspace: PathBuf,
    /// Base URL of the Anthropic Messages API.
    #[arg(long, env = env::ANTHROPIC_BASE_URL, default_value = provider::ANTHROPIC_DEFAULT_BASE_URL)]
    pub anthropic_base_url: String,
    /// Anthropic API key; without it no `x-api-key` is sent (fine for the local scripted model).
    #[arg(long, env = env::ANTHROPIC_API_KEY, hide_env_values = true)]
    pub anthropic_api_key: Option<String>,
    /// Base URL of an OpenAI-compatible chat completions API, including `/v1` (e.g.
    /// `http://localhost:11434/v1` for Ollama). With it, model ids that are neither Claude nor OpenAI
    /// go there. Default with only `OPENAI_API_KEY`: `https://api.openai.com/v1`.
    #[arg(long, env = env::OPENAI_BASE_URL)]
    pub openai_base_url: Option<String>,
    /// OpenAI API key, sent as `Authorization: Bearer …`; local servers need none.
    #[arg(long, env = env::OPENAI_API_KEY, hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// The session this sandbox works for; names the branch `nightshift/<session-id>`. Without it the
    /// agent neither catches up with git nor commits.
    #[arg(long, env = env::SESSION_ID)]
    pub session_id: Option<String>,
    /// The branch the session starts from; default the branch checked out in the workspace.
    #[arg(long, env = env::BASE_BRANCH)]
    pub base_branch: Option<String>,
    /// Use at most this many tokens of the model's context window (default: the whole window of the
    /// model); older tool outputs are compacted near it.
    #[arg(long, env = env::CONTEXT_WINDOW_TOKENS)]
    pub context_window_tokens: Option<u64>,
    /// Where the agent keeps its state (the outbox journal); default `<workspace>/../.nightshift-agent`,
    /// never inside the workspace.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The host's egress proxy socket: the only way out of an isolated sandbox. With it, the agent
    /// relays a loopback port to it ([`egress::Relay`]) and sends everything through it.
    #[arg(long, env = env::EGRESS_SOCKET)]
    pub egress_socket: Option<PathBuf>,
}

/// The egress relay of `args`, bound, with the proxy variables exported for everything the agent
/// starts. Call it before the runtime starts (see [`egress::Relay::export_env`]).
pub fn prepare_egress(args: &RunArgs) -> anyhow::Result<Option<egress::Relay>> {
    let Some(socket) = &args.egress_socket else {
        return Ok(None);
    };
    let relay = egress::Relay::bind(socket).context("starting the egress relay")?;
    relay.export_env();
    Ok(Some(relay))
}

/// The default state directory: beside the workspace, not in it.
fn default_state_dir(workspace: &Path) -> PathBuf {
    match workspace.parent() {
        Some(parent) => parent.join(".nightshift-agent"),
        None => std::env::temp_dir().join("nightshift-agent"),
    }
}

/// Run the agent until interrupted; with `relay` (from [`prepare_egress`]), all its traffic goes
/// through it.
pub async fn main(args: RunArgs, relay: Option<egress::Relay>) -> anyhow::Result<()> {
    let workspace = Workspace::open(&args.workspace).context("opening the workspace")?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(workspace.root()));
    if state_dir.starts_with(workspace.root()) {
        anyhow::bail!(
            "state dir {} must not be inside the workspace",
            state_dir.display()
        );
    }
    let outbox = Outbox::open(&state_dir.join("outbox.jsonl")).context("opening the outbox")?;
    let proxy_url = relay.as_ref().map(egress::Relay::proxy_url);
    if let Some(relay) = relay {
        relay.spawn().context("serving the egress relay")?;
    }
    let key = |key: Option<String>| key.filter(|key| !key.trim().is_empty()).map(ApiKey::new);
    let config = ProviderConfig {
        anthropic_api_key: key(args.anthropic_api_key),
        openai_base_url: args.openai_base_url.filter(|url| !url.trim().is_empty()),
        openai_api_key: key(args.openai_api_key),
        proxy_url: proxy_url.clone(),
        ..ProviderConfig::new(args.anthropic_base_url.clone())
    };
    if config.anthropic_api_key.is_none() {
        tracing::info!("no ANTHROPIC_API_KEY: calling the anthropic endpoint without a key");
    }
    let openai_url = config.openai_base_url.clone();
    let providers = Providers::new(config).context("creating the model client")?;
    let config = LinkConfig {
        proxy_url: proxy_url.clone(),
        ..LinkConfig::new(
            args.connect_url,
            SandboxToken::new(args.sandbox_token),
            args.sandbox_id,
        )
    };
    config.request().context("checking the connect url")?;
    tracing::info!(
        workspace = %workspace.root().display(),
        state_dir = %state_dir.display(),
        proxy = ?proxy_url,
        anthropic_url = %args.anthropic_base_url,
        openai_url = ?openai_url,
        next_producer_seq = outbox.next_seq(),
        "sandbox agent starting"
    );

    let (gate_setter, gate) = gate::sync_gate();
    let (session_calls, calls) =
        tools::session_tools::SessionCalls::new(tools::session_tools::CALL_TIMEOUT);
    let agent_config = AgentConfig {
        session_calls: Some(session_calls),
        session_id: args.session_id.filter(|id| !id.trim().is_empty()),
        base_branch: args.base_branch.filter(|b| !b.trim().is_empty()),
        context_window_tokens: args.context_window_tokens,
        limits: ToolLimits::default(),
    };
    let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let (welcomed_tx, welcomed) = tokio::sync::watch::channel(false);
    // In an isolated sandbox the host takes snapshots, asked for over the egress socket.
    let snapshots = args.egress_socket.clone().map(queue::Snapshots::new);
    // The agent is made beside the link, which dials at once (asking git about the workspace starts a
    // process). The catch-up runs beside everything else: reads work at once, writes wait for the
    // gate. It starts once the session welcomed the agent: its git processes would only slow
    // connecting down (the sandbox is `ready` when the agent is connected), and no prompt comes before.
    let mut queue = tokio::spawn({
        let mut welcomed = welcomed.clone();
        async move {
            let repository = Git::new(workspace.root());
            let git = repository.is_repository().await.then_some(repository);
            let agent = Arc::new(Agent::new(providers, workspace, git, gate, agent_config));
            tokio::spawn({
                let agent = Arc::clone(&agent);
                let events = events_tx.clone();
                async move {
                    let _ =
                        tokio::time::timeout(CATCH_UP_DEFER_MAX, welcomed.wait_for(|w| *w)).await;
                    agent.catch_up(gate_setter, &events).await
                }
            });
            queue::run(agent, commands_rx, events_tx, snapshots).await
        }
    });
    let mut link = tokio::spawn(link::run(
        config,
        outbox,
        LinkChannels {
            events: events_rx,
            commands: commands_tx.clone(),
            welcomed: welcomed_tx,
            calls,
        },
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;

    tokio::select! {
        result = &mut link => {
            // The link ends once no event can come any more and every one was acknowledged: after a
            // `shutdown` from the session ended the queue.
            result.context("session link task")?.context("session link")?;
            tracing::info!("session link finished");
        }
        signal = tokio::signal::ctrl_c() => {
            signal.context("waiting for ctrl-c")?;
            tracing::info!("interrupted; exiting (unacknowledged events stay in the outbox journal)");
            link.abort();
        }
        _ = terminate.recv() => {
            // The host stops this sandbox: extract the work first. The queue stops the running
            // prompt (committed and pushed as work in progress), takes a last snapshot and ends;
            // the link then delivers every event and ends.
            tracing::info!("SIGTERM: stopping the prompt, committing and pushing its work, snapshotting");
            let _ = commands_tx.send(PromptCommand::Shutdown { reason: "terminated".to_owned() });
            let deadline = tokio::time::Instant::now() + SHUTDOWN_LIMIT;
            let _ = tokio::time::timeout_at(deadline, &mut queue).await;
            // Not connected to the session now: a moment to reconnect, not the whole limit.
            let deadline = if *welcomed.borrow() {
                deadline
            } else {
                deadline.min(tokio::time::Instant::now() + UNDELIVERABLE_WAIT)
            };
            match tokio::time::timeout_at(deadline, &mut link).await {
                Ok(result) => {
                    result.context("session link task")?.context("session link")?;
                    tracing::info!("work extracted and every event delivered; exiting");
                }
                Err(_) => {
                    tracing::warn!(limit_ms = SHUTDOWN_LIMIT.as_millis() as u64, "shutdown took too long; exiting (unacknowledged events stay in the outbox journal)");
                    link.abort();
                }
            }
        }
    }
    queue.abort();
    Ok(())
}

#[cfg(test)]
mod tests;
