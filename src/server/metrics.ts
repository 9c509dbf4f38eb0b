// Prometheus metrics (prom-client), named like vLLM's where they correspond, under the
// moe_ prefix. Engine gauges are read from engine.stats() at scrape time; latencies and
// token counts are observed by the server as responses are produced.

import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { EngineStats } from '../engine/protocol.js';

const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640];
const ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80];
const E2E_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920];

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

  get contentType(): string {
    return this.registry.contentType;
  }

  async render(): Promise<string> {
    return this.registry.metrics();
  }
}
