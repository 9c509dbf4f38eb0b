// Turns a trace's requests into the access schedule a server would produce when it
// decodes `concurrency` requests together (continuous batching):
//
// - M lanes. Each step, every busy lane contributes one token of its request: the
//   prompt's prefill rows first, one position per step (as decode would produce them;
//   a causal model routes a prompt token the same whether it was prefilled or decoded),
//   then its decode rows. With `prefill: false` only the decode rows are replayed.
// - When a lane's request has run its last token, the next request from the file joins
//   that lane at the next step (file order).
// - Each step visits layers 0..L-1 in order; the visit of layer l needs the union of its
//   tokens' experts at l (distinct ids, in lane order then router rank order).
//
// The schedule is held compactly: one Uint16Array of all visit sets with offsets.

import { NO_EXPERT, type TraceHeader, type TraceRequest, type TraceToken } from './trace.js';

export interface ScheduleOptions {
  concurrency: number;
  /** Replay prefill rows as the first steps of each request (default true). */
  prefill?: boolean;
}

export interface StepToken {
  lane: number;
  request: number;
  /** Index of the token within its replayed tokens (0 = first replayed). */
  index: number;
  token: TraceToken;
}

export class AccessSchedule {
  readonly layers: number;
  readonly topK: number;
  readonly experts: number;
  /** Tokens of each step, lane order. */
  readonly steps: StepToken[][] = [];
  private ids = new Uint16Array(1 << 16);
  private len = 0;
  private offsets: Uint32Array = new Uint32Array(1 << 12); // (step, layer) -> start in ids; one extra at the end
  private visits = 0;

  constructor(header: TraceHeader) {
    this.layers = header.layers;
    this.topK = header.topK;
    this.experts = header.experts;
  }

  get numSteps(): number {
    return this.steps.length;
  }

  /** Experts needed by the visit of `layer` at `step`. */
  set(layer: number, step: number): Uint16Array {
    const v = step * this.layers + layer;
    return this.ids.subarray(this.offsets[v], this.offsets[v + 1]);
  }

  /** Sum of |set| over all visits. */
  get totalNeeded(): number {
    return this.len;
  }

  addStep(tokens: StepToken[]): void {
    const { layers: L, topK: K, experts: E } = this;
    const seen = new Uint8Array(E);
    for (let l = 0; l < L; l++) {
      if (this.visits + 2 > this.offsets.length) {
        const o = new Uint32Array(this.offsets.length * 2);
        o.set(this.offsets);
        this.offsets = o;
      }
      this.offsets[this.visits] = this.len;
      const start = this.len;
      for (const t of tokens) {
        for (let k = 0; k < K; k++) {
          const e = t.token.experts[l * K + k];
          if (e === NO_EXPERT || seen[e]) continue;
          seen[e] = 1;
          if (this.len === this.ids.length) {
            const n = new Uint16Array(this.ids.length * 2);
            n.set(this.ids);
            this.ids = n;
          }
          this.ids[this.len++] = e;
        }
      }
      for (let i = start; i < this.len; i++) seen[this.ids[i]] = 0;
      this.visits++;
      this.offsets[this.visits] = this.len;
    }
    this.steps.push(tokens);
  }
}

/**
 * The requests of a trace one at a time, each with the tokens it replays (its prefill
 * rows only when `withPrefill`); requests left with no token are skipped. next() gives
 * null at the end, and ended() is true from then on.
 */
export function requestStream(
  requests: Iterable<TraceRequest> | AsyncIterable<TraceRequest>,
  withPrefill: boolean,
): { next(): Promise<TraceRequest | null>; ended(): boolean } {
  const it = (Symbol.asyncIterator in requests ? requests[Symbol.asyncIterator]() : (requests as Iterable<TraceRequest>)[Symbol.iterator]()) as
    | AsyncIterator<TraceRequest>
    | Iterator<TraceRequest>;
  let exhausted = false;
  const next = async (): Promise<TraceRequest | null> => {
    while (!exhausted) {
      const r = await it.next();
      if (r.done) {
        exhausted = true;
        return null;
      }
      const tokens = withPrefill ? r.value.tokens : r.value.tokens.slice(r.value.prefillTokens);
      if (tokens.length > 0) return { ...r.value, tokens };
    }
    return null;
  };
  return { next, ended: () => exhausted };
}

/** Builds the schedule from requests in file order (an array or a streaming reader). */
export async function buildSchedule(
  header: TraceHeader,
  requests: Iterable<TraceRequest> | AsyncIterable<TraceRequest>,
  opts: ScheduleOptions,
): Promise<AccessSchedule> {
  const M = opts.concurrency;
  if (!Number.isInteger(M) || M < 1) throw new Error(`concurrency must be an integer >= 1, got ${M}`);
  const withPrefill = opts.prefill ?? true;
  const sched = new AccessSchedule(header);
  const lanes: ({ req: TraceRequest; tokens: TraceToken[]; next: number } | null)[] = new Array(M).fill(null);
  const stream = requestStream(requests, withPrefill);
  for (;;) {
    for (let i = 0; i < M; i++) {
      if (lanes[i] === null && !stream.ended()) {
        const r = await stream.next();
        if (r) lanes[i] = { req: r, tokens: r.tokens, next: 0 };
      }
    }
    const step: StepToken[] = [];
    for (let i = 0; i < M; i++) {
      const lane = lanes[i];
      if (!lane) continue;
      step.push({ lane: i, request: lane.req.id, index: lane.next, token: lane.tokens[lane.next] });
      lane.next++;
      if (lane.next === lane.tokens.length) lanes[i] = null;
    }
    if (step.length === 0) break;
    sched.addStep(step);
  }
  return sched;
}
