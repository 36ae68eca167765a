"""A loopback stand-in for the Kubernetes TokenReview API, for OpenBao's kubernetes auth method.

The auth method reads a service account JWT's claims without checking its signature (no
``pem_keys`` configured), then asks ``kubernetes_host`` whether the token is authentic with a
TokenReview and checks that the answer names the same service account (name, namespace, uid).
The stand-in answers "authenticated" only for the tokens it was told to accept, which a test can
change while it runs (a rotated service account token, a revoked one).
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

# Never used to verify anything (the stand-in API server is plain HTTP), but the auth method
# insists on a CA certificate when it does not run in a pod. Public half of a throwaway.
STAND_IN_CA = """-----BEGIN CERTIFICATE-----
MIIBmDCCAT+gAwIBAgIUW4/+Wzrk1DXhC9kJnOWpJjs5nfYwCgYIKoZIzj0EAwIw
ITEfMB0GA1UEAwwWc3RhbmQtaW4ga3ViZXJuZXRlcyBDQTAgFw0yNjEyMDMxMTM2
MjFaGA8yMTI2MTEwOTExMzYyMVowITEfMB0GA1UEAwwWc3RhbmQtaW4ga3ViZXJu
ZXRlcyBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABEAhFAd3pBWg6gfEO1kb
QN/4UPCO5eLtEVmg+vwoWa8Dx1sd6CwiTFyoQ7x8VrG8h8iUyytRm1oSivkvZxZF
EwOjUzBRMB0GA1UdDgQWBBRa+dD+x16zRkjlK0vCi4FHGr7nyTAfBgNVHSMEGDAW
gBRa+dD+x16zRkjlK0vCi4FHGr7nyTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49
BAMCA0cAMEQCIAS21i8Rta1elxnA1labI4m9xJEyXJvSWRBdCo7FDv19AiB3lUBL
Jifwd4Wj9iazdGyW/vqW1InzY0U6OxQTHufE8A==
-----END CERTIFICATE-----
"""


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str
    uid: str

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    def jwt(self) -> str:
        """A new legacy service account token (a fresh signature each time, so each differs)."""

        def part(value: dict[str, str]) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        claims = {
            "iss": "kubernetes/serviceaccount",
            "sub": self.username,
            "kubernetes.io/serviceaccount/namespace": self.namespace,
            "kubernetes.io/serviceaccount/service-account.name": self.name,
            "kubernetes.io/serviceaccount/service-account.uid": self.uid,
            "kubernetes.io/serviceaccount/secret.name": f"{self.name}-token",
        }
        signature = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{signature}"


class TokenReviewStandIn:
    """Answers TokenReviews on a loopback port: authenticated only for the accepted tokens.

    Use as a context manager: the server thread is started on entry, shut down and joined on
    exit, and its socket closed.
    """

    def __init__(self, account: ServiceAccount) -> None:
        self.account = account
        self.reviewed: list[str] = []  # every token asked about, in order
        self._accepted: set[str] = set()
        self._lock = threading.Lock()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                token = str(body["spec"]["token"])
                ok = stand_in._review(token)
                status: dict[str, Any] = {"authenticated": ok}
                if ok:
                    status["user"] = {
                        "username": account.username,
                        "uid": account.uid,
                        "groups": [],
                    }
                else:
                    status["error"] = "token is not valid"  # what the API server says
                answer = json.dumps(
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "status": status,
                    }
                ).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _review(self, token: str) -> bool:
        with self._lock:
            self.reviewed.append(token)
            return token in self._accepted

    def accept(self, *tokens: str) -> None:
        with self._lock:
            self._accepted.update(tokens)

    def revoke(self, *tokens: str) -> None:
        with self._lock:
            self._accepted.difference_update(tokens)

    def reviews(self) -> list[str]:
        with self._lock:
            return list(self.reviewed)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> TokenReviewStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def enable_auth(client: Any, mount: str, stand_in: TokenReviewStandIn, **role: Any) -> None:
    """Enable the kubernetes auth method at ``mount`` of OpenBao (``client``: a root hvac
    client), backed by ``stand_in``, with a role ``rotator`` bound to the stand-in's service
    account; ``role`` adds to the role's settings (``token_policies``, ``token_ttl``, ...)."""
    account = stand_in.account
    client.sys.enable_auth_method(method_type="kubernetes", path=mount)
    client.write_data(
        f"auth/{mount}/config",
        data={
            "kubernetes_host": stand_in.url,
            "kubernetes_ca_cert": STAND_IN_CA,
            "disable_local_ca_jwt": True,
        },
    )
    client.write_data(
        f"auth/{mount}/role/rotator",
        data={
            "bound_service_account_names": [account.name],
            "bound_service_account_namespaces": [account.namespace],
            **role,
        },
    )
