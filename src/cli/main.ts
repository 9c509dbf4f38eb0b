// moe-serve command line: one entry, one module per command.

import { UsageError } from './args.js';
import { demoCommand } from './demo-cmd.js';
import { exportGgufCommand } from './export-gguf-cmd.js';
import { generateCommand } from './generate-cmd.js';
import { inspectCommand } from './inspect-cmd.js';
import { makeModelCommand } from './make-model-cmd.js';
import { serveCommand } from './serve-cmd.js';
import { simCommand } from './sim-cmd.js';
import { synthTraceCommand } from './synth-trace-cmd.js';

interface Command {
  summary: string;
  run(argv: string[]): Promise<number>;
}

const COMMANDS: Record<string, Command> = {
  'make-model': makeModelCommand,
  generate: generateCommand,
  inspect: inspectCommand,
  'export-gguf': exportGgufCommand,
  demo: demoCommand,
  serve: serveCommand,
  sim: simCommand,
  'synth-trace': synthTraceCommand,
};

function usage(): string {
  const lines = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(12)} ${c.summary}`);
  return `usage: moe-serve <command> [options]\n\ncommands:\n${lines.join('\n')}\n\nRun \`moe-serve <command> --help\` for a command's options.\n`;
}

/** Runs the CLI; returns the exit code. Errors are one line on stderr. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage());
    return name === undefined ? 1 : 0;
  }
  const cmd = COMMANDS[name];
  if (!cmd) {
    process.stderr.write(`moe-serve: unknown command "${name}"; commands: ${Object.keys(COMMANDS).join(', ')}\n`);
    return 2;
  }
  try {
    return await cmd.run(rest);
  } catch (e) {
    const err = e as Error;
    process.stderr.write(`moe-serve ${name}: ${err.message}\n`);
    if (process.env.MOE_SERVE_DEBUG === '1' && err.stack) process.stderr.write(err.stack + '\n');
    return e instanceof UsageError ? 2 : 1;
  }
}
