// POST /v1/chat/completions: messages through the model's chat template.

import type { FastifyInstance } from 'fastify';
import type { ChoiceRun, Delta, TokenInfo } from './generation.js';
import { checkModel, checkStreamOptions, chatPrompt, choiceSpecs, newRequestId, type ChatBody, type MappingContext } from './request-mapping.js';
import { runGeneration, type Formatter, type GenerationDeps, type Usage } from './respond.js';
import { chatChunkSchema, chatRequestSchema, chatResponseSchema, generationResponses } from './schemas.js';
import { Errors } from './errors.js';

export interface RouteContext {
  deps: GenerationDeps;
  /** The model and tokenizer facts requests are checked against (null while loading). */
  mapping(): MappingContext;
  fingerprint(): string;
}

function chatLogprobs(tokens: TokenInfo[]) {
  return {
    content: tokens.map((t) => ({
      token: t.text,
      logprob: t.logprob,
      bytes: t.bytes,
      top_logprobs: t.top.map((x) => ({ token: x.text, logprob: x.logprob, bytes: x.bytes })),
    })),
    refusal: null,
  };
}

function chatFormatter(id: string, model: string, fingerprint: string, logprobs: boolean, includeUsage: boolean): Formatter {
  const created = Math.floor(Date.now() / 1000);
  const chunk = (choices: object[]) => ({
    id,
    object: 'chat.completion.chunk',
    created,
    model,
    system_fingerprint: fingerprint,
    choices,
    ...(includeUsage ? { usage: null } : {}),
  });
  return {
    startChunk: (run: ChoiceRun) =>
      chunk([{ index: run.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]),
    deltaChunk: (run: ChoiceRun, d: Delta) =>
      d.text === '' && d.tokens.length === 0
        ? null
        : chunk([{ index: run.index, delta: { content: d.text }, logprobs: logprobs ? chatLogprobs(d.tokens) : null, finish_reason: null }]),
    finishChunk: (run: ChoiceRun) => chunk([{ index: run.index, delta: {}, logprobs: null, finish_reason: run.finish }]),
    usageChunk: (usage: Usage) => ({ ...chunk([]), usage }),
    response: (runs: ChoiceRun[], usage: Usage) => ({
      id,
      object: 'chat.completion',
      created,
      model,
      system_fingerprint: fingerprint,
      choices: runs.map((r) => ({
        index: r.index,
        message: { role: 'assistant', content: r.text, refusal: null },
        logprobs: logprobs ? chatLogprobs(r.tokens) : null,
        finish_reason: r.finish,
      })),
      usage,
    }),
  };
}

export function chatRoute(app: FastifyInstance, ctx: RouteContext): void {
  app.post<{ Body: ChatBody }>(
    '/v1/chat/completions',
    { schema: { body: chatRequestSchema, response: generationResponses(chatResponseSchema, chatChunkSchema) } },
    async (request, reply) => {
      const body = request.body;
      const m = ctx.mapping();
      checkModel(body, m.model);
      checkStreamOptions(body);
      if (body.response_format != null && body.response_format.type !== 'text') {
        throw Errors.unsupported(
          'response_format',
          `'response_format' of type ${JSON.stringify(body.response_format.type)} is not supported: the server has no constrained decoding and produces plain text ({"type": "text"}).`,
        );
      }
      if (body.store === true) {
        throw Errors.unsupported('store', "'store' is not supported: the server keeps no record of completions (store: false is accepted).");
      }
      if (body.top_logprobs != null && body.logprobs !== true) {
        throw Errors.invalidValue('top_logprobs', "'top_logprobs' requires 'logprobs' to be true.");
      }
      const prompt = chatPrompt(body, m);
      const id = newRequestId('chatcmpl');
      const logprobs = body.logprobs === true ? (body.top_logprobs ?? 0) : null;
      const specs = choiceSpecs(id, body, [prompt], m.model, logprobs, 'messages');
      const includeUsage = body.stream === true && body.stream_options?.include_usage === true;
      return runGeneration(ctx.deps, request, reply, {
        specs,
        promptTokens: prompt.ids.length,
        stream: body.stream === true,
        includeUsage,
        formatter: chatFormatter(id, m.model.id, ctx.fingerprint(), logprobs !== null, includeUsage),
      });
    },
  );
}
