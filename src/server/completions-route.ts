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

/**
 * best_of: of each prompt's `perPrompt` completions (choice indices p × perPrompt + j), the
 * `n` with the highest mean log probability per token, best first (ties: the lower index),
 * as choices p × n + j. A completion of no tokens ranks last.
 */
export function selectBestOf(runs: readonly ChoiceRun[], perPrompt: number, n: number): { run: ChoiceRun; index: number }[] {
  const mean = (r: ChoiceRun) => (r.tokens.length === 0 ? -Infinity : r.tokens.reduce((s, t) => s + t.logprob, 0) / r.tokens.length);
  const byPrompt = new Map<number, ChoiceRun[]>();
  for (const r of runs) {
    const p = Math.floor(r.index / perPrompt);
    let list = byPrompt.get(p);
    if (!list) byPrompt.set(p, (list = []));
    list.push(r);
  }
  const out: { run: ChoiceRun; index: number }[] = [];
  for (const p of [...byPrompt.keys()].sort((a, b) => a - b)) {
    const ranked = byPrompt
      .get(p)!
      .map((run) => ({ run, m: mean(run) }))
      .sort((a, b) => (b.m === a.m ? a.run.index - b.run.index : b.m > a.m ? 1 : -1));
    ranked.slice(0, n).forEach((x, j) => out.push({ run: x.run, index: p * n + j }));
  }
  return out;
}

function completionFormatter(
  id: string,
  model: string,
  fingerprint: string,
  logprobs: boolean,
  includeUsage: boolean,
  /** The echoed prompt text of each choice ('' without echo). */
  echoOf: (run: ChoiceRun) => string,
  /** The choices of the response and their indices (all runs as they are, or best_of's pick). */
  choose: (runs: ChoiceRun[]) => { run: ChoiceRun; index: number }[] = (runs) => runs.map((run) => ({ run, index: run.index })),
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
      choices: choose(runs).map(({ run: r, index }) => ({
        index,
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
      const bestOf = body.best_of ?? n;
      if (bestOf > n && body.stream === true) {
        throw Errors.invalidValue('best_of', "'best_of' above 'n' cannot be streamed: the best completions are known only when all have finished.");
      }
      if (body.suffix != null && body.suffix !== '') {
        throw Errors.unsupported('suffix', "'suffix' is not supported: the server has no fill-in-the-middle mode.");
      }
      const prompts: Prompt[] = completionPrompts(body, m);
      const id = newRequestId('cmpl');
      // best_of ranks completions by their tokens' log probabilities: they are computed
      // (logprobs 0: the chosen token's alone) even when the response does not show them.
      const specs = choiceSpecs(id, body, prompts, m.model, bestOf > n ? (body.logprobs ?? 0) : (body.logprobs ?? null), 'prompt', bestOf);
      const includeUsage = body.stream === true && body.stream_options?.include_usage === true;
      const echo = body.echo === true;
      return runGeneration(ctx.deps, request, reply, {
        specs,
        promptTokens: prompts.reduce((s, p) => s + p.ids.length, 0),
        stream: body.stream === true,
        includeUsage,
        formatter: completionFormatter(
          id,
          m.model.id,
          ctx.fingerprint(),
          body.logprobs != null,
          includeUsage,
          (run) => (echo ? prompts[Math.floor(run.index / bestOf)].text : ''),
          bestOf > n ? (runs) => selectBestOf(runs, bestOf, n) : undefined,
        ),
      });
    },
  );
}
