"""Run Debian's nginx with the repository's deploy/nginx.conf in a temp dir, in front of local APIs.

The repository file is used as it is, with the text substitutions documented at its top: the
`server apiN:8000 ...;` lines of the upstream become one line per local API, `listen 80;` becomes
a free local port, and the temp paths (request bodies, proxy files) move into a private directory
instead of the system's /var/lib/nginx. pid, error log and `daemon off` come from the command line.

    with run_nginx(tmp_path, [api.url for api in stack.apis]) as nginx:
        httpx.get(nginx.url + "/healthz")

nginx missing is an error (CI installs it: `apt-get install nginx`), not a reason to skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from shared.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "deploy" / "nginx.conf"

_SERVER_LINE = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+api\d+:8000(?P<params>[^;\n]*);[ \t]*$", re.MULTILINE)
_LISTEN_LINE = re.compile(r"^(?P<indent>[ \t]*)listen[ \t]+80;[ \t]*$", re.MULTILINE)
_HTTP_LINE = re.compile(r"^http[ \t]*\{[ \t]*$", re.MULTILINE)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxMissing(RuntimeError):
    pass


def find_nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        raise NginxMissing(
            "nginx is not installed, and the deployment tests run the real deploy/nginx.conf: "
            "install it with `apt-get install nginx` (.ci/run does)"
        )
    return path


def render_conf(upstreams: list[str], port: int, temp_dir: Path | None = None, src: Path = CONF) -> str:
    """deploy/nginx.conf with its upstream servers replaced by `upstreams` ("host:port"), `listen` by
    `port`, and, given `temp_dir`, nginx's temp paths moved into it."""
    if not upstreams:
        raise ValueError("at least one upstream")
    text = src.read_text()
    servers = list(_SERVER_LINE.finditer(text))
    listens = list(_LISTEN_LINE.finditer(text))
    if len(servers) < 1 or len(listens) != 1:
        raise ValueError(
            f"{src}: expected `server apiN:8000 ...;` lines and one `listen 80;` (found {len(servers)}, {len(listens)})"
        )
    first, last = servers[0], servers[-1]
    if text[first.start() : last.end()].count("\n") != len(servers) - 1:
        raise ValueError(f"{src}: the `server apiN:8000` lines must be consecutive")
    indent, params = first["indent"], first["params"]
    block = "\n".join(f"{indent}server {u}{params};" for u in upstreams)
    text = text[: first.start()] + block + text[last.end() :]
    text = _LISTEN_LINE.sub(lambda m: f"{m['indent']}listen 127.0.0.1:{port};", text, count=1)
    if temp_dir is not None:
        http = _HTTP_LINE.search(text)
        if http is None:
            raise ValueError(f"{src}: expected a line `http {{`")
        paths = "".join(f"\n    {name}_temp_path {temp_dir / name};" for name in _TEMP_PATHS)
        text = text[: http.end()] + paths + text[http.end() :]
    return text


@dataclass
class Nginx:
    dir: Path
    port: int
    popen: subprocess.Popen[bytes]
    temp: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def conf(self) -> Path:
        return self.dir / "nginx.conf"

    def error_log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def access_log(self) -> str:
        p = self.dir / "access.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGQUIT)  # graceful: open responses finish, then exit
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def _args(exe: str, d: Path) -> list[str]:
    return [
        exe,
        "-p",
        str(d),
        "-c",
        str(d / "nginx.conf"),
        "-e",
        str(d / "error.log"),
        "-g",
        f"daemon off; pid {d / 'nginx.pid'};",
    ]


def start_nginx(tmp: Path, upstreams: list[str], port: int | None = None, timeout: float = 10.0) -> Nginx:
    """Check the rendered config with `nginx -t`, start nginx in the foreground and wait until it answers."""
    exe = find_nginx()
    d = tmp / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    # Temp files live outside pytest's 0700 directories: nginx's workers drop root (to `nobody`)
    # and must reach them. nginx creates the subdirectories itself, owned by its worker user.
    temp = Path(tempfile.mkdtemp(prefix="tandem-nginx-"))
    temp.chmod(0o755)
    hostports = [u.removeprefix("http://").removeprefix("https://").rstrip("/") for u in upstreams]
    (d / "nginx.conf").write_text(render_conf(hostports, port, temp))
    check = subprocess.run([*_args(exe, d), "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(
            f"nginx -t rejected the rendered deploy/nginx.conf:\n{check.stdout}{check.stderr}\n{(d / 'error.log').read_text(errors='replace') if (d / 'error.log').exists() else ''}"
        )
    with (d / "access.log").open("ab") as out:
        popen = subprocess.Popen(_args(exe, d), stdout=out, stderr=subprocess.STDOUT, cwd=d)
    nginx = Nginx(d, port, popen, temp)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not nginx.alive():
            raise RuntimeError(f"nginx exited with {popen.returncode}:\n{nginx.error_log()[-3000:]}")
        try:
            httpx.get(nginx.url + "/healthz", timeout=1.0)  # any answer means it listens
            return nginx
        except httpx.TransportError:
            time.sleep(0.05)
    nginx.stop()
    raise RuntimeError(f"nginx did not answer on {nginx.url} within {timeout}s:\n{nginx.error_log()[-3000:]}")


@contextmanager
def run_nginx(tmp: Path, upstreams: list[str], port: int | None = None) -> Iterator[Nginx]:
    nginx = start_nginx(tmp, upstreams, port)
    try:
        yield nginx
    finally:
        nginx.stop()
