// Isolation exclusion rules (administrators): what a Selectively isolated
// machine may still do. List, add, edit, remove.

import { useEffect, useState } from 'preact/hooks';
import { call } from '../lib/api.js';
import { subscribe } from '../lib/live.js';
import { html, Alert, Dialog, Time } from '../lib/ui.js';

const DIRECTIONS = ['Both', 'Outbound', 'Inbound'];

function list(text) {
  return text.split(/[\s,]+/).map((t) => t.trim()).filter(Boolean);
}

function appliesTo(rule) {
  const parts = [];
  if (rule.executablePath) parts.push(rule.executablePath);
  if (rule.systemdUnit) parts.push(rule.systemdUnit);
  return parts.length ? parts.join(', ') : 'Any process';
}

function RuleDialog({ rule, onClose, onSaved }) {
  const editing = Boolean(rule);
  const [fields, setFields] = useState({
    Name: rule?.name || '',
    Description: rule?.description || '',
    ExecutablePath: rule?.executablePath || '',
    SystemdUnit: rule?.systemdUnit || '',
    Direction: rule?.direction || 'Both',
    RemoteAddresses: (rule?.remoteAddresses || []).join(', '),
    RemotePorts: (rule?.remotePorts || []).join(', '),
  });
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const set = (name) => (event) => setFields({ ...fields, [name]: event.currentTarget.value });

  const onSubmit = async (event) => {
    event.preventDefault();
    if (!fields.Name.trim()) {
      setError('Give the rule a name.');
      return;
    }
    const body = {
      Name: fields.Name.trim(),
      Description: fields.Description.trim() || null,
      ExecutablePath: fields.ExecutablePath.trim() || null,
      SystemdUnit: fields.SystemdUnit.trim() || null,
      Direction: fields.Direction,
      RemoteAddresses: list(fields.RemoteAddresses),
      RemotePorts: list(fields.RemotePorts),
    };
    setBusy(true);
    try {
      const saved = await call(
        editing ? `/api/isolationExclusionRules/${encodeURIComponent(rule.id)}` : '/api/isolationExclusionRules',
        { method: editing ? 'PATCH' : 'POST', body, what: 'This rule' },
      );
      onSaved(saved);
    } catch (e) {
      setError(e.message);
      setBusy(false);
    }
  };

  const field = (name, label, hint, id) => html`<label for=${id}>${label}</label>
    <input id=${id} type="text" value=${fields[name]} onInput=${set(name)} autocomplete="off" />
    ${hint && html`<p class="hint">${hint}</p>`}`;

  return html`<${Dialog} title=${editing ? 'Edit exclusion rule' : 'Add exclusion rule'} onClose=${onClose}>
    <form onSubmit=${onSubmit} novalidate class="rule-form">
      ${field('Name', 'Name', '', 'rule-name')}
      ${field('Description', 'Description', '', 'rule-description')}
      ${field('ExecutablePath', 'Executable path', 'An absolute path, such as /usr/sbin/sshd.', 'rule-exe')}
      ${field('SystemdUnit', 'Systemd unit', 'Such as sshd.service.', 'rule-unit')}
      <label for="rule-direction">Direction</label>
      <select id="rule-direction" value=${fields.Direction} onChange=${set('Direction')}>
        ${DIRECTIONS.map((d) => html`<option value=${d}>${d}</option>`)}
      </select>
      ${field('RemoteAddresses', 'Remote addresses', 'Addresses or CIDR prefixes, separated by commas.', 'rule-addresses')}
      ${field('RemotePorts', 'Remote ports', 'Ports or ranges such as 22, 8000-8100.', 'rule-ports')}
      <${Alert}>${error}<//>
      <div class="buttons">
        <button type="submit" class="primary" disabled=${busy}>Save</button>
        <button type="button" class="quiet" onClick=${onClose}>Close</button>
      </div>
    </form>
  <//>`;
}

function RemoveDialog({ rule, onClose, onRemoved }) {
  const [error, setError] = useState('');
  const [busy, setBusy] = useState(false);
  const remove = async () => {
    setBusy(true);
    try {
      await call(`/api/isolationExclusionRules/${encodeURIComponent(rule.id)}`, { method: 'DELETE', what: 'This rule' });
      onRemoved(rule);
    } catch (e) {
      setError(e.message);
      setBusy(false);
    }
  };
  return html`<${Dialog} title=${`Remove ${rule.name}?`} onClose=${onClose}>
    <p>Machines isolated Selectively lose what this rule lets through as soon as they hear of the change.</p>
    <${Alert}>${error}<//>
    <div class="buttons">
      <button type="button" class="danger" onClick=${remove} disabled=${busy}>Remove rule</button>
      <button type="button" class="quiet" onClick=${onClose}>Close</button>
    </div>
  <//>`;
}

export function ExclusionsPage({ me }) {
  const [rules, setRules] = useState(null);
  const [error, setError] = useState('');
  const [dialog, setDialog] = useState(null);
  const [reload, setReload] = useState(0);

  useEffect(() => {
    document.title = 'Isolation exclusions · Cordon';
  }, []);

  useEffect(() => {
    if (!me.permissions.settings) return undefined;
    const controller = new AbortController();
    call('/api/isolationExclusionRules', { signal: controller.signal })
      .then((body) => {
        setRules(body.value);
        setError('');
      })
      .catch((e) => {
        if (e.name !== 'AbortError') setError(e.message);
      });
    return () => controller.abort();
  }, [reload]);

  useEffect(() => subscribe((type) => {
    if (type === 'exclusionRule.changed' || type === 'resync' || type === 'connected') setReload((n) => n + 1);
  }), []);

  if (!me.permissions.settings) {
    return html`<main><h1>Isolation exclusions</h1>
      <${Alert}>Your role does not allow this. Ask an administrator for the permission.<//></main>`;
  }
  const done = () => {
    setDialog(null);
    setReload((n) => n + 1);
  };

  return html`<main>
    <div class="title-row">
      <h1>Isolation exclusions</h1>
      <div class="buttons"><button type="button" class="primary" onClick=${() => setDialog({ kind: 'add' })}>Add rule</button></div>
    </div>
    <p class="lead">What a machine isolated with the Selective type may still do. A connection any rule matches is let through.</p>
    <${Alert}>${error}<//>
    ${rules && html`<table class="grid">
      <thead><tr>
        <th scope="col">Name</th><th scope="col">Applies to</th><th scope="col">Direction</th>
        <th scope="col">Remote addresses</th><th scope="col">Remote ports</th><th scope="col">Description</th>
        <th scope="col">Changed</th><th scope="col"><span class="visually-hidden">Row controls</span></th>
      </tr></thead>
      <tbody>
        ${rules.length === 0 && html`<tr><td colspan="8" class="empty">No rule: Selective isolation lets nothing else through.</td></tr>`}
        ${rules.map((r) => html`<tr key=${r.id} data-rule-id=${r.id}>
          <td>${r.name}</td>
          <td class="mono">${appliesTo(r)}</td>
          <td>${r.direction}</td>
          <td class="mono">${r.remoteAddresses.length ? r.remoteAddresses.join(', ') : 'Any'}</td>
          <td class="mono">${r.remotePorts.length ? r.remotePorts.join(', ') : 'Any'}</td>
          <td class="comment">${r.description || ''}</td>
          <td><${Time} iso=${r.lastUpdateDateTimeUtc} /></td>
          <td class="row-buttons">
            <button type="button" class="quiet" aria-label=${`Edit ${r.name}`} onClick=${() => setDialog({ kind: 'edit', rule: r })}>Edit</button>
            <button type="button" class="quiet" aria-label=${`Remove ${r.name}`} onClick=${() => setDialog({ kind: 'remove', rule: r })}>Remove</button>
          </td>
        </tr>`)}
      </tbody>
    </table>`}
    ${dialog && dialog.kind !== 'remove' && html`<${RuleDialog} rule=${dialog.rule} onClose=${() => setDialog(null)} onSaved=${done} />`}
    ${dialog && dialog.kind === 'remove' && html`<${RemoveDialog} rule=${dialog.rule} onClose=${() => setDialog(null)} onRemoved=${done} />`}
  </main>`;
}
