// Prometheus metrics (prom-client), named like vLLM's where they correspond, under the
// moe_ prefix. Engine gauges are read from engine.stats() at scrape time; latencies and
// token counts are observed by the server as responses are produced.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, type Metric } from 'prom-client';
import type { BatchingStats, EngineStats, OffloadLayerStats, OffloadStats } from '../engine/protocol.js';

const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640];
const ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80];
const E2E_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920];

/** A histogram whose cumulative buckets are kept elsewhere (the engine worker) and exposed as they are at scrape time. */
interface HistogramSnapshot {
  policy: string;
  /** Upper bounds, ascending. */
  buckets: readonly number[];
  /** Cumulative counts: counts[i] observations <= buckets[i]. */
  counts: readonly number[];
  sum: number;
  count: number;
}

/**
 * A counter labelled by policy that mirrors a cumulative value kept elsewhere (the engine
 * worker): at scrape time it is incremented by what the value grew since the last scrape.
 * Without a source (the feature is off) it exposes no samples at all, not zeros.
 */
function mirroredPolicyCounter<S extends { policy: string }>(r: Registry[], name: string, help: string, source: () => S | null, pick: (s: S) => number): void {
  let seen = 0;
  new Counter({
    name,
    help,
    labelNames: ['policy'],
    registers: r,
    collect() {
      const s = source();
      if (!s) return;
      const v = pick(s);
      this.inc({ policy: s.policy }, v > seen ? v - seen : 0);
      if (v > seen) seen = v;
    },
  });
}

function snapshotHistogram(name: string, help: string, read: () => HistogramSnapshot | null): Metric {
  const metric = {
    name,
    help,
    type: 'histogram' as const,
    aggregator: 'sum' as const,
    reset(): void {},
    async get() {
      const h = read();
      const values: { value: number; labels: Record<string, string | number>; metricName: string }[] = [];
      if (h) {
        h.buckets.forEach((le, i) => values.push({ value: h.counts[i], labels: { le, policy: h.policy }, metricName: `${name}_bucket` }));
        values.push({ value: h.count, labels: { le: '+Inf', policy: h.policy }, metricName: `${name}_bucket` });
        values.push({ value: h.sum, labels: { policy: h.policy }, metricName: `${name}_sum` });
        values.push({ value: h.count, labels: { policy: h.policy }, metricName: `${name}_count` });
      }
      return { name, help, type: 'histogram' as const, aggregator: 'sum' as const, values };
    },
  };
  // prom-client's registry only needs name, help, type, get() and reset() of a metric.
  return metric as unknown as Metric;
}

export type FinishedReason = 'stop' | 'length' | 'abort' | 'error';

export class ServerMetrics {
  readonly registry = new Registry();
  readonly ttft: Histogram;
  readonly interTokenLatency: Histogram;
  readonly e2eLatency: Histogram;
  readonly queueTime: Histogram;
  readonly promptTokens: Counter;
  readonly generationTokens: Counter;
  readonly requestSuccess: Counter<'finished_reason'>;
  readonly requestRejected: Counter<'reason'>;

  /** `stats` returns null while the engine is not started. */
  constructor(stats: () => EngineStats | null, opts: { defaultMetrics?: boolean } = {}) {
    const r = [this.registry];
    const safeStats = (): EngineStats | null => {
      try {
        return stats();
      } catch {
        return null;
      }
    };
    const gauge = (name: string, help: string, pick: (s: EngineStats) => number) =>
      new Gauge({
        name,
        help,
        registers: r,
        collect() {
          const s = safeStats();
          if (s) this.set(pick(s));
        },
      });
    gauge('moe_num_requests_running', 'Requests the engine is running (prefill or decode).', (s) => s.running);
    gauge('moe_num_requests_waiting', 'Requests waiting for the engine.', (s) => s.waiting);
    gauge('moe_kv_cache_usage_perc', 'Fraction of KV-cache blocks in use (1 = full).', (s) => (s.kvBlocksTotal > 0 ? s.kvBlocksUsed / s.kvBlocksTotal : 0));
    gauge('moe_kv_cache_blocks_used', 'KV-cache blocks in use.', (s) => s.kvBlocksUsed);
    let seenPreemptions = 0;
    new Counter({
      name: 'moe_num_preemptions_total',
      help: 'Sequences the scheduler preempted (KV cache full), cumulative.',
      registers: r,
      collect() {
        const s = safeStats();
        if (s && s.preemptions > seenPreemptions) {
          this.inc(s.preemptions - seenPreemptions);
          seenPreemptions = s.preemptions;
        }
      },
    });
    this.offloadMetrics(r, () => safeStats()?.offload ?? null);
    this.batchingMetrics(this.registry, () => safeStats()?.batching ?? null);
    this.promptTokens = new Counter({ name: 'moe_prompt_tokens_total', help: 'Prompt tokens of served requests.', registers: r });
    this.generationTokens = new Counter({ name: 'moe_generation_tokens_total', help: 'Tokens generated for served requests.', registers: r });
    this.requestSuccess = new Counter({
      name: 'moe_request_success_total',
      help: 'Finished engine requests (one per choice) by finish reason.',
      labelNames: ['finished_reason'],
      registers: r,
    });
    this.requestRejected = new Counter({
      name: 'moe_request_rejected_total',
      help: 'Generation requests refused before reaching the engine, by reason.',
      labelNames: ['reason'],
      registers: r,
    });
    this.ttft = new Histogram({ name: 'moe_time_to_first_token_seconds', help: 'Time from submission to the first generated token.', buckets: TTFT_BUCKETS, registers: r });
    this.interTokenLatency = new Histogram({ name: 'moe_inter_token_latency_seconds', help: 'Time between consecutive generated tokens of a request.', buckets: ITL_BUCKETS, registers: r });
    this.e2eLatency = new Histogram({ name: 'moe_e2e_request_latency_seconds', help: 'Time from submission to the end of a request.', buckets: E2E_BUCKETS, registers: r });
    this.queueTime = new Histogram({ name: 'moe_request_queue_time_seconds', help: 'Time a request waited before its first engine step.', buckets: E2E_BUCKETS, registers: r });
    if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry });
  }

  /**
   * Expert offloading (present when the engine offloads experts): cache counters per layer,
   * store totals, and pre-gating quality per lookahead distance. Counters follow the
   * engine's cumulative values (incremented by what changed since the last scrape).
   */
  private offloadMetrics(r: Registry[], offload: () => OffloadStats | null): void {
    const perLayer = (name: string, help: string, pick: (l: OffloadLayerStats) => number) => {
      const seen: number[] = [];
      new Counter({
        name,
        help,
        labelNames: ['layer'],
        registers: r,
        collect() {
          const o = offload();
          if (!o) return;
          o.layers.forEach((l, i) => {
            const v = pick(l);
            const d = v - (seen[i] ?? 0);
            // Always emit the series (inc by 0) so that every layer shows from the first scrape.
            this.inc({ layer: String(i) }, d > 0 ? d : 0);
            if (d > 0) seen[i] = v;
          });
        },
      });
    };
    perLayer('moe_expert_cache_hits_total', 'Experts a layer visit needed that were resident or already loading (prefetched ones included), by layer.', (l) => l.hits);
    perLayer('moe_expert_cache_misses_total', 'Experts a layer visit needed that had to be loaded on demand, by layer.', (l) => l.misses);
    perLayer('moe_expert_prefetch_issued_total', 'Expert prefetch reads requested, by layer (issued = used + wasted + cancelled + pending).', (l) => l.prefetchIssued);
    perLayer('moe_expert_prefetch_used_total', 'Prefetched experts needed before their eviction, by layer.', (l) => l.prefetchUsed);
    perLayer('moe_expert_prefetch_wasted_total', 'Prefetched experts evicted unused (a full read each), by layer.', (l) => l.prefetchWasted);
    perLayer('moe_expert_prefetch_cancelled_total', 'Stale prefetches withdrawn before their read started, by layer.', (l) => l.prefetchCancelled);
    perLayer('moe_expert_stall_seconds_total', 'Time steps waited for experts still being read, by layer.', (l) => l.stallSeconds);
    perLayer('moe_expert_layer_visits_total', 'Layer visits of the offloading engine, by layer.', (l) => l.visits);
    perLayer('moe_expert_stalled_visits_total', 'Layer visits that waited for at least one expert read, by layer.', (l) => l.stalledVisits);
    perLayer('moe_expert_streamed_visits_total', 'Layer visits that needed more experts than the layer has slots and streamed them through the slots, by layer.', (l) => l.streamedVisits);
    // Metrics without a layer or distance carry the policy as a label, so that a server
    // without offloading exposes no offload samples at all (not zeros).
    const total = (name: string, help: string, pick: (o: OffloadStats) => number) => mirroredPolicyCounter(r, name, help, offload, pick);
    total('moe_expert_loads_total', 'Expert reads completed by the expert store.', (o) => o.loads);
    total('moe_expert_loaded_bytes_total', 'Bytes the expert store read from the slow tier (completed reads, and the part read of abandoned prefetch reads).', (o) => o.bytesLoaded);
    total('moe_expert_prefetch_read_pauses_total', 'Times a prefetch read paused between its pieces so that a demand read had the slow tier to itself.', (o) => o.prefetchPauses ?? 0);
    total('moe_expert_prefetch_reads_abandoned_total', 'Prefetch reads stopped part way because their slot was taken meanwhile.', (o) => o.prefetchAbandoned ?? 0);
    total('moe_expert_cache_resets_total', 'Times a failed engine step made the expert cache start over empty.', (o) => o.cacheResets);
    // The runner's own decisions, by part: what offloading costs on the critical path.
    {
      const parts = ['visit', 'prefetch', 'learn', 'idle'] as const;
      const seen = { visit: 0, prefetch: 0, learn: 0, idle: 0 };
      new Counter({
        name: 'moe_expert_policy_seconds_total',
        help:
          "Seconds the offloading runner spent in its own decisions, by part: visit (the cache policy's choices at layer visits), prefetch (predictions, prefetch choices) and learn (after each step) are on the step's critical path; idle (deferred learning) runs while a visit waits for reads.",
        labelNames: ['policy', 'part'],
        registers: r,
        collect() {
          const o = offload();
          const p = o?.policySeconds;
          if (!o || !p) return;
          for (const k of parts) {
            this.inc({ policy: o.policy, part: k }, p[k] > seen[k] ? p[k] - seen[k] : 0);
            if (p[k] > seen[k]) seen[k] = p[k];
          }
        },
      });
    }
    const gauge = (name: string, help: string, pick: (o: OffloadStats) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['policy'],
        registers: r,
        collect() {
          const o = offload();
          if (o) this.set({ policy: o.policy }, pick(o));
        },
      });
    // Slots by layer: the capacity is split across layers by the offloadSplit setting, equally or not.
    new Gauge({
      name: 'moe_expert_cache_slots',
      help: 'Expert slots of a layer (the capacity split across layers by the offloadSplit setting), by layer.',
      labelNames: ['layer'],
      registers: r,
      collect() {
        const o = offload();
        if (o) o.slotsByLayer.forEach((n, l) => this.set({ layer: String(l) }, n));
      },
    });
    gauge('moe_expert_slot_bytes', 'Bytes of one expert slot.', (o) => o.slotBytes);
    const byDistance = (name: string, help: string, pick: (p: OffloadStats['prediction'][number]) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['distance'],
        registers: r,
        collect() {
          const o = offload();
          if (o) for (const p of o.prediction) this.set({ distance: String(p.distance) }, pick(p));
        },
      });
    byDistance('moe_expert_prediction_recall', "Pre-gating recall: share of the experts tokens used that their prediction d layers earlier had, by distance d.", (p) => p.recall);
    byDistance('moe_expert_prediction_precision', 'Pre-gating precision: share of predicted experts that tokens used, by distance d.', (p) => p.precision);
    byDistance('moe_expert_prediction_tokens', 'Predicted (token, expert) pairs behind the recall and precision gauges, by distance d.', (p) => p.predicted);
  }

  /**
   * Batch formation, labelled by policy: distinct experts per step (histogram; steps whose
   * routing the runner sees: offloading or routing replay), regrouping decisions, due
   * picks, extra wait against round-robin FCFS (histogram), and the policy's own cost.
   * The engine keeps the cumulative values; these mirror them at scrape time.
   */
  private batchingMetrics(registry: Registry, batching: () => BatchingStats | null): void {
    const r = [registry];
    registry.registerMetric(
      snapshotHistogram('moe_batch_distinct_experts_per_step', 'Distinct experts a step activated, mean over layers (steps whose routing the engine sees: expert offloading or routing replay), by batch policy.', () => {
        const b = batching();
        return b && b.distinctSteps > 0 ? { policy: b.policy, buckets: b.distinctBuckets, counts: b.distinctCounts, sum: b.distinctSum, count: b.distinctSteps } : null;
      }),
    );
    registry.registerMetric(
      snapshotHistogram(
        'moe_batch_extra_wait_steps',
        'Steps a decode token waited beyond what round-robin FCFS would have made it wait (pending tokens ahead of it when it became ready / step budget), per token, by batch policy.',
        () => {
          const b = batching();
          return b && b.extraWaitTokens > 0 ? { policy: b.policy, buckets: b.extraWaitBuckets, counts: b.extraWaitCounts, sum: b.extraWaitSum, count: b.extraWaitTokens } : null;
        },
      ),
    );
    const total = (name: string, help: string, pick: (b: BatchingStats) => number) => mirroredPolicyCounter(r, name, help, batching, pick);
    total('moe_batch_regrouped_picks_total', 'Sequences the batch policy put in a step that FCFS would not have (regrouping decisions).', (b) => b.regroupedPicks);
    total('moe_batch_due_picks_total', 'Sequences picked first because they reached the policy\'s extra-wait bound.', (b) => b.duePicks);
    total('moe_batch_policy_pick_seconds_total', "Time spent in the batch policy's pick (policies that measure it: expert-aware).", (b) => b.pickSeconds);
    total('moe_batch_policy_picks_total', "Calls of the batch policy's pick (policies that measure it: expert-aware).", (b) => b.pickCalls);
    total(
      'moe_batch_schedule_seconds_total',
      "Time spent forming steps, every policy: the scheduler's whole call, with the routing hints and resident experts an expert-aware policy reads, its pick and the list of the sequences of the next steps.",
      (b) => b.scheduleSeconds,
    );
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  async render(): Promise<string> {
    return this.registry.metrics();
  }
}
