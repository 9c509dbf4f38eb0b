// Schedule-aware eviction: what the next steps will need, from the scheduler's order.
//
// When more sequences are runnable than one step holds, they take turns (round robin, or
// expert-aware picks within a bound of it): the sequences that did not run in this step
// run in the next ones, longest-waiting first. Their recent routing (RecentRouting, the
// same prediction the expert-aware batch policy uses) says which experts those steps are
// likely to need, and an expert cache that keeps them (SlotCache.setUpcoming) does not
// evict an expert that the very next step loads again: a plain LRU evicts exactly those,
// since a sequence's experts were last used a whole turn ago. This is knowledge of the
// future that only the server has, and it costs no load: it only changes which resident
// is evicted.
//
// Measured with `moe-serve sim --scheduler ... --batch 8 --concurrency 64 --capacity 64`
// (LRU, bound 1) on 256-request traces synthesized like the real Qwen3 one, 48 tokens per
// request: see batch-sim.ts (planSteps) and the closing notes.

import type { RoutingHint } from '../engine/runner.js';

/** Steps ahead whose sequences' predicted experts the cache keeps (0: off). */
export const DEFAULT_PLAN_STEPS = 4;

/**
 * Fills `out` ((layers × experts), zeroed first) with the upcoming weights of `steps`:
 * steps[d] lists the sequences expected to run d + 1 steps from now; each predicted
 * (layer, expert) of theirs adds its hint weight (default 1) × 2^-d. Only the first
 * `planSteps` steps count. Returns true when some weight is positive.
 */
export function upcomingWeights(
  out: Float64Array,
  layers: number,
  experts: number,
  steps: readonly (readonly number[])[],
  hint: (seqId: number) => RoutingHint | undefined,
  planSteps: number,
): boolean {
  out.fill(0);
  let any = false;
  const D = Math.min(planSteps, steps.length);
  for (let d = 0; d < D; d++) {
    const scale = Math.pow(2, -d);
    for (const seq of steps[d]) {
      const h = hint(seq);
      if (!h) continue;
      const L = Math.min(layers, h.experts.length);
      for (let l = 0; l < L; l++) {
        const ids = h.experts[l];
        const w = h.weights?.[l];
        for (let k = 0; k < ids.length; k++) {
          const e = ids[k];
          if (!(e >= 0 && e < experts)) continue;
          const v = (w ? w[k] : 1) * scale;
          if (!(v > 0)) continue;
          out[l * experts + e] += v;
          any = true;
        }
      }
    }
  }
  return any;
}
