// Pending actions, Cancel on the Actions page, and the refusal of a second
// isolation while one is pending (UI-CONTRACT: "Actions page", "Errors").
// db-01 never connects: its actions stay Pending.
import { analyst, machineId } from '../lib/env';
import {
  api,
  cancelPending,
  cell,
  expect,
  expectPlainAlert,
  expectSameDocument,
  markDocument,
  pendingActions,
  pendingIsolation,
  signIn,
  test,
} from '../lib/fixtures';

test.describe('actions', () => {

  test('an isolation of a machine that is away stays Pending, and the Actions page cancels it', async ({
    page,
  }) => {
    const db = machineId('db-01');
    await cancelPending(db);
    await signIn(page, analyst, `/machines/${db}`);
    await expect(page.getByTestId('live-status')).toHaveText('Live');
    await page.getByRole('button', { name: 'Isolate machine' }).click();
    const dialog = page.getByRole('dialog', { name: 'Isolate db-01' });
    await dialog.getByLabel('Comment', { exact: true }).fill('Lateral movement seen (browser test)');
    await dialog.getByRole('button', { name: 'Isolate', exact: true }).click();
    await expect(dialog).toBeHidden();
    const [id] = await pendingActions(db);
    expect(id).toBeTruthy();
    const history = page.getByRole('table').filter({
      has: page.getByRole('columnheader', { name: 'Details' }),
    });
    const historyRow = history.locator(`tr[data-action-id="${id}"]`);
    await expect(await cell(history, historyRow, 'Status')).toHaveText('Pending');
    await expect(page.getByTestId('isolation-state')).toHaveText(/^(Not isolated|Isolating)$/);

    // The Actions page, reached by its link.
    await page.getByRole('navigation').getByRole('link', { name: 'Actions', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'Actions', level: 1 })).toBeVisible();
    await markDocument(page);
    const table = page.getByRole('table');
    for (const header of ['Machine', 'Type', 'Scope', 'Status', 'Requested by', 'Comment', 'Created', 'Updated']) {
      await expect(table.getByRole('columnheader', { name: header, exact: true })).toBeVisible();
    }
    const row = table.locator(`tr[data-action-id="${id}"]`);
    const status = await cell(table, row, 'Status');
    await expect(status).toHaveText('Pending');
    await expect(await cell(table, row, 'Machine')).toContainText('db-01');

    // "Keep action" dismisses the confirmation and changes nothing.
    await row.getByRole('button', { name: 'Cancel', exact: true }).click();
    const confirm = page.getByRole('dialog', { name: 'Cancel this action?' });
    await expect(confirm).toBeVisible();
    await confirm.getByRole('button', { name: 'Keep action' }).click();
    await expect(confirm).toBeHidden();
    await expect(status).toHaveText('Pending');

    // "Cancel action" cancels it; the row follows live.
    await row.getByRole('button', { name: 'Cancel', exact: true }).click();
    await confirm.getByLabel('Comment', { exact: true }).fill('Wrong machine (browser test)');
    await confirm.getByRole('button', { name: 'Cancel action' }).click();
    await expect(confirm).toBeHidden();
    await expect(status).toHaveText('Cancelled');
    await expect(row).toContainText('Wrong machine (browser test)');
    await expect(row.getByRole('button', { name: 'Cancel', exact: true })).toHaveCount(0);
    await expectSameDocument(page);
    const action = await api('GET', `/api/machineactions/${id}`);
    expect(action.body.status).toBe('Cancelled');
    expect(action.body.cancellationComment).toBe('Wrong machine (browser test)');
    expect(action.body.cancellationRequestor).toBe(analyst.upn);
  });

  test('a second isolation while one is pending is refused in a plain sentence', async ({
    page,
    watch,
  }) => {
    const db = machineId('db-01');
    const pending = await pendingIsolation(db);
    try {
      // The console's call is refused (400) on purpose; the page explains it.
      watch.allowHttpError(400, /\/api\/machines\/[^/]+\/isolate$/);
      await signIn(page, analyst, `/machines/${db}`);
      await page.getByRole('button', { name: 'Isolate machine' }).click();
      const dialog = page.getByRole('dialog', { name: 'Isolate db-01' });
      await dialog.getByLabel('Comment', { exact: true }).fill('Second try (browser test)');
      await dialog.getByRole('button', { name: 'Isolate', exact: true }).click();
      const text = await expectPlainAlert(page, /in progress/i);
      expect(text).toMatch(/cancel/i);
      expect(await pendingActions(db)).toEqual([pending]);
    } finally {
      await cancelPending(db);
    }
  });

  test('an action made elsewhere joins the Actions page live and follows to its outcome', async ({
    page,
  }) => {
    const fin = machineId('fin-01');
    await signIn(page, analyst, '/actions');
    await expect(page.getByTestId('live-status')).toHaveText('Live');
    const table = page.getByRole('table');
    await markDocument(page);

    // A playbook isolates fin-01 through the API, behind the page's back.
    const made = await api('POST', `/api/machines/${fin}/isolate`, {
      Comment: 'Playbook: beaconing (browser test)',
      IsolationType: 'Selective',
    });
    expect(made.status, JSON.stringify(made.body)).toBe(201);
    const row = table.locator(`tr[data-action-id="${made.body.id}"]`);
    // On top of the first page, then to Succeeded, with no reload.
    await expect(table.locator('tr[data-action-id]').first()).toHaveAttribute(
      'data-action-id',
      made.body.id,
    );
    await expect(await cell(table, row, 'Machine')).toHaveText('fin-01');
    await expect(await cell(table, row, 'Scope')).toHaveText('Selective');
    await expect(await cell(table, row, 'Status')).toHaveText('Succeeded', { timeout: 15_000 });
    await expectSameDocument(page);

    // Filtered to Pending: the Succeeded one leaves; a new one, Pending
    // when made, joins, and is then shown as it is now.
    await page.getByRole('combobox', { name: 'Status', exact: true }).selectOption({ label: 'Pending' });
    await expect(row).toHaveCount(0);
    const released = await api('POST', `/api/machines/${fin}/unisolate`, {
      Comment: 'Playbook: false positive (browser test)',
    });
    expect(released.status, JSON.stringify(released.body)).toBe(201);
    const releaseRow = table.locator(`tr[data-action-id="${released.body.id}"]`);
    await expect(await cell(table, releaseRow, 'Status')).toHaveText(/^(Pending|InProgress|Succeeded)$/);
    await expect(await cell(table, releaseRow, 'Status')).toHaveText('Succeeded', { timeout: 15_000 });
    await expectSameDocument(page);
  });

  test('the Actions page filters by status, type and requestor', async ({ page }) => {
    const db = machineId('db-01');
    await cancelPending(db);
    // A cancelled isolation requested by the test app.
    const id = await pendingIsolation(db);
    await cancelPending(db);

    await signIn(page, analyst, '/actions');
    const table = page.getByRole('table');
    const row = table.locator(`tr[data-action-id="${id}"]`);
    await expect(row).toBeVisible();

    const status = page.getByRole('combobox', { name: 'Status', exact: true });
    await status.selectOption({ label: 'Cancelled' });
    await expect(row).toBeVisible();
    const statuses = table.locator('tr[data-action-id]');
    const column = (await table.getByRole('columnheader').allTextContents())
      .map((h) => h.trim())
      .indexOf('Status');
    await expect(async () => {
      const shown = await statuses.evaluateAll(
        (rows, i) =>
          rows.map(
            (r) =>
              /^(Pending|InProgress|Succeeded|Failed|TimeOut|Cancelled)/.exec(
                (r as HTMLTableRowElement).cells[i]?.textContent?.trim() ?? '',
              )?.[1],
          ),
        column,
      );
      expect(shown.length).toBeGreaterThan(0);
      expect(new Set(shown)).toEqual(new Set(['Cancelled']));
    }).toPass();
    await status.selectOption({ label: 'Succeeded' });
    await expect(row).toHaveCount(0);
    await status.selectOption({ label: 'Any status' });
    await expect(row).toBeVisible();

    const type = page.getByRole('combobox', { name: 'Type', exact: true });
    await type.selectOption({ label: 'Unisolate' });
    await expect(row).toHaveCount(0);
    await type.selectOption({ label: 'Any type' });
    await expect(row).toBeVisible();

    const requestor = page.getByRole('textbox', { name: 'Requested by', exact: true });
    await requestor.fill(analyst.upn);
    await expect(row).toHaveCount(0);
    await requestor.fill('');
    await expect(row).toBeVisible();
  });
});
