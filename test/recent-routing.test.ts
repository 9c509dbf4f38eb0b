// RecentRouting: the batch policy's prediction of a sequence's next experts from its
// recent routing (decayed counts, weight min(1, count)).

import t from 'tap';
import { RecentRouting } from '../src/scheduler/recent-routing.js';

t.test('decayed counts: the last token certain, older ones by their decayed count', async (t) => {
  const r = new RecentRouting(2, 0.5);
  t.equal(r.hint(7), undefined, 'nothing before any routing');
  r.observe(7, 0, [1, 2]);
  r.observe(7, 0, [2, 3]);
  r.observe(7, 1, [9, 4, 5], 1, 2); // ids[1..3)
  const h = r.hint(7)!;
  const w0 = new Map(h.experts[0].map((e, i) => [e, h.weights![0][i]]));
  t.same(Object.fromEntries(w0), { 1: 0.5, 2: 1, 3: 1 }, 'layer 0: 1 decayed once, 2 = min(1, 1.5), 3 new');
  t.same([...h.experts[1]].sort(), [4, 5], 'layer 1: the slice given');
  // Counts under 0.05 are dropped: 1 after 5 more tokens is 0.5^6 < 0.05.
  for (let i = 0; i < 4; i++) r.observe(7, 0, [10, 11]);
  t.notOk(r.hint(7)!.experts[0].includes(1), 'old expert dropped');
  t.ok(r.hint(7)!.experts[0].includes(3), 'younger one kept (0.5^4 = 0.0625)');
  t.ok(r.has(7));
  t.equal(r.size, 1);
  r.delete(7);
  t.equal(r.hint(7), undefined);
  t.equal(r.size, 0);
  t.throws(() => new RecentRouting(2, 1), /decay must be in \[0, 1\)/);
  t.throws(() => new RecentRouting(2, -0.1));
});

t.test("a sequence's hint is kept until its own next routing, and equals a fresh one", async (t) => {
  const r = new RecentRouting(3, 0.7);
  const fresh = new RecentRouting(3, 0.7);
  const both = (seq: number, layer: number, ids: number[]) => {
    r.observe(seq, layer, ids);
    fresh.observe(seq, layer, ids);
  };
  for (let l = 0; l < 3; l++) {
    both(1, l, [l, 5, 6]);
    both(2, l, [7, 8, l + 10]);
  }
  const h1 = r.hint(1)!;
  const h2 = r.hint(2)!;
  t.equal(r.hint(1), h1, 'asked again: the same hint, not rebuilt');
  both(2, 1, [8, 9, 20]);
  t.equal(r.hint(1), h1, "another sequence's routing leaves it alone");
  const h2b = r.hint(2)!;
  t.not(h2b, h2, "the sequence's own routing renews it");
  t.same(h2b, fresh.hint(2), 'the renewed hint is the one computed from scratch');
  t.ok(h2b.experts[1].includes(9) && !h2.experts[1].includes(9), 'and it holds the new token');
  t.same(r.hint(1), fresh.hint(1));
  r.delete(1);
  t.equal(r.hint(1), undefined, 'a deleted sequence has no hint');
  r.observe(1, 0, [3]);
  t.same(r.hint(1)!.experts, [[3], [], []], 'a sequence seen again starts over');
});
