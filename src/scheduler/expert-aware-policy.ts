// Expert-aware batch formation (issue 6): when more sequences are runnable than fit in
// one step, pick the subset whose predicted experts overlap most with each other and
// with the experts resident in the cache, so the step activates (and loads) fewer
// distinct experts, with a hard bound on how much later than first-come-first-served
// any sequence runs.
//
// Inputs beyond FCFS's (all optional; without them the policy is FCFS):
// - hints.predictedExperts[l]: expert ids predicted for the sequence's next token at
//   layer l (pre-gating, the previous token's routing, ...), with optional
//   hints.predictedWeights[l]: the probability of each (default 1).
// - budget.resident[l][e] != 0 when expert e of layer l is resident in the cache.
//
// Algorithm, per step:
// 1. Everything fits (the running sequences' pending tokens fit the token budget): the
//    FCFS policy's picks, unchanged.
// 2. FCFS order is longest-waiting first (stepsWaited, then the scheduler's order). When
//    a sequence's token becomes ready, FCFS would serve it after W = floor(pending tokens
//    ahead of it in that order / maxTokens) steps; the policy remembers W per sequence
//    (later projections can only be later, so the smallest seen is kept). A sequence is
//    due when stepsWaited >= W + B, B = maxExtraWaitSteps (lowered to
//    floor(maxExtraWaitMs / step ms) when that is set; the step time is budget.stepMs or
//    the EMA of the interval between pick() calls). Due sequences are picked first,
//    least slack first. In a closed system (a sequence is runnable again right after it
//    ran) this keeps every token within B steps of its FCFS wait.
// 3. The rest of the budget is filled greedily on the expected union of expert sets:
//    each layer keeps q[e] = P(no picked token uses e); adding a candidate costs
//      sum over layers and predicted (e, p):  p * q[e] * (1 + missPenalty * [e not resident])
//    (an unpredicted layer costs as K fresh experts of the layer's mean cost), divided by
//    the tokens it brings. The cheapest candidate is added, ties in FCFS order; repeat.
//    Running prompt chunks (pendingTokens > 1) compete the same way, cost per token, so a
//    chunk lands in a step whose decodes share its experts (when it has predictions).
// 4. Waiting sequences are admitted after the running ones, in queue order, as FCFS
//    does (a waiting prompt is never passed by a later one).
//
// Cost: O(picks × candidates × layers × predicted experts) per step; measured with
// hrtime and exposed as lastPickMicros / totalPickMicros / pickCalls.
//
// Options (constructor, with defaults):
//   maxExtraWaitSteps  4     steps a sequence may wait beyond round-robin FCFS's wait
//   maxExtraWaitMs     none  the same bound in milliseconds (the smaller bound wins)
//   maxGapFactor       none  also keep each token's gap (wait + 1 steps) within this
//                            factor of its FCFS gap (e.g. 1.2: a token FCFS serves
//                            after 7 steps waits at most 8, i.e. the bound becomes 1)
//   missPenalty        2     extra cost of a non-resident expert, in units of a resident
//                            one (0: only distinct experts count; ignored without
//                            budget.resident)
//   amortize           true  divide an expert's cost by the expected number of later
//                            picks of this step that share it (from the candidates'
//                            predictions): seeds the greedy with widely shared experts

import { FcfsPolicy } from './fcfs-policy.js';
import type { BatchPolicy, PolicyCandidate, PolicyPick, StepBudget } from './policy.js';

export interface ExpertAwareOptions {
  maxExtraWaitSteps?: number;
  maxExtraWaitMs?: number;
  missPenalty?: number;
  amortize?: boolean;
  maxGapFactor?: number;
}

export const EXPERT_AWARE_DEFAULTS = { maxExtraWaitSteps: 4, missPenalty: 2 } as const;

export class ExpertAwarePolicy implements BatchPolicy {
  readonly name = 'expert-aware';
  readonly maxExtraWaitSteps: number;
  readonly maxExtraWaitMs: number | undefined;
  readonly missPenalty: number;
  readonly amortize: boolean;
  readonly maxGapFactor: number | undefined;
  /** Microseconds spent in the last pick() (hrtime). */
  lastPickMicros = 0;
  totalPickMicros = 0;
  pickCalls = 0;
  /** Picks of the last step that FCFS would not have made (regrouping decisions). */
  lastRegrouped = 0;
  totalRegrouped = 0;
  /** Due sequences (at the fairness bound) picked first in the last step. */
  lastDue = 0;
  /** Exponential mean of the interval between pick() calls, ms (the step time). */
  stepMsEstimate = 0;
  private lastCallAt = -1;
  /** Per running sequence: its projected FCFS wait for the current token, and the stepsWaited last seen. */
  private readonly fcfsWait = new Map<number, { fcfsWait: number; lastWaited: number }>();
  private readonly fcfs = new FcfsPolicy();
  // Scratch, grown on demand.
  private q = new Float64Array(0);
  private cost = new Float64Array(0);
  private demand = new Float64Array(0);
  private termJ = new Int32Array(0);
  private termP = new Float64Array(0);

  constructor(opts: ExpertAwareOptions = {}) {
    this.maxExtraWaitSteps = opts.maxExtraWaitSteps ?? EXPERT_AWARE_DEFAULTS.maxExtraWaitSteps;
    this.maxExtraWaitMs = opts.maxExtraWaitMs;
    this.missPenalty = opts.missPenalty ?? EXPERT_AWARE_DEFAULTS.missPenalty;
    this.amortize = opts.amortize ?? true;
    this.maxGapFactor = opts.maxGapFactor;
    if (this.maxGapFactor !== undefined && !(this.maxGapFactor >= 1)) throw new Error(`maxGapFactor must be >= 1, got ${this.maxGapFactor}`);
    if (!Number.isInteger(this.maxExtraWaitSteps) || this.maxExtraWaitSteps < 0) throw new Error(`maxExtraWaitSteps must be an integer >= 0, got ${this.maxExtraWaitSteps}`);
    if (this.maxExtraWaitMs !== undefined && !(this.maxExtraWaitMs >= 0)) throw new Error(`maxExtraWaitMs must be >= 0, got ${this.maxExtraWaitMs}`);
    if (!(this.missPenalty >= 0)) throw new Error(`missPenalty must be >= 0, got ${this.missPenalty}`);
  }

  /** The extra-wait bound in steps at the current step time. */
  boundSteps(stepMs?: number): number {
    let b = this.maxExtraWaitSteps;
    const ms = stepMs ?? this.stepMsEstimate;
    if (this.maxExtraWaitMs !== undefined && ms > 0) b = Math.min(b, Math.floor(this.maxExtraWaitMs / ms));
    return b;
  }

  pick(candidates: readonly PolicyCandidate[], budget: StepBudget): PolicyPick[] {
    const t0 = process.hrtime.bigint();
    const now = performance.now();
    if (this.lastCallAt >= 0) {
      const dt = now - this.lastCallAt;
      this.stepMsEstimate = this.stepMsEstimate === 0 ? dt : 0.9 * this.stepMsEstimate + 0.1 * dt;
    }
    this.lastCallAt = now;
    const picks = this.choose(candidates, budget);
    const us = Number(process.hrtime.bigint() - t0) / 1000;
    this.lastPickMicros = us;
    this.totalPickMicros += us;
    this.pickCalls++;
    return picks;
  }

  private choose(candidates: readonly PolicyCandidate[], budget: StepBudget): PolicyPick[] {
    this.lastRegrouped = 0;
    this.lastDue = 0;
    const running: { c: PolicyCandidate; idx: number }[] = [];
    let runningTokens = 0;
    candidates.forEach((c, idx) => {
      if (c.state === 'running') {
        running.push({ c, idx });
        runningTokens += c.pendingTokens;
      }
    });
    if (runningTokens <= budget.maxTokens) return this.fcfs.pick(candidates, budget);

    // FCFS order: longest-waiting first, then the scheduler's order.
    running.sort((a, b) => b.c.stepsWaited - a.c.stepsWaited || a.idx - b.idx);
    const R = running.length;
    const B = this.boundSteps(budget.stepMs);
    // Each sequence's FCFS wait: when it became ready, FCFS from that state would have
    // served it after floor(tokens ahead of it / maxTokens) steps. Out-of-order picks
    // only push that projection later, so the first one seen is kept.
    const slack = new Float64Array(R);
    const seen = new Set<number>();
    const projOf = new Float64Array(R);
    let ahead = 0;
    for (let i = 0; i < R; i++) {
      projOf[i] = Math.floor(ahead / Math.max(1, budget.maxTokens));
      ahead += running[i].c.pendingTokens;
    }
    // Nobody waits longer under FCFS than the last in its order (a sequence first seen
    // mid-wait is capped by it).
    const maxProj = R > 0 ? projOf[R - 1] : 0;
    for (let i = 0; i < R; i++) {
      const c = running[i].c;
      const proj = Math.min(c.stepsWaited + projOf[i], maxProj);
      seen.add(c.seqId);
      const st = this.fcfsWait.get(c.seqId);
      let fw: number;
      if (st === undefined || c.stepsWaited <= st.lastWaited) {
        fw = proj;
        this.fcfsWait.set(c.seqId, { fcfsWait: fw, lastWaited: c.stepsWaited });
      } else {
        fw = Math.min(st.fcfsWait, proj);
        st.fcfsWait = fw;
        st.lastWaited = c.stepsWaited;
      }
      // The gap bound: a token's wait + 1 steps within maxGapFactor x FCFS's.
      const b = this.maxGapFactor === undefined ? B : Math.min(B, Math.floor((this.maxGapFactor - 1) * (fw + 1) + 1e-9));
      slack[i] = fw + b - c.stepsWaited;
    }
    for (const id of this.fcfsWait.keys()) if (!seen.has(id)) this.fcfsWait.delete(id);

    const picks: PolicyPick[] = [];
    const taken = new Uint8Array(R);
    let tokens = budget.maxTokens;

    // Layers and expert-id range seen in the hints.
    let L = 0;
    let E = 0;
    let kSum = 0;
    let kN = 0;
    for (const { c } of running) {
      const pe = c.hints?.predictedExperts;
      if (!pe) continue;
      L = Math.max(L, pe.length);
      for (const set of pe) {
        if (set.length === 0) continue;
        kSum += set.length;
        kN++;
        for (let i = 0; i < set.length; i++) if (set[i] >= E) E = set[i] + 1;
      }
    }
    const res = budget.resident;
    if (res) {
      L = Math.max(L, res.length);
      for (const r of res) E = Math.max(E, r.length);
    }
    const Kavg = kN > 0 ? kSum / kN : 0;
    if (this.q.length < L * E) {
      this.q = new Float64Array(L * E);
      this.cost = new Float64Array(L * E);
    }
    const q = this.q;
    const cost = this.cost;
    q.fill(1, 0, L * E);
    const meanCost = new Float64Array(L);
    for (let l = 0; l < L; l++) {
      const r = res?.[l];
      let s = 0;
      for (let e = 0; e < E; e++) {
        const c = 1 + (r && !r[e] ? this.missPenalty : 0);
        cost[l * E + e] = c;
        s += c;
      }
      meanCost[l] = E > 0 ? s / E : 1;
    }

    // demand[j]: expected uses of expert j by the sequences not picked yet.
    if (this.demand.length < L * E) this.demand = new Float64Array(L * E);
    const demand = this.demand;
    demand.fill(0, 0, L * E);
    if (this.amortize) {
      for (const { c } of running) {
        const pe = c.hints?.predictedExperts;
        if (!pe) continue;
        const pw = c.hints?.predictedWeights;
        for (let l = 0; l < pe.length; l++) for (let k = 0; k < pe[l].length; k++) demand[l * E + pe[l][k]] += pw ? pw[l][k] : 1;
      }
    }
    let unpicked = R;

    const add = (i: number, n: number): void => {
      taken[i] = 1;
      unpicked--;
      const c = running[i].c;
      picks.push({ seqId: c.seqId, numTokens: n });
      tokens -= n;
      const pe = c.hints?.predictedExperts;
      const pw = c.hints?.predictedWeights;
      if (!pe) return;
      for (let l = 0; l < pe.length; l++) {
        const set = pe[l];
        const w = pw?.[l];
        for (let k = 0; k < set.length; k++) {
          const p = w ? Math.min(1, Math.max(0, w[k])) : 1;
          q[l * E + set[k]] *= 1 - p;
          demand[l * E + set[k]] -= w ? w[k] : 1;
        }
      }
    };

    // 1. Due sequences (no slack left), least slack first, then FCFS order.
    const due: number[] = [];
    for (let i = 0; i < R; i++) if (slack[i] <= 0) due.push(i);
    due.sort((a, b) => slack[a] - slack[b] || a - b);
    for (const i of due) {
      if (tokens === 0) break;
      add(i, Math.min(running[i].c.pendingTokens, tokens));
      this.lastDue++;
    }

    // 2. Greedy on the expected union. Each candidate's terms, flat and in the order the
    // score sums them (layer by layer, hint order): (layer, expert) index and probability,
    // or -1 - l for a layer without a prediction. Read at every greedy round.
    const termStart = new Int32Array(R + 1);
    let nTerms = 0;
    for (let i = 0; i < R; i++) {
      termStart[i] = nTerms;
      const pe = running[i].c.hints?.predictedExperts;
      for (let l = 0; l < L; l++) nTerms += Math.max(1, pe?.[l]?.length ?? 0);
    }
    termStart[R] = nTerms;
    if (this.termJ.length < nTerms) {
      this.termJ = new Int32Array(nTerms);
      this.termP = new Float64Array(nTerms);
    }
    const termJ = this.termJ;
    const termP = this.termP;
    for (let i = 0; i < R; i++) {
      const pe = running[i].c.hints?.predictedExperts;
      const pw = running[i].c.hints?.predictedWeights;
      let t = termStart[i];
      for (let l = 0; l < L; l++) {
        const set = pe?.[l];
        if (!set || set.length === 0) {
          termJ[t++] = -1 - l;
          continue;
        }
        const w = pw?.[l];
        for (let k = 0; k < set.length; k++) {
          termJ[t] = l * E + set[k];
          termP[t++] = w ? w[k] : 1;
        }
      }
    }
    while (tokens > 0) {
      // Expected picks after this one that use an expert another candidate predicts: an
      // expert many candidates share is amortized over them (this also seeds the first pick).
      const shareRate = this.amortize && unpicked > 1 ? Math.max(0, tokens - 1) / (unpicked - 1) : 0;
      let best = -1;
      let bestScore = Infinity;
      for (let i = 0; i < R; i++) {
        if (taken[i]) continue;
        const n = Math.min(running[i].c.pendingTokens, tokens);
        let s = 0;
        for (let t = termStart[i], end = termStart[i + 1]; t < end; t++) {
          const j = termJ[t];
          if (j < 0) {
            s += Kavg * meanCost[-1 - j];
            continue;
          }
          const p = termP[t];
          s += (p * q[j] * cost[j]) / (1 + shareRate * Math.max(0, demand[j] - p));
        }
        s /= n;
        if (s < bestScore - 1e-12) {
          bestScore = s;
          best = i;
        }
      }
      if (best < 0) break;
      add(best, Math.min(running[best].c.pendingTokens, tokens));
    }

    // Regrouping decisions: picks outside FCFS's first picks.
    const fcfsSet = new Set<number>();
    let left = budget.maxTokens;
    for (let i = 0; i < R && left > 0; i++) {
      fcfsSet.add(running[i].c.seqId);
      left -= Math.min(running[i].c.pendingTokens, left);
    }
    for (const p of picks) if (!fcfsSet.has(p.seqId)) this.lastRegrouped++;
    this.totalRegrouped += this.lastRegrouped;

    // 3. Waiting sequences after the running ones, in queue order (as FCFS).
    let runningCount = R;
    for (const c of candidates) {
      if (c.state !== 'waiting') continue;
      if (tokens === 0 || runningCount >= budget.maxRunning) break;
      const n = Math.min(c.pendingTokens, tokens);
      picks.push({ seqId: c.seqId, numTokens: n });
      tokens -= n;
      runningCount++;
    }
    return picks;
  }
}
