// What index.html's boot script started before the app's code arrived: the `/auth/session` request, and on a
// session page the session's socket (opened only when this browser was signed in last time, so a signed-out
// visitor never gets a refused socket). Each is taken once; later requests go to the network as usual.
import type { AuthSession } from "./wire";

interface Boot {
  auth: Promise<Response> | null;
  /** Said `hello{last_seq: null}` when it opened. */
  socket: WebSocket | null;
  /** What the socket received before the app took it, in order. */
  received: MessageEvent[];
}

/** A socket the boot script opened, with what it received so far. */
export interface BootSocket {
  socket: WebSocket;
  /** Whether its `hello` was sent (it was open before it was taken). */
  greeted: boolean;
  received: MessageEvent[];
}

declare global {
  interface Window {
    __nightshiftBoot?: Boot;
  }
}

const SIGNED_IN_KEY = "nightshift.signedIn";

/** The boot script's `/auth/session` response, once; `null` when it was taken or never started. */
export function takeBootAuth(): Promise<Response> | null {
  const boot = window.__nightshiftBoot;
  if (!boot?.auth) return null;
  const auth = boot.auth;
  boot.auth = null;
  return auth;
}

/** The boot script's socket when it is for `url` and still usable, once. Its handlers are the taker's to set:
 * a socket still connecting has not said hello yet. */
export function takeBootSocket(url: string): BootSocket | null {
  const boot = window.__nightshiftBoot;
  const socket = boot?.socket ?? null;
  if (!boot || !socket) return null;
  boot.socket = null;
  const received = boot.received;
  boot.received = [];
  if (socket.url !== url || socket.readyState === WebSocket.CLOSING || socket.readyState === WebSocket.CLOSED) {
    dropSocket(socket);
    return null;
  }
  socket.onopen = null;
  socket.onmessage = null;
  return { socket, greeted: socket.readyState === WebSocket.OPEN, received };
}

/** Closes a boot socket nobody will use (once open: closing one still connecting logs a browser warning). */
export function dropBootSocket(): void {
  const boot = window.__nightshiftBoot;
  if (boot?.socket) dropSocket(boot.socket);
  if (boot) boot.socket = null;
}

function dropSocket(socket: WebSocket): void {
  if (socket.readyState === WebSocket.CONNECTING) socket.onopen = () => socket.close(1000, "bye");
  else if (socket.readyState === WebSocket.OPEN) socket.close(1000, "bye");
}

/** Remembers whether someone is signed in here, for the next boot's early socket. */
export function rememberSignedIn(session: AuthSession): void {
  try {
    if (session.user) localStorage.setItem(SIGNED_IN_KEY, "1");
    else localStorage.removeItem(SIGNED_IN_KEY);
  } catch {
    // Storage may be unavailable (private modes); the socket then opens with the page.
  }
}
