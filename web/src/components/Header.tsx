// The top bar: home link, new session, who is signed in, sign out.
import type { Author } from "../wire";

export function Header({ user, onSignOut }: { user: Author | null; onSignOut: (() => void) | null }) {
  return (
    <header class="topbar">
      <a class="brand" href="/">
        Nightshift
      </a>
      {user && (
        <nav class="topnav" aria-label="Main">
          <a class="button primary small" href="/new">
            New session
          </a>
          <span class="me" title={`${user.login} <${user.email}>`}>
            {user.name}
          </span>
          {onSignOut && (
            <button type="button" class="small" onClick={onSignOut}>
              Sign out
            </button>
          )}
        </nav>
      )}
    </header>
  );
}
