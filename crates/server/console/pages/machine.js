// One machine: its facts, its actions, and isolating or releasing it.

import { useEffect, useState } from 'preact/hooks';
import { call, literal, query } from '../lib/api.js';
import { subscribe } from '../lib/live.js';
import { html, Link, Alert, Dialog, StateBadge, StatusBadge, Time, stateWords, useCommentForm } from '../lib/ui.js';

const MAX_COMMENT = 1000;

/** Puts `action` into `list` (newest first), unless the list already has
 * a later copy of it (a live event may overtake a reload). */
export function upsertAction(list, action) {
  const old = list.find((a) => a.id === action.id);
  if (old && old.lastUpdateDateTimeUtc > action.lastUpdateDateTimeUtc) return list;
  const merged = [action, ...list.filter((a) => a.id !== action.id)];
  merged.sort((a, b) => (a.creationDateTimeUtc < b.creationDateTimeUtc ? 1 : -1));
  return merged;
}

/** A reloaded page of actions, keeping the later copy of each that a live
 * event brought meanwhile. */
export function mergeActions(current, loaded) {
  const byId = new Map(current.map((a) => [a.id, a]));
  return loaded.map((a) => {
    const live = byId.get(a.id);
    return live && live.lastUpdateDateTimeUtc > a.lastUpdateDateTimeUtc ? live : a;
  });
}

/** The dialog that isolates or releases a machine. */
function RequestDialog({ verb, machine, onClose, onDone }) {
  const [type, setType] = useState('Full');
  const isolate = verb === 'Isolate';
  const { comment, setComment, error, busy, onSubmit } = useCommentForm(async (text) => {
    const body = isolate ? { Comment: text, IsolationType: type } : { Comment: text };
    const action = await call(`/api/machines/${encodeURIComponent(machine.id)}/${isolate ? 'isolate' : 'unisolate'}`, {
      method: 'POST',
      body,
      what: 'This machine',
    });
    onDone(action);
  });

  return html`<${Dialog} title=${`${verb} ${machine.computerDnsName}`} onClose=${onClose}>
    <form onSubmit=${onSubmit} novalidate>
      <p>${isolate
        ? 'The machine will be cut off the network, except for its connection to Cordon.'
        : 'The machine will get its network back.'}</p>
      <label for="request-comment">Comment</label>
      <textarea id="request-comment" rows="3" maxlength=${MAX_COMMENT} value=${comment}
        aria-invalid=${error && !comment.trim() ? 'true' : undefined}
        onInput=${(e) => setComment(e.currentTarget.value)}
        placeholder="Why, and the ticket or incident it belongs to"></textarea>
      ${isolate && html`<fieldset>
        <legend>Type</legend>
        <label class="choice"><input type="radio" name="type" value="Full" checked=${type === 'Full'}
          onChange=${() => setType('Full')} /> Full</label>
        <p class="hint">Nothing but Cordon's own connection gets through.</p>
        <label class="choice"><input type="radio" name="type" value="Selective" checked=${type === 'Selective'}
          onChange=${() => setType('Selective')} /> Selective</label>
        <p class="hint">What the isolation exclusion rules allow still gets through.</p>
      </fieldset>`}
      <${Alert}>${error}<//>
      <div class="buttons">
        <button type="submit" class=${isolate ? 'danger' : 'primary'} disabled=${busy}>${verb}</button>
        <button type="button" class="quiet" onClick=${onClose}>Close</button>
      </div>
    </form>
  <//>`;
}

function Facts({ machine }) {
  const addresses = (machine.ipAddresses || []).map((a) => a.ipAddress).filter(Boolean);
  return html`<dl class="facts">
    <div><dt>Isolation</dt><dd><span data-testid="isolation-state">${stateWords(machine.isolationState)}</span></dd></div>
    <div><dt>Scope</dt><dd><span data-testid="isolation-scope">${machine.isolationScope || '—'}</span></dd></div>
    <div><dt>Health</dt><dd>${machine.healthStatus}</dd></div>
    <div><dt>Last seen</dt><dd><${Time} iso=${machine.lastSeen} /></dd></div>
    <div><dt>OS</dt><dd>${[machine.osPlatform, machine.osVersion, machine.osArchitecture].filter(Boolean).join(' ')}</dd></div>
    <div><dt>Group</dt><dd>${machine.rbacGroupName || '—'}</dd></div>
    <div><dt>Tags</dt><dd>${(machine.machineTags || []).length ? machine.machineTags.map((t) => html`<span class="tag">${t}</span>`) : '—'}</dd></div>
    <div><dt>IP addresses</dt><dd>${addresses.length ? addresses.join(', ') : machine.lastIpAddress || '—'}</dd></div>
    <div><dt>Agent version</dt><dd>${machine.agentVersion || '—'}</dd></div>
    <div><dt>First seen</dt><dd><${Time} iso=${machine.firstSeen} /></dd></div>
    <div><dt>Machine id</dt><dd class="mono">${machine.id}</dd></div>
    ${machine.tamperCount > 0 && html`<div><dt>Tampering</dt><dd>Restored ${machine.tamperCount} times, last <${Time} iso=${machine.lastTamperDateTimeUtc} /></dd></div>`}
  </dl>`;
}

export function details(action) {
  if (action.status === 'Failed' || action.status === 'TimeOut') return action.troubleshootInfo || '';
  if (action.status === 'Cancelled') {
    return [action.cancellationComment, action.cancellationRequestor && `cancelled by ${action.cancellationRequestor}`]
      .filter(Boolean).join(' — ');
  }
  return '';
}

/** An action's cells, in the columns Type, Scope, Status, Requested by,
 * Comment, Created, Updated, Details (both action tables have them). */
export function actionCells(a) {
  return html`<td>${a.type}</td>
    <td>${a.scope || '—'}</td>
    <td><${StatusBadge} status=${a.status} /></td>
    <td>${a.requestor}</td>
    <td class="comment">${a.requestorComment}</td>
    <td><${Time} iso=${a.creationDateTimeUtc} /></td>
    <td><${Time} iso=${a.lastUpdateDateTimeUtc} /></td>
    <td class="comment">${details(a)}</td>`;
}

export function MachinePage({ me, id }) {
  const [machine, setMachine] = useState(null);
  const [actions, setActions] = useState([]);
  const [error, setError] = useState('');
  const [dialog, setDialog] = useState(null);
  const [notice, setNotice] = useState('');
  const [reload, setReload] = useState(0);

  useEffect(() => {
    const controller = new AbortController();
    const signal = controller.signal;
    Promise.all([
      call(`/api/machines/${encodeURIComponent(id)}`, { signal, what: 'This machine' }),
      call(`/api/machineactions${query({
        $filter: `machineId eq ${literal(id)}`,
        $orderby: 'creationDateTimeUtc desc',
        $top: 100,
      })}`, { signal }),
    ])
      .then(([m, list]) => {
        setMachine(m);
        setActions((current) => mergeActions(current, list.value));
        setError('');
        document.title = `${m.computerDnsName} · Cordon`;
      })
      .catch((e) => {
        if (e.name !== 'AbortError') setError(e.message);
      });
    return () => controller.abort();
  }, [id, reload]);

  useEffect(() => subscribe((type, data) => {
    if (type === 'resync' || type === 'connected') {
      setReload((n) => n + 1);
    } else if (type.startsWith('machineAction.') && data && data.machineId === id) {
      setActions((list) => upsertAction(list, data));
    } else if (type === 'machine.isolationChanged' && data && data.id === id) {
      setMachine((m) => ({ ...m, ...data }));
    }
  }), [id]);

  if (error && !machine) {
    return html`<main><h1>Machine</h1><${Alert}>${error}<//><p><${Link} href="/">Back to the machines</${Link}></p></main>`;
  }
  if (!machine) return html`<main><p class="loading">Loading…</p></main>`;

  const canIsolate = me.permissions.isolate;
  const onDone = (action) => {
    setDialog(null);
    setActions((list) => upsertAction(list, action));
    setNotice(`${action.type === 'Isolate' ? 'Isolation' : 'Release'} requested; its status below follows it live.`);
  };

  return html`<main>
    <p class="crumbs"><${Link} href="/">All machines</${Link}></p>
    <div class="title-row">
      <h1>${machine.computerDnsName}</h1>
      <${StateBadge} state=${machine.isolationState} />
      ${canIsolate && html`<div class="buttons">
        <button type="button" class="danger" onClick=${() => setDialog('Isolate')}>Isolate machine</button>
        <button type="button" class="primary" onClick=${() => setDialog('Release')}>Release from isolation</button>
      </div>`}
    </div>
    <p class="notice" role="status">${notice}</p>
    <${Alert}>${error}<//>
    <${Facts} machine=${machine} />
    <h2>Action history</h2>
    <table class="grid">
      <thead><tr>
        <th scope="col">Type</th><th scope="col">Scope</th><th scope="col">Status</th><th scope="col">Requested by</th>
        <th scope="col">Comment</th><th scope="col">Created</th><th scope="col">Updated</th><th scope="col">Details</th>
      </tr></thead>
      <tbody>
        ${actions.length === 0 && html`<tr><td colspan="8" class="empty">No action yet.</td></tr>`}
        ${actions.map((a) => html`<tr key=${a.id} data-action-id=${a.id}>
          ${actionCells(a)}
        </tr>`)}
      </tbody>
    </table>
    ${dialog && html`<${RequestDialog} verb=${dialog} machine=${machine}
      onClose=${() => setDialog(null)} onDone=${onDone} />`}
  </main>`;
}
