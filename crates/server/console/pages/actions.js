// Actions: every action the user may see, filtered, with Cancel on the
// pending ones.

import { useEffect, useRef, useState } from 'preact/hooks';
import { call, literal } from '../lib/api.js';
import { subscribe } from '../lib/live.js';
import { html, Link, Alert, Dialog, Pager, PAGE_SIZE, useCommentForm, useListPage, useQueryState } from '../lib/ui.js';
import { actionCells, mergeActions } from './machine.js';

const STATUSES = ['Pending', 'InProgress', 'Succeeded', 'Failed', 'TimeOut', 'Cancelled'];

/** A datetime-local value (local time) as an OData UTC literal. */
function utc(local) {
  const date = new Date(local);
  return Number.isNaN(date.getTime()) ? null : date.toISOString();
}

/** Whether `action` is one the filters select (as actionFilter asks the
 * server). */
export function actionMatches(action, { status, type, requestor, from, to }) {
  if (status && action.status !== status) return false;
  if (type && action.type !== type) return false;
  if (requestor.trim() && !String(action.requestor || '').startsWith(requestor.trim())) return false;
  const created = action.creationDateTimeUtc;
  const since = from && utc(from);
  if (since && created < since) return false;
  const until = to && utc(to);
  if (until && created > until) return false;
  return true;
}

export function actionFilter({ status, type, requestor, from, to }) {
  const parts = [];
  if (status) parts.push(`status eq ${literal(status)}`);
  if (type) parts.push(`type eq ${literal(type)}`);
  if (requestor.trim()) parts.push(`startswith(requestor,${literal(requestor.trim())})`);
  const since = from && utc(from);
  if (since) parts.push(`creationDateTimeUtc ge ${since}`);
  const until = to && utc(to);
  if (until) parts.push(`creationDateTimeUtc le ${until}`);
  return parts.join(' and ');
}

function CancelDialog({ action, onClose, onDone }) {
  const { comment, setComment, error, busy, onSubmit } = useCommentForm(async (text) => {
    const cancelled = await call(`/api/machineactions/${encodeURIComponent(action.id)}/cancel`, {
      method: 'POST',
      body: { Comment: text },
      what: 'This action',
    });
    onDone(cancelled);
  });
  return html`<${Dialog} title="Cancel this action?" onClose=${onClose}>
    <form onSubmit=${onSubmit} novalidate>
      <p>${action.type} of ${action.computerDnsName}, requested by ${action.requestor}. It has not reached the machine yet; once cancelled it never will.</p>
      <label for="cancel-comment">Comment</label>
      <textarea id="cancel-comment" rows="3" maxlength="1000" value=${comment}
        onInput=${(e) => setComment(e.currentTarget.value)}></textarea>
      <${Alert}>${error}<//>
      <div class="buttons">
        <button type="submit" class="danger" disabled=${busy}>Cancel action</button>
        <button type="button" class="quiet" onClick=${onClose}>Keep action</button>
      </div>
    </form>
  <//>`;
}

export function ActionsPage({ me }) {
  const [params, setParams] = useQueryState();
  const filters = {
    status: params.get('status') || '',
    type: params.get('type') || '',
    requestor: params.get('requestor') || '',
    from: params.get('from') || '',
    to: params.get('to') || '',
  };
  const skip = Math.max(0, Number(params.get('skip')) || 0);
  const [typed, setTyped] = useState(filters.requestor);
  const [cancelling, setCancelling] = useState(null);
  const [reload, setReload] = useState(0);
  const timer = useRef(null);
  const [result, setResult, error] = useListPage('/api/machineactions', {
    filter: actionFilter(filters),
    orderby: 'creationDateTimeUtc desc',
    skip,
    reload,
    merge: mergeActions,
  });

  useEffect(() => {
    document.title = 'Actions · Cordon';
  }, []);


  // Live changes are applied to the page as they come: a new action that
  // the filters select joins the first page, a changed one is replaced.
  // Only a new stream (or a resync) reloads, so that a burst of actions
  // never turns into a burst of requests.
  const live = useRef({ filters, skip });
  live.current = { filters, skip };
  useEffect(() => subscribe((type, data) => {
    if (type === 'resync' || type === 'connected') {
      setReload((n) => n + 1);
    } else if (type === 'machineAction.created' && data) {
      const { filters: f, skip: at } = live.current;
      if (at !== 0 || !actionMatches(data, f)) return;
      setResult((current) => {
        if (!current || current.rows.some((r) => r.id === data.id)) return current;
        return { rows: [data, ...current.rows].slice(0, PAGE_SIZE), total: current.total + 1 };
      });
    } else if (type.startsWith('machineAction.') && data) {
      setResult((current) => current && {
        ...current,
        rows: mergeActions([data], current.rows),
      });
    }
  }), []);

  const onRequestor = (event) => {
    const value = event.currentTarget.value;
    setTyped(value);
    clearTimeout(timer.current);
    timer.current = setTimeout(() => setParams({ requestor: value, skip: 0 }), 300);
  };
  const select = (name) => (event) => setParams({ [name]: event.currentTarget.value, skip: 0 });
  const canCancel = me.permissions.isolate;

  return html`<main>
    <h1>Actions</h1>
    <form class="filters" onSubmit=${(e) => e.preventDefault()}>
      <div class="field"><label for="filter-status">Status</label>
        <select id="filter-status" value=${filters.status} onChange=${select('status')}>
          <option value="">Any status</option>
          ${STATUSES.map((s) => html`<option value=${s}>${s}</option>`)}
        </select>
      </div>
      <div class="field"><label for="filter-type">Type</label>
        <select id="filter-type" value=${filters.type} onChange=${select('type')}>
          <option value="">Any type</option>
          <option value="Isolate">Isolate</option>
          <option value="Unisolate">Unisolate</option>
        </select>
      </div>
      <div class="field"><label for="filter-requested-by">Requested by</label>
        <input id="filter-requested-by" type="text" value=${typed} onInput=${onRequestor} autocomplete="off" maxlength="200" />
      </div>
      <div class="field"><label for="filter-from">From</label>
        <input id="filter-from" type="datetime-local" value=${filters.from} onChange=${select('from')} />
      </div>
      <div class="field"><label for="filter-to">To</label>
        <input id="filter-to" type="datetime-local" value=${filters.to} onChange=${select('to')} />
      </div>
    </form>
    <${Alert}>${error}<//>
    ${result && html`
      <table class="grid">
        <thead><tr>
          <th scope="col">Machine</th><th scope="col">Type</th><th scope="col">Scope</th>
          <th scope="col">Status</th><th scope="col">Requested by</th><th scope="col">Comment</th>
          <th scope="col">Created</th><th scope="col">Updated</th><th scope="col">Details</th>
          <th scope="col"><span class="visually-hidden">Row controls</span></th>
        </tr></thead>
        <tbody>
          ${result.rows.length === 0 && html`<tr><td colspan="10" class="empty">No action matches.</td></tr>`}
          ${result.rows.map((a) => html`<tr key=${a.id} data-action-id=${a.id}>
            <td><${Link} href=${`/machines/${a.machineId}`}>${a.computerDnsName || a.machineId}<//></td>
            ${actionCells(a)}
            <td>${canCancel && a.status === 'Pending'
              && html`<button type="button" class="quiet" onClick=${() => setCancelling(a)}>Cancel</button>`}</td>
          </tr>`)}
        </tbody>
      </table>
      <${Pager} what="Actions" skip=${skip} shown=${result.rows.length} total=${result.total}
        onPage=${(next) => setParams({ skip: next }, { replace: false })} />`}
    ${cancelling && html`<${CancelDialog} action=${cancelling} onClose=${() => setCancelling(null)}
      onDone=${(done) => {
        setCancelling(null);
        setResult((current) => current && { ...current, rows: current.rows.map((r) => (r.id === done.id ? done : r)) });
      }} />`}
  </main>`;
}
