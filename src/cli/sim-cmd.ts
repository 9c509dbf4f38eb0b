import { readTrace, type TraceHeader, type TraceRequest } from '../offload/trace.js';
import { buildSchedule } from '../offload/schedule.js';
import { createCachePolicy, DEFAULT_BYTES_PER_EXPERT, DEFAULT_POLICY, DEFAULT_TIMING, POLICY_NAMES, simulate, type PolicyName, type SimResult } from '../offload/simulator.js';
import { choiceOpt, intOpt, numOpt, parse, required, UsageError } from './args.js';

const HELP = `usage: moe-serve sim --trace FILE [--policy ${POLICY_NAMES.join('|')}] [--capacity N|F]
                     [--total-capacity N] [--concurrency M] [--no-prefill] [--no-prefetch]
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
  - hit rate = needed (visit, expert) pairs already resident / all needed pairs.
    loads = demand loads + started prefetches (wasted ones included); Belady evicts
    the expert whose next use is furthest away (optimal demand loading).
  - stall-free fraction: visits whose experts were all resident or prefetched in time.
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
`;

export const simCommand = {
  summary: 'simulate an expert cache policy on a routing trace against Belady',
  async run(argv: string[]): Promise<number> {
    const v = parse(argv, {
      trace: { type: 'string' },
      policy: { type: 'string' },
      capacity: { type: 'string' },
      'total-capacity': { type: 'string' },
      concurrency: { type: 'string' },
      'no-prefill': { type: 'boolean' },
      'no-prefetch': { type: 'boolean' },
      'expert-bytes': { type: 'string' },
      'load-gbps': { type: 'string' },
      'compute-gbps': { type: 'string' },
      'layer-ms': { type: 'string' },
      json: { type: 'boolean' },
    });
    if (v.help) {
      process.stdout.write(HELP);
      return 0;
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

    let capacities: number[];
    if (v.capacity !== undefined) {
      const c = numOpt(v, 'capacity', 0, 1e-9, h.experts);
      capacities = [Number.isInteger(c) && String(v.capacity).indexOf('.') < 0 ? c : Math.max(1, Math.round(c * h.topK))];
    } else if (v['total-capacity'] !== undefined) {
      const total = intOpt(v, 'total-capacity', 0, h.layers);
      capacities = [Math.floor(total / h.layers)];
    } else {
      capacities = [1, 2, 4].map((m) => Math.min(h.experts, m * h.topK));
    }

    const runs = capacities.map((cap) => {
      const ours = simulate(sched, createCachePolicy(policyName, sched, cap, { prefetch: !v['no-prefetch'] }), timing);
      const opt = policyName === 'belady' ? ours : simulate(sched, createCachePolicy('belady', sched, cap), timing);
      return { cap, ours, opt };
    });

    const row = (r: { cap: number; ours: SimResult; opt: SimResult }) => ({
      capacity_per_layer: r.cap,
      capacity_vs_active: r.cap / h.topK,
      hit_rate: r.ours.hitRate,
      loads: r.ours.loads,
      demand_loads: r.ours.demandLoads,
      load_bytes: r.ours.loadBytes,
      belady_hit_rate: r.opt.hitRate,
      belady_loads: r.opt.loads,
      loads_vs_belady: r.opt.loads ? r.ours.loads / r.opt.loads : 1,
      stall_free_fraction: r.ours.stallFreeFraction,
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
      '',
      'slots/layer  hit rate  belady   loads     GiB      vs belady  stall-free  prefetch issued/used/wasted',
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
          `  ${r.prefetch.issued}/${r.prefetch.used}/${r.prefetch.wasted}`,
        ].join(' '),
      );
    }
    process.stdout.write(lines.join('\n') + '\n');
    return 0;
  },
};
