// Compile-only checks of the client's types (tsc -p tsconfig.test.json): what a caller may and may not
// write. Each @ts-expect-error fails the compilation if the line it marks ever type-checks.
import { createTasksApi, etagOf, PreconditionFailedError, TasksApiError } from "../src/index.js";
import type { ListQuery, NewTask, Task, TaskChanges } from "../src/index.js";

const api = createTasksApi({ baseUrl: "https://api.example.com", getToken: async () => "token" });

export async function allowed(): Promise<void> {
  const task: Task = await api.createTask("alice", { title: "Buy milk" });
  const full: NewTask = { title: "t", description: null, completed: true };
  await api.createTask("alice", full, { idempotencyKey: "k" });
  const changes: TaskChanges[] = [{ title: "t" }, { description: null }, { completed: false }, { title: "t", completed: true }];
  for (const change of changes) await api.updateTask("alice", task.id, change, { etag: etagOf(task) });
  const query: ListQuery = { status: "pending", sort: "title", order: "asc", limit: 20, offset: 40 };
  const tasks: Task[] = await api.listTasks("alice", query);
  const page = await api.listTasksPage("alice", { limit: 10 });
  const total: number = page.total;
  const toggled: Task = await api.toggleTask("alice", tasks[0]?.id ?? 1, true, { etag: '"3"' });
  const nothing: void = await api.deleteTask("alice", toggled.id);
  void [total, nothing];
  try {
    await api.getTask("alice", 1);
  } catch (error) {
    if (error instanceof PreconditionFailedError) console.log(error.currentEtag);
    else if (error instanceof TasksApiError) console.log(error.status, error.detail, error.errors, error.requestId);
  }
}

export async function refused(task: Task): Promise<void> {
  // @ts-expect-error a create needs a title
  await api.createTask("alice", { description: "d" });
  // @ts-expect-error completed is a boolean, not a string
  await api.createTask("alice", { title: "t", completed: "true" });
  // @ts-expect-error an update names at least one field
  await api.updateTask("alice", task.id, {});
  // @ts-expect-error a status the API does not know
  await api.listTasks("alice", { status: "done" });
  // @ts-expect-error a page needs a limit
  await api.listTasksPage("alice", {});
  // @ts-expect-error task ids are numbers
  await api.getTask("alice", "1");
  // @ts-expect-error the version is the service's: no body can set it
  await api.updateTask("alice", task.id, { title: "t", version: 3 });
  // @ts-expect-error nor can a create
  await api.createTask("alice", { title: "t", version: 3 });
  // @ts-expect-error a misspelt field (the schema's catch-all for ignored members is not in the type)
  await api.createTask("alice", { title: "t", complete: true });
  // @ts-expect-error a title is a string
  await api.createTask("alice", { title: 42 });
}
