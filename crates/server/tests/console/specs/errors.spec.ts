// The API's refusals and a lost connection, as the console says them: a
// plain sentence that says what to do, never a code (UI-CONTRACT: "Errors").
// The 403 and the 429 are the server's own error bodies answered by the
// browser's network layer (a role changed under the user's feet, a rate
// limit reached), since the console never offers what a role forbids and
// the specs share one rate limit; the lost connection is the browser gone
// offline.
import type { Page } from '@playwright/test';
import { analyst, machineId } from '../lib/env';
import { expect, expectPlainAlert, signIn, test } from '../lib/fixtures';

/** Answers the next matching request with the API's error body. */
async function refuse(page: Page, url: RegExp, status: number, code: string, retryAfter?: number) {
  await page.route(
    url,
    (route) =>
      route.fulfill({
        status,
        contentType: 'application/json',
        headers: retryAfter ? { 'Retry-After': String(retryAfter) } : {},
        body: JSON.stringify({
          error: { code, message: `${code} from the test`, target: 'req-1' },
        }),
      }),
    { times: 1 },
  );
}

test.describe('errors as sentences', () => {

  test('a refused isolation (403) says to ask for the permission, and nothing changes', async ({
    page,
    watch,
  }) => {
    await signIn(page, analyst, `/machines/${machineId('web-02')}`);
    await expect(page.getByRole('heading', { name: 'web-02', level: 1 })).toBeVisible();
    const rows = page.locator('tr[data-action-id]');
    const before = await rows.count();
    watch.allowHttpError(403, /\/isolate$/);
    await refuse(page, /\/api\/machines\/[^/]+\/isolate$/, 403, 'Forbidden');

    await page.getByRole('button', { name: 'Isolate machine' }).click();
    const dialog = page.getByRole('dialog', { name: 'Isolate web-02' });
    await dialog.getByLabel('Comment', { exact: true }).fill('Refused (browser test)');
    await dialog.getByRole('button', { name: 'Isolate', exact: true }).click();
    const text = await expectPlainAlert(page, /role does not allow/);
    expect(text).toMatch(/administrator/i);
    // The dialog stays, with what was typed, and no action appeared.
    await expect(dialog).toBeVisible();
    await expect(dialog.getByLabel('Comment', { exact: true })).toHaveValue('Refused (browser test)');
    await expect(rows).toHaveCount(before);
  });

  test('a rate limit (429) says how long to wait', async ({ page, watch }) => {
    await signIn(page, analyst, '/');
    await expect(page.getByRole('heading', { name: 'Machines', level: 1 })).toBeVisible();
    watch.allowHttpError(429, /\/api\/machines/);
    await refuse(page, /\/api\/machines\?/, 429, 'TooManyRequests', 17);
    await page.getByRole('searchbox', { name: 'Search' }).fill('web');
    const text = await expectPlainAlert(page, /Too many requests/);
    expect(text).toContain('17 seconds');
    // The next search is answered again, and the sentence goes.
    await page.getByRole('searchbox', { name: 'Search' }).fill('web-0');
    await expect(page.getByRole('table').getByRole('link', { name: 'web-01' })).toBeVisible();
    await expect(page.getByRole('alert')).toHaveCount(0);
  });

  test('a lost connection says so, and the page works again once it is back', async ({
    page,
    context,
    watch,
  }) => {
    await signIn(page, analyst, '/');
    await expect(page.getByTestId('live-status')).toHaveText('Live');
    // Chromium logs the requests it could not send.
    watch.allowNetworkFailures();
    await context.setOffline(true);
    await page.getByRole('searchbox', { name: 'Search' }).fill('fin');
    const text = await expectPlainAlert(page, /connection to the server was lost/);
    expect(text).toMatch(/try again/i);

    await context.setOffline(false);
    await page.getByRole('searchbox', { name: 'Search' }).fill('fin-');
    await expect(page.getByRole('table').getByRole('link', { name: 'fin-01' })).toBeVisible();
    await expect(page.getByRole('alert')).toHaveCount(0);
    await expect(page.getByTestId('live-status')).toHaveText('Live', { timeout: 40_000 });
  });
});
