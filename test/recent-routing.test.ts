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
