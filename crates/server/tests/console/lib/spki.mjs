// Prints the base64 SHA-256 of the public key (SubjectPublicKeyInfo) of the
// certificate the Cordon server at CORDON_URL presents, after verifying it
// against the test server's own CA (CORDON_CA). Chromium is then told to
// accept that one key (--ignore-certificate-errors-spki-list) instead of
// ignoring every certificate error.
import { readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { connect } from 'node:tls';

const url = new URL(process.env.CORDON_URL);
const socket = connect({
  host: url.hostname,
  port: Number(url.port || 443),
  servername: url.hostname,
  ca: readFileSync(process.env.CORDON_CA),
  ALPNProtocols: ['http/1.1'],
});
socket.setTimeout(10_000, () => {
  console.error(`no TLS handshake with ${url.host} within 10 s`);
  process.exit(1);
});
socket.on('error', (e) => {
  console.error(`TLS connection to ${url.host} failed: ${e.message}`);
  process.exit(1);
});
socket.on('secureConnect', () => {
  const spki = socket.getPeerX509Certificate().publicKey.export({ type: 'spki', format: 'der' });
  process.stdout.write(createHash('sha256').update(spki).digest('base64'));
  socket.end();
});
