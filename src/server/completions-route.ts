// POST /v1/completions: raw prompts (strings or token ids), optional echo.

import type { FastifyInstance } from 'fastify';
import type { RouteContext } from './chat-route.js';
import { Errors } from './errors.js';
import type { ChoiceRun, Delta, TokenInfo } from './generation.js';
import { checkModel, checkStreamOptions, choiceSpecs, completionPrompts, newRequestId, type CompletionBody, type Prompt } from './request-mapping.js';
import { runGeneration, type Formatter, type Usage } from './respond.js';
import { completionRequestSchema, completionResponseSchema, generationResponses } from './schemas.js';

function completionLogprobs(tokens: TokenInfo[], offsetBase: number) {
  return {
    tokens: tokens.map((t) => t.text),
    token_logprobs: tokens.map((t) => t.logprob),
    top_logprobs: tokens.map((t) => Object.fromEntries(t.top.map((x) => [x.text, x.logprob]))),
    text_offset: tokens.map((t) => offsetBase + t.offset),
  };
}

function completionFormatter(
  id: string,
  model: string,
  fingerprint: string,
  logprobs: boolean,
  includeUsage: boolean,
  /** The echoed prompt text of each choice ('' without echo). */
  echoOf: (run: ChoiceRun) => string,
): Formatter {
  const created = Math.floor(Date.now() / 1000);
  const chunk = (index: number, text: string, lp: object | null, finish: string | null) => ({
    id,
    object: 'text_completion',
    created,
    model,
    system_fingerprint: fingerprint,
    choices: [{ index, text, logprobs: lp, finish_reason: finish }],
    ...(includeUsage ? { usage: null } : {}),
  });
  return {
    startChunk: (run: ChoiceRun) => {
      const echo = echoOf(run);
      return echo === '' ? null : chunk(run.index, echo, null, null);
    },
    deltaChunk: (run: ChoiceRun, d: Delta) =>
      d.text === '' && d.tokens.length === 0
        ? null
        : chunk(run.index, d.text, logprobs ? completionLogprobs(d.tokens, echoOf(run).length) : null, null),
    finishChunk: (run: ChoiceRun) => chunk(run.index, '', null, run.finish),
    usageChunk: (usage: Usage) => ({
      id,
      object: 'text_completion',
      created,
      model,
      system_fingerprint: fingerprint,
      choices: [],
      usage,
    }),
    response: (runs: ChoiceRun[], usage: Usage) => ({
      id,
      object: 'text_completion',
      created,
      model,
      system_fingerprint: fingerprint,
      choices: runs.map((r) => ({
        index: r.index,
        text: echoOf(r) + r.text,
        logprobs: logprobs ? completionLogprobs(r.tokens, echoOf(r).length) : null,
        finish_reason: r.finish,
      })),
      usage,
    }),
  };
}

export function completionsRoute(app: FastifyInstance, ctx: RouteContext): void {
  app.post<{ Body: CompletionBody }>(
    '/v1/completions',
    { schema: { body: completionRequestSchema, response: generationResponses(completionResponseSchema, completionResponseSchema) } },
    async (request, reply) => {
      const body = request.body;
      const m = ctx.mapping();
      checkModel(body, m.model);
      checkStreamOptions(body);
      if (body.echo === true && body.logprobs != null) {
        throw Errors.unsupported('echo', "'echo' together with 'logprobs' is not supported: the engine does not compute prompt logprobs.");
      }
      const n = body.n ?? 1;
      if (body.best_of != null && body.best_of < n) {
        throw Errors.invalidValue('best_of', `'best_of' (${body.best_of}) must be at least 'n' (${n}).`);
      }
      if (body.best_of != null && body.best_of > n) {
        throw Errors.unsupported('best_of', `'best_of' above 'n' is not supported: the server returns every completion it generates; ask for them with 'n' (best_of equal to n is accepted).`);
      }
      if (body.suffix != null && body.suffix !== '') {
        throw Errors.unsupported('suffix', "'suffix' is not supported: the server has no fill-in-the-middle mode.");
      }
      const prompts: Prompt[] = completionPrompts(body, m);
      const id = newRequestId('cmpl');
      const specs = choiceSpecs(id, body, prompts, m.model, body.logprobs ?? null, 'prompt');
      const includeUsage = body.stream === true && body.stream_options?.include_usage === true;
      const echo = body.echo === true;
      return runGeneration(ctx.deps, request, reply, {
        specs,
        promptTokens: prompts.reduce((s, p) => s + p.ids.length, 0),
        stream: body.stream === true,
        includeUsage,
        formatter: completionFormatter(id, m.model.id, ctx.fingerprint(), body.logprobs != null, includeUsage, (run) =>
          echo ? prompts[Math.floor(run.index / n)].text : '',
        ),
      });
    },
  );
}
