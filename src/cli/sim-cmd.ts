import { readTrace, type TraceHeader, type TraceRequest } from '../offload/trace.js';
import { buildSchedule } from '../offload/schedule.js';
import { createCachePolicy, DEFAULT_BYTES_PER_EXPERT, DEFAULT_POLICY, DEFAULT_TIMING, POLICY_NAMES, simulate, type PolicyName, type SimResult } from '../offload/simulator.js';
import {
  BATCH_CACHES,
  BATCH_PREDICTORS,
  BATCH_SCHEDULERS,
  DEFAULT_BATCH_PREDICTOR,
  fairnessVsFcfs,
  runBatchSim,
  type BatchCacheName,
  type BatchPredictorName,
  type BatchSchedulerName,
  type BatchSimResult,
} from '../offload/batch-sim.js';
import { EXPERT_AWARE_DEFAULTS } from '../scheduler/expert-aware-policy.js';
import { RECENT_ROUTING_DECAY } from '../scheduler/recent-routing.js';
import { DEFAULT_PLAN_STEPS } from '../offload/upcoming.js';
import { CapacityError, EQUAL_SPLIT, parseSplit, splitSlots, splitText, type SplitSpec } from '../offload/capacity.js';
import { choiceOpt, intOpt, numOpt, parse, required, UsageError } from './args.js';

const HELP = `usage: moe-serve sim --trace FILE [--policy ${POLICY_NAMES.join('|')}] [--capacity N|F]
                     [--total-capacity N] [--split equal|W0,W1,...] [--concurrency M]
                     [--no-prefill] [--no-prefetch]
                     [--expert-bytes B] [--load-gbps G] [--compute-gbps G] [--layer-ms T] [--json]

Replays a moe-trace v1 routing trace through an expert cache policy and compares its
loads with Belady's optimum at the same capacity. Default policy: ${DEFAULT_POLICY}.

Semantics:
  - M requests (--concurrency, default 1) are decoded together, one token each per
    step. A request's prefill rows are replayed as its first steps, one position per
    step, as decode would produce them (--no-prefill: decode rows only). When a request
    ends, the next one from the file joins (continuous batching).
  - Each step visits layers 0..L-1 in order; the visit of layer l needs the union of
    its tokens' experts at l. A row-less (token, layer) needs nothing.
  - The cache is split equally across layers: each layer has N slots (--capacity N), or
    F x the active experts per layer (--capacity F with F fractional, e.g. 1.5), or
    --total-capacity N / L. "Active experts per layer" = the trace's top_k (what one
    token activates at a layer). Without a capacity: 1x, 2x and 4x top_k.
  - --split W0,W1,... (one non-negative weight per trace layer) splits the same total
    budget unequally: N x L slots (--capacity), or N (--total-capacity), divided in
    proportion to the weights by largest remainder, each layer keeping 1 to all its
    experts (the excess goes to the other layers by weight), as the server's
    offloadSplit setting does. Belady runs at the same slots per layer. Run once with
    and once without --split (--capacity N) to compare a split with the equal one of
    the same budget.
  - hit rate = needed (visit, expert) pairs already resident / all needed pairs.
    loads = demand loads + started prefetches (wasted ones included); Belady evicts
    the expert whose next use is furthest away (optimal demand loading).
  - stall-free fraction: visits whose experts were all resident or prefetched in time;
    (oracle): the same for Belady's evictions with a prefetcher told each next layer's
    true experts, the best one-layer-ahead prefetching can do at this timing.
    One I/O channel loads an expert in expert-bytes / load-gbps; a visit computes for
    layer-ms + distinct experts x expert-bytes / compute-gbps. Demand loads go before
    queued prefetches; prefetches for l+1 are issued at l's visit while at most
    ceil(visit compute / load time) loads are outstanding; one not started by its target
    visit is cancelled (stale) or turned into a demand load.

Options:
  --expert-bytes B    bytes per expert (default ${DEFAULT_BYTES_PER_EXPERT}: Qwen3-30B-A3B 3x2048x768 at Q8_0)
  --load-gbps G       expert load bandwidth, GB/s (default ${DEFAULT_TIMING.loadBandwidth / 1e9}: direct disk reads here)
  --compute-gbps G    memory bandwidth of expert compute, GB/s (default ${DEFAULT_TIMING.computeBandwidth / 1e9})
  --layer-ms T        per-layer compute besides experts, ms (default ${DEFAULT_TIMING.layerBaseSeconds * 1e3})
  --json              one JSON object: per capacity hit_rate, loads, belady_loads, loads_vs_belady, ...

Batch formation (--scheduler switches to it):
  moe-serve sim --scheduler ${BATCH_SCHEDULERS.join('|')} --trace FILE [--batch N] [--concurrency M]
                [--capacity C] [--predictor ${BATCH_PREDICTORS.join('|')}] [--cache ${BATCH_CACHES.join('|')}]
                [--max-extra-wait S] [--max-gap-factor F] [--miss-penalty P] [--plan-steps D]
                [--recent-decay D] [--pregate-accuracy A] [--no-prefill] [--no-oracle] [--json]

  M requests (--concurrency, default 64) are runnable; each step the scheduler picks N
  (--batch, default 8) of them, one token each; a finished request's lane takes the next
  request from the file. Reported: distinct experts per step (mean over layers),
  expert loads per token with a per-layer cache of C slots (default: half the experts;
  LRU by default, demand loads only), and fairness against FCFS run on the same trace:
  extra wait per token (steps waited minus FCFS's for the same token; p99 and max over
  the tokens run in steady state in both runs, i.e. every lane busy and requests left
  to join; in parentheses / *_all over all tokens, which includes the drain after the
  file ends, when the two runs are in unlike states) and the p99 inter-token gap (steps) as
  a ratio to FCFS's. Simulated seconds use the timing options below (per layer visit:
  layer-ms + distinct x compute + loads x load time, no overlap).
  fcfs          round robin, longest-waiting first
  expert-aware  groups by what is knowable: each request's routing so far (--predictor
                recent, the default and what the server uses: the experts of its recent
                tokens, weighted min(1, count decayed by --recent-decay per token, default
                ${RECENT_ROUTING_DECAY}); prev: the previous token's experts only) and the
                cache's resident set. --predictor
                pregate [--pregate-accuracy A] is a what-if, not knowable from a trace:
                an emulated pre-gating predictor naming each true expert with
                probability A (default 0.8), else a wrong one
  oracle        the same grouping told the tokens' true routing (the yardstick)
  --max-extra-wait S  steps a request may wait beyond FCFS (default ${EXPERT_AWARE_DEFAULTS.maxExtraWaitSteps})
  --max-gap-factor F  also keep each token's gap within F x its FCFS gap (default: off)
  --miss-penalty P    extra cost of a non-resident expert vs a resident one (default ${EXPERT_AWARE_DEFAULTS.missPenalty})
  --no-oracle         with expert-aware, skip the oracle run (else reported for the share of its savings)
  --plan-steps D      schedule-aware eviction, for every scheduler alike: the cache keeps the
                      experts that the requests expected in the next D steps (those that did
                      not run, in FCFS order, N per step) used recently (their recent
                      routing, as the server's offloadPlanSteps; default ${DEFAULT_PLAN_STEPS}, 0: off)
`;

export const simCommand = {
  summary: 'simulate an expert cache policy on a routing trace against Belady',
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, {
      trace: { type: 'string' },
      policy: { type: 'string' },
      capacity: { type: 'string' },
      'total-capacity': { type: 'string' },
      split: { type: 'string' },
      concurrency: { type: 'string' },
      'no-prefill': { type: 'boolean' },
      'no-prefetch': { type: 'boolean' },
      'expert-bytes': { type: 'string' },
      'load-gbps': { type: 'string' },
      'compute-gbps': { type: 'string' },
      'layer-ms': { type: 'string' },
      json: { type: 'boolean' },
      scheduler: { type: 'string' },
      batch: { type: 'string' },
      predictor: { type: 'string' },
      cache: { type: 'string' },
      'max-extra-wait': { type: 'string' },
      'miss-penalty': { type: 'string' },
      'no-oracle': { type: 'boolean' },
      'pregate-accuracy': { type: 'string' },
      'max-gap-factor': { type: 'string' },
      'recent-decay': { type: 'string' },
      'plan-steps': { type: 'string' },
    });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
    }
    if (v.scheduler !== undefined) return runBatching(v);
    for (const k of ['batch', 'predictor', 'cache', 'max-extra-wait', 'miss-penalty', 'no-oracle', 'pregate-accuracy', 'max-gap-factor', 'recent-decay', 'plan-steps']) {
      if (v[k] !== undefined) throw new UsageError(`--${k} needs --scheduler`);
    }
    const file = required(v, 'trace');
    const policyName = choiceOpt(v, 'policy', POLICY_NAMES, DEFAULT_POLICY) as PolicyName;
    const concurrency = intOpt(v, 'concurrency', 1, 1, 1 << 16);
    const timing = {
      bytesPerExpert: intOpt(v, 'expert-bytes', DEFAULT_BYTES_PER_EXPERT, 1),
      loadBandwidth: numOpt(v, 'load-gbps', DEFAULT_TIMING.loadBandwidth / 1e9, 1e-6, 1e6) * 1e9,
      computeBandwidth: numOpt(v, 'compute-gbps', DEFAULT_TIMING.computeBandwidth / 1e9, 1e-6, 1e6) * 1e9,
      layerBaseSeconds: numOpt(v, 'layer-ms', DEFAULT_TIMING.layerBaseSeconds * 1e3, 0, 1e6) / 1e3,
    };
    if (v.capacity !== undefined && v['total-capacity'] !== undefined) throw new UsageError('give --capacity or --total-capacity, not both');

    let header: TraceHeader | null = null;
    let requests = 0;
    const counted = async function* (src: AsyncGenerator<TraceRequest>) {
      for await (const r of src) {
        requests++;
        yield r;
      }
    };
    const reader = counted(readTrace(file, (h) => (header = h)));
    // The header arrives with the first row; pull it before building the schedule.
    const first = await reader.next();
    if (header === null) throw new Error(`${file}: no header`);
    const h: TraceHeader = header;
    const rest = (async function* () {
      if (!first.done) yield first.value;
      yield* reader;
    })();
    const sched = await buildSchedule(h, rest, { concurrency, prefill: !v['no-prefill'] });

    let split: SplitSpec = EQUAL_SPLIT;
    if (v.split !== undefined) {
      try {
        split = parseSplit(String(v.split), h.layers, 'trace');
      } catch (e) {
        if (e instanceof CapacityError) throw new UsageError(`--split: ${e.message}`);
        throw e;
      }
    }
    // Total slot budgets; the split turns each into slots per layer.
    let budgets: number[];
    if (v.capacity !== undefined) {
      const c = numOpt(v, 'capacity', 0, 1e-9, h.experts);
      budgets = [(Number.isInteger(c) && String(v.capacity).indexOf('.') < 0 ? c : Math.max(1, Math.round(c * h.topK))) * h.layers];
    } else if (v['total-capacity'] !== undefined) {
      const total = intOpt(v, 'total-capacity', 0, h.layers);
      budgets = [split.kind === 'equal' ? Math.floor(total / h.layers) * h.layers : total];
    } else {
      budgets = [1, 2, 4].map((m) => Math.min(h.experts, m * h.topK) * h.layers);
    }
    const slotsOf = (budget: number): number[] => {
      if (split.kind === 'equal') return new Array<number>(h.layers).fill(budget / h.layers);
      try {
        return splitSlots(budget, split.weights, h.experts);
      } catch (e) {
        if (e instanceof CapacityError) throw new UsageError(`--split: ${e.message}`);
        throw e;
      }
    };

    const runs = budgets.map((budget) => {
      const caps = slotsOf(budget);
      const ours = simulate(sched, createCachePolicy(policyName, sched, caps, { prefetch: !v['no-prefetch'] }), timing);
      const opt = policyName === 'belady' ? ours : simulate(sched, createCachePolicy('belady', sched, caps), timing);
      const oracle = simulate(sched, createCachePolicy('belady', sched, caps), timing, { oraclePrefetch: true });
      return { ours, opt, oracle };
    });

    const row = (r: { ours: SimResult; opt: SimResult; oracle: SimResult }) => ({
      // The mean over layers: the slots of every layer with the equal split.
      capacity_per_layer: r.ours.totalSlots / h.layers,
      capacity_vs_active: r.ours.totalSlots / h.layers / h.topK,
      total_slots: r.ours.totalSlots,
      slots_by_layer: r.ours.capacities,
      hit_rate: r.ours.hitRate,
      loads: r.ours.loads,
      demand_loads: r.ours.demandLoads,
      load_bytes: r.ours.loadBytes,
      belady_hit_rate: r.opt.hitRate,
      belady_loads: r.opt.loads,
      loads_vs_belady: r.opt.loads ? r.ours.loads / r.opt.loads : 1,
      stall_free_fraction: r.ours.stallFreeFraction,
      oracle_prefetch_stall_free_fraction: r.oracle.stallFreeFraction,
      prefetch: r.ours.prefetch,
      simulated_seconds: r.ours.seconds,
    });
    const rows = runs.map(row);
    if (v.json) {
      const out: Record<string, unknown> = {
        trace: file,
        model: h.model,
        layers: h.layers,
        experts: h.experts,
        top_k: h.topK,
        requests,
        steps: sched.numSteps,
        concurrency,
        policy: policyName,
        split: splitText(split),
        mean_distinct_experts_per_visit: sched.totalNeeded / (sched.numSteps * h.layers || 1),
        capacities: rows,
      };
      // The single-capacity keys at top level too, for scripts that ask for one capacity.
      if (rows.length === 1) Object.assign(out, rows[0]);
      process.stdout.write(JSON.stringify(out) + '\n');
      return 0;
    }
    const lines = [
      `trace        ${file} (${h.model || 'unnamed'}: ${h.layers} layers, ${h.experts} experts, top-${h.topK})`,
      `replay       ${requests} request(s), ${sched.numSteps} steps, concurrency ${concurrency}, prefill ${v['no-prefill'] ? 'skipped' : 'replayed'}`,
      `policy       ${policyName} vs belady; expert ${(timing.bytesPerExpert / 2 ** 20).toFixed(2)} MiB`,
      `split        ${split.kind === 'equal' ? 'equal across layers' : `by layer weights ${splitText(split)} (slots/layer: the mean over layers)`}`,
      '',
      'slots/layer  hit rate  belady   loads     GiB      vs belady  stall-free  (oracle)  prefetch issued/used/wasted',
    ];
    for (const r of rows) {
      lines.push(
        [
          `${r.capacity_per_layer} (${+r.capacity_vs_active.toFixed(2)}x)`.padEnd(12),
          r.hit_rate.toFixed(3).padStart(8),
          r.belady_hit_rate.toFixed(3).padStart(7),
          String(r.loads).padStart(8),
          (r.load_bytes / 2 ** 30).toFixed(2).padStart(8),
          `${r.loads_vs_belady.toFixed(3)}x`.padStart(10),
          r.stall_free_fraction.toFixed(3).padStart(11),
          r.oracle_prefetch_stall_free_fraction.toFixed(3).padStart(9),
          `  ${r.prefetch.issued}/${r.prefetch.used}/${r.prefetch.wasted}`,
        ].join(' '),
      );
    }
    if (split.kind !== 'equal') {
      lines.push('', 'slots by layer');
      for (const r of rows) lines.push(`  ${String(r.total_slots).padStart(6)} slots: ${r.slots_by_layer.join(' ')}`);
    }
    process.stdout.write(lines.join('\n') + '\n');
    return 0;
  },
};

type Values = Record<string, string | boolean | undefined>;

async function runBatching(v: Values): Promise<number> {
  const file = required(v, 'trace');
  const scheduler = choiceOpt(v, 'scheduler', BATCH_SCHEDULERS) as BatchSchedulerName;
  for (const k of ['policy', 'total-capacity', 'split', 'no-prefetch']) if (v[k] !== undefined) throw new UsageError(`--${k} is for the cache simulation, not --scheduler`);
  const batch = intOpt(v, 'batch', 8, 1, 1 << 16);
  const concurrency = intOpt(v, 'concurrency', 64, 1, 1 << 16);
  const capacity = v.capacity === undefined ? undefined : intOpt(v, 'capacity', 1, 1, 1 << 16);
  const predictor = choiceOpt(v, 'predictor', BATCH_PREDICTORS, DEFAULT_BATCH_PREDICTOR) as BatchPredictorName;
  const cache = choiceOpt(v, 'cache', BATCH_CACHES, 'lru') as BatchCacheName;
  const policy = {
    maxExtraWaitSteps: intOpt(v, 'max-extra-wait', EXPERT_AWARE_DEFAULTS.maxExtraWaitSteps, 0, 1 << 20),
    missPenalty: numOpt(v, 'miss-penalty', EXPERT_AWARE_DEFAULTS.missPenalty, 0, 1e6),
    maxGapFactor: v['max-gap-factor'] === undefined ? undefined : numOpt(v, 'max-gap-factor', 1.5, 1, 1e6),
  };
  const timing = {
    bytesPerExpert: intOpt(v, 'expert-bytes', DEFAULT_BYTES_PER_EXPERT, 1),
    loadBandwidth: numOpt(v, 'load-gbps', DEFAULT_TIMING.loadBandwidth / 1e9, 1e-6, 1e6) * 1e9,
    computeBandwidth: numOpt(v, 'compute-gbps', DEFAULT_TIMING.computeBandwidth / 1e9, 1e-6, 1e6) * 1e9,
    layerBaseSeconds: numOpt(v, 'layer-ms', DEFAULT_TIMING.layerBaseSeconds * 1e3, 0, 1e6) / 1e3,
  };
  const pregateAccuracy = numOpt(v, 'pregate-accuracy', 0.8, 0, 1);
  if (v['pregate-accuracy'] !== undefined && predictor !== 'pregate') throw new UsageError('--pregate-accuracy needs --predictor pregate');
  const recentDecay = v['recent-decay'] === undefined ? undefined : numOpt(v, 'recent-decay', RECENT_ROUTING_DECAY, 0, 0.999);
  if (recentDecay !== undefined && predictor !== 'recent') throw new UsageError('--recent-decay needs --predictor recent');
  const planSteps = intOpt(v, 'plan-steps', DEFAULT_PLAN_STEPS, 0, 1 << 16);
  const base = { batch, concurrency, capacity, predictor, cache, policy, timing, pregateAccuracy, recentDecay, planSteps, prefill: !v['no-prefill'] };
  // Each run streams the file again: the schedule depends on the scheduler.
  const fcfs = await runBatchSim(file, { ...base, scheduler: 'fcfs' });
  const ours = scheduler === 'fcfs' ? fcfs : await runBatchSim(file, { ...base, scheduler });
  const oracle = scheduler === 'expert-aware' && !v['no-oracle'] ? await runBatchSim(file, { ...base, scheduler: 'oracle' }) : scheduler === 'oracle' ? ours : null;
  const out = batchReport(file, ours, fcfs, oracle);
  if (v.json) {
    process.stdout.write(JSON.stringify(out) + '\n');
    return 0;
  }
  process.stdout.write(formatBatchReport(out) + '\n');
  return 0;
}

function figures(r: BatchSimResult, fcfs: BatchSimResult) {
  const f = fairnessVsFcfs(r, fcfs);
  return {
    scheduler: r.scheduler,
    predictor: r.predictor === 'pregate' ? `pregate:${r.pregateAccuracy}` : r.predictor,
    distinct_experts_per_step: r.distinctPerStep,
    loads_per_token: r.loadsPerToken,
    hit_rate: r.hitRate,
    // Steady state (all lanes busy, requests left to join) in both runs: the drain after
    // the file ends happens at different times in the two runs, so it compares unlike states.
    p99_extra_wait_steps: f.p99ExtraWaitSteady,
    max_extra_wait_steps: f.maxExtraWaitSteady,
    p99_extra_wait_steps_all: f.p99ExtraWait,
    max_extra_wait_steps_all: f.maxExtraWait,
    mean_extra_wait_steps_all: f.meanExtraWait,
    p99_gap_steps: f.p99Gap,
    p99_gap_vs_fcfs: f.p99GapVsFcfs,
    steps: r.steps,
    tokens: r.tokens,
    simulated_seconds: r.seconds,
    tokens_per_simulated_second: r.seconds > 0 ? r.tokens / r.seconds : 0,
    regrouped_per_step: r.regroupedPerStep,
    pick_us_mean: r.pickMicrosMean,
    pick_us_p99: r.pickMicrosP99,
    /** The policy's own cost per step over the simulated step time. */
    pick_cost_vs_step: r.steps > 0 && r.seconds > 0 ? r.pickMicrosMean / 1e6 / (r.seconds / r.steps) : 0,
  };
}

export function batchReport(file: string, ours: BatchSimResult, fcfs: BatchSimResult, oracle: BatchSimResult | null) {
  const h = ours.header;
  const o = figures(ours, fcfs);
  const fc = figures(fcfs, fcfs);
  const or = oracle ? figures(oracle, fcfs) : null;
  const saving = (x: number, y: number) => (y > 0 ? 1 - x / y : 0);
  const out: Record<string, unknown> = {
    trace: file,
    model: h.model,
    layers: h.layers,
    experts: h.experts,
    top_k: h.topK,
    requests: ours.requests,
    batch: ours.batch,
    concurrency: ours.concurrency,
    capacity_per_layer: ours.capacity,
    cache: ours.cache,
    plan_steps: ours.planSteps,
    ...o,
    distinct_vs_fcfs: fc.distinct_experts_per_step > 0 ? o.distinct_experts_per_step / fc.distinct_experts_per_step : 1,
    loads_vs_fcfs: fc.loads_per_token > 0 ? o.loads_per_token / fc.loads_per_token : 1,
    distinct_reduction: saving(o.distinct_experts_per_step, fc.distinct_experts_per_step),
    loads_reduction: saving(o.loads_per_token, fc.loads_per_token),
    throughput_vs_fcfs: fc.tokens_per_simulated_second > 0 ? o.tokens_per_simulated_second / fc.tokens_per_simulated_second : 1,
    fcfs: fc,
  };
  if (or && ours.scheduler !== 'oracle') {
    out.oracle = or;
    const od = fc.distinct_experts_per_step - or.distinct_experts_per_step;
    const ol = fc.loads_per_token - or.loads_per_token;
    out.oracle_distinct_reduction = saving(or.distinct_experts_per_step, fc.distinct_experts_per_step);
    out.oracle_loads_reduction = saving(or.loads_per_token, fc.loads_per_token);
    out.share_of_oracle_distinct_savings = od > 0 ? (fc.distinct_experts_per_step - o.distinct_experts_per_step) / od : null;
    out.share_of_oracle_loads_savings = ol > 0 ? (fc.loads_per_token - o.loads_per_token) / ol : null;
  }
  return out;
}

function formatBatchReport(out: Record<string, unknown>): string {
  type Fig = ReturnType<typeof figures>;
  const runs: Fig[] = [out.fcfs as Fig];
  if (out.oracle && out.scheduler !== 'oracle') runs.push(out.oracle as Fig);
  if (out.scheduler !== 'fcfs') runs.push(out as unknown as Fig);
  const fc = out.fcfs as Fig;
  const n = (x: number, d = 3) => x.toFixed(d);
  const lines = [
    `trace        ${out.trace} (${out.model || 'unnamed'}: ${out.layers} layers, ${out.experts} experts, top-${out.top_k}), ${out.requests} requests`,
    `batching     ${out.concurrency} runnable, ${out.batch} per step; ${out.cache} cache of ${out.capacity_per_layer} experts per layer, ` +
      (out.plan_steps ? `keeping what the next ${out.plan_steps} step(s) are expected to need` : 'no schedule-aware eviction'),
    '',
    'scheduler                  distinct/step  vs fcfs  loads/token  vs fcfs  extra wait p99/max (all)    p99 gap vs fcfs  pick us (mean/p99)',
  ];
  for (const r of runs) {
    const name = r.scheduler + (r.predictor ? ` (${r.predictor})` : '');
    lines.push(
      [
        name.padEnd(26),
        n(r.distinct_experts_per_step, 2).padStart(13),
        n(r.distinct_experts_per_step / fc.distinct_experts_per_step).padStart(8),
        n(r.loads_per_token, 2).padStart(12),
        n(r.loads_per_token / fc.loads_per_token).padStart(8),
        `${r.p99_extra_wait_steps}/${r.max_extra_wait_steps} (${r.p99_extra_wait_steps_all}/${r.max_extra_wait_steps_all})`.padStart(28),
        n(r.p99_gap_vs_fcfs, 2).padStart(16),
        `   ${n(r.pick_us_mean, 0)}/${n(r.pick_us_p99, 0)}`,
      ].join(' '),
    );
  }
  if (out.share_of_oracle_distinct_savings !== undefined) {
    const s = out.share_of_oracle_distinct_savings as number | null;
    const sl = out.share_of_oracle_loads_savings as number | null;
    lines.push('', `share of oracle's savings: distinct experts ${s === null ? 'n/a' : n(s)}, loads ${sl === null ? 'n/a' : n(sl)}`);
  }
  return lines.join('\n');
}
