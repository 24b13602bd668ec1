// Imports Vite handles that TypeScript does not know about.
declare module "*.css";
