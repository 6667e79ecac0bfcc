// Sign-in through Cordon's built-in authority: the authorization-code flow
// with PKCE (S256), as a public client named `cordon-console`. The token is
// kept in this tab's sessionStorage only; signing out forgets it.

export const CLIENT_ID = 'cordon-console';
const SCOPE = 'https://api.securitycenter.microsoft.com/.default';
const TOKEN_KEY = 'cordon.token';
const PENDING_KEY = 'cordon.signin';
// A token this close to its end is not used any more.
const MARGIN_MS = 60_000;

export function tenant() {
  const meta = document.querySelector('meta[name="cordon-tenant"]');
  return meta ? meta.content : '';
}

function base64url(bytes) {
  let text = '';
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function randomText(length) {
  const bytes = new Uint8Array(length);
  crypto.getRandomValues(bytes);
  return base64url(bytes);
}

function redirectUri() {
  return `${location.origin}/`;
}

/** The current token, or null when there is none or it is about to end. */
export function token() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(TOKEN_KEY) || 'null');
    if (saved && typeof saved.accessToken === 'string' && saved.expiresAt - MARGIN_MS > Date.now()) {
      return saved;
    }
  } catch {
    // A damaged entry: sign in again.
  }
  return null;
}

/** Sends the browser to the sign-in page; it comes back to `returnTo`. */
export async function signIn(returnTo = location.pathname + location.search) {
  const verifier = randomText(48);
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
  const state = randomText(24);
  sessionStorage.setItem(PENDING_KEY, JSON.stringify({ verifier, state, returnTo }));
  const query = new URLSearchParams({
    client_id: CLIENT_ID,
    response_type: 'code',
    redirect_uri: redirectUri(),
    scope: SCOPE,
    state,
    code_challenge: base64url(new Uint8Array(digest)),
    code_challenge_method: 'S256',
  });
  location.assign(`/${encodeURIComponent(tenant())}/oauth2/v2.0/authorize?${query}`);
  // The page is going away; never resolve.
  return new Promise(() => {});
}

/**
 * Finishes a sign-in when the authority has just sent the browser back
 * with a code. Returns null when there was nothing to finish, or an error
 * sentence when it failed.
 */
export async function finishSignIn() {
  const params = new URLSearchParams(location.search);
  if (!params.has('code') && !params.has('error')) return null;
  let pending = null;
  try {
    pending = JSON.parse(sessionStorage.getItem(PENDING_KEY) || 'null');
  } catch {
    pending = null;
  }
  sessionStorage.removeItem(PENDING_KEY);
  history.replaceState(null, '', pending && pending.returnTo ? pending.returnTo : '/');
  if (params.has('error')) {
    return 'Sign-in did not complete. Sign in again; if it keeps failing, ask an administrator to check your account.';
  }
  if (!pending || pending.state !== params.get('state')) {
    return 'This sign-in was not started from this tab, or it took too long. Sign in again.';
  }
  let response;
  try {
    response = await fetch(`/${encodeURIComponent(tenant())}/oauth2/v2.0/token`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'authorization_code',
        client_id: CLIENT_ID,
        code: params.get('code'),
        redirect_uri: redirectUri(),
        code_verifier: pending.verifier,
      }),
    });
  } catch {
    return 'The connection to the server was lost while signing in. Check your network, then sign in again.';
  }
  if (!response.ok) {
    return 'Sign-in could not be completed (the code was refused or has expired). Sign in again.';
  }
  const body = await response.json();
  const expiresIn = Number(body.expires_in) || 3600;
  sessionStorage.setItem(TOKEN_KEY, JSON.stringify({
    accessToken: body.access_token,
    expiresAt: Date.now() + expiresIn * 1000,
  }));
  return null;
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(PENDING_KEY);
}
