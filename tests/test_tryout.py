"""Trying it out: demo, debug receiver, signature snippets, compose and Dockerfile."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import requests
import yaml
from click.testing import CliRunner

from dispatcher import delivery, verify_signature
from dispatcher.cli import main
from tests.conftest import ROOT, Database

VECTOR_SECRET = "It's a Secret to Everybody"
VECTOR_BODY = b'{"event":"create","object_id":1}'
VECTOR_SIGNATURE = (
    "sha512=2e7737b0b793d8fb1c80377b7a05c53d5f61fdf8c5a99269faf31d1b1cce25604e4cac547b37dd8984"
    "bf4c0c535777cff553f788452871c420622e37a93af091"
)
README = (ROOT / "README.md").read_text()


def snippet(kind: str) -> str:
    """The code block that follows ``<!-- verify:kind -->`` in the README."""
    m = re.search(rf"<!-- verify:{kind} -->\n```\w+\n(.*?)```", README, re.S)
    assert m, f"README has no verify:{kind} snippet"
    return m.group(1)


def test_signature_vector() -> None:
    assert delivery.sign(VECTOR_SECRET, VECTOR_BODY) == VECTOR_SIGNATURE
    assert verify_signature(VECTOR_BODY, VECTOR_SIGNATURE, VECTOR_SECRET)
    assert not verify_signature(VECTOR_BODY + b" ", VECTOR_SIGNATURE, VECTOR_SECRET)
    assert not verify_signature(VECTOR_BODY, VECTOR_SIGNATURE, "wrong")
    assert not verify_signature(VECTOR_BODY, VECTOR_SIGNATURE[7:], VECTOR_SECRET)
    assert not verify_signature(VECTOR_BODY, None, VECTOR_SECRET)
    assert VECTOR_SIGNATURE in README


def test_readme_python_snippet() -> None:
    scope: dict = {}
    exec(snippet("python"), scope)
    assert scope["is_genuine"](VECTOR_BODY, VECTOR_SIGNATURE, VECTOR_SECRET) is True
    assert scope["is_genuine"](b"{}", VECTOR_SIGNATURE, VECTOR_SECRET) is False


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_readme_node_snippet(tmp_path: Path) -> None:
    program = snippet("node") + (
        "const body = Buffer.from(process.argv[2]);\n"
        "console.log(isGenuine(body, process.argv[3], process.argv[4]),"
        " isGenuine(Buffer.from('x'), process.argv[3], process.argv[4]));\n"
    )
    script = tmp_path / "verify.js"
    script.write_text(program)
    out = subprocess.run(
        ["node", str(script), VECTOR_BODY.decode(), VECTOR_SIGNATURE, VECTOR_SECRET],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "true false"


def test_readme_shell_snippet(tmp_path: Path) -> None:
    body = tmp_path / "body"
    body.write_bytes(VECTOR_BODY)
    env = {
        **os.environ,
        "SECRET": VECTOR_SECRET,
        "BODY_FILE": str(body),
        "SIGNATURE_HEADER": VECTOR_SIGNATURE,
    }
    out = subprocess.run(["sh", "-c", snippet("shell")], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "genuine", out.stderr
    env["SIGNATURE_HEADER"] = VECTOR_SIGNATURE[:-1] + "0"
    out = subprocess.run(["sh", "-c", snippet("shell")], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "forged"


def test_demo_shows_three_verified_deliveries() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dispatcher", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("signature verified: yes") >= 3
    for event in ("create", "update", "delete"):
        assert f"received {event} (delivery " in out.stdout
    assert "3 of 3 deliveries arrived signed and verified" in out.stdout
    assert len(re.findall(r"succeeded HTTP 200", out.stdout)) == 3


def test_demo_keep_runs_until_ctrl_c_then_cleans_up() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatcher", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("press Ctrl-C"):
            break
    text = "".join(lines)
    assert "still running" in text and "psql " in text, text
    port = re.search(r"port=(\d+)", text)
    assert port is not None
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "cleaning up" in rest
    # the throwaway server is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(port.group(1)))) != 0


def test_demo_on_an_existing_database_removes_what_it_created(empty_database: Database) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dispatcher", "demo", "--dsn", empty_database.dsn],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 of 3 deliveries arrived signed and verified" in out.stdout
    with empty_database.connect() as c:
        left = c.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname IN ('webhooks', 'danbyte_demo')"
        ).fetchall()
    assert left == []


def test_demo_without_postgres_binaries_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setattr("dispatcher.pgcluster.find_bindir", lambda: None)
    result = CliRunner().invoke(main, ["demo"], env={"DANBYTE_DSN": None})
    assert result.exit_code == 1
    assert result.output.strip().endswith(
        "No PostgreSQL server binaries found (initdb, pg_ctl): install them (Debian/Ubuntu: "
        "apt-get install postgresql) or pass --dsn for an existing database."
    )


def test_receive_verifies_good_and_tampered_signatures() -> None:
    from dispatcher.pgcluster import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dispatcher",
            "receive",
            "--port",
            str(port),
            "--secret-stdin",
            "--status",
            "202",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(VECTOR_SECRET)
        proc.stdin.close()
        url = f"http://127.0.0.1:{port}/hook"
        deadline = time.monotonic() + 20
        while True:
            try:
                good = requests.post(
                    url,
                    data=VECTOR_BODY,
                    headers={
                        "X-Danbyte-Signature": VECTOR_SIGNATURE,
                        "X-Danbyte-Event": "create",
                        "X-Danbyte-Delivery": "d-1",
                    },
                    timeout=5,
                )
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        bad = requests.post(
            url,
            data=VECTOR_BODY.replace(b"1", b"2"),
            headers={"X-Danbyte-Signature": VECTOR_SIGNATURE, "X-Danbyte-Event": "create"},
            timeout=5,
        )
        assert (good.status_code, bad.status_code) == (202, 202)
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.stdout is not None
    out = proc.stdout.read()
    first, second = out.strip().split("\n\n")[:2]
    assert first.startswith("POST /hook") and "X-Danbyte-Delivery: d-1" in first
    assert "signature verified: yes" in first and '"object_id": 1' in first
    assert "signature verified: NO" in second
    assert VECTOR_SIGNATURE not in out  # shown shortened only


# ---------------------------------------------------------------------------
# docker-compose.yml and Dockerfile, checked without Docker
# ---------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _cli_invocations(service: dict) -> list[list[str]]:
    """The danbyte-webhooks argument lists a compose service runs."""
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    if entrypoint is None or entrypoint == ["danbyte-webhooks"]:
        return [list(command or ["run"])]
    assert entrypoint == ["sh", "-c"], entrypoint
    (script,) = command
    calls = []
    for part in script.split("&&"):
        words = shlex.split(part)
        assert words[0] == "danbyte-webhooks", part
        calls.append(words[1:])
    return calls


def _envvars(cmd: click.Command) -> set[str]:
    names = set()
    for p in cmd.params:
        env = getattr(p, "envvar", None)
        if env:
            names.update([env] if isinstance(env, str) else env)
    return names


def _resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    cmd: click.Command = main
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        cmd = cmd.commands[rest.pop(0)]
    return cmd, rest


def test_compose_services_use_real_commands_and_env_vars() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"postgres", "migrate", "setup", "dispatcher", "receiver"}
    pg = services["postgres"]
    assert pg["image"].startswith("postgres:") and "healthcheck" in pg
    assert "pgdata" in COMPOSE["volumes"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["dispatcher"]["depends_on"]["setup"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["dispatcher"]["restart"] == "unless-stopped"
    assert services["dispatcher"]["stop_signal"] == "SIGTERM"
    known_extra = {"DANBYTE_RECEIVER_SECRET", "DEMO_WEBHOOK_SECRET"}
    for name, svc in services.items():
        if name == "postgres":
            continue
        assert svc["build"] == "."
        env = set(svc.get("environment") or {})
        allowed: set[str] = set(known_extra)
        for args in _cli_invocations(svc):
            cmd, rest = _resolve(args)
            result = CliRunner().invoke(main, [*args[: len(args) - len(rest)], "--help"])
            assert result.exit_code == 0, (name, args, result.output)
            # every option it passes exists
            ctx = click.Context(cmd)
            parser = cmd.make_parser(ctx)
            parser.parse_args(list(rest))
            allowed |= _envvars(cmd)
            if "--secret-env" in rest:
                allowed.add(rest[rest.index("--secret-env") + 1])
        assert env <= allowed, (name, env - allowed)
    hc = services["dispatcher"]["healthcheck"]["test"]
    assert hc[:2] == ["CMD", "danbyte-webhooks"]
    assert _resolve(hc[2:])[0].name == "status"
    assert "DANBYTE_RECEIVER_SECRET" in (ROOT / "dispatcher" / "cli.py").read_text()


def test_dockerfile_installs_the_tested_package_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(None, 1)
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    keywords = [i[0] for i in instructions if i[0].isupper()]
    assert keywords[0] == "FROM"
    copies = [i[1] for i in instructions if i[0] == "COPY"]
    assert {"sql ./sql", "dispatcher ./dispatcher", "pyproject.toml README.md ./"} <= set(copies)
    runs = " ".join(i[1] for i in instructions if i[0] == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), runs  # the package itself, no extras
    users = [i[1].strip() for i in instructions if i[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"(?i)(password|secret)\s*=", text)
    assert instructions[-1] == ["CMD", '["run"]']
    assert ["ENTRYPOINT", '["danbyte-webhooks"]'] in instructions
