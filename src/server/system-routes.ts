// Liveness, readiness, metrics and the model list.

import type { FastifyInstance } from 'fastify';
import { ApiError, Errors } from './errors.js';
import type { Lifecycle } from './lifecycle.js';
import type { ServerMetrics } from './metrics.js';
import { errorSchema, modelListSchema, modelSchema, statusSchema } from './schemas.js';

export function systemRoutes(app: FastifyInstance, lifecycle: Lifecycle, metrics: ServerMetrics, created: number): void {
  app.get('/health', { schema: { response: { 200: statusSchema } } }, async () => ({ status: 'ok' }));

  app.get('/ready', { schema: { response: { 200: statusSchema, '5xx': errorSchema } } }, async () => {
    switch (lifecycle.state) {
      case 'ready':
        return { status: 'ready' };
      case 'draining':
        throw Errors.draining();
      case 'failed':
        throw new ApiError(503, 'server_error', 'model_load_failed', `The model failed to load: ${lifecycle.failure}`);
      default:
        throw Errors.notReady();
    }
  });

  app.get('/metrics', { schema: { response: { 200: { type: 'string' } } } }, async (_req, reply) => {
    const text = await metrics.render();
    return reply.type(metrics.contentType).send(text);
  });

  const modelCard = () => {
    const m = lifecycle.model;
    if (!m) throw Errors.notReady();
    return { id: m.id, object: 'model', created, owned_by: 'moe-serve', max_model_len: m.contextLength };
  };

  app.get('/v1/models', { schema: { response: { 200: modelListSchema, '4xx': errorSchema, '5xx': errorSchema } } }, async () => ({
    object: 'list',
    data: [modelCard()],
  }));

  app.get<{ Params: { model: string } }>(
    '/v1/models/:model',
    { schema: { params: { type: 'object', properties: { model: { type: 'string' } } }, response: { 200: modelSchema, '4xx': errorSchema, '5xx': errorSchema } } },
    async (request) => {
      const card = modelCard();
      if (request.params.model !== card.id) throw Errors.modelNotFound(request.params.model);
      return card;
    },
  );
}
