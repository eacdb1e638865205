"""De-identification (tasks/deid.py, `depsim deid`): every planted credential, e-mail address,
phone number and IP address is found; the same value gets the same placeholder in messages,
tool-call arguments and tool results; arguments stay JSON; typical code and log text is left
alone; the command names a broken line and exits 4.

`planted_conversation` is also the planted set of benchmarks/deid_bench.py."""

from __future__ import annotations

import gzip
import json
import random
import re
import string
from pathlib import Path
from typing import Any

import pytest

from tasks.deid import (
    KINDS,
    Deidentifier,
    deid_records,
    is_secret_placeholder,
    placeholder_kind,
    secret_placeholders_in,
)

from .conftest import run_cli, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
ALNUM = string.ascii_letters + string.digits


# --- the planted set --------------------------------------------------------------------------------
def _r(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _luhn_complete(body: str) -> str:
    for check in "0123456789":
        digits = body + check
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch)
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return digits
    raise AssertionError("unreachable")


def _iban(rng: random.Random) -> str:
    country, bban = rng.choice([("DE", lambda: _r(rng, string.digits, 18)),
                                ("GB", lambda: _r(rng, string.ascii_uppercase, 4) + _r(rng, string.digits, 14)),
                                ("FR", lambda: _r(rng, string.digits, 23)),
                                ("NL", lambda: _r(rng, string.ascii_uppercase, 4) + _r(rng, string.digits, 10))])
    b = bban()
    check = 98 - int("".join(str(int(c, 36)) for c in b + country + "00")) % 97
    iban = f"{country}{check:02d}{b}"
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def _phone(rng: random.Random) -> str:
    d = lambda n: _r(rng, string.digits, n)  # noqa: E731
    nz = lambda: str(rng.randint(2, 9))  # noqa: E731
    return rng.choice([
        f"+1 {nz()}{d(2)}-{nz()}{d(2)}-{d(4)}", f"+1 ({nz()}{d(2)}) {nz()}{d(2)}-{d(4)}", f"({nz()}{d(2)}) {nz()}{d(2)}-{d(4)}",
        f"{nz()}{d(2)}-{nz()}{d(2)}-{d(4)}", f"{nz()}{d(2)}.{nz()}{d(2)}.{d(4)}", f"+44 20 {d(4)} {d(4)}",
        f"+44 7{d(3)} {d(6)}", f"07{d(3)} {d(6)}", f"020 {d(4)} {d(4)}", f"+49 30 {d(8)}", f"030 {d(8)}",
        f"+49 171 {d(7)}", f"0171 {d(7)}", f"+33 {nz()} {d(2)} {d(2)} {d(2)} {d(2)}", f"0{nz()} {d(2)} {d(2)} {d(2)} {d(2)}",
        f"+91 9{d(4)} {d(5)}", f"+61 4{d(2)} {d(3)} {d(3)}", f"+{nz()}{d(10)}", f"+1-{nz()}{d(2)}-{nz()}{d(2)}-{d(4)}",
    ])


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.7:
        first = rng.choice([10, 172, 192, 203, 198, 45, 81, 100, 151, 8])
        return ".".join([str(first)] + [str(rng.randint(0, 255)) for _ in range(3)])
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return "2001:db8::" + f"{rng.randint(1, 0xFFFF):x}"
    return ":".join(["2001", "db8", *groups[2:]])


def _email(rng: random.Random) -> str:
    first = rng.choice(["ana", "bo", "chen", "dmitri", "eve", "fatima", "greg", "hana", "ivan", "jo"])
    last = rng.choice(["smith", "okafor", "garcia", "müller".replace("ü", "u"), "tanaka", "nguyen", "kowalski"])
    sep = rng.choice([".", "_", "", "-"])
    tag = rng.choice(["", "", "+billing", f"{rng.randint(1, 99)}"])
    domain = rng.choice(["example.com", "corp.example.org", "mail.acme-corp.co.uk", "gmail.com", "uni-hamburg.de"])
    return f"{first}{sep}{last}{tag}@{domain}"


def _credentials(rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, value, the text that carries it): credentials as they appear in configs and commands."""
    akia = "AKIA" + _r(rng, string.ascii_uppercase + string.digits, 16)
    aws_secret = _r(rng, ALNUM + "/+", 40)
    gh = rng.choice(["ghp_", "gho_", "ghs_"]) + _r(rng, ALNUM, 36)
    pw = _r(rng, ALNUM, rng.randint(10, 18))
    host = rng.choice(["db.internal", "pg-prod-3.acme.net", "cache", "10.2.3.4"])
    pem_kind = rng.choice(["RSA ", "OPENSSH ", "EC ", ""])
    pem = (f"-----BEGIN {pem_kind}PRIVATE KEY-----\n" + "\n".join(_r(rng, ALNUM + "+/", 64) for _ in range(5))
           + f"\n-----END {pem_kind}PRIVATE KEY-----")
    slack = "xoxb-" + _r(rng, string.digits, 12) + "-" + _r(rng, ALNUM, 24)
    stripe = "sk_live_" + _r(rng, ALNUM, 24)
    env_pw = _r(rng, ALNUM, 6) + str(rng.randint(10, 99)) + _r(rng, ALNUM, 6)
    scheme = rng.choice(["postgres", "mysql", "https", "redis", "amqp"])
    user = rng.choice(["app", "admin", "deploy", ""]) if scheme == "redis" else rng.choice(["app", "admin", "deploy"])
    return [
        ("SECRET", akia, f"export AWS_ACCESS_KEY_ID={akia}"),
        ("SECRET", aws_secret, f'aws_secret_access_key = "{aws_secret}"'),
        ("SECRET", gh, f'curl -H "Authorization: token {gh}" https://api.github.com/user'),
        ("SECRET", pem, pem),
        ("SECRET", slack, f"SLACK_BOT_TOKEN={slack}"),
        ("SECRET", stripe, f"STRIPE_SECRET_KEY={stripe}"),
        ("SECRET", env_pw, f"DB_PASSWORD={env_pw}"),
        ("URL_CREDENTIALS", pw, f"{scheme}://{user}:{pw}@{host}:5432/app"),
    ]


def planted_conversation(rng: random.Random, i: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A conversation with planted identifiers, each in a user message, a tool call's JSON
    arguments and a tool result. Returns the record and its (kind, value) list."""
    creds = rng.sample(_credentials(rng), 3)
    others = [("EMAIL", _email(rng)), ("PHONE", _phone(rng)), ("IP", _ip(rng))]
    if rng.random() < 0.5:
        others.append(("ACCOUNT", _iban(rng)))
    if rng.random() < 0.3:
        prefix = rng.choice(["4", "51", "37", "6011"])
        card = _luhn_complete(prefix + _r(rng, string.digits, 15 - len(prefix)))
        others.append(("ACCOUNT", " ".join(card[j:j + 4] for j in range(0, 16, 4)) if rng.random() < 0.5 else card))
    others = [(k, v) for k, v in others if all(v != o for _, o in others if o is not v)]
    email, phone, ip = others[0][1], others[1][1], others[2][1]
    accounts = [v for k, v in others if k == "ACCOUNT"]
    user = (f"Hi, I'm the on-call today ({email}, phone {phone}). The box at {ip} keeps failing. "
            + " ".join(f"Payout account {a}." for a in accounts) + "\nConfig:\n" + "\n".join(t for _, _, t in creds))
    args = {"path": f"deploy/{i}.env", "content": "\n".join(t for _, _, t in creds) + f"\nADMIN_EMAIL={email}\n",
            "meta": {"owner": email, "hosts": [ip], "contact": phone, "billing": accounts}}
    result = (f"2026-03-0{1 + i % 9}T12:34:56Z INFO connected from {ip}\n"
              f"notify {email} / {phone}\n" + "\n".join(t for _, _, t in creds))
    record = {
        "conversation_id": f"planted-{i:05d}", "model": "m", "created_at": "2026-03-01T00:00:00Z",
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": "write_file", "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": result},
            {"role": "assistant", "content": f"Done. I wrote the config and will e-mail {email} once {ip} is back."},
        ],
    }
    return record, [(k, v) for k, v, _ in creds] + others


def planted_set(n: int, seed: int = 0) -> list[tuple[dict[str, Any], list[tuple[str, str]]]]:
    rng = random.Random(seed)
    return [planted_conversation(rng, i) for i in range(n)]


def leaked(record: dict[str, Any], value: str) -> bool:
    """Whether `value` still appears anywhere in the record (raw or as JSON-escaped inside arguments)."""
    text = json.dumps(record, ensure_ascii=False)
    escaped = json.dumps(value, ensure_ascii=False)[1:-1]
    return value in text or escaped in text or json.dumps(escaped, ensure_ascii=False)[1:-1] in text


# What the synthetic world plants (tasks/synthetic/agent.py `_secret_values`, tasks/synthetic/logs.py).
SYNTHETIC_PLANTED = {
    "SECRET": re.compile(r"AKIA[A-Z0-9]{16}|[A-Za-z0-9/+]{40}|sk_live_[A-Za-z0-9]{24}|gh[pousr]_[A-Za-z0-9]{36}"
                         r"|-----BEGIN OPENSSH PRIVATE KEY-----[\s\S]*-----END OPENSSH PRIVATE KEY-----"),
    "URL_CREDENTIALS": re.compile(r"[A-Za-z0-9]{16}|gh[pousr]_[A-Za-z0-9]{36}"),
    "EMAIL": re.compile(r"[a-z]+@example\.com|sync-bot@[\w.-]+"),
}


def found_values(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, value) of every identifier the de-identifier finds in one record. For measuring
    only: it reads the private mapping, which production code never does."""
    d = Deidentifier()
    d.conversation(record)
    return [(k, v) for v, k in d._kind_of.items()]


def unexplained(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Identifiers found in the bundled logs that the synthetic world did not plant (false
    positives), per kind, masked."""
    out: dict[str, list[str]] = {}
    for record in records:
        for kind, value in found_values(record):
            pattern = SYNTHETIC_PLANTED.get(kind)
            if pattern is None or not pattern.fullmatch(value):
                out.setdefault(kind, []).append(value[:6] + "…")
    return out


# --- tests -------------------------------------------------------------------------------------------
def test_every_planted_credential_email_phone_ip_is_found() -> None:
    missed: dict[str, list[str]] = {}
    total: dict[str, int] = {}
    for record, planted in planted_set(300, seed=1):
        out = Deidentifier().conversation(record)
        for kind, value in planted:
            total[kind] = total.get(kind, 0) + 1
            if leaked(out, value):
                missed.setdefault(kind, []).append(value[:30])
    assert set(total) >= {"SECRET", "URL_CREDENTIALS", "EMAIL", "PHONE", "IP", "ACCOUNT"}
    assert not missed, {k: (len(v), v[:5]) for k, v in missed.items()}


def test_placeholders_are_typed() -> None:
    record, planted = planted_set(1, seed=2)[0]
    out = Deidentifier().conversation(record)
    text = json.dumps(out)
    for kind, _ in planted:
        assert re.search(rf"<{kind}_\d+>", text), kind


def _conversation(user: str, args: dict[str, Any] | str, result: str, answer: str = "") -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {"conversation_id": "c", "model": "m", "created_at": "2026-01-01T00:00:00Z", "messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "send_email", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "assistant", "content": answer}]}


def test_same_value_same_placeholder_across_messages_arguments_and_results() -> None:
    ghp = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A"
    rec = _conversation(
        user="Mail jane.roe@example.org and bob@example.net from 198.51.100.23; call +44 20 7946 0958.",
        args={"to": ["jane.roe@example.org"], "cc": "bob@example.net", "body": f"token {ghp}",
              "nested": {"ip": "198.51.100.23", "ip2": "198.51.100.24"}},
        result=f"sent to jane.roe@example.org via 198.51.100.23 (token {ghp} accepted; phone +44 20 7946 0958)",
        answer="Sent to jane.roe@example.org; bob@example.net was copied.")
    d = Deidentifier()
    out = d.conversation(rec)
    user, call, tool, answer = out["messages"]
    args = json.loads(call["tool_calls"][0]["function"]["arguments"])
    assert args["to"] == ["<EMAIL_1>"] and args["cc"] == "<EMAIL_2>"
    assert user["content"] == "Mail <EMAIL_1> and <EMAIL_2> from <IP_1>; call <PHONE_1>."
    assert args["nested"] == {"ip": "<IP_1>", "ip2": "<IP_2>"}
    assert args["body"] == "token <SECRET_1>"
    assert tool["content"] == "sent to <EMAIL_1> via <IP_1> (token <SECRET_1> accepted; phone <PHONE_1>)"
    assert answer["content"] == "Sent to <EMAIL_1>; <EMAIL_2> was copied."
    assert d.counts() == {"SECRET": 1, "URL_CREDENTIALS": 0, "EMAIL": 2, "PHONE": 1, "IP": 2, "ACCOUNT": 0}
    # ids, roles and metadata are untouched; the input is not modified
    assert call["tool_calls"][0]["id"] == "call_1" and tool["tool_call_id"] == "call_1"
    assert rec["messages"][0]["content"].startswith("Mail jane.roe@example.org")


def test_a_secret_seen_with_context_is_replaced_where_it_appears_bare() -> None:
    """The keyword detector needs `password=`; the bare value later must get the same placeholder."""
    rec = _conversation(user="DB_PASSWORD=Qz7vLm2pXc9T", args={"command": "psql -W Qz7vLm2pXc9T"},
                        result="login with Qz7vLm2pXc9T ok")
    out = Deidentifier().conversation(rec)
    assert out["messages"][0]["content"] == "DB_PASSWORD=<SECRET_1>"
    assert json.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"command": "psql -W <SECRET_1>"}
    assert out["messages"][2]["content"] == "login with <SECRET_1> ok"


def test_url_credentials_keep_the_url_readable() -> None:
    rec = _conversation(user="use postgres://app:Hx8Lq2Vz9Wm4@db.internal:5432/app",
                        args={"command": "export PGPASSWORD=Hx8Lq2Vz9Wm4"}, result="")
    out = Deidentifier().conversation(rec)
    assert out["messages"][0]["content"] == "use postgres://app:<URL_CREDENTIALS_1>@db.internal:5432/app"
    assert "<URL_CREDENTIALS_1>" in out["messages"][1]["tool_calls"][0]["function"]["arguments"]


def test_private_key_block_is_one_secret_and_arguments_stay_json() -> None:
    body = "\n".join("MIIEpAIBAAKCAQEA" + "x" * 40 + str(i) * 8 for i in range(4))
    pem = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    rec = _conversation(user="here is the key", args={"path": "id_rsa", "content": pem + "\n"},
                        result=json.dumps({"written": pem}))
    out = Deidentifier().conversation(rec)
    args = json.loads(out["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert args == {"path": "id_rsa", "content": "<SECRET_1>\n"}
    assert json.loads(out["messages"][2]["content"]) == {"written": "<SECRET_1>"}  # raw JSON result, escaped value
    assert "MIIE" not in json.dumps(out)


def test_every_planted_argument_stays_valid_json() -> None:
    for record, _ in planted_set(100, seed=3):
        out = Deidentifier().conversation(record)
        for m in out["messages"]:
            for call in m.get("tool_calls") or []:
                assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_arguments_that_are_not_json_are_replaced_as_text() -> None:
    rec = _conversation(user="x", args="to=eve@example.com, ip=203.0.113.9 {", result="eve@example.com")
    out = Deidentifier().conversation(rec)
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == "to=<EMAIL_1>, ip=<IP_1> {"
    assert out["messages"][2]["content"] == "<EMAIL_1>"


def test_unchanged_arguments_keep_their_exact_text() -> None:
    raw = '{"path":"src/app.py" ,"n": 1}'
    out = Deidentifier().conversation(_conversation(user="hi", args=raw, result="ok"))
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == raw


def test_different_conversations_are_numbered_on_their_own() -> None:
    a = _conversation(user="a@example.com", args={}, result="")
    b = _conversation(user="b@example.com c@example.com", args={}, result="")
    out, counts = deid_records([a, b])
    assert out[0]["messages"][0]["content"] == "<EMAIL_1>"
    assert out[1]["messages"][0]["content"] == "<EMAIL_1> <EMAIL_2>"
    assert counts["EMAIL"] == 3 and set(counts) == set(KINDS)


def test_secret_placeholders_are_recognisable() -> None:
    assert is_secret_placeholder("<SECRET_3>") and is_secret_placeholder('"<URL_CREDENTIALS_1>"')
    assert not is_secret_placeholder("<EMAIL_1>") and not is_secret_placeholder("SECRET_1")
    assert secret_placeholders_in("key <SECRET_1> to <EMAIL_2> via <URL_CREDENTIALS_4>") == ["<SECRET_1>", "<URL_CREDENTIALS_4>"]
    assert placeholder_kind("<PHONE_12>") == "PHONE" and placeholder_kind("<TOKEN>") is None


def test_the_mapping_is_not_shown() -> None:
    d = Deidentifier()
    d.conversation(_conversation(user="mail ana@example.com, key AKIAQ3EGRIMX2BWPLN4Z", args={}, result=""))
    assert "ana@example.com" not in repr(d) and "AKIA" not in repr(d) and "AKIA" not in str(d.counts())


def test_placeholders_and_example_values_are_left_alone() -> None:
    """Already de-identified text, template values and the AWS documentation keys are not identifiers."""
    text = ("<EMAIL_1> wrote <SECRET_2>; API_KEY=your-api-key-here; DATABASE_URL=postgres://app:<password>@localhost/app; "
            "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE; password=${DB_PASSWORD}")
    d = Deidentifier()
    out = d.conversation(_conversation(user=text, args={"c": text}, result=text))
    assert out["messages"][0]["content"] == text and sum(d.counts().values()) == 0


# Typical code and log text: timestamps, versions, paths, hashes, ids, ports, sizes, dates.
CLEAN_TEXTS = [
    "2026-12-06T15:55:05.123Z INFO  server started on 0.0.0.0:8000 in 1234 ms (pid 48213)",
    "Dec  6 15:55:05 host sshd[1234]: Accepted publickey for deploy from 127.0.0.1 port 52234 ssh2",
    "[2026-12-06 15:55:05,123] WARNING root: retry 3/5 after 0.53s; took 12.5 s; 1733500000000 epoch ms",
    "commit 3f2a9c1e8b7d6f5a4c3b2a1908f7e6d5c4b3a291\nAuthor: CI Bot\nDate:   Sun Dec 6 15:55:05 2026 +0000",
    "index 83db48f..bf269f4 100644\n--- a/src/app.py\n+++ b/src/app.py\n@@ -12,7 +12,8 @@ def main():",
    " src/orders.js | 4 ++--\n 1 file changed, 2 insertions(+), 2 deletions(-)",
    "Successfully installed requests-2.31.0 numpy-1.26.4 urllib3-2.2.1 pydantic_core-2.14.6",
    "npm WARN deprecated lodash@4.17.21; added 1302 packages in 12s; @types/node@20.11.5",
    "Python 3.11.4 (main, Jun  7 2023, 12:45:00) [GCC 12.2.0] on linux; version 1.2.3.4 build 10.0.19041.1",
    "File \"/usr/lib/python3.11/site-packages/prefect/flows.py\", line 1234, in run\n  C:\\Users\\dev\\app\\main.py:56",
    "docker: sha256:4bf92f3577b34da6a3ce929d0e0e4736b8a1c2d3e4f5a6b7c8d9e0f1a2b3c4d5 pulled; image 9c7a54a9a43c",
    "uuid 123e4567-e89b-12d3-a456-426614174000 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span 00f067aa0ba902b7",
    "FAILED tests/test_search.py::test_search_totals - AssertionError\n2 failed, 53 passed in 1.21s",
    "runs-on: ubuntu-24.04; python-version: '3.12'; node 20.11.1; go1.22.3; rustc 1.78.0",
    "GET /api/v1/orders/100234?page=2&per_page=50 HTTP/1.1 200 1532 bytes 0.012s",
    "dates 06/12/2026, 12.06.2026, 2026-12-06, 01-02-2026; range 10:00-12:00; ISBN 978-3-16-148410-0",
    "memory 2.5 GiB, 1,234,567 rows, 3.14159, 0x7ffd5e3c, 0o755, chmod 644, port 5432, exit 130",
    "std::vector<int> v; a::b::c(); MAC 00:1a:2b:3c:4d:5e; time 12:34:56.789; ratio 16:9",
    "Order #48213 total $1,299.00 (invoice 2026-000123), tracking 1Z999AA10123456784",
    "SELECT id, email FROM users WHERE created_at > '2026-01-01' LIMIT 100;",
    "password = get_password(); token = response.json()['access_token']; secret_key = settings.SECRET_KEY",
    "api_key: Optional[str] = None; token_type=Bearer; credentials=HTTPBasicCredentials; password: string",
    "token is expired; PASSWORD_MIN_LENGTH = 12; password_hash = bcrypt.hash(pw); TOKEN_TTL=3600s",
    "api_key = os.environ['API_KEY']; const token = process.env.GITHUB_TOKEN; passwd: ${PASSWD}",
    "git@github.com:acme/api.git; icon@2x.png; ssh root@prod-db-01; deploy@acme",
    "pip install 'django>=4.2,<5.0'; poetry add fastapi@^0.110.0; ports 8080-8090",
    "sha1 da39a3ee5e6b4b0d3255bfef95601890afd80709 md5 d41d8cd98f00b204e9800998ecf8427e",
    "kubectl get pods: api-7d9f8b6c5-x2k4q 1/1 Running 0 3d4h; 10m CPU; 256Mi",
    "elapsed 00:01:23.456, ETA 0:00:05, 100%|██████████| 2000/2000 [00:12<00:00, 160.2it/s]",
]


@pytest.mark.parametrize("text", CLEAN_TEXTS, ids=range(len(CLEAN_TEXTS)))
def test_no_false_positives_on_code_and_log_text(text: str) -> None:
    d = Deidentifier()
    out = d.conversation(_conversation(user=text, args={"command": text}, result=text))
    assert out["messages"][0]["content"] == text, {k: v for k, v in d.counts().items() if v}
    assert out["messages"][2]["content"] == text


def test_no_false_positives_on_the_bundled_synthetic_logs_beyond_what_they_plant() -> None:
    """Every identifier found in the bundled SYNTHETIC logs is one the synthetic world planted:
    its credentials (tasks/synthetic/agent.py `_secret_values`) and its e-mail addresses."""
    with gzip.open(ROOT / "conf" / "data" / "synthetic-prod-logs.jsonl.gz", "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert unexplained(records) == {}


# --- the command ---------------------------------------------------------------------------------
@pytest.mark.e2e
def test_cli_deid_writes_placeholders_names_the_broken_line_and_exits_4(tmp_path: Path) -> None:
    rows: list[Any] = [r for r, _ in planted_set(3, seed=4)]
    rows.insert(2, '{"conversation_id": "broken", "messages": [')  # a line that breaks mid-record
    src = write_jsonl(tmp_path / "logs.jsonl", rows)
    out = tmp_path / "out" / "deid.jsonl.gz"
    proc = run_cli(["deid", "--data", str(src), "--out", str(out), "--json"], cwd=ROOT)
    assert proc.returncode == 4, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["conversations"] == 3 and summary["bad_lines"] == 1
    assert summary["errors"] == [{"file": str(src), "line": 3, "rule": "json_parse",
                                  "message": summary["errors"][0]["message"]}]
    assert summary["counts"]["EMAIL"] == 3 and summary["counts"]["IP"] == 3
    with gzip.open(out, "rt", encoding="utf-8") as fh:
        written = [json.loads(line) for line in fh]
    assert [r["conversation_id"] for r in written] == [r["conversation_id"] for r in rows if isinstance(r, dict)]
    for record, planted in planted_set(3, seed=4):
        for _, value in planted:
            assert not leaked(written[[r["conversation_id"] for r in written].index(record["conversation_id"])], value)

    text = run_cli(["deid", "--data", str(src), "--out", str(tmp_path / "t.jsonl")], cwd=ROOT)
    assert text.returncode == 4
    assert f"{src}:3: json_parse" in text.stderr and "EMAIL" in text.stdout


@pytest.mark.e2e
def test_cli_deid_exit_status(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "ok.jsonl", [r for r, _ in planted_set(2, seed=5)])
    ok = run_cli(["deid", "--data", str(src), "--out", str(tmp_path / "o.jsonl")], cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert run_cli(["deid", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o.jsonl")], cwd=ROOT).returncode == 4
    assert run_cli(["deid", "--data", str(src), "--out", str(tmp_path / "o.txt")], cwd=ROOT).returncode == 2
    assert run_cli(["deid", "--data", str(src)], cwd=ROOT).returncode == 2
