#!/usr/bin/env python3
"""Isolate every machine with a tag, then wait until each isolation is final.

The worked example of docs/soar.md. Standard library only, Python 3.9+.

    CORDON_CLIENT_SECRET=... python3 soar_playbook.py --server https://cordon.example.com:8443 \\
        --tenant TENANT --client-id CLIENT --ca ca.pem --tag wave-1 --comment "Ransomware wave 1"

--wait events (the default) follows GET /api/events; --wait webhook runs an HTTPS
receiver for a webhook an administrator created (`cordon webhook create`), with
CORDON_WEBHOOK_SECRET set to that webhook's secret.

Exit status: 0 if every action Succeeded, 1 otherwise (a machine refused, an
action Failed, TimeOut, Cancelled or still open, or no machine has the tag),
2 on a usage, connection or HTTP error.
"""
import argparse
import base64
import hashlib
import hmac
import http.client
import http.server
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from typing import Dict, Optional, Set

FINAL = {"Succeeded", "Failed", "TimeOut", "Cancelled"}
SCOPE = "https://api.securitycenter.microsoft.com/.default"
TOLERANCE = 5 * 60  # seconds a webhook-timestamp may be off


class Failure(Exception):
    """Stops the playbook with exit status 2 and a one-line message."""


class Cordon:
    """A small client of the Cordon API: a token, JSON calls, the event stream."""

    def __init__(self, server: str, tenant: str, client_id: str, secret: str, ca: Optional[str]):
        self.server = server.rstrip("/")
        self.tenant, self.client_id, self.secret = tenant, client_id, secret
        self.tls = ssl.create_default_context(cafile=ca)
        self.token = ""

    def _open(self, method, path, body=None, headers=None, timeout=30.0):
        request = urllib.request.Request(self.server + path, data=body, method=method,
                                         headers=headers or {})
        try:
            return urllib.request.urlopen(request, context=self.tls, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise Failure(f"{method} {path}: {describe_http_error(e)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise Failure(f"{method} {path}: cannot reach {self.server}: {reason}") from None

    def get_token(self) -> None:
        """Client credentials at the built-in authority (README, "Five minutes with curl")."""
        form = urllib.parse.urlencode({
            "grant_type": "client_credentials", "client_id": self.client_id,
            "client_secret": self.secret, "scope": SCOPE}).encode()
        with self._open("POST", f"/{self.tenant}/oauth2/v2.0/token", form,
                        {"Content-Type": "application/x-www-form-urlencoded"}) as reply:
            self.token = json.load(reply)["access_token"]

    def call(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        with self._open(method, path, data, headers) as reply:
            return json.load(reply)

    def open_events(self, last_event_id: Optional[str], timeout: float):
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        return self._open("GET", "/api/events", headers=headers, timeout=timeout)


def describe_http_error(e: urllib.error.HTTPError) -> str:
    """`403 Forbidden: <message> (request-id ...)` from the API's or the authority's error body."""
    text = e.read().decode("utf-8", "replace")
    try:
        error = json.loads(text)["error"]
        if isinstance(error, dict):  # the API: {"error": {"code", "message", "target"}}
            return f"{e.code} {error.get('code')}: {error.get('message')} (request-id {error.get('target')})"
        return f"{e.code} {error}: {json.loads(text).get('error_description', '')}"  # OAuth
    except (ValueError, KeyError, TypeError):
        return f"{e.code} {e.reason}: {text[:200]}".rstrip(": ")


# ---- server-sent events -----------------------------------------------------------------


class Event:
    def __init__(self, id: Optional[str], type: Optional[str], data: Optional[str]):
        self.id, self.type, self.data = id, type, data


class SSEParser:
    """Feed it the stream's lines; it returns an Event at each blank line that ends one.

    An id-only block (the stream's first message, or its position after a replay) comes
    back as an Event with type and data None; comments (`: keep-alive`) give nothing.
    """

    def __init__(self):
        self.id = self.type = self.data = None

    def feed(self, line: str) -> Optional[Event]:
        line = line.rstrip("\r\n")
        if line == "":
            if self.id is None and self.type is None and self.data is None:
                return None
            event = Event(self.id, self.type, self.data)
            self.id = self.type = self.data = None
            return event
        if line.startswith(":"):
            return None  # a comment: keep-alive
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "id":
            self.id = value
        elif field == "event":
            self.type = value
        elif field == "data":
            self.data = value if self.data is None else self.data + "\n" + value
        return None  # "retry" and unknown fields are ignored


# ---- webhook signatures (Standard Webhooks) ---------------------------------------------


def webhook_key(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len("whsec_"):], validate=True)


def sign(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(key: bytes, headers, body: bytes, now: Optional[float] = None) -> bool:
    """True if one of the webhook-signature's v1 signatures matches and the time is close."""
    msg_id, timestamp = headers.get("webhook-id"), headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not (msg_id and timestamp and signatures):
        return False
    try:
        if abs((time.time() if now is None else now) - int(timestamp)) > TOLERANCE:
            return False  # too old or in the future: a replay, or a wrong clock
    except ValueError:
        return False
    expected = sign(key, msg_id, timestamp, body).encode()
    # Standard Webhooks allows several space-separated signatures (a secret being rotated).
    return any(hmac.compare_digest(expected, given.encode()) for given in signatures.split())


class Receiver(http.server.ThreadingHTTPServer):
    """HTTPS receiver: keeps each verified machineAction.completed, once per webhook-id."""

    def __init__(self, address, key: bytes, cert: str, cert_key: str):
        super().__init__(address, WebhookHandler)
        self.key = key
        self.lock = threading.Condition()
        self.seen: Set[str] = set()  # webhook-ids already handled
        self.completed: Dict[str, dict] = {}  # action id -> final MachineAction
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, cert_key)
        self.slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)

    # At most this many connections at once (one thread each); more are closed.
    MAX_CONNECTIONS = 32

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            request.close()  # Cordon retries what was not answered
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request, client_address):
        # Runs in the connection's own thread: a slow or failed TLS handshake holds
        # up no one else. Webhooks come over HTTPS only.
        request.settimeout(10)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            request.close()
            return
        try:
            super().finish_request(request, client_address)
        finally:
            request.close()


class WebhookHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        try:
            length = int(self.headers.get("content-length", ""))
        except ValueError:
            return self.answer(411)  # no length, or not a number: refused, nothing read
        if not 0 <= length <= 1 << 20:
            return self.answer(413)  # negative (read(-1) would read to the end) or too large
        body = self.rfile.read(length)
        server: Receiver = self.server
        if not verify(server.key, self.headers, body):
            return self.answer(401)
        msg_id = self.headers["webhook-id"]
        with server.lock:
            if msg_id in server.seen:
                return self.answer(204)  # a retry of what we already have: at-least-once
            try:
                event = json.loads(body)
            except ValueError:
                return self.answer(400)
            server.seen.add(msg_id)
            if event.get("type") == "machineAction.completed":
                server.completed[event["data"]["id"]] = event["data"]
                server.lock.notify_all()
        self.answer(204)  # answer at once: slow answers are retried

    def answer(self, status: int):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass  # one line per delivery would drown the playbook's output


# ---- the playbook -----------------------------------------------------------------------


def bulk_isolate(cordon: Cordon, args):
    """One call for every machine with the tag; prints one line per machine.

    Returns the created actions by id, and how many machines were refused.
    """
    tag = args.tag.replace("'", "''")  # OData string literal
    reply = cordon.call("POST", "/api/machines/isolate", {
        "Comment": args.comment, "IsolationType": args.isolation_type,
        "Filter": f"machineTags/any(t: t eq '{tag}')"})
    created = {}
    for entry in reply["value"]:
        if entry["status"] == 201:
            action = entry["machineAction"]
            created[action["id"]] = action
            print(f"{entry['machineId']} {action['computerDnsName']}: action {action['id']} created")
        else:
            error = entry["error"]
            active = f" (action {error['activeActionId']})" if "activeActionId" in error else ""
            print(f"{entry['machineId']}: refused, {entry['status']} {error['code']}: "
                  f"{error['message']}{active}")
    if created:
        print(f"waiting up to {args.timeout:g} s for {len(created)} actions ({args.wait})",
              file=sys.stderr)
    return created, len(reply["value"]) - len(created)


def poll(cordon: Cordon, open_ids, final: Dict[str, dict]) -> Dict[str, dict]:
    """GET each action once; adds the final ones to `final`, returns them all."""
    latest = {}
    for action_id in sorted(open_ids):
        latest[action_id] = cordon.call("GET", f"/api/machineactions/{action_id}")
        if latest[action_id]["status"] in FINAL:
            final[action_id] = latest[action_id]
    return latest


def wait_events(cordon: Cordon, args, deadline: float):
    # Why the position: open the stream *before* the bulk call and read its first message,
    # an `id:` line alone that is the event log's position. Every event about the actions
    # the call creates is written after it, so each reaches us on this stream, or on a new
    # one opened with Last-Event-ID if this one drops, even an action that completes
    # before the bulk call has answered. Opening the stream after the call would miss
    # such a fast completion; polling would cost one call per action per round.
    stream = cordon.open_events(None, timeout=45)  # keep-alives come every 15 s or sooner
    parser, position = SSEParser(), None
    while position is None:
        line = stream.readline().decode()
        if not line:
            raise Failure("GET /api/events ended before its first message")
        event = parser.feed(line)
        position = event.id if event else None

    created, refused = bulk_isolate(cordon, args)
    final: Dict[str, dict] = {}
    while set(created) - set(final) and time.time() < deadline:
        if stream is None:
            # The stream ends by itself before its connection's lifetime (10 minutes by
            # default) or the token's expiry, or drops: resume after the last id seen,
            # with a fresh token. Nothing in between is lost (up to --event-retention).
            time.sleep(1)
            try:
                cordon.get_token()
                stream, parser = cordon.open_events(position, timeout=45), SSEParser()
            except Failure as e:
                print(f"cannot resume the event stream, retrying: {e}", file=sys.stderr)
                time.sleep(4)
                continue
        try:
            for raw in stream:  # the socket kept what came during the bulk call
                event = parser.feed(raw.decode("utf-8"))
                if event is not None:
                    position = event.id or position
                    if event.type == "resync":  # events were lost to us: ask for each
                        poll(cordon, set(created) - set(final), final)
                    elif event.type == "machineAction.completed":
                        action = json.loads(event.data)["data"]
                        if action["id"] in created:
                            final[action["id"]] = action
                if not set(created) - set(final) or time.time() >= deadline:
                    break  # checked at every line, keep-alives included
        except (OSError, http.client.HTTPException) as e:
            print(f"event stream interrupted ({e}); resuming after event {position}", file=sys.stderr)
        stream.close()
        stream = None
    if stream is not None:
        stream.close()
    return created, refused, final


def wait_webhook(cordon: Cordon, args, deadline: float):
    host, _, port = args.listen.rpartition(":")
    try:
        key = webhook_key(os.environ.get("CORDON_WEBHOOK_SECRET", ""))
        receiver = Receiver((host.strip("[]"), int(port)), key, args.cert, args.key)
    except (ValueError, OSError, ssl.SSLError) as e:
        raise Failure(f"cannot start the webhook receiver on {args.listen}: {e}") from None
    # The receiver runs before the bulk call: a completion delivered before the call has
    # answered is kept (Receiver.completed holds every completion) and matched after.
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    print(f"receiving webhooks on https://{args.listen}/", file=sys.stderr)
    created, refused = bulk_isolate(cordon, args)
    with receiver.lock:
        receiver.lock.wait_for(lambda: set(created) <= set(receiver.completed),
                               timeout=max(0.0, deadline - time.time()))
        final = {i: a for i, a in receiver.completed.items() if i in created}
    receiver.shutdown()
    return created, refused, final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="https://host:port")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--ca", help="PEM file of the server's CA (default: the system's roots)")
    parser.add_argument("--tag", required=True, help="isolate every machine with this tag")
    parser.add_argument("--comment", required=True)
    parser.add_argument("--isolation-type", choices=["Full", "Selective"], default="Full")
    parser.add_argument("--wait", choices=["events", "webhook"], default="events")
    parser.add_argument("--timeout", type=float, default=600, help="seconds (default 600)")
    parser.add_argument("--listen", help="webhook mode: HOST:PORT of the HTTPS receiver")
    parser.add_argument("--cert", help="webhook mode: the receiver's TLS certificate (PEM)")
    parser.add_argument("--key", help="webhook mode: the receiver's TLS key (PEM)")
    args = parser.parse_args()
    secret = os.environ.get("CORDON_CLIENT_SECRET")
    if not secret:
        parser.error("set CORDON_CLIENT_SECRET to the application's client secret")
    if args.wait == "webhook" and not (args.listen and args.cert and args.key):
        parser.error("--wait webhook needs --listen, --cert and --key")
    if args.wait == "webhook" and not os.environ.get("CORDON_WEBHOOK_SECRET"):
        parser.error("--wait webhook needs CORDON_WEBHOOK_SECRET (whsec_...)")

    try:
        cordon = Cordon(args.server, args.tenant, args.client_id, secret, args.ca)
        cordon.get_token()
        deadline = time.time() + args.timeout
        wait = wait_webhook if args.wait == "webhook" else wait_events
        created, refused, final = wait(cordon, args, deadline)
        if not created:
            print(f"No action was created: no machine has the tag {args.tag!r}, or each was refused.")
            return 1
        latest = {}
        if set(created) - set(final):  # past the timeout: ask once for what is still open
            cordon.get_token()
            latest = poll(cordon, set(created) - set(final), final)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ssl.SSLError as e:
        print(f"error: TLS: {e}", file=sys.stderr)
        return 2

    statuses = Counter()
    for action_id, action in sorted(created.items(), key=lambda kv: kv[1]["computerDnsName"]):
        status = final.get(action_id, {}).get("status") or \
            "still " + latest.get(action_id, action)["status"]
        statuses[status] += 1
        why = final.get(action_id, {}).get("troubleshootInfo")
        print(f"{action['machineId']} {action['computerDnsName']}: action {action_id} {status}"
              + (f" ({why})" if why else ""))
    counts = [f"{n} {status}" for status, n in sorted(statuses.items())]
    print("Summary: " + ", ".join(counts + ([f"{refused} refused"] if refused else [])))
    return 0 if statuses == Counter({"Succeeded": len(created)}) and not refused else 1


if __name__ == "__main__":
    sys.exit(main())
