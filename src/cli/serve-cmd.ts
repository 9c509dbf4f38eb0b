// `moe-serve serve`: the OpenAI-compatible HTTP server. Flags come from the settings
// schema (config/settings.json), so every setting has its flag and its doc in one place.

import { ConfigError, loadSettings, settingSpecs, type ServeSettings } from '../config.js';
import { startServer } from '../server/server.js';
import { parse, UsageError, type Options } from './args.js';

function flagOptions(): Options {
  const o: Options = {};
  for (const s of settingSpecs()) {
    if (s.flag === '') continue;
    o[s.flag.slice(2)] = { type: s.type === 'boolean' ? 'boolean' : 'string' };
  }
  return o;
}

function help(): string {
  const rows = settingSpecs()
    .filter((s) => s.flag !== '')
    .map((s) => {
      const arg = s.type === 'boolean' ? '' : ` ${s.type === 'integer' || s.type === 'number' ? 'N' : 'VALUE'}`;
      const def = Array.isArray(s.default) ? s.default.join(',') : String(s.default);
      return `  ${(s.flag + arg).padEnd(36)} ${s.doc}${def !== '' ? ` [${def}]` : ''} (env ${s.env})`;
    });
  return `usage: moe-serve serve (--model DIR | --demo) [--host 127.0.0.1] [--port 8000] [--config FILE] [options]

Serves the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) plus /health,
/ready, /metrics and, with expert offloading, /v1/internal/experts (the expert cache).
Settings: defaults <- --config file <- environment <- flags.

options:
${rows.join('\n')}
`;
}

/** Parses flags into settings (exported for tests). */
export function settingsFromArgv(argv: string[], env: NodeJS.ProcessEnv = process.env): Readonly<ServeSettings> | null {
  const v = parse(argv, flagOptions());
  if (v.help) return null;
  const flags: Partial<Record<keyof ServeSettings, string | boolean>> = {};
  for (const s of settingSpecs()) {
    if (s.flag === '') continue;
    const x = v[s.flag.slice(2)];
    if (x !== undefined) flags[s.key] = x;
  }
  let settings: Readonly<ServeSettings>;
  try {
    settings = loadSettings({ flags, env });
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(e.message);
    throw e;
  }
  if (settings.demo && settings.model !== '') throw new UsageError('give either --model DIR or --demo, not both');
  if (!settings.demo && settings.model === '') throw new UsageError('--model DIR is required (or --demo for the built-in demo model)');
  return settings;
}

export const serveCommand = {
  summary: 'serve a model over the OpenAI API (HTTP)',
  async run(argv: string[]): Promise<number> {
    const settings = settingsFromArgv(argv);
    if (settings === null) {
      process.stdout.write(help());
      return 0;
    }
    const log = (line: string) => process.stderr.write(`moe-serve: ${line}\n`);
    const server = await startServer(settings, log);
    return server.closed;
  },
};
