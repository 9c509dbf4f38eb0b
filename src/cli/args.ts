// Small helpers over node:util parseArgs so every command reports bad flags the same way.

import { parseArgs, type ParseArgsConfig } from 'node:util';

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export type Options = NonNullable<ParseArgsConfig['options']>;

export function parse(argv: string[], options: Options): Record<string, string | boolean | undefined> {
  try {
    const { values } = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: false });
    return values as Record<string, string | boolean | undefined>;
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

export function required(v: Record<string, unknown>, name: string): string {
  const x = v[name];
  if (typeof x !== 'string' || x === '') throw new UsageError(`--${name} is required`);
  return x;
}

export function intOpt(v: Record<string, unknown>, name: string, def: number, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const x = v[name];
  if (x === undefined) return def;
  const n = Number(x);
  if (typeof x !== 'string' || !/^-?\d+$/.test(x) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(`--${name} must be an integer in [${min}, ${max}], got ${JSON.stringify(x)}`);
  }
  return n;
}

export function numOpt(v: Record<string, unknown>, name: string, def: number, min: number, max: number): number {
  const x = v[name];
  if (x === undefined) return def;
  const n = Number(x);
  if (typeof x !== 'string' || x.trim() === '' || !Number.isFinite(n) || n < min || n > max) {
    throw new UsageError(`--${name} must be a number in [${min}, ${max}], got ${JSON.stringify(x)}`);
  }
  return n;
}

export function choiceOpt<T extends string>(v: Record<string, unknown>, name: string, choices: readonly T[], def?: T): T {
  const x = v[name];
  if (x === undefined) {
    if (def === undefined) throw new UsageError(`--${name} is required (one of ${choices.join(', ')})`);
    return def;
  }
  if (!choices.includes(x as T)) throw new UsageError(`--${name} must be one of ${choices.join(', ')}, got ${JSON.stringify(x)}`);
  return x as T;
}
