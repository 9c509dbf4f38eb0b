// The scheduler, block manager and FCFS policy without a model: a fake step samples a
// token that depends only on the sequence's tokens so far, as a model would.

import t from 'tap';
import { QueueFullError } from '../src/engine/protocol.js';
import { BlockManager } from '../src/scheduler/block-manager.js';
import { ExpertAwarePolicy } from '../src/scheduler/expert-aware-policy.js';
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
  t.throws(() => createPolicy('nope'), /unknown batch policy "nope"; policies: fcfs, expert-aware/);
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

// ---------------------------------------------------------------------------------------
// Expert-aware policy (issue 6)

const decode = (seqId: number, stepsWaited: number, experts?: number[][], state: 'running' | 'waiting' = 'running', pending = 1): PolicyCandidate => ({
  seqId,
  state,
  arrival: seqId,
  promptTokens: 4,
  computedTokens: state === 'running' ? 4 : 0,
  pendingTokens: pending,
  stepsWaited,
  hints: experts ? { predictedExperts: experts } : undefined,
});

t.test('expert-aware policy: equals FCFS when everything fits', async (t) => {
  const ea = new ExpertAwarePolicy();
  const fcfs = new FcfsPolicy();
  const sets = [[[0, 1]], [[2, 3]], [[0, 1]], [[4, 5]]];
  const cands = [decode(0, 0, sets[0]), decode(1, 2, sets[1]), decode(2, 1, sets[2]), decode(3, 0, sets[3]), decode(4, 0, undefined, 'waiting', 6), decode(5, 0, undefined, 'waiting', 6)];
  for (const budget of [
    { maxTokens: 16, maxRunning: 8 },
    { maxTokens: 8, maxRunning: 8 },
    { maxTokens: 4, maxRunning: 8 },
    { maxTokens: 16, maxRunning: 5 },
  ]) {
    t.same(ea.pick(cands, budget), fcfs.pick(cands, budget), JSON.stringify(budget));
  }
  t.equal(ea.lastRegrouped, 0);
  t.ok(ea.lastPickMicros >= 0 && ea.pickCalls === 4, 'pick cost measured');
  t.equal(createPolicy('expert-aware').name, 'expert-aware');
});

t.test('expert-aware policy: groups shared and resident experts, respects the budget', async (t) => {
  const ea = new ExpertAwarePolicy({ maxExtraWaitSteps: 4 });
  // Two layers; sequences 1, 3, 5 predict experts {0,1}/{2,3}; 0, 2, 4 predict disjoint sets.
  const same = [
    [0, 1],
    [2, 3],
  ];
  const cands = [0, 1, 2, 3, 4, 5].map((i) =>
    decode(
      i,
      0,
      i % 2
        ? same
        : [
            [10 + i, 11 + i],
            [20 + i, 21 + i],
          ],
    ),
  );
  const picks = ea.pick(cands, { maxTokens: 3, maxRunning: 8 });
  t.equal(picks.length, 3);
  t.same(picks.map((p) => p.seqId).sort(), [1, 3, 5], 'the three sharing sequences');
  t.ok(picks.every((p) => p.numTokens === 1));
  t.equal(ea.lastRegrouped, 2, 'two picks differ from FCFS (0, 1, 2)');

  // Resident experts: with sequence 0's experts resident, it is picked over an equal one.
  const E = 32;
  const res = [new Uint8Array(E), new Uint8Array(E)];
  for (const e of [10, 11]) res[0][e] = 1;
  for (const e of [20, 21]) res[1][e] = 1;
  const two = [
    decode(2, 0, [
      [12, 13],
      [22, 23],
    ]),
    decode(0, 0, [
      [10, 11],
      [20, 21],
    ]),
  ];
  t.same(ea.pick(two, { maxTokens: 1, maxRunning: 8, resident: res }), [{ seqId: 0, numTokens: 1 }]);
  t.same(ea.pick(two, { maxTokens: 1, maxRunning: 8 }), [{ seqId: 2, numTokens: 1 }], 'without residency: FCFS order breaks the tie');

  // Prompt chunks share the token budget; waiting prompts come after running ones.
  const mixed = [decode(0, 0, same), decode(1, 0, same, 'running', 10), decode(2, 0, undefined), decode(3, 0, undefined, 'waiting', 5)];
  const p2 = ea.pick(mixed, { maxTokens: 6, maxRunning: 8 });
  t.ok(p2.reduce((a, p) => a + p.numTokens, 0) <= 6, 'token budget');
  const p3 = ea.pick(mixed, { maxTokens: 6, maxRunning: 3 });
  t.notOk(
    p3.some((p) => p.seqId === 3),
    'maxRunning: no admission',
  );
});

t.test('expert-aware policy: a sequence at the bound is picked first; ms bound', async (t) => {
  const ea = new ExpertAwarePolicy({ maxExtraWaitSteps: 2 });
  const cheap = [[0, 1]];
  // Sequence 9 has waited 8 steps with its own experts; 8 runnable, 2 per step: FCFS
  // would have served it within 3 steps, so 8 > 3 + 2 and it must go first.
  const cands = [decode(9, 8, [[30, 31]]), ...[0, 1, 2, 3, 4, 5, 6].map((i) => decode(i, 0, cheap))];
  const picks = ea.pick(cands, { maxTokens: 2, maxRunning: 8 });
  t.equal(picks[0].seqId, 9);
  t.equal(ea.lastDue, 1);
  const ms = new ExpertAwarePolicy({ maxExtraWaitSteps: 10, maxExtraWaitMs: 20 });
  t.equal(ms.boundSteps(10), 2, '20 ms at 10 ms per step');
  t.equal(ms.boundSteps(1), 10, 'the step bound when smaller');
  t.throws(() => new ExpertAwarePolicy({ maxExtraWaitSteps: -1 }));
});

t.test('expert-aware policy in the scheduler: budgets hold, nobody waits beyond the bound', async (t) => {
  const bound = 3;
  const policy = new ExpertAwarePolicy({ maxExtraWaitSteps: bound });
  // maxRunning 12 with a 4-token budget: more decodes are runnable than fit a step.
  const s = makeScheduler({ maxBatchTokens: 4, maxRunning: 12, maxWaiting: 32, policy });
  const sim = new Sim(s);
  const rng = (() => {
    let x = 7;
    return () => ((x = (x * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
  })();
  for (let i = 0; i < 12; i++) {
    const group = i % 3;
    s.addRequest({ requestId: `r${i}`, promptTokens: prompt(2, i * 10), maxTokens: 30, hints: { predictedExperts: [[group * 4, group * 4 + 1]] } });
    sim.output.set(`r${i}`, []);
    sim.maxTokens.set(`r${i}`, 30);
  }
  const lastRun = new Map<string, number>();
  let maxGap = 0;
  let steps = 0;
  while (s.hasUnfinished()) {
    if (++steps > 2000) throw new Error('no progress');
    const out = sim.step();
    t.ok(out.numTokens <= 4, 'token budget');
    t.ok(s.stats().running <= 12, 'maxRunning');
    for (const e of out.entries) {
      const prev = lastRun.get(e.requestId);
      if (prev !== undefined) maxGap = Math.max(maxGap, steps - prev - 1);
      lastRun.set(e.requestId, steps);
    }
    void rng;
  }
  t.equal(sim.finished.length, 12, 'every request finished');
  // Round robin over 12 decodes in steps of 4: FCFS waits 2 steps; ours at most 2 + bound
  // (one more while prompts are still being admitted at the start).
  t.ok(maxGap <= 2 + bound + 1, `max wait between tokens ${maxGap} <= ${2 + bound + 1}`);
  t.ok(policy.pickCalls > 0 && policy.totalPickMicros / policy.pickCalls < 5000, `pick cost ${policy.totalPickMicros / policy.pickCalls} us`);
});
