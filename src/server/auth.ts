// Bearer-key authentication of the /v1 routes (health, readiness and metrics stay open
// for probes and scrapers). Keys are compared by their SHA-256 in constant time.

import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import { Errors } from './errors.js';

const digest = (s: string) => createHash('sha256').update(s).digest();

export function installAuth(app: FastifyInstance, keys: readonly string[]): void {
  if (keys.length === 0) return;
  const digests = keys.map(digest);
  app.addHook('onRequest', async (request) => {
    if (!request.url.startsWith('/v1/') && request.url !== '/v1') return;
    const header = request.headers.authorization;
    if (header === undefined || header === '') throw Errors.missingApiKey();
    const m = /^Bearer\s+(.+)$/i.exec(header);
    if (!m) throw Errors.wrongApiKey();
    const d = digest(m[1].trim());
    let ok = false;
    for (const k of digests) ok = timingSafeEqual(k, d) || ok;
    if (!ok) throw Errors.wrongApiKey();
  });
}
