// Markdown text split into blocks, so a streaming text re-renders only its last block.

const FENCE = /^ {0,3}(`{3,}|~{3,})/;

/**
 * Splits markdown at blank lines outside code fences, so a streaming text re-renders only its last block.
 * (A block boundary can differ from marked's in rare cases, e.g. loose lists; the final text is rendered
 * whole.)
 */
export function splitBlocks(text: string): string[] {
  const blocks: string[] = [];
  let fence: string | null = null;
  let start = 0;
  let lineStart = 0;
  while (lineStart <= text.length) {
    const newline = text.indexOf("\n", lineStart);
    const lineEnd = newline < 0 ? text.length : newline;
    const line = text.slice(lineStart, lineEnd);
    const marker = FENCE.exec(line)?.[1];
    if (marker) {
      if (fence === null) fence = marker;
      else if (marker[0] === fence[0] && marker.length >= fence.length) fence = null;
    } else if (fence === null && line.trim() === "" && lineStart > start) {
      blocks.push(text.slice(start, lineStart));
      start = lineEnd + 1;
    }
    if (newline < 0) break;
    lineStart = newline + 1;
  }
  if (start < text.length) blocks.push(text.slice(start));
  return blocks;
}
