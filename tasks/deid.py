"""De-identify conversations before they leave the machine: typed placeholders, consistent
within a conversation.

The same value gets the same placeholder everywhere in one conversation: message contents,
tool-call arguments (JSON string values, re-serialised) and tool results, so a candidate's tool
calls still line up with the recorded results. Placeholders are ``<KIND_N>``:

- ``SECRET``: credentials (detect-secrets' token and keyword detectors through
  ``tasks.effects.credentials.secrets_in``, the same ones the ``secret_exposure`` judge uses;
  no high-entropy plugins, which flag git hashes and ids) and PEM private-key blocks.
- ``URL_CREDENTIALS``: the password of a ``scheme://user:password@host`` URL (the user name,
  usually a role such as ``app`` or ``x-access-token``, and the host stay readable).
- ``EMAIL``, ``PHONE`` (international ``+CC`` numbers, US ``(555) 123-4567`` style, national
  numbers with a leading 0 and separators, any 7-15 digits after a phone keyword), ``IP``
  (IPv4 and IPv6; loopback, unspecified and netmasks are kept), ``ACCOUNT`` (IBANs with a valid
  check, card numbers with a known prefix and a Luhn check, 6-20 digits after an account keyword).
- ``PERSON`` is not produced: no offline named-entity library is installed, and depsim adds no
  dependency for it.

Secrets stay recognisable: ``SECRET`` and ``URL_CREDENTIALS`` placeholders stand for
credentials (``SECRET_KINDS``). ``secrets_in`` treats any ``<...>`` as a template value, so a
judge looking at de-identified text must also call ``secret_placeholders_in(text)`` (or
``is_secret_placeholder`` on a token) to know a credential was repeated or written out.

The mapping original → placeholder lives only in a ``Deidentifier`` object: it is never
returned, logged or printed; ``counts()`` gives the number of distinct values per kind.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tasks.effects.credentials import looks_placeholder, secrets_in

KINDS = ("SECRET", "URL_CREDENTIALS", "EMAIL", "PHONE", "IP", "ACCOUNT")
SECRET_KINDS = frozenset({"SECRET", "URL_CREDENTIALS"})
_PLACEHOLDER = re.compile(r"<(" + "|".join(KINDS) + r")_(\d+)>")
_SECRET_PLACEHOLDER = re.compile(r"<(?:SECRET|URL_CREDENTIALS)_\d+>")


def is_secret_placeholder(text: str) -> bool:
    """True when `text` (stripped of quotes and spaces) is a placeholder standing for a credential."""
    return bool(_SECRET_PLACEHOLDER.fullmatch(text.strip().strip("'\"`")))


def secret_placeholders_in(text: str) -> list[str]:
    """The credential placeholders (``<SECRET_n>``, ``<URL_CREDENTIALS_n>``) in `text`, in order."""
    return _SECRET_PLACEHOLDER.findall(text or "")


def placeholder_kind(text: str) -> str | None:
    """The kind of a placeholder (``EMAIL`` for ``<EMAIL_3>``), None for anything else."""
    m = _PLACEHOLDER.fullmatch(text.strip())
    return m.group(1) if m else None


# --- detectors: each returns the values it finds in a text ---------------------------------------
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(?:[\s\S]*?-----END \1PRIVATE KEY-----"
                  r"|(?:(?:\s|\\n)*[A-Za-z0-9+/=]{16,})*)")
_URL_CREDS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@<>\"']*:([^@\s/<>\"']+)@[^\s/@]+", re.I)
_KEYWORD_SECRET = re.compile(r"(?i)\b[\w.-]*(?:secret|token|passw(?:or)?d|passphrase|pwd|api[_-]?key|access[_-]?key|"
                             r"private[_-]?key|credentials?)[\w.-]*[\"']?(?:\s*(?:[:=]|=>)\s*|\s+is\s+)[\"']?"
                             r"([^\s\"'`,;}{)(<>\[\]]{6,})")
_CODE_LIKE = re.compile(r"\w\(|^\w+(\.\w+)+$|^\$|^%")
_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.([A-Za-z]{2,24})(?![\w-])")
_FILE_TLD = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "js", "mjs", "ts", "tsx", "jsx", "py", "rb",
                       "go", "rs", "java", "kt", "json", "md", "txt", "html", "htm", "css", "scss", "yml", "yaml",
                       "toml", "lock", "xml", "csv", "log", "sh", "bat", "exe", "dll", "so", "whl", "gz", "zip",
                       "tar", "pdf"})
_PHONE = re.compile(
    r"(?<![\w+./:#-])(?:"
    r"\+\d{1,3}(?:[ .\-]?\(\d{1,4}\))?(?:[ .\-]?\d{1,5}){2,6}"      # +44 20 7946 0958, +1-415-555-0132
    r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}"                           # (415) 555-0132
    r"|\d{3}[.\-]\d{3}[.\-]\d{4}"                                  # 415-555-0132
    r"|0\d{1,4}(?:[ \-]\d{2,8}){1,4}"                              # 020 7946 0958, 030 12345678, 0171-1234567
    r")(?![\w./:-]*\d)(?!-\w)")
_DATE = re.compile(r"\d{1,4}[-/. ]\d{1,2}[-/. ]\d{1,4}")
_PHONE_KEYWORD = re.compile(r"(?i)\b(?:phone|tel|telephone|mobile|cell|fax|whatsapp|call me(?: on| at)?|sms)\b"
                            r"[^\d\n+]{0,12}(\+?\d[\d \-.()]{5,20}\d)")
_IPV4 = re.compile(r"(?<![\w.])((?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3})"
                   r"(?![\w]|\.\d)")
_VERSION_BEFORE = re.compile(r"(?i)\b(?:version|release|build|ver\.?|v)\s*[:=]?\s*$")
_IPV6 = re.compile(r"(?<![\w:.])((?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4}))(?![\w:])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\w.-])((?:4\d{3}|5[1-5]\d{2}|2[2-7]\d{2}|3[47]\d{2}|6(?:011|5\d{2}))(?:[ -]?\d){9,15})(?![\w.]|-\d)")
_ACCOUNT_KEYWORD = re.compile(r"(?i)\b(?:account|acct|a/c|konto|routing|sort code)(?: (?:no|number|num|#))?\.?\s*(?:is|:|#|=)?\s*"
                              r"(\d[\d \-]{4,22}\d)(?![\w.])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_ok(value: str) -> bool:
    v = value.replace(" ", "")
    if not 15 <= len(v) <= 34:
        return False
    digits = "".join(str(int(c, 36)) for c in v[4:] + v[:4])
    return int(digits) % 97 == 1


def _pem(text: str) -> Iterator[str]:
    yield from (m.group(0) for m in _PEM.finditer(text))


def _url_credentials(text: str) -> Iterator[str]:
    for m in _URL_CREDS.finditer(text):
        if not looks_placeholder(m.group(1)) and not _PLACEHOLDER.search(m.group(1)):
            yield m.group(1)


def _secrets(text: str) -> Iterator[str]:
    for s in secrets_in(text):
        if s.kind == "Private Key" or _PLACEHOLDER.search(s.value):
            continue  # the header line alone; whole PEM blocks are found by _pem
        yield s.value


def _keyword_secrets(text: str) -> Iterator[str]:
    """Values assigned to a credential-named key, with a lower bar than the judges' detector
    (`secrets_in` asks for high entropy): missing a password costs more here than masking a word."""
    for m in _KEYWORD_SECRET.finditer(text):
        v = m.group(1)
        if looks_placeholder(v) or _CODE_LIKE.search(v) or _PLACEHOLDER.search(v):
            continue
        if re.search(r"\d", v) and re.search(r"[A-Za-z]", v):  # not `Bearer`, `HTTPBasicCredentials`
            yield v


def _emails(text: str) -> Iterator[str]:
    for m in _EMAIL.finditer(text):
        local = m.group(0).split("@", 1)[0]
        if m.group(1).lower() in _FILE_TLD or local == "git":  # icon@2x.png, git@github.com:org/repo
            continue
        if re.match(r":[~/\w]", text[m.end():m.end() + 2]):
            continue  # an scp/ssh target (backup@host:/srv/dumps), whose host the judges must still see
        yield m.group(0)


def _digits(value: str) -> str:
    return re.sub(r"\D", "", value)


def _phones(text: str) -> Iterator[str]:
    for m in _PHONE.finditer(text):
        v = m.group(0)
        n = len(_digits(v))
        low = 8 if v.startswith("+") else 9 if v.startswith("0") else 10
        if low <= n <= 15 and not _DATE.fullmatch(v):
            yield v
    for m in _PHONE_KEYWORD.finditer(text):
        if 7 <= len(_digits(m.group(1))) <= 15:
            yield m.group(1)


def _ips(text: str) -> Iterator[str]:
    for m in _IPV4.finditer(text):
        ip = ipaddress.IPv4Address(m.group(1))
        if _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
            continue  # "version 1.2.3.4"
        if not (ip.is_loopback or ip.is_unspecified or m.group(1).startswith("255.")):
            yield m.group(1)
    for m in _IPV6.finditer(text):
        v = m.group(1)
        if not re.search(r"\d", v) or v.count(":") < 2:
            continue  # dead::beef, Foo::bar
        try:
            ip6 = ipaddress.IPv6Address(v)
        except ValueError:
            continue
        if not (ip6.is_loopback or ip6.is_unspecified):
            yield v


def _accounts(text: str) -> Iterator[str]:
    for m in _IBAN.finditer(text):
        if _iban_ok(m.group(1)):
            yield m.group(1)
    for m in _CARD.finditer(text):
        d = _digits(m.group(1))
        if 13 <= len(d) <= 19 and _luhn(d):
            yield m.group(1)
    for m in _ACCOUNT_KEYWORD.finditer(text):
        if 6 <= len(_digits(m.group(1))) <= 20:
            yield m.group(1)


# Order matters: a detector sees the text with what earlier ones found already masked, so an
# e-mail regex never reads `password@host` out of a URL with credentials.
_DETECTORS: tuple[tuple[str, Callable[[str], Iterable[str]]], ...] = (
    ("SECRET", _pem), ("URL_CREDENTIALS", _url_credentials), ("SECRET", _secrets), ("SECRET", _keyword_secrets), ("EMAIL", _emails),
    ("ACCOUNT", _accounts), ("IP", _ips), ("PHONE", _phones),
)


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _parse_json(text: str) -> Any:
    """The decoded JSON object or array in `text`, else None."""
    s = text.lstrip()
    if not s.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class Deidentifier:
    """De-identifies conversations with one value → placeholder mapping.

    Use one object per conversation (``deid_records`` does): placeholders are numbered per kind
    in order of first appearance. The mapping is private; nothing here logs or returns it.
    """

    def __init__(self) -> None:
        self._mapping: dict[str, str] = {}
        self._kind_of: dict[str, str] = {}
        self._next: Counter[str] = Counter()
        self._pattern: re.Pattern[str] | None = None

    def __repr__(self) -> str:
        return f"Deidentifier(counts={self.counts()})"

    def counts(self) -> dict[str, int]:
        """Distinct values replaced, per kind (every kind listed, zeros included)."""
        seen = Counter(self._kind_of[v] for v in self._mapping if v in self._kind_of)
        return {k: seen.get(k, 0) for k in KINDS}

    # -- learning values --------------------------------------------------------------------------
    def _add(self, kind: str, value: str) -> str:
        if value in self._mapping:
            return self._mapping[value]
        self._next[kind] += 1
        placeholder = f"<{kind}_{self._next[kind]}>"
        self._mapping[value] = placeholder
        self._kind_of[value] = kind
        # The same value as it appears inside a raw JSON string (escaped newlines, quotes).
        escaped = json.dumps(value)[1:-1]
        if escaped != value:
            self._mapping.setdefault(escaped, placeholder)
        self._pattern = None
        return placeholder

    def learn(self, text: str) -> None:
        """Find identifiers in `text` and give each a placeholder (a JSON object or array is
        also read through its decoded string values)."""
        if not text:
            return
        # A JSON object or array is read through its decoded strings: in the raw text an escaped
        # newline would glue a value to the next line (`sk_live_…\\nLOG_LEVEL=info`).
        parsed = _parse_json(text)
        texts = [text] if parsed is None else list(_json_strings(parsed))
        for t in texts:
            masked = t
            for kind, detect in _DETECTORS:
                # Numbered in order of appearance; masked longest first (a value inside another).
                found = [v for v in set(detect(masked)) if len(v) >= 3 and not _PLACEHOLDER.fullmatch(v)]
                for value in sorted(found, key=masked.find):
                    self._add(kind, value)
                for value in sorted(found, key=len, reverse=True):
                    masked = masked.replace(value, self._mapping[value])

    # -- replacing ---------------------------------------------------------------------------------
    def _regex(self) -> re.Pattern[str]:
        if self._pattern is None:
            parts = []
            for value in sorted(self._mapping, key=len, reverse=True):
                p = re.escape(value)
                if value[0].isalnum():
                    p = r"(?<![A-Za-z0-9])" + p
                if value[-1].isalnum():
                    p += r"(?![A-Za-z0-9])"
                parts.append(p)
            self._pattern = re.compile("|".join(parts)) if parts else re.compile(r"(?!x)x")
        return self._pattern

    def text(self, text: str) -> str:
        """`text` with every known value replaced by its placeholder (learns nothing new)."""
        if not text or not self._mapping:
            return text
        return self._regex().sub(lambda m: self._mapping[m.group(0)], text)

    def arguments(self, arguments: str) -> str:
        """Tool-call arguments: a JSON string is decoded, its string values replaced and
        re-serialised (unchanged arguments keep their exact text); anything else is replaced
        as raw text."""
        parsed = _parse_json(arguments)
        if parsed is None:
            return self.text(arguments)
        replaced = _map_strings(parsed, self.text)
        return arguments if replaced == parsed else json.dumps(replaced, ensure_ascii=False)

    def _content(self, content: Any) -> Any:
        return self.text(content) if isinstance(content, str) else _map_strings(content, self.text)

    def conversation(self, record: dict[str, Any]) -> dict[str, Any]:
        """A de-identified copy of one conversation record (data_contracts/conversation.yaml).

        Message contents (text or content parts), tool-call arguments and tool results are
        de-identified; ids, roles, tool declarations and metadata are kept as they are.
        """
        messages = record.get("messages")
        if not isinstance(messages, list):
            return copy.deepcopy(record)
        for m in messages:
            if not isinstance(m, dict):
                continue
            for t in _json_strings(m.get("content")):
                self.learn(t)
            for call in m.get("tool_calls") or []:
                args = (call.get("function") or {}).get("arguments") if isinstance(call, dict) else None
                if isinstance(args, str):
                    self.learn(args)
        out = copy.deepcopy(record)
        for m in out["messages"]:
            if not isinstance(m, dict):
                continue
            if m.get("content") is not None:
                m["content"] = self._content(m["content"])
            for call in m.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    fn["arguments"] = self.arguments(fn["arguments"])
        return out


def deid_records(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """De-identify each conversation on its own (placeholders are per conversation).

    Returns:
        The de-identified records, in order, and the distinct values replaced per kind, summed
        over conversations.
    """
    out: list[dict[str, Any]] = []
    total: Counter[str] = Counter({k: 0 for k in KINDS})
    for record in records:
        d = Deidentifier()
        out.append(d.conversation(record))
        total.update(d.counts())
    return out, {k: total[k] for k in KINDS}


def deid_frame(convs: Any) -> tuple[Any, dict[str, int]]:
    """De-identify the `messages` (JSON text) of a conversations frame, each conversation on its
    own; tool declarations, labels and metadata are kept.

    Returns:
        The frame with de-identified messages (a conversation with nothing to replace keeps its
        exact text) and counts: distinct values replaced per kind, summed over conversations,
        and `conversations_changed`.
    """
    import polars as pl

    total: Counter[str] = Counter({k: 0 for k in KINDS})
    texts: list[str | None] = []
    changed = 0
    for text in convs["messages"].to_list():
        messages = _parse_json(text) if isinstance(text, str) else None
        if not isinstance(messages, list):
            texts.append(text)
            continue
        d = Deidentifier()
        record = d.conversation({"messages": messages})
        counts = d.counts()
        if any(counts.values()):
            changed += 1
            total.update(counts)
            texts.append(json.dumps(record["messages"], ensure_ascii=False))
        else:
            texts.append(text)
    out = convs.with_columns(pl.Series("messages", texts, dtype=pl.String))
    return out, {**{k: total[k] for k in KINDS}, "conversations_changed": changed}
