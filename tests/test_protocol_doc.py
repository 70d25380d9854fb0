"""docs/protocol.md is held to the code, so that the wire protocol it documents cannot drift.

The document marks each part a test reads with a line ``<!-- check:NAME [ARG] -->`` just
before a markdown table or a fenced code block. Each test here reads the parts of one NAME and
compares them with the core (or, for defaults and limits, the module the row names). One test
runs the documented exchange against a hub on in-memory streams (no socket, trio's clock).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import time
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devstream_core import control, framing, routes, wire
from devstream_core.credentials import ConnectionString, verify_sas_token
from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpResponse, websocket_connect
from devstream_trio.transport.websocket import WebSocket

from .conftest import HubEnv

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"

_MARKER = re.compile(r"^<!-- check:([a-z-]+)(?: (\S+))? -->$")
_KNOWN = {
    "sas-example",
    "routes",
    "control-types",
    "control-fields",
    "control-message",
    "frame-types",
    "frame-examples",
    "error-codes",
    "constants",
    "initiate-answers",
    "join-answers",
}


@dataclass(frozen=True)
class Block:
    """One checked part of the document: the marker's name and argument, and what follows."""

    name: str
    arg: str | None
    line: int
    kind: str  # "table" or the fenced block's info string ("json", "text", ...)
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _blocks() -> list[Block]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    for number, line in enumerate(lines):
        match = _MARKER.match(line)
        if match is None:
            continue
        i = number + 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        assert i < len(lines), f"line {number + 1}: marker at the end of the document"
        if lines[i].startswith("```"):
            kind = lines[i][3:].strip()
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            body = lines[i + 1 : end]
        elif lines[i].startswith("|"):
            kind = "table"
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            body = lines[i:end]
        else:
            raise AssertionError(f"line {number + 1}: marker not followed by a table or code block")
        found.append(Block(match[1], match[2], number + 1, kind, body))
    return found


def _of(name: str) -> list[Block]:
    blocks = [block for block in _blocks() if block.name == name]
    assert blocks, f"docs/protocol.md has no part marked check:{name}"
    return blocks


def _cell(text: str) -> str:
    text = text.strip().replace("\\|", "|")
    if len(text) >= 2 and text[0] == text[-1] == "`":
        text = text[1:-1]
    return text


def _rows(block: Block) -> list[dict[str, str]]:
    """The rows of a markdown table, as dicts keyed by the header's column names."""
    assert block.kind == "table", f"line {block.line}: check:{block.name} needs a table"

    def split(line: str) -> list[str]:
        return [_cell(c) for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]

    header = split(block.lines[0])
    assert re.fullmatch(r"\|( *:?-+:? *\|)+", block.lines[1].replace(" ", "")), (
        f"line {block.line}: the table's second line must be its separator"
    )
    rows = []
    for line in block.lines[2:]:
        cells = split(line)
        assert len(cells) == len(header), f"line {block.line}: row {line!r} has the wrong width"
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _column(block: Block, *names: str) -> None:
    header = [_cell(c) for c in block.lines[0].strip().strip("|").split("|")]
    for name in names:
        assert name in header, f"line {block.line}: table lacks the column {name!r}"


# -- the document's own shape ------------------------------------------------------------------


def test_every_marker_is_known_and_every_kind_is_present() -> None:
    names = [block.name for block in _blocks()]
    assert set(names) <= _KNOWN, f"unknown markers: {set(names) - _KNOWN}"
    assert set(names) == _KNOWN, f"markers missing: {_KNOWN - set(names)}"


# -- control channel ---------------------------------------------------------------------------


def _control_examples() -> list[tuple[Block, dict[str, object]]]:
    examples = []
    for block in _of("control-message"):
        assert block.kind == "json", f"line {block.line}: a control example is a ```json block"
        examples.append((block, json.loads(block.text)))
    return examples


def test_control_examples_round_trip_through_the_core() -> None:
    for block, example in _control_examples():
        message = control.decode_message(block.text)
        again = json.loads(control.encode_message(message))
        assert again == example, (
            f"line {block.line}: the core encodes this example as {again}, not as written "
            "(every member the encoder writes must be in the example, with the same value)"
        )


def test_every_control_message_type_is_documented_and_no_other() -> None:
    examples = _control_examples()
    decoded = {type(control.decode_message(block.text)) for block, _ in examples}
    assert decoded == set(typing.get_args(control.ControlMessage)), (
        "each control message class needs an example in docs/protocol.md"
    )
    (types_block,) = _of("control-types")
    _column(types_block, "type", "direction")
    listed = [row["type"] for row in _rows(types_block)]
    assert len(listed) == len(set(listed))
    assert set(listed) == {example["type"] for _, example in examples}
    fields = {block.arg for block in _of("control-fields")}
    assert fields == set(listed), "each message type needs a field table (check:control-fields)"


_WRONG_VALUE: dict[str, object] = {
    "string": 12345,
    "integer": "12345",
    "boolean": 1,
    "array of strings": "ssh",
}


def _decodes(obj: dict[str, object]) -> dict[str, object] | None:
    """The re-encoded message for *obj*, or None when the core refuses it as the peer's error."""
    try:
        message = control.decode_message(json.dumps(obj))
    except RemoteProtocolError:
        return None
    result: dict[str, object] = json.loads(control.encode_message(message))
    return result


def test_control_field_tables_match_the_decoder() -> None:
    examples = {str(example["type"]): example for _, example in _control_examples()}
    for block in _of("control-fields"):
        _column(block, "field", "JSON type", "required")
        assert block.arg in examples, f"line {block.line}: no example of {block.arg}"
        example = examples[block.arg]
        rows = _rows(block)
        assert [row["field"] for row in rows] == list(example), (
            f"line {block.line}: the fields of {block.arg} are {list(example)} in its example"
        )
        for row in rows:
            field = row["field"]
            if field == "type":
                continue
            where = f"line {block.line}: {block.arg}.{field}"
            without = {k: v for k, v in example.items() if k != field}
            required = row["required"].split()[0]
            assert required in ("yes", "no"), f"{where}: required must start with yes or no"
            decoded = _decodes(without)
            if required == "yes":
                assert decoded is None, f"{where} is documented as required; the core lacks it"
            else:
                assert decoded is not None, f"{where} is documented as optional; the core needs it"
                default = re.search(r"default `(.+?)`", row["required"])
                if default is not None:
                    assert decoded.get(field) == json.loads(default[1]), f"{where}: default"
            kind = row["JSON type"]
            assert kind in _WRONG_VALUE, f"{where}: unknown JSON type {kind!r}"
            wrong = {**example, field: _WRONG_VALUE[kind]}
            assert _decodes(wrong) is None, f"{where}: the core takes a value that is not {kind}"


# -- devstream.v1 frames -----------------------------------------------------------------------


def _sizes(text: str) -> tuple[int, int]:
    low, _, high = text.replace("\N{EN DASH}", "-").partition("-")
    return int(low), int(high or low)


def _header_refused(kind: int, length: int) -> bool:
    decoder = framing.FrameDecoder()
    try:
        assert decoder.feed(bytes([kind]) + length.to_bytes(4, "big")) == []
    except RemoteProtocolError:
        return True
    return False


def test_frame_types_match_the_core() -> None:
    (block,) = _of("frame-types")
    _column(block, "frame", "type byte", "body bytes")
    rows = _rows(block)
    assert {row["frame"].upper() for row in rows} == set(framing.FrameType.__members__)
    for row in rows:
        kind = framing.FrameType[row["frame"].upper()]
        assert int(row["type byte"], 16) == kind, f"{row['frame']}: type byte"
        low, high = _sizes(row["body bytes"])
        assert not _header_refused(kind, low), f"{row['frame']}: a body of {low} is refused"
        assert not _header_refused(kind, high), f"{row['frame']}: a body of {high} is refused"
        assert _header_refused(kind, low - 1), f"{row['frame']}: a body of {low - 1} is taken"
        assert _header_refused(kind, high + 1), f"{row['frame']}: a body of {high + 1} is taken"


_FRAME_CLASSES: dict[str, type[framing.Frame]] = {
    cls.__name__: cls for cls in typing.get_args(framing.Frame)
}


def test_frame_examples_decode_to_their_fields_and_encode_to_their_bytes() -> None:
    (block,) = _of("frame-examples")
    _column(block, "frame", "hex", "fields")
    rows = _rows(block)
    assert {row["frame"] for row in rows} == set(_FRAME_CLASSES), "one example per frame type"
    for row in rows:
        data = bytes.fromhex(row["hex"])
        frames = framing.FrameDecoder().feed(data)
        assert len(frames) == 1, f"{row['frame']}: the hex holds {len(frames)} frames"
        fields = json.loads(row["fields"])
        if "payload" in fields:
            fields["payload"] = fields["payload"].encode("utf-8")
        expected = _FRAME_CLASSES[row["frame"]](**fields)
        assert frames[0] == expected, f"{row['frame']}: decodes to {frames[0]}"
        assert framing.encode_frame(frames[0]) == data, f"{row['frame']}: encodes otherwise"


# -- error codes -------------------------------------------------------------------------------


def test_error_table_is_the_core_table() -> None:
    (block,) = _of("error-codes")
    _column(block, "errorCode", "HTTP", "close code", "name")
    documented: dict[int, tuple[int, int, str]] = {}
    for row in _rows(block):
        code = int(row["errorCode"])
        assert code not in documented, f"{code} appears twice"
        documented[code] = (int(row["HTTP"]), int(row["close code"]), row["name"])
    expected = {int(c): (c.http_status, c.close_code, c.name) for c in ErrorCode}
    assert documented == expected


# -- HTTP --------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"(?:iothub-streaming|devstream)-[a-z0-9-]+")


def _code_header_names() -> set[str]:
    """devstream's and Azure's streaming header names, as the hub and clients spell them."""
    names = set()
    for path in [
        *(ROOT / "src" / "devstream_trio").glob("*.py"),
        ROOT / "src" / "devstream_core" / "wire.py",
    ]:
        for match in re.finditer(r"b?\"(" + _HEADER_NAME.pattern + r")\"", path.read_text()):
            names.add(match[1])
    return names


def test_every_header_name_is_documented_and_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    constants = {
        value.decode()
        for name, value in vars(wire).items()
        if name.startswith("HEADER_") and isinstance(value, bytes)
    }
    assert len(constants) >= 5
    in_code = _code_header_names()
    assert constants <= in_code
    assert {
        "iothub-streaming-is-accepted",
        "iothub-streaming-url",
        "iothub-streaming-auth-token",
    } <= in_code
    documented = set(re.findall(r"`(" + _HEADER_NAME.pattern + r")(?::[^`]*)?`", text))
    assert in_code - documented == set(), "header names the document lacks"
    assert documented - in_code == set(), "header names the document has and the code lacks"


_SAMPLES = {
    "{deviceId}": "thermostat-1",
    "{streamName}": "ssh",
    "{streamId}": "EBESExQVFhcY",
    "{keyName}": "ops",
}


def test_routes_table_matches_the_router() -> None:
    (block,) = _of("routes")
    _column(block, "methods", "path", "route")
    rows = _rows(block)
    all_routes = {cls.__name__: cls for cls in typing.get_args(routes.Route)}
    assert [row["route"] for row in rows] == list(dict.fromkeys(row["route"] for row in rows))
    assert {row["route"] for row in rows} == set(all_routes)
    for row in rows:
        path = row["path"]
        for placeholder, sample in _SAMPLES.items():
            path = path.replace(placeholder, sample)
        methods = {m.strip().encode() for m in row["methods"].split(",")}
        cls = all_routes[row["route"]]
        assert routes.ALLOWED_METHODS[cls] == methods, f"{row['path']}: methods"
        for method in methods:
            assert type(routes.parse_route(method, path.encode())) is cls, row["path"]
        with pytest.raises(RemoteProtocolError) as refused:
            routes.parse_route(b"PATCH", path.encode())
        assert refused.value.code is ErrorCode.METHOD_NOT_ALLOWED


# -- credentials -------------------------------------------------------------------------------


def test_sas_example_is_what_the_core_signs() -> None:
    (block,) = _of("sas-example")
    values = dict(line.split(": ", 1) for line in block.lines)
    key, expiry = values["key"], int(values["expiry"])
    for side in ("device", "service"):
        cs = ConnectionString.parse(f"{values[side]};SharedAccessKey={key}")
        token = cs.sas_token(expiry=expiry)
        assert token == values[f"{side} token"], f"the {side} token signs otherwise"
        verify_sas_token(token, keys=[key], resource=cs.resource, now=expiry - 1)


# -- figures -----------------------------------------------------------------------------------

_SOURCE = re.compile(r"([\w.]+):([\w.]+)(?:\((\w+)\))?")


def _resolve(source: str) -> object:
    match = _SOURCE.fullmatch(source)
    assert match is not None, f"source {source!r} is not module:attribute or module:Callable(p)"
    module, path, parameter = match.groups()
    value: object = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    if parameter is not None:
        assert callable(value)
        default = inspect.signature(value).parameters[parameter].default
        assert default is not inspect.Parameter.empty, f"{source}: no default"
        value = default
    return value


def test_constants_are_the_code_defaults() -> None:
    wrong = []
    for block in _of("constants"):
        _column(block, "source", "value")
        for row in _rows(block):
            documented = ast.literal_eval(row["value"])
            actual = _resolve(row["source"])
            same_kind = isinstance(actual, bool) == isinstance(documented, bool)
            if actual != documented or not same_kind:
                wrong.append(f"{row['source']}: documented {documented!r}, code has {actual!r}")
    assert wrong == []


# -- the documented exchange, against a hub ----------------------------------------------------


def _documented_names(cell: str) -> set[str]:
    return set(_HEADER_NAME.findall(cell))


def _answer_names(headers: list[tuple[bytes, bytes]]) -> set[str]:
    return {name.decode() for name, _ in headers if _HEADER_NAME.fullmatch(name.decode())}


async def _initiate(env: HubEnv, mode: str, result: list[HttpResponse]) -> None:
    headers = [("devstream-stream-mode", mode)]
    if mode != control.MODE_RAW:
        headers.append(("devstream-stream-window", str(framing.DEFAULT_WINDOW)))
    response = await env.service().request(
        "POST", "/twins/d1/streams/ssh?api-version=2020-09-30", headers=headers, body=b""
    )
    result.append(response)


async def _join(env: HubEnv, url: str, token: str, subprotocols: list[str]) -> WebSocket:
    parts = urllib.parse.urlsplit(url)
    address = HubAddress.from_url(url)
    return await websocket_connect(
        await env.open(address),
        host=address.host_header,
        target=f"{parts.path}?{parts.query}",
        headers=[("authorization", f"Bearer {token}")],
        subprotocols=subprotocols,
    )


async def test_the_documented_exchange_is_what_the_hub_does(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    examples: dict[str, list[dict[str, object]]] = {}
    for _, example in _control_examples():
        examples.setdefault(str(example["type"]), []).append(example)
    (answers_block,) = _of("initiate-answers")
    answers = {row["outcome"]: row for row in _rows(answers_block)}
    (joins_block,) = _of("join-answers")
    joins = {row["mode"]: row for row in _rows(joins_block)}
    accepted_names = _documented_names(answers["accepted"]["response headers"])
    rejected_names = _documented_names(answers["rejected by the device"]["response headers"])
    cs = await hub_env.create_device("d1")
    with trio.fail_after(30):
        device = await websocket_connect(
            await hub_env.open(HubAddress.from_connection_string(cs)),
            host="hub.test:8080",
            target="/devices/d1/streams",
            headers=[("authorization", cs.sas_token(expiry=int(time.time()) + 3600))],
            subprotocols=[control.CONTROL_SUBPROTOCOL],
        )
        assert device.subprotocol == control.CONTROL_SUBPROTOCOL
        size = control.MAX_CONTROL_MESSAGE_SIZE
        await device.send_text(json.dumps(examples["register"][0]))
        assert json.loads(await device.receive_message(size)) == examples["registered"][0]

        for mode, accept in ((framing.SUBPROTOCOL, True), (control.MODE_RAW, True), ("raw", False)):
            result: list[HttpResponse] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_initiate, hub_env, mode, result)
                request = json.loads(await device.receive_message(size))
                documented = dict(examples["streamRequest"][0])
                if mode == control.MODE_RAW:
                    del documented["window"]  # sent only when the service asked for one
                assert set(request) == set(documented)
                assert request["mode"] == mode
                answer = examples["streamResponse"][0 if accept else 1]
                assert answer["accepted"] is accept
                await device.send_text(json.dumps({**answer, "requestId": request["requestId"]}))
            (response,) = result
            if not accept:
                row = answers["rejected by the device"]
                assert response.status == int(row["status"])
                assert _answer_names(response.headers) == rejected_names
                assert json.loads(response.body) == {
                    "errorCode": int(re.findall(r'"errorCode": (\d+)', row["body"])[0]),
                    "message": answer["reason"],
                }
                continue
            assert response.status == int(answers["accepted"]["status"])
            names = _answer_names(response.headers)
            assert names <= accepted_names
            assert accepted_names - names == (
                set() if mode != control.MODE_RAW else {"devstream-stream-window"}
            )
            offered = [framing.SUBPROTOCOL] if mode != control.MODE_RAW else []
            joined = await _join(hub_env, request["url"], request["authorizationToken"], offered)
            row = joins[mode]
            if mode == control.MODE_RAW:
                assert joined.subprotocol is None
            else:
                assert joined.subprotocol == row["sec-websocket-protocol"]
            assert _answer_names(joined.handshake_headers) == _documented_names(
                row["other headers"]
            )
            await joined.abort()
        await device.abort()
