// The guard every spec relies on: a console error, an uncaught page error or
// a Content-Security-Policy violation is recorded, and fails the test when
// it ends unless taken. Here each is provoked on a page of the server with
// a strict policy and must be recorded.
import { serverUrl, tenant } from '../lib/env';
import { expect, test } from '../lib/fixtures';

const authorize = `${serverUrl}/${tenant}/oauth2/v2.0/authorize`;
const strictPage =
  `${authorize}?` +
  new URLSearchParams({
    client_id: 'cordon-console',
    response_type: 'code',
    redirect_uri: 'http://127.0.0.1:45719/callback',
    scope: 'https://api.securitycenter.microsoft.com/.default',
    code_challenge: 'E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM',
    code_challenge_method: 'S256',
  });
// The same page refusing a request that names no redirect_uri (400).
const refused = (label: string) => `${authorize}?client_id=cordon-console&label=${label}`;

test.describe('the error guard', () => {
  test('records console errors, uncaught errors and CSP violations', async ({ page, watch }) => {
    await page.goto(strictPage);
    expect(watch.take()).toEqual([]);

    await page.evaluate(() => console.error('a console error'));
    await expect.poll(() => watch.take()).toEqual([expect.stringContaining('a console error')]);

    await page.evaluate(() => {
      setTimeout(() => {
        throw new Error('an uncaught error');
      }, 0);
    });
    await expect
      .poll(() => watch.take())
      .toEqual([expect.stringMatching(/^uncaught error: .*an uncaught error/)]);

    // An image from elsewhere: refused by default-src 'none'.
    await page.evaluate(() => {
      const img = document.createElement('img');
      img.src = 'https://127.0.0.1:9/x.png';
      document.body.append(img);
    });
    const seen: string[] = [];
    await expect
      .poll(() => {
        seen.push(...watch.take());
        return seen.some((p) => p.startsWith('CSP violation: img-src blocked https://127.0.0.1:9/x.png'));
      })
      .toBe(true);
  });

  test('lets an expected refusal through, and nothing else', async ({ page, watch }) => {
    // A refused request is logged by Chromium as an error...
    await page.goto(refused('first'));
    await expect
      .poll(() => watch.take())
      .toEqual([expect.stringMatching(/status of 400.*label=first/)]);
    // ...which a spec that expects it lets through.
    watch.allowHttpError(400, /label=second$/);
    await page.goto(refused('second'));
    await page.goto(refused('third'));
    await expect
      .poll(() => watch.take())
      .toEqual([expect.stringMatching(/status of 400.*label=third/)]);
  });
});
