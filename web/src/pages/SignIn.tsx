// Sign in: the dev identity form (when dev mode is on), with room for GitHub.
import { useEffect, useState } from "preact/hooks";
import { api, describeError } from "../api";
import { markReady } from "../route";
import type { Author } from "../wire";

export function SignInPage({ devMode, onSignedIn }: { devMode: boolean; onSignedIn: (user: Author) => void }) {
  const [login, setLogin] = useState("");
  const [name, setName] = useState("");
  const [email, setEmail] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  useEffect(markReady, []);

  const submit = async (event: Event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const me = await api.devSignIn({ login: login.trim(), name: name.trim(), email: email.trim() });
      onSignedIn(me.user);
    } catch (err) {
      setError(describeError(err));
      setBusy(false);
    }
  };

  return (
    <main class="page narrow signin">
      <h1>Sign in</h1>
      <button type="button" class="github" disabled title="GitHub sign-in is not configured on this deployment">
        Continue with GitHub
      </button>
      {devMode ? (
        <form class="card form" onSubmit={submit}>
          <p class="muted">Dev mode: sign in as anyone.</p>
          <label>
            <span>Login</span>
            <input name="login" autoComplete="username" required value={login} onInput={(e) => setLogin(e.currentTarget.value)} />
          </label>
          <label>
            <span>Name</span>
            <input name="name" autoComplete="name" required value={name} onInput={(e) => setName(e.currentTarget.value)} />
          </label>
          <label>
            <span>Email</span>
            <input
              name="email"
              type="email"
              autoComplete="email"
              required
              value={email}
              onInput={(e) => setEmail(e.currentTarget.value)}
            />
          </label>
          <button type="submit" class="primary" disabled={busy}>
            Sign in
          </button>
          {error && (
            <p role="alert" class="error">
              {error}
            </p>
          )}
        </form>
      ) : (
        <p class="muted">Dev sign-in is off on this deployment.</p>
      )}
    </main>
  );
}
