// Fails when src/schema.ts is not what openapi-typescript makes of ../../openapi.json today: the
// service's contract changed and the client's types did not follow (run `npm run generate`).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const scratch = mkdtempSync(join(tmpdir(), "tasks-api-schema-"));
try {
  const fresh = join(scratch, "schema.ts");
  const generate = JSON.parse(readFileSync("package.json", "utf8")).scripts.generate;
  const args = generate.split(/\s+/).slice(1).map((arg) => (arg === "src/schema.ts" ? fresh : arg));
  execFileSync(join("node_modules", ".bin", "openapi-typescript"), args, { stdio: ["ignore", "ignore", "inherit"] });
  if (readFileSync(fresh, "utf8") !== readFileSync("src/schema.ts", "utf8")) {
    console.error("src/schema.ts is stale: openapi.json changed. Run `npm run generate` in clients/typescript.");
    process.exit(1);
  }
  console.log("src/schema.ts matches openapi.json");
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
