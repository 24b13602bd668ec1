//! `cargo xtask dev`: build, then run wrangler dev (127.0.0.1:8787) and the sandbox host (127.0.0.1:8788)
//! with a seeded demo repository, until Ctrl-C or until one of them dies.
//!
//! State lives in the git-ignored `.nightshift-dev/`: `secrets.env` (generated once), `host/` (the host's
//! git store and sandboxes) and `wrangler/` (Durable Object storage).

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::build::{self, Profile};
use crate::env;
use crate::process::{self, interrupt, Service};
use crate::setup;
use crate::step::{self, Outcome};
use crate::workspace::Workspace;

const WORKER_ADDR: &str = "127.0.0.1:8787";
const HOST_ADDR: &str = "127.0.0.1:8788";
const DEMO_REPO: &str = "demo/hello";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each service has to stop: the host stops its sandboxes first, and an agent takes up to 10 s
/// to commit, push and snapshot its work before the host kills it.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Random per-checkout secrets, generated once into `.nightshift-dev/secrets.env`.
struct Secrets {
    auth_secret: String,
    provider_token: String,
}

pub fn run(workspace: &Workspace) -> anyhow::Result<()> {
    setup::run(workspace)?;
    build::web(workspace, "dev")?;
    build::worker(workspace, "dev")?;
    build::agent(workspace, "dev", Profile::Debug)?;
    let dev_dir = workspace.dev_dir();
    let host_dir = dev_dir.join("host");
    step::run(
        "dev",
        &format!("ports {WORKER_ADDR} and {HOST_ADDR} free"),
        |_| {
            for addr in [WORKER_ADDR, HOST_ADDR] {
                TcpListener::bind(addr).with_context(|| {
                    format!("{addr} is in use (is another `cargo xtask dev` running?)")
                })?;
            }
            Ok(Outcome::Done)
        },
    )?;
    let mut secrets = None;
    step::run("dev", "secrets (.nightshift-dev/secrets.env)", |_| {
        let (loaded, outcome) = load_or_create_secrets(&dev_dir.join("secrets.env"))?;
        secrets = Some(loaded);
        Ok(outcome)
    })?;
    let secrets = secrets.context("secrets step produced nothing")?;
    let agent = workspace.agent_bin(Profile::Debug);
    step::run("dev", &format!("seed {DEMO_REPO}"), |_| {
        step::run_logged(
            Command::new(&agent)
                .arg("seed")
                .arg("--store")
                .arg(host_dir.join("git"))
                .args(["--repo", DEMO_REPO]),
            &step::log_path(&workspace.log_dir(), "seed"),
        )?;
        Ok(Outcome::Done)
    })?;

    interrupt::install();
    let mut services: Vec<Service> = Vec::new();
    let started = step::run("dev", "start sandbox-agent host and wrangler dev", |_| {
        let mut host = Command::new(&agent);
        host.arg("host")
            .args(["--listen", HOST_ADDR])
            .arg("--data-dir")
            .arg(&host_dir)
            .env(env::NIGHTSHIFT_PROVIDER_TOKEN, &secrets.provider_token);
        services.push(Service::spawn("host", &mut host)?);
        services.push(Service::spawn(
            "wrangler",
            &mut wrangler_command(workspace, &secrets),
        )?);
        let [host, wrangler] = services.as_mut_slice() else {
            bail!("expected two services")
        };
        process::wait_healthy(host, HOST_ADDR, START_TIMEOUT)?;
        process::wait_healthy(wrangler, WORKER_ADDR, START_TIMEOUT)?;
        // Edits under web/ are rebuilt into web/dist, which wrangler serves: reload the page to see them.
        services.push(Service::spawn("web", &mut build::web_watch(workspace))?);
        Ok(Outcome::Done)
    });
    if let Err(error) = started {
        process::stop_all(&mut services, STOP_GRACE);
        return Err(error);
    }

    // Every expensive step before the first prompt: the demo repository's image, and one sandbox
    // kept warm on it. Both run in the host's background; a host without them says so here.
    let image = process::http_post_json(
        HOST_ADDR,
        "/v1/images",
        &secrets.provider_token,
        &format!(r#"{{"repo":"{DEMO_REPO}"}}"#),
    );
    let pool = process::http_post_json(
        HOST_ADDR,
        &format!("/v1/pools/{DEMO_REPO}"),
        &secrets.provider_token,
        r#"{"target":1}"#,
    );
    let describe = |answer: std::io::Result<u16>| match answer {
        Ok(202) => "started".to_owned(),
        Ok(status) => format!("not available here (the host answered {status})"),
        Err(error) => format!("not started: {error}"),
    };
    let prepared = format!(
        "image build {}, warm pool {}",
        describe(image),
        describe(pool)
    );
    let model = match (
        std::env::var(env::NIGHTSHIFT_MODEL).ok().filter(|m| !m.trim().is_empty()),
        std::env::var_os(env::OPENAI_BASE_URL).is_some(),
        std::env::var_os(env::ANTHROPIC_API_KEY).is_some(),
    ) {
        (Some(model), true, _) => format!("{model} on the OpenAI-compatible server at OPENAI_BASE_URL"),
        (_, _, true) => "Anthropic (ANTHROPIC_API_KEY is set)".to_owned(),
        _ => "scripted demo model (set ANTHROPIC_API_KEY, or OPENAI_BASE_URL and NIGHTSHIFT_MODEL, for a real one)".to_owned(),
    };
    println!();
    println!("Nightshift is running: http://{WORKER_ADDR}");
    println!("  demo repository: {DEMO_REPO} (sign in with any name: dev mode is on)");
    println!("  ahead of time:   {prepared}");
    println!("  model:           {model}");
    println!(
        "  state:           {} (delete it to start over)",
        dev_dir.display()
    );
    println!("  web app:         edits under web/ are rebuilt as you save (reload the page)");
    println!("  Ctrl-C stops everything.");
    println!();
    for service in &services {
        service.echo();
    }

    loop {
        if interrupt::requested() {
            println!("[dev] stopping …");
            process::stop_all(&mut services, STOP_GRACE);
            println!("[dev] stopped");
            return Ok(());
        }
        for index in 0..services.len() {
            if let Some(status) = services[index].exited() {
                let name = services[index].name;
                let output = services[index].recent_output();
                process::stop_all(&mut services, STOP_GRACE);
                bail!("{name} exited unexpectedly ({status}); its last output:\n{output}");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wrangler dev` on 127.0.0.1:8787, offline, with dev mode on and the secrets as variables.
fn wrangler_command(workspace: &Workspace, secrets: &Secrets) -> Command {
    let mut command = Command::new(workspace.node());
    command
        .current_dir(&workspace.root)
        .arg(workspace.wrangler_js())
        .args(["dev", "--local", "--ip", "127.0.0.1", "--port", "8787"])
        .arg("--persist-to")
        .arg(workspace.dev_dir().join("wrangler"))
        .arg("--show-interactive-dev-session=false")
        .args(["--var", "DEV_MODE:1"])
        .args(
            std::env::var(env::NIGHTSHIFT_MODEL)
                .ok()
                .filter(|model| !model.trim().is_empty())
                .map(|model| ["--var".to_owned(), format!("DEFAULT_MODEL:{model}")])
                .into_iter()
                .flatten(),
        )
        .args(["--var", &format!("AUTH_SECRET:{}", secrets.auth_secret)])
        .args([
            "--var",
            &format!("PROVIDER_TOKEN:{}", secrets.provider_token),
        ])
        .env(env::PATH, workspace.tool_path())
        .envs(env::WRANGLER_OFFLINE);
    command
}

/// Read `KEY=value` lines, or create the file with fresh random values.
fn load_or_create_secrets(path: &Path) -> anyhow::Result<(Secrets, Outcome)> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let value = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        if let (Some(auth_secret), Some(provider_token)) =
            (value("AUTH_SECRET"), value("PROVIDER_TOKEN"))
        {
            return Ok((
                Secrets {
                    auth_secret,
                    provider_token,
                },
                Outcome::Cached,
            ));
        }
    }
    let secrets = Secrets {
        auth_secret: random_hex()?,
        provider_token: random_hex()?,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = format!(
        "# Generated by `cargo xtask dev`; local only, never committed.\nAUTH_SECRET={}\nPROVIDER_TOKEN={}\n",
        secrets.auth_secret, secrets.provider_token
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok((secrets, Outcome::Done))
}

/// 32 random bytes from the kernel, hex encoded.
fn random_hex() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
