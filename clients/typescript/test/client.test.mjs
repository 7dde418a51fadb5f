// Every function of the client and every error path, against the live service on PostgreSQL (no mock:
// where a test needs a lost answer, it wraps the real fetch and drops the real answer).
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import {
  PreconditionFailedError,
  TasksApiError,
  UnauthorizedError,
  cachedToken,
  createTasksApi,
  etagOf,
} from "../dist/index.js";
import { startLiveService } from "./live-service.mjs";

let service;
let userCount = 0;

before(async () => {
  service = await startLiveService();
});

after(async () => {
  await service?.stop();
});

/** A new user (tests never share tasks) and a client signed in as them. */
function signedIn(options = {}) {
  userCount += 1;
  const user = `client-user-${userCount}-${Date.now()}`;
  const api = createTasksApi({ baseUrl: service.url, getToken: () => service.token(user), retryDelayMs: 50, ...options });
  return { user, api };
}

/** A fetch that records each request's method, URL and headers, then really sends it. */
function recordingFetch() {
  const requests = [];
  const recording = async (url, init) => {
    requests.push({ url: String(url), method: init.method, headers: { ...init.headers }, body: init.body });
    return fetch(url, init);
  };
  return { requests, fetch: recording };
}

async function rejects(promise, check) {
  try {
    await promise;
  } catch (error) {
    check(error);
    return error;
  }
  assert.fail("expected the call to throw");
}

describe("the calls", () => {
  test("createTask, getTask, listTasks, listTasksPage", async () => {
    const { user, api } = signedIn();
    const created = await api.createTask(user, { title: "  Buy milk ", description: "2 litres" });
    assert.equal(created.title, "Buy milk");
    assert.equal(created.user_id, user);
    assert.equal(created.completed, false);
    assert.equal(created.version, 1);
    assert.deepEqual(await api.getTask(user, created.id), created);
    const second = await api.createTask(user, { title: "Call mum", completed: true });
    assert.deepEqual(
      (await api.listTasks(user)).map((task) => task.id),
      [second.id, created.id],
    );
    assert.deepEqual(
      (await api.listTasks(user, { status: "pending" })).map((task) => task.id),
      [created.id],
    );
    const page = await api.listTasksPage(user, { limit: 1, sort: "title" });
    assert.deepEqual(page.tasks.map((task) => task.id), [created.id]);
    assert.equal(page.total, 2);
  });

  test("updateTask changes only the fields sent, and the version", async () => {
    const { user, api } = signedIn();
    const task = await api.createTask(user, { title: "Buy milk", description: "2 litres" });
    const updated = await api.updateTask(user, task.id, { title: "Buy oat milk" });
    assert.equal(updated.title, "Buy oat milk");
    assert.equal(updated.description, "2 litres");
    assert.equal(updated.version, 2);
    const cleared = await api.updateTask(user, task.id, { description: null });
    assert.equal(cleared.description, null);
  });

  test("toggleTask flips, or sets the value given", async () => {
    const { user, api } = signedIn();
    const task = await api.createTask(user, { title: "t" });
    assert.equal((await api.toggleTask(user, task.id)).completed, true);
    assert.equal((await api.toggleTask(user, task.id)).completed, false);
    assert.equal((await api.toggleTask(user, task.id, true)).completed, true);
    assert.equal((await api.toggleTask(user, task.id, true)).completed, true);
  });

  test("deleteTask resolves on the 204 without reading a body", async () => {
    const { user, api } = signedIn();
    const task = await api.createTask(user, { title: "t" });
    assert.equal(await api.deleteTask(user, task.id), undefined);
    await rejects(api.getTask(user, task.id), (error) => assert.equal(error.status, 404));
  });

  test("a user id with characters a URL reserves is sent encoded", async () => {
    // (Not "/": the service's router decodes %2F before matching, so no URL can name such a user.)
    const user = `user with ?#&%+é ${Date.now()}`;
    const api = createTasksApi({ baseUrl: service.url + "/", getToken: () => service.token(user) });
    const task = await api.createTask(user, { title: "t" });
    assert.equal(task.user_id, user);
    assert.deepEqual(await api.getTask(user, task.id), task);
  });
});

describe("Idempotency-Key: a create is safe to retry", () => {
  test("each create sends a new UUID key", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ fetch: recorder.fetch });
    await api.createTask(user, { title: "a" });
    await api.createTask(user, { title: "a" });
    const keys = recorder.requests.map((request) => request.headers["Idempotency-Key"]);
    assert.equal(keys.length, 2);
    assert.notEqual(keys[0], keys[1]);
    for (const key of keys) assert.match(key, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal((await api.listTasks(user)).length, 2);
  });

  test("a create whose answer was lost is retried with its key: one task, the one stored", async () => {
    const sent = [];
    let dropNext = true;
    const losingFetch = async (url, init) => {
      sent.push(init.headers["Idempotency-Key"]);
      const response = await fetch(url, init); // the service really stores the task...
      if (dropNext) {
        dropNext = false;
        await response.arrayBuffer();
        throw new TypeError("fetch failed"); // ...and the answer is lost on the way back
      }
      return response;
    };
    const { user, api } = signedIn({ fetch: losingFetch });
    const task = await api.createTask(user, { title: "Buy milk" });
    assert.equal(sent.length, 2);
    assert.equal(sent[0], sent[1]);
    const stored = await api.listTasks(user);
    assert.deepEqual(stored, [task]);
  });

  test("a create retried through a database outage makes one task", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ retries: 8, maxRetryDelayMs: 5000, fetch: recorder.fetch });
    await api.listTasks(user); // the pool's connection is open before the cut
    await service.cut();
    const restored = new Promise((done) => setTimeout(() => service.restore().then(done), 1500));
    const task = await api.createTask(user, { title: "during the outage" });
    await restored;
    const creates = recorder.requests.filter((request) => request.method === "POST");
    assert.ok(creates.length >= 2, `${creates.length} attempt(s): the outage was not seen`);
    assert.equal(new Set(creates.map((request) => request.headers["Idempotency-Key"])).size, 1);
    assert.deepEqual(await api.listTasks(user), [task]);
  });

  test("a 503 past the retries is thrown with its sentence and request id; Retry-After sets the pace", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ retries: 1, retryDelayMs: 1, fetch: recorder.fetch });
    await service.cut();
    try {
      const started = Date.now();
      const error = await rejects(api.createTask(user, { title: "t" }), (error) => {
        assert.ok(error instanceof TasksApiError);
        assert.equal(error.status, 503);
        assert.match(error.detail, /unavailable/i);
        assert.match(error.requestId, /\S/);
      });
      // The retry waited the service's Retry-After (5 s), not retryDelayMs (1 ms).
      assert.equal(recorder.requests.length, 2);
      assert.ok(Date.now() - started >= 4900, `retried after ${Date.now() - started} ms`);
      assert.equal(error.message, error.detail);
    } finally {
      await service.restore();
    }
  });

  test("updates, toggles and deletes are never retried", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ fetch: recorder.fetch, retries: 3, retryDelayMs: 1 });
    const task = await api.createTask(user, { title: "t" });
    await service.cut();
    try {
      for (const call of [
        () => api.updateTask(user, task.id, { title: "u" }),
        () => api.toggleTask(user, task.id),
        () => api.deleteTask(user, task.id),
      ]) {
        recorder.requests.length = 0;
        await rejects(call(), (error) => assert.equal(error.status, 503));
        assert.equal(recorder.requests.length, 1);
      }
    } finally {
      await service.restore();
    }
  });

  test("a Retry-After longer than maxRetryDelayMs is not waited for: the 503 is thrown", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ fetch: recorder.fetch, retries: 3, maxRetryDelayMs: 100 });
    await service.cut();
    try {
      await rejects(api.listTasks(user), (error) => assert.equal(error.status, 503));
      assert.equal(recorder.requests.length, 1);
    } finally {
      await service.restore();
    }
  });

  test("an explicit key makes two calls one task", async () => {
    const { user, api } = signedIn();
    const first = await api.createTask(user, { title: "t" }, { idempotencyKey: "my-key" });
    const again = await api.createTask(user, { title: "t" }, { idempotencyKey: "my-key" });
    assert.deepEqual(again, first);
    await rejects(api.createTask(user, { title: "other" }, { idempotencyKey: "my-key" }), (error) => {
      assert.equal(error.status, 422);
      assert.equal(error.errors[0].field, "Idempotency-Key");
      assert.equal(error.errors[0].type, "idempotency_key_reused");
    });
  });

  test("no answer at all: status 0, after the retries", async () => {
    const api = createTasksApi({ baseUrl: "http://127.0.0.1:9", getToken: () => "t", retries: 2, retryDelayMs: 1 });
    await rejects(api.createTask("u", { title: "t" }), (error) => {
      assert.ok(error instanceof TasksApiError);
      assert.equal(error.status, 0);
      assert.equal(error.requestId, null);
      assert.match(error.detail, /could not be reached/);
      assert.ok(error.cause);
    });
  });

  test("a key the API would refuse is the caller's mistake: thrown at once, nothing sent", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ fetch: recorder.fetch });
    for (const idempotencyKey of ["", "k".repeat(256), "clé", "tab\there"]) {
      await rejects(api.createTask(user, { title: "t" }, { idempotencyKey }), (error) => {
        assert.ok(error instanceof TypeError && !(error instanceof TasksApiError), String(error));
      });
    }
    assert.equal(recorder.requests.length, 0);
  });

  test("a header value that cannot be sent is thrown at once, never reported as a network error", async () => {
    const recorder = recordingFetch();
    const api = createTasksApi({ baseUrl: service.url, getToken: () => "bad\ntoken", fetch: recorder.fetch });
    await rejects(api.listTasks("u"), (error) => {
      assert.ok(error instanceof TypeError && !(error instanceof TasksApiError), String(error));
    });
    assert.equal(recorder.requests.length, 0);
  });

  test("a token source that fails is a retried status 0, not a sign-out", async () => {
    let asked = 0;
    let told = 0;
    const api = createTasksApi({
      baseUrl: service.url,
      getToken: async () => {
        asked += 1;
        throw new TypeError("fetch failed");
      },
      onUnauthorized: () => {
        told += 1;
      },
      retries: 2,
      retryDelayMs: 1,
    });
    await rejects(api.listTasks("u"), (error) => {
      assert.ok(error instanceof TasksApiError && !(error instanceof UnauthorizedError));
      assert.equal(error.status, 0);
      assert.match(error.detail, /sign-in token/);
    });
    assert.equal(asked, 3);
    assert.equal(told, 0);
  });

  test("an abort stops a token source that hangs, and an aborted signal sends nothing", async () => {
    const recorder = recordingFetch();
    const api = createTasksApi({ baseUrl: service.url, getToken: () => new Promise(() => {}), fetch: recorder.fetch });
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 100);
    const started = Date.now();
    await rejects(api.listTasks("u", undefined, { signal: controller.signal }), (error) => {
      assert.equal(error.name, "AbortError");
    });
    assert.ok(Date.now() - started < 2000);
    const { user, api: signedInApi } = signedIn({ fetch: recorder.fetch });
    await rejects(signedInApi.createTask(user, { title: "t" }, { signal: AbortSignal.abort() }), (error) => {
      assert.equal(error.name, "AbortError");
    });
    assert.equal(recorder.requests.length, 0);
  });

  test("an abort stops the retries", async () => {
    const { user, api } = signedIn({ retries: 5, retryDelayMs: 5000, maxRetryDelayMs: 5000 });
    await service.cut();
    try {
      const controller = new AbortController();
      setTimeout(() => controller.abort(), 300);
      const started = Date.now();
      await rejects(api.createTask(user, { title: "t" }, { signal: controller.signal }), (error) => {
        assert.equal(error.name, "AbortError");
      });
      assert.ok(Date.now() - started < 4000);
    } finally {
      await service.restore();
    }
  });
});

describe("ETags: a stale edit never overwrites a newer one", () => {
  for (const [name, change] of [
    ["updateTask", (api, user, id, etag) => api.updateTask(user, id, { title: "from the laptop" }, { etag })],
    ["toggleTask", (api, user, id, etag) => api.toggleTask(user, id, undefined, { etag })],
    ["toggleTask to a value", (api, user, id, etag) => api.toggleTask(user, id, true, { etag })],
    ["deleteTask", (api, user, id, etag) => api.deleteTask(user, id, { etag })],
  ]) {
    test(`${name} with a stale ETag throws PreconditionFailedError and changes nothing`, async () => {
      const { user, api } = signedIn();
      const seen = await api.createTask(user, { title: "Buy milk" });
      const newer = await api.updateTask(user, seen.id, { title: "from the phone" });
      await rejects(change(api, user, seen.id, etagOf(seen)), (error) => {
        assert.ok(error instanceof PreconditionFailedError);
        assert.ok(error instanceof TasksApiError);
        assert.equal(error.status, 412);
        assert.equal(error.currentEtag, etagOf(newer));
        assert.match(error.detail, /changed elsewhere/);
      });
      assert.deepEqual(await api.getTask(user, seen.id), newer);
      await change(api, user, seen.id, etagOf(newer)); // the current ETag applies
    });
  }

  test("without an ETag, no If-Match is sent and the last write wins", async () => {
    const recorder = recordingFetch();
    const { user, api } = signedIn({ fetch: recorder.fetch });
    const task = await api.createTask(user, { title: "t" });
    await api.updateTask(user, task.id, { title: "one" });
    assert.equal((await api.updateTask(user, task.id, { title: "two" })).title, "two");
    assert.ok(recorder.requests.every((request) => !("If-Match" in request.headers)));
  });
});

describe("errors", () => {
  test("401: onUnauthorized once, an UnauthorizedError, no retry", async () => {
    const calls = [];
    const recorder = recordingFetch();
    const user = `expired-${Date.now()}`;
    const api = createTasksApi({
      baseUrl: service.url,
      getToken: () => service.token(user, { exp: Math.floor(Date.now() / 1000) - 120 }),
      onUnauthorized: (error) => calls.push(error),
      fetch: recorder.fetch,
    });
    await rejects(api.listTasks(user), (error) => {
      assert.ok(error instanceof UnauthorizedError);
      assert.equal(error.status, 401);
      assert.match(error.detail, /expired/i);
    });
    assert.equal(calls.length, 1);
    assert.equal(recorder.requests.length, 1);
  });

  for (const [kind, onUnauthorized] of [
    ["synchronous", (calls) => () => void (calls.count += 1)],
    ["slow", (calls) => async () => {
      calls.count += 1;
      await new Promise((done) => setTimeout(done, 200)); // e.g. a redirect to the sign-in page
    }],
  ]) {
    test(`401: a burst of concurrent 401s calls a ${kind} onUnauthorized once per refused token`, async () => {
      const calls = { count: 0 };
      let token = service.token("someone", { secret: "not-the-service-secret-but-long-enough-32" });
      const api = createTasksApi({ baseUrl: service.url, getToken: () => token, onUnauthorized: onUnauthorized(calls) });
      const results = await Promise.allSettled(Array.from({ length: 10 }, () => api.listTasks("someone")));
      assert.ok(results.every((result) => result.status === "rejected" && result.reason.status === 401));
      await rejects(api.listTasks("someone"), (error) => assert.equal(error.status, 401));
      assert.equal(calls.count, 1);
      token = service.token("someone", { exp: Math.floor(Date.now() / 1000) - 120 }); // a new token, refused too
      await rejects(api.listTasks("someone"), (error) => assert.equal(error.status, 401));
      assert.equal(calls.count, 2);
    });
  }

  test("not signed in: no request, a 401 UnauthorizedError", async () => {
    const recorder = recordingFetch();
    let told = 0;
    const api = createTasksApi({ baseUrl: service.url, getToken: async () => null, onUnauthorized: () => { told += 1; }, fetch: recorder.fetch });
    await rejects(api.createTask("u", { title: "t" }), (error) => assert.ok(error instanceof UnauthorizedError));
    assert.equal(recorder.requests.length, 0);
    assert.equal(told, 1);
  });

  test("403: another user's URL", async () => {
    const { api } = signedIn();
    await rejects(api.listTasks("somebody-else"), (error) => {
      assert.equal(error.status, 403);
      assert.ok(!(error instanceof UnauthorizedError));
      assert.match(error.detail, /\S/);
    });
  });

  test("404: a missing task, and another user's task alike", async () => {
    const owner = signedIn();
    const theirs = await owner.api.createTask(owner.user, { title: "private" });
    const { user, api } = signedIn();
    for (const call of [
      () => api.getTask(user, theirs.id),
      () => api.updateTask(user, theirs.id, { title: "x" }, { etag: etagOf(theirs) }),
      () => api.deleteTask(user, theirs.id, { etag: etagOf(theirs) }),
      () => api.getTask(user, 2147483647),
    ]) {
      await rejects(call(), (error) => {
        assert.equal(error.status, 404);
        assert.equal(error.detail, "Task not found.");
      });
    }
    assert.deepEqual(await owner.api.getTask(owner.user, theirs.id), theirs);
  });

  test("422: the sentence, and each field's error", async () => {
    const { user, api } = signedIn();
    await rejects(api.createTask(user, { title: "   " }), (error) => {
      assert.equal(error.status, 422);
      assert.deepEqual(error.errors.map((fieldError) => fieldError.field), ["title"]);
      assert.equal(error.detail, error.errors[0].message);
    });
    await rejects(api.listTasks(user, { limit: 0 }), (error) => {
      assert.equal(error.status, 422);
      assert.equal(error.errors[0].field, "limit");
    });
  });

  test("502 and 504 are retried, a 500 is not, and a 200 that is not JSON is an error too", async () => {
    const answers = [];
    const gateway = createServer((_request, response) => {
      const [status, type, body] = answers.shift() ?? [500, "text/html", "<html>no more</html>"];
      response.writeHead(status, { "Content-Type": type, "X-Request-ID": "gw" }).end(body);
    });
    await new Promise((done) => gateway.listen(0, "127.0.0.1", done));
    try {
      const api = createTasksApi({ baseUrl: `http://127.0.0.1:${gateway.address().port}`, getToken: () => "t", retryDelayMs: 1 });
      answers.push([502, "text/html", "<html>bad gateway</html>"], [504, "text/html", "<html>timeout</html>"], [200, "application/json", "[]"]);
      assert.deepEqual(await api.listTasks("u"), []);
      assert.equal(answers.length, 0);
      answers.push([500, "application/json", '{"detail": "Internal server error"}'], [200, "application/json", "[]"]);
      await rejects(api.listTasks("u"), (error) => assert.equal(error.status, 500));
      assert.equal(answers.length, 1); // not retried
      answers.length = 0;
      answers.push([200, "text/html", "<html>Sign in to the Wi-Fi</html>"]);
      await rejects(api.getTask("u", 1), (error) => {
        assert.ok(error instanceof TasksApiError);
        assert.equal(error.status, 200);
        assert.equal(error.requestId, "gw");
      });
    } finally {
      gateway.close();
    }
  });

  test("an answer that is not JSON (a gateway's page) still gives a sentence", async () => {
    const gateway = createServer((_request, response) => {
      response.writeHead(502, { "Content-Type": "text/html" }).end("<html><body>Bad gateway</body></html>");
    });
    await new Promise((done) => gateway.listen(0, "127.0.0.1", done));
    try {
      const baseUrl = `http://127.0.0.1:${gateway.address().port}`;
      const api = createTasksApi({ baseUrl, getToken: () => "t", retries: 0 });
      await rejects(api.getTask("u", 1), (error) => {
        assert.equal(error.status, 502);
        assert.equal(error.detail, "The server answered 502.");
        assert.deepEqual(error.errors, []);
      });
    } finally {
      gateway.close();
    }
  });
});

describe("cachedToken", () => {
  /** A token whose payload, base64url-encoded, contains "-" or "_" (what atob alone cannot read). */
  function urlSafeToken(user, lifetime) {
    for (let pad = 0; ; pad++) {
      const token = service.token(user, { exp: Math.floor(Date.now() / 1000) + lifetime, name: "~".repeat(pad) + "?>" });
      if (/[-_]/.test(token.split(".")[1])) return token;
    }
  }

  test("asks for a token once per lifetime, and once for concurrent callers", async () => {
    const user = `cached-${Date.now()}`;
    let fetched = 0;
    const getToken = cachedToken(async () => {
      fetched += 1;
      await new Promise((done) => setTimeout(done, 20));
      return urlSafeToken(user, 600);
    });
    const api = createTasksApi({ baseUrl: service.url, getToken });
    await Promise.all([api.listTasks(user), api.listTasks(user), api.createTask(user, { title: "t" })]);
    await api.listTasks(user);
    assert.equal(fetched, 1);
    getToken.clear();
    await api.listTasks(user);
    assert.equal(fetched, 2);
  });

  test("clear() during a fetch: the signed-out user's token is never kept", async () => {
    let release;
    let fetched = 0;
    const getToken = cachedToken(async () => {
      fetched += 1;
      if (fetched === 1) await new Promise((done) => (release = done));
      return urlSafeToken(`user-${fetched}`, 600);
    });
    const first = getToken();
    await new Promise((done) => setTimeout(done, 10));
    getToken.clear(); // sign-out while the first user's token is on its way
    release();
    await first;
    const next = await getToken();
    assert.equal(fetched, 2);
    assert.match(JSON.parse(Buffer.from(next.split(".")[1], "base64url")).sub, /^user-2$/);
  });

  test("a token about to expire (or unreadable) is asked for again each time", async () => {
    for (const token of [urlSafeToken("soon", 30), "not-a-jwt", null]) {
      let fetched = 0;
      const getToken = cachedToken(async () => {
        fetched += 1;
        return token;
      });
      await getToken();
      await getToken();
      assert.equal(fetched, 2, String(token));
    }
  });
});
