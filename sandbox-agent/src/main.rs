//! `sandbox-agent`: `run` is the agent inside a sandbox; `host` is the local sandbox provider;
//! `scripted-model` serves the demo/test model; `seed` creates a repository in the host's git store;
//! `tools` prints the agent's tool catalogue.

mod env;
mod host;
mod run;
mod scripted_model;
mod seed;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sandbox-agent",
    version,
    about = "Nightshift sandbox agent and local sandbox provider"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent for one session inside a sandbox: dial in, take prompts, work, stream events.
    Run(run::RunArgs),
    /// Serve the provider API, the local git store (smart HTTP) and, without a model key, the demo model.
    Host(host::HostArgs),
    /// Serve only the scripted model (Anthropic Messages and OpenAI chat completions SSE) for tests and demos.
    ScriptedModel(scripted_model::ScriptedModelArgs),
    /// Create a repository in a local git store (an existing one is left as it is).
    Seed(seed::SeedArgs),
    /// Print the agent's tool catalogue (markdown), generated from the table the agent runs its tools from.
    Tools,
    /// Inside an isolated image setup (started by the host): relay the egress socket to a loopback
    /// proxy port and run the setup with the proxy variables.
    #[command(hide = true)]
    SetupExec(host::isolation::setup::SetupExecArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env::LOG).unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Before the runtime's threads exist: this sets the proxy variables of the process.
    let relay = match &cli.command {
        Command::Run(args) => run::prepare_egress(args)?,
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::main(args, relay).await,
            Command::Host(args) => host::main(args).await,
            Command::ScriptedModel(args) => scripted_model::main(args).await,
            Command::Seed(args) => seed::main(args).await,
            Command::SetupExec(args) => host::isolation::setup::exec_main(args).await,
            Command::Tools => {
                print!("{}", run::tools::catalogue());
                Ok(())
            }
        }
    })
}
