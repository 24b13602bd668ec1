// The web app: TypeScript + Preact, built by Vite into web/dist, which the Worker serves as static assets
// (wrangler.toml `[assets]`). `cargo xtask dev|test|bench` build it before starting wrangler.
import { defineConfig } from "vite";

export default defineConfig({
  root: import.meta.dirname,
  publicDir: "public",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    // The bench reads the sizes of what is written here (dist/.vite/manifest.json).
    manifest: true,
    sourcemap: false,
  },
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
});
