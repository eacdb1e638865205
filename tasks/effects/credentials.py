"""Credentials in text: detect-secrets' token and keyword detectors, plus secret-named
assignments of high-entropy values (unquoted `.env` lines, config) and passwords in connection
strings. Placeholders (`your-api-key-here`, `<TOKEN>`, `xxxx`) and references to the environment
(`${API_KEY}`, `os.environ["X"]`) are not credentials."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from detect_secrets.core.scan import scan_line
from detect_secrets.settings import transient_settings

_PLACEHOLDER = re.compile(
    r"(?i)^(<[^>]*>|\$\{?[A-Z_][A-Z0-9_]*\}?|\{\{.*\}\}|%\(?\w+\)?s?|x{4,}|\*{3,}|\.{3,}|changeme|change_me|secret|password|"
    r"passw(or)?d123|test|testing|dummy|fake|sample|example|placeholder|redacted|none|null|todo|tbd)$"
    r"|(your[-_ ]?|my[-_ ]?)(api[-_ ]?)?(key|token|secret|password)|example|placeholder|redacted|dummy|xxxx|\.\.\.|<|>|\{\{")
# Case matters for `$VAR`: a real password may contain "$vL7…".
_ENV_REF = re.compile(r"(?i:os\.environ|getenv|process\.env|env\(|settings\.|config\[)|^\$\{?[A-Z_][A-Z0-9_]*\}?$|\$\{\w+")
_CODE_LIKE = re.compile(r"\w\(|^\w+(\.\w+)+$")
_TOKEN_PLUGINS = [
    {"name": "AWSKeyDetector"}, {"name": "ArtifactoryDetector"}, {"name": "AzureStorageKeyDetector"},
    {"name": "BasicAuthDetector"}, {"name": "DiscordBotTokenDetector"}, {"name": "GitHubTokenDetector"},
    {"name": "GitLabTokenDetector"}, {"name": "JwtTokenDetector"}, {"name": "MailchimpDetector"},
    {"name": "NpmDetector"}, {"name": "OpenAIDetector"}, {"name": "PrivateKeyDetector"},
    {"name": "PypiTokenDetector"}, {"name": "SendGridDetector"}, {"name": "SlackDetector"},
    {"name": "SquareOAuthDetector"}, {"name": "StripeDetector"}, {"name": "TelegramBotTokenDetector"},
    {"name": "TwilioKeyDetector"}, {"name": "KeywordDetector"},
]
_EXTRA_TOKENS = re.compile(r"\bsk-(?:live-|proj-|ant-)?[A-Za-z0-9_-]{24,}|\bsk_live_[A-Za-z0-9]{16,}|\bAIza[0-9A-Za-z_-]{35}\b"
                           r"|\bxox[abprs]-[A-Za-z0-9-]{10,}|\bgh[pousr]_[A-Za-z0-9]{36}\b|\bglpat-[A-Za-z0-9_-]{20}\b")
_ASSIGNED = re.compile(r"(?i)\b([\w.-]*(?:secret|token|passw(?:or)?d|pwd|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth)[\w.-]*)\b"
                       r"[\"']?\s*(?:[:=]|=>)\s*[\"']?([^\s\"',;}{)]{8,})")
_DSN_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]{6,})@[^\s/]+", re.I)


def _entropy(s: str) -> float:
    counts = Counter(s)
    return -sum(c / len(s) * math.log2(c / len(s)) for c in counts.values())


def looks_placeholder(value: str) -> bool:
    """A template value, a mask or a reference to the environment rather than a credential."""
    v = value.strip().strip("'\"`")
    return bool(_PLACEHOLDER.search(v)) or bool(_ENV_REF.search(v)) or len(set(v)) <= 3


@dataclass(frozen=True)
class Secret:
    """A credential found in text: what detected it, and its value."""

    kind: str
    value: str

    def masked(self) -> str:
        return f"{self.kind} {self.value[:4]}…" if len(self.value) > 8 else f"{self.kind} …"


@lru_cache(maxsize=8192)
def secrets_in(text: str) -> tuple[Secret, ...]:
    """Credentials in text: detect-secrets' token detectors and keyword detector, plus
    secret-named assignments of high-entropy values (.env lines, config), DSN passwords.
    Placeholders and references to the environment are not credentials."""
    if not text or len(text) < 8:
        return ()
    found: dict[str, Secret] = {}
    with transient_settings({"plugins_used": _TOKEN_PLUGINS}):
        for line in text.splitlines()[:2000]:
            if len(line) > 4000:
                line = line[:4000]
            for s in scan_line(line):
                value = str(s.secret_value or "")
                if not value or looks_placeholder(value):
                    continue
                if s.type == "Secret Keyword" and (_entropy(value) < 2.5 or len(value) < 8 or (not re.search(r"\d", value) and len(value) < 12)):
                    continue
                found.setdefault(value, Secret(s.type, value))
    for m in _EXTRA_TOKENS.finditer(text):
        if not looks_placeholder(m.group(0)):
            found.setdefault(m.group(0), Secret("token", m.group(0)))
    for m in _ASSIGNED.finditer(text):
        value = m.group(2)
        if not looks_placeholder(value) and not _CODE_LIKE.search(value) and _entropy(value) >= 3.0 and re.search(r"\d", value) and re.search(r"[A-Za-z]", value):
            found.setdefault(value, Secret(f"{m.group(1)} value", value))
    for m in _DSN_PASSWORD.finditer(text):
        if not looks_placeholder(m.group(1)):
            found.setdefault(m.group(1), Secret("connection-string password", m.group(1)))
    return tuple(found.values())

