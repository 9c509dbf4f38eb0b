// Child process of the engine benchmark: measures our engine in a fresh process (so its
// resident memory is that of a process serving one model, whatever ran before in the
// parent) and sends the result back over IPC. Started by measureOursInChild.

import type { WeightFormat } from '../../src/engine/native-runner.js';
import type { Workload } from './engine-bench-common.js';
import { measureOurs, type OursChildReply } from './engine-bench-ours.js';

interface Request {
  dir: string;
  weights: WeightFormat;
  threads: number;
  workload: Workload;
}

process.once('message', (req: Request) => {
  const reply = (msg: OursChildReply, code: number) => process.send!(msg, () => process.exit(code));
  measureOurs(req.dir, req.weights, req.threads, req.workload).then(
    (result) => reply({ ok: true, result }, 0),
    (e: unknown) => reply({ ok: false, error: e instanceof Error ? (e.stack ?? e.message) : String(e) }, 1),
  );
});
