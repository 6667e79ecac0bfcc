// Pieces every page uses: the html template tag, links and navigation,
// dialogs, alerts, paging, and how times and states are written.

import { h } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import htm from 'htm';
import { call, query } from './api.js';

export const html = htm.bind(h);

// ---- navigation -----------------------------------------------------------

const routeListeners = new Set();

export function navigate(to, { replace = false } = {}) {
  if (to === location.pathname + location.search) return;
  if (replace) history.replaceState(null, '', to);
  else history.pushState(null, '', to);
  for (const listener of routeListeners) listener();
}

window.addEventListener('popstate', () => {
  for (const listener of routeListeners) listener();
});

/** The current path and query, re-rendering on navigation. */
export function useLocation() {
  const [here, setHere] = useState(location.pathname + location.search);
  useEffect(() => {
    const listener = () => setHere(location.pathname + location.search);
    routeListeners.add(listener);
    return () => routeListeners.delete(listener);
  }, []);
  return here;
}

/** A real link (it opens in a new tab too) that navigates in place. */
export function Link({ href, children, ...rest }) {
  const onClick = (event) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    navigate(href);
  };
  return html`<a href=${href} onClick=${onClick} ...${rest}>${children}</a>`;
}

// ---- dialogs and alerts ---------------------------------------------------

let dialogCount = 0;

/**
 * A modal dialog (the browser's own `<dialog>`: focus stays inside, Esc
 * closes it). `title` names it for assistive technology.
 */
export function Dialog({ title, onClose, children }) {
  const ref = useRef(null);
  const [id] = useState(() => `dialog-title-${++dialogCount}`);
  useEffect(() => {
    const dialog = ref.current;
    if (dialog && !dialog.open) dialog.showModal();
    return () => {
      if (dialog && dialog.open) dialog.close();
    };
  }, []);
  const onCancel = (event) => {
    event.preventDefault();
    onClose();
  };
  return html`<dialog ref=${ref} aria-labelledby=${id} onCancel=${onCancel}>
    <h2 id=${id}>${title}</h2>
    ${children}
  </dialog>`;
}

/**
 * A dialog's form that wants a comment: `onSubmit` refuses an empty one
 * with a sentence, else runs `send(comment)` (trimmed), which resolves when
 * done; its error's sentence is shown and the form can be sent again.
 */
export function useCommentForm(send) {
  const [comment, setComment] = useState('');
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const onSubmit = async (event) => {
    event.preventDefault();
    if (!comment.trim()) {
      setError('Write a comment that says why; it is kept with the action.');
      return;
    }
    setBusy(true);
    setError('');
    try {
      await send(comment.trim());
    } catch (e) {
      setError(e.message);
      setBusy(false);
    }
  };
  return { comment, setComment, error, busy, onSubmit };
}

/** An error sentence, announced to screen readers. */
export function Alert({ children }) {
  if (!children) return null;
  return html`<p role="alert" class="alert">${children}</p>`;
}

// ---- formatting -----------------------------------------------------------

const STATE_WORDS = {
  Isolated: 'Isolated',
  NotIsolated: 'Not isolated',
  Isolating: 'Isolating',
  Releasing: 'Releasing',
};

export function stateWords(state) {
  return STATE_WORDS[state] || state || '—';
}

export function StateBadge({ state }) {
  return html`<span class=${`badge state-${state || 'unknown'}`}>${stateWords(state)}</span>`;
}

export function StatusBadge({ status }) {
  return html`<span class=${`badge status-${status}`}>${status}</span>`;
}

export function formatTime(iso) {
  if (!iso) return '—';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, {
    year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
}

export function ago(iso) {
  if (!iso) return 'never';
  const seconds = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (!Number.isFinite(seconds)) return iso;
  if (seconds < 60) return 'just now';
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} days ago`;
}

/** A time shown relative, with the full time on hover and for readers. */
export function Time({ iso, relative = false }) {
  if (!iso) return html`<span>—</span>`;
  return html`<time datetime=${iso} title=${formatTime(iso)}>${relative ? ago(iso) : formatTime(iso)}</time>`;
}

// ---- paging ---------------------------------------------------------------

export const PAGE_SIZE = 50;

/**
 * One page of a list from the API (`path`, sorted by `orderby`, with the
 * total), loaded again when the filter, the page or `reload` change:
 * `[{ rows, total } or null, setResult, error]`. `merge(current, loaded)`
 * may keep what live events brought while the page loaded. Nothing is
 * asked while `enabled` is false.
 */
export function useListPage(path, { filter, orderby, skip, reload, merge, enabled = true }) {
  const [result, setResult] = useState(null);
  const [error, setError] = useState('');
  const url = `${path}${query({
    $filter: filter,
    $orderby: orderby,
    $top: PAGE_SIZE,
    $skip: skip || '',
    $count: 'true',
  })}`;
  useEffect(() => {
    if (!enabled) return undefined;
    const controller = new AbortController();
    call(url, { signal: controller.signal })
      .then((body) => {
        setResult((current) => ({
          rows: current && merge ? merge(current.rows, body.value) : body.value,
          total: body['@odata.count'] ?? body.value.length,
        }));
        setError('');
      })
      .catch((e) => {
        if (e.name !== 'AbortError') setError(e.message);
      });
    return () => controller.abort();
  }, [url, reload, enabled]);
  return [result, setResult, error];
}

export function Pager({ what, skip, shown, total, onPage }) {
  const first = shown ? skip + 1 : 0;
  const last = skip + shown;
  return html`<nav class="pager" aria-label=${`${what} pages`}>
    <button type="button" onClick=${() => onPage(Math.max(0, skip - PAGE_SIZE))} disabled=${skip === 0}>Previous page</button>
    <span aria-live="polite">${what} ${first}–${last} of ${total}</span>
    <button type="button" onClick=${() => onPage(skip + PAGE_SIZE)} disabled=${last >= total}>Next page</button>
  </nav>`;
}

/** Reads and writes the page's query string as state. */
export function useQueryState() {
  const here = useLocation();
  const params = new URLSearchParams(here.split('?')[1] || '');
  const set = (changes, { replace = true } = {}) => {
    const next = new URLSearchParams(location.search);
    for (const [name, value] of Object.entries(changes)) {
      if (value === '' || value === null || value === undefined || value === 0) next.delete(name);
      else next.set(name, String(value));
    }
    const text = next.toString();
    navigate(location.pathname + (text ? `?${text}` : ''), { replace });
  };
  return [params, set];
}
