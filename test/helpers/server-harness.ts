// Servers for the server tests: the real engine worker (reference runner) on a tiny
// generated model, the Fastify app listening on 127.0.0.1 port 0, all closed at teardown.

import { startEngine } from '../../src/engine/engine-client.js';
import type { EngineClient, EngineOptions } from '../../src/engine/protocol.js';
import { MoeTokenizer } from '../../src/model/tokenizer.js';
import { buildApp, type AppOptions } from '../../src/server/app.js';
import { Lifecycle } from '../../src/server/lifecycle.js';
import { writeModel } from './models.js';

type Teardown = { teardown(fn: () => void | Promise<void>): void };

export const MODEL_ID = 'tiny-qwen3-moe';

const modelDirs = new WeakMap<object, string>();

/** One tiny qwen3_moe checkpoint per root test object (generated once, removed at the end). */
export function tinyModelDir(root: Teardown): string {
  let dir = modelDirs.get(root);
  if (!dir) {
    dir = writeModel(root, { arch: 'qwen3_moe', seed: 7 });
    modelDirs.set(root, dir);
  }
  return dir;
}

export interface TestServer {
  url: string;
  engine: EngineClient;
  tokenizer: MoeTokenizer;
  lifecycle: Lifecycle;
  /** Request ids the server cancelled, in order. */
  cancels: string[];
  close(): Promise<void>;
}

export async function startTestServer(
  t: Teardown,
  dir: string,
  opts: { engine?: Partial<EngineOptions>; app?: Partial<AppOptions> } = {},
): Promise<TestServer> {
  const real = startEngine({
    modelDir: dir,
    modelId: MODEL_ID,
    runner: 'native',
    kvBlockSize: 16,
    kvBlocks: 512,
    maxBatchTokens: 256,
    maxRunning: 8,
    maxWaiting: 64,
    policy: 'fcfs',
    ...opts.engine,
  });
  const cancels: string[] = [];
  // The real engine, with its cancellations recorded.
  const engine: EngineClient = {
    ready: real.ready,
    submit: (req, onEvent) => real.submit(req, onEvent),
    cancel: (id) => {
      cancels.push(id);
      real.cancel(id);
    },
    stats: () => real.stats(),
    ...(real.expertCache ? { expertCache: () => real.expertCache!() } : {}),
    close: () => real.close(),
  };
  const tokenizer = await MoeTokenizer.load(dir);
  const lifecycle = opts.app?.lifecycle ?? new Lifecycle();
  const app = buildApp({ engine, tokenizer, lifecycle, ...opts.app });
  await real.ready;
  const url = await app.listen({ host: '127.0.0.1', port: 0 });
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await app.close();
    await real.close();
  };
  t.teardown(close);
  return { url, engine, tokenizer, lifecycle, cancels, close };
}

/** Polls `fn` until it returns true, at most `ms` milliseconds. */
export async function waitFor(fn: () => boolean | Promise<boolean>, ms = 10_000, stepMs = 20): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await fn()) return true;
    await new Promise((r) => setTimeout(r, stepMs));
  }
  return fn();
}

/** name{labels} → value from the Prometheus text exposition format. */
export function parseMetrics(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/.exec(line);
    if (!m) throw new Error(`not exposition format: ${line}`);
    out.set(m[1], Number(m[2]));
  }
  return out;
}
