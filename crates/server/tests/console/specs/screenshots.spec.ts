// Screenshots of the main pages at 1280x720, saved only when
// CORDON_SCREENSHOTS=DIR is set (`CORDON_SCREENSHOTS=docs/screenshots cargo
// test -p server --test console` refreshes the repository's).
import { join } from 'node:path';
import { admin, machineId, screenshotDir } from '../lib/env';
import { api, expect, signIn, test } from '../lib/fixtures';
import type { Page } from '@playwright/test';

async function shoot(page: Page, file: string): Promise<void> {
  // Fonts loaded, nothing blinking.
  await page.evaluate(() => document.fonts.ready);
  await page.screenshot({ path: join(screenshotDir!, file), animations: 'disabled', caret: 'hide' });
}

test.describe('screenshots', () => {
  test.skip(!screenshotDir, 'set CORDON_SCREENSHOTS=DIR to save screenshots of the main pages');

  test('the sign-in page', async ({ page }) => {
    // The console sends a visitor without a token to the sign-in page.
    await page.goto('/');
    await expect(page.getByLabel('User name')).toBeVisible();
    await shoot(page, 'sign-in.png');
  });

  test('the console pages', async ({ page }) => {
    test.setTimeout(90_000);
    const web02 = machineId('web-02');
    await signIn(page, admin, '/');
    await expect(page.getByTestId('live-status')).toHaveText('Live');
    await expect(page.getByRole('table').getByRole('link', { name: 'web-02' })).toBeVisible();
    await shoot(page, 'machines.png');

    await page.getByRole('table').getByRole('link', { name: 'web-02', exact: true }).click();
    const state = page.getByTestId('isolation-state');
    await expect(state).toHaveText('Not isolated');
    await page.getByRole('button', { name: 'Isolate machine' }).click();
    const dialog = page.getByRole('dialog', { name: 'Isolate web-02' });
    await dialog.getByLabel('Comment', { exact: true }).fill('Beaconing to a known C2 host');
    await shoot(page, 'isolate-dialog.png');
    await dialog.getByRole('button', { name: 'Isolate', exact: true }).click();
    await expect(state).toHaveText('Isolated', { timeout: 15_000 });
    await shoot(page, 'machine-isolated.png');

    await page.getByRole('navigation').getByRole('link', { name: 'Actions', exact: true }).click();
    await expect(page.getByRole('heading', { name: 'Actions', level: 1 })).toBeVisible();
    await expect(page.locator('tr[data-action-id]').first()).toBeVisible();
    await shoot(page, 'actions.png');

    await page.getByRole('navigation').getByRole('link', { name: 'Exclusions', exact: true }).click();
    await expect(page.getByRole('row').filter({ hasText: 'SSH from the jump hosts' })).toBeVisible();
    await shoot(page, 'exclusions.png');

    await page.getByRole('navigation').getByRole('link', { name: 'Audit', exact: true }).click();
    await expect(page.locator('tbody tr').first()).toBeVisible();
    await shoot(page, 'audit.png');

    // Back as it was, for the other specs.
    const released = await api('POST', `/api/machines/${web02}/unisolate`, {
      Comment: 'screenshots taken',
    });
    expect(released.status, JSON.stringify(released.body)).toBe(201);
    await expect
      .poll(async () => (await api('GET', `/api/machines/${web02}`)).body.isolationState, {
        timeout: 15_000,
      })
      .toBe('NotIsolated');
  });
});
