"""signing: canonical JSON (checked against jq), HMAC sign/verify, and every refusal code."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.signing import Auth, Keyring

JQ = "/usr/bin/jq"
SECRET = b"test-secret"
KEYRING = Keyring.shared(SECRET)
NOW = 1_700_000_000
NONCE = "0123456789abcdef0123456789abcdef"

BODY: dict[str, Any] = {
    "v": 1,
    "type": "submit",
    "job_id": "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60",
    "command": "echo héllo \x7f",
    "timeout_s": 60,
    "neg": -5,
    "flag": True,
    "none": None,
    "list": [1, "two", False],
    "nested": {"k": "v", "inner": {"n": 0}},
}


def signed(body: dict[str, Any] = BODY, keyring: Keyring = KEYRING) -> bytes:
    return signing.sign(body, keyring, NOW, nonce=NONCE)


def parsed(body: dict[str, Any] = BODY) -> dict[str, Any]:
    return signing.parse(signed(body))


def refused(fn: Any, *args: Any, **kwargs: Any) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args, **kwargs)
    return info.value


def jq_canonical(data: bytes) -> bytes:
    out = subprocess.run([JQ, "-cS", "."], input=data, capture_output=True, check=True)
    return out.stdout.rstrip(b"\n")


# -- canonical form


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({}, b"{}"),
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        ({"z": {"y": 1, "x": [3, {"d": 1, "c": 2}]}}, b'{"z":{"x":[3,{"c":2,"d":1}],"y":1}}'),
        ({"a": [1, -2, 0]}, b'{"a":[1,-2,0]}'),
        ({"a": True, "b": False, "c": None}, b'{"a":true,"b":false,"c":null}'),
        ({"s": "h\u00e9llo"}, '{"s":"h\u00e9llo"}'.encode()),
        ({"s": "\U0001f600"}, b'{"s":"\xf0\x9f\x98\x80"}'),
        ({"s": "\x7f"}, b'{"s":"\\u007f"}'),
        ({"s": "\x00\x1f"}, b'{"s":"\\u0000\\u001f"}'),
        ({"s": "\n\t\r\b\f"}, b'{"s":"\\n\\t\\r\\b\\f"}'),
        ({"s": '"\\/'}, b'{"s":"\\"\\\\/"}'),
        ({"s": "\x80\u2028"}, '{"s":"\x80\u2028"}'.encode()),
        # code point order: an astral character sorts after U+FFFF (UTF-16 order would not)
        (
            {"\U0001f600": 1, "\uffff": 2, "\u00e9": 3, "a": 4, "B": 5},
            '{"B":5,"a":4,"\u00e9":3,"\uffff":2,"\U0001f600":1}'.encode(),
        ),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_canonical_form(obj: dict[str, Any], expected: bytes) -> None:
    assert signing.canonical(obj) == expected


TRICKY_STRINGS = [
    "plain ascii",
    "\x7f",
    "del\x7fin the middle \x7f\x7f",
    "\x00\x01\x08\x0b\x1f",
    "\b\f\n\r\t",
    'quote " backslash \\ slash /',
    "caf\u00e9 \u00fcber \u4e2d\u6587",
    "\x80\x9f\xa0\xff",
    "\u2028\u2029",
    "\ufeff bom",
    "\ud7ff\ue000\ufffd\uffff",
    "\U0001f600\U0010ffff",
]


@pytest.mark.parametrize("text", TRICKY_STRINGS, ids=repr)
def test_canonical_matches_jq(text: str) -> None:
    obj = {"z": text, text: [text, {"b": 1, "a": text}], "a": 0, "\U0001f600": 1, "\uffff": 2}
    ours = signing.canonical(obj)
    # jq sees the same object spelled differently (ASCII escapes, indentation, insertion order)
    assert jq_canonical(json.dumps(obj, indent=2, ensure_ascii=True).encode()) == ours
    # and leaves our canonical form as it is
    assert jq_canonical(ours) == ours


# -- sign and verify


def test_sign_verify_round_trip() -> None:
    wire = signed()
    obj = signing.parse(wire)
    auth = signing.verify(obj, KEYRING)
    assert auth == Auth(kid="default", ts=NOW, nonce=NONCE)
    assert {k: v for k, v in obj.items() if k not in ("auth", "sig")} == BODY
    assert obj["auth"] == {"kid": "default", "ts": NOW, "nonce": NONCE}
    # the wire bytes are the canonical form, and the sig is HMAC-SHA256 of the rest, computed
    # here independently of signing.mac
    assert wire == jq_canonical(wire)
    rest = {k: v for k, v in obj.items() if k != "sig"}
    expected = hmac.new(SECRET, jq_canonical(json.dumps(rest).encode()), hashlib.sha256)
    assert obj["sig"] == expected.hexdigest()


def test_sign_makes_a_fresh_nonce_each_time() -> None:
    a = signing.parse(signing.sign(BODY, KEYRING, NOW))["auth"]["nonce"]
    b = signing.parse(signing.sign(BODY, KEYRING, NOW))["auth"]["nonce"]
    assert a != b
    assert signing.NONCE_RE.fullmatch(a) and signing.NONCE_RE.fullmatch(b)


def test_verify_with_a_keyring_of_several_keys() -> None:
    writer = Keyring(keys={"k1": b"one", "k2": b"two"}, signing_kid="k2")
    reader = Keyring(keys={"k1": b"one", "k2": b"two"}, signing_kid="k1")
    auth = signing.verify(signing.parse(signed(keyring=writer)), reader)
    assert auth.kid == "k2"


def test_keyring_refuses_an_empty_secret() -> None:
    assert refused(Keyring.shared, "").code == "no_secret"
    assert refused(Keyring.shared, b"").code == "no_secret"


def test_keyring_secret_for_an_unknown_kid() -> None:
    assert KEYRING.secret_for("default") == SECRET
    assert refused(KEYRING.secret_for, "nope").code == "unknown_key"


# -- parse refusals

DEEP = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"a":"' + b"x" * signing.MAX_PAYLOAD_BYTES + b'"}', "too_large"),
        (b"\xff", "bad_json"),
        (b'{"a":"\xff"}', "bad_json"),
        (b'{"a":"\xc3"}', "bad_json"),  # truncated sequence
        (b'{"a":"\xc0\xaf"}', "bad_json"),  # overlong encoding
        (b'{"a":"\xed\xa0\x80"}', "bad_json"),  # a UTF-8 encoded surrogate
        (b"\xef\xbb\xbf{}", "bad_json"),  # byte order mark
        (b"", "bad_json"),
        (b"{", "bad_json"),
        (b"{'a': 1}", "bad_json"),
        (b'{"a":1} x', "bad_json"),
        (b'{"a":1}{"b":2}', "bad_json"),
        (DEEP, "bad_json"),
        (b'{"a":1.5}', "bad_json"),
        (b'{"a":1e3}', "bad_json"),
        (b'{"a":1E-2}', "bad_json"),
        (b'{"a":-0.0}', "bad_json"),
        (b'{"a":[0,{"b":2.0}]}', "bad_json"),
        (b'{"a":NaN}', "bad_json"),
        (b'{"a":Infinity}', "bad_json"),
        (b'{"a":-Infinity}', "bad_json"),
        (b'{"a":1,"a":1}', "bad_json"),
        (b'{"a":1,"b":{"c":1,"c":2}}', "bad_json"),
        (b'{"a":[{"x":1,"x":1}]}', "bad_json"),
        (b"[]", "bad_json"),
        (b'[{"a":1}]', "bad_json"),
        (b"1", "bad_json"),
        (b'"x"', "bad_json"),
        (b"null", "bad_json"),
        (b"true", "bad_json"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_parse_refuses(payload: bytes, code: str) -> None:
    assert refused(signing.parse, payload).code == code


def test_parse_size_limit_edge() -> None:
    payload = b'{"a":1}'
    assert signing.parse(payload, max_bytes=len(payload)) == {"a": 1}
    assert refused(signing.parse, payload, max_bytes=len(payload) - 1).code == "too_large"


def test_parse_accepts_big_integers_and_nesting() -> None:
    assert signing.parse(b'{"a":[[{"b":-12345678901234567890}]]}') == {
        "a": [[{"b": -12345678901234567890}]]
    }


# -- verify refusals


def mutated(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A parsed signed message with one member set (or, for `...`, removed)."""
    obj = copy.deepcopy(parsed())
    *parents, last = path
    target = obj
    for p in parents:
        target = target[p]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value", "code"),
    [
        (("auth",), ..., "unsigned"),
        (("sig",), ..., "unsigned"),
        (("sig",), None, "unsigned"),
        (("auth",), "default", "unsigned"),
        (("auth",), ["default", NOW, NONCE], "unsigned"),
        (("auth", "kid"), ..., "bad_auth"),
        (("auth", "kid"), "", "bad_auth"),
        (("auth", "kid"), "a b", "bad_auth"),
        (("auth", "kid"), "a/b", "bad_auth"),
        (("auth", "kid"), "k" * 65, "bad_auth"),
        (("auth", "kid"), 7, "bad_auth"),
        (("auth", "ts"), ..., "bad_auth"),
        (("auth", "ts"), str(NOW), "bad_auth"),
        (("auth", "ts"), True, "bad_auth"),
        (("auth", "ts"), float(NOW), "bad_auth"),
        (("auth", "ts"), -1, "bad_auth"),
        (("auth", "ts"), 2**40, "bad_auth"),
        (("auth", "nonce"), ..., "bad_auth"),
        (("auth", "nonce"), "0123456789abcde", "bad_auth"),  # 15
        (("auth", "nonce"), "0" * 65, "bad_auth"),
        (("auth", "nonce"), NONCE.upper(), "bad_auth"),
        (("auth", "nonce"), "g" * 16, "bad_auth"),
        (("auth", "nonce"), NONCE + "\n", "bad_auth"),
        (("auth", "nonce"), 1234567890123456, "bad_auth"),
        (("auth", "extra"), 1, "bad_auth"),
        (("sig",), 0, "bad_signature"),
        (("sig",), "0" * 64, "bad_signature"),
        (("sig",), "0" * 63, "bad_signature"),
        (("sig",), "0" * 65, "bad_signature"),
        (("sig",), "", "bad_signature"),
        (("auth", "kid"), "other", "unknown_key"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_verify_refuses(path: tuple[str, ...], value: Any, code: str) -> None:
    assert refused(signing.verify, mutated(path, value), KEYRING).code == code


def test_verify_refuses_a_sig_in_upper_case_or_with_a_newline() -> None:
    obj = parsed()
    good = obj["sig"]
    assert signing.verify(obj, KEYRING).nonce == NONCE
    for bad in (good.upper(), good + "\n", " " + good):
        assert refused(signing.verify, {**obj, "sig": bad}, KEYRING).code == "bad_signature"


TAMPERS = [
    (("v",), 2),
    (("type",), "dispatch"),
    (("job_id",), "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f61"),
    (("command",), "echo h\u00e9llo \x7f "),
    (("command",), "echo h\u00e9llo"),
    (("timeout_s",), 61),
    (("timeout_s",), "60"),
    (("neg",), 5),
    (("flag",), False),
    (("flag",), 1),
    (("none",), 0),
    (("list",), [1, "two"]),
    (("list",), [1, "two", 0]),
    (("nested", "k"), "w"),
    (("nested", "inner", "n"), 1),
    (("nested", "inner", "m"), 0),
    (("nested", "inner"), ...),
    (("command",), ...),
    (("added",), "x"),
    (("auth", "ts"), NOW + 1),
    (("auth", "nonce"), "f" + NONCE[1:]),
]


@pytest.mark.parametrize(("path", "value"), TAMPERS, ids=lambda v: repr(v)[:30])
def test_verify_refuses_a_tampered_member(path: tuple[str, ...], value: Any) -> None:
    assert refused(signing.verify, mutated(path, value), KEYRING).code == "bad_signature"


def test_verify_refuses_another_known_key_id() -> None:
    keys = Keyring(keys={"a": b"secret-a", "b": b"secret-b"}, signing_kid="a")
    obj = signing.parse(signed(keyring=keys))
    assert signing.verify(obj, keys).kid == "a"
    obj["auth"]["kid"] = "b"
    assert refused(signing.verify, obj, keys).code == "bad_signature"


def test_verify_refuses_the_wrong_secret() -> None:
    other = Keyring.shared(b"another-secret")
    assert refused(signing.verify, parsed(), other).code == "bad_signature"


@pytest.mark.parametrize(
    "value",
    ['"\\ud800"', '"\\udfff"', '"x\\udc00y"', '["\\ud83d"]', '{"\\ud800":1}'],
)
def test_verify_refuses_lone_surrogates_without_another_exception(value: str) -> None:
    """JSON escapes may spell lone surrogates, which have no UTF-8 form: refused, not a crash."""
    payload = signed()[:-1] + b',"zz":' + value.encode() + b"}"
    e = refused(lambda: signing.verify(signing.parse(payload), KEYRING))
    assert e.code in ("bad_json", "bad_signature")


def test_parse_and_verify_at_every_nesting_depth_only_refuse() -> None:
    """Whatever parses at the recursion limit must not crash the canonical form in verify."""
    head = signed()[:-1] + b',"zz":'
    for depth in range(1, sys.getrecursionlimit() + 50):
        payload = head + b"[" * depth + b"]" * depth + b"}"
        try:
            signing.verify(signing.parse(payload), KEYRING)
        except Refused:
            pass
        except Exception as e:
            pytest.fail(f"depth {depth}: {type(e).__name__}: {e}")


# -- freshness


@pytest.mark.parametrize(
    ("now", "window", "fresh"),
    [
        (NOW, 300, True),
        (NOW + 300, 300, True),
        (NOW - 300, 300, True),
        (NOW + 301, 300, False),
        (NOW - 301, 300, False),
        (NOW + 100_000, 300, False),
        (NOW, 0, True),
        (NOW + 1, 0, False),
        (NOW - 1, 0, False),
    ],
)
def test_check_fresh(now: int, window: int, fresh: bool) -> None:
    auth = Auth(kid="default", ts=NOW, nonce=NONCE)
    if fresh:
        signing.check_fresh(auth, now, window)
    else:
        e = refused(signing.check_fresh, auth, now, window)
        assert e.code == "stale"
        assert ("old" if now > NOW else "in the future") in e.text


def test_check_fresh_default_window() -> None:
    auth = Auth(kid="default", ts=NOW, nonce=NONCE)
    signing.check_fresh(auth, NOW + signing.DEFAULT_WINDOW_S)
    assert refused(signing.check_fresh, auth, NOW + signing.DEFAULT_WINDOW_S + 1).code == "stale"


# -- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=15,
)
bodies = st.dictionaries(
    st.text().filter(lambda k: k not in ("auth", "sig")), json_values, max_size=6
)
PROPERTY = settings(
    database=None, deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(body=bodies, ts=st.integers(min_value=0, max_value=2**40 - 1))
def test_property_sign_then_verify_round_trips(body: dict[str, Any], ts: int) -> None:
    wire = signing.sign(body, KEYRING, ts)
    obj = signing.parse(wire)
    auth = signing.verify(obj, KEYRING)
    assert auth.ts == ts
    assert {k: v for k, v in obj.items() if k not in ("auth", "sig")} == body
    assert signing.canonical(obj) == wire


@PROPERTY
@given(body=bodies, data=st.data())
def test_property_a_flipped_byte_is_refused(body: dict[str, Any], data: st.DataObject) -> None:
    wire = signing.sign(body, KEYRING, NOW)
    index = data.draw(st.integers(min_value=0, max_value=len(wire) - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    flipped = bytearray(wire)
    flipped[index] ^= mask
    try:
        signing.verify(signing.parse(bytes(flipped)), KEYRING)
    except Refused:
        return
    # Only a different spelling of the very same signed content may pass (for instance
    # "\u007f" written as "\u007F"): verify checks the canonical form of what was parsed.
    assert signing.canonical(signing.parse(bytes(flipped))) == wire, bytes(flipped)
