// The scheduler, block manager and FCFS policy without a model: a fake step samples a
// token that depends only on the sequence's tokens so far, as a model would.

import t from 'tap';
import { QueueFullError } from '../src/engine/protocol.js';
import { BlockManager } from '../src/scheduler/block-manager.js';
import { FcfsPolicy } from '../src/scheduler/fcfs-policy.js';
import { createPolicy, type PolicyCandidate } from '../src/scheduler/policy.js';
import { KvCapacityError, Scheduler, type SchedulerConfig, type SchedulerOutput } from '../src/scheduler/scheduler.js';

function makeScheduler(over: Partial<SchedulerConfig> = {}): Scheduler {
  let clock = 0;
  return new Scheduler({
    blockSize: 4,
    numBlocks: 64,
    maxBatchTokens: 16,
    maxRunning: 8,
    maxWaiting: 16,
    policy: new FcfsPolicy(),
    now: () => (clock += 1),
    ...over,
  });
}

const prompt = (n: number, base = 1) => Array.from({ length: n }, (_, i) => base + i);

/** Drives a scheduler the way the engine loop does, with a fake model. */
class Sim {
  /** Every token each request has seen (prompt and generated), as the fake model tracks it. */
  readonly seen = new Map<string, number[]>();
  readonly output = new Map<string, number[]>();
  readonly maxTokens = new Map<string, number>();
  readonly finished: string[] = [];
  readonly steps: SchedulerOutput[] = [];

  constructor(readonly s: Scheduler) {}

  add(id: string, promptTokens: number[], maxTokens: number): void {
    this.s.addRequest({ requestId: id, promptTokens, maxTokens });
    this.output.set(id, []);
    this.maxTokens.set(id, maxTokens);
  }

  step(): SchedulerOutput {
    const out = this.s.schedule();
    this.steps.push(out);
    for (const p of out.preempted) this.seen.delete(p.requestId);
    const sampled = new Map<string, number>();
    const done: string[] = [];
    out.batch.forEach((b, i) => {
      const id = out.entries[i].requestId;
      const seen = b.startPos === 0 ? [] : this.seen.get(id)!;
      if (seen.length !== b.startPos) throw new Error(`${id}: step at ${b.startPos} with ${seen.length} computed`);
      seen.push(...b.tokens);
      this.seen.set(id, seen);
      if (!b.wantLogits) return;
      // The fake model's next token: a function of the whole sequence.
      const tok = seen.reduce((a, x, j) => (a * 31 + x * (j + 1)) % 1000, 7);
      const generated = this.output.get(id)!;
      generated.push(tok);
      sampled.set(id, tok);
      if (generated.length === this.maxTokens.get(id)) done.push(id);
    });
    this.s.updateFromOutput(out, sampled);
    this.s.finishRequests(done, 'length');
    this.finished.push(...done);
    return out;
  }

  runToEnd(limit = 1000): number {
    let n = 0;
    while (this.s.hasUnfinished()) {
      if (++n > limit) throw new Error('no progress');
      this.step();
    }
    return n;
  }
}

t.test('block manager: grows sequences, refuses whole, frees at once', async (t) => {
  const bm = new BlockManager(4, 4);
  t.equal(bm.allocate(1, 3)?.length, 1);
  t.equal(bm.allocate(1, 4)?.length, 1, 'still one block for 4 positions');
  t.same([...bm.allocate(1, 5)!], [...bm.blockTable(1)]);
  t.equal(bm.blockTable(1).length, 2);
  t.equal(bm.allocate(2, 9), null, 'three blocks are not free');
  t.equal(bm.usedBlocks, 2, 'a refused allocation holds nothing');
  t.equal(bm.allocate(2, 8)?.length, 2);
  t.equal(bm.freeBlocks, 0);
  t.equal(bm.usage, 1);
  t.notOk(bm.canAllocate(1, 9));
  const all = new Set([...bm.blockTable(1), ...bm.blockTable(2)]);
  t.equal(all.size, 4, 'no block is handed out twice');
  t.equal(bm.free(1), 2);
  t.equal(bm.free(1), 0);
  t.equal(bm.usedBlocks, 2);
});

t.test('fcfs policy: running first, waiting in order, last prompt chunked to the budget', async (t) => {
  const c = (seqId: number, state: 'running' | 'waiting', pending: number): PolicyCandidate => ({
    seqId,
    state,
    arrival: seqId,
    promptTokens: 10,
    computedTokens: 0,
    pendingTokens: pending,
    stepsWaited: 0,
  });
  const p = createPolicy('fcfs');
  t.same(p.pick([c(0, 'running', 1), c(1, 'running', 1), c(2, 'waiting', 10), c(3, 'waiting', 10)], { maxTokens: 8, maxRunning: 8 }), [
    { seqId: 0, numTokens: 1 },
    { seqId: 1, numTokens: 1 },
    { seqId: 2, numTokens: 6 },
  ]);
  t.same(p.pick([c(0, 'running', 1), c(2, 'waiting', 3), c(3, 'waiting', 3)], { maxTokens: 8, maxRunning: 2 }), [
    { seqId: 0, numTokens: 1 },
    { seqId: 2, numTokens: 3 },
  ]);
  t.throws(() => createPolicy('nope'), /unknown batch policy "nope"; policies: fcfs/);
});

t.test('chunked prefill: sizes follow the budget, logits only on the last chunk', async (t) => {
  const sim = new Sim(makeScheduler({ maxBatchTokens: 4 }));
  sim.add('a', prompt(10), 2);
  const chunks = [sim.step(), sim.step(), sim.step()].map((o) => o.batch[0]);
  t.same(
    chunks.map((b) => [b.startPos, b.tokens.length, b.wantLogits]),
    [
      [0, 4, false],
      [4, 4, false],
      [8, 2, true],
    ],
  );
  t.same([...chunks[1].tokens], prompt(10).slice(4, 8));
  const d = sim.step().batch[0];
  t.same([d.startPos, d.tokens.length, d.wantLogits], [10, 1, true], 'then one decode token');
  t.equal(d.tokens[0], sim.output.get('a')![0], 'the decode feeds the sampled token');
  t.equal(sim.s.hasUnfinished(), false);
});

t.test('every step respects the token budget and maxRunning', async (t) => {
  const sim = new Sim(makeScheduler({ maxBatchTokens: 7, maxRunning: 3 }));
  for (let i = 0; i < 10; i++) sim.add(`r${i}`, prompt(3 + ((i * 5) % 11), i), 1 + (i % 4));
  sim.runToEnd();
  for (const o of sim.steps) {
    t.ok(o.numTokens <= 7 && o.numTokens === o.batch.reduce((a, b) => a + b.tokens.length, 0));
    t.ok(o.batch.length <= 3);
    t.ok(o.batch.length > 0, 'no empty step while work remains');
  }
  t.equal(sim.finished.length, 10);
  t.equal(sim.s.stats().kvBlocksUsed, 0);
  t.equal(sim.s.stats().generationTokens, [...sim.output.values()].reduce((a, o) => a + o.length, 0));
});

t.test('running decodes come before waiting prompts', async (t) => {
  const sim = new Sim(makeScheduler({ maxBatchTokens: 4 }));
  sim.add('a', prompt(2), 5);
  sim.add('b', prompt(2, 50), 5);
  sim.step(); // both prompts
  sim.add('c', prompt(10, 100), 2);
  const o = sim.step();
  t.same(
    o.entries.map((e) => [e.requestId, e.numTokens]),
    [
      ['a', 1],
      ['b', 1],
      ['c', 2],
    ],
  );
});

t.test('KV blocks are allocated as sequences grow', async (t) => {
  const sim = new Sim(makeScheduler({ blockSize: 4 }));
  sim.add('a', prompt(3), 8);
  const tables: number[] = [];
  for (let i = 0; i < 7; i++) tables.push(sim.step().batch[0].blockTable.length);
  // Positions after each step: 3, 4, 5, ..., 9 → blocks ceil(pos/4).
  t.same(tables, [1, 1, 2, 2, 2, 2, 3]);
  t.equal(sim.s.stats().kvBlocksUsed, 3);
});

t.test('when blocks run out the newest running sequence is preempted and later resumed unchanged', async (t) => {
  // Alone, each request fits (2 + 6 - 1 = 7 positions → 2 blocks of 4); together they need 4 blocks of 3.
  const expected = new Sim(makeScheduler({ numBlocks: 3 }));
  expected.add('a', prompt(2), 6);
  expected.runToEnd();
  expected.add('b', prompt(2, 40), 6);
  expected.runToEnd();

  const sim = new Sim(makeScheduler({ numBlocks: 3 }));
  sim.add('a', prompt(2), 6);
  sim.add('b', prompt(2, 40), 6);
  let preemptedAt = -1;
  for (let i = 0; sim.s.hasUnfinished() && i < 100; i++) {
    const o = sim.step();
    if (o.preempted.length > 0 && preemptedAt < 0) {
      preemptedAt = i;
      t.same(
        o.preempted.map((p) => p.requestId),
        ['b'],
        'the newest is preempted',
      );
      t.same(
        o.entries.map((e) => e.requestId),
        ['a'],
      );
      t.equal(sim.s.stats().waiting, 1);
    }
  }
  t.ok(preemptedAt > 0);
  t.equal(sim.s.stats().preemptions, 1);
  const resumed = sim.steps.find((o, i) => i > preemptedAt && o.entries.some((e) => e.requestId === 'b'))!;
  const b = resumed.batch[resumed.entries.findIndex((e) => e.requestId === 'b')];
  t.equal(b.startPos, 0, 'recomputed from the start');
  t.ok(b.wantLogits);
  t.same([...b.tokens], [...prompt(2, 40), ...sim.output.get('b')!.slice(0, b.tokens.length - 2)], 'prompt plus tokens generated so far');
  t.same(sim.output.get('a'), expected.output.get('a'));
  t.same(sim.output.get('b'), expected.output.get('b'), 'the preempted output is unchanged');
  t.equal(sim.s.stats().kvBlocksUsed, 0);
});

t.test('finishing a request frees its blocks at once, wherever it is', async (t) => {
  const sim = new Sim(makeScheduler({ maxRunning: 1 }));
  sim.add('a', prompt(9), 20);
  sim.add('b', prompt(3), 20);
  sim.step();
  sim.step();
  t.equal(sim.s.stats().kvBlocksUsed, 3);
  const [f] = sim.s.finishRequests(['a'], 'abort');
  t.match(f, { requestId: 'a', reason: 'abort', promptTokens: 9, completionTokens: 2 });
  t.equal(sim.s.stats().kvBlocksUsed, 0, 'freed before any further step');
  t.same(sim.s.finishRequests(['a', 'zzz'], 'abort'), [], 'unknown ids are skipped');
  t.equal(sim.s.finishRequests(['b'], 'abort')[0].completionTokens, 0, 'a waiting request can be cancelled too');
  t.equal(sim.s.hasUnfinished(), false);
});

t.test('the waiting queue is bounded', async (t) => {
  const s = makeScheduler({ maxWaiting: 2 });
  s.addRequest({ requestId: 'a', promptTokens: [1], maxTokens: 1 });
  s.addRequest({ requestId: 'b', promptTokens: [1], maxTokens: 1 });
  const e = (() => {
    try {
      s.addRequest({ requestId: 'c', promptTokens: [1], maxTokens: 1 });
    } catch (e) {
      return e;
    }
  })();
  t.ok(e instanceof QueueFullError);
  t.equal((e as QueueFullError).waiting, 2);
  t.ok((e as QueueFullError).retryAfterSeconds >= 1);
  t.throws(() => s.addRequest({ requestId: 'a', promptTokens: [1], maxTokens: 1 }), /already scheduled/);
});

t.test('a request larger than the whole pool is rejected', async (t) => {
  const s = makeScheduler({ numBlocks: 2, blockSize: 4 });
  t.throws(() => s.addRequest({ requestId: 'big', promptTokens: prompt(6), maxTokens: 4 }), KvCapacityError);
  t.throws(() => s.addRequest({ requestId: 'big', promptTokens: prompt(6), maxTokens: 4 }), /needs up to 9 KV positions but the KV pool holds 8/);
  s.addRequest({ requestId: 'fits', promptTokens: prompt(6), maxTokens: 3 }); // 8 positions
  t.equal(s.stats().waiting, 1);
});

t.test('no starvation under a steady stream of arrivals', async (t) => {
  const sim = new Sim(makeScheduler({ maxBatchTokens: 6, maxRunning: 2, maxWaiting: 64, numBlocks: 8 }));
  const addedAt = new Map<string, number>();
  const doneAt = new Map<string, number>();
  // A long prompt first in a stream of short requests, one new request every step.
  for (let step = 0; step < 120; step++) {
    if (step < 80) {
      const id = `r${step}`;
      sim.add(id, step === 3 ? prompt(25) : prompt(2, step), 3);
      addedAt.set(id, step);
    }
    const before = sim.finished.length;
    sim.step();
    for (const id of sim.finished.slice(before)) doneAt.set(id, step);
  }
  sim.runToEnd();
  t.equal(sim.finished.length, 80, 'everything finishes');
  t.ok(doneAt.has('r3'), 'the long prompt finished during the stream');
  const order = [...addedAt.keys()].filter((id) => doneAt.has(id));
  const admitted = sim.steps.flatMap((o) => o.entries.filter((e, i) => o.batch[i].startPos === 0).map((e) => e.requestId));
  t.same(admitted.slice(0, order.length), order, 'admitted in arrival order');
  const wait = Math.max(...order.map((id) => doneAt.get(id)! - addedAt.get(id)!));
  t.ok(wait < 60, `bounded time in the engine (${wait} steps)`);
});

t.test('a policy that breaks the budget is caught', async (t) => {
  const s = makeScheduler({
    maxBatchTokens: 4,
    policy: { name: 'greedy-bug', pick: (c) => c.map((x) => ({ seqId: x.seqId, numTokens: x.pendingTokens })) },
  });
  s.addRequest({ requestId: 'a', promptTokens: prompt(9), maxTokens: 1 });
  t.throws(() => s.schedule(), /policy greedy-bug picked 9 tokens; the step budget is 4/);
});
