// The live channel: `GET /api/events`, server-sent events read through
// fetch (so that the token goes in the Authorization header, never in a
// URL). Pages subscribe to event types; when the stream drops, it comes back
// with `Last-Event-ID` after a jittered, growing pause, and a `resync` event
// (the server could not replay what was missed) tells pages to reload their
// data.

import { token, signIn } from './auth.js';

const listeners = new Set();
const statusListeners = new Set();
let status = 'connecting';
let started = false;
let lastEventId = '';

/** Calls `listener(type, data)` for every event; returns the unsubscribe. */
export function subscribe(listener) {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** Calls `listener(status)` on every change: connecting, live, paused,
 * expired (the token ended; signing in again starts a new page). */
export function watchStatus(listener) {
  statusListeners.add(listener);
  listener(status);
  return () => statusListeners.delete(listener);
}

function setStatus(next) {
  if (next === status) return;
  status = next;
  for (const listener of statusListeners) listener(status);
}

function dispatch(type, data) {
  for (const listener of listeners) {
    try {
      listener(type, data);
    } catch (error) {
      // One page's mistake must not stop the others' updates.
      console.warn('live listener failed', error);
    }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Reads one stream until it ends. Returns the server's Retry-After, if any. */
async function readStream() {
  const current = token();
  if (!current) {
    // The session ended: say so instead of leaving the page on its own.
    setStatus('expired');
    return -1;
  }
  const headers = { Authorization: `Bearer ${current.accessToken}`, Accept: 'text/event-stream' };
  if (lastEventId) headers['Last-Event-ID'] = lastEventId;
  const response = await fetch('/api/events', { headers, cache: 'no-store' });
  if (response.status === 401) {
    setStatus('expired');
    return -1;
  }
  if (!response.ok || !response.body) {
    return Number(response.headers.get('Retry-After')) || 0;
  }
  setStatus('live');
  // What changed before a stream was open is not in it: pages reload what
  // they show now that they will hear of every change (on the first open
  // too, since pages load their data while it connects).
  dispatch('connected', null);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = { type: 'message', data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return 0;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(buffer[end] === '\r' && buffer[end + 1] === '\n' ? end + 2 : end + 1);
      if (line === '') {
        if (event.id !== null) lastEventId = event.id;
        if (event.data.length) {
          let data = null;
          try {
            data = JSON.parse(event.data.join('\n'));
          } catch {
            data = null;
          }
          const payload = data && typeof data === 'object' && 'data' in data ? data.data : data;
          dispatch(event.type, payload);
        }
        event = { type: 'message', data: [], id: null };
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? '' : line.slice(colon + 1);
      if (text.startsWith(' ')) text = text.slice(1);
      if (field === 'event') event.type = text;
      else if (field === 'data') event.data.push(text);
      else if (field === 'id') event.id = text;
    }
  }
}

/** Starts the channel once; it runs as long as the page. */
export function start() {
  if (started) return;
  started = true;
  (async () => {
    let failures = 0;
    for (;;) {
      let retryAfter = 0;
      let wasLive = false;
      try {
        setStatus(failures ? 'paused' : 'connecting');
        retryAfter = await readStream();
        wasLive = status === 'live';
      } catch {
        // A dropped connection: try again below.
      }
      if (retryAfter < 0) return;
      setStatus('paused');
      failures = wasLive ? 1 : failures + 1;
      // 1 s, 2 s, 4 s ... up to 30 s, ± a quarter, or the server's word.
      const backoff = Math.min(30_000, 1000 * 2 ** Math.min(failures - 1, 5));
      const wait = Math.max(retryAfter * 1000, backoff * (0.75 + Math.random() / 2));
      await sleep(wait);
    }
  })();
}
