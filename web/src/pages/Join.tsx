// `/join/{token}`: joins the session the invite is for, then opens it.
import { useEffect, useState } from "preact/hooks";
import { api, describeError } from "../api";
import { markReady, navigate } from "../route";

export function JoinPage({ token }: { token: string }) {
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let live = true;
    api
      .join(token)
      .then((joined) => {
        if (live) navigate(`/s/${encodeURIComponent(joined.id)}`, { replace: true });
      })
      .catch((err: unknown) => {
        if (!live) return;
        setError(describeError(err));
        markReady();
      });
    return () => {
      live = false;
    };
  }, [token]);
  return (
    <main class="page narrow">
      <h1>Joining session</h1>
      {error ? (
        <p role="alert" class="error">
          Could not join: {error}
        </p>
      ) : (
        <p class="muted">Joining…</p>
      )}
    </main>
  );
}
