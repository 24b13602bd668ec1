// The web app: TypeScript + Preact, built by Vite into web/dist, which the Worker serves as static assets
// (wrangler.toml `[assets]`). `cargo xtask dev|test|bench` build it before starting wrangler; `cargo xtask dev`
// also runs `vite build --watch`.
import { utimesSync } from "node:fs";
import { join } from "node:path";
import { defineConfig, type Plugin } from "vite";

const OUT_DIR = "dist";

// wrangler dev sometimes misses files a rebuild writes (new hashed names right after the old ones were
// removed) and then answers their URLs with index.html. Touching the files again once the rebuild is done
// makes it look again. Watch mode only.
function touchAfterRebuild(): Plugin {
  let files: string[] = [];
  return {
    name: "nightshift-touch-after-rebuild",
    apply: "build",
    writeBundle(_options, bundle) {
      files = [...Object.keys(bundle), "index.html"];
    },
    closeBundle() {
      if (!this.meta.watchMode) return;
      const written = files;
      setTimeout(() => {
        const now = new Date();
        for (const file of written) {
          try {
            utimesSync(join(import.meta.dirname, OUT_DIR, file), now, now);
          } catch {
            // Replaced by a newer rebuild meanwhile.
          }
        }
      }, 500);
    },
  };
}

export default defineConfig({
  root: import.meta.dirname,
  publicDir: "public",
  build: {
    outDir: OUT_DIR,
    emptyOutDir: true,
    target: "es2022",
    // The bench reads the sizes of what is written here (dist/.vite/manifest.json).
    manifest: true,
    sourcemap: false,
  },
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  plugins: [touchAfterRebuild()],
});
