// The one place that reads the process environment. Every setting read here is
// documented in the README.

import { homedir } from 'node:os';
import { join } from 'node:path';

export interface EnvSettings {
  /** MOE_SERVE_CACHE_DIR: where generated models (the built-in demo) are kept. */
  cacheDir: string;
}

export function envSettings(env: NodeJS.ProcessEnv = process.env): EnvSettings {
  const xdg = env.XDG_CACHE_HOME && env.XDG_CACHE_HOME !== '' ? env.XDG_CACHE_HOME : join(homedir(), '.cache');
  return {
    cacheDir: env.MOE_SERVE_CACHE_DIR && env.MOE_SERVE_CACHE_DIR !== '' ? env.MOE_SERVE_CACHE_DIR : join(xdg, 'moe-serve'),
  };
}
