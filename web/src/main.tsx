import { render } from "preact";
import type { AuthSession } from "./wire";

function App({ auth }: { auth: AuthSession }) {
  return <main>{auth.user ? `Hello, ${auth.user.name}` : "Sign in"}</main>;
}

const response = await fetch("/auth/session", { credentials: "same-origin" });
const auth = (await response.json()) as AuthSession;
render(<App auth={auth} />, document.getElementById("app")!);
