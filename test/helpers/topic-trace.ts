// A structured synthetic routing trace for batching tests: each request belongs to one of
// 4 "topics", a topic uses its own 8 experts per layer (experts >= 32), and a token keeps
// each of its predecessor's experts with probability `keep`. Grouping by topic saves
// distinct experts, and a request's recent routing predicts its topic.

import { makeRng } from '../../src/offload/synth-trace.js';
import type { TraceRequest, TraceToken } from '../../src/offload/trace.js';

export interface TopicTraceOptions {
  layers: number;
  topK: number;
  /** Probability that a token keeps each of its predecessor's experts. */
  keep: number;
  seed: number;
  /** Requests of tokens .. 2 x tokens - 1 tokens (random) instead of exactly `tokens`. */
  varyLength?: boolean;
}

export function topicTrace(requests: number, tokens: number, o: TopicTraceOptions): TraceRequest[] {
  const { layers: L, topK: K } = o;
  const rng = makeRng(o.seed);
  const out: TraceRequest[] = [];
  for (let r = 0; r < requests; r++) {
    const topic = Math.floor(rng() * 4);
    const toks: TraceToken[] = [];
    let prev: Uint16Array | null = null;
    const n = o.varyLength ? tokens + Math.floor(rng() * tokens) : tokens;
    for (let p = 0; p < n; p++) {
      const ex = new Uint16Array(L * K);
      for (let l = 0; l < L; l++) {
        const chosen = new Set<number>();
        for (let k = 0; k < K; k++) {
          let e = prev && rng() < o.keep ? prev[l * K + k] : topic * 8 + Math.floor(rng() * 8);
          while (chosen.has(e)) e = topic * 8 + Math.floor(rng() * 8);
          chosen.add(e);
          ex[l * K + k] = e;
        }
      }
      toks.push({ position: p, phase: 'decode', experts: ex });
      prev = ex;
    }
    out.push({ id: r, tokens: toks, prefillTokens: 0 });
  }
  return out;
}
