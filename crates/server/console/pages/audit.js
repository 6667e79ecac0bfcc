// The audit trail (administrators): every change and refusal, newest
// first, new records arriving live.

import { useEffect, useRef, useState } from 'preact/hooks';
import { literal } from '../lib/api.js';
import { subscribe } from '../lib/live.js';
import { html, Alert, Pager, Time, PAGE_SIZE, useListPage, useQueryState } from '../lib/ui.js';

const OUTCOMES = ['Succeeded', 'Refused', 'Failed'];

export function AuditPage({ me }) {
  const [params, setParams] = useQueryState();
  const outcome = params.get('outcome') || '';
  const action = params.get('action') || '';
  const skip = Math.max(0, Number(params.get('skip')) || 0);
  const [typed, setTyped] = useState(action);
  const [reload, setReload] = useState(0);
  const timer = useRef(null);

  useEffect(() => {
    document.title = 'Audit trail · Cordon';
  }, []);

  const filter = [
    outcome && `outcome eq ${literal(outcome)}`,
    action.trim() && `startswith(action,${literal(action.trim())})`,
  ].filter(Boolean).join(' and ');
  const [result, setResult, error] = useListPage('/api/auditEvents', {
    filter,
    orderby: 'dateTimeUtc desc',
    skip,
    reload,
    enabled: me.permissions.audit,
  });


  // A new record joins the first page as it comes (no request); only a new
  // stream (or a resync) reloads, so that a flood of records never turns
  // into a flood of requests.
  const live = useRef({ outcome, action, skip });
  live.current = { outcome, action, skip };
  useEffect(() => subscribe((type, data) => {
    if (type === 'resync' || type === 'connected') {
      setReload((n) => n + 1);
    } else if (type === 'audit.appended' && data) {
      const f = live.current;
      if (f.skip !== 0) return;
      if (f.outcome && data.outcome !== f.outcome) return;
      if (f.action.trim() && !String(data.action || '').startsWith(f.action.trim())) return;
      setResult((current) => {
        if (!current || current.rows.some((r) => r.id === data.id)) return current;
        return { rows: [data, ...current.rows].slice(0, PAGE_SIZE), total: current.total + 1 };
      });
    }
  }), []);

  if (!me.permissions.audit) {
    return html`<main><h1>Audit trail</h1>
      <${Alert}>Your role does not allow this. Ask an administrator for the permission.<//></main>`;
  }
  const onAction = (event) => {
    const value = event.currentTarget.value;
    setTyped(value);
    clearTimeout(timer.current);
    timer.current = setTimeout(() => setParams({ action: value, skip: 0 }), 300);
  };

  return html`<main>
    <h1>Audit trail</h1>
    <form class="filters" onSubmit=${(e) => e.preventDefault()}>
      <div class="field"><label for="filter-outcome">Outcome</label>
        <select id="filter-outcome" value=${outcome} onChange=${(e) => setParams({ outcome: e.currentTarget.value, skip: 0 })}>
          <option value="">Any outcome</option>
          ${OUTCOMES.map((o) => html`<option value=${o}>${o}</option>`)}
        </select>
      </div>
      <div class="field"><label for="filter-action">Action</label>
        <input id="filter-action" type="text" value=${typed} onInput=${onAction} autocomplete="off" maxlength="100" placeholder="isolate, signin, exclusion…" />
      </div>
    </form>
    <${Alert}>${error}<//>
    ${result && html`<table class="grid">
      <thead><tr>
        <th scope="col">Time</th><th scope="col">Who</th><th scope="col">Action</th>
        <th scope="col">Target</th><th scope="col">Outcome</th><th scope="col">Details</th>
      </tr></thead>
      <tbody>
        ${result.rows.length === 0 && html`<tr><td colspan="6" class="empty">No record matches.</td></tr>`}
        ${result.rows.map((e) => html`<tr key=${e.id}>
          <td><${Time} iso=${e.dateTimeUtc} /></td>
          <td>${e.principal}<div class="sub">${e.sourceAddress}</div></td>
          <td>${e.action}${e.count > 1 ? ` (×${e.count})` : ''}</td>
          <td class="mono">${e.method} ${e.target}</td>
          <td><span class=${`outcome outcome-${e.outcome}`}>${e.outcome}</span></td>
          <td class="comment">${e.detail || ''}</td>
        </tr>`)}
      </tbody>
    </table>
    <${Pager} what="Records" skip=${skip} shown=${result.rows.length} total=${result.total}
      onPage=${(next) => setParams({ skip: next }, { replace: false })} />`}
  </main>`;
}
