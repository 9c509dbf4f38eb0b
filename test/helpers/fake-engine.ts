// A scripted EngineClient for the few server behaviours the real engine cannot be made
// to show deterministically (an engine failure in the middle of a stream, a model that
// fails to load). Every other server test runs against the real engine.

import type { EngineClient, EngineEvent, EngineStats, GenerationRequest, ModelInfo } from '../../src/engine/protocol.js';

export interface FakeScript {
  /** Token ids sent (one batch each) before the end. */
  tokens: number[];
  /** How the request ends. */
  end: { reason: 'stop' | 'length' | 'error'; error?: string };
}

export class FakeEngine implements EngineClient {
  readonly ready: Promise<ModelInfo>;
  readonly cancelled: string[] = [];

  constructor(
    info: ModelInfo | Error,
    private readonly script: (req: GenerationRequest) => FakeScript,
  ) {
    this.ready = info instanceof Error ? Promise.reject(info) : Promise.resolve(info);
    this.ready.catch(() => {});
  }

  submit(req: GenerationRequest, onEvent: (e: EngineEvent) => void): void {
    const s = this.script(req);
    let i = 0;
    const next = () => {
      if (this.cancelled.includes(req.id)) {
        onEvent({ type: 'finished', requestId: req.id, reason: 'abort', promptTokens: req.promptTokens.length, completionTokens: i, queueMs: 0 });
        return;
      }
      if (i < s.tokens.length) {
        onEvent({ type: 'tokens', requestId: req.id, tokens: [{ id: s.tokens[i++] }] });
        setImmediate(next);
        return;
      }
      onEvent({ type: 'finished', requestId: req.id, reason: s.end.reason, promptTokens: req.promptTokens.length, completionTokens: i, queueMs: 1, error: s.end.error });
    };
    setImmediate(next);
  }

  cancel(id: string): void {
    this.cancelled.push(id);
  }

  stats(): EngineStats {
    return { running: 0, waiting: 0, kvBlocksUsed: 0, kvBlocksTotal: 1, preemptions: 0, steps: 0, promptTokens: 0, generationTokens: 0 };
  }

  async close(): Promise<void> {}
}
