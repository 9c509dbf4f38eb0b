// Our native engine under the engine benchmark's workload: prefill, single-stream decode
// and batched decode, through the runner contract the server uses (NativeRunner.step).

import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { loadSettings } from '../../src/config.js';
import { NativeRunner, type KvCacheType, type WeightFormat } from '../../src/engine/native-runner.js';
import type { StepSequence } from '../../src/engine/runner.js';
import {
  argmaxBelow,
  batchPrompt,
  decodeChunks,
  decodeInChunks,
  probeBandwidth,
  procMemory,
  type BatchResult,
  LONG_PREFILL_CHUNK,
  type EngineResult,
  type LongContextResult,
  type ProcMemory,
  type Workload,
} from './engine-bench-common.js';

export const KV_BLOCK_SIZE = 16;
/**
 * Our KV cache type and how it was chosen: the server's setting (kvCacheType, default f16
 * as llama.cpp's cache, which the bench compares with), MOE_SERVE_KV_CACHE_TYPE=f32 as for
 * the server. Throws the setting's error on a bad value (bench/engine.ts checks it first).
 */
export function oursKvCache(): { type: KvCacheType; setup: string } {
  const env = process.env.MOE_SERVE_KV_CACHE_TYPE;
  const type = loadSettings({ env: env ? { MOE_SERVE_KV_CACHE_TYPE: env } : {} }).kvCacheType;
  return { type, setup: `KV cache ${type} (${env ? 'MOE_SERVE_KV_CACHE_TYPE' : "the server's default"})` };
}

/** Hands out disjoint ranges of KV block ids, one per sequence. */
class BlockRanges {
  next = 0;
  take(positions: number): Int32Array {
    const n = Math.ceil(positions / KV_BLOCK_SIZE);
    const r = Int32Array.from({ length: n }, (_, i) => this.next + i);
    this.next += n;
    return r;
  }
}

/** Steps of the largest batch, interleaved with the single-stream decode: an equal share after each of its chunks. */
function interleavedSteps(w: Workload): { rounds: number; perRound: number } {
  const rounds = decodeChunks(w.decodeSteps);
  return { rounds, perRound: Math.ceil(w.batchSteps / rounds) };
}

/** KV blocks the workload needs: every sequence gets its own range. */
export function blocksNeeded(w: Workload): number {
  const b = new BlockRanges();
  b.take(w.warmPrompt.length);
  for (let r = 0; r < w.prefillReps; r++) b.take(w.prefillPrompt.length);
  b.take(w.decodePrompt.length + w.decodeWarmSteps + w.decodeSteps);
  const { rounds, perRound } = interleavedSteps(w);
  const steps = Math.max(w.batchSteps, rounds * perRound);
  for (const n of w.batchSizes) for (let i = 0; i < n; i++) b.take(w.batchPromptLength + w.batchWarmSteps + steps);
  if (w.longPrompt.length > 0) b.take(w.longPrompt.length + w.longDecodeSteps);
  return b.next;
}

/** A sequence in flight: its blocks, next position and last token. */
interface Seq {
  id: number;
  blocks: Int32Array;
  pos: number;
  last: number;
}

export interface OursResult extends EngineResult {
  info: { weightBytes: number; kvBytes: number; expertBytes: number; isa: string; threads: number; weights: string };
  memBefore: ProcMemory;
  memLoaded: ProcMemory;
  memAfter: ProcMemory;
  /** After the runner was closed (filled in by measureOurs before it returns). */
  memReleased: ProcMemory;
  /**
   * The engine's phase profile (milliseconds per phase, summed) over the single-stream
   * decode steps and over the largest batch's steps, with the step counts; all zeros
   * unless MOE_SERVE_PROFILE=1 (measureOursInChild sets it).
   */
  profile: { single: Record<string, number>; singleSteps: number; batch: Record<string, number>; batchSteps: number; sequences: number };
}

export async function measureOurs(dir: string, weights: WeightFormat, threads: number, w: Workload): Promise<OursResult> {
  const memBefore = procMemory();
  const kvBlocks = blocksNeeded(w);
  const kv = oursKvCache();
  const t0 = performance.now();
  // Each step's logits are read at once (greedy choice), as the server's engine loop does: one reused buffer.
  const runner = await NativeRunner.open(dir, { weights, threads, kvBlockSize: KV_BLOCK_SIZE, kvBlocks, kvCacheType: kv.type, reuseLogits: true });
  const loadSeconds = (performance.now() - t0) / 1000;
  let result: OursResult;
  try {
    const memLoaded = procMemory();
    const info = runner.engine.info();
    const V = runner.spec.vocabSize;
    const ranges = new BlockRanges();
    let nextId = 1;
    const newSeq = (positions: number): Seq => ({ id: nextId++, blocks: ranges.take(positions), pos: 0, last: 0 });
    const entry = (s: Seq, tokens: number[], wantLogits = true): StepSequence => ({
      seqId: s.id,
      tokens: Uint32Array.from(tokens),
      startPos: s.pos,
      blockTable: s.blocks.subarray(0, Math.ceil((s.pos + tokens.length) / KV_BLOCK_SIZE)),
      wantLogits,
    });
    /** One step over the sequences (prompts or one token each); advances them to their greedy next tokens. */
    const step = (seqs: Seq[], tokens: number[][]): void => {
      const out = runner.step(seqs.map((s, i) => entry(s, tokens[i])));
      seqs.forEach((s, i) => {
        s.pos += tokens[i].length;
        s.last = argmaxBelow(out.logits, i, V, w.tokenLimit);
      });
    };
    const decodeSteps = (seqs: Seq[], n: number): number => {
      const t = performance.now();
      for (let k = 0; k < n; k++) step(seqs, seqs.map((s) => [s.last]));
      return (performance.now() - t) / 1000;
    };

    // Warm-up: one prefill of a different prompt (it also touches every expert).
    step([newSeq(w.warmPrompt.length)], [w.warmPrompt]);

    const bandwidthBefore = probeBandwidth(threads);

    // Prefill: one step of the whole prompt from position 0, each repetition a fresh sequence.
    const prefillSeconds: number[] = [];
    for (let r = 0; r < w.prefillReps; r++) {
      const s = newSeq(w.prefillPrompt.length);
      const t = performance.now();
      step([s], [w.prefillPrompt]);
      prefillSeconds.push((performance.now() - t) / 1000);
    }
    const prefillTotal = prefillSeconds.reduce((a, b) => a + b, 0);

    // Batched decode: all sequences' prompts in one step, then one token per sequence per
    // step. The largest batch runs interleaved with the single-stream decode below (a few
    // steps after each of its chunks), so that the ratio of the two compares them under
    // the same memory bandwidth, which here switches between two levels within seconds.
    const batchSeqs = (n: number, steps: number) => {
      const seqs = Array.from({ length: n }, () => newSeq(w.batchPromptLength + w.batchWarmSteps + steps));
      step(seqs, seqs.map((_, i) => batchPrompt(w, i)));
      decodeSteps(seqs, w.batchWarmSteps);
      return seqs;
    };
    const batches: BatchResult[] = [];
    const sizes = [...w.batchSizes].sort((a, b) => a - b);
    const interleaved = sizes[sizes.length - 1];
    for (const n of sizes.slice(0, -1)) {
      const seconds = decodeSteps(batchSeqs(n, w.batchSteps), w.batchSteps);
      batches.push({ sequences: n, steps: w.batchSteps, seconds, tokensPerSecond: (n * w.batchSteps) / seconds });
    }
    const { rounds, perRound } = interleavedSteps(w);
    const big = batchSeqs(interleaved, perRound * rounds);
    let bigSeconds = 0;
    let bigSteps = 0;
    // The phase profile of the measured steps alone: whatever ran before is dropped.
    const profile = { single: {} as Record<string, number>, singleSteps: 0, batch: {} as Record<string, number>, batchSteps: 0, sequences: interleaved };
    const profiled = (into: Record<string, number>, run: () => void) => {
      runner.engine.takeProfile();
      run();
      for (const [k, v] of Object.entries(runner.engine.takeProfile())) into[k] = (into[k] ?? 0) + v;
    };
    const runBig = () => {
      profiled(profile.batch, () => {
        bigSeconds += decodeSteps(big, perRound);
      });
      bigSteps += perRound;
    };

    // Single-stream decode, in chunks with probes between them (and the big batch after each).
    const single = newSeq(w.decodePrompt.length + w.decodeWarmSteps + w.decodeSteps);
    step([single], [w.decodePrompt]);
    decodeSteps([single], w.decodeWarmSteps);
    const dec = await decodeInChunks(
      threads,
      w.decodeSteps,
      (n) => {
        profiled(profile.single, () => decodeSteps([single], n));
        profile.singleSteps += n;
      },
      runBig,
    );
    runBig(); // the last round's share (decodeInChunks calls `between` only between chunks)
    const decodeSeconds = dec.seconds;
    batches.push({ sequences: interleaved, steps: bigSteps, seconds: bigSeconds, tokensPerSecond: (interleaved * bigSteps) / bigSeconds });

    profile.batchSteps = bigSteps;
    const bandwidthAfter = probeBandwidth(threads);
    const memAfter = procMemory();

    // Long context (after the figures above and the memory reading): the prompt in steps
    // of LONG_PREFILL_CHUNK tokens, then single-stream decode over it.
    let long: LongContextResult | undefined;
    if (w.longPrompt.length > 0) {
      const s = newSeq(w.longPrompt.length + w.longDecodeSteps);
      const t = performance.now();
      for (let i = 0; i < w.longPrompt.length; i += LONG_PREFILL_CHUNK) step([s], [w.longPrompt.slice(i, i + LONG_PREFILL_CHUNK)]);
      const prefillSeconds = (performance.now() - t) / 1000;
      const decodeSeconds = decodeSteps([s], w.longDecodeSteps);
      long = { context: w.longPrompt.length, prefillSeconds, decodeSteps: w.longDecodeSteps, decodeSeconds, setup: kv.setup };
    }
    result = {
      engine: 'ours',
      loadSeconds,
      prefill: { tokens: w.prefillPrompt.length, seconds: prefillSeconds, tokensPerSecond: (w.prefillPrompt.length * w.prefillReps) / prefillTotal },
      decode: { steps: w.decodeSteps, seconds: decodeSeconds, tokensPerSecond: w.decodeSteps / decodeSeconds, chunks: dec.chunks },
      batches,
      long,
      bandwidthBefore,
      bandwidthAfter,
      bandwidth: (bandwidthBefore + bandwidthAfter) / 2,
      notes: [`isa ${info.isa}, ${info.threads} threads, ${kv.setup}, ${kvBlocks} blocks of ${KV_BLOCK_SIZE}`],
      info,
      memBefore,
      memLoaded,
      memAfter,
      memReleased: memAfter,
      profile,
    };
  } finally {
    runner.close();
  }
  result.memReleased = procMemory();
  return result;
}

export type OursChildReply = { ok: true; result: OursResult } | { ok: false; error: string };

/**
 * measureOurs in a child process (engine-bench-ours-child.ts): the child's resident memory
 * is that of a fresh process holding only our engine, and everything it allocated is
 * gone when it exits, before llama.cpp is loaded in this process.
 */
export function measureOursInChild(dir: string, weights: WeightFormat, threads: number, workload: Workload): Promise<OursResult> {
  const child = fork(fileURLToPath(new URL('./engine-bench-ours-child.ts', import.meta.url)), [], {
    execArgv: ['--import=tsx'],
    // The engine's phase profile (a clock reading per phase and layer: microseconds per step).
    env: { ...process.env, MOE_SERVE_PROFILE: '1' },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  return new Promise<OursResult>((resolve, reject) => {
    let reply: OursChildReply | null = null;
    child.once('message', (m: OursChildReply) => {
      reply = m;
    });
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      if (reply?.ok) resolve(reply.result);
      else reject(new Error(reply ? `our engine's measurement failed: ${reply.error}` : `the measuring process exited (code ${code}, signal ${signal}) without a result`));
    });
    child.send({ dir, weights, threads, workload });
  });
}
