// The live service for these tests: started by the project's one test harness (tests/live_service.py:
// a private PostgreSQL database behind a proxy that can cut it, the service under gunicorn), stopped
// when the tests end. Tokens are minted here as the frontend's bridge route would (HS256, the secret).
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const venvPython = resolve(repo, ".venv/bin/python");
const python = process.env.TASKS_API_PYTHON ?? (existsSync(venvPython) ? venvPython : "python3");

/** Start the service; resolves to { url, token(sub, claims?), cut(), restore(), stop() }. */
export async function startLiveService() {
  const child = spawn(python, ["-m", "tests.live_service"], { cwd: repo, stdio: ["pipe", "pipe", "inherit"] });
  const firstLine = await new Promise((resolveLine, reject) => {
    const lines = createInterface({ input: child.stdout });
    const timer = setTimeout(() => reject(new Error("the live service did not start within 60 s")), 60_000);
    lines.once("line", (line) => {
      clearTimeout(timer);
      resolveLine(line);
    });
    child.once("exit", (code) => reject(new Error(`the live service exited with ${code} before it started`)));
  });
  const { url, control, secret } = JSON.parse(firstLine);
  const post = async (path) => {
    const response = await fetch(control + path, { method: "POST" });
    if (response.status !== 204) throw new Error(`control ${path} answered ${response.status}`);
  };
  return {
    url,
    secret,
    token: (sub, claims = {}) => hs256({ sub, iat: now(), exp: now() + 600, ...claims }, claims.secret ?? secret),
    cut: () => post("/database/cut"),
    restore: () => post("/database/restore"),
    stop: () =>
      new Promise((done) => {
        child.once("exit", done);
        child.stdin.end(); // the service stops and drops its database when its input closes
      }),
  };
}

function now() {
  return Math.floor(Date.now() / 1000);
}

function hs256(payload, secret) {
  const { secret: _unused, ...claims } = payload;
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}
