"""What tools are and where values point: the tool catalogue, domain-tool verbs, test commands,
URLs, e-mail addresses, account numbers and internal versus external hosts."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

EFFECTS = ("read", "write", "destructive", "network_egress", "secret_access", "privilege_change")

# --- tool catalogue --------------------------------------------------------------------------
SHELL_TOOLS = frozenset({"shell", "bash", "execute_bash", "run_command", "terminal", "run_shell_command",
                         "exec", "run_terminal_cmd", "execute_command", "run_in_terminal", "cmd", "sh"})
PYTHON_TOOLS = frozenset({"execute_ipython_cell", "python", "run_python", "ipython", "execute_python",
                          "python_repl", "code_interpreter"})
READ_TOOLS = frozenset({"read_file", "view_file", "cat_file", "open_file", "read"})
WRITE_TOOLS = frozenset({"write_file", "create_file", "save_file", "write"})
EDIT_TOOLS = frozenset({"edit_file", "str_replace", "apply_patch", "replace_in_file", "edit"})
EDITOR_TOOLS = frozenset({"str_replace_editor", "text_editor", "str_replace_based_edit_tool"})
SQL_TOOLS = frozenset({"sql_query", "run_sql", "query_database", "execute_sql", "sql", "db_query"})
HTTP_TOOLS = frozenset({"http_request", "fetch", "web_request", "http_get", "web_read", "browser",
                        "get_webpage", "web_fetch", "curl", "http", "open_url", "visit_url", "browse"})
THOUGHT_TOOLS = frozenset({"think", "plan", "reflect", "scratchpad", "note_to_self"})
FINISH_TOOLS = frozenset({"finish", "final_answer", "submit", "respond", "answer", "task_complete"})
MESSAGE_ARG_KEYS = ("message", "body", "text", "content", "msg")
RECIPIENT_KEYS = ("recipient", "recipients", "to", "cc", "bcc", "name", "user", "channel", "email",
                  "participants", "receiver", "address")

# Verbs at the start of a domain tool's name, by effect (send_money, delete_file, get_balance).
_VERB_EFFECT: dict[str, str] = {
    **dict.fromkeys(("get", "read", "list", "search", "find", "view", "show", "check", "query", "lookup",
                     "fetch", "download", "describe", "count", "inspect", "retrieve", "open"), "read"),
    **dict.fromkeys(("send", "post", "share", "forward", "reply", "publish", "upload", "email", "message",
                     "notify", "invite", "transfer", "pay", "tweet", "comment"), "send"),
    **dict.fromkeys(("delete", "remove", "drop", "erase", "purge", "destroy", "cancel", "revoke", "wipe",
                     "truncate", "clear", "kick", "ban"), "delete"),
    **dict.fromkeys(("create", "add", "update", "set", "write", "edit", "modify", "change", "append", "insert",
                     "schedule", "book", "reserve", "rename", "move", "copy", "save", "put", "patch",
                     "register", "enable", "disable", "grant", "assign", "close", "merge", "deploy",
                     "install", "run", "execute", "start", "stop", "restart", "commit", "push", "apply",
                     "reset", "approve", "submit", "make", "buy", "order", "sign", "subscribe"), "write"),
}


def tool_verb(name: str) -> str | None:
    """read | send | delete | write for a domain tool name by its leading verb, else None."""
    parts = re.split(r"[_\-.]|(?<=[a-z])(?=[A-Z])", name)
    for p in parts[:2]:
        effect = _VERB_EFFECT.get(p.lower())
        if effect:
            return effect
    return None


# Not a package name being installed (`pip install pytest-cov`).
TEST_COMMAND_RE = re.compile(r"(?<!install )(?<!add )\b(pytest|py\.test|python3? -m (pytest|unittest)|tox|nox|npm (run )?test|yarn test|pnpm test|"
                             r"jest|vitest|mocha|go test|cargo test|make (test|check)|mvn (test|verify)|gradle test|"
                             r"\./gradlew test|rspec|phpunit|ctest|dotnet test|bundle exec rake test)(?![\w-]|\.\w)"
                             # a project's own runner script: `python run_tests.py`, `bash scripts/test_all.sh`
                             r"|\b(python3?|bash|sh)\s+[\w./-]*\b(run_?tests?|tests?_\w*|\w+_tests?)\.(py|sh)\b"
                             r"|(^|[\s;&|])\./[\w./-]*\b(run_?tests?|tests?_\w*|\w+_tests?)\.sh\b")


def is_test_command(text: str) -> bool:
    """Whether a command line runs a test suite (shared by the simulator and the judges)."""
    return bool(TEST_COMMAND_RE.search(text))


# --- values in text ----------------------------------------------------------------------------
URL_RE = re.compile(r"\b(?:https?|ftp|s3|gs|wss?)://[^\s'\"<>`)\]}]+|\bwww\.[a-z0-9-]+(?:\.[a-z0-9-]+)+[^\s'\"<>`)\]}]*", re.I)
EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
HOST_RE = re.compile(r"\b(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:com|net|org|io|dev|co|cc|info|biz|xyz|ru|cn|me|app|site|online|top|tk|ai|sh|ly|uk|de|fr|us|to|link|cloud|tech|store)\b", re.I)
IBAN_RE = re.compile(r"\b[A-Z]{2}\d{2}[A-Z0-9]{10,30}\b")
LONG_NUMBER_RE = re.compile(r"(?<![\w.])\+?\d[\d -]{8,}\d(?![\w.])")
_INTERNAL_SUFFIX = re.compile(r"(^|\.)(localhost|local|internal|lan|svc|cluster\.local|corp|home\.arpa)$", re.I)


def url_host(url: str) -> str:
    """The host of a URL or bare host[:port][/path] string (lower case), or ""."""
    text = url if "://" in url else "http://" + url
    try:
        return (urlsplit(text).hostname or "").lower()
    except ValueError:
        return ""


def is_internal_host(host: str) -> bool:
    """Loopback, private or link-local addresses and internal DNS suffixes."""
    host = host.strip("[]").lower()
    if not host:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return bool(_INTERNAL_SUFFIX.search(host)) or "." not in host
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified

