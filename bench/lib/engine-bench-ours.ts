// Our native engine under the engine benchmark's workload: prefill, single-stream decode
// and batched decode, through the runner contract the server uses (NativeRunner.step).

import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { NativeRunner, type WeightFormat } from '../../src/engine/native-runner.js';
import type { StepSequence } from '../../src/engine/runner.js';
import {
  argmaxBelow,
  batchPrompt,
  probeBandwidth,
  procMemory,
  type BatchResult,
  type EngineResult,
  type ProcMemory,
  type Workload,
} from './engine-bench-common.js';

export const KV_BLOCK_SIZE = 16;

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

/** KV blocks the workload needs: every sequence gets its own range. */
export function blocksNeeded(w: Workload): number {
  const b = new BlockRanges();
  b.take(w.warmPrompt.length);
  for (let r = 0; r < w.prefillReps; r++) b.take(w.prefillPrompt.length);
  b.take(w.decodePrompt.length + w.decodeWarmSteps + w.decodeSteps);
  for (const n of w.batchSizes) for (let i = 0; i < n; i++) b.take(w.batchPromptLength + w.batchWarmSteps + w.batchSteps);
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
}

export async function measureOurs(dir: string, weights: WeightFormat, threads: number, w: Workload): Promise<OursResult> {
  const memBefore = procMemory();
  const kvBlocks = blocksNeeded(w);
  const t0 = performance.now();
  // Each step's logits are read at once (greedy choice), as the server's engine loop does: one reused buffer.
  const runner = await NativeRunner.open(dir, { weights, threads, kvBlockSize: KV_BLOCK_SIZE, kvBlocks, reuseLogits: true });
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

    // Single-stream decode.
    const single = newSeq(w.decodePrompt.length + w.decodeWarmSteps + w.decodeSteps);
    step([single], [w.decodePrompt]);
    decodeSteps([single], w.decodeWarmSteps);
    const decodeSeconds = decodeSteps([single], w.decodeSteps);

    // Batched decode: all sequences' prompts in one step, then one token per sequence per step.
    const batches: BatchResult[] = [];
    for (const n of w.batchSizes) {
      const seqs = Array.from({ length: n }, () => newSeq(w.batchPromptLength + w.batchWarmSteps + w.batchSteps));
      step(seqs, seqs.map((_, i) => batchPrompt(w, i)));
      decodeSteps(seqs, w.batchWarmSteps);
      const seconds = decodeSteps(seqs, w.batchSteps);
      batches.push({ sequences: n, steps: w.batchSteps, seconds, tokensPerSecond: (n * w.batchSteps) / seconds });
    }

    const bandwidthAfter = probeBandwidth(threads);
    const memAfter = procMemory();
    result = {
      engine: 'ours',
      loadSeconds,
      prefill: { tokens: w.prefillPrompt.length, seconds: prefillSeconds, tokensPerSecond: (w.prefillPrompt.length * w.prefillReps) / prefillTotal },
      decode: { steps: w.decodeSteps, seconds: decodeSeconds, tokensPerSecond: w.decodeSteps / decodeSeconds },
      batches,
      bandwidthBefore,
      bandwidthAfter,
      bandwidth: (bandwidthBefore + bandwidthAfter) / 2,
      notes: [`isa ${info.isa}, ${info.threads} threads, KV cache float32 (${kvBlocks} blocks of ${KV_BLOCK_SIZE})`],
      info,
      memBefore,
      memLoaded,
      memAfter,
      memReleased: memAfter,
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
