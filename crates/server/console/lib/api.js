// Calls to Cordon's public API with the signed-in user's token, and the
// plain sentences the console shows instead of the API's error codes.

import { token, signIn } from './auth.js';

/** An API call that failed, with a sentence that says what to do. */
export class ApiError extends Error {
  constructor(sentence, { status = 0, code = '', retryAfter = 0, activeActionId = null } = {}) {
    super(sentence);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.activeActionId = activeActionId;
  }
}

const LOST = 'The connection to the server was lost. Check your network or whether the server is running, then try again.';

/**
 * The sentence for an error answer. `what` names the thing asked for
 * ("This machine", "This action", ...), for 404s.
 */
export function sentence(status, code, message, retryAfter, what = 'What you asked for') {
  if (code === 'ActiveRequestAlreadyExists') {
    return 'Another isolation action for this machine is still in progress. Wait for it to finish or cancel it, then try again.';
  }
  if (status === 401) return 'Your session has ended. Sign in again.';
  if (status === 403) return 'Your role does not allow this. Ask an administrator for the permission.';
  if (status === 404) return `${what} was not found, or it is outside the machine groups you can see.`;
  if (status === 413) return 'That is too long to send. Shorten it, then try again.';
  if (status === 429) {
    const wait = retryAfter > 0 ? `in ${retryAfter} second${retryAfter === 1 ? '' : 's'}` : 'in a minute';
    return `Too many requests right now. Try again ${wait}.`;
  }
  if (code === 'MissingRequiredParameter') return 'Write a comment before confirming.';
  if (status === 400 && message && !/[{}<>]/.test(message)) {
    // The API's own messages for bad input are sentences already.
    return message;
  }
  if (status >= 500) return 'The server could not do this right now. Try again in a moment; if it keeps failing, tell your administrator.';
  return 'The request could not be completed. Reload the page, then try again.';
}

/**
 * Calls the API. `path` starts with `/api/`. Resolves with the parsed body
 * (null for an empty one); rejects with an ApiError. A 401 sends the browser
 * to the sign-in page, which brings it back here.
 */
export async function call(path, { method = 'GET', body, what, signal } = {}) {
  const current = token();
  if (!current) {
    await signIn();
  }
  const headers = { Authorization: `Bearer ${current.accessToken}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (error) {
    if (error && error.name === 'AbortError') throw error;
    throw new ApiError(LOST, { status: 0, code: 'Network' });
  }
  if (response.status === 401) {
    await signIn();
  }
  const text = await response.text();
  let parsed = null;
  if (text) {
    try {
      parsed = JSON.parse(text);
    } catch {
      parsed = null;
    }
  }
  if (response.ok) return parsed;
  const error = (parsed && parsed.error) || {};
  const retryAfter = Number(response.headers.get('Retry-After')) || 0;
  throw new ApiError(sentence(response.status, error.code, error.message, retryAfter, what), {
    status: response.status,
    code: error.code || '',
    retryAfter,
    activeActionId: error.activeActionId || null,
  });
}

/** An OData string literal. */
export function literal(text) {
  return `'${String(text).replace(/'/g, "''")}'`;
}

/** A query string from an object, leaving out empty values. */
export function query(params) {
  const parts = [];
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === '') continue;
    parts.push(`${encodeURIComponent(name)}=${encodeURIComponent(value)}`);
  }
  return parts.length ? `?${parts.join('&')}` : '';
}
