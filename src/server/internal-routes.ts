// Internal inspection routes under /v1/internal (bearer auth and readiness as for every
// /v1 route): the expert cache's state, asked from the engine worker between steps.

import type { FastifyInstance } from 'fastify';
import type { EngineClient } from '../engine/protocol.js';
import { Errors } from './errors.js';
import { errorSchema } from './schemas.js';

export function internalRoutes(app: FastifyInstance, engine: EngineClient): void {
  app.get('/v1/internal/experts', { schema: { response: { '4xx': errorSchema, '5xx': errorSchema } } }, async (_req, reply) => {
    if (!engine.expertCache) throw Errors.offloadDisabled();
    let state;
    try {
      state = await engine.expertCache();
    } catch (e) {
      throw Errors.engineError(e instanceof Error ? e.message : String(e));
    }
    if (state === null) throw Errors.offloadDisabled();
    return reply.header('cache-control', 'no-store').send({ object: 'expert_cache', ...state });
  });
}
