// HTTP calls to the Worker: JSON in, JSON out, and one typed error built from the contract's `ErrorBody`.
import { takeBootAuth } from "./boot";
import type {
  AuthSession,
  CreateSessionRequest,
  CreateSessionResponse,
  DevLoginRequest,
  ErrorBody,
  ErrorCode,
  InviteResponse,
  JoinResponse,
  MeResponse,
  PromptResponse,
  ReposResponse,
  SessionState,
  SessionsResponse,
  SessionStatus,
  StopScope,
  WarmResponse,
} from "./wire";

/** An HTTP answer other than 2xx: the status and, when the body was an `ErrorBody`, its code and message. */
export class ApiError extends Error {
  readonly status: number;
  readonly code: ErrorCode | null;

  constructor(status: number, code: ErrorCode | null, message: string) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function isErrorBody(value: unknown): value is ErrorBody {
  if (typeof value !== "object" || value === null || !("error" in value)) return false;
  const error = (value as { error: unknown }).error;
  return typeof error === "object" && error !== null && "code" in error && "message" in error;
}

/** Dispatched on `window` when an API call answers 401. */
export const UNAUTHORIZED_EVENT = "nightshift:unauthorized";

// `pending`: a response already on its way for this request (the boot script's `/auth/session`).
async function call<T>(method: string, path: string, body?: unknown, pending?: Promise<Response> | null): Promise<T> {
  const init: RequestInit = { method, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers = { "content-type": "application/json" };
    init.body = JSON.stringify(body);
  }
  let response: Response;
  try {
    response = await (pending ?? fetch(path, init));
  } catch (error) {
    throw new ApiError(0, null, `network error: ${String(error)}`);
  }
  const text = await response.text();
  let data: unknown = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    // The app shows the sign-in page again when a credential stops working mid-visit.
    if (response.status === 401 && path.startsWith("/api/")) window.dispatchEvent(new Event(UNAUTHORIZED_EVENT));
    if (isErrorBody(data)) throw new ApiError(response.status, data.error.code, data.error.message);
    throw new ApiError(response.status, null, `HTTP ${response.status}`);
  }
  return data as T;
}

/** A readable one-line description of any thrown value. */
export function describeError(error: unknown): string {
  if (error instanceof ApiError) return error.code ? `${error.message} (${error.code})` : error.message;
  if (error instanceof Error) return error.message;
  return String(error);
}

export interface SessionFilter {
  repo?: string;
  status?: SessionStatus | "";
}

function query(params: Record<string, string | undefined>): string {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value) search.set(key, value);
  const text = search.toString();
  return text ? `?${text}` : "";
}

export const api = {
  authSession: () => call<AuthSession>("GET", "/auth/session", undefined, takeBootAuth()),
  devSignIn: (body: DevLoginRequest) => call<MeResponse>("POST", "/auth/dev", body),
  signOut: () => call<unknown>("POST", "/auth/logout"),
  sessions: (filter: SessionFilter) =>
    call<SessionsResponse>("GET", `/api/sessions${query({ repo: filter.repo?.trim(), status: filter.status })}`),
  session: (id: string) => call<SessionState>("GET", `/api/sessions/${encodeURIComponent(id)}`),
  createSession: (body: CreateSessionRequest) => call<CreateSessionResponse>("POST", "/api/sessions", body),
  prompt: (id: string, text: string, idempotencyKey: string) =>
    call<PromptResponse>("POST", `/api/sessions/${encodeURIComponent(id)}/prompts`, {
      text,
      idempotency_key: idempotencyKey,
    }),
  stop: (id: string, scope: StopScope) =>
    call<unknown>("POST", `/api/sessions/${encodeURIComponent(id)}/stop`, { scope }),
  invite: (id: string) =>
    call<InviteResponse>("POST", `/api/sessions/${encodeURIComponent(id)}/invites`, { ttl_ms: null }),
  join: (token: string) => call<JoinResponse>("POST", `/api/join/${encodeURIComponent(token)}`),
  repos: () => call<ReposResponse>("GET", "/api/repos"),
  warm: (repo: string) => call<WarmResponse>("POST", "/api/repos/warm", { repo }),
};

/** A fresh idempotency key. */
export function newKey(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}
