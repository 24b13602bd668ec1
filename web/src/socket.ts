// The session connection: one WebSocket to `/api/sessions/{id}/ws` that says `hello{last_seq}`, reconnects
// with capped exponential backoff, and pings to keep idle proxies from closing it. Deduplication by `seq`
// happens in the transcript reducer; this module only tracks the highest `seq` it was told about.
import { takeBootSocket } from "./boot";
import type { ClientMessage, ServerMessage } from "./wire";

export const PROTOCOL_VERSION = 1;
const PING_INTERVAL_MS = 25_000;
const BACKOFF_START_MS = 250;
const BACKOFF_MAX_MS = 8_000;

export type ConnectionState = "connected" | "reconnecting" | "offline";

export interface SocketHandlers {
  /** Every server message, in order. */
  message: (message: ServerMessage) => void;
  /** Connection state changes; `attempt` counts failed attempts since the last welcome. */
  state: (state: ConnectionState, attempt: number) => void;
  /** The highest `seq` the app holds, sent in `hello` so the server replays only what is missing. */
  lastSeq: () => number | null;
}

export class SessionSocket {
  private socket: WebSocket | null = null;
  private attempt = 0;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private closed = false;
  private welcomed = false;
  private readonly url: string;
  private readonly handlers: SocketHandlers;
  private readonly onOnline = () => {
    if (this.ready) this.handlers.state("connected", 0);
    else this.retryNow();
  };
  private readonly onOffline = () => this.handlers.state("offline", this.attempt);

  constructor(sessionId: string, handlers: SocketHandlers) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.url = `${scheme}://${location.host}/api/sessions/${encodeURIComponent(sessionId)}/ws`;
    this.handlers = handlers;
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    this.open();
  }

  /** Whether a welcomed socket is open now. */
  get ready(): boolean {
    return this.welcomed && this.socket?.readyState === WebSocket.OPEN;
  }

  /** Sends when connected; returns whether the message left. */
  send(message: ClientMessage): boolean {
    if (!this.ready || !this.socket) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  /** Drops the current socket (as a network failure would) and reconnects. */
  retryNow(): void {
    if (this.closed) return;
    if (this.retryTimer) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.open();
    }
  }

  close(): void {
    this.closed = true;
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.stopPing();
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onclose = null;
      socket.onmessage = null;
      socket.onerror = null;
      // Closing a socket that is still connecting makes the browser log a warning: close it once open.
      if (socket.readyState === WebSocket.CONNECTING) socket.onopen = () => socket.close(1000, "bye");
      else {
        socket.onopen = null;
        socket.close(1000, "bye");
      }
    }
  }

  private open(): void {
    if (this.closed) return;
    this.welcomed = false;
    const boot = takeBootSocket(this.url);
    const socket = boot?.socket ?? new WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => {
      const hello: ClientMessage = {
        type: "hello",
        protocol_version: PROTOCOL_VERSION,
        last_seq: this.handlers.lastSeq(),
        client: "web",
      };
      socket.send(JSON.stringify(hello));
      this.startPing();
    };
    socket.onmessage = (event: MessageEvent) => {
      if (typeof event.data !== "string") return;
      let message: ServerMessage;
      try {
        message = JSON.parse(event.data) as ServerMessage;
      } catch {
        return;
      }
      if (message.type === "welcome") {
        this.welcomed = true;
        this.attempt = 0;
        this.handlers.state("connected", 0);
      }
      this.handlers.message(message);
    };
    // Errors are followed by `close`, which schedules the retry; nothing to do here.
    socket.onerror = () => {};
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.welcomed = false;
      this.stopPing();
      if (this.closed) return;
      this.attempt += 1;
      this.handlers.state(navigator.onLine === false ? "offline" : "reconnecting", this.attempt);
      const delayMs = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** (this.attempt - 1));
      // Jitter keeps many clients of one session from reconnecting in lockstep after a restart.
      const jitteredMs = delayMs * (0.75 + Math.random() * 0.5);
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        this.open();
      }, jitteredMs);
    };
    // The boot script's socket said hello when it opened: take over from there, with what it received.
    if (boot?.greeted) {
      this.startPing();
      for (const event of boot.received) socket.onmessage(event);
    }
  }

  private startPing(): void {
    this.stopPing();
    this.pingTimer = setInterval(() => {
      if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "ping" }));
    }, PING_INTERVAL_MS);
  }

  private stopPing(): void {
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.pingTimer = null;
  }
}
