// Machines: search by name or address, filter by isolation state and
// group, page through the fleet on the server.

import { useEffect, useRef, useState } from 'preact/hooks';
import { literal } from '../lib/api.js';
import { subscribe } from '../lib/live.js';
import { html, Link, Alert, Pager, StateBadge, Time, useListPage, useQueryState } from '../lib/ui.js';

const STATES = [
  ['', 'Any state'],
  ['Isolated', 'Isolated'],
  ['NotIsolated', 'Not isolated'],
  ['Isolating', 'Isolating'],
  ['Releasing', 'Releasing'],
];

/** The $filter for what the user asked: a name prefix (as typed and in
 * lower case, since host names are case-insensitive) or an address prefix. */
export function machineFilter(search, state, group) {
  const parts = [];
  const text = search.trim();
  if (text) {
    const names = [...new Set([text, text.toLowerCase()])]
      .map((t) => `startswith(computerDnsName,${literal(t)})`);
    parts.push(`(${[...names, `startswith(lastIpAddress,${literal(text)})`].join(' or ')})`);
  }
  if (state) parts.push(`isolationState eq ${literal(state)}`);
  if (group) parts.push(`rbacGroupId eq ${Number(group)}`);
  return parts.join(' and ');
}

export function MachinesPage({ me }) {
  const [params, setParams] = useQueryState();
  const search = params.get('search') || '';
  const state = params.get('state') || '';
  const group = params.get('group') || '';
  const skip = Math.max(0, Number(params.get('skip')) || 0);
  const [typed, setTyped] = useState(search);
  const [reload, setReload] = useState(0);
  const [result, setResult, error] = useListPage('/api/machines', {
    filter: machineFilter(search, state, group),
    orderby: 'computerDnsName',
    skip,
    reload,
  });
  const timer = useRef(null);

  useEffect(() => {
    document.title = 'Machines · Cordon';
  }, []);

  useEffect(() => subscribe((type, data) => {
    if (type === 'resync' || type === 'connected') {
      setReload((n) => n + 1);
    } else if (type === 'machine.isolationChanged' && data) {
      setResult((current) => current && {
        ...current,
        rows: current.rows.map((row) => (row.id === data.id ? { ...row, ...data } : row)),
      });
    }
  }), []);

  const onSearch = (event) => {
    const value = event.currentTarget.value;
    setTyped(value);
    clearTimeout(timer.current);
    timer.current = setTimeout(() => setParams({ search: value, skip: 0 }), 250);
  };
  const onSubmit = (event) => {
    event.preventDefault();
    clearTimeout(timer.current);
    setParams({ search: typed, skip: 0 });
  };
  const groups = me.visibleMachineGroups || [];

  return html`<main>
    <h1>Machines</h1>
    <form class="filters" role="search" onSubmit=${onSubmit}>
      <div class="field"><label for="filter-search">Search</label>
        <input id="filter-search" type="search" value=${typed} onInput=${onSearch}
          placeholder="Name or IP address" autocomplete="off" spellcheck="false" maxlength="200" />
      </div>
      <div class="field"><label for="filter-isolation-state">Isolation state</label>
        <select id="filter-isolation-state" value=${state} onChange=${(e) => setParams({ state: e.currentTarget.value, skip: 0 })}>
          ${STATES.map(([value, label]) => html`<option value=${value}>${label}</option>`)}
        </select>
      </div>
      <div class="field"><label for="filter-group">Group</label>
        <select id="filter-group" value=${group} onChange=${(e) => setParams({ group: e.currentTarget.value, skip: 0 })}>
          <option value="">All groups</option>
          ${groups.map((g) => html`<option value=${String(g.id)}>${g.name}</option>`)}
        </select>
      </div>
    </form>
    <${Alert}>${error}<//>
    ${result && html`
      <table class="grid">
        <thead><tr>
          <th scope="col">Name</th><th scope="col">OS</th><th scope="col">Health</th>
          <th scope="col">Last seen</th><th scope="col">Group</th><th scope="col">Tags</th>
          <th scope="col">Isolation</th><th scope="col">Scope</th>
        </tr></thead>
        <tbody>
          ${result.rows.length === 0 && html`<tr><td colspan="8" class="empty">No machine matches.</td></tr>`}
          ${result.rows.map((m) => html`<tr key=${m.id}>
            <td><${Link} href=${`/machines/${m.id}`}>${m.computerDnsName}<//>
              <div class="sub">${m.lastIpAddress || ''}</div></td>
            <td>${[m.osPlatform, m.osVersion].filter(Boolean).join(' ')}</td>
            <td><span class=${`health health-${m.healthStatus}`}>${m.healthStatus}</span></td>
            <td><${Time} iso=${m.lastSeen} relative /></td>
            <td>${m.rbacGroupName || '—'}</td>
            <td>${(m.machineTags || []).map((t) => html`<span class="tag">${t}</span>`)}</td>
            <td><${StateBadge} state=${m.isolationState} /></td>
            <td>${m.isolationScope || '—'}</td>
          </tr>`)}
        </tbody>
      </table>
      <${Pager} what="Machines" skip=${skip} shown=${result.rows.length} total=${result.total}
        onPage=${(next) => setParams({ skip: next }, { replace: false })} />`}
  </main>`;
}
