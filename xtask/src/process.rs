//! Long-running children of `dev`: each in its own process group (so stopping one stops everything it
//! started, e.g. wrangler's workerd), output prefixed with its name, and stopped with SIGINT, then SIGKILL.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Lines of output kept per child for error messages.
const RECENT_LINES: usize = 60;

/// A child process group with a name.
pub struct Service {
    pub name: &'static str,
    child: Child,
    output: Arc<Output>,
}

struct Output {
    /// Print lines as they come (off while starting, so progress lines stay readable).
    echo: AtomicBool,
    recent: Mutex<VecDeque<String>>,
}

impl Service {
    /// Start `command` as the leader of a new process group, stdin closed, output captured line by line.
    pub fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Service> {
        let mut child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start {name}"))?;
        let output = Arc::new(Output {
            echo: AtomicBool::new(false),
            recent: Mutex::new(VecDeque::new()),
        });
        if let Some(stdout) = child.stdout.take() {
            forward(name, stdout, Arc::clone(&output));
        }
        if let Some(stderr) = child.stderr.take() {
            forward(name, stderr, Arc::clone(&output));
        }
        Ok(Service {
            name,
            child,
            output,
        })
    }

    /// From now on, print the child's output (prefixed with its name) as it comes.
    pub fn echo(&self) {
        self.output.echo.store(true, Ordering::SeqCst);
    }

    /// The child's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines the child printed.
    pub fn recent_output(&self) -> String {
        let recent = self.output.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .map(|line| format!("  [{}] {line}\n", self.name))
            .collect()
    }

    fn signal_group(&self, signal: libc::c_int) {
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions; a negative pid names our child's process group.
        unsafe { libc::kill(-pgid, signal) };
    }
}

fn forward(name: &'static str, stream: impl Read + Send + 'static, output: Arc<Output>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if output.echo.load(Ordering::SeqCst) {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "[{name}] {line}");
            }
            let mut recent = output.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_LINES {
                recent.pop_front();
            }
            recent.push_back(line);
        }
    });
}

/// Stop the services one after another, in order: SIGINT to the service's process group, up to `grace`
/// for it to exit, then SIGKILL to the group (also reaching grandchildren such as workerd that outlive
/// their parent). In order, because a service may need the later ones while it stops (the sandbox host's
/// agents deliver their last events to the Worker).
pub fn stop_all(services: &mut [Service], grace: Duration) {
    for service in services.iter_mut() {
        service.signal_group(libc::SIGINT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && service.exited().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        service.signal_group(libc::SIGKILL);
        let _ = service.child.wait();
    }
}

/// The HTTP status of `GET http://{addr}{path}`, over a plain loopback connection.
pub fn http_status(addr: &str, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 32];
    let mut filled = 0;
    while filled < 12 {
        let read = stream.read(&mut head[filled..])?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    let text = String::from_utf8_lossy(&head[..filled]);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}

/// `POST path` with a JSON `body` and a bearer token to `addr`; the answer's status.
pub fn http_post_json(addr: &str, path: &str, bearer: &str, body: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut head = [0u8; 32];
    let mut filled = 0;
    while filled < 12 {
        let read = stream.read(&mut head[filled..])?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    let text = String::from_utf8_lossy(&head[..filled]);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}

/// Wait until `GET /healthz` answers 200 at `addr`, failing early (with its output) when the service dies,
/// or when Ctrl-C is pressed.
pub fn wait_healthy(service: &mut Service, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = service.exited() {
            bail!(
                "{} exited while starting ({status}); its last output:\n{}",
                service.name,
                service.recent_output()
            );
        }
        if interrupt::requested() {
            bail!("interrupted");
        }
        if let Ok(200) = http_status(addr, "/healthz") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer GET http://{addr}/healthz within {} s; its last output:\n{}",
                service.name,
                timeout.as_secs(),
                service.recent_output()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ctrl-C and SIGTERM, turned into a flag the main loop polls.
pub mod interrupt {
    use std::sync::atomic::{AtomicBool, Ordering};

    static REQUESTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        REQUESTED.store(true, Ordering::SeqCst);
    }

    /// Catch SIGINT and SIGTERM from now on.
    pub fn install() {
        let handler = on_signal as extern "C" fn(libc::c_int);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        }
    }

    /// Whether Ctrl-C (or SIGTERM) arrived.
    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }
}
