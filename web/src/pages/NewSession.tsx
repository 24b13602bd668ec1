// `/new`: pick a repository, write the first prompt. The first keystroke warms a sandbox for the repository,
// so it is ready by the time the prompt is sent.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, describeError, newKey } from "../api";
import { markReady, navigate } from "../route";
import { age } from "../time";
import type { RepoSummary } from "../wire";

const TITLE_MAX_CHARS = 80;
/** The select's value for "a repository that is not listed yet" (the list holds only repositories in use). */
const OTHER = "__other__";
const REPO_NAME = /^[A-Za-z0-9_.-]+\/[A-Za-z0-9_.-]+$/;

function repoLabel(repo: RepoSummary): string {
  const image = repo.image ? `image ${age(repo.image.age_ms)} old` : repo.building ? "image building" : "no image yet";
  return `${repo.repo} · ${image}`;
}

/** The session title: the prompt's first non-empty line, at most 80 characters. */
export function titleFromPrompt(prompt: string): string {
  const line = prompt.split("\n").find((l) => l.trim()) ?? "";
  const trimmed = line.trim();
  return trimmed.length > TITLE_MAX_CHARS ? `${trimmed.slice(0, TITLE_MAX_CHARS - 1)}…` : trimmed;
}

export function NewSessionPage() {
  const [repos, setRepos] = useState<RepoSummary[] | null>(null);
  const [loadError, setLoadError] = useState<string | null>(null);
  const [choice, setChoice] = useState("");
  const [otherRepo, setOtherRepo] = useState("");
  const [prompt, setPrompt] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const warmedFor = useRef<string | null>(null);
  const [warmNote, setWarmNote] = useState<string | null>(null);

  useEffect(() => {
    let live = true;
    api
      .repos()
      .then((response) => {
        if (!live) return;
        setRepos(response.repos);
        const first = response.repos[0];
        setChoice((current) => current || (first ? first.repo : OTHER));
      })
      .catch((err: unknown) => {
        if (!live) return;
        setLoadError(describeError(err));
        setRepos([]);
      });
    return () => {
      live = false;
    };
  }, []);

  useEffect(() => {
    if (repos !== null) markReady();
  }, [repos !== null]);

  const repo = choice === OTHER ? (REPO_NAME.test(otherRepo.trim()) ? otherRepo.trim() : "") : choice;

  const warm = (forRepo: string) => {
    if (!forRepo || warmedFor.current === forRepo) return;
    warmedFor.current = forRepo;
    // Best effort: a failed warm-up only costs the time it would have saved.
    setWarmNote(`Warming a sandbox for ${forRepo}…`);
    api
      .warm(forRepo)
      .then((answer) => setWarmNote(answer.requested ? `A sandbox for ${forRepo} is warming up` : `A sandbox for ${forRepo} is already warm`))
      .catch(() => setWarmNote(null));
  };

  const onRepoChange = (next: string) => {
    setChoice(next);
    if (warmedFor.current !== null && prompt && next !== OTHER) warm(next);
  };

  const start = async () => {
    const text = prompt.trim();
    if (!repo || !text || busy) return;
    setBusy(true);
    setError(null);
    try {
      const created = await api.createSession({
        repo,
        base_branch: null,
        title: titleFromPrompt(text) || null,
        model: null,
        parent_session_id: null,
      });
      await api.prompt(created.id, text, newKey());
      navigate(`/s/${encodeURIComponent(created.id)}`);
    } catch (err) {
      setError(describeError(err));
      setBusy(false);
    }
  };

  const selected = repos?.find((r) => r.repo === repo) ?? null;

  return (
    <main class="page narrow">
      <h1>New session</h1>
      <form
        class="card form"
        onSubmit={(e) => {
          e.preventDefault();
          void start();
        }}
      >
        <label>
          <span>Repository</span>
          <select value={choice} disabled={repos === null} onChange={(e) => onRepoChange(e.currentTarget.value)}>
            {repos === null && <option value="">Loading…</option>}
            {repos?.map((r) => (
              <option key={r.repo} value={r.repo}>
                {repoLabel(r)}
              </option>
            ))}
            {repos !== null && <option value={OTHER}>Another repository…</option>}
          </select>
        </label>
        {choice === OTHER && (
          <label>
            <span>Not listed: owner/name</span>
            <input
              class="mono"
              placeholder="owner/name"
              value={otherRepo}
              spellcheck={false}
              autoCapitalize="off"
              onInput={(e) => setOtherRepo(e.currentTarget.value)}
              onBlur={() => {
                if (warmedFor.current !== null && prompt) warm(repo);
              }}
            />
          </label>
        )}
        {loadError && (
          <p role="alert" class="error">
            Could not load repositories: {loadError}
          </p>
        )}
        {selected?.warning && <p class="warning">{selected.warning.message}</p>}
        <label>
          <span>Prompt</span>
          <textarea
            rows={6}
            placeholder="What should the agent do? (Enter to start, Shift+Enter for a new line)"
            value={prompt}
            onInput={(e) => {
              setPrompt(e.currentTarget.value);
              warm(repo);
            }}
            onKeyDown={(e) => {
              if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
                e.preventDefault();
                void start();
              }
            }}
          />
        </label>
        <div class="actions">
          <button type="submit" class="primary" disabled={busy || !repo || !prompt.trim()}>
            Start session
          </button>
          {busy ? <span class="muted">Starting…</span> : warmNote && <span class="muted small" data-testid="warm-status">{warmNote}</span>}
        </div>
        {error && (
          <p role="alert" class="error">
            {error}
          </p>
        )}
      </form>
    </main>
  );
}
