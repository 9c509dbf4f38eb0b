// Fits the forecast policy's prior (forecast-prior.ts): the policy's own online learning,
// run over real routing traces in the simulator, carried from run to run. Each run
// replays one trace (one request decoded at a time, prompt rows as steps) with the cache
// at `capacityFactor` x the trace's top-k per layer, starting from the model the previous
// run ended with; `epochs` passes over the list of traces.

import { buildSchedule } from './schedule.js';
import { DEFAULT_TIMING, simulate } from './simulator.js';
import { ForecastPolicy, type ForecastModel } from './forecast.js';
import { loadTrace } from './trace.js';

export interface FitOptions {
  epochs?: number;
  /** Cache slots per layer as a multiple of the trace's top-k (default 2). */
  capacityFactor?: number;
  /** Model to start from (default null: zero). */
  start?: ForecastModel | null;
  /** Called after each run with the trace and its loads. */
  onRun?: (trace: string, epoch: number, loads: number) => void;
}

export async function fitForecastPrior(traces: readonly string[], opts: FitOptions = {}): Promise<ForecastModel> {
  const epochs = opts.epochs ?? 3;
  const factor = opts.capacityFactor ?? 2;
  if (traces.length === 0) throw new Error('fit forecast prior: no trace');
  if (!Number.isInteger(epochs) || epochs < 1) throw new Error(`fit forecast prior: epochs must be an integer >= 1, got ${epochs}`);
  if (!(factor > 0)) throw new Error(`fit forecast prior: capacity factor must be > 0, got ${factor}`);
  const loaded = [];
  for (const path of traces) {
    const { header, requests } = await loadTrace(path);
    loaded.push({ path, header, sched: await buildSchedule(header, requests, { concurrency: 1 }) });
  }
  let model: ForecastModel | null = opts.start ?? null;
  for (let e = 0; e < epochs; e++) {
    for (const { path, header, sched } of loaded) {
      const capacity = Math.min(header.experts, Math.max(1, Math.round(header.topK * factor)));
      const policy = new ForecastPolicy({ layers: header.layers, experts: header.experts, capacity }, { prior: model, prefetch: false, routingPredictor: false });
      const r = simulate(sched, policy, DEFAULT_TIMING, { prefetch: false });
      opts.onRun?.(path, e, r.loads);
      model = policy.model();
    }
  }
  return model!;
}

/** The TypeScript module forecast-prior.ts for a fitted model. */
export function priorModule(model: ForecastModel, provenance: readonly string[]): string {
  const row = (a: readonly number[]) => {
    const lines: string[] = [];
    for (let i = 0; i < a.length; i += model.features) lines.push('    ' + a.slice(i, i + model.features).map((x) => String(x)).join(', ') + ',');
    return lines.join('\n');
  };
  return [
    '// The forecast policy\'s starting model (forecast.ts: ForecastOptions.prior). Written by',
    '// scripts/fit-forecast-prior.ts; do not edit by hand. Provenance:',
    ...provenance.map((l) => `//   ${l}`),
    '',
    "import type { ForecastModel } from './forecast.js';",
    '',
    'export const FORECAST_PRIOR: ForecastModel = {',
    `  horizons: [${model.horizons.join(', ')}],`,
    `  features: ${model.features},`,
    '  // Weights, one row per horizon.',
    '  w: [',
    row(model.w),
    '  ],',
    '  // Adagrad sums of squared gradients, one row per horizon.',
    '  g2: [',
    row(model.g2),
    '  ],',
    '};',
    '',
  ].join('\n');
}
