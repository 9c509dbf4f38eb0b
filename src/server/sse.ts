// Server-sent events over a hijacked reply: `data: <json>\n\n` frames, ending with
// `data: [DONE]\n\n` as OpenAI's streams do.

import type { ServerResponse } from 'node:http';

export class SseWriter {
  private ended = false;

  constructor(private readonly res: ServerResponse) {
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      // Proxies (nginx) must not buffer the stream.
      'x-accel-buffering': 'no',
    });
    res.flushHeaders();
  }

  /** False once the stream ended or the client went away. */
  get open(): boolean {
    return !this.ended && !this.res.destroyed && this.res.writable;
  }

  send(obj: unknown): void {
    if (this.open) this.res.write(`data: ${JSON.stringify(obj)}\n\n`);
  }

  /** Writes the final `[DONE]` frame and ends the response. */
  done(): void {
    if (!this.open) return;
    this.res.write('data: [DONE]\n\n');
    this.end();
  }

  end(): void {
    if (this.ended) return;
    this.ended = true;
    if (!this.res.destroyed) this.res.end();
  }
}
