// The batch-formation policy: a pure, swappable object that decides which sequences
// run in a step and how many of their pending tokens. The scheduler owns the state
// (queues, KV blocks, preemption); the policy only sees a description of the runnable
// sequences and the step's budget, so it can be tested and replaced on its own.

import { ExpertAwarePolicy } from './expert-aware-policy.js';
import { FcfsPolicy } from './fcfs-policy.js';

/** What a later policy may know about a sequence beyond its lengths (unused by FCFS). */
export interface SequenceHints {
  /** Experts predicted for the sequence's next tokens, per layer (pre-gating predictor). */
  predictedExperts?: readonly (readonly number[])[];
  /** Probability of each predicted expert, parallel to predictedExperts (default 1 each). */
  predictedWeights?: readonly (readonly number[])[];
}

export interface PolicyCandidate {
  seqId: number;
  /** 'running': holds KV blocks (decoding, or mid-way through a chunked prompt). 'waiting': holds none. */
  state: 'running' | 'waiting';
  /** Submission order: smaller came first. Kept across preemptions. */
  arrival: number;
  /** Prompt tokens of the request. */
  promptTokens: number;
  /** Tokens already in the KV cache. */
  computedTokens: number;
  /**
   * Tokens to run before the sequence can sample again (>= 1): 1 for a decode, the rest
   * of the prompt (plus any generated tokens, after a preemption) otherwise.
   */
  pendingTokens: number;
  /** Steps since the sequence last ran (since submission if it never ran). */
  stepsWaited: number;
  hints?: SequenceHints;
}

export interface StepBudget {
  /** Tokens in the step at most (decode tokens plus prompt chunk tokens). */
  maxTokens: number;
  /** Sequences running at once at most: running ones kept plus waiting ones admitted. */
  maxRunning: number;
  /**
   * Expert-aware policies only (FCFS ignores it): per layer, resident[l][e] != 0 when
   * expert e of layer l is resident in the expert cache.
   */
  resident?: readonly Uint8Array[];
  /** Recent step time in ms, for bounds given in ms (a policy may estimate it itself). */
  stepMs?: number;
}

export interface PolicyPick {
  seqId: number;
  /** 1 .. the candidate's pendingTokens; less than pendingTokens makes a prompt chunk. */
  numTokens: number;
}

export interface BatchPolicy {
  readonly name: string;
  /**
   * Candidates come in the scheduler's order: running sequences longest-waiting first
   * (steps since they last ran; ties oldest-admitted first, which is admission order
   * whenever every running sequence fits a step), then the waiting queue front to back
   * (preempted sequences are put at its front).
   * Returns the step's picks in the order the scheduler should serve them; it allocates
   * KV blocks in that order and may drop picks when blocks run out. Must not mutate.
   */
  pick(candidates: readonly PolicyCandidate[], budget: StepBudget): PolicyPick[];
  /**
   * True when the policy reads candidates' hints and the budget's resident/stepMs: only
   * then does the engine compute them each step (FCFS pays nothing for them).
   */
  readonly usesHints?: boolean;
}

/** Options of the configured policies (settings policyMaxExtraWaitSteps, policyMaxExtraWaitMs, policyMaxGapFactor, policyMissPenalty); FCFS takes none. */
export interface PolicyOptions {
  /** Steps a sequence may wait beyond FCFS's wait (expert-aware). */
  maxExtraWaitSteps?: number;
  /** The same bound in milliseconds; the smaller bound wins (expert-aware). */
  maxExtraWaitMs?: number;
  /** Bound on a token's gap as a factor (>= 1) of its FCFS gap (expert-aware). */
  maxGapFactor?: number;
  /** Extra cost of a non-resident expert, in units of a resident one (expert-aware). */
  missPenalty?: number;
}

const POLICIES: Record<string, (o: PolicyOptions) => BatchPolicy> = {
  fcfs: () => new FcfsPolicy(),
  // The engine gives it live hints (each sequence's predicted experts, the resident set).
  'expert-aware': (o) => Object.assign(new ExpertAwarePolicy(o), { usesHints: true }),
};

/** Names of the policies createPolicy knows. */
export function policyNames(): string[] {
  return Object.keys(POLICIES);
}

/** The policy configured by name. */
export function createPolicy(name: string, options: PolicyOptions = {}): BatchPolicy {
  const make = POLICIES[name];
  if (!make) throw new Error(`unknown batch policy "${name}"; policies: ${Object.keys(POLICIES).join(', ')}`);
  return make(options);
}
