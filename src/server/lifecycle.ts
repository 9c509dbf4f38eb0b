// The server's life: loading → ready → draining (or failed). Tracks the generations in
// flight so that a drain can wait for them, and cancel the rest when the grace ends.

import type { ModelInfo } from '../engine/protocol.js';
import type { Generation } from './generation.js';

export type ServerState = 'loading' | 'ready' | 'failed' | 'draining';

export class Lifecycle {
  state: ServerState = 'loading';
  model: ModelInfo | null = null;
  failure: string | null = null;
  private readonly inflight = new Set<Generation>();
  private idleWaiters: (() => void)[] = [];

  setReady(model: ModelInfo): void {
    this.model = model;
    if (this.state === 'loading') this.state = 'ready';
  }

  setFailed(message: string): void {
    this.failure = message;
    if (this.state === 'loading') this.state = 'failed';
  }

  get inflightCount(): number {
    return this.inflight.size;
  }

  track(g: Generation): void {
    this.inflight.add(g);
    void g.done.then(() => this.untrack(g));
  }

  untrack(g: Generation): void {
    if (!this.inflight.delete(g) || this.inflight.size > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private idle(): Promise<void> {
    if (this.inflight.size === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  /**
   * Stops taking new work and waits up to `graceMs` for the generations in flight; then
   * cancels what is left and waits for those to end. Returns how many were cancelled.
   */
  async drain(graceMs: number): Promise<{ cancelled: number }> {
    this.state = 'draining';
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      this.idle().then(() => false),
      new Promise<boolean>((r) => (timer = setTimeout(() => r(true), graceMs))),
    ]);
    clearTimeout(timer);
    if (!timedOut) return { cancelled: 0 };
    const left = [...this.inflight];
    for (const g of left) g.cancel('server');
    await Promise.race([this.idle(), new Promise((r) => setTimeout(r, 5000).unref())]);
    return { cancelled: left.length };
  }
}
