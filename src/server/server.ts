// Runs the server process: resolves the model, starts the engine worker, listens, and
// on SIGTERM/SIGINT drains (readiness 503, new requests 503, in-flight ones finish
// within the grace period) before closing the engine.

import { basename, resolve } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { ensureDemoModel } from '../cli/demo-cmd.js';
import { parsePrefetchMinProbability, type ServeSettings } from '../config.js';
import { startEngine } from '../engine/engine-client.js';
import type { EngineClient, EngineOptions } from '../engine/protocol.js';
import { MoeTokenizer } from '../model/tokenizer.js';
import { parseSplit, splitText } from '../offload/capacity.js';
import { buildApp } from './app.js';
import { Lifecycle } from './lifecycle.js';

export const DEMO_MODEL_ID = 'moe-serve-demo';

export interface RunningServer {
  app: FastifyInstance;
  engine: EngineClient;
  lifecycle: Lifecycle;
  /** http://host:port */
  url: string;
  /** Drains and closes; resolves to the process exit code. */
  shutdown(reason: string): Promise<number>;
  /** Resolves with the exit code once the server has shut down. */
  closed: Promise<number>;
}

export function engineOptions(s: Readonly<ServeSettings>, modelDir: string, modelId: string): EngineOptions {
  return {
    modelDir,
    modelId,
    runner: s.runner,
    weights: s.weights,
    threads: s.threads === 0 ? undefined : s.threads,
    kvBlockSize: s.kvBlockSize,
    kvBlocks: s.kvBlocks,
    kvCacheType: s.kvCacheType,
    maxBatchTokens: s.maxBatchTokens,
    maxRunning: s.maxRunning,
    maxWaiting: s.maxWaiting,
    policy: s.policy,
    policyOptions: {
      maxExtraWaitSteps: s.policyMaxExtraWaitSteps,
      ...(s.policyMaxExtraWaitMs > 0 ? { maxExtraWaitMs: s.policyMaxExtraWaitMs } : {}),
      ...(s.policyMaxGapFactor > 0 ? { maxGapFactor: s.policyMaxGapFactor } : {}),
      missPenalty: s.policyMissPenalty,
    },
    ...(s.prefillFirst ? { prefillFirst: true } : {}),
    ...(s.offloadCapacity !== ''
      ? {
          offload: {
            capacity: s.offloadCapacity,
            ...(parseSplit(s.offloadSplit).kind !== 'equal' ? { split: s.offloadSplit } : {}),
            policy: s.offloadPolicy,
            lookahead: s.offloadLookahead,
            prefetchMinProbability: parsePrefetchMinProbability(s.offloadPrefetchMinProbability),
            planSteps: s.offloadPlanSteps,
            ioThreads: s.offloadIoThreads,
            ...(s.offloadDir !== '' ? { dir: s.offloadDir } : {}),
          },
        }
      : {}),
    ...(s.offloadReplayTrace !== '' ? { replayTrace: resolve(s.offloadReplayTrace) } : {}),
  };
}

/** Starts everything; `log` gets the human start-up lines (stderr in the CLI). */
export async function startServer(s: Readonly<ServeSettings>, log: (line: string) => void, opts: { handleSignals?: boolean } = {}): Promise<RunningServer> {
  const t0 = performance.now();
  const secs = () => ((performance.now() - t0) / 1000).toFixed(2);
  let modelDir: string;
  let modelId: string;
  if (s.demo) {
    modelDir = ensureDemoModel((m) => log(m.trimEnd()));
    modelId = s.modelId !== '' ? s.modelId : DEMO_MODEL_ID;
  } else {
    modelDir = resolve(s.model);
    modelId = s.modelId !== '' ? s.modelId : basename(modelDir);
  }
  log(`loading tokenizer from ${modelDir}`);
  const tokenizer = await MoeTokenizer.load(modelDir);
  log(`starting the engine (runner ${s.runner}${s.runner === 'native' ? `, weights ${s.weights}` : ''}, ${s.kvBlocks} KV blocks of ${s.kvBlockSize} tokens${s.runner === 'native' ? ` (${s.kvCacheType})` : ''}, up to ${s.maxRunning} running / ${s.maxWaiting} waiting)`);
  if (s.offloadCapacity !== '') {
    const split = parseSplit(s.offloadSplit);
    log(`expert offloading: capacity ${s.offloadCapacity} split across layers ${split.kind === 'equal' ? 'equally' : `by the weights ${splitText(split)}`}, policy ${s.offloadPolicy}, lookahead ${s.offloadLookahead}, prefetch threshold ${s.offloadPrefetchMinProbability}, plan steps ${s.offloadPlanSteps}, ${s.offloadIoThreads} I/O threads, expert file in ${s.offloadDir || 'the OS temporary directory'}`);
  }
  if (s.offloadReplayTrace !== '') log(`routing replay from ${s.offloadReplayTrace}`);
  const engine = startEngine(engineOptions(s, modelDir, modelId));
  const lifecycle = new Lifecycle();
  const app = buildApp({
    engine,
    tokenizer,
    lifecycle,
    apiKeys: s.apiKeys,
    bodyLimitBytes: s.bodyLimitBytes,
    allowSpecialTokensInChat: s.allowSpecialTokensInChat,
    logger: s.logLevel === 'silent' ? false : { level: s.logLevel },
  });
  let address: string;
  try {
    address = await app.listen({ host: s.host, port: s.port });
  } catch (e) {
    await engine.close();
    throw new Error(`cannot listen on ${s.host}:${s.port}: ${(e as Error).message}`);
  }
  log(`listening on ${address} (/health is up; /ready answers 503 until the model is loaded)`);

  let resolveClosed!: (code: number) => void;
  const closed = new Promise<number>((r) => (resolveClosed = r));
  let shuttingDown: Promise<number> | null = null;
  const shutdown = (reason: string): Promise<number> => {
    shuttingDown ??= (async () => {
      const inflight = lifecycle.inflightCount;
      log(`${reason}: draining (${inflight} request(s) in flight, grace ${s.drainGraceSeconds} s)`);
      const { cancelled } = await lifecycle.drain(s.drainGraceSeconds * 1000);
      if (cancelled > 0) log(`grace period over: cancelled ${cancelled} request(s)`);
      await app.close();
      await engine.close();
      log('stopped');
      resolveClosed(0);
      return 0;
    })();
    return shuttingDown;
  };
  if (opts.handleSignals ?? true) {
    for (const sig of ['SIGTERM', 'SIGINT'] as const) process.once(sig, () => void shutdown(sig));
  }

  try {
    const info = await engine.ready;
    log(`model ${info.id} loaded in ${secs()} s (context ${info.contextLength} tokens, vocabulary ${info.vocabSize})`);
    if (s.offloadCapacity !== '' && s.offloadLookahead > 0 && engine.expertCache) {
      // Informational: the threshold the engine measured (or was given); never a reason not to start.
      const st = await engine.expertCache().then((c) => c?.stats, () => undefined);
      if (st?.prefetchMinProbability !== undefined) {
        log(
          `expert offloading: prefetch threshold ${st.prefetchMinProbability.toFixed(2)}` +
            (st.readSlowdown != null ? ` (measured: the compute runs at x${(1 - st.readSlowdown).toFixed(2)} of its speed while the slow tier reads)` : ''),
        );
      }
    }
    log(`ready: serving ${info.id} at ${address}/v1`);
  } catch (e) {
    log(`the model failed to load: ${(e as Error).message}`);
    await app.close();
    await engine.close();
    throw e;
  }
  return { app, engine, lifecycle, url: address, shutdown, closed };
}
