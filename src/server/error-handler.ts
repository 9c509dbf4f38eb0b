// Every failure → an ApiError → {error: {message, type, param, code}}: schema
// violations (param names the field), body parsing, unknown routes (404) and methods
// (405), and anything unexpected (500, logged).

import type { FastifyError, FastifyInstance } from 'fastify';
import { ApiError, Errors } from './errors.js';

interface AjvError {
  keyword: string;
  instancePath: string;
  params: Record<string, unknown>;
  message?: string;
}

/** '/messages/0/content' → 'messages[0].content'. */
export function paramPath(instancePath: string, extra?: string): string {
  const parts = instancePath.split('/').filter((p) => p !== '');
  if (extra !== undefined) parts.push(extra);
  let out = '';
  for (const p of parts) {
    const key = p.replace(/~1/g, '/').replace(/~0/g, '~');
    out += /^\d+$/.test(key) ? `[${key}]` : out === '' ? key : `.${key}`;
  }
  return out;
}

/**
 * Fields of OpenAI's request bodies that this server knows and does not implement, by name
 * (at any depth): a request that sets one gets unsupported_parameter and the reason, not
 * "Unrecognized request argument" as for a misspelt field. (Fields implemented, or accepted
 * where they change nothing, such as best_of, an empty suffix or store: false, are in the
 * schemas and checked in the routes.)
 */
const UNSUPPORTED_FIELDS: Record<string, string> = {
  tools: 'the server has no function calling (it generates plain text)',
  tool_choice: 'the server has no function calling (it generates plain text)',
  parallel_tool_calls: 'the server has no function calling (it generates plain text)',
  functions: 'the server has no function calling (it generates plain text)',
  function_call: 'the server has no function calling (it generates plain text)',
  tool_calls: 'the server has no function calling (it generates plain text), so no message carries tool calls',
  tool_call_id: 'the server has no function calling (it generates plain text), so no message answers a tool call',
  audio: 'the model reads and writes text only',
  modalities: 'the model reads and writes text only',
  image_url: 'the model reads text only',
  input_audio: 'the model reads text only',
  file: 'the model reads text only',
  prediction: 'the server has no predicted outputs',
  reasoning_effort: 'the served model has no reasoning mode',
  web_search_options: 'the server has no web search',
  service_tier: 'the server has a single service tier',
};

function fromValidation(e: AjvError): ApiError {
  const param = paramPath(e.instancePath);
  const name = param === '' ? 'the request body' : `'${param}'`;
  switch (e.keyword) {
    case 'additionalProperties': {
      const field = String(e.params.additionalProperty);
      const path = paramPath(e.instancePath, field);
      const why = Object.hasOwn(UNSUPPORTED_FIELDS, field) ? UNSUPPORTED_FIELDS[field] : undefined;
      return why === undefined ? Errors.unknownParam(path) : Errors.unsupported(path, `'${path}' is not supported: ${why}.`);
    }
    case 'required':
      return Errors.missingParam(paramPath(e.instancePath, String(e.params.missingProperty)));
    case 'type': {
      const want = String(e.params.type).split(',').join(' or ');
      return Errors.invalidType(param || null, `Invalid type for ${name}: expected ${want}.`);
    }
    case 'enum':
      return Errors.invalidValue(param || null, `Invalid value for ${name}: must be one of ${(e.params.allowedValues as unknown[]).map(String).join(', ')}.`);
    default:
      return Errors.invalidValue(param || null, `Invalid value for ${name}: ${e.message ?? 'not allowed'}.`);
  }
}

export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  const fe = err as FastifyError & { validation?: AjvError[] };
  if (Array.isArray(fe.validation) && fe.validation.length > 0) return fromValidation(fe.validation[0]);
  switch (fe.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new ApiError(413, 'invalid_request_error', 'request_too_large', 'The request body is too large.');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return Errors.unsupportedMediaType('unsupported');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return Errors.emptyBody();
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return Errors.invalidValue(null, 'The Content-Length header does not match the body.');
  }
  const status = typeof fe.statusCode === 'number' ? fe.statusCode : 500;
  if (status >= 400 && status < 500) return new ApiError(status, 'invalid_request_error', fe.code ?? null, fe.message);
  return Errors.internal(fe.message ?? String(err));
}

/** Installs the error handler, the JSON body parser (strict UTF-8) and the 404/405 handler. */
export function installErrorHandling(app: FastifyInstance, bodyLimit: number): void {
  const routes = new Map<string, Set<string>>();
  app.addHook('onRoute', (r) => {
    const methods = Array.isArray(r.method) ? r.method : [r.method];
    const set = routes.get(r.url) ?? new Set<string>();
    for (const m of methods) set.add(m);
    routes.set(r.url, set);
  });

  const utf8 = new TextDecoder('utf-8', { fatal: true });
  app.removeContentTypeParser(['application/json']);
  app.addContentTypeParser('application/json', { parseAs: 'buffer', bodyLimit }, (_req, body, done) => {
    const buf = body as Buffer;
    if (buf.length === 0) return done(Errors.emptyBody(), undefined);
    let text: string;
    try {
      text = utf8.decode(buf);
    } catch {
      return done(Errors.invalidUtf8(), undefined);
    }
    try {
      done(null, JSON.parse(text));
    } catch (e) {
      done(Errors.invalidJson((e as Error).message), undefined);
    }
  });

  app.setErrorHandler((err, request, reply) => {
    let api = toApiError(err);
    if ((err as FastifyError).code === 'FST_ERR_CTP_BODY_TOO_LARGE') api = Errors.bodyTooLarge(bodyLimit);
    if ((err as FastifyError).code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') api = Errors.unsupportedMediaType(String(request.headers['content-type'] ?? ''));
    // 503 is the server saying no on purpose (draining, not ready): worth a line, not a stack.
    if (api.statusCode === 503) request.log.info({ code: api.toBody().error.code }, 'request refused');
    else if (api.statusCode >= 500) request.log.error({ err }, 'request failed');
    return reply.code(api.statusCode).headers(api.headers).send(api.toBody());
  });

  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0];
    const allowed = routes.get(path);
    const api = allowed && allowed.size > 0 ? Errors.methodNotAllowed(request.method, path, [...allowed].sort()) : Errors.routeNotFound(request.method, path);
    return reply.code(api.statusCode).headers(api.headers).send(api.toBody());
  });
}
