// What each role is offered: a Viewer restricted to the Web group, an
// administrator's exclusion rules and audit trail, and signing out
// (UI-CONTRACT: "Header", "Exclusions page", "Audit page").
import { admin, analyst, machineId, viewer } from '../lib/env';
import { api, cell, expect, expectPlainAlert, signIn, test } from '../lib/fixtures';

test.describe('roles and sign-out', () => {

  test('a Viewer sees the Web machines, not Finance, and is offered no isolation', async ({
    page,
    watch,
  }) => {
    await signIn(page, viewer, '/');
    await expect(page.getByRole('banner')).toContainText('Viewer');
    const table = page.getByRole('table');
    await expect(table.getByRole('link', { name: 'web-01', exact: true })).toBeVisible();
    await expect(table.getByRole('link', { name: 'web-02', exact: true })).toBeVisible();
    await expect(table.getByRole('link', { name: 'fin-01' })).toHaveCount(0);
    await expect(page.getByRole('link', { name: 'Exclusions' })).toHaveCount(0);
    await expect(page.getByRole('link', { name: 'Audit' })).toHaveCount(0);

    await table.getByRole('link', { name: 'web-01', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'web-01', level: 1 })).toBeVisible();
    await expect(page.getByTestId('isolation-state')).toBeVisible();
    await expect(page.getByRole('button', { name: /^Isolate/ })).toHaveCount(0);
    await expect(page.getByRole('button', { name: /^Release/ })).toHaveCount(0);

    // Finance's machine by its address: as good as unknown, said in a sentence.
    watch.allowHttpError(404, /\/api\/machines\//);
    await page.goto(`/machines/${machineId('fin-01')}`);
    await expectPlainAlert(page, /not found/i);
    await expect(page.getByRole('heading', { name: 'fin-01' })).toHaveCount(0);
  });

  test('an administrator adds, edits and removes an exclusion rule', async ({ page }) => {
    const name = 'Backups (browser test)';
    await signIn(page, admin, '/');
    await expect(page.getByRole('banner')).toContainText('Administrator');
    await page.getByRole('navigation').getByRole('link', { name: 'Exclusions', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'Isolation exclusions', level: 1 })).toBeVisible();
    const table = page.getByRole('table');
    for (const header of ['Name', 'Applies to', 'Direction', 'Remote addresses', 'Remote ports', 'Description']) {
      await expect(table.getByRole('columnheader', { name: header, exact: true })).toBeVisible();
    }
    // The rule the test server starts with.
    await expect(table.getByRole('row').filter({ hasText: 'SSH from the jump hosts' })).toHaveCount(1);

    await page.getByRole('button', { name: 'Add rule' }).click();
    const add = page.getByRole('dialog', { name: 'Add exclusion rule' });
    await add.getByLabel('Name', { exact: true }).fill(name);
    await add.getByLabel('Description', { exact: true }).fill('Nightly backups');
    await add.getByLabel('Systemd unit', { exact: true }).fill('backup.service');
    await add.getByLabel('Direction', { exact: true }).selectOption({ label: 'Outbound' });
    await add.getByLabel('Remote addresses', { exact: true }).fill('198.18.9.0/24');
    await add.getByLabel('Remote ports', { exact: true }).fill('873');
    await add.getByRole('button', { name: 'Save' }).click();
    await expect(add).toBeHidden();
    const row = table.getByRole('row').filter({ hasText: name });
    await expect(row).toHaveCount(1);
    await expect(await cell(table, row, 'Remote addresses')).toContainText('198.18.9.0/24');
    await expect(await cell(table, row, 'Remote ports')).toContainText('873');
    await expect(await cell(table, row, 'Applies to')).toContainText('backup.service');

    await row.getByRole('button', { name: 'Edit' }).click();
    const edit = page.getByRole('dialog', { name: 'Edit exclusion rule' });
    await expect(edit.getByLabel('Description', { exact: true })).toHaveValue('Nightly backups');
    await edit.getByLabel('Description', { exact: true }).fill('Nightly and weekly backups');
    await edit.getByRole('button', { name: 'Save' }).click();
    await expect(edit).toBeHidden();
    await expect(await cell(table, row, 'Description')).toHaveText('Nightly and weekly backups');
    const rules = await api('GET', '/api/isolationExclusionRules');
    const saved = rules.body.value.find((r: { name: string }) => r.name === name);
    expect(saved?.description).toBe('Nightly and weekly backups');

    await row.getByRole('button', { name: 'Remove' }).click();
    const remove = page.getByRole('dialog');
    await expect(remove).toContainText(name);
    await remove.getByRole('button', { name: 'Remove rule' }).click();
    await expect(remove).toBeHidden();
    await expect(row).toHaveCount(0);
    const after = await api('GET', '/api/isolationExclusionRules');
    expect(after.body.value.map((r: { name: string }) => r.name)).not.toContain(name);
  });

  test('an administrator reads the audit trail, which shows new records live', async ({ page }) => {
    await signIn(page, admin, '/');
    await page.getByRole('navigation').getByRole('link', { name: 'Audit', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'Audit trail', level: 1 })).toBeVisible();
    const table = page.getByRole('table');
    for (const header of ['Time', 'Who', 'Action', 'Target', 'Outcome', 'Details']) {
      await expect(table.getByRole('columnheader', { name: header, exact: true })).toBeVisible();
    }
    await expect(table.getByRole('row').filter({ hasText: admin.upn }).first()).toBeVisible();
    await expect(page.getByTestId('live-status')).toHaveText('Live');

    // A change made elsewhere appears without a reload, newest first.
    const rows = table.locator('tbody tr');
    const created = await api('POST', '/api/isolationExclusionRules', {
      Name: 'Audit probe (browser test)',
      SystemdUnit: 'probe.service',
    });
    expect(created.status, JSON.stringify(created.body)).toBe(201);
    try {
      await expect(rows.first()).toContainText('Browser tests');
    } finally {
      await api('DELETE', `/api/isolationExclusionRules/${created.body.id}`);
    }
  });

  test('signing out ends the session', async ({ page }) => {
    await signIn(page, analyst, '/');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await expect(page.getByRole('heading', { name: 'Signed out' })).toBeVisible();
    const tokens = await page.evaluate(() =>
      Object.keys(sessionStorage).filter((k) => /eyJ/.test(sessionStorage.getItem(k) ?? '')),
    );
    expect(tokens, 'no token left in sessionStorage').toEqual([]);
    // Any page now asks to sign in again.
    await page.goto('/actions');
    await expect(page.getByLabel('User name')).toBeVisible();
    await page.goBack();
    await page.goto('/');
    await expect(page.getByRole('button', { name: 'Sign in' })).toBeVisible();
  });

  test('"Sign in again" goes back to the authority', async ({ page }) => {
    await signIn(page, viewer, '/');
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Signed out' }).waitFor();
    await page.getByRole('link', { name: 'Sign in again' }).or(
      page.getByRole('button', { name: 'Sign in again' }),
    ).click();
    await page.getByLabel('User name').fill(viewer.upn);
    await page.getByLabel('Password').fill(viewer.password);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await expect(page.getByRole('banner')).toContainText(viewer.upn);
  });
});
