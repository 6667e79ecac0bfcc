// The test agents behave as the console's specs expect (through the API,
// no page): web-* acknowledge and succeed after 1.5 s, so that an action
// is seen Pending or InProgress first; fail-01 fails with its reason;
// db-01 never connects, so its actions stay Pending.
import { machineId } from '../lib/env';
import { api, cancelPending, expect, pendingIsolation, test } from '../lib/fixtures';

const FAILURE_REASON = 'nft: Operation not permitted (simulated)';

async function action(id: string): Promise<any> {
  const reply = await api('GET', `/api/machineactions/${id}`);
  expect(reply.status, JSON.stringify(reply.body)).toBe(200);
  return reply.body;
}

async function isolate(machine: string, scope = 'Full'): Promise<string> {
  const reply = await api('POST', `/api/machines/${machine}/isolate`, {
    Comment: 'browser test: the test agents',
    IsolationType: scope,
  });
  expect(reply.status, JSON.stringify(reply.body)).toBe(201);
  return reply.body.id;
}

/** Polls an action until it is final; returns the statuses seen in order. */
async function follow(id: string): Promise<{ seen: string[]; last: any }> {
  const seen: string[] = [];
  const deadline = Date.now() + 15_000;
  for (;;) {
    const last = await action(id);
    if (seen.at(-1) !== last.status) seen.push(last.status);
    if (!['Pending', 'InProgress'].includes(last.status) || Date.now() > deadline) {
      return { seen, last };
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

test.describe('the test agents', () => {
  test('web-02 takes a while, then succeeds; releasing brings it back', async () => {
    const web = machineId('web-02');
    const started = Date.now();
    const isolation = await follow(await isolate(web));
    expect(isolation.seen.at(-1)).toBe('Succeeded');
    expect(isolation.seen).toContain('InProgress');
    expect(Date.now() - started).toBeGreaterThanOrEqual(1_400);
    const machine = await api('GET', `/api/machines/${web}`);
    expect(machine.body.isolationState).toBe('Isolated');
    expect(machine.body.isolationScope).toBe('Full');

    const reply = await api('POST', `/api/machines/${web}/unisolate`, {
      Comment: 'browser test: the test agents',
    });
    expect(reply.status, JSON.stringify(reply.body)).toBe(201);
    expect((await follow(reply.body.id)).seen.at(-1)).toBe('Succeeded');
    expect((await api('GET', `/api/machines/${web}`)).body.isolationState).toBe('NotIsolated');
  });

  test("fail-01 fails with the agent's reason and stays not isolated", async () => {
    const fail = machineId('fail-01');
    const { seen, last } = await follow(await isolate(fail, 'Selective'));
    expect(seen.at(-1)).toBe('Failed');
    expect(JSON.stringify(last.troubleshootInfo)).toContain(FAILURE_REASON);
    expect((await api('GET', `/api/machines/${fail}`)).body.isolationState).toBe('NotIsolated');
  });

  test('db-01 leaves its actions Pending', async () => {
    const db = machineId('db-01');
    await cancelPending(db);
    const id = await pendingIsolation(db);
    await new Promise((r) => setTimeout(r, 2_500));
    expect((await action(id)).status).toBe('Pending');
    await cancelPending(db);
    expect((await action(id)).status).toBe('Cancelled');
  });
});
