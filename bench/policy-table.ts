// Loads-vs-Belady table for the expert cache policies on moe-trace files:
//   node --import=tsx bench/policy-table.ts [--concurrency M] [--mult 1,2,4] [--policies a,b] FILE...
// One line per (file, capacity), then one line of JSON: `figures`, each policy's loads
// as a ratio to Belady's optimum at the same capacity.
import { buildSchedule } from '../src/offload/schedule.js';
import { createCachePolicy, POLICY_NAMES, simulate, type PolicyName } from '../src/offload/simulator.js';
import { loadTrace } from '../src/offload/trace.js';

const args = process.argv.slice(2);
let conc = 1;
let mults = [1, 2, 4];
let policies: PolicyName[] = POLICY_NAMES.filter((p) => p !== 'belady' && p !== 'lfu');
const files: string[] = [];
const figures: { name: string; value: number; unit: string; compared_to: string }[] = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--concurrency') conc = Number(args[++i]);
  else if (args[i] === '--mult') mults = args[++i].split(',').map(Number);
  else if (args[i] === '--policies') policies = args[++i].split(',') as PolicyName[];
  else files.push(args[i]);
}
for (const f of files) {
  const { header, requests } = await loadTrace(f);
  const sched = await buildSchedule(header, requests, { concurrency: conc });
  for (const m of mults) {
    const cap = Math.min(header.experts, Math.round(m * header.topK));
    const b = simulate(sched, createCachePolicy('belady', sched, cap)).loads;
    const cells = policies.map((p) => {
      const r = simulate(sched, createCachePolicy(p, sched, cap));
      figures.push({ name: `${f.split('/').pop()} c=${conc} ${m}x ${p} loads_vs_belady`, value: Number((r.loads / b).toFixed(4)), unit: 'ratio', compared_to: `belady ${b} loads at capacity ${cap}` });
      return `${p}=${(r.loads / b).toFixed(3)}` + (r.prefetch.issued ? `(pf ${r.prefetch.issued}/${r.prefetch.wasted}w)` : '');
    });
    console.log(`${f.split('/').pop()} c=${conc} ${m}x cap=${cap} belady=${b} ${cells.join(' ')}`);
  }
}
console.log(JSON.stringify({ figures }));
