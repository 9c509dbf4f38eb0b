// Server benchmark: `npm run bench:serve` (a few minutes at most on 2 cores).
//
// An undici load generator over loopback drives /v1/completions (streamed) at
// concurrency 1, 8, 32 and 128 with a bounded number of requests per level, against the
// built-in demo model and a larger synthetic one (Qwen3-30B-A3B's shape with 8 layers, at
// Q8_0; generated once into the cache, shared with bench:engine); then the same workload (same prompts, lengths and seeds) runs
// straight on the same engine client, without HTTP, in the same run. The server's overhead is
// the fraction of the engine's throughput the HTTP path loses:
// overhead = 1 - server tokens/s ÷ engine tokens/s (0 = free; negative = noise).
// The load generator shares the server's process (the engine has its own worker thread),
// so client-side parsing is counted as overhead: an upper bound.
//
// Options (environment): BENCH_MAX_TOKENS (tokens per request: default 64 on the demo model, where
// shorter requests measure mostly ramp-up and tail, and 16 on the larger one, to keep the run short), BENCH_SCALE (requests per level
// multiplier, default 1), BENCH_RUNNER (default native), BENCH_SERVE_LARGE=0 (demo model only).
// The last line is JSON: {server_overhead_c32 (demo model), figures: [{name, value, unit, compared_to}]};
// the larger model's figures carry its label as a suffix.

import { Pool } from 'undici';
import { ensureDemoModel } from '../src/cli/demo-cmd.js';
import { startEngine } from '../src/engine/engine-client.js';
import type { EngineClient, EngineOptions, GenerationRequest } from '../src/engine/protocol.js';
import { MoeTokenizer } from '../src/model/tokenizer.js';
import { buildApp } from '../src/server/app.js';
import { DEMO_MODEL_ID } from '../src/server/server.js';
import { BENCH_MODELS, ensureCheckpoint } from './lib/bench-models.js';
import type { Figure } from './lib/figures.js';
import { sseObjects } from './lib/sse.js';

interface Sample {
  ttftMs: number;
  /** Gaps between consecutive tokens (ms). */
  itlMs: number[];
  tokens: number;
}

interface LevelResult {
  samples: Sample[];
  wallS: number;
}

const LEVELS = [1, 8, 32, 128];
const scale = Number(process.env.BENCH_SCALE ?? 1);
// Per level and per pass; each level runs two passes per path.
const REQUESTS: Record<number, number> = { 1: Math.ceil(4 * scale), 8: Math.ceil(16 * scale), 32: Math.ceil(48 * scale), 128: Math.ceil(128 * scale) };
/** Tokens per request of the model being measured (set per model in main). */
let MAX_TOKENS = 64;
const PROMPTS = [
  'Explain how a mixture-of-experts model routes tokens.',
  'Write a short poem about memory bandwidth.',
  'List three reasons to cache experts in fast memory.',
  'Summarise continuous batching in one paragraph.',
];

const round = (v: number, digits = 2) => Number(v.toFixed(digits));
/** The model id the requests of the current model carry. */
let currentModelId = DEMO_MODEL_ID;
function pct(xs: number[], p: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

/** Runs `total` jobs with at most `c` at once; returns the wall time in seconds. */
async function atConcurrency(c: number, total: number, job: (i: number) => Promise<void>): Promise<number> {
  const t0 = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(c, total) }, async () => {
      while (next < total) await job(next++);
    }),
  );
  return (performance.now() - t0) / 1000;
}

function request(i: number, level: number): { prompt: string; seed: number } {
  return { prompt: PROMPTS[i % PROMPTS.length], seed: level * 1000 + i };
}

async function viaServer(pool: Pool, level: number): Promise<LevelResult> {
  const samples: Sample[] = [];
  const wallS = await atConcurrency(level, REQUESTS[level], async (i) => {
    const { prompt, seed } = request(i, level);
    const t0 = performance.now();
    const r = await pool.request({
      path: '/v1/completions',
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: currentModelId, prompt, max_tokens: MAX_TOKENS, temperature: 0.8, seed, stream: true, stream_options: { include_usage: true } }),
    });
    if (r.statusCode !== 200) throw new Error(`HTTP ${r.statusCode}: ${await r.body.text()}`);
    let first = 0;
    let last = 0;
    const itl: number[] = [];
    let tokens = 0;
    for await (const obj of sseObjects(r.body)) {
      if (obj.usage) tokens = obj.usage.completion_tokens;
      if (!obj.choices?.[0]?.text) continue;
      const now = performance.now();
      if (first === 0) first = now;
      else itl.push(now - last);
      last = now;
    }
    samples.push({ ttftMs: first - t0, itlMs: itl, tokens });
  });
  return { samples, wallS };
}

async function viaEngine(engine: EngineClient, tokenizer: MoeTokenizer, level: number, eos: number[]): Promise<LevelResult> {
  const samples: Sample[] = [];
  const wallS = await atConcurrency(level, REQUESTS[level], async (i) => {
    const { prompt, seed } = request(i, level);
    const t0 = performance.now();
    const req: GenerationRequest = {
      id: `bench-${level}-${i}`,
      promptTokens: tokenizer.encode(prompt),
      maxTokens: MAX_TOKENS,
      sampling: { temperature: 0.8, topP: 1, topK: 0, minP: 0 },
      seed,
      penalties: { frequency: 0, presence: 0, repetition: 1 },
      stopTokenIds: eos,
      logprobs: null,
    };
    await new Promise<void>((resolve, reject) => {
      let first = 0;
      let last = 0;
      const itl: number[] = [];
      engine.submit(req, (e) => {
        const now = performance.now();
        if (e.type === 'tokens') {
          if (first === 0) first = now;
          else itl.push(now - last);
          last = now;
          return;
        }
        if (e.reason === 'error') return reject(new Error(e.error));
        samples.push({ ttftMs: first - t0, itlMs: itl, tokens: e.completionTokens });
        resolve();
      });
    });
  });
  return { samples, wallS };
}

function merge(a: LevelResult, b: LevelResult): LevelResult {
  return { samples: [...a.samples, ...b.samples], wallS: a.wallS + b.wallS };
}

function summarise(r: LevelResult) {
  const ttft = r.samples.map((s) => s.ttftMs);
  const itl = r.samples.flatMap((s) => s.itlMs);
  const tokens = r.samples.reduce((a, s) => a + s.tokens, 0);
  return { ttftP50: pct(ttft, 50), ttftP99: pct(ttft, 99), itlP50: pct(itl, 50), itlP99: pct(itl, 99), tps: tokens / r.wallS, tokens };
}

interface BenchTarget {
  label: string;
  dir: string;
  modelId: string;
  weights: 'auto' | 'q8';
}

/** Runs every concurrency level against one model; returns its figures (names suffixed by the model's label unless it is the demo). */
async function benchModel(target: BenchTarget): Promise<Figure[]> {
  const dir = target.dir;
  currentModelId = target.modelId;
  const tokenizer = await MoeTokenizer.load(dir);
  const opts: EngineOptions = {
    modelDir: dir,
    modelId: target.modelId,
    runner: (process.env.BENCH_RUNNER ?? 'native') as 'reference' | 'native',
    weights: target.weights,
    kvBlockSize: 16,
    kvBlocks: 4096,
    maxBatchTokens: 512,
    maxRunning: 128,
    maxWaiting: 1024,
    policy: 'fcfs',
  };
  // One engine serves both paths, one after the other, so they share the model and its warm caches.
  const engine = startEngine(opts);
  const info = await engine.ready;
  const eos = [...new Set([...info.eosTokenIds, ...tokenizer.eosTokenIds])];
  const app = buildApp({ engine, tokenizer });
  const url = await app.listen({ host: '127.0.0.1', port: 0 });
  const pool = new Pool(url, { connections: 128, pipelining: 1 });
  console.log(`serve bench: ${target.label} model ${dir}, runner ${opts.runner}, weights ${target.weights}, ${MAX_TOKENS} tokens per request, requests per level ${JSON.stringify(REQUESTS)}`);
  await viaServer(pool, 1); // warm-up
  const figures: Figure[] = [];
  const suffix = target.label === 'demo' ? '' : `_${target.label}`;
  try {
    for (const c of LEVELS) {
      // Server, engine, engine, server: the machine is shared, and the ABBA order cancels a load drift.
      const s1 = await viaServer(pool, c);
      const e1 = await viaEngine(engine, tokenizer, c, eos);
      const e2 = await viaEngine(engine, tokenizer, c, eos);
      const s2 = await viaServer(pool, c);
      const s = summarise(merge(s1, s2));
      const e = summarise(merge(e1, e2));
      const overhead = 1 - s.tps / e.tps;
      console.log(
        `c=${String(c).padStart(3)}  server: ttft p50 ${s.ttftP50.toFixed(1)} p99 ${s.ttftP99.toFixed(1)} ms, itl p50 ${s.itlP50.toFixed(2)} p99 ${s.itlP99.toFixed(2)} ms, ${s.tps.toFixed(1)} tok/s` +
          ` | engine: ttft p50 ${e.ttftP50.toFixed(1)} ms, itl p50 ${e.itlP50.toFixed(2)} ms, ${e.tps.toFixed(1)} tok/s | overhead ${(overhead * 100).toFixed(1)}%`,
      );
      const add = (name: string, value: number, unit: string, compared_to: string | null) =>
        figures.push({ name: `${name}${suffix}`, value: round(value, 4), unit, compared_to: compared_to === null ? null : `${compared_to}${suffix}` });
      add(`server_ttft_p50_c${c}`, s.ttftP50, 'ms', `engine_ttft_p50_c${c}`);
      add(`server_ttft_p99_c${c}`, s.ttftP99, 'ms', `engine_ttft_p99_c${c}`);
      add(`server_itl_p50_c${c}`, s.itlP50, 'ms', `engine_itl_p50_c${c}`);
      add(`server_itl_p99_c${c}`, s.itlP99, 'ms', `engine_itl_p99_c${c}`);
      add(`server_throughput_c${c}`, s.tps, 'tokens/s', `engine_throughput_c${c}`);
      add(`engine_ttft_p50_c${c}`, e.ttftP50, 'ms', null);
      add(`engine_ttft_p99_c${c}`, e.ttftP99, 'ms', null);
      add(`engine_itl_p50_c${c}`, e.itlP50, 'ms', null);
      add(`engine_itl_p99_c${c}`, e.itlP99, 'ms', null);
      add(`engine_throughput_c${c}`, e.tps, 'tokens/s', null);
      add(`server_overhead_c${c}`, overhead, 'fraction', `engine_throughput_c${c}`);
    }
  } finally {
    await pool.close();
    await app.close();
    await engine.close();
  }
  return figures;
}

async function main(): Promise<void> {
  const targets: BenchTarget[] = [{ label: 'demo', dir: ensureDemoModel((s) => process.stderr.write(s)), modelId: DEMO_MODEL_ID, weights: 'auto' }];
  // The larger synthetic model: Qwen3-30B-A3B's shape with 8 layers, at Q8_0 (generated once,
  // shared with bench:engine). BENCH_SERVE_LARGE=0 skips it.
  if (process.env.BENCH_SERVE_LARGE !== '0') {
    const dir = ensureCheckpoint(BENCH_MODELS.qwen, (s) => process.stderr.write(s));
    targets.push({ label: 'qwen3_30b_a3b_8l', dir, modelId: 'qwen3-30b-a3b-8l', weights: 'q8' });
  }
  const figures: Figure[] = [];
  for (const t of targets) {
    MAX_TOKENS = Number(process.env.BENCH_MAX_TOKENS ?? (t.label === 'demo' ? 64 : 16));
    figures.push(...(await benchModel(t)));
  }
  const overhead = figures.find((f) => f.name === 'server_overhead_c32')!.value;
  console.log(JSON.stringify({ server_overhead_c32: overhead, figures }));
}

await main();
