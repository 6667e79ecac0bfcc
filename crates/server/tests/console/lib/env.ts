// What crates/server/tests/console.rs tells the specs, from the environment.

export interface User {
  upn: string;
  password: string;
}

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(
      `${name} is not set: run the browser tests with "cargo test -p server --test console"`,
    );
  }
  return value;
}

function user(role: string): User {
  return {
    upn: required(`CORDON_${role}_UPN`),
    password: required(`CORDON_${role}_PASSWORD`),
  };
}

/** The server's base URL, such as https://localhost:40123. */
export const serverUrl = required('CORDON_URL').replace(/\/$/, '');
/** The built-in authority's tenant id. */
export const tenant = required('CORDON_TENANT');

/** An Administrator. */
export const admin = user('ADMIN');
/** A Responder (may isolate, release and cancel) reaching every machine group. */
export const analyst = user('ANALYST');
/** A Viewer whose user group reaches the "Web" machine group only (and the default group). */
export const viewer = user('VIEWER');

/**
 * Machine ids by name: web-01, web-02 (group "Web"), fin-01 (group
 * "Finance"), db-01 and fail-01 (default group). See console.rs for what
 * each test agent does.
 */
export const machines: Record<string, string> = JSON.parse(required('CORDON_MACHINES'));

export function machineId(name: string): string {
  const id = machines[name];
  if (!id) throw new Error(`no machine ${name} in CORDON_MACHINES`);
  return id;
}

/** A token of an app with Machine.Isolate and Machine.ReadWrite.All, to act behind the UI's back. */
export const appToken = required('CORDON_APP_TOKEN');

/** Where the screenshot spec saves its PNGs; unset: no screenshots. */
export const screenshotDir = process.env.CORDON_SCREENSHOTS || undefined;
