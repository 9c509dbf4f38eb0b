// Fits the forecast policy's prior on real routing traces and writes
// src/offload/forecast-prior.ts (see src/offload/forecast-fit.ts).
//
//   node --import=tsx scripts/fit-forecast-prior.ts --trace FILE [--trace FILE ...]
//        [--epochs 3] [--capacity-factor 2] [--out src/offload/forecast-prior.ts]
//
// Fit it on traces of models other than the ones its results are quoted for: a prior
// fitted on a trace and measured on the same trace is measured in-sample.
import { writeFileSync } from 'node:fs';
import { basename } from 'node:path';
import { parseArgs } from 'node:util';
import { fitForecastPrior, priorModule } from '../src/offload/forecast-fit.js';

const { values } = parseArgs({
  options: {
    trace: { type: 'string', multiple: true },
    epochs: { type: 'string', default: '3' },
    'capacity-factor': { type: 'string', default: '2' },
    out: { type: 'string', default: new URL('../src/offload/forecast-prior.ts', import.meta.url).pathname },
  },
});
const traces = values.trace ?? [];
if (traces.length === 0) {
  process.stderr.write('usage: node --import=tsx scripts/fit-forecast-prior.ts --trace FILE [--trace FILE ...] [--epochs N] [--capacity-factor F] [--out FILE]\n');
  process.exit(2);
}
const epochs = Number(values.epochs);
const capacityFactor = Number(values['capacity-factor']);
let model;
try {
  model = await fitForecastPrior(traces, {
    epochs,
    capacityFactor,
    start: null,
    onRun: (t, e, loads) => process.stdout.write(`epoch ${e + 1}: ${basename(t)}: ${loads} loads\n`),
  });
} catch (err) {
  process.stderr.write(`fit-forecast-prior: ${(err as Error).message}\n`);
  process.exit(1);
}
const provenance = [
  `scripts/fit-forecast-prior.ts ${traces.map((t) => `--trace ${basename(t)}`).join(' ')} --epochs ${epochs} --capacity-factor ${capacityFactor}`,
  `(the policy's own online learning over these traces, from zero, one request at a time, cache at ${capacityFactor}x top-k)`,
];
writeFileSync(values.out!, priorModule(model, provenance));
process.stdout.write(`wrote ${values.out}\n`);
