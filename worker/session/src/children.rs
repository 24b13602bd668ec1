//! Sub-sessions: a session's place in its tree (its [`Family`]), the children it spawned, the
//! guardrails on spawning ([`ChildLimits`]), the status a child reports to its parent, and who a
//! `stop{tree}` reaches.
//!
//! A spawn is decided in two steps: the parent checks depth and its running children
//! ([`Session::plan_spawn`]); the root of the tree counts every session spawned in it
//! ([`Session::reserve_in_tree`]). The object then creates the child, which records its family
//! ([`Session::adopt`]), and the parent records the child ([`Session::child_created`]). The child
//! reports each change of its listing status ([`Session::status_report`]); the parent logs it as
//! `child_session{id, status}` ([`Session::child_status`]).

use nightshift_protocol::http::SessionStatus;
use nightshift_protocol::{Author, ChildInfo, Event, PromptStatus};

use crate::session::{Effects, Session};
use crate::store::Store;
use crate::SessionError;

/// Guardrails on sub-sessions (Worker variables `CHILD_MAX_DEPTH`, `CHILD_MAX_RUNNING`,
/// `CHILD_MAX_PER_ROOT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildLimits {
    /// Deepest a session may be (a root is depth 0): by default a child (1) and a grandchild (2).
    pub max_depth: u32,
    /// Most children of one session that are `starting` or `running` at once.
    pub max_running: u32,
    /// Most sessions spawned in one tree, the root not counted.
    pub max_per_root: u32,
}

impl Default for ChildLimits {
    fn default() -> Self {
        Self {
            max_depth: 2,
            max_running: 5,
            max_per_root: 15,
        }
    }
}

/// A session's place in its tree, and what it knows of its children.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Family {
    /// The session that spawned this one.
    pub parent_session_id: Option<String>,
    /// The root of the tree (this session's own id for a root).
    pub root_session_id: String,
    /// 0 for a root, 1 for its children, …
    pub depth: u32,
    /// The listing status last reported to the parent, with the `seq` it was reported at.
    pub reported: Option<(SessionStatus, u64)>,
    /// At the root: how many sessions were spawned in the tree.
    pub spawned_in_tree: u32,
    /// The children, oldest first.
    pub children: Vec<ChildRecord>,
}

/// A child as its parent records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildRecord {
    /// Session id.
    pub id: String,
    /// Repository.
    pub repo: String,
    /// Title.
    pub title: String,
    /// Its status, as last reported.
    pub status: SessionStatus,
    /// The child's `seq` when it reported that status (older reports are ignored).
    pub status_seq: u64,
    /// When it was created.
    pub created_ms: u64,
}

impl ChildRecord {
    /// The record as the agent sees it.
    pub fn info(&self) -> ChildInfo {
        ChildInfo {
            id: self.id.clone(),
            repo: self.repo.clone(),
            title: self.title.clone(),
            status: self.status,
            created_ms: self.created_ms,
        }
    }

    fn working(&self) -> bool {
        matches!(
            self.status,
            SessionStatus::Starting | SessionStatus::Running
        )
    }
}

/// A child to stop because its parent stopped its tree; the child stops its own children in turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeStop {
    /// The child's session id.
    pub session_id: String,
    /// Who stopped the tree (recorded on the child's cancelled prompts).
    pub by: Author,
}

/// What the parent needs to spawn a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnPlan {
    /// The child's family (no children yet).
    pub family: Family,
    /// The person whose prompt is running: the child's creator and the author of its prompt.
    pub author: Author,
}

/// A status change a child sends its parent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    /// The parent to tell.
    pub parent_session_id: String,
    /// The child.
    pub id: String,
    /// Its status now.
    pub status: SessionStatus,
    /// The child's `seq` when it changed.
    pub seq: u64,
}

impl<S: Store> Session<'_, S> {
    /// This session's family: the stored one, or a root's.
    pub fn family(&self) -> Result<Family, SessionError> {
        if let Some(family) = self.store.family()? {
            return Ok(family);
        }
        let info = self.info()?;
        Ok(Family {
            parent_session_id: None,
            root_session_id: info.id,
            depth: 0,
            reported: None,
            spawned_in_tree: 0,
            children: Vec::new(),
        })
    }

    /// Check the guardrails this session decides (depth, running children) for a new child, and
    /// name its author: the person whose prompt is running (there must be one).
    pub fn plan_spawn(&self, limits: &ChildLimits) -> Result<SpawnPlan, SessionError> {
        let info = self.info()?;
        let family = self.family()?;
        let depth = family.depth.saturating_add(1);
        if depth > limits.max_depth {
            return Err(SessionError::ChildLimit(format!(
                "sub-sessions may nest at most {} deep and this session is at depth {}; do the work here instead",
                limits.max_depth, family.depth
            )));
        }
        let running = family.children.iter().filter(|c| c.working()).count();
        if running >= limits.max_running as usize {
            return Err(SessionError::ChildLimit(format!(
                "at most {} children may run at once and {running} are running; wait for one to finish (session_status, list_children)",
                limits.max_running
            )));
        }
        let author = self
            .store
            .unfinished_prompts()?
            .into_iter()
            .find(|p| p.status == PromptStatus::Running)
            .map(|p| p.author)
            .ok_or_else(|| {
                SessionError::Conflict("sub-sessions are spawned only while a prompt runs".into())
            })?;
        Ok(SpawnPlan {
            family: Family {
                parent_session_id: Some(info.id),
                root_session_id: family.root_session_id,
                depth,
                reported: None,
                spawned_in_tree: 0,
                children: Vec::new(),
            },
            author,
        })
    }

    /// At the root: count one more session spawned in the tree, unless the tree is full.
    pub fn reserve_in_tree(&mut self, limits: &ChildLimits) -> Result<u32, SessionError> {
        let mut family = self.family()?;
        if family.parent_session_id.is_some() {
            return Err(SessionError::Conflict(
                "only the root counts its tree".into(),
            ));
        }
        if family.spawned_in_tree >= limits.max_per_root {
            return Err(SessionError::ChildLimit(format!(
                "this tree already spawned {} sessions, the most it may; do the work here instead",
                limits.max_per_root
            )));
        }
        family.spawned_in_tree = family.spawned_in_tree.saturating_add(1);
        self.store.save_family(&family)?;
        Ok(family.spawned_in_tree)
    }

    /// In a new child: record its family (from the parent's [`SpawnPlan`]).
    pub fn adopt(&mut self, family: &Family) -> Result<(), SessionError> {
        self.info()?;
        self.store.save_family(family)?;
        Ok(())
    }

    /// In the parent: a child was created; log `child_session{id, status: starting}`.
    pub fn child_created(&mut self, child: ChildRecord) -> Result<Effects, SessionError> {
        let mut family = self.family()?;
        let event = Event::ChildSession {
            id: child.id.clone(),
            status: child.status.as_str().to_owned(),
        };
        family.children.retain(|c| c.id != child.id);
        family.children.push(child);
        self.store.save_family(&family)?;
        let mut effects = Effects::default();
        self.log(&mut effects, event)?;
        Ok(effects)
    }

    /// In the parent: child `id` reports `status` as of its `seq`. A report older than the last one
    /// is ignored; a change is logged as `child_session{id, status}`. Not a child: `NotFound`.
    pub fn child_status(
        &mut self,
        id: &str,
        status: SessionStatus,
        seq: u64,
    ) -> Result<Effects, SessionError> {
        let mut family = self.family()?;
        let child = family
            .children
            .iter_mut()
            .find(|c| c.id == id)
            .ok_or(SessionError::NotFound)?;
        let mut effects = Effects::default();
        if seq < child.status_seq {
            return Ok(effects);
        }
        child.status_seq = seq;
        let changed = child.status != status;
        child.status = status;
        self.store.save_family(&family)?;
        if changed {
            self.log(
                &mut effects,
                Event::ChildSession {
                    id: id.to_owned(),
                    status: status.as_str().to_owned(),
                },
            )?;
        }
        Ok(effects)
    }

    /// In a child: the report to send its parent when its listing status changed since the last
    /// one (it is remembered as sent); `None` for a root or when nothing changed.
    pub fn status_report(&mut self) -> Result<Option<ChildReport>, SessionError> {
        let mut family = self.family()?;
        let Some(parent) = family.parent_session_id.clone() else {
            return Ok(None);
        };
        let status = crate::index::current(&*self.store, self.now_ms)?.status;
        if family.reported.map(|(s, _)| s) == Some(status) {
            return Ok(None);
        }
        let seq = self.store.last_seq()?;
        family.reported = Some((status, seq));
        self.store.save_family(&family)?;
        Ok(Some(ChildReport {
            parent_session_id: parent,
            id: self.info()?.id,
            status,
            seq,
        }))
    }

    /// The children, oldest first.
    pub fn children(&self) -> Result<Vec<ChildRecord>, SessionError> {
        Ok(self.family()?.children)
    }

    /// One child; anything else (including grandchildren) is `NotFound`.
    pub fn child(&self, id: &str) -> Result<ChildRecord, SessionError> {
        self.family()?
            .children
            .into_iter()
            .find(|c| c.id == id)
            .ok_or(SessionError::NotFound)
    }
}
