// llama.cpp (node-llama-cpp's prebuilt CPU binaries) under the engine benchmark's
// workload, on the GGUF export of the same weights: prefill, single-stream decode and
// batched decode (one context with N sequences evaluating in lockstep, so that
// node-llama-cpp puts one token of every sequence into each llama_decode batch).
// Timings cover evaluation only: the model is loaded and the contexts are created before
// the clocks start.

import type { Llama, LlamaContext, LlamaContextSequence, LlamaModel, Token } from 'node-llama-cpp';
import {
  batchPrompt,
  decodeInChunks,
  LONG_PREFILL_CHUNK,
  probeBandwidth,
  procMemory,
  sleep,
  type BatchResult,
  type EngineResult,
  type LongContextResult,
  type ProcMemory,
  type Workload,
} from './engine-bench-common.js';

let llamaPromise: Promise<Llama> | null = null;

/** The llama.cpp instance (CPU only, prebuilt binaries), created once per process. */
export function getLlamaCpp(threads: number): Promise<Llama> {
  if (!llamaPromise) {
    llamaPromise = (async () => {
      const { getLlama, LlamaLogLevel } = await import('node-llama-cpp');
      return getLlama({ gpu: false, build: 'never', maxThreads: threads, logLevel: LlamaLogLevel.error, progressLogs: false });
    })();
  }
  return llamaPromise;
}

export async function disposeLlamaCpp(): Promise<void> {
  if (!llamaPromise) return;
  const l = await llamaPromise.catch(() => null);
  llamaPromise = null;
  await l?.dispose();
}

export interface LlamaCppResult extends EngineResult {
  memLoaded: ProcMemory;
  /** After the model and contexts were disposed (filled in before measureLlamaCpp returns). */
  memReleased: ProcMemory;
}

/** Greedy next token, sampled by llama.cpp itself. */
const NEXT = { generateNext: { token: true, options: { temperature: 0 } } } as const;

export async function measureLlamaCpp(file: string, threads: number, w: Workload, useMmap: boolean | 'auto'): Promise<LlamaCppResult> {
  const llama = await getLlamaCpp(threads);
  const t0 = performance.now();
  const model: LlamaModel = await llama.loadModel({ modelPath: file, gpuLayers: 0, useMmap });
  const loadSeconds = (performance.now() - t0) / 1000;
  const ctxOptions = (sequences: number, contextSize: number, dispatched?: () => void) => ({
    contextSize,
    batchSize: 512,
    sequences,
    threads: { ideal: threads, min: threads },
    flashAttention: false,
    ignoreMemorySafetyChecks: true,
    failedCreationRemedy: false as const,
    // node-llama-cpp's default schedule ("nextCycle"), counted.
    batching: {
      dispatchSchedule: (dispatch: () => void) => {
        dispatched?.();
        setImmediate(dispatch);
      },
    },
  });
  /** Evaluates a prompt on a sequence and returns llama.cpp's greedy next token. */
  const prompt = async (seq: LlamaContextSequence, tokens: number[]): Promise<Token> => {
    const input = tokens.map((t, i) => (i === tokens.length - 1 ? ([t as Token, NEXT] as const) : (t as Token)));
    const res = await seq.controlledEvaluate(input as Parameters<LlamaContextSequence['controlledEvaluate']>[0]);
    const next = res[tokens.length - 1]?.next.token;
    if (next == null) throw new Error('llama.cpp returned no next token');
    return next;
  };
  /** One decode step of every sequence, in lockstep; returns the new tokens. */
  const decodeStep = async (seqs: LlamaContextSequence[], last: Token[]): Promise<Token[]> => {
    const res = await Promise.all(seqs.map((s, i) => s.controlledEvaluate([[last[i], NEXT]])));
    return res.map((r) => {
      const t = r[0]?.next.token;
      if (t == null) throw new Error('llama.cpp returned no next token');
      return t;
    });
  };

  let ctx: LlamaContext | null = null;
  let result: LlamaCppResult;
  try {
    // Prefill and single-stream decode: one sequence.
    const ctxLen = Math.max(w.warmPrompt.length, w.prefillPrompt.length, w.decodePrompt.length + w.decodeWarmSteps + w.decodeSteps) + 64;
    ctx = await model.createContext(ctxOptions(1, ctxLen));
    const seq = ctx.getSequence();
    await prompt(seq, w.warmPrompt);
    const memLoaded = procMemory();
    await sleep(200);
    const bandwidthBefore = probeBandwidth(threads);

    const prefillSeconds: number[] = [];
    for (let r = 0; r < w.prefillReps; r++) {
      await seq.clearHistory();
      const t = performance.now();
      await prompt(seq, w.prefillPrompt);
      prefillSeconds.push((performance.now() - t) / 1000);
    }
    const prefillTotal = prefillSeconds.reduce((a, b) => a + b, 0);

    await seq.clearHistory();
    let last = [await prompt(seq, w.decodePrompt)];
    for (let k = 0; k < w.decodeWarmSteps; k++) last = await decodeStep([seq], last);
    const dec = await decodeInChunks(threads, w.decodeSteps, async (n) => {
      for (let k = 0; k < n; k++) last = await decodeStep([seq], last);
    });
    const decodeSeconds = dec.seconds;
    await ctx.dispose();
    ctx = null;

    // Batched decode: a context of n sequences, each with its own prompt; every step
    // evaluates one token of every sequence.
    const batches: BatchResult[] = [];
    for (const n of w.batchSizes) {
      let dispatches = 0;
      ctx = await model.createContext(ctxOptions(n, w.batchPromptLength + w.batchWarmSteps + w.batchSteps + 16, () => dispatches++));
      const c = ctx;
      const seqs = Array.from({ length: n }, () => c.getSequence());
      let toks = await Promise.all(seqs.map((s, i) => prompt(s, batchPrompt(w, i))));
      for (let k = 0; k < w.batchWarmSteps; k++) toks = await decodeStep(seqs, toks);
      dispatches = 0;
      const t = performance.now();
      for (let k = 0; k < w.batchSteps; k++) toks = await decodeStep(seqs, toks);
      const seconds = (performance.now() - t) / 1000;
      batches.push({ sequences: n, steps: w.batchSteps, seconds, tokensPerSecond: (n * w.batchSteps) / seconds, dispatches });
      await ctx.dispose();
      ctx = null;
    }

    await sleep(200);
    const bandwidthAfter = probeBandwidth(threads);

    // Long context: llama.cpp's faster setting there (flash attention on; F16 KV cache).
    let long: LongContextResult | undefined;
    if (w.longPrompt.length > 0) {
      ctx = await model.createContext({ ...ctxOptions(1, w.longPrompt.length + w.longDecodeSteps + 64), flashAttention: true });
      const seq = ctx.getSequence();
      const t = performance.now();
      let last = [await prompt(seq, w.longPrompt)];
      const prefillSeconds = (performance.now() - t) / 1000;
      const t2 = performance.now();
      for (let k = 0; k < w.longDecodeSteps; k++) last = await decodeStep([seq], last);
      const decodeSeconds = (performance.now() - t2) / 1000;
      long = { context: w.longPrompt.length, prefillSeconds, decodeSteps: w.longDecodeSteps, decodeSeconds, setup: `KV cache F16, flash attention on, batches of ${LONG_PREFILL_CHUNK}` };
      await ctx.dispose();
      ctx = null;
    }
    const notes = [
      `llama.cpp ${llama.llamaCppRelease.release} (${llama.buildType} build), mmap ${model.useMmap}, KV cache F16, flash attention off, threads ${threads}`,
    ];
    for (const b of batches) {
      if (b.dispatches !== b.steps) notes.push(`warning: ${b.sequences}-sequence decode used ${b.dispatches} llama_decode batches for ${b.steps} steps`);
    }
    result = {
      engine: 'llama.cpp',
      loadSeconds,
      prefill: { tokens: w.prefillPrompt.length, seconds: prefillSeconds, tokensPerSecond: (w.prefillPrompt.length * w.prefillReps) / prefillTotal },
      decode: { steps: w.decodeSteps, seconds: decodeSeconds, tokensPerSecond: w.decodeSteps / decodeSeconds, chunks: dec.chunks },
      batches,
      long,
      bandwidthBefore,
      bandwidthAfter,
      bandwidth: (bandwidthBefore + bandwidthAfter) / 2,
      notes,
      memLoaded,
      memReleased: memLoaded,
    };
  } finally {
    await ctx?.dispose();
    await model.dispose();
  }
  result.memReleased = procMemory();
  return result;
}
