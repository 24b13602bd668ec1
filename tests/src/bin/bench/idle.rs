//! `idle_sandboxes`: how many warm sandboxes this machine holds at once. The pool of the demo repository
//! is asked for [`TARGET`] ready sandboxes (each an overlay over the image on tmpfs, caught up with the
//! base branch); the row's value is how many became ready, with the memory each costs: the machine's
//! drop in available memory (`MemAvailable`: tmpfs pages, the kernel's mounts and dentries, the host's
//! own memory) divided by the count, and its parts we can name (tmpfs use of `/dev/shm`, host RSS).

use std::time::Duration;

use anyhow::Context;

use crate::ready::Provider;
use crate::report::{round3, Row};
use nightshift_tests::{System, DEMO_REPO};

/// Warm sandboxes asked for.
pub const TARGET: u64 = 200;

/// Bytes used on the tmpfs at `/dev/shm`.
fn shm_used_bytes() -> u64 {
    let path = c"/dev/shm";
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a valid out-pointer for the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return 0;
    }
    (stat.f_blocks - stat.f_bfree) * stat.f_frsize
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn available_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Resident set of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

pub async fn run(system: &System) -> anyhow::Result<Row> {
    let provider = Provider::of(system);
    let host_pid = system.host_pid().context("the host is not running")?;
    // Let earlier rows' pools settle first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let available_before = available_bytes();
    let shm_before = shm_used_bytes();
    let rss_before = rss_bytes(host_pid);
    let before = provider.pool(DEMO_REPO).await?["ready"]
        .as_u64()
        .unwrap_or(0);
    provider.warm(DEMO_REPO, TARGET, TARGET, false).await?;
    let ready = provider.pool(DEMO_REPO).await?["ready"]
        .as_u64()
        .unwrap_or(0);
    let added = ready.saturating_sub(before).max(1);
    let shm_per = shm_used_bytes().saturating_sub(shm_before) as f64 / added as f64;
    let rss_per = rss_bytes(host_pid).saturating_sub(rss_before) as f64 / added as f64;
    let machine_per = available_before.saturating_sub(available_bytes()) as f64 / added as f64;
    let mut extra = serde_json::Map::new();
    extra.insert(
        "tmpfs_kib_per_sandbox".into(),
        round3(shm_per / 1024.0).into(),
    );
    extra.insert(
        "host_rss_kib_per_sandbox".into(),
        round3(rss_per / 1024.0).into(),
    );
    // Other processes freeing memory meanwhile (a build ending) can hide the drop: a machine-wide
    // figure below what the sandboxes certainly hold (their tmpfs, the host's growth) is not a
    // measurement, and is reported as unknown rather than as a made-up small number.
    let known_per = shm_per + rss_per;
    extra.insert(
        "memory_kib_per_sandbox".into(),
        if machine_per >= known_per && machine_per > 0.0 {
            round3(machine_per / 1024.0).into()
        } else {
            serde_json::Value::Null
        },
    );
    extra.insert(
        "memory_lower_bound_kib_per_sandbox".into(),
        round3(known_per / 1024.0).into(),
    );
    Ok(Row {
        id: "idle_sandboxes",
        what: format!(
            "warm sandboxes held ready at once on this machine (pool target {TARGET} on the demo repository; no process per warm sandbox: an overlay over the image, caught up); memory_kib_per_sandbox = drop of MemAvailable per sandbox (null when other processes hid it; the lower bound is tmpfs + host growth)"
        ),
        unit: "sandboxes",
        p50: None,
        p99: None,
        value: Some(ready as f64),
        target: ">= 200".to_owned(),
        ok: Some(ready >= 200),
        extra,
    })
}
