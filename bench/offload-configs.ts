// Offloaded decode under several runner configurations on one engine:
//   node --import=tsx bench/offload-configs.ts   (about 3 minutes on 2 cores)
//
// The bench:offload setup (Qwen3-30B-A3B-shaped checkpoint with 8 layers, Q8_0, a quarter
// of the experts in the fast tier, routing replayed from ../shared/traces/qwen3-30b-a3b.trace.csv),
// but one expert file and engine for every configuration, so that they differ only in the
// runner: cache policy, prefetch lookahead, prefetch threshold and the co-occurrence
// forecast. Each configuration decodes 96 tokens from a cold cache after a 28-token
// prompt; the configurations run REPS times (default 2), in reverse order on odd passes,
// and the figures are medians. Per run it prints tokens/s, the wait for reads, the time
// reads were in flight, loads per token and prefetches issued / used.
// Options (environment): CONFIGS ("policy:lookahead:minProbability:co,..."; co 1 or 0;
// minProbability "auto": measured before each run as the server does, read-cost.ts),
// REPS, BENCH_OFFLOAD_CAPACITY ("0.25"), BENCH_OFFLOAD_TRACE, BENCH_THREADS (2).
// The last line is JSON: `figures`, each configuration's median tokens/s compared with
// the first configuration's (on-demand LRU by default).
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openModel } from '../src/model/checkpoint.js';
import type { NativeEngine } from '../src/engine/native.js';
import type { StepSequence } from '../src/engine/runner.js';
import { OffloadRunner } from '../src/offload/offload-runner.js';
import { measureReadCost, prefetchThreshold } from '../src/offload/read-cost.js';
import { RoutingReplay } from '../src/offload/replay.js';
import { BENCH_MODELS, ensureCheckpoint } from './lib/bench-models.js';
import { tokenIds } from './lib/engine-bench-common.js';
import type { Figure } from './lib/figures.js';

const here = dirname(fileURLToPath(import.meta.url));
const TRACE = resolve(process.env.BENCH_OFFLOAD_TRACE ?? join(here, '..', '..', 'shared', 'traces', 'qwen3-30b-a3b.trace.csv'));
if (!existsSync(TRACE)) throw new Error(`routing trace ${TRACE} not found; set BENCH_OFFLOAD_TRACE to a moe-trace v1 file (the default is ../shared/traces beside the project)`);
const CAPACITY = process.env.BENCH_OFFLOAD_CAPACITY ?? '0.25';
const THREADS = Number(process.env.BENCH_THREADS ?? 2);
const CONFIGS = (process.env.CONFIGS ?? 'lru:0:0.3:1,forecast:0:0.3:1,forecast:2:0.3:0,forecast:2:0.3:1,forecast:2:0.15:1,forecast:2:0.5:1').split(',');
const REPS = Number(process.env.REPS ?? 2);
const DECODE = 96;
const PROMPT = 28;
const BLOCK = 16;

const modelDir = ensureCheckpoint(BENCH_MODELS.qwen, console.log);
const m = await openModel(modelDir);
const spec = m.spec;
const replay = await RoutingReplay.load(TRACE, { layers: spec.numLayers, experts: spec.numExperts });
const prompt = tokenIds(PROMPT, 11, 1000, Math.min(spec.vocabSize, 30000));
const kvBlocks = Math.ceil((PROMPT + DECODE) / BLOCK) + 1;
const first = OffloadRunner.fromCheckpoint(spec, m.weights, { weights: 'q8', threads: THREADS, kvBlockSize: BLOCK, kvBlocks, capacity: CAPACITY, policy: 'lru', lookahead: 0, replay });
m.close();
const engine = first.engine as unknown as NativeEngine;
const blocks = Int32Array.from({ length: kvBlocks }, (_, i) => i);
const entry = (tokens: number[], startPos: number): StepSequence => ({
  seqId: 0,
  tokens: Uint32Array.from(tokens),
  startPos,
  blockTable: blocks.subarray(0, Math.ceil((startPos + tokens.length) / BLOCK)),
  wantLogits: true,
});
const stall = (s: ReturnType<NativeEngine['storeStats']>) => s.stallSeconds.reduce((a, v) => a + v, 0);
const results = new Map<string, number[]>();
try {
  for (let rep = 0; rep < REPS; rep++) {
    for (const c of rep % 2 ? [...CONFIGS].reverse() : CONFIGS) {
      const [policy, lookahead, minProb, co] = c.split(':');
      for (let l = 0; l < spec.numLayers; l++) for (let s = 0; s < first.slotsByLayer[l]; s++) engine.evictSlot(l, s);
      // 'auto': measured now, on the empty slots, as the server does when a model loads.
      const threshold = minProb === 'auto' ? prefetchThreshold(measureReadCost(engine, spec, first.slotsByLayer, 'q8_0', THREADS)) : Number(minProb);
      if (minProb === 'auto') console.log(`${c}: measured prefetch threshold ${threshold.toFixed(2)}`);
      const r = new OffloadRunner(spec, first.kv, first.engine, first.slotsByLayer, {
        policy,
        lookahead: Number(lookahead),
        prefetchMinProbability: threshold,
        coOccurrence: co === '1',
        replay,
        reuseLogits: true,
      });
      r.step([entry(prompt, 0)]);
      const s0 = engine.storeStats();
      // Token ids do not matter under replay (the routing is the trace's); a fixed sequence keeps runs alike.
      let tok = 1;
      const t0 = performance.now();
      for (let i = 0; i < DECODE; i++) {
        r.step([entry([tok], PROMPT + i)]);
        tok = (tok * 7 + 3) % 30000;
      }
      const sec = (performance.now() - t0) / 1000;
      const s1 = engine.storeStats();
      const st = r.offloadStats();
      const sum = (f: (x: (typeof st.layers)[number]) => number) => st.layers.reduce((a, x) => a + f(x), 0);
      const tps = DECODE / sec;
      results.set(c, [...(results.get(c) ?? []), tps]);
      const perTok = (v: number) => ((v * 1000) / DECODE).toFixed(1);
      console.log(
        `${c}: ${tps.toFixed(2)} tok/s, wait ${perTok(stall(s1) - stall(s0))} ms/token, reads in flight ${perTok((s1.busySeconds ?? 0) - (s0.busySeconds ?? 0))} ms/token, ` +
          `loads ${((s1.loads - s0.loads) / DECODE).toFixed(2)}/token, prefetch ${sum((x) => x.prefetchIssued)} issued ${sum((x) => x.prefetchUsed)} used`,
      );
    }
  }
} finally {
  first.close();
}
const median = (v: number[]) => [...v].sort((a, b) => a - b)[v.length >> 1];
const base = median(results.get(CONFIGS[0])!);
const figures: Figure[] = [];
for (const c of CONFIGS) {
  const v = median(results.get(c)!);
  console.log(`${c}: median ${v.toFixed(2)} tok/s over ${results.get(c)!.length} runs, ${(v / base).toFixed(3)}x ${CONFIGS[0]}`);
  figures.push({ name: `offloaded decode ${c}`, value: Number(v.toFixed(3)), unit: 'tok/s', compared_to: `${CONFIGS[0]} ${base.toFixed(3)} tok/s: ${(v / base).toFixed(3)}x` });
}
console.log(JSON.stringify({ figures }));
