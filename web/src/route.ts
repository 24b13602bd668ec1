// Client-side routes: `/`, `/new`, `/s/{id}`, `/join/{token}`; links are intercepted and pushed to history.
import { useEffect, useState } from "preact/hooks";

export type Route =
  | { page: "sessions" }
  | { page: "new" }
  | { page: "session"; id: string }
  | { page: "join"; token: string }
  | { page: "missing" };

export function parseRoute(pathname: string): Route {
  if (pathname === "/" || pathname === "") return { page: "sessions" };
  if (pathname === "/new" || pathname === "/new/") return { page: "new" };
  const session = /^\/s\/([^/]+)\/?$/.exec(pathname);
  if (session?.[1]) return { page: "session", id: decodeURIComponent(session[1]) };
  const join = /^\/join\/([^/]+)\/?$/.exec(pathname);
  if (join?.[1]) return { page: "join", token: decodeURIComponent(join[1]) };
  return { page: "missing" };
}

const listeners = new Set<() => void>();

export function navigate(path: string, options: { replace?: boolean } = {}): void {
  if (path === location.pathname + location.search) return;
  if (options.replace) history.replaceState(null, "", path);
  else history.pushState(null, "", path);
  window.scrollTo(0, 0);
  for (const listener of listeners) listener();
}

/** The current location, re-rendering on navigation. */
export function useLocation(): { pathname: string; search: string } {
  const [, setTick] = useState(0);
  useEffect(() => {
    const listener = () => setTick((n) => n + 1);
    listeners.add(listener);
    window.addEventListener("popstate", listener);
    return () => {
      listeners.delete(listener);
      window.removeEventListener("popstate", listener);
    };
  }, []);
  return { pathname: location.pathname, search: location.search };
}

/** Sends same-origin left clicks on `<a>` through `navigate` instead of reloading the page. */
export function interceptLinks(root: HTMLElement): void {
  root.addEventListener("click", (event) => {
    if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    const target = event.target instanceof Element ? event.target.closest("a") : null;
    if (!target || target.target || target.hasAttribute("download")) return;
    const url = new URL(target.href, location.href);
    if (url.origin !== location.origin) return;
    event.preventDefault();
    navigate(url.pathname + url.search);
  });
}

/** Marks the app root once a page's first real content rendered (the bench waits for this). */
export function markReady(): void {
  const root = document.getElementById("app");
  if (root && root.getAttribute("data-testid") !== "app-ready") root.setAttribute("data-testid", "app-ready");
}
