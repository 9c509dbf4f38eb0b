// The Fastify application: OpenAI routes, health, readiness, metrics, auth and the
// error shape. It does not listen (see server.ts); tests inject or listen on port 0.

import { createHash } from 'node:crypto';
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify';
import type { EngineClient, ModelInfo } from '../engine/protocol.js';
import type { MoeTokenizer } from '../model/tokenizer.js';
import { installAuth } from './auth.js';
import { chatRoute, type RouteContext } from './chat-route.js';
import { completionsRoute } from './completions-route.js';
import { installErrorHandling } from './error-handler.js';
import { Errors } from './errors.js';
import { Lifecycle } from './lifecycle.js';
import { ServerMetrics } from './metrics.js';
import type { MappingContext } from './request-mapping.js';
import { internalRoutes } from './internal-routes.js';
import { systemRoutes } from './system-routes.js';
import { TokenTexts } from './token-text.js';

export interface AppOptions {
  engine: EngineClient;
  /** The served model's tokenizer (loaded on the main thread; the engine never detokenizes). */
  tokenizer: MoeTokenizer;
  /** Accepted bearer keys for /v1; empty: no authentication. */
  apiKeys?: readonly string[];
  bodyLimitBytes?: number;
  allowSpecialTokensInChat?: boolean;
  /** Shared with whoever drains the server (server.ts); a fresh one when absent. */
  lifecycle?: Lifecycle;
  metrics?: ServerMetrics;
  logger?: FastifyServerOptions['logger'];
}

const DEFAULT_BODY_LIMIT = 4 * 1024 * 1024;

/** Content strings of the tokenizer's special tokens, longest first. */
function specialStrings(tok: MoeTokenizer): string[] {
  const out: string[] = [];
  for (let id = 0; id < tok.vocabSize; id++) {
    if (!tok.isSpecialTokenId(id)) continue;
    const s = tok.idToToken(id);
    if (s !== undefined && s !== '') out.push(s);
  }
  return out.sort((a, b) => b.length - a.length);
}

export function buildApp(opts: AppOptions): FastifyInstance {
  const bodyLimit = opts.bodyLimitBytes ?? DEFAULT_BODY_LIMIT;
  const lifecycle = opts.lifecycle ?? new Lifecycle();
  const metrics = opts.metrics ?? new ServerMetrics(() => opts.engine.stats());
  const app = Fastify({
    logger: opts.logger ?? false,
    bodyLimit,
    ajv: { customOptions: { allowUnionTypes: true, coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false } },
  });

  let mapping: MappingContext | null = null;
  let fingerprint = '';
  const created = Math.floor(Date.now() / 1000);
  const specials = specialStrings(opts.tokenizer);
  opts.engine.ready.then(
    (info: ModelInfo) => {
      const eos = [...new Set([...info.eosTokenIds, ...opts.tokenizer.eosTokenIds])];
      const model: ModelInfo = { ...info, eosTokenIds: eos };
      mapping = { tokenizer: opts.tokenizer, model, specialStrings: specials, allowSpecialTokensInChat: opts.allowSpecialTokensInChat ?? false };
      fingerprint = 'fp_' + createHash('sha256').update(`${info.id}|${info.vocabSize}|${info.contextLength}|moe-serve`).digest('hex').slice(0, 10);
      lifecycle.setReady(model);
    },
    (e: Error) => lifecycle.setFailed(e.message),
  );

  installErrorHandling(app, bodyLimit);
  installAuth(app, opts.apiKeys ?? []);
  // Generation and model routes need a loaded model, and take no new work while draining.
  app.addHook('onRequest', async (request) => {
    if (!request.url.startsWith('/v1/')) return;
    if (lifecycle.state === 'draining') throw Errors.draining();
    if (lifecycle.state !== 'ready') throw lifecycle.state === 'failed' ? Errors.engineError(lifecycle.failure ?? 'model failed to load') : Errors.notReady();
  });

  const ctx: RouteContext = {
    deps: { engine: opts.engine, tokenizer: opts.tokenizer, texts: new TokenTexts(opts.tokenizer), metrics, lifecycle },
    mapping: () => {
      if (!mapping) throw Errors.notReady();
      return mapping;
    },
    fingerprint: () => fingerprint,
  };
  systemRoutes(app, lifecycle, metrics, created);
  chatRoute(app, ctx);
  completionsRoute(app, ctx);
  internalRoutes(app, opts.engine);
  return app;
}
