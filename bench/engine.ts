// Engine benchmark (issue "Native CPU engine", point 8): `npm run bench:engine`.
//
// Our native engine against llama.cpp (node-llama-cpp's prebuilt CPU binaries) on the
// same weights (the GGUF export is byte-identical to what our engine packs at load), the
// same thread count and quantization, in one process run:
//   - prefill tokens/s: one step of a 512-token prompt (after a warm-up prefill of another);
//   - single-stream decode tokens/s: one token per step after a short prompt, greedy;
//   - batched decode with 8 and 32 sequences: aggregate tokens/s, every sequence one token per step
//     (ours: the 32 sequences run a few steps after each chunk of the single-stream decode,
//     so that their ratio compares the two under the same memory bandwidth);
//   - the memory read bandwidth (streaming-read probe, 1 GiB, same threads) right before
//     and right after each engine's measurements, and between chunks of 8 steps of its
//     single-stream decode: the bandwidth here switches between about 33 and 60 GB/s
//     within seconds, so each chunk is held against the probes beside it. The decode
//     roofline = the bandwidth the chunks saw / weight bytes read per decoded token
//     (decode / roofline = the chunks' roofline time over their own time);
//   - the int8 multiply-accumulate peak (the kernels' dot-product instructions on registers,
//     same threads; macPeakBench), the larger of the probes before the cases and right
//     after our engine's run (this VM has slow spells of 0.6x at times): with the
//     bandwidth it gives each batch size its roofline, the larger of weight traffic (the
//     experts its tokens activate, uniform routing as the random weights route) and weight
//     MACs at that peak (Q4_0 experts at the peak of their token-group kernel's mix,
//     macPeakBench(.., "q4_0"), which can pass it). Batched decode turns compute-bound early on a core with a slow
//     int8 path, so this says how far the 32-sequence target can be reached on this host;
//     and the stage chain (stageChainBound): the step's stages in data order (q/k/v, o_proj,
//     router, experts per layer, then the LM head), each at the larger of its traffic and
//     its MACs, summed, since a stage waits for the one before it: a tighter bound for an
//     engine that moves the whole batch through the layers together; and, next to it,
//     where our steps' time went (the engine's phase profile, MOE_SERVE_PROFILE=1 in the
//     measuring child, over the single-stream and 32-sequence steps alone): each stage's
//     milliseconds per step and its bound over them (measuredStages), so that a run shows
//     which stage keeps a figure from its bound;
//   - the resident memory of the process running our engine, after load, against the
//     engine's weights + KV cache. Our engine is measured in a fresh child process per case
//     (engine-bench-ours-child.ts), so its RSS is not that of whatever ran before, and all
//     it allocated is gone before llama.cpp is loaded in this process.
// Models (real shapes with fewer layers, random weights) are generated once into
// <cacheDir>/bench-models/ with their GGUF exports, and reused.
//
// Cases: qwen-q8 (Qwen3-30B-A3B shape, 8 layers, Q8_0; always run first), qwen-q4,
// mixtral-q8, mixtral-q4. Options (flags after `npm run bench:engine --`, or environment):
//   --quick / BENCH_QUICK=1              only qwen-q8
//   --cases=a,b / BENCH_CASES            the cases to run
//   --threads=N / BENCH_THREADS          threads of both engines and the probe (default 2)
//   BENCH_BUDGET_SECONDS (default 600)   optional cases that would end past this are skipped
//   BENCH_DECODE_STEPS (48), BENCH_BATCH_STEPS (16), BENCH_PREFILL_REPS (2), BENCH_PREFILL_TOKENS (512)
//   BENCH_LONG_CONTEXT (2048; 0: off)    qwen-q8 only: a prompt of this many tokens in steps of
//                                        512, then 16 decode steps over it (llama.cpp with flash
//                                        attention, its faster setting at long context)
//   BENCH_LLAMA_MMAP=auto|0|1            llama.cpp's useMmap (default auto, its default)
//   MOE_SERVE_KV_CACHE_TYPE=f32|f16      our KV cache, as the server's setting (default f16, as llama.cpp's)
// The last line is JSON: {decode_vs_llamacpp, decode_roofline_fraction, prefill_vs_llamacpp,
// batch32_vs_single, batch32_roofline_vs_single, batch32_chain_bound_vs_single} for qwen-q8, and `figures`: [{name, value, unit, compared_to}].

import { statSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import type { WeightFormat } from '../src/engine/native-runner.js';
import { loadNative, nativeAddonPath } from '../src/engine/native.js';
import { readModelSpec } from '../src/model/hf-config.js';
import type { ModelSpec } from '../src/model/spec.js';
import { BENCH_MODELS, benchModelsDir, ensureCheckpoint, ensureGguf, type BenchModel } from './lib/bench-models.js';
import {
  bytesPerToken,
  chunkBandwidth,
  chunkProbe,
  DECODE_CHUNK_STEPS,
  decodeRooflineFraction,
  GB,
  LONG_PREFILL_CHUNK,
  makeWorkload,
  MB,
  PROBE_BYTES,
  probeMacPeak,
  stageChainBound,
  measuredStages,
  stepRoofline,
  type EngineResult,
  type LongContextResult,
  type ReadBytes,
  type StageBound,
} from './lib/engine-bench-common.js';
import { disposeLlamaCpp, getLlamaCpp, measureLlamaCpp, type LlamaCppResult } from './lib/engine-bench-llamacpp.js';
import { measureOursInChild, oursKvCache, type OursResult } from './lib/engine-bench-ours.js';
import type { Figure } from './lib/figures.js';

interface BenchCase {
  id: string;
  model: BenchModel;
  weights: WeightFormat;
  gguf: 'q8_0' | 'q4_0';
}

const CASES: BenchCase[] = [
  { id: 'qwen-q8', model: BENCH_MODELS.qwen, weights: 'q8', gguf: 'q8_0' },
  { id: 'qwen-q4', model: BENCH_MODELS.qwen, weights: 'q4', gguf: 'q4_0' },
  { id: 'mixtral-q8', model: BENCH_MODELS.mixtral, weights: 'q8', gguf: 'q8_0' },
  { id: 'mixtral-q4', model: BENCH_MODELS.mixtral, weights: 'q4', gguf: 'q4_0' },
];
const REQUIRED = 'qwen-q8';

const TARGET = { decodeVsLlama: 1.2, rooflineFraction: 0.8, prefillVsLlama: 1.2, batch32VsSingle: 4, rssSlack: 0.1 };

// ---------------------------------------------------------------------------------
// Options

function flag(name: string): string | boolean | undefined {
  for (const a of process.argv.slice(2)) {
    if (a === `--${name}`) return true;
    if (a.startsWith(`--${name}=`)) return a.slice(name.length + 3);
  }
  return undefined;
}

function intOption(env: string, def: number, min: number, flagValue?: string | boolean): number {
  const raw = typeof flagValue === 'string' ? flagValue : process.env[env];
  if (raw === undefined || raw === '') return def;
  const v = Number(raw);
  if (!Number.isInteger(v) || v < min) throw new Error(`${env}: expected an integer >= ${min}, got "${raw}"`);
  return v;
}

for (const a of process.argv.slice(2)) {
  if (!/^--(quick|cases=.*|threads=\d+|help)$/.test(a)) throw new Error(`unknown argument ${a}; see the header of bench/engine.ts`);
}
if (flag('help')) {
  console.log('usage: npm run bench:engine -- [--quick] [--cases=qwen-q8,qwen-q4,mixtral-q8,mixtral-q4] [--threads=N]');
  process.exit(0);
}
const quick = flag('quick') === true || process.env.BENCH_QUICK === '1';
const casesArg = flag('cases');
const caseIds = quick
  ? [REQUIRED]
  : (typeof casesArg === 'string' ? casesArg : (process.env.BENCH_CASES ?? CASES.map((c) => c.id).join(','))).split(',').map((s) => s.trim()).filter(Boolean);
for (const id of caseIds) if (!CASES.some((c) => c.id === id)) throw new Error(`unknown case "${id}"; cases: ${CASES.map((c) => c.id).join(', ')}`);
const selected = CASES.filter((c) => caseIds.includes(c.id));
const threads = intOption('BENCH_THREADS', 2, 1, flag('threads'));
const budgetSeconds = intOption('BENCH_BUDGET_SECONDS', 600, 0);
oursKvCache(); // a bad MOE_SERVE_KV_CACHE_TYPE fails here, before any work
const mmapRaw = process.env.BENCH_LLAMA_MMAP ?? 'auto';
const llamaMmap: boolean | 'auto' = mmapRaw === '0' ? false : mmapRaw === '1' ? true : 'auto';
const workload = makeWorkload({
  decodeSteps: intOption('BENCH_DECODE_STEPS', 48, 1),
  batchSteps: intOption('BENCH_BATCH_STEPS', 16, 1),
  prefillReps: intOption('BENCH_PREFILL_REPS', 2, 1),
  prefillTokens: intOption('BENCH_PREFILL_TOKENS', 512, 16),
  longContext: intOption('BENCH_LONG_CONTEXT', 2048, 0),
});

// ---------------------------------------------------------------------------------
// Output helpers

const figures: Figure[] = [];
const round = (v: number, digits = 3) => Number(v.toFixed(digits));
const fmt = (v: number, digits = 1) => v.toFixed(digits);
const ratio = (a: number, b: number) => a / b;
const passFail = (ok: boolean) => (ok ? 'PASS' : 'FAIL');
const log = (s: string) => console.log(s);
function fig(name: string, value: number, unit: string, compared_to: string | null = null): void {
  figures.push({ name, value: round(value, unit === '%' || unit === 'ratio' ? 4 : 2), unit, compared_to });
}

// ---------------------------------------------------------------------------------
// One case

interface CaseOutcome {
  c: BenchCase;
  ours: OursResult;
  llama: LlamaCppResult | null;
  read: ReadBytes;
  /** int8 MAC peak (GMAC/s): the larger of the probes before the cases and right after our engine's run. */
  gmacs: number;
  /** The routed experts' peak: gmacs, or for Q4_0 experts the Q4_0 token-group mix's probe (taken the same way). */
  expertGmacs: number;
}

/** Decode tokens/s at the bandwidth the engine's decode chunks saw (decodeRooflineFraction's figure as a rate). */
function roofline(r: EngineResult, read: ReadBytes): number {
  return (chunkBandwidth(r.decode.chunks) * 1e9) / read.total;
}

function report(o: CaseOutcome, spec: ModelSpec): void {
  const { c, ours, llama, read, gmacs, expertGmacs } = o;
  const label = `${c.model.preset} ${c.gguf}`;
  log(`\n== ${label}: ${spec.arch}, hidden ${spec.hiddenSize}, ${spec.numExperts} experts top-${spec.topK} width ${spec.expertIntermediateSize}, ` +
    `${spec.numLayers} layers, vocab ${spec.vocabSize}, ${threads} threads ==`);
  log(`loaded: ours ${fmt(ours.loadSeconds)} s from the bf16 checkpoint (packing to ${ours.info.weights}); llama.cpp ${llama ? fmt(llama.loadSeconds) + ' s' : '-'}`);
  for (const n of [...ours.notes, ...(llama?.notes ?? [])]) log(`  ${n}`);

  // Bandwidth and roofline.
  const bw = (r: EngineResult) => `${fmt(r.bandwidthBefore)} before, ${fmt(r.bandwidthAfter)} after, mean ${fmt(r.bandwidth)} GB/s`;
  log(`bandwidth probe (${threads} threads, ${PROBE_BYTES / 2 ** 30} GiB streaming read): ours ${bw(ours)}` + (llama ? `; llama.cpp ${bw(llama)}` : ''));
  fig(`${label} bandwidth probe around ours`, ours.bandwidth, 'GB/s', `before ${fmt(ours.bandwidthBefore)}, after ${fmt(ours.bandwidthAfter)}`);
  if (llama) fig(`${label} bandwidth probe around llama.cpp`, llama.bandwidth, 'GB/s', `before ${fmt(llama.bandwidthBefore)}, after ${fmt(llama.bandwidthAfter)}`);
  const chunkLine = (r: EngineResult) =>
    `${fmt(chunkBandwidth(r.decode.chunks))} GB/s (probes ${[r.decode.chunks[0].bandwidthBefore, ...r.decode.chunks.map((c) => c.bandwidthAfter)].map((v) => fmt(v, 0)).join(' ')})`;
  log(`bandwidth beside the decode chunks (${DECODE_CHUNK_STEPS} steps each): ours ${chunkLine(ours)}` + (llama ? `; llama.cpp ${chunkLine(llama)}` : ''));
  const perChunk = (r: EngineResult) =>
    r.decode.chunks.map((c) => `${fmt(c.steps / c.seconds, 1)} (${fmt((100 * ((c.steps / c.seconds) * read.total)) / (chunkProbe(c) * 1e9), 0)}%)`).join(' ');
  log(`decode tok/s per chunk (of its roofline): ours ${perChunk(ours)}` + (llama ? `; llama.cpp ${perChunk(llama)}` : ''));
  fig(`${label} bandwidth beside ours' decode`, chunkBandwidth(ours.decode.chunks), 'GB/s', `probes between chunks of ${DECODE_CHUNK_STEPS} decode steps`);
  if (llama) fig(`${label} bandwidth beside llama.cpp's decode`, chunkBandwidth(llama.decode.chunks), 'GB/s', `probes between chunks of ${DECODE_CHUNK_STEPS} decode steps`);
  log(
    `weights read per decoded token: ${MB(read.total)} = non-expert ${MB(read.nonExpert)} (attention ${MB(read.attention)}, router f32 ${MB(read.router)}, ` +
      `norms ${MB(read.norms)}${read.shared ? `, shared experts ${MB(read.shared)}` : ''}, LM head ${MB(read.lmHead)}, embedding row ${(read.embedRow / 1e3).toFixed(1)} kB)` +
      ` + ${spec.topK} x ${MB(read.perExpert)} per expert x ${spec.numLayers} layers = ${MB(read.experts)}` +
      (ours.info.expertBytes === read.perExpert ? '' : ` [engine reports ${MB(ours.info.expertBytes)} per expert]`),
  );
  fig(`${label} weight bytes read per decoded token`, read.total / 1e6, 'MB', `non-expert ${MB(read.nonExpert)} + experts ${MB(read.experts)}`);
  const roofOurs = roofline(ours, read);
  const roofLlama = llama ? roofline(llama, read) : NaN;
  log(`decode roofline: ours ${fmt(roofOurs)} tok/s, llama.cpp ${llama ? fmt(roofLlama) : '-'} tok/s (bandwidth / bytes per token)`);

  // The table.
  const vs = (a: number, b: number | null) => (b === null ? '-' : `${fmt(ratio(a, b), 2)}x`);
  const llamaBatch = (n: number) => llama?.batches.find((b) => b.sequences === n)?.tokensPerSecond ?? null;
  const oursBatch = (n: number) => ours.batches.find((b) => b.sequences === n)!.tokensPerSecond;
  const prefillO = ours.prefill.tokensPerSecond;
  const prefillL = llama?.prefill.tokensPerSecond ?? null;
  const decodeO = ours.decode.tokensPerSecond;
  const decodeL = llama?.decode.tokensPerSecond ?? null;
  const fracO = decodeRooflineFraction(ours.decode.chunks, read.total);
  const fracL = llama ? decodeRooflineFraction(llama.decode.chunks, read.total) : null;
  const b32O = oursBatch(32) / decodeO;
  const b32L = llamaBatch(32) !== null && decodeL !== null ? llamaBatch(32)! / decodeL : null;
  const target = (ok: boolean | null, text: string) => (ok === null ? `${text}  n/a` : `${text}  ${passFail(ok)}`);

  // Batched decode against its own roofline: weight traffic (the experts its tokens
  // activate) at the bandwidth probe, or weight MACs at the int8 MAC peak, whichever is
  // slower. Once the MACs dominate, more sequences per step cannot raise the aggregate.
  const roof = (n: number) => stepRoofline(spec, read, n, ours.bandwidth, gmacs, expertGmacs);
  const expertPeak = expertGmacs !== gmacs ? `; the Q4_0 experts' token-group mix ${fmt(expertGmacs)} GMAC/s` : '';
  log(`int8 MAC peak (${threads} threads, the ${ours.info.isa} kernels' int8 dot product without weight traffic): ${fmt(gmacs)} GMAC/s${expertPeak}; ${fmt(roof(1).macs / 1e9, 2)} GMAC of weights per token`);
  for (const n of [1, 8, 32]) {
    const r = roof(n);
    const got = n === 1 ? decodeO : oursBatch(n);
    log(
      `  ${String(n).padStart(2)} sequence(s): memory ${fmt(r.memorySeconds * 1e3)} ms (${MB(r.bytes)} at ${fmt(ours.bandwidth)} GB/s), compute ${fmt(r.computeSeconds * 1e3)} ms ` +
        `per step -> roofline ${fmt(r.tokensPerSecond)} tok/s (${r.computeSeconds > r.memorySeconds ? 'compute' : 'memory'}-bound); ours ${fmt(got)} tok/s = ${fmt((100 * got) / r.tokensPerSecond, 0)}% of it`,
    );
  }
  const b32Limit = roof(32).tokensPerSecond / decodeO;
  log(`  32-sequence roofline / our single stream: ${fmt(b32Limit, 2)}x (the most the 32-sequence aggregate could reach over our single stream on this machine)`);
  // The same step as a chain of stages in data order (stageChainBound): a compute-bound
  // stage cannot hide behind a memory-bound one that it waits for or that waits for it.
  const chain = (n: number) => stageChainBound(spec, c.gguf, n, ours.bandwidth, gmacs, expertGmacs);
  const chain1 = chain(1);
  const chain32 = chain(32);
  const stagesText = (b: StageBound) => b.stages.map((st) => `${st.name} ${fmt(st.seconds * 1e3)} ms (${st.bound})`).join(', ');
  log(
    `  stage chain (qkv, o_proj, router, experts per layer, then the LM head; each stage at the larger of its weights at ${fmt(ours.bandwidth)} GB/s and its MACs at the peak):`,
  );
  log(`     1 stream: ${fmt(chain1.tokensPerSecond)} tok/s (${stagesText(chain1)}); ours ${fmt((100 * decodeO) / chain1.tokensPerSecond, 0)}% of it`);
  log(`    32 sequences: ${fmt(chain32.tokensPerSecond)} tok/s (${stagesText(chain32)}); ours ${fmt((100 * oursBatch(32)) / chain32.tokensPerSecond, 0)}% of it`);
  // Where each step's time goes (the engine's phase profile of the measured steps): each
  // stage against its own bound, so that the stage that keeps a figure from its bound shows.
  const measured = (label: string, bound: StageBound, profileMs: Record<string, number>, steps: number, tag: string) => {
    const st = measuredStages(profileMs, steps);
    const total = st.reduce((a, x) => a + x.ms, 0);
    if (!(total > 0)) return;
    const parts = st.map((x) => {
      const b = bound.stages.find((y) => y.name === x.name);
      if (b) fig(`${tag} ${x.name} ms per step`, x.ms, 'ms', `its stage-chain bound ${fmt(b.seconds * 1e3, 2)} ms (${b.bound})`);
      else fig(`${tag} ${x.name} ms per step`, x.ms, 'ms', 'not in the stage chain (reads none of its weights)');
      return b && b.seconds * 1e3 >= 0.05 ? `${x.name} ${fmt(x.ms)} ms (${fmt((100 * b.seconds * 1e3) / x.ms, 0)}% eff.)` : `${x.name} ${fmt(x.ms)} ms`;
    });
    log(`  ${label} measured (phase profile, ${steps} steps): ${fmt(total)} ms per step: ${parts.join(', ')}`);
  };
  const prof = ours.profile;
  measured('   1 stream', chain1, prof.single, prof.singleSteps, `${label} ours 1 stream`);
  if (prof.sequences === 32) measured('  32 sequences', chain32, prof.batch, prof.batchSteps, `${label} ours 32 sequences`);
  log(
    `  32-sequence stage-chain bound / our single stream: ${fmt(chain32.tokensPerSecond / decodeO, 2)}x; ` +
      `over the single stream's own bound: ${fmt(chain32.tokensPerSecond / chain1.tokensPerSecond, 2)}x (both engines at their bounds)`,
  );

  log('');
  log(`${'figure'.padEnd(36)}${'ours'.padStart(12)}${'llama.cpp'.padStart(12)}${'ours/llama'.padStart(12)}   target`);
  const line = (name: string, o: number, l: number | null, unit: string, tgt: string, digits = 1) =>
    log(`${(name + ` (${unit})`).padEnd(36)}${fmt(o, digits).padStart(12)}${(l === null ? '-' : fmt(l, digits)).padStart(12)}${vs(o, l).padStart(12)}   ${tgt}`);
  line(`prefill ${ours.prefill.tokens} tokens`, prefillO, prefillL, 'tok/s', target(prefillL === null ? null : prefillO >= TARGET.prefillVsLlama * prefillL, `>= ${TARGET.prefillVsLlama}x llama.cpp`));
  line(`decode, 1 stream`, decodeO, decodeL, 'tok/s', target(decodeL === null ? null : decodeO >= TARGET.decodeVsLlama * decodeL, `>= ${TARGET.decodeVsLlama}x llama.cpp`), 2);
  line(`decode / its roofline`, 100 * fracO, fracL === null ? null : 100 * fracL, '%', target(fracO >= TARGET.rooflineFraction, `ours >= ${100 * TARGET.rooflineFraction}% of roofline`));
  for (const n of [8, 32]) line(`decode, ${n} sequences aggregate`, oursBatch(n), llamaBatch(n), 'tok/s', '');
  line(`32-seq aggregate / 1 stream`, b32O, b32L, 'x', target(b32O >= TARGET.batch32VsSingle, `ours >= ${TARGET.batch32VsSingle}x`), 2);
  const longO = ours.long;
  const longL = llama?.long ?? null;
  if (longO) {
    const n = longO.context;
    line(`prefill ${n}-token prompt`, n / longO.prefillSeconds, longL && n / longL.prefillSeconds, 'tok/s', '');
    line(`decode after ${n} tokens`, longO.decodeSteps / longO.decodeSeconds, longL && longL.decodeSteps / longL.decodeSeconds, 'tok/s', '', 2);
    log(`  long context: ours ${longO.setup}` + (longL ? `; llama.cpp ${longL.setup}` : ''));
  }
  log(
    `  timings: prefill ours ${ours.prefill.seconds.map((s) => fmt(s, 2)).join(', ')} s` +
      (llama ? `, llama.cpp ${llama.prefill.seconds.map((s) => fmt(s, 2)).join(', ')} s` : '') +
      `; decode ${ours.decode.steps} steps ours ${fmt(ours.decode.seconds, 2)} s` +
      (llama ? `, llama.cpp ${fmt(llama.decode.seconds, 2)} s` : '') +
      `; batched ${ours.batches.map((b) => `${b.sequences}x${b.steps} ours ${fmt(b.seconds, 2)} s`).join(', ')}` +
      (llama ? `, ${llama.batches.map((b) => `${b.sequences}x${b.steps} llama.cpp ${fmt(b.seconds, 2)} s (${b.dispatches} batches)`).join(', ')}` : ''),
  );

  // Memory (our engine runs in a fresh child process: its RSS is that process's).
  const wkv = ours.info.weightBytes + ours.info.kvBytes;
  const loadedRatio = ours.memLoaded.rss / wkv;
  const afterRatio = ours.memAfter.rss / wkv;
  log(
    `\nresident memory (VmRSS) of the process running our engine: ${GB(ours.memBefore.rss)} before load, ${GB(ours.memLoaded.rss)} after load ` +
      `(anon ${GB(ours.memLoaded.anon)}, file ${GB(ours.memLoaded.file)}), ${GB(ours.memAfter.rss)} after the measurements, ${GB(ours.memReleased.rss)} after close(); ` +
      `peak ${GB(ours.memAfter.peak)} (VmHWM: the checkpoint's mapped pages count while packing)`,
  );
  log(
    `  engine weights ${GB(ours.info.weightBytes)} + KV ${GB(ours.info.kvBytes)} = ${GB(wkv)}; RSS after load / (weights + KV) = ${fmt(loadedRatio, 3)}` +
      `  target within ${100 * TARGET.rssSlack}%  ${passFail(Math.abs(loadedRatio - 1) <= TARGET.rssSlack)}; ` +
      `after the measurements (activations and scratch included in RSS only) ${fmt(afterRatio, 3)}`,
  );
  if (llama) {
    log(
      `  llama.cpp loaded (this process): RSS ${GB(llama.memLoaded.rss)} (anon ${GB(llama.memLoaded.anon)}, file-mapped ${GB(llama.memLoaded.file)}); ` +
        `${GB(llama.memReleased.rss)} after dispose`,
    );
  }

  // Figures.
  const cmpR = (o: number, l: number | null, unit: string) => (l === null ? null : `llama.cpp ${fmt(l, 2)} ${unit}: ${fmt(o / l, 3)}x`);
  fig(`${label} ours prefill ${ours.prefill.tokens}-token prompt`, prefillO, 'tok/s', cmpR(prefillO, prefillL, 'tok/s'));
  fig(`${label} ours decode 1 stream`, decodeO, 'tok/s', cmpR(decodeO, decodeL, 'tok/s'));
  fig(`${label} ours decode roofline fraction`, fracO, 'ratio', `roofline ${fmt(roofOurs, 2)} tok/s at ${fmt(chunkBandwidth(ours.decode.chunks), 2)} GB/s`);
  for (const n of [8, 32]) fig(`${label} ours decode ${n} sequences aggregate`, oursBatch(n), 'tok/s', cmpR(oursBatch(n), llamaBatch(n), 'tok/s'));
  fig(`${label} ours 32-sequence aggregate / single stream`, b32O, 'ratio', b32L === null ? null : `llama.cpp ${fmt(b32L, 3)}x`);
  fig(`${label} int8 MAC peak`, gmacs, 'GMAC/s', `the ${ours.info.isa} kernels' int8 dot product without weight traffic, ${threads} threads`);
  if (expertGmacs !== gmacs) fig(`${label} int8 MAC peak, Q4_0 token-group mix`, expertGmacs, 'GMAC/s', `the routed experts' peak (${ours.info.isa}), ${threads} threads`);
  for (const n of [8, 32]) {
    const r = roof(n);
    const peaks = expertGmacs !== gmacs ? `${fmt(gmacs, 2)} GMAC/s, the experts' at ${fmt(expertGmacs, 2)}` : `${fmt(gmacs, 2)} GMAC/s`;
    fig(`${label} ours decode ${n} sequences / its roofline`, oursBatch(n) / r.tokensPerSecond, 'ratio',
      `roofline ${fmt(r.tokensPerSecond, 2)} tok/s: max(${MB(r.bytes)} at ${fmt(ours.bandwidth, 2)} GB/s, ${fmt(r.macs / 1e9, 2)} GMAC at ${peaks})`);
  }
  fig(`${label} 32-sequence roofline / ours single stream`, b32Limit, 'ratio', `ours single stream ${fmt(decodeO, 2)} tok/s`);
  fig(`${label} 32-sequence stage-chain bound / ours single stream`, chain32.tokensPerSecond / decodeO, 'ratio', `ours single stream ${fmt(decodeO, 2)} tok/s`);
  fig(`${label} 32-sequence stage-chain bound / single-stream stage-chain bound`, chain32.tokensPerSecond / chain1.tokensPerSecond, 'ratio', `single-stream bound ${fmt(chain1.tokensPerSecond, 2)} tok/s`);
  fig(`${label} ours decode 32 sequences / its stage-chain bound`, oursBatch(32) / chain32.tokensPerSecond, 'ratio', `stage-chain bound ${fmt(chain32.tokensPerSecond, 2)} tok/s`);
  if (longO) {
    const n = longO.context;
    const pre = (r: LongContextResult) => n / r.prefillSeconds;
    const dec = (r: LongContextResult) => r.decodeSteps / r.decodeSeconds;
    fig(`${label} ours prefill ${n}-token prompt (steps of ${LONG_PREFILL_CHUNK})`, pre(longO), 'tok/s', longL ? `llama.cpp ${fmt(pre(longL), 2)} tok/s: ${fmt(pre(longO) / pre(longL), 3)}x` : null);
    fig(`${label} ours decode after ${n} tokens of context`, dec(longO), 'tok/s', longL ? `llama.cpp ${fmt(dec(longL), 2)} tok/s (${longL.setup}): ${fmt(dec(longO) / dec(longL), 3)}x` : null);
    if (longL) {
      fig(`${label} llama.cpp prefill ${n}-token prompt`, pre(longL), 'tok/s', null);
      fig(`${label} llama.cpp decode after ${n} tokens of context`, dec(longL), 'tok/s', null);
    }
  }
  if (llama && prefillL !== null && decodeL !== null && fracL !== null) {
    fig(`${label} llama.cpp prefill ${llama.prefill.tokens}-token prompt`, prefillL, 'tok/s', null);
    fig(`${label} llama.cpp decode 1 stream`, decodeL, 'tok/s', null);
    fig(`${label} llama.cpp decode roofline fraction`, fracL, 'ratio', `roofline ${fmt(roofLlama, 2)} tok/s at ${fmt(chunkBandwidth(llama.decode.chunks), 2)} GB/s`);
    for (const n of [8, 32]) fig(`${label} llama.cpp decode ${n} sequences aggregate`, llamaBatch(n)!, 'tok/s', null);
    if (b32L !== null) fig(`${label} llama.cpp 32-sequence aggregate / single stream`, b32L, 'ratio', null);
  }
  fig(`${label} ours RSS after load / (weights + KV)`, loadedRatio, 'ratio', `target within ${100 * TARGET.rssSlack}%: RSS ${GB(ours.memLoaded.rss)}, weights ${GB(ours.info.weightBytes)}, KV ${GB(ours.info.kvBytes)}`);
  fig(`${label} ours RSS after measurements / (weights + KV)`, afterRatio, 'ratio', `RSS ${GB(ours.memAfter.rss)} (activations and scratch included)`);
  fig(`${label} ours RSS after close()`, ours.memReleased.rss / 1e9, 'GB', `before load ${GB(ours.memBefore.rss)}`);
}

// ---------------------------------------------------------------------------------
// Main

async function main(): Promise<void> {
  const addon = loadNative();
  const k = addon.kernelInfo();
  log(`engine benchmark: ${cpus().length} CPUs (${cpus()[0]?.model ?? '?'}), ${(totalmem() / 2 ** 30).toFixed(1)} GiB RAM, kernels ${k.active} (vnni ${k.vnni}; amx ${k.amx}: ${k.amxStatus}), threads ${threads}`);
  log(`native addon ${nativeAddonPath()} built ${statSync(nativeAddonPath()).mtime.toISOString()}`);
  log(`load average ${loadavg().map((v) => v.toFixed(2)).join(' ')} (other processes on these ${cpus().length} cores distort every figure)`);
  log(`cases: ${selected.map((c) => c.id).join(', ')}; budget ${budgetSeconds} s for optional cases; models in ${benchModelsDir()}`);
  log(
    `workload: prefill ${workload.prefillPrompt.length} tokens x ${workload.prefillReps} (after a warm-up prefill); decode ${workload.decodeSteps} steps (+${workload.decodeWarmSteps} warm-up) ` +
      `after a ${workload.decodePrompt.length}-token prompt; batched ${workload.batchSizes.join(' and ')} sequences x ${workload.batchSteps} steps (+${workload.batchWarmSteps}); greedy` +
      (workload.longPrompt.length > 0
        ? `; long context (${REQUIRED} only): a ${workload.longPrompt.length}-token prompt in steps of ${LONG_PREFILL_CHUNK}, then ${workload.longDecodeSteps} decode steps`
        : ''),
  );

  // Models: generated / exported once, then reused.
  const tPrep = performance.now();
  const dirs = new Map<string, string>();
  const ggufs = new Map<string, string>();
  const stamp = (s: string) => log(`[prepare] ${s}`);
  for (const c of selected) {
    if (!dirs.has(c.model.key)) dirs.set(c.model.key, ensureCheckpoint(c.model, stamp));
    ggufs.set(c.id, await ensureGguf(c.model, dirs.get(c.model.key)!, c.gguf, stamp));
  }
  log(`models ready in ${fmt((performance.now() - tPrep) / 1000)} s`);

  const llama = await getLlamaCpp(threads).catch((e: Error) => {
    log(`llama.cpp unavailable: ${e.message.split('\n')[0]}`);
    return null;
  });
  if (llama) log(`llama.cpp ${llama.llamaCppRelease.release} (${llama.buildType}), cpuMathCores ${llama.cpuMathCores}; ${llama.systemInfo.replace(/\s+/g, ' ').trim()}`);

  const macPeakAtStart = probeMacPeak(threads);
  const macPeakQ4AtStart = selected.some((c) => c.gguf === 'q4_0') ? probeMacPeak(threads, 'q4_0') : 0;
  log(`int8 MAC peak before the cases: ${fmt(macPeakAtStart)} GMAC/s (${threads} threads)${macPeakQ4AtStart > 0 ? `; Q4_0 token-group mix ${fmt(macPeakQ4AtStart)} GMAC/s` : ''}`);
  const t0 = performance.now();
  const elapsed = () => (performance.now() - t0) / 1000;
  const outcomes: CaseOutcome[] = [];
  const caseSeconds = new Map<string, number>();
  let lastSeconds = 0;
  for (const c of selected) {
    if (c.id !== REQUIRED) {
      const sameModel = [...caseSeconds.entries()].find(([id]) => CASES.find((x) => x.id === id)!.model === c.model)?.[1];
      const estimate = sameModel ?? lastSeconds;
      if (elapsed() + estimate > budgetSeconds) {
        log(`\n== ${c.id}: skipped (elapsed ${fmt(elapsed(), 0)} s + about ${fmt(estimate, 0)} s would pass the ${budgetSeconds} s budget; BENCH_BUDGET_SECONDS raises it)`);
        continue;
      }
    }
    const tc = performance.now();
    const dir = dirs.get(c.model.key)!;
    const spec = readModelSpec(dir);
    const read = bytesPerToken(spec, c.gguf);
    log(`\n[${c.id}] measuring our engine (${c.weights}) ...`);
    // The long-context figures are measured on the required case only (they take half a minute).
    const w = c.id === REQUIRED ? workload : { ...workload, longPrompt: [] };
    const ours = await measureOursInChild(dir, c.weights, threads, w);
    // The larger of the probes before the cases and right after this one: a probe can land
    // in one of this VM's slow spells, and the limit must hold for the whole run.
    const gmacs = Math.max(macPeakAtStart, probeMacPeak(threads));
    // Q4_0 experts: their kernels' own mix (it can pass the Q8_0 one), probed the same way.
    const expertGmacs = c.gguf === 'q4_0' ? Math.max(macPeakQ4AtStart, probeMacPeak(threads, 'q4_0')) : gmacs;
    let lres: LlamaCppResult | null = null;
    if (llama) {
      log(`[${c.id}] measuring llama.cpp (${c.gguf}) ...`);
      try {
        lres = await measureLlamaCpp(ggufs.get(c.id)!, threads, w, llamaMmap);
      } catch (e) {
        log(`[${c.id}] llama.cpp failed: ${(e as Error).message.split('\n')[0]}`);
      }
    }
    const o = { c, ours, llama: lres, read, gmacs, expertGmacs };
    outcomes.push(o);
    report(o, spec);
    lastSeconds = (performance.now() - tc) / 1000;
    caseSeconds.set(c.id, lastSeconds);
    log(`[${c.id}] done in ${fmt(lastSeconds)} s`);
  }
  await disposeLlamaCpp();
  log(`\nload average at the end ${loadavg().map((v) => v.toFixed(2)).join(' ')}`);
  log(`measurements took ${fmt(elapsed())} s (after ${fmt((t0 - tPrep) / 1000)} s of preparation)`);

  // Summary: the targets on the required case.
  const main = outcomes.find((o) => o.c.id === REQUIRED);
  const summary: Record<string, number | null> = { decode_vs_llamacpp: null, decode_roofline_fraction: null, prefill_vs_llamacpp: null, batch32_vs_single: null, batch32_roofline_vs_single: null, batch32_chain_bound_vs_single: null };
  if (main) {
    const { ours, llama: l, read } = main;
    summary.decode_roofline_fraction = round(decodeRooflineFraction(ours.decode.chunks, read.total), 4);
    summary.batch32_vs_single = round(ours.batches.find((b) => b.sequences === 32)!.tokensPerSecond / ours.decode.tokensPerSecond, 3);
    const mainSpec = readModelSpec(dirs.get(main.c.model.key)!);
    summary.batch32_roofline_vs_single = round(stepRoofline(mainSpec, read, 32, ours.bandwidth, main.gmacs, main.expertGmacs).tokensPerSecond / ours.decode.tokensPerSecond, 3);
    summary.batch32_chain_bound_vs_single = round(stageChainBound(mainSpec, main.c.gguf, 32, ours.bandwidth, main.gmacs, main.expertGmacs).tokensPerSecond / ours.decode.tokensPerSecond, 3);
    if (l) {
      summary.decode_vs_llamacpp = round(ours.decode.tokensPerSecond / l.decode.tokensPerSecond, 3);
      summary.prefill_vs_llamacpp = round(ours.prefill.tokensPerSecond / l.prefill.tokensPerSecond, 3);
    }
    const t = (v: number | null, goal: number, text: string) => log(`  ${text.padEnd(44)} ${v === null ? '-' : fmt(v, 3).padStart(7)}  ${v === null ? 'n/a' : passFail(v >= goal)}`);
    log(`\ntargets (${main.c.model.preset} ${main.c.gguf}):`);
    t(summary.decode_vs_llamacpp, TARGET.decodeVsLlama, `decode vs llama.cpp (>= ${TARGET.decodeVsLlama}x)`);
    t(summary.decode_roofline_fraction, TARGET.rooflineFraction, `decode / roofline (>= ${TARGET.rooflineFraction})`);
    t(summary.prefill_vs_llamacpp, TARGET.prefillVsLlama, `prefill vs llama.cpp (>= ${TARGET.prefillVsLlama}x)`);
    t(summary.batch32_vs_single, TARGET.batch32VsSingle, `32-seq aggregate vs single stream (>= ${TARGET.batch32VsSingle}x)`);
    log(`  ${'(its roofline here vs our single stream)'.padEnd(44)} ${fmt(summary.batch32_roofline_vs_single!, 3).padStart(7)}  ${summary.batch32_roofline_vs_single! >= TARGET.batch32VsSingle ? 'the target is within the roofline' : 'the target is beyond the roofline on this machine'}`);
    const chainRatio = summary.batch32_chain_bound_vs_single!;
    log(
      `  ${'(its stage-chain bound vs our single stream)'.padEnd(44)} ${fmt(chainRatio, 3).padStart(7)}  ` +
        (chainRatio >= TARGET.batch32VsSingle
          ? `the target needs ${fmt((100 * TARGET.batch32VsSingle) / chainRatio, 0)}% of the bound at 32 sequences`
          : 'the target is beyond the stage-chain bound on this machine'),
    );
    const rssRatio = ours.memLoaded.rss / (ours.info.weightBytes + ours.info.kvBytes);
    log(`  ${`RSS after load / (weights + KV) (within ${100 * TARGET.rssSlack}%)`.padEnd(44)} ${fmt(rssRatio, 3).padStart(7)}  ${passFail(Math.abs(rssRatio - 1) <= TARGET.rssSlack)}`);
  }
  console.log(JSON.stringify({ ...summary, figures }));
}

await main();
