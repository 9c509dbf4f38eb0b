// The main thread's side of the engine: starts the worker thread, forwards requests and
// cancellations, routes the worker's events to each request's callback, and keeps the
// latest statistics the worker pushed. No model computation happens here.

import { Worker } from 'node:worker_threads';
import type { WorkerInMessage, WorkerOutMessage } from './engine-worker.js';
import {
  QueueFullError,
  type EngineClient,
  type EngineEvent,
  type EngineOptions,
  type EngineStats,
  type ExpertCacheState,
  type GenerationRequest,
  type ModelInfo,
} from './protocol.js';

/** Milliseconds close() waits for the worker to stop by itself before terminating it. */
const CLOSE_TIMEOUT_MS = 10_000;

/**
 * The worker's entry next to this file: engine-worker.js in the compiled dist/, or
 * engine-worker.ts when running from source under tsx. Node 20 does not apply the
 * inherited `--import=tsx` to a worker's entry file, so from source the worker starts
 * with a one-line bootstrap that registers tsx's loader and then imports the entry.
 */
function workerEntry(): { entry: URL | string; evaluate: boolean } {
  if (!import.meta.url.endsWith('.ts')) return { entry: new URL('./engine-worker.js', import.meta.url), evaluate: false };
  const tsx = import.meta.resolve('tsx/esm/api');
  const worker = new URL('./engine-worker.ts', import.meta.url).href;
  // A script, not a module (no top-level await): eval'd worker code is CommonJS on older Node 20 releases.
  return { entry: `import(${JSON.stringify(tsx)}).then((api) => { api.register(); return import(${JSON.stringify(worker)}); });`, evaluate: true };
}

/** Starts an engine worker; await `ready` before relying on it (requests submitted earlier wait). */
export function startEngine(opts: EngineOptions): EngineClient {
  return new WorkerEngineClient(opts);
}

class WorkerEngineClient implements EngineClient {
  readonly ready: Promise<ModelInfo>;
  private readonly worker: Worker;
  private readonly handlers = new Map<string, { onEvent: (e: EngineEvent) => void; promptTokens: number }>();
  private latest: EngineStats;
  private retryAfterSeconds = 1;
  /** Submit messages posted, and taken in by the worker as of the latest update. */
  private submitted = 0;
  private accepted = 0;
  private settled = false;
  private exited = false;
  private closing: Promise<void> | null = null;
  private readonly exit: Promise<void>;
  private readonly cacheQueries = new Map<number, { resolve: (s: ExpertCacheState | null) => void; reject: (e: Error) => void }>();
  private nextQuery = 0;
  private resolveReady!: (m: ModelInfo) => void;
  private rejectReady!: (e: Error) => void;

  constructor(private readonly opts: EngineOptions) {
    this.latest = { running: 0, waiting: 0, kvBlocksUsed: 0, kvBlocksTotal: opts.kvBlocks, preemptions: 0, steps: 0, promptTokens: 0, generationTokens: 0 };
    this.ready = new Promise<ModelInfo>((resolve, reject) => {
      this.resolveReady = resolve;
      this.rejectReady = reject;
    });
    // Marked handled: a caller that never awaits `ready` must not crash the process on a load error.
    this.ready.catch(() => {});
    const { entry, evaluate } = workerEntry();
    // `node --input-type=module -e ...` would pass --input-type on to the worker, which rejects it.
    const execArgv = process.execArgv.filter((a) => !a.startsWith('--input-type'));
    this.worker = new Worker(entry, { eval: evaluate, execArgv, workerData: opts, name: `moe-serve engine (${opts.modelId})` });
    this.worker.on('message', (m: WorkerOutMessage) => this.onMessage(m));
    this.worker.on('error', (e) => this.onFailure(`the engine worker failed: ${e.message}`));
    this.exit = new Promise((resolve) => {
      this.worker.once('exit', (code) => {
        this.exited = true;
        if (this.closing) this.failAll('abort', undefined);
        else this.onFailure(`the engine worker exited (code ${code})`);
        resolve();
      });
    });
  }

  submit(req: GenerationRequest, onEvent: (e: EngineEvent) => void): void {
    if (this.closing || this.exited) throw new Error('the engine is closed');
    if (this.handlers.has(req.id)) throw new Error(`request ${req.id} is already in the engine`);
    // Requests posted but not yet taken in count as waiting: the estimate never undercounts new arrivals.
    const waiting = this.latest.waiting + (this.submitted - this.accepted);
    if (waiting >= this.opts.maxWaiting) throw new QueueFullError(waiting, this.retryAfterSeconds);
    this.handlers.set(req.id, { onEvent, promptTokens: req.promptTokens.length });
    this.submitted++;
    this.post({ type: 'submit', req });
  }

  cancel(requestId: string): void {
    if (this.handlers.has(requestId) && !this.exited) this.post({ type: 'cancel', requestId });
  }

  stats(): EngineStats {
    return { ...this.latest };
  }

  /** Asks the worker for the expert cache's state (answered between steps); null when it does not offload experts. */
  expertCache(): Promise<ExpertCacheState | null> {
    if (this.closing || this.exited) return Promise.reject(new Error('the engine is closed'));
    if (!this.opts.offload) return Promise.resolve(null);
    const queryId = this.nextQuery++;
    return new Promise((resolve, reject) => {
      this.cacheQueries.set(queryId, { resolve, reject });
      this.post({ type: 'expert-cache', queryId });
    });
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      if (!this.exited) {
        if (this.settled) {
          this.post({ type: 'close' });
        } else {
          // Still loading: nothing to abort in the worker.
          void this.worker.terminate();
        }
        const timer = setTimeout(() => void this.worker.terminate(), CLOSE_TIMEOUT_MS);
        await this.exit;
        clearTimeout(timer);
      }
      this.failAll('abort', undefined);
    })();
    return this.closing;
  }

  private post(m: WorkerInMessage): void {
    this.worker.postMessage(m);
  }

  private onMessage(m: WorkerOutMessage): void {
    switch (m.type) {
      case 'ready':
        this.settled = true;
        this.resolveReady(m.model);
        break;
      case 'load-error':
        this.onFailure(`loading the model failed: ${m.message}`);
        break;
      case 'update':
        // Statistics first: a callback that reads stats() sees the state after its event.
        this.latest = m.stats;
        this.accepted = m.accepted;
        this.retryAfterSeconds = m.retryAfterSeconds;
        for (const e of m.events) this.dispatch(e);
        break;
      case 'expert-cache': {
        const q = this.cacheQueries.get(m.queryId);
        this.cacheQueries.delete(m.queryId);
        if (q) {
          if (m.error !== undefined) q.reject(new Error(m.error));
          else q.resolve(m.state);
        }
        break;
      }
      case 'closed':
        break;
    }
  }

  private dispatch(e: EngineEvent): void {
    const handler = this.handlers.get(e.requestId);
    if (!handler) return;
    if (e.type === 'finished') this.handlers.delete(e.requestId);
    handler.onEvent(e);
  }

  /** The worker is gone or unusable: `ready` rejects if pending, live requests fail. */
  private onFailure(message: string): void {
    if (!this.settled) {
      this.settled = true;
      this.rejectReady(new Error(message));
      if (!this.exited) void this.worker.terminate();
    }
    this.failAll('error', message);
  }

  private failAll(reason: 'error' | 'abort', error: string | undefined): void {
    for (const q of this.cacheQueries.values()) q.reject(new Error(error ?? 'the engine is closed'));
    this.cacheQueries.clear();
    for (const [requestId, h] of [...this.handlers]) {
      this.dispatch({
        type: 'finished',
        requestId,
        reason,
        promptTokens: h.promptTokens,
        completionTokens: 0,
        queueMs: 0,
        ...(error !== undefined ? { error } : {}),
      });
    }
  }
}
