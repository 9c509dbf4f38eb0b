// One generation request of the API = one engine request per choice (n × prompts).
// A ChoiceRun turns one engine request's events into released text: incremental UTF-8
// decoding, stop strings held back and cut, logprobs released with their text, usage
// counted, metrics observed. A Generation submits all its choices (all or none) and
// cancels what is still running when the client goes away.

import { QueueFullError, type EngineClient, type EngineEvent, type GeneratedToken, type GenerationRequest } from '../engine/protocol.js';
import type { IncrementalDecoder, MoeTokenizer } from '../model/tokenizer.js';
import { ApiError, Errors } from './errors.js';
import type { ServerMetrics } from './metrics.js';
import { StopMatcher } from './stop-matcher.js';
import type { TokenTexts } from './token-text.js';

export interface TokenInfo {
  text: string;
  bytes: number[];
  logprob: number;
  top: { text: string; bytes: number[]; logprob: number }[];
  /** Character offset of the token's text in the choice's text. */
  offset: number;
}

/** A piece of a choice's output, released together. */
export interface Delta {
  text: string;
  /** Logprobs of the tokens whose text is (now completely) released; empty without logprobs. */
  tokens: TokenInfo[];
}

export type ChoiceFinish = 'stop' | 'length' | 'abort' | 'error';

export interface ChoiceSpec {
  /** Choice index in the response. */
  index: number;
  request: GenerationRequest;
  stop: readonly string[];
}

export class ChoiceRun {
  readonly index: number;
  readonly request: GenerationRequest;
  text = '';
  tokens: TokenInfo[] = [];
  completionTokens = 0;
  finish: ChoiceFinish | null = null;
  error: string | undefined;
  private readonly decoder: IncrementalDecoder;
  private readonly stop: StopMatcher;
  private pendingTokens: TokenInfo[] = [];
  private decodedLength = 0;
  private submittedAt = 0;
  private lastTokenAt = 0;

  constructor(
    spec: ChoiceSpec,
    tokenizer: MoeTokenizer,
    private readonly texts: TokenTexts,
    private readonly metrics: ServerMetrics,
    private readonly onDelta: (run: ChoiceRun, d: Delta) => void,
    private readonly onFinish: (run: ChoiceRun) => void,
    /** Asks the engine to stop this request (a stop string was found). */
    private readonly cancel: (run: ChoiceRun) => void,
  ) {
    this.index = spec.index;
    this.request = spec.request;
    this.decoder = tokenizer.incrementalDecoder({ skipSpecialTokens: true });
    this.stop = new StopMatcher(spec.stop);
  }

  markSubmitted(): void {
    this.submittedAt = performance.now();
  }

  handle(e: EngineEvent): void {
    if (e.type === 'finished') this.metrics.queueTime.observe(e.queueMs / 1000);
    if (this.finish !== null) return;
    if (e.type === 'tokens') {
      this.onTokens(e.tokens);
      return;
    }
    if (e.reason === 'stop' || e.reason === 'length') {
      const tail = this.stop.push(this.decoder.flush());
      let text = tail.text;
      if (!tail.stopped) text += this.stop.flush();
      // The engine counts what it generated, including a stop token id it does not emit.
      this.completionTokens = Math.max(this.completionTokens, e.completionTokens);
      this.end(tail.stopped ? 'stop' : e.reason, text);
    } else {
      this.error = e.error;
      this.end(e.reason, '');
    }
  }

  private onTokens(tokens: GeneratedToken[]): void {
    const now = performance.now();
    if (this.lastTokenAt === 0) {
      this.metrics.ttft.observe((now - this.submittedAt) / 1000);
    } else {
      const gap = (now - this.lastTokenAt) / 1000 / tokens.length;
      for (let i = 0; i < tokens.length; i++) this.metrics.interTokenLatency.observe(gap);
    }
    this.lastTokenAt = now;
    let released = '';
    for (const t of tokens) {
      this.completionTokens++;
      this.metrics.generationTokens.inc();
      const piece = this.decoder.push(t.id);
      if (this.request.logprobs !== null) this.pendingTokens.push(this.tokenInfo(t));
      this.decodedLength += piece.length;
      const r = this.stop.push(piece);
      released += r.text;
      if (r.stopped) {
        this.cancel(this);
        this.end('stop', released);
        return;
      }
    }
    if (released === '' && (this.stop.holding || this.pendingTokens.length === 0)) return;
    this.emit(released, !this.stop.holding);
  }

  private tokenInfo(t: GeneratedToken): TokenInfo {
    const own = this.texts.get(t.id);
    return {
      text: own.text,
      bytes: own.bytes,
      logprob: t.logprob ?? 0,
      top: (t.top ?? []).map((x) => {
        const tt = this.texts.get(x.id);
        return { text: tt.text, bytes: tt.bytes, logprob: x.logprob };
      }),
      offset: this.decodedLength,
    };
  }

  private emit(text: string, releaseTokens: boolean): void {
    let tokens: TokenInfo[] = [];
    if (releaseTokens) {
      tokens = this.pendingTokens;
      this.pendingTokens = [];
    }
    this.text += text;
    this.tokens.push(...tokens);
    this.onDelta(this, { text, tokens });
  }

  private end(reason: ChoiceFinish, text: string): void {
    if (text !== '' || this.pendingTokens.length > 0) this.emit(text, true);
    this.finish = reason;
    this.metrics.requestSuccess.inc({ finished_reason: reason });
    this.metrics.e2eLatency.observe((performance.now() - this.submittedAt) / 1000);
    this.onFinish(this);
  }
}

export interface GenerationHooks {
  onDelta(run: ChoiceRun, d: Delta): void;
  onFinish(run: ChoiceRun): void;
}

/** All choices of one API request. `done` resolves when every choice has finished. */
export class Generation {
  readonly runs: ChoiceRun[];
  readonly done: Promise<void>;
  private remaining: number;
  private resolveDone!: () => void;
  /** Why the server cancelled the choices, if it did. */
  cancelledBy: 'client' | 'server' | null = null;

  constructor(
    private readonly engine: EngineClient,
    specs: ChoiceSpec[],
    tokenizer: MoeTokenizer,
    texts: TokenTexts,
    private readonly metrics: ServerMetrics,
    hooks: GenerationHooks,
  ) {
    this.remaining = specs.length;
    this.done = new Promise((r) => (this.resolveDone = r));
    const onFinish = (run: ChoiceRun) => {
      hooks.onFinish(run);
      if (--this.remaining === 0) this.resolveDone();
    };
    this.runs = specs.map((s) => new ChoiceRun(s, tokenizer, texts, metrics, hooks.onDelta, onFinish, (run) => this.engine.cancel(run.request.id)));
  }

  /** Submits every choice; on a full queue cancels the ones already queued and throws a 429 ApiError. */
  start(): void {
    const submitted: ChoiceRun[] = [];
    try {
      for (const run of this.runs) {
        run.markSubmitted();
        this.engine.submit(run.request, (e) => run.handle(e));
        submitted.push(run);
      }
    } catch (e) {
      for (const run of submitted) {
        run.finish = 'abort';
        this.engine.cancel(run.request.id);
      }
      if (e instanceof QueueFullError) {
        this.metrics.requestRejected.inc({ reason: 'queue_full' });
        throw Errors.queueFull(e.retryAfterSeconds);
      }
      if (e instanceof ApiError) throw e;
      throw Errors.engineError((e as Error).message);
    }
    for (const run of this.runs) this.metrics.promptTokens.inc(run.request.promptTokens.length);
  }

  /** Cancels every unfinished choice at once (the client went away or the server is draining). */
  cancel(by: 'client' | 'server'): void {
    if (this.cancelledBy !== null || this.finished) return;
    this.cancelledBy = by;
    for (const run of this.runs) if (run.finish === null) this.engine.cancel(run.request.id);
  }

  get finished(): boolean {
    return this.remaining === 0;
  }
}
