// Runs one API request's generation and answers it: one JSON body, or an SSE stream of
// chunks. The route supplies the formatter (chat or completions shapes). A client that
// goes away cancels its engine requests at once.

import type { FastifyReply, FastifyRequest } from 'fastify';
import type { EngineClient } from '../engine/protocol.js';
import type { MoeTokenizer } from '../model/tokenizer.js';
import { ApiError, Errors } from './errors.js';
import { Generation, type ChoiceRun, type ChoiceSpec, type Delta } from './generation.js';
import type { Lifecycle } from './lifecycle.js';
import type { ServerMetrics } from './metrics.js';
import { SseWriter } from './sse.js';
import type { TokenTexts } from './token-text.js';

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface Formatter {
  /** Chunks sent first, per choice (chat: the role; completions with echo: the prompt). */
  startChunk(run: ChoiceRun): object | null;
  deltaChunk(run: ChoiceRun, d: Delta): object | null;
  finishChunk(run: ChoiceRun): object;
  usageChunk(usage: Usage): object;
  response(runs: ChoiceRun[], usage: Usage): object;
}

export interface GenerationDeps {
  engine: EngineClient;
  tokenizer: MoeTokenizer;
  texts: TokenTexts;
  metrics: ServerMetrics;
  lifecycle: Lifecycle;
}

export interface RunOptions {
  specs: ChoiceSpec[];
  /** Prompt tokens of the request: each distinct prompt once, however many choices share it. */
  promptTokens: number;
  stream: boolean;
  includeUsage: boolean;
  formatter: Formatter;
}

function usageOf(runs: ChoiceRun[], promptTokens: number): Usage {
  const completion = runs.reduce((s, r) => s + r.completionTokens, 0);
  return { prompt_tokens: promptTokens, completion_tokens: completion, total_tokens: promptTokens + completion };
}

/** Connection closed before the response was complete. */
function onClientGone(request: FastifyRequest, reply: FastifyReply, fn: () => void): void {
  const check = () => {
    if (!reply.raw.writableFinished) fn();
  };
  reply.raw.once('close', check);
  request.raw.once('close', () => {
    if (request.raw.socket?.destroyed) check();
  });
}

function failure(gen: Generation): ApiError | null {
  const err = gen.runs.find((r) => r.finish === 'error');
  if (err) return Errors.engineError(err.error ?? 'unknown error');
  if (gen.cancelledBy === 'server') return Errors.draining();
  if (gen.runs.some((r) => r.finish === 'abort')) return Errors.engineError('the request was aborted by the engine');
  return null;
}

export async function runGeneration(deps: GenerationDeps, request: FastifyRequest, reply: FastifyReply, o: RunOptions): Promise<unknown> {
  if (deps.lifecycle.state === 'draining') throw Errors.draining();
  const f = o.formatter;
  let sse: SseWriter | null = null;
  const gen = new Generation(deps.engine, o.specs, deps.tokenizer, deps.texts, deps.metrics, {
    onDelta(run, d) {
      if (!sse) return;
      const c = f.deltaChunk(run, d);
      if (c) sse.send(c);
    },
    onFinish(run) {
      if (sse && (run.finish === 'stop' || run.finish === 'length')) sse.send(f.finishChunk(run));
    },
  });
  gen.start(); // throws 429 / 500 before anything is sent
  deps.lifecycle.track(gen);
  onClientGone(request, reply, () => gen.cancel('client'));

  if (!o.stream) {
    await gen.done;
    // Nobody is listening; the status only shows in the request log (nginx's "client closed request").
    if (gen.cancelledBy === 'client') return reply.code(499).send(new ApiError(499, 'invalid_request_error', 'client_closed', 'client closed the connection').toBody());
    const err = failure(gen);
    if (err) throw err;
    return f.response(gen.runs, usageOf(gen.runs, o.promptTokens));
  }

  reply.hijack();
  sse = new SseWriter(reply.raw);
  for (const run of gen.runs) {
    const c = f.startChunk(run);
    if (c) sse.send(c);
  }
  await gen.done;
  const err = failure(gen);
  if (err) {
    // As vLLM does: an error frame in the OpenAI shape, then [DONE].
    sse.send(err.toBody());
    sse.done();
    return reply;
  }
  if (o.includeUsage) sse.send(f.usageChunk(usageOf(gen.runs, o.promptTokens)));
  sse.done();
  return reply;
}
