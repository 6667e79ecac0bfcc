// Isolating and releasing from a machine's page, watched live (UI-CONTRACT:
// "Machine page"). web-01's agent acknowledges and succeeds after 1.5 s;
// fail-01's acknowledges and fails with FAILURE_REASON.
import type { Page, Response } from '@playwright/test';
import { analyst, machineId } from '../lib/env';
import {
  cell,
  expect,
  expectSameDocument,
  markDocument,
  signIn,
  test,
} from '../lib/fixtures';

const FAILURE_REASON = 'nft: Operation not permitted (simulated)';

/** The API's answer to the console's POST .../isolate or .../unisolate. */
function actionCreated(page: Page, verb: 'isolate' | 'unisolate'): Promise<Response> {
  return page.waitForResponse(
    (r) =>
      r.request().method() === 'POST' &&
      new RegExp(`/api/machines/[^/]+/${verb}$`).test(new URL(r.url()).pathname),
  );
}

async function openMachine(page: Page, name: string): Promise<void> {
  await signIn(page, analyst, `/machines/${machineId(name)}`);
  await expect(page.getByRole('heading', { name, level: 1 })).toBeVisible();
  await expect(page.getByTestId('live-status')).toHaveText('Live');
}

test.describe('isolation from the machine page', () => {

  test('isolating and releasing web-01 show Pending, then Succeeded and the new state, without a reload', async ({
    page,
  }) => {
    await openMachine(page, 'web-01');
    const state = page.getByTestId('isolation-state');
    await expect(state).toHaveText('Not isolated');
    const history = page.getByRole('table').filter({
      has: page.getByRole('columnheader', { name: 'Requested by' }),
    });
    await markDocument(page);

    // Isolate: the dialog names the machine and offers the type.
    await page.getByRole('button', { name: 'Isolate machine' }).click();
    const isolate = page.getByRole('dialog', { name: 'Isolate web-01' });
    await expect(isolate).toBeVisible();
    await expect(isolate.getByRole('radio', { name: 'Full' })).toBeChecked();
    await expect(isolate.getByRole('radio', { name: 'Selective' })).not.toBeChecked();
    await isolate.getByLabel('Comment', { exact: true }).fill('Beaconing to a known C2 host (browser test)');
    const created = actionCreated(page, 'isolate');
    await isolate.getByRole('button', { name: 'Isolate', exact: true }).click();
    const reply = await created;
    expect(reply.status()).toBe(201);
    const action = await reply.json();
    await expect(isolate).toBeHidden();

    // The new row at once, while the agent is still at work...
    const row = history.locator(`tr[data-action-id="${action.id}"]`);
    const status = await cell(history, row, 'Status');
    await expect(status).toHaveText(/^(Pending|InProgress)$/, { timeout: 1_000 });
    await expect(await cell(history, row, 'Type')).toHaveText('Isolate');
    await expect(await cell(history, row, 'Requested by')).toHaveText(analyst.upn);
    await expect(await cell(history, row, 'Comment')).toHaveText(
      'Beaconing to a known C2 host (browser test)',
    );
    // ...then its outcome and the machine's new state, pushed by the server.
    await expect(status).toHaveText('Succeeded', { timeout: 15_000 });
    await expect(state).toHaveText('Isolated');
    await expect(page.getByTestId('isolation-scope')).toHaveText('Full');
    await expect(history.locator('tr[data-action-id]').first()).toHaveAttribute(
      'data-action-id',
      action.id,
    );
    await expectSameDocument(page);

    // Release, by keyboard alone.
    await page.getByRole('button', { name: 'Release from isolation' }).press('Enter');
    const release = page.getByRole('dialog', { name: 'Release web-01' });
    await expect(release).toBeVisible();
    await expect(release.getByRole('radio')).toHaveCount(0);
    await release.getByLabel('Comment', { exact: true }).fill('False positive (browser test)');
    const released = actionCreated(page, 'unisolate');
    await release.getByRole('button', { name: 'Release', exact: true }).press('Enter');
    const unisolate = await (await released).json();
    await expect(release).toBeHidden();
    const releaseRow = history.locator(`tr[data-action-id="${unisolate.id}"]`);
    await expect(await cell(history, releaseRow, 'Type')).toHaveText('Unisolate');
    await expect(await cell(history, releaseRow, 'Status')).toHaveText('Succeeded', {
      timeout: 15_000,
    });
    await expect(state).toHaveText('Not isolated');
    await expect(page.getByTestId('isolation-scope')).toHaveText('—');
    await expectSameDocument(page);
  });

  test('the dialog wants a comment, and Esc closes it without acting', async ({ page }) => {
    await openMachine(page, 'web-02');
    const rows = page.locator('tr[data-action-id]');
    const before = await rows.count();
    let posted = 0;
    page.on('request', (r) => {
      if (r.method() === 'POST' && /\/api\/machines\/[^/]+\/isolate$/.test(r.url())) posted += 1;
    });

    await page.getByRole('button', { name: 'Isolate machine' }).click();
    const dialog = page.getByRole('dialog', { name: 'Isolate web-02' });
    await dialog.getByRole('button', { name: 'Isolate', exact: true }).click();
    await expect(dialog).toContainText('Write a comment');
    await expect(dialog).toBeVisible();
    await page.keyboard.press('Escape');
    await expect(dialog).toBeHidden();

    await page.getByRole('button', { name: 'Isolate machine' }).click();
    await expect(dialog).toBeVisible();
    await dialog.getByRole('button', { name: 'Close' }).click();
    await expect(dialog).toBeHidden();
    expect(posted).toBe(0);
    await expect(rows).toHaveCount(before);
    await expect(page.getByTestId('isolation-state')).toHaveText('Not isolated');
  });

  test("a failed isolation shows Failed and the agent's reason", async ({ page }) => {
    await openMachine(page, 'fail-01');
    const history = page.getByRole('table').filter({
      has: page.getByRole('columnheader', { name: 'Details' }),
    });
    await page.getByRole('button', { name: 'Isolate machine' }).click();
    const dialog = page.getByRole('dialog', { name: 'Isolate fail-01' });
    await dialog.getByLabel('Comment', { exact: true }).fill('Suspicious PowerShell (browser test)');
    await dialog.getByRole('radio', { name: 'Selective' }).check();
    const created = actionCreated(page, 'isolate');
    await dialog.getByRole('button', { name: 'Isolate', exact: true }).click();
    const action = await (await created).json();
    expect(action.scope).toBe('Selective');
    const row = history.locator(`tr[data-action-id="${action.id}"]`);
    await expect(await cell(history, row, 'Status')).toHaveText('Failed', { timeout: 15_000 });
    await expect(await cell(history, row, 'Details')).toContainText(FAILURE_REASON);
    await expect(page.getByTestId('isolation-state')).toHaveText('Not isolated');
  });
});
