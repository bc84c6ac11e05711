"""Every request the README shows is sent, in the README's order, to the real app on the
test PostgreSQL, and must be accepted (2xx). Ids flow from one example to the next as
the README's shell variables say (``CLOUD=$(curl ... | jq -r .id)``); the token comes
from the README's own ``vmigrate tokens create`` line, run through the real CLI.

The reader (:mod:`tests.readme_examples`) is tested here too, on small documents, so a
README example it cannot read fails loudly instead of being skipped."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from app.cli import main
from app.db import Database
from tests.readme_examples import (
    DocError,
    OtherCommand,
    Request,
    Var,
    assigned,
    examples,
    expand,
    json_body,
    literal,
    section_text,
    shell_blocks,
)

README = Path(__file__).resolve().parent.parent / "README.md"


async def run_vmigrate(command: OtherCommand, variables: dict[str, str],
                       database_url: str, tmp_path: Path) -> str:
    argv = [expand(word, variables, command.where) for word in command.argv]
    if Path(argv[0]).name != "vmigrate" or argv[1:3] != ["tokens", "create"]:
        raise DocError(f"{command.where}: the test does not know how to run {argv}")
    env = {"VMIGRATE_DATABASE_URL": database_url, "VMIGRATE_DATA_DIR": str(tmp_path / "cli")}
    result = await asyncio.to_thread(CliRunner().invoke, main, argv[1:], env=env)
    assert result.exit_code == 0, f"{command.where}: {result.output}"
    return result.output.strip()


async def send(client: httpx.AsyncClient, request: Request,
               variables: dict[str, str]) -> httpx.Response:
    headers = {name: expand(value, variables, request.where)
               for name, value in request.headers}
    body = json_body(request, variables) if request.body is not None else None
    return await client.request(request.method, expand(request.target, variables,
                                                       request.where),
                                headers=headers, content=body)


def kept(response: httpx.Response, path: tuple[str, ...], where: str) -> str:
    value: Any = response.json()
    for key in path:
        assert isinstance(value, dict), f"{where}: no .{key} in {value}"
        assert key in value, f"{where}: no .{key} in {value}"
        value = value[key]
    return str(value)


QUICK_START = "Quick start"  # run by a real shell: tests/test_readme_quickstart.py


async def test_every_readme_request_is_accepted(
    client: httpx.AsyncClient, db: Database, database_url: str, tmp_path: Path
) -> None:
    # The examples after the quick start go on from it: its $TOKEN and $CLOUD, made here
    # by the quick start's own lines; $API is the app this client talks to.
    variables: dict[str, str] = {"API": ""}
    sent: list[tuple[str, str, int]] = []
    carried = [assigned(README, QUICK_START, "TOKEN"), assigned(README, QUICK_START, "CLOUD")]
    for example in [*carried, *examples(README, skip=(QUICK_START,))]:
        if isinstance(example, OtherCommand):
            if example.assign is None:
                raise DocError(f"{example.where}: a command beside the requests that the "
                               "test does not run")
            variables[example.assign] = await run_vmigrate(example, variables, database_url,
                                                           tmp_path)
            continue
        response = await send(client, example, variables)
        assert 200 <= response.status_code < 300, (
            f"{example.where}: {example.method} answered {response.status_code}: "
            f"{response.text}")
        sent.append((example.method, response.request.url.path, response.status_code))
        if example.keep is not None:
            name, path = example.keep
            variables[name] = kept(response, path, example.where)
    bodies = [m for m, _, _ in sent if m in ("POST", "PUT", "PATCH")]
    assert len(bodies) >= 6, sent
    assert {"TOKEN", "CLOUD", "LATER", "ESXI", "DB1"} <= variables.keys()
    # What the examples claim happened did happen.
    headers = {"Authorization": f"Bearer {variables['TOKEN']}"}
    later = (await client.get(f"/v1/migrations/{variables['LATER']}", headers=headers)).json()
    assert later["status"] == "queued"
    kinds = {c["kind"] for c in (await client.get("/v1/clouds", headers=headers)).json()[
        "items"]}
    assert kinds == {"vmware", "esxi", "linux"}


def test_every_body_in_the_readme_is_read() -> None:
    # Counted from the raw text, independently of the reader: nothing may slip past it.
    text = section_text(README.read_text(), QUICK_START, README.name, inside=False)
    written = len(re.findall(r"(?:^|\s)(?:-d|--data(?:-raw|-binary)?|--json)\s", text)) + len(
        re.findall(r"^ {0,3}(?:```|~~~)\s*json\s*$", text, flags=re.MULTILINE))
    read = [e for e in examples(README, skip=(QUICK_START,))
            if isinstance(e, Request) and e.body is not None]
    assert len(read) == written
    variables = {name: "00000000-0000-4000-8000-000000000000"
                 for e in read for part in e.body or () if isinstance(part, Var)
                 for name in [part.name]}
    for request in read:
        assert isinstance(json.loads(json_body(request, variables)), dict)


def test_readme_examples_use_only_platforms_with_drivers() -> None:
    allowed = {"vmware", "esxi", "linux"}
    kinds = set()
    for example in examples(README, skip=(QUICK_START,)):
        if isinstance(example, Request) and example.body is not None:
            body = json.loads(json_body(example, _AnyId()))
            if "kind" in body and "settings" in body:
                kinds.add(body["kind"])
    quick_start = section_text(README.read_text(), QUICK_START, README.name, inside=True)
    kinds |= set(re.findall(r'"kind": "([a-z]+)"', quick_start))
    assert kinds, "no cloud examples found"
    assert kinds <= allowed, f"README examples name platforms without a driver: {kinds}"


class _AnyId(dict[str, str]):
    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return "00000000-0000-4000-8000-000000000000"


# --- the reader, on small documents -------------------------------------------------


def read(tmp_path: Path, markdown: str) -> list[Request | OtherCommand]:
    path = tmp_path / "DOC.md"
    path.write_text(markdown)
    return examples(path)


def only_request(tmp_path: Path, markdown: str) -> Request:
    found = read(tmp_path, markdown)
    assert len(found) == 1
    assert isinstance(found[0], Request)
    return found[0]


def test_single_quoted_body_with_a_spliced_variable(tmp_path: Path) -> None:
    request = only_request(tmp_path, (
        "text\n\n```sh\n"
        "X=$(curl -sS https://h:8080/v1/things?a=1 -H \"Authorization: Bearer $T\" \\\n"
        "  -H 'Content-Type: application/json' -d '{\n"
        "    \"id\": \"'\"$ID\"'\", \"cost\": \"$5\"}' | jq -r .a.b)  # a comment\n"
        "```\n"))
    assert request.where == "DOC.md:4"
    assert (request.method, expand(request.target, {}, "")) == ("POST", "/v1/things?a=1")
    variables = {"ID": "abc", "T": "tok"}
    assert json.loads(json_body(request, variables)) == {"id": "abc", "cost": "$5"}
    assert dict((k, expand(v, variables, "")) for k, v in request.headers) == {
        "Authorization": "Bearer tok", "Content-Type": "application/json"}
    assert request.keep == ("X", ("a", "b"))


def test_here_documents_quoted_and_not(tmp_path: Path) -> None:
    found = read(tmp_path, (
        "```bash\n"
        "curl -X PUT http://h/v1/a -d @- <<EOF\n{\"id\": \"${ID}\", \"p\": \"\\$x\"}\nEOF\n"
        "curl http://h/v1/b --data-binary @- <<'END'\n{\"id\": \"$ID\"}\nEND\n"
        "```\n"))
    assert [r.method for r in found if isinstance(r, Request)] == ["PUT", "POST"]
    first, second = found
    assert isinstance(first, Request)
    assert isinstance(second, Request)
    assert json.loads(json_body(first, {"ID": "7"})) == {"id": "7", "p": "$x"}
    assert json.loads(json_body(second, {})) == {"id": "$ID"}  # quoted: no expansion


def test_json_block_goes_to_the_endpoint_named_before_it(tmp_path: Path) -> None:
    request = only_request(tmp_path, (
        "Send this to `PATCH /v1/clouds/$CLOUD`:\n\n"
        "```json\n{\"name\": \"renamed\"}\n```\n"))
    assert request.method == "PATCH"
    assert expand(request.target, {"CLOUD": "c1"}, "") == "/v1/clouds/c1"
    assert json_body(request, {}) == '{"name": "renamed"}\n'


def test_other_commands_are_kept_with_their_assignment(tmp_path: Path) -> None:
    found = read(tmp_path, (
        "```sh\nTOKEN=$(vmigrate tokens create --tenant a --scopes clouds:write)\n"
        "curl http://h/v1/clouds -H \"Authorization: Bearer $TOKEN\"\n```\n"))
    command = found[0]
    assert isinstance(command, OtherCommand)
    assert command.assign == "TOKEN"
    assert [literal(w) for w in command.argv][:3] == ["vmigrate", "tokens", "create"]


@pytest.mark.parametrize(("markdown", "error"), [
    ("```sh\ncurl http://h/v1/a -d '{\"a\": 1}\n```\n", "single quote never closed"),
    ("```sh\ncurl http://h/v1/a -d \"{\n```\n", "double quote never closed"),
    ("```sh\ncurl --upload-file x http://h/v1/a\n```\n", "--upload-file is not understood"),
    ("```sh\ncurl http://h/v1/a -d @body.json\n```\n", "bodies read from files"),
    ("```sh\ncurl http://h/v1/a -d @- <<EOF\n{}\n```\n", "here-document never ends"),
    ("```sh\ncurl http://h/v1/a -d \"$(cat x)\"\n```\n", "only $NAME and ${NAME}"),
    ("```sh\ncurl http://h/v1/a | grep id\n```\n", "only '| jq -r .field'"),
    ("```sh\nX=$(curl http://h/v1/a)\n```\n", "must end in '| jq -r .field'"),
    ("```sh\ncurl http://h/v1/a > out\n```\n", "'>' is not understood"),
    ("```sh\ncurl /v1/a\n```\n", "URL must start with http"),
    ("```sh\ncurl $API\n```\n", "after $API the URL needs its /path"),
    ("```text\ncurl http://h/v1/a -d '{}'\n```\n", "mark it ```sh"),
    ("```json\n{\"a\": 1}\n```\n", "needs its endpoint"),
    ("```sh\ncurl http://h/v1/a\n", "never closed"),
])
def test_what_cannot_be_read_fails_loudly(tmp_path: Path, markdown: str, error: str) -> None:
    with pytest.raises(DocError, match=re.escape(error)) as caught:
        read(tmp_path, markdown)
    assert "DOC.md:" in str(caught.value)


def test_an_unset_variable_or_a_bad_body_fails_loudly(tmp_path: Path) -> None:
    request = only_request(
        tmp_path, "```sh\ncurl http://h/v1/a -d @- <<EOF\n{\"a\": $B}\nEOF\n```\n")
    with pytest.raises(DocError, match=r"DOC.md:2: \$B is used but never set"):
        json_body(request, {})
    with pytest.raises(DocError, match="not JSON"):
        json_body(request, {"B": "{"})
    with pytest.raises(DocError, match="not a JSON object"):
        json_body(only_request(tmp_path, "```sh\ncurl http://h/v1/a -d '[1]'\n```\n"), {})


def test_a_base_variable_before_the_path(tmp_path: Path) -> None:
    request = only_request(tmp_path, (
        "```sh\nX=$(curl -sS --fail-with-body \"$API/v1/things/$ID?a=1\" | jq -r .id)\n```\n"))
    assert expand(request.target, {"ID": "7"}, "") == "/v1/things/7?a=1"


def test_sections_are_skipped_and_found(tmp_path: Path) -> None:
    path = tmp_path / "DOC.md"
    path.write_text(
        "# Title\n\n## Quick start\n\n```sh\nhead -c 1M /dev/zero > disk.raw\n```\n\n"
        "### More\n\n```bash\nT=$(vmigrate tokens create --tenant a --all-scopes)\n"
        "curl http://h/v1/a\n```\n\n## Later\n\n```sh\ncurl http://h/v1/b\n```\n")
    later = examples(path, skip=("Quick start",))
    assert [expand(e.target, {}, "") for e in later if isinstance(e, Request)] == ["/v1/b"]
    assert [b.line for b in shell_blocks(path, "Quick start")] == [6, 12]
    token = assigned(path, "Quick start", "T")
    assert isinstance(token, OtherCommand)
    assert [literal(w) for w in token.argv][-1] == "--all-scopes"
    with pytest.raises(DocError, match="sets \\$U 0 times"):
        assigned(path, "Quick start", "U")
    with pytest.raises(DocError, match="exactly one '## Nowhere'"):
        shell_blocks(path, "Nowhere")
    with pytest.raises(DocError, match="'>' is not understood"):
        examples(path)
