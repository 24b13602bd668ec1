// Entry: renders a shell at once, then asks `/auth/session` who is signed in and shows the route's page.
import { render } from "preact";
import { useCallback, useEffect, useState } from "preact/hooks";
import { UNAUTHORIZED_EVENT, api, describeError } from "./api";
import { dropBootSocket, rememberSignedIn } from "./boot";
import { Header } from "./components/Header";
import { JoinPage } from "./pages/Join";
import { NewSessionPage } from "./pages/NewSession";
import { SessionsPage } from "./pages/Sessions";
import { SignInPage } from "./pages/SignIn";
import { interceptLinks, markReady, parseRoute, useLocation } from "./route";
import type { AuthSession, Author } from "./wire";
import "./style.css";

// The session view carries markdown and highlighting: a separate chunk, fetched at once when the first
// page is a session (in parallel with `/auth/session`), otherwise after the first render.
type SessionModule = typeof import("./pages/Session");
let sessionModule: Promise<SessionModule> | null = null;
// Set once the chunk has loaded, so a page rendered after that shows the session at once.
let sessionModuleLoaded: SessionModule | null = null;
const loadSession = (): Promise<SessionModule> =>
  (sessionModule ??= import("./pages/Session").then((loaded) => (sessionModuleLoaded = loaded)));
if (location.pathname.startsWith("/s/") || location.pathname.startsWith("/join/")) void loadSession();

function LazySession({ id, user }: { id: string; user: Author }) {
  const [module, setModule] = useState<SessionModule | null>(sessionModuleLoaded);
  const [failed, setFailed] = useState<string | null>(null);
  useEffect(() => {
    if (module) return;
    let live = true;
    loadSession()
      .then((loaded) => live && setModule(loaded))
      .catch((error: unknown) => live && setFailed(describeError(error)));
    return () => {
      live = false;
    };
  }, []);
  if (failed) {
    return (
      <main class="page narrow">
        <p role="alert" class="error">
          Could not load the session view: {failed}
        </p>
      </main>
    );
  }
  if (!module) {
    return (
      <main class="page">
        <p class="muted">Loading the session…</p>
      </main>
    );
  }
  return <module.SessionPage id={id} user={user} />;
}

type Auth = { state: "loading" } | { state: "failed"; message: string } | { state: "known"; session: AuthSession };

function Page({ user }: { user: Author }) {
  const { pathname } = useLocation();
  const route = parseRoute(pathname);
  switch (route.page) {
    case "sessions":
      return <SessionsPage />;
    case "new":
      return <NewSessionPage />;
    case "session":
      return <LazySession key={route.id} id={route.id} user={user} />;
    case "join":
      return <JoinPage token={route.token} />;
    case "missing":
      return <NotFound />;
  }
}

function NotFound() {
  useEffect(markReady, []);
  return (
    <main class="page narrow">
      <h1>Not found</h1>
      <p>
        There is no page here. <a href="/">Back to sessions</a>
      </p>
    </main>
  );
}

// Asked as the module runs, not after the first render: the answer decides the first page. (A failure is
// handled where it is taken; the empty catch only keeps it from counting as unhandled before that.)
let firstAuth: Promise<AuthSession> | null = api.authSession();
firstAuth.catch(() => undefined);

function App() {
  const [auth, setAuth] = useState<Auth>({ state: "loading" });
  const load = useCallback(() => {
    const asked = firstAuth ?? api.authSession();
    firstAuth = null;
    asked
      .then((session) => {
        rememberSignedIn(session);
        if (!session.user) dropBootSocket();
        setAuth({ state: "known", session });
      })
      .catch((error: unknown) => setAuth({ state: "failed", message: describeError(error) }));
  }, []);
  useEffect(load, [load]);
  useEffect(() => {
    window.addEventListener(UNAUTHORIZED_EVENT, load);
    return () => window.removeEventListener(UNAUTHORIZED_EVENT, load);
  }, [load]);

  if (auth.state === "loading") {
    return (
      <div class="shell" aria-busy="true">
        <Header user={null} onSignOut={null} />
        <main class="page narrow">
          <p class="muted">Loading…</p>
        </main>
      </div>
    );
  }
  if (auth.state === "failed") {
    return (
      <div class="shell">
        <Header user={null} onSignOut={null} />
        <main class="page narrow">
          <p role="alert" class="error">
            Could not reach the server: {auth.message}
          </p>
          <button type="button" onClick={load}>
            Retry
          </button>
        </main>
      </div>
    );
  }
  const { user, dev_mode } = auth.session;
  const signOut = () => {
    api
      .signOut()
      .catch(() => undefined)
      .finally(() => {
        rememberSignedIn({ user: null, dev_mode });
        setAuth({ state: "known", session: { user: null, dev_mode } });
      });
  };
  return (
    <div class="shell">
      <Header user={user} onSignOut={user ? signOut : null} />
      {user ? (
        <Page user={user} />
      ) : (
        <SignInPage
          devMode={dev_mode}
          onSignedIn={(me) => {
            rememberSignedIn({ user: me, dev_mode });
            setAuth({ state: "known", session: { user: me, dev_mode } });
          }}
        />
      )}
    </div>
  );
}

const root = document.getElementById("app");
if (root) {
  interceptLinks(root);
  render(<App />, root);
  // Warm the session chunk while the person looks at the list.
  const idle = window.requestIdleCallback ?? ((callback: () => void) => setTimeout(callback, 1500));
  idle(() => void loadSession());
}
