// Browser tests of the console: Debian's Chromium driven by Playwright,
// against a server that crates/server/tests/console.rs starts and fills.
// Run them with `cargo test -p server --test console` (README.md, "Checks
// beyond the unit and lab tests"); that test sets the CORDON_* variables
// read in lib/env.ts.
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defineConfig } from '@playwright/test';

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(
      `${name} is not set: run the browser tests with "cargo test -p server --test console", ` +
        'which starts the server and sets it',
    );
  }
  return value;
}

const url = required('CORDON_URL');
required('CORDON_CA');
// The key of the server's certificate, checked against the test CA.
const spki =
  process.env.CORDON_SPKI_SHA256 ??
  execFileSync(process.execPath, [join(__dirname, 'lib', 'spki.mjs')], { encoding: 'utf8' });
process.env.CORDON_SPKI_SHA256 = spki;
// Playwright makes a fresh profile per browser; its temporary files (and
// Chromium's crash dumps) go under one directory of this run.
const scratch = mkdtempSync(join(tmpdir(), 'cordon-chromium-'));

export default defineConfig({
  testDir: 'specs',
  outputDir: 'test-results',
  // One server, one browser at a time: the specs change the server's state
  // (each sets up what it needs) and the machine has two cores.
  workers: 1,
  fullyParallel: false,
  retries: 0,
  forbidOnly: true,
  timeout: 45_000,
  expect: { timeout: 10_000 },
  globalTimeout: 200_000,
  reporter: [['list']],
  use: {
    baseURL: url,
    browserName: 'chromium',
    headless: true,
    viewport: { width: 1280, height: 720 },
    locale: 'en-GB',
    timezoneId: 'UTC',
    actionTimeout: 10_000,
    navigationTimeout: 15_000,
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CORDON_CHROMIUM ?? '/usr/bin/chromium',
      env: { ...process.env, TMPDIR: scratch, HOME: scratch },
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        `--ignore-certificate-errors-spki-list=${spki}`,
      ],
    },
  },
});
