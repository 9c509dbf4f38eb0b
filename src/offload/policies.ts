// Expert cache policies for online use (the engine), where no future is known: the same
// objects the trace simulator builds (createCachePolicy in simulator.ts), made over an
// empty access schedule of the model's shape. Belady's optimum needs the future and is
// refused here.

import type { ExpertCachePolicy } from './cache-policy.js';
import { AccessSchedule } from './schedule.js';
import { createCachePolicy, DEFAULT_POLICY, POLICY_NAMES, type PolicyName } from './simulator.js';

/** Policies the engine can run online (every simulator policy except Belady's). */
export const ONLINE_POLICY_NAMES: readonly PolicyName[] = POLICY_NAMES.filter((n) => n !== 'belady');
export const DEFAULT_ONLINE_POLICY: PolicyName = DEFAULT_POLICY;

export interface OnlinePolicyShape {
  layers: number;
  experts: number;
  topK: number;
  /** Slots per layer: one number for every layer, or one per layer. */
  capacity: number | readonly number[];
}

/** A fresh online policy by name; errors name the choices. */
export function createOnlinePolicy(name: string, shape: OnlinePolicyShape, opts: { prefetch?: boolean; routingPredictor?: boolean } = {}): ExpertCachePolicy {
  if (name === 'belady') {
    throw new Error("expert cache policy belady needs the future accesses (a recorded trace): it runs in the simulator (moe-serve sim), not online; choose one of " + ONLINE_POLICY_NAMES.join(', '));
  }
  if (!(ONLINE_POLICY_NAMES as readonly string[]).includes(name)) {
    throw new Error(`unknown expert cache policy ${JSON.stringify(name)}; policies: ${ONLINE_POLICY_NAMES.join(', ')}`);
  }
  const empty = new AccessSchedule({ model: '', layers: shape.layers, experts: shape.experts, topK: shape.topK, source: 'online' });
  return createCachePolicy(name as PolicyName, empty, shape.capacity, opts);
}
