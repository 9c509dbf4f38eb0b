// The one place that reads the process environment, and the loader of the server's
// settings. The settings themselves (type, default, env variable, flag, doc) are data
// in config/settings.json; this file types them, layers the sources
// (defaults <- config file <- environment <- flags), validates once and freezes.

import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { CapacityError, parseCapacity, parseSplit, type SplitSpec } from './offload/capacity.js';

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

/** The server's settings; each field is documented in config/settings.json. */
export interface ServeSettings {
  config: string;
  model: string;
  demo: boolean;
  modelId: string;
  host: string;
  port: number;
  apiKeys: readonly string[];
  bodyLimitBytes: number;
  drainGraceSeconds: number;
  allowSpecialTokensInChat: boolean;
  runner: 'reference' | 'native';
  weights: 'auto' | 'f32' | 'bf16' | 'f16' | 'q8' | 'q4';
  threads: number;
  offloadCapacity: string;
  offloadSplit: string;
  offloadPolicy: 'lru' | 'lfu' | 'lfu-decay' | 'predictive' | 'forecast';
  offloadLookahead: number;
  offloadPrefetchMinProbability: string;
  offloadPlanSteps: number;
  offloadIoThreads: number;
  offloadDir: string;
  offloadReplayTrace: string;
  kvBlockSize: number;
  kvBlocks: number;
  kvCacheType: 'f32' | 'f16';
  maxBatchTokens: number;
  maxRunning: number;
  maxWaiting: number;
  policy: 'fcfs' | 'expert-aware';
  policyMaxExtraWaitSteps: number;
  policyMaxExtraWaitMs: number;
  policyMaxGapFactor: number;
  policyMissPenalty: number;
  prefillFirst: boolean;
  logLevel: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  cacheDir: string;
}

type Source = 'file' | 'env' | 'flag';

export interface SettingSpec {
  key: keyof ServeSettings;
  type: 'string' | 'boolean' | 'integer' | 'number' | 'enum' | 'string[]';
  default: unknown;
  env: string;
  /** '--kebab-name', or '' when the setting has no flag. */
  flag: string;
  doc: string;
  min?: number;
  max?: number;
  choices?: string[];
  /** Where the setting may be given; all of file, env and flag when absent. */
  sources?: Source[];
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

// Every key of ServeSettings; the loader checks the schema file lists exactly these.
const KEYS: readonly (keyof ServeSettings)[] = [
  'config', 'model', 'demo', 'modelId', 'host', 'port', 'apiKeys', 'bodyLimitBytes', 'drainGraceSeconds',
  'allowSpecialTokensInChat', 'runner', 'weights', 'threads',
  'offloadCapacity', 'offloadSplit', 'offloadPolicy', 'offloadLookahead', 'offloadPrefetchMinProbability', 'offloadPlanSteps', 'offloadIoThreads', 'offloadDir', 'offloadReplayTrace',
  'kvBlockSize', 'kvBlocks', 'kvCacheType', 'maxBatchTokens', 'maxRunning', 'maxWaiting',
  'policy', 'policyMaxExtraWaitSteps', 'policyMaxExtraWaitMs', 'policyMaxGapFactor', 'policyMissPenalty', 'prefillFirst', 'logLevel', 'cacheDir',
];

/** config/settings.json sits one level above both src/ and dist/. */
const SCHEMA_FILE = new URL('../config/settings.json', import.meta.url);

let schemaCache: readonly SettingSpec[] | undefined;

/** The settings schema (config/settings.json), checked against ServeSettings. */
export function settingSpecs(): readonly SettingSpec[] {
  if (schemaCache) return schemaCache;
  const raw = JSON.parse(readFileSync(SCHEMA_FILE, 'utf8')) as { settings: SettingSpec[] };
  const keys = raw.settings.map((s) => s.key);
  const missing = KEYS.filter((k) => !keys.includes(k));
  const extra = keys.filter((k) => !KEYS.includes(k));
  if (missing.length > 0 || extra.length > 0) {
    throw new ConfigError(`config/settings.json and ServeSettings disagree: missing ${missing.join(', ') || 'none'}, extra ${extra.join(', ') || 'none'}`);
  }
  schemaCache = Object.freeze(raw.settings.map((s) => Object.freeze(s)));
  return schemaCache;
}

function allowed(s: SettingSpec, src: Source): boolean {
  return s.sources === undefined || s.sources.includes(src);
}

function describe(s: SettingSpec): string {
  switch (s.type) {
    case 'integer':
      return `an integer in [${s.min ?? '-inf'}, ${s.max ?? 'inf'}]`;
    case 'number':
      return `a number in [${s.min ?? '-inf'}, ${s.max ?? 'inf'}]`;
    case 'enum':
      return `one of ${s.choices!.join(', ')}`;
    case 'boolean':
      return 'a boolean (true/false, 1/0)';
    case 'string[]':
      return 'a list of strings';
    default:
      return 'a string';
  }
}

/** Converts a value from one source to the setting's type; throws naming the setting, source and value. */
function coerce(s: SettingSpec, value: unknown, origin: string): unknown {
  const fail = (): never => {
    throw new ConfigError(`setting ${s.key} (from ${origin}) must be ${describe(s)}, got ${JSON.stringify(value)}`);
  };
  const fromText = typeof value === 'string' && origin !== 'the config file';
  switch (s.type) {
    case 'string':
      return typeof value === 'string' ? value : fail();
    case 'boolean':
      if (typeof value === 'boolean') return value;
      if (fromText) {
        const v = (value as string).trim().toLowerCase();
        if (['1', 'true', 'yes', 'on'].includes(v)) return true;
        if (['0', 'false', 'no', 'off', ''].includes(v)) return false;
      }
      return fail();
    case 'integer':
    case 'number': {
      let n: number;
      if (typeof value === 'number') n = value;
      else if (fromText && (value as string).trim() !== '') n = Number(value);
      else return fail();
      if (!Number.isFinite(n) || (s.type === 'integer' && !Number.isSafeInteger(n))) return fail();
      if ((s.min !== undefined && n < s.min) || (s.max !== undefined && n > s.max)) return fail();
      return n;
    }
    case 'enum':
      return typeof value === 'string' && s.choices!.includes(value) ? value : fail();
    case 'string[]':
      if (Array.isArray(value)) return value.every((v) => typeof v === 'string') ? [...value] : fail();
      if (fromText) return (value as string).split(',').map((v) => v.trim()).filter((v) => v !== '');
      return fail();
  }
}

export interface SettingSources {
  /** Flag values by setting key, as parsed from the command line (strings, or true for boolean flags). */
  flags?: Partial<Record<keyof ServeSettings, string | boolean>>;
  env?: NodeJS.ProcessEnv;
  /** Resolves a relative config file path. */
  cwd?: string;
}

function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError(`setting config: cannot read ${JSON.stringify(file)}: ${(e as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`setting config: ${file} is not valid JSON: ${(e as Error).message}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new ConfigError(`setting config: ${file} must hold a JSON object keyed by setting name`);
  }
  return parsed as Record<string, unknown>;
}

/** offloadPrefetchMinProbability: 'auto' or a probability in [0, 1]. */
export function parsePrefetchMinProbability(v: string): number | 'auto' {
  const t = v.trim();
  if (t === 'auto') return 'auto';
  const p = t === '' ? NaN : Number(t);
  if (!(p >= 0 && p <= 1)) throw new ConfigError(`setting offloadPrefetchMinProbability must be "auto" or a number in [0, 1], got ${JSON.stringify(v)}`);
  return p;
}

/**
 * Checks that go across settings: offloading and replay need the native runner; the
 * capacity and the split must parse (the split's number of weights is checked against
 * the model's layers when it loads).
 */
function checkOffload(s: ServeSettings): void {
  parsePrefetchMinProbability(s.offloadPrefetchMinProbability);
  let split: SplitSpec;
  try {
    split = parseSplit(s.offloadSplit);
  } catch (e) {
    if (e instanceof CapacityError) throw new ConfigError(`setting offloadSplit: ${e.message}`);
    throw e;
  }
  if (split.kind !== 'equal' && s.offloadCapacity === '') {
    throw new ConfigError('setting offloadSplit splits the expert cache of offloadCapacity across layers; set offloadCapacity too (or leave offloadSplit equal)');
  }
  if (s.offloadCapacity !== '') {
    try {
      parseCapacity(s.offloadCapacity);
    } catch (e) {
      if (e instanceof CapacityError) throw new ConfigError(`setting offloadCapacity: ${e.message}`);
      throw e;
    }
    if (s.runner !== 'native') throw new ConfigError('setting offloadCapacity needs the native runner (runner native); the reference runner keeps every expert resident');
  }
  if (s.offloadReplayTrace !== '' && s.runner !== 'native') throw new ConfigError('setting offloadReplayTrace needs the native runner (runner native)');
}

/**
 * Loads the server's settings: defaults <- config file <- environment <- flags, each
 * value validated; the result is frozen. Errors name the setting, where the value came
 * from and the value.
 */
export function loadSettings(src: SettingSources = {}): Readonly<ServeSettings> {
  const specs = settingSpecs();
  const env = src.env ?? process.env;
  const flags = src.flags ?? {};
  const out: Record<string, unknown> = {};
  for (const s of specs) out[s.key] = coerce(s, s.default, 'the defaults');

  const configSpec = specs.find((s) => s.key === 'config')!;
  let configFile = '';
  if (env[configSpec.env] !== undefined) configFile = coerce(configSpec, env[configSpec.env], configSpec.env) as string;
  if (flags.config !== undefined) configFile = coerce(configSpec, flags.config, configSpec.flag) as string;
  out.config = configFile;
  if (configFile !== '') {
    const path = resolve(src.cwd ?? process.cwd(), configFile);
    const file = readConfigFile(path);
    for (const [key, value] of Object.entries(file)) {
      const s = specs.find((x) => x.key === key);
      if (!s) throw new ConfigError(`${path}: unknown setting ${JSON.stringify(key)}; settings: ${specs.filter((x) => allowed(x, 'file')).map((x) => x.key).join(', ')}`);
      if (!allowed(s, 'file')) throw new ConfigError(`${path}: setting ${key} cannot be set in a config file (use ${s.env})`);
      out[key] = coerce(s, value, 'the config file');
    }
  }
  for (const s of specs) {
    if (s.key === 'config') continue;
    const v = env[s.env];
    if (v !== undefined && allowed(s, 'env')) out[s.key] = coerce(s, v, s.env);
  }
  for (const s of specs) {
    if (s.key === 'config') continue;
    const v = flags[s.key];
    if (v === undefined) continue;
    if (!allowed(s, 'flag') || s.flag === '') throw new ConfigError(`setting ${s.key} has no command-line flag (use ${s.env})`);
    out[s.key] = coerce(s, v, s.flag);
  }
  if (out.cacheDir === '') out.cacheDir = envSettings(env).cacheDir;
  checkOffload(out as unknown as ServeSettings);
  const gap = (out as unknown as ServeSettings).policyMaxGapFactor;
  if (gap !== 0 && gap < 1) throw new ConfigError(`setting policyMaxGapFactor must be 0 (off) or >= 1, got ${gap}`);
  for (const v of Object.values(out)) if (Array.isArray(v)) Object.freeze(v);
  return Object.freeze(out as unknown as ServeSettings);
}
