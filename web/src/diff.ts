// Unified diffs: parsed into lines, each coloured by kind and highlighted as code of the file's language.
import { highlight, languageForPath } from "./highlight";

export type DiffLineKind = "add" | "del" | "context" | "hunk" | "meta";

export interface DiffLine {
  kind: DiffLineKind;
  /** Highlighted HTML of the line without its +/-/space marker. */
  html: string;
  marker: string;
}

/** Lines of a unified diff; code lines are highlighted as `path`'s language. */
export function parseDiff(diff: string, path: string): DiffLine[] {
  const language = languageForPath(path);
  const lines = diff.endsWith("\n") ? diff.slice(0, -1).split("\n") : diff.split("\n");
  // The file header (`---`/`+++`, `diff`, `index`) repeats the path the change already shows.
  const body = lines.filter((line) => !/^(--- |\+\+\+ |diff |index )/.test(line));
  return body.map((line): DiffLine => {
    if (line.startsWith("@@")) return { kind: "hunk", marker: "", html: highlight(line, null) };
    if (line.startsWith("+++") || line.startsWith("---") || line.startsWith("diff ") || line.startsWith("index ") || line.startsWith("\\")) {
      return { kind: "meta", marker: "", html: highlight(line, null) };
    }
    const first = line.charAt(0);
    const kind: DiffLineKind = first === "+" ? "add" : first === "-" ? "del" : "context";
    const code = first === "+" || first === "-" || first === " " ? line.slice(1) : line;
    return { kind, marker: kind === "add" ? "+" : kind === "del" ? "-" : " ", html: highlight(code, language) };
  });
}
