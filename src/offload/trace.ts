// Streaming reader of `moe-trace v1` routing traces (../shared/traces/FORMAT.md).
//
// Files can be hundreds of MB with thousands of requests, so the text is read line by
// line from a stream and never held whole; each request is yielded as soon as its last
// row has been read, in a compact form (one Uint16Array of expert ids per token).
// Every line is validated and errors name the line: a trace that is quietly wrong
// gives policy figures that are quietly wrong.
//
// Conventions enforced beyond FORMAT.md, because streaming needs them:
// - The rows of one request are contiguous (a request id may not reappear later).
// - Within a request, positions start anywhere >= 0 and go up by exactly 1; within a
//   position, layers strictly increase. A position may skip layers: llama.cpp, for one,
//   runs the last layer only for the prompt tokens whose logits it needs, so real
//   prefill traces lack the last layer's rows for earlier prompt tokens. A skipped
//   (token, layer) has no routing (NO_EXPERT) and needs no expert.
// - Prefill rows come before decode rows.

import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';

/** Marks a (token, layer) without routing in TraceToken.experts. */
export const NO_EXPERT = 0xffff;

export interface TraceHeader {
  /** Model name from the `model=` field ('' when absent). */
  model: string;
  layers: number;
  experts: number;
  topK: number;
  /** Everything after `source=`, spaces included ('' when absent). */
  source: string;
}

export interface TraceToken {
  position: number;
  phase: 'prefill' | 'decode';
  /** (layer, k) expert ids in router rank order; NO_EXPERT × k where the layer was skipped. */
  experts: Uint16Array;
  /** (layer, k) gate weights, only with `keepWeights`; NaN where not recorded. */
  weights?: Float32Array;
}

export interface TraceRequest {
  id: number;
  /** Tokens in position order: prefill rows first, then decode. */
  tokens: TraceToken[];
  /** Tokens whose rows are `prefill`. */
  prefillTokens: number;
}

export class TraceFormatError extends Error {
  constructor(
    readonly source: string,
    readonly line: number,
    message: string,
  ) {
    super(`${source}:${line}: ${message}`);
    this.name = 'TraceFormatError';
  }
}

export interface ReadTraceOptions {
  /** Keep the gate weights (more memory); validated either way. */
  keepWeights?: boolean;
  /** Name used in error messages when reading a stream (default 'trace'). */
  name?: string;
}

const COLUMNS = 'request,phase,position,layer,experts,weights';
const INT = /^\d+$/;

/** Parses the shape comment (`# model=NAME layers=L experts=E top_k=K source=TEXT`). */
export function parseHeaderLine(text: string, fail: (msg: string) => never): TraceHeader {
  const body = text.replace(/^#\s*/, '');
  // source= runs to the end of the line (it may hold spaces); other fields are tokens.
  const srcAt = body.search(/(^|\s)source=/);
  const source = srcAt < 0 ? '' : body.slice(body.indexOf('source=', srcAt) + 'source='.length).trim();
  const fields = new Map<string, string>();
  for (const tok of (srcAt < 0 ? body : body.slice(0, srcAt)).split(/\s+/).filter(Boolean)) {
    const eq = tok.indexOf('=');
    if (eq <= 0) fail(`header field ${JSON.stringify(tok)} is not key=value`);
    fields.set(tok.slice(0, eq), tok.slice(eq + 1));
  }
  const int = (key: string, max: number): number => {
    const v = fields.get(key);
    if (v === undefined) fail(`header lacks ${key}= (expected "# model=NAME layers=L experts=E top_k=K source=TEXT")`);
    const n = Number(v);
    if (!INT.test(v) || n < 1 || n > max) fail(`header ${key}=${v} must be an integer in [1, ${max}]`);
    return n;
  };
  const layers = int('layers', 100_000);
  const experts = int('experts', NO_EXPERT - 1);
  const topK = int('top_k', experts);
  return { model: fields.get('model') ?? '', layers, experts, topK, source };
}

/**
 * Reads a trace file (path) or stream, yielding the header first through `onHeader`
 * and then each request when complete. Throws TraceFormatError on the first bad line.
 */
export async function* readTrace(
  input: string | Readable,
  onHeader: (h: TraceHeader) => void = () => {},
  opts: ReadTraceOptions = {},
): AsyncGenerator<TraceRequest> {
  const name = typeof input === 'string' ? input : (opts.name ?? 'trace');
  const stream = typeof input === 'string' ? createReadStream(input, { encoding: 'utf8', highWaterMark: 1 << 20 }) : input;
  const lines = createInterface({ input: stream, crlfDelay: Infinity });
  let lineNo = 0;
  const fail = (msg: string): never => {
    throw new TraceFormatError(name, lineNo, msg);
  };

  let header: TraceHeader | null = null;
  let sawColumns = false;
  let cur: TraceRequest | null = null;
  let curTok: TraceToken | null = null;
  let lastLayer = -1;
  const done = new Set<number>();
  const seenAt = new Uint32Array(NO_EXPERT); // duplicate check: row stamp per expert id
  let stamp = 0;

  try {
    for await (const raw of lines) {
      lineNo++;
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (lineNo === 1) {
        if (line.trim() !== '# moe-trace v1') fail(`not a moe-trace v1 file: first line must be "# moe-trace v1", got ${JSON.stringify(line.slice(0, 60))}`);
        continue;
      }
      if (lineNo === 2) {
        if (!line.startsWith('#')) fail('second line must be the shape comment "# model=NAME layers=L experts=E top_k=K source=TEXT"');
        header = parseHeaderLine(line, fail);
        onHeader(header);
        continue;
      }
      if (line.startsWith('#') || line.trim() === '') continue;
      const h = header!;
      if (!sawColumns) {
        if (line.trim() !== COLUMNS) fail(`expected the column line "${COLUMNS}", got ${JSON.stringify(line.slice(0, 80))}`);
        sawColumns = true;
        continue;
      }

      const f = line.split(',');
      if (f.length !== 6) fail(`expected 6 comma-separated fields (${COLUMNS}), got ${f.length}`);
      const [reqS, phase, posS, layerS, expS, wS] = f;
      if (!INT.test(reqS)) fail(`request ${JSON.stringify(reqS)} is not a non-negative integer`);
      if (phase !== 'prefill' && phase !== 'decode') fail(`phase ${JSON.stringify(phase)} must be prefill or decode`);
      if (!INT.test(posS)) fail(`position ${JSON.stringify(posS)} is not a non-negative integer`);
      if (!INT.test(layerS)) fail(`layer ${JSON.stringify(layerS)} is not a non-negative integer`);
      const req = Number(reqS);
      const pos = Number(posS);
      const layer = Number(layerS);
      if (!Number.isSafeInteger(req) || !Number.isSafeInteger(pos)) fail('request or position too large');
      if (layer >= h.layers) fail(`layer ${layer} out of range: the header says layers=${h.layers}`);

      const ids = expS.trim().split(/\s+/);
      if (ids.length !== h.topK || expS.trim() === '') fail(`expected top_k=${h.topK} experts, got ${expS.trim() === '' ? 0 : ids.length} (${JSON.stringify(expS)})`);
      const w = wS.trim() === '' ? null : wS.trim().split(/\s+/);
      if (w && w.length !== h.topK) fail(`expected ${h.topK} weights or none, got ${w.length}`);

      // Request / position / layer order.
      if (cur === null || req !== cur.id) {
        if (cur) {
          done.add(cur.id);
          yield cur;
        }
        if (done.has(req)) fail(`request ${req} reappears after other requests: the rows of one request must be contiguous`);
        cur = { id: req, tokens: [], prefillTokens: 0 };
        curTok = null;
      }
      if (curTok === null || pos !== curTok.position) {
        if (curTok && pos !== curTok.position + 1) {
          fail(`request ${req}: position ${pos} follows position ${curTok.position} (positions must go up by 1)`);
        }
        if (curTok && curTok.phase === 'decode' && phase === 'prefill') fail(`request ${req}: prefill row at position ${pos} after decode rows`);
        const tok: TraceToken = {
          position: pos,
          phase: phase as TraceToken['phase'],
          experts: new Uint16Array(h.layers * h.topK).fill(NO_EXPERT),
          weights: opts.keepWeights ? new Float32Array(h.layers * h.topK).fill(NaN) : undefined,
        };
        cur.tokens.push(tok);
        curTok = tok;
        if (phase === 'prefill') cur.prefillTokens++;
        lastLayer = -1;
      } else if (phase !== curTok.phase) {
        fail(`request ${req} position ${pos}: phase ${phase} differs from the position's earlier rows (${curTok.phase})`);
      }
      if (layer <= lastLayer) fail(`request ${req} position ${pos}: layer ${layer} after layer ${lastLayer} (layers must increase)`);
      lastLayer = layer;

      const row: TraceToken = curTok;
      const base = layer * h.topK;
      stamp++;
      for (let k = 0; k < h.topK; k++) {
        const s = ids[k];
        const e = Number(s);
        if (!INT.test(s) || e >= h.experts) fail(`expert id ${JSON.stringify(s)} out of range: must be an integer in [0, ${h.experts - 1}]`);
        if (seenAt[e] === stamp) fail(`expert ${e} listed twice in one row`);
        seenAt[e] = stamp;
        row.experts[base + k] = e;
      }
      if (w) {
        for (let k = 0; k < h.topK; k++) {
          const x = Number(w[k]);
          if (w[k] === '' || !Number.isFinite(x)) fail(`weight ${JSON.stringify(w[k])} is not a finite number`);
          if (row.weights) row.weights[base + k] = x;
        }
      }
    }
    if (lineNo === 0) throw new TraceFormatError(name, 0, 'empty file: expected "# moe-trace v1"');
    if (header === null) fail('missing the shape comment line');
    if (!sawColumns) fail(`missing the column line "${COLUMNS}"`);
    if (cur) yield cur;
  } finally {
    lines.close();
    if (typeof input === 'string') stream.destroy();
  }
}

/** Reads a whole trace into memory (compact form): for the simulator and tests. */
export async function loadTrace(input: string | Readable, opts: ReadTraceOptions = {}): Promise<{ header: TraceHeader; requests: TraceRequest[] }> {
  let header: TraceHeader | null = null;
  const requests: TraceRequest[] = [];
  for await (const r of readTrace(input, (h) => (header = h), opts)) requests.push(r);
  if (header === null) throw new TraceFormatError(opts.name ?? String(input), 0, 'no header');
  return { header, requests };
}

/** Expert ids of one token at one layer (empty when the layer was skipped). */
export function tokenExperts(tok: TraceToken, layer: number, topK: number): Uint16Array {
  const v = tok.experts.subarray(layer * topK, (layer + 1) * topK);
  return v[0] === NO_EXPERT ? v.subarray(0, 0) : v;
}
