"""Swap the served model version in a running TorchServe with no failed request, and back.

    python -m serving.swap bookrec-2.0.mar            # register, wait READY, set default, retire the others
    python -m serving.swap --rollback                 # the same, to the archive the last swap retired

Every step is a management API call with the management key (``key_file.json``):

1. ``POST /models?url=<archive>&synchronous=false&initial_workers=N``: the archive is a plain file
   name of the server's model store (never a URL: TorchServe loads a bare name from its store and
   refuses ``..``), its model name and version read from the archive's own manifest;
2. wait until the new version has a READY worker (it answers nothing before). The registration is
   asynchronous on purpose: a synchronous one holds one of TorchServe's network threads until the
   worker has started (tens of seconds), and every inference connection served by that thread
   waits as long (measured: one request in flight stalled 29 and 39 s);
3. ``PUT /models/<name>/<version>/set-default``: from here ``/predictions/<name>`` goes to it;
4. each other version, once its queue has stayed empty for ``--quiet`` seconds (the batch its
   worker may still hold is answered meanwhile), ``DELETE /models/<name>/<version>``.

Requests keep being answered by the old default until step 3 and by the new one after it; the
old version is retired only after its queue stayed empty for a while. A swap that fails before step 3 unregisters
what it registered and leaves the old default serving. The swap writes ``swap.json`` (``--state``):
the archive now served and the one it replaced, which ``--rollback`` swaps back to.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"


class SwapError(RuntimeError):
    """The swap could not be made; the message says which step failed (the old default still serves)."""


def archive_identity(store: Path, archive: str) -> tuple[str, str]:
    """(model name, version) from the archive's ``MAR-INF/MANIFEST.json``."""
    if Path(archive).name != archive or not archive.endswith(".mar"):
        raise SwapError(f"{archive!r}: name a .mar file of the model store, not a path or URL")
    path = Path(store) / archive
    try:
        with zipfile.ZipFile(path) as zf:
            model = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise SwapError(f"{path}: not a readable model archive: {err}") from None
    return str(model["modelName"]), str(model["modelVersion"])


@dataclass
class Management:
    """The management API of one TorchServe, with its key."""

    url: str = DEFAULT_MANAGEMENT
    key: str | None = None
    timeout: float = 300.0

    @classmethod
    def from_key_file(cls, url: str, key_file: Path, **kw: Any) -> Management:
        key = json.loads(Path(key_file).read_text())["management"]["key"] if Path(key_file).is_file() else None
        return cls(url, key, **kw)

    def call(self, method: str, path: str, **params: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return requests.request(method, f"{self.url}{path}", params=params, headers=headers, timeout=self.timeout)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The description of every registered version of ``name`` (empty when none)."""
        resp = self.call("GET", f"/models/{name}/all")
        if resp.status_code == 404:
            return []
        _check(resp, f"list the versions of {name}")
        return resp.json()

    def default(self, name: str) -> dict[str, Any] | None:
        """The description of the default version of ``name``."""
        resp = self.call("GET", f"/models/{name}")
        if resp.status_code == 404:
            return None
        _check(resp, f"describe {name}")
        return resp.json()[0]


def _check(resp: requests.Response, what: str) -> None:
    if resp.status_code >= 400:
        raise SwapError(f"could not {what}: HTTP {resp.status_code} {resp.text.strip()[:300]}")


def _ready(api: Management, name: str, version: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        resp = api.call("GET", f"/models/{name}/{version}")
        if resp.status_code == 200 and any(w.get("status") == "READY" for w in resp.json()[0].get("workers", [])):
            return
        time.sleep(0.5)
    raise SwapError(f"{name} {version}: no READY worker in time")


def _drain(api: Management, name: str, version: str, deadline: float, quiet: float) -> None:
    """Until the retiring version's queue has stayed empty for ``quiet`` seconds (or the deadline).
    The management API shows queued requests only, not the batch a worker holds: unregistering
    stops the worker, and a batch it still held would never be answered, so the queue must stay
    empty for longer than a batch takes."""
    empty_since = None
    while time.monotonic() < deadline:
        resp = api.call("GET", f"/models/{name}/{version}")
        if resp.status_code != 200:
            return
        if resp.json()[0].get("jobQueueStatus", {}).get("pendingRequests"):
            empty_since = None
        elif empty_since is None:
            empty_since = time.monotonic()
        elif time.monotonic() - empty_since >= quiet:
            return
        time.sleep(0.1)


def swap(
    api: Management,
    store: Path,
    archive: str,
    workers: int = 1,
    wait: float = 300.0,
    drain: float = 60.0,
    quiet: float = 3.0,
) -> dict[str, Any]:
    """Make ``archive`` (a file of the model ``store``) the served default and retire every other
    version of its model; returns what was done."""
    name, version = archive_identity(store, archive)
    deadline = time.monotonic() + wait
    before = api.default(name)
    registered = {str(v["modelVersion"]): v for v in api.versions(name)}
    added = version not in registered
    if added:
        resp = api.call("POST", "/models", url=archive, initial_workers=workers, synchronous="false")
        _check(resp, f"register {archive}")
    try:
        _ready(api, name, version, deadline)
        _check(api.call("PUT", f"/models/{name}/{version}/set-default"), f"make {name} {version} the default")
    except BaseException:
        if added:  # leave the server as it was
            api.call("DELETE", f"/models/{name}/{version}")
        raise
    retired = []
    for old, desc in registered.items():
        if old == version:
            continue
        _drain(api, name, old, time.monotonic() + drain, quiet)
        _check(api.call("DELETE", f"/models/{name}/{old}"), f"retire {name} {old}")
        retired.append({"version": old, "archive": Path(str(desc.get("modelUrl", ""))).name or None})
    previous = before and {"version": str(before["modelVersion"]), "archive": Path(str(before["modelUrl"])).name}
    return {"model": name, "version": version, "archive": archive, "previous": previous, "retired": retired}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.swap", description=__doc__.split("\n\n")[0])
    parser.add_argument("archive", nargs="?", help="the .mar of the model store to serve (a file name)")
    parser.add_argument("--rollback", action="store_true", help="swap back to the archive the last swap replaced")
    parser.add_argument("--store", type=Path, default=Path("model-store"), help="the server's model store")
    parser.add_argument("--management", default=DEFAULT_MANAGEMENT, help="management address")
    parser.add_argument("--key-file", type=Path, default=Path("key_file.json"), help="TorchServe's token file")
    parser.add_argument("--workers", type=int, default=1, help="workers of the new version")
    parser.add_argument(
        "--quiet", type=float, default=3.0, help="seconds the old version's queue stays empty before it is retired"
    )
    parser.add_argument("--state", type=Path, default=Path("swap.json"), help="where the last swap is recorded")
    args = parser.parse_args(argv)
    if bool(args.archive) == args.rollback:
        parser.error("name an archive, or --rollback")
    archive = args.archive
    if args.rollback:
        state = json.loads(args.state.read_text()) if args.state.is_file() else {}
        archive = (state.get("previous") or {}).get("archive")
        if not archive:
            print(f"error: {args.state}: no earlier swap to roll back", file=sys.stderr)
            return 2
    api = Management.from_key_file(args.management, args.key_file)
    try:
        done = swap(api, args.store, archive, workers=args.workers, quiet=args.quiet)
    except (SwapError, requests.RequestException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.state.write_text(json.dumps(done, indent=2) + "\n")
    print(json.dumps(done, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
