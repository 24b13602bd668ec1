// Markdown for model output, which is untrusted: raw HTML is escaped (never passed through), links keep only
// safe schemes, images become links, and code blocks are highlighted.
import { Marked, type Tokens } from "marked";
import { escapeHtml, highlight, languageForFence } from "./highlight";

const SAFE_HREF = /^(https?:|mailto:|#|\/(?!\/))/i;

function safeHref(href: string): string | null {
  const trimmed = href.trim();
  return SAFE_HREF.test(trimmed) ? trimmed : null;
}

const marked = new Marked({
  gfm: true,
  breaks: false,
  async: false,
  renderer: {
    html({ text }: Tokens.HTML | Tokens.Tag): string {
      return escapeHtml(text);
    },
    code({ text, lang }: Tokens.Code): string {
      const language = languageForFence(lang ?? "");
      const cls = language ? ` class="hljs language-${escapeHtml(language)}"` : ` class="hljs"`;
      return `<pre class="code"><code${cls}>${highlight(text, language)}</code></pre>\n`;
    },
    link({ href, title, tokens }: Tokens.Link): string {
      const inner = this.parser.parseInline(tokens);
      const safe = safeHref(href);
      if (!safe) return inner;
      const titleAttr = title ? ` title="${escapeHtml(title)}"` : "";
      return `<a href="${escapeHtml(safe)}"${titleAttr} target="_blank" rel="noopener noreferrer nofollow">${inner}</a>`;
    },
    image({ href, text }: Tokens.Image): string {
      // No remote images: they would load (and track) on every viewer's machine.
      const safe = safeHref(href);
      const label = escapeHtml(text || href);
      return safe ? `<a href="${escapeHtml(safe)}" target="_blank" rel="noopener noreferrer nofollow">[image: ${label}]</a>` : label;
    },
  },
});

/** Safe HTML for a markdown string. */
export function renderMarkdown(text: string): string {
  try {
    return marked.parse(text, { async: false });
  } catch {
    return `<p>${escapeHtml(text)}</p>`;
  }
}

// Markdown of the kinds models write, rendered once while the page waits for the session's socket: the
// first use of the parser compiles its rules (~25 ms here), which otherwise lands on the first frame of
// the transcript.
const WARM_UP = [
  "# Plan",
  "Some *emphasis*, **strong**, `code` and a [link](https://example.com).",
  "- one\n- two\n\n1. first\n2. second",
  "> a quote",
  "```\nlet x = 1;\n```",
  "| a | b |\n|---|---|\n| 1 | 2 |",
].join("\n\n");

/** Warms the parser up when the page is next idle. */
export function warmMarkdown(): void {
  const idle = window.requestIdleCallback ?? ((callback: () => void) => setTimeout(callback, 0));
  idle(() => void renderMarkdown(WARM_UP));
}
