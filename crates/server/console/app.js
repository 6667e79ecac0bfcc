// The console's shell: sign-in, who the user is, the header and the
// page for the current path.

import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { finishSignIn, signIn, signOut, token } from './lib/auth.js';
import { call } from './lib/api.js';
import * as live from './lib/live.js';
import { html, Link, Alert, useLocation } from './lib/ui.js';
import { MachinesPage } from './pages/machines.js';
import { MachinePage } from './pages/machine.js';
import { ActionsPage } from './pages/actions.js';
import { ExclusionsPage } from './pages/exclusions.js';
import { AuditPage } from './pages/audit.js';

function LiveStatus() {
  const [status, setStatus] = useState('connecting');
  useEffect(() => live.watchStatus(setStatus), []);
  if (status === 'expired') {
    return html`<span class="live live-paused" data-testid="live-status" role="status">Session ended
      <button type="button" class="quiet small" onClick=${() => signIn()}>Sign in again</button></span>`;
  }
  const words = {
    connecting: 'Connecting…',
    live: 'Live',
    paused: 'Live updates paused, reconnecting…',
  }[status];
  return html`<span class=${`live live-${status}`} data-testid="live-status" role="status">${words}</span>`;
}

function NavLink({ href, here, children }) {
  const current = href === '/' ? here === '/' || here.startsWith('/machines') || here.startsWith('/?') : here.startsWith(href);
  return html`<${Link} href=${href} aria-current=${current ? 'page' : undefined}>${children}<//>`;
}

function Header({ me, here, onSignOut }) {
  const p = me.permissions;
  return html`<header class="top">
    <a class="brand" href="/">Cordon</a>
    <nav aria-label="Main">
      <${NavLink} href="/" here=${here}>Machines<//>
      <${NavLink} href="/actions" here=${here}>Actions<//>
      ${p.settings && html`<${NavLink} href="/exclusions" here=${here}>Exclusions<//>`}
      ${p.audit && html`<${NavLink} href="/audit" here=${here}>Audit<//>`}
    </nav>
    <${LiveStatus} />
    <span class="who">${me.upn || me.displayName}${me.role ? html` <span class="role">(${me.role})</span>` : ''}</span>
    <button type="button" class="quiet" onClick=${onSignOut}>Sign out</button>
  </header>`;
}

function Page({ me, here }) {
  const path = here.split('?')[0];
  const machine = path.match(/^\/machines\/([^/]+)$/);
  if (path === '/') return html`<${MachinesPage} me=${me} />`;
  if (machine) return html`<${MachinePage} me=${me} id=${decodeURIComponent(machine[1])} key=${machine[1]} />`;
  if (path === '/actions') return html`<${ActionsPage} me=${me} />`;
  if (path === '/exclusions') return html`<${ExclusionsPage} me=${me} />`;
  if (path === '/audit') return html`<${AuditPage} me=${me} />`;
  return html`<main><h1>Page not found</h1><p>There is no page at this address. <${Link} href="/">Go to the machines</${Link}>.</p></main>`;
}

function SignedOut() {
  useEffect(() => {
    document.title = 'Signed out · Cordon';
  }, []);
  return html`<main class="narrow">
    <h1>Signed out</h1>
    <p>You have signed out of the Cordon console in this tab.</p>
    <button type="button" onClick=${() => signIn('/')}>Sign in again</button>
  </main>`;
}

function App({ initialError }) {
  const here = useLocation();
  const [me, setMe] = useState(null);
  const [error, setError] = useState(initialError);
  const [signedOut, setSignedOut] = useState(false);

  useEffect(() => {
    if (initialError) return;
    call('/api/me')
      .then((who) => {
        setMe(who);
        live.start();
      })
      .catch((e) => setError(e.message));
  }, []);

  if (signedOut) return html`<${SignedOut} />`;
  if (error) {
    return html`<main class="narrow">
      <h1>Cordon</h1>
      <${Alert}>${error}<//>
      <button type="button" onClick=${() => signIn('/')}>Sign in again</button>
    </main>`;
  }
  if (!me) return html`<p class="loading">Loading Cordon…</p>`;
  const onSignOut = () => {
    signOut();
    history.replaceState(null, '', '/');
    setSignedOut(true);
  };
  return html`<${Header} me=${me} here=${here} onSignOut=${onSignOut} />
    <${Page} me=${me} here=${here} />`;
}

async function main() {
  const root = document.getElementById('app');
  const error = await finishSignIn();
  if (!error && !token()) {
    await signIn();
    return;
  }
  root.textContent = '';
  render(html`<${App} initialError=${error} />`, root);
}

main();
