// The `test` every spec uses: Playwright's, with a page that fails the test
// on any console error, uncaught page error or Content-Security-Policy
// violation, plus helpers shared by the specs.
import { readFileSync } from 'node:fs';
import { request as httpsRequest } from 'node:https';
import { test as base, expect, type Locator, type Page } from '@playwright/test';
import { appToken, serverUrl, type User } from './env';

interface Watch {
  /**
   * Accepts Chromium's "Failed to load resource: ... status of STATUS"
   * console line for a URL matching `url`: a spec that provokes an API
   * refusal on purpose (a 400 or 404 the page then explains) declares it.
   * Everything else logged as an error still fails the test.
   */
  allowHttpError(status: number, url: RegExp): void;
  /**
   * Accepts Chromium's "Failed to load resource: net::ERR_…" lines: for a
   * spec that takes the browser offline on purpose.
   */
  allowNetworkFailures(): void;
  /** Takes (and clears) what the browser reported so far: for specs/guard.spec.ts. */
  take(): string[];
}

interface Watched {
  allowed: { status: number; url: RegExp }[];
  offline: { allowed: boolean };
  problems: string[];
}

const watched = new WeakMap<Page, Watched>();

export const test = base.extend<{ watch: Watch }>({
  // Every test's page is watched: errors fail the test when it ends.
  page: async ({ page }, use) => {
    const allowed: Watched['allowed'] = [];
    const offline: Watched['offline'] = { allowed: false };
    const problems: string[] = [];
    watched.set(page, { allowed, offline, problems });
    page.on('console', (message) => {
      if (message.type() !== 'error') return;
      const where = message.location().url;
      const text = message.text();
      const expected =
        allowed.some((a) => text.includes(`status of ${a.status}`) && a.url.test(where)) ||
        (offline.allowed && /Failed to load resource: net::ERR_/.test(text));
      if (!expected) problems.push(`console error: ${text}${where ? ` (${where})` : ''}`);
    });
    page.on('pageerror', (error) => problems.push(`uncaught error: ${error.stack ?? error.message}`));
    page.on('crash', () => problems.push('the page crashed'));
    await page.exposeBinding('__cordonCspViolation', (_source, text: string) => {
      problems.push(`CSP violation: ${text}`);
    });
    await page.addInitScript(() => {
      document.addEventListener('securitypolicyviolation', (e) => {
        const report = (window as unknown as { __cordonCspViolation(t: string): void })
          .__cordonCspViolation;
        report(
          `${e.effectiveDirective} blocked ${e.blockedURI || '(inline)'} on ${e.documentURI}` +
            (e.sourceFile ? ` from ${e.sourceFile}:${e.lineNumber}` : ''),
        );
      });
    });
    await use(page);
    expect(problems, 'the browser reported errors').toEqual([]);
  },
  watch: async ({ page }, use) => {
    const { allowed, offline, problems } = watched.get(page)!;
    await use({
      allowHttpError: (status, url) => allowed.push({ status, url }),
      allowNetworkFailures: () => {
        offline.allowed = true;
      },
      take: () => problems.splice(0),
    });
  },
});

export { expect };

// ---- the public API, behind the UI's back -----------------------------------

const ca = readFileSync(process.env.CORDON_CA ?? '');

export interface Reply {
  status: number;
  body: any;
}

/** Calls the API with the test app's token (or `token`). */
export function api(method: string, path: string, body?: unknown, token = appToken): Promise<Reply> {
  return call(method, path, {
    authorization: `Bearer ${token}`,
    ...(body === undefined ? {} : { 'content-type': 'application/json', body: JSON.stringify(body) }),
  });
}

/** Posts a form (such as to the token endpoint). */
export function postForm(path: string, fields: Record<string, string>): Promise<Reply> {
  return call('POST', path, {
    'content-type': 'application/x-www-form-urlencoded',
    body: new URLSearchParams(fields).toString(),
  });
}

/** One HTTPS request to the server, trusting the test CA only. */
function call(method: string, path: string, options: Record<string, string>): Promise<Reply> {
  const { body, ...headers } = options;
  const payload = body === undefined ? undefined : Buffer.from(body);
  return new Promise((resolve, reject) => {
    const req = httpsRequest(
      new URL(path, serverUrl),
      { method, ca, timeout: 10_000, headers },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: unknown = text;
          try {
            parsed = text ? JSON.parse(text) : undefined;
          } catch {
            // not JSON: keep the text
          }
          resolve({ status: res.statusCode ?? 0, body: parsed });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer within 10 s`)));
    req.on('error', reject);
    req.end(payload);
  });
}

/** The ids of the Pending actions of a machine. */
export async function pendingActions(machineId: string): Promise<string[]> {
  const filter = encodeURIComponent(`machineId eq '${machineId}' and status eq 'Pending'`);
  const reply = await api('GET', `/api/machineactions?$filter=${filter}`);
  expect(reply.status, JSON.stringify(reply.body)).toBe(200);
  return reply.body.value.map((a: { id: string }) => a.id);
}

/** Cancels every Pending action of a machine (a spec's clean start). */
export async function cancelPending(machineId: string): Promise<void> {
  for (const id of await pendingActions(machineId)) {
    const reply = await api('POST', `/api/machineactions/${id}/cancel`, {
      Comment: 'browser test: clean start',
    });
    expect(reply.status, JSON.stringify(reply.body)).toBe(200);
  }
}

/** A Pending isolation of a machine whose agent is away: an existing one or a new one. */
export async function pendingIsolation(machineId: string): Promise<string> {
  const existing = await pendingActions(machineId);
  if (existing.length > 0) return existing[0];
  const reply = await api('POST', `/api/machines/${machineId}/isolate`, {
    Comment: 'browser test: left pending',
    IsolationType: 'Full',
  });
  expect(reply.status, JSON.stringify(reply.body)).toBe(201);
  return reply.body.id;
}

// ---- the pages ----------------------------------------------------------------

/**
 * Opens `path`, which sends the browser to the authority's sign-in page,
 * signs `user` in there and waits to be back on `path`.
 */
export async function signIn(page: Page, user: User, path = '/'): Promise<void> {
  await page.goto(path);
  await expect(page).toHaveURL(/\/oauth2\/v2\.0\/authorize/);
  await page.getByLabel('User name').fill(user.upn);
  await page.getByLabel('Password').fill(user.password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await expect(page).toHaveURL((url) => url.pathname === path && url.origin === serverUrl);
  await expect(page.getByRole('banner')).toContainText(user.upn);
}

/** Leaves a mark on the window; [`expectSameDocument`] checks it is still there (no reload). */
export async function markDocument(page: Page): Promise<void> {
  await page.evaluate(() => {
    (window as unknown as { __cordonMark: string }).__cordonMark = 'not reloaded';
  });
}

export async function expectSameDocument(page: Page): Promise<void> {
  const mark = await page.evaluate(
    () => (window as unknown as { __cordonMark?: string }).__cordonMark ?? 'reloaded',
  );
  expect(mark, 'the page was reloaded or navigated away').toBe('not reloaded');
}

/** The cell of `row` in the column headed `header` of `table`. */
export async function cell(table: Locator, row: Locator, header: string): Promise<Locator> {
  const headers = (await table.getByRole('columnheader').allTextContents()).map((h) => h.trim());
  const index = headers.indexOf(header);
  expect(index, `a column "${header}" among ${JSON.stringify(headers)}`).toBeGreaterThanOrEqual(0);
  return row.locator(':scope > td, :scope > th').nth(index);
}

/** Asserts an alert that says what happened in a sentence, never a raw code. */
export async function expectPlainAlert(page: Page, wanted: RegExp): Promise<string> {
  const alert = page.getByRole('alert').filter({ hasText: wanted });
  await expect(alert).toBeVisible();
  const text = (await alert.innerText()).trim();
  expect(text).not.toMatch(
    /ActiveRequestAlreadyExists|ResourceNotFound|Forbidden|TooManyRequests|InvalidInput|\b[45]\d\d\b|\{|error_description/,
  );
  expect(text, 'a sentence').toMatch(/^[A-Z].*[.!?…]$/s);
  return text;
}
