// Machines: signing in through the authority, the list, search, filters,
// and a machine's page (UI-CONTRACT: "Machines page", "Machine page").
import { analyst, machineId } from '../lib/env';
import { cell, expect, signIn, test } from '../lib/fixtures';

const ALL = ['db-01', 'fail-01', 'fin-01', 'web-01', 'web-02'];

test.describe('the Machines page', () => {

  test('an analyst signs in through the authority page and lands on Machines', async ({ page }) => {
    await page.goto('/');
    // Not signed in: the authority's page, then back to where we asked to go.
    await expect(page.getByRole('button', { name: 'Sign in' })).toBeVisible();
    await page.getByLabel('User name').fill(analyst.upn);
    await page.getByLabel('Password').fill(analyst.password);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await expect(page.getByRole('heading', { name: 'Machines', level: 1 })).toBeVisible();
    expect(new URL(page.url()).pathname).toBe('/');

    const banner = page.getByRole('banner');
    await expect(banner).toContainText(analyst.upn);
    await expect(banner).toContainText('Responder');
    const nav = page.getByRole('navigation');
    await expect(nav.getByRole('link', { name: 'Machines', exact: true })).toBeVisible();
    await expect(nav.getByRole('link', { name: 'Actions', exact: true })).toBeVisible();
    // A Responder manages neither exclusions nor the audit trail.
    await expect(page.getByRole('link', { name: 'Exclusions' })).toHaveCount(0);
    await expect(page.getByRole('link', { name: 'Audit' })).toHaveCount(0);
    await expect(page.getByTestId('live-status')).toHaveText('Live');

    const table = page.getByRole('table');
    for (const header of ['Name', 'OS', 'Health', 'Last seen', 'Group', 'Tags', 'Isolation', 'Scope']) {
      await expect(table.getByRole('columnheader', { name: header, exact: true })).toBeVisible();
    }
    for (const name of ALL) {
      await expect(table.getByRole('link', { name, exact: true })).toBeVisible();
    }
    await expect(page.getByText(/Machines 1–5 of 5/)).toBeVisible();

    // A row shows the machine's facts: group, tags, isolation state.
    const fin = table.getByRole('row').filter({ has: page.getByRole('link', { name: 'fin-01' }) });
    await expect(await cell(table, fin, 'Group')).toHaveText('Finance');
    await expect(await cell(table, fin, 'Tags')).toContainText('payments');
    await expect(await cell(table, fin, 'Isolation')).toHaveText(/^(Isolated|Not isolated)$/);
    const failing = table.getByRole('row').filter({ has: page.getByRole('link', { name: 'fail-01' }) });
    // fail-01's agent never manages to isolate.
    await expect(await cell(table, failing, 'Isolation')).toHaveText('Not isolated');
  });

  test('search finds machines by the start of their name or address', async ({ page }) => {
    await signIn(page, analyst, '/');
    const table = page.getByRole('table');
    const search = page.getByRole('searchbox', { name: 'Search' });
    const shown = async (names: string[]) => {
      for (const name of ALL) {
        await expect(table.getByRole('link', { name, exact: true })).toHaveCount(
          names.includes(name) ? 1 : 0,
        );
      }
    };

    await search.fill('web');
    await shown(['web-01', 'web-02']);
    await search.fill('WEB-02');
    await shown(['web-02']);
    // The start of the last IP address: db-01 is 198.18.2.21, web-* 198.18.1.x.
    await search.fill('198.18.2');
    await shown(['db-01']);
    await search.fill('198.18.1.');
    await shown(['web-01', 'web-02']);
    await search.fill('nothing-like-this');
    await shown([]);
    await search.fill('');
    await shown(ALL);
  });

  test('filters by group and by isolation state', async ({ page }) => {
    await signIn(page, analyst, '/');
    const table = page.getByRole('table');
    const group = page.getByRole('combobox', { name: 'Group', exact: true });
    await expect(group.getByRole('option', { name: 'All groups' })).toHaveCount(1);
    await group.selectOption({ label: 'Finance' });
    await expect(table.getByRole('link', { name: 'fin-01' })).toBeVisible();
    await expect(table.getByRole('link', { name: /^web-/ })).toHaveCount(0);
    await group.selectOption({ label: 'Web' });
    await expect(table.getByRole('link', { name: /^web-0[12]$/ })).toHaveCount(2);
    await expect(table.getByRole('link', { name: 'fin-01' })).toHaveCount(0);
    await group.selectOption({ label: 'All groups' });

    const state = page.getByRole('combobox', { name: 'Isolation state', exact: true });
    for (const option of ['Any state', 'Isolated', 'Not isolated', 'Isolating', 'Releasing']) {
      await expect(state.getByRole('option', { name: option, exact: true })).toHaveCount(1);
    }
    // fail-01 is never isolated; db-01's isolations never complete.
    await state.selectOption({ label: 'Isolated' });
    await expect(table.getByRole('link', { name: 'fail-01' })).toHaveCount(0);
    await expect(table.getByRole('link', { name: 'db-01' })).toHaveCount(0);
    await state.selectOption({ label: 'Not isolated' });
    await expect(table.getByRole('link', { name: 'fail-01' })).toBeVisible();
  });

  test("a deep link survives the sign-in, and a machine's name opens its page", async ({ page }) => {
    const id = machineId('web-01');
    // Asked for the machine's page, signed in, and back on it.
    await signIn(page, analyst, `/machines/${id}`);
    await expect(page.getByRole('heading', { name: 'web-01', level: 1 })).toBeVisible();

    await page.getByRole('navigation').getByRole('link', { name: 'Machines', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'Machines', level: 1 })).toBeVisible();
    await page.getByRole('table').getByRole('link', { name: 'web-01', exact: true }).click();
    await expect(page).toHaveURL(new RegExp(`/machines/${id}$`));
    await expect(page.getByRole('heading', { name: 'web-01', level: 1 })).toBeVisible();
    const facts = page.locator('dl');
    await expect(facts).toContainText('198.18.1.11');
    await expect(facts).toContainText('Web');
    await expect(facts).toContainText('prod');
    await expect(page.getByTestId('isolation-state')).toHaveText(
      /^(Isolated|Not isolated|Isolating|Releasing)$/,
    );
    await expect(page.getByRole('heading', { name: 'Action history' })).toBeVisible();
    for (const header of ['Type', 'Status', 'Requested by', 'Comment', 'Created', 'Updated', 'Details']) {
      await expect(page.getByRole('columnheader', { name: header, exact: true })).toBeVisible();
    }
  });
});
