// The engine worker thread's entry: loads the model, builds the runner and drives the
// step loop. The main thread talks to it only through plain-object messages; model
// computation never runs on the main thread. Between steps the thread returns to its
// event loop (setImmediate) so that submissions and cancellations are taken in.

import { availableParallelism } from 'node:os';
import { NativeRunner } from './native-runner.js';
import { OffloadRunner } from '../offload/offload-runner.js';
import { RoutingReplay } from '../offload/replay.js';
import { storedFormat } from './weight-format.js';
import { parentPort, workerData } from 'node:worker_threads';
import { openModel, type OpenedModel } from '../model/checkpoint.js';
import { ReferenceModel } from '../model/reference.js';
import { EngineLoop } from './engine-loop.js';
import {
  QueueFullError,
  type EngineEvent,
  type EngineOptions,
  type EngineStats,
  type ExpertCacheState,
  type GenerationRequest,
  type ModelInfo,
} from './protocol.js';
import { ReferenceRunner, type ModelRunner } from './runner.js';

/** Main thread → worker. */
export type WorkerInMessage =
  | { type: 'submit'; req: GenerationRequest }
  | { type: 'cancel'; requestId: string }
  | { type: 'expert-cache'; queryId: number }
  | { type: 'close' };

/** Worker → main thread. */
export type WorkerOutMessage =
  | { type: 'ready'; model: ModelInfo }
  | { type: 'load-error'; message: string }
  | {
      type: 'update';
      /** In the order they happened. */
      events: EngineEvent[];
      stats: EngineStats;
      /** Submit messages taken in so far: the main thread counts the ones still in flight as waiting. */
      accepted: number;
      retryAfterSeconds: number;
    }
  | { type: 'expert-cache'; queryId: number; state: ExpertCacheState | null; error?: string }
  | { type: 'closed' };

async function buildRunner(opts: EngineOptions, m: OpenedModel): Promise<ModelRunner> {
  const kv = { blockSize: opts.kvBlockSize, numBlocks: opts.kvBlocks };
  switch (opts.runner) {
    case 'reference':
      if (opts.offload || opts.replayTrace) throw new Error('expert offloading and routing replay need the native runner');
      return new ReferenceRunner(
        ReferenceModel.fromSource(m.spec, (name) => m.weights.float32(name)),
        kv,
      );
    case 'native': {
      const replay = opts.replayTrace ? await RoutingReplay.load(opts.replayTrace, { layers: m.spec.numLayers, experts: m.spec.numExperts }) : undefined;
      const base = {
        weights: opts.weights === undefined || opts.weights === 'auto' ? storedFormat(m) : opts.weights,
        threads: opts.threads ?? availableParallelism(),
        kvBlockSize: opts.kvBlockSize,
        kvBlocks: opts.kvBlocks,
        kvCacheType: opts.kvCacheType,
        replay,
        // The engine loop samples from a step's logits before the next step runs.
        reuseLogits: true,
      };
      if (!opts.offload) return NativeRunner.fromCheckpoint(m.spec, m.weights, base);
      return OffloadRunner.fromCheckpoint(m.spec, m.weights, { ...base, ...opts.offload });
    }
    default:
      throw new Error(`unknown runner "${String(opts.runner)}"; runners: reference, native`);
  }
}

async function main(): Promise<void> {
  const port = parentPort;
  if (!port) throw new Error('engine-worker.ts is a worker_threads entry, not a program');
  const post = (m: WorkerOutMessage) => port.postMessage(m);
  const opts = workerData as EngineOptions;

  let model: OpenedModel | null = null;
  let runner: ModelRunner;
  try {
    model = await openModel(opts.modelDir);
    runner = await buildRunner(opts, model);
  } catch (e) {
    model?.close();
    post({ type: 'load-error', message: e instanceof Error ? e.message : String(e) });
    port.close();
    return;
  }
  const opened = model;
  const tok = opened.tokenizer;

  let events: EngineEvent[] = [];
  let accepted = 0;
  let stepping = false;
  let closed = false;
  const loop = new EngineLoop(
    runner,
    {
      kvBlockSize: opts.kvBlockSize,
      kvBlocks: opts.kvBlocks,
      maxBatchTokens: opts.maxBatchTokens,
      maxRunning: opts.maxRunning,
      maxWaiting: opts.maxWaiting,
      policy: opts.policy,
      policyOptions: opts.policyOptions,
      prefillFirst: opts.prefillFirst,
      vocabLimit: tok.vocabSize,
      contextLength: opened.spec.maxPositionEmbeddings,
    },
    (e) => events.push(e),
  );

  /** The scheduler's snapshot plus the runner's expert-offloading counters. */
  const engineStats = (): EngineStats => {
    const st = loop.stats();
    if (!runner.offloadStats) return st;
    try {
      return { ...st, offload: runner.offloadStats() };
    } catch {
      return st;
    }
  };
  const flush = () => {
    const batch = events;
    events = [];
    post({ type: 'update', events: batch, stats: engineStats(), accepted, retryAfterSeconds: loop.retryAfterSeconds() });
  };
  const tick = () => {
    stepping = false;
    if (closed) return;
    const worked = loop.step();
    flush();
    kick(worked);
  };
  /** Steps again at once after work; after an empty step, shortly (never a hot spin). */
  const kick = (now = true) => {
    if (!stepping && !closed && loop.hasWork()) {
      stepping = true;
      if (now) setImmediate(tick);
      else setTimeout(tick, 1);
    }
  };

  const onMessage = (m: WorkerInMessage) => {
    if (closed) return;
    switch (m.type) {
      case 'submit':
        accepted++;
        try {
          loop.submit(m.req);
        } catch (e) {
          // The main thread checks the bound first; this is a preemption refilling the
          // queue in between, or a duplicate id.
          const error = e instanceof QueueFullError ? `${e.message}; retry after ${e.retryAfterSeconds} s` : e instanceof Error ? e.message : String(e);
          events.push({ type: 'finished', requestId: m.req.id, reason: 'error', promptTokens: m.req.promptTokens.length, completionTokens: 0, queueMs: 0, error });
        }
        break;
      case 'cancel':
        loop.cancel(m.requestId);
        break;
      case 'expert-cache':
        // Between steps: the cache is not changing while this runs.
        try {
          post({ type: 'expert-cache', queryId: m.queryId, state: runner.expertCacheState ? runner.expertCacheState() : null });
        } catch (e) {
          post({ type: 'expert-cache', queryId: m.queryId, state: null, error: e instanceof Error ? e.message : String(e) });
        }
        return;
      case 'close':
        closed = true;
        loop.abortAll();
        flush();
        runner.close();
        opened.close();
        post({ type: 'closed' });
        port.close();
        return;
    }
    flush();
    kick();
  };

  port.on('message', onMessage);
  post({
    type: 'ready',
    model: {
      id: opts.modelId,
      contextLength: opened.spec.maxPositionEmbeddings,
      vocabSize: tok.vocabSize,
      eosTokenIds: [...new Set([...opened.spec.eosTokenIds, ...tok.eosTokenIds])],
    },
  });
  flush();
}

void main();
