// First come, first served: running sequences first (decodes cost one token each and
// hold KV blocks already), then waiting prompts in queue order, the last admitted one
// cut to the tokens left in the budget (chunked prefill). A waiting prompt is never
// skipped for a later one, so a steady stream of short requests cannot starve a long one.

import type { BatchPolicy, PolicyCandidate, PolicyPick, StepBudget } from './policy.js';

export class FcfsPolicy implements BatchPolicy {
  readonly name = 'fcfs';

  pick(candidates: readonly PolicyCandidate[], budget: StepBudget): PolicyPick[] {
    const picks: PolicyPick[] = [];
    let tokens = budget.maxTokens;
    let running = 0;
    for (const c of candidates) {
      if (c.state !== 'running') continue;
      running++;
      if (tokens === 0) continue;
      const n = Math.min(c.pendingTokens, tokens);
      picks.push({ seqId: c.seqId, numTokens: n });
      tokens -= n;
    }
    for (const c of candidates) {
      if (c.state !== 'waiting') continue;
      if (tokens === 0 || running >= budget.maxRunning) break;
      const n = Math.min(c.pendingTokens, tokens);
      picks.push({ seqId: c.seqId, numTokens: n });
      tokens -= n;
      running++;
    }
    return picks;
  }
}
