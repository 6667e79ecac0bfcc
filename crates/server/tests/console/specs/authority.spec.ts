// The built-in authority's sign-in page, as the console's sign-in uses it:
// authorization code with PKCE for the client cordon-console. This runs
// today, without the console: the redirect goes to a loopback callback that
// the test answers itself.
import { createHash, randomBytes } from 'node:crypto';
import { analyst, serverUrl, tenant, viewer } from '../lib/env';
import { api, expect, expectPlainAlert, postForm, type Reply, test } from '../lib/fixtures';

const CALLBACK = 'http://127.0.0.1:45719/callback';
const SCOPE = 'https://api.securitycenter.microsoft.com/.default openid';

function pkce(): { verifier: string; challenge: string } {
  const verifier = randomBytes(32).toString('base64url');
  const challenge = createHash('sha256').update(verifier).digest('base64url');
  return { verifier, challenge };
}

function authorizeUrl(challenge: string, state: string): string {
  const query = new URLSearchParams({
    client_id: 'cordon-console',
    response_type: 'code',
    redirect_uri: CALLBACK,
    scope: SCOPE,
    state,
    code_challenge: challenge,
    code_challenge_method: 'S256',
  });
  return `${serverUrl}/${tenant}/oauth2/v2.0/authorize?${query}`;
}

function exchange(code: string, verifier: string): Promise<Reply> {
  return postForm(`/${tenant}/oauth2/v2.0/token`, {
    grant_type: 'authorization_code',
    client_id: 'cordon-console',
    code,
    redirect_uri: CALLBACK,
    code_verifier: verifier,
  });
}

test.describe('the sign-in page of the built-in authority', () => {
  test('signs a user in with PKCE and returns a code that buys their token', async ({
    page,
    watch,
  }) => {
    const { verifier, challenge } = pkce();
    const state = randomBytes(8).toString('hex');
    // The loopback callback: answered here, as the console's page would be.
    await page.route(`${CALLBACK}**`, (route) =>
      route.fulfill({
        contentType: 'text/html',
        body: '<!DOCTYPE html><title>Callback</title><h1>Back at the client</h1>',
      }),
    );

    await page.goto(authorizeUrl(challenge, state));
    await expect(page.getByRole('heading', { name: 'Sign in to Cordon' })).toBeVisible();
    const name = page.getByLabel('User name');
    const password = page.getByLabel('Password');
    await expect(name).toBeFocused();

    // A wrong password: the form again, with a sentence, and no redirect.
    watch.allowHttpError(401, /\/oauth2\/v2\.0\/authorize/);
    await name.fill(analyst.upn);
    await password.fill('not the password');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await expectPlainAlert(page, /./);
    await expect(page).toHaveURL(/\/oauth2\/v2\.0\/authorize/);

    // By keyboard alone: the name is kept, the password typed, Enter sends.
    await expect(page.getByLabel('User name')).toHaveValue(analyst.upn);
    await page.getByLabel('Password').fill(analyst.password);
    await page.getByLabel('Password').press('Enter');
    await page.waitForURL(`${CALLBACK}**`);
    await expect(page.getByRole('heading', { name: 'Back at the client' })).toBeVisible();
    const back = new URL(page.url());
    expect(back.searchParams.get('state')).toBe(state);
    const code = back.searchParams.get('code');
    expect(code).toBeTruthy();

    // The code and the verifier buy the analyst's token, which the API takes.
    const token = await exchange(code!, verifier);
    expect(token.status, JSON.stringify(token.body)).toBe(200);
    const claims = JSON.parse(
      Buffer.from(token.body.access_token.split('.')[1], 'base64url').toString(),
    );
    expect(claims.upn).toBe(analyst.upn);
    expect(claims.appid).toBe('cordon-console');
    const machines = await api('GET', '/api/machines', undefined, token.body.access_token);
    expect(machines.status).toBe(200);
    const names = machines.body.value.map((m: { computerDnsName: string }) => m.computerDnsName);
    expect(names.sort()).toEqual(['db-01', 'fail-01', 'fin-01', 'web-01', 'web-02']);
    // A code works once.
    expect((await exchange(code!, verifier)).status).toBe(400);
  });

  test('a Viewer restricted to the Web group gets a token that sees only what the group allows', async ({
    page,
  }) => {
    const { verifier, challenge } = pkce();
    await page.route(`${CALLBACK}**`, (route) =>
      route.fulfill({ contentType: 'text/html', body: '<!DOCTYPE html><title>Callback</title>' }),
    );
    await page.goto(authorizeUrl(challenge, 'v'));
    await page.getByLabel('User name').fill(viewer.upn);
    await page.getByLabel('Password').fill(viewer.password);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForURL(`${CALLBACK}**`);
    const code = new URL(page.url()).searchParams.get('code')!;
    const token = await exchange(code, verifier);
    expect(token.status, JSON.stringify(token.body)).toBe(200);
    const machines = await api('GET', '/api/machines', undefined, token.body.access_token);
    const names = machines.body.value.map((m: { computerDnsName: string }) => m.computerDnsName);
    expect(names).toContain('web-01');
    expect(names).toContain('web-02');
    expect(names).not.toContain('fin-01');
  });
});
