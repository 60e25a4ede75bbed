// Runs the bare JS Worker in the same offline workerd as harness/runner.mjs (miniflare 3).
// argv[2]: JSON config file {script, bindings, host, port}. Prints one JSON line
// {"ready": "http://host:port"}, then serves until SIGTERM/SIGINT or stdin EOF.
import { readFileSync } from "node:fs";
import { Log, LogLevel, Miniflare } from "miniflare";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const mf = new Miniflare({
  modules: true,
  scriptPath: cfg.script,
  compatibilityDate: cfg.compatibilityDate ?? "2024-07-01",
  bindings: cfg.bindings ?? {},
  host: cfg.host ?? "127.0.0.1",
  port: cfg.port ?? 0,
  cf: false,
  log: new Log(LogLevel.WARN),
});

let closing = false;
async function shutdown(code) {
  if (closing) return;
  closing = true;
  try {
    await mf.dispose();
  } finally {
    process.exit(code);
  }
}
process.on("SIGTERM", () => shutdown(0));
process.on("SIGINT", () => shutdown(0));
process.stdin.on("end", () => shutdown(0));
process.stdin.on("error", () => shutdown(0));
process.stdin.resume();

try {
  const url = await mf.ready;
  process.stdout.write(JSON.stringify({ ready: url.origin, pid: process.pid }) + "\n");
} catch (err) {
  process.stderr.write(`js_runner: workerd failed to start: ${err?.stack ?? err}\n`);
  await shutdown(1);
}
